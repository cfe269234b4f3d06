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
    //! The server's side: one task per direction reads whatever has arrived (up to a frame)
    //! and writes it as one frame. (Moving the bytes with `splice(2)` instead was measured:
    //! the server spent a fifth less CPU, but the receiving peer a third more, and the relay
    //! was slower; see README, "The data path".)

    use std::io;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio::net::TcpStream;

    use super::RelayLimits;
    use super::{header, FRAME_DATA, FRAME_END, MAX_FRAME};

    /// Shared accounting of one relayed session.
    struct Budget {
        start: Instant,
        bytes: AtomicU64,
        limits: RelayLimits,
    }

    impl Budget {
        /// Counts `n` more bytes; waits out the rate limit; says why the relay must stop.
        async fn spend(&self, n: usize) -> Option<String> {
            let total = self.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            let limits = &self.limits;
            if limits.max_bytes > 0 && total > limits.max_bytes {
                return Some(format!(
                    "relay limit reached: {} bytes per session",
                    limits.max_bytes
                ));
            }
            if limits.rate > 0 {
                let due = Duration::from_secs_f64(total as f64 / limits.rate as f64);
                let elapsed = self.start.elapsed();
                if due > elapsed {
                    tokio::time::sleep(due - elapsed).await;
                }
            }
            None
        }
    }

    /// One side of a relay: its connection, and whether a frame to it is half written (then
    /// no end frame may follow: it would land inside the frame).
    struct Side {
        stream: TcpStream,
        in_frame: AtomicBool,
    }

    enum DirEnd {
        /// The sender closed its side; the peer was told.
        Eof,
        /// A limit was hit or a connection failed; the text says which.
        Stop(String),
    }

    /// Writes all of `buf` to `to` (both direction tasks hold the streams: `&self` I/O).
    async fn send_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            to.writable().await?;
            match to.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Bytes the sender sent along with its relay request (read past it): one or more frames.
    async fn send_prefix(prefix: &[u8], to: &Side, budget: &Budget) -> Option<DirEnd> {
        for chunk in prefix.chunks(MAX_FRAME) {
            if let Some(why) = budget.spend(chunk.len()).await {
                return Some(DirEnd::Stop(why));
            }
            to.in_frame.store(true, Ordering::Relaxed);
            let mut frame = header(FRAME_DATA, chunk.len()).to_vec();
            frame.extend_from_slice(chunk);
            if let Err(e) = send_all(&to.stream, &frame).await {
                return Some(DirEnd::Stop(format!("a peer's connection failed: {e}")));
            }
            to.in_frame.store(false, Ordering::Relaxed);
        }
        None
    }

    async fn direction(
        from: Arc<Side>,
        prefix: Vec<u8>,
        to: Arc<Side>,
        budget: Arc<Budget>,
    ) -> DirEnd {
        if let Some(end) = send_prefix(&prefix, &to, &budget).await {
            return end;
        }
        drop(prefix);
        let dst = to.stream.as_raw_fd();
        let mut buf = vec![0u8; 5 + MAX_FRAME];
        loop {
            // Whatever has arrived, up to a frame, read behind room for the header.
            let n = loop {
                if let Err(e) = from.stream.readable().await {
                    return DirEnd::Stop(format!("a peer's connection failed: {e}"));
                }
                match from.stream.try_read(&mut buf[5..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return DirEnd::Stop(format!("a peer's connection failed: {e}")),
                }
            };
            if n == 0 {
                // Pass the half-close on as a TCP half-close, not as a frame: a peer that
                // stops reading at its TLS close_notify must not leave unread bytes behind,
                // or closing its socket would reset the connection and lose data in flight.
                // SAFETY: shutdown on a descriptor `to` holds open.
                unsafe { libc::shutdown(dst, libc::SHUT_WR) };
                return DirEnd::Eof;
            }
            if let Some(why) = budget.spend(n).await {
                return DirEnd::Stop(why);
            }
            buf[..5].copy_from_slice(&header(FRAME_DATA, n));
            to.in_frame.store(true, Ordering::Relaxed);
            if let Err(e) = send_all(&to.stream, &buf[..5 + n]).await {
                return DirEnd::Stop(format!("a peer's connection failed: {e}"));
            }
            to.in_frame.store(false, Ordering::Relaxed);
        }
    }

    /// Splices two attached relay connections until both directions ended or a limit is hit;
    /// returns why it ended (for the log). Both peers get an end frame with the reason when a
    /// limit stops the relay (unless a frame to that peer was cut off half written: then it
    /// only sees the connection close). Each direction runs in a task of its own (both cores
    /// can work); both tasks have ended when this returns, and are aborted if it is dropped.
    pub(crate) async fn splice(
        a: (TcpStream, Vec<u8>),
        b: (TcpStream, Vec<u8>),
        limits: &RelayLimits,
    ) -> String {
        let _ = a.0.set_nodelay(true);
        let _ = b.0.set_nodelay(true);
        let side = |stream| {
            Arc::new(Side {
                stream,
                in_frame: AtomicBool::new(false),
            })
        };
        let (sa, sb) = (side(a.0), side(b.0));
        let budget = Arc::new(Budget {
            start: Instant::now(),
            bytes: AtomicU64::new(0),
            limits: limits.clone(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(direction(sa.clone(), a.1, sb.clone(), budget.clone()));
        tasks.spawn(direction(sb.clone(), b.1, sa.clone(), budget.clone()));
        // Both directions run until each saw its sender's end, unless one stops early (a limit,
        // a failed connection): then the whole relay stops.
        let run = async {
            while let Some(end) = tasks.join_next().await {
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
        // Stop both directions, and wait until they are gone, before writing the end frames.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let why = stop
            .clone()
            .unwrap_or_else(|| "both peers closed".to_owned());
        for s in [&sa, &sb] {
            if let Some(msg) = &stop {
                if !s.in_frame.load(Ordering::Relaxed) {
                    let mut frame = header(FRAME_END, msg.len()).to_vec();
                    frame.extend_from_slice(msg.as_bytes());
                    // A peer that reads nothing gets no say in how long this takes.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), send_all(&s.stream, &frame))
                            .await;
                }
            }
            // SAFETY: shutdown on a descriptor `s` holds open.
            unsafe { libc::shutdown(s.stream.as_raw_fd(), libc::SHUT_WR) };
        }
        why
    }
}

#[cfg(feature = "server")]
pub(crate) use splice_impl::splice;
