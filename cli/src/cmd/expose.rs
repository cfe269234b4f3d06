//! `nettool expose`: makes one local service (TARGET) reachable by `nettool forward` peers,
//! each forwarder in a session of its own, several at once (`crate::forwarding` has the wire
//! format and what both share).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use nettool_config::Settings;
use nettool_core::{Link, Report};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::forwarding::mux::{drive_mux, multiplexer, pump, OpenReply, Stream};
use crate::forwarding::{
    prepare, report_stream, short, spawn_report_writer, OtherSide, State, MAGIC, SETUP_TIMEOUT,
};
use crate::{ConfiguredStrategy, PeerArgs};

/// How long the exposing side waits in the rendezvous for a forwarder before joining again.
const EXPOSE_WAIT: Duration = Duration::from_secs(3600);

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
            // Each forwarder its own session; the next join waits at once.
            tokio::spawn(serve_forwarder(link, report, state.clone(), target.clone()));
        }
    };
    let res: Result<()> = tokio::select! {
        r = serve => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("nettool expose: interrupted, stopping");
            peer.stop_all().await;
            Ok(())
        }
    };
    eprintln!("{}", state.total_line());
    state.write_report();
    res.map(|()| 0)
}

async fn serve_forwarder(mut link: Link, report: Report, state: Arc<State>, target: String) {
    let via = format!("{} via {}", link.remote, link.strategy);
    // Hello from the forwarder.
    let hello = tokio::time::timeout(SETUP_TIMEOUT, async {
        let mut h = [0u8; 23];
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
            "the peer does not speak this forward protocol (an older nettool, or `nettool \
             connect`?)"
        };
        eprintln!("nettool expose: link {via}: {what}");
        return;
    }
    let mut ok = MAGIC.to_vec();
    ok.push(b'O');
    if let Err(e) = link.stream.write_all(&ok).await {
        eprintln!("nettool expose: link {via}: {e}");
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
        while let Some(s) = in_rx.recv().await {
            state.link_stream(index);
            tokio::spawn(expose_stream(s, state.clone(), target.clone()));
        }
        "the link ended".to_owned()
    };
    let why = tokio::select! {
        why = &mut driver => why,
        why = work => why,
    };
    eprintln!("nettool expose: link {via} ended: {why}");
    state.link_down(index, &why);
    eprintln!("{}", state.total_line());
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
