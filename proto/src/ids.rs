//! Identifier newtypes shared by every crate. Plain `u64`s on the wire; distinct types in code,
//! so a member id is never passed where a lease id is expected.

use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }
    };
}

id_newtype!(
    /// A meta service member (a Raft peer id; never 0).
    MemberId
);
id_newtype!(
    /// A meta lease (TTL'd; keys attached to it vanish when it expires).
    LeaseId
);
id_newtype!(
    /// A store revision: advanced by one by every mutating request.
    Revision
);
id_newtype!(
    /// A fabric node (block server, gateway, ...).
    NodeId
);
id_newtype!(
    /// A volume.
    VolumeId
);
id_newtype!(
    /// A volume's writer epoch (bumped by each writer-lease acquisition).
    Epoch
);
