//! udp-quic: UDP hole punching with QUIC on top.
//!
//! One UDP socket per attempt does everything:
//!
//! 1. **Mapping.** A STUN Binding request to the rendezvous server (same port number as its
//!    TCP listener) from this very socket tells the peer which public endpoint the NAT gave it.
//! 2. **Offer.** Candidates (observed public endpoint first, then own addresses with the
//!    socket's port), the SHA-256 fingerprint of this attempt's self-signed certificate and the
//!    server round trip go to the peer through the rendezvous server, which hands both offers
//!    out at the same moment.
//! 3. **Punching.** Both peers send authenticated punch datagrams (HMAC over the pairing id,
//!    the strategy, the sender's role, flags and a nonce, keyed with a random per-attempt punch
//!    key that travels in the sender's offer, independent of the session secret: their only job
//!    is to recognise the peer's punches, so nothing on the wire lets anyone test guesses of the
//!    secret) to every peer candidate (at most [`MAX_CANDIDATES_PER_FAMILY`], validated against
//!    the address the server observed), and to every address a valid punch came from, every
//!    `punch_interval`. The *first* datagram to each candidate goes out with TTL 2: it passes
//!    the own NAT (which now holds the mapping for that peer endpoint) but dies before the
//!    peer's router. Without it, a router that answers unsolicited datagrams with ICMP
//!    port-unreachable leaves a connection-tracking entry that makes masquerade move our own
//!    mapping to another port, and the punch fails every time. Full-TTL punches start half the
//!    larger server round trip later, when the peer's low-TTL datagrams are surely out. A punch
//!    carries a "heard you" flag; a peer stops once it has heard a valid punch *and* the peer
//!    said it heard ours. Invalid datagrams are ignored; ICMP errors surfacing as socket errors
//!    are ignored.
//! 4. **QUIC.** The same socket goes to `quinn::Endpoint::new` (non-QUIC datagrams arriving
//!    later are dropped by quinn: punches do not set QUIC's fixed bit and the endpoint does not
//!    accept packets without it). The first peer is the QUIC client and connects to the address
//!    the peer's confirming punch came from; the second peer is the server. Certificates are
//!    self-signed (rcgen) and pinned by fingerprint in both directions.
//! 5. **Link handshake.** One bidirectional stream (opened and written first by the client)
//!    carries the link handshake of `nettool_core::handshake`, so the session secret is bound
//!    here as on every strategy.
//!
//! Dropping the attempt's future (the orchestrator's deadline) closes the endpoint, the socket
//! and every task.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nettool_core::strategy::{agree_on_link, RawLink};
use nettool_core::{
    stun, Attempt, Link, LinkStream, LinkStreams, MultiStream, Role, Strategy, StrategyError,
};

use nettool_core::candidates::{candidates, peer_candidates, MAX_CANDIDATES_PER_FAMILY};
use nettool_core::secure::{client_tls, server_tls, tls_error, Identity, EXPORTER_LABEL};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, RecvStream, SendStream, VarInt};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, trace, warn};

/// Settings of the udp-quic strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct UdpQuicConfig {
    /// Local UDP port; 0 picks a free one.
    pub local_port: u16,
    /// Pause between two rounds of punch datagrams.
    #[serde(with = "humantime_serde")]
    pub punch_interval: Duration,
    /// QUIC keep-alive interval on the link, so NAT mappings outlive idle periods.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long the link may be idle (no packets at all) before QUIC gives up.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Birthday punching when exactly one side's NAT maps per destination and the other
    /// filters (the plan must know both NATs); `false` leaves those pairs to other strategies.
    pub birthday: bool,
    /// Birthday: sockets the hard side opens (at most 1024).
    pub birthday_sockets: u16,
    /// Birthday: probes the easy side sends at most (at most 8192).
    pub birthday_probes: u32,
    /// Birthday: probes per second (at most 5000).
    pub birthday_rate: u32,
}

impl Default for UdpQuicConfig {
    fn default() -> Self {
        Self {
            local_port: 0,
            punch_interval: Duration::from_millis(50),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            birthday: true,
            birthday_sockets: 256,
            birthday_probes: 2048,
            birthday_rate: 1000,
        }
    }
}

