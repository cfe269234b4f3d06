//! A joined control connection: waiting, pairing, offers and results until it ends.

use std::collections::HashMap;
use std::sync::Arc;

use nettool_core::code;
use nettool_core::protocol::{ClientToServer, FramedConn, RecvError, Role, ServerToClient};
use tracing::{info, warn};

use crate::conn::{count_frame_error, refuse, send_within, Joiner};
use crate::limits::{spend, StrategyBudget};
use crate::metrics::Reason;
use crate::outbox::{CloseOnDrop, Outbound, Outbox};
use crate::pairing::{
    agree, leave, new_pair_ids, no_common, register, release, Pair, PeerEnd, SessionSlot, Waiter,
};
use crate::relay::{valid_ticket, TicketAssignment};
use crate::stream::ServerStream;
use crate::{lock, Shared, MAX_JOIN_STRATEGIES, OUTBOX_CAPACITY};

pub(crate) async fn serve_control(
    shared: &Shared,
    mut framed: FramedConn<ServerStream>,
    joiner: Joiner,
    session: String,
    strategies: Vec<String>,
) {
    let Joiner {
        addr,
        conn,
        version,
        express,
    } = joiner;
    let outbox = Arc::new(Outbox::default());
    let _close = CloseOnDrop(&outbox);
    if session.is_empty() || session.len() > 256 {
        refuse(&mut framed, "session name must be 1 to 256 bytes").await;
        return;
    }
    if strategies.len() > MAX_JOIN_STRATEGIES {
        refuse(
            &mut framed,
            &format!("a join may list at most {MAX_JOIN_STRATEGIES} strategies"),
        )
        .await;
        return;
    }
    if let Some(why) = express.as_ref().and_then(|x| bad_offers(x, &strategies)) {
        refuse(&mut framed, &why).await;
        return;
    }
    // Join: either wait, or pair with the waiter.
    let joined = {
        let mut sessions = lock(&shared.sessions);
        #[cfg(test)]
        crate::tests::panic_hook(&session);
        let max = shared.config.max_sessions;
        // A code session is created only by the join that takes its nameplate's reservation.
        let code_refused = (code::is_code_session(&session) && !sessions.contains_key(&session))
            .then(|| shared.take_nameplate(&session))
            .and_then(Result::err);
        match sessions.remove(&session) {
            None if code_refused.is_some() => Err(code_refused.unwrap_or_default()),
            None if max > 0 && sessions.len() >= max => {
                shared.metrics.reject(Reason::max_sessions);
                Err(format!(
                    "the server is full: it holds at most {max} sessions at a time; try again \
                     later"
                ))
            }
            None => {
                sessions.insert(
                    session.clone(),
                    SessionSlot::Waiting(Waiter {
                        conn,
                        version,
                        addr,
                        strategies,
                        outbox: outbox.clone(),
                        express,
                        claiming: false,
                    }),
                );
                Ok(None)
            }
            Some(SessionSlot::Paired(pair)) => {
                sessions.insert(session.clone(), SessionSlot::Paired(pair));
                Err(format!("session '{session}' already has two peers"))
            }
            Some(SessionSlot::Waiting(waiter)) if waiter.claiming => {
                sessions.insert(session.clone(), SessionSlot::Waiting(waiter));
                Err(format!("session '{session}' already has two peers"))
            }
            Some(SessionSlot::Waiting(waiter)) => {
                let agreed = agree(&waiter.strategies, &strategies);
                if agreed.is_empty() {
                    let msg = no_common(&waiter.strategies, &strategies);
                    waiter.outbox.push(Outbound::Fatal(ServerToClient::Error {
                        message: msg.clone(),
                    }));
                    Err(msg)
                } else {
                    let (pair_id, relay_token) = new_pair_ids(shared);
                    let pair = Pair::new(
                        session.clone(),
                        pair_id.clone(),
                        [waiter.version, version],
                        relay_token.clone(),
                        [
                            PeerEnd::Local {
                                conn: waiter.conn,
                                outbox: waiter.outbox.clone(),
                            },
                            PeerEnd::Local {
                                conn,
                                outbox: outbox.clone(),
                            },
                        ],
                        agreed.clone(),
                        None,
                    );
                    sessions.insert(session.clone(), SessionSlot::Paired(pair.clone()));
                    // The express relay: both joins asked for it and this server relays.
                    // Each peer gets the other's PAKE message; the relay connections named
                    // by the tickets attach as this pairing's relay.
                    let (first_pake, second_pake, first_offers, second_offers) =
                        match (&waiter.express, &express, &relay_token) {
                            (Some(w), Some(j), Some(token))
                                if valid_ticket(&w.ticket) && valid_ticket(&j.ticket) =>
                            {
                                for (ticket, role) in
                                    [(&w.ticket, Role::First), (&j.ticket, Role::Second)]
                                {
                                    let assigned = TicketAssignment {
                                        session: session.clone(),
                                        token: token.clone(),
                                        role,
                                    };
                                    shared.assign_ticket(ticket, assigned);
                                }
                                (Some(j.pake.clone()), Some(w.pake.clone()), None, None)
                            }
                            // Two joins that carried only their PAKE message (no ticket: no
                            // express relay): each gets the other's, so both hold the key their
                            // link handshakes are keyed with. A join with a ticket and one without
                            // get neither (the express side would wait for a relay). Their
                            // prepared offers go along when both brought some.
                            (Some(w), Some(j), _)
                                if w.ticket.is_empty()
                                    && j.ticket.is_empty()
                                    && valid_pake(&w.pake)
                                    && valid_pake(&j.pake) =>
                            {
                                let (wo, jo) = match (&w.offers, &j.offers) {
                                    (Some(wo), Some(jo)) => (Some(jo.clone()), Some(wo.clone())),
                                    _ => (None, None),
                                };
                                (Some(j.pake.clone()), Some(w.pake.clone()), wo, jo)
                            }
                            _ => (None, None, None, None),
                        };
                    waiter.outbox.push(Outbound::Paired(
                        pair.clone(),
                        Role::First,
                        ServerToClient::Paired {
                            role: Role::First,
                            strategies: agreed.clone(),
                            pair_id: pair_id.clone(),
                            observed: waiter.addr,
                            peer: addr,
                            relay_token: relay_token.clone(),
                            relay_addrs: Vec::new(),
                            peer_pake: first_pake,
                            peer_offers: first_offers,
                        },
                    ));
                    outbox.push(Outbound::Paired(
                        pair.clone(),
                        Role::Second,
                        ServerToClient::Paired {
                            role: Role::Second,
                            strategies: agreed,
                            pair_id,
                            observed: addr,
                            peer: waiter.addr,
                            relay_token,
                            relay_addrs: Vec::new(),
                            peer_pake: second_pake,
                            peer_offers: second_offers,
                        },
                    ));
                    Ok(Some(pair))
                }
            }
        }
    };
    // What this connection holds in the cluster store, given back when it leaves.
    let mut owned: Option<String> = None;
    match joined {
        Err(msg) => {
            refuse(&mut framed, &msg).await;
            return;
        }
        Ok(None) => {
            let mut wait = true;
            if let Some(cluster) = shared.cluster.get() {
                match register(shared, cluster, &session, conn, addr).await {
                    Ok((value, waits)) => {
                        owned = value;
                        wait = waits;
                    }
                    Err(msg) => {
                        leave(shared, &session, conn, None);
                        refuse(&mut framed, &msg).await;
                        return;
                    }
                }
            }
            if wait {
                info!(session = %session, "waiting for the second peer");
                let waiting = ServerToClient::Waiting {
                    session: session.clone(),
                };
                if send_within(shared, &mut framed, &waiting).await.is_err() {
                    leave(shared, &session, conn, None);
                    release(shared, &session, owned);
                    return;
                }
            }
        }
        Ok(Some(pair)) => {
            info!(session = %session, "paired");
            shared.metrics.pairings.inc();
            shared.index_relay_token(&session, pair.relay_token.as_deref());
        }
    }

    let mut pair: Option<(Arc<Pair>, Role)> = None;
    let mut budget = HashMap::new();
    let expiry = tokio::time::sleep(shared.config.session_expiry);
    tokio::pin!(expiry);
    // While waiting for its partner a peer only reads (bounded by the expiry); once paired it
    // must complete a frame at least every idle timeout.
    let idle_timeout = shared.config.idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            out = outbox.next() => {
                let (msg, fatal) = match out {
                    Outbound::Msg(m) => (m, false),
                    Outbound::Fatal(m) => (m, true),
                    Outbound::Paired(p, role, m) => {
                        pair = Some((p, role));
                        // A waiter's key in the cluster store now says "paired" (unless the
                        // joiner on another node already made it so).
                        if let (Some(cluster), Some(value)) = (shared.cluster.get(), owned.take()) {
                            let paired = cluster.paired_value(conn);
                            if value.starts_with('W') {
                                cluster.swap(&session, value, Some(paired.clone()));
                                owned = Some(paired);
                            } else {
                                owned = Some(value);
                            }
                        }
                        framed.set_limit(shared.config.max_frame_len);
                        idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                        (m, false)
                    }
                };
                let sent = tokio::select! {
                    r = send_within(shared, &mut framed, &msg) => r.is_ok(),
                    () = outbox.overflowed() => false,
                };
                if !sent || fatal {
                    break;
                }
            }
            () = outbox.overflowed() => {
                shared.metrics.reject(Reason::slow_reader);
                warn!("dropping client: it does not read (its queue of {OUTBOX_CAPACITY} messages is full)");
                break;
            }
            () = &mut idle, if pair.is_some() && !idle_timeout.is_zero() => {
                let secs = idle_timeout.as_secs_f64();
                shared.metrics.reject(Reason::idle_timeout);
                refuse(&mut framed, &format!("idle for {secs:.1}s: no complete frame received within the idle timeout")).await;
                break;
            }
            () = &mut expiry, if pair.is_none() => {
                let secs = shared.config.session_expiry.as_secs_f64();
                refuse(&mut framed, &format!("session '{session}' expired: no second peer joined within {secs}s")).await;
                break;
            }
            frame = framed.recv::<ClientToServer>() => {
                match frame {
                    Ok(None) => break,
                    Err(RecvError::Frame(e)) => {
                        let e = RecvError::Frame(e);
                        count_frame_error(shared, &e);
                        refuse(&mut framed, &e.to_string()).await;
                        break;
                    }
                    // The connection broke or closed in the middle of a frame.
                    Err(_) => break,
                    Ok(Some(msg)) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                        let len = framed.last_frame_len();
                        let spent = (&mut budget, len);
                        if let Err(e) = handle_frame(shared, &mut framed, pair.as_ref(), spent, msg).await {
                            refuse(&mut framed, &e).await;
                            break;
                        }
                    }
                }
            }
        }
    }
    leave(shared, &session, conn, pair.as_ref());
    release(shared, &session, owned);
}

