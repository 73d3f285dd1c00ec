//! A real block server (io_uring data file, RocksDB index, TCP) driven by the pipelined client.

mod common;

use std::time::Duration;

use bytes::Bytes;
use continuum_blockstore::checksum;
use continuum_blockstore::client::{BlockClient, ShardError};
use continuum_blockstore::protocol::pb;
use continuum_blockstore::server::{self, BlockServerConfig};
use continuum_blockstore::store::{ObjectKey, Version, WriteMode, WriteReq};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const K: usize = 4096;

fn config(dir: &std::path::Path) -> BlockServerConfig {
    BlockServerConfig {
        node_id: 1,
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        capacity_bytes: 64 << 20,
        flush_interval_ms: 50,
        record_cache_bytes: continuum_blockstore::store::DEFAULT_RECORD_CACHE_BYTES,
    }
}

fn obj(stripe: u64, shard: u32) -> ObjectKey {
    ObjectKey {
        volume: 3,
        stripe,
        shard,
    }
}

fn write(
    object: ObjectKey,
    version: Version,
    base: Version,
    offset: u32,
    data: &Bytes,
) -> WriteReq {
    WriteReq {
        object,
        epoch: version.epoch,
        version,
        base,
        mode: WriteMode::Data,
        offset,
        length: data.len() as u32,
        crcs: checksum::compute(data),
        fua: false,
        write_set: 1,
        data_base: vec![],
        data_after: vec![],
        return_old: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_a_restart_and_pipelined_requests_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server::start(config(dir.path())).unwrap();
    let c = BlockClient::new(srv.addr.to_string(), Duration::from_secs(5));
    let hello = c.hello().await.unwrap();
    assert_eq!(hello.node_id, 1);
    assert_eq!(hello.capacity_bytes, 64 << 20);

    // 200 writes in flight at once on one connection, each to its own object.
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let data = Bytes::from(vec![i as u8; 2 * K]);
            let mut w = write(obj(i, 0), Version::new(1, i + 1), Version::NONE, 0, &data);
            w.fua = i % 10 == 0;
            c.write(&w, data, &[]).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().previous, Version::NONE);
    }
    c.flush().await.unwrap();
    drop(srv); // stops and flushes

    let srv = server::start(config(dir.path())).unwrap();
    let c = BlockClient::new(srv.addr.to_string(), Duration::from_secs(5));
    for i in (0..200u64).step_by(17) {
        let r = c.read(obj(i, 0), 0, 2 * K as u32, 0).await.unwrap();
        assert_eq!(r.version, Version::new(1, i + 1));
        assert!(r.data.iter().all(|b| *b == i as u8));
    }
    let (page, more) = c.list(3, None, 50, false, 0).await.unwrap();
    assert_eq!(page.len(), 50);
    assert!(more);
    let infos = c.stat(&[obj(5, 0), obj(999, 0)], 0).await.unwrap();
    assert_eq!(infos[0].version, Version::new(1, 6));
    assert_eq!(infos[1].version, Version::NONE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_back_as_explicit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server::start(config(dir.path())).unwrap();
    let c = BlockClient::new(srv.addr.to_string(), Duration::from_secs(5));
    let data = Bytes::from(vec![7u8; K]);
    c.write(
        &write(obj(0, 0), Version::new(4, 1), Version::NONE, 0, &data),
        data.clone(),
        &[],
    )
    .await
    .unwrap();
    // Stale epoch.
    let err = c
        .write(
            &write(obj(0, 1), Version::new(3, 1), Version::NONE, 0, &data),
            data.clone(),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(pb::Status::StaleEpoch), "{err}");
    // A replaced writer's reads, stats and listings are refused the same way (it must not
    // serve its clients data a newer writer owns); the current writer's and lease-less
    // readers' are served.
    let err = c.read(obj(0, 0), 0, K as u32, 3).await.unwrap_err();
    assert_eq!(err.status(), Some(pb::Status::StaleEpoch), "{err}");
    let err = c.stat(&[obj(0, 0)], 3).await.unwrap_err();
    assert_eq!(err.status(), Some(pb::Status::StaleEpoch), "{err}");
    let err = c.list(3, None, 10, false, 3).await.unwrap_err();
    assert_eq!(err.status(), Some(pb::Status::StaleEpoch), "{err}");
    c.read(obj(0, 0), 0, K as u32, 4).await.unwrap();
    c.stat(&[obj(0, 0)], 0).await.unwrap();
    c.list(3, None, 10, false, 4).await.unwrap();
    // Wrong base: the current version comes back.
    let err = c
        .write(
            &write(obj(0, 0), Version::new(4, 2), Version::new(4, 0), 0, &data),
            data.clone(),
            &[],
        )
        .await
        .unwrap_err();
    match err {
        ShardError::Status {
            status: pb::Status::VersionMismatch,
            current,
            ..
        } => assert_eq!(current, Some(Version::new(4, 1))),
        e => panic!("{e}"),
    }
    // A payload that does not match its checksums.
    let mut bad = write(obj(0, 0), Version::new(4, 2), Version::new(4, 1), 0, &data);
    bad.crcs[0] ^= 1;
    let err = c.write(&bad, data.clone(), &[]).await.unwrap_err();
    assert_eq!(err.status(), Some(pb::Status::BadPayload));
    // Misaligned.
    let err = c.read(obj(0, 0), 5, 4096, 0).await.unwrap_err();
    assert_eq!(err.status(), Some(pb::Status::Invalid));
    // Full: 64 MiB of data file cannot take 65 MiB.
    let big = Bytes::from(vec![1u8; 4 << 20]);
    let mut refused = None;
    for stripe in 1..20 {
        let w = write(
            obj(stripe, 0),
            Version::new(4, 10 + stripe),
            Version::NONE,
            0,
            &big,
        );
        if let Err(e) = c.write(&w, big.clone(), &[]).await {
            refused = Some(e);
            break;
        }
    }
    assert_eq!(refused.unwrap().status(), Some(pb::Status::NoSpace));
    // What was acknowledged is intact.
    let r = c.read(obj(0, 0), 0, K as u32, 0).await.unwrap();
    assert_eq!(r.data, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server::start(config(dir.path())).unwrap();
    // Raw garbage: the server closes the connection.
    let mut raw = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    raw.write_all(&[0x42; 100]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the server hangs up on a corrupt stream");
    // A valid frame whose header is not a request: an INVALID status, connection kept.
    let frame = continuum_blockstore::wire::FrameRepr {
        kind: continuum_blockstore::wire::Kind::Request,
        request_id: 9,
        header: Bytes::from_static(&[0xff, 0xff, 0xff]),
        payload: Bytes::new(),
    };
    let mut out = vec![0u8; frame.buffer_len()];
    frame.emit(&mut out);
    let mut raw = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    raw.write_all(&out).await.unwrap();
    let mut dec = continuum_blockstore::wire::FrameDecoder;
    let mut acc = bytes::BytesMut::new();
    let resp = loop {
        if let Some(f) = dec.decode(&mut acc).unwrap() {
            break f;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read_buf(&mut acc))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed before the response");
    };
    assert_eq!(resp.request_id, 9);
    let r = <pb::Response as prost::Message>::decode(resp.header).unwrap();
    assert_eq!(r.status, pb::Status::Invalid as i32);
    // The server still serves everyone else.
    let c = BlockClient::new(srv.addr.to_string(), Duration::from_secs(5));
    assert_eq!(c.hello().await.unwrap().node_id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_a_transport_error_and_the_client_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Below the ephemeral range: no outgoing connection takes the port while it is stopped.
    cfg.listen = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let srv = server::start(cfg.clone()).unwrap();
    let addr = srv.addr;
    let c = BlockClient::new(addr.to_string(), Duration::from_secs(2));
    c.hello().await.unwrap();
    srv.stop().unwrap();
    let err = c.hello().await.unwrap_err();
    assert!(matches!(err, ShardError::Transport { .. }), "{err}");
    cfg.listen = addr;
    let _srv = server::start(cfg).unwrap();
    c.hello().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_more_objects_than_one_frame_holds_pages_through_all() {
    // Thousands of objects with unstable versions (undo entries make records large): a full
    // page would not fit in one frame header, so the server cuts pages short and says `more`.
    let dir = tempfile::tempdir().unwrap();
    let srv = server::start(config(dir.path())).unwrap();
    let c = BlockClient::new(srv.addr.to_string(), Duration::from_secs(10));
    let n = 5000u64;
    let data = Bytes::from(vec![7u8; K]);
    let mut tasks = Vec::new();
    for i in 0..n {
        let (c, data) = (c.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let w = write(obj(i, 0), Version::new(1, 1), Version::NONE, 0, &data);
            c.write(&w, data.clone(), &[]).await.unwrap();
            let w = write(obj(i, 0), Version::new(1, 2), Version::new(1, 1), 0, &data);
            c.write(&w, data, &[]).await.unwrap();
        }));
        if tasks.len() >= 64 {
            for t in tasks.drain(..) {
                t.await.unwrap();
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (mut seen, mut after, mut pages) = (0u64, None, 0);
    loop {
        let (page, more) = c.list(3, after, 4096, false, 0).await.unwrap();
        pages += 1;
        for (i, info) in page.iter().enumerate() {
            assert_eq!(
                info.object.stripe,
                seen + i as u64,
                "in order, none skipped"
            );
        }
        seen += page.len() as u64;
        after = page.last().map(|i| i.object);
        if !more {
            break;
        }
    }
    assert_eq!(seen, n);
    assert!(pages > 1, "the listing needed several pages");
    // Stabilizing all of them at once: more than one request header holds (the client
    // splits the list; before, the oversized frame panicked the connection's writer).
    let all: Vec<(ObjectKey, Version)> = (0..n).map(|i| (obj(i, 0), Version::new(1, 2))).collect();
    c.stabilize(1, &all).await.unwrap();
    let mut left = u64::MAX;
    for _ in 0..10 {
        c.flush().await.unwrap();
        let (page, _) = c.list(3, None, 4096, true, 0).await.unwrap();
        left = page.len() as u64;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "every version stabilized");
}
