//! The tokio driver of a meta member: the core thread (Ready loop), the gRPC client API, the Raft
//! transport and the Prometheus endpoint.
//!
//! Threads: the core runs on one dedicated OS thread, because each Ready round ends in a synced
//! RocksDB write; while it syncs, new requests queue in a bounded channel and the next round
//! takes them all (group commit). Everything else (gRPC, transport, metrics) runs on tokio.

// tonic's service API returns `tonic::Status` by value; boxing it here would only add copies.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{mpsc as std_mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use continuum_proto::limits;
use continuum_proto::meta::{
    self as api, meta_server::MetaServer, raft_client::RaftClient, raft_server::RaftServer, Member,
    RaftAck, RaftEnvelope, WatchResponse,
};
use futures::Stream;
use prost::Message as _;
use raft::eraftpb::{ConfState, Message};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

use crate::core::{CoreConfig, MetaCore, Output, ReadMode, Request, RequestId, Response, WatchId};
use crate::engine::{Engine, RocksEngine, WriteBatch};
use crate::error::{MetaError, StoreError};
use crate::metrics::Metrics;
use crate::state::Applied;

/// Everything a member needs to run.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub listen_client: SocketAddr,
    pub listen_peer: SocketAddr,
    /// Members of the initial cluster (bootstrap) or known peers to contact (join).
    pub initial_cluster: Vec<Member>,
    /// Join an existing cluster (after `member add`) instead of bootstrapping a new one.
    pub join: bool,
    pub metrics_addr: Option<SocketAddr>,
    pub tick_ms: u64,
    pub core: CoreConfig,
    /// Accept the test-only `x-continuum-fault` partition calls on the Raft port.
    pub enable_fault_injection: bool,
}

impl ServerConfig {
    pub fn new(id: u64, data_dir: PathBuf, client: SocketAddr, peer: SocketAddr) -> Self {
        Self {
            id,
            data_dir,
            listen_client: client,
            listen_peer: peer,
            initial_cluster: Vec::new(),
            join: false,
            metrics_addr: None,
            tick_ms: 100,
            core: CoreConfig::new(id),
            enable_fault_injection: false,
        }
    }
}

type Reply = oneshot::Sender<Result<Response, MetaError>>;
type WatchTx = mpsc::Sender<Result<WatchResponse, Status>>;

enum Input {
    Request(Request, Reply),
    Watch(WatchId, api::WatchRequest, WatchTx, Reply),
    Raft(Message),
    Unreachable(u64),
    /// The peer's process is gone (its Raft port refuses connections).
    PeerDown(u64),
    /// Appends up to this Ready number are durable.
    Persisted(u64),
    PersistFailed(String),
    SnapshotFailed(u64),
    CancelWatch(WatchId),
    Shutdown,
}

/// Engine wrapper that times synced writes (the fsync latency histogram).
#[derive(Clone)]
struct MeteredEngine {
    inner: Arc<RocksEngine>,
    metrics: Arc<Metrics>,
}

impl Engine for MeteredEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn scan(&self, s: &[u8], e: &[u8], l: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.inner.scan(s, e, l)
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.write(batch, sync);
        if sync {
            self.metrics
                .fsync_seconds
                .observe(t.elapsed().as_secs_f64());
        }
        r
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

/// Shared view of the cluster's members (addresses) for the transport and leader hints.
#[derive(Default)]
struct Directory {
    members: RwLock<BTreeMap<u64, Member>>,
}

impl Directory {
    fn update(&self, members: &[Member]) {
        let mut g = self.members.write().unwrap();
        for m in members {
            g.insert(m.id, m.clone());
        }
    }
    fn get(&self, id: u64) -> Option<Member> {
        self.members.read().unwrap().get(&id).cloned()
    }
}

/// Outbound Raft messages: one streaming connection per peer, each behind a bounded queue.
struct Transport {
    me: u64,
    runtime: tokio::runtime::Handle,
    dir: Arc<Directory>,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    inputs: std_mpsc::SyncSender<Input>,
    blocked: Arc<Mutex<HashSet<u64>>>,
}

impl Transport {
    fn send(&self, msg: Message) {
        let to = msg.to;
        if self.blocked.lock().unwrap().contains(&to) {
            return;
        }
        let mut peers = self.peers.lock().unwrap();
        let tx = peers.entry(to).or_insert_with(|| self.spawn_peer(to));
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                // Raft retransmits; a full queue means the peer is slow or gone.
                tracing::debug!(peer = to, "raft queue full; dropping message");
                report_dropped(&m, to, &self.inputs);
            }
            Err(mpsc::error::TrySendError::Closed(m)) => {
                report_dropped(&m, to, &self.inputs);
                peers.remove(&to);
            }
        }
    }

    fn spawn_peer(&self, to: u64) -> mpsc::Sender<Message> {
        let (tx, rx) = mpsc::channel(limits::MAX_PEER_QUEUE);
        let dir = self.dir.clone();
        let inputs = self.inputs.clone();
        let me = self.me;
        self.runtime.spawn(peer_loop(me, to, rx, dir, inputs));
        tx
    }
}

