//! Short codes with the real binary, over loopback (the strategy ladder) and through the NAT
//! lab (cone × cone, the default relay-first connect): one side asks the server for a code and
//! prints it, the other joins with it; a wrong code burns it on both sides.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{
    finish_peer, nettool_bin, sha256, spawn_peer, test_data, wait_until_waiting, TempDir,
};

fn rendezvous() -> (crate::support::Proc, String) {
    crate::support::loopback_rendezvous(&[])
}

/// Waits for the owner's "code:" line on its stderr; returns the code and the line with the
/// command for the other side.
fn printed_code(dir: &TempDir, name: &str) -> (String, String) {
    let path = dir.path(&format!("{name}.err"));
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let code = text
            .lines()
            .find_map(|l| l.strip_prefix("nettool: code: "))
            .map(str::to_owned);
        let command = text
            .lines()
            .find_map(|l| l.strip_prefix("nettool: on the other side run: "))
            .map(str::to_owned);
        if let (Some(code), Some(command)) = (code, command) {
            return (code, command);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name} printed no code within 20 s: {text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Where the peers run: the server's address and a command for each side (with the env).
struct Place<'a> {
    addr: String,
    a: &'a dyn Fn() -> Command,
    b: &'a dyn Fn() -> Command,
    /// Extra flags for the owner's first connect (e.g. a forced strategy on loopback).
    owner_flags: &'a [&'a str],
}

fn loopback_command() -> Command {
    Command::new(nettool_bin())
}

#[test]
fn a_printed_code_links_the_other_side_with_data_intact_both_ways() {
    let (_server, addr) = rendezvous();
    code_links(&Place {
        addr,
        a: &loopback_command,
        b: &loopback_command,
        owner_flags: &["--strategy", "tcp-punch"],
    });
}

/// The NAT lab with the default connect: relay-first (the relay at once, tcp-punch behind it).
fn lab_command(lab: &crate::nat_punch::RunningLab, h: nettool_tests::Host) -> Command {
    let mut c = lab.lab.command(h, nettool_bin());
    c.env("NETTOOL_RELAY_FIRST", "true");
    c
}

#[test]
fn in_the_lab_a_printed_code_links_the_other_side_relay_first() {
    if !nettool_tests::require_lab() {
        return;
    }
    use nettool_tests::{Host, NatKind};
    let lab = crate::nat_punch::RunningLab::new(NatKind::Cone, NatKind::Cone);
    code_links(&Place {
        addr: format!("{}:8877", lab.lab.server_ip()),
        a: &|| lab_command(&lab, Host::A),
        b: &|| lab_command(&lab, Host::B),
        owner_flags: &[],
    });
}

#[test]
fn in_the_lab_a_wrong_code_fails_both_sides_and_burns_the_code() {
    if !nettool_tests::require_lab() {
        return;
    }
    use nettool_tests::{Host, NatKind};
    let lab = crate::nat_punch::RunningLab::new(NatKind::Cone, NatKind::Cone);
    wrong_code_burns(&Place {
        addr: format!("{}:8877", lab.lab.server_ip()),
        a: &|| lab_command(&lab, Host::A),
        b: &|| lab_command(&lab, Host::B),
        owner_flags: &[],
    });
}

