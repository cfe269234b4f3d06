//! Relay-first through the NAT lab (the default order, no `--strategy`): the first byte over
//! the relay right after pairing, then the lossless move to the direct path.
//!
//! - Every ordered pair of NAT kinds: B waits first, A starts; A's first byte must reach B's
//!   stdout quickly (the figure is printed per pair), both directions arrive intact, both
//!   exit 0, and the path carrying the session at the end is direct for every pair except
//!   sym × sym (relay: nothing direct can link it).
//! - cone × cone, 16 MiB one way and 4 MiB the other, paced over 4 s through a relay held to
//!   2 MB/s: the move happens while data is in flight both ways; bytes on the relay, the majority on the direct path, every byte
//!   once, and the relay carried no more than what the source had produced by the move.

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nettool_tests::{require_lab, Host, NatKind};

use crate::nat_punch::RunningLab;
use crate::support::{feed_paced, nettool_bin, sha256, test_data, Proc, TempDir};

/// First byte at B after A starts, ms: the target in the lab. (Measured with the
/// debug build, 4 labs at once on 2 cores: 22-59 ms.)
fn first_byte_limit_ms() -> u64 {
    300
}

pub(crate) struct Run {
    pub(crate) a_code: Option<i32>,
    pub(crate) b_code: Option<i32>,
    pub(crate) a_err: String,
    pub(crate) b_err: String,
    pub(crate) a_intact: bool,
    pub(crate) b_intact: bool,
    pub(crate) first_byte_ms: Option<u64>,
    pub(crate) a_report: serde_json::Value,
    pub(crate) b_report: serde_json::Value,
}

/// Something done to the lab while the peers stream (after A's first byte reached B).
type During = fn(&RunningLab, &TempDir);

/// B joins and waits; then A starts. Both send paced data (`a_len` and `b_len` bytes over
/// `pace`), relay-first (the default order); `server_args` for the rendezvous server.
fn run_pair(
    (a, b): (NatKind, NatKind),
    a_len: usize,
    b_len: usize,
    pace: Duration,
    server_args: &[&str],
    during: Option<During>,
) -> Run {
    let lab = RunningLab::with_server_args(a, b, server_args);
    run_pair_in(&lab, (a, b), (a_len, b_len), pace, during)
}

/// [`run_pair`] in a running lab (one with link conditions, say).
pub(crate) fn run_pair_in(
    lab: &RunningLab,
    pair: (NatKind, NatKind),
    lens: (usize, usize),
    pace: Duration,
    during: Option<During>,
) -> Run {
    run_pair_with(lab, pair, lens, pace, during, &[])
}

/// [`run_pair_in`] with more flags for both peers' `connect` (e.g. `--no-relay-first`).
pub(crate) fn run_pair_with(
    lab: &RunningLab,
    (a, b): (NatKind, NatKind),
    (a_len, b_len): (usize, usize),
    pace: Duration,
    during: Option<During>,
    extra: &[&str],
) -> Run {
    run_pair_homes(lab, (a, b), (a_len, b_len), pace, during, extra, None)
}

