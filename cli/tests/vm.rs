//! The orchestrator end to end: hypervisor hosts as network namespaces on a bridge, each with
//! its gateway and agent (`continuum agent`), meta and the block servers on the bridge's
//! address in the root namespace; VMs created with `continuum vm create` boot the test guest
//! (scripts/guest-image.sh) under TCG with a Continuum volume as their disk. Needs root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::fabric::{continuum, fabric_on, in_ns, run, Fabric, Gateway};
use common::net::Net;

/// One test's hosts: namespaces `PREFIX-NAME` with addresses 10.N.0.i on the bridge
/// (10.N.0.254, where meta and the block servers listen).
struct Lab {
    f: Fabric,
    net: Net,
    n: u8,
    hosts: u8,
}

async fn lab(prefix: &str, n: u8) -> Lab {
    common::net::need_root("the VM tests");
    let net = Net::new(prefix, "24", &format!("10.{n}.0.254"));
    let f = fabric_on(&net.bridge_ip).await;
    Lab {
        f,
        net,
        n,
        hosts: 0,
    }
}

impl Lab {
    fn dir(&self) -> &Path {
        self.f.dir.path()
    }

    fn meta(&self) -> String {
        self.f.meta_ep.clone()
    }

    /// A host in its own namespace whose agent and gateway reach meta at `meta`.
    fn host(&mut self, name: &str, site: &str, meta: &str, gw_extra: &[&str]) -> Host {
        self.hosts += 1;
        let ns = self.net.add_ns(name);
        let ip = format!("10.{}.0.{}", self.n, self.hosts);
        self.net.link(&ns, name, &format!("{ip}/24"), None);
        let dir = self.dir().to_path_buf();
        let gateway = Gateway::start_in(Some(&ns), &dir, &format!("gw-{name}"), meta, gw_extra);
        let log = dir.join(format!("agent-{name}.log"));
        let agent = in_ns(Some(&ns))
            .args([
                "agent",
                &format!("--name={name}"),
                &format!("--site={site}"),
                &format!("--endpoints={meta}"),
                &format!("--gateway-id=gw-{name}"),
                &format!("--migration-address={ip}"),
                "--accel=tcg",
                "--cpus=2",
                "--memory=2G",
                "--dead-after-seconds=4",
                "--stop-timeout-seconds=2",
            ])
            .arg(format!("--gateway-socket={}", gateway.socket.display()))
            .arg(format!("--data-dir={}", dir.join(name).display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Host {
            name: name.into(),
            ns,
            ip,
            gateway,
            agent: Some(agent),
            overlay: None,
            log,
            data: dir.join(name),
        }
    }
}

/// A hypervisor host: its namespace, gateway and agent (and overlay daemon, if started).
struct Host {
    name: String,
    ns: String,
    ip: String,
    gateway: Gateway,
    agent: Option<Child>,
    overlay: Option<Child>,
    log: PathBuf,
    data: PathBuf,
}

/// The site's WAN link to meta: a TCP forwarder the test can cut (every connection dropped,
/// new ones refused) and restore. Block servers stay reachable (site-local storage).
struct Wan {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Wan {
    /// A forwarder on `ip` to `to`.
    async fn start(ip: &str, to: &str) -> Wan {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, k, to) = (cut.clone(), conns.clone(), to.to_string());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the link is down
                }
                let to = to.clone();
                k.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                }));
            }
        });
        Wan { addr, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Host {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `continuum overlay up` for this host's site: overlay address 10.(N+1).0.`i`, the
    /// site's VM subnet `subnet`, reached by the others at this host's address.
    fn overlay_up(&mut self, lab: &Lab, site: &str, i: u8, subnet: &str) {
        let log = lab.dir().join(format!("overlay-{}.log", self.name));
        let child = in_ns(Some(&self.ns))
            .args([
                "overlay",
                "up",
                &format!("--meta={}", lab.meta()),
                &format!("--name={}", self.name),
                &format!("--site={site}"),
                &format!("--address=10.{}.0.{i}/24", lab.n + 1),
                "--listen-port=51820",
                &format!("--endpoint={}:51820", self.ip),
                &format!("--subnet={subnet}"),
                &format!("--tun={}", overlay_tun(&self.ns)),
            ])
            .arg(format!(
                "--state-dir={}",
                lab.dir().join(format!("overlay-{}", self.name)).display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.overlay = Some(child);
    }

    /// A host failure: its agent, its gateway and its QEMUs die at once (SIGKILL).
    fn kill(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut c) = self.gateway.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_qemus();
    }

    fn kill_qemus(&self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &format!("{}/vms/", self.data.display())])
            .status();
    }
}

