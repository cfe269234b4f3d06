//! What the other nodes of a cluster send this one (see the `cluster` module).

use std::sync::Arc;
use std::time::Duration;

use nettool_core::protocol::{Role, ServerToClient};
use tracing::{info, warn};

use crate::cluster::{self, SessionStore};
use crate::outbox::Outbound;
use crate::pairing::{agree, new_pair_ids, no_common, Pair, PeerEnd, SessionSlot};
use crate::{lock, Shared};

/// Handles what the other nodes of the cluster send this one, in order; resubscribes (once a
/// second) when the subscription is lost. Returns at once outside a cluster.
pub(crate) async fn serve_cluster(inbox: Option<cluster::Inbox>, shared: &Shared) {
    let (Some(mut inbox), Some(cluster)) = (inbox, shared.cluster.get()) else {
        return;
    };
    loop {
        while let Some(msg) = inbox.next().await {
            on_node_msg(shared, cluster, msg);
        }
        warn!("cluster: lost the subscription to this node's channel in Redis; resubscribing");
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match cluster.resubscribe().await {
                Ok(i) => {
                    inbox = i;
                    break;
                }
                Err(e) => warn!("cluster: resubscribing failed: {e}"),
            }
        }
    }
}

/// One message from another node (see `cluster::NodeMsg`).
pub(crate) fn on_node_msg(shared: &Shared, cluster: &Arc<dyn SessionStore>, msg: cluster::NodeMsg) {
    use cluster::NodeMsg;
    match msg {
        NodeMsg::Pair {
            session,
            conn,
            from,
            from_conn,
            strategies,
            addr,
        } => {
            let mut sessions = lock(&shared.sessions);
            let waiter = match sessions.remove(&session) {
                Some(SessionSlot::Waiting(w)) if w.conn == conn && !w.claiming => w,
                other => {
                    if let Some(slot) = other {
                        sessions.insert(session.clone(), slot);
                    }
                    drop(sessions);
                    let message = format!(
                        "the first peer of session '{session}' left or paired before this join \
                         reached it; join again"
                    );
                    let refused = NodeMsg::Refused {
                        session,
                        conn: from_conn,
                        message,
                    };
                    cluster.send(&from, &refused);
                    return;
                }
            };
            let agreed = agree(&waiter.strategies, &strategies);
            if agreed.is_empty() {
                drop(sessions);
                let message = no_common(&waiter.strategies, &strategies);
                waiter.outbox.push(Outbound::Fatal(ServerToClient::Error {
                    message: message.clone(),
                }));
                let refused = NodeMsg::Refused {
                    session,
                    conn: from_conn,
                    message,
                };
                cluster.send(&from, &refused);
                return;
            }
            let (pair_id, relay_token) = new_pair_ids(shared);
            let pair = Pair::new(
                session.clone(),
                pair_id.clone(),
                // The other node's peer: its version does not travel between nodes, so its
                // other-family sightings are not relayed across nodes (README, cluster limits).
                [waiter.version, 1],
                relay_token.clone(),
                [
                    PeerEnd::Local {
                        conn: waiter.conn,
                        outbox: waiter.outbox.clone(),
                    },
                    PeerEnd::Remote {
                        node: from.clone(),
                        conn: from_conn,
                    },
                ],
                agreed.clone(),
                Some(cluster.clone()),
            );
            sessions.insert(session.clone(), SessionSlot::Paired(pair.clone()));
            drop(sessions);
            shared.metrics.pairings.inc();
            shared.index_relay_token(&session, relay_token.as_deref());
            waiter.outbox.push(Outbound::Paired(
                pair,
                Role::First,
                ServerToClient::Paired {
                    role: Role::First,
                    strategies: agreed.clone(),
                    pair_id: pair_id.clone(),
                    observed: waiter.addr,
                    peer: addr,
                    relay_token: relay_token.clone(),
                    relay_addrs: Vec::new(),
                    peer_pake: None,
                    peer_offers: None,
                },
            ));
            info!(session = %session, node = %from, "paired with a peer on another node");
            let paired = NodeMsg::Paired {
                session,
                conn: from_conn,
                from: cluster.node().to_owned(),
                from_conn: waiter.conn,
                strategies: agreed,
                pair_id,
                peer: waiter.addr,
                relay_token,
                relay_addrs: cluster.public_addrs().to_vec(),
            };
            cluster.send(&from, &paired);
        }
        NodeMsg::Paired {
            session,
            conn,
            from,
            from_conn,
            strategies,
            pair_id,
            peer,
            relay_token,
            relay_addrs,
        } => {
            let mut sessions = lock(&shared.sessions);
            let joiner = match sessions.remove(&session) {
                Some(SessionSlot::Waiting(w)) if w.conn == conn && w.claiming => w,
                other => {
                    if let Some(slot) = other {
                        sessions.insert(session.clone(), slot);
                    }
                    drop(sessions);
                    // The joiner left meanwhile: the first peer learns it as from a local peer.
                    let left = NodeMsg::Deliver {
                        session,
                        conn: from_conn,
                        msg: ServerToClient::PeerLeft,
                    };
                    cluster.send(&from, &left);
                    return;
                }
            };
            let pair = Pair::new(
                session.clone(),
                pair_id.clone(),
                [1, joiner.version],
                relay_token.clone(),
                [
                    PeerEnd::Remote {
                        node: from,
                        conn: from_conn,
                    },
                    PeerEnd::Local {
                        conn: joiner.conn,
                        outbox: joiner.outbox.clone(),
                    },
                ],
                strategies.clone(),
                Some(cluster.clone()),
            );
            sessions.insert(session.clone(), SessionSlot::Paired(pair.clone()));
            drop(sessions);
            shared.index_relay_token(&session, relay_token.as_deref());
            joiner.outbox.push(Outbound::Paired(
                pair,
                Role::Second,
                ServerToClient::Paired {
                    role: Role::Second,
                    strategies,
                    pair_id,
                    observed: joiner.addr,
                    peer,
                    relay_token,
                    relay_addrs,
                    peer_pake: None,
                    peer_offers: None,
                },
            ));
        }
        NodeMsg::Refused {
            session,
            conn,
            message,
        } => {
            let mut sessions = lock(&shared.sessions);
            let ours =
                matches!(sessions.get(&session), Some(SessionSlot::Waiting(w)) if w.conn == conn);
            if let Some(SessionSlot::Waiting(w)) = ours.then(|| sessions.remove(&session)).flatten()
            {
                drop(sessions);
                w.outbox
                    .push(Outbound::Fatal(ServerToClient::Error { message }));
            }
        }
        NodeMsg::Deliver { session, conn, msg } => {
            let pair = match lock(&shared.sessions).get(&session) {
                Some(SessionSlot::Paired(p)) => p.clone(),
                _ => return,
            };
            if let Some(role) = pair.local_role(conn) {
                if let PeerEnd::Local { outbox, .. } = &pair.peers[Pair::index(role)] {
                    outbox.push(Outbound::Msg(msg));
                }
            }
        }
        NodeMsg::Offer {
            session,
            conn,
            strategy,
            payload,
        } => {
            let pair = match lock(&shared.sessions).get(&session) {
                Some(SessionSlot::Paired(p)) => p.clone(),
                _ => return,
            };
            if pair.local_role(conn) == Some(Role::First) {
                if let Err(e) = pair.offer(Role::Second, strategy, payload) {
                    warn!(session = %session, "offer from the other node refused: {e}");
                }
            }
        }
    }
}
