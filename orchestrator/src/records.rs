//! The orchestrator's records in meta: hosts (with a `HostAlive` record on the agent's lease),
//! VM specs (written with compare-and-swap by the CLI and the scheduler) and VM status (written
//! by the agent running the VM), and the checks a new VM spec must pass.

use std::collections::BTreeSet;

use continuum_meta_client::records::Versioned;
use continuum_meta_client::{Error as MetaError, MetaClient};
use continuum_proto::records_pb::{
    Host, HostAlive, OverlayPeer, Vm, VmStatus, Volume, WriterLease,
};

use crate::network;
use crate::scheduler::{self, PlaceError};

#[derive(Debug, thiserror::Error)]
pub enum OrchError {
    #[error("meta: {0}")]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Place(#[from] PlaceError),
    #[error("VM {0:?} does not exist")]
    NoSuchVm(String),
    #[error("VM {0:?} already exists")]
    VmExists(String),
    #[error("volume {0:?} does not exist")]
    NoSuchVolume(String),
    #[error("image {0:?} does not exist (import it with `continuum image import`)")]
    NoSuchImage(String),
    #[error("volume {volume:?} is already a disk of VM {vm:?}")]
    VolumeInUse { volume: String, vm: String },
    #[error("invalid VM spec: {0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T> = std::result::Result<T, OrchError>;

/// TTL of an agent's lease: a host whose agent stops renewing is gone after this.
pub const AGENT_LEASE_TTL_SECONDS: u64 = 6;

/// Names of the hosts whose agents hold their leases.
pub async fn alive_hosts(meta: &MetaClient) -> Result<BTreeSet<String>> {
    Ok(meta
        .records::<HostAlive>()
        .await?
        .into_iter()
        .map(|v| v.record.name)
        .collect())
}

pub async fn hosts(meta: &MetaClient) -> Result<Vec<Host>> {
    Ok(meta
        .records::<Host>()
        .await?
        .into_iter()
        .map(|v| v.record)
        .collect())
}

pub async fn vms(meta: &MetaClient) -> Result<Vec<Versioned<Vm>>> {
    Ok(meta.records::<Vm>().await?)
}

pub async fn statuses(meta: &MetaClient) -> Result<Vec<VmStatus>> {
    Ok(meta
        .records::<VmStatus>()
        .await?
        .into_iter()
        .map(|v| v.record)
        .collect())
}

/// The record name of host `host`'s status of VM `vm` (the layout is the record's).
pub fn status_key(vm: &str, host: &str) -> String {
    continuum_proto::records::Record::name(&VmStatus {
        name: vm.into(),
        host: host.into(),
        ..Default::default()
    })
}

/// The status the agent of `vm`'s host reports for it.
pub async fn status_of(meta: &MetaClient, vm: &Vm) -> Result<Option<VmStatus>> {
    Ok(meta
        .record::<VmStatus>(&status_key(&vm.name, &vm.host))
        .await?
        .map(|v| v.record))
}

/// Deletes every host's status of VM `name`.
pub async fn delete_statuses(meta: &MetaClient, name: &str) -> Result<()> {
    for s in statuses(meta).await? {
        if s.name == name {
            meta.delete_record::<VmStatus>(&status_key(&s.name, &s.host))
                .await?;
        }
    }
    Ok(())
}

/// Registers (or re-registers) `host` and marks it alive on a fresh lease of
/// [`AGENT_LEASE_TTL_SECONDS`], which the caller keeps alive. Returns the lease.
pub async fn register_host(meta: &MetaClient, host: &Host) -> Result<u64> {
    let lease = meta.lease_grant(AGENT_LEASE_TTL_SECONDS).await?.id;
    let mut h = host.clone();
    h.lease_id = lease;
    meta.put_record(&h).await?;
    let alive = HostAlive {
        name: h.name.clone(),
        lease_id: lease,
        ..Default::default()
    };
    // HostAlive lives on the lease: put it through a CAS-free swap attached to the lease.
    let current = meta.record::<HostAlive>(&h.name).await?;
    meta.swap_record(&alive, current.map(|c| c.mod_revision).unwrap_or(0), lease)
        .await?;
    Ok(lease)
}

/// Checks a new VM's spec against the records: its volumes exist (those in `to_create` must
/// not exist yet: they are cloned from an image after this check) and are no other VM's
/// disks, and a host of its site can take it (or the pinned `host`). Returns the spec placed.
pub async fn validate_and_place(
    meta: &MetaClient,
    vm: &Vm,
    pin: Option<&str>,
    to_create: &[String],
) -> Result<Vm> {
    if vm.name.is_empty()
        || !vm
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(OrchError::Invalid(format!(
            "name {:?}: use letters, digits and '-'",
            vm.name
        )));
    }
    if vm.volumes.is_empty() && vm.kernel.is_empty() {
        return Err(OrchError::Invalid(
            "a VM needs a disk (--disk or --image) or a kernel (--kernel)".into(),
        ));
    }
    if vm.memory_bytes < 16 << 20 {
        return Err(OrchError::Invalid("memory below 16 MiB".into()));
    }
    if vm.vcpus == 0 {
        return Err(OrchError::Invalid("0 vCPUs".into()));
    }
    let all = vms(meta).await?;
    if all.iter().any(|v| v.record.name == vm.name) {
        return Err(OrchError::VmExists(vm.name.clone()));
    }
    for vol in &vm.volumes {
        let exists = meta.record::<Volume>(vol).await?.is_some();
        if to_create.contains(vol) {
            if exists {
                return Err(OrchError::Invalid(format!(
                    "volume {vol:?} exists already (the image's copy goes there)"
                )));
            }
            continue;
        }
        if !exists {
            return Err(OrchError::NoSuchVolume(vol.clone()));
        }
        if let Some(other) = all.iter().find(|v| v.record.volumes.contains(vol)) {
            return Err(OrchError::VolumeInUse {
                volume: vol.clone(),
                vm: other.record.name.clone(),
            });
        }
    }
    let hosts = hosts(meta).await?;
    let alive = alive_hosts(meta).await?;
    let placed: Vec<Vm> = all.into_iter().map(|v| v.record).collect();
    let host = scheduler::place(vm, &hosts, &alive, &placed, pin)?;
    let mut out = vm.clone();
    out.host = host;
    if vm.nic {
        out.address = nic_address(meta, vm, &placed).await?;
    }
    Ok(out)
}

