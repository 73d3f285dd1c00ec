//! Userspace mode: the overlay's inner packets go to a TCP/IP stack in this process (smoltcp)
//! instead of a kernel TUN device, so the overlay runs without root and without `/dev/net/tun`.
//! Local processes reach overlay addresses through a SOCKS5 endpoint ([`serve_socks5`]) or
//! port forwards ([`serve_forward`]); overlay peers reach local services through exposed ports
//! ([`Stack::expose`]); code in this process dials with [`Dialer::link`] and [`pump`].
//!
//! Shape: the [`Stack`] (the smoltcp interface and its sockets) is owned by the driver's loop,
//! which feeds it decrypted packets ([`Stack::input`]) and encrypts what it emits
//! ([`Stack::poll`]). Each bridged TCP connection is a smoltcp socket on the stack's side and a
//! tokio task on the local side ([`pump`]); they talk through [`Event`]s. Both directions are
//! bounded: local → overlay by a credit of [`WINDOW`] bytes per connection (returned as the
//! smoltcp socket takes the bytes), overlay → local by a bounded channel (when it is full, the
//! stack stops reading and the TCP window closes).
//!
//! Invariants: a connection's bytes reach the other side in order and complete, or the
//! connection is reset on both sides (an abort on one side aborts the other, and a local TCP
//! client sees a reset, never a clean end); a half-close (FIN) is carried as a half-close; a
//! connection whose peer never answers times out ([`CONNECT_TIMEOUT`], [`IDLE_TIMEOUT`])
//! instead of holding resources forever. A SYN repeated for a connection that already has a
//! socket never reaches a listener ([`Stack::input`]), so one connection is one socket.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ipnet::Ipv4Net;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Bytes a local reader may hand to the stack before the overlay side takes them.
pub const WINDOW: usize = 256 * 1024;
/// Size of each smoltcp socket's receive and send buffer (window scaling makes it usable).
const SOCKET_BUFFER: usize = 256 * 1024;
/// Chunks waiting for a local writer before the stack stops reading the socket.
const TO_LOCAL_CHUNKS: usize = 8;
/// Largest chunk read at once, either side.
const CHUNK: usize = 64 * 1024;
/// A connection attempt to an overlay address gives up after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An established connection whose peer stops acknowledging is reset after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// TCP keepalive on bridged connections (finds dead peers of idle connections).
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Sockets listening on each exposed port (several handshakes can be in progress at once).
const LISTEN_BACKLOG: usize = 4;
/// Ports the stack picks for connections it opens.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// From local tasks to the stack.
#[derive(Debug)]
pub enum Event {
    /// Open a TCP connection to an overlay address.
    Connect {
        to: SocketAddrV4,
        reply: oneshot::Sender<std::io::Result<Link>>,
    },
    /// Bytes from the local side (already counted against the connection's credit).
    Data { id: u64, bytes: Bytes },
    /// The local side will send nothing more (half-close: FIN).
    Eof { id: u64 },
    /// The local side failed or went away: reset the connection.
    Abort { id: u64 },
    /// A local writer took a chunk: the stack may read more from the socket.
    Wake,
}

/// The local side's end of one bridged connection.
#[derive(Debug)]
pub struct Link {
    id: u64,
    credit: Arc<Semaphore>,
    from_overlay: mpsc::Receiver<Bytes>,
    events: mpsc::UnboundedSender<Event>,
}

/// Opens connections through a [`Stack`] from any task.
#[derive(Clone, Debug)]
pub struct Dialer {
    events: mpsc::UnboundedSender<Event>,
}

fn stack_gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "the overlay stopped")
}

impl Dialer {
    /// A TCP connection to `to` on the overlay, as a [`Link`] to [`pump`] a stream through.
    pub async fn link(&self, to: SocketAddrV4) -> std::io::Result<Link> {
        let (reply, rx) = oneshot::channel();
        self.events
            .send(Event::Connect { to, reply })
            .map_err(|_| stack_gone())?;
        rx.await.map_err(|_| stack_gone())?
    }
}

