//! The WireGuard protocol's primitives, as the paper names them (section 5.4), on RustCrypto
//! crates: HASH (BLAKE2s-256), MAC (keyed BLAKE2s, 16 bytes), HMAC (HMAC-BLAKE2s), the KDFs
//! built on it, AEAD (ChaCha20-Poly1305 with a 64-bit counter nonce) and XAEAD
//! (XChaCha20-Poly1305, for cookies). Nothing here is hand-rolled cryptography: these are thin,
//! typed wrappers so the handshake reads like the paper.

use blake2::digest::consts::U16;
use blake2::digest::{Digest, FixedOutput, KeyInit, Mac, Update};
use blake2::{Blake2s256, Blake2sMac};
use chacha20poly1305::aead::Payload;
use chacha20poly1305::{aead::Aead, ChaCha20Poly1305, Key, Nonce, XChaCha20Poly1305, XNonce};
use hmac::SimpleHmac;

/// Bytes of a Poly1305 tag.
pub const TAG_LEN: usize = 16;

/// The AEAD refused: the tag does not authenticate the ciphertext and associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct AuthError;

/// HASH(parts[0] || parts[1] || ...): BLAKE2s with a 32-byte output.
pub fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// MAC(key, parts...): keyed BLAKE2s with a 16-byte output (mac1, mac2, cookies).
pub fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key)
        .expect("BLAKE2s keys of up to 32 bytes are valid");
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// HMAC(key, parts...) with BLAKE2s-256.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <SimpleHmac<Blake2s256> as Mac>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// KDF_n(key, input): τ0 = HMAC(key, input), τi = HMAC(τ0, τ(i-1) || i); returns τ1..τn.
fn kdf<const N: usize>(key: &[u8; 32], input: &[u8]) -> [[u8; 32]; N] {
    let t0 = hmac(key, &[input]);
    let mut out = [[0u8; 32]; N];
    let mut prev = Vec::new();
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = hmac(&t0, &[&prev, &[i as u8 + 1]]);
        prev = slot.to_vec();
    }
    out
}

pub fn kdf1(key: &[u8; 32], input: &[u8]) -> [u8; 32] {
    let [a] = kdf::<1>(key, input);
    a
}

pub fn kdf2(key: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let [a, b] = kdf::<2>(key, input);
    (a, b)
}

pub fn kdf3(key: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32], [u8; 32]) {
    let [a, b, c] = kdf::<3>(key, input);
    (a, b, c)
}

/// The 96-bit nonce of a counter: 32 zero bits, then the counter little-endian.
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n.into()
}

/// AEAD(key, counter, plaintext, aad) into a new buffer (handshake fields).
pub fn seal(key: &[u8; 32], counter: u64, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt(
            &nonce(counter),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("ChaCha20-Poly1305 encrypts any handshake-sized message")
}

/// Opens what [`seal`] made.
pub fn open(
    key: &[u8; 32],
    counter: u64,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, AuthError> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(
            &nonce(counter),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| AuthError)
}

/// A transport key with its cipher set up once (the data path seals and opens in place).
///
/// The same AEAD as [`seal`]/[`open`], from ring's assembly implementation (BoringSSL's):
/// on the data path it runs several times faster than the portable crate, whose AVX2
/// helpers are not inlined under runtime CPU detection (measured: ARCHITECTURE.md).
/// `transport_keys_agree_with_the_portable_aead` checks the two give identical bytes.
pub struct TransportKey(ring::aead::LessSafeKey);

impl std::fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransportKey(..)")
    }
}

fn ring_nonce(counter: u64) -> ring::aead::Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    ring::aead::Nonce::assume_unique_for_key(n)
}

