//! The narrow storage trait under meta: an ordered key-value engine with atomic batches.
//!
//! [`RocksEngine`] is the real one. [`MemEngine`] is its in-memory twin for tests and the
//! deterministic simulator; it models a crash: writes made with `sync = false` since the last
//! synced write may be lost (as a prefix-preserving tail, like RocksDB's WAL after power loss),
//! and a disk-full fault fails writes. Recovery must work under both, because meta only
//! acknowledges after a synced write and orders every write so that a lost tail is harmless.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::StoreError;

/// One mutation in a [`WriteBatch`].
#[derive(Clone, Debug)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Deletes every key in `[start, end)`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// Mutations applied atomically: all or none survive a crash.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    pub ops: Vec<Op>,
}

impl WriteBatch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(key.into(), value.into()));
    }
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(key.into()));
    }
    pub fn delete_range(&mut self, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops.push(Op::DeleteRange(start.into(), end.into()));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Key-value pairs as returned by [`Engine::scan`].
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered key-value engine.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Pairs with keys in `[start, end)`, in key order, at most `limit` of them, read from one
    /// consistent view.
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError>;
    /// Applies `batch` atomically; with `sync`, it (and everything written before it) is durable
    /// when this returns.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError>;
    /// Approximate bytes used on disk.
    fn size_bytes(&self) -> u64;
}

/// RocksDB-backed engine: one database, one column family, key prefixes per table.
pub struct RocksEngine {
    db: rocksdb::DB,
}

impl RocksEngine {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Metadata is small. A small memtable also bounds what a flush (including the one at
        // start-up, which replays the WAL) must write: the free-space reserve
        // (`min_free_bytes`) has to cover it, so a member that refused writes for lack of
        // space can still restart and serve reads.
        opts.set_write_buffer_size(8 * 1024 * 1024);
        // Reuse old WAL files: syncing a write into an already allocated file needs no
        // metadata update, which halves fdatasync latency here (one sync per Raft Ready round).
        opts.set_recycle_log_file_num(4);
        // Let the state machine's unsynced writes enter the memtable while the log writer's
        // WAL sync is in flight, instead of queueing behind it.
        opts.set_enable_pipelined_write(true);
        // Background compaction yields the CPU to the Raft loop (tail latency under load);
        // extra memtables absorb a flush that runs late instead of stalling writes.
        if let Ok(mut env) = rocksdb::Env::new() {
            env.lower_thread_pool_cpu_priority();
            env.lower_thread_pool_io_priority();
            opts.set_env(&env);
        }
        opts.set_max_write_buffer_number(4);
        opts.set_max_background_jobs(2);
        let db = rocksdb::DB::open(&opts, path).map_err(|e| StoreError::Engine {
            reason: e.to_string(),
        })?;
        Ok(Self { db })
    }
}

fn rocks_err(e: rocksdb::Error) -> StoreError {
    let reason = e.to_string();
    if reason.contains("No space left") || reason.contains("NoSpace") {
        StoreError::NoSpace { reason }
    } else {
        StoreError::Engine { reason }
    }
}

impl Engine for RocksEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(key).map_err(rocks_err)
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let iter = self.db.iterator_opt(
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward),
            ro,
        );
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item.map_err(rocks_err)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put(k, v) => wb.put(k, v),
                Op::Delete(k) => wb.delete(k),
                Op::DeleteRange(s, e) => wb.delete_range(s, e),
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(rocks_err)
    }

    fn size_bytes(&self) -> u64 {
        let prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        prop("rocksdb.total-sst-files-size") + prop("rocksdb.cur-size-all-mem-tables")
    }
}

#[derive(Default)]
struct MemInner {
    /// What a reader sees (everything written).
    live: BTreeMap<Vec<u8>, Vec<u8>>,
    /// What survives a crash (state as of the last synced write).
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Unsynced batches since `durable`, oldest first.
    unsynced: Vec<WriteBatch>,
    /// Fault: fail every write with NoSpace.
    full: bool,
}

/// In-memory twin of [`RocksEngine`] with crash and disk-full faults (see the module doc).
/// Cloning shares the same "disk", so a test can crash a node and reopen its storage.
#[derive(Clone, Default)]
pub struct MemEngine {
    inner: Arc<Mutex<MemInner>>,
}

fn apply_ops(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, batch: &WriteBatch) {
    for op in &batch.ops {
        match op {
            Op::Put(k, v) => {
                map.insert(k.clone(), v.clone());
            }
            Op::Delete(k) => {
                map.remove(k);
            }
            Op::DeleteRange(s, e) => {
                let doomed: Vec<_> = map
                    .range(s.clone()..e.clone())
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in doomed {
                    map.remove(&k);
                }
            }
        }
    }
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a crash: keeps the synced state plus the first `keep_unsynced` unsynced batches
    /// (a prefix, as a write-ahead log would), drops the rest.
    pub fn crash(&self, keep_unsynced: usize) {
        let mut g = self.inner.lock().unwrap();
        let kept: Vec<WriteBatch> = g.unsynced.drain(..).take(keep_unsynced).collect();
        for b in &kept {
            let mut durable = std::mem::take(&mut g.durable);
            apply_ops(&mut durable, b);
            g.durable = durable;
        }
        g.live = g.durable.clone();
    }

    /// Number of unsynced batches a crash could lose.
    pub fn unsynced_batches(&self) -> usize {
        self.inner.lock().unwrap().unsynced.len()
    }

    /// Turns the disk-full fault on or off.
    pub fn set_full(&self, full: bool) {
        self.inner.lock().unwrap().full = full;
    }
}

impl Engine for MemEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.lock().unwrap().live.get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let g = self.inner.lock().unwrap();
        Ok(g.live
            .range(start.to_vec()..end.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut g = self.inner.lock().unwrap();
        if g.full {
            return Err(StoreError::NoSpace {
                reason: "simulated full disk".into(),
            });
        }
        apply_ops(&mut g.live, &batch);
        g.unsynced.push(batch);
        if sync {
            g.durable = g.live.clone();
            g.unsynced.clear();
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let g = self.inner.lock().unwrap();
        g.live.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_crash_keeps_synced_and_a_prefix_of_unsynced() {
        let e = MemEngine::new();
        let mut b = WriteBatch::default();
        b.put(b"a".to_vec(), b"1".to_vec());
        e.write(b, true).unwrap();
        for k in [b"b", b"c"] {
            let mut b = WriteBatch::default();
            b.put(k.to_vec(), b"2".to_vec());
            e.write(b, false).unwrap();
        }
        e.crash(1);
        assert_eq!(e.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(e.get(b"b").unwrap(), Some(b"2".to_vec()));
        assert_eq!(e.get(b"c").unwrap(), None);
    }

    #[test]
    fn rocks_roundtrip_scan_and_delete_range() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path()).unwrap();
        let mut b = WriteBatch::default();
        for i in 0u8..10 {
            b.put(vec![1, i], vec![i]);
        }
        e.write(b, true).unwrap();
        assert_eq!(e.scan(&[1, 2], &[1, 5], 100).unwrap().len(), 3);
        let mut b = WriteBatch::default();
        b.delete_range(vec![1, 0], vec![1, 8]);
        e.write(b, true).unwrap();
        let left = e.scan(&[1], &[2], 100).unwrap();
        assert_eq!(left, vec![(vec![1, 8], vec![8]), (vec![1, 9], vec![9])]);
    }
}