/// Moves bytes between a local stream and its overlay connection until both directions end;
/// returns the stream and whether the connection ended in a reset (the caller passes the reset
/// on: [`pump_tcp`] does for TCP). EOF is carried as a half-close each way; an error on either
/// side resets the connection.
pub async fn pump<S: AsyncRead + AsyncWrite + Unpin>(link: Link, stream: S) -> (S, bool) {
    let Link {
        id,
        credit,
        mut from_overlay,
        events,
    } = link;
    let (mut r, mut w) = tokio::io::split(stream);
    let up_events = events.clone();
    let up_credit = credit.clone();
    let credit = up_credit.clone();
    let up = async {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            match r.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = up_events.send(Event::Eof { id });
                    return;
                }
                Ok(n) => {
                    // Wait for the overlay side to take earlier bytes (closed: it was reset).
                    match up_credit.acquire_many(n as u32).await {
                        Ok(p) => p.forget(),
                        Err(_) => return,
                    }
                    let bytes = buf.split().freeze();
                    if up_events.send(Event::Data { id, bytes }).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = up_events.send(Event::Abort { id });
                    return;
                }
            }
        }
    };
    let down = async {
        while let Some(chunk) = from_overlay.recv().await {
            if w.write_all(&chunk).await.is_err() {
                let _ = events.send(Event::Abort { id });
                return true;
            }
            let _ = events.send(Event::Wake);
        }
        // The stack closes the credit before it ends the stream when the connection was
        // reset; otherwise the overlay peer half-closed.
        if credit.is_closed() {
            return true;
        }
        let _ = w.shutdown().await;
        false
    };
    let reset = {
        tokio::pin!(up, down);
        tokio::select! {
            // A reset ends the local reader too (it may wait for bytes that never come).
            reset = &mut down => {
                if !reset {
                    (&mut up).await;
                }
                reset
            }
            () = &mut up => (&mut down).await,
        }
    };
    (r.unsplit(w), reset)
}

/// [`pump`] for a local TCP connection: a reset on the overlay side resets it (RST, not FIN).
pub async fn pump_tcp(link: Link, stream: tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let (stream, reset) = pump(link, stream).await;
    if reset {
        let _ = stream.set_zero_linger();
    }
}

/// smoltcp's view of the overlay: packets in (decrypted from peers) and out (to encrypt).
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let r = f(&mut packet);
        self.0.push_back(packet);
        r
    }
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

/// One bridged connection, the stack's side.
struct Bridge {
    handle: SocketHandle,
    /// Local → overlay bytes the socket has not taken yet.
    pending: VecDeque<Bytes>,
    credit: Arc<Semaphore>,
    local_eof: bool,
    fin_sent: bool,
    /// Overlay → local; dropped when the peer half-closes.
    to_local: Option<mpsc::Sender<Bytes>>,
    /// An outbound connection not yet established: who asked, and the link to give them.
    connecting: Option<(oneshot::Sender<std::io::Result<Link>>, Link)>,
}

/// A port of the overlay address forwarded to a local service.
struct Expose {
    port: u16,
    target: SocketAddr,
    listening: Vec<SocketHandle>,
    /// Out of LISTEN (a handshake in progress), not yet established.
    accepting: Vec<SocketHandle>,
}

/// The userspace TCP/IP stack on the overlay address.
pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    address: Ipv4Addr,
    bridges: HashMap<u64, Bridge>,
    next_id: u64,
    next_port: u16,
    exposes: Vec<Expose>,
    /// Sockets of finished connections, removed once they reach CLOSED.
    closing: Vec<SocketHandle>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: Option<mpsc::UnboundedReceiver<Event>>,
    /// Connection attempts give up after this ([`CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// Established connections whose peer stops answering are reset after this
    /// ([`IDLE_TIMEOUT`]; `None`: never).
    pub idle_timeout: Option<Duration>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Stack({}, {} connections)",
            self.address,
            self.bridges.len()
        )
    }
}

fn smol_now(now: Duration) -> SmolInstant {
    SmolInstant::from_micros(now.as_micros() as i64)
}

fn smol_duration(d: Duration) -> smoltcp::time::Duration {
    smoltcp::time::Duration::from_micros(d.as_micros() as u64)
}

/// Timeouts of a connection once it is established.
fn established(sock: &mut tcp::Socket<'_>, idle: Option<Duration>) {
    sock.set_timeout(idle.map(smol_duration));
    sock.set_keep_alive(Some(smol_duration(KEEPALIVE)));
}

fn new_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    // Without congestion control smoltcp sends a whole window at once, which overflows the
    // peer's UDP receive buffer and then waits for retransmission timeouts (≥ 1 s).
    s.set_congestion_control(tcp::CongestionControl::Cubic);
    s
}

