//! TCP MSS clamping: the overlay's inner MTU (1420 by default) is below the 1500 that hosts
//! assume, and paths that drop ICMP "packet too big" turn that into connections that hang
//! once they send a full segment (an MTU black hole). Rewriting the MSS option of every TCP
//! SYN crossing the tunnel, both ways, to what fits the inner MTU makes both ends send
//! segments that fit, whatever ICMP does.

/// Lowers the MSS option of a TCP SYN (IPv4 or IPv6, no extension headers) to fit `mtu`,
/// fixing the TCP checksum; any other packet is left alone. Returns whether it changed.
pub fn clamp(packet: &mut [u8], mtu: usize) -> bool {
    let Some((ip_header, proto)) = ip_header(packet) else {
        return false;
    };
    if proto != 6 {
        return false;
    }
    let overhead = if packet[0] >> 4 == 4 { 40 } else { 60 };
    let limit = mtu.saturating_sub(overhead).min(u16::MAX as usize) as u16;
    let tcp_len = match total_len(packet) {
        Some(t) if t <= packet.len() && t > ip_header => t - ip_header,
        _ => return false,
    };
    let (head, rest) = packet.split_at_mut(ip_header);
    let tcp = &mut rest[..tcp_len];
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return false; // not a SYN
    }
    let data_offset = ((tcp[12] >> 4) as usize) * 4;
    if data_offset < 20 || data_offset > tcp.len() {
        return false;
    }
    let mut at = 20;
    let mut changed = false;
    while at < data_offset {
        match tcp[at] {
            0 => break,
            1 => at += 1,
            kind => {
                let Some(&len) = tcp.get(at + 1) else { break };
                let len = len as usize;
                if len < 2 || at + len > data_offset {
                    break;
                }
                if kind == 2 && len == 4 {
                    let mss = u16::from_be_bytes([tcp[at + 2], tcp[at + 3]]);
                    if mss > limit {
                        tcp[at + 2..at + 4].copy_from_slice(&limit.to_be_bytes());
                        changed = true;
                    }
                }
                at += len;
            }
        }
    }
    if changed {
        tcp[16] = 0;
        tcp[17] = 0;
        let sum = checksum(head, tcp);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    }
    changed
}

/// The IP header length and the next protocol (IPv6 with extension headers: `None`).
fn ip_header(p: &[u8]) -> Option<(usize, u8)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            // Fragments other than the first carry no TCP header.
            let frag_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            (ihl >= 20 && frag_offset == 0).then_some((ihl, p[9]))
        }
        6 if p.len() >= 40 => Some((40, p[6])),
        _ => None,
    }
}

fn total_len(p: &[u8]) -> Option<usize> {
    match p[0] >> 4 {
        4 => Some(u16::from_be_bytes([p[2], p[3]]) as usize),
        6 => Some(40 + u16::from_be_bytes([p[4], p[5]]) as usize),
        _ => None,
    }
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

/// The TCP checksum over the pseudo header and `tcp` (its checksum field zeroed).
fn checksum(ip: &[u8], tcp: &[u8]) -> u16 {
    let mut acc = 0u32;
    if ip[0] >> 4 == 4 {
        acc = sum16(&ip[12..20], acc);
        acc += 6;
        acc += tcp.len() as u32;
    } else {
        acc = sum16(&ip[8..40], acc);
        acc += tcp.len() as u32;
        acc += 6;
    }
    acc = sum16(tcp, acc);
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SYN from 10.0.0.1:40000 to 10.0.0.2:80 with options `opts`, checksum filled in.
    fn syn_v4(opts: &[u8], flags: u8) -> Vec<u8> {
        let tcp_len = 20 + opts.len();
        let mut p = vec![0u8; 20 + tcp_len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[12] = ((tcp_len / 4) as u8) << 4;
        t[13] = flags;
        t[20..].copy_from_slice(opts);
        let (h, t) = p.split_at_mut(20);
        let c = checksum(h, t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn valid(p: &[u8]) -> bool {
        let (h, t) = p.split_at(((p[0] & 0x0f) as usize) * 4);
        let mut acc = sum16(&h[12..20], 0) + 6 + t.len() as u32;
        acc = sum16(t, acc);
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16 == 0xffff
    }

    #[test]
    fn a_syn_is_clamped_to_the_inner_mtu_with_a_valid_checksum() {
        // NOP, SACK-permitted, then MSS 1460 at an odd offset, window scale, end.
        let opts = [1, 4, 2, 2, 4, 0x05, 0xb4, 3, 3, 7, 0, 0];
        let mut p = syn_v4(&opts, 0x02);
        assert!(valid(&p));
        assert!(clamp(&mut p, 1420));
        assert_eq!(u16::from_be_bytes([p[20 + 20 + 5], p[20 + 20 + 6]]), 1380);
        assert!(valid(&p), "checksum fixed");
        // Again: already small enough.
        assert!(!clamp(&mut p, 1420));
        // A SYN-ACK too.
        let mut sa = syn_v4(&[2, 4, 0x23, 0x28], 0x12);
        assert!(clamp(&mut sa, 1420));
        assert!(valid(&sa));
    }

    #[test]
    fn other_packets_are_left_alone() {
        let opts = [2, 4, 0x05, 0xb4];
        let mut ack = syn_v4(&opts, 0x10);
        let before = ack.clone();
        assert!(!clamp(&mut ack, 1420));
        assert_eq!(ack, before);
        let mut udp = syn_v4(&opts, 0x02);
        udp[9] = 17;
        assert!(!clamp(&mut udp, 1420));
        // Truncated and malformed ones never panic.
        for n in 0..before.len() {
            let mut cut = syn_v4(&opts, 0x02)[..n].to_vec();
            clamp(&mut cut, 1420);
        }
        let mut bad_len = syn_v4(&[2, 200, 0, 0], 0x02);
        assert!(!clamp(&mut bad_len, 1420));
    }
}