/// The overlay's TUN device on a host (its namespace's name, which is unique, shortened).
fn overlay_tun(ns: &str) -> String {
    format!("o{}", ns.replace('-', ""))
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.name, self.logs());
        }
        for c in [self.agent.take(), self.overlay.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        // The agent's QEMUs outlive it by design; a test's must not.
        self.kill_qemus();
    }
}

fn guest_image() -> PathBuf {
    let out = run(&mut Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/guest-image.sh"
    )));
    PathBuf::from(out.trim())
}

/// `continuum vm create NAME --site SITE --host HOST EXTRA...` booting the test guest with
/// `guest` (its `continuum.*` kernel arguments); returns what it printed.
fn create_guest_vm(
    meta: &str,
    image: &Path,
    [name, site, host]: [&str; 3],
    extra: &[&str],
    guest: &str,
) -> String {
    let kernel = image.join("vmlinuz").display().to_string();
    let initrd = image.join("initrd.img").display().to_string();
    let append = format!("console=ttyS0 panic=-1 quiet {guest}");
    let mut args = vec![
        "vm", "create", name, "--site", site, "--host", host, "--kernel", &kernel, "--initrd",
        &initrd, "--append", &append,
    ];
    args.extend_from_slice(extra);
    continuum(meta, &args)
}

/// `continuum vm wait NAME --state STATE` (panics with the reason if it is not reached).
fn wait_state(meta: &str, name: &str, state: &str, seconds: u64) {
    continuum(
        meta,
        &[
            "vm",
            "wait",
            name,
            "--state",
            state,
            "--timeout-seconds",
            &seconds.to_string(),
        ],
    );
}

/// Waits up to 3 minutes (TCG boots take ~10 s here) until the console log at `log` contains
/// `what`.
fn wait_console(log: &Path, what: &str) -> bool {
    (0..360).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(what)
    })
}

