//! The NAT-lab part of `nettool bench` (time to link through real NAT routers). Ignored by
//! default — it is a benchmark, not a test; run it as root with a release binary:
//!
//! ```sh
//! cargo build --release -p nettool
//! NETTOOL_BIN=target/release/nettool \
//!   cargo test --release -p nettool-tests --test e2e bench_lab -- --ignored --nocapture
//! ```
//!
//! The rendezvous server runs in the lab's server namespace; the two peers are two
//! `nettool bench --server ... --session ...` processes (peer mode) in the host namespaces.
//! Each prints its own p50/p95 with PASS/MISS; this test prints both tables and checks only
//! that every run linked and the JSON parses (no timing assertions).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use nettool_tests::{require_lab, Host, Lab, NatKind};

use crate::support::{nettool_bin, Proc};

/// Runs both peers of `nettool bench` (peer mode) for `strategies` through a lab `a` × `b`.
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
        let mut cmd: Command = lab.command(h, nettool_bin());
        cmd.args(["bench", "--server", &server, "--session", &session])
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
    println!("nettool bench in the NAT lab, {a} (A, first) x {b} (B):");
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
