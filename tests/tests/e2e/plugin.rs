//! The example plugin (`examples/port-forwarded`): its binary, `nettool-pf`, selects the
//! `port-forwarded` strategy by name from a TOML profile, through the NAT lab.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nettool_tests::{require_lab, Host, NatKind};

use crate::nat_punch::RunningLab;
use crate::support::{finish_peer, nettool_bin, spawn_peer, TempDir};

/// `nettool-pf`, next to the `nettool` binary (`cargo test --workspace` builds both).
fn plugin_bin() -> PathBuf {
    let bin = nettool_bin().with_file_name("nettool-pf");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (the example plugin's tests \
         build it)",
        bin.display()
    );
    bin
}

const PORT: u16 = 40000;

/// Forwards `PORT` on `h`'s router to the host, as a user would on a home router.
fn forward_port(lab: &RunningLab, h: Host) {
    let router = lab.lab.router_netns(h).expect("a NAT kind has a router");
    let host = lab.lab.host_ip(h);
    for rule in [
        // Let forwarded (DNATed) connections through the drop-new-inbound rule.
        "insert rule inet ntl forward ct status dnat accept".to_owned(),
        format!("add rule inet ntl prerouting iifname \"wan\" tcp dport {PORT} dnat ip to {host}:{PORT}"),
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", router, "nft"])
            .args(rule.split(' '))
            .output()
            .expect("run nft");
        assert!(
            out.status.success(),
            "nft {rule}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn run_pair(lab: &RunningLab, session: &str) -> (crate::support::PeerRun, crate::support::PeerRun) {
    let dir = TempDir::new(session);
    let profile = dir.path("nettool.toml");
    std::fs::write(
        &profile,
        format!(
            "[default]\nserver = \"{}:8877\"\n\
             [profile.forwarded]\nstrategies = [\"port-forwarded\"]\n\
             [profile.forwarded.strategy.port-forwarded]\nport = {PORT}\ntimeout = \"4s\"\n",
            lab.lab.server_ip()
        ),
    )
    .unwrap();
    let args: Vec<String> = [
        "--config",
        profile.to_str().unwrap(),
        "--profile",
        "forwarded",
        "--session",
        session,
        "--secret",
        "lab",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (a, _) = spawn_peer(
        lab.lab.command(Host::A, plugin_bin()),
        &dir,
        "a",
        b"from a",
        &args,
    );
    let (b, _) = spawn_peer(
        lab.lab.command(Host::B, plugin_bin()),
        &dir,
        "b",
        b"from b",
        &args,
    );
    let limit = Duration::from_secs(30);
    (
        finish_peer(a, &dir, "a", limit),
        finish_peer(b, &dir, "b", limit),
    )
}

#[test]
fn lab_port_forwarded_plugin_links_through_a_forward_and_fails_cleanly_without_one() {
    if !require_lab() {
        return;
    }
    // Both behind silent routers: nothing links unless a forward answers.
    let lab = RunningLab::new(NatKind::Cone, NatKind::Cone);
    let (a, b) = run_pair(&lab, "pf-none");
    for run in [&a, &b] {
        assert_eq!(run.status.and_then(|s| s.code()), Some(1), "{}", run.stderr);
        let attempt = run.first_attempt().expect("the report has the attempt");
        assert_eq!(attempt["strategy"], "port-forwarded");
        let error = attempt["error"].as_str().unwrap_or_default();
        assert!(error.contains("forwarded port 40000 answered"), "{error}");
    }

    forward_port(&lab, Host::A);
    let (a, b) = run_pair(&lab, "pf-fwd");
    assert_eq!(a.strategy(), Some("port-forwarded"), "{}", a.stderr);
    assert_eq!(b.strategy(), Some("port-forwarded"), "{}", b.stderr);
    assert_eq!(a.stdout, b"from b");
    assert_eq!(b.stdout, b"from a");
}
