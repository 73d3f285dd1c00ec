//! Prometheus metrics of a meta member and the HTTP endpoint that serves them.

use std::convert::Infallible;
use std::sync::Arc;

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

use crate::core::MetaCore;
use crate::engine::Engine;

pub struct Metrics {
    registry: Registry,
    pub has_leader: IntGauge,
    pub is_leader: IntGauge,
    pub leader_changes: IntCounter,
    pub proposals_committed: IntCounter,
    pub proposals_failed: IntCounter,
    pub proposals_pending: IntGauge,
    pub apply_lag: IntGauge,
    pub applied_index: IntGauge,
    pub term: IntGauge,
    pub db_size: IntGauge,
    pub snapshots_applied: IntCounter,
    pub snapshots_sent: IntCounter,
    pub reads: IntCounter,
    pub fsync_seconds: Histogram,
    pub up: Gauge,
}

fn sync_counter(c: &IntCounter, total: u64) {
    let cur = c.get();
    if total > cur {
        c.inc_by(total - cur);
    }
}

impl Metrics {
    pub fn new(member: u64) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(
            Some("continuum_meta".into()),
            Some([("member".to_string(), member.to_string())].into()),
        )?;
        let g = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let m = IntGauge::new(name, help)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        let c = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let m = IntCounter::new(name, help)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        let fsync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "fsync_duration_seconds",
                "Latency of synced writes of the Raft log (one per Ready round)",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16)?),
        )?;
        registry.register(Box::new(fsync_seconds.clone()))?;
        let up = Gauge::new("up", "1 while the member runs")?;
        registry.register(Box::new(up.clone()))?;
        up.set(1.0);
        Ok(Self {
            has_leader: g("has_leader", "1 if this member knows a leader")?,
            is_leader: g("is_leader", "1 if this member is the leader")?,
            leader_changes: c("leader_changes_seen_total", "Leader changes seen")?,
            proposals_committed: c("proposals_committed_total", "Client proposals applied")?,
            proposals_failed: c("proposals_failed_total", "Client proposals that failed")?,
            proposals_pending: g("proposals_pending", "Requests waiting in the core")?,
            apply_lag: g("apply_lag_entries", "Committed but not yet applied entries")?,
            applied_index: g("applied_index", "Applied Raft index")?,
            term: g("term", "Raft term")?,
            db_size: g("db_size_bytes", "Approximate store size on disk")?,
            snapshots_applied: c("snapshots_applied_total", "Snapshots received and applied")?,
            snapshots_sent: c("snapshots_sent_total", "Snapshots sent to followers")?,
            reads: c("reads_total", "Reads served")?,
            fsync_seconds,
            up,
            registry,
        })
    }

    /// Copies the core's current figures into the gauges and counters.
    pub fn observe<E: Engine + Clone>(&self, core: &MetaCore<E>) {
        self.has_leader.set(i64::from(core.leader_id() != 0));
        self.is_leader.set(i64::from(core.is_leader()));
        let s = &core.stats;
        sync_counter(&self.leader_changes, s.leader_changes);
        sync_counter(&self.proposals_committed, s.proposals_committed);
        sync_counter(&self.proposals_failed, s.proposals_failed);
        sync_counter(&self.snapshots_applied, s.snapshots_applied);
        sync_counter(&self.snapshots_sent, s.snapshots_sent);
        sync_counter(&self.reads, s.reads_served);
        self.proposals_pending.set(core.pending_requests() as i64);
        self.apply_lag
            .set(core.commit_index().saturating_sub(core.applied_index()) as i64);
        self.applied_index.set(core.applied_index() as i64);
        self.term.set(core.term() as i64);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        let _ = enc.encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `GET /metrics` (Prometheus text format) and `GET /health` (200 with a leader).
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) {
    let m = metrics.clone();
    serve_text(
        listener,
        move || m.render(),
        move || {
            (metrics.has_leader.get() == 1)
                .then_some("ok\n")
                .ok_or("no leader\n")
        },
    )
    .await
}

/// Serves `GET /metrics` with what `render` returns and `GET /health` (200 with the message
/// of `health`'s `Ok`, 503 with its `Err`). Any daemon's metrics endpoint.
pub async fn serve_text<R, H>(listener: std::net::TcpListener, render: R, health: H)
where
    R: Fn() -> String + Send + Sync + 'static,
    H: Fn() -> Result<&'static str, &'static str> + Send + Sync + 'static,
{
    use hyper::service::{make_service_fn, service_fn};
    use hyper::{Body, Response, StatusCode};
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let render = Arc::new(render);
    let health = Arc::new(health);
    let make = make_service_fn(move |_| {
        let (render, health) = (render.clone(), health.clone());
        async move {
            Ok::<_, Infallible>(service_fn(move |req: hyper::Request<Body>| {
                let (render, health) = (render.clone(), health.clone());
                async move {
                    let resp = match (req.uri().path(), health()) {
                        ("/metrics", _) => Response::new(Body::from(render())),
                        ("/health", Ok(msg)) => Response::new(Body::from(msg)),
                        ("/health", Err(msg)) => Response::builder()
                            .status(StatusCode::SERVICE_UNAVAILABLE)
                            .body(Body::from(msg))
                            .unwrap_or_default(),
                        _ => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Body::from("try /metrics or /health\n"))
                            .unwrap_or_default(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            }))
        }
    });
    match hyper::Server::from_tcp(listener) {
        Ok(b) => {
            if let Err(e) = b.serve(make).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        }
        Err(e) => tracing::error!(error = %e, "metrics server failed to start"),
    }
}
