//! A connection to one block server, as the volume client uses it: pipelined requests matched
//! by id, at most [`MAX_IN_FLIGHT`] at once, each with a deadline.
//!
//! The connection is made lazily and remade after a failure. A transport failure (refused,
//! reset, timed out) fails every request in flight with [`ShardError::Transport`]: the outcome
//! of a write in flight is then unknown, and the volume client treats the shard as missing
//! until it has reconciled it. A server's explicit refusal is [`ShardError::Status`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::protocol::{self, pb};
use crate::store::{
    ObjectInfo, ObjectKey, OpenedNote, ReadOutcome, Version, WriteOutcome, WriteReq,
};
use crate::wire::{FrameDecoder, FrameRepr, Kind};

/// Requests in flight on one connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// Objects per stabilize or rollback request: a few tens of bytes each in the header, so a
/// request stays far below [`crate::wire::MAX_HEADER_BYTES`] (a flush under heavy random
/// writes queues thousands per server).
pub const OBJECTS_PER_REQUEST: usize = 1024;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ShardError {
    #[error("block server {addr}: {reason}")]
    Transport { addr: String, reason: String },
    #[error("block server {addr} refused: {status:?}: {message}")]
    Status {
        addr: String,
        status: pb::Status,
        message: String,
        current: Option<Version>,
    },
    #[error("block server {addr} sent a malformed response: {reason}")]
    Protocol { addr: String, reason: &'static str },
}

impl ShardError {
    pub fn status(&self) -> Option<pb::Status> {
        match self {
            ShardError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A byte stream to a block server.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// What [`Dialer::dial`] returns.
pub type Dialing = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Stream>>> + Send>>;

/// How a client reaches a server address: TCP ([`TcpDialer`]) in every deployment; the chaos
/// simulator dials in-process pipes through its simulated network instead.
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self, addr: &str) -> Dialing;
}

/// Dials `host:port` over TCP (no Nagle: requests are small and latency-bound).
#[derive(Debug, Default)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial(&self, addr: &str) -> Dialing {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as Box<dyn Stream>)
        })
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<FrameRepr, ShardError>>>>>;

struct Conn {
    tx: mpsc::Sender<FrameRepr>,
    pending: Pending,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

/// A handle to one block server; cheap to clone.
#[derive(Clone)]
pub struct BlockClient {
    addr: String,
    timeout: Duration,
    next_id: Arc<AtomicU64>,
    conn: Arc<tokio::sync::Mutex<Option<Conn>>>,
    slots: Arc<Semaphore>,
    dialer: Arc<dyn Dialer>,
}

impl std::fmt::Debug for BlockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockClient({})", self.addr)
    }
}

impl BlockClient {
    pub fn new(addr: impl Into<String>, timeout: Duration) -> Self {
        Self::with_dialer(addr, timeout, Arc::new(TcpDialer))
    }

    /// A client that reaches `addr` through `dialer`.
    pub fn with_dialer(
        addr: impl Into<String>,
        timeout: Duration,
        dialer: Arc<dyn Dialer>,
    ) -> Self {
        Self {
            addr: addr.into(),
            timeout,
            next_id: Arc::new(AtomicU64::new(1)),
            conn: Arc::default(),
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            dialer,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn transport(&self, reason: impl std::fmt::Display) -> ShardError {
        ShardError::Transport {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    async fn connection(&self) -> Result<(mpsc::Sender<FrameRepr>, Pending), ShardError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok((c.tx.clone(), c.pending.clone()));
            }
        }
        let stream = tokio::time::timeout(self.timeout, self.dialer.dial(&self.addr))
            .await
            .map_err(|_| self.transport("connect timed out"))?
            .map_err(|e| self.transport(format!("connect: {e}")))?;
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
        let pending: Pending = Arc::default();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        tokio::spawn(writer(wr, rx, alive.clone()));
        tokio::spawn(reader(
            rd,
            pending.clone(),
            alive.clone(),
            self.addr.clone(),
        ));
        *guard = Some(Conn {
            tx: tx.clone(),
            pending: pending.clone(),
            alive,
        });
        Ok((tx, pending))
    }

    /// Sends one request and waits for its response (or the deadline).
    pub async fn call(
        &self,
        op: pb::request::Op,
        payload: Bytes,
    ) -> Result<(pb::Response, Bytes), ShardError> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let (tx, pending) = self.connection().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = FrameRepr {
            kind: Kind::Request,
            request_id: id,
            header: pb::Request { op: Some(op) }.encode_to_vec().into(),
            payload,
        };
        if let Err(e) = frame.check_limits() {
            // A caller's bug, answered as an error (the connection's writer would refuse it).
            tracing::error!(addr = %self.addr, error = %e, "request over the frame limits");
            // Refused as the server would refuse an invalid request: the server is fine.
            return Err(ShardError::Status {
                addr: self.addr.clone(),
                status: pb::Status::Invalid,
                message: format!("request not sent: {e}"),
                current: None,
            });
        }
        let (done_tx, done_rx) = oneshot::channel();
        pending.lock().expect("poisoned").insert(id, done_tx);
        if tx.send(frame).await.is_err() {
            pending.lock().expect("poisoned").remove(&id);
            return Err(self.transport("connection closed"));
        }
        let frame = match tokio::time::timeout(self.timeout, done_rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(self.transport("connection closed")),
            Err(_) => {
                pending.lock().expect("poisoned").remove(&id);
                // The connection may be wedged: make the next call reconnect.
                self.reset().await;
                return Err(self.transport(format!("no answer within {:?}", self.timeout)));
            }
        };
        let resp = pb::Response::decode(frame.header).map_err(|_| ShardError::Protocol {
            addr: self.addr.clone(),
            reason: "undecodable response header",
        })?;
        if resp.status != pb::Status::Ok as i32 {
            return Err(ShardError::Status {
                addr: self.addr.clone(),
                status: pb::Status::from_i32(resp.status).unwrap_or(pb::Status::IoError),
                message: resp.message,
                current: resp
                    .current
                    .as_ref()
                    .map(|v| protocol::version_from_pb(Some(v))),
            });
        }
        Ok((resp, frame.payload))
    }

