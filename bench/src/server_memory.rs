//! `nettool-bench --section server-memory`: the rendezvous server's resident memory per
//! connection under hostile load.
//!
//! A rendezvous server runs as a child process with its default limits (`nettool rendezvous
//! --listen 127.0.0.1:0`). 5,000 connections from 100 loopback addresses (127.3.0.1 to
//! 127.3.0.100: 50 connections and 25 joins per address, under the per-address defaults of 64
//! and a burst of 40) each send a maximal partial frame: half of them as their first frame,
//! half after joining a session of their own (a waiting peer, which the server may keep for
//! the whole session expiry). The figure is the child's VmRSS after, minus before, divided by
//! the connections; the target is at most 16 KiB per connection. The server must still hold
//! every connection when RSS is read (it drops a partial frame after the first-frame timeout,
//! 10 s; the whole measurement takes about a second).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nettool_core::protocol::{encode, ClientToServer, PROTOCOL_VERSION};
use nettool_rendezvous::UNPAIRED_MAX_FRAME_LEN;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connections opened for the figure.
pub(crate) const CONNECTIONS: u64 = 5_000;
/// Target: resident memory per connection, KiB.
pub(crate) const TARGET_KIB: f64 = 16.0;
/// Source addresses the connections come from.
const SOURCES: u64 = 100;

/// The server's memory under hostile load.
#[derive(Debug, Serialize)]
pub(crate) struct ServerMemory {
    /// Connections asked for.
    pub(crate) connections: u64,
    /// Connections the server held when RSS was read.
    pub(crate) held: u64,
    /// Bytes of the partial frame each connection sent.
    pub(crate) partial_frame_bytes: usize,
    /// The server's VmRSS before, KiB.
    pub(crate) rss_before_kib: Option<u64>,
    /// The server's VmRSS with every connection open, KiB.
    pub(crate) rss_after_kib: Option<u64>,
    /// (after - before) / held, KiB.
    pub(crate) kib_per_connection: Option<f64>,
    /// The target, KiB per connection.
    pub(crate) target_kib: f64,
    /// Whether the figure meets the target.
    pub(crate) pass: bool,
    /// What went wrong, if anything.
    pub(crate) error: Option<String>,
}

impl ServerMemory {
    /// The figure as a small table.
    pub(crate) fn render(&self) -> String {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        t.set_header(["figure", "value", "target", "", "detail"]);
        t.add_row([
            format!(
                "server RSS per connection, {} holding a partial frame",
                self.connections
            ),
            self.kib_per_connection
                .map_or("-".into(), |k| format!("{k:.1} KiB")),
            format!("≤ {} KiB", self.target_kib),
            if self.pass { "PASS" } else { "MISS" }.into(),
            format!(
                "{} held ({} B partial frame each, half of them joined and waiting); RSS {} → {} KiB{}",
                self.held,
                self.partial_frame_bytes,
                self.rss_before_kib.map_or("-".into(), |k| k.to_string()),
                self.rss_after_kib.map_or("-".into(), |k| k.to_string()),
                self.error
                    .as_deref()
                    .map(|e| format!("; {e}"))
                    .unwrap_or_default()
            ),
        ]);
        format!("Rendezvous server under hostile load\n{t}\n")
    }
}

/// Runs the measurement (a fresh server in a child process) and returns the figure.
pub(crate) async fn measure(progress: &dyn Fn(&str)) -> ServerMemory {
    let mut out = ServerMemory {
        connections: CONNECTIONS,
        held: 0,
        partial_frame_bytes: UNPAIRED_MAX_FRAME_LEN,
        rss_before_kib: None,
        rss_after_kib: None,
        kib_per_connection: None,
        target_kib: TARGET_KIB,
        pass: false,
        error: None,
    };
    progress(&format!(
        "server memory: {CONNECTIONS} connections holding partial frames ..."
    ));
    raise_nofile();
    let server = match ServerChild::spawn() {
        Ok(s) => s,
        Err(e) => {
            out.error = Some(format!("starting the server: {e:#}"));
            return out;
        }
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    out.rss_before_kib = super::cli_path::proc_status_kib(server.pid(), "VmRSS:");
    let mut held = Vec::with_capacity(CONNECTIONS as usize);
    let mut tasks = tokio::task::JoinSet::new();
    let mut failure = None;
    for i in 0..CONNECTIONS {
        // Joined (odd) and unjoined (even) connections spread alike over the addresses.
        let source = Ipv4Addr::new(127, 3, 0, (1 + (i / 2) % SOURCES) as u8);
        tasks.spawn(hostile(server.addr, source, i));
        if tasks.len() >= 128 {
            match tasks.join_next().await {
                Some(Ok(Ok(s))) => held.push(s),
                Some(Ok(Err(e))) => {
                    failure.get_or_insert(format!("{e:#}"));
                }
                Some(Err(e)) => {
                    failure.get_or_insert(e.to_string());
                }
                None => {}
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => {
                failure.get_or_insert(format!("{e:#}"));
            }
            Err(e) => {
                failure.get_or_insert(e.to_string());
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    out.rss_after_kib = super::cli_path::proc_status_kib(server.pid(), "VmRSS:");
    // Only connections the server still holds count (it would have closed a dropped one).
    let mut probe = [0u8; 1];
    out.held = held
        .iter()
        .filter(|s| {
            matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count() as u64;
    if let (Some(b), Some(a)) = (out.rss_before_kib, out.rss_after_kib) {
        if out.held > 0 {
            let per = a.saturating_sub(b) as f64 / out.held as f64;
            out.kib_per_connection = Some(per);
            out.pass = per <= TARGET_KIB && out.held == CONNECTIONS;
        }
    }
    if let Some(f) = failure {
        out.error = Some(format!("{} of {CONNECTIONS} connected: {f}", held.len()));
    } else if out.held < CONNECTIONS {
        out.error = Some(format!(
            "the server dropped {} connections",
            CONNECTIONS - out.held
        ));
    }
    drop(held);
    drop(server);
    out
}

/// One hostile connection: joins (odd `i`) or not, then sends a maximal partial frame.
async fn hostile(server: SocketAddr, source: Ipv4Addr, i: u64) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut s = socket.connect(server).await.context("connecting")?;
    if i % 2 == 1 {
        s.write_all(&encode(&ClientToServer::Join {
            version: PROTOCOL_VERSION,
            session: format!("hostile-{}-{i}", std::process::id()),
            strategies: vec!["relay".into()],
            token: None,
            express: None,
        }))
        .await?;
        // The server's answer (waiting) is one line.
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(&mut s);
        r.read_line(&mut line).await?;
        if !line.contains("\"waiting\"") {
            bail!("join refused: {}", line.trim());
        }
    }
    let mut frame = b"{\"type\":\"offer\",\"strategy\":\"x\",\"payload\":\"".to_vec();
    frame.resize(UNPAIRED_MAX_FRAME_LEN, b'a');
    s.write_all(&frame).await?;
    Ok(s)
}

/// `nettool rendezvous --listen 127.0.0.1:0` with its default limits, killed when dropped.
struct ServerChild {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ServerChild {
    fn spawn() -> Result<Self> {
        let exe = crate::nettool_bin()?;
        let mut cmd = Command::new(exe);
        cmd.args(["rendezvous", "--listen", "127.0.0.1:0"]);
        let (child, addr) = super::server_proc::start_listening(&mut cmd)?;
        Ok(Self { child, addr })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises the soft open-file limit to the hard one (the child inherits it).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
