//! The live workloads: block workers writing stamped blocks through real NBD connections
//! (FUA and FLUSH included) and checking every read, and meta workers running a register
//! workload (put, linearizable get, compare-and-swap) whose history is checked for
//! linearizability at the end.
//!
//! Each block worker owns a region of the volume and has one request in flight at a time, so
//! "newer" per block is well defined (DESIGN.md invariant 3; see `blocks.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use continuum_meta_client::{cmp, op, ClientConfig, MetaClient};
use continuum_proto::meta as api;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::nbd::{NbdClient, Reply};
use crate::blocks::{self, BlockChecker, BLOCK};
use crate::linear::{Call, Op, Ret};

/// Counters of the block workload.
#[derive(Debug, Default, serde::Serialize)]
pub struct BlockStats {
    pub writes: AtomicU64,
    pub write_errors: AtomicU64,
    pub reads: AtomicU64,
    pub read_errors: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_errors: AtomicU64,
    pub connections: AtomicU64,
    pub broken_connections: AtomicU64,
}

/// State the block workers share with the harness.
pub struct BlockShared {
    pub checker: Mutex<BlockChecker>,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    pub stats: BlockStats,
    pub stop: AtomicBool,
    /// Bumped by the harness each time it kills the gateway (a write abandoned across a
    /// bump was held by a process that is gone: not floating).
    pub gateway_generation: AtomicU64,
    pub first_violation: Mutex<Option<String>>,
}

impl Default for BlockShared {
    fn default() -> Self {
        Self {
            checker: Mutex::new(BlockChecker::new()),
            next_id: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            stats: BlockStats::default(),
            stop: AtomicBool::new(false),
            gateway_generation: AtomicU64::new(0),
            first_violation: Mutex::new(None),
        }
    }
}

/// Where a block worker writes.
#[derive(Clone, Debug)]
pub struct Region {
    pub first_block: u64,
    pub blocks: u64,
}

const MAX_BLOCKS_PER_IO: u64 = 12;

fn note_violation(shared: &BlockShared, v: &blocks::Violation) {
    let mut f = shared.first_violation.lock().expect("poisoned");
    if f.is_none() {
        *f = Some(v.to_string());
    }
}

/// Checks `data` (read from `first`) block by block against `tickets`.
fn check_read(shared: &BlockShared, tickets: Vec<blocks::ReadTicket>, data: &[u8]) {
    let mut c = shared.checker.lock().expect("poisoned");
    for (t, chunk) in tickets.into_iter().zip(data.chunks(BLOCK)) {
        if let Err(v) = c.read_completed(t, chunk) {
            note_violation(shared, &v);
        }
    }
}

