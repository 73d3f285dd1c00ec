//! `continuum-bench`: Continuum's benchmarks, each run side by side with a named peer in the
//! same invocation and reported as ratios (never asserted).
//!
//! One subcommand per benchmark (meta, ec, volume, nbd, overlay), each a module; they reuse
//! [`hist`] for latency summaries and [`cluster`] for local multi-process clusters.
//!
//! Progress goes to stderr, the result table to stdout, the full result to a JSON file.
//! Every process a benchmark starts is killed when the benchmark ends, fails or is interrupted.

/// The allocator of the `continuum` binary (see its main.rs): the volume bench runs block
/// servers and the volume client in this process, and they should allocate as they do in
/// production (with glibc's malloc it was ~4 % of the machine in 4 KiB random writes).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cluster;
mod continuum;
mod cpu;
mod ec;
mod etcd;
mod hist;
mod meta;
mod nbd;
mod overlay;
mod volume;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "continuum-bench",
    about = "Continuum benchmarks, side by side with named peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Meta service vs etcd 3.4: put and linearizable get throughput and latency, and the
    /// time from kill -9 of the leader to the first committed write.
    Meta(meta::MetaArgs),
    /// Erasure coding per core: Continuum's codec vs Intel ISA-L (encode and reconstruct).
    Ec(ec::EcArgs),
    /// Volume client (4+2 over six local block servers) vs a single block server without EC:
    /// 4 KiB random and 1 MiB sequential I/O; and the rebuild rate vs a plain file copy.
    Volume(volume::VolumeArgs),
    /// NBD through fio: a Continuum volume via the gateway vs qemu-nbd on a raw file and
    /// nbdkit's memory plugin (4 KiB random QD1/QD32, 1 MiB sequential).
    Nbd(nbd::NbdArgs),
    /// Overlay between two network namespaces: iperf3 TCP (1 and 4 streams) and ping through
    /// Continuum's overlay vs wireguard-go, and over the raw veth. Needs root.
    Overlay(overlay::OverlayArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let bench = async {
        match cli.command {
            Command::Meta(args) => meta::run(args).await,
            Command::Ec(args) => ec::run(args),
            Command::Volume(args) => volume::run(args).await,
            Command::Nbd(args) => nbd::run(args).await,
            Command::Overlay(args) => overlay::run_bench(args).await,
        }
    };
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    // Returning from an interrupted select drops the benchmark future, and with it every
    // `Cluster`, whose Drop kills the member processes.
    tokio::select! {
        result = bench => result,
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.context("waiting for Ctrl-C")?;
            bail!("interrupted; stopped every member process")
        }
        _ = terminate.recv() => bail!("terminated; stopped every member process"),
    }
}
