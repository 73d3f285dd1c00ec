//! The block server's network driver: accepts block-protocol connections and runs each request
//! against the [`Store`].
//!
//! Runs on one thread inside a tokio-uring runtime (disk I/O through io_uring; the sockets are
//! tokio's, which that runtime also drives). Per connection: a reader cuts frames out of the
//! stream without copying payloads, each request runs as its own local task (many in flight,
//! at most [`MAX_IN_FLIGHT_PER_CONNECTION`]), and a writer sends responses as they complete, in
//! any order, matched by request id. A corrupt frame closes the connection (the stream can no
//! longer be trusted); a well-framed but invalid request gets an `INVALID` status.
//!
//! A background task flushes the store every `flush_interval_ms` when something is unsynced,
//! which bounds what a power loss can take and frees superseded space.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Semaphore};

use crate::device::Device;
use crate::index::Index;
use crate::protocol::{self, pb};
use crate::store::{OpenedNote, Store};
use crate::wire::{FrameDecoder, FrameRepr, Kind};

/// Most encoded bytes of objects in one list reply (its frame header is at most
/// `wire::MAX_HEADER_BYTES`, with room left for the rest of the response).
const LIST_REPLY_BUDGET_BYTES: usize = crate::wire::MAX_HEADER_BYTES - 4096;
/// Requests of one connection being served at once; the reader waits beyond it.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;
/// Most simultaneous connections of one block server.
pub const MAX_CONNECTIONS: usize = 1024;
/// Read-buffer reservation per connection.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub node_id: u64,
    pub flush_interval_ms: u64,
}

/// Serves `listener` until it fails (the caller drops the future to stop).
pub async fn serve<D: Device + 'static, I: Index + 'static>(
    store: Rc<Store<D, I>>,
    listener: tokio::net::TcpListener,
    cfg: ServeConfig,
) -> std::io::Result<()> {
    let flusher = {
        let store = store.clone();
        let every = Duration::from_millis(cfg.flush_interval_ms.max(1));
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                store.refresh_gauges();
                if store.flush_due() {
                    if let Err(e) = store.flush().await {
                        // A storage error leaves the node's state unknown: stop (fail-stop).
                        tracing::error!(error = %e, "background flush failed; stopping");
                        std::process::exit(70);
                    }
                }
            }
        })
    };
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let result = loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => break Err(e),
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections; refusing");
            continue;
        };
        let store = store.clone();
        let node = cfg.node_id;
        tokio::task::spawn_local(async move {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "nodelay");
            }
            if let Err(e) = connection(store, stream, &peer.to_string(), node).await {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
            drop(permit);
        });
    };
    flusher.abort();
    result
}

/// Serves one connection until the peer closes it or sends a corrupt frame. Public for the
/// chaos simulator, which hands it in-process streams.
pub async fn connection<D, I, S>(
    store: Rc<Store<D, I>>,
    stream: S,
    peer: &str,
    node: u64,
) -> std::io::Result<()>
where
    D: Device + 'static,
    I: Index + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<FrameRepr>(MAX_IN_FLIGHT_PER_CONNECTION);
    let writer = tokio::task::spawn_local(write_loop(wr, rx));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut decoder = FrameDecoder;
    let result = 'outer: loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) if frame.kind == Kind::Request => {
                    let permit = in_flight
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore never closed");
                    let (store, tx) = (store.clone(), tx.clone());
                    tokio::task::spawn_local(async move {
                        let id = frame.request_id;
                        let (resp, payload) =
                            handle(&store, node, frame.header, frame.payload).await;
                        let out = FrameRepr {
                            kind: Kind::Response,
                            request_id: id,
                            header: resp.encode_to_vec().into(),
                            payload,
                        };
                        let _ = tx.send(out).await;
                        drop(permit);
                    });
                }
                Ok(Some(_)) => {
                    tracing::warn!(%peer, "a response frame from a client; closing");
                    break 'outer Ok(());
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "corrupt frame; closing the connection");
                    break 'outer Ok(());
                }
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    drop(tx);
    let _ = writer.await;
    result
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<FrameRepr>,
) -> std::io::Result<()> {
    crate::conn::write_frames(wr, &mut rx, None).await
}

fn ok(result: pb::response::Result) -> pb::Response {
    pb::Response {
        status: pb::Status::Ok as i32,
        message: String::new(),
        current: None,
        result: Some(result),
        incarnation: 0,
    }
}

fn done() -> pb::Response {
    pb::Response::default()
}

/// Runs one request; returns the response (stamped with the store's incarnation) and its
/// payload.
pub async fn handle<D: Device, I: Index>(
    store: &Store<D, I>,
    node: u64,
    header: Bytes,
    payload: Bytes,
) -> (pb::Response, Bytes) {
    let (mut resp, payload) = handle_op(store, node, header, payload).await;
    resp.incarnation = store.incarnation();
    (resp, payload)
}

