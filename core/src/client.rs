//! The peer's side of the rendezvous conversation.
//!
//! [`RendezvousClient::join`] opens the control connection and waits until the server pairs
//! this peer; afterwards the orchestrator and strategies exchange offers and results through
//! it. [`observe`] runs the one-frame observe exchange on a connection a strategy opened from
//! its own punch port.
//!
//! A server may have addresses of both IP families: [`connect_happy`] races them (happy
//! eyeballs, IPv6 first) for the control connection, and
//! [`observe_family`] shows this peer to the server over the other
//! family, so each peer learns its public address there and the server vouches for it to the
//! peer (a candidate of that family then passes [`crate::candidates`]' checks).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::control::{secure, ControlIo, ControlSecurity};

use crate::protocol::{
    encode, ClientToServer, FramedConn, RecvError, Role, ServerToClient, DEFAULT_MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};

/// Why talking to the rendezvous server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the rendezvous server at {addr}: {source}")]
    Connect {
        /// The server's address.
        addr: SocketAddr,
        /// The connect error.
        source: std::io::Error,
    },
    /// None of the server's addresses could be reached; each one's error, in the order tried.
    #[error("cannot reach the rendezvous server at any of its addresses: {0}")]
    Unreachable(String),
    /// The connection to the server failed or closed.
    #[error("rendezvous connection lost: {0}")]
    Lost(String),
    /// The server refused a request and said why.
    #[error("rendezvous server: {0}")]
    Refused(String),
    /// The peer left the session.
    #[error("the peer left the session")]
    PeerLeft,
    /// The peer's key confirmation failed in a code session and the server burned the code
    /// ([`ServerToClient::WrongCode`]).
    #[error("someone tried a wrong code: the code is burned")]
    WrongCode,
    /// The server sent something this client did not expect at this point.
    #[error("unexpected message from the rendezvous server: {0}")]
    Unexpected(String),
    /// A deadline passed while waiting for the server or the peer.
    #[error("timed out waiting for {0}")]
    TimedOut(&'static str),
    /// The server's TLS key is not the one pinned or remembered for it (see
    /// [`crate::control`]); the message names both keys and how to accept the new one.
    #[error("{0}")]
    ServerKey(String),
}

impl From<RecvError> for ClientError {
    fn from(e: RecvError) -> Self {
        Self::Lost(e.to_string())
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Lost(e.to_string())
    }
}

/// What the server told a peer when it paired it, and what it saw of both peers over their
/// other IP family (filled in after pairing, see [`observe_family`]).
#[derive(Debug, Clone)]
pub struct Pairing {
    /// This peer's role.
    pub role: Role,
    /// Strategies both peers offered, in the first peer's order.
    pub strategies: Vec<String>,
    /// Random identifier of this pairing.
    pub pair_id: String,
    /// This peer's control address as the server saw it.
    pub observed: SocketAddr,
    /// The peer's control address as the server saw it.
    pub peer: SocketAddr,
    /// Token for attaching to the server's relay; `None` when the server does not relay.
    pub relay_token: Option<String>,
    /// This peer's address of the other IP family as the server saw it, when this peer
    /// reached the server over both families.
    pub observed_other: Option<SocketAddr>,
    /// The peer's address of the other IP family as the server saw it, when the peer showed
    /// itself over both families ([`ServerToClient::PeerAddress`]).
    pub peer_other: Option<SocketAddr>,
    /// Where the relay runs when not on the server this peer joined through (another node
    /// of a cluster; one address per family); empty = that server.
    pub relay_addrs: Vec<SocketAddr>,
    /// The peer's express PAKE message, when the server paired two express joins and splices
    /// their relay connections ([`crate::express`]).
    pub peer_pake: Option<String>,
    /// The offers the peer prepared before joining, by strategy, when both joins carried
    /// some ([`JoinRequest::offers`]). Untrusted, like every offer.
    pub peer_offers: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Offers a join carries when they are ready in time ([`JoinRequest::offers`]): a future
/// that gives them once made (by strategy), or `None` when there are none; and how long the
/// join waits for them once connected (`None`: half the TCP connect's round trip, 10 to 250
/// ms).
pub struct JoinOffers(
    pub futures::future::BoxFuture<'static, Option<serde_json::Map<String, serde_json::Value>>>,
    pub Option<Duration>,
);

impl std::fmt::Debug for JoinOffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinOffers")
    }
}

