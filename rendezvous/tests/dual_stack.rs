//! The rendezvous server and client over both IP families on loopback (127.0.0.1 and ::1):
//! one unspecified listen address serves both, peers pair across families, a peer shows
//! itself over its other family and the server tells the peer, and the client's happy
//! eyeballs connect takes the first address that answers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nettool_core::client::{connect_happy, observe_family, ClientError, RendezvousClient};
use nettool_core::control::ControlSecurity;
use nettool_core::protocol::{ClientToServer, FramedConn, ServerToClient};
use nettool_core::Role;

/// These tests are about the families, over plain JSON (TLS is `control_tls.rs`'s).
const PLAIN: ControlSecurity = ControlSecurity::Plain;
use nettool_rendezvous::{ListenAddr, RendezvousServer, ServerConfig};
use tokio::net::TcpStream;

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// A server on `0.0.0.0:0` (every interface of both families); its port.
async fn start() -> u16 {
    let server = RendezvousServer::bind("0.0.0.0:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let port = server.local_addr().unwrap().port();
    assert_eq!(
        server.local_addrs().len(),
        2,
        "both families: {:?}",
        server.local_addrs()
    );
    tokio::spawn(server.run());
    port
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn strategies() -> Vec<String> {
    vec!["relay".to_owned()]
}

#[tokio::test]
async fn one_unspecified_address_serves_both_families_and_pairs_across_them() {
    let port = start().await;
    let s = strategies();
    let (only6, only4) = ([v6(port)], [v4(port)]);
    let first = RendezvousClient::join_any(&only6, &PLAIN, "x", &s, None, soon(), || {});
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        RendezvousClient::join_any(&only4, &PLAIN, "x", &s, None, soon(), || {}).await
    };
    let (first, second) = tokio::join!(first, second);
    let ((c6, p6), (c4, p4)) = (first.unwrap(), second.unwrap());
    assert_eq!(c6.server(), v6(port));
    assert_eq!(c4.server(), v4(port));
    assert!(p6.observed.is_ipv6() && p6.peer.is_ipv4(), "{p6:?}");
    // IPv4 peers of the dual-stack socket are reported as IPv4, not as mapped addresses.
    assert!(p4.observed.is_ipv4() && p4.peer.is_ipv6(), "{p4:?}");
    assert_eq!(p4.pair_id, p6.pair_id);
}

#[tokio::test]
async fn a_peer_seen_over_its_other_family_is_told_to_the_peer_once() {
    let port = start().await;
    let s = strategies();
    // Both prefer IPv6 for the control connection (happy eyeballs); A then shows itself over
    // IPv4.
    let both = [v4(port), v6(port)];
    let first = RendezvousClient::join_any(&both, &PLAIN, "y", &s, None, soon(), || {});
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        RendezvousClient::join_any(&both, &PLAIN, "y", &s, None, soon(), || {}).await
    };
    let (first, second) = tokio::join!(first, second);
    let ((mut a, pa), (mut b, pb)) = (first.unwrap(), second.unwrap());
    assert!(pa.observed.is_ipv6() && pb.observed.is_ipv6());
    assert_eq!(a.other_family_servers(), vec![v4(port)]);
    let (server, seen) = observe_family(&a.other_family_servers(), &PLAIN, "y", &pa, soon())
        .await
        .unwrap();
    assert_eq!(server, v4(port));
    assert!(seen.is_ipv4(), "{seen}");
    a.set_other_family_server(server);
    assert_eq!(a.servers(), vec![v6(port), v4(port)]);
    // B hears of it on its control connection (read while waiting for anything else).
    b.rtt(1, soon()).await.unwrap();
    assert_eq!(b.peer_addresses(), &[seen]);
    // Once per family: a second showing is refused.
    let again = observe_family(&[v4(port)], &PLAIN, "y", &pa, soon()).await;
    assert!(
        matches!(&again, Err(ClientError::Refused(m)) if m.contains("already")),
        "{again:?}"
    );
    // A stranger without the pairing id learns nothing and tells nobody anything.
    let mut forged = pb.clone();
    forged.pair_id = "00".repeat(16);
    let refused = observe_family(&[v4(port)], &PLAIN, "y", &forged, soon()).await;
    assert!(
        matches!(&refused, Err(ClientError::Refused(m)) if m.contains("no such pairing")),
        "{refused:?}"
    );
    b.rtt(1, soon()).await.unwrap();
    assert_eq!(b.peer_addresses(), &[seen], "nothing more reached B");
}

#[tokio::test]
async fn a_version_1_peer_is_not_sent_the_peers_other_address() {
    let port = start().await;
    let mut old = FramedConn::new(TcpStream::connect(v4(port)).await.unwrap(), 1 << 16);
    old.send(&ClientToServer::Join {
        version: 1,
        session: "z".into(),
        strategies: strategies(),
        token: None,
        express: None,
    })
    .await
    .unwrap();
    let waiting: ServerToClient = old.recv().await.unwrap().unwrap();
    assert!(matches!(waiting, ServerToClient::Waiting { .. }));
    let (_new, pairing) =
        RendezvousClient::join_any(&[v6(port)], &PLAIN, "z", &strategies(), None, soon(), || {})
            .await
            .unwrap();
    assert_eq!(pairing.role, Role::Second);
    observe_family(&[v4(port)], &PLAIN, "z", &pairing, soon())
        .await
        .unwrap();
    let paired: ServerToClient = old.recv().await.unwrap().unwrap();
    assert!(
        matches!(paired, ServerToClient::Paired { .. }),
        "{paired:?}"
    );
    old.send(&ClientToServer::Ping { id: 7 }).await.unwrap();
    let next: ServerToClient = old.recv().await.unwrap().unwrap();
    assert_eq!(
        next,
        ServerToClient::Pong { id: 7 },
        "no peer-address for version 1"
    );
}

#[tokio::test]
async fn happy_eyeballs_takes_the_address_that_answers() {
    let port = start().await;
    // A closed port first (refused at once): the next address starts without waiting.
    let closed = {
        let l = std::net::TcpListener::bind(v6(0)).unwrap();
        l.local_addr().unwrap()
    };
    let started = Instant::now();
    let stream = connect_happy(&[v4(port), closed], soon()).await.unwrap();
    assert_eq!(stream.peer_addr().unwrap(), v4(port));
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "a refusal does not wait"
    );
    // Nothing answers: every address's error is named.
    let err = connect_happy(&[closed, v4(closed.port())], soon())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&closed.to_string()), "{text}");
}

#[tokio::test]
async fn listen_addresses_of_both_families_share_one_port() {
    let addrs = [
        ListenAddr {
            addr: v4(0),
            other: None,
        },
        ListenAddr {
            addr: v6(0),
            other: None,
        },
    ];
    let server = RendezvousServer::bind_all(&addrs, ServerConfig::default())
        .await
        .unwrap();
    let got = server.local_addrs();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].port(), got[1].port());
    assert!(got[0].is_ipv4() && got[1].is_ipv6());
}
