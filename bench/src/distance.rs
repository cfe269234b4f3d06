//! `nettool-bench --section distance`: relay-first at a real distance, in the NAT lab.
//!
//! The end-to-end tests' distance check (`tests/tests/e2e/distance.rs`) as a benchmark with
//! figures and targets. For each pair of NAT kinds (none × none, cone × cone, cone-rst × cone,
//! sym × cone, fw × fw, sym × sym; A × B) and each of `--rounds` rounds, a fresh lab is built
//! whose internet router holds every packet half of `--distance-rtt` each way (100 ms RTT by
//! default: between each host and the server, and between the hosts), and its rendezvous
//! server is started (`nettool rendezvous --listen 203.0.113.10:8877 --other-address
//! 203.0.113.11:8878` in the server's namespace). Then, as the tests do:
//!
//! - B starts `nettool connect` (the default order: relay-first) and joins; once its stderr
//!   says "waiting for the peer", A starts the same command;
//! - both pipe paced data (A 256 KiB, B 64 KiB, each over 4 s), so the session lives long
//!   enough to move to a direct path;
//! - the first byte of A's data on B's stdout is timed from A's start; the time to the direct
//!   path is the `from_ms` of the first non-relay path in A's `--report` (A's times count from
//!   its connect's start, a process start after A's start here: negligible at this scale);
//! - both exit codes and both directions' bytes (compared whole) are checked.
//!
//! Two labs run at once at most (two shared cores). Targets: the first byte within 5 round
//! trips (the floor with a fresh TCP + TLS connection to the server is 4), and the direct path
//! within 8 round trips on the pairs a direct strategy links (every pair here but sym × sym;
//! sym × cone only by udp-quic's birthday punching, see the README's strategy table). Both on
//! the median of the rounds; every round must also end cleanly.
//!
//! Without the lab (root, nftables, `ip netns`; `iptables` and the kernel's nfnetlink_queue
//! for the delay line) the section says why it skipped, and the bench goes on.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nettool_tests::test_data as data;
use nettool_tests::{lab_unavailable_reason, Host, Lab, NatKind};
use serde::Serialize;

use super::Verdict;

/// One measured case: A × B (B waits, A starts), the path it ends on in the README's strategy
/// table (`relay`: nothing direct links it), the flags both peers add, and the first byte's
/// target in round trips.
struct Case {
    a: NatKind,
    b: NatKind,
    expected: &'static str,
    flags: &'static [&'static str],
    first_byte_rtt: u64,
}

const fn default_connect(a: NatKind, b: NatKind, expected: &'static str) -> Case {
    Case {
        a,
        b,
        expected,
        flags: &[],
        first_byte_rtt: FIRST_BYTE_TARGET_RTT,
    }
}

/// The cases: the default connect (relay-first) per pair, and tcp-punch alone on cone × cone
/// (no relay: the first byte waits for the punched link; target 6 round trips).
const PAIRS: [Case; 7] = [
    default_connect(NatKind::None, NatKind::None, "tcp-punch"),
    default_connect(NatKind::Cone, NatKind::Cone, "tcp-punch"),
    default_connect(NatKind::ConeRst, NatKind::Cone, "tcp-punch"),
    default_connect(NatKind::Sym, NatKind::Cone, "udp-quic"),
    default_connect(NatKind::Fw, NatKind::Fw, "tcp-punch"),
    default_connect(NatKind::Sym, NatKind::Sym, "relay"),
    Case {
        a: NatKind::Cone,
        b: NatKind::Cone,
        expected: "tcp-punch",
        flags: TCP_PUNCH_ALONE,
        first_byte_rtt: 6,
    },
];

/// The flags of the tcp-punch-alone case.
const TCP_PUNCH_ALONE: &[&str] = &["--no-relay-first", "--strategy", "tcp-punch"];

