//! `continuum`: the single binary of the Continuum fabric. Daemons (`meta`, `block`, `gateway`,
//! `overlay`, `agent`), the local fabric (`up`) and admin commands (`kv`, `lease`, `member`,
//! `status`, `site`, `volume`, `node`, `vm`, `host`).

mod admin;
mod block;
mod config;
mod gateway;
mod overlay;
mod up;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the gateway and block servers allocate and free many
/// small buffers per request on several threads, where glibc's allocator showed up as a
/// quarter of the gateway's CPU profile (ARCHITECTURE.md, dependencies).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Continuum: storage and networking fabric for VMs across cloud and edge sites.
#[derive(Parser, Debug)]
#[command(name = "continuum", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `continuum_meta=debug`); RUST_LOG
    /// overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a meta service member (Raft metadata store).
    Meta(Box<config::MetaArgs>),
    /// Run a block server (erasure-coded shard storage; registers in meta).
    Block(Box<block::BlockArgs>),
    /// Serve volumes over NBD (QEMU, qemu-img, fio and libnbd attach them by name).
    Gateway(Box<gateway::GatewayArgs>),
    /// The WireGuard-protocol overlay between sites (daemon and keys).
    #[command(subcommand)]
    Overlay(overlay::OverlayCommand),
    /// Manage volumes (thin, erasure-coded virtual disks).
    #[command(subcommand)]
    Volume(block::VolumeCommand),
    /// List block servers and their heartbeat.
    #[command(subcommand)]
    Node(block::NodeCommand),
    /// Run the whole fabric on this machine (today: 3 meta members, 6 block servers) until Ctrl-C.
    Up(up::UpArgs),
    /// Read and write keys in meta.
    #[command(subcommand)]
    Kv(admin::KvCommand),
    /// Manage meta leases (TTL'd; keys attached to a lease vanish when it expires).
    #[command(subcommand)]
    Lease(admin::LeaseCommand),
    /// List and change meta cluster membership.
    #[command(subcommand)]
    Member(admin::MemberCommand),
    /// Show the health of every meta member.
    Status(admin::StatusArgs),
    /// Manage sites (typed fabric records).
    #[command(subcommand)]
    Site(admin::SiteCommand),
    /// Run a hypervisor host's agent (runs the VMs the scheduler places on this host).
    Agent(Box<vm::AgentArgs>),
    /// Manage VMs (QEMU guests whose disks are Continuum volumes).
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// List hypervisor hosts.
    #[command(subcommand)]
    Host(vm::HostCommand),
    /// Import and list VM images.
    #[command(subcommand)]
    Image(vm::ImageCommand),
}

fn init_logging(level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level, &cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Meta(args) => config::run_meta(*args).await,
            Command::Block(args) => block::run_block(*args).await,
            Command::Gateway(args) => gateway::run_gateway(*args).await,
            Command::Overlay(c) => overlay::overlay(c).await,
            Command::Volume(c) => block::volume(c).await,
            Command::Node(c) => block::node(c).await,
            Command::Up(args) => up::run(args).await,
            Command::Kv(c) => admin::kv(c).await,
            Command::Lease(c) => admin::lease(c).await,
            Command::Member(c) => admin::member(c).await,
            Command::Status(a) => admin::status(a).await,
            Command::Site(c) => admin::site(c).await,
            Command::Agent(args) => vm::run_agent(*args).await,
            Command::Vm(c) => vm::vm(c).await,
            Command::Host(c) => vm::host(c).await,
            Command::Image(c) => vm::image(c).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
