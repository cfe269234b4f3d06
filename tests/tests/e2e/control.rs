//! The rendezvous server as a service, in the NAT lab: the control channel shows nothing on
//! the wire (tcpdump on A's router), metrics and health over HTTP, and a server with another
//! identity at the same address is refused by peers that knew the first.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nettool_tests::{require_lab, Host, Lab, NatKind};

use crate::nat_punch::RunningLab;
use crate::support::{
    capture, finish_peer, nettool_bin, spawn_peer, stop_capture, wait_until_waiting, Proc, TempDir,
};

/// `curl` from the server's namespace: (HTTP status, body).
fn curl(lab: &Lab, url: &str) -> (String, String) {
    let out = lab
        .command(Host::Server, "curl")
        .args(["-s", "-w", "\n%{http_code}", "--max-time", "5", url])
        .output()
        .expect("curl runs (CI installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (status.to_owned(), body.to_owned())
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs A then B in `session` through `server` with `extra` flags (relay-first off unless
/// `extra` asks for a strategy: the ladder's first attempt exchanges offers with candidates);
/// both must deliver.
fn pair(lab: &Lab, dir: &TempDir, session: &str, server: &str, extra: &[&str]) {
    let mut args: Vec<String> = ["--server", server, "--session", session, "--secret", "lab"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let data = b"control-channel-test-data-".repeat(4000);
    let (a, _) = spawn_peer(
        lab.command(Host::A, nettool_bin()),
        dir,
        &format!("{session}-a"),
        &data,
        &args,
    );
    wait_until_waiting(dir, &format!("{session}-a"));
    let (b, _) = spawn_peer(
        lab.command(Host::B, nettool_bin()),
        dir,
        &format!("{session}-b"),
        b"",
        &args,
    );
    let limit = Duration::from_secs(60);
    let a = finish_peer(a, dir, &format!("{session}-a"), limit);
    let b = finish_peer(b, dir, &format!("{session}-b"), limit);
    assert_eq!(
        b.stdout.len(),
        data.len(),
        "{session}: B got everything ({} / {})",
        a.stderr,
        b.stderr
    );
    assert!(b.stdout == data, "{session}: intact");
    assert_eq!(a.status.and_then(|s| s.code()), Some(0), "{}", a.stderr);
}

/// tcpdump on A's router WAN during two pairings (the ladder: offers with both peers'
/// candidates, observe connections; and the relay) finds neither the distinctive session name, nor the server token,
/// nor either peer's private address (which only offers carry). The same pairing with
/// `--insecure-control` on both sides shows the session name: the capture would see it.
/// Afterwards `/metrics` shows the pairings and the relayed bytes, `/healthz` 200.
#[test]
fn the_control_channel_is_opaque_on_the_wire_and_metrics_count_the_pairing() {
    if !require_lab() {
        return;
    }
    const TOKEN: &str = "SERVER-TOKEN-5f2e9a1c";
    const SESSION: &str = "SESSION-NAME-7d3b91e4";
    const PLAIN_SESSION: &str = "PLAIN-SESSION-0a8c6f25";
    let lab = RunningLab::with_server_args(
        NatKind::Cone,
        NatKind::Cone,
        &["--server-token", TOKEN, "--metrics", "0.0.0.0:9877"],
    );
    let lab = &lab.lab;
    let dir = TempDir::new("control-wire");
    let pcap = dir.path("wan.pcap");
    let tcpdump = capture(lab, Host::A, &dir, &pcap);
    let server = format!("{}:8877", lab.server_ip());
    pair(lab, &dir, SESSION, &server, &["--server-token", TOKEN]);
    let relayed = format!("{SESSION}-relay");
    let relay_args = ["--server-token", TOKEN, "--strategy", "relay"];
    pair(lab, &dir, &relayed, &server, &relay_args);
    let wire = stop_capture(tcpdump, &pcap);

    // The control case: a server that allows plain clients, and peers that use them.
    let mut plain = lab.command(Host::Server, nettool_bin());
    let plain_listen = format!("{}:8879", lab.server_ip());
    plain
        .args([
            "rendezvous",
            "--listen",
            &plain_listen,
            "--insecure-control",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut plain = Proc::spawn(plain);
    plain.stderr_line_containing("listening on");
    let plain_pcap = dir.path("plain.pcap");
    let tcpdump = capture(lab, Host::A, &dir, &plain_pcap);
    pair(
        lab,
        &dir,
        PLAIN_SESSION,
        &plain_listen,
        &["--insecure-control"],
    );
    drop(plain);
    let plain_wire = stop_capture(tcpdump, &plain_pcap);

    let holds = |wire: &[u8], needle: &str| {
        let n = needle.as_bytes();
        wire.windows(n.len()).any(|w| w == n)
    };
    let privates = [Host::A, Host::B].map(|h| format!("\"{}:", lab.host_ip(h)));
    // The capture works: a plain control channel shows what TLS hides.
    assert!(
        holds(&plain_wire, PLAIN_SESSION),
        "the plain session name is on the wire ({} bytes)",
        plain_wire.len()
    );
    for p in &privates {
        assert!(
            holds(&plain_wire, p),
            "plain offers show {p}: {}",
            String::from_utf8_lossy(&plain_wire)
                .split(|c: char| c.is_control())
                .filter(|t| t.contains("offer"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    assert!(
        !holds(&wire, SESSION),
        "the session name was seen on the wire"
    );
    assert!(
        !holds(&wire, TOKEN),
        "the server token was seen on the wire"
    );
    for p in &privates {
        assert!(
            !holds(&wire, p),
            "a private address ({p}, an offer's candidate) was seen on the wire"
        );
    }

    let url = format!("http://{}:9877", lab.server_ip());
    let (status, body) = curl(lab, &format!("{url}/metrics"));
    assert_eq!(status, "200", "{body}");
    let pairings = metric(&body, "nettool_pairings_total").unwrap_or(0.0);
    let relayed = metric(&body, "nettool_relay_bytes_total").unwrap_or(0.0);
    assert!(pairings >= 1.0, "{body}");
    assert!(relayed > 0.0, "{body}");
    assert_eq!(
        metric(&body, "nettool_rejected_total{reason=\"server_token\"}"),
        Some(0.0),
        "{body}"
    );
    let (status, body) = curl(lab, &format!("{url}/healthz"));
    assert_eq!(status, "200", "{body}");
    eprintln!(
        "captured {} bytes on A's WAN: no session name, token or private address; metrics: \
         {pairings} pairings, {relayed} bytes relayed",
        wire.len()
    );
}

/// Starts a server logging to `log`; returns it and the key it printed at start.
fn start_server(lab: &Lab, extra: &[&str], log: &std::path::Path) -> (Proc, String) {
    let mut cmd = lab.command(Host::Server, nettool_bin());
    let listen = format!("{}:8877", lab.server_ip());
    cmd.args(["rendezvous", "--listen", &listen])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    let proc = Proc::spawn(cmd);
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let started = Instant::now();
    while !read().contains("listening on") {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", read());
        std::thread::sleep(Duration::from_millis(20));
    }
    let key = read()
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .expect("the server printed its key")
        .to_owned();
    (proc, key)
}

/// A pairing teaches both peers the server's key (trust on first use). Another server with
/// another identity at the same address is then refused: A exits non-zero, names both keys
/// and how to accept the new one, and the new server saw no join; a peer that pinned the
/// first key with --server-key is refused the same way.
#[test]
fn a_server_with_another_identity_is_refused() {
    if !require_lab() {
        return;
    }
    let lab = Lab::new(NatKind::Cone, NatKind::Cone)
        .unwrap_or_else(|e| panic!("cannot build the lab cone x cone: {e}"));
    let dir = TempDir::new("control-identity");
    let server = format!("{}:8877", lab.server_ip());
    let (first, first_key) = start_server(&lab, &[], &dir.path("first.log"));
    pair(&lab, &dir, "identity-first", &server, &[]);
    drop(first);

    let other = dir.path("other-identity.pem");
    let log = dir.path("second.log");
    let (second, second_key) = start_server(&lab, &["--identity", other.to_str().unwrap()], &log);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_ne!(first_key, second_key);

    for (name, extra) in [
        ("remembered", vec![]),
        ("pinned", vec!["--server-key", first_key.as_str()]),
    ] {
        let mut args: Vec<String> = [
            "--server",
            &server,
            "--session",
            "IDENTITY-SESSION-3e7a",
            "--secret",
            "lab",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (a, _) = spawn_peer(
            lab.command(Host::A, nettool_bin()),
            &dir,
            name,
            b"data that must not leave",
            &args,
        );
        let a = finish_peer(a, &dir, name, Duration::from_secs(20));
        let code = a.status.and_then(|s| s.code());
        assert!(
            code.is_some_and(|c| c != 0),
            "{name}: exit {code:?}: {}",
            a.stderr
        );
        assert!(a.stderr.contains(&first_key), "{name}: {}", a.stderr);
        assert!(a.stderr.contains(&second_key), "{name}: {}", a.stderr);
        assert!(
            a.stderr.contains(&format!("--server-key {second_key}")),
            "{name}: says how to accept the new key: {}",
            a.stderr
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let seen = read_log();
    assert!(
        !seen.contains("IDENTITY-SESSION") && !seen.contains("waiting for the second peer"),
        "the second server saw a join: {seen}"
    );
    drop(second);
}

/// `--relay-rate 8388608` (8 MiB/s, both directions together) holds over the TLS control
/// channel and the token-only relay attach: 32 MiB through the relay take at least 3.5 s
/// (4 s at the rate) and arrive intact; the relayed bytes are counted.
#[test]
fn the_relay_rate_limit_holds() {
    if !require_lab() {
        return;
    }
    let lab = RunningLab::with_server_args(
        NatKind::Cone,
        NatKind::Cone,
        &["--relay-rate", "8388608", "--metrics", "0.0.0.0:9877"],
    );
    let lab = &lab.lab;
    let dir = TempDir::new("control-rate");
    let server = format!("{}:8877", lab.server_ip());
    let args: Vec<String> = [
        "--server",
        &server,
        "--session",
        "rate",
        "--secret",
        "lab",
        "--strategy",
        "relay",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (a, _) = spawn_peer(lab.command(Host::A, nettool_bin()), &dir, "a", &data, &args);
    wait_until_waiting(&dir, "a");
    let started = Instant::now();
    let (b, _) = spawn_peer(lab.command(Host::B, nettool_bin()), &dir, "b", b"", &args);
    let b = finish_peer(b, &dir, "b", Duration::from_secs(60));
    let took = started.elapsed();
    let a = finish_peer(a, &dir, "a", Duration::from_secs(30));
    assert_eq!(b.strategy(), Some("relay"), "{}", b.stderr);
    assert!(
        b.stdout == data,
        "intact: {} of {} bytes; {}",
        b.stdout.len(),
        data.len(),
        b.stderr
    );
    assert_eq!(a.status.and_then(|s| s.code()), Some(0), "{}", a.stderr);
    assert!(
        took >= Duration::from_millis(3500),
        "32 MiB took only {took:?}"
    );
    let (_, body) = curl(lab, &format!("http://{}:9877/metrics", lab.server_ip()));
    let relayed = metric(&body, "nettool_relay_bytes_total").unwrap_or(0.0);
    assert!(relayed >= data.len() as f64, "{body}");
    eprintln!("32 MiB over the relay at 8 MiB/s: {took:.2?}, {relayed} bytes relayed");
}
