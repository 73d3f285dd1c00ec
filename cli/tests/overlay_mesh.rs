//! Three sites configured only through meta: each in its own network namespace, joined to the
//! others by a bridge (the "internet"), runs `continuum overlay up` with nothing but meta's
//! address; they find each other through their records and ping over the overlay. With meta
//! stopped the mesh keeps passing traffic, and a daemon restarted then comes back from its
//! cached peer list. Needs root (namespaces, TUN).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::net::Net;
use common::{ok, sh};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SITES: usize = 3;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_continuum")
}

/// Namespaces, links, meta and overlay daemons of one test; everything is removed on drop.
/// Names start with the lab's prefix, so the tests of this file run side by side.
struct Lab {
    net: Net,
    dir: tempfile::TempDir,
    meta: Option<Child>,
    meta_addr: String,
    daemons: BTreeMap<String, (String, Vec<String>, Option<Child>)>,
}

impl Lab {
    /// A lab whose "internet" is a bridge in the root namespace; meta listens on `meta_ip`
    /// there.
    fn new(prefix: &'static str, net: &str, meta_ip: &str) -> Lab {
        Lab {
            net: Net::new(prefix, net, meta_ip),
            dir: tempfile::tempdir().unwrap(),
            meta: None,
            meta_addr: meta_ip.to_string(),
            daemons: BTreeMap::new(),
        }
    }

    fn add_ns(&mut self, name: &str) -> String {
        self.net.add_ns(name)
    }

    fn link(&mut self, ns: &str, inner: &str, addr: &str, outer_ns: Option<(&str, &str)>) {
        self.net.link(ns, inner, addr, outer_ns)
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .unwrap()
    }

