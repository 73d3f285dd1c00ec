//! The sans-IO device on a simulated network and clock: handshakes, data, the timers of the
//! paper's section 6, replay and tamper protection, cookies under load, roaming and
//! cryptokey routing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use continuum_overlay::device::{Device, Drop, Output, PeerConfig};
use continuum_overlay::peer::{
    REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, RELAY_AFTER,
};
use proptest::prelude::*;

const WALL0: Duration = Duration::from_secs(1_800_000_000);
const TICK: Duration = Duration::from_millis(100);

fn addr(i: usize) -> SocketAddr {
    format!("192.0.2.{}:51820", i + 1).parse().unwrap()
}

fn inner_ip(i: usize) -> [u8; 4] {
    [10, 0, 0, i as u8 + 1]
}

/// A minimal IPv4 packet from `src` to `dst` with `payload` (the core reads only addresses
/// and the total length).
fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    let len = (20 + payload.len()) as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

struct Net {
    devs: Vec<Device>,
    addrs: Vec<SocketAddr>,
    now: Duration,
    queue: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    delivered: Vec<Vec<Vec<u8>>>,
    /// Every datagram sent, (from, to, bytes).
    sent: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Datagrams to these addresses are lost.
    black_holes: Vec<SocketAddr>,
    /// Datagrams between these two addresses (either way) are lost.
    cut: Vec<(SocketAddr, SocketAddr)>,
}

impl Net {
    /// `n` devices, each a peer of every other (full mesh), inner addresses 10.0.0.i+1/32.
    fn mesh(n: usize) -> Net {
        let mut devs: Vec<Device> = (0..n)
            .map(|i| Device::new([i as u8 + 1; 32], 100 + i as u64))
            .collect();
        let keys: Vec<[u8; 32]> = devs.iter().map(Device::public_key).collect();
        for (i, d) in devs.iter_mut().enumerate() {
            for (j, k) in keys.iter().enumerate().filter(|(j, _)| *j != i) {
                d.set_peer(PeerConfig {
                    public_key: *k,
                    preshared_key: None,
                    endpoint: Some(addr(j)),
                    allowed_ips: vec![format!("10.0.0.{}/32", j + 1).parse().unwrap()],
                    persistent_keepalive: None,
                });
            }
        }
        Net {
            devs,
            addrs: (0..n).map(addr).collect(),
            now: Duration::from_secs(1),
            queue: VecDeque::new(),
            delivered: vec![Vec::new(); n],
            sent: Vec::new(),
            black_holes: Vec::new(),
            cut: Vec::new(),
        }
    }

    fn wall(&self) -> Duration {
        WALL0 + self.now
    }

    fn collect(&mut self, i: usize, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Send { to, datagram } => {
                    self.sent.push((self.addrs[i], to, datagram.clone()));
                    self.queue.push_back((self.addrs[i], to, datagram));
                }
                Output::Deliver(p) => self.delivered[i].push(p),
            }
        }
    }

    fn send(&mut self, i: usize, packet: &[u8]) {
        let mut out = Vec::new();
        let (now, wall) = (self.now, self.wall());
        self.devs[i].send_packet(now, wall, packet, &mut out);
        self.collect(i, out);
    }

    /// Delivers one datagram (from, to) as it is.
    fn inject(&mut self, from: SocketAddr, to: SocketAddr, mut d: Vec<u8>) {
        let Some(i) = self.addrs.iter().position(|a| *a == to) else {
            return;
        };
        let mut out = Vec::new();
        let (now, wall) = (self.now, self.wall());
        self.devs[i].receive(now, wall, from, &mut d, &mut out);
        self.collect(i, out);
    }

    /// Delivers everything in flight (and what that causes).
    fn run(&mut self) {
        while let Some((from, to, d)) = self.queue.pop_front() {
            let cut = self
                .cut
                .iter()
                .any(|&(a, b)| (a, b) == (from, to) || (b, a) == (from, to));
            if self.black_holes.contains(&to) || cut {
                continue;
            }
            self.inject(from, to, d);
        }
    }

    /// Lets `d` of virtual time pass in ticks, delivering as it goes.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += TICK;
            for i in 0..self.devs.len() {
                let mut out = Vec::new();
                let (now, wall) = (self.now, self.wall());
                self.devs[i].tick(now, wall, &mut out);
                self.collect(i, out);
            }
            self.run();
        }
    }

    fn packet(&self, from: usize, to: usize, payload: &[u8]) -> Vec<u8> {
        ipv4(inner_ip(from), inner_ip(to), payload)
    }

    fn count_sent(&self, from: usize, kind: u8) -> usize {
        self.sent
            .iter()
            .filter(|(f, _, d)| *f == self.addrs[from] && d[0] == kind)
            .count()
    }

    fn drops(&self, i: usize, why: Drop) -> u64 {
        self.devs[i].drops.get(&why).copied().unwrap_or(0)
    }

    fn handshakes(&self, i: usize) -> u64 {
        self.devs[i].peers().map(|(p, _)| p.stats.handshakes).sum()
    }
}

