//! The Raft log, hard state and snapshot metadata on an [`Engine`]: raft-rs's `Storage`.
//!
//! Invariants:
//! - entries are contiguous in `[first_index, last_index]`; `first_index = truncated.index + 1`;
//! - an append is one synced batch with the hard state, so a crash never leaves a hard state that
//!   points past the persisted log;
//! - the commit index is written (in the same engine, before) any entry is applied, so on restart
//!   `applied <= commit` always holds (raft-rs panics otherwise, see raft-rs #392);
//! - a snapshot replaces log and state machine in one synced batch.
//!
//! The latest entries are cached in memory: the leader reads them to replicate and raft-rs asks
//! for their terms constantly.

use std::collections::VecDeque;

use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::engine::{Engine, WriteBatch};
use crate::error::StoreError;
use crate::keys;
use crate::pb;
use crate::state::StateMachine;

/// Most entries kept in the in-memory tail cache.
const ENTRY_CACHE_LEN: usize = 4096;

pub struct LogStore<E: Engine> {
    engine: E,
    hard_state: HardState,
    truncated: pb::TruncatedState,
    last_index: u64,
    /// Entries up to here are durable; later ones live in the cache until they are.
    durable_last_index: u64,
    cache: VecDeque<Entry>,
    /// The state machine shares the engine; snapshots are cut from it.
    pub sm: StateMachine<E>,
}

pub fn decode<M: prost::Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_vec(),
        reason: e.to_string(),
    })
}

