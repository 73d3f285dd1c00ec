//! Live mode: a cluster of real `continuum` processes, one network namespace per simulated
//! host, two sites joined by a WAN link; real NBD and meta workloads with checkers; a seeded
//! schedule of faults (see `docs/chaos.md`).
//!
//! The fault budget: at most `m` (2) block servers are impaired at once, where a server stays
//! impaired from the start of its fault until the gateway has healed it — the gateway sees no
//! stale or corrupt shard on it, the volume is verified, and two scrub passes that reached
//! every stripe finished after the fault ended. Faults that impair every block server at once
//! from the volume's point of view (the gateway's host cut off, crashed or paused; the WAN
//! link degraded) take the whole budget. At most one meta member is faulty at a time.

pub mod nbd;
pub mod net;
pub mod procs;
pub mod wan;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use continuum_meta_client::{ClientConfig, MetaClient};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::linear::{self, Verdict};
use procs::{Proc, Role};
use workload::{BlockShared, MetaShared, Region};

/// Every fault kind live mode injects.
pub const FAULT_KINDS: &[&str] = &[
    "kill",
    "pause",
    "partition",
    "one_way",
    "wan",
    "bit_flip",
    "disk_full",
    "gateway_crash",
];

const VOLUME: &str = "chaos";
const META_CLIENT_PORT: u16 = 7000;
const META_PEER_PORT: u16 = 7001;
const META_METRICS_PORT: u16 = 7002;
const BLOCK_PORT: u16 = 7100;
const BLOCK_METRICS_PORT: u16 = 7101;
const NBD_PORT: u16 = 10809;
const GATEWAY_METRICS_PORT: u16 = 7200;
/// Parity shards of the volume (4+2): the block fault budget.
const BUDGET: usize = 2;
const REGISTERS: usize = 6;
const CHECK_STEPS: u64 = 20_000_000;

/// A live run's parameters.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    pub seed: u64,
    /// How long faults are injected (the workloads run throughout, and on while healing).
    pub duration: Duration,
    /// Mean time between fault starts.
    pub fault_every: Duration,
    /// The `continuum` binary.
    pub exe: PathBuf,
    /// The `continuum-chaos` binary (runs the WAN delay line inside the router namespace).
    pub chaos_exe: PathBuf,
    /// Data, logs and the report go here (removed first).
    pub run_dir: PathBuf,
    /// Where to write the JSON report (default `<run_dir>/report.json`).
    pub report: Option<PathBuf>,
    pub disabled: BTreeSet<String>,
    pub block_servers: usize,
    pub block_workers: usize,
    pub meta_workers: usize,
    /// How long full redundancy may take to return after the faults stop.
    pub heal_timeout: Duration,
    /// Loss of every `wan` fault in percent (100: a cut); `None`: a seeded mix of delay with
    /// jitter (reordering), loss, both, and cuts.
    pub wan_loss: Option<u32>,
    /// Run a gateway broken on purpose (it acknowledges writes before they are durable):
    /// the negative test, which must fail.
    pub broken_gateway: bool,
}

impl LiveConfig {
    pub fn new(seed: u64, exe: PathBuf) -> Self {
        Self {
            seed,
            duration: Duration::from_secs(120),
            fault_every: Duration::from_secs(5),
            chaos_exe: exe.with_file_name("continuum-chaos"),
            exe,
            run_dir: PathBuf::from(format!("/tmp/continuum-chaos-live-{seed}")),
            report: None,
            disabled: BTreeSet::new(),
            block_servers: 8,
            block_workers: 4,
            meta_workers: 2,
            heal_timeout: Duration::from_secs(180),
            broken_gateway: false,
            wan_loss: None,
        }
    }
}

/// One injected fault, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FaultRecord {
    pub at_ms: u64,
    pub kind: String,
    pub target: String,
    pub hold_ms: u64,
    pub detail: String,
}

/// What a live run found.
#[derive(Debug, Default, serde::Serialize)]
pub struct LiveReport {
    pub seed: u64,
    pub ok: bool,
    pub failures: Vec<String>,
    pub fault_seconds: f64,
    pub wall_seconds: f64,
    pub heal_ms: Option<u64>,
    pub faults_by_kind: BTreeMap<String, u64>,
    pub faults: Vec<FaultRecord>,
    pub block_writes: u64,
    pub block_writes_acked: u64,
    pub block_writes_durable: u64,
    pub block_write_errors: u64,
    pub block_reads: u64,
    pub block_read_errors: u64,
    pub block_reads_checked: u64,
    pub block_flushes: u64,
    pub block_connections: u64,
    pub floating_reads: u64,
    pub final_sweep_blocks: u64,
    pub acked_writes_lost: u64,
    pub block_violations: Vec<String>,
    pub meta_ops: u64,
    pub meta_unknown: u64,
    pub meta_verdict: String,
    pub unexpected_exits: Vec<String>,
    pub run_dir: String,
}

