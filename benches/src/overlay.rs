//! Overlay: iperf3 TCP throughput (1 and 4 streams) and ping RTT between two network
//! namespaces joined by a veth pair, in the same run: over the raw veth, through Continuum's
//! overlay (`continuum overlay run`, kernel TUN at both ends), and through wireguard-go
//! (Debian's package, configured with `wg`) at both ends. Reported: Gbit/s, RTT, Continuum's
//! ratio to wireguard-go and the fraction of the raw veth reached. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct OverlayArgs {
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Pings per target (0.05 s apart).
    #[arg(long, default_value_t = 100)]
    pings: u32,
    /// Inner MTU of both tunnels (WireGuard's default is 1420).
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// Write the results as JSON here.
    #[arg(long, default_value = "bench-results/overlay.json")]
    json: PathBuf,
    /// The `continuum` binary. [default: next to this one]
    #[arg(long)]
    continuum_bin: Option<PathBuf>,
}

const NS_A: &str = "ctb-a";
const NS_B: &str = "ctb-b";
const VETH_A: &str = "ctb-va";
const VETH_B: &str = "ctb-vb";
const UNDER_A: &str = "10.98.0.1";
const UNDER_B: &str = "10.98.0.2";
/// wireguard-go's control sockets live in /var/run/wireguard, shared by every namespace.
const WG_A: &str = "ctbwg-a";
const WG_B: &str = "ctbwg-b";

#[derive(Debug, Serialize)]
struct Measure {
    target: String,
    /// iperf3 receiver throughput, bits per second.
    tcp_1_stream_bps: f64,
    tcp_4_streams_bps: f64,
    /// TCP retransmissions reported by the sender, 1 and 4 streams.
    retransmits_1: u64,
    retransmits_4: u64,
    rtt_avg_ms: f64,
    rtt_mdev_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    seconds: u64,
    pings: u32,
    mtu: u32,
    cores: usize,
    results: Vec<Measure>,
    /// Continuum ÷ wireguard-go throughput (1 and 4 streams) and RTT.
    ratio_wg_1: f64,
    ratio_wg_4: f64,
    rtt_ratio_wg: f64,
    /// Continuum ÷ raw veth throughput.
    fraction_veth_1: f64,
    fraction_veth_4: f64,
}

fn run(cmd: &[&str]) -> Result<Output> {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {}", cmd.join(" ")))
}

