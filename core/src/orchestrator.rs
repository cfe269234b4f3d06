//! Runs the agreed strategies in order, in lock step with the peer, and always produces a
//! [`Report`].
//!
//! Per strategy: run it under its own timeout (capped by the overall deadline) inside an
//! `attempt` tracing span; send this peer's result to the server; wait for the peer's result.
//! A link counts only when both ends report success; otherwise both move on to the next
//! strategy together.
//!
//! With planning on (the default), each peer measures its NAT ([`crate::discovery`]) while it
//! joins and waits, both exchange the results right after pairing, and [`crate::plan`] skips
//! the strategies that cannot work for this pair (both peers decide alike, so the lock step
//! holds) and sets each attempt's timeout from the round trips. Whatever the plan, the overall
//! budget is shared so every remaining strategy keeps a turn.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, info_span, Instrument};

use crate::client::RendezvousClient;
use crate::discovery::{discover, public_address, DiscoverOptions};
use crate::handshake::LinkKey;
use crate::nat_cache::{default_gateway, NatCache};
use crate::plan::{attempt_timeout, feasible, share_budget, NatSummary};
use crate::protocol::{Role, PLAN_OFFER};
use crate::report::{AttemptReport, NatPair, Outcome, PortMapReport, Report};
use crate::strategy::{Attempt, AttemptNotes, Link, Offers, Strategy, StrategyError};
use nettool_portmap::PortMapper;

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
    plan: bool,
    nat_cache: Option<NatCache>,
    server_token: Option<String>,
    portmap: Option<PortMapper>,
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

/// How long to wait for the peer's result beyond the attempt's own deadline (never past the
/// overall deadline).
const RESULT_GRACE: Duration = Duration::from_secs(5);

impl Orchestrator {
    /// `strategies` in order of preference, each with its own timeout; `overall` bounds the
    /// whole connect, pairing included.
    pub fn new(strategies: Vec<(Arc<dyn Strategy>, Duration)>, overall: Duration) -> Self {
        Self {
            strategies,
            overall,
            plan: true,
            nat_cache: None,
            server_token: None,
            portmap: None,
        }
    }

    /// Plans the attempts from both peers' NAT behaviour (default) or, with `false`, tries
    /// every agreed strategy blindly with its configured timeout (`--plan off`, for comparison).
    pub fn with_plan(mut self, plan: bool) -> Self {
        self.plan = plan;
        self
    }

    /// Keeps discovery results in `cache` and reuses them on the same network (none by
    /// default).
    pub fn with_nat_cache(mut self, cache: Option<NatCache>) -> Self {
        self.nat_cache = cache;
        self
    }

    /// Gives `token` in the join, for a rendezvous server that requires a server token.
    pub fn with_server_token(mut self, token: Option<String>) -> Self {
        self.server_token = token;
        self
    }

