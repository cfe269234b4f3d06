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

/// Why a relay connection was not spliced ([`await_relaying`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// No answer before the deadline.
    #[error("the relay did not answer before the deadline")]
    TimedOut,
    /// The server refused, closed, answered something else, or the connection failed; the
    /// words say which.
    #[error("{0}")]
    NoRelay(String),
}

/// Waits for the server's answer to a relay request sent on `framed` (the relay token's
/// [`ClientToServer::Relay`] or an express ticket's
/// [`ClientToServer::RelayTicket`](crate::protocol::ClientToServer::RelayTicket)): the relay
/// stream once both peers are spliced ([`ServerToClient::Relaying`]).
///
/// [`ClientToServer::Relay`]: crate::protocol::ClientToServer::Relay
/// [`ServerToClient::Relaying`]: crate::protocol::ServerToClient::Relaying
pub async fn await_relaying(
    mut framed: crate::protocol::FramedConn<TcpStream>,
    deadline: std::time::Instant,
) -> Result<RelayStream, AttachError> {
    use crate::protocol::ServerToClient;
    let answer = tokio::time::timeout_at(deadline.into(), framed.recv::<ServerToClient>())
        .await
        .map_err(|_| AttachError::TimedOut)?
        .map_err(|e| AttachError::NoRelay(format!("attaching to the relay: {e}")))?;
    match answer {
        Some(ServerToClient::Relaying) => {
            let (stream, prefix) = framed.into_parts();
            Ok(RelayStream::new(stream, prefix))
        }
        Some(ServerToClient::Error { message }) => Err(AttachError::NoRelay(format!(
            "the server refused to relay: {message}"
        ))),
        Some(other) => Err(AttachError::NoRelay(format!(
            "unexpected answer from the relay: {other:?}"
        ))),
        None => Err(AttachError::NoRelay(
            "the relay closed the connection".into(),
        )),
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

    /// Several buffers in one write: TLS over the relay hands over a record per buffer (16
    /// KiB each), which without this went out in a system call each.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
