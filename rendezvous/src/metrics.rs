//! What the server counts, in Prometheus' text format at `/metrics`, and `/healthz`.
//!
//! Counters are updated where things happen (a pairing, relayed bytes, a STUN request, a
//! refusal by a limit); the gauges are read from the server's state at each scrape. The HTTP
//! side is hyper's (no hand-written parser): GET `/metrics` and `/healthz`, anything else 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{lock, Shared};

/// Why a limit refused a client (or ended its relay): the `reason` label of
/// `nettool_rejected_total`, one per limit.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reason {
    /// `--max-conns-per-ip`: too many connections open from one address.
    max_conns_per_ip,
    /// `--join-rate`/`--join-burst`: too many joins (or code allocations) from one address.
    join_rate,
    /// `--server-token`: a join without the right server token.
    server_token,
    /// `--max-sessions`: the server holds as many sessions as it may.
    max_sessions,
    /// `--stun-rate`/`--stun-burst`: a STUN request not answered.
    stun_rate,
    /// `--relay-max-sessions`: a relay attach refused.
    relay_max_sessions,
    /// `--relay-max-bytes`: a relay ended at its byte limit.
    relay_max_bytes,
    /// `--relay-max-duration`: a relay ended at its time limit.
    relay_max_duration,
    /// The frame size limit: a line longer than allowed.
    max_frame_len,
    /// The first frame (or a frame) took longer than allowed.
    frame_timeout,
    /// `--idle-timeout`: a paired peer sent nothing for too long.
    idle_timeout,
    /// A client that does not read: its queue filled.
    slow_reader,
    /// Offers and results over the per-strategy budget.
    strategy_budget,
    /// A plain JSON join on a server that requires TLS (no `--insecure-control`).
    plain_control,
}

impl Reason {
    /// Every reason, one per limit.
    pub const ALL: [Self; 14] = [
        Self::max_conns_per_ip,
        Self::join_rate,
        Self::server_token,
        Self::max_sessions,
        Self::stun_rate,
        Self::relay_max_sessions,
        Self::relay_max_bytes,
        Self::relay_max_duration,
        Self::max_frame_len,
        Self::frame_timeout,
        Self::idle_timeout,
        Self::slow_reader,
        Self::strategy_budget,
        Self::plain_control,
    ];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: Reason,
}

/// The server's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Pairings made on this node.
    pub(crate) pairings: Counter,
    /// Bytes relayed, both directions.
    pub(crate) relay_bytes: Counter,
    /// STUN requests received (answered or not).
    pub(crate) stun_requests: Counter,
    rejected: Family<RejectLabels, Counter>,
    sessions_waiting: Gauge,
    relay_links: Gauge,
    connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nettool");
        let pairings = Counter::default();
        let relay_bytes = Counter::<u64, AtomicU64>::default();
        let stun_requests = Counter::default();
        let rejected = Family::<RejectLabels, Counter>::default();
        let sessions_waiting = Gauge::<i64, AtomicI64>::default();
        let relay_links = Gauge::default();
        let connections = Gauge::default();
        registry.register("pairings", "Pairings made on this node", pairings.clone());
        registry.register(
            "relay_bytes",
            "Bytes relayed, both directions together",
            relay_bytes.clone(),
        );
        registry.register(
            "stun_requests",
            "STUN requests received, answered or not",
            stun_requests.clone(),
        );
        registry.register(
            "rejected",
            "Clients refused (or relays ended) by a limit, by limit",
            rejected.clone(),
        );
        registry.register(
            "sessions_waiting",
            "Sessions waiting for their second peer",
            sessions_waiting.clone(),
        );
        registry.register(
            "relay_links",
            "Relays attached or running",
            relay_links.clone(),
        );
        registry.register(
            "connections",
            "Client connections open (all kinds)",
            connections.clone(),
        );
        // Every limit's series exists from the start (at 0), so a dashboard sees all of them.
        for reason in Reason::ALL {
            drop(rejected.get_or_create(&RejectLabels { reason }));
        }
        Self {
            registry,
            pairings,
            relay_bytes,
            stun_requests,
            rejected,
            sessions_waiting,
            relay_links,
            connections,
        }
    }
}

impl Metrics {
    /// Counts one refusal by the limit `reason`.
    pub(crate) fn reject(&self, reason: Reason) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// The counter of refusals by `reason` (to count where `self` is not at hand).
    pub(crate) fn rejections(&self, reason: Reason) -> Counter {
        self.rejected
            .get_or_create(&RejectLabels { reason })
            .clone()
    }

    /// How many refusals `reason` counted so far.
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected.get_or_create(&RejectLabels { reason }).get()
    }

    /// The text exposition (OpenMetrics), gauges read from `shared` first.
    fn encode(&self, shared: &Shared) -> String {
        let (waiting, _) = shared.session_counts();
        self.sessions_waiting.set(waiting as i64);
        self.relay_links
            .set(shared.relays.load(std::sync::atomic::Ordering::Relaxed) as i64);
        let conns: usize = lock(&shared.ips).by_ip.values().map(|s| s.conns).sum();
        self.connections.set(conns as i64);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!("metrics: encoding failed: {e}");
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until dropped.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&shared, &req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
            if let Err(e) = served {
                debug!(%from, "metrics: connection: {e}");
            }
        });
    }
}

async fn answer(shared: &Shared, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(shared),
        ),
        "/healthz" => match health(shared).await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("unhealthy: {why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

/// Whether this node can serve: always outside a cluster; in one, when Redis answers.
async fn health(shared: &Shared) -> Result<(), String> {
    match shared.cluster.get() {
        None => Ok(()),
        Some(cluster) => {
            match tokio::time::timeout(std::time::Duration::from_secs(2), cluster.healthy()).await {
                Ok(r) => r,
                Err(_) => Err("the cluster store did not answer within 2s".into()),
            }
        }
    }
}

/// Binds the metrics listener (a clear error when the address is taken).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })
}
