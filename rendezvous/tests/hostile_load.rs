//! Server memory stays bounded under hostile load (issue 11 item 5): small frames until
//! paired, a time bound on partial frames, bounded outgoing queues, and per-strategy budgets
//! for offers and results, while honest peers keep linking.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nettool_core::client::RendezvousClient;
use nettool_core::protocol::{
    encode, ClientToServer, FramedConn, ServerToClient, PROTOCOL_VERSION,
};
use nettool_core::relay::RelayStream;
use nettool_core::ClientError;
use nettool_rendezvous::{
    RendezvousServer, ServerConfig, ServerStats, MAX_FRAMES_PER_STRATEGY, UNPAIRED_MAX_FRAME_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn start(config: ServerConfig) -> (SocketAddr, ServerStats) {
    // All loopback addresses, so clients can come from 127.x.y.z as many hosts.
    let server = RendezvousServer::bind("0.0.0.0:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], server.local_addr().unwrap().port()));
    let stats = server.stats();
    tokio::spawn(server.run());
    (addr, stats)
}

/// Raises the soft open-file limit to 8192 (the hard one too where allowed, e.g. as root),
/// or at least to the hard limit; returns the soft limit in force.
fn raise_nofile() -> u64 {
    const WANT: libc::rlim_t = 8192;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < WANT {
            let raised = libc::rlimit {
                rlim_cur: WANT,
                rlim_max: lim.rlim_max.max(WANT),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

async fn connect_from(server: SocketAddr, source: [u8; 4]) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(server).await.unwrap()
}

fn join_frame(session: &str, strategies: &[&str]) -> Vec<u8> {
    encode(&ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: session.into(),
        strategies: strategies.iter().map(|s| s.to_string()).collect(),
        token: None,
        express: None,
    })
}

/// A partial frame of exactly `len` bytes (no newline): the most the server holds.
fn partial_frame(len: usize) -> Vec<u8> {
    let mut f = b"{\"type\":\"offer\",\"strategy\":\"x\",\"payload\":\"".to_vec();
    f.resize(len, b'a');
    f
}

/// One honest pairing: join, swap offers and results, attach to the relay and move bytes
/// both ways through it.
async fn honest_pair(server: SocketAddr, session: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let names = ["relay".to_owned()];
    let (a, b) = tokio::join!(
        RendezvousClient::join(server, session, &names, deadline, || {}),
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            RendezvousClient::join(server, session, &names, deadline, || {}).await
        }
    );
    let ((mut a, pa), (mut b, pb)) = (a.unwrap(), b.unwrap());
    let (oa, ob) = tokio::join!(
        a.exchange_offer("relay", serde_json::json!("a"), deadline),
        b.exchange_offer("relay", serde_json::json!("b"), deadline)
    );
    assert_eq!(oa.unwrap(), serde_json::json!("b"));
    assert_eq!(ob.unwrap(), serde_json::json!("a"));
    let token = pa.relay_token.clone().unwrap();
    let attach = |role| {
        let token = token.clone();
        async move {
            let mut f = FramedConn::new(TcpStream::connect(server).await.unwrap(), 1 << 16);
            f.send(&ClientToServer::Relay {
                version: PROTOCOL_VERSION,
                session: session.to_owned(),
                token,
                role,
            })
            .await
            .unwrap();
            assert_eq!(
                f.recv::<ServerToClient>().await.unwrap(),
                Some(ServerToClient::Relaying)
            );
            let (s, rest) = f.into_parts();
            RelayStream::new(s, rest)
        }
    };
    let (mut ra, mut rb) = tokio::join!(attach(pa.role), attach(pb.role));
    ra.write_all(b"ping").await.unwrap();
    rb.write_all(b"pong").await.unwrap();
    let (mut x, mut y) = ([0u8; 4], [0u8; 4]);
    rb.read_exact(&mut x).await.unwrap();
    ra.read_exact(&mut y).await.unwrap();
    assert_eq!((&x, &y), (b"ping", b"pong"));
    let (sa, sb) = tokio::join!(
        async {
            a.send_result("relay", true, None).await.unwrap();
            a.peer_result("relay", deadline).await.unwrap()
        },
        async {
            b.send_result("relay", true, None).await.unwrap();
            b.peer_result("relay", deadline).await.unwrap()
        }
    );
    assert_eq!((sa, sb), (Ok(()), Ok(())));
}

/// Thousands of connections from 150 loopback addresses each hold a maximal partial frame
/// (half of them before joining, half as joined, waiting peers), while 20 honest pairs pair,
/// swap offers and results and relay bytes. The per-address defaults stay as they are (64
/// connections, 20 joins/s in bursts of 40: the attackers stay under them by spreading over
/// addresses); only `first_frame_timeout` is raised (to 60 s), so that no hostile connection
/// is dropped for slowness while the honest pairs run and the server really holds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_pairs_link_while_thousands_hold_partial_frames() {
    let limit = raise_nofile();
    // Two descriptors per connection in this process (client and server side), plus margin.
    let hostile = 3000.min((limit.saturating_sub(500) / 2) as usize);
    assert!(
        hostile >= 1000,
        "RLIMIT_NOFILE {limit} is too small for this test"
    );
    let (server, stats) = start(ServerConfig {
        first_frame_timeout: Duration::from_secs(60),
        ..ServerConfig::default()
    })
    .await;

    let mut held = Vec::with_capacity(hostile);
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..hostile {
        let source = [127, 1, 0, ((i / 2) % 150 + 1) as u8];
        pending.spawn(async move {
            let mut s = connect_from(server, source).await;
            if i % 2 == 1 {
                s.write_all(&join_frame(&format!("hostile-{i}"), &["relay"]))
                    .await
                    .unwrap();
                let mut f = FramedConn::new(s, 1 << 16);
                assert!(matches!(
                    f.recv::<ServerToClient>().await.unwrap(),
                    Some(ServerToClient::Waiting { .. })
                ));
                s = f.into_parts().0;
            }
            s.write_all(&partial_frame(UNPAIRED_MAX_FRAME_LEN))
                .await
                .unwrap();
            s
        });
        if pending.len() >= 200 {
            held.push(pending.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(s) = pending.join_next().await {
        held.push(s.unwrap());
    }
    // The server holds every one of them (and the partial frames they sent).
    let t = Instant::now();
    while stats.connection_count() < hostile && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.connection_count(), hostile);
    assert_eq!(stats.session_count(), hostile / 2);

    let started = Instant::now();
    // Two waves of 10 pairs: the honest peers all come from 127.0.0.1, whose 64 connections
    // at a time hold 10 pairs (control and relay connections, 4 per pair).
    for wave in 0..2 {
        let mut pairs = tokio::task::JoinSet::new();
        for p in 0..10 {
            pairs.spawn(async move { honest_pair(server, &format!("honest-{wave}-{p}")).await });
        }
        while let Some(r) = pairs.join_next().await {
            r.unwrap();
        }
    }
    let took = started.elapsed();
    println!("20 honest pairs linked in {took:?} next to {hostile} hostile connections");
    assert!(took < Duration::from_secs(10), "honest pairs took {took:?}");
    // No hostile connection had to be dropped for that (the honest ones close meanwhile).
    let t = Instant::now();
    while stats.connection_count() != hostile && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.connection_count(), hostile);
    drop(held);
}

/// A frame one byte over the unpaired limit is refused, before joining and while waiting for
/// the partner alike (the configured 64 KiB applies only once paired).
#[tokio::test]
async fn frames_are_capped_at_4_kib_until_paired() {
    let (server, _) = start(ServerConfig::default()).await;
    let too_long = format!("frame too long (limit {UNPAIRED_MAX_FRAME_LEN} bytes)");
    // Before the first frame.
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(&partial_frame(UNPAIRED_MAX_FRAME_LEN + 2))
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).await;
    assert!(answer.contains(&too_long), "{answer}");
    // A waiting peer.
    let mut f = FramedConn::new(TcpStream::connect(server).await.unwrap(), 1 << 16);
    f.send(&ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: "waiting".into(),
        strategies: vec!["relay".into()],
        token: None,
        express: None,
    })
    .await
    .unwrap();
    assert!(matches!(
        f.recv::<ServerToClient>().await.unwrap(),
        Some(ServerToClient::Waiting { .. })
    ));
    let (mut s, _) = f.into_parts();
    s.write_all(&partial_frame(UNPAIRED_MAX_FRAME_LEN + 2))
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).await;
    assert!(answer.contains(&too_long), "{answer}");
    // Once paired, a 60 KB offer passes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let names = ["relay".to_owned()];
    let (a, b) = tokio::join!(
        RendezvousClient::join(server, "big", &names, deadline, || {}),
        RendezvousClient::join(server, "big", &names, deadline, || {})
    );
    let ((mut a, _), (mut b, _)) = (a.unwrap(), b.unwrap());
    let big = serde_json::json!("o".repeat(60_000));
    let (oa, ob) = tokio::join!(
        a.exchange_offer("relay", big.clone(), deadline),
        b.exchange_offer("relay", big.clone(), deadline)
    );
    assert_eq!((oa.unwrap(), ob.unwrap()), (big.clone(), big));
}

