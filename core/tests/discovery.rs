//! NAT behaviour discovery against servers on loopback (127.0.0.1 and 127.0.0.2 are both this
//! host, so there is no NAT: what is checked here is the protocol and the honesty of the
//! verdicts; the NAT lab checks the verdicts behind real NAT rules).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nettool_core::discovery::{discover, DiscoverOptions, DiscoveryError, Filtering, Mapping};
use nettool_core::server::{RendezvousServer, ServerConfig};
use nettool_core::stun;
use tokio::net::UdpSocket;

fn quick() -> DiscoverOptions {
    DiscoverOptions {
        test_timeout: Duration::from_millis(300),
        tcp: true,
    }
}

async fn server(other: Option<&str>) -> SocketAddr {
    let server = RendezvousServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            other_address: other.map(|o| o.parse().unwrap()),
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

#[tokio::test]
async fn rfc5780_server_on_loopback_is_no_nat_with_open_filtering() {
    let addr = server(Some("127.0.0.2:0")).await;
    let r = discover(addr, &quick()).await.unwrap();
    assert_eq!(r.udp_mapping, Mapping::NoNat);
    assert_eq!(r.udp_filtering, Filtering::EndpointIndependent);
    assert_eq!(r.tcp_mapping, Mapping::NoNat);
    assert_eq!(r.public_addr, Some(addr.ip()));
    assert_eq!(r.port_preservation, Some(true));
    assert_eq!(r.hairpinning, Some(true));
    let other = r.server_other_address.expect("OTHER-ADDRESS");
    assert_eq!(other.ip().to_string(), "127.0.0.2");
    assert!(r.rtt_ms > 0.0 && r.rtt_ms < 1000.0);
}

#[tokio::test]
async fn a_server_without_rfc5780_gives_unknown_filtering_not_a_guess() {
    let addr = server(None).await;
    let r = discover(addr, &quick()).await.unwrap();
    // The mapped address equals the local one: "no NAT" needs no second address.
    assert_eq!(r.udp_mapping, Mapping::NoNat);
    assert_eq!(r.udp_filtering, Filtering::Unknown);
    assert_eq!(r.tcp_mapping, Mapping::NoNat);
    assert_eq!(r.server_other_address, None);
}

/// A STUN server that claims an OTHER-ADDRESS but ignores CHANGE-REQUEST (always answers
/// from its one address): the filtering tests get answers from the wrong place, which says
/// nothing about filtering, so the verdict is unknown, not endpoint-independent.
#[tokio::test]
async fn a_server_ignoring_change_request_gives_unknown_filtering() {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let claimed: SocketAddr = "127.0.0.2:9".parse().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if let Some(req) = stun::parse_request(&buf[..n]) {
                let reply = stun::success_response(&req.id, from, Some(addr), Some(claimed));
                let _ = socket.send_to(&reply, from).await;
            }
        }
    });
    let opts = DiscoverOptions {
        tcp: false,
        ..quick()
    };
    let r = discover(addr, &opts).await.unwrap();
    assert_eq!(r.udp_filtering, Filtering::Unknown);
    assert_eq!(r.tcp_mapping, Mapping::Unknown);
}

#[tokio::test]
async fn a_silent_server_is_an_error_within_the_time_bound() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let opts = quick();
    let start = Instant::now();
    let err = discover(addr, &opts).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::NoAnswer(a) if a == addr),
        "{err}"
    );
    assert!(
        start.elapsed() <= opts.time_bound(),
        "{:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains("no STUN answer"), "{err}");
}