impl LiveReport {
    pub fn print(&self) {
        println!("live run, seed {}:", self.seed);
        println!(
            "  {:.0} s of faults, {:.0} s in all; healed in {}",
            self.fault_seconds,
            self.wall_seconds,
            self.heal_ms
                .map_or("(did not heal)".to_string(), |ms| format!("{ms} ms"))
        );
        let kinds: Vec<String> = self
            .faults_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!(
            "  faults: {} injected ({})",
            self.faults.len(),
            kinds.join(", ")
        );
        println!(
            "  blocks: {} writes ({} acked, {} durable, {} failed), {} reads ({} failed), {} blocks checked, {} flushes, {} connections; final sweep {} blocks",
            self.block_writes,
            self.block_writes_acked,
            self.block_writes_durable,
            self.block_write_errors,
            self.block_reads,
            self.block_read_errors,
            self.block_reads_checked,
            self.block_flushes,
            self.block_connections,
            self.final_sweep_blocks,
        );
        println!(
            "  meta: {} register operations ({} unknown outcomes): {}",
            self.meta_ops, self.meta_unknown, self.meta_verdict
        );
        println!(
            "  acked writes lost: {}; block violations: {}; unexpected exits: {}",
            self.acked_writes_lost,
            self.block_violations.len(),
            self.unexpected_exits.len()
        );
        for v in self.block_violations.iter().take(10) {
            println!("    {v}");
        }
        for e in &self.unexpected_exits {
            println!("    {e}");
        }
        if self.ok {
            println!("PASSED (data and logs under {})", self.run_dir);
        } else {
            for f in &self.failures {
                println!("FAILED: {f}");
            }
            println!(
                "replay: continuum-chaos live --seed {} --duration {:.0}s (logs under {})",
                self.seed, self.fault_seconds, self.run_dir
            );
        }
    }
}

/// What an active fault changed, to undo at its end.
#[derive(Debug)]
enum Undo {
    Restart(usize),
    Resume(usize),
    Heal(usize),
    Wan,
    FreeDisk(PathBuf),
    Nothing,
}

struct Active {
    ends: Instant,
    undo: Undo,
    /// Budget slots it holds (released by healing, not by its end).
    slots: Vec<Slot>,
    meta: bool,
}

/// A unit of the block fault budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Block(u64),
    /// Every block server at once (gateway faults, the WAN link).
    All,
}

impl Slot {
    fn cost(&self) -> usize {
        match self {
            Slot::Block(_) => 1,
            Slot::All => BUDGET,
        }
    }
}

/// A slot waiting to be released: since when its fault ended, and the gateway's scrub count
/// then.
struct Impaired {
    ended: Option<(u64, u64)>,
}

/// The gateway's view of the volume, scraped from its metrics.
#[derive(Debug, Default, Clone)]
struct GatewayView {
    up: bool,
    unverified: bool,
    attached: bool,
    degraded: BTreeMap<u64, u64>,
    scrubs: u64,
}

async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let go = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(2), go)
        .await
        .context("metrics scrape timed out")?
}

fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let end = line[start..].find('"')? + start;
    Some(&line[start..end])
}

async fn gateway_view(addr: &str) -> GatewayView {
    let Ok(text) = http_get(addr, "/metrics").await else {
        return GatewayView::default();
    };
    let mut v = GatewayView {
        up: true,
        ..Default::default()
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0);
        if line.starts_with("continuum_gateway_scrubs_total") {
            v.scrubs = value;
        } else if line.starts_with("continuum_gateway_volume_unverified")
            && label(line, "volume") == Some(VOLUME)
        {
            v.attached = true;
            v.unverified = value != 0;
        } else if line.starts_with("continuum_gateway_volume_degraded_shards")
            && label(line, "volume") == Some(VOLUME)
        {
            if let Some(s) = label(line, "server").and_then(|s| s.parse().ok()) {
                v.degraded.insert(s, value);
            }
        }
    }
    v
}

/// Flips `bits` random bits inside the allocated parts of `file`; returns the offsets.
fn flip_bits(file: &Path, bits: usize, rng: &mut StdRng) -> Result<Vec<u64>> {
    use rustix::fs::{seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    let len = f.metadata()?.len();
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Ok(data) = seek(&f, SeekFrom::Data(pos)) else {
            break; // ENXIO: no data after pos
        };
        let hole = seek(&f, SeekFrom::Hole(data)).unwrap_or(len);
        extents.push((data, hole));
        pos = hole;
    }
    let total: u64 = extents.iter().map(|(a, b)| b - a).sum();
    if total == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for _ in 0..bits {
        let mut at = rng.gen_range(0..total);
        let off = extents
            .iter()
            .find_map(|(a, b)| {
                if at < b - a {
                    Some(a + at)
                } else {
                    at -= b - a;
                    None
                }
            })
            .expect("offset inside an extent");
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, off)?;
        byte[0] ^= 1 << rng.gen_range(0..8);
        f.write_all_at(&byte, off)?;
        out.push(off);
    }
    Ok(out)
}

