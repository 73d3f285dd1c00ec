//! The replicated state machine: an MVCC-style key-value store with revisions, a watch history,
//! leases and the member table, kept in the engine's `[0x10, 0x20)` key space.
//!
//! Determinism: applying the same entries in the same order to the same state yields the same
//! bytes on every member. Nothing here reads a clock or an RNG; lease *expiry* is decided by the
//! leader (see `core`) and arrives as a `LeaseRevoke` entry.
//!
//! Each applied entry is one engine batch together with the new [`pb::AppliedState`], so the
//! applied index never disagrees with the data after a crash.

use continuum_proto::limits;
use continuum_proto::meta::{
    compare, event, request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse,
    Event, KeyValue, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeResponse, Member,
    PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseOp, TxnRequest,
    TxnResponse,
};
use prost::Message as _;
use raft::eraftpb::ConfState;
use std::collections::BTreeSet;

use crate::engine::{Engine, WriteBatch};
use crate::error::{MetaError, StoreError};
use crate::keys;
use crate::log_store::decode;
use crate::pb;

/// Revisions of watch history kept; older watches are told to re-read (etcd's "compacted").
pub const HISTORY_RETENTION_REVISIONS: u64 = 100_000;
/// History is trimmed when the revision crosses a multiple of this.
const HISTORY_TRIM_EVERY: u64 = 1024;

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
}

/// The result of one applied command: its response (or a deterministic error) and the events
/// it produced at its revision.
#[derive(Debug, Clone)]
pub struct ApplyOutcome {
    pub result: Result<Applied, MetaError>,
    pub events: Vec<Event>,
}

pub struct StateMachine<E: Engine> {
    engine: E,
    applied: pb::AppliedState,
    conf_state: ConfState,
}

impl<E: Engine> StateMachine<E> {
    pub fn open(
        engine: E,
        bootstrap: Option<(ConfState, Vec<Member>)>,
    ) -> Result<Self, StoreError> {
        let mut sm = Self {
            engine,
            applied: pb::AppliedState::default(),
            conf_state: ConfState::default(),
        };
        if sm.engine.get(keys::APPLIED)?.is_none() {
            if let Some((conf_state, members)) = bootstrap {
                let applied = pb::AppliedState {
                    conf_state: conf_state.encode_to_vec(),
                    next_lease_id: 1,
                    ..Default::default()
                };
                let mut batch = WriteBatch::default();
                for m in &members {
                    batch.put(keys::member(m.id), m.encode_to_vec());
                }
                batch.put(keys::APPLIED.to_vec(), applied.encode_to_vec());
                sm.engine.write(batch, true)?;
            }
        }
        sm.reload()?;
        Ok(sm)
    }

    /// Re-reads the applied state (after a snapshot replaced the key space).
    pub fn reload(&mut self) -> Result<(), StoreError> {
        if let Some(b) = self.engine.get(keys::APPLIED)? {
            self.applied = decode(keys::APPLIED, &b)?;
            self.conf_state = decode(keys::APPLIED, &self.applied.conf_state)?;
        }
        Ok(())
    }

    pub fn applied_index(&self) -> u64 {
        self.applied.index
    }
    pub fn applied_term(&self) -> u64 {
        self.applied.term
    }
    pub fn revision(&self) -> u64 {
        self.applied.revision
    }
    pub fn compact_revision(&self) -> u64 {
        self.applied.compact_revision
    }
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Marks an entry with no state change (empty entries after elections) as applied.
    pub fn apply_empty(&mut self, index: u64, term: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        self.finish(&mut batch, index, term);
        self.engine.write(batch, false)
    }

