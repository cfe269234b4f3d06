//! Choosing a rendezvous server from `--server` (one, or several tried in order) and
//! resolving its addresses (both families).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nettool_core::control::{ControlSecurity, KeyFingerprint, ServerTrust};

use crate::DEFAULT_PORT;

/// The rendezvous server to use, and all its addresses (both families, for
/// [`Orchestrator::with_server_addresses`]: the control connection races them, IPv6 first,
/// and each family is gathered): the only one given, or the first of several that answers
/// (a TCP connect and an observe exchange within [`PROBE_TIMEOUT`]), with one line on stderr
/// per server tried.
pub(crate) async fn choose_server(servers: &[String]) -> Result<(SocketAddr, Vec<SocketAddr>)> {
    match servers {
        [] => bail!(
            "no rendezvous server: give --server HOST:PORT (repeat it for fallbacks) or set \
             `server` in the config"
        ),
        [one] => {
            let addrs = resolve_all(one).await?;
            Ok((addrs[0], addrs))
        }
        many => {
            let mut failures = Vec::new();
            for server in many {
                match probe_server(server).await {
                    Ok(addr) => {
                        eprintln!("nettool: server {server} ({addr}) answers; using it");
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
                        let next = if failures.len() + 1 < many.len() {
                            "trying the next"
                        } else {
                            "no more servers"
                        };
                        eprintln!("nettool: server {server}: {e:#}; {next}");
                        failures.push(format!("{server}: {e:#}"));
                    }
                }
            }
            bail!("no rendezvous server answered ({})", failures.join("; "))
        }
    }
}

/// How long a server of a list has to answer before the next is tried.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The first address of `server` that accepts a connection and answers an observe request.
async fn probe_server(server: &str) -> Result<SocketAddr> {
    let mut last = None;
    for addr in resolve_all(server).await? {
        let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
        let answered = async {
            let stream = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| anyhow!("no answer to a connect within {PROBE_TIMEOUT:?}"))??;
            nettool_core::client::observe(stream, deadline)
                .await
                .map_err(anyhow::Error::new)
        };
        match answered.await {
            Ok(_) => return Ok(addr),
            Err(e) if addr.to_string() == server => last = Some(e),
            Err(e) => last = Some(e.context(format!("at {addr}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no address")))
}

/// Every address of a rendezvous server given as HOST or HOST:PORT (default port 8877).
pub(crate) async fn resolve_all(server: &str) -> Result<Vec<SocketAddr>> {
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
        .with_context(|| format!("cannot resolve rendezvous server '{server}'"))?
        .collect();
    if addrs.is_empty() {
        bail!("rendezvous server '{server}' has no address");
    }
    Ok(addrs)
}

/// How control connections to the server are secured, from the settings: TLS with the key
/// pinned by `server-key` or remembered in the known-servers file (trust on first use), or
/// plain JSON with `insecure-control` (with a warning). A malformed `server-key` is an error
/// naming it.
pub(crate) fn control(settings: &nettool_config::Settings) -> Result<ControlSecurity> {
    if settings.insecure_control {
        if settings.server_key.is_some() {
            return Err(anyhow::Error::new(crate::BadSettings(
                "--server-key pins the server's TLS key, but --insecure-control turns TLS off: \
                 give one of them"
                    .into(),
            )));
        }
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "--insecure-control: the control channel is plain JSON; the session name, \
                 both peers' addresses and the server token cross the network readable"
            );
        });
        return Ok(ControlSecurity::Plain);
    }
    let pin = settings
        .server_key
        .as_deref()
        .map(str::parse::<KeyFingerprint>)
        .transpose()
        .map_err(|e| {
            anyhow::Error::new(crate::BadSettings(format!(
                "--server-key (or `server-key` in the config): {e}"
            )))
        })?;
    // The DNS name (one server given by name): SNI, and checked against a public CA's
    // certificate when nothing is pinned or remembered.
    let name = match &settings.server[..] {
        [one] => {
            let host = one
                .rsplit_once(':')
                .filter(|(_, p)| p.parse::<u16>().is_ok())
                .map_or(one.as_str(), |(h, _)| h);
            (host.parse::<std::net::IpAddr>().is_err() && !host.starts_with('['))
                .then(|| host.to_owned())
        }
        _ => None,
    };
    Ok(ControlSecurity::Tls(Arc::new(ServerTrust::new(
        pin,
        dirs::config_dir().map(|d| d.join("nettool").join("known_servers")),
        name,
    ))))
}
