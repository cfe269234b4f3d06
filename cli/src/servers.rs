//! Choosing a rendezvous server from `--server` (one, or several tried in order) and
//! resolving its addresses (both families).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use nettool_core::control::{ControlSecurity, KeyFingerprint, ServerTrust};

/// The rendezvous server to use, and all its addresses (see [`nettool_peer::choose_server`]),
/// with one line on stderr per server of several tried.
pub(crate) async fn choose_server(servers: &[String]) -> Result<(SocketAddr, Vec<SocketAddr>)> {
    nettool_peer::choose_server(servers, &|e| crate::say(e, false))
        .await
        .map_err(anyhow::Error::new)
}

/// Every address of a rendezvous server given as HOST or HOST:PORT (default port 8877).
pub(crate) async fn resolve_all(server: &str) -> Result<Vec<SocketAddr>> {
    nettool_peer::resolve_all(server)
        .await
        .map_err(anyhow::Error::new)
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