async fn peer_loop(
    me: u64,
    to: u64,
    mut rx: mpsc::Receiver<Message>,
    dir: Arc<Directory>,
    inputs: std_mpsc::SyncSender<Input>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(member) = dir.get(to) else {
            // Unknown peer: drop what is queued until its address is known.
            match rx.recv().await {
                Some(m) => {
                    report_dropped(&m, to, &inputs);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                None => return,
            }
        };
        let endpoint = format!("http://{}", member.peer_addr);
        let client = match tonic::transport::Endpoint::from_shared(endpoint) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect()
                .await
                .map(|ch| {
                    RaftClient::new(ch)
                        .max_encoding_message_size(limits::MAX_RAFT_MESSAGE_BYTES)
                        .max_decoding_message_size(limits::MAX_RAFT_MESSAGE_BYTES)
                }),
            Err(e) => {
                tracing::error!(peer = to, error = %e, "bad peer address");
                return;
            }
        };
        let mut client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = to, error = %e, "cannot reach peer");
                let refused = is_refused(&e);
                let _ = inputs.try_send(if refused {
                    Input::PeerDown(to)
                } else {
                    Input::Unreachable(to)
                });
                // Drain what queued meanwhile: stale Raft messages are worthless.
                while let Ok(m) = rx.try_recv() {
                    report_dropped(&m, to, &inputs);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (stx, srx) = mpsc::channel::<RaftEnvelope>(256);
        let mut call = tokio::spawn(async move { client.send(ReceiverStream::new(srx)).await });
        // Forward queued messages into the stream until it breaks. Watching the call as well
        // notices a dead connection (peer restarted) before the next message is lost in it.
        let mut snapshot_peers = false;
        let ended = loop {
            let msg = tokio::select! {
                msg = rx.recv() => msg,
                r = &mut call => break Some(r),
            };
            let Some(msg) = msg else {
                return;
            };
            let is_snap = msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
            snapshot_peers |= is_snap;
            let env = RaftEnvelope {
                from: me,
                to,
                message: msg.encode_to_vec(),
            };
            if stx.send(env).await.is_err() {
                break None;
            }
        };
        drop(stx);
        let result = match ended {
            Some(r) => r,
            None => call.await,
        };
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => tracing::debug!(peer = to, %status, "raft stream ended"),
            Err(e) => tracing::debug!(peer = to, error = %e, "raft stream task failed"),
        }
        let _ = inputs.try_send(Input::Unreachable(to));
        if snapshot_peers {
            let _ = inputs.try_send(Input::SnapshotFailed(to));
        }
        if rx.is_closed() {
            return;
        }
    }
}

