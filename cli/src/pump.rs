//! The `connect` data path: stdin → link and link → stdout with big buffers, and a graceful
//! end on SIGINT, SIGTERM and SIGHUP.
//!
//! Each direction is a copy loop with a 1 MiB buffer (a TLS link then writes full 16 KiB
//! records). stdin's end half-closes the link (TLS close_notify, QUIC stream finish); the
//! peer's end (a clean close) ends the output. A signal ends the sending side the same way,
//! so the peer sees a clean close instead of a broken connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::stdio::{self, Input, Output};
use nettool_core::Link;

/// Bytes per copy-loop buffer.
pub(crate) const BUF: usize = 1 << 20;

/// The copy-loop buffer size: [`BUF`], or `NETTOOL_PUMP_BUF` bytes (for measuring the lever;
/// 8192 is what `tokio::io::copy` used before).
fn buf_size() -> usize {
    std::env::var("NETTOOL_PUMP_BUF")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(BUF)
}
/// A read from the link is topped up (without waiting) to at least this many bytes before it
/// goes to stdout.
const FILL: usize = 256 << 10;
/// How long a graceful close (close_notify out and everything acknowledged: QUIC's data, and
/// on TCP links the bytes before the FIN, see `LoneFin` in the strategies) may take. It
/// includes the time a slow reader on the other end takes to drain what is still buffered,
/// and is longer than TCP links' user timeout (60 s), so a vanished peer is reported as such.
const CLOSE_WAIT: Duration = Duration::from_secs(75);
/// The same after a signal: the user asked us to end, so do not wait long.
const CLOSE_WAIT_SIGNALLED: Duration = Duration::from_secs(3);

/// How the pump ended.
#[derive(Debug, Default)]
pub(crate) struct Pumped {
    /// Bytes from stdin sent to the peer.
    pub(crate) sent: u64,
    /// Bytes from the peer written to stdout.
    pub(crate) received: u64,
    /// The peer closed its side cleanly (we read its end).
    pub(crate) peer_closed: bool,
    /// Our sending was cut short because the peer had closed and no longer takes data.
    pub(crate) send_cut: bool,
    /// The signal that ended the pump, if one did.
    pub(crate) signal: Option<i32>,
}

/// Waits for SIGINT, SIGTERM or SIGHUP; returns its number. Installed handlers stay for the
/// rest of the process (the default action, dying on the spot, is what we avoid).
pub(crate) fn signals() -> io::Result<watch::Receiver<Option<i32>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let n = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
        };
        let _ = tx.send(Some(n));
    });
    Ok(rx)
}

// One way to name and await a signal: the session layer's (also used by the pump here).
pub(crate) use nettool_core::session::{signal_name, signalled};

/// Reads at least one byte (0 at the end), then tops the buffer up to `min` bytes with what
/// the reader has ready without waiting.
async fn read_filled<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    min: usize,
) -> io::Result<usize> {
    let mut got = r.read(buf).await?;
    if got == 0 {
        return Ok(0);
    }
    while got < min.min(buf.len()) {
        let mut rb = ReadBuf::new(&mut buf[got..]);
        let ready =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *r).poll_read(cx, &mut rb))).await;
        match ready {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => got += rb.filled().len(),
            Poll::Ready(Err(e)) => return Err(e),
            _ => break,
        }
    }
    Ok(got)
}

/// A clear error for a failed receive: a peer that vanished (killed without closing, host
/// gone, path broken) shows up as a keep-alive timeout or a reset, not as a hang.
fn receive_error(e: io::Error) -> anyhow::Error {
    link_error(e, "receiving from the peer")
}

/// `e`, from `doing` something on the link, with what it means for the user.
fn link_error(e: io::Error, doing: &str) -> anyhow::Error {
    let text = e.to_string();
    let why = match e.kind() {
        io::ErrorKind::TimedOut => {
            "the peer stopped answering (keep-alives unanswered): it vanished or the path broke"
        }
        io::ErrorKind::NotConnected if text.contains("timed out") => {
            "the peer stopped answering (QUIC idle timeout): it vanished or the path broke"
        }
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            "the peer's end of the link is gone without a clean close"
        }
        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => {
            "the link ended without a clean close (the peer was killed or the data was cut)"
        }
        _ => "the link failed",
    };
    anyhow::Error::new(e).context(format!("{doing}: {why}"))
}

/// Errors that mean the peer no longer takes data (it closed or went away).
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

/// Whether the peer's clean end is (or will be, once the receiving side has caught up) read:
/// a write that fails because the peer went away may race the peer's end still in our
/// receive buffer.
async fn peer_ended(eof: &mut watch::Receiver<bool>) -> bool {
    loop {
        if *eof.borrow_and_update() {
            return true;
        }
        if eof.changed().await.is_err() {
            return *eof.borrow();
        }
    }
}

