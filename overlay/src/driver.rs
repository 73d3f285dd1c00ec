//! The kernel-TUN driver: one UDP socket, one TUN device (tokio-tun), the sans-IO
//! [`Device`] in between, and a tick every [`TICK`] for its timers. The driver owns the
//! clock: `now` is monotonic since start, `wall` is since the Unix epoch.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use crate::config::Config;
use crate::device::{Device, Output};

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
        })
    }

    pub fn local_port(&self) -> std::io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// Moves packets until `shutdown` completes.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), DriverError> {
        tokio::pin!(shutdown);
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
                    self.device.send_packet(now, wall(), &tun_buf[..n], &mut out);
                }
                _ = tick.tick() => self.device.tick(now, wall(), &mut out),
                _ = &mut shutdown => return Ok(()),
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
                    Output::Deliver(packet) => {
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