/// A running member. Dropping it (or `shutdown`) stops the core and the servers.
pub struct MetaHandle {
    inputs: std_mpsc::SyncSender<Input>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    core_thread: Option<std::thread::JoinHandle<()>>,
    stopped: Arc<tokio::sync::Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MetaHandle {
    /// Waits until the member stops by itself (removed from the cluster, storage failure).
    pub async fn stopped(&self) {
        self.stopped.notified().await;
    }

    /// Stops the member and waits for the core thread (RocksDB is closed when this returns).
    pub fn shutdown(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        // The flag stops the loop even when the input queue is full.
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.inputs.try_send(Input::Shutdown);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(t) = self.core_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetaHandle {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("member {id} is not in the initial cluster")]
    NotInCluster { id: u64 },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
}

fn free_bytes(path: &Path) -> u64 {
    rustix::fs::statvfs(path)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(u64::MAX)
}

/// Starts a member: opens (or bootstraps) its storage, binds its ports and runs until dropped.
pub async fn start(cfg: ServerConfig) -> Result<MetaHandle, StartError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| StartError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let metrics = Arc::new(Metrics::new(cfg.id).map_err(|e| StartError::Metrics(e.to_string()))?);
    let rocks = RocksEngine::open(&cfg.data_dir.join("db"))?;
    let engine = MeteredEngine {
        inner: Arc::new(rocks),
        metrics: metrics.clone(),
    };
    let bootstrap = if cfg.join {
        None
    } else {
        if !cfg.initial_cluster.iter().any(|m| m.id == cfg.id) {
            return Err(StartError::NotInCluster { id: cfg.id });
        }
        let voters: Vec<u64> = cfg.initial_cluster.iter().map(|m| m.id).collect();
        Some((
            ConfState::from((voters, Vec::<u64>::new())),
            cfg.initial_cluster.clone(),
        ))
    };
    let start_instant = Instant::now();
    let mut core_cfg = cfg.core.clone();
    core_cfg.async_persist = true;
    let writer_engine = engine.clone();
    let core = MetaCore::open(
        core_cfg,
        engine,
        bootstrap,
        &crate::slog_bridge::logger(),
        0,
    )?;

    let client_listener = bind(cfg.listen_client).await?;
    let peer_listener = bind(cfg.listen_peer).await?;

    let dir = Arc::new(Directory::default());
    dir.update(&cfg.initial_cluster);
    let (inputs, rx) = std_mpsc::sync_channel(limits::MAX_PENDING_REQUESTS);
    let blocked = Arc::new(Mutex::new(HashSet::new()));
    let transport = Transport {
        me: cfg.id,
        runtime: tokio::runtime::Handle::current(),
        dir: dir.clone(),
        peers: Mutex::new(HashMap::new()),
        inputs: inputs.clone(),
        blocked: blocked.clone(),
    };
    let stopped = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (persist, persist_rx) = std_mpsc::channel();
    {
        let done = inputs.clone();
        std::thread::Builder::new()
            .name(format!("meta-log-{}", cfg.id))
            .spawn(move || log_writer(writer_engine, persist_rx, done))
            .map_err(|e| StartError::DataDir {
                path: cfg.data_dir.clone(),
                source: e,
            })?;
    }
    let core_thread = {
        let stop = stop.clone();
        let stopped = stopped.clone();
        let metrics = metrics.clone();
        let data_dir = cfg.data_dir.clone();
        let tick = Duration::from_millis(cfg.tick_ms.max(1));
        std::thread::Builder::new()
            .name(format!("meta-core-{}", cfg.id))
            .spawn(move || {
                let mut l = CoreLoop {
                    core,
                    rx,
                    transport,
                    replies: HashMap::new(),
                    watches: HashMap::new(),
                    watch_requests: HashMap::new(),
                    next_id: 1,
                    start: start_instant,
                    metrics,
                    data_dir,
                    stop,
                    persist,
                };
                l.run(tick);
                stopped.notify_waiters();
                stopped.notify_one();
            })
            .map_err(|e| StartError::DataDir {
                path: cfg.data_dir.clone(),
                source: e,
            })?
    };

    let svc = MetaService {
        inputs: inputs.clone(),
        dir: dir.clone(),
        next_watch: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        timeout: Duration::from_millis(cfg.core.request_timeout_ms + 1000),
    };
    let raft_svc = RaftService {
        me: cfg.id,
        inputs: inputs.clone(),
        dir: dir.clone(),
        blocked: blocked.clone(),
        faults_enabled: cfg.enable_fault_injection,
    };
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(
                MetaServer::new(svc)
                    .max_decoding_message_size(limits::MAX_REQUEST_BYTES)
                    .max_encoding_message_size(64 * 1024 * 1024),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                client_listener,
            ))
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "client API server failed");
        }
    }));
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(
                RaftServer::new(raft_svc)
                    .max_decoding_message_size(limits::MAX_RAFT_MESSAGE_BYTES)
                    .max_encoding_message_size(limits::MAX_RAFT_MESSAGE_BYTES),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                peer_listener,
            ))
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "raft server failed");
        }
    }));
    if let Some(addr) = cfg.metrics_addr {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| StartError::Listen { addr, source })?;
        tasks.push(tokio::spawn(crate::metrics::serve(listener, metrics)));
    }
    tracing::info!(
        member = cfg.id,
        client = %cfg.listen_client,
        peer = %cfg.listen_peer,
        data_dir = %cfg.data_dir.display(),
        "meta member started"
    );
    Ok(MetaHandle {
        inputs,
        stop,
        core_thread: Some(core_thread),
        stopped,
        tasks,
    })
}

