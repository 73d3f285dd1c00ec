//! `continuum-chaos`: runs chaos campaigns (see `docs/chaos.md`).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use continuum_chaos::live;
use continuum_chaos::sim::{self, SimPlan};

#[derive(Parser)]
#[command(
    name = "continuum-chaos",
    about = "Fault injection for Continuum, with checkers"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Deterministic simulation over a range of seeds.
    Sim {
        /// First seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of seeds from --seed.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Only the meta simulation, or only the block simulation.
        #[arg(long, value_parser = ["meta", "blocks"])]
        only: Option<String>,
        /// Deliberately broken storage (syncs that do nothing): the run must fail.
        #[arg(long)]
        broken_sync: bool,
        /// Leave these fault kinds out of the block simulation (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        without: Vec<String>,
        /// Add whole-cluster power losses to the block simulation.
        #[arg(long)]
        cluster_power_loss: bool,
        /// Stop after this many failing seeds.
        #[arg(long, default_value_t = 1)]
        max_failures: usize,
        /// Write the summary as JSON here.
        #[arg(long)]
        report: Option<std::path::PathBuf>,
    },
    /// The WAN delay line (started by `live` inside the router namespace; not for direct use).
    #[command(hide = true)]
    WanRelay {
        #[arg(long)]
        dev: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// A cluster of real processes in network namespaces (needs root), real NBD and meta
    /// workloads, a seeded schedule of faults.
    Live {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How long faults are injected (`120s`, `10m`); healing and the final checks follow.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Mean time between fault starts.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        fault_every: std::time::Duration,
        /// Leave these fault kinds out (comma-separated; all: kill, pause, partition,
        /// one_way, wan, bit_flip, disk_full, gateway_crash).
        #[arg(long, value_delimiter = ',')]
        without: Vec<String>,
        /// The `continuum` binary. [default: next to this one]
        #[arg(long)]
        continuum: Option<std::path::PathBuf>,
        /// Where data, logs and the report go. [default: /tmp/continuum-chaos-live-SEED]
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Write the JSON report here. [default: DIR/report.json]
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        /// How long full redundancy may take to return after the faults stop.
        #[arg(long, default_value = "180s", value_parser = parse_duration)]
        heal_timeout: std::time::Duration,
        /// Run a gateway broken on purpose (it acknowledges writes before they are durable):
        /// the checkers must catch it and the run must fail.
        #[arg(long)]
        broken_gateway: bool,
        /// Loss of every WAN fault in percent (100: the link is cut). [default: 5, 10, 20
        /// or 100 at random]
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        wan_loss: Option<u32>,
    },
}

/// `90`, `90s`, `2m`, `1500ms`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 120s or 10m)"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        "h" => Ok(std::time::Duration::from_secs(n * 3600)),
        _ => Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m or h)")),
    }
}

fn main() -> anyhow::Result<()> {
    // RUST_LOG=continuum_blockstore=debug shows what the cores decide during a replay.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match Cli::parse().mode {
        Mode::WanRelay { dev, seed } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(live::wan::relay(&dev, seed))
        }
        Mode::Live {
            seed,
            duration,
            fault_every,
            without,
            continuum,
            dir,
            report,
            heal_timeout,
            broken_gateway,
            wan_loss,
        } => {
            let exe = match continuum {
                Some(p) => p,
                None => std::env::current_exe()?
                    .parent()
                    .context("locating the continuum binary")?
                    .join("continuum"),
            };
            if !exe.exists() {
                bail!(
                    "no continuum binary at {} (build it, or pass --continuum PATH)",
                    exe.display()
                );
            }
            for k in &without {
                if !live::FAULT_KINDS.contains(&k.as_str()) {
                    bail!(
                        "unknown fault kind {k:?} (kinds: {})",
                        live::FAULT_KINDS.join(", ")
                    );
                }
            }
            if !rustix::process::geteuid().is_root() {
                bail!("live mode creates network namespaces and mounts: run it as root");
            }
            let mut cfg = live::LiveConfig::new(seed, exe);
            cfg.duration = duration;
            cfg.fault_every = fault_every;
            cfg.disabled = without.into_iter().collect();
            cfg.heal_timeout = heal_timeout;
            cfg.broken_gateway = broken_gateway;
            cfg.wan_loss = wan_loss;
            if let Some(d) = dir {
                cfg.run_dir = d;
            }
            cfg.report = report;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(live::run(cfg))?;
            r.print();
            if !r.ok {
                bail!("live run failed (seed {seed})");
            }
            Ok(())
        }
        Mode::Sim {
            seed,
            seeds,
            only,
            broken_sync,
            without,
            cluster_power_loss,
            max_failures,
            report,
        } => {
            let mut plan = SimPlan::both();
            if let Some(b) = plan.blocks.as_mut() {
                b.disabled = without.into_iter().collect();
                b.cluster_power_loss = cluster_power_loss;
            }
            match only.as_deref() {
                Some("meta") => plan.blocks = None,
                Some("blocks") => plan.meta = None,
                _ => {}
            }
            if broken_sync {
                if let Some(m) = plan.meta.as_mut() {
                    m.break_log_sync = true;
                }
                if let Some(b) = plan.blocks.as_mut() {
                    b.broken_sync = true;
                }
            }
            let step = (seeds / 20).max(1);
            let mut reported = 0;
            let summary = sim::run_seeds(seed..seed + seeds, &plan, max_failures, |s, sum| {
                // Failures are printed as they happen: a long campaign may be cut short.
                for (f, why) in sum.failed_seeds.iter().zip(&sum.failures).skip(reported) {
                    eprintln!("  seed {f} failed: {}", why.lines().next().unwrap_or(""));
                }
                reported = sum.failed_seeds.len();
                if (s - seed + 1) % step == 0 {
                    eprintln!(
                        "  {} / {} seeds, {} failed, {:.1} s",
                        sum.seeds,
                        seeds,
                        sum.failed_seeds.len(),
                        sum.wall_ms as f64 / 1000.0
                    );
                }
            });
            print_sim(&summary);
            if let Some(path) = report {
                std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("report: {}", path.display());
            }
            if !summary.failed_seeds.is_empty() {
                for (s, f) in summary.failed_seeds.iter().zip(&summary.failures) {
                    eprintln!("FAILED seed {s}: {f}");
                    eprintln!("  reproduce: continuum-chaos sim --seed {s}");
                }
                bail!("{} seed(s) failed", summary.failed_seeds.len());
            }
            Ok(())
        }
    }
}

fn print_sim(s: &sim::SimSummary) {
    println!(
        "simulation: {} seeds in {:.1} s",
        s.seeds,
        s.wall_ms as f64 / 1000.0
    );
    println!(
        "  meta:   {} register operations checked for linearizability, {} crashes, {} partitions",
        s.meta_register_ops, s.meta_crashes, s.meta_partitions
    );
    println!(
        "  blocks: {} writes ({} acked, {} durable), {} reads checked, {} writers",
        s.block_writes,
        s.block_writes_acked,
        s.block_writes_durable,
        s.block_reads_checked,
        s.block_writers
    );
    let faults: Vec<String> = s
        .block_faults
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("  faults: {}", faults.join(", "));
    println!("  longest heal: {} ms (virtual)", s.max_heal_ms);
    println!("  failed seeds (violations): {}", s.failed_seeds.len());
}
