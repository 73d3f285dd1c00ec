//! The tokio driver: sockets (TCP, Unix), TLS (rustls), and requests executed concurrently
//! against an [`Export`] found through a [`Catalog`].
//!
//! One connection is a reader (decodes requests, starts each as its own task, at most
//! [`MAX_IN_FLIGHT`] at once) and a writer (sends replies as they complete, in any order, as the
//! protocol allows). Every request ends with a reply: the export's answer, or an error when the
//! export fails or does not answer within the request timeout, so a client never waits forever.
//! An export operation is never cancelled half-way (it runs to completion in its own task even
//! when the client was already told it failed), because the volume behind it keeps per-stripe
//! state that must not be torn.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::handshake::{Event, ExportEntry, ExportInfo, Handshake, Negotiated, Refusal, TlsMode};
use crate::transmission::{self, Command, Extent, Incoming, Params, Transmission};
use crate::wire::{self, ErrorCode};

/// Requests one connection may have in flight.
pub const MAX_IN_FLIGHT: usize = 128;
/// Replies queued for the writer of one connection.
const REPLY_QUEUE: usize = 256;
/// How long negotiation may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// An export operation's failure, as the client will see it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ExportError {
    pub code: ErrorCode,
    pub message: String,
}

impl ExportError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

pub type ExportResult<T> = std::result::Result<T, ExportError>;

/// A block device served over NBD. Offsets and lengths are validated against the size before
/// any call. Every method may be called concurrently.
pub trait Export: Send + Sync + 'static {
    fn read(&self, offset: u64, length: u32) -> impl Future<Output = ExportResult<Bytes>> + Send;
    /// With `fua`, durable before it returns.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send;
    /// Makes the range read as zeros; without `no_hole` the space may be freed.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send;
    /// A hint that the range is no longer needed.
    fn trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send;
    /// Every write completed before the call is durable when it returns.
    fn flush(&self) -> impl Future<Output = ExportResult<()>> + Send;
    /// Advisory prefetch.
    fn cache(&self, offset: u64, length: u32) -> impl Future<Output = ExportResult<()>> + Send;
    /// `base:allocation` extents from `offset`, covering at least one byte.
    fn block_status(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = ExportResult<Vec<Extent>>> + Send;
}

/// Where exports come from.
pub trait Catalog: Send + Sync + 'static {
    type Export: Export;
    fn list(&self) -> impl Future<Output = Vec<ExportEntry>> + Send;
    /// What `name` is, without opening it (NBD_OPT_INFO).
    fn describe(&self, name: &str) -> impl Future<Output = Result<ExportInfo, Refusal>> + Send;
    /// Opens `name` to serve it (NBD_OPT_GO, EXPORT_NAME).
    fn open(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(ExportInfo, Arc<Self::Export>), Refusal>> + Send;
}

/// How the server treats connections.
#[derive(Clone)]
pub struct ServerConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Refuse clients that do not start TLS (needs `tls`).
    pub tls_required: bool,
    /// A request the export has not answered by then gets EIO.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("tls", &self.tls.is_some())
            .field("tls_required", &self.tls_required)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl ServerConfig {
    fn tls_mode(&self) -> TlsMode {
        match (&self.tls, self.tls_required) {
            (None, _) => TlsMode::Off,
            (Some(_), false) => TlsMode::Optional,
            (Some(_), true) => TlsMode::Required,
        }
    }
}

/// A connection before or after STARTTLS.
enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, b),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("negotiation: {0}")]
    Negotiation(String),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("negotiation timed out")]
    Timeout,
}

