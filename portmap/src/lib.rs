//! Port mapping on the local gateway: UPnP-IGD, NAT-PMP and PCP.
//!
//! A gateway that maps a port on request makes a host behind it reachable from anywhere, even
//! behind a NAT that maps per destination. This crate is the narrow client nettool needs:
//!
//! - [`PortMapper::discover`] asks the gateway, over the protocols allowed, which of them it
//!   answers, all at once and within one short timeout (SSDP M-SEARCH for UPnP-IGD, an
//!   external-address request for NAT-PMP, a harmless PCP delete for PCP);
//! - [`PortMapper::map`] maps a local TCP or UDP port with the first protocol that answered, in
//!   the caller's order of preference, and keeps the mapping alive (renewed at half its lease);
//! - [`PortMapper::release_all`] deletes every mapping it made (link end, signals).
//!
//! Nothing here sends a packet until `discover` is called: a caller with mapping off never
//! builds a [`PortMapper`]. The protocol work is done by maintained crates: `igd-next` (UPnP)
//! and `crab_nat` (NAT-PMP, PCP).
//!
//! [`PortMapper`] implements `nettool-core`'s [`PortMapping`], through which the orchestrator
//! and the strategies use it; the plain data in reports ([`Discovery`], [`MappedPort`],
//! [`Protocol`], [`Transport`]) is defined in `nettool_core::port_mapping` and re-exported here.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crab_nat::{natpmp, pcp, InternetProtocol, PortMappingOptions, TimeoutConfig};
use igd_next::aio::tokio::Tokio;
use tracing::{debug, info, warn};

pub use nettool_core::port_mapping::{
    Discovery, MappedPort, PortMapping, Protocol, Transport, UnknownProtocol,
};

/// A [`Transport`] as each protocol crate spells it.
trait TransportExt {
    fn igd(self) -> igd_next::PortMappingProtocol;
    fn crab(self) -> InternetProtocol;
}

impl TransportExt for Transport {
    fn igd(self) -> igd_next::PortMappingProtocol {
        match self {
            Self::Tcp => igd_next::PortMappingProtocol::TCP,
            Self::Udp => igd_next::PortMappingProtocol::UDP,
        }
    }

    fn crab(self) -> InternetProtocol {
        match self {
            Self::Tcp => InternetProtocol::Tcp,
            Self::Udp => InternetProtocol::Udp,
        }
    }
}

/// How to look for a gateway and map ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The protocols to use, in order of preference (the first one that answered maps).
    pub protocols: Vec<Protocol>,
    /// How long discovery waits for answers (all protocols at once).
    pub timeout: Duration,
    /// The lease asked for each mapping; it is renewed at half of what the gateway grants.
    pub lease: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            protocols: Protocol::ALL.to_vec(),
            timeout: Duration::from_secs(1),
            lease: Duration::from_secs(120),
        }
    }
}

/// Why a port could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Discovery found no gateway answering any allowed protocol.
    #[error("no gateway offers port mapping: {0}")]
    NoGateway(String),
    /// Port 0 cannot be mapped.
    #[error("cannot map port 0")]
    PortZero,
    /// Every protocol that answered refused or failed the request.
    #[error("the gateway did not map {transport} port {port}: {detail}")]
    Refused {
        /// The transport.
        transport: Transport,
        /// The local port.
        port: u16,
        /// Each protocol's error.
        detail: String,
    },
}

/// The protocol handle behind one mapping, to renew or delete it.
enum Handle {
    Upnp {
        gateway: Arc<igd_next::aio::Gateway<Tokio>>,
        local: SocketAddrV4,
    },
    Pmp(crab_nat::PortMapping),
}

struct Live {
    port: MappedPort,
    handle: Arc<tokio::sync::Mutex<Option<Handle>>>,
    renew: tokio::task::AbortHandle,
}

/// What discovery keeps for mapping.
struct Found {
    /// Where NAT-PMP/PCP requests go.
    pmp_gateway: Option<Ipv4Addr>,
    /// Our address towards the gateway (the PCP client address, UPnP's internal client).
    local_ip: Ipv4Addr,
    upnp: Option<Arc<igd_next::aio::Gateway<Tokio>>>,
    external_ip: Option<IpAddr>,
    /// The answering protocols, in order of preference.
    answered: Vec<Protocol>,
}

