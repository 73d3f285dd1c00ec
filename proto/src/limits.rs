//! Named limits (TigerBeetle-style): every size, queue and count has a bound, named here so
//! operators and tests can find it.

/// Largest key accepted by meta.
pub const MAX_KEY_BYTES: usize = 4 * 1024;
/// Largest value accepted by meta (etcd's default request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Largest client request message (gRPC decode limit on the client API).
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024 / 2;
/// Largest Raft message (snapshots travel whole; the meta quota keeps them under this).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 512 * 1024 * 1024;
/// Most operations in one side (success or failure) of a transaction, and most compares.
pub const MAX_TXN_OPS: usize = 128;
/// Most keys one range returns (the response says `more` when there are more).
pub const MAX_RANGE_KEYS: usize = 10_000;
/// Most requests a meta member queues for its Raft loop before refusing with "busy".
pub const MAX_PENDING_REQUESTS: usize = 16 * 1024;
/// Most Raft messages queued towards one peer before they are dropped (Raft retransmits).
pub const MAX_PEER_QUEUE: usize = 8 * 1024;
/// Most events buffered for one watch stream; a slower consumer is cancelled and resumes.
pub const MAX_WATCH_BUFFER: usize = 4 * 1024;
/// Most concurrent watches on one member.
pub const MAX_WATCHES: usize = 64 * 1024;
/// Most members in a meta cluster.
pub const MAX_MEMBERS: usize = 9;
/// Longest lease TTL, in seconds.
pub const MAX_LEASE_TTL_SECONDS: u64 = 24 * 3600;
