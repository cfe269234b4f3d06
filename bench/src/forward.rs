//! `nettool-bench --section forward`: one forwarded stream against `nettool connect`.
//!
//! Real processes on loopback, per strategy: two `nettool connect` peers carry `size` bytes
//! from the first's stdin to the second's stdout; then `nettool expose` and `nettool forward`
//! carry the same bytes over one forwarded stream (client -> forward -> link -> expose ->
//! target). Both figures are timed the same way: at the receiving end, from the first byte to
//! the end of the stream. While the forwarded bulk stream runs, a second stream measures the
//! round trip of small pings (a bulk transfer must not starve an interactive session). The
//! figures come back as lines for the bench report's notes; the target is 0.5x of connect.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nettool::bench_support::ConfiguredStrategy;

/// Runs the forward benchmark against the rendezvous server at `server`; one line per
/// strategy (or its error).
pub(crate) async fn run(
    server: SocketAddr,
    configs: &[ConfiguredStrategy],
    size: u64,
    progress: &dyn Fn(&str),
) -> Vec<String> {
    let mut lines = Vec::new();
    for c in configs {
        let name = c.name().to_string();
        if name == "tcp-direct" {
            continue; // the same TLS-over-TCP data path as tcp-punch
        }
        progress(&format!("forward: {name}, {size} bytes ..."));
        let run = tokio::task::spawn_blocking({
            let name = name.clone();
            move || one_strategy(server, &name, size)
        });
        lines.push(match run.await {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => format!("forward {name}: not measured: {e:#}"),
            Err(e) => format!("forward {name}: not measured: {e}"),
        });
    }
    lines
}

/// A child killed when dropped.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nettool(server: SocketAddr, session: &str, strategy: &str, sub: &[&str]) -> Result<Command> {
    let mut c = Command::new(crate::nettool_bin()?);
    c.args(sub)
        .args(["--server", &server.to_string(), "--session", session])
        .args(["--secret", "bench", "--strategy", strategy]);
    Ok(c)
}

/// Reads `r` to the end; returns (bytes, seconds from the first byte to the end).
fn timed_sink(mut r: impl Read) -> std::io::Result<(u64, f64)> {
    let mut buf = vec![0u8; 256 << 10];
    let mut first = None;
    let mut total = 0u64;
    let mut first_len = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if first.is_none() {
            first = Some(Instant::now());
            first_len = n as u64;
        }
        total += n as u64;
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    // The first read's bytes arrived before the clock started.
    Ok((total - first_len, secs))
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

fn write_zeros(mut w: impl Write, size: u64) -> std::io::Result<()> {
    let buf = vec![0u8; 256 << 10];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Waits for a line containing `needle` on a child's stderr; keeps draining it afterwards.
fn wait_stderr(kid: &mut Kid, needle: &str, limit: Duration) -> Result<String> {
    let stderr = kid.0.stderr.take().context("stderr is piped")?;
    let (tx, rx) = mpsc::channel();
    let needle = needle.to_owned();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&needle) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(limit)
        .context("the child did not get there in time")
}

fn connect_figure(server: SocketAddr, strategy: &str, size: u64) -> Result<f64> {
    let session = format!("bf-c-{}-{strategy}", std::process::id());
    let mut a = Kid(nettool(server, &session, strategy, &["connect"])?
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?);
    let mut b = Kid(nettool(server, &session, strategy, &["connect"])?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?);
    let stdin = a.0.stdin.take().context("stdin is piped")?;
    let writer = std::thread::spawn(move || write_zeros(stdin, size));
    let out = b.0.stdout.take().context("stdout is piped")?;
    let (bytes, secs) = timed_sink(out)?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    if bytes + (256 << 10) < size {
        bail!("connect carried only {bytes} of {size} bytes");
    }
    Ok(mbps(bytes, secs))
}

/// Returns (bulk MB/s over one forwarded stream, median ping ms during it, idle ping ms).
fn forward_figure(server: SocketAddr, strategy: &str, size: u64) -> Result<(f64, f64, f64)> {
    // The target: a stream starting with b'P' is an echo (pings), anything else a timed sink.
    let target = TcpListener::bind("127.0.0.1:0")?;
    let taddr = target.local_addr()?;
    let (res_tx, res_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for c in target.incoming() {
            let Ok(mut c) = c else { continue };
            let res_tx = res_tx.clone();
            std::thread::spawn(move || {
                let mut kind = [0u8; 1];
                if c.read_exact(&mut kind).is_err() {
                    return;
                }
                if kind[0] == b'P' {
                    let mut b = [0u8; 8];
                    while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
                } else {
                    let _ = res_tx.send(timed_sink(&mut c));
                }
            });
        }
    });
    let session = format!("bf-f-{}-{strategy}", std::process::id());
    let _expose = Kid(
        nettool(server, &session, strategy, &["expose", &taddr.to_string()])?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut fwd = Kid(nettool(
        server,
        &session,
        strategy,
        &["forward", "--listen", "127.0.0.1:0"],
    )?
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()?);
    let line = wait_stderr(&mut fwd, "listening on", Duration::from_secs(10))?;
    let listen: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.trim_end_matches(';').parse().ok())
        .context("no address in the forwarder's listening line")?;
    let ping = |n: usize| -> Result<f64> {
        let mut c = TcpStream::connect(listen)?;
        c.set_nodelay(true)?;
        c.write_all(b"P")?;
        let mut rtts = Vec::new();
        for i in 0..n as u64 {
            let t = Instant::now();
            c.write_all(&i.to_be_bytes())?;
            let mut b = [0u8; 8];
            c.read_exact(&mut b)?;
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
            std::thread::sleep(Duration::from_millis(5));
        }
        rtts.sort_by(f64::total_cmp);
        Ok(rtts[rtts.len() / 2])
    };
    // The first stream waits for the link; the idle figure comes after it is up.
    let end = Instant::now() + Duration::from_secs(30);
    let idle = loop {
        match ping(20) {
            Ok(ms) => break ms,
            Err(e) if Instant::now() > end => return Err(e.context("no stream through")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let bulk = std::thread::spawn(move || -> std::io::Result<()> {
        let mut c = TcpStream::connect(listen)?;
        c.write_all(b"B")?;
        write_zeros(&mut c, size)?;
        c.shutdown(std::net::Shutdown::Write)
    });
    std::thread::sleep(Duration::from_millis(100));
    let busy = ping(20)?;
    bulk.join()
        .map_err(|_| anyhow::anyhow!("bulk writer panicked"))??;
    let (bytes, secs) = res_rx
        .recv_timeout(Duration::from_secs(300))
        .context("the target got no bulk stream")??;
    if bytes + (256 << 10) < size {
        bail!("forward carried only {bytes} of {size} bytes");
    }
    Ok((mbps(bytes, secs), busy, idle))
}

fn one_strategy(server: SocketAddr, strategy: &str, size: u64) -> Result<String> {
    let connect = connect_figure(server, strategy, size).context("connect")?;
    let (fwd, busy, idle) = forward_figure(server, strategy, size).context("forward")?;
    let ratio = if connect > 0.0 { fwd / connect } else { 0.0 };
    Ok(format!(
        "forward {strategy}: one stream {fwd:.0} MB/s = {ratio:.2}x connect's {connect:.0} MB/s \
         (target 0.5x: {}); ping on a second stream {busy:.2} ms during the bulk transfer, \
         {idle:.2} ms idle",
        if ratio >= 0.5 { "PASS" } else { "MISS" }
    ))
}