/// A waiting peer cannot hold a partial frame for the whole session expiry: a frame must
/// complete within the first-frame timeout of its first byte.
#[tokio::test]
async fn a_partial_frame_is_held_only_for_a_while() {
    let (server, stats) = start(ServerConfig {
        first_frame_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    })
    .await;
    let mut f = FramedConn::new(TcpStream::connect(server).await.unwrap(), 1 << 16);
    f.send(&ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: "slow".into(),
        strategies: vec!["relay".into()],
        token: None,
        express: None,
    })
    .await
    .unwrap();
    assert!(matches!(
        f.recv::<ServerToClient>().await.unwrap(),
        Some(ServerToClient::Waiting { .. })
    ));
    let (mut s, _) = f.into_parts();
    s.write_all(&partial_frame(1000)).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .expect("the server drops the connection")
        .unwrap();
    assert!(
        answer.contains("frame not completed within 0.5s of its first byte"),
        "{answer}"
    );
    assert_eq!(stats.session_count(), 0);
}

/// A peer that does not read is dropped once its queue of messages is full, and its partner
/// hears that it left; the server does not buffer without bound for it.
#[tokio::test]
async fn a_peer_that_does_not_read_is_dropped_when_its_queue_is_full() {
    let (server, _) = start(ServerConfig::default()).await;
    let strategies: Vec<String> = (0..32).map(|i| format!("s{i}")).collect();
    // The reader that never reads, with a small receive buffer and small segments (so the
    // server's send buffer towards it stays small too, whatever the loopback MTU).
    let socket = TcpSocket::new_v4().unwrap();
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
    let mut deaf = socket.connect(server).await.unwrap();
    deaf.write_all(&encode(&ClientToServer::Join {
        version: PROTOCOL_VERSION,
        session: "deaf".into(),
        strategies: strategies.clone(),
        token: None,
        express: None,
    }))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut talker, _) = RendezvousClient::join(server, "deaf", &strategies, deadline, || {})
        .await
        .unwrap();
    // Results for every strategy, each within the per-strategy budget: far more than the
    // deaf peer's socket buffers and queue hold.
    let error = "e".repeat(2000);
    for s in &strategies {
        for _ in 0..MAX_FRAMES_PER_STRATEGY {
            talker
                .send_result(s, false, Some(error.clone()))
                .await
                .unwrap();
        }
    }
    let started = Instant::now();
    let err = talker.peer_result("never", deadline).await.unwrap_err();
    assert!(matches!(err, ClientError::PeerLeft), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(deaf);
}

/// Offers and results are capped per strategy (count), and only agreed strategies may have
/// them.
#[tokio::test]
async fn offers_and_results_are_capped_per_strategy() {
    let (server, _) = start(ServerConfig::default()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let names = ["relay".to_owned()];
    for (session, frames, expected) in [
        (
            "count",
            vec!["relay"; MAX_FRAMES_PER_STRATEGY as usize + 1],
            "too many offers and results for 'relay'",
        ),
        (
            "agreed",
            vec!["made-up"],
            "offer or result for 'made-up', which is not an agreed strategy",
        ),
    ] {
        let (a, b) = tokio::join!(
            RendezvousClient::join(server, session, &names, deadline, || {}),
            RendezvousClient::join(server, session, &names, deadline, || {})
        );
        let ((mut a, _), (_b, _)) = (a.unwrap(), b.unwrap());
        for s in frames {
            a.send_result(s, false, None).await.unwrap();
        }
        let err = a.peer_result("other", deadline).await.unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
}
