//! The session layer through the lab: a link that survives its path. Each case streams 4 MiB
//! from A to B paced over 16 s (and 64 KiB from B to A), makes something happen to the path
//! 5 s into the stream, and asserts that B's output is byte-identical and both exit 0 within
//! 60 s: A's address changes, A's NAT forgets its mappings (conntrack flushed), the rendezvous
//! server under a relay link restarts, or (two `--server`s given) the first is killed for good
//! and the session resumes through the second. The only server killed for good: the sender
//! exits non-zero and says how many bytes were confirmed, never 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nettool_tests::{require_lab, Host, Lab, NatKind};

use crate::support::{
    feed_paced, nettool_bin, nettool_embed_bin, sha256, test_data, Proc, TempDir,
};

const TOTAL: usize = 4 << 20;
const PACE: Duration = Duration::from_secs(16);
const EVENT_AFTER: Duration = Duration::from_secs(5);

/// What happens to the path mid-stream.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// A's host changes its LAN address (10.0.1.2 → 10.0.1.3).
    AddressChange,
    /// A's router flushes connection tracking (every NAT mapping forgotten).
    ConntrackFlush,
    /// The rendezvous server is killed and started again 2 s later at the same address.
    ServerRestart,
    /// The rendezvous server is killed for good.
    ServerGone,
    /// Both peers were given two servers; the first (the one in use) is killed for good.
    FirstServerGone,
}

/// The second server of [`Event::FirstServerGone`]: another address, another process.
fn second_server_addr(lab: &Lab) -> String {
    format!("{}:9000", lab.server_other_ip())
}

fn start_server(lab: &Lab) -> Proc {
    let listen = format!("{}:8877", lab.server_ip());
    let other = format!("{}:8878", lab.server_other_ip());
    start_server_at(lab, &listen, Some(&other))
}

fn start_server_at(lab: &Lab, listen: &str, other: Option<&str>) -> Proc {
    let mut cmd = lab.command(Host::Server, nettool_bin());
    cmd.args(["rendezvous", "--listen", listen]);
    if let Some(other) = other {
        cmd.args(["--other-address", other]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = Proc::spawn(cmd);
    server.stderr_line_containing("listening on");
    server
}

fn sh(lab: &Lab, ns: &str, script: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-ec", script])
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "`{script}` in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = lab;
}

struct Outcome {
    a_code: Option<i32>,
    b_code: Option<i32>,
    a_err: String,
    b_err: String,
    b_out_ok: bool,
    a_out_ok: bool,
    b_out_len: usize,
    a_report: Option<serde_json::Value>,
}

/// Runs one paced stream with `event` 5 s in; `extra` flags for both peers.
fn paced(a: NatKind, b: NatKind, strategy: &str, event: Event, extra: &[&str]) -> Outcome {
    paced_at(None, a, b, strategy, event, extra)
}

/// [`paced`] in a lab whose internet router holds every packet `delay` (RTT = 2 × delay).
fn paced_at(
    delay: Option<Duration>,
    a: NatKind,
    b: NatKind,
    strategy: &str,
    event: Event,
    extra: &[&str],
) -> Outcome {
    paced_by(delay, a, b, Program::Connect { strategy, extra }, event)
}

/// Which program the two peers run.
#[derive(Clone, Copy)]
enum Program<'a> {
    /// `nettool connect --strategy STRATEGY EXTRA...`.
    Connect {
        strategy: &'a str,
        extra: &'a [&'a str],
    },
    /// `nettool-embed` (examples/embed: the library's durable stream, default strategies,
    /// relay-first).
    Embed,
}

