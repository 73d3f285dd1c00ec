//! The block store as processes: a meta member, `continuum block` servers registering with a
//! heartbeat, volumes created with the CLI, a server killed with SIGKILL (degraded I/O goes
//! on), declared down after its grace period, and `continuum volume repair` restoring full
//! redundancy; then two more servers are killed and every byte still reads back.

mod common;

use common::blocks::Blocks;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use continuum_blockstore::cluster;
use continuum_blockstore::volume::Volume;
use continuum_proto::records_pb::Volume as VolumeRecord;

/// `GET /metrics` of block server `i`.
fn metrics(blocks: &Blocks, i: usize) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", blocks.metrics_ports[i])).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of a metric line that starts with `name{node="N"}`.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

fn cli(meta: &str, args: &[&str]) -> String {
    let out = Command::new(common::bin())
        .args(args)
        .args(["--endpoints", meta])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "continuum {args:?} failed: {text}");
    text
}

fn cli_fails(meta: &str, args: &[&str]) -> String {
    let out = Command::new(common::bin())
        .args(args)
        .args(["--endpoints", meta])
        .output()
        .unwrap();
    assert!(!out.status.success(), "continuum {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Opens a volume as its writer, as the gateway will: the writer lease, the record, the map.
async fn open_writer(
    meta: &continuum_meta_client::MetaClient,
    name: &str,
    holder: &str,
) -> (
    std::sync::Arc<Volume>,
    continuum_proto::records_pb::WriterLease,
) {
    let lease = meta.acquire_writer_lease(name, holder, 30).await.unwrap();
    let rec = meta
        .record::<VolumeRecord>(name)
        .await
        .unwrap()
        .unwrap()
        .record;
    let spec = cluster::spec_of(&rec).unwrap();
    let servers = cluster::cluster_map(meta).await.unwrap();
    let vol = Volume::open(spec, lease.epoch, &servers, Duration::from_secs(3))
        .await
        .unwrap();
    (vol, lease)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_servers_register_lose_one_and_repair_through_the_cli() {
    let meta_cluster = common::Cluster::start(1, &[]);
    meta_cluster.wait_leader(Duration::from_secs(20)).await;
    let meta_ep = meta_cluster.endpoints().join(",");
    let meta = meta_cluster.client();
    let mut blocks = Blocks::start(7, &meta_ep);
    let registered = common::wait_for(Duration::from_secs(30), || async {
        let n = cluster::alive_nodes(&meta).await.ok()?.len();
        (n == 7).then_some(())
    })
    .await;
    assert!(registered.is_some(), "7 block servers register");
    let nodes = cli(&meta_ep, &["node", "list"]);
    assert_eq!(nodes.matches(" up").count(), 7, "{nodes}");
    let status = cli(&meta_ep, &["status"]);
    assert!(
        status.contains("block servers: 7 up, 0 missing heartbeat"),
        "{status}"
    );

    // Volumes through the CLI; bad input is refused clearly.
    let created = cli(
        &meta_ep,
        &[
            "volume", "create", "disk-1", "--size", "4M", "--unit", "16K",
        ],
    );
    assert!(created.contains("EC 4+2"), "{created}");
    assert!(
        cli_fails(&meta_ep, &["volume", "create", "disk-1", "--size", "4M"])
            .contains("already exists")
    );
    assert!(
        cli_fails(&meta_ep, &["volume", "create", "bad", "--size", "1000"])
            .contains("multiple of 4096")
    );
    assert!(cli_fails(
        &meta_ep,
        &[
            "volume",
            "create",
            "bad",
            "--size",
            "4M",
            "--profile",
            "4-2"
        ]
    )
    .contains("K+M"));
    cli(&meta_ep, &["volume", "resize", "disk-1", "--size", "8M"]);
    assert!(
        cli_fails(&meta_ep, &["volume", "resize", "disk-1", "--size", "4M"]).contains("shrinking")
    );
    let list = cli(&meta_ep, &["volume", "list"]);
    assert!(list.contains("disk-1") && list.contains("8.0M"), "{list}");

    // A writer (as the gateway will be): take the lease, write, let it go.
    let size = 8 << 20;
    let model = pattern(3, size);
    {
        let (vol, lease) = open_writer(&meta, "disk-1", "test/1").await;
        vol.write(0, Bytes::from(model.clone()), false)
            .await
            .unwrap();
        vol.flush().await.unwrap();
        // Every block server took shard writes, and its metrics say so.
        let m = metrics(&blocks, 1);
        assert!(metric(&m, "continuum_block_writes_total") > 0, "{m}");
        assert_eq!(
            metric(&m, "continuum_block_checksum_errors_total"),
            0,
            "{m}"
        );
        assert_eq!(metric(&m, "continuum_block_capacity_bytes"), 1 << 30, "{m}");
        // kill -9 one server: I/O goes on, degraded.
        blocks.kill(2);
        let got = vol.read(0, size as u64).await.unwrap();
        assert!(got[..] == model[..], "degraded read");
        meta.lease_revoke(lease.lease_id).await.unwrap();
    }
    // Declared down after the grace period (its heartbeat lease expires first).
    let down = common::wait_for(Duration::from_secs(40), || async {
        let map = cluster::cluster_map(&meta).await.ok()?;
        map.iter().find(|s| s.id == 3 && !s.up).map(|_| ())
    })
    .await;
    assert!(down.is_some(), "server 3 declared down");
    assert!(cli(&meta_ep, &["node", "list"]).contains("down (shards moved)"));
    let status = cli(&meta_ep, &["status"]);
    assert!(status.contains("1 declared down [3]"), "{status}");

    // The server that declared it down repairs the detached volume by itself ...
    let logs = || -> String {
        (1..=7)
            .map(|i| {
                std::fs::read_to_string(blocks.dir.path().join(format!("block-{i}.log")))
                    .unwrap_or_default()
            })
            .collect()
    };
    let auto = common::wait_for(Duration::from_secs(60), || async {
        logs().contains("repaired detached volume").then_some(())
    })
    .await;
    assert!(
        auto.is_some(),
        "a block server repaired the volume:\n{}",
        logs()
    );
    // ... and once it let the writer lease go, a repair through the CLI finds nothing left.
    let repaired = common::wait_for(Duration::from_secs(60), || async {
        let out = Command::new(common::bin())
            .args(["volume", "repair", "disk-1", "--endpoints", &meta_ep])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .expect("the volume is repaired and its lease released");
    assert!(repaired.contains(" 0 shards rebuilt"), "{repaired}");
    assert!(repaired.contains(" 0 deferred"), "{repaired}");

    let scrubbed = cli(&meta_ep, &["volume", "scrub", "disk-1"]);
    assert!(
        scrubbed.contains("0 checksum errors, 0 parity mismatches"),
        "{scrubbed}"
    );

    // Full redundancy again: two more servers killed, every byte reads back.
    blocks.kill(0);
    blocks.kill(5);
    let (vol, lease) = open_writer(&meta, "disk-1", "test/2").await;
    let got = vol.read(0, size as u64).await.unwrap();
    assert!(
        got[..] == model[..],
        "all data after losing 3 servers (one repaired away)"
    );
    drop(vol);
    meta.lease_revoke(lease.lease_id).await.unwrap();

    // Deleting frees the volume (the unreachable servers keep orphans, reported).
    let deleted = cli(&meta_ep, &["volume", "delete", "disk-1"]);
    assert!(deleted.contains("deleted"), "{deleted}");
    assert!(!cli(&meta_ep, &["volume", "list"]).contains("disk-1"));
}
