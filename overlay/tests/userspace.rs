//! The userspace stack (smoltcp) of two overlay ends joined back to back on a simulated,
//! lossy link with a simulated clock: TCP connections through exposed ports, SOCKS5 and the
//! in-process dialer carry bytes complete and in order, half-closes pass through, closed
//! ports refuse and silent peers time out.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use continuum_overlay::userspace::{
    parse_expose, parse_forward, serve_forward, serve_socks5, socks5_target, Event, Stack,
    CONNECT_TIMEOUT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;

const STEP: Duration = Duration::from_millis(1);

struct Pair {
    a: Stack,
    b: Stack,
    ea: UnboundedReceiver<Event>,
    eb: UnboundedReceiver<Event>,
    now: Duration,
    /// Drop every n-th packet (both directions).
    drop_every: Option<u64>,
    /// Drop everything.
    cut: bool,
    sent: u64,
    dropped: u64,
}

impl Pair {
    fn new() -> Pair {
        let mut a = Stack::new("10.0.0.1/24".parse().unwrap(), 1420, 1, Duration::ZERO);
        let mut b = Stack::new("10.0.0.2/24".parse().unwrap(), 1420, 2, Duration::ZERO);
        let ea = a.take_events().unwrap();
        let eb = b.take_events().unwrap();
        Pair {
            a,
            b,
            ea,
            eb,
            now: Duration::ZERO,
            drop_every: None,
            cut: false,
            sent: 0,
            dropped: 0,
        }
    }

    fn lost(&mut self) -> bool {
        self.sent += 1;
        let lost = self.cut || self.drop_every.is_some_and(|n| self.sent % n == 0);
        self.dropped += lost as u64;
        lost
    }

    fn step(&mut self) {
        while let Ok(ev) = self.ea.try_recv() {
            self.a.handle(ev);
        }
        while let Ok(ev) = self.eb.try_recv() {
            self.b.handle(ev);
        }
        for p in self.a.poll(self.now) {
            if !self.lost() {
                self.b.input(p);
            }
        }
        for p in self.b.poll(self.now) {
            if !self.lost() {
                self.a.input(p);
            }
        }
        self.now += STEP;
    }

    /// Runs the link (one step per turn of the runtime) until `fut` completes.
    async fn run<F: std::future::Future>(&mut self, fut: F) -> F::Output {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return r,
                _ = tokio::task::yield_now() => self.step(),
            }
        }
    }
}

/// A local TCP echo service; it half-closes after its client does.
async fn echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
    addr
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Writes `data`, half-closes, reads everything back until EOF.
async fn echo_round<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(s: S, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(s);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(write, read);
    back
}

fn overlay(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

/// A local port forwarded through `stack` to `to`.
async fn forward(stack: &Stack, to: SocketAddrV4) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_forward(l, to, stack.dialer()));
    addr
}

