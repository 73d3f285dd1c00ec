//! `continuum gateway`: serves volumes as NBD exports (by volume name) through the volume
//! client.
//!
//! The first connection to a volume attaches it: the gateway takes the volume's writer lease
//! (bumping its epoch in meta), opens the volume (fencing every block server, reconciling what
//! a previous writer left), and learns which units hold data (for BLOCK_STATUS). Further
//! connections share that one open volume, so FLUSH and FUA on any connection cover writes
//! completed on every other (this is why the exports claim CAN_MULTI_CONN). A few seconds
//! after the last connection closes, the gateway flushes and lets the lease go.
//!
//! While attached, the gateway follows the cluster map in meta: servers joining or declared
//! down change placement, and a server declared down starts a repair of the volume (its
//! progress shows in `continuum status`). Meta is not on the data path: I/O goes on from the
//! map it has while meta is unreachable.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use continuum_blockstore::cluster::{self, ClusterError, GATEWAY_HOLDER_PREFIX};
use continuum_blockstore::volume::{ServerInfo, Volume, VolumeError};
use continuum_meta_client::MetaClient;
use continuum_nbd::handshake::{ExportEntry, ExportInfo, Refusal};
use continuum_nbd::server::{Catalog, Export, ExportError, ExportResult, ServerConfig};
use continuum_nbd::transmission::{extents_by_chunk, Extent};
use continuum_nbd::wire::{self, ErrorCode};
use continuum_proto::records_pb::{Volume as VolumeRecord, WriterLease};

/// TTL of a gateway's writer leases (kept alive every third of it).
const LEASE_TTL_SECONDS: u64 = 15;
/// How long an export stays attached after its last connection closes (tools such as
/// qemu-img open and close several connections in a row).
const LINGER: Duration = Duration::from_secs(3);
/// How often the cluster map is read from meta.
const MAP_REFRESH: Duration = Duration::from_secs(2);

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// This gateway's name (its writer leases are held as `gateway/<id>`).
    #[arg(long, default_value = "gw-1")]
    pub id: String,
    /// Client addresses of meta members, comma-separated.
    #[arg(
        long,
        env = "CONTINUUM_ENDPOINTS",
        default_value = "127.0.0.1:7311,127.0.0.1:7312,127.0.0.1:7313",
        value_delimiter = ','
    )]
    pub meta: Vec<String>,
    /// TCP address to serve NBD on (10809 is NBD's port). `none` to serve only --socket.
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR")]
    pub listen: String,
    /// Unix socket to serve NBD on as well (`nbd+unix:///NAME?socket=PATH`).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// TLS certificate chain (PEM) for STARTTLS; with --tls-key.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Refuse clients that do not start TLS.
    #[arg(long)]
    pub tls_required: bool,
    /// A request the volume has not answered by then fails with EIO (the client never waits
    /// forever).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub request_timeout_seconds: u64,
    /// Deadline of one shard request to a block server.
    #[arg(long, default_value_t = 3000, value_name = "MS")]
    pub shard_timeout_ms: u64,
    /// Most bytes per second a repair started by this gateway rebuilds (0 = unthrottled).
    #[arg(long, default_value = "0", value_parser = crate::block::parse_size, value_name = "SIZE")]
    pub repair_rate: u64,
    /// Scrub attached volumes every so many seconds (0 = never): verify every shard's
    /// checksums and the parity, repair what is wrong, at most --scrub-rate.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub scrub_interval_seconds: u64,
    /// Most bytes per second a background scrub reads.
    #[arg(long, default_value = "32M", value_parser = crate::block::parse_size, value_name = "SIZE")]
    pub scrub_rate: u64,
    /// Address for Prometheus metrics (`/metrics`) and `/health`. [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// A connection to a volume another gateway holds is accepted in standby instead of
    /// refused: its first request waits up to this long for the other gateway to let the
    /// writer lease go, then attaches (with a new epoch, fencing the other). This is how a
    /// live-migration target's QEMU opens its disks before the source lets go. 0 = refuse.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub standby_attach_seconds: u64,
    /// BROKEN ON PURPOSE, for the chaos harness's negative test only: acknowledge writes,
    /// FUA and FLUSH before the data reaches any block server (it is queued in memory and
    /// lost when the gateway dies).
    #[arg(long, hide = true)]
    pub failpoint_ack_before_durable: bool,
}