/// A allocates, B joins with the printed code (typed differently): intact both ways, the
/// words nowhere in the report, the nameplate back after use.
fn code_links(place: &Place) {
    let addr = &place.addr;
    let dir = TempDir::new("code");
    let a_in = test_data(1 << 20, 11);
    let b_in = test_data(700 << 10, 12);
    let mut owner = args(&["--server", addr]);
    owner.extend(args(place.owner_flags));
    let (a, _) = spawn_peer((place.a)(), &dir, "a", &a_in, &owner);
    let (code, command) = printed_code(&dir, "a");
    // Nameplate, then two words from the list.
    let parts: Vec<&str> = code.split('-').collect();
    assert_eq!(parts.len(), 3, "{code}");
    assert_eq!(parts[0], "1", "the first code on a fresh server: {code}");
    assert_eq!(
        command,
        format!("nettool connect --server {addr} --code {code}")
    );
    wait_until_waiting(&dir, "a");
    // Typed differently: upper case and spaces for dashes.
    let typed = code.to_uppercase().replace('-', " ");
    let mut joiner = args(&["--server", addr, "--code", &typed]);
    joiner.extend(args(place.owner_flags));
    let (b, _) = spawn_peer((place.b)(), &dir, "b", &b_in, &joiner);
    let a = finish_peer(a, &dir, "a", Duration::from_secs(30));
    let b = finish_peer(b, &dir, "b", Duration::from_secs(30));
    assert!(a.status.unwrap().success(), "a failed: {}", a.stderr);
    assert!(b.status.unwrap().success(), "b failed: {}", b.stderr);
    assert_eq!(sha256(&b.stdout), sha256(&a_in), "a -> b data differs");
    assert_eq!(sha256(&a.stdout), sha256(&b_in), "b -> a data differs");
    let ra = a.report.as_ref().unwrap();
    assert_eq!(ra["session"], "code-1");
    assert_eq!(ra["role"], "first");
    assert!(ra.get("wrong_code").is_none(), "{ra}");
    // The words are the secret: never on the server's side of anything, nor in the report.
    let words = &code[2..];
    assert!(!ra.to_string().contains(words));

    // The nameplate came back after use: the next code gets number 1 again.
    let (c, _) = spawn_peer(
        (place.a)(),
        &dir,
        "c",
        b"",
        &args(&["--server", addr, "--code-words", "4", "--timeout", "5s"]),
    );
    let (code, _) = printed_code(&dir, "c");
    assert!(code.starts_with("1-"), "{code}");
    assert_eq!(code.split('-').count(), 5, "{code}");
    drop(c);
}

#[test]
fn a_wrong_code_fails_both_sides_and_burns_the_code() {
    let (_server, addr) = rendezvous();
    wrong_code_burns(&Place {
        addr,
        a: &loopback_command,
        b: &loopback_command,
        owner_flags: &[],
    });
}

/// A guess with the right nameplate and a wrong word: the guesser exits 1, the owner exits 1
/// within 10 s saying so, one attempt only, and the right code no longer joins.
fn wrong_code_burns(place: &Place) {
    let addr = &place.addr;
    let dir = TempDir::new("wrongcode");
    let (a, _) = spawn_peer(
        (place.a)(),
        &dir,
        "a",
        b"owner data",
        &args(&["--server", addr]),
    );
    let (code, _) = printed_code(&dir, "a");
    wait_until_waiting(&dir, "a");
    // A guess: the right nameplate, another first word.
    let (number, words) = code.split_once('-').unwrap();
    let (first, rest) = words.split_once('-').unwrap();
    let other = if first == "adroitness" {
        "adviser"
    } else {
        "adroitness"
    };
    let guess = format!("{number}-{other}-{rest}");
    let started = Instant::now();
    let (b, _) = spawn_peer(
        (place.b)(),
        &dir,
        "b",
        b"guesser data",
        &args(&["--server", addr, "--code", &guess]),
    );
    let a = finish_peer(a, &dir, "a", Duration::from_secs(10));
    let a_took = started.elapsed();
    let b = finish_peer(b, &dir, "b", Duration::from_secs(30));
    assert_eq!(
        a.status.and_then(|s| s.code()),
        Some(1),
        "the owner must exit 1 within 10 s (took {a_took:?}): {}\nB: {}",
        a.stderr,
        b.stderr
    );
    assert!(
        a.stderr
            .contains("nettool: someone tried a wrong code: start again"),
        "{}",
        a.stderr
    );
    assert_eq!(b.status.and_then(|s| s.code()), Some(1), "{}", b.stderr);
    assert!(b.stderr.contains("wrong code"), "{}", b.stderr);
    assert!(
        a.stdout.is_empty() && b.stdout.is_empty(),
        "data without a link"
    );
    for run in [&a, &b] {
        let report = run.report.as_ref().expect("a report on failure");
        assert_eq!(report["wrong_code"], true, "{report}");
        // One guess: no strategy after the one that failed.
        assert_eq!(report["attempts"].as_array().unwrap().len(), 1, "{report}");
    }

    // The right code no longer joins: the server refuses its nameplate.
    let (c, _) = spawn_peer(
        (place.b)(),
        &dir,
        "c",
        b"late",
        &args(&["--server", addr, "--code", &code, "--timeout", "10s"]),
    );
    let c = finish_peer(c, &dir, "c", Duration::from_secs(15));
    assert_eq!(c.status.and_then(|s| s.code()), Some(1), "{}", c.stderr);
    assert!(c.stderr.contains("no such code"), "{}", c.stderr);
}

