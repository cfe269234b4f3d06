//! Runs the agreed strategies in order, in lock step with the peer, and always produces a
//! [`Report`].
//!
//! Per strategy: run it under its own timeout (capped by the overall deadline) inside an
//! `attempt` tracing span; send this peer's result to the server; wait for the peer's result.
//! A link counts only when both ends report success; otherwise both move on to the next
//! strategy together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, info_span, Instrument};

use crate::client::RendezvousClient;
use crate::handshake::LinkKey;
use crate::protocol::Role;
use crate::report::{AttemptReport, Outcome, Report};
use crate::strategy::{Attempt, Link, Offers, Strategy, StrategyError};

/// What the orchestrator reports while it works (for progress output).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Joined; the server waits for the second peer.
    Waiting,
    /// Paired with the peer.
    Paired {
        /// This peer's role.
        role: Role,
        /// The agreed strategies, in order.
        strategies: Vec<String>,
    },
    /// An attempt starts.
    AttemptStarted {
        /// The strategy.
        strategy: String,
    },
    /// An attempt ended.
    AttemptFinished(AttemptReport),
}

/// Where and whom to connect to.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// The rendezvous server.
    pub server: SocketAddr,
    /// Session name shared with the peer.
    pub session: String,
    /// Shared secret; when `None` the key is derived from the session name alone.
    pub secret: Option<String>,
}

/// Runs an ordered list of strategies.
#[derive(Clone)]
pub struct Orchestrator {
    strategies: Vec<(Arc<dyn Strategy>, Duration)>,
    overall: Duration,
    server_token: Option<String>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field(
                "strategies",
                &self
                    .strategies
                    .iter()
                    .map(|(s, t)| (s.name(), *t))
                    .collect::<Vec<_>>(),
            )
            .field("overall", &self.overall)
            .finish()
    }
}

/// How long to wait for the peer's result beyond the attempt's own deadline.
const RESULT_GRACE: Duration = Duration::from_secs(5);

impl Orchestrator {
    /// `strategies` in order of preference, each with its own timeout; `overall` bounds the
    /// whole connect, pairing included.
    pub fn new(strategies: Vec<(Arc<dyn Strategy>, Duration)>, overall: Duration) -> Self {
        Self {
            strategies,
            overall,
            server_token: None,
        }
    }

    /// Gives `token` in the join, for a rendezvous server that requires a server token.
    pub fn with_server_token(mut self, token: Option<String>) -> Self {
        self.server_token = token;
        self
    }

    /// The strategy names, in order.
    pub fn names(&self) -> Vec<String> {
        self.strategies
            .iter()
            .map(|(s, _)| s.name().to_owned())
            .collect()
    }

    /// Joins the session, runs the agreed strategies and returns the link (if any) with the
    /// report. The rendezvous connection is closed before returning.
    pub async fn connect(
        &self,
        params: &ConnectParams,
        events: &(dyn Fn(Event) + Send + Sync),
    ) -> (Option<Link>, Report) {
        let start = Instant::now();
        let deadline = start + self.overall;
        let mut report = Report {
            session: params.session.clone(),
            role: None,
            strategy: None,
            local: None,
            remote: None,
            elapsed_ms: 0,
            attempts: Vec::new(),
            error: None,
        };
        let names = self.names();
        let joined = RendezvousClient::join_with_token(
            params.server,
            &params.session,
            &names,
            self.server_token.as_deref(),
            deadline,
            || events(Event::Waiting),
        )
        .await;
        let (mut client, pairing) = match joined {
            Ok(x) => x,
            Err(e) => {
                report.error = Some(e.to_string());
                report.elapsed_ms = ms(start.elapsed());
                return (None, report);
            }
        };
        report.role = Some(pairing.role);
        info!(role = %pairing.role, strategies = ?pairing.strategies, "paired");
        events(Event::Paired {
            role: pairing.role,
            strategies: pairing.strategies.clone(),
        });
        let server_rtt = match client.rtt(3, deadline).await {
            Ok(rtt) => rtt,
            Err(e) => {
                report.error = Some(format!("measuring the server round trip: {e}"));
                report.elapsed_ms = ms(start.elapsed());
                return (None, report);
            }
        };
        let secret = params.secret.as_deref().unwrap_or(&params.session);
        let key = LinkKey::derive(&params.session, secret);

        let mut link = None;
        for name in &pairing.strategies {
            let Some((strategy, timeout)) = self.strategies.iter().find(|(s, _)| s.name() == name)
            else {
                // The server only agrees on names both offered, and we offered only ours.
                report
                    .attempts
                    .push(skipped(name, "not available in this build"));
                continue;
            };
            let now = Instant::now();
            if now >= deadline {
                report
                    .attempts
                    .push(skipped(name, "the overall deadline was reached"));
                continue;
            }
            events(Event::AttemptStarted {
                strategy: name.clone(),
            });
            let attempt_deadline = (now + *timeout).min(deadline);
            let mut attempt = Attempt {
                session: &params.session,
                pairing: &pairing,
                key: &key,
                rendezvous: Offers::new(&mut client, name),
                server_rtt,
                deadline: attempt_deadline,
            };
            let span = info_span!("attempt", strategy = %name);
            let res = tokio::time::timeout_at(
                attempt_deadline.into(),
                strategy.connect(&mut attempt).instrument(span),
            )
            .await;
            let (mut outcome, mut error, got) = match res {
                Ok(Ok(l)) => (Outcome::Connected, None, Some(l)),
                Ok(Err(e @ StrategyError::TimedOut(_))) => {
                    (Outcome::TimedOut, Some(e.to_string()), None)
                }
                Ok(Err(e)) => (Outcome::Failed, Some(e.to_string()), None),
                Err(_) => (
                    Outcome::TimedOut,
                    Some(format!(
                        "no link within {:.1}s",
                        attempt_deadline.duration_since(now).as_secs_f64()
                    )),
                    None,
                ),
            };
            // Lock step: tell the peer, hear from the peer.
            let peer = async {
                client
                    .send_result(name, got.is_some(), error.clone())
                    .await?;
                client
                    .peer_result(
                        name,
                        (attempt_deadline + RESULT_GRACE).min(deadline + RESULT_GRACE),
                    )
                    .await
            }
            .await;
            match peer {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    if got.is_some() {
                        outcome = Outcome::Failed;
                        error = Some(format!("the peer failed: {reason}"));
                    }
                }
                Err(e) => {
                    if got.is_some() {
                        outcome = Outcome::Failed;
                        error = Some(format!("no result from the peer: {e}"));
                    }
                }
            }
            let entry = AttemptReport {
                strategy: name.clone(),
                outcome,
                elapsed_ms: ms(now.elapsed()),
                error,
            };
            events(Event::AttemptFinished(entry.clone()));
            report.attempts.push(entry);
            if outcome == Outcome::Connected {
                let l = got.expect("connected implies a link");
                report.strategy = Some(name.clone());
                report.local = Some(l.local.to_string());
                report.remote = Some(l.remote.to_string());
                link = Some(l);
                break;
            }
        }
        for name in &names {
            if !pairing.strategies.contains(name) {
                report
                    .attempts
                    .push(skipped(name, "the peer does not offer this strategy"));
            }
        }
        if link.is_none() && report.error.is_none() {
            report.error = Some("no strategy produced a link".into());
        }
        report.elapsed_ms = ms(start.elapsed());
        (link, report)
    }
}

fn skipped(name: &str, why: &str) -> AttemptReport {
    AttemptReport {
        strategy: name.to_owned(),
        outcome: Outcome::Skipped,
        elapsed_ms: 0,
        error: Some(why.to_owned()),
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}
