//! The k+m erasure codec: k data shards and m parity shards per stripe, any k of which
//! reconstruct the rest (Reed-Solomon over GF(2^8), reed-solomon-erasure).
//!
//! Partial-stripe writes use parity deltas: the code is linear, so when data shard `i` changes
//! from `old` to `new`, every parity shard changes by `coef(p, i) * (old ^ new)`;
//! [`Codec::apply_delta`] adds exactly that, touching one data shard and the m parity shards
//! instead of re-encoding the stripe.

use reed_solomon_erasure::galois_8::ReedSolomon;

/// Most data shards in a stripe (a named limit).
pub const MAX_DATA_SHARDS: usize = 16;
/// Most parity shards in a stripe.
pub const MAX_PARITY_SHARDS: usize = 8;

/// Why an EC operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EcError {
    #[error("invalid EC profile {data}+{parity}: {reason}")]
    BadProfile {
        data: usize,
        parity: usize,
        reason: &'static str,
    },
    #[error("only {present} of the {needed} shards needed to reconstruct are present")]
    TooFewShards { present: usize, needed: usize },
    #[error("shards differ in size or do not match the profile")]
    ShapeMismatch,
    #[error("data shard index {index} is out of range for {data} data shards")]
    BadIndex { index: usize, data: usize },
}

/// A stripe layout: `data` data shards + `parity` parity shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Profile {
    pub data: usize,
    pub parity: usize,
}

impl Profile {
    /// 4+2: 1.5× space, survives any two losses (the default).
    pub const DEFAULT: Profile = Profile { data: 4, parity: 2 };
    /// 2+1 for small sites.
    pub const SMALL_SITE: Profile = Profile { data: 2, parity: 1 };
    /// 1+2: three full copies.
    pub const REPLICATED_3: Profile = Profile { data: 1, parity: 2 };

    pub fn new(data: usize, parity: usize) -> Result<Self, EcError> {
        let bad = |reason| EcError::BadProfile {
            data,
            parity,
            reason,
        };
        if data == 0 || data > MAX_DATA_SHARDS {
            return Err(bad("data shards must be 1..=16"));
        }
        if parity == 0 || parity > MAX_PARITY_SHARDS {
            return Err(bad("parity shards must be 1..=8"));
        }
        Ok(Profile { data, parity })
    }

    pub fn width(&self) -> usize {
        self.data + self.parity
    }
}

/// Encoder/decoder for one profile. Cheap to share; build once per profile.
pub struct Codec {
    profile: Profile,
    rs: ReedSolomon,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Codec({}+{})", self.profile.data, self.profile.parity)
    }
}

impl Codec {
    pub fn new(profile: Profile) -> Result<Self, EcError> {
        let profile = Profile::new(profile.data, profile.parity)?;
        let rs =
            ReedSolomon::new(profile.data, profile.parity).map_err(|_| EcError::BadProfile {
                data: profile.data,
                parity: profile.parity,
                reason: "rejected by the codec",
            })?;
        Ok(Self { profile, rs })
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Computes the parity shards of `data` (all the same length) into `parity`.
    pub fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), EcError> {
        self.check_shape(data.iter().map(|d| d.len()), parity.iter().map(|p| p.len()))?;
        self.rs
            .encode_sep(data, parity)
            .map_err(|_| EcError::ShapeMismatch)
    }

