//! The live run's processes: real `continuum` daemons, each started inside its host's network
//! namespace (`ip netns exec` execs the daemon, so the child's pid is the daemon's and signals
//! reach it directly), logging to its own file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use rustix::process::{Pid, Signal};

/// What a process is (faults and budgets depend on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Meta,
    Block,
    Gateway,
}

/// One daemon.
pub struct Proc {
    pub name: String,
    pub role: Role,
    /// Index of its host in the topology.
    pub host: usize,
    /// Node id (meta member id, block server id; 0 for the gateway).
    pub id: u64,
    ns: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    pub paused: bool,
    pub starts: u32,
}

impl Proc {
    pub fn new(
        name: &str,
        role: Role,
        host: usize,
        id: u64,
        ns: &str,
        args: Vec<String>,
        logs: &Path,
    ) -> Self {
        Self {
            name: name.to_string(),
            role,
            host,
            id,
            ns: ns.to_string(),
            args,
            log: logs.join(format!("{name}.log")),
            child: None,
            paused: false,
            starts: 0,
        }
    }

    pub fn start(&mut self, exe: &Path) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(exe)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("CONTINUUM_CHAOS_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        self.paused = false;
        self.starts += 1;
        Ok(())
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self
            .child
            .as_ref()
            .and_then(|c| Pid::from_raw(c.id() as i32))
        {
            // It may have exited already; that is seen by `exited`.
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// `kill -9` (the process is reaped; [`Proc::start`] brings it back).
    pub fn kill(&mut self) {
        if self.paused {
            self.signal(Signal::CONT);
            self.paused = false;
        }
        self.signal(Signal::KILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: std::time::Duration) {
        if self.paused {
            self.signal(Signal::CONT);
            self.paused = false;
        }
        self.signal(Signal::TERM);
        let deadline = std::time::Instant::now() + grace;
        while let Some(c) = &mut self.child {
            if c.try_wait().ok().flatten().is_some() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.kill();
    }

    pub fn pause(&mut self) {
        self.signal(Signal::STOP);
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.signal(Signal::CONT);
        self.paused = false;
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process died on its own (it should not: the report counts it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let st = c.try_wait().ok().flatten()?;
        self.child = None;
        Some(st)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