/// The address of `vm`'s NIC in its site's VM subnet: `vm.address` (an IPv4 address) if it is
/// free, else the lowest free one.
async fn nic_address(meta: &MetaClient, vm: &Vm, others: &[Vm]) -> Result<String> {
    let peers: Vec<OverlayPeer> = meta
        .records::<OverlayPeer>()
        .await?
        .into_iter()
        .map(|v| v.record)
        .collect();
    let subnets = network::site_subnets(&peers, &vm.site);
    let wanted =
        match vm.address.as_str() {
            "" => None,
            a => Some(a.parse::<std::net::Ipv4Addr>().map_err(|_| {
                OrchError::Invalid(format!("--address {a:?} is not an IPv4 address"))
            })?),
        };
    let used = network::used_addresses(others);
    network::choose_address(&subnets, &used, wanted, &vm.site)
        .map(|a| a.to_string())
        .map_err(OrchError::Invalid)
}

/// Checks that host `host` can take `vm` now (scheduler rules, with everything else where it
/// is); returns the host.
pub async fn place_on(meta: &MetaClient, vm: &Vm, host: &str) -> Result<String> {
    let hosts = hosts(meta).await?;
    let alive = alive_hosts(meta).await?;
    let placed: Vec<Vm> = vms(meta).await?.into_iter().map(|v| v.record).collect();
    Ok(scheduler::place(vm, &hosts, &alive, &placed, Some(host))?)
}

/// Applies `f` to VM `name`'s spec with compare-and-swap, retrying on conflicts.
pub async fn update_vm(
    meta: &MetaClient,
    name: &str,
    mut f: impl FnMut(&mut Vm) -> Result<()>,
) -> Result<Vm> {
    for _ in 0..20 {
        let Some(cur) = meta.record::<Vm>(name).await? else {
            return Err(OrchError::NoSuchVm(name.into()));
        };
        let mut vm = cur.record.clone();
        f(&mut vm)?;
        match meta.swap_record(&vm, cur.mod_revision, 0).await {
            Ok(_) => return Ok(vm),
            Err(MetaError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(OrchError::Conflict(format!(
        "VM {name} kept changing; try again"
    )))
}

/// Who holds volume `volume`'s writer lease (None: nobody, or no such volume).
pub async fn writer_of(meta: &MetaClient, volume: &str) -> Result<Option<String>> {
    Ok(writer_lease(meta, volume).await?.map(|l| l.holder))
}

async fn writer_lease(meta: &MetaClient, volume: &str) -> Result<Option<WriterLease>> {
    let Some(v) = meta.record::<Volume>(volume).await? else {
        return Ok(None);
    };
    let key = WriterLease {
        volume_id: v.record.id,
        ..Default::default()
    };
    let name = continuum_proto::records::Record::name(&key);
    Ok(meta.record::<WriterLease>(&name).await?.map(|l| l.record))
}

/// Fences what a dead host's gateway holds of `vm`'s volumes: revokes its writer leases, so
/// the gateway that attaches the volume next takes a new epoch and fences every block server
/// before it serves I/O (DESIGN.md invariant 1). Returns the leases revoked.
pub async fn fence_volumes(meta: &MetaClient, vm: &Vm, dead_gateway: &str) -> Result<usize> {
    let holder = format!(
        "{}{dead_gateway}",
        continuum_blockstore::cluster::GATEWAY_HOLDER_PREFIX
    );
    let mut revoked = 0;
    for vol in &vm.volumes {
        if let Some(l) = writer_lease(meta, vol).await? {
            if l.holder == holder {
                meta.lease_revoke(l.lease_id).await?;
                revoked += 1;
            }
        }
    }
    Ok(revoked)
}