pub(crate) async fn handle_frame(
    shared: &Shared,
    framed: &mut FramedConn<ServerStream>,
    pair: Option<&(Arc<Pair>, Role)>,
    (budget, len): (&mut HashMap<String, StrategyBudget>, usize),
    msg: ClientToServer,
) -> Result<(), String> {
    match msg {
        ClientToServer::Ping { id } => {
            send_within(shared, framed, &ServerToClient::Pong { id }).await
        }
        ClientToServer::Offer { strategy, payload } => {
            let (pair, role) = pair.ok_or("offer before the session was paired")?;
            spend(shared, pair, budget, &strategy, len)
                .inspect_err(|_| shared.metrics.reject(Reason::strategy_budget))?;
            pair.offer(*role, strategy, payload)
        }
        ClientToServer::Result {
            strategy,
            ok,
            error,
        } => {
            let (pair, role) = pair.ok_or("result before the session was paired")?;
            spend(shared, pair, budget, &strategy, len)
                .inspect_err(|_| shared.metrics.reject(Reason::strategy_budget))?;
            pair.send(
                role.other(),
                ServerToClient::Result {
                    strategy,
                    ok,
                    error,
                },
            );
            Ok(())
        }
        ClientToServer::BadCode { session } => {
            let (pair, role) = pair.ok_or("bad-code before the session was paired")?;
            if pair.session != session || !code::is_code_session(&session) {
                return Err("bad-code is only for this connection's code session".into());
            }
            shared.burn(pair);
            pair.send(role.other(), ServerToClient::WrongCode);
            Ok(())
        }
        ClientToServer::Allocate { .. } => {
            Err("'allocate' must be the first frame of its own connection".into())
        }
        ClientToServer::Join { .. } => Err("already joined a session on this connection".into()),
        ClientToServer::Relay { .. } => {
            Err("'relay' must be the first frame of its own connection".into())
        }
        ClientToServer::Observe { .. } | ClientToServer::ObserveFamily { .. } => {
            Err("'observe' must be the first frame of its own connection".into())
        }
        // A message this server build does not know how to handle on a control connection.
        _ => Err("unexpected message on a joined control connection".into()),
    }
}

/// Why a join's prepared offers are refused, if they are: each must be a JSON object named by
/// a strategy of the join (the frame's size limit bounds the rest; the peer checks what they
/// say, as it does every offer).
fn bad_offers(
    express: &nettool_core::protocol::ExpressJoin,
    strategies: &[String],
) -> Option<String> {
    let offers = express.offers.as_ref()?;
    if !express.ticket.is_empty() {
        return Some(
            "a join's offers go only with its PAKE message, not with a relay ticket".into(),
        );
    }
    offers.iter().find_map(|(name, offer)| {
        if !strategies.contains(name) {
            Some(format!(
                "the join's offers name '{name}', which is not among its strategies"
            ))
        } else if !offer.is_object() {
            Some(format!(
                "the join's offer for '{name}' must be a JSON object"
            ))
        } else {
            None
        }
    })
}

/// Whether `pake` looks like a SPAKE2 message over Ed25519 (33 bytes, hex): passed on to the
/// peer only then (the peer checks it properly).
fn valid_pake(pake: &str) -> bool {
    pake.len() == 66 && pake.bytes().all(|b| b.is_ascii_hexdigit())
}
