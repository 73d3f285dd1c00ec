//! Simulation mode in CI: meta histories checked for linearizability over many seeds, the
//! harness shown to catch a deliberately broken build, and the block simulation under the
//! fault kinds it currently survives (see docs/plans/issue-5.md for the full mix).
//!
//! `CONTINUUM_CHAOS_SEEDS=N` scales the seed counts.

use continuum_chaos::sim::{self, blocks::BlockSimConfig, SimPlan};

fn seeds(default: u64) -> u64 {
    std::env::var("CONTINUUM_CHAOS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn meta_only() -> SimPlan {
    let mut plan = SimPlan::both();
    plan.blocks = None;
    plan
}

#[test]
fn meta_histories_are_linearizable_under_faults() {
    let n = seeds(300);
    let s = sim::run_seeds(0..n, &meta_only(), 1, |_, _| {});
    assert!(
        s.failed_seeds.is_empty(),
        "seed {:?}: {:?}",
        s.failed_seeds,
        s.failures
    );
    eprintln!(
        "{n} meta seeds in {} ms: {} register operations, {} crashes, {} partitions",
        s.wall_ms, s.meta_register_ops, s.meta_crashes, s.meta_partitions
    );
    assert!(s.meta_register_ops > n * 50, "the workload ran: {s:?}");
    assert!(
        s.meta_crashes > 0 && s.meta_partitions > 0,
        "faults were injected: {s:?}"
    );
}

#[test]
fn a_log_that_acks_before_it_is_durable_is_caught_with_its_seed() {
    let mut plan = meta_only();
    plan.meta.as_mut().expect("meta").break_log_sync = true;
    let s = sim::run_seeds(0..200, &plan, 1, |_, _| {});
    assert_eq!(
        s.failed_seeds.len(),
        1,
        "a broken log writer went unnoticed over {} seeds",
        s.seeds
    );
    eprintln!("caught at seed {}: {}", s.failed_seeds[0], s.failures[0]);
}

#[test]
fn block_simulation_with_bit_rot_and_full_disks_loses_nothing() {
    let mut cfg = BlockSimConfig::default();
    for k in ["power_loss", "partition", "writer_crash", "stale_writer"] {
        cfg.disabled.insert(k.to_string());
    }
    let plan = SimPlan {
        meta: None,
        blocks: Some(cfg),
    };
    let n = seeds(300) / 30;
    let s = sim::run_seeds(0..n.max(3), &plan, 1, |_, _| {});
    assert!(
        s.failed_seeds.is_empty(),
        "seed {:?}: {:?}",
        s.failed_seeds,
        s.failures
    );
    assert!(
        s.block_reads_checked > 0 && s.block_writes_acked > 0,
        "{s:?}"
    );
}

/// The full fault mix still fails on some seeds: these are bugs the harness found (an acked
/// write lost after power losses and a full disk, stripes left with fewer than k current
/// shards). Run with `cargo test -p continuum-chaos -- --ignored` while fixing them.
#[test]
#[ignore = "known failures found by the harness; docs/plans/issue-5.md"]
fn block_simulation_full_fault_mix() {
    let plan = SimPlan {
        meta: None,
        blocks: Some(BlockSimConfig::default()),
    };
    for seed in [8u64, 21, 207] {
        let s = sim::run_seeds([seed], &plan, 1, |_, _| {});
        assert!(s.failed_seeds.is_empty(), "seed {seed}: {:?}", s.failures);
    }
}