/// A dropped snapshot must be reported, or raft-rs waits for it until `snapshot_retry_ms`.
fn report_dropped(m: &Message, to: u64, inputs: &std_mpsc::SyncSender<Input>) {
    if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
        let _ = inputs.try_send(Input::SnapshotFailed(to));
    }
}

fn is_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        cur = err.source();
    }
    false
}

/// After a peer's inbound stream broke: is its process gone? A refused connection says so; a
/// timeout (partition) does not.
async fn probe_peer(peer: u64, dir: Arc<Directory>, inputs: std_mpsc::SyncSender<Input>) {
    let Some(m) = dir.get(peer) else {
        return;
    };
    let connect = tokio::net::TcpStream::connect(m.peer_addr.as_str());
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            let _ = inputs.try_send(Input::PeerDown(peer));
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

struct CoreLoop {
    core: MetaCore<MeteredEngine>,
    rx: std_mpsc::Receiver<Input>,
    transport: Transport,
    replies: HashMap<RequestId, Reply>,
    watches: HashMap<WatchId, WatchTx>,
    /// Watch registrations awaiting the core's answer (dropped again if it refuses).
    watch_requests: HashMap<RequestId, WatchId>,
    next_id: RequestId,
    start: Instant,
    metrics: Arc<Metrics>,
    data_dir: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Appends for the log writer thread.
    persist: std_mpsc::Sender<PersistTask>,
}

type PersistTask = (u64, WriteBatch, bool);

/// The log writer: makes appends durable off the core thread, in order. Tasks that queued up
/// while the previous write synced go out together in one write and one fsync (group commit).
fn log_writer<E: Engine>(
    engine: E,
    tasks: std_mpsc::Receiver<PersistTask>,
    done: std_mpsc::SyncSender<Input>,
) {
    while let Ok(first) = tasks.recv() {
        let (mut number, mut batch, mut sync) = first;
        while let Ok((n, b, s)) = tasks.try_recv() {
            number = n;
            batch.ops.extend(b.ops);
            sync |= s;
        }
        let result = if batch.is_empty() {
            Ok(())
        } else {
            engine.write(batch, sync)
        };
        let input = match result {
            Ok(()) => Input::Persisted(number),
            Err(e) => Input::PersistFailed(e.to_string()),
        };
        let failed = matches!(input, Input::PersistFailed(_));
        // Blocking send: completions must never be dropped (the core never waits on us).
        if done.send(input).is_err() || failed {
            return;
        }
    }
}

impl CoreLoop {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn run(&mut self, tick: Duration) {
        let mut next_tick = Instant::now() + tick;
        let mut next_disk_check = Instant::now();
        while !self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Input::Shutdown) => return,
                Ok(input) => self.handle(input),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
            // Take everything queued meanwhile: one Ready round (one fsync) serves them all.
            for _ in 0..limits::MAX_PENDING_REQUESTS {
                match self.rx.try_recv() {
                    Ok(Input::Shutdown) => return,
                    Ok(input) => self.handle(input),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= next_disk_check {
                self.core.handle_disk_free(free_bytes(&self.data_dir));
                next_disk_check = now + Duration::from_millis(10);
            }
            if now >= next_tick {
                self.core.handle_tick(self.now_ms());
                self.metrics.db_size.set(self.core.db_size_bytes() as i64);
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
            }
            self.core.process();
            self.drain_outputs();
            self.metrics.observe(&self.core);
            if self.core.is_stopped() {
                self.drain_outputs();
                return;
            }
        }
    }

    fn handle(&mut self, input: Input) {
        let now = self.now_ms();
        match input {
            Input::Request(req, reply) => {
                let id = self.next_id;
                self.next_id += 1;
                self.replies.insert(id, reply);
                self.core.handle_request(now, id, req);
            }
            Input::Watch(watch_id, req, tx, reply) => {
                let id = self.next_id;
                self.next_id += 1;
                self.replies.insert(id, reply);
                self.watches.insert(watch_id, tx);
                self.watch_requests.insert(id, watch_id);
                self.core
                    .handle_request(now, id, Request::Watch { watch_id, req });
            }
            Input::Raft(m) => self.core.handle_message(now, m),
            Input::Unreachable(p) => self.core.handle_unreachable(p),
            Input::Persisted(n) => self.core.handle_persisted(n),
            Input::PersistFailed(reason) => self.core.handle_persist_failed(reason),
            Input::PeerDown(p) => {
                self.core.handle_unreachable(p);
                self.core.handle_peer_down(now, p);
            }
            Input::SnapshotFailed(p) => self.core.handle_snapshot_status(p, false),
            Input::CancelWatch(w) => {
                self.watches.remove(&w);
                self.core.handle_cancel_watch(w);
            }
            Input::Shutdown => {}
        }
    }

    fn drain_outputs(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Send(m) => self.transport.send(m),
                Output::Respond { id, result } => {
                    if let Some(watch_id) = self.watch_requests.remove(&id) {
                        if result.is_err() {
                            self.watches.remove(&watch_id);
                        }
                    }
                    if let Some(reply) = self.replies.remove(&id) {
                        let _ = reply.send(result);
                    }
                }
                Output::WatchEvents {
                    watch_id,
                    revision,
                    events,
                } => {
                    let resp = WatchResponse {
                        header: Some(api::ResponseHeader {
                            member_id: self.core.id(),
                            revision,
                            raft_term: self.core.term(),
                            leader_id: self.core.leader_id(),
                        }),
                        events,
                        ..Default::default()
                    };
                    self.send_watch(watch_id, resp);
                }
                Output::WatchCanceled {
                    watch_id,
                    compact_revision,
                    reason,
                } => {
                    let resp = WatchResponse {
                        compact_revision,
                        canceled: true,
                        cancel_reason: reason,
                        ..Default::default()
                    };
                    self.send_watch(watch_id, resp);
                    self.watches.remove(&watch_id);
                    self.core.handle_cancel_watch(watch_id);
                }
                Output::Members(ms) => self.transport.dir.update(&ms),
                Output::Persist {
                    number,
                    batch,
                    sync,
                } => {
                    if self.persist.send((number, batch, sync)).is_err() {
                        self.core
                            .handle_persist_failed("the log writer thread is gone".into());
                    }
                }
                Output::Stopped { reason } => {
                    tracing::error!(%reason, "meta member stopped");
                    for (_, r) in self.replies.drain() {
                        let _ = r.send(Err(MetaError::Interrupted));
                    }
                }
            }
        }
    }

    fn send_watch(&mut self, watch_id: WatchId, resp: WatchResponse) {
        let Some(tx) = self.watches.get(&watch_id) else {
            return;
        };
        if tx.try_send(Ok(resp)).is_err() {
            // A slow or gone consumer: end its stream; the client resumes from its last revision.
            tracing::debug!(watch_id, "watch consumer too slow or gone; cancelling");
            self.watches.remove(&watch_id);
            self.core.handle_cancel_watch(watch_id);
        }
    }
}

