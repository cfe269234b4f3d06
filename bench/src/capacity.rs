//! Rendezvous capacity: pairings per second, CPU per pairing, memory per waiting session.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nettool_core::control::{secure, ControlIo, ControlSecurity, ServerTrust};
use nettool_core::protocol::PROTOCOL_VERSION;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use super::cli_path::proc_status_kib;
use super::server_proc::ServerProc;
use super::{BenchArgs, Capacity, MemoryRow, PairingRate, Verdict};

/// Open files this process may have; raised (soft, and hard when allowed) towards `want`.
/// Returns the soft limit in force afterwards and why it is lower than `want`, if it is.
pub(super) fn raise_nofile(want: u64) -> (u64, Option<String>) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (0, Some("getrlimit(RLIMIT_NOFILE) failed".into()));
    }
    let cur = lim.rlim_cur;
    if cur >= want {
        return (cur, None);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    let hard_wanted = want.min(nr_open).max(lim.rlim_max);
    let try_set = |soft: u64, hard: u64| {
        let l = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct we pass.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 }
    };
    if try_set(want.min(hard_wanted), hard_wanted) {
        let got = want.min(hard_wanted);
        let why = (got < want).then(|| format!("/proc/sys/fs/nr_open is {nr_open}"));
        return (got, why);
    }
    let err = std::io::Error::last_os_error();
    let hard = lim.rlim_max;
    let soft = want.min(hard);
    if soft > cur && try_set(soft, hard) {
        return (
            soft,
            Some(format!(
                "the hard RLIMIT_NOFILE is {hard} and raising it failed ({err}; root may raise it up to /proc/sys/fs/nr_open = {nr_open})"
            )),
        );
    }
    (
        cur,
        Some(format!(
            "RLIMIT_NOFILE is {cur} (hard {hard}) and raising it failed ({err})"
        )),
    )
}

/// utime + stime of a process, seconds.
pub(super) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at the state (field 3).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

