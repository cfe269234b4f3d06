//! Choosing a rendezvous server from a list (one, or several tried in order) and resolving
//! its addresses (both families).

use std::net::SocketAddr;
use std::time::Duration;

use crate::{Event, PeerError};

/// The port a server given without one listens on.
pub const DEFAULT_PORT: u16 = 8877;

/// How long a server of a list has to answer before the next is tried.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The rendezvous server to use, and all its addresses (both families, for
/// [`nettool_core::Orchestrator::with_server_addresses`]: the control connection races them,
/// IPv6 first, and each family is gathered): the only one given, or the first of several that
/// answers (a TCP connect and an observe exchange within 3 s). `events` hears of each server
/// of several tried ([`Event::ServerChosen`], [`Event::ServerFailed`]).
pub async fn choose_server(
    servers: &[String],
    events: &(dyn Fn(Event) + Send + Sync),
) -> Result<(SocketAddr, Vec<SocketAddr>), PeerError> {
    match servers {
        [] => Err(PeerError::Settings(
            "no rendezvous server: give --server HOST:PORT (repeat it for fallbacks) or set \
             `server` in the config"
                .into(),
        )),
        [one] => {
            let addrs = resolve_all(one).await?;
            Ok((addrs[0], addrs))
        }
        many => {
            let mut failures = Vec::new();
            for (i, server) in many.iter().enumerate() {
                match probe_server(server).await {
                    Ok(addr) => {
                        events(Event::ServerChosen {
                            server: server.clone(),
                            addr,
                        });
                        // Its other addresses (the other family) still serve the control
                        // connection's race and the gathering of both families.
                        let mut all = vec![addr];
                        all.extend(
                            resolve_all(server)
                                .await
                                .unwrap_or_default()
                                .into_iter()
                                .filter(|a| *a != addr),
                        );
                        return Ok((addr, all));
                    }
                    Err(e) => {
                        events(Event::ServerFailed {
                            server: server.clone(),
                            error: e.clone(),
                            next: i + 1 < many.len(),
                        });
                        failures.push(format!("{server}: {e}"));
                    }
                }
            }
            Err(PeerError::Unreachable(format!(
                "no rendezvous server answered ({})",
                failures.join("; ")
            )))
        }
    }
}

/// The first address of `server` that accepts a connection and answers an observe request.
async fn probe_server(server: &str) -> Result<SocketAddr, String> {
    let mut last = None;
    for addr in resolve_all(server).await.map_err(|e| e.to_string())? {
        let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
        let answered = async {
            let stream = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| format!("no answer to a connect within {PROBE_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
            nettool_core::client::observe(stream, deadline)
                .await
                .map_err(|e| e.to_string())
        };
        match answered.await {
            Ok(_) => return Ok(addr),
            Err(e) if addr.to_string() == server => last = Some(e),
            Err(e) => last = Some(format!("{e} (at {addr})")),
        }
    }
    Err(last.unwrap_or_else(|| "no address".into()))
}

/// Every address of a rendezvous server given as HOST or HOST:PORT (default port 8877).
pub async fn resolve_all(server: &str) -> Result<Vec<SocketAddr>, PeerError> {
    let with_port = if server.parse::<SocketAddr>().is_ok()
        || server
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok())
    {
        server.to_owned()
    } else {
        format!("{server}:{DEFAULT_PORT}")
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&with_port)
        .await
        .map_err(|e| {
            PeerError::Unreachable(format!("cannot resolve rendezvous server '{server}': {e}"))
        })?
        .collect();
    if addrs.is_empty() {
        return Err(PeerError::Unreachable(format!(
            "rendezvous server '{server}' has no address"
        )));
    }
    Ok(addrs)
}
