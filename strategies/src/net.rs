//! Addresses and sockets shared by the strategies.

use std::net::{IpAddr, SocketAddr};

use nettool_core::candidates::canonical;
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

/// The address to bind a strategy's sockets on so they serve every family of `servers` (the
/// server addresses this peer reached, one per family): `[::]` as a dual-stack socket when
/// there are both families (see [`dual_stack_socket`]), else the one family's unspecified
/// address.
pub(crate) fn unspecified_for_all(servers: &[SocketAddr]) -> IpAddr {
    let v6 = servers.iter().any(SocketAddr::is_ipv6);
    let v4 = servers.iter().any(SocketAddr::is_ipv4);
    if v6 && v4 {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        unspecified_for(servers[0])
    }
}

/// A socket of `local`'s family; an IPv6 socket also serves IPv4 (IPV6_V6ONLY off), so one
/// port carries both families' candidates.
pub(crate) fn dual_stack_socket(
    local: SocketAddr,
    ty: socket2::Type,
    protocol: socket2::Protocol,
) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(local), ty, Some(protocol))?;
    if local.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

/// `remote` as a socket bound to `local` must name it: IPv4 addresses IPv4-mapped for an IPv6
/// (dual-stack) socket.
pub(crate) fn for_socket(local: SocketAddr, remote: SocketAddr) -> SocketAddr {
    match (local, remote) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => remote,
    }
}

/// Sets the TTL (IPv4) or hop limit (IPv6) of what `socket` sends to `remote`; returns the
/// value it had. On a dual-stack socket an IPv4 destination takes the IPv4 TTL.
pub(crate) fn set_hops(
    socket: socket2::SockRef<'_>,
    remote: SocketAddr,
    hops: u32,
) -> std::io::Result<u32> {
    if remote.ip().to_canonical().is_ipv4() {
        let normal = socket.ttl_v4()?;
        socket.set_ttl_v4(hops)?;
        Ok(normal)
    } else {
        let normal = socket.unicast_hops_v6()?;
        socket.set_unicast_hops_v6(hops)?;
        Ok(normal)
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
    let (local, remote) = (canonical(local), canonical(remote));
    let _ = stream.set_nodelay(true);
    link_socket_options(&stream);
    tx.send(RawLink {
        stream,
        local,
        remote,
    })
    .await
}