pub(super) async fn capacity(args: &BenchArgs, progress: &dyn Fn(&str)) -> (Capacity, Vec<String>) {
    let mut notes = Vec::new();
    let biggest = args.sessions.iter().copied().max().unwrap_or(0);
    let margin = 2 * args.concurrency as u64 + 1024;
    let (limit, why_low) = raise_nofile(biggest + margin);
    if let Some(why) = &why_low {
        notes.push(format!("open files: {why}"));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    progress(&format!(
        "capacity: {} pairings, {} in flight ...",
        args.pairings, args.concurrency
    ));
    let pairing = pairing_rate(args.pairings, args.concurrency, cores, false).await;
    progress(&format!(
        "capacity: {} pairings over TLS, {} in flight ...",
        args.pairings, args.concurrency
    ));
    let pairing_tls = pairing_rate(args.pairings, args.concurrency, cores, true).await;
    notes.push(format!(
        "pairings over TLS: every client runs the real control channel's TLS handshake (any \
         server key accepted) and so costs this machine as much CPU as the server; the target \
         ({TARGET_TLS_PAIRINGS_PER_SECOND:.0}/s on {cores} cores) is on the server-only figure"
    ));
    notes.push(format!(
        "pairings: clients (in this process) and the server (a child process) share {cores} \
         cores; \"server-only\" extrapolates the server's CPU time per pairing to {cores} cores \
         of its own"
    ));
    let mut memory = Vec::new();
    // Plain joins at every size asked for, then the smallest size again over TLS (the
    // control channel's cost per waiting session; the 100k figure projects from it).
    let tls_size = args.sessions.iter().copied().min();
    let runs = args
        .sessions
        .iter()
        .map(|&n| (false, n))
        .chain(tls_size.map(|n| (true, n)));
    for (tls, n) in runs {
        let over = if tls { " over TLS" } else { "" };
        progress(&format!("capacity: {n} waiting sessions{over} ..."));
        memory.push(
            waiting_sessions(
                tls,
                n,
                limit.saturating_sub(margin),
                why_low.as_deref(),
                args.concurrency,
            )
            .await,
        );
    }
    notes.push(
        "memory: the rendezvous server's VmRSS (a child process, so the clients' memory is not \
         counted); kernel socket memory is not in RSS"
            .into(),
    );
    (
        Capacity {
            nofile_limit: limit,
            pairing: Some(pairing),
            pairing_tls: Some(pairing_tls),
            memory,
        },
        notes,
    )
}

/// Pairings per second through a server in a child process: two raw joins per session (over
/// the control channel's TLS when `tls`), `concurrency` sessions at a time.
async fn pairing_rate(total: u64, concurrency: usize, cores: usize, tls: bool) -> PairingRate {
    let mut rate = PairingRate {
        tls,
        pairings: 0,
        failed: 0,
        concurrency,
        seconds: 0.0,
        per_second: 0.0,
        server_cpu_seconds: 0.0,
        client_cpu_seconds: 0.0,
        server_only_per_second: None,
        cores,
        target_per_second: if tls {
            TARGET_TLS_PAIRINGS_PER_SECOND
        } else {
            TARGET_PAIRINGS_PER_SECOND
        },
        verdict: Verdict::Miss,
        error: None,
    };
    let server = match ServerProc::spawn(&[]).await {
        Ok(s) => s,
        Err(e) => {
            rate.error = Some(format!("starting the server: {e:#}"));
            return rate;
        }
    };
    let addr = server.addr;
    let tag = std::process::id();
    let server_cpu0 = proc_cpu_seconds(server.pid()).unwrap_or(0.0);
    let own_cpu0 = proc_cpu_seconds(std::process::id()).unwrap_or(0.0);
    let start = Instant::now();
    let run = run_pairings(total, concurrency, move |i| {
        let session = format!("pair-{tag}-{i}");
        async move {
            let (a, b) = tokio::join!(
                raw_join_over(addr, None, session.clone(), "paired", tls),
                raw_join_over(addr, None, session.clone(), "paired", tls),
            );
            a.and(b).map(|_| ())
        }
    })
    .await;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let server_cpu = proc_cpu_seconds(server.pid()).unwrap_or(0.0) - server_cpu0;
    let own_cpu = proc_cpu_seconds(std::process::id()).unwrap_or(0.0) - own_cpu0;
    rate.pairings = run.done;
    rate.failed = run.failed;
    rate.seconds = secs;
    rate.per_second = rate.pairings as f64 / secs;
    rate.server_cpu_seconds = server_cpu;
    rate.client_cpu_seconds = own_cpu;
    rate.server_only_per_second =
        (server_cpu > 0.0).then(|| rate.pairings as f64 / server_cpu * cores as f64);
    rate.error = run.first_error;
    // Over TLS the clients' handshakes cost this machine as much as the server's: the
    // server-only figure is the server's capacity.
    let measured = if tls {
        rate.server_only_per_second.unwrap_or(0.0)
    } else {
        rate.per_second
    };
    rate.verdict = Verdict::of(rate.failed == 0 && measured >= rate.target_per_second);
    rate
}

/// What [`run_pairings`] counted.
pub(super) struct PairingRun {
    pub(super) done: u64,
    pub(super) failed: u64,
    pub(super) first_error: Option<String>,
}

/// Runs `pair(i)` for i in 0..total, `concurrency` at a time, each within 30 s; counts the
/// pairings that succeeded and failed, and keeps the first error.
pub(super) async fn run_pairings<F, Fut>(total: u64, concurrency: usize, pair: F) -> PairingRun
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (next, done, failed, first_error, pair) = (
            next.clone(),
            done.clone(),
            failed.clone(),
            first_error.clone(),
            pair.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let res = match tokio::time::timeout(Duration::from_secs(30), pair(i)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("no pairing within 30 s")),
                };
                match res {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .expect("error lock")
                            .get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let first_error = first_error.lock().expect("error lock").take();
    PairingRun {
        done: done.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        first_error,
    }
}

/// Opens one control connection (from `src` when given) and joins `session` with a hand-written
/// join frame; returns once the server sent a frame of type `until` (`waiting`, `paired`).
///
/// Not the real client (`RendezvousClient::join`): the clients here must be cheap and leave no
/// TIME_WAIT behind (zero linger: closing sends a reset), or the benchmark would measure the
/// kernel's search for a free ephemeral port instead of the server. The server does the same
/// work either way.
pub(super) async fn raw_join(
    server: SocketAddr,
    src: Option<Ipv4Addr>,
    session: String,
    until: &str,
) -> Result<Box<dyn ControlIo>> {
    raw_join_over(server, src, session, until, false).await
}

/// As [`raw_join`], over the control channel's TLS when `tls` (the real client's handshake,
/// any server key accepted): what a waiting TLS session costs the server.
pub(super) async fn raw_join_over(
    server: SocketAddr,
    src: Option<Ipv4Addr>,
    session: String,
    until: &str,
    tls: bool,
) -> Result<Box<dyn ControlIo>> {
    let socket = TcpSocket::new_v4()?;
    socket.set_zero_linger()?;
    if let Some(src) = src {
        // Pick the port at connect time, unique per 4-tuple, not at bind time (where every
        // source address would share one range and each bind scans it).
        let one: libc::c_int = 1;
        // SAFETY: the fd is valid for the call; the option value is a c_int we own.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
        }
        socket
            .bind(SocketAddr::new(src.into(), 0))
            .with_context(|| format!("binding a client socket on {src}"))?;
    }
    let _ = socket.set_nodelay(true);
    let stream = socket.connect(server).await.context("connecting")?;
    let security = if tls {
        ControlSecurity::Tls(Arc::new(ServerTrust::new(None, None, None)))
    } else {
        ControlSecurity::Plain
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut stream = secure(stream, server, &security, deadline)
        .await
        .context("the control channel's TLS")?;
    // Written by hand (the fields every server version takes) rather than built from the
    // message type, so the figure does not depend on optional fields added later.
    let join = serde_json::json!({
        "type": "join",
        "version": PROTOCOL_VERSION,
        "session": session,
        "strategies": ["relay"],
    });
    stream.write_all(format!("{join}\n").as_bytes()).await?;
    stream.flush().await?;
    let want = format!("\"type\":\"{until}\"");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if text.contains(&want) {
            return Ok(stream);
        }
        if text.contains("\"type\":\"error\"") {
            bail!("refused: {}", text.trim());
        }
    }
}

