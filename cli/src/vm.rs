//! `continuum agent` (the hypervisor host daemon), `continuum vm ...` and `continuum host list`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use continuum_orchestrator::agent::{Agent, AgentConfig};
use continuum_orchestrator::images::{self, Nbd};
use continuum_orchestrator::qemu::Accel;
use continuum_orchestrator::records;
use continuum_proto::records_pb::{Vm, VmState, VmStatus};

use crate::admin::Endpoints;
use crate::block::parse_size;

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This host's name.
    #[arg(long)]
    pub name: String,
    /// The site this host is in.
    #[arg(long)]
    pub site: String,
    /// Where VMs' runtime files (QMP and console sockets, logs) go.
    #[arg(long, default_value = "/var/lib/continuum/agent")]
    pub data_dir: PathBuf,
    /// The NBD socket of this host's gateway (`continuum gateway --socket`).
    #[arg(long)]
    pub gateway_socket: PathBuf,
    /// That gateway's `--id` (fencing revokes its writer leases when this host dies).
    #[arg(long)]
    pub gateway_id: String,
    /// CPUs VMs may use here. [default: this machine's]
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory VMs may use here, e.g. 16G. [default: this machine's, less 1 GiB]
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Accelerator: auto (probe: a Linux kernel must boot under KVM, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// The kernel the KVM probe boots. [default: the newest /boot/vmlinuz-*]
    #[arg(long, value_name = "PATH")]
    pub kvm_probe_kernel: Option<PathBuf>,
    /// A host whose agent has been silent this long is dead: its VMs restart on another host
    /// of the site (after fencing).
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub dead_after_seconds: u64,
    /// How long `vm stop` waits for the guest to power off before QEMU quits.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub stop_timeout_seconds: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// The address this host receives live migrations on (other hosts' QEMUs connect to it).
    #[arg(long, default_value = "127.0.0.1")]
    pub migration_address: String,
    #[command(flatten)]
    pub ep: Endpoints,
}

fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| (kb * 1024).saturating_sub(1 << 30))
        .unwrap_or(1 << 30)
}

pub async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let meta = args.ep.client()?;
    let cfg = AgentConfig {
        name: args.name,
        site: args.site,
        data_dir: args.data_dir,
        gateway_socket: args.gateway_socket,
        gateway_id: args.gateway_id,
        cpus: args
            .cpus
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)),
        memory_bytes: args.memory.unwrap_or_else(machine_memory),
        accel: match args.accel.as_str() {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        },
        kvm_probe_kernel: args.kvm_probe_kernel,
        dead_after: Duration::from_secs(args.dead_after_seconds),
        stop_timeout: Duration::from_secs(args.stop_timeout_seconds),
        qemu: args.qemu,
        migration_address: args.migration_address,
    };
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let agent = Agent::new(meta, cfg).await;
    agent
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import a disk image file (raw, qcow2, or anything qemu-img reads) into a volume.
    Import {
        file: PathBuf,
        /// The image's name. [default: the file name without extension]
        #[arg(long)]
        name: Option<String>,
        /// Erasure-coding profile of its volume.
        #[arg(long, default_value = "4+2")]
        profile: String,
        /// The gateway that writes it (`unix:PATH` or `HOST:PORT`).
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: String,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// List images.
    List {
        #[command(flatten)]
        ep: Endpoints,
    },
}

