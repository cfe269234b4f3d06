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

use std::process::{Command, Stdio};
use std::time::Duration;

use nettool_tests::{require_lab, Host, NatKind};

use crate::nat_punch::RunningLab;
use crate::support::{nettool_bin, Proc};

/// Runs both peers of `nettool bench` (peer mode) for `strategies` through a lab `a` × `b`.
fn bench_pair(a: NatKind, b: NatKind, strategies: &[&str], runs: u32) {
    let lab = RunningLab::new(a, b);
    let server = format!("{}:8877", lab.lab.server_ip());
    let session = format!("bench-{a}-{b}");
    let runs = runs.to_string();
    let peer = |h: Host| {
        let mut cmd: Command = lab.lab.command(h, nettool_bin());
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
    let pa = peer(Host::A);
    std::thread::sleep(Duration::from_millis(100));
    let pb = peer(Host::B);
    let mut tables = Vec::new();
    for (name, p) in [("A", pa), ("B", pb)] {
        let mut p = p;
        let status = p.wait_timeout(Duration::from_secs(600));
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read;
        if let Some(s) = p.child.stdout.as_mut() {
            s.read_to_string(&mut out).unwrap();
        }
        if let Some(s) = p.child.stderr.as_mut() {
            s.read_to_string(&mut err).unwrap();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "peer {name}: {status:?}\n{err}"
        );
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("peer {name}: bad JSON ({e}):\n{out}"));
        tables.push((name, v));
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
    // The punching strategies and the relay through two NATs, one answering with resets.
    bench_pair(
        NatKind::Cone,
        NatKind::ConeRst,
        &["tcp-punch", "udp-quic", "relay"],
        50,
    );
    // tcp-direct needs a reachable side.
    bench_pair(NatKind::Cone, NatKind::Full, &["tcp-direct"], 50);
}
