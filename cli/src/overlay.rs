//! `continuum overlay`: the WireGuard-protocol overlay daemon — `up` configured through meta
//! (registers the site, follows the peer list, runs from its cache while meta is away), `run`
//! stand-alone from a wg-quick-style file — `show` (like `wg show`), and `genkey|pubkey` for
//! keys in WireGuard's format.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use continuum_overlay::config::{Config, InterfaceConfig};
use continuum_overlay::control::{self, Cache, SiteSpec};
use continuum_overlay::device::DEFAULT_MTU;
use continuum_overlay::driver::{self, Controls, Overlay, Status, UserspaceOptions};
use continuum_overlay::keys;
use ipnet::IpNet;

#[derive(Subcommand, Debug)]
pub enum OverlayCommand {
    /// Run this site's overlay daemon, configured through meta: registers the site's key,
    /// endpoints and subnets, and links to every other registered site.
    Up(Box<UpArgs>),
    /// Run the overlay from a wg-quick-style config file (no meta), on a TUN device or in
    /// userspace.
    Run(RunArgs),
    /// Show a running daemon's peers: endpoints, latest handshake, transfer (like `wg show`).
    Show(ShowArgs),
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The config file ([Interface] and [Peer] sections, as wg-quick reads).
    #[arg(long)]
    config: PathBuf,
    /// Name of the TUN device to create (in userspace mode: the interface's name in status).
    #[arg(long, default_value = "cnt0")]
    tun: String,
    #[command(flatten)]
    userspace: UserspaceArgs,
}

/// Userspace mode: no TUN device and no root; local processes reach the overlay through
/// SOCKS5 and port forwards, and peers reach local services through exposed ports.
#[derive(Args, Debug, Clone)]
pub struct UserspaceArgs {
    /// Run the overlay's TCP/IP stack in this process (smoltcp) instead of a kernel TUN
    /// device.
    #[arg(long)]
    userspace: bool,
    /// Serve SOCKS5 (CONNECT to overlay IPv4 addresses) on this local address, e.g.
    /// `127.0.0.1:1080` (userspace mode).
    #[arg(long, value_name = "ADDR:PORT")]
    socks5: Option<std::net::SocketAddr>,
    /// Forward a local TCP port to an overlay address, `[ADDR:]PORT=OVERLAY_IP:PORT`
    /// (repeatable; userspace mode).
    #[arg(long = "forward", value_name = "LOCAL=OVERLAY", value_parser = continuum_overlay::userspace::parse_forward)]
    forwards: Vec<(std::net::SocketAddr, std::net::SocketAddrV4)>,
    /// Accept TCP on a port of this site's overlay address and forward to a local service,
    /// `OVERLAY_PORT=[ADDR:]PORT` (repeatable; userspace mode).
    #[arg(long = "expose", value_name = "PORT=LOCAL", value_parser = continuum_overlay::userspace::parse_expose)]
    exposes: Vec<(u16, std::net::SocketAddr)>,
}

