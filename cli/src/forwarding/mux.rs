//! The streams of one link (QUIC's own, or yamux over the link's byte stream) and byte
//! pumping between a local TCP connection and a stream, with counters and half-close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use futures::future::poll_fn;
use nettool_core::{Link, LinkStream, LinkStreams};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::Counters;

const COPY_BUF: usize = 64 << 10;
/// yamux ends the whole connection when a stream beyond its maximum is opened (either way), so
/// the forwarder keeps its streams well below it and makes further connections wait.
const MAX_STREAMS: usize = 1024;
pub(crate) const MAX_OPEN_STREAMS: usize = 512;

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

/// [`drive_mux`] with yamux over the link's byte stream.
/// Largest yamux frame: bigger frames cost fewer headers, wake-ups and TLS records per byte
/// (yamux's 16 KiB default caps a stream at about 550 MB/s here); 128 KiB keeps a bulk
/// stream's frames short enough that an interactive stream's frames interleave.
const YAMUX_SPLIT: usize = 128 * 1024;

async fn drive_yamux(
    link: Box<dyn LinkStream>,
    mode: yamux::Mode,
    mut open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::UnboundedSender<Stream>,
) -> String {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_STREAMS);
    config.set_split_send_size(YAMUX_SPLIT);
    let mut conn = yamux::Connection::new(link.compat(), config, mode);
    let mut waiting: std::collections::VecDeque<OpenReply> = Default::default();
    let mut requests = true;
    poll_fn(|cx| loop {
        while requests {
            match open.poll_recv(cx) {
                std::task::Poll::Ready(Some(r)) => waiting.push_back(r),
                std::task::Poll::Ready(None) => requests = false,
                std::task::Poll::Pending => break,
            }
        }
        while !waiting.is_empty() {
            match conn.poll_new_outbound(cx) {
                std::task::Poll::Ready(Ok(s)) => {
                    let r = waiting.pop_front().expect("not empty");
                    let _ = r.send(Ok(Box::new(s.compat())));
                }
                std::task::Poll::Ready(Err(e)) => {
                    for r in waiting.drain(..) {
                        let _ = r.send(Err(format!("cannot open a stream: {e}")));
                    }
                    return std::task::Poll::Ready(format!("the link failed: {e}"));
                }
                std::task::Poll::Pending => break,
            }
        }
        match conn.poll_next_inbound(cx) {
            std::task::Poll::Ready(Some(Ok(s))) => {
                let _ = inbound.send(Box::new(s.compat()));
            }
            std::task::Poll::Ready(Some(Err(e))) => {
                return std::task::Poll::Ready(format!("the link failed: {e}"))
            }
            std::task::Poll::Ready(None) => {
                return std::task::Poll::Ready("the peer closed the link".to_owned())
            }
            std::task::Poll::Pending => return std::task::Poll::Pending,
        }
    })
    .await
}
