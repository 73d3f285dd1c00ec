//! The block server's parsers of untrusted bytes on arbitrary and mutated inputs: nothing
//! panics. The same entry points back the cargo-fuzz targets in `fuzz/`.

use bytes::Bytes;
use continuum_blockstore::fuzzing;
use continuum_blockstore::protocol::{self, pb};
use continuum_blockstore::store::{ObjectKey, Version, WriteMode, WriteReq};
use continuum_blockstore::wire::{FrameRepr, Kind};
use proptest::prelude::*;
use prost::Message as _;

/// A valid write request frame, to be mutated.
fn write_frame(offset: u32, len: u32, mode: u8, payload: Vec<u8>) -> Vec<u8> {
    write_frame_mutated(offset, len, mode, payload, &[])
}

/// The same with bytes of the prost header flipped before framing (so the frame is valid and
/// the mutation reaches the request parser).
fn write_frame_mutated(
    offset: u32,
    len: u32,
    mode: u8,
    payload: Vec<u8>,
    flips: &[(usize, u8)],
) -> Vec<u8> {
    let w = WriteReq {
        object: ObjectKey {
            volume: 1,
            stripe: 0,
            shard: 0,
        },
        epoch: 1,
        version: Version::new(1, 1),
        base: Version::NONE,
        mode: match mode % 4 {
            0 => WriteMode::Data,
            1 => WriteMode::Xor,
            2 => WriteMode::Zero,
            _ => WriteMode::Install,
        },
        offset,
        length: len,
        crcs: continuum_blockstore::checksum::compute(&payload),
        fua: false,
        write_set: 1,
        data_base: vec![],
        data_after: vec![],
        return_old: true,
    };
    let mut header = pb::Request {
        op: Some(pb::request::Op::Write(protocol::write_to_pb(&w))),
    }
    .encode_to_vec();
    let n = header.len();
    for &(at, x) in flips {
        header[at % n] ^= x;
    }
    let f = FrameRepr {
        kind: Kind::Request,
        request_id: 1,
        header: header.into(),
        payload: Bytes::from(payload),
    };
    let mut out = vec![0u8; f.buffer_len()];
    f.emit(&mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_stream_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzzing::block_requests(&data);
    }

    #[test]
    fn mutated_write_requests_never_panic(
        offset in 0u32..(1 << 23), len in 0u32..(1 << 16), mode in any::<u8>(),
        payload in proptest::collection::vec(any::<u8>(), 0..9000),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        fuzzing::block_requests(&write_frame_mutated(offset, len, mode, payload, &flips));
    }

    #[test]
    fn arbitrary_request_headers_never_panic(
        header in proptest::collection::vec(any::<u8>(), 0..512),
        payload in proptest::collection::vec(any::<u8>(), 0..8192),
    ) {
        fuzzing::block_request_header(&header, &payload);
    }

    #[test]
    fn arbitrary_on_disk_records_never_panic(record in proptest::collection::vec(any::<u8>(), 0..1024)) {
        fuzzing::store_record(&record);
    }
}

#[test]
fn well_formed_requests_reach_the_store() {
    // Aligned 4 KiB write: accepted (the entry point really executes requests).
    fuzzing::block_requests(&write_frame(0, 4096, 0, vec![7u8; 4096]));
    // A record that decodes: a tiny valid one.
    fuzzing::store_record(&[]);
}
