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
//! A server without OTHER-ADDRESS (plain RFC 5389) gives the public address, port
//! preservation, hairpinning and "no NAT"; the other tests then say `unknown`. Nothing here
//! sends to any address but the server's and the host's own mapped address.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, UdpSocket};

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
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// How long one test waits for its answer (requests are resent every quarter of it).
    /// A filtering test that gets no answer in this time counts as filtered.
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

impl DiscoverOptions {
    /// An upper bound on how long [`discover`] takes with these options.
    pub fn time_bound(&self) -> Duration {
        // Three round-trip samples, then alongside each other: mapping II + III + hairpin;
        // filtering; TCP (three connections, each connect and answer within one timeout).
        self.test_timeout * (3 + 3)
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
    rtt: Duration,
}

/// Sends `request` to `to` from `socket`, resending every quarter of `timeout`, and returns the
/// first response with its transaction id (from wherever it came: the caller checks), or
/// `None` after `timeout`. Datagrams that are not that response are skipped.
async fn transact(
    socket: &UdpSocket,
    to: SocketAddr,
    (id, request): &(TransactionId, Vec<u8>),
    timeout: Duration,
) -> Option<Answer> {
    let deadline = tokio::time::Instant::now() + timeout;
    let resend = (timeout / 4).max(Duration::from_millis(10));
    let mut buf = [0u8; 1500];
    while tokio::time::Instant::now() < deadline {
        let sent = Instant::now();
        // A send error (e.g. no route for this family) means no answer will come.
        socket.send_to(request, to).await.ok()?;
        let next = (tokio::time::Instant::now() + resend).min(deadline);
        while let Ok(got) = tokio::time::timeout_at(next, socket.recv_from(&mut buf)).await {
            // ICMP errors of earlier datagrams surface as receive errors: keep waiting.
            let Ok((n, from)) = got else { continue };
            if let Some(response) = stun::parse_response(&buf[..n], id) {
                return Some(Answer {
                    response,
                    from,
                    rtt: sent.elapsed(),
                });
            }
        }
    }
    None
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
    let answer = transact(&socket, server, &stun::binding_request(), timeout).await;
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

/// Runs every test against `server` (one address, so one family) and reports. Takes at most
/// about [`DiscoverOptions::time_bound`]; fails only when the server does not answer a plain
/// Binding request or no local socket can be opened.
pub async fn discover(
    server: SocketAddr,
    opts: &DiscoverOptions,
) -> Result<FamilyReport, DiscoveryError> {
    let family = family_name(server);
    let io_err = |source| DiscoveryError::Io { family, source };
    let t = opts.test_timeout;
    let mapping_socket = UdpSocket::bind(unspecified(server)).await.map_err(io_err)?;
    let local_ip = local_ip_towards(server).await.map_err(io_err)?;
    let local = SocketAddr::new(
        local_ip,
        mapping_socket.local_addr().map_err(io_err)?.port(),
    );

    // Test I, three times for the round trip.
    let mut first = None;
    let mut rtt = None::<Duration>;
    for _ in 0..3 {
        let answer = transact(&mapping_socket, server, &stun::binding_request(), t).await;
        // No answer within the timeout: a silent server fails after one timeout, and a lost
        // later sample just leaves fewer samples.
        let Some(answer) = answer else { break };
        if let BindingResponse::Error { code } = answer.response {
            return Err(DiscoveryError::Refused { server, code });
        }
        rtt = Some(rtt.map_or(answer.rtt, |r| r.min(answer.rtt)));
        first.get_or_insert(answer);
    }
    let Some(first) = first else {
        return Err(DiscoveryError::NoAnswer(server));
    };
    let BindingResponse::Success {
        mapped: m1,
        other_address,
        ..
    } = first.response
    else {
        // Error answers returned above; keep the compiler's exhaustiveness without a panic.
        return Err(DiscoveryError::NoAnswer(server));
    };
    let other = usable_other(server, other_address);

    let mapping = async {
        let Some(other) = other else {
            return classify_mapping(local, Some(m1), None, None).min_known();
        };
        if m1 == local {
            return Mapping::NoNat;
        }
        let ip2_p1 = SocketAddr::new(other.ip(), server.port());
        let m2 = mapped(&transact(&mapping_socket, ip2_p1, &stun::binding_request(), t).await);
        let m3 = if m2.is_some() && m2 != Some(m1) {
            mapped(&transact(&mapping_socket, other, &stun::binding_request(), t).await)
        } else {
            None
        };
        classify_mapping(local, Some(m1), m2, m3)
    };
    let filtering = async {
        let Some(other) = other else {
            return Ok(Filtering::Unknown);
        };
        let (f2, f3) = (
            UdpSocket::bind(unspecified(server)).await?,
            UdpSocket::bind(unspecified(server)).await?,
        );
        let ip1_p2 = SocketAddr::new(server.ip(), other.port());
        let (change_both, change_port) = (
            stun::binding_request_with_change(true, true),
            stun::binding_request_with_change(false, true),
        );
        let (both, port) = tokio::join!(
            transact(&f2, server, &change_both, t),
            transact(&f3, server, &change_port, t),
        );
        // An answer from the wrong place (a server that ignored CHANGE-REQUEST) or an error
        // (one that refused it) tells nothing about filtering.
        let honoured = |a: &Option<Answer>, want: SocketAddr| match a {
            None => Some(false),
            Some(Answer {
                response: BindingResponse::Success { .. },
                from,
                ..
            }) if *from == want => Some(true),
            Some(_) => None,
        };
        Ok(match (honoured(&both, other), honoured(&port, ip1_p2)) {
            (Some(true), _) => Filtering::EndpointIndependent,
            (Some(false), Some(true)) => Filtering::AddressDependent,
            (Some(false), Some(false)) => Filtering::AddressAndPortDependent,
            _ => Filtering::Unknown,
        })
    };
    let tcp = async {
        if opts.tcp {
            tcp_mapping(server, other, t).await
        } else {
            Mapping::Unknown
        }
    };
    // Hairpinning after the mapping tests (they share the socket), alongside the rest.
    let mapping_then_hairpin = async {
        let mapping = mapping.await;
        (mapping, hairpin(&mapping_socket, m1, t).await)
    };
    let ((udp_mapping, hairpinning), udp_filtering, tcp_mapping) =
        tokio::join!(mapping_then_hairpin, filtering, tcp);
    let udp_filtering = udp_filtering.map_err(io_err)?;
    let hairpinning = hairpinning.map_err(io_err)?;
    Ok(FamilyReport {
        udp_mapping,
        udp_filtering,
        tcp_mapping,
        public_addr: Some(m1.ip()),
        port_preservation: Some(m1.port() == local.port()),
        hairpinning: Some(hairpinning),
        server,
        server_other_address: other,
        rtt_ms: rtt.unwrap_or_default().as_secs_f64() * 1000.0,
    })
}

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

/// Whether a datagram from a second socket to `mapped` (the first socket's public mapping)
/// reaches the first socket.
async fn hairpin(socket: &UdpSocket, mapped: SocketAddr, timeout: Duration) -> io::Result<bool> {
    let sender = UdpSocket::bind(unspecified(mapped)).await?;
    let (id, probe) = stun::binding_request();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        // A send error (no route to our own public address) is simply "no hairpin".
        if sender.send_to(&probe, mapped).await.is_err() {
            return Ok(false);
        }
        let next = (tokio::time::Instant::now() + timeout / 3).min(deadline);
        while let Ok(got) = tokio::time::timeout_at(next, socket.recv_from(&mut buf)).await {
            let Ok((n, _)) = got else { continue };
            if stun::parse_request(&buf[..n]).is_some_and(|r| r.id == id) {
                return Ok(true);
            }
        }
    }
    Ok(false)
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
    let deadline = Instant::now() + timeout;
    let stream = tokio::time::timeout(timeout, socket.connect(to))
        .await
        .ok()?
        .ok()?;
    let local = stream.local_addr().ok()?;
    let (seen, conn) = crate::client::observe(stream, deadline).await.ok()?;
    Some((seen, local, conn))
}

/// The TCP mapping from observe connections from one local port to IP1:P1, IP2:P1, IP2:P2.
async fn tcp_mapping(server: SocketAddr, other: Option<SocketAddr>, t: Duration) -> Mapping {
    let Ok(port) = reusable_port(server).await else {
        return Mapping::Unknown;
    };
    // Connections are kept open until the end, so the NAT keeps the mapping of the port.
    let Some((t1, local, _c1)) = observe_from(port, server, t).await else {
        return Mapping::Unknown;
    };
    let Some(other) = other else {
        return classify_mapping(local, Some(t1), None, None).min_known();
    };
    if t1 == local {
        return Mapping::NoNat;
    }
    let ip2_p1 = SocketAddr::new(other.ip(), server.port());
    let second = observe_from(port, ip2_p1, t).await;
    let t2 = second.as_ref().map(|s| s.0);
    let third = if t2.is_some() && t2 != Some(t1) {
        observe_from(port, other, t).await
    } else {
        None
    };
    classify_mapping(local, Some(t1), t2, third.as_ref().map(|s| s.0))
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
    let first = transact(&socket, server, &stun::binding_request(), timeout)
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
    let udp = async { mapped(&transact(&socket, ip2_p1, &stun::binding_request(), timeout).await) };
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
