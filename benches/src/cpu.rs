//! Machine-wide CPU time over a phase, from `/proc/stat`: the CPU cost of an operation.
//!
//! Every process of a comparison (servers, clients, kernel work on their behalf) runs on the
//! same few cores, so a throughput ratio moves with whatever else the host runs (this VM
//! reports steal time) while busy CPU time per operation moves much less. Both are reported;
//! time stolen by the hypervisor is counted apart, so a disturbed run can be recognised.

use anyhow::{Context, Result};
use serde::Serialize;

/// `/proc/stat` counts in USER_HZ, which the kernel ABI fixes at 100 on Linux.
const TICKS_PER_S: f64 = 100.0;

#[derive(Debug, Clone, Copy)]
struct Ticks {
    busy: u64,
    steal: u64,
    total: u64,
}

fn read() -> Result<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(Ticks {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        steal: at(7),
        total: (0..8).map(at).sum(),
    })
}

/// Started before a phase; [`CpuMeter::stop`] after it.
#[derive(Debug)]
pub struct CpuMeter(Ticks);

/// CPU use of one phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    /// Busy CPU seconds of the whole machine (user, system, interrupts), steal excluded.
    pub busy_s: f64,
    /// Busy CPU microseconds per operation.
    pub us_per_op: f64,
    /// Share of the phase's CPU time the hypervisor took (0–1).
    pub steal: f64,
}

impl CpuMeter {
    pub fn start() -> Result<Self> {
        Ok(Self(read()?))
    }

    pub fn stop(&self, ops: u64) -> Result<CpuUse> {
        let now = read()?;
        let busy_s = now.busy.saturating_sub(self.0.busy) as f64 / TICKS_PER_S;
        let total = now.total.saturating_sub(self.0.total).max(1) as f64;
        Ok(CpuUse {
            busy_s,
            us_per_op: busy_s * 1e6 / ops.max(1) as f64,
            steal: now.steal.saturating_sub(self.0.steal) as f64 / total,
        })
    }
}
