//! The rendezvous server over real loopback sockets: pairing, relaying, refusals, robustness.

use std::net::SocketAddr;
use std::time::Duration;

use nettool_core::client::{ClientError, RendezvousClient};
use nettool_core::protocol::{ClientToServer, FramedConn, ServerToClient, PROTOCOL_VERSION};
use nettool_core::Role;
use nettool_rendezvous::{RendezvousServer, ServerConfig, ServerStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Conn = FramedConn<TcpStream>;

async fn start(config: ServerConfig) -> SocketAddr {
    start_with_stats(config).await.0
}

async fn start_with_stats(config: ServerConfig) -> (SocketAddr, ServerStats) {
    // Listen on all loopback addresses, so tests can connect from 127.0.0.2 as another host.
    let server = RendezvousServer::bind("0.0.0.0:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], server.local_addr().unwrap().port()));
    let stats = server.stats();
    tokio::spawn(server.run());
    (addr, stats)
}

async fn conn(addr: SocketAddr) -> Conn {
    FramedConn::new(TcpStream::connect(addr).await.unwrap(), 1 << 16)
}

/// A connection from another loopback address (another "host" as far as per-address limits
/// go).
async fn conn_from(addr: SocketAddr, source: [u8; 4]) -> Conn {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    FramedConn::new(socket.connect(addr).await.unwrap(), 1 << 16)
}

fn join_frame(session: &str, token: Option<&str>) -> ClientToServer {
    ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: session.into(),
        strategies: vec!["tcp-punch".into()],
        token: token.map(str::to_owned),
        express: None,
    }
}

/// Waits until `f` holds (the server updates its counters when connection tasks end).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

async fn join(addr: SocketAddr, session: &str, strategies: &[&str]) -> Conn {
    let mut c = conn(addr).await;
    c.send(&ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: session.into(),
        strategies: strategies.iter().map(|s| s.to_string()).collect(),
        token: None,
        express: None,
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
        // 41 joins from one address within milliseconds; the join rate has its own test.
        join_rate: 0,
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
            "expected 'join', 'observe', 'observe-family', 'relay', 'relay-ticket' or 'allocate' as the first frame, got 'ping'",
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
        token: None,
        express: None,
    })
    .await
    .unwrap();
    expect_error(recv(&mut a).await, "already joined a session");
    assert_eq!(recv(&mut b).await, ServerToClient::PeerLeft);
    let _ = pair(addr, "g").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions_pair() {
    // 2000 connections and joins from one address: far over the per-address defaults.
    let addr = start(ServerConfig {
        max_conns_per_ip: 0,
        join_rate: 0,
        ..ServerConfig::default()
    })
    .await;
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

// --- Limits -------------------------------------------------------------------------------

#[tokio::test]
async fn connections_per_address_are_capped_and_other_addresses_are_unaffected() {
    let (addr, stats) = start_with_stats(ServerConfig {
        max_conns_per_ip: 3,
        ..ServerConfig::default()
    })
    .await;
    // Three open connections of different kinds from 127.0.0.1.
    let (mut a, _b) = pair(addr, "cap").await;
    let mut o = conn(addr).await;
    o.send(&ClientToServer::Observe {
        version: PROTOCOL_VERSION,
    })
    .await
    .unwrap();
    assert!(matches!(
        recv(&mut o).await,
        ServerToClient::Observed { .. }
    ));
    eventually("3 connections counted", || stats.connection_count() == 3).await;
    // The fourth is refused clearly, before it sends anything.
    let mut d = conn(addr).await;
    expect_error(
        recv(&mut d).await,
        "too many connections from 127.0.0.1: the server allows 3 at a time per address",
    );
    assert!(
        d.recv::<ServerToClient>().await.unwrap().is_none(),
        "closed"
    );
    // Another address is not affected.
    let mut e = conn_from(addr, [127, 0, 0, 2]).await;
    e.send(&join_frame("elsewhere", None)).await.unwrap();
    assert!(matches!(recv(&mut e).await, ServerToClient::Waiting { .. }));
    // Nor are the open connections.
    a.send(&ClientToServer::Ping { id: 7 }).await.unwrap();
    assert_eq!(recv(&mut a).await, ServerToClient::Pong { id: 7 });
    // A closed connection frees its place.
    drop(o);
    eventually("the observe connection released", || {
        stats.connection_count() == 3
    })
    .await;
    let mut f = conn(addr).await;
    f.send(&ClientToServer::Observe {
        version: PROTOCOL_VERSION,
    })
    .await
    .unwrap();
    assert!(matches!(
        recv(&mut f).await,
        ServerToClient::Observed { .. }
    ));
}

#[tokio::test]
async fn total_sessions_are_capped() {
    let (addr, stats) = start_with_stats(ServerConfig {
        max_sessions: 2,
        ..ServerConfig::default()
    })
    .await;
    let mut one = join(addr, "one", &["tcp-punch"]).await;
    assert!(matches!(
        recv(&mut one).await,
        ServerToClient::Waiting { .. }
    ));
    let mut two = join(addr, "two", &["tcp-punch"]).await;
    assert!(matches!(
        recv(&mut two).await,
        ServerToClient::Waiting { .. }
    ));
    let mut three = join(addr, "three", &["tcp-punch"]).await;
    expect_error(
        recv(&mut three).await,
        "the server is full: it holds at most 2 sessions at a time",
    );
    // Completing a waiting session needs no new slot.
    let mut one_b = join(addr, "one", &["tcp-punch"]).await;
    assert!(matches!(
        recv(&mut one).await,
        ServerToClient::Paired { .. }
    ));
    assert!(matches!(
        recv(&mut one_b).await,
        ServerToClient::Paired { .. }
    ));
    assert_eq!(stats.session_count(), 2);
    // A session that ends frees its slot.
    drop((one, one_b));
    eventually("session 'one' gone", || stats.session_count() == 1).await;
    let mut three = join(addr, "three", &["tcp-punch"]).await;
    assert!(matches!(
        recv(&mut three).await,
        ServerToClient::Waiting { .. }
    ));
}

#[tokio::test]
async fn silent_and_idle_clients_are_dropped_but_waiting_peers_are_not() {
    let idle = Duration::from_millis(400);
    let (addr, stats) = start_with_stats(ServerConfig {
        idle_timeout: idle,
        ..ServerConfig::default()
    })
    .await;
    // Silent from the start: the idle timeout caps the first-frame timeout (10 s here).
    let mut silent = conn(addr).await;
    let start = std::time::Instant::now();
    expect_error(
        recv(&mut silent).await,
        "no request within the time limit (0.4s)",
    );
    assert!(start.elapsed() < Duration::from_secs(3));

    // A waiting peer only reads; it waits past the idle timeout (bounded by session expiry).
    let mut a = join(addr, "idle", &["tcp-punch"]).await;
    assert!(matches!(recv(&mut a).await, ServerToClient::Waiting { .. }));
    tokio::time::sleep(idle * 3).await;
    let mut b = join(addr, "idle", &["tcp-punch"]).await;
    assert!(matches!(recv(&mut a).await, ServerToClient::Paired { .. }));
    assert!(matches!(recv(&mut b).await, ServerToClient::Paired { .. }));

    // Paired: a keeps sending frames, b dribbles one byte of a frame every 50 ms (no complete
    // frame): b is dropped with an error, a is told its peer left.
    let keep_alive = async {
        // Pings until told the peer left (an error here would mean a was dropped instead).
        let mut pongs = 0;
        for id in 0..50u64 {
            a.send(&ClientToServer::Ping { id }).await.unwrap();
            match recv(&mut a).await {
                ServerToClient::Pong { id: got } if got == id => pongs += 1,
                ServerToClient::PeerLeft => return pongs,
                other => panic!("a got {other:?}"),
            }
            tokio::time::sleep(idle / 4).await;
        }
        panic!("the dribbling peer was never dropped");
    };
    let loris = async {
        let frame = b"{\"type\":\"ping\",\"id\":1}\n";
        for byte in frame.iter().take(frame.len() - 1) {
            // recv is cancel safe: wait 50 ms for the server's answer, then send a byte more.
            if let Ok(msg) =
                tokio::time::timeout(Duration::from_millis(50), b.recv::<ServerToClient>()).await
            {
                return msg.unwrap().expect("an answer before the close");
            }
            b.get_ref().writable().await.unwrap();
            assert_eq!(
                b.get_ref().try_write(std::slice::from_ref(byte)).unwrap(),
                1
            );
        }
        panic!("the server waited for the whole frame");
    };
    let (pongs, answer) = tokio::join!(keep_alive, loris);
    expect_error(answer, "idle for 0.4s: no complete frame received");
    assert!(pongs >= 3, "{pongs} pongs");
    eventually("all sessions gone", || stats.session_count() == 0).await;
}

#[tokio::test]
async fn joins_per_address_are_rate_limited() {
    let (addr, _) = start_with_stats(ServerConfig {
        join_rate: 4,
        join_burst: 3,
        ..ServerConfig::default()
    })
    .await;
    let mut kept = Vec::new();
    for i in 0..3 {
        let mut c = join(addr, &format!("r{i}"), &["tcp-punch"]).await;
        assert!(matches!(recv(&mut c).await, ServerToClient::Waiting { .. }));
        kept.push(c);
    }
    let mut over = join(addr, "r3", &["tcp-punch"]).await;
    expect_error(
        recv(&mut over).await,
        "too many joins from 127.0.0.1: the server allows 4 per second (bursts of 3)",
    );
    // Another address has its own bucket.
    let mut other = conn_from(addr, [127, 0, 0, 2]).await;
    other.send(&join_frame("r4", None)).await.unwrap();
    assert!(matches!(
        recv(&mut other).await,
        ServerToClient::Waiting { .. }
    ));
    // Observing is not joining.
    let mut o = conn(addr).await;
    o.send(&ClientToServer::Observe {
        version: PROTOCOL_VERSION,
    })
    .await
    .unwrap();
    assert!(matches!(
        recv(&mut o).await,
        ServerToClient::Observed { .. }
    ));
    // The bucket refills at 4 per second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut later = join(addr, "r5", &["tcp-punch"]).await;
    assert!(matches!(
        recv(&mut later).await,
        ServerToClient::Waiting { .. }
    ));
}

#[tokio::test]
async fn a_server_token_is_required_when_configured() {
    let addr = start(ServerConfig {
        server_token: Some("0pen-sesame".into()),
        ..ServerConfig::default()
    })
    .await;
    for (token, expected) in [
        (
            None,
            "this server requires a server token to join: give --server-token",
        ),
        (Some("open-sesame"), "wrong server token"),
        (Some(""), "wrong server token"),
    ] {
        let mut c = conn(addr).await;
        c.send(&join_frame("t", token)).await.unwrap();
        expect_error(recv(&mut c).await, expected);
        assert!(
            c.recv::<ServerToClient>().await.unwrap().is_none(),
            "closed"
        );
    }
    // With the right token two peers pair, through the real client too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let names = vec!["tcp-punch".to_owned()];
    let first =
        RendezvousClient::join_with_token(addr, "t", &names, Some("0pen-sesame"), deadline, || {});
    let second = async {
        let mut c = conn(addr).await;
        c.send(&join_frame("t", Some("0pen-sesame"))).await.unwrap();
        loop {
            match recv(&mut c).await {
                ServerToClient::Waiting { .. } => continue,
                ServerToClient::Paired { .. } => break c,
                other => panic!("{other:?}"),
            }
        }
    };
    let (first, _second) = tokio::join!(first, second);
    let (_client, pairing) = first.expect("paired with the right token");
    assert_eq!(pairing.strategies, names);
    // The client without a token gets the server's reason.
    let err = RendezvousClient::join(addr, "u", &names, deadline, || {})
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(m) if m.contains("requires a server token")),
        "{err}"
    );
}

