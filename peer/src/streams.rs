//! Several streams over one byte stream, each with its own flow control: yamux over the
//! session's durable stream ([`crate::Connection::into_streams`]), so a bulk transfer does not
//! starve an interactive one and every stream survives what the session survives.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use futures::future::poll_fn;
use nettool_core::LinkStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// One stream: tokio `AsyncRead + AsyncWrite`; `shutdown` ends this direction.
pub type MuxStream = Box<dyn LinkStream>;
/// Where a stream asked of [`drive`] goes.
pub type OpenReply = oneshot::Sender<Result<MuxStream, String>>;

/// Most streams open at once, each way (yamux ends the whole connection when a stream beyond
/// its maximum is opened: keep below it).
pub const MAX_STREAMS: usize = 1024;
/// Largest yamux frame: bigger frames cost fewer headers, wake-ups and records per byte
/// (yamux's 16 KiB default caps a stream at about 550 MB/s here); 128 KiB keeps a bulk
/// stream's frames short enough that an interactive stream's frames interleave.
const SPLIT: usize = 128 * 1024;

/// Runs yamux over `stream` (`mode`: one side is the client, the other the server): opens a
/// stream for each request on `open`, hands each stream the peer opens to `inbound`. Ends, with
/// the reason, when the byte stream does, or after closing it in order once `close` fires
/// (yamux's GoAway, then this direction of `stream` shut down).
pub async fn drive(
    stream: Box<dyn LinkStream>,
    mode: yamux::Mode,
    mut open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::UnboundedSender<MuxStream>,
    mut close: Option<oneshot::Receiver<()>>,
) -> String {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_STREAMS);
    config.set_split_send_size(SPLIT);
    let mut conn = yamux::Connection::new(stream.compat(), config, mode);
    let mut waiting: VecDeque<OpenReply> = VecDeque::new();
    let mut requests = true;
    let mut closing = false;
    poll_fn(|cx| loop {
        if !closing {
            if let Some(c) = close.as_mut() {
                if std::pin::Pin::new(c).poll(cx).is_ready() {
                    closing = true;
                }
            }
        }
        if closing {
            return match conn.poll_close(cx) {
                Poll::Ready(Ok(())) => Poll::Ready("closed".to_owned()),
                Poll::Ready(Err(e)) => Poll::Ready(format!("closing: {e}")),
                Poll::Pending => Poll::Pending,
            };
        }
        while requests {
            match open.poll_recv(cx) {
                Poll::Ready(Some(r)) => waiting.push_back(r),
                Poll::Ready(None) => requests = false,
                Poll::Pending => break,
            }
        }
        while !waiting.is_empty() {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(s)) => {
                    let r = waiting.pop_front().expect("not empty");
                    let _ = r.send(Ok(Box::new(s.compat())));
                }
                Poll::Ready(Err(e)) => {
                    for r in waiting.drain(..) {
                        let _ = r.send(Err(format!("cannot open a stream: {e}")));
                    }
                    return Poll::Ready(format!("the link failed: {e}"));
                }
                Poll::Pending => break,
            }
        }
        match conn.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(s))) => {
                let _ = inbound.send(Box::new(s.compat()));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(format!("the link failed: {e}")),
            Poll::Ready(None) => return Poll::Ready("the peer closed the link".to_owned()),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// How long a multiplexer that ended reads what the peer still sends before it lets go of
/// the session's stream.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The session's stream, shared between the multiplexer and what is left after it (see
/// [`Streams::over`]).
struct Shared<S>(Arc<Mutex<S>>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Shared<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Pin::new(&mut *s).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Shared<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Pin::new(&mut *s).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Pin::new(&mut *s).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Pin::new(&mut *s).poll_shutdown(cx)
    }
}

/// The streams of one session (see [`crate::Connection::into_streams`]): open your own,
/// accept the peer's.
#[derive(Debug)]
pub struct Streams {
    open: mpsc::Sender<OpenReply>,
    inbound: mpsc::UnboundedReceiver<MuxStream>,
    ended: watch::Receiver<Option<String>>,
    close: Option<oneshot::Sender<()>>,
}

impl Streams {
    /// yamux over `stream` in a task of its own; `client` on exactly one side.
    pub fn over(stream: impl LinkStream, client: bool) -> Self {
        let (open, open_rx) = mpsc::channel(16);
        let (in_tx, inbound) = mpsc::unbounded_channel();
        let (end_tx, ended) = watch::channel(None);
        let (close, close_rx) = oneshot::channel();
        let mode = if client {
            yamux::Mode::Client
        } else {
            yamux::Mode::Server
        };
        let shared = Shared(Arc::new(Mutex::new(stream)));
        let mine = shared.clone();
        tokio::spawn(async move {
            let why = drive(Box::new(shared), mode, open_rx, in_tx, Some(close_rx)).await;
            // Whatever ended the multiplexer, the session ends in order: this direction ends
            // and what the peer still sends is read to its end (dropped, not refused: a
            // session whose output is gone while the peer sends would count as aborted).
            let mut rest = mine;
            let _ = rest.shutdown().await;
            let mut sink = [0u8; 16 << 10];
            let _ = tokio::time::timeout(DRAIN, async {
                while matches!(rest.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            let _ = end_tx.send(Some(why));
        });
        Self {
            open,
            inbound,
            ended,
            close: Some(close),
        }
    }

    /// Ends the session's stream in order: no more streams either way; the peer's
    /// [`Self::accept`] gives `None`, and the session ends once both sides closed (see
    /// [`crate::Completion::finished`]). Streams still open are cut: shut them down first.
    pub fn close(&mut self) {
        if let Some(c) = self.close.take() {
            let _ = c.send(());
        }
    }

    /// Opens a stream to the peer (it sees it once something is written on it).
    pub async fn open(&self) -> std::io::Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        let gone = || std::io::Error::new(std::io::ErrorKind::NotConnected, self.why());
        self.open.send(tx).await.map_err(|_| gone())?;
        match rx.await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => Err(gone()),
        }
    }

    /// The next stream the peer opened; `None` once the session has ended.
    pub async fn accept(&mut self) -> Option<MuxStream> {
        self.inbound.recv().await
    }

    /// Why the streams ended ("running" while they run).
    pub fn why(&self) -> String {
        self.ended
            .borrow()
            .clone()
            .unwrap_or_else(|| "running".into())
    }
}