/// Serves one client connection until it disconnects, violates the protocol, or `shutdown`
/// turns true (then in-flight requests finish first).
pub async fn serve_connection<C, S>(
    stream: S,
    catalog: Arc<C>,
    config: Arc<ServerConfig>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    C: Catalog,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let negotiated =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(stream, &*catalog, &config)).await;
    let Some((conn, n, export, leftover)) = negotiated.map_err(|_| ConnError::Timeout)?? else {
        return Ok(());
    };
    tracing::debug!(
        export = n.export.name,
        structured = n.structured,
        tls = n.tls,
        "serving"
    );
    transmit(conn, n, export, leftover, config, shutdown).await
}

type Opened<S, E> = Option<(Conn<S>, Negotiated, Arc<E>, BytesMut)>;

async fn negotiate<C, S>(
    stream: S,
    catalog: &C,
    config: &ServerConfig,
) -> Result<Opened<S, C::Export>, ConnError>
where
    C: Catalog,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn::Plain(stream);
    let mut hs = Handshake::new(config.tls_mode());
    let mut opened: Option<Arc<C::Export>> = None;
    loop {
        while let Some(event) = hs.poll_event() {
            match event {
                Event::Export { name, open: false } => {
                    let r = catalog.describe(&name).await;
                    hs.handle_export(r);
                }
                Event::Export { name, open: true } => match catalog.open(&name).await {
                    Ok((info, export)) => {
                        opened = Some(export);
                        hs.handle_export(Ok(info));
                    }
                    Err(r) => hs.handle_export(Err(r)),
                },
                Event::List => {
                    let list = catalog.list().await;
                    hs.handle_list(&list);
                }
                Event::StartTls => {
                    conn.write_all(&hs.take_output()).await?;
                    conn.flush().await?;
                    let (Conn::Plain(plain), Some(tls)) = (conn, config.tls.clone()) else {
                        return Err(ConnError::Negotiation("STARTTLS twice".into()));
                    };
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    let tls = acceptor.accept(plain).await.map_err(|e| {
                        ConnError::Negotiation(format!("TLS handshake failed: {e}"))
                    })?;
                    conn = Conn::Tls(Box::new(tls));
                    hs.handle_tls_started();
                }
                Event::Serve(n) => {
                    conn.write_all(&hs.take_output()).await?;
                    conn.flush().await?;
                    let export = opened.take().expect("serve follows a successful open");
                    return Ok(Some((conn, n, export, hs.into_leftover())));
                }
                Event::Close { reason } => {
                    let _ = conn.write_all(&hs.take_output()).await;
                    let _ = conn.shutdown().await;
                    tracing::debug!(reason, "negotiation ended");
                    return Ok(None);
                }
            }
        }
        let out = hs.take_output();
        if !out.is_empty() {
            conn.write_all(&out).await?;
            conn.flush().await?;
        }
        let buf = hs.input_buffer();
        buf.reserve(4096);
        if conn.read_buf(buf).await? == 0 {
            return Ok(None);
        }
        hs.handle_input(&[]);
    }
}

/// Resolves when `rx` turns true (never, if its sender is gone without saying so).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One reply for the writer: a header and, for reads, the data.
struct Reply {
    head: BytesMut,
    data: Option<Bytes>,
}