/// Maps ports on the gateway, renews them, deletes them. Cheap to clone (shared state).
#[derive(Clone)]
pub struct PortMapper {
    settings: Settings,
    found: Arc<Mutex<Option<Arc<Found>>>>,
    live: Arc<Mutex<Vec<Live>>>,
}

impl fmt::Debug for PortMapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortMapper")
            .field("settings", &self.settings)
            .field("live", &self.mapped())
            .finish()
    }
}

/// The retry schedule for NAT-PMP/PCP requests within `timeout`: a first try after at most a
/// quarter of it, doubling, capped at `timeout`.
fn pmp_timeouts(timeout: Duration) -> TimeoutConfig {
    TimeoutConfig {
        initial_timeout: (timeout / 4).min(Duration::from_millis(250)),
        max_retries: 3,
        max_retry_timeout: Some(timeout),
    }
}

/// The default IPv4 gateway from the kernel's route table.
fn default_gateway() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_route_table(&text)
}

fn parse_route_table(text: &str) -> Option<Ipv4Addr> {
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway ...: destination 0 is the default route.
        if fields.len() > 2 && fields[1] == "00000000" {
            let raw = u32::from_str_radix(fields[2], 16).ok()?;
            Some(Ipv4Addr::from(raw.swap_bytes())).filter(|g| !g.is_unspecified())
        } else {
            None
        }
    })
}

/// The local address the host uses towards `to` (no packet is sent).
fn local_ip_towards(to: Ipv4Addr) -> Option<Ipv4Addr> {
    let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    probe.connect((to, crab_nat::GATEWAY_PORT)).ok()?;
    match probe.local_addr().ok()?.ip() {
        IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
        _ => None,
    }
}

/// Orders `answered` by the preference in `wanted`.
fn by_preference(wanted: &[Protocol], answered: &[Protocol]) -> Vec<Protocol> {
    wanted
        .iter()
        .copied()
        .filter(|p| answered.contains(p))
        .collect()
}

