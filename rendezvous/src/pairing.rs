//! Sessions and pairing: the session map's entries, pairs and their offers, short-code
//! nameplates, joining the cluster's registry and leaving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nettool_core::code;
use nettool_core::protocol::{Role, ServerToClient};
use rand::RngCore;
use tracing::{debug, warn};

use crate::cluster::{self, SessionStore};
use crate::metrics::Reason;
use crate::outbox::{Outbound, Outbox};
use crate::{lock, Shared};

/// What the map holds for a session name.
#[derive(Debug)]
pub(crate) enum SessionSlot {
    Waiting(Waiter),
    Paired(Arc<Pair>),
}

#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) conn: u64,
    /// The protocol version it joined with.
    pub(crate) version: u32,
    pub(crate) addr: SocketAddr,
    pub(crate) strategies: Vec<String>,
    pub(crate) outbox: Arc<Outbox>,
    /// The join's express relay part (its PAKE message and relay ticket).
    pub(crate) express: Option<nettool_core::protocol::ExpressJoin>,
    /// This joiner claimed a waiter on another node and waits for that node's answer: no
    /// local joiner may pair with it.
    pub(crate) claiming: bool,
}

/// A paired session: both peers' ends and the offers held until both have offered.
#[derive(Debug)]
pub(crate) struct Pair {
    pub(crate) session: String,
    /// The pairing's id, which [`ClientToServer::ObserveFamily`] must name.
    pub(crate) pair_id: String,
    /// Each peer's protocol version (index [`Pair::index`]).
    pub(crate) versions: [u32; 2],
    /// Addresses each peer showed over its other family (at most one per family).
    pub(crate) sighted: Mutex<[Vec<SocketAddr>; 2]>,
    pub(crate) relay_token: Option<String>,
    /// The first and the second peer.
    pub(crate) peers: [PeerEnd; 2],
    /// The agreed strategies: offers and results for others are refused.
    pub(crate) strategies: Vec<String>,
    pub(crate) held_offers: Mutex<HashMap<String, (Role, serde_json::Value)>>,
    /// How to reach a peer on another node (set when one is).
    pub(crate) cluster: Option<Arc<dyn SessionStore>>,
}

/// Where one peer of a pair is connected.
#[derive(Debug)]
pub(crate) enum PeerEnd {
    /// To this node: its connection id and outbox.
    Local { conn: u64, outbox: Arc<Outbox> },
    /// To another node of the cluster: that node's id and its connection id there.
    Remote { node: String, conn: u64 },
}

impl Pair {
    /// A new pair: nothing sighted, no offers held yet.
    pub(crate) fn new(
        session: String,
        pair_id: String,
        versions: [u32; 2],
        relay_token: Option<String>,
        peers: [PeerEnd; 2],
        strategies: Vec<String>,
        cluster: Option<Arc<dyn SessionStore>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            session,
            pair_id,
            versions,
            sighted: Mutex::new([Vec::new(), Vec::new()]),
            relay_token,
            peers,
            strategies,
            held_offers: Mutex::new(HashMap::new()),
            cluster,
        })
    }

    pub(crate) fn index(role: Role) -> usize {
        match role {
            Role::First => 0,
            Role::Second => 1,
        }
    }

    pub(crate) fn send(&self, to: Role, msg: ServerToClient) {
        match &self.peers[Self::index(to)] {
            PeerEnd::Local { outbox, .. } => outbox.push(Outbound::Msg(msg)),
            PeerEnd::Remote { node, conn } => {
                if let Some(cluster) = &self.cluster {
                    cluster.send(
                        node,
                        &cluster::NodeMsg::Deliver {
                            session: self.session.clone(),
                            conn: *conn,
                            msg,
                        },
                    );
                }
            }
        }
    }

    /// Whether `conn` is one of this node's connections in the pair.
    pub(crate) fn has_local(&self, conn: u64) -> bool {
        self.local_role(conn).is_some()
    }

    /// The role of this node's connection `conn` in the pair.
    pub(crate) fn local_role(&self, conn: u64) -> Option<Role> {
        [Role::First, Role::Second].into_iter().find(|r| {
            matches!(&self.peers[Self::index(*r)], PeerEnd::Local { conn: c, .. } if *c == conn)
        })
    }

    /// Records that the peer `from` was seen at `addr` over another family and tells the other
    /// peer (when it speaks version 2). At most one address per family per peer: a repeat is
    /// refused, so a peer cannot make the server send more than two of these.
    pub(crate) fn sighted(&self, from: Role, addr: SocketAddr) -> Result<(), String> {
        {
            let mut sighted = lock(&self.sighted);
            let seen = &mut sighted[Self::index(from)];
            if seen.iter().any(|a| a.is_ipv4() == addr.is_ipv4()) {
                return Err("this peer already showed an address of this family".into());
            }
            seen.push(addr);
        }
        if self.versions[Self::index(from.other())] >= 2 {
            self.send(from.other(), ServerToClient::PeerAddress { addr });
        }
        Ok(())
    }

    /// Holds or delivers an offer; refuses one more held offer than [`MAX_HELD_OFFERS`].
    pub(crate) fn offer(
        &self,
        from: Role,
        strategy: String,
        payload: serde_json::Value,
    ) -> Result<(), String> {
        // Offers are held on the first peer's node: a second peer here sends its offers there.
        if let (PeerEnd::Remote { node, conn }, Some(cluster)) = (&self.peers[0], &self.cluster) {
            cluster.send(
                node,
                &cluster::NodeMsg::Offer {
                    session: self.session.clone(),
                    conn: *conn,
                    strategy,
                    payload,
                },
            );
            return Ok(());
        }
        let mut held = lock(&self.held_offers);
        if !held.contains_key(&strategy) && held.len() >= MAX_HELD_OFFERS {
            return Err(format!(
                "too many offers waiting for the peer (at most {MAX_HELD_OFFERS})"
            ));
        }
        match held.remove(&strategy) {
            Some((role, theirs)) if role != from => {
                drop(held);
                self.send(
                    from,
                    ServerToClient::Offer {
                        strategy: strategy.clone(),
                        payload: theirs,
                    },
                );
                self.send(role, ServerToClient::Offer { strategy, payload });
            }
            _ => {
                held.insert(strategy, (from, payload));
            }
        }
        Ok(())
    }
}