    /// A log without its colour codes.
    fn log(&self, name: &str) -> String {
        let raw = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    fn start_meta(&mut self, port: u16, peer_port: u16) {
        let log = self.log_file("meta.log");
        let child = Command::new(bin())
            .args([
                "meta",
                "--id=1",
                &format!("--data-dir={}", self.dir.path().join("meta").display()),
                &format!("--listen-client={}:{port}", self.meta_addr),
                &format!("--listen-peer=127.0.0.1:{peer_port}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.meta_addr = format!("{}:{port}", self.meta_addr);
        self.meta = Some(child);
    }

    fn stop_meta(&mut self) {
        if let Some(mut c) = self.meta.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn state_dir(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// `continuum overlay up` for site `name` in namespace `ns` on TUN `tun`, with `extra`
    /// flags; remembered, so [`Lab::restart`] starts it the same way.
    fn up(&mut self, ns: &str, name: &str, tun: &str, extra: &[String]) {
        let mut args = vec![
            "overlay".to_string(),
            "up".into(),
            format!("--meta={}", self.meta_addr),
            format!("--name={name}"),
            format!("--site={name}"),
            format!("--state-dir={}", self.state_dir(name).display()),
            format!("--tun={tun}"),
        ];
        args.extend(extra.iter().cloned());
        self.daemons
            .insert(name.to_string(), (ns.to_string(), args, None));
        self.restart(name);
    }

    fn restart(&mut self, name: &str) {
        self.kill(name);
        let log = self.log_file(&format!("{name}.log"));
        let (ns, args, child) = self.daemons.get_mut(name).expect("known daemon");
        *child = Some(
            Command::new("ip")
                .args(["netns", "exec", ns.as_str(), bin()])
                .args(["--log-level", "info,continuum_overlay=debug"])
                .args(args.iter())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn kill(&mut self, name: &str) {
        if let Some(mut c) = self.daemons.get_mut(name).and_then(|d| d.2.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in self.daemons.keys() {
            let l = self.log(&format!("{name}.log"));
            let tail: Vec<&str> = l.lines().rev().take(30).collect();
            out.push_str(&format!("--- {name} (last lines)\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let names: Vec<String> = self.daemons.keys().cloned().collect();
        for n in names {
            self.kill(&n);
        }
        self.stop_meta();
        // `net` (namespaces and links) goes after this, with the fields.
    }
}

fn pings(ns: &str, to: &str) -> bool {
    sh(&["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", to])
        .status
        .success()
}

fn wait_for(lab: &Lab, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn show(tun: &str) -> String {
    let out = sh(&[bin(), "overlay", "show", "--tun", tun]);
    assert!(
        out.status.success(),
        "overlay show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn need_root() {
    common::net::need_root("the overlay mesh tests");
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn three_sites_configured_through_meta_keep_their_mesh_without_it() {
    need_root();
    let mut lab = Lab::new("ctm", "24", "10.98.0.254");
    lab.start_meta(common::free_port(), common::free_port());
    let mut ns = Vec::new();
    for i in 1..=SITES {
        let n = lab.add_ns(&format!("s{i}"));
        lab.link(&n, &format!("v{i}"), &format!("10.98.0.{i}/24"), None);
        lab.up(
            &n,
            &format!("site-{i}"),
            &format!("ctm{i}"),
            &[
                format!("--address=10.91.0.{i}/24"),
                "--listen-port=51820".into(),
                format!("--endpoint=10.98.0.{i}:51820"),
                format!("--subnet=10.92.{i}.0/24"),
            ],
        );
        ns.push(n);
    }
    let pairs: Vec<(usize, usize)> = (1..=SITES)
        .flat_map(|a| (1..=SITES).filter(move |&b| b != a).map(move |b| (a, b)))
        .collect();
    let ping = |a: usize, b: usize| pings(&ns[a - 1], &format!("10.91.0.{b}"));
    for &(a, b) in &pairs {
        wait_for(
            &lab,
            &format!("site {a} to ping site {b} over the overlay"),
            Duration::from_secs(30),
            || ping(a, b),
        );
    }
    // Keys were made on first start, private to their owner.
    for i in 1..=SITES {
        let dir = lab.state_dir(&format!("site-{i}"));
        assert_eq!(mode(&dir.join("private.key")), 0o600);
        assert!(dir.join("peers.json").exists());
    }
    let s = show("ctm1");
    assert!(s.contains("interface: ctm1"), "{s}");
    for i in 2..=SITES {
        assert!(s.contains(&format!("(site-{i})")), "{s}");
        assert!(s.contains(&format!("10.92.{i}.0/24")), "{s}");
    }
    assert!(s.contains("latest handshake:"), "{s}");
    assert!(s.contains("transfer:"), "{s}");

    // Meta goes away: the mesh keeps passing traffic.
    lab.stop_meta();
    std::thread::sleep(Duration::from_secs(1));
    for &(a, b) in &pairs {
        assert!(
            ping(a, b),
            "site {a} cannot ping site {b} with meta stopped"
        );
    }
    // A daemon restarted while meta is away comes back from its cached peers.
    lab.restart("site-3");
    for (a, b) in [(3, 1), (3, 2), (1, 3), (2, 3)] {
        wait_for(
            &lab,
            &format!("site {a} to ping site {b} after site 3 restarted"),
            Duration::from_secs(30),
            || ping(a, b),
        );
    }
    let log = lab.log("site-3.log");
    let restarted = log.lines().filter(|l| l.contains("overlay up")).nth(1);
    assert!(
        restarted.is_some_and(|l| l.contains("cached_peers=2")),
        "the restart did not start from the cached peers:\n{}",
        lab.logs()
    );
}

/// A NAT in a router namespace, as nftables rules for edge `e` of the lab with prefix `p`
/// (subnet 192.168.`n`.0/24, public side `{p}-vr{e}`).
type NatRules = fn(p: &str, n: usize, e: &str) -> String;

/// Masquerading with random ports, as a carrier-grade NAT does: every destination sees another
/// port, and only replies get in. No hole punching gets through.
fn random_port_nat(p: &str, n: usize, e: &str) -> String {
    format!(
        "table ip nat {{\n  chain post {{\n    type nat hook postrouting priority 100;\n    ip saddr 192.168.{n}.0/24 oifname \"{p}-vr{e}\" masquerade fully-random\n  }}\n}}\n"
    )
}

/// A home router's NAT: masquerading that keeps the edge's port when it can (endpoint-
/// independent mapping) and a firewall that drops anything unsolicited from outside (address-
/// and port-dependent filtering: a "port-restricted cone"). Only simultaneous open gets a
/// peer's packets in: each side's outgoing packet opens its own NAT for the other's.
fn home_router_nat(p: &str, n: usize, e: &str) -> String {
    format!(
        "table ip nat {{\n  chain post {{\n    type nat hook postrouting priority 100;\n    ip saddr 192.168.{n}.0/24 oifname \"{p}-vr{e}\" masquerade\n  }}\n}}\ntable ip filter {{\n  chain input {{\n    type filter hook input priority 0;\n    iifname \"{p}-vr{e}\" ct state new drop\n  }}\n  chain forward {{\n    type filter hook forward priority 0;\n    iifname \"{p}-vr{e}\" ct state new drop\n  }}\n}}\n"
    )
}

/// A cloud site with a public endpoint that relays, and two edge sites, each behind its own
/// NAT made by `nat`, announcing no endpoint, on the "internet" 10.`net`.0.0/24; TUN devices
/// are `{prefix}c`, `{prefix}a`, `{prefix}b`. Returns the lab and the edges' namespaces once
/// every site pings every other.
fn cloud_and_two_natted_edges(prefix: &'static str, net: u8, nat: NatRules) -> (Lab, Vec<String>) {
    let mut lab = Lab::new(prefix, "24", &format!("10.{net}.0.254"));
    lab.start_meta(common::free_port(), common::free_port());
    let cloud = lab.add_ns("cloud");
    lab.link(&cloud, "vc", &format!("10.{net}.0.1/24"), None);
    lab.up(
        &cloud,
        "cloud",
        &format!("{prefix}c"),
        &[
            "--address=10.93.0.1/24".into(),
            "--listen-port=51820".into(),
            format!("--endpoint=10.{net}.0.1:51820"),
            "--relay".into(),
        ],
    );
    let mut edges = Vec::new();
    for (i, e) in ["a", "b"].iter().enumerate() {
        let n = i + 2;
        let router = lab.add_ns(&format!("r{e}"));
        lab.link(
            &router,
            &format!("vr{e}"),
            &format!("10.{net}.0.{n}/24"),
            None,
        );
        let edge = lab.add_ns(e);
        lab.link(
            &edge,
            &format!("ve{e}"),
            &format!("192.168.{n}.2/24"),
            Some((&router, &format!("192.168.{n}.1/24"))),
        );
        ok(&[
            "ip",
            "-n",
            &edge,
            "route",
            "add",
            "default",
            "via",
            &format!("192.168.{n}.1"),
        ]);
        ok(&[
            "ip",
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let rules = lab.dir.path().join(format!("nat-{e}.nft"));
        std::fs::write(&rules, nat(prefix, n, e)).unwrap();
        ok(&[
            "ip",
            "netns",
            "exec",
            &router,
            "nft",
            "-f",
            rules.to_str().unwrap(),
        ]);
        // Behind its NAT the edge has no endpoint to announce: it dials out.
        lab.up(
            &edge,
            &format!("edge-{e}"),
            &format!("{prefix}{e}"),
            &[
                format!("--address=10.93.0.{n}/24"),
                "--listen-port=51820".into(),
            ],
        );
        edges.push(edge);
    }
    for (from, to) in [(0, "10.93.0.3"), (1, "10.93.0.2"), (0, "10.93.0.1")] {
        wait_for(
            &lab,
            &format!("{} to ping {to}", edges[from]),
            Duration::from_secs(40),
            || pings(&edges[from], to),
        );
    }
    (lab, edges)
}

/// The packets the cloud relayed so far (from `overlay show`).
fn forwarded(cloud: &str) -> u64 {
    cloud
        .lines()
        .find_map(|l| l.trim().strip_prefix("relaying: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Two edge sites behind random-port NATs reach each other only through the cloud site's
/// daemon, which relays; the cloud sees them only as the NAT's addresses.
#[test]
fn two_sites_behind_nat_talk_through_the_cloud_relay() {
    need_root();
    let (lab, _edges) = cloud_and_two_natted_edges("ctn", 97, random_port_nat);
    let c = show("ctnc");
    assert!(c.contains("relaying:"), "{c}");
    assert!(forwarded(&c) >= 2, "{c}");
    // The cloud knows the edges only by their NAT's public addresses.
    assert!(c.contains("endpoint: 10.97.0.2:"), "{c}");
    assert!(c.contains("endpoint: 10.97.0.3:"), "{c}");
    // A new candidate endpoint for the other edge (the cloud's observation of its NAT) is
    // tried directly for 5 s before the relay is the path again: wait for that to settle.
    wait_for(
        &lab,
        "edge a to route edge b through the relay",
        Duration::from_secs(20),
        || show("ctna").contains("path: through a relay"),
    );
    let a = show("ctna");
    assert!(a.contains("(cloud)") && a.contains("relay: yes"), "{a}");
}

/// Behind home-router NATs, the endpoints the cloud observes for the edges (published in its
/// record in meta) let the edges punch a direct path (simultaneous open): it replaces the
/// relay, and the cloud stops carrying their traffic.
#[test]
fn edges_behind_home_router_nats_punch_a_direct_path_that_replaces_the_relay() {
    need_root();
    let (lab, edges) = cloud_and_two_natted_edges("cth", 96, home_router_nat);
    // Each edge learns where the other's NAT maps it (10.96.0.x:51820) and hands over.
    wait_for(
        &lab,
        "a direct path between the edges",
        Duration::from_secs(40),
        || {
            let _ = pings(&edges[0], "10.93.0.3");
            let a = show("ctha");
            let b_section = a
                .split("\npeer: ")
                .find(|p| p.contains("(edge-b)"))
                .unwrap_or("");
            b_section.contains("endpoint: 10.96.0.3:51820")
                && !b_section.contains("through a relay")
        },
    );
    let before = forwarded(&show("cthc"));
    for _ in 0..3 {
        assert!(pings(&edges[0], "10.93.0.3"), "{}", lab.logs());
        assert!(pings(&edges[1], "10.93.0.2"), "{}", lab.logs());
    }
    let after = forwarded(&show("cthc"));
    assert_eq!(
        before,
        after,
        "the relay carried edge traffic after the direct path:\n{}",
        show("cthc")
    );
}
