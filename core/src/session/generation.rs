//! One generation of a session: the link it runs on, from HELLO to the link's end. The
//! reader hands payloads to the sink and acknowledgements to the send buffer; the writer
//! sends END, PONG, ACK, DATA, EOF and PING (and SWITCH when the session moves to a new link,
//! see [`super::Session::with_upgrades`]). See the parent module for the design.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::frame::{self, EndCode, FrameError, Header, HEADER_LEN, MAX_PAYLOAD, SESSION_ID_LEN};
use super::pool::Pool;
use super::{PathReport, SessionConfig, Shared, SinkItem, BOUNDARY_OFF, REPLAY_OFF, SWITCH_WAIT};
use crate::strategy::Link;

/// How one link's generation ended.
pub(super) enum LinkEnd {
    /// The path failed (the reason, in words).
    Broken(String),
    /// The peer sent END.
    PeerEnded(EndCode, String),
    /// This side sent END.
    EndSent,
    /// The peer broke the protocol, or the session cannot go on (HELLO mismatch).
    Fatal(String),
    /// The writer wrote SWITCH (only inside [`drive`]).
    SwitchSent,
    /// The reader read the peer's SWITCH (only inside [`drive`]).
    PeerSwitched,
    /// Both directions moved past their SWITCH: the session continues on this link.
    Switched(Link),
}

/// Reads exactly `buf.len()` bytes, each wait for the link bounded by `limit`.
async fn read_timed<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    limit: Duration,
) -> Result<(), String> {
    // One timer for the whole read, pushed out as bytes arrive (re-armed at most every
    // quarter of the limit: a timer per small read cost measurable CPU at line rate).
    let mut got = 0;
    let mut armed = tokio::time::Instant::now();
    let sleep = tokio::time::sleep_until(armed + limit);
    tokio::pin!(sleep);
    while got < buf.len() {
        tokio::select! {
            r = rd.read(&mut buf[got..]) => match r {
                Ok(0) => return Err("the link ended without the session's end".into()),
                Ok(n) => {
                    got += n;
                    let now = tokio::time::Instant::now();
                    if now.duration_since(armed) > limit / 4 {
                        armed = now;
                        sleep.as_mut().reset(now + limit);
                    }
                }
                Err(e) => return Err(format!("the link failed: {e}")),
            },
            () = &mut sleep => return Err(silence(limit)),
        }
    }
    Ok(())
}

fn silence(limit: Duration) -> String {
    format!(
        "the peer stopped answering: nothing received for {:.1}s",
        limit.as_secs_f64()
    )
}

/// The liveness timeout for a measured round trip.
fn liveness(cfg: &SessionConfig, rtt: Option<Duration>) -> Duration {
    rtt.map_or(cfg.liveness_min, |r| r * 8)
        .clamp(cfg.liveness_min, cfg.liveness_max)
}

/// Largest payload of a link's first DATA frame (each next one may be twice as big, up to
/// [`MAX_PAYLOAD`]): with the frames before it (in one write, see [`COALESCE`]) and the
/// link handshake's last flight (TLS Finished, the keyed confirmation, SELECT: about 4
/// segments) it fits in the first round trip of a new TCP connection (10 segments), and
/// the peer's first byte comes one way after the link is up. (8 KiB took 11–12 segments:
/// the first byte one round trip later, at 100 ms RTT.)
const FIRST_FRAME: usize = 4 * 1024;
/// What a link's writer gathers before it writes: the small frames (HELLO, ACK, a DATA
/// frame's header) go out with the data behind them, in one TLS record and one write, and
/// not a segment each (a new TCP connection may send 10 segments in its first round trip).
/// Written out after every DATA frame and whenever there is nothing more to send.
const COALESCE: usize = 16 * 1024;

