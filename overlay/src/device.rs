//! The overlay's sans-IO device: every peer, the index table that routes incoming messages to
//! them, cryptokey routing (allowed IPs) for outgoing and incoming IP packets, the cookie
//! checker and the load estimate that decides when cookies are demanded.
//!
//! The driver (`crate::driver`) owns sockets and the TUN device; it hands this core
//! datagrams, IP packets and ticks with the time (`now`: monotonic, `wall`: since the Unix
//! epoch), and sends or delivers what the core returns in [`Output`]s. Randomness comes from
//! the seeded RNG given at construction, so tests replay exactly.
//!
//! Invariants:
//! - An IP packet received from a peer is delivered only if its source address is in that
//!   peer's allowed IPs (cryptokey routing); an outgoing packet goes to the peer whose
//!   allowed IPs hold its destination, longest prefix first.
//! - A peer's endpoint changes only on an authenticated message (roaming).
//! - Handshake messages that fail mac1 are dropped before any other work; under load, those
//!   without a valid mac2 get a cookie reply and nothing else.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::cookie::CookieChecker;
use crate::messages::{self, parse, Packet, INITIATION_MAC1, RESPONSE_MAC1};
use crate::noise::{self, check_mac1, HandshakeError, Identity, PeerKey};
use crate::peer::{
    Peer, PeerAction, Pending, Session, MIN_INITIATION_INTERVAL, REKEY_JITTER_MS, REKEY_TIMEOUT,
};

/// Default inner MTU (WireGuard's: 1500 minus the worst-case IPv6 + UDP + WireGuard overhead).
pub const DEFAULT_MTU: usize = 1420;
/// Handshake messages per second above which the device counts as under load.
pub const DEFAULT_LOAD_THRESHOLD: u32 = 128;

/// What the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Send a datagram.
    Send { to: SocketAddr, datagram: Vec<u8> },
    /// Deliver a decrypted IP packet to the local network (TUN or userspace stack).
    Deliver(Vec<u8>),
}

/// Why a datagram was dropped (counted; never an error to anyone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    Malformed,
    BadMac1,
    UnknownIndex,
    UnknownPeer,
    Handshake,
    ReplayedInitiation,
    InitiationFlood,
    CookieDemanded,
    BadCookie,
    Data,
    NotAllowedSource,
    NoRoute,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<Duration>,
}

#[derive(Debug)]
pub struct Device {
    identity: Identity,
    cookies: CookieChecker,
    peers: Vec<Peer>,
    allowed: Vec<Vec<IpNet>>,
    by_key: HashMap<[u8; 32], usize>,
    by_index: HashMap<u32, usize>,
    /// Routes: (net, peer), longest prefix first.
    routes: Vec<(IpNet, usize)>,
    rng: StdRng,
    pub mtu: usize,
    pub load_threshold: u32,
    load_window: (Duration, u32),
    /// Under load until this time.
    under_load_until: Duration,
    pub drops: HashMap<Drop, u64>,
    /// Relay for peers that cannot reach each other (a cloud site's daemon): a packet from one
    /// peer whose destination another peer routes is sent on to it.
    pub forwarding: bool,
    /// Packets this device sent through a relay, and packets it relayed for others.
    pub relayed: u64,
    pub forwarded: u64,
}

