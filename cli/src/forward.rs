//! `nettool expose` and `nettool forward`: carry many TCP connections over one link.
//!
//! `expose TARGET` keeps a session open for one forwarder at a time; `forward --listen ADDR`
//! accepts local TCP connections and carries each one as its own stream over the link to the
//! exposing side, which connects that stream to TARGET (and nowhere else: it is never an open
//! proxy). Each connection gets its own flow control, so a bulk transfer does not starve an
//! interactive session: on udp-quic every connection is a QUIC stream of the link's connection
//! (QUIC's per-stream windows); on the byte-stream links (TCP, relay) streams are multiplexed
//! with yamux inside the link's TLS.
//!
//! Wire format after the link handshake (all inside the authenticated link):
//! - forwarder → expose: `NTFWD1` `F` instance-id (16 bytes) heartbeat-timeout (u32 ms, BE);
//! - expose → forwarder: `NTFWD1` `O` (accepted) or `NTFWD1` `B` len (u16 BE) message (busy);
//! - then streams (QUIC streams, or yamux with the forwarder as the client), all opened by the
//!   forwarder. Its first stream is the heartbeat (`H`, then
//!   one byte per interval, echoed); every other stream starts with `C` and is answered with
//!   `0` (connected to TARGET) or `1` len (u16 BE) message (that stream failed), then raw bytes
//!   both ways with half-close.
//!
//! A link is dead when no heartbeat has come back (forwarder) or arrived (expose) for the
//! heartbeat timeout; both sides then drop it: open streams fail, the forwarder rejoins the
//! session and the exposing side, which always keeps a join waiting, links again. A forwarder
//! that rejoins before the exposing side noticed the old link's death is recognised by its
//! instance id and replaces its own stale link; any other forwarder gets "busy".

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::future::poll_fn;
use nettool_config::Settings;
use nettool_core::{ConnectParams, Link, LinkStream, LinkStreams, Orchestrator, Report};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::{orchestrator, progress, CodeSide, ConfiguredStrategy, PeerArgs};

const MAGIC: &[u8; 6] = b"NTFWD1";
/// Bound on the hello exchange and on a stream's first bytes.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the exposing side waits in the rendezvous for a forwarder before joining again.
const EXPOSE_WAIT: Duration = Duration::from_secs(3600);
const COPY_BUF: usize = 64 << 10;
/// yamux ends the whole connection when a stream beyond its maximum is opened (either way), so
/// the forwarder keeps its streams well below it and makes further connections wait.
const MAX_STREAMS: usize = 1024;
const MAX_OPEN_STREAMS: usize = 512;

