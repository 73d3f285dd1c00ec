//! Live mode in CI: a short campaign against real `continuum` processes in network namespaces
//! (every fault kind enabled), and the negative test — a gateway broken on purpose (it
//! acknowledges writes before they are durable) must make the harness fail with its seed.
//!
//! Needs root (namespaces, nftables, tmpfs mounts), as CI and the README's test command have;
//! `CONTINUUM_CHAOS_LIVE_SECONDS=N` lengthens the campaign. The two tests share the
//! namespace names, so they run one at a time.

use std::sync::Mutex;
use std::time::Duration;

use continuum_chaos::live::{self, LiveConfig, LiveReport};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn config(seed: u64, seconds: u64) -> LiveConfig {
    assert!(
        rustix::process::geteuid().is_root(),
        "live chaos tests need root (network namespaces, nftables, tmpfs); run them as the README's test command does"
    );
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_continuum-chaos"))
        .parent()
        .expect("target dir")
        .join("continuum");
    assert!(
        exe.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --all-targets)",
        exe.display()
    );
    let mut cfg = LiveConfig::new(seed, exe);
    cfg.duration = Duration::from_secs(seconds);
    cfg.run_dir = std::env::temp_dir().join(format!("continuum-chaos-live-test-{seed}"));
    cfg
}

fn run(cfg: LiveConfig) -> LiveReport {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let r = rt
        .block_on(live::run(cfg))
        .expect("the live run itself works");
    r.print();
    r
}

#[test]
fn a_short_live_campaign_loses_nothing() {
    let seconds = std::env::var("CONTINUUM_CHAOS_LIVE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    let r = run(config(7, seconds));
    assert!(r.ok, "live run failed: {:?}", r.failures);
    assert_eq!(r.acked_writes_lost, 0);
    assert!(r.block_violations.is_empty());
    assert!(r.heal_ms.is_some(), "full redundancy returned");
    // The run did real work under real faults.
    assert!(r.block_writes_acked > 1000, "{r:?}");
    assert!(r.block_writes_durable > 100, "{r:?}");
    assert!(r.block_reads_checked > 1000, "{r:?}");
    assert!(r.final_sweep_blocks > 100, "{r:?}");
    assert!(r.meta_ops > 100, "{r:?}");
    assert!(
        r.faults.len() >= 8,
        "faults injected: {:?}",
        r.faults_by_kind
    );
    assert!(
        r.faults_by_kind.len() >= 4,
        "fault kinds: {:?}",
        r.faults_by_kind
    );
}

#[test]
fn a_gateway_that_acks_before_durable_is_caught_with_its_seed() {
    let mut cfg = config(11, 30);
    cfg.broken_gateway = true;
    let r = run(cfg);
    assert!(!r.ok, "the broken gateway went unnoticed: {r:?}");
    assert!(
        r.acked_writes_lost > 0,
        "the checker names lost acknowledged writes: {:?}",
        r.failures
    );
    assert_eq!(r.seed, 11, "the report carries the reproducing seed");
}
