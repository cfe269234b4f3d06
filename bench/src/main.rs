//! `nettool-bench`: time to link, link throughput and rendezvous capacity, in one run.
//!
//! It runs `nettool` child processes (the rendezvous server, the CLI path's peers): the binary
//! `NETTOOL_BIN` names, else the `nettool` next to this executable ([`nettool_bin`]).
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
//!   them in flight, both peers through the real client join path), plain and over the
//!   control channel's TLS, the server's CPU time per pairing, and the server's resident
//!   memory with `--sessions` sessions waiting for their second peer (a fresh server per size;
//!   VmRSS before and after).
//! - **CLI path** (`--section cli-path`): two real `nettool connect` processes per strategy,
//!   stdin → stdout, against socat with 1 MiB buffers and a plain TCP pump on the same path,
//!   in a routed NAT lab of its own (none × none, MTU 1,500) when this machine can build one
//!   (root, nftables), else on loopback, labelled as the fallback (`cli_path.rs`).
//! - **Cluster** (`--section cluster`, not in the default set: needs `redis-server`): pairings
//!   per second through two nodes sharing sessions in Redis against one in-process node, and
//!   the CPU per pairing Redis adds (`cluster.rs`).
//! - **Distance** (`--section distance`, not in the default set: needs root and the NAT lab):
//!   relay-first at a real round trip (`--distance-rtt`, 100 ms), per pair of NAT kinds and
//!   `--rounds` rounds in a fresh lab each: A's first byte on B's stdout and the move to the
//!   direct path, in ms and round trips since A's start, against 5 and 8 round trips
//!   (`distance.rs`). Without the lab it prints `distance: skipped: <reason>`.
//! - **Pairs** (`--section pairs`, not in the default set): `--pair-count` relay-first pairs
//!   (1,000) at once through one server, the peers in this process through the library API
//!   (`nettool_peer`), `--pair-size` (1 MiB) each way per pair, every byte checked; the
//!   server's peak RSS and CPU (`pairs.rs`).
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

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use nettool_config::Settings;
use nettool_core::ConnectParams;
use serde::Serialize;

use nettool::bench_support::{
    exit_status, init_logging, parse_size, peer_settings, reexec_with_tuned_memcpy, ConfigArgs,
    ConfiguredStrategy, PeerArgs,
};

use capacity::capacity;
use server_proc::ServerProc;
use throughput::throughput;
use time_to_link::{time_to_link_local, time_to_link_peer};

mod capacity;
mod cli_path;
mod cluster;
mod distance;
mod forward;
mod pairs;
mod server_memory;
mod server_proc;
mod throughput;
mod time_to_link;

/// Measure time to link, link throughput and rendezvous capacity, with targets.
///
/// Without --server everything runs on this machine (a rendezvous server in a child
/// process, both peers in this one) and prints a table per section (or --json), each figure
/// with PASS or MISS against its target. With --server and --session it is one peer of a
/// time-to-link benchmark against that server (the other peer runs the same command).
///
/// Runs `nettool` child processes: NETTOOL_BIN, else the `nettool` next to this binary.
///
/// Sections not in the default set: soak, forward, cluster (needs redis-server), distance
/// (relay-first in the NAT lab at --distance-rtt: first byte and time to the direct path per
/// pair of NAT kinds; needs root, nftables and iptables, else it prints "distance: skipped")
/// and pairs (--pair-count relay-first pairs at once through one server, by the library API).
///
/// Example (small and quick):
///   nettool-bench --runs 10 --size 8MiB --pairings 5000 --sessions 10k
#[derive(Debug, Parser)]
#[command(name = "nettool-bench", version)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
    /// Log more (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() {
    // Like `nettool`, before anything else: the in-process links copy as the CLI's do, and
    // the child processes inherit the setting (see `nettool`'s `tunables`).
    reexec_with_tuned_memcpy();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nettool-bench: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let registry = nettool_strategies::registry();
    let code = runtime.block_on(async {
        let result = async {
            let (settings, strategies) =
                peer_settings(&cli.config, &cli.bench.peer, &registry, "bench")?;
            run(cli.bench, settings, &strategies).await
        };
        match result.await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("nettool-bench: {e:#}");
                exit_status(&e)
            }
        }
    });
    std::process::exit(code);
}

