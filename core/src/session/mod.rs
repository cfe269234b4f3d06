//! The session layer: a byte stream each way that outlives the path under it.
//!
//! A [`Session`] sits between an authenticated link (any strategy's [`Link`]: tcp-punch,
//! tcp-direct, udp-quic, relay, plugins) and the user's data (a [`Source`] and a [`Sink`],
//! stdin and stdout for `connect`). It owns the positions, so links are replaceable pipes:
//!
//! - **Acknowledged delivery.** Data travels in [`frame`]s that carry their stream offset. The
//!   receiver acknowledges what it has *written to its sink* (cumulative ACKs, one per sink
//!   write or data frame, so a few per MiB), and the sender keeps every unacknowledged byte in
//!   a bounded [`send::SendBuf`] (default 8 MiB; the source is not read while it is full).
//! - **Resume.** A link that fails (an error, or no byte for a liveness timeout of 8 round trips
//!   bounded to 3–10 s; PINGs every second keep an idle link observable) ends one *generation*.
//!   Both sides keep their buffers and ask their [`Paths`] for a new link, which re-joins the
//!   rendezvous server under a [`ResumeTicket`]: a name and secret derived from the session key
//!   and both sides' nonces (exchanged inside the first authenticated link), so the server sees
//!   a name it cannot link to the old session and a stranger without the key can neither join
//!   it nor pass the link handshake. Each link starts with HELLO (version, what this side has
//!   received, the session id); the other side checks the id and resends from there. Positions,
//!   not retransmitted segments: nothing is lost and nothing is written twice.
//! - **Honest endings.** EOF ends one direction (the other keeps flowing); END ends the session
//!   (`Done` when everything both ways was written, `Stopped` on a signal, `Abort` on an error),
//!   so a partner ends promptly whatever its source does. [`SessionEnd`] tells the caller
//!   exactly how it ended and how many bytes the peer confirmed.
//!
//! Design notes: the reader hands payloads to a sink task through a bounded channel and
//! advances its window only once a payload is queued, so a generation cut anywhere can never
//! skip or repeat bytes (a queued payload is written whatever happens to the link). Liveness
//! timeouts run only while the reader waits for the link, never while the sink is slow, so a
//! slow consumer is backpressure, not a dead path. Stdin is read in up to 1 MiB chunks held as
//! `Bytes`; frames are slices of them (no copy).

pub mod frame;
mod generation;
pub mod pool;
pub mod send;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};
use tracing::info;

use crate::handshake::LinkKey;
use crate::strategy::Link;
use frame::{EndCode, Window, MAX_PAYLOAD, SESSION_ID_LEN};
use generation::{drive, LinkEnd};
use pool::Pool;
use send::SendBuf;

/// Test-only builds (`NETTOOL_TEST_RESUME_OFF=1` / `NETTOOL_TEST_REPLAY_OFF=1` /
/// `NETTOOL_TEST_END_OFF=1` at compile time) switch the resume, the replay from the peer's
/// position or the END sent on a signal off, to watch the tests that guard them fail.
const RESUME_OFF: bool = option_env!("NETTOOL_TEST_RESUME_OFF").is_some();
const REPLAY_OFF: bool = option_env!("NETTOOL_TEST_REPLAY_OFF").is_some();
const END_OFF: bool = option_env!("NETTOOL_TEST_END_OFF").is_some();
/// Test-only build (`NETTOOL_TEST_SWITCH_BOUNDARY_OFF=1`): a move to a new link happens at once,
/// without the SWITCH boundary, and the writer goes on where it was (a naive switch), to watch
/// the tests that guard the lossless upgrade fail.
const BOUNDARY_OFF: bool = option_env!("NETTOOL_TEST_SWITCH_BOUNDARY_OFF").is_some();

/// How long a side that has written its SWITCH (or read the peer's) waits for the other half
/// of the move before it counts the old link as failed (and resumes, losing nothing).
const SWITCH_WAIT: Duration = Duration::from_secs(10);

/// Knobs of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Most unacknowledged bytes held (backpressure beyond).
    pub send_buffer: usize,
    /// How long to try to resume after a path failed.
    pub resume_timeout: Duration,
    /// Lower bound of the liveness timeout.
    pub liveness_min: Duration,
    /// Upper bound of the liveness timeout.
    pub liveness_max: Duration,
    /// PING interval while nothing else is sent.
    pub ping_every: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            send_buffer: 8 << 20,
            resume_timeout: Duration::from_secs(60),
            liveness_min: Duration::from_secs(3),
            liveness_max: Duration::from_secs(10),
            ping_every: Duration::from_secs(1),
        }
    }
}

