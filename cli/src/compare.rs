//! `nettool compare`: every strategy on its own, side by side, on the network you are on.
//!
//! Both peers run it with the same session name. For each round and strategy the peers
//! connect with that strategy alone (fresh sockets, a session name derived from the round and
//! strategy), then over the link measure the round-trip time (median of pings) and the
//! throughput each way. Results go to stdout as a table (or JSON) and are appended to a
//! history file (JSON lines) with a label for the network, so `compare --summary` can put
//! networks side by side. Each round ends with a `relay-first` row (the default `connect`, made
//! by the `nettool_peer` library as `connect` makes it: the relay at once, the direct
//! strategies behind it): its time to link is the relay's, its `direct` says which direct path
//! came and when, and the figures are measured over the session's stream once the direct
//! connect ended (on the direct path when it came: the session moves there).

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, Table};
use nettool_config::Settings;

use crate::ConfiguredStrategy;
use nettool_core::control::ControlSecurity;
use nettool_core::discovery::{Filtering, Mapping};
use nettool_core::orchestrator::Event;
use nettool_core::plan::NatSummary;
use nettool_core::relay_first;
use nettool_core::report::NatPair;
use nettool_core::{ConnectParams, Link, Outcome, Role};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How to compare.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Rounds over all strategies.
    pub rounds: u32,
    /// Bytes sent each way for the throughput figure.
    pub size: u64,
    /// Pings for the RTT figure.
    pub pings: u32,
}

/// One strategy's result in one round, as this peer saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct CompareRow {
    pub(crate) round: u32,
    pub(crate) strategy: String,
    pub(crate) outcome: Outcome,
    /// Time from the attempt's start to an authenticated link.
    pub(crate) time_to_link_ms: Option<u64>,
    /// Median round trip over the link.
    pub(crate) rtt_ms: Option<f64>,
    /// Throughput from the first peer to the second, MB/s (10^6 bytes per second).
    pub(crate) first_to_second_mbps: Option<f64>,
    /// Throughput from the second peer to the first, MB/s.
    pub(crate) second_to_first_mbps: Option<f64>,
    pub(crate) error: Option<String>,
    /// Both sides' NAT behaviour as discovered for the plan (absent with `--plan off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) nat: Option<NatPair>,
    /// The `relay-first` row: the direct path that came behind the relay and when (ms since
    /// the connect began), or why none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) direct: Option<String>,
}

/// One run of `compare`, as stored in the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CompareRun {
    pub(crate) time_unix: u64,
    pub(crate) label: String,
    pub(crate) session: String,
    pub(crate) role: Option<Role>,
    pub(crate) size: u64,
    pub(crate) rows: Vec<CompareRow>,
}

/// Runs the comparison as one peer. `waiting` is called once, when this peer has first joined
/// and waits for the other (`compare` prints connect's "waiting for the peer" line then).
pub(crate) async fn run(
    settings: &Settings,
    control: &ControlSecurity,
    strategies: &[ConfiguredStrategy],
    base: &ConnectParams,
    options: &CompareOptions,
    progress: &(dyn Fn(&str) + Sync),
    waiting: &(dyn Fn() + Sync),
) -> (Option<Role>, Vec<CompareRow>) {
    let mut rows = Vec::new();
    let mut role = None;
    let announced = std::sync::atomic::AtomicBool::new(false);
    let events = |e: Event| {
        if matches!(e, Event::Waiting)
            && !announced.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            waiting();
        }
    };
    for round in 1..=options.rounds.max(1) {
        for config in strategies {
            let name = config.name();
            progress(&format!("round {round}: {name} ..."));
            let params = ConnectParams {
                session: format!("{}/{round}/{name}", base.session),
                ..base.clone()
            };
            let orch = crate::peer_orchestrator(
                std::slice::from_ref(config),
                settings.timeout,
                settings,
                control.clone(),
            );
            let row = one(orch, settings, &params, options, round, &mut role, &events).await;
            progress(&format!(
                "round {round}: {name} {}",
                match &row.error {
                    None => format!("linked in {} ms", row.time_to_link_ms.unwrap_or(0)),
                    Some(e) => format!("{}: {e}", row.outcome.as_str()),
                }
            ));
            rows.push(row);
        }
        if settings.relay_first {
            let orch =
                crate::peer_orchestrator(strategies, settings.timeout, settings, control.clone());
            if relay_first::applies(&orch) {
                progress(&format!("round {round}: relay-first ..."));
                let params = ConnectParams {
                    session: format!("{}/{round}/relay-first", base.session),
                    ..base.clone()
                };
                let row =
                    one_relay_first(&orch, settings, &params, options, round, &mut role).await;
                progress(&format!(
                    "round {round}: relay-first {}",
                    match (&row.error, &row.direct) {
                        (None, d) => format!(
                            "linked in {} ms, direct: {}",
                            row.time_to_link_ms.unwrap_or(0),
                            d.as_deref().unwrap_or("-")
                        ),
                        (Some(e), _) => format!("{}: {e}", row.outcome.as_str()),
                    }
                ));
                rows.push(row);
            }
        }
    }
    (role, rows)
}

