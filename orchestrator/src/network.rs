//! A VM's NIC on the overlay of its site.
//!
//! Each site's overlay daemon (`continuum overlay up --site S --subnet CIDR`) announces the
//! site's VM subnet in its `OverlayPeer` record, and every other site routes that subnet to it.
//! A VM with a NIC gets an address in that subnet (the lowest free one, or the one asked for);
//! the subnet's first host address is the VMs' gateway, answered by the host.
//!
//! On the host, the agent gives each VM a persistent tap device (`ctv` + a hash of the name)
//! carrying the gateway address as a /32, with proxy ARP, a /32 route to the VM's address and
//! IPv4 forwarding on: traffic from the VM goes to the overlay's TUN device by the routes the
//! overlay daemon installs, and traffic for the VM comes back through the tap. With direct
//! kernel boot the address reaches the guest as the kernel's `ip=` argument.
//!
//! The pure parts (subnets of a site, address choice, names) are separate from [`Tap`], which
//! runs `ip` on the host.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

use continuum_proto::records_pb::{OverlayPeer, Vm};
use ipnet::Ipv4Net;

/// The VM subnets of `site`: what its overlay peers route besides their own address.
pub fn site_subnets(peers: &[OverlayPeer], site: &str) -> Vec<Ipv4Net> {
    let mut out: Vec<Ipv4Net> = peers
        .iter()
        .filter(|p| p.site == site)
        .flat_map(|p| p.allowed_ips.iter())
        .filter_map(|a| a.parse::<Ipv4Net>().ok())
        .filter(|n| n.prefix_len() <= 30)
        .map(|n| n.trunc())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The gateway address of a VM subnet: its first host address, which VMs route through.
pub fn gateway_of(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

/// Chooses a VM's address: `wanted` if it is a free host address of one of `subnets` (not the
/// network, broadcast or gateway address), else the lowest free one. Returns it with its
/// subnet's prefix length.
pub fn choose_address(
    subnets: &[Ipv4Net],
    used: &BTreeSet<Ipv4Addr>,
    wanted: Option<Ipv4Addr>,
    site: &str,
) -> Result<Ipv4Net, String> {
    if subnets.is_empty() {
        return Err(format!(
            "site {site:?} has no VM subnet on the overlay: start `continuum overlay up --site \
             {site} --subnet CIDR` there first"
        ));
    }
    let usable = |net: &Ipv4Net, a: Ipv4Addr| {
        net.contains(&a) && a != net.network() && a != net.broadcast() && a != gateway_of(*net)
    };
    if let Some(a) = wanted {
        let Some(net) = subnets.iter().find(|n| n.contains(&a)) else {
            let list: Vec<String> = subnets.iter().map(ToString::to_string).collect();
            return Err(format!(
                "address {a} is outside site {site:?}'s VM subnets ({})",
                list.join(", ")
            ));
        };
        if !usable(net, a) {
            return Err(format!(
                "address {a} is {net}'s network, broadcast or gateway address"
            ));
        }
        if used.contains(&a) {
            return Err(format!("address {a} is another VM's"));
        }
        return Ok(Ipv4Net::new(a, net.prefix_len()).expect("prefix of a parsed net"));
    }
    for net in subnets {
        if let Some(a) = net.hosts().find(|a| usable(net, *a) && !used.contains(a)) {
            return Ok(Ipv4Net::new(a, net.prefix_len()).expect("prefix of a parsed net"));
        }
    }
    Err(format!("site {site:?}'s VM subnets are full"))
}

/// Addresses the VMs in `vms` have.
pub fn used_addresses<'a>(vms: impl IntoIterator<Item = &'a Vm>) -> BTreeSet<Ipv4Addr> {
    vms.into_iter()
        .filter_map(|v| v.address.parse::<Ipv4Net>().ok())
        .map(|n| n.addr())
        .collect()
}

/// The kernel's `ip=` argument configuring the guest's first NIC with `address`.
pub fn kernel_ip_arg(address: Ipv4Net) -> String {
    format!(
        "ip={}::{}:{}::eth0:off",
        address.addr(),
        gateway_of(address.trunc()),
        address.netmask()
    )
}

/// FNV-1a: stable across builds and platforms (std's hasher is not).
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The host's tap device for VM `name` (at most 15 bytes, as Linux allows).
pub fn tap_name(name: &str) -> String {
    format!("ctv{:08x}", stable_hash(name) as u32)
}

#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct NetError {
    what: String,
    message: String,
}

/// A VM's tap device on this host.
pub struct Tap {
    pub name: String,
    pub address: Ipv4Net,
}