/// Flags of `nettool expose`.
#[derive(Debug, Args)]
pub(crate) struct ExposeArgs {
    #[command(flatten)]
    pub(crate) peer: PeerArgs,
    /// The one service forwarded streams are connected to, HOST:PORT (e.g. 127.0.0.1:22).
    #[arg(value_name = "TARGET")]
    target: String,
    /// Keep a JSON report (links with their connect reports, stream and byte counters) in
    /// this file, rewritten as it changes.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

/// Flags of `nettool forward`.
#[derive(Debug, Args)]
pub(crate) struct ForwardArgs {
    #[command(flatten)]
    pub(crate) peer: PeerArgs,
    /// Local address to accept TCP connections on (e.g. 127.0.0.1:2222).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// How long a new local connection waits for a link (at start or while rejoining).
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    wait: Duration,
    /// A link is declared dead when no heartbeat answer came for this long (one heartbeat
    /// goes each fifth of it); both sides then rejoin.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    heartbeat_timeout: Duration,
    /// Keep a JSON report (links with their connect reports, stream and byte counters) in
    /// this file, rewritten as it changes.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Counters and the report

#[derive(Debug, Default)]
struct Counters {
    streams: AtomicU64,
    failed: AtomicU64,
    active: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
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
struct State {
    name: &'static str,
    endpoint: String,
    counters: Counters,
    links: Mutex<Vec<LinkEntry>>,
    failed_connects: Mutex<Vec<String>>,
    report: Option<PathBuf>,
    next_stream: AtomicU64,
}

impl State {
    fn new(name: &'static str, endpoint: String, report: Option<PathBuf>) -> Arc<Self> {
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

    fn total_line(&self) -> String {
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
    fn write_report(&self) {
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

    fn link_up(&self, report: Report, multiplexer: &'static str) -> usize {
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

    fn link_down(&self, index: usize, why: &str) {
        if let Some(l) = self.links.lock().expect("links poisoned").get_mut(index) {
            l.ended = Some(why.to_owned());
        }
        self.write_report();
    }

    fn link_stream(&self, index: usize) {
        if let Some(l) = self.links.lock().expect("links poisoned").get_mut(index) {
            l.streams += 1;
        }
    }

    fn connect_failed(&self, why: String) {
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
fn spawn_report_writer(state: &Arc<State>) {
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

// ---------------------------------------------------------------------------------------------
// Byte pumping with counters and half-close

async fn copy_counted<R, W>(
    mut r: R,
    mut w: W,
    total: &AtomicU64,
    mine: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        mine.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Half-close: the other direction goes on.
    w.shutdown().await
}

/// Copies `local` <-> `remote` (a mux stream) until both directions ended; counts bytes.
/// Returns (sent to the peer, received from the peer).
async fn pump<S>(local: TcpStream, remote: S, c: &Counters) -> (u64, u64, Option<std::io::Error>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (lr, lw) = local.into_split();
    let (rr, rw) = tokio::io::split(remote);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let res = tokio::try_join!(
        copy_counted(lr, rw, &c.sent, &sent),
        copy_counted(rr, lw, &c.received, &received),
    );
    (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        res.err(),
    )
}

// ---------------------------------------------------------------------------------------------
// The multiplexer

type Stream = Box<dyn LinkStream>;
type OpenReply = oneshot::Sender<Result<Stream, String>>;

/// The name of what carries a link's streams (in the report and on stderr).
fn multiplexer(link: &Link) -> &'static str {
    if link.streams().is_some() {
        "quic"
    } else {
        "yamux"
    }
}

/// Runs the streams of `link`: opens outbound streams on request, hands inbound streams to
/// `inbound`. Ends (with the reason) when the link does. A link with its own streams (QUIC)
/// uses them; any other runs yamux over its byte stream.
async fn drive_mux(
    link: Link,
    mode: yamux::Mode,
    open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::UnboundedSender<Stream>,
) -> String {
    match link.streams() {
        Some(streams) => drive_streams(link.stream, streams, open, inbound).await,
        None => drive_yamux(link.stream, mode, open, inbound).await,
    }
}

/// [`drive_mux`] on the link's own streams. `main` (the stream the link handshake ran on)
/// owns the connection: it is kept until the link ends.
async fn drive_streams(
    main: Box<dyn LinkStream>,
    streams: Arc<dyn LinkStreams>,
    mut open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::UnboundedSender<Stream>,
) -> String {
    let _main = main;
    let mut requests = true;
    loop {
        tokio::select! {
            r = open.recv(), if requests => match r {
                Some(reply) => {
                    // Opening waits while the peer's stream limit is reached: not here.
                    let streams = streams.clone();
                    tokio::spawn(async move {
                        let s = streams.open().await;
                        let _ = reply.send(s.map_err(|e| format!("cannot open a stream: {e}")));
                    });
                }
                None => requests = false,
            },
            s = streams.accept() => match s {
                Ok(Some(s)) => {
                    let _ = inbound.send(s);
                }
                Ok(None) => return "the peer closed the link".to_owned(),
                Err(e) => return format!("the link failed: {e}"),
            },
        }
    }
}

/// [`drive_mux`] with yamux over the link's byte stream.
/// Largest yamux frame: bigger frames cost fewer headers, wake-ups and TLS records per byte
/// (yamux's 16 KiB default caps a stream at about 550 MB/s here); 128 KiB keeps a bulk
/// stream's frames short enough that an interactive stream's frames interleave.
const YAMUX_SPLIT: usize = 128 * 1024;

async fn drive_yamux(
    link: Box<dyn LinkStream>,
    mode: yamux::Mode,
    mut open: mpsc::Receiver<OpenReply>,
    inbound: mpsc::UnboundedSender<Stream>,
) -> String {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_STREAMS);
    config.set_split_send_size(YAMUX_SPLIT);
    let mut conn = yamux::Connection::new(link.compat(), config, mode);
    let mut waiting: std::collections::VecDeque<OpenReply> = Default::default();
    let mut requests = true;
    poll_fn(|cx| loop {
        while requests {
            match open.poll_recv(cx) {
                std::task::Poll::Ready(Some(r)) => waiting.push_back(r),
                std::task::Poll::Ready(None) => requests = false,
                std::task::Poll::Pending => break,
            }
        }
        while !waiting.is_empty() {
            match conn.poll_new_outbound(cx) {
                std::task::Poll::Ready(Ok(s)) => {
                    let r = waiting.pop_front().expect("not empty");
                    let _ = r.send(Ok(Box::new(s.compat())));
                }
                std::task::Poll::Ready(Err(e)) => {
                    for r in waiting.drain(..) {
                        let _ = r.send(Err(format!("cannot open a stream: {e}")));
                    }
                    return std::task::Poll::Ready(format!("the link failed: {e}"));
                }
                std::task::Poll::Pending => break,
            }
        }
        match conn.poll_next_inbound(cx) {
            std::task::Poll::Ready(Some(Ok(s))) => {
                let _ = inbound.send(Box::new(s.compat()));
            }
            std::task::Poll::Ready(Some(Err(e))) => {
                return std::task::Poll::Ready(format!("the link failed: {e}"))
            }
            std::task::Poll::Ready(None) => {
                return std::task::Poll::Ready("the peer closed the link".to_owned())
            }
            std::task::Poll::Pending => return std::task::Poll::Pending,
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Shared setup

struct Peer {
    orch: Orchestrator,
    params: ConnectParams,
    quiet: bool,
    /// Which side of a short code this peer is, if it uses one.
    code: Option<CodeSide>,
    /// What the next link joins with: `params`, or after a code's first link the session
    /// derived from the code ([`nettool_core::code::rejoin_params`]).
    next: std::sync::Mutex<ConnectParams>,
}

/// The command the other side of a short code runs: `prefix`, the servers, the code, `suffix`.
struct OtherSide<'a> {
    prefix: &'a str,
    suffix: &'a str,
}

async fn prepare(
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
    let orch = orchestrator(strategies, overall)
        .with_server_token(settings.server_token.clone())
        .with_control(crate::servers::control(settings)?)
        .with_plan(settings.plan)
        .with_nat_cache(crate::nat_cache(settings))
        .with_server_addresses(all);
    let params = ConnectParams {
        server,
        session,
        secret: Some(secret),
    };
    Ok(Peer {
        orch,
        next: std::sync::Mutex::new(params.clone()),
        params,
        quiet: !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        code,
    })
}

impl Peer {
    async fn link(&self) -> (Option<Link>, Report) {
        let quiet = self.quiet;
        let params = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (link, report) = self
            .orch
            .connect(&params, &|e| {
                if !quiet {
                    progress(e)
                }
            })
            .await;
        if link.is_some() && nettool_core::code::is_code_session(&params.session) {
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
        (link, report)
    }

    /// When a connect ended on a wrong code: the error that stops this peer.
    fn wrong_code(&self, report: &Report) -> Result<()> {
        if report.wrong_code {
            bail!("{}", crate::wrong_code_message(self.code));
        }
        Ok(())
    }
}

fn short(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// expose

/// The forwarder a link currently serves.
struct Current {
    id: [u8; 16],
    generation: u64,
    stop: Arc<Notify>,
}

/// `nettool expose`.
pub(crate) async fn expose(
    args: ExposeArgs,
    settings: Settings,
    strategies: &[ConfiguredStrategy],
) -> Result<i32> {
    let target = args.target.trim().to_owned();
    match target.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
        _ => bail!("bad TARGET '{target}': give HOST:PORT, e.g. 127.0.0.1:22"),
    }
    let mut settings = settings;
    let timeout = settings.timeout;
    let other = OtherSide {
        prefix: "nettool forward --listen 127.0.0.1:PORT",
        suffix: "",
    };
    let peer = prepare(
        &mut settings,
        &args.peer,
        strategies,
        ("expose", other),
        EXPOSE_WAIT + timeout,
    )
    .await?;
    let state = State::new("expose", target.clone(), args.report.clone());
    spawn_report_writer(&state);
    let current: Arc<Mutex<Option<Current>>> = Arc::new(Mutex::new(None));
    let generation = AtomicU64::new(0);
    eprintln!(
        "nettool expose: exposing {target} as session '{}' on {}; waiting for a forwarder",
        peer.params.session, peer.params.server
    );
    let serve = async {
        let mut backoff = Duration::from_millis(200);
        loop {
            let (link, report) = peer.link().await;
            let Some(link) = link else {
                peer.wrong_code(&report)?;
                let why = report.error.clone().unwrap_or_else(|| "no link".into());
                // Right after a link both peers leave the session; a rejoin that arrives
                // before the server saw that gets "already has two peers": retry soon.
                // A waiting join also ends when the server expires it: join again quietly.
                if !why.contains("already has two peers") && !why.contains("expired") {
                    eprintln!("nettool expose: no link: {why}; joining again");
                }
                state.connect_failed(why);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            };
            backoff = Duration::from_millis(200);
            let gen = generation.fetch_add(1, Ordering::Relaxed) + 1;
            tokio::spawn(serve_forwarder(
                link,
                report,
                state.clone(),
                current.clone(),
                gen,
                target.clone(),
            ));
        }
    };
    let res: Result<()> = tokio::select! {
        r = serve => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("nettool expose: interrupted, stopping");
            Ok(())
        }
    };
    eprintln!("{}", state.total_line());
    state.write_report();
    res.map(|()| 0)
}

async fn serve_forwarder(
    mut link: Link,
    report: Report,
    state: Arc<State>,
    current: Arc<Mutex<Option<Current>>>,
    gen: u64,
    target: String,
) {
    let via = format!("{} via {}", link.remote, link.strategy);
    // Hello from the forwarder.
    let hello = tokio::time::timeout(SETUP_TIMEOUT, async {
        let mut h = [0u8; 27];
        link.stream.read_exact(&mut h).await?;
        Ok::<_, std::io::Error>(h)
    })
    .await;
    let h = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return eprintln!("nettool expose: link {via}: no hello: {e}"),
        Err(_) => {
            return eprintln!(
                "nettool expose: link {via}: no hello within {}",
                short(SETUP_TIMEOUT)
            )
        }
    };
    if &h[..6] != MAGIC || h[6] != b'F' {
        let what = if &h[..6] == MAGIC {
            "the peer is not a forwarder (is `nettool expose` running on both sides?)"
        } else {
            "the peer does not speak the forward protocol (is it `nettool connect`?)"
        };
        eprintln!("nettool expose: link {via}: {what}");
        return;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[7..23]);
    let hb_ms = u32::from_be_bytes([h[23], h[24], h[25], h[26]]);
    let hb_timeout = Duration::from_millis(u64::from(hb_ms.clamp(500, 600_000)));
    let stop = Arc::new(Notify::new());
    let busy = {
        let mut cur = current.lock().expect("current poisoned");
        match cur.as_ref() {
            Some(c) if c.id != id => true,
            other => {
                if let Some(c) = other {
                    eprintln!("nettool expose: the forwarder rejoined; dropping its old link");
                    c.stop.notify_one();
                }
                *cur = Some(Current {
                    id,
                    generation: gen,
                    stop: stop.clone(),
                });
                false
            }
        }
    };
    if busy {
        eprintln!("nettool expose: refused a second forwarder ({via}): busy");
        let msg = b"busy: this session already serves another forwarder";
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(b'B');
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
        let _ = tokio::time::timeout(SETUP_TIMEOUT, async {
            link.stream.write_all(&out).await?;
            link.stream.shutdown().await
        })
        .await;
        return;
    }
    let mut ok = MAGIC.to_vec();
    ok.push(b'O');
    if let Err(e) = link.stream.write_all(&ok).await {
        eprintln!("nettool expose: link {via}: {e}");
        clear_current(&current, gen);
        return;
    }
    let mux = multiplexer(&link);
    eprintln!("nettool expose: serving a forwarder linked {via} (streams: {mux})");
    let index = state.link_up(report, mux);
    state.write_report();

    let (_open_tx, open_rx) = mpsc::channel::<OpenReply>(1);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel();
    let driver = drive_mux(link, yamux::Mode::Server, open_rx, in_tx);
    tokio::pin!(driver);
    let work = async {
        // The first stream is the heartbeat.
        let first = tokio::time::timeout(hb_timeout, in_rx.recv()).await;
        let Ok(Some(mut hb)) = first else {
            return format!("no heartbeat stream within {}", short(hb_timeout));
        };
        let mut tag = [0u8; 1];
        match tokio::time::timeout(hb_timeout, hb.read_exact(&mut tag)).await {
            Ok(Ok(_)) if tag[0] == b'H' => {}
            _ => return "the first stream was not the heartbeat".to_owned(),
        }
        let heartbeat = async {
            let mut b = [0u8; 64];
            loop {
                match tokio::time::timeout(hb_timeout, hb.read(&mut b)).await {
                    Err(_) => return format!("no heartbeat for {}", short(hb_timeout)),
                    Ok(Ok(0)) => return "the heartbeat stream ended".to_owned(),
                    Ok(Err(e)) => return format!("heartbeat: {e}"),
                    Ok(Ok(n)) => {
                        if let Err(e) = hb.write_all(&b[..n]).await {
                            return format!("heartbeat: {e}");
                        }
                    }
                }
            }
        };
        tokio::pin!(heartbeat);
        loop {
            tokio::select! {
                why = &mut heartbeat => return why,
                s = in_rx.recv() => match s {
                    Some(s) => {
                        state.link_stream(index);
                        tokio::spawn(expose_stream(s, state.clone(), target.clone()));
                    }
                    None => return "the link ended".to_owned(),
                },
            }
        }
    };
    let why = tokio::select! {
        why = &mut driver => why,
        why = work => why,
        () = stop.notified() => "replaced by the same forwarder's new link".to_owned(),
    };
    clear_current(&current, gen);
    eprintln!("nettool expose: link {via} ended: {why}; waiting for a forwarder");
    state.link_down(index, &why);
    eprintln!("{}", state.total_line());
}

fn clear_current(current: &Mutex<Option<Current>>, gen: u64) {
    let mut cur = current.lock().expect("current poisoned");
    if cur.as_ref().is_some_and(|c| c.generation == gen) {
        *cur = None;
    }
}

async fn expose_stream(mut s: Stream, state: Arc<State>, target: String) {
    let n = state.next_stream.fetch_add(1, Ordering::Relaxed);
    let c = &state.counters;
    c.streams.fetch_add(1, Ordering::Relaxed);
    c.active.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let res: Result<(u64, u64, Option<std::io::Error>), String> = async {
        let mut tag = [0u8; 1];
        match tokio::time::timeout(SETUP_TIMEOUT, s.read_exact(&mut tag)).await {
            Ok(Ok(_)) if tag[0] == b'C' => {}
            Ok(Ok(_)) => return Err(format!("unknown stream kind {:#04x}", tag[0])),
            Ok(Err(e)) => return Err(format!("no stream header: {e}")),
            Err(_) => return Err("no stream header in time".into()),
        }
        let conn = tokio::time::timeout(SETUP_TIMEOUT, TcpStream::connect(&target)).await;
        let tcp = match conn {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let msg = format!("the exposing side cannot connect to {target}: {e}");
                refuse_stream(&mut s, &msg).await;
                return Err(msg);
            }
            Err(_) => {
                let msg = format!(
                    "the exposing side cannot connect to {target}: no answer within {}",
                    short(SETUP_TIMEOUT)
                );
                refuse_stream(&mut s, &msg).await;
                return Err(msg);
            }
        };
        let _ = tcp.set_nodelay(true);
        s.write_all(&[0]).await.map_err(|e| e.to_string())?;
        Ok(pump(tcp, s, c).await)
    }
    .await;
    c.active.fetch_sub(1, Ordering::Relaxed);
    report_stream(&state, n, start, res);
}

async fn refuse_stream(s: &mut Stream, msg: &str) {
    let bytes = msg.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    let mut out = vec![1u8];
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..len]);
    let _ = tokio::time::timeout(SETUP_TIMEOUT, async {
        s.write_all(&out).await?;
        s.shutdown().await
    })
    .await;
}

fn report_stream(
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
// forward

/// What local connections use to open a stream on the current link.
type Opener = mpsc::Sender<OpenReply>;

/// `nettool forward`.
pub(crate) async fn forward(
    args: ForwardArgs,
    settings: Settings,
    strategies: &[ConfiguredStrategy],
) -> Result<i32> {
    let mut settings = settings;
    let timeout = settings.timeout;
    let other = OtherSide {
        prefix: "nettool expose",
        suffix: "TARGET",
    };
    let peer = prepare(
        &mut settings,
        &args.peer,
        strategies,
        ("forward", other),
        timeout,
    )
    .await?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listen = listener.local_addr()?;
    let state = State::new("forward", listen.to_string(), args.report.clone());
    spawn_report_writer(&state);
    eprintln!(
        "nettool forward: listening on {listen}; linking to session '{}' on {}",
        peer.params.session, peer.params.server
    );
    let (link_tx, link_rx) = watch::channel::<Option<Opener>>(None);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN_STREAMS));
    tokio::spawn(accept_loop(
        listener,
        link_rx,
        state.clone(),
        slots,
        args.wait,
    ));
    let mut id = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut id);
    let hb_timeout = args.heartbeat_timeout.max(Duration::from_millis(500));
    let run = async {
        let mut backoff = Duration::from_millis(200);
        let mut first = true;
        loop {
            if !first {
                wait_for_server(peer.params.server).await;
            }
            first = false;
            let (link, report) = peer.link().await;
            let Some(link) = link else {
                peer.wrong_code(&report)?;
                let why = report.error.clone().unwrap_or_else(|| "no link".into());
                eprintln!("nettool forward: no link: {why}; trying again");
                state.connect_failed(why);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            };
            backoff = Duration::from_millis(200);
            match run_forward_link(link, report, &state, &link_tx, id, hb_timeout).await {
                Ok(why) => {
                    eprintln!("nettool forward: link lost: {why}; rejoining");
                    eprintln!("{}", state.total_line());
                }
                Err(e) => return Err(e),
            }
        }
    };
    let res = tokio::select! {
        r = run => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("nettool forward: interrupted, stopping");
            Ok(())
        }
    };
    eprintln!("{}", state.total_line());
    state.write_report();
    res.map(|()| 0)
}

/// Waits until a TCP connection to the rendezvous server succeeds (after a path outage a
/// join's SYN may otherwise sit in exponential backoff for many seconds).
async fn wait_for_server(server: SocketAddr) {
    loop {
        let t = Instant::now();
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(server)).await
        {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(t.elapsed())).await;
    }
}

/// Serves one link until it dies; `Ok(reason)` means rejoin, `Err` means stop.
async fn run_forward_link(
    mut link: Link,
    report: Report,
    state: &Arc<State>,
    link_tx: &watch::Sender<Option<Opener>>,
    id: [u8; 16],
    hb_timeout: Duration,
) -> Result<String> {
    let via = format!("{} via {}", link.remote, link.strategy);
    let mut hello = MAGIC.to_vec();
    hello.push(b'F');
    hello.extend_from_slice(&id);
    let ms = u32::try_from(hb_timeout.as_millis()).unwrap_or(u32::MAX);
    hello.extend_from_slice(&ms.to_be_bytes());
    let answer = tokio::time::timeout(SETUP_TIMEOUT, async {
        link.stream.write_all(&hello).await?;
        let mut a = [0u8; 7];
        link.stream.read_exact(&mut a).await?;
        if &a[..6] != MAGIC {
            return Ok(Err(
                "the peer does not speak the forward protocol (is it `nettool connect`?)"
                    .to_owned(),
            ));
        }
        match a[6] {
            b'O' => Ok::<_, std::io::Error>(Ok(())),
            b'B' => {
                let mut l = [0u8; 2];
                link.stream.read_exact(&mut l).await?;
                let mut m = vec![0u8; usize::from(u16::from_be_bytes(l))];
                link.stream.read_exact(&mut m).await?;
                Ok(Err(format!(
                    "the exposing side refused: {}",
                    String::from_utf8_lossy(&m)
                )))
            }
            b'F' => Ok(Err(
                "the peer is another forwarder: run `nettool expose` on the other side".to_owned(),
            )),
            other => Ok(Err(format!("unknown answer {other:#04x} from the peer"))),
        }
    })
    .await;
    match answer {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(refusal))) => bail!("{refusal}"),
        Ok(Err(e)) => return Ok(format!("hello over the link {via} failed: {e}")),
        Err(_) => {
            return Ok(format!(
                "no answer to the hello over {via} within {}",
                short(SETUP_TIMEOUT)
            ))
        }
    }
    let mux = multiplexer(&link);
    eprintln!("nettool forward: linked {via}; forwarding (streams: {mux})");
    let index = state.link_up(report, mux);
    state.write_report();
    let (open_tx, open_rx) = mpsc::channel::<OpenReply>(64);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Stream>();
    let driver = drive_mux(link, yamux::Mode::Client, open_rx, in_tx);
    tokio::pin!(driver);
    let work = async {
        // Inbound streams are not part of the protocol: drop them.
        let drop_inbound = async { while in_rx.recv().await.is_some() {} };
        let (tx, rx) = oneshot::channel();
        if open_tx.send(tx).await.is_err() {
            return "the link ended".to_owned();
        }
        let mut hb = match rx.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return e,
            Err(_) => return "the link ended".to_owned(),
        };
        if let Err(e) = hb.write_all(b"H").await {
            return format!("heartbeat: {e}");
        }
        let _ = link_tx.send(Some(open_tx.clone()));
        let (mut hr, mut hw) = tokio::io::split(hb);
        let interval = hb_timeout / 5;
        let ping = async {
            loop {
                tokio::time::sleep(interval).await;
                if let Err(e) = hw.write_all(&[1]).await {
                    return format!("heartbeat: {e}");
                }
            }
        };
        let pong = async {
            let mut b = [0u8; 64];
            loop {
                match tokio::time::timeout(hb_timeout, hr.read(&mut b)).await {
                    Err(_) => return format!("no heartbeat answer for {}", short(hb_timeout)),
                    Ok(Ok(0)) => return "the heartbeat stream ended".to_owned(),
                    Ok(Err(e)) => return format!("heartbeat: {e}"),
                    Ok(Ok(_)) => {}
                }
            }
        };
        tokio::select! {
            why = ping => why,
            why = pong => why,
            () = drop_inbound => "the link ended".to_owned(),
        }
    };
    let why = tokio::select! {
        why = &mut driver => why,
        why = work => why,
    };
    let _ = link_tx.send(None);
    state.link_down(index, &why);
    Ok(why)
}

