//! Batched UDP I/O for the driver, through quinn-udp: one `recvmmsg` takes up to
//! [`RECV_SLOTS`] datagrams, each slot possibly a GRO train of same-sized datagrams from one
//! source; datagrams to send are gathered into GSO trains (one `sendmsg` carries up to
//! [`GSO_BYTES`] of equal-sized datagrams to one destination, the kernel cuts them). Where the
//! kernel lacks GSO or GRO, quinn-udp falls back to one datagram per call, and so do we.
//!
//! Invariant: datagrams leave in the order they were queued; a train never mixes
//! destinations or sizes except that its last datagram may be shorter (the kernel's rule).

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

/// Datagrams (or GRO trains) per `recvmmsg`.
pub const RECV_SLOTS: usize = 16;
/// Bytes per receive slot: a GRO train never exceeds 64 KiB (the IP length field).
const SLOT: usize = 65536;
/// Most bytes in one GSO train (a UDP datagram's 16-bit length, less IP and UDP headers).
pub const GSO_BYTES: usize = 65507 - 8;
/// Socket buffers we ask for.
const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket with batched receive and send.
pub struct Udp {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
    recv_buf: Vec<u8>,
    meta: Vec<RecvMeta>,
    /// The train being gathered: destination, datagram size, bytes, datagrams.
    train: Option<(SocketAddr, usize)>,
    train_buf: Vec<u8>,
    train_len: usize,
    /// Counters: send calls and datagrams sent, receive calls and datagrams received.
    pub stats: UdpStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UdpStats {
    pub send_calls: u64,
    pub sent: u64,
    pub recv_calls: u64,
    pub received: u64,
}

impl Udp {
    /// Binds `0.0.0.0:port` (0: any port).
    pub async fn bind(port: u16) -> io::Result<Udp> {
        let socket =
            tokio::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await?;
        let state = UdpSocketState::new((&socket).into())?;
        // quinn-udp sets DF (IP_PMTUDISC_PROBE) for QUIC's path MTU discovery; a WireGuard
        // tunnel, like the kernel's, lets routers fragment outer packets instead of dropping
        // them on a narrower path.
        {
            use rustix::net::sockopt::{set_ip_mtu_discover, Ipv4PathMtuDiscovery};
            set_ip_mtu_discover(&socket, Ipv4PathMtuDiscovery::DONT)?;
        }
        // Bigger buffers absorb bursts: past net.core.[rw]mem_max where allowed (root), else up
        // to it. Failure only costs throughput.
        {
            use rustix::net::sockopt as so;
            if so::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
                let _ = so::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER);
            }
            if so::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
                let _ = so::set_socket_send_buffer_size(&socket, SOCKET_BUFFER);
            }
        }
        Ok(Udp {
            socket,
            state,
            recv_buf: vec![0; RECV_SLOTS * SLOT],
            meta: vec![RecvMeta::default(); RECV_SLOTS],
            train: None,
            train_buf: Vec::with_capacity(GSO_BYTES),
            train_len: 0,
            stats: UdpStats::default(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits until datagrams may be there to read.
    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Reads one batch without waiting and hands each datagram to `f` (source, bytes, which
    /// `f` may change in place). Returns how many datagrams there were (0: nothing to read).
    pub fn try_recv(&mut self, mut f: impl FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        let Udp {
            socket,
            state,
            recv_buf,
            meta,
            ..
        } = self;
        let mut iovs: Vec<IoSliceMut<'_>> =
            recv_buf.chunks_mut(SLOT).map(IoSliceMut::new).collect();
        let n = match socket.try_io(Interest::READABLE, || {
            state.recv((&*socket).into(), &mut iovs, meta)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        self.stats.recv_calls += 1;
        let mut count = 0;
        for (m, iov) in meta.iter().zip(iovs.iter_mut()).take(n) {
            let stride = m.stride.max(1);
            for datagram in iov[..m.len].chunks_mut(stride) {
                f(m.addr, datagram);
                count += 1;
            }
        }
        self.stats.received += count as u64;
        Ok(count)
    }

    /// Queues `datagram` for `to`; sends the gathered train first when `datagram` cannot join
    /// it. Call [`Udp::flush`] when there is nothing more to queue.
    pub async fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        if let Some((dest, size)) = self.train {
            let fits = dest == to
                && datagram.len() <= size
                // The train's last datagram was full-sized (a short one ends a train).
                && self.train_buf.len() == self.train_len * size
                && self.train_len < self.state.max_gso_segments()
                && self.train_buf.len() + datagram.len() <= GSO_BYTES;
            if !fits {
                self.flush().await;
            }
        }
        if self.train.is_none() {
            self.train = Some((to, datagram.len()));
        }
        self.train_buf.extend_from_slice(datagram);
        self.train_len += 1;
    }

    /// Sends the gathered train, if any. A send error is a lost batch of datagrams, which the
    /// protocol's timers (and TCP inside) recover from; it is logged, not returned.
    pub async fn flush(&mut self) {
        let Some((to, size)) = self.train.take() else {
            return;
        };
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: &self.train_buf,
            segment_size: (self.train_len > 1).then_some(size),
            src_ip: None,
        };
        let r = self
            .socket
            .async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &transmit)
            })
            .await;
        match r {
            Ok(()) => {
                self.stats.send_calls += 1;
                self.stats.sent += self.train_len as u64;
            }
            Err(e) => {
                tracing::debug!(%to, datagrams = self.train_len, error = %e, "UDP send failed")
            }
        }
        self.train_buf.clear();
        self.train_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything queued arrives, in order and intact, whatever the mix of sizes and
    /// destinations — through GSO trains and GRO or not, as this kernel has them.
    #[tokio::test]
    async fn queued_datagrams_arrive_in_order_and_intact() {
        let mut a = Udp::bind(0).await.unwrap();
        let mut b = Udp::bind(0).await.unwrap();
        let mut c = Udp::bind(0).await.unwrap();
        let to_b = SocketAddr::from((Ipv4Addr::LOCALHOST, b.local_addr().unwrap().port()));
        let to_c = SocketAddr::from((Ipv4Addr::LOCALHOST, c.local_addr().unwrap().port()));
        let mut sent_b = Vec::new();
        let mut sent_c = Vec::new();
        for i in 0u32..300 {
            // Runs of full-sized datagrams, a short one now and then, and a switch of
            // destination every 50.
            let len = if i % 17 == 16 { 100 + i as usize } else { 1452 };
            let d: Vec<u8> = (0..len).map(|j| (i as usize * 7 + j) as u8).collect();
            if (i / 50) % 2 == 0 {
                a.send(to_b, &d).await;
                sent_b.push(d);
            } else {
                a.send(to_c, &d).await;
                sent_c.push(d);
            }
        }
        a.flush().await;
        assert!(a.stats.sent == 300, "{:?}", a.stats);
        if a.state.max_gso_segments() > 1 {
            assert!(a.stats.send_calls < 100, "no trains: {:?}", a.stats);
        }
        for (u, sent) in [(&mut b, sent_b), (&mut c, sent_c)] {
            let mut got = Vec::new();
            while got.len() < sent.len() {
                tokio::time::timeout(std::time::Duration::from_secs(5), u.readable())
                    .await
                    .expect("datagrams arrive")
                    .unwrap();
                u.try_recv(|src, d| {
                    assert_eq!(src.port(), a.local_addr().unwrap().port());
                    got.push(d.to_vec());
                })
                .unwrap();
            }
            assert_eq!(got.len(), sent.len());
            assert!(got == sent, "datagrams differ or are out of order");
        }
    }
}