    /// Applies a membership change: the new configuration and the member table.
    pub fn apply_conf_change(
        &mut self,
        index: u64,
        term: u64,
        conf_state: ConfState,
        added: Option<&Member>,
        removed: &[u64],
        promoted: &[u64],
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        if let Some(m) = added {
            batch.put(keys::member(m.id), m.encode_to_vec());
        }
        for id in removed {
            batch.delete(keys::member(*id));
        }
        for id in promoted {
            if let Some(mut m) = self.member(*id)? {
                m.is_learner = false;
                batch.put(keys::member(*id), m.encode_to_vec());
            }
        }
        self.applied.conf_state = conf_state.encode_to_vec();
        self.conf_state = conf_state;
        self.finish(&mut batch, index, term);
        self.engine.write(batch, false)
    }

    fn finish(&mut self, batch: &mut WriteBatch, index: u64, term: u64) {
        assert!(
            index > self.applied.index,
            "applying index {index} after {}",
            self.applied.index
        );
        self.applied.index = index;
        self.applied.term = term;
        batch.put(keys::APPLIED.to_vec(), self.applied.encode_to_vec());
    }

    /// Applies one client command at `index`.
    pub fn apply_command(
        &mut self,
        index: u64,
        term: u64,
        op: &pb::command::Op,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut tx = Tx {
            sm: self,
            batch: WriteBatch::default(),
            events: Vec::new(),
            revision: 0,
        };
        tx.revision = tx.sm.applied.revision + 1;
        let result = tx.run(op)?;
        let Tx {
            mut batch, events, ..
        } = tx;
        if !events.is_empty() {
            self.applied.revision += 1;
            let rev = self.applied.revision;
            batch.put(
                keys::history(rev),
                pb::HistoryRecord {
                    events: events.clone(),
                }
                .encode_to_vec(),
            );
            if rev.is_multiple_of(HISTORY_TRIM_EVERY) && rev > HISTORY_RETENTION_REVISIONS {
                let keep_from = rev - HISTORY_RETENTION_REVISIONS;
                batch.delete_range(keys::history(0), keys::history(keep_from));
                self.applied.compact_revision = keep_from;
            }
        }
        self.finish(&mut batch, index, term);
        self.engine.write(batch, false)?;
        // Fill in the header revision the request observed (after its own writes).
        let result = result.map(|r| with_revision(r, self.applied.revision));
        Ok(ApplyOutcome { result, events })
    }

    pub fn kv(&self, key: &[u8]) -> Result<Option<pb::StoredKv>, StoreError> {
        let k = keys::kv(key);
        match self.engine.get(&k)? {
            Some(b) => Ok(Some(decode(&k, &b)?)),
            None => Ok(None),
        }
    }