async fn handle_op<D: Device, I: Index>(
    store: &Store<D, I>,
    node: u64,
    header: Bytes,
    payload: Bytes,
) -> (pb::Response, Bytes) {
    let req = match pb::Request::decode(header) {
        Ok(r) => r,
        Err(_) => {
            return (
                protocol::invalid_response("undecodable request header"),
                Bytes::new(),
            )
        }
    };
    let Some(op) = req.op else {
        return (
            protocol::invalid_response("request without an operation"),
            Bytes::new(),
        );
    };
    let empty = Bytes::new();
    let r = match op {
        pb::request::Op::Write(w) => {
            let req = match protocol::write_from_pb(&w) {
                Ok(r) => r,
                Err(reason) => return (protocol::invalid_response(reason), empty),
            };
            let stabilize = match protocol::object_versions_from_pb(&w.stabilize) {
                Some(s) => s,
                None => {
                    return (
                        protocol::invalid_response("stabilize entry without an object"),
                        empty,
                    )
                }
            };
            match store.write(&req, payload).await {
                Ok(out) => {
                    if !stabilize.is_empty() {
                        if let Err(e) = store.stabilize(req.epoch, &stabilize).await {
                            return (protocol::error_response(&e), empty);
                        }
                    }
                    Ok((
                        ok(pb::response::Result::Write(pb::WriteResult {
                            previous: Some(protocol::version_to_pb(out.previous)),
                        })),
                        out.old.unwrap_or_default(),
                    ))
                }
                Err(e) => Err(e),
            }
        }
        pb::request::Op::Read(r) => {
            let Some(object) = protocol::object_from_pb(r.object.as_ref()) else {
                return (protocol::invalid_response("read without an object"), empty);
            };
            if let Err(e) = store.check_reader(object.volume, r.epoch) {
                return (protocol::error_response(&e), empty);
            }
            store.read(object, r.offset, r.length).await.map(|out| {
                (
                    ok(pb::response::Result::Read(pb::ReadResult {
                        version: Some(protocol::version_to_pb(out.version)),
                        crcs: out.crcs,
                        data_versions: protocol::data_versions_to_pb(&out.data_versions),
                    })),
                    out.data,
                )
            })
        }
        pb::request::Op::Stabilize(s) => match protocol::object_versions_from_pb(&s.objects) {
            Some(list) => store
                .stabilize(s.epoch, &list)
                .await
                .map(|_| (done(), empty)),
            None => {
                return (
                    protocol::invalid_response("stabilize entry without an object"),
                    empty,
                )
            }
        },
        pb::request::Op::Rollback(s) => match protocol::object_versions_from_pb(&s.objects) {
            Some(list) => store
                .rollback(s.epoch, &list)
                .await
                .map(|_| (done(), empty)),
            None => {
                return (
                    protocol::invalid_response("rollback entry without an object"),
                    empty,
                )
            }
        },
        pb::request::Op::List(l) => {
            let after = protocol::object_from_pb(l.after.as_ref());
            if let Err(e) = store.check_reader(l.volume, l.epoch) {
                return (protocol::error_response(&e), empty);
            }
            store
                .list(l.volume, after, l.limit as usize, l.unstable_only)
                .map(|(objects, more)| {
                    // The reply travels in a frame header (≤ MAX_HEADER_BYTES): a page is cut
                    // short, with `more`, when its encoding would not fit.
                    let mut pbs = Vec::with_capacity(objects.len());
                    let mut bytes = 0;
                    for o in &objects {
                        let p = protocol::info_to_pb(o);
                        let n = prost::Message::encoded_len(&p) + 8;
                        if bytes + n > LIST_REPLY_BUDGET_BYTES {
                            break;
                        }
                        bytes += n;
                        pbs.push(p);
                    }
                    let more = more || pbs.len() < objects.len();
                    (
                        ok(pb::response::Result::List(pb::ListResult {
                            objects: pbs,
                            more,
                        })),
                        empty,
                    )
                })
        }
        pb::request::Op::Stat(s) => {
            if s.objects.len() > crate::store::MAX_LIST_OBJECTS {
                return (
                    protocol::invalid_response("too many objects in one stat"),
                    empty,
                );
            }
            let objects: Vec<_> = s
                .objects
                .iter()
                .filter_map(|o| protocol::object_from_pb(Some(o)))
                .collect();
            let volumes: std::collections::BTreeSet<u64> =
                objects.iter().map(|o| o.volume).collect();
            for v in volumes {
                if let Err(e) = store.check_reader(v, s.epoch) {
                    return (protocol::error_response(&e), empty);
                }
            }
            store.stat(&objects).map(|infos| {
                (
                    ok(pb::response::Result::Stat(pb::ListResult {
                        objects: infos.iter().map(protocol::info_to_pb).collect(),
                        more: false,
                    })),
                    empty,
                )
            })
        }
        pb::request::Op::Flush(_) => store.flush().await.map(|_| (done(), empty)),
        pb::request::Op::DeleteVolume(d) => store
            .delete_volume(d.volume, d.epoch)
            .await
            .map(|_| (done(), empty)),
        pb::request::Op::Fence(f) => {
            let note = f.opened.then(|| OpenedNote {
                epoch: f.epoch,
                record: f.record,
                undecided: protocol::undecided_from_pb(&f.undecided),
            });
            store
                .fence_open(f.volume, f.epoch, note.as_ref())
                .await
                .map(|(previous, previous_opened, note)| {
                    (
                        ok(pb::response::Result::Fence(pb::FenceResult {
                            previous_epoch: previous,
                            previous_opened,
                            opened_undecided: protocol::undecided_to_pb(&note.undecided),
                            opened_record: note.record,
                        })),
                        empty,
                    )
                })
        }
        pb::request::Op::Hello(_) => Ok((
            ok(pb::response::Result::Hello(pb::HelloResult {
                node_id: node,
                capacity_bytes: store.capacity_bytes(),
                used_bytes: store.used_bytes(),
            })),
            empty,
        )),
    };
    match r {
        Ok(x) => x,
        Err(e) => {
            if matches!(
                e,
                crate::store::StoreError::Io { .. } | crate::store::StoreError::Index(_)
            ) {
                tracing::error!(error = %e, "storage error");
            }
            (protocol::error_response(&e), Bytes::new())
        }
    }
}

