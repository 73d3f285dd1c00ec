//! Continuum's shared vocabulary: identifier newtypes, named limits, the meta service's wire
//! protocol (gRPC via tonic + prost) and the fabric's typed records with their key layout.
//!
//! Every service depends on this crate and on client crates only, never on another service's
//! internals (see ARCHITECTURE.md, checked by `cli/tests/dependency_direction.rs`).

pub mod ids;
pub mod limits;
pub mod records;

/// Generated code, nested like the protobuf packages so cross-package references resolve.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod continuum {
        pub mod meta {
            pub mod v1 {
                tonic::include_proto!("continuum.meta.v1");
            }
            pub mod internal {
                tonic::include_proto!("continuum.meta.internal");
            }
        }
        pub mod block {
            pub mod v1 {
                tonic::include_proto!("continuum.block.v1");
            }
        }
        pub mod records {
            pub mod v1 {
                tonic::include_proto!("continuum.records.v1");
            }
        }
    }
}

/// The meta service's client API and Raft transport (from `proto/meta.proto`).
pub use pb::continuum::meta::v1 as meta;

/// meta's private formats (Raft entry payloads, state machine records). Only `continuum-meta`
/// may use these: they are here only because they embed the client API's messages.
#[doc(hidden)]
pub use pb::continuum::meta::internal as meta_internal;

/// The block protocol's messages (from `proto/block.proto`): frame headers between volume
/// clients and block servers.
pub use pb::continuum::block::v1 as block;

/// Generated record messages (from `proto/records.proto`); [`records`] adds their keys.
pub use pb::continuum::records::v1 as records_pb;

pub use ids::*;
