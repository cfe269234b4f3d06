//! Configuration types for nettool.
//!
//! These are the plain, validated settings the rest of the program uses: which strategies to
//! try and in what order, their timeouts and tuning knobs, and the rendezvous server's limits.
//! Parsing of raw flags and files ends here; `nettool-strategies` turns a [`StrategyConfig`]
//! into a running strategy with one builder function.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The name of a connection strategy, as users type it (`--strategy tcp-punch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    /// TCP simultaneous open from one shared local port ("TCP hole punching").
    TcpPunch,
}

impl StrategyName {
    /// Every strategy this build knows, in the default order (first = highest priority).
    pub const ALL: &'static [Self] = &[Self::TcpPunch];

    /// The name as written on the command line, in configs and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TcpPunch => "tcp-punch",
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpPunchConfig {
    /// How long one attempt may take before it counts as timed out.
    pub timeout: Duration,
    /// Local port to punch from; 0 picks a free one.
    pub local_port: u16,
    /// TTL of the first SYN to each candidate (enough to pass the own NAT, too small to reach the
    /// peer's), so the own mapping exists before the peer's SYN arrives. `None` turns it off.
    pub low_ttl: Option<u32>,
    /// Pause between two connect attempts to the same candidate after a failure.
    pub retry_interval: Duration,
    /// Shortest time one SYN is given to be answered before it is sent again.
    pub min_syn_timeout: Duration,
}

impl Default for TcpPunchConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            local_port: 0,
            low_ttl: Some(2),
            retry_interval: Duration::from_millis(100),
            min_syn_timeout: Duration::from_millis(500),
        }
    }
}

/// One strategy with its settings; the orchestrator runs a list of these in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrategyConfig {
    /// TCP simultaneous open.
    TcpPunch(TcpPunchConfig),
}

impl StrategyConfig {
    /// The default settings for a strategy.
    pub fn default_for(name: StrategyName) -> Self {
        match name {
            StrategyName::TcpPunch => Self::TcpPunch(TcpPunchConfig::default()),
        }
    }

    /// Which strategy this configures.
    pub fn name(&self) -> StrategyName {
        match self {
            Self::TcpPunch(_) => StrategyName::TcpPunch,
        }
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        match self {
            Self::TcpPunch(c) => c.timeout,
        }
    }

    /// Sets the per-attempt timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        match self {
            Self::TcpPunch(c) => c.timeout = timeout,
        }
    }
}

/// Settings of the rendezvous server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// How long a session may wait for its second peer before it expires.
    pub session_expiry: Duration,
    /// Largest accepted frame (one JSON line), in bytes.
    pub max_frame_len: usize,
    /// How long a new connection may take to send its first frame.
    pub first_frame_timeout: Duration,
    /// How long an observe connection is held open at most.
    pub observe_hold: Duration,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        Self {
            session_expiry: Duration::from_secs(300),
            max_frame_len: 64 * 1024,
            first_frame_timeout: Duration::from_secs(10),
            observe_hold: Duration::from_secs(120),
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
            "unknown strategy 'tcp-pnuch' (valid: tcp-punch)"
        );
    }
}
