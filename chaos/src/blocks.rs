//! Stamped block contents and the block checker: what a read of a block device may return.
//!
//! Every 4 KiB block the workload writes is *stamped*: it carries its own block number, the
//! write's id and a fill derived from both, sealed by a CRC-32. A read therefore tells which
//! write (if any) it returned, and whether the bytes are whole.
//!
//! The rules (NBD's durability model, DESIGN.md invariant 3), per block:
//! - a write is *durable* once it is acknowledged with FUA, or once a FLUSH invoked after its
//!   acknowledgement, on the same connection, is acknowledged (a flush is checked against the
//!   connection it was sent on only: that is all NBD promises without CAN_MULTI_CONN);
//! - a read must return the bytes of a write that was issued to this block, whose id is at
//!   least the newest write durable *before the read was invoked*; a write still in flight, or
//!   one that failed, may or may not be what a read sees (its outcome is unknown);
//! - a block never written durably before the read may read as zeros;
//! - anything else (garbage, another block's data, an older write than a durable one) is a
//!   violation.
//!
//! Ids grow per block in the order writes are issued, so "newer" is "larger id". The checker
//! is fed events in the order they happened (one thread, or under one lock).
//!
//! A write the client gave up on while the server kept running (its connection broke, the
//! server was not restarted) is *floating*: the server may still apply it later, after newer
//! writes, so reading it where a newer durable write is expected is allowed and counted
//! (`floating_reads`). A write abandoned because its server process died is not floating: a
//! dead process applies nothing later, and what reached the disks is settled by the next
//! writer before it writes anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"CHAOSBLK";

/// What a 4 KiB block read back as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    Zero,
    Write {
        block: u64,
        id: u64,
    },
    /// Not zeros and not a whole stamped block.
    Garbage,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `out` (one block) with the stamp of write `id` to `block`.
pub fn stamp_into(out: &mut [u8], block: u64, id: u64) {
    assert_eq!(out.len(), BLOCK, "a stamp is one block");
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&id.to_le_bytes());
    let mut x = splitmix(block ^ id.rotate_left(32));
    for chunk in out[24..BLOCK - 4].chunks_mut(8) {
        x = splitmix(x);
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let crc = crc32fast::hash(&out[..BLOCK - 4]);
    out[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// `count` consecutive stamped blocks from `first`, all of write `id`.
pub fn stamped(first: u64, count: usize, id: u64) -> Vec<u8> {
    let mut v = vec![0u8; count * BLOCK];
    for (i, b) in v.chunks_mut(BLOCK).enumerate() {
        stamp_into(b, first + i as u64, id);
    }
    v
}

/// Decodes one block.
pub fn decode(block: &[u8]) -> Stamp {
    if block.len() != BLOCK {
        return Stamp::Garbage;
    }
    if block.iter().all(|b| *b == 0) {
        return Stamp::Zero;
    }
    if &block[0..8] != MAGIC {
        return Stamp::Garbage;
    }
    let crc = u32::from_le_bytes(block[BLOCK - 4..].try_into().expect("4 bytes"));
    if crc32fast::hash(&block[..BLOCK - 4]) != crc {
        return Stamp::Garbage;
    }
    let b = u64::from_le_bytes(block[8..16].try_into().expect("8 bytes"));
    let id = u64::from_le_bytes(block[16..24].try_into().expect("8 bytes"));
    // The fill must be the one this (block, id) makes: a CRC alone would accept a block
    // forged from pieces of two writes that happened to re-seal.
    let mut expect = vec![0u8; BLOCK];
    stamp_into(&mut expect, b, id);
    if expect != block {
        return Stamp::Garbage;
    }
    Stamp::Write { block: b, id }
}

/// A violation found by the checker.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub block: u64,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "block {}: {}", self.block, self.what)
    }
}

/// What a read must respect, captured when it is invoked.
#[derive(Clone, Copy, Debug)]
pub struct ReadTicket {
    block: u64,
    durable: u64,
}

/// Writes covered by one FLUSH (captured when it is invoked).
#[derive(Debug)]
pub struct FlushTicket {
    writes: Vec<(Vec<u64>, u64)>,
}

