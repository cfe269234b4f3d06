//! `nettool forward`: accepts local TCP connections and carries each one as its own stream
//! over one link to `nettool expose` (`crate::forwarding` has the wire format and what both
//! share).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nettool_config::Settings;
use nettool_core::{Link, Report};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::forwarding::mux::{drive_mux, multiplexer, pump, OpenReply, Stream, MAX_OPEN_STREAMS};
use crate::forwarding::{
    prepare, report_stream, short, spawn_report_writer, OtherSide, State, MAGIC, SETUP_TIMEOUT,
};
use crate::{ConfiguredStrategy, PeerArgs};

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
    /// Keep a JSON report (links with their connect reports, stream and byte counters) in
    /// this file, rewritten as it changes.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

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
            match run_forward_link(link, report, &state, &link_tx, id).await {
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
            peer.stop_all().await;
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

/// Serves one session until it ends; `Ok(reason)` means link again, `Err` means stop.
async fn run_forward_link(
    mut link: Link,
    report: Report,
    state: &Arc<State>,
    link_tx: &watch::Sender<Option<Opener>>,
    id: [u8; 16],
) -> Result<String> {
    let via = format!("{} via {}", link.remote, link.strategy);
    let mut hello = MAGIC.to_vec();
    hello.push(b'F');
    hello.extend_from_slice(&id);
    let answer = tokio::time::timeout(SETUP_TIMEOUT, async {
        link.stream.write_all(&hello).await?;
        let mut a = [0u8; 7];
        link.stream.read_exact(&mut a).await?;
        if &a[..6] != MAGIC {
            return Ok(Err(
                "the peer does not speak this forward protocol (an older nettool, or `nettool \
                 connect`?)"
                    .to_owned(),
            ));
        }
        match a[6] {
            b'O' => Ok::<_, std::io::Error>(Ok(())),
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
    let _ = link_tx.send(Some(open_tx));
    let driver = drive_mux(link, yamux::Mode::Client, open_rx, in_tx);
    // Inbound streams are not part of the protocol: dropped (this ends with the driver).
    let drop_inbound = async { while in_rx.recv().await.is_some() {} };
    let (why, ()) = tokio::join!(driver, drop_inbound);
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
