//! Robustness under cancellation and faults (issue 20): a deadline never breaks the next
//! strategy, the overall deadline is a hard bound, stopping the server stops all its tasks,
//! and what the peer sends early is bounded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nettool_core::client::RendezvousClient;
use nettool_core::orchestrator::{ConnectParams, Orchestrator};
use nettool_core::protocol::{
    encode, ClientToServer, FramedConn, Role, ServerToClient, PROTOCOL_VERSION,
};
use nettool_core::relay::RelayStream;
use nettool_core::{Attempt, Link, Outcome, Strategy, StrategyError};
use nettool_rendezvous::{RendezvousServer, ServerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn start(config: ServerConfig) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    (addr, tokio::spawn(server.run()))
}

// --- Strategies of the tests ---------------------------------------------------------------

/// Behaves randomly (seeded): sleeps, sends an offer of random size (up to 60 KB, so a
/// throttled socket is in the middle of writing it when the deadline strikes), waits for the
/// peer's, sleeps again; never links. Its attempt timeout is random too.
struct Chaos {
    rng: Mutex<StdRng>,
}

#[async_trait::async_trait]
impl Strategy for Chaos {
    fn name(&self) -> &'static str {
        "chaos"
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let (before, size, after) = {
            let mut rng = self.rng.lock().unwrap();
            (
                rng.gen_range(0..30u64),
                rng.gen_range(0..60_000usize),
                rng.gen_range(0..60u64),
            )
        };
        tokio::time::sleep(Duration::from_millis(before)).await;
        let payload = serde_json::json!("x".repeat(size));
        attempt
            .rendezvous
            .exchange_offer("chaos", payload, attempt.deadline)
            .await?;
        tokio::time::sleep(Duration::from_millis(after)).await;
        Err(StrategyError::NoLink("chaos never links".into()))
    }
}

/// The relay, without TLS (the tests check the control connection, not link security):
/// exchange offers, attach to the server's relay, link.
struct PlainRelay {
    server: SocketAddr,
}

#[async_trait::async_trait]
impl Strategy for PlainRelay {
    fn name(&self) -> &'static str {
        "relay"
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let token = attempt.pairing.relay_token.clone().expect("relaying is on");
        attempt
            .rendezvous
            .exchange_offer("relay", serde_json::json!({}), attempt.deadline)
            .await?;
        let stream = TcpStream::connect(self.server)
            .await
            .map_err(|e| StrategyError::io("relay connect", e))?;
        let local = stream.local_addr().unwrap();
        let (stream, prefix) = attach(stream, attempt.session, &token, attempt.role())
            .await
            .map_err(StrategyError::NoLink)?;
        Ok(Link {
            stream: Box::new(RelayStream::new(stream, prefix)),
            local,
            remote: self.server,
            strategy: "relay",
        })
    }
}

/// Attaches `stream` to the relay of `session`; returns it with the bytes read past the
/// server's answer.
async fn attach(
    stream: TcpStream,
    session: &str,
    token: &str,
    role: Role,
) -> Result<(TcpStream, Vec<u8>), String> {
    let mut framed = FramedConn::new(stream, 1 << 16);
    framed
        .send(&ClientToServer::Relay {
            version: PROTOCOL_VERSION,
            session: session.to_owned(),
            token: token.to_owned(),
            role,
        })
        .await
        .map_err(|e| e.to_string())?;
    match framed.recv::<ServerToClient>().await {
        Ok(Some(ServerToClient::Relaying)) => Ok(framed.into_parts()),
        other => Err(format!("relay refused: {other:?}")),
    }
}

/// Checks a link both ways: each end sends its role's name and reads the other's.
async fn check_link(link: Link, role: Role) {
    let (mut rd, mut wr) = tokio::io::split(link.stream);
    wr.write_all(role.as_str().as_bytes()).await.unwrap();
    let theirs = role.other().as_str();
    let mut got = vec![0u8; theirs.len()];
    tokio::time::timeout(Duration::from_secs(5), rd.read_exact(&mut got))
        .await
        .expect("the peer's bytes arrive")
        .unwrap();
    assert_eq!(got, theirs.as_bytes());
}

