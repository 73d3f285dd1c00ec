//! Three sites configured only through meta: each in its own network namespace, joined to the
//! others by a bridge (the "internet"), runs `continuum overlay up` with nothing but meta's
//! address; they find each other through their records and ping over the overlay. With meta
//! stopped the mesh keeps passing traffic, and a daemon restarted then comes back from its
//! cached peer list. Needs root (namespaces, TUN).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SITES: usize = 3;
const BRIDGE: &str = "ctm-br";
const META_ADDR: &str = "10.98.0.254";

fn ns(i: usize) -> String {
    format!("ctm-{i}")
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

fn ok(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_continuum")
}

/// The namespaces, the bridge and the processes; everything is removed on drop.
struct Lab {
    dir: tempfile::TempDir,
    meta: Option<Child>,
    daemons: Vec<Option<Child>>,
}

impl Lab {
    fn new() -> Lab {
        let lab = Lab {
            dir: tempfile::tempdir().unwrap(),
            meta: None,
            daemons: (0..SITES).map(|_| None).collect(),
        };
        lab.teardown_net();
        ok(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
        ok(&[
            "ip",
            "addr",
            "add",
            &format!("{META_ADDR}/24"),
            "dev",
            BRIDGE,
        ]);
        ok(&["ip", "link", "set", BRIDGE, "up"]);
        for i in 1..=SITES {
            let n = ns(i);
            let (inner, outer) = (format!("ctm-v{i}"), format!("ctm-h{i}"));
            ok(&["ip", "netns", "add", &n]);
            ok(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &n,
            ]);
            ok(&["ip", "link", "set", &outer, "master", BRIDGE]);
            ok(&["ip", "link", "set", &outer, "up"]);
            ok(&[
                "ip",
                "-n",
                &n,
                "addr",
                "add",
                &format!("10.98.0.{i}/24"),
                "dev",
                &inner,
            ]);
            ok(&["ip", "-n", &n, "link", "set", &inner, "up"]);
            ok(&["ip", "-n", &n, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn teardown_net(&self) {
        for i in 1..=SITES {
            let _ = sh(&["ip", "netns", "del", &ns(i)]);
            let _ = sh(&["ip", "link", "del", &format!("ctm-h{i}")]);
        }
        let _ = sh(&["ip", "link", "del", BRIDGE]);
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
                &format!("--listen-client={META_ADDR}:{port}"),
                &format!("--listen-peer=127.0.0.1:{peer_port}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.meta = Some(child);
    }

    fn stop_meta(&mut self) {
        if let Some(mut c) = self.meta.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn state_dir(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("site-{i}"))
    }

    fn start_daemon(&mut self, i: usize, meta_port: u16) {
        let log = self.log_file(&format!("site-{i}.log"));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns(i),
                bin(),
                "--log-level",
                "info,continuum_overlay=debug",
            ])
            .args([
                "overlay",
                "up",
                &format!("--meta={META_ADDR}:{meta_port}"),
                &format!("--name=site-{i}"),
                &format!("--site=site-{i}"),
                &format!("--address=10.91.0.{i}/24"),
                "--listen-port=51820",
                &format!("--endpoint=10.98.0.{i}:51820"),
                &format!("--subnet=10.92.{i}.0/24"),
                &format!("--state-dir={}", self.state_dir(i).display()),
                &format!("--tun=ctm{i}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemons[i - 1] = Some(child);
    }

    fn kill_daemon(&mut self, i: usize) {
        if let Some(mut c) = self.daemons[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for i in 1..=SITES {
            let l = self.log(&format!("site-{i}.log"));
            let tail: Vec<&str> = l.lines().rev().take(30).collect();
            out.push_str(&format!("--- site-{i} (last lines)\n"));
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
        for i in 1..=SITES {
            self.kill_daemon(i);
        }
        self.stop_meta();
        self.teardown_net();
        for i in 1..=SITES {
            let _ = std::fs::remove_file(format!("/run/continuum/overlay-ctm{i}.sock"));
        }
    }
}

fn pings(from: usize, to: usize) -> bool {
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns(from),
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        &format!("10.91.0.{to}"),
    ])
    .status
    .success()
}

fn all_pairs() -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for a in 1..=SITES {
        for b in 1..=SITES {
            if a != b {
                v.push((a, b));
            }
        }
    }
    v
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

fn show(i: usize) -> String {
    let out = sh(&[bin(), "overlay", "show", "--tun", &format!("ctm{i}")]);
    assert!(
        out.status.success(),
        "overlay show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn three_sites_configured_through_meta_keep_their_mesh_without_it() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the overlay mesh test needs root (network namespaces, TUN); run it as the README's test command does"
    );
    let mut lab = Lab::new();
    let port = common::free_port();
    lab.start_meta(port, common::free_port());
    for i in 1..=SITES {
        lab.start_daemon(i, port);
    }
    for (a, b) in all_pairs() {
        wait_for(
            &lab,
            &format!("site {a} to ping site {b} over the overlay"),
            Duration::from_secs(30),
            || pings(a, b),
        );
    }
    // Keys were made on first start, private to their owner.
    for i in 1..=SITES {
        assert_eq!(mode(&lab.state_dir(i).join("private.key")), 0o600);
        assert!(lab.state_dir(i).join("peers.json").exists());
    }
    let s = show(1);
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
    for (a, b) in all_pairs() {
        assert!(
            pings(a, b),
            "site {a} cannot ping site {b} with meta stopped"
        );
    }
    // A daemon restarted while meta is away comes back from its cached peers.
    lab.kill_daemon(3);
    lab.start_daemon(3, port);
    for (a, b) in [(3, 1), (3, 2), (1, 3), (2, 3)] {
        wait_for(
            &lab,
            &format!("site {a} to ping site {b} after site 3 restarted"),
            Duration::from_secs(30),
            || pings(a, b),
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