#[tokio::test]
async fn a_token_sent_to_an_open_server_is_ignored_and_old_join_frames_still_work() {
    let addr = start(ServerConfig::default()).await;
    let mut a = conn(addr).await;
    a.send(&join_frame("compat", Some("unneeded")))
        .await
        .unwrap();
    assert!(matches!(recv(&mut a).await, ServerToClient::Waiting { .. }));
    // A frame exactly as clients before the token field write it.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(
        b"{\"type\":\"join\",\"version\":1,\"session\":\"compat\",\"strategies\":[\"tcp-punch\"]}\n",
    )
    .await
    .unwrap();
    let mut b = FramedConn::new(raw, 1 << 16);
    assert!(matches!(recv(&mut b).await, ServerToClient::Paired { .. }));
    assert!(matches!(recv(&mut a).await, ServerToClient::Paired { .. }));
}

/// Joins that carry only their PAKE message (no relay ticket) get each other's with the
/// pairing; a join with a ticket paired with one without gets none (the express side would
/// wait for a relay that never comes), nor does a malformed message pass.
#[tokio::test]
async fn pake_only_joins_get_each_others_message_and_mixed_ones_none() {
    use nettool_core::protocol::ExpressJoin;
    let addr = start(ServerConfig::default()).await;
    let pake = |b: &str| b.repeat(66);
    let ticket = "ab".repeat(16);
    for (session, a, b, want) in [
        ("pake-only", (pake("1"), ""), (pake("2"), ""), true),
        (
            "mixed",
            (pake("1"), ticket.as_str()),
            (pake("2"), ""),
            false,
        ),
        ("malformed", ("zz".into(), ""), (pake("2"), ""), false),
    ] {
        let mut conns = Vec::new();
        for (p, t) in [a.clone(), b.clone()] {
            let mut c = conn(addr).await;
            c.send(&ClientToServer::Join {
                version: PROTOCOL_VERSION,
                session: session.into(),
                strategies: vec!["tcp-punch".into()],
                token: None,
                express: Some(ExpressJoin {
                    pake: p,
                    ticket: t.to_owned(),
                    offers: None,
                }),
            })
            .await
            .unwrap();
            if conns.is_empty() {
                assert!(matches!(recv(&mut c).await, ServerToClient::Waiting { .. }));
            }
            conns.push(c);
        }
        let mut got = Vec::new();
        for c in &mut conns {
            match recv(c).await {
                ServerToClient::Paired { peer_pake, .. } => got.push(peer_pake),
                other => panic!("{session}: expected paired, got {other:?}"),
            }
        }
        if want {
            assert_eq!(got, [Some(b.0.clone()), Some(a.0.clone())], "{session}");
        } else {
            assert_eq!(got, [None, None], "{session}");
        }
    }
}