impl PortMapper {
    /// A mapper with these settings. Sends nothing until [`PortMapper::discover`].
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            found: Arc::default(),
            live: Arc::default(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Asks the gateway over every allowed protocol at once, bounded by the settings'
    /// timeout, and keeps what answered for [`PortMapper::map`].
    pub async fn discover(&self) -> Discovery {
        let started = Instant::now();
        let wanted = self.settings.protocols.clone();
        let timeout = self.settings.timeout;
        let pmp_gateway = default_gateway();
        let local_ip = pmp_gateway.and_then(local_ip_towards);
        let mut errors = Vec::new();

        let upnp = async {
            if !wanted.contains(&Protocol::Upnp) {
                return None;
            }
            let options = igd_next::SearchOptions {
                bind_addr: SocketAddr::new(local_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).into(), 0),
                timeout: Some(timeout),
                single_search_timeout: Some(timeout),
                ..Default::default()
            };
            let search = async {
                let gw = igd_next::aio::tokio::search_gateway(options)
                    .await
                    .map_err(|e| format!("upnp: {e}"))?;
                let ip = gw.get_external_ip().await.ok();
                Ok::<_, String>((gw, ip))
            };
            Some(
                tokio::time::timeout(timeout, search)
                    .await
                    .unwrap_or_else(|_| Err(format!("upnp: no answer within {timeout:?}"))),
            )
        };
        let natpmp = async {
            if !wanted.contains(&Protocol::NatPmp) {
                return None;
            }
            let Some(gw) = pmp_gateway else {
                return Some(Err("nat-pmp: no default IPv4 gateway".to_owned()));
            };
            let ask = natpmp::external_address(gw.into(), Some(pmp_timeouts(timeout)));
            Some(match tokio::time::timeout(timeout, ask).await {
                Ok(Ok(ip)) => Ok(ip),
                Ok(Err(e)) => Err(format!("nat-pmp: {e}")),
                Err(_) => Err(format!("nat-pmp: no answer within {timeout:?}")),
            })
        };
        let pcp = async {
            if !wanted.contains(&Protocol::Pcp) {
                return None;
            }
            let (Some(gw), Some(client)) = (pmp_gateway, local_ip) else {
                return Some(Err("pcp: no default IPv4 gateway".to_owned()));
            };
            // A delete of a mapping that does not exist (fresh nonce, the discard port):
            // any PCP answer, success or error code, shows the gateway speaks PCP, and it
            // changes nothing on it.
            let nonce: pcp::Nonce = rand::random();
            let ask = pcp::try_drop_mapping(
                gw.into(),
                client.into(),
                nonce,
                pcp::DropMappingRange::Single {
                    protocol: InternetProtocol::Udp,
                    internal_port: NonZeroU16::new(9).expect("nonzero"),
                },
                Some(pmp_timeouts(timeout)),
            );
            Some(match tokio::time::timeout(timeout, ask).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(pcp::Failure::Timeout)) | Err(_) => {
                    Err(format!("pcp: no answer within {timeout:?}"))
                }
                Ok(Err(pcp::Failure::Socket(e))) => Err(format!("pcp: {e}")),
                Ok(Err(pcp::Failure::UnsupportedVersion(v))) => {
                    Err(format!("pcp: the gateway speaks only {v:?}"))
                }
                Ok(Err(other)) => {
                    debug!("PCP probe answered with an error code: {other}");
                    Ok(())
                }
            })
        };
        let (upnp, natpmp, pcp) = tokio::join!(upnp, natpmp, pcp);

        let mut answered = Vec::new();
        let mut external_ip = None;
        let mut upnp_gateway = None;
        match upnp {
            Some(Ok((gw, ip))) => {
                answered.push(Protocol::Upnp);
                external_ip = external_ip.or(ip);
                upnp_gateway = Some(Arc::new(gw));
            }
            Some(Err(e)) => errors.push(e),
            None => {}
        }
        match natpmp {
            Some(Ok(ip)) => {
                answered.push(Protocol::NatPmp);
                external_ip = external_ip.or(Some(IpAddr::V4(ip)));
            }
            Some(Err(e)) => errors.push(e),
            None => {}
        }
        match pcp {
            Some(Ok(())) => answered.push(Protocol::Pcp),
            Some(Err(e)) => errors.push(e),
            None => {}
        }
        let answered = by_preference(&wanted, &answered);
        let gateway = pmp_gateway
            .map(IpAddr::V4)
            .or_else(|| upnp_gateway.as_ref().map(|g| g.addr.ip()));
        let report = Discovery {
            tried: wanted,
            answered: answered.clone(),
            gateway,
            external_ip,
            errors,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        info!("port mapping: {}", report.summary());
        let found = match local_ip {
            Some(local_ip) if !answered.is_empty() => Some(Arc::new(Found {
                pmp_gateway,
                local_ip,
                upnp: upnp_gateway,
                external_ip,
                answered,
            })),
            _ => None,
        };
        *self.found.lock().expect("portmap state poisoned") = found;
        report
    }

    /// Whether discovery found a gateway that maps ports.
    pub fn available(&self) -> bool {
        self.found.lock().expect("portmap state poisoned").is_some()
    }

    /// The mappings alive now.
    pub fn mapped(&self) -> Vec<MappedPort> {
        self.live
            .lock()
            .expect("portmap state poisoned")
            .iter()
            .map(|l| l.port)
            .collect()
    }

    /// Maps `local_port` (on this host's address towards the gateway) with the first answering
    /// protocol that succeeds, and renews it at half its lease until
    /// [`PortMapper::release_all`]. The external port asked for is the local one; the gateway
    /// may pick another.
    pub async fn map(&self, transport: Transport, local_port: u16) -> Result<MappedPort, MapError> {
        let found = self
            .found
            .lock()
            .expect("portmap state poisoned")
            .clone()
            .ok_or_else(|| MapError::NoGateway("discovery found none".into()))?;
        let port = NonZeroU16::new(local_port).ok_or(MapError::PortZero)?;
        let lease = u32::try_from(self.settings.lease.as_secs())
            .unwrap_or(u32::MAX)
            .max(1);
        let mut errors = Vec::new();
        for protocol in &found.answered {
            match map_one(
                &found,
                *protocol,
                transport,
                port,
                lease,
                self.settings.timeout,
            )
            .await
            {
                Ok((mapped, handle)) => {
                    info!("port mapped: {mapped}");
                    self.keep(mapped, handle);
                    return Ok(mapped);
                }
                Err(e) => {
                    debug!("{protocol} did not map {transport} {local_port}: {e}");
                    errors.push(format!("{protocol}: {e}"));
                }
            }
        }
        Err(MapError::Refused {
            transport,
            port: local_port,
            detail: errors.join("; "),
        })
    }

    fn keep(&self, port: MappedPort, handle: Handle) {
        let handle = Arc::new(tokio::sync::Mutex::new(Some(handle)));
        let renew = tokio::spawn(renew_loop(port, handle.clone(), self.settings.timeout));
        self.live
            .lock()
            .expect("portmap state poisoned")
            .push(Live {
                port,
                handle,
                renew: renew.abort_handle(),
            });
    }

    /// Deletes every mapping made so far (stops their renewal first), each bounded by the
    /// discovery timeout; returns how many the gateway confirmed deleted.
    pub async fn release_all(&self) -> usize {
        let live = std::mem::take(&mut *self.live.lock().expect("portmap state poisoned"));
        let timeout = self.settings.timeout;
        let deletes = live.into_iter().map(|l| async move {
            l.renew.abort();
            let Some(handle) = l.handle.lock().await.take() else {
                return false;
            };
            match tokio::time::timeout(timeout * 2, delete(handle, l.port)).await {
                Ok(Ok(())) => {
                    info!("port mapping deleted: {}", l.port);
                    true
                }
                Ok(Err(e)) => {
                    warn!("deleting port mapping {}: {e}", l.port);
                    false
                }
                Err(_) => {
                    warn!("deleting port mapping {}: no answer", l.port);
                    false
                }
            }
        });
        futures_join_all(deletes).await
    }
}