impl Stack {
    /// A stack on `address` (with the overlay's prefix), sending packets of at most `mtu`
    /// bytes; `seed` seeds its initial sequence numbers and ports.
    pub fn new(address: Ipv4Net, mtu: usize, seed: u64, now: Duration) -> Stack {
        let mut queues = Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
        };
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut queues, smol_now(now));
        let ip = address.addr();
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::Ipv4(ip), address.prefix_len()))
                .expect("one address fits");
        });
        // Everything not on the overlay's subnet goes out too (peers' routed subnets); with an
        // IP medium the gateway is only a label.
        iface
            .routes_mut()
            .add_default_ipv4_route(ip)
            .expect("the route table has room for one route");
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let span = EPHEMERAL.end() - EPHEMERAL.start();
        Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            queues,
            address: address.addr(),
            bridges: HashMap::new(),
            next_id: 1,
            next_port: EPHEMERAL.start() + (seed % span as u64) as u16,
            exposes: Vec::new(),
            closing: Vec::new(),
            events_tx,
            events_rx: Some(events_rx),
            connect_timeout: CONNECT_TIMEOUT,
            idle_timeout: Some(IDLE_TIMEOUT),
        }
    }

    /// Dials through this stack from other tasks.
    pub fn dialer(&self) -> Dialer {
        Dialer {
            events: self.events_tx.clone(),
        }
    }

    /// The receiver of local tasks' events; the driver's loop takes it once and hands each
    /// event to [`Stack::handle`].
    pub fn take_events(&mut self) -> Option<mpsc::UnboundedReceiver<Event>> {
        self.events_rx.take()
    }

    /// Connections bridged now.
    pub fn connections(&self) -> usize {
        self.bridges.len()
    }

    /// Accepts TCP connections to `port` of the overlay address and forwards each to `target`.
    pub fn expose(&mut self, port: u16, target: SocketAddr) -> Result<(), String> {
        if port == 0 {
            return Err("cannot expose port 0".into());
        }
        if self.exposes.iter().any(|e| e.port == port) {
            return Err(format!("port {port} is exposed twice"));
        }
        let mut e = Expose {
            port,
            target,
            listening: Vec::new(),
            accepting: Vec::new(),
        };
        for _ in 0..LISTEN_BACKLOG {
            e.listening.push(self.listener(port));
        }
        self.exposes.push(e);
        Ok(())
    }

    fn listener(&mut self, port: u16) -> SocketHandle {
        let mut s = new_socket();
        s.listen(port)
            .expect("a fresh socket listens on a non-zero port");
        self.sockets.add(s)
    }

    /// A packet from the overlay (decrypted, for this stack's address or a route of it).
    pub fn input(&mut self, packet: Vec<u8>) {
        if self.is_repeated_syn(&packet) {
            return;
        }
        self.queues.rx.push_back(packet);
    }

    /// A retransmitted SYN of a connection that already has a socket. smoltcp hands a segment
    /// to the first socket that accepts it, and a LISTEN socket accepts any SYN to its port:
    /// were a fresh listener ahead of the connection's socket, it would open a second socket
    /// for the same four-tuple and the stream's bytes would split between them. The socket
    /// that has the connection retransmits its SYN-ACK by itself, so dropping the repeat is
    /// what TCP needs.
    fn is_repeated_syn(&self, p: &[u8]) -> bool {
        use smoltcp::wire::{IpEndpoint, IpProtocol, Ipv4Packet, TcpPacket};
        let Ok(ip) = Ipv4Packet::new_checked(p) else {
            return false;
        };
        if ip.next_header() != IpProtocol::Tcp {
            return false;
        }
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
            return false;
        };
        if !tcp.syn() || tcp.ack() {
            return false;
        }
        let local = IpEndpoint::new(IpAddress::Ipv4(ip.dst_addr()), tcp.dst_port());
        let remote = IpEndpoint::new(IpAddress::Ipv4(ip.src_addr()), tcp.src_port());
        self.sockets.iter().any(|(_, s)| match s {
            smoltcp::socket::Socket::Tcp(t) => {
                t.state() != tcp::State::Listen
                    && t.local_endpoint() == Some(local)
                    && t.remote_endpoint() == Some(remote)
            }
            #[allow(unreachable_patterns)]
            _ => false,
        })
    }

    /// Runs the stack at `now`: processes input, services the bridged connections and returns
    /// the packets to send to peers.
    pub fn poll(&mut self, now: Duration) -> Vec<Vec<u8>> {
        let t = smol_now(now);
        self.iface.poll(t, &mut self.queues, &mut self.sockets);
        self.service();
        // Bytes queued by the service go out now, not at the next poll.
        self.iface.poll(t, &mut self.queues, &mut self.sockets);
        self.queues.tx.drain(..).collect()
    }

    /// How long the stack can wait (with no input) before it must be polled again.
    pub fn poll_delay(&mut self, now: Duration) -> Option<Duration> {
        self.iface
            .poll_delay(smol_now(now), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    /// Takes one event from a local task.
    pub fn handle(&mut self, ev: Event) {
        match ev {
            Event::Connect { to, reply } => self.connect(to, reply),
            Event::Data { id, bytes } => {
                if let Some(b) = self.bridges.get_mut(&id) {
                    b.pending.push_back(bytes);
                }
            }
            Event::Eof { id } => {
                if let Some(b) = self.bridges.get_mut(&id) {
                    b.local_eof = true;
                }
            }
            Event::Abort { id } => {
                if let Some(b) = self.bridges.remove(&id) {
                    self.sockets.get_mut::<tcp::Socket>(b.handle).abort();
                    b.credit.close();
                    self.closing.push(b.handle);
                }
            }
            Event::Wake => {}
        }
    }

    fn new_bridge(&mut self, handle: SocketHandle) -> (u64, Link) {
        let id = self.next_id;
        self.next_id += 1;
        let credit = Arc::new(Semaphore::new(WINDOW));
        let (tx, rx) = mpsc::channel(TO_LOCAL_CHUNKS);
        self.bridges.insert(
            id,
            Bridge {
                handle,
                pending: VecDeque::new(),
                credit: credit.clone(),
                local_eof: false,
                fin_sent: false,
                to_local: Some(tx),
                connecting: None,
            },
        );
        let link = Link {
            id,
            credit,
            from_overlay: rx,
            events: self.events_tx.clone(),
        };
        (id, link)
    }

    fn free_port(&mut self) -> u16 {
        let used: std::collections::HashSet<u16> = self
            .sockets
            .iter()
            .filter_map(|(_, s)| match s {
                smoltcp::socket::Socket::Tcp(t) => t.local_endpoint().map(|e| e.port),
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .collect();
        loop {
            let p = self.next_port;
            self.next_port = if p == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                p + 1
            };
            if !used.contains(&p) {
                return p;
            }
        }
    }

    fn connect(&mut self, to: SocketAddrV4, reply: oneshot::Sender<std::io::Result<Link>>) {
        let port = self.free_port();
        let mut s = new_socket();
        s.set_timeout(Some(smol_duration(self.connect_timeout)));
        let remote = (IpAddress::Ipv4(*to.ip()), to.port());
        if let Err(e) = s.connect(self.iface.context(), remote, port) {
            let _ = reply.send(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("cannot connect to {to}: {e}"),
            )));
            return;
        }
        let handle = self.sockets.add(s);
        let (id, link) = self.new_bridge(handle);
        self.bridges.get_mut(&id).expect("just added").connecting = Some((reply, link));
    }

    /// Moves bytes between sockets and local tasks, accepts exposed connections, reaps
    /// finished ones.
    fn service(&mut self) {
        self.accept();
        let mut done = Vec::new();
        for (&id, b) in self.bridges.iter_mut() {
            let sock = self.sockets.get_mut::<tcp::Socket>(b.handle);
            if let Some((reply, link)) = b.connecting.take() {
                match sock.state() {
                    tcp::State::SynSent | tcp::State::SynReceived => {
                        b.connecting = Some((reply, link));
                        continue;
                    }
                    tcp::State::Closed => {
                        let _ = reply.send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "connection refused or timed out on the overlay",
                        )));
                        done.push(id);
                        continue;
                    }
                    _ => {
                        established(sock, self.idle_timeout);
                        if reply.send(Ok(link)).is_err() {
                            // Whoever asked is gone.
                            sock.abort();
                            done.push(id);
                            continue;
                        }
                    }
                }
            }
            // Local → overlay.
            while let Some(front) = b.pending.front_mut() {
                if !sock.can_send() {
                    break;
                }
                match sock.send_slice(front) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        b.credit.add_permits(n);
                        front.advance(n);
                        if front.is_empty() {
                            b.pending.pop_front();
                        }
                    }
                }
            }
            if b.pending.is_empty() && b.local_eof && !b.fin_sent {
                sock.close();
                b.fin_sent = true;
            }
            // Overlay → local.
            if let Some(tx) = &b.to_local {
                let mut local_gone = false;
                while sock.can_recv() {
                    let permit = match tx.try_reserve() {
                        Ok(p) => p,
                        Err(mpsc::error::TrySendError::Full(())) => break,
                        Err(mpsc::error::TrySendError::Closed(())) => {
                            local_gone = true;
                            break;
                        }
                    };
                    let mut chunk = vec![0u8; sock.recv_queue().min(CHUNK)];
                    let n = sock.recv_slice(&mut chunk).unwrap_or(0);
                    chunk.truncate(n);
                    permit.send(Bytes::from(chunk));
                }
                if local_gone {
                    sock.abort();
                    b.credit.close();
                    done.push(id);
                    continue;
                }
                if !sock.may_recv() && sock.recv_queue() == 0 {
                    // The peer half-closed (or reset): the local writer ends.
                    b.to_local = None;
                }
            }
            match sock.state() {
                tcp::State::Closed => {
                    // Both sides finished, or reset or timed out: then the local side is
                    // told (credit closed before its stream ends, see `pump`).
                    let clean = b.fin_sent && b.to_local.is_none();
                    if !clean {
                        b.credit.close();
                    }
                    b.to_local = None;
                    done.push(id);
                }
                tcp::State::TimeWait if b.to_local.is_none() && b.pending.is_empty() => {
                    done.push(id);
                }
                _ => {}
            }
        }
        for id in done {
            if let Some(b) = self.bridges.remove(&id) {
                self.closing.push(b.handle);
            }
        }
        let sockets = &mut self.sockets;
        self.closing.retain(|&h| {
            if sockets.get_mut::<tcp::Socket>(h).state() == tcp::State::Closed {
                sockets.remove(h);
                false
            } else {
                true
            }
        });
    }

    fn accept(&mut self) {
        let mut exposes = std::mem::take(&mut self.exposes);
        for e in exposes.iter_mut() {
            let mut moved = 0;
            let sockets = &mut self.sockets;
            e.listening.retain(|&h| {
                if sockets.get_mut::<tcp::Socket>(h).state() == tcp::State::Listen {
                    true
                } else {
                    moved += 1;
                    e.accepting.push(h);
                    false
                }
            });
            for _ in 0..moved {
                let h = self.listener(e.port);
                e.listening.push(h);
            }
            let mut still = Vec::new();
            for h in std::mem::take(&mut e.accepting) {
                let sock = self.sockets.get_mut::<tcp::Socket>(h);
                match sock.state() {
                    tcp::State::SynReceived => still.push(h),
                    tcp::State::Closed | tcp::State::Listen => {
                        self.sockets.remove(h);
                    }
                    _ => {
                        established(sock, self.idle_timeout);
                        let (_, link) = self.new_bridge(h);
                        let target = e.target;
                        tokio::spawn(async move {
                            match tokio::net::TcpStream::connect(target).await {
                                Ok(stream) => pump_tcp(link, stream).await,
                                Err(err) => {
                                    tracing::debug!(%target, error = %err, "exposed port: local connect failed");
                                    let _ = link.events.send(Event::Abort { id: link.id });
                                }
                            }
                        });
                    }
                }
            }
            e.accepting = still;
        }
        self.exposes = exposes;
    }
}

