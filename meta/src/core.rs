//! The sans-IO meta member: raft-rs `RawNode` + state machine + request bookkeeping.
//!
//! Drive it with `handle_*` calls and collect what it wants done with [`MetaCore::poll_output`]:
//! Raft messages to send, responses to requests, watch events. It never reads a clock or an
//! RNG: `now_ms` comes with every call, so the tokio driver (`server`) and the deterministic
//! simulator (`sim`) drive the same code. Storage is an [`Engine`]; with `MemEngine` the whole
//! member runs in memory.
//!
//! Invariants:
//! - a write is acknowledged only after its entry is committed (persisted, synced, by a quorum)
//!   and applied here; entries and hard state are synced before the messages that depend on them
//!   are released (`take_persisted_messages`), and the commit index is stored before any entry
//!   is applied (raft-rs's documented order, see `process_ready`);
//! - a linearizable read is served only at an applied index at least the ReadIndex the leader
//!   confirmed with a quorum (or, with `ReadMode::Lease`, within a check-quorum lease);
//! - a pending request always ends: with its result, an error, or `Timeout` at its deadline;
//! - a storage failure stops the member (fail-stop): nothing unpersisted is ever acknowledged.

use std::collections::{BTreeMap, VecDeque};

use continuum_proto::limits;
use continuum_proto::meta::{
    DeleteRangeRequest, Event, LeaseGrantRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    LeaseTimeToLiveResponse, Member, PutRequest, RangeRequest, RangeResponse, ResponseHeader,
    StatusResponse, TxnRequest, WatchRequest,
};
use prost::Message as _;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message,
};
use raft::{RawNode, ReadOnlyOption, StateRole};

use crate::engine::Engine;
use crate::error::{MetaError, StoreError};
use crate::keys;
use crate::log_store::LogStore;
use crate::pb;
use crate::state::{validate_key, validate_op, Applied};

/// Identifies a request inside one member process (assigned by the driver).
pub type RequestId = u64;
/// Identifies a watch inside one member process (assigned by the driver).
pub type WatchId = u64;

/// How linearizable reads are confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex: the leader confirms leadership with a quorum heartbeat round per read batch.
    Safe,
    /// Lease reads: the leader trusts its check-quorum lease (requires bounded clock drift).
    Lease,
}

#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub id: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// When set, the election timeout is exactly `election_ticks` (no raft-rs internal RNG);
    /// the simulator then injects randomness through tick timing instead.
    pub fixed_election_timeout: bool,
    pub read_mode: ReadMode,
    /// A request not finished after this long fails with `Timeout`.
    pub request_timeout_ms: u64,
    /// Log entries kept before the log is compacted behind a snapshot point.
    pub snapshot_entries: u64,
    /// Writes are refused (NoSpace) once the store is larger than this.
    pub quota_bytes: u64,
    /// Writes are refused (NoSpace) while the data disk has less free space than this.
    pub min_free_bytes: u64,
    /// A follower waiting this long for a snapshot gets a fresh one: the transport may have
    /// lost the message without noticing, and raft-rs would otherwise wait forever.
    pub snapshot_retry_ms: u64,
    /// Persist log appends through `Output::Persist` (the driver writes them on another
    /// thread, batching several Ready rounds into one fsync) instead of inline.
    pub async_persist: bool,
}

impl CoreConfig {
    pub fn new(id: u64) -> Self {
        Self {
            id,
            election_ticks: 10,
            heartbeat_ticks: 1,
            fixed_election_timeout: false,
            read_mode: ReadMode::Safe,
            request_timeout_ms: 5_000,
            snapshot_entries: 10_000,
            quota_bytes: 256 * 1024 * 1024,
            min_free_bytes: 64 * 1024 * 1024,
            snapshot_retry_ms: 30_000,
            async_persist: false,
        }
    }
}

/// A client request as the core sees it.
#[derive(Clone, Debug)]
pub enum Request {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    LeaseKeepAlive(u64),
    LeaseTimeToLive {
        id: u64,
        keys: bool,
    },
    MemberList,
    MemberAdd(Member),
    MemberPromote(u64),
    MemberRemove(u64),
    Status,
    Watch {
        watch_id: WatchId,
        req: WatchRequest,
    },
}

/// A successful response (the header is filled in by the core).
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    Range(RangeResponse),
    Applied(Applied),
    LeaseKeepAlive(LeaseKeepAliveResponse),
    LeaseTimeToLive(LeaseTimeToLiveResponse),
    Members(ResponseHeader, Vec<Member>),
    Status(StatusResponse),
    /// The watch is registered; history up to `revision` has been emitted.
    WatchCreated {
        revision: u64,
    },
}

/// Something the driver must do.
#[derive(Clone, Debug)]
pub enum Output {
    Send(Message),
    Respond {
        id: RequestId,
        result: Result<Response, MetaError>,
    },
    WatchEvents {
        watch_id: WatchId,
        revision: u64,
        events: Vec<Event>,
    },
    WatchCanceled {
        watch_id: WatchId,
        compact_revision: u64,
        reason: String,
    },
    /// The member table changed (addresses for the transport).
    Members(Vec<Member>),
    /// Write `batch` to the engine (synced if `sync`), in the order these outputs come, then
    /// call [`MetaCore::handle_persisted`] with `number` (or `handle_persist_failed`). Only with
    /// `CoreConfig::async_persist`; consecutive tasks may share one engine write.
    Persist {
        number: u64,
        batch: crate::engine::WriteBatch,
        sync: bool,
    },
    /// The member stopped (removed, or a storage failure); everything pending has failed.
    Stopped {
        reason: String,
    },
}

/// A log append handed to the driver and not yet durable.
struct InFlight {
    number: u64,
    /// Last log entry (index, term) this append wrote, if it wrote entries.
    last: Option<(u64, u64)>,
    /// Messages that may only leave once this is durable (votes, append acks).
    messages: Vec<Message>,
}

struct PendingWrite {
    id: RequestId,
    term: u64,
    deadline_ms: u64,
}

struct PendingRead {
    id: RequestId,
    req: RangeRequest,
    deadline_ms: u64,
}

struct Watcher {
    start: Vec<u8>,
    end: Vec<u8>,
    prev_kv: bool,
    /// Next revision this watcher must see.
    next_rev: u64,
}

/// Counters the driver exports as metrics.
#[derive(Clone, Debug, Default)]
pub struct CoreStats {
    pub leader_changes: u64,
    pub proposals_committed: u64,
    pub proposals_failed: u64,
    pub reads_served: u64,
    pub snapshots_applied: u64,
    pub snapshots_sent: u64,
}

