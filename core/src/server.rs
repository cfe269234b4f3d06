//! The rendezvous server: pairs peers by session name and relays their offers and results.
//!
//! Each connection is served by its own task, owned by the server's [`JoinSet`]: dropping the
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
//! bounded (see [`ServerConfig`]); each refusal is an [`ServerToClient::Error`] to that client
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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

mod cluster;
mod stun_service;

use cluster::SessionStore;
pub use cluster::{ClusterConfig, ClusterError, MemoryCluster, KEY_PREFIX};

use crate::code;
use crate::protocol::{
    ClientToServer, FramedConn, RecvError, Role, ServerToClient, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

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
}

pub use crate::relay::RelayLimits;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            session_expiry: Duration::from_secs(300),
            max_frame_len: crate::protocol::DEFAULT_MAX_FRAME_LEN,
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
}

/// Per-source-address state.
#[derive(Debug, Default)]
struct IpTable {
    by_ip: HashMap<IpAddr, IpState>,
    /// Size at which the table is next swept of entries that hold nothing.
    sweep_at: usize,
}

#[derive(Debug)]
struct IpState {
    conns: usize,
    /// Join tokens left (a token bucket refilled at `join_rate` per second up to `join_burst`).
    tokens: f64,
    refilled: Instant,
}

impl IpState {
    fn new(config: &ServerConfig, now: Instant) -> Self {
        Self {
            conns: 0,
            tokens: f64::from(config.join_burst.max(1)),
            refilled: now,
        }
    }

    fn refill(&mut self, config: &ServerConfig, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(config.join_rate))
            .min(f64::from(config.join_burst.max(1)));
        self.refilled = now;
    }

    /// Whether the entry can go: no connection open and the bucket would be full anyway.
    fn idle(&self, config: &ServerConfig, now: Instant) -> bool {
        if self.conns > 0 {
            return false;
        }
        if config.join_rate == 0 {
            return true;
        }
        let missing = f64::from(config.join_burst.max(1)) - self.tokens;
        now.saturating_duration_since(self.refilled).as_secs_f64() * f64::from(config.join_rate)
            >= missing
    }
}

/// The key a source address is counted under (IPv4-mapped IPv6 addresses count as IPv4).
fn ip_key(addr: SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

/// One open connection counted against its source address; released when dropped. Travels
/// with the socket (a relayed connection is handed to its partner's task).
#[derive(Debug)]
struct ConnSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut ips = lock(&self.shared.ips);
        if let Some(state) = ips.by_ip.get_mut(&self.ip) {
            state.conns = state.conns.saturating_sub(1);
            if state.idle(&self.shared.config, Instant::now()) {
                ips.by_ip.remove(&self.ip);
            }
        }
    }
}

impl Shared {
    /// Counts a new connection from `addr`, or says why it is refused.
    fn admit(self: &Arc<Self>, addr: SocketAddr) -> Result<ConnSlot, String> {
        let ip = ip_key(addr);
        let now = Instant::now();
        let mut ips = lock(&self.ips);
        if ips.by_ip.len() >= ips.sweep_at {
            ips.by_ip.retain(|_, s| !s.idle(&self.config, now));
            ips.sweep_at = (ips.by_ip.len() * 2).max(1024);
        }
        let state = ips
            .by_ip
            .entry(ip)
            .or_insert_with(|| IpState::new(&self.config, now));
        let max = self.config.max_conns_per_ip;
        if max > 0 && state.conns >= max {
            return Err(format!(
                "too many connections from {ip}: the server allows {max} at a time per address"
            ));
        }
        state.conns += 1;
        Ok(ConnSlot {
            shared: self.clone(),
            ip,
        })
    }

    /// Takes one join token of `addr`'s bucket, or says why the join is refused.
    fn take_join_token(&self, addr: SocketAddr) -> Result<(), String> {
        let rate = self.config.join_rate;
        if rate == 0 {
            return Ok(());
        }
        let ip = ip_key(addr);
        let now = Instant::now();
        let mut ips = lock(&self.ips);
        let state = ips
            .by_ip
            .entry(ip)
            .or_insert_with(|| IpState::new(&self.config, now));
        state.refill(&self.config, now);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            Ok(())
        } else {
            Err(format!(
                "too many joins from {ip}: the server allows {rate} per second (bursts of {}); \
                 try again shortly",
                self.config.join_burst.max(1)
            ))
        }
    }

    /// Checks the join's server token against the configured one.
    /// Reserves the smallest free nameplate (1 and up) for the session expiry. Live
    /// nameplates (reserved, or with a session) count against `max_sessions`.
    fn allocate_nameplate(&self) -> Result<u32, String> {
        if self.cluster.get().is_some() {
            return Err(
                "short codes are not available on a cluster node: use --session and \
                        --secret"
                    .into(),
            );
        }
        let sessions = lock(&self.sessions);
        let mut reserved = lock(&self.nameplates);
        let now = Instant::now();
        reserved.retain(|_, until| *until > now);
        let max = self.config.max_sessions;
        if max > 0 && sessions.len() + reserved.len() >= max {
            return Err(format!(
                "the server is full: it holds at most {max} sessions at a time; try again later"
            ));
        }
        let free = (1..=code::MAX_NAMEPLATE)
            .find(|n| !reserved.contains_key(n) && !sessions.contains_key(&code::session_name(*n)));
        let Some(n) = free else {
            return Err("no free nameplate; try again later".into());
        };
        reserved.insert(n, now + self.config.session_expiry);
        Ok(n)
    }

    /// Takes the reservation of a code session's nameplate (called with `sessions` locked,
    /// when the join would create the session), or says why the join is refused.
    fn take_nameplate(&self, session: &str) -> Result<(), String> {
        let taken = code::nameplate_of(session).and_then(|n| {
            let until = lock(&self.nameplates).remove(&n)?;
            (until > Instant::now()).then_some(n)
        });
        match taken {
            Some(_) => Ok(()),
            None => Err(format!(
                "no such code: nameplate '{}' is not allocated (it expired, was used, or \
                 someone tried a wrong code); ask for a new code",
                session
                    .strip_prefix(code::SESSION_PREFIX)
                    .unwrap_or(session)
            )),
        }
    }

    /// Burns a code session's nameplate after a failed key confirmation: the session leaves
    /// the map and the reservation (if any) is dropped, so further joins are refused.
    fn burn(&self, pair: &Arc<Pair>) {
        let mut sessions = lock(&self.sessions);
        if matches!(sessions.get(&pair.session), Some(SessionSlot::Paired(p)) if Arc::ptr_eq(p, pair))
        {
            sessions.remove(&pair.session);
        }
        if let Some(n) = code::nameplate_of(&pair.session) {
            lock(&self.nameplates).remove(&n);
        }
        drop(sessions);
        warn!(session = %pair.session, "someone tried a wrong code: nameplate burned");
    }

    fn check_server_token(&self, given: Option<&str>) -> Result<(), String> {
        let Some(expected) = self.config.server_token.as_deref() else {
            return Ok(());
        };
        let Some(given) = given else {
            return Err(
                "this server requires a server token to join: give --server-token \
                 (or `server-token` in the config)"
                    .into(),
            );
        };
        // Compare digests, in time independent of where the tokens differ.
        use sha2::{Digest, Sha256};
        let (a, b) = (Sha256::digest(expected), Sha256::digest(given));
        if a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
        {
            Ok(())
        } else {
            Err("wrong server token".into())
        }
    }
}