// --- 1. Cancellation never corrupts the control connection ---------------------------------

/// A TCP proxy that forwards client to server slowly (1 KiB per millisecond through a 4 KiB
/// receive buffer and 536-byte segments, so the client's send buffer stays small too): a
/// client's large frame is still being written when its deadline comes.
async fn throttling_proxy(server: SocketAddr) -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    {
        use std::os::fd::AsRawFd;
        let mss: libc::c_int = 536;
        // SAFETY: a valid socket and a c_int option value of the given size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                (&mss as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    }
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(server).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let up = async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if uw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let _ = uw.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut ur, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    addr
}

/// 200 connects in which the first strategy is cancelled by its deadline at random points
/// (before, during and after offers of up to 60 KB, one peer's control connection throttled
/// so the cancellation often lands in the middle of writing a frame). The relay after it must
/// link every time, on both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_attempt_never_breaks_the_next_strategy() {
    let (server, _srv) = start(ServerConfig {
        join_rate: 0, // 400 joins from 127.0.0.1 in a few seconds
        ..ServerConfig::default()
    })
    .await;
    let proxy = throttling_proxy(server).await;
    const ITERATIONS: u64 = 200;
    const LANES: u64 = 4;
    let cut_by_deadline = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..LANES {
        let cut_by_deadline = cut_by_deadline.clone();
        lanes.spawn(async move {
            for i in (lane..ITERATIONS).step_by(LANES as usize) {
                let mut seed = StdRng::seed_from_u64(i);
                let timeouts = [seed.gen_range(1..60u64), seed.gen_range(1..60u64)];
                let peer = |via: SocketAddr, n: usize| {
                    let strategies: Vec<(Arc<dyn Strategy>, Duration)> = vec![
                        (
                            Arc::new(Chaos {
                                rng: Mutex::new(StdRng::seed_from_u64(i * 2 + n as u64)),
                            }),
                            Duration::from_millis(timeouts[n]),
                        ),
                        (Arc::new(PlainRelay { server }), Duration::from_secs(10)),
                    ];
                    let orch = Orchestrator::new(strategies, Duration::from_secs(30));
                    let params = ConnectParams {
                        server: via,
                        session: format!("cancel-{i}"),
                        secret: None,
                    };
                    async move { orch.connect(&params, &|_| {}).await }
                };
                let ((la, ra), (lb, rb)) = tokio::join!(peer(proxy, 0), peer(server, 1));
                for r in [&ra, &rb] {
                    assert_eq!(
                        r.strategy.as_deref(),
                        Some("relay"),
                        "iteration {i}: {}\n{}",
                        serde_json::to_string(&ra).unwrap(),
                        serde_json::to_string(&rb).unwrap()
                    );
                    assert_ne!(r.attempts[0].outcome, Outcome::Connected);
                }
                if ra.attempts[0].outcome == Outcome::TimedOut {
                    cut_by_deadline.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::join!(
                    check_link(la.unwrap(), ra.role.unwrap()),
                    check_link(lb.unwrap(), rb.role.unwrap())
                );
            }
        });
    }
    while let Some(r) = lanes.join_next().await {
        r.unwrap();
    }
    // The deadline really struck inside the chaos attempt often (the rest of the time the
    // attempt ended on its own, also at random points).
    let cut = cut_by_deadline.load(std::sync::atomic::Ordering::Relaxed);
    println!("{cut} of {ITERATIONS} attempts of the throttled peer were cut by their deadline");
    assert!(
        cut >= ITERATIONS / 10,
        "only {cut} attempts were cut by their deadline"
    );
}

// --- 2. The overall deadline is a hard bound -----------------------------------------------

/// Fails at once.
struct FailFast;

#[async_trait::async_trait]
impl Strategy for FailFast {
    fn name(&self) -> &'static str {
        "fail-fast"
    }

    async fn connect(&self, _: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        Err(StrategyError::NoLink("fails at once".into()))
    }
}

