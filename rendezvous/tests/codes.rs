//! Short-code nameplates on the rendezvous server over loopback: allocation (many at once,
//! all distinct, given back after use), joins only for allocated nameplates, reservations
//! that expire, and burning after a wrong code; and the orchestrator's one guess per code,
//! whichever peer joins first.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::client;
use nettool_core::code::session_name;
use nettool_core::orchestrator::{ConnectParams, Orchestrator};
use nettool_core::protocol::{ClientToServer, FramedConn, ServerToClient, PROTOCOL_VERSION};
use nettool_core::relay::RelayStream;
use nettool_core::strategy::{agree_on_link, RawLink};
use nettool_core::{Attempt, Link, Role, Strategy, StrategyError};
use nettool_rendezvous::{RendezvousServer, ServerConfig, ServerStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Conn = FramedConn<TcpStream>;

async fn start(config: ServerConfig) -> (SocketAddr, ServerStats) {
    let server = RendezvousServer::bind("0.0.0.0:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], server.local_addr().unwrap().port()));
    let stats = server.stats();
    tokio::spawn(server.run());
    (addr, stats)
}

/// A connection from `source` (another loopback "host", so per-address limits stay default).
async fn conn_from(addr: SocketAddr, source: [u8; 4]) -> Conn {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    FramedConn::new(socket.connect(addr).await.unwrap(), 1 << 16)
}

async fn recv(c: &mut Conn) -> ServerToClient {
    tokio::time::timeout(Duration::from_secs(10), c.recv::<ServerToClient>())
        .await
        .expect("server answered in time")
        .expect("valid frame")
        .expect("connection open")
}

async fn allocate_from(addr: SocketAddr, source: [u8; 4]) -> u32 {
    let mut c = conn_from(addr, source).await;
    c.send(&ClientToServer::Allocate {
        version: PROTOCOL_VERSION,
        token: None,
    })
    .await
    .unwrap();
    match recv(&mut c).await {
        ServerToClient::Allocated { nameplate } => nameplate,
        other => panic!("expected a nameplate, got {other:?}"),
    }
}

async fn allocate(addr: SocketAddr) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    client::allocate(&[addr], &Default::default(), None, deadline)
        .await
        .unwrap()
}

async fn join(addr: SocketAddr, session: &str) -> Conn {
    let mut c = conn_from(addr, [127, 0, 0, 1]).await;
    c.send(&ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: session.into(),
        strategies: vec!["relay".into()],
        token: None,
        express: None,
    })
    .await
    .unwrap();
    c
}

/// Joins both peers of `session` and returns their connections once paired.
async fn pair(addr: SocketAddr, session: &str) -> (Conn, Conn) {
    let mut a = join(addr, session).await;
    assert!(matches!(recv(&mut a).await, ServerToClient::Waiting { .. }));
    let mut b = join(addr, session).await;
    assert!(matches!(recv(&mut a).await, ServerToClient::Paired { .. }));
    assert!(matches!(recv(&mut b).await, ServerToClient::Paired { .. }));
    (a, b)
}