#[test]
fn a_handshake_carries_staged_and_later_packets_both_ways() {
    let mut net = Net::mesh(2);
    let p = net.packet(0, 1, b"hello");
    net.send(0, &p);
    assert_eq!(net.count_sent(0, 1), 1, "an initiation, the packet staged");
    net.run();
    assert_eq!(
        net.delivered[1],
        vec![p.clone()],
        "staged packet sent after the response"
    );
    let back = net.packet(1, 0, b"hi there, a longer reply");
    net.send(1, &back);
    net.run();
    assert_eq!(net.delivered[0], vec![back]);
    assert_eq!((net.handshakes(0), net.handshakes(1)), (1, 1));
    // Padding to 16 bytes is stripped by the IP length.
    let odd = net.packet(0, 1, b"xyz");
    net.send(0, &odd);
    net.run();
    assert_eq!(net.delivered[1].last(), Some(&odd));
}

#[test]
fn a_replayed_or_tampered_data_packet_is_dropped() {
    let mut net = Net::mesh(2);
    net.send(0, &net.packet(0, 1, b"one"));
    net.run();
    let p = net.packet(0, 1, b"two");
    net.send(0, &p);
    let (from, to, d) = net.queue.pop_front().unwrap();
    net.inject(from, to, d.clone());
    net.inject(from, to, d.clone());
    assert_eq!(
        net.delivered[1].iter().filter(|x| **x == p).count(),
        1,
        "delivered once"
    );
    assert_eq!(net.drops(1, Drop::Data), 1, "the replay");
    let mut bad = d;
    let last = bad.len() - 1;
    bad[last] ^= 0x80;
    bad[8] = 99; // a fresh counter, so only the tag can refuse it
    net.inject(from, to, bad);
    assert_eq!(net.drops(1, Drop::Data), 2, "the bad tag");
}

#[test]
fn an_initiation_from_an_unknown_key_is_ignored() {
    let mut net = Net::mesh(2);
    let mut stranger = Device::new([77; 32], 7);
    stranger.set_peer(PeerConfig {
        public_key: net.devs[1].public_key(),
        preshared_key: None,
        endpoint: Some(addr(1)),
        allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
        persistent_keepalive: None,
    });
    let mut out = Vec::new();
    stranger.send_packet(
        net.now,
        net.wall(),
        &ipv4([10, 9, 9, 9], inner_ip(1), b"let me in"),
        &mut out,
    );
    let Some(Output::Send { datagram, .. }) = out.pop() else {
        panic!("an initiation")
    };
    let before = net.sent.len();
    net.inject("198.51.100.1:4000".parse().unwrap(), addr(1), datagram);
    assert_eq!(net.sent.len(), before, "no response");
    assert_eq!(net.drops(1, Drop::UnknownPeer), 1);
}