impl UserspaceArgs {
    /// Starts the overlay in the mode asked for.
    async fn start(&self, cfg: &Config, tun: &str) -> anyhow::Result<Overlay> {
        let seed = rand::random();
        if !self.userspace {
            if self.socks5.is_some() || !self.forwards.is_empty() || !self.exposes.is_empty() {
                bail!("--socks5, --forward and --expose need --userspace");
            }
            return Ok(Overlay::start(cfg, tun, seed).await?);
        }
        let options = UserspaceOptions {
            socks5: self.socks5,
            forwards: self.forwards.clone(),
            exposes: self.exposes.clone(),
        };
        let ov = Overlay::start_userspace(cfg, tun, seed, &options).await?;
        tracing::info!(
            socks5 = ?self.socks5,
            forwards = self.forwards.len(),
            exposes = self.exposes.len(),
            "userspace mode (no TUN)"
        );
        Ok(ov)
    }
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Meta endpoints (`host:port,...`).
    #[arg(long, value_delimiter = ',', required = true)]
    meta: Vec<String>,
    /// This daemon's name in meta (one daemon per name).
    #[arg(long)]
    name: String,
    /// The site it links.
    #[arg(long)]
    site: String,
    /// Its overlay address with the overlay's prefix (e.g. `10.90.1.1/16`).
    #[arg(long)]
    address: IpNet,
    /// UDP port.
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Where peers reach this daemon (`ip:port`; repeatable). None: behind NAT, it dials out.
    #[arg(long = "endpoint")]
    endpoints: Vec<String>,
    /// Subnets behind this site that it routes (repeatable).
    #[arg(long = "subnet")]
    subnets: Vec<IpNet>,
    /// Relay traffic between sites that cannot reach each other directly (behind NATs). For a
    /// cloud site with a public endpoint.
    #[arg(long)]
    relay: bool,
    /// Keeps the private key (created on first start, mode 0600) and the cached peer list.
    /// [default: /var/lib/continuum/overlay-NAME]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Name of the TUN device to create.
    #[arg(long, default_value = "cnt0")]
    tun: String,
    /// Inner MTU.
    #[arg(long, default_value_t = DEFAULT_MTU)]
    mtu: usize,
    #[command(flatten)]
    userspace: UserspaceArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The daemon's TUN device.
    #[arg(long, default_value = "cnt0")]
    tun: String,
    /// Its status socket [default: /run/continuum/overlay-TUN.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

async fn shutdown() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    for e in &args.endpoints {
        if e.parse::<std::net::SocketAddr>().is_err() {
            bail!("--endpoint {e:?} is not ip:port");
        }
    }
    let state = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/continuum/overlay-{}", args.name)));
    let private_key = control::load_or_create_key(&state.join("private.key"))?;
    let cfg = Config {
        interface: InterfaceConfig {
            private_key,
            listen_port: Some(args.listen_port),
            addresses: vec![args.address],
            mtu: args.mtu,
        },
        peers: Vec::new(),
    };
    if args.relay && args.endpoints.is_empty() {
        bail!("--relay needs an --endpoint the other sites can reach");
    }
    let mut ov = args.userspace.start(&cfg, &args.tun).await?;
    ov.device.forwarding = args.relay;
    let public_key = ov.device.public_key();
    let host = match args.address {
        IpNet::V4(a) => IpNet::from(ipnet::Ipv4Net::new(a.addr(), 32)?),
        IpNet::V6(a) => IpNet::from(ipnet::Ipv6Net::new(a.addr(), 128)?),
    };
    let spec = SiteSpec {
        name: args.name.clone(),
        site: args.site.clone(),
        endpoints: args.endpoints.clone(),
        allowed_ips: std::iter::once(host).chain(args.subnets.clone()).collect(),
        relay: args.relay,
    };
    let cache = Cache {
        path: state.join("peers.json"),
    };
    let cached = control::cached_peers(&cache, &args.name)?;
    tracing::info!(
        tun = %args.tun,
        port = ov.local_port()?,
        public_key = %keys::encode(&public_key),
        cached_peers = cached.len(),
        "overlay up"
    );
    let (tx, rx) = tokio::sync::watch::channel(cached);
    let meta = continuum_meta_client::MetaClient::connect(&args.meta)?;
    let (observed_tx, observed_rx) = tokio::sync::watch::channel(Vec::new());
    let follower = tokio::spawn(control::follow(
        meta,
        spec,
        public_key,
        cache,
        tx,
        observed_rx,
    ));
    let controls = Controls {
        peers: Some(rx),
        status_socket: Some(driver::status_socket(&args.tun)),
        observed: Some(observed_tx),
    };
    let r = ov.run_with(controls, shutdown()).await;
    follower.abort();
    r?;
    tracing::info!("overlay stopped");
    Ok(())
}

fn ago(unix: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let s = now.saturating_sub(unix);
    match s {
        0..=119 => format!("{s} seconds ago"),
        120..=7199 => format!("{} minutes, {} seconds ago", s / 60, s % 60),
        _ => format!("{} hours, {} minutes ago", s / 3600, s % 3600 / 60),
    }
}