/// Offers one pairing may hold for the peer at once (a peer offers one strategy at a time; the
/// cap bounds the memory a misbehaving peer can pin with offers for made-up strategies).
pub(crate) const MAX_HELD_OFFERS: usize = 16;

/// The strategies both offered, in the first peer's order.
pub(crate) fn agree(first: &[String], second: &[String]) -> Vec<String> {
    first
        .iter()
        .filter(|s| second.contains(s))
        .cloned()
        .collect()
}

pub(crate) fn no_common(first: &[String], second: &[String]) -> String {
    format!(
        "no strategy in common (first peer offers [{}], second peer offers [{}])",
        first.join(", "),
        second.join(", ")
    )
}

/// A new pairing's id and relay token (no token when this node does not relay).
pub(crate) fn new_pair_ids(shared: &Shared) -> (String, Option<String>) {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    let relay_token = shared.config.relay.as_ref().map(|_| {
        let mut t = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut t);
        hex::encode(t)
    });
    (hex::encode(id), relay_token)
}

impl Shared {
    /// Reserves the smallest free nameplate (1 and up) for the session expiry. Live
    /// nameplates (reserved, or with a session) count against `max_sessions`.
    pub(crate) fn allocate_nameplate(&self) -> Result<u32, String> {
        if self.cluster.get().is_some() {
            return Err(
                "short codes are not available on a cluster node: use --session and \
                        --secret"
                    .into(),
            );
        }
        let sessions = lock(&self.sessions);
        let mut reserved = lock(&self.nameplates);
        let now = Instant::now();
        reserved.retain(|_, until| *until > now);
        let max = self.config.max_sessions;
        if max > 0 && sessions.len() + reserved.len() >= max {
            self.metrics.reject(Reason::max_sessions);
            return Err(format!(
                "the server is full: it holds at most {max} sessions at a time; try again later"
            ));
        }
        let free = (1..=code::MAX_NAMEPLATE)
            .find(|n| !reserved.contains_key(n) && !sessions.contains_key(&code::session_name(*n)));
        let Some(n) = free else {
            return Err("no free nameplate; try again later".into());
        };
        reserved.insert(n, now + self.config.session_expiry);
        Ok(n)
    }

    /// Takes the reservation of a code session's nameplate (called with `sessions` locked,
    /// when the join would create the session), or says why the join is refused.
    pub(crate) fn take_nameplate(&self, session: &str) -> Result<(), String> {
        let taken = code::nameplate_of(session).and_then(|n| {
            let until = lock(&self.nameplates).remove(&n)?;
            (until > Instant::now()).then_some(n)
        });
        match taken {
            Some(_) => Ok(()),
            None => Err(format!(
                "no such code: nameplate '{}' is not allocated (it expired, was used, or \
                 someone tried a wrong code); ask for a new code",
                session
                    .strip_prefix(code::SESSION_PREFIX)
                    .unwrap_or(session)
            )),
        }
    }

