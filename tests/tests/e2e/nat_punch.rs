//! Strategies through the NAT lab: every ordered pair of NAT kinds with the expected outcome
//! asserted, data checked each way, and repeated runs for the hard pairs. The matrix and
//! repeat helpers are generic over the strategy; tcp-punch's and tcp-direct's tests live here.

use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use nettool_tests::{require_lab, Host, Lab, NatKind};

use crate::support::{
    finish_peer, nettool_bin, sha256, spawn_peer, test_data, wait_until_waiting, PeerRun, Proc,
    TempDir,
};

/// Per-attempt timeout in the lab; pairs that must fail end after this.
pub(crate) const ATTEMPT_TIMEOUT_S: u64 = 4;

/// design.md §6: hole punching links a pair unless one side is `sym` and the other is `cone`,
/// `cone-rst`, `sym` or `fw`.
pub(crate) fn punch_expected(a: NatKind, b: NatKind) -> bool {
    let blocks_sym = |k: NatKind| {
        matches!(
            k,
            NatKind::Cone | NatKind::ConeRst | NatKind::Sym | NatKind::Fw
        )
    };
    !((a == NatKind::Sym && blocks_sym(b)) || (b == NatKind::Sym && blocks_sym(a)))
}

/// A lab with the rendezvous server running in its server namespace.
pub(crate) struct RunningLab {
    pub(crate) lab: Lab,
    server: Option<Proc>,
    /// The server's extra flags (kept for [`RunningLab::restart_server`]).
    server_extra: Vec<String>,
}

/// The lab's rendezvous server with a second address (RFC 5780, so discovery and the plan know
/// each side's NAT) and `extra` flags, once it listens.
fn start_server(lab: &Lab, extra: &[String]) -> Proc {
    let mut cmd = lab.command(Host::Server, nettool_bin());
    let listen = format!("{}:8877", lab.server_ip());
    let other = format!("{}:8878", lab.server_other_ip());
    cmd.args(["rendezvous", "--listen", &listen, "--other-address", &other])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = Proc::spawn(cmd);
    server.stderr_line_containing("listening on");
    server
}

impl RunningLab {
    pub(crate) fn new(a: NatKind, b: NatKind) -> Self {
        Self::with_server_args(a, b, &[])
    }

    /// As [`RunningLab::new`], the server started with `extra` flags too.
    pub(crate) fn with_server_args(a: NatKind, b: NatKind, extra: &[&str]) -> Self {
        let lab = Lab::new(a, b).unwrap_or_else(|e| panic!("cannot build the lab {a} x {b}: {e}"));
        Self::on(lab, extra)
    }

    /// The rendezvous server (with `extra` flags) started on a lab built by the caller (with
    /// link conditions, say).
    pub(crate) fn on(lab: Lab, extra: &[&str]) -> Self {
        let server_extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let server = Some(start_server(&lab, &server_extra));
        Self {
            lab,
            server,
            server_extra,
        }
    }

    /// Kills the rendezvous server and starts it again at the same addresses `pause` later
    /// (with the same identity: it is kept in the lab's state directory).
    pub(crate) fn restart_server(&mut self, pause: std::time::Duration) {
        drop(self.server.take());
        std::thread::sleep(pause);
        self.server = Some(start_server(&self.lab, &self.server_extra));
    }

