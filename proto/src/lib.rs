//! Continuum's shared vocabulary: identifier newtypes, named limits, the meta service's wire
//! protocol (gRPC via tonic + prost) and the fabric's typed records with their key layout.
//!
//! Every service depends on this crate and on client crates only, never on another service's
//! internals (see ARCHITECTURE.md, checked by `cli/tests/dependency_direction.rs`).

pub mod ids;
pub mod limits;
pub mod records;

/// The meta service's client API and Raft transport (generated from `proto/meta.proto`).
#[allow(clippy::all, missing_docs)]
pub mod meta {
    tonic::include_proto!("continuum.meta.v1");
}

/// meta's private formats (Raft entry payloads, state machine records). Only `continuum-meta`
/// may use these: they are here only because they embed the client API's messages.
#[doc(hidden)]
#[allow(clippy::all, missing_docs)]
pub mod meta_internal {
    tonic::include_proto!("continuum.meta.internal");
}

/// Generated record messages (from `proto/records.proto`); [`records`] adds their keys.
#[allow(clippy::all, missing_docs)]
pub mod records_pb {
    tonic::include_proto!("continuum.records.v1");
}

pub use ids::*;
