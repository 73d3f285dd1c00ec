//! Continuum's metadata service: a Raft-replicated key-value store in the style of etcd.
//!
//! - [`engine`]: the narrow storage trait; RocksDB and an in-memory twin with crash faults.
//! - [`log_store`]: the Raft log, hard state and snapshots on an engine (raft-rs `Storage`).
//! - [`state`]: the deterministic state machine (keys, revisions, history, leases, members).
//! - [`core`]: the sans-IO member (`RawNode` + Ready loop + request bookkeeping).
//! - [`server`]: the tokio/tonic driver, the Raft transport and the metrics endpoint.
//! - [`sim`]: the deterministic simulator of several cores over a faulty network.
//!
//! Architecture Invariant: only this crate touches meta's RocksDB; others use
//! `continuum-meta-client`.

pub mod core;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod log_store;
pub mod metrics;
pub mod server;
pub mod sim;
mod slog_bridge;
pub mod state;

pub use continuum_proto::meta_internal as pb;
pub use error::{MetaError, StoreError};