/// Fills the filesystem holding `dir` (a file `chaos-fill` takes every free byte).
fn fill_disk(dir: &Path) -> Result<PathBuf> {
    use rustix::fs::{fallocate, statvfs, FallocateFlags};
    let path = dir.join("chaos-fill");
    let f = std::fs::File::create(&path)?;
    let st = statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let free = st.f_bavail * st.f_frsize;
    // Allocate in pieces: the last piece fails with ENOSPC, which is the point.
    let chunk = 4u64 << 20;
    let mut off = 0u64;
    while off < free + chunk && fallocate(&f, FallocateFlags::empty(), off, chunk).is_ok() {
        off += chunk;
    }
    // The tail smaller than a piece.
    let mut piece = chunk / 2;
    while piece >= 4096 {
        if fallocate(&f, FallocateFlags::empty(), off, piece).is_ok() {
            off += piece;
        } else {
            piece /= 2;
        }
    }
    Ok(path)
}

struct Cluster {
    cfg: LiveConfig,
    hosts: Vec<net::Host>,
    procs: Vec<Proc>,
    meta_endpoints: Vec<String>,
    gateway: usize,
    gateway_metrics: String,
    nbd_addr: String,
    mounts: Vec<PathBuf>,
    wan: WanRelay,
}

/// The WAN delay line's process (inside the router namespace) and its control pipe.
struct WanRelay {
    child: std::process::Child,
    control: std::process::ChildStdin,
}

impl WanRelay {
    fn start(cfg: &LiveConfig) -> Result<Self> {
        let log = std::fs::File::create(cfg.run_dir.join("logs").join("wan-relay.log"))?;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", net::ROUTER])
            .arg(&cfg.chaos_exe)
            .args(["wan-relay", "--dev", net::WAN_DEV, "--seed"])
            .arg(cfg.seed.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the WAN relay ({})", cfg.chaos_exe.display()))?;
        let control = child.stdin.take().context("relay stdin")?;
        net::route_wan()?;
        Ok(Self { child, control })
    }

    fn set(&mut self, link: wan::Link) -> Result<()> {
        use std::io::Write;
        self.control
            .write_all(link.line().as_bytes())
            .context("the WAN relay went away")?;
        self.control.flush()?;
        Ok(())
    }
}

impl Cluster {
    fn block_dir(&self, p: usize) -> PathBuf {
        self.cfg.run_dir.join(&self.procs[p].name)
    }

    fn blocks(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.procs.len()).filter(|p| self.procs[*p].role == Role::Block)
    }

