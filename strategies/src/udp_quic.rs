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
//!
//! Both IP families: when this peer reached the server over IPv4 and IPv6, the socket is one
//! dual-stack socket that asks STUN over both, so the offer carries candidates of both
//! families. Priming lowers the TTL for IPv4 and the hop limit for IPv6 (a stateful firewall
//! in front of an IPv6 host drops an early unsolicited datagram as a NAT does); full-TTL
//! punches to IPv4 candidates start [`nettool_core::candidates::IPV6_HEAD_START`] after the IPv6 ones, and QUIC tries
//! IPv6 paths first. Birthday mode stays IPv4 (IPv6 has no NAT mapping to guess).
//!
//! Modules: this one holds the strategy, its settings and the attempt's orchestration (STUN,
//! offers, choosing the mode); `punch` the punch datagrams and the punching run; `quic` the
//! endpoint, dialing and accepting, and the link's streams; `birthday` birthday mode.
//!
//! [`MAX_CANDIDATES_PER_FAMILY`]: nettool_core::candidates::MAX_CANDIDATES_PER_FAMILY

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::strategy::agree_on_link;
use nettool_core::{stun, Attempt, Link, MultiStream, Prepared, Role, Strategy, StrategyError};

use nettool_core::candidates::{canonical, peer_candidates_all};
use nettool_core::secure::EXPORTER_LABEL;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::debug;

use punch::{parse_punch_key, Puncher};
pub use quic::QuicStream;
use quic::{accept, dial_each, quic_endpoint, EndpointGuard, QuicStreams};

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
            birthday_rate: 2000,
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
mod punch;
mod quic;

/// The strategy's name.
pub const NAME: &str = "udp-quic";
/// ALPN protocol of nettool links over QUIC (the same as over TLS on TCP).
pub const ALPN: &[u8] = nettool_core::secure::ALPN;
/// Pause between STUN Binding requests until one is answered.
const STUN_RETRY: Duration = Duration::from_millis(200);
/// Bound on the STUN observation of a socket prepared before pairing.
const PREPARE_STUN: Duration = Duration::from_secs(3);

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

impl QuicOffer {
    /// The offer naming `opened`'s candidates, with a fresh punch key.
    fn new(opened: &Opened, server_rtt: Duration) -> Self {
        let mut punch_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut punch_key);
        Self {
            punch_key: hex::encode(punch_key),
            candidates: opened.candidates.clone(),
            server_rtt_us: server_rtt.as_micros().try_into().unwrap_or(u64::MAX),
        }
    }
}

/// A bound UDP socket and where it can be reached.
#[derive(Debug)]
struct Opened {
    socket: UdpSocket,
    port: u16,
    /// The local address toward the server.
    via: IpAddr,
    candidates: Vec<SocketAddr>,
}

/// What [`UdpQuic::prepare`] made: the socket and the offer naming it.
#[derive(Debug)]
struct PreparedSocket {
    opened: Opened,
    offer: QuicOffer,
}

impl UdpQuic {
    /// Binds the attempt's UDP socket and observes it through the server's STUN (the first
    /// server must answer by `until`; another family's is an extra).
    async fn open_socket(
        &self,
        servers: &[SocketAddr],
        until: Instant,
    ) -> Result<Opened, StrategyError> {
        let server = servers[0];
        let unspecified = crate::net::unspecified_for_all(servers);
        let socket = bind_udp(SocketAddr::new(unspecified, self.config.local_port))
            .map_err(|e| StrategyError::io("binding the UDP socket", e))?;
        let port = socket
            .local_addr()
            .map_err(|e| StrategyError::io("reading the UDP socket's address", e))?
            .port();
        let via = route_source(server).unwrap_or(unspecified);
        let mut candidates = Vec::new();
        for (i, server) in servers.iter().copied().enumerate() {
            // The control connection's family must answer; another family is an extra that
            // must not eat the attempt.
            let until = if i == 0 {
                until
            } else {
                (Instant::now() + OTHER_FAMILY_STUN).min(until)
            };
            match stun_mapping(&socket, server, until).await {
                Ok(public) => {
                    let via = route_source(server).unwrap_or(unspecified);
                    let found = nettool_core::candidates::candidates(
                        public,
                        SocketAddr::new(via, port),
                        server.ip().is_loopback(),
                    );
                    debug!(%public, candidates = ?found, "UDP socket observed");
                    candidates.extend(found);
                }
                Err(e) if i == 0 => return Err(e),
                Err(e) => debug!("UDP socket not observed over {server}: {e}"),
            }
        }
        Ok(Opened {
            socket,
            port,
            via,
            candidates,
        })
    }
}