/// Bytes A and B send, each paced over [`PACE`].
const A_BYTES: usize = 256 << 10;
const B_BYTES: usize = 64 << 10;
const PACE: Duration = Duration::from_secs(4);
/// Writes per paced feed.
const STEPS: u32 = 64;
/// Targets, in round trips.
const FIRST_BYTE_TARGET_RTT: u64 = 5;
const DIRECT_TARGET_RTT: u64 = 8;
/// With this variable set to a directory, both peers log at debug level and each run's two
/// logs are written there (`{a}-{b}-{round}.{a,b}.log`): the timeline behind a figure.
const LOG_DIR_VAR: &str = "NETTOOL_BENCH_LOG_DIR";
/// Labs at once (two shared cores).
const PARALLEL: usize = 2;
/// How long B may take to join, and both peers to finish.
const JOIN_LIMIT: Duration = Duration::from_secs(20);
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// The section's figures (or why it was skipped).
#[derive(Debug, Serialize)]
pub(crate) struct Distance {
    /// The round trip the lab added (host↔server, host↔host), ms.
    rtt_ms: u64,
    rounds: u32,
    /// Why the section did not run (no lab on this machine).
    skipped: Option<String>,
    rows: Vec<DistanceRow>,
}

/// One pair's figures over the rounds.
#[derive(Debug, Serialize)]
pub(crate) struct DistanceRow {
    /// `A × B`.
    pair: String,
    a: &'static str,
    b: &'static str,
    runs: u32,
    /// Runs with both exits 0 and both directions' bytes intact.
    clean: u32,
    /// First byte of A's data on B's stdout, ms since A started: median and worst.
    first_byte_p50_ms: Option<u64>,
    first_byte_worst_ms: Option<u64>,
    first_byte_target_ms: u64,
    first_byte_verdict: Verdict,
    /// The first non-relay path's `from_ms` in A's report: median (a run that never went
    /// direct counts as the slowest) and how many runs went direct.
    direct_p50_ms: Option<u64>,
    direct_runs: u32,
    /// None where no direct strategy links the pair (sym × sym).
    direct_target_ms: Option<u64>,
    direct_verdict: Verdict,
    /// The path carrying the session at the end, per run (A's report).
    final_paths: Vec<String>,
    /// What the README's strategy table says the pair ends on.
    expected_final_path: &'static str,
    /// Clean runs out of all.
    clean_verdict: Verdict,
    /// The first problem of any run.
    error: Option<String>,
    /// Every run.
    details: Vec<DistanceRun>,
}

/// One run of one pair.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DistanceRun {
    round: u32,
    first_byte_ms: Option<u64>,
    direct_ms: Option<u64>,
    direct_strategy: Option<String>,
    final_path: Option<String>,
    a_code: Option<i32>,
    b_code: Option<i32>,
    /// A's stdout is B's input, byte for byte.
    a_intact: bool,
    /// B's stdout is A's input, byte for byte.
    b_intact: bool,
    error: Option<String>,
}

impl DistanceRun {
    fn failed(round: u32, error: String) -> Self {
        Self {
            round,
            first_byte_ms: None,
            direct_ms: None,
            direct_strategy: None,
            final_path: None,
            a_code: None,
            b_code: None,
            a_intact: false,
            b_intact: false,
            error: Some(error),
        }
    }

    fn clean(&self) -> bool {
        self.error.is_none()
    }
}

/// Why the lab with a delay line cannot run here, if it cannot.
fn unavailable(delay: Duration) -> Option<String> {
    if let Some(reason) = lab_unavailable_reason() {
        return Some(reason);
    }
    let iptables = Command::new("iptables")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !iptables.is_ok_and(|s| s.success()) {
        return Some(
            "the lab's delay line needs iptables (Debian: apt-get install iptables)".into(),
        );
    }
    // The delay line also needs the kernel's nfnetlink_queue: a throwaway lab tells.
    Lab::builder(NatKind::None, NatKind::None)
        .delay(delay)
        .build()
        .err()
        .map(|e| format!("cannot build a lab with a delay line: {e}"))
}

