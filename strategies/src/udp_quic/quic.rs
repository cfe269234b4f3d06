//! The QUIC side of udp-quic: transport settings, endpoint and certificate pinning, dialing
//! and accepting on the punched socket, and the link's streams.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use nettool_core::secure::{client_tls, server_tls, tls_error, Identity, PeerPin};
use nettool_core::strategy::RawLink;
use nettool_core::{LinkStream, LinkStreams, Role, StrategyError};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::UdpQuic;

/// Application close code of a link that is done (or dropped).
const CLOSE_DONE: u32 = 0;
/// The application close code of a connection whose certificate was refused.
const CLOSE_REFUSED: u32 = 1;

/// Stream receive window and send window of QUIC links nearby (the connection window is
/// twice it); see [`window_for`].
const QUIC_WINDOW: u32 = 4 << 20;

/// The largest window the round trip can ask for: the memory a process may hold at a
/// distance (16 MiB kept a `connect` at 24-25 MB resident at 100 ms RTT, where 25 MB windows
/// took it to 33 MB); a nearby peer keeps [`QUIC_WINDOW`].
const QUIC_WINDOW_MAX: u32 = 16 << 20;

/// Bytes in flight per second the window should cover (about 1 Gbit/s).
const QUIC_TARGET_RATE: f64 = 125e6;

/// The stream window for a round trip: the bandwidth-delay product of [`QUIC_TARGET_RATE`],
/// within [`QUIC_WINDOW`]..=[`QUIC_WINDOW_MAX`].
fn window_for(rtt: Duration) -> u32 {
    let bdp = (rtt.as_secs_f64() * QUIC_TARGET_RATE) as u64;
    bdp.clamp(u64::from(QUIC_WINDOW), u64::from(QUIC_WINDOW_MAX)) as u32
}

impl UdpQuic {
    pub(super) fn transport(&self, rtt_estimate: Duration) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.config.keep_alive));
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.config.idle_timeout).ok());
        // Windows: what quinn buffers is what a `connect` process holds in memory (the
        // receiver keeps up to the stream window of data its output has not taken yet, the
        // sender keeps unacknowledged data up to the send window). 64/128 MiB windows meant
        // over 100 MB resident at line rate; these keep a process under 32 MB and still
        // cover 4 MiB in flight (about 35 ms at 1 Gbit/s). NETTOOL_QUIC_WINDOW (bytes)
        // overrides for measuring.
        // At a distance the window is what limits the rate (a 4 MiB window moves at most
        // 40 MB/s at 100 ms RTT): it grows with the measured round trip to cover about
        // 1 Gbit/s in flight, up to [`QUIC_WINDOW_MAX`].
        let window = std::env::var("NETTOOL_QUIC_WINDOW")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or_else(|| window_for(rtt_estimate));
        t.stream_receive_window(VarInt::from_u32(window));
        t.receive_window(VarInt::from_u32(window.saturating_mul(2)));
        t.send_window(u64::from(window));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        // The link's stream plus one per forwarded connection (`nettool forward` keeps at most
        // 512 open): QUIC's own streams, see [`QuicStreams`].
        t.max_concurrent_bidi_streams(VarInt::from_u32(1024));
        t.initial_rtt(rtt_estimate.clamp(Duration::from_millis(10), Duration::from_millis(333)));
        Arc::new(t)
    }
}

fn client_config(identity: &Identity, pin: PeerPin) -> Result<quinn::ClientConfig, StrategyError> {
    let tls = client_tls(identity, pin)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| tls_error("QUIC client config", e))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

