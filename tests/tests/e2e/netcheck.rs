//! NAT behaviour discovery in the lab, checked against the reference implementation.
//!
//! For every lab kind, the server host runs `nettool rendezvous --other-address` and coturn's
//! `turnserver` (two listening IPs, an alternate port); peer A runs coturn's
//! `turnutils_natdiscovery -m -f` against both, and `nettool netcheck --json` against both.
//! All four must agree on the UDP mapping and filtering, and match design.md §8; netcheck
//! against nettool also reports the TCP mapping, against coturn "unknown" (exit status 0).
//! The six labs run in parallel.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nettool_tests::{require_lab, Host, Lab, NatKind};

use crate::support::{loopback_rendezvous, nettool_bin, Proc};

const NETTOOL_PORT: u16 = 8877;
const NETTOOL_OTHER_PORT: u16 = 8878;
const COTURN_PORT: u16 = 3478;
const COTURN_OTHER_PORT: u16 = 3479;

/// What every tool must find behind a router of `kind` (design.md §8), in netcheck's names:
/// UDP mapping, UDP filtering, TCP mapping.
fn expected(kind: NatKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        NatKind::None => ("no-nat", "endpoint-independent", "no-nat"),
        NatKind::Fw => ("no-nat", "address-and-port-dependent", "no-nat"),
        NatKind::Full => (
            "endpoint-independent",
            "endpoint-independent",
            "endpoint-independent",
        ),
        NatKind::Cone | NatKind::ConeRst => (
            "endpoint-independent",
            "address-and-port-dependent",
            "endpoint-independent",
        ),
        NatKind::Sym => (
            "address-and-port-dependent",
            "address-and-port-dependent",
            "address-and-port-dependent",
        ),
    }
}

/// Whether coturn's tools are installed; in CI (NETTOOL_REQUIRE_LAB or CI set) their absence
/// fails the test (`.ci/run` installs the `coturn` package).
fn require_coturn() -> bool {
    let have = ["turnserver", "turnutils_natdiscovery"].iter().all(|p| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !have {
        let why = "coturn's turnserver/turnutils_natdiscovery not installed (Debian `coturn`)";
        if std::env::var_os("CI").is_some() || std::env::var_os("NETTOOL_REQUIRE_LAB").is_some() {
            panic!("{why}");
        }
        eprintln!("skipping: {why}");
    }
    have
}

/// Mapping and filtering from `turnutils_natdiscovery -m -f` output, in netcheck's names.
/// The mapping part says "No NAT! (Endpoint Independent Mapping)" when the mapped address is
/// the local one, else "NAT with ... Mapping!"; the filtering part "NAT with ... Filtering!".
fn parse_natdiscovery(out: &str) -> (Option<&'static str>, Option<&'static str>) {
    let (mapping, filtering) = out
        .split_once("Filtering Behavior Discovery")
        .unwrap_or((out, ""));
    let name = |line: &str| {
        if line.contains("Address and Port Dependent") {
            "address-and-port-dependent"
        } else if line.contains("Address Dependent") {
            "address-dependent"
        } else if line.contains("Endpoint Independent") {
            "endpoint-independent"
        } else {
            "unknown"
        }
    };
    let verdict = |section: &str, what: &str| {
        section
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("NAT with") && l.ends_with(what))
            .map(name)
    };
    let m = if mapping.lines().any(|l| l.trim().starts_with("No NAT!")) {
        Some("no-nat")
    } else {
        verdict(mapping, "Mapping!")
    };
    (m, verdict(filtering, "Filtering!"))
}

/// One tool's findings: UDP mapping, UDP filtering, TCP mapping (None when it has none).
type Found = (String, String, Option<String>);