/// Where a session's outgoing bytes come from (stdin for `connect`).
#[async_trait::async_trait]
pub trait Source: Send {
    /// Reads some bytes into `buf`; 0 at the end.
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Where a session's incoming bytes go (stdout for `connect`).
#[async_trait::async_trait]
pub trait Sink: Send {
    /// Writes all of `buf`.
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// The peer's stream ended: flush and close.
    async fn finish(&mut self) -> io::Result<()>;
}

/// Any tokio reader as a [`Source`].
pub struct ReadSource<R>(pub R);
/// Any tokio writer as a [`Sink`] (finish = flush + shutdown).
pub struct WriteSink<W>(pub W);

#[async_trait::async_trait]
impl<R: AsyncRead + Unpin + Send> Source for ReadSource<R> {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).await
    }
}

#[async_trait::async_trait]
impl<W: AsyncWrite + Unpin + Send> Sink for WriteSink<W> {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf).await
    }
    async fn finish(&mut self) -> io::Result<()> {
        self.0.flush().await?;
        self.0.shutdown().await
    }
}

/// The rendezvous name and secret a resumed session joins under (see the module docs).
#[derive(Clone)]
pub struct ResumeTicket {
    /// Session name for the rendezvous server.
    pub session: String,
    /// Secret for the link handshake.
    pub secret: String,
}

impl std::fmt::Debug for ResumeTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeTicket")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl ResumeTicket {
    /// The ticket for session id `sid` under `key` (the original session's link key).
    pub fn derive(key: &LinkKey, sid: &[u8; SESSION_ID_LEN]) -> Self {
        let name = key.derive_labeled("nettool resume name v1", sid);
        let secret = key.derive_labeled("nettool resume secret v1", sid);
        Self {
            session: format!("resume-{}", hex::encode(&name[..16])),
            secret: hex::encode(secret),
        }
    }
}

/// Gets new links for a session whose path failed.
#[async_trait::async_trait]
pub trait Paths: Send {
    /// A new authenticated link to the same peer, joined under `ticket`, before `deadline`
    /// (retrying as it sees fit), or why there is none.
    async fn reconnect(&mut self, ticket: &ResumeTicket, deadline: Instant)
        -> Result<Link, String>;
}

/// One resume, for the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumeReport {
    /// When the path failed, ms since the session began.
    pub at_ms: u64,
    /// Why it failed.
    pub reason: String,
    /// The strategy of the new link (null when none came).
    pub strategy: Option<String>,
    /// How long until the new link carried the session, ms.
    pub took_ms: u64,
}

/// One link that carried the session, for the report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PathReport {
    /// Its strategy.
    pub strategy: String,
    /// Payload bytes sent on it (resent bytes counted again).
    pub bytes_sent: u64,
    /// Payload bytes received on it.
    pub bytes_received: u64,
    /// When it began carrying the session, ms since the session began.
    pub from_ms: u64,
    /// When it stopped (null: it carried the session to its end).
    pub to_ms: Option<u64>,
    /// The round trip to the peer over it (the lowest of the session's PINGs on it), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndKind {
    /// Both directions ended and everything was written on both sides.
    Done,
    /// The peer ended the session (a signal on its side; the reason says which).
    PeerStopped(String),
    /// The peer gave up on an error.
    PeerAborted(String),
    /// This side was stopped by signal number `0`.
    Stopped(i32),
    /// This side gave up: its source or sink failed, or the peer broke the protocol.
    Aborted(String),
    /// The path failed and no new one came within the resume timeout.
    Lost(String),
}

/// The session's end, with its figures.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    /// How.
    pub kind: EndKind,
    /// Bytes read from the source.
    pub sent: u64,
    /// Of those, bytes the peer confirmed written to its sink.
    pub confirmed: u64,
    /// Bytes received from the peer (and written, or being written, to the sink).
    pub received: u64,
    /// Resumes, in order.
    pub resumes: Vec<ResumeReport>,
    /// Links that carried the session, in order.
    pub paths: Vec<PathReport>,
    /// When the first byte from the peer reached the sink, ms on the session's clock (see
    /// [`Session::with_clock`]); `None` when none came.
    pub first_byte_ms: Option<u64>,
}

impl SessionEnd {
    /// Whether this side may report success: every byte it sent was confirmed and the
    /// session ended cleanly (both done, or the peer ended it in order).
    pub fn delivered(&self) -> bool {
        self.confirmed == self.sent && matches!(self.kind, EndKind::Done | EndKind::PeerStopped(_))
    }
}

/// What the sink task is told.
enum SinkItem {
    Data(Bytes),
    Finish,
}