/// A relay connection handed to the partner's task, with what was read past its first frame
/// and its connection slot.
type Attached = (TcpStream, Vec<u8>, ConnSlot);

#[derive(Debug)]
struct RelayWaiter {
    role: Role,
    conn: u64,
    tx: tokio::sync::oneshot::Sender<Attached>,
}

/// What the map holds for a session name.
#[derive(Debug)]
enum SessionSlot {
    Waiting(Waiter),
    Paired(Arc<Pair>),
}

#[derive(Debug)]
struct Waiter {
    conn: u64,
    /// The protocol version it joined with.
    version: u32,
    addr: SocketAddr,
    strategies: Vec<String>,
    outbox: Arc<Outbox>,
    /// This joiner claimed a waiter on another node and waits for that node's answer: no
    /// local joiner may pair with it.
    claiming: bool,
}

/// What other tasks queue for one control connection: bounded (see [`OUTBOX_CAPACITY`]).
/// A queue that overflows means the client does not read; its task then drops it, whatever
/// it is doing (even in the middle of a blocked write).
#[derive(Debug, Default)]
struct Outbox {
    queue: Mutex<OutboxQueue>,
    overflowed: std::sync::atomic::AtomicBool,
    ready: Notify,
    overflow: Notify,
}

#[derive(Debug, Default)]
struct OutboxQueue {
    messages: std::collections::VecDeque<Outbound>,
    /// Its connection task has ended: nothing more is queued.
    closed: bool,
}

/// Closes an outbox when its connection task ends, however it ends (returned, or aborted
/// with the server): what is still queued is dropped. A queued `Paired` holds the pair, which
/// holds this outbox; without this, that cycle would keep both alive.
struct CloseOnDrop<'a>(&'a Outbox);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        let dropped = {
            let mut queue = lock(&self.0.queue);
            queue.closed = true;
            std::mem::take(&mut queue.messages)
        };
        drop(dropped);
    }
}

impl Outbox {
    fn push(&self, msg: Outbound) {
        let mut queue = lock(&self.queue);
        if queue.closed {
            return;
        }
        if queue.messages.len() >= OUTBOX_CAPACITY {
            drop(queue);
            if !self
                .overflowed
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                self.overflow.notify_one();
            }
            return;
        }
        queue.messages.push_back(msg);
        drop(queue);
        self.ready.notify_one();
    }

    /// The next queued message. Cancel safe (a message is taken only when returned).
    async fn next(&self) -> Outbound {
        loop {
            if let Some(msg) = lock(&self.queue).messages.pop_front() {
                return msg;
            }
            self.ready.notified().await;
        }
    }

    /// Resolves once the queue has overflowed.
    async fn overflowed(&self) {
        loop {
            if self.overflowed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            self.overflow.notified().await;
        }
    }
}

/// A paired session: both peers' ends and the offers held until both have offered.
#[derive(Debug)]
struct Pair {
    session: String,
    /// The pairing's id, which [`ClientToServer::ObserveFamily`] must name.
    pair_id: String,
    /// Each peer's protocol version (index [`Pair::index`]).
    versions: [u32; 2],
    /// Addresses each peer showed over its other family (at most one per family).
    sighted: Mutex<[Vec<SocketAddr>; 2]>,
    relay_token: Option<String>,
    /// The first and the second peer.
    peers: [PeerEnd; 2],
    /// The agreed strategies: offers and results for others are refused.
    strategies: Vec<String>,
    held_offers: Mutex<HashMap<String, (Role, serde_json::Value)>>,
    /// How to reach a peer on another node (set when one is).
    cluster: Option<Arc<dyn SessionStore>>,
}

/// Where one peer of a pair is connected.
#[derive(Debug)]
enum PeerEnd {
    /// To this node: its connection id and outbox.
    Local { conn: u64, outbox: Arc<Outbox> },
    /// To another node of the cluster: that node's id and its connection id there.
    Remote { node: String, conn: u64 },
}

impl Pair {
    /// A new pair: nothing sighted, no offers held yet.
    fn new(
        session: String,
        pair_id: String,
        versions: [u32; 2],
        relay_token: Option<String>,
        peers: [PeerEnd; 2],
        strategies: Vec<String>,
        cluster: Option<Arc<dyn SessionStore>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            session,
            pair_id,
            versions,
            sighted: Mutex::new([Vec::new(), Vec::new()]),
            relay_token,
            peers,
            strategies,
            held_offers: Mutex::new(HashMap::new()),
            cluster,
        })
    }

    fn index(role: Role) -> usize {
        match role {
            Role::First => 0,
            Role::Second => 1,
        }
    }

    fn send(&self, to: Role, msg: ServerToClient) {
        match &self.peers[Self::index(to)] {
            PeerEnd::Local { outbox, .. } => outbox.push(Outbound::Msg(msg)),
            PeerEnd::Remote { node, conn } => {
                if let Some(cluster) = &self.cluster {
                    cluster.send(
                        node,
                        &cluster::NodeMsg::Deliver {
                            session: self.session.clone(),
                            conn: *conn,
                            msg,
                        },
                    );
                }
            }
        }
    }

    /// Whether `conn` is one of this node's connections in the pair.
    fn has_local(&self, conn: u64) -> bool {
        self.local_role(conn).is_some()
    }

    /// The role of this node's connection `conn` in the pair.
    fn local_role(&self, conn: u64) -> Option<Role> {
        [Role::First, Role::Second].into_iter().find(|r| {
            matches!(&self.peers[Self::index(*r)], PeerEnd::Local { conn: c, .. } if *c == conn)
        })
    }

    /// Records that the peer `from` was seen at `addr` over another family and tells the other
    /// peer (when it speaks version 2). At most one address per family per peer: a repeat is
    /// refused, so a peer cannot make the server send more than two of these.
    fn sighted(&self, from: Role, addr: SocketAddr) -> Result<(), String> {
        {
            let mut sighted = lock(&self.sighted);
            let seen = &mut sighted[Self::index(from)];
            if seen.iter().any(|a| a.is_ipv4() == addr.is_ipv4()) {
                return Err("this peer already showed an address of this family".into());
            }
            seen.push(addr);
        }
        if self.versions[Self::index(from.other())] >= 2 {
            self.send(from.other(), ServerToClient::PeerAddress { addr });
        }
        Ok(())
    }

    /// Holds or delivers an offer; refuses one more held offer than [`MAX_HELD_OFFERS`].
    fn offer(
        &self,
        from: Role,
        strategy: String,
        payload: serde_json::Value,
    ) -> Result<(), String> {
        // Offers are held on the first peer's node: a second peer here sends its offers there.
        if let (PeerEnd::Remote { node, conn }, Some(cluster)) = (&self.peers[0], &self.cluster) {
            cluster.send(
                node,
                &cluster::NodeMsg::Offer {
                    session: self.session.clone(),
                    conn: *conn,
                    strategy,
                    payload,
                },
            );
            return Ok(());
        }
        let mut held = lock(&self.held_offers);
        if !held.contains_key(&strategy) && held.len() >= MAX_HELD_OFFERS {
            return Err(format!(
                "too many offers waiting for the peer (at most {MAX_HELD_OFFERS})"
            ));
        }
        match held.remove(&strategy) {
            Some((role, theirs)) if role != from => {
                drop(held);
                self.send(
                    from,
                    ServerToClient::Offer {
                        strategy: strategy.clone(),
                        payload: theirs,
                    },
                );
                self.send(role, ServerToClient::Offer { strategy, payload });
            }
            _ => {
                held.insert(strategy, (from, payload));
            }
        }
        Ok(())
    }
}