fn ok(cmd: &[&str]) -> Result<()> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn add_address(ns: &str, cidr: &str, dev: &str) -> Result<()> {
    ok(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
}

/// The namespaces, veth and the processes in them; all removed on drop.
struct Lab {
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Lab {
    fn new() -> Result<Lab> {
        for ns in [NS_A, NS_B] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let lab = Lab {
            dir: tempfile::tempdir()?,
            children: Vec::new(),
        };
        ok(&["ip", "netns", "add", NS_A])?;
        ok(&["ip", "netns", "add", NS_B])?;
        ok(&[
            "ip", "link", "add", VETH_A, "netns", NS_A, "type", "veth", "peer", VETH_B, "netns",
            NS_B,
        ])?;
        for (ns, dev, ip) in [(NS_A, VETH_A, UNDER_A), (NS_B, VETH_B, UNDER_B)] {
            add_address(ns, &format!("{ip}/24"), dev)?;
            ok(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            ok(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn spawn(&mut self, ns: &str, args: &[&str], log: &str) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join(log))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.join(" ")))?;
        self.children.push(child);
        Ok(())
    }

    /// Stops the tunnel processes (keeps the namespaces).
    fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        for (ns, dev) in [(NS_A, WG_A), (NS_B, WG_B)] {
            let _ = run(&["ip", "-n", ns, "link", "del", dev]);
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{dev}.sock"));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop();
        for ns in [NS_A, NS_B] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn link_up(ns: &str, dev: &str) -> bool {
    run(&["ip", "-n", ns, "link", "show", dev]).is_ok_and(|o| o.status.success())
}

fn ping_ok(ns: &str, to: &str) -> bool {
    run(&[
        "ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", "-q", to,
    ])
    .is_ok_and(|o| o.status.success())
}

struct Keys {
    a_private: String,
    a_public: String,
    b_private: String,
    b_public: String,
}

fn keys(continuum: &Path) -> Result<Keys> {
    let gen = || -> Result<(String, String)> {
        let private = run(&[
            continuum.to_str().unwrap_or("continuum"),
            "overlay",
            "genkey",
        ])?;
        let private = String::from_utf8(private.stdout)?.trim().to_string();
        let mut child = Command::new(continuum)
            .args(["overlay", "pubkey"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("pubkey stdin")?
            .write_all(private.as_bytes())?;
        let public = String::from_utf8(child.wait_with_output()?.stdout)?
            .trim()
            .to_string();
        Ok((private, public))
    };
    let (a_private, a_public) = gen()?;
    let (b_private, b_public) = gen()?;
    Ok(Keys {
        a_private,
        a_public,
        b_private,
        b_public,
    })
}

/// Continuum's overlay at both ends (TUN `ctbo0`, 10.201.0.0/24).
fn start_continuum(lab: &mut Lab, bin: &Path, k: &Keys, mtu: u32) -> Result<&'static str> {
    for (ns, private, peer_public, own, peer_ip, endpoint) in [
        (
            NS_A,
            &k.a_private,
            &k.b_public,
            "10.201.0.1",
            "10.201.0.2",
            UNDER_B,
        ),
        (
            NS_B,
            &k.b_private,
            &k.a_public,
            "10.201.0.2",
            "10.201.0.1",
            UNDER_A,
        ),
    ] {
        let conf = lab.dir.path().join(format!("{ns}.conf"));
        std::fs::write(
            &conf,
            format!(
                "[Interface]\nPrivateKey = {private}\nListenPort = 51820\nAddress = {own}/24\nMTU = {mtu}\n\n[Peer]\nPublicKey = {peer_public}\nEndpoint = {endpoint}:51820\nAllowedIPs = {peer_ip}/32\n"
            ),
        )?;
        let conf = conf.to_str().context("temp path")?.to_string();
        let bin = bin.to_str().context("binary path")?.to_string();
        lab.spawn(
            ns,
            &[&bin, "overlay", "run", "--config", &conf, "--tun", "ctbo0"],
            &format!("continuum-{ns}.log"),
        )?;
    }
    for ns in [NS_A, NS_B] {
        wait_for("Continuum's TUN device", Duration::from_secs(10), || {
            link_up(ns, "ctbo0")
        })?;
    }
    Ok("10.201.0.2")
}

/// wireguard-go at both ends (10.202.0.0/24).
fn start_wireguard_go(lab: &mut Lab, k: &Keys, mtu: u32) -> Result<&'static str> {
    for (ns, dev, private, peer_public, own, peer_ip, endpoint) in [
        (
            NS_A,
            WG_A,
            &k.a_private,
            &k.b_public,
            "10.202.0.1",
            "10.202.0.2",
            UNDER_B,
        ),
        (
            NS_B,
            WG_B,
            &k.b_private,
            &k.a_public,
            "10.202.0.2",
            "10.202.0.1",
            UNDER_A,
        ),
    ] {
        lab.spawn(ns, &["wireguard-go", "-f", dev], &format!("wg-{ns}.log"))?;
        wait_for("wireguard-go's interface", Duration::from_secs(10), || {
            link_up(ns, dev)
        })?;
        let key = lab.dir.path().join(format!("{ns}.key"));
        std::fs::write(&key, private)?;
        let ep = format!("{endpoint}:51820");
        let allowed = format!("{peer_ip}/32");
        ok(&[
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            dev,
            "private-key",
            key.to_str().context("temp path")?,
            "listen-port",
            "51820",
            "peer",
            peer_public,
            "endpoint",
            &ep,
            "allowed-ips",
            &allowed,
        ])?;
        add_address(ns, &format!("{own}/24"), dev)?;
        ok(&["ip", "-n", ns, "link", "set", dev, "mtu", &mtu.to_string()])?;
        ok(&["ip", "-n", ns, "link", "set", dev, "up"])?;
    }
    Ok("10.202.0.2")
}

/// iperf3 from A to `to` (a server in B): receiver bits/s and sender retransmits.
fn iperf(lab: &mut Lab, to: &str, streams: u32, seconds: u64) -> Result<(f64, u64)> {
    lab.spawn(NS_B, &["iperf3", "-s", "-1", "-B", to], "iperf3-server.log")?;
    // The server takes a moment to listen.
    let mut last = String::new();
    for _ in 0..30 {
        let out = run(&[
            "ip",
            "netns",
            "exec",
            NS_A,
            "iperf3",
            "-c",
            to,
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])?;
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let end = &report["end"];
        if let Some(bps) = end["sum_received"]["bits_per_second"].as_f64() {
            let retrans = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
            return Ok((bps, retrans));
        }
        last = report["error"].as_str().unwrap_or("no report").to_string();
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("iperf3 to {to}: {last}")
}

/// `ping` from A: average and mean deviation of the RTT in ms.
fn rtt(to: &str, pings: u32) -> Result<(f64, f64)> {
    let out = run(&[
        "ip",
        "netns",
        "exec",
        NS_A,
        "ping",
        "-q",
        "-c",
        &pings.to_string(),
        "-i",
        "0.05",
        to,
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 0.031/0.045/0.090/0.010 ms
    let line = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .with_context(|| format!("ping to {to}: {text}"))?;
    let nums: Vec<f64> = line
        .split('=')
        .nth(1)
        .unwrap_or("")
        .trim()
        .trim_end_matches(" ms")
        .split('/')
        .filter_map(|v| v.parse().ok())
        .collect();
    if nums.len() != 4 {
        bail!("unexpected ping summary: {line}");
    }
    Ok((nums[1], nums[3]))
}

fn measure(lab: &mut Lab, target: &str, to: &str, args: &OverlayArgs) -> Result<Measure> {
    wait_for(
        &format!("{target}: first ping"),
        Duration::from_secs(15),
        || ping_ok(NS_A, to),
    )?;
    eprintln!("{target}: iperf3, 1 stream, {} s", args.seconds);
    let (b1, r1) = iperf(lab, to, 1, args.seconds)?;
    eprintln!("{target}: iperf3, 4 streams, {} s", args.seconds);
    let (b4, r4) = iperf(lab, to, 4, args.seconds)?;
    eprintln!("{target}: ping ×{}", args.pings);
    let (avg, mdev) = rtt(to, args.pings)?;
    Ok(Measure {
        target: target.to_string(),
        tcp_1_stream_bps: b1,
        tcp_4_streams_bps: b4,
        retransmits_1: r1,
        retransmits_4: r4,
        rtt_avg_ms: avg,
        rtt_mdev_ms: mdev,
    })
}

pub async fn run_bench(args: OverlayArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || bench(args)).await?
}

fn bench(args: OverlayArgs) -> Result<()> {
    if !is_root() {
        bail!("the overlay bench needs root (network namespaces, TUN)");
    }
    for tool in ["iperf3", "wireguard-go", "wg", "ping"] {
        if run(&["sh", "-c", &format!("command -v {tool}")]).map_or(true, |o| !o.status.success()) {
            bail!("{tool} is missing: ./scripts/setup.sh installs it");
        }
    }
    let bin = match &args.continuum_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("continuum"),
    };
    let k = keys(&bin)?;
    let mut lab = Lab::new()?;
    let mut results = Vec::new();
    results.push(measure(&mut lab, "raw veth", UNDER_B, &args)?);
    let to = start_continuum(&mut lab, &bin, &k, args.mtu)?;
    results.push(measure(&mut lab, "continuum overlay", to, &args)?);
    lab.stop();
    let to = start_wireguard_go(&mut lab, &k, args.mtu)?;
    results.push(measure(&mut lab, "wireguard-go", to, &args)?);
    lab.stop();
    drop(lab);

    let (veth, ours, wg) = (&results[0], &results[1], &results[2]);
    let report = Report {
        seconds: args.seconds,
        pings: args.pings,
        mtu: args.mtu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ratio_wg_1: ours.tcp_1_stream_bps / wg.tcp_1_stream_bps,
        ratio_wg_4: ours.tcp_4_streams_bps / wg.tcp_4_streams_bps,
        rtt_ratio_wg: ours.rtt_avg_ms / wg.rtt_avg_ms,
        fraction_veth_1: ours.tcp_1_stream_bps / veth.tcp_1_stream_bps,
        fraction_veth_4: ours.tcp_4_streams_bps / veth.tcp_4_streams_bps,
        results,
    };
    println!(
        "| target | TCP 1 stream | TCP 4 streams | retransmits (1/4) | RTT avg (mdev) |\n|---|---|---|---|---|"
    );
    for m in &report.results {
        println!(
            "| {} | {:.2} Gbit/s | {:.2} Gbit/s | {}/{} | {:.3} ms ({:.3}) |",
            m.target,
            m.tcp_1_stream_bps / 1e9,
            m.tcp_4_streams_bps / 1e9,
            m.retransmits_1,
            m.retransmits_4,
            m.rtt_avg_ms,
            m.rtt_mdev_ms
        );
    }
    println!(
        "\nContinuum ÷ wireguard-go: {:.2}× (1 stream), {:.2}× (4 streams), RTT {:.2}×; \
         of raw veth: {:.0} % (1 stream), {:.0} % (4 streams)",
        report.ratio_wg_1,
        report.ratio_wg_4,
        report.rtt_ratio_wg,
        report.fraction_veth_1 * 100.0,
        report.fraction_veth_4 * 100.0
    );
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("results: {}", args.json.display());
    Ok(())
}

fn is_root() -> bool {
    run(&["id", "-u"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
