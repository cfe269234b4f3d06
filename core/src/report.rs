//! The report of one connect: which strategy produced the link and how every attempt went.
//!
//! The field names are stable: scripts and people compare reports across networks.

use serde::{Deserialize, Serialize};

use crate::protocol::Role;

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The strategy produced the link.
    Connected,
    /// The strategy gave up with an error.
    Failed,
    /// The strategy's timeout (or the overall deadline) ran out.
    TimedOut,
    /// The strategy was not tried.
    Skipped,
    /// The attempt was stopped before it ended: relay-first's session ended first (its error
    /// says in which phase).
    Cancelled,
}

impl Outcome {
    /// The name used in the JSON report.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Failed => "failed",
            Self::TimedOut => "timed-out",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One strategy's attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptReport {
    /// The strategy's name.
    pub strategy: String,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took, in milliseconds.
    pub elapsed_ms: u64,
    /// Why it did not connect (null when it did).
    pub error: Option<String>,
    /// How the strategy ran when it has modes (udp-quic: `birthday` against a NAT that maps
    /// per destination); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Probes sent (birthday mode's easy side) or received (its hard side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u64>,
    /// It began at the pairing, with the offers both joins carried, while the plan offers
    /// crossed (a round trip sooner); absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub at_pairing: bool,
}

/// The report of one connect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The session name.
    pub session: String,
    /// The pairing's id (the server's, the same for both peers), once paired; not written to
    /// report files (relay-first names a direct pairing of its own from it, see
    /// [`crate::relay_first::DirectNaming`]).
    #[serde(skip)]
    pub pair_id: Option<String>,
    /// This peer's role, null when it was never paired.
    pub role: Option<Role>,
    /// The strategy that produced the link, null when none did.
    pub strategy: Option<String>,
    /// Local address of the link.
    pub local: Option<String>,
    /// Remote address of the link.
    pub remote: Option<String>,
    /// Time from start to link (or to giving up), in milliseconds.
    pub elapsed_ms: u64,
    /// Every attempt, in the order tried.
    pub attempts: Vec<AttemptReport>,
    /// Why the connect failed before or outside the attempts (e.g. server unreachable).
    pub error: Option<String>,
    /// Both peers' NAT behaviour on IPv4 as discovered and exchanged for the plan (absent
    /// with `--plan off` or before pairing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatPair>,
    /// The same for IPv6, when either peer reached the server over IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_v6: Option<NatPair>,
    /// The IP family of the link (`ipv4` or `ipv6`; for the relay, of this peer's connection
    /// to the server); null without a link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// How the link's data is encrypted on this host (set by the CLI once linked): userspace
    /// TLS (rustls) or QUIC, and whether the kernel offers TLS offload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_path: Option<String>,
    /// Port mapping on this peer's gateway (absent when it is off): which protocols
    /// answered and the mappings the winning attempt holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mapping: Option<PortMapReport>,
    /// What the NAT cache did, per family (absent with the cache off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat_cache: Vec<NatCacheReport>,
    /// Every time the session lost its path and how it came back (the session layer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resumes: Vec<crate::session::ResumeReport>,
    /// The links that carried the session, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<crate::session::PathReport>,
    /// How the session ended (absent before it did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_end: Option<SessionEndReport>,
    /// Relay-first: when the first byte from the peer reached this side's output, ms since
    /// the connect began (null when none came).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<u64>,
    /// Relay-first: how the connect linked and moved (e.g. "linked on relay in 12 ms, direct
    /// (tcp-punch) at 41 ms, 99.8 % of bytes direct").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// A code session ended because a key confirmation failed: someone tried a wrong code
    /// (this side's or the peer's confirmation), and the code is burned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wrong_code: bool,
    /// The round trip to the rendezvous server, ms (the control connection's ping; for the
    /// express relay, its relay connection's TCP handshake). The round trip to the peer is
    /// each path's `rtt_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_rtt_ms: Option<f64>,
}

/// `d` in milliseconds with one decimal, for the report.
pub fn ms_1(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// The end of the session, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEndReport {
    /// `done`, `peer-stopped`, `peer-aborted`, `stopped`, `aborted` or `lost`.
    pub kind: String,
    /// The reason in words.
    pub reason: Option<String>,
    /// Bytes read from this side's input.
    pub bytes_sent: u64,
    /// Of those, bytes the peer confirmed written.
    pub bytes_confirmed: u64,
    /// Bytes received from the peer.
    pub bytes_received: u64,
}

/// What the NAT cache did for one family's measurement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatCacheReport {
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// `verified` (a cached entry confirmed by the quick check and used), `contradicted`
    /// (dropped: the check disagreed; measured afresh), `unverifiable` (the check could not
    /// decide; measured afresh) or `miss` (nothing cached; measured).
    pub state: String,
    /// The cached entry's age in seconds, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_s: Option<u64>,
    /// Why it was contradicted, or why a fresh result was not stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Why the entry was dropped after the attempts (the plan it made proved wrong).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidated: Option<String>,
}

impl NatCacheReport {
    /// A report in `state`, for a family the caller fills in.
    pub fn new(state: &str) -> Self {
        Self {
            family: String::new(),
            state: state.to_owned(),
            age_s: None,
            detail: None,
            invalidated: None,
        }
    }
}

/// What port mapping did during one connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapReport {
    /// What gateway discovery found.
    #[serde(flatten)]
    pub discovery: crate::port_mapping::Discovery,
    /// The mappings made for the link (deleted when it ends).
    pub mapped: Vec<crate::port_mapping::MappedPort>,
}

/// What the plan was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatPair {
    /// This peer's NAT behaviour (null when discovery failed).
    pub local: Option<crate::plan::NatSummary>,
    /// The peer's, as it reported it (null when it did not measure or plans off).
    pub peer: Option<crate::plan::NatSummary>,
}
