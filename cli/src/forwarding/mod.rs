//! What `nettool expose` and `nettool forward` share (the commands: `cmd/expose.rs`,
//! `cmd/forward.rs`): carry many TCP connections over one link.
//!
//! `expose TARGET` keeps a session open for one forwarder at a time; `forward --listen ADDR`
//! accepts local TCP connections and carries each one as its own stream over the link to the
//! exposing side, which connects that stream to TARGET (and nowhere else: it is never an open
//! proxy). Each connection gets its own flow control, so a bulk transfer does not starve an
//! interactive session: on udp-quic every connection is a QUIC stream of the link's connection
//! (QUIC's per-stream windows); on the byte-stream links (TCP, relay) streams are multiplexed
//! with yamux inside the link's TLS.
//!
//! Every forwarder gets a session of its own with the exposing side (`nettool_peer`,
//! relay-first): its connections ride the session's stream, so they start on the relay at once,
//! survive what the session survives (an address change, a NAT that forgets its mappings, the
//! server restarting under the relay) and move to a direct path without a byte lost. The
//! exposing side keeps a join waiting at all times and serves every forwarder that links, each
//! in its own session (relay-first's direct pairing is named per pairing for it); a forwarder
//! that vanishes leaves a session that waits out its resume timeout on its own.
//!
//! Wire format on the session's stream:
//! - forwarder → expose: `NTFWD2` `F` instance-id (16 bytes);
//! - expose → forwarder: `NTFWD2` `O`;
//! - then yamux (the forwarder is the client), every stream opened by the forwarder: `C`,
//!   answered with `0` (connected to TARGET) or `1` len (u16 BE) message (that stream failed),
//!   then raw bytes both ways with half-close.
//!
//! Liveness is the session's: a dead path is resumed under the streams; a session that cannot
//! be resumed within its timeout ends, its streams fail, and the forwarder links again.
//!
//! Here: the wire format's constants, the counters and the JSON report, and the setup both
//! commands make (`Peer`); the streams of a link and byte pumping in [`mux`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use nettool_config::Settings;
use nettool_core::{ConnectParams, Link, Orchestrator, Report};
use serde::Serialize;

use crate::{CodeSide, ConfiguredStrategy, PeerArgs};

pub(crate) mod mux;

/// The first bytes of both hellos.
pub(crate) const MAGIC: &[u8; 6] = b"NTFWD2";
/// Bound on the hello exchange and on a stream's first bytes.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Counters and the report

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) streams: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
}

#[derive(Debug, Serialize)]
struct LinkEntry {
    /// Seconds since the Unix epoch when the link was made.
    linked_at_unix: f64,
    connect: Report,
    /// Why the link ended; null while it is up.
    ended: Option<String>,
    /// What carries the streams: `quic` (the link's own QUIC streams) or `yamux`.
    multiplexer: &'static str,
    streams: u64,
}

#[derive(Debug, Serialize)]
struct ForwardReport {
    command: &'static str,
    /// `--listen` (forward) or TARGET (expose).
    endpoint: String,
    links: Vec<LinkEntry>,
    /// Connect attempts that produced no link (the last few, with the reason).
    failed_connects: Vec<String>,
    streams: u64,
    streams_failed: u64,
    streams_active: u64,
    bytes_sent: u64,
    bytes_received: u64,
}

/// Shared by every task of one `expose` or `forward` process.
pub(crate) struct State {
    name: &'static str,
    endpoint: String,
    pub(crate) counters: Counters,
    links: Mutex<Vec<LinkEntry>>,
    failed_connects: Mutex<Vec<String>>,
    report: Option<PathBuf>,
    pub(crate) next_stream: AtomicU64,
}

