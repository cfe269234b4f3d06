//! The rendezvous server over real loopback sockets: pairing, relaying, refusals, robustness.

use std::net::SocketAddr;
use std::time::Duration;

use nettool_core::protocol::{ClientToServer, FramedConn, ServerToClient, PROTOCOL_VERSION};
use nettool_core::server::{RendezvousServer, ServerConfig};
use nettool_core::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Conn = FramedConn<TcpStream>;

async fn start(config: ServerConfig) -> SocketAddr {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

async fn conn(addr: SocketAddr) -> Conn {
    FramedConn::new(TcpStream::connect(addr).await.unwrap(), 1 << 16)
}

async fn join(addr: SocketAddr, session: &str, strategies: &[&str]) -> Conn {
    let mut c = conn(addr).await;
    c.send(&ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: session.into(),
        strategies: strategies.iter().map(|s| s.to_string()).collect(),
    })
    .await
    .unwrap();
    c
}

async fn recv(c: &mut Conn) -> ServerToClient {
    tokio::time::timeout(Duration::from_secs(10), c.recv::<ServerToClient>())
        .await
        .expect("server answered in time")
        .expect("valid frame")
        .expect("connection open")
}

fn expect_error(msg: ServerToClient, contains: &str) {
    match msg {
        ServerToClient::Error { message } => {
            assert!(message.contains(contains), "{message:?} lacks {contains:?}")
        }
        other => panic!("expected an error containing {contains:?}, got {other:?}"),
    }
}

/// Joins two peers to `session` and returns them after both were paired.
async fn pair(addr: SocketAddr, session: &str) -> (Conn, Conn) {
    let mut a = join(addr, session, &["tcp-punch", "relay"]).await;
    assert!(matches!(recv(&mut a).await, ServerToClient::Waiting { .. }));
    let mut b = join(addr, session, &["relay", "tcp-punch"]).await;
    for (c, role) in [(&mut a, Role::First), (&mut b, Role::Second)] {
        match recv(c).await {
            ServerToClient::Paired {
                role: got,
                strategies,
                pair_id,
                ..
            } => {
                assert_eq!(got, role);
                // The first peer's order, filtered to what both offer.
                assert_eq!(strategies, ["tcp-punch", "relay"]);
                assert_eq!(pair_id.len(), 32);
            }
            other => panic!("expected paired, got {other:?}"),
        }
    }
    (a, b)
}

#[tokio::test]
async fn pairs_holds_offers_until_both_offered_and_relays_results() {
    let addr = start(ServerConfig::default()).await;
    let (mut a, mut b) = pair(addr, "s1").await;
    a.send(&ClientToServer::Offer {
        strategy: "tcp-punch".into(),
        payload: serde_json::json!({"from": "a"}),
    })
    .await
    .unwrap();
    // Held: b gets nothing until it offers too.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), b.recv::<ServerToClient>())
            .await
            .is_err()
    );
    b.send(&ClientToServer::Offer {
        strategy: "tcp-punch".into(),
        payload: serde_json::json!({"from": "b"}),
    })
    .await
    .unwrap();
    assert_eq!(
        recv(&mut a).await,
        ServerToClient::Offer {
            strategy: "tcp-punch".into(),
            payload: serde_json::json!({"from": "b"})
        }
    );
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Offer {
            strategy: "tcp-punch".into(),
            payload: serde_json::json!({"from": "a"})
        }
    );
    a.send(&ClientToServer::Result {
        strategy: "tcp-punch".into(),
        ok: false,
        error: Some("nope".into()),
    })
    .await
    .unwrap();
    assert_eq!(
        recv(&mut b).await,
        ServerToClient::Result {
            strategy: "tcp-punch".into(),
            ok: false,
            error: Some("nope".into())
        }
    );
    drop(a);
    assert_eq!(recv(&mut b).await, ServerToClient::PeerLeft);
}

#[tokio::test]
async fn third_joiner_gets_a_clear_error() {
    let addr = start(ServerConfig::default()).await;
    let (_a, _b) = pair(addr, "crowded").await;
    let mut c = join(addr, "crowded", &["tcp-punch"]).await;
    expect_error(
        recv(&mut c).await,
        "session 'crowded' already has two peers",
    );
}

