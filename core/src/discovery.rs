//! Knowing the network: NAT behaviour discovery against a STUN server (RFC 5780), per address
//! family, in bounded time.
//!
//! [`discover`] runs the tests against one server address (one family) and returns a
//! [`FamilyReport`]; [`discover_all`] runs them for the first IPv4 and the first IPv6 address
//! of a server concurrently and returns a [`NetReport`] (the JSON of `nettool netcheck`).
//!
//! - **UDP mapping** (RFC 5780 §4.3, in RFC 4787 terms): from one socket, Binding requests to
//!   IP1:P1, IP2:P1 and IP2:P2 (IP2:P2 is the server's OTHER-ADDRESS). The mapped address
//!   equal to the local address is "no NAT"; the same mapping towards IP1:P1 and IP2:P1 is
//!   endpoint-independent; the same towards IP2:P1 and IP2:P2 is address-dependent; else
//!   address-and-port-dependent.
//! - **UDP filtering** (RFC 5780 §4.4): from two fresh sockets that have only talked to
//!   IP1:P1, a request asking for the answer from IP2:P2 (change IP and port) and one asking
//!   for it from IP1:P2 (change port). The first arriving means endpoint-independent, only the
//!   second address-dependent, neither address-and-port-dependent.
//! - **TCP mapping**: observe connections (the rendezvous protocol's `observe`) from one local
//!   port (SO_REUSEADDR + SO_REUSEPORT) to IP1:P1, IP2:P1 and IP2:P2, compared the same way.
//!   Only a nettool rendezvous server speaks observe; elsewhere this is `unknown`.
//! - **Port preservation**: the mapped port equals the local port.
//! - **Hairpinning** (RFC 5780 §4.5): a datagram from a second socket to the first socket's
//!   mapped address comes back to the first socket.
//!
//! Waits follow the round trip: Test I (one Binding request) is retransmitted after 250 ms
//! and then at doubling intervals within [`DiscoverOptions::first_timeout`] (2 s), so a far
//! server or a lost datagram still answers; its round trip sets every later test's wait to
//! `max(test_timeout, 2 × rtt + 50 ms)` (sent again halfway). The filtering tests go out
//! beside Test I (their requests do not need its answer; their wait, counted from their
//! start, follows its round trip); after Test I the mapping tests (with hairpinning on the
//! same socket) and the TCP test run alongside them: behind a typical cone NAT about three
//! round trips in all (the TCP test's connect and observe after Test I), where the filtering
//! tests' silence once added a round trip more. The reported
//! round trip is the smallest over every answer, and [`discover`] stops by itself within
//! [`DiscoverOptions::time_bound`].
//!
//! A server without OTHER-ADDRESS (plain RFC 5389) gives the public address, port
//! preservation, hairpinning and "no NAT"; the other tests then say `unknown`. Nothing here
//! sends to any address but the server's and the host's own mapped address.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, UdpSocket};
use tokio::sync::Notify;
use tokio::time::error::Elapsed;
use tokio::time::{timeout_at, Instant};

use crate::stun::{self, BindingResponse, TransactionId};

/// How a NAT maps one local address and port to public ones (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// The server saw the local address itself: no NAT on the path.
    NoNat,
    /// One public mapping for every destination.
    EndpointIndependent,
    /// A mapping per destination IP address.
    AddressDependent,
    /// A mapping per destination IP address and port ("symmetric NAT").
    AddressAndPortDependent,
    /// Not measured or not measurable (no answer; a server without RFC 5780 or observe).
    Unknown,
}

/// Which inbound packets a NAT or firewall lets through to a mapping (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// From anyone ("full cone", or no filtering at all).
    EndpointIndependent,
    /// Only from IP addresses the mapping has sent to.
    AddressDependent,
    /// Only from addresses and ports the mapping has sent to.
    AddressAndPortDependent,
    /// Not measured or not measurable (a server without RFC 5780, or without CHANGE-REQUEST).
    Unknown,
}

/// What was found out about one address family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamilyReport {
    /// UDP mapping behaviour.
    pub udp_mapping: Mapping,
    /// UDP filtering behaviour.
    pub udp_filtering: Filtering,
    /// TCP mapping behaviour.
    pub tcp_mapping: Mapping,
    /// The public IP address the server saw (UDP).
    pub public_addr: Option<IpAddr>,
    /// Whether the NAT kept the local UDP port as the public port (true without NAT).
    pub port_preservation: Option<bool>,
    /// Whether a datagram to the host's own public mapping comes back to it.
    pub hairpinning: Option<bool>,
    /// The server address the tests ran against.
    pub server: SocketAddr,
    /// The server's OTHER-ADDRESS (`null` for a server without RFC 5780).
    pub server_other_address: Option<SocketAddr>,
    /// The smallest STUN round trip to the server, in milliseconds.
    pub rtt_ms: f64,
}

/// The whole `netcheck` answer: both families, then what applies to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetReport {
    /// IPv4 (`null` when the server has no IPv4 address or did not answer over IPv4).
    pub ipv4: Option<FamilyReport>,
    /// IPv6 (`null` when the server has no IPv6 address or did not answer over IPv6).
    pub ipv6: Option<FamilyReport>,
    /// Port-mapping protocols the gateway answered (`upnp`, `nat-pmp`, `pcp`); empty when
    /// none did or the gateway was not asked (see `port_mapping_probe`).
    pub port_mapping: Vec<String>,
    /// The gateway probe (`netcheck --portmap`): protocols tried and answered, the gateway,
    /// its external address, why the others did not answer; null when not asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mapping_probe: Option<crate::port_mapping::Discovery>,
    /// The smallest round trip to the server over any family, in milliseconds.
    pub server_rtt_ms: Option<f64>,
}

/// Knobs of a discovery run.
///
/// Waits follow the round trip: Test I (the first Binding request) waits up to
/// [`Self::first_timeout`], retransmitting after 250 ms and then at doubling intervals
/// (RFC 5389 §7.2.1, shortened); every later test waits [`Self::timeout_for`] the measured
/// round trip, `max(test_timeout, 2 × rtt + 50 ms)`, sending again halfway. [`discover`]
/// enforces its own deadline, just inside [`Self::time_bound`].
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// The shortest wait of one test for its answer (the floor of the round-trip-derived
    /// wait; requests are sent again halfway). A filtering test that gets no answer in its
    /// wait counts as filtered.
    pub test_timeout: Duration,
    /// Whether to measure the TCP mapping with observe connections.
    pub tcp: bool,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        Self {
            test_timeout: Duration::from_secs(1),
            tcp: true,
        }
    }
}