    fn metas(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.procs.len()).filter(|p| self.procs[*p].role == Role::Meta)
    }

    fn teardown(&mut self) {
        for p in &mut self.procs {
            p.stop(Duration::from_secs(5));
        }
        for m in &self.mounts {
            let _ = net::run("umount", &["-l", &m.display().to_string()]);
        }
        let _ = self.wan.child.kill();
        let _ = self.wan.child.wait();
        net::cleanup();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Builds the namespaces and starts 3 meta members, the block servers and a gateway.
async fn build(cfg: &LiveConfig) -> Result<Cluster> {
    let _ = std::fs::remove_dir_all(&cfg.run_dir);
    let logs = cfg.run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    // Hosts: site 0 ("cloud") has two meta members, half the block servers and the gateway;
    // site 1 ("edge") the rest.
    let mut layout: Vec<(String, Role, u64, usize)> = vec![
        ("meta-1".into(), Role::Meta, 1, 0),
        ("meta-2".into(), Role::Meta, 2, 0),
        ("meta-3".into(), Role::Meta, 3, 1),
    ];
    let half = cfg.block_servers.div_ceil(2);
    for i in 1..=cfg.block_servers {
        layout.push((
            format!("block-{i}"),
            Role::Block,
            i as u64,
            usize::from(i > half),
        ));
    }
    layout.push(("gateway".into(), Role::Gateway, 0, 0));
    let hostspec: Vec<(String, usize)> = layout.iter().map(|l| (l.0.clone(), l.3)).collect();
    let hosts = net::build(2, &hostspec).context("building the network namespaces")?;
    let ip = |name: &str| {
        hosts
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.ip)
            .expect("host exists")
    };
    let meta_endpoints: Vec<String> = (1..=3)
        .map(|i| format!("{}:{META_CLIENT_PORT}", ip(&format!("meta-{i}"))))
        .collect();
    let initial: Vec<String> = (1..=3)
        .map(|i| {
            let a = ip(&format!("meta-{i}"));
            format!("{i}={a}:{META_PEER_PORT}/{a}:{META_CLIENT_PORT}")
        })
        .collect();
    let sites = ["cloud", "edge"];
    let mut procs = Vec::new();
    let mut mounts = Vec::new();
    for (h, (name, role, id, site)) in layout.iter().enumerate() {
        let a = ip(name);
        let dir = cfg.run_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let args: Vec<String> = match role {
            Role::Meta => vec![
                "meta".into(),
                format!("--id={id}"),
                format!("--data-dir={}", dir.display()),
                format!("--listen-client={a}:{META_CLIENT_PORT}"),
                format!("--listen-peer={a}:{META_PEER_PORT}"),
                format!("--metrics-addr={a}:{META_METRICS_PORT}"),
                format!("--initial-cluster={}", initial.join(",")),
            ],
            Role::Block => {
                // Each block server's data lives on its own small tmpfs, which a disk-full
                // fault fills.
                net::run(
                    "mount",
                    &[
                        "-t",
                        "tmpfs",
                        "-o",
                        "size=320m",
                        "tmpfs",
                        &dir.display().to_string(),
                    ],
                )?;
                mounts.push(dir.clone());
                vec![
                    "block".into(),
                    format!("--id={id}"),
                    format!("--data-dir={}", dir.display()),
                    format!("--listen={a}:{BLOCK_PORT}"),
                    format!("--metrics-addr={a}:{BLOCK_METRICS_PORT}"),
                    format!("--meta={}", meta_endpoints.join(",")),
                    "--capacity=256M".into(),
                    format!("--site={}", sites[*site]),
                    format!("--rack=rack-{name}"),
                    format!("--host={name}"),
                    "--down-grace-seconds=30".into(),
                ]
            }
            Role::Gateway => {
                let mut a = vec![
                    "gateway".into(),
                    "--id=chaos".into(),
                    format!("--meta={}", meta_endpoints.join(",")),
                    format!("--listen={a}:{NBD_PORT}"),
                    format!("--metrics-addr={a}:{GATEWAY_METRICS_PORT}"),
                    "--scrub-interval-seconds=5".into(),
                    "--scrub-rate=0".into(),
                    "--shard-timeout-ms=2000".into(),
                    "--request-timeout-seconds=20".into(),
                ];
                if cfg.broken_gateway {
                    a.push("--failpoint-ack-before-durable".into());
                }
                a
            }
        };
        procs.push(Proc::new(name, *role, h, *id, &hosts[h].ns, args, &logs));
    }
    let gateway = procs.len() - 1;
    let gw_ip = hosts[gateway].ip;
    let wan = WanRelay::start(cfg)?;
    let mut c = Cluster {
        cfg: cfg.clone(),
        hosts,
        procs,
        meta_endpoints,
        gateway,
        gateway_metrics: format!("{gw_ip}:{GATEWAY_METRICS_PORT}"),
        nbd_addr: format!("{gw_ip}:{NBD_PORT}"),
        mounts,
        wan,
    };
    let exe = cfg.exe.clone();
    for p in c.metas().collect::<Vec<_>>() {
        c.procs[p].start(&exe)?;
    }
    let client = MetaClient::connect(&c.meta_endpoints)?;
    wait_for("a meta leader", Duration::from_secs(60), || async {
        client
            .status()
            .await
            .ok()
            .filter(|s| s.leader_id != 0)
            .is_some()
    })
    .await?;
    for p in c.blocks().collect::<Vec<_>>() {
        c.procs[p].start(&exe)?;
    }
    let n = cfg.block_servers;
    wait_for(
        "every block server's heartbeat",
        Duration::from_secs(60),
        || async {
            continuum_blockstore::cluster::alive_nodes(&client)
                .await
                .is_ok_and(|a| a.len() >= n)
        },
    )
    .await?;
    if client
        .record::<continuum_proto::records_pb::Volume>(VOLUME)
        .await?
        .is_none()
    {
        continuum_blockstore::cluster::create_volume(
            &client,
            VOLUME,
            256 << 20,
            continuum_blockstore::ec::Profile::DEFAULT,
            continuum_blockstore::cluster::DEFAULT_UNIT_BYTES,
        )
        .await
        .context("creating the volume")?;
    }
    c.procs[gateway].start(&exe)?;
    let nbd = c.nbd_addr.clone();
    wait_for("the gateway", Duration::from_secs(60), || async {
        tokio::net::TcpStream::connect(&nbd).await.is_ok()
    })
    .await?;
    Ok(c)
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

/// The fault scheduler's state.
struct Faults {
    rng: StdRng,
    start: Instant,
    active: Vec<Active>,
    impaired: BTreeMap<Slot, Impaired>,
    /// The gateway's incarnation (its scrub counter restarts with it).
    gateway_starts: u32,
    meta_busy_until: Option<Instant>,
    records: Vec<FaultRecord>,
}

impl Faults {
    fn used(&self) -> usize {
        self.impaired.keys().map(Slot::cost).sum()
    }

    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn record(&mut self, kind: &str, target: &str, hold: Duration, detail: String) {
        let r = FaultRecord {
            at_ms: self.ms(),
            kind: kind.to_string(),
            target: target.to_string(),
            hold_ms: hold.as_millis() as u64,
            detail,
        };
        println!(
            "  {:>7} ms  {} {} (hold {} ms){}",
            r.at_ms,
            r.kind,
            r.target,
            r.hold_ms,
            if r.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", r.detail)
            }
        );
        self.records.push(r);
    }
}