#[tokio::test]
async fn no_strategy_in_common_is_an_error_on_both_sides() {
    let addr = start(ServerConfig::default()).await;
    let mut a = join(addr, "s", &["tcp-punch"]).await;
    assert!(matches!(recv(&mut a).await, ServerToClient::Waiting { .. }));
    let mut b = join(addr, "s", &["relay"]).await;
    expect_error(recv(&mut a).await, "no strategy in common");
    expect_error(recv(&mut b).await, "no strategy in common");
    // The name is free again.
    let _ = pair(addr, "s").await;
}

#[tokio::test]
async fn unpaired_sessions_expire() {
    let addr = start(ServerConfig {
        session_expiry: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .await;
    let mut a = join(addr, "lonely", &["tcp-punch"]).await;
    assert!(matches!(recv(&mut a).await, ServerToClient::Waiting { .. }));
    expect_error(recv(&mut a).await, "session 'lonely' expired");
    let _ = pair(addr, "lonely").await;
}

#[tokio::test]
async fn observe_reports_the_source_address() {
    let addr = start(ServerConfig::default()).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let mut c = FramedConn::new(stream, 1 << 16);
    c.send(&ClientToServer::Observe {
        version: PROTOCOL_VERSION,
    })
    .await
    .unwrap();
    assert_eq!(recv(&mut c).await, ServerToClient::Observed { addr: local });
}

#[tokio::test]
async fn bad_input_gets_a_named_error_and_only_that_connection_closes() {
    let addr = start(ServerConfig {
        first_frame_timeout: Duration::from_millis(300),
        max_frame_len: 4096,
        ..ServerConfig::default()
    })
    .await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"hello there\n".to_vec(), "malformed frame"),
        (vec![b'{'; 10_000], "frame too long (limit 4096 bytes)"),
        (b"\xff\xfe\xfd\n".to_vec(), "malformed frame: not UTF-8"),
        (
            b"{\"type\":\"join\",\"version\":99,\"session\":\"x\",\"strategies\":[]}\n".to_vec(),
            "unsupported protocol version 99",
        ),
        (
            b"{\"type\":\"ping\",\"id\":1}\n".to_vec(),
            "expected 'join', 'observe' or 'relay' as the first frame, got 'ping'",
        ),
        (
            b"{\"type\":\"join\",\"version\":1,\"session\":\"\",\"strategies\":[]}\n".to_vec(),
            "session name must be 1 to 256 bytes",
        ),
        (Vec::new(), "no request within the time limit"),
    ];
    // Honest sessions keep pairing while the garbage flows.
    let honest = tokio::spawn(async move {
        for i in 0..20 {
            let _ = pair(addr, &format!("honest-{i}")).await;
        }
    });
    for (bytes, expected) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
            .await
            .expect("server closes the bad connection")
            .ok();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.contains("\"type\":\"error\"") && text.contains(expected),
            "for input {:?}: got {text:?}, wanted {expected:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
        );
    }
    honest.await.unwrap();
}

#[tokio::test]
async fn a_paired_peer_sending_garbage_loses_only_its_own_connection() {
    let addr = start(ServerConfig::default()).await;
    let (mut a, mut b) = pair(addr, "g").await;
    let (_c, _d) = pair(addr, "other").await;
    // Raw garbage on a's connection.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"\0\0\0garbage\n").await.unwrap();
    a.send(&ClientToServer::Join {
        version: 1,
        session: "again".into(),
        strategies: vec![],
    })
    .await
    .unwrap();
    expect_error(recv(&mut a).await, "already joined a session");
    assert_eq!(recv(&mut b).await, ServerToClient::PeerLeft);
    let _ = pair(addr, "g").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions_pair() {
    let addr = start(ServerConfig::default()).await;
    let mut firsts = Vec::new();
    for i in 0..1000 {
        let mut a = join(addr, &format!("many-{i}"), &["tcp-punch"]).await;
        assert!(matches!(recv(&mut a).await, ServerToClient::Waiting { .. }));
        firsts.push(a);
    }
    let mut seconds = Vec::new();
    for i in 0..1000 {
        seconds.push(join(addr, &format!("many-{i}"), &["tcp-punch"]).await);
    }
    for c in firsts.iter_mut().chain(seconds.iter_mut()) {
        assert!(matches!(recv(c).await, ServerToClient::Paired { .. }));
    }
}
