//! An example nettool plugin: the `port-forwarded` strategy, for a peer whose router forwards a
//! port by hand.
//!
//! `[strategy.port-forwarded] port = N`: N is both the router's public port and the local port
//! it forwards to. Each peer listens on N, offers its public address (the one the rendezvous
//! server observed, with port N) and its own addresses, and dials the peer's. Whichever peer's
//! forward answers carries the link; when neither answers, the attempt fails with the dial
//! errors. Everything security-related comes from `nettool_core`: the per-attempt certificate
//! and pinned TLS ([`Attempt::exchange_secure_offers`], [`nettool_core::secure`]), validation of the peer's offer
//! ([`nettool_core::candidates`]) and the bound link handshake ([`agree_on_link`]).

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::candidates::{candidates, peer_candidates};
use nettool_core::registry::{typed, StrategyFactory};
use nettool_core::strategy::{agree_on_link, RawLink};
use nettool_core::{Attempt, Link, Strategy, StrategyError};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// The strategy's name.
pub const NAME: &str = "port-forwarded";

/// `[strategy.port-forwarded]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PortForwardedConfig {
    /// The port the router forwards: public port = local port. 0 = not configured.
    pub port: u16,
}

/// The factory to register.
pub fn factory() -> Arc<dyn StrategyFactory> {
    typed(
        NAME,
        "example plugin: a router forwards `port` to this host by hand",
        PortForwarded,
    )
}

/// The strategy.
#[derive(Debug)]
pub struct PortForwarded(pub PortForwardedConfig);

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    listen: Vec<SocketAddr>,
}

#[async_trait::async_trait]
impl Strategy for PortForwarded {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let port = self.0.port;
        if port == 0 {
            return Err(StrategyError::NoLink(
                "no forwarded port configured: set `port` in [strategy.port-forwarded]".into(),
            ));
        }
        let server = attempt.rendezvous.server();
        let bind = SocketAddr::new(
            if server.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            port,
        );
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|e| StrategyError::io(format!("listening on the forwarded port {bind}"), e))?;
        // The public address: the one the server observed, with the forwarded port.
        let public = SocketAddr::new(attempt.pairing.observed.ip(), port);
        // A fresh certificate, its fingerprint added to our offer, the peer's offer back and its
        // fingerprint pinned: the common start of every attempt.
        let mine = Offer {
            listen: candidates(public, public, server.ip().is_loopback()),
        };
        let payload = serde_json::to_value(&mine).expect("offer serializes");
        let secured = attempt
            .exchange_secure_offers::<Offer>(NAME, payload)
            .await?;
        let tls = secured.link_tls(attempt.tls_role())?;
        // Untrusted: only the peer's own (observed) or private addresses, at most a few.
        let peer = peer_candidates(&secured.theirs.listen, attempt.pairing.peer.ip(), server);

        let (tx, rx) = mpsc::channel::<RawLink<TcpStream>>(8);
        let (errors_tx, mut errors_rx) = mpsc::unbounded_channel::<String>();
        let mut tasks = JoinSet::new();
        for cand in peer {
            let (tx, errors) = (tx.clone(), errors_tx.clone());
            let until = Instant::now() + Duration::from_secs(3);
            tasks.spawn(async move {
                match tokio::time::timeout_at(until.into(), TcpStream::connect(cand)).await {
                    Ok(Ok(stream)) => {
                        if let (Ok(local), Ok(remote)) = (stream.local_addr(), stream.peer_addr()) {
                            let _ = tx
                                .send(RawLink {
                                    stream,
                                    local,
                                    remote,
                                })
                                .await;
                        }
                    }
                    Ok(Err(e)) => drop(errors.send(format!("dial {cand}: {e}"))),
                    Err(_) => drop(errors.send(format!("dial {cand}: no answer"))),
                }
            });
        }
        tasks.spawn(async move {
            while let Ok((stream, remote)) = listener.accept().await {
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                if tx
                    .send(RawLink {
                        stream,
                        local,
                        remote,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let upgrade = |s: TcpStream| {
            let tls = tls.clone();
            async move { tls.upgrade(s).await }
        };
        let ctx = attempt.handshake_context(NAME);
        let agreed =
            agree_on_link(&ctx, rx, upgrade, Duration::from_secs(3), attempt.deadline).await;
        tasks.abort_all();
        let raw = agreed.map_err(|none| {
            let mut dials = Vec::new();
            while let Ok(e) = errors_rx.try_recv() {
                dials.push(e);
            }
            let message = format!(
                "neither peer's forwarded port {port} answered ({none}; {})",
                if dials.is_empty() {
                    "no dial finished".to_owned()
                } else {
                    dials.join("; ")
                }
            );
            none.into_error(message)
        })?;
        Ok(Link {
            stream: Box::new(raw.stream),
            local: raw.local,
            remote: raw.remote,
            strategy: NAME,
        })
    }
}
