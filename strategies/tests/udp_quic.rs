//! udp-quic on loopback: a rendezvous server in-process, two orchestrators that only offer
//! udp-quic, 64 MiB each way, a wrong secret, and no socket left behind.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::{ConnectParams, Link, Orchestrator, Outcome, Report};
use nettool_rendezvous::{RendezvousServer, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tests count this process's open descriptors: run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn server() -> std::net::SocketAddr {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    assert_eq!(server.udp_local_addr().unwrap(), addr);
    tokio::spawn(server.run());
    addr
}

fn orchestrator(timeout: Duration) -> Arc<Orchestrator> {
    let strategy = nettool_strategies::udp_quic::UdpQuic::new(Default::default());
    Arc::new(Orchestrator::new(
        vec![(Arc::new(strategy), timeout)],
        Duration::from_secs(20),
    ))
}

async fn pair(
    addr: std::net::SocketAddr,
    session: &str,
    secrets: (&str, &str),
    timeout: Duration,
) -> ((Option<Link>, Report), (Option<Link>, Report)) {
    let orch = orchestrator(timeout);
    let params = |secret: &str| ConnectParams {
        server: addr,
        session: session.into(),
        secret: Some(secret.into()),
    };
    let (one, two) = (params(secrets.0), params(secrets.1));
    tokio::join!(orch.connect(&one, &|_| {}), orch.connect(&two, &|_| {}))
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `send` then shuts down, reads to the end; both directions at once. Drops the link
/// right after, as a program that exits would.
async fn exchange(link: Link, send: Arc<Vec<u8>>) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(link.stream);
    let up = async {
        wr.write_all(&send).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let down = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(up, down);
    got
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn links_and_moves_64_mib_each_way() {
    let _serial = SERIAL.lock().await;
    let addr = server().await;
    let ((la, ra), (lb, rb)) = pair(addr, "quic-loop", ("s", "s"), Duration::from_secs(10)).await;
    let (Some(la), Some(lb)) = (la, lb) else {
        panic!("no link: {ra:?} {rb:?}");
    };
    for r in [&ra, &rb] {
        assert_eq!(r.strategy.as_deref(), Some("udp-quic"), "{r:?}");
        assert_eq!(r.attempts[0].outcome, Outcome::Connected);
    }
    eprintln!(
        "udp-quic linked in {} / {} ms ({} -> {})",
        ra.attempts[0].elapsed_ms, rb.attempts[0].elapsed_ms, la.local, la.remote
    );
    let size = 64 << 20;
    let a_data = Arc::new(data(size, 1));
    let b_data = Arc::new(data(size, 2));
    let start = Instant::now();
    let (got_b, got_a) = tokio::join!(
        tokio::spawn(exchange(la, a_data.clone())),
        tokio::spawn(exchange(lb, b_data.clone())),
    );
    let secs = start.elapsed().as_secs_f64();
    let (got_b, got_a) = (got_b.unwrap(), got_a.unwrap());
    assert_eq!(got_b.len(), size);
    assert_eq!(got_a.len(), size);
    assert_eq!(sha(&got_b), sha(&b_data), "b -> a differs");
    assert_eq!(sha(&got_a), sha(&a_data), "a -> b differs");
    eprintln!(
        "64 MiB each way concurrently in {secs:.2}s: {:.0} MB/s per direction",
        size as f64 / secs / 1e6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_fails_on_both_ends_with_an_authentication_error() {
    let _serial = SERIAL.lock().await;
    let addr = server().await;
    let baseline = common::open_fds();
    let ((la, ra), (lb, rb)) = pair(
        addr,
        "quic-wrong",
        ("one", "two"),
        Duration::from_millis(1500),
    )
    .await;
    assert!(la.is_none() && lb.is_none());
    for r in [&ra, &rb] {
        let attempt = &r.attempts[0];
        assert!(
            matches!(attempt.outcome, Outcome::TimedOut | Outcome::Failed),
            "{attempt:?}"
        );
        let error = attempt.error.as_deref().unwrap_or("");
        assert!(error.contains("failed authentication"), "{error}");
        eprintln!("{}: {error}", r.role.map(|r| r.as_str()).unwrap_or("?"));
    }
    // The attempt's socket and tasks are gone.
    common::assert_no_descriptor_left(&baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_attempt_mid_punch_leaves_no_socket() {
    let _serial = SERIAL.lock().await;
    let addr = server().await;
    let baseline = common::open_fds();
    // Wrong secrets keep both punching; the futures are dropped long before the attempt ends.
    let dropped = tokio::time::timeout(
        Duration::from_millis(1500),
        pair(addr, "quic-drop", ("one", "two"), Duration::from_secs(10)),
    )
    .await;
    assert!(dropped.is_err(), "the attempt should still be running");
    common::assert_no_descriptor_left(&baseline).await;
}
