//! The example's own checks (and the reason `cargo test --workspace` builds its binary, which
//! the lab test `session::two_embedded_peers_survive_an_address_change` runs): bad input is an
//! error that names the problem, with no network touched.

use std::process::Command;

#[test]
fn an_unknown_flag_prints_the_usage_and_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_nettool-embed"))
        .args(["--port", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("usage: nettool-embed --server"), "{err}");
}

#[test]
fn no_server_is_an_error_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_nettool-embed"))
        .args(["--session", "s", "--secret", "k"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no rendezvous server"), "{err}");
}
