//! The block server's in-memory copy of recently used object records (encoded, as in the
//! index), so a shard write or a stabilization does not search RocksDB's memtable for the
//! record it just wrote. A 4 KiB random-write profile of six servers had 7.5–11 % of the
//! machine in `MemTable::Get` (skiplist search over many versions of the same keys); with the
//! cache that is gone, though an A/B run gained only a few per cent of CPU per write (the
//! inserts that follow now pay most of the search).
//!
//! Invariant: an entry equals what the index holds under its key (`None`: the key is absent).
//! The store updates the cache only after an index write succeeded, and drops all of it when
//! one failed (what reached the index is then unknown). Entries leave in insertion order
//! (FIFO) once the byte budget is exceeded; a budget of 0 disables the cache.

use std::collections::{HashMap, VecDeque};

/// Bytes counted per entry besides its key and value (map and queue slots).
const ENTRY_OVERHEAD: usize = 64;

#[derive(Debug, Default)]
pub struct RecordCache {
    map: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Every key of `map` exactly once, oldest first.
    order: VecDeque<Vec<u8>>,
    bytes: usize,
    budget: usize,
}

fn cost(key: &[u8], value: &Option<Vec<u8>>) -> usize {
    key.len() * 2 + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD
}

impl RecordCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    /// The cached value: `None` when not cached, `Some(None)` when the index has no such key.
    pub fn get(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.map.get(key).map(|v| v.as_deref())
    }

    /// Records that the index now holds `value` under `key`.
    pub fn put(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        if self.budget == 0 {
            return;
        }
        let added = cost(key, &value);
        match self.map.get_mut(key) {
            Some(old) => {
                self.bytes -= cost(key, old);
                *old = value;
            }
            None => {
                self.map.insert(key.to_vec(), value);
                self.order.push_back(key.to_vec());
            }
        }
        self.bytes += added;
        self.shrink();
    }

    /// Forgets everything (after an index write whose outcome is unknown).
    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
    }

    /// Changes the budget (evicting down to it; 0 disables and empties the cache).
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        if budget == 0 {
            self.clear();
        }
        self.shrink();
    }

    /// Evicts the oldest entries until the cache fits its budget.
    fn shrink(&mut self) {
        while self.bytes > self.budget {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.map.remove(&oldest) {
                self.bytes -= cost(&oldest, &v);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        /// Against a model of the index: every cached entry equals the model; the byte count
        /// stays within the budget and equals the entries' cost; map and queue agree.
        #[test]
        fn cache_mirrors_the_index(
            budget in 0usize..2000,
            ops in proptest::collection::vec((0u8..20, proptest::option::of(0usize..200)), 0..300),
        ) {
            let mut cache = RecordCache::new(budget);
            let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            for (k, v) in ops {
                let key = vec![b'o', k];
                let value = v.map(|n| vec![k; n]);
                model.insert(key.clone(), value.clone());
                cache.put(&key, value);
                prop_assert!(cache.bytes <= budget);
                prop_assert_eq!(cache.order.len(), cache.map.len());
                let total: usize = cache.map.iter().map(|(k, v)| cost(k, v)).sum();
                prop_assert_eq!(total, cache.bytes);
                for (k, v) in &cache.map {
                    prop_assert_eq!(model.get(k), Some(v));
                }
            }
        }
    }

    #[test]
    fn oldest_entries_leave_first() {
        let one = cost(b"ka", &Some(vec![0; 10]));
        let mut c = RecordCache::new(one * 2);
        c.put(b"ka", Some(vec![0; 10]));
        c.put(b"kb", Some(vec![1; 10]));
        c.put(b"ka", Some(vec![2; 10])); // an update keeps its place
        c.put(b"kc", Some(vec![3; 10]));
        assert_eq!(c.get(b"ka"), None);
        assert_eq!(c.get(b"kb"), Some(Some(&[1u8; 10][..])));
        assert_eq!(c.get(b"kc"), Some(Some(&[3u8; 10][..])));
        c.put(b"kd", None);
        assert_eq!(c.get(b"kd"), Some(None));
        c.set_budget(0);
        assert!(c.is_empty());
        c.put(b"ke", None);
        assert!(c.is_empty(), "a budget of 0 disables the cache");
    }
}
