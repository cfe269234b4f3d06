//! What an observer on the wire sees: no plaintext on any strategy (with a plaintext control
//! that proves the capture works).

use std::process::{Command, Stdio};
use std::time::Duration;

use nettool_tests::{require_lab, Host, NatKind};

use crate::nat_punch::RunningLab;
use crate::support::{capture, finish_peer, nettool_bin, spawn_peer, stop_capture, Proc, TempDir};

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
    let capture = capture(&lab.lab, Host::A, &dir, &pcap);

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

    let wire = stop_capture(capture, &pcap);
    let contains = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(control),
        "the capture works: the plaintext control is on the wire ({} bytes captured)",
        wire.len(),
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
