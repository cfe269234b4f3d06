//! The plugin's binary runs the standard CLI with `port-forwarded` registered (and makes
//! `cargo test --workspace` build `nettool-pf` for the lab test in `tests/`).

use std::process::Command;

#[test]
fn the_plugin_is_selectable_by_name_and_its_table_is_checked() {
    let bin = env!("CARGO_BIN_EXE_nettool-pf");
    let out = Command::new(bin).arg("strategies").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("port-forwarded") && text.contains("strategy.port-forwarded.port = 0"),
        "{text}"
    );
    let dir = std::env::temp_dir().join(format!("nettool-pf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pf.toml");
    std::fs::write(&file, "[strategy.port-forwarded]\nprot = 4000\n").unwrap();
    let out = Command::new(bin)
        .args(["--config", file.to_str().unwrap(), "config", "show"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("strategy.port-forwarded") && stderr.contains("prot"),
        "{stderr}"
    );
    // The stock binary does not know it.
    let out = Command::new(bin)
        .args([
            "connect",
            "--server",
            "127.0.0.1:1",
            "--session",
            "x",
            "--strategy",
            "nope",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("valid: tcp-punch, udp-quic, tcp-direct, relay, port-forwarded"),
        "{stderr}"
    );
}
