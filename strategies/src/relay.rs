//! relay: both peers attach to the rendezvous server, which splices their connections.
//!
//! The last resort: it works whenever both peers reach the server, whatever NATs are in the
//! way, at the cost of the server's bandwidth and an extra hop. Attaching needs the relay token
//! the server issued to both peers at pairing, so nobody else can attach to the session's
//! relay. The link handshake runs end to end through the relay: the server never holds the
//! session key.

use std::time::Duration;

use nettool_core::protocol::{ClientToServer, FramedConn, DEFAULT_MAX_FRAME_LEN, PROTOCOL_VERSION};
use nettool_core::relay::{await_relaying, AttachError, RelayStream};
use nettool_core::strategy::{agree_on_link, RawLink};
use nettool_core::{Attempt, Link, Strategy, StrategyError};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use serde::{Deserialize, Serialize};

/// Settings of the relay strategy: none beyond the common `timeout` (attaching to the relay
/// and the link handshake through it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RelayConfig {}

/// The strategy's name.
pub const NAME: &str = "relay";

/// Relay through the rendezvous server.
#[derive(Debug, Clone)]
pub struct Relay {
    #[allow(dead_code)]
    config: RelayConfig,
}

impl Relay {
    /// A relay strategy with these settings.
    pub fn new(config: RelayConfig) -> Self {
        Self { config }
    }
}

#[async_trait::async_trait]
impl Strategy for Relay {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let token = attempt.pairing.relay_token.clone().ok_or_else(|| {
            StrategyError::NoLink(
                "the rendezvous server does not relay (it runs with relaying turned off)".into(),
            )
        })?;
        // Lock step: both peers attach at about the same time; the offers carry the TLS
        // certificate fingerprints (the link is encrypted end to end through the relay).
        let secured = attempt
            .exchange_secure_offers::<serde_json::Value>(NAME, serde_json::json!({}))
            .await?;
        let tls = secured.link_tls(attempt.tls_role())?;
        // On a cluster the relay runs on the first peer's node, which may not be ours.
        let server = attempt.pairing.relay_addr(attempt.rendezvous.server());
        let deadline = attempt.deadline;
        let stream = tokio::time::timeout_at(deadline.into(), TcpStream::connect(server))
            .await
            .map_err(|_| StrategyError::TimedOut(format!("connecting to the relay at {server}")))?
            .map_err(|e| StrategyError::io(format!("connecting to the relay at {server}"), e))?;
        let _ = stream.set_nodelay(true);
        crate::net::link_socket_options(&stream);
        let local = stream
            .local_addr()
            .map_err(|e| StrategyError::io("reading the relay connection's address", e))?;
        let mut framed = FramedConn::new(stream, DEFAULT_MAX_FRAME_LEN);
        framed
            .send(&ClientToServer::Relay {
                version: PROTOCOL_VERSION,
                // The token alone finds the pairing: this connection is plain, so it shows
                // no session name on the path.
                session: String::new(),
                token,
                role: attempt.role(),
            })
            .await
            .map_err(|e| StrategyError::io("attaching to the relay", e))?;
        let stream = await_relaying(framed, deadline)
            .await
            .map_err(|e| match e {
                AttachError::TimedOut => StrategyError::TimedOut(e.to_string()),
                e => StrategyError::NoLink(e.to_string()),
            })?;
        let (tx, rx) = mpsc::channel(1);
        let _ = tx
            .send(RawLink {
                stream,
                local,
                remote: server,
            })
            .await;
        drop(tx);
        let upgrade = |s: RelayStream| {
            let tls = tls.clone();
            async move { tls.upgrade(s).await }
        };
        let raw = agree_on_link(
            &attempt.handshake_context(NAME),
            rx,
            upgrade,
            Duration::from_secs(10),
            deadline,
        )
        .await
        .map_err(|none| {
            let msg = format!("no authenticated link through the relay ({none})");
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