/// Offers one pairing may hold for the peer at once (a peer offers one strategy at a time; the
/// cap bounds the memory a misbehaving peer can pin with offers for made-up strategies).
const MAX_HELD_OFFERS: usize = 16;

/// What a connection task is told by others.
#[derive(Debug)]
enum Outbound {
    Msg(ServerToClient),
    Paired(Arc<Pair>, Role, ServerToClient),
    /// Send this message, then close.
    Fatal(ServerToClient),
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
                next_conn: std::sync::atomic::AtomicU64::new(1),
                relay_waiting: Mutex::new(HashMap::new()),
                relays: std::sync::atomic::AtomicUsize::new(0),
                ips: Mutex::new(IpTable::default()),
                cluster: std::sync::OnceLock::new(),
            }),
            inbox: None,
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
        } = self;
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
                    stun_service::serve(stun, &shared.config)
                );
            }
        });
        tokio::join!(
            futures::future::join_all(served),
            serve_cluster(inbox, &shared)
        );
    }
}

impl Endpoint {
    /// Binds TCP on `addr`, then UDP on the same address and port number, and the RFC 5780
    /// sockets with `other`.
    async fn bind(addr: SocketAddr, other: Option<SocketAddr>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let port = listener.local_addr()?.port();
        let addr = SocketAddr::new(addr.ip(), port);
        let (stun, other_listeners) = stun_service::bind(addr, other).await?;
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

/// Handles what the other nodes of the cluster send this one, in order; resubscribes (once a
/// second) when the subscription is lost. Returns at once outside a cluster.
async fn serve_cluster(inbox: Option<cluster::Inbox>, shared: &Shared) {
    let (Some(mut inbox), Some(cluster)) = (inbox, shared.cluster.get()) else {
        return;
    };
    loop {
        while let Some(msg) = inbox.next().await {
            on_node_msg(shared, cluster, msg);
        }
        warn!("cluster: lost the subscription to this node's channel in Redis; resubscribing");
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match cluster.resubscribe().await {
                Ok(i) => {
                    inbox = i;
                    break;
                }
                Err(e) => warn!("cluster: resubscribing failed: {e}"),
            }
        }
    }
}

/// One message from another node (see `cluster::NodeMsg`).
fn on_node_msg(shared: &Shared, cluster: &Arc<dyn SessionStore>, msg: cluster::NodeMsg) {
    use cluster::NodeMsg;
    match msg {
        NodeMsg::Pair {
            session,
            conn,
            from,
            from_conn,
            strategies,
            addr,
        } => {
            let mut sessions = lock(&shared.sessions);
            let waiter = match sessions.remove(&session) {
                Some(SessionSlot::Waiting(w)) if w.conn == conn && !w.claiming => w,
                other => {
                    if let Some(slot) = other {
                        sessions.insert(session.clone(), slot);
                    }
                    drop(sessions);
                    let message = format!(
                        "the first peer of session '{session}' left or paired before this join \
                         reached it; join again"
                    );
                    let refused = NodeMsg::Refused {
                        session,
                        conn: from_conn,
                        message,
                    };
                    cluster.send(&from, &refused);
                    return;
                }
            };
            let agreed = agree(&waiter.strategies, &strategies);
            if agreed.is_empty() {
                drop(sessions);
                let message = no_common(&waiter.strategies, &strategies);
                waiter.outbox.push(Outbound::Fatal(ServerToClient::Error {
                    message: message.clone(),
                }));
                let refused = NodeMsg::Refused {
                    session,
                    conn: from_conn,
                    message,
                };
                cluster.send(&from, &refused);
                return;
            }
            let (pair_id, relay_token) = new_pair_ids(shared);
            let pair = Pair::new(
                session.clone(),
                pair_id.clone(),
                // The other node's peer: its version does not travel between nodes, so its
                // other-family sightings are not relayed across nodes (README, cluster limits).
                [waiter.version, 1],
                relay_token.clone(),
                [
                    PeerEnd::Local {
                        conn: waiter.conn,
                        outbox: waiter.outbox.clone(),
                    },
                    PeerEnd::Remote {
                        node: from.clone(),
                        conn: from_conn,
                    },
                ],
                agreed.clone(),
                Some(cluster.clone()),
            );
            sessions.insert(session.clone(), SessionSlot::Paired(pair.clone()));
            drop(sessions);
            waiter.outbox.push(Outbound::Paired(
                pair,
                Role::First,
                ServerToClient::Paired {
                    role: Role::First,
                    strategies: agreed.clone(),
                    pair_id: pair_id.clone(),
                    observed: waiter.addr,
                    peer: addr,
                    relay_token: relay_token.clone(),
                    relay_addrs: Vec::new(),
                },
            ));
            info!(session = %session, node = %from, "paired with a peer on another node");
            let paired = NodeMsg::Paired {
                session,
                conn: from_conn,
                from: cluster.node().to_owned(),
                from_conn: waiter.conn,
                strategies: agreed,
                pair_id,
                peer: waiter.addr,
                relay_token,
                relay_addrs: cluster.public_addrs().to_vec(),
            };
            cluster.send(&from, &paired);
        }
        NodeMsg::Paired {
            session,
            conn,
            from,
            from_conn,
            strategies,
            pair_id,
            peer,
            relay_token,
            relay_addrs,
        } => {
            let mut sessions = lock(&shared.sessions);
            let joiner = match sessions.remove(&session) {
                Some(SessionSlot::Waiting(w)) if w.conn == conn && w.claiming => w,
                other => {
                    if let Some(slot) = other {
                        sessions.insert(session.clone(), slot);
                    }
                    drop(sessions);
                    // The joiner left meanwhile: the first peer learns it as from a local peer.
                    let left = NodeMsg::Deliver {
                        session,
                        conn: from_conn,
                        msg: ServerToClient::PeerLeft,
                    };
                    cluster.send(&from, &left);
                    return;
                }
            };
            let pair = Pair::new(
                session.clone(),
                pair_id.clone(),
                [1, joiner.version],
                relay_token.clone(),
                [
                    PeerEnd::Remote {
                        node: from,
                        conn: from_conn,
                    },
                    PeerEnd::Local {
                        conn: joiner.conn,
                        outbox: joiner.outbox.clone(),
                    },
                ],
                strategies.clone(),
                Some(cluster.clone()),
            );
            sessions.insert(session, SessionSlot::Paired(pair.clone()));
            drop(sessions);
            joiner.outbox.push(Outbound::Paired(
                pair,
                Role::Second,
                ServerToClient::Paired {
                    role: Role::Second,
                    strategies,
                    pair_id,
                    observed: joiner.addr,
                    peer,
                    relay_token,
                    relay_addrs,
                },
            ));
        }
        NodeMsg::Refused {
            session,
            conn,
            message,
        } => {
            let mut sessions = lock(&shared.sessions);
            let ours =
                matches!(sessions.get(&session), Some(SessionSlot::Waiting(w)) if w.conn == conn);
            if let Some(SessionSlot::Waiting(w)) = ours.then(|| sessions.remove(&session)).flatten()
            {
                drop(sessions);
                w.outbox
                    .push(Outbound::Fatal(ServerToClient::Error { message }));
            }
        }
        NodeMsg::Deliver { session, conn, msg } => {
            let pair = match lock(&shared.sessions).get(&session) {
                Some(SessionSlot::Paired(p)) => p.clone(),
                _ => return,
            };
            if let Some(role) = pair.local_role(conn) {
                if let PeerEnd::Local { outbox, .. } = &pair.peers[Pair::index(role)] {
                    outbox.push(Outbound::Msg(msg));
                }
            }
        }
        NodeMsg::Offer {
            session,
            conn,
            strategy,
            payload,
        } => {
            let pair = match lock(&shared.sessions).get(&session) {
                Some(SessionSlot::Paired(p)) => p.clone(),
                _ => return,
            };
            if pair.local_role(conn) == Some(Role::First) {
                if let Err(e) = pair.offer(Role::Second, strategy, payload) {
                    warn!(session = %session, "offer from the other node refused: {e}");
                }
            }
        }
    }
}

/// The strategies both offered, in the first peer's order.
fn agree(first: &[String], second: &[String]) -> Vec<String> {
    first
        .iter()
        .filter(|s| second.contains(s))
        .cloned()
        .collect()
}

fn no_common(first: &[String], second: &[String]) -> String {
    format!(
        "no strategy in common (first peer offers [{}], second peer offers [{}])",
        first.join(", "),
        second.join(", ")
    )
}

/// A new pairing's id and relay token (no token when this node does not relay).
fn new_pair_ids(shared: &Shared) -> (String, Option<String>) {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    let relay_token = shared.config.relay.as_ref().map(|_| {
        let mut t = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut t);
        hex::encode(t)
    });
    (hex::encode(id), relay_token)
}