/// One block worker: runs until `shared.stop`.
pub async fn block_worker(
    addr: String,
    export: String,
    region: Region,
    seed: u64,
    shared: Arc<BlockShared>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut conn: Option<(u64, NbdClient)> = None;
    let timeout = Duration::from_secs(60);
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((cid, c)) = conn.as_mut() else {
            match NbdClient::connect(&addr, &export, timeout).await {
                Ok(c) => {
                    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                    conn = Some((id, c));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            continue;
        };
        let cid = *cid;
        let n = rng.gen_range(1..=MAX_BLOCKS_PER_IO.min(region.blocks));
        let first = region.first_block + rng.gen_range(0..=region.blocks - n);
        let range: Vec<u64> = (first..first + n).collect();
        let dice: f64 = rng.gen();
        let broken = if dice < 0.55 {
            let fua = rng.gen_bool(0.3);
            let generation = shared.gateway_generation.load(Ordering::Acquire);
            let id = {
                let mut ck = shared.checker.lock().expect("poisoned");
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                ck.write_invoked(&range, id);
                id
            };
            let data = blocks::stamped(first, n as usize, id);
            shared.stats.writes.fetch_add(1, Ordering::Relaxed);
            match c.write(first * BLOCK as u64, &data, fua).await {
                Ok(Reply::Ok(_)) => {
                    let mut ck = shared.checker.lock().expect("poisoned");
                    ck.write_acked(cid, &range, id, fua);
                    false
                }
                Ok(Reply::Error(_)) => {
                    shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(_) => {
                    shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    if shared.gateway_generation.load(Ordering::Acquire) == generation {
                        let mut ck = shared.checker.lock().expect("poisoned");
                        ck.write_floating(&range, id);
                    }
                    true
                }
            }
        } else if dice < 0.9 {
            let tickets: Vec<_> = {
                let ck = shared.checker.lock().expect("poisoned");
                range.iter().map(|b| ck.read_invoked(*b)).collect()
            };
            shared.stats.reads.fetch_add(1, Ordering::Relaxed);
            match c
                .read(first * BLOCK as u64, (n as usize * BLOCK) as u32)
                .await
            {
                Ok(Reply::Ok(data)) => {
                    check_read(&shared, tickets, &data);
                    false
                }
                Ok(Reply::Error(_)) => {
                    shared.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(_) => {
                    shared.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    true
                }
            }
        } else {
            let ticket = shared.checker.lock().expect("poisoned").flush_invoked(cid);
            shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
            match c.flush().await {
                Ok(Reply::Ok(_)) => {
                    shared.checker.lock().expect("poisoned").flush_acked(ticket);
                    false
                }
                Ok(Reply::Error(_)) => {
                    shared.stats.flush_errors.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(_) => {
                    shared.stats.flush_errors.fetch_add(1, Ordering::Relaxed);
                    true
                }
            }
        };
        if broken {
            shared
                .stats
                .broken_connections
                .fetch_add(1, Ordering::Relaxed);
            conn = None;
        }
    }
}

/// Reads back every block ever written, in chunks, through a fresh connection (the final
/// sweep after healing). Returns the number of blocks checked.
pub async fn sweep(addr: &str, export: &str, shared: &BlockShared) -> anyhow::Result<u64> {
    let written: Vec<u64> = shared
        .checker
        .lock()
        .expect("poisoned")
        .written_blocks()
        .into_iter()
        .collect();
    let mut c = NbdClient::connect(addr, export, Duration::from_secs(60)).await?;
    for b in &written {
        let ticket = shared.checker.lock().expect("poisoned").read_invoked(*b);
        match c.read(b * BLOCK as u64, BLOCK as u32).await? {
            Reply::Ok(data) => check_read(shared, vec![ticket], &data),
            Reply::Error(e) => anyhow::bail!("final read of block {b} failed (NBD error {e})"),
        }
    }
    Ok(written.len() as u64)
}

/// Counters of the meta workload.
#[derive(Debug, Default, serde::Serialize)]
pub struct MetaStats {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub cas: AtomicU64,
    pub unknown: AtomicU64,
    pub failed_gets: AtomicU64,
}

/// State the meta workers share with the harness.
#[derive(Default)]
pub struct MetaShared {
    pub history: Mutex<Vec<Op>>,
    pub stats: MetaStats,
    pub stop: AtomicBool,
}

/// The registers the meta workers use.
pub fn register_key(i: usize) -> Vec<u8> {
    format!("chaos/live/r{i}").into_bytes()
}

/// One meta worker: sequential put / get / CAS on `keys` registers until `shared.stop`.
pub async fn meta_worker(
    endpoints: Vec<String>,
    worker: u64,
    keys: usize,
    seed: u64,
    start: Instant,
    shared: Arc<MetaShared>,
) {
    let mut cfg = ClientConfig::new(endpoints);
    cfg.request_timeout = Duration::from_secs(2);
    cfg.call_timeout = Duration::from_secs(5);
    let Ok(client) = MetaClient::new(cfg) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: HashMap<usize, Option<Vec<u8>>> = HashMap::new();
    let now = || start.elapsed().as_micros() as u64;
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let k = rng.gen_range(0..keys);
        let key = register_key(k);
        let value = format!("w{worker}-{n}").into_bytes();
        let dice: f64 = rng.gen();
        let invoke = now();
        let (call, ret) = if dice < 0.35 {
            shared.stats.puts.fetch_add(1, Ordering::Relaxed);
            let r = client.put(key.clone(), value.clone()).await;
            (Call::Put(value), r.ok().map(|_| Ret::Put))
        } else if dice < 0.7 {
            shared.stats.gets.fetch_add(1, Ordering::Relaxed);
            match client.get(key.clone()).await {
                Ok(kv) => {
                    let v = kv.map(|kv| kv.value);
                    seen.insert(k, v.clone());
                    (Call::Get, Some(Ret::Get(v)))
                }
                Err(_) => {
                    // A failed read changed nothing: it is left out of the history.
                    shared.stats.failed_gets.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        } else {
            shared.stats.cas.fetch_add(1, Ordering::Relaxed);
            let expect = seen.get(&k).cloned().flatten();
            let cmp = match &expect {
                Some(v) => cmp::value_eq(&key, v),
                None => cmp::absent(&key),
            };
            let r = client
                .txn(api::TxnRequest {
                    compare: vec![cmp],
                    success: vec![op::put(&key, value.clone(), 0)],
                    failure: vec![],
                })
                .await;
            (
                Call::Cas { expect, new: value },
                r.ok().map(|r| Ret::Cas(r.succeeded)),
            )
        };
        let (complete, ret) = match ret {
            Some(r) => (Some(now()), r),
            None => {
                shared.stats.unknown.fetch_add(1, Ordering::Relaxed);
                (None, Ret::Unknown)
            }
        };
        shared.history.lock().expect("poisoned").push(Op {
            key,
            call,
            invoke,
            complete,
            ret,
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
    }
}