#[tokio::test(flavor = "current_thread")]
async fn connections_carry_bytes_complete_and_in_order_over_a_lossy_link() {
    let echo = echo_server().await;
    let mut pair = Pair::new();
    pair.b.expose(7000, echo).unwrap();
    pair.drop_every = Some(7);
    // The simulated clock runs far ahead of the real sockets the stacks bridge (a step is one
    // turn of the runtime): without this, a local socket's pause of a few real milliseconds
    // would look like minutes of silence.
    pair.a.idle_timeout = None;
    pair.b.idle_timeout = None;
    let fwd = forward(&pair.a, overlay([10, 0, 0, 2], 7000)).await;
    // Three connections at once, each 1 MiB each way, with every 7th packet lost.
    let work = async {
        let one = |seed: u32| async move {
            let data = pattern(1 << 20, seed);
            let s = tokio::net::TcpStream::connect(fwd).await.unwrap();
            let back = echo_round(s, &data).await;
            assert_eq!(back.len(), data.len(), "connection {seed}: length");
            assert!(back == data, "connection {seed}: bytes differ");
        };
        tokio::join!(one(1), one(2), one(3));
    };
    pair.run(work).await;
    assert!(pair.dropped > 50, "the link lost packets: {}", pair.dropped);
    // Both ends let go of the finished connections.
    pair.run(tokio::time::sleep(Duration::from_millis(50)))
        .await;
    assert_eq!(pair.a.connections(), 0);
    assert_eq!(pair.b.connections(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_closed_port_refuses_and_a_silent_peer_times_out() {
    let mut pair = Pair::new();
    let dialer = pair.a.dialer();
    let e = pair
        .run(dialer.link(overlay([10, 0, 0, 2], 7001)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // Through a port forward, the local client sees the refusal as a reset.
    let fwd = forward(&pair.a, overlay([10, 0, 0, 2], 7001)).await;
    let r = pair
        .run(async {
            let mut s = tokio::net::TcpStream::connect(fwd).await.unwrap();
            s.read(&mut [0u8; 8]).await
        })
        .await;
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);

    pair.cut = true;
    let start = pair.now;
    let e = pair
        .run(dialer.link(overlay([10, 0, 0, 2], 7001)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let waited = pair.now - start;
    assert!(
        waited >= CONNECT_TIMEOUT && waited < CONNECT_TIMEOUT * 2,
        "gave up after {waited:?} (simulated)"
    );
    assert_eq!(pair.a.connections(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn an_exposed_port_whose_service_is_down_resets_the_connection() {
    // A port nobody listens on locally.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut pair = Pair::new();
    pair.b.expose(7000, gone).unwrap();
    let fwd = forward(&pair.a, overlay([10, 0, 0, 2], 7000)).await;
    let work = async {
        // The overlay handshake completes (B accepts), then B's local connect fails and the
        // connection is reset: the local client sees the reset, not a clean end nor a hang.
        let mut s = tokio::net::TcpStream::connect(fwd).await.unwrap();
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf).await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    };
    pair.run(work).await;
    pair.run(tokio::time::sleep(Duration::from_millis(50)))
        .await;
    assert_eq!(pair.b.connections(), 0);
}

/// SOCKS5 greeting and CONNECT request to `to`; returns the reply code.
async fn socks_connect(s: &mut tokio::net::TcpStream, atyp: u8, addr: &[u8], port: u16) -> u8 {
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, 1, 0, atyp];
    if atyp == 3 {
        req.push(addr.len() as u8);
    }
    req.extend_from_slice(addr);
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(rep[0], 5);
    rep[1]
}

#[tokio::test(flavor = "current_thread")]
async fn socks5_reaches_overlay_addresses() {
    let echo = echo_server().await;
    let mut pair = Pair::new();
    pair.b.expose(7000, echo).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socks = l.local_addr().unwrap();
    tokio::spawn(serve_socks5(l, pair.a.dialer()));
    let work = async {
        let mut s = tokio::net::TcpStream::connect(socks).await.unwrap();
        assert_eq!(socks_connect(&mut s, 1, &[10, 0, 0, 2], 7000).await, 0);
        let data = pattern(300_000, 9);
        assert!(echo_round(s, &data).await == data);

        // A name that is an IPv4 literal works; other names and IPv6 are refused (8), a
        // closed port is refused (5).
        let mut s = tokio::net::TcpStream::connect(socks).await.unwrap();
        assert_eq!(socks_connect(&mut s, 3, b"10.0.0.2", 7000).await, 0);
        assert!(echo_round(s, b"hello").await == b"hello");
        let mut s = tokio::net::TcpStream::connect(socks).await.unwrap();
        assert_eq!(socks_connect(&mut s, 3, b"example.org", 80).await, 8);
        let mut s = tokio::net::TcpStream::connect(socks).await.unwrap();
        assert_eq!(socks_connect(&mut s, 4, &[0u8; 16], 80).await, 8);
        let mut s = tokio::net::TcpStream::connect(socks).await.unwrap();
        assert_eq!(socks_connect(&mut s, 1, &[10, 0, 0, 2], 7001).await, 5);
    };
    pair.run(work).await;
}

#[test]
fn socks5_targets_and_forward_specs_parse_or_say_why() {
    assert_eq!(
        socks5_target(1, &[10, 1, 2, 3], 80),
        Ok(overlay([10, 1, 2, 3], 80))
    );
    assert_eq!(
        socks5_target(3, b"10.1.2.3", 80),
        Ok(overlay([10, 1, 2, 3], 80))
    );
    assert_eq!(socks5_target(3, b"host", 80), Err(8));
    assert_eq!(socks5_target(1, &[10, 1, 2], 80), Err(8));
    assert_eq!(socks5_target(9, &[], 80), Err(8));

    let (l, r) = parse_forward("127.0.0.1:8080=10.90.0.2:80").unwrap();
    assert_eq!(l, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(r, overlay([10, 90, 0, 2], 80));
    assert_eq!(
        parse_forward("9000=10.90.0.2:80").unwrap().0,
        "127.0.0.1:9000".parse().unwrap()
    );
    assert!(parse_forward("9000").unwrap_err().contains("expected"));
    assert!(parse_forward("9000=host:80")
        .unwrap_err()
        .contains("not an overlay"));
    assert_eq!(
        parse_expose("22=127.0.0.1:2222").unwrap(),
        (22, "127.0.0.1:2222".parse().unwrap())
    );
    assert!(parse_expose("0=22").unwrap_err().contains("not a port"));
    assert!(parse_expose("x=22").unwrap_err().contains("not a port"));
}
