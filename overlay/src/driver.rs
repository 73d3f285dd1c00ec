//! The driver: one UDP socket (batched: [`crate::udp`]), the sans-IO [`Device`], and where inner packets go — a kernel
//! TUN device (tokio-tun) or, in userspace mode, a TCP/IP stack in this process
//! ([`crate::userspace`]: no root, no TUN) — and a tick every [`TICK`] for the timers. The
//! driver owns the clock: `now` is monotonic since start, `wall` is since the Unix epoch.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use crate::config::Config;
use crate::control::{NamedPeer, Observed};
use crate::device::{Device, Output};
use crate::keys;
use crate::udp::Udp;
use crate::userspace::{self, Stack};

/// Timer resolution (REKEY_TIMEOUT is 5 s; keepalives are seconds).
pub const TICK: Duration = Duration::from_millis(100);
/// Largest packet we read from the TUN device (a 9000-byte MTU plus overhead fits).
const MAX_PACKET: usize = 9216;
/// Packets taken from the TUN device per wake-up before their datagrams go out (in GSO
/// trains) and other events get their turn.
const TUN_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("creating TUN device {name}: {source}")]
    Tun {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("binding UDP port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("network I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn wall() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Where decrypted packets go and packets to encrypt come from.
enum Packets {
    /// A kernel TUN device.
    Tun(tokio_tun::Tun),
    /// The userspace stack (smoltcp).
    Stack(Box<Stack>),
}

/// What userspace mode serves to local processes.
#[derive(Clone, Debug, Default)]
pub struct UserspaceOptions {
    /// A SOCKS5 endpoint (CONNECT to overlay IPv4 addresses).
    pub socks5: Option<SocketAddr>,
    /// Local listen address → overlay address: each local connection is forwarded.
    pub forwards: Vec<(SocketAddr, SocketAddrV4)>,
    /// Overlay port → local address: connections from peers to the port are forwarded.
    pub exposes: Vec<(u16, SocketAddr)>,
}

/// A running overlay interface.
pub struct Overlay {
    pub device: Device,
    socket: Udp,
    packets: Packets,
    /// The interface's name (the TUN device's, or the name a userspace overlay was given).
    name: String,
    /// Userspace mode's SOCKS5 and forward listeners (aborted when the overlay is dropped).
    _tasks: tokio::task::JoinSet<()>,
    started: Instant,
    /// The interface's own addresses (peers' allowed IPs inside them need no route).
    addresses: Vec<IpNet>,
    /// Peer names (from meta) by public key, for the status.
    names: BTreeMap<[u8; 32], String>,
    /// Peers (from meta) behind NAT: where their packets come from is published.
    behind_nat: std::collections::BTreeSet<[u8; 32]>,
}

/// What the daemon reports on its status socket (and `continuum overlay show` prints).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    /// This daemon relays for others; packets it relayed, and packets it sent through a relay.
    pub relaying: bool,
    pub forwarded: u64,
    pub relayed: u64,
    /// UDP calls and datagrams both ways (how well datagrams are batched).
    #[serde(default)]
    pub udp: crate::udp::UdpStats,
    pub peers: Vec<PeerStatus>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub public_key: String,
    /// From meta (empty for peers of a config file).
    pub name: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds of the latest completed handshake.
    pub latest_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u64>,
    /// It relays for others (from meta).
    pub relay: bool,
    /// Reached through a relay now (no direct path).
    pub via_relay: bool,
}

/// Where the daemon of TUN device `tun` answers status requests.
pub fn status_socket(tun: &str) -> PathBuf {
    PathBuf::from(format!("/run/continuum/overlay-{tun}.sock"))
}

/// How a running daemon is steered besides its config: peer lists from meta, and a status
/// socket.
#[derive(Default)]
pub struct Controls {
    pub peers: Option<tokio::sync::watch::Receiver<Vec<NamedPeer>>>,
    pub status_socket: Option<PathBuf>,
    /// Where NATed peers with a live session send from (to publish through meta).
    pub observed: Option<tokio::sync::watch::Sender<Observed>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Overlay({})", self.name)
    }
}

