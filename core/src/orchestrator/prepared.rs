//! What the strategies make ready before pairing, and the first attempt started at the
//! pairing with it.
//!
//! [`Preparing`] runs each strategy's [`Strategy::prepare`] while this side joins and waits.
//! The join carries the offer of its first strategy when that is ready in time
//! ([`Preparing::for_join`]); the server hands each peer the other's with the pairing. When
//! both joins' offers are there for the first agreed strategy and both peers hold the agreed
//! key, each starts that attempt at once ([`EarlyStart`]) instead of after the plan offers
//! crossed: a round trip sooner. Each says so in its plan offer, and the attempt counts only
//! when both did and the plan tries that strategy first; otherwise both drop it and go on as
//! without (the strategy then exchanges fresh offers in its turn).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, info_span, Instrument};

use crate::client::{JoinOffers, Pairing};
use crate::handshake::{AgreedKey, LinkKey, OneGuess};
use crate::strategy::{Attempt, AttemptNotes, Early, Link, Offers, Ready, Strategy, StrategyError};

/// Whether the strategies prepare nothing before pairing (a test-only build, to watch the
/// distance tests that guard it go red): `NETTOOL_TEST_PREPARE_OFF=1` at compile time.
pub(super) const PREPARE_OFF: bool = option_env!("NETTOOL_TEST_PREPARE_OFF").is_some();

/// How long a prepared offer is used: the server holds a TCP observation's connection (and
/// with it the NAT's mapping) for `observe_hold` (120 s by default), and a NAT forgets a UDP
/// mapping that saw one exchange after about 30 s (Linux conntrack's `udp_timeout`), so a
/// side that waits longer for its peer prepares again every this long.
pub(super) const PREPARED_FRESH: Duration = Duration::from_secs(25);

/// The strategies' prepared offers ([`Strategy::prepare`]), made in a task of their own while
/// joining and made again every [`PREPARED_FRESH`] until taken.
pub(super) struct Preparing {
    latest: Arc<Mutex<Option<BTreeMap<String, Ready>>>>,
    /// True once a round made every strategy's offer (or failed to).
    made: tokio::sync::watch::Receiver<bool>,
    /// Counts the offers made, so a wait for one sees each.
    inserted: tokio::sync::watch::Receiver<u64>,
    /// The strategies it prepares.
    names: Vec<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Preparing {
    pub(super) fn start(
        strategies: Vec<(Arc<dyn Strategy>, Duration)>,
        servers: &[SocketAddr],
        deadline: Instant,
    ) -> Self {
        // The addresses the control connection will most likely use: the first tried, and
        // the first of the other family (as after being seen there).
        let order = crate::client::happy_eyeballs_order(servers);
        let mut against: Vec<SocketAddr> = order.first().copied().into_iter().collect();
        if let Some(other) = order.iter().find(|a| a.is_ipv4() != order[0].is_ipv4()) {
            against.push(*other);
        }
        let names = strategies
            .iter()
            .map(|(s, _)| s.name().to_owned())
            .collect();
        let latest = Arc::new(Mutex::new(None));
        let (tx, made) = tokio::sync::watch::channel(false);
        let (count, inserted) = tokio::sync::watch::channel(0u64);
        let slot = latest.clone();
        let task = tokio::spawn(async move {
            loop {
                // Each strategy's offer is published as soon as it is made: one that takes
                // long (a UDP observation on a network that drops UDP) holds back no other.
                let mut round: futures::stream::FuturesUnordered<_> = strategies
                    .iter()
                    .map(|(s, _)| {
                        let against = &against;
                        async move {
                            let name = s.name().to_owned();
                            let made = s.prepare(against, deadline).await.and_then(|p| match p {
                                Some(p) => Ready::new(p).map(Some),
                                None => Ok(None),
                            });
                            (name, made)
                        }
                    })
                    .collect();
                let mut fresh = std::collections::BTreeSet::new();
                while let Some((name, made)) = futures::StreamExt::next(&mut round).await {
                    match made {
                        Ok(Some(ready)) => {
                            fresh.insert(name.clone());
                            let mut latest = slot.lock().unwrap_or_else(|e| e.into_inner());
                            latest.get_or_insert_with(BTreeMap::new).insert(name, ready);
                            count.send_modify(|n| *n += 1);
                        }
                        Ok(None) => {}
                        Err(e) => info!(strategy = %name, "nothing prepared: {e}"),
                    }
                }
                // What was not made again this round is stale: drop it.
                if let Some(latest) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    latest.retain(|name, _| fresh.contains(name));
                }
                let _ = tx.send(true);
                tokio::time::sleep(PREPARED_FRESH).await;
            }
        });
        Self {
            latest,
            made,
            inserted,
            names,
            task,
        }
    }

