//! Relaying through the rendezvous server: the last-resort strategy's wire format.
//!
//! A peer opens a new connection to the server and sends [`ClientToServer::Relay`] with the
//! session and the relay token it got when paired. When both peers are attached the server
//! answers [`ServerToClient::Relaying`] and splices the two connections. Client to server, the
//! bytes are the raw link; server to client they come in frames, so the server can end a relay
//! with a message the peer can read (a limit was hit) instead of just cutting the connection:
//!
//! ```text
//! kind (u8) | length (u32, big endian) | payload
//! kind 0: link data   kind 2: the relay ended, payload = why (UTF-8)
//! ```
//!
//! When a peer closes its sending side, the server half-closes the other peer's connection
//! (a TCP FIN between frames is the link's end of stream). Kind 1 (end of stream as a frame)
//! is understood but not sent: a peer that stops reading at its TLS close_notify would leave
//! it unread, and closing a socket with unread bytes resets the connection.
//!
//! [`RelayStream`] is the client's side: it decodes the frames and turns an end message into
//! an I/O error carrying the server's words.
//!
//! [`ClientToServer::Relay`]: crate::protocol::ClientToServer::Relay
//! [`ServerToClient::Relaying`]: crate::protocol::ServerToClient::Relaying

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Frame kind: link data.
pub const FRAME_DATA: u8 = 0;
/// Frame kind: the peer closed its sending side.
pub const FRAME_EOF: u8 = 1;
/// Frame kind: the relay ended; the payload says why.
pub const FRAME_END: u8 = 2;
/// Largest frame payload the server sends.
pub const MAX_FRAME: usize = 256 * 1024;

/// Encodes a frame header.
pub fn header(kind: u8, len: usize) -> [u8; 5] {
    let len = u32::try_from(len).expect("relay frames are small");
    let l = len.to_be_bytes();
    [kind, l[0], l[1], l[2], l[3]]
}

/// Limits of the relay through the server. Hitting one ends that relay with a message to both
/// peers.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// Sessions relayed at the same time (attached peers waiting for their partner count).
    pub max_sessions: usize,
    /// Bytes per second per session, both directions together; 0 = unlimited.
    pub rate: u64,
    /// Bytes per session, both directions together; 0 = unlimited.
    pub max_bytes: u64,
    /// How long one relay may last; zero = unlimited.
    pub max_duration: Duration,
    /// How long the first peer to attach waits for the second.
    pub attach_timeout: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_sessions: 100,
            rate: 0,
            max_bytes: 0,
            max_duration: Duration::ZERO,
            attach_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
enum ReadState {
    Header { buf: [u8; 5], filled: usize },
    Data { remaining: usize },
    End { buf: Vec<u8>, remaining: usize },
    Eof,
    Failed(String),
}

/// The client's end of a relay: raw bytes out, relay frames in.
#[derive(Debug)]
pub struct RelayStream {
    inner: TcpStream,
    prefix: Vec<u8>,
    prefix_pos: usize,
    state: ReadState,
}

impl RelayStream {
    /// Wraps the relay connection after [`ServerToClient::Relaying`]; `prefix` holds bytes
    /// already read past that message.
    ///
    /// [`ServerToClient::Relaying`]: crate::protocol::ServerToClient::Relaying
    pub fn new(inner: TcpStream, prefix: Vec<u8>) -> Self {
        Self {
            inner,
            prefix,
            prefix_pos: 0,
            state: ReadState::Header {
                buf: [0; 5],
                filled: 0,
            },
        }
    }

    /// The underlying connection to the server.
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    fn poll_raw(&mut self, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.prefix_pos < self.prefix.len() {
            let n = out.len().min(self.prefix.len() - self.prefix_pos);
            out[..n].copy_from_slice(&self.prefix[self.prefix_pos..self.prefix_pos + n]);
            self.prefix_pos += n;
            return Poll::Ready(Ok(n));
        }
        let mut rb = ReadBuf::new(out);
        match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the relay connection closed in the middle of a frame",
    )
}

