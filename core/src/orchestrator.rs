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
//!
//! Both IP families: given every address of the server ([`Orchestrator::with_server_addresses`]),
//! the control connection races them (happy eyeballs), discovery runs per family, each peer
//! shows itself to the server over its other family right after pairing (so the peer may use
//! its candidates there), and the plan keeps a strategy when it can work on any family both
//! peers have.
//!
//! The first attempt can start at the pairing: each join carries the prepared offer of its
//! first strategy, the server hands it to the other peer with the pairing, and with both
//! offers and the agreed key each peer starts that attempt while the plan offers cross. It
//! counts only when both did and the plan tries that strategy first (both decide alike);
//! otherwise both drop it and the strategy runs in its turn with fresh offers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, info_span, Instrument};

use crate::client::{observe_family, ClientError, JoinRequest, RendezvousClient};
use crate::discovery::{discover_noting, quick_check, DiscoverOptions, DiscoveryError};
use crate::express::{self, Confirmation, ExpressStart};
use crate::handshake::{LinkKey, OneGuess};
use crate::nat_cache::{default_gateway, verify, NatCache, Verdict};
use crate::plan::{attempt_timeout, feasible, share_budget, NatSummary};
use crate::port_mapping::PortMapping;
use crate::protocol::{Role, PLAN_OFFER};
use crate::report::{AttemptReport, NatCacheReport, NatPair, Outcome, PortMapReport, Report};
use crate::strategy::{Attempt, AttemptNotes, Early, Link, Offers, Strategy, StrategyError};
use prepared::{
    EarlyAttempt, EarlyStart, JoinedSlot, Preparing, EARLY_START_OFF, PREPARED_FRESH, PREPARE_OFF,
};

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
    /// How control connections to the server are secured (TLS and the key pinned).
    control: crate::control::ControlSecurity,
    /// More addresses of the rendezvous server (the other family's), next to
    /// [`ConnectParams::server`].
    server_addresses: Vec<SocketAddr>,
    portmap: Option<Arc<dyn PortMapping>>,
    /// Join for the express relay when the relay is the only strategy ([`crate::express`]).
    express: bool,
    /// Hand a link over once its handshake agreed on it, without the lock step's wait for
    /// the peer's result (see [`Self::with_prompt_link`]).
    prompt_link: bool,
    /// Let the strategies prepare their offers while joining (see [`Self::with_prepare`]).
    prepare: bool,
    /// Start the first attempt at the pairing (see [`Self::with_early_start`]).
    early_start: bool,
    /// How long a join waits for its prepared offer (see [`Self::with_join_offers_wait`]).
    join_offers_wait: Option<Duration>,
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

