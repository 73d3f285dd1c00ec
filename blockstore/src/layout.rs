//! Stripe maths: how a volume's byte range maps onto stripes and shards, and how each
//! stripe of a write is best updated.
//!
//! A volume is a sequence of stripes. Each stripe holds `k × unit` bytes of data: data shard
//! `i` of stripe `s` holds volume bytes `[s·k·unit + i·unit, s·k·unit + (i+1)·unit)`; the `m`
//! parity shards are computed over the `k` data shards. Each shard of a stripe is one object
//! on one block server (see `placement`).

use std::ops::Range;

use crate::checksum::BLOCK_BYTES;
use crate::ec::Profile;

/// Largest shard unit (bytes of one shard in one stripe).
pub const MAX_UNIT_BYTES: u32 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "shard unit {unit} must be a positive multiple of {BLOCK_BYTES} up to {MAX_UNIT_BYTES}"
    )]
    BadUnit { unit: u32 },
}

/// One piece of an I/O that falls in one shard of one stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub stripe: u64,
    /// Data shard index (0..k).
    pub shard: usize,
    /// Offset within the shard's unit.
    pub shard_offset: u32,
    pub len: u32,
    /// Where the piece starts in the volume.
    pub volume_offset: u64,
}

/// How to bring a stripe's parity up to date for a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePlan {
    /// Every data shard is rewritten whole: encode parity from the new data, read nothing.
    FullStripe,
    /// Read the old bytes of the touched data and all parity, add the deltas (reads t + m).
    ParityDelta,
    /// Read the untouched data shards and re-encode (reads k − t).
    ReadOthers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub profile: Profile,
    pub unit: u32,
}

impl Layout {
    pub fn new(profile: Profile, unit: u32) -> Result<Self, LayoutError> {
        if unit == 0 || !unit.is_multiple_of(BLOCK_BYTES as u32) || unit > MAX_UNIT_BYTES {
            return Err(LayoutError::BadUnit { unit });
        }
        Ok(Layout { profile, unit })
    }

    /// Data bytes per stripe.
    pub fn stripe_bytes(&self) -> u64 {
        self.profile.data as u64 * u64::from(self.unit)
    }

    /// The pieces of `[offset, offset + len)`, in volume order.
    pub fn segments(&self, offset: u64, len: u64) -> Vec<Segment> {
        let unit = u64::from(self.unit);
        let mut out = Vec::new();
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let stripe = at / self.stripe_bytes();
            let in_stripe = at % self.stripe_bytes();
            let shard = (in_stripe / unit) as usize;
            let shard_offset = in_stripe % unit;
            let n = (unit - shard_offset).min(end - at);
            out.push(Segment {
                stripe,
                shard,
                shard_offset: shard_offset as u32,
                len: n as u32,
                volume_offset: at,
            });
            at += n;
        }
        out
    }

    /// The segments of an I/O grouped by stripe: (stripe, index range into `segments`).
    pub fn by_stripe(segments: &[Segment]) -> Vec<(u64, Range<usize>)> {
        let mut out: Vec<(u64, Range<usize>)> = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            match out.last_mut() {
                Some((stripe, r)) if *stripe == s.stripe => r.end = i + 1,
                _ => out.push((s.stripe, i..i + 1)),
            }
        }
        out
    }

    /// The cheapest way to update a stripe whose write covers `segments` (all of one stripe).
    pub fn plan(&self, segments: &[Segment]) -> WritePlan {
        let k = self.profile.data;
        let full = segments.len() == k
            && segments
                .iter()
                .all(|s| s.shard_offset == 0 && s.len == self.unit);
        if full {
            return WritePlan::FullStripe;
        }
        let touched = segments.len();
        if k - touched < touched + self.profile.parity {
            WritePlan::ReadOthers
        } else {
            WritePlan::ParityDelta
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> Layout {
        Layout::new(Profile::DEFAULT, 64 * 1024).unwrap()
    }

    proptest! {
        #[test]
        fn segments_tile_the_range_exactly(offset in 0u64..(1 << 32), len in 0u64..(3 << 20)) {
            let l = layout();
            let segs = l.segments(offset, len);
            let mut at = offset;
            for s in &segs {
                prop_assert_eq!(s.volume_offset, at);
                prop_assert!(s.len > 0 && s.shard_offset + s.len <= l.unit);
                prop_assert!(s.shard < l.profile.data);
                // The piece maps back to the same volume bytes.
                let back = s.stripe * l.stripe_bytes() + s.shard as u64 * u64::from(l.unit) + u64::from(s.shard_offset);
                prop_assert_eq!(back, s.volume_offset);
                at += u64::from(s.len);
            }
            prop_assert_eq!(at, offset + len);
        }
    }

    #[test]
    fn plans_follow_the_cost_of_reads() {
        let l = layout();
        let unit = u64::from(l.unit);
        // (offset, len, expected plan of the first stripe)
        let table = [
            (0, 4 * unit, WritePlan::FullStripe),
            (0, 4096, WritePlan::ParityDelta), // t=1: delta reads 3, others read 3 → delta
            (0, 2 * unit, WritePlan::ReadOthers), // t=2: delta reads 4, others read 2
            (0, 3 * unit, WritePlan::ReadOthers), // t=3: delta reads 5, others read 1
            (4096, 4 * unit - 4096, WritePlan::ReadOthers), // all shards touched, not whole
        ];
        for (offset, len, want) in table {
            let segs = l.segments(offset, len);
            let groups = Layout::by_stripe(&segs);
            assert_eq!(
                l.plan(&segs[groups[0].1.clone()]),
                want,
                "offset {offset} len {len}"
            );
        }
        let segs = l.segments(4 * unit - 4096, 8192);
        assert_eq!(Layout::by_stripe(&segs), vec![(0, 0..1), (1, 1..2)]);
    }

    #[test]
    fn bad_units_are_refused() {
        assert!(Layout::new(Profile::DEFAULT, 0).is_err());
        assert!(Layout::new(Profile::DEFAULT, 1000).is_err());
        assert!(Layout::new(Profile::DEFAULT, 8 * 1024 * 1024).is_err());
    }
}
