//! The CLI path: two real `nettool connect` processes (what users run: stdin → link → stdout)
//! against two `nettool plain-tcp` processes pumping the same way over plain TCP (1 MiB
//! buffers, the same stdio code), pipe→pipe and file→file; and a soak of many transfers both
//! ways at once with every byte checked.
//!
//! Processes run on loopback, or in network namespaces (`--cli-netns-*`, for the NAT lab: the
//! ignored tests in `tests/tests/e2e/bench.rs` build the lab and pass its namespaces). All
//! process plumbing (spawning, feeding, draining, waiting) runs on plain threads inside
//! `spawn_blocking`, never on the async workers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::Verdict;

/// Bytes per pattern chunk; each chunk starts with its index, so a lost, repeated or
/// misplaced chunk is caught, not only a wrong count.
const CHUNK: usize = 1 << 20;

/// Where the processes run.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// Namespaces of the server, peer A (sender) and peer B (receiver); None = this one.
    pub(crate) netns_server: Option<String>,
    pub(crate) netns_a: Option<String>,
    pub(crate) netns_b: Option<String>,
    /// Address the server listens on (port 0 = any).
    pub(crate) server_ip: IpAddr,
    /// Address B's plain-TCP listener binds (A must reach it).
    pub(crate) b_ip: IpAddr,
    /// What the figures' placement says (default: "network namespaces" or "loopback").
    pub(crate) label: Option<String>,
}

impl Placement {
    pub(crate) fn loopback() -> Self {
        let lo = IpAddr::from([127, 0, 0, 1]);
        Self {
            netns_server: None,
            netns_a: None,
            netns_b: None,
            server_ip: lo,
            b_ip: lo,
            label: None,
        }
    }

    /// The path users have: a routed NAT lab (none × none: host → router → internet router →
    /// router → host, veth MTU 1,500, no delay), kept while the returned lab lives; loopback,
    /// labelled with the reason, when this machine cannot build one.
    pub(crate) fn routed_lab_or_loopback() -> (Self, Option<nettool_tests::Lab>) {
        use nettool_tests::{Host, Lab, NatKind};
        let fallback = |why: String| Self {
            label: Some(format!("loopback (MTU 65,536), as a fallback: {why}")),
            ..Self::loopback()
        };
        if let Some(why) = nettool_tests::lab_unavailable_reason() {
            return (fallback(why), None);
        }
        match Lab::new(NatKind::None, NatKind::None) {
            Ok(lab) => {
                let place = Self {
                    netns_server: Some(lab.netns(Host::Server).to_owned()),
                    netns_a: Some(lab.netns(Host::A).to_owned()),
                    netns_b: Some(lab.netns(Host::B).to_owned()),
                    server_ip: lab.server_ip().into(),
                    b_ip: lab.host_ip(Host::B).into(),
                    label: Some(
                        "routed NAT lab, none × none (host → router → internet router → \
                         router → host, MTU 1,500, the lab's own ~0.05 ms RTT)"
                            .into(),
                    ),
                };
                (place, Some(lab))
            }
            Err(e) => (fallback(format!("cannot build the NAT lab: {e}")), None),
        }
    }

    /// Where the processes run, in words.
    pub(crate) fn describe(&self) -> String {
        match &self.label {
            Some(l) => l.clone(),
            None if self.is_lab() => "network namespaces".into(),
            None => "loopback".into(),
        }
    }

    fn is_lab(&self) -> bool {
        self.netns_a.is_some() || self.netns_b.is_some()
    }
}

fn command(netns: &Option<String>) -> Result<Command> {
    let exe = crate::nettool_bin()?;
    Ok(program(netns, exe))
}

/// `prog` run in `netns` (or here).
fn program(netns: &Option<String>, exe: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    }
}

/// The yardstick the issue tracker asks for: socat with 1 MiB transfer blocks (`-b`), one
/// direction (`-u`), stdin to a TCP connection to stdout, on the same path as the links.
pub(crate) const SOCAT: &str = "socat";