    /// Serves a range read from the applied state.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, StoreError> {
        let (start, end) = keys::kv_range(&req.key, &req.range_end);
        let limit = match req.limit as usize {
            0 => limits::MAX_RANGE_KEYS,
            n => n.min(limits::MAX_RANGE_KEYS),
        };
        if req.count_only {
            let count = self.engine.scan(&start, &end, usize::MAX)?.len() as u64;
            return Ok(RangeResponse {
                count,
                ..Default::default()
            });
        }
        let pairs = self.engine.scan(&start, &end, limit + 1)?;
        let more = pairs.len() > limit;
        let mut kvs = Vec::with_capacity(pairs.len().min(limit));
        for (k, v) in pairs.into_iter().take(limit) {
            let stored: pb::StoredKv = decode(&k, &v)?;
            let mut kv = to_key_value(&k[1..], stored);
            if req.keys_only {
                kv.value.clear();
            }
            kvs.push(kv);
        }
        let count = kvs.len() as u64 + u64::from(more);
        Ok(RangeResponse {
            header: None,
            kvs,
            more,
            count,
        })
    }

    /// Recorded events with revision in `[from, to]`.
    pub fn history(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<Event>)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.engine.scan(
            &keys::history(from),
            &keys::history(to.saturating_add(1)),
            usize::MAX,
        )? {
            let rec: pb::HistoryRecord = decode(&k, &v)?;
            out.push((keys::number_of(&k).unwrap_or(0), rec.events));
        }
        Ok(out)
    }

    pub fn lease(&self, id: u64) -> Result<Option<pb::LeaseRecord>, StoreError> {
        let k = keys::lease(id);
        match self.engine.get(&k)? {
            Some(b) => Ok(Some(decode(&k, &b)?)),
            None => Ok(None),
        }
    }

    pub fn leases(&self) -> Result<Vec<pb::LeaseRecord>, StoreError> {
        self.engine
            .scan(&[keys::LEASE], &[keys::LEASE + 1], usize::MAX)?
            .into_iter()
            .map(|(k, v)| decode(&k, &v))
            .collect()
    }

    pub fn lease_keys(&self, id: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let prefix = keys::numbered(keys::LEASE_KEY, id);
        let end = keys::numbered(keys::LEASE_KEY, id + 1);
        Ok(self
            .engine
            .scan(&prefix, &end, usize::MAX)?
            .into_iter()
            .map(|(k, _)| k[prefix.len()..].to_vec())
            .collect())
    }

    pub fn member(&self, id: u64) -> Result<Option<Member>, StoreError> {
        let k = keys::member(id);
        match self.engine.get(&k)? {
            Some(b) => Ok(Some(decode(&k, &b)?)),
            None => Ok(None),
        }
    }

    pub fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.engine
            .scan(&[keys::MEMBER], &[keys::MEMBER + 1], usize::MAX)?
            .into_iter()
            .map(|(k, v)| decode(&k, &v))
            .collect()
    }
}

fn to_key_value(key: &[u8], s: pb::StoredKv) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: s.value,
        create_revision: s.create_revision,
        mod_revision: s.mod_revision,
        version: s.version,
        lease: s.lease,
    }
}

fn with_revision(applied: Applied, revision: u64) -> Applied {
    let header = Some(continuum_proto::meta::ResponseHeader {
        revision,
        ..Default::default()
    });
    match applied {
        Applied::Put(mut r) => {
            r.header = header;
            Applied::Put(r)
        }
        Applied::DeleteRange(mut r) => {
            r.header = header;
            Applied::DeleteRange(r)
        }
        Applied::Txn(mut r) => {
            r.header = header;
            Applied::Txn(r)
        }
        Applied::LeaseGrant(mut r) => {
            r.header = header;
            Applied::LeaseGrant(r)
        }
        Applied::LeaseRevoke(mut r) => {
            r.header = header;
            Applied::LeaseRevoke(r)
        }
    }
}

/// Checks the limits every write request must respect; the same check runs before proposing
/// (clear errors early) and at apply time (an entry is never trusted blindly).
pub fn validate_op(op: &pb::command::Op) -> Result<(), MetaError> {
    use pb::command::Op;
    match op {
        Op::Put(p) => validate_put(p),
        Op::DeleteRange(d) => validate_key(&d.key),
        Op::Txn(t) => validate_txn(t),
        Op::LeaseGrant(g) => {
            if g.ttl_seconds == 0 || g.ttl_seconds > limits::MAX_LEASE_TTL_SECONDS {
                return Err(invalid(format!(
                    "lease TTL must be 1..={} seconds, got {}",
                    limits::MAX_LEASE_TTL_SECONDS,
                    g.ttl_seconds
                )));
            }
            Ok(())
        }
        Op::LeaseRevoke(_) => Ok(()),
    }
}

fn invalid(reason: String) -> MetaError {
    MetaError::InvalidArgument { reason }
}

pub fn validate_key(key: &[u8]) -> Result<(), MetaError> {
    if key.is_empty() {
        return Err(invalid("key is empty".into()));
    }
    if key.len() > limits::MAX_KEY_BYTES {
        return Err(invalid(format!(
            "key is {} bytes, the limit is {}",
            key.len(),
            limits::MAX_KEY_BYTES
        )));
    }
    Ok(())
}