/// Counters exported at `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    attaches: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    zeroes: AtomicU64,
    errors: AtomicU64,
    attached: AtomicU64,
    repairs_done: AtomicU64,
    scrubs_done: AtomicU64,
}

impl Metrics {
    fn render(&self, id: &str) -> String {
        let mut s = String::new();
        for (name, help, v) in [
            (
                "continuum_gateway_attaches_total",
                "Volumes attached (writer lease taken).",
                &self.attaches,
            ),
            (
                "continuum_gateway_reads_total",
                "NBD reads served.",
                &self.reads,
            ),
            (
                "continuum_gateway_writes_total",
                "NBD writes served.",
                &self.writes,
            ),
            (
                "continuum_gateway_read_bytes_total",
                "Bytes read.",
                &self.bytes_read,
            ),
            (
                "continuum_gateway_written_bytes_total",
                "Bytes written.",
                &self.bytes_written,
            ),
            (
                "continuum_gateway_flushes_total",
                "NBD flushes.",
                &self.flushes,
            ),
            (
                "continuum_gateway_zeroes_total",
                "NBD trims and write-zeroes.",
                &self.zeroes,
            ),
            (
                "continuum_gateway_errors_total",
                "Requests that failed.",
                &self.errors,
            ),
            (
                "continuum_gateway_attached_volumes",
                "Volumes attached now.",
                &self.attached,
            ),
            (
                "continuum_gateway_repairs_total",
                "Repair passes that reached every stripe of an attached volume.",
                &self.repairs_done,
            ),
            (
                "continuum_gateway_scrubs_total",
                "Scrub passes that verified every stripe (checksums and parity) and repaired it.",
                &self.scrubs_done,
            ),
        ] {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{gateway=\"{id}\"}} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        s
    }

    /// Redundancy of the attached volumes as this gateway sees it: shard positions it knows
    /// are stale or corrupt, per block server, and whether a server failure still awaits a
    /// verification pass. (`try_lock`: a scrape never waits behind an attach.)
    fn render_volumes(inner: &GatewayInner, id: &str) -> String {
        let mut s = String::from(
            "# HELP continuum_gateway_volume_degraded_shards Stale or corrupt shard positions \
             this gateway knows of, per volume and block server.\n\
             # TYPE continuum_gateway_volume_degraded_shards gauge\n\
             # HELP continuum_gateway_volume_unverified 1 while a server failure has not been \
             followed by a verification pass.\n\
             # TYPE continuum_gateway_volume_unverified gauge\n",
        );
        let Ok(map) = inner.attached.try_lock() else {
            return s;
        };
        for (name, a) in map.iter() {
            s.push_str(&format!(
                "continuum_gateway_volume_unverified{{gateway=\"{id}\",volume=\"{name}\"}} {}\n",
                u8::from(a.vol.unverified())
            ));
            for (server, n) in a.vol.degraded() {
                s.push_str(&format!(
                    "continuum_gateway_volume_degraded_shards{{gateway=\"{id}\",volume=\"{name}\",server=\"{server}\"}} {n}\n"
                ));
            }
        }
        s
    }
}

/// One attached volume.
struct Attached {
    name: String,
    vol: Arc<Volume>,
    lease: WriterLease,
    /// Data units (`unit` bytes each) that may hold data; others read as zeros.
    allocated: Mutex<BTreeSet<u64>>,
    unit_bytes: u64,
    connections: AtomicUsize,
    /// Set when a newer writer fenced this one: the entry is dropped and the next connection
    /// attaches afresh.
    fenced: AtomicBool,
    closed: AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    /// `--failpoint-ack-before-durable`: writes acknowledged at once and applied from here.
    ack_early: Option<tokio::sync::mpsc::UnboundedSender<(u64, Bytes)>>,
}

impl Attached {
    fn info(&self) -> ExportInfo {
        continuum_nbd::mem::export_info(
            &self.name,
            &describe(&self.vol),
            self.vol.spec().size_bytes,
        )
    }

    fn units(&self, offset: u64, length: u64) -> std::ops::Range<u64> {
        offset / self.unit_bytes..(offset + length).div_ceil(self.unit_bytes)
    }

    /// Whole units inside the range.
    fn inner_units(&self, offset: u64, length: u64) -> std::ops::Range<u64> {
        offset.div_ceil(self.unit_bytes)..(offset + length) / self.unit_bytes
    }

    fn error(&self, e: VolumeError) -> ExportError {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        let code = match &e {
            VolumeError::OutOfRange { .. } | VolumeError::BadSize { .. } => ErrorCode::Inval,
            VolumeError::Fenced { .. } => {
                self.fenced.store(true, Ordering::Release);
                ErrorCode::Io
            }
            _ => ErrorCode::Io,
        };
        ExportError::new(code, format!("volume {}: {e}", self.name))
    }

    async fn close(self: Arc<Self>, meta: MetaClient) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // The lease (the first task) is kept alive while the flush finishes the writes
        // behind; the others stop first.
        for t in self.tasks.iter().skip(1) {
            t.abort();
        }
        if let Err(e) = self.vol.flush().await {
            tracing::warn!(volume = self.name, error = %e, "flush at detach failed");
        }
        for t in &self.tasks {
            t.abort();
        }
        let _ = meta.lease_revoke(self.lease.lease_id).await;
        self.metrics.attached.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(volume = self.name, epoch = self.lease.epoch, "detached");
    }
}

/// The export description clients see (NBD_INFO_DESCRIPTION, LIST).
fn description(data: impl std::fmt::Display, parity: impl std::fmt::Display) -> String {
    format!("Continuum volume, EC {data}+{parity}")
}

fn describe(vol: &Volume) -> String {
    let p = vol.spec().profile;
    description(p.data, p.parity)
}

/// What one connection holds: the attached volume, counted so the last one to go detaches —
/// or, in standby, the volume to attach at the first request.
pub struct Handle {
    attached: tokio::sync::OnceCell<Arc<Attached>>,
    /// Set for a standby connection: the volume and how long its first request may wait.
    standby: Option<(String, Duration)>,
    gateway: Weak<GatewayInner>,
}

impl Handle {
    /// The attached volume; a standby connection attaches now, waiting for the other gateway
    /// to let go.
    async fn attached(&self) -> ExportResult<&Arc<Attached>> {
        self.attached
            .get_or_try_init(|| async {
                let (name, wait) = self.standby.clone().expect("unattached only in standby");
                let gw = self.gateway.upgrade().ok_or_else(|| {
                    ExportError::new(ErrorCode::Shutdown, "the gateway is stopping")
                })?;
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    match gw.attach(&name).await {
                        Ok(a) => {
                            tracing::info!(volume = name, "standby connection attached");
                            return Ok(a);
                        }
                        Err(r)
                            if r.reply == wire::REP_ERR_POLICY
                                && tokio::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(r) => return Err(ExportError::new(ErrorCode::Io, r.message)),
                    }
                }
            })
            .await
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let Some(attached) = self.attached.get() else {
            return;
        };
        if attached.connections.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let (attached, gateway) = (attached.clone(), self.gateway.clone());
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            let Some(gw) = gateway.upgrade() else { return };
            gw.detach_if_idle(&attached).await;
        });
    }
}