/// How long to wait for the peer's result beyond the attempt's own deadline, at least eight
/// round trips (never past the overall deadline).
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
            control: crate::control::ControlSecurity::Plain,
            server_addresses: Vec::new(),
            portmap: None,
            express: false,
            prompt_link: false,
            prepare: true,
            early_start: true,
            join_offers_wait: None,
        }
    }

    /// Whether the first strategy's attempt may start at the pairing, with the prepared
    /// offers both joins carried, while the plan offers cross (on by default; a round trip
    /// sooner). It counts only when the peer started it too and the plan tries that strategy
    /// first (the report says `at_pairing`). Off, this peer starts none (its join still
    /// carries its offer: a peer that started the attempt drops it when the plan offers
    /// have crossed) and every attempt waits for the plan offers.
    pub fn with_early_start(mut self, on: bool) -> Self {
        self.early_start = on;
        self
    }

    /// How long the join waits, once connected to the server, for the prepared offer it
    /// carries (`None`, the default: half the TCP connect's round trip, 10 to 250 ms; a join
    /// whose offer is not ready by then goes without it, and no attempt starts at the
    /// pairing). Longer where preparing takes more than that (a loaded machine, loopback).
    pub fn with_join_offers_wait(mut self, wait: Option<Duration>) -> Self {
        self.join_offers_wait = wait;
        self
    }

    /// Whether the strategies prepare their offers while this peer joins and waits
    /// ([`Strategy::prepare`]; on by default): their offers then ride with the plan offer.
    /// Off, every attempt observes and exchanges its offer after pairing, as a peer that
    /// predates preparing does.
    pub fn with_prepare(mut self, on: bool) -> Self {
        self.prepare = on;
        self
    }

    /// A link goes to the caller as soon as its handshake agreed on it (the first peer's
    /// SELECT), without waiting for the peer's result through the server (a round trip and
    /// a half at the second peer). The lock step is there so both peers move on to the next
    /// strategy together; a caller with somewhere else to be (relay-first's direct half:
    /// the session stays on the relay) does not need it for a link. In the rare race where
    /// the peer gave up on its attempt just as the link was selected, the session's move to
    /// the link does not complete ([`crate::session`]) and it resumes. The last strategy of
    /// any connect hands its link over at once anyway: after it there is nothing to move on to.
    pub fn with_prompt_link(mut self, on: bool) -> Self {
        self.prompt_link = on;
        self
    }

    /// With the relay as the only strategy: joins for the express relay ([`crate::express`]):
    /// the PAKE travels with the join and a relay connection opens beside it, so the link
    /// exists when the peers are paired. A server or peer without it pairs as before, and
    /// the relay attempt runs as without it. Off by default (relay-first turns it on).
    pub fn with_express(mut self, on: bool) -> Self {
        self.express = on;
        self
    }

    /// Every address of the rendezvous server (both IP families, e.g. a host name's A and
    /// AAAA records), next to [`ConnectParams::server`]: the control connection goes to the
    /// first that answers (happy eyeballs, IPv6 first), and each family this peer reaches the
    /// server on is measured and gathered by the strategies.
    pub fn with_server_addresses(mut self, addrs: Vec<SocketAddr>) -> Self {
        self.server_addresses = addrs;
        self
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

    /// The same orchestrator with only the strategies whose name `keep` accepts (relay-first
    /// runs the relay and the direct strategies as two connects).
    pub fn retain(mut self, keep: impl Fn(&str) -> bool) -> Self {
        self.strategies.retain(|(s, _)| keep(s.name()));
        self
    }

    /// The same orchestrator with another overall deadline (a resume's remaining time).
    pub fn with_overall(mut self, overall: Duration) -> Self {
        self.overall = overall;
        self
    }

    /// Gives `token` in the join, for a rendezvous server that requires a server token.
    pub fn with_server_token(mut self, token: Option<String>) -> Self {
        self.server_token = token;
        self
    }

    /// Secures the control connections to the rendezvous server with `control` (TLS with a
    /// pinned or remembered server key; plain JSON by default, for in-process tests).
    pub fn with_control(mut self, control: crate::control::ControlSecurity) -> Self {
        self.control = control;
        self
    }

    /// Maps the strategies' ports on the gateway with `mapper` (off, and silent, by default):
    /// discovery runs while joining, the plan counts a gateway that answered as making
    /// udp-quic and tcp-direct feasible, and the mappings of failed attempts are deleted.
    /// The caller keeps a clone and calls [`PortMapping::release_all`] when the link ends.
    pub fn with_portmap(mut self, mapper: Option<Arc<dyn PortMapping>>) -> Self {
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
                pair_id: None,
                role: None,
                strategy: None,
                local: None,
                remote: None,
                elapsed_ms: 0,
                attempts: Vec::new(),
                error: None,
                nat: None,
                nat_v6: None,
                family: None,
                data_path: None,
                port_mapping: None,
                nat_cache: Vec::new(),
                resumes: Vec::new(),
                paths: Vec::new(),
                session_end: None,
                first_byte_ms: None,
                summary: None,
                wrong_code: false,
                server_rtt_ms: None,
            },
            agreed: Vec::new(),
            current: None,
            plan_skipped: Vec::new(),
            started: start,
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
                        at_pairing: false,
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
        let mut servers = vec![params.server];
        for a in &self.server_addresses {
            if !servers.contains(a) {
                servers.push(*a);
            }
        }
        let secret = params.secret.as_deref().unwrap_or(&params.session);
        let key = LinkKey::derive(&params.session, secret);
        let express = (self.express && names.len() == 1 && names[0] == crate::relay_first::RELAY)
            .then(|| ExpressStart::new(&key));
        // Every other join carries its SPAKE2 message alone: paired with a peer that did the
        // same (on a server that passes them on), both hold the key every link's handshake is
        // keyed with, one flight shorter and no PAKE of its own ([`crate::handshake`]).
        let join_pake = (express.is_none() && !JOIN_PAKE_OFF).then(|| ExpressStart::new(&key));
        // The strategies prepare (bind and observe their ports) while this side joins and
        // waits: their offers then go with the plan offer.
        let preparing = (express.is_none() && self.prepare && !PREPARE_OFF).then(|| {
            // With port mapping on, a strategy whose offer leads with the gateway's
            // mapping (made when its attempt runs) prepares nothing.
            let mut strategies = self.strategies.clone();
            if self.portmap.is_some() {
                strategies.retain(|(s, _)| s.prepares_with_port_mapping());
            }
            Preparing::start(strategies, &servers, deadline)
        });
        // The join carries the offer of this side's first strategy when it is ready in time
        // (only with the PAKE message: the attempt it allows is keyed).
        let join_offer: JoinedSlot = Arc::default();
        let join_offers = match (&preparing, &join_pake, names.first()) {
            (Some(p), Some(_), Some(first)) if p.prepares(first) => {
                Some(p.for_join(first.clone(), join_offer.clone(), self.join_offers_wait))
            }
            _ => None,
        };
        let join = RendezvousClient::join_request(
            &servers,
            &self.control,
            JoinRequest {
                session: &params.session,
                strategies: &names,
                token: self.server_token.as_deref(),
                express: express
                    .as_ref()
                    .map(ExpressStart::join)
                    .or_else(|| join_pake.as_ref().map(ExpressStart::join_pake_only)),
                offers: join_offers,
            },
            deadline,
            || events(Event::Waiting),
        );
        // The express relay's connection opens beside the join (to the first address: the
        // join's too unless that one does not answer; then the express path is not taken).
        let relay_conn = async {
            match &express {
                Some(x) => Some(express::attach(servers[0], x.ticket(), deadline).await),
                None => None,
            }
        };
        // Measure the NAT per family while joining and waiting for the peer (bounded:
        // DISCOVERY's time bound). A server without RFC 5780 gives "unknown", which the plan
        // tries; a family the server does not answer on gives nothing.
        let v4 = servers.iter().copied().find(SocketAddr::is_ipv4);
        let v6 = servers.iter().copied().find(SocketAddr::is_ipv6);
        // Both run in tasks of their own: the join does not wait for them, and what is left
        // of them runs alongside the work after pairing (the round trip, the sighting).
        let me = self.clone();
        let answered: [Arc<AtomicBool>; 2] = Default::default();
        let noting = answered.clone();
        let discovery_began = now();
        let discovery = tokio::spawn(async move {
            tokio::join!(me.measure(v4, &noting[0]), me.measure(v6, &noting[1]))
        });
        // Ask the gateway (only with port mapping on) while joining: bounded by its timeout.
        let portmap = self.portmap.clone();
        let gateway = tokio::spawn(async move {
            match portmap {
                Some(m) => Some(m.discover().await),
                None => None,
            }
        });
        let (joined, relay_conn) = tokio::join!(join, relay_conn);
        let (mut client, mut pairing) = match joined {
            Ok(x) => x,
            Err(e) => {
                let (found, gw) = tokio::join!(discovery, gateway);
                record_found(state, found.ok(), gw.ok().flatten());
                state.report.error = Some(e.to_string());
                return None;
            }
        };
        state.report.role = Some(pairing.role);
        state.report.pair_id = Some(pairing.pair_id.clone());
        state.agreed = pairing.strategies.clone();
        info!(role = %pairing.role, strategies = ?pairing.strategies, "paired");
        events(Event::Paired {
            role: pairing.role,
            strategies: pairing.strategies.clone(),
        });
        if let (Some(x), Some(peer_pake), Some(Ok(conn))) =
            (express, pairing.peer_pake.clone(), relay_conn)
        {
            discovery.abort();
            gateway.abort();
            state.report.server_rtt_ms = Some(crate::report::ms_1(conn.connect_rtt()));
            let link = self
                .express_link(
                    x,
                    conn,
                    (client, pairing, peer_pake),
                    params,
                    events,
                    deadline,
                )
                .await;
            return finish_express(state, link);
        }
        // Show this peer over its other family while measuring the round trip.
        let other_servers = client.other_family_servers();
        let sight = async {
            if other_servers.is_empty() {
                return None;
            }
            let until = (now() + SIGHTING_WAIT).min(deadline);
            match observe_family(
                &other_servers,
                &self.control,
                &params.session,
                &pairing,
                until,
            )
            .await
            {
                Ok(x) => Some(x),
                Err(e) => {
                    info!("not seen over the other IP family: {e}");
                    None
                }
            }
        };
        // The join's round trip is the server's: the attempts' timeouts only need its scale.
        let server_rtt = client.join_rtt();
        state.report.server_rtt_ms = Some(crate::report::ms_1(server_rtt));
        // What discovery has not found a few round trips after pairing it will not find in
        // time (a server without STUN, a network that drops UDP): the plan goes on without
        // it ("unknown" is tried) rather than waiting out discovery's own bound. The
        // prepared offers get the same time.
        let wait = (server_rtt * 4).max(DISCOVERY_AFTER_PAIRING);
        let mut discovery = discovery;
        let discovered = async {
            if let Ok(found) = tokio::time::timeout(wait, &mut discovery).await {
                return found.ok();
            }
            // A family whose STUN has not answered yet: wait until its silence says UDP is
            // blocked (Test I sent three times), so the plan skips the UDP strategies rather
            // than try them to their timeout.
            let quiet = |i: usize, server: Option<SocketAddr>| {
                self.plan
                    && !UDP_CHECK_OFF
                    && server.is_some()
                    && !answered[i].load(Ordering::Relaxed)
            };
            let silence =
                (discovery_began + udp_silence(server_rtt)).saturating_duration_since(now());
            if (quiet(0, v4) || quiet(1, v6)) && !silence.is_zero() {
                if let Ok(found) = tokio::time::timeout(silence, &mut discovery).await {
                    return found.ok();
                }
            }
            info!(
                "NAT discovery not done {} ms after pairing: planning without it",
                wait.as_millis()
            );
            discovery.abort();
            let blocked = |i, server| quiet(i, server).then_some(NatSummary::UDP_BLOCKED);
            let (b4, b6) = (blocked(0, v4), blocked(1, v6));
            if b4.is_some() || b6.is_some() {
                info!("no STUN answer over UDP: UDP looks blocked on this network");
            }
            (b4.is_some() || b6.is_some()).then_some(((b4, None), (b6, None)))
        };
        let prepared = async {
            match preparing {
                Some(p) => p.take(wait).await,
                None => BTreeMap::new(),
            }
        };
        // The key this join's PAKE message and the peer's agreed: the links' handshakes are
        // keyed with it when the peer says it holds it too.
        let agreed = match (join_pake, pairing.peer_pake.as_deref()) {
            (Some(start), Some(theirs)) => start
                .agreed_only(&params.session, &pairing.pair_id, pairing.role, theirs)
                .map_err(|e| info!("the peer's PAKE message with the pairing: {e}"))
                .ok(),
            _ => None,
        };
        // Both joins' offers for the first strategy are here and both peers hold the key:
        // that attempt starts now, while the plan offers cross.
        let one_guess =
            crate::code::is_code_session(&params.session).then(|| Arc::new(OneGuess::default()));
        let mut spare = None;
        let mut early_start = None;
        let joined_offer = join_offer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((name, ready)) = joined_offer {
            let theirs = pairing.peer_offers.as_ref().and_then(|o| o.get(&name));
            let strategy = self.strategies.iter().find(|(s, _)| s.name() == name);
            match (agreed, theirs, strategy) {
                (Some(agreed), Some(theirs), Some((strategy, timeout)))
                    if self.early_start
                        && !EARLY_START_OFF
                        && pairing.strategies.first() == Some(&name)
                        && ready.made().elapsed() < PREPARED_FRESH
                        && ready.servers() == client.servers() =>
                {
                    let began = now();
                    let attempt_deadline = self.attempt_deadline(
                        *timeout,
                        server_rtt,
                        began,
                        deadline,
                        pairing.strategies.len() - 1,
                    );
                    early_start = Some(EarlyStart::spawn(EarlyAttempt {
                        strategy: strategy.clone(),
                        name: name.clone(),
                        session: params.session.clone(),
                        pairing: pairing.clone(),
                        key: key.clone(),
                        servers: client.servers(),
                        server_rtt,
                        agreed,
                        one_guess: one_guess.clone(),
                        early: Early {
                            ready,
                            theirs: Some(theirs.clone()),
                        },
                        began,
                        deadline: attempt_deadline,
                    }));
                }
                _ => spare = Some((name, ready)),
            }
        }
        let (sighted, found, mut prepared) = tokio::join!(sight, discovered, prepared);
        // The join's offer, when no attempt started with it: as prepared as any (unless
        // remade since, or too old).
        if let Some((name, ready)) = spare {
            if ready.made().elapsed() < PREPARED_FRESH {
                prepared.entry(name).or_insert(ready);
            }
        }
        // The early attempt holds its strategy's prepared state: none is offered for it.
        if let Some(e) = &early_start {
            prepared.remove(&e.name);
        }
        let gw = gateway.await;
        let ((mine, cache4), (mine6, _)) = record_found(state, found, gw.ok().flatten());
        if let Some((server, addr)) = sighted {
            info!(%addr, "seen over the other IP family");
            client.set_other_family_server(server);
            pairing.observed_other = Some(addr);
        }
        // Only what was made against the server addresses the attempts will use.
        prepared.retain(|name, ready| {
            let fits = ready.servers() == client.servers();
            if !fits {
                info!(strategy = %name, "prepared for other server addresses: not offered");
            }
            fits && pairing.strategies.contains(name)
        });

        // Both peers always send their plan offer (null without a plan), so neither waits for
        // the other's; the wait is bounded for a peer that predates it.
        let plan_offer = PlanOffer {
            nat: mine,
            nat_v6: mine6,
            server_rtt_us: server_rtt.as_micros().try_into().unwrap_or(u64::MAX),
            hint: cache4.as_ref().and_then(|c| c.winner.clone()),
            offers: prepared
                .iter()
                .map(|(name, ready)| (name.clone(), ready.offer().clone()))
                .collect(),
            keyed: agreed.is_some(),
            early: early_start.as_ref().map(|e| e.name.clone()),
        };
        debug!(offers = plan_offer.offers.len(), "plan offer sent");
        let plan_wait = (now() + PLAN_WAIT + server_rtt * 4).min(deadline);
        let theirs = client
            .exchange_offer(
                PLAN_OFFER,
                serde_json::to_value(&plan_offer).expect("plan offers serialize"),
                plan_wait,
            )
            .await
            .ok()
            .and_then(|v| serde_json::from_value::<PlanOffer>(v).ok());
        // The peer showed itself over its other family before it sent its plan offer, and the
        // server queued that news before the offer: it has arrived by now.
        pairing.peer_other = client
            .peer_addresses()
            .iter()
            .copied()
            .find(|a| a.is_ipv4() != pairing.peer.is_ipv4());
        let peer_rtt = theirs.as_ref().map_or(Duration::ZERO, |t| {
            Duration::from_micros(t.server_rtt_us.min(10_000_000))
        });
        // The strategies that last won from each side's network go first (a hint: the plan
        // still skips what cannot work). Only when both offers arrived, so both peers order
        // alike: the first peer's hint, then the second's.
        if self.plan {
            if let Some(t) = &theirs {
                let mine_hint = plan_offer.hint.as_deref();
                let hints = match pairing.role {
                    Role::First => [mine_hint, t.hint.as_deref()],
                    Role::Second => [t.hint.as_deref(), mine_hint],
                };
                let ordered = hinted_order(&pairing.strategies, hints);
                if ordered != pairing.strategies {
                    info!(order = ?ordered, "strategies that won before go first");
                    pairing.strategies = ordered;
                    state.agreed = pairing.strategies.clone();
                }
            }
        }
        // Keyed handshakes (and TLS roles swapped) only when both said they hold the key.
        let agreed = agreed.filter(|_| theirs.as_ref().is_some_and(|t| t.keyed));
        // The attempt started at the pairing counts only when the peer started it too.
        let peer_early = theirs.as_ref().and_then(|t| t.early.as_deref());
        let early_start = early_start.filter(|e| {
            let both = agreed.is_some() && peer_early == Some(e.name.as_str());
            if !both {
                info!(strategy = %e.name, "the peer did not start it at the pairing: dropped (it runs in its turn)");
            }
            both
        });
        let (peer_nat, peer_nat6, peer_offers) = theirs
            .map_or((None, None, BTreeMap::new()), |t| {
                (t.nat, t.nat_v6, t.offers)
            });
        let early = prepared
            .into_iter()
            .map(|(name, ready)| {
                let theirs = peer_offers.get(&name).cloned();
                (name, Early { ready, theirs })
            })
            .collect();
        if self.plan {
            state.report.nat = Some(NatPair {
                local: mine,
                peer: peer_nat,
            });
            if mine6.is_some() || peer_nat6.is_some() {
                state.report.nat_v6 = Some(NatPair {
                    local: mine6,
                    peer: peer_nat6,
                });
            }
        }
        let families = [(mine, peer_nat), (mine6, peer_nat6)];
        let rtt = server_rtt.max(peer_rtt);
        let paired = Paired {
            client,
            pairing,
            key,
            server_rtt,
            rtt,
            families,
            early,
            agreed,
            early_start,
            one_guess,
        };
        let link = self.attempts(params, events, deadline, state, paired).await;
        if let Some(c) = &cache4 {
            self.learn(c, state).await;
        }
        link
    }

    /// The express relay's link once paired: the spliced relay connection under the record
    /// layer keyed from the PAKE; the peer's confirmation comes with its first data. The
    /// control connection stays open until that confirmation is decided, to burn a code
    /// whose confirmation failed (one guess per code).
    async fn express_link(
        &self,
        start: ExpressStart,
        conn: express::TicketedRelay,
        (client, pairing, peer_pake): (RendezvousClient, crate::client::Pairing, String),
        params: &ConnectParams,
        events: &(dyn Fn(Event) + Send + Sync),
        deadline: Instant,
    ) -> (Result<Link, String>, AttemptReport) {
        let began = now();
        events(Event::AttemptStarted {
            strategy: crate::relay_first::RELAY.to_owned(),
        });
        let made = async {
            let (stream, local, remote) = conn.relaying(deadline).await?;
            let sealed = start
                .finish(
                    &params.session,
                    &pairing.pair_id,
                    pairing.role,
                    &peer_pake,
                    stream,
                )
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((sealed, local, remote))
        }
        .await;
        let link = made.map(|(mut sealed, local, remote)| {
            // The verdict is passed on once a wrong code is reported (burned).
            let mut raw = sealed.confirmation();
            let (settled, watched) = tokio::sync::watch::channel(express::Verdict::Pending);
            sealed.settle_through(Confirmation(watched));
            let code = crate::code::is_code_session(&params.session);
            let session = params.session.clone();
            tokio::spawn(async move {
                let mut client = client;
                // The server tells a code session's peer when the other side's confirmation
                // failed (it burned the code): the relay may end before our own check.
                let burned = || express::Verdict::Failed(ClientError::WrongCode.to_string());
                let mut verdict = tokio::select! {
                    v = raw.decided() => v,
                    Err(ClientError::WrongCode) = client.until_closed(deadline) => burned(),
                };
                if verdict == express::Verdict::Pending {
                    // The link went away before the peer's confirmation came: the server may
                    // still say why (it burned the code).
                    let soon = (now() + Duration::from_secs(2)).min(deadline);
                    if let Err(ClientError::WrongCode) = client.until_closed(soon).await {
                        verdict = burned();
                    }
                }
                if let express::Verdict::Failed(why) = &verdict {
                    info!("express relay: the peer's key confirmation failed: {why}");
                    if code && !why.contains("wrong code") {
                        if let Err(e) = client.report_bad_code(&session).await {
                            info!("could not report the wrong code to the server: {e}");
                        }
                    }
                }
                settled.send_replace(verdict);
            });
            Link {
                stream: Box::new(sealed),
                local,
                remote,
                strategy: crate::relay_first::RELAY,
            }
        });
        let entry = AttemptReport {
            strategy: crate::relay_first::RELAY.to_owned(),
            outcome: if link.is_ok() {
                Outcome::Connected
            } else {
                Outcome::Failed
            },
            elapsed_ms: ms(now().saturating_duration_since(began)),
            error: link.as_ref().err().cloned(),
            mode: Some("express".into()),
            probes: None,
            at_pairing: false,
        };
        events(Event::AttemptFinished(entry.clone()));
        (link, entry)
    }

    /// After the attempts: remembers the winner for this network, or drops the cached entry
    /// when the plan built on it proved wrong (a strategy it chose failed before a later one
    /// won, or it skipped strategies and the link ended on the relay or nowhere).
    async fn learn(&self, cache: &CacheUse, state: &mut Progress) {
        let Some(nat_cache) = &self.nat_cache else {
            return;
        };
        let report = &state.report;
        let winner = report.strategy.clone();
        let failed: Vec<&str> = report
            .attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Failed | Outcome::TimedOut))
            .map(|a| a.strategy.as_str())
            .collect();
        let direct_won = winner.as_deref().is_some_and(|w| w != "relay");
        let why = if !failed.is_empty() && report.role.is_some() {
            Some(format!(
                "{} failed although the plan expected it to work",
                failed.join(", ")
            ))
        } else if !direct_won && !state.plan_skipped.is_empty() {
            Some(format!(
                "the plan skipped {} and no direct strategy linked",
                state.plan_skipped.join(", ")
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                info!("NAT cache entry dropped: {why}");
                nat_cache.remove(&cache.key).await;
                if let Some(r) = state
                    .report
                    .nat_cache
                    .iter_mut()
                    .find(|r| r.family == "ipv4")
                {
                    r.invalidated = Some(why);
                }
            }
            None => {
                if let (Some(w), true) = (winner, direct_won) {
                    let ms = ms(now().saturating_duration_since(state.started));
                    nat_cache.record_winner(&cache.key, &w, ms).await;
                }
            }
        }
    }

    /// NAT behaviour towards `server` (one family; `None` without an address of it, with
    /// plans off, or when the server does not answer there). With a cache: a cached entry for
    /// this network is used only after a quick check of the mapping confirms it; a
    /// contradiction drops it and discovery runs afresh; only complete results are stored.
    ///
    /// `answered` is set once the server's STUN answered over UDP; a server that never does
    /// gives [`NatSummary::UDP_BLOCKED`].
    async fn measure(
        &self,
        server: Option<SocketAddr>,
        answered: &AtomicBool,
    ) -> (Option<NatSummary>, Option<CacheUse>) {
        let Some(server) = server else {
            return (None, None);
        };
        if !self.plan {
            return (None, None);
        }
        let bound = DISCOVERY.time_bound();
        let began = now();
        let mut cache_use = None;
        // Discovery starts at once, beside the cache's quick check rather than after it (a
        // miss then costs no extra round trips); a confirmed entry drops it.
        let run = tokio::time::timeout(bound, discover_noting(server, &DISCOVERY, Some(answered)));
        tokio::pin!(run);
        let mut ran = None;
        if let Some(cache) = &self.nat_cache {
            let checked = tokio::time::timeout(
                bound,
                quick_check(server, DISCOVERY.first_timeout(), DISCOVERY.tcp),
            );
            tokio::pin!(checked);
            let checked = loop {
                tokio::select! {
                    checked = &mut checked => break checked,
                    r = &mut run, if ran.is_none() => ran = Some(r),
                }
            };
            if let Ok(Ok(check)) = checked {
                answered.store(true, Ordering::Relaxed);
                let key = NatCache::key(
                    default_gateway(),
                    check.udp.local.ip(),
                    server,
                    check.udp.towards_server.ip(),
                );
                let mut report = NatCacheReport::new("miss");
                if let Some(entry) = cache.get(&key).await {
                    report.age_s = Some(entry.age_secs());
                    // A test-only build trusts the entry unchecked, to watch the tests
                    // that guard the check go red.
                    let verdict = if CACHE_VERIFY_OFF {
                        Verdict::Confirmed
                    } else {
                        verify(&entry.nat, &check)
                    };
                    match verdict {
                        Verdict::Confirmed => {
                            info!("NAT behaviour from the cache, confirmed ({key})");
                            report.state = "verified".into();
                            let winner = entry
                                .winner
                                .as_ref()
                                .map(|w| w.strategy.clone())
                                .filter(|w| w != "relay");
                            return (
                                Some(entry.nat),
                                Some(CacheUse {
                                    key,
                                    report,
                                    winner,
                                }),
                            );
                        }
                        Verdict::Contradicted(why) => {
                            info!("NAT cache entry contradicted, measuring afresh: {why}");
                            cache.remove(&key).await;
                            report.state = "contradicted".into();
                            report.detail = Some(why);
                        }
                        Verdict::Unverifiable(why) => {
                            info!("NAT cache entry not verifiable, measuring afresh: {why}");
                            report.state = "unverifiable".into();
                            report.detail = Some(why);
                        }
                    }
                }
                cache_use = Some((cache, key, check, report));
            }
        }
        let ran = match ran {
            Some(r) => r,
            None => run.await,
        };
        debug!(
            ms = ms(now().saturating_duration_since(began)),
            found = ?ran.as_ref().ok().and_then(|r| r.as_ref().ok()).map(NatSummary::from),
            "NAT discovery done"
        );
        let nat = match ran {
            Ok(Ok(report)) => Some(NatSummary::from(&report)),
            Ok(Err(e @ DiscoveryError::NoAnswer(_))) if !UDP_CHECK_OFF => {
                info!("NAT discovery: {e}: UDP looks blocked on this network");
                Some(NatSummary::UDP_BLOCKED)
            }
            Ok(Err(e)) => {
                info!("NAT discovery failed: {e}");
                None
            }
            Err(_) => None,
        };
        let cache_use = match cache_use {
            Some((cache, key, check, mut report)) => {
                let stored = match nat {
                    Some(nat) if !nat.udp_blocked => cache.put(&key, nat, Some(check)).await,
                    _ => false,
                };
                if !stored {
                    report.detail.get_or_insert_with(|| {
                        "not stored: the measurement is incomplete".to_owned()
                    });
                }
                Some(CacheUse {
                    key,
                    report,
                    winner: None,
                })
            }
            None => None,
        };
        (nat, cache_use)
    }

    /// When an attempt that begins at `began` must end: its strategy's `timeout` (from the
    /// round trip `rtt` with a plan), leaving a turn for each of the `after` strategies
    /// after it, within the overall `deadline`.
    fn attempt_deadline(
        &self,
        timeout: Duration,
        rtt: Duration,
        began: Instant,
        deadline: Instant,
        after: usize,
    ) -> Instant {
        let timeout = if self.plan {
            attempt_timeout(rtt, timeout)
        } else {
            timeout
        };
        let share = share_budget(
            deadline.saturating_duration_since(began),
            after,
            BUDGET_RESERVE.max(rtt * 10),
        );
        (began + timeout.min(share)).min(deadline)
    }

    /// Runs the agreed strategies in order (the part of [`Self::run`] after pairing).
    async fn attempts(
        &self,
        params: &ConnectParams,
        events: &(dyn Fn(Event) + Send + Sync),
        deadline: Instant,
        state: &mut Progress,
        paired: Paired,
    ) -> Option<Link> {
        let Paired {
            mut client,
            pairing,
            key,
            server_rtt,
            rtt,
            families,
            mut early,
            agreed,
            mut early_start,
            one_guess,
        } = paired;
        let count = pairing.strategies.len();
        // A code session allows one guess (`one_guess`): a failed key confirmation (here, or
        // the peer's reported by the server) ends the connect; no other strategy is tried.
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
                if let Err(why) = feasible_on_any(name, &families, strategy.punches_hard_nats()) {
                    info!(strategy = %name, "skipped: {why}");
                    state.plan_skipped.push(name.clone());
                    let entry = skipped(name, &why);
                    events(Event::AttemptFinished(entry.clone()));
                    state.report.attempts.push(entry);
                    continue;
                }
            }
            // The attempt started at the pairing is this one, or none: it stops.
            let started = early_start.take().filter(|e| e.name == *name);
            events(Event::AttemptStarted {
                strategy: name.clone(),
            });
            let at_pairing = started.is_some();
            let (res, began, attempt_deadline, mut notes) = match started {
                Some(e) => {
                    let (began, attempt_deadline) = (e.began, e.deadline);
                    state.current = Some((name.clone(), began));
                    let (res, notes) = e.finish().await;
                    (res, began, attempt_deadline, notes)
                }
                None => {
                    state.current = Some((name.clone(), began));
                    let attempt_deadline =
                        self.attempt_deadline(*timeout, rtt, began, deadline, count - index - 1);
                    let mut notes = AttemptNotes::default();
                    // The strategy sees the IPv4 NATs (birthday punching is for IPv4) unless
                    // plain punching works on IPv6, which it then tries alongside.
                    let nat = match families {
                        [(Some(me), Some(peer)), v6] if self.plan => {
                            let v6_plain = matches!(v6, (Some(a), Some(b)) if feasible(name, &a, &b, false).is_ok());
                            (!v6_plain).then_some((me, peer))
                        }
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
                        portmap: self.portmap.as_deref().filter(|m| m.available()),
                        one_guess: one_guess.clone(),
                        agreed,
                        early: early.remove(name),
                    };
                    let span = info_span!("attempt", strategy = %name);
                    let res = tokio::time::timeout_at(
                        attempt_deadline.into(),
                        strategy.connect(&mut attempt).instrument(span),
                    )
                    .await;
                    drop(attempt);
                    (res, began, attempt_deadline, notes)
                }
            };
            let told = matches!(
                &res,
                Ok(Err(StrategyError::Rendezvous(ClientError::WrongCode)))
            );
            let guessed = one_guess.as_ref().is_some_and(|g| g.failed());
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
            let mut wrong_code = guessed || told;
            if guessed {
                // Burn the code (the server tells the peer); no lock step after a wrong code.
                if let Err(e) = client.report_bad_code(&params.session).await {
                    info!("could not report the wrong code to the server: {e}");
                }
            }
            let prompt = linked && (self.prompt_link || index + 1 == count);
            let peer = async {
                if wrong_code {
                    return Ok(Err("a wrong code".to_owned()));
                }
                if prompt {
                    // Sent (queued whole; it goes out even when the client is dropped), not
                    // waited for.
                    return client.send_result(name, true, None).await.map(Ok);
                }
                // Read the peer's result even when ours could not be sent: a server that
                // burned a code says so (WrongCode) before it closes the connection.
                let sent = client.send_result(name, linked, error.clone()).await;
                let heard = client
                    .peer_result(
                        name,
                        (attempt_deadline + RESULT_GRACE.max(rtt * 8)).min(deadline),
                    )
                    .await;
                match (sent, heard) {
                    (_, Err(ClientError::WrongCode)) => Err(ClientError::WrongCode),
                    (Err(e), _) => Err(e),
                    (Ok(()), heard) => heard,
                }
            }
            .await;
            match peer {
                Ok(Ok(())) => {}
                Err(ClientError::WrongCode) => {
                    wrong_code = true;
                    outcome = Outcome::Failed;
                    error = Some(ClientError::WrongCode.to_string());
                }
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
                at_pairing,
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
            if wrong_code {
                drop(got);
                state.report.wrong_code = true;
                state.report.error = Some(if guessed {
                    "key confirmation failed: someone tried a wrong code (the code is burned)"
                        .into()
                } else {
                    "the peer's key confirmation failed: a wrong code (the code is burned)".into()
                });
                return None;
            }
            if outcome == Outcome::Connected {
                let l = got.expect("connected implies a link");
                record_link(&mut state.report, &l);
                return Some(l);
            }
        }
        None
    }
}