#[derive(Clone)]
struct MetaService {
    inputs: std_mpsc::SyncSender<Input>,
    dir: Arc<Directory>,
    next_watch: Arc<std::sync::atomic::AtomicU64>,
    timeout: Duration,
}

/// Metadata keys that carry machine-readable error details to the client library.
pub const ERROR_KIND_KEY: &str = "continuum-error";
pub const LEADER_ID_KEY: &str = "continuum-leader-id";
pub const LEADER_ADDR_KEY: &str = "continuum-leader-addr";

impl MetaService {
    fn status_of(&self, e: MetaError) -> Status {
        let msg = e.to_string();
        let (mut status, kind) = match &e {
            MetaError::NotLeader { .. } => (Status::unavailable(msg), "not-leader"),
            MetaError::LeaderChanged => (Status::unavailable(msg), "leader-changed"),
            MetaError::Timeout { .. } => (Status::deadline_exceeded(msg), "timeout"),
            MetaError::Busy { .. } => (Status::resource_exhausted(msg), "busy"),
            MetaError::InvalidArgument { .. } => (Status::invalid_argument(msg), "invalid"),
            MetaError::LeaseNotFound { .. } | MetaError::MemberNotFound { .. } => {
                (Status::not_found(msg), "not-found")
            }
            MetaError::LeaseExists { .. } | MetaError::MemberExists { .. } => {
                (Status::already_exists(msg), "exists")
            }
            MetaError::Compacted { .. } => (Status::out_of_range(msg), "compacted"),
            MetaError::LearnerNotReady { .. } | MetaError::MembershipRejected { .. } => {
                (Status::failed_precondition(msg), "rejected")
            }
            MetaError::NoSpace { .. } => (Status::resource_exhausted(msg), "no-space"),
            MetaError::Stopped => (Status::unavailable(msg), "stopped"),
            MetaError::Interrupted => (Status::unavailable(msg), "interrupted"),
            MetaError::Store(StoreError::NoSpace { .. }) => {
                (Status::resource_exhausted(msg), "no-space")
            }
            MetaError::Store(_) => (Status::internal(msg), "internal"),
        };
        let md = status.metadata_mut();
        if let Ok(v) = kind.parse() {
            md.insert(ERROR_KIND_KEY, v);
        }
        if let MetaError::NotLeader {
            leader_id: Some(leader),
        } = e
        {
            if let Ok(v) = leader.to_string().parse() {
                md.insert(LEADER_ID_KEY, v);
            }
            if let Some(m) = self.dir.get(leader) {
                if let Ok(v) = m.client_addr.parse() {
                    md.insert(LEADER_ADDR_KEY, v);
                }
            }
        }
        status
    }

