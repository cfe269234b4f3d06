//! The rendezvous server: pairs peers by session name and relays their offers and results.
//!
//! Each connection is served by its own task; a bad client (garbage, oversized lines, silence)
//! gets an error message and loses only its own connection. Session state lives in one map
//! behind a mutex that is held only for map operations, never across an await.
//!
//! Offers are held until both peers have offered for the same strategy and then delivered to
//! both at once, so both start punching at (nearly) the same instant: the skew is only the
//! difference between the two one-way delays from the server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::protocol::{
    ClientToServer, FramedConn, RecvError, Role, ServerToClient, PROTOCOL_VERSION,
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
}

/// Limits of the relay through the server. Hitting one ends that relay with a message to both
/// peers.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// Sessions relayed at the same time (attached peers waiting for their partner count).
    pub max_sessions: usize,
    /// Bytes per second per session, both directions together; 0 = unlimited.
    pub rate: u64,
    /// Bytes per session, both directions together; 0 = unlimited.
    pub max_bytes: u64,
    /// How long one relay may last; zero = unlimited.
    pub max_duration: Duration,
    /// How long the first peer to attach waits for the second.
    pub attach_timeout: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_sessions: 100,
            rate: 0,
            max_bytes: 0,
            max_duration: Duration::ZERO,
            attach_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            session_expiry: Duration::from_secs(300),
            max_frame_len: crate::protocol::DEFAULT_MAX_FRAME_LEN,
            first_frame_timeout: Duration::from_secs(10),
            observe_hold: Duration::from_secs(120),
            relay: Some(RelayLimits::default()),
        }
    }
}

/// A rendezvous server bound to a TCP port, and a UDP socket with the same number that
/// answers STUN Binding requests (so UDP strategies learn their public mapping).
#[derive(Debug)]
pub struct RendezvousServer {
    listener: TcpListener,
    udp: UdpSocket,
    shared: Arc<Shared>,
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
}

#[derive(Debug)]
struct RelayWaiter {
    role: Role,
    conn: u64,
    tx: tokio::sync::oneshot::Sender<(TcpStream, Vec<u8>)>,
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
    addr: SocketAddr,
    strategies: Vec<String>,
    tx: mpsc::UnboundedSender<Outbound>,
}

/// A paired session: both peers' outboxes and the offers held until both have offered.
#[derive(Debug)]
struct Pair {
    session: String,
    relay_token: Option<String>,
    conns: [u64; 2],
    txs: [mpsc::UnboundedSender<Outbound>; 2],
    held_offers: Mutex<HashMap<String, (Role, serde_json::Value)>>,
}

impl Pair {
    fn index(role: Role) -> usize {
        match role {
            Role::First => 0,
            Role::Second => 1,
        }
    }

    fn send(&self, to: Role, msg: ServerToClient) {
        let _ = self.txs[Self::index(to)].send(Outbound::Msg(msg));
    }