/// Reads a running server's counters.
#[derive(Debug, Clone)]
pub struct ServerStats(Arc<Shared>);

impl ServerStats {
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

/// Accepts connections and serves each in a task of its own, owned by a [`JoinSet`]: when
/// the server's future is dropped (the server stops), every connection task is aborted with
/// it, relays included. Finished tasks are reaped as they end; a task that panicked is logged
/// and costs only its own connection.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        warn!("a connection task panicked; only its connection is lost: {e}");
                    }
                }
                continue;
            }
        };
        match accepted {
            Ok((stream, addr)) => {
                // A dual-stack socket shows IPv4 peers as IPv4-mapped IPv6 addresses.
                let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
                let conn = shared
                    .next_conn
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let span = tracing::info_span!("conn", id = conn, peer = %addr);
                let admitted = shared.admit(addr);
                let shared = shared.clone();
                tasks.spawn(
                    async move {
                        match admitted {
                            Ok(slot) => serve_connection(shared, stream, addr, conn, slot).await,
                            Err(why) => {
                                let _ = stream.set_nodelay(true);
                                let mut framed = FramedConn::new(stream, 0);
                                refuse(&mut framed, &why).await;
                            }
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    addr: SocketAddr,
    conn: u64,
    slot: ConnSlot,
) {
    let _ = stream.set_nodelay(true);
    // Until paired, frames are small; and no frame may take longer than the first may.
    let mut framed = FramedConn::with_read_buffer(
        stream,
        shared.config.max_frame_len.min(UNPAIRED_MAX_FRAME_LEN),
        READ_BUFFER,
    );
    let mut first_frame_timeout = shared.config.first_frame_timeout;
    if !shared.config.idle_timeout.is_zero() {
        first_frame_timeout = first_frame_timeout.min(shared.config.idle_timeout);
    }
    framed.set_frame_time(Some(first_frame_timeout));
    // The whole first frame must arrive in time: sending it byte by byte does not help.
    let first =
        match tokio::time::timeout(first_frame_timeout, framed.recv::<ClientToServer>()).await {
            Err(_) => {
                refuse(
                    &mut framed,
                    &format!(
                        "no request within the time limit ({:.1}s)",
                        first_frame_timeout.as_secs_f64()
                    ),
                )
                .await;
                return;
            }
            Ok(Ok(Some(msg))) => msg,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                refuse(&mut framed, &e.to_string()).await;
                return;
            }
        };
    match first {
        ClientToServer::Observe { version } => {
            if check_version(&mut framed, version).await {
                serve_observe(&shared, framed, addr).await;
            }
        }
        ClientToServer::Join {
            version,
            session,
            strategies,
            token,
        } => {
            if !check_version(&mut framed, version).await {
                return;
            }
            // The rate first, so guessing the server token is rate limited too.
            let admitted = shared
                .take_join_token(addr)
                .and_then(|()| shared.check_server_token(token.as_deref()));
            let joiner = Joiner {
                addr,
                conn,
                version,
            };
            match admitted {
                Ok(()) => serve_control(&shared, framed, joiner, session, strategies).await,
                Err(why) => refuse(&mut framed, &why).await,
            }
        }
        ClientToServer::Allocate { version, token } => {
            if !check_version(&mut framed, version).await {
                return;
            }
            // Rate limited and token checked like a join: each allocation is a session's worth.
            let allocated = shared
                .take_join_token(addr)
                .and_then(|()| shared.check_server_token(token.as_deref()))
                .and_then(|()| shared.allocate_nameplate());
            match allocated {
                Ok(nameplate) => {
                    info!(nameplate, "nameplate allocated");
                    let msg = ServerToClient::Allocated { nameplate };
                    let _ = send_within(&shared, &mut framed, &msg).await;
                }
                Err(why) => refuse(&mut framed, &why).await,
            }
        }
        ClientToServer::ObserveFamily {
            version,
            session,
            pair_id,
            role,
        } => {
            if check_version(&mut framed, version).await {
                serve_observe_family(&shared, framed, addr, &session, &pair_id, role).await;
            }
        }
        ClientToServer::Relay {
            version,
            session,
            token,
            role,
        } => {
            if check_version(&mut framed, version).await {
                serve_relay(&shared, framed, slot, conn, &session, token, role).await;
            }
        }
        other => {
            let what = serde_json::to_value(&other)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                .unwrap_or_default();
            refuse(
                &mut framed,
                &format!(
                    "expected 'join', 'observe', 'observe-family', 'relay' or 'allocate' as the \
                     first frame, got '{what}'"
                ),
            )
            .await;
        }
    }
}

async fn check_version(framed: &mut FramedConn<TcpStream>, version: u32) -> bool {
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return true;
    }
    refuse(
        framed,
        &format!(
            "unsupported protocol version {version} (server speaks {MIN_PROTOCOL_VERSION} to \
             {PROTOCOL_VERSION})"
        ),
    )
    .await;
    false
}

/// Sends `msg`, giving up after the write timeout (a client that does not read).
async fn send_within(
    shared: &Shared,
    framed: &mut FramedConn<TcpStream>,
    msg: &ServerToClient,
) -> Result<(), String> {
    let Some(limit) = shared.config.write_timeout() else {
        return framed.send(msg).await.map_err(|e| e.to_string());
    };
    match tokio::time::timeout(limit, framed.send(msg)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => {
            warn!(
                "dropping client: it read nothing for {:.1}s (idle-timeout)",
                limit.as_secs_f64()
            );
            Err("write timed out".into())
        }
    }
}

/// Sends the client an error (the connection is closed afterwards) and logs it.
async fn refuse(framed: &mut FramedConn<TcpStream>, message: &str) {
    warn!("refusing client: {message}");
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        framed.send(&ServerToClient::Error {
            message: message.to_owned(),
        }),
    )
    .await;
}

async fn serve_observe(shared: &Shared, mut framed: FramedConn<TcpStream>, addr: SocketAddr) {
    debug!("observe");
    if framed
        .send(&ServerToClient::Observed { addr })
        .await
        .is_err()
    {
        return;
    }
    // Hold the connection (and with it the NAT mapping) until the client closes it.
    let _ = tokio::time::timeout(shared.config.observe_hold, async {
        while let Ok(Some(_)) = framed.recv::<ClientToServer>().await {}
    })
    .await;
}

/// Answers an [`ClientToServer::ObserveFamily`]: records the address with the pairing (which
/// tells the peer), then answers like an observe connection. Unknown sessions and pairings get
/// the same error, so the connection tells nothing about which sessions exist.
async fn serve_observe_family(
    shared: &Shared,
    mut framed: FramedConn<TcpStream>,
    addr: SocketAddr,
    session: &str,
    pair_id: &str,
    role: Role,
) {
    let pair = match lock(&shared.sessions).get(session) {
        Some(SessionSlot::Paired(pair)) if pair.pair_id == pair_id => Some(pair.clone()),
        _ => None,
    };
    let recorded = match pair {
        Some(pair) => pair.sighted(role, addr),
        None => Err("no such pairing".into()),
    };
    match recorded {
        Ok(()) => {
            debug!(session, %role, %addr, "peer seen over another family");
            let _ = send_within(shared, &mut framed, &ServerToClient::Observed { addr }).await;
        }
        Err(why) => refuse(&mut framed, &why).await,
    }
}

/// Who joins: the control connection's source address, id and protocol version.
struct Joiner {
    addr: SocketAddr,
    conn: u64,
    version: u32,
}

async fn serve_control(
    shared: &Shared,
    mut framed: FramedConn<TcpStream>,
    joiner: Joiner,
    session: String,
    strategies: Vec<String>,
) {
    let Joiner {
        addr,
        conn,
        version,
    } = joiner;
    let outbox = Arc::new(Outbox::default());
    let _close = CloseOnDrop(&outbox);
    if session.is_empty() || session.len() > 256 {
        refuse(&mut framed, "session name must be 1 to 256 bytes").await;
        return;
    }
    if strategies.len() > MAX_JOIN_STRATEGIES {
        refuse(
            &mut framed,
            &format!("a join may list at most {MAX_JOIN_STRATEGIES} strategies"),
        )
        .await;
        return;
    }
    // Join: either wait, or pair with the waiter.
    let joined = {
        let mut sessions = lock(&shared.sessions);
        #[cfg(test)]
        tests::panic_hook(&session);
        let max = shared.config.max_sessions;
        // A code session is created only by the join that takes its nameplate's reservation.
        let code_refused = (code::is_code_session(&session) && !sessions.contains_key(&session))
            .then(|| shared.take_nameplate(&session))
            .and_then(Result::err);
        match sessions.remove(&session) {
            None if code_refused.is_some() => Err(code_refused.unwrap_or_default()),
            None if max > 0 && sessions.len() >= max => Err(format!(
                "the server is full: it holds at most {max} sessions at a time; try again later"
            )),
            None => {
                sessions.insert(
                    session.clone(),
                    SessionSlot::Waiting(Waiter {
                        conn,
                        version,
                        addr,
                        strategies,
                        outbox: outbox.clone(),
                        claiming: false,
                    }),
                );
                Ok(None)
            }
            Some(SessionSlot::Paired(pair)) => {
                sessions.insert(session.clone(), SessionSlot::Paired(pair));
                Err(format!("session '{session}' already has two peers"))
            }
            Some(SessionSlot::Waiting(waiter)) if waiter.claiming => {
                sessions.insert(session.clone(), SessionSlot::Waiting(waiter));
                Err(format!("session '{session}' already has two peers"))
            }
            Some(SessionSlot::Waiting(waiter)) => {
                let agreed = agree(&waiter.strategies, &strategies);
                if agreed.is_empty() {
                    let msg = no_common(&waiter.strategies, &strategies);
                    waiter.outbox.push(Outbound::Fatal(ServerToClient::Error {
                        message: msg.clone(),
                    }));
                    Err(msg)
                } else {
                    let (pair_id, relay_token) = new_pair_ids(shared);
                    let pair = Pair::new(
                        session.clone(),
                        pair_id.clone(),
                        [waiter.version, version],
                        relay_token.clone(),
                        [
                            PeerEnd::Local {
                                conn: waiter.conn,
                                outbox: waiter.outbox.clone(),
                            },
                            PeerEnd::Local {
                                conn,
                                outbox: outbox.clone(),
                            },
                        ],
                        agreed.clone(),
                        None,
                    );
                    sessions.insert(session.clone(), SessionSlot::Paired(pair.clone()));
                    waiter.outbox.push(Outbound::Paired(
                        pair.clone(),
                        Role::First,
                        ServerToClient::Paired {
                            role: Role::First,
                            strategies: agreed.clone(),
                            pair_id: pair_id.clone(),
                            observed: waiter.addr,
                            peer: addr,
                            relay_token: relay_token.clone(),
                            relay_addrs: Vec::new(),
                        },
                    ));
                    outbox.push(Outbound::Paired(
                        pair.clone(),
                        Role::Second,
                        ServerToClient::Paired {
                            role: Role::Second,
                            strategies: agreed,
                            pair_id,
                            observed: addr,
                            peer: waiter.addr,
                            relay_token,
                            relay_addrs: Vec::new(),
                        },
                    ));
                    Ok(Some(pair))
                }
            }
        }
    };
    // What this connection holds in the cluster store, given back when it leaves.
    let mut owned: Option<String> = None;
    match joined {
        Err(msg) => {
            refuse(&mut framed, &msg).await;
            return;
        }
        Ok(None) => {
            let mut wait = true;
            if let Some(cluster) = shared.cluster.get() {
                match register(shared, cluster, &session, conn, addr).await {
                    Ok((value, waits)) => {
                        owned = value;
                        wait = waits;
                    }
                    Err(msg) => {
                        leave(shared, &session, conn, None);
                        refuse(&mut framed, &msg).await;
                        return;
                    }
                }
            }
            if wait {
                info!(session = %session, "waiting for the second peer");
                let waiting = ServerToClient::Waiting {
                    session: session.clone(),
                };
                if send_within(shared, &mut framed, &waiting).await.is_err() {
                    leave(shared, &session, conn, None);
                    release(shared, &session, owned);
                    return;
                }
            }
        }
        Ok(Some(_)) => info!(session = %session, "paired"),
    }

    let mut pair: Option<(Arc<Pair>, Role)> = None;
    let mut budget = HashMap::new();
    let expiry = tokio::time::sleep(shared.config.session_expiry);
    tokio::pin!(expiry);
    // While waiting for its partner a peer only reads (bounded by the expiry); once paired it
    // must complete a frame at least every idle timeout.
    let idle_timeout = shared.config.idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            out = outbox.next() => {
                let (msg, fatal) = match out {
                    Outbound::Msg(m) => (m, false),
                    Outbound::Fatal(m) => (m, true),
                    Outbound::Paired(p, role, m) => {
                        pair = Some((p, role));
                        // A waiter's key in the cluster store now says "paired" (unless the
                        // joiner on another node already made it so).
                        if let (Some(cluster), Some(value)) = (shared.cluster.get(), owned.take()) {
                            let paired = cluster.paired_value(conn);
                            if value.starts_with('W') {
                                cluster.swap(&session, value, Some(paired.clone()));
                                owned = Some(paired);
                            } else {
                                owned = Some(value);
                            }
                        }
                        framed.set_limit(shared.config.max_frame_len);
                        idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                        (m, false)
                    }
                };
                let sent = tokio::select! {
                    r = send_within(shared, &mut framed, &msg) => r.is_ok(),
                    () = outbox.overflowed() => false,
                };
                if !sent || fatal {
                    break;
                }
            }
            () = outbox.overflowed() => {
                warn!("dropping client: it does not read (its queue of {OUTBOX_CAPACITY} messages is full)");
                break;
            }
            () = &mut idle, if pair.is_some() && !idle_timeout.is_zero() => {
                let secs = idle_timeout.as_secs_f64();
                refuse(&mut framed, &format!("idle for {secs:.1}s: no complete frame received within the idle timeout")).await;
                break;
            }
            () = &mut expiry, if pair.is_none() => {
                let secs = shared.config.session_expiry.as_secs_f64();
                refuse(&mut framed, &format!("session '{session}' expired: no second peer joined within {secs}s")).await;
                break;
            }
            frame = framed.recv::<ClientToServer>() => {
                match frame {
                    Ok(None) => break,
                    Err(RecvError::Io(_)) | Err(RecvError::Truncated) => break,
                    Err(RecvError::Frame(e)) => {
                        refuse(&mut framed, &e.to_string()).await;
                        break;
                    }
                    Ok(Some(msg)) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                        let len = framed.last_frame_len();
                        let spent = (&mut budget, len);
                        if let Err(e) = handle_frame(shared, &mut framed, pair.as_ref(), spent, msg).await {
                            refuse(&mut framed, &e).await;
                            break;
                        }
                    }
                }
            }
        }
    }
    leave(shared, &session, conn, pair.as_ref());
    release(shared, &session, owned);
}

