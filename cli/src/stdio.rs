//! stdin and stdout for `connect` without tokio's blocking pool.
//!
//! tokio's `stdin()`/`stdout()` hand every 8 KiB read or write to a blocking-pool thread and
//! back (three futex calls per 8 KiB); that alone held the CLI at a tenth of plain TCP. Here:
//!
//! - pipes and sockets are switched to non-blocking mode and driven by the reactor
//!   ([`AsyncFd`]); a pipe's buffer is raised to 1 MiB where the kernel allows. The original
//!   file status flags are saved and put back ([`restore`]): a non-blocking stdin left behind
//!   breaks the user's shell.
//! - everything else (regular files, terminals, `/dev/null`) is read or written by one
//!   dedicated thread with 256 KiB buffers and a bounded channel of four chunks.
//!
//! `NETTOOL_STDIO=thread` forces the thread for every kind, `NETTOOL_STDIO=tokio` the old tokio
//! path (both for benchmarking the levers).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Bytes per chunk handed to or from a stdio thread; with [`THREAD_DEPTH`] chunks queued,
/// a thread holds about 1 MiB (memory counts: `connect` stays under 32 MB resident).
pub(crate) const CHUNK: usize = 256 << 10;
/// Chunks queued between a stdio thread and the pump.
const THREAD_DEPTH: usize = 4;

/// Pipe buffer size asked for with `F_SETPIPE_SZ` (the unprivileged maximum by default).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// File status flags of the descriptors switched to non-blocking mode, to put back.
static SAVED: Mutex<Vec<(RawFd, libc::c_int)>> = Mutex::new(Vec::new());

/// Opens stdin and stdout for a data path (the one way `connect` and `plain-tcp` do it),
/// logging which mode each runs in.
pub(crate) fn open() -> io::Result<(Input, Output)> {
    let input =
        Input::stdin().map_err(|e| io::Error::new(e.kind(), format!("opening stdin: {e}")))?;
    let output =
        Output::stdout().map_err(|e| io::Error::new(e.kind(), format!("opening stdout: {e}")))?;
    tracing::info!(
        stdin = input.mode().as_str(),
        stdout = output.mode().as_str(),
        "stdio modes"
    );
    Ok((input, output))
}

/// Puts back the file status flags of every descriptor this module made non-blocking. Safe
/// to call more than once; called when the pump ends and again before the process exits.
pub(crate) fn restore() {
    let saved = std::mem::take(&mut *SAVED.lock().unwrap_or_else(|e| e.into_inner()));
    for (fd, flags) in saved {
        // SAFETY: fcntl on a descriptor number with plain integer arguments.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    }
}

/// How a descriptor is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Non-blocking, readiness from the reactor (pipes and sockets).
    Poll,
    /// A dedicated thread with big buffers (regular files, terminals, other devices).
    Thread,
    /// tokio's own stdin/stdout (blocking pool, 8 KiB at a time); for comparison only.
    Tokio,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Poll => "poll",
            Self::Thread => "thread",
            Self::Tokio => "tokio",
        }
    }
}

fn file_type(fd: RawFd) -> Option<(libc::mode_t, libc::dev_t, libc::ino_t)> {
    // SAFETY: fstat writes into the struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; fd is a plain descriptor number.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some((st.st_mode & libc::S_IFMT, st.st_dev, st.st_ino))
}

/// The mode for `fd`: Poll for pipes and sockets, Thread otherwise, unless `NETTOOL_STDIO`
/// says otherwise.
fn choose(fd: RawFd) -> Mode {
    match std::env::var("NETTOOL_STDIO").as_deref() {
        Ok("thread") => return Mode::Thread,
        Ok("tokio") => return Mode::Tokio,
        _ => {}
    }
    match file_type(fd) {
        Some((t, _, _)) if t == libc::S_IFIFO || t == libc::S_IFSOCK => Mode::Poll,
        _ => Mode::Thread,
    }
}

