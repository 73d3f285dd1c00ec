//! Client library for Continuum's meta service.
//!
//! - **Leader discovery**: requests go to the last known leader; a `not-leader` answer carries
//!   the leader's address, which the client follows; unreachable members are skipped in turn.
//! - **Bounded retries and timeouts**: every call has a per-attempt timeout and an overall
//!   deadline. Reads are retried on any transient failure. Writes are retried only when the
//!   member says they were not applied (`not-leader`, connection refused); when the outcome is
//!   unknown (leader changed, timeout) the caller gets [`Error::Ambiguous`], as with etcd.
//! - **Watch streams** that resume after a reconnect from the last revision seen, so every
//!   change is delivered exactly once, in order ([`Watch`]).
//! - **Typed records** of the fabric ([`records`]).

pub mod records;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuum_proto::meta::{
    self as api, compare, meta_client::MetaClient as Grpc, request_op, Compare, Event, KeyValue,
    Member, RequestOp,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use continuum_proto::meta as proto;

/// Error detail keys set by the server (must match `continuum_meta::server`).
const ERROR_KIND_KEY: &str = "continuum-error";
const LEADER_ADDR_KEY: &str = "continuum-leader-addr";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no meta member answered after {attempts} attempts: {last}")]
    Unavailable { attempts: u32, last: String },
    #[error("the write's outcome is unknown ({reason}); read before retrying")]
    Ambiguous { reason: String },
    #[error("invalid request: {message}")]
    InvalidArgument { message: String },
    #[error("not found: {message}")]
    NotFound { message: String },
    #[error("already exists: {message}")]
    AlreadyExists { message: String },
    #[error("meta is out of space: {message}")]
    NoSpace { message: String },
    #[error("history compacted: resume from revision {compact_revision}")]
    Compacted { compact_revision: u64 },
    #[error("rejected: {message}")]
    Rejected { message: String },
    #[error("bad endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("meta error ({code:?}): {message}")]
    Rpc { code: Code, message: String },
    #[error("the record at {key:?} is corrupt: {reason}")]
    CorruptRecord { key: String, reason: String },
    #[error("conflict: {message}")]
    Conflict { message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Client addresses (`host:port`) of some members; the rest are discovered.
    pub endpoints: Vec<String>,
    /// Timeout of one attempt.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Overall deadline of a call, retries included.
    pub call_timeout: Duration,
    /// Most attempts per call.
    pub max_attempts: u32,
}

impl ClientConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            request_timeout: Duration::from_secs(7),
            connect_timeout: Duration::from_millis(500),
            call_timeout: Duration::from_secs(15),
            max_attempts: 20,
        }
    }
}

struct Inner {
    cfg: ClientConfig,
    /// Known endpoints with their lazily connected channels.
    endpoints: Mutex<Vec<(String, Channel)>>,
    /// Index into `endpoints` of the member believed to lead.
    current: Mutex<usize>,
}

/// A handle to the meta cluster; cheap to clone, safe to share.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

enum Failure {
    /// Definitely not applied; try `Some(addr)` (the leader) or the next member.
    Retry(Option<String>),
    /// May or may not have been applied.
    Unknown(String),
    Fatal(Error),
}