/// The peer pairs and then never sends a result: the wait for it (which has a grace period
/// past the attempt's deadline) still ends at the overall deadline. On tokio's paused clock:
/// no wall-clock timing, the bound is checked exactly (to the timer's 1 ms resolution).
#[tokio::test(start_paused = true)]
async fn the_overall_deadline_is_a_hard_bound() {
    let (server, _srv) = start(ServerConfig::default()).await;
    // The silent peer: joins with the same strategies and never says anything else.
    let mut silent = FramedConn::new(TcpStream::connect(server).await.unwrap(), 1 << 16);
    silent
        .send(&ClientToServer::Join {
            version: PROTOCOL_VERSION,
            session: "deadline".into(),
            strategies: vec!["fail-fast".into()],
            token: None,
            express: None,
        })
        .await
        .unwrap();
    assert!(matches!(
        silent.recv::<ServerToClient>().await.unwrap(),
        Some(ServerToClient::Waiting { .. })
    ));
    let overall = Duration::from_secs(10);
    // The attempt's own timeout reaches the overall deadline: the result grace would overrun.
    // Blind (`--plan off`): the plan would shorten the attempt to a few round trips.
    let orch = Orchestrator::new(vec![(Arc::new(FailFast), overall)], overall).with_plan(false);
    let params = ConnectParams {
        server,
        session: "deadline".into(),
        secret: None,
    };
    let started = tokio::time::Instant::now();
    let (link, report) = orch.connect(&params, &|_| {}).await;
    let elapsed = started.elapsed();
    assert!(link.is_none());
    assert_eq!(report.role, Some(Role::Second), "{report:?}");
    assert_eq!(report.attempts.len(), 1, "{report:?}");
    assert_eq!(report.attempts[0].outcome, Outcome::Failed);
    assert!(
        elapsed <= overall + Duration::from_millis(1),
        "connect took {elapsed:?}, more than its overall deadline of {overall:?}"
    );
    assert!(
        elapsed >= overall - Duration::from_millis(1),
        "it waited for the peer's result until the deadline ({elapsed:?})"
    );
    drop(silent);
}

/// A server that accepts but never answers: the connect ends at the deadline too.
#[tokio::test(start_paused = true)]
async fn a_mute_server_cannot_stretch_the_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let _mute = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let overall = Duration::from_secs(7);
    let orch = Orchestrator::new(vec![(Arc::new(FailFast), overall)], overall);
    let params = ConnectParams {
        server,
        session: "mute".into(),
        secret: None,
    };
    let started = tokio::time::Instant::now();
    let (_, report) = orch.connect(&params, &|_| {}).await;
    assert!(started.elapsed() <= overall + Duration::from_millis(1));
    assert!(report.error.unwrap().contains("timed out"));
}

// --- 3. Stopping the server stops all its tasks ---------------------------------------------

