//! Entry point for fuzzing the overlay's parser and state machine with untrusted datagrams:
//! the cargo-fuzz target `overlay_receive` in `fuzz/` calls it, and `tests/fuzz_props.rs`
//! runs it as a property test in CI. It must return normally on any input.

use std::net::SocketAddr;
use std::time::Duration;

use crate::device::{Device, Output, PeerConfig};

const WALL: Duration = Duration::from_secs(1_800_000_000);

fn peer(key: [u8; 32], endpoint: SocketAddr, inner: &str) -> PeerConfig {
    PeerConfig {
        public_key: key,
        preshared_key: None,
        endpoint: Some(endpoint),
        allowed_ips: vec![inner.parse().expect("prefix")],
        persistent_keepalive: None,
    }
}

/// Datagrams from the network, to a device that has a live session with a peer: `data` is
/// cut into datagrams by its first bytes (a length byte before each), and each is fed to the
/// device as it came, and once more with the message type of a real one in front (so the
/// fuzzer reaches the handshake and transport paths past the type check).
pub fn receive(data: &[u8]) {
    let (a_addr, b_addr): (SocketAddr, SocketAddr) = (
        "192.0.2.1:51820".parse().expect("addr"),
        "192.0.2.2:51820".parse().expect("addr"),
    );
    let mut a = Device::new([1; 32], 1);
    let mut b = Device::new([2; 32], 2);
    a.set_peer(peer(b.public_key(), b_addr, "10.0.0.2/32"));
    b.set_peer(peer(a.public_key(), a_addr, "10.0.0.1/32"));
    // A handshake and a packet, so B holds a session and a replay window.
    let mut out = Vec::new();
    let now = Duration::from_secs(1);
    let mut packet = vec![0u8; 28];
    packet[0] = 0x45;
    packet[3] = 28;
    packet[12..16].copy_from_slice(&[10, 0, 0, 1]);
    packet[16..20].copy_from_slice(&[10, 0, 0, 2]);
    a.send_packet(now, WALL, &packet, &mut out);
    let mut real: Vec<Vec<u8>> = Vec::new();
    for _ in 0..4 {
        let mut next = Vec::new();
        for o in out.drain(..) {
            if let Output::Send { to, mut datagram } = o {
                real.push(datagram.clone());
                if to == b_addr {
                    b.receive(now, WALL, a_addr, &mut datagram, &mut next);
                } else {
                    a.receive(now, WALL, b_addr, &mut datagram, &mut next);
                }
            }
        }
        out = next;
    }
    assert!(
        real.len() >= 3,
        "the warm-up handshake and packet did not happen"
    );
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        let (d, more) = tail.split_at(n);
        rest = more;
        let mut raw = d.to_vec();
        b.receive(now, WALL, a_addr, &mut raw, &mut out);
        if let Some(r) = real.get(len as usize % real.len().max(1)) {
            let mut typed = r.clone();
            let k = d.len().min(typed.len().saturating_sub(4));
            typed[4..4 + k].copy_from_slice(&d[..k]);
            b.receive(now, WALL, a_addr, &mut typed, &mut out);
        }
        b.tick(now + Duration::from_millis(100), WALL, &mut out);
        out.clear();
    }
}
