//! Where a block server keeps shard metadata (object records, per-volume epochs): an ordered
//! key-value store behind the narrow [`Index`] trait.
//!
//! - [`RocksIndex`]: RocksDB with its write-ahead log; a synced write is durable when it returns.
//! - [`MemIndex`]: the in-memory twin. Unsynced batches are volatile; [`MemIndex::crash`] keeps
//!   a prefix of them (RocksDB's WAL is sequential, so a crash never keeps a later batch
//!   without the earlier ones).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// One change: `(key, Some(value))` puts, `(key, None)` deletes.
pub type Change = (Vec<u8>, Option<Vec<u8>>);
/// An atomic list of changes.
pub type Batch = Vec<Change>;
/// Key-value pairs read by a scan.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index storage error: {source}")]
    Rocks {
        #[from]
        source: rocksdb::Error,
    },
}

pub trait Index {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, IndexError>;
    /// Applies `batch` atomically; durable on return when `sync`.
    fn write(&self, batch: Batch, sync: bool) -> Result<(), IndexError>;
    /// Up to `limit` pairs with `from <= key < to`, in key order.
    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Pairs, IndexError>;
    /// Makes every earlier write durable.
    fn sync(&self) -> Result<(), IndexError>;
}

/// RocksDB-backed index.
pub struct RocksIndex {
    db: rocksdb::DB,
}

impl std::fmt::Debug for RocksIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RocksIndex({:?})", self.db.path())
    }
}

impl RocksIndex {
    /// Opens (creating) the index of a data file of `capacity` bytes. Its footprint is sized
    /// to it: memtables of capacity/64 (4 to 64 MiB, two of them), a write-ahead log of at
    /// most four memtables, two log files kept for reuse. RocksDB's defaults (64 MiB
    /// memtables, logs kept whole until a memtable flush) took more than the 64 MiB left
    /// beside a 256 MiB data file in the live chaos run, and filled the filesystem.
    pub fn open(path: &std::path::Path, capacity: u64) -> Result<Self, IndexError> {
        let memtable = (capacity / 64).clamp(4 << 20, 64 << 20);
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_write_buffer_size(memtable as usize);
        opts.set_max_write_buffer_number(2);
        opts.set_max_total_wal_size(4 * memtable);
        opts.set_recycle_log_file_num(2);
        opts.set_max_background_jobs(2);
        Ok(Self {
            db: rocksdb::DB::open(&opts, path)?,
        })
    }
}

impl Index for RocksIndex {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, IndexError> {
        Ok(self.db.get(key)?)
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), IndexError> {
        let mut wb = rocksdb::WriteBatch::default();
        for (k, v) in batch {
            match v {
                Some(v) => wb.put(k, v),
                None => wb.delete(k),
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.db.write_opt(wb, &wo)?)
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Pairs, IndexError> {
        let mut out = Vec::new();
        let iter = self.db.iterator(rocksdb::IteratorMode::From(
            from,
            rocksdb::Direction::Forward,
        ));
        for item in iter {
            let (k, v) = item?;
            if &*k >= to || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn sync(&self) -> Result<(), IndexError> {
        Ok(self.db.flush_wal(true)?)
    }
}

#[derive(Default)]
struct MemIndexState {
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    volatile: Vec<Batch>,
    current: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// In-memory [`Index`] with crash semantics (see the module doc). Clones share state.
#[derive(Clone, Default)]
pub struct MemIndex {
    state: Rc<RefCell<MemIndexState>>,
}

impl std::fmt::Debug for MemIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemIndex")
    }
}

fn apply(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, batch: &Batch) {
    for (k, v) in batch {
        match v {
            Some(v) => map.insert(k.clone(), v.clone()),
            None => map.remove(k),
        };
    }
}

impl MemIndex {
    /// Power loss: the first `keep` unsynced batches survive, the rest are gone.
    pub fn crash(&self, keep: usize) {
        let mut s = self.state.borrow_mut();
        let volatile = std::mem::take(&mut s.volatile);
        for b in volatile.iter().take(keep) {
            apply(&mut s.durable, b);
        }
        s.current = s.durable.clone();
    }

    /// Unsynced batches (what a crash may lose).
    pub fn unsynced(&self) -> usize {
        self.state.borrow().volatile.len()
    }
}

impl Index for MemIndex {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, IndexError> {
        Ok(self.state.borrow().current.get(key).cloned())
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), IndexError> {
        let mut s = self.state.borrow_mut();
        apply(&mut s.current, &batch);
        s.volatile.push(batch);
        if sync {
            let volatile = std::mem::take(&mut s.volatile);
            for b in &volatile {
                apply(&mut s.durable, b);
            }
        }
        Ok(())
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Pairs, IndexError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .state
            .borrow()
            .current
            .range(from.to_vec()..to.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn sync(&self) -> Result<(), IndexError> {
        let mut s = self.state.borrow_mut();
        let volatile = std::mem::take(&mut s.volatile);
        for b in &volatile {
            apply(&mut s.durable, b);
        }
        Ok(())
    }
}
