//! Short-code nameplates on the rendezvous server over loopback: allocation (many at once,
//! all distinct, given back after use), joins only for allocated nameplates, reservations
//! that expire, and burning after a wrong code.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use nettool_core::client;
use nettool_core::code::session_name;
use nettool_core::protocol::{ClientToServer, FramedConn, ServerToClient, PROTOCOL_VERSION};
use nettool_core::server::{RendezvousServer, ServerConfig, ServerStats};
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
    client::allocate(&[addr], None, deadline).await.unwrap()
}

async fn join(addr: SocketAddr, session: &str) -> Conn {
    let mut c = conn_from(addr, [127, 0, 0, 1]).await;
    c.send(&ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: session.into(),
        strategies: vec!["relay".into()],
        token: None,
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