/// Scrub count meaning "two full passes after now": the counter restarts with the gateway.
fn scrub_mark(view: &GatewayView, gateway_starts: u32) -> (u64, u64) {
    (u64::from(gateway_starts), view.scrubs)
}

fn healed_since(mark: (u64, u64), view: &GatewayView, gateway_starts: u32) -> bool {
    let needed = if mark.0 == u64::from(gateway_starts) {
        mark.1 + 2
    } else {
        2
    };
    view.up && view.attached && !view.unverified && view.scrubs >= needed
}

/// Picks and applies one fault; `false` if none fits the budget now.
async fn inject(
    c: &mut Cluster,
    f: &mut Faults,
    meta: &MetaClient,
    blocks: &BlockShared,
) -> Result<bool> {
    let mut kinds: Vec<&str> = FAULT_KINDS
        .iter()
        .copied()
        .filter(|k| !c.cfg.disabled.contains(*k))
        .collect();
    kinds.shuffle(&mut f.rng);
    // The faults that need the whole budget rarely find it free while block faults come and
    // go: when it is free, they go first half of the time.
    if f.used() == 0 && f.rng.gen_bool(0.5) {
        kinds.sort_by_key(|k| !matches!(*k, "gateway_crash" | "wan"));
    }
    let meta_free =
        f.meta_busy_until.is_none_or(|t| Instant::now() >= t) && !f.active.iter().any(|a| a.meta);
    let hold = Duration::from_millis(f.rng.gen_range(2000..8000));
    let free = BUDGET - f.used();
    // Candidate targets for process / host faults.
    let mut targets: Vec<usize> = Vec::new();
    let busy: BTreeSet<usize> = f
        .active
        .iter()
        .filter_map(|a| match a.undo {
            Undo::Restart(p) | Undo::Resume(p) | Undo::Heal(p) => Some(p),
            _ => None,
        })
        .collect();
    let block_ok =
        |p: usize, f: &Faults| free >= 1 && !f.impaired.contains_key(&Slot::Block(c.procs[p].id));
    for p in 0..c.procs.len() {
        if busy.contains(&p) {
            continue;
        }
        let ok = match c.procs[p].role {
            Role::Meta => meta_free,
            Role::Block => block_ok(p, f),
            Role::Gateway => free >= BUDGET,
        };
        if ok {
            targets.push(p);
        }
    }
    for kind in kinds {
        let slots_of = |p: usize| match c.procs[p].role {
            Role::Block => vec![Slot::Block(c.procs[p].id)],
            Role::Gateway => vec![Slot::All],
            Role::Meta => vec![],
        };
        match kind {
            "kill" | "pause" | "partition" | "one_way" => {
                let pool: Vec<usize> = targets
                    .iter()
                    .copied()
                    .filter(|p| kind != "kill" || c.procs[*p].role != Role::Gateway)
                    .collect();
                let Some(&p) = (if f.rng.gen_bool(0.3) && meta_free {
                    // The leader is a favourite target.
                    let leader = meta.status().await.map(|s| s.leader_id).unwrap_or(0);
                    pool.iter()
                        .find(|p| c.procs[**p].role == Role::Meta && c.procs[**p].id == leader)
                        .or_else(|| pool.choose(&mut f.rng))
                } else {
                    pool.choose(&mut f.rng)
                }) else {
                    continue;
                };
                let name = c.procs[p].name.clone();
                let role = c.procs[p].role;
                let slots = slots_of(p);
                let undo = match kind {
                    "kill" => {
                        c.procs[p].kill();
                        f.record(kind, &name, hold, "kill -9".into());
                        Undo::Restart(p)
                    }
                    "pause" => {
                        c.procs[p].pause();
                        f.record(kind, &name, hold, "SIGSTOP".into());
                        Undo::Resume(p)
                    }
                    _ => {
                        let host = &c.hosts[c.procs[p].host];
                        let peers: Vec<Ipv4Addr> = c
                            .hosts
                            .iter()
                            .filter(|h| h.ip != host.ip)
                            .map(|h| h.ip)
                            .collect();
                        let (out, inb, detail) = if kind == "partition" {
                            (true, true, "cut off from every host".to_string())
                        } else if f.rng.gen_bool(0.5) {
                            (true, false, "drops what it sends".to_string())
                        } else {
                            (false, true, "drops what it receives".to_string())
                        };
                        net::partition(host, &peers, out, inb)?;
                        f.record(kind, &name, hold, detail);
                        Undo::Heal(p)
                    }
                };
                for s in &slots {
                    f.impaired.insert(*s, Impaired { ended: None });
                }
                f.active.push(Active {
                    ends: Instant::now() + hold,
                    undo,
                    slots,
                    meta: role == Role::Meta,
                });
                return Ok(true);
            }
            "gateway_crash" => {
                if free < BUDGET || busy.contains(&c.gateway) {
                    continue;
                }
                let g = c.gateway;
                // Bumped first: a write that breaks from here on was held by a dying process.
                blocks.gateway_generation.fetch_add(1, Ordering::AcqRel);
                c.procs[g].kill();
                f.gateway_starts += 1;
                let restart = Duration::from_millis(f.rng.gen_range(200..3000));
                f.record(
                    kind,
                    "gateway",
                    restart,
                    "kill -9 during the write workload".into(),
                );
                f.impaired.insert(Slot::All, Impaired { ended: None });
                f.active.push(Active {
                    ends: Instant::now() + restart,
                    undo: Undo::Restart(g),
                    slots: vec![Slot::All],
                    meta: false,
                });
                return Ok(true);
            }
            "wan" => {
                if free < BUDGET || f.active.iter().any(|a| matches!(a.undo, Undo::Wan)) {
                    continue;
                }
                let link = match c.cfg.wan_loss {
                    Some(l) => wan::Link {
                        loss_pct: l,
                        ..Default::default()
                    },
                    None => *[
                        wan::Link {
                            delay_ms: 40,
                            jitter_ms: 40,
                            loss_pct: 0,
                        },
                        wan::Link {
                            delay_ms: 150,
                            jitter_ms: 50,
                            loss_pct: 2,
                        },
                        wan::Link {
                            delay_ms: 0,
                            jitter_ms: 0,
                            loss_pct: 10,
                        },
                        wan::Link {
                            delay_ms: 0,
                            jitter_ms: 0,
                            loss_pct: 30,
                        },
                        wan::Link {
                            delay_ms: 0,
                            jitter_ms: 0,
                            loss_pct: 100,
                        },
                    ]
                    .choose(&mut f.rng)
                    .expect("non-empty"),
                };
                c.wan.set(link)?;
                let detail = link.describe();
                f.record(kind, "cloud<->edge", hold, detail);
                f.impaired.insert(Slot::All, Impaired { ended: None });
                f.active.push(Active {
                    ends: Instant::now() + hold,
                    undo: Undo::Wan,
                    slots: vec![Slot::All],
                    meta: false,
                });
                return Ok(true);
            }
            "bit_flip" | "disk_full" => {
                let pool: Vec<usize> = targets
                    .iter()
                    .copied()
                    .filter(|p| c.procs[*p].role == Role::Block)
                    .collect();
                let Some(&p) = pool.choose(&mut f.rng) else {
                    continue;
                };
                let name = c.procs[p].name.clone();
                let dir = c.block_dir(p);
                let slot = Slot::Block(c.procs[p].id);
                if kind == "bit_flip" {
                    let bits = f.rng.gen_range(1..=8);
                    let offs = flip_bits(&dir.join("data"), bits, &mut f.rng)?;
                    f.record(
                        kind,
                        &name,
                        Duration::ZERO,
                        format!("{} bits at {offs:?}", offs.len()),
                    );
                    f.impaired.insert(slot, Impaired { ended: None });
                    f.active.push(Active {
                        ends: Instant::now(),
                        undo: Undo::Nothing,
                        slots: vec![slot],
                        meta: false,
                    });
                } else {
                    let fill = fill_disk(&dir)?;
                    f.record(kind, &name, hold, "tmpfs filled".into());
                    f.impaired.insert(slot, Impaired { ended: None });
                    f.active.push(Active {
                        ends: Instant::now() + hold,
                        undo: Undo::FreeDisk(fill),
                        slots: vec![slot],
                        meta: false,
                    });
                }
                return Ok(true);
            }
            _ => {}
        }
    }
    Ok(false)
}

