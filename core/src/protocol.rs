//! Rendezvous protocol: versioned messages, one JSON object per line.
//!
//! Messages are named by direction ([`ClientToServer`], [`ServerToClient`]). Every connection
//! starts with either [`ClientToServer::Join`] (a control connection that takes part in a
//! session) or [`ClientToServer::Observe`] (a short-lived connection from a strategy's punch
//! port, answered with the address the server saw, i.e. the NAT's mapping of that port), or
//! another one-purpose first frame ([`ClientToServer::Relay`],
//! [`ClientToServer::ObserveFamily`], [`ClientToServer::Allocate`] for a short code's
//! nameplate).
//! Offers are opaque JSON payloads owned by each strategy; the server relays them verbatim.
//!
//! Decoding is separate from I/O so it can be tested (and fuzzed) without sockets.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Version of the rendezvous protocol spoken by this build.
///
/// Version 2 added [`ClientToServer::ObserveFamily`] and [`ServerToClient::PeerAddress`] (a
/// peer's address of its other IP family); the server sends `PeerAddress` only to peers that
/// joined with version 2 or later, and serves version 1 clients as before.
pub const PROTOCOL_VERSION: u32 = 2;

/// Oldest protocol version the server still serves.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Name under which the peers exchange their NAT behaviour (an offer like a strategy's) right
/// after pairing, so both plan the attempts from the same facts. Not a strategy name (those
/// have no dot); the server accepts it from every pairing.
pub const PLAN_OFFER: &str = "nettool.plan";

/// Default largest frame (one JSON line, without its newline), in bytes.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Which end of a session a peer is: the one that joined first, or the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Joined the session first.
    First,
    /// Joined the session second.
    Second,
}

impl Role {
    /// The other end.
    pub fn other(self) -> Self {
        match self {
            Self::First => Self::Second,
            Self::Second => Self::First,
        }
    }