    /// Runs `nettool connect` on A (first) and B (second) with `extra` flags.
    pub(crate) fn connect_pair(
        &self,
        session: &str,
        extra: &[&str],
        a_in: &[u8],
        b_in: &[u8],
    ) -> (PeerRun, PeerRun) {
        let dir = TempDir::new(session);
        let server = format!("{}:8877", self.lab.server_ip());
        let mut args: Vec<String> = ["--server", &server, "--session", session, "--secret", "lab"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (a, _) = spawn_peer(
            self.lab.command(Host::A, nettool_bin()),
            &dir,
            "a",
            a_in,
            &args,
        );
        wait_until_waiting(&dir, "a");
        let (b, _) = spawn_peer(
            self.lab.command(Host::B, nettool_bin()),
            &dir,
            "b",
            b_in,
            &args,
        );
        let limit = Duration::from_secs(60);
        let a = finish_peer(a, &dir, "a", limit);
        let b = finish_peer(b, &dir, "b", limit);
        (a, b)
    }
}

/// design.md §6: tcp-direct links a pair when one side is `none` or `full` (reachable).
pub(crate) fn direct_expected(a: NatKind, b: NatKind) -> bool {
    let reachable = |k: NatKind| matches!(k, NatKind::None | NatKind::Full);
    reachable(a) || reachable(b)
}

/// Flags for one strategy on its own, tried blindly (`--plan off`): these matrices test what
/// the strategy itself can do, not the plan.
pub(crate) fn strategy_flags(strategy: &str) -> Vec<String> {
    vec![
        "--plan".into(),
        "off".into(),
        "--strategy".into(),
        strategy.into(),
        "--strategy-timeout".into(),
        format!("{ATTEMPT_TIMEOUT_S}s"),
        "--timeout".into(),
        "30s".into(),
    ]
}

/// What one matrix cell produced.
struct Cell {
    a: NatKind,
    b: NatKind,
    linked: bool,
    ms: u64,
    /// The second peer's whole connect (it joins last, so this is its time to link).
    total_ms: u64,
    problem: Option<String>,
}

fn run_cell(flags: &[String], expected: Option<&str>, a: NatKind, b: NatKind) -> Cell {
    let lab = RunningLab::new(a, b);
    let a_in = test_data(256 << 10, 11);
    let b_in = test_data(192 << 10, 12);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (ra, rb) = lab.connect_pair(&format!("m-{a}-{b}"), &flags, &a_in, &b_in);
    let linked = ra.strategy().is_some() && ra.strategy() == rb.strategy();
    let ms = ra
        .report
        .as_ref()
        .and_then(|r| r["attempts"].as_array())
        .and_then(|v| v.iter().find(|x| x["outcome"] == "connected"))
        .and_then(|x| x["elapsed_ms"].as_u64())
        .unwrap_or(0);
    let total_ms = rb
        .report
        .as_ref()
        .and_then(|r| r["elapsed_ms"].as_u64())
        .unwrap_or(0);
    let planned = !flags.windows(2).any(|w| w == ["--plan", "off"]);
    let mut problems = Vec::new();
    // Every attempt that did not link says why; with the plan on, the ones before the winner
    // were skipped as impossible, not tried and timed out.
    for (run, name) in [(&ra, "a"), (&rb, "b")] {
        let attempts = run
            .report
            .as_ref()
            .and_then(|r| r["attempts"].as_array().cloned())
            .unwrap_or_default();
        for attempt in attempts.iter().filter(|x| x["outcome"] != "connected") {
            if attempt["error"].as_str().unwrap_or("").is_empty() {
                problems.push(format!("{name}: an attempt without its reason: {attempt}"));
            }
            // (Birthday punching may miss; the relay after it is still right.)
            let birthday = attempt["mode"] == "birthday";
            if planned && linked && attempt["outcome"] != "skipped" && !birthday {
                problems.push(format!(
                    "{name}: the plan tried a hopeless strategy: {attempt}"
                ));
            }
        }
    }
    // `expected` may name alternatives, `a|b`: the first is what should win, the later ones
    // what may win after a rare miss (birthday punching, then the relay).
    let fits = |got: Option<&str>| match (expected, got) {
        (None, None) => true,
        (Some(e), Some(g)) => e.split('|').any(|x| x == g),
        _ => false,
    };
    if !fits(ra.strategy()) || !fits(rb.strategy()) {
        let attempts = |r: &PeerRun| {
            r.report
                .as_ref()
                .map(|x| x["attempts"].to_string())
                .unwrap_or_else(|| r.stderr.trim().to_owned())
        };
        problems.push(format!(
            "expected {}, got a: {:?} b: {:?}; a: {} b: {}",
            expected.map_or("no link".to_owned(), |s| format!("a link by {s}")),
            ra.strategy(),
            rb.strategy(),
            attempts(&ra),
            attempts(&rb)
        ));
    } else if linked {
        problems.extend(transfer_problems(&ra, &rb, &a_in, &b_in));
    } else {
        for (run, name) in [(&ra, "a"), (&rb, "b")] {
            if run.status.and_then(|s| s.code()) != Some(1) {
                problems.push(format!(
                    "{name} should exit 1 without a link, got {:?}",
                    run.status
                ));
            }
            let attempts = run
                .report
                .as_ref()
                .and_then(|r| r["attempts"].as_array().cloned())
                .unwrap_or_default();
            if attempts.is_empty() {
                problems.push(format!("{name}: report lists no attempt"));
            }
            for attempt in attempts {
                let outcome = attempt["outcome"].as_str().unwrap_or("none");
                let error = attempt["error"].as_str().unwrap_or("");
                let elapsed = attempt["elapsed_ms"].as_u64().unwrap_or(u64::MAX);
                if !matches!(outcome, "timed-out" | "failed" | "skipped") || error.is_empty() {
                    problems.push(format!(
                        "{name}: report lacks the reason: {outcome} {error:?}"
                    ));
                }
                // Each attempt ends within its timeout (plus the wait for the peer's result).
                if elapsed > (ATTEMPT_TIMEOUT_S + 2) * 1000 {
                    problems.push(format!("{name}: failing attempt took {elapsed} ms"));
                }
            }
        }
    }
    Cell {
        a,
        b,
        linked,
        ms,
        total_ms,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

/// What went wrong in a linked pair's transfer: an exit other than 0, data that differs.
fn transfer_problems(ra: &PeerRun, rb: &PeerRun, a_in: &[u8], b_in: &[u8]) -> Vec<String> {
    let mut problems = Vec::new();
    for (run, name) in [(ra, "a"), (rb, "b")] {
        if !run.status.is_some_and(|s| s.success()) {
            problems.push(format!(
                "{name} exited with {:?}: {}",
                run.status,
                run.stderr.trim()
            ));
        }
    }
    for (got, sent, way) in [(&rb.stdout, a_in, "a -> b"), (&ra.stdout, b_in, "b -> a")] {
        if sha256(got) != sha256(sent) {
            problems.push(format!(
                "{way} data differs ({} of {} bytes arrived)",
                got.len(),
                sent.len()
            ));
        }
    }
    problems
}

/// Runs `nettool connect` with `flags` for every ordered pair of NAT kinds (4 labs at a time),
/// prints the table of times to link under `title` and asserts that each pair linked with
/// exactly the strategy `expected` names (`None`: no link).
pub(crate) fn run_matrix_with(
    title: &str,
    flags: &[String],
    expected: impl Fn(NatKind, NatKind) -> Option<&'static str> + Sync,
) {
    let pairs: Vec<(NatKind, NatKind)> = NatKind::ALL
        .iter()
        .flat_map(|a| NatKind::ALL.iter().map(move |b| (*a, *b)))
        .collect();
    let queue = Mutex::new(pairs);
    let cells = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some((a, b)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let cell = run_cell(flags, expected(a, b), a, b);
                cells.lock().unwrap().push(cell);
            });
        }
    });
    let cells = cells.into_inner().unwrap();
    let mut table = format!("{title}, A (rows, first) x B (columns, second):\n");
    table.push_str(&format!("{:>9}", ""));
    for b in NatKind::ALL {
        table.push_str(&format!("{b:>10}"));
    }
    table.push('\n');
    for a in NatKind::ALL {
        table.push_str(&format!("{a:>9}"));
        for b in NatKind::ALL {
            let c = cells.iter().find(|c| c.a == a && c.b == b).unwrap();
            let text = if c.linked {
                format!("{}ms", c.ms)
            } else {
                "-".into()
            };
            table.push_str(&format!("{text:>10}"));
        }
        table.push('\n');
    }
    let mut totals: Vec<u64> = cells
        .iter()
        .filter(|c| c.linked)
        .map(|c| c.total_ms)
        .collect();
    totals.sort_unstable();
    if !totals.is_empty() {
        let at = |q: f64| totals[((totals.len() - 1) as f64 * q).round() as usize];
        table.push_str(&format!(
            "second peer's whole connect (time to link), {} linked pairs: p50 {} ms, p95 {} ms, \
             max {} ms ({} build)\n",
            totals.len(),
            at(0.5),
            at(0.95),
            totals[totals.len() - 1],
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        ));
    }
    eprintln!("{table}");
    let problems: Vec<String> = cells
        .iter()
        .filter_map(|c| {
            c.problem
                .as_ref()
                .map(|p| format!("{} x {}: {p}", c.a, c.b))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "{} cells wrong:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// [`run_matrix_with`] for one strategy on its own.
pub(crate) fn run_matrix(strategy: &'static str, expected: fn(NatKind, NatKind) -> bool) {
    run_matrix_with(strategy, &strategy_flags(strategy), |a, b| {
        expected(a, b).then_some(strategy)
    });
}

#[test]
fn tcp_punch_links_exactly_the_expected_pairs() {
    if require_lab() {
        run_matrix("tcp-punch", punch_expected);
    }
}

#[test]
fn tcp_direct_links_exactly_the_expected_pairs() {
    if require_lab() {
        run_matrix("tcp-direct", direct_expected);
    }
}

/// 20 runs of `strategy` in one lab; a run counts when it links within 1.5 s. Prints and
/// asserts the count (at least 19).
pub(crate) fn repeated(strategy: &str, a: NatKind, b: NatKind) {
    if !require_lab() {
        return;
    }
    let lab = RunningLab::new(a, b);
    let flags = strategy_flags(strategy);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for i in 0..20 {
        let (ra, rb) = lab.connect_pair(&format!("r-{i}"), &flags, b"ping", b"pong");
        let ms = ra.first_attempt().and_then(|x| x["elapsed_ms"].as_u64());
        let ok = ra.strategy() == Some(strategy)
            && rb.strategy() == Some(strategy)
            && ra.stdout == b"pong"
            && rb.stdout == b"ping"
            && ms.is_some_and(|ms| ms <= 1500);
        if ok {
            times.push(ms.unwrap());
        } else {
            failures.push(format!(
                "run {i}: {ms:?} ms; a: {} b: {}",
                ra.stderr.trim(),
                rb.stderr.trim()
            ));
        }
    }
    times.sort_unstable();
    eprintln!(
        "{strategy} {a} x {b}: {}/20 linked within 1.5 s; time to link min {:?} median {:?} max {:?} ms",
        times.len(),
        times.first(),
        times.get(times.len() / 2),
        times.last()
    );
    assert!(
        times.len() >= 19,
        "only {}/20 runs linked:\n{}",
        times.len(),
        failures.join("\n")
    );
}

#[test]
fn tcp_punch_cone_x_cone_20_runs() {
    repeated("tcp-punch", NatKind::Cone, NatKind::Cone);
}

#[test]
fn tcp_punch_cone_rst_x_cone_rst_20_runs() {
    repeated("tcp-punch", NatKind::ConeRst, NatKind::ConeRst);
}

/// The stall of issue 12: through a stateful firewall, a tcp-punch link whose SYN met the
/// firewalled peer's listener instead of its primed socket (the priming SYN's ICMP error had
/// just killed it) carried data and then lost its last segment, FIN included, as out of window
/// at the firewall; the receiver waited for ever. Seen in 2–3 % of none × fw runs before the
/// listener refused such connections (`tcp_punch.rs`, module documentation). 100 transfers,
/// 256 KiB and 192 KiB each way at once, every byte checked, each in a fresh lab (two at a
/// time). Not in CI: the reset cut the rate from about 1 in 35 to about 1 in 600, and the
/// rest (a priming socket replaced just as the peer's SYN passed) is made harmless by sending
/// the FIN alone (`LoneFin`); at these rates 100 transfers do not show either, so CI runs the
/// deterministic `a_firewall_dropping_the_peers_fins_costs_no_data` and the reset's unit
/// tests in `tcp_punch.rs` instead.
#[test]
#[ignore = "soak: run with --ignored --nocapture, as root (about 25 s)"]
fn tcp_punch_none_x_fw_100_transfers_none_stalls() {
    if !require_lab() {
        return;
    }
    // NETTOOL_STALL_KINDS=a,b runs the same soak through another pair (e.g. fw,fw).
    let (ka, kb) = crate::support::kinds_from_env("NETTOOL_STALL_KINDS", "none,fw");
    let failures = Mutex::new(Vec::new());
    let slow = Mutex::new(Vec::new());
    let (a_in, b_in) = (test_data(256 << 10, 21), test_data(192 << 10, 22));
    std::thread::scope(|s| {
        // Two labs at a time: more would starve the test running next to this one.
        for t in 0..2 {
            let (failures, slow, a_in, b_in) = (&failures, &slow, &a_in, &b_in);
            s.spawn(move || {
                for i in 0..50 {
                    // A fresh lab each time: the middle router's ICMP rate limit (which spares
                    // the priming sockets after a few errors) starts full, as on a new path.
                    let lab = RunningLab::new(ka, kb);
                    let started = std::time::Instant::now();
                    let (ra, rb) = lab.connect_pair(
                        &format!("nf-{t}-{i}"),
                        // The default order, as users run it (the plan's discovery first).
                        &["--strategy-timeout", "2s"],
                        a_in,
                        b_in,
                    );
                    let took = started.elapsed();
                    let intact = ra.status.is_some_and(|s| s.success())
                        && rb.status.is_some_and(|s| s.success())
                        && rb.stdout == *a_in
                        && ra.stdout == *b_in;
                    if !intact {
                        failures.lock().unwrap().push(format!(
                            "run {t}-{i} after {took:?}: a {:?} got {} of {} bytes, b {:?} got {} \
                             of {}; a: {} b: {}",
                            ra.status,
                            ra.stdout.len(),
                            b_in.len(),
                            rb.status,
                            rb.stdout.len(),
                            a_in.len(),
                            ra.stderr.trim(),
                            rb.stderr.trim()
                        ));
                    } else if took > Duration::from_secs(5) {
                        slow.lock().unwrap().push(format!("{t}-{i}: {took:?}"));
                    }
                }
            });
        }
    });
    let (failures, slow) = (failures.into_inner().unwrap(), slow.into_inner().unwrap());
    eprintln!(
        "tcp-punch {ka} x {kb}: {} of 100 transfers intact; over 5 s: {slow:?}",
        100 - failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of 100 transfers failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// What a router does to a punched connection whose handshake its connection tracking
/// missed (state SYN_SENT2, holding a dead priming socket's sequence number; measured with
/// `nf_conntrack_log_invalid`): data and ACKs pass as "ignored", an incoming FIN is dropped as
/// invalid, and so is every retransmission of it. Here the firewall in front of B drops every
/// FIN from A on purpose, and both TCP strategies must still deliver every byte both ways and
/// end cleanly: A sends its FIN only once B has acknowledged everything before it (`LoneFin`
/// in `strategies/src/net.rs`), so only the bare FIN is lost, after the TLS close_notify
/// already ended the stream. 16 MiB from A through a 100 Mbit/s bottleneck, so the FIN would
/// otherwise ride on queued data.
#[test]
fn a_firewall_dropping_the_peers_fins_costs_no_data() {
    if !require_lab() {
        return;
    }
    let (a_in, b_in) = (test_data(16 << 20, 31), test_data(64 << 10, 32));
    let run = |strategy: &str| {
        let lab = RunningLab::new(NatKind::None, NatKind::Fw);
        let router = lab.lab.router_netns(Host::B).expect("fw has a router");
        let rule = format!(
            "insert rule inet ntl forward iifname \"wan\" ip saddr {} tcp flags & fin == fin \
             counter drop",
            lab.lab.public_ip(Host::A)
        );
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", router, "nft", &rule])
            .status()
            .expect("nft runs");
        assert!(status.success(), "cannot add the FIN-dropping rule");
        // A bottleneck towards B (100 Mbit/s), so A still has data queued when its input
        // ends: without `LoneFin` its FIN would ride on that data.
        let status = std::process::Command::new("ip")
            .args([
                "netns", "exec", router, "tc", "qdisc", "add", "dev", "lan", "root",
            ])
            .args([
                "tbf", "rate", "100mbit", "burst", "64kb", "latency", "100ms",
            ])
            .status()
            .expect("tc runs");
        assert!(status.success(), "cannot shape the link towards B");
        let flags = strategy_flags(strategy);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (ra, rb) = lab.connect_pair(&format!("fin-{strategy}"), &flags, &a_in, &b_in);
        let counters = std::process::Command::new("ip")
            .args([
                "netns", "exec", router, "nft", "list", "chain", "inet", "ntl", "forward",
            ])
            .output()
            .expect("nft runs");
        let listing = String::from_utf8_lossy(&counters.stdout).into_owned();
        let dropped: u64 = listing
            .lines()
            .find(|l| l.contains("tcp flags & fin == fin"))
            .and_then(|l| l.split("packets ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut problems = Vec::new();
        if ra.strategy() != Some(strategy) || rb.strategy() != Some(strategy) {
            problems.push(format!(
                "expected {strategy}, got a: {:?} b: {:?}",
                ra.strategy(),
                rb.strategy()
            ));
        }
        problems.extend(transfer_problems(&ra, &rb, &a_in, &b_in));
        // The rule did its part: FINs from A were dropped (else this test proves nothing).
        if dropped == 0 {
            problems.push(format!("no FIN from A was dropped:\n{listing}"));
        }
        eprintln!("{strategy}: {dropped} FIN packets from A dropped at B's firewall");
        problems
    };
    let problems: Vec<String> = ["tcp-punch", "tcp-direct"]
        .iter()
        .flat_map(|s| run(s).into_iter().map(move |p| format!("{s}: {p}")))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
#[ignore = "debugging aid: holds a lab (HOLD_KINDS=a,b, default cone-rst,cone-rst) for HOLD_SECS"]
fn hold_lab_for_debugging() {
    let (a, b) = crate::support::kinds_from_env("HOLD_KINDS", "cone-rst,cone-rst");
    let lab = RunningLab::new(a, b);
    for h in [Host::Server, Host::A, Host::B] {
        eprintln!(
            "{h:?}: {} router {:?}",
            lab.lab.netns(h),
            lab.lab.router_netns(h)
        );
    }
    std::thread::sleep(Duration::from_secs(
        std::env::var("HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    ));
}
