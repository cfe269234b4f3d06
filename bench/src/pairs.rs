//! `nettool-bench --section pairs`: many relay-first pairs at once through one server, through
//! the library API (`nettool_peer`), as a program that embeds nettool would run them.
//!
//! One rendezvous server in a child process (its RSS and CPU read from `/proc/<pid>`), the
//! peers in a few worker processes of this binary (at most [`PAIRS_PER_WORKER`] pairs each:
//! a process's open files are limited, 20,000 on this machine, and a peer at its busiest holds
//! a dozen or more): `--pair-count` pairs (default 1,000: 2,000 peers) connect at once,
//! each with the default strategies and relay-first (so each pair starts on the server's
//! relay, and moves to a direct path when one links), over the control channel's TLS. Each
//! side writes `--pair-size` bytes (default 1 MiB, a pattern of its own) and reads the other's
//! to the end; a pair is intact when both read exactly the other's bytes and both sessions end
//! with every byte confirmed (`Finished::succeeded`). The target: every pair intact. Printed:
//! the wall time, how many pairs ended on a direct path or the relay, the server's peak RSS and
//! its CPU seconds over the run, the workers' peak RSS. A pair that has not finished within
//! [`PAIR_LIMIT`] counts as failed (the run never hangs).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use nettool_core::control::{ControlSecurity, ServerTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::capacity::{proc_cpu_seconds, raise_nofile};
use super::cli_path::proc_status_kib;
use super::server_proc::ServerProc;

/// Open files one peer may hold at its busiest (control and relay connections, the direct
/// half's join, prepared ports and their observations, STUN sockets, the direct link).
const FILES_PER_PEER: u64 = 30;
/// Pairs one worker process runs.
const PAIRS_PER_WORKER: usize = 250;
/// Pairs of a worker that link at the same time (the others wait their turn; all stay open).
const CONNECTING: usize = 32;
/// A pair that has not finished by then counts as failed.
const PAIR_LIMIT: Duration = Duration::from_secs(300);

/// What a worker prints (one JSON line on stdout) for its pairs.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    intact: usize,
    /// Bytes the intact pairs received over the relay, and in all.
    relayed_bytes: u64,
    received_bytes: u64,
    problems: Vec<String>,
    peak_rss_kib: u64,
}

/// What one pair gave.
struct PairRun {
    intact: bool,
    /// Bytes both sides received over the relay, and in all.
    relayed: (u64, u64),
    problem: Option<String>,
}

/// The byte at `offset` of side `side` of pair `pair`'s stream.
fn pattern(pair: usize, side: u8, offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (pair as u64).wrapping_mul(131) ^ (u64::from(side) * 7)) as u8
}

/// One side: writes its bytes and reads the other's at once; says on `delivered` when all of
/// the other's bytes are in (checked), ends its direction at `go` and reads to the end. The
/// bytes that came over the relay, of those that came, when the session succeeded.
async fn one_side(
    (stream, completion): Side,
    (pair, side, size): (usize, u8, u64),
    delivered: tokio::sync::oneshot::Sender<bool>,
    mut go: tokio::sync::watch::Receiver<bool>,
) -> Result<(u64, u64), String> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0u64;
        while sent < size {
            let n = (size - sent).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(pair, side, sent + i as u64);
            }
            writer
                .write_all(&buf[..n])
                .await
                .map_err(|e| e.to_string())?;
            sent += n as u64;
        }
        writer.flush().await.map_err(|e| e.to_string())?;
        let _ = go.wait_for(|g| *g).await;
        writer.shutdown().await.map_err(|e| e.to_string())
    };
    let read = async {
        let mut delivered = Some(delivered);
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0u64;
        let res = loop {
            let n = match reader.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => break Err(e.to_string()),
            };
            if n == 0 {
                break Ok(());
            }
            if let Some(i) = (0..n).find(|i| buf[*i] != pattern(pair, 1 - side, got + *i as u64)) {
                break Err(format!("byte {} differs", got + i as u64));
            }
            got += n as u64;
            if got == size {
                if let Some(d) = delivered.take() {
                    let _ = d.send(true);
                }
            }
        };
        if let Some(d) = delivered.take() {
            let _ = d.send(false);
        }
        res?;
        if got != size {
            return Err(format!("read {got} bytes of {size}"));
        }
        Ok(())
    };
    let (w, r) = tokio::join!(write, read);
    let finished = completion.finished().await;
    let paths = &finished.report.paths;
    if !finished.succeeded() || w.is_err() || r.is_err() {
        let names: Vec<&str> = paths.iter().map(|p| p.strategy.as_str()).collect();
        return Err(format!(
            "the session ended {:?} (paths {}; resumes {}); write {w:?}, read {r:?}",
            finished.end.kind,
            names.join(">"),
            finished.report.resumes.len()
        ));
    }
    let relayed = paths
        .iter()
        .filter(|p| p.strategy == "relay")
        .map(|p| p.bytes_received)
        .sum();
    let all = paths.iter().map(|p| p.bytes_received).sum();
    Ok((relayed, all))
}