/// Whether socat is installed (the socat rows are left out otherwise, with a note).
pub(crate) fn socat_available() -> bool {
    Command::new(SOCAT)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The i-th pattern chunk for `seed`.
fn chunk(block: &[u8], i: u64) -> impl Fn(usize) -> u8 + '_ {
    let idx = i.to_le_bytes();
    move |at| {
        if at < 8 {
            idx[at] ^ block[at]
        } else {
            block[at]
        }
    }
}

fn pattern_block(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(CHUNK);
    out
}

/// Writes `size` pattern bytes to `w` in 1 MiB writes.
fn feed(mut w: impl Write, size: u64, seed: u64) -> std::io::Result<()> {
    let block = pattern_block(seed);
    let mut buf = block.clone();
    let mut left = size;
    let mut i = 0u64;
    while left > 0 {
        let f = chunk(&block, i);
        for (at, b) in buf.iter_mut().enumerate().take(8) {
            *b = f(at);
        }
        let n = left.min(CHUNK as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
        i += 1;
    }
    w.flush()
}

/// Checks a stream against the pattern; returns bytes read and the first mismatch.
struct Checker {
    block: Vec<u8>,
    at: u64,
    bad: Option<String>,
}

impl Checker {
    fn new(seed: u64) -> Self {
        Self {
            block: pattern_block(seed),
            at: 0,
            bad: None,
        }
    }

    fn take(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let off = (self.at % CHUNK as u64) as usize;
            let n = data.len().min(CHUNK - off);
            if self.bad.is_none() {
                let i = self.at / CHUNK as u64;
                let head_ok =
                    (off..(off + n).min(8)).all(|k| data[k - off] == chunk(&self.block, i)(k));
                let lo = off.max(8);
                let tail_ok = lo >= off + n || data[lo - off..n] == self.block[lo..off + n];
                if !(head_ok && tail_ok) {
                    self.bad = Some(format!("wrong bytes in the 1 MiB chunk at {}", self.at));
                }
            }
            self.at += n as u64;
            data = &data[n..];
        }
    }
}

/// What feeds a process's stdin.
#[derive(Clone)]
enum Feed {
    Null,
    Pattern { size: u64, seed: u64 },
    File(PathBuf),
}

/// Where a process's stdout goes.
#[derive(Clone)]
enum Drain {
    Null,
    Check { size: u64, seed: u64 },
    File(PathBuf),
}

/// A running peer process and its helper threads.
struct Peer {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    linked: Arc<Mutex<Option<Instant>>>,
    listening: std::sync::mpsc::Receiver<String>,
    feeder: Option<JoinHandle<std::io::Result<()>>>,
    drainer: Option<JoinHandle<(u64, Option<String>, Instant)>>,
    hwm_kib: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
}

