//! The real `nettool` binary over loopback: rendezvous plus two connecting peers.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{
    finish_peer, nettool_bin, sha256, spawn_peer, test_data, wait_until_waiting, Proc, TempDir,
};

fn rendezvous() -> (Proc, String) {
    crate::support::loopback_rendezvous(&[])
}

fn args(server: &str, session: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--server".to_owned(),
        server.to_owned(),
        "--session".to_owned(),
        session.to_owned(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn two_peers_link_and_exchange_data_intact() {
    let (_server, addr) = rendezvous();
    let dir = TempDir::new("loop");
    let a_in = test_data(3 << 20, 1);
    let b_in = test_data(2 << 20, 2);
    let common = args(
        &addr,
        "loop",
        &["--strategy", "tcp-punch", "--secret", "s3"],
    );
    let (a, _) = spawn_peer(Command::new(nettool_bin()), &dir, "a", &a_in, &common);
    wait_until_waiting(&dir, "a");
    let (b, _) = spawn_peer(Command::new(nettool_bin()), &dir, "b", &b_in, &common);
    let a = finish_peer(a, &dir, "a", Duration::from_secs(30));
    let b = finish_peer(b, &dir, "b", Duration::from_secs(30));
    assert!(a.status.unwrap().success(), "a failed: {}", a.stderr);
    assert!(b.status.unwrap().success(), "b failed: {}", b.stderr);
    assert_eq!(sha256(&b.stdout), sha256(&a_in), "a -> b data differs");
    assert_eq!(sha256(&a.stdout), sha256(&b_in), "b -> a data differs");
    let ra = a.report.as_ref().unwrap();
    let rb = b.report.as_ref().unwrap();
    assert_eq!(ra["session"], "loop");
    assert_eq!(ra["role"], "first");
    assert_eq!(rb["role"], "second");
    assert_eq!(ra["strategy"], "tcp-punch");
    // The report says which data path carries the link (kernel TLS or rustls).
    let path = ra["data_path"].as_str().unwrap_or_default();
    assert!(path.contains("userspace TLS (rustls) is used"), "{path}");
    assert_eq!(ra["local"], rb["remote"]);
    assert_eq!(ra["remote"], rb["local"]);
    let attempt = &ra["attempts"][0];
    assert_eq!(attempt["strategy"], "tcp-punch");
    assert_eq!(attempt["outcome"], "connected");
    assert!(attempt["elapsed_ms"].as_u64().is_some());
    assert!(attempt["error"].is_null());
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused_on_every_strategy() {
    let (_server, addr) = rendezvous();
    let dir = TempDir::new("secret");
    let base = ["--strategy-timeout", "2s", "--timeout", "30s"];
    let mut a_args = args(&addr, "sec", &base);
    a_args.extend(["--secret".into(), "right".into()]);
    let mut b_args = args(&addr, "sec", &base);
    b_args.extend(["--secret".into(), "wrong".into()]);
    let (a, _) = spawn_peer(
        Command::new(nettool_bin()),
        &dir,
        "a",
        b"secret data",
        &a_args,
    );
    wait_until_waiting(&dir, "a");
    let (b, _) = spawn_peer(
        Command::new(nettool_bin()),
        &dir,
        "b",
        b"other data",
        &b_args,
    );
    for (run, name) in [
        (finish_peer(a, &dir, "a", Duration::from_secs(20)), "a"),
        (finish_peer(b, &dir, "b", Duration::from_secs(20)), "b"),
    ] {
        assert_eq!(
            run.status.and_then(|s| s.code()),
            Some(1),
            "{name}: {}",
            run.stderr
        );
        assert!(run.stdout.is_empty(), "{name} received data without a link");
        let report = run.report.as_ref().expect("report written on failure");
        assert!(report["strategy"].is_null());
        let attempts = report["attempts"].as_array().unwrap();
        let names: Vec<&str> = attempts
            .iter()
            .map(|x| x["strategy"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["tcp-punch", "udp-quic", "tcp-direct", "relay"],
            "{name}"
        );
        for attempt in attempts {
            let err = attempt["error"].as_str().unwrap_or("");
            assert!(err.contains("failed authentication"), "{name}: {attempt}");
        }
    }
}

#[test]
fn a_stranger_on_the_listening_port_gets_no_data_and_is_logged() {
    use std::io::{Read, Write};
    let (_server, addr) = rendezvous();
    let dir = TempDir::new("stranger");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The peers hold different secrets, so the attempt runs its full 2 s while a stranger
    // keeps knocking on the second peer's listening port.
    let base = ["--strategy", "tcp-direct", "--strategy-timeout", "2s"];
    let mut a_args = args(&addr, "stranger", &base);
    a_args.extend(["--secret".into(), "one".into()]);
    let mut b_args = args(&addr, "stranger", &base);
    b_args.extend([
        "--secret".into(),
        "two".into(),
        "--local-port".into(),
        port.to_string(),
    ]);
    let marker: &[u8] = b"PLAINTEXT-MARKER-";
    let (a, _) = spawn_peer(
        Command::new(nettool_bin()),
        &dir,
        "a",
        &marker.repeat(100),
        &a_args,
    );
    wait_until_waiting(&dir, "a");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stranger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut heard = Vec::new();
            let mut knocks = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                    knocks += 1;
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        heard.extend_from_slice(&buf[..n]);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (knocks, heard)
        })
    };
    let (b, _) = spawn_peer(
        Command::new(nettool_bin()),
        &dir,
        "b",
        &marker.repeat(100),
        &b_args,
    );
    let a = finish_peer(a, &dir, "a", Duration::from_secs(30));
    let b = finish_peer(b, &dir, "b", Duration::from_secs(30));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (knocks, heard) = stranger.join().unwrap();
    assert!(
        knocks > 0,
        "the stranger never reached the port\nA: {}\nB: {}",
        a.stderr,
        b.stderr
    );
    assert!(
        !heard.windows(marker.len()).any(|w| w == marker),
        "the stranger received user data"
    );
    assert!(a.stdout.is_empty() && b.stdout.is_empty());
    // The stranger fails TLS (it cannot show the pinned certificate) and is logged.
    assert!(
        b.stderr.contains("refused connection: TLS failed"),
        "the refusal is logged: {}",
        b.stderr
    );
}

#[test]
fn unreachable_server_fails_with_a_report() {
    // A port nothing listens on: bind, note the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = TempDir::new("unreach");
    let (p, _) = spawn_peer(
        Command::new(nettool_bin()),
        &dir,
        "a",
        b"",
        &args(&format!("127.0.0.1:{port}"), "x", &["--timeout", "5s"]),
    );
    let run = finish_peer(p, &dir, "a", Duration::from_secs(10));
    assert_eq!(run.status.and_then(|s| s.code()), Some(1));
    let report = run.report.unwrap();
    assert!(report["role"].is_null());
    let err = report["error"].as_str().unwrap();
    assert!(err.contains("cannot reach the rendezvous server"), "{err}");
}

#[test]
fn demo_compares_every_strategy_on_loopback() {
    let out = Command::new(nettool_bin()).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for strategy in ["tcp-punch", "udp-quic", "tcp-direct"] {
        let row = stdout
            .lines()
            .find(|l| l.contains(&format!(" {strategy} ")))
            .unwrap_or_else(|| panic!("no row for {strategy}: {stdout}"));
        assert!(row.contains("connected") && row.contains("MB/s"), "{row}");
    }
    assert!(
        stdout.contains("linked with: tcp-punch, udp-quic, tcp-direct"),
        "{stdout}"
    );
    // A healthy run warns about nothing: a candidate connection that lost a race is not a
    // problem (it was a WARN line above the table).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("WARN") && !stderr.contains("ERROR"),
        "the demo printed a warning or an error:\n{stderr}"
    );
}