/// How a worker's pairs start: at most `connecting` link at once; each pair's bytes flow as
/// soon as it is linked (as a user's first bytes do, over the relay until a direct path is
/// ready), and its sessions stay open until `go`, which comes when every pair of every worker
/// has its bytes: all pairs are open at once.
#[derive(Clone)]
struct Start {
    connecting: Arc<tokio::sync::Semaphore>,
    settled: tokio::sync::mpsc::UnboundedSender<bool>,
    go: tokio::sync::watch::Receiver<bool>,
}

async fn one_pair(server: SocketAddr, pair: usize, size: u64, start: Start) -> PairRun {
    let (a, b) = match link_pair(server, pair, &start.connecting).await {
        Ok(x) => x,
        Err(problem) => {
            let _ = start.settled.send(false);
            return PairRun {
                intact: false,
                relayed: (0, 0),
                problem: Some(problem),
            };
        }
    };
    let (da, ra) = tokio::sync::oneshot::channel();
    let (db, rb) = tokio::sync::oneshot::channel();
    let settled = start.settled.clone();
    let (ra, rb, ()) = tokio::join!(
        one_side(a, (pair, 0, size), da, start.go.clone()),
        one_side(b, (pair, 1, size), db, start.go.clone()),
        async move {
            let (a, b) = tokio::join!(ra, rb);
            let _ = settled.send(a.unwrap_or(false) && b.unwrap_or(false));
        }
    );
    match (ra, rb) {
        (Ok(a), Ok(b)) => PairRun {
            intact: true,
            relayed: (a.0 + b.0, a.1 + b.1),
            problem: None,
        },
        (ra, rb) => PairRun {
            intact: false,
            relayed: (0, 0),
            problem: Some(format!("A: {ra:?}; B: {rb:?}")),
        },
    }
}

type Side = (nettool_peer::PeerStream, nettool_peer::Completion);

/// Links both peers of pair `pair` (one of `connecting`'s permits held meanwhile) and starts
/// their sessions.
async fn link_pair(
    server: SocketAddr,
    pair: usize,
    connecting: &tokio::sync::Semaphore,
) -> Result<(Side, Side), String> {
    let _permit = connecting.acquire().await.map_err(|e| e.to_string())?;
    let tls = ControlSecurity::Tls(Arc::new(ServerTrust::new(None, None, None)));
    let session = format!("bench-pairs-{pair}");
    let peer = || {
        nettool_peer::Peer::builder()
            .server(server.to_string())
            .session(session.clone())
            .secret("bench")
            .control(tls.clone())
            .timeout(Duration::from_secs(120))
    };
    let (a, b) = tokio::join!(peer().connect(), peer().connect());
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a.into_stream(), b.into_stream())),
        (a, b) => {
            let why = [a.err(), b.err()]
                .into_iter()
                .flatten()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            Err(format!("no link: {why}"))
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// The worker (`--pairs-worker FROM..TO --pairs-server ADDR`): runs pairs FROM..TO against
/// the server at once and prints its [`WorkerResult`] as one JSON line.
pub(crate) async fn worker(server: SocketAddr, range: std::ops::Range<usize>, size: u64) {
    let want = range.len() as u64 * 2 * FILES_PER_PEER + 1024;
    let _ = raise_nofile(want);
    let (settled_tx, mut settled) = tokio::sync::mpsc::unbounded_channel();
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let start = Start {
        connecting: Arc::new(tokio::sync::Semaphore::new(CONNECTING)),
        settled: settled_tx,
        go,
    };
    let count = range.len();
    let tasks: Vec<_> = range
        .map(|i| {
            let start = start.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(PAIR_LIMIT, one_pair(server, i, size, start)).await {
                    Ok(r) => r,
                    Err(_) => PairRun {
                        intact: false,
                        relayed: (0, 0),
                        problem: Some(format!("not finished within {} s", PAIR_LIMIT.as_secs())),
                    },
                }
            })
        })
        .collect();
    drop(start);
    // Every pair has its bytes (or failed): say so, and end the sessions when the parent says
    // go (every worker's pairs are then open at once).
    let mut linked = 0;
    for _ in 0..count {
        match settled.recv().await {
            Some(true) => linked += 1,
            Some(false) => {}
            None => break,
        }
    }
    println!("delivered {linked}");
    let mut line = String::new();
    let _ = tokio::io::AsyncBufReadExt::read_line(
        &mut tokio::io::BufReader::new(tokio::io::stdin()),
        &mut line,
    )
    .await;
    let _ = go_tx.send(true);
    let mut out = WorkerResult::default();
    for t in tasks {
        let r = t.await.unwrap_or_else(|e| PairRun {
            intact: false,
            relayed: (0, 0),
            problem: Some(format!("the pair's task failed: {e}")),
        });
        if r.intact {
            out.intact += 1;
            out.relayed_bytes += r.relayed.0;
            out.received_bytes += r.relayed.1;
        }
        if let Some(p) = r.problem {
            if !out.problems.contains(&p) && out.problems.len() < 5 {
                out.problems.push(p);
            }
        }
    }
    out.peak_rss_kib = proc_status_kib(std::process::id(), "VmHWM:").unwrap_or(0);
    println!(
        "{}",
        serde_json::to_string(&out).expect("the result serializes")
    );
}