impl Overlay {
    /// Creates the TUN device `tun_name` with the config's address, binds the UDP port and
    /// adds routes for peers' allowed IPs outside the interface's own subnet.
    pub async fn start(cfg: &Config, tun_name: &str, seed: u64) -> Result<Overlay, DriverError> {
        let v4: Vec<&IpNet> = cfg
            .interface
            .addresses
            .iter()
            .filter(|a| a.addr().is_ipv4())
            .collect();
        if v4.len() > 1 || cfg.interface.addresses.len() > v4.len() {
            return Err(DriverError::Config(
                "the TUN driver takes one IPv4 Address for now".into(),
            ));
        }
        let mut builder = tokio_tun::Tun::builder()
            .name(tun_name)
            .mtu(cfg.interface.mtu as i32)
            .up();
        if let Some(IpNet::V4(a)) = v4.first().copied() {
            builder = builder.address(a.addr()).netmask(a.netmask());
        }
        let tun = builder
            .build()
            .map_err(|e| DriverError::Tun {
                name: tun_name.into(),
                source: e.into(),
            })?
            .into_iter()
            .next()
            .ok_or_else(|| DriverError::Config("tokio-tun returned no queue".into()))?;
        let (device, socket) = Self::device_and_socket(cfg, seed).await?;
        let ov = Overlay {
            device,
            socket,
            name: tun.name().to_string(),
            packets: Packets::Tun(tun),
            _tasks: tokio::task::JoinSet::new(),
            started: Instant::now(),
            addresses: cfg.interface.addresses.clone(),
            names: BTreeMap::new(),
            behind_nat: Default::default(),
        };
        for p in &cfg.peers {
            for net in &p.allowed_ips {
                ov.route(net)?;
            }
        }
        Ok(ov)
    }

