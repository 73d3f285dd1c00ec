//! The volume client: a volume's bytes over erasure-coded shards on many block servers. The
//! NBD gateway and repair use it; it is the volume's only writer while it holds the writer
//! lease (epoch) it was opened with.
//!
//! How it keeps the invariants of DESIGN.md:
//! - **Epoch fencing (1).** Every shard write, stabilize and rollback carries the epoch; a block
//!   server that has seen a newer writer refuses, and the volume then fails every later write
//!   with [`VolumeError::Fenced`]: a stale writer never overwrites newer data.
//! - **No write hole (2).** Writes to one stripe are serialised (a per-stripe lock). A stripe
//!   write creates version `(epoch, seq)` on every shard it touches (the touched data shards
//!   and all parity), each a compare-and-swap on the shard's expected version; the blocks it
//!   replaces stay on the servers until the version is stabilized, which is queued only once
//!   every shard answered. If fewer than k shards end up holding the new stripe state the
//!   write is rolled back and fails. A writer that crashes mid-stripe leaves unstable versions
//!   that the next writer reconciles ([`crate::reconcile`]) before it serves any I/O.
//! - **Durability (3).** FUA writes are synced on every shard before they are acknowledged;
//!   [`Volume::flush`] syncs every server written since the last flush. A partial-stripe
//!   write without FUA is acknowledged once its data shards hold it, and its parity is
//!   written behind (`Volume::write_behind`): under the stripe's lock, so nothing reads the
//!   stripe in between, and before any later flush returns.
//! - **Checksums (4).** Servers verify on read; this client verifies again after the network.
//!   A shard that fails is read around (reconstructed from others), marked stale and rebuilt.
//! - **Degraded, never down (5).** Reads reconstruct from any k current shards; writes skip
//!   missing shards (their parity still records the change) as long as k stay current.
//! - **Placement (7).** Stripe → placement group → k+m servers in distinct failure domains.
//!
//! Per stripe the client keeps a [`StripeView`] (the version each position should hold, and
//! which positions are stale), learned from the shards on first touch and kept up to date by
//! its own writes; the cache is bounded and can always be re-learned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so the chaos simulator's virtual time drives retries and throttles too.
use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use futures::StreamExt;

use crate::checksum::{self, BLOCK_BYTES};
use crate::client::{BlockClient, Dialer, ShardError, TcpDialer};
use crate::ec::{Codec, EcError, Profile};
use crate::layout::{Layout, Segment};
use crate::placement::{self, DomainLevel, PlacementError, Server};
use crate::protocol::pb;
use crate::reconcile::{self, StripeView};
use crate::store::{ObjectInfo, ObjectKey, OpenedNote, Version, WriteMode, WriteReq};

/// Stripes whose view is cached; beyond it the cache is emptied (views are re-learned).
pub const MAX_CACHED_STRIPES: usize = 64 * 1024;
/// Writes behind ([`Volume::write_behind`]) unfinished at once; each holds its bytes.
const MAX_WRITE_BEHIND: usize = 64;
/// Stabilizations piggybacked on one shard write.
const MAX_PIGGYBACK: usize = 64;
/// Stripes a repair pass rebuilds at once.
const MAX_REPAIR_PARALLEL: usize = 16;
/// Stale stripes the background task rebuilds per round (every 500 ms).
const HEAL_PER_ROUND: usize = 64;
/// How long an unreachable server is skipped before it is tried again.
const RETRY_UNREACHABLE: Duration = Duration::from_secs(2);
/// The background task flushes the servers this often while versions wait to be stabilized
/// (a version is stabilized only once a flush made it durable on every shard that took it)...
const STABILIZE_FLUSH_EVERY: Duration = Duration::from_millis(200);
/// ...or as soon as one object has this many versions waiting: a hot object must not reach
/// the store's limit of unstable versions (`store::MAX_UNSTABLE_VERSIONS`) before a flush.
/// (Counting every object's versions together flushed up to 40 times a second under 4 KiB
/// random writes, each flush a device and index sync on every server.)
const STABILIZE_FLUSH_HOT: usize = crate::store::MAX_UNSTABLE_VERSIONS / 2;
/// ...or once this many versions wait in all (bounds the superseded space kept meanwhile).
const STABILIZE_FLUSH_AT: usize = 8192;

/// One block server as the volume sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerInfo {
    pub id: u64,
    pub addr: String,
    pub site: String,
    pub rack: String,
    pub host: String,
    pub weight: f64,
    /// In the cluster map (its lease is alive); a server that is not is replaced in placement.
    pub up: bool,
}

/// What a volume is: its size and how it is spread.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeSpec {
    pub id: u64,
    pub size_bytes: u64,
    pub profile: Profile,
    /// Bytes of one shard in one stripe.
    pub unit: u32,
    pub pg_count: u32,
    pub level: DomainLevel,
    /// The servers whose ranking places the shards (empty: every server of the map); see
    /// `placement::place_group`.
    pub members: Vec<u64>,
}

impl VolumeSpec {
    /// Default layout: 4+2, 64 KiB units, 128 placement groups, host failure domains.
    pub fn new(id: u64, size_bytes: u64) -> Self {
        Self {
            id,
            size_bytes,
            profile: Profile::DEFAULT,
            unit: 64 * 1024,
            pg_count: placement::DEFAULT_PG_COUNT,
            level: DomainLevel::Host,
            members: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("I/O at {offset}+{len} is outside the volume of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume size {size} must be a positive multiple of 4096")]
    BadSize { size: u64 },
    #[error(
        "volume {volume}: a writer with a newer epoch than {epoch} exists; this one is fenced"
    )]
    Fenced { volume: u64, epoch: u64 },
    #[error("volume {volume} stripe {stripe}: only {current} current shards, {needed} needed")]
    Unavailable {
        volume: u64,
        stripe: u64,
        current: usize,
        needed: usize,
    },
    #[error("placement: {0}")]
    Placement(#[from] PlacementError),
    #[error("erasure code: {0}")]
    Ec(#[from] EcError),
    #[error("layout: {0}")]
    Layout(#[from] crate::layout::LayoutError),
    #[error("volume {volume}: the writer stopped at a failpoint (test crash)")]
    Crashed { volume: u64 },
    #[error("volume {volume}: {unfenced} block servers could not be fenced (at most {limit} may be unreachable), so a previous writer could still write; not opening")]
    FenceIncomplete {
        volume: u64,
        unfenced: usize,
        limit: usize,
    },
    #[error("block server {server} is not in the cluster map")]
    UnknownServer { server: u64 },
    #[error("volume {volume}: a stripe written since the last flush has {failed} shards that do not hold it durably (their servers failed the flush or lost power, or they were already stale; at most {limit} may), so written data may not be durable")]
    FlushIncomplete {
        volume: u64,
        /// The most shards of one stripe that do not hold its current state durably.
        failed: usize,
        limit: usize,
    },
    #[error("volume {volume}: writes acknowledged before this flush may be lost: more than m block servers of a stripe lost power before they were durable, or a write acknowledged before its parity was written failed later (reported once)")]
    WritesLost { volume: u64 },
}

pub type Result<T> = std::result::Result<T, VolumeError>;

/// Counters of one open volume.
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub degraded_reads: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub shards_rebuilt: AtomicU64,
    pub bytes_rebuilt: AtomicU64,
    pub rolled_forward: AtomicU64,
    pub rolled_back: AtomicU64,
    pub stripes_scrubbed: AtomicU64,
    pub parity_repaired: AtomicU64,
    /// Progress of the running (or last) repair or scrub pass: stripes to visit, visited.
    pub pass_stripes_total: AtomicU64,
    pub pass_stripes_done: AtomicU64,
}

/// What a repair or scrub pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub stripes: u64,
    pub shards_rebuilt: u64,
    /// Stripes that could not be repaired now (too few shards reachable); retried later.
    pub deferred: u64,
    /// Scrub only: shards whose stored bytes failed their checksum.
    pub checksum_errors: u64,
    /// Scrub only: stripes whose parity did not match their data.
    pub parity_mismatches: u64,
}

/// Paces a pass to `bytes_per_sec` (0 = unthrottled) so it does not starve client I/O.
struct Pace {
    bytes_per_sec: u64,
    start: Instant,
    bytes: u64,
}

impl Pace {
    fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec,
            start: Instant::now(),
            bytes: 0,
        }
    }

    async fn account(&mut self, bytes: u64) {
        self.bytes += bytes;
        if self.bytes_per_sec == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Test hooks (crash points); off unless a test sets them.
#[derive(Debug, Default)]
pub struct Failpoints {
    /// When non-zero: a stripe write sends only this many shard writes, then the writer
    /// "crashes" (every later call fails with [`VolumeError::Crashed`]).
    pub crash_after_shard_writes: AtomicUsize,
    /// While set, partial-stripe writes wait before their parity writes (phase 2) until
    /// it is cleared and [`Failpoints::release_parity`] is called.
    pub hold_parity: AtomicBool,
    parity_released: tokio::sync::Notify,
}

impl Failpoints {
    /// Lets writes held by [`Failpoints::hold_parity`] go on.
    pub fn release_parity(&self) {
        self.hold_parity.store(false, Ordering::Release);
        self.parity_released.notify_waiters();
    }

    async fn parity_gate(&self) {
        if !self.hold_parity.load(Ordering::Acquire) {
            return;
        }
        loop {
            let released = self.parity_released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.hold_parity.load(Ordering::Acquire) {
                return;
            }
            released.await;
        }
    }
}

struct ClusterMap {
    servers: Vec<Server>,
    clients: HashMap<u64, BlockClient>,
    /// Servers of the map that are down.
    down: BTreeSet<u64>,
    /// Placement of each group under this map (filled as groups are used).
    groups: HashMap<u32, Vec<u64>>,
}

/// Writes behind ([`Volume::write_behind`]) not finished yet, by order of start.
struct Behind {
    slots: Arc<tokio::sync::Semaphore>,
    /// The next id, and the ids of those running.
    running: Mutex<(u64, BTreeSet<u64>)>,
    finished: tokio::sync::Notify,
}

impl Default for Behind {
    fn default() -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_WRITE_BEHIND)),
            running: Mutex::default(),
            finished: tokio::sync::Notify::new(),
        }
    }
}

impl Behind {
    fn start(&self) -> u64 {
        let mut r = self.running.lock().expect("poisoned");
        let id = r.0;
        r.0 += 1;
        r.1.insert(id);
        id
    }

    fn finish(&self, id: u64) {
        self.running.lock().expect("poisoned").1.remove(&id);
        self.finished.notify_waiters();
    }

    /// Waits until every write behind started before this call has finished (later ones are
    /// not waited for: a flush covers what was acknowledged before it).
    async fn drain(&self) {
        let upto = self.running.lock().expect("poisoned").0;
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            let oldest = self.running.lock().expect("poisoned").1.first().copied();
            if oldest.is_none_or(|id| id >= upto) {
                return;
            }
            finished.await;
        }
    }
}

/// Which flushes asked for must report lost writes. Flushes are numbered as they begin
/// (the count of those before, plus one). `mark` holds 0, or the number of the first flush
/// that certainly covers every write known lost: every flush fails while it is set, and only
/// that one or a later one clears it, so a flush that began earlier cannot use the report up
/// (a write behind acknowledged after a flush began, and lost before it ended, is not that
/// flush's to report).
#[derive(Debug, Default)]
struct LostReport {
    asked: AtomicU64,
    mark: AtomicU64,
}

impl LostReport {
    /// Flushes that have begun.
    fn asked(&self) -> u64 {
        self.asked.load(Ordering::Acquire)
    }