/// Which side of a birthday run this peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BirthdaySide {
    /// This NAT maps per destination: open many sockets, wait for a probe.
    Hard,
    /// The peer's does: probe random ports of its address.
    Easy,
}

/// Birthday mode when the plan knows that exactly one side maps per destination and plain
/// punching cannot work for the pair.
fn birthday_side(
    nat: Option<(
        nettool_core::plan::NatSummary,
        nettool_core::plan::NatSummary,
    )>,
) -> Option<BirthdaySide> {
    use nettool_core::discovery::Mapping;
    let (me, peer) = nat?;
    if nettool_core::plan::feasible(NAME, &me, &peer, false).is_ok()
        || !nettool_core::plan::one_side_hard(&me, &peer)
    {
        return None;
    }
    let hard = |m: Mapping| {
        matches!(
            m,
            Mapping::AddressDependent | Mapping::AddressAndPortDependent
        )
    };
    Some(if hard(me.udp_mapping) {
        BirthdaySide::Hard
    } else {
        BirthdaySide::Easy
    })
}

mod birthday;

/// The strategy's name.
pub const NAME: &str = "udp-quic";
/// ALPN protocol of nettool links over QUIC (the same as over TLS on TCP).
pub const ALPN: &[u8] = nettool_core::secure::ALPN;
/// TTL of the first punch datagram to each candidate: passes the own NAT, not the peer's.
const LOW_TTL: u32 = 2;
/// Pause between STUN Binding requests until one is answered.
const STUN_RETRY: Duration = Duration::from_millis(200);
/// Application close code of a link that is done (or dropped).
const CLOSE_DONE: u32 = 0;

/// UDP hole punching + QUIC.
#[derive(Debug, Clone)]
pub struct UdpQuic {
    config: UdpQuicConfig,
}

impl UdpQuic {
    /// A udp-quic strategy with these settings.
    pub fn new(config: UdpQuicConfig) -> Self {
        Self { config }
    }
}

/// What each peer tells the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QuicOffer {
    /// Where this peer's socket can be reached, best first.
    candidates: Vec<SocketAddr>,
    /// This peer's round trip to the server, in microseconds.
    server_rtt_us: u64,
    /// Random per-attempt key (hex, 32 bytes) this peer tags its punch datagrams with.
    punch_key: String,
}

