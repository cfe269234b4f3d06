//! The session layer in process, over in-memory links: delivery both ways, a resume after a
//! link is cut mid-stream, a move to a new link while data flows both ways (relay-first's
//! upgrade), and a resumed link to a stranger. The NAT-lab versions (real processes, real
//! paths) are in `tests/tests/e2e/session.rs` and `relay_first.rs`.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nettool_core::session::{
    EndKind, Paths, ResumeTicket, Session, SessionConfig, SessionEnd, Sink, Source,
};
use nettool_core::{Link, LinkKey};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, watch};

/// Deterministic test bytes.
fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A source that hands out `data` in `chunk`-sized reads, pausing `pause` between them, so
/// the stream is still flowing when something happens to the link.
struct Paced {
    data: Vec<u8>,
    at: usize,
    chunk: usize,
    pause: Duration,
}

#[async_trait::async_trait]
impl Source for Paced {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at > 0 && self.at < self.data.len() {
            tokio::time::sleep(self.pause).await;
        }
        let n = buf.len().min(self.chunk).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A sink that keeps everything (and counts finishes).
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<(Vec<u8>, u32)>>);

#[async_trait::async_trait]
impl Sink for Collect {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().0.extend_from_slice(buf);
        Ok(())
    }
    async fn finish(&mut self) -> io::Result<()> {
        self.0.lock().unwrap().1 += 1;
        Ok(())
    }
}

/// A stream that fails (both ways) once `cut` says so: a path that dies.
struct Cuttable {
    inner: DuplexStream,
    cut: watch::Receiver<bool>,
    /// Bytes read so far (to cut in the middle of a transfer).
    read: Arc<AtomicU64>,
}

impl Cuttable {
    fn check(&self) -> io::Result<()> {
        if *self.cut.borrow() {
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "path cut"))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for Cuttable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        if r.is_pending() {
            // Wake when the cut comes, so a reader blocked here sees it.
            let mut cut = self.cut.clone();
            let waker = cx.waker().clone();
            tokio::spawn(async move {
                let _ = cut.changed().await;
                waker.wake();
            });
        }
        r
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn link(stream: impl nettool_core::LinkStream, strategy: &'static str) -> Link {
    Link {
        stream: Box::new(stream),
        local: "127.0.0.1:1".parse().unwrap(),
        remote: "127.0.0.1:2".parse().unwrap(),
        strategy,
    }
}

/// Two ends of an in-memory link that `cut` can kill.
fn cuttable_pair(
    strategy: &'static str,
    cut: &watch::Receiver<bool>,
    read: &Arc<AtomicU64>,
) -> (Link, Link) {
    let (a, b) = tokio::io::duplex(256 << 10);
    let wrap = |s| Cuttable {
        inner: s,
        cut: cut.clone(),
        read: read.clone(),
    };
    (link(wrap(a), strategy), link(wrap(b), strategy))
}

/// Paths that hand out prepared links, one per reconnect.
struct Prepared(mpsc::Receiver<Link>);

#[async_trait::async_trait]
impl Paths for Prepared {
    async fn reconnect(&mut self, _t: &ResumeTicket, deadline: Instant) -> Result<Link, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.0.recv()).await {
            Ok(Some(l)) => Ok(l),
            _ => Err("no prepared link".into()),
        }
    }
}

struct Side {
    end: SessionEnd,
    got: Vec<u8>,
    finishes: u32,
}

fn cfg() -> SessionConfig {
    SessionConfig {
        send_buffer: 1 << 20,
        resume_timeout: Duration::from_secs(4),
        ..SessionConfig::default()
    }
}