/// Gives back what a connection held in the cluster store (only if it still holds it).
fn release(shared: &Shared, session: &str, owned: Option<String>) {
    if let (Some(cluster), Some(value)) = (shared.cluster.get(), owned) {
        cluster.swap(session, value, None);
    }
}

/// Registers a join that found no local partner with the cluster: it either waits (its key
/// is set), or claims the waiter another node holds and asks that node to pair. Returns what
/// the connection now holds in the store and whether it waits (`false`: it waits for the
/// other node's answer, and the client is not told "waiting").
async fn register(
    shared: &Shared,
    cluster: &Arc<dyn SessionStore>,
    session: &str,
    conn: u64,
    addr: SocketAddr,
) -> Result<(Option<String>, bool), String> {
    let still_waiting = || matches!(lock(&shared.sessions).get(session), Some(SessionSlot::Waiting(w)) if w.conn == conn);
    match cluster.claim(session, conn).await? {
        cluster::Claim::Wait => Ok((Some(cluster.waiting_value(conn)), true)),
        cluster::Claim::Paired => {
            if still_waiting() {
                Err(format!("session '{session}' already has two peers"))
            } else {
                // A local joiner paired with this one meanwhile.
                Ok((None, true))
            }
        }
        cluster::Claim::Waiter {
            node,
            conn: theirs,
            value,
        } => {
            let mine = cluster.paired_value(conn);
            let strategies = {
                let mut sessions = lock(&shared.sessions);
                match sessions.get_mut(session) {
                    Some(SessionSlot::Waiting(w)) if w.conn == conn => {
                        w.claiming = true;
                        Some(w.strategies.clone())
                    }
                    _ => None,
                }
            };
            let Some(strategies) = strategies else {
                // A local joiner paired with this one meanwhile: give the waiter back.
                cluster.swap(session, mine, Some(value));
                return Ok((None, true));
            };
            let request = cluster::NodeMsg::Pair {
                session: session.to_owned(),
                conn: theirs,
                from: cluster.node().to_owned(),
                from_conn: conn,
                strategies,
                addr,
            };
            if cluster.send_now(&node, &request).await? {
                debug!(session, node = %node, "claimed a waiter on another node");
                return Ok((Some(mine), false));
            }
            // Nobody listens on that node's channel: it is gone, and so is its waiter. Wait
            // here in its place.
            warn!(session, node = %node, "the node holding this session's first peer is gone; waiting here instead");
            let waiting = cluster.waiting_value(conn);
            if !cluster.swap_now(session, &mine, &waiting).await? {
                return Err(format!(
                    "session '{session}' changed hands in the cluster while joining; join again"
                ));
            }
            if let Some(SessionSlot::Waiting(w)) = lock(&shared.sessions).get_mut(session) {
                if w.conn == conn {
                    w.claiming = false;
                }
            }
            Ok((Some(waiting), true))
        }
    }
}