fn validate_put(p: &PutRequest) -> Result<(), MetaError> {
    validate_key(&p.key)?;
    if p.value.len() > limits::MAX_VALUE_BYTES {
        return Err(invalid(format!(
            "value is {} bytes, the limit is {}",
            p.value.len(),
            limits::MAX_VALUE_BYTES
        )));
    }
    Ok(())
}

fn validate_txn(t: &TxnRequest) -> Result<(), MetaError> {
    if t.compare.len() > limits::MAX_TXN_OPS
        || t.success.len() > limits::MAX_TXN_OPS
        || t.failure.len() > limits::MAX_TXN_OPS
    {
        return Err(invalid(format!(
            "a transaction has at most {} compares and {} operations per branch",
            limits::MAX_TXN_OPS,
            limits::MAX_TXN_OPS
        )));
    }
    for c in &t.compare {
        validate_key(&c.key)?;
        if c.target_union.is_none() {
            return Err(invalid("compare without a target value".into()));
        }
    }
    for branch in [&t.success, &t.failure] {
        let mut puts = BTreeSet::new();
        let mut deletes = Vec::new();
        for op in branch {
            match &op.request {
                Some(request_op::Request::RequestPut(p)) => {
                    validate_put(p)?;
                    if !puts.insert(p.key.clone()) {
                        return Err(invalid("duplicate key given in txn request".into()));
                    }
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    validate_key(&d.key)?;
                    deletes.push(keys::kv_range(&d.key, &d.range_end));
                }
                Some(request_op::Request::RequestRange(r)) => validate_key(&r.key)?,
                None => return Err(invalid("empty operation in txn".into())),
            }
        }
        for k in &puts {
            let kk = keys::kv(k);
            if deletes.iter().any(|(s, e)| &kk >= s && &kk < e) {
                return Err(invalid("a txn key is both put and deleted".into()));
            }
        }
    }
    Ok(())
}

/// One command's application: reads see the state before the command (snapshot semantics;
/// `validate_txn` rejects the overlapping writes that would make that visible).
struct Tx<'a, E: Engine> {
    sm: &'a mut StateMachine<E>,
    batch: WriteBatch,
    events: Vec<Event>,
    revision: u64,
}

