//! Free-space map of a block server's data file, in 4 KiB blocks.
//!
//! In memory only: rebuilt at start from the object records (every block an object or one of
//! its undo entries references is in use). Block 0 is never handed out (location 0 means
//! "zeros, no space" in an object record). Allocation is next-fit and prefers one contiguous
//! run, so a shard write is usually one device write.
//!
//! Freed blocks are not reusable at once: the store releases them only after the index change
//! that stopped referencing them is durable ([`Allocator::defer_free`], then
//! [`Allocator::take_deferred`] and [`Allocator::release`]), so a crash can never leave a
//! durable record pointing at a block that was reused.

/// A contiguous run of blocks: `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
}

#[derive(Debug)]
pub struct Allocator {
    words: Vec<u64>,
    blocks: u64,
    free: u64,
    cursor: u64,
    deferred: Vec<u64>,
}

impl Allocator {
    /// A map of `blocks` blocks, all free except block 0.
    pub fn new(blocks: u64) -> Self {
        let mut a = Allocator {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            free: blocks,
            cursor: 1,
            deferred: Vec::new(),
        };
        if blocks > 0 {
            a.mark_used(0);
        }
        a
    }

    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    pub fn total_blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks waiting for a durable index write before they are free.
    pub fn deferred_blocks(&self) -> usize {
        self.deferred.len()
    }

    fn is_used(&self, b: u64) -> bool {
        self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Marks `b` used (at start-up, for blocks referenced by records). Returns false if it was
    /// already used: two records claiming one block is a corrupted invariant.
    pub fn mark_used(&mut self, b: u64) -> bool {
        if b >= self.blocks || self.is_used(b) {
            return false;
        }
        self.words[(b / 64) as usize] |= 1 << (b % 64);
        self.free -= 1;
        true
    }

    fn mark_free(&mut self, b: u64) {
        assert!(
            b > 0 && b < self.blocks && self.is_used(b),
            "double free of block {b}"
        );
        self.words[(b / 64) as usize] &= !(1 << (b % 64));
        self.free += 1;
    }

    /// `n` blocks as few runs as possible, or `None` when fewer than `n` are free.
    pub fn allocate(&mut self, n: u64) -> Option<Vec<Run>> {
        if n > self.free {
            return None;
        }
        let mut runs = Vec::new();
        let mut need = n;
        // First try: one contiguous run from the cursor (wrapping once).
        if let Some(start) = self.find_run(n) {
            runs.push(Run { start, len: n });
            need = 0;
        }
        let mut b = self.cursor;
        let mut scanned = 0;
        while need > 0 && scanned < self.blocks {
            if b >= self.blocks {
                b = 1;
            }
            if !self.is_used(b) {
                match runs.last_mut() {
                    Some(r) if r.start + r.len == b => r.len += 1,
                    _ => runs.push(Run { start: b, len: 1 }),
                }
                need -= 1;
            }
            b += 1;
            scanned += 1;
        }
        assert_eq!(need, 0, "free count says {} blocks are free", self.free);
        for r in &runs {
            for b in r.start..r.start + r.len {
                let fresh = self.mark_used(b);
                assert!(fresh, "allocated block {b} twice");
            }
        }
        if let Some(r) = runs.last() {
            self.cursor = r.start + r.len;
        }
        Some(runs)
    }

    /// A free run of `n` blocks from the cursor on (then from the start), if one exists within
    /// a bounded scan.
    fn find_run(&self, n: u64) -> Option<u64> {
        const MAX_SCAN: u64 = 1 << 16;
        let mut start = self.cursor.max(1);
        let mut len = 0;
        let mut b = start;
        for _ in 0..MAX_SCAN.min(self.blocks) {
            if b >= self.blocks {
                b = 1;
                start = 1;
                len = 0;
            }
            if self.is_used(b) {
                len = 0;
                start = b + 1;
            } else {
                len += 1;
                if len == n {
                    return Some(start);
                }
            }
            b += 1;
        }
        None
    }

    /// `b` is no longer referenced by the in-memory state; it becomes free once the index
    /// write that dropped the reference is durable.
    pub fn defer_free(&mut self, b: u64) {
        if b != 0 {
            self.deferred.push(b);
        }
    }

    /// The deferred blocks, sorted, still marked used: the caller discards their space on the
    /// device first and then [`Allocator::release`]s them, so no new data lands in a block
    /// whose discard is still in flight.
    pub fn take_deferred(&mut self) -> Vec<u64> {
        let mut d = std::mem::take(&mut self.deferred);
        d.sort_unstable();
        d
    }

    /// Frees blocks taken with [`Allocator::take_deferred`].
    pub fn release(&mut self, blocks: &[u64]) {
        for &b in blocks {
            self.mark_free(b);
        }
    }
}

/// Groups sorted block numbers into runs.
pub fn runs_of(sorted: &[u64]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for &b in sorted {
        match out.last_mut() {
            Some(r) if r.start + r.len == b => r.len += 1,
            _ => out.push(Run { start: b, len: 1 }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_contiguously_and_never_twice() {
        let mut a = Allocator::new(100);
        assert_eq!(a.free_blocks(), 99);
        let r = a.allocate(10).unwrap();
        assert_eq!(r, vec![Run { start: 1, len: 10 }]);
        let r2 = a.allocate(5).unwrap();
        assert_eq!(r2, vec![Run { start: 11, len: 5 }]);
        for b in 3..6 {
            a.defer_free(b);
        }
        // Deferred blocks stay used until released.
        assert_eq!(a.free_blocks(), 84);
        let d = a.take_deferred();
        assert_eq!(d, vec![3, 4, 5]);
        a.release(&d);
        assert_eq!(a.free_blocks(), 87);
        // 87 free: everything can be allocated, in runs, never block 0.
        let all = a.allocate(87).unwrap();
        let total: u64 = all.iter().map(|r| r.len).sum();
        assert_eq!(total, 87);
        assert!(all.iter().all(|r| r.start > 0 && r.start + r.len <= 100));
        assert_eq!(a.allocate(1), None);
    }

    #[test]
    fn fragmented_space_is_used_in_runs() {
        let mut a = Allocator::new(20);
        a.allocate(19).unwrap();
        for b in [2, 3, 7, 8, 9, 15] {
            a.defer_free(b);
        }
        let d = a.take_deferred();
        a.release(&d);
        let r = a.allocate(6).unwrap();
        let mut blocks: Vec<u64> = r.iter().flat_map(|r| r.start..r.start + r.len).collect();
        blocks.sort();
        assert_eq!(blocks, vec![2, 3, 7, 8, 9, 15]);
        assert_eq!(runs_of(&blocks).len(), 3);
    }

    #[test]
    fn marking_a_block_twice_is_reported() {
        let mut a = Allocator::new(10);
        assert!(a.mark_used(4));
        assert!(!a.mark_used(4));
        assert!(!a.mark_used(0));
        assert!(!a.mark_used(99));
    }
}
