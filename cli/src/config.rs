//! `continuum meta`: flags, the TOML config file, and running the member.
//!
//! Every flag can also be set in the file given with `--config` (same names, kebab-case);
//! a flag on the command line wins over the file, the file over the default.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use continuum_meta::core::CoreConfig;
use continuum_meta::server::{self, ServerConfig};
use continuum_proto::meta::Member;
use serde::Deserialize;

/// Default ports: client API, Raft peers, metrics (member N of `continuum up` adds N).
pub const DEFAULT_CLIENT_PORT: u16 = 7310;
pub const DEFAULT_PEER_PORT: u16 = 7320;

#[derive(Args, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetaArgs {
    /// TOML file with any of these settings (keys are the flag names without `--`).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This member's id: a non-zero number unique in the cluster. [default: 1]
    #[arg(long)]
    pub id: Option<u64>,
    /// Directory for this member's RocksDB (log, hard state, state machine). [default: ./meta-<id>]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address for the client API (gRPC). [default: 127.0.0.1:7311]
    #[arg(long, value_name = "ADDR")]
    pub listen_client: Option<SocketAddr>,
    /// Address for Raft traffic from other members (gRPC). [default: 127.0.0.1:7321]
    #[arg(long, value_name = "ADDR")]
    pub listen_peer: Option<SocketAddr>,
    /// Members of a new cluster as `ID=PEER_ADDR/CLIENT_ADDR,...`; with --join, the members to
    /// contact. Used only when the data dir is empty. [default: this member alone]
    #[arg(long, value_name = "LIST")]
    pub initial_cluster: Option<String>,
    /// Join an existing cluster (after `continuum member add`) instead of bootstrapping one.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub join: Option<bool>,
    /// Address for Prometheus metrics (`/metrics`) and `/health`. [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Raft tick interval in milliseconds. [default: 100]
    #[arg(long, value_name = "MS")]
    pub tick_ms: Option<u64>,
    /// Ticks without a leader before a follower campaigns (randomised up to 1.5 times this).
    /// [default: 10]
    #[arg(long, value_name = "TICKS")]
    pub election_ticks: Option<usize>,
    /// Ticks between leader heartbeats. [default: 1]
    #[arg(long, value_name = "TICKS")]
    pub heartbeat_ticks: Option<usize>,
    /// Linearizable reads: `safe` (ReadIndex, a quorum round per read batch) or `lease`
    /// (leader lease under check-quorum; assumes bounded clock drift). [default: safe]
    #[arg(long, value_name = "MODE")]
    pub read_mode: Option<String>,
    /// A request not finished in this many milliseconds fails with a timeout. [default: 5000]
    #[arg(long, value_name = "MS")]
    pub request_timeout_ms: Option<u64>,
    /// Applied entries kept in the log before it is compacted (followers further behind get a
    /// snapshot). [default: 10000]
    #[arg(long, value_name = "N")]
    pub snapshot_entries: Option<u64>,
    /// Refuse writes (space exceeded) once the store is larger than this. [default: 268435456]
    #[arg(long, value_name = "BYTES")]
    pub quota_bytes: Option<u64>,
    /// Refuse writes while the data disk has less free space than this. [default: 67108864]
    #[arg(long, value_name = "BYTES")]
    pub min_free_bytes: Option<u64>,
    /// Testing only: accept partition commands on the peer port.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub enable_fault_injection: Option<bool>,
}

macro_rules! merge {
    ($cli:ident, $file:ident, $($f:ident),*) => {
        $( if $cli.$f.is_none() { $cli.$f = $file.$f; } )*
    };
}

impl MetaArgs {
    /// Fills unset flags from the config file, if any.
    pub fn with_file(mut self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let file: MetaArgs = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        merge!(
            self,
            file,
            id,
            data_dir,
            listen_client,
            listen_peer,
            initial_cluster,
            join,
            metrics_addr,
            tick_ms,
            election_ticks,
            heartbeat_ticks,
            read_mode,
            request_timeout_ms,
            snapshot_entries,
            quota_bytes,
            min_free_bytes,
            enable_fault_injection
        );
        Ok(self)
    }