/// What discovery and the gateway found, for the plan: into the report (the NAT cache's
/// use per family, the gateway's answer); this side's NAT per family and the caches.
#[allow(clippy::type_complexity)]
fn record_found(
    state: &mut Progress,
    found: Option<(
        (Option<NatSummary>, Option<CacheUse>),
        (Option<NatSummary>, Option<CacheUse>),
    )>,
    gateway: Option<crate::port_mapping::Discovery>,
) -> (
    (Option<NatSummary>, Option<CacheUse>),
    (Option<NatSummary>, Option<CacheUse>),
) {
    let ((mut mine, cache4), (mine6, cache6)) = found.unwrap_or(((None, None), (None, None)));
    for (family, c) in [("ipv4", &cache4), ("ipv6", &cache6)] {
        if let Some(c) = c {
            let mut r = c.report.clone();
            r.family = family.to_owned();
            state.report.nat_cache.push(r);
        }
    }
    if let Some(found) = gateway {
        if let Some(nat) = mine.as_mut() {
            nat.port_mapping = !found.answered.is_empty();
        }
        state.report.port_mapping = Some(PortMapReport {
            discovery: found,
            mapped: Vec::new(),
        });
    }
    ((mine, cache4), (mine6, cache6))
}

/// Puts the express relay's attempt into the report; the link, if it was made.
fn finish_express(
    state: &mut Progress,
    (link, entry): (Result<Link, String>, AttemptReport),
) -> Option<Link> {
    state.report.attempts.push(entry);
    let l = link.ok()?;
    record_link(&mut state.report, &l);
    Some(l)
}