/// The `nettool` binary the benchmark runs as child processes: `NETTOOL_BIN`, else the one
/// next to this executable (cargo builds both into the same directory).
pub(crate) fn nettool_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NETTOOL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("finding the nettool-bench binary")?;
    let bin = exe.with_file_name("nettool");
    if !bin.exists() {
        bail!(
            "{} not found: build it next to nettool-bench (cargo build -p nettool) or set \
             NETTOOL_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// Flags of `nettool-bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Without --server: strategies to measure (default: all). With --server (peer mode): act
    /// as one peer against that rendezvous server; the other peer runs the same command.
    #[command(flatten)]
    pub(crate) peer: PeerArgs,
    /// Runs per strategy for the time-to-link figures (p50 and p95).
    #[arg(long, default_value_t = 50)]
    runs: u32,
    /// Bytes sent each way per throughput round (suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    size: u64,
    /// Throughput rounds over plain TCP and every strategy, interleaved; the median counts.
    /// Also the CLI path's rounds and the distance section's (a fresh NAT lab per pair each).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Distance: the round trip the NAT lab adds (half of it each way at its internet
    /// router), ms.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    distance_rtt: u64,
    /// Sessions paired for the pairings-per-second figure.
    #[arg(long, default_value_t = 50_000)]
    pairings: u64,
    /// Pairings in flight at once (twice as many clients).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Numbers of waiting sessions for the memory figure, comma separated (10k = 10000).
    #[arg(long, value_delimiter = ',', default_value = "10k,100k", value_parser = parse_size)]
    sessions: Vec<u64>,
    /// CLI path: bytes per transfer between two `connect` processes (and plain TCP).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    cli_size: u64,
    /// CLI path: how data goes in and out (pipe: the bench feeds and drains pipes; file: a
    /// file into A's stdin, B's stdout into a file). Comma separated.
    #[arg(long, value_delimiter = ',', default_value = "pipe,file", value_enum)]
    cli_mode: Vec<CliMode>,
    /// Soak: transfers (each both ways at once, every byte checked).
    #[arg(long, default_value_t = 200)]
    soak_runs: u32,
    /// Soak: bytes each way per transfer.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    soak_size: u64,
    /// Soak: the strategy soaked (a name `nettool strategies` lists).
    #[arg(long, default_value = "tcp-punch")]
    soak_strategy: String,
    /// CLI path and soak in these network namespaces (the NAT lab's ignored tests use these):
    /// the server's, peer A's and peer B's namespace. Without them the CLI path runs in a
    /// routed NAT lab of its own (none × none, MTU 1,500) when this machine can build one
    /// (root, nftables, `ip netns`), else on loopback, labelled so.
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
    /// Pairs: relay-first pairs at once through one server (twice as many peers in this
    /// process, through the library API).
    #[arg(long, default_value_t = 1000)]
    pair_count: usize,
    /// Pairs: bytes each way per pair (suffixes as --size).
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pair_size: u64,
    /// Internal: run pairs FROM..TO of the pairs section in this process (a worker).
    #[arg(long, hide = true, value_name = "FROM..TO", requires = "pairs_server")]
    pairs_worker: Option<String>,
    /// Internal: the pairs section's server, for a worker.
    #[arg(long, hide = true)]
    pairs_server: Option<std::net::SocketAddr>,
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
    /// The server's memory per connection under hostile load (`server_memory.rs`).
    ServerMemory,
    /// Two real `connect` processes (stdin → link → stdout) against plain TCP, and their RSS.
    CliPath,
    /// Many transfers both ways at once through real processes, every byte checked (not in
    /// the default set: long).
    Soak,
    /// One `nettool forward` stream against `nettool connect` (only when asked for).
    Forward,
    /// Pairings per second through two rendezvous nodes sharing sessions in Redis against
    /// one in-process node, and the CPU per pairing Redis adds (only when asked for; needs
    /// `redis-server` on PATH).
    Cluster,
    /// Relay-first in the NAT lab at a real round trip (--distance-rtt): first byte and time
    /// to the direct path per pair of NAT kinds (only when asked for; needs root, nftables and
    /// iptables, else skipped).
    Distance,
    /// Many relay-first pairs at once through one server, through the library API, every
    /// byte checked; the server's RSS and CPU (only when asked for: --pair-count, --pair-size).
    Pairs,
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
    server_memory: Option<server_memory::ServerMemory>,
    cluster: Option<cluster::ClusterBench>,
    distance: Option<distance::Distance>,
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
    /// The same over the control channel's TLS (the verdict on the server-only figure).
    pairing_tls: Option<PairingRate>,
    memory: Vec<MemoryRow>,
}

#[derive(Debug, Serialize)]
struct PairingRate {
    /// Both joins of each pairing over the control channel's TLS.
    tls: bool,
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
    /// The sessions joined over the control channel's TLS (else plain JSON).
    tls: bool,
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
    /// Over TLS: the target per waiting session, bytes (the verdict is on it).
    target_session_bytes: Option<f64>,
    /// Against the target, for 100k sessions actually reached (`n/a` otherwise); over TLS,
    /// against the per-session target.
    verdict: Verdict,
    /// The projection against the target (for sizes of 100k that could not be reached).
    projected_verdict: Verdict,
    /// Why fewer sessions than asked for were reached.
    error: Option<String>,
}

/// The benchmark: the sections asked for, then the tables (or JSON); the exit status.
pub(crate) async fn run(
    args: BenchArgs,
    settings: Settings,
    configs: &[ConfiguredStrategy],
) -> Result<i32> {
    if let (Some(range), Some(server)) = (&args.pairs_worker, args.pairs_server) {
        let parsed = range
            .split_once("..")
            .and_then(|(a, b)| Some(a.parse::<usize>().ok()?..b.parse::<usize>().ok()?));
        let Some(range) = parsed else {
            bail!("--pairs-worker takes FROM..TO (e.g. 0..250), not '{range}'");
        };
        pairs::worker(server, range, args.pair_size).await;
        return Ok(0);
    }
    let peer_mode = !args.peer.servers().is_empty();
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
            eprintln!("nettool-bench: {line}");
        }
    };
    let mut report = BenchReport {
        mode: if peer_mode { "peer" } else { "loopback" },
        time_to_link: Vec::new(),
        throughput: None,
        capacity: None,
        server_memory: None,
        cluster: None,
        distance: None,
        cli_path: None,
        soak: None,
        notes: vec![
            "links are measured as this build makes them, encryption included (TLS on the TCP \
             links and on the relay tried as a strategy, AES-256-GCM keyed from SPAKE2 on \
             relay-first's express relay, QUIC's own on udp-quic)"
                .into(),
        ],
    };
    if peer_mode {
        let (server, all) = nettool::bench_support::choose_server(&settings.server).await?;
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
            let orch = nettool::bench_support::orchestrator(
                std::slice::from_ref(config),
                settings.timeout,
            )
            .with_server_token(settings.server_token.clone())
            .with_server_addresses(all.clone());
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
            let lines = forward::run(server.addr, configs, args.size, &progress);
            report.notes.extend(lines.await);
        }
        drop(server);
        if sections.contains(&Section::Capacity) {
            let (capacity, notes) = capacity(&args, &progress).await;
            report.capacity = Some(capacity);
            report.notes.extend(notes);
        }
        if sections.contains(&Section::ServerMemory) {
            report.server_memory = Some(server_memory::measure(&progress).await);
        }
        if sections.contains(&Section::Pairs) {
            let lines = pairs::run(args.pair_count, args.pair_size, &progress);
            report.notes.extend(lines.await);
        }
        if sections.contains(&Section::Cluster) {
            let measured = cluster::measure(args.pairings, args.concurrency, &progress);
            report.cluster = Some(measured.await);
        }
        if sections.contains(&Section::Distance) {
            let (rtt, rounds) = (args.distance_rtt, args.rounds);
            let measured = tokio::task::spawn_blocking(move || {
                let show = |line: &str| {
                    if !quiet {
                        eprintln!("nettool-bench: {line}");
                    }
                };
                distance::run(rtt, rounds, &show)
            });
            report.distance = Some(measured.await.context("the distance task")?);
        }
        if sections.contains(&Section::CliPath) || sections.contains(&Section::Soak) {
            // The path users have: a routed lab of its own unless told where to run.
            let (place, _lab) = if args.cli_netns_server.is_some() {
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
                    label: None,
                };
                (place, None)
            } else {
                cli_path::Placement::routed_lab_or_loopback()
            };
            if !quiet {
                eprintln!("nettool-bench: CLI path: {}", place.describe());
            }
            let links: Vec<String> = if args.peer.strategies().is_empty() {
                ["tcp-punch", "tcp-direct", "relay", "udp-quic"]
                    .map(str::to_owned)
                    .to_vec()
            } else {
                args.peer.strategies().iter().map(String::clone).collect()
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
                        eprintln!("nettool-bench: {line}");
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
                .chain(&c.pairing_tls)
                .map(|p| p.verdict)
                .chain(c.memory.iter().map(|m| m.verdict))
        }))
        .chain(r.server_memory.iter().map(|m| Verdict::of(m.pass)))
        .chain(r.distance.iter().flat_map(distance::Distance::verdicts))
        .chain(
            r.cli_path
                .iter()
                .flat_map(|c| c.rows.iter().flat_map(|x| [x.verdict, x.rss_verdict])),
        )
        .chain(r.soak.iter().map(|s| s.verdict))
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
        for p in c.pairing.iter().chain(&c.pairing_tls) {
            t.add_row([
                if p.tls {
                    "pairings per second over TLS".to_owned()
                } else {
                    "pairings per second".to_owned()
                },
                format!("{:.0}/s", p.per_second),
                if p.tls {
                    format!("≥ {:.0}/s server-only", p.target_per_second)
                } else {
                    format!("≥ {:.0}/s", p.target_per_second)
                },
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
                format!(
                    "server RSS, {} waiting sessions{}",
                    m.sessions,
                    if m.tls { " over TLS" } else { "" }
                ),
                opt(m.rss_after_kib.map(|k| k as f64 * 1024.0 / 1e6), 1, " MB"),
                if let Some(b) = m.target_session_bytes {
                    format!("≤ {b} B per session")
                } else if m.sessions >= 100_000 {
                    format!("≤ {} MB at 100k", m.target_100k_mb)
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
    if let Some(c) = &r.cluster {
        out += &format!("{}\n", c.render());
    }
    if let Some(d) = &r.distance {
        out += &format!("{}\n", d.render());
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
            "vs socat -b 1MiB",
            "target (vs socat)",
            "",
            "peak RSS",
            "≤ 32 MB",
            "CPU s/GiB send/recv",
            "server CPU s/GiB",
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
                opt(row.ratio_socat, 2, "×"),
                row.target_ratio
                    .map_or(String::new(), |x| format!("≥ {x}×")),
                row.verdict.as_str().into(),
                format!("{:.1} MB", row.peak_rss_mb),
                row.rss_verdict.as_str().into(),
                format!(
                    "{} / {}",
                    opt(row.cpu_s_per_gib[0], 2, ""),
                    opt(row.cpu_s_per_gib[1], 2, "")
                ),
                opt(row.server_cpu_s_per_gib, 2, ""),
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
