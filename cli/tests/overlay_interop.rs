//! Interoperability of `continuum overlay` with stock WireGuard (wireguard-go, Debian's
//! package) between two network namespaces joined by a veth pair: handshakes started from
//! either side, ping and iperf3 over the tunnel, roaming both ways on one session; and the
//! userspace mode (no TUN, no root) to wireguard-go and Linux's TCP. Needs root (namespaces,
//! TUN).

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

/// The two namespaces and the processes in them; everything is removed on drop. One lab at a
/// time: the tests of this file use the same names.
struct Lab {
    dir: tempfile::TempDir,
    children: Vec<Child>,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Lab {
    fn new() -> Lab {
        let guard = LAB.lock().unwrap_or_else(|e| e.into_inner());
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
            _one_at_a_time: guard,
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

/// wireguard-go in B (10.200.0.2), in the foreground, configured with wg(8) like any
/// WireGuard interface, with A (10.200.0.1 at 10.99.0.1:51820) as its peer.
fn start_wireguard_go(lab: &mut Lab, b_key: &[u8; 32], psk: &[u8; 32], a_public: &str) {
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
        a_public,
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
    start_wireguard_go(lab, b_key, psk, &public(a_key));
    wait_for("our TUN device", Duration::from_secs(10), || {
        sh(&["ip", "-n", NS_A, "link", "show", "cnt0"])
            .status
            .success()
    });
}

/// `continuum overlay show` of our side (cnt0).
fn our_show() -> String {
    let out = sh(&[
        env!("CARGO_BIN_EXE_continuum"),
        "overlay",
        "show",
        "--tun",
        "cnt0",
    ]);
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `wg show WG_DEV FIELD` in B (wireguard-go's view).
fn wg_show(field: &str) -> String {
    let out = sh(&["ip", "netns", "exec", NS_B, "wg", "show", WG_DEV, field]);
    String::from_utf8_lossy(&out.stdout).to_string()
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
    let latest: u64 = wg_show("latest-handshakes")
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
    // Bulk TCP left our side in GSO trains (this kernel has UDP GSO): several datagrams per
    // send call, and wireguard-go, which has no GRO, took them all.
    let ours = our_show();
    let batching: Vec<u64> = ours
        .lines()
        .find_map(|l| l.trim().strip_prefix("udp batching: "))
        .map(|l| l.split(' ').filter_map(|w| w.parse().ok()).collect())
        .unwrap_or_default();
    assert!(
        batching.len() == 4 && batching[0] > 4 * batching[1],
        "datagrams leave in trains:\n{ours}"
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

    // 3. Roaming, on the same session (no new handshake): wireguard-go moves to another port
    // (as after a NAT rebinding) and our side follows its packets; then our side moves to
    // another address and wireguard-go follows.
    let before = wg_show("latest-handshakes");
    ok(&[
        "ip",
        "netns",
        "exec",
        NS_B,
        "wg",
        "set",
        WG_DEV,
        "listen-port",
        "51821",
    ]);
    assert!(ping(NS_B, "10.200.0.1"), "ping after B moved");
    let ours = our_show();
    assert!(
        ours.contains("endpoint: 10.99.0.2:51821"),
        "our side follows B:\n{ours}"
    );
    assert!(ping(NS_A, "10.200.0.2"), "A → B at B's new port");
    // Deleting a subnet's first address would take the new one with it otherwise.
    ok(&[
        "ip",
        "netns",
        "exec",
        NS_A,
        "sysctl",
        "-qw",
        "net.ipv4.conf.cto-va.promote_secondaries=1",
    ]);
    ok(&[
        "ip",
        "-n",
        NS_A,
        "addr",
        "add",
        "10.99.0.4/24",
        "dev",
        "cto-va",
    ]);
    ok(&[
        "ip",
        "-n",
        NS_A,
        "addr",
        "del",
        "10.99.0.1/24",
        "dev",
        "cto-va",
    ]);
    assert!(ping(NS_A, "10.200.0.2"), "ping after A moved");
    let endpoints = wg_show("endpoints");
    assert!(
        endpoints.contains("10.99.0.4:51820"),
        "wireguard-go follows A: {endpoints}"
    );
    assert_eq!(
        wg_show("latest-handshakes"),
        before,
        "both moves kept the session"
    );
}

/// `args` as user nobody (no capabilities, so no TUN), for [`Lab::spawn`].
fn nobody<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    v.extend_from_slice(args);
    v
}

/// `args` as user nobody in namespace `ns`, for [`sh`].
fn as_nobody<'a>(ns: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend(nobody(args));
    v
}

#[test]
fn userspace_mode_carries_tcp_without_tun_or_root_to_a_wireguard_go_peer() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (network namespaces, and wireguard-go's TUN in B)"
    );
    for tool in ["wireguard-go", "wg", "iperf3", "curl", "setpriv"] {
        assert!(
            Path::new(&format!("/usr/bin/{tool}")).exists(),
            "{tool} is missing: ./scripts/setup.sh installs it"
        );
    }
    let (a_key, b_key, psk) = ([44u8; 32], [55u8; 32], [66u8; 32]);
    let mut lab = Lab::new();
    // A: `continuum overlay run --userspace` as nobody, with a SOCKS5 endpoint, a port forward
    // to B's iperf3 and B's web server, and an exposed port to a web server of its own.
    let home = lab.dir.path().join("nobody");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("index.html"), "served from A's loopback\n").unwrap();
    let conf = home.join("a.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nAddress = 10.200.0.1/24\n\n[Peer]\nPublicKey = {}\nPresharedKey = {}\nEndpoint = 10.99.0.2:51820\nAllowedIPs = 10.200.0.2/32\n",
            keys::encode(&a_key),
            public(&b_key),
            keys::encode(&psk)
        ),
    )
    .unwrap();
    ok(&["chmod", "755", lab.dir.path().to_str().unwrap()]);
    ok(&["chown", "-R", "nobody:nogroup", home.to_str().unwrap()]);
    ok(&["chmod", "600", conf.to_str().unwrap()]);
    let bin = env!("CARGO_BIN_EXE_continuum");
    let home_s = home.to_str().unwrap().to_string();
    let conf_s = conf.to_str().unwrap().to_string();
    let a_args = nobody(&[
        bin,
        "--log-level",
        "debug",
        "overlay",
        "run",
        "--config",
        &conf_s,
        "--userspace",
        "--tun",
        "user0",
        "--socks5",
        "127.0.0.1:1080",
        "--forward",
        "5201=10.200.0.2:5201",
        "--expose",
        "8000=127.0.0.1:8001",
    ]);
    lab.spawn(NS_A, &a_args, &[], "continuum.log");
    let web_args = nobody(&[
        "/usr/bin/python3",
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "--directory",
        &home_s,
        "8001",
    ]);
    lab.spawn(NS_A, &web_args, &[], "web-a.log");

    // B: wireguard-go on a kernel TUN with Linux's own TCP stack behind it.
    start_wireguard_go(&mut lab, &b_key, &psk, &public(&a_key));
    std::fs::write(
        lab.dir.path().join("b.html"),
        "served from B's overlay address\n",
    )
    .unwrap();
    let b_dir = lab.dir.path().to_str().unwrap().to_string();
    lab.spawn(
        NS_B,
        &[
            "/usr/bin/python3",
            "-m",
            "http.server",
            "--bind",
            "10.200.0.2",
            "--directory",
            &b_dir,
            "8080",
        ],
        &[],
        "web-b.log",
    );
    lab.spawn(
        NS_B,
        &["iperf3", "-s", "-B", "10.200.0.2"],
        &[],
        "iperf3-server.log",
    );
    let logs = |lab: &Lab| {
        format!(
            "--- continuum\n{}\n--- wireguard-go\n{}",
            lab.log("continuum.log"),
            lab.log("wireguard-go.log")
        )
    };
    // No TUN device appeared in A: the overlay address lives in the daemon.
    let links = sh(&["ip", "-n", NS_A, "-o", "link"]);
    let links = String::from_utf8_lossy(&links.stdout).to_string();
    assert!(!links.contains("user0"), "no interface in A: {links}");

    // 1. B pings A's overlay address: smoltcp answers (and wireguard-go starts the handshake).
    assert!(
        ping(NS_B, "10.200.0.1"),
        "ping B → A's userspace stack\n{}",
        logs(&lab)
    );

    // 2. SOCKS5 in A to B's web server (Linux TCP on the far side).
    let socks_args = as_nobody(
        NS_A,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--socks5",
            "127.0.0.1:1080",
            "http://10.200.0.2:8080/b.html",
        ],
    );
    // B's web server may still be starting: a few tries.
    let mut out = sh(&socks_args);
    for _ in 0..20 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        out = sh(&socks_args);
    }
    assert!(
        out.status.success(),
        "curl through SOCKS5: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs(&lab)
    );
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(body, "served from B's overlay address\n");

    // 3. B reaches A's loopback web server through the exposed port.
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        NS_B,
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://10.200.0.1:8000/index.html",
    ]);
    assert!(
        out.status.success(),
        "curl B → A's exposed port: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs(&lab)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "served from A's loopback\n"
    );

    // 4. iperf3 (control and data connections, 2 s of bulk TCP) through the port forward.
    let out = sh(&as_nobody(
        NS_A,
        &["iperf3", "-c", "127.0.0.1", "-p", "5201", "-t", "2", "-J"],
    ));
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && report.contains("\"sum_received\""),
        "iperf3 through the forward: {report}\n{}",
        logs(&lab)
    );
    let parsed: serde_json::Value = serde_json::from_str(&report).unwrap_or_default();
    let received = parsed["end"]["sum_received"]["bytes"]
        .as_f64()
        .unwrap_or(0.0);
    // How fast is the bench's business (and varies with the machine's load); here it must
    // have moved data and finished.
    assert!(received > 0.0, "iperf3 moved nothing\n{}", logs(&lab));
    eprintln!("userspace iperf3: {received} bytes in 2 s");

    // 5. A bulk download through SOCKS5 arrives byte for byte.
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(lab.dir.path().join("blob.bin"), &blob).unwrap();
    let fetched = home.join("fetched.bin");
    let fetched_s = fetched.to_str().unwrap().to_string();
    let out = sh(&as_nobody(
        NS_A,
        &[
            "curl",
            "-sS",
            "--max-time",
            "60",
            "--socks5",
            "127.0.0.1:1080",
            "-o",
            &fetched_s,
            "http://10.200.0.2:8080/blob.bin",
        ],
    ));
    assert!(
        out.status.success(),
        "curl of 4 MiB through SOCKS5: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs(&lab)
    );
    let got = std::fs::read(&fetched).unwrap();
    assert_eq!(got.len(), blob.len(), "length of the download");
    assert!(got == blob, "the download differs from the file");
}
