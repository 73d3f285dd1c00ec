//! meta's error types.

use thiserror::Error;

/// A storage failure.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("no space left on the meta data disk: {reason}")]
    NoSpace { reason: String },
    #[error("storage engine error: {reason}")]
    Engine { reason: String },
    #[error("corrupt record at key {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
}

/// Why a meta request failed. Each maps to one gRPC status (see `server::status_of`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MetaError {
    #[error("not the leader (leader is member {leader_id:?})")]
    NotLeader { leader_id: Option<u64> },
    #[error("leadership changed while the request was in flight; its outcome is unknown")]
    LeaderChanged,
    #[error("the request timed out after {timeout_ms} ms (no quorum?)")]
    Timeout { timeout_ms: u64 },
    #[error("the member is overloaded ({pending} requests queued)")]
    Busy { pending: usize },
    #[error("invalid request: {reason}")]
    InvalidArgument { reason: String },
    #[error("lease {id} not found")]
    LeaseNotFound { id: u64 },
    #[error("lease {id} already exists")]
    LeaseExists { id: u64 },
    #[error("revision {requested} has been compacted; history starts at {compact_revision}")]
    Compacted {
        requested: u64,
        compact_revision: u64,
    },
    #[error("member {id} not found")]
    MemberNotFound { id: u64 },
    #[error("member {id} already exists")]
    MemberExists { id: u64 },
    #[error("learner {id} has not caught up (matched {matched} of {last})")]
    LearnerNotReady { id: u64, matched: u64, last: u64 },
    #[error("membership change rejected: {reason}")]
    MembershipRejected { reason: String },
    #[error("database space exceeded: {reason}")]
    NoSpace { reason: String },
    #[error("the member is stopped; the request was not applied")]
    Stopped,
    #[error("the member stopped while the request was in flight; its outcome is unknown")]
    Interrupted,
    #[error(transparent)]
    Store(#[from] StoreError),
}