impl Tap {
    pub fn for_vm(vm: &Vm) -> Option<Tap> {
        if !vm.nic {
            return None;
        }
        let address = vm.address.parse::<Ipv4Net>().ok()?;
        Some(Tap {
            name: tap_name(&vm.name),
            address,
        })
    }

    /// Creates (if missing) and configures the device; idempotent.
    pub fn set_up(&self) -> Result<(), NetError> {
        let t = self.name.as_str();
        if !std::path::Path::new("/sys/class/net").join(t).exists() {
            ip(&["tuntap", "add", "dev", t, "mode", "tap"])?;
        }
        let gw = format!("{}/32", gateway_of(self.address.trunc()));
        ip(&["addr", "replace", &gw, "dev", t])?;
        ip(&["link", "set", t, "up"])?;
        sysctl(&format!("net/ipv4/conf/{t}/proxy_arp"), "1")?;
        sysctl("net/ipv4/ip_forward", "1")?;
        let vm = format!("{}/32", self.address.addr());
        ip(&["route", "replace", &vm, "dev", t])?;
        Ok(())
    }

    /// Removes the device (and with it its address and route); absent is fine.
    pub fn remove(name: &str) -> Result<(), NetError> {
        if std::path::Path::new("/sys/class/net").join(name).exists() {
            ip(&["link", "del", name])?;
        }
        Ok(())
    }
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError {
            what: format!("ip {}", args.join(" ")),
            message: format!("{e} (is iproute2 installed?)"),
        })?;
    if !out.status.success() {
        return Err(NetError {
            what: format!("ip {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).map_err(|e| NetError {
        what: path,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(site: &str, ips: &[&str]) -> OverlayPeer {
        OverlayPeer {
            name: format!("{site}-gw"),
            site: site.into(),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_sites_subnets_are_what_its_peers_route_besides_their_own_address() {
        let peers = [
            peer("edge", &["10.90.0.1/32", "10.91.1.0/24"]),
            peer("cloud", &["10.90.0.2/32", "10.91.2.0/24"]),
            peer("edge", &["10.90.0.3/32", "10.91.1.7/24", "fd00::/64"]),
        ];
        assert_eq!(site_subnets(&peers, "edge"), vec![net("10.91.1.0/24")]);
        assert_eq!(site_subnets(&peers, "cloud"), vec![net("10.91.2.0/24")]);
        assert!(site_subnets(&peers, "nowhere").is_empty());
    }

    #[test]
    fn addresses_are_the_lowest_free_host_address_past_the_gateway() {
        let subnets = [net("10.91.1.0/30"), net("10.91.2.0/24")];
        let mut used = BTreeSet::new();
        let a = choose_address(&subnets, &used, None, "s").unwrap();
        assert_eq!(a, net("10.91.1.2/30"));
        used.insert(a.addr());
        // The /30 has one VM address (.1 is the gateway): the next comes from the /24.
        let b = choose_address(&subnets, &used, None, "s").unwrap();
        assert_eq!(b, net("10.91.2.2/24"));
        assert_eq!(gateway_of(net("10.91.2.0/24")), Ipv4Addr::new(10, 91, 2, 1));
        assert_eq!(
            kernel_ip_arg(b),
            "ip=10.91.2.2::10.91.2.1:255.255.255.0::eth0:off"
        );
    }

    #[test]
    fn a_wanted_address_must_be_a_free_host_address_of_the_site() {
        let subnets = [net("10.91.1.0/24")];
        let used: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(10, 91, 1, 9)].into();
        let want = |a: [u8; 4]| choose_address(&subnets, &used, Some(Ipv4Addr::from(a)), "s");
        assert_eq!(want([10, 91, 1, 50]).unwrap(), net("10.91.1.50/24"));
        assert!(want([10, 91, 1, 9]).unwrap_err().contains("another VM's"));
        assert!(want([10, 91, 1, 1]).unwrap_err().contains("gateway"));
        assert!(want([10, 91, 1, 255]).unwrap_err().contains("broadcast"));
        assert!(want([10, 92, 1, 5]).unwrap_err().contains("outside"));
        let none = choose_address(&[], &used, None, "edge").unwrap_err();
        assert!(none.contains("--subnet"), "{none}");
        let full = choose_address(
            &[net("10.91.1.0/30")],
            &[Ipv4Addr::new(10, 91, 1, 2)].into(),
            None,
            "s",
        );
        assert!(full.unwrap_err().contains("full"));
    }

    #[test]
    fn tap_names_fit_linux_and_differ_per_vm() {
        let a = tap_name("a-very-long-vm-name-indeed");
        assert!(a.len() <= 15 && a.starts_with("ctv"), "{a}");
        assert_ne!(tap_name("web"), tap_name("db"));
        assert_eq!(tap_name("web"), tap_name("web"));
    }
}
