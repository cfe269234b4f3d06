//! Two rendezvous nodes sharing sessions through Redis (`nettool rendezvous --cluster`), on
//! loopback with two addresses: node 1 on 127.0.0.1, node 2 on 127.0.0.2, and a
//! `redis-server` (Debian's) started by each test on a free port, without persistence, killed
//! when the test ends.
//!
//! Without `redis-server` installed these tests print why and pass, unless CI or
//! `NETTOOL_REQUIRE_LAB` is set: then they fail.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::client::{ClientError, Pairing, RendezvousClient};
use nettool_core::control::{ControlSecurity, ServerTrust};

use crate::support::{
    finish_peer, nettool_bin, sha256, spawn_peer, test_data, wait_until_waiting, Proc, TempDir,
};

/// A `redis-server` child on a free loopback port; killed when dropped.
struct Redis {
    _proc: Proc,
    url: String,
    _dir: TempDir,
}

impl Redis {
    /// Starts one, or says why not (and then the test skips, outside CI).
    fn start() -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            let reason = "redis-server is not installed (Debian: apt-get install redis-server)";
            if std::env::var_os("CI").is_some() || std::env::var_os("NETTOOL_REQUIRE_LAB").is_some()
            {
                panic!("redis-server required (CI or NETTOOL_REQUIRE_LAB set): {reason}");
            }
            eprintln!("skipping: {reason}");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = TempDir::new("redis");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let proc = Proc::spawn(cmd);
        let url = format!("redis://127.0.0.1:{port}");
        let redis = Self {
            _proc: proc,
            url,
            _dir: dir,
        };
        let start = Instant::now();
        while redis.conn_once().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not answer on port {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    fn conn_once(&self) -> redis::RedisResult<redis::Connection> {
        let mut c = redis::Client::open(self.url.as_str())?.get_connection()?;
        redis::cmd("PING").query::<String>(&mut c)?;
        Ok(c)
    }

    /// Every nettool key and its value (SCAN, not KEYS).
    fn nettool_keys(&self) -> Vec<(String, String)> {
        let mut c = self.conn_once().expect("redis connection");
        let keys: Vec<String> = c
            .scan_match::<_, String>("nettool:*")
            .expect("SCAN")
            .collect();
        let mut out = Vec::new();
        for k in keys {
            let v: Option<String> = redis::cmd("GET").arg(&k).query(&mut c).expect("GET");
            if let Some(v) = v {
                out.push((k, v));
            }
        }
        out
    }
}

use redis::Commands as _;

/// A join over the control channel's TLS, as `nettool connect` makes it (any server key is
/// accepted: these tests are about the cluster, `control.rs` about the keys).
async fn join(
    server: SocketAddr,
    session: &str,
    names: &[String],
    deadline: Instant,
    on_waiting: impl FnOnce(),
) -> Result<(RendezvousClient, Pairing), ClientError> {
    let tls = ControlSecurity::Tls(Arc::new(ServerTrust::new(None, None, None)));
    RendezvousClient::join_any(&[server], &tls, session, names, None, deadline, on_waiting).await
}

/// A `nettool rendezvous --cluster` node.
struct Node {
    proc: Proc,
    addr: SocketAddr,
    id: String,
    /// Where it serves `/metrics` and `/healthz` (with `--metrics` in `extra`).
    metrics: Option<SocketAddr>,
}

impl Node {
    fn start(ip: &str, redis: &Redis, extra: &[&str]) -> Self {
        let mut cmd = Command::new(nettool_bin());
        cmd.args(["rendezvous", "--listen", &format!("{ip}:0")])
            .args(["--cluster", &redis.url, "--public-addr", ip])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(cmd);
        let stderr = proc.child.stderr.take().expect("stderr piped");
        let mut reader = BufReader::new(stderr);
        let mut id = None;
        let mut metrics = None;
        let mut line = String::new();
        let addr = loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read stderr");
            assert!(n > 0, "the node on {ip} ended before listening");
            if let Some(rest) = line.split("cluster node ").nth(1) {
                id = rest.split_whitespace().next().map(str::to_owned);
            }
            if let Some(rest) = line.split("metrics at http://").nth(1) {
                metrics = rest.split('/').next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .expect("address in the listening line");
            }
        };
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Self {
            proc,
            addr,
            id: id.expect("the node printed its cluster id"),
            metrics,
        }
    }
}