/// Parses `LISTEN=OVERLAY_IP:PORT` (a local port forward) or `PORT=LOCAL` (an exposed port):
/// the pieces of `--forward` and `--expose`.
pub fn parse_forward(s: &str) -> Result<(SocketAddr, SocketAddrV4), String> {
    let (l, r) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected LOCAL_ADDR:PORT=OVERLAY_IP:PORT"))?;
    let local = parse_local(l)?;
    let remote = r
        .parse::<SocketAddrV4>()
        .map_err(|_| format!("{r:?} is not an overlay IPv4 ip:port"))?;
    Ok((local, remote))
}

/// Parses `PORT=LOCAL_ADDR:PORT` (`--expose`).
pub fn parse_expose(s: &str) -> Result<(u16, SocketAddr), String> {
    let (p, l) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected OVERLAY_PORT=LOCAL_ADDR:PORT"))?;
    let port = p
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))?;
    Ok((port, parse_local(l)?))
}

/// `ADDR:PORT`, or a bare `PORT` on 127.0.0.1.
fn parse_local(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not ADDR:PORT or PORT"))
}

/// Accepts local connections on `listener` and forwards each to `to` on the overlay.
pub async fn serve_forward(listener: tokio::net::TcpListener, to: SocketAddrV4, dialer: Dialer) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let dialer = dialer.clone();
        tokio::spawn(async move {
            match dialer.link(to).await {
                Ok(link) => pump_tcp(link, stream).await,
                Err(e) => {
                    tracing::info!(%from, %to, error = %e, "port forward: overlay connect failed");
                    // The local client sees a refused connection as a reset, not a clean end.
                    let _ = stream.set_zero_linger();
                }
            }
        });
    }
}