#[test]
fn compare_appends_history_and_summarises_by_label() {
    let (_server, addr) = rendezvous();
    let dir = TempDir::new("compare");
    let history = dir.path("history.jsonl");
    for round in 0..2 {
        let peer = |name: &str| {
            let mut cmd = Command::new(nettool_bin());
            cmd.args(["compare", "--server", &addr, "--session"])
                .arg(format!("cmp{round}"))
                .args([
                    "--secret", "c", "--json", "--size", "1MiB", "--label", "loop",
                ])
                .args(["--strategy", "tcp-punch", "--strategy", "tcp-direct"])
                .arg("--history")
                .arg(&history)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(dir.path(&format!("{name}{round}.json"))).unwrap())
                .stderr(std::fs::File::create(dir.path(&format!("{name}{round}.err"))).unwrap());
            Proc::spawn(cmd)
        };
        let mut a = peer("a");
        wait_until_waiting(&dir, &format!("a{round}"));
        let mut b = peer("b");
        assert!(a.wait_timeout(Duration::from_secs(60)).unwrap().success());
        assert!(b.wait_timeout(Duration::from_secs(60)).unwrap().success());
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path(&format!("a{round}.json"))).unwrap())
                .unwrap();
        assert_eq!(run["label"], "loop");
        let rows = run["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{run}");
        for row in rows {
            assert_eq!(row["outcome"], "connected", "{row}");
            assert!(row["rtt_ms"].as_f64().unwrap() > 0.0);
            assert!(row["first_to_second_mbps"].as_f64().unwrap() > 0.0);
            assert!(row["second_to_first_mbps"].as_f64().unwrap() > 0.0);
        }
    }
    // Both peers appended each run: 4 lines.
    let lines = std::fs::read_to_string(&history).unwrap();
    assert_eq!(lines.lines().count(), 4, "{lines}");
    let out = Command::new(nettool_bin())
        .args(["compare", "--summary", "--history"])
        .arg(&history)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for strategy in ["tcp-punch", "tcp-direct"] {
        let row = text.lines().find(|l| l.contains(strategy)).expect(strategy);
        assert!(
            row.contains("loop") && row.contains("4/4") && row.contains("100%"),
            "{row}"
        );
    }
}