fn server_config(
    identity: &Identity,
    pin: PeerPin,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, StrategyError> {
    let tls = server_tls(identity, pin)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| tls_error("QUIC server config", e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

pub(super) fn quic_endpoint(
    socket: std::net::UdpSocket,
    role: Role,
    identity: &Identity,
    pin: PeerPin,
    transport: Arc<quinn::TransportConfig>,
) -> Result<Endpoint, StrategyError> {
    let mut config = EndpointConfig::default();
    // Punch datagrams (and STUN) lack QUIC's fixed bit: drop them without a second look.
    config.grease_quic_bit(false);
    let server = match role {
        Role::First => None,
        Role::Second => Some(server_config(identity, pin, transport.clone())?),
    };
    let mut endpoint = Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(|e| StrategyError::io("starting the QUIC endpoint", e))?;
    if role == Role::First {
        let mut client = client_config(identity, pin)?;
        client.transport_config(transport);
        endpoint.set_default_client_config(client);
    }
    Ok(endpoint)
}

/// Closes an endpoint on drop unless disarmed.
pub(super) struct EndpointGuard(pub(super) Option<Endpoint>);

impl EndpointGuard {
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        if let Some(endpoint) = self.0.take() {
            endpoint.close(VarInt::from_u32(CLOSE_DONE), b"attempt over");
        }
    }
}

/// The first peer: dials QUIC to each address that punched through, in order, until one
/// connection is handed to the link agreement (which may still refuse it; then the next is
/// tried).
pub(super) async fn dial_each(
    endpoint: Endpoint,
    paths: Vec<SocketAddr>,
    local: SocketAddr,
    tx: mpsc::Sender<RawLink<QuicRaw>>,
    pin: PeerPin,
) {
    for peer in paths {
        if tx.is_closed() {
            return;
        }
        if let Some(conn) = dial(endpoint.clone(), peer, local, &tx, pin).await {
            // The agreement refused it when it closes; then try the next address. (When the
            // agreement takes it, the attempt ends and aborts this task.)
            let why = conn.closed().await;
            debug!(%peer, "QUIC connection ended before it became the link: {why}");
        }
    }
}

/// Dials one address; the connection when it went to the link agreement with its stream.
async fn dial(
    endpoint: Endpoint,
    peer: SocketAddr,
    local: SocketAddr,
    tx: &mpsc::Sender<RawLink<QuicRaw>>,
    pin: PeerPin,
) -> Option<Connection> {
    let conn = match endpoint.connect(peer, "nettool") {
        Ok(connecting) => match connecting.await {
            Ok(c) if checked(&c, pin, tx, local).await => c,
            Ok(_) => return None,
            Err(e) => {
                warn!(%peer, "QUIC connection failed: {e}");
                return None;
            }
        },
        Err(e) => {
            warn!(%peer, "QUIC connect: {e}");
            return None;
        }
    };
    let (send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, "opening the QUIC stream: {e}");
            return None;
        }
    };
    let remote = conn.remote_address();
    tx.send(RawLink {
        stream: Ok(QuicStream::new(endpoint, conn.clone(), send, recv)),
        local,
        remote,
    })
    .await
    .ok()?;
    Some(conn)
}

/// What the dialer and the acceptor hand the link agreement: a QUIC stream, or why a
/// connection's certificate was refused (a failed authentication on a keyed link).
pub(super) type QuicRaw = io::Result<QuicStream>;

/// Checks a new connection's certificate when it is the one derived from the agreed key
/// ([`PeerPin::check`]: QUIC's handshake let any through, its signature checked), before
/// anything is written on it. A refused one is closed and its error handed to the link
/// agreement, so both ends say why (the acceptor would otherwise wait for a stream that
/// never comes).
async fn checked(
    conn: &Connection,
    pin: PeerPin,
    tx: &mpsc::Sender<RawLink<QuicRaw>>,
    local: SocketAddr,
) -> bool {
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok());
    let Err(e) = pin.check(certs.as_deref().map(Vec::as_slice)) else {
        return true;
    };
    conn.close(VarInt::from_u32(CLOSE_REFUSED), b"certificate refused");
    let _ = tx
        .send(RawLink {
            stream: Err(e),
            local,
            remote: conn.remote_address(),
        })
        .await;
    false
}

pub(super) async fn accept(
    endpoint: Endpoint,
    local: SocketAddr,
    tx: mpsc::Sender<RawLink<QuicRaw>>,
    pin: PeerPin,
) {
    let mut pending = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                let (endpoint, tx) = (endpoint.clone(), tx.clone());
                pending.spawn(async move {
                    let from = incoming.remote_address();
                    let conn = match incoming.await {
                        Ok(c) if checked(&c, pin, &tx, local).await => c,
                        Ok(_) => return,
                        Err(e) => {
                            warn!(%from, "refused QUIC connection: {e}");
                            return;
                        }
                    };
                    match conn.accept_bi().await {
                        Ok((send, recv)) => {
                            let _ = tx
                                .send(RawLink {
                                    stream: Ok(QuicStream::new(endpoint, conn.clone(), send, recv)),
                                    local,
                                    remote: conn.remote_address(),
                                })
                                .await;
                        }
                        Err(e) => warn!(%from, "no stream on the QUIC connection: {e}"),
                    }
                });
            }
            Some(_) = pending.join_next(), if !pending.is_empty() => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The link stream

type Stopped = Pin<Box<dyn Future<Output = Result<Option<VarInt>, quinn::StoppedError>> + Send>>;
type Closing = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long a finished link waits at most for its close to be sent and drained.
const LINGER: Duration = Duration::from_secs(1);

/// One bidirectional QUIC stream as a byte stream, owning its connection and endpoint.
///
/// `shutdown` finishes the send side and waits until the peer has acknowledged all data (or
/// has closed the connection normally), so nothing written before is lost when the process
/// exits right after. Once both directions are done (our data acknowledged, the peer's read to
/// the end) the call that completed the second direction also closes the connection with code
/// 0 and waits until the close is out (at most a second), so the peer's own `shutdown` does
/// not wait for acknowledgements that never come. Dropping it closes the connection with code
/// 0.
pub struct QuicStream {
    send: SendStream,
    recv: RecvStream,
    conn: Connection,
    endpoint: Endpoint,
    stopped: Option<Stopped>,
    send_done: bool,
    recv_done: bool,
    /// Set once both directions are done: the close is on its way.
    closing: Option<Closing>,
    closed: bool,
}

