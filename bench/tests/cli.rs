//! `nettool-bench`: the flags and every section's table and JSON.
//!
//! It runs the `nettool` binary next to it: `cargo test --workspace` builds both (with
//! `cargo test -p nettool-bench` alone, build `nettool` first: `cargo build -p nettool`).

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nettool-bench"))
        .args(args)
        .output()
        .expect("run nettool-bench")
}

#[test]
fn help_teaches_the_sections() {
    let out = bench(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "--section",
        "time-to-link",
        "cli-path",
        "--server",
        "--config",
        "nettool-bench --runs",
    ] {
        assert!(text.contains(needle), "no {needle:?} in\n{text}");
    }
}

/// `nettool-bench` with tiny sizes: every section is there, in the table and in the JSON.
/// No timing is asserted (figures are the benchmark's business, not the tests').
#[test]
fn bench_smoke_prints_every_section() {
    let small = [
        "--runs",
        "3",
        "--size",
        "1MiB",
        "--rounds",
        "1",
        "--pairings",
        "200",
        "--concurrency",
        "16",
        "--sessions",
        "200",
        "--cli-size",
        "4MiB",
    ];
    let out = bench(&small);
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}\n{stderr}");
    for needle in [
        "Time to link",
        "Throughput",
        "Rendezvous capacity",
        "pairings per second",
        "server RSS, 200 waiting sessions",
        "CLI path",
        "plain-tcp",
        "pipe→pipe",
        "file→file",
        "plain TCP",
        "tcp-punch",
        "udp-quic",
        "tcp-direct",
        "relay",
    ] {
        assert!(text.contains(needle), "no {needle:?} in\n{text}");
    }

    let mut argv = small.to_vec();
    argv.push("--json");
    let out = bench(&argv);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench --json parses");
    let ttl = v["time_to_link"].as_array().expect("time_to_link");
    assert_eq!(ttl.len(), 4, "{v}");
    for row in ttl {
        assert_eq!(row["runs"], 3, "{row}");
        assert!(row["verdict"].is_string(), "{row}");
    }
    let rows = v["throughput"]["rows"].as_array().expect("throughput rows");
    assert_eq!(rows[0]["link"], "plain TCP", "{v}");
    assert_eq!(rows.len(), 5, "{v}");
    let cap = &v["capacity"];
    assert!(cap["pairing"]["pairings"].as_u64().is_some(), "{cap}");
    assert_eq!(cap["memory"][0]["sessions"], 200, "{cap}");
    assert!(
        cap["memory"][0]["rss_after_kib"].as_u64().is_some(),
        "{cap}"
    );
    // The CLI path: plain TCP, socat (the yardstick, installed by .ci/run) and four
    // strategies, pipe and file, every transfer intact (the bench checks every byte) and an
    // RSS figure for each.
    let cli = v["cli_path"]["rows"].as_array().expect("cli_path rows");
    assert_eq!(cli.len(), 12, "{v}");
    assert_eq!(cli[0]["link"], "plain-tcp", "{v}");
    assert_eq!(cli[2]["link"], "socat", "{v}");
    assert!(cli[4]["ratio_socat"].as_f64().is_some(), "{v}");
    for row in cli {
        assert!(row["error"].is_null(), "{row}");
        assert!(row["peak_rss_mb"].as_f64().unwrap_or(0.0) > 0.0, "{row}");
    }
    assert!(v["cli_path"]["ktls"].is_string(), "{v}");
}