/// What one peer spent on one strategy of its pairing.
#[derive(Debug, Default)]
struct StrategyBudget {
    frames: u32,
    bytes: usize,
}

/// Counts a frame of `len` bytes for `strategy` against the peer's budget, or says why it is
/// refused: only agreed strategies (and the plan exchange), at most [`MAX_FRAMES_PER_STRATEGY`] frames and the frame
/// size limit plus 4 KiB of bytes per strategy. The budget map holds at most one entry per
/// agreed strategy.
fn spend(
    shared: &Shared,
    pair: &Pair,
    budget: &mut HashMap<String, StrategyBudget>,
    strategy: &str,
    len: usize,
) -> Result<(), String> {
    if strategy != crate::protocol::PLAN_OFFER && !pair.strategies.iter().any(|s| s == strategy) {
        return Err(format!(
            "offer or result for '{strategy}', which is not an agreed strategy"
        ));
    }
    let max_bytes = shared.config.max_frame_len + 4096;
    let b = budget.entry(strategy.to_owned()).or_default();
    b.frames += 1;
    b.bytes += len;
    if b.frames > MAX_FRAMES_PER_STRATEGY {
        return Err(format!(
            "too many offers and results for '{strategy}' (at most {MAX_FRAMES_PER_STRATEGY} per pairing)"
        ));
    }
    if b.bytes > max_bytes {
        return Err(format!(
            "offers and results for '{strategy}' too large (at most {max_bytes} bytes per pairing)"
        ));
    }
    Ok(())
}

