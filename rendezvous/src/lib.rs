//! The rendezvous server: pairs peers by session name and relays their offers and results.
//!
//! Each connection is served by its own task, owned by the server's [`JoinSet`](tokio::task::JoinSet): dropping the
//! future of [`RendezvousServer::run`] (stopping the server) aborts every connection task and
//! with them every relay. A bad client (garbage, oversized lines, silence) gets an error
//! message and loses only its own connection; a task that panics loses only its own
//! connection too (the locks recover from poisoning). Session state lives in one
//! map behind a mutex that is held only for map operations, never across an await.
//!
//! Offers are held until both peers have offered for the same strategy and then delivered to
//! both at once, so both start punching at (nearly) the same instant: the skew is only the
//! difference between the two one-way delays from the server.
//!
//! # Several nodes
//!
//! Without a cluster this process holds every session (the map above is the whole registry).
//! With [`RendezvousServer::join_cluster`] (Redis) or [`RendezvousServer::join_memory_cluster`]
//! the map still holds this node's connections, and a join that finds no partner here claims
//! the session in the shared store: it waits, or it pairs with a waiter on another node. A
//! pair then has one end here and one there (`PeerEnd`); messages for the far end go
//! through the store to its node, and the first peer's node holds the offers and runs the
//! relay. Limits stay per node. See the `cluster` module.
//!
//! # Limits
//!
//! The server is meant to face the internet, so every resource a client can make it hold is
//! bounded (see [`ServerConfig`]); each refusal is a
//! [`ServerToClient::Error`](nettool_core::protocol::ServerToClient::Error) to that client
//! and a `warn!` line, and touches no other client:
//!
//! - frame size: [`UNPAIRED_MAX_FRAME_LEN`] (4 KiB) until the connection is paired, then
//!   `max_frame_len`; a longer line is an error, never an allocation, and a partial frame
//!   never holds more than the limit;
//! - a frame must complete within `first_frame_timeout` of its first byte, on every
//!   connection and at any time (a waiting peer cannot hold a partial frame for the whole
//!   session expiry);
//! - messages queued for a control connection: [`OUTBOX_CAPACITY`]; a client that lets its
//!   queue fill (it does not read) is dropped at once, even in the middle of a blocked write;
//! - offers and results: only for agreed strategies, at most [`MAX_FRAMES_PER_STRATEGY`] and
//!   `max_frame_len` + 4 KiB of them per strategy and peer in a pairing; a join lists at most
//!   [`MAX_JOIN_STRATEGIES`] strategies;
//! - connections open at once per source IP address (`max_conns_per_ip`), all kinds counted
//!   (control, observe, relay), checked at accept;
//! - sessions known at once (`max_sessions`), checked when a join would create one;
//!   short-code nameplates reserved and not yet joined count against it too, and a
//!   reservation lasts at most `session_expiry`;
//! - joins per second per source IP address (`join_rate`, `join_burst`): a token bucket;
//! - an optional server token (`server_token`) every join must carry;
//! - time: a new connection has `first_frame_timeout` (capped by `idle_timeout`) for its whole
//!   first frame, so sending it byte by byte does not help; a waiting peer only reads, and is
//!   bounded by `session_expiry`; a paired peer must complete a frame at least every
//!   `idle_timeout` (bytes of a partial frame do not count); every write to a client must finish
//!   within `idle_timeout` (a client that does not read is dropped). Observe connections are
//!   bounded by `observe_hold`, relays by their [`RelayLimits`]. Relay splices keep TCP
//!   backpressure (a direction reads only when its last frame was written).

#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tracing::debug;

mod cluster;
mod conn;
mod control;
mod identity;
mod limits;
mod metrics;
mod outbox;
mod pairing;
mod relay;
mod remote;
mod sealed;
mod stream;
mod stun_service;
#[cfg(test)]
mod tests;