/// Runs the section: every pair, `rounds` times, at `rtt_ms`.
pub(crate) fn run(rtt_ms: u64, rounds: u32, progress: &(dyn Fn(&str) + Sync)) -> Distance {
    let rounds = rounds.max(1);
    let delay = Duration::from_micros(rtt_ms * 500);
    let mut bench = Distance {
        rtt_ms,
        rounds,
        skipped: None,
        rows: Vec::new(),
    };
    if let Some(reason) = unavailable(delay) {
        progress(&format!("distance: skipped: {reason}"));
        bench.skipped = Some(reason);
        return bench;
    }
    let bin = match crate::nettool_bin() {
        Ok(b) => b,
        Err(e) => {
            bench.skipped = Some(format!("{e:#}"));
            return bench;
        }
    };
    let chosen: Vec<usize> = (0..PAIRS.len()).filter(|p| chosen(&PAIRS[*p])).collect();
    let jobs: VecDeque<(usize, u32)> = (0..rounds)
        .flat_map(|r| chosen.iter().map(move |p| (*p, r)))
        .collect();
    let total = jobs.len();
    let jobs = Mutex::new(jobs);
    let results: Mutex<Vec<(usize, DistanceRun)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| loop {
                let Some((p, round)) = jobs.lock().expect("jobs lock").pop_front() else {
                    return;
                };
                let (a, b) = (PAIRS[p].a, PAIRS[p].b);
                let r = one_run(&bin, &PAIRS[p], delay, round)
                    .unwrap_or_else(|e| DistanceRun::failed(round, format!("{e:#}")));
                let mut results = results.lock().expect("results lock");
                results.push((p, r.clone()));
                progress(&format!(
                    "distance {}/{total}: {a} × {b} round {}: first byte {}, direct {}, final {}{}",
                    results.len(),
                    round + 1,
                    ms_rtt(r.first_byte_ms, rtt_ms),
                    ms_rtt(r.direct_ms, rtt_ms),
                    r.final_path.as_deref().unwrap_or("-"),
                    r.error
                        .as_deref()
                        .map(|e| format!("; {e}"))
                        .unwrap_or_default()
                ));
            });
        }
    });
    let mut results = results.into_inner().expect("results lock");
    results.sort_by_key(|(p, r)| (*p, r.round));
    for (p, case) in PAIRS.iter().enumerate().filter(|(p, _)| chosen.contains(p)) {
        let runs: Vec<DistanceRun> = results
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, r)| r.clone())
            .collect();
        bench.rows.push(row(case, runs, rtt_ms));
    }
    bench
}

/// The median of `v`, `None` (missing) sorting last; the upper median of an even count.
fn p50(v: &[Option<u64>]) -> Option<u64> {
    let mut v: Vec<u64> = v.iter().map(|x| x.unwrap_or(u64::MAX)).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2]).filter(|x| *x != u64::MAX)
}

fn row(case: &Case, runs: Vec<DistanceRun>, rtt_ms: u64) -> DistanceRow {
    let (a, b, expected) = (case.a, case.b, case.expected);
    // Without the relay the whole link is direct: only the first byte has a target.
    let alone = !case.flags.is_empty();
    let first: Vec<Option<u64>> = runs.iter().map(|r| r.first_byte_ms).collect();
    let direct: Vec<Option<u64>> = runs.iter().map(|r| r.direct_ms).collect();
    let first_byte_p50_ms = p50(&first);
    let first_byte_worst_ms = if first.iter().all(Option::is_some) {
        first.iter().flatten().max().copied()
    } else {
        None
    };
    let direct_p50_ms = p50(&direct);
    let punchable = expected != "relay" && !alone;
    let first_byte_target_ms = case.first_byte_rtt * rtt_ms;
    let direct_target_ms = punchable.then_some(DIRECT_TARGET_RTT * rtt_ms);
    let clean = runs.iter().filter(|r| r.clean()).count() as u32;
    DistanceRow {
        pair: if alone {
            format!("{a} × {b}, {}", case.flags.join(" "))
        } else {
            format!("{a} × {b}")
        },
        a: a.name(),
        b: b.name(),
        runs: runs.len() as u32,
        clean,
        first_byte_p50_ms,
        first_byte_worst_ms,
        first_byte_target_ms,
        first_byte_verdict: Verdict::of(
            first_byte_p50_ms.is_some_and(|m| m <= first_byte_target_ms),
        ),
        direct_p50_ms,
        direct_runs: direct.iter().flatten().count() as u32,
        direct_target_ms,
        direct_verdict: match direct_target_ms {
            Some(t) => Verdict::of(direct_p50_ms.is_some_and(|m| m <= t)),
            None => Verdict::NotApplicable,
        },
        final_paths: runs
            .iter()
            .map(|r| r.final_path.clone().unwrap_or_else(|| "-".into()))
            .collect(),
        expected_final_path: expected,
        clean_verdict: Verdict::of(!runs.is_empty() && clean as usize == runs.len()),
        error: runs.iter().find_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("round {}: {e}", r.round + 1))
        }),
        details: runs,
    }
}