#[async_trait::async_trait]
impl Strategy for UdpQuic {
    fn name(&self) -> &'static str {
        NAME
    }

    fn punches_hard_nats(&self) -> bool {
        self.config.birthday
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let server = attempt.rendezvous.server();
        let unspecified = crate::net::unspecified_for(server);
        let socket = bind_udp(SocketAddr::new(unspecified, self.config.local_port))
            .map_err(|e| StrategyError::io("binding the UDP socket", e))?;
        let port = socket
            .local_addr()
            .map_err(|e| StrategyError::io("reading the UDP socket's address", e))?
            .port();
        let public = stun_mapping(&socket, server, attempt.deadline).await?;
        let via = route_source(server).unwrap_or(unspecified);
        let mut candidates = candidates(
            public,
            SocketAddr::new(via, port),
            server.ip().is_loopback(),
        );
        // With port mapping on, the gateway's mapping of this socket comes first: it takes
        // datagrams from anywhere, so a peer behind any NAT reaches it (and we answer to
        // where its punches come from).
        // (IPv4 only: NAT-PMP, PCP and UPnP-IGD map on the IPv4 gateway.)
        let mapped = if server.is_ipv4() {
            attempt
                .map_port(nettool_core::portmap::Transport::Udp, port)
                .await
        } else {
            None
        };
        if let Some(mapped) = mapped {
            candidates.retain(|c| *c != mapped);
            candidates.insert(0, mapped);
        }
        debug!(%public, ?candidates, "UDP socket observed");

        let mut punch_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut punch_key);
        let offer = QuicOffer {
            punch_key: hex::encode(punch_key),
            candidates,
            server_rtt_us: attempt
                .server_rtt
                .as_micros()
                .try_into()
                .unwrap_or(u64::MAX),
        };
        let payload = serde_json::to_value(&offer).expect("offer serializes");
        let secured = attempt
            .exchange_secure_offers::<QuicOffer>(NAME, payload)
            .await?;
        let (identity, peer_fingerprint, theirs) =
            (secured.identity, secured.peer_fingerprint, secured.theirs);
        let peer_candidates =
            peer_candidates(&theirs.candidates, attempt.pairing.peer.ip(), server);
        if peer_candidates.is_empty() {
            return Err(StrategyError::BadOffer(
                "no usable candidate address (of this address family, private or the one the server observed)".into(),
            ));
        }
        let peer_punch_key = parse_punch_key(&theirs.punch_key)?;
        debug!(candidates = ?peer_candidates, "peer offer");

        let peer_rtt = Duration::from_micros(theirs.server_rtt_us.min(60_000_000));
        let max_rtt = attempt.server_rtt.max(peer_rtt);
        let stop = attempt
            .deadline
            .checked_sub(Duration::from_millis(50))
            .unwrap_or(attempt.deadline);
        let started = Instant::now();
        let side = birthday_side(attempt.nat).filter(|_| self.config.birthday);
        let keys = birthday::Keys {
            mine: &punch_key,
            peer: &peer_punch_key,
            pair_id: &attempt.pairing.pair_id,
            role: attempt.role(),
        };
        let missed = |miss: birthday::Miss| {
            StrategyError::TimedOut(format!(
                "no punch through within {:.1}s ({})",
                started.elapsed().as_secs_f64(),
                miss.detail
            ))
        };
        let (socket, paths, port) = match side {
            None => {
                let puncher = Puncher {
                    socket: &socket,
                    my_key: &punch_key,
                    peer_key: &peer_punch_key,
                    pair_id: &attempt.pairing.pair_id,
                    role: attempt.role(),
                    interval: self.config.punch_interval,
                    // The peer got its offer at most half the larger server round trip after
                    // us; its low-TTL datagrams are out by then.
                    full_ttl_delay: max_rtt / 2 + Duration::from_millis(5),
                };
                let paths = puncher.run(&peer_candidates, stop).await.map_err(|fail| {
                    let msg = format!(
                        "no punch through within {:.1}s ({})",
                        started.elapsed().as_secs_f64(),
                        fail.detail
                    );
                    if fail.timed_out {
                        StrategyError::TimedOut(msg)
                    } else {
                        StrategyError::NoLink(msg)
                    }
                })?;
                (socket, paths, port)
            }
            Some(BirthdaySide::Easy) => {
                attempt.notes.mode = Some("birthday".into());
                let peer_ip = attempt.pairing.peer.ip();
                let run = birthday::easy(
                    &socket,
                    &keys,
                    peer_ip,
                    self.config.birthday_probes,
                    self.config.birthday_rate,
                    stop,
                )
                .await;
                let out = run.map_err(|miss| {
                    attempt.notes.probes = Some(miss.probes);
                    missed(miss)
                })?;
                attempt.notes.probes = Some(out.probes);
                (socket, vec![out.peer], port)
            }
            Some(BirthdaySide::Hard) => {
                attempt.notes.mode = Some("birthday".into());
                // The easy side's public mapping: its candidates on the address the server saw.
                let observed = attempt.pairing.peer.ip();
                let mut easy: Vec<SocketAddr> = peer_candidates
                    .iter()
                    .copied()
                    .filter(|c| c.ip() == observed)
                    .collect();
                if easy.is_empty() {
                    easy.clone_from(&peer_candidates);
                }
                drop(socket);
                let run = birthday::hard(
                    unspecified,
                    &keys,
                    &easy,
                    self.config.birthday_sockets,
                    server.is_ipv4(),
                    stop,
                )
                .await;
                let out = run.map_err(|miss| {
                    attempt.notes.probes = Some(miss.probes);
                    missed(miss)
                })?;
                attempt.notes.probes = Some(out.probes);
                let port = out
                    .socket
                    .local_addr()
                    .map_err(|e| StrategyError::io("reading the winning socket's address", e))?
                    .port();
                (out.socket, vec![out.peer], port)
            }
        };
        debug!(?paths, ?side, "punched through");

        let transport = self.transport(attempt.server_rtt + peer_rtt);
        let local = SocketAddr::new(via, port);
        let socket = socket
            .into_std()
            .map_err(|e| StrategyError::io("taking the UDP socket back from tokio", e))?;
        let role = attempt.role();
        let endpoint = quic_endpoint(socket, role, &identity, peer_fingerprint, transport)?;
        // Closes the endpoint (and with it the socket) unless the link takes it over.
        let guard = EndpointGuard(Some(endpoint.clone()));

        let (tx, rx) = mpsc::channel(4);
        let mut tasks = JoinSet::new();
        match role {
            Role::First => {
                tasks.spawn(dial_each(endpoint.clone(), paths.clone(), local, tx));
            }
            Role::Second => {
                tasks.spawn(accept(endpoint.clone(), local, tx));
            }
        }
        let ctx = attempt.handshake_context(NAME);
        // QUIC's TLS is the secure channel; bind the link handshake to it.
        let upgrade = |s: QuicStream| async move {
            let mut binding = vec![0u8; 32];
            s.connection()
                .export_keying_material(&mut binding, EXPORTER_LABEL, b"")
                .map_err(|e| io::Error::other(format!("TLS exporter: {e:?}")))?;
            Ok((s, binding))
        };
        let agreed = agree_on_link(&ctx, rx, upgrade, Duration::from_secs(3), stop).await;
        tasks.abort_all();
        let raw = agreed.map_err(|none| {
            let msg = format!(
                "punched through to {}, but no authenticated QUIC link within {:.1}s ({none})",
                paths
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                started.elapsed().as_secs_f64()
            );
            none.into_error(msg)
        })?;
        if role == Role::Second {
            endpoint.set_server_config(None); // no further connections
        }
        guard.disarm();
        let streams = Arc::new(QuicStreams {
            conn: raw.stream.connection().clone(),
        });
        Ok(Link {
            local: raw.local,
            remote: raw.remote,
            stream: Box::new(MultiStream::new(raw.stream, streams)),
            strategy: NAME,
        })
    }
}