impl std::fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStream")
            .field("remote", &self.conn.remote_address())
            .field("send_done", &self.send_done)
            .field("recv_done", &self.recv_done)
            .finish_non_exhaustive()
    }
}

impl QuicStream {
    fn new(endpoint: Endpoint, conn: Connection, send: SendStream, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            conn,
            endpoint,
            stopped: None,
            send_done: false,
            recv_done: false,
            closing: None,
            closed: false,
        }
    }

    /// The QUIC connection (for statistics such as the path's round trip).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Once both directions are done (our data acknowledged, the peer's read to the end),
    /// closes the connection and waits (at most [`LINGER`]) until the close has been sent and
    /// the connection drained. A userspace QUIC stack has no kernel to send the last
    /// acknowledgement after the process exits; without this the peer's `shutdown` could wait
    /// for an acknowledgement that never comes.
    fn poll_close_if_done(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.closed || !(self.send_done && self.recv_done) {
            return Poll::Ready(());
        }
        let closing = self.closing.get_or_insert_with(|| {
            let conn = self.conn.clone();
            let endpoint = self.endpoint.clone();
            Box::pin(async move {
                conn.close(VarInt::from_u32(CLOSE_DONE), b"done");
                let _ = tokio::time::timeout(LINGER, endpoint.wait_idle()).await;
            })
        });
        ready!(closing.as_mut().poll(cx));
        self.closing = None;
        self.closed = true;
        Poll::Ready(())
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        self.conn.close(VarInt::from_u32(CLOSE_DONE), b"closed");
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.recv_done {
            ready!(self.poll_close_if_done(cx));
            return Poll::Ready(Ok(())); // end of stream
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.recv).poll_read(cx, buf))?;
        if buf.filled().len() == before && buf.remaining() > 0 {
            self.recv_done = true;
            ready!(self.poll_close_if_done(cx));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.send_done {
            ready!(self.poll_close_if_done(cx));
            return Poll::Ready(Ok(()));
        }
        if self.stopped.is_none() {
            // Finishing twice is harmless: the stream is finished either way.
            let _ = self.send.finish();
            let stopped = self.send.stopped();
            self.stopped = Some(Box::pin(stopped));
        }
        let res = ready!(self.stopped.as_mut().expect("set above").as_mut().poll(cx));
        self.stopped = None;
        let out = match res {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the peer stopped reading (code {code})"),
            )),
            // The peer read everything and closed the link normally.
            Err(quinn::StoppedError::ConnectionLost(
                quinn::ConnectionError::ApplicationClosed(c),
            )) if c.error_code == VarInt::from_u32(CLOSE_DONE) => Ok(()),
            Err(e) => Err(io::Error::other(e)),
        };
        self.send_done = true;
        if out.is_err() {
            return Poll::Ready(out);
        }
        ready!(self.poll_close_if_done(cx));
        Poll::Ready(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Further streams on the link's connection

/// The link's QUIC connection as a source of further streams ([`LinkStreams`]): after the
/// link handshake on the first bidirectional stream, each `open` is a new bidirectional QUIC
/// stream with its own flow control. The link's main stream owns the connection: dropping it
/// closes the connection and every stream on it.
pub(super) struct QuicStreams {
    pub(super) conn: Connection,
}

impl LinkStreams for QuicStreams {
    fn open(&self) -> BoxFuture<'_, io::Result<Box<dyn LinkStream>>> {
        Box::pin(async move {
            let (send, recv) = self.conn.open_bi().await.map_err(io::Error::other)?;
            Ok(Box::new(QuicSubStream { send, recv }) as Box<dyn LinkStream>)
        })
    }

    fn accept(&self) -> BoxFuture<'_, io::Result<Option<Box<dyn LinkStream>>>> {
        Box::pin(async move {
            match self.conn.accept_bi().await {
                Ok((send, recv)) => Ok(Some(Box::new(QuicSubStream { send, recv }) as _)),
                Err(quinn::ConnectionError::ApplicationClosed(c))
                    if c.error_code == VarInt::from_u32(CLOSE_DONE) =>
                {
                    Ok(None)
                }
                Err(quinn::ConnectionError::LocallyClosed) => Ok(None),
                Err(e) => Err(io::Error::other(e)),
            }
        })
    }
}

/// One further bidirectional stream: `shutdown` finishes the send side (the peer reads to the
/// end; the data is delivered as long as the connection lives), the other direction goes on.
struct QuicSubStream {
    send: SendStream,
    recv: RecvStream,
}

impl AsyncRead for QuicSubStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicSubStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Finishing twice is harmless; a stream the peer stopped or reset is done too.
        let _ = self.send.finish();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn the_window_covers_the_bandwidth_delay_product_within_bounds() {
        assert_eq!(window_for(Duration::from_millis(1)), QUIC_WINDOW);
        assert_eq!(window_for(Duration::from_millis(100)), 12_500_000);
        assert_eq!(window_for(Duration::from_millis(200)), QUIC_WINDOW_MAX);
        assert_eq!(window_for(Duration::from_secs(2)), QUIC_WINDOW_MAX);
    }
}
