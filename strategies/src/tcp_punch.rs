//! tcp-punch: TCP simultaneous open through NATs.
//!
//! Each peer uses two local ports, each bound with SO_REUSEADDR + SO_REUSEPORT and each
//! observed by the rendezvous server from that very port (so the server sees the NAT's
//! mapping of it, which stays held by the observe connection):
//!
//! - the **receive port** *primes* its NAT: to every candidate of the peer's dial port it sends
//!   a SYN with a small TTL — enough to pass its own NAT, too small to reach the peer's — and
//!   keeps that connecting socket. The NAT now holds a mapping (and connection-tracking
//!   state) for exactly the peer's dial endpoint, so the peer's SYN is let in instead of being
//!   dropped or answered with a reset by the router.
//! - the **dial port** sends real SYNs to every candidate of the peer's receive port, starting
//!   once the peer's priming SYN is out (half the larger round trip to the server after the
//!   server handed out both offers at once), and again after each failure.
//!
//! Why two ports: a Linux NAT's connection tracking remembers the initial sequence number of
//! the first SYN it saw for a connection. When the peer's SYN comes in for that connection,
//! the answer must come from the very socket that sent the SYN (a listener or a fresh socket
//! has another sequence number, and the NAT then drops everything as invalid). The primed
//! socket is that socket: it answers the peer's SYN by simultaneous open. If the router's
//! ICMP time-exceeded for the priming SYN kills it, it is primed again at once. Dialing from
//! the same port would replace the primed socket and break exactly this.
//!
//! Listeners on both ports accept connections from peers without NAT state in the way (public
//! hosts, full-cone NATs, endpoint-dependent NATs whose SYNs arrive from unexpected ports).
//! The first connection in either direction whose link handshake passes wins.
//!
//! One exception: when something stateful sits in front of this peer (a NAT or a firewall;
//! the plan's own NAT summary says so, or says nothing), the receive port's listener refuses
//! (resets) a connection from an endpoint it is priming. That connection's SYN met no primed
//! socket (the ICMP time-exceeded for the priming SYN had just killed it), so the listener
//! answered with its own sequence number while the router tracks the primed socket's. Such a
//! link works for a while and then stalls: measured in the lab (none × fw, 2–3 % of runs), the
//! firewall dropped the peer's last segment (with its FIN) as out of window and the receiver
//! waited for ever. The dialing peer keeps dialing (see `dial_loop`), and its next SYN meets
//! the primed socket.
//!
//! What no timing can prevent: the peer's SYN passing the router after a priming socket died
//! but before its replacement's SYN. The router's entry then stays in SYN_SENT2 with the dead
//! socket's sequence number (its log: the SYN-ACK "over upper bound", later packets
//! "ignored"); data and ACKs pass, an incoming FIN is dropped. On a firewall the link works,
//! so every TCP link sends its FIN alone, after all its data is acknowledged
//! (`LoneFin` in `net.rs`); on a NAT the primed side's packets go out untranslated and that
//! connection never links.
//!
//! Both IP families: when this peer reached the server over IPv4 and IPv6, each port is one
//! dual-stack socket observed over both, so the offer carries candidates of both families;
//! priming uses the TTL for IPv4 and the hop limit for IPv6 (a firewall in front of an IPv6
//! host keeps state like a NAT does). IPv6 pairs start first
//! ([`nettool_core::candidates::IPV6_HEAD_START`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nettool_core::client::observe;
use nettool_core::discovery::{Filtering, Mapping};
use nettool_core::plan::NatSummary;
use nettool_core::strategy::{agree_on_link, RawLink};
use nettool_core::{Attempt, Link, Prepared, Strategy, StrategyError};

use crate::net::send_tcp;
use nettool_core::candidates::{candidates, peer_candidates_all, start_delay};
use serde::{Deserialize, Serialize};
use socket2::{Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, trace};

