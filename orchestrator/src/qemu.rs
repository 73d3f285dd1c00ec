//! QEMU for one VM: its command line (a pure function of the spec and the host), the KVM probe,
//! and a QMP client (QEMU's JSON control protocol over a Unix socket).
//!
//! Disks attach as `-blockdev driver=nbd` through the host's gateway socket with a
//! `reconnect-delay`, so a gateway restart pauses I/O instead of failing it. The serial console
//! is a Unix socket (`continuum vm console`) that QEMU also logs to a file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use continuum_proto::records_pb::Vm;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Seconds QEMU's NBD client waits for the gateway to come back before failing requests.
pub const NBD_RECONNECT_DELAY: u32 = 15;

/// The accelerator VMs of a host run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Where one VM's runtime files live on its host.
#[derive(Clone, Debug)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(base: &Path, vm: &str) -> VmPaths {
        VmPaths {
            dir: base.join("vms").join(vm),
        }
    }
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// Names the tap device the agent made for the VM's NIC (removed with the device).
    pub fn tap(&self) -> PathBuf {
        self.dir.join("tap")
    }
}

/// What the host adds to a VM's spec.
#[derive(Clone, Debug)]
pub struct HostSide {
    pub accel: Accel,
    /// The gateway's NBD socket.
    pub gateway_socket: PathBuf,
    /// The tap device of the VM's NIC (with `vm.nic`).
    pub tap: Option<String>,
    /// Listen for an incoming migration on this address (`tcp:HOST:PORT`).
    pub incoming: Option<String>,
}

/// QEMU's arguments (without the program) for `vm`.
pub fn command_line(vm: &Vm, paths: &VmPaths, host: &HostSide) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    let machine = format!("q35,accel={}", host.accel.as_str());
    let smp = vm.vcpus.max(1).to_string();
    let mem = format!("{}M", (vm.memory_bytes >> 20).max(16));
    push(&["-name", &format!("guest={},debug-threads=on", vm.name)]);
    push(&["-machine", &machine, "-smp", &smp, "-m", &mem]);
    if host.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", paths.qmp().display()),
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
            paths.console().display(),
            paths.console_log().display()
        ),
        "-serial",
        "chardev:ser0",
    ]);
    push(&["-pidfile", &paths.pid().display().to_string()]);
    if !vm.kernel.is_empty() {
        push(&["-kernel", &vm.kernel]);
        if !vm.initrd.is_empty() {
            push(&["-initrd", &vm.initrd]);
        }
        let mut append = vm.append.clone();
        if let (true, Ok(addr)) = (vm.nic, vm.address.parse::<ipnet::Ipv4Net>()) {
            append.push(' ');
            append.push_str(&crate::network::kernel_ip_arg(addr));
        }
        push(&["-append", append.trim()]);
    }
    for (i, vol) in vm.volumes.iter().enumerate() {
        let node = format!("disk{i}");
        push(&[
            "-blockdev",
            &format!(
                "driver=nbd,node-name={node},server.type=unix,server.path={},export={vol},reconnect-delay={NBD_RECONNECT_DELAY}",
                host.gateway_socket.display()
            ),
            "-device",
            &format!("virtio-blk-pci,drive={node},id=vd{i}"),
        ]);
    }
    if let (true, Some(tap)) = (vm.nic, &host.tap) {
        push(&[
            "-netdev",
            &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", mac_of(&vm.name)),
        ]);
    }
    if let Some(inc) = &host.incoming {
        push(&["-incoming", inc]);
    }
    a
}

