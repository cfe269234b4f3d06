//! `connect`'s data path on the session layer ([`nettool_core::session`]): stdin and stdout as
//! the session's source and sink, resumes through the rendezvous server with the same
//! strategies, and the exit code and message that say exactly how the session ended.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use nettool_core::express::{Confirmation, Verdict};
use nettool_core::relay_first::{self, DirectConnect};
use nettool_core::report::SessionEndReport;
use nettool_core::session::{
    EndKind, Paths, ResumeTicket, Session, SessionConfig, SessionEnd, Sink, Source,
};
use nettool_core::{ConnectParams, Link, LinkKey, Orchestrator, Report};
use tokio::sync::{mpsc, watch};

use crate::stdio::{self, Input, Output};

struct Stdin(Input);
struct Stdout(Output);

#[async_trait::async_trait]
impl Source for Stdin {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).await
    }
}

#[async_trait::async_trait]
impl Sink for Stdout {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf).await
    }
    async fn finish(&mut self) -> std::io::Result<()> {
        self.0.finish().await
    }
}

/// New paths for a resumed session: the same orchestrator (strategies, plan), joined under
/// the resume ticket, retried until the deadline. With several `--server`s each attempt
/// takes the first that answers (as `connect` did at its start), so a session whose server is
/// gone for good resumes through the next one the partner also reaches.
struct Rejoin {
    orch: Orchestrator,
    server: std::net::SocketAddr,
    /// Every `--server` given, in order (one: always `server`).
    servers: Vec<String>,
    /// Longest single connect (the configured overall timeout).
    attempt: Duration,
    /// Relay-first: resumes link on the relay at once and look for a direct path again in
    /// the background.
    upgrades: Option<Upgrades>,
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
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(direct.progress);
        let task = tokio::spawn(async move {
            let mut direct = AbortOnDrop(direct.handle);
            let Ok((link, report)) = (&mut direct.0).await else {
                return;
            };
            let at = me.started.elapsed().as_millis();
            match &link {
                Some(l) => {
                    me.ready
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert((at, l.strategy));
                    eprintln!(
                        "nettool: direct path ready at {at} ms: {} ({} -> {}); moving the session to it",
                        l.strategy, l.local, l.remote
                    )
                }
                None => eprintln!(
                    "nettool: no direct path ({}); staying on the relay",
                    report
                        .error
                        .as_deref()
                        .unwrap_or("no strategy produced a link")
                ),
            }
            me.reports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(report);
            if let Some(l) = link {
                let _ = me.to_session.send(l).await;
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task.abort_handle());
    }

    fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
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
                match crate::choose_server(&self.servers).await {
                    Ok((server, all)) => {
                        self.server = server;
                        orch = orch.with_server_addresses(all);
                    }
                    Err(e) => {
                        last = format!("{e:#}");
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
                eprintln!(
                    "nettool: resumed via {} after {tries} attempt(s): {} -> {}",
                    link.strategy, link.local, link.remote
                );
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

/// What `connect` needs to run a session after its first link.
pub(crate) struct SessionParams {
    pub(crate) orch: Orchestrator,
    pub(crate) params: ConnectParams,
    /// Every `--server` given, for resumes.
    pub(crate) servers: Vec<String>,
    pub(crate) attempt_timeout: Duration,
    pub(crate) config: SessionConfig,
    /// Relay-first (see [`nettool_core::relay_first`]).
    pub(crate) relay_first: bool,
    /// Relay-first's direct connect, running, when the session starts on the relay.
    pub(crate) direct: Option<DirectConnect>,
    /// When the connect began (the report's times count from here).
    pub(crate) started: Instant,
    /// The peer's key confirmation still to come (an express relay link: it rides with the
    /// peer's first data); a failed one means there was no link.
    pub(crate) confirmation: Option<Confirmation>,
    /// Which side of a short code this peer is, if any (for the wrong-code message).
    pub(crate) code_side: Option<crate::CodeSide>,
}

/// Runs the session over `link` until it ends; writes the final report; the exit code.
pub(crate) async fn run(
    link: Link,
    p: SessionParams,
    mut report: Report,
    report_path: Option<&std::path::Path>,
    stop: watch::Receiver<Option<i32>>,
) -> Result<i32> {
    let (input, output) = stdio::open()?;
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
    });
    let mut session = Session::new(p.config, key).with_clock(p.started);
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
    };
    let end = session
        .run(
            link,
            Box::new(Stdin(input)),
            Box::new(Stdout(output)),
            Box::new(paths),
            stop,
        )
        .await;
    stdio::restore();
    if let Some(mut c) = p.confirmation {
        // The verdict is settled within a moment of the link's end (a wrong code is reported
        // to the server first).
        let v = tokio::time::timeout(Duration::from_secs(3), c.decided()).await;
        if let Ok(Verdict::Failed(why)) = v {
            if let Some(up) = &upgrades {
                up.stop();
            }
            return not_linked(report, report_path, &p.params.session, why, p.code_side);
        }
    }
    let (code, message) = verdict(&end);
    if let Some(up) = &upgrades {
        up.stop();
        // The first direct connect's attempts and NAT findings join the report.
        let first = up
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .next();
        if let Some(direct) = first {
            let moved = end.paths.iter().any(|p| p.strategy != relay_first::RELAY);
            relay_first::merge(&mut report, direct, moved);
        } else if let Some(progress) = up.progress.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            // The session ended before the direct connect did: its attempts, as far as they
            // got, cancelled.
            report.attempts.extend(progress.cancelled(&direct_names));
        }
        let ready = *up.ready.lock().unwrap_or_else(|e| e.into_inner());
        let summary = summary(&end, ready);
        eprintln!("nettool: {summary}");
        report.summary = Some(summary);
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
    if let Some(path) = report_path {
        crate::write_report(&path.to_path_buf(), &report)?;
    }
    if matches!(end.kind, EndKind::Stopped(_)) {
        // Give a QUIC endpoint's driver a moment to put the close on the wire.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("nettool: {message}");
    Ok(code)
}

/// The peer's key confirmation failed on an express relay link: no link after all (exit 1),
/// said as a failed connect says it; the relay attempt failed, a code is burned.
fn not_linked(
    mut report: Report,
    report_path: Option<&std::path::Path>,
    session: &str,
    why: String,
    code_side: Option<crate::CodeSide>,
) -> Result<i32> {
    let code = nettool_core::code::is_code_session(session);
    if let Some(a) = report
        .attempts
        .iter_mut()
        .find(|a| a.strategy == relay_first::RELAY)
    {
        a.outcome = nettool_core::Outcome::Failed;
        a.error = Some(why.clone());
    }
    report.strategy = None;
    report.local = None;
    report.remote = None;
    report.wrong_code = code;
    report.error = Some(if code {
        "key confirmation failed: a wrong code (the code is burned)".into()
    } else {
        why.clone()
    });
    if let Some(path) = report_path {
        crate::write_report(&path.to_path_buf(), &report)?;
    }
    if code {
        eprintln!("nettool: {}", crate::wrong_code_message(code_side));
    } else {
        eprintln!("nettool: no link: {why}");
    }
    Ok(1)
}

/// Relay-first's one line: "linked on relay in 12 ms, direct (tcp-punch) at 41 ms, 99.8 % of
/// bytes direct".
/// When a direct path was ready but the session ended before it moved there, the line says
/// so instead of "no direct path" (two endings that seemed to contradict each other).
fn summary(end: &SessionEnd, ready: Option<(u128, &str)>) -> String {
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

/// The exit code and the one line that says how the session ended. 0 only when every byte
/// this side sent was confirmed written by the peer and the peer ended in order.
fn verdict(end: &SessionEnd) -> (i32, String) {
    if option_env!("NETTOOL_TEST_ACKS_OFF").is_some() && matches!(end.kind, EndKind::Lost(_)) {
        // Test-only build: success once everything was handed to a link, as before the
        // session layer (to watch the test that guards "exit 0 means delivered" go red).
        return (
            0,
            "done (acknowledgements ignored in this test build)".into(),
        );
    }
    let totals = if end.confirmed == end.sent {
        format!(
            "sent {} bytes (all confirmed written by the peer), received {} bytes",
            end.sent, end.received
        )
    } else {
        format!(
            "sent {} bytes, of which {} confirmed written by the peer ({} unconfirmed), \
             received {} bytes",
            end.sent,
            end.confirmed,
            end.sent - end.confirmed,
            end.received
        )
    };
    let resumed = match end.resumes.len() {
        0 => String::new(),
        n => format!(" (resumed {n}x)"),
    };
    match &end.kind {
        EndKind::Stopped(s) => (
            128 + s,
            format!(
                "{}: closed the link; {totals}",
                nettool_core::session::signal_name(*s)
            ),
        ),
        EndKind::Done => (0, format!("peer closed; done{resumed}: {totals}")),
        EndKind::PeerStopped(r) if end.delivered() => {
            (0, format!("peer closed ({r}){resumed}: {totals}"))
        }
        EndKind::PeerStopped(r) => (
            1,
            format!("peer closed ({r}) before it took everything{resumed}: {totals}"),
        ),
        EndKind::PeerAborted(r) => (1, format!("the peer aborted: {r}{resumed}; {totals}")),
        EndKind::Aborted(r) => (1, format!("aborted: {r}{resumed}; {totals}")),
        EndKind::Lost(r) => (1, format!("link lost: {r}{resumed}; {totals}")),
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
