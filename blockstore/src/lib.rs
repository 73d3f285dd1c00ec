//! Continuum's erasure-coded block store (issue 3, in progress; see docs/plans/issue-3.md).
//!
//! Built so far, each a pure, deterministic core with its own tests:
//! - [`checksum`]: CRC-32 per 4 KiB block, computed before writes and verified after reads;
//! - [`ec`]: the k+m Reed-Solomon codec (reed-solomon-erasure): encode, reconstruct from any k
//!   shards, and parity deltas for partial-stripe writes;
//! - [`wire`]: the block protocol's frame layer (fixed header, prost header bytes, payload),
//!   parsed without copies and without panics;
//! - [`layout`]: stripe maths — volume ranges to (stripe, shard, offset) segments, and per
//!   stripe the cheapest update (full-stripe encode, parity delta, or re-encode from the rest);
//! - [`placement`]: which block servers hold a stripe's shards — placement groups mapped by
//!   weighted rendezvous hashing, every shard in a different failure domain;
//!
//! Still to come: the block server (RocksDB index + io_uring data files), the volume client
//! (versions, epochs, reconciliation), repair and the scrubber.

pub mod alloc;
pub mod checksum;
pub mod client;
pub mod cluster;
mod conn;
pub mod device;
pub mod ec;
pub mod fuzzing;
pub mod index;
pub mod layout;
pub mod placement;
pub mod protocol;
pub mod reconcile;
pub mod record_cache;
pub mod server;
pub mod store;
pub mod volume;
pub mod wire;
