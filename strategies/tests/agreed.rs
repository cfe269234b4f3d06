//! Relay-first's direct links key their handshake with the key their joins' PAKE messages agreed
//! (`nettool_core::handshake::AgreedKey`): two peers on loopback get the relay link at once
//! and then a direct tcp-punch link whose handshake ran the keyed exchange (no second PAKE;
//! the second peer is the TLS client); and a plain connect's link is keyed with the key its
//! joins' PAKE messages agreed. A build with `NETTOOL_TEST_KEYED_OFF=1` runs SPAKE2 on every
//! link, and this test goes red.

use std::time::Duration;

use nettool_core::handshake::insecure::keyed_handshakes;
use nettool_core::{relay_first, ConnectParams, Orchestrator, Outcome};
use nettool_rendezvous::{RendezvousServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A rendezvous server on loopback, running in the background.
async fn server() -> std::net::SocketAddr {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_first_direct_links_run_the_keyed_exchange() {
    let addr = server().await;
    let order: Vec<String> = ["relay", "tcp-punch"].map(String::from).to_vec();
    let orch = || {
        let built = nettool_strategies::registry()
            .build(&order, &Default::default())
            .unwrap();
        Orchestrator::new(built, Duration::from_secs(20))
    };
    let (a, b) = (orch(), orch());
    let params = ConnectParams {
        server: addr,
        session: "agreed-key".into(),
        secret: Some("k".into()),
    };
    let before = keyed_handshakes();
    let (ra, rb) = tokio::join!(relay_first::connect(&a, &params, &|_| {}), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        relay_first::connect(&b, &params, &|_| {}).await
    });
    let mut directs = Vec::new();
    for r in [ra, rb] {
        assert!(r.link.is_some(), "no relay link: {:?}", r.report);
        assert_eq!(r.report.attempts[0].mode.as_deref(), Some("express"));
        // The relay links carry the express confirmation both ways.
        let mut link = r.link.unwrap();
        link.stream.write_all(b"x").await.unwrap();
        link.stream.flush().await.unwrap();
        directs.push((r.direct.expect("the direct half runs"), link));
    }
    for (_, link) in &mut directs {
        let mut b = [0u8; 1];
        link.stream.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x");
    }
    let mut links = Vec::new();
    for (direct, _) in directs {
        let (link, report) = direct.handle.await.unwrap();
        let tried = &report.attempts[0];
        assert_eq!(
            (tried.strategy.as_str(), tried.outcome),
            ("tcp-punch", Outcome::Connected),
            "{report:?}"
        );
        links.push(link.expect("a direct link"));
    }
    assert_eq!(
        (links[0].local, links[0].remote),
        (links[1].remote, links[1].local)
    );
    assert_eq!(
        keyed_handshakes() - before,
        2,
        "both ends of the direct link ran the keyed exchange"
    );
    drop(links);
    a_plain_connect_keys_its_link_with_the_joins_pake().await;
}

/// A plain connect (no relay-first) keys its links' handshakes too: each join carries its
/// SPAKE2 message alone and the server hands each peer the other's with the pairing. A build
/// with `NETTOOL_TEST_JOIN_PAKE_OFF=1` joins without it (SPAKE2 on the link), and this goes red.
/// (Run from the test above: the count of keyed handshakes is the process's.)
async fn a_plain_connect_keys_its_link_with_the_joins_pake() {
    let addr = server().await;
    let order: Vec<String> = ["tcp-punch"].map(String::from).to_vec();
    let built = nettool_strategies::registry()
        .build(&order, &Default::default())
        .unwrap();
    let orch = Orchestrator::new(built, Duration::from_secs(20));
    let params = ConnectParams {
        server: addr,
        session: "join-pake".into(),
        secret: Some("k".into()),
    };
    let before = keyed_handshakes();
    let ((la, ra), (lb, _)) = tokio::join!(orch.connect(&params, &|_| {}), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        orch.connect(&params, &|_| {}).await
    });
    assert!(la.is_some() && lb.is_some(), "{ra:?}");
    assert_eq!(
        keyed_handshakes() - before,
        2,
        "both ends of the link ran the keyed exchange"
    );
}
