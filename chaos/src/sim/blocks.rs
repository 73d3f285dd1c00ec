//! The block simulation: the real volume client and real block-server stores on their
//! in-memory twins, over [`SimNet`], in one thread with virtual time.
//!
//! Workers write stamped blocks (some with FUA), read and check them, and flush, through the
//! current writer. A seeded schedule injects faults, never more than m servers unavailable
//! at once (unless a whole-cluster power loss, which only loses what was never made durable):
//! - `power_loss`: a server loses power (unsynced device blocks survive or not, one by one;
//!   a prefix of unsynced index batches survives) and restarts later;
//! - `partition`: the links between the writer and a server are held, then released;
//! - `bit_flip`: one bit of a block holding data flips on a server's device;
//! - `disk_full`: a server's device refuses writes (ENOSPC) for a while;
//! - `writer_crash`: the writer crashes in the middle of a stripe write (after some of its
//!   shard writes), and a new writer takes over (fencing, reconciliation);
//! - `stale_writer`: the writer is cut off, a new writer takes over, and the old one's held
//!   requests arrive later (they must all be refused: epoch fencing);
//! - `wide_partition`: the writer loses m+1 servers at once (more than the stripes can spare:
//!   I/O on some stripes fails until they return, but nothing acknowledged may be lost; a WAN
//!   cut between sites looks like this), taken only when no other server is out;
//! - `cluster_power_loss` (opt-in, [`BlockSimConfig::cluster_power_loss`]): every server
//!   loses power at once.
//!
//! After the faults stop, everything heals; a fresh writer takes over, repairs until the
//! volume is fully redundant (the time this takes is reported), scrubs twice (the second pass
//! must find nothing), and reads back every block the workload wrote. The [`BlockChecker`]
//! judges every read of the run.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use continuum_blockstore::device::{Device, MemDevice};
use continuum_blockstore::ec::Profile;
use continuum_blockstore::index::{Batch, Index, IndexError, MemIndex, Pairs};
use continuum_blockstore::store::Store;
use continuum_blockstore::volume::{ServerInfo, Volume, VolumeSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::net::SimNet;
use crate::blocks::{stamped, BlockChecker, BLOCK};

/// Knobs of one block simulation.
#[derive(Clone, Debug)]
pub struct BlockSimConfig {
    pub servers: usize,
    pub profile: Profile,
    /// Virtual ms of faulty operation.
    pub fault_ms: u64,
    /// Mean virtual ms between faults.
    pub fault_every_ms: u64,
    pub workers: usize,
    /// Blocks each worker owns (workers' regions share stripes at their edges).
    pub region_blocks: u64,
    /// Largest one-way network delay, µs.
    pub max_delay_us: u64,
    /// Deliberately broken storage, to show the checker catches it: device and index syncs
    /// do nothing, so a power loss takes writes that were acknowledged as durable.
    pub broken_sync: bool,
    /// Whole-cluster power losses (every server at once) among the faults.
    pub cluster_power_loss: bool,
    /// Fault kinds left out of the schedule (by name, as in the report).
    pub disabled: BTreeSet<String>,
}

impl Default for BlockSimConfig {
    fn default() -> Self {
        Self {
            servers: 6,
            profile: Profile::DEFAULT,
            fault_ms: 6_000,
            fault_every_ms: 400,
            workers: 4,
            region_blocks: 40,
            max_delay_us: 300,
            broken_sync: false,
            cluster_power_loss: false,
            disabled: BTreeSet::new(),
        }
    }
}

/// What a block simulation did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BlockSimReport {
    pub seed: u64,
    pub writes: u64,
    pub writes_acked: u64,
    pub writes_durable: u64,
    pub write_errors: u64,
    pub reads_checked: u64,
    pub read_errors: u64,
    pub flushes: u64,
    pub writers: u64,
    pub faults: BTreeMap<String, u64>,
    pub violations: Vec<String>,
    /// Virtual ms from the end of the faults until every stripe was fully redundant.
    pub heal_ms: u64,
    pub virtual_ms: u64,
}

/// Faults of one server's disk, shared with its device twin.
#[derive(Default)]
struct DiskFaults {
    full: Cell<bool>,
    broken_sync: bool,
}

