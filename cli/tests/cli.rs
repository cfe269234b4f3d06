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
            "unknown strategy 'tcp-pnuch' (valid: tcp-punch, udp-quic, tcp-direct, relay)",
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
fn missing_server_or_session_is_refused_clearly() {
    let out = nettool(&["connect", "--server", "127.0.0.1:1", "--session", ""]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no session: give --session NAME"),
        "{stderr}"
    );
    let out = nettool(&["connect", "--session", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no rendezvous server: give --server"),
        "{stderr}"
    );
}

#[test]
fn config_show_explains_file_env_and_defaults() {
    let dir = std::env::temp_dir().join(format!("nettool-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(
        &file,
        "[default]\ntimeout = \"30s\"\n[default.tcp-punch]\ntimeout = \"7s\"\n[profile.p]\nstrategies = \"tcp-direct\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nettool"))
        .args([
            "--config",
            file.to_str().unwrap(),
            "--profile",
            "p",
            "config",
            "show",
        ])
        .env("NETTOOL_TCP_PUNCH__TIMEOUT", "5s")
        .env("NETTOOL_SECRET", "hush")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} =")))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_owned()
    };
    // The environment beats the file.
    assert!(line("tcp-punch.timeout").contains("\"5s\""), "{text}");
    assert!(line("tcp-punch.timeout").contains("environment NETTOOL_TCP_PUNCH__TIMEOUT"));
    assert!(line("timeout").contains("\"30s\"") && line("timeout").contains("[default]"));
    assert!(
        line("strategies").contains("[\"tcp-direct\"]")
            && line("strategies").contains("[profile.p]")
    );
    assert!(line("udp-quic.timeout").contains("built-in default"));
    // Secrets are not printed.
    assert!(!text.contains("hush"), "{text}");
    assert!(line("secret").contains("(hidden)"));
}
