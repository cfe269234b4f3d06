//! The session over a connection's first link: resumes through the rendezvous server with the
//! same strategies (relay-first again, with its upgrades), the final report, and the stream
//! that a program holds ([`PeerStream`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nettool_core::express::{Confirmation, Verdict};
use nettool_core::relay_first::{self, DirectConnect};
use nettool_core::report::SessionEndReport;
use nettool_core::session::{
    EndKind, Paths, ReadSource, ResumeTicket, Session, SessionConfig, SessionEnd, Sink, Source,
    WriteSink,
};
use nettool_core::{ConnectParams, Link, LinkKey, Orchestrator, Report};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, watch};

use crate::{Event, Events};

/// Everything a session needs beyond its first link (kept by a [`crate::Connection`]).
pub(crate) struct Lifecycle {
    pub(crate) orch: Orchestrator,
    pub(crate) params: ConnectParams,
    /// Every server given, for resumes (several: each resume takes the first that answers).
    pub(crate) servers: Vec<String>,
    pub(crate) attempt_timeout: Duration,
    pub(crate) config: SessionConfig,
    pub(crate) relay_first: bool,
    /// Relay-first's direct connect, running, when the session starts on the relay.
    pub(crate) direct: Option<DirectConnect>,
    /// When the connect began (the report's times count from here).
    pub(crate) started: Instant,
    /// The peer's key confirmation still to come (an express relay link: it rides with the
    /// peer's first data); a failed one means there was no link.
    pub(crate) confirmation: Option<Confirmation>,
    pub(crate) portmap: Option<Arc<dyn nettool_core::port_mapping::PortMapping>>,
    pub(crate) events: Events,
}

/// How a session ended, with the final report.
#[derive(Debug)]
pub struct Finished {
    /// The session's end: its kind, bytes sent, confirmed and received, paths and resumes.
    pub end: SessionEnd,
    /// The connect's report with the session's part (paths, resumes, the end).
    pub report: Report,
    /// Set when the peer's key confirmation failed on an express relay link: there was no
    /// link after all (a wrong secret or code; a code is burned). The report says so too.
    pub not_linked: Option<String>,
    /// Port mappings deleted at the end, of those live (only with port mapping on and some
    /// live).
    pub mappings_released: Option<(usize, usize)>,
}

impl Finished {
    /// Whether the session did its job: the link was the peer's, every byte this side sent
    /// was confirmed written by the peer, and the peer ended in order (what exit 0 of
    /// `nettool connect` means).
    pub fn succeeded(&self) -> bool {
        self.not_linked.is_none()
            && match &self.end.kind {
                EndKind::Done => true,
                EndKind::PeerStopped(_) => self.end.delivered(),
                _ => false,
            }
    }
}

/// New paths for a resumed session: the same orchestrator (strategies, plan), joined under
/// the resume ticket, retried until the deadline. With several servers each attempt takes
/// the first that answers, so a session whose server is gone for good resumes through the
/// next one the partner also reaches.
struct Rejoin {
    orch: Orchestrator,
    server: std::net::SocketAddr,
    servers: Vec<String>,
    /// Longest single connect (the configured overall timeout).
    attempt: Duration,
    /// Relay-first: resumes link on the relay at once and look for a direct path again in
    /// the background.
    upgrades: Option<Upgrades>,
    events: Events,
}

