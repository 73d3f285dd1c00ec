//! Interoperability of `continuum overlay` with stock WireGuard (wireguard-go, Debian's
//! package) between two network namespaces joined by a veth pair: handshakes started from
//! either side, ping and iperf3 over the tunnel. Needs root (namespaces, TUN).

mod common;

use std::path::Path;

use common::{ok, sh};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use continuum_overlay::device::Device;
use continuum_overlay::keys;

const NS_A: &str = "cto-a";
const NS_B: &str = "cto-b";
/// wireguard-go's control socket lives in /var/run/wireguard, shared by every namespace: a
/// name of our own avoids clashing with anything else on the machine.
const WG_DEV: &str = "ctowg0";

/// The two namespaces and the processes in them; everything is removed on drop.
struct Lab {
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Lab {
    fn new() -> Lab {
        for ns in [NS_A, NS_B] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        ok(&["ip", "netns", "add", NS_A]);
        ok(&["ip", "netns", "add", NS_B]);
        ok(&[
            "ip", "link", "add", "cto-va", "netns", NS_A, "type", "veth", "peer", "cto-vb",
            "netns", NS_B,
        ]);
        ok(&[
            "ip",
            "-n",
            NS_A,
            "addr",
            "add",
            "10.99.0.1/24",
            "dev",
            "cto-va",
        ]);
        ok(&[
            "ip",
            "-n",
            NS_B,
            "addr",
            "add",
            "10.99.0.2/24",
            "dev",
            "cto-vb",
        ]);
        for (ns, dev) in [(NS_A, "cto-va"), (NS_B, "cto-vb")] {
            ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
            ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        Lab {
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
        }
    }

    fn spawn(&mut self, ns: &str, args: &[&str], envs: &[(&str, &str)], log: &str) {
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .envs(envs.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn stop_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        let _ = sh(&["ip", "-n", NS_B, "link", "del", WG_DEV]);
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{WG_DEV}.sock"));
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_all();
        for ns in [NS_A, NS_B] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn public(private: &[u8; 32]) -> String {
    keys::encode(&Device::new(*private, 0).public_key())
}

/// Starts our overlay in A and wireguard-go in B, each knowing the other.
fn start_both(lab: &mut Lab, a_key: &[u8; 32], b_key: &[u8; 32], psk: &[u8; 32]) {
    let a_conf = lab.dir.path().join("a.conf");
    std::fs::write(
        &a_conf,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nAddress = 10.200.0.1/24\n\n[Peer]\nPublicKey = {}\nPresharedKey = {}\nEndpoint = 10.99.0.2:51820\nAllowedIPs = 10.200.0.2/32\n",
            keys::encode(a_key),
            public(b_key),
            keys::encode(psk)
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_continuum");
    let conf = a_conf.to_str().unwrap().to_string();
    lab.spawn(
        NS_A,
        &[
            bin,
            "--log-level",
            "debug",
            "overlay",
            "run",
            "--config",
            &conf,
            "--tun",
            "cnt0",
        ],
        &[],
        "continuum.log",
    );
    // wireguard-go in the foreground, configured with wg(8) like any WireGuard interface.
    lab.spawn(
        NS_B,
        &["wireguard-go", "-f", WG_DEV],
        &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "debug")],
        "wireguard-go.log",
    );
    wait_for("wireguard-go's interface", Duration::from_secs(10), || {
        sh(&["ip", "-n", NS_B, "link", "show", WG_DEV])
            .status
            .success()
    });
    let key_file = lab.dir.path().join("b.key");
    std::fs::write(&key_file, keys::encode(b_key)).unwrap();
    let psk_file = lab.dir.path().join("psk");
    std::fs::write(&psk_file, keys::encode(psk)).unwrap();
    ok(&[
        "ip",
        "netns",
        "exec",
        NS_B,
        "wg",
        "set",
        WG_DEV,
        "private-key",
        key_file.to_str().unwrap(),
        "listen-port",
        "51820",
        "peer",
        &public(a_key),
        "preshared-key",
        psk_file.to_str().unwrap(),
        "endpoint",
        "10.99.0.1:51820",
        "allowed-ips",
        "10.200.0.1/32",
    ]);
    ok(&[
        "ip",
        "-n",
        NS_B,
        "addr",
        "add",
        "10.200.0.2/24",
        "dev",
        WG_DEV,
    ]);
    ok(&["ip", "-n", NS_B, "link", "set", WG_DEV, "up"]);
    wait_for("our TUN device", Duration::from_secs(10), || {
        sh(&["ip", "-n", NS_A, "link", "show", "cnt0"])
            .status
            .success()
    });
}

fn ping(from: &str, to: &str) -> bool {
    sh(&[
        "ip", "netns", "exec", from, "ping", "-c", "3", "-i", "0.2", "-W", "3", to,
    ])
    .status
    .success()
}

#[test]
fn continuum_and_wireguard_go_handshake_both_ways_and_carry_ping_and_iperf3() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (network namespaces, TUN)"
    );
    for tool in ["wireguard-go", "wg", "iperf3"] {
        assert!(
            Path::new(&format!("/usr/bin/{tool}")).exists(),
            "{tool} is missing: ./scripts/setup.sh installs it"
        );
    }
    let (a_key, b_key, psk) = ([11u8; 32], [22u8; 32], [33u8; 32]);
    let mut lab = Lab::new();

    // 1. We initiate: the first ping from A starts the handshake.
    start_both(&mut lab, &a_key, &b_key, &psk);
    assert!(
        ping(NS_A, "10.200.0.2"),
        "ping A → B over the tunnel\n--- continuum\n{}\n--- wireguard-go\n{}",
        lab.log("continuum.log"),
        lab.log("wireguard-go.log")
    );
    let show = sh(&[
        "ip",
        "netns",
        "exec",
        NS_B,
        "wg",
        "show",
        WG_DEV,
        "latest-handshakes",
    ]);
    let latest: u64 = String::from_utf8_lossy(&show.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(latest > 0, "wireguard-go records a handshake with us");
    // iperf3 over the tunnel (TCP, 2 s).
    lab.spawn(
        NS_B,
        &["iperf3", "-s", "-1", "-B", "10.200.0.2"],
        &[],
        "iperf3-server.log",
    );
    std::thread::sleep(Duration::from_millis(500));
    let iperf = sh(&[
        "ip",
        "netns",
        "exec",
        NS_A,
        "iperf3",
        "-c",
        "10.200.0.2",
        "-t",
        "2",
        "-J",
    ]);
    assert!(
        iperf.status.success(),
        "iperf3 over the tunnel: {}",
        String::from_utf8_lossy(&iperf.stderr)
    );
    let report = String::from_utf8_lossy(&iperf.stdout);
    assert!(
        report.contains("\"sum_received\""),
        "iperf3 report: {report}"
    );
    lab.stop_all();

    // 2. wireguard-go initiates: fresh processes, the first ping from B.
    start_both(&mut lab, &a_key, &b_key, &psk);
    assert!(
        ping(NS_B, "10.200.0.1"),
        "ping B → A over the tunnel\n--- continuum\n{}\n--- wireguard-go\n{}",
        lab.log("continuum.log"),
        lab.log("wireguard-go.log")
    );
    assert!(ping(NS_A, "10.200.0.2"), "and back on the same session");
}