/// `wg show`'s layout.
fn render(s: &Status) -> String {
    let mut out = format!(
        "interface: {}\n  public key: {}\n  listening port: {}\n",
        s.interface, s.public_key, s.listen_port
    );
    if s.relaying {
        out.push_str(&format!("  relaying: {} packets forwarded\n", s.forwarded));
    }
    if s.relayed > 0 {
        out.push_str(&format!("  sent through a relay: {} packets\n", s.relayed));
    }
    let u = &s.udp;
    if u.send_calls > 0 || u.recv_calls > 0 {
        out.push_str(&format!(
            "  udp batching: {} datagrams in {} sends, {} in {} receives\n",
            u.sent, u.send_calls, u.received, u.recv_calls
        ));
    }
    for p in &s.peers {
        out.push_str(&format!("\npeer: {}", p.public_key));
        if !p.name.is_empty() {
            out.push_str(&format!(" ({})", p.name));
        }
        out.push('\n');
        if p.relay {
            out.push_str("  relay: yes\n");
        }
        if p.via_relay {
            out.push_str("  path: through a relay (no direct path)\n");
        }
        if let Some(e) = &p.endpoint {
            out.push_str(&format!("  endpoint: {e}\n"));
        }
        out.push_str(&format!(
            "  allowed ips: {}\n",
            if p.allowed_ips.is_empty() {
                "(none)".to_string()
            } else {
                p.allowed_ips.join(", ")
            }
        ));
        if let Some(h) = p.latest_handshake {
            out.push_str(&format!("  latest handshake: {}\n", ago(h)));
        }
        if p.rx_bytes > 0 || p.tx_bytes > 0 {
            out.push_str(&format!(
                "  transfer: {} received, {} sent\n",
                crate::block::human(p.rx_bytes),
                crate::block::human(p.tx_bytes)
            ));
        }
        if let Some(k) = p.persistent_keepalive {
            out.push_str(&format!("  persistent keepalive: every {k} seconds\n"));
        }
    }
    out
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let path = args
        .socket
        .unwrap_or_else(|| driver::status_socket(&args.tun));
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::UnixStream::connect(&path),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{}: no answer", path.display()))?
    .with_context(|| {
        format!(
            "no overlay daemon answers on {} (is `continuum overlay up --tun {}` running?)",
            path.display(),
            args.tun
        )
    })?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut body))
        .await
        .map_err(|_| anyhow::anyhow!("{}: the status did not arrive", path.display()))??;
    let status: Status = serde_json::from_slice(&body)
        .with_context(|| format!("{}: not an overlay status", path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

pub async fn overlay(c: OverlayCommand) -> anyhow::Result<()> {
    match c {
        OverlayCommand::Up(args) => up(*args).await,
        OverlayCommand::Show(args) => show(args).await,
        OverlayCommand::Genkey => {
            let mut k = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
            println!("{}", keys::encode(&k));
            Ok(())
        }
        OverlayCommand::Pubkey => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            let private = keys::decode(&text)?;
            let public = continuum_overlay::device::Device::new(private, 0).public_key();
            println!("{}", keys::encode(&public));
            Ok(())
        }
        OverlayCommand::Run(args) => {
            let text = std::fs::read_to_string(&args.config)
                .with_context(|| format!("reading {}", args.config.display()))?;
            let cfg =
                Config::parse(&text).with_context(|| format!("in {}", args.config.display()))?;
            let ov = args.userspace.start(&cfg, &args.tun).await?;
            tracing::info!(
                tun = %args.tun,
                port = ov.local_port()?,
                public_key = %keys::encode(&ov.device.public_key()),
                peers = cfg.peers.len(),
                "overlay up"
            );
            let controls = Controls {
                status_socket: Some(driver::status_socket(&args.tun)),
                ..Controls::default()
            };
            ov.run_with(controls, shutdown()).await?;
            tracing::info!("overlay stopped");
            Ok(())
        }
    }
}