async fn handle_frame(
    shared: &Shared,
    framed: &mut FramedConn<TcpStream>,
    pair: Option<&(Arc<Pair>, Role)>,
    (budget, len): (&mut HashMap<String, StrategyBudget>, usize),
    msg: ClientToServer,
) -> Result<(), String> {
    match msg {
        ClientToServer::Ping { id } => {
            send_within(shared, framed, &ServerToClient::Pong { id }).await
        }
        ClientToServer::Offer { strategy, payload } => {
            let (pair, role) = pair.ok_or("offer before the session was paired")?;
            spend(shared, pair, budget, &strategy, len)?;
            pair.offer(*role, strategy, payload)
        }
        ClientToServer::Result {
            strategy,
            ok,
            error,
        } => {
            let (pair, role) = pair.ok_or("result before the session was paired")?;
            spend(shared, pair, budget, &strategy, len)?;
            pair.send(
                role.other(),
                ServerToClient::Result {
                    strategy,
                    ok,
                    error,
                },
            );
            Ok(())
        }
        ClientToServer::BadCode { session } => {
            let (pair, role) = pair.ok_or("bad-code before the session was paired")?;
            if pair.session != session || !code::is_code_session(&session) {
                return Err("bad-code is only for this connection's code session".into());
            }
            shared.burn(pair);
            pair.send(role.other(), ServerToClient::WrongCode);
            Ok(())
        }
        ClientToServer::Allocate { .. } => {
            Err("'allocate' must be the first frame of its own connection".into())
        }
        ClientToServer::Join { .. } => Err("already joined a session on this connection".into()),
        ClientToServer::Relay { .. } => {
            Err("'relay' must be the first frame of its own connection".into())
        }
        ClientToServer::Observe { .. } | ClientToServer::ObserveFamily { .. } => {
            Err("'observe' must be the first frame of its own connection".into())
        }
    }
}

/// Removes this connection's part of a session and tells the peer, if any.
fn leave(shared: &Shared, session: &str, conn: u64, pair: Option<&(Arc<Pair>, Role)>) {
    let mut sessions = lock(&shared.sessions);
    let ours = match sessions.get(session) {
        Some(SessionSlot::Waiting(w)) => w.conn == conn,
        Some(SessionSlot::Paired(p)) => p.has_local(conn),
        None => false,
    };
    if ours {
        sessions.remove(session);
    }
    drop(sessions);
    if let Some((pair, role)) = pair {
        debug!(session = %pair.session, "peer left");
        pair.send(role.other(), ServerToClient::PeerLeft);
    }
}

