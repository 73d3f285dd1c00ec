//! Entry points for fuzzing the block server's parsers of untrusted bytes (DESIGN.md
//! invariant 8): the cargo-fuzz targets in `fuzz/` call them, and `tests/fuzz_props.rs` runs
//! them as property tests in CI. Each must return normally on any input (errors are values).

use bytes::{Bytes, BytesMut};

use crate::device::MemDevice;
use crate::index::{Index, MemIndex};
use crate::store::{ObjectKey, Store};
use crate::wire::{FrameDecoder, Kind};

fn store() -> Store<MemDevice, MemIndex> {
    Store::open(MemDevice::new(4 << 20), MemIndex::default()).expect("empty store opens")
}

/// Bytes from the network: cut into frames, each request run against an in-memory store as the
/// server would (parse, validate, execute, answer).
pub fn block_requests(data: &[u8]) {
    let s = store();
    let mut buf = BytesMut::from(data);
    let mut dec = FrameDecoder;
    while let Ok(Some(frame)) = dec.decode(&mut buf) {
        if frame.kind == Kind::Request {
            let _ = futures::executor::block_on(crate::server::handle(
                &s,
                1,
                frame.header,
                frame.payload,
            ));
        }
    }
}

/// A prost request header with an arbitrary payload, without framing (reaches the handlers
/// with well-formed headers far more often than raw bytes do).
pub fn block_request_header(header: &[u8], payload: &[u8]) {
    let s = store();
    let _ = futures::executor::block_on(crate::server::handle(
        &s,
        1,
        Bytes::copy_from_slice(header),
        Bytes::copy_from_slice(payload),
    ));
}

/// Bytes on disk: an arbitrary object record in the index must give errors, never a panic,
/// when the store opens, reads, lists, stats, writes, stabilizes or rolls back that object.
pub fn store_record(record: &[u8]) {
    let idx = MemIndex::default();
    let object = ObjectKey {
        volume: 1,
        stripe: 2,
        shard: 0,
    };
    let mut key = vec![b'o'];
    key.extend_from_slice(&1u64.to_be_bytes());
    key.extend_from_slice(&2u64.to_be_bytes());
    key.extend_from_slice(&0u32.to_be_bytes());
    let _ = idx.write(vec![(key, Some(record.to_vec()))], true);
    let Ok(s) = Store::open(MemDevice::new(1 << 20), idx) else {
        return;
    };
    let _ = futures::executor::block_on(s.read(object, 0, 8192));
    let _ = s.list(1, None, 10, false);
    let _ = s.stat(&[object]);
    let v = crate::store::Version::new(1, 1);
    let _ = futures::executor::block_on(s.stabilize(1, &[(object, v)]));
    let _ = futures::executor::block_on(s.flush());
    let _ = futures::executor::block_on(s.rollback(1, &[(object, crate::store::Version::NONE)]));
}