pub async fn image(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Import {
            file,
            name,
            profile,
            nbd,
            ep,
        } => {
            let meta = ep.client()?;
            let name = match name {
                Some(n) => n,
                None => file
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .context("name the image with --name")?,
            };
            let profile = continuum_blockstore::cluster::parse_profile(&profile)?;
            let img = images::import(&meta, &file, &name, profile, &Nbd(nbd), true).await?;
            println!(
                "image {} imported: {} MiB from {} ({}), volume {}",
                img.name,
                img.size_bytes >> 20,
                img.source,
                img.source_format,
                img.volume
            );
        }
        ImageCommand::List { ep } => {
            let meta = ep.client()?;
            println!(
                "{:<20} {:>10} {:<8} {:<24} SOURCE",
                "IMAGE", "SIZE", "FORMAT", "VOLUME"
            );
            for i in meta.records::<continuum_proto::records_pb::Image>().await? {
                let i = i.record;
                println!(
                    "{:<20} {:>10} {:<8} {:<24} {}",
                    i.name,
                    format!("{}M", i.size_bytes >> 20),
                    i.source_format,
                    i.volume,
                    i.source
                );
            }
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// List hypervisor hosts: site, capacity, accelerator, whether the agent is alive.
    List {
        #[command(flatten)]
        ep: Endpoints,
    },
}

pub async fn host(cmd: HostCommand) -> anyhow::Result<()> {
    let HostCommand::List { ep } = cmd;
    let meta = ep.client()?;
    let hosts = records::hosts(&meta).await?;
    let alive = records::alive_hosts(&meta).await?;
    let vms = records::vms(&meta).await?;
    println!(
        "{:<16} {:<12} {:>5} {:>10} {:>6} {:>4} {:<6}",
        "HOST", "SITE", "CPUS", "MEMORY", "ACCEL", "VMS", "AGENT"
    );
    for h in hosts {
        let n = vms.iter().filter(|v| v.record.host == h.name).count();
        println!(
            "{:<16} {:<12} {:>5} {:>10} {:>6} {:>4} {:<6}",
            h.name,
            h.site,
            h.cpus,
            format!("{}M", h.memory_bytes >> 20),
            if h.kvm { "kvm" } else { "tcg" },
            n,
            if alive.contains(&h.name) {
                "alive"
            } else {
                "gone"
            }
        );
    }
    Ok(())
}

// Parsed once per run: the size of `Create` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create a VM (placed by the scheduler on a host of its site) and start it.
    Create {
        name: String,
        /// The site it runs in.
        #[arg(long)]
        site: String,
        /// Memory, e.g. 512M.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        memory: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Disks (existing volumes), in order: vda, vdb, ... (after the --image disk).
        #[arg(long = "disk", value_delimiter = ',')]
        disks: Vec<String>,
        /// A first disk cloned from this image (`continuum image import`): volume NAME-root.
        #[arg(long)]
        image: Option<String>,
        /// Size of the cloned disk (at least the image's).
        #[arg(long, value_parser = parse_size)]
        disk_size: Option<u64>,
        /// The gateway that copies the image (`unix:PATH` or `HOST:PORT`).
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: String,
        /// Direct kernel boot: a kernel image on the hosts.
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long)]
        initrd: Option<String>,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0")]
        append: String,
        /// A virtio-net NIC on its site's overlay subnet (the site's `continuum overlay up
        /// --subnet`); with direct kernel boot the guest gets its address as `ip=`.
        #[arg(long)]
        nic: bool,
        /// The NIC's address (default: the lowest free one of the site's subnet).
        #[arg(long, requires = "nic")]
        address: Option<String>,
        /// VMs of one group never share a host.
        #[arg(long)]
        anti_affinity: Option<String>,
        /// Place it on this host (which must fit it).
        #[arg(long)]
        host: Option<String>,
        /// Create it stopped.
        #[arg(long)]
        no_start: bool,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// List VMs with their host and state.
    List {
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Show a VM's spec and status.
    Show {
        name: String,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Start a stopped VM, optionally on another host of its site.
    Start {
        name: String,
        #[arg(long)]
        host: Option<String>,
        /// Replace the kernel command line (direct kernel boot).
        #[arg(long)]
        append: Option<String>,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Stop a VM (ACPI power-down, then QEMU quits after the agent's stop timeout).
    Stop {
        name: String,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Restart a VM's QEMU (a cold reboot).
    Reboot {
        name: String,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Live-migrate a running VM to another host of its site (QEMU migration; the volumes'
    /// writer leases pass from the source's gateway to the target's at switch-over).
    Migrate {
        name: String,
        #[arg(long)]
        to: String,
        /// Return once the migration is requested instead of waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Delete a VM (its volumes stay).
    Delete {
        name: String,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Attach to a VM's serial console (on its host; Ctrl-] leaves).
    Console {
        name: String,
        /// Print the console log instead of attaching.
        #[arg(long)]
        log: bool,
        #[command(flatten)]
        ep: Endpoints,
    },
    /// Wait until a VM reaches a state (for scripts).
    Wait {
        name: String,
        #[arg(long, value_parser = ["running", "stopped", "error"])]
        state: String,
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
        #[command(flatten)]
        ep: Endpoints,
    },
}

fn state_name(s: i32) -> &'static str {
    match VmState::from_i32(s).unwrap_or(VmState::Unspecified) {
        VmState::Unspecified => "-",
        VmState::Pending => "pending",
        VmState::Running => "running",
        VmState::Stopped => "stopped",
        VmState::Error => "error",
    }
}

/// The state to show: the agent's, if it reports on the spec's current host and generation.
fn effective(vm: &Vm, status: Option<&VmStatus>) -> (String, String) {
    match status {
        Some(s) if s.host == vm.host && s.generation == vm.generation => {
            (state_name(s.state).to_string(), s.reason.clone())
        }
        _ if vm.running => ("pending".into(), "waiting for the agent".into()),
        _ => ("stopped".into(), String::new()),
    }
}

pub async fn vm(cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Create {
            name,
            site,
            memory,
            vcpus,
            mut disks,
            image,
            disk_size,
            nbd,
            kernel,
            initrd,
            append,
            nic,
            address,
            anti_affinity,
            host,
            no_start,
            ep,
        } => {
            let meta = ep.client()?;
            let root = format!("{name}-root");
            if let Some(img) = &image {
                if meta
                    .record::<continuum_proto::records_pb::Image>(img)
                    .await?
                    .is_none()
                {
                    bail!("image {img:?} does not exist (import it with `continuum image import`)");
                }
                disks.insert(0, root.clone());
            }
            let spec = Vm {
                name: name.clone(),
                vcpus,
                memory_bytes: memory,
                volumes: disks,
                site,
                anti_affinity_group: anti_affinity.unwrap_or_default(),
                running: !no_start,
                generation: 1,
                kernel: kernel.unwrap_or_default(),
                initrd: initrd.unwrap_or_default(),
                append,
                nic,
                address: address.unwrap_or_default(),
                placement_reason: "created".into(),
                ..Default::default()
            };
            // Checks and placement first (the clone's volume does not exist yet).
            let to_create: Vec<String> = image.iter().map(|_| root.clone()).collect();
            let placed =
                records::validate_and_place(&meta, &spec, host.as_deref(), &to_create).await?;
            if let Some(img) = &image {
                eprintln!("cloning image {img} into volume {root} ...");
                images::clone_image(&meta, img, &root, disk_size, &Nbd(nbd.clone())).await?;
            }
            meta.create_record(&placed).await.map_err(|e| match e {
                continuum_meta_client::Error::AlreadyExists { .. } => {
                    anyhow::anyhow!("VM {name:?} already exists")
                }
                e => e.into(),
            })?;
            if placed.nic {
                println!(
                    "VM {name} created on host {} with address {}",
                    placed.host, placed.address
                );
            } else {
                println!("VM {name} created on host {}", placed.host);
            }
        }
        VmCommand::List { ep } => {
            let meta = ep.client()?;
            let vms = records::vms(&meta).await?;
            let statuses = records::statuses(&meta).await?;
            println!(
                "{:<20} {:<12} {:<14} {:>5} {:>8} {:<9} REASON",
                "VM", "SITE", "HOST", "VCPUS", "MEMORY", "STATE"
            );
            for v in vms {
                let v = v.record;
                let (state, reason) = effective(
                    &v,
                    statuses
                        .iter()
                        .find(|s| s.name == v.name && s.host == v.host),
                );
                println!(
                    "{:<20} {:<12} {:<14} {:>5} {:>8} {:<9} {}",
                    v.name,
                    v.site,
                    v.host,
                    v.vcpus,
                    format!("{}M", v.memory_bytes >> 20),
                    state,
                    reason
                );
            }
        }
        VmCommand::Show { name, ep } => {
            let meta = ep.client()?;
            let Some(v) = meta.record::<Vm>(&name).await? else {
                bail!("VM {name:?} does not exist");
            };
            let v = v.record;
            let status = records::status_of(&meta, &v).await?;
            let (state, reason) = effective(&v, status.as_ref());
            println!("vm: {}", v.name);
            println!(
                "  site: {}  host: {}  ({})",
                v.site, v.host, v.placement_reason
            );
            println!("  vcpus: {}  memory: {} MiB", v.vcpus, v.memory_bytes >> 20);
            println!("  disks: {}", v.volumes.join(", "));
            if v.nic {
                println!(
                    "  nic: {}  mac: {}  tap: {}",
                    v.address,
                    continuum_orchestrator::qemu::mac_of(&v.name),
                    continuum_orchestrator::network::tap_name(&v.name)
                );
            }
            if !v.kernel.is_empty() {
                println!("  kernel: {}  initrd: {}", v.kernel, v.initrd);
                println!("  append: {}", v.append);
            }
            if !v.anti_affinity_group.is_empty() {
                println!("  anti-affinity group: {}", v.anti_affinity_group);
            }
            if !v.migrate_to.is_empty() {
                println!(
                    "  migrating to: {} ({})",
                    v.migrate_to,
                    if v.migrate_incoming.is_empty() {
                        "target starting"
                    } else {
                        &v.migrate_incoming
                    }
                );
            }
            println!(
                "  desired: {}  generation: {}",
                if v.running { "running" } else { "stopped" },
                v.generation
            );
            println!(
                "  state: {state}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                }
            );
            if let Some(s) = status {
                println!(
                    "  agent: host {} pid {} accel {} restarts {}",
                    s.host, s.pid, s.accel, s.restarts
                );
                println!("  console: {} (log {})", s.console_socket, s.console_log);
            }
        }
        VmCommand::Start {
            name,
            host,
            append,
            ep,
        } => {
            let meta = ep.client()?;
            // Moving to another host goes through the scheduler's checks.
            let mut target = None;
            if let Some(h) = &host {
                let Some(cur) = meta.record::<Vm>(&name).await? else {
                    bail!("VM {name:?} does not exist");
                };
                target = Some(records::place_on(&meta, &cur.record, h).await?);
            }
            let v = records::update_vm(&meta, &name, |v| {
                if v.running && target.as_ref().is_some_and(|t| *t != v.host) {
                    return Err(records::OrchError::Invalid(
                        "stop the VM before starting it on another host (or migrate it)".into(),
                    ));
                }
                if let Some(t) = &target {
                    if *t != v.host {
                        v.placement_reason = format!("started on {t} by request");
                    }
                    v.host = t.clone();
                }
                if let Some(a) = &append {
                    v.append = a.clone();
                }
                v.running = true;
                v.generation += 1;
                Ok(())
            })
            .await?;
            println!("VM {name} starting on host {}", v.host);
        }
        VmCommand::Migrate {
            name,
            to,
            no_wait,
            timeout_seconds,
            ep,
        } => {
            let meta = ep.client()?;
            let Some(cur) = meta.record::<Vm>(&name).await? else {
                bail!("VM {name:?} does not exist");
            };
            let from = cur.record.host.clone();
            if from == to {
                bail!("VM {name} is on {to} already");
            }
            records::place_on(&meta, &cur.record, &to).await?;
            records::update_vm(&meta, &name, |v| {
                if !v.running {
                    return Err(records::OrchError::Invalid(
                        "the VM is not running: start it on the other host instead".into(),
                    ));
                }
                if !v.migrate_to.is_empty() {
                    return Err(records::OrchError::Invalid(format!(
                        "a migration to {} is in progress",
                        v.migrate_to
                    )));
                }
                v.migrate_to = to.clone();
                v.migrate_incoming.clear();
                Ok(())
            })
            .await?;
            println!("VM {name}: migrating from {from} to {to}");
            if no_wait {
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_seconds);
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(v) = meta.record::<Vm>(&name).await? else {
                    bail!("VM {name} was deleted");
                };
                let v = v.record;
                if v.host == to && v.migrate_to.is_empty() {
                    println!("VM {name} migrated to {to}");
                    return Ok(());
                }
                if v.migrate_to.is_empty() {
                    bail!("{}", v.placement_reason);
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("VM {name} still migrating to {to} after {timeout_seconds} s");
                }
            }
        }
        VmCommand::Stop { name, ep } => {
            let meta = ep.client()?;
            records::update_vm(&meta, &name, |v| {
                v.running = false;
                Ok(())
            })
            .await?;
            println!("VM {name} stopping");
        }
        VmCommand::Reboot { name, ep } => {
            let meta = ep.client()?;
            records::update_vm(&meta, &name, |v| {
                if !v.running {
                    return Err(records::OrchError::Invalid(
                        "the VM is stopped: start it".into(),
                    ));
                }
                v.generation += 1;
                Ok(())
            })
            .await?;
            println!("VM {name} rebooting");
        }
        VmCommand::Delete { name, ep } => {
            let meta = ep.client()?;
            if !meta.delete_record::<Vm>(&name).await? {
                bail!("VM {name:?} does not exist");
            }
            let _ = records::delete_statuses(&meta, &name).await;
            println!("VM {name} deleted (its host's agent stops its QEMU; volumes stay)");
        }
        VmCommand::Console { name, log, ep } => {
            let meta = ep.client()?;
            let Some(v) = meta.record::<Vm>(&name).await? else {
                bail!("VM {name:?} does not exist");
            };
            let Some(s) = records::status_of(&meta, &v.record).await? else {
                bail!(
                    "VM {name:?} has no status on host {:?} yet (not started?)",
                    v.record.host
                );
            };
            if log {
                let text = std::fs::read_to_string(&s.console_log).with_context(|| {
                    format!(
                        "reading {} (the console log is on host {})",
                        s.console_log, s.host
                    )
                })?;
                print!("{text}");
                return Ok(());
            }
            console(&s).await?;
        }
        VmCommand::Wait {
            name,
            state,
            timeout_seconds,
            ep,
        } => {
            let meta = ep.client()?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_seconds);
            loop {
                let Some(v) = meta.record::<Vm>(&name).await? else {
                    bail!("VM {name:?} does not exist");
                };
                let status = records::status_of(&meta, &v.record).await?;
                let (now, reason) = effective(&v.record, status.as_ref());
                if now == state {
                    println!("{name}: {now}");
                    return Ok(());
                }
                if now == "error" {
                    bail!("VM {name} is in error: {reason}");
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("VM {name} is {now} after {timeout_seconds} s ({reason})");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(())
}

/// Pipes the terminal to the VM's console socket until Ctrl-] or the socket closes.
async fn console(s: &VmStatus) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::UnixStream::connect(&s.console_socket)
        .await
        .with_context(|| {
            format!(
                "connecting to {} (run this on host {})",
                s.console_socket, s.host
            )
        })?;
    eprintln!("connected to {}'s console; Ctrl-] leaves", s.name);
    let (mut r, mut w) = sock.into_split();
    let out = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let _ = tokio::io::copy(&mut r, &mut stdout).await;
    });
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == 0x1d) {
            w.write_all(&buf[..i]).await?;
            break;
        }
        w.write_all(&buf[..n]).await?;
    }
    out.abort();
    Ok(())
}