    /// "first" or "second".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Second => "second",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Messages a peer sends to the rendezvous server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ClientToServer {
    /// Join a session (first frame of a control connection).
    Join {
        /// Protocol version the client speaks.
        version: u32,
        /// Session name; the server pairs the two peers that give the same name.
        session: String,
        /// The strategies this peer is willing to try, in its order of preference.
        strategies: Vec<String>,
        /// The server token, when the server requires one to join (`--server-token`). Absent
        /// from the frame when `None`, so frames of clients that predate it stay valid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The express relay ([`ExpressJoin`]): this peer's PAKE message and the ticket of the
        /// relay connection it opened beside this one. Absent when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        express: Option<ExpressJoin>,
    },
    /// Ask for this connection's source address as the server sees it (first frame of an
    /// observe connection).
    Observe {
        /// Protocol version the client speaks.
        version: u32,
    },
    /// A strategy's offer (candidates, parameters); relayed to the peer once both offered.
    Offer {
        /// Strategy the offer is for.
        strategy: String,
        /// Strategy-specific payload, relayed verbatim.
        payload: serde_json::Value,
    },
    /// The outcome of this peer's attempt with a strategy; relayed to the peer.
    Result {
        /// Strategy the result is for.
        strategy: String,
        /// Whether this peer got an authenticated link.
        ok: bool,
        /// Why not, when `ok` is false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Attach this connection to the relay of a paired session (first frame of a relay
    /// connection); answered with [`ServerToClient::Relaying`] once both peers attached.
    Relay {
        /// Protocol version the client speaks.
        version: u32,
        /// The session; empty (as nettool sends it since the control channel runs TLS): the
        /// server finds the pairing by the token, so this plain connection shows no session
        /// name.
        #[serde(default)]
        session: String,
        /// The relay token from [`ServerToClient::Paired`].
        token: String,
        /// This peer's role in the session.
        role: Role,
    },
    /// Attach this plain connection to the relay of the pairing whose join names `ticket` in
    /// its [`ExpressJoin`] (first frame of a relay connection opened beside the control
    /// connection, before pairing). The server holds it until that join is paired (at most
    /// the session expiry), then treats it as a [`ClientToServer::Relay`] of that peer:
    /// answered with [`ServerToClient::Relaying`] once both peers are attached.
    RelayTicket {
        /// Protocol version the client speaks.
        version: u32,
        /// The ticket (32 hex digits) the peer put in its join.
        ticket: String,
    },
    /// Ask for this connection's source address, as [`ClientToServer::Observe`] does, and have
    /// the server tell the peer of this pairing about it ([`ServerToClient::PeerAddress`]).
    /// First frame of its own connection, which a paired peer opens over its *other* IP
    /// family: the peer may then take this peer's candidates of that family from offers (a
    /// public address in an offer counts only when the server saw it). Answered with
    /// [`ServerToClient::Observed`].
    ObserveFamily {
        /// Protocol version the client speaks (2 or later).
        version: u32,
        /// The session.
        session: String,
        /// The pairing's id from [`ServerToClient::Paired`] (only the two peers know it).
        pair_id: String,
        /// This peer's role in the pairing.
        role: Role,
    },
    /// Round-trip probe; answered with [`ServerToClient::Pong`].
    Ping {
        /// Echoed back.
        id: u64,
    },
    /// Ask for a free nameplate for a short code (first frame of its own connection);
    /// answered with [`ServerToClient::Allocated`], then the server closes the connection.
    /// The nameplate stays reserved for the session expiry: the first join of its session
    /// (`code-N`, see [`crate::code`]) takes it, and it is free again once that session ends.
    Allocate {
        /// Protocol version the client speaks.
        version: u32,
        /// The server token, when the server requires one (as in [`ClientToServer::Join`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// This peer's key confirmation failed in a code session: someone tried a wrong code.
    /// The server burns the nameplate (no further joins of the session) and tells the peer
    /// ([`ServerToClient::WrongCode`]). Only on a paired control connection of that session.
    BadCode {
        /// The session (`code-N`).
        session: String,
    },
}

/// What a join carries for the express relay (see [`crate::express`]): the peer's first PAKE
/// message, which the server hands to the other peer in [`ServerToClient::Paired`], and the
/// ticket of the plain relay connection it opened beside the control connection
/// ([`ClientToServer::RelayTicket`]). Neither lets the server learn or test the link key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpressJoin {
    /// The SPAKE2 message (hex).
    pub pake: String,
    /// The relay connection's ticket (32 hex digits).
    pub ticket: String,
    /// Offers this peer prepared before joining, by strategy (a strategy's offer, as in
    /// [`ClientToServer::Offer`]): only with a PAKE message and no ticket. The server hands
    /// them to the other peer in [`ServerToClient::Paired`] when both joins carried some, so
    /// the first strategy can start at the pairing. Absent when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offers: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Messages the rendezvous server sends to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ServerToClient {
    /// Joined; waiting for the second peer.
    Waiting {
        /// The session joined.
        session: String,
    },
    /// Both peers are here.
    Paired {
        /// This peer's role.
        role: Role,
        /// The strategies both offered, in the first peer's order.
        strategies: Vec<String>,
        /// Random identifier of this pairing; bound into the link handshake so connections
        /// left over from an earlier pairing of the same session are refused.
        pair_id: String,
        /// This peer's control connection address as the server saw it.
        observed: SocketAddr,
        /// The peer's control connection address as the server saw it.
        peer: SocketAddr,
        /// Token both peers present to attach to the relay for this pairing; absent when the
        /// server does not relay.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay_token: Option<String>,
        /// Where this pairing's relay runs when not on the server this peer joined through
        /// (a cluster node pairing peers of two nodes: the relay runs on the first peer's
        /// node, one address per family). Empty (and absent from the frame): this server.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        relay_addrs: Vec<SocketAddr>,
        /// The peer's PAKE message from its [`ExpressJoin`], verbatim, when both peers asked
        /// for the express relay and this server relays for the pair (the relay connections
        /// named by the tickets are then spliced): the link needs no further round trip.
        /// Absent otherwise: the peers go on as without it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_pake: Option<String>,
        /// The peer's prepared offers from its [`ExpressJoin`], verbatim (untrusted), when
        /// both peers' joins carried a PAKE message and offers. Absent otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_offers: Option<serde_json::Map<String, serde_json::Value>>,
    },
    /// Answer to [`ClientToServer::Relay`]: both peers are attached. From here on the server
    /// sends relay frames (see [`crate::relay`]) and the client sends raw link bytes.
    Relaying,
    /// Answer to [`ClientToServer::Observe`].
    Observed {
        /// The connection's source address as the server saw it.
        addr: SocketAddr,
    },
    /// The peer's offer for a strategy.
    Offer {
        /// Strategy the offer is for.
        strategy: String,
        /// The peer's payload, verbatim.
        payload: serde_json::Value,
    },
    /// The peer's result for a strategy.
    Result {
        /// Strategy the result is for.
        strategy: String,
        /// Whether the peer got an authenticated link.
        ok: bool,
        /// Why not, when `ok` is false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The peer's address of another IP family than its control connection's, as the server
    /// saw it on the peer's [`ClientToServer::ObserveFamily`] connection. Sent on the control
    /// connection, at most once per family, to peers that joined with version 2 or later.
    PeerAddress {
        /// The address (IP and port of that connection).
        addr: SocketAddr,
    },
    /// Answer to [`ClientToServer::Ping`].
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// The peer's control connection closed; the session is over.
    PeerLeft,
    /// Answer to [`ClientToServer::Allocate`]: the nameplate reserved for a short code.
    Allocated {
        /// The nameplate (the code's number; the session is `code-N`).
        nameplate: u32,
    },
    /// The peer's key confirmation failed in this code session (someone tried a wrong code):
    /// the nameplate is burned and the session is over.
    WrongCode,
    /// The server refuses something; the connection is closed after this message.
    Error {
        /// What went wrong, for humans.
        message: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The line is longer than the frame size limit.
    #[error("frame too long (limit {limit} bytes)")]
    TooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// The line is not a valid message (bad JSON, unknown type or field, missing field).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The line is not UTF-8.
    #[error("malformed frame: not UTF-8")]
    NotUtf8,
    /// A frame was not completed in time after its first byte.
    #[error("frame not completed within {:.1}s of its first byte", limit.as_secs_f64())]
    TooSlow {
        /// The time limit.
        limit: std::time::Duration,
    },
}

/// Decodes one line (without its newline) into a message.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8], limit: usize) -> Result<T, FrameError> {
    if line.len() > limit {
        return Err(FrameError::TooLong { limit });
    }
    let text = std::str::from_utf8(line).map_err(|_| FrameError::NotUtf8)?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    serde_json::from_str(text).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Encodes a message as one line, newline included.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(msg).expect("protocol messages always serialize");
    out.push(b'\n');
    out
}

/// Read buffer of a [`FramedConn`]: frames are small JSON lines, and a server holds one per
/// connection (every waiting session), so 1 KiB rather than the default 8 KiB.
const READ_BUFFER: usize = 1024;

/// A framed connection speaking the rendezvous protocol, generic over the stream.
///
/// Reads are bounded: a line longer than the limit is an error, never an allocation, and with
/// [`set_frame_time`](Self::set_frame_time) a partly received frame may be held only that
/// long. Receiving needs only [`AsyncRead`](tokio::io::AsyncRead), so a read half works.
#[derive(Debug)]
pub struct FramedConn<S> {
    stream: tokio::io::BufReader<S>,
    limit: usize,
    line: Vec<u8>,
    /// How long a frame may take from its first byte to its newline.
    frame_time: Option<std::time::Duration>,
    /// When the first byte of the frame being received was seen.
    partial_since: Option<tokio::time::Instant>,
    /// Length of the last frame received, newline excluded.
    last_len: usize,
}

impl<S: tokio::io::AsyncRead> FramedConn<S> {
    /// Wraps a stream.
    pub fn new(stream: S, limit: usize) -> Self {
        Self::with_read_buffer(stream, limit, READ_BUFFER)
    }

    /// Wraps a stream, reading through a buffer of `capacity` bytes (a server that holds many
    /// connections trades a few more reads of long frames for memory).
    pub fn with_read_buffer(stream: S, limit: usize, capacity: usize) -> Self {
        Self {
            stream: tokio::io::BufReader::with_capacity(capacity, stream),
            limit,
            line: Vec::new(),
            frame_time: None,
            partial_since: None,
            last_len: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    /// The largest frame accepted, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Changes the largest frame accepted (e.g. raised once a peer is trusted further).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Bounds how long a frame may take from its first byte to its newline (`None`: no
    /// bound). A frame that takes longer is [`FrameError::TooSlow`].
    pub fn set_frame_time(&mut self, limit: Option<std::time::Duration>) {
        self.frame_time = limit;
    }

    /// Bytes of a frame received so far whose newline has not arrived yet.
    pub fn partial_len(&self) -> usize {
        self.line.len()
    }

    /// Length of the last frame received (newline excluded), in bytes.
    pub fn last_frame_len(&self) -> usize {
        self.last_len
    }

    /// The wrapped stream and the bytes already read past the last frame.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        let mut rest = self.line;
        rest.extend_from_slice(self.stream.buffer());
        (self.stream.into_inner(), rest)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> FramedConn<S> {
    /// Sends one message.
    ///
    /// Not cancel safe: dropping the future in the middle of a write leaves part of a line on
    /// the wire. A connection that must outlive a cancelled operation sends through a writer
    /// task instead (as [`RendezvousClient`](crate::client::RendezvousClient) does).
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let stream = self.stream.get_mut();
        stream.write_all(&encode(msg)).await?;
        // A TLS stream may hold the record until flushed.
        stream.flush().await
    }
}

impl<S: tokio::io::AsyncRead + Unpin> FramedConn<S> {
    /// Receives one message; `Ok(None)` on a clean end of stream between frames.
    ///
    /// Cancel safe: bytes of a partly read frame are kept for the next call, so this can be
    /// one branch of a `select!`.
    pub async fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, RecvError> {
        use tokio::io::AsyncBufReadExt;
        loop {
            let Self {
                stream,
                limit,
                line,
                frame_time,
                partial_since,
                last_len,
            } = self;
            let avail = match (*partial_since, *frame_time) {
                (Some(since), Some(max)) => {
                    match tokio::time::timeout_at(since + max, stream.fill_buf()).await {
                        Ok(r) => r,
                        Err(_) => return Err(RecvError::Frame(FrameError::TooSlow { limit: max })),
                    }
                }
                _ => stream.fill_buf().await,
            }
            .map_err(RecvError::Io)?;
            if avail.is_empty() {
                if line.is_empty() {
                    return Ok(None);
                }
                return Err(RecvError::Truncated);
            }
            // A line may hold one byte more than the limit (a '\r' before the newline); more is
            // refused before it is stored, so an endless line cannot exhaust memory.
            let room = (*limit + 1).saturating_sub(line.len());
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    if i > room {
                        return Err(RecvError::Frame(FrameError::TooLong { limit: *limit }));
                    }
                    grow(line, i, *limit + 1);
                    line.extend_from_slice(&avail[..i]);
                    stream.consume(i + 1);
                    *partial_since = None;
                    let frame = std::mem::take(line);
                    *last_len = frame.len();
                    return decode(&frame, *limit).map(Some).map_err(RecvError::Frame);
                }
                None => {
                    let n = avail.len();
                    if n > room {
                        return Err(RecvError::Frame(FrameError::TooLong { limit: *limit }));
                    }
                    if line.is_empty() {
                        *partial_since = Some(tokio::time::Instant::now());
                    }
                    grow(line, n, *limit + 1);
                    line.extend_from_slice(avail);
                    stream.consume(n);
                }
            }
        }
    }
}

/// Makes room for `more` bytes in `line`, doubling as a `Vec` does but never past `cap`: a
/// partial frame at the limit holds no more than the limit (a server holds one per
/// connection).
fn grow(line: &mut Vec<u8>, more: usize, cap: usize) {
    let need = line.len() + more;
    if need > line.capacity() {
        let target = (line.capacity() * 2).max(need).min(cap.max(need));
        line.reserve_exact(target - line.len());
    }
}

/// Why receiving a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(std::io::Error),
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The frame could not be decoded.
    #[error(transparent)]
    Frame(FrameError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `relay_addrs` is absent from a `paired` frame unless a cluster node sends the peer to
    /// another node's relay, so single-server frames are what older clients read.
    #[test]
    fn paired_carries_relay_addrs_only_when_set() {
        let mut msg = ServerToClient::Paired {
            role: Role::Second,
            strategies: vec!["relay".into()],
            pair_id: "p".into(),
            observed: "127.0.0.1:1".parse().unwrap(),
            peer: "127.0.0.1:2".parse().unwrap(),
            relay_token: Some("t".into()),
            relay_addrs: Vec::new(),
            peer_pake: None,
            peer_offers: None,
        };
        let line = encode(&msg);
        assert!(!String::from_utf8_lossy(&line).contains("relay_addrs"));
        if let ServerToClient::Paired { relay_addrs, .. } = &mut msg {
            *relay_addrs = vec![
                "192.0.2.1:8877".parse().unwrap(),
                "[2001:db8::1]:8877".parse().unwrap(),
            ];
        }
        let line = encode(&msg);
        let back: ServerToClient = decode(&line[..line.len() - 1], 1024).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn join_round_trips() {
        let msg = ClientToServer::Join {
            version: PROTOCOL_VERSION,
            session: "demo".into(),
            strategies: vec!["tcp-punch".into()],
            token: None,
            express: None,
        };
        let line = encode(&msg);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"type\":\"join\",\"version\":2,\"session\":\"demo\",\"strategies\":[\"tcp-punch\"]}\n"
        );
        let back: ClientToServer = decode(&line[..line.len() - 1], 1024).unwrap();
        assert_eq!(back, msg);
        let with_token = ClientToServer::Join {
            version: PROTOCOL_VERSION,
            session: "demo".into(),
            strategies: vec![],
            token: Some("t0ken".into()),
            express: None,
        };
        let line = encode(&with_token);
        assert!(std::str::from_utf8(&line)
            .unwrap()
            .contains("\"token\":\"t0ken\""));
        let back: ClientToServer = decode(&line[..line.len() - 1], 1024).unwrap();
        assert_eq!(back, with_token);
    }

    #[test]
    fn malformed_frames_are_named() {
        let err = decode::<ClientToServer>(b"{\"type\":\"jion\"}", 1024).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("malformed frame: unknown variant `jion`"));
        let err = decode::<ClientToServer>(b"\xff\xfe", 1024).unwrap_err();
        assert_eq!(err.to_string(), "malformed frame: not UTF-8");
        let err = decode::<ClientToServer>(&[b'a'; 2000], 1024).unwrap_err();
        assert_eq!(err.to_string(), "frame too long (limit 1024 bytes)");
        let err =
            decode::<ClientToServer>(b"{\"type\":\"ping\",\"id\":1,\"x\":2}", 1024).unwrap_err();
        assert!(err.to_string().contains("unknown field `x`"), "{err}");
    }

    #[tokio::test]
    async fn framed_reader_bounds_long_lines() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut conn = FramedConn::new(b, 100);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            a.write_all(&[b'x'; 10_000]).await.unwrap();
        });
        let err = conn.recv::<ClientToServer>().await.unwrap_err();
        assert!(matches!(
            err,
            RecvError::Frame(FrameError::TooLong { limit: 100 })
        ));
    }

    #[tokio::test]
    async fn framed_reader_splits_merged_frames() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut conn = FramedConn::new(b, 1000);
        use tokio::io::AsyncWriteExt;
        a.write_all(b"{\"type\":\"ping\",\"id\":1}\n{\"type\":\"ping\",\"id\":2}\n")
            .await
            .unwrap();
        drop(a);
        assert_eq!(
            conn.recv::<ClientToServer>().await.unwrap(),
            Some(ClientToServer::Ping { id: 1 })
        );
        assert_eq!(
            conn.recv::<ClientToServer>().await.unwrap(),
            Some(ClientToServer::Ping { id: 2 })
        );
        assert_eq!(conn.recv::<ClientToServer>().await.unwrap(), None);
    }
}