use cluster::SessionStore;
pub use cluster::{ClusterConfig, ClusterError, MemoryCluster, KEY_PREFIX};
use conn::accept_loop;
pub use identity::{IdentityError, ServerIdentity};
use limits::IpTable;
pub use metrics::{Metrics, Reason};
use pairing::SessionSlot;
use relay::RelayWaiter;
use remote::serve_cluster;

/// Limits and timings of a [`RendezvousServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a session may wait for its second peer before it expires.
    pub session_expiry: Duration,
    /// Largest accepted frame, in bytes.
    pub max_frame_len: usize,
    /// How long a new connection may take to send its first frame.
    pub first_frame_timeout: Duration,
    /// How long an observe connection is held open at most.
    pub observe_hold: Duration,
    /// Relay limits; `None` turns relaying off (relay requests are refused clearly).
    pub relay: Option<RelayLimits>,
    /// Connections open at the same time from one source IP address (control, observe and
    /// relay connections alike); 0 = unlimited.
    pub max_conns_per_ip: usize,
    /// Sessions known at the same time (waiting or paired); 0 = unlimited.
    pub max_sessions: usize,
    /// How long a paired peer's control connection may go without completing a frame, how
    /// long a write to any client may take, and a cap on `first_frame_timeout`. A peer waiting
    /// for its partner is bounded by `session_expiry` instead. Zero = unlimited.
    pub idle_timeout: Duration,
    /// Joins per second per source IP address (the token bucket's refill rate); 0 = unlimited.
    pub join_rate: u32,
    /// Joins one source IP address may make at once (the token bucket's size; at least 1).
    pub join_burst: u32,
    /// A token every join must carry; `None` = anyone may join.
    pub server_token: Option<String>,
    /// A second address of this host (`IP2:P2`) for RFC 5780 NAT behaviour discovery: STUN
    /// and TCP are served on IP1:P1, IP1:P2, IP2:P1 and IP2:P2, answers carry
    /// RESPONSE-ORIGIN and OTHER-ADDRESS, and CHANGE-REQUEST is honoured. Needs a listen
    /// address with a specific IP. `None` = one address, no RFC 5780.
    pub other_address: Option<SocketAddr>,
    /// STUN answers per second per source IP address (a token bucket; answers are larger
    /// than requests, so this bounds the amplification a spoofed flood gets); 0 = unlimited.
    pub stun_rate: u32,
    /// STUN answers one source IP address gets in a burst (the bucket's size; at least 1).
    pub stun_burst: u32,
    /// The control channel's TLS (the server's identity, see [`ServerIdentity`]): a connection
    /// whose first byte is a TLS handshake gets TLS. `None`: plain JSON only.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// With `tls` set: whether plain JSON joins, code allocations and observe-family requests
    /// are still accepted (`--insecure-control`). Without `tls` the server speaks plain JSON
    /// only. Plain observe and relay connections are always accepted: they carry no session
    /// name, address list or server token.
    pub plain_control: bool,
}

pub use relay::RelayLimits;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            session_expiry: Duration::from_secs(300),
            max_frame_len: nettool_core::protocol::DEFAULT_MAX_FRAME_LEN,
            first_frame_timeout: Duration::from_secs(10),
            observe_hold: Duration::from_secs(120),
            relay: Some(RelayLimits::default()),
            max_conns_per_ip: 64,
            max_sessions: 100_000,
            idle_timeout: Duration::from_secs(120),
            join_rate: 20,
            join_burst: 40,
            server_token: None,
            other_address: None,
            stun_rate: 20,
            stun_burst: 50,
            tls: None,
            plain_control: false,
        }
    }
}

impl ServerConfig {
    /// How long a write to a client may take.
    fn write_timeout(&self) -> Option<Duration> {
        (!self.idle_timeout.is_zero()).then_some(self.idle_timeout)
    }
}

/// Locks `m`, recovering the data if a panicking task poisoned it: every critical section
/// leaves its map consistent before anything that could panic, so one connection's panic
/// never takes the server's state (and with it every other connection) down.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Largest frame before a connection is paired: join, observe and relay frames are small, so
/// a connection that has proven nothing can make the server hold at most this much of a
/// partial frame (the configured `max_frame_len` applies once paired).
pub const UNPAIRED_MAX_FRAME_LEN: usize = 4096;