/// What a join asks for ([`RendezvousClient::join_request`]).
#[derive(Debug)]
pub struct JoinRequest<'a> {
    /// The session name.
    pub session: &'a str,
    /// The strategies offered, in order.
    pub strategies: &'a [String],
    /// The server token, when the server requires one.
    pub token: Option<&'a str>,
    /// The express relay's part of the join.
    pub express: Option<crate::protocol::ExpressJoin>,
    /// Prepared offers to go with a join that carries its PAKE message alone: sent when
    /// they are ready by the time the connection to the server is (or half the TCP
    /// connect's round trip after it, 10 to 250 ms), else the join goes without them.
    pub offers: Option<JoinOffers>,
}

impl Pairing {
    /// This peer's addresses as the server saw them: the control connection's, then the
    /// other family's if known.
    pub fn observed_all(&self) -> Vec<SocketAddr> {
        std::iter::once(self.observed)
            .chain(self.observed_other)
            .collect()
    }

    /// The peer's addresses as the server saw them: its control connection's, then its other
    /// family's if known. Public candidates in the peer's offers must be among these IPs.
    pub fn peer_all(&self) -> Vec<SocketAddr> {
        std::iter::once(self.peer).chain(self.peer_other).collect()
    }

    /// This peer's address of one family as the server saw it (`v6`: IPv6, else IPv4).
    pub fn observed_for(&self, v6: bool) -> Option<SocketAddr> {
        self.observed_all().into_iter().find(|a| a.is_ipv6() == v6)
    }

    /// The address to attach to the relay at: the server itself (`server`), or the relay
    /// node's address of the same family as `server` (else its first).
    pub fn relay_addr(&self, server: SocketAddr) -> SocketAddr {
        self.relay_addrs
            .iter()
            .find(|a| a.is_ipv4() == server.is_ipv4())
            .or(self.relay_addrs.first())
            .copied()
            .unwrap_or(server)
    }
}