async fn accept_loop(
    listener: TcpListener,
    link: watch::Receiver<Option<Opener>>,
    state: Arc<State>,
    slots: Arc<tokio::sync::Semaphore>,
    wait: Duration,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, from)) => {
                let (link, state, slots) = (link.clone(), state.clone(), slots.clone());
                tokio::spawn(forward_stream(tcp, from, link, state, slots, wait));
            }
            Err(e) => {
                // E.g. out of file descriptors: keep serving the connections we have.
                eprintln!("nettool forward: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn forward_stream(
    tcp: TcpStream,
    from: SocketAddr,
    mut link: watch::Receiver<Option<Opener>>,
    state: Arc<State>,
    slots: Arc<tokio::sync::Semaphore>,
    wait: Duration,
) {
    let n = state.next_stream.fetch_add(1, Ordering::Relaxed);
    let c = &state.counters;
    c.streams.fetch_add(1, Ordering::Relaxed);
    c.active.fetch_add(1, Ordering::Relaxed);
    let _ = tcp.set_nodelay(true);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    let mut _slot = None;
    let res: Result<(u64, u64, Option<std::io::Error>), String> = async {
        _slot = Some(
            tokio::time::timeout_at(deadline, slots.acquire_owned())
                .await
                .map_err(|_| {
                    format!(
                        "{MAX_OPEN_STREAMS} streams are open; none closed within {}",
                        short(wait)
                    )
                })?
                .map_err(|_| "stopping".to_owned())?,
        );
        // Open a stream on the current link, waiting for one (up to `wait`).
        let mut s = loop {
            let opener = tokio::time::timeout_at(deadline, link.wait_for(Option::is_some))
                .await
                .map_err(|_| format!("no link within {} (from {from})", short(wait)))?
                .map_err(|_| "stopping".to_owned())?
                .clone()
                .expect("waited for some");
            let (tx, rx) = oneshot::channel();
            if opener.send(tx).await.is_err() {
                // The link just died; wait for the next one.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            match rx.await {
                Ok(Ok(s)) => break s,
                _ => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(format!("no link within {} (from {from})", short(wait)));
                    }
                }
            }
        };
        let status = tokio::time::timeout(SETUP_TIMEOUT, async {
            s.write_all(b"C").await?;
            let mut st = [0u8; 1];
            s.read_exact(&mut st).await?;
            if st[0] == 0 {
                return Ok(None);
            }
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await?;
            let mut m = vec![0u8; usize::from(u16::from_be_bytes(l))];
            s.read_exact(&mut m).await?;
            Ok::<_, std::io::Error>(Some(String::from_utf8_lossy(&m).into_owned()))
        })
        .await;
        match status {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(refusal))) => return Err(refusal),
            Ok(Err(e)) => return Err(format!("stream setup failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "no answer from the exposing side within {}",
                    short(SETUP_TIMEOUT)
                ))
            }
        }
        Ok(pump(tcp, s, c).await)
    }
    .await;
    c.active.fetch_sub(1, Ordering::Relaxed);
    report_stream(&state, n, start, res);
}
