//! tcp-direct: listen on one side, dial from the other.
//!
//! Both peers listen on a port (all interfaces; `listen_port` or any free one) and advertise
//! it: at the public address the rendezvous server saw for the control connection (right for
//! a public host and for a 1:1 full-cone NAT, which keeps the port) and at this host's own
//! addresses (right on a shared LAN). Each peer then dials all of the other's candidates at
//! once (happy eyeballs) from fresh ephemeral ports. Running both directions at the same time
//! is the listen/dial role swap without its wait: whichever side is reachable gets dialed.
//!
//! Unlike tcp-punch this never punches a NAT: it links only when one side accepts unsolicited
//! connections (public, full-cone, or port-mapped: with port mapping on, the listening port is
//! mapped on the gateway and that external address is offered first) or both share a network. The link handshake
//! refuses strangers that find the listening port.
//!
//! Both IP families: with the server reached over IPv4 and IPv6, the listener is one
//! dual-stack socket and the offer names it at this peer's public address of each family (as
//! the server saw them); IPv6 candidates are dialed first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nettool_core::port_mapping::Transport;
use nettool_core::strategy::agree_on_link;
use nettool_core::{Attempt, Link, Strategy, StrategyError};

use crate::net::send_tcp;
use nettool_core::candidates::{candidates, peer_candidates_all, start_delay};
use serde::{Deserialize, Serialize};
use socket2::{Protocol, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, trace};

/// Settings of the tcp-direct strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TcpDirectConfig {
    /// Port the listening side binds (all interfaces); 0 picks a free one.
    pub listen_port: u16,
    /// How long each side keeps dialing the other's candidates.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
}

impl Default for TcpDirectConfig {
    fn default() -> Self {
        Self {
            listen_port: 0,
            dial_timeout: Duration::from_secs(3),
        }
    }
}

/// The strategy's name.
pub const NAME: &str = "tcp-direct";

/// Listen/dial.
#[derive(Debug, Clone)]
pub struct TcpDirect {
    config: TcpDirectConfig,
}

impl TcpDirect {
    /// A tcp-direct strategy with these settings.
    pub fn new(config: TcpDirectConfig) -> Self {
        Self { config }
    }
}

/// What each peer tells the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DirectOffer {
    /// Where this peer's listener may be reachable, best first.
    listen: Vec<SocketAddr>,
}

#[async_trait::async_trait]
impl Strategy for TcpDirect {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let servers = attempt.rendezvous.servers();
        let server = servers[0];
        let unspecified = crate::net::unspecified_for_all(&servers);
        let bind = SocketAddr::new(unspecified, self.config.listen_port);
        let listener =
            listen(bind).map_err(|e| StrategyError::io(format!("listening on {bind}"), e))?;
        let port = listener
            .local_addr()
            .map_err(|e| StrategyError::io("reading the listening port", e))?
            .port();
        let mut listen = Vec::new();
        for family in &servers {
            if let Some(seen) = attempt.pairing.observed_for(family.is_ipv6()) {
                let public = SocketAddr::new(seen.ip(), port);
                listen.extend(candidates(public, public, server.ip().is_loopback()));
            }
        }
        // With port mapping on, the gateway's mapping of the listener comes first: it is
        // reachable from anywhere (the peer keeps it: it is on the address the server saw).
        // (IPv4 only: NAT-PMP, PCP and UPnP-IGD map on the IPv4 gateway.)
        let mapped = if servers.iter().any(SocketAddr::is_ipv4) {
            attempt.map_port(Transport::Tcp, port).await
        } else {
            None
        };
        if let Some(mapped) = mapped {
            listen.retain(|c| *c != mapped);
            listen.insert(0, mapped);
        }
        let offer = DirectOffer { listen };
        let payload = serde_json::to_value(&offer).expect("offer serializes");
        let secured = attempt
            .exchange_secure_offers::<DirectOffer>(NAME, payload)
            .await?;
        let tls = secured.link_tls(attempt.tls_role())?;
        let seen: Vec<std::net::IpAddr> =
            attempt.pairing.peer_all().iter().map(|a| a.ip()).collect();
        let peer = peer_candidates_all(&secured.theirs.listen, &seen, &servers);
        if peer.is_empty() {
            return Err(StrategyError::BadOffer(
                "no usable candidate address (of this address family, private or the one the server observed)".into(),
            ));
        }
        debug!(candidates = ?peer, "peer offer");

        let (tx, rx) = mpsc::channel(16);
        let errors: Arc<Mutex<BTreeMap<SocketAddr, String>>> = Arc::default();
        let mut tasks = JoinSet::new();
        let dial_until = Instant::now() + self.config.dial_timeout;
        for cand in peer.iter().copied() {
            let (tx, errors) = (tx.clone(), errors.clone());
            let delay = start_delay(cand, &peer);
            tasks.spawn(async move {
                tokio::time::sleep(delay).await;
                let res = tokio::time::timeout_at(dial_until.into(), dial(cand)).await;
                let err = match res {
                    Ok(Ok(stream)) => {
                        trace!(remote = %cand, "connected");
                        let _ = send_tcp(&tx, stream).await;
                        return;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer".to_owned(),
                };
                errors.lock().expect("errors poisoned").insert(cand, err);
            });
        }
        tasks.spawn(async move {
            while let Ok((stream, remote)) = listener.accept().await {
                trace!(%remote, "accepted");
                if send_tcp(&tx, stream).await.is_err() {
                    return;
                }
            }
        });

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
        let raw = agreed.map_err(|none| {
            let errs = errors.lock().expect("errors poisoned");
            let detail: Vec<String> = errs.iter().map(|(c, e)| format!("dial {c}: {e}")).collect();
            let msg = format!(
                "no authenticated connection within {:.1}s; neither side reachable ({}; {})",
                started.elapsed().as_secs_f64(),
                none,
                if detail.is_empty() {
                    "no dial finished".to_owned()
                } else {
                    detail.join("; ")
                }
            );
            none.into_error(msg)
        })?;
        Ok(Link {
            stream: Box::new(raw.stream),
            local: raw.local,
            remote: raw.remote,
            strategy: NAME,
        })
    }
}

/// A listener on `bind`, dual-stack when it is `[::]`.
fn listen(bind: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = crate::net::dual_stack_socket(bind, Type::STREAM, Protocol::TCP)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

async fn dial(remote: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if remote.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.connect(remote).await
}
