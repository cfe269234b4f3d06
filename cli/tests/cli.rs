//! The `nettool` command line: help and clear errors for bad flags.
//! (Also makes `cargo test --workspace` build the binary the end-to-end tests run.)

use std::process::Command;

fn nettool(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nettool"))
        .args(args)
        .output()
        .expect("run nettool")
}

#[test]
fn bad_flags_are_named() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "connect",
                "--server",
                "127.0.0.1:1",
                "--session",
                "x",
                "--strategy",
                "tcp-pnuch",
            ],
            "unknown strategy 'tcp-pnuch' (valid: tcp-punch, udp-quic, tcp-direct)",
        ),
        (
            &[
                "connect",
                "--server",
                "127.0.0.1:1",
                "--session",
                "x",
                "--timeout",
                "soon",
            ],
            "bad duration 'soon'",
        ),
        (
            &["rendezvous", "--listen", "nowhere"],
            "invalid socket address",
        ),
        (&["connect", "--session", "x"], "--server <SERVER>"),
    ];
    for (argv, expected) in cases {
        let out = nettool(argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {stderr}");
        assert!(stderr.contains(expected), "{argv:?}: {stderr}");
    }
}

#[test]
fn help_teaches_the_commands() {
    let out = nettool(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["rendezvous", "connect", "demo"] {
        assert!(text.contains(word), "{text}");
    }
    let out = nettool(&["connect", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["--strategy", "--report", "--secret", "Example"] {
        assert!(text.contains(word), "{text}");
    }
}

#[test]
fn empty_session_is_refused() {
    let out = nettool(&["connect", "--server", "127.0.0.1:1", "--session", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--session must not be empty"));
}