/// Reads the peer's HELLO (what it received, and its nonce or the session id); a new session
/// gets its id from both nonces here.
async fn read_hello<R: AsyncRead + Unpin>(
    rd: &mut R,
    cfg: &SessionConfig,
    resume: bool,
    (sid, nonce): (&mut Option<[u8; SESSION_ID_LEN]>, &[u8; SESSION_ID_LEN]),
) -> Result<u64, LinkEnd> {
    // The peer's HELLO is the first thing its session sends on a new link, but its session may
    // start late (a process busy with many connects, scheduling its tasks seconds behind):
    // the longest liveness timeout, not the round trip's. A new session that gives up here
    // cannot resume (it has no id yet), and its peer, which may have had this side's HELLO,
    // would wait out its whole resume timeout: 1,000 pairs at once on two cores lost a few
    // pairs to the 3 s of `liveness_min` (`nettool-bench --section pairs`).
    let limit = cfg.liveness_max;
    let mut raw = [0u8; HEADER_LEN];
    read_timed(rd, &mut raw, limit)
        .await
        .map_err(LinkEnd::Broken)?;
    let mut theirs = [0u8; SESSION_ID_LEN];
    let peer_received = match frame::decode(&raw) {
        Ok(Header::Hello {
            received,
            version,
            resume: their_resume,
        }) => {
            if version != frame::VERSION {
                return Err(LinkEnd::Fatal(FrameError::Version(version).to_string()));
            }
            read_timed(rd, &mut theirs, limit)
                .await
                .map_err(LinkEnd::Broken)?;
            if their_resume != resume {
                return Err(LinkEnd::Fatal(
                    FrameError::Unexpected("one side resumes, the other starts anew").to_string(),
                ));
            }
            received
        }
        Ok(_) => {
            return Err(LinkEnd::Fatal(
                FrameError::Unexpected("HELLO must come first").to_string(),
            ))
        }
        Err(e) => return Err(LinkEnd::Fatal(e.to_string())),
    };
    match sid {
        Some(id) if *id != theirs => {
            return Err(LinkEnd::Fatal(FrameError::WrongSession.to_string()))
        }
        Some(_) => {}
        None => {
            // The session id: both nonces, in a fixed order.
            let (lo, hi) = if nonce[..] <= theirs[..] {
                (nonce, &theirs)
            } else {
                (&theirs, nonce)
            };
            let mut h = Sha256::new();
            h.update(b"nettool session id v1\0");
            h.update(lo);
            h.update(hi);
            *sid = Some(h.finalize().into());
        }
    }
    Ok(peer_received)
}

