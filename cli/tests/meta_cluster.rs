//! Multi-process tests of the meta service: real processes, real RocksDB, SIGKILL, partitions
//! (by dropping Raft traffic in the transport), membership changes, snapshots, watches, leases.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{put_acked, wait_for, Cluster};
use continuum_meta_client::{Error, MetaClient};
use continuum_proto::meta::{event::EventType, RangeRequest};

const LEADER_TIMEOUT: Duration = Duration::from_secs(20);

async fn count_prefix(client: &MetaClient, prefix: &str) -> BTreeSet<String> {
    let kvs = client
        .get_prefix(prefix.as_bytes().to_vec())
        .await
        .expect("range");
    kvs.into_iter()
        .map(|kv| {
            assert_eq!(kv.key, kv.value, "value of {:?} is wrong", kv.key);
            String::from_utf8(kv.key).unwrap()
        })
        .collect()
}

async fn write_many(client: &MetaClient, prefix: &str, n: usize) -> BTreeSet<String> {
    let mut tasks = Vec::new();
    for t in 0..16 {
        let client = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            for i in (t..n).step_by(16) {
                let k = format!("{prefix}{i:05}");
                put_acked(&client, &k, &k).await;
                keys.push(k);
            }
            keys
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_puts_survive_leader_kill_and_full_restart() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(LEADER_TIMEOUT).await;
    let client = c.client();
    let acked = write_many(&client, "acked/", 1000).await;
    assert_eq!(acked.len(), 1000);

    let li = c.index_of(leader);
    c.kill(li);
    let new_leader = c.wait_leader(LEADER_TIMEOUT).await;
    assert_ne!(new_leader, leader, "a killed member cannot lead");
    assert_eq!(
        count_prefix(&client, "acked/").await,
        acked,
        "acked puts lost after leader kill"
    );

    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.spawn(i, false);
    }
    c.wait_leader(LEADER_TIMEOUT).await;
    assert_eq!(
        count_prefix(&client, "acked/").await,
        acked,
        "acked puts lost after restart of all"
    );
    // The restarted cluster still accepts writes.
    put_acked(&client, "after-restart", "after-restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_cannot_commit_or_serve_stale_reads() {
    let c = Cluster::start(3, &["--enable-fault-injection"]);
    let leader = c.wait_leader(LEADER_TIMEOUT).await;
    let client = c.client();
    put_acked(&client, "k", "before").await;

    // Cut the leader off from both followers, in both directions.
    let li = c.index_of(leader);
    let others: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != leader)
        .collect();
    set_fault(&c.nodes[li].peer, &others).await;
    for id in &others {
        set_fault(&c.nodes[c.index_of(*id)].peer, &[leader]).await;
    }

    // The majority elects a new leader and commits.
    let majority = MetaClient::connect(
        &others
            .iter()
            .map(|id| c.nodes[c.index_of(*id)].client.clone())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let new_leader = wait_for(LEADER_TIMEOUT, || {
        let majority = majority.clone();
        async move {
            majority
                .status()
                .await
                .ok()
                .filter(|s| s.leader_id != 0 && s.leader_id != leader)
                .map(|s| s.leader_id)
        }
    })
    .await
    .expect("the majority elects a new leader");
    assert_ne!(new_leader, leader);
    put_acked(&majority, "k", "after").await;

    // The isolated old leader can neither commit nor answer a linearizable read.
    let isolated = c.client_of(li, Duration::from_secs(4));
    let put = isolated.put(b"k".to_vec(), b"minority".to_vec()).await;
    assert!(put.is_err(), "minority committed a write: {put:?}");
    let read = isolated.get(b"k".to_vec()).await;
    assert!(
        read.is_err(),
        "minority served a linearizable read: {read:?} (stale value would be 'before')"
    );

    // Heal: the old leader rejoins and sees the majority's value; its write never happened.
    set_fault(&c.nodes[li].peer, &[]).await;
    for id in &others {
        set_fault(&c.nodes[c.index_of(*id)].peer, &[]).await;
    }
    let v = wait_for(LEADER_TIMEOUT, || {
        let client = client.clone();
        async move { client.get(b"k".to_vec()).await.ok().flatten() }
    })
    .await
    .expect("read after healing");
    assert_eq!(v.value, b"after");
    let serial = wait_for(LEADER_TIMEOUT, || {
        let isolated = c.client_of(li, Duration::from_secs(2));
        async move {
            let r = isolated
                .range(RangeRequest {
                    key: b"k".to_vec(),
                    serializable: true,
                    ..Default::default()
                })
                .await
                .ok()?;
            r.kvs.into_iter().next().filter(|kv| kv.value == b"after")
        }
    })
    .await;
    assert!(serial.is_some(), "the healed member never caught up");
}

async fn set_fault(peer_addr: &str, block: &[u64]) {
    use continuum_proto::meta::raft_client::RaftClient;
    let mut client = RaftClient::connect(format!("http://{peer_addr}"))
        .await
        .expect("connect peer port");
    let spec = format!(
        "block={}",
        block
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut req = tonic::Request::new(tokio_stream::empty());
    req.metadata_mut()
        .insert("x-continuum-fault", spec.parse().unwrap());
    client.send(req).await.expect("fault injection accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_while_writes_go_on() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(LEADER_TIMEOUT).await;
    let client = c.client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = BTreeSet::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let k = format!("m/{i:06}");
                put_acked(&client, &k, &k).await;
                acked.insert(k);
                i += 1;
            }
            acked
        })
    };

    // Add member 4 as a learner, start it, wait for it to catch up, promote it.
    let i4 = c.add_node(4, &[]);
    let (peer, cl) = (c.nodes[i4].peer.clone(), c.nodes[i4].client.clone());
    let ms = client
        .member_add(continuum_proto::meta::Member {
            id: 4,
            peer_addr: peer,
            client_addr: cl.clone(),
            is_learner: true,
        })
        .await
        .expect("add learner");
    assert!(ms.iter().any(|m| m.id == 4 && m.is_learner));
    c.spawn(i4, true);
    let promoted = wait_for(Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.member_promote(4).await.ok() }
    })
    .await
    .expect("learner 4 catches up and is promoted");
    assert!(promoted.iter().any(|m| m.id == 4 && !m.is_learner));

    // Remove voter 1 (possibly the leader: it hands over first).
    let after = wait_for(Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.member_remove(1).await.ok() }
    })
    .await
    .expect("member 1 removed");
    assert!(!after.iter().any(|m| m.id == 1));
    let i1 = c.index_of(1);
    let exited = wait_for(Duration::from_secs(10), || {
        let done = c.nodes[i1]
            .child
            .as_mut()
            .map(|ch| matches!(ch.try_wait(), Ok(Some(_))))
            .unwrap_or(true);
        async move { done.then_some(()) }
    });
    // The removed member stops by itself.
    assert!(exited.await.is_some(), "removed member 1 kept running");
    c.kill(i1);

    tokio::time::sleep(Duration::from_millis(500)).await; // let the writer run on the new config
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(
        acked.len() > 10,
        "the writer made little progress: {}",
        acked.len()
    );
    let remaining =
        MetaClient::connect(&[c.nodes[1].client.clone(), c.nodes[2].client.clone(), cl]).unwrap();
    assert_eq!(count_prefix(&remaining, "m/").await, acked);
    let ids: BTreeSet<u64> = remaining
        .member_list()
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [2, 3, 4].into_iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_down_past_compaction_catches_up_by_snapshot() {
    let mut c = Cluster::start(3, &["--snapshot-entries=50"]);
    let leader = c.wait_leader(LEADER_TIMEOUT).await;
    let client = c.client();
    let fi = c.nodes.iter().position(|n| n.id != leader).unwrap();
    c.kill(fi);
    let acked = write_many(&client, "s/", 400).await;
    let leader_status = client.status().await.unwrap();
    assert!(
        leader_status.first_log_index > 100,
        "the leader did not compact its log: {leader_status:?}"
    );

    c.spawn(fi, false);
    let follower = c.client_of(fi, Duration::from_secs(2));
    let ep = c.nodes[fi].client.clone();
    let caught_up = wait_for(Duration::from_secs(30), || {
        let follower = follower.clone();
        let ep = ep.clone();
        async move {
            let s = follower.status_of(&ep).await.ok()?;
            (s.applied_index >= leader_status.commit_index).then_some(s)
        }
    })
    .await
    .expect("the follower catches up");
    assert!(
        caught_up.snapshot_index > 0,
        "caught up without a snapshot: {caught_up:?}"
    );
    let r = follower
        .range(RangeRequest {
            key: b"s/".to_vec(),
            range_end: b"s0".to_vec(),
            serializable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: BTreeSet<String> = r
        .kvs
        .into_iter()
        .map(|kv| String::from_utf8(kv.key).unwrap())
        .collect();
    assert_eq!(keys, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resumed_watch_sees_every_change_once_in_order() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(LEADER_TIMEOUT).await;
    let client = c.client();
    let start = client
        .put(b"w-start".to_vec(), b"x".to_vec())
        .await
        .unwrap();
    let start_rev = start.header.unwrap().revision + 1;
    let mut watch = client.watch_prefix(b"w/", start_rev);
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                let k = format!("w/{i:03}");
                put_acked(&client, &k, &k).await;
                if i % 10 == 0 {
                    // Retried until acknowledged; a repeated delete changes nothing.
                    while client.delete(k.as_bytes().to_vec()).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    // (revision, key, type) of every event delivered through the disrupted watch.
    let mut seen: Vec<(u64, String, i32)> = Vec::new();
    let mut last_rev = 0;
    let mut reconnects = 0;
    let done = |seen: &[(u64, String, i32)]| {
        seen.iter()
            .any(|(_, k, t)| k.as_str() == "w/099" && *t == EventType::Put as i32)
    };
    while !done(&seen) {
        let batch = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("watch progresses")
            .expect("watch batch");
        assert!(
            batch.revision > last_rev,
            "revision went backwards or repeated"
        );
        last_rev = batch.revision;
        for e in batch.events {
            let key = String::from_utf8(e.kv.unwrap().key).unwrap();
            seen.push((batch.revision, key, e.r#type));
        }
        if seen.len() == 20 || seen.len() == 60 {
            watch.disconnect();
            reconnects += 1;
        }
        if seen.len() == 40 {
            // Kill a member the watch may be using; it resumes elsewhere.
            c.kill(0);
        }
    }
    writer.await.unwrap();
    assert!(reconnects >= 2);

    // The disrupted watch saw exactly what an undisturbed replay of the history shows.
    let mut replay = c.client().watch_prefix(b"w/", start_rev);
    let mut history = Vec::new();
    while history.len() < seen.len() {
        let batch = tokio::time::timeout(Duration::from_secs(30), replay.next())
            .await
            .expect("replay progresses")
            .expect("replay batch");
        for e in batch.events {
            let key = String::from_utf8(e.kv.unwrap().key).unwrap();
            history.push((batch.revision, key, e.r#type));
        }
    }
    assert_eq!(seen, history, "watch missed, repeated or reordered events");

    // And that history is the writer's: a put whose outcome was unknown during the kill may
    // have been retried, so adjacent repeats of the same put collapse.
    let mut writes: Vec<(String, i32)> = seen.into_iter().map(|(_, k, t)| (k, t)).collect();
    writes.dedup();
    let mut expected = Vec::new();
    for i in 0..100 {
        let k = format!("w/{i:03}");
        expected.push((k.clone(), EventType::Put as i32));
        if i % 10 == 0 {
            expected.push((k, EventType::Delete as i32));
        }
    }
    assert_eq!(writes, expected, "the watch does not match the writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_of_an_expired_lease_vanish() {
    let c = Cluster::start(3, &[]);
    c.wait_leader(LEADER_TIMEOUT).await;
    let client = c.client();
    let short = client.lease_grant(2).await.unwrap().id;
    let kept = client.lease_grant(2).await.unwrap().id;
    for (k, l) in [("lease/short", short), ("lease/kept", kept)] {
        client
            .put_with(continuum_proto::meta::PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
                lease: l,
                prev_kv: false,
            })
            .await
            .unwrap();
    }
    let ka = client.spawn_keep_alive(kept, 2);
    let gone = wait_for(Duration::from_secs(15), || {
        let client = client.clone();
        async move {
            client
                .get(b"lease/short".to_vec())
                .await
                .ok()
                .filter(|v| v.is_none())
        }
    })
    .await;
    assert!(gone.is_some(), "key of an expired lease is still there");
    assert!(matches!(
        client.lease_time_to_live(short, false).await,
        Err(Error::NotFound { .. })
    ));
    assert!(
        client.get(b"lease/kept".to_vec()).await.unwrap().is_some(),
        "a kept-alive lease expired"
    );
    ka.abort();
    // A put naming a missing lease is refused.
    let r = client
        .put_with(continuum_proto::meta::PutRequest {
            key: b"lease/none".to_vec(),
            value: b"v".to_vec(),
            lease: short,
            prev_kv: false,
        })
        .await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_errors_and_never_crashes() {
    use tokio::io::AsyncWriteExt;
    let c = Cluster::start(3, &[]);
    c.wait_leader(LEADER_TIMEOUT).await;
    let client = c.client();
    let e = client.put(Vec::new(), b"v".to_vec()).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    let e = client
        .put(vec![b'k'; 5000], b"v".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    // The client library refuses an oversized value itself ...
    let e = client
        .put(b"big".to_vec(), vec![0u8; 2 * 1024 * 1024])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    // ... and a raw gRPC client sending one gets a clear status from the server.
    {
        use continuum_proto::meta::meta_client::MetaClient as Raw;
        let mut raw = Raw::connect(format!("http://{}", c.nodes[0].client))
            .await
            .unwrap()
            .max_encoding_message_size(8 * 1024 * 1024);
        let s = raw
            .put(continuum_proto::meta::PutRequest {
                key: b"big".to_vec(),
                value: vec![0u8; 2 * 1024 * 1024],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(s.message().contains("too large"), "{s:?}");
        let s = raw
            .put(continuum_proto::meta::PutRequest {
                key: b"big".to_vec(),
                value: vec![0u8; 1024 * 1024 + 1],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    }
    let ops = (0..200)
        .map(|i| continuum_meta_client::op::put(format!("t{i}").as_bytes(), vec![], 0))
        .collect();
    let e = client
        .txn(continuum_proto::meta::TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    let dup = vec![
        continuum_meta_client::op::put(b"d", vec![], 0),
        continuum_meta_client::op::put(b"d", vec![], 0),
    ];
    let e = client
        .txn(continuum_proto::meta::TxnRequest {
            compare: vec![],
            success: dup,
            failure: vec![],
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("duplicate"), "{e}");
    let e = client.lease_grant(0).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    // Garbage on both ports, and a malformed Raft message, do not hurt anyone.
    for n in &c.nodes {
        for addr in [&n.client, &n.peer] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&[0xde; 4096]).await;
            let _ = s
                .write_all(
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x01\x00\x00\x00\x00\x00garbage",
                )
                .await;
        }
    }
    {
        use continuum_proto::meta::{raft_client::RaftClient, RaftEnvelope};
        let mut rc = RaftClient::connect(format!("http://{}", c.nodes[0].peer))
            .await
            .unwrap();
        let env = RaftEnvelope {
            from: 2,
            to: 1,
            message: vec![0xff; 64],
        };
        let r = rc.send(tokio_stream::iter(vec![env])).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    put_acked(&client, "still-alive", "still-alive").await;
    for n in &c.nodes {
        client
            .status_of(&n.client)
            .await
            .expect("member still serving");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_fails_writes_and_loses_nothing() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .expect("run mount");
    assert!(status.success(), "mounting a tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    // Ballast the operator can delete later to free space.
    let ballast = mnt.path().join("ballast");
    std::fs::write(&ballast, vec![7u8; 32 * 1024 * 1024]).unwrap();
    let mut c = Cluster::start(1, &["--min-free-bytes=16777216"]);
    c.kill(0);
    c.nodes[0].data_dir = mnt.path().join("meta-1");
    c.spawn(0, false);
    c.wait_leader(LEADER_TIMEOUT).await;
    let client = c.client();
    // Incompressible values (RocksDB compresses with LZ4).
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut value = || -> Vec<u8> {
        (0..256 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut acked = Vec::new();
    let err = loop {
        let k = format!("fill/{:05}", acked.len());
        match client.put(k.clone().into_bytes(), value()).await {
            Ok(_) => acked.push(k),
            Err(e) => break e,
        }
        assert!(acked.len() < 1000, "a 128 MiB disk never filled up");
    };
    // Either the free-space reserve refused the write, or storage failed and the member stopped
    // (fail-stop); both must say "no space", and neither may lose an acknowledged write.
    assert!(
        matches!(err, Error::NoSpace { .. }),
        "expected a no-space error, got: {err}"
    );
    assert!(!acked.is_empty());
    let check = |client: MetaClient, acked: Vec<String>| async move {
        let kvs = client.get_prefix(b"fill/".to_vec()).await.expect("read");
        let keys: Vec<String> = kvs
            .iter()
            .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
            .collect();
        assert_eq!(keys, acked);
        assert!(kvs.iter().all(|kv| kv.value.len() == 256 * 1024));
    };
    if client.status().await.is_ok() {
        // Still running: reads work. Another write is refused again, or accepted if background
        // compaction freed space meanwhile; nothing else.
        match client.put(b"fill/more".to_vec(), value()).await {
            Ok(_) => acked.push("fill/more".to_string()),
            Err(Error::NoSpace { .. }) => {}
            Err(e) => panic!("expected success or no-space, got: {e}"),
        }
        check(client.clone(), acked.clone()).await;
    }
    // Crash, free space, restart: everything acknowledged is there.
    c.kill(0);
    std::fs::remove_file(&ballast).unwrap();
    c.spawn(0, false);
    c.wait_leader(LEADER_TIMEOUT).await;
    check(c.client(), acked.clone()).await;
}
