//! Distance: relay-first through a lab with a real round trip (design.md §16, issue
//! "Distance"). The internet router holds every packet 50 ms each way (RTT 100 ms between each
//! host and the server, and between the hosts; a relayed A→B one-way is 100 ms), so every
//! round trip the connect spends shows.
//!
//! B waits, A starts: A's first byte must be on B's stdout within 5 round trips of A's start
//! on every kind of pair (the floor with a fresh TCP + TLS connection to the server is 4: TCP,
//! TLS, the join and its answer, the data through the relay), intact both ways, both exit 0.
//! The figures (ms and round trips, first byte and time to the direct path) are printed.

use std::sync::Mutex;
use std::time::Duration;

use nettool_tests::{require_lab, Lab, NatKind};

use crate::nat_punch::RunningLab;
use crate::relay_first::{direct_at, intact_and_clean, run_pair_in, run_pair_with};

/// Link conditions and what a run must show.
#[derive(Clone, Copy)]
struct Case {
    /// One-way delay at the internet router (RTT = 2 × delay).
    delay: Duration,
    /// Random loss per crossing.
    loss: f64,
    /// The first byte's limit in round trips (`None`: not checked, only printed).
    first_byte_rtts: Option<u64>,
    /// The limit in round trips for the session to be on a direct path, checked on pairs
    /// that end on tcp-punch (the strategy that prepares its offer before pairing).
    direct_rtts: Option<u64>,
}

