//! Hosts as network namespaces: an "internet" bridge in the root namespace and namespaces
//! linked to it (or to each other) by veth pairs. Every name starts with the lab's prefix, so
//! tests with different prefixes run side by side; what an earlier, killed run left behind is
//! removed first, and everything is removed on drop. Needs root.

use super::{ok, sh};

pub struct Net {
    pub prefix: String,
    /// The bridge's address (the root namespace's side of the internet).
    pub bridge_ip: String,
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
}

/// Panics with a clear message unless the tests run as root.
pub fn need_root(what: &str) {
    assert!(
        rustix::process::geteuid().is_root(),
        "{what} need root (network namespaces, TUN, nftables); run them as the README's test command does"
    );
}

impl Net {
    /// A bridge with `bridge_ip/prefix_len` in the root namespace.
    pub fn new(prefix: &str, prefix_len: &str, bridge_ip: &str) -> Net {
        let mut net = Net {
            prefix: prefix.to_string(),
            bridge_ip: bridge_ip.to_string(),
            namespaces: Vec::new(),
            links: Vec::new(),
        };
        net.cleanup_leftovers();
        let br = format!("{prefix}-br");
        ok(&["ip", "link", "add", &br, "type", "bridge"]);
        // A fixed address: a bridge otherwise takes its lowest port's, which changes as ports
        // join, and hosts that resolved the old one lose it for a while.
        ok(&["ip", "link", "set", &br, "address", "02:00:00:00:00:fe"]);
        net.links.push(br.clone());
        ok(&[
            "ip",
            "addr",
            "add",
            &format!("{bridge_ip}/{prefix_len}"),
            "dev",
            &br,
        ]);
        ok(&["ip", "link", "set", &br, "up"]);
        net
    }

    /// Removes what an earlier, killed run with this prefix left behind.
    fn cleanup_leftovers(&self) {
        let out = sh(&["ip", "netns", "list"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{}-", self.prefix)) {
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
        let out = sh(&["ip", "-o", "link", "show"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split(": ").nth(1) {
                let name = name.split('@').next().unwrap_or("");
                if name.starts_with(&format!("{}-", self.prefix)) {
                    let _ = sh(&["ip", "link", "del", name]);
                }
            }
        }
    }

    /// A namespace `PREFIX-name` with its loopback up.
    pub fn add_ns(&mut self, name: &str) -> String {
        let n = format!("{}-{name}", self.prefix);
        ok(&["ip", "netns", "add", &n]);
        ok(&["ip", "-n", &n, "link", "set", "lo", "up"]);
        self.namespaces.push(n.clone());
        n
    }

    /// A veth between namespace `ns` (`inner` with `addr`) and `outer`: the bridge when
    /// `outer_ns` is `None`, else that namespace (with `outer_addr`).
    pub fn link(&mut self, ns: &str, inner: &str, addr: &str, outer_ns: Option<(&str, &str)>) {
        let (i, o) = (
            format!("{}-{inner}", self.prefix),
            format!("{}-{inner}x", self.prefix),
        );
        ok(&[
            "ip", "link", "add", &o, "type", "veth", "peer", "name", &i, "netns", ns,
        ]);
        ok(&["ip", "-n", ns, "addr", "add", addr, "dev", &i]);
        ok(&["ip", "-n", ns, "link", "set", &i, "up"]);
        match outer_ns {
            None => {
                ok(&[
                    "ip",
                    "link",
                    "set",
                    &o,
                    "master",
                    &format!("{}-br", self.prefix),
                ]);
                ok(&["ip", "link", "set", &o, "up"]);
                self.links.push(o);
            }
            Some((other, other_addr)) => {
                ok(&["ip", "link", "set", &o, "netns", other]);
                ok(&["ip", "-n", other, "addr", "add", other_addr, "dev", &o]);
                ok(&["ip", "-n", other, "link", "set", &o, "up"]);
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.namespaces {
            let _ = sh(&["ip", "netns", "del", n]);
        }
        for l in &self.links {
            let _ = sh(&["ip", "link", "del", l]);
        }
    }
}