/// Ends the faults that are due (all of them with `all`).
fn end_faults(c: &mut Cluster, f: &mut Faults, view: &GatewayView, all: bool) -> Result<()> {
    let now = Instant::now();
    let (due, keep): (Vec<Active>, Vec<Active>) =
        f.active.drain(..).partition(|a| all || a.ends <= now);
    f.active = keep;
    let exe = c.cfg.exe.clone();
    for a in due {
        match a.undo {
            Undo::Restart(p) => c.procs[p].start(&exe)?,
            Undo::Resume(p) => c.procs[p].resume(),
            Undo::Heal(p) => net::heal(&c.hosts[c.procs[p].host])?,
            Undo::Wan => c.wan.set(wan::Link::default())?,
            Undo::FreeDisk(path) => {
                let _ = std::fs::remove_file(path);
            }
            Undo::Nothing => {}
        }
        if a.meta {
            f.meta_busy_until = Some(Instant::now() + Duration::from_secs(3));
        }
        let mark = scrub_mark(view, f.gateway_starts);
        for s in a.slots {
            if let Some(i) = f.impaired.get_mut(&s) {
                i.ended = Some(mark);
            }
        }
    }
    Ok(())
}

/// Releases the budget slots the gateway has healed.
fn release(f: &mut Faults, view: &GatewayView) {
    let starts = f.gateway_starts;
    f.impaired.retain(|slot, i| {
        let Some(mark) = i.ended else { return true };
        let server_clean = match slot {
            Slot::Block(id) => !view.degraded.contains_key(id),
            Slot::All => view.degraded.is_empty(),
        };
        !(server_clean && healed_since(mark, view, starts))
    });
}

