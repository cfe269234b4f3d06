//! The rendezvous server answers STUN Binding requests on UDP, on the port number of its TCP
//! listener, and shrugs off everything else.

use std::time::Duration;

use nettool_core::server::{RendezvousServer, ServerConfig};
use nettool_core::stun;
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
