//! Admin commands: `kv`, `lease`, `member`, `status`, `site`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use continuum_meta_client::{prefix_end, MetaClient};
use continuum_proto::meta::{event::EventType, Member, RangeRequest};
use continuum_proto::records_pb::{Site, SiteKind};

/// Where to find meta.
#[derive(Args, Debug, Clone)]
pub struct Endpoints {
    /// Client addresses of meta members, comma-separated.
    #[arg(
        long,
        env = "CONTINUUM_ENDPOINTS",
        default_value = "127.0.0.1:7311,127.0.0.1:7312,127.0.0.1:7313",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,
}

impl Endpoints {
    pub(crate) fn client(&self) -> anyhow::Result<MetaClient> {
        Ok(MetaClient::connect(&self.endpoints)?)
    }
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Write KEY=VALUE (optionally attached to a lease).
    Put {
        key: String,
        value: String,
        /// Attach the key to this lease id.
        #[arg(long, default_value_t = 0)]
        lease: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Read a key, or every key under a prefix (linearizable unless --serializable).
    Get {
        key: String,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
        /// Read from one member without a quorum round (may be stale).
        #[arg(long)]
        serializable: bool,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Delete a key, or every key under a prefix.
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Print changes to a key or prefix as they happen (from --rev if given). Ctrl-C stops.
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Start from this revision (replays retained history).
        #[arg(long, default_value_t = 0)]
        rev: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn kv(cmd: KvCommand) -> anyhow::Result<()> {
    match cmd {
        KvCommand::Put {
            key,
            value,
            lease,
            ep,
        } => {
            let r = ep
                .client()?
                .put_with(continuum_proto::meta::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    lease,
                    prev_kv: false,
                })
                .await?;
            println!(
                "OK (revision {})",
                r.header.map(|h| h.revision).unwrap_or(0)
            );
        }
        KvCommand::Get {
            key,
            prefix,
            serializable,
            keys_only,
            ep,
        } => {
            let range_end = if prefix {
                prefix_end(key.as_bytes())
            } else {
                Vec::new()
            };
            let r = ep
                .client()?
                .range(RangeRequest {
                    key: key.into_bytes(),
                    range_end,
                    serializable,
                    keys_only,
                    ..Default::default()
                })
                .await?;
            for kv in &r.kvs {
                println!("{}", show(&kv.key));
                if !keys_only {
                    println!("{}", show(&kv.value));
                }
            }
            if r.more {
                eprintln!("(more keys not shown)");
            }
        }
        KvCommand::Del { key, prefix, ep } => {
            let range_end = if prefix {
                prefix_end(key.as_bytes())
            } else {
                Vec::new()
            };
            let r = ep
                .client()?
                .delete_range(continuum_proto::meta::DeleteRangeRequest {
                    key: key.into_bytes(),
                    range_end,
                    prev_kv: false,
                })
                .await?;
            println!("{}", r.deleted);
        }
        KvCommand::Watch {
            key,
            prefix,
            rev,
            ep,
        } => {
            let client = ep.client()?;
            let range_end = if prefix {
                prefix_end(key.as_bytes())
            } else {
                Vec::new()
            };
            let mut w = client.watch(key.into_bytes(), range_end, rev);
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    b = w.next() => {
                        let b = b?;
                        for e in b.events {
                            let kv = e.kv.unwrap_or_default();
                            let kind = if e.r#type == EventType::Delete as i32 { "DELETE" } else { "PUT" };
                            println!("{} {} {}\n{}", b.revision, kind, show(&kv.key), show(&kv.value));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    /// Create a lease with a TTL in seconds; prints its id.
    Grant {
        ttl_seconds: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Revoke a lease now (its keys are deleted).
    Revoke {
        id: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Keep a lease alive until Ctrl-C.
    KeepAlive {
        id: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Show a lease's remaining time and keys.
    Ttl {
        id: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
}

pub async fn lease(cmd: LeaseCommand) -> anyhow::Result<()> {
    match cmd {
        LeaseCommand::Grant { ttl_seconds, ep } => {
            let r = ep.client()?.lease_grant(ttl_seconds).await?;
            println!("lease {} granted with TTL {}s", r.id, r.ttl_seconds);
        }
        LeaseCommand::Revoke { id, ep } => {
            ep.client()?.lease_revoke(id).await?;
            println!("lease {id} revoked");
        }
        LeaseCommand::KeepAlive { id, ep } => {
            let client = ep.client()?;
            loop {
                let r = client.lease_keep_alive(id).await?;
                println!("lease {id} kept alive, TTL {}s", r.ttl_seconds);
                let wait = std::time::Duration::from_millis((r.ttl_seconds * 1000 / 3).max(100));
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        LeaseCommand::Ttl { id, ep } => {
            let r = ep.client()?.lease_time_to_live(id, true).await?;
            println!(
                "lease {id}: granted TTL {}s, remaining {:.1}s, {} key(s)",
                r.granted_ttl_seconds,
                r.remaining_ms as f64 / 1000.0,
                r.keys.len()
            );
            for k in r.keys {
                println!("  {}", show(&k));
            }
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// List members.
    List {
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Add a member as a learner; then start it with `continuum meta --join`, and promote it
    /// once it has caught up.
    Add {
        /// New member's id (non-zero, unused).
        id: u64,
        /// Its Raft address (host:port).
        #[arg(long)]
        peer_addr: String,
        /// Its client address (host:port).
        #[arg(long)]
        client_addr: String,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Promote a caught-up learner to a voter.
    Promote {
        id: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Remove a member (a leader hands over leadership first).
    Remove {
        id: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
}

fn print_members(ms: &[Member]) {
    println!(
        "{:>4}  {:<8}  {:<22}  {:<22}",
        "ID", "ROLE", "PEER", "CLIENT"
    );
    for m in ms {
        let role = if m.is_learner { "learner" } else { "voter" };
        println!(
            "{:>4}  {:<8}  {:<22}  {:<22}",
            m.id, role, m.peer_addr, m.client_addr
        );
    }
}

pub async fn member(cmd: MemberCommand) -> anyhow::Result<()> {
    let ms = match cmd {
        MemberCommand::List { ep } => ep.client()?.member_list().await?,
        MemberCommand::Add {
            id,
            peer_addr,
            client_addr,
            ep,
        } => {
            for a in [&peer_addr, &client_addr] {
                a.parse::<std::net::SocketAddr>()
                    .with_context(|| format!("{a:?} is not a host:port address"))?;
            }
            ep.client()?
                .member_add(Member {
                    id,
                    peer_addr,
                    client_addr,
                    is_learner: true,
                })
                .await?
        }
        MemberCommand::Promote { id, ep } => ep.client()?.member_promote(id).await?,
        MemberCommand::Remove { id, ep } => ep.client()?.member_remove(id).await?,
    };
    print_members(&ms);
    Ok(())
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub ep: Endpoints,
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = args.ep.client()?;
    let mut rows = Vec::new();
    let mut endpoints = args.ep.endpoints.clone();
    // Include members the given endpoints know about.
    if let Ok(ms) = client.member_list().await {
        for m in ms {
            if !endpoints.contains(&m.client_addr) {
                endpoints.push(m.client_addr);
            }
        }
    }
    let mut healthy = 0;
    for ep in &endpoints {
        let r = client.status_of(ep).await;
        if r.as_ref().is_ok_and(|s| s.leader_id != 0) {
            healthy += 1;
        }
        rows.push((ep.clone(), r));
    }
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(ep, r)| match r {
                Ok(s) => serde_json::json!({
                    "endpoint": ep, "member": s.member_id, "leader": s.leader_id,
                    "state": s.raft_state, "term": s.term, "commit": s.commit_index,
                    "applied": s.applied_index, "db_size_bytes": s.db_size_bytes,
                    "first_log_index": s.first_log_index, "learner": s.is_learner,
                }),
                Err(e) => serde_json::json!({"endpoint": ep, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<22} {:>6} {:<13} {:>6} {:>6} {:>9} {:>9} {:>10}",
            "ENDPOINT", "MEMBER", "STATE", "LEADER", "TERM", "COMMIT", "APPLIED", "DB SIZE"
        );
        for (ep, r) in &rows {
            match r {
                Ok(s) => println!(
                    "{:<22} {:>6} {:<13} {:>6} {:>6} {:>9} {:>9} {:>10}",
                    ep,
                    s.member_id,
                    if s.is_learner {
                        "learner"
                    } else {
                        s.raft_state.as_str()
                    },
                    s.leader_id,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    human_bytes(s.db_size_bytes)
                ),
                Err(e) => println!("{ep:<22} unreachable: {e}"),
            }
        }
    }
    if healthy == 0 {
        bail!("no meta member reports a leader");
    }
    if !args.json {
        block_status(&client).await;
    }
    Ok(())
}

/// Block servers (up / heartbeat missing / declared down) and running repair or scrub passes.
async fn block_status(client: &MetaClient) {
    use continuum_proto::records_pb::{Node, NodeAlive, NodeRole, VolumePass};
    let (Ok(nodes), Ok(alive)) = (
        client.records::<Node>().await,
        client.records::<NodeAlive>().await,
    ) else {
        return;
    };
    let alive: Vec<u64> = alive.iter().map(|a| a.record.id).collect();
    let blocks: Vec<&Node> = nodes
        .iter()
        .map(|v| &v.record)
        .filter(|n| n.role == NodeRole::Block as i32)
        .collect();
    if blocks.is_empty() {
        return;
    }
    let down: Vec<u64> = blocks
        .iter()
        .filter(|n| n.declared_down)
        .map(|n| n.id)
        .collect();
    let missing: Vec<u64> = blocks
        .iter()
        .filter(|n| !n.declared_down && !alive.contains(&n.id))
        .map(|n| n.id)
        .collect();
    println!();
    println!(
        "block servers: {} up, {} missing heartbeat {:?}, {} declared down {:?}",
        blocks.len() - down.len() - missing.len(),
        missing.len(),
        missing,
        down.len(),
        down
    );
    if let Ok(volumes) = client
        .records::<continuum_proto::records_pb::Volume>()
        .await
    {
        println!("volumes: {}", volumes.len());
        let records: Vec<_> = volumes.into_iter().map(|v| v.record).collect();
        match continuum_blockstore::cluster::volumes_health(client, &records).await {
            Ok(health) => {
                for (v, h) in records.iter().zip(health) {
                    println!(
                        "  {:<24} {:>10}  {:<18} {}",
                        v.name,
                        human_bytes(v.size_bytes),
                        h.writer.clone().unwrap_or_else(|| "detached".into()),
                        h.summary()
                    );
                }
            }
            Err(e) => println!("  (health unknown: {e})"),
        }
    }
    if let Ok(passes) = client.records::<VolumePass>().await {
        for p in passes.into_iter().map(|v| v.record) {
            let pct = if p.stripes_total > 0 {
                p.stripes_done as f64 * 100.0 / p.stripes_total as f64
            } else {
                0.0
            };
            println!(
                "{} of volume {}: {}/{} stripes ({pct:.0}%), {} rebuilt, by {}",
                p.kind,
                p.volume,
                p.stripes_done,
                p.stripes_total,
                human_bytes(p.bytes_rebuilt),
                p.holder
            );
        }
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[derive(Subcommand, Debug)]
pub enum SiteCommand {
    /// List sites.
    List {
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Register a site.
    Create {
        name: String,
        /// `cloud` or `edge`.
        #[arg(long, default_value = "edge", value_parser = ["cloud", "edge"])]
        kind: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        ep: Endpoints,
    },
}

pub async fn site(cmd: SiteCommand) -> anyhow::Result<()> {
    match cmd {
        SiteCommand::List { ep } => {
            println!("{:<20} {:<6} DESCRIPTION", "NAME", "KIND");
            for s in ep.client()?.records::<Site>().await? {
                let kind = match SiteKind::from_i32(s.record.kind) {
                    Some(SiteKind::Cloud) => "cloud",
                    Some(SiteKind::Edge) => "edge",
                    _ => "?",
                };
                println!("{:<20} {:<6} {}", s.record.name, kind, s.record.description);
            }
        }
        SiteCommand::Create {
            name,
            kind,
            description,
            ep,
        } => {
            if name.is_empty() || name.contains('/') {
                bail!("a site name must be non-empty and contain no '/'");
            }
            let kind = if kind == "cloud" {
                SiteKind::Cloud
            } else {
                SiteKind::Edge
            };
            let created = ep
                .client()?
                .create_record(&Site {
                    schema_version: 0,
                    name: name.clone(),
                    kind: kind as i32,
                    description,
                })
                .await;
            match created {
                Err(continuum_meta_client::Error::AlreadyExists { .. }) => {
                    bail!("site {name} already exists")
                }
                other => {
                    other?;
                }
            }
            println!("site {name} created");
        }
    }
    Ok(())
}
