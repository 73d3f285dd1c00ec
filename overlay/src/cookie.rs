//! Cookies (the paper, section 5.4.7): under load a responder answers a handshake message
//! whose mac2 is not valid with a cookie reply instead of doing any Diffie-Hellman; the
//! cookie is a MAC of the sender's address under a secret that changes every two minutes,
//! so only a sender that can receive at its address can present it (in mac2) later.
//!
//! Time is an input (`now`: a monotonic duration), so is randomness.

use std::net::SocketAddr;
use std::time::Duration;

use rand::{CryptoRng, RngCore};

use crate::crypto::{mac, xopen, xseal, AuthError};
use crate::messages::{CookieReply, COOKIE_REPLY_LEN, TYPE_COOKIE_REPLY};
use crate::noise;

/// A cookie secret (and a received cookie) is good for this long.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);

fn address_bytes(addr: &SocketAddr) -> Vec<u8> {
    let mut out = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

/// The responder's side: makes cookies and checks mac2.
#[derive(Clone)]
pub struct CookieChecker {
    secret: [u8; 32],
    secret_born: Option<Duration>,
    /// Our cookie-encryption key (`HASH(LABEL_COOKIE || our public key)`).
    cookie_key: [u8; 32],
}

impl std::fmt::Debug for CookieChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieChecker(..)")
    }
}

impl CookieChecker {
    pub fn new(local: &noise::Identity) -> Self {
        Self {
            secret: [0; 32],
            secret_born: None,
            cookie_key: local.cookie_key,
        }
    }

    fn secret(&mut self, now: Duration, rng: &mut (impl RngCore + CryptoRng)) -> [u8; 32] {
        let stale = self
            .secret_born
            .is_none_or(|born| now.saturating_sub(born) >= COOKIE_LIFETIME);
        if stale {
            rng.fill_bytes(&mut self.secret);
            self.secret_born = Some(now);
        }
        self.secret
    }

    /// The cookie of `src` now.
    fn cookie(
        &mut self,
        now: Duration,
        src: &SocketAddr,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> [u8; 16] {
        let secret = self.secret(now, rng);
        mac(&secret, &[&address_bytes(src)])
    }

    /// Whether the handshake message `msg` (mac1 at `mac1_at`) from `src` carries a valid
    /// mac2 (its sender proved it receives at `src`).
    pub fn check_mac2(
        &mut self,
        now: Duration,
        msg: &[u8],
        mac1_at: usize,
        src: &SocketAddr,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> bool {
        if self
            .secret_born
            .is_none_or(|born| now.saturating_sub(born) >= COOKIE_LIFETIME)
        {
            return false; // no cookie handed out under the current secret
        }
        let cookie = self.cookie(now, src, rng);
        noise::check_mac2(msg, mac1_at, &cookie)
    }

    /// A cookie reply to the message (its sender index and mac1) that came from `src`.
    pub fn reply(
        &mut self,
        now: Duration,
        sender_index: u32,
        mac1: &[u8; 16],
        src: &SocketAddr,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> [u8; COOKIE_REPLY_LEN] {
        let cookie = self.cookie(now, src, rng);
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let enc = xseal(&self.cookie_key, &nonce, &cookie, mac1);
        let mut out = [0u8; COOKIE_REPLY_LEN];
        out[0] = TYPE_COOKIE_REPLY;
        out[4..8].copy_from_slice(&sender_index.to_le_bytes());
        out[8..32].copy_from_slice(&nonce);
        out[32..64].copy_from_slice(&enc);
        out
    }
}

/// The initiator's side: a cookie received from a peer, used as mac2 key while fresh.
#[derive(Clone, Debug, Default)]
pub struct ReceivedCookie {
    cookie: Option<([u8; 16], Duration)>,
}

impl ReceivedCookie {
    /// Decrypts a cookie reply from the peer whose cookie key is `peer_cookie_key`, bound to
    /// the mac1 of the message it answers.
    pub fn consume(
        &mut self,
        now: Duration,
        reply: &CookieReply<'_>,
        peer_cookie_key: &[u8; 32],
        last_mac1: &[u8; 16],
    ) -> Result<(), AuthError> {
        let plain = xopen(
            peer_cookie_key,
            reply.nonce,
            reply.encrypted_cookie,
            last_mac1,
        )?;
        let cookie: [u8; 16] = plain.try_into().map_err(|_| AuthError)?;
        self.cookie = Some((cookie, now));
        Ok(())
    }

    /// The cookie to put in mac2, if one is fresh.
    pub fn current(&self, now: Duration) -> Option<&[u8; 16]> {
        match &self.cookie {
            Some((c, at)) if now.saturating_sub(*at) < COOKIE_LIFETIME => Some(c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{parse, Packet, INITIATION_MAC1};
    use crate::noise::{create_initiation, Identity, PeerKey};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use x25519_dalek::StaticSecret;

    #[test]
    fn a_cookie_makes_mac2_valid_from_the_same_address_only() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = Identity::new(StaticSecret::from([1; 32]));
        let b = Identity::new(StaticSecret::from([2; 32]));
        let b_at_a = PeerKey::new(&a, b.public, None);
        let mut checker = CookieChecker::new(&b);
        let src: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let now = Duration::from_secs(10);
        let (init, state) =
            create_initiation(&a, &b_at_a, 1, StaticSecret::from([3; 32]), [0; 12], None).unwrap();
        assert!(
            !checker.check_mac2(now, &init, INITIATION_MAC1, &src, &mut rng),
            "no mac2 yet"
        );
        let reply = checker.reply(now, 1, &state.mac1, &src, &mut rng);
        let Packet::CookieReply(r) = parse(&reply).unwrap() else {
            panic!()
        };
        let mut got = ReceivedCookie::default();
        assert!(
            got.consume(now, &r, &b_at_a.cookie_key, &[0; 16]).is_err(),
            "bound to mac1"
        );
        got.consume(now, &r, &b_at_a.cookie_key, &state.mac1)
            .unwrap();
        let (init2, _) = create_initiation(
            &a,
            &b_at_a,
            2,
            StaticSecret::from([4; 32]),
            [1; 12],
            got.current(now),
        )
        .unwrap();
        assert!(checker.check_mac2(now, &init2, INITIATION_MAC1, &src, &mut rng));
        let other: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        assert!(!checker.check_mac2(now, &init2, INITIATION_MAC1, &other, &mut rng));
        // Two minutes on, the secret and the cookie are gone.
        let later = now + COOKIE_LIFETIME;
        assert!(got.current(later).is_none());
        assert!(!checker.check_mac2(later, &init2, INITIATION_MAC1, &src, &mut rng));
    }
}