/// State shared by the source task, the sink task and the link's reader and writer.
struct State {
    send: SendBuf,
    window: Window,
    /// Highest offset ever sent (acks beyond it are refused).
    sent_high: u64,
    /// Bytes the sink has written.
    written: u64,
    /// The peer's EOF is written and the sink finished.
    sink_done: bool,
    /// The sink task was told to finish.
    finish_queued: bool,
    /// The peer confirmed our EOF (ACK with the flag).
    peer_has_eof: bool,
    /// A PING to answer.
    pong: Option<u64>,
    /// Latest round trip measured by PING/PONG.
    rtt: Option<Duration>,
    /// The lowest round trip measured on the current path.
    path_rtt: Option<Duration>,
    /// Why the source or the sink failed.
    local_error: Option<String>,
    /// The writer ends this link with SWITCH at its next frame boundary (a new link is ready).
    switch_out: bool,
    /// A naive switch happened (test-only build, [`BOUNDARY_OFF`]).
    naive_switch: bool,
    /// When the first byte from the peer was handed to the sink, ms on the session's clock.
    first_byte_ms: Option<u64>,
    /// END to send (this side's decision), with its reason.
    end: Option<(EndCode, String)>,
}

impl State {
    /// What a peer's END(Done) claims: our stream fully confirmed, its stream fully received
    /// (our sink may still be writing its tail: that is awaited before the session ends).
    fn peer_may_be_done(&self) -> bool {
        self.send.eof()
            && self.send.acked() == self.send.end()
            && self.peer_has_eof
            && self.window.end == Some(self.window.received)
    }

    fn both_done(&self) -> bool {
        self.send.eof()
            && self.send.acked() == self.send.end()
            && self.peer_has_eof
            && self.sink_done
    }
}

struct Shared {
    state: Mutex<State>,
    /// The writer has something to do.
    wake: Notify,
    /// The source task may read again (room in the buffer).
    room: Notify,
    started: Instant,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A session over replaceable links (see the module docs).
pub struct Session {
    cfg: SessionConfig,
    key: LinkKey,
    upgrades: Option<mpsc::Receiver<Link>>,
    started: Option<Instant>,
    on_path: Option<PathEvents>,
}

/// Told of each link the session starts to run on: its strategy and when (ms, on the
/// session's clock); see [`Session::with_path_events`].
pub type PathEvents = Arc<dyn Fn(&str, u64) + Send + Sync>;

impl Session {
    /// A session whose resumes are keyed by `key` (the original link key).
    pub fn new(cfg: SessionConfig, key: LinkKey) -> Self {
        Self {
            cfg,
            key,
            upgrades: None,
            started: None,
            on_path: None,
        }
    }

    /// Calls `f` with each link the session starts to run on (the first, each move to a new
    /// path, each resume), as the report's `paths` will list them.
    pub fn with_path_events(mut self, f: PathEvents) -> Self {
        self.on_path = Some(f);
        self
    }

    /// Links to move to while the session runs (relay-first: the direct path found in the
    /// background). Each is authenticated already; the move is make-before-break at a
    /// sequence boundary (SWITCH, see [`frame`]): nothing lost, nothing sent twice, order kept.
    /// Both peers must get the same links (they come from one pairing).
    pub fn with_upgrades(mut self, upgrades: mpsc::Receiver<Link>) -> Self {
        self.upgrades = Some(upgrades);
        self
    }

    /// Counts the report's times (`paths`, `resumes`, first byte) from `started` (e.g. the
    /// start of the connect) instead of the session's own start.
    pub fn with_clock(mut self, started: Instant) -> Self {
        self.started = Some(started);
        self
    }