#[derive(Default)]
struct BlockState {
    /// Every write issued to the block.
    issued: BTreeSet<u64>,
    /// The newest durable write (0: none).
    durable: u64,
    /// Writes that may still land late (see the module doc).
    floating: BTreeSet<u64>,
}

/// The block checker (see the module doc).
#[derive(Default)]
pub struct BlockChecker {
    blocks: HashMap<u64, BlockState>,
    /// Per connection: acknowledged writes (blocks, id) not yet made durable by a flush.
    unflushed: HashMap<u64, Vec<(Vec<u64>, u64)>>,
    violations: Vec<Violation>,
    pub reads_checked: u64,
    pub writes_acked: u64,
    pub writes_durable: u64,
    pub zero_reads: u64,
    pub floating_reads: u64,
}

impl BlockChecker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A write of `id` to `blocks` is about to be sent.
    pub fn write_invoked(&mut self, blocks: &[u64], id: u64) {
        for b in blocks {
            let s = self.blocks.entry(*b).or_default();
            debug_assert!(
                s.issued.last().is_none_or(|last| *last < id),
                "ids grow per block"
            );
            s.issued.insert(id);
        }
    }

    /// The write was acknowledged on connection `conn` (with FUA or not).
    pub fn write_acked(&mut self, conn: u64, blocks: &[u64], id: u64, fua: bool) {
        self.writes_acked += 1;
        if fua {
            self.make_durable(blocks, id);
        } else {
            self.unflushed
                .entry(conn)
                .or_default()
                .push((blocks.to_vec(), id));
        }
    }

    /// The client gave up on write `id` while its server may still apply it (see the module
    /// doc).
    pub fn write_floating(&mut self, blocks: &[u64], id: u64) {
        for b in blocks {
            self.blocks.entry(*b).or_default().floating.insert(id);
        }
    }

    /// A FLUSH is about to be sent on `conn`: it covers the writes acknowledged there so far.
    pub fn flush_invoked(&mut self, conn: u64) -> FlushTicket {
        FlushTicket {
            writes: self.unflushed.remove(&conn).unwrap_or_default(),
        }
    }

    /// The FLUSH was acknowledged.
    pub fn flush_acked(&mut self, ticket: FlushTicket) {
        for (blocks, id) in ticket.writes {
            self.make_durable(&blocks, id);
        }
    }

    fn make_durable(&mut self, blocks: &[u64], id: u64) {
        self.writes_durable += 1;
        for b in blocks {
            let s = self.blocks.entry(*b).or_default();
            s.durable = s.durable.max(id);
        }
    }

    /// A read of `block` is about to be sent.
    pub fn read_invoked(&self, block: u64) -> ReadTicket {
        ReadTicket {
            block,
            durable: self.blocks.get(&block).map_or(0, |s| s.durable),
        }
    }

    /// The read returned `data` (one block); records a violation if it breaks the rules.
    pub fn read_completed(&mut self, ticket: ReadTicket, data: &[u8]) -> Result<(), Violation> {
        self.reads_checked += 1;
        let block = ticket.block;
        let verdict = match decode(data) {
            Stamp::Zero if ticket.durable == 0 => {
                self.zero_reads += 1;
                Ok(())
            }
            Stamp::Zero => Err(format!(
                "read zeros, but write {} was durable before the read",
                ticket.durable
            )),
            Stamp::Garbage => Err("read bytes that no write produced".to_string()),
            Stamp::Write { block: b, id } if b != block => {
                Err(format!("read write {id} of block {b} (misdirected)"))
            }
            Stamp::Write { id, .. } => {
                let state = self.blocks.get(&block);
                let issued = state.is_some_and(|s| s.issued.contains(&id));
                let floating = state.is_some_and(|s| s.floating.contains(&id));
                if !issued {
                    Err(format!("read write {id}, which was never issued to it"))
                } else if id < ticket.durable && floating {
                    self.floating_reads += 1;
                    Ok(())
                } else if id < ticket.durable {
                    Err(format!(
                        "read write {id}, older than write {} that was durable before the read \
                         (an acknowledged write was lost)",
                        ticket.durable
                    ))
                } else {
                    Ok(())
                }
            }
        };
        verdict.map_err(|what| {
            let v = Violation { block, what };
            self.violations.push(v.clone());
            v
        })
    }

    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Blocks with a durable write, with that write's id (for a final sweep).
    pub fn durable_blocks(&self) -> BTreeMap<u64, u64> {
        self.blocks
            .iter()
            .filter(|(_, s)| s.durable > 0)
            .map(|(b, s)| (*b, s.durable))
            .collect()
    }

    /// Every block ever written.
    pub fn written_blocks(&self) -> BTreeSet<u64> {
        self.blocks.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_decode_and_damage_is_garbage() {
        let mut b = stamped(7, 1, 42);
        assert_eq!(decode(&b), Stamp::Write { block: 7, id: 42 });
        assert_eq!(decode(&[0u8; BLOCK]), Stamp::Zero);
        b[100] ^= 1;
        assert_eq!(decode(&b), Stamp::Garbage);
        // Half of one write and half of another, resealed, is still garbage.
        let (x, y) = (stamped(7, 1, 1), stamped(7, 1, 2));
        let mut torn = [&x[..2048], &y[2048..]].concat();
        let crc = crc32fast::hash(&torn[..BLOCK - 4]);
        torn[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&torn), Stamp::Garbage);
    }

    #[test]
    fn durable_writes_must_be_seen_and_unknown_ones_may_be() {
        let mut c = BlockChecker::new();
        c.write_invoked(&[1], 1);
        c.write_acked(9, &[1], 1, false);
        // Not durable yet: zeros are allowed.
        let t = c.read_invoked(1);
        c.read_completed(t, &[0u8; BLOCK]).unwrap();
        let f = c.flush_invoked(9);
        c.flush_acked(f);
        let t = c.read_invoked(1);
        assert!(c.read_completed(t, &[0u8; BLOCK]).is_err());
        // A newer write in flight may or may not be seen.
        c.write_invoked(&[1], 2);
        let t = c.read_invoked(1);
        c.read_completed(t, &stamped(1, 1, 1)).unwrap();
        let t = c.read_invoked(1);
        c.read_completed(t, &stamped(1, 1, 2)).unwrap();
        // Once 2 is durable, 1 is a lost write.
        c.write_acked(9, &[1], 2, true);
        let t = c.read_invoked(1);
        assert!(c.read_completed(t, &stamped(1, 1, 1)).is_err());
        // Never-issued ids and other blocks' data are violations.
        let t = c.read_invoked(1);
        assert!(c.read_completed(t, &stamped(1, 1, 3)).is_err());
        let t = c.read_invoked(1);
        assert!(c.read_completed(t, &stamped(2, 1, 2)).is_err());
        assert_eq!(c.violations().len(), 4);
    }

    #[test]
    fn a_read_invoked_before_the_ack_may_miss_the_write() {
        let mut c = BlockChecker::new();
        c.write_invoked(&[5], 1);
        let t = c.read_invoked(5);
        c.write_acked(1, &[5], 1, true);
        c.read_completed(t, &[0u8; BLOCK]).unwrap();
    }

    #[test]
    fn a_floating_write_may_land_after_a_newer_durable_one() {
        let mut c = BlockChecker::new();
        c.write_invoked(&[4], 1);
        c.write_floating(&[4], 1);
        c.write_invoked(&[4], 2);
        c.write_acked(1, &[4], 2, true);
        let t = c.read_invoked(4);
        c.read_completed(t, &stamped(4, 1, 1)).unwrap();
        assert_eq!(c.floating_reads, 1);
        // An abandoned write that is not floating may not.
        c.write_invoked(&[4], 3);
        c.write_invoked(&[4], 4);
        c.write_acked(1, &[4], 4, true);
        let t = c.read_invoked(4);
        assert!(c.read_completed(t, &stamped(4, 1, 3)).is_err());
    }

    #[test]
    fn a_flush_covers_only_its_own_connection() {
        let mut c = BlockChecker::new();
        c.write_invoked(&[3], 1);
        c.write_acked(1, &[3], 1, false);
        let f = c.flush_invoked(2);
        c.flush_acked(f);
        let t = c.read_invoked(3);
        c.read_completed(t, &[0u8; BLOCK]).unwrap();
        assert!(c.violations().is_empty());
    }
}