/// [`run_pair_with`], with the NAT cache on when `homes` are given: each peer's home (and
/// cache) in `homes` (A's, then B's), kept by the caller across runs. (The lab's commands run
/// with the cache off, so no run's winners order another's strategies.)
pub(crate) fn run_pair_homes(
    lab: &RunningLab,
    (a, b): (NatKind, NatKind),
    (a_len, b_len): (usize, usize),
    pace: Duration,
    during: Option<During>,
    extra: &[&str],
    homes: Option<&[std::path::PathBuf; 2]>,
) -> Run {
    let dir = TempDir::new(&format!("relay-first-{a}-{b}"));
    let server = format!("{}:8877", lab.lab.server_ip());
    let session = format!("rf-{a}-{b}");
    let a_data = test_data(a_len, 31);
    let b_data = test_data(b_len, 32);
    let peer = |h: Host, name: &str| {
        let mut cmd = lab.lab.command(h, nettool_bin());
        if let Some(homes) = homes {
            let home = &homes[usize::from(h == Host::B)];
            cmd.env("HOME", home)
                .env("XDG_CACHE_HOME", home)
                .env("NETTOOL_NAT_CACHE", "true");
        }
        cmd.env("NETTOOL_RELAY_FIRST", "true")
            .args(["connect", "--server", &server, "--session", &session])
            .args(["--secret", "lab", "--timeout", "30s"])
            .args(extra)
            .arg("--report")
            .arg(dir.path(&format!("{name}.report.json")))
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(dir.path(&format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.path(&format!("{name}.err"))).unwrap());
        Proc::spawn(cmd)
    };
    let mut pb = peer(Host::B, "b");
    let start = Instant::now();
    while !std::fs::read_to_string(dir.path("b.err"))
        .unwrap_or_default()
        .contains("waiting for the peer")
    {
        assert!(start.elapsed() < Duration::from_secs(20), "B did not join");
        std::thread::sleep(Duration::from_millis(5));
    }
    let a_started = Instant::now();
    let mut pa = peer(Host::A, "a");
    let fa = {
        let w = pa.child.stdin.take().expect("piped");
        let d = a_data.clone();
        std::thread::spawn(move || feed_paced(w, &d, 64, pace))
    };
    let fb = {
        let w = pb.child.stdin.take().expect("piped");
        let d = b_data.clone();
        std::thread::spawn(move || feed_paced(w, &d, 64, pace))
    };
    // A's first byte at B's stdout, measured from A's start.
    let mut first_byte_ms = None;
    while a_started.elapsed() < Duration::from_secs(30) {
        if std::fs::metadata(dir.path("b.out")).is_ok_and(|m| m.len() > 0) {
            first_byte_ms = Some(a_started.elapsed().as_millis() as u64);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(event) = during {
        event(lab, &dir);
    }
    fa.join().unwrap();
    fb.join().unwrap();
    let limit = Duration::from_secs(60);
    let a_status = pa.wait_timeout(limit);
    let b_status = pb.wait_timeout(limit);
    let read_report = |n: &str| {
        std::fs::read(dir.path(&format!("{n}.report.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let a_out = std::fs::read(dir.path("a.out")).unwrap_or_default();
    let b_out = std::fs::read(dir.path("b.out")).unwrap_or_default();
    Run {
        a_code: a_status.and_then(|s| s.code()),
        b_code: b_status.and_then(|s| s.code()),
        a_err: std::fs::read_to_string(dir.path("a.err")).unwrap_or_default(),
        b_err: std::fs::read_to_string(dir.path("b.err")).unwrap_or_default(),
        a_intact: sha256(&a_out) == sha256(&b_data),
        b_intact: sha256(&b_out) == sha256(&a_data),
        first_byte_ms,
        a_report: read_report("a"),
        b_report: read_report("b"),
    }
}

fn paths(r: &serde_json::Value) -> Vec<serde_json::Value> {
    r["paths"].as_array().cloned().unwrap_or_default()
}

/// When the session moved off the relay (the first direct path's `from_ms`), per report.
pub(crate) fn direct_at(r: &serde_json::Value) -> Option<u64> {
    paths(r)
        .iter()
        .find(|p| p["strategy"] != "relay")
        .and_then(|p| p["from_ms"].as_u64())
}

pub(crate) fn intact_and_clean(r: &Run) -> Vec<String> {
    let mut problems = Vec::new();
    if r.a_code != Some(0) || r.b_code != Some(0) {
        problems.push(format!("exit A {:?} B {:?}", r.a_code, r.b_code));
    }
    if !r.a_intact || !r.b_intact {
        problems.push(format!(
            "data differs (A got B's intact: {}, B got A's intact: {})",
            r.a_intact, r.b_intact
        ));
    }
    problems
}

#[test]
fn relay_first_links_every_pair_at_once_and_ends_direct_where_a_direct_path_exists() {
    if !require_lab() {
        return;
    }
    let pairs: Vec<(NatKind, NatKind)> = NatKind::ALL
        .iter()
        .flat_map(|a| NatKind::ALL.iter().map(move |b| (*a, *b)))
        .collect();
    let queue = Mutex::new(pairs);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some((a, b)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let r = run_pair(
                    (a, b),
                    1 << 20,
                    512 << 10,
                    Duration::from_secs(4),
                    &[],
                    None,
                );
                results.lock().unwrap().push((a, b, r));
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut table = String::from(
        "relay-first, B waiting, A starts: first byte at B / session on the direct path (ms \
         since A's start) / final path\n",
    );
    let mut problems = Vec::new();
    for (a, b, r) in &results {
        let fin = r.a_report["strategy"].as_str().unwrap_or("-").to_owned();
        let direct = direct_at(&r.a_report);
        table.push_str(&format!(
            "  {a:>8} x {b:<8} first byte {:>5} ms  direct at {:>6}  final {fin}\n",
            r.first_byte_ms.map_or("-".into(), |m| m.to_string()),
            direct.map_or("-".into(), |m| format!("{m} ms")),
        ));
        let mut p = intact_and_clean(r);
        match r.first_byte_ms {
            Some(ms) if ms <= first_byte_limit_ms() => {}
            other => p.push(format!(
                "first byte at B after {other:?} ms (limit {} ms)",
                first_byte_limit_ms()
            )),
        }
        let want_direct = !(*a == NatKind::Sym && *b == NatKind::Sym);
        let b_fin = r.b_report["strategy"].as_str().unwrap_or("-");
        if fin != b_fin {
            p.push(format!("A ended on {fin}, B on {b_fin}"));
        }
        if want_direct && fin == "relay" {
            p.push(format!(
                "stayed on the relay; A's attempts: {}",
                r.a_report["attempts"]
            ));
        }
        if !want_direct && fin != "relay" {
            p.push(format!("sym x sym ended on {fin}"));
        }
        // The first path is always the relay: data flowed before any direct attempt ended.
        if paths(&r.a_report).first().map(|x| x["strategy"].clone()) != Some("relay".into()) {
            p.push(format!(
                "the first path is not the relay: {:?}",
                paths(&r.a_report)
            ));
        }
        if !p.is_empty() {
            problems.push(format!(
                "{a} x {b}: {}\nA: {}\nB: {}",
                p.join("; "),
                r.a_err,
                r.b_err
            ));
        }
    }
    eprintln!("{table}");
    assert!(
        problems.is_empty(),
        "{} pairs wrong:\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

#[test]
fn the_move_to_the_direct_path_happens_mid_stream_both_ways_and_loses_nothing() {
    if !require_lab() {
        return;
    }
    let (a_len, b_len) = (16 << 20, 4 << 20);
    let pace = Duration::from_secs(4);
    // The relay is held to 2 MB/s (both ways together) while the sources produce 5 MiB/s:
    // when the direct path arrives the relay has bytes in flight both ways (in its buffers
    // and the sockets'), which a move without the SWITCH boundary would lose or repeat.
    let r = run_pair(
        (NatKind::Cone, NatKind::Cone),
        a_len,
        b_len,
        pace,
        &["--relay-rate", "2MB"],
        None,
    );
    let ctx = format!(
        "A: {}\nB: {}\nA report: {}\nB report: {}",
        r.a_err, r.b_err, r.a_report, r.b_report
    );
    assert!(
        intact_and_clean(&r).is_empty(),
        "{:?}\n{ctx}",
        intact_and_clean(&r)
    );
    for (who, report, sent_total) in [("A", &r.a_report, a_len), ("B", &r.b_report, b_len)] {
        let p = paths(report);
        assert!(p.len() >= 2, "{who}: no move: {ctx}");
        let relay = &p[0];
        assert_eq!(relay["strategy"], "relay", "{who}: {ctx}");
        let direct: Vec<&serde_json::Value> =
            p.iter().filter(|x| x["strategy"] != "relay").collect();
        assert!(!direct.is_empty(), "{who}: no direct path: {ctx}");
        let sum = |v: &[&serde_json::Value], f: &str| -> u64 {
            v.iter().map(|x| x[f].as_u64().unwrap_or(0)).sum()
        };
        // Data in flight both ways on each path: the move happened mid-stream.
        for f in ["bytes_sent", "bytes_received"] {
            assert!(
                relay[f].as_u64().unwrap_or(0) > 0,
                "{who}: relay {f} 0: {ctx}"
            );
            assert!(sum(&direct, f) > 0, "{who}: direct {f} 0: {ctx}");
        }
        // Every byte sent exactly once over the paths (the SWITCH boundary: no replay).
        let all: Vec<&serde_json::Value> = p.iter().collect();
        assert_eq!(sum(&all, "bytes_sent"), sent_total as u64, "{who}: {ctx}");
        // The majority went direct.
        assert!(
            sum(&direct, "bytes_sent") * 2 > sent_total as u64,
            "{who}: most bytes went over the relay: {ctx}"
        );
        // The relay carried no more than the source had produced by the move (paced input:
        // len * t / pace; 250 ms of slack for the clocks and the pipe).
        let to = relay["to_ms"].as_u64().unwrap_or(u64::MAX);
        let produced = (sent_total as f64 * ((to + 250) as f64 / pace.as_millis() as f64))
            .min(sent_total as f64) as u64;
        let relayed = relay["bytes_sent"].as_u64().unwrap_or(0);
        assert!(
            relayed <= produced,
            "{who}: relayed {relayed} bytes by {to} ms, the source had produced ~{produced}: {ctx}"
        );
    }
    let summary = r.a_report["summary"].as_str().unwrap_or("");
    assert!(
        summary.starts_with("linked on relay in ") && summary.contains("% of bytes direct"),
        "summary: {summary}\n{ctx}"
    );
    assert!(r.a_report["first_byte_ms"].as_u64().is_some(), "{ctx}");
}

/// Once the session is on the direct path, A's host changes its address: the direct link dies,
/// the session resumes on the relay at once and moves to a new direct path behind it.
fn address_change_after_the_move(lab: &RunningLab, dir: &TempDir) {
    let start = Instant::now();
    while !std::fs::read_to_string(dir.path("a.err"))
        .unwrap_or_default()
        .contains("direct path ready")
    {
        assert!(start.elapsed() < Duration::from_secs(20), "no direct path");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", lab.lab.netns(Host::A), "sh", "-ec"])
        .arg(
            "ip addr del 10.0.1.2/24 dev eth0; ip addr add 10.0.1.3/24 dev eth0; \
             ip route replace default via 10.0.1.1",
        )
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_direct_path_that_dies_falls_back_to_the_relay_and_moves_direct_again() {
    if !require_lab() {
        return;
    }
    let (a_len, b_len) = (8 << 20, 1 << 20);
    let r = run_pair(
        (NatKind::Cone, NatKind::Cone),
        a_len,
        b_len,
        Duration::from_secs(12),
        &[],
        Some(address_change_after_the_move),
    );
    let ctx = format!("A: {}\nB: {}\nA report: {}", r.a_err, r.b_err, r.a_report);
    assert!(
        intact_and_clean(&r).is_empty(),
        "{:?}\n{ctx}",
        intact_and_clean(&r)
    );
    let kinds: Vec<String> = paths(&r.a_report)
        .iter()
        .map(|p| p["strategy"].as_str().unwrap_or("?").to_owned())
        .collect();
    // relay, direct, (the address changes) relay again, direct again.
    let relay_after_direct = kinds
        .iter()
        .skip_while(|k| *k == "relay")
        .skip_while(|k| *k != "relay")
        .count();
    assert!(relay_after_direct >= 2, "paths {kinds:?}\n{ctx}");
    assert_ne!(
        kinds.last().map(String::as_str),
        Some("relay"),
        "{kinds:?}\n{ctx}"
    );
    let resumes = r.a_report["resumes"].as_array().map_or(0, Vec::len);
    eprintln!("A's paths: {kinds:?}; resumes: {}", r.a_report["resumes"]);
    assert!(resumes >= 1, "{ctx}");
    assert_eq!(r.a_report["resumes"][0]["strategy"], "relay", "{ctx}");
}

/// A relay-first session that ends before the direct connect does (a few bytes each way, at
/// 200 ms RTT; sym × cone, whose direct path is udp-quic's birthday punching, made to miss
/// (one socket, one probe) so that it is still running: the session is done in about 4.5
/// round trips after pairing): the report still lists every direct strategy, as it ended
/// (tcp-punch: skipped by the plan) or `cancelled` with its elapsed time and the phase. (At
/// the default settings the direct path now comes about as fast as the session's end, and on
/// cone × cone, prepared before pairing, faster: nothing left to cancel.)
#[test]
fn a_session_that_ends_at_once_lists_the_direct_attempts_as_cancelled() {
    if !require_lab() {
        return;
    }
    let pair = (NatKind::Sym, NatKind::Cone);
    let lab = nettool_tests::Lab::builder(pair.0, pair.1)
        .delay(Duration::from_millis(100))
        .build()
        .unwrap_or_else(|e| panic!("cannot build the lab with delay: {e}"));
    let lab = RunningLab::on(lab, &[]);
    let dir = TempDir::new("rf-cancel");
    let config = dir.path("missing-birthday.toml");
    // One socket on the hard side and one probe: the punching practically never hits
    // (1 in 64,512), so udp-quic runs until the session's end cancels it.
    std::fs::write(
        &config,
        "[strategy.udp-quic]\nbirthday-sockets = 1\nbirthday-probes = 1\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let r = run_pair_with(
        &lab,
        pair,
        (16, 16),
        Duration::from_millis(1),
        None,
        &["--config", &config],
    );
    assert!(intact_and_clean(&r).is_empty(), "{}\n{}", r.a_err, r.b_err);
    for report in [&r.a_report, &r.b_report] {
        let attempts = report["attempts"].as_array().cloned().unwrap_or_default();
        let direct: Vec<&serde_json::Value> = attempts
            .iter()
            .filter(|a| a["strategy"] != "relay")
            .collect();
        for name in ["tcp-punch", "udp-quic", "tcp-direct"] {
            let a = direct
                .iter()
                .find(|a| a["strategy"] == name)
                .unwrap_or_else(|| panic!("{name} missing from the report: {report}"));
            assert!(a["elapsed_ms"].is_u64(), "{a}");
            assert!(
                ["connected", "failed", "timed-out", "skipped", "cancelled"]
                    .contains(&a["outcome"].as_str().unwrap_or("")),
                "{a}"
            );
        }
        assert!(
            direct.iter().any(|a| a["outcome"] == "cancelled"),
            "the session ended before any direct attempt could finish: {report}"
        );
        eprintln!("{}", serde_json::to_string(&attempts).unwrap());
    }
}
