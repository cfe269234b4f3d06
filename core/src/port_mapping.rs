//! Port mapping as the orchestrator and the strategies see it: a [`PortMapping`] gives a local
//! port an externally reachable address on the gateway (UPnP-IGD, NAT-PMP, PCP), and the plain
//! data of what it found and mapped, as reports and `netcheck` show it.
//!
//! The protocol work lives in the `nettool-portmap` crate, which implements [`PortMapping`];
//! core knows only this trait, so it does not depend on any gateway protocol. The caller (the
//! CLI) builds the mapper and hands it to
//! [`Orchestrator::with_portmap`](crate::Orchestrator::with_portmap).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Gives local ports an externally reachable address on the gateway: the port mapping the
/// orchestrator and the strategies use (see [`Attempt::map_port`](crate::Attempt::map_port)).
/// Object-safe; the orchestrator holds it as `Arc<dyn PortMapping>`.
#[async_trait::async_trait]
pub trait PortMapping: fmt::Debug + Send + Sync {
    /// Asks the gateway which protocols it answers (bounded by the mapper's timeout) and keeps
    /// what answered for [`PortMapping::map`].
    async fn discover(&self) -> Discovery;

    /// Whether discovery found a gateway that maps ports.
    fn available(&self) -> bool;

    /// Maps `local_port` and keeps the mapping alive until [`PortMapping::release_all`].
    async fn map(
        &self,
        transport: Transport,
        local_port: u16,
    ) -> Result<MappedPort, Box<dyn std::error::Error + Send + Sync>>;

    /// The mappings alive now.
    fn mapped(&self) -> Vec<MappedPort>;

    /// Deletes every mapping made so far; returns how many the gateway confirmed deleted.
    async fn release_all(&self) -> usize;
}

/// A port mapping protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// UPnP Internet Gateway Device (SSDP discovery, SOAP AddPortMapping).
    Upnp,
    /// NAT Port Mapping Protocol (RFC 6886), UDP 5351 on the default gateway.
    NatPmp,
    /// Port Control Protocol (RFC 6887), UDP 5351 on the default gateway.
    Pcp,
}

impl Protocol {
    /// Every protocol, in nettool's default order of preference.
    pub const ALL: [Self; 3] = [Self::Upnp, Self::NatPmp, Self::Pcp];

    /// The name used in config files, flags and reports (`upnp`, `nat-pmp`, `pcp`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Upnp => "upnp",
            Self::NatPmp => "nat-pmp",
            Self::Pcp => "pcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The error of parsing an unknown [`Protocol`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown port mapping protocol {0:?} (expected one of: upnp, nat-pmp, pcp)")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownProtocol(s.to_owned()))
    }
}

/// The transport of a mapped port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// What discovery found, for reports and `netcheck`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// The protocols asked, in order.
    pub tried: Vec<Protocol>,
    /// The protocols the gateway answered, in the order of `tried`.
    pub answered: Vec<Protocol>,
    /// The gateway NAT-PMP and PCP were sent to (the default IPv4 route's gateway), or the
    /// UPnP device's address when only UPnP was tried.
    pub gateway: Option<IpAddr>,
    /// The gateway's external address, as the first answering protocol told it.
    pub external_ip: Option<IpAddr>,
    /// Why each protocol that was tried did not answer.
    pub errors: Vec<String>,
    /// How long discovery took, in milliseconds.
    pub elapsed_ms: u64,
}

impl Discovery {
    /// One line for humans: which protocols answered, or that none did and why.
    pub fn summary(&self) -> String {
        if self.answered.is_empty() {
            format!(
                "no gateway answered ({}) within {} ms{}",
                names(&self.tried),
                self.elapsed_ms,
                if self.errors.is_empty() {
                    String::new()
                } else {
                    format!(": {}", self.errors.join("; "))
                }
            )
        } else {
            format!(
                "gateway {} answers {} (external address {})",
                self.gateway.map_or_else(|| "?".into(), |g| g.to_string()),
                names(&self.answered),
                self.external_ip
                    .map_or_else(|| "unknown".into(), |g| g.to_string()),
            )
        }
    }
}

fn names(p: &[Protocol]) -> String {
    p.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}

/// A live mapping: where the gateway forwards to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedPort {
    /// The protocol that made it.
    pub protocol: Protocol,
    /// TCP or UDP.
    pub transport: Transport,
    /// The local port mapped.
    pub local_port: u16,
    /// The gateway's external address and port that reach `local_port`.
    pub external: SocketAddr,
    /// The lease the gateway granted, in seconds.
    pub lease_secs: u32,
}

impl fmt::Display for MappedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} -> local port {} ({}, {} s lease)",
            self.external, self.transport, self.local_port, self.protocol, self.lease_secs
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_round_trip_and_unknown_names_are_errors() {
        for p in Protocol::ALL {
            assert_eq!(p.name().parse::<Protocol>(), Ok(p));
        }
        let err = "natpmp".parse::<Protocol>().unwrap_err();
        assert!(err.to_string().contains("upnp, nat-pmp, pcp"), "{err}");
    }

    #[test]
    fn a_summary_says_when_no_gateway_answered() {
        let d = Discovery {
            tried: Protocol::ALL.to_vec(),
            elapsed_ms: 1000,
            ..Default::default()
        };
        assert!(d
            .summary()
            .starts_with("no gateway answered (upnp, nat-pmp, pcp) within 1000 ms"));
    }
}
