//! Relaying: both peers attach with the pairing's token, then the first peer's task splices
//! the two connections. The wire format (frames server to client) is `nettool_core::relay`'s.

//! The server's side: one task per direction reads whatever has arrived (up to a frame)
//! and writes it as one frame. (Moving the bytes with `splice(2)` instead was measured:
//! the server spent a fifth less CPU, but the receiving peer a third more, and the relay
//! was slower; see README, "The data path".)

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::protocol::{FramedConn, Role, ServerToClient};
use nettool_core::relay::{header, FRAME_DATA, FRAME_END, MAX_FRAME};
use tokio::net::TcpStream;
use tracing::info;

use crate::conn::{refuse, send_within};
use crate::limits::ConnSlot;
use crate::metrics::{Metrics, Reason};
use crate::pairing::{PeerEnd, SessionSlot};
use crate::stream::ServerStream;
use crate::{lock, Shared};
use prometheus_client::metrics::counter::Counter;

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

/// A relay connection handed to the partner's task, with what was read past its first frame
/// and its connection slot.
pub(crate) type Attached = (TcpStream, Vec<u8>, ConnSlot);

#[derive(Debug)]
pub(crate) struct RelayWaiter {
    pub(crate) role: Role,
    pub(crate) conn: u64,
    pub(crate) tx: tokio::sync::oneshot::Sender<Attached>,
}

/// Releases a relay slot when dropped.
pub(crate) struct RelaySlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for RelaySlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the server holds for an express relay ticket ([`ClientToServer::RelayTicket`]).
///
/// [`ClientToServer::RelayTicket`]: nettool_core::protocol::ClientToServer::RelayTicket
#[derive(Debug)]
pub(crate) enum TicketSlot {
    /// The relay connection came first: it waits for its join's pairing (the relay token
    /// and its role).
    Waiting(tokio::sync::oneshot::Sender<TicketAssignment>),
    /// The pairing came first: what the connection attaches as, and when.
    Assigned(TicketAssignment, Instant),
}

/// What an express relay connection attaches as: its pairing's session, relay token and
/// the peer's role.
#[derive(Debug)]
pub(crate) struct TicketAssignment {
    pub(crate) session: String,
    pub(crate) token: String,
    pub(crate) role: Role,
}

/// Whether `ticket` looks like one (32 hex digits): anything else is refused unstored.
pub(crate) fn valid_ticket(ticket: &str) -> bool {
    ticket.len() == 32 && ticket.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Shared {
    /// At pairing: gives the express relay connection of `ticket` its relay token and role
    /// (at once when it waits, else when it comes, within the relay's attach timeout).
    pub(crate) fn assign_ticket(&self, ticket: &str, assigned: TicketAssignment) {
        let mut tickets = lock(&self.express_tickets);
        if let Some(TicketSlot::Waiting(_)) = tickets.get(ticket) {
            if let Some(TicketSlot::Waiting(tx)) = tickets.remove(ticket) {
                let _ = tx.send(assigned);
            }
            return;
        }
        // Assignments whose connection never came are dropped after the attach timeout.
        if tickets.len() >= 1024 {
            let limit = self
                .config
                .relay
                .as_ref()
                .map_or(Duration::from_secs(10), |l| l.attach_timeout);
            tickets.retain(|_, t| match t {
                TicketSlot::Waiting(tx) => !tx.is_closed(),
                TicketSlot::Assigned(_, at) => at.elapsed() < limit,
            });
        }
        tickets.insert(
            ticket.to_owned(),
            TicketSlot::Assigned(assigned, Instant::now()),
        );
    }
}

/// An express relay connection ([`ClientToServer::RelayTicket`]): waits (at most the session
/// expiry) until the join that names its ticket is paired, then attaches as that peer's
/// relay connection ([`serve_relay`]).
///
/// [`ClientToServer::RelayTicket`]: nettool_core::protocol::ClientToServer::RelayTicket
pub(crate) async fn serve_relay_ticket(
    shared: &Shared,
    mut framed: FramedConn<ServerStream>,
    slot: ConnSlot,
    conn: u64,
    ticket: String,
) {
    if shared.config.relay.is_none() {
        refuse(
            &mut framed,
            "this server does not relay (relaying is turned off)",
        )
        .await;
        return;
    }
    if !valid_ticket(&ticket) {
        refuse(&mut framed, "relay refused: a ticket is 32 hex digits").await;
        return;
    }
    let rx = {
        let mut tickets = lock(&shared.express_tickets);
        match tickets.remove(&ticket) {
            Some(TicketSlot::Assigned(assigned, _)) => Ok(assigned),
            Some(waiting @ TicketSlot::Waiting(_)) => {
                tickets.insert(ticket.clone(), waiting);
                Err(None)
            }
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tickets.insert(ticket.clone(), TicketSlot::Waiting(tx));
                Err(Some(rx))
            }
        }
    };
    let assigned = match rx {
        Ok(assigned) => assigned,
        Err(None) => {
            refuse(&mut framed, "relay refused: this ticket is already in use").await;
            return;
        }
        Err(Some(rx)) => {
            let waited = tokio::time::timeout(shared.config.session_expiry, rx).await;
            match waited {
                Ok(Ok(assigned)) => assigned,
                _ => {
                    {
                        let mut tickets = lock(&shared.express_tickets);
                        if matches!(tickets.get(&ticket), Some(TicketSlot::Waiting(tx)) if tx.is_closed())
                        {
                            tickets.remove(&ticket);
                        }
                    }
                    refuse(
                        &mut framed,
                        "relay refused: no join with this ticket was paired in time",
                    )
                    .await;
                    return;
                }
            }
        }
    };
    // Named by its session: the token index is written after pairing, which may not have
    // happened yet when the waiting connection wakes.
    let TicketAssignment {
        session,
        token,
        role,
    } = assigned;
    serve_relay(shared, framed, slot, conn, &session, token, role).await;
}

