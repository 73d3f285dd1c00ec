//! `continuum block` (the block server daemon) and the block store's admin commands:
//! `continuum volume ...` and `continuum node list`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use continuum_blockstore::cluster::{self, Registration};
use continuum_blockstore::server::{self, BlockServerConfig};
use continuum_blockstore::volume::Volume;
use continuum_proto::records_pb::Volume as VolumeRecord;

use crate::admin::Endpoints;

/// Parses sizes like `4096`, `64K`, `512M`, `10G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..]
                .trim_end_matches(['i', 'B', 'b'])
                .to_ascii_uppercase();
            let m: u64 = match unit.as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "P" => 1 << 50,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 10G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[derive(Args, Debug)]
pub struct BlockArgs {
    /// This server's node id: a non-zero number unique among block servers.
    #[arg(long)]
    pub id: u64,
    /// Directory for the shard data file (`data`) and its RocksDB index (`index`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Address to serve the block protocol on.
    #[arg(long, default_value = "127.0.0.1:7401", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address other nodes reach this server at. [default: --listen]
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Client addresses of meta members, comma-separated.
    #[arg(
        long,
        env = "CONTINUUM_ENDPOINTS",
        default_value = "127.0.0.1:7311,127.0.0.1:7312,127.0.0.1:7313",
        value_delimiter = ','
    )]
    pub meta: Vec<String>,
    /// Size of the data file (sparse: only written data uses disk space).
    #[arg(long, default_value = "16G", value_parser = parse_size, value_name = "SIZE")]
    pub capacity: u64,
    /// Failure domain: site, rack and host of this server (shards of a stripe go to
    /// different hosts). [default host: block-<id>]
    #[arg(long, default_value = "local")]
    pub site: String,
    #[arg(long, default_value = "rack-1")]
    pub rack: String,
    #[arg(long)]
    pub host: Option<String>,
    /// Sync and free superseded space at least this often, in milliseconds.
    #[arg(long, default_value_t = 200, value_name = "MS")]
    pub flush_interval_ms: u64,
    /// Memory for the object records used last, so hot writes skip the index lookup
    /// (0 disables).
    #[arg(long, default_value = "16M", value_parser = parse_size, value_name = "SIZE")]
    pub record_cache: u64,
    /// Every so many seconds, declare block servers whose heartbeat has been gone for
    /// --down-grace-seconds down (their shards move and are rebuilt). 0 = never (another
    /// server does it).
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    pub failure_check_seconds: u64,
    /// How long a block server's heartbeat may be missing before it is declared down.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub down_grace_seconds: u64,
    /// When this server declares another one down, repair the detached volumes at once
    /// (attached ones are repaired by their writer).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub auto_repair: bool,
    /// Most bytes per second an automatic repair rebuilds (0 = unthrottled).
    #[arg(long, default_value = "0", value_parser = parse_size, value_name = "SIZE")]
    pub repair_rate: u64,
    /// Scrub the detached volumes every so many seconds (0 = never): verify every shard's
    /// checksums and the parity and repair what is wrong, at most --scrub-rate.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub scrub_interval_seconds: u64,
    /// Most bytes per second a background scrub reads.
    #[arg(long, default_value = "32M", value_parser = parse_size, value_name = "SIZE")]
    pub scrub_rate: u64,
    /// Address for Prometheus metrics (`/metrics`: reads, writes, checksum errors, refused
    /// stale writers, space) and `/health`. [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