#[async_trait::async_trait]
impl Strategy for UdpQuic {
    fn name(&self) -> &'static str {
        NAME
    }

    fn punches_hard_nats(&self) -> bool {
        self.config.birthday
    }

    fn prepares_with_port_mapping(&self) -> bool {
        false
    }

    async fn prepare(
        &self,
        servers: &[SocketAddr],
        deadline: Instant,
    ) -> Result<Option<Prepared>, StrategyError> {
        // Bounded on its own: a network that drops UDP must not hold the preparation up.
        let began = Instant::now();
        let until = (began + PREPARE_STUN).min(deadline);
        let opened = self.open_socket(servers, until).await?;
        // Before pairing the observation is the round trip to the server.
        let offer = QuicOffer::new(&opened, began.elapsed());
        Ok(Some(Prepared {
            servers: servers.to_vec(),
            offer: serde_json::to_value(&offer).expect("offer serializes"),
            state: Box::new(PreparedSocket { opened, offer }),
        }))
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let servers = attempt.rendezvous.servers();
        let (
            Opened {
                socket, port, via, ..
            },
            offer,
            secured,
        ) = match attempt
            .prepared_offers::<PreparedSocket, QuicOffer>(NAME)
            .await
        {
            Some(prepared) => {
                let (PreparedSocket { opened, offer }, secured) = prepared?;
                (opened, offer, secured)
            }
            None => {
                let mut opened = self.open_socket(&servers, attempt.deadline).await?;
                // With port mapping on, the gateway's mapping of this socket comes first: it
                // takes datagrams from anywhere, so a peer behind any NAT reaches it (and we
                // answer to where its punches come from).
                // (IPv4 only: NAT-PMP, PCP and UPnP-IGD map on the IPv4 gateway.)
                let mapped = if servers.iter().any(SocketAddr::is_ipv4) {
                    attempt
                        .map_port(nettool_core::port_mapping::Transport::Udp, opened.port)
                        .await
                } else {
                    None
                };
                if let Some(mapped) = mapped {
                    opened.candidates.retain(|c| *c != mapped);
                    opened.candidates.insert(0, mapped);
                }
                let offer = QuicOffer::new(&opened, attempt.server_rtt);
                let payload = serde_json::to_value(&offer).expect("offer serializes");
                let secured = attempt
                    .exchange_secure_offers::<QuicOffer>(NAME, payload)
                    .await?;
                (opened, offer, secured)
            }
        };
        let punch_key = parse_punch_key(&offer.punch_key)?;
        let (identity, pin, theirs) = (secured.identity, secured.peer, secured.theirs);
        let peer_seen: Vec<IpAddr> = attempt.pairing.peer_all().iter().map(|a| a.ip()).collect();
        let peer_candidates = peer_candidates_all(&theirs.candidates, &peer_seen, &servers);
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
        // Who dials QUIC: the links' TLS role (the second peer when keyed, so its proof rides
        // with its QUIC Finished, as on the TCP links).
        let quic_role = attempt.tls_role();
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
                    accepts_quic: quic_role == Role::Second,
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
                let peer_ip = peer_ipv4(attempt.pairing)?;
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
                let observed = peer_ipv4(attempt.pairing)?;
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
                    Ipv4Addr::UNSPECIFIED.into(),
                    &keys,
                    &easy,
                    self.config.birthday_sockets,
                    (true, quic_role == Role::First),
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
        let local = SocketAddr::new(
            paths.first().and_then(|p| route_source(*p)).unwrap_or(via),
            port,
        );
        let socket = socket
            .into_std()
            .map_err(|e| StrategyError::io("taking the UDP socket back from tokio", e))?;
        let endpoint = quic_endpoint(socket, quic_role, &identity, pin, transport)?;
        // Closes the endpoint (and with it the socket) unless the link takes it over.
        let guard = EndpointGuard(Some(endpoint.clone()));

        let (tx, rx) = mpsc::channel(4);
        let mut tasks = JoinSet::new();
        match quic_role {
            Role::First => {
                tasks.spawn(dial_each(endpoint.clone(), paths.clone(), local, tx, pin));
            }
            Role::Second => {
                tasks.spawn(accept(endpoint.clone(), local, tx, pin));
            }
        }
        let ctx = attempt.handshake_context(NAME);
        // QUIC's TLS is the secure channel; bind the link handshake to it.
        let upgrade = |s: quic::QuicRaw| async move {
            let s = s?;
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
        if quic_role == Role::Second {
            endpoint.set_server_config(None); // no further connections
        }
        guard.disarm();
        let streams = Arc::new(QuicStreams {
            conn: raw.stream.connection().clone(),
        });
        Ok(Link {
            local: canonical(raw.local),
            remote: canonical(raw.remote),
            stream: Box::new(MultiStream::new(raw.stream, streams)),
            strategy: NAME,
        })
    }
}

/// How long asking STUN over the other family (not the control connection's) may take.
const OTHER_FAMILY_STUN: Duration = Duration::from_millis(1500);

/// The peer's IPv4 address as the server saw it (birthday mode is IPv4 only).
fn peer_ipv4(pairing: &nettool_core::Pairing) -> Result<IpAddr, StrategyError> {
    pairing
        .peer_all()
        .into_iter()
        .find(SocketAddr::is_ipv4)
        .map(|a| a.ip())
        .ok_or_else(|| StrategyError::NoLink("birthday mode needs the peer's IPv4 address".into()))
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