/// The TCP connection under a relay's stream (relays are refused over TLS before this).
fn plain(stream: ServerStream) -> Option<TcpStream> {
    match stream {
        ServerStream::Plain(s) => Some(s),
        ServerStream::Tls(_) => None,
    }
}

pub(crate) async fn serve_relay(
    shared: &Shared,
    mut framed: FramedConn<ServerStream>,
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
    // Clients name only the token (the connection is plain); older ones the session too.
    let session = match session {
        "" => shared.relay_session(&token).unwrap_or_default(),
        named => named.to_owned(),
    };
    let session = session.as_str();
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
                    shared.metrics.reject(Reason::relay_max_sessions);
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
            if let Some(stream) = plain(stream) {
                let _ = w.tx.send((stream, rest, slot));
            }
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
    let (stream, rest) = framed.into_parts();
    let Some(stream) = plain(stream) else { return };
    let why = splice(
        (stream, rest),
        (other_stream, other_rest),
        &limits,
        &shared.metrics,
    )
    .await;
    info!(session, "relay ended: {why}");
}

/// Shared accounting of one relayed session.
struct Budget {
    start: Instant,
    bytes: AtomicU64,
    limits: RelayLimits,
    /// `nettool_relay_bytes_total`.
    relayed: Counter,
    /// `nettool_rejected_total{reason="relay_max_bytes"}`, counted once per relay.
    hit_bytes: Counter,
    hit_bytes_once: AtomicBool,
}