/// The `relay-first` row (see the module docs): the default connect as the library makes it
/// (`nettool_peer`, relay-first), the figures measured over its session's stream once the
/// direct connect has come (or not).
async fn one_relay_first(
    orch: &nettool_core::Orchestrator,
    settings: &Settings,
    params: &ConnectParams,
    options: &CompareOptions,
    round: u32,
    role: &mut Option<Role>,
) -> CompareRow {
    use std::sync::{Arc, Mutex};
    let started = Instant::now();
    // What the direct connect came to: the path (ms since the start, strategy) or why none.
    let direct: Arc<Mutex<Option<String>>> = Arc::default();
    let done = Arc::new(tokio::sync::Notify::new());
    let (seen, told) = (direct.clone(), done.clone());
    let mut peer = nettool_peer::Peer::builder()
        .chosen_server(params.server, vec![params.server])
        .session(params.session.clone())
        .orchestrator(orch.clone())
        .timeout(settings.timeout)
        .on_event(move |e| {
            let said = match e {
                nettool_peer::Event::DirectReady {
                    at_ms, strategy, ..
                } => format!("{strategy} at {at_ms} ms"),
                nettool_peer::Event::NoDirectPath { reason } => format!("none ({reason})"),
                _ => return,
            };
            seen.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert(said);
            told.notify_one();
        });
    if let Some(secret) = &params.secret {
        peer = peer.secret(secret.clone());
    }
    let connected = peer.connect().await;
    let relay_ms = started.elapsed().as_millis() as u64;
    let mut row = CompareRow {
        round,
        strategy: "relay-first".into(),
        outcome: Outcome::Failed,
        time_to_link_ms: None,
        rtt_ms: None,
        first_to_second_mbps: None,
        second_to_first_mbps: None,
        error: None,
        nat: None,
        direct: None,
    };
    let connection = match connected {
        Ok(c) => c,
        Err(nettool_peer::PeerError::NoLink(report)) => {
            *role = report.role.or(*role);
            row.nat = report.nat.clone();
            row.error = Some(report.error.unwrap_or_else(|| "no link".into()));
            return row;
        }
        Err(e) => {
            row.error = Some(e.to_string());
            return row;
        }
    };
    let report = connection.report();
    *role = report.role.or(*role);
    row.outcome = Outcome::Connected;
    row.time_to_link_ms = Some(relay_ms);
    row.nat = report.nat.clone();
    let Some(me) = report.role else {
        row.error = Some("no role in the report".into());
        return row;
    };
    let strategy = connection.link().strategy;
    // The session starts now (it watches the direct connect and moves to its path).
    let (link, completion) = connection.into_session_link();
    if strategy != relay_first::RELAY {
        // The relay did not link: the direct connect's link is the session's from the start.
        row.direct = Some(format!("{strategy} (no relay)"));
    } else {
        let came = tokio::time::timeout(settings.timeout, done.notified()).await;
        row.direct = direct
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .or_else(|| {
                came.is_err()
                    .then(|| "none (the direct connect did not end in time)".into())
            });
    }
    measure_into(&mut row, link, me, options, settings.timeout).await;
    // The measurement dropped the stream: the session ends, and its report holds the direct
    // connect's NAT findings.
    if let Ok(finished) = tokio::time::timeout(settings.timeout, completion.finished()).await {
        row.nat = finished.report.nat.or(row.nat.take());
    }
    row
}