/// The first retransmission interval of Test I; each later one doubles (0, 250, 750, 1750 ms
/// within the default two seconds).
const FIRST_RTO: Duration = Duration::from_millis(250);
/// What a test's wait adds to two round trips.
const WAIT_SLACK: Duration = Duration::from_millis(50);
/// How much earlier than [`DiscoverOptions::time_bound`] [`discover`] stops by itself, so a
/// caller's timeout of that bound never cuts off a report that is about to come.
const BOUND_GRACE: Duration = Duration::from_millis(100);

impl DiscoverOptions {
    /// Test I's wait at least (longer only when `test_timeout` is): a server at a 600 ms
    /// round trip, or one whose first answer was lost, still answers within it.
    pub const FIRST_TIMEOUT: Duration = Duration::from_secs(2);
    /// The round trip [`Self::time_bound`] is sized for: up to it no test is cut short.
    pub const DESIGN_RTT: Duration = Duration::from_millis(600);

    /// How long Test I (the first Binding request, with its retransmissions) waits.
    pub fn first_timeout(&self) -> Duration {
        self.test_timeout.max(Self::FIRST_TIMEOUT)
    }

    /// How long each later test waits, given the server's round trip: two round trips and
    /// 50 ms (an answer to the request sent again halfway still fits), at least
    /// `test_timeout`.
    pub fn timeout_for(&self, rtt: Duration) -> Duration {
        self.test_timeout
            .max(rtt.saturating_mul(2).saturating_add(WAIT_SLACK))
    }

    /// An upper bound on how long [`discover`] takes with these options, whatever the
    /// server does: discover stops by itself just before it (tests it cuts short say
    /// `unknown`), and up to a [`Self::DESIGN_RTT`] round trip it cuts nothing.
    pub fn time_bound(&self) -> Duration {
        self.budget() + BOUND_GRACE
    }

    /// Discover's own deadline after its start: Test I, then alongside each other mapping
    /// II then III (one wait each) with hairpinning (one wait), filtering (one wait) and TCP
    /// (two rounds of observe connections, each connect and answer within a wait and a round
    /// trip), all at the design round trip.
    fn budget(&self) -> Duration {
        let t = self.timeout_for(Self::DESIGN_RTT);
        self.first_timeout() + 2 * (t + Self::DESIGN_RTT)
    }
}

