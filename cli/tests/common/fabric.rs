//! A small fabric for tests that need volumes: one meta member, 6 block servers (each its own
//! failure domain) and gateways as processes, plus helpers to run the CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::blocks::Blocks;

pub struct Gateway {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl Gateway {
    pub fn start(dir: &Path, name: &str, meta: &str, extra: &[&str]) -> Gateway {
        Gateway::start_in(None, dir, name, meta, extra)
    }

    /// [`Gateway::start`] in network namespace `ns` (its NBD socket is a file, reachable from
    /// every namespace).
    pub fn start_in(
        ns: Option<&str>,
        dir: &Path,
        name: &str,
        meta: &str,
        extra: &[&str],
    ) -> Gateway {
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let port = super::free_port();
        let log = dir.join(format!("{name}.log"));
        let child = in_ns(ns)
            .args([
                "gateway",
                &format!("--id={name}"),
                &format!("--meta={meta}"),
                &format!("--listen=127.0.0.1:{port}"),
            ])
            .arg(format!("--socket={}", socket.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let g = Gateway {
            child: Some(child),
            socket,
            port,
            log,
        };
        let up = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::os::unix::net::UnixStream::connect(&g.socket).is_ok()
        });
        assert!(up, "gateway listens: {}", g.logs());
        g
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait: the clean stop (flush, leases let go).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- gateway log tail ----");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `continuum` run in network namespace `ns` (`ip netns exec`, which execs it: the child's
/// pid is continuum's), or here.
pub fn in_ns(ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, super::bin()]);
            c
        }
        None => Command::new(super::bin()),
    }
}

/// Runs a command; panics with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (scripts/setup.sh installs it): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn continuum(meta: &str, args: &[&str]) -> String {
    run(Command::new(super::bin())
        .args(args)
        .args(["--endpoints", meta]))
}

pub struct Fabric {
    pub _meta: super::Cluster,
    pub blocks: Blocks,
    pub meta_ep: String,
    pub dir: tempfile::TempDir,
}

pub async fn fabric() -> Fabric {
    fabric_on("127.0.0.1").await
}

/// [`fabric`] with meta and the block servers on `ip` (a test bridge's address, for hosts in
/// other network namespaces).
pub async fn fabric_on(ip: &str) -> Fabric {
    let meta = super::Cluster::start_on(ip, 1, &[]);
    meta.wait_leader(Duration::from_secs(20)).await;
    let meta_ep = meta.endpoints().join(",");
    let client = meta.client();
    let blocks = Blocks::start_on(ip, 6, &meta_ep);
    let up = super::wait_for(Duration::from_secs(30), || async {
        let n = continuum_blockstore::cluster::alive_nodes(&client)
            .await
            .ok()?
            .len();
        (n == 6).then_some(())
    })
    .await;
    assert!(up.is_some(), "6 block servers register");
    Fabric {
        _meta: meta,
        blocks,
        meta_ep,
        dir: tempfile::tempdir().unwrap(),
    }
}
