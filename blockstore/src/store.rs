//! The shard store of one block server: versioned, checksummed shard objects on a [`Device`],
//! their records in an [`Index`].
//!
//! An object is one shard of one stripe of one volume. Its record holds, per 4 KiB block, the
//! device location (0 = zeros, no space used) and the CRC-32 of the block; its current
//! [`Version`]; an undo entry per unstable version; and, on parity shards, the version of each
//! data shard the parity reflects.
//!
//! Writes never overwrite in place (redirect-on-write): new blocks go to free space, and the
//! blocks they replace stay allocated, referenced from the write's undo entry, until the writer
//! says the version is stable ([`Store::stabilize`]) or undoes it ([`Store::rollback`]). This
//! is what closes the EC write hole (DESIGN.md invariant 2): a stripe write that reached only
//! some shards can be rolled back on each of them.
//!
//! Invariants (asserted or checked on every call):
//! 1. Epoch fencing (DESIGN.md 1): every change carries the writer's epoch; one below the
//!    highest seen for the volume is refused ([`StoreError::StaleEpoch`]); a higher one is
//!    recorded in the same atomic index batch as the change it came with.
//! 2. Versions only grow: a write's version must be above the object's, and its `base` must be
//!    the object's current version (compare-and-swap), so a writer that is wrong about a shard
//!    finds out instead of corrupting a stripe. Parity shards also check `data_base`.
//! 3. Every block has exactly one owner (a record's current map or one undo entry); start-up
//!    refuses a data directory where two claim one block.
//! 4. A block freed in memory is reused only after the index change that dropped it is durable
//!    and its space was discarded on the device.
//! 5. Every read verifies each block's CRC; a mismatch is an error, never data (DESIGN.md 4).
//! 6. Durability (DESIGN.md 3): `fua` writes and [`Store::flush`] sync the device before the
//!    index, so a durable record never points at blocks that were not yet written.
//! 7. An undo entry is dropped only once the data of the version it protects is durable:
//!    stabilization is queued and applied after a device sync (at the next flush, or by the
//!    next write to an object with many undo entries). Otherwise a power loss could leave a
//!    stable version whose blocks never reached the disk, with nothing to roll back to.
//! 8. Sync generations: a power loss can keep an unsynced index record and drop the device
//!    write it points at, leaving the record over whatever the reused block held before. The
//!    CRC does not always catch that: content that ends with its own CRC-32 (a common way to
//!    seal a block) always has the same CRC-32, so an old sealed block passes for a new one.
//!    So every undo entry records the generation it was committed in; each device sync
//!    starts a new generation and, once done, the index records the last generation it
//!    covered; [`Store::open`] after a power loss (the device's boot id changed) rolls back
//!    every version committed in a later generation (never acknowledged as durable, so
//!    losing it is allowed; the writer's reconciliation and repair bring the shard back).
//!    After a mere process crash the page cache kept every completed write: nothing is lost.
//!
//! The store is single-threaded (one io_uring reactor per block server); operations on one
//! object are serialised by a per-object lock, operations on different objects interleave at
//! device I/O.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use prost::Message;

use crate::alloc::{runs_of, Allocator};
use crate::checksum::{self, BLOCK_BYTES};
use crate::device::Device;
use crate::index::{Batch, Change, Index, IndexError};
use crate::record_cache::RecordCache;

/// Largest object (one shard of one stripe).
pub const MAX_OBJECT_BYTES: u32 = crate::layout::MAX_UNIT_BYTES;
/// Most objects one list call returns.
pub const MAX_LIST_OBJECTS: usize = 4096;
/// Most undo entries one object keeps; a writer that never stabilizes is refused beyond it.
pub const MAX_UNSTABLE_VERSIONS: usize = 256;
/// Default byte budget of a store's in-memory record cache (about 50 000 records of a 64 KiB
/// shard unit with a few unstable versions).
pub const DEFAULT_RECORD_CACHE_BYTES: usize = 16 << 20;
/// A write to an object with this many undo entries applies its queued stabilization first
/// (syncing the device), so records stay small under sequential writes.
const APPLY_STABLE_AT: usize = 32;
/// Records per index write when queued stabilizations are applied at a flush.
const APPLY_BATCH: usize = 512;

const BLOCK: u64 = BLOCK_BYTES as u64;
/// Freed runs at least this long (in blocks) are punched out of the data file.
pub const DISCARD_MIN_BLOCKS: u64 = 16;

/// A shard write's version: (writer epoch, sequence within the epoch), ordered as a pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub epoch: u64,
    pub seq: u64,
}

impl Version {
    /// "No version": the object does not exist.
    pub const NONE: Version = Version { epoch: 0, seq: 0 };

    pub fn new(epoch: u64, seq: u64) -> Self {
        Self { epoch, seq }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.epoch, self.seq)
    }
}

/// One shard of one stripe of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub volume: u64,
    pub stripe: u64,
    pub shard: u32,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.volume, self.stripe, self.shard)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// The payload replaces the range.
    Data,
    /// The payload is XORed into the range (parity delta).
    Xor,
    /// The range becomes zeros and frees its space.
    Zero,
    /// The payload is the whole object (repair); `base` is not checked.
    Install,
}

/// A shard write (payload separate, see [`Store::write`]).
#[derive(Clone, Debug)]
pub struct WriteReq {
    pub object: ObjectKey,
    pub epoch: u64,
    pub version: Version,
    pub base: Version,
    pub mode: WriteMode,
    pub offset: u32,
    pub length: u32,
    /// CRC-32 per 4 KiB of the payload (empty for `Zero`).
    pub crcs: Vec<u32>,
    pub fua: bool,
    pub write_set: u32,
    pub data_base: Vec<(u32, Version)>,
    pub data_after: Vec<(u32, Version)>,
    pub return_old: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    pub previous: Version,
    /// The range as it was, when `return_old` was asked.
    pub old: Option<Bytes>,
    /// The incarnation of the store that took the write ([`Store::incarnation`]).
    pub incarnation: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOutcome {
    /// `Version::NONE` when the object does not exist (then `data` is zeros).
    pub version: Version,
    pub data: Bytes,
    pub crcs: Vec<u32>,
    pub data_versions: Vec<(u32, Version)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoInfo {
    pub version: Version,
    pub previous: Version,
    pub write_set: u32,
}

/// What [`Store::list`] and [`Store::stat`] say about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub object: ObjectKey,
    pub version: Version,
    pub unstable: Vec<UndoInfo>,
    pub data_versions: Vec<(u32, Version)>,
    /// Bytes the object covers (highest written block, in bytes).
    pub length: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("volume {volume}: epoch {epoch} is stale, a writer with epoch {highest} exists")]
    StaleEpoch {
        volume: u64,
        epoch: u64,
        highest: u64,
    },
    #[error("object {object}: expected version {expected}, current is {current}")]
    VersionMismatch {
        object: ObjectKey,
        expected: Version,
        current: Version,
    },
    #[error("object {object}: version {version} is not above the current {current}")]
    VersionNotNewer {
        object: ObjectKey,
        version: Version,
        current: Version,
    },
    #[error("object {object}: parity records data shard {shard} at {recorded}, writer expected {expected}")]
    DataVersionMismatch {
        object: ObjectKey,
        shard: u32,
        expected: Version,
        recorded: Version,
    },
    #[error("object {object}: stored block {block} fails its checksum")]
    ChecksumMismatch { object: ObjectKey, block: u32 },
    #[error(
        "object {object}: payload block {block} does not match its checksum (corrupted in transit)"
    )]
    BadPayload { object: ObjectKey, block: u32 },
    #[error("no space: {needed} blocks needed, {free} free")]
    NoSpace { needed: u64, free: u64 },
    #[error("object {object}: {limit} unstable versions pending; stabilize first")]
    TooManyUnstable { object: ObjectKey, limit: usize },
    #[error("invalid request: {reason} (offset {offset}, length {length}, payload {payload})")]
    Invalid {
        reason: &'static str,
        offset: u32,
        length: u32,
        payload: usize,
    },
    #[error("device I/O failed: {source}")]
    Io {
        #[from]
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("corrupt record at {key:?}: {reason}")]
    CorruptRecord { key: Vec<u8>, reason: String },
    #[error("data directory corrupt: block {block} is claimed twice (second by {object})")]
    DoubleClaim { block: u64, object: ObjectKey },
}

