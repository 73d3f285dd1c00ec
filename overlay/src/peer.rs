//! One peer's protocol state: its sessions (current, previous, and the responder's
//! unconfirmed next), the handshake in flight, the timers of the paper's section 6, staged
//! packets and counters. Sans-IO: the [`crate::device::Device`] feeds it time and packets and
//! collects what it wants sent.
//!
//! Timer rules (constants from the paper, section 6.1):
//! - An initiator rekeys after sending with a session older than REKEY_AFTER_TIME or past
//!   REKEY_AFTER_MESSAGES, and after receiving with one older than REJECT_AFTER_TIME −
//!   KEEPALIVE_TIMEOUT − REKEY_TIMEOUT.
//! - No session is used past REJECT_AFTER_TIME or REJECT_AFTER_MESSAGES.
//! - An initiation unanswered for REKEY_TIMEOUT (+ up to 333 ms of jitter) is resent with a
//!   new ephemeral key, until REKEY_ATTEMPT_TIME has passed; then staged packets are dropped.
//! - After an authenticated data packet, if nothing is sent for KEEPALIVE_TIMEOUT, a
//!   keepalive is sent; after sending data, if nothing comes back within KEEPALIVE_TIMEOUT +
//!   REKEY_TIMEOUT, a new handshake starts.
//! - After 3 × REJECT_AFTER_TIME without a new session, every key is erased.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crate::cookie::ReceivedCookie;
use crate::crypto::{TransportKey, TAG_LEN};
use crate::messages::{self, DATA_HEADER_LEN};
use crate::noise::{InitiationState, PeerKey, SessionKeys};
use crate::replay::ReplayWindow;

pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most jitter added to a handshake retry.
pub const REKEY_JITTER_MS: u64 = 333;
/// Packets kept while a handshake is in flight (older ones are dropped first).
pub const MAX_STAGED_PACKETS: usize = 128;
/// Initiations from one peer closer together than this are ignored (flood protection).
pub const MIN_INITIATION_INTERVAL: Duration = Duration::from_millis(20);

/// A transport session (one handshake's keys).
pub struct Session {
    send: TransportKey,
    recv: TransportKey,
    pub local_index: u32,
    pub remote_index: u32,
    pub initiator: bool,
    pub created: Duration,
    send_counter: u64,
    replay: ReplayWindow,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Session(local {:#x}, remote {:#x}, initiator {}, sent {})",
            self.local_index, self.remote_index, self.initiator, self.send_counter
        )
    }
}

impl Session {
    pub fn new(keys: &SessionKeys, now: Duration) -> Self {
        Self {
            send: TransportKey::new(&keys.send),
            recv: TransportKey::new(&keys.recv),
            local_index: keys.local_index,
            remote_index: keys.remote_index,
            initiator: keys.initiator,
            created: now,
            send_counter: 0,
            replay: ReplayWindow::default(),
        }
    }

    fn age(&self, now: Duration) -> Duration {
        now.saturating_sub(self.created)
    }

    fn can_send(&self, now: Duration) -> bool {
        self.age(now) < REJECT_AFTER_TIME && self.send_counter < REJECT_AFTER_MESSAGES
    }

    fn can_receive(&self, now: Duration) -> bool {
        self.age(now) < REJECT_AFTER_TIME
    }

    /// Encrypts `plain` (an IP packet, or empty for a keepalive) into a data message.
    pub fn seal(&mut self, plain: &[u8], mtu: usize) -> Vec<u8> {
        // Padding to a multiple of 16 hides exact lengths, never beyond the MTU.
        let padded = if plain.is_empty() {
            0
        } else {
            plain.len().next_multiple_of(16).min(mtu.max(plain.len()))
        };
        let mut out = vec![0u8; DATA_HEADER_LEN + padded + TAG_LEN];
        let counter = self.send_counter;
        self.send_counter += 1;
        messages::write_data_header(&mut out, self.remote_index, counter);
        out[DATA_HEADER_LEN..DATA_HEADER_LEN + plain.len()].copy_from_slice(plain);
        let body_end = DATA_HEADER_LEN + padded;
        let tag = self
            .send
            .seal_in_place(counter, &mut out[DATA_HEADER_LEN..body_end]);
        out[body_end..].copy_from_slice(&tag);
        out
    }

