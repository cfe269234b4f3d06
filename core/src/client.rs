//! The peer's side of the rendezvous conversation.
//!
//! [`RendezvousClient::join`] opens the control connection and waits until the server pairs
//! this peer; afterwards the orchestrator and strategies exchange offers and results through
//! it. [`observe`] runs the one-frame observe exchange on a connection a strategy opened from
//! its own punch port.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

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
    /// The connection to the server failed or closed.
    #[error("rendezvous connection lost: {0}")]
    Lost(String),
    /// The server refused a request and said why.
    #[error("rendezvous server: {0}")]
    Refused(String),
    /// The peer left the session.
    #[error("the peer left the session")]
    PeerLeft,
    /// The server sent something this client did not expect at this point.
    #[error("unexpected message from the rendezvous server: {0}")]
    Unexpected(String),
    /// A deadline passed while waiting for the server or the peer.
    #[error("timed out waiting for {0}")]
    TimedOut(&'static str),
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

/// What the server told a peer when it paired it.
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
    /// Where the relay runs when not on the server this peer joined through (another node
    /// of a cluster; one address per family); empty = that server.
    pub relay_addrs: Vec<SocketAddr>,
}

impl Pairing {
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

/// How long the writer task may take to write one frame before it gives up on the server
/// (it then closes the connection; the reading side sees the end).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The sending side of the control connection: a task owns the socket's write half and
/// writes whole frames from a queue.
///
/// Sending only queues an encoded frame (no await), so a strategy's future dropped at any
/// point (the orchestrator's deadline) can never leave half a line on the wire: what was
/// queued is written whole, what was not is not written at all. The task ends when the
/// client is dropped, after writing what was queued, or at the first failed or stalled write.
#[derive(Debug)]
struct FrameWriter {
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl FrameWriter {
    fn spawn(mut half: OwnedWriteHalf) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                match tokio::time::timeout(WRITE_TIMEOUT, half.write_all(&frame)).await {
                    Ok(Ok(())) => {}
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
            .send(encode(msg))
            .map_err(|_| ClientError::Lost("the connection to the server failed".into()))
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
    conn: FramedConn<OwnedReadHalf>,
    writer: FrameWriter,
    server: SocketAddr,
    next_ping: u64,
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
    /// join (`None` sends no token, as older clients do).
    pub async fn join_with_token(
        server: SocketAddr,
        session: &str,
        strategies: &[String],
        token: Option<&str>,
        deadline: Instant,
        on_waiting: impl FnOnce(),
    ) -> Result<(Self, Pairing), ClientError> {
        let stream = within(
            deadline,
            "the rendezvous server",
            TcpStream::connect(server),
        )
        .await?
        .map_err(|source| ClientError::Connect {
            addr: server,
            source,
        })?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let writer = FrameWriter::spawn(write);
        let mut conn = FramedConn::new(read, DEFAULT_MAX_FRAME_LEN);
        writer.send(&ClientToServer::Join {
            version: PROTOCOL_VERSION,
            session: session.to_owned(),
            strategies: strategies.to_vec(),
            token: token.map(str::to_owned),
        })?;
        let mut on_waiting = Some(on_waiting);
        loop {
            let msg = within(deadline, "a peer to join the session", conn.recv()).await??;
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
                }) => {
                    let client = Self {
                        conn,
                        writer,
                        server,
                        next_ping: 0,
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
                        relay_addrs,
                    };
                    return Ok((client, pairing));
                }
                Some(other) => return Err(unexpected(other)),
            }
        }
    }

    /// The rendezvous server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
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

    /// Sends this peer's offer for `strategy` and waits for the peer's (the server delivers
    /// both at the same moment).
    pub async fn exchange_offer(
        &mut self,
        strategy: &str,
        payload: serde_json::Value,
        deadline: Instant,
    ) -> Result<serde_json::Value, ClientError> {
        self.writer.send(&ClientToServer::Offer {
            strategy: strategy.to_owned(),
            payload,
        })?;
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
        other => ClientError::Unexpected(
            serde_json::to_string(&other).unwrap_or_else(|_| format!("{other:?}")),
        ),
    }
}

async fn within<F: std::future::Future>(
    deadline: Instant,
    what: &'static str,
    fut: F,
) -> Result<F::Output, ClientError> {
    tokio::time::timeout_at(deadline.into(), fut)
        .await
        .map_err(|_| ClientError::TimedOut(what))
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

    fn pairing(relay_addrs: &[&str]) -> Pairing {
        Pairing {
            role: Role::Second,
            strategies: vec!["relay".into()],
            pair_id: "p".into(),
            observed: "127.0.0.1:1".parse().unwrap(),
            peer: "127.0.0.1:2".parse().unwrap(),
            relay_token: Some("t".into()),
            relay_addrs: relay_addrs.iter().map(|a| a.parse().unwrap()).collect(),
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