impl AsyncRead for RelayStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                ReadState::Eof => return Poll::Ready(Ok(())),
                ReadState::Failed(msg) => return Poll::Ready(Err(io::Error::other(msg.clone()))),
                ReadState::Header { filled, .. } => {
                    let mut tmp = [0u8; 5];
                    let already = *filled;
                    let want = 5 - already;
                    let n = match this.poll_raw(cx, &mut tmp[..want]) {
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    };
                    if n == 0 {
                        // The server half-closed between frames: the peer's end of the link.
                        if already == 0 {
                            this.state = ReadState::Eof;
                            return Poll::Ready(Ok(()));
                        }
                        return Poll::Ready(Err(closed()));
                    }
                    let ReadState::Header { buf: h, filled } = &mut this.state else {
                        unreachable!()
                    };
                    h[*filled..*filled + n].copy_from_slice(&tmp[..n]);
                    *filled += n;
                    if *filled == 5 {
                        let h = *h;
                        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                        this.state = match h[0] {
                            FRAME_DATA if len > 0 => ReadState::Data { remaining: len },
                            FRAME_DATA => ReadState::Header {
                                buf: [0; 5],
                                filled: 0,
                            },
                            FRAME_EOF => ReadState::Eof,
                            FRAME_END if len <= MAX_FRAME => ReadState::End {
                                buf: Vec::with_capacity(len),
                                remaining: len,
                            },
                            other => ReadState::Failed(format!(
                                "bad relay frame (kind {other}, length {len})"
                            )),
                        };
                    }
                }
                ReadState::Data { remaining } => {
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let want = (*remaining).min(buf.remaining());
                    let dst = buf.initialize_unfilled_to(want);
                    let n = match this.poll_raw(cx, dst) {
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    };
                    if n == 0 {
                        return Poll::Ready(Err(closed()));
                    }
                    buf.advance(n);
                    let ReadState::Data { remaining } = &mut this.state else {
                        unreachable!()
                    };
                    *remaining -= n;
                    if *remaining == 0 {
                        this.state = ReadState::Header {
                            buf: [0; 5],
                            filled: 0,
                        };
                    }
                    return Poll::Ready(Ok(()));
                }
                ReadState::End { remaining, .. } => {
                    let mut tmp = vec![0u8; *remaining];
                    let n = if tmp.is_empty() {
                        0
                    } else {
                        match this.poll_raw(cx, &mut tmp) {
                            Poll::Ready(Ok(0)) => return Poll::Ready(Err(closed())),
                            Poll::Ready(Ok(n)) => n,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => return Poll::Pending,
                        }
                    };
                    let ReadState::End {
                        buf: msg,
                        remaining,
                    } = &mut this.state
                    else {
                        unreachable!()
                    };
                    msg.extend_from_slice(&tmp[..n]);
                    *remaining -= n;
                    if *remaining == 0 {
                        let text = String::from_utf8_lossy(msg).into_owned();
                        this.state =
                            ReadState::Failed(format!("relay ended by the server: {text}"));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for RelayStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(feature = "server")]
mod splice_impl {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::TcpStream;
    use tokio::sync::Mutex;

    use super::RelayLimits;
    use super::{header, FRAME_DATA, FRAME_END, MAX_FRAME};

    /// Shared accounting of one relayed session.
    struct Budget {
        start: Instant,
        bytes: std::sync::atomic::AtomicU64,
        limits: RelayLimits,
    }

    enum DirEnd {
        /// The sender closed its side; the peer was told.
        Eof,
        /// A limit was hit or a connection failed; the text says which.
        Stop(String),
    }

    async fn direction(
        mut from: OwnedReadHalf,
        mut prefix: Vec<u8>,
        to: Arc<Mutex<OwnedWriteHalf>>,
        budget: Arc<Budget>,
    ) -> DirEnd {
        let mut buf = vec![0u8; 5 + MAX_FRAME];
        loop {
            let n = if prefix.is_empty() {
                match from.read(&mut buf[5..]).await {
                    Ok(n) => n,
                    Err(e) => return DirEnd::Stop(format!("a peer's connection failed: {e}")),
                }
            } else {
                let n = prefix.len().min(MAX_FRAME);
                buf[5..5 + n].copy_from_slice(&prefix[..n]);
                prefix.drain(..n);
                n
            };
            if n == 0 {
                // Pass the half-close on as a TCP half-close, not as a frame: a peer that
                // stops reading at its TLS close_notify must not leave unread bytes behind,
                // or closing its socket would reset the connection and lose data in flight.
                let mut w = to.lock().await;
                let _ = w.shutdown().await;
                return DirEnd::Eof;
            }
            let total = budget
                .bytes
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed)
                + n as u64;
            let limits = &budget.limits;
            if limits.max_bytes > 0 && total > limits.max_bytes {
                return DirEnd::Stop(format!(
                    "relay limit reached: {} bytes per session",
                    limits.max_bytes
                ));
            }
            if limits.rate > 0 {
                let due = Duration::from_secs_f64(total as f64 / limits.rate as f64);
                let elapsed = budget.start.elapsed();
                if due > elapsed {
                    tokio::time::sleep(due - elapsed).await;
                }
            }
            buf[..5].copy_from_slice(&header(FRAME_DATA, n));
            let mut w = to.lock().await;
            if let Err(e) = w.write_all(&buf[..5 + n]).await {
                return DirEnd::Stop(format!("a peer's connection failed: {e}"));
            }
        }
    }

    /// Aborts its task when dropped, so a direction task ends on every path (the splice
    /// returned, or its own future was dropped because the server stopped).
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// Splices two attached relay connections until both directions ended or a limit is hit;
    /// returns why it ended (for the log). Both peers get an end frame with the reason when a
    /// limit stops the relay. Each direction runs in a task of its own (both cores can copy);
    /// the tasks are aborted when this returns or is dropped.
    pub(crate) async fn splice(
        a: (TcpStream, Vec<u8>),
        b: (TcpStream, Vec<u8>),
        limits: &RelayLimits,
    ) -> String {
        let _ = a.0.set_nodelay(true);
        let _ = b.0.set_nodelay(true);
        let (ar, aw) = a.0.into_split();
        let (br, bw) = b.0.into_split();
        let (aw, bw) = (Arc::new(Mutex::new(aw)), Arc::new(Mutex::new(bw)));
        let budget = Arc::new(Budget {
            start: Instant::now(),
            bytes: std::sync::atomic::AtomicU64::new(0),
            limits: limits.clone(),
        });
        let mut ab = AbortOnDrop(tokio::spawn(direction(ar, a.1, bw.clone(), budget.clone())));
        let mut ba = AbortOnDrop(tokio::spawn(direction(br, b.1, aw.clone(), budget.clone())));
        // Both directions run until each saw its sender's end, unless one stops early (a limit,
        // a failed connection): then the whole relay stops.
        let run = async {
            let (mut ab_done, mut ba_done) = (false, false);
            while !(ab_done && ba_done) {
                let end = tokio::select! {
                    r = &mut ab.0, if !ab_done => { ab_done = true; r }
                    r = &mut ba.0, if !ba_done => { ba_done = true; r }
                };
                match end {
                    Ok(DirEnd::Eof) => {}
                    Ok(DirEnd::Stop(why)) => return Some(why),
                    Err(_) => return Some("relay task failed".to_owned()),
                }
            }
            None
        };
        let stop = if limits.max_duration.is_zero() {
            run.await
        } else {
            match tokio::time::timeout(limits.max_duration, run).await {
                Ok(s) => s,
                Err(_) => Some(format!(
                    "relay limit reached: {:.0} s per session",
                    limits.max_duration.as_secs_f64()
                )),
            }
        };
        // Stop both directions before writing the end frames (a direction may hold a writer).
        drop((ab, ba));
        let why = stop
            .clone()
            .unwrap_or_else(|| "both peers closed".to_owned());
        for w in [aw, bw] {
            let mut w = w.lock().await;
            if let Some(msg) = &stop {
                let _ = w.write_all(&header(FRAME_END, msg.len())).await;
                let _ = w.write_all(msg.as_bytes()).await;
            }
            let _ = w.shutdown().await;
        }
        why
    }
}

#[cfg(feature = "server")]
pub(crate) use splice_impl::splice;
