//! Relay-first: the first byte over the relay, then a lossless move to a direct path.
//!
//! One connect becomes two pairings through the same rendezvous server, started together:
//! the relay alone (no NAT measurement to wait for) under the session's own name, and the
//! direct strategies (planned from both NATs, in lock step, as a plain connect) under a name
//! and secret derived from the session key, so both peers find the second pairing without a
//! word and the server cannot tie it to the first. When the relay links, data flows at once;
//! the direct connect's link, when it comes, is handed to the session, which moves to it at a
//! sequence boundary ([`crate::session::Session::with_upgrades`]). When the relay does not
//! link (a server that does not relay), the direct connect's outcome is the connect's, as
//! without relay-first. Which link the session starts on is decided by the relay's outcome
//! alone, which both peers learn in lock step: they never start on different links.
//!
//! The relay half joins for the express relay ([`crate::express`]): the link exists when the
//! peers are paired, and the peer's key confirmation rides with its first data; the caller
//! watches it ([`Link::confirmation`]) and treats a failed one as no link.

use tokio::task::JoinHandle;

use crate::orchestrator::{ConnectParams, Event, Orchestrator};
use crate::report::Report;
use crate::strategy::Link;
use crate::LinkKey;

/// The relay strategy's name.
pub const RELAY: &str = "relay";

/// The direct half of a relay-first connect, running in the background.
pub type DirectConnect = JoinHandle<(Option<Link>, Report)>;

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

/// Runs the relay and the direct strategies of `orch` together (see the module docs);
/// `events` sees the relay connect's progress.
pub async fn connect(
    orch: &Orchestrator,
    params: &ConnectParams,
    events: &(dyn Fn(Event) + Send + Sync),
) -> RelayFirst {
    let relay = orch
        .clone()
        .retain(|n| n == RELAY)
        .with_plan(false)
        .with_express(true);
    let direct = orch.clone().retain(|n| n != RELAY);
    let dparams = direct_params(params);
    let direct = tokio::spawn(async move { direct.connect(&dparams, &|_| {}).await });
    let (link, report) = relay.connect(params, events).await;
    if link.is_some() {
        return RelayFirst {
            link,
            report,
            direct: Some(direct),
        };
    }
    // The peer holds another key (a wrong secret or code): the direct pairing, named from the
    // key, will never meet it, so do not wait for it.
    let auth_failed = report.wrong_code
        || report.attempts.iter().any(|a| {
            a.error
                .as_deref()
                .is_some_and(|e| e.contains("failed authentication"))
        });
    if auth_failed {
        direct.abort();
        return RelayFirst {
            link: None,
            report,
            direct: None,
        };
    }
    let (link, direct_report) = match direct.await {
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
    }
}