    /// Carries `source` → peer and peer → `sink` over `first` and whatever links `paths`
    /// gives after failures, until the session ends; `stop` reports a signal number.
    pub async fn run(
        self,
        first: Link,
        source: Box<dyn Source>,
        sink: Box<dyn Sink>,
        mut paths: Box<dyn Paths>,
        mut stop: watch::Receiver<Option<i32>>,
    ) -> SessionEnd {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                send: SendBuf::new(self.cfg.send_buffer),
                window: Window::default(),
                sent_high: 0,
                written: 0,
                sink_done: false,
                finish_queued: false,
                peer_has_eof: false,
                pong: None,
                rtt: None,
                path_rtt: None,
                local_error: None,
                end: None,
                switch_out: false,
                naive_switch: false,
                first_byte_ms: None,
            }),
            wake: Notify::new(),
            room: Notify::new(),
            started: self.started.unwrap_or_else(Instant::now),
        });
        let mut upgrades = self.upgrades;
        let on_path = self.on_path;
        let (tx, rx) = mpsc::channel::<SinkItem>(4);
        // The source and the sink run in this task, next to the link's reader and writer (not
        // as tasks of their own): one task to cancel, and every byte stays on one thread from
        // read to write (measured: no faster or slower than separate tasks).
        let mut source_task = Box::pin(source_loop(shared.clone(), source));
        let mut sink_task = Box::pin(sink_loop(shared.clone(), sink, rx));
        let (mut source_done, mut sink_done) = (false, false);
        let mut nonce = [0u8; SESSION_ID_LEN];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        let mut sid: Option<[u8; SESSION_ID_LEN]> = None;
        let mut resumes = Vec::new();
        let mut paths_report: Vec<PathReport> = Vec::new();
        let mut link = first;
        let main = async {
            loop {
                let path_index = paths_report.len();
                let from_ms = shared.ms();
                paths_report.push(PathReport {
                    strategy: link.strategy.to_owned(),
                    bytes_sent: 0,
                    bytes_received: 0,
                    from_ms,
                    to_ms: None,
                    rtt_ms: None,
                });
                if let Some(f) = &on_path {
                    f(link.strategy, from_ms);
                }
                shared.lock().path_rtt = None;
                let driven = {
                    let stats = &mut paths_report[path_index];
                    let run = drive(
                        &shared,
                        &self.cfg,
                        link,
                        (&mut sid, &nonce),
                        &tx,
                        stats,
                        &mut upgrades,
                    );
                    tokio::pin!(run);
                    tokio::select! {
                        end = &mut run => Ok(end),
                        s = signalled(&mut stop) => {
                            if END_OFF {
                                break EndKind::Stopped(s);
                            }
                            // END(Stopped) goes out on the link (bounded), so the peer ends at once.
                            let why = format!("stopped by {}", signal_name(s));
                            shared.lock().end = Some((EndCode::Stopped, why));
                            shared.wake.notify_one();
                            let _ = tokio::time::timeout(Duration::from_secs(1), &mut run).await;
                            Err(s)
                        }
                    }
                };
                let end = match driven {
                    Ok(end) => end,
                    Err(s) => break EndKind::Stopped(s),
                };
                paths_report[path_index].to_ms = Some(shared.ms());
                paths_report[path_index].rtt_ms = shared.lock().path_rtt.map(crate::report::ms_1);
                let why = match end {
                    LinkEnd::EndSent => {
                        let st = shared.lock();
                        break match st.end.clone() {
                            Some((EndCode::Done, _)) => EndKind::Done,
                            Some((_, r)) => EndKind::Aborted(st.local_error.clone().unwrap_or(r)),
                            None => EndKind::Aborted("ended".into()),
                        };
                    }
                    LinkEnd::PeerEnded(EndCode::Done, _) => break EndKind::Done,
                    LinkEnd::PeerEnded(EndCode::Stopped, r) => break EndKind::PeerStopped(r),
                    LinkEnd::PeerEnded(EndCode::Abort, r) => break EndKind::PeerAborted(r),
                    LinkEnd::Fatal(r) => break EndKind::Aborted(r),
                    LinkEnd::Switched(next) => {
                        info!(strategy = next.strategy, "the session moved to a new path");
                        link = next;
                        continue;
                    }
                    LinkEnd::SwitchSent | LinkEnd::PeerSwitched => {
                        unreachable!("drive resolves the halves of a switch itself")
                    }
                    LinkEnd::Broken(why) => why,
                };
                {
                    let st = shared.lock();
                    if let Some(e) = &st.local_error {
                        break EndKind::Aborted(e.clone());
                    }
                    if st.end.as_ref().is_some_and(|(c, _)| *c == EndCode::Done) && st.both_done() {
                        // The link broke after our END(Done): everything was confirmed.
                        break EndKind::Done;
                    }
                }
                let Some(id) = sid else {
                    break EndKind::Lost(format!("{why} (before the session was established)"));
                };
                if RESUME_OFF {
                    break EndKind::Lost(format!("{why} (resume switched off in this test build)"));
                }
                info!("path failed ({why}); resuming");
                let at = shared.ms();
                let began = Instant::now();
                let deadline = began + self.cfg.resume_timeout;
                let ticket = ResumeTicket::derive(&self.key, &id);
                let next = tokio::select! {
                    r = paths.reconnect(&ticket, deadline) => r,
                    s = signalled(&mut stop) => break EndKind::Stopped(s),
                };
                match next {
                    Ok(l) => {
                        info!(strategy = l.strategy, "resumed");
                        resumes.push(ResumeReport {
                            at_ms: at,
                            reason: why,
                            strategy: Some(l.strategy.to_owned()),
                            took_ms: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
                        });
                        link = l;
                    }
                    Err(e) => {
                        resumes.push(ResumeReport {
                            at_ms: at,
                            reason: why.clone(),
                            strategy: None,
                            took_ms: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
                        });
                        break EndKind::Lost(format!(
                            "{why}; no new path within {:.0}s: {e}",
                            self.cfg.resume_timeout.as_secs_f64()
                        ));
                    }
                }
            }
        };
        let kind = {
            tokio::pin!(main);
            loop {
                tokio::select! {
                    k = &mut main => break k,
                    () = &mut source_task, if !source_done => source_done = true,
                    () = &mut sink_task, if !sink_done => sink_done = true,
                }
            }
        };
        drop(source_task);
        // What was received is written out unless this side was told to stop.
        if !matches!(kind, EndKind::Stopped(_)) {
            let queue_finish = {
                let mut st = shared.lock();
                let q = !st.finish_queued;
                st.finish_queued = true;
                q
            };
            // The sink runs in this task: it drains while the finish is queued.
            let send_finish = queue_finish && !matches!(kind, EndKind::Done);
            let finish = async move {
                if send_finish {
                    let _ = tx.send(SinkItem::Finish).await;
                }
                drop(tx);
            };
            if sink_done {
                finish.await;
            } else {
                tokio::join!(finish, sink_task);
            }
        } else {
            drop(sink_task);
        }
        let st = shared.lock();
        let kind = match (&kind, &st.local_error) {
            (EndKind::Done | EndKind::PeerStopped(_), Some(e)) => EndKind::Aborted(e.clone()),
            _ => kind,
        };
        SessionEnd {
            kind,
            first_byte_ms: st.first_byte_ms,
            sent: st.send.end(),
            confirmed: st.send.acked(),
            received: st.window.received,
            resumes,
            paths: paths_report,
        }
    }
}