/// [`MemDevice`] with the simulator's disk faults.
#[derive(Clone)]
struct SimDevice {
    inner: MemDevice,
    faults: Rc<DiskFaults>,
}

impl Device for SimDevice {
    async fn read(&self, offset: u64, len: usize) -> std::io::Result<bytes::BytesMut> {
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> std::io::Result<()> {
        if self.faults.full.get() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write(offset, data).await
    }

    async fn sync(&self) -> std::io::Result<()> {
        if self.faults.broken_sync {
            return Ok(());
        }
        self.inner.sync().await
    }

    async fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len).await
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn boot_id(&self) -> Vec<u8> {
        self.inner.boot_id()
    }

    fn fs_free(&self) -> Option<u64> {
        // A full disk is a full filesystem: stores that keep a reserve refuse allocations
        // before the device write fails.
        self.faults.full.get().then_some(0)
    }
}

/// [`MemIndex`], with syncs that lie when the build is deliberately broken.
#[derive(Clone)]
struct SimIndex {
    inner: MemIndex,
    broken_sync: bool,
}

impl Index for SimIndex {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, IndexError> {
        self.inner.get(key)
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), IndexError> {
        self.inner.write(batch, sync && !self.broken_sync)
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Pairs, IndexError> {
        self.inner.scan(from, to, limit)
    }

    fn sync(&self) -> Result<(), IndexError> {
        if self.broken_sync {
            return Ok(());
        }
        self.inner.sync()
    }
}

/// One simulated block server: its storage survives incarnations; a running incarnation is a
/// [`tokio::task::LocalSet`] of its own, dropped whole when the server loses power (so no
/// task of a dead server ever touches storage again).
struct SimServer {
    device: MemDevice,
    index: MemIndex,
    faults: Rc<DiskFaults>,
    kill: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

/// Device size per server.
const DEVICE_BYTES: u64 = 256 << 20;
/// The block client's per-request deadline.
const TIMEOUT: Duration = Duration::from_millis(800);
/// How long (virtual) opening a writer may keep failing before the seed fails.
const OPEN_DEADLINE: Duration = Duration::from_secs(120);
/// How often a server flushes when something is unsynced.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct Writer {
    vol: Arc<Volume>,
    /// The writer's network client id (links are held per writer) and checker connection.
    conn: u64,
}

struct Sim {
    cfg: BlockSimConfig,
    seed: u64,
    rng: RefCell<StdRng>,
    net: SimNet,
    servers: RefCell<Vec<SimServer>>,
    infos: Vec<ServerInfo>,
    spec: VolumeSpec,
    checker: RefCell<BlockChecker>,
    writer: RefCell<Option<Writer>>,
    next_epoch: Cell<u64>,
    next_conn: Cell<u64>,
    next_write: Cell<u64>,
    /// Servers unavailable now (powered off, partitioned, disk full).
    unavailable: RefCell<BTreeSet<usize>>,
    stop: Cell<bool>,
    report: RefCell<BlockSimReport>,
    /// The fault timeline (virtual ms, event), printed with a failure.
    log: RefCell<Vec<String>>,
    began: Instant,
}

/// Runs one seeded block simulation; `Err` names the violated property.
pub fn run(seed: u64, cfg: BlockSimConfig) -> Result<BlockSimReport, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    local
        .block_on(&rt, async move {
            let sim = Rc::new(Sim::new(seed, cfg));
            sim.clone().run().await.map_err(|e| {
                let log = sim.log.borrow();
                let tail = &log[log.len().saturating_sub(80)..];
                format!(
                    "{e}\n  timeline (last {} events):\n    {}",
                    tail.len(),
                    tail.join("\n    ")
                )
            })
        })
        .map_err(|e| format!("seed {seed}: {e}"))
}

