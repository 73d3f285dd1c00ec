//! Local multi-process clusters for the benchmarks: ports, working directories and the member
//! processes themselves.
//!
//! A [`Cluster`] owns its member processes. Dropping it (normal exit, an error unwinding through
//! `?`, or the benchmark future being dropped on Ctrl-C) sends SIGKILL to every member still
//! running and reaps it, so a benchmark never leaves daemons behind. [`Cluster::kill`] is the
//! `kill -9` of the failover measurements and [`Cluster::restart`] brings the member back with
//! the same command line and data directory.
//!
//! Each member's stdout and stderr go to a log file next to its data; when a member dies
//! unexpectedly the error carries the tail of that log.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

/// How many ports past the next candidate [`PortAllocator::take`] probes before giving up.
const MAX_PORT_PROBES: u16 = 1000;
/// Lines of a member's log quoted in the error when it exits unexpectedly.
const LOG_TAIL_LINES: usize = 20;
/// Time allowed to open a TCP connection to a member on loopback.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How to start one member: the program, its arguments and where its output goes.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    /// Human-readable member name for progress lines and errors, e.g. `etcd/e2`.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub log_path: PathBuf,
}

impl MemberSpec {
    /// The command line as a shell user would type it, for reports.
    pub fn command_line(&self) -> String {
        let mut line = self.program.display().to_string();
        for arg in &self.args {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }
}

struct Member {
    spec: MemberSpec,
    child: Option<Child>,
}

/// The running members of one local cluster, killed when dropped.
pub struct Cluster {
    label: String,
    members: Vec<Member>,
}

impl Cluster {
    /// Starts every member. If one fails to start, the ones already started are killed.
    pub fn start(label: &str, specs: Vec<MemberSpec>) -> Result<Self> {
        let members = specs
            .into_iter()
            .map(|spec| Member { spec, child: None })
            .collect();
        let mut cluster = Self {
            label: label.to_string(),
            members,
        };
        for idx in 0..cluster.members.len() {
            cluster.spawn(idx)?;
        }
        Ok(cluster)
    }

    pub fn member_name(&self, idx: usize) -> &str {
        &self.members[idx].spec.name
    }

    pub fn is_running(&self, idx: usize) -> bool {
        self.members[idx].child.is_some()
    }

    pub fn command_lines(&self) -> Vec<String> {
        self.members.iter().map(|m| m.spec.command_line()).collect()
    }

    /// `kill -9` of member `idx`: SIGKILL, then reap it so it is gone when this returns.
    pub fn kill(&mut self, idx: usize) -> Result<()> {
        let member = &mut self.members[idx];
        let Some(mut child) = member.child.take() else {
            bail!("{} is not running", member.spec.name);
        };
        // `Child::kill` is SIGKILL on Unix. The blocking wait is brief: a SIGKILLed process
        // exits as soon as the kernel tears it down.
        child
            .kill()
            .with_context(|| format!("sending SIGKILL to {}", member.spec.name))?;
        child
            .wait()
            .with_context(|| format!("reaping {}", member.spec.name))?;
        Ok(())
    }

    /// Starts a killed member again with the same command line (and so the same data).
    pub fn restart(&mut self, idx: usize) -> Result<()> {
        if self.is_running(idx) {
            bail!("{} is already running", self.members[idx].spec.name);
        }
        self.spawn(idx)
    }

    /// Fails if a member that should be running has exited, quoting the end of its log.
    pub fn check_running(&mut self) -> Result<()> {
        for member in &mut self.members {
            let Some(child) = member.child.as_mut() else {
                continue;
            };
            let status = child
                .try_wait()
                .with_context(|| format!("polling {}", member.spec.name))?;
            if let Some(status) = status {
                member.child = None;
                bail!(
                    "{} member {} exited unexpectedly ({status}); last lines of {}:\n{}",
                    self.label,
                    member.spec.name,
                    member.spec.log_path.display(),
                    log_tail(&member.spec.log_path)
                );
            }
        }
        Ok(())
    }

