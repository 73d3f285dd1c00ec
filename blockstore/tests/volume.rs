//! The volume client against real block servers: a model-checked workload with server kills,
//! the write hole, stale writers, bit rot and repair.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, Rng};
use continuum_blockstore::volume::{ServerInfo, Volume, VolumeError, VolumeSpec};

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
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
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
        vol.write(*off, Bytes::from(data.clone()), i % 2 == 0)
            .await
            .unwrap();
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
    let vol = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
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
    assert!(
        degraded > 0 && rebuilt > 0,
        "degraded reads {degraded}, shards rebuilt {rebuilt}"
    );
}

/// Waits (with a deadline) until only servers that are down hold stale shards.
async fn healed(vol: &Volume, cluster: &Cluster) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        vol.retry_unreachable();
        vol.heal(4096).await;
        let degraded = vol.degraded();
        let waiting: Vec<u64> = degraded
            .keys()
            .copied()
            .filter(|id| cluster.is_running(*id as usize - 1))
            .collect();
        if waiting.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "running servers {waiting:?} still hold stale shards: {degraded:?}"
        );
        tokio::task::yield_now().await;
    }
}

async fn dump(vol: &Volume, e: &VolumeError, killed: &[usize]) {
    if let VolumeError::Unavailable { stripe, .. } = e {
        let (servers, infos, cached) = vol.inspect_stripe(*stripe).await.unwrap();
        eprintln!("stripe {stripe} on {servers:?} (killed {killed:?}), cached {cached:?}");
        for (p, i) in infos.iter().enumerate() {
            eprintln!("  pos {p}: {i:?}");
        }
    }
}

/// Returns (degraded reads, shards rebuilt).
async fn run_workload(seed: u64, ops: usize) -> (u64, u64) {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    eprintln!("=== seed {seed}");
    let mut cluster = Cluster::start(7);
    let size = 512 * 1024;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    let mut model = vec![0u8; size as usize];
    let mut killed: Vec<usize> = Vec::new();
    for op in 0..ops {
        match rng.below(10) {
            0..=3 => {
                let off = rng.below(size);
                let len = (1 + rng.below(40_000)).min(size - off);
                let data = pattern(rng.next(), len as usize);
                if let Err(e) = vol
                    .write(off, Bytes::from(data.clone()), rng.below(4) == 0)
                    .await
                {
                    dump(&vol, &e, &killed).await;
                    panic!("seed {seed} op {op}: write {off}+{len}: {e}");
                }
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
                let got = match vol.read(off, len).await {
                    Ok(g) => g,
                    Err(e) => {
                        dump(&vol, &e, &killed).await;
                        panic!("seed {seed} op {op}: read {off}+{len}: {e}")
                    }
                };
                assert!(
                    got[..] == model[off as usize..(off + len) as usize],
                    "seed {seed} op {op}: read {off}+{len} differs from the model (killed {killed:?})"
                );
            }
            8 => {
                if killed.len() < 2 {
                    let i = rng.below(7) as usize;
                    if cluster.is_running(i) {
                        eprintln!("op {op}: kill {i}");
                        cluster.kill(i);
                        killed.push(i);
                    }
                }
            }
            _ => {
                if let Some(i) = killed.pop() {
                    eprintln!("op {op}: restart {i}");
                    cluster.restart(i);
                    // Catch it up: only the stripes it missed are stale (delta, not a rebuild).
                    healed(&vol, &cluster).await;
                }
            }
        }
    }
    for i in killed.drain(..) {
        cluster.restart(i);
    }
    healed(&vol, &cluster).await;
    check_labelled(&vol, &model, &format!("seed {seed} at the end")).await;
    let counts = (
        vol.stats.degraded_reads.load(Ordering::Relaxed),
        vol.stats.shards_rebuilt.load(Ordering::Relaxed),
    );
    // A new writer after everything: reconciliation keeps every byte.
    drop(vol);
    let vol = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    check_labelled(&vol, &model, &format!("seed {seed} after reopening")).await;
    counts
}