/// Messages queued for one control connection at most. A client that lets its queue fill
/// (it does not read) is dropped.
pub const OUTBOX_CAPACITY: usize = 32;

/// Read buffer per connection: joins and most offers fit; every connection (every waiting
/// session) holds one.
const READ_BUFFER: usize = 512;

/// Strategies one join may list at most.
pub const MAX_JOIN_STRATEGIES: usize = 32;

/// Frames (offers and results) a peer may send per agreed strategy in one pairing.
pub const MAX_FRAMES_PER_STRATEGY: u32 = 4;

/// A rendezvous server bound to a TCP port, and a UDP socket with the same number that
/// answers STUN Binding requests (so UDP strategies learn their public mapping). With
/// [`ServerConfig::other_address`] it also serves RFC 5780 (see `stun_service`).
///
/// A server may listen on several addresses (one per IP family, see
/// [`RendezvousServer::bind_all`]); every address serves everything (joins, observe, relay,
/// STUN), and peers are paired whatever family their control connections use.
#[derive(Debug)]
pub struct RendezvousServer {
    endpoints: Vec<Endpoint>,
    shared: Arc<Shared>,
    /// This node's channel from the other nodes of its cluster (`None` outside a cluster).
    inbox: Option<cluster::Inbox>,
    /// Where `/metrics` and `/healthz` are served (see [`RendezvousServer::with_metrics`]).
    metrics: Option<TcpListener>,
}

/// One listen address: its TCP listener, its STUN sockets and, with a second address, the
/// RFC 5780 listeners.
#[derive(Debug)]
struct Endpoint {
    /// The address as asked for (an unspecified IPv4 address stays IPv4 here even when a
    /// dual-stack socket serves it), with the real port.
    addr: SocketAddr,
    /// Whether this endpoint's sockets are IPv6 sockets that serve IPv4 as well.
    dual_stack: bool,
    listener: TcpListener,
    /// TCP listeners on the RFC 5780 alternate addresses (empty without a second address).
    other_listeners: Vec<TcpListener>,
    stun: stun_service::StunSockets,
}

/// One address a server listens on (see [`RendezvousServer::bind_all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    /// TCP, and UDP for STUN on the same port. Port 0 picks a free port; on a later address it
    /// takes the first address's port, so all families share one port number.
    pub addr: SocketAddr,
    /// The RFC 5780 second address of this listen address (same family), if any.
    pub other: Option<SocketAddr>,
}

#[derive(Debug)]
struct Shared {
    config: ServerConfig,
    sessions: Mutex<HashMap<String, SessionSlot>>,
    next_conn: std::sync::atomic::AtomicU64,
    /// First peers attached to a relay, waiting for the second, by relay token.
    relay_waiting: Mutex<HashMap<String, RelayWaiter>>,
    /// Express relay connections by ticket: waiting for their join's pairing, or the pairing
    /// that came first ([`relay::TicketSlot`]).
    express_tickets: Mutex<HashMap<String, relay::TicketSlot>>,
    /// Relays attached or running.
    relays: std::sync::atomic::AtomicUsize,
    /// Per source IP address: open connections and the join token bucket.
    ips: Mutex<IpTable>,
    /// The cluster this node shares sessions with (unset: the in-process registry alone).
    cluster: std::sync::OnceLock<Arc<dyn SessionStore>>,
    /// Short-code nameplates allocated and not yet joined, with when each reservation ends.
    /// A nameplate is live while reserved here or while its session (`code-N`) is in
    /// `sessions`; lock `sessions` first when both are needed.
    nameplates: Mutex<HashMap<u32, Instant>>,
    /// Relay tokens to their sessions: a relay attach names only its token (its connection
    /// is plain, so it shows no session name). Stale entries are swept as it grows.
    relay_tokens: Mutex<HashMap<String, String>>,
    metrics: Metrics,
}