/// Runs the deletes concurrently; counts the successes.
async fn futures_join_all<F: std::future::Future<Output = bool> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(f);
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        if matches!(r, Ok(true)) {
            ok += 1;
        }
    }
    ok
}

async fn map_one(
    found: &Found,
    protocol: Protocol,
    transport: Transport,
    port: NonZeroU16,
    lease: u32,
    timeout: Duration,
) -> Result<(MappedPort, Handle), String> {
    let bounded = |e: tokio::time::error::Elapsed| format!("no answer within {timeout:?}: {e}");
    match protocol {
        Protocol::Upnp => {
            let gateway = found.upnp.clone().ok_or("no UPnP gateway")?;
            let local = SocketAddrV4::new(found.local_ip, port.get());
            let ip = match found.external_ip {
                Some(ip) => ip,
                None => tokio::time::timeout(timeout, gateway.get_external_ip())
                    .await
                    .map_err(bounded)?
                    .map_err(|e| e.to_string())?,
            };
            // The same external port first (what users expect to see), else any.
            let same =
                gateway.add_port(transport.igd(), port.get(), local.into(), lease, "nettool");
            let external_port = match tokio::time::timeout(timeout, same).await {
                Ok(Ok(())) => port.get(),
                _ => {
                    let any = gateway.add_any_port(transport.igd(), local.into(), lease, "nettool");
                    tokio::time::timeout(timeout, any)
                        .await
                        .map_err(bounded)?
                        .map_err(|e| e.to_string())?
                }
            };
            let mapped = MappedPort {
                protocol,
                transport,
                local_port: port.get(),
                external: SocketAddr::new(ip, external_port),
                lease_secs: lease,
            };
            Ok((mapped, Handle::Upnp { gateway, local }))
        }
        Protocol::NatPmp | Protocol::Pcp => {
            let gw = found.pmp_gateway.ok_or("no default IPv4 gateway")?;
            let options = PortMappingOptions {
                external_port: Some(port),
                lifetime_seconds: Some(lease),
                timeout_config: Some(pmp_timeouts(timeout)),
            };
            let request = async {
                if protocol == Protocol::Pcp {
                    pcp::port_mapping(
                        pcp::BaseMapRequest::new(
                            gw.into(),
                            found.local_ip.into(),
                            transport.crab(),
                            port,
                        ),
                        None,
                        None,
                        options,
                    )
                    .await
                    .map_err(|e| e.to_string())
                } else {
                    natpmp::port_mapping(gw.into(), transport.crab(), port, options)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            let mapping = tokio::time::timeout(timeout * 2, request)
                .await
                .map_err(bounded)??;
            let ip = match mapping.mapping_type() {
                crab_nat::PortMappingType::Pcp { external_ip, .. } => Some(external_ip),
                crab_nat::PortMappingType::NatPmp => found.external_ip,
            }
            .ok_or("the gateway did not tell its external address")?;
            let mapped = MappedPort {
                protocol,
                transport,
                local_port: port.get(),
                external: SocketAddr::new(ip, mapping.external_port().get()),
                lease_secs: mapping.lifetime(),
            };
            Ok((mapped, Handle::Pmp(mapping)))
        }
    }
}

/// How long to wait before renewing a lease of `secs` seconds: half of it, at least 1 s.
fn renew_after(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs / 2).max(1))
}

