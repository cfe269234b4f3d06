//! Configuration types for nettool.
//!
//! These are the plain, validated settings the rest of the program uses: which strategies to
//! try and in what order, each strategy's own table (`[strategy.NAME]`, handed as JSON to that
//! strategy's factory in the registry, which alone knows its keys), and the rendezvous
//! server's limits. This crate knows no individual strategy.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod load;

pub use load::{ConfigError, LoadOptions, Loaded, Overrides, Settings, Source};

/// Port mapping on the local gateway (UPnP-IGD, NAT-PMP, PCP): `[default.portmap]`.
///
/// Off by default: with `enabled = false` nettool sends nothing to the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PortmapConfig {
    /// Ask the gateway to map the ports of udp-quic and tcp-direct (`connect --portmap`; the
    /// other commands never map).
    pub enabled: bool,
    /// Protocols to use, in order of preference: `upnp`, `nat-pmp`, `pcp`.
    #[serde(deserialize_with = "protocol_list")]
    pub protocols: Vec<nettool_portmap::Protocol>,
    /// How long gateway discovery waits for answers (all protocols at once).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The lease asked for each mapping (renewed at half of it while the link lasts).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for PortmapConfig {
    fn default() -> Self {
        let d = nettool_portmap::Settings::default();
        Self {
            enabled: false,
            protocols: d.protocols,
            timeout: d.timeout,
            lease: d.lease,
        }
    }
}

impl PortmapConfig {
    /// The mapper's settings.
    pub fn settings(&self) -> nettool_portmap::Settings {
        nettool_portmap::Settings {
            protocols: self.protocols.clone(),
            timeout: self.timeout,
            lease: self.lease,
        }
    }
}

/// Accepts a list of protocol names or one comma-separated string (handy in the environment);
/// not empty, no repeats.
fn protocol_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<nettool_portmap::Protocol>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        One(String),
    }
    let names = match Raw::deserialize(d)? {
        Raw::List(v) => v,
        Raw::One(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
    };
    let mut out = Vec::new();
    for name in names {
        let p: nettool_portmap::Protocol = name.parse().map_err(serde::de::Error::custom)?;
        if out.contains(&p) {
            return Err(serde::de::Error::custom(format!(
                "port mapping protocol {name:?} is listed twice"
            )));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(serde::de::Error::custom(
            "the port mapping protocol list is empty (give upnp, nat-pmp and/or pcp, or set enabled = false)",
        ));
    }
    Ok(out)
}

/// Settings of the rendezvous server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RendezvousConfig {
    /// Address to listen on (TCP, and UDP for STUN on the same port). An unspecified address
    /// (`0.0.0.0`, the default, or `::`) listens on both IP families.
    pub listen: SocketAddr,
    /// An IPv6 address to listen on as well, when `listen` is a specific IPv4 address (with
    /// `other-address-v6`, RFC 5780 on IPv6 too); unset = `listen` alone.
    pub listen_v6: Option<SocketAddr>,
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
    /// The second address for `listen-v6` (RFC 5780 on IPv6); needs `listen-v6`.
    pub other_address_v6: Option<SocketAddr>,
    /// STUN answers per second per source IP address; 0 = unlimited.
    pub stun_rate: u32,
    /// STUN answers one source IP address gets in a burst.
    pub stun_burst: u32,
    /// Share sessions with other nodes through this Redis server (`redis://HOST:PORT`);
    /// unset = this process holds every session itself.
    pub cluster: Option<String>,
    /// Addresses peers reach this node at, one per address family (a cluster node tells
    /// the peers of other nodes where the relay runs).
    pub public_addr: Vec<SocketAddr>,
    /// The server's identity key (PEM), created on first start; unset = `server-identity.pem`
    /// in the state directory (`$XDG_STATE_HOME/nettool`, else `~/.local/state/nettool`).
    pub identity: Option<std::path::PathBuf>,
    /// A certificate chain (PEM) for the control channel's TLS instead of the identity key's
    /// self-signed one, e.g. from a public CA; needs `tls-key`.
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of `tls-cert`.
    pub tls_key: Option<std::path::PathBuf>,
    /// Also accept plain JSON joins (clients older than the TLS control channel, or run with
    /// `--insecure-control`): their session names, addresses and server token are readable
    /// on the path.
    pub insecure_control: bool,
    /// Serve Prometheus metrics (`/metrics`) and health (`/healthz`) over HTTP here.
    pub metrics: Option<SocketAddr>,
}

/// The server's own defaults (`nettool_rendezvous::ServerConfig::default()` and the relay's
/// `RelayLimits::default()`), restated here so this crate need not depend on the server; a test
/// in the CLI (`rendezvous_defaults_are_the_servers`) fails when the two drift apart.
impl Default for RendezvousConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8877)),
            listen_v6: None,
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
            other_address_v6: None,
            stun_rate: 20,
            stun_burst: 50,
            cluster: None,
            public_addr: Vec::new(),
            identity: None,
            tls_cert: None,
            tls_key: None,
            insecure_control: false,
            metrics: None,
        }
    }
}