impl RendezvousServer {
    /// Binds the server's TCP listener, then a UDP socket on the same address and port
    /// number (so port 0 picks one number for both); with `config.other_address`, the RFC 5780
    /// sockets too (an unusable second address is an `InvalidInput` error saying why).
    ///
    /// An unspecified address (`0.0.0.0` or `::`) means every interface of both IP families:
    /// one dual-stack IPv6 socket where the host allows it, else an IPv4 and an IPv6 socket on
    /// the same port; a host without IPv6 gets IPv4 only.
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> std::io::Result<Self> {
        let other = config.other_address;
        let endpoints = if addr.ip().is_unspecified() && other.is_none() {
            bind_unspecified(addr).await?
        } else {
            vec![Endpoint::bind(addr, other).await?]
        };
        Ok(Self::with_endpoints(endpoints, config))
    }

    /// Listens on every address of `addrs` (typically one IPv4 and one IPv6 address, each with
    /// its own RFC 5780 second address); `config.other_address` is not used. The first address
    /// is the one [`local_addr`](Self::local_addr) reports.
    pub async fn bind_all(addrs: &[ListenAddr], config: ServerConfig) -> std::io::Result<Self> {
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no address to listen on",
            ));
        }
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for listen in addrs {
            let mut addr = listen.addr;
            if addr.port() == 0 {
                if let Some(first) = endpoints.first() {
                    addr.set_port(first.addr.port());
                }
            }
            endpoints.push(Endpoint::bind(addr, listen.other).await?);
        }
        Ok(Self::with_endpoints(endpoints, config))
    }

    fn with_endpoints(endpoints: Vec<Endpoint>, config: ServerConfig) -> Self {
        Self {
            endpoints,
            shared: Arc::new(Shared {
                config,
                sessions: Mutex::new(HashMap::new()),
                nameplates: Mutex::new(HashMap::new()),
                relay_tokens: Mutex::new(HashMap::new()),
                metrics: Metrics::default(),
                next_conn: std::sync::atomic::AtomicU64::new(1),
                relay_waiting: Mutex::new(HashMap::new()),
                express_tickets: Mutex::new(HashMap::new()),
                relays: std::sync::atomic::AtomicUsize::new(0),
                ips: Mutex::new(IpTable::default()),
                cluster: std::sync::OnceLock::new(),
            }),
            inbox: None,
            metrics: None,
        }
    }

    /// Makes this server a node of a cluster that shares sessions through Redis: the two
    /// peers of a session may then join through different nodes (see the `cluster` module).
    /// Fails clearly when Redis cannot be reached or no public address is given.
    ///
    /// A public address with port 0 stands for this server's listening port.
    pub async fn join_cluster(self, config: &ClusterConfig) -> Result<Self, ClusterError> {
        let mut config = config.clone();
        if let Ok(local) = self.local_addr() {
            for a in &mut config.public_addrs {
                if a.port() == 0 {
                    a.set_port(local.port());
                }
            }
        }
        let (store, inbox) =
            cluster::RedisStore::connect(&config, self.shared.config.session_expiry).await?;
        Ok(self.with_store(Arc::new(store), inbox))
    }

    /// Makes this server a node of a [`MemoryCluster`]: sessions shared with the other
    /// servers of this process that joined it, as through Redis (for tests of the cluster
    /// logic). `public_addrs` as in [`ClusterConfig`] (port 0: the listening port).
    pub fn join_memory_cluster(
        self,
        cluster: &MemoryCluster,
        mut public_addrs: Vec<SocketAddr>,
    ) -> Self {
        if let Ok(local) = self.local_addr() {
            for a in &mut public_addrs {
                if a.port() == 0 {
                    a.set_port(local.port());
                }
            }
        }
        let (store, inbox) = cluster.node(public_addrs, self.shared.config.session_expiry);
        self.with_store(Arc::new(store), inbox)
    }

    fn with_store(mut self, store: Arc<dyn SessionStore>, inbox: cluster::Inbox) -> Self {
        let _ = self.shared.cluster.set(store);
        self.inbox = Some(inbox);
        self
    }

    /// Where peers reach this node, as told to peers of other nodes (empty outside a
    /// cluster).
    pub fn public_addrs(&self) -> Vec<SocketAddr> {
        self.shared
            .cluster
            .get()
            .map(|c| c.public_addrs().to_vec())
            .unwrap_or_default()
    }

    /// This node's id in its cluster (`None` outside a cluster).
    pub fn node_id(&self) -> Option<String> {
        self.shared.cluster.get().map(|c| c.node().to_owned())
    }

    /// Serves Prometheus metrics at `/metrics` and health at `/healthz` on `addr` (HTTP) while
    /// the server runs (see the `metrics` module for what is counted).
    pub async fn with_metrics(mut self, addr: SocketAddr) -> std::io::Result<Self> {
        self.metrics = Some(metrics::bind(addr).await?);
        Ok(self)
    }

    /// The address metrics are served on, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle that reads the server's counters while it runs.
    pub fn stats(&self) -> ServerStats {
        ServerStats(self.shared.clone())
    }

    /// The (first) address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.endpoints[0].addr)
    }

    /// Every address the server listens on, one per family it serves (an unspecified IPv4
    /// address that a dual-stack socket serves appears as `0.0.0.0:P` and `[::]:P`).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.endpoints.iter().map(|e| e.addr).collect();
        if let [only] = out[..] {
            if self.endpoints[0].dual_stack {
                let v6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), only.port());
                let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), only.port());
                out = vec![v4, v6];
            }
        }
        out
    }

    /// The address the server answers STUN on (UDP, same port number as the TCP listener).
    pub fn udp_local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoints[0].stun.main_addr()
    }

    /// The RFC 5780 other address (IP2:P2, its port chosen when 0 was asked for) of the first
    /// listen address; `None` without a second address.
    pub fn other_local_addr(&self) -> Option<SocketAddr> {
        self.endpoints[0].stun.other_addr()
    }

    /// The RFC 5780 other addresses of every listen address that has one.
    pub fn other_local_addrs(&self) -> Vec<SocketAddr> {
        self.endpoints
            .iter()
            .filter_map(|e| e.stun.other_addr())
            .collect()
    }

    /// Number of sessions currently known (waiting or paired).
    pub fn session_count(&self) -> usize {
        self.stats().session_count()
    }

    /// Serves until the task is dropped: TCP connections and STUN on UDP. Accept and socket
    /// errors (e.g. out of file descriptors) are logged and retried after a short pause; they
    /// never end the server. Dropping this future (aborting its task) stops everything the
    /// server started: every connection task, every relay, every socket.
    pub async fn run(self) {
        let Self {
            endpoints,
            shared,
            inbox,
            metrics,
        } = self;
        let metrics = async {
            if let Some(listener) = metrics {
                metrics::serve(listener, shared.clone()).await;
            }
        };
        let served = endpoints.into_iter().map(|endpoint| {
            let shared = shared.clone();
            async move {
                let Endpoint {
                    listener,
                    other_listeners,
                    stun,
                    ..
                } = endpoint;
                let others = futures::future::join_all(
                    other_listeners
                        .into_iter()
                        .map(|l| accept_loop(l, shared.clone())),
                );
                tokio::join!(
                    accept_loop(listener, shared.clone()),
                    others,
                    stun_service::serve(stun, &shared)
                );
            }
        });
        tokio::join!(
            futures::future::join_all(served),
            serve_cluster(inbox, &shared),
            metrics
        );
    }
}