impl Peer {
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        feed_with: Feed,
        drain_to: Drain,
    ) -> Result<Self> {
        cmd.stdin(match &feed_with {
            Feed::Null => Stdio::null(),
            Feed::Pattern { .. } => Stdio::piped(),
            Feed::File(p) => std::fs::File::open(p)
                .with_context(|| format!("opening {}", p.display()))?
                .into(),
        });
        cmd.stdout(match &drain_to {
            Drain::Null => Stdio::null(),
            Drain::Check { .. } => Stdio::piped(),
            Drain::File(p) => std::fs::File::create(p)
                .with_context(|| format!("creating {}", p.display()))?
                .into(),
        });
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let linked = Arc::new(Mutex::new(None));
        let (listen_tx, listening) = std::sync::mpsc::channel();
        {
            let stderr = child.stderr.take().expect("stderr is piped");
            let (lines, linked) = (lines.clone(), linked.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    // socat -d -d says "starting data transfer loop" once connected.
                    if line.contains("linked with") || line.contains("starting data transfer loop")
                    {
                        linked
                            .lock()
                            .expect("linked lock")
                            .get_or_insert_with(Instant::now);
                    }
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let _ = listen_tx.send(rest.trim().to_owned());
                    }
                    lines.lock().expect("lines lock").push(line);
                }
            });
        }
        let feeder = match feed_with {
            Feed::Pattern { size, seed } => {
                let stdin = child.stdin.take().expect("stdin is piped");
                Some(std::thread::spawn(move || feed(stdin, size, seed)))
            }
            _ => None,
        };
        let drainer = match drain_to {
            Drain::Check { seed, .. } => {
                let mut stdout = child.stdout.take().expect("stdout is piped");
                Some(std::thread::spawn(move || {
                    let mut c = Checker::new(seed);
                    let mut buf = vec![0u8; CHUNK];
                    loop {
                        match stdout.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => c.take(&buf[..n]),
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                c.bad.get_or_insert(format!("reading stdout: {e}"));
                                break;
                            }
                        }
                    }
                    (c.at, c.bad, Instant::now())
                }))
            }
            _ => None,
        };
        let hwm_kib = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        {
            let (hwm, done, pid) = (hwm_kib.clone(), done.clone(), child.id());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Some(k) = proc_status_kib(pid, "VmHWM:") {
                        hwm.fetch_max(k, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        Ok(Self {
            name,
            child,
            lines,
            linked,
            listening,
            feeder,
            drainer,
            hwm_kib,
            done,
        })
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().expect("lines lock");
        lines
            .iter()
            .rev()
            .take(2)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub(crate) fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Whether child `pid` has exited, without reaping it (`waitid(WNOWAIT)`), so that its
/// /proc entry (a zombie's, holding the final CPU totals) stays readable until `Child::wait`.
/// `block` waits for the exit.
fn exited_unreaped(pid: u32, block: bool) -> std::io::Result<bool> {
    let flags = libc::WEXITED | libc::WNOWAIT | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: waitid fills `info`, a plain C struct, and reaps nothing (WNOWAIT).
        let (rc, pid_seen) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags);
            (rc, info.si_pid())
        };
        if rc == 0 {
            // With WNOHANG and no change, si_pid stays 0.
            return Ok(pid_seen != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// CPU seconds (user + system, all threads) a child used, read after it exited and before it
/// is reaped.
fn cpu_seconds_at_exit(pid: u32) -> Option<f64> {
    exited_unreaped(pid, true).ok()?;
    super::capacity::proc_cpu_seconds(pid)
}

/// The rendezvous server of this section, in its namespace.
pub(crate) struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(place: &Placement) -> Result<Self> {
        let mut cmd = command(&place.netns_server)?;
        cmd.args(["rendezvous", "--listen"])
            .arg(SocketAddr::new(place.server_ip, 0).to_string())
            .args(["--relay-rate", "0", "--relay-max-bytes", "0"])
            .args(["--relay-max-duration", "0s", "--max-conns-per-ip", "0"])
            .args(["--join-rate", "0"]);
        let (child, addr) = super::server_proc::start_listening(&mut cmd)?;
        Ok(Self { child, addr })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One transfer's outcome.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Transfer {
    /// Seconds from both linked to the last byte out of the receiver(s).
    pub(crate) seconds: Option<f64>,
    /// Peak RSS (VmHWM) of the two processes, KiB.
    pub(crate) peak_rss_kib: u64,
    pub(crate) error: Option<String>,
    /// The transfer did not finish in time (a stall).
    pub(crate) stalled: bool,
    /// CPU seconds (user + system) of A (the sender) and B, whole process lifetime.
    pub(crate) cpu_seconds: [Option<f64>; 2],
    /// CPU seconds the rendezvous server spent during the transfer (pairing it, and
    /// carrying it when the link is the relay).
    pub(crate) server_cpu_seconds: Option<f64>,
}

/// What a transfer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum IoMode {
    /// The bench feeds A's stdin and drains B's stdout through pipes (both checked).
    Pipe,
    /// A reads a file, B writes a file (checked afterwards).
    File,
    /// Both ways at once through pipes, both checked (the soak).
    Both,
}

impl IoMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pipe => "pipe→pipe",
            Self::File => "file→file",
            Self::Both => "both ways",
        }
    }
}