    /// Decrypts a data message's payload (ciphertext + tag) in place; returns the plaintext
    /// length, or `None` for a replay, a bad tag or a counter out of range.
    fn open(&mut self, counter: u64, payload: &mut [u8]) -> Option<usize> {
        if payload.len() < TAG_LEN || !self.replay.would_accept(counter, REJECT_AFTER_MESSAGES) {
            return None;
        }
        let (body, tag) = payload.split_at_mut(payload.len() - TAG_LEN);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().ok()?;
        self.recv.open_in_place(counter, body, &tag).ok()?;
        // Only an authentic packet moves the window.
        self.replay
            .accept(counter, REJECT_AFTER_MESSAGES)
            .then_some(body.len())
    }
}

/// A handshake initiation in flight.
#[derive(Debug)]
pub struct Pending {
    pub state: InitiationState,
    /// When this attempt was sent, and when the first attempt of the series was.
    pub sent_at: Duration,
    pub first_at: Duration,
    /// When to retry (REKEY_TIMEOUT plus jitter after `sent_at`).
    pub retry_at: Duration,
}

/// Transfer counters and handshake times (`continuum overlay show`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Wall-clock time (since the Unix epoch) of the latest completed handshake.
    pub last_handshake: Option<Duration>,
    pub handshakes: u64,
    pub dropped_staged: u64,
}

#[derive(Debug)]
pub struct Peer {
    pub key: PeerKey,
    /// Where to send (learned from authenticated packets: roaming).
    pub endpoint: Option<SocketAddr>,
    /// The endpoint the configuration last gave (see [`crate::device::Device::set_peer`]).
    pub configured_endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<Duration>,
    pub current: Option<Session>,
    pub previous: Option<Session>,
    /// The responder's newest session, until the initiator's first data packet confirms it.
    pub next: Option<Session>,
    pub pending: Option<Pending>,
    pub cookie: ReceivedCookie,
    /// Latest accepted initiation timestamp (TAI64N) and when it arrived.
    pub last_initiation: Option<([u8; 12], Duration)>,
    pub staged: VecDeque<Vec<u8>>,
    pub last_sent: Option<Duration>,
    pub last_received: Option<Duration>,
    /// Non-keepalive data: when we last sent it with no reply since, and received it with
    /// nothing sent since.
    pub data_sent_unanswered: Option<Duration>,
    pub data_received_unanswered: Option<Duration>,
    pub last_session_at: Option<Duration>,
    pub stats: PeerStats,
    /// This peer relays for others (a cloud site's daemon): packets for a peer we cannot reach
    /// directly go through it, and it may send us packets of peers it relays.
    pub relay: bool,
    /// Since when a direct handshake has been failing (set after [`RELAY_AFTER`] of trying,
    /// cleared by a session): until then traffic goes through a relay.
    pub unreachable_since: Option<Duration>,
    /// The receive-side rekey (REJECT − KEEPALIVE − REKEY) was triggered for the current session.
    rekey_on_receive_done: bool,
}

/// How long direct handshakes with a peer may fail before its traffic goes through a relay.
pub const RELAY_AFTER: Duration = Duration::from_secs(5);

/// What a peer wants done.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerAction {
    /// Start (or restart) a handshake now.
    Handshake,
    /// Send this datagram to the endpoint.
    Send(Vec<u8>),
}

impl Peer {
    pub fn new(
        key: PeerKey,
        endpoint: Option<SocketAddr>,
        persistent_keepalive: Option<Duration>,
    ) -> Self {
        Self {
            key,
            endpoint,
            configured_endpoint: endpoint,
            persistent_keepalive,
            current: None,
            previous: None,
            next: None,
            pending: None,
            cookie: ReceivedCookie::default(),
            last_initiation: None,
            staged: VecDeque::new(),
            last_sent: None,
            last_received: None,
            data_sent_unanswered: None,
            data_received_unanswered: None,
            last_session_at: None,
            stats: PeerStats::default(),
            relay: false,
            unreachable_since: None,
            rekey_on_receive_done: false,
        }
    }

    /// A session to send on now.
    pub fn can_send_now(&self, now: Duration) -> bool {
        self.endpoint.is_some() && self.current.as_ref().is_some_and(|s| s.can_send(now))
    }