/// [`measure`] over `link` within `limit`, the figures (or why there are none) into `row`.
async fn measure_into(
    row: &mut CompareRow,
    link: Link,
    role: Role,
    options: &CompareOptions,
    limit: std::time::Duration,
) {
    match tokio::time::timeout(limit, measure(link, role, options)).await {
        Ok(Ok(m)) => {
            row.rtt_ms = Some(m.rtt_ms);
            row.first_to_second_mbps = Some(m.first_to_second);
            row.second_to_first_mbps = Some(m.second_to_first);
        }
        Ok(Err(e)) => row.error = Some(format!("measuring over the link: {e:#}")),
        Err(_) => row.error = Some("measuring over the link timed out".into()),
    }
}

/// One strategy's row: `orch` holds that strategy alone.
async fn one(
    orch: nettool_core::Orchestrator,
    settings: &Settings,
    params: &ConnectParams,
    options: &CompareOptions,
    round: u32,
    role: &mut Option<Role>,
    events: &(dyn Fn(Event) + Send + Sync),
) -> CompareRow {
    let (link, report) = orch.connect(params, events).await;
    *role = report.role.or(*role);
    let attempt = report.attempts.first();
    let mut row = CompareRow {
        round,
        strategy: orch.names().concat(),
        outcome: attempt.map_or(Outcome::Failed, |a| a.outcome),
        time_to_link_ms: None,
        rtt_ms: None,
        first_to_second_mbps: None,
        second_to_first_mbps: None,
        error: attempt
            .and_then(|a| a.error.clone())
            .or(report.error.clone()),
        nat: report.nat.clone(),
        direct: None,
    };
    let (Some(link), Some(r)) = (link, report.role) else {
        if row.error.is_none() {
            row.error = Some("no link".into());
        }
        return row;
    };
    row.time_to_link_ms = attempt.map(|a| a.elapsed_ms);
    measure_into(&mut row, link, r, options, settings.timeout).await;
    row
}

/// Figures measured over one link (both ends get all of them).
pub struct Measured {
    /// Median round trip, ms.
    pub rtt_ms: f64,
    /// MB/s from the first peer to the second.
    pub first_to_second: f64,
    /// MB/s from the second peer to the first.
    pub second_to_first: f64,
}