    /// Drops the connection (the next call reconnects).
    pub async fn reset(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            c.alive.store(false, Ordering::Release);
        }
    }

    pub async fn write(
        &self,
        w: &WriteReq,
        payload: Bytes,
        stabilize: &[(ObjectKey, Version)],
    ) -> Result<WriteOutcome, ShardError> {
        let mut msg = protocol::write_to_pb(w);
        msg.stabilize = protocol::object_versions_to_pb(stabilize);
        let (resp, old) = self.call(pb::request::Op::Write(msg), payload).await?;
        let Some(pb::response::Result::Write(r)) = resp.result else {
            return Err(self.malformed("write result missing"));
        };
        Ok(WriteOutcome {
            previous: protocol::version_from_pb(r.previous.as_ref()),
            old: w.return_old.then_some(old),
            incarnation: resp.incarnation,
        })
    }

    /// Reads a shard range as the writer of `epoch` (0: no lease; see `ReadShard.epoch`).
    pub async fn read(
        &self,
        object: ObjectKey,
        offset: u32,
        length: u32,
        epoch: u64,
    ) -> Result<ReadOutcome, ShardError> {
        let op = pb::request::Op::Read(pb::ReadShard {
            object: Some(protocol::object_to_pb(object)),
            offset,
            length,
            epoch,
        });
        let (resp, data) = self.call(op, Bytes::new()).await?;
        let Some(pb::response::Result::Read(r)) = resp.result else {
            return Err(self.malformed("read result missing"));
        };
        if data.len() != length as usize {
            return Err(self.malformed("read returned the wrong length"));
        }
        // Verify right after the bytes arrive (the server verified them on disk; this catches
        // the network and the server's memory).
        if crate::checksum::verify(&data, &r.crcs).is_err() {
            return Err(ShardError::Status {
                addr: self.addr.clone(),
                status: pb::Status::ChecksumMismatch,
                message: "read data failed its checksum in transit".into(),
                current: None,
            });
        }
        Ok(ReadOutcome {
            version: protocol::version_from_pb(r.version.as_ref()),
            data,
            crcs: r.crcs,
            data_versions: protocol::data_versions_from_pb(&r.data_versions),
        })
    }

    /// Stabilizes versions, in requests of at most [`OBJECTS_PER_REQUEST`] objects. Either
    /// way it is idempotent: after an error, the caller sends the whole list again.
    pub async fn stabilize(
        &self,
        epoch: u64,
        objects: &[(ObjectKey, Version)],
    ) -> Result<(), ShardError> {
        for part in objects.chunks(OBJECTS_PER_REQUEST) {
            let op = pb::request::Op::Stabilize(pb::Stabilize {
                epoch,
                objects: protocol::object_versions_to_pb(part),
            });
            self.call(op, Bytes::new()).await?;
        }
        Ok(())
    }

    /// Rolls versions back (each object's version and everything above it), in requests of
    /// at most [`OBJECTS_PER_REQUEST`] objects.
    pub async fn rollback(
        &self,
        epoch: u64,
        objects: &[(ObjectKey, Version)],
    ) -> Result<(), ShardError> {
        for part in objects.chunks(OBJECTS_PER_REQUEST) {
            let op = pb::request::Op::Rollback(pb::Rollback {
                epoch,
                objects: protocol::object_versions_to_pb(part),
            });
            self.call(op, Bytes::new()).await?;
        }
        Ok(())
    }

    /// Makes everything the server acknowledged durable; returns its incarnation (writes
    /// acknowledged by another incarnation are not covered: see `Response.incarnation`).
    pub async fn flush(&self) -> Result<u64, ShardError> {
        self.call(pb::request::Op::Flush(pb::Flush {}), Bytes::new())
            .await
            .map(|(resp, _)| resp.incarnation)
    }

    pub async fn delete_volume(&self, volume: u64, epoch: u64) -> Result<(), ShardError> {
        let op = pb::request::Op::DeleteVolume(pb::DeleteVolume { volume, epoch });
        self.call(op, Bytes::new()).await.map(|_| ())
    }

    /// Fences `volume` at `epoch` on this server (durable when it answers); with `opened`, also records that this writer serves I/O,
    /// with its note of undecided stripes. Returns the server's highest epoch, its highest
    /// opened epoch and that writer's last note, from before the request.
    pub async fn fence(
        &self,
        volume: u64,
        epoch: u64,
        opened: Option<&OpenedNote>,
    ) -> Result<(u64, u64, OpenedNote), ShardError> {
        let op = pb::request::Op::Fence(pb::Fence {
            volume,
            epoch,
            opened: opened.is_some(),
            undecided: opened.map_or_else(Vec::new, |n| protocol::undecided_to_pb(&n.undecided)),
            record: opened.map_or(0, |n| n.record),
        });
        let (resp, _) = self.call(op, Bytes::new()).await?;
        match resp.result {
            Some(pb::response::Result::Fence(f)) => Ok((
                f.previous_epoch,
                f.previous_opened,
                OpenedNote {
                    epoch: f.previous_opened,
                    record: f.opened_record,
                    undecided: protocol::undecided_from_pb(&f.opened_undecided),
                },
            )),
            _ => Err(self.malformed("fence result missing")),
        }
    }

    pub async fn hello(&self) -> Result<pb::HelloResult, ShardError> {
        let (resp, _) = self
            .call(pb::request::Op::Hello(pb::Hello {}), Bytes::new())
            .await?;
        match resp.result {
            Some(pb::response::Result::Hello(h)) => Ok(h),
            _ => Err(self.malformed("hello result missing")),
        }
    }

    /// One page of a volume's objects after `after`, as the writer of `epoch` (0: no lease).
    pub async fn list(
        &self,
        volume: u64,
        after: Option<ObjectKey>,
        limit: u32,
        unstable_only: bool,
        epoch: u64,
    ) -> Result<(Vec<ObjectInfo>, bool), ShardError> {
        let op = pb::request::Op::List(pb::ListObjects {
            volume,
            after: after.map(protocol::object_to_pb),
            limit,
            unstable_only,
            epoch,
        });
        let (resp, _) = self.call(op, Bytes::new()).await?;
        let Some(pb::response::Result::List(l)) = resp.result else {
            return Err(self.malformed("list result missing"));
        };
        let infos = l
            .objects
            .iter()
            .map(protocol::info_from_pb)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.malformed("object without an id"))?;
        Ok((infos, l.more))
    }

    /// Metadata of `objects`, as the writer of `epoch` (0: no lease).
    pub async fn stat(
        &self,
        objects: &[ObjectKey],
        epoch: u64,
    ) -> Result<Vec<ObjectInfo>, ShardError> {
        let op = pb::request::Op::Stat(pb::StatObjects {
            objects: objects.iter().map(|o| protocol::object_to_pb(*o)).collect(),
            epoch,
        });
        let (resp, _) = self.call(op, Bytes::new()).await?;
        let Some(pb::response::Result::Stat(l)) = resp.result else {
            return Err(self.malformed("stat result missing"));
        };
        l.objects
            .iter()
            .map(protocol::info_from_pb)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.malformed("object without an id"))
    }

    fn malformed(&self, reason: &'static str) -> ShardError {
        ShardError::Protocol {
            addr: self.addr.clone(),
            reason,
        }
    }
}