/// Runs one transfer of `size` bytes over `link` ("plain-tcp" or a strategy name).
#[allow(clippy::too_many_arguments)]
fn transfer(
    place: &Placement,
    server: &Server,
    link: &str,
    mode: IoMode,
    size: u64,
    dir: &Path,
    seq: u64,
    limit: Duration,
) -> Result<Transfer> {
    let server_cpu_before = super::capacity::proc_cpu_seconds(server.child.id());
    let seed_ab = seq * 2 + 1;
    let seed_ba = seq * 2 + 2;
    let (feed_a, drain_b, feed_b, drain_a) = match mode {
        IoMode::Pipe => (
            Feed::Pattern {
                size,
                seed: seed_ab,
            },
            Drain::Check {
                size,
                seed: seed_ab,
            },
            Feed::Null,
            Drain::Null,
        ),
        IoMode::File => {
            let input = dir.join(format!("in-{size}"));
            if std::fs::metadata(&input).map(|m| m.len()).ok() != Some(size) {
                feed(
                    std::io::BufWriter::new(std::fs::File::create(&input)?),
                    size,
                    0,
                )?;
            }
            (
                Feed::File(input),
                Drain::File(dir.join("out")),
                Feed::Null,
                Drain::Null,
            )
        }
        IoMode::Both => (
            Feed::Pattern {
                size,
                seed: seed_ab,
            },
            Drain::Check {
                size,
                seed: seed_ab,
            },
            Feed::Pattern {
                size,
                seed: seed_ba,
            },
            Drain::Check {
                size,
                seed: seed_ba,
            },
        ),
    };
    let session = format!("cli-{}-{seq}", std::process::id());
    let peer_args = |cmd: &mut Command| {
        cmd.args(["connect", "--server"])
            .arg(server.addr.to_string())
            .args([
                "--session",
                &session,
                "--secret",
                "bench",
                "--strategy",
                link,
            ]);
    };
    let (a, b) = if link == SOCAT {
        // A port of its own per transfer (no TIME_WAIT clash); the sender retries its connect
        // until B's listener is up.
        let addr = SocketAddr::new(place.b_ip, 20000 + (seq % 20000) as u16);
        let (listen, dial) = if addr.is_ipv4() {
            ("TCP4-LISTEN", "TCP4")
        } else {
            ("TCP6-LISTEN", "TCP6")
        };
        let mut cb = program(&place.netns_b, SOCAT);
        cb.args(["-d", "-d", "-b", "1048576", "-u"])
            .arg(format!("{listen}:{},reuseaddr", addr.port()))
            .arg("STDOUT");
        let b = Peer::spawn("B", cb, feed_b, drain_b.clone())?;
        let mut ca = program(&place.netns_a, SOCAT);
        ca.args(["-d", "-d", "-b", "1048576", "-u", "STDIN"])
            .arg(format!("{dial}:{addr},retry=200,interval=0.05"));
        (Peer::spawn("A", ca, feed_a, drain_a.clone())?, b)
    } else if link == "plain-tcp" {
        let mut cb = command(&place.netns_b)?;
        cb.args(["plain-tcp", "--listen"])
            .arg(SocketAddr::new(place.b_ip, 0).to_string());
        let b = Peer::spawn("B", cb, feed_b, drain_b.clone())?;
        let addr = b
            .listening
            .recv_timeout(Duration::from_secs(10))
            .context("plain-tcp listener did not start")?;
        let mut ca = command(&place.netns_a)?;
        ca.args(["plain-tcp", "--connect", &addr]);
        (Peer::spawn("A", ca, feed_a, drain_a.clone())?, b)
    } else {
        let mut ca = command(&place.netns_a)?;
        peer_args(&mut ca);
        let mut cb = command(&place.netns_b)?;
        peer_args(&mut cb);
        let a = Peer::spawn("A", ca, feed_a, drain_a.clone())?;
        (a, Peer::spawn("B", cb, feed_b, drain_b.clone())?)
    };
    let mut peers = [a, b];
    let end = Instant::now() + limit;
    let mut stalled = false;
    for p in peers.iter_mut() {
        loop {
            // Not `try_wait`: the exited child stays unreaped so its CPU time can be read.
            if exited_unreaped(p.child.id(), false)? {
                break;
            }
            if Instant::now() >= end {
                stalled = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut errors = Vec::new();
    let mut last_byte: Option<Instant> = None;
    let mut linked: Option<Instant> = None;
    let mut rss = 0;
    let mut cpu_seconds = [None, None];
    for (i, p) in peers.iter_mut().enumerate() {
        if stalled {
            let _ = p.child.kill();
        }
        cpu_seconds[i] = cpu_seconds_at_exit(p.child.id());
        let status = p.child.wait()?;
        p.done.store(true, Ordering::Relaxed);
        rss = rss.max(p.hwm_kib.load(Ordering::Relaxed));
        match *p.linked.lock().expect("linked lock") {
            Some(t) => linked = Some(linked.map_or(t, |l: Instant| l.max(t))),
            None => errors.push(format!("{} never linked", p.name)),
        }
        if let Some(f) = p.feeder.take() {
            if let Ok(Err(e)) = f.join() {
                if !stalled {
                    errors.push(format!("feeding {}: {e}", p.name));
                }
            }
        }
        let want = if p.name == "A" { &drain_a } else { &drain_b };
        if let Some(d) = p.drainer.take() {
            if let Ok((got, bad, at)) = d.join() {
                last_byte = Some(last_byte.map_or(at, |l: Instant| l.max(at)));
                if let Drain::Check { size, .. } = want {
                    if got != *size {
                        errors.push(format!("{} received {got} of {size} bytes", p.name));
                    }
                }
                if let Some(bad) = bad {
                    errors.push(format!("{}: {bad}", p.name));
                }
            }
        } else if !status.success() || matches!(want, Drain::File(_)) {
            last_byte = Some(last_byte.map_or(Instant::now(), |l| l.max(Instant::now())));
        }
        if !status.success() && !stalled {
            errors.push(format!("{} exited with {status}: {}", p.name, p.tail()));
        }
    }
    if let Drain::File(out) = &drain_b {
        match check_file(out, size, 0) {
            Ok(()) => {}
            Err(e) => errors.push(format!("B's output: {e}")),
        }
        let _ = std::fs::remove_file(out);
    }
    if stalled {
        errors.push(format!(
            "stalled: not done after {limit:?} (A: {}; B: {})",
            peers[0].tail(),
            peers[1].tail()
        ));
    }
    let seconds = match (linked, last_byte) {
        (Some(l), Some(e)) if errors.is_empty() => {
            Some(e.saturating_duration_since(l).as_secs_f64())
        }
        _ => None,
    };
    Ok(Transfer {
        seconds,
        peak_rss_kib: rss,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
        stalled,
        cpu_seconds,
        server_cpu_seconds: server_cpu_before
            .zip(super::capacity::proc_cpu_seconds(server.child.id()))
            .map(|(before, after)| after - before),
    })
}

fn check_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut c = Checker::new(seed);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        c.take(&buf[..n]);
    }
    if let Some(bad) = c.bad {
        bail!("{bad}");
    }
    if c.at != size {
        bail!("{} of {size} bytes", c.at);
    }
    Ok(())
}

/// Target fraction of socat's rate (1 MiB buffers, the same path) on the CLI path: what the
/// "line rate" issue asks of each link on the routed 1,500-byte path. Without socat the plain
/// TCP pump (as fast or faster) stands in.
pub(crate) fn target_ratio(link: &str) -> Option<f64> {
    match link {
        "tcp-punch" | "tcp-direct" => Some(0.95),
        "relay" => Some(0.85),
        "udp-quic" => Some(0.75),
        _ => None,
    }
}

/// RSS target of one `connect` process during a transfer, MB.
pub(crate) const TARGET_RSS_MB: f64 = 32.0;

/// One row of the CLI-path table.
#[derive(Debug, Serialize)]
pub(crate) struct CliPathRow {
    pub(crate) link: String,
    pub(crate) mode: IoMode,
    pub(crate) runs: u32,
    /// Median seconds of the successful runs.
    pub(crate) seconds: Option<f64>,
    pub(crate) mb_per_s: Option<f64>,
    pub(crate) ratio: Option<f64>,
    /// Fraction of socat's rate (socat with 1 MiB blocks on the same path), when installed.
    pub(crate) ratio_socat: Option<f64>,
    /// Target fraction of socat's rate ([`target_ratio`]; of plain TCP's without socat).
    pub(crate) target_ratio: Option<f64>,
    pub(crate) verdict: Verdict,
    /// Largest peak RSS of either process over the runs, MB.
    pub(crate) peak_rss_mb: f64,
    pub(crate) rss_verdict: Verdict,
    /// Median CPU seconds (user + system) per GiB carried, of the sender and the receiver:
    /// steadier than wall time on a busy machine, and what a user's laptop pays.
    pub(crate) cpu_s_per_gib: [Option<f64>; 2],
    /// Median CPU seconds of the rendezvous server per GiB carried (the relay's cost).
    pub(crate) server_cpu_s_per_gib: Option<f64>,
    pub(crate) error: Option<String>,
}

/// The CLI-path section.
#[derive(Debug, Serialize)]
pub(crate) struct CliPath {
    pub(crate) size: u64,
    pub(crate) rounds: u32,
    pub(crate) placement: String,
    /// Kernel TLS: what this kernel offers and which path the links used.
    pub(crate) ktls: String,
    pub(crate) rows: Vec<CliPathRow>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn temp_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("nettool-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// Measures plain TCP, socat (when installed) and `links` over the CLI path, `rounds` times
/// each, interleaved.
pub(crate) fn run(
    place: &Placement,
    links: &[String],
    modes: &[IoMode],
    size: u64,
    rounds: u32,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<CliPath> {
    let server = Server::start(place)?;
    let dir = temp_dir()?;
    let mut all: Vec<String> = vec!["plain-tcp".into()];
    if socat_available() {
        all.push(SOCAT.into());
    } else {
        progress("cli-path: socat is not installed, so the socat yardstick is left out");
    }
    // The yardsticks (plain TCP, socat) come first; RSS targets apply to the links only.
    let baselines = all.len();
    all.extend(
        links
            .iter()
            .filter(|l| *l != "plain-tcp" && *l != SOCAT)
            .cloned(),
    );
    let mut results: Vec<Vec<Transfer>> = vec![Vec::new(); all.len() * modes.len()];
    let limit = Duration::from_secs(30).max(Duration::from_secs_f64(size as f64 / 5e6));
    let mut seq = 0;
    for round in 0..rounds {
        for (li, link) in all.iter().enumerate() {
            for (mi, mode) in modes.iter().enumerate() {
                seq += 1;
                let t = transfer(place, &server, link, *mode, size, &dir, seq, limit)?;
                progress(&format!(
                    "cli-path round {}/{rounds}: {link} {}: {}",
                    round + 1,
                    mode.as_str(),
                    t.seconds.map_or_else(
                        || t.error.clone().unwrap_or_default(),
                        |s| format!("{:.3} s, peak RSS {} KiB", s, t.peak_rss_kib)
                    )
                ));
                results[li * modes.len() + mi].push(t);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = Vec::new();
    for (li, link) in all.iter().enumerate() {
        for (mi, mode) in modes.iter().enumerate() {
            let ts = &results[li * modes.len() + mi];
            let secs = median(ts.iter().filter_map(|t| t.seconds).collect());
            let plain = median(results[mi].iter().filter_map(|t| t.seconds).collect());
            let ratio = match (secs, plain) {
                (Some(s), Some(p)) if s > 0.0 && li > 0 => Some(p / s),
                _ => None,
            };
            let socat = (baselines > 1)
                .then(|| {
                    median(
                        results[modes.len() + mi]
                            .iter()
                            .filter_map(|t| t.seconds)
                            .collect(),
                    )
                })
                .flatten();
            let ratio_socat = match (secs, socat) {
                (Some(s), Some(y)) if s > 0.0 && li >= baselines => Some(y / s),
                _ => None,
            };
            let target = target_ratio(link);
            let rss_mb = ts.iter().map(|t| t.peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0;
            rows.push(CliPathRow {
                link: link.clone(),
                mode: *mode,
                runs: ts.len() as u32,
                seconds: secs,
                mb_per_s: secs.map(|s| size as f64 / s / 1e6),
                ratio,
                ratio_socat,
                target_ratio: target,
                verdict: match (target, ratio_socat.or(ratio)) {
                    (Some(t), Some(r)) => Verdict::of(r >= t),
                    (Some(_), None) => Verdict::Miss,
                    _ => Verdict::NotApplicable,
                },
                peak_rss_mb: rss_mb,
                rss_verdict: if li < baselines {
                    Verdict::NotApplicable
                } else {
                    Verdict::of(rss_mb > 0.0 && rss_mb <= TARGET_RSS_MB)
                },
                cpu_s_per_gib: [0, 1].map(|i| {
                    median(
                        ts.iter()
                            .filter(|t| t.seconds.is_some())
                            .filter_map(|t| t.cpu_seconds[i])
                            .map(|c| c * (1u64 << 30) as f64 / size as f64)
                            .collect(),
                    )
                }),
                server_cpu_s_per_gib: median(
                    ts.iter()
                        .filter(|t| t.seconds.is_some())
                        .filter_map(|t| t.server_cpu_seconds)
                        .map(|c| c * (1u64 << 30) as f64 / size as f64)
                        .collect(),
                ),
                error: ts.iter().find_map(|t| t.error.clone()),
            });
        }
    }
    Ok(CliPath {
        size,
        rounds,
        placement: place.describe(),
        ktls: format!(
            "{}; {}",
            nettool::bench_support::ktls_status(),
            nettool::bench_support::memcpy_status()
        ),
        rows,
    })
}

/// The soak: `runs` transfers of `size` bytes both ways at once over `link`.
#[derive(Debug, Serialize)]
pub(crate) struct Soak {
    pub(crate) link: String,
    pub(crate) size: u64,
    pub(crate) runs: u32,
    pub(crate) ok: u32,
    pub(crate) stalls: u32,
    pub(crate) failures: Vec<String>,
    pub(crate) median_seconds: Option<f64>,
    pub(crate) max_seconds: Option<f64>,
    pub(crate) peak_rss_mb: f64,
    pub(crate) verdict: Verdict,
}

/// Runs the soak.
pub(crate) fn soak(
    place: &Placement,
    link: &str,
    size: u64,
    runs: u32,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Soak> {
    let server = Server::start(place)?;
    let dir = temp_dir()?;
    let limit = Duration::from_secs(60).max(Duration::from_secs_f64(size as f64 / 2e6));
    let mut secs = Vec::new();
    let mut failures = Vec::new();
    let (mut stalls, mut rss) = (0, 0);
    for i in 0..runs {
        let t = transfer(
            place,
            &server,
            link,
            IoMode::Both,
            size,
            &dir,
            u64::from(i) + 1,
            limit,
        )?;
        rss = rss.max(t.peak_rss_kib);
        if t.stalled {
            stalls += 1;
        }
        match (&t.error, t.seconds) {
            (None, Some(s)) => secs.push(s),
            (e, _) => failures.push(format!("run {}: {}", i + 1, e.clone().unwrap_or_default())),
        }
        if (i + 1) % 10 == 0 || t.error.is_some() {
            progress(&format!(
                "soak {}/{runs}: {} ok, {} stalls, {} failed",
                i + 1,
                secs.len(),
                stalls,
                failures.len()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ok = secs.len() as u32;
    let max = secs
        .iter()
        .copied()
        .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
    Ok(Soak {
        link: link.to_owned(),
        size,
        runs,
        ok,
        stalls,
        failures,
        median_seconds: median(secs),
        max_seconds: max,
        peak_rss_mb: rss as f64 / 1024.0,
        verdict: Verdict::of(ok == runs && runs > 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_catches_wrong_and_misplaced_chunks() {
        let mut good = Vec::new();
        feed(&mut good, 3 * CHUNK as u64 + 100, 7).unwrap();
        let mut c = Checker::new(7);
        for piece in good.chunks(333_333) {
            c.take(piece);
        }
        assert!(c.bad.is_none());
        assert_eq!(c.at, good.len() as u64);

        // Chunks 1 and 2 swapped: same bytes otherwise, caught by the index.
        let mut swapped = good.clone();
        let (a, b) = swapped.split_at_mut(2 * CHUNK);
        a[CHUNK..].swap_with_slice(&mut b[..CHUNK]);
        let mut c = Checker::new(7);
        c.take(&swapped);
        assert!(c.bad.is_some());

        // One flipped byte.
        let mut flipped = good.clone();
        flipped[CHUNK + 12345] ^= 1;
        let mut c = Checker::new(7);
        c.take(&flipped);
        assert!(c.bad.is_some());
    }
}