async fn waiting_sessions(
    tls: bool,
    n: u64,
    fd_budget: u64,
    why_low: Option<&str>,
    concurrency: usize,
) -> MemoryRow {
    let mut row = MemoryRow {
        tls,
        sessions: n,
        reached: 0,
        rss_before_kib: None,
        rss_after_kib: None,
        bytes_per_session: None,
        projected_100k_mb: None,
        target_100k_mb: TARGET_100K_MB,
        target_session_bytes: tls.then_some(TARGET_TLS_SESSION_BYTES),
        verdict: Verdict::NotApplicable,
        projected_verdict: Verdict::NotApplicable,
        error: None,
    };
    let goal = n.min(fd_budget);
    if goal < n {
        row.error = Some(format!(
            "only {goal} of {n} sessions fit in the open-file limit: {}",
            why_low.unwrap_or("RLIMIT_NOFILE too low")
        ));
    }
    let server = match ServerProc::spawn(&["--session-expiry", "1h"]).await {
        Ok(s) => s,
        Err(e) => {
            row.error = Some(format!("starting the server: {e:#}"));
            row.verdict = Verdict::Miss;
            return row;
        }
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    row.rss_before_kib = proc_status_kib(server.pid(), "VmRSS:");
    let tag = std::process::id();
    // One source address per 10k connections: each address has its own ephemeral ports.
    let mut streams = Vec::with_capacity(goal as usize);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    let mut failure = None;
    while i < goal || !tasks.is_empty() {
        while i < goal && tasks.len() < concurrency.max(1) && failure.is_none() {
            let src = Ipv4Addr::new(127, 0, 0, (2 + i / 10_000 % 250) as u8);
            tasks.spawn(raw_join_over(
                server.addr,
                Some(src),
                format!("wait-{tag}-{i}"),
                "waiting",
                tls,
            ));
            i += 1;
        }
        match tasks.join_next().await {
            Some(Ok(Ok(s))) => streams.push(s),
            Some(Ok(Err(e))) => {
                failure.get_or_insert_with(|| format!("{e:#}"));
            }
            Some(Err(e)) => {
                failure.get_or_insert_with(|| e.to_string());
            }
            None => break,
        }
        if failure.is_some() && i < goal {
            // Stop opening more; drain what is in flight.
            i = goal;
        }
    }
    row.reached = streams.len() as u64;
    tokio::time::sleep(Duration::from_millis(300)).await;
    row.rss_after_kib = proc_status_kib(server.pid(), "VmRSS:");
    if let Some(f) = failure {
        let msg = format!("reached {} of {n} sessions: {f}", row.reached);
        row.error = Some(match row.error.take() {
            Some(e) => format!("{e}; {msg}"),
            None => msg,
        });
    }
    if let (Some(b), Some(a)) = (row.rss_before_kib, row.rss_after_kib) {
        if row.reached > 0 {
            let per = (a.saturating_sub(b) * 1024) as f64 / row.reached as f64;
            row.bytes_per_session = Some(per);
            row.projected_100k_mb = Some((b * 1024) as f64 / 1e6 + per * 100_000.0 / 1e6);
        }
    }
    if tls {
        // What each waiting TLS session costs the server, against its own target.
        row.verdict = row.bytes_per_session.map_or(Verdict::Miss, |b| {
            Verdict::of(b <= TARGET_TLS_SESSION_BYTES)
        });
    } else if n >= 100_000 {
        match row.rss_after_kib {
            Some(a) if row.reached >= 100_000 => {
                row.verdict = Verdict::of((a * 1024) as f64 / 1e6 <= TARGET_100K_MB);
            }
            _ => {
                row.projected_verdict = row
                    .projected_100k_mb
                    .map_or(Verdict::Miss, |mb| Verdict::of(mb <= TARGET_100K_MB));
            }
        }
    }
    drop(streams);
    drop(server);
    row
}

const TARGET_PAIRINGS_PER_SECOND: f64 = 10_000.0;
/// Pairings per second over the control channel's TLS, server-only on this machine's cores.
const TARGET_TLS_PAIRINGS_PER_SECOND: f64 = 5_000.0;
const TARGET_100K_MB: f64 = 500.0;
/// Server memory per waiting session over the control channel's TLS, bytes.
const TARGET_TLS_SESSION_BYTES: f64 = 6_000.0;
