//! `nettool bench`: time to link, link throughput and rendezvous capacity, in one run.
//!
//! Without `--server` everything runs on this machine: a rendezvous server in a child process
//! (`nettool rendezvous --listen 127.0.0.1:0`, so its memory and CPU can be read from
//! `/proc/<pid>` without the clients' own), both peers in this process.
//!
//! - **Time to link**: per strategy, `--runs` fresh sessions; each run is timed from the later
//!   of the two peers' "paired" events (both joined) to the later of the two `connect` returns
//!   (an authenticated link that both ends agreed on). p50 and p95.
//! - **Throughput**: plain TCP between the same two endpoints (127.0.0.1) and every strategy,
//!   interleaved for `--rounds` rounds, `--size` bytes each way with `compare`'s measurement;
//!   the median per direction counts and each strategy is given as a ratio of plain TCP.
//! - **Rendezvous capacity**: pairings per second (`--pairings` sessions, `--concurrency` of
//!   them in flight, both peers through the real client join path), the server's CPU time per
//!   pairing, and the server's resident memory with `--sessions` sessions waiting for their
//!   second peer (a fresh server per size; VmRSS before and after).
//!
//! With `--server HOST:PORT --session NAME` this process is one peer against an external
//! rendezvous server and measures time to link only (its own view: from its "paired" event to
//! its link); the other peer runs the same command. That is how the NAT lab benchmark
//! (`tests/tests/e2e/bench.rs`) runs two peers in two namespaces. Throughput against plain TCP
//! is measured on loopback only: between two hosts behind NATs there is no plain TCP path to
//! compare with (that is why punching exists); use `nettool compare` there.
//!
//! Targets are printed next to each figure as PASS or MISS; `--check` turns a MISS into exit
//! status 1. Timing is asserted here, never in tests.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use nettool_config::Settings;

use crate::ConfiguredStrategy as StrategyConfig;
use nettool_core::orchestrator::Event;
use nettool_core::protocol::PROTOCOL_VERSION;
use nettool_core::{ConnectParams, Link, Orchestrator, Role};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::compare::{measure, CompareOptions};

mod cli_path;

/// Flags of `nettool bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Without --server: strategies to measure (default: all). With --server (peer mode): act
    /// as one peer against that rendezvous server; the other peer runs the same command.
    #[command(flatten)]
    pub(crate) peer: crate::PeerArgs,
    /// Runs per strategy for the time-to-link figures (p50 and p95).
    #[arg(long, default_value_t = 50)]
    runs: u32,
    /// Bytes sent each way per throughput round (suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long, default_value = "256MiB", value_parser = crate::parse_size)]
    size: u64,
    /// Throughput rounds over plain TCP and every strategy, interleaved; the median counts.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Sessions paired for the pairings-per-second figure.
    #[arg(long, default_value_t = 50_000)]
    pairings: u64,
    /// Pairings in flight at once (twice as many clients).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Numbers of waiting sessions for the memory figure, comma separated (10k = 10000).
    #[arg(long, value_delimiter = ',', default_value = "10k,100k", value_parser = crate::parse_size)]
    sessions: Vec<u64>,
    /// CLI path: bytes per transfer between two `connect` processes (and plain TCP).
    #[arg(long, default_value = "1GiB", value_parser = crate::parse_size)]
    cli_size: u64,
    /// CLI path: how data goes in and out (pipe: the bench feeds and drains pipes; file: a
    /// file into A's stdin, B's stdout into a file). Comma separated.
    #[arg(long, value_delimiter = ',', default_value = "pipe,file", value_enum)]
    cli_mode: Vec<CliMode>,
    /// Soak: transfers (each both ways at once, every byte checked).
    #[arg(long, default_value_t = 200)]
    soak_runs: u32,
    /// Soak: bytes each way per transfer.
    #[arg(long, default_value = "64MiB", value_parser = crate::parse_size)]
    soak_size: u64,
    /// Soak: the strategy soaked (a name `nettool strategies` lists).
    #[arg(long, default_value = "tcp-punch")]
    soak_strategy: String,
    /// CLI path and soak in network namespaces (the NAT lab's ignored tests use these): the
    /// server's, peer A's and peer B's namespace.
    #[arg(long, requires_all = ["cli_netns_a", "cli_netns_b", "cli_server_ip"])]
    cli_netns_server: Option<String>,
    /// See --cli-netns-server.
    #[arg(long)]
    cli_netns_a: Option<String>,
    /// See --cli-netns-server.
    #[arg(long)]
    cli_netns_b: Option<String>,
    /// Address the rendezvous server of the CLI path listens on (default 127.0.0.1).
    #[arg(long)]
    cli_server_ip: Option<IpAddr>,
    /// Address B's plain-TCP listener binds, reachable from A (default 127.0.0.1).
    #[arg(long)]
    cli_b_ip: Option<IpAddr>,
    /// Section to run; repeat for several (default: all; with --server only time-to-link).
    #[arg(long = "section", value_enum)]
    sections: Vec<Section>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Exit with status 1 when a figure misses its target.
    #[arg(long)]
    check: bool,
}

/// A part of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Section {
    /// Time from both peers joined to an authenticated link, per strategy.
    TimeToLink,
    /// Link throughput per strategy against plain TCP.
    Throughput,
    /// Rendezvous pairings per second and memory per waiting session.
    Capacity,
    /// The server's memory per connection under hostile load (`bench_server.rs`).
    ServerMemory,
    /// Two real `connect` processes (stdin → link → stdout) against plain TCP, and their RSS.
    CliPath,
    /// Many transfers both ways at once through real processes, every byte checked (not in
    /// the default set: long).
    Soak,
    /// One `nettool forward` stream against `nettool connect` (only when asked for).
    Forward,
}

