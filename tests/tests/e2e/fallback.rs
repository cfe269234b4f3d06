//! Orchestrated connects in the NAT lab: fallback from a strategy that cannot work to one that
//! can, the default order across every pair, and large transfers through each strategy.

use nettool_tests::{require_lab, NatKind};

use crate::nat_punch::{punch_expected, run_matrix_with, RunningLab, ATTEMPT_TIMEOUT_S};
use crate::support::{sha256, test_data, PeerRun};

fn attempts(run: &PeerRun) -> Vec<serde_json::Value> {
    run.report
        .as_ref()
        .and_then(|r| r["attempts"].as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn tcp_direct_fails_between_two_cone_nats_then_tcp_punch_links() {
    if !require_lab() {
        return;
    }
    let lab = RunningLab::new(NatKind::Cone, NatKind::Cone);
    let timeout = format!("{ATTEMPT_TIMEOUT_S}s");
    // Blindly: the plan would skip tcp-direct (`the_plan_skips_what_cannot_work_and_says_why`).
    let flags = [
        "--plan",
        "off",
        "--strategy",
        "tcp-direct",
        "--strategy",
        "tcp-punch",
        "--strategy-timeout",
        &timeout,
    ];
    let (a_in, b_in) = (test_data(100_000, 3), test_data(50_000, 4));
    let (ra, rb) = lab.connect_pair("fallback", &flags, &a_in, &b_in);
    for (run, name) in [(&ra, "a"), (&rb, "b")] {
        assert_eq!(run.strategy(), Some("tcp-punch"), "{name}: {}", run.stderr);
        let att = attempts(run);
        assert_eq!(att.len(), 2, "{name}: {att:?}");
        assert_eq!(att[0]["strategy"], "tcp-direct");
        assert_eq!(att[0]["outcome"], "timed-out", "{name}: {:?}", att[0]);
        assert!(att[0]["error"]
            .as_str()
            .unwrap()
            .contains("neither side reachable"));
        assert_eq!(att[1]["strategy"], "tcp-punch");
        assert_eq!(att[1]["outcome"], "connected");
        assert!(att[1]["error"].is_null());
    }
    assert_eq!(sha256(&rb.stdout), sha256(&a_in));
    assert_eq!(sha256(&ra.stdout), sha256(&b_in));
}

#[test]
fn default_order_links_every_pair_any_strategy_can() {
    if !require_lab() {
        return;
    }
    let timeout = format!("{ATTEMPT_TIMEOUT_S}s");
    let flags: Vec<String> = ["--strategy-timeout", &timeout, "--timeout", "60s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // tcp-punch comes first and links every pair that plain punching can link (tcp-direct's
    // pairs are a subset); udp-quic's birthday mode takes the pairs with exactly one
    // symmetric NAT (the relay after a rare miss); the relay links the rest (sym x sym).
    run_matrix_with("default order", &flags, |a, b| {
        let one_sym = (a == NatKind::Sym) != (b == NatKind::Sym);
        Some(if punch_expected(a, b) {
            "tcp-punch"
        } else if one_sym {
            "udp-quic|relay"
        } else {
            "relay"
        })
    });
}

#[test]
fn two_symmetric_nats_end_up_relayed_after_every_direct_strategy_failed() {
    if !require_lab() {
        return;
    }
    let lab = RunningLab::new(NatKind::Sym, NatKind::Sym);
    let timeout = format!("{ATTEMPT_TIMEOUT_S}s");
    let (a_in, b_in) = (test_data(300_000, 5), test_data(200_000, 6));
    // Blindly (`--plan off`): every direct strategy is tried and fails before the relay.
    let (ra, rb) = lab.connect_pair(
        "symsym",
        &["--plan", "off", "--strategy-timeout", &timeout],
        &a_in,
        &b_in,
    );
    for (run, name) in [(&ra, "a"), (&rb, "b")] {
        let att = attempts(run);
        assert_eq!(run.strategy(), Some("relay"), "{name}: {att:#?}");
        let names: Vec<&str> = att
            .iter()
            .map(|x| x["strategy"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["tcp-punch", "udp-quic", "tcp-direct", "relay"],
            "{name}"
        );
        for x in &att[..3] {
            assert!(
                matches!(x["outcome"].as_str(), Some("timed-out" | "failed")),
                "{name}: {x}"
            );
            assert!(!x["error"].as_str().unwrap_or("").is_empty(), "{name}: {x}");
        }
        assert_eq!(att[3]["outcome"], "connected");
    }
    assert_eq!(sha256(&rb.stdout), sha256(&a_in));
    assert_eq!(sha256(&ra.stdout), sha256(&b_in));
}

#[test]
fn the_plan_skips_what_cannot_work_and_says_why() {
    if !require_lab() {
        return;
    }
    // sym x sym: every direct strategy is hopeless; the plan goes to the relay at once.
    let lab = RunningLab::new(NatKind::Sym, NatKind::Sym);
    let (ra, rb) = lab.connect_pair("plan-symsym", &[], b"one", b"two");
    for (run, name) in [(&ra, "a"), (&rb, "b")] {
        let att = attempts(run);
        assert_eq!(run.strategy(), Some("relay"), "{name}: {att:#?}");
        let reasons = ["map per destination", "map per destination", "filter"];
        for (x, why) in att[..3].iter().zip(reasons) {
            assert_eq!(x["outcome"], "skipped", "{name}: {x}");
            assert!(
                x["error"].as_str().unwrap_or("").contains(why),
                "{name}: {x}"
            );
        }
        let nat = &run.report.as_ref().unwrap()["nat"];
        assert_eq!(
            nat["local"]["udp_mapping"], "address-and-port-dependent",
            "{name}: {nat}"
        );
        assert_eq!(
            nat["peer"]["udp_mapping"], "address-and-port-dependent",
            "{name}: {nat}"
        );
    }
    assert_eq!(rb.stdout, b"one");
    assert_eq!(ra.stdout, b"two");

    // cone x cone, tcp-direct first within a 10 s budget: tcp-direct cannot work (both
    // filter) and is skipped, so tcp-punch gets its turn (blindly, tcp-direct used to take
    // the whole budget).
    let lab = RunningLab::new(NatKind::Cone, NatKind::Cone);
    let flags = [
        "--strategy",
        "tcp-direct",
        "--strategy",
        "tcp-punch",
        "--timeout",
        "10s",
    ];
    let (ra, rb) = lab.connect_pair("plan-cone", &flags, b"one", b"two");
    for (run, name) in [(&ra, "a"), (&rb, "b")] {
        let att = attempts(run);
        assert_eq!(run.strategy(), Some("tcp-punch"), "{name}: {att:#?}");
        assert_eq!(att[0]["outcome"], "skipped", "{name}: {att:#?}");
        assert!(att[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("both sides filter"));
    }
    // Blindly, the shared budget still leaves tcp-punch a turn after tcp-direct times out.
    let flags = [
        "--plan",
        "off",
        "--strategy",
        "tcp-direct",
        "--strategy",
        "tcp-punch",
        "--timeout",
        "10s",
    ];
    let (ra, rb) = lab.connect_pair("blind-cone", &flags, b"one", b"two");
    for (run, name) in [(&ra, "a"), (&rb, "b")] {
        let att = attempts(run);
        assert_eq!(run.strategy(), Some("tcp-punch"), "{name}: {att:#?}");
        assert_eq!(att[0]["outcome"], "timed-out", "{name}: {att:#?}");
    }
}

/// 64 MiB each way through `strategy` between NAT kinds `a` and `b`, checked with SHA-256.
fn big_transfer(strategy: &str, a: NatKind, b: NatKind) {
    if !require_lab() {
        return;
    }
    let lab = RunningLab::new(a, b);
    let a_in = test_data(64 << 20, 21);
    let b_in = test_data(64 << 20, 22);
    let start = std::time::Instant::now();
    let (ra, rb) = lab.connect_pair(
        &format!("big-{strategy}"),
        &["--strategy", strategy, "--timeout", "120s"],
        &a_in,
        &b_in,
    );
    let secs = start.elapsed().as_secs_f64();
    assert!(ra.status.is_some_and(|s| s.success()), "a: {}", ra.stderr);
    assert!(rb.status.is_some_and(|s| s.success()), "b: {}", rb.stderr);
    assert_eq!(ra.strategy(), Some(strategy));
    assert_eq!(rb.stdout.len(), a_in.len(), "a -> b length");
    assert_eq!(ra.stdout.len(), b_in.len(), "b -> a length");
    assert_eq!(sha256(&rb.stdout), sha256(&a_in), "a -> b data differs");
    assert_eq!(sha256(&ra.stdout), sha256(&b_in), "b -> a data differs");
    eprintln!(
        "{strategy} {a} x {b}: 64 MiB each way intact in {secs:.1} s (debug build, whole run)"
    );
}

#[test]
fn sixty_four_mib_each_way_through_tcp_punch() {
    big_transfer("tcp-punch", NatKind::Cone, NatKind::ConeRst);
}

#[test]
fn sixty_four_mib_each_way_through_the_relay() {
    big_transfer("relay", NatKind::Sym, NatKind::Sym);
}

#[test]
fn sixty_four_mib_each_way_through_tcp_direct() {
    big_transfer("tcp-direct", NatKind::Cone, NatKind::Full);
}

#[test]
fn compare_in_the_lab_gives_a_row_per_strategy_with_the_expected_outcome() {
    if !require_lab() {
        return;
    }
    let (ka, kb) = (NatKind::Cone, NatKind::ConeRst);
    let lab = RunningLab::new(ka, kb);
    let dir = crate::support::TempDir::new("lab-compare");
    let history = dir.path("history.jsonl");
    let server = format!("{}:8877", lab.lab.server_ip());
    let peer = |host: nettool_tests::Host, name: &str| {
        let mut cmd = lab.lab.command(host, crate::support::nettool_bin());
        cmd.args([
            "compare",
            "--server",
            &server,
            "--session",
            "cmp",
            "--secret",
            "s",
        ])
        .args(["--json", "--size", "2MiB", "--label", "lab-cone-conerst"])
        .args(["--strategy-timeout", &format!("{ATTEMPT_TIMEOUT_S}s")])
        .arg("--history")
        .arg(&history)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(dir.path(&format!("{name}.json"))).unwrap())
        .stderr(std::fs::File::create(dir.path(&format!("{name}.err"))).unwrap());
        crate::support::Proc::spawn(cmd)
    };
    let mut a = peer(nettool_tests::Host::A, "a");
    crate::support::wait_until_waiting(&dir, "a");
    let mut b = peer(nettool_tests::Host::B, "b");
    let limit = std::time::Duration::from_secs(90);
    assert!(a.wait_timeout(limit).is_some_and(|s| s.success()));
    assert!(b.wait_timeout(limit).is_some_and(|s| s.success()));
    let both = format!(
        "a: {}\nb: {}",
        std::fs::read_to_string(dir.path("a.json")).unwrap_or_default(),
        std::fs::read_to_string(dir.path("b.json")).unwrap_or_default()
    );
    for name in ["a", "b"] {
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path(&format!("{name}.json"))).unwrap())
                .unwrap();
        let rows = run["rows"].as_array().unwrap();
        let outcome = |s: &str| {
            rows.iter()
                .find(|r| r["strategy"] == s)
                .unwrap_or_else(|| panic!("{name}: no row for {s}: {run}"))
        };
        for s in ["tcp-punch", "udp-quic"] {
            let row = outcome(s);
            assert_eq!(row["outcome"], "connected", "{name}: {row}");
            assert!(
                row["first_to_second_mbps"]
                    .as_f64()
                    .is_some_and(|v| v > 0.0),
                "{both}"
            );
            assert!(
                row["rtt_ms"].as_f64().is_some_and(|v| v > 0.0),
                "{name}: {row}"
            );
        }
        // The plan knows both sides filter: tcp-direct is skipped with the reason, and every
        // row shows both sides' NAT as discovered.
        let direct = outcome("tcp-direct");
        assert_eq!(direct["outcome"], "skipped", "{name}: {direct}");
        assert!(direct["error"]
            .as_str()
            .unwrap()
            .contains("both sides filter"));
        assert_eq!(
            direct["nat"]["local"]["udp_mapping"], "endpoint-independent",
            "{name}: {direct}"
        );
        assert_eq!(
            direct["nat"]["peer"]["udp_filtering"], "address-and-port-dependent",
            "{name}: {direct}"
        );
        let relay = outcome("relay");
        assert_eq!(relay["outcome"], "connected", "{name}: {relay}");
        // The default connect as a fifth row: the relay at once, tcp-punch behind it, the
        // figures measured over the direct path.
        let rf = outcome("relay-first");
        assert_eq!(rf["outcome"], "connected", "{name}: {rf}");
        assert!(
            rf["direct"]
                .as_str()
                .unwrap_or("")
                .starts_with("tcp-punch at "),
            "{name}: {rf}"
        );
        assert!(
            rf["rtt_ms"].as_f64().is_some_and(|v| v > 0.0),
            "{name}: {rf}"
        );
        assert_eq!(rows.len(), 5);
    }
    let history = std::fs::read_to_string(&history).unwrap();
    assert_eq!(history.lines().count(), 2, "both peers append their run");
}
