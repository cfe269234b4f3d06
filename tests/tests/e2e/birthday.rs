//! Birthday punching (udp-quic's mode for one symmetric NAT against a filtering one) through
//! the lab, default settings: sym x cone, sym x cone-rst and sym x fw in both orders, 20 runs
//! each with fresh sessions; a direct link (not the relay) in at least 18 of 20 per pair, and
//! the relay still links after a miss.

use std::sync::Mutex;

use nettool_tests::{require_lab, NatKind};

use crate::nat_punch::RunningLab;

/// One pair, `runs` connects with the default order (the plan picks birthday for udp-quic).
fn pair(a: NatKind, b: NatKind, runs: usize) -> (usize, Vec<u64>, Vec<String>) {
    let lab = RunningLab::new(a, b);
    let mut direct = 0;
    let mut times = Vec::new();
    let mut problems = Vec::new();
    for i in 0..runs {
        let (ra, rb) = lab.connect_pair(&format!("bd-{i}"), &[], b"ping", b"pong");
        let linked = ra.stdout == b"pong" && rb.stdout == b"ping";
        if !linked {
            problems.push(format!("run {i}: no link: {}", ra.stderr.trim()));
            continue;
        }
        let udp = ra
            .report
            .as_ref()
            .and_then(|r| r["attempts"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .find(|x| x["strategy"] == "udp-quic");
        let Some(udp) = udp else {
            problems.push(format!("run {i}: no udp-quic attempt"));
            continue;
        };
        if udp["mode"] != "birthday" || udp["probes"].as_u64().is_none() {
            // Discovery that could not finish in time (a loaded host) leaves the plan without
            // both NATs: udp-quic then punches plainly and the relay links. Counted as a miss.
            eprintln!(
                "{a} x {b} run {i}: no birthday mode (NAT {}): {udp}",
                ra.report
                    .as_ref()
                    .map(|r| r["nat"].to_string())
                    .unwrap_or_default()
            );
            if ra.strategy() != Some("relay") {
                problems.push(format!("run {i}: not relayed after a plain attempt: {udp}"));
            }
            continue;
        }
        if ra.strategy() == Some("udp-quic") && rb.strategy() == Some("udp-quic") {
            direct += 1;
            let total = rb.report.as_ref().and_then(|r| r["elapsed_ms"].as_u64());
            times.push(total.unwrap_or(0));
        } else if std::env::var_os("NETTOOL_BIRTHDAY_DEBUG").is_some() {
            eprintln!(
                "{a} x {b} run {i} missed: a {udp} b {}",
                rb.report
                    .as_ref()
                    .map(|r| r["attempts"].to_string())
                    .unwrap_or_default()
            );
        } else if ra.strategy() != Some("relay") {
            problems.push(format!(
                "run {i}: linked by {:?} after a miss",
                ra.strategy()
            ));
        }
    }
    (direct, times, problems)
}

#[test]
fn birthday_punching_links_one_symmetric_nat_directly() {
    if !require_lab() {
        return;
    }
    let runs: usize = std::env::var("NETTOOL_BIRTHDAY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let pairs = [
        (NatKind::Sym, NatKind::Cone),
        (NatKind::Cone, NatKind::Sym),
        (NatKind::Sym, NatKind::ConeRst),
        (NatKind::ConeRst, NatKind::Sym),
        (NatKind::Sym, NatKind::Fw),
        (NatKind::Fw, NatKind::Sym),
    ];
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (a, b) in pairs {
            let results = &results;
            s.spawn(move || {
                let r = pair(a, b, runs);
                results.lock().unwrap().push((a, b, r));
            });
        }
    });
    let mut failures = Vec::new();
    let mut all: Vec<u64> = Vec::new();
    for (a, b, (direct, mut times, problems)) in results.into_inner().unwrap() {
        times.sort_unstable();
        all.extend(&times);
        eprintln!(
            "birthday {a} x {b}: {direct}/{runs} direct; time to link median {:?} max {:?} ms",
            times.get(times.len() / 2),
            times.last()
        );
        let need = runs * 9 / 10;
        if direct < need || !problems.is_empty() {
            failures.push(format!(
                "{a} x {b}: {direct}/{runs} direct; {}",
                problems.join("; ")
            ));
        }
    }
    all.sort_unstable();
    if !all.is_empty() {
        let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
        eprintln!(
            "birthday, all pairs: median {} ms, p95 {} ms, max {} ms ({} build)",
            at(0.5),
            at(0.95),
            all[all.len() - 1],
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