pub type Result<T> = std::result::Result<T, StoreError>;

// ---- On-disk records (private to the block server; prost for forward compatibility). ----

#[derive(Clone, PartialEq, prost::Message)]
struct DvRecord {
    #[prost(uint32, tag = "1")]
    shard: u32,
    #[prost(uint64, tag = "2")]
    epoch: u64,
    #[prost(uint64, tag = "3")]
    seq: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UndoRecord {
    #[prost(uint64, tag = "1")]
    epoch: u64,
    #[prost(uint64, tag = "2")]
    seq: u64,
    #[prost(uint64, tag = "3")]
    prev_epoch: u64,
    #[prost(uint64, tag = "4")]
    prev_seq: u64,
    #[prost(uint32, tag = "5")]
    write_set: u32,
    /// Blocks this version replaced: their index, location and CRC before it.
    #[prost(uint32, repeated, tag = "6")]
    idx: Vec<u32>,
    #[prost(uint64, repeated, tag = "7")]
    locs: Vec<u64>,
    #[prost(fixed32, repeated, tag = "8")]
    crcs: Vec<u32>,
    /// Block count before this version.
    #[prost(uint32, tag = "9")]
    prev_len: u32,
    #[prost(message, repeated, tag = "10")]
    prev_data_versions: Vec<DvRecord>,
    /// The sync generation this version was committed in (invariant 8); 0 in data
    /// directories older than generations (treated as durable).
    #[prost(uint64, tag = "11")]
    generation: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ObjectRecord {
    #[prost(uint64, tag = "1")]
    epoch: u64,
    #[prost(uint64, tag = "2")]
    seq: u64,
    /// Per 4 KiB block: device block number (0 = zeros).
    #[prost(uint64, repeated, tag = "3")]
    locs: Vec<u64>,
    #[prost(fixed32, repeated, tag = "4")]
    crcs: Vec<u32>,
    #[prost(message, repeated, tag = "5")]
    undo: Vec<UndoRecord>,
    #[prost(message, repeated, tag = "6")]
    data_versions: Vec<DvRecord>,
}

impl UndoRecord {
    fn version(&self) -> Version {
        Version::new(self.epoch, self.seq)
    }
}

impl ObjectRecord {
    fn version(&self) -> Version {
        Version::new(self.epoch, self.seq)
    }
    fn set_version(&mut self, v: Version) {
        self.epoch = v.epoch;
        self.seq = v.seq;
    }
    fn data_version(&self, shard: u32) -> Version {
        self.data_versions
            .iter()
            .find(|d| d.shard == shard)
            .map(|d| Version::new(d.epoch, d.seq))
            .unwrap_or_default()
    }
    fn set_data_version(&mut self, shard: u32, v: Version) {
        match self.data_versions.iter_mut().find(|d| d.shard == shard) {
            Some(d) => {
                d.epoch = v.epoch;
                d.seq = v.seq;
            }
            None => {
                self.data_versions.push(DvRecord {
                    shard,
                    epoch: v.epoch,
                    seq: v.seq,
                });
                self.data_versions.sort_by_key(|d| d.shard);
            }
        }
    }
    fn all_locs(&self) -> impl Iterator<Item = u64> + '_ {
        self.locs
            .iter()
            .copied()
            .chain(self.undo.iter().flat_map(|u| u.locs.iter().copied()))
            .filter(|l| *l != 0)
    }
    fn is_empty(&self) -> bool {
        self.version() == Version::NONE && self.undo.is_empty() && self.locs.iter().all(|l| *l == 0)
    }
}

fn dv_list(d: &[DvRecord]) -> Vec<(u32, Version)> {
    d.iter()
        .map(|d| (d.shard, Version::new(d.epoch, d.seq)))
        .collect()
}

// ---- Key layout of the index. ----

const OBJECT_PREFIX: u8 = b'o';
const EPOCH_PREFIX: u8 = b'e';
const OPENED_PREFIX: u8 = b's';
/// Per volume: the stripes the last opened writer left undecided (see [`OpenedNote`]).
const UNDECIDED_PREFIX: u8 = b'u';
/// The highest sync generation whose device writes are known durable (invariant 8).
const SYNCED_KEY: &[u8] = b"g";
/// The device's boot id when the store last opened (invariant 8).
const BOOT_KEY: &[u8] = b"b";
/// The store's incarnation (see [`Store::incarnation`]).
const INCARNATION_KEY: &[u8] = b"i";

fn object_key(o: &ObjectKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    k.push(OBJECT_PREFIX);
    k.extend_from_slice(&o.volume.to_be_bytes());
    k.extend_from_slice(&o.stripe.to_be_bytes());
    k.extend_from_slice(&o.shard.to_be_bytes());
    k
}

fn parse_object_key(k: &[u8]) -> Option<ObjectKey> {
    if k.len() != 21 || k[0] != OBJECT_PREFIX {
        return None;
    }
    Some(ObjectKey {
        volume: u64::from_be_bytes(k[1..9].try_into().ok()?),
        stripe: u64::from_be_bytes(k[9..17].try_into().ok()?),
        shard: u32::from_be_bytes(k[17..21].try_into().ok()?),
    })
}

fn volume_range(volume: u64) -> (Vec<u8>, Vec<u8>) {
    let mut from = vec![OBJECT_PREFIX];
    from.extend_from_slice(&volume.to_be_bytes());
    let mut to = from.clone();
    to.extend_from_slice(&[0xff; 13]);
    (from, to)
}

fn epoch_key(volume: u64) -> Vec<u8> {
    let mut k = vec![EPOCH_PREFIX];
    k.extend_from_slice(&volume.to_be_bytes());
    k
}

fn opened_key(volume: u64) -> Vec<u8> {
    let mut k = vec![OPENED_PREFIX];
    k.extend_from_slice(&volume.to_be_bytes());
    k
}

fn undecided_key(volume: u64) -> Vec<u8> {
    let mut k = vec![UNDECIDED_PREFIX];
    k.extend_from_slice(&volume.to_be_bytes());
    k
}

/// What the writer that opened a volume last recorded with its `opened` mark: the stripes it
/// opened without deciding (the shards that could tell were out of reach), each with the
/// epoch below which its unstable versions count as leftovers. It served no I/O from them,
/// so the next writer must judge their versions against that epoch, not against the opened
/// one (chaos seed 281 on 5159e7c; `docs/blockstore.md`). `record` orders the notes of one
/// writer: it records a shorter list each time it decides such a stripe, before serving it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenedNote {
    pub epoch: u64,
    pub record: u64,
    /// (stripe, epoch below which its unstable versions are leftovers).
    pub undecided: Vec<(u64, u64)>,
}

