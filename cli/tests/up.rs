//! `continuum up` brings the local fabric up (meta, block servers, the NBD gateway with a demo
//! volume); Ctrl-C stops it cleanly, and a second run resumes with the data intact.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn up(data_dir: &std::path::Path, base_port: u16, nbd_port: u16, check: bool) -> Command {
    // The demo VM boots the test guest (a kernel and a busybox initramfs).
    let image = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/guest-image.sh"
    ))
    .output()
    .unwrap();
    assert!(
        image.status.success(),
        "{}",
        String::from_utf8_lossy(&image.stderr)
    );
    let image = std::path::PathBuf::from(String::from_utf8_lossy(&image.stdout).trim());
    let mut c = Command::new(common::bin());
    c.args([
        "up",
        "--base-port",
        &base_port.to_string(),
        "--nbd-port",
        &nbd_port.to_string(),
        "--demo-size",
        "256M",
        "--data-dir",
    ])
    .arg(data_dir)
    .arg("--demo-vm-kernel")
    .arg(image.join("vmlinuz"))
    .arg("--demo-vm-initrd")
    .arg(image.join("initrd.img"));
    if check {
        c.arg("--check");
    }
    c
}

/// Starts `up` and returns once it printed its summary (and the summary).
fn start(mut cmd: Command) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !text.contains("Press Ctrl-C") {
        assert!(Instant::now() < deadline, "up did not come up: {text}");
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("up exited: {text}");
        }
        text.push_str(&line);
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    (child, text)
}

/// Ctrl-C (SIGINT), and a clean exit.
fn interrupt(mut child: Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "up exits cleanly after Ctrl-C: {s}");
            return;
        }
        assert!(Instant::now() < deadline, "up stops within 60 s of Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(uri).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("verification failed"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn up_serves_a_demo_volume_stops_on_ctrl_c_and_resumes_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    // A base port whose ranges are free right now.
    let base = loop {
        let p = common::free_port();
        if p < 31_600
            && [
                11u16, 12, 13, 21, 22, 23, 31, 32, 33, 101, 102, 103, 104, 105, 106, 201, 202, 203,
                204, 205, 206, 301,
            ]
            .iter()
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", p + o)).is_ok())
        {
            break p;
        }
    };
    let nbd_port = common::free_port();
    let (child, first) = start(up(dir.path(), base, nbd_port, false));
    assert!(first.contains("Continuum is up."), "{first}");
    assert!(first.contains("block servers  6 registered"), "{first}");
    let uri = format!("nbd://127.0.0.1:{nbd_port}/demo");
    assert!(first.contains(&uri), "{first}");
    assert!(
        first.contains("qemu-system-x86_64 -m 1G -blockdev driver=nbd"),
        "{first}"
    );
    for i in 1..=3 {
        assert!(dir.path().join(format!("meta-{i}/db/CURRENT")).exists());
    }
    for i in 1..=6 {
        assert!(dir.path().join(format!("block-{i}/index/CURRENT")).exists());
    }
    assert!(dir.path().join("logs/gateway.log").exists());
    // The agent runs the demo VM, whose disk is the demo volume.
    assert!(first.contains("demo VM        demo-vm"), "{first}");
    let console = dir.path().join("agent/vms/demo-vm/console.log");
    let booted = (0..360).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("HOLDING")
    });
    assert!(
        booted,
        "the demo VM boots: {}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    let pid: i32 = std::fs::read_to_string(dir.path().join("agent/vms/demo-vm/qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    qemu_io(&uri, &["write -P 0x5c 1048576 3M", "flush"]);
    interrupt(child);
    // Ctrl-C stopped the VM too.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the demo VM's QEMU is stopped with the fabric"
    );

    let (child, second) = start(up(dir.path(), base, nbd_port, false));
    assert!(second.contains("Continuum is up."), "{second}");
    qemu_io(&uri, &["read -P 0x5c 1048576 3M", "read -P 0 0 1M"]);
    interrupt(child);

    let check = up(dir.path(), base, nbd_port, true).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
