//! The relay strategy and the server's relay over loopback: tokens, limits, relaying off.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nettool_core::protocol::{ClientToServer, FramedConn, ServerToClient, PROTOCOL_VERSION};
use nettool_core::{ConnectParams, Link, Orchestrator, Outcome, Report, Role};
use nettool_rendezvous::{RelayLimits, RendezvousServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn server(relay: Option<RelayLimits>) -> SocketAddr {
    let server = RendezvousServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            relay,
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

async fn relay_pair(
    addr: SocketAddr,
    session: &str,
) -> ((Option<Link>, Report), (Option<Link>, Report)) {
    let relay = nettool_strategies::relay::Relay::new(Default::default());
    let orch = Arc::new(Orchestrator::new(
        vec![(Arc::new(relay), Duration::from_secs(5))],
        Duration::from_secs(10),
    ));
    let params = ConnectParams {
        server: addr,
        session: session.into(),
        secret: Some("s".into()),
    };
    tokio::join!(
        orch.connect(&params, &|_| {}),
        orch.connect(&params, &|_| {})
    )
}

#[tokio::test]
async fn relayed_link_carries_data_both_ways() {
    let addr = server(Some(RelayLimits::default())).await;
    let ((a, ra), (b, rb)) = relay_pair(addr, "r1").await;
    let (a, b) = (a.expect("a linked"), b.expect("b linked"));
    assert_eq!(ra.strategy.as_deref(), Some("relay"));
    assert_eq!(rb.attempts[0].outcome, Outcome::Connected);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut ar, mut aw) = tokio::io::split(a.stream);
    let (mut br, mut bw) = tokio::io::split(b.stream);
    let send = data.clone();
    let (got_b, got_a, _, _) = tokio::join!(
        async {
            let mut v = Vec::new();
            br.read_to_end(&mut v).await.unwrap();
            v
        },
        async {
            let mut v = Vec::new();
            ar.read_to_end(&mut v).await.unwrap();
            v
        },
        async {
            aw.write_all(&send).await.unwrap();
            aw.shutdown().await.unwrap();
        },
        async {
            bw.write_all(b"back").await.unwrap();
            bw.shutdown().await.unwrap();
        },
    );
    assert_eq!(got_b, data);
    assert_eq!(got_a, b"back");
}

#[tokio::test]
async fn a_third_party_without_the_token_cannot_attach() {
    let addr = server(Some(RelayLimits::default())).await;
    // A paired session exists...
    let join = |role: &'static str| async move {
        let mut c = FramedConn::new(tokio::net::TcpStream::connect(addr).await.unwrap(), 1 << 16);
        c.send(&ClientToServer::Join {
            version: PROTOCOL_VERSION,
            session: "victim".into(),
            strategies: vec!["relay".into()],
            token: None,
            express: None,
        })
        .await
        .unwrap();
        let _ = role;
        c
    };
    let mut a = join("a").await;
    let _waiting: Option<ServerToClient> = a.recv().await.unwrap();
    let _b = join("b").await;
    // ...and a stranger guesses a token.
    let mut s = FramedConn::new(tokio::net::TcpStream::connect(addr).await.unwrap(), 1 << 16);
    s.send(&ClientToServer::Relay {
        version: PROTOCOL_VERSION,
        session: "victim".into(),
        token: "00000000000000000000000000000000".into(),
        role: Role::First,
    })
    .await
    .unwrap();
    match s.recv::<ServerToClient>().await.unwrap() {
        Some(ServerToClient::Error { message }) => assert!(
            message.contains("relay refused: no paired session with that name and token"),
            "{message}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_with_relaying_off_refuses_clearly() {
    let addr = server(None).await;
    let ((a, ra), (b, _)) = relay_pair(addr, "off").await;
    assert!(a.is_none() && b.is_none());
    let err = ra.attempts[0].error.as_deref().unwrap();
    assert!(err.contains("does not relay"), "{err}");
}

#[tokio::test]
async fn hitting_the_byte_limit_ends_the_relay_with_a_message_to_both() {
    let addr = server(Some(RelayLimits {
        max_bytes: 200_000,
        ..RelayLimits::default()
    }))
    .await;
    let ((a, _), (b, _)) = relay_pair(addr, "limited").await;
    let (a, b) = (a.unwrap(), b.unwrap());
    let (mut ar, mut aw) = tokio::io::split(a.stream);
    let (mut br, _bw) = tokio::io::split(b.stream);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 10_000];
        for _ in 0..100 {
            if aw.write_all(&chunk).await.is_err() {
                break;
            }
        }
        aw
    });
    let mut sink = Vec::new();
    let err_b = br.read_to_end(&mut sink).await.unwrap_err();
    assert!(
        err_b
            .to_string()
            .contains("relay ended by the server: relay limit reached: 200000 bytes"),
        "{err_b}"
    );
    assert!(sink.len() <= 200_000);
    let mut sink = Vec::new();
    let err_a = ar.read_to_end(&mut sink).await.unwrap_err();
    assert!(err_a.to_string().contains("relay limit reached"), "{err_a}");
    let _ = writer.await;
}

#[tokio::test]
async fn the_rate_limit_slows_a_relay_down() {
    let addr = server(Some(RelayLimits {
        rate: 1_000_000,
        ..RelayLimits::default()
    }))
    .await;
    let ((a, _), (b, _)) = relay_pair(addr, "slow").await;
    let (a, b) = (a.unwrap(), b.unwrap());
    let (_ar, mut aw) = tokio::io::split(a.stream);
    let (mut br, _bw) = tokio::io::split(b.stream);
    let start = std::time::Instant::now();
    tokio::spawn(async move {
        aw.write_all(&vec![1u8; 1_500_000]).await.unwrap();
        aw.shutdown().await.unwrap();
        aw
    });
    let mut got = Vec::new();
    br.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), 1_500_000);
    // 1.5 MB at 1 MB/s from the splice's start, which was before the link handshake (up to
    // ~0.3 s in a debug build): at least ~1.2 s; without the limit it takes a few ms.
    assert!(
        start.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        start.elapsed()
    );
}