impl OpenedNote {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + 16 * self.undecided.len());
        v.extend_from_slice(&self.epoch.to_be_bytes());
        v.extend_from_slice(&self.record.to_be_bytes());
        for (stripe, below) in &self.undecided {
            v.extend_from_slice(&stripe.to_be_bytes());
            v.extend_from_slice(&below.to_be_bytes());
        }
        v
    }

    fn decode(key: &[u8], v: &[u8]) -> Result<Self> {
        if v.len() < 16 || !(v.len() - 16).is_multiple_of(16) {
            return Err(StoreError::CorruptRecord {
                key: key.to_vec(),
                reason: format!("undecided note of {} bytes", v.len()),
            });
        }
        let word = |i: usize| u64::from_be_bytes(v[i * 8..i * 8 + 8].try_into().expect("8"));
        Ok(OpenedNote {
            epoch: word(0),
            record: word(1),
            undecided: (0..(v.len() - 16) / 16)
                .map(|i| (word(2 + 2 * i), word(3 + 2 * i)))
                .collect(),
        })
    }
}

/// Counters a block server exports as metrics (shared with the metrics endpoint's thread).
#[derive(Debug, Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub stale_epoch_refusals: AtomicU64,
    pub version_mismatches: AtomicU64,
    pub stabilized: AtomicU64,
    pub rolled_back: AtomicU64,
    pub flushes: AtomicU64,
    pub space_refusals: AtomicU64,
    /// Gauges, refreshed by [`Store::refresh_gauges`].
    pub used_bytes: AtomicU64,
    pub capacity_bytes: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

impl Stats {
    /// Prometheus text format, labelled with the node id.
    pub fn render(&self, node: u64) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 13] = [
            ("reads_total", "counter", "Shard reads served", &self.reads),
            (
                "read_bytes_total",
                "counter",
                "Bytes of shard reads served",
                &self.read_bytes,
            ),
            (
                "writes_total",
                "counter",
                "Shard writes applied",
                &self.writes,
            ),
            (
                "written_bytes_total",
                "counter",
                "Bytes of shard writes applied",
                &self.written_bytes,
            ),
            (
                "checksum_errors_total",
                "counter",
                "Stored blocks that failed their CRC on read",
                &self.checksum_errors,
            ),
            (
                "stale_epoch_refusals_total",
                "counter",
                "Changes refused for a stale writer epoch",
                &self.stale_epoch_refusals,
            ),
            (
                "version_mismatches_total",
                "counter",
                "Writes refused because the version was not the expected one",
                &self.version_mismatches,
            ),
            (
                "stabilized_total",
                "counter",
                "Unstable versions made stable",
                &self.stabilized,
            ),
            (
                "rolled_back_total",
                "counter",
                "Unstable versions undone",
                &self.rolled_back,
            ),
            (
                "flushes_total",
                "counter",
                "Syncs of the data file and index",
                &self.flushes,
            ),
            (
                "space_refusals_total",
                "counter",
                "Allocations refused to keep the filesystem's reserve for the index",
                &self.space_refusals,
            ),
            (
                "used_bytes",
                "gauge",
                "Bytes of the data file in use",
                &self.used_bytes,
            ),
            (
                "capacity_bytes",
                "gauge",
                "Size of the data file",
                &self.capacity_bytes,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!(
                "# HELP continuum_block_{name} {help}\n# TYPE continuum_block_{name} {kind}\ncontinuum_block_{name}{{node=\"{node}\"}} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// A stabilization waiting for a device sync: versions up to `upto`, asked by the writer of
/// `epoch`. Applied only while no higher epoch has fenced the volume: a newer writer decides
/// from what it finds after fencing, and a replaced writer's queued stabilization landing
/// later would change a stripe under its decision (chaos seed 15546: half of a rollback was
/// undone by the old writer's stabilization, applied by a background flush in between).
#[derive(Clone, Copy, Debug, Default)]
struct Queued {
    upto: Version,
    epoch: u64,
}

impl Queued {
    fn merge(&mut self, upto: Version, epoch: u64) {
        self.upto = self.upto.max(upto);
        self.epoch = self.epoch.max(epoch);
    }
}

/// Shard store over a device and an index (see the module doc).
pub struct Store<D: Device, I: Index> {
    device: D,
    index: I,
    alloc: RefCell<Allocator>,
    locks: RefCell<HashMap<ObjectKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Index writes since the last sync (a flush is due when non-zero).
    unsynced: Cell<u64>,
    /// Highest epoch per volume, as in the index (read once, updated after each write of it).
    epochs: RefCell<HashMap<u64, u64>>,
    /// Stabilizations waiting for a device sync: object → highest version to stabilize.
    pending_stable: RefCell<HashMap<ObjectKey, Queued>>,
    /// The current sync generation (invariant 8): what commits now are tagged with.
    generation: Cell<u64>,
    /// The highest generation recorded in the index as covered by a device sync.
    synced: Cell<u64>,
    /// Filesystem bytes kept free for the index (see [`Store::set_space_reserve`]).
    reserve: Cell<u64>,
    /// Recently used object records, as the index holds them (see [`crate::record_cache`]).
    records: RefCell<RecordCache>,
    incarnation: u64,
    pub stats: Arc<Stats>,
}

impl<D: Device, I: Index> std::fmt::Debug for Store<D, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.alloc.borrow();
        write!(
            f,
            "Store({} of {} blocks free)",
            a.free_blocks(),
            a.total_blocks()
        )
    }
}

fn decode_record(key: &[u8], bytes: &[u8]) -> Result<ObjectRecord> {
    let rec = ObjectRecord::decode(bytes).map_err(|e| StoreError::CorruptRecord {
        key: key.to_vec(),
        reason: e.to_string(),
    })?;
    let consistent = rec.locs.len() == rec.crcs.len()
        && rec
            .undo
            .iter()
            .all(|u| u.idx.len() == u.locs.len() && u.idx.len() == u.crcs.len());
    if !consistent {
        return Err(StoreError::CorruptRecord {
            key: key.to_vec(),
            reason: "block lists of different lengths".into(),
        });
    }
    Ok(rec)
}

/// Why a request is malformed, if it is.
fn validate(req: &WriteReq, payload: usize) -> Option<&'static str> {
    let blocks = (req.length / BLOCK_BYTES as u32) as usize;
    if !req.offset.is_multiple_of(BLOCK_BYTES as u32)
        || !req.length.is_multiple_of(BLOCK_BYTES as u32)
    {
        return Some("offset and length must be multiples of 4 KiB");
    }
    if req.length == 0 {
        return Some("empty write");
    }
    if u64::from(req.offset) + u64::from(req.length) > u64::from(MAX_OBJECT_BYTES) {
        return Some("write beyond the largest object");
    }
    match req.mode {
        WriteMode::Zero if payload != 0 => Some("a zero write carries no payload"),
        WriteMode::Zero => None,
        WriteMode::Install if req.offset != 0 => Some("an install covers the object from offset 0"),
        _ if payload != req.length as usize => {
            Some("payload length differs from the write's length")
        }
        _ if req.crcs.len() != blocks => Some("one checksum per 4 KiB block is required"),
        _ => None,
    }
}