/// Releases a relay slot when dropped.
struct RelaySlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for RelaySlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn serve_relay(
    shared: &Shared,
    mut framed: FramedConn<TcpStream>,
    slot: ConnSlot,
    conn: u64,
    session: &str,
    token: String,
    role: Role,
) {
    let Some(limits) = shared.config.relay.clone() else {
        refuse(
            &mut framed,
            "this server does not relay (relaying is turned off)",
        )
        .await;
        return;
    };
    let known = {
        let sessions = lock(&shared.sessions);
        match sessions.get(session) {
            Some(SessionSlot::Paired(p)) if p.relay_token.as_deref() == Some(token.as_str()) => {
                Ok(matches!(p.peers[0], PeerEnd::Local { .. }))
            }
            _ => Err(()),
        }
    };
    match known {
        Ok(true) => {}
        Ok(false) => {
            refuse(
                &mut framed,
                "relay refused: this session's relay runs on the first peer's node (the address \
                 it was paired with), not on this one",
            )
            .await;
            return;
        }
        Err(()) => {
            refuse(
                &mut framed,
                "relay refused: no paired session with that name and token",
            )
            .await;
            return;
        }
    }
    // The second peer hands its connection to the first, whose task runs the relay. Looking
    // for the partner and registering as the waiter is one step under the lock: two peers
    // attaching at the same instant must not both become waiters.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let partner = {
        let mut waiting = lock(&shared.relay_waiting);
        match waiting.remove(&token) {
            Some(w) if w.role != role => Ok(Some(w)),
            Some(w) => {
                waiting.insert(token.clone(), w);
                Err(format!(
                    "relay refused: the {role} peer of this session is already attached"
                ))
            }
            None => {
                let active = shared
                    .relays
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if active >= limits.max_sessions {
                    shared
                        .relays
                        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    Err(format!(
                        "relay refused: the server relays at most {} sessions at a time",
                        limits.max_sessions
                    ))
                } else {
                    waiting.insert(token.clone(), RelayWaiter { role, conn, tx });
                    Ok(None)
                }
            }
        }
    };
    let partner = match partner {
        Ok(p) => p,
        Err(why) => {
            refuse(&mut framed, &why).await;
            return;
        }
    };
    if let Some(w) = partner {
        if send_within(shared, &mut framed, &ServerToClient::Relaying)
            .await
            .is_ok()
        {
            let (stream, rest) = framed.into_parts();
            let _ = w.tx.send((stream, rest, slot));
        }
        return;
    }
    let _relay_slot = RelaySlot(&shared.relays);
    let other = tokio::time::timeout(limits.attach_timeout, rx).await;
    let Ok(Ok(other)) = other else {
        {
            let mut waiting = lock(&shared.relay_waiting);
            if waiting.get(&token).is_some_and(|w| w.conn == conn) {
                waiting.remove(&token);
            }
        }
        refuse(
            &mut framed,
            &format!(
                "the peer did not attach to the relay within {:.1}s",
                limits.attach_timeout.as_secs_f64()
            ),
        )
        .await;
        return;
    };
    if send_within(shared, &mut framed, &ServerToClient::Relaying)
        .await
        .is_err()
    {
        return;
    }
    info!(session, "relaying");
    // Both connection slots stay taken while the relay runs.
    let (other_stream, other_rest, _other_slot) = other;
    let _conn_slot = slot;
    let why = crate::relay::splice(framed.into_parts(), (other_stream, other_rest), &limits).await;
    info!(session, "relay ended: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RendezvousClient;

    /// Joining this session makes the server panic while it holds the session map (a test
    /// hook: compiled into test builds only).
    const PANIC_SESSION: &str = "test-hook-panic";

    pub(super) fn panic_hook(session: &str) {
        if session == PANIC_SESSION {
            panic!("injected panic (test hook)");
        }
    }

    async fn pair(addr: SocketAddr, session: &str) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let names = ["s".to_owned()];
        let (a, b) = tokio::join!(
            RendezvousClient::join(addr, session, &names, deadline, || {}),
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                RendezvousClient::join(addr, session, &names, deadline, || {}).await
            }
        );
        let ((mut a, _), (mut b, _)) =
            (a.map_err(|e| e.to_string())?, b.map_err(|e| e.to_string())?);
        let (oa, ob) = tokio::join!(
            a.exchange_offer("s", serde_json::json!("from a"), deadline),
            b.exchange_offer("s", serde_json::json!("from b"), deadline)
        );
        assert_eq!(oa.map_err(|e| e.to_string())?, serde_json::json!("from b"));
        assert_eq!(ob.map_err(|e| e.to_string())?, serde_json::json!("from a"));
        Ok(())
    }

    /// A `Paired` message still queued when a connection ends (its client closed at once)
    /// does not keep the pair and the outboxes alive: the pair holds the outbox, the outbox
    /// the message, the message the pair.
    #[test]
    fn an_ended_connection_drops_what_its_outbox_held() {
        let outboxes = [Arc::new(Outbox::default()), Arc::new(Outbox::default())];
        let pair = Pair::new(
            "s".into(),
            "p".into(),
            [2, 2],
            None,
            [
                PeerEnd::Local {
                    conn: 1,
                    outbox: outboxes[0].clone(),
                },
                PeerEnd::Local {
                    conn: 2,
                    outbox: outboxes[1].clone(),
                },
            ],
            vec!["relay".into()],
            None,
        );
        outboxes[0].push(Outbound::Paired(
            pair.clone(),
            Role::First,
            ServerToClient::PeerLeft,
        ));
        let weak = Arc::downgrade(&pair);
        drop(pair);
        assert!(
            weak.upgrade().is_some(),
            "the queued message holds the pair"
        );
        drop(CloseOnDrop(&outboxes[0]));
        assert!(weak.upgrade().is_none(), "the pair was freed");
        // A closed outbox takes nothing more.
        outboxes[0].push(Outbound::Msg(ServerToClient::PeerLeft));
        assert!(lock(&outboxes[0].queue).messages.is_empty());
    }

    #[tokio::test]
    async fn a_panic_in_one_connection_leaves_the_others_served() {
        let server =
            RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
                .await
                .unwrap();
        let addr = server.local_addr().unwrap();
        let stats = server.stats();
        let running = tokio::spawn(server.run());
        pair(addr, "before").await.unwrap();
        // A waiting peer that must survive the panic of another connection.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let names = ["s".to_owned()];
        let waiting = tokio::spawn(async move {
            RendezvousClient::join(addr, "survivor", &names, deadline, || {}).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The connection whose handler panics (holding the session map) just closes.
        let names = ["s".to_owned()];
        let err = RendezvousClient::join(addr, PANIC_SESSION, &names, deadline, || {})
            .await
            .unwrap_err();
        assert!(matches!(err, crate::ClientError::Lost(_)), "{err}");
        // Everyone else is still served: new pairs, and the waiting peer gets its partner.
        for i in 0..5 {
            pair(addr, &format!("after-{i}")).await.unwrap();
        }
        let names = ["s".to_owned()];
        let (second, first) = tokio::join!(
            RendezvousClient::join(addr, "survivor", &names, deadline, || {}),
            waiting
        );
        second.unwrap();
        first.unwrap().unwrap();
        assert!(!running.is_finished(), "the server kept running");
        let _ = stats.session_count();
        running.abort();
    }
}
