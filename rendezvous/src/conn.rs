//! Accepting connections and serving each by its first frame: observe, join, allocate,
//! observe-family and relay; refusals with a reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nettool_core::protocol::{
    ClientToServer, ExpressJoin, FrameError, FramedConn, RecvError, Role, ServerToClient,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::control::serve_control;
use crate::limits::ConnSlot;
use crate::metrics::Reason;
use crate::pairing::SessionSlot;
use crate::relay::{serve_relay, serve_relay_ticket};
use crate::stream::{open, OpenError, ServerStream};
use crate::{lock, Shared, READ_BUFFER, UNPAIRED_MAX_FRAME_LEN};

/// Accepts connections and serves each in a task of its own, owned by a [`JoinSet`]: when
/// the server's future is dropped (the server stops), every connection task is aborted with
/// it, relays included. Finished tasks are reaped as they end; a task that panicked is logged
/// and costs only its own connection.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        warn!("a connection task panicked; only its connection is lost: {e}");
                    }
                }
                continue;
            }
        };
        match accepted {
            Ok((stream, addr)) => {
                // A dual-stack socket shows IPv4 peers as IPv4-mapped IPv6 addresses.
                let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
                let conn = shared
                    .next_conn
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let span = tracing::info_span!("conn", id = conn, peer = %addr);
                let admitted = shared.admit(addr);
                let shared = shared.clone();
                tasks.spawn(
                    async move {
                        match admitted {
                            Ok(slot) => serve_connection(shared, stream, addr, conn, slot).await,
                            Err((why, reason)) => {
                                shared.metrics.reject(reason);
                                let _ = stream.set_nodelay(true);
                                // Told over TLS when the client speaks it, so it can read why.
                                let limit = Duration::from_secs(2);
                                let stream = match open(&shared, stream, limit).await {
                                    Ok(s) => Some(s),
                                    Err(OpenError::Silent(s)) => Some(ServerStream::Plain(s)),
                                    Err(OpenError::Dropped(_)) => None,
                                };
                                if let Some(stream) = stream {
                                    let mut framed = FramedConn::new(stream, 0);
                                    refuse(&mut framed, &why).await;
                                }
                            }
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    addr: SocketAddr,
    conn: u64,
    slot: ConnSlot,
) {
    let _ = stream.set_nodelay(true);
    let mut first_frame_timeout = shared.config.first_frame_timeout;
    if !shared.config.idle_timeout.is_zero() {
        first_frame_timeout = first_frame_timeout.min(shared.config.idle_timeout);
    }
    // The TLS handshake (if any) and the whole first frame must arrive in time.
    let started = tokio::time::Instant::now();
    let stream = match open(&shared, stream, first_frame_timeout).await {
        Ok(s) => s,
        Err(OpenError::Silent(stream)) => {
            shared.metrics.reject(Reason::frame_timeout);
            let mut framed = FramedConn::new(ServerStream::Plain(stream), 0);
            let secs = first_frame_timeout.as_secs_f64();
            refuse(
                &mut framed,
                &format!("no request within the time limit ({secs:.1}s)"),
            )
            .await;
            return;
        }
        Err(OpenError::Dropped(why)) => {
            debug!("dropping connection: {why}");
            return;
        }
    };
    let tls = stream.is_tls();
    // Until paired, frames are small; and no frame may take longer than the first may.
    let mut framed = FramedConn::with_read_buffer(
        stream,
        shared.config.max_frame_len.min(UNPAIRED_MAX_FRAME_LEN),
        READ_BUFFER,
    );
    framed.set_frame_time(Some(first_frame_timeout));
    // Sending the first frame byte by byte does not help.
    let first = match tokio::time::timeout_at(
        started + first_frame_timeout,
        framed.recv::<ClientToServer>(),
    )
    .await
    {
        Err(_) => {
            shared.metrics.reject(Reason::frame_timeout);
            refuse(
                &mut framed,
                &format!(
                    "no request within the time limit ({:.1}s)",
                    first_frame_timeout.as_secs_f64()
                ),
            )
            .await;
            return;
        }
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            count_frame_error(&shared, &e);
            refuse(&mut framed, &e.to_string()).await;
            return;
        }
    };
    let secret = matches!(
        first,
        ClientToServer::Join { .. }
            | ClientToServer::Allocate { .. }
            | ClientToServer::ObserveFamily { .. }
    );
    if secret && !tls && shared.config.tls.is_some() && !shared.config.plain_control {
        shared.metrics.reject(Reason::plain_control);
        refuse(
            &mut framed,
            "this server requires TLS on its control channel (a plain join shows the session \
             name, the addresses and the server token to anyone on the path): update nettool, \
             or ask the server's operator to allow plain clients with --insecure-control",
        )
        .await;
        return;
    }
    if tls
        && matches!(
            first,
            ClientToServer::Relay { .. } | ClientToServer::RelayTicket { .. }
        )
    {
        refuse(
            &mut framed,
            "relay connections are plain (their bytes are the link's own end-to-end \
             encryption): attach without TLS",
        )
        .await;
        return;
    }
    match first {
        ClientToServer::Observe { version } => {
            if check_version(&mut framed, version).await {
                serve_observe(&shared, framed, addr).await;
            }
        }
        ClientToServer::Join {
            version,
            session,
            strategies,
            token,
            express,
        } => {
            if !check_version(&mut framed, version).await {
                return;
            }
            // The rate first, so guessing the server token is rate limited too.
            let admitted = shared
                .take_join_token(addr)
                .and_then(|()| shared.check_server_token(token.as_deref()));
            let joiner = Joiner {
                addr,
                conn,
                version,
                express,
            };
            match admitted {
                Ok(()) => serve_control(&shared, framed, joiner, session, strategies).await,
                Err(why) => refuse(&mut framed, &why).await,
            }
        }
        ClientToServer::Allocate { version, token } => {
            if !check_version(&mut framed, version).await {
                return;
            }
            // Rate limited and token checked like a join: each allocation is a session's worth.
            let allocated = shared
                .take_join_token(addr)
                .and_then(|()| shared.check_server_token(token.as_deref()))
                .and_then(|()| shared.allocate_nameplate());
            match allocated {
                Ok(nameplate) => {
                    info!(nameplate, "nameplate allocated");
                    let msg = ServerToClient::Allocated { nameplate };
                    let _ = send_within(&shared, &mut framed, &msg).await;
                }
                Err(why) => refuse(&mut framed, &why).await,
            }
        }
        ClientToServer::ObserveFamily {
            version,
            session,
            pair_id,
            role,
        } => {
            if check_version(&mut framed, version).await {
                serve_observe_family(&shared, framed, addr, &session, &pair_id, role).await;
            }
        }
        ClientToServer::Relay {
            version,
            session,
            token,
            role,
        } => {
            if check_version(&mut framed, version).await {
                serve_relay(&shared, framed, slot, conn, &session, token, role).await;
            }
        }
        ClientToServer::RelayTicket { version, ticket } => {
            if check_version(&mut framed, version).await {
                serve_relay_ticket(&shared, framed, slot, conn, ticket).await;
            }
        }
        other => {
            let what = serde_json::to_value(&other)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                .unwrap_or_default();
            refuse(
                &mut framed,
                &format!(
                    "expected 'join', 'observe', 'observe-family', 'relay', 'relay-ticket' or \
                     'allocate' as the first frame, got '{what}'"
                ),
            )
            .await;
        }
    }
}

pub(crate) async fn check_version(framed: &mut FramedConn<ServerStream>, version: u32) -> bool {
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return true;
    }
    refuse(
        framed,
        &format!(
            "unsupported protocol version {version} (server speaks {MIN_PROTOCOL_VERSION} to \
             {PROTOCOL_VERSION})"
        ),
    )
    .await;
    false
}

/// Sends `msg`, giving up after the write timeout (a client that does not read).
pub(crate) async fn send_within(
    shared: &Shared,
    framed: &mut FramedConn<ServerStream>,
    msg: &ServerToClient,
) -> Result<(), String> {
    let Some(limit) = shared.config.write_timeout() else {
        return framed.send(msg).await.map_err(|e| e.to_string());
    };
    match tokio::time::timeout(limit, framed.send(msg)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => {
            warn!(
                "dropping client: it read nothing for {:.1}s (idle-timeout)",
                limit.as_secs_f64()
            );
            Err("write timed out".into())
        }
    }
}

/// Counts a bad first frame against the limit it broke, if any.
pub(crate) fn count_frame_error(shared: &Shared, e: &RecvError) {
    match e {
        RecvError::Frame(FrameError::TooLong { .. }) => {
            shared.metrics.reject(Reason::max_frame_len)
        }
        RecvError::Frame(FrameError::TooSlow { .. }) => {
            shared.metrics.reject(Reason::frame_timeout)
        }
        _ => {}
    }
}

/// Sends the client an error (the connection is closed afterwards) and logs it.
pub(crate) async fn refuse(framed: &mut FramedConn<ServerStream>, message: &str) {
    warn!("refusing client: {message}");
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        framed.send(&ServerToClient::Error {
            message: message.to_owned(),
        }),
    )
    .await;
}

pub(crate) async fn serve_observe(
    shared: &Shared,
    mut framed: FramedConn<ServerStream>,
    addr: SocketAddr,
) {
    debug!("observe");
    if framed
        .send(&ServerToClient::Observed { addr })
        .await
        .is_err()
    {
        return;
    }
    // Hold the connection (and with it the NAT mapping) until the client closes it.
    let _ = tokio::time::timeout(shared.config.observe_hold, async {
        while let Ok(Some(_)) = framed.recv::<ClientToServer>().await {}
    })
    .await;
}

/// Answers an [`ClientToServer::ObserveFamily`]: records the address with the pairing (which
/// tells the peer), then answers like an observe connection. Unknown sessions and pairings get
/// the same error, so the connection tells nothing about which sessions exist.
pub(crate) async fn serve_observe_family(
    shared: &Shared,
    mut framed: FramedConn<ServerStream>,
    addr: SocketAddr,
    session: &str,
    pair_id: &str,
    role: Role,
) {
    let pair = match lock(&shared.sessions).get(session) {
        Some(SessionSlot::Paired(pair)) if pair.pair_id == pair_id => Some(pair.clone()),
        _ => None,
    };
    let recorded = match pair {
        Some(pair) => pair.sighted(role, addr),
        None => Err("no such pairing".into()),
    };
    match recorded {
        Ok(()) => {
            debug!(session, %role, %addr, "peer seen over another family");
            let _ = send_within(shared, &mut framed, &ServerToClient::Observed { addr }).await;
        }
        Err(why) => refuse(&mut framed, &why).await,
    }
}

/// Who joins: the control connection's source address, id and protocol version.
pub(crate) struct Joiner {
    pub(crate) addr: SocketAddr,
    pub(crate) conn: u64,
    pub(crate) version: u32,
    /// The join's express relay part (PAKE message and relay ticket).
    pub(crate) express: Option<ExpressJoin>,
}