/// Runs `count` pairs of `size` bytes each way at once (in worker processes); the lines for
/// the report's notes.
pub(crate) async fn run(count: usize, size: u64, progress: &dyn Fn(&str)) -> Vec<String> {
    let mut lines = Vec::new();
    let server = match ServerProc::spawn(&[]).await {
        Ok(s) => s,
        Err(e) => {
            lines.push(format!(
                "pairs: not measured: the server did not start: {e:#}"
            ));
            return lines;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            lines.push(format!("pairs: not measured: this program's path: {e}"));
            return lines;
        }
    };
    let pid = server.pid();
    let workers = count.div_ceil(PAIRS_PER_WORKER).max(1);
    progress(&format!(
        "pairs: {count} relay-first pairs at once, {size} bytes each way, through one server \
         ({workers} worker processes) ..."
    ));
    let cpu_before = proc_cpu_seconds(pid).unwrap_or(0.0);
    let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(k) = rss_kib(pid) {
                    peak.fetch_max(k, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let began = Instant::now();
    let mut kids = Vec::new();
    let mut results: Vec<Result<WorkerResult, String>> = Vec::new();
    for w in 0..workers {
        let from = w * PAIRS_PER_WORKER;
        let to = (from + PAIRS_PER_WORKER).min(count);
        let spawned = tokio::process::Command::new(&exe)
            .args(["--pairs-worker", &format!("{from}..{to}")])
            .args(["--pairs-server", &server.addr.to_string()])
            .args(["--pair-size", &size.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(mut child) => {
                let stdout = child.stdout.take().expect("piped");
                let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
                kids.push((child, lines, format!("{from}..{to}")));
            }
            Err(e) => results.push(Err(format!("worker {from}..{to} did not start: {e}"))),
        }
    }
    // Every worker's pairs have their bytes (each says "delivered N"): then all end.
    let mut linked = 0;
    for (_, lines, range) in &mut kids {
        match lines.next_line().await {
            Ok(Some(l)) if l.starts_with("delivered ") => {
                linked += l["delivered ".len()..].trim().parse::<usize>().unwrap_or(0);
            }
            other => results.push(Err(format!("worker {range}: no delivered line: {other:?}"))),
        }
    }
    let linked_in = began.elapsed();
    progress(&format!(
        "pairs: {linked} of {count} pairs linked and delivered in {:.1} s, all open; ending ...",
        linked_in.as_secs_f64()
    ));
    for (child, _, _) in &mut kids {
        if let Some(stdin) = child.stdin.as_mut() {
            let _ = tokio::io::AsyncWriteExt::write_all(stdin, b"go\n").await;
        }
    }
    let transfer_began = Instant::now();
    let runs = kids
        .into_iter()
        .map(|(mut child, mut lines, range)| async move {
            let line = lines.next_line().await.ok().flatten().unwrap_or_default();
            let status = child.wait().await;
            serde_json::from_str::<WorkerResult>(&line)
                .map_err(|e| format!("worker {range} ({status:?}) gave no result: {e}"))
        });
    results.extend(futures::future::join_all(runs).await);
    let transfer = transfer_began.elapsed();
    sampler.abort();
    let cpu = proc_cpu_seconds(pid).map(|c| c - cpu_before);
    let mut total = WorkerResult::default();
    let mut worker_rss = 0;
    for r in results {
        match r {
            Ok(r) => {
                total.intact += r.intact;
                total.relayed_bytes += r.relayed_bytes;
                total.received_bytes += r.received_bytes;
                total.problems.extend(r.problems);
                worker_rss = worker_rss.max(r.peak_rss_kib);
            }
            Err(e) => total.problems.push(e),
        }
    }
    let verdict = if total.intact == count {
        "PASS"
    } else {
        "MISS"
    };
    lines.push(format!(
        "pairs: {count} relay-first pairs through one server (library API in {workers} worker \
         processes, TLS control, default strategies, loopback), {size} bytes each way per pair, \
         each pair's bytes as soon as it linked ({CONNECTING} linking at once per worker): \
         {}/{count} intact (target: all) {verdict}; {linked} delivered in {:.1} s and then all \
         open at once, ended in {:.1} s; {:.0} % of the bytes came over the relay; server peak \
         RSS {:.1} MB, server CPU {} over the run; peak RSS of a worker ({} peers) {:.1} MB",
        total.intact,
        linked_in.as_secs_f64(),
        transfer.as_secs_f64(),
        100.0 * total.relayed_bytes as f64 / total.received_bytes.max(1) as f64,
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
        cpu.map_or_else(|| "unknown".to_owned(), |c| format!("{c:.1} s")),
        2 * PAIRS_PER_WORKER.min(count),
        worker_rss as f64 / 1024.0,
    ));
    for p in total.problems.iter().take(5) {
        lines.push(format!("pairs: a failed pair: {p}"));
    }
    drop(server);
    lines
}