/// A stable, locally administered MAC address for a VM's NIC.
pub fn mac_of(name: &str) -> String {
    let b = crate::network::stable_hash(name).to_be_bytes();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// The kernel the KVM probe boots: `kernel`, else the newest `/boot/vmlinuz-*`.
pub fn probe_kernel(kernel: Option<&Path>) -> Option<PathBuf> {
    if let Some(k) = kernel {
        return Some(k.to_path_buf());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Whether Linux guests run under KVM here: QEMU boots `kernel` the way VMs run (q35, KVM,
/// `-cpu host`) and the kernel must get as far as mounting its root (it then panics: there is
/// none) within `timeout`. Neither `/dev/kvm` existing nor firmware running is enough: on some
/// machines the firmware runs and a kernel then hangs, or `-cpu host` makes QEMU abort.
pub async fn probe_kvm(kernel: &Path, timeout: Duration) -> bool {
    if std::fs::metadata("/dev/kvm").is_err() {
        return false;
    }
    let child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=kvm",
            "-cpu",
            "host",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-append",
            "console=ttyS0 panic=-1",
            "-kernel",
        ])
        .arg(kernel)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let Some(out) = child.stdout.take() else {
        return false;
    };
    let mut lines = BufReader::new(out).lines();
    let booted = tokio::time::timeout(timeout, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("VFS:") || l.contains("Kernel panic") || l.contains("Run /init") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    booted
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: QEMU closed the connection")]
    Closed,
    #[error("QMP: unexpected reply {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: no reply within {0:?}")]
    Timeout(Duration),
}

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// Events received while waiting for replies (oldest first).
    pub events: Vec<serde_json::Value>,
}

/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = s.into_split();
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        };
        let greeting = q.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        q.execute("qmp_capabilities", serde_json::json!({})).await?;
        Ok(q)
    }

    async fn read(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(QMP_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout(QMP_TIMEOUT))??;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line.trim().to_string()))
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        let mut msg = serde_json::json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let v = self.read().await?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("?").into(),
                    desc: e["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Err(QmpError::Protocol(v.to_string()));
        }
    }

    /// `query-status`: the run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", serde_json::json!({})).await?;
        r["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(r.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Vm {
        Vm {
            name: "web".into(),
            vcpus: 2,
            memory_bytes: 512 << 20,
            volumes: vec!["web-root".into(), "web-data".into()],
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0".into(),
            nic: true,
            address: "10.91.1.2/24".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_command_line_attaches_disks_through_the_gateway_with_reconnect() {
        let paths = VmPaths::new(Path::new("/var/lib/continuum/agent"), "web");
        let host = HostSide {
            accel: Accel::Tcg,
            gateway_socket: "/run/gw.sock".into(),
            tap: Some("ctap0".into()),
            incoming: None,
        };
        let a = command_line(&spec(), &paths, &host).join(" ");
        assert!(a.contains("-machine q35,accel=tcg -smp 2 -m 512M"), "{a}");
        assert!(!a.contains("-cpu host"), "{a}");
        assert!(a.contains("driver=nbd,node-name=disk0,server.type=unix,server.path=/run/gw.sock,export=web-root,reconnect-delay=15"), "{a}");
        assert!(a.contains("virtio-blk-pci,drive=disk1,id=vd1"), "{a}");
        assert!(
            a.contains("-kernel /k -initrd /i -append console=ttyS0 ip=10.91.1.2::10.91.1.1:255.255.255.0::eth0:off"),
            "{a}"
        );
        assert!(a.contains("tap,id=net0,ifname=ctap0,script=no"), "{a}");
        assert!(
            a.contains("/var/lib/continuum/agent/vms/web/qmp.sock"),
            "{a}"
        );
        let kvm = HostSide {
            accel: Accel::Kvm,
            incoming: Some("tcp:0.0.0.0:4444".into()),
            ..host
        };
        let a = command_line(&spec(), &paths, &kvm).join(" ");
        assert!(
            a.contains("accel=kvm")
                && a.contains("-cpu host")
                && a.ends_with("-incoming tcp:0.0.0.0:4444"),
            "{a}"
        );
    }

    #[test]
    fn macs_are_stable_and_locally_administered() {
        assert_eq!(mac_of("web"), mac_of("web"));
        assert_ne!(mac_of("web"), mac_of("db"));
        assert!(mac_of("web").starts_with("52:54:"));
    }
}
