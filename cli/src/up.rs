//! `continuum up`: the whole fabric on this machine, as child processes of this one.
//!
//! Today the fabric is a 3-member meta cluster, 6 block servers (one host each, so a 4+2 volume
//! has its six failure domains) and an NBD gateway with a demo volume; later issues add an
//! overlay and an agent. Data lives under one directory, so running `up` again resumes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use continuum_meta_client::MetaClient;
use tokio::process::{Child, Command};

use crate::config::DEFAULT_CLIENT_PORT;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory holding every daemon's data and logs.
    #[arg(long, default_value = "continuum-data", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Number of meta members (3 or 5 tolerate 1 or 2 failures).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub meta_members: u64,
    /// Number of block servers (4+2 volumes need at least 6).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub block_servers: u64,
    /// Ports are BASE+11.. (meta client), BASE+21.. (Raft), BASE+31.. (metrics), BASE+101..
    /// (block servers), BASE+201.. (block server metrics), BASE+301 (gateway metrics).
    #[arg(long, default_value_t = DEFAULT_CLIENT_PORT - 10, value_name = "BASE")]
    pub base_port: u16,
    /// TCP port of the NBD gateway (10809 is NBD's own).
    #[arg(long, default_value_t = 10809, value_name = "PORT")]
    pub nbd_port: u16,
    /// Volume created on first start for trying things out (thin: no space until written);
    /// empty for none.
    #[arg(long, default_value = "demo", value_name = "NAME")]
    pub demo_volume: String,
    /// Size of the demo volume.
    #[arg(long, default_value = "10G", value_parser = crate::block::parse_size, value_name = "SIZE")]
    pub demo_size: u64,
    /// Boot a demo VM (with the demo volume as its disk) from this kernel; with --demo-vm-initrd.
    /// `scripts/up.sh` passes the small test guest of `scripts/guest-image.sh`.
    #[arg(long, value_name = "PATH")]
    pub demo_vm_kernel: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    pub demo_vm_initrd: Option<PathBuf>,
    /// Start, print the summary, and exit leaving nothing running (a smoke test).
    #[arg(long)]
    pub check: bool,
}

struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    exited: bool,
}

fn terminate(d: &Daemon) {
    if let Some(pid) = d
        .child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Stops the agent first, then the VMs it ran (their QEMUs outlive an agent by design, not
/// `continuum up`), then the gateway (it flushes to the block servers and lets its leases go),
/// then everything else at once.
async fn stop_all(daemons: &mut [Daemon], agent_dir: &Path) {
    let (agents, rest): (Vec<&mut Daemon>, Vec<&mut Daemon>) =
        daemons.iter_mut().partition(|d| d.name == "agent");
    stop_group(agents).await;
    stop_vms(agent_dir).await;
    let (gateways, others): (Vec<&mut Daemon>, Vec<&mut Daemon>) =
        rest.into_iter().partition(|d| d.name == "gateway");
    stop_group(gateways).await;
    stop_group(others).await;
}

/// Stops the QEMUs of the local agent (SIGTERM, then SIGKILL after 10 s).
async fn stop_vms(agent_dir: &Path) {
    let Ok(dir) = std::fs::read_dir(agent_dir.join("vms")) else {
        return;
    };
    let pids: Vec<rustix::process::Pid> = dir
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
        .filter_map(|s| s.trim().parse::<i32>().ok())
        .filter_map(rustix::process::Pid::from_raw)
        .collect();
    for p in &pids {
        let _ = rustix::process::kill_process(*p, rustix::process::Signal::TERM);
    }
    for _ in 0..100 {
        if pids
            .iter()
            .all(|p| rustix::process::test_kill_process(*p).is_err())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in &pids {
        let _ = rustix::process::kill_process(*p, rustix::process::Signal::KILL);
    }
}

async fn stop_group(mut daemons: Vec<&mut Daemon>) {
    for d in daemons.iter() {
        terminate(d);
    }
    for d in daemons.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), d.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("{} did not stop in 10 s; killing it", d.name);
                let _ = d.child.kill().await;
            }
        }
    }
}

/// Why a daemon that should be starting is gone, if one is.
fn exited_during_startup(daemons: &mut [Daemon]) -> Option<String> {
    daemons.iter_mut().find_map(|d| match d.child.try_wait() {
        Ok(Some(status)) => Some(format!(
            "{} exited during start-up ({status}); see {}",
            d.name,
            d.log.display()
        )),
        _ => None,
    })
}