    /// Burns a code session's nameplate after a failed key confirmation: the session leaves
    /// the map and the reservation (if any) is dropped, so further joins are refused.
    pub(crate) fn burn(&self, pair: &Arc<Pair>) {
        let mut sessions = lock(&self.sessions);
        if matches!(sessions.get(&pair.session), Some(SessionSlot::Paired(p)) if Arc::ptr_eq(p, pair))
        {
            sessions.remove(&pair.session);
        }
        if let Some(n) = code::nameplate_of(&pair.session) {
            lock(&self.nameplates).remove(&n);
        }
        drop(sessions);
        warn!(session = %pair.session, "someone tried a wrong code: nameplate burned");
    }
}

/// Gives back what a connection held in the cluster store (only if it still holds it).
pub(crate) fn release(shared: &Shared, session: &str, owned: Option<String>) {
    if let (Some(cluster), Some(value)) = (shared.cluster.get(), owned) {
        cluster.swap(session, value, None);
    }
}

/// Registers a join that found no local partner with the cluster: it either waits (its key
/// is set), or claims the waiter another node holds and asks that node to pair. Returns what
/// the connection now holds in the store and whether it waits (`false`: it waits for the
/// other node's answer, and the client is not told "waiting").
pub(crate) async fn register(
    shared: &Shared,
    cluster: &Arc<dyn SessionStore>,
    session: &str,
    conn: u64,
    addr: SocketAddr,
) -> Result<(Option<String>, bool), String> {
    let still_waiting = || matches!(lock(&shared.sessions).get(session), Some(SessionSlot::Waiting(w)) if w.conn == conn);
    match cluster.claim(session, conn).await? {
        cluster::Claim::Wait => Ok((Some(cluster.waiting_value(conn)), true)),
        cluster::Claim::Paired => {
            if still_waiting() {
                Err(format!("session '{session}' already has two peers"))
            } else {
                // A local joiner paired with this one meanwhile.
                Ok((None, true))
            }
        }
        cluster::Claim::Waiter {
            node,
            conn: theirs,
            value,
        } => {
            let mine = cluster.paired_value(conn);
            let strategies = {
                let mut sessions = lock(&shared.sessions);
                match sessions.get_mut(session) {
                    Some(SessionSlot::Waiting(w)) if w.conn == conn => {
                        w.claiming = true;
                        Some(w.strategies.clone())
                    }
                    _ => None,
                }
            };
            let Some(strategies) = strategies else {
                // A local joiner paired with this one meanwhile: give the waiter back.
                cluster.swap(session, mine, Some(value));
                return Ok((None, true));
            };
            let request = cluster::NodeMsg::Pair {
                session: session.to_owned(),
                conn: theirs,
                from: cluster.node().to_owned(),
                from_conn: conn,
                strategies,
                addr,
            };
            if cluster.send_now(&node, &request).await? {
                debug!(session, node = %node, "claimed a waiter on another node");
                return Ok((Some(mine), false));
            }
            // Nobody listens on that node's channel: it is gone, and so is its waiter. Wait
            // here in its place.
            warn!(session, node = %node, "the node holding this session's first peer is gone; waiting here instead");
            let waiting = cluster.waiting_value(conn);
            if !cluster.swap_now(session, &mine, &waiting).await? {
                return Err(format!(
                    "session '{session}' changed hands in the cluster while joining; join again"
                ));
            }
            if let Some(SessionSlot::Waiting(w)) = lock(&shared.sessions).get_mut(session) {
                if w.conn == conn {
                    w.claiming = false;
                }
            }
            Ok((Some(waiting), true))
        }
    }
}

/// Removes this connection's part of a session and tells the peer, if any.
pub(crate) fn leave(shared: &Shared, session: &str, conn: u64, pair: Option<&(Arc<Pair>, Role)>) {
    let mut sessions = lock(&shared.sessions);
    let ours = match sessions.get(session) {
        Some(SessionSlot::Waiting(w)) => w.conn == conn,
        Some(SessionSlot::Paired(p)) => p.has_local(conn),
        None => false,
    };
    if ours {
        sessions.remove(session);
    }
    drop(sessions);
    if let Some((pair, role)) = pair {
        debug!(session = %pair.session, "peer left");
        pair.send(role.other(), ServerToClient::PeerLeft);
    }
}
