//! The meta benchmark: put and linearizable get of small values on a 3-member Continuum meta
//! cluster and on a 3-member etcd 3.4 cluster, one after the other in the same run, and the
//! time from `kill -9` of the leader to the first committed write.
//!
//! Both targets go through the same code: a [`KvTarget`] says how to lay out and start its
//! members and how to connect; a [`KvClient`] is one gRPC connection that can put, read
//! linearizably and report the member's view of the leader. Per target the benchmark
//!
//! 1. starts the members and waits (with a deadline) until every member names the same leader;
//! 2. for each client count C: opens C connections to the leader, warms up, then runs a put
//!    phase and a get phase of N operations in total, each client doing its share sequentially
//!    on keys `bench/c<C>/<client>/<i>`; gets read back the keys the put phase wrote and check
//!    the value;
//! 3. repeats a failover round: with no load, SIGKILL the leader, issue puts to the survivors
//!    until one commits, restart the killed member and wait for the cluster to agree on a leader.
//!
//! Only one cluster runs at a time, so the two targets never compete for the machine. Results
//! are compared as ratios, printed and written as JSON; nothing is asserted.

use std::fmt;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::{timeout, MissedTickBehavior};

use crate::cluster::{Cluster, MemberSpec, PortAllocator, WorkDir};
use crate::continuum::ContinuumTarget;
use crate::etcd::EtcdTarget;
use crate::hist::{DurationStats, LatencyHistogram, Summary};

/// Unrecorded puts (and as many gets) per client before each measured client count.
const WARMUP_OPS_PER_CLIENT: u64 = 20;
/// A benchmark request slower than this fails the run: something is broken, not slow.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a cluster to start, or heal after a restart, until all members agree on a leader.
const LEADER_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two leader probes while waiting for one.
const LEADER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Time allowed for connecting to one member and getting its status.
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// Time after the kill by which some put must have committed, else the round fails.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// Per-put timeout while waiting for the new leader: a put stuck on a member without a leader
/// is abandoned after this and retried (on the next surviving member).
const FAILOVER_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(200);
/// A new failover put starts this often (while fewer than the maximum are in flight), which
/// bounds the measurement's resolution to about this much rather than the attempt timeout.
const FAILOVER_ATTEMPT_INTERVAL: Duration = Duration::from_millis(50);
const FAILOVER_MAX_IN_FLIGHT: usize = 4;
/// Input limits: beyond these the run would measure the benchmark client, not the servers.
const MAX_CLIENTS: u32 = 1024;
const MAX_OPS: u64 = 10_000_000;
const MAX_VALUE_BYTES: usize = 1 << 20;
const MAX_FAILOVER_ROUNDS: u32 = 100;
/// Values are windows into one buffer of random bytes (random so that RocksDB's block
/// compression cannot shrink them and flatter Continuum).
const VALUE_POOL_BYTES: usize = 1 << 16;
/// The targets, reported (never asserted) when the run includes this client count.
const GOAL_CLIENTS: u32 = 16;
const GOAL_PUT_THROUGHPUT_X: f64 = 1.5;

/// Options of `continuum-bench meta`.
#[derive(Debug, clap::Args)]
pub struct MetaArgs {
    /// The `continuum` binary [default: `continuum` next to this executable].
    #[arg(long)]
    continuum_bin: Option<PathBuf>,
    /// The etcd 3.4 server binary (Debian package etcd-server).
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// Operations per measured phase (one phase = one op type at one client count).
    #[arg(long, default_value_t = 5000)]
    ops: u64,
    /// Client counts to measure, comma-separated; each client has its own connection.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<u32>,
    /// Size of every value written.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench-results/meta.json")]
    json: PathBuf,
    /// Keep member data and logs in a new run directory under DIR [default: a temporary
    /// directory, removed at exit].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// First loopback port to try; members take consecutive free ports from here.
    #[arg(long, default_value_t = 21000)]
    base_port: u16,
    /// Measure Continuum only.
    #[arg(long)]
    skip_etcd: bool,
    /// Measure etcd only.
    #[arg(long)]
    skip_continuum: bool,
    /// Leader kills per target (0 skips the failover measurement).
    #[arg(long, default_value_t = 3)]
    failover_rounds: u32,
}