/// `continuum` that is expected to fail: its stderr.
fn refused(meta: &str, args: &[&str]) -> String {
    let out = Command::new(common::bin())
        .args(args)
        .args(["--endpoints", meta])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn wait_hosts(meta: &str, n: usize) {
    let ok = (0..100).any(|_| {
        let out = continuum(meta, &["host", "list"]);
        if out.matches(" alive").count() == n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
        false
    });
    assert!(
        ok,
        "{n} hosts alive: {}",
        continuum(meta, &["host", "list"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_writes_a_marker_on_one_host_and_reads_it_back_on_another() {
    let mut lab = lab("cvm1", 81).await;
    let ep = lab.meta();
    let image = guest_image();
    let h1 = lab.host("h1", "edge1", &ep, &[]);
    let h2 = lab.host("h2", "edge1", &ep, &[]);
    wait_hosts(&ep, 2);
    continuum(&ep, &["volume", "create", "ctv-disk", "--size", "256M"]);
    let kernel = image.join("vmlinuz").display().to_string();
    let initrd = image.join("initrd.img").display().to_string();
    let marker = format!("orch-{}", std::process::id());
    let append = |act: &str| format!("console=ttyS0 panic=-1 quiet continuum.act={act}");

    // Bad specs are refused with a clear reason.
    let e = refused(
        &ep,
        &[
            "vm", "create", "bad", "--site", "nowhere", "--disk", "ctv-disk",
        ],
    );
    assert!(
        e.contains("no host is registered in site \"nowhere\""),
        "{e}"
    );
    let e = refused(
        &ep,
        &[
            "vm", "create", "bad", "--site", "edge1", "--disk", "ctv-disk", "--memory", "64G",
        ],
    );
    assert!(
        e.contains("the largest host of site \"edge1\" has 2048 MiB"),
        "{e}"
    );
    let e = refused(
        &ep,
        &[
            "vm",
            "create",
            "bad",
            "--site",
            "edge1",
            "--disk",
            "no-such-volume",
        ],
    );
    assert!(
        e.contains("volume \"no-such-volume\" does not exist"),
        "{e}"
    );

    // First boot on h1: the guest writes the marker and powers off.
    create_guest_vm(
        &ep,
        &image,
        ["ctv-h1", "edge1", "h1"],
        &["--disk", "ctv-disk"],
        &format!("continuum.act=write:{marker}"),
    );
    let e = refused(
        &ep,
        &[
            "vm", "create", "other", "--site", "edge1", "--disk", "ctv-disk", "--kernel", &kernel,
        ],
    );
    assert!(e.contains("already a disk of VM \"ctv-h1\""), "{e}");
    let list = continuum(&ep, &["vm", "list"]);
    assert!(list.contains("ctv-h1") && list.contains("h1"), "{list}");
    wait_state(&ep, "ctv-h1", "stopped", 180);
    let log = continuum(&ep, &["vm", "console", "ctv-h1", "--log"]);
    assert!(
        log.contains(&format!("WROTE MARKER:{marker}")),
        "first boot: {log}"
    );
    assert!(!log.contains("NO DISK"), "{log}");

    // Second boot on h2 (the scheduler checks h2 can take it): the marker is there.
    continuum(
        &ep,
        &[
            "vm",
            "start",
            "ctv-h1",
            "--host",
            "h2",
            "--append",
            &append("read"),
        ],
    );
    let show = continuum(&ep, &["vm", "show", "ctv-h1"]);
    assert!(show.contains("host: h2"), "{show}");
    wait_state(&ep, "ctv-h1", "stopped", 180);
    let log = continuum(&ep, &["vm", "console", "ctv-h1", "--log"]);
    assert!(
        log.contains(&format!("READ MARKER:{marker}")),
        "second boot on h2: {log}"
    );
    assert!(h2.logs().contains("QEMU started"), "{}", h2.logs());

    // A QEMU that cannot start leaves the VM in error with QEMU's reason.
    continuum(&ep, &["volume", "create", "ctv-disk2", "--size", "64M"]);
    continuum(
        &ep,
        &[
            "vm",
            "create",
            "ctv-h1-broken",
            "--site",
            "edge1",
            "--host",
            "h1",
            "--disk",
            "ctv-disk2",
            "--kernel",
            "/nonexistent/vmlinuz",
        ],
    );
    let e = refused(
        &ep,
        &[
            "vm",
            "wait",
            "ctv-h1-broken",
            "--state",
            "running",
            "--timeout-seconds",
            "60",
        ],
    );
    assert!(
        e.contains("QEMU failed to start") && e.contains("/nonexistent/vmlinuz"),
        "{e}"
    );
    let list = continuum(&ep, &["vm", "list"]);
    assert!(list.contains("error"), "{list}");

    // Images: a qcow2 file with a marker is imported, a VM's disk is cloned from it, and the
    // guest reads the marker from its copy.
    let raw = lab.dir().join("tiny.raw");
    let mut bytes = vec![0u8; 32 << 20];
    let img_marker = format!("MARKER:img-{}\n", std::process::id());
    bytes[2048 * 512..2048 * 512 + img_marker.len()].copy_from_slice(img_marker.as_bytes());
    std::fs::write(&raw, &bytes).unwrap();
    let qcow = lab.dir().join("tiny.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let nbd = format!("unix:{}", h1.gateway.socket.display());
    let out = continuum(
        &ep,
        &[
            "image",
            "import",
            &qcow.display().to_string(),
            "--name",
            "tiny",
            "--nbd",
            &nbd,
        ],
    );
    assert!(
        out.contains("image tiny imported: 32 MiB") && out.contains("qcow2"),
        "{out}"
    );
    let e = refused(
        &ep,
        &["vm", "create", "x", "--site", "edge1", "--image", "nope"],
    );
    assert!(e.contains("image \"nope\" does not exist"), "{e}");
    continuum(
        &ep,
        &[
            "vm",
            "create",
            "ctv-img",
            "--site",
            "edge1",
            "--image",
            "tiny",
            "--nbd",
            &nbd,
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--append",
            &append("read"),
        ],
    );
    let show = continuum(&ep, &["vm", "show", "ctv-img"]);
    assert!(show.contains("disks: ctv-img-root"), "{show}");
    wait_state(&ep, "ctv-img", "stopped", 180);
    let log = continuum(&ep, &["vm", "console", "ctv-img", "--log"]);
    assert!(
        log.contains(img_marker.trim()),
        "the clone holds the image: {log}"
    );
    drop(h1);
}

/// Waits until `continuum vm show NAME` contains `what`.
fn wait_show(meta: &str, name: &str, what: &str, timeout: Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let show = continuum(meta, &["vm", "show", name]);
        if show.contains(what) {
            return show;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: no {what:?} after {timeout:?}:\n{show}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_vm_restarts_on_another_host_of_its_site_after_fencing() {
    let mut lab = lab("cvm2", 82).await;
    let ep = lab.meta();
    let image = guest_image();
    let mut h1 = lab.host("f1", "edge2", &ep, &[]);
    let h2 = lab.host("f2", "edge2", &ep, &[]);
    wait_hosts(&ep, 2);
    continuum(&ep, &["volume", "create", "ctv-fo", "--size", "128M"]);
    let marker = format!("fo-{}", std::process::id());
    create_guest_vm(
        &ep,
        &image,
        ["ctv-fo", "edge2", "f1"],
        &["--disk", "ctv-fo"],
        &format!("continuum.act=readwrite:{marker} continuum.hold"),
    );
    wait_state(&ep, "ctv-fo", "running", 60);
    // The guest is up on f1 and has written its marker.
    let log1 = lab.dir().join("f1/vms/ctv-fo/console.log");
    let up = wait_console(&log1, "HOLDING");
    let first = std::fs::read_to_string(&log1).unwrap_or_default();
    assert!(
        up && first.contains(&format!("WROTE MARKER:{marker}")),
        "{first}"
    );

    // f1 fails. After its lease is gone for the grace period, f2 fences f1's gateway lease and
    // starts the VM; the guest finds the marker written on f1.
    h1.kill();
    let show = wait_show(&ep, "ctv-fo", "host: f2", Duration::from_secs(60));
    assert!(show.contains("restarted after host f1 died"), "{show}");
    assert!(
        h2.logs().contains("failover: VM moved off a dead host"),
        "{}",
        h2.logs()
    );
    wait_state(&ep, "ctv-fo", "running", 60);
    let log2 = lab.dir().join("f2/vms/ctv-fo/console.log");
    let up = wait_console(&log2, "HOLDING");
    let second = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        up && second.contains(&format!("READ MARKER:{marker}")),
        "after failover: {second}"
    );
    let hosts = continuum(&ep, &["host", "list"]);
    assert!(hosts.contains("gone") && hosts.contains("alive"), "{hosts}");
}

fn qemu_pid(meta: &str, vm: &str) -> u32 {
    let show = continuum(meta, &["vm", "show", vm]);
    show.split("pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {show}"))
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cut_off_from_meta_keeps_its_vms_running_and_nothing_restarts() {
    let mut lab = lab("cvm3", 83).await;
    let ep = lab.meta();
    let image = guest_image();
    let wan = Wan::start(&lab.net.bridge_ip.clone(), &ep).await;
    let h1 = lab.host("w1", "edge3", &wan.addr, &[]);
    let h2 = lab.host("w2", "edge3", &wan.addr, &[]);
    wait_hosts(&ep, 2);
    continuum(&ep, &["volume", "create", "ctv-wan", "--size", "64M"]);
    create_guest_vm(
        &ep,
        &image,
        ["ctv-wan", "edge3", "w1"],
        &["--disk", "ctv-wan"],
        "continuum.act=read continuum.hold",
    );
    wait_state(&ep, "ctv-wan", "running", 60);
    let pid = qemu_pid(&ep, "ctv-wan");

    // The WAN link goes down for longer than the agents' leases, the grace period and the
    // gateway's writer lease: from meta, both hosts are gone.
    wan.cut();
    std::thread::sleep(Duration::from_secs(20));
    let hosts = continuum(&ep, &["host", "list"]);
    assert_eq!(hosts.matches(" gone").count(), 2, "{hosts}");
    assert!(alive(pid), "the VM keeps running while its site is cut off");
    let show = continuum(&ep, &["vm", "show", "ctv-wan"]);
    assert!(show.contains("host: w1"), "nothing moved: {show}");

    // The link comes back: the agents register again; the VM was never restarted.
    wan.restore();
    wait_hosts(&ep, 2);
    std::thread::sleep(Duration::from_secs(6));
    assert!(alive(pid), "same QEMU");
    assert_eq!(qemu_pid(&ep, "ctv-wan"), pid);
    let show = continuum(&ep, &["vm", "show", "ctv-wan"]);
    assert!(
        show.contains("host: w1") && show.contains("generation: 1"),
        "{show}"
    );
    for h in [&h1, &h2] {
        assert!(!h.logs().contains("failover"), "{}", h.logs());
        assert!(!h.logs().contains("restarting the VM"), "{}", h.logs());
    }
}

/// A libnbd client on the *source* gateway that stays connected through the migration and
/// writes only when told: the old side trying to write after switch-over.
const OLD_WRITER: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b"\x55" * 4096, 0)
    h.flush()
    print("written", flush=True)
except nbd.Error as e:
    print("refused:", e, flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writing_guest_live_migrates_and_the_old_side_can_no_longer_write() {
    use std::io::{BufRead, Write};
    let mut lab = lab("cvm4", 84).await;
    let ep = lab.meta();
    let image = guest_image();
    let standby = ["--standby-attach-seconds=30"];
    let h1 = lab.host("m1", "edge4", &ep, &standby);
    let h2 = lab.host("m2", "edge4", &ep, &standby);
    wait_hosts(&ep, 2);
    continuum(&ep, &["volume", "create", "ctv-mig", "--size", "64M"]);
    create_guest_vm(
        &ep,
        &image,
        ["ctv-mig", "edge4", "m1"],
        &["--disk", "ctv-mig"],
        "continuum.act=writeloop:300 continuum.hold",
    );
    wait_state(&ep, "ctv-mig", "running", 60);
    let log1 = lab.dir().join("m1/vms/ctv-mig/console.log");
    let writing = wait_console(&log1, "W 20");
    assert!(
        writing,
        "the guest writes: {}",
        std::fs::read_to_string(&log1).unwrap_or_default()
    );

    // The old side: a client of the source gateway's export, connected before the migration.
    // Debian's python3 has the libnbd binding (python3-libnbd); a pyenv one on PATH may not.
    let mut old = Command::new("/usr/bin/python3")
        .args(["-c", OLD_WRITER, &h1.gateway.uri("ctv-mig")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut old_out = std::io::BufReader::new(old.stdout.take().unwrap());
    let mut line = String::new();
    old_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");

    // Migrate while the guest writes.
    let out = continuum(&ep, &["vm", "migrate", "ctv-mig", "--to", "m2"]);
    assert!(out.contains("migrated to m2"), "{out}");
    let show = continuum(&ep, &["vm", "show", "ctv-mig"]);
    assert!(
        show.contains("host: m2") && show.contains("live-migrated from m1"),
        "{show}"
    );
    assert!(
        h1.logs().contains("live migration completed"),
        "{}",
        h1.logs()
    );

    // The guest goes on on m2 and verifies everything it wrote, before and after. HOLDING is
    // its last line (after VERIFIED): waiting for VERIFIED alone raced with that line.
    let log2 = lab.dir().join("m2/vms/ctv-mig/console.log");
    let done = wait_console(&log2, "HOLDING");
    let before = std::fs::read_to_string(&log1).unwrap_or_default();
    let after = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(done, "the guest finishes on m2:\n{before}\n----\n{after}");
    assert!(after.contains("VERIFIED bad=0"), "{before}\n----\n{after}");
    // It was writing on both sides of the switch-over.
    assert!(
        !before.contains("VERIFIED") && after.contains("W 300"),
        "{before}\n----\n{after}"
    );
    assert!(
        !before.contains("IOERR") && !after.contains("IOERR"),
        "{before}\n----\n{after}"
    );
    assert!(
        after.contains("HOLDING") && !after.contains("Linux version"),
        "the guest was not rebooted: {after}"
    );

    // The old side writes now: the block servers refuse its epoch.
    old.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    old_out.read_line(&mut line).unwrap();
    let _ = old.wait();
    assert!(
        line.starts_with("refused"),
        "the old side's write after switch-over: {line}"
    );
    drop(h2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_in_different_sites_ping_each_other_over_the_overlay() {
    let mut lab = lab("cvm5", 85).await;
    let ep = lab.meta();
    let image = guest_image();
    // Each site is one host whose overlay daemon routes the site's VM subnet; the namespaces
    // share only the bridge (10.85.0.0/24), so the VM subnets meet through the overlay alone.
    let mut a = lab.host("p1", "site-a", &ep, &[]);
    let mut b = lab.host("p2", "site-b", &ep, &[]);
    a.overlay_up(&lab, "site-a", 1, "10.87.1.0/24");
    b.overlay_up(&lab, "site-b", 2, "10.87.2.0/24");
    wait_hosts(&ep, 2);
    let meta = lab.f._meta.client();
    let registered = common::wait_for(Duration::from_secs(30), || async {
        let peers = meta
            .records::<continuum_proto::records_pb::OverlayPeer>()
            .await
            .ok()?;
        let routed: Vec<String> = peers
            .into_iter()
            .flat_map(|p| p.record.allowed_ips)
            .collect();
        (routed.iter().any(|r| r == "10.87.1.0/24") && routed.iter().any(|r| r == "10.87.2.0/24"))
            .then_some(())
    })
    .await;
    assert!(
        registered.is_some(),
        "both sites register their overlay records"
    );

    // NIC addresses: a wanted one is checked against the site's subnet.
    let e = refused(
        &ep,
        &[
            "vm",
            "create",
            "bad",
            "--site",
            "site-a",
            "--kernel",
            "/k",
            "--nic",
            "--address",
            "10.87.2.9",
        ],
    );
    assert!(e.contains("outside site \"site-a\"'s VM subnets"), "{e}");

    // VM a gets the lowest free address of site a's subnet; VM b the one it asks for.
    let out = create_guest_vm(
        &ep,
        &image,
        ["ping-a", "site-a", "p1"],
        &["--nic"],
        "continuum.ping=10.87.2.5 continuum.hold",
    );
    assert!(out.contains("with address 10.87.1.2/24"), "{out}");
    let out = create_guest_vm(
        &ep,
        &image,
        ["ping-b", "site-b", "p2"],
        &["--nic", "--address", "10.87.2.5"],
        "continuum.ping=10.87.1.2 continuum.hold",
    );
    assert!(out.contains("with address 10.87.2.5/24"), "{out}");
    for (vm, host) in [("ping-a", &a), ("ping-b", &b)] {
        let log = host.data.join(format!("vms/{vm}/console.log"));
        let ok = wait_console(&log, "PING ");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(ok && text.contains("PING OK"), "{vm}: {text}");
        assert!(text.contains("NET eth0 10.87."), "{vm}: {text}");
    }
    // The pings crossed the overlay: p1's daemon has a session with p2's and carried data.
    let ov =
        run(Command::new(common::bin()).args(["overlay", "show", "--tun", &overlay_tun(&a.ns)]));
    assert!(
        ov.contains("peer: ") && ov.contains("latest handshake") && ov.contains("received"),
        "{ov}"
    );
    // ... the only route between the VM subnets: p1 reaches site b's through its TUN device.
    let route = run(Command::new("ip").args(["-n", &a.ns, "route", "get", "10.87.2.5"]));
    assert!(
        route.contains(&format!("dev {}", overlay_tun(&a.ns))),
        "{route}"
    );
    let show = continuum(&ep, &["vm", "show", "ping-a"]);
    assert!(show.contains("nic: 10.87.1.2/24"), "{show}");

    // The tap goes with the VM.
    let tap = show
        .split("tap: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    let has_tap = || {
        common::sh(&["ip", "-n", &a.ns, "link", "show", &tap])
            .status
            .success()
    };
    assert!(has_tap(), "tap {tap} on p1");
    continuum(&ep, &["vm", "delete", "ping-a"]);
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(200));
        !has_tap()
    });
    assert!(gone, "tap {tap} removed with the VM: {}", a.logs());
}