/// The writer crashes between the shard writes of partial-stripe writes, then one more server
/// is lost: every block reads as its old or its new value, and all acknowledged data is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_hole_is_closed() {
    let mut cluster = Cluster::start(6);
    let size = 256 * 1024;
    let old = pattern(1, size as usize);
    {
        let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
            .await
            .unwrap();
        vol.write(0, Bytes::from(old.clone()), true).await.unwrap();
    }
    let mut model = old.clone();
    let mut epoch = 2;
    // (offset, len, shard writes before the crash): one data shard of a 4 KiB write; a write
    // over two data shards cut after the first, or after both (no parity).
    let cases = [
        (4096u64, 4096u64, 1usize),
        (65536 + 12288, 8192, 1),
        (131072 + 12288, 8192, 2),
        (196608, 4096, 2),
    ];
    for (i, &(off, len, after)) in cases.iter().enumerate() {
        let new = pattern(100 + i as u64, len as usize);
        let vol = Volume::open(spec(size), epoch, &cluster.servers(), TIMEOUT)
            .await
            .unwrap();
        epoch += 1;
        vol.failpoints
            .crash_after_shard_writes
            .store(after, Ordering::Relaxed);
        let err = vol
            .write(off, Bytes::from(new.clone()), true)
            .await
            .unwrap_err();
        assert!(matches!(err, VolumeError::Crashed { .. }), "{err}");
        drop(vol);
        // One more server is lost before the next writer takes over.
        let victim = i % 6;
        cluster.kill(victim);
        let vol = Volume::open(spec(size), epoch, &cluster.servers(), TIMEOUT)
            .await
            .unwrap();
        epoch += 1;
        let got = vol.read(0, size).await.unwrap();
        let (a, b) = (off as usize, (off + len) as usize);
        assert!(
            got[..a] == model[..a] && got[b..] == model[b..],
            "case {i}: acknowledged data changed"
        );
        for blk in (a..b).step_by(4096) {
            let g = &got[blk..blk + 4096];
            let was = &model[blk..blk + 4096];
            let now = &new[blk - a..blk - a + 4096];
            assert!(
                g == was || g == now,
                "case {i}: block at {blk} is neither old nor new"
            );
        }
        model.copy_from_slice(&got);
        // The reconciled stripe stays consistent when the lost server returns and another goes.
        drop(vol);
        cluster.restart(victim);
        let vol = Volume::open(spec(size), epoch, &cluster.servers(), TIMEOUT)
            .await
            .unwrap();
        epoch += 1;
        vol.repair_all(0).await.unwrap();
        cluster.kill((victim + 3) % 6);
        check_labelled(&vol, &model, &format!("case {i} after repair")).await;
        cluster.restart((victim + 3) % 6);
    }
}

/// Writer A loses its lease to writer B (higher epoch): every later write of A is refused by
/// the block servers and B's data is never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writer_is_fenced_everywhere() {
    let cluster = Cluster::start(6);
    let size = 512 * 1024;
    let a = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    a.write(0, Bytes::from(vec![0xaa; 8192]), false)
        .await
        .unwrap();
    let b = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    b.write(0, Bytes::from(vec![0xbb; 4096]), false)
        .await
        .unwrap();
    // A writes over B's data, and to a stripe B never touched: both refused by the servers.
    for off in [0u64, 300 * 1024] {
        let err = a
            .write(off, Bytes::from(vec![0xcc; 4096]), false)
            .await
            .unwrap_err();
        assert!(matches!(err, VolumeError::Fenced { .. }), "{err}");
    }
    assert!(matches!(a.flush().await, Err(VolumeError::Fenced { .. })));
    let got = b.read(0, 8192).await.unwrap();
    assert!(got[..4096].iter().all(|x| *x == 0xbb));
    assert!(got[4096..].iter().all(|x| *x == 0xaa));
    assert!(b
        .read(300 * 1024, 4096)
        .await
        .unwrap()
        .iter()
        .all(|x| *x == 0));
    // A writer with an even older epoch cannot even open.
    let err = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, VolumeError::Fenced { .. }), "{err}");
}

/// `err` is a refused flush that counted `failed` missing shards of a stripe (limit 2).
fn expect_flush_incomplete(err: VolumeError, failed: usize) {
    assert!(
        matches!(err, VolumeError::FlushIncomplete { failed: f, limit: 2, .. } if f == failed),
        "{err}"
    );
}

