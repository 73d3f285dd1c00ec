//! The volume client against real block servers: a model-checked workload with server kills,
//! the write hole, stale writers, bit rot and repair.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, Rng};
use continuum_blockstore::volume::{Volume, VolumeError, VolumeSpec};

const TIMEOUT: Duration = Duration::from_secs(2);

fn spec(size: u64) -> VolumeSpec {
    let mut s = VolumeSpec::new(1, size);
    s.unit = 16 * 1024; // small units: many stripes in a small volume
    s.pg_count = 16;
    s
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

async fn check_all(vol: &Volume, model: &[u8]) {
    check_labelled(vol, model, "").await
}

async fn check_labelled(vol: &Volume, model: &[u8], label: &str) {
    let got = vol.read(0, model.len() as u64).await.unwrap();
    if let Some(at) = (0..model.len()).find(|&i| got[i] != model[i]) {
        let stripe = at as u64 / 65536;
        let (servers, infos, cached) = vol.inspect_stripe(stripe).await.unwrap();
        eprintln!("stripe {stripe} on {servers:?}, cached {cached:?}");
        for (p, i) in infos.iter().enumerate() {
            eprintln!("  pos {p}: {i:?}");
        }
        panic!("{label}: volume differs from the model at byte {at} (stripe unit 16 KiB: stripe {}, shard {})", at / 65536, at % 65536 / 16384);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_return_what_was_written_aligned_or_not() {
    let cluster = Cluster::start(6);
    let size = 1 << 20;
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT).await.unwrap();
    let mut model = vec![0u8; size as usize];
    // Unwritten reads as zeros.
    check_all(&vol, &model).await;
    // (offset, len): within a block, across shards, across stripes, a whole stripe, unaligned.
    let writes = [
        (0u64, 4096u64),
        (4096 * 3 + 100, 9000),
        (16 * 1024 - 512, 1024),
        (64 * 1024, 64 * 1024),
        (200_000, 150_000),
        (size - 4096, 4096),
        (7, 1),
    ];
    for (i, (off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 10, *len as usize);
        vol.write(*off, Bytes::from(data.clone()), i % 2 == 0).await.unwrap();
        model[*off as usize..(*off + *len) as usize].copy_from_slice(&data);
        let back = vol.read(*off, *len).await.unwrap();
        assert_eq!(&back[..], &data[..], "write {i} at {off}+{len}");
    }
    vol.flush().await.unwrap();
    check_all(&vol, &model).await;
    // Zeroing (TRIM / WRITE_ZEROES), aligned and not.
    for (off, len) in [(64 * 1024u64, 64 * 1024u64), (4000, 10_000)] {
        vol.write_zeroes(off, len, false).await.unwrap();
        model[off as usize..(off + len) as usize].fill(0);
    }
    check_all(&vol, &model).await;
    // Out of range.
    assert!(matches!(
        vol.read(size - 10, 11).await,
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write(size, Bytes::from_static(b"x"), false).await,
        Err(VolumeError::OutOfRange { .. })
    ));
    // A second writer (next epoch) sees the same bytes after reconciliation.
    drop(vol);
    let vol = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT).await.unwrap();
    check_all(&vol, &model).await;
}

/// Random writes, zeroes, flushes and reads against an in-memory model, while block servers
/// are killed (at most m = 2 at a time) and restarted; every read must equal the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_workload_with_server_kills_always_reads_the_model() {
    let seeds: Vec<u64> = std::env::var("CONTINUUM_VOLUME_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|n| (1..=n).collect())
        .unwrap_or_else(|| vec![1, 2, 3]);
    let (mut degraded, mut rebuilt) = (0, 0);
    for seed in seeds {
        let (d, r) = run_workload(seed, 150).await;
        degraded += d;
        rebuilt += r;
    }
    // The kills were felt: reads went around dead servers and returning ones were caught up.
    assert!(degraded > 0 && rebuilt > 0, "degraded reads {degraded}, shards rebuilt {rebuilt}");
}

/// Returns (degraded reads, shards rebuilt).
async fn run_workload(seed: u64, ops: usize) -> (u64, u64) {
    let mut cluster = Cluster::start(7);
    let size = 512 * 1024;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT).await.unwrap();
    let mut model = vec![0u8; size as usize];
    let mut killed: Vec<usize> = Vec::new();
    for op in 0..ops {
        match rng.below(10) {
            0..=3 => {
                let off = rng.below(size);
                let len = (1 + rng.below(40_000)).min(size - off);
                let data = pattern(rng.next(), len as usize);
                vol.write(off, Bytes::from(data.clone()), rng.below(4) == 0)
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed} op {op}: write {off}+{len}: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            4 => {
                let off = rng.below(size);
                let len = (1 + rng.below(60_000)).min(size - off);
                vol.write_zeroes(off, len, false)
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed} op {op}: zero {off}+{len}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            5 => vol.flush().await.unwrap(),
            6..=7 => {
                let off = rng.below(size);
                let len = (1 + rng.below(50_000)).min(size - off);
                let got = vol
                    .read(off, len)
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed} op {op}: read {off}+{len}: {e}"));
                assert!(
                    got[..] == model[off as usize..(off + len) as usize],
                    "seed {seed} op {op}: read {off}+{len} differs from the model (killed {killed:?})"
                );
            }
            8 => {
                if killed.len() < 2 {
                    let i = rng.below(7) as usize;
                    if cluster.is_running(i) {
                        cluster.kill(i);
                        killed.push(i);
                    }
                }
            }
            _ => {
                if let Some(i) = killed.pop() {
                    cluster.restart(i);
                    // Catch it up: only the stripes it missed are stale (delta, not a rebuild).
                    vol.retry_unreachable();
                    while vol.heal(1024).await > 0 {}
                }
            }
        }
    }
    for i in killed.drain(..) {
        cluster.restart(i);
    }
    vol.retry_unreachable();
    while vol.heal(1024).await > 0 {}
    check_labelled(&vol, &model, &format!("seed {seed} at the end")).await;
    let counts = (
        vol.stats.degraded_reads.load(Ordering::Relaxed),
        vol.stats.shards_rebuilt.load(Ordering::Relaxed),
    );
    // A new writer after everything: reconciliation keeps every byte.
    drop(vol);
    let vol = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT).await.unwrap();
    check_labelled(&vol, &model, &format!("seed {seed} after reopening")).await;
    counts
}