/// How long happy eyeballs waits for one connection attempt before starting the next
/// (RFC 8305 §5 recommends 250 ms).
pub const CONNECTION_ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The order [`connect_happy`] tries `addrs` in (RFC 8305 §4): families interleaved, IPv6
/// first, each family's addresses in their given order; duplicates dropped.
pub fn happy_eyeballs_order(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut v6: Vec<SocketAddr> = Vec::new();
    let mut v4: Vec<SocketAddr> = Vec::new();
    for a in addrs {
        let list = if a.is_ipv6() { &mut v6 } else { &mut v4 };
        if !list.contains(a) {
            list.push(*a);
        }
    }
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    let (mut i6, mut i4) = (v6.into_iter(), v4.into_iter());
    loop {
        match (i6.next(), i4.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Connects to the first of `addrs` that answers, happy-eyeballs style (RFC 8305): attempts
/// start in [`happy_eyeballs_order`], each [`CONNECTION_ATTEMPT_DELAY`] after the previous one
/// or as soon as it failed, and the first connection established wins (the others are
/// dropped). Fails when every address failed or at `deadline`.
pub async fn connect_happy(
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<TcpStream, ClientError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let order = happy_eyeballs_order(addrs);
    if let [only] = order[..] {
        return within(deadline, "the rendezvous server", TcpStream::connect(only))
            .await?
            .map_err(|source| ClientError::Connect { addr: only, source });
    }
    let mut next = order.into_iter();
    let mut running = FuturesUnordered::new();
    let mut errors: Vec<String> = Vec::new();
    let start = |addr: SocketAddr| async move { (addr, TcpStream::connect(addr).await) };
    let stop = tokio::time::sleep_until(deadline.into());
    tokio::pin!(stop);
    loop {
        let more = match next.next() {
            Some(addr) => {
                running.push(start(addr));
                true
            }
            None => false,
        };
        if running.is_empty() {
            return Err(ClientError::Unreachable(if errors.is_empty() {
                "no address".into()
            } else {
                errors.join("; ")
            }));
        }
        let delay = tokio::time::sleep(if more {
            CONNECTION_ATTEMPT_DELAY
        } else {
            Duration::MAX / 4
        });
        tokio::pin!(delay);
        // The next attempt starts after the delay, or at once when one fails.
        tokio::select! {
            () = &mut stop => return Err(ClientError::TimedOut("the rendezvous server")),
            () = &mut delay => {}
            Some((addr, res)) = running.next() => match res {
                Ok(stream) => return Ok(stream),
                Err(e) => {
                    tracing::debug!(%addr, "rendezvous server address failed: {e}");
                    errors.push(format!("{addr}: {e}"));
                }
            },
        }
    }
}

/// How long the writer task may take to write one frame before it gives up on the server
/// (it then closes the connection; the reading side sees the end).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a join waits for its prepared offers once its connection to the server is up:
/// half the TCP connect's round trip (a round trip saved after pairing is worth it), within
/// these bounds (the offers' own exchanges with the server take longer than a loopback
/// connect).
const JOIN_OFFERS_WAIT: Duration = Duration::from_millis(250);
const JOIN_OFFERS_WAIT_MIN: Duration = Duration::from_millis(10);

/// The sending side of the control connection: a task owns the socket's write half and
/// writes whole frames from a queue.
///
/// Sending only queues an encoded frame (no await), so a strategy's future dropped at any
/// point (the orchestrator's deadline) can never leave half a line on the wire: what was
/// queued is written whole, what was not is not written at all. The task ends when the
/// client is dropped, after writing what was queued, or at the first failed or stalled write.
#[derive(Debug)]
struct FrameWriter {
    /// Frames to write, each with an optional signal for when it was written.
    tx: mpsc::UnboundedSender<(Vec<u8>, Option<oneshot::Sender<()>>)>,
}

impl FrameWriter {
    fn spawn(mut half: WriteHalf<Box<dyn ControlIo>>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<u8>, Option<oneshot::Sender<()>>)>();
        tokio::spawn(async move {
            while let Some((frame, written)) = rx.recv().await {
                let write = async {
                    half.write_all(&frame).await?;
                    half.flush().await
                };
                match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                    Ok(Ok(())) => {
                        if let Some(w) = written {
                            let _ = w.send(());
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::debug!("rendezvous connection: write failed: {e}");
                        break;
                    }
                    Err(_) => {
                        tracing::debug!("rendezvous connection: the server read nothing for 30s");
                        break;
                    }
                }
            }
            // Closing the write half on every path tells the server we are gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), half.shutdown()).await;
        });
        Self { tx }
    }

    fn send(&self, msg: &ClientToServer) -> Result<(), ClientError> {
        self.tx
            .send((encode(msg), None))
            .map_err(|_| ClientError::Lost("the connection to the server failed".into()))
    }

    /// Queues `msg` and waits (up to `limit`) until it is on the wire: for a last word
    /// before the process may end.
    async fn send_written(&self, msg: &ClientToServer, limit: Duration) -> Result<(), ClientError> {
        let (done, written) = oneshot::channel();
        self.tx
            .send((encode(msg), Some(done)))
            .map_err(|_| ClientError::Lost("the connection to the server failed".into()))?;
        match tokio::time::timeout(limit, written).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(ClientError::Lost(
                "the message could not be written to the server".into(),
            )),
        }
    }
}

/// A result the peer sent while this side was still busy with an attempt.
#[derive(Debug)]
struct EarlyResult {
    strategy: String,
    ok: bool,
    error: Option<String>,
}

/// A joined and paired control connection to the rendezvous server.
///
/// Cancel safe: every method may be dropped at any await point (the orchestrator enforces
/// deadlines that way) without corrupting the connection; sends are whole frames queued to a
/// writer task and receiving keeps partial frames for the next call.
#[derive(Debug)]
pub struct RendezvousClient {
    conn: FramedConn<ReadHalf<Box<dyn ControlIo>>>,
    writer: FrameWriter,
    server: SocketAddr,
    /// Every address of the server this client was given.
    servers: Vec<SocketAddr>,
    /// The server's address of the other family, once this peer reached it there.
    other_server: Option<SocketAddr>,
    /// The peer's addresses of other families the server reported (at most one per family).
    peer_addresses: Vec<SocketAddr>,
    next_ping: u64,
    /// The join's round trip (the join sent to the server's first answer).
    join_rtt: Duration,
    /// The agreed strategies: the only ones the peer may send results for.
    strategies: Vec<String>,
    /// Results the peer sent while this side was still busy with an attempt: at most one per
    /// agreed strategy (a later one replaces an earlier), so the peer cannot grow it.
    early_results: Vec<EarlyResult>,
}

impl RendezvousClient {
    /// Connects, joins `session` offering `strategies`, and waits until paired or `deadline`.
    ///
    /// `on_waiting` is called once if the server says this peer is the first and waits.
    pub async fn join(
        server: SocketAddr,
        session: &str,
        strategies: &[String],
        deadline: Instant,
        on_waiting: impl FnOnce(),
    ) -> Result<(Self, Pairing), ClientError> {
        Self::join_with_token(server, session, strategies, None, deadline, on_waiting).await
    }

    /// As [`join`](Self::join), giving `token` to a server that requires a server token to
    /// join (`None` sends no token, as older clients do). Both join over plain JSON: see
    /// [`join_any`](Self::join_any) for TLS.
    pub async fn join_with_token(
        server: SocketAddr,
        session: &str,
        strategies: &[String],
        token: Option<&str>,
        deadline: Instant,
        on_waiting: impl FnOnce(),
    ) -> Result<(Self, Pairing), ClientError> {
        let plain = ControlSecurity::Plain;
        Self::join_any(
            &[server],
            &plain,
            session,
            strategies,
            token,
            deadline,
            on_waiting,
        )
        .await
    }

    /// As [`join_with_token`](Self::join_with_token) with every address of the server (of
    /// either family): the control connection goes to the first that answers
    /// ([`connect_happy`]); the others stay known for [`observe_family`]. `security` says
    /// whether it runs over TLS and which server key is accepted.
    pub async fn join_any(
        servers: &[SocketAddr],
        security: &ControlSecurity,
        session: &str,
        strategies: &[String],
        token: Option<&str>,
        deadline: Instant,
        on_waiting: impl FnOnce(),
    ) -> Result<(Self, Pairing), ClientError> {
        let join = JoinRequest {
            session,
            strategies,
            token,
            express: None,
            offers: None,
        };
        Self::join_request(servers, security, join, deadline, on_waiting).await
    }

    /// As [`join_any`](Self::join_any) with everything a join can carry (the express relay's
    /// part too, [`crate::express`]).
    pub async fn join_request(
        servers: &[SocketAddr],
        security: &ControlSecurity,
        join: JoinRequest<'_>,
        deadline: Instant,
        on_waiting: impl FnOnce(),
    ) -> Result<(Self, Pairing), ClientError> {
        let JoinRequest {
            session,
            strategies,
            token,
            express,
            offers,
        } = join;
        let connecting = Instant::now();
        let stream = connect_happy(servers, deadline).await?;
        let connect_rtt = connecting.elapsed();
        let server = peer_of(&stream)?;
        let _ = stream.set_nodelay(true);
        let stream = secure(stream, server, security, deadline).await?;
        let express = match (express, offers) {
            (Some(mut x), Some(JoinOffers(ready, wait))) if x.ticket.is_empty() => {
                let wait = wait.unwrap_or_else(|| {
                    (connect_rtt / 2).clamp(JOIN_OFFERS_WAIT_MIN, JOIN_OFFERS_WAIT)
                });
                x.offers = tokio::time::timeout(wait, ready).await.ok().flatten();
                tracing::debug!(
                    offers = x.offers.as_ref().map_or(0, |o| o.len()),
                    "prepared offers with the join"
                );
                Some(x)
            }
            (x, _) => x,
        };
        let (read, write) = tokio::io::split(stream);
        let writer = FrameWriter::spawn(write);
        let mut conn = FramedConn::new(read, DEFAULT_MAX_FRAME_LEN);
        writer.send(&ClientToServer::Join {
            version: PROTOCOL_VERSION,
            session: session.to_owned(),
            strategies: strategies.to_vec(),
            token: token.map(str::to_owned),
            express,
        })?;
        let sent = Instant::now();
        let mut join_rtt = None;
        let mut on_waiting = Some(on_waiting);
        loop {
            let msg = within(deadline, "a peer to join the session", conn.recv()).await??;
            let join_rtt = *join_rtt.get_or_insert_with(|| sent.elapsed());
            match msg {
                None => return Err(ClientError::Lost("server closed the connection".into())),
                Some(ServerToClient::Waiting { .. }) => {
                    if let Some(f) = on_waiting.take() {
                        f();
                    }
                }
                Some(ServerToClient::Paired {
                    role,
                    strategies,
                    pair_id,
                    observed,
                    peer,
                    relay_token,
                    relay_addrs,
                    peer_pake,
                    peer_offers,
                }) => {
                    let client = Self {
                        conn,
                        writer,
                        server,
                        servers: servers.to_vec(),
                        other_server: None,
                        peer_addresses: Vec::new(),
                        next_ping: 0,
                        join_rtt,
                        strategies: strategies.clone(),
                        early_results: Vec::new(),
                    };
                    let pairing = Pairing {
                        role,
                        strategies,
                        pair_id,
                        observed,
                        peer,
                        relay_token,
                        observed_other: None,
                        peer_other: None,
                        relay_addrs,
                        peer_pake,
                        peer_offers,
                    };
                    return Ok((client, pairing));
                }
                Some(other) => return Err(unexpected(other)),
            }
        }
    }

    /// The rendezvous server's address (of the control connection).
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The server's addresses this peer reached it on, one per family: the control
    /// connection's first, then the other family's once [`observe_family`] reached it.
    pub fn servers(&self) -> Vec<SocketAddr> {
        std::iter::once(self.server)
            .chain(self.other_server)
            .collect()
    }

    /// The peer's addresses of other families that the server reported so far.
    pub fn peer_addresses(&self) -> &[SocketAddr] {
        &self.peer_addresses
    }

    /// The server's addresses of the other IP family than the control connection's, from
    /// the addresses given to [`join_any`](Self::join_any) (for [`observe_family`]).
    pub fn other_family_servers(&self) -> Vec<SocketAddr> {
        self.servers
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() != self.server.is_ipv4())
            .collect()
    }

    /// Records the server address [`observe_family`] reached (it then appears in
    /// [`servers`](Self::servers)).
    pub fn set_other_family_server(&mut self, server: SocketAddr) {
        if server.is_ipv4() != self.server.is_ipv4() {
            self.other_server = Some(server);
        }
    }

    /// The join's round trip: from sending the join to the server's first answer (waiting or
    /// paired). The scale of the round trip to the server, at no cost of its own.
    pub fn join_rtt(&self) -> Duration {
        self.join_rtt
    }

    /// Measures the round-trip time to the server (the smallest of `count` pings).
    pub async fn rtt(&mut self, count: usize, deadline: Instant) -> Result<Duration, ClientError> {
        let mut best = Duration::MAX;
        for _ in 0..count.max(1) {
            self.next_ping += 1;
            let id = self.next_ping;
            let start = tokio::time::Instant::now();
            self.writer.send(&ClientToServer::Ping { id })?;
            loop {
                match self.recv(deadline, "the server's pong").await? {
                    ServerToClient::Pong { id: got } if got == id => break,
                    ServerToClient::Pong { .. } => continue,
                    other => return Err(unexpected(other)),
                }
            }
            best = best.min(start.elapsed());
        }
        Ok(best)
    }

    /// Sends this peer's offer for `strategy` without waiting for the peer's (queued whole
    /// to the writer task).
    pub fn send_offer(
        &self,
        strategy: &str,
        payload: serde_json::Value,
    ) -> Result<(), ClientError> {
        self.writer.send(&ClientToServer::Offer {
            strategy: strategy.to_owned(),
            payload,
        })
    }

    /// Sends this peer's offer for `strategy` and waits for the peer's (the server delivers
    /// both at the same moment).
    pub async fn exchange_offer(
        &mut self,
        strategy: &str,
        payload: serde_json::Value,
        deadline: Instant,
    ) -> Result<serde_json::Value, ClientError> {
        self.send_offer(strategy, payload)?;
        loop {
            match self.recv(deadline, "the peer's offer").await? {
                ServerToClient::Offer {
                    strategy: s,
                    payload,
                } if s == strategy => return Ok(payload),
                // A late offer for a strategy both already gave up on.
                ServerToClient::Offer { .. } => continue,
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Sends this peer's result for `strategy`. The error text is cut to
    /// [`MAX_RESULT_ERROR`] bytes (the server bounds what a peer may send per attempt).
    ///
    /// The frame is queued whole to the writer task; awaiting is not needed for it to go out
    /// (this stays `async` for compatibility).
    pub async fn send_result(
        &mut self,
        strategy: &str,
        ok: bool,
        error: Option<String>,
    ) -> Result<(), ClientError> {
        self.writer.send(&ClientToServer::Result {
            strategy: strategy.to_owned(),
            ok,
            error: error.map(|e| cut(e, MAX_RESULT_ERROR)),
        })
    }

    /// Tells the server that this peer's key confirmation failed in the code session
    /// `session`: someone tried a wrong code, and the server burns it (see
    /// [`ClientToServer::BadCode`]). Queued like every frame; it goes out even if the client
    /// is dropped right after.
    pub async fn report_bad_code(&self, session: &str) -> Result<(), ClientError> {
        // Written before this returns: the caller ends right after, and a frame still queued
        // when the runtime stops would never reach the server (the code would not burn).
        self.writer
            .send_written(
                &ClientToServer::BadCode {
                    session: session.to_owned(),
                },
                Duration::from_secs(2),
            )
            .await
    }

    /// Number of early peer results held (for tests of the bound).
    #[doc(hidden)]
    pub fn held_results(&self) -> usize {
        self.early_results.len()
    }

    /// Keeps a result that arrived while waiting for something else: one per agreed
    /// strategy, the latest wins; results for strategies that were not agreed are dropped.
    fn keep_early(&mut self, strategy: String, ok: bool, error: Option<String>) {
        if !self.strategies.contains(&strategy) {
            tracing::debug!(%strategy, "ignoring the peer's result for a strategy not agreed");
            return;
        }
        let result = EarlyResult {
            strategy,
            ok,
            error,
        };
        match self
            .early_results
            .iter_mut()
            .find(|r| r.strategy == result.strategy)
        {
            Some(slot) => *slot = result,
            None => self.early_results.push(result),
        }
    }

    /// Waits for the peer's result for `strategy`: `Ok(None)` when the peer succeeded,
    /// `Ok(Some(reason))` when it failed.
    pub async fn peer_result(
        &mut self,
        strategy: &str,
        deadline: Instant,
    ) -> Result<Result<(), String>, ClientError> {
        if let Some(i) = self
            .early_results
            .iter()
            .position(|r| r.strategy == strategy)
        {
            let r = self.early_results.remove(i);
            return Ok(to_result(r.ok, r.error));
        }
        loop {
            match self.recv_any(deadline, "the peer's result", true).await? {
                ServerToClient::Result {
                    strategy: s,
                    ok,
                    error,
                } => {
                    if s == strategy {
                        return Ok(to_result(ok, error));
                    }
                    self.keep_early(s, ok, error);
                }
                // A peer that gave up early may have skipped its offer; ignore stale offers.
                ServerToClient::Offer { .. } => {}
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Reads the control connection until it ends or `deadline`: `Err(WrongCode)` when the
    /// server says the peer's key confirmation failed in a code session (it burned the code),
    /// `Ok` when the connection just ended or the deadline came.
    pub async fn until_closed(&mut self, deadline: Instant) -> Result<(), ClientError> {
        loop {
            match self.recv_any(deadline, "the server", true).await {
                Ok(_) => {}
                Err(ClientError::WrongCode) => return Err(ClientError::WrongCode),
                Err(_) => return Ok(()),
            }
        }
    }

    /// Receives the next message other than a result (results that arrive meanwhile are kept
    /// for [`Self::peer_result`]).
    async fn recv(
        &mut self,
        deadline: Instant,
        what: &'static str,
    ) -> Result<ServerToClient, ClientError> {
        self.recv_any(deadline, what, false).await
    }

    /// Receives the next message; results are returned only when `results` is set.
    async fn recv_any(
        &mut self,
        deadline: Instant,
        what: &'static str,
        results: bool,
    ) -> Result<ServerToClient, ClientError> {
        loop {
            match within(deadline, what, self.conn.recv()).await?? {
                None => return Err(ClientError::Lost("server closed the connection".into())),
                Some(ServerToClient::Error { message }) => {
                    return Err(ClientError::Refused(message))
                }
                Some(ServerToClient::PeerLeft) => return Err(ClientError::PeerLeft),
                Some(ServerToClient::WrongCode) => return Err(ClientError::WrongCode),
                Some(ServerToClient::PeerAddress { addr }) => {
                    // The server sends at most one per family; keep one per family anyway.
                    if !self
                        .peer_addresses
                        .iter()
                        .any(|a| a.is_ipv4() == addr.is_ipv4())
                    {
                        self.peer_addresses.push(addr);
                    }
                }
                // A result may overtake our own wait for something else.
                Some(ServerToClient::Result {
                    strategy,
                    ok,
                    error,
                }) if !results => {
                    self.keep_early(strategy, ok, error);
                }
                Some(msg) => return Ok(msg),
            }
        }
    }
}

/// Longest error text a result carries, in bytes.
pub const MAX_RESULT_ERROR: usize = 2048;

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

fn to_result(ok: bool, error: Option<String>) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(error.unwrap_or_else(|| "no reason given".into()))
    }
}

fn unexpected(msg: ServerToClient) -> ClientError {
    match msg {
        ServerToClient::Error { message } => ClientError::Refused(message),
        ServerToClient::PeerLeft => ClientError::PeerLeft,
        ServerToClient::WrongCode => ClientError::WrongCode,
        other => ClientError::Unexpected(
            serde_json::to_string(&other).unwrap_or_else(|_| format!("{other:?}")),
        ),
    }
}

pub(crate) async fn within<F: std::future::Future>(
    deadline: Instant,
    what: &'static str,
    fut: F,
) -> Result<F::Output, ClientError> {
    tokio::time::timeout_at(deadline.into(), fut)
        .await
        .map_err(|_| ClientError::TimedOut(what))
}

/// The server's address of a connection to it (an IPv4-mapped address as IPv4).
fn peer_of(stream: &TcpStream) -> Result<SocketAddr, ClientError> {
    stream
        .peer_addr()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .map_err(|e| ClientError::Lost(e.to_string()))
}

/// Asks the server for a free nameplate for a short code ([`ClientToServer::Allocate`] on a
/// connection of its own, to the first of `servers` that answers).
pub async fn allocate(
    servers: &[SocketAddr],
    security: &ControlSecurity,
    token: Option<&str>,
    deadline: Instant,
) -> Result<u32, ClientError> {
    let stream = connect_happy(servers, deadline).await?;
    let _ = stream.set_nodelay(true);
    let server = peer_of(&stream)?;
    let stream = secure(stream, server, security, deadline).await?;
    let mut conn = FramedConn::new(stream, DEFAULT_MAX_FRAME_LEN);
    conn.send(&ClientToServer::Allocate {
        version: PROTOCOL_VERSION,
        token: token.map(str::to_owned),
    })
    .await?;
    match within(deadline, "the server's nameplate", conn.recv()).await?? {
        Some(ServerToClient::Allocated { nameplate }) => Ok(nameplate),
        Some(ServerToClient::Error { message }) if message.contains("`allocate`") => {
            Err(ClientError::Refused(format!(
                "this server does not know short codes (it predates them; update it, or give \
                 --session and --secret): {message}"
            )))
        }
        Some(other) => Err(unexpected(other)),
        None => Err(ClientError::Lost("server closed the connection".into())),
    }
}

/// Shows this peer to the server over another IP family: connects to the first of `servers`
/// that answers (the server's addresses of that family, see
/// [`RendezvousClient::other_family_servers`]) and sends [`ClientToServer::ObserveFamily`] for
/// `pairing`. Returns the server address reached and this peer's address there as the server
/// saw it; the server tells the peer. Fails when that family cannot reach the server (e.g. an
/// IPv4-only host) or the server does not know the message (an older server).
pub async fn observe_family(
    servers: &[SocketAddr],
    security: &ControlSecurity,
    session: &str,
    pairing: &Pairing,
    deadline: Instant,
) -> Result<(SocketAddr, SocketAddr), ClientError> {
    let stream = connect_happy(servers, deadline).await?;
    let server = peer_of(&stream)?;
    let stream = secure(stream, server, security, deadline).await?;
    let mut conn = FramedConn::new(stream, DEFAULT_MAX_FRAME_LEN);
    conn.send(&ClientToServer::ObserveFamily {
        version: PROTOCOL_VERSION,
        session: session.to_owned(),
        pair_id: pairing.pair_id.clone(),
        role: pairing.role,
    })
    .await?;
    match within(deadline, "the server's observe answer", conn.recv()).await?? {
        Some(ServerToClient::Observed { addr }) => Ok((server, addr)),
        Some(other) => Err(unexpected(other)),
        None => Err(ClientError::Lost("server closed the connection".into())),
    }
}

/// Runs the observe exchange on `stream` (a connection to the rendezvous server opened from a
/// strategy's punch port): returns the address the server saw, which is the NAT's public
/// mapping of that port, and the connection, which should be kept open while the mapping is
/// needed.
pub async fn observe(
    stream: TcpStream,
    deadline: Instant,
) -> Result<(SocketAddr, FramedConn<TcpStream>), ClientError> {
    let mut conn = FramedConn::new(stream, DEFAULT_MAX_FRAME_LEN);
    conn.send(&ClientToServer::Observe {
        version: PROTOCOL_VERSION,
    })
    .await?;
    match within(deadline, "the server's observe answer", conn.recv()).await?? {
        Some(ServerToClient::Observed { addr }) => Ok((addr, conn)),
        Some(other) => Err(unexpected(other)),
        None => Err(ClientError::Lost("server closed the connection".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn happy_eyeballs_interleaves_families_ipv6_first() {
        let given = [
            sa("192.0.2.1:1"),
            sa("192.0.2.2:1"),
            sa("192.0.2.1:1"),
            sa("[2001:db8::1]:1"),
        ];
        assert_eq!(
            happy_eyeballs_order(&given),
            vec![sa("[2001:db8::1]:1"), sa("192.0.2.1:1"), sa("192.0.2.2:1")]
        );
        assert_eq!(happy_eyeballs_order(&given[..1]), vec![given[0]]);
    }

    fn pairing(relay_addrs: &[&str]) -> Pairing {
        Pairing {
            role: Role::Second,
            strategies: vec!["relay".into()],
            pair_id: "p".into(),
            observed: "127.0.0.1:1".parse().unwrap(),
            peer: "127.0.0.1:2".parse().unwrap(),
            relay_token: Some("t".into()),
            observed_other: None,
            peer_other: None,
            relay_addrs: relay_addrs.iter().map(|a| a.parse().unwrap()).collect(),
            peer_pake: None,
            peer_offers: None,
        }
    }

    /// The relay is the server joined through unless the pairing names another node; then
    /// its address of the same family, else its first.
    #[test]
    fn the_relay_address_follows_the_pairing() {
        let v4: SocketAddr = "198.51.100.1:8877".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::9]:8877".parse().unwrap();
        assert_eq!(pairing(&[]).relay_addr(v4), v4);
        let both = pairing(&["[2001:db8::1]:8877", "192.0.2.1:8877"]);
        assert_eq!(both.relay_addr(v4), "192.0.2.1:8877".parse().unwrap());
        assert_eq!(both.relay_addr(v6), "[2001:db8::1]:8877".parse().unwrap());
        let only_v6 = pairing(&["[2001:db8::1]:8877"]);
        assert_eq!(
            only_v6.relay_addr(v4),
            "[2001:db8::1]:8877".parse().unwrap()
        );
    }
}