/// One member's view of the cluster, as its Status RPC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    pub member_id: u64,
    /// 0 while the member knows of no leader.
    pub leader_id: u64,
}

/// One gRPC connection to one member of a target. Cloning shares the connection.
pub trait KvClient: Clone + Send + 'static {
    fn put(&mut self, key: Bytes, value: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// Linearizable read of one key; `None` if it does not exist.
    fn get(&mut self, key: Bytes) -> impl Future<Output = Result<Option<Bytes>>> + Send;
    fn status(&mut self) -> impl Future<Output = Result<MemberStatus>> + Send;
}

/// A system under test: how to start its 3 members and reach them.
pub trait KvTarget {
    type Client: KvClient;
    fn name(&self) -> &'static str;
    fn version(&self) -> Option<String>;
    /// Member command lines, in the order of [`KvTarget::client_urls`].
    fn member_specs(&self) -> Vec<MemberSpec>;
    fn client_urls(&self) -> &[String];
    fn connect(url: &str) -> impl Future<Output = Result<Self::Client>> + Send;
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Put,
    Get,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Put => "put",
            Op::Get => "get",
        })
    }
}

/// The validated workload shared by both targets.
struct Workload {
    ops: u64,
    clients: Vec<u32>,
    value_bytes: usize,
    failover_rounds: u32,
    values: ValuePool,
}

impl Workload {
    fn from_args(args: &MetaArgs) -> Result<Self> {
        ensure!(
            !(args.skip_etcd && args.skip_continuum),
            "--skip-etcd and --skip-continuum together leave nothing to measure"
        );
        ensure!(
            !args.clients.is_empty(),
            "--clients needs at least one count"
        );
        for &c in &args.clients {
            ensure!(
                (1..=MAX_CLIENTS).contains(&c),
                "--clients {c}: must be 1..={MAX_CLIENTS}"
            );
        }
        let max_clients = args.clients.iter().copied().max().unwrap_or(1);
        ensure!(
            (u64::from(max_clients)..=MAX_OPS).contains(&args.ops),
            "--ops {}: must be at least the largest client count ({max_clients}) and at most {MAX_OPS}",
            args.ops
        );
        ensure!(
            (1..=MAX_VALUE_BYTES).contains(&args.value_bytes),
            "--value-bytes {}: must be 1..={MAX_VALUE_BYTES}",
            args.value_bytes
        );
        ensure!(
            args.failover_rounds <= MAX_FAILOVER_ROUNDS,
            "--failover-rounds {}: at most {MAX_FAILOVER_ROUNDS}",
            args.failover_rounds
        );
        Ok(Self {
            ops: args.ops,
            clients: args.clients.clone(),
            value_bytes: args.value_bytes,
            failover_rounds: args.failover_rounds,
            values: ValuePool::new(args.value_bytes),
        })
    }
}

/// Deterministic pseudo-random values: the same (client, i) always yields the same bytes, so
/// the get phase can check what it reads without storing what was written.
#[derive(Clone)]
struct ValuePool {
    bytes: Bytes,
    value_bytes: usize,
}