impl<D: Device, I: Index> Store<D, I> {
    /// Opens a store: rolls back versions whose blocks may not have reached the device
    /// (invariant 8), then scans every record to rebuild the free-space map.
    pub fn open(device: D, index: I) -> Result<Self> {
        let blocks = device.capacity() / BLOCK;
        let mut alloc = Allocator::new(blocks);
        let synced = read_u64(&index, SYNCED_KEY.to_vec(), "synced generation")?;
        let boot_id = device.boot_id();
        let powered_off = index.get(BOOT_KEY)?.is_none_or(|b| b != boot_id);
        let (from, to) = (vec![OBJECT_PREFIX], vec![OBJECT_PREFIX + 1]);
        let mut cursor = from;
        let mut undone: Batch = Vec::new();
        let mut rolled_back = 0;
        // After a process crash on the same boot, records may carry generations above the
        // synced one: this process's generations start above every one of them (a sync now
        // covers their writes, which the page cache kept).
        let mut highest_generation = synced;
        loop {
            let page = index.scan(&cursor, &to, MAX_LIST_OBJECTS)?;
            let Some((last, _)) = page.last() else { break };
            let mut next = last.clone();
            next.push(0);
            for (k, v) in &page {
                let mut rec = decode_record(k, v)?;
                let object = parse_object_key(k).ok_or_else(|| StoreError::CorruptRecord {
                    key: k.clone(),
                    reason: "malformed object key".into(),
                })?;
                let not_durable = rec
                    .undo
                    .iter()
                    .position(|u| u.generation > synced)
                    .filter(|_| powered_off);
                if let Some(not_durable) = not_durable {
                    if rec.undo[not_durable..]
                        .iter()
                        .any(|u| u.generation <= synced)
                    {
                        return Err(StoreError::CorruptRecord {
                            key: k.clone(),
                            reason: "undo generations out of order".into(),
                        });
                    }
                    let from = rec.undo[not_durable].version();
                    rolled_back += undo_from(&object, &mut rec, from).0;
                    undone.push(record_change(&object, &rec));
                }
                for loc in rec.all_locs() {
                    if !alloc.mark_used(loc) {
                        return Err(StoreError::DoubleClaim { block: loc, object });
                    }
                }
                highest_generation = rec
                    .undo
                    .iter()
                    .map(|u| u.generation)
                    .fold(highest_generation, u64::max);
            }
            cursor = next;
        }
        let mut incarnation = read_u64(&index, INCARNATION_KEY.to_vec(), "incarnation")?;
        if powered_off {
            // A new incarnation: what was acknowledged and not synced before may be gone.
            // A counter in the high half; in the low one a checksum of the boot and the
            // time, so a store made anew (its counter restarting) does not repeat the
            // incarnation of the one it replaces (writers compare them for equality only).
            let mut h = crc32fast::Hasher::new();
            h.update(&boot_id);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            h.update(&now.as_nanos().to_le_bytes());
            incarnation = ((incarnation >> 32) + 1) << 32 | u64::from(h.finalize());
            undone.push((
                INCARNATION_KEY.to_vec(),
                Some(incarnation.to_be_bytes().to_vec()),
            ));
            // Durable before any freed block is reused: otherwise a second power loss could
            // bring back a record claiming a block that a new write holds.
            undone.push((BOOT_KEY.to_vec(), Some(boot_id)));
            index.write(undone, true)?;
        }
        let stats = Stats::default();
        stats.rolled_back.store(rolled_back, Ordering::Relaxed);
        Ok(Self {
            device,
            index,
            alloc: RefCell::new(alloc),
            locks: RefCell::default(),
            unsynced: Cell::new(0),
            pending_stable: RefCell::default(),
            generation: Cell::new(highest_generation + 1),
            synced: Cell::new(synced),
            reserve: Cell::new(0),
            records: RefCell::new(RecordCache::new(DEFAULT_RECORD_CACHE_BYTES)),
            epochs: RefCell::default(),
            incarnation,
            stats: Arc::new(stats),
        })
    }