/// Runs one side.
#[allow(clippy::too_many_arguments)]
fn side(
    first: Link,
    out: Vec<u8>,
    chunk: usize,
    pause: Duration,
    paths: mpsc::Receiver<Link>,
    upgrades: Option<mpsc::Receiver<Link>>,
    key: &LinkKey,
) -> tokio::task::JoinHandle<Side> {
    let sink = Collect::default();
    let got = sink.clone();
    let (_stop_tx, stop) = watch::channel(None);
    let mut session = Session::new(cfg(), key.clone());
    if let Some(u) = upgrades {
        session = session.with_upgrades(u);
    }
    tokio::spawn(async move {
        let _keep = _stop_tx;
        let end = session
            .run(
                first,
                Box::new(Paced {
                    data: out,
                    at: 0,
                    chunk,
                    pause,
                }),
                Box::new(sink),
                Box::new(Prepared(paths)),
                stop,
            )
            .await;
        let (got, finishes) = got.0.lock().unwrap().clone();
        Side { end, got, finishes }
    })
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn assert_intact(s: &Side, want: &[u8], who: &str) {
    assert_eq!(s.end.kind, EndKind::Done, "{who}: {:?}", s.end);
    assert_eq!(s.got.len(), want.len(), "{who}: length");
    assert!(digest(&s.got) == digest(want), "{who}: bytes differ");
    assert_eq!(s.finishes, 1, "{who}: the sink is finished exactly once");
    assert!(s.end.delivered(), "{who}: {:?}", s.end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_both_ways_and_both_end_done() {
    let key = LinkKey::derive("s", "k");
    let (_cut_tx, cut) = watch::channel(false);
    let read = Arc::new(AtomicU64::new(0));
    let (la, lb) = cuttable_pair("test", &cut, &read);
    let (a_data, b_data) = (data(3 << 20, 1), data(1 << 20, 2));
    let (_pa, ra) = mpsc::channel(1);
    let (_pb, rb) = mpsc::channel(1);
    let a = side(la, a_data.clone(), 64 << 10, Duration::ZERO, ra, None, &key);
    let b = side(lb, b_data.clone(), 64 << 10, Duration::ZERO, rb, None, &key);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_intact(&b, &a_data, "B");
    assert_intact(&a, &b_data, "A");
    assert_eq!(a.end.confirmed, a_data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_resumes_at_the_written_position() {
    let key = LinkKey::derive("s", "k");
    let (cut_tx, cut) = watch::channel(false);
    let read = Arc::new(AtomicU64::new(0));
    let (la, lb) = cuttable_pair("first", &cut, &read);
    let (a_data, b_data) = (data(2 << 20, 3), data(512 << 10, 4));
    let (pa, ra) = mpsc::channel(1);
    let (pb, rb) = mpsc::channel(1);
    let pause = Duration::from_millis(5);
    let a = side(la, a_data.clone(), 32 << 10, pause, ra, None, &key);
    let b = side(lb, b_data.clone(), 16 << 10, pause, rb, None, &key);
    // Cut once about a quarter has crossed, then offer a fresh link to both.
    while read.load(Ordering::Relaxed) < (a_data.len() / 4) as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cut_tx.send(true).unwrap();
    let (_never, fresh) = watch::channel(false);
    let (na, nb) = cuttable_pair("second", &fresh, &Arc::new(AtomicU64::new(0)));
    pa.send(na).await.unwrap();
    pb.send(nb).await.unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_intact(&b, &a_data, "B");
    assert_intact(&a, &b_data, "A");
    assert_eq!(a.end.resumes.len(), 1, "{:?}", a.end.resumes);
    assert_eq!(a.end.resumes[0].strategy.as_deref(), Some("second"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_new_link_mid_stream_loses_and_repeats_nothing() {
    // Relay-first's upgrade: data in flight both ways on the first link when the second
    // (already authenticated) arrives at both sides; the session moves at a SWITCH boundary.
    let key = LinkKey::derive("s", "k");
    let (_cut_tx, cut) = watch::channel(false);
    let read = Arc::new(AtomicU64::new(0));
    let (la, lb) = cuttable_pair("relay", &cut, &read);
    let (a_data, b_data) = (data(4 << 20, 5), data(3 << 20, 6));
    let (_pa, ra) = mpsc::channel(1);
    let (_pb, rb) = mpsc::channel(1);
    let (ua, ura) = mpsc::channel(1);
    let (ub, urb) = mpsc::channel(1);
    let pause = Duration::from_millis(2);
    let a = side(la, a_data.clone(), 32 << 10, pause, ra, Some(ura), &key);
    let b = side(lb, b_data.clone(), 32 << 10, pause, rb, Some(urb), &key);
    while read.load(Ordering::Relaxed) < (a_data.len() / 3) as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (_never, fresh) = watch::channel(false);
    let (na, nb) = cuttable_pair("direct", &fresh, &Arc::new(AtomicU64::new(0)));
    // One side hears of the new link a little before the other, as over a real network.
    ua.send(na).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    ub.send(nb).await.unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_intact(&b, &a_data, "B");
    assert_intact(&a, &b_data, "A");
    for (who, s, total) in [("A", &a, a_data.len()), ("B", &b, b_data.len())] {
        let p = &s.end.paths;
        assert_eq!(p.len(), 2, "{who}: {p:?}");
        assert_eq!(
            (p[0].strategy.as_str(), p[1].strategy.as_str()),
            ("relay", "direct")
        );
        assert!(p[0].bytes_sent > 0 && p[1].bytes_sent > 0, "{who}: {p:?}");
        assert!(p[0].to_ms.is_some() && p[1].to_ms.is_some(), "{who}: {p:?}");
        // The boundary: every byte sent exactly once over the two links.
        assert_eq!(
            p[0].bytes_sent + p[1].bytes_sent,
            total as u64,
            "{who}: bytes sent twice or not at all: {p:?}"
        );
        assert!(s.end.resumes.is_empty(), "{who}: a move is not a resume");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_link_to_a_stranger_is_refused_and_nothing_is_written() {
    let key = LinkKey::derive("s", "k");
    // The ticket depends on the key: a stranger without it cannot even find the session.
    let sid = [7u8; 32];
    let mine = ResumeTicket::derive(&key, &sid);
    let theirs = ResumeTicket::derive(&LinkKey::derive("s", "guess"), &sid);
    assert_ne!(mine.session, theirs.session);
    assert_ne!(mine.secret, theirs.secret);
    assert_eq!(mine.session, ResumeTicket::derive(&key, &sid).session);

    // A link that gets past the handshake to someone else (another session of its own):
    // A's resumed HELLO names A's session, the stranger's names another. A must refuse.
    let (cut_tx, cut) = watch::channel(false);
    let read = Arc::new(AtomicU64::new(0));
    let (la, lb) = cuttable_pair("first", &cut, &read);
    let a_data = data(1 << 20, 7);
    let (pa, ra) = mpsc::channel(1);
    let (_pb, rb) = mpsc::channel(1);
    let a = side(
        la,
        a_data.clone(),
        16 << 10,
        Duration::from_millis(5),
        ra,
        None,
        &key,
    );
    let b = side(lb, Vec::new(), 16 << 10, Duration::ZERO, rb, None, &key);
    while read.load(Ordering::Relaxed) < (256 << 10) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cut_tx.send(true).unwrap();
    // The stranger: a session of its own that has been running (so it resumes too).
    let (_never, fresh) = watch::channel(false);
    let (na, stranger_end) = cuttable_pair("second", &fresh, &Arc::new(AtomicU64::new(0)));
    let (sx_cut_tx, sx_cut) = watch::channel(false);
    let sx_read = Arc::new(AtomicU64::new(0));
    let (s1, s2) = cuttable_pair("x", &sx_cut, &sx_read);
    let (sp, srx) = mpsc::channel(1);
    let (_sp2, srx2) = mpsc::channel(1);
    let stranger = side(
        s1,
        data(1 << 20, 9),
        16 << 10,
        Duration::from_millis(5),
        srx,
        None,
        &key,
    );
    let _other = side(s2, Vec::new(), 16 << 10, Duration::ZERO, srx2, None, &key);
    while sx_read.load(Ordering::Relaxed) < (64 << 10) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    sx_cut_tx.send(true).unwrap();
    pa.send(na).await.unwrap();
    sp.send(stranger_end).await.unwrap();
    let a = a.await.unwrap();
    let stranger = stranger.await.unwrap();
    let b = b.await.unwrap();
    assert!(
        matches!(&a.end.kind, EndKind::Aborted(r) if r.contains("another session")),
        "A: {:?}",
        a.end.kind
    );
    assert!(
        matches!(&stranger.end.kind, EndKind::Aborted(r) if r.contains("another session")),
        "stranger: {:?}",
        stranger.end.kind
    );
    assert!(
        stranger.got.is_empty(),
        "the stranger got {} of A's bytes",
        stranger.got.len()
    );
    assert!(
        a_data.starts_with(&b.got),
        "B's bytes are a prefix of A's stream"
    );
}