/// A descriptor we do not own (0 or 1); never closed.
pub(crate) struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Switches `fd` to non-blocking mode (saving its flags) and registers it with the reactor.
fn poll_fd(fd: RawFd, interest: tokio::io::Interest) -> io::Result<AsyncFd<Fd>> {
    // SAFETY: fcntl with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        SAVED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((fd, flags));
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if file_type(fd).is_some_and(|(t, _, _)| t == libc::S_IFIFO) {
        // Best effort: fewer, larger reads and writes. Fails harmlessly above the limit.
        // SAFETY: fcntl with integer arguments.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
    // SAFETY: fd is 0 or 1, which stay open (and refer to the same file description) for
    // the whole life of the process; nothing here closes or replaces them.
    unsafe { AsyncFd::register_with_interest(Fd(fd), interest) }.map_err(|e| e.into_parts().1)
}

/// stdin.
pub(crate) enum Input {
    Poll(AsyncFd<Fd>),
    Thread {
        chunks: mpsc::Receiver<io::Result<Vec<u8>>>,
        /// The rest of a chunk not yet handed out.
        pending: Vec<u8>,
        at: usize,
    },
    Tokio(tokio::io::Stdin),
}

impl Input {
    /// stdin in the mode that suits it.
    pub(crate) fn stdin() -> io::Result<Self> {
        let fd = libc::STDIN_FILENO;
        Ok(match choose(fd) {
            Mode::Poll => match poll_fd(fd, tokio::io::Interest::READABLE) {
                Ok(afd) => Self::Poll(afd),
                Err(_) => Self::thread(),
            },
            Mode::Thread => Self::thread(),
            Mode::Tokio => Self::Tokio(tokio::io::stdin()),
        })
    }

    fn thread() -> Self {
        let (tx, rx) = mpsc::channel(THREAD_DEPTH);
        std::thread::Builder::new()
            .name("nettool-stdin".into())
            .spawn(move || {
                use std::io::Read;
                let mut stdin = std::io::stdin().lock();
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    let r = loop {
                        match stdin.read(&mut buf) {
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            r => break r,
                        }
                    };
                    let end = matches!(r, Ok(0) | Err(_));
                    let item = r.map(|n| {
                        buf.truncate(n);
                        buf
                    });
                    if tx.blocking_send(item).is_err() || end {
                        return;
                    }
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("nettool: cannot start the stdin thread: {e}"));
        Self::Thread {
            chunks: rx,
            pending: Vec::new(),
            at: 0,
        }
    }

    /// The mode in use.
    pub(crate) fn mode(&self) -> Mode {
        match self {
            Self::Poll(_) => Mode::Poll,
            Self::Thread { .. } => Mode::Thread,
            Self::Tokio(_) => Mode::Tokio,
        }
    }

    /// Reads what is there (at least one byte, or 0 at the end), up to `buf.len()`.
    /// Cancel-safe: nothing read is lost when the future is dropped.
    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Poll(afd) => loop {
                let mut guard = afd.readable().await?;
                match guard.try_io(|fd| read_fd(fd.get_ref().0, buf)) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            },
            Self::Thread {
                chunks,
                pending,
                at,
            } => {
                if *at >= pending.len() {
                    match chunks.recv().await {
                        Some(Ok(chunk)) => {
                            *pending = chunk;
                            *at = 0;
                        }
                        Some(Err(e)) => return Err(e),
                        None => return Ok(0),
                    }
                }
                let n = buf.len().min(pending.len() - *at);
                buf[..n].copy_from_slice(&pending[*at..*at + n]);
                *at += n;
                Ok(n)
            }
            Self::Tokio(stdin) => stdin.read(buf).await,
        }
    }
}

/// Reads until `buf` is full, the end, or the descriptor has nothing more right now
/// (`WouldBlock` after at least one byte ends the read; before it, it is returned).
fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unfilled part of a buffer we borrow mutably.
        let n = unsafe {
            libc::read(
                fd,
                buf[got..].as_mut_ptr().cast(),
                (buf.len() - got) as libc::size_t,
            )
        };
        if n > 0 {
            got += n as usize;
            continue;
        }
        if n == 0 {
            return Ok(got);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if got > 0 => return Ok(got),
            _ => return Err(e),
        }
    }
    Ok(got)
}