/// Most connection attempts (SYNs from a fresh socket) per destination and port per attempt,
/// priming and dialing each: a bound on what an offer can make this peer send.
const MAX_SYNS_PER_DESTINATION: u32 = 512;
/// Settings of the tcp-punch strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TcpPunchConfig {
    /// Local port to punch from; 0 picks a free one.
    pub local_port: u16,
    /// TTL of the priming SYN to each candidate (enough to pass the own NAT, too small to reach
    /// the peer's), so the own mapping exists before the peer's SYN arrives. 0 turns it off.
    pub low_ttl: u32,
    /// Pause between two connect attempts to the same candidate after a failure.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Shortest time one SYN is given to be answered before it is sent again.
    #[serde(with = "humantime_serde")]
    pub min_syn_timeout: Duration,
}

impl TcpPunchConfig {
    /// The priming TTL, `None` when priming is off.
    pub fn priming_ttl(&self) -> Option<u32> {
        (self.low_ttl > 0).then_some(self.low_ttl)
    }
}

impl Default for TcpPunchConfig {
    fn default() -> Self {
        Self {
            local_port: 0,
            low_ttl: 2,
            retry_interval: Duration::from_millis(100),
            min_syn_timeout: Duration::from_millis(500),
        }
    }
}

/// The strategy's name.
pub const NAME: &str = "tcp-punch";

/// TCP simultaneous open.
#[derive(Debug, Clone)]
pub struct TcpPunch {
    config: TcpPunchConfig,
}

impl TcpPunch {
    /// A tcp-punch strategy with these settings.
    pub fn new(config: TcpPunchConfig) -> Self {
        Self { config }
    }
}

/// What each peer tells the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PunchOffer {
    /// Where the receive port can be reached, best first (observed public endpoint, then own
    /// addresses).
    receive: Vec<SocketAddr>,
    /// Where SYNs from the dial port come from, same order.
    dial: Vec<SocketAddr>,
    /// This peer's round trip to the server, in microseconds.
    server_rtt_us: u64,
}

/// Last error seen per candidate, for the report.
type DialErrors = Arc<Mutex<BTreeMap<String, String>>>;

/// One bound, observed port.
struct PunchPort {
    listener: TcpListener,
    local: SocketAddr,
    candidates: Vec<SocketAddr>,
    /// How long the first observation's TCP connect took: a round trip to the server.
    connect_rtt: Duration,
    /// Hold the NAT mappings (one per family) open while the attempt runs.
    _observe: Vec<nettool_core::protocol::FramedConn<TcpStream>>,
}

/// How long observing a port over the other family (not the control connection's) may take:
/// that family is an extra, and must not eat the attempt.
const OTHER_FAMILY_OBSERVE: Duration = Duration::from_millis(1500);