/// A FLUSH stands on the servers that answered only while at most m failed: beyond that some
/// stripe may hold fewer than k durable shards, and the flush fails (it is retried, and
/// succeeds once the servers are back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_more_than_m_servers_fail_is_not_acknowledged() {
    let mut cluster = Cluster::start(6);
    let size = 1024 * 1024;
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    // The opening verification pass flushes when it is done: let it finish first, so the
    // writes below are still unsynced when the servers go.
    while vol.unverified() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Small writes all over: every server holds a shard of them and has writes to sync.
    for i in 0..64u64 {
        vol.write(i * 16 * 1024, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
    }
    for i in 0..3 {
        cluster.kill(i);
    }
    expect_flush_incomplete(vol.flush().await.unwrap_err(), 3);
    for i in 0..3 {
        cluster.restart(i);
    }
    vol.retry_unreachable();
    vol.flush().await.unwrap();
}

/// A stripe that already lacks a shard (its server is declared down and there is no spare
/// host to rebuild it on) stands on k + m - 1 shards: a flush that two more servers fail
/// leaves its new writes on fewer than k durable shards and must not be acknowledged. (It
/// was: only the servers that failed the flush were counted, and stabilizing the writes on
/// the others then threw away the last state that k shards could rebuild.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_counts_the_shards_a_degraded_stripe_already_lacks() {
    let mut cluster = Cluster::start(6);
    let size = 1024 * 1024;
    let mut s = spec(size);
    s.members = (1..=6).collect();
    let vol = Volume::open(s, 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    while vol.unverified() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut model = pattern(31, size as usize);
    vol.write(0, Bytes::from(model.clone()), false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    // Server 3 is gone for good; with six hosts for 4+2 there is nowhere to move its shards.
    cluster.kill(2);
    let mut map = cluster.servers();
    map[2].up = false;
    vol.set_servers(&map);
    let write_all_over = |vol_model: &mut Vec<u8>, seed: u64| {
        (0..64u64)
            .map(|i| {
                let off = i * 16 * 1024 + 4096;
                let data = pattern(seed + i, 4096);
                vol_model[off as usize..off as usize + 4096].copy_from_slice(&data);
                (off, data)
            })
            .collect::<Vec<_>>()
    };
    for (off, data) in write_all_over(&mut model, 100) {
        vol.write(off, Bytes::from(data), false).await.unwrap();
    }
    // One shard short everywhere: a flush all the others answer stands.
    vol.flush().await.unwrap();
    for (off, data) in write_all_over(&mut model, 200) {
        vol.write(off, Bytes::from(data), false).await.unwrap();
    }
    cluster.kill(0);
    cluster.kill(4);
    expect_flush_incomplete(vol.flush().await.unwrap_err(), 3);
    cluster.restart(0);
    cluster.restart(4);
    vol.retry_unreachable();
    vol.flush().await.unwrap();
    check_all(&vol, &model).await;
}

/// A new writer that cannot fence enough servers (more than min(k-1, m) unreachable, where an
/// old writer might still reach them and complete writes) refuses to open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_cannot_fence_enough_servers_does_not_open() {
    let mut cluster = Cluster::start(6);
    let size = 256 * 1024;
    for i in 0..2 {
        cluster.kill(i);
    }
    // 2 of 6 unreachable: it fences 4 and records on k = 4 that it opened.
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    drop(vol);
    // 3 unreachable: an old writer reaching them could complete a partial write there (it
    // touches m+1 = 3 positions), and the record that this epoch opened could not reach k
    // servers: it does not open.
    cluster.kill(2);
    let err = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::FenceIncomplete {
                unfenced: 3,
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
    cluster.kill(3);
    let err = Volume::open(spec(size), 3, &cluster.servers(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::FenceIncomplete {
                unfenced: 4,
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
}

/// Flips bytes in one server's shard file on disk.
fn rot(path: &std::path::Path) -> usize {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut flipped = 0;
    let mut block = vec![0u8; 4096];
    for off in (4096..len).step_by(4096) {
        f.read_exact_at(&mut block, off).unwrap();
        if block.iter().any(|b| *b != 0) {
            block[100] ^= 0x5a;
            f.write_all_at(&block, off).unwrap();
            flipped += 1;
        }
    }
    flipped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_rot_is_found_by_reads_and_the_scrubber_and_repaired() {
    let mut cluster = Cluster::start(6);
    let size = 512 * 1024;
    let model = pattern(9, size as usize);
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    vol.write(0, Bytes::from(model.clone()), true)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    // Rot every block on server 1: reads detect it and still return the right bytes.
    let flipped = rot(&cluster.data_dir(0).join("data"));
    assert!(flipped > 0);
    check_all(&vol, &model).await;
    let found_by_reads = vol.stats.checksum_errors.load(Ordering::Relaxed);
    assert!(found_by_reads > 0, "reads counted the corrupt blocks");
    // The background healer (or this call) rebuilds what the reads found.
    while vol.heal(1024).await > 0 {}
    // Rot server 2 now: only the scrubber finds it (nothing reads it).
    let flipped = rot(&cluster.data_dir(1).join("data"));
    assert!(flipped > 0);
    let report = vol.scrub(0).await.unwrap();
    assert!(report.checksum_errors > 0, "{report:?}");
    assert!(
        report.shards_rebuilt >= report.checksum_errors,
        "{report:?}"
    );
    // A second scrub finds nothing left to fix.
    let again = vol.scrub(0).await.unwrap();
    assert_eq!(
        (
            again.checksum_errors,
            again.parity_mismatches,
            again.shards_rebuilt
        ),
        (0, 0, 0),
        "{again:?}"
    );
    // The repaired shards are really there: lose two other servers, everything still reads.
    cluster.kill(2);
    cluster.kill(3);
    check_all(&vol, &model).await;
}

/// A shard whose bytes pass their checksums but are wrong (what a misdirected or lost write
/// under a sealed block looks like): the scrubber finds the stripe inconsistent, locates the
/// wrong shard with the two parities, and rebuilds it, instead of "fixing" the parity to match
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrubber_locates_a_wrong_shard_that_passes_its_checksums() {
    use continuum_blockstore::checksum;
    use continuum_blockstore::client::BlockClient;
    use continuum_blockstore::store::{ObjectKey, WriteMode, WriteReq};
    let cluster = Cluster::start(6);
    let size = 256 * 1024;
    let model = pattern(5, size as usize);
    let spec = spec(size);
    let vol = Volume::open(spec.clone(), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    vol.write(0, Bytes::from(model.clone()), true)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    for (stripe, pos) in [(1u64, 2usize), (2, 5)] {
        let (servers, infos, _) = vol.inspect_stripe(stripe).await.unwrap();
        let version = infos[pos].as_ref().expect("shard exists").version;
        let addr = cluster
            .servers()
            .into_iter()
            .find(|s| s.id == servers[pos])
            .unwrap()
            .addr;
        let wrong = Bytes::from(pattern(77 + stripe, spec.unit as usize));
        let req = WriteReq {
            object: ObjectKey {
                volume: spec.id,
                stripe,
                shard: pos as u32,
            },
            epoch: 1,
            version,
            base: version,
            mode: WriteMode::Install,
            offset: 0,
            length: spec.unit,
            crcs: checksum::compute(&wrong),
            fua: true,
            write_set: 0,
            data_base: vec![],
            data_after: vec![],
            return_old: false,
        };
        BlockClient::new(addr, TIMEOUT)
            .write(&req, wrong, &[])
            .await
            .unwrap();
    }
    let report = vol.scrub(0).await.unwrap();
    assert_eq!(report.checksum_errors, 0, "{report:?}");
    assert_eq!(report.parity_mismatches, 2, "{report:?}");
    assert_eq!(report.shards_rebuilt, 2, "{report:?}");
    check_labelled(&vol, &model, "after the scrub").await;
    let again = vol.scrub(0).await.unwrap();
    assert_eq!(
        (again.parity_mismatches, again.shards_rebuilt),
        (0, 0),
        "{again:?}"
    );
}

/// restores full redundancy on the others while a workload runs; then m more servers are
/// killed and all data still reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_restores_redundancy_after_a_server_is_lost_for_good() {
    let mut cluster = Cluster::start(8);
    let size = 1 << 20;
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    let mut model = pattern(5, size as usize);
    vol.write(0, Bytes::from(model.clone()), true)
        .await
        .unwrap();
    cluster.kill(4);
    cluster.down[4] = true;
    vol.set_servers(&cluster.servers());
    // A workload on the first half while the repair runs.
    let writer = {
        let vol = vol.clone();
        tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..40u64 {
                let off = (i * 12_345) % (size / 2);
                let data = pattern(1000 + i, 5000);
                vol.write(off, Bytes::from(data.clone()), false)
                    .await
                    .unwrap();
                written.push((off, data));
            }
            written
        })
    };
    let report = vol.repair_all(0).await.unwrap();
    for (off, data) in writer.await.unwrap() {
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    assert!(report.shards_rebuilt > 0, "{report:?}");
    assert_eq!(report.deferred, 0, "{report:?}");
    assert_eq!(
        vol.stats.pass_stripes_done.load(Ordering::Relaxed),
        vol.stats.pass_stripes_total.load(Ordering::Relaxed)
    );
    // Full redundancy: two more servers lost, every byte still reads.
    cluster.kill(0);
    cluster.kill(6);
    check_all(&vol, &model).await;
}

/// Six servers for 4+2 and one declared down: there is no seventh host to move its shards to,
/// so they stay where they are, unavailable, and I/O goes on degraded (it must not fail). When
/// a seventh server is added, repair moves them there and redundancy is whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_declared_down_with_no_spare_host_degrades_io_instead_of_failing_it() {
    let mut cluster = Cluster::start(7);
    cluster.kill(6);
    let six: Vec<ServerInfo> = cluster.servers().into_iter().take(6).collect();
    let size = 1 << 20;
    // The volume's placement members are the six servers it was created on.
    let mut s = spec(size);
    s.members = (1..=6).collect();
    let vol = Volume::open(s, 1, &six, TIMEOUT).await.unwrap();
    let mut model = pattern(8, size as usize);
    vol.write(0, Bytes::from(model.clone()), true)
        .await
        .unwrap();
    cluster.kill(2);
    let mut map = six.clone();
    map[2].up = false;
    vol.set_servers(&map);
    for i in 0..20u64 {
        let off = (i * 40_961) % (size - 5000);
        let data = pattern(300 + i, 5000);
        vol.write(off, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    check_all(&vol, &model).await;
    let report = vol.repair_all(0).await.unwrap();
    assert!(report.deferred > 0, "nowhere to rebuild yet: {report:?}");
    // A seventh host: placement moves the lost shards to it and repair rebuilds them.
    cluster.restart(6);
    let mut map = cluster.servers();
    map[2].up = false;
    vol.set_servers(&map);
    let report = vol.repair_all(0).await.unwrap();
    assert_eq!(report.deferred, 0, "{report:?}");
    assert!(report.shards_rebuilt > 0, "{report:?}");
    // Whole again: two more servers lost, every byte still reads.
    cluster.kill(0);
    cluster.kill(4);
    check_all(&vol, &model).await;
}

/// A write that skipped two shards of a stripe (their servers were away) lives only on the
/// shards that took it. When those two come back and the parity that holds the write goes
/// away, a fresh look at the stripe sees only shards that agree with each other on the old
/// state: the writer must not believe them over what it knows (it skipped them), or it serves
/// the old bytes of an acknowledged write (found by the live chaos run, seed 7 in CI: a WAN
/// link losing packets made edge servers flap while the heal and scrub tasks re-learned
/// stripes). The stripe is unavailable until the parity returns, then whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_never_forgets_the_shards_it_skipped() {
    let mut cluster = Cluster::start(6);
    let size = 64 * 1024; // one stripe: 4 data units of 16 KiB, then 2 parity
    let vol = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    let mut model = pattern(21, size as usize);
    vol.write(0, Bytes::from(model.clone()), true)
        .await
        .unwrap();
    let (servers, _, _) = vol.inspect_stripe(0).await.unwrap();
    let at = |pos: usize| servers[pos] as usize - 1;
    // Data shard 1 and parity 4 away: a 4 KiB write into shard 1 lands on parity 5 only (the
    // untouched data shards 0, 2 and 3 make up k with it).
    cluster.kill(at(1));
    cluster.kill(at(4));
    let new = pattern(22, 4096);
    vol.write(16384, Bytes::from(new.clone()), true)
        .await
        .unwrap();
    model[16384..16384 + 4096].copy_from_slice(&new);
    // They return; parity 5, the one shard with the write, goes.
    cluster.restart(at(1));
    cluster.restart(at(4));
    cluster.kill(at(5));
    vol.retry_unreachable();
    // Neither the heal task nor a scrub may take the returned shards for current.
    vol.heal(16).await;
    let scrubbed = vol.scrub(0).await.unwrap();
    assert_eq!(scrubbed.deferred, 1, "{scrubbed:?}");
    vol.repair_stripe(0).await.unwrap_err();
    match vol.read(16384, 4096).await {
        Ok(got) => assert!(
            got == new,
            "an acknowledged write was lost: the read returned older bytes"
        ),
        Err(e) => assert!(matches!(e, VolumeError::Unavailable { .. }), "{e}"),
    }
    // Parity 5 back: the stripe is rebuilt and whole.
    cluster.restart(at(5));
    vol.retry_unreachable();
    vol.heal(16).await;
    assert!(vol.degraded().is_empty(), "{:?}", vol.degraded());
    check_all(&vol, &model).await;
    // Whole: any two servers lost, every byte still reads.
    cluster.kill(at(0));
    cluster.kill(at(5));
    check_all(&vol, &model).await;
}

/// A writer that opens while a stripe's last write cannot be decided (a server of its write
/// set is away after the previous writer crashed mid-write) serves no I/O from that stripe.
/// The writer after it must not take the stripe's unstable versions for leftovers the
/// opened writer served without: an acknowledged FUA write below the undecided one must
/// survive (chaos seed 281 on build 5159e7c; `docs/plans/issue-3.md`, session 13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_stripe_keeps_its_acknowledged_writes_across_writers() {
    let mut cluster = Cluster::start(6);
    let size = 64 * 1024; // one stripe: d0..d3 of 16 KiB, then p4, p5
    let mut model = pattern(41, size as usize);
    let a = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    a.write(0, Bytes::from(model.clone()), true).await.unwrap();
    a.flush().await.unwrap();
    let (servers, _, _) = a.inspect_stripe(0).await.unwrap();
    // W1: acknowledged with FUA, on d3, p4 and p5.
    let w1 = pattern(42, 4096);
    a.write(48 * 1024, Bytes::from(w1.clone()), true)
        .await
        .unwrap();
    model[48 * 1024..52 * 1024].copy_from_slice(&w1);
    // W2 over d1 and d2: the writer crashes after its first shard write.
    a.failpoints
        .crash_after_shard_writes
        .store(1, Ordering::Relaxed);
    let err = a
        .write(28 * 1024, Bytes::from(pattern(43, 8192)), false)
        .await
        .unwrap_err();
    assert!(matches!(err, VolumeError::Crashed { .. }), "{err}");
    drop(a);
    // p4's server is away: W2 cannot be decided (the shards that hold it and p4 could make k).
    let p4 = (servers[4] - 1) as usize;
    cluster.kill(p4);
    let b = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT).await;
    drop(b);
    cluster.restart(p4);
    let c = Volume::open(spec(size), 3, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    let got = c.read(48 * 1024, 4096).await.unwrap();
    assert!(got[..] == w1[..], "the FUA-acknowledged write W1 was lost");
    let got = c.read(0, size).await.unwrap();
    for blk in (0..size as usize).step_by(4096) {
        let in_w2 = (28 * 1024..36 * 1024).contains(&blk);
        assert!(
            in_w2 || got[blk..blk + 4096] == model[blk..blk + 4096],
            "block at {blk} changed"
        );
    }
}

/// A small write without FUA is acknowledged once its data shard holds it, before its parity
/// is written (a write behind). Until the parity is written, reads of the stripe and flushes
/// wait for it; once a flush returned, the write survives the loss of m servers, its data
/// shard's among them, and a new writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_is_acknowledged_before_its_parity_and_flushed_with_it() {
    let mut cluster = Cluster::start(6);
    let size = 64 * 1024; // one stripe: d0..d3 of 16 KiB, then p4, p5
    let mut model = pattern(51, size as usize);
    let a = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    a.write(0, Bytes::from(model.clone()), true).await.unwrap();
    a.flush().await.unwrap();
    let (servers, _, _) = a.inspect_stripe(0).await.unwrap();
    a.failpoints.hold_parity.store(true, Ordering::Release);
    let new = pattern(52, 4096);
    let at = 16 * 1024 + 4096; // in d1
    tokio::time::timeout(
        Duration::from_secs(10),
        a.write(at, Bytes::from(new.clone()), false),
    )
    .await
    .expect("acknowledged while its parity is held")
    .unwrap();
    model[at as usize..at as usize + 4096].copy_from_slice(&new);
    let held = Duration::from_millis(300);
    assert!(
        tokio::time::timeout(held, a.read(0, 4096)).await.is_err(),
        "a read of the stripe went on before the parity was written"
    );
    assert!(
        tokio::time::timeout(held, a.flush()).await.is_err(),
        "a flush returned before the write behind was finished"
    );
    a.failpoints.release_parity();
    a.flush().await.unwrap();
    check_all(&a, &model).await;
    // The data shard that took the write, and one more, are lost; a new writer reads it back
    // from the parity.
    cluster.kill((servers[1] - 1) as usize);
    cluster.kill((servers[0] - 1) as usize);
    drop(a);
    let b = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    check_all(&b, &model).await;
}

/// A write behind is acknowledged only while k shards hold the new state without its parity
/// (every data shard current): with a data shard away, a small write answers only once its
/// parity is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_waits_for_its_parity_while_a_data_shard_is_away() {
    let mut cluster = Cluster::start(6);
    let size = 64 * 1024;
    let mut model = pattern(61, size as usize);
    let a = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    a.write(0, Bytes::from(model.clone()), true).await.unwrap();
    a.flush().await.unwrap();
    let (servers, _, _) = a.inspect_stripe(0).await.unwrap();
    // d0's server is gone, and the writer knows (a degraded read marked d0 stale).
    cluster.kill((servers[0] - 1) as usize);
    assert_eq!(&a.read(0, 4096).await.unwrap()[..], &model[..4096]);
    a.failpoints.hold_parity.store(true, Ordering::Release);
    let at = 16 * 1024 + 8192; // in d1
    let new = pattern(62, 4096);
    let write = a.write(at, Bytes::from(new.clone()), false);
    tokio::pin!(write);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut write)
            .await
            .is_err(),
        "acknowledged with d1 and two untouched data shards only"
    );
    a.failpoints.release_parity();
    write.await.unwrap();
    model[at as usize..at as usize + 4096].copy_from_slice(&new);
    a.flush().await.unwrap();
    check_all(&a, &model).await;
}