    /// Resolves defaults and checks the settings.
    pub fn server_config(self) -> anyhow::Result<ServerConfig> {
        let id = self.id.unwrap_or(1);
        if id == 0 {
            bail!("--id must be a non-zero number");
        }
        let client = self
            .listen_client
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLIENT_PORT + 1)));
        let peer = self
            .listen_peer
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], DEFAULT_PEER_PORT + 1)));
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| PathBuf::from(format!("meta-{id}")));
        let mut cfg = ServerConfig::new(id, data_dir, client, peer);
        cfg.initial_cluster = match &self.initial_cluster {
            Some(s) => parse_cluster(s)?,
            None => vec![Member {
                id,
                peer_addr: peer.to_string(),
                client_addr: client.to_string(),
                is_learner: false,
            }],
        };
        cfg.join = self.join.unwrap_or(false);
        cfg.metrics_addr = self.metrics_addr;
        cfg.tick_ms = self.tick_ms.unwrap_or(100);
        if cfg.tick_ms == 0 {
            bail!("--tick-ms must be at least 1");
        }
        let mut core = CoreConfig::new(id);
        core.election_ticks = self.election_ticks.unwrap_or(core.election_ticks);
        core.heartbeat_ticks = self.heartbeat_ticks.unwrap_or(core.heartbeat_ticks);
        if core.heartbeat_ticks == 0 || core.election_ticks <= core.heartbeat_ticks {
            bail!(
                "--election-ticks must be larger than --heartbeat-ticks, which must be at least 1"
            );
        }
        if let Some(m) = &self.read_mode {
            core.read_mode = server::parse_read_mode(m).map_err(anyhow::Error::msg)?;
        }
        core.request_timeout_ms = self.request_timeout_ms.unwrap_or(core.request_timeout_ms);
        core.snapshot_entries = self.snapshot_entries.unwrap_or(core.snapshot_entries);
        if core.snapshot_entries < 4 {
            bail!("--snapshot-entries must be at least 4");
        }
        core.quota_bytes = self.quota_bytes.unwrap_or(core.quota_bytes);
        core.min_free_bytes = self.min_free_bytes.unwrap_or(core.min_free_bytes);
        cfg.core = core;
        cfg.enable_fault_injection = self.enable_fault_injection.unwrap_or(false);
        Ok(cfg)
    }
}

/// Parses `ID=PEER/CLIENT,...`.
pub fn parse_cluster(s: &str) -> anyhow::Result<Vec<Member>> {
    let mut out: Vec<Member> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addrs) = part
            .split_once('=')
            .with_context(|| format!("cluster entry {part:?} is not ID=PEER_ADDR/CLIENT_ADDR"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("member id {id:?} is not a number"))?;
        let (peer, client) = addrs
            .split_once('/')
            .with_context(|| format!("cluster entry {part:?} is not ID=PEER_ADDR/CLIENT_ADDR"))?;
        for a in [peer, client] {
            a.parse::<SocketAddr>()
                .with_context(|| format!("{a:?} is not a host:port address"))?;
        }
        if id == 0 || out.iter().any(|m| m.id == id) {
            bail!("member ids must be non-zero and unique ({id})");
        }
        out.push(Member {
            id,
            peer_addr: peer.to_string(),
            client_addr: client.to_string(),
            is_learner: false,
        });
    }
    if out.is_empty() {
        bail!("the cluster list is empty");
    }
    Ok(out)
}

pub async fn run_meta(args: MetaArgs) -> anyhow::Result<()> {
    let cfg = args.with_file()?.server_config()?;
    let handle = server::start(cfg)
        .await
        .context("starting the meta member")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
        _ = handle.stopped() => {
            handle.shutdown();
            bail!("the member stopped (removed from the cluster or a storage failure; see the log)");
        }
    }
    tokio::task::spawn_blocking(move || handle.shutdown())
        .await
        .context("shutting down")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_fill_unset_flags_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.toml");
        std::fs::write(&path, "id = 7\ntick-ms = 50\nread-mode = \"lease\"\n").unwrap();
        let args = MetaArgs {
            config: Some(path),
            tick_ms: Some(20),
            ..Default::default()
        };
        let cfg = args.with_file().unwrap().server_config().unwrap();
        assert_eq!(cfg.id, 7);
        assert_eq!(cfg.tick_ms, 20);
        assert_eq!(cfg.core.read_mode, continuum_meta::core::ReadMode::Lease);
    }

    #[test]
    fn bad_settings_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.toml");
        std::fs::write(&path, "no-such-setting = 1\n").unwrap();
        let err = MetaArgs {
            config: Some(path),
            ..Default::default()
        }
        .with_file()
        .unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
        assert!(parse_cluster("1=127.0.0.1:1").is_err());
        assert!(parse_cluster("x=127.0.0.1:1/127.0.0.1:2").is_err());
        assert!(parse_cluster("1=a/b").is_err());
        assert_eq!(
            parse_cluster("1=127.0.0.1:1/127.0.0.1:2,2=127.0.0.1:3/127.0.0.1:4")
                .unwrap()
                .len(),
            2
        );
        assert!(MetaArgs {
            id: Some(0),
            ..Default::default()
        }
        .server_config()
        .is_err());
    }
}
