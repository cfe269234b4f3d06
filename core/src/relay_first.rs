//! Relay-first: the first byte over the relay, then a lossless move to a direct path.
//!
//! One connect becomes two pairings through the same rendezvous server, started together:
//! the relay alone (no NAT measurement to wait for) under the session's own name, and the
//! direct strategies (planned from both NATs, in lock step, as a plain connect) under a name
//! and secret derived from the session key, so both peers find the second pairing without a
//! word and the server cannot tie it to the first. When the relay links, data flows at once;
//! the direct connect's link, when it comes, is handed to the session, which moves to it at a
//! sequence boundary ([`crate::session::Session::with_upgrades`]). When the relay does not
//! link although the peers paired (a server that does not relay), the direct connect's outcome
//! is the connect's, as without relay-first; when the relay's join did not even pair (the
//! server refused it or was not reached), the connect fails at once with the server's reason.
//! Which link the session starts on is decided by the relay's outcome alone, which both peers
//! learn in lock step: they never start on different links.
//!
//! The relay half joins for the express relay ([`crate::express`]): the link exists when the
//! peers are paired, and the peer's key confirmation rides with its first data; the caller
//! watches it ([`Link::confirmation`]) and treats a failed one as no link.

use tokio::task::JoinHandle;

use crate::orchestrator::{ConnectParams, Event, Orchestrator};
use std::sync::{Arc, Mutex};

use crate::report::{AttemptReport, Outcome, Report};
use crate::strategy::Link;
use crate::LinkKey;

/// The relay strategy's name.
pub const RELAY: &str = "relay";

/// The direct half of a relay-first connect, running in the background, and how far it got.
pub struct DirectConnect {
    /// The connect (its link, if any, and its report).
    pub handle: JoinHandle<(Option<Link>, Report)>,
    /// Its progress so far, for the report when it is cancelled ([`DirectProgress::cancelled`]).
    pub progress: DirectProgress,
}

/// How far a direct connect got: its pairing, the attempts started and those finished.
#[derive(Debug, Clone, Default)]
pub struct DirectProgress(Arc<Mutex<Live>>);

#[derive(Debug, Default)]
struct Live {
    began: Option<std::time::Instant>,
    /// The agreed strategies, once paired.
    agreed: Option<Vec<String>>,
    started: Vec<(String, std::time::Instant)>,
    finished: Vec<AttemptReport>,
}

impl DirectProgress {
    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn event(&self, e: &Event) {
        let mut live = self.live();
        match e {
            Event::Paired { strategies, .. } => live.agreed = Some(strategies.clone()),
            Event::AttemptStarted { strategy } => live
                .started
                .push((strategy.clone(), std::time::Instant::now())),
            Event::AttemptFinished(r) => live.finished.push(r.clone()),
            _ => {}
        }
    }

    /// The report's entries for a direct connect stopped before it ended: the attempts that
    /// finished as they did, the one running as `cancelled` with its elapsed time, and the
    /// strategies not reached yet as `cancelled` with the phase the connect was in.
    pub fn cancelled(&self, strategies: &[String]) -> Vec<AttemptReport> {
        let live = self.live();
        let mut out = live.finished.clone();
        let done = |name: &str| out.iter().any(|a: &AttemptReport| a.strategy == name);
        let mut running = Vec::new();
        for (name, at) in &live.started {
            if !done(name) {
                running.push(AttemptReport {
                    strategy: name.clone(),
                    outcome: Outcome::Cancelled,
                    elapsed_ms: at.elapsed().as_millis().try_into().unwrap_or(u64::MAX),
                    error: Some("the session ended before this attempt finished".into()),
                    mode: None,
                    probes: None,
                    at_pairing: false,
                });
            }
        }
        out.extend(running);
        let phase = match (&live.agreed, live.started.last()) {
            (None, _) => "joining its pairing".to_owned(),
            (Some(_), None) => "planning: NAT discovery and the plan offers".to_owned(),
            (Some(_), Some((running, _))) => format!("trying {running}"),
        };
        let waited = live.began.map_or(0, |b| {
            b.elapsed().as_millis().try_into().unwrap_or(u64::MAX)
        });
        let names = live.agreed.clone().unwrap_or_else(|| strategies.to_vec());
        for name in names {
            if !out.iter().any(|a| a.strategy == name) {
                out.push(AttemptReport {
                    strategy: name,
                    outcome: Outcome::Cancelled,
                    elapsed_ms: waited,
                    error: Some(format!(
                        "the session ended before this attempt started (the direct connect was \
                         still {phase})"
                    )),
                    mode: None,
                    probes: None,
                    at_pairing: false,
                });
            }
        }
        out
    }
}

