//! Placement and failover: pure functions of the host and VM records and of which hosts are
//! alive (their agents hold their leases).
//!
//! Rules:
//! - A VM runs only in its site. Within it, a host takes a VM when the memory of the VMs placed
//!   on it plus the VM's fits the host's memory, their vCPUs stay within
//!   [`VCPU_OVERCOMMIT`]× its CPUs, and no VM of the same anti-affinity group is on it. Of the
//!   hosts that can, the one with the most free memory wins (ties: by name), so the choice is
//!   deterministic.
//! - Failover (Invariant, DESIGN.md 9): a VM moves only when its host is dead *and* another
//!   host of the same site is alive. A site whose WAN link is down looks, from meta, like a site
//!   whose hosts all died: no host of it is alive, so nothing moves, and its agents (which never
//!   stop VMs because meta is unreachable) keep them running. The caller fences the dead host's
//!   writer leases before it applies a move.

use std::collections::BTreeSet;

use continuum_proto::records_pb::{Host, Vm};

/// vCPUs a host may carry per CPU.
pub const VCPU_OVERCOMMIT: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("no host is registered in site {site:?}")]
    UnknownSite { site: String },
    #[error("host {host:?} is not registered")]
    UnknownHost { host: String },
    #[error("VM needs {need} MiB of memory; the largest host of site {site:?} has {largest} MiB")]
    TooMuchMemory {
        site: String,
        need: u64,
        largest: u64,
    },
    #[error("no host of site {site:?} can take the VM now: {reasons}")]
    NoCapacity { site: String, reasons: String },
}

const MIB: u64 = 1 << 20;

/// What is placed on `host` (VMs whose spec names it), except `except`.
fn load<'a>(host: &str, vms: &'a [Vm], except: &str) -> impl Iterator<Item = &'a Vm> {
    let host = host.to_string();
    let except = except.to_string();
    vms.iter()
        .filter(move |v| v.host == host && v.name != except)
}

/// Why `host` cannot take `vm` (None: it can).
fn refuses(vm: &Vm, host: &Host, vms: &[Vm]) -> Option<String> {
    let placed: Vec<&Vm> = load(&host.name, vms, &vm.name).collect();
    let mem: u64 = placed.iter().map(|v| v.memory_bytes).sum();
    let vcpus: u32 = placed.iter().map(|v| v.vcpus).sum();
    if mem + vm.memory_bytes > host.memory_bytes {
        return Some(format!(
            "{}: {} of {} MiB free",
            host.name,
            host.memory_bytes.saturating_sub(mem) / MIB,
            host.memory_bytes / MIB
        ));
    }
    if vcpus + vm.vcpus > host.cpus * VCPU_OVERCOMMIT {
        return Some(format!(
            "{}: {vcpus} vCPUs placed of {}",
            host.name,
            host.cpus * VCPU_OVERCOMMIT
        ));
    }
    if !vm.anti_affinity_group.is_empty() {
        if let Some(other) = placed
            .iter()
            .find(|v| v.anti_affinity_group == vm.anti_affinity_group)
        {
            return Some(format!(
                "{}: {} of anti-affinity group {:?} is there",
                host.name, other.name, vm.anti_affinity_group
            ));
        }
    }
    None
}

/// Chooses a host of `vm.site` among the `alive` ones for `vm`, given every VM's current
/// placement (`vms`, which may include `vm` itself: its own load is not counted). `only`
/// pins the choice to one host (which must still fit).
pub fn place(
    vm: &Vm,
    hosts: &[Host],
    alive: &BTreeSet<String>,
    vms: &[Vm],
    only: Option<&str>,
) -> Result<String, PlaceError> {
    if let Some(h) = only {
        if !hosts.iter().any(|x| x.name == h) {
            return Err(PlaceError::UnknownHost { host: h.into() });
        }
    }
    let site: Vec<&Host> = hosts.iter().filter(|h| h.site == vm.site).collect();
    if site.is_empty() {
        return Err(PlaceError::UnknownSite {
            site: vm.site.clone(),
        });
    }
    let largest = site.iter().map(|h| h.memory_bytes).max().unwrap_or(0);
    if vm.memory_bytes > largest {
        return Err(PlaceError::TooMuchMemory {
            site: vm.site.clone(),
            need: vm.memory_bytes.div_ceil(MIB),
            largest: largest / MIB,
        });
    }
    let mut reasons = Vec::new();
    let mut best: Option<(u64, &str)> = None;
    for h in site {
        if only.is_some_and(|o| o != h.name) {
            continue;
        }
        if !alive.contains(&h.name) {
            reasons.push(format!("{}: agent not alive", h.name));
            continue;
        }
        if let Some(r) = refuses(vm, h, vms) {
            reasons.push(r);
            continue;
        }
        let used: u64 = load(&h.name, vms, &vm.name).map(|v| v.memory_bytes).sum();
        let free = h.memory_bytes - used;
        // Most free memory first; the smaller name breaks ties (hosts come in name order).
        if best.is_none_or(|(f, _)| free > f) {
            best = Some((free, &h.name));
        }
    }
    match best {
        Some((_, h)) => Ok(h.to_string()),
        None => Err(PlaceError::NoCapacity {
            site: vm.site.clone(),
            reasons: if reasons.is_empty() {
                format!("{} is not in site {:?}", only.unwrap_or("?"), vm.site)
            } else {
                reasons.join("; ")
            },
        }),
    }
}