#[test]
fn default_order_tries_tcp_punch_first() {
    let (_server, addr) = rendezvous();
    let dir = TempDir::new("default");
    let common = args(&addr, "default", &["--secret", "d"]);
    let (a, _) = spawn_peer(Command::new(nettool_bin()), &dir, "a", b"one", &common);
    wait_until_waiting(&dir, "a");
    let (b, _) = spawn_peer(Command::new(nettool_bin()), &dir, "b", b"two", &common);
    let a = finish_peer(a, &dir, "a", Duration::from_secs(30));
    let b = finish_peer(b, &dir, "b", Duration::from_secs(30));
    assert_eq!(a.stdout, b"two", "{}", a.stderr);
    assert_eq!(b.stdout, b"one", "{}", b.stderr);
    let report = a.report.unwrap();
    assert_eq!(report["strategy"], "tcp-punch");
    assert_eq!(report["attempts"].as_array().unwrap().len(), 1);
}

#[test]
fn a_config_profile_sets_the_order_and_timeouts_connect_uses() {
    let (_server, addr) = rendezvous();
    let dir = TempDir::new("profile");
    let file = dir.path("nettool.toml");
    std::fs::write(
        &file,
        format!(
            "[default]\nserver = \"{addr}\"\nsession = \"prof\"\n\
             [profile.lab]\nstrategies = [\"tcp-direct\", \"tcp-punch\"]\n\
             [profile.lab.strategy.tcp-direct]\ntimeout = \"1500ms\"\n\
             [profile.lab.strategy.tcp-punch]\ntimeout = \"1500ms\"\n"
        ),
    )
    .unwrap();
    // Different secrets: every attempt runs into its (profile-configured) timeout.
    let run = |name: &str, secret: &str| {
        let mut cmd = Command::new(nettool_bin());
        cmd.args(["--config", file.to_str().unwrap(), "--profile", "lab"]);
        spawn_peer(cmd, &dir, name, b"", &["--secret".into(), secret.into()]).0
    };
    let a = run("a", "one");
    wait_until_waiting(&dir, "a");
    let b = run("b", "two");
    let a = finish_peer(a, &dir, "a", Duration::from_secs(30));
    let _ = finish_peer(b, &dir, "b", Duration::from_secs(30));
    let report = a.report.expect("report");
    let attempts = report["attempts"].as_array().unwrap();
    let names: Vec<&str> = attempts
        .iter()
        .map(|x| x["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tcp-direct", "tcp-punch"], "{}", a.stderr);
    for attempt in attempts {
        let ms = attempt["elapsed_ms"].as_u64().unwrap();
        assert!((1300..3000).contains(&ms), "{attempt}");
    }
}

/// Relay-first against a server that does not relay: the relay attempt is refused and the
/// direct connect that ran beside it is the connect (as without relay-first), data intact,
/// exit 0, the report naming both.
#[test]
fn relay_first_without_a_relaying_server_links_directly() {
    let (_server, addr) = crate::support::loopback_rendezvous(&["--no-relay"]);
    let dir = TempDir::new("rf-norelay");
    let common = args(&addr, "rf-norelay", &["--secret", "n"]);
    let relay_first = || {
        let mut c = Command::new(nettool_bin());
        c.env("NETTOOL_RELAY_FIRST", "true");
        c
    };
    let (a, _) = spawn_peer(relay_first(), &dir, "a", b"one", &common);
    wait_until_waiting(&dir, "a");
    let (b, _) = spawn_peer(relay_first(), &dir, "b", b"two", &common);
    let a = finish_peer(a, &dir, "a", Duration::from_secs(30));
    let b = finish_peer(b, &dir, "b", Duration::from_secs(30));
    assert!(a.status.is_some_and(|s| s.success()), "{}", a.stderr);
    assert!(b.status.is_some_and(|s| s.success()), "{}", b.stderr);
    assert_eq!(a.stdout, b"two", "{}", a.stderr);
    assert_eq!(b.stdout, b"one", "{}", b.stderr);
    let report = a.report.unwrap();
    assert_eq!(report["strategy"], "tcp-punch", "{report}");
    let attempts = report["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["strategy"], "relay", "{report}");
    assert_ne!(attempts[0]["outcome"], "connected", "{report}");
    assert!(
        attempts
            .iter()
            .any(|x| x["strategy"] == "tcp-punch" && x["outcome"] == "connected"),
        "{report}"
    );
    assert_eq!(report["paths"][0]["strategy"], "tcp-punch", "{report}");
}