    /// Changes at every open after a power loss (a boot since the last open), never
    /// otherwise: writes acknowledged by an earlier incarnation and not flushed then may have
    /// been lost (rolled back at open, or never reached the index). A process restart on the
    /// same boot keeps them (the page cache did), and the incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.alloc.borrow().total_blocks() * BLOCK
    }

    pub fn used_bytes(&self) -> u64 {
        let a = self.alloc.borrow();
        (a.total_blocks() - a.free_blocks()) * BLOCK
    }

    /// Copies the space gauges into [`Stats`].
    pub fn refresh_gauges(&self) {
        self.stats
            .used_bytes
            .store(self.used_bytes(), Ordering::Relaxed);
        self.stats
            .capacity_bytes
            .store(self.capacity_bytes(), Ordering::Relaxed);
    }

    /// Whether a flush would do anything (unsynced index writes or space waiting to be freed).
    pub fn flush_due(&self) -> bool {
        self.unsynced.get() > 0
            || self.alloc.borrow().deferred_blocks() > 0
            || !self.pending_stable.borrow().is_empty()
    }

    async fn lock(&self, object: ObjectKey) -> ObjectGuard<'_, D, I> {
        let m = self.locks.borrow_mut().entry(object).or_default().clone();
        let guard = m.clone().lock_owned().await;
        ObjectGuard {
            store: self,
            object,
            _guard: Some(guard),
        }
    }

    fn load(&self, object: &ObjectKey) -> Result<ObjectRecord> {
        let key = object_key(object);
        if let Some(cached) = self.records.borrow().get(&key) {
            return match cached {
                Some(v) => decode_record(&key, v),
                None => Ok(ObjectRecord::default()),
            };
        }
        let value = self.index.get(&key)?;
        let rec = match &value {
            Some(v) => decode_record(&key, v)?,
            None => ObjectRecord::default(),
        };
        self.records.borrow_mut().put(&key, value);
        Ok(rec)
    }

    /// Sets the byte budget of the in-memory record cache (0 disables it; default
    /// [`DEFAULT_RECORD_CACHE_BYTES`]).
    pub fn set_record_cache_bytes(&self, bytes: usize) {
        self.records.borrow_mut().set_budget(bytes);
    }

    /// A u64 the index keeps under `key` (an epoch; 0 when absent).
    fn index_u64(&self, key: Vec<u8>, what: &str) -> Result<u64> {
        read_u64(&self.index, key, what)
    }

    /// Starts a new sync generation and syncs the device; returns the generation the sync
    /// covers (every commit tagged with it or below had its device writes done before).
    async fn sync_device(&self) -> Result<u64> {
        let covered = self.generation.get();
        self.generation.set(covered + 1);
        self.device.sync().await?;
        Ok(covered)
    }

    /// The index change recording that generation `covered` is durable on the device.
    fn synced_change(&self, covered: u64) -> Option<Change> {
        (covered > self.synced.get()).then(|| {
            self.synced.set(covered);
            (SYNCED_KEY.to_vec(), Some(covered.to_be_bytes().to_vec()))
        })
    }

    fn highest_epoch(&self, volume: u64) -> Result<u64> {
        if let Some(e) = self.epochs.borrow().get(&volume) {
            return Ok(*e);
        }
        let e = self.index_u64(epoch_key(volume), "epoch")?;
        self.epochs.borrow_mut().insert(volume, e);
        Ok(e)
    }

    /// Checks a reader's epoch (reads record nothing): a reader whose writer epoch is below
    /// the volume's highest is a replaced writer and is refused; 0 is a reader without a lease.
    pub fn check_reader(&self, volume: u64, epoch: u64) -> Result<()> {
        if epoch == 0 {
            return Ok(());
        }
        self.refuse_stale(volume, epoch).map(|_| ())
    }

    /// Refuses (and counts) an epoch below the volume's highest; returns the highest.
    fn refuse_stale(&self, volume: u64, epoch: u64) -> Result<u64> {
        let highest = self.highest_epoch(volume)?;
        if epoch < highest {
            bump(&self.stats.stale_epoch_refusals, 1);
            return Err(StoreError::StaleEpoch {
                volume,
                epoch,
                highest,
            });
        }
        Ok(highest)
    }

    /// Checks the epoch; returns the index change that records a higher one, if any.
    fn fence(&self, volume: u64, epoch: u64) -> Result<Option<Change>> {
        let highest = self.refuse_stale(volume, epoch)?;
        Ok((epoch > highest).then(|| (epoch_key(volume), Some(epoch.to_be_bytes().to_vec()))))
    }

    /// Reads blocks `[first, first + n)` of `rec` and verifies them; zeros where nothing is
    /// stored.
    async fn read_blocks(
        &self,
        object: &ObjectKey,
        rec: &ObjectRecord,
        first: usize,
        n: usize,
    ) -> Result<BytesMut> {
        // Filled lazily: a range that is one device run is returned as read, without a copy.
        let mut out: Option<BytesMut> = None;
        let mut i = 0;
        while i < n {
            let idx = first + i;
            let loc = rec.locs.get(idx).copied().unwrap_or(0);
            if loc == 0 {
                i += 1;
                continue;
            }
            // Coalesce blocks that are contiguous on the device too.
            let mut run = 1;
            while i + run < n && rec.locs.get(idx + run).copied() == Some(loc + run as u64) {
                run += 1;
            }
            let data = self.device.read(loc * BLOCK, run * BLOCK_BYTES).await?;
            for j in 0..run {
                let block = &data[j * BLOCK_BYTES..(j + 1) * BLOCK_BYTES];
                if crc32fast::hash(block) != rec.crcs[idx + j] {
                    bump(&self.stats.checksum_errors, 1);
                    return Err(StoreError::ChecksumMismatch {
                        object: *object,
                        block: (idx + j) as u32,
                    });
                }
            }
            if i == 0 && run == n {
                return Ok(data);
            }
            out.get_or_insert_with(|| BytesMut::zeroed(n * BLOCK_BYTES))
                [i * BLOCK_BYTES..(i + run) * BLOCK_BYTES]
                .copy_from_slice(&data);
            i += run;
        }
        Ok(out.unwrap_or_else(|| BytesMut::zeroed(n * BLOCK_BYTES)))
    }

    /// Keeps `bytes` of the filesystem around the device free: no block is allocated while
    /// [`Device::fs_free`] says less would remain. The index shares the filesystem and must
    /// be able to write (a record per shard write) and to reopen after a restart; a data file
    /// that takes the last byte stops the server for good (found by a 10-minute live chaos
    /// run: RocksDB hit ENOSPC, and every restart failed to open it). 0 disables the check.
    pub fn set_space_reserve(&self, bytes: u64) {
        self.reserve.set(bytes);
    }

    fn allocate(&self, n: u64) -> Result<Vec<crate::alloc::Run>> {
        let mut a = self.alloc.borrow_mut();
        let reserve = self.reserve.get();
        if reserve > 0 {
            if let Some(free) = self.device.fs_free() {
                if free < reserve.saturating_add(n * BLOCK) {
                    bump(&self.stats.space_refusals, 1);
                    return Err(StoreError::NoSpace {
                        needed: n,
                        free: free.saturating_sub(reserve) / BLOCK,
                    });
                }
            }
        }
        a.allocate(n).ok_or(StoreError::NoSpace {
            needed: n,
            free: a.free_blocks(),
        })
    }

    /// Allocates, flushing first when that would free space. `locked` is the object the caller
    /// holds the lock of (its own queued stabilization waits: applying it would need the lock).
    async fn allocate_or_flush(&self, n: u64, locked: ObjectKey) -> Result<Vec<crate::alloc::Run>> {
        match self.allocate(n) {
            Err(StoreError::NoSpace { .. }) if self.flush_due() => {
                self.flush_except(Some(locked)).await?;
                self.allocate(n)
            }
            r => r,
        }
    }

    /// Commits `batch` (synced when `sync`), then hands `freed` to the allocator.
    async fn commit(&self, mut batch: Batch, sync: bool, freed: Vec<u64>) -> Result<()> {
        if !sync {
            return self.commit_unsynced(batch, freed);
        }
        let covered = self.sync_device().await?;
        batch.extend(self.synced_change(covered));
        self.write_index(batch, true, freed)?;
        self.after_sync().await
    }

    /// Commits `batch` without a sync. Not async: a caller that read records and commits
    /// them here knows nothing ran in between (see [`Self::apply_stable`]).
    fn commit_unsynced(&self, batch: Batch, freed: Vec<u64>) -> Result<()> {
        self.write_index(batch, false, freed)?;
        self.unsynced.set(self.unsynced.get() + 1);
        Ok(())
    }

    /// Writes `batch` to the index, updates the cached epochs and defers `freed`.
    fn write_index(&self, batch: Batch, sync: bool, freed: Vec<u64>) -> Result<()> {
        // Epoch records of the batch, for the in-memory copy once the batch is written.
        let epochs: Vec<(u64, u64)> = batch
            .iter()
            .filter(|(k, _)| k.len() == 9 && k[0] == EPOCH_PREFIX)
            .filter_map(|(k, v)| {
                let v = v.as_ref()?;
                Some((
                    u64::from_be_bytes(k[1..9].try_into().ok()?),
                    u64::from_be_bytes(v.get(..8)?.try_into().ok()?),
                ))
            })
            .collect();
        // Object records of the batch, for the record cache once the batch is written.
        let records: Vec<(Vec<u8>, Option<Vec<u8>>)> = batch
            .iter()
            .filter(|(k, _)| k.first() == Some(&OBJECT_PREFIX))
            .cloned()
            .collect();
        if let Err(e) = self.index.write(batch, sync) {
            // What reached the index is unknown: the cache may no longer mirror it.
            self.records.borrow_mut().clear();
            return Err(e.into());
        }
        {
            let mut cache = self.records.borrow_mut();
            for (k, v) in records {
                cache.put(&k, v);
            }
        }
        {
            let mut cache = self.epochs.borrow_mut();
            for (volume, epoch) in epochs {
                cache.insert(volume, epoch);
            }
        }
        let mut a = self.alloc.borrow_mut();
        for b in freed {
            a.defer_free(b);
        }
        Ok(())
    }

    /// After a durable index write: deferred blocks become free and their space is discarded.
    async fn after_sync(&self) -> Result<()> {
        self.unsynced.set(0);
        // Discard first, free after: a block handed out again while its discard is in flight
        // would lose the new data to the hole punch.
        let freed = self.alloc.borrow_mut().take_deferred();
        let mut result = Ok(());
        // Short runs (overwrites) are reused soon; punching them out costs a synchronous
        // discard in the filesystem for nothing. Long runs (TRIM, deleted volumes) give the
        // space back to the host.
        for r in runs_of(&freed)
            .into_iter()
            .filter(|r| r.len >= DISCARD_MIN_BLOCKS)
        {
            if let Err(e) = self.device.discard(r.start * BLOCK, r.len * BLOCK).await {
                result = Err(e);
                break;
            }
        }
        self.alloc.borrow_mut().release(&freed);
        result.map_err(StoreError::from)
    }

    /// Writes one shard range (see [`WriteReq`] and the module's invariants).
    pub async fn write(&self, req: &WriteReq, payload: Bytes) -> Result<WriteOutcome> {
        if let Some(reason) = validate(req, payload.len()) {
            return Err(StoreError::Invalid {
                reason,
                offset: req.offset,
                length: req.length,
                payload: payload.len(),
            });
        }
        let object = req.object;
        if req.mode != WriteMode::Zero {
            // Verify the payload right before it is written (CONVENTIONS: checksums).
            if let Err(checksum::ChecksumError::Mismatch { block, .. }) =
                checksum::verify(&payload, &req.crcs)
            {
                return Err(StoreError::BadPayload {
                    object,
                    block: block as u32,
                });
            }
        }
        let _g = self.lock(object).await;
        let epoch_change = self.fence(object.volume, req.epoch)?;
        let mut rec = self.load(&object)?;
        let current = rec.version();
        // An install may repeat the current version: it rewrites a shard whose content was
        // found corrupt (bit rot) without changing what version it holds.
        let older = if req.mode == WriteMode::Install {
            req.version < current
        } else {
            req.version <= current
        };
        if older {
            bump(&self.stats.version_mismatches, 1);
            return Err(StoreError::VersionNotNewer {
                object,
                version: req.version,
                current,
            });
        }
        if req.mode != WriteMode::Install && req.base != current {
            bump(&self.stats.version_mismatches, 1);
            return Err(StoreError::VersionMismatch {
                object,
                expected: req.base,
                current,
            });
        }
        for &(shard, expected) in &req.data_base {
            let recorded = rec.data_version(shard);
            if recorded != expected {
                bump(&self.stats.version_mismatches, 1);
                return Err(StoreError::DataVersionMismatch {
                    object,
                    shard,
                    expected,
                    recorded,
                });
            }
        }
        let first = (req.offset / BLOCK_BYTES as u32) as usize;
        let n = (req.length / BLOCK_BYTES as u32) as usize;
        // This object's queued stabilization is applied now when its record grows long or the
        // space it holds is needed (the device sync first: invariant 7).
        let mut freed = Vec::new();
        let low_space = req.mode != WriteMode::Zero && self.alloc.borrow().free_blocks() < n as u64;
        if rec.undo.len() >= APPLY_STABLE_AT || low_space {
            let queued = self.pending_stable.borrow_mut().remove(&object);
            if let Some(queued) = queued {
                let covered = self.sync_device().await?;
                freed = self.drop_stable(&object, &mut rec, queued, covered)?.1;
                if low_space {
                    let change = vec![record_change(&object, &rec)];
                    self.commit(change, true, std::mem::take(&mut freed))
                        .await?;
                }
            }
        }
        if rec.undo.len() >= MAX_UNSTABLE_VERSIONS {
            return Err(StoreError::TooManyUnstable {
                object,
                limit: MAX_UNSTABLE_VERSIONS,
            });
        }
        let need_old = req.return_old || req.mode == WriteMode::Xor;
        let old = if need_old {
            Some(self.read_blocks(&object, &rec, first, n).await?)
        } else {
            None
        };
        // The new bytes and their checksums.
        let (new, crcs): (Option<Bytes>, Vec<u32>) = match req.mode {
            WriteMode::Zero => (None, vec![0; n]),
            WriteMode::Data | WriteMode::Install => (Some(payload), req.crcs.clone()),
            WriteMode::Xor => {
                let mut b = old.clone().unwrap_or_default();
                for (x, y) in b.iter_mut().zip(payload.iter()) {
                    *x ^= y;
                }
                let crcs = checksum::compute(&b);
                (Some(b.freeze()), crcs)
            }
        };
        // Redirect-on-write: the new bytes go to fresh blocks; all-zero blocks take no space
        // (thin provisioning: location 0 reads as zeros).
        let mut locs = vec![0u64; n];
        let mut crcs = crcs;
        if let Some(data) = &new {
            let nonzero: Vec<usize> = (0..n)
                .filter(|&i| {
                    data[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]
                        .iter()
                        .any(|b| *b != 0)
                })
                .collect();
            let runs = if nonzero.is_empty() {
                Vec::new()
            } else {
                self.allocate_or_flush(nonzero.len() as u64, object).await?
            };
            let blocks = runs.iter().flat_map(|r| r.start..r.start + r.len);
            for (&i, loc) in nonzero.iter().zip(blocks) {
                locs[i] = loc;
            }
            for i in 0..n {
                if locs[i] == 0 {
                    crcs[i] = 0;
                }
            }
            // One device write per stretch contiguous in both the payload and the device.
            let mut written = Ok(());
            let mut i = 0;
            while i < n && written.is_ok() {
                if locs[i] == 0 {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < n && locs[j] == locs[j - 1] + 1 {
                    j += 1;
                }
                let piece = data.slice(i * BLOCK_BYTES..j * BLOCK_BYTES);
                written = self.device.write(locs[i] * BLOCK, piece).await;
                i = j;
            }
            if let Err(e) = written {
                // Nothing references the new blocks: free them (no index change to wait for).
                let mut a = self.alloc.borrow_mut();
                for &l in &locs {
                    a.defer_free(l);
                }
                return Err(e.into());
            }
        }
        // The undo entry: what this version replaces.
        let prev_len = rec.locs.len();
        let touched: Vec<usize> = if req.mode == WriteMode::Install {
            (0..prev_len.max(n)).collect()
        } else {
            (first..first + n).collect()
        };
        let mut undo = UndoRecord {
            epoch: req.version.epoch,
            seq: req.version.seq,
            prev_epoch: current.epoch,
            prev_seq: current.seq,
            write_set: req.write_set,
            prev_len: prev_len as u32,
            prev_data_versions: rec.data_versions.clone(),
            // No await from here to the commit: the tag is the generation it commits in.
            generation: self.generation.get(),
            ..Default::default()
        };
        for &i in &touched {
            undo.idx.push(i as u32);
            undo.locs.push(rec.locs.get(i).copied().unwrap_or(0));
            undo.crcs.push(rec.crcs.get(i).copied().unwrap_or(0));
        }
        let new_len = if req.mode == WriteMode::Install {
            n
        } else {
            prev_len.max(first + n)
        };
        rec.locs.resize(prev_len.max(new_len), 0);
        rec.crcs.resize(prev_len.max(new_len), 0);
        for &i in &touched {
            let (l, c) = if i >= first && i < first + n {
                (locs[i - first], crcs[i - first])
            } else {
                (0, 0)
            };
            rec.locs[i] = l;
            rec.crcs[i] = c;
        }
        rec.locs.truncate(new_len);
        rec.crcs.truncate(new_len);
        rec.undo.push(undo);
        rec.set_version(req.version);
        if req.mode == WriteMode::Install {
            rec.data_versions.clear();
        }
        for &(shard, v) in &req.data_after {
            rec.set_data_version(shard, v);
        }
        let mut batch: Batch = vec![(object_key(&object), Some(rec.encode_to_vec()))];
        batch.extend(epoch_change);
        self.commit(batch, req.fua, freed).await?;
        bump(&self.stats.writes, 1);
        bump(&self.stats.written_bytes, u64::from(req.length));
        Ok(WriteOutcome {
            previous: current,
            old: if req.return_old {
                old.map(BytesMut::freeze)
            } else {
                None
            },
            incarnation: self.incarnation,
        })
    }

    /// Reads `[offset, offset + length)` of an object at its current version, verifying every
    /// block. A missing object reads as zeros with `Version::NONE`.
    pub async fn read(&self, object: ObjectKey, offset: u32, length: u32) -> Result<ReadOutcome> {
        let aligned =
            offset.is_multiple_of(BLOCK_BYTES as u32) && length.is_multiple_of(BLOCK_BYTES as u32);
        if !aligned || u64::from(offset) + u64::from(length) > u64::from(MAX_OBJECT_BYTES) {
            return Err(StoreError::Invalid {
                reason: "reads are 4 KiB-aligned and within the largest object",
                offset,
                length,
                payload: 0,
            });
        }
        let _g = self.lock(object).await;
        let rec = self.load(&object)?;
        let first = (offset / BLOCK_BYTES as u32) as usize;
        let n = (length / BLOCK_BYTES as u32) as usize;
        let data = self.read_blocks(&object, &rec, first, n).await?.freeze();
        let crcs = (first..first + n)
            .map(|i| match rec.locs.get(i) {
                Some(&l) if l != 0 => rec.crcs[i],
                _ => {
                    crc32fast::hash(&data[(i - first) * BLOCK_BYTES..(i - first + 1) * BLOCK_BYTES])
                }
            })
            .collect();
        bump(&self.stats.reads, 1);
        bump(&self.stats.read_bytes, u64::from(length));
        Ok(ReadOutcome {
            version: rec.version(),
            data,
            crcs,
            data_versions: dv_list(&rec.data_versions),
        })
    }

    /// Marks versions up to `version` of each object stable: their undo data is released
    /// once their blocks are durable (invariant 7: at the next flush).
    pub async fn stabilize(&self, epoch: u64, objects: &[(ObjectKey, Version)]) -> Result<()> {
        for &(object, version) in objects {
            if let Some(change) = self.fence(object.volume, epoch)? {
                self.commit(vec![change], false, Vec::new()).await?;
            }
            let mut pending = self.pending_stable.borrow_mut();
            pending.entry(object).or_default().merge(version, epoch);
        }
        Ok(())
    }

    /// Applies queued stabilizations (the device was synced after they were queued, covering
    /// generation `covered`).
    ///
    /// Objects nobody holds or waits for are done in batches of one index write each. There is
    /// no await from reading their records to committing them, so the object lock is not
    /// needed: the store runs on one thread. The others take their lock one by one.
    async fn apply_stable(&self, queued: HashMap<ObjectKey, Queued>, covered: u64) -> Result<()> {
        // Sorted out before anything awaits, so "nobody holds or waits" stays true until the
        // batches below are committed.
        let (free, contended): (Vec<_>, Vec<_>) = queued
            .into_iter()
            .partition(|(object, _)| !self.locks.borrow().contains_key(object));
        for chunk in free.chunks(APPLY_BATCH) {
            let (mut batch, mut freed, mut done): (Batch, Vec<u64>, u64) = Default::default();
            for &(object, q) in chunk {
                let mut rec = self.load(&object)?;
                let (n, f) = self.drop_stable(&object, &mut rec, q, covered)?;
                if n > 0 {
                    batch.push(record_change(&object, &rec));
                    freed.extend(f);
                    done += n;
                }
            }
            if !batch.is_empty() {
                self.commit_unsynced(batch, freed)?;
                bump(&self.stats.stabilized, done);
            }
        }
        for (object, queued) in contended {
            let _g = self.lock(object).await;
            let mut rec = self.load(&object)?;
            let (done, freed) = self.drop_stable(&object, &mut rec, queued, covered)?;
            if done == 0 {
                continue;
            }
            self.commit(vec![record_change(&object, &rec)], false, freed)
                .await?;
            bump(&self.stats.stabilized, done);
        }
        Ok(())
    }

    /// Undoes versions at or above `version` of each object, newest first, restoring what
    /// they replaced.
    pub async fn rollback(&self, epoch: u64, objects: &[(ObjectKey, Version)]) -> Result<()> {
        for &(object, version) in objects {
            let _g = self.lock(object).await;
            let epoch_change = self.fence(object.volume, epoch)?;
            let mut rec = self.load(&object)?;
            let (undone, freed) = undo_from(&object, &mut rec, version);
            {
                // A queued stabilization of what is undone is void.
                let mut pending = self.pending_stable.borrow_mut();
                if pending.get(&object).is_some_and(|p| p.upto >= version) {
                    pending.remove(&object);
                }
            }
            if undone == 0 && epoch_change.is_none() {
                continue;
            }
            let mut batch = vec![record_change(&object, &rec)];
            batch.extend(epoch_change);
            self.commit(batch, false, freed).await?;
            bump(&self.stats.rolled_back, undone);
        }
        Ok(())
    }

    fn info(object: ObjectKey, rec: &ObjectRecord) -> ObjectInfo {
        ObjectInfo {
            object,
            version: rec.version(),
            unstable: rec
                .undo
                .iter()
                .map(|u| UndoInfo {
                    version: Version::new(u.epoch, u.seq),
                    previous: Version::new(u.prev_epoch, u.prev_seq),
                    write_set: u.write_set,
                })
                .collect(),
            data_versions: dv_list(&rec.data_versions),
            length: (rec.locs.len() * BLOCK_BYTES) as u32,
        }
    }

    /// Objects of `volume` after `after` (exclusive), up to `limit`; whether more follow.
    pub fn list(
        &self,
        volume: u64,
        after: Option<ObjectKey>,
        limit: usize,
        unstable_only: bool,
    ) -> Result<(Vec<ObjectInfo>, bool)> {
        let limit = limit.clamp(1, MAX_LIST_OBJECTS);
        let (from, to) = volume_range(volume);
        let mut cursor = match after {
            Some(a) => {
                let mut k = object_key(&a);
                k.push(0);
                k.max(from)
            }
            None => from,
        };
        let mut out = Vec::new();
        loop {
            let page = self.index.scan(&cursor, &to, MAX_LIST_OBJECTS)?;
            let Some((last, _)) = page.last() else {
                return Ok((out, false));
            };
            let mut next = last.clone();
            next.push(0);
            for (k, v) in &page {
                let rec = decode_record(k, v)?;
                if unstable_only && rec.undo.is_empty() {
                    continue;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                let object = parse_object_key(k).ok_or_else(|| StoreError::CorruptRecord {
                    key: k.clone(),
                    reason: "malformed object key".into(),
                })?;
                out.push(Self::info(object, &rec));
            }
            cursor = next;
        }
    }

    /// What the store knows of each object (absent ones have `Version::NONE`).
    pub fn stat(&self, objects: &[ObjectKey]) -> Result<Vec<ObjectInfo>> {
        objects
            .iter()
            .map(|o| Ok(Self::info(*o, &self.load(o)?)))
            .collect()
    }

    /// Makes everything written so far durable (NBD FLUSH), then frees superseded space.
    pub async fn flush(&self) -> Result<()> {
        self.flush_except(None).await
    }

    async fn flush_except(&self, locked: Option<ObjectKey>) -> Result<()> {
        // Stabilizations queued before the device sync may be applied after it (invariant 7).
        let queued = {
            let mut pending = self.pending_stable.borrow_mut();
            let mut queued = std::mem::take(&mut *pending);
            if let Some((o, v)) = locked.and_then(|o| queued.remove_entry(&o)) {
                pending.insert(o, v);
            }
            queued
        };
        let covered = self.sync_device().await?;
        self.apply_stable(queued, covered).await?;
        if let Some(change) = self.synced_change(covered) {
            self.index.write(vec![change], false)?;
        }
        self.index.sync()?;
        self.after_sync().await?;
        bump(&self.stats.flushes, 1);
        Ok(())
    }

    /// Records `epoch` as the volume's highest, durably; refused when a higher one exists.
    /// Returns the highest epoch before.
    pub async fn fence_volume(&self, volume: u64, epoch: u64) -> Result<u64> {
        Ok(self.fence_open(volume, epoch, None).await?.0)
    }

    /// Fences `volume` at `epoch` and, with `opened` (a note of this epoch), records that
    /// the writer of `epoch` has reconciled and serves I/O, with the stripes it left
    /// undecided; a note replaces one of the same epoch only with a higher `record`.
    /// Returns the highest epoch, the highest opened epoch and that writer's last note, as
    /// recorded before (durable when it returns).
    pub async fn fence_open(
        &self,
        volume: u64,
        epoch: u64,
        opened: Option<&OpenedNote>,
    ) -> Result<(u64, u64, OpenedNote)> {
        let previous = self.highest_epoch(volume)?;
        let previous_opened = self.index_u64(opened_key(volume), "opened epoch")?;
        let key = undecided_key(volume);
        let note = match self.index.get(&key)? {
            Some(v) => OpenedNote::decode(&key, &v)?,
            None => OpenedNote::default(),
        };
        // A note of an older opened epoch (or none): the opened writer left nothing undecided.
        let note = if note.epoch == previous_opened {
            note
        } else {
            OpenedNote {
                epoch: previous_opened,
                ..OpenedNote::default()
            }
        };
        let mut changes: Vec<Change> = self.fence(volume, epoch)?.into_iter().collect();
        if let Some(mine) = opened.filter(|n| n.epoch == epoch) {
            if epoch > previous_opened {
                changes.push((opened_key(volume), Some(epoch.to_be_bytes().to_vec())));
            }
            if epoch > previous_opened || (epoch == previous_opened && mine.record > note.record) {
                changes.push((key, Some(mine.encode())));
            }
        }
        if !changes.is_empty() {
            self.commit(changes, true, Vec::new()).await?;
        }
        Ok((previous, previous_opened, note))
    }

    /// Deletes every object of `volume` (its space is freed at the next flush).
    pub async fn delete_volume(&self, volume: u64, epoch: u64) -> Result<usize> {
        let epoch_change = self.fence(volume, epoch)?;
        let mut deleted = 0;
        loop {
            let (page, more) = self.list(volume, None, MAX_LIST_OBJECTS, false)?;
            for info in &page {
                let _g = self.lock(info.object).await;
                let rec = self.load(&info.object)?;
                let freed: Vec<u64> = rec.all_locs().collect();
                self.commit(vec![(object_key(&info.object), None)], false, freed)
                    .await?;
                deleted += 1;
            }
            if !more {
                break;
            }
        }
        if let Some(change) = epoch_change {
            self.commit(vec![change], false, Vec::new()).await?;
        }
        Ok(deleted)
    }
}

/// A u64 the index keeps under `key` (0 when absent).
fn read_u64<I: Index>(index: &I, key: Vec<u8>, what: &str) -> Result<u64> {
    match index.get(&key)? {
        Some(v) if v.len() == 8 => Ok(u64::from_be_bytes(v[..8].try_into().unwrap_or_default())),
        Some(_) => Err(StoreError::CorruptRecord {
            key,
            reason: format!("{what} is not 8 bytes"),
        }),
        None => Ok(0),
    }
}

fn record_change(object: &ObjectKey, rec: &ObjectRecord) -> Change {
    let key = object_key(object);
    if rec.is_empty() {
        (key, None)
    } else {
        (key, Some(rec.encode_to_vec()))
    }
}

/// Undoes versions at or above `version`, newest first, restoring what they replaced;
/// returns how many and the blocks they had written.
fn undo_from(object: &ObjectKey, rec: &mut ObjectRecord, version: Version) -> (u64, Vec<u64>) {
    let mut freed = Vec::new();
    let mut undone = 0;
    while rec.undo.last().is_some_and(|u| u.version() >= version) {
        let u = rec.undo.pop().expect("checked above");
        for ((&i, &l), &c) in u.idx.iter().zip(&u.locs).zip(&u.crcs) {
            let i = i as usize;
            if i >= rec.locs.len() {
                rec.locs.resize(i + 1, 0);
                rec.crcs.resize(i + 1, 0);
            }
            freed.push(rec.locs[i]);
            rec.locs[i] = l;
            rec.crcs[i] = c;
        }
        let prev_len = u.prev_len as usize;
        for l in rec.locs.iter().skip(prev_len) {
            assert_eq!(*l, 0, "object {object}: blocks beyond the undone length");
        }
        rec.locs.truncate(prev_len);
        rec.crcs.truncate(prev_len);
        rec.set_version(Version::new(u.prev_epoch, u.prev_seq));
        rec.data_versions = u.prev_data_versions;
        undone += 1;
    }
    freed.retain(|l| *l != 0);
    (undone, freed)
}

impl<D: Device, I: Index> Store<D, I> {
    /// Drops the undo entries of versions up to `queued.upto` whose blocks a device sync
    /// covering generation `covered` made durable; returns how many and the blocks they held.
    /// Versions up to `upto` of a later generation stay queued for the next sync; nothing is
    /// dropped for a writer that a newer one has fenced since it asked (see [`Queued`]).
    fn drop_stable(
        &self,
        object: &ObjectKey,
        rec: &mut ObjectRecord,
        queued: Queued,
        covered: u64,
    ) -> Result<(u64, Vec<u64>)> {
        if queued.epoch < self.highest_epoch(object.volume)? {
            return Ok((0, Vec::new()));
        }
        let Queued { upto, epoch } = queued;
        let keep_from = rec
            .undo
            .iter()
            .position(|u| u.version() > upto || u.generation > covered)
            .unwrap_or(rec.undo.len());
        let done: Vec<UndoRecord> = rec.undo.drain(..keep_from).collect();
        if rec.undo.first().is_some_and(|u| u.version() <= upto) {
            let mut pending = self.pending_stable.borrow_mut();
            pending.entry(*object).or_default().merge(upto, epoch);
        }
        let freed = done
            .iter()
            .flat_map(|u| u.locs.iter().copied())
            .filter(|l| *l != 0)
            .collect();
        Ok((done.len() as u64, freed))
    }
}

/// Holds an object's lock; drops the lock table entry when no one else waits on it.
struct ObjectGuard<'a, D: Device, I: Index> {
    store: &'a Store<D, I>,
    object: ObjectKey,
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<D: Device, I: Index> Drop for ObjectGuard<'_, D, I> {
    fn drop(&mut self) {
        self._guard = None;
        let mut locks = self.store.locks.borrow_mut();
        if let Some(m) = locks.get(&self.object) {
            // Only the table holds it: nobody waits.
            if Arc::strong_count(m) == 1 {
                locks.remove(&self.object);
            }
        }
    }
}