impl Device {
    pub fn new(private_key: [u8; 32], seed: u64) -> Self {
        let identity = Identity::new(StaticSecret::from(private_key));
        Self {
            cookies: CookieChecker::new(&identity),
            identity,
            peers: Vec::new(),
            allowed: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            mtu: DEFAULT_MTU,
            load_threshold: DEFAULT_LOAD_THRESHOLD,
            load_window: (Duration::ZERO, 0),
            under_load_until: Duration::ZERO,
            drops: HashMap::new(),
            forwarding: false,
            relayed: 0,
            forwarded: 0,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.identity.public.as_bytes()
    }

    pub fn peers(&self) -> impl Iterator<Item = (&Peer, &[IpNet])> {
        self.peers
            .iter()
            .zip(self.allowed.iter().map(Vec::as_slice))
    }

    /// Adds a peer, or updates one with the same key (its sessions survive, and so does an
    /// endpoint learned by roaming unless the configured endpoint changed while no session
    /// is up).
    pub fn set_peer(&mut self, cfg: PeerConfig) {
        let public = PublicKey::from(cfg.public_key);
        let i = match self.by_key.get(&cfg.public_key) {
            Some(&i) => {
                let p = &mut self.peers[i];
                if p.key.psk != cfg.preshared_key.unwrap_or([0; 32]) {
                    p.key = PeerKey::new(&self.identity, public, cfg.preshared_key);
                }
                // Re-applying the same configuration never undoes roaming; a configured
                // endpoint that changed (a NATed peer observed at a new mapping) applies
                // unless a session is up (its endpoint is known to work).
                let changed = cfg.endpoint != p.configured_endpoint && p.current.is_none();
                if cfg.endpoint.is_some() && (p.endpoint.is_none() || changed) {
                    p.endpoint = cfg.endpoint;
                    p.configured_endpoint = cfg.endpoint;
                }
                p.persistent_keepalive = cfg.persistent_keepalive;
                i
            }
            None => {
                let key = PeerKey::new(&self.identity, public, cfg.preshared_key);
                self.peers
                    .push(Peer::new(key, cfg.endpoint, cfg.persistent_keepalive));
                self.allowed.push(Vec::new());
                self.by_key.insert(cfg.public_key, self.peers.len() - 1);
                self.peers.len() - 1
            }
        };
        self.allowed[i] = cfg.allowed_ips.iter().map(IpNet::trunc).collect();
        self.rebuild_routes();
    }

    /// Marks a peer as a relay (or not): see [`Peer::relay`].
    pub fn set_relay(&mut self, public_key: &[u8; 32], relay: bool) {
        if let Some(&i) = self.by_key.get(public_key) {
            self.peers[i].relay = relay;
        }
    }

    /// The peer to send a packet for peer `i` through: `i` itself, or a relay while `i` cannot
    /// be reached directly (a relay with a session first). A relay never relays through
    /// another.
    fn via(&self, i: usize, now: Duration) -> usize {
        if self.forwarding || !self.peers[i].wants_relay(now) {
            return i;
        }
        let relays = || {
            self.peers
                .iter()
                .enumerate()
                .filter(move |(j, p)| *j != i && p.relay && p.endpoint.is_some())
        };
        relays()
            .find(|(_, p)| p.can_send_now(now))
            .or_else(|| relays().next())
            .map_or(i, |(j, _)| j)
    }

    /// Removes a peer (its sessions end).
    pub fn remove_peer(&mut self, public_key: &[u8; 32]) {
        let Some(i) = self.by_key.remove(public_key) else {
            return;
        };
        self.peers.remove(i);
        self.allowed.remove(i);
        self.by_key = self
            .peers
            .iter()
            .enumerate()
            .map(|(j, p)| (*p.key.public.as_bytes(), j))
            .collect();
        self.by_index = self
            .peers
            .iter()
            .enumerate()
            .flat_map(|(j, p)| p.indices().into_iter().map(move |x| (x, j)))
            .collect();
        self.rebuild_routes();
    }

    fn rebuild_routes(&mut self) {
        self.routes = self
            .allowed
            .iter()
            .enumerate()
            .flat_map(|(i, nets)| nets.iter().map(move |n| (*n, i)))
            .collect();
        self.routes
            .sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
    }

    fn route(&self, dst: IpAddr) -> Option<usize> {
        self.routes
            .iter()
            .find(|(n, _)| n.contains(&dst))
            .map(|(_, i)| *i)
    }

    fn note_drop(&mut self, why: Drop) {
        *self.drops.entry(why).or_default() += 1;
    }

    fn new_index(&mut self, peer: usize) -> u32 {
        loop {
            let i = self.rng.next_u32();
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_index.entry(i) {
                e.insert(peer);
                return i;
            }
        }
    }

    fn retire(&mut self, indices: Vec<u32>) {
        for i in indices {
            self.by_index.remove(&i);
        }
    }

    fn ephemeral(&mut self) -> StaticSecret {
        let mut b = [0u8; 32];
        self.rng.fill_bytes(&mut b);
        StaticSecret::from(b)
    }

    /// Starts (or restarts) a handshake with peer `i`.
    fn initiate(&mut self, i: usize, now: Duration, wall: Duration, out: &mut Vec<Output>) {
        let Some(endpoint) = self.peers[i].endpoint else {
            return;
        };
        let index = self.new_index(i);
        let eph = self.ephemeral();
        let jitter = Duration::from_millis(self.rng.gen_range(0..=REKEY_JITTER_MS));
        let p = &self.peers[i];
        let cookie = p.cookie.current(now).copied();
        let Ok((msg, state)) = noise::create_initiation(
            &self.identity,
            &p.key,
            index,
            eph,
            noise::tai64n(wall),
            cookie.as_ref(),
        ) else {
            self.by_index.remove(&index);
            self.note_drop(Drop::Handshake);
            return;
        };
        let p = &mut self.peers[i];
        let first_at = p.pending.as_ref().map_or(now, |old| old.first_at);
        if let Some(old) = p.pending.replace(Pending {
            state,
            sent_at: now,
            first_at,
            retry_at: now + REKEY_TIMEOUT + jitter,
        }) {
            self.by_index.remove(&old.state.local_index);
        }
        let p = &mut self.peers[i];
        p.last_sent = Some(now);
        out.push(Output::Send {
            to: endpoint,
            datagram: msg.to_vec(),
        });
    }

    fn run_actions(
        &mut self,
        i: usize,
        actions: Vec<PeerAction>,
        now: Duration,
        wall: Duration,
        out: &mut Vec<Output>,
    ) {
        for a in actions {
            match a {
                PeerAction::Handshake => self.initiate(i, now, wall, out),
                PeerAction::Send(datagram) => {
                    if let Some(to) = self.peers[i].endpoint {
                        out.push(Output::Send { to, datagram });
                    }
                }
            }
        }
    }

    /// An IP packet from the local network: encrypt it for the peer that routes it.
    pub fn send_packet(
        &mut self,
        now: Duration,
        wall: Duration,
        packet: &[u8],
        out: &mut Vec<Output>,
    ) {
        let Some(dst) = ip_destination(packet) else {
            self.note_drop(Drop::Malformed);
            return;
        };
        let Some(i) = self.route(dst) else {
            self.note_drop(Drop::NoRoute);
            return;
        };
        self.send_to_peer(i, now, wall, packet, out);
    }

    fn send_to_peer(
        &mut self,
        i: usize,
        now: Duration,
        wall: Duration,
        packet: &[u8],
        out: &mut Vec<Output>,
    ) {
        let via = self.via(i, now);
        if via != i {
            self.relayed += 1;
            // Direct handshakes go on meanwhile (a working path replaces the relay), but
            // the packet itself is not staged for them.
            if self.peers[i].pending.is_none() && self.peers[i].endpoint.is_some() {
                self.initiate(i, now, wall, out);
            }
        }
        let mut actions = Vec::new();
        self.peers[via].send_packet(now, packet, self.mtu, &mut actions);
        self.run_actions(via, actions, now, wall, out);
    }

    /// Timers of every peer.
    pub fn tick(&mut self, now: Duration, wall: Duration, out: &mut Vec<Output>) {
        for i in 0..self.peers.len() {
            let mut actions = Vec::new();
            let mut retired = Vec::new();
            self.peers[i].tick(now, self.mtu, &mut actions, &mut retired);
            self.retire(retired);
            self.run_actions(i, actions, now, wall, out);
        }
    }

    fn note_handshake_load(&mut self, now: Duration) -> bool {
        let (start, count) = &mut self.load_window;
        if now.saturating_sub(*start) >= Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        *count += 1;
        if *count > self.load_threshold {
            // Stay under load a second after the flood ends (as wireguard-go does).
            self.under_load_until = now + Duration::from_secs(1);
        }
        now < self.under_load_until
    }

    /// A datagram from the network.
    pub fn receive(
        &mut self,
        now: Duration,
        wall: Duration,
        src: SocketAddr,
        datagram: &mut [u8],
        out: &mut Vec<Output>,
    ) {
        let kind = match parse(datagram) {
            Ok(Packet::Data(d)) => Some((d.receiver, d.counter)),
            Ok(_) => None,
            Err(_) => {
                self.note_drop(Drop::Malformed);
                return;
            }
        };
        if let Some((receiver, counter)) = kind {
            self.receive_data(now, wall, src, receiver, counter, datagram, out);
            return;
        }
        match parse(datagram).expect("parsed above") {
            Packet::Initiation(m) => self.receive_initiation(now, wall, src, &m, out),
            Packet::Response(m) => self.receive_response(now, wall, src, &m, out),
            Packet::CookieReply(m) => {
                let Some(&i) = self.by_index.get(&m.receiver) else {
                    self.note_drop(Drop::UnknownIndex);
                    return;
                };
                let p = &mut self.peers[i];
                let Some(pending) = &p.pending else {
                    self.note_drop(Drop::BadCookie);
                    return;
                };
                let mac1 = pending.state.mac1;
                let key = p.key.cookie_key;
                if p.cookie.consume(now, &m, &key, &mac1).is_err() {
                    self.note_drop(Drop::BadCookie);
                }
                // The retry timer resends the initiation, now with mac2.
            }
            Packet::Data(_) => unreachable!("handled above"),
        }
    }

    /// mac1, then (under load) mac2: whether to go on with a handshake message.
    #[allow(clippy::too_many_arguments)]
    fn admit_handshake(
        &mut self,
        now: Duration,
        src: SocketAddr,
        raw: &[u8],
        mac1_at: usize,
        sender: u32,
        mac1: &[u8; 16],
        out: &mut Vec<Output>,
    ) -> bool {
        if !check_mac1(raw, mac1_at, &self.identity.mac1_key) {
            self.note_drop(Drop::BadMac1);
            return false;
        }
        if self.note_handshake_load(now)
            && !self
                .cookies
                .check_mac2(now, raw, mac1_at, &src, &mut self.rng)
        {
            let reply = self.cookies.reply(now, sender, mac1, &src, &mut self.rng);
            out.push(Output::Send {
                to: src,
                datagram: reply.to_vec(),
            });
            self.note_drop(Drop::CookieDemanded);
            return false;
        }
        true
    }

    fn receive_initiation(
        &mut self,
        now: Duration,
        wall: Duration,
        src: SocketAddr,
        m: &messages::Initiation<'_>,
        out: &mut Vec<Output>,
    ) {
        if !self.admit_handshake(now, src, m.raw, INITIATION_MAC1, m.sender, m.mac1, out) {
            return;
        }
        let by_key = &self.by_key;
        let peers = &self.peers;
        let consumed = noise::consume_initiation(&self.identity, m, |k| {
            by_key.get(k.as_bytes()).map(|&i| &peers[i].key)
        });
        let (init, _) = match consumed {
            Ok(x) => x,
            Err(HandshakeError::UnknownPeer) => {
                self.note_drop(Drop::UnknownPeer);
                return;
            }
            Err(_) => {
                self.note_drop(Drop::Handshake);
                return;
            }
        };
        let i = self.by_key[init.peer.as_bytes()];
        let p = &self.peers[i];
        if let Some((ts, at)) = &p.last_initiation {
            if init.timestamp <= *ts {
                self.note_drop(Drop::ReplayedInitiation);
                return;
            }
            if now.saturating_sub(*at) < MIN_INITIATION_INTERVAL {
                self.note_drop(Drop::InitiationFlood);
                return;
            }
        }
        let index = self.new_index(i);
        let eph = self.ephemeral();
        let p = &self.peers[i];
        let cookie = p.cookie.current(now).copied();
        let Ok((resp, keys)) = noise::create_response(&init, &p.key, index, eph, cookie.as_ref())
        else {
            self.by_index.remove(&index);
            self.note_drop(Drop::Handshake);
            return;
        };
        let p = &mut self.peers[i];
        p.last_initiation = Some((init.timestamp, now));
        p.endpoint = Some(src);
        p.last_received = Some(now);
        let retired = p.install(now, wall, Session::new(&keys, now));
        p.last_sent = Some(now);
        self.retire(retired);
        out.push(Output::Send {
            to: src,
            datagram: resp.to_vec(),
        });
    }

    fn receive_response(
        &mut self,
        now: Duration,
        wall: Duration,
        src: SocketAddr,
        m: &messages::Response<'_>,
        out: &mut Vec<Output>,
    ) {
        if !self.admit_handshake(now, src, m.raw, RESPONSE_MAC1, m.sender, m.mac1, out) {
            return;
        }
        let Some(&i) = self.by_index.get(&m.receiver) else {
            self.note_drop(Drop::UnknownIndex);
            return;
        };
        let p = &self.peers[i];
        let Some(pending) = p
            .pending
            .as_ref()
            .filter(|x| x.state.local_index == m.receiver)
        else {
            self.note_drop(Drop::Handshake);
            return;
        };
        let Ok(keys) = noise::consume_response(&self.identity, &p.key, &pending.state, m) else {
            self.note_drop(Drop::Handshake);
            return;
        };
        let p = &mut self.peers[i];
        p.pending = None;
        p.endpoint = Some(src);
        p.last_received = Some(now);
        let retired = p.install(now, wall, Session::new(&keys, now));
        self.retire(retired);
        // Keep the new session's index (install retired only old ones).
        self.by_index.insert(keys.local_index, i);
        let mut actions = Vec::new();
        let p = &mut self.peers[i];
        if p.staged.is_empty() {
            // Key confirmation: the responder may use the session once it hears from us.
            p.send_keepalive(now, self.mtu, &mut actions);
        } else {
            p.flush_staged(now, self.mtu, &mut actions);
        }
        self.run_actions(i, actions, now, wall, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn receive_data(
        &mut self,
        now: Duration,
        wall: Duration,
        src: SocketAddr,
        receiver: u32,
        counter: u64,
        datagram: &mut [u8],
        out: &mut Vec<Output>,
    ) {
        let Some(&i) = self.by_index.get(&receiver) else {
            self.note_drop(Drop::UnknownIndex);
            return;
        };
        let mut retired = Vec::new();
        let p = &mut self.peers[i];
        let payload = &mut datagram[messages::DATA_HEADER_LEN..];
        let Some(n) = p.receive_data(now, receiver, counter, payload, &mut retired) else {
            self.retire(retired);
            self.note_drop(Drop::Data);
            return;
        };
        self.retire(retired);
        let p = &mut self.peers[i];
        p.endpoint = Some(src); // roaming: authenticated, so the endpoint follows it
        let rekey = p.wants_rekey_on_receive(now);
        let mut actions = Vec::new();
        if !p.staged.is_empty() {
            // A responder's session just got confirmed: what waited can go now.
            p.flush_staged(now, self.mtu, &mut actions);
        }
        if rekey {
            actions.push(PeerAction::Handshake);
        }
        self.run_actions(i, actions, now, wall, out);
        if n == 0 {
            return; // keepalive
        }
        let plain = &datagram[messages::DATA_HEADER_LEN..messages::DATA_HEADER_LEN + n];
        let Some((srcip, len)) = ip_source_and_length(plain) else {
            self.note_drop(Drop::Malformed);
            return;
        };
        if !self.allowed[i].iter().any(|net| net.contains(&srcip)) {
            // A relay sends us the packets of peers that cannot reach us directly.
            let relayed = self.peers[i].relay && self.route(srcip).is_some_and(|x| x != i);
            if !relayed {
                self.note_drop(Drop::NotAllowedSource);
                return;
            }
        } else if self.forwarding {
            // Relaying: a packet for another peer goes on to it (never back where it came from).
            if let Some(j) = ip_destination(plain).and_then(|d| self.route(d)) {
                if j != i {
                    self.forwarded += 1;
                    let packet = plain[..len].to_vec();
                    self.send_to_peer(j, now, wall, &packet, out);
                    return;
                }
            }
        }
        out.push(Output::Deliver(plain[..len].to_vec()));
    }
}

/// The destination address of an IPv4 or IPv6 packet.
pub fn ip_destination(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?)),
        6 if p.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?)),
        _ => None,
    }
}

/// The source address and the real length (padding stripped) of an IP packet.
pub fn ip_source_and_length(p: &[u8]) -> Option<(IpAddr, usize)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let len = u16::from_be_bytes([p[2], p[3]]) as usize;
            (20..=p.len()).contains(&len).then(|| {
                (
                    IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).expect("20 bytes")),
                    len,
                )
            })
        }
        6 if p.len() >= 40 => {
            let len = 40 + u16::from_be_bytes([p[4], p[5]]) as usize;
            (len <= p.len()).then(|| {
                (
                    IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).expect("40 bytes")),
                    len,
                )
            })
        }
        _ => None,
    }
}