/// Why discovery could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The server never answered a plain Binding request.
    #[error("no STUN answer from {0} (is it a STUN server, and is UDP to it open?)")]
    NoAnswer(SocketAddr),
    /// The server answered with an error response.
    #[error("STUN server {server} answered a plain Binding request with error {code}")]
    Refused {
        /// The server.
        server: SocketAddr,
        /// The STUN error code.
        code: u16,
    },
    /// A local socket could not be opened or used.
    #[error("local socket for {family}: {source}")]
    Io {
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn family_name(addr: SocketAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn unspecified(addr: SocketAddr) -> SocketAddr {
    let ip = match addr {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// One answered STUN transaction.
struct Answer {
    response: BindingResponse,
    from: SocketAddr,
    /// From the sending of the request this answers to the answer.
    rtt: Duration,
}

/// When a transaction sends its request (offsets from its start) and how long it waits in
/// all.
#[derive(Debug, Clone)]
struct Schedule {
    sends: Vec<Duration>,
    wait: Duration,
}

impl Schedule {
    /// Test I's: at once, after [`FIRST_RTO`], then at doubling intervals, within `wait`.
    fn backoff(wait: Duration) -> Self {
        let mut sends = vec![Duration::ZERO];
        let (mut at, mut rto) = (FIRST_RTO, FIRST_RTO);
        while at < wait {
            sends.push(at);
            rto *= 2;
            at += rto;
        }
        Self { sends, wait }
    }

    /// A later test's: at once and again halfway through `wait` (guards against one lost
    /// datagram; an answer to the second request still comes within a wait of two round
    /// trips).
    fn halfway(wait: Duration) -> Self {
        Self {
            sends: vec![Duration::ZERO, wait / 2],
            wait,
        }
    }

    /// Every quarter of `wait` (at least every 10 ms): for the one-shot checks
    /// ([`public_address`], [`quick_check`]) that take a fixed timeout.
    fn every_quarter(wait: Duration) -> Self {
        let step = (wait / 4).max(Duration::from_millis(10));
        let sends = (0u32..)
            .map(|i| step * i)
            .take_while(|at| at.is_zero() || *at < wait)
            .collect();
        Self { sends, wait }
    }
}

/// Sends a request made by `request` to `to` from `socket` at the times of `schedule`, and
/// returns the first response to any of them (from wherever it came: the caller checks), or
/// `None` after the schedule's wait. Every transmission carries a fresh transaction id, so
/// the answer tells which one it answers and its round trip is exact even when an earlier
/// datagram was lost or late (Karn's ambiguity); a Binding request is idempotent, so to the
/// server each is simply a request. Datagrams that are not such a response are skipped, but
/// the hairpin probe `hairpin` watches for is noted.
async fn transact(
    socket: &UdpSocket,
    to: SocketAddr,
    request: impl Fn() -> (TransactionId, Vec<u8>),
    schedule: &Schedule,
    hairpin: Option<&HairpinWatch>,
) -> Option<Answer> {
    let start = Instant::now();
    let deadline = start + schedule.wait;
    let mut sent: Vec<(TransactionId, Instant)> = Vec::with_capacity(schedule.sends.len());
    let mut buf = [0u8; 1500];
    for (i, _) in schedule.sends.iter().enumerate() {
        let (id, bytes) = request();
        let at = Instant::now();
        // A send error (e.g. no route for this family) means no answer will come.
        socket.send_to(&bytes, to).await.ok()?;
        sent.push((id, at));
        let next = schedule
            .sends
            .get(i + 1)
            .map_or(deadline, |n| (start + *n).min(deadline));
        if let Some(answer) = answer_until(socket, &sent, next, hairpin, &mut buf).await {
            return Some(answer);
        }
    }
    None
}

/// The first response to any of the requests `sent` arriving on `socket` before `until`
/// (`None` then). Datagrams that are not such a response are skipped, but the hairpin probe
/// `hairpin` watches for is noted.
async fn answer_until(
    socket: &UdpSocket,
    sent: &[(TransactionId, Instant)],
    until: Instant,
    hairpin: Option<&HairpinWatch>,
    buf: &mut [u8],
) -> Option<Answer> {
    while let Ok(got) = timeout_at(until, socket.recv_from(buf)).await {
        // ICMP errors of earlier datagrams surface as receive errors: keep waiting.
        let Ok((n, from)) = got else { continue };
        let packet = &buf[..n];
        if hairpin.is_some_and(|w| w.saw(packet)) {
            continue;
        }
        for (id, at) in sent {
            if let Some(response) = stun::parse_response(packet, id) {
                return Some(Answer {
                    response,
                    from,
                    rtt: at.elapsed(),
                });
            }
        }
    }
    None
}

/// What Test I told the tests sent beside it: its round trip and the server's usable other
/// address (`None` until it answered; the sender goes away when it never does).
type FirstSeen = Option<(Duration, Option<SocketAddr>)>;

/// A filtering test sent at once, beside Test I rather than after it: the request goes out
/// at its start; once Test I's round trip is known the test waits
/// [`DiscoverOptions::timeout_for`] that round trip from its start, sending again halfway
/// (as [`Schedule::halfway`]; when Test I comes later than that, at once, with half a wait
/// left for the answer). `None`: no answer within the wait, or Test I never answered.
async fn transact_beside_first(
    socket: &UdpSocket,
    to: SocketAddr,
    request: impl Fn() -> (TransactionId, Vec<u8>),
    mut first: tokio::sync::watch::Receiver<FirstSeen>,
    opts: &DiscoverOptions,
) -> Option<Answer> {
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    let mut sent: Vec<(TransactionId, Instant)> = Vec::with_capacity(2);
    let send = |sent: &mut Vec<_>| {
        let (id, bytes) = request();
        sent.push((id, Instant::now()));
        bytes
    };
    let bytes = send(&mut sent);
    socket.send_to(&bytes, to).await.ok()?;
    // Until Test I answers, an answer to this test is taken as it comes.
    let rtt = {
        let known = first.wait_for(Option::is_some);
        tokio::pin!(known);
        loop {
            tokio::select! {
                known = &mut known => match known {
                    Ok(seen) => break (*seen).map(|(rtt, _)| rtt)?,
                    Err(_) => return None,
                },
                got = socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = got else { continue };
                    for (id, at) in &sent {
                        if let Some(response) = stun::parse_response(&buf[..n], id) {
                            return Some(Answer { response, from, rtt: at.elapsed() });
                        }
                    }
                }
            }
        }
    };
    let t = opts.timeout_for(rtt);
    if let Some(answer) = answer_until(socket, &sent, start + t / 2, None, &mut buf).await {
        return Some(answer);
    }
    let bytes = send(&mut sent);
    socket.send_to(&bytes, to).await.ok()?;
    // A late Test I (its first request lost) leaves the second request half a wait too.
    let until = (start + t).max(Instant::now() + t / 2);
    answer_until(socket, &sent, until, None, &mut buf).await
}

/// The hairpinning probe (a Binding request from a second socket to the first socket's
/// mapped address), which the first socket watches for while it runs the mapping tests.
struct HairpinWatch {
    id: TransactionId,
    probe: Vec<u8>,
    seen: AtomicBool,
    arrived: Notify,
}

impl HairpinWatch {
    fn new() -> Self {
        let (id, probe) = stun::binding_request();
        Self {
            id,
            probe,
            seen: AtomicBool::new(false),
            arrived: Notify::new(),
        }
    }

    fn seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }

    /// Whether `packet` is the probe (and notes it).
    fn saw(&self, packet: &[u8]) -> bool {
        let hit = stun::parse_request(packet).is_some_and(|r| r.id == self.id);
        if hit {
            self.seen.store(true, Ordering::Relaxed);
            self.arrived.notify_one();
        }
        hit
    }
}

/// The smallest round trip seen so far (shared by the tests that run alongside each other).
struct MinRtt(AtomicU64);

impl MinRtt {
    fn new(first: Duration) -> Self {
        Self(AtomicU64::new(nanos(first)))
    }

    fn note(&self, answer: &Option<Answer>) {
        if let Some(a) = answer {
            self.0.fetch_min(nanos(a.rtt), Ordering::Relaxed);
        }
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The mapped address of a success answer.
fn mapped(answer: &Option<Answer>) -> Option<SocketAddr> {
    match answer {
        Some(Answer {
            response: BindingResponse::Success { mapped, .. },
            ..
        }) => Some(*mapped),
        _ => None,
    }
}

/// The public address `server` sees for a fresh local UDP socket: one Binding transaction (the
/// cheap first step of discovery, also what a cache of its results is keyed by).
pub async fn public_address(
    server: SocketAddr,
    timeout: Duration,
) -> Result<SocketAddr, DiscoveryError> {
    let family = family_name(server);
    let socket = UdpSocket::bind(unspecified(server))
        .await
        .map_err(|source| DiscoveryError::Io { family, source })?;
    let answer = transact(
        &socket,
        server,
        stun::binding_request,
        &Schedule::every_quarter(timeout),
        None,
    )
    .await;
    mapped(&answer).ok_or(DiscoveryError::NoAnswer(server))
}

/// The local IP address the host uses towards `server` (a connected UDP socket's address;
/// nothing is sent).
async fn local_ip_towards(server: SocketAddr) -> io::Result<IpAddr> {
    let probe = UdpSocket::bind(unspecified(server)).await?;
    probe.connect(server).await?;
    Ok(probe.local_addr()?.ip())
}

/// Classifies a mapping from the mapped addresses towards IP1:P1, IP2:P1 and IP2:P2.
fn classify_mapping(
    local: SocketAddr,
    m1: Option<SocketAddr>,
    m2: Option<SocketAddr>,
    m3: Option<SocketAddr>,
) -> Mapping {
    let Some(m1) = m1 else {
        return Mapping::Unknown;
    };
    if m1 == local {
        return Mapping::NoNat;
    }
    match (m2, m3) {
        (Some(m2), _) if m2 == m1 => Mapping::EndpointIndependent,
        (Some(m2), Some(m3)) if m3 == m2 => Mapping::AddressDependent,
        (Some(_), Some(_)) => Mapping::AddressAndPortDependent,
        _ => Mapping::Unknown,
    }
}

/// The server's other address if it is usable for the tests: same family, another IP and
/// another port than the main address.
fn usable_other(server: SocketAddr, other: Option<SocketAddr>) -> Option<SocketAddr> {
    other.filter(|o| {
        o.is_ipv4() == server.is_ipv4() && o.ip() != server.ip() && o.port() != server.port()
    })
}

/// Runs every test against `server` (one address, so one family) and reports. Returns
/// within [`DiscoverOptions::time_bound`] (tests its own deadline cuts short say `unknown`);
/// fails only when the server does not answer a plain Binding request or no local socket can
/// be opened.
///
/// The two filtering tests start beside Test I, which runs once (its answer gives the first
/// round-trip sample and the waits of the other tests); then, alongside each other: mapping
/// test II (then III if needed) from Test I's socket while that socket also watches for the
/// hairpinning probe; the TCP mapping (IP1:P1, IP2:P1 and IP2:P2 at once). The reported
/// round trip is the smallest over every answer.
pub async fn discover(
    server: SocketAddr,
    opts: &DiscoverOptions,
) -> Result<FamilyReport, DiscoveryError> {
    discover_noting(server, opts, None).await
}

/// [`discover`], setting `answered` as soon as Test I is answered: a caller that cannot wait
/// for the whole run can still tell a network where UDP gets answers from one where it
/// does not.
pub async fn discover_noting(
    server: SocketAddr,
    opts: &DiscoverOptions,
    answered: Option<&std::sync::atomic::AtomicBool>,
) -> Result<FamilyReport, DiscoveryError> {
    let start = Instant::now();
    let end = start + opts.budget();
    let family = family_name(server);
    let io_err = |source| DiscoveryError::Io { family, source };
    let mapping_socket = UdpSocket::bind(unspecified(server)).await.map_err(io_err)?;
    let local_ip = local_ip_towards(server).await.map_err(io_err)?;
    let local = SocketAddr::new(
        local_ip,
        mapping_socket.local_addr().map_err(io_err)?.port(),
    );

    // The filtering tests go out beside Test I (their requests do not depend on its
    // answer; their wait follows its round trip): a test that must wait out silence then
    // ends a round trip sooner.
    let (first_seen, seen) = tokio::sync::watch::channel::<FirstSeen>(None);
    let rtt = MinRtt::new(opts.first_timeout());
    let filtering = async {
        let (f2, f3) = (
            UdpSocket::bind(unspecified(server)).await?,
            UdpSocket::bind(unspecified(server)).await?,
        );
        let (both, port) = tokio::join!(
            timeout_at(
                end,
                transact_beside_first(
                    &f2,
                    server,
                    || stun::binding_request_with_change(true, true),
                    seen.clone(),
                    opts,
                )
            ),
            timeout_at(
                end,
                transact_beside_first(
                    &f3,
                    server,
                    || stun::binding_request_with_change(false, true),
                    seen.clone(),
                    opts,
                )
            ),
        );
        for answer in [&both, &port].into_iter().flatten() {
            rtt.note(answer);
        }
        // Answers can come before Test I's (nearby, an open filter): what they mean needs
        // the other address Test I brings.
        let other = match seen.clone().wait_for(Option::is_some).await {
            Ok(first) => (*first).and_then(|(_, other)| other),
            Err(_) => None,
        };
        let Some(other) = other else {
            return Ok(Filtering::Unknown);
        };
        let ip1_p2 = SocketAddr::new(server.ip(), other.port());
        // An answer from the wrong place (a server that ignored CHANGE-REQUEST) or an error
        // (one that refused it) tells nothing about filtering; nor does a test the deadline
        // cut short (silence only counts after the whole wait).
        let honoured = |a: &Result<Option<Answer>, Elapsed>, want: SocketAddr| match a {
            Err(_) => None,
            Ok(None) => Some(false),
            Ok(Some(Answer {
                response: BindingResponse::Success { .. },
                from,
                ..
            })) if *from == want => Some(true),
            Ok(Some(_)) => None,
        };
        Ok::<_, io::Error>(match (honoured(&both, other), honoured(&port, ip1_p2)) {
            (Some(true), _) => Filtering::EndpointIndependent,
            (Some(false), Some(true)) => Filtering::AddressDependent,
            (Some(false), Some(false)) => Filtering::AddressAndPortDependent,
            _ => Filtering::Unknown,
        })
    };
    let (rest, udp_filtering) = tokio::join!(
        after_first(
            server,
            opts,
            (&mapping_socket, local, end),
            first_seen,
            answered,
            &rtt
        ),
        filtering
    );
    let (m1, other, (udp_mapping, hairpinning), tcp_mapping) = rest?;
    let udp_filtering = udp_filtering.map_err(io_err)?;
    Ok(FamilyReport {
        udp_mapping,
        udp_filtering,
        tcp_mapping,
        public_addr: Some(m1.ip()),
        port_preservation: Some(m1.port() == local.port()),
        hairpinning,
        server,
        server_other_address: other,
        rtt_ms: rtt.get().as_secs_f64() * 1000.0,
    })
}

/// Test I, then the mapping tests (with hairpinning on Test I's socket) and the TCP mapping:
/// Test I's mapped address, the server's usable other address, the UDP mapping and
/// hairpinning, the TCP mapping. Test I's round trip and the other address go to `seen` the
/// moment it answers (the filtering tests wait on it).
async fn after_first(
    server: SocketAddr,
    opts: &DiscoverOptions,
    (mapping_socket, local, end): (&UdpSocket, SocketAddr, Instant),
    seen: tokio::sync::watch::Sender<FirstSeen>,
    answered: Option<&std::sync::atomic::AtomicBool>,
    rtt: &MinRtt,
) -> Result<FirstResults, DiscoveryError> {
    let family = family_name(server);
    let io_err = |source| DiscoveryError::Io { family, source };
    // Test I, once: retransmitted within the generous first wait (a far server, a lost
    // datagram).
    let first = transact(
        mapping_socket,
        server,
        stun::binding_request,
        &Schedule::backoff(opts.first_timeout()),
        None,
    )
    .await
    .ok_or(DiscoveryError::NoAnswer(server))?;
    if let Some(a) = answered {
        a.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let (m1, other_address) = match first.response {
        BindingResponse::Success {
            mapped,
            other_address,
            ..
        } => (mapped, other_address),
        BindingResponse::Error { code } => return Err(DiscoveryError::Refused { server, code }),
    };
    let other = usable_other(server, other_address);
    seen.send_replace(Some((first.rtt, other)));
    rtt.note(&Some(first));
    let first_rtt = rtt.get();
    // Every later wait follows Test I's round trip.
    let t = opts.timeout_for(first_rtt);
    let resend_halfway = Schedule::halfway(t);
    let phase_start = Instant::now();

    // Mapping II and III share Test I's socket with the hairpinning test: the socket's one
    // reader notes the probe while it waits for the mapping answers, then waits out the
    // hairpinning test's wait if the probe has not come yet.
    let hairpin = HairpinWatch::new();
    // The probe only goes as far as this side's NAT and back (never further than the
    // server): half a wait, so a NAT that does not hairpin does not make this test the
    // last to end.
    let hairpin_wait = t / 2;
    let hairpin_until = phase_start + hairpin_wait;
    let mapping = async {
        let Some(other) = other else {
            return classify_mapping(local, Some(m1), None, None).min_known();
        };
        if m1 == local {
            return Mapping::NoNat;
        }
        let ip2_p1 = SocketAddr::new(other.ip(), server.port());
        let test = |to| {
            timeout_at(
                end,
                transact(
                    mapping_socket,
                    to,
                    stun::binding_request,
                    &resend_halfway,
                    Some(&hairpin),
                ),
            )
        };
        // Cut short by the deadline: no answer, so the class is unknown.
        let a2 = test(ip2_p1).await.ok().flatten();
        rtt.note(&a2);
        let m2 = mapped(&a2);
        let m3 = if m2.is_some() && m2 != Some(m1) {
            let a3 = test(other).await.ok().flatten();
            rtt.note(&a3);
            mapped(&a3)
        } else {
            None
        };
        classify_mapping(local, Some(m1), m2, m3)
    };
    let mapping_and_hairpin = async {
        let mapping = mapping.await;
        wait_for_hairpin(mapping_socket, &hairpin, hairpin_until.min(end)).await;
        let hairpinning = if hairpin.seen() {
            Some(true)
        } else if hairpin_until <= end {
            Some(false)
        } else {
            None
        };
        (mapping, hairpinning)
    };
    let hairpin_probes = send_hairpin_probes(&hairpin, m1, hairpin_wait);
    let tcp = async {
        if opts.tcp {
            // A connect and an observe answer: two round trips, within a wait and one more.
            timeout_at(end, tcp_mapping(server, other, t + first_rtt))
                .await
                .unwrap_or(Mapping::Unknown)
        } else {
            Mapping::Unknown
        }
    };
    let (mapping_and_hairpin, probes, tcp_mapping) =
        tokio::join!(mapping_and_hairpin, hairpin_probes, tcp);
    probes.map_err(io_err)?;
    Ok((m1, other, mapping_and_hairpin, tcp_mapping))
}

/// What [`after_first`] found.
type FirstResults = (
    SocketAddr,
    Option<SocketAddr>,
    (Mapping, Option<bool>),
    Mapping,
);

impl Mapping {
    /// Without RFC 5780 only "no NAT" can be told apart; anything else is unknown.
    fn min_known(self) -> Self {
        if self == Self::NoNat {
            self
        } else {
            Self::Unknown
        }
    }
}

/// Sends the hairpinning probe from a second socket to `mapped` (the first socket's public
/// mapping) three times within `wait`, stopping once the first socket has seen it.
async fn send_hairpin_probes(
    watch: &HairpinWatch,
    mapped: SocketAddr,
    wait: Duration,
) -> io::Result<()> {
    let sender = UdpSocket::bind(unspecified(mapped)).await?;
    let start = Instant::now();
    for i in 1..=3u32 {
        // A send error (no route to our own public address) is simply "no hairpin".
        if watch.seen() || sender.send_to(&watch.probe, mapped).await.is_err() || i == 3 {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(start + wait * i / 3) => {}
            () = watch.arrived.notified() => break,
        }
    }
    Ok(())
}

/// Reads `socket` until the hairpinning probe arrives or `until`.
async fn wait_for_hairpin(socket: &UdpSocket, watch: &HairpinWatch, until: Instant) {
    let mut buf = [0u8; 1500];
    while !watch.seen() {
        match timeout_at(until, socket.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                watch.saw(&buf[..n]);
            }
            Ok(Err(_)) => {}
            Err(_) => break,
        }
    }
}

/// The address one observe connection from `local_port` to `to` is seen from, and the local
/// address it used.
async fn observe_from(
    local_port: u16,
    to: SocketAddr,
    timeout: Duration,
) -> Option<(
    SocketAddr,
    SocketAddr,
    crate::protocol::FramedConn<tokio::net::TcpStream>,
)> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .ok()?;
    socket.set_reuseaddr(true).ok()?;
    #[cfg(unix)]
    socket.set_reuseport(true).ok()?;
    socket
        .bind(SocketAddr::new(unspecified(to).ip(), local_port))
        .ok()?;
    let deadline = std::time::Instant::now() + timeout;
    let stream = tokio::time::timeout(timeout, socket.connect(to))
        .await
        .ok()?
        .ok()?;
    let local = stream.local_addr().ok()?;
    let (seen, conn) = crate::client::observe(stream, deadline).await.ok()?;
    Some((seen, local, conn))
}

/// The TCP mapping from observe connections from one local port to IP1:P1 and IP2:P1 at the
/// same time, then IP2:P2 if those two differ; each connection within `wait`.
async fn tcp_mapping(server: SocketAddr, other: Option<SocketAddr>, wait: Duration) -> Mapping {
    let Ok(port) = reusable_port(server).await else {
        return Mapping::Unknown;
    };
    let ip2_p1 = other.map(|o| SocketAddr::new(o.ip(), server.port()));
    // Connections are kept open until the end, so the NAT keeps the mapping of the port. All
    // three at once: IP2:P2 only matters when IP2:P1 saw another mapping (a NAT that maps per
    // destination), but asked only then it would cost that NAT two round trips more.
    let maybe = |to: Option<SocketAddr>| async move {
        match to {
            Some(to) => observe_from(port, to, wait).await,
            None => None,
        }
    };
    let (first, second, third) = tokio::join!(
        observe_from(port, server, wait),
        maybe(ip2_p1),
        maybe(other)
    );
    let Some((t1, local, _c1)) = first else {
        return Mapping::Unknown;
    };
    if other.is_none() {
        return classify_mapping(local, Some(t1), None, None).min_known();
    }
    if t1 == local {
        return Mapping::NoNat;
    }
    let t2 = second.as_ref().map(|s| s.0);
    let t3 = third
        .as_ref()
        .map(|s| s.0)
        .filter(|_| t2.is_some() && t2 != Some(t1));
    classify_mapping(local, Some(t1), t2, t3)
}

/// The mapped addresses one local port got towards two addresses of the server: the evidence
/// a cached mapping class is checked against ([`crate::nat_cache::verify`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingEvidence {
    /// The local address used.
    pub local: SocketAddr,
    /// The mapped address the server's main address (IP1:P1) saw.
    pub towards_server: SocketAddr,
    /// The mapped address its other IP (IP2:P1) saw at the same time (`null`: no answer).
    pub towards_other_ip: Option<SocketAddr>,
}

impl MappingEvidence {
    /// The mapping class this evidence shows (`None` without the second answer); per
    /// destination is reported as address-and-port-dependent.
    pub fn class(&self) -> Option<Mapping> {
        if self.towards_server == self.local {
            return Some(Mapping::NoNat);
        }
        let other = self.towards_other_ip?;
        Some(if other == self.towards_server {
            Mapping::EndpointIndependent
        } else {
            Mapping::AddressAndPortDependent
        })
    }

    /// In words, for reports: e.g. "mapped to 198.51.100.2:51234 and 198.51.100.2:61012".
    pub fn describe(&self) -> String {
        match (self.class(), self.towards_other_ip) {
            (Some(Mapping::NoNat), _) => format!("no NAT (seen as {})", self.local),
            (Some(Mapping::EndpointIndependent), _) => format!(
                "endpoint-independent ({} towards both server addresses)",
                self.towards_server
            ),
            (_, Some(other)) => format!(
                "per destination ({} and {} towards the two server addresses)",
                self.towards_server, other
            ),
            _ => format!(
                "{} towards the server, no second answer",
                self.towards_server
            ),
        }
    }
}

/// The result of [`quick_check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuickCheck {
    /// UDP: one socket, two Binding requests.
    pub udp: MappingEvidence,
    /// TCP: observe connections from one port (`null`: not asked, or no nettool server).
    pub tcp: Option<MappingEvidence>,
    /// The server's OTHER-ADDRESS (`null` for a server without RFC 5780).
    pub server_other: Option<SocketAddr>,
}

/// Checks the mapping in about one round trip beyond the first answer: from one UDP socket a
/// Binding request to the server, then at once one to its other IP (same port), and (with
/// `tcp`) two observe connections from one local port to the same two addresses at the same
/// time. Cheap enough to run on every connect; what a cached class is verified with.
pub async fn quick_check(
    server: SocketAddr,
    timeout: Duration,
    tcp: bool,
) -> Result<QuickCheck, DiscoveryError> {
    let family = family_name(server);
    let io_err = |source| DiscoveryError::Io { family, source };
    let socket = UdpSocket::bind(unspecified(server)).await.map_err(io_err)?;
    let local = SocketAddr::new(
        local_ip_towards(server).await.map_err(io_err)?,
        socket.local_addr().map_err(io_err)?.port(),
    );
    let schedule = Schedule::every_quarter(timeout);
    let first = transact(&socket, server, stun::binding_request, &schedule, None)
        .await
        .ok_or(DiscoveryError::NoAnswer(server))?;
    let (m1, other) = match first.response {
        BindingResponse::Success {
            mapped,
            other_address,
            ..
        } => (mapped, usable_other(server, other_address)),
        BindingResponse::Error { code } => return Err(DiscoveryError::Refused { server, code }),
    };
    let Some(other) = other else {
        return Ok(QuickCheck {
            udp: MappingEvidence {
                local,
                towards_server: m1,
                towards_other_ip: None,
            },
            tcp: None,
            server_other: None,
        });
    };
    let ip2_p1 = SocketAddr::new(other.ip(), server.port());
    let udp =
        async { mapped(&transact(&socket, ip2_p1, stun::binding_request, &schedule, None).await) };
    let tcp_check = async {
        if !tcp {
            return None;
        }
        let port = reusable_port(server).await.ok()?;
        let (a, b) = tokio::join!(
            observe_from(port, server, timeout),
            observe_from(port, ip2_p1, timeout)
        );
        let (seen, local, _c1) = a?;
        Some(MappingEvidence {
            local,
            towards_server: seen,
            towards_other_ip: b.map(|b| b.0),
        })
    };
    let (m2, tcp) = tokio::join!(udp, tcp_check);
    Ok(QuickCheck {
        udp: MappingEvidence {
            local,
            towards_server: m1,
            towards_other_ip: m2,
        },
        tcp,
        server_other: Some(other),
    })
}

/// A free local TCP port that sockets with SO_REUSEADDR + SO_REUSEPORT can share.
async fn reusable_port(server: SocketAddr) -> io::Result<u16> {
    let s = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    #[cfg(unix)]
    s.set_reuseport(true)?;
    s.bind(unspecified(server))?;
    Ok(s.local_addr()?.port())
}

/// Runs [`discover`] for the first IPv4 and the first IPv6 address in `addrs` (concurrently).
/// A family without an address, or whose server did not answer, is `None`; the errors of the
/// families that failed are returned alongside, for the caller to show.
pub async fn discover_all(
    addrs: &[SocketAddr],
    opts: &DiscoverOptions,
) -> (NetReport, Vec<DiscoveryError>) {
    let v4 = addrs.iter().copied().find(SocketAddr::is_ipv4);
    let v6 = addrs.iter().copied().find(SocketAddr::is_ipv6);
    let run = |addr: Option<SocketAddr>| async move {
        match addr {
            Some(a) => Some(discover(a, opts).await),
            None => None,
        }
    };
    let (r4, r6) = tokio::join!(run(v4), run(v6));
    let mut errors = Vec::new();
    let mut keep = |r: Option<Result<FamilyReport, DiscoveryError>>| match r {
        Some(Ok(report)) => Some(report),
        Some(Err(e)) => {
            errors.push(e);
            None
        }
        None => None,
    };
    let ipv4 = keep(r4);
    let ipv6 = keep(r6);
    let server_rtt_ms = [&ipv4, &ipv6]
        .into_iter()
        .flatten()
        .map(|r| r.rtt_ms)
        .reduce(f64::min);
    (
        NetReport {
            ipv4,
            ipv6,
            port_mapping: Vec::new(),
            port_mapping_probe: None,
            server_rtt_ms,
        },
        errors,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    /// Where the fake server says its clients come from: a made-up public address on
    /// loopback. A datagram to it reaches the client's socket (bound to the unspecified
    /// address), so the hairpinning test sees its probe.
    const SIM_PUBLIC: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));

    /// What the fake server plays.
    #[derive(Debug, Clone, Copy)]
    struct Fake {
        /// How long every answer is held back (the round trip on loopback).
        delay: Duration,
        /// Drop the first request each client socket sends to each server socket (the first
        /// datagram of every test is lost).
        drop_first: bool,
        /// The NAT's mapping: `false` one public port for every destination, `true` another
        /// one per server socket (the port towards IP1:P1 stays the local one).
        per_destination: bool,
        /// The NAT's filtering: which change requests come back.
        filtering: Filtering,
        /// Whether requests to IP2:P2 are answered at all.
        answer_ip2_p2: bool,
        /// How much longer answers without a change request (Test I's, the mapping tests')
        /// are held back than the others.
        plain_extra_delay: Duration,
    }

    const CONE: Fake = Fake {
        delay: Duration::ZERO,
        drop_first: false,
        per_destination: false,
        filtering: Filtering::AddressDependent,
        answer_ip2_p2: true,
        plain_extra_delay: Duration::ZERO,
    };

    /// A fake RFC 5780 server on 127.0.0.1 and 127.0.0.2, ports P1 and P2 (sockets indexed
    /// 2 × ip + port, like the rendezvous server's), playing a NAT in front of the client as
    /// `fake` says; returns IP1:P1.
    async fn fake_server(fake: Fake) -> SocketAddr {
        let sockets = loop {
            let a11 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let a12 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let (p1, p2) = (
                a11.local_addr().unwrap().port(),
                a12.local_addr().unwrap().port(),
            );
            // The same ports may be taken on 127.0.0.2: try others.
            let Ok(a21) = UdpSocket::bind(("127.0.0.2", p1)).await else {
                continue;
            };
            let Ok(a22) = UdpSocket::bind(("127.0.0.2", p2)).await else {
                continue;
            };
            break [a11, a12, a21, a22].map(Arc::new);
        };
        let addrs = sockets.clone().map(|s| s.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(HashSet::new()));
        for i in 0..4 {
            let sockets = sockets.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = sockets[i].recv_from(&mut buf).await {
                    let Some(req) = stun::parse_request(&buf[..n]) else {
                        continue;
                    };
                    if fake.drop_first && seen.lock().unwrap().insert((i, from)) {
                        continue;
                    }
                    let filtered = match fake.filtering {
                        Filtering::EndpointIndependent | Filtering::Unknown => false,
                        Filtering::AddressDependent => req.change_ip,
                        Filtering::AddressAndPortDependent => req.change_ip || req.change_port,
                    };
                    if filtered || (i == 3 && !fake.answer_ip2_p2) {
                        continue;
                    }
                    let j = i ^ if req.change_ip { 2 } else { 0 } ^ usize::from(req.change_port);
                    let port = if fake.per_destination {
                        from.port().wrapping_add(i as u16)
                    } else {
                        from.port()
                    };
                    let reply = stun::success_response(
                        &req.id,
                        SocketAddr::new(SIM_PUBLIC, port),
                        Some(addrs[j]),
                        Some(addrs[i ^ 3]),
                    );
                    let out = sockets[j].clone();
                    let delay = if req.change_ip || req.change_port {
                        fake.delay
                    } else {
                        fake.delay + fake.plain_extra_delay
                    };
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = out.send_to(&reply, from).await;
                    });
                }
            });
        }
        addrs[0]
    }

    /// The orchestrator's knobs, without TCP (the fake server speaks no observe).
    fn opts() -> DiscoverOptions {
        DiscoverOptions {
            test_timeout: Duration::from_millis(250),
            tcp: false,
        }
    }

    #[test]
    fn waits_follow_the_round_trip() {
        let o = opts();
        let ms = Duration::from_millis;
        assert_eq!(o.first_timeout(), ms(2000));
        assert_eq!(o.timeout_for(ms(1)), ms(250), "test_timeout is the floor");
        assert_eq!(o.timeout_for(ms(300)), ms(650));
        assert_eq!(o.timeout_for(ms(600)), ms(1250));
        assert_eq!(
            Schedule::backoff(o.first_timeout()).sends,
            [0, 250, 750, 1750].map(ms)
        );
        assert_eq!(Schedule::halfway(ms(650)).sends, [0, 325].map(ms));
        assert_eq!(
            Schedule::every_quarter(ms(200)).sends,
            [0, 50, 100, 150].map(ms)
        );
        // Test I at 600 ms, then TCP's two rounds of (wait + round trip), with the grace.
        assert_eq!(o.time_bound(), ms(2000 + 2 * (1250 + 600) + 100));
        let lab = DiscoverOptions {
            test_timeout: ms(2000),
            tcp: true,
        };
        assert_eq!(lab.time_bound(), ms(2000 + 2 * (2000 + 600) + 100));
    }

    /// The first datagram of every test is lost: each is sent again (Test I after 250 ms,
    /// the later tests halfway through their wait), the verdicts are those of the NAT the
    /// server plays, and the round trip is that of the answered request, not from the lost
    /// one.
    /// The filtering tests go out beside Test I, so their answers may come first (an open
    /// filter nearby): they are classified once Test I brought the server's other address.
    #[tokio::test]
    async fn filtering_answers_before_test_i_still_count() {
        let server = fake_server(Fake {
            filtering: Filtering::EndpointIndependent,
            plain_extra_delay: Duration::from_millis(50),
            ..CONE
        })
        .await;
        let r = discover(server, &opts()).await.unwrap();
        assert_eq!(r.udp_filtering, Filtering::EndpointIndependent, "{r:?}");
        assert_eq!(r.udp_mapping, Mapping::EndpointIndependent, "{r:?}");
    }

    #[tokio::test]
    async fn a_lost_first_request_is_sent_again() {
        let server = fake_server(Fake {
            drop_first: true,
            ..CONE
        })
        .await;
        let r = discover(server, &opts()).await.unwrap();
        assert_eq!(r.udp_mapping, Mapping::EndpointIndependent, "{r:?}");
        assert_eq!(r.udp_filtering, Filtering::AddressDependent, "{r:?}");
        assert_eq!(r.public_addr, Some(SIM_PUBLIC), "{r:?}");
        assert_eq!(r.port_preservation, Some(true), "{r:?}");
        assert_eq!(r.hairpinning, Some(true), "{r:?}");
        assert_eq!(
            r.server_other_address.map(|o| o.ip().to_string()),
            Some("127.0.0.2".into())
        );
        assert!(r.rtt_ms < 100.0, "{r:?}");
    }

    /// Every answer comes 600 ms late (beyond the 250 ms floor of every wait): Test I waits
    /// for it, the later tests wait two round trips, the verdicts are right, the round trip
    /// is 600 ms, and it all takes about three round trips (Test I, then the filtering
    /// test's wait for the answer that does not come), within the time bound.
    #[tokio::test]
    async fn a_server_600ms_away_is_measured_in_about_three_round_trips() {
        let server = fake_server(Fake {
            delay: Duration::from_millis(600),
            ..CONE
        })
        .await;
        let o = opts();
        let start = Instant::now();
        let r = discover(server, &o).await.unwrap();
        let took = start.elapsed();
        assert_eq!(r.udp_mapping, Mapping::EndpointIndependent, "{r:?}");
        assert_eq!(r.udp_filtering, Filtering::AddressDependent, "{r:?}");
        assert_eq!(r.hairpinning, Some(true), "{r:?}");
        assert!((600.0..750.0).contains(&r.rtt_ms), "{r:?}");
        assert!(took <= o.time_bound(), "{took:?}");
        assert!(took < Duration::from_millis(2500), "{took:?}");
    }

    /// A server slower than the time bound is sized for (answers 1.9 s late, per-destination
    /// mapping, IP2:P2 and the filtering tests unanswered): discover stops by itself within
    /// the bound, and what it cut short is unknown, not a verdict.
    #[tokio::test]
    async fn discovery_stops_within_its_time_bound() {
        let server = fake_server(Fake {
            delay: Duration::from_millis(1900),
            per_destination: true,
            filtering: Filtering::AddressAndPortDependent,
            answer_ip2_p2: false,
            ..CONE
        })
        .await;
        let o = opts();
        let start = Instant::now();
        let r = discover(server, &o).await.unwrap();
        let took = start.elapsed();
        assert!(took <= o.time_bound(), "{took:?}");
        assert_eq!(r.udp_mapping, Mapping::Unknown, "{r:?}");
        // The filtering tests went out beside Test I: their whole wait (two round trips)
        // fits the bound.
        assert_eq!(r.udp_filtering, Filtering::AddressAndPortDependent, "{r:?}");
        assert!((1900.0..2000.0).contains(&r.rtt_ms), "{r:?}");
    }

    /// A server that never answers is an error after Test I's whole wait, within the bound.
    #[tokio::test]
    async fn a_silent_server_is_an_error_after_the_first_wait() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let o = opts();
        let start = Instant::now();
        let err = discover(addr, &o).await.unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(err, DiscoveryError::NoAnswer(a) if a == addr),
            "{err}"
        );
        assert!(
            took >= o.first_timeout() && took <= o.time_bound(),
            "{took:?}"
        );
    }

    fn a(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn mapping_classification_follows_rfc5780() {
        let local: SocketAddr = "10.0.1.2:4000".parse().unwrap();
        assert_eq!(
            classify_mapping(local, a("10.0.1.2:4000"), None, None),
            Mapping::NoNat
        );
        let m = a("198.51.100.2:4000");
        assert_eq!(
            classify_mapping(local, m, m, None),
            Mapping::EndpointIndependent
        );
        let m2 = a("198.51.100.2:5000");
        assert_eq!(
            classify_mapping(local, m, m2, m2),
            Mapping::AddressDependent
        );
        assert_eq!(
            classify_mapping(local, m, m2, a("198.51.100.2:6000")),
            Mapping::AddressAndPortDependent
        );
        assert_eq!(classify_mapping(local, m, None, None), Mapping::Unknown);
        assert_eq!(classify_mapping(local, None, m, m), Mapping::Unknown);
    }

    #[test]
    fn json_names_are_stable() {
        let report = NetReport {
            ipv4: Some(FamilyReport {
                udp_mapping: Mapping::AddressAndPortDependent,
                udp_filtering: Filtering::AddressDependent,
                tcp_mapping: Mapping::NoNat,
                public_addr: Some("198.51.100.2".parse().unwrap()),
                port_preservation: Some(false),
                hairpinning: None,
                server: "203.0.113.10:8877".parse().unwrap(),
                server_other_address: None,
                rtt_ms: 1.5,
            }),
            ipv6: None,
            port_mapping: Vec::new(),
            port_mapping_probe: None,
            server_rtt_ms: Some(1.5),
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.starts_with(r#"{"ipv4":{"udp_mapping":"address-and-port-dependent","udp_filtering":"address-dependent","tcp_mapping":"no-nat","public_addr":"198.51.100.2","port_preservation":false,"hairpinning":null"#), "{json}");
        assert!(
            json.ends_with(r#""ipv6":null,"port_mapping":[],"server_rtt_ms":1.5}"#),
            "{json}"
        );
        for (m, s) in [
            (Mapping::EndpointIndependent, "\"endpoint-independent\""),
            (Mapping::Unknown, "\"unknown\""),
        ] {
            assert_eq!(serde_json::to_string(&m).unwrap(), s);
        }
    }
}
