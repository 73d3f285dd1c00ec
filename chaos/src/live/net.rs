//! The live run's network: one network namespace per simulated host, joined by veth pairs to
//! one bridge per site inside a router namespace that forwards between the sites (the WAN
//! link). The harness itself stays in the root namespace and reaches the hosts through one
//! more veth pair into the router. Traffic between the sites is routed through a TUN device
//! in the router (`wan0`), where the delay line of `wan.rs` runs. Partitions (full or
//! one-way) are nftables rules in a host's namespace.
//!
//! Every name starts with `ccl-`, so a run that died without cleaning up is removed by the
//! next one ([`cleanup`]).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Prefix of every namespace and root-namespace device this module creates.
pub const PREFIX: &str = "ccl-";
pub const ROUTER: &str = "ccl-router";
const ROOT_DEV: &str = "ccl-up";
const ROOT_IP: &str = "10.77.0.1";
const ROUTER_UP_IP: &str = "10.77.0.2";
/// The routing table that sends site-to-site traffic into the WAN delay line.
const WAN_TABLE: &str = "100";
/// The delay line's TUN device in the router namespace.
pub const WAN_DEV: &str = "wan0";

/// One simulated host.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub site: usize,
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<()> {
    run_input(cmd, args, None)
}

/// Runs a command with `input` on stdin.
pub fn run_input(cmd: &str, args: &[&str], input: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("running {cmd} (is it installed? scripts/setup.sh installs it)")
        })?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, cmd: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    run("ip", &args)
}

fn in_ns_input(ns: &str, cmd: &[&str], input: &str) -> Result<()> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    run_input("ip", &args, Some(input))
}

/// Removes every namespace and device a previous run left behind.
pub fn cleanup() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    let _ = run("ip", &["link", "del", ROOT_DEV]);
}

/// The subnet of site `s` (`10.77.<s+1>.0/24`; the router is `.1`).
fn site_gateway(site: usize) -> String {
    format!("10.77.{}.1", site + 1)
}

/// Builds the router and `hosts` (name, site) with their addresses; `sites` bridges.
pub fn build(sites: usize, hosts: &[(String, usize)]) -> Result<Vec<Host>> {
    cleanup();
    run("ip", &["netns", "add", ROUTER])?;
    in_ns(ROUTER, &["ip", "link", "set", "lo", "up"])?;
    in_ns(ROUTER, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // The harness's way in.
    run(
        "ip",
        &[
            "link", "add", ROOT_DEV, "type", "veth", "peer", "name", "up0", "netns", ROUTER,
        ],
    )?;
    run(
        "ip",
        &["addr", "add", &format!("{ROOT_IP}/30"), "dev", ROOT_DEV],
    )?;
    run("ip", &["link", "set", ROOT_DEV, "up"])?;
    in_ns(
        ROUTER,
        &[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_UP_IP}/30"),
            "dev",
            "up0",
        ],
    )?;
    in_ns(ROUTER, &["ip", "link", "set", "up0", "up"])?;
    run(
        "ip",
        &[
            "route",
            "add",
            "10.77.0.0/16",
            "via",
            ROUTER_UP_IP,
            "dev",
            ROOT_DEV,
        ],
    )?;
    for s in 0..sites {
        let br = format!("br{s}");
        in_ns(ROUTER, &["ip", "link", "add", &br, "type", "bridge"])?;
        in_ns(
            ROUTER,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", site_gateway(s)),
                "dev",
                &br,
            ],
        )?;
        in_ns(ROUTER, &["ip", "link", "set", &br, "up"])?;
    }
    // Site-to-site traffic goes through the WAN delay line (`wan0`, created by the relay;
    // its route is added by `route_wan`); packets the relay writes back come in on wan0 and
    // take the main table to the other bridge.
    in_ns(ROUTER, &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])?;
    in_ns(
        ROUTER,
        &["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"],
    )?;
    for a in 0..sites {
        for b in 0..sites {
            if a != b {
                in_ns(
                    ROUTER,
                    &[
                        "ip",
                        "rule",
                        "add",
                        "iif",
                        &format!("br{a}"),
                        "to",
                        &format!("10.77.{}.0/24", b + 1),
                        "lookup",
                        WAN_TABLE,
                    ],
                )?;
            }
        }
    }
    let mut out = Vec::new();
    let mut per_site = vec![0u8; sites];
    for (i, (name, site)) in hosts.iter().enumerate() {
        per_site[*site] += 1;
        let ip = Ipv4Addr::new(10, 77, *site as u8 + 1, 10 + per_site[*site]);
        let ns = format!("{PREFIX}{name}");
        let dev = format!("h{i}");
        run("ip", &["netns", "add", &ns])?;
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
        in_ns(
            ROUTER,
            &[
                "ip", "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        in_ns(
            ROUTER,
            &["ip", "link", "set", &dev, "master", &format!("br{site}")],
        )?;
        in_ns(ROUTER, &["ip", "link", "set", &dev, "up"])?;
        in_ns(
            &ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(
            &ns,
            &["ip", "route", "add", "default", "via", &site_gateway(*site)],
        )?;
        out.push(Host {
            name: name.clone(),
            ns,
            ip,
            site: *site,
        });
    }
    Ok(out)
}

/// Drops traffic between `host` and `peers`: packets from `host` to them when `outbound`,
/// packets from them to `host` when `inbound` (both: a full partition).
pub fn partition(host: &Host, peers: &[Ipv4Addr], outbound: bool, inbound: bool) -> Result<()> {
    let set: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
    let set = set.join(", ");
    let mut rules = String::from("table inet chaos {\n");
    if inbound {
        rules.push_str(&format!(
            "  chain chaos_in {{\n    type filter hook input priority 0;\n    ip saddr {{ {set} }} drop\n  }}\n"
        ));
    }
    if outbound {
        rules.push_str(&format!(
            "  chain chaos_out {{\n    type filter hook output priority 0;\n    ip daddr {{ {set} }} drop\n  }}\n"
        ));
    }
    rules.push_str("}\n");
    in_ns_input(&host.ns, &["nft", "-f", "-"], &rules)
}

/// Removes `host`'s partition rules.
pub fn heal(host: &Host) -> Result<()> {
    let _ = in_ns(&host.ns, &["nft", "delete", "table", "inet", "chaos"]);
    Ok(())
}

/// Routes site-to-site traffic through the WAN delay line once its device exists.
pub fn route_wan() -> Result<()> {
    for _ in 0..100 {
        if in_ns(ROUTER, &["ip", "link", "show", WAN_DEV]).is_ok() {
            in_ns(
                ROUTER,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{WAN_DEV}.rp_filter=0"),
                ],
            )?;
            return in_ns(
                ROUTER,
                &[
                    "ip", "route", "add", "default", "dev", WAN_DEV, "table", WAN_TABLE,
                ],
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("the WAN relay did not create {WAN_DEV}")
}
