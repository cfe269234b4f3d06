//! The streams of one link (QUIC's own, or yamux over the link's byte stream) and byte
//! pumping between a local TCP connection and a stream, with counters and half-close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use nettool_core::{Link, LinkStream, LinkStreams};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::Counters;

const COPY_BUF: usize = 64 << 10;
/// yamux ends the whole connection when a stream beyond its maximum
/// ([`nettool_peer::streams::MAX_STREAMS`]) is opened (either way), so the forwarder keeps its
/// streams well below it and makes further connections wait.
pub(crate) const MAX_OPEN_STREAMS: usize = nettool_peer::streams::MAX_STREAMS / 2;

// ---------------------------------------------------------------------------------------------
// Byte pumping with counters and half-close

async fn copy_counted<R, W>(
    mut r: R,
    mut w: W,
    total: &AtomicU64,
    mine: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        mine.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Half-close: the other direction goes on.
    w.shutdown().await
}

/// Copies `local` <-> `remote` (a mux stream) until both directions ended; counts bytes.
/// Returns (sent to the peer, received from the peer).
pub(crate) async fn pump<S>(
    local: TcpStream,
    remote: S,
    c: &Counters,
) -> (u64, u64, Option<std::io::Error>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (lr, lw) = local.into_split();
    let (rr, rw) = tokio::io::split(remote);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let res = tokio::try_join!(
        copy_counted(lr, rw, &c.sent, &sent),
        copy_counted(rr, lw, &c.received, &received),
    );
    (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        res.err(),
    )
}

// ---------------------------------------------------------------------------------------------
// The multiplexer

/// One stream of a link.
pub(crate) type Stream = Box<dyn LinkStream>;
/// Where the stream asked for goes.
pub(crate) type OpenReply = oneshot::Sender<Result<Stream, String>>;

/// The name of what carries a link's streams (in the report and on stderr).
pub(crate) fn multiplexer(link: &Link) -> &'static str {
    if link.streams().is_some() {
        "quic"
    } else {
        "yamux"
    }
}

/// Runs the streams of `link`: opens outbound streams on request, hands inbound streams to
/// `inbound`. Ends (with the reason) when the link does. A link with its own streams (QUIC)
/// uses them; any other runs yamux over its byte stream.
pub(crate) async fn drive_mux(
    link: Link,
    mode: yamux::Mode,
    open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::UnboundedSender<Stream>,
) -> String {
    match link.streams() {
        Some(streams) => drive_streams(link.stream, streams, open, inbound).await,
        None => drive_yamux(link.stream, mode, open, inbound).await,
    }
}

/// [`drive_mux`] on the link's own streams. `main` (the stream the link handshake ran on)
/// owns the connection: it is kept until the link ends.
async fn drive_streams(
    main: Box<dyn LinkStream>,
    streams: Arc<dyn LinkStreams>,
    mut open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::UnboundedSender<Stream>,
) -> String {
    let _main = main;
    let mut requests = true;
    loop {
        tokio::select! {
            r = open.recv(), if requests => match r {
                Some(reply) => {
                    // Opening waits while the peer's stream limit is reached: not here.
                    let streams = streams.clone();
                    tokio::spawn(async move {
                        let s = streams.open().await;
                        let _ = reply.send(s.map_err(|e| format!("cannot open a stream: {e}")));
                    });
                }
                None => requests = false,
            },
            s = streams.accept() => match s {
                Ok(Some(s)) => {
                    let _ = inbound.send(s);
                }
                Ok(None) => return "the peer closed the link".to_owned(),
                Err(e) => return format!("the link failed: {e}"),
            },
        }
    }
}

/// [`drive_mux`] with yamux over the link's byte stream (the library's multiplexer).
async fn drive_yamux(
    link: Box<dyn LinkStream>,
    mode: yamux::Mode,
    open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::UnboundedSender<Stream>,
) -> String {
    nettool_peer::streams::drive(link, mode, open, inbound, None).await
}
