//! Self-tests of the NAT lab: each router kind behaves as design.md §6 says.

use std::io::{BufRead, BufReader, Lines};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nettool_tests::{require_lab, Host, Lab, NatKind};

const PROBE: &str = env!("CARGO_BIN_EXE_labprobe");

/// A probe running in the background (a listener); killed when dropped.
struct Background {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    what: String,
}

impl Background {
    /// Starts `labprobe args` on `host` and waits for its `listening` line.
    fn start(lab: &Lab, host: Host, args: &[&str]) -> Self {
        let mut child = probe(lab, host, args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn labprobe");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut bg = Self {
            child,
            lines,
            what: format!("{host:?}: labprobe {}", args.join(" ")),
        };
        let first = bg.next_line();
        assert!(first.starts_with("listening "), "{}: {first}", bg.what);
        bg
    }

    fn next_line(&mut self) -> String {
        match self.lines.next() {
            Some(line) => line.expect("read probe output"),
            None => panic!("{}: exited without output", self.what),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn probe(lab: &Lab, host: Host, args: &[&str]) -> Command {
    let mut c = lab.command(host, PROBE);
    c.args(args);
    c
}

/// Runs `labprobe args` on `host` to completion; returns its output lines and how long it took.
fn run(lab: &Lab, host: Host, args: &[&str]) -> (Vec<String>, Duration) {
    let start = Instant::now();
    let out = probe(lab, host, args).output().expect("run labprobe");
    let took = start.elapsed();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(
        !lines.is_empty(),
        "{host:?}: labprobe {args:?} printed nothing: {out:?}"
    );
    (lines, took)
}

fn addr(ip: Ipv4Addr, port: u16) -> String {
    SocketAddrV4::new(ip, port).to_string()
}

fn word(line: &str, i: usize) -> &str {
    line.split_whitespace().nth(i).unwrap_or_default()
}

fn sock(s: &str) -> SocketAddrV4 {
    s.parse()
        .unwrap_or_else(|_| panic!("not an address: {s:?}"))
}

/// Everything one peer's router kind promises, checked against the running lab.
fn check_side(lab: &Lab, h: Host) {
    let kind = lab.kind(h).expect("peer");
    let ctx = format!("{h:?} behind {kind}");
    let public = lab.public_ip(h);
    let server = lab.server_ip();

    // Outbound TCP: the server sees the host's public address.
    let mut listen = Background::start(lab, Host::Server, &["tcp-listen", "7000"]);
    let (out, _) = run(
        lab,
        h,
        &["tcp-connect", &addr(server, 7000), "--timeout-ms", "2000"],
    );
    assert_eq!(
        word(&out[0], 0),
        "connected",
        "{ctx}: outbound tcp: {out:?}"
    );
    let local = sock(word(&out[0], 1));
    let accepted = listen.next_line();
    let seen = sock(word(&accepted, 1));
    assert_eq!(*seen.ip(), public, "{ctx}: server saw {accepted}");
    if kind != NatKind::Sym {
        assert_eq!(seen.port(), local.port(), "{ctx}: port not preserved");
    }
    drop(listen);

    // Outbound UDP: same public address.
    let _echo = Background::start(lab, Host::Server, &["udp-echo", "7001"]);
    let (out, _) = run(
        lab,
        h,
        &["udp-send", &addr(server, 7001), "--timeout-ms", "2000"],
    );
    assert_eq!(word(&out[0], 0), "reply", "{ctx}: outbound udp: {out:?}");
    assert_eq!(*sock(word(&out[0], 2)).ip(), public, "{ctx}: {out:?}");

    // Unsolicited inbound TCP from the server host.
    let mut listen = Background::start(lab, h, &["tcp-listen", "8000", "--timeout-ms", "5000"]);
    let (out, took) = run(
        lab,
        Host::Server,
        &["tcp-connect", &addr(public, 8000), "--timeout-ms", "1000"],
    );
    let expected = match kind {
        NatKind::None | NatKind::Full => "connected",
        NatKind::ConeRst => "refused",
        NatKind::Cone | NatKind::Sym | NatKind::Fw => "timeout",
    };
    assert_eq!(
        word(&out[0], 0),
        expected,
        "{ctx}: unsolicited tcp: {out:?}"
    );
    match expected {
        "connected" => {
            let accepted = listen.next_line();
            assert_eq!(*sock(word(&accepted, 1)).ip(), server, "{ctx}: {accepted}");
        }
        "refused" => assert!(
            took < Duration::from_millis(500),
            "{ctx}: reset took {took:?}"
        ),
        _ => assert!(
            took >= Duration::from_millis(900),
            "{ctx}: gave up after {took:?}"
        ),
    }
    drop(listen);

    // Unsolicited inbound UDP from the server host.
    let _echo = Background::start(lab, h, &["udp-echo", "8001", "--timeout-ms", "5000"]);
    let (out, took) = run(
        lab,
        Host::Server,
        &["udp-send", &addr(public, 8001), "--timeout-ms", "1000"],
    );
    let expected = match kind {
        NatKind::None | NatKind::Full => "reply",
        NatKind::ConeRst => "refused",
        NatKind::Cone | NatKind::Sym | NatKind::Fw => "timeout",
    };
    assert_eq!(
        word(&out[0], 0),
        expected,
        "{ctx}: unsolicited udp: {out:?}"
    );
    if expected == "refused" {
        assert!(
            took < Duration::from_millis(500),
            "{ctx}: port unreachable took {took:?}"
        );
    }

    // TTL 2 passes the own router and dies at `inet`, whose time-exceeded comes back through
    // the NAT; TTL 3 reaches the server (one hop further).
    let mut echo = Background::start(lab, Host::Server, &["udp-echo", "7002"]);
    let (out, _) = run(lab, h, &["udp-send", &addr(server, 7002), "--ttl", "2"]);
    let want = format!(
        "ttl-exceeded {} from {}",
        addr(server, 7002),
        lab.inet_ip(h)
    );
    assert_eq!(out[0], want, "{ctx}");
    let (out, _) = run(lab, h, &["udp-send", &addr(server, 7002), "--ttl", "3"]);
    assert_eq!(word(&out[0], 0), "reply", "{ctx}: ttl 3: {out:?}");
    assert!(echo.next_line().starts_with("from "));
    // A TCP SYN with TTL 2 gets the same time-exceeded, which does not abort the connect
    // (Linux treats it as a soft error): once the TTL is raised, the retransmitted SYN (initial
    // RTO 1 s) connects. The server sees the public address.
    let mut listen = Background::start(lab, Host::Server, &["tcp-listen", "7003"]);
    let (out, took) = run(
        lab,
        h,
        &[
            "tcp-connect",
            &addr(server, 7003),
            "--ttl",
            "2",
            "--raise-ttl-after-ms",
            "300",
            "--timeout-ms",
            "1900",
        ],
    );
    assert_eq!(word(&out[0], 0), "connected", "{ctx}: low-ttl syn: {out:?}");
    assert!(took >= Duration::from_millis(900), "{ctx}: took {took:?}");
    let accepted = listen.next_line();
    assert_eq!(*sock(word(&accepted, 1)).ip(), public, "{ctx}: {accepted}");
}

fn check_pair(a: NatKind, b: NatKind) {
    if !require_lab() {
        return;
    }
    let lab = Lab::new(a, b).expect("build lab");
    check_side(&lab, Host::A);
    check_side(&lab, Host::B);
}

#[test]
fn lab_none_and_full() {
    check_pair(NatKind::None, NatKind::Full);
}

#[test]
fn lab_cone_and_cone_rst() {
    check_pair(NatKind::Cone, NatKind::ConeRst);
}

#[test]
fn lab_sym_and_fw() {
    check_pair(NatKind::Sym, NatKind::Fw);
}

/// From one local port of A, the source ports the server and B observe (UDP, then TCP).
fn observed_mappings(lab: &Lab) -> [SocketAddrV4; 4] {
    let srv = addr(lab.server_ip(), 7100);
    let peer = addr(lab.public_ip(Host::B), 7100);
    let _e1 = Background::start(lab, Host::Server, &["udp-echo", "7100"]);
    let _e2 = Background::start(lab, Host::B, &["udp-echo", "7100"]);
    let (out, _) = run(
        lab,
        Host::A,
        &["udp-send", &srv, &peer, "--from-port", "40000"],
    );
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out.iter().all(|l| word(l, 0) == "reply"), "{out:?}");
    let udp = [sock(word(&out[0], 2)), sock(word(&out[1], 2))];

    let mut tcp = Vec::new();
    for dest in [Host::Server, Host::B] {
        let mut listen = Background::start(lab, dest, &["tcp-listen", "7101"]);
        let target = addr(lab.public_ip(dest), 7101);
        let (out, _) = run(
            lab,
            Host::A,
            &["tcp-connect", &target, "--from-port", "40001"],
        );
        assert_eq!(word(&out[0], 0), "connected", "{out:?}");
        tcp.push(sock(word(&listen.next_line(), 1)));
    }
    [udp[0], udp[1], tcp[0], tcp[1]]
}

#[test]
fn cone_and_full_mappings_are_endpoint_independent() {
    if !require_lab() {
        return;
    }
    for kind in [NatKind::Cone, NatKind::Full] {
        let lab = Lab::new(kind, NatKind::None).expect("build lab");
        let [u1, u2, t1, t2] = observed_mappings(&lab);
        let public = lab.public_ip(Host::A);
        assert_eq!(u1, SocketAddrV4::new(public, 40000), "{kind}");
        assert_eq!(u2, u1, "{kind}: udp mapping depends on the destination");
        assert_eq!(t1, SocketAddrV4::new(public, 40001), "{kind}");
        assert_eq!(t2, t1, "{kind}: tcp mapping depends on the destination");
    }
}

#[test]
fn sym_mapping_is_endpoint_dependent() {
    if !require_lab() {
        return;
    }
    let lab = Lab::new(NatKind::Sym, NatKind::None).expect("build lab");
    let [u1, u2, t1, t2] = observed_mappings(&lab);
    let public = lab.public_ip(Host::A);
    for seen in [u1, u2, t1, t2] {
        assert_eq!(*seen.ip(), public);
    }
    // Random ports: equal by chance with probability ~1/64000 per pair.
    assert_ne!(u1.port(), u2.port(), "udp mapping is endpoint-independent");
    assert_ne!(t1.port(), t2.port(), "tcp mapping is endpoint-independent");
    assert!(
        u1.port() != 40000 || u2.port() != 40000,
        "udp port preserved"
    );
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn names(lab: &Lab) -> Vec<String> {
    lab.namespaces().map(str::to_owned).collect()
}

fn assert_gone(names: &[String]) {
    let list = netns_list();
    for n in names {
        assert!(
            !list.lines().any(|l| word(l, 0) == n),
            "{n} still exists:\n{list}"
        );
    }
}

#[test]
fn labs_clean_up_their_namespaces() {
    if !require_lab() {
        return;
    }
    // Normal drop.
    let lab = Lab::new(NatKind::None, NatKind::Cone).expect("build lab");
    let first = names(&lab);
    assert_eq!(first.len(), 6);
    let list = netns_list();
    assert!(first.iter().all(|n| list.contains(n.as_str())), "{list}");
    // A process still running inside the lab does not keep it alive.
    let _listener = Background::start(
        &lab,
        Host::A,
        &["tcp-listen", "7200", "--timeout-ms", "60000"],
    );
    drop(lab);
    assert_gone(&first);

    // Drop while unwinding from a panic.
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let lab = Lab::new(NatKind::Sym, NatKind::Full).expect("build lab");
        tx.send(names(&lab)).expect("send names");
        panic!("deliberate panic with a live lab");
    })
    .join();
    assert!(result.is_err());
    assert_gone(&rx.recv().expect("names"));

    // Stale namespaces of a dead process are removed by the next Lab::new. (pid_max is at
    // most 2^22, so this pid never exists.)
    let stale = "ntl-4194399-0-srv".to_owned();
    let st = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("ip");
    assert!(st.success());
    let lab = Lab::new(NatKind::None, NatKind::None).expect("build lab");
    assert_gone(&[stale]);
    drop(lab);
}