impl Export for Handle {
    async fn read(&self, offset: u64, length: u32) -> ExportResult<Bytes> {
        let a = self.attached().await?;
        a.metrics.reads.fetch_add(1, Ordering::Relaxed);
        a.metrics
            .bytes_read
            .fetch_add(length as u64, Ordering::Relaxed);
        a.vol
            .read(offset, length as u64)
            .await
            .map_err(|e| a.error(e))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> ExportResult<()> {
        let a = self.attached().await?;
        a.metrics.writes.fetch_add(1, Ordering::Relaxed);
        a.metrics
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let units = a.units(offset, data.len() as u64);
        // Marked before the write: a concurrent BLOCK_STATUS may then say "data" for a range
        // that still reads as zeros, which is always allowed; never the other way round.
        a.allocated.lock().expect("poisoned").extend(units);
        if let Some(q) = &a.ack_early {
            let _ = q.send((offset, data));
            return Ok(());
        }
        a.vol.write(offset, data, fua).await.map_err(|e| a.error(e))
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    ) -> ExportResult<()> {
        let a = self.attached().await?;
        a.metrics.zeroes.fetch_add(1, Ordering::Relaxed);
        a.vol
            .write_zeroes(offset, length as u64, fua)
            .await
            .map_err(|e| a.error(e))?;
        // Zeroed units take no space on the block servers (zero blocks are not stored); with
        // NO_HOLE they are still reported as allocated, as the client asked.
        if !no_hole {
            let mut alloc = a.allocated.lock().expect("poisoned");
            for u in a.inner_units(offset, length as u64) {
                alloc.remove(&u);
            }
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> ExportResult<()> {
        // TRIM frees the space of whole 4 KiB blocks and reads back as zeros; the unaligned
        // edges (a hint may be rounded, says the spec) are left as they are.
        let b = 4096u64;
        let (start, end) = (offset.div_ceil(b) * b, (offset + length as u64) / b * b);
        if start >= end {
            return Ok(());
        }
        self.write_zeroes(start, (end - start) as u32, fua, false)
            .await
    }

    async fn flush(&self) -> ExportResult<()> {
        let a = self.attached().await?;
        a.metrics.flushes.fetch_add(1, Ordering::Relaxed);
        if a.ack_early.is_some() {
            return Ok(());
        }
        a.vol.flush().await.map_err(|e| a.error(e))
    }

    async fn cache(&self, _offset: u64, _length: u32) -> ExportResult<()> {
        // The gateway keeps no cache (that is what makes CAN_MULTI_CONN true); the hint has
        // nothing to warm.
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u32) -> ExportResult<Vec<Extent>> {
        let a = self.attached().await?;
        let alloc = a.allocated.lock().expect("poisoned");
        Ok(extents_by_chunk(offset, length, a.unit_bytes, |u| {
            alloc.contains(&u)
        }))
    }
}

pub struct GatewayInner {
    meta: MetaClient,
    holder: String,
    shard_timeout: Duration,
    care: Care,
    attached: tokio::sync::Mutex<HashMap<String, Arc<Attached>>>,
    metrics: Arc<Metrics>,
    me: Weak<GatewayInner>,
    ack_before_durable: bool,
    standby_attach: Duration,
}

/// The catalog NBD connections find exports in.
pub struct Gateway(Arc<GatewayInner>);

impl GatewayInner {
    async fn detach_if_idle(&self, a: &Arc<Attached>) {
        let mut map = self.attached.lock().await;
        if a.connections.load(Ordering::Acquire) != 0 {
            return;
        }
        if map.get(&a.name).is_some_and(|cur| Arc::ptr_eq(cur, a)) {
            map.remove(&a.name);
        }
        drop(map);
        a.clone().close(self.meta.clone()).await;
    }

    async fn attach(&self, name: &str) -> Result<Arc<Attached>, Refusal> {
        let mut map = self.attached.lock().await;
        if let Some(a) = map.get(name) {
            if !a.fenced.load(Ordering::Acquire) {
                a.connections.fetch_add(1, Ordering::AcqRel);
                return Ok(a.clone());
            }
            map.remove(name);
        }
        let a = self.open(name).await.map_err(|e| {
            tracing::warn!(volume = name, error = %e, "cannot attach");
            let reply = match e.downcast_ref::<ClusterError>() {
                Some(ClusterError::VolumeNotFound { .. }) => wire::REP_ERR_UNKNOWN,
                Some(ClusterError::Attached { .. }) => wire::REP_ERR_POLICY,
                _ => wire::REP_ERR_SHUTDOWN,
            };
            Refusal {
                reply,
                message: format!("{e:#}"),
            }
        })?;
        map.insert(name.to_string(), a.clone());
        Ok(a)
    }

    async fn open(&self, name: &str) -> anyhow::Result<Arc<Attached>> {
        let meta = &self.meta;
        let lease =
            cluster::acquire_attach_lease(meta, name, &self.holder, LEASE_TTL_SECONDS).await?;
        let keep = meta.spawn_keep_alive(lease.lease_id, LEASE_TTL_SECONDS);
        let opened = async {
            let Some(rec) = meta.record::<VolumeRecord>(name).await? else {
                bail!(ClusterError::VolumeNotFound { name: name.into() });
            };
            let spec = cluster::spec_of(&rec.record)?;
            let servers = cluster::cluster_map(meta).await?;
            let vol = Volume::open(spec, lease.epoch, &servers, self.shard_timeout).await?;
            let allocated = vol.allocated_units().await?;
            Ok((vol, servers, allocated))
        }
        .await;
        let (vol, servers, allocated) = match opened {
            Ok(x) => x,
            Err(e) => {
                keep.abort();
                let _ = meta.lease_revoke(lease.lease_id).await;
                return Err(e);
            }
        };
        let watcher = tokio::spawn(follow_map(
            meta.clone(),
            Arc::downgrade(&vol),
            name.to_string(),
            (self.holder.clone(), lease.lease_id),
            servers,
            self.care,
            self.metrics.clone(),
        ));
        self.metrics.attaches.fetch_add(1, Ordering::Relaxed);
        self.metrics.attached.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            volume = name,
            epoch = lease.epoch,
            units = allocated.len(),
            "attached"
        );
        // The lease keep-alive first (see `close`).
        let mut tasks = vec![keep, watcher];
        let ack_early = self.ack_before_durable.then(|| {
            tracing::warn!(
                volume = name,
                "FAILPOINT: writes are acknowledged before they are durable"
            );
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Bytes)>();
            let v = vol.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((offset, data)) = rx.recv().await {
                    let _ = v.write(offset, data, false).await;
                }
            }));
            tx
        });
        Ok(Arc::new(Attached {
            name: name.to_string(),
            unit_bytes: vol.spec().unit as u64,
            vol,
            lease,
            allocated: Mutex::new(allocated),
            connections: AtomicUsize::new(1),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            tasks,
            metrics: self.metrics.clone(),
            ack_early,
        }))
    }

    /// Detaches everything (at shutdown): flush, let the leases go.
    async fn detach_all(&self) {
        let all: Vec<Arc<Attached>> = self.attached.lock().await.drain().map(|(_, a)| a).collect();
        for a in all {
            a.close(self.meta.clone()).await;
        }
    }
}