    /// Whether traffic for this peer should take a relay: no way to reach it directly (no
    /// endpoint, or handshakes failing for [`RELAY_AFTER`]) and no session to send on.
    pub fn wants_relay(&self, now: Duration) -> bool {
        !self.can_send_now(now) && (self.endpoint.is_none() || self.unreachable_since.is_some())
    }

    /// Local indices of every live session and pending handshake (for the device's table).
    pub fn indices(&self) -> Vec<u32> {
        let mut v: Vec<u32> = [&self.current, &self.previous, &self.next]
            .into_iter()
            .flatten()
            .map(|s| s.local_index)
            .collect();
        if let Some(p) = &self.pending {
            v.push(p.state.local_index);
        }
        v
    }

    fn note_sent(&mut self, now: Duration, data: bool) {
        self.last_sent = Some(now);
        self.data_received_unanswered = None;
        if data && self.data_sent_unanswered.is_none() {
            self.data_sent_unanswered = Some(now);
        }
    }

    /// Encrypts an IP packet for this peer, or stages it and asks for a handshake.
    pub fn send_packet(
        &mut self,
        now: Duration,
        packet: &[u8],
        mtu: usize,
        out: &mut Vec<PeerAction>,
    ) {
        let usable = self.current.as_ref().is_some_and(|s| s.can_send(now));
        if !usable || self.endpoint.is_none() {
            if self.staged.len() == MAX_STAGED_PACKETS {
                self.staged.pop_front();
                self.stats.dropped_staged += 1;
            }
            self.staged.push_back(packet.to_vec());
            if self.pending.is_none() {
                out.push(PeerAction::Handshake);
            }
            return;
        }
        let s = self.current.as_mut().expect("checked usable");
        let datagram = s.seal(packet, mtu);
        let rekey = s.initiator
            && (s.age(now) >= REKEY_AFTER_TIME || s.send_counter >= REKEY_AFTER_MESSAGES);
        self.stats.tx_bytes += datagram.len() as u64;
        self.note_sent(now, !packet.is_empty());
        out.push(PeerAction::Send(datagram));
        if rekey && self.pending.is_none() {
            out.push(PeerAction::Handshake);
        }
    }

    /// Sends what was staged (after a session became usable).
    pub fn flush_staged(&mut self, now: Duration, mtu: usize, out: &mut Vec<PeerAction>) {
        let staged: Vec<Vec<u8>> = self.staged.drain(..).collect();
        for p in staged {
            self.send_packet(now, &p, mtu, out);
        }
    }

    /// Installs a session from a completed handshake.
    pub fn install(&mut self, now: Duration, wall: Duration, session: Session) -> Vec<u32> {
        let mut retired = Vec::new();
        self.stats.handshakes += 1;
        self.stats.last_handshake = Some(wall);
        self.last_session_at = Some(now);
        self.unreachable_since = None;
        if session.initiator {
            // The initiator uses a new session at once (its first packet confirms it).
            if let Some(old) = self.previous.take() {
                retired.push(old.local_index);
            }
            if let Some(n) = self.next.take() {
                retired.push(n.local_index);
            }
            self.previous = self.current.take();
            self.current = Some(session);
            self.rekey_on_receive_done = false;
        } else {
            // The responder waits for the initiator's first data packet.
            if let Some(old) = self.next.replace(session) {
                retired.push(old.local_index);
            }
        }
        retired
    }

    /// Decrypts a data message addressed to one of this peer's sessions. Returns the plaintext
    /// length (0: keepalive) or `None` when it is dropped; retired indices go to `retired`.
    pub fn receive_data(
        &mut self,
        now: Duration,
        receiver: u32,
        counter: u64,
        payload: &mut [u8],
        retired: &mut Vec<u32>,
    ) -> Option<usize> {
        let slot = if self
            .current
            .as_ref()
            .is_some_and(|s| s.local_index == receiver)
        {
            0
        } else if self
            .next
            .as_ref()
            .is_some_and(|s| s.local_index == receiver)
        {
            1
        } else if self
            .previous
            .as_ref()
            .is_some_and(|s| s.local_index == receiver)
        {
            2
        } else {
            return None;
        };
        let session = match slot {
            0 => self.current.as_mut(),
            1 => self.next.as_mut(),
            _ => self.previous.as_mut(),
        }?;
        if !session.can_receive(now) {
            return None;
        }
        let n = session.open(counter, payload)?;
        if slot == 1 {
            // Key confirmation: the initiator used the new session.
            if let Some(old) = self.previous.take() {
                retired.push(old.local_index);
            }
            self.previous = self.current.take();
            self.current = self.next.take();
            self.rekey_on_receive_done = false;
        }
        self.last_received = Some(now);
        self.data_sent_unanswered = None;
        self.stats.rx_bytes += (DATA_HEADER_LEN + payload.len()) as u64;
        if n > 0 && self.data_received_unanswered.is_none() {
            self.data_received_unanswered = Some(now);
        }
        Some(n)
    }

