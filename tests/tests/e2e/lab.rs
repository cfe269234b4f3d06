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

// Link conditions: the delay line at `inet` (LabBuilder::delay, jitter, loss).

/// What `ping` reported: packets sent and answered, each reply's round trip (ms), the average.
#[derive(Debug)]
struct PingStats {
    transmitted: u32,
    received: u32,
    rtts: Vec<f64>,
    avg_ms: f64,
}

/// Runs `ping -n -c count -i interval` from `h` to `to` and parses what it printed.
fn ping(lab: &Lab, h: Host, to: Ipv4Addr, count: u32, interval: &str) -> PingStats {
    let out = lab
        .command(h, "ping")
        .args(["-n", "-W", "1", "-c", &count.to_string(), "-i", interval])
        .arg(to.to_string())
        .output()
        .expect("run ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| {
            panic!(
                "no ping summary (is `ping` there? package iputils-ping): {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let number = |i| word(summary, i).parse::<u32>().expect("ping count");
    let rtts = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .map(|t| word(t, 0).parse::<f64>().expect("ping time"))
        .collect::<Vec<_>>();
    // The summary's average has more digits than each reply's time (3 significant ones).
    let avg_ms = text
        .lines()
        .find_map(|l| l.strip_prefix("rtt min/avg/max/mdev = "))
        .and_then(|v| v.split('/').nth(1)?.parse::<f64>().ok())
        .unwrap_or_else(|| rtts.iter().sum::<f64>() / rtts.len().max(1) as f64);
    PingStats {
        transmitted: number(0),
        received: number(3),
        rtts,
        avg_ms,
    }
}

fn lab_with(build: impl FnOnce(nettool_tests::LabBuilder) -> nettool_tests::LabBuilder) -> Lab {
    build(Lab::builder(NatKind::None, NatKind::None))
        .build()
        .expect("build lab with link conditions")
}

#[test]
fn delay_line_ping_rtt_is_twice_the_delay() {
    if !require_lab() {
        return;
    }
    for delay_ms in [50, 150] {
        let lab = lab_with(|b| b.delay(Duration::from_millis(delay_ms)));
        let conditions = lab.conditions().expect("conditions set");
        let expected = 2.0 * conditions.delay.as_secs_f64() * 1000.0;
        for (what, to) in [
            ("server", lab.server_ip()),
            ("peer B", lab.public_ip(Host::B)),
        ] {
            let stats = ping(&lab, Host::A, to, 10, "0.2");
            println!(
                "delay {delay_ms} ms: A -> {what}: {}/{} replies, average RTT {:.2} ms \
                 (expected {expected} ms), each {:?}",
                stats.received, stats.transmitted, stats.avg_ms, stats.rtts
            );
            assert_eq!(stats.received, 10, "A -> {what}: {stats:?}");
            assert!(
                (stats.avg_ms - expected).abs() <= expected * 0.05,
                "A -> {what}: average RTT {:.2} ms, expected {expected} ms ± 5 %",
                stats.avg_ms
            );
        }
    }
}

/// CPU time (ticks) used so far by this process's delay line threads.
fn delay_line_cpu_ticks() -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("delay-line") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3; utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields = rest.split_whitespace().collect::<Vec<_>>();
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ticks
}

#[test]
fn delay_line_throughput_at_100ms_rtt() {
    if !require_lab() {
        return;
    }
    assert!(
        Command::new("iperf3")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok(),
        "iperf3 is missing: install the iperf3 package"
    );
    let lab = lab_with(|b| b.delay(Duration::from_millis(50)));
    // Room for the bandwidth-delay product (400 Mbit/s × 100 ms = 5 MB) and more.
    for h in [Host::A, Host::B] {
        let st = lab
            .command(h, "sysctl")
            .args([
                "-qw",
                "net.ipv4.tcp_rmem=4096 131072 33554432",
                "net.ipv4.tcp_wmem=4096 131072 33554432",
            ])
            .status()
            .expect("sysctl");
        assert!(st.success(), "sysctl tcp_rmem/tcp_wmem in {h:?}");
    }
    let server = lab
        .command(Host::B, "iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    let mut server = KillOnDrop(server);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab
            .command(Host::B, "ss")
            .args(["-Hltn", "sport = :5201"])
            .output()
            .expect("ss");
        if !out.stdout.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "iperf3 server never listened");
        assert!(
            server.0.try_wait().expect("wait").is_none(),
            "iperf3 -s exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ticks = delay_line_cpu_ticks();
    let start = Instant::now();
    let out = lab
        .command(Host::A, "iperf3")
        .args(["-c", &lab.public_ip(Host::B).to_string(), "-p", "5201"])
        .args(["-t", "8", "-O", "3", "-J"])
        .output()
        .expect("run iperf3 client");
    let took = start.elapsed();
    let ticks = delay_line_cpu_ticks() - ticks;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output is no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received in iperf3's report: {report}"));
    let retransmits = &report["end"]["sum_sent"]["retransmits"];
    // The sender's smoothed RTT samples (µs): the transfer did cross the delay.
    let sender = &report["end"]["streams"][0]["sender"];
    let rtt_ms = |key: &str| sender[key].as_f64().unwrap_or(0.0) / 1000.0;
    let (min_rtt, mean_rtt) = (rtt_ms("min_rtt"), rtt_ms("mean_rtt"));
    let mbps = bps / 1e6;
    println!(
        "A -> B TCP at 100 ms RTT: {mbps:.0} Mbit/s ({retransmits} retransmits, RTT min \
         {min_rtt:.1} ms, mean {mean_rtt:.1} ms); delay line CPU {:.0} % of a core over {took:.1?}",
        ticks as f64 / hz / took.as_secs_f64() * 100.0
    );
    assert!(
        min_rtt >= 95.0,
        "TCP's RTT {min_rtt:.1} ms: the transfer did not see the 100 ms RTT"
    );
    assert!(mbps >= 400.0, "A -> B TCP at 100 ms RTT: {mbps:.0} Mbit/s");
}

/// A child process killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn delay_line_loss_drops_about_that_fraction() {
    if !require_lab() {
        return;
    }
    let lab = lab_with(|b| b.loss(0.1));
    let stats = ping(&lab, Host::A, lab.server_ip(), 1000, "0.005");
    let lost = 1.0 - f64::from(stats.received) / f64::from(stats.transmitted);
    println!(
        "loss 10 % per crossing: {} of {} round trips lost ({:.1} %, expected 19 %)",
        stats.transmitted - stats.received,
        stats.transmitted,
        lost * 100.0
    );
    assert_eq!(stats.transmitted, 1000, "{stats:?}");
    // Each round trip crosses `inet` twice: 1 - 0.9² = 19 % (σ ≈ 1.2 % over 1000).
    assert!(
        (0.15..=0.40).contains(&lost),
        "{:.1} % of round trips lost, expected about 19 %",
        lost * 100.0
    );

    let lab = lab_with(|b| b.loss(0.0));
    let stats = ping(&lab, Host::A, lab.server_ip(), 200, "0.005");
    println!(
        "loss 0: {} of {} round trips answered",
        stats.received, stats.transmitted
    );
    assert_eq!(
        (stats.transmitted, stats.received),
        (200, 200),
        "no loss asked"
    );
}

/// Runs `f` on a thread inside the host's network namespace.
fn in_netns<T: Send + 'static>(
    lab: &Lab,
    h: Host,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{}", lab.netns(h));
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: a valid namespace descriptor; setns affects this thread only.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

#[test]
fn delay_line_jitter_varies_delay_and_keeps_order() {
    if !require_lab() {
        return;
    }
    let lab = lab_with(|b| {
        b.delay(Duration::from_millis(50))
            .jitter(Duration::from_millis(20))
    });
    let stats = ping(&lab, Host::A, lab.server_ip(), 20, "0.05");
    let min = stats.rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let max = stats.rtts.iter().copied().fold(0.0, f64::max);
    println!("delay 50 ms ± 20 ms: RTTs {min:.1} to {max:.1} ms: {stats:?}");
    assert_eq!(stats.received, 20, "{stats:?}");
    // Each way 30 to 70 ms, plus the line's own fraction of a millisecond.
    assert!(
        min >= 60.0 && max <= 142.0,
        "RTTs {min:.1} to {max:.1} ms, expected within 60 to 140 ms"
    );
    assert!(
        max - min >= 10.0,
        "RTTs hardly vary: {min:.1} to {max:.1} ms"
    );

    // Datagrams 0.5 ms apart, each delayed 30 to 70 ms: they arrive in the order sent.
    const N: u32 = 1000;
    let to = SocketAddrV4::new(lab.public_ip(Host::B), 7300);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = in_netns(&lab, Host::B, move || {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", to.port())).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        ready_tx.send(()).expect("ready");
        let mut seen = Vec::new();
        let mut buf = [0u8; 16];
        while seen.len() < N as usize {
            match sock.recv(&mut buf) {
                Ok(4) => seen.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])),
                Ok(n) => panic!("unexpected datagram of {n} bytes"),
                Err(_) => break,
            }
        }
        seen
    });
    ready_rx.recv().expect("receiver ready");
    in_netns(&lab, Host::A, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..N {
            sock.send_to(&i.to_be_bytes(), to).expect("send");
            std::thread::sleep(Duration::from_micros(500));
        }
    })
    .join()
    .expect("sender");
    let seen = receiver.join().expect("receiver");
    let out_of_order = seen.windows(2).filter(|w| w[1] <= w[0]).count();
    println!(
        "{} of {N} datagrams arrived, {out_of_order} out of order",
        seen.len()
    );
    assert_eq!(seen.len(), N as usize, "datagrams lost");
    assert_eq!(out_of_order, 0, "order not kept");
}