    /// Maps the strategies' ports on the gateway with `mapper` (off, and silent, by default):
    /// discovery runs while joining, the plan counts a gateway that answered as making
    /// udp-quic and tcp-direct feasible, and the mappings of failed attempts are deleted.
    /// The caller keeps a clone and calls [`PortMapper::release_all`] when the link ends.
    pub fn with_portmap(mut self, mapper: Option<PortMapper>) -> Self {
        self.portmap = mapper;
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
    ///
    /// `overall` is a hard bound: whatever the peer or the server do (a result that never
    /// comes, a strategy that ignores its deadline), this returns within it. Time is read from
    /// tokio's clock, so tests can run it on a paused clock.
    pub async fn connect(
        &self,
        params: &ConnectParams,
        events: &(dyn Fn(Event) + Send + Sync),
    ) -> (Option<Link>, Report) {
        let start = now();
        let deadline = start + self.overall;
        let mut state = Progress {
            report: Report {
                session: params.session.clone(),
                role: None,
                strategy: None,
                local: None,
                remote: None,
                elapsed_ms: 0,
                attempts: Vec::new(),
                error: None,
                nat: None,
                data_path: None,
                port_mapping: None,
            },
            agreed: Vec::new(),
            current: None,
        };
        let run = self.run(params, events, deadline, &mut state);
        let link = match tokio::time::timeout_at(deadline.into(), run).await {
            Ok(link) => link,
            Err(_) => {
                // Only reachable when something inside overran its own deadline: the attempt
                // in flight is reported as timed out, the rest as skipped.
                if let Some((name, began)) = state.current.take() {
                    let entry = AttemptReport {
                        strategy: name,
                        outcome: Outcome::TimedOut,
                        elapsed_ms: ms(now().saturating_duration_since(began)),
                        error: Some("the overall deadline was reached".into()),
                        mode: None,
                        probes: None,
                    };
                    events(Event::AttemptFinished(entry.clone()));
                    state.report.attempts.push(entry);
                }
                for name in &state.agreed {
                    if !state.report.attempts.iter().any(|a| &a.strategy == name) {
                        state
                            .report
                            .attempts
                            .push(skipped(name, "the overall deadline was reached"));
                    }
                }
                state.report.error.get_or_insert_with(|| {
                    format!(
                        "the overall deadline ({:.1}s) was reached",
                        self.overall.as_secs_f64()
                    )
                });
                None
            }
        };
        let mut report = state.report;
        if !state.agreed.is_empty() {
            for name in self.names() {
                if !state.agreed.contains(&name) {
                    report
                        .attempts
                        .push(skipped(&name, "the peer does not offer this strategy"));
                }
            }
        }
        if link.is_none() && report.error.is_none() {
            report.error = Some("no strategy produced a link".into());
        }
        report.elapsed_ms = ms(now().saturating_duration_since(start));
        (link, report)
    }

    async fn run(
        &self,
        params: &ConnectParams,
        events: &(dyn Fn(Event) + Send + Sync),
        deadline: Instant,
        state: &mut Progress,
    ) -> Option<Link> {
        let names = self.names();
        let join = RendezvousClient::join_with_token(
            params.server,
            &params.session,
            &names,
            self.server_token.as_deref(),
            deadline,
            || events(Event::Waiting),
        );
        // Measure the NAT while joining and waiting for the peer (bounded: DISCOVERY's
        // time bound). A server without RFC 5780 gives "unknown", which the plan tries.
        let discovery = async {
            if !self.plan {
                return None;
            }
            let bound = DISCOVERY.time_bound();
            let cached = async {
                let cache = self.nat_cache.as_ref()?;
                let public = public_address(params.server, DISCOVERY.test_timeout)
                    .await
                    .ok()?;
                let local = local_ip_towards(params.server)?;
                let key = NatCache::key(default_gateway(), local, params.server, public.ip());
                Some((cache, key))
            };
            let cached = tokio::time::timeout(bound, cached).await.ok().flatten();
            if let Some((cache, key)) = &cached {
                if let Some(nat) = cache.get(key).await {
                    info!("NAT behaviour from the cache ({key})");
                    return Some(nat);
                }
            }
            let run = discover(params.server, &DISCOVERY);
            match tokio::time::timeout(bound, run).await {
                Ok(Ok(report)) => {
                    let nat = NatSummary::from(&report);
                    if let Some((cache, key)) = &cached {
                        cache.put(key, nat).await;
                    }
                    Some(nat)
                }
                Ok(Err(e)) => {
                    info!("NAT discovery failed: {e}");
                    None
                }
                Err(_) => None,
            }
        };
        // Ask the gateway (only with port mapping on) while joining: bounded by its timeout.
        let gateway = async {
            match &self.portmap {
                Some(m) => Some(m.discover().await),
                None => None,
            }
        };
        let (joined, mut mine, gateway) = tokio::join!(join, discovery, gateway);
        if let Some(found) = gateway {
            if let Some(nat) = mine.as_mut() {
                nat.port_mapping = !found.answered.is_empty();
            }
            state.report.port_mapping = Some(PortMapReport {
                discovery: found,
                mapped: Vec::new(),
            });
        }
        let (mut client, pairing) = match joined {
            Ok(x) => x,
            Err(e) => {
                state.report.error = Some(e.to_string());
                return None;
            }
        };
        state.report.role = Some(pairing.role);
        state.agreed = pairing.strategies.clone();
        info!(role = %pairing.role, strategies = ?pairing.strategies, "paired");
        events(Event::Paired {
            role: pairing.role,
            strategies: pairing.strategies.clone(),
        });
        let server_rtt = match client.rtt(3, deadline).await {
            Ok(rtt) => rtt,
            Err(e) => {
                state.report.error = Some(format!("measuring the server round trip: {e}"));
                return None;
            }
        };
        let secret = params.secret.as_deref().unwrap_or(&params.session);
        let key = LinkKey::derive(&params.session, secret);

        // Both peers always send their plan offer (null without a plan), so neither waits for
        // the other's; the wait is bounded for a peer that predates it.
        let plan_offer = PlanOffer {
            nat: mine,
            server_rtt_us: server_rtt.as_micros().try_into().unwrap_or(u64::MAX),
        };
        let plan_wait = (now() + PLAN_WAIT + server_rtt * 4).min(deadline);
        let theirs = client
            .exchange_offer(
                PLAN_OFFER,
                serde_json::to_value(plan_offer).expect("plan offers serialize"),
                plan_wait,
            )
            .await
            .ok()
            .and_then(|v| serde_json::from_value::<PlanOffer>(v).ok());
        let peer_rtt = theirs.as_ref().map_or(Duration::ZERO, |t| {
            Duration::from_micros(t.server_rtt_us.min(10_000_000))
        });
        let peer_nat = theirs.and_then(|t| t.nat);
        if self.plan {
            state.report.nat = Some(NatPair {
                local: mine,
                peer: peer_nat,
            });
        }
        let rtt = server_rtt.max(peer_rtt);

        let count = pairing.strategies.len();
        for (index, name) in pairing.strategies.iter().enumerate() {
            let Some((strategy, timeout)) = self.strategies.iter().find(|(s, _)| s.name() == name)
            else {
                // The server only agrees on names both offered, and we offered only ours.
                state
                    .report
                    .attempts
                    .push(skipped(name, "not available in this build"));
                continue;
            };
            let began = now();
            if began >= deadline {
                state
                    .report
                    .attempts
                    .push(skipped(name, "the overall deadline was reached"));
                continue;
            }
            if self.plan {
                if let (Some(me), Some(peer)) = (&mine, &peer_nat) {
                    if let Err(why) = feasible(name, me, peer, strategy.punches_hard_nats()) {
                        info!(strategy = %name, "skipped: {why}");
                        let entry = skipped(name, &why);
                        events(Event::AttemptFinished(entry.clone()));
                        state.report.attempts.push(entry);
                        continue;
                    }
                }
            }
            events(Event::AttemptStarted {
                strategy: name.clone(),
            });
            state.current = Some((name.clone(), began));
            let timeout = if self.plan {
                attempt_timeout(rtt, *timeout)
            } else {
                *timeout
            };
            // Keep a turn for every strategy after this one.
            let share = share_budget(
                deadline.saturating_duration_since(began),
                count - index - 1,
                BUDGET_RESERVE,
            );
            let attempt_deadline = (began + timeout.min(share)).min(deadline);
            let mut notes = AttemptNotes::default();
            let nat = match (&mine, &peer_nat) {
                (Some(me), Some(peer)) if self.plan => Some((*me, *peer)),
                _ => None,
            };
            let mut attempt = Attempt {
                session: &params.session,
                pairing: &pairing,
                key: &key,
                rendezvous: Offers::new(&mut client, name),
                server_rtt,
                deadline: attempt_deadline,
                nat,
                notes: &mut notes,
                portmap: self.portmap.as_ref().filter(|m| m.available()),
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
                        attempt_deadline.duration_since(began).as_secs_f64()
                    )),
                    None,
                ),
            };
            // Lock step: tell the peer, hear from the peer. The wait for the peer's result
            // gets a grace period past the attempt, but never past the overall deadline.
            let linked = got.is_some();
            let peer = async {
                client.send_result(name, linked, error.clone()).await?;
                client
                    .peer_result(name, (attempt_deadline + RESULT_GRACE).min(deadline))
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
                elapsed_ms: ms(now().saturating_duration_since(began)),
                error,
                mode: notes.mode.take(),
                probes: notes.probes,
            };
            state.current = None;
            events(Event::AttemptFinished(entry.clone()));
            state.report.attempts.push(entry);
            if let Some(m) = &self.portmap {
                if outcome == Outcome::Connected {
                    if let Some(r) = state.report.port_mapping.as_mut() {
                        r.mapped = m.mapped();
                    }
                } else {
                    // The attempt's sockets are gone: so must their mappings be.
                    m.release_all().await;
                }
            }
            if outcome == Outcome::Connected {
                let l = got.expect("connected implies a link");
                state.report.strategy = Some(name.clone());
                state.report.local = Some(l.local.to_string());
                state.report.remote = Some(l.remote.to_string());
                return Some(l);
            }
        }
        None
    }
}