/// Pings, then a bulk transfer each way, over the link. Both ends end up with all figures.
pub async fn measure(link: Link, role: Role, options: &CompareOptions) -> Result<Measured> {
    let (mut rd, mut wr) = tokio::io::split(link.stream);
    // RTT: the first pings, the second echoes; then the other way round.
    let mut rtts = Vec::new();
    for phase in [Role::First, Role::Second] {
        for i in 0..options.pings {
            let word = u64::from(i).to_be_bytes();
            if role == phase {
                let start = Instant::now();
                wr.write_all(&word).await?;
                wr.flush().await?;
                let mut echo = [0u8; 8];
                rd.read_exact(&mut echo).await?;
                anyhow::ensure!(echo == word, "ping {i} came back wrong");
                rtts.push(start.elapsed().as_secs_f64() * 1000.0);
            } else {
                let mut got = [0u8; 8];
                rd.read_exact(&mut got).await?;
                wr.write_all(&got).await?;
                wr.flush().await?;
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    let rtt_ms = rtts.get(rtts.len() / 2).copied().unwrap_or(0.0);
    // Throughput: the sender times from its first byte to the receiver's acknowledgement.
    let mut mine = 0.0;
    for phase in [Role::First, Role::Second] {
        if role == phase {
            mine = send_bulk(&mut wr, &mut rd, options.size).await?;
        } else {
            receive_bulk(&mut rd, &mut wr, options.size).await?;
        }
    }
    // Swap the figures so both ends know both directions.
    wr.write_all(&mine.to_be_bytes()).await?;
    wr.flush().await?;
    let mut theirs = [0u8; 8];
    rd.read_exact(&mut theirs).await?;
    let theirs = f64::from_be_bytes(theirs);
    // Close gracefully: both ends half-close and wait for the other's end, so no byte is
    // still in flight when the link is dropped. The figures are complete already, so an error
    // here (the peer closing first) does not spoil them.
    let mut rest = Vec::new();
    let _ = tokio::join!(wr.shutdown(), rd.read_to_end(&mut rest));
    let (first_to_second, second_to_first) = match role {
        Role::First => (mine, theirs),
        Role::Second => (theirs, mine),
    };
    Ok(Measured {
        rtt_ms,
        first_to_second,
        second_to_first,
    })
}

async fn send_bulk<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
    wr: &mut W,
    rd: &mut R,
    size: u64,
) -> Result<f64> {
    let chunk = vec![0x5au8; 64 << 10];
    let start = Instant::now();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        wr.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    wr.flush().await?;
    let mut ack = [0u8; 1];
    rd.read_exact(&mut ack).await?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(size as f64 / secs / 1e6)
}

async fn receive_bulk<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    size: u64,
) -> Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let got = rd.read(&mut buf[..n]).await?;
        anyhow::ensure!(got > 0, "the link closed during the transfer");
        left -= got as u64;
    }
    wr.write_all(&[1]).await?;
    wr.flush().await?;
    Ok(())
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".to_owned(), |x| format!("{x:.digits$}"))
}

/// The rows as a table.
/// Short words for a pair of NAT behaviours: `EI/APD; EI` per side.
fn nat_text(pair: &NatPair) -> String {
    fn mapping(m: Mapping) -> &'static str {
        match m {
            Mapping::NoNat => "no NAT",
            Mapping::EndpointIndependent => "EI",
            Mapping::AddressDependent => "AD",
            Mapping::AddressAndPortDependent => "APD",
            Mapping::Unknown => "?",
        }
    }
    fn filtering(f: Filtering) -> &'static str {
        match f {
            Filtering::EndpointIndependent => "EI",
            Filtering::AddressDependent => "AD",
            Filtering::AddressAndPortDependent => "APD",
            Filtering::Unknown => "?",
        }
    }
    let side = |s: &Option<NatSummary>| {
        s.map_or("unknown".to_owned(), |s| {
            format!(
                "{}, {}; {}",
                mapping(s.udp_mapping),
                filtering(s.udp_filtering),
                mapping(s.tcp_mapping)
            )
        })
    };
    format!("{} / {}", side(&pair.local), side(&pair.peer))
}

pub(crate) fn table(rows: &[CompareRow]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "round",
        "strategy",
        "outcome",
        "time to link",
        "rtt",
        "first→second",
        "second→first",
        "NAT this / peer (udp mapping, filtering; tcp mapping)",
        "error",
    ]);
    for r in rows {
        t.add_row([
            Cell::new(r.round),
            Cell::new(match &r.direct {
                Some(d) => format!("{} → {d}", r.strategy),
                None => r.strategy.clone(),
            }),
            Cell::new(r.outcome.as_str()),
            Cell::new(r.time_to_link_ms.map_or("-".into(), |v| format!("{v} ms"))),
            Cell::new(fmt_opt(r.rtt_ms, 3) + if r.rtt_ms.is_some() { " ms" } else { "" }),
            Cell::new(
                fmt_opt(r.first_to_second_mbps, 1)
                    + if r.first_to_second_mbps.is_some() {
                        " MB/s"
                    } else {
                        ""
                    },
            ),
            Cell::new(
                fmt_opt(r.second_to_first_mbps, 1)
                    + if r.second_to_first_mbps.is_some() {
                        " MB/s"
                    } else {
                        ""
                    },
            ),
            Cell::new(r.nat.as_ref().map_or("-".to_owned(), nat_text)),
            Cell::new(
                r.error
                    .as_deref()
                    .map(|e| truncate(e, 60))
                    .unwrap_or_default(),
            ),
        ]);
    }
    t.to_string()
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        s.chars().take(max).collect::<String>() + "…"
    }
}