/// Prepared offers in PAKE-only joins: each peer gets the other's with the pairing when both
/// joins carried some, neither when one did not; a join whose offers name a strategy it does
/// not list, or are not objects, or go with a relay ticket, is refused with the reason.
#[tokio::test]
async fn join_offers_pass_when_both_joins_carry_them_and_bad_ones_are_refused() {
    use nettool_core::protocol::ExpressJoin;
    use serde_json::{json, Map, Value};
    let addr = start(ServerConfig::default()).await;
    let pake = |b: &str| b.repeat(66);
    let offers = |v: Value| -> Option<Map<String, Value>> {
        Some(v.as_object().expect("an object").clone())
    };
    let join = |session: &str, pake: String, ticket: &str, offers| ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: session.into(),
        strategies: vec!["tcp-punch".into(), "udp-quic".into()],
        token: None,
        express: Some(ExpressJoin {
            pake,
            ticket: ticket.into(),
            offers,
        }),
    };
    let a_offers = offers(json!({"tcp-punch": {"receive": ["192.0.2.1:1"]}}));
    let b_offers = offers(json!({"udp-quic": {"candidates": []}}));
    for (session, a, b, want) in [
        ("both", a_offers.clone(), b_offers.clone(), true),
        ("one", a_offers.clone(), None, false),
    ] {
        let mut first = conn(addr).await;
        first.send(&join(session, pake("1"), "", a)).await.unwrap();
        assert!(matches!(
            recv(&mut first).await,
            ServerToClient::Waiting { .. }
        ));
        let mut second = conn(addr).await;
        second.send(&join(session, pake("2"), "", b)).await.unwrap();
        let mut got = Vec::new();
        for c in [&mut first, &mut second] {
            match recv(c).await {
                ServerToClient::Paired { peer_offers, .. } => got.push(peer_offers),
                other => panic!("{session}: expected paired, got {other:?}"),
            }
        }
        if want {
            assert_eq!(got, [b_offers.clone(), a_offers.clone()], "{session}");
        } else {
            assert_eq!(got, [None, None], "{session}");
        }
    }
    let ticket = "ab".repeat(16);
    for (session, msg, why) in [
        (
            "unlisted",
            join("unlisted", pake("1"), "", offers(json!({"tcp-direct": {}}))),
            "'tcp-direct', which is not among its strategies",
        ),
        (
            "not-object",
            join(
                "not-object",
                pake("1"),
                "",
                offers(json!({"tcp-punch": [1]})),
            ),
            "offer for 'tcp-punch' must be a JSON object",
        ),
        (
            "ticket",
            join("ticket", pake("1"), &ticket, a_offers.clone()),
            "not with a relay ticket",
        ),
    ] {
        let mut c = conn(addr).await;
        c.send(&msg).await.unwrap();
        match recv(&mut c).await {
            ServerToClient::Error { message } => {
                assert!(message.contains(why), "{session}: {message}")
            }
            other => panic!("{session}: expected an error, got {other:?}"),
        }
    }
    // The server still serves.
    let mut c = conn(addr).await;
    c.send(&join("after", pake("1"), "", a_offers))
        .await
        .unwrap();
    assert!(matches!(recv(&mut c).await, ServerToClient::Waiting { .. }));
}
