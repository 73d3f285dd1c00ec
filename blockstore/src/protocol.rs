//! The block protocol's messages (`proto/block.proto`) and their mapping to the store's types.
//!
//! A request is one frame (see [`crate::wire`]) whose header is a prost [`pb::Request`] and
//! whose payload is shard bytes; the response frame carries the same request id, a prost
//! [`pb::Response`] and, for reads (and writes with `return_old`), the bytes. Every status is
//! explicit ([`pb::Status`]): stale epoch, version mismatch, checksum mismatch, no space, ...

pub use continuum_proto::block as pb;

use crate::store::{ObjectInfo, ObjectKey, StoreError, Version, WriteMode, WriteReq};

pub fn version_to_pb(v: Version) -> pb::Version {
    pb::Version {
        epoch: v.epoch,
        seq: v.seq,
    }
}

pub fn version_from_pb(v: Option<&pb::Version>) -> Version {
    v.map(|v| Version::new(v.epoch, v.seq)).unwrap_or_default()
}

pub fn object_to_pb(o: ObjectKey) -> pb::ObjectId {
    pb::ObjectId {
        volume: o.volume,
        stripe: o.stripe,
        shard: o.shard,
    }
}

pub fn object_from_pb(o: Option<&pb::ObjectId>) -> Option<ObjectKey> {
    o.map(|o| ObjectKey {
        volume: o.volume,
        stripe: o.stripe,
        shard: o.shard,
    })
}

pub fn data_versions_to_pb(d: &[(u32, Version)]) -> Vec<pb::DataVersion> {
    d.iter()
        .map(|&(shard, v)| pb::DataVersion {
            shard,
            version: Some(version_to_pb(v)),
        })
        .collect()
}

pub fn data_versions_from_pb(d: &[pb::DataVersion]) -> Vec<(u32, Version)> {
    d.iter()
        .map(|d| (d.shard, version_from_pb(d.version.as_ref())))
        .collect()
}

/// An opened writer's undecided stripes (stripe, epoch they are judged against).
pub fn undecided_to_pb(list: &[(u64, u64)]) -> Vec<pb::UndecidedStripe> {
    list.iter()
        .map(|&(stripe, below)| pb::UndecidedStripe { stripe, below })
        .collect()
}

pub fn undecided_from_pb(list: &[pb::UndecidedStripe]) -> Vec<(u64, u64)> {
    list.iter().map(|u| (u.stripe, u.below)).collect()
}

pub fn object_versions_from_pb(list: &[pb::ObjectVersion]) -> Option<Vec<(ObjectKey, Version)>> {
    list.iter()
        .map(|ov| {
            Some((
                object_from_pb(ov.object.as_ref())?,
                version_from_pb(ov.version.as_ref()),
            ))
        })
        .collect()
}

pub fn object_versions_to_pb(list: &[(ObjectKey, Version)]) -> Vec<pb::ObjectVersion> {
    list.iter()
        .map(|&(o, v)| pb::ObjectVersion {
            object: Some(object_to_pb(o)),
            version: Some(version_to_pb(v)),
        })
        .collect()
}

pub fn write_to_pb(w: &WriteReq) -> pb::WriteShard {
    pb::WriteShard {
        object: Some(object_to_pb(w.object)),
        epoch: w.epoch,
        version: Some(version_to_pb(w.version)),
        base: Some(version_to_pb(w.base)),
        mode: match w.mode {
            WriteMode::Data => pb::WriteMode::Data,
            WriteMode::Xor => pb::WriteMode::Xor,
            WriteMode::Zero => pb::WriteMode::Zero,
            WriteMode::Install => pb::WriteMode::Install,
        } as i32,
        offset: w.offset,
        length: w.length,
        crcs: w.crcs.clone(),
        fua: w.fua,
        write_set: w.write_set,
        data_base: data_versions_to_pb(&w.data_base),
        data_after: data_versions_to_pb(&w.data_after),
        return_old: w.return_old,
        stabilize: Vec::new(),
    }
}

