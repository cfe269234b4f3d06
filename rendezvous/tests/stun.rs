//! The rendezvous server answers STUN Binding requests on UDP, on the port number of its TCP
//! listener, and shrugs off everything else.

use std::net::SocketAddr;
use std::time::Duration;

use nettool_core::stun;
use nettool_rendezvous::{RendezvousServer, ServerConfig};
use rand::Rng;
use tokio::net::UdpSocket;

async fn ask(socket: &UdpSocket, server: std::net::SocketAddr) -> Option<std::net::SocketAddr> {
    let (id, request) = stun::binding_request();
    let mut buf = [0u8; 1500];
    for _ in 0..10 {
        socket.send_to(&request, server).await.unwrap();
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buf)).await
        {
            assert_eq!(from, server);
            return stun::parse_binding_response(&buf[..n], &id);
        }
    }
    None
}

#[tokio::test]
async fn server_answers_stun_on_its_port_and_ignores_garbage() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    assert_eq!(server.udp_local_addr().unwrap(), addr);
    tokio::spawn(server.run());

    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = socket.local_addr().unwrap();
    assert_eq!(ask(&socket, addr).await, Some(me));

    // Garbage of every size gets no answer and does not stop the server.
    let mut rng = rand::thread_rng();
    for len in [0usize, 1, 19, 20, 21, 100, 1400] {
        let mut junk = vec![0u8; len];
        rng.fill(&mut junk[..]);
        socket.send_to(&junk, addr).await.unwrap();
    }
    let mut buf = [0u8; 1500];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buf))
            .await
            .is_err(),
        "garbage was answered"
    );
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(ask(&other, addr).await, Some(other.local_addr().unwrap()));
    assert_eq!(ask(&socket, addr).await, Some(me));
    // The TCP side still serves.
    tokio::net::TcpStream::connect(addr).await.unwrap();
}

/// One transaction: sends `request` to `to` (resending a few times) and returns the response
/// with its transaction id and where it came from.
async fn transact(
    socket: &UdpSocket,
    to: SocketAddr,
    (id, request): (stun::TransactionId, Vec<u8>),
) -> Option<(stun::BindingResponse, SocketAddr)> {
    let mut buf = [0u8; 1500];
    for _ in 0..10 {
        socket.send_to(&request, to).await.unwrap();
        // Skip datagrams of other transactions (late answers of earlier requests).
        while let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buf)).await
        {
            if let Some(r) = stun::parse_response(&buf[..n], &id) {
                return Some((r, from));
            }
        }
    }
    None
}

async fn rfc5780_server(config: ServerConfig) -> (SocketAddr, SocketAddr) {
    let server = RendezvousServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            other_address: Some("127.0.0.2:0".parse().unwrap()),
            ..config
        },
    )
    .await
    .unwrap();
    let main = server.local_addr().unwrap();
    let other = server
        .other_local_addr()
        .expect("an RFC 5780 server has IP2:P2");
    tokio::spawn(server.run());
    (main, other)
}

/// RFC 5780 on loopback (127.0.0.1 and 127.0.0.2 are both this host): every CHANGE-REQUEST is
/// answered from the socket it asks for, RESPONSE-ORIGIN names that socket and OTHER-ADDRESS
/// the one differing in both address and port.
#[tokio::test]
async fn rfc5780_change_request_is_honoured_from_all_four_addresses() {
    let (main, other) = rfc5780_server(ServerConfig::default()).await;
    assert_eq!(other.ip().to_string(), "127.0.0.2");
    assert_ne!(other.port(), main.port());
    let ip1_p2 = SocketAddr::new(main.ip(), other.port());
    let ip2_p1 = SocketAddr::new(other.ip(), main.port());
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = socket.local_addr().unwrap();
    let all = [main, ip1_p2, ip2_p1, other];
    for (i, to) in all.into_iter().enumerate() {
        for (change_ip, change_port) in [(false, false), (false, true), (true, false), (true, true)]
        {
            let req = stun::binding_request_with_change(change_ip, change_port);
            let (resp, from) = transact(&socket, to, req).await.expect("answered");
            let expect_from = all[i ^ (usize::from(change_ip) * 2) ^ usize::from(change_port)];
            assert_eq!(
                from, expect_from,
                "to {to}, change ip {change_ip} port {change_port}"
            );
            assert_eq!(
                resp,
                stun::BindingResponse::Success {
                    mapped: me,
                    response_origin: Some(expect_from),
                    other_address: Some(all[i ^ 3]),
                }
            );
        }
    }
    // TCP (observe and everything else) is served on the other addresses too.
    for to in [ip1_p2, ip2_p1, other] {
        let stream = tokio::net::TcpStream::connect(to).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (seen, _conn) = nettool_core::client::observe(stream, deadline)
            .await
            .unwrap();
        assert_eq!(seen.ip().to_string(), "127.0.0.1");
    }
}