/// The default history file: `<user data dir>/nettool/history.jsonl`.
pub(crate) fn default_history() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("nettool").join("history.jsonl"))
}

/// Appends one run to the history (JSON lines), on tokio's blocking pool (file I/O must not
/// stall an async worker thread).
pub(crate) async fn append_history(path: &Path, run: &CompareRun) -> Result<()> {
    let path = path.to_owned();
    let line = serde_json::to_string(run)? + "\n";
    tokio::task::spawn_blocking(move || append_line(&path, &line))
        .await
        .context("the history writer failed")?
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the history file {}", path.display()))?;
    f.write_all(line.as_bytes())
        .with_context(|| format!("cannot write the history file {}", path.display()))
}

/// Success rate and median time to link per label and strategy, from the history (read with
/// tokio's file I/O, off the async worker threads).
pub(crate) async fn summary(path: &Path) -> Result<String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("cannot read the history file {}", path.display()))?;
    summarize(path, &text)
}

fn summarize(path: &Path, text: &str) -> Result<String> {
    let mut groups: std::collections::BTreeMap<(String, String), (u32, u32, Vec<u64>)> =
        Default::default();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let run: CompareRun = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a compare run", path.display(), i + 1))?;
        for row in run.rows {
            let g = groups
                .entry((run.label.clone(), row.strategy.clone()))
                .or_default();
            g.1 += 1;
            if row.outcome == Outcome::Connected {
                g.0 += 1;
                g.2.extend(row.time_to_link_ms);
            }
        }
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "label",
        "strategy",
        "linked",
        "success",
        "median time to link",
    ]);
    for ((label, strategy), (ok, total, mut times)) in groups {
        times.sort_unstable();
        t.add_row([
            label,
            strategy,
            format!("{ok}/{total}"),
            format!("{:.0}%", 100.0 * f64::from(ok) / f64::from(total.max(1))),
            times
                .get(times.len() / 2)
                .map_or("-".into(), |v| format!("{v} ms")),
        ]);
    }
    Ok(t.to_string())
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// The history is written off the async worker threads: while appending to a FIFO that
    /// nobody reads yet (the open blocks), other tasks on a single-threaded runtime keep
    /// running; the reader only opens the FIFO once it has seen them run.
    #[test]
    fn appending_history_does_not_block_the_runtime() {
        let dir = std::env::temp_dir().join(format!("nettool-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("history.jsonl");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let ticks = Arc::new(AtomicU32::new(0));
        let reader = {
            let (ticks, fifo) = (ticks.clone(), fifo.clone());
            std::thread::spawn(move || {
                // Wait (at most 5 s) for the runtime to show it is not blocked.
                for _ in 0..500 {
                    if ticks.load(Ordering::SeqCst) >= 20 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                let seen = ticks.load(Ordering::SeqCst);
                (seen, std::fs::read_to_string(&fifo).unwrap())
            })
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = ticks.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    t.fetch_add(1, Ordering::SeqCst);
                }
            });
            let run = CompareRun {
                time_unix: 1,
                label: "fifo".into(),
                session: "s".into(),
                role: None,
                size: 0,
                rows: Vec::new(),
            };
            append_history(&fifo, &run).await.unwrap();
            ticker.abort();
        });
        let (seen, text) = reader.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(text.contains("\"label\":\"fifo\""), "{text}");
        assert!(
            seen >= 20,
            "the runtime stood still while the history file was opened ({seen} ticks)"
        );
    }
}
