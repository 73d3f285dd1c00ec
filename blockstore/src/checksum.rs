//! Per-block checksums: every 4 KiB of shard data carries a CRC-32 (crc32fast), computed right
//! before a shard is written and verified right after it is read (DESIGN.md invariant 4).
//! A mismatch is reported with the block it concerns, so the caller can rebuild exactly that
//! block from the other shards and count it.

/// Bytes covered by one checksum.
pub const BLOCK_BYTES: usize = 4096;

/// A checksum did not match: `block` (index within the checked range) is corrupt.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChecksumError {
    #[error(
        "checksum mismatch in block {block}: stored {stored:#010x}, computed {computed:#010x}"
    )]
    Mismatch {
        block: usize,
        stored: u32,
        computed: u32,
    },
    #[error("{blocks} checksums cover {covered} bytes, but the data is {len} bytes")]
    Shape {
        blocks: usize,
        covered: usize,
        len: usize,
    },
}

/// Checksums of `data`, one per 4 KiB block (the last block may be short).
pub fn compute(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_BYTES).map(crc32fast::hash).collect()
}

/// Verifies `data` against `sums`; the first corrupt block is reported.
pub fn verify(data: &[u8], sums: &[u32]) -> Result<(), ChecksumError> {
    let blocks = data.len().div_ceil(BLOCK_BYTES);
    if blocks != sums.len() {
        return Err(ChecksumError::Shape {
            blocks: sums.len(),
            covered: sums.len() * BLOCK_BYTES,
            len: data.len(),
        });
    }
    for (block, (chunk, stored)) in data.chunks(BLOCK_BYTES).zip(sums).enumerate() {
        let computed = crc32fast::hash(chunk);
        if computed != *stored {
            return Err(ChecksumError::Mismatch {
                block,
                stored: *stored,
                computed,
            });
        }
    }
    Ok(())
}

/// Every corrupt block of `data` (the scrubber wants them all, not just the first).
pub fn corrupt_blocks(data: &[u8], sums: &[u32]) -> Vec<usize> {
    data.chunks(BLOCK_BYTES)
        .zip(sums)
        .enumerate()
        .filter(|(_, (chunk, stored))| crc32fast::hash(chunk) != **stored)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_flipped_bit_is_found_in_its_block(
            data in proptest::collection::vec(any::<u8>(), 1..20_000),
            bit in any::<usize>(),
        ) {
            let sums = compute(&data);
            prop_assert!(verify(&data, &sums).is_ok());
            let mut bad = data.clone();
            let bit = bit % (bad.len() * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
            let block = bit / 8 / BLOCK_BYTES;
            let err = verify(&bad, &sums).unwrap_err();
            let is_expected_block = matches!(err, ChecksumError::Mismatch { block: b, .. } if b == block);
            prop_assert!(is_expected_block);
            prop_assert_eq!(corrupt_blocks(&bad, &sums), vec![block]);
        }
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let data = vec![0u8; 10_000];
        let sums = compute(&data);
        assert_eq!(sums.len(), 3);
        assert!(matches!(
            verify(&data[..4096], &sums),
            Err(ChecksumError::Shape { .. })
        ));
    }
}
