//! Deterministic simulation of a meta cluster: several [`MetaCore`]s on [`MemEngine`]s, one
//! thread, virtual time, a seeded network that delays, reorders, drops and partitions, and
//! crashes that lose unsynced writes. The same seed always gives the same run.
//!
//! Checked after every step and at the end:
//! - **agreement**: no two members ever apply different entries at the same log index;
//! - **durability**: every acknowledged put is present, with its value, once the cluster heals;
//! - **convergence**: after healing, all members reach the same applied state, byte for byte;
//! - **liveness**: after healing, a leader is elected and a new write commits.

use std::collections::BTreeMap;

use continuum_proto::meta::{Member, PutRequest};
use raft::eraftpb::{ConfState, Message};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::core::{CoreConfig, MetaCore, Output, Request, Response};
use crate::engine::{Engine, MemEngine};
use crate::state::Applied;

/// Knobs of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub members: usize,
    /// Virtual milliseconds of faulty operation before healing.
    pub fault_ms: u64,
    pub drop_probability: f64,
    pub max_delay_ms: u64,
    /// Mean virtual ms between fault events (partition, heal, crash, restart).
    pub fault_every_ms: u64,
    pub snapshot_entries: u64,
    /// Deliberately broken storage, to show the checkers catch it: the simulated log writer
    /// reports appends durable without syncing them (a crash then loses acknowledged entries).
    pub break_log_sync: bool,
    /// Keys of a register workload (puts, linearizable gets and compare-and-swaps on a few
    /// shared keys) whose history goes into the report for a linearizability checker; 0: off.
    pub registers: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            members: 3,
            fault_ms: 20_000,
            drop_probability: 0.05,
            max_delay_ms: 30,
            fault_every_ms: 1_500,
            snapshot_entries: 64,
            break_log_sync: false,
            registers: 0,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub acked_puts: usize,
    pub failed_puts: usize,
    pub crashes: usize,
    pub partitions: usize,
    pub messages_dropped: usize,
    pub snapshots_applied: u64,
    pub applied_index: u64,
    /// The register workload's history (see [`SimConfig::registers`]).
    pub history: Vec<KvRecord>,
}

/// One operation of the register workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvCall {
    Put(Vec<u8>),
    Get,
    /// Put `new` if the key's value is `expect` (`None`: absent).
    Cas {
        expect: Option<Vec<u8>>,
        new: Vec<u8>,
    },
}

/// What the client learnt of an operation; `None` in [`KvRecord::result`] when it never
/// learnt (timeout, crash, an error: the write may or may not have been applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvResult {
    Put,
    Get(Option<Vec<u8>>),
    Cas(bool),
}

/// One entry of the history: invocation and completion in virtual ms.
#[derive(Clone, Debug)]
pub struct KvRecord {
    pub key: Vec<u8>,
    pub call: KvCall,
    pub invoke_ms: u64,
    pub complete_ms: Option<u64>,
    pub result: Option<KvResult>,
    /// Refused before it could take effect (not the leader, overloaded, stopped): it never
    /// happened.
    pub refused: bool,
}

const TICK_MS: u64 = 100;

struct SimMember {
    engine: MemEngine,
    core: Option<MetaCore<MemEngine>>,
    next_tick_ms: u64,
    /// Appends handed to this member's (simulated) log writer: (due time, number, batch, sync).
    persists: std::collections::VecDeque<(u64, u64, crate::engine::WriteBatch, bool)>,
}

struct Flight {
    at_ms: u64,
    seq: u64,
    to: u64,
    msg: Message,
}

struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    now_ms: u64,
    members: Vec<SimMember>,
    flights: Vec<Flight>,
    flight_seq: u64,
    /// Pairs (a, b) that cannot talk (both directions are listed separately).
    cut: Vec<(u64, u64)>,
    /// index → (term, hash) of the first entry applied there by anyone.
    applied_at: BTreeMap<u64, (u64, u64)>,
    /// request id → key of an outstanding put.
    outstanding: BTreeMap<u64, Vec<u8>>,
    acked: BTreeMap<Vec<u8>, Vec<u8>>,
    next_request: u64,
    next_key: u64,
    /// Whether clients keep sending puts.
    clients: bool,
    /// request id → index in `report.history` of an outstanding register operation.
    register_ops: BTreeMap<u64, usize>,
    next_value: u64,
    report: SimReport,
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Result<Self, String> {
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(seed),
            now_ms: 0,
            members: Vec::new(),
            flights: Vec::new(),
            flight_seq: 0,
            cut: Vec::new(),
            applied_at: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            acked: BTreeMap::new(),
            next_request: 1,
            next_key: 0,
            clients: true,
            register_ops: BTreeMap::new(),
            next_value: 0,
            report: SimReport {
                seed,
                ..Default::default()
            },
            cfg,
        };
        for i in 0..sim.cfg.members {
            let engine = MemEngine::new();
            let jitter = sim.rng.gen_range(0..TICK_MS);
            sim.members.push(SimMember {
                engine,
                core: None,
                next_tick_ms: jitter,
                persists: std::collections::VecDeque::new(),
            });
            sim.start(i)?;
        }
        Ok(sim)
    }

    fn bootstrap(&self) -> (ConfState, Vec<Member>) {
        let ids: Vec<u64> = (1..=self.cfg.members as u64).collect();
        let members = ids
            .iter()
            .map(|id| Member {
                id: *id,
                peer_addr: format!("sim-{id}"),
                client_addr: format!("sim-{id}"),
                is_learner: false,
            })
            .collect();
        (ConfState::from((ids, Vec::<u64>::new())), members)
    }

    fn start(&mut self, i: usize) -> Result<(), String> {
        let mut cfg = CoreConfig::new(i as u64 + 1);
        cfg.fixed_election_timeout = true;
        cfg.snapshot_entries = self.cfg.snapshot_entries;
        cfg.request_timeout_ms = 3_000;
        cfg.snapshot_retry_ms = 2_000;
        // Odd seeds persist appends on a simulated writer thread that lags behind the core.
        cfg.async_persist = self.report.seed % 2 == 1;
        let engine = self.members[i].engine.clone();
        let mut core = MetaCore::open(cfg, engine, Some(self.bootstrap()), &logger(), self.now_ms)
            .map_err(|e| format!("member {} failed to open: {e}", i + 1))?;
        core.applied_trace = Some(Vec::new());
        self.members[i].core = Some(core);
        Ok(())
    }

    fn crash(&mut self, i: usize) {
        // Appends the writer had not done yet are lost with the process.
        self.members[i].persists.clear();
        if self.members[i].core.take().is_some() {
            let unsynced = self.members[i].engine.unsynced_batches();
            let keep = self.rng.gen_range(0..=unsynced);
            self.members[i].engine.crash(keep);
            self.report.crashes += 1;
            // Survivors usually notice the dead process (refused connections) and may campaign
            // early; sometimes they do not (the notice can be lost).
            let now = self.now_ms;
            for j in 0..self.members.len() {
                if j != i && self.rng.gen_bool(0.7) {
                    if let Some(core) = self.members[j].core.as_mut() {
                        core.handle_peer_down(now, i as u64 + 1);
                    }
                }
            }
            // Requests on the crashed member are gone with it (register operations stay in
            // the history with unknown outcomes).
            self.outstanding.retain(|id, _| id % 16 != i as u64);
            self.register_ops.retain(|id, _| id % 16 != i as u64);
        }
    }

    fn can_talk(&self, from: u64, to: u64) -> bool {
        !self.cut.contains(&(from, to))
    }

    /// Runs a member's outputs into the network and the client bookkeeping.
    fn drain(&mut self, i: usize) -> Result<(), String> {
        let Some(core) = self.members[i].core.as_mut() else {
            return Ok(());
        };
        core.process();
        let mut outs = Vec::new();
        while let Some(o) = core.poll_output() {
            outs.push(o);
        }
        if let Some(trace) = core.applied_trace.as_mut() {
            for (index, term, hash) in trace.drain(..) {
                match self.applied_at.get(&index) {
                    Some(&(t, h)) if (t, h) != (term, hash) => {
                        return Err(format!(
                            "agreement violated: member {} applied ({term}, {hash:x}) at {index}, \
                             another member applied ({t}, {h:x})",
                            i + 1
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.applied_at.insert(index, (term, hash));
                    }
                }
            }
        }
        for o in outs {
            match o {
                Output::Send(msg) => {
                    let from = i as u64 + 1;
                    if !self.can_talk(from, msg.to) || self.rng.gen_bool(self.cfg.drop_probability)
                    {
                        self.report.messages_dropped += 1;
                        continue;
                    }
                    let delay = self.rng.gen_range(1..=self.cfg.max_delay_ms);
                    self.flight_seq += 1;
                    self.flights.push(Flight {
                        at_ms: self.now_ms + delay,
                        seq: self.flight_seq,
                        to: msg.to,
                        msg,
                    });
                }
                Output::Respond { id, result } if self.register_ops.contains_key(&id) => {
                    let at = self.register_ops.remove(&id).expect("checked");
                    let now = self.now_ms;
                    let rec = &mut self.report.history[at];
                    let learnt = match (&rec.call, result) {
                        (KvCall::Put(_), Ok(Response::Applied(Applied::Put(_)))) => {
                            Some(KvResult::Put)
                        }
                        (KvCall::Get, Ok(Response::Range(r))) => {
                            Some(KvResult::Get(r.kvs.first().map(|kv| kv.value.clone())))
                        }
                        (KvCall::Cas { .. }, Ok(Response::Applied(Applied::Txn(t)))) => {
                            Some(KvResult::Cas(t.succeeded))
                        }
                        (_, Ok(other)) => return Err(format!("unexpected response {other:?}")),
                        (_, Err(e)) => {
                            use crate::error::MetaError as E;
                            rec.refused = matches!(
                                e,
                                E::NotLeader { .. }
                                    | E::Busy { .. }
                                    | E::Stopped
                                    | E::InvalidArgument { .. }
                            );
                            None
                        }
                    };
                    if learnt.is_some() {
                        rec.complete_ms = Some(now);
                        rec.result = learnt;
                    }
                }
                Output::Respond { id, result } => {
                    if let Some(key) = self.outstanding.remove(&id) {
                        match result {
                            Ok(Response::Applied(Applied::Put(_))) => {
                                self.report.acked_puts += 1;
                                self.acked.insert(key.clone(), key);
                            }
                            Ok(other) => return Err(format!("unexpected response {other:?}")),
                            Err(_) => self.report.failed_puts += 1,
                        }
                    }
                }
                Output::Stopped { reason } => {
                    return Err(format!("member {} stopped: {reason}", i + 1));
                }
                Output::Persist {
                    number,
                    batch,
                    sync,
                } => {
                    let after = self.members[i].persists.back().map(|p| p.0).unwrap_or(0);
                    let due = (self.now_ms + self.rng.gen_range(0..4)).max(after);
                    self.members[i]
                        .persists
                        .push_back((due, number, batch, sync));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn client_put(&mut self) {
        // Clients mostly find the leader; sometimes they ask a follower (and get redirected).
        let i = match self.leader() {
            Some(l) if self.rng.gen_bool(0.9) => l,
            _ => self.rng.gen_range(0..self.members.len()),
        };
        let Some(core) = self.members[i].core.as_mut() else {
            return;
        };
        // Request ids encode the member so a crash can forget its requests.
        let id = self.next_request * 16 + i as u64;
        self.next_request += 1;
        let key = format!("k{:06}", self.next_key).into_bytes();
        self.next_key += 1;
        self.outstanding.insert(id, key.clone());
        core.handle_request(
            self.now_ms,
            id,
            Request::Put(PutRequest {
                key: key.clone(),
                value: key,
                lease: 0,
                prev_kv: false,
            }),
        );
    }

    /// One operation of the register workload on a shared key.
    fn client_register(&mut self) {
        use continuum_proto::meta::TxnRequest;
        use continuum_proto::meta::{compare, request_op, Compare, RangeRequest, RequestOp};
        let i = match self.leader() {
            Some(l) if self.rng.gen_bool(0.9) => l,
            _ => self.rng.gen_range(0..self.members.len()),
        };
        if self.members[i].core.is_none() {
            return;
        }
        let key = format!("r{}", self.rng.gen_range(0..self.cfg.registers)).into_bytes();
        self.next_value += 1;
        let value = format!("v{}", self.next_value).into_bytes();
        let (call, request) = match self.rng.gen_range(0..10) {
            0..=3 => (
                KvCall::Put(value.clone()),
                Request::Put(PutRequest {
                    key: key.clone(),
                    value,
                    lease: 0,
                    prev_kv: false,
                }),
            ),
            4..=6 => (
                KvCall::Get,
                Request::Range(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                }),
            ),
            _ => {
                // Expect a value this key really had (so swaps sometimes succeed), or absence.
                let seen: Vec<Vec<u8>> = self
                    .report
                    .history
                    .iter()
                    .rev()
                    .filter(|r| r.key == key)
                    .filter_map(|r| match &r.call {
                        KvCall::Put(v) | KvCall::Cas { new: v, .. } => Some(v.clone()),
                        KvCall::Get => None,
                    })
                    .take(3)
                    .collect();
                let expect = if seen.is_empty() {
                    None
                } else {
                    Some(seen[self.rng.gen_range(0..seen.len())].clone())
                };
                let compare = match &expect {
                    Some(v) => Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Value as i32,
                        key: key.clone(),
                        target_union: Some(compare::TargetUnion::Value(v.clone())),
                    },
                    // Absent: its version is 0.
                    None => Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Version as i32,
                        key: key.clone(),
                        target_union: Some(compare::TargetUnion::Version(0)),
                    },
                };
                let put = RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        lease: 0,
                        prev_kv: false,
                    })),
                };
                (
                    KvCall::Cas { expect, new: value },
                    Request::Txn(TxnRequest {
                        compare: vec![compare],
                        success: vec![put],
                        failure: vec![],
                    }),
                )
            }
        };
        let id = self.next_request * 16 + i as u64;
        self.next_request += 1;
        self.register_ops.insert(id, self.report.history.len());
        self.report.history.push(KvRecord {
            key,
            call,
            invoke_ms: self.now_ms,
            complete_ms: None,
            result: None,
            refused: false,
        });
        let now = self.now_ms;
        if let Some(core) = self.members[i].core.as_mut() {
            core.handle_request(now, id, request);
        }
    }

    fn fault(&mut self) -> Result<(), String> {
        let n = self.members.len();
        match self.rng.gen_range(0..4) {
            0 => {
                // Isolate one member (both directions) or cut one direction only.
                let a = self.rng.gen_range(1..=n as u64);
                let one_way = self.rng.gen_bool(0.3);
                for b in 1..=n as u64 {
                    if a != b {
                        self.cut.push((a, b));
                        if !one_way {
                            self.cut.push((b, a));
                        }
                    }
                }
                self.report.partitions += 1;
            }
            1 => self.cut.clear(),
            2 => {
                // Never crash a majority at once.
                let down = self.members.iter().filter(|m| m.core.is_none()).count();
                if down < (n - 1) / 2 {
                    let i = self.rng.gen_range(0..n);
                    self.crash(i);
                }
            }
            _ => {
                for i in 0..n {
                    if self.members[i].core.is_none() {
                        self.start(i)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Advances virtual time by one event.
    fn step(&mut self, faults: bool) -> Result<(), String> {
        let next_tick = self
            .members
            .iter()
            .map(|m| m.next_tick_ms)
            .min()
            .unwrap_or(u64::MAX);
        let next_flight = self
            .flights
            .iter()
            .map(|f| f.at_ms)
            .min()
            .unwrap_or(u64::MAX);
        let next_persist = self
            .members
            .iter()
            .filter_map(|m| m.persists.front().map(|p| p.0))
            .min()
            .unwrap_or(u64::MAX);
        self.now_ms = next_tick.min(next_flight).min(next_persist);
        if next_persist <= next_tick.min(next_flight) {
            let i = self
                .members
                .iter()
                .position(|m| m.persists.front().is_some_and(|p| p.0 == next_persist))
                .expect("a persist is due");
            let Some((_, number, batch, sync)) = self.members[i].persists.pop_front() else {
                return Ok(());
            };
            let sync = sync && !self.cfg.break_log_sync;
            let written = self.members[i].engine.write(batch, sync);
            if let Some(core) = self.members[i].core.as_mut() {
                match written {
                    Ok(()) => core.handle_persisted(number),
                    Err(e) => core.handle_persist_failed(e.to_string()),
                }
            }
            self.drain(i)?;
            return Ok(());
        }
        if next_flight <= next_tick {
            let pos = self
                .flights
                .iter()
                .enumerate()
                .min_by_key(|(_, f)| (f.at_ms, f.seq))
                .map(|(p, _)| p)
                .expect("a flight is due");
            let f = self.flights.swap_remove(pos);
            let i = (f.to - 1) as usize;
            if let Some(core) = self.members[i].core.as_mut() {
                core.handle_message(self.now_ms, f.msg);
                self.drain(i)?;
            }
            return Ok(());
        }
        let i = self
            .members
            .iter()
            .position(|m| m.next_tick_ms == next_tick)
            .expect("a tick is due");
        // Ticks jitter a little: this is where election randomness comes from.
        self.members[i].next_tick_ms += TICK_MS - 10 + self.rng.gen_range(0..20);
        if let Some(core) = self.members[i].core.as_mut() {
            core.handle_tick(self.now_ms);
        }
        if faults
            && self
                .rng
                .gen_range(0..self.cfg.fault_every_ms / TICK_MS * n_members(self))
                == 0
        {
            self.fault()?;
        }
        if self.clients {
            for _ in 0..self.rng.gen_range(0..4) {
                self.client_put();
            }
            if self.cfg.registers > 0 {
                for _ in 0..self.rng.gen_range(0..3) {
                    self.client_register();
                }
            }
        }
        for j in 0..self.members.len() {
            self.drain(j)?;
        }
        Ok(())
    }

    fn heal(&mut self) -> Result<(), String> {
        self.cut.clear();
        for i in 0..self.members.len() {
            if self.members[i].core.is_none() {
                self.start(i)?;
            }
        }
        Ok(())
    }

    fn leader(&self) -> Option<usize> {
        self.members
            .iter()
            .position(|m| m.core.as_ref().is_some_and(|c| c.is_leader()))
    }

    fn run(mut self) -> Result<SimReport, String> {
        while self.now_ms < self.cfg.fault_ms {
            self.step(true)?;
        }
        self.heal()?;
        let saved_drop = self.cfg.drop_probability;
        self.cfg.drop_probability = 0.0;
        // Liveness: a leader emerges and a fresh write commits.
        let deadline = self.now_ms + 30_000;
        let probe_key = b"probe".to_vec();
        let mut probe_id = None;
        while self.now_ms < deadline && !self.acked.contains_key(&probe_key) {
            if let (Some(l), None) = (self.leader(), probe_id) {
                let id = self.next_request * 16 + l as u64;
                self.next_request += 1;
                self.outstanding.insert(id, probe_key.clone());
                probe_id = Some(id);
                let now = self.now_ms;
                if let Some(core) = self.members[l].core.as_mut() {
                    core.handle_request(
                        now,
                        id,
                        Request::Put(PutRequest {
                            key: probe_key.clone(),
                            value: probe_key.clone(),
                            lease: 0,
                            prev_kv: false,
                        }),
                    );
                }
            }
            if probe_id.is_some_and(|id| !self.outstanding.contains_key(&id)) {
                probe_id = None;
            }
            self.step(false)?;
        }
        self.cfg.drop_probability = saved_drop;
        if !self.acked.contains_key(&probe_key) {
            return Err("liveness: no write committed within 30 s after healing".into());
        }
        // Convergence: everyone reaches the leader's applied index with identical state.
        self.clients = false;
        let deadline = self.now_ms + 30_000;
        loop {
            let indexes: Vec<u64> = self
                .members
                .iter()
                .filter_map(|m| m.core.as_ref().map(|c| c.applied_index()))
                .collect();
            let quiet =
                self.flights.is_empty() && self.members.iter().all(|m| m.persists.is_empty());
            if indexes.iter().all(|i| *i == indexes[0]) && quiet {
                break;
            }
            if self.now_ms > deadline {
                let progress = self
                    .leader()
                    .and_then(|l| self.members[l].core.as_ref())
                    .map(|c| c.progress_summary())
                    .unwrap_or_default();
                return Err(format!(
                    "convergence: applied indexes still differ: {indexes:?}; leader's view: {progress}"
                ));
            }
            self.step(false)?;
        }
        let dumps: Vec<_> = self
            .members
            .iter()
            .filter_map(|m| m.core.as_ref().map(|c| c.dump_state()))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if dumps.iter().any(|d| d != &dumps[0]) {
            return Err(
                "convergence: members applied the same index but hold different states".into(),
            );
        }
        // Durability: every acknowledged put is there.
        let core = self.members[0]
            .core
            .as_ref()
            .expect("all members run after healing");
        for (key, value) in &self.acked {
            let k = crate::keys::kv(key);
            let found = dumps[0].iter().find(|(dk, _)| dk == &k);
            let stored: Option<crate::pb::StoredKv> =
                found.and_then(|(_, v)| prost::Message::decode(v.as_slice()).ok());
            if stored.map(|s| s.value) != Some(value.clone()) {
                return Err(format!(
                    "durability: acknowledged put of {:?} is missing",
                    String::from_utf8_lossy(key)
                ));
            }
        }
        self.report.applied_index = core.applied_index();
        self.report.snapshots_applied = self
            .members
            .iter()
            .filter_map(|m| m.core.as_ref().map(|c| c.stats.snapshots_applied))
            .sum();
        Ok(self.report)
    }
}

fn n_members(sim: &Sim) -> u64 {
    sim.members.len() as u64
}

/// Runs one seeded simulation; `Err` describes the violated property (the seed reproduces it).
pub fn run(seed: u64, cfg: SimConfig) -> Result<SimReport, String> {
    Sim::new(seed, cfg)?
        .run()
        .map_err(|e| format!("seed {seed}: {e}"))
}