#[test]
fn the_initiator_rekeys_after_rekey_after_time_and_old_sessions_expire() {
    let mut net = Net::mesh(2);
    net.send(0, &net.packet(0, 1, b"start"));
    net.run();
    // Traffic every second for a little over REKEY_AFTER_TIME.
    let mut t = Duration::ZERO;
    while t < REKEY_AFTER_TIME + Duration::from_secs(5) {
        net.send(0, &net.packet(0, 1, b"tick"));
        net.advance(Duration::from_secs(1));
        t += Duration::from_secs(1);
    }
    assert_eq!(net.handshakes(0), 2, "one rekey after {REKEY_AFTER_TIME:?}");
    assert_eq!(net.count_sent(0, 1), 2, "the initiator (0) started both");
    let got = net.delivered[1].len();
    assert!(got >= 125, "every packet delivered across the rekey: {got}");
    // Silence past REJECT_AFTER_TIME: nothing is sent with expired keys; sending again
    // starts a fresh handshake.
    net.advance(REJECT_AFTER_TIME + Duration::from_secs(1));
    let before = net.count_sent(0, 1);
    net.send(0, &net.packet(0, 1, b"again"));
    assert_eq!(
        net.count_sent(0, 1),
        before + 1,
        "expired session: a new handshake"
    );
    net.run();
    assert_eq!(
        net.delivered[1].last().unwrap(),
        &net.packet(0, 1, b"again")
    );
}

#[test]
fn an_unanswered_initiation_is_retried_then_given_up() {
    let mut net = Net::mesh(2);
    net.black_holes.push(addr(1));
    net.send(0, &net.packet(0, 1, b"anyone?"));
    net.advance(REKEY_ATTEMPT_TIME + Duration::from_secs(10));
    let tries = net.count_sent(0, 1);
    // One every REKEY_TIMEOUT (+ up to 333 ms of jitter) for REKEY_ATTEMPT_TIME.
    let most = (REKEY_ATTEMPT_TIME.as_secs() / REKEY_TIMEOUT.as_secs()) as usize + 1;
    assert!((most - 3..=most).contains(&tries), "{tries} initiations");
    net.advance(Duration::from_secs(60));
    assert_eq!(net.count_sent(0, 1), tries, "given up");
    let stats = &net.devs[0].peers().next().unwrap().0.stats;
    assert_eq!(stats.dropped_staged, 1, "the staged packet was dropped");
    // The path comes back: the next packet goes through.
    net.black_holes.clear();
    let p = net.packet(0, 1, b"back");
    net.send(0, &p);
    net.run();
    assert_eq!(net.delivered[1], vec![p]);
}

#[test]
fn a_peer_that_only_receives_sends_a_keepalive() {
    let mut net = Net::mesh(2);
    net.send(0, &net.packet(0, 1, b"data"));
    net.run();
    let before = net
        .sent
        .iter()
        .filter(|(f, _, d)| *f == addr(1) && d[0] == 4 && d.len() == 32)
        .count();
    net.advance(Duration::from_secs(11));
    let after = net
        .sent
        .iter()
        .filter(|(f, _, d)| *f == addr(1) && d[0] == 4 && d.len() == 32)
        .count();
    assert_eq!(after, before + 1, "one keepalive from the receiver");
    assert!(net.delivered[0].is_empty(), "keepalives deliver nothing");
}

#[test]
fn under_load_the_responder_demands_a_cookie_and_the_initiator_proves_its_address() {
    let mut net = Net::mesh(2);
    net.devs[1].load_threshold = 0; // every handshake counts as under load
    net.send(0, &net.packet(0, 1, b"busy?"));
    net.run();
    assert_eq!(
        net.drops(1, Drop::CookieDemanded),
        1,
        "first initiation answered with a cookie"
    );
    assert_eq!(net.count_sent(1, 3), 1, "a cookie reply");
    assert_eq!(net.handshakes(1), 0, "no handshake work done");
    // The retry carries mac2 and is accepted.
    net.advance(REKEY_TIMEOUT + Duration::from_secs(1));
    assert_eq!(net.handshakes(1), 1);
    assert_eq!(net.delivered[1].len(), 1);
    // An initiation from another address with the same (copied) mac2 is refused.
    let init = net
        .sent
        .iter()
        .rev()
        .find(|(f, _, d)| *f == addr(0) && d[0] == 1)
        .unwrap()
        .2
        .clone();
    net.inject("203.0.113.9:9".parse().unwrap(), addr(1), init);
    assert_eq!(net.drops(1, Drop::CookieDemanded), 2);
}

