//! Configuration types for nettool.
//!
//! These are the plain, validated settings the rest of the program uses: which strategies to
//! try and in what order, their timeouts and tuning knobs, and the rendezvous server's limits.
//! Parsing of raw flags and files ends here; `nettool-strategies` turns a [`StrategyConfig`]
//! into a running strategy with one builder function.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod load;

pub use load::{ConfigError, LoadOptions, Loaded, Overrides, Settings, Source};

/// The name of a connection strategy, as users type it (`--strategy tcp-punch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    /// TCP simultaneous open ("TCP hole punching").
    TcpPunch,
    /// UDP hole punching with QUIC on top.
    UdpQuic,
    /// One side listens, the other dials; then the roles swap.
    TcpDirect,
    /// Through the rendezvous server (last resort).
    Relay,
}

impl StrategyName {
    /// Every strategy this build knows, in the default order (first = highest priority).
    pub const ALL: &'static [Self] = &[Self::TcpPunch, Self::UdpQuic, Self::TcpDirect, Self::Relay];

    /// The name as written on the command line, in configs and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TcpPunch => "tcp-punch",
            Self::UdpQuic => "udp-quic",
            Self::TcpDirect => "tcp-direct",
            Self::Relay => "relay",
        }
    }

    /// The valid names, comma separated, for error messages and `--help`.
    pub fn valid_names() -> String {
        Self::ALL
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for StrategyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Returned when a strategy name is not one this build knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy '{name}' (valid: {valid})")]
pub struct UnknownStrategy {
    /// The name that was given.
    pub name: String,
    /// The valid names, comma separated.
    pub valid: String,
}

impl FromStr for StrategyName {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| UnknownStrategy {
                name: s.to_owned(),
                valid: Self::valid_names(),
            })
    }
}

/// Settings of the tcp-punch strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TcpPunchConfig {
    /// How long one attempt may take before it counts as timed out.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
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
            timeout: Duration::from_secs(10),
            local_port: 0,
            low_ttl: 2,
            retry_interval: Duration::from_millis(100),
            min_syn_timeout: Duration::from_millis(500),
        }
    }
}

/// Settings of the udp-quic strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct UdpQuicConfig {
    /// How long one attempt may take before it counts as timed out.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
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
}

impl Default for UdpQuicConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            local_port: 0,
            punch_interval: Duration::from_millis(50),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Settings of the tcp-direct strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TcpDirectConfig {
    /// How long one attempt may take (both directions together).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Port the listening side binds (all interfaces); 0 picks a free one.
    pub listen_port: u16,
    /// How long each side keeps dialing the other's candidates.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
}

impl Default for TcpDirectConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            listen_port: 0,
            dial_timeout: Duration::from_secs(3),
        }
    }
}

/// Settings of the relay strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RelayConfig {
    /// How long attaching to the relay and the link handshake through it may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
        }
    }
}

/// One strategy with its settings; the orchestrator runs a list of these in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrategyConfig {
    /// TCP simultaneous open.
    TcpPunch(TcpPunchConfig),
    /// UDP hole punching with QUIC on top.
    UdpQuic(UdpQuicConfig),
    /// Listen on one side, dial from the other.
    TcpDirect(TcpDirectConfig),
    /// Through the rendezvous server.
    Relay(RelayConfig),
}

impl StrategyConfig {
    /// The default settings for a strategy.
    pub fn default_for(name: StrategyName) -> Self {
        match name {
            StrategyName::TcpPunch => Self::TcpPunch(TcpPunchConfig::default()),
            StrategyName::UdpQuic => Self::UdpQuic(UdpQuicConfig::default()),
            StrategyName::TcpDirect => Self::TcpDirect(TcpDirectConfig::default()),
            StrategyName::Relay => Self::Relay(RelayConfig::default()),
        }
    }

    /// Which strategy this configures.
    pub fn name(&self) -> StrategyName {
        match self {
            Self::TcpPunch(_) => StrategyName::TcpPunch,
            Self::UdpQuic(_) => StrategyName::UdpQuic,
            Self::TcpDirect(_) => StrategyName::TcpDirect,
            Self::Relay(_) => StrategyName::Relay,
        }
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        match self {
            Self::TcpPunch(c) => c.timeout,
            Self::UdpQuic(c) => c.timeout,
            Self::TcpDirect(c) => c.timeout,
            Self::Relay(c) => c.timeout,
        }
    }

