//! Block servers as processes (`continuum block`), each its own failure domain (host).

use std::process::{Child, Command, Stdio};

pub struct Blocks {
    pub dir: tempfile::TempDir,
    /// The address they listen on.
    pub ip: String,
    pub ports: Vec<u16>,
    pub metrics_ports: Vec<u16>,
    pub children: Vec<Option<Child>>,
    pub meta: String,
}

impl Blocks {
    pub fn start(n: usize, meta: &str) -> Blocks {
        Blocks::start_on("127.0.0.1", n, meta)
    }

    /// [`Blocks::start`] listening on `ip`.
    pub fn start_on(ip: &str, n: usize, meta: &str) -> Blocks {
        let mut b = Blocks {
            dir: tempfile::tempdir().unwrap(),
            ip: ip.to_string(),
            ports: (0..n).map(|_| super::free_port()).collect(),
            metrics_ports: (0..n).map(|_| super::free_port()).collect(),
            children: Vec::new(),
            meta: meta.to_string(),
        };
        for i in 0..n {
            let c = b.spawn(i);
            b.children.push(Some(c));
        }
        b
    }

    pub fn spawn(&self, i: usize) -> Child {
        let log =
            std::fs::File::create(self.dir.path().join(format!("block-{}.log", i + 1))).unwrap();
        Command::new(super::bin())
            .args([
                "block",
                &format!("--id={}", i + 1),
                &format!("--listen={}:{}", self.ip, self.ports[i]),
                &format!("--meta={}", self.meta),
                &format!("--host=h{}", i + 1),
                "--capacity=1G",
                "--failure-check-seconds=1",
                "--down-grace-seconds=2",
                &format!("--metrics-addr=127.0.0.1:{}", self.metrics_ports[i]),
            ])
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join(format!("block-{}", i + 1)).display()
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// SIGKILL: nothing is flushed.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Blocks {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}