impl ValuePool {
    fn new(value_bytes: usize) -> Self {
        let len = VALUE_POOL_BYTES.max(2 * value_bytes);
        let mut state = 0x5eed_u64;
        let mut buf = Vec::with_capacity(len + 8);
        while buf.len() < len {
            buf.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        buf.truncate(len);
        Self {
            bytes: Bytes::from(buf),
            value_bytes,
        }
    }

    fn value(&self, client: usize, i: u64) -> Bytes {
        let mut state = (client as u64) << 40 ^ i;
        let span = (self.bytes.len() - self.value_bytes + 1) as u64;
        let offset = (splitmix64(&mut state) % span) as usize;
        self.bytes.slice(offset..offset + self.value_bytes)
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn progress(target: &str, message: impl fmt::Display) {
    eprintln!("[meta/{target}] {message}");
}

/// Entry point of `continuum-bench meta`.
pub async fn run(args: MetaArgs) -> Result<()> {
    let workload = Workload::from_args(&args)?;
    let work_dir = WorkDir::new(args.work_dir.as_deref())?;
    progress(
        "setup",
        format!("work directory {}", work_dir.path().display()),
    );
    let mut ports = PortAllocator::new(args.base_port);

    // Lay out both targets before running either, so a missing binary fails the run at once
    // rather than after the first target's measurements.
    let continuum = if args.skip_continuum {
        None
    } else {
        let bin = match &args.continuum_bin {
            Some(bin) => bin.clone(),
            None => default_continuum_bin()?,
        };
        let dir = work_dir.subdir("continuum")?;
        Some(ContinuumTarget::new(&bin, &dir, &mut ports)?)
    };
    let etcd = if args.skip_etcd {
        None
    } else {
        let dir = work_dir.subdir("etcd")?;
        Some(EtcdTarget::new(&args.etcd_bin, &dir, &mut ports)?)
    };

    let mut targets = Vec::new();
    if let Some(target) = &continuum {
        targets.push(bench_target(target, &workload).await?);
    }
    if let Some(target) = &etcd {
        targets.push(bench_target(target, &workload).await?);
    }

    let report = MetaReport::new(&workload, targets);
    print!("{}", render_report(&report));
    write_json(&args.json, &report)?;
    progress("setup", format!("wrote {}", args.json.display()));
    Ok(())
}

fn default_continuum_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the continuum-bench executable")?;
    let dir = exe
        .parent()
        .context("the continuum-bench executable has no parent directory")?;
    Ok(dir.join("continuum"))
}

fn write_json(path: &Path, report: &MetaReport) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let text = serde_json::to_string_pretty(report).context("serialising the result")?;
    fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Starts the target's cluster, measures it and stops it.
async fn bench_target<T: KvTarget>(target: &T, workload: &Workload) -> Result<TargetReport> {
    let name = target.name();
    let specs = target.member_specs();
    progress(name, format!("starting {} members", specs.len()));
    let started = Instant::now();
    let mut cluster = Cluster::start(name, specs)?;
    let leader = wait_for_leader(target, &mut cluster).await?;
    progress(
        name,
        format!(
            "leader {} after {} ms",
            cluster.member_name(leader),
            started.elapsed().as_millis()
        ),
    );

    let mut runs = Vec::new();
    for &clients in &workload.clients {
        runs.push(bench_client_count(target, &mut cluster, workload, clients).await?);
    }
    let mut failover_samples = Vec::new();
    for round in 1..=workload.failover_rounds {
        failover_samples.push(failover_round(target, &mut cluster, workload, round).await?);
    }

    let command_lines = cluster.command_lines();
    drop(cluster);
    progress(name, "stopped");
    Ok(TargetReport {
        name,
        version: target.version(),
        command_lines,
        runs,
        failover_ms: DurationStats::from_samples(&failover_samples),
    })
}

async fn bench_client_count<T: KvTarget>(
    target: &T,
    cluster: &mut Cluster,
    workload: &Workload,
    clients: u32,
) -> Result<RunReport> {
    let name = target.name();
    let leader = wait_for_leader(target, cluster).await?;
    let url = &target.client_urls()[leader];
    let prefix = format!("bench/c{clients}");
    progress(
        name,
        format!(
            "{clients} client(s): warm-up against leader {}",
            cluster.member_name(leader)
        ),
    );
    let warmup_ops = u64::from(clients) * WARMUP_OPS_PER_CLIENT;
    let warmup_prefix = format!("{prefix}/warmup");
    for op in [Op::Put, Op::Get] {
        run_phase::<T>(
            url,
            clients,
            warmup_ops,
            op,
            &warmup_prefix,
            &workload.values,
        )
        .await?;
    }
    let phase = |op: Op| {
        progress(
            name,
            format!("{clients} client(s): {op} x {}", workload.ops),
        );
        run_phase::<T>(url, clients, workload.ops, op, &prefix, &workload.values)
    };
    let put = phase(Op::Put).await?;
    progress(name, format!("  put: {}", summary_line(&put)));
    let get = phase(Op::Get).await?;
    progress(name, format!("  get: {}", summary_line(&get)));
    cluster.check_running()?;
    Ok(RunReport { clients, put, get })
}

fn summary_line(s: &Summary) -> String {
    format!(
        "{:.0} ops/s, p50 {} µs, p99 {} µs, p999 {} µs",
        s.ops_per_s, s.p50_us, s.p99_us, s.p999_us
    )
}

/// `total_ops` operations split over `clients` connections to `url`, all running at once.
async fn run_phase<T: KvTarget>(
    url: &str,
    clients: u32,
    total_ops: u64,
    op: Op,
    prefix: &str,
    values: &ValuePool,
) -> Result<Summary> {
    // Connect everyone first so connection setup is not part of the measured time.
    let mut connections = Vec::with_capacity(clients as usize);
    for _ in 0..clients {
        connections.push(T::connect(url).await?);
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (client, connection) in connections.into_iter().enumerate() {
        let ops = ops_for_client(total_ops, clients, client);
        let prefix = prefix.to_string();
        let values = values.clone();
        tasks.spawn(client_loop(connection, client, ops, op, prefix, values));
    }
    let mut merged = LatencyHistogram::new()?;
    // On the first failure, returning drops the JoinSet, which aborts the other clients.
    while let Some(joined) = tasks.join_next().await {
        let histogram = joined.context("a benchmark client task panicked")??;
        merged.merge(&histogram)?;
    }
    Ok(merged.summary(started.elapsed()))
}

/// Client `client`'s share of `total_ops`: an even split, the remainder to the first clients.
fn ops_for_client(total_ops: u64, clients: u32, client: usize) -> u64 {
    let clients = u64::from(clients);
    let extra = u64::from((client as u64) < total_ops % clients);
    total_ops / clients + extra
}

async fn client_loop<C: KvClient>(
    mut connection: C,
    client: usize,
    ops: u64,
    op: Op,
    prefix: String,
    values: ValuePool,
) -> Result<LatencyHistogram> {
    let mut histogram = LatencyHistogram::new()?;
    for i in 0..ops {
        let key = format!("{prefix}/{client}/{i}");
        let value = values.value(client, i);
        let request_key = Bytes::from(key.clone());
        let sent = Instant::now();
        match op {
            Op::Put => {
                timeout(REQUEST_TIMEOUT, connection.put(request_key, value))
                    .await
                    .with_context(|| format!("put {key}: no answer within {REQUEST_TIMEOUT:?}"))?
                    .with_context(|| format!("put {key}"))?;
                histogram.record(sent.elapsed());
            }
            Op::Get => {
                let read = timeout(REQUEST_TIMEOUT, connection.get(request_key))
                    .await
                    .with_context(|| format!("get {key}: no answer within {REQUEST_TIMEOUT:?}"))?
                    .with_context(|| format!("get {key}"))?;
                histogram.record(sent.elapsed());
                ensure!(
                    read.as_ref() == Some(&value),
                    "get {key} returned {} instead of the value the put phase wrote",
                    match read {
                        None => "nothing".to_string(),
                        Some(v) => format!("a different {}-byte value", v.len()),
                    }
                );
            }
        }
    }
    Ok(histogram)
}

/// Waits until every running member answers Status and all name the same leader, which is one
/// of them; returns the leader's index.
async fn wait_for_leader<T: KvTarget>(target: &T, cluster: &mut Cluster) -> Result<usize> {
    let deadline = Instant::now() + LEADER_DEADLINE;
    loop {
        cluster.check_running()?;
        match probe_leader::<T>(target.client_urls(), cluster).await {
            Ok(leader) => return Ok(leader),
            Err(err) if Instant::now() >= deadline => {
                return Err(err.context(format!(
                    "{}: members did not agree on a leader within {LEADER_DEADLINE:?}",
                    target.name()
                )));
            }
            Err(_) => tokio::time::sleep(LEADER_POLL_INTERVAL).await,
        }
    }
}

async fn probe_leader<T: KvTarget>(urls: &[String], cluster: &Cluster) -> Result<usize> {
    let mut statuses = Vec::with_capacity(urls.len());
    for (idx, url) in urls.iter().enumerate() {
        if !cluster.is_running(idx) {
            continue;
        }
        let status = timeout(STATUS_TIMEOUT, async {
            T::connect(url).await?.status().await
        })
        .await
        .with_context(|| format!("status of {url}: no answer within {STATUS_TIMEOUT:?}"))??;
        statuses.push((idx, status));
    }
    agreed_leader(&statuses)
}

/// The index of the member every status names as leader, if they agree and it is among them.
fn agreed_leader(statuses: &[(usize, MemberStatus)]) -> Result<usize> {
    let Some(&(_, first)) = statuses.first() else {
        bail!("no running members");
    };
    let leader_id = first.leader_id;
    ensure!(leader_id != 0, "a member knows of no leader");
    ensure!(
        statuses.iter().all(|(_, s)| s.leader_id == leader_id),
        "members disagree on the leader: {statuses:?}"
    );
    statuses
        .iter()
        .find(|(_, s)| s.member_id == leader_id)
        .map(|&(idx, _)| idx)
        .with_context(|| format!("leader {leader_id:#x} is not among the running members"))
}

/// One failover measurement: kill -9 of the leader to the first committed put, then heal.
async fn failover_round<T: KvTarget>(
    target: &T,
    cluster: &mut Cluster,
    workload: &Workload,
    round: u32,
) -> Result<Duration> {
    let name = target.name();
    let leader = wait_for_leader(target, cluster).await?;
    let mut survivors = Vec::new();
    for (idx, url) in target.client_urls().iter().enumerate() {
        if idx != leader {
            survivors.push(T::connect(url).await?);
        }
    }
    let victim = cluster.member_name(leader).to_string();
    progress(
        name,
        format!(
            "failover {round}/{}: kill -9 leader {victim}",
            workload.failover_rounds
        ),
    );
    let key = Bytes::from(format!("bench/failover/{round}"));
    let value = workload.values.value(0, u64::from(round));
    let killed_at = Instant::now();
    cluster.kill(leader)?;
    let (elapsed, failed) = first_committed_put(&survivors, key, value, killed_at)
        .await
        .with_context(|| format!("{name}: failover round {round} after killing {victim}"))?;
    progress(
        name,
        format!(
            "  first committed put {} ms after the kill ({failed} attempts failed); restarting {victim}",
            elapsed.as_millis()
        ),
    );
    cluster.restart(leader)?;
    wait_for_leader(target, cluster)
        .await
        .with_context(|| format!("{name}: healing after restarting {victim}"))?;
    Ok(elapsed)
}

/// Issues puts to the survivors, round-robin, a new one every FAILOVER_ATTEMPT_INTERVAL while
/// fewer than FAILOVER_MAX_IN_FLIGHT are pending, each abandoned after FAILOVER_ATTEMPT_TIMEOUT.
/// Returns the time from `since` to the first put that succeeds, and how many failed first.
async fn first_committed_put<C: KvClient>(
    survivors: &[C],
    key: Bytes,
    value: Bytes,
    since: Instant,
) -> Result<(Duration, u32)> {
    ensure!(!survivors.is_empty(), "no surviving members to write to");
    let give_up = tokio::time::sleep(FAILOVER_DEADLINE);
    tokio::pin!(give_up);
    let mut tick = tokio::time::interval(FAILOVER_ATTEMPT_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0usize;
    let mut failed = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick(), if in_flight.len() < FAILOVER_MAX_IN_FLIGHT => {
                let mut client = survivors[next % survivors.len()].clone();
                next += 1;
                let (key, value) = (key.clone(), value.clone());
                in_flight.push(async move {
                    timeout(FAILOVER_ATTEMPT_TIMEOUT, client.put(key, value)).await
                });
            }
            Some(outcome) = in_flight.next() => match outcome {
                Ok(Ok(())) => return Ok((since.elapsed(), failed)),
                Ok(Err(_)) | Err(_) => failed += 1,
            },
            () = &mut give_up => {
                bail!("no put committed within {FAILOVER_DEADLINE:?} ({failed} attempts failed)");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Debug, Serialize)]
struct MetaReport {
    bench: &'static str,
    unix_time_s: u64,
    config: ConfigReport,
    targets: Vec<TargetReport>,
    /// Present when both targets ran.
    comparison: Option<Comparison>,
}

#[derive(Debug, Serialize)]
struct ConfigReport {
    ops_per_phase: u64,
    clients: Vec<u32>,
    value_bytes: usize,
    warmup_ops_per_client: u64,
    failover_rounds: u32,
    failover_attempt_timeout_ms: u128,
    failover_attempt_interval_ms: u128,
}

#[derive(Debug, Serialize)]
struct TargetReport {
    name: &'static str,
    version: Option<String>,
    command_lines: Vec<String>,
    runs: Vec<RunReport>,
    failover_ms: Option<DurationStats>,
}

impl TargetReport {
    fn run_with(&self, clients: u32) -> Option<&RunReport> {
        self.runs.iter().find(|r| r.clients == clients)
    }
}

#[derive(Debug, Serialize)]
struct RunReport {
    clients: u32,
    put: Summary,
    get: Summary,
}

/// Every ratio is "continuum is better" when above 1: throughput is continuum ÷ etcd, latency
/// and failover time are etcd ÷ continuum.
#[derive(Debug, Serialize)]
struct Comparison {
    meaning: &'static str,
    runs: Vec<RunRatios>,
    failover_median_x: Option<f64>,
    goals: Vec<Goal>,
}

const RATIO_MEANING: &str =
    "x > 1 means continuum is better: throughput_x = continuum ops/s / etcd ops/s; \
     latency and failover _x = etcd / continuum";

#[derive(Debug, Serialize)]
struct RunRatios {
    clients: u32,
    put: OpRatios,
    get: OpRatios,
}

#[derive(Debug, Serialize)]
struct OpRatios {
    throughput_x: Option<f64>,
    p50_x: Option<f64>,
    p99_x: Option<f64>,
    p999_x: Option<f64>,
}

impl OpRatios {
    fn new(continuum: &Summary, etcd: &Summary) -> Self {
        let lat = |c: u64, e: u64| ratio(e as f64, c as f64);
        Self {
            throughput_x: ratio(continuum.ops_per_s, etcd.ops_per_s),
            p50_x: lat(continuum.p50_us, etcd.p50_us),
            p99_x: lat(continuum.p99_us, etcd.p99_us),
            p999_x: lat(continuum.p999_us, etcd.p999_us),
        }
    }
}

/// One of the performance targets and whether this run met it (informational).
#[derive(Debug, Serialize)]
struct Goal {
    goal: String,
    met: bool,
    continuum: f64,
    etcd: f64,
}

fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator)
}

impl MetaReport {
    fn new(workload: &Workload, targets: Vec<TargetReport>) -> Self {
        let unix_time_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let comparison = match (find(&targets, "continuum"), find(&targets, "etcd")) {
            (Some(c), Some(e)) => Some(Comparison::new(c, e)),
            _ => None,
        };
        Self {
            bench: "meta",
            unix_time_s,
            config: ConfigReport {
                ops_per_phase: workload.ops,
                clients: workload.clients.clone(),
                value_bytes: workload.value_bytes,
                warmup_ops_per_client: WARMUP_OPS_PER_CLIENT,
                failover_rounds: workload.failover_rounds,
                failover_attempt_timeout_ms: FAILOVER_ATTEMPT_TIMEOUT.as_millis(),
                failover_attempt_interval_ms: FAILOVER_ATTEMPT_INTERVAL.as_millis(),
            },
            targets,
            comparison,
        }
    }
}

fn find<'a>(targets: &'a [TargetReport], name: &str) -> Option<&'a TargetReport> {
    targets.iter().find(|t| t.name == name)
}