/// The per-address limits the many-client tests lift: every client comes from one loopback
/// address, so `--join-rate 0` (joins per second per address) and `--max-conns-per-ip 0`
/// (connections per address) are unlimited; `--max-sessions` stays at its default (100,000).
const LOAD_LIMITS: [&str; 4] = ["--join-rate", "0", "--max-conns-per-ip", "0"];

fn peer_args(servers: &[SocketAddr], session: &str, strategy: &str) -> Vec<String> {
    let mut v = Vec::new();
    for s in servers {
        v.extend(["--server".to_owned(), s.to_string()]);
    }
    v.extend(
        [
            "--session",
            session,
            "--strategy",
            strategy,
            "--secret",
            "cluster-secret",
            "--timeout",
            "40s",
        ]
        .map(str::to_owned),
    );
    v
}

/// Peer A joins through `a_servers`, waits, then peer B through `b_servers`; both must link
/// with `strategy` and carry the data intact.
fn link(
    dir: &TempDir,
    a_servers: &[SocketAddr],
    b_servers: &[SocketAddr],
    session: &str,
    strategy: &str,
) -> (String, String) {
    let a_in = test_data(256 << 10, 11);
    let b_in = test_data(128 << 10, 12);
    let (a, _) = spawn_peer(
        Command::new(nettool_bin()),
        dir,
        &format!("{session}-a"),
        &a_in,
        &peer_args(a_servers, session, strategy),
    );
    wait_until_waiting(dir, &format!("{session}-a"));
    let (b, _) = spawn_peer(
        Command::new(nettool_bin()),
        dir,
        &format!("{session}-b"),
        &b_in,
        &peer_args(b_servers, session, strategy),
    );
    let a = finish_peer(a, dir, &format!("{session}-a"), Duration::from_secs(60));
    let b = finish_peer(b, dir, &format!("{session}-b"), Duration::from_secs(60));
    assert!(
        a.status.is_some_and(|s| s.success()),
        "{strategy}: peer A failed: {}",
        a.stderr
    );
    assert!(
        b.status.is_some_and(|s| s.success()),
        "{strategy}: peer B failed: {}",
        b.stderr
    );
    assert_eq!(a.strategy(), Some(strategy), "{}", a.stderr);
    assert_eq!(b.strategy(), Some(strategy), "{}", b.stderr);
    assert_eq!(
        sha256(&b.stdout),
        sha256(&a_in),
        "{strategy}: A -> B differs"
    );
    assert_eq!(
        sha256(&a.stdout),
        sha256(&b_in),
        "{strategy}: B -> A differs"
    );
    (a.stderr, b.stderr)
}

/// Peer A joins through node 1, peer B through node 2 (each knows only its own node): every
/// strategy links, the relay included (it runs on node 1, where B is sent by the pairing).
#[test]
fn peers_on_two_nodes_link_with_every_strategy() {
    let Some(redis) = Redis::start() else { return };
    let n1 = Node::start("127.0.0.1", &redis, &[]);
    let n2 = Node::start("127.0.0.2", &redis, &[]);
    let dir = TempDir::new("cluster-link");
    for strategy in ["tcp-punch", "udp-quic", "tcp-direct", "relay"] {
        link(
            &dir,
            &[n1.addr],
            &[n2.addr],
            &format!("x-{strategy}"),
            strategy,
        );
    }
    // Both peers left: their keys are gone (not only expired later).
    let left = wait_for_keys(&redis, Duration::from_secs(5), |k| k.is_empty());
    assert!(left.is_empty(), "keys left in Redis: {left:?}");
}

