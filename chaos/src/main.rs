//! `continuum-chaos`: runs chaos campaigns (see `docs/chaos.md`).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
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
