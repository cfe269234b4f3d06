//! `nettool rendezvous`: the meeting point (the server itself is `nettool_rendezvous`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use nettool_config::Settings;
use nettool_rendezvous::{
    ClusterConfig, ListenAddr, RelayLimits, RendezvousServer, ServerConfig, ServerIdentity,
};

use crate::{legacy, parse_duration, parse_size, BadSettings};

#[derive(Debug, Args)]
pub(crate) struct RendezvousArgs {
    /// Address to listen on (default 0.0.0.0:8877, or `rendezvous.listen` in the config). An
    /// unspecified address (0.0.0.0 or [::]) serves both IPv4 and IPv6 on that port.
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
    /// An IPv6 address to listen on as well, when --listen is a specific IPv4 address, e.g.
    /// --listen 203.0.113.10:8877 --listen-v6 [2001:db8::10]:8877 (peers reach the server
    /// over both families and learn their public address on each).
    #[arg(long, value_name = "[IPV6]:PORT")]
    pub(crate) listen_v6: Option<SocketAddr>,
    /// Serve the original demo's 8877 text protocol instead ("first\n", "<ip1> <port1>
    /// <port2>\n", ...), byte for byte, for the original clients and `connect --legacy`.
    #[arg(long)]
    pub(crate) legacy: bool,
    /// How long a session waits for its second peer before it expires (e.g. 5m, 30s).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) session_expiry: Option<Duration>,
    /// Do not relay (peers asking for the relay strategy are refused with a clear message).
    #[arg(long)]
    pub(crate) no_relay: bool,
    /// Bytes per second per relayed session, both directions together (0 = unlimited).
    #[arg(long, value_parser = parse_size)]
    pub(crate) relay_rate: Option<u64>,
    /// Bytes per relayed session (0 = unlimited).
    #[arg(long, value_parser = parse_size)]
    pub(crate) relay_max_bytes: Option<u64>,
    /// How long one relay may last (0s = unlimited).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) relay_max_duration: Option<Duration>,
    /// Sessions relayed at the same time.
    #[arg(long)]
    pub(crate) relay_max_sessions: Option<usize>,
    /// Connections open at once from one source IP address (default 64; 0 = unlimited).
    #[arg(long)]
    pub(crate) max_conns_per_ip: Option<usize>,
    /// Sessions known at once, waiting or paired (default 100000; 0 = unlimited).
    #[arg(long)]
    pub(crate) max_sessions: Option<usize>,
    /// A paired peer that completes no frame for this long is dropped (default 2m; 0s = off).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) idle_timeout: Option<Duration>,
    /// Joins per second per source IP address (default 20; 0 = unlimited).
    #[arg(long)]
    pub(crate) join_rate: Option<u32>,
    /// Joins one source IP address may make in a burst (default 40).
    #[arg(long)]
    pub(crate) join_burst: Option<u32>,
    /// Require this token in every join (clients give it with --server-token). Also
    /// NETTOOL_RENDEZVOUS__SERVER_TOKEN or `rendezvous.server-token` in the config.
    #[arg(long)]
    pub(crate) server_token: Option<String>,
    /// A second address of this host, IP2:P2, for RFC 5780 NAT behaviour discovery (needs
    /// --listen with a specific IP; STUN and TCP are then served on both IPs and both ports).
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) other_address: Option<SocketAddr>,
    /// The RFC 5780 second address for --listen-v6 (another IPv6 address of this host).
    #[arg(long, value_name = "[IPV6]:PORT")]
    pub(crate) other_address_v6: Option<SocketAddr>,
    /// STUN answers per second per source IP address (default 20; 0 = unlimited).
    #[arg(long)]
    pub(crate) stun_rate: Option<u32>,
    /// STUN answers one source IP address gets in a burst (default 50).
    #[arg(long)]
    pub(crate) stun_burst: Option<u32>,
    /// Share sessions with other rendezvous nodes through this Redis server, so the two
    /// peers of a session may join through different nodes (each node answers STUN and
    /// observe itself; a session's relay runs on its first peer's node). Limits stay per
    /// node. Needs --public-addr. Example:
    ///   nettool rendezvous --cluster redis://10.0.0.5:6379 --public-addr 203.0.113.7:8877
    #[arg(long, value_name = "redis://HOST:PORT", verbatim_doc_comment)]
    pub(crate) cluster: Option<String>,
    /// With --cluster: the address peers reach this node at (told to peers of other nodes
    /// whose relay runs here). Repeat once per address family (an IPv4 and an IPv6 one). An
    /// IP alone (or port 0) means this node's listening port.
    #[arg(long = "public-addr", value_name = "IP[:PORT]", requires = "cluster", value_parser = parse_public_addr)]
    pub(crate) public_addrs: Vec<SocketAddr>,
    /// The server's identity key (PEM; created there on first start). Peers pin its
    /// fingerprint, printed at start ("key sha256:..."), with --server-key, or trust it on
    /// first use. Default: server-identity.pem in $XDG_STATE_HOME/nettool, else
    /// ~/.local/state/nettool. Keep it: a new key makes every peer that knew the old one
    /// refuse this server.
    #[arg(long, value_name = "FILE")]
    pub(crate) identity: Option<PathBuf>,
    /// A certificate chain (PEM) for the control channel instead of the identity key's
    /// self-signed certificate, e.g. from a public CA: peers that name this server by that
    /// DNS name verify it with their system's roots. Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Also accept plain JSON joins (peers older than the TLS control channel, or run with
    /// --insecure-control): their session names, addresses and server token cross the path
    /// readable and forgeable. A warning is printed at start.
    #[arg(long)]
    pub(crate) insecure_control: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics and health at /healthz (200 while
    /// serving; 503 when the cluster's Redis does not answer), e.g. --metrics 127.0.0.1:9877.
    /// Counted: pairings, waiting sessions, relays and relayed bytes, STUN requests, and
    /// every refusal by a limit (nettool_rejected_total{reason=...}).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
}