async fn writer(
    mut wr: tokio::io::WriteHalf<Box<dyn Stream>>,
    mut rx: mpsc::Receiver<FrameRepr>,
    alive: Arc<std::sync::atomic::AtomicBool>,
) {
    let _ = crate::conn::write_frames(&mut wr, &mut rx, Some(&alive)).await;
    alive.store(false, Ordering::Release);
    // Half-close: the server sees the end and closes its side, which ends the reader. (A
    // split stream is closed only when both halves are gone; without this, every connection
    // replaced after a timeout stayed open, with its reader task, for ever.)
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
}

async fn reader(
    mut rd: tokio::io::ReadHalf<Box<dyn Stream>>,
    pending: Pending,
    alive: Arc<std::sync::atomic::AtomicBool>,
    addr: String,
) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut decoder = FrameDecoder;
    let reason: String = 'outer: loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) if f.kind == Kind::Response => {
                    if let Some(tx) = pending.lock().expect("poisoned").remove(&f.request_id) {
                        let _ = tx.send(Ok(f));
                    }
                }
                Ok(Some(_)) => break 'outer "a request frame from the server".into(),
                Ok(None) => break,
                Err(e) => break 'outer format!("corrupt frame: {e}"),
            }
        }
        if !alive.load(Ordering::Acquire) {
            break "connection reset".into();
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "connection closed by the server".into(),
            Ok(_) => {}
            Err(e) => break format!("read: {e}"),
        }
    };
    alive.store(false, Ordering::Release);
    let waiting: Vec<_> = pending.lock().expect("poisoned").drain().collect();
    for (_, tx) in waiting {
        let _ = tx.send(Err(ShardError::Transport {
            addr: addr.clone(),
            reason: reason.clone(),
        }));
    }
}