    /// After receiving on the current session: whether the initiator should rekey now.
    pub fn wants_rekey_on_receive(&mut self, now: Duration) -> bool {
        let Some(s) = &self.current else { return false };
        let due =
            s.initiator && s.age(now) >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT;
        if due && !self.rekey_on_receive_done && self.pending.is_none() {
            self.rekey_on_receive_done = true;
            return true;
        }
        false
    }

    /// Timers: what is due at `now` (handshake retries, keepalives, expiry).
    pub fn tick(
        &mut self,
        now: Duration,
        mtu: usize,
        out: &mut Vec<PeerAction>,
        retired: &mut Vec<u32>,
    ) {
        // Handshake retries and giving up; a peer that does not answer for RELAY_AFTER is
        // reached through a relay meanwhile.
        if let Some(p) = &self.pending {
            if self.unreachable_since.is_none() && now.saturating_sub(p.first_at) >= RELAY_AFTER {
                self.unreachable_since = Some(now);
            }
            if now.saturating_sub(p.first_at) >= REKEY_ATTEMPT_TIME {
                retired.push(p.state.local_index);
                self.pending = None;
                self.stats.dropped_staged += self.staged.len() as u64;
                self.staged.clear();
                self.data_sent_unanswered = None;
            } else if now >= p.retry_at {
                out.push(PeerAction::Handshake);
            }
        }
        // Sessions past REJECT_AFTER_TIME are useless.
        for slot in [&mut self.current, &mut self.previous, &mut self.next] {
            if slot.as_ref().is_some_and(|s| !s.can_receive(now)) {
                retired.push(slot.take().expect("checked").local_index);
            }
        }
        // Erase everything after 3 × REJECT_AFTER_TIME without a new session.
        if self
            .last_session_at
            .is_some_and(|t| now.saturating_sub(t) >= 3 * REJECT_AFTER_TIME)
        {
            for slot in [&mut self.current, &mut self.previous, &mut self.next] {
                if let Some(s) = slot.take() {
                    retired.push(s.local_index);
                }
            }
            self.last_session_at = None;
        }
        let usable = self.current.as_ref().is_some_and(|s| s.can_send(now));
        // Data sent and nothing heard back: the path or the session is gone; new handshake.
        if let Some(t) = self.data_sent_unanswered {
            if now.saturating_sub(t) >= KEEPALIVE_TIMEOUT + REKEY_TIMEOUT && self.pending.is_none()
            {
                self.data_sent_unanswered = None;
                out.push(PeerAction::Handshake);
            }
        }
        // Data received and nothing sent back: a keepalive tells the peer we are alive.
        if let Some(t) = self.data_received_unanswered {
            if now.saturating_sub(t) >= KEEPALIVE_TIMEOUT && usable {
                self.send_keepalive(now, mtu, out);
            }
        }
        if let Some(interval) = self.persistent_keepalive {
            let idle = self
                .last_sent
                .is_none_or(|t| now.saturating_sub(t) >= interval);
            if idle && usable && self.endpoint.is_some() {
                self.send_keepalive(now, mtu, out);
            } else if idle
                && self.current.is_none()
                && self.pending.is_none()
                && self.endpoint.is_some()
            {
                out.push(PeerAction::Handshake);
            }
        }
    }

    pub fn send_keepalive(&mut self, now: Duration, mtu: usize, out: &mut Vec<PeerAction>) {
        if let Some(s) = self.current.as_mut().filter(|s| s.can_send(now)) {
            let datagram = s.seal(&[], mtu);
            self.stats.tx_bytes += datagram.len() as u64;
            self.note_sent(now, false);
            out.push(PeerAction::Send(datagram));
        }
    }
}
