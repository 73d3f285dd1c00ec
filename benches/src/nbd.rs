//! NBD: fio (`ioengine=nbd`, libnbd) against a Continuum volume through the gateway, and in the
//! same run against `qemu-nbd` serving a raw file on the same disk and nbdkit's memory plugin.
//!
//! - Continuum: one meta member, six block servers (one io_uring thread each, own data dir, one
//!   host each), the gateway; a 4+2 volume of `--size-mib`, over a Unix socket.
//! - qemu-nbd: a raw file of the same size in the same directory (`--cache=writeback`, QEMU's
//!   default: the page cache, fsync on flush, as the block servers do), over a Unix socket.
//! - nbdkit memory: the protocol with no storage at all (an upper bound for any server).
//!
//! Every target gets the same fio jobs in the same order: a 1 MiB sequential write of the whole
//! device (which also fills it, so no later read hits a hole), a 1 MiB sequential read, then
//! 4 KiB random read and write at queue depth 1 and 32 for `--runtime-s` each. Reported: IOPS,
//! MB/s, p50/p99 completion latency, and Continuum's ratio to qemu-nbd.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::cluster::{Cluster, MemberSpec, PortAllocator};

#[derive(Debug, Args)]
pub struct NbdArgs {
    /// Device size in MiB (each target; the working set of every job).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Seconds of each random job.
    #[arg(long, default_value_t = 10)]
    runtime_s: u64,
    /// Where data lives (a directory on the disk to measure).
    #[arg(long, default_value = "bench-results/nbd-data")]
    data_dir: PathBuf,
    /// Write the results as JSON here.
    #[arg(long, default_value = "bench-results/nbd.json")]
    json: PathBuf,
    /// The `continuum` binary. [default: next to this one]
    #[arg(long)]
    continuum_bin: Option<PathBuf>,
    /// Run only these jobs (comma-separated names; the first job, which fills the device,
    /// always runs). [default: all]
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Measure only these targets (continuum, qemu-nbd, nbdkit-memory). [default: all]
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
}

/// One fio job as run against every target.
#[derive(Debug, Clone, Copy)]
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
    /// Time-based (random jobs) or one pass over the device (sequential ones).
    timed: bool,
}

const JOBS: &[Job] = &[
    Job {
        name: "seq-write-1M-qd8",
        rw: "write",
        bs: "1M",
        depth: 8,
        timed: false,
    },
    Job {
        name: "seq-read-1M-qd8",
        rw: "read",
        bs: "1M",
        depth: 8,
        timed: false,
    },
    Job {
        name: "rand-read-4k-qd1",
        rw: "randread",
        bs: "4k",
        depth: 1,
        timed: true,
    },
    Job {
        name: "rand-read-4k-qd32",
        rw: "randread",
        bs: "4k",
        depth: 32,
        timed: true,
    },
    Job {
        name: "rand-write-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        depth: 1,
        timed: true,
    },
    Job {
        name: "rand-write-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
        timed: true,
    },
];

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Measure {
    iops: f64,
    mb_s: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    job: String,
    /// `None` for a target left out with `--targets`.
    continuum: Option<Measure>,
    qemu_nbd: Option<Measure>,
    nbdkit_memory: Option<Measure>,
    /// Continuum IOPS / qemu-nbd IOPS.
    ratio_iops: Option<f64>,
    /// Continuum p99 / qemu-nbd p99.
    ratio_p99: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    size_mib: u64,
    runtime_s: u64,
    fio: String,
    qemu_nbd: String,
    nbdkit: String,
    rows: Vec<Row>,
}

fn tool_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|| format!("{cmd}: not found"))
}

