//! A cluster of real block servers (io_uring + RocksDB, each on its own thread) for volume tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use continuum_blockstore::server::{self, BlockServerConfig, RunningServer};
use continuum_blockstore::volume::ServerInfo;

/// A port that is free now, below the kernel's ephemeral range (32768+), so no outgoing
/// connection can take it while its server is stopped and before it is restarted there.
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

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: Vec<SocketAddr>,
    pub running: Vec<Option<RunningServer>>,
    pub down: Vec<bool>,
}

impl Cluster {
    /// `n` servers, one per host.
    pub fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            dir,
            addrs: Vec::new(),
            running: Vec::new(),
            down: vec![false; n],
        };
        for i in 0..n {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let srv = server::start(c.config(i, addr)).unwrap();
            c.addrs.push(srv.addr);
            c.running.push(Some(srv));
        }
        c
    }

    fn config(&self, i: usize, listen: SocketAddr) -> BlockServerConfig {
        BlockServerConfig {
            node_id: i as u64 + 1,
            data_dir: self.data_dir(i),
            listen,
            capacity_bytes: 256 << 20,
            flush_interval_ms: 20,
            record_cache_bytes: continuum_blockstore::store::DEFAULT_RECORD_CACHE_BYTES,
        }
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("block-{}", i + 1))
    }

    /// Stops server `i` (its port refuses connections).
    pub fn kill(&mut self, i: usize) {
        if let Some(s) = self.running[i].take() {
            s.stop().unwrap();
        }
    }

    pub fn restart(&mut self, i: usize) {
        assert!(self.running[i].is_none());
        let srv = server::start(self.config(i, self.addrs[i])).unwrap();
        self.running[i] = Some(srv);
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.running[i].is_some()
    }

    /// The cluster map: server i is `s{i+1}` on host `h{i+1}`; `down` ones are out of the map.
    pub fn servers(&self) -> Vec<ServerInfo> {
        self.addrs
            .iter()
            .enumerate()
            .map(|(i, a)| ServerInfo {
                id: i as u64 + 1,
                addr: a.to_string(),
                site: "site-a".into(),
                rack: "rack-1".into(),
                host: format!("h{}", i + 1),
                weight: 1.0,
                up: !self.down[i],
            })
            .collect()
    }
}

/// A tiny deterministic RNG (xorshift) for seeded workloads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
