//! The NBD parsers of untrusted bytes on arbitrary and mutated inputs: nothing panics. The same
//! entry points back the cargo-fuzz targets `nbd_handshake` and `nbd_transmission` in `fuzz/`;
//! `seeds()` writes their seed corpora.

use bytes::{BufMut, BytesMut};
use continuum_nbd::fuzzing;
use continuum_nbd::wire::{self, OptionHeader, RequestHeader};
use proptest::prelude::*;

fn option(out: &mut BytesMut, option: u32, data: &[u8]) {
    OptionHeader {
        option,
        length: data.len() as u32,
    }
    .emit(out);
    out.put_slice(data);
}

/// A full, valid client negotiation: flags, STARTTLS, structured replies, meta context, GO.
fn valid_handshake() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(1); // fuzzing::handshake: TLS optional, small pieces
    b.put_u32(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
    option(&mut b, wire::OPT_LIST, &[]);
    option(&mut b, wire::OPT_STARTTLS, &[]);
    option(&mut b, wire::OPT_STRUCTURED_REPLY, &[]);
    let mut meta = BytesMut::new();
    meta.put_u32(4);
    meta.put_slice(b"disk");
    meta.put_u32(1);
    meta.put_u32(15);
    meta.put_slice(b"base:allocation");
    option(&mut b, wire::OPT_LIST_META_CONTEXT, &meta);
    option(&mut b, wire::OPT_SET_META_CONTEXT, &meta);
    let mut go = BytesMut::new();
    go.put_u32(4);
    go.put_slice(b"disk");
    go.put_u16(2);
    go.put_u16(wire::INFO_NAME);
    go.put_u16(wire::INFO_BLOCK_SIZE);
    option(&mut b, wire::OPT_INFO, &go);
    option(&mut b, wire::OPT_GO, &go);
    b.to_vec()
}

/// A stream of valid requests of every kind.
fn valid_requests() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(0xef); // writable, structured, base:allocation, fast zero, 32 MiB export
    let mut req = |command, flags, offset, length: u32, payload: bool| {
        RequestHeader {
            flags,
            command,
            cookie: offset ^ 0x55,
            offset,
            length,
        }
        .emit(&mut b);
        if payload {
            b.put_bytes(0xab, length as usize);
        }
    };
    req(wire::CMD_WRITE, wire::CMD_FLAG_FUA, 4096, 512, true);
    req(wire::CMD_READ, wire::CMD_FLAG_DF, 0, 8192, false);
    req(
        wire::CMD_WRITE_ZEROES,
        wire::CMD_FLAG_FAST_ZERO,
        0,
        65536,
        false,
    );
    req(wire::CMD_TRIM, 0, 65536, 4096, false);
    req(wire::CMD_CACHE, 0, 0, 4096, false);
    req(
        wire::CMD_BLOCK_STATUS,
        wire::CMD_FLAG_REQ_ONE,
        0,
        1 << 20,
        false,
    );
    req(wire::CMD_FLUSH, 0, 0, 0, false);
    req(wire::CMD_DISC, 0, 0, 0, false);
    b.to_vec()
}

#[test]
fn valid_inputs_reach_the_end() {
    // The seeds are what the mutations start from: they must get all the way through.
    assert!(
        fuzzing::handshake(&valid_handshake()),
        "negotiation reaches GO"
    );
    assert_eq!(
        fuzzing::transmission(&valid_requests()),
        7,
        "every request but DISC accepted"
    );
}

/// Writes the seed corpora of the cargo-fuzz targets (run once by hand:
/// `cargo test -p continuum-nbd --test fuzz_props seeds -- --ignored`).
#[test]
#[ignore]
fn seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, data) in [
        ("nbd_handshake", valid_handshake()),
        ("nbd_transmission", valid_requests()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("valid"), data).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data: Vec<u8>) {
        fuzzing::handshake(&data);
        fuzzing::transmission(&data);
    }

    #[test]
    fn mutated_handshakes_never_panic(flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..8), cut in 0usize..400) {
        let mut data = valid_handshake();
        for (at, b) in flips {
            let n = data.len();
            data[at % n] ^= b;
        }
        data.truncate(cut.max(1).min(data.len()));
        fuzzing::handshake(&data);
    }

    #[test]
    fn mutated_requests_never_panic(flips in proptest::collection::vec((0usize..1200, any::<u8>()), 1..8), first: u8) {
        let mut data = valid_requests();
        data[0] = first;
        for (at, b) in flips {
            let n = data.len();
            data[at % n] ^= b;
        }
        fuzzing::transmission(&data);
    }
}