/// How an attached volume is looked after (gateway flags).
#[derive(Clone, Copy, Debug)]
struct Care {
    repair_rate: u64,
    scrub_every: Option<Duration>,
    scrub_rate: u64,
}

/// Looks after a volume while it is attached: cluster-map changes go to the volume, a server
/// newly declared down starts a repair pass, and with `--scrub-interval-seconds` the volume is
/// scrubbed in the background (detached volumes are scrubbed by the block servers). Passes
/// publish their progress in meta; at most one runs at a time. Passes are tasks of this one, so
/// they stop when the volume is detached (a cut-short pass leaves only unstable versions,
/// which the next writer reconciles).
async fn follow_map(
    meta: MetaClient,
    vol: Weak<Volume>,
    name: String,
    (holder, lease): (String, u64),
    mut servers: Vec<ServerInfo>,
    care: Care,
    metrics: Arc<Metrics>,
) {
    let mut passes = tokio::task::JoinSet::new();
    let mut map_tick = tokio::time::interval(MAP_REFRESH);
    // Without scrubbing the tick is never polled; a year keeps `Instant` arithmetic in range.
    let year = Duration::from_secs(365 * 24 * 3600);
    let mut scrub_tick = tokio::time::interval(care.scrub_every.unwrap_or(year));
    map_tick.tick().await;
    scrub_tick.tick().await;
    loop {
        let pass = tokio::select! {
            _ = map_tick.tick() => {
                let Some(v) = vol.upgrade() else { return };
                let Ok(map) = cluster::cluster_map(&meta).await else {
                    continue; // meta unreachable: keep serving from the map we have
                };
                if map == servers {
                    continue;
                }
                let was_up: BTreeSet<u64> = servers.iter().filter(|s| s.up).map(|s| s.id).collect();
                let lost = map.iter().any(|s| !s.up && was_up.contains(&s.id));
                tracing::info!(volume = name, lost, "cluster map changed");
                v.set_servers(&map);
                servers = map;
                if !lost {
                    continue;
                }
                cluster::Pass::Repair
            }
            _ = scrub_tick.tick(), if care.scrub_every.is_some() => cluster::Pass::Scrub,
            Some(_) = passes.join_next(), if !passes.is_empty() => continue,
        };
        if !passes.is_empty() {
            continue; // one pass at a time; a loss during a scrub is caught by the next map change
        }
        let Some(v) = vol.upgrade() else { return };
        let (meta, name, holder) = (meta.clone(), name.clone(), holder.clone());
        let metrics = metrics.clone();
        passes.spawn(async move {
            let kind = match pass {
                cluster::Pass::Repair => "repair",
                cluster::Pass::Scrub => "scrub",
            };
            let reporter = cluster::report_progress(&meta, &v, &name, kind, &holder, lease);
            let r = match pass {
                cluster::Pass::Repair => v.repair_all(care.repair_rate).await,
                cluster::Pass::Scrub => v.scrub(care.scrub_rate).await,
            };
            reporter.abort();
            match r {
                Ok(r) => {
                    let done = match pass {
                        cluster::Pass::Repair => &metrics.repairs_done,
                        cluster::Pass::Scrub => &metrics.scrubs_done,
                    };
                    if r.deferred == 0 {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(volume = name, report = ?r, "{kind} done")
                }
                Err(e) => tracing::warn!(volume = name, error = %e, "{kind} failed"),
            }
        });
    }
}

impl Catalog for Gateway {
    type Export = Handle;

    async fn list(&self) -> Vec<ExportEntry> {
        match self.0.meta.records::<VolumeRecord>().await {
            Ok(vs) => vs
                .into_iter()
                .map(|v| {
                    let p = v.record.profile.unwrap_or_default();
                    ExportEntry {
                        name: v.record.name,
                        description: description(p.data_shards, p.parity_shards),
                    }
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list volumes");
                Vec::new()
            }
        }
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, Refusal> {
        if let Some(a) = self.0.attached.lock().await.get(name) {
            return Ok(a.info());
        }
        match self.0.meta.record::<VolumeRecord>(name).await {
            Ok(Some(v)) => {
                let p = v.record.profile.unwrap_or_default();
                Ok(continuum_nbd::mem::export_info(
                    name,
                    &description(p.data_shards, p.parity_shards),
                    v.record.size_bytes,
                ))
            }
            Ok(None) => Err(Refusal::unknown(name)),
            Err(e) => Err(Refusal {
                reply: wire::REP_ERR_SHUTDOWN,
                message: format!("meta unreachable: {e}"),
            }),
        }
    }

    async fn open(&self, name: &str) -> Result<(ExportInfo, Arc<Handle>), Refusal> {
        let a = match self.0.attach(name).await {
            Ok(a) => a,
            Err(r) if r.reply == wire::REP_ERR_POLICY && !self.0.standby_attach.is_zero() => {
                tracing::info!(volume = name, reason = r.message, "connection in standby");
                let info = self.describe(name).await?;
                return Ok((
                    info,
                    Arc::new(Handle {
                        attached: tokio::sync::OnceCell::new(),
                        standby: Some((name.to_string(), self.0.standby_attach)),
                        gateway: self.0.me.clone(),
                    }),
                ));
            }
            Err(r) => return Err(r),
        };
        let info = a.info();
        Ok((
            info,
            Arc::new(Handle {
                attached: tokio::sync::OnceCell::new_with(Some(a)),
                standby: None,
                gateway: self.0.me.clone(),
            }),
        ))
    }
}

pub async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(
            continuum_nbd::tls::server_config(c, k, args.tls_ca.as_deref())
                .context("loading the TLS certificate")?,
        ),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    if args.tls_required && tls.is_none() {
        bail!("--tls-required needs --tls-cert and --tls-key");
    }
    if args.listen == "none" && args.socket.is_none() {
        bail!("nothing to serve on: give --listen ADDR or --socket PATH");
    }
    let meta = MetaClient::connect(&args.meta)?;
    let metrics = Arc::new(Metrics::default());
    let inner = Arc::new_cyclic(|me| GatewayInner {
        meta,
        holder: format!("{GATEWAY_HOLDER_PREFIX}{}", args.id),
        shard_timeout: Duration::from_millis(args.shard_timeout_ms),
        care: Care {
            repair_rate: args.repair_rate,
            scrub_every: (args.scrub_interval_seconds > 0)
                .then(|| Duration::from_secs(args.scrub_interval_seconds)),
            scrub_rate: args.scrub_rate,
        },
        attached: tokio::sync::Mutex::default(),
        metrics: metrics.clone(),
        me: me.clone(),
        ack_before_durable: args.failpoint_ack_before_durable,
        standby_attach: Duration::from_secs(args.standby_attach_seconds),
    });
    let catalog = Arc::new(Gateway(inner.clone()));
    let config = Arc::new(ServerConfig {
        tls,
        tls_required: args.tls_required,
        request_timeout: Duration::from_secs(args.request_timeout_seconds),
    });
    if let Some(addr) = args.metrics_addr {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let (m, id, g) = (metrics.clone(), args.id.clone(), inner.clone());
        tokio::spawn(continuum_meta::metrics::serve_text(
            listener,
            move || m.render(&id) + &Metrics::render_volumes(&g, &id),
            || Ok("ok\n"),
        ));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    if args.listen != "none" {
        let tcp = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(addr = %tcp.local_addr()?, "NBD gateway listening (tcp)");
        servers.spawn(continuum_nbd::server::serve_tcp(
            tcp,
            catalog.clone(),
            config.clone(),
            stop_rx.clone(),
        ));
    }
    if let Some(path) = &args.socket {
        // A socket left by a previous run that did not stop cleanly.
        if path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let unix = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        tracing::info!(path = %path.display(), "NBD gateway listening (unix)");
        servers.spawn(continuum_nbd::server::serve_unix(
            unix,
            catalog.clone(),
            config.clone(),
            stop_rx.clone(),
        ));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: finishing in-flight requests");
    let _ = stop_tx.send(true);
    let drain = async { while servers.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("connections still busy after 10 s; stopping anyway");
    }
    inner.detach_all().await;
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
