//! Simulation mode: the protocol cores in one thread with virtual time, many seeds.
//!
//! Each seed runs the meta simulation ([`meta`]) and the block simulation ([`blocks`]); the
//! same seed always replays the same schedule of faults and operations.

pub mod blocks;
pub mod meta;
pub mod net;

use std::collections::BTreeMap;

/// Totals over a range of seeds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SimSummary {
    pub seeds: u64,
    pub failed_seeds: Vec<u64>,
    pub failures: Vec<String>,
    pub meta_register_ops: u64,
    pub meta_crashes: u64,
    pub meta_partitions: u64,
    pub block_writes: u64,
    pub block_writes_acked: u64,
    pub block_writes_durable: u64,
    pub block_reads_checked: u64,
    pub block_writers: u64,
    pub block_faults: BTreeMap<String, u64>,
    pub max_heal_ms: u64,
    pub wall_ms: u64,
}

/// What to run per seed.
#[derive(Clone, Debug, Default)]
pub struct SimPlan {
    pub meta: Option<continuum_meta::sim::SimConfig>,
    pub blocks: Option<blocks::BlockSimConfig>,
}

impl SimPlan {
    pub fn both() -> Self {
        Self {
            meta: Some(continuum_meta::sim::SimConfig {
                fault_ms: 8_000,
                ..Default::default()
            }),
            blocks: Some(blocks::BlockSimConfig::default()),
        }
    }
}

/// Runs `seeds`, calling `progress` after each; stops early after `max_failures`.
pub fn run_seeds(
    seeds: impl IntoIterator<Item = u64>,
    plan: &SimPlan,
    max_failures: usize,
    mut progress: impl FnMut(u64, &SimSummary),
) -> SimSummary {
    let started = std::time::Instant::now();
    let mut s = SimSummary::default();
    for seed in seeds {
        s.seeds += 1;
        let mut failed = None;
        if let Some(cfg) = &plan.meta {
            match catching(|| meta::run(seed, cfg.clone())) {
                Ok(r) => {
                    s.meta_register_ops += r.register_ops as u64;
                    s.meta_crashes += r.crashes as u64;
                    s.meta_partitions += r.partitions as u64;
                }
                Err(e) => failed = Some(format!("meta: {e}")),
            }
        }
        if let Some(cfg) = &plan.blocks {
            match catching(|| blocks::run(seed, cfg.clone())) {
                Ok(r) => {
                    s.block_writes += r.writes;
                    s.block_writes_acked += r.writes_acked;
                    s.block_writes_durable += r.writes_durable;
                    s.block_reads_checked += r.reads_checked;
                    s.block_writers += r.writers;
                    s.max_heal_ms = s.max_heal_ms.max(r.heal_ms);
                    for (k, v) in r.faults {
                        *s.block_faults.entry(k).or_insert(0) += v;
                    }
                }
                Err(e) => failed = failed.or(Some(format!("blocks: {e}"))),
            }
        }
        if let Some(f) = failed {
            s.failed_seeds.push(seed);
            s.failures.push(f);
        }
        s.wall_ms = started.elapsed().as_millis() as u64;
        progress(seed, &s);
        if s.failed_seeds.len() >= max_failures.max(1) {
            break;
        }
    }
    s.wall_ms = started.elapsed().as_millis() as u64;
    s
}

/// Runs `f`, turning a panic (a failed assertion in a core, a Raft invariant) into a failure.
fn catching<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        Err(format!("panicked: {what}"))
    })
}
