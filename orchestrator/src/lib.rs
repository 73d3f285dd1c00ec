//! Continuum's VM orchestrator: VMs whose disks are Continuum volumes, run by QEMU on
//! hypervisor hosts.
//!
//! - [`scheduler`]: placement (site, capacity, anti-affinity) and failover decisions — pure
//!   functions of the host and VM records, so every rule is tested deterministically.
//! - [`qemu`]: QEMU's command line for a VM, the KVM probe, and a QMP client.
//! - [`network`]: a VM's NIC on its site's overlay subnet (address choice, the host's tap).
//! - [`records`]: the host, VM and VM-status records in meta and the compare-and-swap updates.
//! - [`images`]: VM images imported into volumes, and VM disks cloned from them.
//! - [`agent`]: `continuum agent`, one per host: registers the host, runs the VMs placed on it,
//!   reports their state, and fails over VMs of dead hosts of its site after fencing.

pub mod agent;
pub mod images;
pub mod network;
pub mod qemu;
pub mod records;
pub mod scheduler;