/// Stream receive window and send window of QUIC links (the connection window is twice it).
const QUIC_WINDOW: u32 = 4 << 20;

impl UdpQuic {
    fn transport(&self, rtt_estimate: Duration) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.config.keep_alive));
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.config.idle_timeout).ok());
        // Windows: what quinn buffers is what a `connect` process holds in memory (the
        // receiver keeps up to the stream window of data its output has not taken yet, the
        // sender keeps unacknowledged data up to the send window). 64/128 MiB windows meant
        // over 100 MB resident at line rate; these keep a process under 32 MB and still
        // cover 4 MiB in flight (about 35 ms at 1 Gbit/s). NETTOOL_QUIC_WINDOW (bytes)
        // overrides for measuring.
        let window = std::env::var("NETTOOL_QUIC_WINDOW")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(QUIC_WINDOW);
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

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    // Room for a burst of QUIC packets.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The local address the kernel would use to reach `server` (no packet is sent).
fn route_source(server: SocketAddr) -> Option<IpAddr> {
    let unspecified: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = std::net::UdpSocket::bind(unspecified).ok()?;
    probe.connect(server).ok()?;
    Some(probe.local_addr().ok()?.ip())
}

/// Learns the socket's public mapping from the rendezvous server's STUN responder, asking
/// again every [`STUN_RETRY`] until answered or `deadline`.
async fn stun_mapping(
    socket: &UdpSocket,
    server: SocketAddr,
    deadline: Instant,
) -> Result<SocketAddr, StrategyError> {
    let (id, request) = stun::binding_request();
    let mut buf = vec![0u8; 2048];
    let mut last_error = None;
    loop {
        if let Err(e) = socket.send_to(&request, server).await {
            debug!("stun request to {server}: {e}");
            last_error = Some(e.to_string());
        }
        let next = (Instant::now() + STUN_RETRY).min(deadline);
        loop {
            match tokio::time::timeout_at(next.into(), socket.recv_from(&mut buf)).await {
                Err(_) => break,
                Ok(Ok((n, from))) => {
                    if let Some(mapped) = stun::parse_binding_response(&buf[..n], &id) {
                        return Ok(mapped);
                    }
                    debug!(%from, len = n, "ignored a datagram while waiting for STUN");
                }
                // ICMP errors (the server's port unreachable) surface here.
                Ok(Err(e)) => {
                    debug!("waiting for STUN: {e}");
                    last_error = Some(e.to_string());
                    tokio::time::sleep_until(next.into()).await;
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(StrategyError::TimedOut(format!(
                "no STUN answer from the rendezvous server at {server} (udp){}",
                last_error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Punch datagrams

/// First bytes of a punch datagram. The first byte has QUIC's fixed bit (0x40) clear, so a late
/// punch is never taken for a QUIC packet.
const PUNCH_MAGIC: [u8; 4] = [0x00, b'N', b'T', b'P'];
const PUNCH_VERSION: u8 = 2;
const PUNCH_LABEL: &[u8] = b"nettool udp punch v2";
const NONCE_LEN: usize = 16;
const PUNCH_LEN: usize = 4 + 1 + 1 + 1 + NONCE_LEN + 32;
/// Most addresses punched per attempt: the validated candidates plus addresses valid punches
/// came from.
const MAX_TARGETS: usize = 2 * MAX_CANDIDATES_PER_FAMILY;
/// Most punch datagrams sent to one address per attempt (at the default 50 ms interval, more
/// than a 10 s attempt needs).
const MAX_PUNCHES_PER_TARGET: u64 = 256;
/// Flag: the sender has heard a valid punch from the receiver.
const FLAG_HEARD: u8 = 0x01;

/// What a punch datagram says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Punch {
    role: Role,
    heard: bool,
}

/// Why a datagram is not a valid punch from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PunchError {
    /// Not a punch datagram at all (QUIC, STUN, noise).
    NotAPunch,
    /// A punch, but the tag does not match: another session, pairing or secret.
    BadTag,
    /// A valid punch claiming our own role (our own datagram reflected, or a confused peer).
    SameRole,
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::First => 1,
        Role::Second => 2,
    }
}

/// A punch key from a peer's offer.
fn parse_punch_key(hex_text: &str) -> Result<PunchKey, StrategyError> {
    hex::decode(hex_text)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| StrategyError::BadOffer("punch key is not 32 bytes of hex".into()))
}

/// Key of one peer's punch datagrams in one attempt.
type PunchKey = [u8; 32];

fn punch_tag(key: &PunchKey, pair_id: &str, head: &[u8], nonce: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key length");
    for part in [
        PUNCH_LABEL,
        pair_id.as_bytes(),
        NAME.as_bytes(),
        head,
        nonce,
    ] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn encode_punch(key: &PunchKey, pair_id: &str, punch: Punch) -> Vec<u8> {
    let mut out = Vec::with_capacity(PUNCH_LEN);
    out.extend_from_slice(&PUNCH_MAGIC);
    out.push(PUNCH_VERSION);
    out.push(role_byte(punch.role));
    out.push(if punch.heard { FLAG_HEARD } else { 0 });
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    let tag = punch_tag(key, pair_id, &out[4..7], &nonce);
    out.extend_from_slice(&tag);
    out
}

/// Checks a datagram claimed to come from the peer (whose role is `from_role`).
fn decode_punch(
    key: &PunchKey,
    pair_id: &str,
    from_role: Role,
    packet: &[u8],
) -> Result<Punch, PunchError> {
    if packet.len() != PUNCH_LEN || packet[..4] != PUNCH_MAGIC || packet[4] != PUNCH_VERSION {
        return Err(PunchError::NotAPunch);
    }
    let role = match packet[5] {
        1 => Role::First,
        2 => Role::Second,
        _ => return Err(PunchError::NotAPunch),
    };
    let nonce = &packet[7..7 + NONCE_LEN];
    let expected = punch_tag(key, pair_id, &packet[4..7], nonce);
    let got = &packet[7 + NONCE_LEN..];
    // Constant-time comparison.
    if expected
        .iter()
        .zip(got)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        != 0
    {
        return Err(PunchError::BadTag);
    }
    if role != from_role {
        return Err(PunchError::SameRole);
    }
    Ok(Punch {
        role,
        heard: packet[6] & FLAG_HEARD != 0,
    })
}

/// One punching run over the attempt's socket.
struct Puncher<'a> {
    socket: &'a UdpSocket,
    /// Our punch key (in our offer).
    my_key: &'a PunchKey,
    /// The peer's punch key (from its offer).
    peer_key: &'a PunchKey,
    pair_id: &'a str,
    role: Role,
    interval: Duration,
    full_ttl_delay: Duration,
}

/// Why punching produced no path.
struct PunchFailure {
    timed_out: bool,
    detail: String,
}

/// What was seen per address, for the report.
#[derive(Default)]
struct Seen {
    sent: u64,
    send_error: Option<String>,
    valid: u64,
    bad_tag: u64,
    other: u64,
}

impl Puncher<'_> {
    fn punch(&self, heard: bool) -> Vec<u8> {
        encode_punch(
            self.my_key,
            self.pair_id,
            Punch {
                role: self.role,
                heard,
            },
        )
    }

    async fn send(&self, to: SocketAddr, heard: bool, seen: &mut BTreeMap<SocketAddr, Seen>) {
        let entry = seen.entry(to).or_default();
        if entry.sent >= MAX_PUNCHES_PER_TARGET {
            return;
        }
        entry.sent += 1;
        match self.socket.send_to(&self.punch(heard), to).await {
            Ok(_) => {}
            // ICMP errors of earlier datagrams surface on later sends: not this one's fault.
            Err(e) => {
                trace!(%to, "punch send: {e}");
                entry.send_error = Some(e.to_string());
            }
        }
    }

    /// Punches until a valid punch from the peer was heard and the peer confirmed hearing
    /// ours; returns the peer's addresses that punched through: first the one the confirming
    /// punch came from (or, for the second peer, the one the first peer's QUIC packets come
    /// from), then every other address a valid punch came from, so QUIC can try them all.
    async fn run(
        &self,
        peer_candidates: &[SocketAddr],
        stop: Instant,
    ) -> Result<Vec<SocketAddr>, PunchFailure> {
        let paths = |best: SocketAddr, heard: &HashSet<SocketAddr>| {
            let mut out = vec![best];
            out.extend(heard.iter().copied().filter(|a| *a != best));
            out
        };
        let mut targets: Vec<SocketAddr> = peer_candidates.to_vec();
        let mut seen: BTreeMap<SocketAddr, Seen> = BTreeMap::new();
        let mut heard_from: HashSet<SocketAddr> = HashSet::new();
        let mut confirmed: Option<SocketAddr> = None;

        // Prime: the first datagram to each candidate with a low TTL.
        let ipv4 = self.socket.local_addr().is_ok_and(|a| a.is_ipv4());
        let normal_ttl = ttl(self.socket, ipv4).ok();
        if let Some(normal) = normal_ttl {
            if let Err(e) = set_ttl(self.socket, ipv4, LOW_TTL) {
                debug!("cannot lower the TTL: {e}");
            }
            for to in &targets {
                self.send(*to, false, &mut seen).await;
            }
            if let Err(e) = set_ttl(self.socket, ipv4, normal) {
                warn!("cannot restore the TTL: {e}");
            }
        }
        let mut next_round = tokio::time::Instant::now()
            + if normal_ttl.is_some() {
                self.full_ttl_delay
            } else {
                Duration::ZERO
            };
        let mut buf = vec![0u8; 2048];
        loop {
            if let Some(from) = confirmed.filter(|_| !heard_from.is_empty()) {
                // Done. A few more confirmations in case the last ones got lost; the peer may
                // still be waiting for one (its QUIC endpoint drops any extra).
                for _ in 0..3 {
                    self.send(from, true, &mut seen).await;
                }
                return Ok(paths(from, &heard_from));
            }
            tokio::select! {
                () = tokio::time::sleep_until(stop.into()) => {
                    return Err(PunchFailure {
                        timed_out: true,
                        detail: describe(&targets, &seen, &heard_from),
                    });
                }
                () = tokio::time::sleep_until(next_round) => {
                    let heard = !heard_from.is_empty();
                    for to in targets.clone() {
                        self.send(to, heard, &mut seen).await;
                    }
                    next_round = tokio::time::Instant::now() + self.interval;
                }
                got = self.socket.peek_from(&mut buf) => {
                    let (n, from) = match got {
                        Ok(x) => x,
                        Err(e) => {
                            // ICMP errors (port unreachable, host unreachable) of earlier sends.
                            trace!("punch receive: {e}");
                            continue;
                        }
                    };
                    let packet = &buf[..n];
                    let punch = decode_punch(self.peer_key, self.pair_id, self.role.other(), packet);
                    if punch.is_err()
                        && self.role == Role::Second
                        && heard_from.contains(&from)
                        && packet.first().is_some_and(|b| b & 0xc0 == 0xc0)
                    {
                        // A QUIC long-header packet from the peer: it is done punching, so it
                        // heard ours. Leave the packet for the QUIC endpoint.
                        debug!(%from, "the peer started QUIC");
                        return Ok(paths(from, &heard_from));
                    }
                    let _ = self.socket.recv_from(&mut buf).await;
                    let entry = seen.entry(from).or_default();
                    match punch {
                        Ok(p) => {
                            entry.valid += 1;
                            trace!(%from, heard = p.heard, "valid punch");
                            if !targets.contains(&from) && targets.len() < MAX_TARGETS {
                                debug!(%from, "peer reachable at an address it did not offer");
                                targets.push(from);
                            }
                            let first_time = heard_from.insert(from);
                            if p.heard {
                                confirmed.get_or_insert(from);
                            }
                            if first_time || !p.heard {
                                self.send(from, true, &mut seen).await;
                            }
                        }
                        Err(PunchError::BadTag) => {
                            entry.bad_tag += 1;
                            debug!(%from, "punch failed authentication");
                        }
                        Err(e) => {
                            entry.other += 1;
                            debug!(%from, len = n, "ignored datagram: {e:?}");
                        }
                    }
                }
            }
        }
    }
}

/// The socket's TTL (IPv4) or unicast hop limit (IPv6).
fn ttl(socket: &UdpSocket, ipv4: bool) -> io::Result<u32> {
    let sock = socket2::SockRef::from(socket);
    if ipv4 {
        sock.ttl_v4()
    } else {
        sock.unicast_hops_v6()
    }
}

fn set_ttl(socket: &UdpSocket, ipv4: bool, ttl: u32) -> io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    if ipv4 {
        sock.set_ttl_v4(ttl)
    } else {
        sock.set_unicast_hops_v6(ttl)
    }
}

fn describe(
    targets: &[SocketAddr],
    seen: &BTreeMap<SocketAddr, Seen>,
    heard_from: &HashSet<SocketAddr>,
) -> String {
    let mut parts = Vec::new();
    for to in targets {
        let s = seen.get(to);
        let sent = s.map_or(0, |s| s.sent);
        let mut text = format!("{to}: sent {sent} punches");
        if heard_from.contains(to) {
            text.push_str(", heard valid punches but no confirmation");
        } else if s.is_none_or(|s| s.bad_tag == 0 && s.valid == 0) {
            text.push_str(", no answer");
        }
        if let Some(e) = s.and_then(|s| s.send_error.as_ref()) {
            text.push_str(&format!(" (last send error: {e})"));
        }
        parts.push(text);
    }
    for (from, s) in seen {
        if s.bad_tag > 0 {
            parts.push(format!(
                "{from}: {} punches failed authentication (wrong session, pairing or secret)",
                s.bad_tag
            ));
        }
        if s.other > 0 && !targets.contains(from) {
            parts.push(format!("{from}: {} unrelated datagrams ignored", s.other));
        }
    }
    parts.join("; ")
}

// ---------------------------------------------------------------------------------------------
// QUIC

fn client_config(
    identity: &Identity,
    peer_fingerprint: [u8; 32],
) -> Result<quinn::ClientConfig, StrategyError> {
    let tls = client_tls(identity, peer_fingerprint)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| tls_error("QUIC client config", e))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

fn server_config(
    identity: &Identity,
    peer_fingerprint: [u8; 32],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, StrategyError> {
    let tls = server_tls(identity, peer_fingerprint)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| tls_error("QUIC server config", e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

fn quic_endpoint(
    socket: std::net::UdpSocket,
    role: Role,
    identity: &Identity,
    peer_fingerprint: [u8; 32],
    transport: Arc<quinn::TransportConfig>,
) -> Result<Endpoint, StrategyError> {
    let mut config = EndpointConfig::default();
    // Punch datagrams (and STUN) lack QUIC's fixed bit: drop them without a second look.
    config.grease_quic_bit(false);
    let server = match role {
        Role::First => None,
        Role::Second => Some(server_config(
            identity,
            peer_fingerprint,
            transport.clone(),
        )?),
    };
    let mut endpoint = Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(|e| StrategyError::io("starting the QUIC endpoint", e))?;
    if role == Role::First {
        let mut client = client_config(identity, peer_fingerprint)?;
        client.transport_config(transport);
        endpoint.set_default_client_config(client);
    }
    Ok(endpoint)
}

/// Closes an endpoint on drop unless disarmed.
struct EndpointGuard(Option<Endpoint>);

impl EndpointGuard {
    fn disarm(mut self) {
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
async fn dial_each(
    endpoint: Endpoint,
    paths: Vec<SocketAddr>,
    local: SocketAddr,
    tx: mpsc::Sender<RawLink<QuicStream>>,
) {
    for peer in paths {
        if tx.is_closed() {
            return;
        }
        if let Some(conn) = dial(endpoint.clone(), peer, local, &tx).await {
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
    tx: &mpsc::Sender<RawLink<QuicStream>>,
) -> Option<Connection> {
    let conn = match endpoint.connect(peer, "nettool") {
        Ok(connecting) => match connecting.await {
            Ok(c) => c,
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
        stream: QuicStream::new(endpoint, conn.clone(), send, recv),
        local,
        remote,
    })
    .await
    .ok()?;
    Some(conn)
}

async fn accept(endpoint: Endpoint, local: SocketAddr, tx: mpsc::Sender<RawLink<QuicStream>>) {
    let mut pending = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                let (endpoint, tx) = (endpoint.clone(), tx.clone());
                pending.spawn(async move {
                    let from = incoming.remote_address();
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(%from, "refused QUIC connection: {e}");
                            return;
                        }
                    };
                    match conn.accept_bi().await {
                        Ok((send, recv)) => {
                            let _ = tx
                                .send(RawLink {
                                    stream: QuicStream::new(endpoint, conn.clone(), send, recv),
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
struct QuicStreams {
    conn: Connection,
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
mod tests {
    use super::*;
    use sha2::Digest;

    fn key(seed: &str) -> PunchKey {
        sha2::Sha256::digest(seed.as_bytes()).into()
    }

    #[test]
    fn punches_round_trip() {
        let k = key("s");
        for heard in [false, true] {
            let p = Punch {
                role: Role::First,
                heard,
            };
            let bytes = encode_punch(&k, "pair", p);
            assert_eq!(bytes.len(), PUNCH_LEN);
            assert_eq!(bytes[0] & 0x40, 0, "QUIC's fixed bit must be clear");
            assert_eq!(decode_punch(&k, "pair", Role::First, &bytes), Ok(p));
            assert_eq!(
                decode_punch(&k, "pair", Role::Second, &bytes),
                Err(PunchError::SameRole)
            );
        }
    }

    #[test]
    fn tampered_or_foreign_punches_are_rejected() {
        let k = key("s");
        let bytes = encode_punch(
            &k,
            "pair",
            Punch {
                role: Role::Second,
                heard: false,
            },
        );
        // Any flipped bit after the magic: rejected.
        for i in 4..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                decode_punch(&k, "pair", Role::Second, &t).is_err(),
                "byte {i}"
            );
        }
        // Setting the heard flag without the key: bad tag.
        let mut t = bytes.clone();
        t[6] |= FLAG_HEARD;
        assert_eq!(
            decode_punch(&k, "pair", Role::Second, &t),
            Err(PunchError::BadTag)
        );
        assert_eq!(
            decode_punch(&key("other"), "pair", Role::Second, &bytes),
            Err(PunchError::BadTag)
        );
        assert_eq!(
            decode_punch(&k, "another pair", Role::Second, &bytes),
            Err(PunchError::BadTag)
        );
        for n in 0..bytes.len() {
            assert_eq!(
                decode_punch(&k, "pair", Role::Second, &bytes[..n]),
                Err(PunchError::NotAPunch)
            );
        }
        let (_, stun) = stun::binding_request();
        assert_eq!(
            decode_punch(&k, "pair", Role::Second, &stun),
            Err(PunchError::NotAPunch)
        );
    }
}