async fn transmit<E: Export, S>(
    conn: Conn<S>,
    n: Negotiated,
    export: Arc<E>,
    leftover: BytesMut,
    config: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let params = Params {
        size: n.export.size,
        read_only: n.export.flags & wire::TFLAG_READ_ONLY != 0,
        structured: n.structured,
        base_allocation: n.base_allocation,
        fast_zero: n.export.flags & wire::TFLAG_SEND_FAST_ZERO != 0,
    };
    let (mut rd, wr) = tokio::io::split(conn);
    let (tx, rx) = mpsc::channel::<Reply>(REPLY_QUEUE);
    let writer = tokio::spawn(write_replies(wr, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut t = Transmission::new(params, leftover);
    let result = loop {
        let mut stop = None;
        while let Some(item) = t.poll() {
            match item {
                Incoming::Request(req) => {
                    let Ok(permit) = slots.clone().acquire_owned().await else {
                        break;
                    };
                    let (export, tx, timeout) =
                        (export.clone(), tx.clone(), config.request_timeout);
                    tokio::spawn(async move {
                        respond(export, req, params, timeout, tx).await;
                        drop(permit);
                    });
                }
                Incoming::Reject {
                    cookie,
                    command,
                    error,
                    message,
                } => {
                    tracing::debug!(cookie, command, ?error, message, "request refused");
                    let mut head = BytesMut::new();
                    transmission::encode_error(
                        &mut head,
                        params.structured,
                        cookie,
                        error,
                        message,
                    );
                    if tx.send(Reply { head, data: None }).await.is_err() {
                        break;
                    }
                }
                Incoming::Disconnect => stop = Some(Ok(())),
                Incoming::Violation { reason } => stop = Some(Err(ConnError::Violation(reason))),
            }
        }
        if let Some(r) = stop {
            break r;
        }
        let want = t.wanted().max(64 * 1024);
        let buf = t.input_buffer();
        buf.reserve(want);
        tokio::select! {
            r = rd.read_buf(buf) => match r {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e.into()),
            },
            _ = stopped(&mut shutdown) => break Ok(()),
        }
    };
    // Every started request finishes and is answered before the connection closes.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(tx);
    let _ = writer.await;
    result
}

/// Sends replies as they complete: whatever is queued is gathered into one buffer (one
/// syscall for many small replies); read data of 16 KiB or more is written from its own
/// buffer next to the pending bytes (vectored), never copied.
async fn write_replies<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Reply>) {
    const DIRECT_BYTES: usize = 16 * 1024;
    const BATCH_BYTES: usize = 256 * 1024;
    let mut out = BytesMut::with_capacity(BATCH_BYTES);
    let result: io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(r) = next.take() {
                out.extend_from_slice(&r.head);
                match r.data {
                    Some(d) if d.len() >= DIRECT_BYTES => {
                        write_all_vectored(&mut w, &[&out, &d]).await?;
                        out.clear();
                    }
                    Some(d) => out.extend_from_slice(&d),
                    None => {}
                }
                if out.len() >= BATCH_BYTES {
                    w.write_all(&out).await?;
                    out.clear();
                }
                next = rx.try_recv().ok();
            }
            if !out.is_empty() {
                w.write_all(&out).await?;
                out.clear();
            }
            w.flush().await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "reply writer stopped");
    }
    let _ = w.shutdown().await;
}

/// Writes every byte of `parts`, in order, with as few syscalls as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Runs one request against the export and sends its reply. When the export has not answered
/// within `timeout`, the client gets EIO at once, but the operation itself runs on to its end
/// (it is never cancelled half-way); a panic in the export is an EIO reply too.
async fn respond<E: Export>(
    export: Arc<E>,
    req: transmission::Request,
    params: Params,
    timeout: Duration,
    tx: mpsc::Sender<Reply>,
) {
    use futures::FutureExt;
    let cookie = req.cookie;
    let command = req.command.clone();
    let op = std::panic::AssertUnwindSafe(run(export, req.command)).catch_unwind();
    tokio::pin!(op);
    let finished = |r: std::thread::Result<ExportResult<Outcome>>| match r {
        Ok(r) => r,
        Err(_) => Err(ExportError::new(ErrorCode::Io, "the export failed (panic)")),
    };
    let outcome = tokio::select! {
        r = &mut op => finished(r),
        _ = tokio::time::sleep(timeout) => {
            let late = Err(ExportError::new(
                ErrorCode::Io,
                format!("no answer within {} s", timeout.as_secs()),
            ));
            let _ = tx.send(encode_reply(cookie, &command, params, late)).await;
            let _ = op.await;
            return;
        }
    };
    let _ = tx
        .send(encode_reply(cookie, &command, params, outcome))
        .await;
}

