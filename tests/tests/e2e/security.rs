//! What an observer on the wire sees: no plaintext on any strategy (with a plaintext control
//! that proves the capture works).

use std::process::{Command, Stdio};
use std::time::Duration;

use nettool_tests::{require_lab, Host, NatKind};

use crate::nat_punch::RunningLab;
use crate::support::{finish_peer, nettool_bin, spawn_peer, Proc, TempDir};

fn tcpdump_available() -> bool {
    Command::new("tcpdump")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn captured_bytes_hold_no_plaintext_on_any_strategy() {
    if !require_lab() {
        return;
    }
    if !tcpdump_available() {
        let why = "tcpdump is not installed";
        if std::env::var_os("CI").is_some() || std::env::var_os("NETTOOL_REQUIRE_LAB").is_some() {
            panic!("{why} (CI must install it: see .ci/run)");
        }
        eprintln!("skipping: {why}");
        return;
    }
    let lab = RunningLab::new(NatKind::Cone, NatKind::Full);
    let dir = TempDir::new("wire");
    let pcap = dir.path("wan.pcap");
    let router = lab.lab.router_netns(Host::A).expect("A has a router");
    let mut capture = Command::new("ip");
    capture
        .args(["netns", "exec", router, "tcpdump", "-i", "wan", "-n", "-U"])
        .args([
            "--immediate-mode",
            "-B",
            "8192",
            "-Z",
            "root",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path("tcpdump.err")).unwrap());
    let mut capture = Proc::spawn(capture);
    let log = || std::fs::read_to_string(dir.path("tcpdump.err")).unwrap_or_default();
    let started = std::time::Instant::now();
    while !log().contains("listening on") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "tcpdump did not start: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let marker: &[u8] = b"TOP-SECRET-PLAINTEXT-";
    let data = marker.repeat(2000);
    for strategy in ["tcp-punch", "udp-quic", "tcp-direct", "relay"] {
        let (ra, rb) = lab.connect_pair(
            &format!("wire-{strategy}"),
            &["--strategy", strategy],
            &data,
            &data,
        );
        assert_eq!(ra.strategy(), Some(strategy), "{}", ra.stderr);
        assert_eq!(rb.stdout, data, "{strategy}: data arrived");
    }

    // Control: the original demo's protocol is plaintext, so its bytes must show up.
    let control: &[u8] = b"PLAINTEXT-CONTROL-LEGACY-";
    let mut legacy = lab.lab.command(Host::Server, nettool_bin());
    legacy
        .args(["rendezvous", "--legacy", "--listen", "0.0.0.0:8879"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut legacy = Proc::spawn(legacy);
    legacy.stderr_line_containing("listening");
    let server = format!("{}:8879", lab.lab.server_ip());
    let args: Vec<String> = ["--legacy", "--server", &server, "--timeout", "20s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (a, _) = spawn_peer(
        lab.lab.command(Host::A, nettool_bin()),
        &dir,
        "la",
        control,
        &args,
    );
    std::thread::sleep(Duration::from_millis(150));
    let (b, _) = spawn_peer(
        lab.lab.command(Host::B, nettool_bin()),
        &dir,
        "lb",
        b"",
        &args,
    );
    let la = finish_peer(a, &dir, "la", Duration::from_secs(30));
    let lb = finish_peer(b, &dir, "lb", Duration::from_secs(30));
    assert_eq!(
        lb.stdout, control,
        "legacy link: {} / {}",
        la.stderr, lb.stderr
    );

    // Stop the capture cleanly (SIGINT), so everything it saw is in the file.
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &capture.child.id().to_string()])
        .status();
    let _ = capture.wait_timeout(Duration::from_secs(5));
    drop(capture);
    let wire = std::fs::read(&pcap).expect("capture file");
    let contains = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(control),
        "the capture works: the plaintext control is on the wire ({} bytes captured; tcpdump: {})",
        wire.len(),
        log()
    );
    assert!(
        !contains(marker),
        "plaintext of an encrypted link was seen on the wire"
    );
    eprintln!(
        "captured {} bytes on A's WAN: no plaintext from the four strategies",
        wire.len()
    );
}