pub async fn run_block(args: BlockArgs) -> anyhow::Result<()> {
    if args.id == 0 {
        bail!("--id must be a non-zero number");
    }
    let cfg = BlockServerConfig {
        node_id: args.id,
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        capacity_bytes: args.capacity,
        flush_interval_ms: args.flush_interval_ms,
        record_cache_bytes: usize::try_from(args.record_cache)
            .context("--record-cache is too large")?,
    };
    let srv = tokio::task::spawn_blocking(move || server::start(cfg))
        .await?
        .map_err(|e| anyhow::anyhow!(e))
        .context("starting the block server")?;
    let address = args
        .advertise
        .clone()
        .unwrap_or_else(|| srv.addr.to_string());
    if let Some(addr) = args.metrics_addr {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let stats = srv.stats.clone();
        let node = args.id;
        tokio::spawn(continuum_meta::metrics::serve_text(
            listener,
            move || stats.render(node),
            || Ok("ok\n"),
        ));
    }
    tracing::info!(node = args.id, addr = %srv.addr, data_dir = %args.data_dir.display(), "block server listening");
    let meta = continuum_meta_client::MetaClient::connect(&args.meta)?;
    let reg = Registration {
        id: args.id,
        address,
        capacity_bytes: args.capacity,
        site: args.site.clone(),
        rack: args.rack.clone(),
        host: args
            .host
            .clone()
            .unwrap_or_else(|| format!("block-{}", args.id)),
    };
    // Registration retries while meta is starting: the server already serves I/O.
    let heartbeat = loop {
        match cluster::register(&meta, &reg).await {
            Ok(h) => break h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register in meta yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    tracing::info!(node = args.id, "registered in meta");
    let detector = (args.failure_check_seconds > 0).then(|| {
        let meta = meta.clone();
        let grace = Duration::from_secs(args.down_grace_seconds);
        let every = Duration::from_secs(args.failure_check_seconds);
        let (auto_repair, rate, holder) = (
            args.auto_repair,
            args.repair_rate,
            format!("block-{}/repair", args.id),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match cluster::declare_down_pass(&meta, grace).await {
                    Ok(declared) if !declared.is_empty() && auto_repair => {
                        let pass = cluster::Pass::Repair;
                        let timeout = Duration::from_secs(5);
                        let run = cluster::maintain_detached(&meta, &holder, pass, rate, timeout);
                        if let Err(e) = run.await {
                            tracing::warn!(error = %e, "automatic repair failed");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "failure detection pass failed"),
                }
            }
        })
    });
    let scrubber = (args.scrub_interval_seconds > 0).then(|| {
        let meta = meta.clone();
        let every = Duration::from_secs(args.scrub_interval_seconds);
        let (rate, holder) = (args.scrub_rate, format!("block-{}/scrub", args.id));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let pass = cluster::Pass::Scrub;
                let run =
                    cluster::maintain_detached(&meta, &holder, pass, rate, Duration::from_secs(5));
                if let Err(e) = run.await {
                    tracing::warn!(error = %e, "background scrub failed");
                }
            }
        })
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(node = args.id, "stopping");
    if let Some(s) = scrubber {
        s.abort();
    }
    heartbeat.abort();
    if let Some(d) = detector {
        d.abort();
    }
    tokio::task::spawn_blocking(move || srv.stop())
        .await?
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin-provisioned volume (no space is used until it is written).
    Create {
        name: String,
        /// Size, e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Erasure-coding profile K+M: 4+2 (default, 1.5x space), 2+1 for small sites, 1+2 for
        /// three full copies.
        #[arg(long, default_value = "4+2")]
        profile: String,
        /// Bytes of one shard per stripe (multiple of 4K).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        unit: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Show a volume: layout, writer, health, passes in progress.
    Show {
        name: String,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Grow a volume.
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Delete a volume and free its space on every block server (it must be detached).
    Delete {
        name: String,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Repair a detached volume now: take its writer lease, rebuild every missing or stale
    /// shard (after a server was lost), showing progress.
    Repair {
        name: String,
        /// Most rebuilt bytes per second (0 = unthrottled).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        rate: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Scrub a detached volume: verify every shard's checksums and the parity, and repair.
    Scrub {
        name: String,
        /// Most bytes read per second (0 = unthrottled).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        rate: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List block servers: address, failure domain, capacity, heartbeat.
    List {
        #[command(flatten)]
        ep: Endpoints,
    },
}

/// Bytes for people: `512B`, `1.5K`, `3.2G` (powers of 1024).
pub(crate) fn human(bytes: u64) -> String {
    let units = ["B", "K", "M", "G", "T", "P"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", units[u])
    }
}

pub async fn node(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::List { ep } => {
            let meta = ep.client()?;
            let alive = cluster::alive_nodes(&meta).await?;
            println!(
                "{:<6} {:<22} {:<28} {:>9} STATE",
                "ID", "ADDRESS", "SITE/RACK/HOST", "CAPACITY"
            );
            for v in meta.records::<continuum_proto::records_pb::Node>().await? {
                let n = v.record;
                let d = n.domain.clone().unwrap_or_default();
                let state = if n.declared_down {
                    "down (shards moved)"
                } else if alive.contains(&n.id) {
                    "up"
                } else {
                    "missing heartbeat"
                };
                println!(
                    "{:<6} {:<22} {:<28} {:>9} {state}",
                    n.id,
                    n.address,
                    format!("{}/{}/{}", d.site, d.rack, d.host),
                    human(n.capacity_bytes)
                );
            }
        }
    }
    Ok(())
}

/// Opens a detached volume as its writer (for repair and scrub).
async fn open_detached(
    meta: &continuum_meta_client::MetaClient,
    name: &str,
    holder: &str,
) -> anyhow::Result<(
    std::sync::Arc<Volume>,
    continuum_proto::records_pb::WriterLease,
)> {
    let lease = match meta.acquire_writer_lease(name, holder, 30).await {
        Ok(l) => l,
        Err(continuum_meta_client::Error::Conflict { .. }) => {
            bail!("volume {name} is attached: its writer repairs it")
        }
        Err(continuum_meta_client::Error::NotFound { .. }) => bail!("volume {name} not found"),
        Err(e) => return Err(e.into()),
    };
    meta.spawn_keep_alive(lease.lease_id, 30);
    let Some(v) = meta.record::<VolumeRecord>(name).await? else {
        bail!("volume {name} not found");
    };
    let spec = cluster::spec_of(&v.record)?;
    let servers = cluster::cluster_map(meta).await?;
    let vol = Volume::open(spec, lease.epoch, &servers, Duration::from_secs(5)).await?;
    Ok((vol, lease))
}

async fn release(
    meta: &continuum_meta_client::MetaClient,
    lease: &continuum_proto::records_pb::WriterLease,
) {
    let _ = meta.lease_revoke(lease.lease_id).await;
}

/// Prints pass progress every second until `done` resolves.
async fn with_progress<T>(
    vol: &Volume,
    what: &str,
    pass: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(pass);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = &mut pass => return r,
            _ = tick.tick() => {
                let total = vol.stats.pass_stripes_total.load(Ordering::Relaxed);
                let done = vol.stats.pass_stripes_done.load(Ordering::Relaxed);
                let rebuilt = vol.stats.bytes_rebuilt.load(Ordering::Relaxed);
                if total > 0 {
                    eprintln!("{what}: {done}/{total} stripes ({:.0}%), {} rebuilt", done as f64 * 100.0 / total as f64, human(rebuilt));
                }
            }
        }
    }
}

pub async fn volume(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            profile,
            unit,
            ep,
        } => {
            let profile = cluster::parse_profile(&profile)?;
            let unit = u32::try_from(unit).context("--unit is too large")?;
            let v = cluster::create_volume(&ep.client()?, &name, size, profile, unit).await?;
            println!(
                "volume {name} created: id {}, {}, EC {}+{}, unit {}",
                v.id,
                human(size),
                profile.data,
                profile.parity,
                human(u64::from(unit))
            );
        }
        VolumeCommand::List { ep } => {
            let meta = ep.client()?;
            println!(
                "{:<6} {:<24} {:>9} {:>6} {:>6} {:>6} {:<18} HEALTH",
                "ID", "NAME", "SIZE", "EC", "UNIT", "EPOCH", "WRITER"
            );
            let records: Vec<VolumeRecord> = meta
                .records::<VolumeRecord>()
                .await?
                .into_iter()
                .map(|v| v.record)
                .collect();
            let health = cluster::volumes_health(&meta, &records).await?;
            for (r, h) in records.into_iter().zip(health) {
                let spec = cluster::spec_of(&r)?;
                println!(
                    "{:<6} {:<24} {:>9} {:>6} {:>6} {:>6} {:<18} {}",
                    r.id,
                    r.name,
                    human(r.size_bytes),
                    format!("{}+{}", spec.profile.data, spec.profile.parity),
                    human(u64::from(spec.unit)),
                    r.epoch,
                    h.writer.as_deref().unwrap_or("-"),
                    h.summary()
                );
            }
        }
        VolumeCommand::Show { name, ep } => {
            let meta = ep.client()?;
            let Some(v) = meta.record::<VolumeRecord>(&name).await? else {
                bail!("volume {name} not found");
            };
            let r = v.record;
            let spec = cluster::spec_of(&r)?;
            let h = cluster::volume_health(&meta, &r).await?;
            let (k, m) = (spec.profile.data, spec.profile.parity);
            println!("volume {name}");
            println!("  id               {}", r.id);
            println!(
                "  size             {} ({} bytes), thin",
                human(r.size_bytes),
                r.size_bytes
            );
            println!(
                "  erasure code     {k}+{m}: {:.2}x space, survives {m} lost block server(s)",
                (k + m) as f64 / k as f64
            );
            println!(
                "  layout           {} units, {} per stripe, {} placement groups, one shard per host",
                human(u64::from(spec.unit)),
                human(u64::from(spec.unit) * k as u64),
                spec.pg_count
            );
            println!("  epoch            {}", r.epoch);
            match &h.writer {
                Some(w) => println!("  writer           {w}"),
                None => println!("  writer           none (detached)"),
            }
            println!("  health           {}", h.summary());
            if !h.down.is_empty() {
                println!("  declared down    {:?} (their shards were moved)", h.down);
            }
            println!("  attach           nbd://<gateway>:10809/{name}");
        }
        VolumeCommand::Resize { name, size, ep } => {
            cluster::resize_volume(&ep.client()?, &name, size).await?;
            println!("volume {name} is now {}", human(size));
        }
        VolumeCommand::Delete { name, ep } => {
            let missed =
                cluster::delete_volume(&ep.client()?, &name, Duration::from_secs(5)).await?;
            if missed > 0 {
                println!("volume {name} deleted; {missed} block server(s) were unreachable and keep orphan shards");
            } else {
                println!("volume {name} deleted");
            }
        }
        VolumeCommand::Repair { name, rate, ep } => {
            let meta = ep.client()?;
            let (vol, lease) = open_detached(&meta, &name, "admin/repair").await?;
            let report = cluster::report_progress(
                &meta,
                &vol,
                &name,
                "repair",
                "admin/repair",
                lease.lease_id,
            );
            let r = with_progress(&vol, "repair", vol.repair_all(rate)).await;
            report.abort();
            release(&meta, &lease).await;
            let r = r?;
            println!(
                "repaired {name}: {} stripes visited, {} shards rebuilt, {} deferred (too few servers reachable)",
                r.stripes, r.shards_rebuilt, r.deferred
            );
        }
        VolumeCommand::Scrub { name, rate, ep } => {
            let meta = ep.client()?;
            let (vol, lease) = open_detached(&meta, &name, "admin/scrub").await?;
            let report = cluster::report_progress(
                &meta,
                &vol,
                &name,
                "scrub",
                "admin/scrub",
                lease.lease_id,
            );
            let r = with_progress(&vol, "scrub", vol.scrub(rate)).await;
            report.abort();
            release(&meta, &lease).await;
            let r = r?;
            println!(
                "scrubbed {name}: {} stripes, {} checksum errors, {} parity mismatches, {} shards rebuilt, {} deferred",
                r.stripes, r.checksum_errors, r.parity_mismatches, r.shards_rebuilt, r.deferred
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999P").is_err());
    }
}