/// The local address the host uses towards `server` (no packet is sent).
fn local_ip_towards(server: SocketAddr) -> Option<std::net::IpAddr> {
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(server).ok()?;
    Some(probe.local_addr().ok()?.ip())
}

/// Discovery while joining: short per-test waits, so a filtered test costs little.
const DISCOVERY: DiscoverOptions = DiscoverOptions {
    test_timeout: Duration::from_millis(250),
    tcp: true,
};

/// Longest wait for the peer's plan offer beyond a few round trips.
const PLAN_WAIT: Duration = Duration::from_secs(2);

/// Time kept back for each strategy after the current one.
const BUDGET_RESERVE: Duration = Duration::from_millis(2500);

/// What each peer tells the other for the plan.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PlanOffer {
    /// This peer's NAT behaviour, null when it did not measure (or plans off).
    nat: Option<NatSummary>,
    /// Its round trip to the server, microseconds.
    server_rtt_us: u64,
}

/// What [`Orchestrator::connect`] knows so far; kept outside the running future so a deadline
/// that cuts it still leaves a report.
struct Progress {
    report: Report,
    /// The agreed strategies, once paired.
    agreed: Vec<String>,
    /// The attempt in flight and when it began.
    current: Option<(String, Instant)>,
}

/// Now, on tokio's clock (the same as the system's monotonic clock unless a test paused it).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn skipped(name: &str, why: &str) -> AttemptReport {
    AttemptReport {
        strategy: name.to_owned(),
        outcome: Outcome::Skipped,
        elapsed_ms: 0,
        error: Some(why.to_owned()),
        mode: None,
        probes: None,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}