/// The link that won, in the report: its strategy, addresses and IP family.
fn record_link(report: &mut Report, l: &Link) {
    report.strategy = Some(l.strategy.to_owned());
    report.local = Some(l.local.to_string());
    report.remote = Some(l.remote.to_string());
    report.family = Some(
        if l.remote.ip().to_canonical().is_ipv6() {
            "ipv6"
        } else {
            "ipv4"
        }
        .to_owned(),
    );
}

/// Discovery while joining: short per-test waits, so a filtered test costs little.
const DISCOVERY: DiscoverOptions = DiscoverOptions {
    test_timeout: Duration::from_millis(250),
    tcp: true,
};

/// Least time discovery gets after pairing (and the server's round trip) before the plan
/// goes on without it; four server round trips when that is longer.
const DISCOVERY_AFTER_PAIRING: Duration = Duration::from_millis(500);

/// Longest wait for showing this peer to the server over its other IP family.
const SIGHTING_WAIT: Duration = Duration::from_millis(1500);

/// Whether `name` can work on at least one family both peers measured (`families`: this
/// side's and the peer's NAT, IPv4 then IPv6): `Err` with every family's reason when it cannot
/// on any. Nothing measured on both sides for any family: it is tried.
fn feasible_on_any(
    name: &str,
    families: &[(Option<NatSummary>, Option<NatSummary>); 2],
    punches_hard_nats: bool,
) -> Result<(), String> {
    let mut reasons = Vec::new();
    for ((me, peer), family) in families.iter().zip(["IPv4", "IPv6"]) {
        if let (Some(me), Some(peer)) = (me, peer) {
            match feasible(name, me, peer, punches_hard_nats) {
                Ok(()) => return Ok(()),
                Err(why) => reasons.push((family, why)),
            }
        }
    }
    match reasons.len() {
        0 => Ok(()),
        // Only IPv4 measured: the reason as it always read.
        1 if reasons[0].0 == "IPv4" => Err(reasons.remove(0).1),
        _ => Err(reasons
            .into_iter()
            .map(|(f, why)| format!("{f}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Longest wait for the peer's plan offer beyond a few round trips.
const PLAN_WAIT: Duration = Duration::from_secs(2);

/// Time kept back for each strategy after the current one (at least ten round trips).
const BUDGET_RESERVE: Duration = Duration::from_millis(2500);

/// What each peer tells the other for the plan.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PlanOffer {
    /// This peer's NAT behaviour on IPv4, null when it did not measure (or plans off).
    nat: Option<NatSummary>,
    /// The same on IPv6 (absent from peers that predate it).
    #[serde(default)]
    nat_v6: Option<NatSummary>,
    /// Its round trip to the server, microseconds.
    server_rtt_us: u64,
    /// The strategy that last won from this peer's network (absent from older peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
    /// The offers this peer prepared before pairing, by strategy ([`Strategy::prepare`];
    /// absent from older peers, which then exchange every offer in its attempt).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    offers: BTreeMap<String, serde_json::Value>,
    /// Whether this peer holds the key its join's PAKE message agreed with the peer's
    /// ([`crate::handshake::AgreedKey`]);
    /// absent (false) from older peers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    keyed: bool,
    /// The strategy whose attempt this peer started at the pairing with both joins' offers
    /// ([`prepared::EarlyStart`]); absent when none (and from older peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    early: Option<String>,
}

/// Whether silence from the server's STUN is ignored (a test-only build, to watch the test
/// that guards it go red): `NETTOOL_TEST_UDP_CHECK_OFF=1` at compile time.
const UDP_CHECK_OFF: bool = option_env!("NETTOOL_TEST_UDP_CHECK_OFF").is_some();

/// How long after discovery began no STUN answer over UDP means UDP is blocked: Test I has
/// then been sent three times (at 0, 250 and 750 ms) and each had time for its answer.
fn udp_silence(server_rtt: Duration) -> Duration {
    Duration::from_millis(800) + server_rtt * 2
}

/// Whether joins carry no PAKE message of their own (a test-only build, to watch the test that
/// guards the keyed handshakes of a plain connect go red): `NETTOOL_TEST_JOIN_PAKE_OFF=1` at
/// compile time.
const JOIN_PAKE_OFF: bool = option_env!("NETTOOL_TEST_JOIN_PAKE_OFF").is_some();

/// Whether the NAT cache's quick check is ignored (a test-only build, to watch the tests that
/// guard it go red): `NETTOOL_TEST_CACHE_VERIFY_OFF=1` at compile time.
const CACHE_VERIFY_OFF: bool = option_env!("NETTOOL_TEST_CACHE_VERIFY_OFF").is_some();

/// What the NAT cache gave one family's measurement.
struct CacheUse {
    /// The network's key.
    key: String,
    /// For the report.
    report: NatCacheReport,
    /// The direct strategy that last won from this network (only from a confirmed entry).
    winner: Option<String>,
}

/// `agreed` with the hinted strategies first (`hints`: the first peer's, then the second's),
/// the rest in their order. The relay is never moved: it always works, so a hint for it would
/// keep every later connect off the direct paths.
fn hinted_order(agreed: &[String], hints: [Option<&str>; 2]) -> Vec<String> {
    let mut front: Vec<String> = Vec::new();
    for h in hints.into_iter().flatten() {
        if h != "relay" && agreed.iter().any(|a| a == h) && !front.iter().any(|f| f == h) {
            front.push(h.to_owned());
        }
    }
    let rest: Vec<String> = agreed
        .iter()
        .filter(|a| !front.contains(a))
        .cloned()
        .collect();
    front.extend(rest);
    front
}

/// What pairing and the plan exchange produced, for the attempts.
struct Paired {
    client: RendezvousClient,
    pairing: crate::client::Pairing,
    key: LinkKey,
    /// This peer's round trip to the server.
    server_rtt: Duration,
    /// The larger of both peers' round trips to the server.
    rtt: Duration,
    /// Both peers' NAT behaviour per family (this side's, the peer's): IPv4, then IPv6.
    families: [(Option<NatSummary>, Option<NatSummary>); 2],
    /// The prepared offers by strategy (this side's, the peer's when it sent them).
    early: BTreeMap<String, Early>,
    /// The agreed key, when both peers hold it.
    agreed: Option<crate::handshake::AgreedKey>,
    /// The first strategy's attempt, when both peers started it at the pairing.
    early_start: Option<EarlyStart>,
    /// Set in a code session (one guess).
    one_guess: Option<Arc<OneGuess>>,
}

/// What [`Orchestrator::connect`] knows so far; kept outside the running future so a deadline
/// that cuts it still leaves a report.
struct Progress {
    report: Report,
    /// The agreed strategies, once paired.
    agreed: Vec<String>,
    /// The attempt in flight and when it began.
    current: Option<(String, Instant)>,
    /// The strategies the plan skipped.
    plan_skipped: Vec<String>,
    /// When the connect began.
    started: Instant,
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
        at_pairing: false,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

mod prepared;
#[cfg(test)]
mod tests;