    fn submit(&self, input: Input) -> Result<(), Status> {
        self.inputs.try_send(input).map_err(|e| match e {
            std_mpsc::TrySendError::Full(_) => Status::resource_exhausted(format!(
                "the member is overloaded ({} requests queued)",
                limits::MAX_PENDING_REQUESTS
            )),
            std_mpsc::TrySendError::Disconnected(_) => Status::unavailable("the member is stopped"),
        })
    }

    async fn call(&self, req: Request) -> Result<Response, Status> {
        let (tx, rx) = oneshot::channel();
        self.submit(Input::Request(req, tx))?;
        self.wait(rx).await
    }

    async fn wait(
        &self,
        rx: oneshot::Receiver<Result<Response, MetaError>>,
    ) -> Result<Response, Status> {
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r.map_err(|e| self.status_of(e)),
            // The core went away with the request pending: it may have been proposed.
            Ok(Err(_)) => Err(self.status_of(MetaError::Interrupted)),
            Err(_) => Err(self.status_of(MetaError::Timeout {
                timeout_ms: self.timeout.as_millis() as u64,
            })),
        }
    }
}

fn unexpected(r: Response) -> Status {
    Status::internal(format!("unexpected internal response {r:?}"))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl api::meta_server::Meta for MetaService {
    async fn range(
        &self,
        req: GrpcRequest<api::RangeRequest>,
    ) -> Result<GrpcResponse<api::RangeResponse>, Status> {
        match self.call(Request::Range(req.into_inner())).await? {
            Response::Range(r) => Ok(GrpcResponse::new(r)),
            r => Err(unexpected(r)),
        }
    }

    async fn put(
        &self,
        req: GrpcRequest<api::PutRequest>,
    ) -> Result<GrpcResponse<api::PutResponse>, Status> {
        match self.call(Request::Put(req.into_inner())).await? {
            Response::Applied(Applied::Put(r)) => Ok(GrpcResponse::new(r)),
            r => Err(unexpected(r)),
        }
    }

    async fn delete_range(
        &self,
        req: GrpcRequest<api::DeleteRangeRequest>,
    ) -> Result<GrpcResponse<api::DeleteRangeResponse>, Status> {
        match self.call(Request::DeleteRange(req.into_inner())).await? {
            Response::Applied(Applied::DeleteRange(r)) => Ok(GrpcResponse::new(r)),
            r => Err(unexpected(r)),
        }
    }

    async fn txn(
        &self,
        req: GrpcRequest<api::TxnRequest>,
    ) -> Result<GrpcResponse<api::TxnResponse>, Status> {
        match self.call(Request::Txn(req.into_inner())).await? {
            Response::Applied(Applied::Txn(r)) => Ok(GrpcResponse::new(r)),
            r => Err(unexpected(r)),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: GrpcRequest<api::WatchRequest>,
    ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        let watch_id = self
            .next_watch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(limits::MAX_WATCH_BUFFER);
        let (rtx, rrx) = oneshot::channel();
        self.submit(Input::Watch(watch_id, req.into_inner(), tx, rtx))?;
        let revision = match self.wait(rrx).await? {
            Response::WatchCreated { revision } => revision,
            r => return Err(unexpected(r)),
        };
        // First message: the watch exists; its header carries the revision it started after.
        let created = WatchResponse {
            header: Some(api::ResponseHeader {
                revision,
                ..Default::default()
            }),
            ..Default::default()
        };
        let guard = WatchGuard {
            inputs: self.inputs.clone(),
            watch_id,
        };
        let stream = tokio_stream::once(Ok(created))
            .chain(ReceiverStream::new(rx))
            .map(move |item| {
                let _keep = &guard;
                item
            });
        Ok(GrpcResponse::new(Box::pin(stream)))
    }

    async fn lease_grant(
        &self,
        req: GrpcRequest<api::LeaseGrantRequest>,
    ) -> Result<GrpcResponse<api::LeaseGrantResponse>, Status> {
        match self.call(Request::LeaseGrant(req.into_inner())).await? {
            Response::Applied(Applied::LeaseGrant(r)) => Ok(GrpcResponse::new(r)),
            r => Err(unexpected(r)),
        }
    }

    async fn lease_revoke(
        &self,
        req: GrpcRequest<api::LeaseRevokeRequest>,
    ) -> Result<GrpcResponse<api::LeaseRevokeResponse>, Status> {
        match self.call(Request::LeaseRevoke(req.into_inner())).await? {
            Response::Applied(Applied::LeaseRevoke(r)) => Ok(GrpcResponse::new(r)),
            r => Err(unexpected(r)),
        }
    }

    async fn lease_keep_alive(
        &self,
        req: GrpcRequest<api::LeaseKeepAliveRequest>,
    ) -> Result<GrpcResponse<api::LeaseKeepAliveResponse>, Status> {
        match self
            .call(Request::LeaseKeepAlive(req.into_inner().id))
            .await?
        {
            Response::LeaseKeepAlive(r) => Ok(GrpcResponse::new(r)),
            r => Err(unexpected(r)),
        }
    }

    async fn lease_time_to_live(
        &self,
        req: GrpcRequest<api::LeaseTimeToLiveRequest>,
    ) -> Result<GrpcResponse<api::LeaseTimeToLiveResponse>, Status> {
        let r = req.into_inner();
        match self
            .call(Request::LeaseTimeToLive {
                id: r.id,
                keys: r.keys,
            })
            .await?
        {
            Response::LeaseTimeToLive(r) => Ok(GrpcResponse::new(r)),
            r => Err(unexpected(r)),
        }
    }

    async fn member_list(
        &self,
        _req: GrpcRequest<api::MemberListRequest>,
    ) -> Result<GrpcResponse<api::MemberListResponse>, Status> {
        match self.call(Request::MemberList).await? {
            Response::Members(header, members) => Ok(GrpcResponse::new(api::MemberListResponse {
                header: Some(header),
                members,
            })),
            r => Err(unexpected(r)),
        }
    }

    async fn member_add(
        &self,
        req: GrpcRequest<api::MemberAddRequest>,
    ) -> Result<GrpcResponse<api::MemberAddResponse>, Status> {
        let m = req
            .into_inner()
            .member
            .ok_or_else(|| Status::invalid_argument("member is required"))?;
        match self.call(Request::MemberAdd(m)).await? {
            Response::Members(header, members) => Ok(GrpcResponse::new(api::MemberAddResponse {
                header: Some(header),
                members,
            })),
            r => Err(unexpected(r)),
        }
    }

    async fn member_promote(
        &self,
        req: GrpcRequest<api::MemberPromoteRequest>,
    ) -> Result<GrpcResponse<api::MemberPromoteResponse>, Status> {
        match self
            .call(Request::MemberPromote(req.into_inner().id))
            .await?
        {
            Response::Members(header, members) => {
                Ok(GrpcResponse::new(api::MemberPromoteResponse {
                    header: Some(header),
                    members,
                }))
            }
            r => Err(unexpected(r)),
        }
    }

    async fn member_remove(
        &self,
        req: GrpcRequest<api::MemberRemoveRequest>,
    ) -> Result<GrpcResponse<api::MemberRemoveResponse>, Status> {
        match self
            .call(Request::MemberRemove(req.into_inner().id))
            .await?
        {
            Response::Members(header, members) => {
                Ok(GrpcResponse::new(api::MemberRemoveResponse {
                    header: Some(header),
                    members,
                }))
            }
            r => Err(unexpected(r)),
        }
    }

    async fn status(
        &self,
        _req: GrpcRequest<api::StatusRequest>,
    ) -> Result<GrpcResponse<api::StatusResponse>, Status> {
        match self.call(Request::Status).await? {
            Response::Status(s) => Ok(GrpcResponse::new(s)),
            r => Err(unexpected(r)),
        }
    }
}

/// Cancels the core's watcher when the gRPC stream is dropped (client gone).
struct WatchGuard {
    inputs: std_mpsc::SyncSender<Input>,
    watch_id: WatchId,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _ = self.inputs.try_send(Input::CancelWatch(self.watch_id));
    }
}

/// Header a test uses to partition members: `x-continuum-fault: block=2,3` (or `block=`).
pub const FAULT_HEADER: &str = "x-continuum-fault";

struct RaftService {
    me: u64,
    inputs: std_mpsc::SyncSender<Input>,
    dir: Arc<Directory>,
    blocked: Arc<Mutex<HashSet<u64>>>,
    faults_enabled: bool,
}

#[tonic::async_trait]
impl api::raft_server::Raft for RaftService {
    async fn send(
        &self,
        req: GrpcRequest<tonic::Streaming<RaftEnvelope>>,
    ) -> Result<GrpcResponse<RaftAck>, Status> {
        if let Some(fault) = req.metadata().get(FAULT_HEADER) {
            return self.set_fault(fault.to_str().unwrap_or_default());
        }
        let mut stream = req.into_inner();
        let mut sender = None;
        loop {
            let next = stream.message().await;
            if !matches!(next, Ok(Some(_))) {
                // The sender went away (it keeps its stream open while it runs): find out
                // whether its process is gone.
                if let Some(peer) = sender {
                    tokio::spawn(probe_peer(peer, self.dir.clone(), self.inputs.clone()));
                }
            }
            let env = match next {
                Ok(Some(env)) => env,
                Ok(None) => break,
                Err(status) => return Err(status),
            };
            sender = Some(env.from);
            if self.blocked.lock().unwrap().contains(&env.from) {
                continue;
            }
            let msg = Message::decode(env.message.as_slice())
                .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
            if msg.from != env.from || msg.to != self.me || env.to != self.me {
                return Err(Status::invalid_argument(format!(
                    "raft message from {} to {} sent to member {}",
                    msg.from, msg.to, self.me
                )));
            }
            // A full queue drops the message; Raft retransmits.
            if let Err(std_mpsc::TrySendError::Disconnected(_)) =
                self.inputs.try_send(Input::Raft(msg))
            {
                return Err(Status::unavailable("member stopped"));
            }
        }
        Ok(GrpcResponse::new(RaftAck {}))
    }
}

impl RaftService {
    fn set_fault(&self, spec: &str) -> Result<GrpcResponse<RaftAck>, Status> {
        if !self.faults_enabled {
            return Err(Status::permission_denied(
                "fault injection is disabled (start with --enable-fault-injection)",
            ));
        }
        let ids = spec
            .strip_prefix("block=")
            .ok_or_else(|| Status::invalid_argument("expected block=ID,ID,..."))?;
        let mut set = HashSet::new();
        for id in ids.split(',').filter(|s| !s.is_empty()) {
            set.insert(
                id.trim()
                    .parse::<u64>()
                    .map_err(|_| Status::invalid_argument(format!("bad member id {id:?}")))?,
            );
        }
        tracing::warn!(blocked = ?set, "fault injection: blocking raft traffic");
        *self.blocked.lock().unwrap() = set;
        Ok(GrpcResponse::new(RaftAck {}))
    }
}

/// Parses `--read-mode`.
pub fn parse_read_mode(s: &str) -> Result<ReadMode, String> {
    match s {
        "safe" | "read-index" => Ok(ReadMode::Safe),
        "lease" => Ok(ReadMode::Lease),
        _ => Err(format!("unknown read mode {s:?} (expected safe or lease)")),
    }
}