impl State {
    pub(crate) fn new(name: &'static str, endpoint: String, report: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            name,
            endpoint,
            counters: Counters::default(),
            links: Mutex::new(Vec::new()),
            failed_connects: Mutex::new(Vec::new()),
            report,
            next_stream: AtomicU64::new(1),
        })
    }

    fn snapshot(&self) -> ForwardReport {
        let c = &self.counters;
        let links = self.links.lock().expect("links poisoned");
        ForwardReport {
            command: self.name,
            endpoint: self.endpoint.clone(),
            links: links
                .iter()
                .map(|l| LinkEntry {
                    linked_at_unix: l.linked_at_unix,
                    connect: l.connect.clone(),
                    ended: l.ended.clone(),
                    multiplexer: l.multiplexer,
                    streams: l.streams,
                })
                .collect(),
            failed_connects: self.failed_connects.lock().expect("poisoned").clone(),
            streams: c.streams.load(Ordering::Relaxed),
            streams_failed: c.failed.load(Ordering::Relaxed),
            streams_active: c.active.load(Ordering::Relaxed),
            bytes_sent: c.sent.load(Ordering::Relaxed),
            bytes_received: c.received.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn total_line(&self) -> String {
        let r = self.snapshot();
        format!(
            "nettool {}: total: {} streams ({} failed, {} open), {} bytes sent, {} bytes received, {} links",
            self.name,
            r.streams,
            r.streams_failed,
            r.streams_active,
            r.bytes_sent,
            r.bytes_received,
            r.links.len()
        )
    }

    /// Rewrites the report file (through a temporary file, so readers never see half of it).
    pub(crate) fn write_report(&self) {
        let Some(path) = &self.report else { return };
        let tmp = path.with_extension("tmp");
        let json = match serde_json::to_string_pretty(&self.snapshot()) {
            Ok(j) => j,
            Err(e) => return eprintln!("nettool {}: cannot encode the report: {e}", self.name),
        };
        if let Err(e) = std::fs::write(&tmp, json + "\n").and_then(|()| std::fs::rename(&tmp, path))
        {
            eprintln!(
                "nettool {}: cannot write the report {}: {e}",
                self.name,
                path.display()
            );
        }
    }

    pub(crate) fn link_up(&self, report: Report, multiplexer: &'static str) -> usize {
        let mut links = self.links.lock().expect("links poisoned");
        links.push(LinkEntry {
            linked_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            connect: report,
            ended: None,
            multiplexer,
            streams: 0,
        });
        links.len() - 1
    }

    pub(crate) fn link_down(&self, index: usize, why: &str) {
        if let Some(l) = self.links.lock().expect("links poisoned").get_mut(index) {
            l.ended = Some(why.to_owned());
        }
        self.write_report();
    }

    pub(crate) fn link_stream(&self, index: usize) {
        if let Some(l) = self.links.lock().expect("links poisoned").get_mut(index) {
            l.streams += 1;
        }
    }

    pub(crate) fn connect_failed(&self, why: String) {
        let mut f = self.failed_connects.lock().expect("poisoned");
        if f.len() >= 20 {
            f.remove(0);
        }
        f.push(why);
        drop(f);
        self.write_report();
    }
}

/// Keeps the report file fresh while streams move bytes.
pub(crate) fn spawn_report_writer(state: &Arc<State>) {
    if state.report.is_none() {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            state.write_report();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

/// Says on stderr how stream `n` ended (`res`: bytes each way and the error, if any), and
/// counts a failure.
pub(crate) fn report_stream(
    state: &State,
    n: u64,
    start: Instant,
    res: Result<(u64, u64, Option<std::io::Error>), String>,
) {
    let name = state.name;
    let took = short(start.elapsed());
    match res {
        Ok((sent, received, None)) => eprintln!(
            "nettool {name}: stream {n} closed after {took}: {sent} bytes sent, {received} bytes received"
        ),
        Ok((sent, received, Some(e))) => {
            state.counters.failed.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "nettool {name}: stream {n} failed after {took}: {e} ({sent} bytes sent, {received} bytes received)"
            )
        }
        Err(e) => {
            state.counters.failed.fetch_add(1, Ordering::Relaxed);
            eprintln!("nettool {name}: stream {n} failed: {e}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared setup

pub(crate) struct Peer {
    orch: Orchestrator,
    pub(crate) params: ConnectParams,
    /// Every address of the chosen server, and every server given (for resumes).
    addrs: Vec<std::net::SocketAddr>,
    servers: Vec<String>,
    /// The longest connect (also each resume's).
    overall: Duration,
    /// Relay-first's direct pairing named per pairing (an exposing side serves several
    /// forwarders, each its own session, at once).
    many_peers: bool,
    /// The sessions this peer runs (ended ones are pruned at each new link), to end them in
    /// order when the command stops ([`Peer::stop_all`]).
    sessions: std::sync::Mutex<Vec<nettool_peer::Completion>>,
    quiet: bool,
    /// Which side of a short code this peer is, if it uses one.
    code: Option<CodeSide>,
    /// What the next link joins with: `params`, or after a code's first link the session
    /// derived from the code ([`nettool_core::code::rejoin_params`]).
    next: std::sync::Mutex<ConnectParams>,
}

/// The command the other side of a short code runs: `prefix`, the servers, the code, `suffix`.
pub(crate) struct OtherSide<'a> {
    pub(crate) prefix: &'a str,
    pub(crate) suffix: &'a str,
}

/// The peer `name` (expose or forward) links as: its server, session and secret (or a short
/// code, for which `other` says what the other side runs), and an orchestrator over
/// `strategies` with `overall` as its deadline.
pub(crate) async fn prepare(
    settings: &mut Settings,
    peer_args: &PeerArgs,
    strategies: &[ConfiguredStrategy],
    (name, other): (&str, OtherSide<'_>),
    overall: Duration,
) -> Result<Peer> {
    let (server, all) = crate::choose_server(&settings.server).await?;
    let code = crate::use_code(peer_args, settings, &all, other.prefix, other.suffix).await?;
    let session = settings.session.clone().unwrap_or_default();
    if session.is_empty() {
        bail!("no session: give --session NAME (not empty) or set `session` in the config");
    }
    let Some(secret) = settings.secret.clone().filter(|s| !s.is_empty()) else {
        bail!(
            "nettool {name} needs a secret: give --secret K (or NETTOOL_SECRET, or `secret` in \
             the config), or leave out --session too for a short code; without a secret anyone \
             who knows the session name could reach the service"
        );
    };
    let control = crate::servers::control(settings)?;
    let orch = crate::peer_orchestrator(strategies, overall, settings, control);
    let params = ConnectParams {
        server,
        session,
        secret: Some(secret),
    };
    Ok(Peer {
        orch,
        addrs: all,
        servers: settings.server.clone(),
        overall,
        // The exposing side pairs with several forwarders under one session name: the
        // direct pairings are named per pairing, on both sides alike.
        many_peers: true,
        sessions: std::sync::Mutex::new(Vec::new()),
        next: std::sync::Mutex::new(params.clone()),
        params,
        quiet: !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        code,
    })
}

impl Peer {
    /// Links once, with the session of the next link: a session (relay-first, resumed under
    /// its stream), given as a link whose stream is the session's.
    pub(crate) async fn link(&self) -> (Option<Link>, Report) {
        let quiet = self.quiet;
        let params = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut peer = nettool_peer::Peer::builder()
            .chosen_server(params.server, self.addrs.clone())
            .session(params.session.clone())
            .orchestrator(self.orch.clone())
            .timeout(self.overall)
            .many_peers(self.many_peers)
            .on_event(move |e| crate::say(e, quiet));
        for s in &self.servers {
            peer = peer.server(s.clone());
        }
        if let Some(secret) = params.secret.clone() {
            peer = peer.secret(secret);
        }
        let connection = match peer.connect().await {
            Ok(c) => c,
            Err(nettool_peer::PeerError::NoLink(report)) => return (None, *report),
            Err(e) => {
                let report = Report {
                    session: params.session.clone(),
                    error: Some(e.to_string()),
                    ..Report::default()
                };
                return (None, report);
            }
        };
        if nettool_core::code::is_code_session(&params.session) {
            // A code links once; the same two peers link again under a session of their own.
            let (session, secret) = nettool_core::code::rejoin_params(
                &params.session,
                params.secret.as_deref().unwrap_or_default(),
            );
            *self
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = ConnectParams {
                session,
                secret: Some(secret),
                ..params
            };
        }
        let report = connection.report().clone();
        // The session runs in a task of its own until its stream ends; how it ended shows
        // as the streams' end.
        let (link, completion) = connection.into_session_link();
        {
            let mut sessions = self
                .sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            sessions.retain(|c| !c.is_finished());
            sessions.push(completion);
        }
        (Some(link), report)
    }

    /// Ends every session this peer runs in order (END to each peer, so the other side
    /// ends it at once instead of waiting out its resume timeout), waiting up to 3 s.
    pub(crate) async fn stop_all(&self) {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        for s in &sessions {
            s.stop();
        }
        let all = futures::future::join_all(sessions.into_iter().map(|s| s.finished()));
        let _ = tokio::time::timeout(Duration::from_secs(3), all).await;
    }

    /// When a connect ended on a wrong code: the error that stops this peer.
    pub(crate) fn wrong_code(&self, report: &Report) -> Result<()> {
        if report.wrong_code {
            bail!("{}", crate::wrong_code_message(self.code));
        }
        Ok(())
    }
}

/// A duration as seconds with one decimal (`2.5s`).
pub(crate) fn short(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