/// How the CLI path feeds and drains the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CliMode {
    /// Pipes fed and drained by the bench.
    Pipe,
    /// A file on stdin, a file on stdout.
    File,
}

/// Whether a figure meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Verdict {
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "MISS")]
    Miss,
    /// No target applies, or the figure could not be measured.
    #[serde(rename = "n/a")]
    NotApplicable,
}

impl Verdict {
    fn of(ok: bool) -> Self {
        if ok {
            Self::Pass
        } else {
            Self::Miss
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Miss => "MISS",
            Self::NotApplicable => "n/a",
        }
    }
}

/// Everything one `bench` run measured.
#[derive(Debug, Serialize)]
struct BenchReport {
    /// `loopback` (everything on this machine) or `peer` (one peer against --server).
    mode: &'static str,
    time_to_link: Vec<TimeToLinkRow>,
    throughput: Option<Throughput>,
    capacity: Option<Capacity>,
    server_memory: Option<crate::bench_server::ServerMemory>,
    cli_path: Option<cli_path::CliPath>,
    soak: Option<cli_path::Soak>,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct TimeToLinkRow {
    strategy: String,
    runs: u32,
    linked: u32,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    min_ms: Option<f64>,
    max_ms: Option<f64>,
    /// The target for p50 (set for the NAT lab; loopback is held to the same figure).
    target_p50_ms: f64,
    verdict: Verdict,
    /// Why runs failed (the first error), if any did.
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Throughput {
    size: u64,
    rounds: u32,
    rows: Vec<ThroughputRow>,
}

#[derive(Debug, Serialize)]
struct ThroughputRow {
    link: String,
    /// Median MB/s (10^6 bytes/s) from the first peer to the second.
    first_to_second_mbps: Option<f64>,
    /// Median MB/s from the second peer to the first.
    second_to_first_mbps: Option<f64>,
    /// Mean of both directions over plain TCP's mean.
    ratio: Option<f64>,
    target_ratio: Option<f64>,
    verdict: Verdict,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Capacity {
    /// RLIMIT_NOFILE (soft) this process and the server ran with.
    nofile_limit: u64,
    pairing: Option<PairingRate>,
    memory: Vec<MemoryRow>,
}

#[derive(Debug, Serialize)]
struct PairingRate {
    pairings: u64,
    failed: u64,
    concurrency: usize,
    seconds: f64,
    /// Pairings per second of wall time, clients and server on the same cores.
    per_second: f64,
    /// CPU seconds the server process used during the run.
    server_cpu_seconds: f64,
    /// CPU seconds this (client) process used during the run.
    client_cpu_seconds: f64,
    /// Pairings per second the server could do with `cores` cores to itself (its CPU time per
    /// pairing, extrapolated).
    server_only_per_second: Option<f64>,
    cores: usize,
    target_per_second: f64,
    verdict: Verdict,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct MemoryRow {
    sessions: u64,
    reached: u64,
    /// Server VmRSS before the sessions were opened, KiB.
    rss_before_kib: Option<u64>,
    /// Server VmRSS with `reached` sessions waiting, KiB.
    rss_after_kib: Option<u64>,
    /// (after - before) / reached, bytes.
    bytes_per_session: Option<f64>,
    /// Server RSS projected to 100k sessions from this size's per-session figure, MB.
    projected_100k_mb: Option<f64>,
    target_100k_mb: f64,
    /// Against the target, for 100k sessions actually reached (`n/a` otherwise).
    verdict: Verdict,
    /// The projection against the target (for sizes of 100k that could not be reached).
    projected_verdict: Verdict,
    /// Why fewer sessions than asked for were reached.
    error: Option<String>,
}

fn target_time_to_link_ms(s: &str) -> f64 {
    match s {
        "udp-quic" => 15.0,
        _ => 5.0,
    }
}

fn target_ratio(s: &str) -> f64 {
    match s {
        "udp-quic" => 0.3,
        "relay" => 0.5,
        _ => 0.6,
    }
}

const TARGET_PAIRINGS_PER_SECOND: f64 = 10_000.0;
const TARGET_100K_MB: f64 = 500.0;

/// `nettool bench`.
pub(crate) async fn run(
    args: BenchArgs,
    settings: Settings,
    configs: &[StrategyConfig],
) -> Result<i32> {
    let peer_mode = args.peer.server.is_some();
    let sections: Vec<Section> = if args.sections.is_empty() {
        if peer_mode {
            vec![Section::TimeToLink]
        } else {
            vec![
                Section::TimeToLink,
                Section::Throughput,
                Section::Capacity,
                Section::ServerMemory,
                Section::CliPath,
            ]
        }
    } else {
        args.sections.clone()
    };
    if peer_mode && sections.iter().any(|s| *s != Section::TimeToLink) {
        bail!(
            "with --server only the time-to-link section runs (throughput against plain TCP and \
             the rendezvous capacity are measured on loopback, without --server)"
        );
    }
    let quiet = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = |line: &str| {
        if !quiet {
            eprintln!("nettool bench: {line}");
        }
    };
    let mut report = BenchReport {
        mode: if peer_mode { "peer" } else { "loopback" },
        time_to_link: Vec::new(),
        throughput: None,
        capacity: None,
        server_memory: None,
        cli_path: None,
        soak: None,
        notes: vec![
            "links are measured as this build makes them, encryption included (TLS on the TCP \
             links and the relay, QUIC's own on udp-quic)"
                .into(),
        ],
    };
    if peer_mode {
        let server = crate::resolve_server(settings.server.as_deref().unwrap_or_default()).await?;
        let session = settings.session.clone().unwrap_or_default();
        if session.is_empty() {
            bail!("no session: give --session NAME (the other peer gives the same)");
        }
        let params = ConnectParams {
            server,
            session,
            secret: settings.secret.clone(),
        };
        for config in configs {
            let orch = crate::orchestrator(std::slice::from_ref(config), settings.timeout)
                .with_server_token(settings.server_token.clone());
            report
                .time_to_link
                .push(time_to_link_peer(&orch, config.name(), &params, args.runs, &progress).await);
        }
        report.notes.push(
            "peer mode: each run is timed from this peer's \"paired\" event to its own link; \
             targets are for the NAT lab"
                .into(),
        );
    } else {
        let server = ServerProc::spawn(&[])
            .await
            .context("starting the rendezvous server")?;
        let params = ConnectParams {
            server: server.addr,
            session: format!("bench-{}", std::process::id()),
            secret: Some("bench".into()),
        };
        if sections.contains(&Section::TimeToLink) {
            for config in configs {
                report.time_to_link.push(
                    time_to_link_local(config, settings.timeout, &params, args.runs, &progress)
                        .await,
                );
            }
            report.notes.push(
                "time to link: from both peers paired to the link on both ends (the server's \
                 RTT probe, the strategy, the link handshake and the result exchange), loopback; \
                 the targets are for the NAT lab"
                    .into(),
            );
        }
        if sections.contains(&Section::Throughput) {
            report.throughput = Some(
                throughput(
                    configs,
                    settings.timeout,
                    &params,
                    args.size,
                    args.rounds,
                    &progress,
                )
                .await,
            );
        }
        if sections.contains(&Section::Forward) {
            let lines = crate::bench_forward::run(server.addr, configs, args.size, &progress);
            report.notes.extend(lines.await);
        }
        drop(server);
        if sections.contains(&Section::Capacity) {
            let (capacity, notes) = capacity(&args, &progress).await;
            report.capacity = Some(capacity);
            report.notes.extend(notes);
        }
        if sections.contains(&Section::ServerMemory) {
            report.server_memory = Some(crate::bench_server::measure(&progress).await);
        }
        if sections.contains(&Section::CliPath) || sections.contains(&Section::Soak) {
            let place = cli_path::Placement {
                netns_server: args.cli_netns_server.clone(),
                netns_a: args.cli_netns_a.clone(),
                netns_b: args.cli_netns_b.clone(),
                server_ip: args
                    .cli_server_ip
                    .unwrap_or(cli_path::Placement::loopback().server_ip),
                b_ip: args
                    .cli_b_ip
                    .unwrap_or(cli_path::Placement::loopback().b_ip),
            };
            let links: Vec<String> = if args.peer.strategies.is_empty() {
                ["tcp-punch", "tcp-direct", "relay", "udp-quic"]
                    .map(str::to_owned)
                    .to_vec()
            } else {
                args.peer.strategies.iter().map(String::clone).collect()
            };
            let modes: Vec<cli_path::IoMode> = args
                .cli_mode
                .iter()
                .map(|m| match m {
                    CliMode::Pipe => cli_path::IoMode::Pipe,
                    CliMode::File => cli_path::IoMode::File,
                })
                .collect();
            let (size, rounds) = (args.cli_size, args.rounds.max(1));
            let (soak_runs, soak_size) = (args.soak_runs, args.soak_size);
            let soak_link = args.soak_strategy.clone();
            let want_cli = sections.contains(&Section::CliPath);
            let want_soak = sections.contains(&Section::Soak);
            let (cli, soak) = tokio::task::spawn_blocking(move || {
                let show = |line: &str| {
                    if !quiet {
                        eprintln!("nettool bench: {line}");
                    }
                };
                let cli = want_cli
                    .then(|| cli_path::run(&place, &links, &modes, size, rounds, &show))
                    .transpose()?;
                let soak = want_soak
                    .then(|| cli_path::soak(&place, &soak_link, soak_size, soak_runs, &show))
                    .transpose()?;
                Ok::<_, anyhow::Error>((cli, soak))
            })
            .await
            .context("the CLI-path task")??;
            report.cli_path = cli;
            report.soak = soak;
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", render(&report));
    }
    let missed = verdicts(&report).any(|v| v == Verdict::Miss);
    Ok(if args.check && missed { 1 } else { 0 })
}

fn verdicts(r: &BenchReport) -> impl Iterator<Item = Verdict> + '_ {
    r.time_to_link
        .iter()
        .map(|t| t.verdict)
        .chain(
            r.throughput
                .iter()
                .flat_map(|t| t.rows.iter().map(|x| x.verdict)),
        )
        .chain(r.capacity.iter().flat_map(|c| {
            c.pairing
                .iter()
                .map(|p| p.verdict)
                .chain(c.memory.iter().map(|m| m.verdict))
        }))
        .chain(r.server_memory.iter().map(|m| Verdict::of(m.pass)))
        .chain(
            r.cli_path
                .iter()
                .flat_map(|c| c.rows.iter().flat_map(|x| [x.verdict, x.rss_verdict])),
        )
        .chain(r.soak.iter().map(|s| s.verdict))
}

// ---------------------------------------------------------------------------------------------
// The rendezvous server in a child process.

/// `nettool rendezvous --listen 127.0.0.1:0` as a child; killed when dropped.
struct ServerProc {
    child: Child,
    addr: SocketAddr,
}

impl ServerProc {
    /// Starts the server; the child's output is read on a blocking-pool thread, not on an
    /// async worker.
    async fn spawn(extra: &[&str]) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || Self::spawn_blocking(&extra))
            .await
            .context("the server start task")?
    }

    fn spawn_blocking(extra: &[String]) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the nettool binary")?;
        let mut child = Command::new(exe)
            .args([
                "rendezvous",
                "--listen",
                "127.0.0.1:0",
                "--relay-max-sessions",
                "10000",
                "--relay-rate",
                "0",
                "--relay-max-bytes",
                "0",
                "--relay-max-duration",
                "0s",
            ])
            .args(unlimited_flags())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running `nettool rendezvous`")?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        let addr = loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the rendezvous server ended before listening");
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                break addr
                    .parse::<SocketAddr>()
                    .with_context(|| format!("bad address in the server's line {line:?}"))?;
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Ok(Self { child, addr })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Flags that lift the server's per-source-address limits (connections and joins per second
/// per IP address, sessions at once) where this build has them: every benchmark client comes
/// from loopback, and the figures are about the server's own capacity.
fn unlimited_flags() -> Vec<&'static str> {
    static FLAGS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    FLAGS
        .get_or_init(|| {
            let help = std::env::current_exe()
                .and_then(|exe| Command::new(exe).args(["rendezvous", "--help"]).output())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            [
                "--max-conns-per-ip",
                "--max-sessions",
                "--join-rate",
                "--stun-rate",
            ]
            .into_iter()
            .filter(|f| help.contains(f))
            .flat_map(|f| [f, "0"])
            .collect()
        })
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Time to link.

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ttl_row(name: &str, runs: u32, mut times: Vec<f64>, error: Option<String>) -> TimeToLinkRow {
    times.sort_by(f64::total_cmp);
    let target = target_time_to_link_ms(name);
    let p50 = percentile(&times, 50.0);
    TimeToLinkRow {
        strategy: name.into(),
        runs,
        linked: times.len() as u32,
        p50_ms: p50,
        p95_ms: percentile(&times, 95.0),
        min_ms: times.first().copied(),
        max_ms: times.last().copied(),
        target_p50_ms: target,
        verdict: match p50 {
            Some(p) if times.len() as u32 == runs => Verdict::of(p <= target),
            _ => Verdict::Miss,
        },
        error,
    }
}

/// One connect as one peer: the link (if any), its role, and when it was paired and done.
async fn connect_timed(
    orch: &Orchestrator,
    params: &ConnectParams,
) -> (Result<(Link, Role)>, Option<Instant>, Instant) {
    let paired = Mutex::new(None);
    let (link, report) = orch
        .connect(params, &|e| {
            if matches!(e, Event::Paired { .. }) {
                *paired.lock().expect("paired lock") = Some(Instant::now());
            }
        })
        .await;
    let end = Instant::now();
    let paired = *paired.lock().expect("paired lock");
    let res = match (link, report.role) {
        (Some(l), Some(r)) => Ok((l, r)),
        _ => Err(anyhow::anyhow!(
            "{}",
            report
                .attempts
                .first()
                .and_then(|a| a.error.clone())
                .or(report.error)
                .unwrap_or_else(|| "no link".into())
        )),
    };
    (res, paired, end)
}

/// Both peers in this process link once with `config`; returns the time from both paired to
/// both linked, and both ends of the link with their roles.
async fn link_pair(
    config: &StrategyConfig,
    overall: Duration,
    params: &ConnectParams,
) -> Result<(Duration, (Link, Role), (Link, Role))> {
    let a = crate::orchestrator(std::slice::from_ref(config), overall);
    let b = crate::orchestrator(std::slice::from_ref(config), overall);
    let ((ra, pa, ea), (rb, pb, eb)) =
        tokio::join!(connect_timed(&a, params), connect_timed(&b, params));
    let (la, lb) = (ra?, rb?);
    let paired = pa.max(pb).context("no paired event")?;
    Ok((ea.max(eb).duration_since(paired), la, lb))
}

async fn time_to_link_local(
    config: &StrategyConfig,
    overall: Duration,
    base: &ConnectParams,
    runs: u32,
    progress: &dyn Fn(&str),
) -> TimeToLinkRow {
    let name = config.name();
    progress(&format!("time to link: {name} x {runs} ..."));
    let mut times = Vec::new();
    let mut error = None;
    for i in 0..runs {
        let params = ConnectParams {
            session: format!("{}/ttl/{name}/{i}", base.session),
            ..base.clone()
        };
        match link_pair(config, overall, &params).await {
            Ok((t, _, _)) => times.push(ms(t)),
            Err(e) => {
                error.get_or_insert_with(|| format!("run {i}: {e:#}"));
            }
        }
    }
    ttl_row(name, runs, times, error)
}

async fn time_to_link_peer(
    orch: &Orchestrator,
    name: &str,
    base: &ConnectParams,
    runs: u32,
    progress: &dyn Fn(&str),
) -> TimeToLinkRow {
    progress(&format!("time to link: {name} x {runs} ..."));
    let mut times = Vec::new();
    let mut error = None;
    for i in 0..runs {
        let params = ConnectParams {
            session: format!("{}/ttl/{name}/{i}", base.session),
            ..base.clone()
        };
        let (res, paired, end) = connect_timed(orch, &params).await;
        match (res, paired) {
            (Ok((link, _)), Some(p)) => {
                times.push(ms(end.duration_since(p)));
                // Let the peer finish too before the next run reuses nothing but the server.
                drop(link);
            }
            (Ok(_), None) => {
                error.get_or_insert_with(|| format!("run {i}: no paired event"));
            }
            (Err(e), _) => {
                error.get_or_insert_with(|| format!("run {i}: {e:#}"));
            }
        }
    }
    ttl_row(name, runs, times, error)
}

// ---------------------------------------------------------------------------------------------
// Throughput.

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

/// Two ends of a plain TCP connection on loopback, as links (first = the dialer).
async fn plain_tcp_pair() -> Result<((Link, Role), (Link, Role))> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (dialed, (accepted, _)) = (dialed?, accepted?);
    let as_link = |s: TcpStream| -> Result<Link> {
        let _ = s.set_nodelay(true);
        Ok(Link {
            local: s.local_addr()?,
            remote: s.peer_addr()?,
            stream: Box::new(s),
            strategy: "plain-tcp",
        })
    };
    Ok((
        (as_link(dialed)?, Role::First),
        (as_link(accepted)?, Role::Second),
    ))
}

async fn measure_pair(
    a: (Link, Role),
    b: (Link, Role),
    size: u64,
    limit: Duration,
) -> Result<(f64, f64)> {
    let options = CompareOptions {
        rounds: 1,
        size,
        pings: 1,
    };
    let both = async { tokio::join!(measure(a.0, a.1, &options), measure(b.0, b.1, &options)) };
    let (ma, mb) = tokio::time::timeout(limit, both)
        .await
        .context("the transfer timed out")?;
    let (ma, _) = (ma?, mb?);
    Ok((ma.first_to_second, ma.second_to_first))
}

async fn throughput(
    configs: &[StrategyConfig],
    overall: Duration,
    base: &ConnectParams,
    size: u64,
    rounds: u32,
    progress: &dyn Fn(&str),
) -> Throughput {
    // Index 0: plain TCP; then the strategies in order.
    let n = configs.len() + 1;
    let mut f2s: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut s2f: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut errors: Vec<Option<String>> = vec![None; n];
    let limit = overall.max(Duration::from_secs(60));
    for round in 1..=rounds.max(1) {
        progress(&format!("throughput: round {round}, plain TCP ..."));
        let plain = async {
            let (a, b) = plain_tcp_pair().await?;
            measure_pair(a, b, size, limit).await
        };
        match plain.await {
            Ok((x, y)) => {
                f2s[0].push(x);
                s2f[0].push(y);
            }
            Err(e) => {
                errors[0].get_or_insert_with(|| format!("round {round}: {e:#}"));
            }
        }
        for (i, config) in configs.iter().enumerate() {
            let name = config.name();
            progress(&format!("throughput: round {round}, {name} ..."));
            let params = ConnectParams {
                session: format!("{}/tput/{name}/{round}", base.session),
                ..base.clone()
            };
            let one = async {
                let (_, a, b) = link_pair(config, overall, &params).await?;
                measure_pair(a, b, size, limit).await
            };
            match one.await {
                Ok((x, y)) => {
                    f2s[i + 1].push(x);
                    s2f[i + 1].push(y);
                }
                Err(e) => {
                    errors[i + 1].get_or_insert_with(|| format!("round {round}: {e:#}"));
                }
            }
        }
    }
    let medians: Vec<(Option<f64>, Option<f64>)> = (0..n)
        .map(|i| (median(f2s[i].clone()), median(s2f[i].clone())))
        .collect();
    let mean = |m: (Option<f64>, Option<f64>)| match m {
        (Some(x), Some(y)) => Some((x + y) / 2.0),
        _ => None,
    };
    let plain = mean(medians[0]);
    let mut rows = vec![ThroughputRow {
        link: "plain TCP".into(),
        first_to_second_mbps: medians[0].0,
        second_to_first_mbps: medians[0].1,
        ratio: plain.map(|_| 1.0),
        target_ratio: None,
        verdict: Verdict::NotApplicable,
        error: errors[0].take(),
    }];
    for (i, config) in configs.iter().enumerate() {
        let name = config.name();
        let ratio = match (mean(medians[i + 1]), plain) {
            (Some(x), Some(p)) if p > 0.0 => Some(x / p),
            _ => None,
        };
        let target = target_ratio(name);
        rows.push(ThroughputRow {
            link: name.into(),
            first_to_second_mbps: medians[i + 1].0,
            second_to_first_mbps: medians[i + 1].1,
            ratio,
            target_ratio: Some(target),
            verdict: match ratio {
                Some(r) if errors[i + 1].is_none() => Verdict::of(r >= target),
                _ => Verdict::Miss,
            },
            error: errors[i + 1].take(),
        });
    }
    Throughput { size, rounds, rows }
}

// ---------------------------------------------------------------------------------------------
// Rendezvous capacity.

/// Open files this process may have; raised (soft, and hard when allowed) towards `want`.
/// Returns the soft limit in force afterwards and why it is lower than `want`, if it is.
fn raise_nofile(want: u64) -> (u64, Option<String>) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (0, Some("getrlimit(RLIMIT_NOFILE) failed".into()));
    }
    let cur = lim.rlim_cur;
    if cur >= want {
        return (cur, None);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    let hard_wanted = want.min(nr_open).max(lim.rlim_max);
    let try_set = |soft: u64, hard: u64| {
        let l = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct we pass.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 }
    };
    if try_set(want.min(hard_wanted), hard_wanted) {
        let got = want.min(hard_wanted);
        let why = (got < want).then(|| format!("/proc/sys/fs/nr_open is {nr_open}"));
        return (got, why);
    }
    let err = std::io::Error::last_os_error();
    let hard = lim.rlim_max;
    let soft = want.min(hard);
    if soft > cur && try_set(soft, hard) {
        return (
            soft,
            Some(format!(
                "the hard RLIMIT_NOFILE is {hard} and raising it failed ({err}; root may raise it up to /proc/sys/fs/nr_open = {nr_open})"
            )),
        );
    }
    (
        cur,
        Some(format!(
            "RLIMIT_NOFILE is {cur} (hard {hard}) and raising it failed ({err})"
        )),
    )
}

fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of a process, seconds.
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at the state (field 3).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

async fn capacity(args: &BenchArgs, progress: &dyn Fn(&str)) -> (Capacity, Vec<String>) {
    let mut notes = Vec::new();
    let biggest = args.sessions.iter().copied().max().unwrap_or(0);
    let margin = 2 * args.concurrency as u64 + 1024;
    let (limit, why_low) = raise_nofile(biggest + margin);
    if let Some(why) = &why_low {
        notes.push(format!("open files: {why}"));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    progress(&format!(
        "capacity: {} pairings, {} in flight ...",
        args.pairings, args.concurrency
    ));
    let pairing = pairing_rate(args.pairings, args.concurrency, cores).await;
    notes.push(format!(
        "pairings: clients (in this process) and the server (a child process) share {cores} \
         cores; \"server-only\" extrapolates the server's CPU time per pairing to {cores} cores \
         of its own"
    ));
    let mut memory = Vec::new();
    for &n in &args.sessions {
        progress(&format!("capacity: {n} waiting sessions ..."));
        memory.push(
            waiting_sessions(
                n,
                limit.saturating_sub(margin),
                why_low.as_deref(),
                args.concurrency,
            )
            .await,
        );
    }
    notes.push(
        "memory: the rendezvous server's VmRSS (a child process, so the clients' memory is not \
         counted); kernel socket memory is not in RSS"
            .into(),
    );
    (
        Capacity {
            nofile_limit: limit,
            pairing: Some(pairing),
            memory,
        },
        notes,
    )
}

async fn pairing_rate(total: u64, concurrency: usize, cores: usize) -> PairingRate {
    let mut rate = PairingRate {
        pairings: 0,
        failed: 0,
        concurrency,
        seconds: 0.0,
        per_second: 0.0,
        server_cpu_seconds: 0.0,
        client_cpu_seconds: 0.0,
        server_only_per_second: None,
        cores,
        target_per_second: TARGET_PAIRINGS_PER_SECOND,
        verdict: Verdict::Miss,
        error: None,
    };
    let server = match ServerProc::spawn(&[]).await {
        Ok(s) => s,
        Err(e) => {
            rate.error = Some(format!("starting the server: {e:#}"));
            return rate;
        }
    };
    let addr = server.addr;
    let tag = std::process::id();
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let server_cpu0 = proc_cpu_seconds(server.pid()).unwrap_or(0.0);
    let own_cpu0 = proc_cpu_seconds(std::process::id()).unwrap_or(0.0);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (next, done, failed, first_error) = (
            next.clone(),
            done.clone(),
            failed.clone(),
            first_error.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let session = format!("pair-{tag}-{i}");
                let both = async {
                    tokio::join!(
                        raw_join(addr, None, session.clone(), "paired"),
                        raw_join(addr, None, session.clone(), "paired"),
                    )
                };
                let res = match tokio::time::timeout(Duration::from_secs(30), both).await {
                    Ok((a, b)) => a.and(b).map(|_| ()),
                    Err(_) => Err(anyhow::anyhow!("no pairing within 30 s")),
                };
                match res {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .expect("error lock")
                            .get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let server_cpu = proc_cpu_seconds(server.pid()).unwrap_or(0.0) - server_cpu0;
    let own_cpu = proc_cpu_seconds(std::process::id()).unwrap_or(0.0) - own_cpu0;
    rate.pairings = done.load(Ordering::Relaxed);
    rate.failed = failed.load(Ordering::Relaxed);
    rate.seconds = secs;
    rate.per_second = rate.pairings as f64 / secs;
    rate.server_cpu_seconds = server_cpu;
    rate.client_cpu_seconds = own_cpu;
    rate.server_only_per_second =
        (server_cpu > 0.0).then(|| rate.pairings as f64 / server_cpu * cores as f64);
    rate.error = first_error.lock().expect("error lock").take();
    rate.verdict = Verdict::of(rate.failed == 0 && rate.per_second >= TARGET_PAIRINGS_PER_SECOND);
    rate
}

/// Opens one control connection (from `src` when given) and joins `session` with a hand-written
/// join frame; returns once the server sent a frame of type `until` (`waiting`, `paired`).
///
/// Not the real client (`RendezvousClient::join`): the clients here must be cheap and leave no
/// TIME_WAIT behind (zero linger: closing sends a reset), or the benchmark would measure the
/// kernel's search for a free ephemeral port instead of the server. The server does the same
/// work either way.
async fn raw_join(
    server: SocketAddr,
    src: Option<Ipv4Addr>,
    session: String,
    until: &str,
) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_zero_linger()?;
    if let Some(src) = src {
        // Pick the port at connect time, unique per 4-tuple, not at bind time (where every
        // source address would share one range and each bind scans it).
        let one: libc::c_int = 1;
        // SAFETY: the fd is valid for the call; the option value is a c_int we own.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
        }
        socket
            .bind(SocketAddr::new(src.into(), 0))
            .with_context(|| format!("binding a client socket on {src}"))?;
    }
    let _ = socket.set_nodelay(true);
    let mut stream = socket.connect(server).await.context("connecting")?;
    // Written by hand (the fields every server version takes) rather than built from the
    // message type, so the figure does not depend on optional fields added later.
    let join = serde_json::json!({
        "type": "join",
        "version": PROTOCOL_VERSION,
        "session": session,
        "strategies": ["relay"],
    });
    stream.write_all(format!("{join}\n").as_bytes()).await?;
    let want = format!("\"type\":\"{until}\"");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if text.contains(&want) {
            return Ok(stream);
        }
        if text.contains("\"type\":\"error\"") {
            bail!("refused: {}", text.trim());
        }
    }
}

