//! Addresses and sockets shared by the strategies.

use std::net::{IpAddr, SocketAddr};

use nettool_core::strategy::RawLink;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The unspecified address of the server's family, to bind sockets on all interfaces.
pub(crate) fn unspecified_for(server: SocketAddr) -> IpAddr {
    match server {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Options every TCP link gets: keep-alives, so NAT mappings outlive idle periods (15 s idle,
/// then every 5 s), and a user timeout, so data that stays unacknowledged for 60 s (a
/// middlebox silently dropping the connection) ends the link with an error instead of a hang.
pub(crate) fn link_socket_options(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(15))
        .with_interval(std::time::Duration::from_secs(5))
        .with_retries(4);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(std::time::Duration::from_secs(60)));
}

/// Hands a connected TCP stream to the link agreement; drops it when its addresses are gone.
pub(crate) async fn send_tcp(
    tx: &mpsc::Sender<RawLink<TcpStream>>,
    stream: TcpStream,
) -> Result<(), mpsc::error::SendError<RawLink<TcpStream>>> {
    let (Ok(local), Ok(remote)) = (stream.local_addr(), stream.peer_addr()) else {
        return Ok(());
    };
    let _ = stream.set_nodelay(true);
    link_socket_options(&stream);
    tx.send(RawLink {
        stream,
        local,
        remote,
    })
    .await
}