impl Comparison {
    fn new(continuum: &TargetReport, etcd: &TargetReport) -> Self {
        let runs: Vec<RunRatios> = continuum
            .runs
            .iter()
            .filter_map(|c| {
                let e = etcd.run_with(c.clients)?;
                Some(RunRatios {
                    clients: c.clients,
                    put: OpRatios::new(&c.put, &e.put),
                    get: OpRatios::new(&c.get, &e.get),
                })
            })
            .collect();
        let failover = continuum
            .failover_ms
            .as_ref()
            .zip(etcd.failover_ms.as_ref());
        let failover_median_x = failover.and_then(|(c, e)| ratio(e.median_ms, c.median_ms));

        let mut goals = Vec::new();
        if let (Some(c), Some(e)) = (
            continuum.run_with(GOAL_CLIENTS),
            etcd.run_with(GOAL_CLIENTS),
        ) {
            goals.push(Goal {
                goal: format!(
                    "put ops/s at {GOAL_CLIENTS} clients >= {GOAL_PUT_THROUGHPUT_X}x etcd's"
                ),
                met: c.put.ops_per_s >= GOAL_PUT_THROUGHPUT_X * e.put.ops_per_s,
                continuum: c.put.ops_per_s,
                etcd: e.put.ops_per_s,
            });
            goals.push(Goal {
                goal: format!("put p99 µs at {GOAL_CLIENTS} clients <= etcd's"),
                met: c.put.p99_us <= e.put.p99_us,
                continuum: c.put.p99_us as f64,
                etcd: e.put.p99_us as f64,
            });
        }
        if let Some((c, e)) = failover {
            goals.push(Goal {
                goal: "median failover ms <= etcd's".to_string(),
                met: c.median_ms <= e.median_ms,
                continuum: c.median_ms,
                etcd: e.median_ms,
            });
        }
        Self {
            meaning: RATIO_MEANING,
            runs,
            failover_median_x,
            goals,
        }
    }
}