/// One relay-first run of `pair` under `case`; a line for the table and the problems.
fn run_case(case: Case, (a, b): (NatKind, NatKind)) -> (String, Vec<String>) {
    let lab = Lab::builder(a, b)
        .delay(case.delay)
        .loss(case.loss)
        .build()
        .unwrap_or_else(|e| panic!("cannot build the lab {a} x {b} with delay: {e}"));
    let lab = RunningLab::on(lab, &[]);
    let rtt_ms = (case.delay * 2).as_millis() as u64;
    let run = run_pair_in(
        &lab,
        (a, b),
        (256 << 10, 128 << 10),
        Duration::from_secs(2),
        None,
    );
    let mut problems = intact_and_clean(&run);
    if let Some(rtts) = case.first_byte_rtts {
        let limit = rtts * rtt_ms;
        match run.first_byte_ms {
            Some(ms) if ms <= limit => {}
            Some(ms) => problems.push(format!(
                "first byte at {ms} ms = {:.1} RTT (limit {rtts} RTT = {limit} ms)",
                ms as f64 / rtt_ms as f64
            )),
            None => problems.push("no byte reached B".into()),
        }
    }
    let express = run.a_report["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a["strategy"] == "relay" && a["mode"] == "express");
    if !express {
        problems.push(format!(
            "the relay link was not the express relay: {}",
            run.a_report["attempts"]
        ));
    }
    let direct = direct_at(&run.a_report).or_else(|| direct_at(&run.b_report));
    if let (Some(rtts), true) = (case.direct_rtts, run.a_report["strategy"] == "tcp-punch") {
        let limit = rtts * rtt_ms;
        match direct {
            Some(ms) if ms <= limit => {}
            Some(ms) => problems.push(format!(
                "on the direct path at {ms} ms = {:.1} RTT (limit {rtts} RTT = {limit} ms)",
                ms as f64 / rtt_ms as f64
            )),
            None => problems.push("ended on tcp-punch but no direct path in the report".into()),
        }
    }
    let fb = run.first_byte_ms.unwrap_or(0);
    let line = format!(
        "{a} x {b} at RTT {rtt_ms} ms, loss {:.0} %: first byte {fb} ms ({:.1} RTT), direct {}, \
         final path {}, server RTT {} ms",
        case.loss * 100.0,
        fb as f64 / rtt_ms as f64,
        direct.map_or("-".to_owned(), |d| format!(
            "{d} ms ({:.1} RTT)",
            d as f64 / rtt_ms as f64
        )),
        run.a_report["strategy"],
        run.a_report["server_rtt_ms"],
    );
    if !problems.is_empty() {
        problems.push(format!("A: {}\nB: {}", run.a_err, run.b_err));
    }
    (line, problems)
}

/// Runs `cases` `at_once` at a time and fails with every problem found.
fn run_cases(case: Case, pairs: &[(NatKind, NatKind)], at_once: usize) {
    let lines = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    for chunk in pairs.chunks(at_once) {
        std::thread::scope(|s| {
            for &pair in chunk {
                let (lines, failures) = (&lines, &failures);
                s.spawn(move || {
                    let (line, problems) = run_case(case, pair);
                    eprintln!("distance: {line}");
                    lines.lock().unwrap().push(line.clone());
                    if !problems.is_empty() {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{line}: {}", problems.join("; ")));
                    }
                });
            }
        });
    }
    for l in lines.lock().unwrap().iter() {
        println!("{l}");
    }
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// RTT = 2 × `delay_ms`, no loss, the first byte within 5 round trips, a pair that ends on
/// tcp-punch on the direct path within 9 (the issue asks 8, which `nettool-bench --section
/// distance` holds the release build to; this debug build measured 7.8–7.9 at 100 ms RTT, and
/// a round trip of headroom keeps a loaded CI machine from failing it. Without the prepared
/// offers it took about 12; what the agreed key saves, `strategies/tests/agreed.rs` checks).
fn within_five(delay_ms: u64) -> Case {
    Case {
        delay: Duration::from_millis(delay_ms),
        loss: 0.0,
        first_byte_rtts: Some(5),
        direct_rtts: Some(9),
    }
}

#[test]
fn at_100ms_rtt_the_first_byte_takes_at_most_five_round_trips_on_every_kind_of_pair() {
    if !require_lab() {
        return;
    }
    use NatKind as K;
    run_cases(
        within_five(50),
        &[
            (K::None, K::None),
            (K::Cone, K::Cone),
            (K::ConeRst, K::Cone),
            (K::Sym, K::Cone),
            (K::Fw, K::Fw),
            (K::Sym, K::Sym),
        ],
        2,
    );
}

#[test]
fn at_300ms_rtt_the_first_byte_takes_at_most_five_round_trips() {
    if !require_lab() {
        return;
    }
    run_cases(within_five(150), &[(NatKind::Cone, NatKind::Cone)], 1);
}

/// At 600 ms RTT the connect still links (the express relay at once; the plan and the direct
/// attempts with timeouts that follow the round trip), intact both ways, both exit 0.
#[test]
fn at_600ms_rtt_cone_and_sym_pairs_link_intact() {
    if !require_lab() {
        return;
    }
    let case = Case {
        delay: Duration::from_millis(300),
        loss: 0.0,
        first_byte_rtts: Some(5),
        direct_rtts: None,
    };
    run_cases(
        case,
        &[
            (NatKind::Cone, NatKind::Cone),
            (NatKind::Sym, NatKind::Cone),
        ],
        2,
    );
}

/// At 100 ms RTT with 1 % loss per crossing every ordered pair of NAT kinds links (relay-first,
/// the default order), intact both ways, both exit 0; the figures are printed.
#[test]
fn at_100ms_rtt_with_1_percent_loss_every_pair_links_intact() {
    if !require_lab() {
        return;
    }
    let case = Case {
        delay: Duration::from_millis(50),
        loss: 0.01,
        first_byte_rtts: None,
        direct_rtts: None,
    };
    let kinds = NatKind::ALL;
    let pairs: Vec<(NatKind, NatKind)> = kinds
        .iter()
        .flat_map(|&a| kinds.iter().map(move |&b| (a, b)))
        .collect();
    run_cases(case, &pairs, 4);
}

/// `--no-relay-first --strategy tcp-punch` at 100 ms RTT (cone × cone): links on tcp-punch,
/// intact both ways, both exit 0, the attempt started at the pairing (both joins carried
/// their offers), and A's first byte on B's stdout within 6.4 round trips (the target is 6;
/// measured 5.9–6.0 in this debug build, 5.7–5.8 released). Watched red with the attempt
/// waiting for the plan offers (`NETTOOL_TEST_EARLY_START_OFF=1`: 6.9 round trips) and with
/// the session's first frames as they were (8 KiB, each frame its own record: 8.0).
#[test]
fn at_100ms_rtt_tcp_punch_alone_links_intact() {
    if !require_lab() {
        return;
    }
    let (a, b) = (NatKind::Cone, NatKind::Cone);
    let lab = Lab::builder(a, b)
        .delay(Duration::from_millis(50))
        .build()
        .unwrap_or_else(|e| panic!("cannot build the lab {a} x {b} with delay: {e}"));
    let lab = RunningLab::on(lab, &[]);
    let run = run_pair_with(
        &lab,
        (a, b),
        (256 << 10, 128 << 10),
        Duration::from_secs(2),
        None,
        &["--no-relay-first", "--strategy", "tcp-punch", "-vv"],
    );
    let problems = intact_and_clean(&run);
    let fb = run.first_byte_ms.unwrap_or(0);
    println!(
        "distance: tcp-punch alone, {a} x {b} at RTT 100 ms: first byte {fb} ms ({:.1} RTT), \
         strategy {}",
        fb as f64 / 100.0,
        run.a_report["strategy"]
    );
    assert!(
        problems.is_empty(),
        "{problems:?}\nA: {}\nB: {}",
        run.a_err,
        run.b_err
    );
    assert_eq!(run.a_report["strategy"], "tcp-punch", "{}", run.a_report);
    for report in [&run.a_report, &run.b_report] {
        assert_eq!(
            report["attempts"][0]["at_pairing"], true,
            "the attempt did not start at the pairing: {report}"
        );
    }
    assert!(
        run.first_byte_ms
            .is_some_and(|ms| ms <= TCP_PUNCH_ALONE_LIMIT_MS),
        "first byte {fb} ms, over {TCP_PUNCH_ALONE_LIMIT_MS} ms (6.4 round trips)"
    );
}

/// The tcp-punch-alone test's bound on the first byte at 100 ms RTT: 6.4 round trips
/// (measured 5.9–6.0 in the debug build; 6.9 without the early start, 8.0 with the first
/// frames as they were).
const TCP_PUNCH_ALONE_LIMIT_MS: u64 = 640;