    fn offer(&self, from: Role, strategy: String, payload: serde_json::Value) {
        let mut held = self.held_offers.lock().expect("offer map poisoned");
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
    }
}

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
    /// number (so port 0 picks one number for both).
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let port = listener.local_addr()?.port();
        let udp = UdpSocket::bind(SocketAddr::new(addr.ip(), port)).await?;
        Ok(Self {
            listener,
            udp,
            shared: Arc::new(Shared {
                config,
                sessions: Mutex::new(HashMap::new()),
                next_conn: std::sync::atomic::AtomicU64::new(1),
                relay_waiting: Mutex::new(HashMap::new()),
                relays: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address the server answers STUN on (UDP, same port number as the TCP listener).
    pub fn udp_local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Number of sessions currently known (waiting or paired).
    pub fn session_count(&self) -> usize {
        self.shared
            .sessions
            .lock()
            .expect("sessions poisoned")
            .len()
    }

    /// Serves until the task is dropped: TCP connections and STUN on UDP. Accept and socket
    /// errors (e.g. out of file descriptors) are logged and retried after a short pause; they
    /// never end the server.
    pub async fn run(self) {
        let Self {
            listener,
            udp,
            shared,
        } = self;
        tokio::join!(accept_loop(listener, shared), serve_stun(udp));
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let shared = shared.clone();
                let conn = shared
                    .next_conn
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let span = tracing::info_span!("conn", id = conn, peer = %addr);
                tokio::spawn(
                    async move {
                        serve_connection(shared, stream, addr, conn).await;
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

/// Answers STUN Binding requests; ignores everything else.
async fn serve_stun(udp: UdpSocket) {
    let mut buf = vec![0u8; 2048];
    loop {
        match udp.recv_from(&mut buf).await {
            Ok((n, from)) => match crate::stun::answer(&buf[..n], from) {
                Some(reply) => {
                    if let Err(e) = udp.send_to(&reply, from).await {
                        debug!(%from, "stun: sending the answer failed: {e}");
                    }
                }
                None => {
                    debug!(%from, len = n, "stun: ignored a datagram that is not a binding request")
                }
            },
            // ICMP errors of earlier answers surface here (ECONNREFUSED and friends).
            Err(e) => {
                debug!("stun: receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, addr: SocketAddr, conn: u64) {
    let _ = stream.set_nodelay(true);
    let mut framed = FramedConn::new(stream, shared.config.max_frame_len);
    let first = match tokio::time::timeout(
        shared.config.first_frame_timeout,
        framed.recv::<ClientToServer>(),
    )
    .await
    {
        Err(_) => {
            refuse(&mut framed, "no request within the time limit").await;
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
        } => {
            if check_version(&mut framed, version).await {
                serve_control(&shared, framed, addr, conn, session, strategies).await;
            }
        }
        ClientToServer::Relay {
            version,
            session,
            token,
            role,
        } => {
            if check_version(&mut framed, version).await {
                serve_relay(&shared, framed, addr, conn, &session, token, role).await;
            }
        }
        other => {
            let what = serde_json::to_value(&other)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                .unwrap_or_default();
            refuse(
                &mut framed,
                &format!("expected 'join', 'observe' or 'relay' as the first frame, got '{what}'"),
            )
            .await;
        }
    }
}

async fn check_version(framed: &mut FramedConn<TcpStream>, version: u32) -> bool {
    if version == PROTOCOL_VERSION {
        return true;
    }
    refuse(
        framed,
        &format!("unsupported protocol version {version} (server speaks {PROTOCOL_VERSION})"),
    )
    .await;
    false
}

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

async fn serve_control(
    shared: &Shared,
    mut framed: FramedConn<TcpStream>,
    addr: SocketAddr,
    conn: u64,
    session: String,
    strategies: Vec<String>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    if session.is_empty() || session.len() > 256 {
        refuse(&mut framed, "session name must be 1 to 256 bytes").await;
        return;
    }
    // Join: either wait, or pair with the waiter.
    let joined = {
        let mut sessions = shared.sessions.lock().expect("sessions poisoned");
        match sessions.remove(&session) {
            None => {
                sessions.insert(
                    session.clone(),
                    SessionSlot::Waiting(Waiter {
                        conn,
                        addr,
                        strategies,
                        tx: tx.clone(),
                    }),
                );
                Ok(None)
            }
            Some(SessionSlot::Paired(pair)) => {
                sessions.insert(session.clone(), SessionSlot::Paired(pair));
                Err(format!("session '{session}' already has two peers"))
            }
            Some(SessionSlot::Waiting(waiter)) => {
                let agreed: Vec<String> = waiter
                    .strategies
                    .iter()
                    .filter(|s| strategies.contains(s))
                    .cloned()
                    .collect();
                if agreed.is_empty() {
                    let msg = format!(
                        "no strategy in common (first peer offers [{}], second peer offers [{}])",
                        waiter.strategies.join(", "),
                        strategies.join(", ")
                    );
                    let _ = waiter.tx.send(Outbound::Fatal(ServerToClient::Error {
                        message: msg.clone(),
                    }));
                    Err(msg)
                } else {
                    let mut id = [0u8; 16];
                    rand::thread_rng().fill_bytes(&mut id);
                    let pair_id = hex::encode(id);
                    let relay_token = shared.config.relay.as_ref().map(|_| {
                        let mut t = [0u8; 16];
                        rand::thread_rng().fill_bytes(&mut t);
                        hex::encode(t)
                    });
                    let pair = Arc::new(Pair {
                        session: session.clone(),
                        relay_token: relay_token.clone(),
                        conns: [waiter.conn, conn],
                        txs: [waiter.tx.clone(), tx.clone()],
                        held_offers: Mutex::new(HashMap::new()),
                    });
                    sessions.insert(session.clone(), SessionSlot::Paired(pair.clone()));
                    let _ = waiter.tx.send(Outbound::Paired(
                        pair.clone(),
                        Role::First,
                        ServerToClient::Paired {
                            role: Role::First,
                            strategies: agreed.clone(),
                            pair_id: pair_id.clone(),
                            observed: waiter.addr,
                            peer: addr,
                            relay_token: relay_token.clone(),
                        },
                    ));
                    let _ = tx.send(Outbound::Paired(
                        pair.clone(),
                        Role::Second,
                        ServerToClient::Paired {
                            role: Role::Second,
                            strategies: agreed,
                            pair_id,
                            observed: addr,
                            peer: waiter.addr,
                            relay_token,
                        },
                    ));
                    Ok(Some(pair))
                }
            }
        }
    };
    match joined {
        Err(msg) => {
            refuse(&mut framed, &msg).await;
            return;
        }
        Ok(None) => {
            info!(session = %session, "waiting for the second peer");
            if framed
                .send(&ServerToClient::Waiting {
                    session: session.clone(),
                })
                .await
                .is_err()
            {
                leave(shared, &session, conn, None);
                return;
            }
        }
        Ok(Some(_)) => info!(session = %session, "paired"),
    }

    let mut pair: Option<(Arc<Pair>, Role)> = None;
    let expiry = tokio::time::sleep(shared.config.session_expiry);
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(out) = out else { break };
                let (msg, fatal) = match out {
                    Outbound::Msg(m) => (m, false),
                    Outbound::Fatal(m) => (m, true),
                    Outbound::Paired(p, role, m) => {
                        pair = Some((p, role));
                        (m, false)
                    }
                };
                if framed.send(&msg).await.is_err() || fatal {
                    break;
                }
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
                        if let Err(e) = handle_frame(&mut framed, pair.as_ref(), msg).await {
                            refuse(&mut framed, &e).await;
                            break;
                        }
                    }
                }
            }
        }
    }
    leave(shared, &session, conn, pair.as_ref());
}

async fn handle_frame(
    framed: &mut FramedConn<TcpStream>,
    pair: Option<&(Arc<Pair>, Role)>,
    msg: ClientToServer,
) -> Result<(), String> {
    match msg {
        ClientToServer::Ping { id } => framed
            .send(&ServerToClient::Pong { id })
            .await
            .map_err(|e| e.to_string()),
        ClientToServer::Offer { strategy, payload } => {
            let (pair, role) = pair.ok_or("offer before the session was paired")?;
            pair.offer(*role, strategy, payload);
            Ok(())
        }
        ClientToServer::Result {
            strategy,
            ok,
            error,
        } => {
            let (pair, role) = pair.ok_or("result before the session was paired")?;
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
        ClientToServer::Join { .. } => Err("already joined a session on this connection".into()),
        ClientToServer::Relay { .. } => {
            Err("'relay' must be the first frame of its own connection".into())
        }
        ClientToServer::Observe { .. } => {
            Err("'observe' must be the first frame of its own connection".into())
        }
    }
}

/// Removes this connection's part of a session and tells the peer, if any.
fn leave(shared: &Shared, session: &str, conn: u64, pair: Option<&(Arc<Pair>, Role)>) {
    let mut sessions = shared.sessions.lock().expect("sessions poisoned");
    let ours = match sessions.get(session) {
        Some(SessionSlot::Waiting(w)) => w.conn == conn,
        Some(SessionSlot::Paired(p)) => p.conns.contains(&conn),
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
    addr: SocketAddr,
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
        let sessions = shared.sessions.lock().expect("sessions poisoned");
        matches!(sessions.get(session), Some(SessionSlot::Paired(p)) if p.relay_token.as_deref() == Some(token.as_str()))
    };
    if !known {
        warn!(%addr, session, "relay refused: no paired session with that name and token");
        refuse(
            &mut framed,
            "relay refused: no paired session with that name and token",
        )
        .await;
        return;
    }
    // The second peer hands its connection to the first, whose task runs the relay.
    let partner = {
        let mut waiting = shared.relay_waiting.lock().expect("relay map poisoned");
        match waiting.remove(&token) {
            Some(w) if w.role != role => Ok(Some(w)),
            Some(w) => {
                waiting.insert(token.clone(), w);
                Err(())
            }
            None => Ok(None),
        }
    };
    let Ok(partner) = partner else {
        refuse(
            &mut framed,
            &format!("relay refused: the {role} peer of this session is already attached"),
        )
        .await;
        return;
    };
    if let Some(w) = partner {
        if framed.send(&ServerToClient::Relaying).await.is_ok() {
            let _ = w.tx.send(framed.into_parts());
        }
        return;
    }
    let active = shared
        .relays
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _slot = RelaySlot(&shared.relays);
    if active >= limits.max_sessions {
        warn!(%addr, session, "relay refused: {} sessions relayed already", limits.max_sessions);
        refuse(
            &mut framed,
            &format!(
                "relay refused: the server relays at most {} sessions at a time",
                limits.max_sessions
            ),
        )
        .await;
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    shared
        .relay_waiting
        .lock()
        .expect("relay map poisoned")
        .insert(token.clone(), RelayWaiter { role, conn, tx });
    let other = tokio::time::timeout(limits.attach_timeout, rx).await;
    let Ok(Ok(other)) = other else {
        {
            let mut waiting = shared.relay_waiting.lock().expect("relay map poisoned");
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
    if framed.send(&ServerToClient::Relaying).await.is_err() {
        return;
    }
    info!(session, "relaying");
    let why = crate::relay::splice(framed.into_parts(), other, &limits).await;
    info!(session, "relay ended: {why}");
}
