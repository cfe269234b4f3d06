//! `connect`'s data path on the session layer ([`nettool_core::session`]): stdin and stdout as
//! the session's source and sink, resumes through the rendezvous server with the same
//! strategies, and the exit code and message that say exactly how the session ended.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nettool_core::report::SessionEndReport;
use nettool_core::session::{
    EndKind, Paths, ResumeTicket, Session, SessionConfig, SessionEnd, Sink, Source,
};
use nettool_core::{ConnectParams, Link, LinkKey, Orchestrator, Report};
use tokio::sync::watch;

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
            let (link, report) = orch.connect(&params, &|_| {}).await;
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
}

/// Runs the session over `link` until it ends; writes the final report; the exit code.
pub(crate) async fn run(
    link: Link,
    p: SessionParams,
    mut report: Report,
    report_path: Option<&std::path::Path>,
    stop: watch::Receiver<Option<i32>>,
) -> Result<i32> {
    let input = Input::stdin().context("opening stdin")?;
    let output = Output::stdout().context("opening stdout")?;
    tracing::info!(
        stdin = input.mode().as_str(),
        stdout = output.mode().as_str(),
        "stdio modes"
    );
    let secret = p.params.secret.as_deref().unwrap_or(&p.params.session);
    let key = LinkKey::derive(&p.params.session, secret);
    let paths = Rejoin {
        orch: p.orch,
        server: p.params.server,
        servers: p.servers,
        attempt: p.attempt_timeout,
    };
    let end = Session::new(p.config, key)
        .run(
            link,
            Box::new(Stdin(input)),
            Box::new(Stdout(output)),
            Box::new(paths),
            stop,
        )
        .await;
    stdio::restore();
    let (code, message) = verdict(&end);
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