/// Runs one generation: HELLO both ways, then the reader and the writer until the link fails
/// or the session ends.
pub(super) async fn drive(
    shared: &Arc<Shared>,
    cfg: &SessionConfig,
    link: Link,
    (sid, nonce): (&mut Option<[u8; SESSION_ID_LEN]>, &[u8; SESSION_ID_LEN]),
    tx: &mpsc::Sender<SinkItem>,
    stats: &mut PathReport,
    upgrades: &mut Option<mpsc::Receiver<Link>>,
) -> LinkEnd {
    let (mut rd, wr) = tokio::io::split(link.stream);
    let mut wr = tokio::io::BufWriter::with_capacity(COALESCE, wr);
    // HELLO: what we have received, and the nonce (new) or the session id (resume).
    let (received, resume) = (shared.lock().window.received, sid.is_some());
    let body = sid.unwrap_or(*nonce);
    let hello = frame::encode(&Header::Hello {
        received,
        version: frame::VERSION,
        resume,
    });
    // A new session's HELLO goes out with its first frames; a resume's now: it waits for
    // the peer's.
    let greet = async {
        wr.write_all(&hello).await?;
        wr.write_all(&body).await?;
        if resume {
            wr.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    if let Err(e) = greet.await {
        return LinkEnd::Broken(format!("the link failed: {e}"));
    }
    // A new session starts sending at once, in the same flight as its HELLO: the peer has
    // received nothing of it yet, so there is nothing to agree on first (its HELLO is read
    // before anything else on the link, and must say 0). A resume waits for the peer's
    // HELLO: it says where to go on from.
    let fresh = sid.is_none();
    let peer_received = if fresh {
        0
    } else {
        match read_hello(&mut rd, cfg, resume, (sid, nonce)).await {
            Ok(r) => r,
            Err(end) => return end,
        }
    };
    {
        let st = shared.lock();
        if let Err(e) = st.send.resume_at(peer_received) {
            return LinkEnd::Fatal(e.to_string());
        }
    }
    debug!(peer_received, "session link up");
    let mut sent_bytes = 0u64;
    let mut received_bytes = 0u64;
    shared.lock().switch_out = false;
    let end = {
        let reader = async {
            if fresh {
                match read_hello(&mut rd, cfg, resume, (sid, nonce)).await {
                    Ok(0) => {}
                    Ok(n) => {
                        return LinkEnd::Fatal(format!(
                            "the peer's HELLO of a new session says it received {n} bytes"
                        ))
                    }
                    Err(end) => return end,
                }
            }
            read_side(shared, cfg, &mut rd, tx, &mut received_bytes).await
        };
        let writer = write_side(shared, cfg, &mut wr, peer_received, &mut sent_bytes);
        tokio::pin!(reader);
        tokio::pin!(writer);
        // A move to a new link (see [`Session::with_upgrades`]): once it is here, the writer
        // ends this link with SWITCH; the reader reads on until the peer's SWITCH; then the
        // session goes on over the new link, starting with HELLO.
        let mut next: Option<Link> = None;
        let (mut peer_switched, mut switch_sent) = (false, false);
        let mut switch_by: Option<tokio::time::Instant> = None;
        loop {
            if peer_switched && switch_sent {
                break LinkEnd::Switched(next.take().expect("SWITCH is written only with a link"));
            }
            let wait_upgrade = next.is_none() && upgrades.is_some();
            let by = switch_by.unwrap_or_else(|| tokio::time::Instant::now() + SWITCH_WAIT);
            let got = tokio::select! {
                e = &mut reader, if !peer_switched => match e {
                    LinkEnd::PeerSwitched => {
                        peer_switched = true;
                        switch_by.get_or_insert_with(|| tokio::time::Instant::now() + SWITCH_WAIT);
                        continue;
                    }
                    other => break other,
                },
                e = &mut writer, if !switch_sent => match e {
                    LinkEnd::SwitchSent => {
                        switch_sent = true;
                        switch_by.get_or_insert_with(|| tokio::time::Instant::now() + SWITCH_WAIT);
                        continue;
                    }
                    other => break other,
                },
                l = next_upgrade(upgrades), if wait_upgrade => l,
                () = tokio::time::sleep_until(by), if switch_by.is_some() => {
                    break LinkEnd::Broken(format!(
                        "the move to a new path did not complete within {}s",
                        SWITCH_WAIT.as_secs()
                    ));
                }
            };
            match got {
                Some(l) if BOUNDARY_OFF => {
                    shared.lock().naive_switch = true;
                    break LinkEnd::Switched(l);
                }
                Some(l) => {
                    info!(strategy = l.strategy, "a new path is ready: switching");
                    next = Some(l);
                    shared.lock().switch_out = true;
                    shared.wake.notify_one();
                }
                None => {
                    *upgrades = None;
                    if peer_switched {
                        break LinkEnd::Broken(
                            "the peer moved to a new path that this side did not get".into(),
                        );
                    }
                }
            }
        }
    };
    stats.bytes_sent = sent_bytes;
    stats.bytes_received = received_bytes;
    if let LinkEnd::EndSent = end {
        // Give the peer's END (or its close) a moment to arrive, so the END just written is
        // not cut by our own close.
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
    }
    if let LinkEnd::PeerEnded(EndCode::Done, _) = end {
        // Answer with our own END(Done) (the peer may be waiting for it), best effort.
        let reason = b"done";
        let h = frame::encode(&Header::End {
            code: EndCode::Done,
            len: reason.len() as u32,
        });
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            wr.write_all(&h).await?;
            wr.write_all(reason).await?;
            wr.flush().await?;
            wr.shutdown().await
        })
        .await;
    }
    end
}

