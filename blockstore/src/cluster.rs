//! The block store's records in meta: block servers registering with a heartbeat, the cluster
//! map volume clients compute placement from, volumes (create, resize, delete) and declaring
//! silent servers down.
//!
//! A block server's `Node` record is permanent; its heartbeat is a separate `NodeAlive` record
//! attached to a meta lease it keeps alive. A server whose heartbeat is gone is only degraded
//! (its shards are read around); after a grace period [`declare_down_pass`] marks it
//! `declared_down`, placement moves its shards to other servers and repair rebuilds them there.
//! Meta is never on the data path (DESIGN.md invariant 6): a volume client reads the map when it
//! opens and on changes, and keeps serving I/O from what it has while meta is unreachable.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use continuum_meta_client::{Error as MetaError, MetaClient};
use continuum_proto::records::{self as layout, Record};
use continuum_proto::records_pb::{
    ErasureProfile, FailureDomain, Node, NodeAlive, NodeRole, Volume as VolumeRecord, WriterLease,
};

use crate::ec::Profile;
use crate::layout::Layout;
use crate::placement::{DomainLevel, DEFAULT_PG_COUNT};
use crate::volume::{ServerInfo, VolumeSpec};

/// Default shard unit of new volumes.
pub const DEFAULT_UNIT_BYTES: u32 = 64 * 1024;
/// Heartbeat lease TTL of a block server.
pub const HEARTBEAT_TTL_SECONDS: u64 = 10;
/// Largest volume (a named limit: 1 PiB).
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;
/// Key of the volume id counter.
const VOLUME_ID_COUNTER: &str = "/continuum/v1/counters/volume-id";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("meta: {0}")]
    Meta(#[from] MetaError),
    #[error("volume {name} not found")]
    VolumeNotFound { name: String },
    #[error("volume {name} already exists")]
    VolumeExists { name: String },
    #[error("invalid volume: {reason}")]
    InvalidVolume { reason: String },
    #[error(
        "volume {name} is {size} bytes; shrinking to {requested} would drop data (not supported)"
    )]
    Shrink {
        name: String,
        size: u64,
        requested: u64,
    },
    #[error("volume {name} changed concurrently; retry")]
    Conflict { name: String },
    #[error("volume {name} is attached to {holder} ({reason})")]
    Attached {
        name: String,
        holder: String,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, ClusterError>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a block server says about itself when it registers.
#[derive(Clone, Debug)]
pub struct Registration {
    pub id: u64,
    pub address: String,
    pub capacity_bytes: u64,
    pub site: String,
    pub rack: String,
    pub host: String,
}

/// Registers a block server (creating or updating its `Node` record, clearing a down mark)
/// and starts its heartbeat. Returns the heartbeat task, which re-registers after a lost lease.
pub async fn register(
    meta: &MetaClient,
    reg: &Registration,
) -> Result<tokio::task::JoinHandle<()>> {
    heartbeat_once(meta, reg).await?;
    let meta = meta.clone();
    let reg = reg.clone();
    Ok(tokio::spawn(async move {
        loop {
            // The lease is kept alive by spawn_keep_alive; this loop only notices its loss.
            tokio::time::sleep(Duration::from_secs(HEARTBEAT_TTL_SECONDS / 2)).await;
            let alive = meta
                .record::<NodeAlive>(
                    &NodeAlive {
                        id: reg.id,
                        ..Default::default()
                    }
                    .name(),
                )
                .await;
            if matches!(alive, Ok(None)) {
                tracing::warn!(node = reg.id, "heartbeat lease lost; registering again");
                if let Err(e) = heartbeat_once(&meta, &reg).await {
                    tracing::warn!(node = reg.id, error = %e, "re-registration failed");
                }
            }
        }
    }))
}

async fn heartbeat_once(meta: &MetaClient, reg: &Registration) -> Result<()> {
    let lease = meta.lease_grant(HEARTBEAT_TTL_SECONDS).await?.id;
    let node = Node {
        schema_version: 0,
        id: reg.id,
        role: NodeRole::Block as i32,
        domain: Some(FailureDomain {
            site: reg.site.clone(),
            rack: reg.rack.clone(),
            host: reg.host.clone(),
        }),
        address: reg.address.clone(),
        capacity_bytes: reg.capacity_bytes,
        lease_id: lease,
        declared_down: false,
        missing_since_unix_ms: 0,
    };
    meta.put_record(&node).await?;
    let alive = NodeAlive {
        schema_version: 0,
        id: reg.id,
        started_unix_ms: now_ms(),
    };
    let key = layout::key::<NodeAlive>(&alive.name());
    let mut value = alive.clone();
    value.set_schema_version(layout::SCHEMA_VERSION);
    meta.put_with(continuum_proto::meta::PutRequest {
        key: key.into_bytes(),
        value: prost::Message::encode_to_vec(&value),
        lease,
        ..Default::default()
    })
    .await?;
    meta.spawn_keep_alive(lease, HEARTBEAT_TTL_SECONDS);
    Ok(())
}

/// The block servers in the cluster map, as volume clients see them.
pub async fn cluster_map(meta: &MetaClient) -> Result<Vec<ServerInfo>> {
    Ok(meta
        .records::<Node>()
        .await?
        .into_iter()
        .map(|v| v.record)
        .filter(|n| n.role == NodeRole::Block as i32)
        .map(|n| {
            let d = n.domain.unwrap_or_default();
            ServerInfo {
                id: n.id,
                addr: n.address,
                site: d.site,
                rack: d.rack,
                host: d.host,
                weight: (n.capacity_bytes as f64 / (1u64 << 30) as f64).max(0.01),
                up: !n.declared_down,
            }
        })
        .collect())
}

/// Ids of the block servers whose heartbeat is present.
pub async fn alive_nodes(meta: &MetaClient) -> Result<Vec<u64>> {
    Ok(meta
        .records::<NodeAlive>()
        .await?
        .into_iter()
        .map(|v| v.record.id)
        .collect())
}

/// One pass of failure detection: a block server whose heartbeat has been missing for longer
/// than `grace` is declared down (its shards move); one that is back is cleared. Safe to run
/// from several places at once (every change is a compare-and-swap). Returns the servers
/// declared down by this pass.
pub async fn declare_down_pass(meta: &MetaClient, grace: Duration) -> Result<Vec<u64>> {
    let alive = alive_nodes(meta).await?;
    let now = now_ms();
    let mut declared = Vec::new();
    for v in meta.records::<Node>().await? {
        let mut n = v.record.clone();
        if n.role != NodeRole::Block as i32 {
            continue;
        }
        let is_alive = alive.contains(&n.id);
        let changed = if is_alive {
            let was = n.missing_since_unix_ms != 0;
            n.missing_since_unix_ms = 0;
            was
        } else if n.missing_since_unix_ms == 0 {
            n.missing_since_unix_ms = now.max(1);
            true
        } else if !n.declared_down
            && now.saturating_sub(n.missing_since_unix_ms) >= grace.as_millis() as u64
        {
            n.declared_down = true;
            declared.push(n.id);
            true
        } else {
            false
        };
        if changed {
            match meta.swap_record(&n, v.mod_revision, 0).await {
                Ok(_) | Err(MetaError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for id in &declared {
        tracing::warn!(
            node = id,
            "block server declared down; its shards move to others"
        );
    }
    Ok(declared)
}

/// Parses an EC profile `K+M`.
pub fn parse_profile(s: &str) -> Result<Profile> {
    let bad = || ClusterError::InvalidVolume {
        reason: format!("profile {s:?} is not K+M (e.g. 4+2, 2+1, 1+2)"),
    };
    let (k, m) = s.split_once('+').ok_or_else(bad)?;
    let k: usize = k.trim().parse().map_err(|_| bad())?;
    let m: usize = m.trim().parse().map_err(|_| bad())?;
    Profile::new(k, m).map_err(|e| ClusterError::InvalidVolume {
        reason: e.to_string(),
    })
}

/// The volume client's spec of a volume record.
pub fn spec_of(v: &VolumeRecord) -> Result<VolumeSpec> {
    let p = v.profile.clone().unwrap_or_default();
    let profile = Profile::new(p.data_shards as usize, p.parity_shards as usize).map_err(|e| {
        ClusterError::InvalidVolume {
            reason: e.to_string(),
        }
    })?;
    Ok(VolumeSpec {
        id: v.id,
        size_bytes: v.size_bytes,
        profile,
        unit: if v.unit_bytes == 0 {
            DEFAULT_UNIT_BYTES
        } else {
            v.unit_bytes
        },
        pg_count: if v.pg_count == 0 {
            DEFAULT_PG_COUNT
        } else {
            v.pg_count
        },
        level: DomainLevel::Host,
        members: v.placement_servers.clone(),
    })
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(4096) || size > MAX_VOLUME_BYTES {
        return Err(ClusterError::InvalidVolume {
            reason: format!("size {size} must be a positive multiple of 4096 up to 1 PiB"),
        });
    }
    Ok(())
}

/// Creates a volume record with a fresh id (thin: no space is used until written).
pub async fn create_volume(
    meta: &MetaClient,
    name: &str,
    size_bytes: u64,
    profile: Profile,
    unit_bytes: u32,
) -> Result<VolumeRecord> {
    if name.is_empty() || name.contains('/') || name.len() > 200 {
        return Err(ClusterError::InvalidVolume {
            reason: "a volume name is 1-200 characters without '/'".into(),
        });
    }
    check_size(size_bytes)?;
    Layout::new(profile, unit_bytes).map_err(|e| ClusterError::InvalidVolume {
        reason: e.to_string(),
    })?;
    if meta.record::<VolumeRecord>(name).await?.is_some() {
        return Err(ClusterError::VolumeExists { name: name.into() });
    }
    // The servers of the map now (not declared down) place this volume for good; servers
    // added later only stand in for down ones (see the record's `placement_servers`).
    let mut members: Vec<u64> = cluster_map(meta)
        .await?
        .iter()
        .filter(|s| s.up)
        .map(|s| s.id)
        .collect();
    members.sort_unstable();
    let id = next_volume_id(meta).await?;
    let v = VolumeRecord {
        schema_version: 0,
        id,
        name: name.into(),
        size_bytes,
        profile: Some(ErasureProfile {
            data_shards: profile.data as u32,
            parity_shards: profile.parity as u32,
        }),
        epoch: 0,
        created_unix_ms: now_ms(),
        unit_bytes,
        pg_count: DEFAULT_PG_COUNT,
        placement_servers: members,
    };
    match meta.create_record(&v).await {
        Ok(_) => Ok(v),
        Err(MetaError::AlreadyExists { .. }) => {
            Err(ClusterError::VolumeExists { name: name.into() })
        }
        Err(e) => Err(e.into()),
    }
}

/// Allocates a volume id (a counter in meta, advanced by compare-and-swap).
async fn next_volume_id(meta: &MetaClient) -> Result<u64> {
    use continuum_meta_client::{cmp, op};
    use continuum_proto::meta::TxnRequest;
    for _ in 0..32 {
        let cur = meta.get(VOLUME_ID_COUNTER.as_bytes().to_vec()).await?;
        let (n, guard) = match &cur {
            Some(kv) => {
                let n = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                (
                    n,
                    cmp::mod_revision_eq(VOLUME_ID_COUNTER.as_bytes(), kv.mod_revision),
                )
            }
            None => (0, cmp::absent(VOLUME_ID_COUNTER.as_bytes())),
        };
        let next = n + 1;
        let r = meta
            .txn(TxnRequest {
                compare: vec![guard],
                success: vec![op::put(
                    VOLUME_ID_COUNTER.as_bytes(),
                    next.to_string().into_bytes(),
                    0,
                )],
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            return Ok(next);
        }
    }
    Err(ClusterError::Conflict {
        name: "volume id counter".into(),
    })
}

/// Grows a volume (shrinking is refused: it would drop data a guest may use).
pub async fn resize_volume(meta: &MetaClient, name: &str, size_bytes: u64) -> Result<VolumeRecord> {
    check_size(size_bytes)?;
    let Some(v) = meta.record::<VolumeRecord>(name).await? else {
        return Err(ClusterError::VolumeNotFound { name: name.into() });
    };
    if size_bytes < v.record.size_bytes {
        return Err(ClusterError::Shrink {
            name: name.into(),
            size: v.record.size_bytes,
            requested: size_bytes,
        });
    }
    let mut r = v.record.clone();
    r.size_bytes = size_bytes;
    match meta.swap_record(&r, v.mod_revision, 0).await {
        Ok(_) => Ok(r),
        Err(MetaError::Conflict { .. }) => Err(ClusterError::Conflict { name: name.into() }),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a volume: takes its writer lease (fencing any writer), deletes its shards on every
/// block server, then its records. Returns how many servers could not be reached (their
/// shards of the volume are orphans a later delete pass removes).
pub async fn delete_volume(meta: &MetaClient, name: &str, timeout: Duration) -> Result<usize> {
    let Some(v) = meta.record::<VolumeRecord>(name).await? else {
        return Err(ClusterError::VolumeNotFound { name: name.into() });
    };
    let lease = match meta.acquire_writer_lease(name, "admin/delete", 30).await {
        Ok(l) => l,
        Err(MetaError::Conflict { .. }) => {
            return Err(ClusterError::InvalidVolume {
                reason: format!(
                    "volume {name} is attached (a writer holds its lease); detach it first"
                ),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let mut unreachable = 0;
    for s in cluster_map(meta).await? {
        let c = crate::client::BlockClient::new(s.addr.clone(), timeout);
        if let Err(e) = c.delete_volume(v.record.id, lease.epoch).await {
            tracing::warn!(volume = name, server = s.id, error = %e, "cannot delete shards");
            unreachable += 1;
        }
    }
    meta.delete_record::<WriterLease>(&lease.name()).await?;
    let _ = meta.lease_revoke(lease.lease_id).await;
    meta.delete_record::<VolumeRecord>(name).await?;
    Ok(unreachable)
}

/// Holder names of attaching writers (gateways) start with this; every other holder (repair
/// and scrub of detached volumes) is a maintainer an attaching writer may preempt.
pub const GATEWAY_HOLDER_PREFIX: &str = "gateway/";

/// Takes the writer lease of `name` to attach it (a gateway serving it). A lease held by a
/// maintainer (detached repair or scrub) or by this same holder (a previous run of this
/// gateway that did not let go) is revoked first: the new epoch fences that writer on every
/// block server, so taking over is safe; only another gateway's live lease is a conflict.
pub async fn acquire_attach_lease(
    meta: &MetaClient,
    name: &str,
    holder: &str,
    ttl_seconds: u64,
) -> Result<WriterLease> {
    for _ in 0..5 {
        match meta.acquire_writer_lease(name, holder, ttl_seconds).await {
            Ok(l) => return Ok(l),
            Err(MetaError::NotFound { .. }) => {
                return Err(ClusterError::VolumeNotFound { name: name.into() })
            }
            Err(MetaError::Conflict { message }) => {
                let Some(v) = meta.record::<VolumeRecord>(name).await? else {
                    return Err(ClusterError::VolumeNotFound { name: name.into() });
                };
                let key = WriterLease {
                    volume_id: v.record.id,
                    ..Default::default()
                }
                .name();
                let Some(current) = meta.record::<WriterLease>(&key).await? else {
                    continue; // it went away meanwhile, or the volume changed: retry
                };
                let cur = &current.record;
                if cur.holder.starts_with(GATEWAY_HOLDER_PREFIX) && cur.holder != holder {
                    return Err(ClusterError::Attached {
                        name: name.into(),
                        holder: cur.holder.clone(),
                        reason: message,
                    });
                }
                tracing::info!(
                    volume = name,
                    previous = cur.holder,
                    epoch = cur.epoch,
                    "taking over the writer lease"
                );
                let _ = meta.lease_revoke(cur.lease_id).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ClusterError::Attached {
        name: name.into(),
        holder: "?".into(),
        reason: "the writer lease kept changing".into(),
    })
}

/// A pass over a volume run by a detached-volume maintainer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Rebuild what is stale or moved (after a server is declared down).
    Repair,
    /// Verify every shard's checksums and the parity, rebuild what is wrong.
    Scrub,
}

/// Runs `pass` over every detached volume (one with no live writer): takes its writer lease
/// like any writer, works at most `bytes_per_sec` (0 = unthrottled), lets the lease go.
/// Attached volumes are skipped: their writer maintains them. Several runners never work on one
/// volume at once (the lease is exclusive).
pub async fn maintain_detached(
    meta: &MetaClient,
    holder: &str,
    pass: Pass,
    bytes_per_sec: u64,
    timeout: Duration,
) -> Result<Vec<(String, crate::volume::PassReport)>> {
    let mut done = Vec::new();
    for v in meta.records::<VolumeRecord>().await? {
        let name = v.record.name.clone();
        let lease = match meta.acquire_writer_lease(&name, holder, 30).await {
            Ok(l) => l,
            Err(MetaError::Conflict { .. }) | Err(MetaError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let keep = meta.spawn_keep_alive(lease.lease_id, 30);
        let mut reporter = None;
        let result = async {
            let Some(rec) = meta.record::<VolumeRecord>(&name).await? else {
                return Ok(None);
            };
            let spec = spec_of(&rec.record)?;
            let servers = cluster_map(meta).await?;
            let vol = crate::volume::Volume::open(spec, lease.epoch, &servers, timeout)
                .await
                .map_err(|e| ClusterError::InvalidVolume {
                    reason: format!("opening {name} for repair: {e}"),
                })?;
            let kind = match pass {
                Pass::Repair => "repair",
                Pass::Scrub => "scrub",
            };
            reporter = Some(report_progress(
                meta,
                &vol,
                &name,
                kind,
                holder,
                lease.lease_id,
            ));
            let report = match pass {
                Pass::Repair => vol.repair_all(bytes_per_sec).await,
                Pass::Scrub => vol.scrub(bytes_per_sec).await,
            }
            .map_err(|e| ClusterError::InvalidVolume {
                reason: format!("{pass:?} of {name}: {e}"),
            })?;
            Ok::<_, ClusterError>(Some(report))
        }
        .await;
        keep.abort();
        if let Some(r) = reporter {
            r.abort();
        }
        let _ = meta.lease_revoke(lease.lease_id).await;
        match result {
            Ok(Some(report)) => {
                match pass {
                    Pass::Repair => {
                        tracing::info!(volume = name, ?report, "repaired detached volume")
                    }
                    Pass::Scrub => {
                        tracing::info!(volume = name, ?report, "scrubbed detached volume")
                    }
                }
                done.push((name, report));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(volume = name, error = %e, "pass failed; retried next time"),
        }
    }
    Ok(done)
}

/// Publishes a pass's progress in meta every second (a `VolumePass` record attached to the
/// writer lease `lease`, so it vanishes with it) until the returned task is aborted.
pub fn report_progress(
    meta: &MetaClient,
    vol: &std::sync::Arc<crate::volume::Volume>,
    volume: &str,
    kind: &str,
    holder: &str,
    lease: u64,
) -> tokio::task::JoinHandle<()> {
    use continuum_proto::records_pb::VolumePass;
    use std::sync::atomic::Ordering;
    let (meta, vol) = (meta.clone(), std::sync::Arc::downgrade(vol));
    let (volume, kind, holder) = (volume.to_string(), kind.to_string(), holder.to_string());
    tokio::spawn(async move {
        loop {
            let Some(v) = vol.upgrade() else { return };
            let p = VolumePass {
                schema_version: 0,
                volume: volume.clone(),
                kind: kind.clone(),
                holder: holder.clone(),
                stripes_done: v.stats.pass_stripes_done.load(Ordering::Relaxed),
                stripes_total: v.stats.pass_stripes_total.load(Ordering::Relaxed),
                bytes_rebuilt: v.stats.bytes_rebuilt.load(Ordering::Relaxed),
                updated_unix_ms: now_ms(),
            };
            drop(v);
            let mut rec = p.clone();
            rec.set_schema_version(layout::SCHEMA_VERSION);
            let put = meta
                .put_with(continuum_proto::meta::PutRequest {
                    key: layout::key::<VolumePass>(&p.name()).into_bytes(),
                    value: prost::Message::encode_to_vec(&rec),
                    lease,
                    ..Default::default()
                })
                .await;
            if let Err(e) = put {
                tracing::debug!(error = %e, "cannot publish pass progress");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// How a volume stands, from meta's point of view (without opening it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeHealth {
    /// The writer lease's holder, if the volume is attached (or being maintained).
    pub writer: Option<String>,
    /// Block servers of the map that are up, missing their heartbeat, declared down.
    pub servers_up: usize,
    pub missing: Vec<u64>,
    pub down: Vec<u64>,
    /// Stripe width (k + m) and k.
    pub width: usize,
    pub data: usize,
    /// A repair or scrub in progress: (kind, percent).
    pub pass: Option<(String, u32)>,
}

impl VolumeHealth {
    /// One word and a reason: `healthy`, `degraded (...)`, `repairing (..%)`,
    /// `unavailable (...)`.
    pub fn summary(&self) -> String {
        let lost = self.missing.len();
        if self.servers_up < self.data {
            return format!(
                "unavailable (only {} block servers up, {} needed)",
                self.servers_up, self.data
            );
        }
        if let Some((kind, pct)) = &self.pass {
            if kind == "repair" {
                return format!("repairing ({pct}%)");
            }
        }
        if lost > 0 {
            let parity = self.width - self.data;
            return format!(
                "degraded ({lost} block server(s) {:?} missing their heartbeat; survives {} more loss(es))",
                self.missing,
                parity.saturating_sub(lost)
            );
        }
        if self.servers_up < self.width {
            return format!(
                "degraded (only {} block servers for stripes of {})",
                self.servers_up, self.width
            );
        }
        match &self.pass {
            Some((kind, pct)) => format!("healthy ({kind} {pct}%)"),
            None => "healthy".into(),
        }
    }
}

/// The health of volume `v` from the cluster map, its writer lease and running passes.
pub async fn volume_health(meta: &MetaClient, v: &VolumeRecord) -> Result<VolumeHealth> {
    let mut h = volumes_health(meta, std::slice::from_ref(v)).await?;
    Ok(h.pop().expect("one health per volume"))
}

/// [`volume_health`] of several volumes, reading the cluster-wide records once.
pub async fn volumes_health(
    meta: &MetaClient,
    volumes: &[VolumeRecord],
) -> Result<Vec<VolumeHealth>> {
    use continuum_proto::records_pb::VolumePass;
    let alive = alive_nodes(meta).await?;
    let nodes: Vec<Node> = meta
        .records::<Node>()
        .await?
        .into_iter()
        .map(|n| n.record)
        .filter(|n| n.role == NodeRole::Block as i32)
        .collect();
    let down: Vec<u64> = nodes
        .iter()
        .filter(|n| n.declared_down)
        .map(|n| n.id)
        .collect();
    let missing: Vec<u64> = nodes
        .iter()
        .filter(|n| !n.declared_down && !alive.contains(&n.id))
        .map(|n| n.id)
        .collect();
    let leases: Vec<WriterLease> = meta
        .records::<WriterLease>()
        .await?
        .into_iter()
        .map(|l| l.record)
        .collect();
    let passes: Vec<VolumePass> = meta
        .records::<VolumePass>()
        .await?
        .into_iter()
        .map(|p| p.record)
        .collect();
    volumes
        .iter()
        .map(|v| {
            let spec = spec_of(v)?;
            let writer = leases
                .iter()
                .find(|l| l.volume_id == v.id)
                .map(|l| l.holder.clone());
            let pass = passes.iter().find(|p| p.volume == v.name).map(|p| {
                let pct = (p.stripes_done * 100)
                    .checked_div(p.stripes_total)
                    .unwrap_or(0);
                (p.kind.clone(), pct as u32)
            });
            Ok(VolumeHealth {
                writer,
                servers_up: nodes.len() - down.len() - missing.len(),
                missing: missing.clone(),
                down: down.clone(),
                width: spec.profile.width(),
                data: spec.profile.data,
                pass,
            })
        })
        .collect()
}