fn render_report(report: &MetaReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let cfg = &report.config;
    // Writing to a String cannot fail, so the fmt::Results below are ignored.
    let _ = writeln!(
        out,
        "\nmeta: put / linearizable get, {}-byte values, {} ops per phase, 3 members per target",
        cfg.value_bytes, cfg.ops_per_phase
    );
    let _ = writeln!(
        out,
        "{:>7}  {:<3}  {:<10} {:>10} {:>9} {:>9} {:>9}",
        "clients", "op", "target", "ops/s", "p50 µs", "p99 µs", "p999 µs"
    );
    for &clients in &cfg.clients {
        for op in [Op::Put, Op::Get] {
            for target in &report.targets {
                let Some(run) = target.run_with(clients) else {
                    continue;
                };
                let s = match op {
                    Op::Put => &run.put,
                    Op::Get => &run.get,
                };
                let _ = writeln!(
                    out,
                    "{clients:>7}  {op:<3}  {:<10} {:>10.0} {:>9} {:>9} {:>9}",
                    target.name, s.ops_per_s, s.p50_us, s.p99_us, s.p999_us
                );
            }
            let ratios = report
                .comparison
                .as_ref()
                .and_then(|c| c.runs.iter().find(|r| r.clients == clients));
            if let Some(r) = ratios {
                let r = match op {
                    Op::Put => &r.put,
                    Op::Get => &r.get,
                };
                let _ = writeln!(
                    out,
                    "{clients:>7}  {op:<3}  {:<10} {:>10} {:>9} {:>9} {:>9}",
                    "ratio",
                    fmt_x(r.throughput_x),
                    fmt_x(r.p50_x),
                    fmt_x(r.p99_x),
                    fmt_x(r.p999_x)
                );
            }
        }
    }
    if report.comparison.is_some() {
        let _ = writeln!(
            out,
            "ratio: ops/s continuum÷etcd, latencies etcd÷continuum; above 1x = continuum better"
        );
    }

    if report.targets.iter().any(|t| t.failover_ms.is_some()) {
        let _ = writeln!(
            out,
            "\nfailover: kill -9 of the leader -> first committed put, ms over {} rounds",
            cfg.failover_rounds
        );
        let _ = writeln!(
            out,
            "{:<10} {:>9} {:>9} {:>9}",
            "target", "min", "median", "max"
        );
        for target in &report.targets {
            if let Some(f) = &target.failover_ms {
                let _ = writeln!(
                    out,
                    "{:<10} {:>9.0} {:>9.0} {:>9.0}",
                    target.name, f.min_ms, f.median_ms, f.max_ms
                );
            }
        }
        if let Some(c) = &report.comparison {
            let _ = writeln!(
                out,
                "ratio (median etcd÷continuum; above 1x = continuum faster): {}",
                fmt_x(c.failover_median_x)
            );
        }
    }

    if let Some(c) = report.comparison.as_ref().filter(|c| !c.goals.is_empty()) {
        let _ = writeln!(out, "\ngoals (reported, not asserted):");
        for g in &c.goals {
            let mark = if g.met { "met   " } else { "MISSED" };
            let _ = writeln!(
                out,
                "  [{mark}] {}: continuum {:.0}, etcd {:.0}",
                g.goal, g.continuum, g.etcd
            );
        }
    }
    out
}