/// What [`connect`] gives.
pub struct RelayFirst {
    /// The link the session starts on (the relay's; the direct one when the relay failed).
    pub link: Option<Link>,
    /// The report so far (the relay's attempt; with the direct attempts when they are over).
    pub report: Report,
    /// The direct connect, still running, when the session starts on the relay.
    pub direct: Option<DirectConnect>,
}

/// Whether relay-first applies to these strategies: the relay and at least one other.
pub fn applies(orch: &Orchestrator) -> bool {
    let names = orch.names();
    names.iter().any(|n| n == RELAY) && names.iter().any(|n| n != RELAY)
}

/// The rendezvous name and secret of the direct half of `params`: derived from its key.
pub fn direct_params(params: &ConnectParams) -> ConnectParams {
    let secret = params.secret.as_deref().unwrap_or(&params.session);
    let key = LinkKey::derive(&params.session, secret);
    let name = key.derive_labeled("nettool relay-first direct name v1", b"");
    let secret = key.derive_labeled("nettool relay-first direct secret v1", b"");
    ConnectParams {
        server: params.server,
        session: format!("direct-{}", hex::encode(&name[..16])),
        secret: Some(hex::encode(secret)),
    }
}

/// How the direct half's pairing is named (both peers derive it alike, and the server cannot
/// tie it to the relay's pairing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectNaming {
    /// From the session key alone ([`direct_params`]): the direct half joins at once, beside
    /// the relay. Unique while one pair at a time uses the session (`connect`).
    FromKey,
    /// From the session key and the relay pairing's id ([`direct_params_for`]): the direct
    /// half joins once the relay linked, a little later, but unique per pairing, for a side
    /// that pairs with several peers under one session at once (`expose`). When the relay does
    /// not link, the direct half runs under [`Self::FromKey`]'s name, as both peers then do.
    PerPairing,
}

/// The rendezvous name and secret of the direct half of `params` after the relay paired as
/// `pair_id`: derived from the key and the pairing.
pub fn direct_params_for(params: &ConnectParams, pair_id: &str) -> ConnectParams {
    let secret = params.secret.as_deref().unwrap_or(&params.session);
    let key = LinkKey::derive(&params.session, secret);
    let name = key.derive_labeled(
        "nettool relay-first direct name per pairing v1",
        pair_id.as_bytes(),
    );
    let secret = key.derive_labeled(
        "nettool relay-first direct secret per pairing v1",
        pair_id.as_bytes(),
    );
    ConnectParams {
        server: params.server,
        session: format!("direct-{}", hex::encode(&name[..16])),
        secret: Some(hex::encode(secret)),
    }
}

/// Runs the relay and the direct strategies of `orch` together (see the module docs);
/// `events` sees the relay connect's progress.
pub async fn connect(
    orch: &Orchestrator,
    params: &ConnectParams,
    events: &(dyn Fn(Event) + Send + Sync),
) -> RelayFirst {
    connect_named(orch, params, events, DirectNaming::FromKey).await
}

/// [`connect`] with the direct half's pairing named as `naming` says.
pub async fn connect_named(
    orch: &Orchestrator,
    params: &ConnectParams,
    events: &(dyn Fn(Event) + Send + Sync),
    naming: DirectNaming,
) -> RelayFirst {
    let relay = orch
        .clone()
        .retain(|n| n == RELAY)
        .with_plan(false)
        .with_express(true);
    let direct_orch = orch.clone().retain(|n| n != RELAY).with_prompt_link(true);
    let start = |dparams: ConnectParams| {
        let direct = direct_orch.clone();
        let progress = DirectProgress::default();
        progress.live().began = Some(std::time::Instant::now());
        let seen = progress.clone();
        let handle =
            tokio::spawn(async move { direct.connect(&dparams, &move |e| seen.event(&e)).await });
        DirectConnect { handle, progress }
    };
    let early = (naming == DirectNaming::FromKey).then(|| start(direct_params(params)));
    let (link, report) = relay.connect(params, events).await;
    if link.is_some() {
        let direct = match (early, &report.pair_id) {
            (Some(d), _) => d,
            (None, Some(pair_id)) => start(direct_params_for(params, pair_id)),
            (None, None) => start(direct_params(params)),
        };
        return RelayFirst {
            link,
            report,
            direct: Some(direct),
        };
    }
    if report.pair_id.is_none() {
        // The relay's join never paired: the server refused it (a session that already has
        // two peers, a full server, a wrong code's nameplate), could not be reached, or no
        // peer came in time. The direct half goes through the same server and would fare no
        // better; after a refusal it would wait out the whole timeout for a peer that is not
        // coming (the session's pair is someone else's). Say the relay's reason now.
        if let Some(d) = early {
            d.handle.abort();
        }
        return RelayFirst {
            link: None,
            report,
            direct: None,
        };
    }
    let direct = early.unwrap_or_else(|| start(direct_params(params)));
    // The peer holds another key (a wrong secret or code): the direct pairing, named from the
    // key, will never meet it, so do not wait for it.
    let auth_failed = report.wrong_code
        || report.attempts.iter().any(|a| {
            a.error
                .as_deref()
                .is_some_and(|e| e.contains("failed authentication"))
        });
    if auth_failed {
        direct.handle.abort();
        return RelayFirst {
            link: None,
            report,
            direct: None,
        };
    }
    let (link, direct_report) = match direct.handle.await {
        Ok(x) => x,
        Err(e) => {
            let mut report = report;
            report.error = Some(format!("the direct connect failed: {e}"));
            return RelayFirst {
                link: None,
                report,
                direct: None,
            };
        }
    };
    let mut report = report;
    merge(&mut report, direct_report, link.is_some());
    RelayFirst {
        link,
        report,
        direct: None,
    }
}

