//! Helpers shared by the end-to-end tests: finding the `nettool` binary, running it with a
//! guard that kills it on drop, test data and checksums.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The `nettool` binary: `NETTOOL_BIN`, else the one cargo built next to this test binary
/// (`cargo test --workspace` builds it, because the cli package has integration tests). Fails
/// clearly when that binary is older than the sources it is built from (a stale build, e.g.
/// after `cargo test -p nettool-tests` alone).
pub(crate) fn nettool_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NETTOOL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("nettool");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (which builds the binary) \
         or set NETTOOL_BIN",
        bin.display()
    );
    static FRESH: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if let Err(e) = FRESH.get_or_init(|| check_fresh(&bin, "nettool", NETTOOL_SOURCES)) {
        panic!("{e}");
    }
    bin
}

/// The source directories the `nettool` binary is built from.
const NETTOOL_SOURCES: &[&str] = &[
    "core/src",
    "strategies/src",
    "config/src",
    "cli/src",
    "portmap/src",
];

/// The `nettool-bench` binary (the benchmarks): the one next to [`nettool_bin`] (cargo builds
/// both into the same directory; `cargo build -p nettool-bench` builds it). It runs that
/// `nettool` for its child processes (NETTOOL_BIN, which it inherits, else its neighbour).
pub(crate) fn nettool_bench_bin() -> PathBuf {
    let bin = nettool_bin().with_file_name("nettool-bench");
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build -p nettool-bench` (next to the nettool binary)",
        bin.display()
    );
    let mut sources = NETTOOL_SOURCES.to_vec();
    sources.push("bench/src");
    if let Err(e) = check_fresh(&bin, "nettool-bench", &sources) {
        panic!("{e}");
    }
    bin
}

/// The `nettool-embed` binary (examples/embed, on the `nettool-peer` library), next to
/// [`nettool_bin`] (`cargo build -p nettool-embed` builds it; `cargo test --workspace` too).
pub(crate) fn nettool_embed_bin() -> PathBuf {
    let bin = nettool_bin().with_file_name("nettool-embed");
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build -p nettool-embed` (next to the nettool binary)",
        bin.display()
    );
    let sources = [
        "core/src",
        "strategies/src",
        "peer/src",
        "examples/embed/src",
    ];
    if let Err(e) = check_fresh(&bin, "nettool-embed", &sources) {
        panic!("{e}");
    }
    bin
}

/// Errs when a source file of the binary (under `sources`, of the package `package`) is newer
/// than the binary.
fn check_fresh(bin: &Path, package: &str, sources: &[&str]) -> Result<(), String> {
    fn newest(dir: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                newest(&path, best);
            } else if path.extension().is_some_and(|x| x == "rs" || x == "toml") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if best.as_ref().is_none_or(|(b, _)| t > *b) {
                        *best = Some((t, path));
                    }
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut best = None;
    for krate in sources {
        newest(&root.join(krate), &mut best);
    }
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    match best {
        Some((t, src)) if t > built => Err(format!(
            "{} is stale: {} changed after it was built; run `cargo build -p {package}` or the \
             tests with `cargo test --workspace`",
            bin.display(),
            src.display()
        )),
        _ => Ok(()),
    }
}

/// A child process killed (and reaped) when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        Self { child }
    }

    /// Waits up to `limit` for the process to exit.
    pub(crate) fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads the child's stderr until a line containing `needle`; returns that line.
    pub(crate) fn stderr_line_containing(&mut self, needle: &str) -> String {
        let stderr = self.child.stderr.take().expect("stderr piped");
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read stderr");
            assert!(n > 0, "process ended before printing {needle:?}");
            if line.contains(needle) {
                // Keep draining in the background so the child never blocks on stderr.
                std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = reader.read_to_end(&mut sink);
                });
                return line;
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) use nettool_tests::test_data;

