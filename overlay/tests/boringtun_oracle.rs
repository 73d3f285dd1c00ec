//! Interoperability with an independent implementation of the protocol (Cloudflare's
//! boringtun, a test-only dependency): handshakes started from either side, data both ways,
//! keepalives, and a replay refused by both.

use std::net::SocketAddr;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use continuum_overlay::device::{Device, Output, PeerConfig};

const WALL0: Duration = Duration::from_secs(1_800_000_000);

fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

const OURS: [u8; 4] = [10, 1, 0, 1];
const THEIRS: [u8; 4] = [10, 1, 0, 2];

struct Pair {
    ours: Device,
    theirs: Tunn,
    theirs_addr: SocketAddr,
    ours_addr: SocketAddr,
    now: Duration,
}

impl Pair {
    fn new() -> Pair {
        let their_secret = StaticSecret::from([42u8; 32]);
        let their_public = PublicKey::from(&their_secret);
        let mut ours = Device::new([24u8; 32], 1);
        let theirs_addr: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        ours.set_peer(PeerConfig {
            public_key: *their_public.as_bytes(),
            preshared_key: Some([5u8; 32]),
            endpoint: Some(theirs_addr),
            allowed_ips: vec!["10.1.0.2/32".parse().unwrap()],
            persistent_keepalive: None,
        });
        let theirs = Tunn::new(
            their_secret,
            PublicKey::from(ours.public_key()),
            Some([5u8; 32]),
            None,
            7,
            None,
        );
        Pair {
            ours,
            theirs,
            theirs_addr,
            ours_addr: "192.0.2.1:51820".parse().unwrap(),
            now: Duration::from_secs(5),
        }
    }

    fn ours_send(&mut self, packet: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.ours
            .send_packet(self.now, WALL0 + self.now, packet, &mut out);
        sends(out)
    }

    /// A datagram into our device: (datagrams it sends, packets it delivers).
    fn ours_receive(&mut self, mut d: Vec<u8>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut out = Vec::new();
        self.ours.receive(
            self.now,
            WALL0 + self.now,
            self.theirs_addr,
            &mut d,
            &mut out,
        );
        let delivered = out
            .iter()
            .filter_map(|o| match o {
                Output::Deliver(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        (sends(out), delivered)
    }

    /// A datagram into boringtun, then its queue drained: (datagrams, packets).
    fn theirs_receive(&mut self, d: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut net, mut tun) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 2048];
        let src = Some(self.ours_addr.ip());
        let mut input: &[u8] = d;
        loop {
            match self.theirs.decapsulate(src, input, &mut buf) {
                TunnResult::WriteToNetwork(b) => {
                    net.push(b.to_vec());
                    input = &[]; // drain what it queued
                }
                TunnResult::WriteToTunnelV4(b, _) => {
                    tun.push(b.to_vec());
                    break;
                }
                TunnResult::WriteToTunnelV6(b, _) => {
                    tun.push(b.to_vec());
                    break;
                }
                TunnResult::Done => break,
                TunnResult::Err(e) => panic!("boringtun refused: {e:?}"),
            }
        }
        (net, tun)
    }

    fn theirs_send(&mut self, packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        match self.theirs.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(b) => b.to_vec(),
            r => panic!("expected a datagram, got {}", describe(&r)),
        }
    }
}

fn describe(r: &TunnResult<'_>) -> &'static str {
    match r {
        TunnResult::Done => "done",
        TunnResult::Err(_) => "error",
        TunnResult::WriteToNetwork(_) => "network",
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => "tunnel",
    }
}

fn sends(out: Vec<Output>) -> Vec<Vec<u8>> {
    out.into_iter()
        .filter_map(|o| match o {
            Output::Send { datagram, .. } => Some(datagram),
            _ => None,
        })
        .collect()
}

#[test]
fn our_initiation_is_answered_by_boringtun_and_data_flows_both_ways() {
    let mut p = Pair::new();
    let hello = ipv4(OURS, THEIRS, b"hello from continuum");
    let init = p.ours_send(&hello);
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].len(), 148);
    let (resp, _) = p.theirs_receive(&init[0]);
    assert_eq!(resp.len(), 1, "boringtun answers");
    assert_eq!(resp[0].len(), 92);
    let (data, _) = p.ours_receive(resp[0].clone());
    assert_eq!(data.len(), 1, "the staged packet goes out");
    let (_, got) = p.theirs_receive(&data[0]);
    assert_eq!(got, vec![hello]);
    // And back, through our device.
    let reply = ipv4(THEIRS, OURS, b"hello from boringtun, padded by it");
    let d = p.theirs_send(&reply);
    let (_, delivered) = p.ours_receive(d.clone());
    assert_eq!(delivered, vec![reply]);
    // A replay of boringtun's packet is dropped by us.
    let (_, again) = p.ours_receive(d);
    assert!(again.is_empty());
}

#[test]
fn boringtuns_initiation_is_answered_by_us_and_data_flows_both_ways() {
    let mut p = Pair::new();
    let first = ipv4(THEIRS, OURS, b"boringtun starts");
    let init = p.theirs_send(&first);
    assert_eq!(init.len(), 148, "an initiation, its packet queued");
    let (resp, delivered) = p.ours_receive(init);
    assert!(delivered.is_empty());
    assert_eq!(resp.len(), 1);
    let (net, _) = p.theirs_receive(&resp[0]);
    assert!(
        !net.is_empty(),
        "boringtun sends its queued packet (and/or a keepalive)"
    );
    let mut got = Vec::new();
    for d in net {
        got.extend(p.ours_receive(d).1);
    }
    assert_eq!(
        got,
        vec![first],
        "our device confirms the session with their first packet"
    );
    let ours = ipv4(OURS, THEIRS, b"and we answer on the new session");
    let d = p.ours_send(&ours);
    assert_eq!(d.len(), 1);
    let (_, tun) = p.theirs_receive(&d[0]);
    assert_eq!(tun, vec![ours]);
    // Data from them and silence from us: after KEEPALIVE_TIMEOUT we send a keepalive (an
    // empty data message), which boringtun authenticates and delivers nothing for.
    let more = p.theirs_send(&ipv4(THEIRS, OURS, b"anyone there?"));
    assert_eq!(p.ours_receive(more).1.len(), 1);
    p.now += Duration::from_secs(11);
    let mut out = Vec::new();
    let now = p.now;
    p.ours.tick(now, WALL0 + now, &mut out);
    let keepalives = sends(out);
    assert_eq!(
        keepalives.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![32]
    );
    let (_, tun) = p.theirs_receive(&keepalives[0]);
    assert!(tun.is_empty());
}