/// SOCKS5 (RFC 1928), CONNECT only, no authentication, to IPv4 addresses (or names that are
/// IPv4 literals: the overlay has no resolver). Local clients only: bind it to loopback.
pub async fn serve_socks5(listener: tokio::net::TcpListener, dialer: Dialer) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let dialer = dialer.clone();
        tokio::spawn(async move {
            if let Err(e) = socks5(stream, dialer).await {
                tracing::debug!(%from, error = %e, "SOCKS5 request failed");
            }
        });
    }
}

/// SOCKS5 reply codes (RFC 1928 §6).
const SOCKS_OK: u8 = 0;
const SOCKS_FAILURE: u8 = 1;
const SOCKS_REFUSED: u8 = 5;
const SOCKS_COMMAND_UNSUPPORTED: u8 = 7;
const SOCKS_ADDRESS_UNSUPPORTED: u8 = 8;

/// What a SOCKS5 request asked for, or the reply code refusing it.
pub fn socks5_target(atyp: u8, addr: &[u8], port: u16) -> Result<SocketAddrV4, u8> {
    match atyp {
        1 if addr.len() == 4 => Ok(SocketAddrV4::new(
            Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]),
            port,
        )),
        3 => std::str::from_utf8(addr)
            .ok()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
            .map(|ip| SocketAddrV4::new(ip, port))
            .ok_or(SOCKS_ADDRESS_UNSUPPORTED),
        _ => Err(SOCKS_ADDRESS_UNSUPPORTED),
    }
}