/// Polls `ready` every 100 ms until it yields a value. If a daemon exits meanwhile, or
/// `what` has not happened within 30 s, everything is stopped and the error says why.
async fn wait_ready<T, F, Fut>(
    daemons: &mut [Daemon],
    what: &str,
    logs: &Path,
    mut ready: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = ready().await {
            return Ok(v);
        }
        if let Some(why) = exited_during_startup(daemons) {
            stop_all(daemons, &logs.with_file_name("agent")).await;
            bail!(why);
        }
        if tokio::time::Instant::now() > deadline {
            stop_all(daemons, &logs.with_file_name("agent")).await;
            bail!(
                "not within 30 s: {what}; see the logs in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start_daemon(exe: &Path, name: String, args: &[String], log: PathBuf) -> anyhow::Result<Daemon> {
    let child = spawn(exe, &name, args, &log)?;
    Ok(Daemon {
        name,
        child,
        log,
        exited: false,
    })
}

fn spawn(exe: &Path, name: &str, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(exe)
        .args(args)
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the continuum binary")?;
    let logs = args.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let logs = data_dir.join("logs");
    let base = args.base_port;
    let n = args.meta_members;
    let addr = |off: u16, i: u64| format!("127.0.0.1:{}", base + off + i as u16);
    let cluster: Vec<String> = (1..=n)
        .map(|i| format!("{i}={}/{}", addr(20, i), addr(10, i)))
        .collect();
    let cluster = cluster.join(",");
    let mut daemons = Vec::new();
    for i in 1..=n {
        let name = format!("meta-{i}");
        let log = logs.join(format!("{name}.log"));
        let a = vec![
            "meta".to_string(),
            format!("--id={i}"),
            format!("--data-dir={}", data_dir.join(&name).display()),
            format!("--listen-client={}", addr(10, i)),
            format!("--listen-peer={}", addr(20, i)),
            format!("--metrics-addr={}", addr(30, i)),
            format!("--initial-cluster={cluster}"),
        ];
        daemons.push(start_daemon(&exe, name, &a, log)?);
    }
    let endpoints: Vec<String> = (1..=n).map(|i| addr(10, i)).collect();
    let client = MetaClient::connect(&endpoints)?;
    println!("starting {n} meta members under {} ...", data_dir.display());
    let leader = wait_ready(&mut daemons, "a meta leader was elected", &logs, || async {
        client
            .status()
            .await
            .ok()
            .map(|s| s.leader_id)
            .filter(|l| *l != 0)
    })
    .await?;
    let blocks = args.block_servers;
    for i in 1..=blocks {
        let name = format!("block-{i}");
        let log = logs.join(format!("{name}.log"));
        let a = vec![
            "block".to_string(),
            format!("--id={i}"),
            format!("--data-dir={}", data_dir.join(&name).display()),
            format!("--listen={}", addr(100, i)),
            format!("--meta={}", endpoints.join(",")),
            format!("--host={name}"),
            format!("--metrics-addr={}", addr(200, i)),
        ];
        daemons.push(start_daemon(&exe, name, &a, log)?);
    }
    let registered = format!("all {blocks} block servers registered");
    wait_ready(&mut daemons, &registered, &logs, || async {
        let alive = continuum_blockstore::cluster::alive_nodes(&client)
            .await
            .ok()?;
        (alive.len() as u64 >= blocks).then_some(())
    })
    .await?;
    let socket = data_dir.join("nbd.sock");
    let a = vec![
        "gateway".to_string(),
        "--id=local".to_string(),
        format!("--meta={}", endpoints.join(",")),
        format!("--listen=127.0.0.1:{}", args.nbd_port),
        format!("--socket={}", socket.display()),
        format!("--metrics-addr={}", addr(300, 1)),
        "--standby-attach-seconds=30".to_string(),
    ];
    daemons.push(start_daemon(
        &exe,
        "gateway".into(),
        &a,
        logs.join("gateway.log"),
    )?);
    if !args.demo_volume.is_empty() && blocks > 0 {
        let exists = client
            .record::<continuum_proto::records_pb::Volume>(&args.demo_volume)
            .await?
            .is_some();
        if !exists {
            let profile = if blocks >= 6 {
                continuum_blockstore::ec::Profile::DEFAULT
            } else {
                continuum_blockstore::ec::Profile {
                    data: 1,
                    parity: (blocks - 1).min(2) as usize,
                }
            };
            continuum_blockstore::cluster::create_volume(
                &client,
                &args.demo_volume,
                args.demo_size,
                profile,
                continuum_blockstore::cluster::DEFAULT_UNIT_BYTES,
            )
            .await
            .context("creating the demo volume")?;
        }
    }
    let nbd_port = args.nbd_port;
    wait_ready(&mut daemons, "the gateway listened", &logs, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", nbd_port))
            .await
            .ok()
            .map(|_| ())
    })
    .await?;
    // The hypervisor agent of this machine (host "local", site "local").
    let agent_dir = data_dir.join("agent");
    let a = vec![
        "agent".to_string(),
        "--name=local".to_string(),
        "--site=local".to_string(),
        format!("--data-dir={}", agent_dir.display()),
        format!("--gateway-socket={}", socket.display()),
        "--gateway-id=local".to_string(),
        format!("--endpoints={}", endpoints.join(",")),
    ];
    daemons.push(start_daemon(
        &exe,
        "agent".into(),
        &a,
        logs.join("agent.log"),
    )?);
    let c = &client;
    wait_ready(&mut daemons, "the agent registered", &logs, || async move {
        continuum_orchestrator::records::alive_hosts(c)
            .await
            .ok()
            .filter(|h| h.contains("local"))
            .map(|_| ())
    })
    .await?;
    let demo_vm = match (&args.demo_vm_kernel, args.demo_volume.is_empty()) {
        (Some(kernel), false) => {
            let exists = client
                .record::<continuum_proto::records_pb::Vm>("demo-vm")
                .await?
                .is_some();
            if !exists {
                let spec = continuum_proto::records_pb::Vm {
                    name: "demo-vm".into(),
                    vcpus: 1,
                    memory_bytes: 256 << 20,
                    volumes: vec![args.demo_volume.clone()],
                    site: "local".into(),
                    running: true,
                    generation: 1,
                    kernel: kernel.display().to_string(),
                    initrd: args
                        .demo_vm_initrd
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    append: "console=ttyS0 panic=-1 quiet continuum.act=read continuum.hold".into(),
                    placement_reason: "created by continuum up".into(),
                    ..Default::default()
                };
                let placed =
                    continuum_orchestrator::records::validate_and_place(&client, &spec, None, &[])
                        .await
                        .context("creating the demo VM")?;
                client.create_record(&placed).await?;
            }
            true
        }
        _ => false,
    };
    println!();
    println!("Continuum is up.");
    println!("  meta members   {}", endpoints.join(", "));
    println!("  meta leader    member {leader}");
    println!(
        "  metrics        http://{}/metrics (and {} more)",
        addr(30, 1),
        n - 1
    );
    if blocks > 0 {
        println!(
            "  block servers  {blocks} registered ({} .. {}; metrics http://{}/metrics ..)",
            addr(100, 1),
            addr(100, blocks),
            addr(200, 1)
        );
    }
    let demo = if args.demo_volume.is_empty() {
        "NAME"
    } else {
        args.demo_volume.as_str()
    };
    println!("  NBD gateway    nbd://127.0.0.1:{}/{demo}", args.nbd_port);
    println!(
        "                 nbd+unix:///{demo}?socket={}",
        socket.display()
    );
    println!("  agent          host local (site local): `continuum host list`");
    if demo_vm {
        println!(
            "  demo VM        demo-vm: `continuum vm show demo-vm`, `continuum vm console demo-vm`"
        );
    }
    println!("  data           {}", data_dir.display());
    println!("  logs           {}", logs.display());
    println!();
    println!("Try:");
    println!("  continuum status");
    println!("  continuum kv put hello world && continuum kv get hello");
    println!("  continuum site create edge-1 --kind edge && continuum site list");
    println!("  continuum node list");
    println!("  continuum volume create disk-1 --size 10G && continuum volume list");
    if !args.demo_volume.is_empty() {
        println!("  nbdinfo nbd://127.0.0.1:{}/{demo}", args.nbd_port);
        println!(
            "  qemu-img convert -n -p -O raw disk.img nbd://127.0.0.1:{}/{demo}",
            args.nbd_port
        );
        println!();
        println!("Attach the volume to a VM:");
        println!(
            "  qemu-system-x86_64 -m 1G -blockdev driver=nbd,node-name=disk0,server.type=unix,server.path={},export={demo},reconnect-delay=10 -device virtio-blk-pci,drive=disk0 ...",
            socket.display()
        );
    }
    println!();
    if args.check {
        stop_all(&mut daemons, &agent_dir).await;
        println!("--check: stopped everything.");
        return Ok(());
    }
    println!("Press Ctrl-C to stop everything (running `continuum up` again resumes).");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut exits = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = exits.tick() => {
                for d in daemons.iter_mut().filter(|d| !d.exited) {
                    if let Ok(Some(status)) = d.child.try_wait() {
                        d.exited = true;
                        eprintln!("warning: {} exited ({status}); see {}", d.name, d.log.display());
                    }
                }
            }
        }
    }
    println!("stopping ...");
    stop_all(&mut daemons, &agent_dir).await;
    println!("stopped; data kept in {}", data_dir.display());
    Ok(())
}