impl Sim {
    fn new(seed: u64, cfg: BlockSimConfig) -> Self {
        let servers = (0..cfg.servers)
            .map(|_| SimServer {
                device: MemDevice::new(DEVICE_BYTES),
                index: MemIndex::default(),
                faults: Rc::new(DiskFaults {
                    full: Cell::new(false),
                    broken_sync: cfg.broken_sync,
                }),
                kill: None,
            })
            .collect();
        let infos = (0..cfg.servers)
            .map(|i| ServerInfo {
                id: i as u64 + 1,
                addr: SimNet::addr(i),
                site: "site".into(),
                rack: "rack".into(),
                host: format!("host-{i}"),
                weight: 1.0,
                up: true,
            })
            .collect();
        let blocks = cfg.workers as u64 * cfg.region_blocks;
        let mut spec = VolumeSpec::new(1, blocks.next_multiple_of(64) * BLOCK as u64);
        spec.profile = cfg.profile;
        spec.unit = 16 * 1024;
        spec.pg_count = 8;
        Sim {
            net: SimNet::new(cfg.servers, seed, cfg.max_delay_us),
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
            seed,
            servers: RefCell::new(servers),
            infos,
            spec,
            checker: RefCell::new(BlockChecker::new()),
            writer: RefCell::new(None),
            next_epoch: Cell::new(1),
            next_conn: Cell::new(1),
            next_write: Cell::new(1),
            unavailable: RefCell::new(BTreeSet::new()),
            stop: Cell::new(false),
            report: RefCell::new(BlockSimReport {
                seed,
                ..Default::default()
            }),
            log: RefCell::new(Vec::new()),
            began: Instant::now(),
            cfg,
        }
    }

    fn rand(&self, range: std::ops::Range<u64>) -> u64 {
        self.rng.borrow_mut().gen_range(range)
    }

    /// Whether `CONTINUUM_CHAOS_TRACE_BLOCK` names a block in `first..first + n` (its writes
    /// then go into the timeline).
    fn traced(&self, first: u64, n: u64) -> bool {
        std::env::var("CONTINUUM_CHAOS_TRACE_BLOCK")
            .ok()
            .and_then(|b| b.parse::<u64>().ok())
            .is_some_and(|b| (first..first + n).contains(&b))
    }

    fn note(&self, event: String) {
        let t = self.began.elapsed().as_millis();
        self.log.borrow_mut().push(format!("{t:>6} ms  {event}"));
    }

    fn count(&self, fault: &str) {
        *self
            .report
            .borrow_mut()
            .faults
            .entry(fault.to_string())
            .or_insert(0) += 1;
    }