/// `ms (x.y RTT)`, or `-`.
fn ms_rtt(ms: Option<u64>, rtt_ms: u64) -> String {
    ms.map_or_else(
        || "-".to_owned(),
        |m| format!("{m} ms ({:.1} RTT)", m as f64 / rtt_ms.max(1) as f64),
    )
}

impl Distance {
    /// The verdicts, for `--check`.
    pub(crate) fn verdicts(&self) -> impl Iterator<Item = Verdict> + '_ {
        self.rows
            .iter()
            .flat_map(|r| [r.first_byte_verdict, r.direct_verdict, r.clean_verdict])
    }

    /// The table (or the line saying why the section was skipped).
    pub(crate) fn render(&self) -> String {
        if let Some(reason) = &self.skipped {
            return format!("distance: skipped: {reason}\n");
        }
        let rtt = self.rtt_ms;
        let mut t = super::table(&[
            "pair (A × B)",
            "clean",
            "first byte p50",
            "worst",
            "target",
            "direct p50 (A's report)",
            &format!("≤ {DIRECT_TARGET_RTT} RTT"),
            "final path",
            "error",
        ]);
        for r in &self.rows {
            let mut finals: Vec<(String, usize)> = Vec::new();
            for f in &r.final_paths {
                match finals.iter_mut().find(|(g, _)| g == f) {
                    Some((_, n)) => *n += 1,
                    None => finals.push((f.clone(), 1)),
                }
            }
            let mut fin = if finals.len() == 1 {
                finals[0].0.clone()
            } else {
                finals
                    .iter()
                    .map(|(f, n)| format!("{f} ×{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if finals.len() != 1 || finals[0].0 != r.expected_final_path {
                fin += &format!(" (README: {})", r.expected_final_path);
            }
            t.add_row([
                r.pair.clone(),
                format!("{}/{} {}", r.clean, r.runs, r.clean_verdict.as_str()),
                ms_rtt(r.first_byte_p50_ms, rtt),
                ms_rtt(r.first_byte_worst_ms, rtt),
                format!(
                    "≤ {} RTT {}",
                    r.first_byte_target_ms / rtt.max(1),
                    r.first_byte_verdict.as_str()
                ),
                format!(
                    "{}{}",
                    ms_rtt(r.direct_p50_ms, rtt),
                    if r.direct_runs < r.runs {
                        format!(" ({}/{} direct)", r.direct_runs, r.runs)
                    } else {
                        String::new()
                    }
                ),
                r.direct_verdict.as_str().into(),
                fin,
                r.error.clone().unwrap_or_default(),
            ]);
        }
        format!(
            "Distance (NAT lab, RTT {rtt} ms: {} ms each way at the internet router; default \
             connect (relay-first) unless the row names flags, B waiting, A starting; A {} KiB, B {} KiB, paced over {} s; \
             {} round(s), a fresh lab each; ms since A's start: first byte on B's stdout, \
             direct = the first non-relay path's from_ms in A's report; targets on the \
             median; clean = both exit 0, both directions' bytes intact)\n{t}\n",
            rtt as f64 / 2.0,
            A_BYTES >> 10,
            B_BYTES >> 10,
            PACE.as_secs(),
            self.rounds,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// One run.

/// Writes `data` to `w` in [`STEPS`] pieces spread over [`PACE`], then closes `w`.
fn feed_paced(mut w: impl Write, data: &[u8]) {
    let step = data.len().div_ceil(STEPS as usize).max(1);
    let began = Instant::now();
    for (i, piece) in data.chunks(step).enumerate() {
        let due = began + PACE * (i as u32) / STEPS;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if w.write_all(piece).is_err() {
            return;
        }
    }
}

/// A `nettool` child in a lab namespace: its stderr collected, its stdout drained (the first
/// byte timed), killed when dropped.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    waiting: mpsc::Receiver<()>,
    out: Option<JoinHandle<(Vec<u8>, Option<Instant>)>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, waiting) = mpsc::channel();
        let stderr = child.stderr.take().context("stderr is piped")?;
        {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("waiting for the peer") {
                        let _ = tx.send(());
                    }
                    lines.lock().expect("lines lock").push(line);
                }
            });
        }
        let mut stdout = child.stdout.take().context("stdout is piped")?;
        let out = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut first = None;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        first.get_or_insert_with(Instant::now);
                        got.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            (got, first)
        });
        Ok(Self {
            child,
            lines,
            waiting,
            out: Some(out),
        })
    }

    /// Starts feeding `data` to its stdin, paced.
    fn feed(&mut self, data: Vec<u8>) -> Result<JoinHandle<()>> {
        let stdin = self.child.stdin.take().context("stdin is piped")?;
        Ok(std::thread::spawn(move || feed_paced(stdin, &data)))
    }

    /// Waits for the exit until `end`; kills the child past it (`None`).
    fn wait_until(&mut self, end: Instant) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its stdout, once it closed, and when the first byte came.
    fn output(&mut self) -> (Vec<u8>, Option<Instant>) {
        self.out
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// The last lines of its stderr.
    fn tail(&self) -> String {
        let lines = self.lines.lock().expect("lines lock");
        let from = lines.len().saturating_sub(2);
        lines[from..].join(" | ")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!(
            "nettool-bench-distance-{}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read_report(path: &Path) -> serde_json::Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// One round of one pair in a fresh lab.
/// A case's name in logs and in [`ONLY_VAR`]: `sym-cone`, `cone-cone-alone`.
fn case_tag(case: &Case) -> String {
    let alone = if case.flags.is_empty() { "" } else { "-alone" };
    format!("{}-{}{alone}", case.a, case.b)
}

/// With this variable set (case names, comma-separated: `cone-cone-alone,sym-cone`), only
/// those cases run.
const ONLY_VAR: &str = "NETTOOL_BENCH_DISTANCE_ONLY";

fn chosen(case: &Case) -> bool {
    std::env::var(ONLY_VAR).map_or(true, |only| {
        only.split(',').any(|t| t.trim() == case_tag(case))
    })
}

fn one_run(bin: &Path, case: &Case, delay: Duration, round: u32) -> Result<DistanceRun> {
    let (a, b) = (case.a, case.b);
    let tag = format!("{}-{round}", case_tag(case));
    let lab = Lab::builder(a, b)
        .delay(delay)
        .build()
        .with_context(|| format!("building the lab {a} × {b}"))?;
    let dir = TempDir::new(&tag)?;
    let listen = format!("{}:8877", lab.server_ip());
    let mut server_cmd = lab.command(Host::Server, bin);
    server_cmd.args(["rendezvous", "--listen", &listen, "--other-address"]);
    server_cmd.arg(format!("{}:8878", lab.server_other_ip()));
    let (server, _) = super::server_proc::start_listening(&mut server_cmd)
        .with_context(|| format!("starting the rendezvous server in the lab {a} × {b}"))?;
    let server = ServerGuard(server);
    let session = format!("distance-{}-{tag}", std::process::id());
    let peer = |h: Host, name: &str| -> Result<Proc> {
        let mut cmd = lab.command(h, bin);
        cmd.env("NETTOOL_RELAY_FIRST", "true")
            .args(["connect", "--server", &listen, "--session", &session])
            .args(["--secret", "distance", "--timeout", "30s", "--report"])
            .arg(dir.path(&format!("{name}.report.json")))
            .args(case.flags);
        if std::env::var_os(LOG_DIR_VAR).is_some() {
            cmd.env("RUST_LOG", "debug");
        }
        Proc::spawn(cmd)
    };
    let a_data = data(A_BYTES, 2 * u64::from(round) + 1);
    let b_data = data(B_BYTES, 2 * u64::from(round) + 2);

    let mut pb = peer(Host::B, "b")?;
    if pb.waiting.recv_timeout(JOIN_LIMIT).is_err() {
        bail!("B did not join within {JOIN_LIMIT:?}: {}", pb.tail());
    }
    let a_started = Instant::now();
    let mut pa = peer(Host::A, "a")?;
    let fa = pa.feed(a_data.clone())?;
    let fb = pb.feed(b_data.clone())?;
    let end = a_started + RUN_LIMIT;
    let a_status = pa.wait_until(end)?;
    let b_status = pb.wait_until(end)?;
    let _ = fa.join();
    let _ = fb.join();
    let (a_out, _) = pa.output();
    let (b_out, b_first) = pb.output();
    drop(server);

    let a_report = read_report(&dir.path("a.report.json"));
    let paths = a_report["paths"].as_array().cloned().unwrap_or_default();
    let direct = paths.iter().find(|p| p["strategy"] != "relay");
    let final_path = paths
        .last()
        .and_then(|p| p["strategy"].as_str())
        .or_else(|| a_report["strategy"].as_str())
        .map(str::to_owned);
    let mut run = DistanceRun {
        round,
        first_byte_ms: b_first.map(|t| t.saturating_duration_since(a_started).as_millis() as u64),
        direct_ms: direct.and_then(|p| p["from_ms"].as_u64()),
        direct_strategy: direct.and_then(|p| p["strategy"].as_str().map(str::to_owned)),
        final_path,
        a_code: a_status.and_then(|s| s.code()),
        b_code: b_status.and_then(|s| s.code()),
        a_intact: a_out == b_data,
        b_intact: b_out == a_data,
        error: None,
    };
    let mut problems = Vec::new();
    for (name, status, p) in [("A", a_status, &pa), ("B", b_status, &pb)] {
        match status {
            None => problems.push(format!("{name} not done after {RUN_LIMIT:?}: {}", p.tail())),
            Some(s) if !s.success() => {
                problems.push(format!("{name} exited with {s}: {}", p.tail()))
            }
            Some(_) => {}
        }
    }
    if !run.b_intact {
        problems.push(format!(
            "B received {} of A's {} bytes{}",
            b_out.len(),
            a_data.len(),
            if b_out.len() == a_data.len() {
                ", different"
            } else {
                ""
            }
        ));
    }
    if !run.a_intact {
        problems.push(format!(
            "A received {} of B's {} bytes{}",
            a_out.len(),
            b_data.len(),
            if a_out.len() == b_data.len() {
                ", different"
            } else {
                ""
            }
        ));
    }
    if a_report.is_null() {
        problems.push("A wrote no report".into());
    }
    run.error = (!problems.is_empty()).then(|| problems.join("; "));
    if let Some(logs) = std::env::var_os(LOG_DIR_VAR) {
        for (name, p) in [("a", &pa), ("b", &pb)] {
            let file = Path::new(&logs).join(format!("{tag}.{name}.log"));
            let text = p.lines.lock().expect("lines lock").join("\n");
            std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        }
    }
    // The processes end before the lab (its namespaces) goes.
    drop(pa);
    drop(pb);
    drop(lab);
    Ok(run)
}

/// The lab's rendezvous server, killed when dropped.
struct ServerGuard(Child);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p50_counts_missing_runs_as_slowest() {
        assert_eq!(p50(&[Some(3), Some(1), Some(2)]), Some(2));
        assert_eq!(p50(&[Some(3), None, Some(2)]), Some(3));
        assert_eq!(p50(&[None, None, Some(2)]), None);
        assert_eq!(p50(&[]), None);
    }
}
