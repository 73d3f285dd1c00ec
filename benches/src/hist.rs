//! Latency recording and the summaries every benchmark reports.
//!
//! Each concurrent client records into its own [`LatencyHistogram`] (no shared state on the hot
//! path); the phase merges them and turns the result into a [`Summary`]: throughput over the
//! phase's wall time and latency percentiles in microseconds. [`DurationStats`] summarises a
//! handful of one-off measurements such as failover times, where a histogram would be overkill.

use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Smallest latency the histograms resolve, in microseconds.
const LOWEST_US: u64 = 1;
/// Largest latency recorded exactly; longer ones saturate here (a minute is far past any
/// per-request timeout the benchmarks use).
const HIGHEST_US: u64 = 60_000_000;
/// Three significant digits: a p99 of 1234 µs is reported as 1234, not 1200.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Request latencies of one client or one merged phase, in microseconds.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    inner: Histogram<u64>,
}

impl LatencyHistogram {
    pub fn new() -> Result<Self> {
        let inner = Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
            .context("creating latency histogram")?;
        Ok(Self { inner })
    }

    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.inner.saturating_record(us.max(LOWEST_US));
    }

    pub fn merge(&mut self, other: &LatencyHistogram) -> Result<()> {
        self.inner
            .add(&other.inner)
            .context("merging latency histograms")
    }

    /// Summarises the recorded requests as a phase that took `elapsed` of wall time.
    pub fn summary(&self, elapsed: Duration) -> Summary {
        let ops = self.inner.len();
        let elapsed_s = elapsed.as_secs_f64();
        let ops_per_s = if elapsed_s > 0.0 {
            ops as f64 / elapsed_s
        } else {
            0.0
        };
        Summary {
            ops,
            elapsed_s,
            ops_per_s,
            mean_us: self.inner.mean(),
            p50_us: self.inner.value_at_quantile(0.50),
            p99_us: self.inner.value_at_quantile(0.99),
            p999_us: self.inner.value_at_quantile(0.999),
            max_us: self.inner.max(),
        }
    }
}

/// Throughput and latency of one phase (one operation type, one client count, one target).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub ops: u64,
    pub elapsed_s: f64,
    pub ops_per_s: f64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// A few repeated one-off measurements (failover rounds), in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct DurationStats {
    pub samples_ms: Vec<f64>,
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
}

impl DurationStats {
    /// `None` when there are no samples: there is nothing to summarise.
    pub fn from_samples(samples: &[Duration]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        sorted.sort_by(f64::total_cmp);
        let (&min_ms, &max_ms) = (sorted.first()?, sorted.last()?);
        let mid = sorted.len() / 2;
        let median_ms = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        let samples_ms = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Some(Self {
            samples_ms,
            min_ms,
            median_ms,
            max_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_percentiles_and_throughput() {
        let mut h = LatencyHistogram::new().unwrap();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary(Duration::from_millis(500));
        assert_eq!(s.ops, 1000);
        assert!((s.ops_per_s - 2000.0).abs() < 1e-9);
        assert_eq!(s.p50_us, 500);
        assert_eq!(s.p99_us, 990);
        assert_eq!(s.p999_us, 999);
        assert_eq!(s.max_us, 1000);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = LatencyHistogram::new().unwrap();
        let mut b = LatencyHistogram::new().unwrap();
        a.record(Duration::from_micros(10));
        b.record(Duration::from_micros(20));
        b.record(Duration::from_micros(30));
        a.merge(&b).unwrap();
        let merged = a.summary(Duration::from_secs(1));
        assert_eq!(merged.ops, 3);
        assert_eq!(merged.max_us, 30);
    }

    #[test]
    fn sub_microsecond_latency_counts_as_one() {
        let mut h = LatencyHistogram::new().unwrap();
        h.record(Duration::from_nanos(10));
        assert_eq!(h.summary(Duration::from_secs(1)).p50_us, 1);
    }

    #[test]
    fn duration_stats_median_of_odd_and_even_counts() {
        let ms = |v: u64| Duration::from_millis(v);
        let odd = DurationStats::from_samples(&[ms(300), ms(100), ms(200)]).unwrap();
        assert_eq!(
            (odd.min_ms, odd.median_ms, odd.max_ms),
            (100.0, 200.0, 300.0)
        );
        assert_eq!(odd.samples_ms, vec![300.0, 100.0, 200.0]);
        let even = DurationStats::from_samples(&[ms(400), ms(100), ms(200), ms(300)]).unwrap();
        assert_eq!(even.median_ms, 250.0);
        assert!(DurationStats::from_samples(&[]).is_none());
    }
}