/// Binds a port on `unspecified` and observes it at every server address of `servers` (one
/// per family; the first, the control connection's family, must work, the others may fail).
async fn open_port(
    unspecified: IpAddr,
    port: u16,
    servers: &[SocketAddr],
    deadline: Instant,
    what: &str,
) -> Result<PunchPort, StrategyError> {
    let listener = listen(SocketAddr::new(unspecified, port))
        .map_err(|e| StrategyError::io(format!("binding the {what} port"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| StrategyError::io(format!("reading the {what} port"), e))?;
    let local = SocketAddr::new(unspecified, local.port());
    let mut port = PunchPort {
        listener,
        local,
        candidates: Vec::new(),
        connect_rtt: Duration::MAX,
        _observe: Vec::new(),
    };
    for (i, server) in servers.iter().copied().enumerate() {
        let until = if i == 0 {
            deadline
        } else {
            (Instant::now() + OTHER_FAMILY_OBSERVE).min(deadline)
        };
        let observed = async {
            let began = Instant::now();
            let stream = tokio::time::timeout_at(until.into(), connect_from(local, server))
                .await
                .map_err(|_| {
                    StrategyError::TimedOut(format!("observing the {what} port timed out"))
                })?
                .map_err(|e| StrategyError::io(format!("observe connection to {server}"), e))?;
            let took = began.elapsed();
            let via = stream
                .local_addr()
                .map_err(|e| StrategyError::io("reading the observe address", e))?;
            let (public, conn) = observe(stream, until).await?;
            Ok::<_, StrategyError>((public, via, conn, took))
        };
        match observed.await {
            Ok((public, via, conn, took)) => {
                if i == 0 {
                    port.connect_rtt = took;
                }
                debug!(%public, port = local.port(), "{what} port observed");
                port.candidates
                    .extend(candidates(public, via, server.ip().is_loopback()));
                port._observe.push(conn);
            }
            Err(e) if i == 0 => return Err(e),
            Err(e) => debug!("{what} port not observed over {server}: {e}"),
        }
    }
    Ok(port)
}

/// Both ports of an attempt, bound and observed.
struct Ports {
    receive: PunchPort,
    dial: PunchPort,
}

impl Ports {
    /// The offer naming them, with this side's round trip to the server.
    fn offer(&self, server_rtt: Duration) -> serde_json::Value {
        let offer = PunchOffer {
            receive: self.receive.candidates.clone(),
            dial: self.dial.candidates.clone(),
            server_rtt_us: server_rtt.as_micros().try_into().unwrap_or(u64::MAX),
        };
        serde_json::to_value(&offer).expect("offer serializes")
    }
}

impl TcpPunch {
    /// Binds both ports and observes them at once: two round trips each, not four in a row.
    async fn open_ports(
        &self,
        servers: &[SocketAddr],
        deadline: Instant,
    ) -> Result<Ports, StrategyError> {
        let unspecified = crate::net::unspecified_for_all(servers);
        let (receive, dial) = tokio::try_join!(
            open_port(
                unspecified,
                self.config.local_port,
                servers,
                deadline,
                "receive",
            ),
            open_port(unspecified, 0, servers, deadline, "dial"),
        )?;
        Ok(Ports { receive, dial })
    }
}

#[async_trait::async_trait]
impl Strategy for TcpPunch {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn prepare(
        &self,
        servers: &[SocketAddr],
        deadline: Instant,
    ) -> Result<Option<Prepared>, StrategyError> {
        let ports = self.open_ports(servers, deadline).await?;
        // Before pairing the observations' own connects are the round trip to the server.
        let rtt = ports.receive.connect_rtt.min(ports.dial.connect_rtt);
        Ok(Some(Prepared {
            servers: servers.to_vec(),
            offer: ports.offer(rtt),
            state: Box::new(ports),
        }))
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let servers = attempt.rendezvous.servers();
        let (Ports { receive, dial }, secured) =
            match attempt.prepared_offers::<Ports, PunchOffer>(NAME).await {
                Some(prepared) => prepared?,
                None => {
                    let ports = self.open_ports(&servers, attempt.deadline).await?;
                    let payload = ports.offer(attempt.server_rtt);
                    let secured = attempt
                        .exchange_secure_offers::<PunchOffer>(NAME, payload)
                        .await?;
                    (ports, secured)
                }
            };
        let tls = secured.link_tls(attempt.tls_role())?;
        let theirs = secured.theirs;
        let observed: Vec<IpAddr> = attempt.pairing.peer_all().iter().map(|a| a.ip()).collect();
        let usable = |v: &[SocketAddr]| peer_candidates_all(v, &observed, &servers);
        let (peer_receive, peer_dial) = (usable(&theirs.receive), usable(&theirs.dial));
        if peer_receive.is_empty() || peer_dial.is_empty() {
            return Err(StrategyError::BadOffer(
                "no usable candidate address (of this address family, private or the one the server observed)".into(),
            ));
        }
        debug!(receive = ?peer_receive, dial = ?peer_dial, "peer offer");

        let peer_rtt = Duration::from_micros(theirs.server_rtt_us.min(60_000_000));
        let dial_delay = match self.config.priming_ttl() {
            Some(_) => dial_delay(attempt.server_rtt, peer_rtt),
            None => Duration::ZERO,
        };
        let syn_timeout = self
            .config
            .min_syn_timeout
            .max(2 * (attempt.server_rtt + peer_rtt));

        let (tx, rx) = mpsc::channel(16);
        let errors: DialErrors = Arc::default();
        // Dropping the JoinSet (on success, error or cancellation) aborts every task, which
        // closes their sockets.
        let mut tasks = JoinSet::new();
        // Priming lets the peer's SYN in through what is in front of this peer. Against a peer
        // with nothing stateful in front (its NAT summary says so), this peer's own dial gets
        // through anyway, and priming would only risk the listener race of the module
        // documentation (its remaining form: a primed socket replaced just as the peer's SYN
        // passes the router). So prime only when the peer may be behind something stateful.
        let peer_open = attempt
            .nat
            .as_ref()
            .is_some_and(|(_, peer)| !stateful_in_front(Some(peer)));
        let priming = self.config.priming_ttl().filter(|_| !peer_open);
        if let Some(ttl) = priming {
            for cand in peer_dial.iter().copied() {
                tasks.spawn(prime_loop(
                    receive.local,
                    cand,
                    start_delay(cand, &peer_dial),
                    ttl,
                    self.config.retry_interval,
                    tx.clone(),
                    errors.clone(),
                ));
            }
        }
        for cand in peer_receive.iter().copied() {
            tasks.spawn(dial_loop(
                dial.local,
                cand,
                dial_delay + start_delay(cand, &peer_receive),
                syn_timeout,
                self.config.retry_interval,
                tx.clone(),
                errors.clone(),
            ));
        }
        let refused: Vec<SocketAddr> =
            if priming.is_some() && stateful_in_front(attempt.nat.as_ref().map(|(me, _)| me)) {
                peer_dial.clone()
            } else {
                Vec::new()
            };
        tasks.spawn(accept_loop(receive.listener, refused, tx.clone()));
        tasks.spawn(accept_loop(dial.listener, Vec::new(), tx));

        let ctx = attempt.handshake_context(NAME);
        let stop = attempt
            .deadline
            .checked_sub(Duration::from_millis(50))
            .unwrap_or(attempt.deadline);
        let started = Instant::now();
        let upgrade = |s: TcpStream| {
            let tls = tls.clone();
            async move { tls.upgrade(crate::net::LoneFin::new(s)).await }
        };
        let agreed = agree_on_link(&ctx, rx, upgrade, Duration::from_secs(3), stop).await;
        tasks.abort_all();
        let raw = match agreed {
            Ok(raw) => raw,
            Err(none) => {
                let errs = errors.lock().expect("errors poisoned");
                let mut detail: Vec<String> =
                    errs.iter().map(|(c, e)| format!("{c}: {e}")).collect();
                if detail.is_empty() {
                    detail.push("no answer from any candidate".to_owned());
                }
                let msg = format!(
                    "no authenticated connection within {:.1}s of punching ({}; {})",
                    started.elapsed().as_secs_f64(),
                    none,
                    detail.join("; ")
                );
                return Err(none.into_error(msg));
            }
        };
        Ok(Link {
            stream: Box::new(raw.stream),
            local: raw.local,
            remote: raw.remote,
            strategy: NAME,
        })
    }
}

fn reuse_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = crate::net::dual_stack_socket(addr, Type::STREAM, Protocol::TCP)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = reuse_socket(addr)?;
    socket.listen(64)?;
    TcpListener::from_std(socket.into())
}

/// Starts a non-blocking connect from `local` to `remote`; with `ttl`, the SYN leaves with that
/// TTL (IPv4) or hop limit (IPv6) and the socket's normal value is restored right after, so a
/// retransmitted SYN or a simultaneous-open SYN-ACK travels normally.
fn start_connect(
    local: SocketAddr,
    remote: SocketAddr,
    ttl: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = reuse_socket(local)?;
    let normal_ttl = match ttl {
        Some(low) => Some(crate::net::set_hops(
            socket2::SockRef::from(&socket),
            remote,
            low,
        )?),
        None => None,
    };
    match socket.connect(&crate::net::for_socket(local, remote).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    if let Some(normal) = normal_ttl {
        crate::net::set_hops(socket2::SockRef::from(&socket), remote, normal)?;
    }
    TcpStream::from_std(socket.into())
}

/// Waits until a started connect is established (`Ok`) or has failed (`Err`).
async fn established(stream: &TcpStream) -> std::io::Result<()> {
    loop {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        if stream.peer_addr().is_ok() {
            return Ok(());
        }
        // Woken without being connected: clear the readiness and wait again.
        let _ = stream.try_io(Interest::WRITABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
    }
}

async fn connect_from(local: SocketAddr, remote: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = start_connect(local, remote, None)?;
    established(&stream).await?;
    Ok(stream)
}

/// Keeps one primed connecting socket from the receive port to `remote` until it connects
/// (the peer's SYN met it: simultaneous open). A priming socket killed by an ICMP error or a
/// reset is replaced at once, so the NAT's state always belongs to a live socket.
async fn prime_loop(
    local: SocketAddr,
    remote: SocketAddr,
    delay: Duration,
    ttl: u32,
    retry_interval: Duration,
    tx: mpsc::Sender<RawLink<TcpStream>>,
    errors: DialErrors,
) {
    tokio::time::sleep(delay).await;
    let mut deaths = 0u32;
    for _ in 0..MAX_SYNS_PER_DESTINATION {
        let stream = match start_connect(local, remote, Some(ttl)) {
            Ok(s) => s,
            Err(e) => {
                record(&errors, format!("prime {remote}"), e.to_string());
                tokio::time::sleep(retry_interval).await;
                continue;
            }
        };
        match established(&stream).await {
            Ok(()) => {
                trace!(%remote, deaths, "primed socket connected");
                let _ = send_tcp(&tx, stream).await;
                return;
            }
            Err(e) => {
                deaths += 1;
                trace!(%remote, "primed socket died: {e}");
                if deaths.is_multiple_of(16) {
                    record(&errors, format!("prime {remote}"), e.to_string());
                    // Something keeps refusing: do not spin.
                    tokio::time::sleep(retry_interval).await;
                }
            }
        }
    }
    record(
        &errors,
        format!("prime {remote}"),
        format!("gave up after {MAX_SYNS_PER_DESTINATION} priming SYNs"),
    );
}

async fn dial_loop(
    local: SocketAddr,
    remote: SocketAddr,
    delay: Duration,
    syn_timeout: Duration,
    retry_interval: Duration,
    tx: mpsc::Sender<RawLink<TcpStream>>,
    errors: DialErrors,
) {
    tokio::time::sleep(delay).await;
    for _ in 0..MAX_SYNS_PER_DESTINATION {
        match tokio::time::timeout(syn_timeout, connect_from(local, remote)).await {
            Ok(Ok(stream)) => {
                trace!(%remote, "connected");
                if send_tcp(&tx, stream).await.is_err() {
                    return;
                }
                // Keep dialing until the attempt ends: the peer may reset this connection (its
                // listener answered instead of its primed socket, see the module
                // documentation). While this one is open, a connect to the same endpoint fails
                // with "address not available", which is not recorded.
                tokio::time::sleep(syn_timeout).await;
            }
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                tokio::time::sleep(syn_timeout).await;
            }
            Ok(Err(e)) => {
                trace!(%remote, "connect: {e}");
                record(&errors, format!("dial {remote}"), e.to_string());
                tokio::time::sleep(retry_interval).await;
            }
            // Silently dropped: send the next SYN right away from a fresh socket.
            Err(_) => record(
                &errors,
                format!("dial {remote}"),
                format!("no answer within {}ms", syn_timeout.as_millis()),
            ),
        }
    }
    record(
        &errors,
        format!("dial {remote}"),
        format!("gave up after {MAX_SYNS_PER_DESTINATION} SYNs"),
    );
}

fn record(errors: &DialErrors, what: String, error: String) {
    errors.lock().expect("errors poisoned").insert(what, error);
}

/// Whether a NAT or a stateful firewall may sit in front of this peer, from its own NAT
/// summary: anything but "no NAT and no filtering" counts, and so does knowing nothing.
fn stateful_in_front(me: Option<&NatSummary>) -> bool {
    !me.is_some_and(|me| {
        me.tcp_mapping == Mapping::NoNat && me.udp_filtering == Filtering::EndpointIndependent
    })
}

/// Least wait before the first SYN, for the peer's work between receiving the offers and
/// priming.
const DIAL_MARGIN: Duration = Duration::from_millis(5);

/// How long to wait before dialing so the peer's priming SYN is out when this side's SYN
/// reaches the peer's NAT. The server hands out both offers at once: they reach the peer
/// half its round trip to the server after the server sent them, and this side half its own
/// round trip after. So the peer starts later by half the difference when its round trip
/// is the longer (this side's SYN still has the way to the peer to go, which is left as
/// slack), plus a margin for the peer's own work and the round trips' measurement (a tenth
/// of the larger, at least [`DIAL_MARGIN`]).
fn dial_delay(mine: Duration, peer: Duration) -> Duration {
    peer.saturating_sub(mine) / 2 + DIAL_MARGIN.max(mine.max(peer) / 10)
}

/// Accepts connections and hands them on, except those from an endpoint of `refused` (the
/// ones this port primes towards, when a router in front tracks the primed sockets): those are
/// reset at once (see the module documentation).
async fn accept_loop(
    listener: TcpListener,
    refused: Vec<SocketAddr>,
    tx: mpsc::Sender<RawLink<TcpStream>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                if refused.contains(&nettool_core::candidates::canonical(remote)) {
                    debug!(%remote, "reset: a primed endpoint reached the listener, not the primed socket");
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                    continue;
                }
                trace!(%remote, "accepted");
                if send_tcp(&tx, stream).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn summary(mapping: Mapping, filtering: Filtering) -> NatSummary {
        NatSummary {
            udp_mapping: mapping,
            udp_filtering: filtering,
            tcp_mapping: mapping,
            port_mapping: false,
            udp_blocked: false,
        }
    }

    /// Equal round trips: only the margin; a peer farther from the server starts later by
    /// half the difference.
    #[test]
    fn the_dial_waits_for_the_peer_that_hears_the_offers_later() {
        let ms = Duration::from_millis;
        assert_eq!(dial_delay(ms(100), ms(100)), ms(10));
        assert_eq!(dial_delay(ms(0), ms(0)), DIAL_MARGIN);
        assert_eq!(dial_delay(ms(20), ms(200)), ms(90) + ms(20));
        assert_eq!(dial_delay(ms(200), ms(20)), ms(20));
    }

    #[test]
    fn only_no_nat_and_no_filtering_counts_as_nothing_stateful_in_front() {
        let open = summary(Mapping::NoNat, Filtering::EndpointIndependent);
        assert!(!stateful_in_front(Some(&open)));
        assert!(stateful_in_front(None));
        assert!(stateful_in_front(Some(&NatSummary::UNKNOWN)));
        let firewall = summary(Mapping::NoNat, Filtering::AddressAndPortDependent);
        assert!(stateful_in_front(Some(&firewall)));
        let full_cone = summary(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        assert!(stateful_in_front(Some(&full_cone)));
    }

    /// A connection from a primed endpoint is reset and never handed on; one from anywhere
    /// else is.
    #[tokio::test]
    async fn the_receive_listener_resets_primed_endpoints_and_hands_on_the_rest() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let at = listener.local_addr().unwrap();
        let primed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let primed_addr = primed.local_addr().unwrap();
        drop(primed);
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(accept_loop(listener, vec![primed_addr], tx));

        let mut from_primed = start_connect(primed_addr, at, None).unwrap();
        established(&from_primed).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), from_primed.read(&mut buf))
            .await
            .expect("the reset arrives");
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{read:?}"
        );

        let other = TcpStream::connect(at).await.unwrap();
        let handed = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("handed on")
            .expect("channel open");
        assert_eq!(handed.remote, other.local_addr().unwrap());
        assert!(
            rx.try_recv().is_err(),
            "the primed endpoint was never handed on"
        );
        task.abort();
    }
}