async fn waiting_sessions(
    n: u64,
    fd_budget: u64,
    why_low: Option<&str>,
    concurrency: usize,
) -> MemoryRow {
    let mut row = MemoryRow {
        sessions: n,
        reached: 0,
        rss_before_kib: None,
        rss_after_kib: None,
        bytes_per_session: None,
        projected_100k_mb: None,
        target_100k_mb: TARGET_100K_MB,
        verdict: Verdict::NotApplicable,
        projected_verdict: Verdict::NotApplicable,
        error: None,
    };
    let goal = n.min(fd_budget);
    if goal < n {
        row.error = Some(format!(
            "only {goal} of {n} sessions fit in the open-file limit: {}",
            why_low.unwrap_or("RLIMIT_NOFILE too low")
        ));
    }
    let server = match ServerProc::spawn(&["--session-expiry", "1h"]).await {
        Ok(s) => s,
        Err(e) => {
            row.error = Some(format!("starting the server: {e:#}"));
            row.verdict = Verdict::Miss;
            return row;
        }
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    row.rss_before_kib = proc_rss_kib(server.pid());
    let tag = std::process::id();
    // One source address per 10k connections: each address has its own ephemeral ports.
    let mut streams = Vec::with_capacity(goal as usize);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    let mut failure = None;
    while i < goal || !tasks.is_empty() {
        while i < goal && tasks.len() < concurrency.max(1) && failure.is_none() {
            let src = Ipv4Addr::new(127, 0, 0, (2 + i / 10_000 % 250) as u8);
            tasks.spawn(raw_join(
                server.addr,
                Some(src),
                format!("wait-{tag}-{i}"),
                "waiting",
            ));
            i += 1;
        }
        match tasks.join_next().await {
            Some(Ok(Ok(s))) => streams.push(s),
            Some(Ok(Err(e))) => {
                failure.get_or_insert_with(|| format!("{e:#}"));
            }
            Some(Err(e)) => {
                failure.get_or_insert_with(|| e.to_string());
            }
            None => break,
        }
        if failure.is_some() && i < goal {
            // Stop opening more; drain what is in flight.
            i = goal;
        }
    }
    row.reached = streams.len() as u64;
    tokio::time::sleep(Duration::from_millis(300)).await;
    row.rss_after_kib = proc_rss_kib(server.pid());
    if let Some(f) = failure {
        let msg = format!("reached {} of {n} sessions: {f}", row.reached);
        row.error = Some(match row.error.take() {
            Some(e) => format!("{e}; {msg}"),
            None => msg,
        });
    }
    if let (Some(b), Some(a)) = (row.rss_before_kib, row.rss_after_kib) {
        if row.reached > 0 {
            let per = (a.saturating_sub(b) * 1024) as f64 / row.reached as f64;
            row.bytes_per_session = Some(per);
            row.projected_100k_mb = Some((b * 1024) as f64 / 1e6 + per * 100_000.0 / 1e6);
        }
    }
    if n >= 100_000 {
        match row.rss_after_kib {
            Some(a) if row.reached >= 100_000 => {
                row.verdict = Verdict::of((a * 1024) as f64 / 1e6 <= TARGET_100K_MB);
            }
            _ => {
                row.projected_verdict = row
                    .projected_100k_mb
                    .map_or(Verdict::Miss, |mb| Verdict::of(mb <= TARGET_100K_MB));
            }
        }
    }
    drop(streams);
    drop(server);
    row
}

// ---------------------------------------------------------------------------------------------
// Output.

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map_or("-".to_owned(), |x| format!("{x:.digits$}{unit}"))
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header.to_vec());
    t
}