    fn spawn(&mut self, idx: usize) -> Result<()> {
        let spec = &self.members[idx].spec;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .with_context(|| format!("opening log {}", spec.log_path.display()))?;
        let log_err = log.try_clone().context("duplicating log file handle")?;
        let child = Command::new(&spec.program)
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}: {}", spec.name, spec.command_line()))?;
        self.members[idx].child = Some(child);
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                // Errors here mean the process is already gone; nothing is left to clean up.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn log_tail(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines[start..].join("\n")
        }
        Err(err) => format!("(log unreadable: {err})"),
    }
}

/// Hands out loopback ports from a base upwards, skipping ports something already listens on.
///
/// A port found free here could still be taken before the member binds it; the member then
/// fails to start and the error says so, which is acceptable for a benchmark.
#[derive(Debug)]
pub struct PortAllocator {
    next: u16,
}

impl PortAllocator {
    pub fn new(base: u16) -> Self {
        Self { next: base }
    }

    pub fn take(&mut self) -> Result<u16> {
        for _ in 0..MAX_PORT_PROBES {
            let port = self.next;
            self.next = self
                .next
                .checked_add(1)
                .context("ran out of port numbers")?;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
        bail!(
            "no free loopback port among {MAX_PORT_PROBES} probed below {}",
            self.next
        )
    }
}

/// Where members keep their data and logs: a temporary directory removed at exit, or a fresh
/// run directory inside a directory the user named (kept, for looking at logs afterwards).
#[derive(Debug)]
pub enum WorkDir {
    Temp(TempDir),
    Kept(PathBuf),
}

impl WorkDir {
    pub fn new(parent: Option<&Path>) -> Result<Self> {
        let Some(parent) = parent else {
            let dir = tempfile::Builder::new()
                .prefix("continuum-bench-")
                .tempdir()
                .context("creating temporary work directory")?;
            return Ok(Self::Temp(dir));
        };
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dir = parent.join(format!("run-{stamp}-{}", std::process::id()));
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating work directory {}", dir.display()))?;
        Ok(Self::Kept(dir))
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Temp(dir) => dir.path(),
            Self::Kept(dir) => dir,
        }
    }

    /// Creates and returns the sub-directory for one target's cluster.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.path().join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }
}

/// Opens one gRPC (HTTP/2) connection to a member's client URL.
pub async fn connect_channel(url: &str) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad endpoint URL {url}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_allocator_skips_ports_in_use() {
        let busy = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let busy_port = busy.local_addr().unwrap().port();
        let mut ports = PortAllocator::new(busy_port);
        let port = ports.take().unwrap();
        assert_ne!(port, busy_port);
        assert!(port > busy_port);
    }

    #[test]
    fn cluster_kill_and_restart_track_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let spec = MemberSpec {
            name: "sleeper".into(),
            program: "sleep".into(),
            args: vec!["30".into()],
            log_path: dir.path().join("sleeper.log"),
        };
        let mut cluster = Cluster::start("test", vec![spec]).unwrap();
        assert!(cluster.is_running(0));
        cluster.check_running().unwrap();
        cluster.kill(0).unwrap();
        assert!(!cluster.is_running(0));
        assert!(cluster.kill(0).is_err());
        cluster.restart(0).unwrap();
        assert!(cluster.is_running(0));
    }

    #[test]
    fn check_running_reports_an_exited_member_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let spec = MemberSpec {
            name: "quitter".into(),
            program: "sh".into(),
            args: vec!["-c".into(), "echo goodbye; exit 3".into()],
            log_path: dir.path().join("quitter.log"),
        };
        let mut cluster = Cluster::start("test", vec![spec]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let err = loop {
            match cluster.check_running() {
                Err(err) => break err,
                Ok(()) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(()) => panic!("member never exited"),
            }
        };
        let text = format!("{err:#}");
        assert!(text.contains("quitter"), "{text}");
        assert!(text.contains("goodbye"), "{text}");
        assert!(!cluster.is_running(0));
    }
}