/// The next link to move to, or `None` once no more will come (never while there is none).
async fn next_upgrade(upgrades: &mut Option<mpsc::Receiver<Link>>) -> Option<Link> {
    match upgrades {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Frames from the link: data to the sink, acks into the send buffer, pings answered.
async fn read_side<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    cfg: &SessionConfig,
    rd: &mut R,
    tx: &mpsc::Sender<SinkItem>,
    received_bytes: &mut u64,
) -> LinkEnd {
    let pool = Pool::new(MAX_PAYLOAD as usize);
    loop {
        let limit = liveness(cfg, shared.lock().rtt);
        let mut raw = [0u8; HEADER_LEN];
        if let Err(e) = read_timed(rd, &mut raw, limit).await {
            return LinkEnd::Broken(e);
        }
        let header = match frame::decode(&raw) {
            Ok(h) => h,
            Err(e) => return LinkEnd::Fatal(format!("the peer sent a {e}")),
        };
        match header {
            Header::Data { offset, len } => {
                // Into a pooled buffer (initialized memory, reused once the sink wrote it).
                let mut buf = pool.take();
                if let Err(e) = read_timed(rd, &mut buf[..len as usize], limit).await {
                    return LinkEnd::Broken(if e.starts_with("the link ended") {
                        "the link ended inside a data frame".into()
                    } else {
                        e
                    });
                }
                *received_bytes += u64::from(len);
                let data = pool.freeze(buf, len as usize);
                let mut window = shared.lock().window.clone();
                let range = match window.accept(offset, len) {
                    Ok(r) => r,
                    Err(e) => return LinkEnd::Fatal(format!("the peer sent {e}")),
                };
                let fresh = !range.is_empty();
                if fresh && tx.send(SinkItem::Data(data.slice(range))).await.is_err() {
                    return LinkEnd::Fatal("the output is gone".into());
                }
                // Only now, with the bytes queued for the sink: advance.
                let at = shared.ms();
                let mut st = shared.lock();
                st.window = window;
                if fresh {
                    st.first_byte_ms.get_or_insert(at);
                }
            }
            Header::Ack { written, eof } => {
                let mut st = shared.lock();
                let sent = st.sent_high;
                if let Err(e) = st.send.ack(written, sent) {
                    return LinkEnd::Fatal(format!("the peer sent {e}"));
                }
                if eof && !(st.send.eof() && written == st.send.end()) {
                    return LinkEnd::Fatal(
                        "the peer confirmed an end this side has not sent".into(),
                    );
                }
                st.peer_has_eof |= eof;
                drop(st);
                shared.room.notify_one();
                shared.wake.notify_one();
            }
            Header::Eof { at } => {
                let queue = {
                    let mut st = shared.lock();
                    if let Err(e) = st.window.eof(at) {
                        return LinkEnd::Fatal(format!("the peer sent {e}"));
                    }
                    let q = st.window.received == at && !st.finish_queued;
                    st.finish_queued |= q;
                    q
                };
                if queue && tx.send(SinkItem::Finish).await.is_err() {
                    return LinkEnd::Fatal("the output is gone".into());
                }
            }
            Header::End { code, len } => {
                let mut reason = vec![0u8; len as usize];
                if let Err(e) = read_timed(rd, &mut reason, limit).await {
                    return LinkEnd::Broken(e);
                }
                let reason = String::from_utf8_lossy(&reason).into_owned();
                if code == EndCode::Done && !shared.lock().peer_may_be_done() {
                    // The peer claims a clean end while bytes are outstanding: never a success.
                    return LinkEnd::PeerEnded(
                        EndCode::Abort,
                        "the peer ended the session while data was outstanding".into(),
                    );
                }
                return LinkEnd::PeerEnded(code, reason);
            }
            Header::Ping(t) => {
                shared.lock().pong = Some(t);
                shared.wake.notify_one();
            }
            Header::Pong(t) => {
                let now = micros(shared);
                if let Some(rtt) = now.checked_sub(t) {
                    let rtt = Duration::from_micros(rtt);
                    let mut st = shared.lock();
                    st.rtt = Some(rtt);
                    st.path_rtt = Some(st.path_rtt.map_or(rtt, |r| r.min(rtt)));
                }
            }
            Header::Hello { .. } => {
                return LinkEnd::Fatal(
                    FrameError::Unexpected("HELLO in the middle of a link").to_string(),
                )
            }
            Header::Switch { at } => {
                let received = shared.lock().window.received;
                if at != received {
                    return LinkEnd::Fatal(format!(
                        "the peer sent SWITCH at byte {at}, but {received} bytes were received"
                    ));
                }
                return LinkEnd::PeerSwitched;
            }
        }
    }
}

fn micros(shared: &Shared) -> u64 {
    u64::try_from(shared.started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What the writer does next.
enum Next {
    End(EndCode, String),
    Switch(u64),
    Pong(u64),
    Ack(u64, bool),
    Data(u64, Bytes),
    Eof(u64),
    Wait,
}

/// Frames to the link: END, PONG, ACK, DATA from the send buffer, EOF, PING when idle.
async fn write_side<W: AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    cfg: &SessionConfig,
    wr: &mut W,
    resume_at: u64,
    sent_bytes: &mut u64,
) -> LinkEnd {
    // A test-only build resends nothing: it continues where it had got to, as a plain
    // reconnect would, to watch the tests that guard the replay go red.
    let mut sent = {
        let st = shared.lock();
        if REPLAY_OFF {
            st.send.end().max(resume_at)
        } else if st.naive_switch {
            st.sent_high.max(resume_at)
        } else {
            resume_at
        }
    };
    let mut eof_sent = false;
    // Forces one ACK at the start of every link (the peer may have missed the last).
    let mut acked_told: Option<(u64, bool)> = None;
    let mut last_write = tokio::time::Instant::now();
    // One PING right away: the round trip for the liveness timeout.
    let mut ping_due = true;
    // A new link's first frames are small and grow: the reader takes a frame whole, and a
    // fresh TCP connection carries about 14 KB in its first round trip, so a 1 MiB first
    // frame would hold the first byte back by the round trips of slow start.
    let mut frame_cap = FIRST_FRAME;
    loop {
        let notified = shared.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let mut st = shared.lock();
            let ack_now = (st.written, st.sink_done);
            // END(Done) only once our last ACK (with its EOF flag) is out: the peer checks it.
            if st.end.is_none() && st.both_done() && acked_told == Some(ack_now) {
                st.end = Some((EndCode::Done, "done".into()));
            }
            if let Some((code, reason)) = st.end.clone() {
                Next::End(code, reason)
            } else if st.switch_out {
                Next::Switch(sent)
            } else if let Some(t) = st.pong.take() {
                Next::Pong(t)
            } else if acked_told != Some(ack_now) {
                Next::Ack(ack_now.0, ack_now.1)
            } else if let Some(b) = st.send.get(sent, frame_cap) {
                frame_cap = (frame_cap * 2).min(MAX_PAYLOAD as usize);
                Next::Data(sent, b)
            } else if st.send.eof() && sent == st.send.end() && !eof_sent {
                Next::Eof(sent)
            } else {
                Next::Wait
            }
        };
        let r = match next {
            Next::End(code, reason) => {
                let text = reason.as_bytes();
                let text = &text[..text.len().min(frame::MAX_REASON as usize)];
                let h = frame::encode(&Header::End {
                    code,
                    len: text.len() as u32,
                });
                let w = async {
                    wr.write_all(&h).await?;
                    wr.write_all(text).await?;
                    wr.flush().await
                };
                return match tokio::time::timeout(Duration::from_secs(2), w).await {
                    Ok(Ok(())) => LinkEnd::EndSent,
                    Ok(Err(e)) if code == EndCode::Done => {
                        debug!("END(done) not written: {e}");
                        LinkEnd::EndSent
                    }
                    Ok(Err(e)) => LinkEnd::Broken(format!("the link failed: {e}")),
                    Err(_) => LinkEnd::EndSent,
                };
            }
            Next::Switch(at) => {
                let w = async {
                    wr.write_all(&frame::encode(&Header::Switch { at })).await?;
                    wr.flush().await
                };
                return match w.await {
                    Ok(()) => LinkEnd::SwitchSent,
                    Err(e) => LinkEnd::Broken(format!("the link failed: {e}")),
                };
            }
            Next::Pong(t) => wr.write_all(&frame::encode(&Header::Pong(t))).await,
            Next::Ack(written, eof) => {
                acked_told = Some((written, eof));
                wr.write_all(&frame::encode(&Header::Ack { written, eof }))
                    .await
            }
            Next::Data(at, b) => {
                let h = frame::encode(&Header::Data {
                    offset: at,
                    len: b.len() as u32,
                });
                let r = async {
                    wr.write_all(&h).await?;
                    wr.write_all(&b).await?;
                    wr.flush().await
                }
                .await;
                if r.is_ok() {
                    sent = at + b.len() as u64;
                    *sent_bytes += b.len() as u64;
                    let mut st = shared.lock();
                    st.sent_high = st.sent_high.max(sent);
                }
                r
            }
            Next::Eof(at) => {
                eof_sent = true;
                wr.write_all(&frame::encode(&Header::Eof { at })).await
            }
            Next::Wait => {
                if ping_due {
                    ping_due = false;
                    last_write = tokio::time::Instant::now();
                    let r = async {
                        wr.write_all(&frame::encode(&Header::Ping(micros(shared))))
                            .await?;
                        wr.flush().await
                    };
                    if let Err(e) = r.await {
                        return LinkEnd::Broken(format!("the link failed: {e}"));
                    }
                    continue;
                }
                if let Err(e) = wr.flush().await {
                    return LinkEnd::Broken(format!("the link failed: {e}"));
                }
                let next_ping = last_write + cfg.ping_every;
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(next_ping) => ping_due = true,
                }
                continue;
            }
        };
        if let Err(e) = r {
            return LinkEnd::Broken(format!("the link failed: {e}"));
        }
        last_write = tokio::time::Instant::now();
    }
}