pub struct MetaCore<E: Engine + Clone> {
    cfg: CoreConfig,
    node: RawNode<LogStore<E>>,
    now_ms: u64,
    disk_free_bytes: u64,
    /// Store size as of the last tick (the quota check needs no more precision than that).
    db_size_bytes: u64,
    outputs: VecDeque<Output>,
    /// Proposed entries awaiting apply, by log index.
    writes: BTreeMap<u64, PendingWrite>,
    /// Reads waiting for the next ReadIndex round.
    read_batch: Vec<PendingRead>,
    /// Reads whose ReadIndex round is in flight, by context.
    reads_in_flight: BTreeMap<u64, Vec<PendingRead>>,
    /// Reads with a confirmed read index, waiting for apply to reach it.
    reads_ready: Vec<(u64, PendingRead)>,
    next_read_ctx: u64,
    /// Leader only: lease id → expiry time.
    lease_deadlines: BTreeMap<u64, u64>,
    /// Leader only: lease id → time a revoke was proposed (retried after the request timeout).
    revoking: BTreeMap<u64, u64>,
    /// Leader only: peer → since when it has been waiting for a snapshot.
    snapshot_waits: BTreeMap<u64, u64>,
    /// Appends handed to the driver, oldest first.
    in_flight: VecDeque<InFlight>,
    watchers: BTreeMap<WatchId, Watcher>,
    role: StateRole,
    leader_id: u64,
    stopped: bool,
    pub stats: CoreStats,
    /// When enabled (simulator), every applied entry as (index, term, hash of its bytes).
    pub applied_trace: Option<Vec<(u64, u64, u64)>>,
}

