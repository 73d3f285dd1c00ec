//! The kernel-TUN driver: one UDP socket, one TUN device (tokio-tun), the sans-IO
//! [`Device`] in between, and a tick every [`TICK`] for its timers. The driver owns the
//! clock: `now` is monotonic since start, `wall` is since the Unix epoch.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use crate::config::Config;
use crate::control::NamedPeer;
use crate::device::{Device, Output};
use crate::keys;

/// Timer resolution (REKEY_TIMEOUT is 5 s; keepalives are seconds).
pub const TICK: Duration = Duration::from_millis(100);
/// Largest datagram we read (a 9000-byte MTU plus overhead fits).
const MAX_DATAGRAM: usize = 9216;

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

/// A running overlay interface.
pub struct Overlay {
    pub device: Device,
    socket: tokio::net::UdpSocket,
    tun: tokio_tun::Tun,
    started: Instant,
    /// The interface's own addresses (peers' allowed IPs inside them need no route).
    addresses: Vec<IpNet>,
    /// Peer names (from meta) by public key, for the status.
    names: BTreeMap<[u8; 32], String>,
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
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Overlay({})", self.tun.name())
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
        let port = cfg.interface.listen_port.unwrap_or(0);
        let socket = tokio::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            .await
            .map_err(|source| DriverError::Bind { port, source })?;
        let mut device = Device::new(cfg.interface.private_key, seed);
        device.mtu = cfg.interface.mtu;
        for p in &cfg.peers {
            device.set_peer(p.clone());
        }
        for p in &cfg.peers {
            for net in &p.allowed_ips {
                let covered = cfg.interface.addresses.iter().any(|a| a.contains(net));
                if !covered && net.addr().is_ipv4() {
                    add_route(net, tun.name())?;
                }
            }
        }
        Ok(Overlay {
            device,
            socket,
            tun,
            started: Instant::now(),
            addresses: cfg.interface.addresses.clone(),
            names: BTreeMap::new(),
        })
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
        for p in peers {
            self.device.set_peer(p.config.clone());
            self.device.set_relay(&p.config.public_key, p.relay);
            self.names.insert(p.config.public_key, p.name.clone());
            for net in &p.config.allowed_ips {
                let covered = self.addresses.iter().any(|a| a.contains(net));
                if !covered && net.addr().is_ipv4() {
                    add_route(net, self.tun.name())?;
                }
            }
        }
        Ok(())
    }

    /// The interface and its peers now (what `wg show` tells).
    pub fn status(&self) -> Status {
        let now = self.started.elapsed();
        Status {
            interface: self.tun.name().to_string(),
            public_key: keys::encode(&self.device.public_key()),
            listen_port: self.local_port().unwrap_or(0),
            relaying: self.device.forwarding,
            forwarded: self.device.forwarded,
            relayed: self.device.relayed,
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
            Some(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let _ = std::fs::remove_file(path);
                Some(tokio::net::UnixListener::bind(path)?)
            }
            None => None,
        };
        if let Some(rx) = controls.peers.as_mut() {
            let peers = rx.borrow_and_update().clone();
            self.apply_peers(&peers)?;
        }
        let mut udp_buf = vec![0u8; MAX_DATAGRAM];
        let mut tun_buf = vec![0u8; MAX_DATAGRAM];
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = self.started.elapsed();
            tokio::select! {
                r = self.socket.recv_from(&mut udp_buf) => {
                    let (n, src) = r?;
                    self.device.receive(now, wall(), src, &mut udp_buf[..n], &mut out);
                }
                r = self.tun.recv(&mut tun_buf) => {
                    let n = r?;
                    crate::mss::clamp(&mut tun_buf[..n], self.device.mtu);
                    self.device.send_packet(now, wall(), &tun_buf[..n], &mut out);
                }
                _ = tick.tick() => self.device.tick(now, wall(), &mut out),
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
            for o in out.drain(..) {
                match o {
                    Output::Send { to, datagram } => {
                        // A send error (no route yet, ICMP unreachable reported) is a lost
                        // datagram, which the protocol's timers handle.
                        if let Err(e) = self.socket.send_to(&datagram, to).await {
                            tracing::debug!(%to, error = %e, "UDP send failed");
                        }
                    }
                    Output::Deliver(mut packet) => {
                        crate::mss::clamp(&mut packet, self.device.mtu);
                        if let Err(e) = self.tun.send(&packet).await {
                            tracing::debug!(error = %e, "TUN write failed");
                        }
                    }
                }
            }
        }
    }
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