/// [`paced_at`] with either program.
fn paced_by(
    delay: Option<Duration>,
    a: NatKind,
    b: NatKind,
    program: Program<'_>,
    event: Event,
) -> Outcome {
    let strategy = match program {
        Program::Connect { strategy, .. } => strategy,
        Program::Embed => "embed",
    };
    let mut builder = Lab::builder(a, b);
    if let Some(d) = delay {
        builder = builder.delay(d);
    }
    let lab = builder
        .build()
        .unwrap_or_else(|e| panic!("cannot build the lab {a} x {b}: {e}"));
    let mut server = Some(start_server(&lab));
    let second = matches!(event, Event::FirstServerGone)
        .then(|| start_server_at(&lab, &second_server_addr(&lab), None));
    let dir = TempDir::new(&format!("session-{strategy}-{event:?}"));
    let server_addr = format!("{}:8877", lab.server_ip());
    let a_data = test_data(TOTAL, 25);
    let b_data = test_data(64 << 10, 26);
    std::fs::write(dir.path("b.in"), &b_data).unwrap();
    let peer = |h: Host, name: &str, stdin: Stdio| {
        let mut cmd = match program {
            Program::Connect { strategy, extra } => {
                let mut cmd = lab.command(h, nettool_bin());
                cmd.args(["connect", "--server", &server_addr, "--session", "durable"]);
                if second.is_some() {
                    cmd.args(["--server", &second_server_addr(&lab)]);
                }
                cmd.args(["--secret", "lab", "--strategy", strategy])
                    .args(extra)
                    .arg("--report")
                    .arg(dir.path(&format!("{name}.report.json")));
                cmd
            }
            Program::Embed => {
                let mut cmd = lab.command(h, nettool_embed_bin());
                cmd.args(["--server", &server_addr, "--session", "durable"])
                    .args(["--secret", "lab"]);
                cmd
            }
        };
        cmd.stdin(stdin)
            .stdout(std::fs::File::create(dir.path(&format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.path(&format!("{name}.err"))).unwrap());
        Proc::spawn(cmd)
    };
    let mut a_proc = peer(Host::A, "a", Stdio::piped());
    let feed = a_proc.child.stdin.take().expect("piped");
    // B joins second once A waits.
    let start = Instant::now();
    let waiting =
        |err: String| err.contains("waiting for the peer") || err.contains("Connect(Waiting)");
    while !waiting(std::fs::read_to_string(dir.path("a.err")).unwrap_or_default()) {
        assert!(start.elapsed() < Duration::from_secs(20), "A did not join");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut b_proc = peer(
        Host::B,
        "b",
        Stdio::from(std::fs::File::open(dir.path("b.in")).unwrap()),
    );
    let feeder = std::thread::spawn(move || feed_paced(feed, &a_data, 256, PACE));
    // The event, 5 s after the first bytes reached B.
    let start = Instant::now();
    while std::fs::metadata(dir.path("b.out")).map_or(0, |m| m.len()) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no byte reached B: {}",
            std::fs::read_to_string(dir.path("b.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(EVENT_AFTER);
    let at = std::fs::metadata(dir.path("b.out")).map_or(0, |m| m.len());
    eprintln!("{a} x {b} {strategy}: {event:?} with {at} bytes at B");
    match event {
        Event::AddressChange => sh(
            &lab,
            lab.netns(Host::A),
            "ip addr del 10.0.1.2/24 dev eth0; ip addr add 10.0.1.3/24 dev eth0; \
             ip route replace default via 10.0.1.1",
        ),
        Event::ConntrackFlush => lab.flush_conntrack(Host::A).expect("conntrack -F"),
        Event::ServerRestart => {
            drop(server.take());
            std::thread::sleep(Duration::from_secs(2));
            server = Some(start_server(&lab));
        }
        Event::ServerGone | Event::FirstServerGone => drop(server.take()),
    }
    feeder.join().unwrap();
    let limit = Duration::from_secs(60);
    let a_status = a_proc.wait_timeout(limit);
    let b_status = b_proc.wait_timeout(limit);
    drop(server);
    drop(second);
    let b_out = std::fs::read(dir.path("b.out")).unwrap_or_default();
    let a_out = std::fs::read(dir.path("a.out")).unwrap_or_default();
    Outcome {
        a_code: a_status.and_then(|s| s.code()),
        b_code: b_status.and_then(|s| s.code()),
        a_err: std::fs::read_to_string(dir.path("a.err")).unwrap_or_default(),
        b_err: std::fs::read_to_string(dir.path("b.err")).unwrap_or_default(),
        b_out_ok: sha256(&b_out) == sha256(&test_data(TOTAL, 25)),
        a_out_ok: a_out == b_data,
        b_out_len: b_out.len(),
        a_report: std::fs::read(dir.path("a.report.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
    }
}

/// The case must end intact, both exit 0, with at least one resume or a path that survived;
/// `delay` one way at the internet router (`None`: the lab's own sub-millisecond paths).
fn survives_at(
    delay: Option<Duration>,
    a: NatKind,
    b: NatKind,
    strategy: &str,
    event: Event,
) -> Result<(), String> {
    let o = paced_at(delay, a, b, strategy, event, &[]);
    let resumes = o
        .a_report
        .as_ref()
        .and_then(|r| r["resumes"].as_array().map(Vec::len))
        .unwrap_or(0);
    eprintln!(
        "{a} x {b} {strategy} {event:?}: A {:?} B {:?}, {} bytes at B, {resumes} resume(s); A: {}",
        o.a_code,
        o.b_code,
        o.b_out_len,
        o.a_err.lines().last().unwrap_or("")
    );
    if o.a_code == Some(0) && o.b_code == Some(0) && o.b_out_ok && o.a_out_ok {
        Ok(())
    } else {
        Err(format!(
            "{a} x {b} {strategy} {event:?}: A exit {:?}, B exit {:?}, B got {} of {TOTAL} bytes \
             (identical: {}), A's output identical: {}\nA: {}\nB: {}",
            o.a_code, o.b_code, o.b_out_len, o.b_out_ok, o.a_out_ok, o.a_err, o.b_err
        ))
    }
}

fn run_cases(cases: &[(NatKind, NatKind, &'static str, Event)]) {
    run_cases_at(None, cases);
}

fn run_cases_at(delay: Option<Duration>, cases: &[(NatKind, NatKind, &'static str, Event)]) {
    if !require_lab() {
        return;
    }
    let problems: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|&(a, b, strategy, event)| {
                s.spawn(move || survives_at(delay, a, b, strategy, event))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap().err())
            .collect()
    });
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn a_link_survives_an_address_change() {
    run_cases(&[
        (
            NatKind::Cone,
            NatKind::Cone,
            "tcp-punch",
            Event::AddressChange,
        ),
        (
            NatKind::Cone,
            NatKind::Cone,
            "udp-quic",
            Event::AddressChange,
        ),
    ]);
}

/// The library's durable stream (issue "The durable link is the toolkit"): two
/// `nettool-embed` processes (examples/embed, only the public API of `nettool-peer`: default
/// strategies, relay-first), cone × cone, 4 MiB paced over 16 s, A's host changes its address
/// 5 s in: B's output byte-identical, both exit 0. Watched red with resume switched off (a
/// test-only build, `NETTOOL_TEST_RESUME_OFF`).
#[test]
fn two_embedded_peers_survive_an_address_change() {
    if !require_lab() {
        return;
    }
    let (a, b) = (NatKind::Cone, NatKind::Cone);
    let o = paced_by(None, a, b, Program::Embed, Event::AddressChange);
    let resumes = o.a_err.matches("Resumed {").count();
    eprintln!(
        "embed {a} x {b} AddressChange: A {:?} B {:?}, {} bytes at B, {resumes} resume(s); A: {}",
        o.a_code,
        o.b_code,
        o.b_out_len,
        o.a_err.lines().last().unwrap_or("")
    );
    assert!(
        o.a_code == Some(0) && o.b_code == Some(0) && o.b_out_ok && o.a_out_ok,
        "A exit {:?}, B exit {:?}, B got {} of {TOTAL} bytes (identical: {}), A's output \
         identical: {}\nA: {}\nB: {}",
        o.a_code,
        o.b_code,
        o.b_out_len,
        o.b_out_ok,
        o.a_out_ok,
        o.a_err,
        o.b_err
    );
}

#[test]
fn a_link_survives_a_nat_that_forgets_its_mappings() {
    run_cases(&[
        (
            NatKind::Sym,
            NatKind::Full,
            "tcp-punch",
            Event::ConntrackFlush,
        ),
        (
            NatKind::Sym,
            NatKind::Full,
            "udp-quic",
            Event::ConntrackFlush,
        ),
    ]);
}

/// The path events at a distance (100 ms RTT: 50 ms each way at the internet router): an
/// address change under tcp-punch, a NAT that forgets its mappings under udp-quic, a server
/// restart under the relay. Intact, both exit 0.
#[test]
fn the_path_events_are_survived_at_100ms_rtt() {
    run_cases_at(
        Some(Duration::from_millis(50)),
        &[
            (
                NatKind::Cone,
                NatKind::Cone,
                "tcp-punch",
                Event::AddressChange,
            ),
            (
                NatKind::Sym,
                NatKind::Full,
                "udp-quic",
                Event::ConntrackFlush,
            ),
            (NatKind::Cone, NatKind::Cone, "relay", Event::ServerRestart),
        ],
    );
}

#[test]
fn a_relay_link_survives_a_server_restart() {
    run_cases(&[(NatKind::Cone, NatKind::Cone, "relay", Event::ServerRestart)]);
}

#[test]
fn a_relay_link_resumes_through_the_second_server_when_the_first_is_gone() {
    run_cases(&[(
        NatKind::Cone,
        NatKind::Cone,
        "relay",
        Event::FirstServerGone,
    )]);
}

#[test]
fn the_sender_never_exits_0_when_the_only_server_is_gone() {
    if !require_lab() {
        return;
    }
    let o = paced(
        NatKind::Cone,
        NatKind::Cone,
        "relay",
        Event::ServerGone,
        &["--resume-timeout", "8s"],
    );
    let ctx = format!("A: {}\nB: {}", o.a_err, o.b_err);
    assert!(
        o.a_code.is_some() && o.a_code != Some(0),
        "A exit {:?}\n{ctx}",
        o.a_code
    );
    assert!(
        o.b_code.is_some() && o.b_code != Some(0),
        "B exit {:?}\n{ctx}",
        o.b_code
    );
    let last = o.a_err.lines().last().unwrap_or("");
    assert!(
        last.contains("link lost") && last.contains("confirmed written by the peer"),
        "A's last line: {last}\n{ctx}"
    );
    assert!(!o.b_out_ok, "B cannot have everything: the stream was cut");
}