/// Relay-first's direct connects in the background: each one's link goes to the session
/// (which moves to it), each one's report is kept for the final report.
#[derive(Clone)]
struct Upgrades {
    to_session: mpsc::Sender<Link>,
    reports: Arc<Mutex<Vec<Report>>>,
    /// The tasks waiting for the direct connects (aborted when the session ends).
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    started: Instant,
    /// The first direct path that was ready: ms since the connect began, and its strategy
    /// (the session may have ended before it moved there).
    ready: Arc<Mutex<Option<(u128, &'static str)>>>,
    /// How far the first direct connect got (for the report when the session ends first).
    progress: Arc<Mutex<Option<relay_first::DirectProgress>>>,
    events: Events,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Aborts the direct connect when dropped (a detached task would keep its rendezvous
/// connection and the peer's pairing alive).
struct AbortOnDrop(tokio::task::JoinHandle<(Option<Link>, Report)>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Upgrades {
    /// Waits for `direct` in the background; its link goes to the session.
    fn watch(&self, direct: DirectConnect) {
        let me = self.clone();
        locked(&self.progress).get_or_insert(direct.progress);
        let task = tokio::spawn(async move {
            let mut direct = AbortOnDrop(direct.handle);
            let Ok((link, report)) = (&mut direct.0).await else {
                return;
            };
            let at_ms = me.started.elapsed().as_millis();
            match &link {
                Some(l) => {
                    locked(&me.ready).get_or_insert((at_ms, l.strategy));
                    (me.events)(Event::DirectReady {
                        at_ms,
                        strategy: l.strategy,
                        local: l.local,
                        remote: l.remote,
                    });
                }
                None => (me.events)(Event::NoDirectPath {
                    reason: report
                        .error
                        .clone()
                        .unwrap_or_else(|| "no strategy produced a link".into()),
                }),
            }
            locked(&me.reports).push(report);
            if let Some(l) = link {
                let _ = me.to_session.send(l).await;
            }
        });
        locked(&self.tasks).push(task.abort_handle());
    }

    fn stop(&self) {
        for t in locked(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

#[async_trait::async_trait]
impl Paths for Rejoin {
    async fn reconnect(
        &mut self,
        ticket: &ResumeTicket,
        deadline: Instant,
    ) -> Result<Link, String> {
        let mut last = "no attempt".to_owned();
        let mut tries = 0u32;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_millis(200) {
                return Err(last);
            }
            tries += 1;
            let mut orch = self.orch.clone().with_overall(left.min(self.attempt));
            if self.servers.len() > 1 {
                match crate::choose_server(&self.servers, self.events.as_ref()).await {
                    Ok((server, all)) => {
                        self.server = server;
                        orch = orch.with_server_addresses(all);
                    }
                    Err(e) => {
                        last = e.to_string();
                        tokio::time::sleep(Duration::from_millis(500).min(left)).await;
                        continue;
                    }
                }
            }
            let params = ConnectParams {
                server: self.server,
                session: ticket.session.clone(),
                secret: Some(ticket.secret.clone()),
            };
            let (link, report) = match &self.upgrades {
                Some(up) => {
                    let r = relay_first::connect(&orch, &params, &|_| {}).await;
                    if let Some(d) = r.direct {
                        up.watch(d);
                    }
                    (r.link, r.report)
                }
                None => orch.connect(&params, &|_| {}).await,
            };
            if let Some(link) = link {
                (self.events)(Event::Resumed {
                    strategy: link.strategy,
                    local: link.local,
                    remote: link.remote,
                    tries,
                });
                return Ok(link);
            }
            last = report
                .error
                .unwrap_or_else(|| "no strategy produced a link".into());
            tracing::info!("resume attempt {tries} failed: {last}");
            // The server may be restarting: try again soon, never busily.
            tokio::time::sleep(Duration::from_millis(500).min(left)).await;
        }
    }
}

/// Runs the session over `link` from `source` to `sink` until it ends; the final report.
pub(crate) async fn run(
    link: Link,
    p: Lifecycle,
    mut report: Report,
    (source, sink): (Box<dyn Source>, Box<dyn Sink>),
    stop: watch::Receiver<Option<i32>>,
) -> Finished {
    let secret = p.params.secret.as_deref().unwrap_or(&p.params.session);
    let key = LinkKey::derive(&p.params.session, secret);
    let (to_session, upgrade_rx) = mpsc::channel(1);
    let upgrades = p.relay_first.then(|| Upgrades {
        to_session,
        reports: Arc::default(),
        tasks: Arc::default(),
        started: p.started,
        ready: Arc::default(),
        progress: Arc::default(),
        events: p.events.clone(),
    });
    let events = p.events.clone();
    let mut session = Session::new(p.config, key)
        .with_clock(p.started)
        .with_path_events(Arc::new(move |strategy: &str, at_ms: u64| {
            events(Event::Path {
                strategy: strategy.to_owned(),
                at_ms,
            })
        }));
    if let Some(up) = &upgrades {
        if let Some(d) = p.direct {
            up.watch(d);
        }
        session = session.with_upgrades(upgrade_rx);
    }
    // The direct strategies (for the report when the session ends before they do).
    let direct_names: Vec<String> = p
        .orch
        .names()
        .into_iter()
        .filter(|n| n != relay_first::RELAY)
        .collect();
    let paths = Rejoin {
        orch: p.orch,
        server: p.params.server,
        servers: p.servers,
        attempt: p.attempt_timeout,
        upgrades: upgrades.clone(),
        events: p.events.clone(),
    };
    let end = session.run(link, source, sink, Box::new(paths), stop).await;
    let mappings_released = release(p.portmap.as_deref()).await;
    if let Some(mut c) = p.confirmation {
        // The verdict is settled within a moment of the link's end (a wrong code is reported
        // to the server first).
        let v = tokio::time::timeout(Duration::from_secs(3), c.decided()).await;
        if let Ok(Verdict::Failed(why)) = v {
            if let Some(up) = &upgrades {
                up.stop();
            }
            not_linked(&mut report, &p.params.session, &why);
            return Finished {
                end,
                report,
                not_linked: Some(why),
                mappings_released,
            };
        }
    }
    if let Some(up) = &upgrades {
        up.stop();
        // The first direct connect's attempts and NAT findings join the report.
        let first = locked(&up.reports).drain(..).next();
        if let Some(direct) = first {
            let moved = end.paths.iter().any(|p| p.strategy != relay_first::RELAY);
            relay_first::merge(&mut report, direct, moved);
        } else if let Some(progress) = locked(&up.progress).take() {
            // The session ended before the direct connect did: its attempts, as far as they
            // got, cancelled.
            report.attempts.extend(progress.cancelled(&direct_names));
        }
        let ready = *locked(&up.ready);
        report.summary = Some(summary(&end, ready));
    }
    report.first_byte_ms = end.first_byte_ms;
    if let Some(last) = end.paths.last() {
        report.strategy = Some(last.strategy.clone());
    }
    report.resumes = end.resumes.clone();
    report.paths = end.paths.clone();
    report.session_end = Some(SessionEndReport {
        kind: kind_name(&end.kind).to_owned(),
        reason: reason(&end.kind),
        bytes_sent: end.sent,
        bytes_confirmed: end.confirmed,
        bytes_received: end.received,
    });
    Finished {
        end,
        report,
        not_linked: None,
        mappings_released,
    }
}

/// Deletes the gateway's mappings (with port mapping on): how many, of how many live.
pub(crate) async fn release(
    portmap: Option<&dyn nettool_core::port_mapping::PortMapping>,
) -> Option<(usize, usize)> {
    let m = portmap?;
    let live = m.mapped().len();
    if live == 0 {
        return None;
    }
    Some((m.release_all().await, live))
}

/// The peer's key confirmation failed on an express relay link: no link after all, said in
/// the report as a failed connect says it; the relay attempt failed, a code is burned.
fn not_linked(report: &mut Report, session: &str, why: &str) {
    let code = nettool_core::code::is_code_session(session);
    if let Some(a) = report
        .attempts
        .iter_mut()
        .find(|a| a.strategy == relay_first::RELAY)
    {
        a.outcome = nettool_core::Outcome::Failed;
        a.error = Some(why.to_owned());
    }
    report.strategy = None;
    report.local = None;
    report.remote = None;
    report.wrong_code = code;
    report.error = Some(if code {
        "key confirmation failed: a wrong code (the code is burned)".into()
    } else {
        why.to_owned()
    });
}

/// Relay-first's one line: "linked on relay in 12 ms, direct (tcp-punch) at 41 ms, 99.8 % of
/// bytes direct". When a direct path was ready but the session ended before it moved there,
/// the line says so instead of "no direct path" (two endings that seemed to contradict each
/// other).
pub(crate) fn summary(end: &SessionEnd, ready: Option<(u128, &str)>) -> String {
    let Some(first) = end.paths.first() else {
        return "no path carried the session".into();
    };
    let mut out = format!("linked on {} in {} ms", first.strategy, first.from_ms);
    let bytes = |p: &nettool_core::session::PathReport| p.bytes_sent + p.bytes_received;
    let total: u64 = end.paths.iter().map(bytes).sum();
    match end.paths.iter().find(|p| p.strategy != relay_first::RELAY) {
        Some(d) => {
            let direct: u64 = end
                .paths
                .iter()
                .filter(|p| p.strategy != relay_first::RELAY)
                .map(bytes)
                .sum();
            let share = if total == 0 {
                0.0
            } else {
                direct as f64 * 100.0 / total as f64
            };
            out += &format!(
                ", direct ({}) at {} ms, {share:.1} % of bytes direct",
                d.strategy, d.from_ms
            );
        }
        None => match ready {
            Some((at, strategy)) => {
                out += &format!(
                    ", direct path ({strategy}) ready at {at} ms, but the session ended on the \
                     relay first: every byte relayed"
                )
            }
            None => out += ", no direct path: every byte relayed",
        },
    }
    out
}

fn kind_name(k: &EndKind) -> &'static str {
    match k {
        EndKind::Done => "done",
        EndKind::PeerStopped(_) => "peer-stopped",
        EndKind::PeerAborted(_) => "peer-aborted",
        EndKind::Stopped(_) => "stopped",
        EndKind::Aborted(_) => "aborted",
        EndKind::Lost(_) => "lost",
    }
}

fn reason(k: &EndKind) -> Option<String> {
    match k {
        EndKind::Done => None,
        EndKind::Stopped(s) => Some(format!(
            "stopped by {}",
            nettool_core::session::signal_name(*s)
        )),
        EndKind::PeerStopped(r)
        | EndKind::PeerAborted(r)
        | EndKind::Aborted(r)
        | EndKind::Lost(r) => Some(r.clone()),
    }
}

/// How much a [`PeerStream`] buffers between the program and the session, each way.
const STREAM_BUFFER: usize = 256 << 10;

/// The durable stream to the peer: what is written reaches the peer's stream in order, once,
/// across path changes and resumes; what the peer writes is read here. `shutdown` ends this
/// direction (the peer reads EOF after the last byte); reading 0 means the peer ended its
/// direction. Whether every byte arrived is [`Completion::finished`]'s to say.
#[derive(Debug)]
pub struct PeerStream(DuplexStream);

/// The session behind a [`PeerStream`], running in a task of its own.
#[derive(Debug)]
pub struct Completion {
    task: tokio::task::JoinHandle<Finished>,
    stop: watch::Sender<Option<i32>>,
}

impl Completion {
    /// Waits until the session has ended: both directions done (or the session lost, given
    /// up after its resume timeout, or stopped).
    pub async fn finished(self) -> Finished {
        let _keep = self.stop;
        match self.task.await {
            Ok(f) => f,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Whether the session has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Ends the session now, as a signal would (`END` to the peer): the stream's pending
    /// bytes may not be delivered; [`Self::finished`] then says `stopped`.
    pub fn stop(&self) {
        // 15 (SIGTERM) is what the report calls it.
        let _ = self.stop.send(Some(15));
    }
}

pub(crate) fn stream(link: Link, p: Lifecycle, report: Report) -> (PeerStream, Completion) {
    let (mine, session_end) = tokio::io::duplex(STREAM_BUFFER);
    let (rd, wr) = tokio::io::split(session_end);
    let (stop, stopped) = watch::channel(None);
    let task = tokio::spawn(run(
        link,
        p,
        report,
        (Box::new(ReadSource(rd)), Box::new(WriteSink(wr))),
        stopped,
    ));
    (PeerStream(mine), Completion { task, stop })
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nettool_core::session::PathReport;

    fn end(paths: &[(&str, u64, u64)]) -> SessionEnd {
        SessionEnd {
            kind: EndKind::Done,
            sent: 0,
            confirmed: 0,
            received: 0,
            resumes: Vec::new(),
            paths: paths
                .iter()
                .map(|&(strategy, from_ms, bytes)| PathReport {
                    strategy: strategy.into(),
                    bytes_sent: bytes,
                    bytes_received: 0,
                    from_ms,
                    to_ms: None,
                    rtt_ms: None,
                })
                .collect(),
            first_byte_ms: None,
        }
    }

    #[test]
    fn the_last_line_says_what_happened_to_the_direct_path() {
        let upgraded = end(&[("relay", 7, 100), ("tcp-punch", 263, 300)]);
        assert_eq!(
            summary(&upgraded, Some((250, "tcp-punch"))),
            "linked on relay in 7 ms, direct (tcp-punch) at 263 ms, 75.0 % of bytes direct"
        );
        let ended_first = end(&[("relay", 7, 100)]);
        assert_eq!(
            summary(&ended_first, Some((263, "tcp-punch"))),
            "linked on relay in 7 ms, direct path (tcp-punch) ready at 263 ms, but the session \
             ended on the relay first: every byte relayed"
        );
        assert_eq!(
            summary(&ended_first, None),
            "linked on relay in 7 ms, no direct path: every byte relayed"
        );
    }
}