    /// Sets the per-attempt timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        match self {
            Self::TcpPunch(c) => c.timeout = timeout,
            Self::UdpQuic(c) => c.timeout = timeout,
            Self::TcpDirect(c) => c.timeout = timeout,
            Self::Relay(c) => c.timeout = timeout,
        }
    }
}

/// Settings of the rendezvous server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RendezvousConfig {
    /// Address to listen on (TCP, and UDP for STUN on the same port).
    pub listen: SocketAddr,
    /// How long a session may wait for its second peer before it expires.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// Largest accepted frame (one JSON line), in bytes.
    pub max_frame_len: usize,
    /// How long a new connection may take to send its first frame.
    #[serde(with = "humantime_serde")]
    pub first_frame_timeout: Duration,
    /// How long an observe connection is held open at most.
    #[serde(with = "humantime_serde")]
    pub observe_hold: Duration,
    /// Whether the server relays (the relay strategy's last resort).
    pub relay: bool,
    /// Sessions relayed at the same time.
    pub relay_max_sessions: usize,
    /// Bytes per second per relayed session, both directions together; 0 = unlimited.
    pub relay_rate: u64,
    /// Bytes per relayed session, both directions together; 0 = unlimited.
    pub relay_max_bytes: u64,
    /// How long one relay may last; "0s" = unlimited.
    #[serde(with = "humantime_serde")]
    pub relay_max_duration: Duration,
    /// How long the first peer to attach to a relay waits for the second.
    #[serde(with = "humantime_serde")]
    pub relay_attach_timeout: Duration,
    /// Connections open at the same time from one source IP address (all kinds); 0 =
    /// unlimited.
    pub max_conns_per_ip: usize,
    /// Sessions known at the same time (waiting or paired); 0 = unlimited.
    pub max_sessions: usize,
    /// How long a paired peer may go without sending a complete frame (and a write to a
    /// client may take); "0s" = unlimited. A peer waiting for its partner is bounded by
    /// `session-expiry` instead.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Joins per second per source IP address; 0 = unlimited.
    pub join_rate: u32,
    /// Joins one source IP address may make in a burst.
    pub join_burst: u32,
    /// Token every join must carry (clients: `server-token`); unset = anyone may join.
    pub server_token: Option<String>,
    /// A second address of this host, `IP2:P2`, for RFC 5780 NAT behaviour discovery (STUN
    /// CHANGE-REQUEST, OTHER-ADDRESS; TCP observe there too); unset = one address.
    pub other_address: Option<SocketAddr>,
    /// STUN answers per second per source IP address; 0 = unlimited.
    pub stun_rate: u32,
    /// STUN answers one source IP address gets in a burst.
    pub stun_burst: u32,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8877)),
            session_expiry: Duration::from_secs(300),
            max_frame_len: 64 * 1024,
            first_frame_timeout: Duration::from_secs(10),
            observe_hold: Duration::from_secs(120),
            relay: true,
            relay_max_sessions: 100,
            relay_rate: 0,
            relay_max_bytes: 0,
            relay_max_duration: Duration::ZERO,
            relay_attach_timeout: Duration::from_secs(10),
            max_conns_per_ip: 64,
            max_sessions: 100_000,
            idle_timeout: Duration::from_secs(120),
            join_rate: 20,
            join_burst: 40,
            server_token: None,
            other_address: None,
            stun_rate: 20,
            stun_burst: 50,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip() {
        for n in StrategyName::ALL {
            assert_eq!(n.as_str().parse::<StrategyName>().unwrap(), *n);
        }
    }

    #[test]
    fn unknown_strategy_names_the_valid_ones() {
        let err = "tcp-pnuch".parse::<StrategyName>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown strategy 'tcp-pnuch' (valid: tcp-punch, udp-quic, tcp-direct, relay)"
        );
    }
}