async fn socks5(mut s: tokio::net::TcpStream, dialer: Dialer) -> std::io::Result<()> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(bad("not SOCKS version 5"));
    }
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        return Err(bad("the client offers no method without authentication"));
    }
    s.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(bad("not SOCKS version 5"));
    }
    let addr = match req[3] {
        1 => {
            let mut a = vec![0u8; 4];
            s.read_exact(&mut a).await?;
            a
        }
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut a = vec![0u8; len[0] as usize];
            s.read_exact(&mut a).await?;
            a
        }
        4 => {
            let mut a = vec![0u8; 16];
            s.read_exact(&mut a).await?;
            a
        }
        _ => {
            reply(&mut s, SOCKS_ADDRESS_UNSUPPORTED).await?;
            return Err(bad("unknown address type"));
        }
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await?;
    if req[1] != 1 {
        reply(&mut s, SOCKS_COMMAND_UNSUPPORTED).await?;
        return Err(bad("only CONNECT is supported"));
    }
    let to = match socks5_target(req[3], &addr, u16::from_be_bytes(port)) {
        Ok(to) => to,
        Err(code) => {
            reply(&mut s, code).await?;
            return Err(bad("only IPv4 overlay addresses are supported"));
        }
    };
    match dialer.link(to).await {
        Ok(link) => {
            reply(&mut s, SOCKS_OK).await?;
            pump_tcp(link, s).await;
            Ok(())
        }
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                SOCKS_REFUSED
            } else {
                SOCKS_FAILURE
            };
            reply(&mut s, code).await?;
            Err(e)
        }
    }
}

async fn reply(s: &mut tokio::net::TcpStream, code: u8) -> std::io::Result<()> {
    // The bound address is not meaningful here: zeros, as many servers send.
    s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await
}
