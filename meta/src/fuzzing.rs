//! Entry points for fuzzing meta's parsers of untrusted bytes (DESIGN.md invariant 8). Each
//! takes arbitrary bytes and must return without panicking. Used by the cargo-fuzz targets in
//! `fuzz/` and by the property tests in `tests/fuzz_props.rs`, which run in CI.
//!
//! Trust boundary: Raft messages from peers are decoded here, but stepping a decoded message
//! into raft-rs is not fuzzed: raft-rs asserts on inconsistent messages, so the peer port must
//! only be reachable by members (see docs/meta.md).

use prost::Message as _;
use raft::eraftpb::{ConfState, Snapshot, SnapshotMetadata};

use crate::engine::MemEngine;
use crate::log_store::LogStore;
use crate::pb;
use crate::state::StateMachine;

fn fresh_sm() -> StateMachine<MemEngine> {
    StateMachine::open(MemEngine::new(), Some((ConfState::default(), vec![])))
        .expect("an in-memory state machine opens")
}

/// Decodes `data` as a sequence of length-prefixed Raft entry payloads and applies each that
/// decodes to a state machine, as a member would after commit.
pub fn apply_entries(data: &[u8]) {
    let mut sm = fresh_sm();
    let mut rest = data;
    let mut index = 0;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        if let Ok(cmd) = pb::Command::decode(chunk) {
            if let Some(op) = cmd.op {
                index += 1;
                // Deterministic errors are answers; only a storage error may end the run.
                if sm.apply_command(index, 1, &op).is_err() {
                    return;
                }
            }
        }
    }
}

/// Installs `data` as a snapshot received from a leader.
pub fn install_snapshot(data: &[u8]) {
    let Ok(mut store) = LogStore::open(MemEngine::new(), Some((ConfState::default(), vec![])))
    else {
        return;
    };
    let snap = Snapshot {
        data: data.to_vec(),
        metadata: Some(SnapshotMetadata {
            conf_state: Some(ConfState::default()),
            index: 5,
            term: 1,
        }),
    };
    let _ = store.apply_snapshot(&snap);
}

/// Decodes a Raft envelope and the message inside, as the transport does.
pub fn raft_envelope(data: &[u8]) {
    if let Ok(env) = continuum_proto::meta::RaftEnvelope::decode(data) {
        let _ = raft::eraftpb::Message::decode(env.message.as_slice());
    }
}