/// A server with one address sends no RFC 5780 attribute and refuses CHANGE-REQUEST (420).
#[tokio::test]
async fn one_address_server_sends_no_other_address_and_refuses_change_request() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (resp, _) = transact(&socket, addr, stun::binding_request())
        .await
        .unwrap();
    assert_eq!(
        resp,
        stun::BindingResponse::Success {
            mapped: socket.local_addr().unwrap(),
            response_origin: None,
            other_address: None,
        }
    );
    let (resp, from) = transact(&socket, addr, stun::binding_request_with_change(true, true))
        .await
        .unwrap();
    assert_eq!(from, addr);
    assert_eq!(resp, stun::BindingResponse::Error { code: 420 });
}

/// An unusable second address is a clear error at startup, not a server that lies.
#[tokio::test]
async fn bad_other_addresses_are_refused_with_the_reason() {
    let cases = [
        ("0.0.0.0:0", "127.0.0.2:0", "specific IP"),
        ("127.0.0.1:0", "127.0.0.1:0", "second IP address"),
        ("127.0.0.1:0", "[::1]:0", "different IP families"),
        // TEST-NET-1 is not an address of this host.
        (
            "127.0.0.1:0",
            "192.0.2.1:0",
            "is the other address on this host",
        ),
    ];
    for (listen, other, why) in cases {
        let config = ServerConfig {
            other_address: Some(other.parse().unwrap()),
            ..ServerConfig::default()
        };
        let err = RendezvousServer::bind(listen.parse().unwrap(), config)
            .await
            .expect_err(other)
            .to_string();
        assert!(err.contains(why), "{listen} + {other}: {err}");
    }
}

/// STUN answers are rate limited per source address: a burst from one source gets `stun_burst`
/// answers and then nothing (an amplifier for spoofed floods otherwise), while another source
/// is still answered.
#[tokio::test]
async fn stun_answers_are_rate_limited_per_source() {
    let server = RendezvousServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            stun_rate: 1,
            stun_burst: 5,
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    let flooder = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    for _ in 0..50 {
        let (_, request) = stun::binding_request();
        flooder.send_to(&request, addr).await.unwrap();
    }
    let mut answers = 0;
    let mut buf = [0u8; 1500];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), flooder.recv_from(&mut buf)).await
    {
        answers += 1;
    }
    assert!(
        (5..=6).contains(&answers),
        "{answers} answers to 50 requests"
    );
    // Another source address has its own budget.
    let other = UdpSocket::bind("127.0.0.4:0").await.unwrap();
    assert_eq!(ask(&other, addr).await, Some(other.local_addr().unwrap()));
}

/// Garbage and mangled requests on all four RFC 5780 sockets get no answer (or a 420) and stop
/// nothing: valid requests are still answered from the right address.
#[tokio::test]
async fn rfc5780_server_shrugs_off_garbage_on_every_socket() {
    let (main, other) = rfc5780_server(ServerConfig {
        stun_rate: 0,
        ..ServerConfig::default()
    })
    .await;
    let all = [
        main,
        SocketAddr::new(main.ip(), other.port()),
        SocketAddr::new(other.ip(), main.port()),
        other,
    ];
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = rand::thread_rng();
    let (_, valid) = stun::binding_request_with_change(true, true);
    for to in all {
        for _ in 0..200 {
            let mut junk = if rng.gen() {
                valid.clone()
            } else {
                vec![0u8; rng.gen_range(0..64)]
            };
            for _ in 0..rng.gen_range(1..4) {
                if !junk.is_empty() {
                    let i = rng.gen_range(0..junk.len());
                    junk[i] = rng.gen();
                }
            }
            socket.send_to(&junk, to).await.unwrap();
        }
    }
    // Drain whatever was answered (mangled requests that still parse), then check.
    let mut buf = [0u8; 1500];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf)).await
    {}
    for (i, to) in all.into_iter().enumerate() {
        let (resp, from) = transact(&socket, to, stun::binding_request_with_change(true, true))
            .await
            .expect("still answered");
        assert_eq!(from, all[i ^ 3]);
        assert!(matches!(resp, stun::BindingResponse::Success { .. }));
    }
}