    /// Fills in the missing shards (`None`) from any `data` present ones. `shards` has the
    /// stripe's full width, data shards first.
    pub fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), EcError> {
        if shards.len() != self.profile.width() {
            return Err(EcError::ShapeMismatch);
        }
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < self.profile.data {
            return Err(EcError::TooFewShards {
                present,
                needed: self.profile.data,
            });
        }
        let len = shards.iter().flatten().map(Vec::len).next().unwrap_or(0);
        if shards.iter().flatten().any(|s| s.len() != len) {
            return Err(EcError::ShapeMismatch);
        }
        self.rs
            .reconstruct(shards)
            .map_err(|_| EcError::ShapeMismatch)
    }

    /// Like [`Codec::reconstruct`], into caller-owned buffers (no allocation): `shards` holds
    /// the whole stripe, `present[i]` says whether shard `i` holds valid data; missing ones are
    /// overwritten.
    pub fn reconstruct_in_place(
        &self,
        shards: &mut [&mut [u8]],
        present: &[bool],
    ) -> Result<(), EcError> {
        if shards.len() != self.profile.width() || present.len() != shards.len() {
            return Err(EcError::ShapeMismatch);
        }
        let count = present.iter().filter(|p| **p).count();
        if count < self.profile.data {
            return Err(EcError::TooFewShards {
                present: count,
                needed: self.profile.data,
            });
        }
        let len = shards[0].len();
        if shards.iter().any(|s| s.len() != len) {
            return Err(EcError::ShapeMismatch);
        }
        let mut pairs: Vec<(&mut [u8], bool)> = shards
            .iter_mut()
            .zip(present)
            .map(|(s, p)| (&mut **s, *p))
            .collect();
        self.rs
            .reconstruct(&mut pairs)
            .map_err(|_| EcError::ShapeMismatch)
    }

    /// Whether the present shards (`None`: not read) are one codeword: the stripe decoded from
    /// the first k of them agrees with every other. Needs at least k present.
    pub fn consistent(&self, shards: &[Option<&[u8]>]) -> Result<bool, EcError> {
        let k = self.profile.data;
        let mut decoded: Vec<Option<Vec<u8>>> = vec![None; shards.len()];
        for (i, s) in shards
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .take(k)
        {
            decoded[i] = s.map(<[u8]>::to_vec);
        }
        self.reconstruct(&mut decoded)?;
        Ok(shards
            .iter()
            .zip(&decoded)
            .all(|(s, d)| s.is_none_or(|s| Some(s) == d.as_deref())))
    }

    /// When the present shards are not one codeword, the single shard whose removal makes
    /// them one, if exactly one does. Locating needs k + 2 shards present (with k + 1, the
    /// removal of any one leaves k, always consistent); `None` when it cannot tell.
    pub fn locate_bad(&self, shards: &[Option<&[u8]>]) -> Result<Option<usize>, EcError> {
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < self.profile.data + 2 || self.consistent(shards)? {
            return Ok(None);
        }
        let mut culprit = None;
        for c in (0..shards.len()).filter(|&c| shards[c].is_some()) {
            let mut without = shards.to_vec();
            without[c] = None;
            if self.consistent(&without)? {
                if culprit.is_some() {
                    return Ok(None);
                }
                culprit = Some(c);
            }
        }
        Ok(culprit)
    }

    /// Updates `parity` for data shard `index` changing from `old` to `new`.
    pub fn apply_delta(
        &self,
        index: usize,
        old: &[u8],
        new: &[u8],
        parity: &mut [&mut [u8]],
    ) -> Result<(), EcError> {
        if index >= self.profile.data {
            return Err(EcError::BadIndex {
                index,
                data: self.profile.data,
            });
        }
        let len = old.len();
        if new.len() != len
            || parity.len() != self.profile.parity
            || parity.iter().any(|p| p.len() != len)
        {
            return Err(EcError::ShapeMismatch);
        }
        let delta: Vec<u8> = old.iter().zip(new).map(|(a, b)| a ^ b).collect();
        // encode_single_sep overwrites for index 0 and adds otherwise; from zeroed buffers both
        // give exactly this shard's contribution, which is then added (XOR) to the parity.
        let mut contribution = vec![vec![0u8; len]; self.profile.parity];
        self.rs
            .encode_single_sep(index, &delta, &mut contribution)
            .map_err(|_| EcError::ShapeMismatch)?;
        for (p, c) in parity.iter_mut().zip(&contribution) {
            for (x, y) in p.iter_mut().zip(c) {
                *x ^= y;
            }
        }
        Ok(())
    }

    fn check_shape(
        &self,
        data: impl Iterator<Item = usize>,
        parity: impl Iterator<Item = usize>,
    ) -> Result<(), EcError> {
        let data: Vec<usize> = data.collect();
        let parity: Vec<usize> = parity.collect();
        let len = data.first().copied().unwrap_or(0);
        if data.len() != self.profile.data
            || parity.len() != self.profile.parity
            || data.iter().chain(&parity).any(|l| *l != len)
        {
            return Err(EcError::ShapeMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stripe(codec: &Codec, data: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let len = data[0].len();
        let mut parity = vec![vec![0u8; len]; codec.profile().parity];
        let d: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
        codec.encode(&d, &mut p).unwrap();
        data.iter().cloned().chain(parity).collect()
    }

    fn profiles() -> impl Strategy<Value = Profile> {
        prop_oneof![
            Just(Profile::DEFAULT),
            Just(Profile::SMALL_SITE),
            Just(Profile::REPLICATED_3),
            Just(Profile { data: 8, parity: 3 }),
        ]
    }

    proptest! {
        #[test]
        fn any_k_of_k_plus_m_reconstruct(
            profile in profiles(),
            len in 1usize..256,
            seed in any::<u64>(),
            lost_mask in any::<u32>(),
        ) {
            let codec = Codec::new(profile).unwrap();
            let mut x = seed | 1;
            let data: Vec<Vec<u8>> = (0..profile.data)
                .map(|_| (0..len).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect())
                .collect();
            let full = stripe(&codec, &data);
            // Lose up to m shards chosen by the mask.
            let mut shards: Vec<Option<Vec<u8>>> = full.iter().cloned().map(Some).collect();
            let mut lost = 0;
            for (i, s) in shards.iter_mut().enumerate() {
                if lost < profile.parity && lost_mask & (1 << i) != 0 {
                    *s = None;
                    lost += 1;
                }
            }
            codec.reconstruct(&mut shards).unwrap();
            let got: Vec<Vec<u8>> = shards.into_iter().map(Option::unwrap).collect();
            prop_assert_eq!(got, full);
        }

        #[test]
        fn parity_delta_equals_reencoding(
            profile in profiles(),
            index_seed in any::<usize>(),
            old in proptest::collection::vec(any::<u8>(), 64),
            new in proptest::collection::vec(any::<u8>(), 64),
        ) {
            let codec = Codec::new(profile).unwrap();
            let index = index_seed % profile.data;
            let mut data: Vec<Vec<u8>> = (0..profile.data).map(|i| vec![i as u8; 64]).collect();
            data[index] = old.clone();
            let before = stripe(&codec, &data);
            let mut parity: Vec<Vec<u8>> = before[profile.data..].to_vec();
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
            codec.apply_delta(index, &old, &new, &mut p).unwrap();
            data[index] = new;
            let after = stripe(&codec, &data);
            prop_assert_eq!(&parity[..], &after[profile.data..]);
        }
    }

    proptest! {
        #[test]
        fn one_wrong_shard_is_located_when_two_spares_exist(
            profile in profiles(),
            bad_seed in any::<usize>(),
            missing_seed in any::<usize>(),
            flip in 1u8..=255,
            at in 0usize..32,
        ) {
            let codec = Codec::new(profile).unwrap();
            let data: Vec<Vec<u8>> = (0..profile.data).map(|i| vec![i as u8 * 29 + 3; 32]).collect();
            let mut full = stripe(&codec, &data);
            let width = profile.width();
            let bad = bad_seed % width;
            full[bad][at] ^= flip;
            let mut shards: Vec<Option<&[u8]>> = full.iter().map(|s| Some(s.as_slice())).collect();
            prop_assert!(!codec.consistent(&shards).unwrap());
            prop_assert_eq!(codec.locate_bad(&shards).unwrap(), (profile.parity >= 2).then_some(bad));
            // One shard fewer (not the bad one): locatable only with m >= 3.
            let missing = (bad + 1 + missing_seed % (width - 1)) % width;
            shards[missing] = None;
            prop_assert_eq!(codec.locate_bad(&shards).unwrap(), (profile.parity >= 3).then_some(bad));
        }
    }

    #[test]
    fn a_consistent_stripe_has_nothing_to_locate() {
        let codec = Codec::new(Profile::DEFAULT).unwrap();
        let data: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8; 16]).collect();
        let full = stripe(&codec, &data);
        let shards: Vec<Option<&[u8]>> = full.iter().map(|s| Some(s.as_slice())).collect();
        assert!(codec.consistent(&shards).unwrap());
        assert_eq!(codec.locate_bad(&shards).unwrap(), None);
    }

    #[test]
    fn in_place_reconstruction_restores_lost_shards() {
        let codec = Codec::new(Profile { data: 8, parity: 3 }).unwrap();
        let data: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8 * 7 + 1; 100]).collect();
        let full = stripe(&codec, &data);
        let mut bufs = full.clone();
        for i in [0, 5, 9] {
            bufs[i].fill(0xee);
        }
        let present: Vec<bool> = (0..11).map(|i| ![0, 5, 9].contains(&i)).collect();
        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        codec.reconstruct_in_place(&mut refs, &present).unwrap();
        assert_eq!(bufs, full);
    }

    #[test]
    fn too_many_losses_and_bad_shapes_are_errors() {
        let codec = Codec::new(Profile::DEFAULT).unwrap();
        let mut shards: Vec<Option<Vec<u8>>> = vec![
            None,
            None,
            None,
            Some(vec![1; 8]),
            Some(vec![2; 8]),
            Some(vec![3; 8]),
        ];
        assert_eq!(
            codec.reconstruct(&mut shards),
            Err(EcError::TooFewShards {
                present: 3,
                needed: 4
            })
        );
        let mut uneven: Vec<Option<Vec<u8>>> = vec![Some(vec![0; 8]); 5];
        uneven.push(Some(vec![0; 9]));
        assert_eq!(codec.reconstruct(&mut uneven), Err(EcError::ShapeMismatch));
        assert!(Profile::new(0, 2).is_err());
        assert!(Profile::new(4, 0).is_err());
        assert!(Profile::new(17, 2).is_err());
        let mut p = [0u8; 8];
        let mut parity: Vec<&mut [u8]> = vec![&mut p];
        assert!(codec.apply_delta(4, &[0; 8], &[1; 8], &mut parity).is_err());
    }
}