impl TransportKey {
    pub fn new(key: &[u8; 32]) -> Self {
        let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key)
            .expect("a 32-byte ChaCha20-Poly1305 key");
        Self(ring::aead::LessSafeKey::new(key))
    }

    /// Encrypts `buf` in place (no associated data) and returns the tag.
    pub fn seal_in_place(&self, counter: u64, buf: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .0
            .seal_in_place_separate_tag(ring_nonce(counter), ring::aead::Aad::empty(), buf)
            .expect("transport packets are far below the cipher's length limit");
        tag.as_ref().try_into().expect("a 16-byte tag")
    }

    /// Decrypts `buf` in place if `tag` authenticates it.
    pub fn open_in_place(
        &self,
        counter: u64,
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AuthError> {
        self.0
            .open_in_place_separate_tag(
                ring_nonce(counter),
                ring::aead::Aad::empty(),
                ring::aead::Tag::from(*tag),
                buf,
                0..,
            )
            .map(|_| ())
            .map_err(|_| AuthError)
    }
}

/// XAEAD(key, nonce, plaintext, aad): XChaCha20-Poly1305 (cookie replies).
pub fn xseal(key: &[u8; 32], nonce: &[u8; 24], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    XChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("XChaCha20-Poly1305 encrypts a cookie")
}

pub fn xopen(
    key: &[u8; 32],
    nonce: &[u8; 24],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, AuthError> {
    XChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| AuthError)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn blake2s_matches_the_rfc_7693_vector() {
        // RFC 7693 appendix B: BLAKE2s-256("abc").
        assert_eq!(
            hash(&[b"a", b"bc"]).to_vec(),
            hex("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
        );
    }

    #[test]
    fn chacha20poly1305_matches_the_rfc_8439_vector() {
        // RFC 8439 section 2.8.2.
        let key: [u8; 32] = hex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
            .try_into()
            .unwrap();
        let n = hex("070000004041424344454647");
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let ct = ChaCha20Poly1305::new(Key::from_slice(&key))
            .encrypt(Nonce::from_slice(&n), Payload { msg: pt, aad: &aad })
            .unwrap();
        assert_eq!(
            ct[ct.len() - 16..].to_vec(),
            hex("1ae10b594f09e26a7e902ecbd0600691")
        );
        // Our counter nonce is the same layout with a zero constant.
        let sealed = seal(&key, 7, b"x", b"");
        assert_eq!(open(&key, 7, &sealed, b"").unwrap(), b"x");
        assert_eq!(open(&key, 8, &sealed, b""), Err(AuthError));
    }

    #[test]
    fn kdf_chains_hmac_as_the_paper_defines() {
        let key = [7u8; 32];
        let (a, b, c) = kdf3(&key, b"input");
        let t0 = hmac(&key, &[b"input"]);
        assert_eq!(a, hmac(&t0, &[&[1]]));
        assert_eq!(b, hmac(&t0, &[&a, &[2]]));
        assert_eq!(c, hmac(&t0, &[&b, &[3]]));
        assert_eq!(kdf2(&key, b"input"), (a, b));
        assert_eq!(kdf1(&key, b"input"), a);
    }

    proptest::proptest! {
        /// ring's transport AEAD and RustCrypto's give the same bytes both ways.
        #[test]
        fn transport_keys_agree_with_the_portable_aead(
            key: [u8; 32],
            counter: u64,
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
        ) {
            let k = TransportKey::new(&key);
            let mut buf = data.clone();
            let tag = k.seal_in_place(counter, &mut buf);
            let mut sealed = buf.clone();
            sealed.extend_from_slice(&tag);
            proptest::prop_assert_eq!(&sealed, &seal(&key, counter, &data, &[]));
            proptest::prop_assert_eq!(open(&key, counter, &sealed, &[]).unwrap(), data.clone());
            k.open_in_place(counter, &mut buf, &tag).unwrap();
            proptest::prop_assert_eq!(buf, data);
        }
    }

    #[test]
    fn in_place_transport_sealing_round_trips_and_rejects_tampering() {
        let k = TransportKey::new(&[3u8; 32]);
        let mut buf = b"an ip packet....".to_vec();
        let tag = k.seal_in_place(42, &mut buf);
        let mut tampered = buf.clone();
        tampered[0] ^= 1;
        assert_eq!(k.open_in_place(42, &mut tampered, &tag), Err(AuthError));
        k.open_in_place(42, &mut buf, &tag).unwrap();
        assert_eq!(&buf, b"an ip packet....");
    }
}
