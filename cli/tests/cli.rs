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
fn rendezvous_ipv6_flags_are_checked() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "rendezvous",
                "--listen",
                "127.0.0.1:0",
                "--listen-v6",
                "127.0.0.1:0",
            ],
            "--listen-v6 127.0.0.1:0 must be an IPv6 address",
        ),
        (
            &[
                "rendezvous",
                "--listen",
                "127.0.0.1:0",
                "--other-address-v6",
                "[::1]:0",
            ],
            "--other-address-v6 [::1]:0 needs --listen-v6",
        ),
    ];
    for (argv, expected) in cases {
        let out = nettool(argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{argv:?}: {stderr}");
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
        "[default]\ntimeout = \"30s\"\n[strategy.tcp-punch]\ntimeout = \"7s\"\n[profile.p]\nstrategies = \"tcp-direct\"\n",
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
        .env("NETTOOL_STRATEGY__TCP_PUNCH__TIMEOUT", "5s")
        .env("NETTOOL_SECRET", "hush")
        .env("NETTOOL_SERVER_TOKEN", "psst")
        .env("NETTOOL_RENDEZVOUS__SERVER_TOKEN", "shh")
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
    assert!(
        line("strategy.tcp-punch.timeout").contains("\"5s\""),
        "{text}"
    );
    assert!(line("strategy.tcp-punch.timeout")
        .contains("environment NETTOOL_STRATEGY__TCP_PUNCH__TIMEOUT"));
    assert!(line("strategy.tcp-punch.low-ttl").contains("built-in default"));
    assert!(line("timeout").contains("\"30s\"") && line("timeout").contains("[default]"));
    assert!(
        line("strategies").contains("[\"tcp-direct\"]")
            && line("strategies").contains("[profile.p]")
    );
    assert!(line("strategy.udp-quic.timeout").contains("built-in default"));
    // Secrets are not printed.
    assert!(!text.contains("hush"), "{text}");
    assert!(line("secret").contains("(hidden)"));
    assert!(!text.contains("psst") && !text.contains("shh"), "{text}");
    assert!(line("server-token").contains("(hidden)"));
    assert!(line("rendezvous.server-token").contains("(hidden)"));
    assert!(line("rendezvous.max-conns-per-ip").contains("64"));
}

#[test]
fn strategy_tables_are_checked_by_their_strategy_and_old_tables_say_where_they_moved() {
    let dir = std::env::temp_dir().join(format!("nettool-cli-tables-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "[strategy.tcp-punch]\nlow-tl = 3\n",
            "bad setting `strategy.tcp-punch`: unknown field `low-tl`, expected one of",
        ),
        (
            "[strategy.pigeon]\nspeed = 1\n",
            "unknown strategy 'pigeon' (valid: tcp-punch, udp-quic, tcp-direct, relay)",
        ),
        (
            "[default]\nstrategies = [\"tcp-punch\", \"pigeon\"]\n",
            "unknown strategy 'pigeon' (valid: tcp-punch, udp-quic, tcp-direct, relay)",
        ),
        (
            "[default.tcp-punch]\ntimeout = \"5s\"\n",
            "`tcp-punch.timeout` has moved: strategy settings now live in [strategy.tcp-punch]",
        ),
        (
            "[strategy.relay]\ntimeout = \"soon\"\n",
            "bad `timeout` 'soon'",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = dir.join(format!("t{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = nettool(&["--config", file.to_str().unwrap(), "config", "show"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
        assert!(
            stderr.contains(file.to_str().unwrap()),
            "no file named: {stderr}"
        );
    }
    let out = nettool(&["strategies"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "tcp-punch",
        "strategy.tcp-punch.low-ttl = 2",
        "strategy.relay.timeout",
    ] {
        assert!(text.contains(line), "{text}");
    }
}

/// The benchmarks left the user's binary for `nettool-bench`: `nettool bench` is refused.
#[test]
fn bench_is_not_a_subcommand() {
    let out = nettool(&["bench"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unrecognized subcommand 'bench'"),
        "{stderr}"
    );
}

/// `nettool` starts itself again with glibc's `rep movsb` copies off (`tunables.rs`: rustls'
/// record copies hit 4K aliasing with it), keeps its PID, arguments and the caller's own
/// tunables, does it once, and not with NETTOOL_NO_REEXEC.
#[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
#[test]
fn nettool_runs_with_rep_movsb_off_and_keeps_the_callers_tunables() {
    use std::io::{BufRead, BufReader};
    // The environment the running server started with (/proc/PID/environ; glibc cuts
    // GLIBC_TUNABLES there at its first ':' while parsing it).
    let environ_of = |extra: &[(&str, &str)]| -> Vec<String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nettool"));
        cmd.args(["rendezvous", "--listen", "127.0.0.1:0"])
            .env_remove("GLIBC_TUNABLES")
            .env_remove("NETTOOL_NO_REEXEC")
            .env_remove("NETTOOL_REEXECED")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn nettool");
        // The server says where it listens once it runs: by then any re-exec is done.
        let mut line = String::new();
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        while !line.contains("listening") {
            line.clear();
            assert!(
                err.read_line(&mut line).expect("read") > 0,
                "server ended early"
            );
        }
        let environ = std::fs::read(format!("/proc/{}/environ", child.id())).expect("environ");
        let _ = child.kill();
        let _ = child.wait();
        String::from_utf8_lossy(&environ)
            .split('\0')
            .filter(|v| v.starts_with("GLIBC_TUNABLES=") || v.starts_with("NETTOOL_REEXECED="))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        environ_of(&[]),
        [
            "GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=2147483647",
            "NETTOOL_REEXECED=1"
        ]
    );
    let kept = environ_of(&[("GLIBC_TUNABLES", "glibc.malloc.check=0")]);
    assert!(
        kept.contains(&"GLIBC_TUNABLES=glibc.malloc.check=0".to_owned())
            && kept.contains(&"NETTOOL_REEXECED=1".to_owned()),
        "{kept:?}"
    );
    assert!(environ_of(&[("NETTOOL_NO_REEXEC", "1")]).is_empty());
}