pub(crate) fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A fresh temporary directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "nettool-e2e-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A subdirectory, removed with this one.
    pub(crate) fn sub(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::create_dir_all(&p).expect("create temp subdir");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test: show what its processes said (their stderr files), so a failure
            // in CI can be read without rerunning it.
            let mut files: Vec<PathBuf> = std::fs::read_dir(&self.0)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "err" || x == "log"))
                .collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let mut start = text.len().saturating_sub(6000);
                while !text.is_char_boundary(start) {
                    start += 1;
                }
                let tail = &text[start..];
                eprintln!(
                    "---- {} (last {} bytes) ----\n{tail}",
                    f.display(),
                    tail.len()
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The outcome of one `nettool connect` run.
#[derive(Debug)]
pub(crate) struct PeerRun {
    pub(crate) status: Option<ExitStatus>,
    pub(crate) report: Option<serde_json::Value>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: String,
}

impl PeerRun {
    pub(crate) fn strategy(&self) -> Option<&str> {
        self.report.as_ref()?.get("strategy")?.as_str()
    }

    pub(crate) fn first_attempt(&self) -> Option<&serde_json::Value> {
        self.report.as_ref()?.get("attempts")?.get(0)
    }
}

/// Starts `nettool connect` through `cmd` (already holding the program, e.g. wrapped in
/// `ip netns exec`), feeding `input` from a file and capturing stdout, stderr and the report.
pub(crate) fn spawn_peer(
    mut cmd: Command,
    dir: &TempDir,
    name: &str,
    input: &[u8],
    args: &[String],
) -> (Proc, PathBuf) {
    let input_path = dir.path(&format!("{name}.in"));
    std::fs::write(&input_path, input).expect("write input");
    let report = dir.path(&format!("{name}.report.json"));
    // The tests built on this helper assert what the strategy ladder does (which strategy
    // links which pair, the plan, the attempts), so they run it as `--no-relay-first` does;
    // relay-first's own tests (relay_first.rs) set NETTOOL_RELAY_FIRST themselves.
    if !cmd.get_envs().any(|(k, _)| k == "NETTOOL_RELAY_FIRST") {
        cmd.env("NETTOOL_RELAY_FIRST", "false");
    }
    cmd.arg("connect")
        .args(args)
        .arg("--report")
        .arg(&report)
        .stdin(std::fs::File::open(&input_path).expect("open input"))
        .stdout(std::fs::File::create(dir.path(&format!("{name}.out"))).expect("create out"))
        .stderr(std::fs::File::create(dir.path(&format!("{name}.err"))).expect("create err"));
    (Proc::spawn(cmd), report)
}

/// Waits until a peer started with [`spawn_peer`] has joined its session and waits for the
/// other (its stderr says so): the way to order the two peers' roles without sleeping.
pub(crate) fn wait_until_waiting(dir: &TempDir, name: &str) {
    let path = dir.path(&format!("{name}.err"));
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("waiting for the peer") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "peer {name} did not join within 20 s: {text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a peer started with [`spawn_peer`] and collects what it produced.
pub(crate) fn finish_peer(mut proc: Proc, dir: &TempDir, name: &str, limit: Duration) -> PeerRun {
    let status = proc.wait_timeout(limit);
    drop(proc);
    let report = std::fs::read(dir.path(&format!("{name}.report.json")))
        .ok()
        .map(|b| serde_json::from_slice(&b).expect("report is valid JSON"));
    PeerRun {
        status,
        report,
        stdout: std::fs::read(dir.path(&format!("{name}.out"))).unwrap_or_default(),
        stderr: std::fs::read_to_string(dir.path(&format!("{name}.err"))).unwrap_or_default(),
    }
}

/// Starts `nettool rendezvous` (with `extra` flags, e.g. `--legacy`) on a free loopback port;
/// returns the process and its address.
pub(crate) fn loopback_rendezvous(extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(nettool_bin());
    cmd.args(["rendezvous", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut proc = Proc::spawn(cmd);
    let line = proc.stderr_line_containing("listening on");
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .expect("address in the listening line")
        .to_owned();
    (proc, addr)
}

/// A lab pair from the environment variable `var` ("a,b", e.g. "fw,none"), or `default`.
pub(crate) fn kinds_from_env(
    var: &str,
    default: &str,
) -> (nettool_tests::NatKind, nettool_tests::NatKind) {
    let kinds = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    kinds
        .split_once(',')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .unwrap_or_else(|| panic!("{var}={kinds}: expected two kinds, e.g. fw,none"))
}

/// Writes `data` to `w` in `steps` equal pieces spread over `pace` (a stream still flowing
/// when something happens to the path); stops early when the reader is gone.
pub(crate) fn feed_paced(mut w: impl std::io::Write, data: &[u8], steps: u32, pace: Duration) {
    let step = data.len().div_ceil(steps as usize).max(1);
    let began = Instant::now();
    for (i, chunk) in data.chunks(step).enumerate() {
        let due = began + pace * (i as u32) / steps;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if w.write_all(chunk).is_err() {
            return;
        }
    }
}

/// tcpdump on `host`'s router WAN, writing to `pcap`; started when it says it listens.
pub(crate) fn capture(
    lab: &nettool_tests::Lab,
    host: nettool_tests::Host,
    dir: &TempDir,
    pcap: &std::path::Path,
) -> Proc {
    let router = lab.router_netns(host).expect("the host has a router");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", router, "tcpdump", "-i", "wan", "-n", "-U"])
        .args([
            "--immediate-mode",
            "-B",
            "8192",
            "-Z",
            "root",
            "-s",
            "0",
            "-w",
        ])
        .arg(pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path("tcpdump.err")).unwrap());
    let proc = Proc::spawn(cmd);
    let log = || std::fs::read_to_string(dir.path("tcpdump.err")).unwrap_or_default();
    let started = Instant::now();
    while !log().contains("listening on") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "tcpdump did not start (CI installs it: see .ci/run): {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

/// Stops tcpdump cleanly (SIGINT: everything it saw is in the file) and reads the capture.
pub(crate) fn stop_capture(mut capture: Proc, pcap: &std::path::Path) -> Vec<u8> {
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &capture.child.id().to_string()])
        .status();
    let _ = capture.wait_timeout(Duration::from_secs(5));
    drop(capture);
    std::fs::read(pcap).expect("capture file")
}