/// Waiting peers, a paired session, a running relay and silent connections: aborting the
/// server's `run()` ends every task it started (connection tasks and both relay directions)
/// and closes every socket.
#[tokio::test]
async fn stopping_the_server_ends_all_its_tasks_and_sockets() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let (server, running) = start(ServerConfig::default()).await;
    let mut raw = Vec::new();
    // Waiting peers.
    for i in 0..3 {
        let mut c = TcpStream::connect(server).await.unwrap();
        c.write_all(&encode(&ClientToServer::Join {
            version: PROTOCOL_VERSION,
            session: format!("waiting-{i}"),
            strategies: vec!["relay".into()],
            token: None,
            express: None,
        }))
        .await
        .unwrap();
        raw.push(c);
    }
    // Silent connections.
    for _ in 0..2 {
        raw.push(TcpStream::connect(server).await.unwrap());
    }
    // A paired session with a running relay.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let names = ["relay".to_owned()];
    let (a, b) = tokio::join!(
        RendezvousClient::join(server, "paired", &names, deadline, || {}),
        async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            RendezvousClient::join(server, "paired", &names, deadline, || {}).await
        }
    );
    let ((ca, pa), (cb, pb)) = (a.unwrap(), b.unwrap());
    let token = pa.relay_token.clone().unwrap();
    let (ra, rb) = tokio::join!(
        async {
            attach(
                TcpStream::connect(server).await.unwrap(),
                "paired",
                &token,
                pa.role,
            )
            .await
        },
        async {
            attach(
                TcpStream::connect(server).await.unwrap(),
                "paired",
                &token,
                pb.role,
            )
            .await
        }
    );
    let (mut ra, mut rb) = (
        RelayStream::new(ra.unwrap().0, Vec::new()),
        RelayStream::new(rb.unwrap().0, Vec::new()),
    );
    ra.write_all(b"through").await.unwrap();
    let mut got = [0u8; 7];
    rb.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"through");
    // The clients' own tasks: one writer per rendezvous client.
    let clients = 2;
    let during = metrics.num_alive_tasks();
    assert!(
        during >= before + clients + 1 + 3 + 2 + 2 + 3,
        "server, 7 connection tasks and 2 relay directions run ({during} tasks, {before} before)"
    );

    running.abort();
    let _ = running.await;
    let mut after = metrics.num_alive_tasks();
    for _ in 0..200 {
        if after == before + clients {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        after = metrics.num_alive_tasks();
    }
    assert_eq!(
        after,
        before + clients,
        "tasks left running after the server stopped"
    );
    // Every socket the server held is closed.
    for mut c in raw {
        let mut buf = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut buf)).await;
        assert!(
            end.is_ok(),
            "a connection stayed open after the server stopped"
        );
    }
    let mut buf = [0u8; 64];
    for r in [&mut ra, &mut rb] {
        let end = tokio::time::timeout(Duration::from_secs(2), r.read(&mut buf)).await;
        assert!(end.is_ok(), "a relay connection stayed open");
    }
    drop((ca, cb));
}

// --- 4. Early results are bounded ------------------------------------------------------------

/// A fake server pairs the client, then floods it with results (for agreed strategies and
/// made-up ones) before the offer it waits for: the client keeps at most one per agreed
/// strategy, the latest.
#[tokio::test]
async fn early_results_are_capped_per_attempt() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (s, peer) = listener.accept().await.unwrap();
        let (rd, mut wr) = s.into_split();
        let mut conn = FramedConn::new(rd, 1 << 16);
        let _join: Option<ClientToServer> = conn.recv().await.unwrap();
        let mut out = encode(&ServerToClient::Paired {
            role: Role::First,
            strategies: vec!["a".into(), "b".into()],
            pair_id: "00".into(),
            observed: peer,
            peer,
            relay_token: None,
            relay_addrs: Vec::new(),
            peer_pake: None,
            peer_offers: None,
        });
        for i in 0..20_000u32 {
            let strategy = match i % 3 {
                0 => "a".to_owned(),
                1 => "b".to_owned(),
                _ => format!("made-up-{i}"),
            };
            out.extend(encode(&ServerToClient::Result {
                strategy,
                ok: false,
                error: Some(format!("failure {i}")),
            }));
        }
        out.extend(encode(&ServerToClient::Offer {
            strategy: "a".into(),
            payload: serde_json::json!("offer"),
        }));
        wr.write_all(&out).await.unwrap();
        // Keep the connection open until the client is done.
        let _ = conn.recv::<ClientToServer>().await;
        let _ = conn.recv::<ClientToServer>().await;
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let names = ["a".to_owned(), "b".to_owned()];
    let (mut client, _) = RendezvousClient::join(addr, "s", &names, deadline, || {})
        .await
        .unwrap();
    let offer = client
        .exchange_offer("a", serde_json::json!("mine"), deadline)
        .await
        .unwrap();
    assert_eq!(offer, serde_json::json!("offer"));
    assert!(
        client.held_results() <= 2,
        "{} early results held",
        client.held_results()
    );
    assert_eq!(
        client.peer_result("b", deadline).await.unwrap(),
        Err("failure 19999".to_owned())
    );
    drop(client);
    fake.abort();
}