/// A VM to move off a dead host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
}

/// The moves that restart the VMs of dead hosts on live hosts of the same site. `dead` are the
/// hosts declared dead (their agent's lease gone for longer than the grace period); a VM
/// without a live host of its site to go to stays where it is. Moves are planned one after the
/// other, each seeing the placements before it, so together they never overfill a host.
pub fn failover(
    hosts: &[Host],
    alive: &BTreeSet<String>,
    dead: &BTreeSet<String>,
    vms: &[Vm],
) -> Vec<Move> {
    let mut placed = vms.to_vec();
    let mut moves = Vec::new();
    for i in 0..placed.len() {
        let vm = &placed[i];
        if vm.host.is_empty() || !dead.contains(&vm.host) || alive.contains(&vm.host) {
            continue;
        }
        if let Ok(to) = place(vm, hosts, alive, &placed, None) {
            moves.push(Move {
                vm: vm.name.clone(),
                from: vm.host.clone(),
                to: to.clone(),
            });
            placed[i].host = to;
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(name: &str, site: &str, cpus: u32, mem_mib: u64) -> Host {
        Host {
            name: name.into(),
            site: site.into(),
            cpus,
            memory_bytes: mem_mib * MIB,
            ..Default::default()
        }
    }

    fn vm(name: &str, site: &str, host: &str, mem_mib: u64, group: &str) -> Vm {
        Vm {
            name: name.into(),
            site: site.into(),
            host: host.into(),
            vcpus: 1,
            memory_bytes: mem_mib * MIB,
            anti_affinity_group: group.into(),
            running: true,
            ..Default::default()
        }
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn places_in_the_site_on_the_host_with_most_free_memory() {
        let hosts = [
            host("a1", "a", 2, 1024),
            host("a2", "a", 2, 2048),
            host("b1", "b", 8, 65536),
        ];
        let alive = names(&["a1", "a2", "b1"]);
        let v = vm("v", "a", "", 512, "");
        assert_eq!(place(&v, &hosts, &alive, &[], None).unwrap(), "a2");
        // a2 filled: a1 has more free memory now.
        let others = [vm("w", "a", "a2", 1800, "")];
        assert_eq!(place(&v, &hosts, &alive, &others, None).unwrap(), "a1");
        // Pinned.
        assert_eq!(place(&v, &hosts, &alive, &[], Some("a1")).unwrap(), "a1");
    }

    #[test]
    fn refuses_with_reasons() {
        let hosts = [host("a1", "a", 1, 1024), host("a2", "a", 1, 1024)];
        let alive = names(&["a1"]);
        let e = place(&vm("v", "x", "", 64, ""), &hosts, &alive, &[], None).unwrap_err();
        assert_eq!(e, PlaceError::UnknownSite { site: "x".into() });
        let e = place(&vm("v", "a", "", 4096, ""), &hosts, &alive, &[], None).unwrap_err();
        assert!(matches!(
            e,
            PlaceError::TooMuchMemory {
                need: 4096,
                largest: 1024,
                ..
            }
        ));
        assert!(e.to_string().contains("4096 MiB"), "{e}");
        let e = place(&vm("v", "a", "", 64, ""), &hosts, &alive, &[], Some("zz")).unwrap_err();
        assert_eq!(e, PlaceError::UnknownHost { host: "zz".into() });
        // a2 is dead, a1 is full.
        let full = [vm("w", "a", "a1", 1000, "")];
        let e = place(&vm("v", "a", "", 64, ""), &hosts, &alive, &full, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("a2: agent not alive") && msg.contains("a1: 24 of 1024 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn anti_affinity_spreads_a_group_and_vcpus_are_bounded() {
        let hosts = [host("a1", "a", 1, 8192), host("a2", "a", 1, 4096)];
        let alive = names(&["a1", "a2"]);
        let placed = [vm("db1", "a", "a1", 256, "db")];
        assert_eq!(
            place(
                &vm("db2", "a", "", 256, "db"),
                &hosts,
                &alive,
                &placed,
                None
            )
            .unwrap(),
            "a2"
        );
        let both = [
            vm("db1", "a", "a1", 256, "db"),
            vm("db2", "a", "a2", 256, "db"),
        ];
        let e = place(&vm("db3", "a", "", 256, "db"), &hosts, &alive, &both, None).unwrap_err();
        assert!(e.to_string().contains("anti-affinity group"), "{e}");
        let mut big = vm("big", "a", "", 64, "");
        big.vcpus = 5;
        assert!(place(&big, &hosts, &alive, &[], None).is_err());
    }

    #[test]
    fn failover_moves_within_the_site_only_and_never_when_the_site_is_dark() {
        let hosts = [
            host("a1", "a", 2, 1024),
            host("a2", "a", 2, 1024),
            host("b1", "b", 2, 1024),
            host("b2", "b", 2, 1024),
        ];
        let vms = [
            vm("va", "a", "a1", 256, ""),
            vm("vb", "b", "b1", 256, ""),
            vm("idle", "a", "a2", 256, ""),
        ];
        // a1 died; a2 lives: va moves to a2. Site b is cut off (b1 and b2 both gone): vb stays.
        let alive = names(&["a2"]);
        let dead = names(&["a1", "b1", "b2"]);
        assert_eq!(
            failover(&hosts, &alive, &dead, &vms),
            vec![Move {
                vm: "va".into(),
                from: "a1".into(),
                to: "a2".into()
            }]
        );
        // A host that is not declared dead (lease gone for less than the grace) keeps its VMs.
        assert!(failover(&hosts, &alive, &names(&[]), &vms).is_empty());
    }

    proptest! {
        /// Whatever the records, placement and failover never overfill a host, never cross
        /// sites, never co-locate an anti-affinity group, and only move VMs off dead hosts onto
        /// live ones.
        #[test]
        fn placements_respect_every_rule(
            host_specs in proptest::collection::vec((0u8..3, 1u32..4, 1u64..8), 1..6),
            vm_specs in proptest::collection::vec((0u8..3, 1u32..3, 1u64..4, 0u8..3), 0..12),
            alive_mask in any::<u8>(),
            dead_mask in any::<u8>(),
        ) {
            let hosts: Vec<Host> = host_specs.iter().enumerate()
                .map(|(i, (s, c, m))| host(&format!("h{i}"), &format!("s{s}"), *c, m * 512))
                .collect();
            let alive: BTreeSet<String> = hosts.iter().enumerate()
                .filter(|(i, _)| alive_mask & (1 << i) != 0).map(|(_, h)| h.name.clone()).collect();
            let dead: BTreeSet<String> = hosts.iter().enumerate()
                .filter(|(i, h)| dead_mask & (1 << i) != 0 && !alive.contains(&h.name))
                .map(|(_, h)| h.name.clone()).collect();
            // Place the VMs one by one as `vm create` does, while every host was alive.
            let all: BTreeSet<String> = hosts.iter().map(|h| h.name.clone()).collect();
            let mut vms: Vec<Vm> = Vec::new();
            for (i, (s, c, m, g)) in vm_specs.iter().enumerate() {
                let mut v = vm(&format!("v{i}"), &format!("s{s}"), "", m * 256,
                    if *g == 0 { "" } else if *g == 1 { "g1" } else { "g2" });
                v.vcpus = *c;
                if let Ok(h) = place(&v, &hosts, &all, &vms, None) {
                    v.host = h;
                    vms.push(v);
                }
            }
            let check = |vms: &[Vm]| -> Result<(), TestCaseError> {
                for h in &hosts {
                    let on: Vec<&Vm> = vms.iter().filter(|v| v.host == h.name).collect();
                    prop_assert!(on.iter().map(|v| v.memory_bytes).sum::<u64>() <= h.memory_bytes);
                    prop_assert!(on.iter().map(|v| v.vcpus).sum::<u32>() <= h.cpus * VCPU_OVERCOMMIT);
                    for v in &on {
                        prop_assert_eq!(&v.site, &h.site);
                        if !v.anti_affinity_group.is_empty() {
                            prop_assert_eq!(on.iter().filter(|w| w.anti_affinity_group == v.anti_affinity_group).count(), 1);
                        }
                    }
                }
                Ok(())
            };
            check(&vms)?;
            let moves = failover(&hosts, &alive, &dead, &vms);
            for m in &moves {
                prop_assert!(dead.contains(&m.from));
                prop_assert!(alive.contains(&m.to));
                let v = vms.iter_mut().find(|v| v.name == m.vm).unwrap();
                prop_assert_eq!(&v.host, &m.from);
                v.host = m.to.clone();
            }
            check(&vms)?;
        }
    }
}
