//! A client connection: plain TCP, or TLS over it (the control channel), told apart by the
//! first byte on one port.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use nettool_core::control::TLS_FIRST_BYTE;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::Shared;

/// A client connection after its first byte was seen.
#[derive(Debug)]
pub(crate) enum ServerStream {
    /// Plain JSON lines (observe and relay connections; joins with `--insecure-control`).
    Plain(TcpStream),
    /// TLS (the control channel): rustls' handshake, then [`crate::sealed`]'s record layer.
    Tls(Box<crate::sealed::SealedTls>),
}

impl ServerStream {
    /// Whether the connection runs TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

/// Why a new connection could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Nothing arrived in time: the connection is handed back, to be told so in plain JSON
    /// (as a silent client always was).
    Silent(TcpStream),
    /// It closed, or its TLS handshake failed or was too slow: nothing can be told to it.
    Dropped(String),
}

/// Opens a new connection within `limit`: TLS when its first byte starts a TLS handshake and
/// this server has an identity, else plain.
pub(crate) async fn open(
    shared: &Shared,
    stream: TcpStream,
    limit: Duration,
) -> Result<ServerStream, OpenError> {
    let started = tokio::time::Instant::now();
    let mut first = [0u8; 1];
    match tokio::time::timeout(limit, stream.peek(&mut first)).await {
        Err(_) => return Err(OpenError::Silent(stream)),
        Ok(Err(e)) => return Err(OpenError::Dropped(format!("reading the first byte: {e}"))),
        Ok(Ok(0)) => return Err(OpenError::Dropped("closed before sending anything".into())),
        Ok(Ok(_)) => {}
    }
    match (&shared.config.tls, first[0]) {
        (Some(tls), TLS_FIRST_BYTE) => {
            let accept = crate::sealed::accept(stream, tls.clone());
            match tokio::time::timeout_at(started + limit, accept).await {
                Ok(Ok(tls)) => Ok(ServerStream::Tls(Box::new(tls))),
                Ok(Err(e)) => Err(OpenError::Dropped(format!("TLS handshake failed: {e}"))),
                Err(_) => Err(OpenError::Dropped(format!(
                    "TLS handshake not done within {:.1}s",
                    limit.as_secs_f64()
                ))),
            }
        }
        (None, TLS_FIRST_BYTE) => Err(OpenError::Dropped(
            "a TLS client, but this server has no TLS identity (plain JSON only)".into(),
        )),
        _ => Ok(ServerStream::Plain(stream)),
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