fn kind(status: &Status) -> &str {
    status
        .metadata()
        .get(ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn classify(status: Status) -> Failure {
    let message = status.message().to_string();
    match (status.code(), kind(&status)) {
        (_, "not-leader") => Failure::Retry(
            status
                .metadata()
                .get(LEADER_ADDR_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        ),
        (_, "stopped") | (_, "busy") => Failure::Retry(None),
        (_, "leader-changed") | (_, "timeout") | (_, "interrupted") => Failure::Unknown(message),
        (_, "no-space") => Failure::Fatal(Error::NoSpace { message }),
        (_, "compacted") => Failure::Fatal(Error::Compacted {
            compact_revision: parse_compact(&message),
        }),
        (Code::InvalidArgument, _) => Failure::Fatal(Error::InvalidArgument { message }),
        (Code::NotFound, _) => Failure::Fatal(Error::NotFound { message }),
        (Code::AlreadyExists, _) => Failure::Fatal(Error::AlreadyExists { message }),
        (Code::FailedPrecondition, _) => Failure::Fatal(Error::Rejected { message }),
        // A transport failure before the request left: safe to send elsewhere.
        (Code::Unavailable, "") if is_connect_error(&message) => Failure::Retry(None),
        (Code::Unavailable, _) | (Code::Unknown, _) | (Code::Cancelled, _) => {
            Failure::Unknown(message)
        }
        (Code::DeadlineExceeded, _) => Failure::Unknown(message),
        (code, _) => Failure::Fatal(Error::Rpc { code, message }),
    }
}

fn is_connect_error(message: &str) -> bool {
    message.contains("error trying to connect")
        || message.contains("Connection refused")
        || message.contains("tcp connect error")
}

fn parse_compact(message: &str) -> u64 {
    message
        .rsplit("starts at ")
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn channel(cfg: &ClientConfig, addr: &str) -> Result<Channel> {
    let url = if addr.starts_with("http://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ep = Endpoint::from_shared(url).map_err(|e| Error::BadEndpoint {
        endpoint: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(ep
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

impl MetaClient {
    /// Creates a client; connections are made on first use.
    pub fn new(cfg: ClientConfig) -> Result<Self> {
        if cfg.endpoints.is_empty() {
            return Err(Error::BadEndpoint {
                endpoint: String::new(),
                reason: "at least one endpoint is needed".into(),
            });
        }
        let mut eps = Vec::new();
        for e in &cfg.endpoints {
            eps.push((e.clone(), channel(&cfg, e)?));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                endpoints: Mutex::new(eps),
                current: Mutex::new(0),
            }),
        })
    }

    /// Shorthand for `new(ClientConfig::new(endpoints))`.
    pub fn connect<S: AsRef<str>>(endpoints: &[S]) -> Result<Self> {
        Self::new(ClientConfig::new(
            endpoints.iter().map(|s| s.as_ref().to_string()).collect(),
        ))
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    fn pick(&self) -> (usize, Grpc<Channel>) {
        let eps = self.inner.endpoints.lock().unwrap();
        let i = *self.inner.current.lock().unwrap() % eps.len();
        let grpc = Grpc::new(eps[i].1.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        (i, grpc)
    }

    fn redirect(&self, from: usize, leader: Option<String>) {
        let mut eps = self.inner.endpoints.lock().unwrap();
        let mut cur = self.inner.current.lock().unwrap();
        if let Some(addr) = leader {
            if let Some(i) = eps.iter().position(|(a, _)| *a == addr) {
                *cur = i;
                return;
            }
            if let Ok(ch) = channel(&self.inner.cfg, &addr) {
                eps.push((addr, ch));
                *cur = eps.len() - 1;
                return;
            }
        }
        if *cur == from {
            *cur = (from + 1) % eps.len();
        }
    }

    /// Runs `f` against the leader with retries (see the crate doc for the policy).
    async fn call<T, F, Fut>(&self, idempotent: bool, f: F) -> Result<T>
    where
        F: Fn(Grpc<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let cfg = &self.inner.cfg;
        let deadline = tokio::time::Instant::now() + cfg.call_timeout;
        let mut backoff = Duration::from_millis(20);
        let mut last = String::from("no attempt made");
        for attempt in 1..=cfg.max_attempts {
            let (i, grpc) = self.pick();
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                break;
            }
            let failure = match tokio::time::timeout(cfg.request_timeout.min(remaining), f(grpc))
                .await
            {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => classify(status),
                Err(_) => Failure::Unknown(format!("no answer within {:?}", cfg.request_timeout)),
            };
            match failure {
                Failure::Retry(leader) => {
                    let followed = leader.is_some();
                    last = format!("member {i} redirected or was unreachable");
                    self.redirect(i, leader);
                    if followed {
                        continue;
                    }
                }
                Failure::Unknown(reason) if idempotent => {
                    last = reason;
                    self.redirect(i, None);
                }
                Failure::Unknown(reason) => return Err(Error::Ambiguous { reason }),
                Failure::Fatal(e) => return Err(e),
            }
            tracing::debug!(attempt, %last, "meta call retrying");
            tokio::time::sleep(
                backoff.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
        Err(Error::Unavailable {
            attempts: cfg.max_attempts,
            last,
        })
    }

    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<api::PutResponse> {
        self.put_with(api::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn put_with(&self, req: api::PutRequest) -> Result<api::PutResponse> {
        check_sizes(&req.key, Some(&req.value))?;
        self.call(false, |mut c| {
            let req = req.clone();
            async move { c.put(req).await }
        })
        .await
    }

    /// Linearizable read of one key.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>> {
        let r = self
            .range(api::RangeRequest {
                key: key.into(),
                ..Default::default()
            })
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Linearizable read of every key under `prefix` (up to the server's range limit; see
    /// `RangeResponse::more`).
    pub async fn get_prefix(&self, prefix: impl Into<Vec<u8>>) -> Result<Vec<KeyValue>> {
        let prefix = prefix.into();
        let r = self
            .range(api::RangeRequest {
                range_end: prefix_end(&prefix),
                key: prefix,
                ..Default::default()
            })
            .await?;
        Ok(r.kvs)
    }

    pub async fn range(&self, req: api::RangeRequest) -> Result<api::RangeResponse> {
        self.call(true, |mut c| {
            let req = req.clone();
            async move { c.range(req).await }
        })
        .await
    }

    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<api::DeleteRangeResponse> {
        self.delete_range(api::DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn delete_range(
        &self,
        req: api::DeleteRangeRequest,
    ) -> Result<api::DeleteRangeResponse> {
        self.call(false, |mut c| {
            let req = req.clone();
            async move { c.delete_range(req).await }
        })
        .await
    }

    pub async fn txn(&self, req: api::TxnRequest) -> Result<api::TxnResponse> {
        self.call(false, |mut c| {
            let req = req.clone();
            async move { c.txn(req).await }
        })
        .await
    }

    pub async fn lease_grant(&self, ttl_seconds: u64) -> Result<api::LeaseGrantResponse> {
        self.call(false, |mut c| async move {
            c.lease_grant(api::LeaseGrantRequest { ttl_seconds, id: 0 })
                .await
        })
        .await
    }

    pub async fn lease_revoke(&self, id: u64) -> Result<()> {
        self.call(false, |mut c| async move {
            c.lease_revoke(api::LeaseRevokeRequest { id }).await
        })
        .await
        .map(|_| ())
    }

    pub async fn lease_keep_alive(&self, id: u64) -> Result<api::LeaseKeepAliveResponse> {
        self.call(true, |mut c| async move {
            c.lease_keep_alive(api::LeaseKeepAliveRequest { id }).await
        })
        .await
    }

    pub async fn lease_time_to_live(
        &self,
        id: u64,
        keys: bool,
    ) -> Result<api::LeaseTimeToLiveResponse> {
        self.call(true, |mut c| async move {
            c.lease_time_to_live(api::LeaseTimeToLiveRequest { id, keys })
                .await
        })
        .await
    }

    /// Keeps `lease` alive in the background (every third of its TTL) until the handle is
    /// aborted or the lease is gone.
    pub fn spawn_keep_alive(&self, lease: u64, ttl_seconds: u64) -> tokio::task::JoinHandle<()> {
        let client = self.clone();
        let every = Duration::from_millis((ttl_seconds * 1000 / 3).max(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match client.lease_keep_alive(lease).await {
                    Ok(_) => {}
                    Err(Error::NotFound { .. }) => return,
                    Err(e) => tracing::warn!(lease, error = %e, "lease keep-alive failed"),
                }
            }
        })
    }

    pub async fn member_list(&self) -> Result<Vec<Member>> {
        self.call(true, |mut c| async move {
            c.member_list(api::MemberListRequest {}).await
        })
        .await
        .map(|r| r.members)
    }

    /// Adds a member as a learner.
    pub async fn member_add(&self, member: Member) -> Result<Vec<Member>> {
        self.call(false, |mut c| {
            let member = member.clone();
            async move {
                c.member_add(api::MemberAddRequest {
                    member: Some(member),
                })
                .await
            }
        })
        .await
        .map(|r| r.members)
    }

    pub async fn member_promote(&self, id: u64) -> Result<Vec<Member>> {
        self.call(false, |mut c| async move {
            c.member_promote(api::MemberPromoteRequest { id }).await
        })
        .await
        .map(|r| r.members)
    }

    pub async fn member_remove(&self, id: u64) -> Result<Vec<Member>> {
        self.call(false, |mut c| async move {
            c.member_remove(api::MemberRemoveRequest { id }).await
        })
        .await
        .map(|r| r.members)
    }

    /// Status of the member at one endpoint (no redirection).
    pub async fn status_of(&self, endpoint: &str) -> Result<api::StatusResponse> {
        let mut c = Grpc::new(channel(&self.inner.cfg, endpoint)?);
        match tokio::time::timeout(
            self.inner.cfg.request_timeout,
            c.status(api::StatusRequest {}),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(Error::Rpc {
                code: s.code(),
                message: s.message().to_string(),
            }),
            Err(_) => Err(Error::Unavailable {
                attempts: 1,
                last: format!("{endpoint}: no answer"),
            }),
        }
    }

    /// Status of the leader (follows redirects).
    pub async fn status(&self) -> Result<api::StatusResponse> {
        self.call(true, |mut c| async move {
            c.status(api::StatusRequest {}).await
        })
        .await
    }

    /// Watches `[key, range_end)` from `start_revision` (0 = from now).
    pub fn watch(&self, key: Vec<u8>, range_end: Vec<u8>, start_revision: u64) -> Watch {
        Watch {
            client: self.clone(),
            req: api::WatchRequest {
                key,
                range_end,
                start_revision,
                prev_kv: false,
            },
            stream: None,
            last_revision: start_revision.saturating_sub(1),
        }
    }

    /// Watches every key under `prefix` from `start_revision`.
    pub fn watch_prefix(&self, prefix: &[u8], start_revision: u64) -> Watch {
        self.watch(prefix.to_vec(), prefix_end(prefix), start_revision)
    }
}

/// A resumable watch: [`Watch::next`] yields each revision's events once, in order, across
/// reconnects and member failures.
pub struct Watch {
    client: MetaClient,
    req: api::WatchRequest,
    stream: Option<tonic::Streaming<api::WatchResponse>>,
    last_revision: u64,
}

/// The events of one revision.
#[derive(Clone, Debug)]
pub struct WatchBatch {
    pub revision: u64,
    pub events: Vec<Event>,
}

impl Watch {
    /// The last revision delivered (resume point).
    pub fn last_revision(&self) -> u64 {
        self.last_revision
    }

    /// Drops the current connection; the next `next()` reconnects and resumes.
    pub fn disconnect(&mut self) {
        self.stream = None;
    }

    async fn open(&mut self) -> Result<()> {
        let mut req = self.req.clone();
        if self.last_revision > 0 || req.start_revision > 0 {
            req.start_revision = self.last_revision + 1;
        }
        let stream = self
            .client
            .call(true, |mut c| {
                let req = req.clone();
                async move { c.watch(req).await }
            })
            .await?;
        let mut stream = stream;
        // The first message confirms the watch and names the revision it starts after.
        match stream.message().await {
            Ok(Some(first)) => {
                if self.last_revision == 0 && self.req.start_revision == 0 {
                    self.last_revision = first.header.map(|h| h.revision).unwrap_or(0);
                }
            }
            Ok(None) => {
                return Err(Error::Unavailable {
                    attempts: 1,
                    last: "watch stream closed at once".into(),
                })
            }
            Err(s) => {
                return Err(Error::Rpc {
                    code: s.code(),
                    message: s.message().into(),
                })
            }
        }
        self.stream = Some(stream);
        Ok(())
    }

    /// Next batch of events; reconnects (and resumes) as needed.
    pub async fn next(&mut self) -> Result<WatchBatch> {
        let mut failures = 0;
        loop {
            if self.stream.is_none() {
                if let Err(e) = self.open().await {
                    match e {
                        Error::Compacted { .. } => return Err(e),
                        e if failures >= 20 => return Err(e),
                        _ => {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) if resp.canceled => {
                    self.stream = None;
                    if resp.compact_revision > 0 {
                        return Err(Error::Compacted {
                            compact_revision: resp.compact_revision,
                        });
                    }
                }
                Ok(Some(resp)) => {
                    let revision = resp.header.map(|h| h.revision).unwrap_or(0);
                    if revision <= self.last_revision {
                        // Already delivered before a reconnect: never twice.
                        continue;
                    }
                    self.last_revision = revision;
                    return Ok(WatchBatch {
                        revision,
                        events: resp.events,
                    });
                }
                Ok(None) | Err(_) => {
                    self.stream = None;
                    failures += 1;
                }
            }
        }
    }
}

/// Refuses keys and values over the service's limits before they travel.
fn check_sizes(key: &[u8], value: Option<&[u8]>) -> Result<()> {
    use continuum_proto::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
    if key.is_empty() {
        return Err(Error::InvalidArgument {
            message: "key is empty".into(),
        });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::InvalidArgument {
            message: format!("key is {} bytes, the limit is {MAX_KEY_BYTES}", key.len()),
        });
    }
    if let Some(v) = value.filter(|v| v.len() > MAX_VALUE_BYTES) {
        return Err(Error::InvalidArgument {
            message: format!("value is {} bytes, the limit is {MAX_VALUE_BYTES}", v.len()),
        });
    }
    Ok(())
}

/// The end of the range of keys starting with `prefix` (etcd's convention).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Compare builders for transactions.
pub mod cmp {
    use super::*;

    fn mk(
        key: &[u8],
        target: compare::CompareTarget,
        result: compare::CompareResult,
        v: compare::TargetUnion,
    ) -> Compare {
        Compare {
            result: result as i32,
            target: target as i32,
            key: key.to_vec(),
            target_union: Some(v),
        }
    }

    /// The key's mod revision equals `rev` (0 = the key does not exist).
    pub fn mod_revision_eq(key: &[u8], rev: u64) -> Compare {
        mk(
            key,
            compare::CompareTarget::Mod,
            compare::CompareResult::Equal,
            compare::TargetUnion::ModRevision(rev),
        )
    }

    /// The key does not exist.
    pub fn absent(key: &[u8]) -> Compare {
        mk(
            key,
            compare::CompareTarget::Create,
            compare::CompareResult::Equal,
            compare::TargetUnion::CreateRevision(0),
        )
    }

    pub fn value_eq(key: &[u8], value: &[u8]) -> Compare {
        mk(
            key,
            compare::CompareTarget::Value,
            compare::CompareResult::Equal,
            compare::TargetUnion::Value(value.to_vec()),
        )
    }

    pub fn version_eq(key: &[u8], version: u64) -> Compare {
        mk(
            key,
            compare::CompareTarget::Version,
            compare::CompareResult::Equal,
            compare::TargetUnion::Version(version),
        )
    }
}

/// Operation builders for transactions.
pub mod op {
    use super::*;

    pub fn put(key: &[u8], value: Vec<u8>, lease: u64) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(api::PutRequest {
                key: key.to_vec(),
                value,
                lease,
                prev_kv: false,
            })),
        }
    }

    pub fn delete(key: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                api::DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                },
            )),
        }
    }

    pub fn get(key: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(api::RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_follows_etcd() {
        assert_eq!(prefix_end(b"abc"), b"abd".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn not_leader_redirects_and_ambiguity_is_reported() {
        let mut s = Status::unavailable("not the leader");
        s.metadata_mut()
            .insert(ERROR_KIND_KEY, "not-leader".parse().unwrap());
        s.metadata_mut()
            .insert(LEADER_ADDR_KEY, "127.0.0.1:1".parse().unwrap());
        assert!(matches!(classify(s), Failure::Retry(Some(a)) if a == "127.0.0.1:1"));
        let mut s = Status::unavailable("leader changed");
        s.metadata_mut()
            .insert(ERROR_KIND_KEY, "leader-changed".parse().unwrap());
        assert!(matches!(classify(s), Failure::Unknown(_)));
        assert!(matches!(
            classify(Status::invalid_argument("x")),
            Failure::Fatal(Error::InvalidArgument { .. })
        ));
    }
}