#[test]
fn the_endpoint_follows_authenticated_packets() {
    let mut net = Net::mesh(2);
    net.send(0, &net.packet(0, 1, b"x"));
    net.run();
    // Device 0 moves to a new address.
    let moved: SocketAddr = "198.51.100.7:6000".parse().unwrap();
    net.addrs[0] = moved;
    net.send(0, &net.packet(0, 1, b"from the new place"));
    net.run();
    net.send(1, &net.packet(1, 0, b"reply"));
    let (_, to, _) = net.queue.back().unwrap().clone();
    assert_eq!(to, moved, "the reply goes to the roamed endpoint");
    net.run();
    assert_eq!(net.delivered[0].len(), 1);
    // An unauthenticated packet from elsewhere does not move it.
    let mut junk = vec![4u8, 0, 0, 0];
    junk.extend_from_slice(&[0u8; 40]);
    net.inject("192.0.2.200:1".parse().unwrap(), addr(1), junk);
    net.send(1, &net.packet(1, 0, b"still there"));
    assert_eq!(net.queue.back().unwrap().1, moved);
}

#[test]
fn a_changed_configured_endpoint_applies_only_while_no_session_is_up() {
    let mut net = Net::mesh(2);
    let key1 = net.devs[1].public_key();
    let cfg = |endpoint: &str| PeerConfig {
        public_key: key1,
        preshared_key: None,
        endpoint: Some(endpoint.parse().unwrap()),
        allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
        persistent_keepalive: None,
    };
    let endpoint_of_1 = |net: &Net| net.devs[0].peers().next().unwrap().0.endpoint;
    // No session yet: a new configured endpoint (a new NAT mapping) replaces the old one, and
    // re-applying it changes nothing.
    net.devs[0].set_peer(cfg("198.51.100.1:1000"));
    assert_eq!(
        endpoint_of_1(&net),
        Some("198.51.100.1:1000".parse().unwrap())
    );
    net.devs[0].set_peer(cfg(&addr(1).to_string()));
    assert_eq!(endpoint_of_1(&net), Some(addr(1)));
    // With a session up, the endpoint that works stays, whatever the config says.
    net.send(0, &net.packet(0, 1, b"x"));
    net.run();
    assert_eq!(net.delivered[1].len(), 1);
    net.devs[0].set_peer(cfg("198.51.100.2:2000"));
    assert_eq!(endpoint_of_1(&net), Some(addr(1)));
    net.send(0, &net.packet(0, 1, b"y"));
    net.run();
    assert_eq!(net.delivered[1].len(), 2);
}

#[test]
fn cryptokey_routing_drops_packets_from_addresses_a_peer_does_not_own() {
    let mut net = Net::mesh(3);
    // Device 0 routes 10.0.0.2 to device 1 but claims the source of device 2.
    let spoofed = ipv4(inner_ip(2), inner_ip(1), b"spoof");
    net.send(0, &spoofed);
    net.run();
    assert!(net.delivered[1].is_empty());
    assert_eq!(net.drops(1, Drop::NotAllowedSource), 1);
    // No route: dropped at the sender.
    net.send(0, &ipv4(inner_ip(0), [10, 9, 9, 9], b"nowhere"));
    assert_eq!(net.drops(0, Drop::NoRoute), 1);
}