/// Settings of a block server process.
#[derive(Clone, Debug)]
pub struct BlockServerConfig {
    pub node_id: u64,
    pub data_dir: std::path::PathBuf,
    pub listen: SocketAddr,
    /// Size of the data file (sparse; only written blocks use disk space).
    pub capacity_bytes: u64,
    pub flush_interval_ms: u64,
    /// Memory for recently used object records (see [`crate::record_cache`]; 0 disables).
    pub record_cache_bytes: usize,
}

/// A block server running on its own io_uring thread.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The store's counters (for a metrics endpoint on another thread).
    pub stats: Arc<crate::store::Stats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl RunningServer {
    /// Stops serving, flushes the store and waits for the thread.
    pub fn stop(mut self) -> Result<(), String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "block server thread panicked".to_string())?,
            None => Ok(()),
        }
    }

    /// Waits until the server stops by itself (it only does on an error).
    pub fn wait(mut self) -> Result<(), String> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "block server thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Opens the data directory (`data` file through io_uring, `index` RocksDB) and serves on
/// `cfg.listen` from a new thread; returns once it accepts connections.
pub fn start(cfg: BlockServerConfig) -> Result<RunningServer, String> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", cfg.data_dir.display()))?;
    type Ready = Result<(SocketAddr, Arc<crate::store::Stats>), String>;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Ready>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("block-{}", cfg.node_id))
        .spawn(move || {
            tokio_uring::start(async move {
                let opened = open_and_bind(&cfg).await;
                let (store, listener) = match opened {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                store.refresh_gauges();
                let _ = ready_tx.send(Ok((addr, store.stats.clone())));
                let serve_cfg = ServeConfig {
                    node_id: cfg.node_id,
                    flush_interval_ms: cfg.flush_interval_ms,
                };
                let result = tokio::select! {
                    r = serve(store.clone(), listener, serve_cfg) => r.map_err(|e| format!("serving: {e}")),
                    _ = stop_rx => Ok(()),
                };
                store.flush().await.map_err(|e| format!("final flush: {e}"))?;
                result
            })
        })
        .map_err(|e| format!("cannot start the block server thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok((addr, stats))) => Ok(RunningServer {
            addr,
            stats,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(thread
            .join()
            .map_err(|_| "block server thread panicked".to_string())?
            .err()
            .unwrap_or_else(|| "block server stopped during start-up".into())),
    }
}

/// Filesystem bytes a block server keeps free beside a data file of `capacity` bytes, for
/// its index (see [`Store::set_space_reserve`]): an eighth of the capacity, 32 MiB to 1 GiB.
pub fn space_reserve(capacity: u64) -> u64 {
    (capacity / 8).clamp(32 << 20, 1 << 30)
}

type UringStore = Store<crate::device::UringDevice, crate::index::RocksIndex>;

async fn open_and_bind(
    cfg: &BlockServerConfig,
) -> Result<(Rc<UringStore>, tokio::net::TcpListener), String> {
    let index = crate::index::RocksIndex::open(&cfg.data_dir.join("index"), cfg.capacity_bytes)
        .map_err(|e| format!("opening the index: {e}"))?;
    let device = crate::device::UringDevice::open(&cfg.data_dir.join("data"), cfg.capacity_bytes)
        .map_err(|e| format!("opening the data file: {e}"))?;
    let store = Store::open(device, index).map_err(|e| format!("opening the store: {e}"))?;
    store.set_space_reserve(space_reserve(cfg.capacity_bytes));
    store.set_record_cache_bytes(cfg.record_cache_bytes);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    Ok((Rc::new(store), listener))
}