fn render(r: &BenchReport) -> String {
    let mut out = String::new();
    if !r.time_to_link.is_empty() {
        let what = if r.mode == "peer" {
            "this peer: from its \"paired\" event to its link"
        } else {
            "loopback: from both peers paired to the link on both ends"
        };
        out += &format!("Time to link ({what})\n");
        let mut t = table(&[
            "strategy",
            "linked",
            "p50",
            "p95",
            "min",
            "max",
            "target p50",
            "",
            "error",
        ]);
        for row in &r.time_to_link {
            t.add_row([
                row.strategy.clone(),
                format!("{}/{}", row.linked, row.runs),
                opt(row.p50_ms, 2, " ms"),
                opt(row.p95_ms, 2, " ms"),
                opt(row.min_ms, 2, " ms"),
                opt(row.max_ms, 2, " ms"),
                format!("≤ {} ms", row.target_p50_ms),
                row.verdict.as_str().into(),
                row.error.clone().unwrap_or_default(),
            ]);
        }
        out += &format!("{t}\n\n");
    }
    if let Some(tp) = &r.throughput {
        out += &format!(
            "Throughput (loopback, {} bytes each way, median of {} rounds)\n",
            tp.size, tp.rounds
        );
        let mut t = table(&[
            "link",
            "first→second",
            "second→first",
            "vs plain TCP",
            "target",
            "",
            "error",
        ]);
        for row in &tp.rows {
            t.add_row([
                row.link.clone(),
                opt(row.first_to_second_mbps, 0, " MB/s"),
                opt(row.second_to_first_mbps, 0, " MB/s"),
                opt(row.ratio, 2, "×"),
                row.target_ratio
                    .map_or(String::new(), |x| format!("≥ {x}×")),
                row.verdict.as_str().into(),
                row.error.clone().unwrap_or_default(),
            ]);
        }
        out += &format!("{t}\n\n");
    }
    if let Some(c) = &r.capacity {
        out += &format!("Rendezvous capacity (open-file limit {})\n", c.nofile_limit);
        let mut t = table(&["figure", "value", "target", "", "detail"]);
        if let Some(p) = &c.pairing {
            t.add_row([
                "pairings per second".to_owned(),
                format!("{:.0}/s", p.per_second),
                format!("≥ {:.0}/s", p.target_per_second),
                p.verdict.as_str().into(),
                format!(
                    "{} paired ({} failed) in {:.2} s, {} in flight; server CPU {:.2} s ({:.1} µs per pairing, server-only on {} cores: {}), clients' CPU {:.2} s{}",
                    p.pairings,
                    p.failed,
                    p.seconds,
                    p.concurrency,
                    p.server_cpu_seconds,
                    p.server_cpu_seconds * 1e6 / (p.pairings.max(1) as f64),
                    p.cores,
                    opt(p.server_only_per_second, 0, "/s"),
                    p.client_cpu_seconds,
                    p.error.as_deref().map(|e| format!("; {e}")).unwrap_or_default()
                ),
            ]);
        }
        for m in &c.memory {
            t.add_row([
                format!("server RSS, {} waiting sessions", m.sessions),
                opt(m.rss_after_kib.map(|k| k as f64 * 1024.0 / 1e6), 1, " MB"),
                if m.sessions >= 100_000 {
                    format!("≤ {} MB", m.target_100k_mb)
                } else {
                    String::new()
                },
                if m.projected_verdict == Verdict::NotApplicable {
                    m.verdict.as_str().into()
                } else {
                    format!("n/a (projected: {})", m.projected_verdict.as_str())
                },
                format!(
                    "{} reached; {} before; {} per session; projected to 100k: {}{}",
                    m.reached,
                    opt(m.rss_before_kib.map(|k| k as f64 * 1024.0 / 1e6), 1, " MB"),
                    opt(m.bytes_per_session, 0, " B"),
                    opt(m.projected_100k_mb, 0, " MB"),
                    m.error
                        .as_deref()
                        .map(|e| format!("; {e}"))
                        .unwrap_or_default()
                ),
            ]);
        }
        out += &format!("{t}\n\n");
    }
    if let Some(m) = &r.server_memory {
        out += &format!("{}\n", m.render());
    }
    if let Some(c) = &r.cli_path {
        out += &format!(
            "CLI path ({}: two real processes, {} bytes per transfer, median of {} rounds; {})\n",
            c.placement, c.size, c.rounds, c.ktls
        );
        let mut t = table(&[
            "link",
            "stdin→stdout",
            "time",
            "rate",
            "vs plain TCP",
            "target",
            "",
            "peak RSS",
            "≤ 32 MB",
            "error",
        ]);
        for row in &c.rows {
            t.add_row([
                row.link.clone(),
                match row.mode {
                    cli_path::IoMode::Pipe => "pipe→pipe".to_owned(),
                    cli_path::IoMode::File => "file→file".to_owned(),
                    cli_path::IoMode::Both => "both ways".to_owned(),
                },
                opt(row.seconds, 3, " s"),
                opt(row.mb_per_s, 0, " MB/s"),
                opt(row.ratio, 2, "×"),
                row.target_ratio
                    .map_or(String::new(), |x| format!("≥ {x}×")),
                row.verdict.as_str().into(),
                format!("{:.1} MB", row.peak_rss_mb),
                row.rss_verdict.as_str().into(),
                row.error.clone().unwrap_or_default(),
            ]);
        }
        out += &format!("{t}\n\n");
    }
    if let Some(s) = &r.soak {
        out += &format!(
            "Soak ({} transfers over {}, {} bytes each way at once, every byte checked)\n",
            s.runs, s.link, s.size
        );
        let mut t = table(&["ok", "stalls", "failed", "median", "max", "peak RSS", ""]);
        t.add_row([
            format!("{}/{}", s.ok, s.runs),
            s.stalls.to_string(),
            s.failures.len().to_string(),
            opt(s.median_seconds, 3, " s"),
            opt(s.max_seconds, 3, " s"),
            format!("{:.1} MB", s.peak_rss_mb),
            s.verdict.as_str().into(),
        ]);
        out += &format!("{t}\n");
        for f in s.failures.iter().take(10) {
            out += &format!("  {f}\n");
        }
        out += "\n";
    }
    for n in &r.notes {
        out += &format!("note: {n}\n");
    }
    out.trim_end().to_owned()
}