    /// Starts a new incarnation of server `i` on its surviving storage.
    fn start_server(&self, i: usize) -> Result<(), String> {
        if self.servers.borrow()[i].kill.is_some() {
            return Ok(()); // already running (a heal got there first)
        }
        let (device, index, faults) = {
            let s = &self.servers.borrow()[i];
            (s.device.clone(), s.index.clone(), s.faults.clone())
        };
        let broken_sync = faults.broken_sync;
        let store = Store::open(
            SimDevice {
                inner: device,
                faults,
            },
            SimIndex {
                inner: index,
                broken_sync,
            },
        )
        .map_err(|e| format!("server {i} failed to reopen its storage: {e}"))?;
        // Half the servers keep a filesystem reserve (a full disk refuses allocations there);
        // on the others it fails the device writes.
        if i % 2 == 1 {
            store.set_space_reserve(1 << 20);
        }
        // A third of the servers keep a record cache of a few records only, so records
        // leave it all the time (the cache must never change what the store answers).
        if i.is_multiple_of(3) {
            store.set_record_cache_bytes(8 << 10);
        }
        let store = Rc::new(store);
        let (accept_tx, mut accept_rx) = mpsc::unbounded_channel();
        let incarnation = tokio::task::LocalSet::new();
        let node = i as u64 + 1;
        {
            let store = store.clone();
            incarnation.spawn_local(async move {
                while let Some(stream) = accept_rx.recv().await {
                    let store = store.clone();
                    tokio::task::spawn_local(async move {
                        let _ = continuum_blockstore::server::connection(
                            store,
                            stream,
                            "sim-client",
                            node,
                        )
                        .await;
                    });
                }
            });
        }
        incarnation.spawn_local(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            loop {
                tick.tick().await;
                if store.flush_due() && store.flush().await.is_err() {
                    // The real server stops on a failed flush (fail-stop); so does this one.
                    break;
                }
            }
        });
        let (kill_tx, kill_rx) = oneshot::channel::<oneshot::Sender<()>>();
        tokio::task::spawn_local(async move {
            let mut incarnation = incarnation;
            let dead = tokio::select! {
                biased;
                k = kill_rx => k.ok(),
                _ = &mut incarnation => None,
            };
            drop(incarnation);
            if let Some(dead) = dead {
                let _ = dead.send(());
            }
        });
        self.servers.borrow_mut()[i].kill = Some(kill_tx);
        self.net.attach(i, accept_tx);
        Ok(())
    }

    /// Server `i` loses power: its incarnation is gone, unsynced storage tears.
    async fn power_off(&self, i: usize) {
        self.net.detach(i);
        let kill = self.servers.borrow_mut()[i].kill.take();
        if let Some(kill) = kill {
            let (dead_tx, dead_rx) = oneshot::channel();
            if kill.send(dead_tx).is_ok() {
                let _ = dead_rx.await;
            }
        }
        let (device, index) = {
            let s = &self.servers.borrow()[i];
            (s.device.clone(), s.index.clone())
        };
        let mut rng = StdRng::seed_from_u64(self.rand(0..u64::MAX));
        device.crash(|_| rng.gen_bool(0.5));
        let keep = self.rand(0..index.unsynced() as u64 + 1) as usize;
        index.crash(keep);
    }

    /// Opens a new writer, retrying while too few servers answer; a volume that no writer can
    /// open for [`OPEN_DEADLINE`] of virtual time is a failure (a stripe lost for good), not
    /// a reason to spin forever.
    async fn open_writer(&self) -> Result<Writer, String> {
        let deadline = Instant::now() + OPEN_DEADLINE;
        loop {
            let epoch = self.next_epoch.get();
            self.next_epoch.set(epoch + 1);
            let conn = self.next_conn.get();
            self.next_conn.set(conn + 1);
            let opened = Volume::open_with_dialer(
                self.spec.clone(),
                epoch,
                &self.infos,
                TIMEOUT,
                self.net.dialer(conn),
            )
            .await;
            match opened {
                Ok(vol) => {
                    self.report.borrow_mut().writers += 1;
                    self.note(format!("writer {conn} open (epoch {epoch})"));
                    let w = Writer { vol, conn };
                    *self.writer.borrow_mut() = Some(w.clone());
                    return Ok(w);
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "no writer could open the volume for {} s: {e}",
                        OPEN_DEADLINE.as_secs()
                    ));
                }
                // Too few servers reachable to fence and reconcile: a new lease later.
                Err(e) => {
                    tracing::debug!(epoch, error = %e, "writer open failed");
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            }
        }
    }

    fn writer(&self) -> Option<Writer> {
        self.writer.borrow().clone()
    }

    async fn worker(self: Rc<Self>, w: usize) {
        let start = w as u64 * self.cfg.region_blocks;
        let end = start + self.cfg.region_blocks;
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_mul(31).wrapping_add(w as u64));
        while !self.stop.get() {
            let Some(writer) = self.writer() else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let first = rng.gen_range(start..end);
            match rng.gen_range(0..10) {
                0..=5 => {
                    let fua = rng.gen_bool(0.3);
                    // Some writes cover a whole stripe (data and parity go out together);
                    // the rest are partial (read-modify-write of the parity).
                    let stripe = self.stripe_blocks();
                    let aligned: Vec<u64> = (start.next_multiple_of(stripe)..end)
                        .step_by(stripe as usize)
                        .filter(|a| a + stripe <= end)
                        .collect();
                    if !aligned.is_empty() && rng.gen_bool(0.15) {
                        let first = aligned[rng.gen_range(0..aligned.len())];
                        self.write(&writer, first, stripe, fua).await;
                    } else {
                        let n = rng.gen_range(1..=(end - first).min(12));
                        self.write(&writer, first, n, fua).await;
                    }
                }
                6..=8 => {
                    let n = rng.gen_range(1..=(end - first).min(8));
                    self.read(&writer, first, n).await;
                }
                _ => self.flush(&writer).await,
            }
            tokio::time::sleep(Duration::from_micros(rng.gen_range(0..2000))).await;
        }
    }

    /// Blocks of one stripe's data.
    fn stripe_blocks(&self) -> u64 {
        u64::from(self.spec.unit) * self.spec.profile.data as u64 / BLOCK as u64
    }

    async fn write(&self, w: &Writer, first: u64, n: u64, fua: bool) {
        let id = self.next_write.get();
        self.next_write.set(id + 1);
        let blocks: Vec<u64> = (first..first + n).collect();
        self.checker.borrow_mut().write_invoked(&blocks, id);
        self.report.borrow_mut().writes += 1;
        let data = Bytes::from(stamped(first, n as usize, id));
        let traced = self.traced(first, n);
        let r = w.vol.write(first * BLOCK as u64, data, fua).await;
        if traced {
            self.note(format!(
                "write {id} blocks {first}+{n} fua {fua} by writer {}: {r:?}",
                w.conn
            ));
        }
        match r {
            Ok(()) => self
                .checker
                .borrow_mut()
                .write_acked(w.conn, &blocks, id, fua),
            Err(_) => self.report.borrow_mut().write_errors += 1,
        }
    }

    async fn read(&self, w: &Writer, first: u64, n: u64) {
        let tickets: Vec<_> = {
            let c = self.checker.borrow();
            (first..first + n).map(|b| c.read_invoked(b)).collect()
        };
        match w.vol.read(first * BLOCK as u64, n * BLOCK as u64).await {
            Ok(data) => {
                let mut c = self.checker.borrow_mut();
                for (t, chunk) in tickets.into_iter().zip(data.chunks(BLOCK)) {
                    if let Err(v) = c.read_completed(t, chunk) {
                        self.report.borrow_mut().violations.push(v.to_string());
                    }
                }
            }
            Err(_) => self.report.borrow_mut().read_errors += 1,
        }
    }

    async fn flush(&self, w: &Writer) {
        let ticket = self.checker.borrow_mut().flush_invoked(w.conn);
        self.report.borrow_mut().flushes += 1;
        if w.vol.flush().await.is_ok() {
            self.checker.borrow_mut().flush_acked(ticket);
        }
    }

    /// Waits until the current writer knows nothing of server `i` is missing any more: no
    /// verification pending, no stale shard on it (or the run ends). Until then the server's
    /// fault still costs a unit of the budget of m: its shards are not redundant yet.
    async fn wait_whole(&self, i: usize) {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let whole = self.writer().is_some_and(|w| {
                !w.vol.unverified() && !w.vol.degraded().contains_key(&(i as u64 + 1))
            });
            if whole || self.stop.get() {
                return;
            }
        }
    }

    /// Makes server `i` unavailable for a while (`kind`), if the budget of m allows.
    fn take(&self, i: usize) -> bool {
        let mut u = self.unavailable.borrow_mut();
        if u.len() >= self.cfg.profile.parity || u.contains(&i) {
            return false;
        }
        u.insert(i);
        true
    }

    fn give_back(&self, i: usize) {
        self.unavailable.borrow_mut().remove(&i);
    }

    /// Injects one fault (some of them end later by themselves).
    async fn fault(self: &Rc<Self>) -> Result<(), String> {
        let n = self.cfg.servers;
        let i = self.rand(0..n as u64) as usize;
        let lasting = Duration::from_millis(self.rand(200..3000));
        let pick = self.rand(0..100);
        let kind = match pick {
            0..=24 => "power_loss",
            25..=44 => "partition",
            45..=54 => "bit_flip",
            55..=64 => "disk_full",
            65..=79 => "writer_crash",
            80..=94 => "stale_writer",
            95..=97 => "wide_partition",
            _ => "cluster_power_loss",
        };
        if self.cfg.disabled.contains(kind) {
            return Ok(());
        }
        match pick {
            0..=24 => {
                if !self.take(i) {
                    return Ok(());
                }
                self.count("power_loss");
                self.note(format!("power loss: server {}", i + 1));
                self.power_off(i).await;
                let sim = self.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(lasting).await;
                    if let Err(e) = sim.start_server(i) {
                        sim.report.borrow_mut().violations.push(e);
                    }
                    sim.note(format!("server {} back", i + 1));
                    // The server is back but may have lost writes it had not synced: it counts
                    // against the budget of m until the writer has verified the volume.
                    sim.wait_whole(i).await;
                    sim.note(format!("server {} whole again", i + 1));
                    sim.give_back(i);
                });
            }
            25..=44 => {
                let Some(w) = self.writer() else {
                    return Ok(());
                };
                if !self.take(i) {
                    return Ok(());
                }
                self.count("partition");
                self.note(format!("partition: writer {} / server {}", w.conn, i + 1));
                self.net.hold(w.conn, i, true);
                let sim = self.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(lasting).await;
                    sim.net.hold(w.conn, i, false);
                    sim.note(format!("partition healed: server {}", i + 1));
                    sim.wait_whole(i).await;
                    sim.give_back(i);
                });
            }
            45..=54 => {
                // Bit rot costs a shard until the scrubber has found and rebuilt it: it takes
                // a unit of the budget until a scrub pass (the gateway's background scrubber,
                // here started soon after) completes.
                let device = self.servers.borrow()[i].device.clone();
                let used = device.blocks_in_use();
                if used == 0 || !self.take(i) {
                    return Ok(());
                }
                let at = device
                    .block_in_use(self.rand(0..used as u64) as usize)
                    .expect("in range");
                device.flip_bit(at + self.rand(0..BLOCK as u64), self.rand(0..8) as u8);
                self.count("bit_flip");
                self.note(format!("bit flip: server {} at {at}", i + 1));
                let sim = self.clone();
                let after = Duration::from_millis(self.rand(100..1000));
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(after).await;
                    while !sim.stop.get() {
                        if let Some(w) = sim.writer() {
                            if w.vol.scrub(0).await.is_ok() {
                                break;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    sim.note(format!("scrubbed after the flip on server {}", i + 1));
                    sim.wait_whole(i).await;
                    sim.give_back(i);
                });
            }
            55..=64 => {
                if !self.take(i) {
                    return Ok(());
                }
                self.count("disk_full");
                self.note(format!("disk full: server {}", i + 1));
                let faults = self.servers.borrow()[i].faults.clone();
                faults.full.set(true);
                let sim = self.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(lasting).await;
                    faults.full.set(false);
                    sim.note(format!("disk has room: server {}", i + 1));
                    sim.wait_whole(i).await;
                    sim.give_back(i);
                });
            }
            65..=79 => {
                let Some(w) = self.writer() else {
                    return Ok(());
                };
                self.count("writer_crash");
                self.note(format!("writer {} crashes mid-stripe", w.conn));
                let after = self.rand(1..self.cfg.profile.width() as u64) as usize;
                w.vol
                    .failpoints
                    .crash_after_shard_writes
                    .store(after, std::sync::atomic::Ordering::Release);
                // The crash happens at the writer's next stripe write; then a new one takes
                // over.
                tokio::time::sleep(Duration::from_millis(self.rand(5..200))).await;
                *self.writer.borrow_mut() = None;
                self.open_writer().await?;
            }
            80..=94 => {
                let Some(old) = self.writer() else {
                    return Ok(());
                };
                self.count("stale_writer");
                self.note(format!(
                    "writer {} cut off; a new writer takes over",
                    old.conn
                ));
                for s in 0..n {
                    self.net.hold(old.conn, s, true);
                }
                tokio::time::sleep(Duration::from_millis(self.rand(1..100))).await;
                self.open_writer().await?;
                let sim = self.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(lasting).await;
                    for s in 0..n {
                        sim.net.hold(old.conn, s, false);
                    }
                    sim.note(format!("stale writer {} reconnected", old.conn));
                    // The old writer's requests arrive now; it must not have overwritten the
                    // new writer's data (the checker's reads say so).
                    drop(old);
                });
            }
            95..=97 => {
                let Some(w) = self.writer() else {
                    return Ok(());
                };
                if !self.unavailable.borrow().is_empty() {
                    return Ok(());
                }
                let mut cut = BTreeSet::new();
                while cut.len() <= self.cfg.profile.parity {
                    cut.insert(self.rand(0..n as u64) as usize);
                }
                self.count("wide_partition");
                self.note(format!(
                    "wide partition: writer {} / servers {:?}",
                    w.conn,
                    cut.iter().map(|s| s + 1).collect::<Vec<_>>()
                ));
                for &s in &cut {
                    self.unavailable.borrow_mut().insert(s);
                    self.net.hold(w.conn, s, true);
                }
                let sim = self.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(lasting).await;
                    for &s in &cut {
                        sim.net.hold(w.conn, s, false);
                    }
                    sim.note("wide partition healed".to_string());
                    for s in cut {
                        sim.wait_whole(s).await;
                        sim.give_back(s);
                    }
                });
            }
            _ => {
                if !self.cfg.cluster_power_loss || !self.unavailable.borrow().is_empty() {
                    return Ok(());
                }
                self.count("cluster_power_loss");
                let all: Vec<usize> = (0..n).collect();
                for &s in &all {
                    self.unavailable.borrow_mut().insert(s);
                }
                for &s in &all {
                    self.power_off(s).await;
                }
                tokio::time::sleep(Duration::from_millis(self.rand(100..1000))).await;
                for s in all {
                    self.start_server(s)?;
                    self.give_back(s);
                }
            }
        }
        Ok(())
    }

    async fn run(self: Rc<Self>) -> Result<BlockSimReport, String> {
        let began = Instant::now();
        for i in 0..self.cfg.servers {
            self.start_server(i)?;
        }
        self.open_writer().await?;
        let workers: Vec<_> = (0..self.cfg.workers)
            .map(|w| tokio::task::spawn_local(self.clone().worker(w)))
            .collect();
        let fault_end = began + Duration::from_millis(self.cfg.fault_ms);
        while Instant::now() < fault_end {
            let gap = self.rand(self.cfg.fault_every_ms / 2..self.cfg.fault_every_ms * 3 / 2 + 1);
            tokio::time::sleep(Duration::from_millis(gap)).await;
            self.fault().await?;
        }
        // Heal: power, links and disks back; the workers stop.
        self.stop.set(true);
        for w in workers {
            let _ = w.await;
        }
        let healed_at = Instant::now();
        self.note("faults stop; healing".into());
        self.net.release_all();
        for i in 0..self.cfg.servers {
            self.servers.borrow()[i].faults.full.set(false);
            if self.servers.borrow()[i].kill.is_none() {
                self.start_server(i)?;
            }
        }
        self.unavailable.borrow_mut().clear();
        // A fresh writer (as after a gateway restart) reconciles, then repair restores full
        // redundancy.
        *self.writer.borrow_mut() = None;
        let w = self.open_writer().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pass = w.vol.repair_all(0).await;
            match pass {
                Ok(r) if r.deferred == 0 => break,
                r if Instant::now() > deadline => {
                    let mut detail = String::new();
                    if let Ok(stripes) = w.vol.stripes_in_use().await {
                        for st in stripes {
                            if let Err(e) = w.vol.repair_stripe(st).await {
                                let inspect = w.vol.inspect_stripe(st).await;
                                detail.push_str(&format!("\n  stripe {st}: {e}; {inspect:?}"));
                            }
                        }
                    }
                    return Err(format!(
                        "full redundancy did not return within 60 s of healing (last pass: \
                         {r:?}){detail}"
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        self.report.borrow_mut().heal_ms = healed_at.elapsed().as_millis() as u64;
        w.vol
            .scrub(0)
            .await
            .map_err(|e| format!("scrub after healing failed: {e}"))?;
        let second = w
            .vol
            .scrub(0)
            .await
            .map_err(|e| format!("second scrub failed: {e}"))?;
        if second.checksum_errors + second.parity_mismatches + second.shards_rebuilt > 0 {
            return Err(format!(
                "a second scrub after repair still found damage: {second:?}"
            ));
        }
        // Every block ever written reads back as the checker allows.
        let written = self.checker.borrow().written_blocks();
        for b in written {
            let t = self.checker.borrow().read_invoked(b);
            let data = w
                .vol
                .read(b * BLOCK as u64, BLOCK as u64)
                .await
                .map_err(|e| format!("final read of block {b} failed: {e}"))?;
            if let Err(v) = self.checker.borrow_mut().read_completed(t, &data) {
                self.report.borrow_mut().violations.push(v.to_string());
            }
        }
        let mut report = self.report.borrow().clone();
        let c = self.checker.borrow();
        report.writes_acked = c.writes_acked;
        report.writes_durable = c.writes_durable;
        report.reads_checked = c.reads_checked;
        report.virtual_ms = began.elapsed().as_millis() as u64;
        if !report.violations.is_empty() {
            return Err(format!(
                "{} violations, first: {}",
                report.violations.len(),
                report.violations[0]
            ));
        }
        Ok(report)
    }
}
