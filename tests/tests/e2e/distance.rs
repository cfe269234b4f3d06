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
use crate::relay_first::{direct_at, intact_and_clean, run_pair_in};

/// One relay-first run at `delay` one way; returns a line for the table and the problems.
fn first_byte_at(delay: Duration, (a, b): (NatKind, NatKind)) -> (String, Vec<String>) {
    let lab = Lab::builder(a, b)
        .delay(delay)
        .build()
        .unwrap_or_else(|e| panic!("cannot build the lab {a} x {b} with delay: {e}"));
    let lab = RunningLab::on(lab, &[]);
    let rtt = delay * 2;
    let run = run_pair_in(
        &lab,
        (a, b),
        (256 << 10, 128 << 10),
        Duration::from_secs(2),
        None,
    );
    let rtt_ms = rtt.as_millis() as u64;
    let mut problems = intact_and_clean(&run);
    // The floor with a fresh TCP + TLS connection to the server is 4 round trips; measured
    // 4.1-4.5 (before the express relay: about 20).
    let limit = 5 * rtt_ms;
    match run.first_byte_ms {
        Some(ms) if ms <= limit => {}
        Some(ms) => problems.push(format!(
            "first byte at {ms} ms = {:.1} RTT (limit 5 RTT = {limit} ms)",
            ms as f64 / rtt_ms as f64
        )),
        None => problems.push("no byte reached B".into()),
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
    let fb = run.first_byte_ms.unwrap_or(0);
    let line = format!(
        "{a} x {b} at RTT {rtt_ms} ms: first byte {fb} ms ({:.1} RTT), direct {}",
        fb as f64 / rtt_ms as f64,
        direct.map_or("-".to_owned(), |d| format!(
            "{d} ms ({:.1} RTT)",
            d as f64 / rtt_ms as f64
        )),
    );
    if !problems.is_empty() {
        problems.push(format!("A: {}\nB: {}", run.a_err, run.b_err));
    }
    (line, problems)
}

/// Runs `cases` two at a time and fails with every problem found.
fn run_cases(delay: Duration, cases: &[(NatKind, NatKind)]) {
    let lines = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    for chunk in cases.chunks(2) {
        std::thread::scope(|s| {
            for &pair in chunk {
                let (lines, failures) = (&lines, &failures);
                s.spawn(move || {
                    let (line, problems) = first_byte_at(delay, pair);
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

#[test]
fn at_100ms_rtt_the_first_byte_takes_at_most_five_round_trips_on_every_kind_of_pair() {
    if !require_lab() {
        return;
    }
    use NatKind as K;
    run_cases(
        Duration::from_millis(50),
        &[
            (K::None, K::None),
            (K::Cone, K::Cone),
            (K::ConeRst, K::Cone),
            (K::Sym, K::Cone),
            (K::Fw, K::Fw),
            (K::Sym, K::Sym),
        ],
    );
}

#[test]
fn at_300ms_rtt_the_first_byte_takes_at_most_five_round_trips() {
    if !require_lab() {
        return;
    }
    run_cases(
        Duration::from_millis(150),
        &[(NatKind::Cone, NatKind::Cone)],
    );
}