impl Budget {
    /// Counts `n` more bytes; waits out the rate limit; says why the relay must stop.
    async fn spend(&self, n: usize) -> Option<String> {
        let total = self.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        self.relayed.inc_by(n as u64);
        let limits = &self.limits;
        if limits.max_bytes > 0 && total > limits.max_bytes {
            if !self.hit_bytes_once.swap(true, Ordering::Relaxed) {
                self.hit_bytes.inc();
            }
            return Some(format!(
                "relay limit reached: {} bytes per session",
                limits.max_bytes
            ));
        }
        if limits.rate > 0 {
            let due = Duration::from_secs_f64(total as f64 / limits.rate as f64);
            let elapsed = self.start.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
        None
    }
}

/// One side of a relay: its connection, and whether a frame to it is half written (then
/// no end frame may follow: it would land inside the frame).
struct Side {
    stream: TcpStream,
    in_frame: AtomicBool,
}

enum DirEnd {
    /// The sender closed its side; the peer was told.
    Eof,
    /// A limit was hit or a connection failed; the text says which.
    Stop(String),
}

/// Writes all of `buf` to `to` (both direction tasks hold the streams: `&self` I/O).
async fn send_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes the sender sent along with its relay request (read past it): one or more frames.
async fn send_prefix(prefix: &[u8], to: &Side, budget: &Budget) -> Option<DirEnd> {
    for chunk in prefix.chunks(MAX_FRAME) {
        if let Some(why) = budget.spend(chunk.len()).await {
            return Some(DirEnd::Stop(why));
        }
        to.in_frame.store(true, Ordering::Relaxed);
        let mut frame = header(FRAME_DATA, chunk.len()).to_vec();
        frame.extend_from_slice(chunk);
        if let Err(e) = send_all(&to.stream, &frame).await {
            return Some(DirEnd::Stop(format!("a peer's connection failed: {e}")));
        }
        to.in_frame.store(false, Ordering::Relaxed);
    }
    None
}

async fn direction(from: Arc<Side>, prefix: Vec<u8>, to: Arc<Side>, budget: Arc<Budget>) -> DirEnd {
    if let Some(end) = send_prefix(&prefix, &to, &budget).await {
        return end;
    }
    drop(prefix);
    let dst = to.stream.as_raw_fd();
    let mut buf = vec![0u8; 5 + MAX_FRAME];
    loop {
        // Whatever has arrived, up to a frame, read behind room for the header.
        let n = loop {
            if let Err(e) = from.stream.readable().await {
                return DirEnd::Stop(format!("a peer's connection failed: {e}"));
            }
            match from.stream.try_read(&mut buf[5..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return DirEnd::Stop(format!("a peer's connection failed: {e}")),
            }
        };
        if n == 0 {
            // Pass the half-close on as a TCP half-close, not as a frame: a peer that
            // stops reading at its TLS close_notify must not leave unread bytes behind,
            // or closing its socket would reset the connection and lose data in flight.
            // SAFETY: shutdown on a descriptor `to` holds open.
            unsafe { libc::shutdown(dst, libc::SHUT_WR) };
            return DirEnd::Eof;
        }
        if let Some(why) = budget.spend(n).await {
            return DirEnd::Stop(why);
        }
        buf[..5].copy_from_slice(&header(FRAME_DATA, n));
        to.in_frame.store(true, Ordering::Relaxed);
        if let Err(e) = send_all(&to.stream, &buf[..5 + n]).await {
            return DirEnd::Stop(format!("a peer's connection failed: {e}"));
        }
        to.in_frame.store(false, Ordering::Relaxed);
    }
}

/// Splices two attached relay connections until both directions ended or a limit is hit;
/// returns why it ended (for the log). Both peers get an end frame with the reason when a
/// limit stops the relay (unless a frame to that peer was cut off half written: then it
/// only sees the connection close). Each direction runs in a task of its own (both cores
/// can work); both tasks have ended when this returns, and are aborted if it is dropped.
pub(crate) async fn splice(
    a: (TcpStream, Vec<u8>),
    b: (TcpStream, Vec<u8>),
    limits: &RelayLimits,
    metrics: &Metrics,
) -> String {
    let _ = a.0.set_nodelay(true);
    let _ = b.0.set_nodelay(true);
    let side = |stream| {
        Arc::new(Side {
            stream,
            in_frame: AtomicBool::new(false),
        })
    };
    let (sa, sb) = (side(a.0), side(b.0));
    let budget = Arc::new(Budget {
        start: Instant::now(),
        bytes: AtomicU64::new(0),
        limits: limits.clone(),
        relayed: metrics.relay_bytes.clone(),
        hit_bytes: metrics.rejections(Reason::relay_max_bytes),
        hit_bytes_once: AtomicBool::new(false),
    });
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(direction(sa.clone(), a.1, sb.clone(), budget.clone()));
    tasks.spawn(direction(sb.clone(), b.1, sa.clone(), budget.clone()));
    // Both directions run until each saw its sender's end, unless one stops early (a limit,
    // a failed connection): then the whole relay stops.
    let run = async {
        while let Some(end) = tasks.join_next().await {
            match end {
                Ok(DirEnd::Eof) => {}
                Ok(DirEnd::Stop(why)) => return Some(why),
                Err(_) => return Some("relay task failed".to_owned()),
            }
        }
        None
    };
    let stop = if limits.max_duration.is_zero() {
        run.await
    } else {
        match tokio::time::timeout(limits.max_duration, run).await {
            Ok(s) => s,
            Err(_) => {
                metrics.reject(Reason::relay_max_duration);
                Some(format!(
                    "relay limit reached: {:.0} s per session",
                    limits.max_duration.as_secs_f64()
                ))
            }
        }
    };
    // Stop both directions, and wait until they are gone, before writing the end frames.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let why = stop
        .clone()
        .unwrap_or_else(|| "both peers closed".to_owned());
    for s in [&sa, &sb] {
        if let Some(msg) = &stop {
            if !s.in_frame.load(Ordering::Relaxed) {
                let mut frame = header(FRAME_END, msg.len()).to_vec();
                frame.extend_from_slice(msg.as_bytes());
                // A peer that reads nothing gets no say in how long this takes.
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), send_all(&s.stream, &frame)).await;
            }
        }
        // SAFETY: shutdown on a descriptor `s` holds open.
        unsafe { libc::shutdown(s.stream.as_raw_fd(), libc::SHUT_WR) };
    }
    why
}
