//! The NAT-lab part of `nettool-bench` (time to link through real NAT routers). Ignored by
//! default — it is a benchmark, not a test; run it as root with release binaries (the
//! `nettool-bench` next to NETTOOL_BIN is used):
//!
//! ```sh
//! cargo build --release -p nettool -p nettool-bench
//! NETTOOL_BIN=target/release/nettool \
//!   cargo test --release -p nettool-tests --test e2e bench_lab -- --ignored --nocapture
//! ```
//!
//! The rendezvous server runs in the lab's server namespace; the two peers are two
//! `nettool-bench --server ... --session ...` processes (peer mode) in the host namespaces.
//! Each prints its own p50/p95 with PASS/MISS; this test prints both tables and checks only
//! that every run linked and the JSON parses (no timing assertions).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use nettool_tests::{require_lab, Host, Lab, NatKind};

use crate::support::{nettool_bench_bin, nettool_bin, Proc};

/// Runs both peers of `nettool-bench` (peer mode) for `strategies` through a lab `a` × `b`.
fn bench_pair(a: NatKind, b: NatKind, strategies: &[&str], runs: u32) {
    let lab = Lab::new(a, b).unwrap_or_else(|e| panic!("cannot build the lab {a} x {b}: {e}"));
    // The server's per-address join and STUN rate limits (20/s) would throttle 50
    // back-to-back runs.
    let mut cmd = lab.command(Host::Server, nettool_bin());
    cmd.args(["rendezvous", "--listen", "0.0.0.0:8877", "--join-rate", "0"])
        .args(["--stun-rate", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = Proc::spawn(cmd);
    server.stderr_line_containing("listening on");
    let server = format!("{}:8877", lab.server_ip());
    let session = format!("bench-{a}-{b}");
    let runs = runs.to_string();
    let peer = |h: Host| {
        let mut cmd: Command = lab.command(h, nettool_bench_bin());
        cmd.args(["--server", &server, "--session", &session])
            .args([
                "--secret",
                "lab",
                "--runs",
                &runs,
                "--strategy-timeout",
                "4s",
            ]);
        for s in strategies {
            cmd.args(["--strategy", s]);
        }
        cmd.arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Proc::spawn(cmd)
    };
    let mut procs = [("A", peer(Host::A)), ("B", peer(Host::B))];
    // Both run to the end, or the first failure ends both (a lone peer would wait for nothing).
    let end = std::time::Instant::now() + Duration::from_secs(900);
    loop {
        let states: Vec<_> = procs
            .iter_mut()
            .map(|(_, p)| p.child.try_wait().expect("try_wait"))
            .collect();
        let failed = states.iter().flatten().any(|s| !s.success());
        if states.iter().all(Option::is_some) || failed || std::time::Instant::now() >= end {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut tables = Vec::new();
    for (name, p) in &mut procs {
        let _ = p.child.kill();
        let status = p.child.wait().expect("wait");
        let mut out = String::new();
        let mut err = String::new();
        if let Some(s) = p.child.stdout.as_mut() {
            s.read_to_string(&mut out).unwrap();
        }
        if let Some(s) = p.child.stderr.as_mut() {
            s.read_to_string(&mut err).unwrap();
        }
        assert!(status.success(), "peer {name}: {status:?}\n{err}");
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("peer {name}: bad JSON ({e}):\n{out}"));
        tables.push((*name, v));
    }
    println!("nettool-bench in the NAT lab, {a} (A, first) x {b} (B):");
    for (name, v) in &tables {
        for row in v["time_to_link"].as_array().expect("rows") {
            println!(
                "  peer {name} {:<10} linked {}/{}  p50 {:>6.2} ms  p95 {:>6.2} ms  target ≤ {} ms  {}",
                row["strategy"].as_str().unwrap_or("?"),
                row["linked"],
                row["runs"],
                row["p50_ms"].as_f64().unwrap_or(f64::NAN),
                row["p95_ms"].as_f64().unwrap_or(f64::NAN),
                row["target_p50_ms"],
                row["verdict"].as_str().unwrap_or("?"),
            );
            assert_eq!(row["linked"], row["runs"], "peer {name}: {row}");
        }
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, as root, with a release NETTOOL_BIN"]
fn bench_lab_time_to_link() {
    if !require_lab() {
        return;
    }
    // NETTOOL_BENCH_RUNS: runs per strategy (default 50).
    let runs = std::env::var("NETTOOL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // The punching strategies and the relay through two NATs, one answering with resets.
    bench_pair(
        NatKind::Cone,
        NatKind::ConeRst,
        &["tcp-punch", "udp-quic", "relay"],
        runs,
    );
    // tcp-direct needs a reachable side.
    bench_pair(NatKind::Cone, NatKind::Full, &["tcp-direct"], runs);
}

/// Runs `nettool-bench` (loopback mode) with its CLI-path processes placed in the lab `a` × `b`:
/// the server in the server namespace, peer A (sender) and B (receiver) in the hosts'.
fn bench_cli_in_lab(a: NatKind, b: NatKind, extra: &[&str]) -> serde_json::Value {
    let lab = Lab::new(a, b).unwrap_or_else(|e| panic!("cannot build the lab {a} x {b}: {e}"));
    bench_cli_in(&lab, extra)
}

/// [`bench_cli_in_lab`] in a lab built by the caller (with link conditions, say).
fn bench_cli_in(lab: &Lab, extra: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(nettool_bench_bin());
    cmd.args(extra)
        .args(["--cli-netns-server", lab.netns(Host::Server)])
        .args(["--cli-netns-a", lab.netns(Host::A)])
        .args(["--cli-netns-b", lab.netns(Host::B)])
        .args(["--cli-server-ip", &lab.server_ip().to_string()])
        .args(["--cli-b-ip", &lab.host_ip(Host::B).to_string()])
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut p = Proc::spawn(cmd);
    let status = p
        .wait_timeout(Duration::from_secs(3600))
        .expect("bench finished within an hour");
    let mut out = String::new();
    p.child
        .stdout
        .as_mut()
        .expect("stdout piped")
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "bench: {status:?}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{out}"))
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// `nettool-bench`'s arguments for the CLI-path section: `size`, `rounds`, the modes, and
/// a `--strategy` for each of NETTOOL_BENCH_STRATEGIES (comma separated; default all four).
fn cli_path_args(size: &str, rounds: &str, modes: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--section",
        "cli-path",
        "--cli-size",
        size,
        "--rounds",
        rounds,
        "--cli-mode",
        modes,
    ]
    .map(str::to_owned)
    .to_vec();
    for s in env_or("NETTOOL_BENCH_STRATEGIES", "")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        args.extend(["--strategy".to_owned(), s.to_owned()]);
    }
    args
}

/// The CLI path at a distance: as [`bench_lab_cli_path`] through a lab whose internet
/// router holds every packet 50 ms (RTT 100 ms), 256 MiB by default, pipe to pipe, socat with
/// 1 MiB buffers as the yardstick on the same path. Prints the table; checks every transfer
/// arrived intact, not the ratios.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture, as root, with a release NETTOOL_BIN"]
fn bench_lab_cli_path_at_100ms_rtt() {
    if !require_lab() {
        return;
    }
    let size = env_or("NETTOOL_BENCH_CLI_SIZE", "256MiB");
    let rounds = env_or("NETTOOL_BENCH_ROUNDS", "1");
    let lab = Lab::builder(NatKind::None, NatKind::None)
        .delay(Duration::from_millis(50))
        .build()
        .unwrap_or_else(|e| panic!("cannot build the lab with delay: {e}"));
    let args = cli_path_args(&size, &rounds, "pipe");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = bench_cli_in(&lab, &args);
    println!(
        "{}",
        serde_json::to_string_pretty(&v["cli_path"]).unwrap_or_default()
    );
}

/// The CLI path (issue 12) between two lab hosts with no NAT on either side (routed): two
/// `nettool connect` processes per strategy against two plain-TCP processes pumped the same
/// way, pipe→pipe and file→file. Prints the table; checks every transfer arrived intact
/// (the bench checks every byte), not the ratios (they are benchmark figures).
#[test]
#[ignore = "benchmark: run with --ignored --nocapture, as root, with a release NETTOOL_BIN"]
fn bench_lab_cli_path() {
    if !require_lab() {
        return;
    }
    // NETTOOL_BENCH_CLI_SIZE (default 1GiB), NETTOOL_BENCH_ROUNDS (default 3).
    let size = env_or("NETTOOL_BENCH_CLI_SIZE", "1GiB");
    let rounds = env_or("NETTOOL_BENCH_ROUNDS", "3");
    // NETTOOL_BENCH_STRATEGIES (comma separated; default all four), NETTOOL_BENCH_CLI_MODES
    // (default pipe,file).
    let modes = env_or("NETTOOL_BENCH_CLI_MODES", "pipe,file");
    let args = cli_path_args(&size, &rounds, &modes);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = bench_cli_in_lab(NatKind::None, NatKind::None, &args);
    let c = &v["cli_path"];
    println!(
        "CLI path in the NAT lab (none x none, routed), {size}, {rounds} rounds; {}",
        c["ktls"]
    );
    for row in c["rows"].as_array().expect("rows") {
        println!(
            "  {:<10} {:<5} {:>7.3} s  {:>6.0} MB/s  ratio {:>5.2}  target {:>5}  {:<4}  vs socat {:>5.2}  RSS {:>5.1} MB {}  CPU s/GiB {:.2} / {:.2}, server {:.2}",
            row["link"].as_str().unwrap_or("?"),
            row["mode"].as_str().unwrap_or("?"),
            row["seconds"].as_f64().unwrap_or(f64::NAN),
            row["mb_per_s"].as_f64().unwrap_or(f64::NAN),
            row["ratio"].as_f64().unwrap_or(f64::NAN),
            row["target_ratio"].as_f64().map_or("-".into(), |t| t.to_string()),
            row["verdict"].as_str().unwrap_or("?"),
            row["ratio_socat"].as_f64().unwrap_or(f64::NAN),
            row["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
            row["rss_verdict"].as_str().unwrap_or("?"),
            row["cpu_s_per_gib"][0].as_f64().unwrap_or(f64::NAN),
            row["cpu_s_per_gib"][1].as_f64().unwrap_or(f64::NAN),
            row["server_cpu_s_per_gib"].as_f64().unwrap_or(f64::NAN),
        );
        assert!(row["error"].is_null(), "{row}");
    }
}

/// The soak (issue 12): NETTOOL_SOAK_RUNS (default 200) tcp-punch transfers of
/// NETTOOL_SOAK_SIZE (default 64MiB) both ways at once through two reset-answering routers
/// (cone-rst x cone-rst), every byte checked. Fails on any stall, loss or corruption.
#[test]
#[ignore = "soak: run with --ignored --nocapture, as root, with a release NETTOOL_BIN"]
fn soak_lab_tcp_punch_cone_rst() {
    if !require_lab() {
        return;
    }
    let runs = env_or("NETTOOL_SOAK_RUNS", "200");
    let size = env_or("NETTOOL_SOAK_SIZE", "64MiB");
    // NETTOOL_SOAK_KINDS=A,B picks another pair (e.g. fw,none, where the old stall was seen).
    let (a, b) = crate::support::kinds_from_env("NETTOOL_SOAK_KINDS", "cone-rst,cone-rst");
    let v = bench_cli_in_lab(
        a,
        b,
        &[
            "--section",
            "soak",
            "--soak-runs",
            &runs,
            "--soak-size",
            &size,
            "--soak-strategy",
            "tcp-punch",
        ],
    );
    let s = &v["soak"];
    println!("soak in the NAT lab ({a} x {b}): {s}");
    assert_eq!(s["stalls"], 0, "{s}");
    assert_eq!(s["ok"], s["runs"], "{s}");
}