/// The name of a signal number (the ones `connect` handles).
pub fn signal_name(n: i32) -> &'static str {
    match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

/// Resolves once `rx` reports a signal.
pub async fn signalled(rx: &mut watch::Receiver<Option<i32>>) -> i32 {
    loop {
        if let Some(n) = *rx.borrow_and_update() {
            return n;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Source → send buffer, in chunks of up to 1 MiB, never past the buffer's bound.
async fn source_loop(shared: Arc<Shared>, mut source: Box<dyn Source>) {
    // Large reads keep their (pooled) buffer as the chunk, no copy; a small read is copied
    // out and the buffer read into again, so a trickle cannot pin a megabyte per few bytes.
    let pool = Pool::new(MAX_PAYLOAD as usize);
    let mut buf = pool.take();
    loop {
        let room = loop {
            let notified = shared.room.notified();
            let room = shared.lock().send.room();
            if room > 0 {
                break room;
            }
            notified.await;
        };
        let want = room.min(buf.len());
        match source.read(&mut buf[..want]).await {
            Ok(0) => {
                shared.lock().send.finish();
                shared.wake.notify_one();
                return;
            }
            Ok(n) => {
                let chunk = if n >= buf.len() / 2 {
                    pool.freeze(std::mem::replace(&mut buf, pool.take()), n)
                } else {
                    Bytes::copy_from_slice(&buf[..n])
                };
                shared.lock().send.push(chunk);
                shared.wake.notify_one();
            }
            Err(e) => {
                let mut st = shared.lock();
                st.local_error = Some(format!("reading the input: {e}"));
                st.end = Some((EndCode::Abort, format!("the peer's input failed: {e}")));
                drop(st);
                shared.wake.notify_one();
                return;
            }
        }
    }
}

/// Received payloads → sink; counts what was written, for the ACKs.
async fn sink_loop(shared: Arc<Shared>, mut sink: Box<dyn Sink>, mut rx: mpsc::Receiver<SinkItem>) {
    while let Some(item) = rx.recv().await {
        let r = match item {
            SinkItem::Data(b) => sink.write_all(&b).await.map(|()| b.len() as u64),
            SinkItem::Finish => sink.finish().await.map(|()| u64::MAX),
        };
        let mut st = shared.lock();
        match r {
            Ok(u64::MAX) => st.sink_done = true,
            Ok(n) => st.written += n,
            Err(e) => {
                st.local_error = Some(format!("writing the output: {e}"));
                st.end = Some((EndCode::Abort, format!("the peer's output failed: {e}")));
                drop(st);
                shared.wake.notify_one();
                return;
            }
        }
        drop(st);
        shared.wake.notify_one();
    }
}
