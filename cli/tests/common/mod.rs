//! Multi-process test harness: real `continuum meta` processes on loopback, each with its own
//! RocksDB in a temp dir, killed with SIGKILL and restarted as a test needs.

#![allow(dead_code)]

pub mod blocks;
pub mod fabric;
pub mod net;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use continuum_meta_client::{ClientConfig, MetaClient};

/// A port that is free now, below the kernel's ephemeral range (32768+), so no outgoing
/// connection can take it between this call and the member binding it; a process-wide counter
/// keeps parallel tests of one binary apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        1 + std::process::id() % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

pub struct Node {
    pub id: u64,
    pub client: String,
    pub peer: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
    pub extra: Vec<String>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub initial: String,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_continuum")
}

impl Cluster {
    /// Starts `n` members bootstrapping one cluster; `extra` flags go to every member.
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        Cluster::start_on("127.0.0.1", n, extra)
    }

    /// [`Cluster::start`] with clients served on `ip` (e.g. a test bridge's address, for hosts
    /// in other network namespaces).
    pub fn start_on(ip: &str, n: u64, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for id in 1..=n {
            nodes.push(Node {
                id,
                client: format!("{ip}:{}", free_port()),
                peer: format!("127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("meta-{id}")),
                child: None,
                extra: extra.iter().map(|s| s.to_string()).collect(),
            });
        }
        let initial = nodes
            .iter()
            .map(|n| format!("{}={}/{}", n.id, n.peer, n.client))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            nodes,
            initial,
        };
        for i in 0..c.nodes.len() {
            c.spawn(i, false);
        }
        c
    }

    pub fn spawn(&mut self, i: usize, join: bool) {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("meta-{}.log", n.id)))
            .expect("log file");
        let mut cmd = Command::new(bin());
        cmd.arg("meta")
            .arg(format!("--id={}", n.id))
            .arg(format!("--data-dir={}", n.data_dir.display()))
            .arg(format!("--listen-client={}", n.client))
            .arg(format!("--listen-peer={}", n.peer))
            .arg(format!("--initial-cluster={}", self.initial))
            .arg("--request-timeout-ms=3000")
            .args(&n.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if join {
            cmd.arg("--join");
        }
        let child = cmd.spawn().expect("spawn continuum meta");
        self.nodes[i].child = Some(child);
    }

    /// Adds a node record (not started) for a member that will join.
    pub fn add_node(&mut self, id: u64, extra: &[&str]) -> usize {
        self.nodes.push(Node {
            id,
            client: format!("127.0.0.1:{}", free_port()),
            peer: format!("127.0.0.1:{}", free_port()),
            data_dir: self.dir.path().join(format!("meta-{id}")),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        });
        self.nodes.len() - 1
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn index_of(&self, id: u64) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .expect("known member")
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    pub fn client(&self) -> MetaClient {
        MetaClient::connect(&self.endpoints()).expect("client")
    }

    /// A client that talks to one member only, with short timeouts.
    pub fn client_of(&self, i: usize, timeout: Duration) -> MetaClient {
        let mut cfg = ClientConfig::new(vec![self.nodes[i].client.clone()]);
        cfg.request_timeout = timeout;
        cfg.call_timeout = timeout;
        cfg.max_attempts = 1;
        MetaClient::new(cfg).expect("client")
    }

    /// Waits until some running member reports a leader; returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        let client = self.client();
        let mut last = None;
        let found = wait_for(timeout, || {
            let client = client.clone();
            let eps: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| n.client.clone())
                .collect();
            async move {
                for ep in eps {
                    if let Ok(s) = client.status_of(&ep).await {
                        if s.leader_id != 0 && s.member_id == s.leader_id {
                            return Some(s.leader_id);
                        }
                    }
                }
                None
            }
        })
        .await;
        if let Some(l) = found {
            last = Some(l);
        }
        last.unwrap_or_else(|| {
            panic!(
                "no leader within {timeout:?}; logs in {}",
                self.dir.path().display()
            )
        })
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("meta-{id}.log"))).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = self.log(n.id);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- meta-{} log tail ----", n.id);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes (never a bare sleep as synchronisation).
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Puts `key=value`, retrying on ambiguous outcomes until acknowledged (the value is unique to
/// the key, so a duplicate apply is harmless).
pub async fn put_acked(client: &MetaClient, key: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client
            .put(key.as_bytes().to_vec(), value.as_bytes().to_vec())
            .await
        {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("put {key} retrying after: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put {key} never acknowledged: {e}"),
        }
    }
}

/// Runs a command (e.g. `ip`, `nft`) and returns what it printed.
pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn ok(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
