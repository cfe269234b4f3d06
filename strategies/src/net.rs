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

/// A TCP link's socket whose shutdown sends the FIN only once the peer has acknowledged every
/// byte written before it (the TLS close_notify included), so the FIN travels alone.
///
/// Why (measured in the lab, kernel 6.18, `nf_conntrack_log_invalid`): when a router's
/// connection tracking missed a punched connection's handshake (tcp-punch: the peer's SYN
/// passed between a priming socket's death and its replacement's SYN, so the entry stays in
/// SYN_SENT2 holding the dead socket's sequence number), it lets data and ACKs through as
/// "ignored" but drops an incoming FIN as invalid. A FIN riding on the last data segment takes
/// that data with it, on every retransmission: the receiver waits for ever for its last bytes
/// (CI saw it: 244,811 of 262,144 bytes, full × fw). Alone, a dropped FIN costs nothing: the
/// close_notify before it has already ended the stream for the peer. The price is one round
/// trip at the end of the sending side.
pub(crate) struct LoneFin {
    inner: TcpStream,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    step: std::time::Duration,
}

/// First and longest pause between two looks at what the peer has not acknowledged yet.
const LONE_FIN_STEPS: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(1),
    std::time::Duration::from_millis(20),
);

impl LoneFin {
    pub(crate) fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            wait: None,
            step: LONE_FIN_STEPS.0,
        }
    }
}

/// Bytes written to `stream` that the peer has not acknowledged yet; `None` once nothing more
/// will be acknowledged (the connection is no longer established) or where that is unknown.
#[cfg(target_os = "linux")]
fn unacknowledged(stream: &TcpStream) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    // SAFETY: `fd` is an open TCP socket for the duration of the calls; `info` and `len`
    // describe a buffer of the size passed, which the kernel fills at most.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // ESTABLISHED and CLOSE_WAIT (the peer's FIN is in): our data may still be acknowledged.
    const ESTABLISHED: u8 = 1;
    const CLOSE_WAIT: u8 = 8;
    if got != 0 || !matches!(info.tcpi_state, ESTABLISHED | CLOSE_WAIT) {
        return None;
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int: written but unacknowledged bytes.
    let got = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    (got == 0).then_some(queued.max(0) as usize)
}

#[cfg(not(target_os = "linux"))]
fn unacknowledged(_: &TcpStream) -> Option<usize> {
    None
}

impl tokio::io::AsyncRead for LoneFin {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LoneFin {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let this = self.get_mut();
        // Wait (politely: a timer, growing to LONE_FIN_STEPS.1) until everything is
        // acknowledged. A peer that stops acknowledging is ended by the link's user timeout
        // (`link_socket_options`), which ends this wait too.
        loop {
            match unacknowledged(&this.inner) {
                Some(0) => break,
                Some(_) => {}
                // No longer established: a connection the kernel gave up on (user timeout,
                // reset) says why; else shut down as usual.
                None => match this.inner.take_error() {
                    Ok(Some(e)) => return std::task::Poll::Ready(Err(e)),
                    _ => break,
                },
            }
            let step = this.step;
            let sleep = this
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(step)));
            std::task::ready!(sleep.as_mut().poll(cx));
            this.wait = None;
            this.step = (step * 2).min(LONE_FIN_STEPS.1);
        }
        std::pin::Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The FIN waits for the peer's acknowledgement of every byte: while the peer reads
    /// nothing (its window is full) the shutdown stays pending; once it has read everything,
    /// the shutdown completes and the peer sees every byte, then the end. Without the wait
    /// the shutdown would return at once, with the FIN queued behind the data.
    #[tokio::test]
    async fn the_fin_waits_until_the_peer_acknowledged_everything() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small window at the receiver, room for everything at the sender.
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let sender = tokio::net::TcpSocket::new_v4().unwrap();
        sender.set_send_buffer_size(4 << 20).unwrap();
        let sender = sender
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut receiver, _) = listener.accept().await.unwrap();
        let mut sender = LoneFin::new(sender);
        let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i % 251) as u8).collect();
        sender.write_all(&data).await.unwrap();
        assert!(
            unacknowledged(&sender.inner).is_some_and(|n| n > 0),
            "the receiver's window should hold data back"
        );
        let mut shutdown = Box::pin(async move {
            sender.shutdown().await.unwrap();
            sender
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), shutdown.as_mut())
                .await
                .is_err(),
            "shutdown returned while the peer had not acknowledged everything"
        );
        let mut got = Vec::new();
        let (read, _sender) = tokio::join!(receiver.read_to_end(&mut got), shutdown);
        read.unwrap();
        assert_eq!(got, data);
    }
}