impl Endpoint {
    /// Binds TCP on `addr`, then UDP on the same address and port number, and the RFC 5780
    /// sockets with `other`.
    /// With port 0 the system picks the TCP port, and the same number may be taken for UDP
    /// (by any other socket of the host): then it tries another, a few times.
    async fn bind(addr: SocketAddr, other: Option<SocketAddr>) -> std::io::Result<Self> {
        let mut tries = if addr.port() == 0 { 16 } else { 1 };
        let (listener, addr, (stun, other_listeners)) = loop {
            tries -= 1;
            let listener = TcpListener::bind(addr).await?;
            let port = listener.local_addr()?.port();
            let addr = SocketAddr::new(addr.ip(), port);
            match stun_service::bind(addr, other).await {
                Ok(udp) => break (listener, addr, udp),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries > 0 => continue,
                Err(e) => return Err(e),
            }
        };
        Ok(Self {
            addr,
            dual_stack: false,
            listener,
            other_listeners,
            stun,
        })
    }
}

/// Listens on every interface of both families at `addr`'s port: `[::]` first (dual-stack
/// where the host's `bindv6only` allows it, which then also serves IPv4); then `0.0.0.0`,
/// which succeeds only when the IPv6 socket is IPv6-only (a dual-stack socket holds the port
/// for IPv4 too). Without IPv6 on the host, IPv4 alone.
async fn bind_unspecified(addr: SocketAddr) -> std::io::Result<Vec<Endpoint>> {
    let v6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), addr.port());
    let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
    let mut first = match Endpoint::bind(v6, None).await {
        Ok(e) => e,
        Err(e) if addr.is_ipv6() => return Err(e),
        Err(e) => {
            debug!("no IPv6 listener ({e}); serving IPv4 only");
            return Ok(vec![Endpoint::bind(addr, None).await?]);
        }
    };
    let port = first.addr.port();
    match Endpoint::bind(SocketAddr::new(v4.ip(), port), None).await {
        Ok(second) => {
            // IPv6-only sockets: one endpoint per family, the asked-for family first.
            Ok(if addr.is_ipv4() {
                vec![second, first]
            } else {
                vec![first, second]
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // The IPv6 socket is dual-stack and serves IPv4 as well.
            first.addr = SocketAddr::new(addr.ip(), port);
            first.dual_stack = true;
            Ok(vec![first])
        }
        Err(e) => Err(e),
    }
}

impl Shared {
    /// Sessions known: (waiting for their second peer, paired).
    pub(crate) fn session_counts(&self) -> (usize, usize) {
        let sessions = lock(&self.sessions);
        let waiting = sessions
            .values()
            .filter(|s| matches!(s, SessionSlot::Waiting(_)))
            .count();
        (waiting, sessions.len() - waiting)
    }

    /// Remembers which session a relay token belongs to (a relay attach names only the
    /// token); sweeps entries of pairs that are gone when the index has grown well past the
    /// sessions. Call without the session map locked.
    pub(crate) fn index_relay_token(&self, session: &str, token: Option<&str>) {
        let Some(token) = token else { return };
        let sessions = lock(&self.sessions);
        let mut index = lock(&self.relay_tokens);
        if index.len() >= 2 * sessions.len() + 1024 {
            index.retain(|t, s| {
                matches!(sessions.get(s), Some(SessionSlot::Paired(p)) if p.relay_token.as_deref() == Some(t.as_str()))
            });
        }
        index.insert(token.to_owned(), session.to_owned());
    }

    /// The session a relay token belongs to, if known.
    pub(crate) fn relay_session(&self, token: &str) -> Option<String> {
        lock(&self.relay_tokens).get(token).cloned()
    }
}

/// Reads a running server's counters.
#[derive(Debug, Clone)]
pub struct ServerStats(Arc<Shared>);

impl ServerStats {
    /// The server's metrics (what `/metrics` shows).
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Number of sessions currently known (waiting or paired).
    pub fn session_count(&self) -> usize {
        lock(&self.0.sessions).len()
    }

    /// Number of client connections currently open (all kinds; a running relay counts both
    /// of its connections).
    pub fn connection_count(&self) -> usize {
        let ips = lock(&self.0.ips);
        ips.by_ip.values().map(|s| s.conns).sum()
    }

    /// Number of source addresses the server currently keeps state for.
    pub fn tracked_addresses(&self) -> usize {
        lock(&self.0.ips).by_ip.len()
    }
}
