//! Property tests over meta's parsers of untrusted bytes: arbitrary and mutated inputs never
//! panic. The same entry points back the cargo-fuzz targets in `fuzz/` for longer runs.

use continuum_meta::fuzzing;
use continuum_meta::pb;
use continuum_proto::meta::{PutRequest, TxnRequest};
use proptest::prelude::*;
use prost::Message as _;

fn valid_command() -> impl Strategy<Value = Vec<u8>> {
    (any::<Vec<u8>>(), any::<Vec<u8>>(), any::<u64>()).prop_map(|(key, value, lease)| {
        pb::Command {
            request_id: 1,
            origin: 1,
            op: Some(pb::command::Op::Put(PutRequest {
                key,
                value,
                lease: lease % 4,
                prev_kv: true,
            })),
        }
        .encode_to_vec()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_entries_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzzing::apply_entries(&data);
    }

    #[test]
    fn valid_then_mutated_entries_never_panic(cmds in proptest::collection::vec(valid_command(), 1..20), flip in any::<(usize, u8)>()) {
        let mut data = Vec::new();
        for c in &cmds {
            data.push(c.len().min(255) as u8);
            data.extend_from_slice(&c[..c.len().min(255)]);
        }
        let i = flip.0 % data.len();
        data[i] ^= flip.1;
        fuzzing::apply_entries(&data);
    }

    #[test]
    fn arbitrary_snapshots_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzzing::install_snapshot(&data);
    }

    #[test]
    fn arbitrary_raft_envelopes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        fuzzing::raft_envelope(&data);
    }
}

#[test]
fn a_transaction_command_round_trips_through_the_fuzz_entry() {
    let cmd = pb::Command {
        request_id: 1,
        origin: 1,
        op: Some(pb::command::Op::Txn(TxnRequest::default())),
    }
    .encode_to_vec();
    let mut data = vec![cmd.len() as u8];
    data.extend_from_slice(&cmd);
    fuzzing::apply_entries(&data);
}
