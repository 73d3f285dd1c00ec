//! The single key space meta keeps in its engine. One leading byte per table; integers are
//! big-endian so keys sort numerically.
//!
//! | prefix | table | value |
//! |---|---|---|
//! | `0x01 'h'` | Raft hard state | eraftpb.HardState |
//! | `0x01 't'` | log truncation point | TruncatedState |
//! | `0x02 idx` | Raft log entry | eraftpb.Entry |
//! | `0x10` | applied state | AppliedState |
//! | `0x11 key` | latest key version | StoredKv |
//! | `0x12 rev` | watch history | HistoryRecord |
//! | `0x13 id` | lease | LeaseRecord |
//! | `0x14 id key` | lease → key index | empty |
//! | `0x15 id` | member | Member |
//!
//! Everything in `[0x10, 0x20)` is the state machine and travels in snapshots.

pub const HARD_STATE: &[u8] = &[0x01, b'h'];
pub const TRUNCATED: &[u8] = &[0x01, b't'];
pub const LOG: u8 = 0x02;
pub const APPLIED: &[u8] = &[0x10];
pub const KV: u8 = 0x11;
pub const HISTORY: u8 = 0x12;
pub const LEASE: u8 = 0x13;
pub const LEASE_KEY: u8 = 0x14;
pub const MEMBER: u8 = 0x15;
pub const SM_START: &[u8] = &[0x10];
pub const SM_END: &[u8] = &[0x20];

pub fn log(index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(LOG);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub fn kv(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(KV);
    k.extend_from_slice(key);
    k
}

/// Engine range for a user range (etcd semantics, see meta.proto).
pub fn kv_range(key: &[u8], range_end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let start = kv(key);
    let end = if range_end.is_empty() {
        let mut e = start.clone();
        e.push(0);
        e
    } else if range_end == [0] {
        vec![KV + 1]
    } else {
        kv(range_end)
    };
    (start, end)
}

pub fn history(revision: u64) -> Vec<u8> {
    numbered(HISTORY, revision)
}

pub fn lease(id: u64) -> Vec<u8> {
    numbered(LEASE, id)
}

pub fn lease_key(id: u64, key: &[u8]) -> Vec<u8> {
    let mut k = numbered(LEASE_KEY, id);
    k.extend_from_slice(key);
    k
}

pub fn member(id: u64) -> Vec<u8> {
    numbered(MEMBER, id)
}

pub fn numbered(table: u8, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(table);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The number after a table byte, if `key` is `table ‖ u64`.
pub fn number_of(key: &[u8]) -> Option<u64> {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_ranges_follow_etcd() {
        let (s, e) = kv_range(b"a", b"");
        assert!(s < e && kv(b"a") >= s && kv(b"a") < e && kv(b"a\0") >= e);
        let (s, e) = kv_range(b"a", b"b");
        assert!(kv(b"azzz") >= s && kv(b"azzz") < e && kv(b"b") >= e);
        let (_, e) = kv_range(b"", &[0]);
        assert!(kv(&[0xff, 0xff]) < e);
        assert_eq!(number_of(&log(77)), Some(77));
        assert!(log(255) < log(256));
    }
}