/// A write behind whose writer is replaced before its parity is written is not lost: the
/// data shards held k shards of its state, so the next writer rolls it forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_outlives_its_writer_being_replaced_before_its_parity() {
    let cluster = Cluster::start(6);
    let size = 64 * 1024;
    let mut model = pattern(71, size as usize);
    let a = Volume::open(spec(size), 1, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    a.write(0, Bytes::from(model.clone()), true).await.unwrap();
    a.flush().await.unwrap();
    a.failpoints.hold_parity.store(true, Ordering::Release);
    let at = 32 * 1024 + 4096; // in d2
    let new = pattern(72, 4096);
    tokio::time::timeout(
        Duration::from_secs(10),
        a.write(at, Bytes::from(new.clone()), false),
    )
    .await
    .expect("acknowledged while its parity is held")
    .unwrap();
    model[at as usize..at as usize + 4096].copy_from_slice(&new);
    // Writer B fences the servers; A's parity writes are refused when they go.
    let b = Volume::open(spec(size), 2, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    a.failpoints.release_parity();
    let err = a.flush().await.unwrap_err();
    assert!(matches!(err, VolumeError::Fenced { .. }), "{err}");
    check_all(&b, &model).await;
    // B rolled it forward (the parity it lacks is rebuilt); once the stripe is whole again,
    // a degraded read of d2 (its server gone) reconstructs it.
    let report = b.repair_all(0).await.unwrap();
    assert_eq!(report.deferred, 0, "{report:?}");
    b.flush().await.unwrap();
    drop(a);
    let (servers, _, _) = b.inspect_stripe(0).await.unwrap();
    drop(b);
    let mut cluster = cluster;
    cluster.kill((servers[2] - 1) as usize);
    let c = Volume::open(spec(size), 3, &cluster.servers(), TIMEOUT)
        .await
        .unwrap();
    check_all(&c, &model).await;
}