    /// A flush begins: its number.
    fn flush_begins(&self) -> u64 {
        self.asked.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Writes acknowledged after flush number `after` began may be lost (`None`: any
    /// acknowledged before now).
    fn mark(&self, after: Option<u64>) {
        let after = after.unwrap_or_else(|| self.asked());
        self.mark.fetch_max(after + 1, Ordering::AcqRel);
    }

    /// Whether flush `number` must fail; the report is cleared when it covers every write
    /// known lost (a loss noted meanwhile raised the mark: it stays for a later flush).
    fn take(&self, number: u64) -> bool {
        let mark = self.mark.load(Ordering::Acquire);
        if mark == 0 {
            return false;
        }
        if number >= mark {
            let _ = self
                .mark
                .compare_exchange(mark, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        true
    }
}

/// Ends one write behind when dropped: frees its slot, and marks the writes lost unless it
/// finished (or was never acknowledged early: its caller got its result).
struct BehindEnd {
    vol: Arc<Volume>,
    id: u64,
    /// Flushes asked for before the write began (a later one covers it).
    asked: u64,
    ok: bool,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for BehindEnd {
    fn drop(&mut self) {
        if !self.ok {
            self.vol.mark_lost(Some(self.asked));
        }
        self.vol.behind.finish(self.id);
    }
}

/// An open volume (see the module doc).
pub struct Volume {
    spec: VolumeSpec,
    layout: Layout,
    codec: Codec,
    epoch: u64,
    seq: AtomicU64,
    timeout: Duration,
    dialer: Arc<dyn Dialer>,
    cluster: Mutex<ClusterMap>,
    unreachable: Mutex<HashMap<u64, Instant>>,
    views: Mutex<HashMap<u64, StripeView>>,
    locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// Per 4 KiB block: held by a sub-block write while it reads, merges and writes the block.
    rmw_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// Per server: shard versions it acknowledged that no flush has covered yet. They are
    /// stabilized only after one did, on every server (see [`Volume::flush`]): a version
    /// stabilized on one shard while another can still lose it in a power loss could leave
    /// a stripe with fewer than k shards of one state (the whole-cluster power loss case).
    /// Each with the incarnation of the server that took it: a flush answered by another
    /// incarnation (the server lost power since) does not cover it.
    unflushed: Mutex<HashMap<u64, Unflushed>>,
    /// Per server: the incarnation its last answer showed (see `Response.incarnation`).
    incarnations: Mutex<HashMap<u64, u64>>,
    /// Stripes to settle (re-learn, reconcile, rebuild) before their next I/O, each with the
    /// servers that lost power before a flush covered this writer's versions of it (no
    /// cached view can say what they hold now). Until a stripe's positions on them are
    /// current again, those servers count as failed in every flush, so failures add up
    /// across flushes (a rolling power loss: servers going down one after another).
    /// An empty set: a write found the cached view wrong (a version mismatch).
    suspect: Mutex<BTreeMap<u64, Suspect>>,
    /// Writes this writer acknowledged may be lost (a stripe lost more than m servers'
    /// versions before they were durable, settling it left it older than this writer knew
    /// it, or a write behind failed after its acknowledgement): flushes asked for (NBD FLUSH,
    /// not the background task's or a repair pass's) that could otherwise succeed fail with
    /// [`VolumeError::WritesLost`] until one that covers the loss has.
    lost: LostReport,
    /// Versions noted since the last flush began, in all and per object; the background task
    /// is woken when they reach [`STABILIZE_FLUSH_AT`] or [`STABILIZE_FLUSH_HOT`] (versions
    /// waiting on a server that failed a flush do not count: they are retried at the normal
    /// pace, not at every write).
    noted: Mutex<(usize, HashMap<ObjectKey, usize>)>,
    flush_soon: Arc<tokio::sync::Notify>,
    /// Flushes run one at a time: a flush that found nothing dirty must not return while an
    /// earlier one is still making the servers it took durable.
    flush_lock: tokio::sync::Mutex<()>,
    /// Passes over every stripe (repair, scrub, verification) run one at a time: they share
    /// the progress counters of [`VolumeStats`] (two at once counted more stripes done than
    /// the pass had), and a second one would only repeat the first one's work.
    pass_lock: tokio::sync::Mutex<()>,
    /// Per server: stabilizations to send (piggybacked or by the background task), all of
    /// versions a flush made durable.
    to_stabilize: Mutex<HashMap<u64, Vec<(ObjectKey, Version)>>>,
    /// Servers written since the last flush.
    dirty: Mutex<BTreeSet<u64>>,
    /// (stripe, position) whose stored bytes failed their checksum: rebuilt at the next
    /// settle even though their version is right.
    corrupt: Mutex<BTreeSet<(u64, usize)>>,
    fenced: AtomicBool,
    crashed: AtomicBool,
    /// A server failed at the transport level since the last verification pass: it may have
    /// restarted and lost writes it had not synced (acknowledged but not flushed), which no
    /// cached view shows. A pass over every stripe (`repair_all`) finds and rebuilds them
    /// once the server answers again, before more losses can pile up on one stripe.
    unverified: AtomicBool,
    /// Unstable versions of epochs below this are rolled back, never forward: while opening,
    /// the previous writer's epoch that *opened* (it served I/O without what it could not
    /// see; a writer whose open failed fenced but served nothing); once open, this writer's
    /// own (anything older it did not reconcile at open, it served without).
    foreign_below: AtomicU64,
    /// Stripes whose top unstable version was left undecided while opening (the shards that
    /// could tell were out of reach), each with the epoch its versions are judged against:
    /// the previous opened epoch, or what that writer's note said for a stripe it left
    /// undecided too. No writer served I/O from them since, so they are not decided against
    /// this writer's epoch. Recorded with the `opened` mark (`OpenedNote`), so the next
    /// writer judges them the same way; when one is decided after opening, the shorter list
    /// is recorded before the stripe serves I/O.
    undecided: Mutex<BTreeMap<u64, u64>>,
    /// The order of this writer's last note (0: it has not opened yet).
    opened_record: AtomicU64,
    /// Writes acknowledged before their parity was written (see [`Volume::write_behind`]).
    behind: Behind,
    /// This volume, for the tasks that finish writes behind.
    me: std::sync::Weak<Volume>,
    pub stats: VolumeStats,
    pub failpoints: Failpoints,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({}, epoch {})", self.spec.id, self.epoch)
    }
}

fn to_placement(s: &ServerInfo) -> Server {
    Server {
        id: s.id,
        site: s.site.clone(),
        rack: s.rack.clone(),
        host: s.host.clone(),
        weight: s.weight,
        up: s.up,
    }
}

/// Shard versions acknowledged and not yet covered by a flush: (object, version, the
/// incarnation of the server that took it).
type Unflushed = Vec<(ObjectKey, Version, u64)>;

/// A suspect stripe (see `Volume::suspect`).
#[derive(Debug, Default)]
struct Suspect {
    /// Servers that lost versions of it (empty: the cached view was found wrong).
    lost_on: BTreeSet<u64>,
    /// Marks so far: a settle clears the stripe only if no mark came after it began.
    marks: u64,
}

/// What the shard writes of one stripe write did so far.
#[derive(Default)]
struct Sent {
    /// Positions that acknowledged, in order.
    acked: Vec<usize>,
    /// Per acknowledged position: the incarnation of the server that took it.
    incarnation: HashMap<usize, u64>,
    /// A shard refused a write for a version mismatch: the cached view was wrong.
    mismatched: bool,
}

/// One shard's part of a stripe write.
struct ShardWrite {
    pos: usize,
    req: WriteReq,
    payload: Bytes,
}

impl Volume {
    /// Opens `spec` as its writer with `epoch` (the writer lease's, already bumped in meta),
    /// and reconciles what a previous writer left unstable before returning.
    pub async fn open(
        spec: VolumeSpec,
        epoch: u64,
        servers: &[ServerInfo],
        timeout: Duration,
    ) -> Result<Arc<Volume>> {
        Self::open_with_dialer(spec, epoch, servers, timeout, Arc::new(TcpDialer)).await
    }

    /// [`Volume::open`], reaching the servers through `dialer` (the chaos simulator's network).
    pub async fn open_with_dialer(
        spec: VolumeSpec,
        epoch: u64,
        servers: &[ServerInfo],
        timeout: Duration,
        dialer: Arc<dyn Dialer>,
    ) -> Result<Arc<Volume>> {
        if spec.size_bytes == 0 || !spec.size_bytes.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(VolumeError::BadSize {
                size: spec.size_bytes,
            });
        }
        let layout = Layout::new(spec.profile, spec.unit)?;
        let codec = Codec::new(spec.profile)?;
        let vol = Arc::new_cyclic(|me| Volume {
            me: me.clone(),
            behind: Behind::default(),
            spec,
            layout,
            codec,
            epoch,
            seq: AtomicU64::new(1),
            timeout,
            dialer,
            cluster: Mutex::new(ClusterMap {
                servers: Vec::new(),
                clients: HashMap::new(),
                down: BTreeSet::new(),
                groups: HashMap::new(),
            }),
            unreachable: Mutex::default(),
            views: Mutex::default(),
            locks: Mutex::default(),
            rmw_locks: Mutex::default(),
            unflushed: Mutex::default(),
            incarnations: Mutex::default(),
            suspect: Mutex::default(),
            lost: LostReport::default(),
            noted: Mutex::default(),
            flush_soon: Arc::default(),
            flush_lock: tokio::sync::Mutex::new(()),
            pass_lock: tokio::sync::Mutex::new(()),
            to_stabilize: Mutex::default(),
            dirty: Mutex::default(),
            corrupt: Mutex::default(),
            fenced: AtomicBool::new(false),
            crashed: AtomicBool::new(false),
            // A new writer does not know what happened before it: it verifies once, too.
            unverified: AtomicBool::new(true),
            foreign_below: AtomicU64::new(0),
            undecided: Mutex::default(),
            opened_record: AtomicU64::new(0),
            stats: VolumeStats::default(),
            failpoints: Failpoints::default(),
        });
        vol.set_servers(servers);
        let (previous, note) = vol.fence_all(false).await?;
        vol.foreign_below.store(previous, Ordering::Release);
        // Stripes the previous opened writer left undecided keep the judgment it used.
        vol.undecided
            .lock()
            .expect("poisoned")
            .extend(note.undecided.iter().copied());
        vol.reconcile_all().await?;
        // Recorded on at least k servers before any I/O: a later writer fences all but at
        // most min(k-1, m) of them, so it learns that this epoch served.
        vol.fence_all(true).await?;
        vol.foreign_below.store(epoch, Ordering::Release);
        let weak = Arc::downgrade(&vol);
        let flush_soon = vol.flush_soon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut flushed = Instant::now();
            for round in 0u64.. {
                // The volume is not held while waiting (the task ends once it is dropped).
                let soon = tokio::select! {
                    _ = tick.tick() => false,
                    _ = flush_soon.notified() => true,
                };
                let Some(vol) = weak.upgrade() else { break };
                if vol.check().is_err() {
                    break;
                }
                // Entries are never empty lists: a server is listed while versions wait on it.
                let waiting = !vol.unflushed.lock().expect("poisoned").is_empty();
                if waiting && (soon || flushed.elapsed() >= STABILIZE_FLUSH_EVERY) {
                    flushed = Instant::now();
                    if let Err(e) = vol.flush_reporting(false).await {
                        tracing::debug!(volume = vol.spec.id, error = %e, "background flush failed");
                    }
                }
                vol.send_stabilizations().await;
                if round % 10 == 0 {
                    vol.heal(HEAL_PER_ROUND).await;
                    vol.verify().await;
                }
            }
        });
        Ok(vol)
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Replaces the cluster map (servers joining, leaving, declared down). Cached views of
    /// whole stripes are dropped (placement may have moved; they are re-learned); the stale
    /// positions this writer knows of are kept (see `Volume::assess_known`): a version is the
    /// stripe's, not its server's, and a shard that moved reads at the wrong version and is
    /// rebuilt.
    pub fn set_servers(&self, servers: &[ServerInfo]) {
        let mut c = self.cluster.lock().expect("poisoned");
        c.servers = servers.iter().map(to_placement).collect();
        c.down = servers.iter().filter(|s| !s.up).map(|s| s.id).collect();
        c.groups.clear();
        for s in servers {
            let stale = c.clients.get(&s.id).is_none_or(|cl| cl.addr() != s.addr);
            if stale {
                c.clients.insert(
                    s.id,
                    BlockClient::with_dialer(s.addr.clone(), self.timeout, self.dialer.clone()),
                );
            }
        }
        drop(c);
        self.views
            .lock()
            .expect("poisoned")
            .retain(|_, v| v.stale != 0);
    }

    fn check(&self) -> Result<()> {
        if self.crashed.load(Ordering::Acquire) {
            return Err(VolumeError::Crashed {
                volume: self.spec.id,
            });
        }
        if self.fenced.load(Ordering::Acquire) {
            return Err(VolumeError::Fenced {
                volume: self.spec.id,
                epoch: self.epoch,
            });
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.spec.size_bytes)
        {
            return Err(VolumeError::OutOfRange {
                offset,
                len,
                size: self.spec.size_bytes,
            });
        }
        Ok(())
    }

    fn object(&self, stripe: u64, pos: usize) -> ObjectKey {
        ObjectKey {
            volume: self.spec.id,
            stripe,
            shard: pos as u32,
        }
    }

    /// The servers of a stripe's positions (computed once per placement group and map).
    fn placement(&self, stripe: u64) -> Result<Vec<u64>> {
        let group = placement::group_of(self.spec.id, stripe, self.spec.pg_count)?;
        let mut c = self.cluster.lock().expect("poisoned");
        if let Some(p) = c.groups.get(&group) {
            return Ok(p.clone());
        }
        let p = placement::place_group(
            self.spec.id,
            group,
            self.spec.profile.width(),
            &c.servers,
            self.spec.level,
            &self.spec.members,
        )?;
        c.groups.insert(group, p.clone());
        Ok(p)
    }

    fn client(&self, server: u64) -> Result<BlockClient> {
        self.cluster
            .lock()
            .expect("poisoned")
            .clients
            .get(&server)
            .cloned()
            .ok_or(VolumeError::UnknownServer { server })
    }

    fn reachable(&self, server: u64) -> bool {
        // A server the map says is down is not tried (it may still hold positions no other
        // domain could take over; those shards are unavailable until it is back or replaced).
        if self
            .cluster
            .lock()
            .expect("poisoned")
            .down
            .contains(&server)
        {
            return false;
        }
        let mut u = self.unreachable.lock().expect("poisoned");
        match u.get(&server) {
            Some(t) if t.elapsed() < RETRY_UNREACHABLE => false,
            Some(_) => {
                // Tried again from now on.
                u.remove(&server);
                true
            }
            None => true,
        }
    }

    /// Whether a server failed since the last complete verification pass (see
    /// `Volume::unverified`); the volume is not known to be fully redundant until it is false.
    pub fn unverified(&self) -> bool {
        self.unverified.load(Ordering::Acquire)
    }

    /// Runs a verification pass if a server failed since the last one and every server it
    /// failed on is being tried again; the pass must reach every position to count.
    async fn verify(&self) {
        let waiting = self
            .unreachable
            .lock()
            .expect("poisoned")
            .values()
            .any(|t| t.elapsed() < RETRY_UNREACHABLE);
        if waiting {
            return;
        }
        // A pass already running: verify at a later turn (the background task must not wait
        // here, its flushes keep writes going).
        let Ok(_one_pass) = self.pass_lock.try_lock() else {
            return;
        };
        if !self.unverified.swap(false, Ordering::AcqRel) {
            return;
        }
        match self.repair_all_locked(0).await {
            Ok(r) if r.deferred == 0 => {
                tracing::debug!(volume = self.spec.id, ?r, "verified after a server failure");
            }
            _ => self.unverified.store(true, Ordering::Release),
        }
    }

    /// Forgets which servers were unreachable, so the next I/O tries them at once (they are
    /// otherwise retried after a short back-off).
    pub fn retry_unreachable(&self) {
        self.unreachable.lock().expect("poisoned").clear();
    }

    /// Notes what a shard error says about the server; returns a fencing error if any.
    fn note_error(&self, server: u64, e: &ShardError) -> Result<()> {
        match e {
            ShardError::Transport { .. } | ShardError::Protocol { .. } => {
                self.unreachable
                    .lock()
                    .expect("poisoned")
                    .insert(server, Instant::now());
                self.unverified.store(true, Ordering::Release);
            }
            ShardError::Status {
                status: pb::Status::StaleEpoch,
                ..
            } => {
                self.fenced.store(true, Ordering::Release);
                return Err(VolumeError::Fenced {
                    volume: self.spec.id,
                    epoch: self.epoch,
                });
            }
            ShardError::Status {
                status: pb::Status::ChecksumMismatch,
                ..
            } => {
                self.stats.checksum_errors.fetch_add(1, Ordering::Relaxed);
            }
            ShardError::Status { .. } => {}
        }
        Ok(())
    }

    async fn lock_stripe(&self, stripe: u64) -> tokio::sync::OwnedMutexGuard<()> {
        lock_in(&self.locks, stripe).await
    }

    /// Stats every position of a stripe (a fresh view).
    async fn learn(&self, stripe: u64, servers: &[u64]) -> Result<Vec<Option<ObjectInfo>>> {
        let futs = servers.iter().enumerate().map(|(pos, &srv)| async move {
            if !self.reachable(srv) {
                return Ok(None);
            }
            let client = self.client(srv)?;
            match client.stat(&[self.object(stripe, pos)], self.epoch).await {
                Ok(mut infos) if infos.len() == 1 => Ok(infos.pop()),
                Ok(_) => Ok(None),
                Err(e) => {
                    self.note_error(srv, &e)?;
                    Ok(None)
                }
            }
        });
        join_all(futs).await.into_iter().collect()
    }

    async fn view(&self, stripe: u64, servers: &[u64]) -> Result<StripeView> {
        if let Some(v) = self.views.lock().expect("poisoned").get(&stripe) {
            return Ok(v.clone());
        }
        let infos = self.learn(stripe, servers).await?;
        let view = reconcile::assess(self.spec.profile, &infos);
        self.remember(stripe, view.clone());
        Ok(view)
    }

    fn remember(&self, stripe: u64, view: StripeView) {
        let mut views = self.views.lock().expect("poisoned");
        if views.len() >= MAX_CACHED_STRIPES {
            // Whole stripes can be re-learned; the stale positions are what this writer
            // knows and the shards may not tell (see `Volume::assess_known`): they stay.
            views.retain(|_, v| v.stale != 0);
        }
        views.insert(stripe, view);
    }

    /// A stripe's view from freshly learned `infos`, keeping what this writer knows. While
    /// some position did not answer, the shards that hold a write may be the silent ones,
    /// and the rest can agree on the state before it (a write that skipped a data shard and
    /// a parity, both away, lives only on the other parity): a position the cached view
    /// expects at a newer version than the answers show stays stale at that version until
    /// every position answers (found by the live chaos run: the heal and scrub tasks
    /// re-learned stripes while a lossy WAN link made edge servers flap, and served the old
    /// bytes of an acknowledged write).
    fn assess_known(&self, stripe: u64, infos: &[Option<ObjectInfo>]) -> StripeView {
        let mut view = reconcile::assess(self.spec.profile, infos);
        if infos.iter().all(Option::is_some) {
            return view;
        }
        if let Some(known) = self.views.lock().expect("poisoned").get(&stripe) {
            for (p, &v) in known.expected.iter().enumerate() {
                if v > view.expected[p] {
                    view.expected[p] = v;
                    view.set_stale(p, true);
                }
            }
        }
        view
    }

    // ---- Reads ----

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.check()?;
        self.check_range(offset, len)?;
        let start = offset / BLOCK_BYTES as u64 * BLOCK_BYTES as u64;
        let end = (offset + len).div_ceil(BLOCK_BYTES as u64) * BLOCK_BYTES as u64;
        let segs = self.layout.segments(start, end - start);
        let groups = Layout::by_stripe(&segs);
        let parts = join_all(
            groups
                .iter()
                .map(|(stripe, r)| self.read_stripe(*stripe, &segs[r.clone()])),
        )
        .await;
        let mut pieces = Vec::new();
        for p in parts {
            pieces.extend(p?);
        }
        let skip = (offset - start) as usize;
        // A read within one shard (most small reads) is the shard's bytes as they came.
        if pieces.len() == 1 {
            return Ok(pieces[0].slice(skip..skip + len as usize));
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for b in &pieces {
            out.extend_from_slice(b);
        }
        Ok(out.freeze().slice(skip..skip + len as usize))
    }

    async fn read_stripe(&self, stripe: u64, segs: &[Segment]) -> Result<Vec<Bytes>> {
        let _g = self.lock_stripe(stripe).await;
        self.settle_if_suspect(stripe).await?;
        let servers = self.placement(stripe)?;
        let mut view = self.view(stripe, &servers).await?;
        let reads = segs
            .iter()
            .map(|s| self.read_shard(stripe, &servers, &view, s.shard, s.shard_offset, s.len));
        let results = join_all(reads).await;
        let mut out = Vec::with_capacity(segs.len());
        let mut changed = false;
        for (s, r) in segs.iter().zip(results) {
            match r? {
                Some(b) => out.push(b),
                None => {
                    changed = true;
                    view.set_stale(s.shard, true);
                    self.stats.degraded_reads.fetch_add(1, Ordering::Relaxed);
                    let mut shards = self
                        .gather(
                            stripe,
                            &servers,
                            &mut view,
                            s.shard_offset,
                            s.len,
                            &[s.shard],
                        )
                        .await?;
                    out.push(Bytes::from(shards[s.shard].take().expect("reconstructed")));
                }
            }
        }
        if changed {
            self.remember(stripe, view);
        }
        Ok(out)
    }

    /// Reads one position's range if it is current and answers with the expected version;
    /// `None` when it must be read around.
    async fn read_shard(
        &self,
        stripe: u64,
        servers: &[u64],
        view: &StripeView,
        pos: usize,
        offset: u32,
        len: u32,
    ) -> Result<Option<Bytes>> {
        if view.is_stale(pos) || !self.reachable(servers[pos]) {
            return Ok(None);
        }
        let client = self.client(servers[pos])?;
        match client
            .read(self.object(stripe, pos), offset, len, self.epoch)
            .await
        {
            Ok(r) if r.version == view.expected[pos] => Ok(Some(r.data)),
            Ok(r) => {
                tracing::debug!(volume = self.spec.id, stripe, pos, got = %r.version, expected = %view.expected[pos], "shard read: unexpected version");
                Ok(None)
            }
            Err(e) => {
                tracing::debug!(volume = self.spec.id, stripe, pos, error = %e, "shard read failed");
                if e.status() == Some(pb::Status::ChecksumMismatch) {
                    self.corrupt.lock().expect("poisoned").insert((stripe, pos));
                }
                self.note_error(servers[pos], &e)?;
                Ok(None)
            }
        }
    }

    // ---- Writes ----

    /// Writes `data` at `offset`; with `fua`, durable on every shard before it returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let b = BLOCK_BYTES as u64;
        let end = offset + data.len() as u64;
        if offset.is_multiple_of(b) && end.is_multiple_of(b) {
            return self
                .write_aligned(offset, Some(data.clone()), data.len() as u64, fua)
                .await;
        }
        // A sub-block write reads, merges and writes its edge blocks: two such writes to
        // different bytes of one block must not both start from the old block, or one's
        // bytes are lost. Edge blocks are locked in ascending order (no deadlock).
        let (first, last) = (offset / b, (end - 1) / b);
        let _g1 = lock_in(&self.rmw_locks, first).await;
        let _g2 = if last != first {
            Some(lock_in(&self.rmw_locks, last).await)
        } else {
            None
        };
        let (start, data) = self.align(offset, data).await?;
        self.write_aligned(start, Some(data.clone()), data.len() as u64, fua)
            .await
    }

    /// Makes `[offset, offset+len)` read as zeros and stop using space (NBD TRIM and
    /// WRITE_ZEROES). Unaligned edges are written as zero bytes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check()?;
        self.check_range(offset, len)?;
        let b = BLOCK_BYTES as u64;
        let (start, end) = (offset.div_ceil(b) * b, (offset + len) / b * b);
        if start >= end {
            return self
                .write(offset, Bytes::from(vec![0u8; len as usize]), fua)
                .await;
        }
        if offset < start {
            self.write(
                offset,
                Bytes::from(vec![0u8; (start - offset) as usize]),
                fua,
            )
            .await?;
        }
        if offset + len > end {
            self.write(
                end,
                Bytes::from(vec![0u8; (offset + len - end) as usize]),
                fua,
            )
            .await?;
        }
        self.write_aligned(start, None, end - start, fua).await
    }