/// Runs one live campaign; the report says whether it passed.
pub async fn run(cfg: LiveConfig) -> Result<LiveReport> {
    let wall = Instant::now();
    let mut c = build(&cfg).await?;
    println!(
        "live cluster up: 3 meta members, {} block servers (2 sites), gateway at nbd://{}/{VOLUME}; logs in {}",
        cfg.block_servers,
        c.nbd_addr,
        cfg.run_dir.join("logs").display()
    );
    let mut report = LiveReport {
        seed: cfg.seed,
        run_dir: cfg.run_dir.display().to_string(),
        ..Default::default()
    };
    let blocks = Arc::new(BlockShared::default());
    let metas = Arc::new(MetaShared::default());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..cfg.block_workers {
        let region = Region {
            first_block: w as u64 * 2048,
            blocks: 160,
        };
        tasks.spawn(workload::block_worker(
            c.nbd_addr.clone(),
            VOLUME.into(),
            region,
            cfg.seed.wrapping_mul(1000).wrapping_add(w as u64),
            blocks.clone(),
        ));
    }
    for w in 0..cfg.meta_workers {
        tasks.spawn(workload::meta_worker(
            c.meta_endpoints.clone(),
            w as u64,
            REGISTERS,
            cfg.seed.wrapping_mul(1000).wrapping_add(500 + w as u64),
            start,
            metas.clone(),
        ));
    }
    let mut mcfg = ClientConfig::new(c.meta_endpoints.clone());
    mcfg.request_timeout = Duration::from_secs(1);
    mcfg.call_timeout = Duration::from_secs(2);
    let meta = MetaClient::new(mcfg)?;
    let mut f = Faults {
        rng: StdRng::seed_from_u64(cfg.seed),
        start,
        active: Vec::new(),
        impaired: BTreeMap::new(),
        gateway_starts: 0,
        meta_busy_until: None,
        records: Vec::new(),
    };
    let fault_end = start + cfg.duration;
    // A warm-up before the first fault: the workload attaches the volume.
    let mut next_fault = start + Duration::from_secs(3);
    let mut view = gateway_view(&c.gateway_metrics).await;
    let mut last_scrape = Instant::now();
    let check_exits = |c: &mut Cluster, report: &mut LiveReport, t: u64| -> Result<()> {
        for p in 0..c.procs.len() {
            if let Some(st) = c.procs[p].exited() {
                report.unexpected_exits.push(format!(
                    "{} exited on its own at {t} ms ({st}); see {}",
                    c.procs[p].name,
                    c.procs[p].log().display()
                ));
                let exe = c.cfg.exe.clone();
                c.procs[p].start(&exe)?;
            }
        }
        Ok(())
    };
    while Instant::now() < fault_end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        check_exits(&mut c, &mut report, f.ms())?;
        if last_scrape.elapsed() >= Duration::from_millis(500) {
            view = gateway_view(&c.gateway_metrics).await;
            last_scrape = Instant::now();
        }
        end_faults(&mut c, &mut f, &view, false)?;
        release(&mut f, &view);
        if Instant::now() >= next_fault {
            if inject(&mut c, &mut f, &meta, &blocks).await? {
                let gap = cfg.fault_every.as_millis() as u64;
                next_fault =
                    Instant::now() + Duration::from_millis(f.rng.gen_range(gap / 2..=gap * 3 / 2));
            } else {
                next_fault = Instant::now() + Duration::from_millis(500);
            }
        }
        if let Some(v) = blocks.first_violation.lock().expect("poisoned").clone() {
            report.failures.push(format!("block checker: {v}"));
            break;
        }
    }
    report.fault_seconds = start.elapsed().as_secs_f64();
    println!("faults stop at {} ms; healing", f.ms());
    view = gateway_view(&c.gateway_metrics).await;
    end_faults(&mut c, &mut f, &view, true)?;
    let heal_start = Instant::now();
    let mark = scrub_mark(&view, f.gateway_starts);
    let n = cfg.block_servers;
    let mut healed = None;
    while heal_start.elapsed() < cfg.heal_timeout {
        tokio::time::sleep(Duration::from_millis(500)).await;
        check_exits(&mut c, &mut report, f.ms())?;
        let v = gateway_view(&c.gateway_metrics).await;
        let alive = continuum_blockstore::cluster::alive_nodes(&meta)
            .await
            .is_ok_and(|a| a.len() >= n);
        if alive && v.degraded.is_empty() && healed_since(mark, &v, f.gateway_starts) {
            healed = Some(heal_start.elapsed().as_millis() as u64);
            break;
        }
        view = v;
    }
    report.heal_ms = healed;
    if healed.is_none() {
        report.failures.push(format!(
            "full redundancy did not return within {:?} after the faults stopped (gateway view: {view:?})",
            cfg.heal_timeout
        ));
    }
    blocks.stop.store(true, Ordering::Relaxed);
    metas.stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    match workload::sweep(&c.nbd_addr, VOLUME, &blocks).await {
        Ok(n) => report.final_sweep_blocks = n,
        Err(e) => report.failures.push(format!("final sweep: {e:#}")),
    }
    // Meta's history.
    let history = std::mem::take(&mut *metas.history.lock().expect("poisoned"));
    report.meta_ops = history.len() as u64;
    report.meta_unknown = metas.stats.unknown.load(Ordering::Relaxed);
    let verdict = tokio::task::spawn_blocking(move || linear::check(&history, CHECK_STEPS)).await?;
    report.meta_verdict = match &verdict {
        Verdict::Linearizable => "linearizable".into(),
        Verdict::Violation { key, ops } => {
            let s = format!(
                "NOT linearizable: key {} ({ops} operations)",
                String::from_utf8_lossy(key)
            );
            report.failures.push(format!("meta history {s}"));
            s
        }
        Verdict::Unknown { key } => {
            let s = format!(
                "no verdict: the search budget ran out on key {}",
                String::from_utf8_lossy(key)
            );
            report.failures.push(format!("meta history: {s}"));
            s
        }
    };
    {
        let ck = blocks.checker.lock().expect("poisoned");
        report.block_reads_checked = ck.reads_checked;
        report.block_writes_acked = ck.writes_acked;
        report.block_writes_durable = ck.writes_durable;
        report.floating_reads = ck.floating_reads;
        report.block_violations = ck.violations().iter().map(|v| v.to_string()).collect();
        report.acked_writes_lost = ck
            .violations()
            .iter()
            .filter(|v| v.what.contains("lost") || v.what.contains("zeros"))
            .count() as u64;
    }
    if !report.block_violations.is_empty()
        && !report
            .failures
            .iter()
            .any(|f| f.starts_with("block checker"))
    {
        report.failures.push(format!(
            "block checker: {} violations, first: {}",
            report.block_violations.len(),
            report.block_violations[0]
        ));
    }
    let s = &blocks.stats;
    report.block_writes = s.writes.load(Ordering::Relaxed);
    report.block_write_errors = s.write_errors.load(Ordering::Relaxed);
    report.block_reads = s.reads.load(Ordering::Relaxed);
    report.block_read_errors = s.read_errors.load(Ordering::Relaxed);
    report.block_flushes = s.flushes.load(Ordering::Relaxed);
    report.block_connections = s.connections.load(Ordering::Relaxed);
    if !report.unexpected_exits.is_empty() {
        report.failures.push(format!(
            "{} daemons exited on their own",
            report.unexpected_exits.len()
        ));
    }
    for r in &f.records {
        *report.faults_by_kind.entry(r.kind.clone()).or_default() += 1;
    }
    report.faults = std::mem::take(&mut f.records);
    report.ok = report.failures.is_empty();
    c.teardown();
    report.wall_seconds = wall.elapsed().as_secs_f64();
    let path = cfg
        .report
        .clone()
        .unwrap_or_else(|| cfg.run_dir.join("report.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}