fn encode_reply(
    cookie: u64,
    command: &Command,
    params: Params,
    outcome: ExportResult<Outcome>,
) -> Reply {
    let mut head = BytesMut::with_capacity(64);
    match outcome {
        Ok(Outcome::Done) => transmission::encode_ok(&mut head, cookie),
        Ok(Outcome::Data(data)) => {
            let Command::Read { offset, .. } = command else {
                unreachable!("data only for reads")
            };
            transmission::encode_read_header(
                &mut head,
                params.structured,
                cookie,
                *offset,
                data.len() as u32,
            );
            return Reply {
                head,
                data: Some(data),
            };
        }
        Ok(Outcome::Extents(extents)) => {
            let Command::BlockStatus {
                length,
                req_one,
                context,
                ..
            } = command
            else {
                unreachable!("extents only for block status")
            };
            transmission::encode_block_status(
                &mut head, cookie, *context, *length, *req_one, &extents,
            )
        }
        Err(e) => {
            tracing::warn!(cookie, command = command.code(), error = %e, "request failed");
            transmission::encode_error(&mut head, params.structured, cookie, e.code, &e.message)
        }
    }
    Reply { head, data: None }
}

enum Outcome {
    Done,
    Data(Bytes),
    Extents(Vec<Extent>),
}

async fn run<E: Export>(export: Arc<E>, command: Command) -> ExportResult<Outcome> {
    match command {
        Command::Read { offset, length } => {
            let data = export.read(offset, length).await?;
            if data.len() != length as usize {
                return Err(ExportError::new(ErrorCode::Io, "short read"));
            }
            Ok(Outcome::Data(data))
        }
        Command::Write { offset, data, fua } => {
            export.write(offset, data, fua).await.map(|_| Outcome::Done)
        }
        Command::Flush => export.flush().await.map(|_| Outcome::Done),
        Command::Trim {
            offset,
            length,
            fua,
        } => export
            .trim(offset, length, fua)
            .await
            .map(|_| Outcome::Done),
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            ..
        } => export
            .write_zeroes(offset, length, fua, no_hole)
            .await
            .map(|_| Outcome::Done),
        Command::Cache { offset, length } => {
            export.cache(offset, length).await.map(|_| Outcome::Done)
        }
        Command::BlockStatus { offset, length, .. } => export
            .block_status(offset, length)
            .await
            .map(Outcome::Extents),
    }
}

/// Accepts connections on `listener` until `shutdown`, serving each in its own task; returns
/// after every connection has finished.
pub async fn serve_tcp<C: Catalog>(
    listener: tokio::net::TcpListener,
    catalog: Arc<C>,
    config: Arc<ServerConfig>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    serve_loop(
        || async {
            let (s, peer) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((s, peer.to_string()))
        },
        catalog,
        config,
        shutdown,
    )
    .await
}

/// As [`serve_tcp`], on a Unix socket.
pub async fn serve_unix<C: Catalog>(
    listener: tokio::net::UnixListener,
    catalog: Arc<C>,
    config: Arc<ServerConfig>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    serve_loop(
        || async {
            let (s, _) = listener.accept().await?;
            Ok((s, "unix".to_string()))
        },
        catalog,
        config,
        shutdown,
    )
    .await
}

async fn serve_loop<C, S, F, Fut>(
    mut accept: F,
    catalog: Arc<C>,
    config: Arc<ServerConfig>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    C: Catalog,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<(S, String)>>,
{
    let mut conns = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            r = accept() => match r {
                Ok((s, peer)) => {
                    let (catalog, config, shutdown) = (catalog.clone(), config.clone(), shutdown.clone());
                    conns.spawn(async move {
                        match serve_connection(s, catalog, config, shutdown).await {
                            Ok(()) => tracing::debug!(peer, "connection closed"),
                            Err(e) => tracing::info!(peer, error = %e, "connection ended"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stopped(&mut stop) => break,
        }
    }
    while conns.join_next().await.is_some() {}
    Ok(())
}