/// Two peers whose direct path is cut talk through a third that relays (a cloud site's
/// daemon); when the direct path works again, it replaces the relay.
#[test]
fn peers_that_cannot_reach_each_other_talk_through_a_relay_until_a_direct_path_works() {
    let mut net = Net::mesh(3);
    net.devs[1].forwarding = true;
    let relay = net.devs[1].public_key();
    net.devs[0].set_relay(&relay, true);
    net.devs[2].set_relay(&relay, true);
    net.cut.push((addr(0), addr(2)));
    // 0 → 2: direct handshakes fail; after RELAY_AFTER the traffic takes the relay.
    let first = net.packet(0, 2, b"staged for the direct path");
    net.send(0, &first);
    net.advance(RELAY_AFTER + 2 * TICK);
    assert!(net.delivered[2].is_empty());
    let p = net.packet(0, 2, b"through the relay");
    net.send(0, &p);
    net.advance(Duration::from_secs(1));
    assert_eq!(net.delivered[2], vec![p], "relayed to 2");
    assert!(net.delivered[1].is_empty(), "the relay keeps nothing");
    assert_eq!((net.devs[0].relayed, net.devs[1].forwarded), (1, 1));
    // 2 → 0 finds the same: its own direct attempt fails first.
    net.send(2, &net.packet(2, 0, b"staged"));
    net.advance(RELAY_AFTER + 2 * TICK);
    let back = net.packet(2, 0, b"reply through the relay");
    net.send(2, &back);
    net.advance(Duration::from_secs(1));
    assert_eq!(net.delivered[0], vec![back]);
    assert_eq!(net.devs[1].forwarded, 2);
    assert_eq!(net.drops(0, Drop::NotAllowedSource), 0);
    // The direct path heals: the next relayed packet retries it, and once a direct session
    // exists the relay is out of the path.
    net.cut.clear();
    net.advance(REKEY_ATTEMPT_TIME);
    let p = net.packet(0, 2, b"retry");
    net.send(0, &p);
    net.advance(Duration::from_secs(1));
    let forwarded = net.devs[1].forwarded;
    let direct = net.packet(0, 2, b"direct again");
    net.send(0, &direct);
    net.run();
    assert_eq!(net.delivered[2].last(), Some(&direct));
    assert_eq!(net.devs[1].forwarded, forwarded, "not through the relay");
}

/// Only a peer marked as a relay may send packets with other peers' sources.
#[test]
fn a_peer_that_is_not_a_relay_cannot_speak_for_others() {
    let mut net = Net::mesh(3);
    // 1 sends 0 a packet with 2's source address.
    let forged = ipv4(inner_ip(2), inner_ip(0), b"from 2, says 1");
    net.send(1, &forged);
    net.run();
    assert!(net.delivered[0].is_empty());
    assert_eq!(net.drops(0, Drop::NotAllowedSource), 1);
    // Once 0 takes 1 for a relay, 1 may carry 2's packets.
    let relay = net.devs[1].public_key();
    net.devs[0].set_relay(&relay, true);
    net.send(1, &forged);
    net.run();
    assert_eq!(net.delivered[0], vec![forged]);
}

proptest! {
    /// Random datagrams (and mutations of real ones) never panic and never deliver.
    #[test]
    fn random_datagrams_are_dropped_without_panicking(
        junk in proptest::collection::vec(any::<u8>(), 0..200),
        flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..4),
        kind in 0usize..3,
    ) {
        let mut net = Net::mesh(2);
        net.send(0, &net.packet(0, 1, b"warm up"));
        net.run();
        let delivered = net.delivered[1].len();
        let mut d = match kind {
            0 => junk,
            _ => {
                // A real message of some type, mutated.
                let real: Vec<_> = net.sent.iter().filter(|(f, _, _)| *f == addr(0)).map(|x| x.2.clone()).collect();
                real[kind % real.len()].clone()
            }
        };
        for (at, x) in flips {
            if !d.is_empty() {
                let n = d.len();
                d[at % n] ^= x | 1;
            }
        }
        net.inject(addr(0), addr(1), d);
        net.run();
        prop_assert_eq!(net.delivered[1].len(), delivered);
    }
}