    /// Userspace mode: the config's (one IPv4) address lives on a TCP/IP stack in this process;
    /// no TUN device, no routes, no root. Binds the UDP port and `options`' listeners.
    pub async fn start_userspace(
        cfg: &Config,
        name: &str,
        seed: u64,
        options: &UserspaceOptions,
    ) -> Result<Overlay, DriverError> {
        let address = match cfg.interface.addresses.as_slice() {
            [IpNet::V4(a)] => *a,
            _ => {
                return Err(DriverError::Config(
                    "userspace mode takes one IPv4 Address".into(),
                ))
            }
        };
        let (device, socket) = Self::device_and_socket(cfg, seed).await?;
        let started = Instant::now();
        let mut stack = Stack::new(address, cfg.interface.mtu, seed, started.elapsed());
        for &(port, target) in &options.exposes {
            stack.expose(port, target).map_err(DriverError::Config)?;
        }
        let mut tasks = tokio::task::JoinSet::new();
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| DriverError::Config(format!("listening on {addr}: {e}")))
        };
        if let Some(addr) = options.socks5 {
            let l = bind(addr).await?;
            tasks.spawn(userspace::serve_socks5(l, stack.dialer()));
        }
        for &(listen, to) in &options.forwards {
            let l = bind(listen).await?;
            tasks.spawn(userspace::serve_forward(l, to, stack.dialer()));
        }
        Ok(Overlay {
            device,
            socket,
            name: name.to_string(),
            packets: Packets::Stack(Box::new(stack)),
            _tasks: tasks,
            started,
            addresses: cfg.interface.addresses.clone(),
            names: BTreeMap::new(),
            behind_nat: Default::default(),
        })
    }

    /// Dials overlay addresses from this process (userspace mode only).
    pub fn dialer(&self) -> Option<userspace::Dialer> {
        match &self.packets {
            Packets::Stack(s) => Some(s.dialer()),
            Packets::Tun(_) => None,
        }
    }

    async fn device_and_socket(cfg: &Config, seed: u64) -> Result<(Device, Udp), DriverError> {
        let port = cfg.interface.listen_port.unwrap_or(0);
        let socket = Udp::bind(port)
            .await
            .map_err(|source| DriverError::Bind { port, source })?;
        let mut device = Device::new(cfg.interface.private_key, seed);
        device.mtu = cfg.interface.mtu;
        for p in &cfg.peers {
            device.set_peer(p.clone());
        }
        Ok((device, socket))
    }

    /// Routes `net` to the TUN device unless the interface's own subnet covers it (userspace
    /// mode routes everything to its stack already).
    fn route(&self, net: &IpNet) -> Result<(), DriverError> {
        let covered = self.addresses.iter().any(|a| a.contains(net));
        match &self.packets {
            Packets::Tun(tun) if !covered && net.addr().is_ipv4() => add_route(net, tun.name()),
            _ => Ok(()),
        }
    }

    /// Replaces the peers that came from meta with `peers`: new ones are added, changed ones
    /// updated (their sessions and roamed endpoints survive), and those gone removed; routes
    /// are added for allowed IPs outside the interface's subnet.
    pub fn apply_peers(&mut self, peers: &[NamedPeer]) -> Result<(), DriverError> {
        let wanted: BTreeMap<[u8; 32], &NamedPeer> =
            peers.iter().map(|p| (p.config.public_key, p)).collect();
        let gone: Vec<[u8; 32]> = self
            .names
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .copied()
            .collect();
        for k in gone {
            self.device.remove_peer(&k);
            self.names.remove(&k);
        }
        self.behind_nat = peers
            .iter()
            .filter(|p| p.behind_nat)
            .map(|p| p.config.public_key)
            .collect();
        for p in peers {
            self.device.set_peer(p.config.clone());
            self.device.set_relay(&p.config.public_key, p.relay);
            self.names.insert(p.config.public_key, p.name.clone());
            for net in &p.config.allowed_ips {
                self.route(net)?;
            }
        }
        Ok(())
    }

    /// The interface and its peers now (what `wg show` tells).
    pub fn status(&self) -> Status {
        let now = self.started.elapsed();
        Status {
            interface: self.name.clone(),
            public_key: keys::encode(&self.device.public_key()),
            listen_port: self.local_port().unwrap_or(0),
            relaying: self.device.forwarding,
            forwarded: self.device.forwarded,
            relayed: self.device.relayed,
            udp: self.socket.stats,
            peers: self
                .device
                .peers()
                .map(|(p, allowed)| {
                    let key = *p.key.public.as_bytes();
                    PeerStatus {
                        public_key: keys::encode(&key),
                        name: self.names.get(&key).cloned().unwrap_or_default(),
                        endpoint: p.endpoint.map(|e| e.to_string()),
                        allowed_ips: allowed.iter().map(ToString::to_string).collect(),
                        latest_handshake: p.stats.last_handshake.map(|d| d.as_secs()),
                        rx_bytes: p.stats.rx_bytes,
                        tx_bytes: p.stats.tx_bytes,
                        persistent_keepalive: p.persistent_keepalive.map(|d| d.as_secs()),
                        relay: p.relay,
                        via_relay: !self.device.forwarding && p.wants_relay(now),
                    }
                })
                .collect(),
        }
    }

    /// Where the peers behind NAT that we have a session with send from (their NAT's public
    /// mapping, learned from authenticated packets), in key order.
    pub fn observed(&self) -> Observed {
        let now = self.started.elapsed();
        self.device
            .peers()
            .filter_map(|(p, _)| {
                let key = *p.key.public.as_bytes();
                let live = p.can_send_now(now) && self.behind_nat.contains(&key);
                p.endpoint.filter(|_| live).map(|e| (key, e))
            })
            .collect()
    }

    pub fn local_port(&self) -> std::io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// Moves packets until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), DriverError> {
        self.run_with(Controls::default(), shutdown).await
    }

    /// [`Overlay::run`], taking peer lists from `controls.peers` and answering status requests
    /// on `controls.status_socket` (a Unix socket; each connection gets the [`Status`] as JSON).
    pub async fn run_with(
        mut self,
        mut controls: Controls,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), DriverError> {
        tokio::pin!(shutdown);
        let listener = match &controls.status_socket {
            Some(path) => match bind_status(path) {
                Ok(l) => Some(l),
                // The overlay runs without it (e.g. userspace mode as a user who cannot write
                // /run): only `overlay show` is missing.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "no status socket");
                    None
                }
            },
            None => None,
        };
        if let Some(rx) = controls.peers.as_mut() {
            let peers = rx.borrow_and_update().clone();
            self.apply_peers(&peers)?;
        }
        let mut tun_buf = vec![0u8; MAX_PACKET];
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events = match &mut self.packets {
            Packets::Stack(stack) => stack.take_events(),
            Packets::Tun(_) => None,
        };
        loop {
            let now = self.started.elapsed();
            // The userspace stack's own timers (retransmits, delayed work).
            let stack_delay = match &mut self.packets {
                Packets::Stack(stack) => stack.poll_delay(now),
                Packets::Tun(_) => None,
            };
            tokio::select! {
                r = self.socket.readable() => {
                    r?;
                    let (device, wall) = (&mut self.device, wall());
                    self.socket.try_recv(|src, datagram| {
                        device.receive(now, wall, src, datagram, &mut out)
                    })?;
                }
                r = async {
                    match &self.packets {
                        Packets::Tun(tun) => tun.recv(&mut tun_buf).await,
                        Packets::Stack(_) => std::future::pending().await,
                    }
                } => {
                    let n = r?;
                    let wall = wall();
                    crate::mss::clamp(&mut tun_buf[..n], self.device.mtu);
                    self.device.send_packet(now, wall, &tun_buf[..n], &mut out);
                    // Whatever else is queued, so that its datagrams leave in trains.
                    if let Packets::Tun(tun) = &self.packets {
                        for _ in 1..TUN_BATCH {
                            let Ok(n) = tun.try_recv(&mut tun_buf) else { break };
                            crate::mss::clamp(&mut tun_buf[..n], self.device.mtu);
                            self.device.send_packet(now, wall, &tun_buf[..n], &mut out);
                        }
                    }
                }
                ev = async { events.as_mut().expect("guarded").recv().await },
                    if events.is_some() =>
                {
                    if let (Some(ev), Packets::Stack(stack)) = (ev, &mut self.packets) {
                        stack.handle(ev);
                        // Take whatever else is queued before polling the stack once.
                        while let Ok(ev) = events.as_mut().expect("guarded").try_recv() {
                            stack.handle(ev);
                        }
                    }
                }
                _ = tokio::time::sleep(stack_delay.unwrap_or(TICK)), if stack_delay.is_some() => {}
                _ = tick.tick() => {
                    self.device.tick(now, wall(), &mut out);
                    if let Some(tx) = &controls.observed {
                        let seen = self.observed();
                        tx.send_if_modified(|v| {
                            let changed = *v != seen;
                            *v = seen;
                            changed
                        });
                    }
                }
                r = async { controls.peers.as_mut().expect("guarded").changed().await },
                    if controls.peers.is_some() =>
                {
                    match r {
                        Ok(()) => {
                            let peers = controls
                                .peers
                                .as_mut()
                                .expect("guarded")
                                .borrow_and_update()
                                .clone();
                            self.apply_peers(&peers)?;
                        }
                        // The control task ended: keep the peers we have.
                        Err(_) => controls.peers = None,
                    }
                }
                r = async { listener.as_ref().expect("guarded").accept().await },
                    if listener.is_some() =>
                {
                    if let Ok((mut conn, _)) = r {
                        let body = serde_json::to_vec(&self.status()).expect("serializable");
                        tokio::spawn(async move {
                            use tokio::io::AsyncWriteExt;
                            let _ = conn.write_all(&body).await;
                            let _ = conn.shutdown().await;
                        });
                    }
                }
                _ = &mut shutdown => {
                    if let Some(path) = &controls.status_socket {
                        let _ = std::fs::remove_file(path);
                    }
                    return Ok(());
                }
            }
            // After a wait (the stack's timer), `now` is stale: the stack runs on the time now.
            self.flush(self.started.elapsed(), &mut out).await;
        }
    }

    /// Sends the device's outputs: datagrams to peers, packets to the TUN device or the
    /// userspace stack — and, in userspace mode, runs the stack and encrypts what it emits,
    /// until nothing is left.
    async fn flush(&mut self, now: Duration, out: &mut Vec<Output>) {
        loop {
            for o in out.drain(..) {
                match o {
                    Output::Send { to, datagram } => self.socket.send(to, &datagram).await,
                    Output::Deliver(mut packet) => match &mut self.packets {
                        Packets::Tun(tun) => {
                            crate::mss::clamp(&mut packet, self.device.mtu);
                            if let Err(e) = tun.send(&packet).await {
                                tracing::debug!(error = %e, "TUN write failed");
                            }
                        }
                        Packets::Stack(stack) => stack.input(packet),
                    },
                }
            }
            let Packets::Stack(stack) = &mut self.packets else {
                break;
            };
            let emitted = stack.poll(now);
            if emitted.is_empty() {
                break;
            }
            for p in &emitted {
                self.device.send_packet(now, wall(), p, out);
            }
        }
        self.socket.flush().await;
    }
}

fn bind_status(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
}

fn add_route(net: &IpNet, dev: &str) -> Result<(), DriverError> {
    let status = std::process::Command::new("ip")
        .args(["route", "replace", &net.to_string(), "dev", dev])
        .status()
        .map_err(|e| DriverError::Config(format!("running `ip route` for {net}: {e}")))?;
    if !status.success() {
        return Err(DriverError::Config(format!(
            "`ip route replace {net} dev {dev}` failed ({status})"
        )));
    }
    Ok(())
}