fn natdiscovery(lab: &Lab, port: u16) -> Result<(Found, String), String> {
    // turnserver needs a moment to open its listeners; retry until it gives a verdict.
    let start = Instant::now();
    loop {
        let out = lab
            .command(Host::A, "timeout")
            .args(["20", "turnutils_natdiscovery", "-m", "-f", "-p"])
            .arg(port.to_string())
            // Without the local address it compares the mapping with 0.0.0.0 and never says
            // "no NAT".
            .arg("-L")
            .arg(lab.host_ip(Host::A).to_string())
            .arg(lab.server_ip().to_string())
            .output()
            .map_err(|e| format!("cannot run turnutils_natdiscovery: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if let (Some(m), Some(f)) = parse_natdiscovery(&text) {
            return Ok(((m.into(), f.into(), None), text));
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "no verdict from turnutils_natdiscovery -p {port}:\n{text}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn netcheck(lab: &Lab, port: u16) -> Result<(Found, serde_json::Value), String> {
    let server = format!("{}:{port}", lab.server_ip());
    let out = lab
        .command(Host::A, nettool_bin())
        // 2 s per test (1 s by default): a lab busy with other tests must not turn a late
        // answer into "filtered".
        .args(["netcheck", "--json", "--timeout", "2s", "--server", &server])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nettool netcheck: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nettool netcheck --server {server} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("netcheck --json printed no JSON ({e}): {out:?}"))?;
    let v4 = &json["ipv4"];
    let s = |k: &str| v4[k].as_str().unwrap_or("(missing)").to_owned();
    Ok((
        (s("udp_mapping"), s("udp_filtering"), Some(s("tcp_mapping"))),
        json,
    ))
}

/// Runs all four measurements behind a router of `kind`; returns the table row or what went
/// wrong.
fn check_kind(kind: NatKind) -> Result<String, String> {
    let lab = Lab::new(kind, NatKind::None).map_err(|e| format!("lab: {e}"))?;
    let (ip1, ip2) = (lab.server_ip(), lab.server_other_ip());
    let mut rv = lab.command(Host::Server, nettool_bin());
    rv.args(["rendezvous", "--listen"])
        .arg(format!("{ip1}:{NETTOOL_PORT}"))
        .arg("--other-address")
        .arg(format!("{ip2}:{NETTOOL_OTHER_PORT}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut rv = Proc::spawn(rv);
    rv.stderr_line_containing("listening on");
    let mut turn = lab.command(Host::Server, "turnserver");
    turn.args(["-n", "--no-auth", "--no-tls", "--no-dtls", "--no-cli"])
        .args(["--listening-ip", &ip1.to_string()])
        .args(["--listening-ip", &ip2.to_string()])
        .args(["--listening-port", &COTURN_PORT.to_string()])
        .args(["--alt-listening-port", &COTURN_OTHER_PORT.to_string()])
        .args(["--log-file", "stdout", "--simple-log"])
        .args(["--pidfile", "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut turn = Proc::spawn(turn);
    // Wait until coturn has made its servers (its listeners are open then), and drain its log
    // afterwards so it never blocks on a full pipe.
    let log = turn.child.stdout.take().expect("stdout piped");
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            if line.contains("Total General servers") {
                let _ = ready_tx.send(());
            }
        }
    });
    let _ = ready.recv_timeout(Duration::from_secs(10));

    let timed = |f: &dyn Fn() -> Result<(Found, String), String>| {
        let start = Instant::now();
        f().map(|(found, text)| (found, text, start.elapsed().as_secs_f64()))
    };
    // Against coturn and against nettool at the same time (separate sockets, so separate NAT
    // mappings); each server's two clients one after the other.
    let both = |port: u16| {
        let nd = timed(&|| natdiscovery(&lab, port))?;
        let nc = timed(&|| netcheck(&lab, port).map(|(f, j)| (f, j.to_string())))?;
        Ok::<_, String>((nd, nc))
    };
    let (vs_coturn, vs_nettool) = std::thread::scope(|s| {
        let c = s.spawn(|| both(COTURN_PORT));
        let n = both(NETTOOL_PORT);
        (c.join().unwrap_or_else(|_| Err("panicked".into())), n)
    });
    let ((coturn_vs_coturn, coturn_text, t_cc), (netcheck_vs_coturn, json_coturn, t_nc)) =
        vs_coturn?;
    let ((coturn_vs_nettool, nettool_text, t_cn), (netcheck_vs_nettool, json, t_nn)) = vs_nettool?;
    let json: serde_json::Value = serde_json::from_str(&json).expect("json again");
    drop(turn);
    drop(rv);

    let (m, f, t) = expected(kind);
    let want_udp = (m.to_owned(), f.to_owned());
    let mut problems = Vec::new();
    let udp = |x: &Found| (x.0.clone(), x.1.clone());
    if udp(&coturn_vs_coturn) != want_udp {
        problems.push(format!(
            "natdiscovery vs turnserver: {coturn_vs_coturn:?}\n{coturn_text}"
        ));
    }
    if udp(&coturn_vs_nettool) != udp(&coturn_vs_coturn) {
        problems.push(format!(
            "natdiscovery vs nettool: {coturn_vs_nettool:?}, vs turnserver {coturn_vs_coturn:?}\n\
             {nettool_text}"
        ));
    }
    if netcheck_vs_nettool != (m.to_owned(), f.to_owned(), Some(t.to_owned())) {
        problems.push(format!(
            "netcheck vs nettool: {netcheck_vs_nettool:?}\n{json:#}"
        ));
    }
    if netcheck_vs_coturn != (m.to_owned(), f.to_owned(), Some("unknown".to_owned())) {
        problems.push(format!(
            "netcheck vs turnserver: {netcheck_vs_coturn:?}\n{json_coturn}"
        ));
    }
    // The public address is the router's (or the host's own for routed kinds).
    let public = json["ipv4"]["public_addr"].as_str().unwrap_or_default();
    if public != lab.public_ip(Host::A).to_string() {
        problems.push(format!(
            "netcheck public_addr {public}, want {}",
            lab.public_ip(Host::A)
        ));
    }
    if !problems.is_empty() {
        return Err(format!("{}: {}", kind.name(), problems.join("\n")));
    }
    let v4 = &json["ipv4"];
    Ok(format!(
        "| {} | {} / {} | {} / {} | {} | {} | {} | {} | {t_cc:.1} / {t_cn:.1} / {t_nn:.1} / {t_nc:.1} |",
        kind.name(),
        coturn_vs_coturn.0,
        coturn_vs_coturn.1,
        netcheck_vs_nettool.0,
        netcheck_vs_nettool.1,
        t,
        v4["port_preservation"],
        v4["hairpinning"],
        json["server_rtt_ms"]
            .as_f64()
            .map_or("-".into(), |r| format!("{r:.2}")),
    ))
}

#[test]
fn netcheck_and_rfc5780_agree_with_coturn_in_every_lab_kind() {
    if !require_lab() || !require_coturn() {
        return;
    }
    let start = Instant::now();
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = NatKind::ALL
            .iter()
            .map(|&k| s.spawn(move || check_kind(k)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    eprintln!(
        "| kind | coturn vs turnserver (mapping / filtering) | netcheck vs nettool | tcp | \
         port preserved | hairpin | rtt ms | seconds (natdiscovery vs coturn / vs nettool, \
         netcheck vs nettool / vs coturn) |"
    );
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(row) => eprintln!("{row}"),
            Err(e) => failures.push(e),
        }
    }
    eprintln!("all six kinds in {:.1}s", start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn natdiscovery_output_parses() {
    let out = "-= Mapping Behavior Discovery =-\n\
               NAT with Endpoint Independent Mapping!\n\
               -= Filtering Behavior Discovery =-\n\
               NAT with Address and Port Dependent Filtering!\n";
    assert_eq!(
        parse_natdiscovery(out),
        (
            Some("endpoint-independent"),
            Some("address-and-port-dependent")
        )
    );
    let out = "-= Mapping Behavior Discovery =-\n\
               No NAT! (Endpoint Independent Mapping)\n\
               NAT with Endpoint Independent Mapping!\n\
               -= Filtering Behavior Discovery =-\n\
               No NAT! (Endpoint Independent Mapping)\n\
               NAT with Endpoint Independent Filtering!\n";
    assert_eq!(
        parse_natdiscovery(out),
        (Some("no-nat"), Some("endpoint-independent"))
    );
    assert_eq!(parse_natdiscovery("STUN receive timeout.."), (None, None));
}

/// The CLI on loopback: the JSON has the documented shape and order, and a server that does
/// not answer is a clear error with exit status 1.
#[test]
fn netcheck_json_shape_and_errors_on_loopback() {
    let (_rv, addr) = loopback_rendezvous(&["--other-address", "127.0.0.2:0"]);
    let out = Command::new(nettool_bin())
        .args(["netcheck", "--json", "--server", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let keys = [
        "\"ipv4\"",
        "\"ipv6\"",
        "\"port_mapping\"",
        "\"server_rtt_ms\"",
    ];
    let at: Vec<usize> = keys.iter().map(|k| text.find(k).expect(k)).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "order of {keys:?} in {text}"
    );
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let v4 = &json["ipv4"];
    for (k, want) in [
        ("udp_mapping", "no-nat"),
        ("udp_filtering", "endpoint-independent"),
        ("tcp_mapping", "no-nat"),
        ("public_addr", "127.0.0.1"),
    ] {
        assert_eq!(v4[k], want, "{k} in {text}");
    }
    assert_eq!(v4["port_preservation"], true);
    assert_eq!(v4["hairpinning"], true);
    assert!(json["ipv6"].is_null());
    assert_eq!(json["port_mapping"], serde_json::json!([]));
    assert!(json["server_rtt_ms"].as_f64().is_some());

    // Nothing answers on a port of a socket that only receives.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = Command::new(nettool_bin())
        .args(["netcheck", "--timeout", "200ms", "--server"])
        .arg(silent.local_addr().unwrap().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no STUN answer"), "{stderr}");
}