#[test]
fn bad_codes_are_refused_before_anything_is_sent() {
    let (_server, addr) = rendezvous();
    let dir = TempDir::new("badcode");
    for (code, says) in [
        ("7-guitarist-revenj", "'revenj'"),
        ("seven-guitarist-revenge", "not a nameplate number"),
        (&"7-".repeat(5000), "too long"),
    ] {
        let (p, _) = spawn_peer(
            Command::new(nettool_bin()),
            &dir,
            "p",
            b"",
            &args(&["--server", &addr, "--code", code]),
        );
        let run = finish_peer(p, &dir, "p", Duration::from_secs(10));
        assert_eq!(run.status.and_then(|s| s.code()), Some(2), "{}", run.stderr);
        assert!(run.stderr.contains(says), "{code}: {}", run.stderr);
    }
    // --code and --session do not go together.
    let (p, _) = spawn_peer(
        Command::new(nettool_bin()),
        &dir,
        "p",
        b"",
        &args(&[
            "--server",
            &addr,
            "--code",
            "7-guitarist-revenge",
            "--session",
            "x",
        ]),
    );
    let run = finish_peer(p, &dir, "p", Duration::from_secs(10));
    assert_eq!(run.status.and_then(|s| s.code()), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("cannot be used with"), "{}", run.stderr);
}

#[test]
fn expose_prints_a_code_forward_uses_it_and_the_session_resumes_after_a_silent_path() {
    use crate::forward::{echo_now, echo_round, signal, start_side, wait_line};
    let (_server, addr) = rendezvous();
    let dir = TempDir::new("code-fw");
    let echo = echo_now();
    let base = ["--strategy", "tcp-punch", "--strategy-timeout", "3s"];
    let mut e = args(&["expose", "--server", &addr]);
    e.extend(args(&base));
    e.push(echo.to_string());
    let expose = start_side(Command::new(nettool_bin()), &dir.0, "expose", &e);
    let line = wait_line(&expose.err, "nettool: code: ", Duration::from_secs(10));
    let code = line.trim_start_matches("nettool: code: ").trim().to_owned();
    let command = wait_line(&expose.err, "on the other side run", Duration::from_secs(5));
    assert!(
        command.contains(&format!(
            "nettool forward --listen 127.0.0.1:PORT --server {addr} --code {code}"
        )),
        "{command}"
    );
    let mut f = args(&["forward", "--server", &addr, "--code", &code]);
    f.extend(args(&base));
    f.extend(args(&["--listen", "127.0.0.1:0"]));
    let forward = start_side(Command::new(nettool_bin()), &dir.0, "forward", &f);
    let line = wait_line(&forward.err, "listening on", Duration::from_secs(10));
    let listen = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .expect("address in the listening line")
        .trim_end_matches(';')
        .to_owned();
    wait_line(&forward.err, "forwarding", Duration::from_secs(30));
    assert_eq!(
        echo_round(&listen, b"through the code").unwrap(),
        b"through the code"
    );
    // The path goes silent (expose stopped) long enough for the session to notice; when it
    // answers again the session resumes, not under the used code (its nameplate is free
    // again) but under its resume ticket.
    signal(&expose.proc, "-STOP");
    std::thread::sleep(Duration::from_secs(5));
    signal(&expose.proc, "-CONT");
    assert_eq!(echo_round(&listen, b"again").unwrap(), b"again");
    wait_line(&forward.err, "resumed via", Duration::from_secs(30));
    let err = std::fs::read_to_string(&forward.err).unwrap();
    assert!(!err.contains("no such code"), "{err}");
}
