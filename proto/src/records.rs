//! Key layout of the fabric's typed records in meta.
//!
//! Every record lives at `/continuum/v1/<kind>/<name>`; the `v1` is the key-layout version (the
//! record *schema* version is each record's `schema_version` field, see `records.proto`). Later
//! issues only add fields to the messages, never move keys.

use crate::records_pb;

/// Current schema version written by this build for every record kind.
pub const SCHEMA_VERSION: u32 = 1;

/// Root prefix of all typed records.
pub const ROOT: &str = "/continuum/v1/";

/// A record kind stored in meta: a prost message with a kind name and a unique name per record.
pub trait Record: prost::Message + Default + Clone {
    /// Path segment of this kind (`sites`, `nodes`, ...).
    const KIND: &'static str;
    /// The record's unique name within its kind.
    fn name(&self) -> String;
    /// Stamps the schema version this build writes.
    fn set_schema_version(&mut self, version: u32);
    /// The schema version the record was written with.
    fn schema_version(&self) -> u32;
}

/// Prefix of every record of kind `R`.
pub fn prefix<R: Record>() -> String {
    format!("{ROOT}{}/", R::KIND)
}

/// Key of the record of kind `R` named `name`.
pub fn key<R: Record>(name: &str) -> String {
    format!("{}{name}", prefix::<R>())
}

macro_rules! record {
    ($ty:ty, $kind:literal, |$r:ident| $name:expr) => {
        impl Record for $ty {
            const KIND: &'static str = $kind;
            fn name(&self) -> String {
                let $r = self;
                $name
            }
            fn set_schema_version(&mut self, version: u32) {
                self.schema_version = version;
            }
            fn schema_version(&self) -> u32 {
                self.schema_version
            }
        }
    };
}

record!(records_pb::Site, "sites", |r| r.name.clone());
// Nodes and volumes are named by number, zero-padded so that keys sort like the ids.
record!(records_pb::Node, "nodes", |r| format!("{:020}", r.id));
record!(records_pb::NodeAlive, "node-alive", |r| format!(
    "{:020}",
    r.id
));
record!(records_pb::Volume, "volumes", |r| r.name.clone());
record!(records_pb::VolumePass, "volume-passes", |r| r
    .volume
    .clone());
record!(records_pb::WriterLease, "writer-leases", |r| format!(
    "{:020}",
    r.volume_id
));
record!(records_pb::OverlayPeer, "overlay-peers", |r| r.name.clone());
record!(records_pb::Host, "hosts", |r| r.name.clone());
record!(records_pb::HostAlive, "host-alive", |r| r.name.clone());
record!(records_pb::Vm, "vms", |r| r.name.clone());
// One status per VM and host: during a live migration source and target report side by side;
// readers take the one of the host the spec names.
record!(records_pb::VmStatus, "vm-status", |r| format!(
    "{}/{}",
    r.name, r.host
));
record!(records_pb::Image, "images", |r| r.name.clone());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_versioned_and_sort_by_id() {
        let a = records_pb::Node {
            id: 9,
            ..Default::default()
        };
        let b = records_pb::Node {
            id: 10,
            ..Default::default()
        };
        assert_eq!(
            key::<records_pb::Node>(&a.name()),
            "/continuum/v1/nodes/00000000000000000009"
        );
        assert!(key::<records_pb::Node>(&a.name()) < key::<records_pb::Node>(&b.name()));
        assert!(key::<records_pb::Site>("x").starts_with(&prefix::<records_pb::Site>()));
    }
}