/// Folds the direct connect's report into the relay's: its attempts after the relay's, its
/// NAT findings; with `direct_won`, its strategy, addresses and (no) error.
pub fn merge(report: &mut Report, direct: Report, direct_won: bool) {
    report.attempts.extend(direct.attempts);
    report.nat = direct.nat.or(report.nat.take());
    report.nat_v6 = direct.nat_v6.or(report.nat_v6.take());
    report.nat_cache.extend(direct.nat_cache);
    if report.port_mapping.is_none() {
        report.port_mapping = direct.port_mapping;
    }
    if direct_won {
        report.strategy = direct.strategy;
        report.local = direct.local;
        report.remote = direct.remote;
        report.family = direct.family;
        report.error = None;
        report.role = report.role.or(direct.role);
    } else if let Some(e) = direct.error {
        let relay = report.error.take().unwrap_or_else(|| "no link".into());
        // Both pairings go through the same server: its refusal (a changed key, a full
        // server, a missing token) is said once.
        report.error = Some(if relay == e {
            e
        } else {
            format!("relay: {relay}; direct: {e}")
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cancelled entries say how far the direct connect got: joining, planning, or
    /// running an earlier attempt.
    #[test]
    fn cancelled_attempts_say_how_far_the_direct_connect_got() {
        let p = DirectProgress::default();
        let names = vec!["tcp-punch".to_owned(), "udp-quic".to_owned()];
        let why = |out: &[AttemptReport], i: usize| out[i].error.clone().unwrap_or_default();
        let out = p.cancelled(&names);
        assert!(out.iter().all(|a| a.outcome == Outcome::Cancelled));
        assert!(why(&out, 0).contains("joining its pairing"), "{out:?}");
        p.event(&Event::Paired {
            role: crate::protocol::Role::First,
            strategies: names.clone(),
        });
        assert!(why(&p.cancelled(&names), 1).contains("planning"));
        p.event(&Event::AttemptStarted {
            strategy: "tcp-punch".into(),
        });
        let out = p.cancelled(&names);
        assert_eq!(out[0].strategy, "tcp-punch");
        assert_eq!(
            why(&out, 0),
            "the session ended before this attempt finished"
        );
        assert_eq!(out[1].strategy, "udp-quic");
        assert!(why(&out, 1).contains("still trying tcp-punch"), "{out:?}");
    }

    #[test]
    fn both_peers_derive_the_same_direct_pairing_and_strangers_another() {
        let p = |secret: Option<&str>| ConnectParams {
            server: "127.0.0.1:8877".parse().unwrap(),
            session: "s".into(),
            secret: secret.map(str::to_owned),
        };
        let a = direct_params(&p(Some("k")));
        let b = direct_params(&p(Some("k")));
        assert_eq!((&a.session, &a.secret), (&b.session, &b.secret));
        assert_ne!(a.session, "s");
        let other = direct_params(&p(Some("guess")));
        assert_ne!(a.session, other.session);
        assert_ne!(a.secret, other.secret);
        assert!(a.session.starts_with("direct-") && a.session.len() == 7 + 32);
        // Per pairing: both peers of one pairing alike, another pairing of the same session
        // (a second forwarder of one `expose`) elsewhere, and never the key's own name.
        let key = p(Some("k"));
        let one = direct_params_for(&key, "pair-1");
        assert_eq!(
            one.session,
            direct_params_for(&p(Some("k")), "pair-1").session
        );
        assert_eq!(
            one.secret,
            direct_params_for(&p(Some("k")), "pair-1").secret
        );
        let two = direct_params_for(&key, "pair-2");
        assert_ne!(one.session, two.session);
        assert_ne!(one.secret, two.secret);
        assert_ne!(one.session, a.session);
        assert!(one.session.starts_with("direct-") && one.session.len() == 7 + 32);
    }
}
