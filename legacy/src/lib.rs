//! The original demo's 8877 text protocol (kept out of `nettool-core`: it is not a strategy
//! and has no secure channel), its hello-world messages, a client that punches
//! properly, and (feature `server`) a server that speaks the protocol byte for byte.
//!
//! # The wire protocol
//!
//! The server listens on TCP 8877 and takes clients in pairs, in arrival order:
//!
//! 1. to the first client it writes `first\n` plus one NUL byte;
//! 2. when the second connects, it writes to the second `<ip1> <port1> <port2>\n` plus a NUL
//!    (the first client's address as the server saw it, and the second's own port as the
//!    server saw it), then `<ip2> <port2>\n` plus a NUL to the first, closes both and waits
//!    for the next pair.
//!
//! The first client then sends `Hello, world\n` plus a NUL once a second to the second, which
//! prints each message.
//!
//! # What nettool does differently
//!
//! The original clients connect to each other from fresh ephemeral ports, so they only work
//! without NAT. [`connect`] binds one local port with SO_REUSEADDR + SO_REUSEPORT, talks to the
//! server from it (so the address the server reports is the NAT's mapping of that port), keeps
//! a listener on it, and after the server's answer both peers repeatedly connect from that port
//! to the peer's address (TCP simultaneous open) while the listener accepts. The first
//! established connection wins. The link is plain TCP: the original protocol has no secret, so
//! nothing proves that the other end is the peer (connections from other IP addresses than
//! the peer's are refused, which is all the protocol allows).
//!
//! # Being liberal
//!
//! The original programs send extra NULs and their reads may split or merge messages; the
//! parsers here ([`LineSplitter`], [`parse_server_line`]) treat NULs and `\r` as noise, skip
//! empty lines and accept a last line without its newline.

#![warn(missing_docs)]

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, trace, warn};

use nettool_core::{Link, Role};

/// The original server's port.
pub const DEFAULT_PORT: u16 = 8877;

/// The name a legacy link carries in [`Link::strategy`].
pub const STRATEGY_NAME: &str = "legacy";

/// What the server writes to the first client of a pair, exactly.
pub const FIRST_MESSAGE: &[u8] = b"first\n\0";

/// What the first client sends once a second, exactly.
pub const HELLO_MESSAGE: &[u8] = b"Hello, world\n\0";

/// The text of [`HELLO_MESSAGE`], as printed after `send message: ` / `recv message: `.
pub const HELLO_TEXT: &str = "Hello, world";

/// Longest line accepted from the server, and longest message kept by a [`LineSplitter`]
/// before it is cut.
pub const MAX_LINE_LEN: usize = 4096;

/// How long one connecting socket is kept before a fresh one replaces it. A NAT's connection
/// tracking remembers the first SYN's sequence number: the peer's SYN must be answered by that
/// very socket, so replacing it early breaks the punch.
pub const SYN_WINDOW: Duration = Duration::from_secs(1);

/// Pause after a connect that failed at once (refused, reset) before the next one; each
/// pause is drawn at random between half and one and a half times this, so two peers whose
/// SYNs keep meeting resets do not stay in lockstep.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(100);

fn retry_pause() -> Duration {
    use rand::Rng;
    RETRY_INTERVAL.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
}

/// An IP address as the original programs print it: IPv4-mapped IPv6 addresses as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `<ip1> <port1> <port2>\n\0`: what the server writes to the second client.
pub fn second_message(first: SocketAddr, second_port: u16) -> Vec<u8> {
    let first = canonical(first);
    format!("{} {} {}\n\0", first.ip(), first.port(), second_port).into_bytes()
}

/// `<ip2> <port2>\n\0`: what the server writes to the first client once the second came.
pub fn peer_message(second: SocketAddr) -> Vec<u8> {
    let second = canonical(second);
    format!("{} {}\n\0", second.ip(), second.port()).into_bytes()
}

/// One line from the server, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerLine {
    /// `first`: this client is the first of its pair.
    First,
    /// `<ip1> <port1> <port2>`: this client is the second; the first is at `first`, and the
    /// server saw this client's port as `own_port`.
    Second {
        /// The first client's address as the server saw it.
        first: SocketAddr,
        /// This client's port as the server saw it.
        own_port: u16,
    },
    /// `<ip2> <port2>`: the second client's address as the server saw it (sent to the first).
    Peer(SocketAddr),
}