fn fmt_x(x: Option<f64>) -> String {
    match x {
        Some(x) => format!("{x:.2}x"),
        None => "n/a".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreed_leader_cases() {
        // (running members as (index, member_id, leader_id), expected leader index)
        type Case = (&'static [(usize, u64, u64)], Option<usize>);
        let cases: &[Case] = &[
            (&[(0, 1, 2), (1, 2, 2), (2, 3, 2)], Some(1)),
            // The killed member (index 0) is not probed; the other two agree.
            (&[(1, 2, 3), (2, 3, 3)], Some(2)),
            // Nobody knows a leader yet.
            (&[(0, 1, 0), (1, 2, 0)], None),
            // A restarted member still follows an old leader.
            (&[(0, 1, 2), (1, 2, 2), (2, 3, 3)], None),
            // Everyone names a leader that is not running.
            (&[(1, 2, 1), (2, 3, 1)], None),
            (&[], None),
        ];
        for (members, expected) in cases {
            let statuses: Vec<(usize, MemberStatus)> = members
                .iter()
                .map(|&(idx, member_id, leader_id)| {
                    let status = MemberStatus {
                        member_id,
                        leader_id,
                    };
                    (idx, status)
                })
                .collect();
            assert_eq!(
                agreed_leader(&statuses).ok(),
                *expected,
                "members {members:?}"
            );
        }
    }

    #[test]
    fn ops_split_evenly_with_remainder_first() {
        let shares: Vec<u64> = (0..16).map(|c| ops_for_client(5000, 16, c)).collect();
        assert_eq!(shares.iter().sum::<u64>(), 5000);
        assert_eq!(shares[0], 313);
        assert_eq!(shares[7], 313);
        assert_eq!(shares[8], 312);
        assert_eq!(ops_for_client(7, 1, 0), 7);
    }

    #[test]
    fn values_are_deterministic_sized_and_varied() {
        let pool = ValuePool::new(256);
        assert_eq!(pool.value(3, 7), pool.value(3, 7));
        assert_eq!(pool.value(3, 7).len(), 256);
        assert_ne!(pool.value(3, 7), pool.value(3, 8));
        assert_ne!(pool.value(3, 7), pool.value(4, 7));
        let big = ValuePool::new(VALUE_POOL_BYTES);
        assert_eq!(big.value(0, 0).len(), VALUE_POOL_BYTES);
    }

    fn summary(ops_per_s: f64, p99_us: u64) -> Summary {
        Summary {
            ops: 100,
            elapsed_s: 1.0,
            ops_per_s,
            mean_us: 0.0,
            p50_us: p99_us / 2,
            p99_us,
            p999_us: p99_us * 2,
            max_us: p99_us * 3,
        }
    }

    fn target(name: &'static str, put_ops: f64, put_p99: u64, failover: &[u64]) -> TargetReport {
        let samples: Vec<Duration> = failover
            .iter()
            .map(|&ms| Duration::from_millis(ms))
            .collect();
        TargetReport {
            name,
            version: None,
            command_lines: Vec::new(),
            runs: vec![RunReport {
                clients: GOAL_CLIENTS,
                put: summary(put_ops, put_p99),
                get: summary(put_ops * 2.0, put_p99),
            }],
            failover_ms: DurationStats::from_samples(&samples),
        }
    }

    #[test]
    fn comparison_ratios_are_above_one_when_continuum_is_better() {
        let c = target("continuum", 3000.0, 1000, &[500, 600, 700]);
        let e = target("etcd", 1000.0, 2000, &[1200, 1300, 1400]);
        let cmp = Comparison::new(&c, &e);
        assert_eq!(cmp.runs.len(), 1);
        assert_eq!(cmp.runs[0].put.throughput_x, Some(3.0));
        assert_eq!(cmp.runs[0].put.p99_x, Some(2.0));
        assert_eq!(cmp.failover_median_x, Some(1300.0 / 600.0));
        assert_eq!(cmp.goals.len(), 3);
        assert!(cmp.goals.iter().all(|g| g.met), "{:?}", cmp.goals);

        let slow = target("continuum", 1400.0, 2500, &[2000]);
        let cmp = Comparison::new(&slow, &e);
        assert!(cmp.goals.iter().all(|g| !g.met), "{:?}", cmp.goals);
    }

    #[test]
    fn ratio_of_zero_denominator_is_absent() {
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(fmt_x(None), "n/a");
        assert_eq!(fmt_x(Some(1.5)), "1.50x");
    }
}
