//! The original demo's protocol (`--legacy`) and its hello-world exchange (`--hello`): nettool
//! clients against an original-style server written here, original-style clients written here
//! against nettool, and two nettool clients through `rendezvous --legacy` on loopback and
//! through the NAT lab.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nettool_tests::{require_lab, Host, Lab, NatKind};

use crate::support::{nettool_bin, Proc, TempDir};

const SEND_LINE: &str = "send message: Hello, world";
const RECV_LINE: &str = "recv message: Hello, world";

/// A `nettool` process with stdout and stderr in files of `dir`.
struct Peer {
    proc: Proc,
    name: String,
}

struct PeerOutput {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl PeerOutput {
    fn count(&self, line: &str) -> usize {
        self.stdout.lines().filter(|l| *l == line).count()
    }
}

impl Peer {
    fn spawn(mut cmd: Command, dir: &TempDir, name: &str, args: &[&str]) -> Self {
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path(&format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.path(&format!("{name}.err"))).unwrap());
        Self {
            proc: Proc::spawn(cmd),
            name: name.to_owned(),
        }
    }

    fn finish(mut self, dir: &TempDir, limit: Duration) -> PeerOutput {
        let status = self.proc.wait_timeout(limit);
        drop(self.proc);
        PeerOutput {
            status,
            stdout: std::fs::read_to_string(dir.path(&format!("{}.out", self.name)))
                .unwrap_or_default(),
            stderr: std::fs::read_to_string(dir.path(&format!("{}.err", self.name)))
                .unwrap_or_default(),
        }
    }
}

/// Waits until the file contains `needle` (panics after `limit`).
fn wait_for_text(path: &Path, needle: &str, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{} never contained {needle:?}: {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `connect --legacy --hello` arguments.
fn hello_args<'a>(server: &'a str, count: &'a str) -> Vec<&'a str> {
    let mut v = vec![
        "connect",
        "--legacy",
        "--server",
        server,
        "--hello",
        "--timeout",
        "20s",
    ];
    if !count.is_empty() {
        v.extend(["--hello-count", count]);
    }
    v
}

/// Starts the first client (and waits until the server told it "first"), then the second;
/// returns both outputs.
fn run_pair(a_cmd: Command, b_cmd: Command, server: &str, tag: &str) -> (PeerOutput, PeerOutput) {
    let dir = TempDir::new(tag);
    let args = hello_args(server, "3");
    let a = Peer::spawn(a_cmd, &dir, "a", &args);
    wait_for_text(
        &dir.path("a.err"),
        "told \"first\"",
        Duration::from_secs(10),
    );
    let b = Peer::spawn(b_cmd, &dir, "b", &args);
    let a = a.finish(&dir, Duration::from_secs(30));
    let b = b.finish(&dir, Duration::from_secs(30));
    (a, b)
}

fn assert_hellos(a: &PeerOutput, b: &PeerOutput) {
    let what = format!(
        "first: {:?}\n{}{}second: {:?}\n{}{}",
        a.status, a.stdout, a.stderr, b.status, b.stdout, b.stderr
    );
    assert!(
        a.status.is_some_and(|s| s.success()),
        "first failed: {what}"
    );
    assert!(
        b.status.is_some_and(|s| s.success()),
        "second failed: {what}"
    );
    assert!(a.count(SEND_LINE) >= 2, "first sent too little: {what}");
    assert!(
        b.count(RECV_LINE) >= 2,
        "second received too little: {what}"
    );
    assert!(
        b.stdout.lines().all(|l| l == RECV_LINE),
        "unexpected output: {what}"
    );
}

/// An original-style server: one pair, exact bytes (written in pieces, as a slow server's
/// writes may arrive), then both closed.
fn original_server() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut a, a_addr) = listener.accept().unwrap();
        a.write_all(b"first\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        a.write_all(b"\0").unwrap();
        let (mut b, b_addr) = listener.accept().unwrap();
        let to_b = format!("{} {} {}\n\0", a_addr.ip(), a_addr.port(), b_addr.port());
        let (head, tail) = to_b.as_bytes().split_at(5);
        b.write_all(head).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        b.write_all(tail).unwrap();
        a.write_all(format!("{} {}\n\0", b_addr.ip(), b_addr.port()).as_bytes())
            .unwrap();
        drop(a);
        drop(b);
    });
    (addr, handle)
}

#[test]
fn legacy_clients_work_with_an_original_style_server() {
    let (addr, server) = original_server();
    let server_arg = addr.to_string();
    let (a, b) = run_pair(
        Command::new(nettool_bin()),
        Command::new(nettool_bin()),
        &server_arg,
        "legacy-orig-server",
    );
    server.join().unwrap();
    assert_hellos(&a, &b);
}

/// `nettool rendezvous --legacy` on a free loopback port.
fn legacy_rendezvous() -> (Proc, String) {
    crate::support::loopback_rendezvous(&["--legacy"])
}

#[test]
fn legacy_clients_link_through_rendezvous_legacy_on_loopback() {
    let (_server, addr) = legacy_rendezvous();
    // Two pairs in a row through the same server.
    for i in 0..2 {
        let (a, b) = run_pair(
            Command::new(nettool_bin()),
            Command::new(nettool_bin()),
            &addr,
            &format!("legacy-loop-{i}"),
        );
        assert_hellos(&a, &b);
    }
}