async fn renew_loop(
    port: MappedPort,
    handle: Arc<tokio::sync::Mutex<Option<Handle>>>,
    timeout: Duration,
) {
    let mut lease = port.lease_secs;
    loop {
        tokio::time::sleep(renew_after(lease)).await;
        let mut guard = handle.lock().await;
        let Some(h) = guard.as_mut() else {
            return;
        };
        let renewed = match h {
            Handle::Upnp { gateway, local } => {
                let add = gateway.add_port(
                    port.transport.igd(),
                    port.external.port(),
                    (*local).into(),
                    port.lease_secs,
                    "nettool",
                );
                tokio::time::timeout(timeout, add)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map(|()| port.lease_secs)
            }
            Handle::Pmp(m) => tokio::time::timeout(timeout * 2, m.renew())
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map(|()| m.lifetime()),
        };
        match renewed {
            Ok(secs) => {
                debug!("port mapping renewed for {secs} s: {port}");
                lease = secs;
            }
            Err(e) => {
                warn!("renewing port mapping {port}: {e}");
                // Try again soon rather than after a whole half lease.
                lease = lease.min(10);
            }
        }
    }
}

async fn delete(handle: Handle, port: MappedPort) -> Result<(), String> {
    match handle {
        Handle::Upnp { gateway, .. } => gateway
            .remove_port(port.transport.igd(), port.external.port())
            .await
            .map_err(|e| e.to_string()),
        Handle::Pmp(m) => m.try_drop().await.map_err(|(e, _)| e.to_string()),
    }
}

#[async_trait::async_trait]
impl PortMapping for PortMapper {
    async fn discover(&self) -> Discovery {
        Self::discover(self).await
    }

    fn available(&self) -> bool {
        Self::available(self)
    }

    async fn map(
        &self,
        transport: Transport,
        local_port: u16,
    ) -> Result<MappedPort, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self::map(self, transport, local_port).await?)
    }

    fn mapped(&self) -> Vec<MappedPort> {
        Self::mapped(self)
    }

    async fn release_all(&self) -> usize {
        Self::release_all(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_follows_the_configured_order() {
        use Protocol::*;
        assert_eq!(
            by_preference(&[Pcp, Upnp], &[Upnp, NatPmp, Pcp]),
            [Pcp, Upnp]
        );
        assert!(by_preference(&[NatPmp], &[Upnp]).is_empty());
    }

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                     eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(parse_route_table(table), Some(Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(parse_route_table("Iface\n"), None);
    }

    #[test]
    fn renewal_comes_at_half_the_lease() {
        assert_eq!(renew_after(120), Duration::from_secs(60));
        assert_eq!(renew_after(1), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn mapping_before_discovery_sends_nothing_and_fails() {
        let m = PortMapper::new(Settings::default());
        assert!(!m.available());
        assert!(matches!(
            m.map(Transport::Udp, 4000).await,
            Err(MapError::NoGateway(_))
        ));
        assert_eq!(m.release_all().await, 0);
    }
}