/// stdin → `link` until EOF, `link` → stdout until the peer's end. Ends early, closing the
/// sending side cleanly, when `stop` reports a signal.
pub(crate) async fn pump_stdio(link: Link, stop: watch::Receiver<Option<i32>>) -> Result<Pumped> {
    let (input, output) = stdio::open()?;
    let r = pump(link.stream, input, output, stop).await;
    stdio::restore();
    r
}

/// The pump over any stream (tests and the bench use it with other ends).
pub(crate) async fn pump<S>(
    stream: S,
    mut input: Input,
    mut output: Output,
    stop: watch::Receiver<Option<i32>>,
) -> Result<Pumped>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (peer_eof_tx, peer_eof_rx) = watch::channel(false);

    let mut up_stop = stop.clone();
    let up = async {
        let mut buf = vec![0u8; buf_size()];
        let mut sent = 0u64;
        let mut signal = None;
        let mut peer_eof = peer_eof_rx;
        loop {
            let n = tokio::select! {
                n = input.read(&mut buf) => n.context("reading stdin")?,
                s = signalled(&mut up_stop) => { signal = Some(s); break; }
            };
            if n == 0 {
                break;
            }
            let write = tokio::select! {
                r = wr.write_all(&buf[..n]) => Some(r),
                s = signalled(&mut up_stop) => { signal = Some(s); None }
            };
            match write {
                Some(Ok(())) => sent += n as u64,
                Some(Err(e)) if peer_gone(&e) && peer_ended(&mut peer_eof).await => {
                    return Ok((sent, true, None));
                }
                Some(Err(e)) => return Err(anyhow::Error::new(e).context("sending to the peer")),
                None => break,
            }
        }
        // Our end: close the sending side cleanly (TLS close_notify, QUIC finish).
        let close_wait = if signal.is_some() {
            CLOSE_WAIT_SIGNALLED
        } else {
            CLOSE_WAIT
        };
        match tokio::time::timeout(close_wait, wr.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if peer_gone(&e) && peer_ended(&mut peer_eof).await => {
                return Ok((sent, true, signal))
            }
            Ok(Err(e)) if signal.is_some() => {
                tracing::debug!("closing the sending side after a signal: {e}");
            }
            Ok(Err(e)) => return Err(link_error(e, "closing the sending side")),
            Err(_) => {
                if signal.is_none() {
                    anyhow::bail!(
                        "closing the sending side: no acknowledgement within {close_wait:?}"
                    );
                }
            }
        }
        Ok::<_, anyhow::Error>((sent, false, signal))
    };

    let down = async {
        let mut buf = vec![0u8; buf_size()];
        let mut received = 0u64;
        loop {
            let n = read_filled(&mut rd, &mut buf, FILL)
                .await
                .map_err(receive_error)?;
            if n == 0 {
                break;
            }
            output
                .write_all(&buf[..n])
                .await
                .context("writing stdout")?;
            received += n as u64;
        }
        output.finish().await.context("writing stdout")?;
        let _ = peer_eof_tx.send(true);
        Ok::<_, anyhow::Error>(received)
    };

    tokio::pin!(up, down);
    let mut out = Pumped::default();
    let mut up_done = false;
    let mut down_done = false;
    let mut down_stop = stop;
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                let (sent, cut, signal) = r?;
                out.sent = sent;
                out.send_cut = cut;
                up_done = true;
                if signal.is_some() {
                    // Our output is abandoned: the user asked us to end.
                    out.signal = signal;
                    break;
                }
            }
            r = &mut down, if !down_done => {
                out.received = r?;
                out.peer_closed = true;
                down_done = true;
            }
            s = signalled(&mut down_stop), if up_done && !down_done => {
                // Sending is done, only output was left: end it.
                out.signal = Some(s);
                break;
            }
        }
    }
    Ok(out)
}

/// Runs `fut` unless a signal comes first.
pub(crate) async fn or_signal<T>(
    fut: impl Future<Output = T>,
    stop: &mut watch::Receiver<Option<i32>>,
) -> Result<T, i32> {
    tokio::select! {
        v = fut => Ok(v),
        s = signalled(stop) => Err(s),
    }
}

/// Kernel TLS on this machine, and the path used.
pub fn ktls_status() -> String {
    let ulp = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    if ulp.split_whitespace().any(|u| u == "tls") {
        format!(
            "kernel has the tls ULP (tcp_available_ulp: {}); nettool does not hand keys to it \
             yet: userspace TLS (rustls) was used",
            ulp.trim()
        )
    } else {
        format!(
            "kernel has no tls ULP (tcp_available_ulp: {}): userspace TLS (rustls) was used",
            if ulp.trim().is_empty() {
                "unreadable"
            } else {
                ulp.trim()
            }
        )
    }
}