    /// Widens an unaligned write to 4 KiB blocks by reading the edges.
    async fn align(&self, offset: u64, data: Bytes) -> Result<(u64, Bytes)> {
        let b = BLOCK_BYTES as u64;
        let start = offset / b * b;
        let end = (offset + data.len() as u64).div_ceil(b) * b;
        if start == offset && end == offset + data.len() as u64 {
            return Ok((offset, data));
        }
        let mut buf = BytesMut::from(&self.read(start, end - start).await?[..]);
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(&data);
        Ok((start, buf.freeze()))
    }

    /// `data: None` writes zeros (freeing space).
    async fn write_aligned(
        &self,
        offset: u64,
        data: Option<Bytes>,
        len: u64,
        fua: bool,
    ) -> Result<()> {
        let segs = self.layout.segments(offset, len);
        let groups = Layout::by_stripe(&segs);
        let payloads_of = |segs: &[Segment]| -> Vec<Option<Bytes>> {
            segs.iter()
                .map(|s| {
                    data.as_ref().map(|d| {
                        let at = (s.volume_offset - offset) as usize;
                        d.slice(at..at + s.len as usize)
                    })
                })
                .collect()
        };
        // A small write (bytes within one stripe, not all of it, no FUA) is written behind.
        if let [(stripe, r)] = groups.as_slice() {
            let segs = &segs[r.clone()];
            let partial = self.layout.plan(segs) != crate::layout::WritePlan::FullStripe;
            if !fua && data.is_some() && partial {
                if let Some(me) = self.me.upgrade() {
                    return me
                        .write_behind(*stripe, segs.to_vec(), payloads_of(segs))
                        .await;
                }
            }
        }
        let results = join_all(groups.iter().map(|(stripe, r)| {
            let segs = &segs[r.clone()];
            let payloads = payloads_of(segs);
            async move {
                self.write_stripe(*stripe, segs, payloads, fua, &mut None)
                    .await
            }
        }))
        .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// A partial-stripe write acknowledged once its data shards took the new bytes, before
    /// its parity deltas are written (half the round trips a caller waits for). It is not
    /// durable yet, as no write without FUA is until a flush (DESIGN.md invariant 3):
    /// - the rest runs in a task that holds the stripe's lock and the new bytes, so reads of
    ///   the stripe (degraded ones included) wait for it, and a shard lost meanwhile is
    ///   written around as in any write;
    /// - [`Volume::flush`] first waits for every write behind acknowledged before it;
    /// - one that fails after its acknowledgement marks the writes lost (`lost`): the next
    ///   flush asked for fails with [`VolumeError::WritesLost`];
    /// - at most [`MAX_WRITE_BEHIND`] are unfinished at once (later writes wait for a slot).
    ///
    /// A write whose touched shards are not all current is answered only once it is done.
    async fn write_behind(
        self: Arc<Self>,
        stripe: u64,
        segs: Vec<Segment>,
        payloads: Vec<Option<Bytes>>,
    ) -> Result<()> {
        let slot = self
            .behind
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let id = self.behind.start();
        let asked = self.lost.asked();
        let (tx, acked) = tokio::sync::oneshot::channel();
        let me = self.clone();
        let task = tokio::spawn(async move {
            // Finishes the write behind however the task ends (a panic too: a flush must not
            // wait for it forever, and an acknowledged write it did not finish is lost).
            let mut end = BehindEnd {
                vol: me.clone(),
                id,
                asked,
                ok: false,
                _slot: slot,
            };
            let mut ack = Some(tx);
            let r = me
                .write_stripe(stripe, &segs, payloads, false, &mut ack)
                .await;
            end.ok = r.is_ok() || ack.is_some();
            if let (Err(e), None) = (&r, &ack) {
                tracing::warn!(volume = me.spec.id, stripe, error = %e, "a write acknowledged before its parity was written failed");
            }
            r
        });
        match acked.await {
            Ok(()) => Ok(()),
            // Done (or failed) before an early acknowledgement: its own result.
            Err(_) => match task.await {
                Ok(r) => r,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is shutting down: the writer stops as in a crash.
                Err(_) => Err(VolumeError::Crashed {
                    volume: self.spec.id,
                }),
            },
        }
    }

    fn next_version(&self) -> Version {
        Version::new(self.epoch, self.seq.fetch_add(1, Ordering::Relaxed))
    }

    fn take_piggyback(&self, server: u64) -> Vec<(ObjectKey, Version)> {
        let mut q = self.to_stabilize.lock().expect("poisoned");
        match q.get_mut(&server) {
            Some(list) => {
                let n = list.len().min(MAX_PIGGYBACK);
                list.drain(..n).collect()
            }
            None => Vec::new(),
        }
    }

    /// Sends one shard write unless the crash failpoint says the writer died before it.
    async fn send_write(
        &self,
        server: u64,
        w: &ShardWrite,
        budget: &AtomicUsize,
    ) -> Result<std::result::Result<crate::store::WriteOutcome, ShardError>> {
        // A crashed writer sends nothing more (its other stripe writes stop too).
        if self.crashed.load(Ordering::Acquire) {
            return Err(VolumeError::Crashed {
                volume: self.spec.id,
            });
        }
        if self
            .failpoints
            .crash_after_shard_writes
            .load(Ordering::Relaxed)
            > 0
        {
            let left = budget.fetch_sub(1, Ordering::AcqRel);
            if left == 0 {
                budget.store(0, Ordering::Release);
                self.crashed.store(true, Ordering::Release);
                return Err(VolumeError::Crashed {
                    volume: self.spec.id,
                });
            }
        }
        let client = self.client(server)?;
        let piggy = self.take_piggyback(server);
        let r = client.write(&w.req, w.payload.clone(), &piggy).await;
        if r.is_err() {
            // Not delivered (or unknown): queue them again.
            let mut q = self.to_stabilize.lock().expect("poisoned");
            q.entry(server).or_default().extend(piggy);
        }
        self.dirty.lock().expect("poisoned").insert(server);
        Ok(r)
    }

    /// With `ack`, a partial write sends on it as soon as every touched data shard took the
    /// new bytes (see [`Volume::write_behind`]); the write goes on to its end either way.
    async fn write_stripe(
        &self,
        stripe: u64,
        segs: &[Segment],
        payloads: Vec<Option<Bytes>>,
        fua: bool,
        ack: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<()> {
        let _g = self.lock_stripe(stripe).await;
        let servers = self.placement(stripe)?;
        // A shard that fails mid-write is rolled back on the others and the write is redone
        // without it (at most once per position).
        for _ in 0..=self.spec.profile.width() {
            self.check()?;
            self.settle_if_suspect(stripe).await?;
            let view = self.view(stripe, &servers).await?;
            if self
                .write_stripe_once(stripe, segs, &payloads, fua, &servers, view, ack)
                .await?
            {
                return Ok(());
            }
        }
        let view = self.view(stripe, &servers).await?;
        Err(VolumeError::Unavailable {
            volume: self.spec.id,
            stripe,
            current: view.current(),
            needed: self.spec.profile.data,
        })
    }

    /// One attempt at a stripe write; `Ok(false)` when a shard failed and the attempt was
    /// undone (the caller retries with that shard marked stale).
    #[allow(clippy::too_many_arguments)]
    async fn write_stripe_once(
        &self,
        stripe: u64,
        segs: &[Segment],
        payloads: &[Option<Bytes>],
        fua: bool,
        servers: &[u64],
        mut view: StripeView,
        ack: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<bool> {
        let k = self.spec.profile.data;
        let width = self.spec.profile.width();
        let version = self.next_version();
        let budget = AtomicUsize::new(
            self.failpoints
                .crash_after_shard_writes
                .load(Ordering::Relaxed),
        );
        // The parity range: the union of the touched ranges.
        let r_start = segs.iter().map(|s| s.shard_offset).min().unwrap_or(0);
        let r_end = segs
            .iter()
            .map(|s| s.shard_offset + s.len)
            .max()
            .unwrap_or(0);
        let r_len = (r_end - r_start) as usize;
        let touched: Vec<usize> = segs.iter().map(|s| s.shard).collect();
        let mut write_set: u32 = (k..width).map(|p| 1u32 << p).sum();
        for &t in &touched {
            write_set |= 1 << t;
        }
        let full = self.layout.plan(segs) == crate::layout::WritePlan::FullStripe;
        let old_view = view.clone();
        // Widens a segment's bytes to the parity range (zeros outside the segment).
        let widen = |i: usize, bytes: Option<&[u8]>| -> Vec<u8> {
            let s = &segs[i];
            let mut out = vec![0u8; r_len];
            if let Some(b) = bytes {
                let at = (s.shard_offset - r_start) as usize;
                out[at..at + s.len as usize].copy_from_slice(b);
            }
            out
        };

        // Phase 0 (partial writes): old bytes of touched shards that cannot return them are
        // reconstructed from the stripe as it is.
        let mut olds: HashMap<usize, Bytes> = HashMap::new();
        let missing: Vec<usize> = touched
            .iter()
            .copied()
            .filter(|&t| view.is_stale(t) || !self.reachable(servers[t]))
            .collect();
        if !full && !missing.is_empty() {
            let mut pre = view.clone();
            let all = self
                .gather(stripe, servers, &mut pre, r_start, r_len as u32, &missing)
                .await?;
            for &m in &missing {
                let i = touched.iter().position(|&t| t == m).expect("touched");
                let at = (segs[i].shard_offset - r_start) as usize;
                let b = all[m].as_ref().expect("reconstructed");
                olds.insert(m, Bytes::copy_from_slice(&b[at..at + segs[i].len as usize]));
            }
            for &m in &missing {
                view.set_stale(m, true);
            }
        }

        // Phase 1: the current data shards, returning their old bytes for the parity deltas
        // (phase 2); a stripe rewritten whole sends its parity with them.
        let mut sent = Sent::default();
        let data_writes: Vec<ShardWrite> = segs
            .iter()
            .zip(payloads)
            .filter(|(s, _)| !view.is_stale(s.shard))
            .map(|(s, p)| {
                let (mode, payload, crcs) = match p {
                    Some(b) => (WriteMode::Data, b.clone(), checksum::compute(b)),
                    None => (WriteMode::Zero, Bytes::new(), Vec::new()),
                };
                ShardWrite {
                    pos: s.shard,
                    req: WriteReq {
                        object: self.object(stripe, s.shard),
                        epoch: self.epoch,
                        version,
                        base: view.expected[s.shard],
                        mode,
                        offset: s.shard_offset,
                        length: s.len,
                        crcs,
                        fua,
                        write_set,
                        data_base: vec![],
                        data_after: vec![],
                        return_old: !full,
                    },
                    payload,
                }
            })
            .collect();
        // Parity, from the new data (full stripe) or from the deltas of the old bytes.
        let parity_writes =
            |olds: &HashMap<usize, Bytes>, view: &StripeView| -> Result<Vec<ShardWrite>> {
                let parity: Vec<Vec<u8>> = if full {
                    // When every data shard's bytes cover the whole range (large writes), they are
                    // encoded in place; only partial or zeroed shards are widened into copies.
                    let covers = |i: usize| {
                        segs[i].shard_offset == r_start
                            && segs[i].len as usize == r_len
                            && payloads[i].is_some()
                    };
                    let widened: Vec<Option<Vec<u8>>> = (0..k)
                        .map(|i| (!covers(i)).then(|| widen(i, payloads[i].as_deref())))
                        .collect();
                    let refs: Vec<&[u8]> = (0..k)
                        .map(|i| match (&widened[i], &payloads[i]) {
                            (Some(w), _) => w.as_slice(),
                            (None, Some(b)) => &b[..],
                            (None, None) => unreachable!("covered shards have bytes"),
                        })
                        .collect();
                    let mut p = vec![vec![0u8; r_len]; width - k];
                    let mut prefs: Vec<&mut [u8]> = p.iter_mut().map(Vec::as_mut_slice).collect();
                    self.codec.encode(&refs, &mut prefs)?;
                    p
                } else {
                    let mut delta = vec![vec![0u8; r_len]; width - k];
                    for (i, s) in segs.iter().enumerate() {
                        let o = widen(i, Some(&olds[&s.shard]));
                        let zeros = vec![0u8; s.len as usize];
                        let n = widen(i, Some(payloads[i].as_deref().unwrap_or(&zeros)));
                        let mut refs: Vec<&mut [u8]> =
                            delta.iter_mut().map(Vec::as_mut_slice).collect();
                        self.codec.apply_delta(s.shard, &o, &n, &mut refs)?;
                    }
                    delta
                };
                // Shared, not copied, by the parity writes (and a retry of them).
                let parity: Vec<Bytes> = parity.into_iter().map(Bytes::from).collect();
                let data_base: Vec<(u32, Version)> = touched
                    .iter()
                    .map(|&t| (t as u32, old_view.expected[t]))
                    .collect();
                let data_after: Vec<(u32, Version)> =
                    touched.iter().map(|&t| (t as u32, version)).collect();
                let parity_writes: Vec<ShardWrite> = (k..width)
                    .filter(|&pos| !view.is_stale(pos))
                    .map(|pos| {
                        let payload = parity[pos - k].clone();
                        ShardWrite {
                            pos,
                            req: WriteReq {
                                object: self.object(stripe, pos),
                                epoch: self.epoch,
                                version,
                                base: old_view.expected[pos],
                                mode: if full {
                                    WriteMode::Data
                                } else {
                                    WriteMode::Xor
                                },
                                offset: r_start,
                                length: r_len as u32,
                                crcs: checksum::compute(&payload),
                                fua,
                                write_set,
                                data_base: if full { vec![] } else { data_base.clone() },
                                data_after: data_after.clone(),
                                return_old: false,
                            },
                            payload,
                        }
                    })
                    .collect();
                Ok(parity_writes)
            };
        let mut failed = if full {
            // Nothing to wait for: the data and the parity go out at once (one round trip).
            let mut writes = data_writes;
            writes.extend(parity_writes(&olds, &view)?);
            self.send_all(servers, &writes, &budget, &mut sent, |_, _| {})
                .await?
        } else {
            self.send_all(servers, &data_writes, &budget, &mut sent, |pos, old| {
                if let Some(old) = old {
                    olds.insert(pos, old);
                }
            })
            .await?
        };
        let data_failed: Vec<usize> = failed.iter().copied().filter(|&p| p < k).collect();
        if !data_failed.is_empty() {
            // A mismatch: some shard is not where the view says; the retry re-learns it.
            let relearn = sent.mismatched;
            return self
                .redo_later(
                    stripe,
                    servers,
                    version,
                    &sent,
                    old_view,
                    &data_failed,
                    relearn,
                )
                .await;
        }
        if !full {
            // Every data shard is current and the touched ones hold the new bytes: k shards
            // of the new state, so a write behind is acknowledged now (the writer keeps the
            // bytes until the parity has them too).
            if missing.is_empty() && (0..k).all(|p| !view.is_stale(p)) {
                if let Some(a) = ack.take() {
                    let _ = a.send(());
                }
            }
            self.failpoints.parity_gate().await;
            // Phase 2 of a partial write: the deltas need the old bytes phase 1 returned.
            let writes = parity_writes(&olds, &view)?;
            failed = self
                .send_all(servers, &writes, &budget, &mut sent, |_, _| {})
                .await?;
        }
        if sent.mismatched {
            // A parity is not where the view says, so the untouched data shards may not be
            // either (a server lost power and writes it had not flushed): counting them as
            // current could acknowledge a write that fewer than k shards hold. Undone, and
            // redone once the stripe is re-learned (without the refusing parities if it
            // cannot be).
            return self
                .redo_later(stripe, servers, version, &sent, old_view, &failed, true)
                .await;
        }
        for f in failed {
            view.set_stale(f, true);
        }
        // Every position of the write set should now hold `version`.
        for pos in 0..width {
            if write_set & (1 << pos) != 0 {
                view.expected[pos] = version;
            }
        }
        if view.current() < k {
            self.undo(stripe, servers, version, &sent.acked).await;
            let current = view.current();
            self.remember(stripe, old_view);
            return Err(VolumeError::Unavailable {
                volume: self.spec.id,
                stripe,
                current,
                needed: k,
            });
        }
        if !self
            .untouched_still_hold(stripe, servers, &view, write_set)
            .await?
        {
            // One lost a version no flush had covered (its server lost power unseen): the
            // write is undone and redone once the stripe is re-learned.
            return self
                .redo_later(stripe, servers, version, &sent, old_view, &[], true)
                .await;
        }
        self.note_unflushed(sent.acked.iter().map(|&pos| {
            (
                servers[pos],
                self.object(stripe, pos),
                version,
                sent.incarnation[&pos],
            )
        }));
        self.remember(stripe, view);
        Ok(true)
    }

    /// Gives up one attempt at a stripe write (`Ok(false)`: the caller retries): undoes what
    /// shards took, keeps the view from before with the `failed` positions stale, and with
    /// `relearn` has the stripe settled before the retry.
    #[allow(clippy::too_many_arguments)]
    async fn redo_later(
        &self,
        stripe: u64,
        servers: &[u64],
        version: Version,
        sent: &Sent,
        mut view: StripeView,
        failed: &[usize],
        relearn: bool,
    ) -> Result<bool> {
        self.undo(stripe, servers, version, &sent.acked).await;
        for &f in failed {
            view.set_stale(f, true);
        }
        self.remember(stripe, view);
        if relearn {
            self.mark_suspect(None, [stripe]);
        }
        Ok(false)
    }

    /// Whether a write may count the untouched data shards it relies on. Those whose
    /// version no flush has covered yet may have lost it in a power loss this writer has not
    /// seen (a block client reconnects silently): when the write's k current shards need
    /// them, they are asked for their versions first. Otherwise (most writes: both parities
    /// took it) the shards that took the write and the durable ones make k on their own.
    async fn untouched_still_hold(
        &self,
        stripe: u64,
        servers: &[u64],
        view: &StripeView,
        write_set: u32,
    ) -> Result<bool> {
        let k = self.spec.profile.data;
        let untouched: Vec<usize> = (0..k)
            .filter(|&p| write_set & (1 << p) == 0 && !view.is_stale(p))
            .collect();
        if view.current() - untouched.len() >= k {
            return Ok(true);
        }
        let waiting: Vec<usize> = {
            let u = self.unflushed.lock().expect("poisoned");
            untouched
                .iter()
                .copied()
                .filter(|&p| {
                    let object = self.object(stripe, p);
                    u.get(&servers[p]).is_some_and(|list| {
                        list.iter()
                            .any(|(o, v, _)| *o == object && *v == view.expected[p])
                    })
                })
                .collect()
        };
        if view.current() - waiting.len() >= k {
            return Ok(true);
        }
        let asked = join_all(waiting.iter().map(|&p| async move {
            let client = self.client(servers[p])?;
            match client.stat(&[self.object(stripe, p)], self.epoch).await {
                Ok(infos) => Ok(infos.first().map(|i| i.version) == Some(view.expected[p])),
                Err(e) => self.note_error(servers[p], &e).map(|()| false),
            }
        }))
        .await;
        for held in asked {
            if !held? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Sends shard writes in parallel (skipping unreachable servers). Acked positions are
    /// noted in `sent` and their old bytes passed to `on_ok`; returns the positions that
    /// failed. A fencing refusal is an error.
    async fn send_all(
        &self,
        servers: &[u64],
        writes: &[ShardWrite],
        budget: &AtomicUsize,
        sent: &mut Sent,
        mut on_ok: impl FnMut(usize, Option<Bytes>),
    ) -> Result<Vec<usize>> {
        let mut failed: Vec<usize> = writes
            .iter()
            .filter(|w| !self.reachable(servers[w.pos]))
            .map(|w| w.pos)
            .collect();
        let sendable: Vec<&ShardWrite> =
            writes.iter().filter(|w| !failed.contains(&w.pos)).collect();
        let results = join_all(
            sendable
                .iter()
                .map(|w| self.send_write(servers[w.pos], w, budget)),
        )
        .await;
        let mut fence = None;
        for (w, r) in sendable.iter().zip(results) {
            match r? {
                Ok(out) => {
                    self.observe_incarnation(servers[w.pos], out.incarnation);
                    sent.acked.push(w.pos);
                    sent.incarnation.insert(w.pos, out.incarnation);
                    on_ok(w.pos, out.old);
                }
                Err(e) => {
                    tracing::debug!(volume = self.spec.id, object = %w.req.object, version = %w.req.version, error = %e, "shard write failed");
                    failed.push(w.pos);
                    if e.status() == Some(pb::Status::VersionMismatch) {
                        sent.mismatched = true;
                    }
                    if let Err(f) = self.note_error(servers[w.pos], &e) {
                        fence = Some(f);
                    }
                }
            }
        }
        match fence {
            Some(f) => Err(f),
            None => Ok(failed),
        }
    }

    /// Reads `[offset, offset+len)` of enough current positions to reconstruct `want` and
    /// returns every position's bytes. Positions that fail or answer with an unexpected version
    /// are marked stale in `view`.
    async fn gather(
        &self,
        stripe: u64,
        servers: &[u64],
        view: &mut StripeView,
        offset: u32,
        len: u32,
        want: &[usize],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let k = self.spec.profile.data;
        let width = self.spec.profile.width();
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; width];
        let mut tried = vec![false; width];
        loop {
            let have = shards.iter().filter(|s| s.is_some()).count();
            if have >= k {
                break;
            }
            let candidates: Vec<usize> = (0..width)
                .filter(|&p| !tried[p] && !want.contains(&p) && !view.is_stale(p))
                .take(k - have)
                .collect();
            if candidates.is_empty() {
                return Err(VolumeError::Unavailable {
                    volume: self.spec.id,
                    stripe,
                    current: have,
                    needed: k,
                });
            }
            let results = join_all(
                candidates
                    .iter()
                    .map(|&p| self.read_shard(stripe, servers, view, p, offset, len)),
            )
            .await;
            for (&p, r) in candidates.iter().zip(results) {
                tried[p] = true;
                match r? {
                    Some(b) => shards[p] = Some(b.to_vec()),
                    None => view.set_stale(p, true),
                }
            }
        }
        for w in want {
            shards[*w] = None;
        }
        self.codec.reconstruct(&mut shards)?;
        Ok(shards)
    }

    /// Rolls `version` back on the positions that took it (best effort; reconciliation by
    /// the next writer finishes what fails here).
    async fn undo(&self, stripe: u64, servers: &[u64], version: Version, acked: &[usize]) {
        let futs = acked.iter().map(|&pos| async move {
            let Ok(c) = self.client(servers[pos]) else {
                return;
            };
            if let Err(e) = c
                .rollback(self.epoch, &[(self.object(stripe, pos), version)])
                .await
            {
                let _ = self.note_error(servers[pos], &e);
            }
        });
        join_all(futs).await;
        self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends queued stabilizations to their servers.
    pub async fn send_stabilizations(&self) {
        let queued: Vec<(u64, Vec<(ObjectKey, Version)>)> =
            std::mem::take(&mut *self.to_stabilize.lock().expect("poisoned"))
                .into_iter()
                .collect();
        let futs = queued.into_iter().map(|(srv, list)| async move {
            if list.is_empty() {
                return;
            }
            let sent = match self.client(srv) {
                Ok(c) => c.stabilize(self.epoch, &list).await.map_err(|e| {
                    let _ = self.note_error(srv, &e);
                }),
                Err(_) => Err(()),
            };
            if sent.is_err() {
                self.to_stabilize
                    .lock()
                    .expect("poisoned")
                    .entry(srv)
                    .or_default()
                    .extend(list);
            }
        });
        join_all(futs).await;
    }

    /// Notes shard versions that servers acknowledged (not yet durable): (server, object,
    /// version, the server's incarnation in its answer).
    ///
    /// A flush may have taken a server's `dirty` mark between the server's answer and this
    /// note (a write behind notes its versions only once its parity is written): the server
    /// is marked dirty again, so the next flush covers it, and a version whose server has
    /// answered with another incarnation since makes its stripe suspect at once (that flush
    /// did not know the version, so it could not see it lost).
    fn note_unflushed(&self, versions: impl IntoIterator<Item = (u64, ObjectKey, Version, u64)>) {
        let mut due = false;
        let mut gone: Vec<(u64, u64)> = Vec::new();
        {
            // In the flush's lock order: `unflushed` before `dirty`.
            let seen = self.incarnations.lock().expect("poisoned");
            let mut u = self.unflushed.lock().expect("poisoned");
            let mut noted = self.noted.lock().expect("poisoned");
            let mut dirty = self.dirty.lock().expect("poisoned");
            for (srv, object, version, incarnation) in versions {
                if seen.get(&srv).is_some_and(|&now| now != incarnation) {
                    gone.push((srv, object.stripe));
                    continue;
                }
                dirty.insert(srv);
                u.entry(srv)
                    .or_default()
                    .push((object, version, incarnation));
                noted.0 += 1;
                let per_object = noted.1.entry(object).or_default();
                *per_object += 1;
                due |= *per_object == STABILIZE_FLUSH_HOT || noted.0 == STABILIZE_FLUSH_AT;
            }
        }
        for (srv, stripe) in gone {
            self.mark_suspect(Some(srv), [stripe]);
        }
        if due {
            self.flush_soon.notify_one();
        }
    }

    /// Notes that acknowledged writes may be lost (see [`LostReport::mark`]).
    fn mark_lost(&self, after: Option<u64>) {
        self.lost.mark(after);
    }

    /// Flushes one server: its incarnation, or `None` when it failed (noted; a fencing
    /// refusal is an error).
    async fn flush_server(&self, srv: u64) -> Result<Option<u64>> {
        match self.client(srv)?.flush().await {
            Ok(incarnation) => {
                self.observe_incarnation(srv, incarnation);
                Ok(Some(incarnation))
            }
            Err(e) => self.note_error(srv, &e).map(|()| None),
        }
    }

    /// Notes that `srv` answered as `incarnation`. Another one than last time means the
    /// server lost power since (`Store::incarnation`), or its store was made anew: what
    /// other incarnations took and no flush covered may be gone. (Two answers handled out of
    /// order around a restart only make a stripe suspect for nothing.)
    fn observe_incarnation(&self, srv: u64, incarnation: u64) {
        let changed = {
            let mut seen = self.incarnations.lock().expect("poisoned");
            seen.insert(srv, incarnation)
                .is_some_and(|known| known != incarnation)
        };
        if changed {
            let gone: Vec<u64> = {
                let mut u = self.unflushed.lock().expect("poisoned");
                let mut gone = Vec::new();
                if let Some(list) = u.get_mut(&srv) {
                    list.retain(|(object, _, i)| {
                        let keep = *i == incarnation;
                        if !keep {
                            gone.push(object.stripe);
                        }
                        keep
                    });
                    if list.is_empty() {
                        u.remove(&srv);
                    }
                }
                gone
            };
            self.mark_suspect(Some(srv), gone);
        }
    }

    /// Marks stripes to be settled before their next I/O (`Volume::suspect`), with the
    /// server that lost versions of them (`None`: the cached view was found wrong).
    fn mark_suspect(&self, server: Option<u64>, stripes: impl IntoIterator<Item = u64>) {
        let m = self.spec.profile.parity;
        let mut marked = 0usize;
        let mut losing: Vec<(u64, BTreeSet<u64>)> = Vec::new();
        let mut suspect = self.suspect.lock().expect("poisoned");
        for stripe in stripes {
            let entry = suspect.entry(stripe).or_default();
            entry.marks += 1;
            if let Some(srv) = server {
                if entry.lost_on.insert(srv) {
                    losing.push((stripe, entry.lost_on.clone()));
                }
            }
            marked += 1;
        }
        drop(suspect);
        // More than m shards of a stripe may have lost what this writer wrote (counting those
        // it already lacked): acknowledged writes may be gone.
        if losing
            .iter()
            .any(|(stripe, lost_on)| self.shortfall(*stripe, lost_on) > m)
        {
            self.mark_lost(None);
        }
        if let (Some(srv), true) = (server, marked > 0) {
            tracing::info!(
                volume = self.spec.id,
                server = srv,
                stripes = marked,
                "block server lost power before its writes were flushed; re-learning them"
            );
            self.unverified.store(true, Ordering::Release);
        }
    }

    /// How many shards of `stripe` do not hold its current state durably: those on `bad`
    /// servers (failed a flush, lost power) and those the cached view calls stale (without a
    /// view: those on servers out of reach).
    fn shortfall(&self, stripe: u64, bad: &BTreeSet<u64>) -> usize {
        let Ok(servers) = self.placement(stripe) else {
            return self.spec.profile.width();
        };
        let views = self.views.lock().expect("poisoned");
        if let Some(view) = views.get(&stripe) {
            return (0..servers.len())
                .filter(|&p| bad.contains(&servers[p]) || view.is_stale(p))
                .count();
        }
        drop(views);
        servers
            .iter()
            .filter(|&srv| bad.contains(srv) || !self.reachable(*srv))
            .count()
    }

    /// How many times `stripe` was marked suspect so far, and whether servers lost versions
    /// of it (`None`: it is not suspect).
    fn suspect_marks(&self, stripe: u64) -> Option<(u64, bool)> {
        self.suspect
            .lock()
            .expect("poisoned")
            .get(&stripe)
            .map(|s| (s.marks, !s.lost_on.is_empty()))
    }

    /// After a settle of `stripe` that began at `marks` ended in `view`: it stops being
    /// suspect once its positions on the servers that lost versions are current again, and
    /// no mark came while it ran (that one may not be reflected in `view`).
    fn settled(&self, stripe: u64, marks: Option<(u64, bool)>, servers: &[u64], view: &StripeView) {
        let mut suspect = self.suspect.lock().expect("poisoned");
        if let Some(s) = suspect.get(&stripe) {
            let whole = servers
                .iter()
                .enumerate()
                .all(|(p, srv)| !s.lost_on.contains(srv) || !view.is_stale(p));
            if whole && marks.is_some_and(|(m, _)| m == s.marks) {
                suspect.remove(&stripe);
            }
        }
    }

    /// Settles `stripe` first if it is suspect (the caller holds the stripe lock). Only a
    /// fencing or crash error is returned: otherwise the I/O goes on with what is known.
    /// Not while every server that lost its versions is out of reach (nothing to learn
    /// there yet: the I/O goes on degraded, and the flushes count them as failed).
    async fn settle_if_suspect(&self, stripe: u64) -> Result<()> {
        let lost_on = match self.suspect.lock().expect("poisoned").get(&stripe) {
            None => return Ok(()),
            Some(s) => s.lost_on.clone(),
        };
        if !lost_on.is_empty() && lost_on.iter().all(|&srv| !self.reachable(srv)) {
            return Ok(());
        }
        match self.settle_stripe(stripe).await {
            Ok(_) => Ok(()),
            Err(e @ (VolumeError::Fenced { .. } | VolumeError::Crashed { .. })) => Err(e),
            Err(e) => {
                tracing::debug!(volume = self.spec.id, stripe, error = %e, "suspect stripe not settled");
                Ok(())
            }
        }
    }

    /// Settles every suspect stripe (before a flush counts failures).
    async fn settle_suspects(&self) -> Result<()> {
        let stripes: Vec<u64> = self
            .suspect
            .lock()
            .expect("poisoned")
            .keys()
            .copied()
            .collect();
        for stripe in stripes {
            let _g = self.lock_stripe(stripe).await;
            self.settle_if_suspect(stripe).await?;
        }
        Ok(())
    }

    /// Everything written before is durable on every shard (NBD FLUSH). The shard versions
    /// this makes durable become stabilizable.
    ///
    /// Acknowledged while at most m servers failed it or lost power before their versions
    /// were durable (counted until the stripes they hold are settled again, so failures add
    /// up across flushes); once, with [`VolumeError::WritesLost`], after a stripe may have
    /// lost more than that.
    pub async fn flush(&self) -> Result<()> {
        self.flush_reporting(true).await
    }

    /// [`Volume::flush`]; only with `report` (a flush someone asked for) does it report lost
    /// writes: the background task's and a repair pass's flushes leave that to the next one.
    async fn flush_reporting(&self, report: bool) -> Result<()> {
        self.check()?;
        // Writes acknowledged before their parity was written are finished first (they are
        // then noted unflushed, or marked lost).
        let number = if report {
            let number = self.lost.flush_begins();
            self.behind.drain().await;
            self.check()?;
            number
        } else {
            0
        };
        let _one_at_a_time = self.flush_lock.lock().await;
        // Stripes whose servers lost power are re-learned first: what is whole again does
        // not count below.
        self.settle_suspects().await?;
        // Taken before `dirty`: a version is noted after its server was marked dirty, so every
        // version taken here has its server in this flush (or in an earlier one, finished).
        let unflushed = {
            let mut u = self.unflushed.lock().expect("poisoned");
            *self.noted.lock().expect("poisoned") = Default::default();
            std::mem::take(&mut *u)
        };
        let dirty: Vec<u64> = std::mem::take(&mut *self.dirty.lock().expect("poisoned"))
            .into_iter()
            .collect();
        // Servers known to be unreachable fail at once instead of after the request's
        // deadline, as long as the flush can stand without them (at most m); beyond that they
        // are tried (one may be back).
        let skip: BTreeSet<u64> = dirty
            .iter()
            .copied()
            .filter(|&srv| !self.reachable(srv))
            .collect();
        let skip = if skip.len() <= self.spec.profile.parity {
            skip
        } else {
            BTreeSet::new()
        };
        let results = join_all(dirty.iter().map(|&srv| {
            let skipped = skip.contains(&srv);
            async move {
                // A server that fails is stale for this writer; its shards are rebuilt, so
                // the flush stands on the others (degraded within m).
                if skipped {
                    Ok(None)
                } else {
                    self.flush_server(srv).await
                }
            }
        }))
        .await;
        // An error (fenced, a server the map lost) fails the flush, after the bookkeeping
        // below: the versions taken stay waiting.
        let mut error = None;
        let mut flushed: HashMap<u64, u64> = HashMap::new();
        let mut failed: BTreeSet<u64> = BTreeSet::new();
        for (&srv, r) in dirty.iter().zip(results) {
            match r {
                Ok(Some(incarnation)) => {
                    flushed.insert(srv, incarnation);
                }
                Ok(None) => {
                    failed.insert(srv);
                }
                Err(e) => {
                    failed.insert(srv);
                    error.get_or_insert(e);
                }
            }
        }
        // The servers of the map that are not down.
        let known: BTreeSet<u64> = {
            let c = self.cluster.lock().expect("poisoned");
            c.clients
                .keys()
                .copied()
                .filter(|s| !c.down.contains(s))
                .collect()
        };
        // What each server that flushed covered: the versions its current incarnation took.
        // Other incarnations' may be gone (it lost power since, or its store is new): their
        // stripes are suspect.
        let mut covered: Vec<(u64, Unflushed)> = Vec::new();
        let mut waiting: Vec<(u64, Unflushed)> = Vec::new();
        for (srv, versions) in unflushed {
            if !known.contains(&srv) {
                // A server the map no longer has or calls down is not waited for (its shards
                // are rebuilt elsewhere); its stripes are settled like a power loss's.
                self.mark_suspect(Some(srv), versions.iter().map(|v| v.0.stripe));
                continue;
            }
            let Some(&incarnation) = flushed.get(&srv) else {
                waiting.push((srv, versions));
                continue;
            };
            let (now, gone): (Unflushed, Unflushed) =
                versions.into_iter().partition(|v| v.2 == incarnation);
            self.mark_suspect(Some(srv), gone.iter().map(|v| v.0.stripe));
            if !now.is_empty() {
                covered.push((srv, now));
            }
        }
        // Beyond m failed servers (those that failed now, and those whose lost versions are
        // not rebuilt yet) some stripe may have fewer than k durable shards: the flush is not
        // acknowledged and nothing is stabilized (the servers stay dirty, so the next flush
        // retries them).
        let lost_on: BTreeSet<u64> = self
            .suspect
            .lock()
            .expect("poisoned")
            .values()
            .flat_map(|s| s.lost_on.iter().copied())
            .collect();
        let counted: BTreeSet<u64> = failed.union(&lost_on).copied().collect();
        let limit = self.spec.profile.parity;
        // Also counted per stripe written since the last flush, with the positions it
        // already lacked (stale: a server away, or declared down with no spare): a stripe
        // missing one shard stands only while at most m - 1 more fail. (Before, a flush that
        // two servers failed was acknowledged over such stripes, and stabilizing their new
        // versions on the other shards threw away the last state that k shards could
        // rebuild.)
        let mut stripes: BTreeSet<u64> = BTreeSet::new();
        for (_, versions) in covered.iter().chain(waiting.iter()) {
            stripes.extend(versions.iter().map(|v| v.0.stripe));
        }
        let shortfall = stripes
            .iter()
            .map(|&stripe| self.shortfall(stripe, &counted))
            .max()
            .unwrap_or(0)
            .max(counted.len());
        let incomplete = shortfall > limit;
        {
            let mut again = self.unflushed.lock().expect("poisoned");
            let mut stabilize = self.to_stabilize.lock().expect("poisoned");
            let mut dirty = self.dirty.lock().expect("poisoned");
            for (srv, versions) in waiting {
                again.entry(srv).or_default().extend(versions);
                dirty.insert(srv);
            }
            for (srv, versions) in covered {
                if incomplete {
                    again.entry(srv).or_default().extend(versions);
                    dirty.insert(srv);
                } else {
                    stabilize
                        .entry(srv)
                        .or_default()
                        .extend(versions.into_iter().map(|(o, v, _)| (o, v)));
                }
            }
            if incomplete {
                dirty.extend(failed.iter().copied());
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        if incomplete {
            return Err(VolumeError::FlushIncomplete {
                volume: self.spec.id,
                failed: shortfall,
                limit,
            });
        }
        if report && self.lost.take(number) {
            tracing::warn!(
                volume = self.spec.id,
                "writes acknowledged before this flush may be lost; failing this flush"
            );
            return Err(VolumeError::WritesLost {
                volume: self.spec.id,
            });
        }
        Ok(())
    }

    // ---- Reconciliation and repair ----

    /// Records this writer's epoch on every server in the map before the first write, so a
    /// previous writer's later writes are refused everywhere (DESIGN.md invariant 1); with
    /// `opened`, also that it serves I/O now, with the stripes it leaves undecided (a new
    /// note each time). Returns the highest epoch below this one that the servers recorded
    /// as opened (the previous writer that served) and that writer's last note.
    async fn fence_all(&self, opened: bool) -> Result<(u64, OpenedNote)> {
        let servers = self.up_servers();
        let note = opened.then(|| {
            // Taken under the lock with its order: a later note never lists more.
            let u = self.undecided.lock().expect("poisoned");
            OpenedNote {
                epoch: self.epoch,
                record: self.opened_record.fetch_add(1, Ordering::AcqRel) + 1,
                undecided: u.iter().map(|(&s, &b)| (s, b)).collect(),
            }
        });
        let note = note.as_ref();
        let results = join_all(servers.iter().map(|(id, c)| async move {
            match c.fence(self.spec.id, self.epoch, note).await {
                Ok((_, previous_opened, note)) => Ok(Some((previous_opened, note))),
                Err(e) => {
                    tracing::warn!(volume = self.spec.id, server = id, error = %e, "cannot fence");
                    self.note_error(*id, &e).map(|_| None)
                }
            }
        }))
        .await;
        let previous = results
            .into_iter()
            .collect::<Result<Vec<Option<(u64, OpenedNote)>>>>()?;
        // A previous writer still running somewhere must not complete a write on unfenced
        // servers alone. A write needs k current shards, but a partial one touches only m+1
        // positions (the untouched data shards count as current): with at most
        // min(k-1, m) servers unfenced, every write touches a fenced one and fails there.
        // The opening record must reach k servers: any later writer fences all but that
        // many, so at least one it reaches has the record.
        let (k, m) = (self.spec.profile.data, self.spec.profile.parity);
        let unfenced = previous.iter().filter(|p| p.is_none()).count();
        let fence_limit = (k - 1).min(m);
        let limit = if opened {
            previous.len().saturating_sub(k).min(fence_limit)
        } else {
            fence_limit
        };
        if unfenced > limit {
            return Err(VolumeError::FenceIncomplete {
                volume: self.spec.id,
                unfenced,
                limit,
            });
        }
        // The previous opened writer's last note: at least one server reached has it (its
        // notes reach k servers, and this fence reaches all but min(k-1, m)).
        let (opened_epoch, last) = previous
            .into_iter()
            .flatten()
            .filter(|(e, _)| *e < self.epoch)
            .max_by_key(|(e, n)| (*e, n.record))
            .unwrap_or_default();
        Ok((opened_epoch, last))
    }

    /// Per block server: how many shard positions of the cached stripes it holds are stale
    /// (waiting for it to come back, or for repair). Empty when the volume is whole (as far as
    /// this writer has seen).
    pub fn degraded(&self) -> std::collections::BTreeMap<u64, usize> {
        let views: Vec<(u64, StripeView)> = self
            .views
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|(_, v)| v.stale != 0)
            .map(|(s, v)| (*s, v.clone()))
            .collect();
        let mut out = std::collections::BTreeMap::new();
        for (stripe, v) in views {
            let Ok(servers) = self.placement(stripe) else {
                continue;
            };
            for (p, srv) in servers.iter().enumerate() {
                if v.is_stale(p) {
                    *out.entry(*srv).or_insert(0) += 1;
                }
            }
        }
        for &(stripe, p) in self.corrupt.lock().expect("poisoned").iter() {
            if let Ok(servers) = self.placement(stripe) {
                *out.entry(servers[p]).or_insert(0) += 1;
            }
        }
        out
    }

    /// Rebuilds up to `limit` cached stripes that have stale positions on reachable servers
    /// (bit rot found by reads, shards a short outage made miss writes).
    pub async fn heal(&self, limit: usize) -> usize {
        let candidates: BTreeSet<u64> = {
            let views = self.views.lock().expect("poisoned");
            let corrupt = self.corrupt.lock().expect("poisoned");
            views
                .iter()
                .filter(|(_, v)| v.stale != 0)
                .map(|(s, _)| *s)
                .chain(corrupt.iter().map(|(s, _)| *s))
                .take(limit)
                .collect()
        };
        let mut rebuilt = 0;
        for stripe in candidates {
            match self.repair_stripe(stripe).await {
                Ok(n) => rebuilt += n,
                Err(e) => {
                    tracing::debug!(volume = self.spec.id, stripe, error = %e, "heal deferred")
                }
            }
        }
        rebuilt
    }

    /// Reconciles every stripe with unstable versions (see [`crate::reconcile`]).
    async fn reconcile_all(&self) -> Result<()> {
        let servers = self.up_servers();
        let stripes: Vec<u64> = self.list_all(true).await?.stripes.into_keys().collect();
        // Inherited undecided stripes with nothing unstable left are plain stripes again.
        self.undecided
            .lock()
            .expect("poisoned")
            .retain(|s, _| stripes.binary_search(s).is_ok());
        for stripe in stripes {
            self.reconcile_stripe(stripe).await?;
        }
        // The decisions are durable and applied before any I/O is served: a later writer
        // that still finds one of these versions unstable knows this one never saw it.
        let flushed = join_all(servers.iter().map(|(id, _)| self.flush_server(*id))).await;
        flushed.into_iter().collect::<Result<Vec<Option<u64>>>>()?;
        Ok(())
    }

    async fn reconcile_stripe(&self, stripe: u64) -> Result<()> {
        let _g = self.lock_stripe(stripe).await;
        self.settle_stripe(stripe).await.map(|_| ())
    }

    /// Reconciles a stripe's unstable versions, then rebuilds its stale positions (the caller
    /// holds the stripe lock).
    async fn settle_stripe(&self, stripe: u64) -> Result<usize> {
        self.settle_stripe_with(stripe, None).await
    }

    /// [`Volume::settle_stripe`] starting from infos listed earlier in a pass (`listed`),
    /// used only if this writer has not touched the stripe since (it is not in the cache), so
    /// they are still current (the caller holds the stripe lock).
    async fn settle_stripe_with(
        &self,
        stripe: u64,
        listed: Option<Vec<Option<ObjectInfo>>>,
    ) -> Result<usize> {
        let servers = self.placement(stripe)?;
        // What this writer knew of the stripe, and whether servers lost versions of it: a
        // suspect stripe is always learned afresh, and must not end older than it was known.
        let known = self.views.lock().expect("poisoned").get(&stripe).cloned();
        let marks = self.suspect_marks(stripe);
        let lost_power = marks.is_some_and(|(_, lost)| lost);
        let mut infos = match listed {
            Some(infos) if known.is_none() && marks.is_none() => infos,
            _ => self.learn(stripe, &servers).await?,
        };
        // Rolling back the stripe's top version exposes the next one, which must be decided
        // now, under the same `foreign_below`: left for later, a writer that has opened since
        // would take it for a leftover of an older epoch and roll back a write that was
        // acknowledged (found by the chaos simulator). So decide until nothing rolls back.
        let inherited = self
            .undecided
            .lock()
            .expect("poisoned")
            .get(&stripe)
            .copied();
        let foreign_below = inherited.unwrap_or(self.foreign_below.load(Ordering::Acquire));
        let mut undecided = false;
        for _ in 0..crate::store::MAX_UNSTABLE_VERSIONS {
            let d = reconcile::reconcile(self.spec.profile, &infos, foreign_below);
            undecided = d.undecided;
            let rolled_back = !d.rollback.is_empty();
            if lost_power && d.rollback.iter().any(|(_, v)| v.epoch == self.epoch) {
                // A version of this writer rolled back on a stripe whose servers lost power:
                // it may have been acknowledged.
                self.mark_lost(None);
            }
            let unchanged = !rolled_back && d.stabilize.is_empty() && d.roll_forward.is_none();
            if !self.apply_decision(stripe, &servers, &infos, &d).await? {
                // Judged again later against the same epoch, as if undecided: after this
                // writer opens, a version still unstable everywhere would otherwise look like
                // an older epoch's leftover and be rolled back, acknowledged or not.
                undecided = true;
                break;
            }
            // Whatever is still behind (the rolled-forward positions among them) is rebuilt
            // below, and so are shards the cached view knows to be corrupt.
            if unchanged {
                break;
            }
            let before = std::mem::replace(&mut infos, self.learn(stripe, &servers).await?);
            // Nothing moved (a rollback refused or unreachable): deciding again cannot help.
            if !rolled_back || before == infos {
                break;
            }
        }
        if undecided {
            // Only while opening, or when it was already undecided then: a stripe this writer
            // served I/O from is decided against its own epoch.
            if foreign_below < self.epoch {
                self.undecided
                    .lock()
                    .expect("poisoned")
                    .entry(stripe)
                    .or_insert(foreign_below);
            }
        } else if inherited.is_some() {
            self.decided_after_open(stripe, &servers, &infos, foreign_below)
                .await?;
        }
        let mut view = self.assess_known(stripe, &infos);
        self.mark_corrupt(stripe, &mut view);
        let n = self.rebuild_stale(stripe, &servers, &mut view).await?;
        if let (true, Some(known)) = (lost_power, &known) {
            if let Some(p) =
                (0..view.expected.len()).find(|&p| view.expected[p] < known.expected[p])
            {
                // Acknowledged writes are gone: more shards lost them than the code spares.
                tracing::warn!(
                    volume = self.spec.id,
                    stripe,
                    pos = p,
                    known = %known.expected[p],
                    now = %view.expected[p],
                    "a stripe whose servers lost power is older than its writer knew it"
                );
                self.mark_lost(None);
            }
        }
        self.settled(stripe, marks, &servers, &view);
        self.remember(stripe, view);
        Ok(n)
    }

    /// A stripe left undecided is decided now. Before it serves I/O: the decision is made
    /// durable on its servers, and, once this writer has opened, a note without it is
    /// recorded (else the next writer would still judge its versions against the older
    /// epoch, and might roll forward a leftover this writer served without). If either
    /// fails, it stays undecided and its I/O fails until a later settle gets through.
    async fn decided_after_open(
        &self,
        stripe: u64,
        servers: &[u64],
        infos: &[Option<ObjectInfo>],
        below: u64,
    ) -> Result<()> {
        if self.opened_record.load(Ordering::Acquire) == 0 {
            // Still opening: the flush and the note that end the open cover it.
            self.undecided.lock().expect("poisoned").remove(&stripe);
            return Ok(());
        }
        let flushed = self.flush_answering(servers, infos).await?;
        let unavailable = || VolumeError::Unavailable {
            volume: self.spec.id,
            stripe,
            current: 0,
            needed: self.spec.profile.data,
        };
        if !flushed {
            return Err(unavailable());
        }
        self.undecided.lock().expect("poisoned").remove(&stripe);
        if let Err(e) = self.fence_all(true).await {
            tracing::warn!(volume = self.spec.id, stripe, error = %e, "cannot record a decided stripe; it stays undecided");
            self.undecided
                .lock()
                .expect("poisoned")
                .insert(stripe, below);
            return Err(match e {
                e @ (VolumeError::Fenced { .. } | VolumeError::Crashed { .. }) => e,
                _ => unavailable(),
            });
        }
        Ok(())
    }

    /// Flushes the servers of a stripe's positions that answered (`infos`); whether all did.
    async fn flush_answering(&self, servers: &[u64], infos: &[Option<ObjectInfo>]) -> Result<bool> {
        let flushed = join_all(
            (0..servers.len())
                .filter(|&p| infos[p].is_some())
                .map(|p| self.flush_server(servers[p])),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<Option<u64>>>>()?;
        Ok(flushed.iter().all(Option::is_some))
    }

    /// Carries out one reconciliation decision on a stripe's shards; false when what it
    /// commits could not be (a server failed the flush before, or every stabilization failed):
    /// the versions stay unstable everywhere, as undecided as before.
    async fn apply_decision(
        &self,
        stripe: u64,
        servers: &[u64],
        infos: &[Option<ObjectInfo>],
        d: &reconcile::Decision,
    ) -> Result<bool> {
        if !d.rollback.is_empty() || d.roll_forward.as_ref().is_some_and(|(_, m)| !m.is_empty()) {
            tracing::info!(
                volume = self.spec.id,
                epoch = self.epoch,
                stripe,
                ?d,
                ?infos,
                "reconciling"
            );
        }
        for &(pos, v) in &d.rollback {
            let c = self.client(servers[pos])?;
            if let Err(e) = c
                .rollback(self.epoch, &[(self.object(stripe, pos), v)])
                .await
            {
                self.note_error(servers[pos], &e)?;
            }
        }
        if !d.rollback.is_empty() {
            self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((_, missing)) = &d.roll_forward {
            if !missing.is_empty() {
                self.stats.rolled_forward.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !d.stabilize.is_empty() {
            // Durable on every shard that answered before any is stabilized (see
            // `Volume::unflushed`); if one cannot flush, the next settle decides again.
            if !self.flush_answering(servers, infos).await? {
                return Ok(false);
            }
        }
        let mut stabilized = 0;
        for &(pos, v) in &d.stabilize {
            let c = self.client(servers[pos])?;
            match c
                .stabilize(self.epoch, &[(self.object(stripe, pos), v)])
                .await
            {
                Ok(()) => stabilized += 1,
                Err(e) => self.note_error(servers[pos], &e)?,
            }
        }
        Ok(d.stabilize.is_empty() || stabilized > 0)
    }

    /// Marks the positions reads found corrupt as stale in `view`.
    fn mark_corrupt(&self, stripe: u64, view: &mut StripeView) {
        let corrupt = self.corrupt.lock().expect("poisoned");
        for &(_, p) in corrupt.range((stripe, 0)..(stripe + 1, 0)) {
            view.set_stale(p, true);
        }
    }

    /// Rebuilds every stale but reachable position of a stripe from the current ones.
    async fn rebuild_stale(
        &self,
        stripe: u64,
        servers: &[u64],
        view: &mut StripeView,
    ) -> Result<usize> {
        let width = self.spec.profile.width();
        let k = self.spec.profile.data;
        // A position whose true version is NONE holds nothing (it reads as zeros): nothing to
        // rebuild there.
        let targets: Vec<usize> = (0..width)
            .filter(|&p| {
                view.is_stale(p) && view.expected[p] != Version::NONE && self.reachable(servers[p])
            })
            .collect();
        if targets.is_empty() {
            return Ok(0);
        }
        let unit = self.spec.unit;
        let mut source = view.clone();
        let mut all = self
            .gather(stripe, servers, &mut source, 0, unit, &targets)
            .await?;
        let data_versions: Vec<(u32, Version)> =
            (0..k).map(|p| (p as u32, view.expected[p])).collect();
        tracing::debug!(volume = self.spec.id, stripe, ?targets, ?view, "rebuilding");
        let mut rebuilt = 0;
        for &p in &targets {
            let content = Bytes::from(all[p].take().expect("reconstructed"));
            let req = WriteReq {
                object: self.object(stripe, p),
                epoch: self.epoch,
                version: view.expected[p],
                base: Version::NONE,
                mode: WriteMode::Install,
                offset: 0,
                length: unit,
                crcs: checksum::compute(&content),
                // Made durable by the flush that ends a repair pass (or the writer's next
                // flush); until then a power loss only makes the stripe degraded again.
                fua: false,
                write_set: 0,
                data_base: vec![],
                data_after: if p >= k {
                    data_versions.clone()
                } else {
                    vec![]
                },
                return_old: false,
            };
            let c = self.client(servers[p])?;
            let piggy = self.take_piggyback(servers[p]);
            self.dirty.lock().expect("poisoned").insert(servers[p]);
            match c.write(&req, content, &piggy).await {
                Ok(out) => {
                    // Complete as soon as it lands; stabilized once a flush made it durable
                    // (stable on this shard and lost by the others, or the reverse, would mix
                    // two states of the stripe after a power loss).
                    self.observe_incarnation(servers[p], out.incarnation);
                    self.note_unflushed([(servers[p], req.object, req.version, out.incarnation)]);
                    view.set_stale(p, false);
                    self.corrupt.lock().expect("poisoned").remove(&(stripe, p));
                    rebuilt += 1;
                    self.stats.shards_rebuilt.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .bytes_rebuilt
                        .fetch_add(u64::from(unit), Ordering::Relaxed);
                }
                Err(e) => {
                    self.to_stabilize
                        .lock()
                        .expect("poisoned")
                        .entry(servers[p])
                        .or_default()
                        .extend(piggy);
                    tracing::debug!(volume = self.spec.id, stripe, pos = p, error = %e, "rebuild install failed");
                    self.note_error(servers[p], &e)?
                }
            }
        }
        Ok(rebuilt)
    }

    /// Re-learns a stripe from its shards, settles unstable leftovers (reconciliation) and
    /// rebuilds what is stale; returns the positions rebuilt. Used after placement changes,
    /// when servers come back, and for shards that reads found corrupt.
    pub async fn repair_stripe(&self, stripe: u64) -> Result<usize> {
        self.check()?;
        let _g = self.lock_stripe(stripe).await;
        self.settle_stripe(stripe).await
    }

    /// Repairs every stripe of the volume (after a server was declared down and placement
    /// moved its shards, or to catch a returning server up), at most `bytes_per_sec` of
    /// rebuilt data (0: unthrottled). Progress is in [`VolumeStats`].
    pub async fn repair_all(&self, bytes_per_sec: u64) -> Result<PassReport> {
        let _one_pass = self.pass_lock.lock().await;
        self.repair_all_locked(bytes_per_sec).await
    }

    /// [`Volume::repair_all`], the caller holding `pass_lock`.
    async fn repair_all_locked(&self, bytes_per_sec: u64) -> Result<PassReport> {
        // One listing per server tells every stripe's state; stripes that are whole and
        // stable are skipped without a round trip.
        let listing = self.list_all(false).await?;
        self.stats
            .pass_stripes_total
            .store(listing.stripes.len() as u64, Ordering::Relaxed);
        self.stats.pass_stripes_done.store(0, Ordering::Relaxed);
        let mut pace = Pace::new(bytes_per_sec);
        let mut report = PassReport::default();
        let mut todo = Vec::new();
        for &stripe in listing.stripes.keys() {
            let infos = self.listed_infos(&listing, stripe)?;
            let view = self.assess_known(stripe, &infos);
            let unstable = infos.iter().flatten().any(|i| !i.unstable.is_empty());
            let corrupt = self
                .corrupt
                .lock()
                .expect("poisoned")
                .range((stripe, 0)..(stripe + 1, 0))
                .next()
                .is_some();
            if view.stale == 0 && !unstable && !corrupt && self.suspect_marks(stripe).is_none() {
                // A position whose server did not answer (or is down with no replacement) is
                // not known to be whole: the stripe is counted as deferred, not as repaired.
                // (A suspect stripe is cleared only by a settle: this listing may be older
                // than its mark.)
                if infos.iter().any(Option::is_none) {
                    report.deferred += 1;
                }
                report.stripes += 1;
                self.stats.pass_stripes_done.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            todo.push((stripe, infos));
        }
        // Stripes are repaired MAX_REPAIR_PARALLEL at a time: they live on different servers
        // (placement groups), so the rebuild reads from many and writes to many at once.
        let mut results = futures::stream::iter(todo)
            .map(|(stripe, infos)| async move {
                self.check()?;
                let unknown = infos.iter().any(Option::is_none);
                let _g = self.lock_stripe(stripe).await;
                self.settle_stripe_with(stripe, Some(infos))
                    .await
                    .map(|n| (n, unknown))
            })
            .buffer_unordered(MAX_REPAIR_PARALLEL);
        while let Some(r) = results.next().await {
            match r {
                Ok((n, unknown)) => {
                    if unknown {
                        report.deferred += 1;
                    }
                    report.shards_rebuilt += n as u64;
                    pace.account(n as u64 * u64::from(self.spec.unit)).await;
                }
                Err(VolumeError::Unavailable { .. }) => report.deferred += 1,
                Err(e) => return Err(e),
            }
            report.stripes += 1;
            self.stats.pass_stripes_done.fetch_add(1, Ordering::Relaxed);
        }
        drop(results);
        // The rebuilt shards are durable when the pass reports (and stabilized: applied at
        // each server's next sync).
        self.flush_reporting(false).await?;
        self.send_stabilizations().await;
        Ok(report)
    }

    /// Scrubs every stripe: reads every shard whole (the servers verify each block's
    /// checksum), checks the parity against the data, and rebuilds what is wrong. Reads at
    /// most `bytes_per_sec` (0: unthrottled).
    pub async fn scrub(&self, bytes_per_sec: u64) -> Result<PassReport> {
        let _one_pass = self.pass_lock.lock().await;
        let stripes = self.stripes_in_use().await?;
        self.stats
            .pass_stripes_total
            .store(stripes.len() as u64, Ordering::Relaxed);
        self.stats.pass_stripes_done.store(0, Ordering::Relaxed);
        let mut pace = Pace::new(bytes_per_sec);
        let mut report = PassReport::default();
        let stripe_bytes = u64::from(self.spec.unit) * self.spec.profile.width() as u64;
        for stripe in stripes {
            match self.scrub_stripe(stripe, &mut report).await {
                Ok(()) => {}
                Err(VolumeError::Unavailable { .. }) => report.deferred += 1,
                Err(e) => return Err(e),
            }
            report.stripes += 1;
            self.stats.stripes_scrubbed.fetch_add(1, Ordering::Relaxed);
            self.stats.pass_stripes_done.fetch_add(1, Ordering::Relaxed);
            pace.account(stripe_bytes).await;
        }
        Ok(report)
    }

    async fn scrub_stripe(&self, stripe: u64, report: &mut PassReport) -> Result<()> {
        self.check()?;
        let _g = self.lock_stripe(stripe).await;
        let servers = self.placement(stripe)?;
        let infos = self.learn(stripe, &servers).await?;
        let mut view = self.assess_known(stripe, &infos);
        let k = self.spec.profile.data;
        let width = self.spec.profile.width();
        let unit = self.spec.unit;
        // Read every current position whole.
        let reads = join_all((0..width).map(|p| {
            let view = &view;
            let servers = &servers;
            async move {
                if view.is_stale(p) || !self.reachable(servers[p]) {
                    return Ok::<_, VolumeError>(None);
                }
                let c = self.client(servers[p])?;
                match c.read(self.object(stripe, p), 0, unit, self.epoch).await {
                    Ok(r) if r.version == view.expected[p] => Ok(Some(r.data.to_vec())),
                    Ok(_) => Ok(None),
                    Err(e) => {
                        if e.status() == Some(pb::Status::ChecksumMismatch) {
                            self.corrupt.lock().expect("poisoned").insert((stripe, p));
                            return Ok(Some(Vec::new())); // marker: corrupt
                        }
                        self.note_error(servers[p], &e)?;
                        Ok(None)
                    }
                }
            }
        }))
        .await;
        let mut shards: Vec<Option<Vec<u8>>> = Vec::with_capacity(width);
        for (p, r) in reads.into_iter().enumerate() {
            match r? {
                Some(b) if b.is_empty() => {
                    report.checksum_errors += 1;
                    self.stats.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    view.set_stale(p, true);
                    shards.push(None);
                }
                Some(b) => shards.push(Some(b)),
                None => {
                    view.set_stale(p, true);
                    shards.push(None);
                }
            }
        }
        // Consistency, when more than k shards were read: a stripe that is not one codeword
        // has a shard whose bytes pass their checksums but are wrong. With two shards to
        // spare the wrong one is located (the only one whose removal leaves a codeword);
        // otherwise, with all data read, the parity is rebuilt from the data.
        let read: Vec<Option<&[u8]>> = shards.iter().map(Option::as_deref).collect();
        let present = read.iter().filter(|s| s.is_some()).count();
        if present > k && !self.codec.consistent(&read)? {
            report.parity_mismatches += 1;
            self.stats.parity_repaired.fetch_add(1, Ordering::Relaxed);
            match self.codec.locate_bad(&read)? {
                Some(bad) => {
                    tracing::warn!(
                        stripe,
                        position = bad,
                        server = servers[bad],
                        "scrub: shard disagrees with the rest of its stripe; rebuilding it"
                    );
                    view.set_stale(bad, true);
                }
                None if read[..k].iter().all(Option::is_some) => {
                    let data: Vec<&[u8]> = read[..k].iter().map(|s| s.expect("read")).collect();
                    let mut parity = vec![vec![0u8; unit as usize]; width - k];
                    let mut prefs: Vec<&mut [u8]> =
                        parity.iter_mut().map(Vec::as_mut_slice).collect();
                    self.codec.encode(&data, &mut prefs)?;
                    for p in k..width {
                        if read[p].is_some_and(|s| s != &parity[p - k][..]) {
                            tracing::warn!(
                                stripe,
                                position = p,
                                server = servers[p],
                                "scrub: parity disagrees with the data; rebuilding it"
                            );
                            view.set_stale(p, true);
                        }
                    }
                }
                None => {
                    tracing::warn!(
                        stripe,
                        "scrub: stripe is inconsistent and the wrong shard cannot be located"
                    );
                }
            }
        }
        let n = self.rebuild_stale(stripe, &servers, &mut view).await?;
        report.shards_rebuilt += n as u64;
        self.remember(stripe, view);
        Ok(())
    }

    /// What the shards of a stripe report, where they are, and the cached view (diagnostics:
    /// `continuum volume inspect`, test failures).
    pub async fn inspect_stripe(
        &self,
        stripe: u64,
    ) -> Result<(Vec<u64>, Vec<Option<ObjectInfo>>, Option<StripeView>)> {
        let servers = self.placement(stripe)?;
        let infos = self.learn(stripe, &servers).await?;
        let cached = self.views.lock().expect("poisoned").get(&stripe).cloned();
        Ok((servers, infos, cached))
    }

    /// Data units (`stripe · k + data shard`, each `unit` bytes of the volume) that may hold
    /// data: those with an object on their server. When some server of the map did not answer
    /// or is down (its units may live only there, or be rebuilt elsewhere later), every unit
    /// of a stripe with any object listed counts, so data is never reported as a hole while
    /// the stripe is readable.
    pub async fn allocated_units(&self) -> Result<BTreeSet<u64>> {
        let listing = self.list_all(false).await?;
        let k = self.spec.profile.data as u64;
        let exact =
            listing.failed.is_empty() && self.cluster.lock().expect("poisoned").down.is_empty();
        let mut units = BTreeSet::new();
        for (stripe, objs) in &listing.stripes {
            if exact {
                units.extend(
                    objs.iter()
                        .map(|(_, i)| i.object.shard as u64)
                        .filter(|&shard| shard < k)
                        .map(|shard| stripe * k + shard),
                );
            } else {
                units.extend(stripe * k..(stripe + 1) * k);
            }
        }
        Ok(units)
    }

    /// Stripes that have at least one object on some reachable server.
    pub async fn stripes_in_use(&self) -> Result<BTreeSet<u64>> {
        Ok(self.list_all(false).await?.stripes.into_keys().collect())
    }

    /// The servers of the map that are up, with their clients.
    fn up_servers(&self) -> Vec<(u64, BlockClient)> {
        let c = self.cluster.lock().expect("poisoned");
        c.servers
            .iter()
            .filter(|s| s.up)
            .filter_map(|s| c.clients.get(&s.id).map(|cl| (s.id, cl.clone())))
            .collect()
    }

    /// Every object of the volume (only those with unstable versions when `unstable_only`) on
    /// every reachable server of the map (metadata only).
    async fn list_all(&self, unstable_only: bool) -> Result<Listing> {
        let servers = self.up_servers();
        let mut listing = Listing::default();
        for (id, c) in &servers {
            if !self.reachable(*id) {
                listing.failed.insert(*id);
                continue;
            }
            let mut after = None;
            loop {
                match c
                    .list(self.spec.id, after, 4096, unstable_only, self.epoch)
                    .await
                {
                    Ok((page, more)) => {
                        after = page.last().map(|i| i.object);
                        for info in page {
                            listing
                                .stripes
                                .entry(info.object.stripe)
                                .or_default()
                                .push((*id, info));
                        }
                        if !more {
                            break;
                        }
                    }
                    Err(e) => {
                        self.note_error(*id, &e)?;
                        listing.failed.insert(*id);
                        break;
                    }
                }
            }
        }
        Ok(listing)
    }

    /// A stripe's per-position infos from a listing: what the server placement names for each
    /// position listed for it (absent = `Version::NONE`); `None` where that server did not
    /// answer.
    fn listed_infos(&self, listing: &Listing, stripe: u64) -> Result<Vec<Option<ObjectInfo>>> {
        let servers = self.placement(stripe)?;
        let listed = listing.stripes.get(&stripe);
        Ok(servers
            .iter()
            .enumerate()
            .map(|(pos, srv)| {
                if listing.failed.contains(srv) || !self.reachable(*srv) {
                    return None;
                }
                let found = listed
                    .and_then(|l| {
                        l.iter()
                            .find(|(s, i)| s == srv && i.object.shard as usize == pos)
                    })
                    .map(|(_, i)| i.clone());
                Some(found.unwrap_or(ObjectInfo {
                    object: self.object(stripe, pos),
                    version: Version::NONE,
                    unstable: Vec::new(),
                    data_versions: Vec::new(),
                    length: 0,
                }))
            })
            .collect())
    }
}

/// Locks `key` in a table of async locks; idle entries are dropped now and then (the table
/// stays bounded).
async fn lock_in(
    table: &Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    key: u64,
) -> tokio::sync::OwnedMutexGuard<()> {
    let m = table
        .lock()
        .expect("poisoned")
        .entry(key)
        .or_default()
        .clone();
    let g = m.lock_owned().await;
    let mut t = table.lock().expect("poisoned");
    if t.len() > MAX_CACHED_STRIPES {
        t.retain(|_, m| Arc::strong_count(m) > 1);
    }
    g
}

/// What a pass's listing found: per stripe the (server, object info) pairs, and the servers
/// that did not answer.
#[derive(Default)]
struct Listing {
    stripes: std::collections::BTreeMap<u64, Vec<(u64, ObjectInfo)>>,
    failed: BTreeSet<u64>,
}

#[cfg(test)]
mod tests {
    use super::LostReport;

    #[test]
    fn a_lost_write_is_reported_by_every_flush_until_one_that_covers_it() {
        let r = LostReport::default();
        // Flush 1 begins; then a write behind begins, is acknowledged, flush 2 begins, and
        // the write is lost.
        let f1 = r.flush_begins();
        let write_began_after = r.asked();
        let f2 = r.flush_begins();
        r.mark(Some(write_began_after));
        // Flush 1 ends first: it fails (harmless) but must not use the report up.
        assert!(r.take(f1));
        assert!(r.take(f2), "the flush that covers the lost write fails");
        let f3 = r.flush_begins();
        assert!(!r.take(f3), "reported; later flushes succeed");
        // A loss found at some point (no write to pin it to): flushes already running fail,
        // the first one begun after it clears it.
        let f4 = r.flush_begins();
        r.mark(None);
        assert!(r.take(f4));
        let f5 = r.flush_begins();
        assert!(r.take(f5));
        assert!(!r.take(r.flush_begins()));
    }
}