/// Runs one fio job against `uri`; the JSON result's read or write side.
fn fio(uri: &str, job: &Job, size_mib: u64, runtime_s: u64) -> Result<Measure> {
    let mut c = Command::new("fio");
    c.args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={}", job.rw),
        &format!("--bs={}", job.bs),
        &format!("--iodepth={}", job.depth),
        &format!("--size={size_mib}M"),
        "--randrepeat=1",
        "--output-format=json",
    ]);
    if job.timed {
        c.args(["--time_based", &format!("--runtime={runtime_s}")]);
    }
    let out = c
        .output()
        .context("running fio (scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "fio {} on {uri} failed: {}",
            job.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&text[start..]).context("fio's JSON")?;
    let side = if job.rw.contains("read") {
        "read"
    } else {
        "write"
    };
    let s = &v["jobs"][0][side];
    let pct = |p: &str| s["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    if v["jobs"][0]["error"].as_i64().unwrap_or(0) != 0 {
        bail!(
            "fio {} on {uri} reported an error: {}",
            job.name,
            v["jobs"][0]
        );
    }
    Ok(Measure {
        iops: s["iops"].as_f64().unwrap_or(0.0),
        mb_s: s["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

fn wait_for_socket(path: &Path, what: &str, cluster: &mut Cluster) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() || std::os::unix::net::UnixStream::connect(path).is_err() {
        cluster.check_running()?;
        if Instant::now() > deadline {
            bail!("{what} did not listen on {} within 60 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn spec(name: &str, program: &Path, args: Vec<String>, dir: &Path) -> MemberSpec {
    MemberSpec {
        name: name.to_string(),
        program: program.to_path_buf(),
        args: args.into_iter().map(OsString::from).collect(),
        log_path: dir.join(format!("{}.log", name.replace('/', "-"))),
    }
}

/// The Continuum fabric for the bench: meta, six block servers, the gateway, a 4+2 volume.
fn start_continuum(bin: &Path, dir: &Path, size_mib: u64) -> Result<(Cluster, String)> {
    let mut ports = PortAllocator::new(26_000);
    let (client, peer) = (ports.take()?, ports.take()?);
    let meta = format!("127.0.0.1:{client}");
    let mut specs = vec![spec(
        "continuum/meta",
        bin,
        vec![
            "meta".into(),
            "--id=1".into(),
            format!("--data-dir={}", dir.join("meta").display()),
            format!("--listen-client={meta}"),
            format!("--listen-peer=127.0.0.1:{peer}"),
            format!("--initial-cluster=1=127.0.0.1:{peer}/{meta}"),
        ],
        dir,
    )];
    for i in 1..=6 {
        specs.push(spec(
            &format!("continuum/block-{i}"),
            bin,
            vec![
                "block".into(),
                format!("--id={i}"),
                format!("--data-dir={}", dir.join(format!("block-{i}")).display()),
                format!("--listen=127.0.0.1:{}", ports.take()?),
                format!("--meta={meta}"),
                format!("--host=h{i}"),
                format!("--capacity={}M", size_mib * 2 + 1024),
            ],
            dir,
        ));
    }
    let socket = dir.join("gateway.sock");
    specs.push(spec(
        "continuum/gateway",
        bin,
        vec![
            "gateway".into(),
            "--id=bench".into(),
            format!("--meta={meta}"),
            "--listen=none".into(),
            format!("--socket={}", socket.display()),
        ],
        dir,
    ));
    let mut cluster = Cluster::start("continuum", specs)?;
    wait_for_socket(&socket, "the gateway", &mut cluster)?;
    // Block servers register, then the volume can be created.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(bin)
            .args([
                "volume",
                "create",
                "bench",
                "--size",
                &format!("{size_mib}M"),
            ])
            .args(["--endpoints", &meta])
            .output()?;
        if out.status.success() {
            break;
        }
        cluster.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "cannot create the volume: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Placement needs all six servers in the map: wait until `node list` shows them up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(bin)
            .args(["node", "list", "--endpoints", &meta])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).matches(" up").count() >= 6 {
            break;
        }
        if Instant::now() > deadline {
            bail!("block servers did not all register");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok((
        cluster,
        format!("nbd+unix:///bench?socket={}", socket.display()),
    ))
}

fn start_qemu_nbd(dir: &Path, size_mib: u64) -> Result<(Cluster, String)> {
    let file = dir.join("disk.raw");
    let created = Command::new("qemu-img")
        .args(["create", "-f", "raw"])
        .arg(&file)
        .arg(format!("{size_mib}M"))
        .output()
        .context("running qemu-img")?;
    if !created.status.success() {
        bail!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
    }
    let socket = dir.join("qemu-nbd.sock");
    let mut cluster = Cluster::start(
        "qemu-nbd",
        vec![spec(
            "qemu-nbd",
            Path::new("qemu-nbd"),
            vec![
                "-f".into(),
                "raw".into(),
                "-x".into(),
                "bench".into(),
                "-k".into(),
                socket.display().to_string(),
                "--cache=writeback".into(),
                "--persistent".into(),
                "--shared=4".into(),
                file.display().to_string(),
            ],
            dir,
        )],
    )?;
    wait_for_socket(&socket, "qemu-nbd", &mut cluster)?;
    Ok((
        cluster,
        format!("nbd+unix:///bench?socket={}", socket.display()),
    ))
}

fn start_nbdkit(dir: &Path, size_mib: u64) -> Result<(Cluster, String)> {
    let socket = dir.join("nbdkit.sock");
    let mut cluster = Cluster::start(
        "nbdkit",
        vec![spec(
            "nbdkit",
            Path::new("nbdkit"),
            vec![
                "--foreground".into(),
                "--exportname=bench".into(),
                "-U".into(),
                socket.display().to_string(),
                "memory".into(),
                format!("{size_mib}M"),
            ],
            dir,
        )],
    )?;
    wait_for_socket(&socket, "nbdkit", &mut cluster)?;
    Ok((
        cluster,
        format!("nbd+unix:///bench?socket={}", socket.display()),
    ))
}

fn run_all(uri: &str, name: &str, jobs: &[Job], args: &NbdArgs) -> Result<Vec<Measure>> {
    let mut out = Vec::new();
    for job in jobs {
        let m = fio(uri, job, args.size_mib, args.runtime_s)?;
        eprintln!(
            "  {name:<14} {:<20} {:>9.0} IOPS {:>8.1} MB/s  p50 {:>7.0} us  p99 {:>7.0} us",
            job.name, m.iops, m.mb_s, m.p50_us, m.p99_us
        );
        out.push(m);
    }
    Ok(out)
}

pub async fn run(args: NbdArgs) -> Result<()> {
    let bin = match &args.continuum_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("bench binary has no directory")?
            .join("continuum"),
    };
    if !bin.is_file() {
        bail!(
            "continuum binary not found at {} (cargo build -p continuum)",
            bin.display()
        );
    }
    if args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("clearing {}", args.data_dir.display()))?;
    }
    let sub = |n: &str| -> Result<PathBuf> {
        let d = args.data_dir.join(n);
        std::fs::create_dir_all(&d)?;
        Ok(std::fs::canonicalize(d)?)
    };
    let (cdir, qdir, kdir) = (sub("continuum")?, sub("qemu-nbd")?, sub("nbdkit")?);
    eprintln!(
        "nbd bench: {} MiB per target, {} s per random job",
        args.size_mib, args.runtime_s
    );

    let known = ["continuum", "qemu-nbd", "nbdkit-memory"];
    if let Some(t) = args.targets.iter().find(|t| !known.contains(&t.as_str())) {
        bail!("unknown target {t:?} (known: {})", known.join(", "));
    }
    if let Some(j) = args
        .jobs
        .iter()
        .find(|j| !JOBS.iter().any(|k| k.name == *j))
    {
        let names: Vec<&str> = JOBS.iter().map(|k| k.name).collect();
        bail!("unknown job {j:?} (known: {})", names.join(", "));
    }
    let jobs: Vec<Job> = JOBS
        .iter()
        .enumerate()
        .filter(|(i, j)| *i == 0 || args.jobs.is_empty() || args.jobs.iter().any(|n| n == j.name))
        .map(|(_, j)| *j)
        .collect();
    let wanted = |t: &str| args.targets.is_empty() || args.targets.iter().any(|n| n == t);
    let continuum = match wanted("continuum") {
        true => {
            let (_c, uri) = start_continuum(&bin, &cdir, args.size_mib)?;
            Some(run_all(&uri, "continuum", &jobs, &args)?)
        }
        false => None,
    };
    let qemu = match wanted("qemu-nbd") {
        true => {
            let (_c, uri) = start_qemu_nbd(&qdir, args.size_mib)?;
            Some(run_all(&uri, "qemu-nbd", &jobs, &args)?)
        }
        false => None,
    };
    let nbdkit = match wanted("nbdkit-memory") {
        true => {
            let (_c, uri) = start_nbdkit(&kdir, args.size_mib)?;
            Some(run_all(&uri, "nbdkit-memory", &jobs, &args)?)
        }
        false => None,
    };
    let at = |m: &Option<Vec<Measure>>, i: usize| m.as_ref().map(|v| v[i]);
    let rows: Vec<Row> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            let (c, q) = (at(&continuum, i), at(&qemu, i));
            let ratio = |f: fn(&Measure) -> f64| Some(f(&c?) / f(&q?).max(1e-9));
            Row {
                job: j.name.to_string(),
                continuum: c,
                qemu_nbd: q,
                nbdkit_memory: at(&nbdkit, i),
                ratio_iops: ratio(|m| m.iops),
                ratio_p99: ratio(|m| m.p99_us),
            }
        })
        .collect();
    println!(
        "{:<20} {:>12} {:>12} {:>12} {:>8} {:>10} {:>10} {:>9}",
        "job", "continuum", "qemu-nbd", "nbdkit-mem", "ratio", "p99 cont", "p99 qemu", "p99 ratio"
    );
    let num = |v: Option<f64>, unit: &str| match v {
        Some(v) if unit == "x" => format!("{v:.2}x"),
        Some(v) => format!("{v:.0}{unit}"),
        None => "-".to_string(),
    };
    for r in &rows {
        println!(
            "{:<20} {:>12} {:>12} {:>12} {:>8} {:>10} {:>10} {:>9}",
            r.job,
            num(r.continuum.map(|m| m.iops), ""),
            num(r.qemu_nbd.map(|m| m.iops), ""),
            num(r.nbdkit_memory.map(|m| m.iops), ""),
            num(r.ratio_iops, "x"),
            num(r.continuum.map(|m| m.p99_us), "us"),
            num(r.qemu_nbd.map(|m| m.p99_us), "us"),
            num(r.ratio_p99, "x"),
        );
    }
    let report = Report {
        size_mib: args.size_mib,
        runtime_s: args.runtime_s,
        fio: tool_version("fio", "--version"),
        qemu_nbd: tool_version("qemu-nbd", "--version"),
        nbdkit: tool_version("nbdkit", "--version"),
        rows,
    };
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}