/// A server line that is none of the three forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed line from the server: {0:?} (expected \"first\", \"<ip> <port> <port>\" or \"<ip> <port>\")")]
pub struct MalformedLine(pub String);

/// Parses one line (NULs, `\r` and surrounding blanks are ignored).
pub fn parse_server_line(line: &str) -> Result<ServerLine, MalformedLine> {
    let cleaned: String = line.chars().filter(|c| *c != '\0').collect();
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    let bad = || MalformedLine(line.to_owned());
    let ip = |s: &str| s.parse::<IpAddr>().map_err(|_| bad());
    let port = |s: &str| match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(bad()),
    };
    match words.as_slice() {
        [w] if w.eq_ignore_ascii_case("first") => Ok(ServerLine::First),
        [a, p1, p2] => Ok(ServerLine::Second {
            first: SocketAddr::new(ip(a)?, port(p1)?),
            own_port: port(p2)?,
        }),
        [a, p] => Ok(ServerLine::Peer(SocketAddr::new(ip(a)?, port(p)?))),
        _ => Err(bad()),
    }
}

/// Splits a byte stream into messages, liberally: a message ends at `\n` or NUL; NULs and
/// `\r` are dropped, empty messages skipped, messages longer than [`MAX_LINE_LEN`] cut.
/// Works whatever way reads split or merge the stream.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// An empty splitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the messages they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                b'\n' | 0 => self.take(&mut out),
                b'\r' => {}
                _ => {
                    self.pending.push(b);
                    if self.pending.len() >= MAX_LINE_LEN {
                        self.take(&mut out);
                    }
                }
            }
        }
        out
    }

    /// At the end of the stream: the last message if it lacked its terminator.
    pub fn finish(&mut self) -> Option<String> {
        let mut out = Vec::new();
        self.take(&mut out);
        out.pop()
    }

    fn take(&mut self, out: &mut Vec<String>) {
        let text = String::from_utf8_lossy(&self.pending).trim().to_owned();
        self.pending.clear();
        if !text.is_empty() {
            out.push(text);
        }
    }
}

/// Why [`connect`] produced no link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LegacyError {
    /// The server could not be reached.
    #[error("cannot reach the legacy rendezvous server at {addr}: {error}")]
    Connect {
        /// The server's address.
        addr: SocketAddr,
        /// The connect error.
        error: std::io::Error,
    },
    /// A local socket operation failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        error: std::io::Error,
    },
    /// The server sent something that is not the protocol.
    #[error(transparent)]
    Malformed(#[from] MalformedLine),
    /// The server sent a valid line that does not fit at this point.
    #[error("unexpected line from the server: {0:?}")]
    Unexpected(String),
    /// The server closed the connection before introducing the peer.
    #[error("the legacy rendezvous server closed the connection {0}")]
    Closed(&'static str),
    /// The deadline passed.
    #[error("timed out {0}")]
    TimedOut(String),
}

/// What [`connect`] reports along the way.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum LegacyEvent {
    /// Connected to the server from `local`.
    Connected {
        /// The local address of the server connection (the port the peer will punch to).
        local: SocketAddr,
    },
    /// The server said "first": waiting for the second client.
    ToldFirst,
    /// The server introduced the peer; punching starts.
    Introduced {
        /// This client's role.
        role: Role,
        /// The peer's address as the server saw it.
        peer: SocketAddr,
    },
}

/// A link made by [`connect`], and this client's role in its pair.
#[derive(Debug)]
pub struct LegacyLink {
    /// The plain TCP link (strategy [`STRATEGY_NAME`]).
    pub link: Link,
    /// First (told "first"; sends the hellos) or second.
    pub role: Role,
}

fn reuse_socket(local: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(local)?;
    Ok(socket)
}