pub(crate) async fn rendezvous(legacy: bool, settings: Settings) -> Result<i32> {
    let rv = settings.rendezvous;
    if legacy {
        return legacy::serve(rv.listen).await;
    }
    let mut config = server_config(&rv);
    let identity = identity(&rv)?;
    config.tls = Some(
        identity
            .tls_config()
            .map_err(|e| anyhow::Error::new(BadSettings(e.to_string())))?,
    );
    if rv.insecure_control {
        eprintln!(
            "nettool rendezvous: warning: --insecure-control: plain JSON joins are accepted too; \
             their session names, addresses and server token cross the network readable"
        );
    }
    let mut server = match rv.listen_v6 {
        None => {
            if let Some(other) = rv.other_address_v6 {
                bail!(
                    "--other-address-v6 {other} needs --listen-v6 (the IPv6 address it goes with)"
                );
            }
            RendezvousServer::bind(rv.listen, config)
                .await
                .with_context(|| format!("cannot listen on {}", rv.listen))?
        }
        Some(v6) => {
            if !v6.is_ipv6() || rv.listen.is_ipv6() {
                bail!(
                    "--listen-v6 {v6} must be an IPv6 address next to an IPv4 --listen (got \
                     --listen {})",
                    rv.listen
                );
            }
            let addrs = [
                ListenAddr {
                    addr: rv.listen,
                    other: rv.other_address,
                },
                ListenAddr {
                    addr: v6,
                    other: rv.other_address_v6,
                },
            ];
            RendezvousServer::bind_all(&addrs, config)
                .await
                .with_context(|| format!("cannot listen on {} and {v6}", rv.listen))?
        }
    };
    if let Some(url) = &rv.cluster {
        let cluster = ClusterConfig {
            redis_url: url.clone(),
            public_addrs: rv.public_addr.clone(),
        };
        server = server
            .join_cluster(&cluster)
            .await
            .map_err(|e| anyhow::Error::new(BadSettings(e.to_string())))?;
        eprintln!(
            "nettool rendezvous: cluster node {} (sessions shared through {url}; peers of other \
             nodes are sent to {})",
            server.node_id().unwrap_or_default(),
            server
                .public_addrs()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else if !rv.public_addr.is_empty() {
        bail!("`rendezvous.public-addr` is only used with a cluster: give --cluster too");
    }
    if let Some(addr) = rv.metrics {
        server = server.with_metrics(addr).await?;
        eprintln!(
            "nettool rendezvous: metrics at http://{}/metrics, health at /healthz",
            server.metrics_addr().unwrap_or(addr)
        );
    }
    eprintln!(
        "nettool rendezvous: key {} (peers pin it with --server-key {})",
        identity.fingerprint(),
        identity.fingerprint()
    );
    let others = server.other_local_addrs();
    eprintln!(
        "nettool rendezvous: listening on {} (tcp, and udp for STUN){}",
        server
            .local_addrs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and "),
        if others.is_empty() {
            String::new()
        } else {
            format!(
                "; RFC 5780 other address {}",
                others
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" and ")
            )
        }
    );
    tokio::select! {
        () = server.run() => {}
        _ = tokio::signal::ctrl_c() => eprintln!("nettool rendezvous: interrupted, stopping"),
    }
    Ok(0)
}

/// The server's configuration from the `[rendezvous]` settings: the only place the two meet.
/// `RendezvousConfig::default()` restates `ServerConfig::default()` (the config crate does not
/// depend on the server); the test `rendezvous_defaults_are_the_servers` keeps them equal.
fn server_config(rv: &nettool_config::RendezvousConfig) -> ServerConfig {
    ServerConfig {
        session_expiry: rv.session_expiry,
        max_frame_len: rv.max_frame_len,
        first_frame_timeout: rv.first_frame_timeout,
        observe_hold: rv.observe_hold,
        relay: rv.relay.then_some(RelayLimits {
            max_sessions: rv.relay_max_sessions,
            rate: rv.relay_rate,
            max_bytes: rv.relay_max_bytes,
            max_duration: rv.relay_max_duration,
            attach_timeout: rv.relay_attach_timeout,
        }),
        max_conns_per_ip: rv.max_conns_per_ip,
        max_sessions: rv.max_sessions,
        idle_timeout: rv.idle_timeout,
        join_rate: rv.join_rate,
        join_burst: rv.join_burst,
        server_token: rv.server_token.clone(),
        other_address: rv.other_address,
        stun_rate: rv.stun_rate,
        stun_burst: rv.stun_burst,
        tls: None,
        plain_control: rv.insecure_control,
    }
}

/// The server's TLS identity: `--tls-cert`/`--tls-key`, else the identity key (created on
/// first start).
fn identity(rv: &nettool_config::RendezvousConfig) -> Result<ServerIdentity> {
    let bad = |e: nettool_rendezvous::IdentityError| anyhow::Error::new(BadSettings(e.to_string()));
    match (&rv.tls_cert, &rv.tls_key) {
        (Some(cert), Some(key)) => ServerIdentity::from_pem_files(cert, key).map_err(bad),
        (None, None) => {
            let path = rv
                .identity
                .clone()
                .or_else(|| {
                    dirs::state_dir().map(|d| d.join("nettool").join("server-identity.pem"))
                })
                .ok_or_else(|| {
                    BadSettings(
                        "no place for the server's identity key: give --identity FILE (neither \
                     XDG_STATE_HOME nor HOME is set)"
                            .into(),
                    )
                })?;
            ServerIdentity::load_or_create(&path).map_err(bad)
        }
        _ => Err(BadSettings("--tls-cert and --tls-key go together".into()).into()),
    }
}

/// `--public-addr`: `IP:PORT`, or an IP alone (port 0: the node's listening port).
fn parse_public_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
        .map_err(|_| format!("'{s}' is not an IP address or IP:PORT (IPv6 with a port: [IP]:PORT)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults are written twice (`nettool-config` does not depend on the server); a
    /// drift in any field, the relay limits included, fails here.
    #[test]
    fn rendezvous_defaults_are_the_servers() {
        let mapped = server_config(&nettool_config::RendezvousConfig::default());
        assert_eq!(
            format!("{mapped:#?}"),
            format!("{:#?}", ServerConfig::default())
        );
        assert!(mapped.relay.is_some(), "relaying is on by default");
    }
}
