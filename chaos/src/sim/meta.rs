//! The meta simulation: meta's own deterministic simulator (`continuum_meta::sim`: Raft cores
//! on storage twins, a seeded network that drops, delays, reorders and partitions, crashes
//! that lose unsynced writes) with a register workload whose history is checked here for
//! linearizability, on top of the simulator's own agreement, durability, convergence and
//! liveness checks.

use continuum_meta::sim::{self, KvCall, KvResult, SimConfig};

use crate::linear::{self, Call, Op, Ret, Verdict};

/// Search budget of the linearizability checker per run.
const CHECK_STEPS: u64 = 5_000_000;

/// What a meta simulation did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MetaSimReport {
    pub seed: u64,
    pub register_ops: usize,
    pub unknown_outcomes: usize,
    pub acked_puts: usize,
    pub crashes: usize,
    pub partitions: usize,
}

/// Converts the simulator's history to the checker's.
pub fn history(records: &[sim::KvRecord]) -> Vec<Op> {
    records
        .iter()
        .filter(|r| !r.refused)
        .map(|r| Op {
            key: r.key.clone(),
            call: match &r.call {
                KvCall::Put(v) => Call::Put(v.clone()),
                KvCall::Get => Call::Get,
                KvCall::Cas { expect, new } => Call::Cas {
                    expect: expect.clone(),
                    new: new.clone(),
                },
            },
            invoke: r.invoke_ms,
            complete: r.complete_ms,
            ret: match &r.result {
                None => Ret::Unknown,
                Some(KvResult::Put) => Ret::Put,
                Some(KvResult::Get(v)) => Ret::Get(v.clone()),
                Some(KvResult::Cas(b)) => Ret::Cas(*b),
            },
        })
        .collect()
}

/// One seeded meta run; `Err` names the violated property.
pub fn run(seed: u64, mut cfg: SimConfig) -> Result<MetaSimReport, String> {
    if cfg.registers == 0 {
        cfg.registers = 6;
    }
    let r = sim::run(seed, cfg)?;
    let ops = history(&r.history);
    match linear::check(&ops, CHECK_STEPS) {
        Verdict::Linearizable => {}
        Verdict::Violation { key, ops } => {
            return Err(format!(
                "seed {seed}: meta history of key {:?} ({ops} operations) is not linearizable",
                String::from_utf8_lossy(&key)
            ))
        }
        Verdict::Unknown { key } => {
            return Err(format!(
                "seed {seed}: the linearizability check of key {:?} ran out of budget",
                String::from_utf8_lossy(&key)
            ))
        }
    }
    Ok(MetaSimReport {
        seed,
        register_ops: ops.len(),
        unknown_outcomes: ops.iter().filter(|o| o.ret == Ret::Unknown).count(),
        acked_puts: r.acked_puts,
        crashes: r.crashes,
        partitions: r.partitions,
    })
}