/// The store request of a protocol write, or why it is malformed.
pub fn write_from_pb(w: &pb::WriteShard) -> Result<WriteReq, &'static str> {
    let object = object_from_pb(w.object.as_ref()).ok_or("write without an object")?;
    let mode = match pb::WriteMode::from_i32(w.mode) {
        Some(pb::WriteMode::Data) => WriteMode::Data,
        Some(pb::WriteMode::Xor) => WriteMode::Xor,
        Some(pb::WriteMode::Zero) => WriteMode::Zero,
        Some(pb::WriteMode::Install) => WriteMode::Install,
        _ => return Err("unknown write mode"),
    };
    Ok(WriteReq {
        object,
        epoch: w.epoch,
        version: version_from_pb(w.version.as_ref()),
        base: version_from_pb(w.base.as_ref()),
        mode,
        offset: w.offset,
        length: w.length,
        crcs: w.crcs.clone(),
        fua: w.fua,
        write_set: w.write_set,
        data_base: data_versions_from_pb(&w.data_base),
        data_after: data_versions_from_pb(&w.data_after),
        return_old: w.return_old,
    })
}

pub fn info_to_pb(i: &ObjectInfo) -> pb::ObjectInfo {
    pb::ObjectInfo {
        object: Some(object_to_pb(i.object)),
        version: Some(version_to_pb(i.version)),
        unstable: i
            .unstable
            .iter()
            .map(|u| pb::Undo {
                version: Some(version_to_pb(u.version)),
                previous: Some(version_to_pb(u.previous)),
                write_set: u.write_set,
            })
            .collect(),
        data_versions: data_versions_to_pb(&i.data_versions),
        length: i.length,
    }
}

pub fn info_from_pb(i: &pb::ObjectInfo) -> Option<ObjectInfo> {
    Some(ObjectInfo {
        object: object_from_pb(i.object.as_ref())?,
        version: version_from_pb(i.version.as_ref()),
        unstable: i
            .unstable
            .iter()
            .map(|u| crate::store::UndoInfo {
                version: version_from_pb(u.version.as_ref()),
                previous: version_from_pb(u.previous.as_ref()),
                write_set: u.write_set,
            })
            .collect(),
        data_versions: data_versions_from_pb(&i.data_versions),
        length: i.length,
    })
}

/// The response of a failed store call: its status, message and (for version conflicts) the
/// object's current version.
pub fn error_response(e: &StoreError) -> pb::Response {
    let (status, current) = match e {
        StoreError::StaleEpoch { .. } => (pb::Status::StaleEpoch, None),
        StoreError::VersionMismatch { current, .. }
        | StoreError::VersionNotNewer { current, .. } => {
            (pb::Status::VersionMismatch, Some(*current))
        }
        StoreError::DataVersionMismatch { .. } => (pb::Status::VersionMismatch, None),
        StoreError::ChecksumMismatch { .. } => (pb::Status::ChecksumMismatch, None),
        StoreError::BadPayload { .. } => (pb::Status::BadPayload, None),
        StoreError::NoSpace { .. } => (pb::Status::NoSpace, None),
        StoreError::TooManyUnstable { .. } => (pb::Status::Busy, None),
        StoreError::Invalid { .. } => (pb::Status::Invalid, None),
        StoreError::Io { .. }
        | StoreError::Index(_)
        | StoreError::CorruptRecord { .. }
        | StoreError::DoubleClaim { .. } => (pb::Status::IoError, None),
    };
    pb::Response {
        status: status as i32,
        message: e.to_string(),
        current: current.map(version_to_pb),
        result: None,
        incarnation: 0,
    }
}

pub fn invalid_response(reason: &str) -> pb::Response {
    pb::Response {
        status: pb::Status::Invalid as i32,
        message: reason.to_string(),
        current: None,
        result: None,
        incarnation: 0,
    }
}