impl<E: Engine + Clone> MetaCore<E> {
    /// Opens a member on `engine`. `bootstrap` (conf state + members) initialises a new cluster's
    /// storage; a member joining an existing cluster passes `None` and receives everything from
    /// the leader.
    pub fn open(
        cfg: CoreConfig,
        engine: E,
        bootstrap: Option<(ConfState, Vec<Member>)>,
        logger: &slog::Logger,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let store = LogStore::open(engine, bootstrap)?;
        let applied = store.sm.applied_index();
        let mut rc = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            // Several appends to one peer in one Ready travel as one message.
            batch_append: true,
            // Followers learn a new commit index from the next append or heartbeat instead of a
            // dedicated broadcast: half the messages under load, and followers still apply
            // within a heartbeat. (Leader reads, writes and acks are unaffected.)
            skip_bcast_commit: true,
            check_quorum: true,
            pre_vote: true,
            read_only_option: match cfg.read_mode {
                ReadMode::Safe => ReadOnlyOption::Safe,
                ReadMode::Lease => ReadOnlyOption::LeaseBased,
            },
            ..Default::default()
        };
        if cfg.fixed_election_timeout {
            rc.min_election_tick = cfg.election_ticks;
            rc.max_election_tick = cfg.election_ticks + 1;
        } else {
            // Randomise over [E, 1.5E) rather than raft-rs's [E, 2E): a dead leader is replaced
            // sooner on average; with pre-vote, the narrower window costs few split votes.
            rc.min_election_tick = cfg.election_ticks;
            rc.max_election_tick = cfg.election_ticks + (cfg.election_ticks / 2).max(2);
        }
        rc.validate().map_err(|e| StoreError::Engine {
            reason: format!("invalid raft config: {e}"),
        })?;
        let node = RawNode::new(&rc, store, logger).map_err(|e| StoreError::Engine {
            reason: format!("raft start: {e}"),
        })?;
        let mut core = Self {
            cfg,
            node,
            now_ms,
            disk_free_bytes: u64::MAX,
            db_size_bytes: 0,
            outputs: VecDeque::new(),
            writes: BTreeMap::new(),
            read_batch: Vec::new(),
            reads_in_flight: BTreeMap::new(),
            reads_ready: Vec::new(),
            next_read_ctx: 1,
            lease_deadlines: BTreeMap::new(),
            revoking: BTreeMap::new(),
            snapshot_waits: BTreeMap::new(),
            in_flight: VecDeque::new(),
            watchers: BTreeMap::new(),
            role: StateRole::Follower,
            leader_id: 0,
            stopped: false,
            stats: CoreStats::default(),
            applied_trace: None,
        };
        let members = core.sm().members()?;
        core.outputs.push_back(Output::Members(members));
        Ok(core)
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }
    pub fn is_leader(&self) -> bool {
        self.role == StateRole::Leader
    }
    pub fn leader_id(&self) -> u64 {
        self.leader_id
    }
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
    pub fn applied_index(&self) -> u64 {
        self.sm().applied_index()
    }
    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }
    pub fn revision(&self) -> u64 {
        self.sm().revision()
    }
    pub fn db_size_bytes(&self) -> u64 {
        self.node.store().engine().size_bytes()
    }
    pub fn pending_requests(&self) -> usize {
        self.writes.len()
            + self.read_batch.len()
            + self.reads_in_flight.values().map(Vec::len).sum::<usize>()
            + self.reads_ready.len()
    }
    fn sm(&self) -> &crate::state::StateMachine<E> {
        &self.node.store().sm
    }

    /// The leader's view of each peer's replication (for diagnostics).
    pub fn progress_summary(&self) -> String {
        let mut v: Vec<String> = self
            .node
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| {
                format!(
                    "{id}:{:?} matched={} next={}",
                    pr.state, pr.matched, pr.next_idx
                )
            })
            .collect();
        v.sort();
        format!(
            "[{}] first_index={} last_index={}",
            v.join(", "),
            self.node.store().first_index(),
            self.node.store().last_index()
        )
    }

    /// Reads the whole applied key space (tests and the simulator compare members with it).
    pub fn dump_state(&self) -> Result<crate::engine::Pairs, StoreError> {
        self.node
            .store()
            .engine()
            .scan(keys::SM_START, keys::SM_END, usize::MAX)
    }

    /// The next thing the driver must do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            member_id: self.cfg.id,
            revision: self.sm().revision(),
            raft_term: self.node.raft.term,
            leader_id: self.leader_id,
        }
    }

    fn respond(&mut self, id: RequestId, result: Result<Response, MetaError>) {
        self.outputs.push_back(Output::Respond { id, result });
    }

    /// "Not the leader", naming the leader when another member is known to lead. (A leader
    /// that drops a proposal, e.g. while transferring leadership, names nobody, so clients
    /// back off instead of retrying it in a loop.)
    fn not_leader(&self) -> MetaError {
        MetaError::NotLeader {
            leader_id: (self.leader_id != 0 && self.leader_id != self.cfg.id)
                .then_some(self.leader_id),
        }
    }

    /// One Raft tick (the driver calls this every tick interval).
    pub fn handle_tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if self.stopped {
            return;
        }
        // A follower with appends still in flight waits for them before its election clock
        // moves: raft-rs requires the log to be persisted when a member campaigns.
        if self.in_flight.is_empty() || self.is_leader() {
            self.node.tick();
        }
        self.db_size_bytes = self.node.store().engine().size_bytes();
        self.expire_requests();
        self.expire_leases();
        self.retry_stalled_snapshots();
        self.process();
    }

    /// The driver's latest measurement of free space on the data disk.
    pub fn handle_disk_free(&mut self, free_bytes: u64) {
        self.disk_free_bytes = free_bytes;
    }

    /// A Raft message from a peer.
    pub fn handle_message(&mut self, now_ms: u64, msg: Message) {
        self.now_ms = now_ms;
        if self.stopped {
            return;
        }
        // Messages from unknown or removed peers are still stepped: raft-rs ignores what it must.
        if let Err(e) = self.node.step(msg) {
            tracing::debug!(error = %e, "raft step rejected a message");
        }
    }

    /// The transport could not reach `peer`.
    pub fn handle_unreachable(&mut self, peer: u64) {
        self.node.report_unreachable(peer);
    }

    /// The transport found `peer`'s process gone (its Raft port refused a connection after its
    /// stream broke). If that peer led us, the first surviving voter (by id) campaigns at once
    /// instead of waiting out the election timeout; the others keep following the normal rules,
    /// so there is still one candidate and Raft's voting rules decide as always. Not done in
    /// lease-read mode, where skipping the old leader's lease could allow a stale lease read.
    pub fn handle_peer_down(&mut self, now_ms: u64, peer: u64) {
        self.now_ms = now_ms;
        if self.stopped
            || self.is_leader()
            || peer != self.leader_id
            || self.cfg.read_mode == ReadMode::Lease
        {
            return;
        }
        let cs = self.sm().conf_state();
        let first = cs.voters.iter().copied().filter(|v| *v != peer).min();
        if first != Some(self.cfg.id) {
            return;
        }
        tracing::info!(
            member = self.cfg.id,
            leader = peer,
            "leader process is gone; campaigning now"
        );
        let mut m = Message {
            from: peer,
            to: self.cfg.id,
            term: self.node.raft.term,
            ..Default::default()
        };
        m.set_msg_type(raft::eraftpb::MessageType::MsgTimeoutNow);
        if let Err(e) = self.node.step(m) {
            tracing::debug!(error = %e, "early campaign refused");
        }
    }

    /// Delivery of a snapshot message to `peer` failed or finished.
    pub fn handle_snapshot_status(&mut self, peer: u64, delivered: bool) {
        let status = if delivered {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.node.report_snapshot(peer, status);
    }

    /// A watch stream went away.
    pub fn handle_cancel_watch(&mut self, watch_id: WatchId) {
        self.watchers.remove(&watch_id);
    }

    /// A client request. Its result arrives as `Output::Respond { id }`.
    pub fn handle_request(&mut self, now_ms: u64, id: RequestId, req: Request) {
        self.now_ms = now_ms;
        if self.stopped {
            self.respond(id, Err(MetaError::Stopped));
            return;
        }
        if let Err(e) = self.dispatch(id, req) {
            self.respond(id, Err(e));
        }
    }

    /// Runs Raft until it has nothing more to do right now. Call after a batch of `handle_*`.
    pub fn process(&mut self) {
        if self.stopped {
            return;
        }
        self.flush_read_batch();
        while self.node.has_ready() {
            // A snapshot replaces the log: install it only once earlier appends are durable,
            // or one landing after it would bring back entries the snapshot covers.
            if self.node.snap().is_some() && !self.in_flight.is_empty() {
                break;
            }
            let result = if self.cfg.async_persist && self.node.snap().is_none() {
                self.process_ready_async()
            } else {
                self.process_ready()
            };
            if let Err(e) = result {
                self.stop(format!("storage failure: {e}"));
                return;
            }
        }
        self.serve_ready_reads();
    }

    fn stop(&mut self, reason: String) {
        tracing::error!(member = self.cfg.id, %reason, "meta member stopping");
        self.stopped = true;
        let ids: Vec<RequestId> = self
            .writes
            .values()
            .map(|w| w.id)
            .chain(self.read_batch.iter().map(|r| r.id))
            .chain(self.reads_in_flight.values().flatten().map(|r| r.id))
            .chain(self.reads_ready.iter().map(|(_, r)| r.id))
            .collect();
        self.writes.clear();
        self.read_batch.clear();
        self.reads_in_flight.clear();
        self.reads_ready.clear();
        // A proposed write may still commit through the other members: its outcome is unknown.
        for id in ids {
            self.respond(id, Err(MetaError::Interrupted));
        }
        self.outputs.push_back(Output::Stopped { reason });
    }

    fn dispatch(&mut self, id: RequestId, req: Request) -> Result<(), MetaError> {
        match req {
            Request::Range(r) => self.range(id, r),
            Request::Put(p) => self.propose(id, pb::command::Op::Put(p)),
            Request::DeleteRange(d) => self.propose(id, pb::command::Op::DeleteRange(d)),
            Request::Txn(t) => self.propose(id, pb::command::Op::Txn(t)),
            Request::LeaseGrant(g) => self.propose(id, pb::command::Op::LeaseGrant(g)),
            Request::LeaseRevoke(r) => self.propose(id, pb::command::Op::LeaseRevoke(r)),
            Request::LeaseKeepAlive(lease) => {
                let r = self.keep_alive(lease)?;
                self.respond(id, Ok(Response::LeaseKeepAlive(r)));
                Ok(())
            }
            Request::LeaseTimeToLive { id: lease, keys } => {
                let r = self.time_to_live(lease, keys)?;
                self.respond(id, Ok(Response::LeaseTimeToLive(r)));
                Ok(())
            }
            Request::MemberList => {
                let members = self.sm().members()?;
                self.respond(id, Ok(Response::Members(self.header(), members)));
                Ok(())
            }
            Request::MemberAdd(m) => self.member_add(id, m),
            Request::MemberPromote(m) => self.member_change(id, m, ConfChangeType::AddNode),
            Request::MemberRemove(m) => self.member_remove(id, m),
            Request::Status => {
                let s = self.status();
                self.respond(id, Ok(Response::Status(s)));
                Ok(())
            }
            Request::Watch { watch_id, req } => self.watch(id, watch_id, req),
        }
    }

    fn range(&mut self, id: RequestId, req: RangeRequest) -> Result<(), MetaError> {
        validate_key(&req.key).or_else(|e| {
            // An empty key with range_end "\0" means "everything", as in etcd.
            if req.key.is_empty() && req.range_end == [0] {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        if req.serializable {
            let mut r = self.sm().range(&req)?;
            r.header = Some(self.header());
            self.stats.reads_served += 1;
            self.respond(id, Ok(Response::Range(r)));
            return Ok(());
        }
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.read_batch.push(PendingRead {
            id,
            req,
            deadline_ms: self.now_ms + self.cfg.request_timeout_ms,
        });
        Ok(())
    }

    fn flush_read_batch(&mut self) {
        // raft-rs drops a ReadIndex until the leader has committed an entry of its own term;
        // keep the reads until then instead of letting them time out.
        if self.read_batch.is_empty() || !self.node.raft.commit_to_current_term() {
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        let batch = std::mem::take(&mut self.read_batch);
        self.reads_in_flight.insert(ctx, batch);
        self.node.read_index(ctx.to_be_bytes().to_vec());
    }

    fn serve_ready_reads(&mut self) {
        let applied = self.sm().applied_index();
        if self.reads_ready.is_empty() {
            return;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_ready)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_ready = waiting;
        for (_, read) in ready {
            let result = self.sm().range(&read.req).map_err(MetaError::from);
            let result = result.map(|mut r| {
                r.header = Some(self.header());
                Response::Range(r)
            });
            self.stats.reads_served += 1;
            self.respond(read.id, result);
        }
    }

    fn check_space(&self) -> Result<(), MetaError> {
        let size = self.db_size_bytes;
        if size > self.cfg.quota_bytes {
            return Err(MetaError::NoSpace {
                reason: format!(
                    "store is {size} bytes, quota is {} bytes; delete keys to free space",
                    self.cfg.quota_bytes
                ),
            });
        }
        if self.disk_free_bytes < self.cfg.min_free_bytes {
            return Err(MetaError::NoSpace {
                reason: format!(
                    "data disk has {} bytes free, below the reserve of {} bytes",
                    self.disk_free_bytes, self.cfg.min_free_bytes
                ),
            });
        }
        Ok(())
    }

    fn propose(&mut self, id: RequestId, op: pb::command::Op) -> Result<(), MetaError> {
        validate_op(&op)?;
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        // Deletes and revokes free space, so they pass even when the store is full.
        if matches!(
            op,
            pb::command::Op::Put(_) | pb::command::Op::Txn(_) | pb::command::Op::LeaseGrant(_)
        ) {
            self.check_space()?;
        }
        let cmd = pb::Command {
            request_id: id,
            origin: self.cfg.id,
            op: Some(op),
        };
        self.propose_data(id, cmd.encode_to_vec())
    }

    fn propose_data(&mut self, id: RequestId, data: Vec<u8>) -> Result<(), MetaError> {
        let before = self.node.raft.raft_log.last_index();
        self.node
            .propose(Vec::new(), data)
            .map_err(|_| self.not_leader())?;
        self.track_proposal(id, before)
    }

    fn track_proposal(&mut self, id: RequestId, before: u64) -> Result<(), MetaError> {
        let index = self.node.raft.raft_log.last_index();
        if index == before {
            return Err(self.not_leader());
        }
        self.writes.insert(
            index,
            PendingWrite {
                id,
                term: self.node.raft.term,
                deadline_ms: self.now_ms + self.cfg.request_timeout_ms,
            },
        );
        Ok(())
    }

    fn keep_alive(&mut self, lease: u64) -> Result<LeaseKeepAliveResponse, MetaError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let rec = self
            .sm()
            .lease(lease)?
            .ok_or(MetaError::LeaseNotFound { id: lease })?;
        self.lease_deadlines
            .insert(lease, self.now_ms + rec.ttl_seconds * 1000);
        Ok(LeaseKeepAliveResponse {
            header: Some(self.header()),
            id: lease,
            ttl_seconds: rec.ttl_seconds,
        })
    }

    fn time_to_live(
        &mut self,
        lease: u64,
        with_keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, MetaError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let rec = self
            .sm()
            .lease(lease)?
            .ok_or(MetaError::LeaseNotFound { id: lease })?;
        let deadline = self
            .lease_deadlines
            .get(&lease)
            .copied()
            .unwrap_or(self.now_ms);
        let keys = if with_keys {
            self.sm().lease_keys(lease)?
        } else {
            Vec::new()
        };
        Ok(LeaseTimeToLiveResponse {
            header: Some(self.header()),
            id: lease,
            remaining_ms: deadline.saturating_sub(self.now_ms),
            granted_ttl_seconds: rec.ttl_seconds,
            keys,
        })
    }

    fn member_add(&mut self, id: RequestId, m: Member) -> Result<(), MetaError> {
        if m.id == 0 || m.peer_addr.is_empty() || m.client_addr.is_empty() {
            return Err(MetaError::InvalidArgument {
                reason: "a member needs a non-zero id, a peer address and a client address".into(),
            });
        }
        if self.sm().member(m.id)?.is_some() {
            return Err(MetaError::MemberExists { id: m.id });
        }
        if self.sm().members()?.len() >= limits::MAX_MEMBERS {
            return Err(MetaError::MembershipRejected {
                reason: format!("a cluster has at most {} members", limits::MAX_MEMBERS),
            });
        }
        let member = Member {
            is_learner: true,
            ..m
        };
        self.propose_conf(id, member, ConfChangeType::AddLearnerNode)
    }

    fn member_remove(&mut self, id: RequestId, member: u64) -> Result<(), MetaError> {
        let cs = self.sm().conf_state().clone();
        if cs.voters == [member] {
            return Err(MetaError::MembershipRejected {
                reason: "cannot remove the last voter".into(),
            });
        }
        if member == self.cfg.id && self.is_leader() {
            // A leader does not remove itself: hand leadership to the most caught-up voter and
            // let the client retry there.
            let target = self
                .node
                .raft
                .prs()
                .iter()
                .filter(|(pid, _)| **pid != member && cs.voters.contains(pid))
                .max_by_key(|(_, pr)| pr.matched)
                .map(|(pid, _)| *pid);
            if let Some(t) = target {
                self.node.transfer_leader(t);
                return Err(MetaError::NotLeader { leader_id: Some(t) });
            }
        }
        self.member_change(id, member, ConfChangeType::RemoveNode)
    }

    fn member_change(
        &mut self,
        id: RequestId,
        member: u64,
        change: ConfChangeType,
    ) -> Result<(), MetaError> {
        let m = self
            .sm()
            .member(member)?
            .ok_or(MetaError::MemberNotFound { id: member })?;
        if change == ConfChangeType::AddNode {
            if !m.is_learner {
                return Err(MetaError::MembershipRejected {
                    reason: format!("member {member} is already a voter"),
                });
            }
            if !self.is_leader() {
                return Err(self.not_leader());
            }
            // Promote only a learner that has (nearly) caught up, or the cluster could stall
            // waiting for it (etcd applies the same rule).
            let last = self.node.raft.raft_log.last_index();
            let matched = self
                .node
                .raft
                .prs()
                .get(member)
                .map(|p| p.matched)
                .unwrap_or(0);
            if matched + 100 < last || matched * 10 < last * 9 {
                return Err(MetaError::LearnerNotReady {
                    id: member,
                    matched,
                    last,
                });
            }
        }
        self.propose_conf(id, m, change)
    }

    fn propose_conf(
        &mut self,
        id: RequestId,
        member: Member,
        change: ConfChangeType,
    ) -> Result<(), MetaError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if self.node.raft.has_pending_conf() {
            return Err(MetaError::MembershipRejected {
                reason: "another membership change is in progress; retry".into(),
            });
        }
        let mut single = ConfChangeSingle {
            node_id: member.id,
            ..Default::default()
        };
        single.set_change_type(change);
        let mut cc = ConfChangeV2 {
            changes: vec![single],
            ..Default::default()
        };
        let ctx = pb::ConfChangeContext {
            request_id: id,
            origin: self.cfg.id,
            member: Some(member),
        };
        cc.context = ctx.encode_to_vec();
        let before = self.node.raft.raft_log.last_index();
        self.node.propose_conf_change(Vec::new(), cc).map_err(|e| {
            MetaError::MembershipRejected {
                reason: e.to_string(),
            }
        })?;
        self.track_proposal(id, before)
    }

    fn status(&self) -> StatusResponse {
        let cs = self.sm().conf_state();
        StatusResponse {
            header: Some(self.header()),
            member_id: self.cfg.id,
            leader_id: self.leader_id,
            term: self.node.raft.term,
            commit_index: self.commit_index(),
            applied_index: self.sm().applied_index(),
            db_size_bytes: self.db_size_bytes(),
            raft_state: role_name(self.role).into(),
            is_learner: cs.learners.contains(&self.cfg.id),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            first_log_index: self.node.store().first_index(),
            snapshot_index: self.node.store().truncated_index(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn watch(
        &mut self,
        id: RequestId,
        watch_id: WatchId,
        req: WatchRequest,
    ) -> Result<(), MetaError> {
        if self.watchers.len() >= limits::MAX_WATCHES {
            return Err(MetaError::Busy {
                pending: self.watchers.len(),
            });
        }
        if !(req.key.is_empty() && req.range_end == [0]) {
            validate_key(&req.key)?;
        }
        let (start, end) = keys::kv_range(&req.key, &req.range_end);
        let current = self.sm().revision();
        let next_rev = if req.start_revision == 0 {
            current + 1
        } else {
            req.start_revision
        };
        let compact = self.sm().compact_revision();
        if next_rev < compact {
            return Err(MetaError::Compacted {
                requested: next_rev,
                compact_revision: compact,
            });
        }
        let mut w = Watcher {
            start,
            end,
            prev_kv: req.prev_kv,
            next_rev,
        };
        self.replay_history(watch_id, &mut w)?;
        self.watchers.insert(watch_id, w);
        self.respond(id, Ok(Response::WatchCreated { revision: current }));
        Ok(())
    }

    /// Emits recorded events from `w.next_rev` up to the applied revision.
    fn replay_history(&mut self, watch_id: WatchId, w: &mut Watcher) -> Result<(), StoreError> {
        let current = self.sm().revision();
        if w.next_rev > current {
            return Ok(());
        }
        for (rev, events) in self.sm().history(w.next_rev, current)? {
            emit_watch(&mut self.outputs, watch_id, w, rev, &events);
        }
        w.next_rev = current + 1;
        Ok(())
    }

    fn expire_requests(&mut self) {
        let now = self.now_ms;
        let timeout_ms = self.cfg.request_timeout_ms;
        let expired: Vec<u64> = self
            .writes
            .iter()
            .filter(|(_, w)| w.deadline_ms <= now)
            .map(|(i, _)| *i)
            .collect();
        for index in expired {
            if let Some(w) = self.writes.remove(&index) {
                self.stats.proposals_failed += 1;
                self.respond(w.id, Err(MetaError::Timeout { timeout_ms }));
            }
        }
        let mut timed_out = Vec::new();
        for reads in self.reads_in_flight.values_mut() {
            reads.retain(|r| {
                let keep = r.deadline_ms > now;
                if !keep {
                    timed_out.push(r.id);
                }
                keep
            });
        }
        self.reads_in_flight.retain(|_, v| !v.is_empty());
        self.reads_ready.retain(|(_, r)| {
            let keep = r.deadline_ms > now;
            if !keep {
                timed_out.push(r.id);
            }
            keep
        });
        for id in timed_out {
            self.respond(id, Err(MetaError::Timeout { timeout_ms }));
        }
    }

    fn retry_stalled_snapshots(&mut self) {
        if !self.is_leader() {
            self.snapshot_waits.clear();
            return;
        }
        let waiting: Vec<u64> = self
            .node
            .raft
            .prs()
            .iter()
            .filter(|(_, pr)| pr.state == raft::ProgressState::Snapshot)
            .map(|(id, _)| *id)
            .collect();
        self.snapshot_waits.retain(|id, _| waiting.contains(id));
        for id in waiting {
            let since = *self.snapshot_waits.entry(id).or_insert(self.now_ms);
            if self.now_ms.saturating_sub(since) >= self.cfg.snapshot_retry_ms {
                tracing::warn!(
                    peer = id,
                    "snapshot not acknowledged in time; sending a new one"
                );
                self.node.report_snapshot(id, raft::SnapshotStatus::Failure);
                self.snapshot_waits.remove(&id);
            }
        }
    }

    fn expire_leases(&mut self) {
        if !self.is_leader() {
            return;
        }
        let now = self.now_ms;
        let retry_ms = self.cfg.request_timeout_ms;
        let expired: Vec<u64> = self
            .lease_deadlines
            .iter()
            .filter(|(id, d)| {
                **d <= now && self.revoking.get(id).is_none_or(|t| t + retry_ms <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for lease in expired {
            tracing::info!(lease, "lease expired; revoking");
            let cmd = pb::Command {
                request_id: 0,
                origin: self.cfg.id,
                op: Some(pb::command::Op::LeaseRevoke(LeaseRevokeRequest {
                    id: lease,
                })),
            };
            if self.node.propose(Vec::new(), cmd.encode_to_vec()).is_ok() {
                self.revoking.insert(lease, now);
            }
        }
    }

    fn on_role_change(&mut self, role: StateRole, leader_id: u64) {
        if leader_id != self.leader_id && leader_id != 0 {
            self.stats.leader_changes += 1;
        }
        self.leader_id = leader_id;
        if role == self.role {
            return;
        }
        let was_leader = self.role == StateRole::Leader;
        self.role = role;
        if was_leader {
            // Outcomes of in-flight proposals are unknown now; reads must be re-confirmed.
            let writes = std::mem::take(&mut self.writes);
            for (_, w) in writes {
                self.stats.proposals_failed += 1;
                self.respond(w.id, Err(MetaError::LeaderChanged));
            }
            let reads: Vec<RequestId> = std::mem::take(&mut self.reads_in_flight)
                .into_values()
                .flatten()
                .chain(std::mem::take(&mut self.read_batch))
                .map(|r| r.id)
                .collect();
            for id in reads {
                self.respond(id, Err(MetaError::LeaderChanged));
            }
            self.lease_deadlines.clear();
            self.revoking.clear();
        }
        if role == StateRole::Leader {
            // A new leader extends every lease by its full TTL (etcd does the same): it cannot
            // know how long the old leader last heard from the holders.
            match self.sm().leases() {
                Ok(leases) => {
                    for l in leases {
                        self.lease_deadlines
                            .insert(l.id, self.now_ms + l.ttl_seconds * 1000);
                    }
                }
                Err(e) => self.stop(format!("reading leases: {e}")),
            }
        }
    }

    fn send_all(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                self.stats.snapshots_sent += 1;
            }
            self.outputs.push_back(Output::Send(m));
        }
    }

    /// One Ready round in raft-rs's documented order.
    fn process_ready(&mut self) -> Result<(), StoreError> {
        // 1. A leader may send before persisting (Raft thesis 10.2.1).
        let mut rd = self.start_ready();
        // 2. A snapshot from the leader replaces everything.
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.node.mut_store().apply_snapshot(&snap)?;
            self.stats.snapshots_applied += 1;
            self.after_snapshot()?;
        }
        // 3. Confirmed read indexes.
        self.confirm_reads(&mut rd);
        // 4. Entries and hard state (with the commit index) in one batch, synced when entries,
        //    term or vote changed. A commit-only change is ordered before the applies below in
        //    the same WAL, which is all `applied <= commit` needs.
        let sync = rd.must_sync();
        self.node.mut_store().append(rd.entries(), rd.hs(), sync)?;
        // 5. Apply what is committed (everything it needs is persisted by now).
        let committed = rd.take_committed_entries();
        self.apply_entries(committed)?;
        // 6. Messages that promised persistence.
        self.send_all(rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit)?;
        }
        self.send_all(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.node.advance_apply();
        self.maybe_compact()?;
        Ok(())
    }

    /// Takes the next Ready, notes role changes and sends what may leave before persistence.
    fn start_ready(&mut self) -> raft::Ready {
        let mut rd = self.node.ready();
        if let Some(ss) = rd.ss() {
            let (role, leader) = (ss.raft_state, ss.leader_id);
            self.on_role_change(role, leader);
        }
        self.send_all(rd.take_messages());
        rd
    }

    /// Reads whose ReadIndex a quorum confirmed now wait for apply to reach it.
    fn confirm_reads(&mut self, rd: &mut raft::Ready) {
        for rs in rd.take_read_states() {
            let ctx = u64::from_be_bytes(rs.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some(reads) = self.reads_in_flight.remove(&ctx) {
                self.reads_ready
                    .extend(reads.into_iter().map(|r| (rs.index, r)));
            }
        }
    }

    /// One Ready round whose appends are persisted by the driver (see `Output::Persist`).
    fn process_ready_async(&mut self) -> Result<(), StoreError> {
        let mut rd = self.start_ready();
        self.confirm_reads(&mut rd);
        // Committed entries handed out here are durable locally already (raft-rs bounds them
        // by the persisted index), so they can be applied while newer appends are in flight.
        let committed = rd.take_committed_entries();
        self.apply_entries(committed)?;
        let entries = rd.take_entries();
        let hs = rd.hs().cloned();
        let sync = rd.must_sync();
        let messages = rd.take_persisted_messages();
        let number = rd.number();
        // raft-rs reads these entries from storage once the Ready is advanced: stage first.
        let batch = self.node.mut_store().stage_append(&entries, hs.as_ref());
        self.node.advance_append_async(rd);
        self.node.advance_apply();
        self.in_flight.push_back(InFlight {
            number,
            last: entries.last().map(|e| (e.index, e.term)),
            messages,
        });
        self.outputs.push_back(Output::Persist {
            number,
            batch,
            sync,
        });
        self.maybe_compact()
    }

    /// The driver made the append `number` (and every earlier one) durable.
    pub fn handle_persisted(&mut self, number: u64) {
        if self.stopped {
            return;
        }
        while self.in_flight.front().is_some_and(|t| t.number <= number) {
            let Some(t) = self.in_flight.pop_front() else {
                break;
            };
            if let Some((index, term)) = t.last {
                self.node.mut_store().mark_durable(index, term);
            }
            self.node.on_persist_ready(t.number);
            self.send_all(t.messages);
        }
    }

    /// The driver could not persist an append: stop (fail-stop), acknowledging nothing more.
    pub fn handle_persist_failed(&mut self, reason: String) {
        if !self.stopped {
            self.stop(format!("storage failure: {reason}"));
        }
    }

    fn after_snapshot(&mut self) -> Result<(), StoreError> {
        let members = self.sm().members()?;
        self.outputs.push_back(Output::Members(members));
        // Watchers missed the entries the snapshot covered: replay them from its history.
        let ids: Vec<WatchId> = self.watchers.keys().copied().collect();
        let compact = self.sm().compact_revision();
        for id in ids {
            let Some(mut w) = self.watchers.remove(&id) else {
                continue;
            };
            if w.next_rev < compact {
                self.outputs.push_back(Output::WatchCanceled {
                    watch_id: id,
                    compact_revision: compact,
                    reason: "history compacted while this member caught up".into(),
                });
                continue;
            }
            self.replay_history(id, &mut w)?;
            self.watchers.insert(id, w);
        }
        // Reads waiting for an index the snapshot covers can be served now.
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), StoreError> {
        let applied = self.sm().applied_index();
        let store = self.node.store();
        if store.truncated_index() == 0 && applied >= 1 {
            // The initial configuration is bootstrapped into the state machine, not the log:
            // a member joining later must start from a snapshot (which carries it), never from
            // entry 1, or it would build its configuration from the conf changes alone (just
            // itself) and could elect itself. So no log keeps entry 1 once it is applied.
            return self.node.mut_store().compact(1);
        }
        if applied.saturating_sub(store.truncated_index()) <= self.cfg.snapshot_entries {
            return Ok(());
        }
        // Keep a quarter of the window so briefly lagging followers still catch up from the log.
        let to = applied - self.cfg.snapshot_entries / 4;
        self.node.mut_store().compact(to)
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        for e in entries {
            if e.index <= self.sm().applied_index() {
                continue;
            }
            if let Some(trace) = self.applied_trace.as_mut() {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (e.entry_type, &e.data, &e.context).hash(&mut h);
                trace.push((e.index, e.term, h.finish()));
            }
            match e.get_entry_type() {
                // Normal and conf-change entries complete their own pending write.
                EntryType::EntryNormal if !e.data.is_empty() => self.apply_normal(&e)?,
                EntryType::EntryConfChangeV2 => self.apply_conf_change(&e)?,
                // An empty entry (a new leader's) or a v1 conf change (never proposed here)
                // changes no state; a write pending at its index was replaced.
                EntryType::EntryNormal | EntryType::EntryConfChange => {
                    self.node.mut_store().sm.apply_empty(e.index, e.term)?;
                    self.complete_write(e.index, e.term, None);
                }
            }
        }
        Ok(())
    }

    /// Finishes the pending write at `index`, if any: with `result` when the entry there is the
    /// one proposed (same term), else with LeaderChanged (another leader's entry replaced it).
    fn complete_write(
        &mut self,
        index: u64,
        term: u64,
        result: Option<Result<Response, MetaError>>,
    ) {
        // Anything older than `index` still pending was overwritten.
        while let Some((&i, _)) = self.writes.first_key_value() {
            if i >= index {
                break;
            }
            if let Some(w) = self.writes.remove(&i) {
                self.stats.proposals_failed += 1;
                self.respond(w.id, Err(MetaError::LeaderChanged));
            }
        }
        let Some(result) = result else {
            if let Some(w) = self.writes.get(&index) {
                if w.term != term {
                    let w = self.writes.remove(&index).unwrap();
                    self.respond(w.id, Err(MetaError::LeaderChanged));
                }
            }
            return;
        };
        if let Some(w) = self.writes.remove(&index) {
            if w.term == term {
                self.stats.proposals_committed += 1;
                self.respond(w.id, result);
            } else {
                self.stats.proposals_failed += 1;
                self.respond(w.id, Err(MetaError::LeaderChanged));
            }
        }
    }

    fn apply_normal(&mut self, e: &Entry) -> Result<(), StoreError> {
        let cmd: pb::Command = crate::log_store::decode(&keys::log(e.index), &e.data)?;
        let Some(op) = cmd.op.as_ref() else {
            return Err(StoreError::Corrupt {
                key: keys::log(e.index),
                reason: "command without an operation".into(),
            });
        };
        if let pb::command::Op::LeaseRevoke(r) = op {
            self.lease_deadlines.remove(&r.id);
            self.revoking.remove(&r.id);
        }
        let outcome = self
            .node
            .mut_store()
            .sm
            .apply_command(e.index, e.term, op)?;
        if let Ok(Applied::LeaseGrant(g)) = &outcome.result {
            if self.is_leader() {
                self.lease_deadlines
                    .insert(g.id, self.now_ms + g.ttl_seconds * 1000);
            }
        }
        if !outcome.events.is_empty() {
            self.dispatch_events(&outcome.events);
        }
        let header = self.header();
        let result = outcome
            .result
            .map(|a| Response::Applied(with_header(a, header)));
        self.complete_write(e.index, e.term, Some(result));
        Ok(())
    }

    fn dispatch_events(&mut self, events: &[Event]) {
        let rev = self.sm().revision();
        for (id, w) in self.watchers.iter_mut() {
            if w.next_rev > rev {
                continue;
            }
            emit_watch(&mut self.outputs, *id, w, rev, events);
            w.next_rev = rev + 1;
        }
    }

    fn apply_conf_change(&mut self, e: &Entry) -> Result<(), StoreError> {
        let key = keys::log(e.index);
        let before = self.sm().conf_state();
        if before.voters.is_empty() && before.learners.is_empty() {
            // Only a bootstrap or a snapshot gives a member its first configuration; a conf
            // change applied to none would make this member the cluster's only voter.
            return Err(StoreError::Corrupt {
                key,
                reason: "a conf change reached a member without the cluster's configuration (a \
                         member joining must start from a snapshot)"
                    .into(),
            });
        }
        let cc: ConfChangeV2 = crate::log_store::decode(&key, &e.data)?;
        let ctx: pb::ConfChangeContext = crate::log_store::decode(&key, &cc.context)?;
        let result = match self.node.apply_conf_change(&cc) {
            Ok(cs) => {
                let mut added = None;
                let mut removed = Vec::new();
                let mut promoted = Vec::new();
                for c in &cc.changes {
                    match c.get_change_type() {
                        ConfChangeType::AddLearnerNode => added = ctx.member.clone(),
                        ConfChangeType::AddNode => promoted.push(c.node_id),
                        ConfChangeType::RemoveNode => removed.push(c.node_id),
                    }
                }
                self.node.mut_store().sm.apply_conf_change(
                    e.index,
                    e.term,
                    cs,
                    added.as_ref(),
                    &removed,
                    &promoted,
                )?;
                let members = self.sm().members()?;
                self.outputs.push_back(Output::Members(members.clone()));
                if removed.contains(&self.cfg.id) {
                    self.stop(format!(
                        "member {} was removed from the cluster",
                        self.cfg.id
                    ));
                }
                Ok(Response::Members(self.header(), members))
            }
            Err(err) => {
                self.node.mut_store().sm.apply_empty(e.index, e.term)?;
                Err(MetaError::MembershipRejected {
                    reason: err.to_string(),
                })
            }
        };
        self.complete_write(e.index, e.term, Some(result));
        Ok(())
    }
}

fn emit_watch(
    outputs: &mut VecDeque<Output>,
    watch_id: WatchId,
    w: &Watcher,
    rev: u64,
    events: &[Event],
) {
    if rev < w.next_rev {
        return;
    }
    let matching: Vec<Event> = events
        .iter()
        .filter(|ev| {
            ev.kv.as_ref().is_some_and(|kv| {
                let k = keys::kv(&kv.key);
                k >= w.start && k < w.end
            })
        })
        .map(|ev| {
            let mut ev = ev.clone();
            if !w.prev_kv {
                ev.prev_kv = None;
            }
            ev
        })
        .collect();
    if !matching.is_empty() {
        outputs.push_back(Output::WatchEvents {
            watch_id,
            revision: rev,
            events: matching,
        });
    }
}

fn with_header(a: Applied, mut header: ResponseHeader) -> Applied {
    // The revision is the one the command observed (set by the state machine).
    let set = |h: &mut Option<ResponseHeader>, header: &mut ResponseHeader| {
        if let Some(old) = h {
            header.revision = old.revision;
        }
        *h = Some(header.clone());
    };
    match a {
        Applied::Put(mut r) => {
            set(&mut r.header, &mut header);
            Applied::Put(r)
        }
        Applied::DeleteRange(mut r) => {
            set(&mut r.header, &mut header);
            Applied::DeleteRange(r)
        }
        Applied::Txn(mut r) => {
            set(&mut r.header, &mut header);
            Applied::Txn(r)
        }
        Applied::LeaseGrant(mut r) => {
            set(&mut r.header, &mut header);
            Applied::LeaseGrant(r)
        }
        Applied::LeaseRevoke(mut r) => {
            set(&mut r.header, &mut header);
            Applied::LeaseRevoke(r)
        }
    }
}

pub fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;

    fn single(engine: MemEngine) -> MetaCore<MemEngine> {
        let mut cfg = CoreConfig::new(1);
        cfg.min_free_bytes = 1000;
        let member = Member {
            id: 1,
            peer_addr: "p".into(),
            client_addr: "c".into(),
            is_learner: false,
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let boot = Some((ConfState::from((vec![1], Vec::<u64>::new())), vec![member]));
        let mut core = MetaCore::open(cfg, engine, boot, &logger, 0).unwrap();
        for t in 1..=40 {
            core.handle_tick(t * 100);
        }
        assert!(core.is_leader());
        core
    }

    fn call(
        core: &mut MetaCore<MemEngine>,
        id: RequestId,
        req: Request,
    ) -> Result<Response, MetaError> {
        core.handle_request(5_000, id, req);
        core.process();
        let mut result = None;
        while let Some(o) = core.poll_output() {
            if let Output::Respond { id: rid, result: r } = o {
                if rid == id {
                    result = Some(r);
                }
            }
        }
        result.expect("a response")
    }

    fn put(key: &str) -> Request {
        Request::Put(PutRequest {
            key: key.into(),
            value: key.into(),
            ..Default::default()
        })
    }

    #[test]
    fn low_disk_space_refuses_writes_but_not_deletes_or_reads() {
        let mut core = single(MemEngine::new());
        call(&mut core, 1, put("a")).unwrap();
        core.handle_disk_free(10);
        assert!(matches!(
            call(&mut core, 2, put("b")),
            Err(MetaError::NoSpace { .. })
        ));
        let del = Request::DeleteRange(DeleteRangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        });
        call(&mut core, 3, del).unwrap();
        let read = Request::Range(RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        });
        let Ok(Response::Range(r)) = call(&mut core, 4, read) else {
            panic!()
        };
        assert!(r.kvs.is_empty());
        core.handle_disk_free(u64::MAX);
        call(&mut core, 5, put("b")).unwrap();
    }

    /// The membership invariant (ARCHITECTURE.md, meta): a member that joins gets its first
    /// configuration from a snapshot, never by applying conf changes to none (which made a
    /// joined member a cluster of itself that could elect itself and lose acked writes).
    #[test]
    fn a_joining_member_starts_from_a_snapshot_and_never_stands_alone() {
        let mut leader = single(MemEngine::new());
        for i in 0..5 {
            call(&mut leader, i + 1, put(&format!("k{i}"))).unwrap();
        }
        assert!(
            leader.node.store().truncated_index() >= 1,
            "entry 1 (before any configuration) is still in the log"
        );
        let joining = Member {
            id: 2,
            peer_addr: "p2".into(),
            client_addr: "c2".into(),
            is_learner: false,
        };
        let mut now = 5_000;
        leader.handle_request(now, 100, Request::MemberAdd(joining));
        let mut cfg = CoreConfig::new(2);
        cfg.min_free_bytes = 1000;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut joiner = MetaCore::open(cfg, MemEngine::new(), None, &logger, 0).unwrap();
        let (mut added, mut snapshots, mut first_conf) = (false, 0, None);
        for _ in 0..400 {
            now += 50;
            leader.handle_tick(now);
            joiner.handle_tick(now);
            leader.process();
            while let Some(o) = leader.poll_output() {
                match o {
                    Output::Send(m) if m.to == 2 => {
                        let snap = m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
                        joiner.handle_message(now, m);
                        if snap {
                            snapshots += 1;
                            leader.handle_snapshot_status(2, true);
                        }
                    }
                    Output::Respond { id: 100, result } => {
                        result.unwrap();
                        added = true;
                    }
                    _ => {}
                }
            }
            joiner.process();
            while let Some(o) = joiner.poll_output() {
                if let Output::Send(m) = o {
                    leader.handle_message(now, m);
                }
            }
            let cs = joiner.sm().conf_state().clone();
            if first_conf.is_none() && !(cs.voters.is_empty() && cs.learners.is_empty()) {
                first_conf = Some(cs);
            }
            assert!(!joiner.is_stopped(), "the joining member fail-stopped");
            assert!(!joiner.is_leader(), "the joining member elected itself");
            if added && snapshots > 0 && joiner.applied_index() == leader.applied_index() {
                break;
            }
        }
        assert!(added, "the member add was never acknowledged");
        assert!(snapshots > 0, "the joining member was not sent a snapshot");
        let first = first_conf.expect("the joining member never got a configuration");
        assert!(
            first.voters.contains(&1),
            "the first configuration the joining member had lacks the leader: {first:?}"
        );
        assert_eq!(joiner.applied_index(), leader.applied_index());
        let state = joiner.dump_state().unwrap();
        for i in 0..5 {
            let key = format!("k{i}");
            assert!(
                state.iter().any(|(k, _)| k.ends_with(key.as_bytes())),
                "{key} missing on the joined member"
            );
        }
    }

    #[test]
    fn storage_failure_stops_the_member_and_loses_nothing_acked() {
        let engine = MemEngine::new();
        let mut core = single(engine.clone());
        for i in 0..20 {
            call(&mut core, i + 1, put(&format!("k{i}"))).unwrap();
        }
        engine.set_full(true);
        let r = call(&mut core, 100, put("doomed"));
        assert!(r.is_err(), "a write on a failed disk was acknowledged");
        assert!(core.is_stopped());
        assert!(matches!(
            call(&mut core, 101, put("x")),
            Err(MetaError::Stopped)
        ));
        drop(core);
        engine.crash(0);
        engine.set_full(false);
        let mut core = single(engine);
        for i in 0..20 {
            let read = Request::Range(RangeRequest {
                key: format!("k{i}").into_bytes(),
                ..Default::default()
            });
            let Ok(Response::Range(r)) = call(&mut core, 200 + i, read) else {
                panic!()
            };
            assert_eq!(r.kvs.len(), 1, "acked key k{i} lost");
        }
    }
}