    /// Whether it prepares strategy `name`.
    pub(super) fn prepares(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// The offer of strategy `name` for the join, once made: taken out of the prepared set
    /// into `slot` (what the join offers is then what an early attempt uses, and the
    /// periodic remaking does not replace it). `None` when a round ended without it.
    pub(super) fn for_join(
        &self,
        name: String,
        slot: JoinedSlot,
        wait: Option<Duration>,
    ) -> JoinOffers {
        let latest = self.latest.clone();
        let mut made = self.made.clone();
        let mut inserted = self.inserted.clone();
        JoinOffers(
            Box::pin(async move {
                loop {
                    inserted.borrow_and_update();
                    let done = *made.borrow_and_update();
                    let taken = latest
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                        .and_then(|m| m.remove(&name));
                    if let Some(ready) = taken {
                        let offer = ready.offer().clone();
                        *slot.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some((name.clone(), ready));
                        return Some(serde_json::Map::from_iter([(name, offer)]));
                    }
                    if done {
                        return None;
                    }
                    tokio::select! {
                        r = inserted.changed() => r.ok()?,
                        r = made.changed() => r.ok()?,
                    }
                }
            }),
            wait,
        )
    }

    /// The latest prepared offers, waiting at most `wait` for the first; stops preparing.
    pub(super) async fn take(mut self, wait: Duration) -> BTreeMap<String, Ready> {
        let _ = tokio::time::timeout(wait, self.made.wait_for(|m| *m)).await;
        self.task.abort();
        let set = self.latest.lock().unwrap_or_else(|e| e.into_inner()).take();
        set.unwrap_or_default()
    }
}

impl Drop for Preparing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The strategy offer that went with the join, and what stands behind it.
pub(super) type JoinedSlot = Arc<Mutex<Option<(String, Ready)>>>;

/// Whether no attempt starts at the pairing (a test-only build, to watch the distance test
/// that guards it go red): `NETTOOL_TEST_EARLY_START_OFF=1` at compile time.
pub(super) const EARLY_START_OFF: bool = option_env!("NETTOOL_TEST_EARLY_START_OFF").is_some();

/// Everything the attempt started at the pairing needs (owned: it runs in a task of its own
/// while the plan offers cross).
pub(super) struct EarlyAttempt {
    pub strategy: Arc<dyn Strategy>,
    pub name: String,
    pub session: String,
    pub pairing: Pairing,
    pub key: LinkKey,
    /// The server's addresses, as the prepared offer was made against them.
    pub servers: Vec<SocketAddr>,
    pub server_rtt: Duration,
    pub agreed: AgreedKey,
    pub one_guess: Option<Arc<OneGuess>>,
    /// This side's prepared offer (the join's) and the peer's (from its join).
    pub early: Early,
    pub began: Instant,
    pub deadline: Instant,
}

/// What an attempt returns: its result within its deadline, and its notes.
type Finished = (
    Result<Result<Link, StrategyError>, tokio::time::error::Elapsed>,
    AttemptNotes,
);

/// The first strategy's attempt, started at the pairing. Dropped, it stops.
pub(super) struct EarlyStart {
    pub name: String,
    pub began: Instant,
    pub deadline: Instant,
    task: tokio::task::JoinHandle<Finished>,
}

impl EarlyStart {
    /// Starts the attempt: it has both peers' offers, so it needs no offer channel.
    pub(super) fn spawn(a: EarlyAttempt) -> Self {
        info!(strategy = %a.name, "started at the pairing with the offers from the joins");
        let (name, began, deadline) = (a.name.clone(), a.began, a.deadline);
        let task = tokio::spawn(async move {
            let mut notes = AttemptNotes::default();
            let mut attempt = Attempt {
                session: &a.session,
                pairing: &a.pairing,
                key: &a.key,
                rendezvous: Offers::without_channel(a.servers, &a.name),
                server_rtt: a.server_rtt,
                deadline: a.deadline,
                nat: None,
                notes: &mut notes,
                portmap: None,
                one_guess: a.one_guess,
                agreed: Some(a.agreed),
                early: Some(a.early),
            };
            let span = info_span!("attempt", strategy = %a.name, early = true);
            let res = tokio::time::timeout_at(
                a.deadline.into(),
                a.strategy.connect(&mut attempt).instrument(span),
            )
            .await;
            drop(attempt);
            (res, notes)
        });
        Self {
            name,
            began,
            deadline,
            task,
        }
    }

    /// Its outcome (waits for it).
    pub(super) async fn finish(mut self) -> Finished {
        match (&mut self.task).await {
            Ok(done) => done,
            Err(e) => (
                Ok(Err(StrategyError::NoLink(format!(
                    "the attempt started at the pairing ended: {e}"
                )))),
                AttemptNotes::default(),
            ),
        }
    }
}

impl Drop for EarlyStart {
    fn drop(&mut self) {
        self.task.abort();
    }
}