fn to_raft(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl<E: Engine + Clone> LogStore<E> {
    /// Opens the log on `engine`. On an empty engine with `bootstrap = Some(conf, members)`,
    /// writes the initial configuration (all members of a new cluster do the same, so they agree).
    pub fn open(
        engine: E,
        bootstrap: Option<(ConfState, Vec<continuum_proto::meta::Member>)>,
    ) -> Result<Self, StoreError> {
        let mut hard_state: HardState = match engine.get(keys::HARD_STATE)? {
            Some(b) => decode(keys::HARD_STATE, &b)?,
            None => HardState::default(),
        };
        let truncated: pb::TruncatedState = match engine.get(keys::TRUNCATED)? {
            Some(b) => decode(keys::TRUNCATED, &b)?,
            None => pb::TruncatedState::default(),
        };
        let last = engine.scan(&keys::log(0), &[keys::LOG + 1], usize::MAX)?;
        // Find the last log key cheaply would need a reverse iterator; the log is compacted, so a
        // forward scan of its keys at start-up is bounded by the compaction threshold.
        let last_index = last
            .last()
            .and_then(|(k, _)| keys::number_of(k))
            .unwrap_or(truncated.index);
        let sm = StateMachine::open(engine.clone(), bootstrap)?;
        // With persistence off the core thread, an entry may be applied before the hard state
        // carrying its commit index reaches the disk. Applied entries were committed and are
        // in the local log, so the commit index is at least the applied index.
        if hard_state.commit < sm.applied_index() {
            hard_state.commit = sm.applied_index();
        }
        let mut store = Self {
            engine,
            hard_state,
            truncated,
            last_index,
            durable_last_index: last_index,
            cache: VecDeque::new(),
            sm,
        };
        // Warm the cache with the tail of the log.
        let from = store
            .last_index
            .saturating_sub(ENTRY_CACHE_LEN as u64)
            .max(store.first_index());
        for (k, v) in last
            .iter()
            .filter(|(k, _)| keys::number_of(k).unwrap_or(0) >= from)
        {
            store.cache.push_back(decode(k, v)?);
        }
        Ok(store)
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn first_index(&self) -> u64 {
        self.truncated.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    pub fn truncated_index(&self) -> u64 {
        self.truncated.index
    }

    /// Persists new entries (replacing any conflicting suffix) and the hard state, now. `sync`
    /// must be set when entries, term or vote change (raft-rs's `must_sync`); a
    /// commit-index-only change need not reach the disk before anything depends on it.
    pub fn append(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StoreError> {
        let batch = self.stage_append(entries, hs);
        if !batch.is_empty() {
            assert!(sync || entries.is_empty(), "entries must be synced");
            self.engine.write(batch, sync)?;
        }
        if let Some(last) = entries.last() {
            self.mark_durable(last.index, last.term);
        }
        Ok(())
    }

    /// Makes `entries` (replacing any conflicting suffix) and `hs` visible to raft-rs at once,
    /// from memory, and returns the write that makes them durable. raft-rs reads appended
    /// entries from storage as soon as the Ready is advanced, before they are durable
    /// (async ready), so the cache keeps every entry that is not yet durable.
    pub fn stage_append(&mut self, entries: &[Entry], hs: Option<&HardState>) -> WriteBatch {
        let mut batch = WriteBatch::default();
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            assert!(
                first.index >= self.first_index() && first.index <= self.last_index + 1,
                "append at {} leaves a gap (log is [{}, {}])",
                first.index,
                self.first_index(),
                self.last_index
            );
            if first.index <= self.last_index {
                batch.delete_range(keys::log(first.index), keys::log(self.last_index + 1));
            }
            for e in entries {
                batch.put(keys::log(e.index), e.encode_to_vec());
            }
            while self.cache.back().is_some_and(|e| e.index >= first.index) {
                self.cache.pop_back();
            }
            if self
                .cache
                .back()
                .is_some_and(|e| e.index + 1 != first.index)
            {
                assert!(
                    self.durable_last_index >= self.last_index.min(first.index - 1),
                    "dropping a cache that holds entries not yet durable"
                );
                self.cache.clear();
            }
            self.cache.extend(entries.iter().cloned());
            self.durable_last_index = self.durable_last_index.min(first.index - 1);
            self.trim_cache();
            self.last_index = last.index;
        }
        if let Some(hs) = hs {
            batch.put(keys::HARD_STATE.to_vec(), hs.encode_to_vec());
            self.hard_state = hs.clone();
        }
        batch
    }

    /// The entry (`index`, `term`) and everything before it are durable, so their cache
    /// copies may be evicted. If a later append has replaced that entry meanwhile (a conflict
    /// with another leader's log), nothing is marked: the replacement is not durable yet, and
    /// its own completion will mark it.
    pub fn mark_durable(&mut self, index: u64, term: u64) {
        let still_there = self
            .cache
            .front()
            .filter(|f| index >= f.index)
            .and_then(|f| self.cache.get((index - f.index) as usize))
            .is_some_and(|e| e.index == index && e.term == term);
        if still_there {
            self.durable_last_index = self.durable_last_index.max(index);
            self.trim_cache();
        }
    }

    fn trim_cache(&mut self) {
        while self.cache.len() > ENTRY_CACHE_LEN
            && self
                .cache
                .front()
                .is_some_and(|e| e.index <= self.durable_last_index)
        {
            self.cache.pop_front();
        }
    }

    /// Records a new commit index. Not synced: it is ordered before the apply writes that
    /// depend on it in the same engine, which is all the restart invariant needs.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        self.hard_state.commit = commit;
        let mut batch = WriteBatch::default();
        batch.put(keys::HARD_STATE.to_vec(), self.hard_state.encode_to_vec());
        self.engine.write(batch, false)
    }

    /// Drops log entries up to and including `index` (which must be applied).
    pub fn compact(&mut self, index: u64) -> Result<(), StoreError> {
        if index <= self.truncated.index {
            return Ok(());
        }
        assert!(
            index <= self.sm.applied_index(),
            "compacting unapplied entries"
        );
        let term = self.term_of(index)?;
        let truncated = pb::TruncatedState { index, term };
        let mut batch = WriteBatch::default();
        batch.delete_range(keys::log(0), keys::log(index + 1));
        batch.put(keys::TRUNCATED.to_vec(), truncated.encode_to_vec());
        self.engine.write(batch, false)?;
        self.truncated = truncated;
        while self.cache.front().is_some_and(|e| e.index <= index) {
            self.cache.pop_front();
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader: replaces the state machine and the log.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        let data: pb::SnapshotData = decode(b"snapshot", &snap.data)?;
        let mut batch = WriteBatch::default();
        batch.delete_range(keys::log(0), vec![keys::LOG + 1]);
        batch.delete_range(keys::SM_START.to_vec(), keys::SM_END.to_vec());
        for p in data.pairs {
            if p.key.as_slice() < keys::SM_START || p.key.as_slice() >= keys::SM_END {
                return Err(StoreError::Corrupt {
                    key: p.key,
                    reason: "snapshot pair outside the state machine".into(),
                });
            }
            batch.put(p.key, p.value);
        }
        let truncated = pb::TruncatedState {
            index: meta.index,
            term: meta.term,
        };
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        batch.put(keys::TRUNCATED.to_vec(), truncated.encode_to_vec());
        batch.put(keys::HARD_STATE.to_vec(), hs.encode_to_vec());
        self.engine.write(batch, true)?;
        self.hard_state = hs;
        self.truncated = truncated;
        self.last_index = meta.index;
        self.durable_last_index = meta.index;
        self.cache.clear();
        self.sm.reload()?;
        if self.sm.applied_index() != meta.index {
            // A snapshot whose state disagrees with its metadata is corrupt; stop rather than
            // serve it (the member fail-stops on this error).
            return Err(StoreError::Corrupt {
                key: keys::APPLIED.to_vec(),
                reason: format!(
                    "snapshot at index {} holds state applied to {}",
                    meta.index,
                    self.sm.applied_index()
                ),
            });
        }
        Ok(())
    }

    fn term_of(&self, index: u64) -> Result<u64, StoreError> {
        if index == self.truncated.index {
            return Ok(self.truncated.term);
        }
        Ok(self.entry(index)?.map(|e| e.term).unwrap_or(0))
    }

    fn entry(&self, index: u64) -> Result<Option<Entry>, StoreError> {
        if let Some(front) = self.cache.front() {
            if index >= front.index {
                return Ok(self.cache.get((index - front.index) as usize).cloned());
            }
        }
        let key = keys::log(index);
        match self.engine.get(&key)? {
            Some(b) => Ok(Some(decode(&key, &b)?)),
            None => Ok(None),
        }
    }

    /// Builds a snapshot of the state machine as it is now (at its applied index).
    pub fn build_snapshot(&self) -> Result<Snapshot, StoreError> {
        let pairs = self
            .engine
            .scan(keys::SM_START, keys::SM_END, usize::MAX)?
            .into_iter()
            .map(|(key, value)| pb::KvPair { key, value })
            .collect();
        let snap = Snapshot {
            data: pb::SnapshotData { pairs }.encode_to_vec(),
            metadata: Some(SnapshotMetadata {
                index: self.sm.applied_index(),
                term: self.sm.applied_term(),
                conf_state: Some(self.sm.conf_state().clone()),
            }),
        };
        Ok(snap)
    }
}

impl<E: Engine + Clone> raft::Storage for LogStore<E> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.sm.conf_state().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        let cached_from = self.cache.front().map(|e| e.index).unwrap_or(u64::MAX);
        if low < cached_from {
            let end = high.min(cached_from);
            for (k, v) in self
                .engine
                .scan(&keys::log(low), &keys::log(end), usize::MAX)
                .map_err(to_raft)?
            {
                out.push(decode(&k, &v).map_err(to_raft)?);
            }
        }
        let mut next = low.max(cached_from);
        while next < high {
            let e = self.cache[(next - cached_from) as usize].clone();
            out.push(e);
            next += 1;
        }
        if out.len() as u64 != high - low {
            return Err(to_raft(StoreError::Corrupt {
                key: keys::log(low),
                reason: format!("log hole in [{low}, {high})"),
            }));
        }
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.index {
            return Ok(self.truncated.term);
        }
        if idx < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.entry(idx).map_err(to_raft)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(LogStore::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.sm.applied_index() < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        self.build_snapshot().map_err(to_raft)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn a_replaced_append_does_not_mark_its_replacement_durable() {
        let mut store =
            LogStore::open(MemEngine::new(), Some((ConfState::default(), vec![]))).unwrap();
        let a: Vec<Entry> = (1..=3).map(|i| entry(i, 1)).collect();
        let batch_a = store.stage_append(&a, None);
        // Another leader's entries replace 2..=3 before A is durable.
        let b: Vec<Entry> = (2..=4).map(|i| entry(i, 2)).collect();
        let batch_b = store.stage_append(&b, None);
        store.engine().write(batch_a, true).unwrap();
        store.mark_durable(3, 1);
        assert_eq!(
            store.durable_last_index, 0,
            "entry 3 of term 1 was replaced"
        );
        store.engine().write(batch_b, true).unwrap();
        store.mark_durable(4, 2);
        assert_eq!(store.durable_last_index, 4);
        use raft::Storage;
        assert_eq!(store.term(3).unwrap(), 2);
        assert_eq!(
            store
                .entries(1, 5, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            4
        );
    }
}
