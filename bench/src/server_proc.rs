//! The rendezvous server in a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// `nettool rendezvous --listen 127.0.0.1:0` as a child; killed when dropped.
pub(super) struct ServerProc {
    child: Child,
    pub(super) addr: SocketAddr,
}

impl ServerProc {
    /// Starts the server; the child's output is read on a blocking-pool thread, not on an
    /// async worker.
    pub(super) async fn spawn(extra: &[&str]) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || Self::spawn_blocking(&extra))
            .await
            .context("the server start task")?
    }

    pub(super) fn spawn_blocking(extra: &[String]) -> Result<Self> {
        let exe = crate::nettool_bin()?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "rendezvous",
            "--listen",
            "127.0.0.1:0",
            "--relay-max-sessions",
            "10000",
            "--relay-rate",
            "0",
            "--relay-max-bytes",
            "0",
            "--relay-max-duration",
            "0s",
        ])
        .args(unlimited_flags())
        .args(extra);
        let (child, addr) = start_listening(&mut cmd)?;
        Ok(Self { child, addr })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Flags that lift the server's per-source-address limits (connections and joins per second
/// per IP address, sessions at once) where this build has them: every benchmark client comes
/// from loopback, and the figures are about the server's own capacity. Also
/// `--insecure-control` where the build has it: the capacity and cluster sections drive the
/// server with many small plain-JSON clients (their figures are plain joins; `nettool
/// connect` peers still use TLS).
pub(super) fn unlimited_flags() -> Vec<&'static str> {
    static FLAGS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    FLAGS
        .get_or_init(|| {
            let help = crate::nettool_bin()
                .ok()
                .and_then(|exe| {
                    Command::new(exe)
                        .args(["rendezvous", "--help"])
                        .output()
                        .ok()
                })
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            [
                "--max-conns-per-ip",
                "--max-sessions",
                "--join-rate",
                "--stun-rate",
            ]
            .into_iter()
            .filter(|f| help.contains(f))
            .flat_map(|f| [f, "0"])
            .chain(
                help.contains("--insecure-control")
                    .then_some("--insecure-control"),
            )
            .collect()
        })
        .clone()
}

/// Starts `cmd` (a `nettool rendezvous`) with its stderr piped, waits for its "listening on
/// ADDR" line and returns the child and that address; the rest of its stderr is drained on a
/// thread so the server never blocks on it. The child is killed when it ends before listening.
pub(super) fn start_listening(cmd: &mut Command) -> Result<(Child, SocketAddr)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `nettool rendezvous`")?;
    let mut reader = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut line = String::new();
    let addr = loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the rendezvous server ended before listening");
        }
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            break addr
                .parse::<SocketAddr>()
                .with_context(|| format!("bad address in the server's line {line:?}"))?;
        }
    };
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok((child, addr))
}