async fn refused(addr: SocketAddr, session: &str) -> String {
    let mut c = join(addr, session).await;
    match recv(&mut c).await {
        ServerToClient::Error { message } => message,
        other => panic!("expected a refusal of {session}, got {other:?}"),
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

#[tokio::test]
async fn two_hundred_allocations_at_once_are_distinct_and_come_back_after_use() {
    let (addr, stats) = start(ServerConfig::default()).await;
    // 200 clients at once, each from its own loopback address (default per-address limits).
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let source = [127, 1, (i / 250) as u8, (i % 250 + 1) as u8];
            tokio::spawn(allocate_from(addr, source))
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    let distinct: HashSet<u32> = got.iter().copied().collect();
    assert_eq!(distinct.len(), 200, "duplicate nameplates: {got:?}");
    // The smallest free numbers: 1 to 200.
    assert_eq!(distinct, (1..=200).collect::<HashSet<u32>>());
    // Nothing is free below 201 while they are reserved.
    assert_eq!(allocate(addr).await, 201);

    // Use nameplates 1 and 7: both peers join, pair, and leave; the numbers come back.
    for n in [1, 7] {
        let (a, b) = pair(addr, &session_name(n)).await;
        drop((a, b));
    }
    eventually("the used sessions ended", || stats.session_count() == 0).await;
    assert_eq!(allocate(addr).await, 1);
    assert_eq!(allocate(addr).await, 7);
    assert_eq!(allocate(addr).await, 202);
}

#[tokio::test]
async fn only_allocated_nameplates_can_be_joined_and_only_once_per_reservation() {
    let (addr, stats) = start(ServerConfig::default()).await;
    let msg = refused(addr, "code-5").await;
    assert!(msg.contains("no such code") && msg.contains("'5'"), "{msg}");
    // The prefix is reserved: no session that is not exactly code-N.
    let msg = refused(addr, "code-05").await;
    assert!(msg.contains("no such code"), "{msg}");
    let msg = refused(addr, "code-x").await;
    assert!(msg.contains("no such code"), "{msg}");
    // Other sessions are not affected.
    let (a, b) = pair(addr, "demo").await;
    drop((a, b));

    let n = allocate(addr).await;
    assert_eq!(n, 1);
    let (a, b) = pair(addr, &session_name(n)).await;
    // A third joiner of a paired code session is refused as for any session.
    let msg = refused(addr, &session_name(n)).await;
    assert!(msg.contains("already has two peers"), "{msg}");
    drop((a, b));
    eventually("the session ended", || stats.session_count() == 0).await;
    // The reservation was taken by the first join: the session cannot start again.
    let msg = refused(addr, &session_name(n)).await;
    assert!(msg.contains("no such code"), "{msg}");
}

#[tokio::test]
async fn a_reservation_nobody_joins_expires_with_the_session_expiry() {
    let config = ServerConfig {
        session_expiry: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let (addr, _stats) = start(config).await;
    assert_eq!(allocate(addr).await, 1);
    assert_eq!(allocate(addr).await, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msg = refused(addr, "code-1").await;
    assert!(msg.contains("no such code"), "{msg}");
    assert_eq!(allocate(addr).await, 1);
}

#[tokio::test]
async fn a_wrong_code_burns_the_nameplate_and_tells_the_peer() {
    let (addr, stats) = start(ServerConfig::default()).await;
    let n = allocate(addr).await;
    let session = session_name(n);
    let (mut owner, mut guesser) = pair(addr, &session).await;
    // Only for this connection's own code session.
    guesser
        .send(&ClientToServer::BadCode {
            session: "code-99".into(),
        })
        .await
        .unwrap();
    match recv(&mut guesser).await {
        ServerToClient::Error { message } => assert!(message.contains("bad-code"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(recv(&mut owner).await, ServerToClient::PeerLeft));
    drop((owner, guesser));
    eventually("the session ended", || stats.session_count() == 0).await;

    let n = allocate(addr).await;
    let session = session_name(n);
    let (mut owner, guesser) = pair(addr, &session).await;
    let mut guesser = guesser;
    guesser
        .send(&ClientToServer::BadCode {
            session: session.clone(),
        })
        .await
        .unwrap();
    assert!(matches!(recv(&mut owner).await, ServerToClient::WrongCode));
    // Burned at once, while both peers are still connected.
    let msg = refused(addr, &session).await;
    assert!(msg.contains("no such code"), "{msg}");
    assert_eq!(stats.session_count(), 0);
    drop((owner, guesser));
}

// --- One guess per code, through the orchestrator ------------------------------------------

/// Links through the server's relay and runs the link handshake (SPAKE2 on the code) on it;
/// the channel binding is a fixed value (these tests are about the guess limit, not TLS).
struct HandshakeRelay {
    server: SocketAddr,
}

#[async_trait::async_trait]
impl Strategy for HandshakeRelay {
    fn name(&self) -> &'static str {
        "relay"
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let token = attempt.pairing.relay_token.clone().expect("relaying is on");
        attempt
            .rendezvous
            .exchange_offer("relay", serde_json::json!({}), attempt.deadline)
            .await?;
        let stream = TcpStream::connect(self.server)
            .await
            .map_err(|e| StrategyError::io("relay connect", e))?;
        let local = stream.local_addr().unwrap();
        let mut framed = FramedConn::new(stream, 1 << 16);
        framed
            .send(&ClientToServer::Relay {
                version: PROTOCOL_VERSION,
                session: attempt.session.to_owned(),
                token,
                role: attempt.role(),
            })
            .await
            .map_err(|e| StrategyError::io("relay attach", e))?;
        match framed.recv::<ServerToClient>().await {
            Ok(Some(ServerToClient::Relaying)) => {}
            other => return Err(StrategyError::NoLink(format!("relay refused: {other:?}"))),
        }
        let (stream, prefix) = framed.into_parts();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let raw = RawLink {
            stream: RelayStream::new(stream, prefix),
            local,
            remote: self.server,
        };
        tx.send(raw).await.expect("receiver open");
        let ctx = attempt.handshake_context("relay");
        let upgrade = |s: RelayStream| async move { Ok((s, vec![7u8; 32])) };
        let agreed = agree_on_link(&ctx, rx, upgrade, Duration::from_secs(3), attempt.deadline)
            .await
            .map_err(|none| {
                let msg = format!("no link through the relay ({none})");
                none.into_error(msg)
            })?;
        Ok(Link {
            stream: Box::new(agreed.stream),
            local,
            remote: self.server,
            strategy: "relay",
        })
    }
}

/// A second strategy that would link at once if it were tried (it never should be after a
/// wrong code): it only fails, loudly.
struct NeverAfterAWrongCode;

#[async_trait::async_trait]
impl Strategy for NeverAfterAWrongCode {
    fn name(&self) -> &'static str {
        "after"
    }

    async fn connect(&self, _: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        Err(StrategyError::NoLink("tried after a wrong code".into()))
    }
}

/// Connects one peer of `session` with `secret`, after `delay` (so the other joins first).
async fn peer(
    server: SocketAddr,
    session: String,
    secret: String,
    delay: Duration,
) -> (Option<Link>, nettool_core::Report) {
    tokio::time::sleep(delay).await;
    let strategies: Vec<(Arc<dyn Strategy>, Duration)> = vec![
        (Arc::new(HandshakeRelay { server }), Duration::from_secs(5)),
        (Arc::new(NeverAfterAWrongCode), Duration::from_secs(2)),
    ];
    let orch = Orchestrator::new(strategies, Duration::from_secs(30)).with_plan(false);
    let params = ConnectParams {
        server,
        session,
        secret: Some(secret),
    };
    orch.connect(&params, &|_| {}).await
}

async fn check_link(link: Link, role: Role) {
    let (mut rd, mut wr) = tokio::io::split(link.stream);
    wr.write_all(role.as_str().as_bytes()).await.unwrap();
    let theirs = role.other().as_str();
    let mut got = vec![0u8; theirs.len()];
    tokio::time::timeout(Duration::from_secs(5), rd.read_exact(&mut got))
        .await
        .expect("the peer's bytes arrive")
        .unwrap();
    assert_eq!(got, theirs.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_code_links_through_the_handshake() {
    let (addr, _stats) = start(ServerConfig::default()).await;
    let n = allocate(addr).await;
    let code = format!("{n}-guitarist-revenge");
    let short = Duration::from_millis(300);
    let ((la, ra), (lb, rb)) = tokio::join!(
        peer(addr, session_name(n), code.clone(), Duration::ZERO),
        peer(addr, session_name(n), code, short),
    );
    assert!(!ra.wrong_code && !rb.wrong_code);
    assert_eq!(ra.strategy.as_deref(), Some("relay"), "{ra:?}");
    tokio::join!(
        check_link(la.unwrap(), ra.role.unwrap()),
        check_link(lb.unwrap(), rb.role.unwrap())
    );
}

/// A wrong code ends both connects after the one attempt, well within 10 s, whichever peer
/// joined first (the first checks the other's key confirmation and reports the wrong code;
/// the server tells the second), and burns the nameplate.
async fn a_wrong_code_is_one_guess(owner_first: bool) {
    let (addr, _stats) = start(ServerConfig::default()).await;
    let n = allocate(addr).await;
    let (right, wrong) = (
        format!("{n}-guitarist-revenge"),
        format!("{n}-guitarist-aardvark"),
    );
    let later = Duration::from_millis(300);
    let (owner_delay, guesser_delay) = if owner_first {
        (Duration::ZERO, later)
    } else {
        (later, Duration::ZERO)
    };
    let started = Instant::now();
    let ((lo, ro), (lg, rg)) = tokio::join!(
        peer(addr, session_name(n), right, owner_delay),
        peer(addr, session_name(n), wrong, guesser_delay),
    );
    let took = started.elapsed();
    assert!(lo.is_none() && lg.is_none());
    for (who, r) in [("owner", &ro), ("guesser", &rg)] {
        assert!(r.wrong_code, "{who}: {r:?}");
        assert_eq!(r.attempts.len(), 1, "{who}: one attempt only: {r:?}");
        assert!(
            r.error.as_deref().unwrap_or("").contains("wrong code"),
            "{who}: {r:?}"
        );
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let msg = refused(addr, &session_name(n)).await;
    assert!(msg.contains("no such code"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_is_one_guess_when_the_owner_joined_first() {
    a_wrong_code_is_one_guess(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_is_one_guess_when_the_guesser_joined_first() {
    a_wrong_code_is_one_guess(false).await;
}