/// Writes as much of `buf` as the descriptor takes right now.
fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: writing from a buffer we borrow.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len() as libc::size_t) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// stdout.
pub(crate) enum Output {
    Poll(AsyncFd<Fd>),
    Thread {
        chunks: Option<mpsc::Sender<Vec<u8>>>,
        done: Option<tokio::sync::oneshot::Receiver<io::Result<()>>>,
    },
    Tokio(tokio::io::Stdout),
}

impl Output {
    /// stdout in the mode that suits it.
    pub(crate) fn stdout() -> io::Result<Self> {
        let fd = libc::STDOUT_FILENO;
        let mut mode = choose(fd);
        // stderr sharing stdout's pipe (`2>&1`) must stay blocking: eprintln! on a full
        // non-blocking pipe would fail.
        if mode == Mode::Poll
            && file_type(libc::STDERR_FILENO).is_some_and(|e| Some(e) == file_type(fd))
        {
            mode = Mode::Thread;
        }
        Ok(match mode {
            Mode::Poll => match poll_fd(fd, tokio::io::Interest::WRITABLE) {
                Ok(afd) => Self::Poll(afd),
                Err(_) => Self::thread(),
            },
            Mode::Thread => Self::thread(),
            Mode::Tokio => Self::Tokio(tokio::io::stdout()),
        })
    }

    fn thread() -> Self {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(THREAD_DEPTH);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("nettool-stdout".into())
            .spawn(move || {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let mut result = Ok(());
                while let Some(chunk) = rx.blocking_recv() {
                    if let Err(e) = out.write_all(&chunk) {
                        result = Err(e);
                        break;
                    }
                }
                if result.is_ok() {
                    result = out.flush();
                }
                let _ = done_tx.send(result);
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("nettool: cannot start the stdout thread: {e}"));
        Self::Thread {
            chunks: Some(tx),
            done: Some(done_rx),
        }
    }

    /// The mode in use.
    pub(crate) fn mode(&self) -> Mode {
        match self {
            Self::Poll(_) => Mode::Poll,
            Self::Thread { .. } => Mode::Thread,
            Self::Tokio(_) => Mode::Tokio,
        }
    }

    /// Writes all of `buf`.
    pub(crate) async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Poll(afd) => {
                let mut at = 0;
                while at < buf.len() {
                    let mut guard = afd.writable().await?;
                    if let Ok(r) = guard.try_io(|fd| write_fd(fd.get_ref().0, &buf[at..])) {
                        at += r?;
                    }
                }
                Ok(())
            }
            Self::Thread { chunks, done } => {
                let mut sent = chunks.is_some();
                if let Some(tx) = chunks {
                    for piece in buf.chunks(CHUNK) {
                        if tx.send(piece.to_vec()).await.is_err() {
                            sent = false;
                            break;
                        }
                    }
                }
                if sent {
                    return Ok(());
                }
                // The thread ended: it failed; give its error.
                *chunks = None;
                Err(match done.take() {
                    Some(rx) => match rx.await {
                        Ok(Err(e)) => e,
                        _ => io::Error::other("the stdout thread ended"),
                    },
                    None => io::Error::other("stdout is closed"),
                })
            }
            Self::Tokio(out) => out.write_all(buf).await,
        }
    }

    /// Everything written has reached the descriptor.
    pub(crate) async fn finish(&mut self) -> io::Result<()> {
        match self {
            Self::Poll(_) => Ok(()),
            Self::Thread { chunks, done } => {
                *chunks = None;
                match done.take() {
                    Some(rx) => rx
                        .await
                        .unwrap_or_else(|_| Err(io::Error::other("the stdout thread ended"))),
                    None => Ok(()),
                }
            }
            Self::Tokio(out) => out.flush().await,
        }
    }
}