/// Reads lines from the server connection until one is complete; `None` at EOF.
async fn next_line(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    waiting_for: &str,
) -> Result<Option<String>, LegacyError> {
    loop {
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let text: String = String::from_utf8_lossy(&line)
                .chars()
                .filter(|c| *c != '\0')
                .collect();
            let text = text.trim();
            if !text.is_empty() {
                return Ok(Some(text.to_owned()));
            }
        }
        if buf.len() > MAX_LINE_LEN {
            let start = String::from_utf8_lossy(&buf[..64]).into_owned();
            return Err(MalformedLine(format!("{start}... (no newline)")).into());
        }
        let mut chunk = [0u8; 1024];
        let n = match tokio::time::timeout_at(deadline.into(), stream.read(&mut chunk)).await {
            Err(_) => return Err(LegacyError::TimedOut(format!("waiting for {waiting_for}"))),
            Ok(Err(error)) => {
                return Err(LegacyError::Io {
                    context: "reading from the legacy rendezvous server",
                    error,
                })
            }
            Ok(Ok(n)) => n,
        };
        trace!(bytes = ?String::from_utf8_lossy(&chunk[..n]), "from the server");
        if n == 0 {
            let rest: String = String::from_utf8_lossy(buf)
                .chars()
                .filter(|c| *c != '\0')
                .collect();
            buf.clear();
            let rest = rest.trim();
            return Ok((!rest.is_empty()).then(|| rest.to_owned()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One original-protocol client that punches properly: bind one port (SO_REUSEADDR +
/// SO_REUSEPORT), listen on it, connect to the server from it, read the server's answer, then
/// connect from that port to the peer again and again (each connecting socket kept for
/// [`SYN_WINDOW`] unless it fails sooner) while the listener accepts. Everything happens before
/// `deadline`.
pub async fn connect(
    server: SocketAddr,
    deadline: Instant,
    progress: &(dyn Fn(LegacyEvent) + Sync),
) -> Result<LegacyLink, LegacyError> {
    let unspecified: IpAddr = match server {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let io = |context| move |error| LegacyError::Io { context, error };
    let listener = reuse_socket(SocketAddr::new(unspecified, 0))
        .and_then(|s| s.listen(64))
        .map_err(io("binding the local port"))?;
    let port = listener
        .local_addr()
        .map_err(io("reading the local port"))?
        .port();
    let local = SocketAddr::new(unspecified, port);

    let socket = reuse_socket(local).map_err(io("binding the server connection's port"))?;
    let mut conn = match tokio::time::timeout_at(deadline.into(), socket.connect(server)).await {
        Err(_) => {
            return Err(LegacyError::TimedOut(format!(
                "connecting to the legacy rendezvous server at {server}"
            )))
        }
        Ok(Err(error)) => {
            return Err(LegacyError::Connect {
                addr: server,
                error,
            })
        }
        Ok(Ok(s)) => s,
    };
    let via = conn.local_addr().map_err(io("reading the local address"))?;
    debug!(%via, %server, "connected to the legacy server");
    progress(LegacyEvent::Connected { local: via });

    let mut buf = Vec::new();
    let first = next_line(&mut conn, &mut buf, deadline, "the server's answer")
        .await?
        .ok_or(LegacyError::Closed("without answering"))?;
    let (role, peer) = match parse_server_line(&first)? {
        ServerLine::First => {
            progress(LegacyEvent::ToldFirst);
            let line = next_line(
                &mut conn,
                &mut buf,
                deadline,
                "the server to introduce a second client",
            )
            .await?
            .ok_or(LegacyError::Closed(
                "after \"first\" without sending the second client's address",
            ))?;
            match parse_server_line(&line)? {
                ServerLine::Peer(peer) => (Role::First, peer),
                _ => return Err(LegacyError::Unexpected(line)),
            }
        }
        ServerLine::Second { first, own_port } => {
            if own_port != port {
                debug!(
                    own_port,
                    port, "the server saw another port (NAT); the peer punches to that one"
                );
            }
            (Role::Second, first)
        }
        ServerLine::Peer(_) => return Err(LegacyError::Unexpected(first)),
    };
    drop(conn);
    let peer = canonical(peer);
    info!(%role, %peer, port, "introduced; punching");
    progress(LegacyEvent::Introduced { role, peer });

    let (stream, errors) = punch(listener, local, peer, deadline).await;
    let Some(stream) = stream else {
        return Err(LegacyError::TimedOut(format!(
            "punching to the peer at {peer} from port {port} ({})",
            if errors.is_empty() {
                "no answer".to_owned()
            } else {
                errors
            }
        )));
    };
    let _ = stream.set_nodelay(true);
    let remote = stream.peer_addr().map_err(io("reading the peer address"))?;
    let local = stream
        .local_addr()
        .map_err(io("reading the local address"))?;
    Ok(LegacyLink {
        link: Link {
            stream: Box::new(stream),
            local,
            remote,
            strategy: STRATEGY_NAME,
        },
        role,
    })
}

/// Runs the dial loop and the accept loop until one yields a connection or `deadline` passes.
/// Returns the connection, or `None` and the last dial error.
async fn punch(
    listener: TcpListener,
    local: SocketAddr,
    peer: SocketAddr,
    deadline: Instant,
) -> (Option<TcpStream>, String) {
    let (tx, mut rx) = mpsc::channel(4);
    let (err_tx, mut err_rx) = tokio::sync::watch::channel(String::new());
    let mut tasks = JoinSet::new();
    tasks.spawn(accept_loop(listener, peer.ip(), tx.clone()));
    tasks.spawn(dial_loop(local, peer, tx, err_tx));
    let got = tokio::time::timeout_at(deadline.into(), rx.recv())
        .await
        .ok()
        .flatten();
    // Dropping the sockets of the losing side: aborting closes the listener and any connecting
    // socket.
    tasks.abort_all();
    let last_error = err_rx.borrow_and_update().clone();
    (got, last_error)
}

async fn dial_loop(
    local: SocketAddr,
    peer: SocketAddr,
    tx: mpsc::Sender<TcpStream>,
    errors: tokio::sync::watch::Sender<String>,
) {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let socket = match reuse_socket(local) {
            Ok(s) => s,
            Err(e) => {
                trace!(%peer, "binding for a connect: {e}");
                errors.send_replace(format!("binding port {}: {e}", local.port()));
                tokio::time::sleep(RETRY_INTERVAL).await;
                continue;
            }
        };
        match tokio::time::timeout(SYN_WINDOW, socket.connect(peer)).await {
            Ok(Ok(stream)) => {
                debug!(%peer, attempt, "connected");
                let _ = tx.send(stream).await;
                return;
            }
            Ok(Err(e)) => {
                trace!(%peer, attempt, "connect: {e}");
                errors.send_replace(format!("connect to {peer}: {e}"));
                tokio::time::sleep(retry_pause()).await;
            }
            Err(_) => {
                trace!(%peer, attempt, "no answer within {SYN_WINDOW:?}");
                errors.send_replace(format!(
                    "connect to {peer}: no answer within {} ms",
                    SYN_WINDOW.as_millis()
                ));
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, peer_ip: IpAddr, tx: mpsc::Sender<TcpStream>) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                if from.ip().to_canonical() != peer_ip {
                    warn!(%from, %peer_ip, "refusing a connection from another address than the peer's");
                    continue;
                }
                debug!(%from, "accepted");
                if tx.send(stream).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl fmt::Display for ServerLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::First => f.write_str("first"),
            Self::Second { first, own_port } => {
                write!(f, "{} {} {own_port}", first.ip(), first.port())
            }
            Self::Peer(p) => write!(f, "{} {}", p.ip(), p.port()),
        }
    }
}

#[cfg(feature = "server")]
pub use server::LegacyServer;

#[cfg(feature = "server")]
mod server {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// How long one write to a client may take before the client counts as gone.
    const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
    /// How long a closed connection is drained so the client gets a clean FIN, not a reset.
    const LINGER: Duration = Duration::from_secs(2);

    /// The original demo's server: pairs clients in arrival order and writes the protocol's
    /// lines byte for byte.
    ///
    /// A first client that disconnects before its partner arrives is dropped; the next client
    /// becomes first (and is told `first\n\0`). Bytes a client sends are read and ignored
    /// (the protocol has no client-to-server messages). A client that misbehaves in any way
    /// loses only its own connection; the server keeps serving.
    #[derive(Debug)]
    pub struct LegacyServer {
        listener: TcpListener,
    }

    struct Waiting {
        stream: TcpStream,
        addr: SocketAddr,
    }

    impl LegacyServer {
        /// Listens on `addr`.
        pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
            Ok(Self {
                listener: TcpListener::bind(addr).await?,
            })
        }

        /// The address it listens on.
        pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
            self.listener.local_addr()
        }

        /// Serves until the future is dropped.
        pub async fn run(self) {
            let mut waiting: Option<Waiting> = None;
            loop {
                tokio::select! {
                    biased;
                    why = until_gone(waiting.as_mut()), if waiting.is_some() => {
                        if let Some(first) = waiting.take() {
                            info!(client = %first.addr, "first client left before its partner came ({why}); dropped");
                            close(first.stream);
                        }
                    }
                    accepted = self.listener.accept() => match accepted {
                        Ok((stream, addr)) => {
                            let addr = canonical(addr);
                            waiting = admit(waiting.take(), stream, addr).await;
                        }
                        Err(e) => {
                            warn!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        }
    }

    /// Handles a new client; returns who waits as first afterwards.
    async fn admit(
        waiting: Option<Waiting>,
        mut stream: TcpStream,
        addr: SocketAddr,
    ) -> Option<Waiting> {
        let waiting = match waiting {
            Some(mut first) => match gone_now(&mut first.stream) {
                Some(why) => {
                    info!(client = %first.addr, "first client left before its partner came ({why}); dropped");
                    close(first.stream);
                    None
                }
                None => Some(first),
            },
            None => None,
        };
        let Some(mut first) = waiting else {
            return match write(&mut stream, FIRST_MESSAGE).await {
                Ok(()) => {
                    info!(client = %addr, "told first; waiting for its partner");
                    Some(Waiting { stream, addr })
                }
                Err(e) => {
                    warn!(client = %addr, "cannot tell it \"first\": {e}; dropped");
                    close(stream);
                    None
                }
            };
        };
        if let Err(e) = write(&mut stream, &second_message(first.addr, addr.port())).await {
            warn!(client = %addr, "cannot introduce the first client to it: {e}; dropped, {} still waits", first.addr);
            close(stream);
            return Some(first);
        }
        if let Err(e) = write(&mut first.stream, &peer_message(addr)).await {
            warn!(first = %first.addr, second = %addr, "the second was introduced but the first cannot be told: {e}");
        } else {
            info!(first = %first.addr, second = %addr, "paired");
        }
        close(first.stream);
        close(stream);
        None
    }

    async fn write(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            )),
        }
    }

    /// Reads and ignores what the waiting first client sends; returns why it is gone.
    async fn until_gone(waiting: Option<&mut Waiting>) -> String {
        let Some(w) = waiting else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 4096];
        loop {
            match w.stream.read(&mut buf).await {
                Ok(0) => return "closed".to_owned(),
                Ok(n) => debug!(client = %w.addr, n, "ignoring bytes from a client"),
                Err(e) => return e.to_string(),
            }
        }
    }

    /// Without waiting: `Some(why)` if the stream has been closed.
    fn gone_now(stream: &mut TcpStream) -> Option<String> {
        let mut buf = [0u8; 4096];
        loop {
            match stream.try_read(&mut buf) {
                Ok(0) => return Some("closed".to_owned()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) => return Some(e.to_string()),
            }
        }
    }

    /// Closes a client connection cleanly: FIN after the written bytes, then drains what the
    /// client still sends for a moment so the close is not turned into a reset.
    fn close(mut stream: TcpStream) {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(LINGER, async {
                let _ = stream.shutdown().await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_exact() {
        let a: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        assert_eq!(second_message(a, 5000), b"10.0.0.1 4000 5000\n\0");
        assert_eq!(peer_message(a), b"10.0.0.1 4000\n\0");
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:4000".parse().unwrap();
        assert_eq!(peer_message(mapped), b"10.0.0.1 4000\n\0");
    }

    #[test]
    fn server_lines_parse_liberally() {
        assert_eq!(parse_server_line("first"), Ok(ServerLine::First));
        assert_eq!(parse_server_line("\0first\r\0"), Ok(ServerLine::First));
        assert_eq!(
            parse_server_line(" 1.2.3.4  10 20 "),
            Ok(ServerLine::Second {
                first: "1.2.3.4:10".parse().unwrap(),
                own_port: 20
            })
        );
        assert_eq!(
            parse_server_line("1.2.3.4 10"),
            Ok(ServerLine::Peer("1.2.3.4:10".parse().unwrap()))
        );
        for bad in [
            "",
            "second",
            "1.2.3.4",
            "1.2.3.4 x",
            "1.2.3.4 0",
            "a b c",
            "1 2 3 4",
        ] {
            assert!(parse_server_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn splitter_handles_split_and_merged_messages() {
        let mut s = LineSplitter::new();
        assert!(s.push(b"Hel").is_empty());
        assert_eq!(s.push(b"lo, world\n"), vec!["Hello, world"]);
        assert!(s.push(b"\0\0").is_empty());
        assert_eq!(
            s.push(b"Hello, world\n\0Hello, world\n\0Hello"),
            vec!["Hello, world", "Hello, world"]
        );
        assert_eq!(s.push(b", world\0"), vec!["Hello, world"]);
        assert_eq!(s.push(b"tail"), Vec::<String>::new());
        assert_eq!(s.finish().as_deref(), Some("tail"));
        assert_eq!(s.finish(), None);
        let long = vec![b'x'; MAX_LINE_LEN * 2 + 3];
        assert_eq!(s.push(&long).len(), 2);
    }
}