/// Reads from `s` until `line` (NULs dropped) is complete; the line, without its newline.
fn read_line(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = s.read(&mut byte).unwrap();
        assert!(n > 0, "closed before a full line: {got:?}");
        match byte[0] {
            b'\n' if !got.is_empty() => return String::from_utf8(got).unwrap(),
            b'\n' | 0 => {}
            b => got.push(b),
        }
    }
}

/// Connects to the server from a port taken with an explicit bind (SO_REUSEADDR), as the
/// original client does. An explicitly bound port is never handed to another process's
/// `connect()` as its ephemeral port; a port picked by `connect()` can be, and a parallel
/// test's connection on it made the later `listen` fail with "address in use".
fn connect_from_bound_port(server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.connect(&server.into())?;
    Ok(socket.into())
}

/// A loopback listener with SO_REUSEADDR, as the original client makes it.
fn listen_reusing(port: u16) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(8)?;
    Ok(socket.into())
}

#[test]
fn original_style_clients_talk_to_nettool_clients() {
    let (_server, addr) = legacy_rendezvous();
    let server: SocketAddr = addr.parse().unwrap();

    // An original first client, from fresh ephemeral ports, and a nettool second.
    let dir = TempDir::new("legacy-orig-first");
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(read_line(&mut s), "first");
    let b = Peer::spawn(
        Command::new(nettool_bin()),
        &dir,
        "b",
        &hello_args(&addr, ""),
    );
    let line = read_line(&mut s);
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words.len(), 2, "{line:?}");
    let peer = SocketAddr::new(words[0].parse().unwrap(), words[1].parse().unwrap());
    drop(s);
    let end = Instant::now() + Duration::from_secs(10);
    let mut link = loop {
        match TcpStream::connect(peer) {
            Ok(link) => break link,
            Err(e) => {
                assert!(Instant::now() < end, "cannot reach the nettool second: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    // Rough edges: one message, then two merged, then one split, extra NULs.
    link.write_all(b"Hello, world\n\0").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    link.write_all(b"Hello, world\n\0Hello, world\n\0\0")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    link.write_all(b"Hello, ").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    link.write_all(b"world\n\0").unwrap();
    drop(link);
    let b = b.finish(&dir, Duration::from_secs(20));
    assert!(b.status.is_some_and(|s| s.success()), "{}", b.stderr);
    assert_eq!(b.count(RECV_LINE), 4, "{}\n{}", b.stdout, b.stderr);

    // A nettool first and an original second, which listens on its port as the server saw it.
    let dir = TempDir::new("legacy-orig-second");
    let a = Peer::spawn(
        Command::new(nettool_bin()),
        &dir,
        "a",
        &hello_args(&addr, ""),
    );
    wait_for_text(
        &dir.path("a.err"),
        "told \"first\"",
        Duration::from_secs(10),
    );
    let mut s = connect_from_bound_port(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let line = read_line(&mut s);
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words.len(), 3, "{line:?}");
    let own_port: u16 = words[2].parse().unwrap();
    assert_eq!(own_port, s.local_addr().unwrap().port());
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap(); // the server closes
    assert!(rest.iter().all(|b| *b == 0), "{rest:?}");
    drop(s);
    // Listen on the same port, as an original client does (SO_REUSEADDR); retry briefly while
    // our side of the server connection is still closing.
    let bind_until = std::time::Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match listen_reusing(own_port) {
            Ok(l) => break l,
            Err(e) if std::time::Instant::now() < bind_until => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot listen on port {own_port}: {e}"),
        }
    };
    let (mut link, _) = listener.accept().unwrap();
    link.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.windows(14).filter(|w| w == b"Hello, world\n\0").count() < 2 {
        let n = link.read(&mut buf).unwrap();
        assert!(n > 0, "nettool closed early: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    drop(link);
    let a = a.finish(&dir, Duration::from_secs(20));
    assert!(a.status.is_some_and(|s| s.success()), "{}", a.stderr);
    assert!(a.count(SEND_LINE) >= 2, "{}\n{}", a.stdout, a.stderr);
}

/// The lab with `nettool rendezvous --legacy` on 8877 in its server namespace.
fn legacy_lab_pair(a_kind: NatKind, b_kind: NatKind) -> (PeerOutput, PeerOutput) {
    let lab = Lab::new(a_kind, b_kind)
        .unwrap_or_else(|e| panic!("cannot build the lab {a_kind} x {b_kind}: {e}"));
    let mut cmd = lab.command(Host::Server, nettool_bin());
    cmd.args(["rendezvous", "--legacy", "--listen", "0.0.0.0:8877"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = Proc::spawn(cmd);
    server.stderr_line_containing("listening on");
    let addr = format!("{}:8877", lab.server_ip());
    let out = run_pair(
        lab.command(Host::A, nettool_bin()),
        lab.command(Host::B, nettool_bin()),
        &addr,
        &format!("legacy-lab-{a_kind}-{b_kind}"),
    );
    drop(server);
    out
}

#[test]
fn legacy_clients_punch_through_cone_nats() {
    if !require_lab() {
        return;
    }
    for (a, b) in [(NatKind::Cone, NatKind::Cone), (NatKind::Fw, NatKind::Cone)] {
        let (ra, rb) = legacy_lab_pair(a, b);
        eprintln!("legacy {a} x {b}: a: {}b: {}", ra.stderr, rb.stderr);
        assert_hellos(&ra, &rb);
    }
}