impl<E: Engine> Tx<'_, E> {
    fn run(&mut self, op: &pb::command::Op) -> Result<Result<Applied, MetaError>, StoreError> {
        use pb::command::Op;
        if let Err(e) = validate_op(op) {
            return Ok(Err(e));
        }
        Ok(match op {
            Op::Put(p) => self.put(p)?.map(Applied::Put),
            Op::DeleteRange(d) => Ok(Applied::DeleteRange(self.delete_range(d)?)),
            Op::Txn(t) => self.txn(t)?.map(Applied::Txn),
            Op::LeaseGrant(g) => self.lease_grant(g)?.map(Applied::LeaseGrant),
            Op::LeaseRevoke(r) => self.lease_revoke(r.id)?.map(Applied::LeaseRevoke),
        })
    }

    fn put(&mut self, p: &PutRequest) -> Result<Result<PutResponse, MetaError>, StoreError> {
        if p.lease != 0 && self.sm.lease(p.lease)?.is_none() {
            return Ok(Err(MetaError::LeaseNotFound { id: p.lease }));
        }
        let prev = self.sm.kv(&p.key)?;
        let stored = pb::StoredKv {
            value: p.value.clone(),
            create_revision: prev
                .as_ref()
                .map(|s| s.create_revision)
                .unwrap_or(self.revision),
            mod_revision: self.revision,
            version: prev.as_ref().map(|s| s.version).unwrap_or(0) + 1,
            lease: p.lease,
        };
        if let Some(old) = prev.as_ref().filter(|s| s.lease != 0 && s.lease != p.lease) {
            self.batch.delete(keys::lease_key(old.lease, &p.key));
        }
        if p.lease != 0 {
            self.batch.put(keys::lease_key(p.lease, &p.key), Vec::new());
        }
        self.batch.put(keys::kv(&p.key), stored.encode_to_vec());
        let prev_kv = prev.map(|s| to_key_value(&p.key, s));
        self.events.push(Event {
            r#type: event::EventType::Put as i32,
            kv: Some(to_key_value(&p.key, stored)),
            prev_kv: prev_kv.clone(),
        });
        Ok(Ok(PutResponse {
            header: None,
            prev_kv: if p.prev_kv { prev_kv } else { None },
        }))
    }

    fn delete_range(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse, StoreError> {
        let (start, end) = keys::kv_range(&d.key, &d.range_end);
        let mut resp = DeleteRangeResponse::default();
        for (k, v) in self.sm.engine.scan(&start, &end, usize::MAX)? {
            let stored: pb::StoredKv = decode(&k, &v)?;
            self.delete_key(&k[1..], stored, d.prev_kv, &mut resp);
        }
        Ok(resp)
    }

    fn delete_key(
        &mut self,
        key: &[u8],
        stored: pb::StoredKv,
        want_prev: bool,
        resp: &mut DeleteRangeResponse,
    ) {
        if stored.lease != 0 {
            self.batch.delete(keys::lease_key(stored.lease, key));
        }
        self.batch.delete(keys::kv(key));
        let prev = to_key_value(key, stored);
        self.events.push(Event {
            r#type: event::EventType::Delete as i32,
            kv: Some(KeyValue {
                key: key.to_vec(),
                mod_revision: self.revision,
                ..Default::default()
            }),
            prev_kv: Some(prev.clone()),
        });
        resp.deleted += 1;
        if want_prev {
            resp.prev_kvs.push(prev);
        }
    }

    fn compare(&self, c: &Compare) -> Result<bool, StoreError> {
        use compare::{CompareResult, CompareTarget, TargetUnion};
        let stored = self.sm.kv(&c.key)?;
        let s = stored.unwrap_or_default();
        let ord = match (&c.target_union, CompareTarget::from_i32(c.target)) {
            (Some(TargetUnion::Version(v)), Some(CompareTarget::Version)) => s.version.cmp(v),
            (Some(TargetUnion::CreateRevision(v)), Some(CompareTarget::Create)) => {
                s.create_revision.cmp(v)
            }
            (Some(TargetUnion::ModRevision(v)), Some(CompareTarget::Mod)) => s.mod_revision.cmp(v),
            (Some(TargetUnion::Value(v)), Some(CompareTarget::Value)) => s.value.cmp(v),
            (Some(TargetUnion::Lease(v)), Some(CompareTarget::Lease)) => s.lease.cmp(v),
            _ => return Ok(false),
        };
        use std::cmp::Ordering::*;
        Ok(match CompareResult::from_i32(c.result) {
            Some(CompareResult::Equal) => ord == Equal,
            Some(CompareResult::Greater) => ord == Greater,
            Some(CompareResult::Less) => ord == Less,
            Some(CompareResult::NotEqual) => ord != Equal,
            None => false,
        })
    }

    fn txn(&mut self, t: &TxnRequest) -> Result<Result<TxnResponse, MetaError>, StoreError> {
        let mut succeeded = true;
        for c in &t.compare {
            if !self.compare(c)? {
                succeeded = false;
                break;
            }
        }
        let branch: &[RequestOp] = if succeeded { &t.success } else { &t.failure };
        // Check leases first so a failing txn leaves no partial writes behind.
        for op in branch {
            if let Some(request_op::Request::RequestPut(p)) = &op.request {
                if p.lease != 0 && self.sm.lease(p.lease)?.is_none() {
                    return Ok(Err(MetaError::LeaseNotFound { id: p.lease }));
                }
            }
        }
        let mut responses = Vec::with_capacity(branch.len());
        for op in branch {
            let r = match &op.request {
                Some(request_op::Request::RequestPut(p)) => match self.put(p)? {
                    Ok(r) => response_op::Response::ResponsePut(r),
                    Err(e) => return Ok(Err(e)),
                },
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    response_op::Response::ResponseDeleteRange(self.delete_range(d)?)
                }
                Some(request_op::Request::RequestRange(r)) => {
                    response_op::Response::ResponseRange(self.sm.range(r)?)
                }
                None => continue,
            };
            responses.push(ResponseOp { response: Some(r) });
        }
        Ok(Ok(TxnResponse {
            header: None,
            succeeded,
            responses,
        }))
    }

    fn lease_grant(
        &mut self,
        g: &LeaseGrantRequest,
    ) -> Result<Result<LeaseGrantResponse, MetaError>, StoreError> {
        let id = if g.id != 0 {
            if self.sm.lease(g.id)?.is_some() {
                return Ok(Err(MetaError::LeaseExists { id: g.id }));
            }
            g.id
        } else {
            let mut id = self.sm.applied.next_lease_id.max(1);
            while self.sm.lease(id)?.is_some() {
                id += 1;
            }
            id
        };
        self.sm.applied.next_lease_id = self.sm.applied.next_lease_id.max(id + 1);
        let rec = pb::LeaseRecord {
            id,
            ttl_seconds: g.ttl_seconds,
        };
        self.batch.put(keys::lease(id), rec.encode_to_vec());
        Ok(Ok(LeaseGrantResponse {
            header: None,
            id,
            ttl_seconds: g.ttl_seconds,
        }))
    }

    fn lease_revoke(
        &mut self,
        id: u64,
    ) -> Result<Result<LeaseRevokeResponse, MetaError>, StoreError> {
        if self.sm.lease(id)?.is_none() {
            return Ok(Err(MetaError::LeaseNotFound { id }));
        }
        let mut ignored = DeleteRangeResponse::default();
        for key in self.sm.lease_keys(id)? {
            if let Some(stored) = self.sm.kv(&key)? {
                self.delete_key(&key, stored, false, &mut ignored);
            }
        }
        self.batch.delete(keys::lease(id));
        Ok(Ok(LeaseRevokeResponse { header: None }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;
    use continuum_proto::meta::LeaseRevokeRequest;
    use pb::command::Op;

    fn sm() -> StateMachine<MemEngine> {
        StateMachine::open(MemEngine::new(), Some((ConfState::default(), vec![]))).unwrap()
    }

    fn put(key: &str, value: &str, lease: u64) -> Op {
        Op::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            prev_kv: true,
        })
    }

    struct Applier {
        sm: StateMachine<MemEngine>,
        index: u64,
    }

    impl Applier {
        fn apply(&mut self, op: Op) -> ApplyOutcome {
            self.index += 1;
            self.sm.apply_command(self.index, 1, &op).unwrap()
        }
    }

    fn applier() -> Applier {
        Applier { sm: sm(), index: 0 }
    }

    #[test]
    fn puts_track_revisions_and_versions() {
        let mut a = applier();
        a.apply(put("a", "1", 0));
        a.apply(put("b", "1", 0));
        let out = a.apply(put("a", "2", 0));
        let Ok(Applied::Put(r)) = out.result else {
            panic!("{:?}", out.result)
        };
        assert_eq!(r.prev_kv.unwrap().value, b"1");
        let kv = a.sm.kv(b"a").unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 3, 2));
        assert_eq!(a.sm.revision(), 3);
        assert_eq!(a.sm.applied_index(), 3);
        // A delete of nothing changes nothing and takes no revision.
        let out = a.apply(Op::DeleteRange(DeleteRangeRequest {
            key: b"zz".to_vec(),
            ..Default::default()
        }));
        assert!(out.events.is_empty());
        assert_eq!(a.sm.revision(), 3);
        // Re-creating after a delete restarts version and create revision.
        a.apply(Op::DeleteRange(DeleteRangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        }));
        a.apply(put("a", "3", 0));
        let kv = a.sm.kv(b"a").unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.version), (5, 1));
    }

    #[test]
    fn txn_compares_then_applies_one_branch_atomically() {
        let mut a = applier();
        a.apply(put("k", "v1", 0));
        let cas = |expect_rev: u64, value: &str| {
            Op::Txn(TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: b"k".to_vec(),
                    target_union: Some(compare::TargetUnion::ModRevision(expect_rev)),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: b"k".to_vec(),
                        value: value.into(),
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: b"k".to_vec(),
                        ..Default::default()
                    })),
                }],
            })
        };
        let Ok(Applied::Txn(r)) = a.apply(cas(1, "v2")).result else {
            panic!()
        };
        assert!(r.succeeded);
        let Ok(Applied::Txn(r)) = a.apply(cas(1, "v3")).result else {
            panic!()
        };
        assert!(!r.succeeded, "a stale CAS must fail");
        let Some(response_op::Response::ResponseRange(rr)) = &r.responses[0].response else {
            panic!()
        };
        assert_eq!(rr.kvs[0].value, b"v2");
        assert_eq!(a.sm.kv(b"k").unwrap().unwrap().value, b"v2");
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_at_one_revision() {
        let mut a = applier();
        let Ok(Applied::LeaseGrant(g)) = a
            .apply(Op::LeaseGrant(LeaseGrantRequest {
                ttl_seconds: 5,
                id: 0,
            }))
            .result
        else {
            panic!()
        };
        a.apply(put("x", "1", g.id));
        a.apply(put("y", "1", g.id));
        a.apply(put("z", "1", 0));
        // Moving a key to no lease detaches it.
        a.apply(put("y", "2", 0));
        let before = a.sm.revision();
        let out = a.apply(Op::LeaseRevoke(LeaseRevokeRequest { id: g.id }));
        assert!(out.result.is_ok());
        assert_eq!(out.events.len(), 1);
        assert_eq!(a.sm.revision(), before + 1);
        assert!(a.sm.kv(b"x").unwrap().is_none());
        assert!(a.sm.kv(b"y").unwrap().is_some());
        assert!(a.sm.lease(g.id).unwrap().is_none());
        let out = a.apply(put("w", "1", g.id));
        assert_eq!(out.result, Err(MetaError::LeaseNotFound { id: g.id }));
        // History has every revision's events in order.
        let hist = a.sm.history(1, a.sm.revision()).unwrap();
        let revs: Vec<u64> = hist.iter().map(|(r, _)| *r).collect();
        assert_eq!(revs, (1..=a.sm.revision()).collect::<Vec<_>>());
    }

    #[test]
    fn invalid_requests_are_refused_even_at_apply() {
        let mut a = applier();
        let out = a.apply(put("", "v", 0));
        assert!(matches!(out.result, Err(MetaError::InvalidArgument { .. })));
        let big = "x".repeat(limits::MAX_VALUE_BYTES + 1);
        assert!(matches!(
            a.apply(put("k", &big, 0)).result,
            Err(MetaError::InvalidArgument { .. })
        ));
        // The entries still count as applied (every member skips them the same way).
        assert_eq!(a.sm.applied_index(), 2);
        assert_eq!(a.sm.revision(), 0);
    }

    #[test]
    fn range_limits_and_reports_more() {
        let mut a = applier();
        for i in 0..10 {
            a.apply(put(&format!("p/{i}"), "v", 0));
        }
        let r =
            a.sm.range(&RangeRequest {
                key: b"p/".to_vec(),
                range_end: b"p0".to_vec(),
                limit: 4,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.kvs.len(), 4);
        assert!(r.more);
        let r =
            a.sm.range(&RangeRequest {
                key: b"p/".to_vec(),
                range_end: b"p0".to_vec(),
                count_only: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.count, 10);
    }
}