/// Polls Redis until `done` holds for the nettool keys (or `limit` passes); returns them.
fn wait_for_keys(
    redis: &Redis,
    limit: Duration,
    done: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let start = Instant::now();
    loop {
        let keys = redis.nettool_keys();
        if done(&keys) || start.elapsed() > limit {
            return keys;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Joins `session` through `server`, then exchanges one offer with the peer; returns the
/// peer's payload.
async fn join_and_offer(
    server: SocketAddr,
    session: String,
    me: String,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let names = ["s".to_owned()];
    let (mut client, pairing) = join(server, &session, &names, deadline, || {})
        .await
        .map_err(|e| format!("{session}: join: {e}"))?;
    if pairing.strategies != names {
        return Err(format!("{session}: agreed {:?}", pairing.strategies));
    }
    client
        .exchange_offer("s", serde_json::json!(me), deadline)
        .await
        .map_err(|e| format!("{session}: offer: {e}"))
}

/// Pairs `sessions` (first peer through `a`, second through `b`, both joining at once) and
/// checks each peer got the other's offer; returns the failures.
async fn pair_all(sessions: Vec<(String, SocketAddr, SocketAddr)>) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for (session, a, b) in sessions {
        tasks.spawn(async move {
            let (ra, rb) = tokio::join!(
                join_and_offer(a, session.clone(), format!("{session}/a")),
                join_and_offer(b, session.clone(), format!("{session}/b")),
            );
            match (ra, rb) {
                (Ok(x), Ok(y))
                    if x == serde_json::json!(format!("{session}/b"))
                        && y == serde_json::json!(format!("{session}/a")) =>
                {
                    Ok(())
                }
                (Ok(x), Ok(y)) => Err(format!("{session}: wrong offers {x} / {y}")),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.expect("pairing task") {
            failures.push(e);
        }
    }
    failures
}

/// 1,000 sessions, all at once, split across both nodes: half with both peers on one node
/// (a quarter each), half with one peer on each. Every one pairs and exchanges its offers,
/// and nothing stays in Redis afterwards. Limits set on both nodes: see [`LOAD_LIMITS`].
#[test]
fn a_thousand_sessions_across_two_nodes_all_pair() {
    let Some(redis) = Redis::start() else { return };
    let n1 = Node::start("127.0.0.1", &redis, &LOAD_LIMITS);
    let n2 = Node::start("127.0.0.2", &redis, &LOAD_LIMITS);
    let nodes = [n1.addr, n2.addr];
    let sessions: Vec<_> = (0..1000usize)
        .map(|i| (format!("load-{i}"), nodes[i % 2], nodes[(i / 2) % 2]))
        .collect();
    let cross = sessions.iter().filter(|(_, a, b)| a != b).count();
    assert_eq!(cross, 500);
    let failures = runtime().block_on(pair_all(sessions));
    assert!(
        failures.is_empty(),
        "{} of 1000 sessions failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let left = wait_for_keys(&redis, Duration::from_secs(10), |k| k.is_empty());
    assert!(
        left.is_empty(),
        "{} keys left in Redis, e.g. {:?}",
        left.len(),
        left.first()
    );
}

/// Node 2 dies (SIGKILL) with 20 first peers waiting on it, while a run of sessions pairs on
/// node 1 (all of them must pair). Afterwards: clients listing node 2
/// first move on to node 1 and link through it; fresh sessions pair through node 1; a session
/// whose waiter died with node 2 is taken over by the next joiner; and node 2's keys are gone
/// from Redis once their TTL (session expiry 3 s + 1 s) has passed.
#[test]
fn when_a_node_dies_sessions_pair_on_the_other_and_its_keys_expire() {
    let Some(redis) = Redis::start() else { return };
    let expiry = ["--session-expiry", "3s"];
    let limits: Vec<&str> = LOAD_LIMITS.iter().chain(&expiry).copied().collect();
    let n1 = Node::start("127.0.0.1", &redis, &limits);
    let mut n2 = Node::start("127.0.0.2", &redis, &limits);
    let rt = runtime();
    // 20 first peers wait on node 2.
    let (n1_addr, n2_addr) = (n1.addr, n2.addr);
    let mut waiters = Vec::new();
    for i in 0..20 {
        let (tx, rx) = std::sync::mpsc::channel();
        waiters.push(rt.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let names = ["s".to_owned()];
            let _ = join(n2_addr, &format!("dead-{i}"), &names, deadline, || {
                let _ = tx.send(());
            })
            .await;
        }));
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a first peer waits on node 2");
    }
    let node2_value = format!("W{}:", n2.id);
    let before = redis.nettool_keys();
    let on_node2 = before
        .iter()
        .filter(|(_, v)| v.starts_with(&node2_value))
        .count();
    assert_eq!(on_node2, 20, "waiting keys of node 2: {before:?}");
    // A run of sessions on node 1 goes on while node 2 dies: every one of them pairs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = {
        let stop = stop.clone();
        rt.spawn(async move {
            let (mut batches, mut failures) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || batches < 5 {
                let batch: Vec<_> = (0..20)
                    .map(|i| (format!("run-{batches}-{i}"), n1_addr, n1_addr))
                    .collect();
                failures.extend(pair_all(batch).await);
                batches += 1;
            }
            (batches, failures)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let _ = n2.proc.child.kill();
    let _ = n2.proc.child.wait();
    let killed = Instant::now();

    // A client that lists node 2 first moves on to node 1, and links.
    let dir = TempDir::new("cluster-dead");
    let (a_err, b_err) = link(
        &dir,
        &[n2_addr, n1_addr],
        &[n2_addr, n1_addr],
        "after-death",
        "tcp-direct",
    );
    for err in [&a_err, &b_err] {
        assert!(
            err.contains(&format!("server {n2_addr}: ")) && err.contains("trying the next"),
            "no line for the dead node: {err}"
        );
        assert!(
            err.contains(&format!("server {n1_addr} ({n1_addr}) answers; using it")),
            "{err}"
        );
    }

    // Fresh sessions pair through node 1.
    let fresh: Vec<_> = (0..50)
        .map(|i| (format!("fresh-{i}"), n1_addr, n1_addr))
        .collect();
    let failures = rt.block_on(pair_all(fresh));
    assert!(failures.is_empty(), "{failures:?}");

    // A session whose first peer died with node 2: the next joiner takes its place (node 2
    // no longer listens), and the one after pairs with it.
    let taken_over: Vec<_> = (0..5)
        .map(|i| (format!("dead-{i}"), n1_addr, n1_addr))
        .collect();
    let failures = rt.block_on(async {
        let mut failures = Vec::new();
        for (session, a, b) in taken_over {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let s = session.clone();
            let first = tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                let names = ["s".to_owned()];
                join(a, &s, &names, deadline, || {
                    let _ = tx.send(());
                })
                .await
                .map(|(_, p)| p.role)
                .map_err(|e| e.to_string())
            });
            let waited = tokio::time::timeout(Duration::from_secs(10), rx).await;
            if !matches!(waited, Ok(Ok(()))) {
                failures.push(format!(
                    "{session}: the joiner did not wait in the dead waiter's place"
                ));
                first.abort();
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            let names = ["s".to_owned()];
            let second = join(b, &session, &names, deadline, || {}).await;
            match (first.await.expect("task"), second) {
                (Ok(nettool_core::protocol::Role::First), Ok(_)) => {}
                (f, s) => failures.push(format!("{session}: {f:?} / {:?}", s.err())),
            }
        }
        failures
    });
    assert!(failures.is_empty(), "{failures:?}");

    // Node 2's keys outlive it only by their TTL.
    let node2 = n2.id.clone();
    let after = wait_for_keys(&redis, Duration::from_secs(10), |keys| {
        !keys.iter().any(|(_, v)| v[1..].starts_with(&node2))
    });
    assert!(
        !after.iter().any(|(_, v)| v[1..].starts_with(&node2)),
        "node 2's keys still in Redis {:?} after it died: {after:?}",
        killed.elapsed()
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(3),
        "node 2's keys went before their TTL: was it them that expired?"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (batches, failures) = rt.block_on(running).expect("the run on node 1");
    assert!(
        failures.is_empty(),
        "sessions on node 1 failed while node 2 died ({batches} batches of 20): {failures:?}"
    );
    for w in waiters {
        w.abort();
    }
    drop(n1);
}

/// The session layer through a cluster: A lists both nodes and joins through node 1 (the
/// relay runs there), B knows only node 2. Node 1 dies mid-stream: A resumes through node 2
/// (the next of its servers that answers), B through its own, the cluster pairs the resumed
/// halves again on node 2 and the stream goes on, every byte once.
#[test]
fn a_relayed_session_resumes_through_the_other_node_when_its_node_dies() {
    let Some(redis) = Redis::start() else { return };
    let n1 = Node::start("127.0.0.1", &redis, &[]);
    let n2 = Node::start("127.0.0.2", &redis, &[]);
    let dir = TempDir::new("cluster-resume");
    let a_data = test_data(2 << 20, 41);
    let b_data = test_data(64 << 10, 42);
    std::fs::write(dir.path("b.in"), &b_data).unwrap();
    let peer = |name: &str, servers: &[SocketAddr], stdin: Stdio| {
        let mut cmd = Command::new(nettool_bin());
        cmd.arg("connect")
            .args(peer_args(servers, "cluster-resume", "relay"))
            .arg("--report")
            .arg(dir.path(&format!("{name}.report.json")))
            .stdin(stdin)
            .stdout(std::fs::File::create(dir.path(&format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.path(&format!("{name}.err"))).unwrap());
        Proc::spawn(cmd)
    };
    let mut a = peer("a", &[n1.addr, n2.addr], Stdio::piped());
    let feed = a.child.stdin.take().expect("piped");
    wait_until_waiting(&dir, "a");
    let mut b = peer(
        "b",
        &[n2.addr],
        Stdio::from(std::fs::File::open(dir.path("b.in")).unwrap()),
    );
    let data = a_data.clone();
    let feeder = std::thread::spawn(move || {
        crate::support::feed_paced(feed, &data, 64, Duration::from_secs(8))
    });
    let start = Instant::now();
    while std::fs::metadata(dir.path("b.out")).map_or(0, |m| m.len()) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no byte reached B"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    drop(n1);
    feeder.join().unwrap();
    let a_status = a.wait_timeout(Duration::from_secs(60));
    let b_status = b.wait_timeout(Duration::from_secs(60));
    let text = |n: &str| std::fs::read_to_string(dir.path(n)).unwrap_or_default();
    let ctx = format!("A: {}\nB: {}", text("a.err"), text("b.err"));
    assert!(a_status.is_some_and(|s| s.success()), "{ctx}");
    assert!(b_status.is_some_and(|s| s.success()), "{ctx}");
    let b_out = std::fs::read(dir.path("b.out")).unwrap();
    assert_eq!(sha256(&b_out), sha256(&a_data), "A -> B differs: {ctx}");
    assert_eq!(std::fs::read(dir.path("a.out")).unwrap(), b_data, "{ctx}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path("a.report.json")).unwrap()).unwrap();
    assert_eq!(report["resumes"][0]["strategy"], "relay", "{report}");
    assert!(text("a.err").contains("resumed via relay"), "{ctx}");
    drop(n2);
}

/// `GET /healthz` of a node: the HTTP status code (curl; "000" when it did not answer).
fn healthz(addr: SocketAddr) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(format!("http://{addr}/healthz"))
        .output()
        .expect("curl runs (CI installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/healthz` is 200 while the node's Redis answers and 503 once it is gone.
#[test]
fn health_follows_the_clusters_redis() {
    let Some(redis) = Redis::start() else { return };
    let node = Node::start("127.0.0.1", &redis, &["--metrics", "127.0.0.1:0"]);
    let metrics = node.metrics.expect("the node printed its metrics address");
    assert_eq!(healthz(metrics), "200");
    drop(redis);
    let started = Instant::now();
    let mut status = healthz(metrics);
    while status != "503" && started.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
        status = healthz(metrics);
    }
    assert_eq!(status, "503", "unhealthy once Redis is gone");
    drop(node);
}
