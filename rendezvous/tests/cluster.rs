//! Rendezvous nodes sharing sessions: two servers of this process joined to one
//! `MemoryCluster` (the cluster logic with the Redis store's semantics, without Redis; the
//! same logic through a real Redis is tested end to end in `tests/tests/e2e/cluster.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nettool_core::client::{ClientError, RendezvousClient};
use nettool_core::Role;
use nettool_rendezvous::{MemoryCluster, RendezvousServer, ServerConfig};
use tokio::task::JoinHandle;

/// A node on loopback; its public address is its listening address.
async fn node(cluster: &MemoryCluster, config: ServerConfig) -> (SocketAddr, JoinHandle<()>) {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let server = server.join_memory_cluster(cluster, vec![addr]);
    assert_eq!(server.public_addrs(), [addr]);
    (addr, tokio::spawn(server.run()))
}

fn names() -> Vec<String> {
    vec!["relay".into(), "tcp-punch".into()]
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Joins and calls back once told "waiting".
async fn join_waiting(
    addr: SocketAddr,
    session: &str,
) -> (
    JoinHandle<Result<(RendezvousClient, nettool_core::client::Pairing), ClientError>>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let session = session.to_owned();
    let task = tokio::spawn(async move {
        RendezvousClient::join(addr, &session, &names(), deadline(), || {
            let _ = tx.send(());
        })
        .await
    });
    (task, rx)
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

/// The first peer on node 1, the second on node 2: both are paired with the agreed list,
/// the second is sent to node 1's relay, offers and results cross, a third joiner on either
/// node is refused, the first peer learns when the second leaves, and the store is empty after.
#[tokio::test]
async fn peers_on_two_nodes_pair_and_talk() {
    let cluster = MemoryCluster::new();
    let (n1, _t1) = node(&cluster, ServerConfig::default()).await;
    let (n2, _t2) = node(&cluster, ServerConfig::default()).await;
    let (first, waiting) = join_waiting(n1, "two-nodes").await;
    waiting.await.expect("the first peer waits");
    assert_eq!(cluster.session_values().len(), 1);
    assert!(cluster.session_values()[0].starts_with('W'));
    let (mut b, pb) = RendezvousClient::join(
        n2,
        "two-nodes",
        &["tcp-punch".into(), "relay".into()],
        deadline(),
        || panic!("the second peer is not told to wait"),
    )
    .await
    .unwrap();
    let (mut a, pa) = first.await.unwrap().unwrap();
    assert_eq!((pa.role, pb.role), (Role::First, Role::Second));
    assert_eq!(pa.strategies, ["relay", "tcp-punch"]);
    assert_eq!(pb.strategies, pa.strategies);
    assert_eq!(pa.pair_id, pb.pair_id);
    assert_eq!(pa.relay_token, pb.relay_token);
    assert!(pa.relay_token.is_some());
    // The relay runs on the first peer's node.
    assert!(pa.relay_addrs.is_empty());
    assert_eq!(pb.relay_addrs, [n1]);
    assert_eq!(pb.relay_addr(n2), n1);
    assert_eq!(pa.observed, pb.peer);
    assert_eq!(pb.observed, pa.peer);
    for s in ["c", "d"] {
        for n in [n1, n2] {
            let err = RendezvousClient::join(n, "two-nodes", &names(), deadline(), || {})
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("already has two peers"),
                "{s}: {err}"
            );
        }
    }
    let (oa, ob) = tokio::join!(
        a.exchange_offer("tcp-punch", serde_json::json!("from a"), deadline()),
        b.exchange_offer("tcp-punch", serde_json::json!("from b"), deadline())
    );
    assert_eq!(oa.unwrap(), serde_json::json!("from b"));
    assert_eq!(ob.unwrap(), serde_json::json!("from a"));
    b.send_result("tcp-punch", false, Some("no luck".into()))
        .await
        .unwrap();
    a.send_result("tcp-punch", true, None).await.unwrap();
    assert_eq!(
        a.peer_result("tcp-punch", deadline()).await.unwrap(),
        Err("no luck".to_owned())
    );
    assert_eq!(
        b.peer_result("tcp-punch", deadline()).await.unwrap(),
        Ok(())
    );
    drop(b);
    let err = a.peer_result("relay", deadline()).await.unwrap_err();
    assert!(matches!(err, ClientError::PeerLeft), "{err}");
    drop(a);
    eventually("the store is empty once both left", || {
        cluster.session_values().is_empty()
    })
    .await;
}

/// Many sessions at once, both peers joining at the same instant through nodes chosen per
/// session (same node or not): every one pairs with one first and one second peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_across_nodes_all_pair() {
    let cluster = MemoryCluster::new();
    let config = ServerConfig {
        join_rate: 0,
        max_conns_per_ip: 0,
        ..ServerConfig::default()
    };
    let (n1, _t1) = node(&cluster, config.clone()).await;
    let (n2, _t2) = node(&cluster, config).await;
    let nodes = [n1, n2];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200usize {
        let (a, b) = (nodes[i % 2], nodes[(i / 2) % 2]);
        tasks.spawn(async move {
            let session = format!("many-{i}");
            let list = names();
            let (ra, rb) = tokio::join!(
                RendezvousClient::join(a, &session, &list, deadline(), || {}),
                RendezvousClient::join(b, &session, &list, deadline(), || {}),
            );
            let ((mut ca, pa), (mut cb, pb)) = (ra.unwrap(), rb.unwrap());
            assert_ne!(pa.role, pb.role, "{session}");
            let (oa, ob) = tokio::join!(
                ca.exchange_offer("relay", serde_json::json!(i), deadline()),
                cb.exchange_offer("relay", serde_json::json!(i + 1000), deadline())
            );
            assert_eq!(oa.unwrap(), serde_json::json!(i + 1000), "{session}");
            assert_eq!(ob.unwrap(), serde_json::json!(i), "{session}");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    eventually("the store is empty", || cluster.session_values().is_empty()).await;
}

/// A node stops with a first peer waiting on it: the next joiner of that session, on the
/// other node, finds the dead node's key, learns the node is gone and waits in its place; the
/// joiner after it pairs.
#[tokio::test]
async fn a_waiter_of_a_dead_node_is_replaced() {
    let cluster = MemoryCluster::new();
    let (n1, _t1) = node(&cluster, ServerConfig::default()).await;
    let (n2, t2) = node(&cluster, ServerConfig::default()).await;
    let (orphan, waiting) = join_waiting(n2, "orphan").await;
    waiting.await.unwrap();
    t2.abort();
    let err = orphan.await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Lost(_)), "{err}");
    let stale = cluster.session_values();
    assert_eq!(stale.len(), 1, "the dead node's key outlives it: {stale:?}");
    let (c, waiting) = join_waiting(n1, "orphan").await;
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the joiner waits in the dead waiter's place")
        .unwrap();
    let (_d, pd) = RendezvousClient::join(n1, "orphan", &names(), deadline(), || {})
        .await
        .unwrap();
    let (_c, pc) = c.await.unwrap().unwrap();
    assert_eq!((pc.role, pd.role), (Role::First, Role::Second));
    assert!(
        pd.relay_addrs.is_empty(),
        "same-node pairs relay on their node"
    );
}

/// A waiting key carries the session expiry (plus a second): a first peer that waits on a
/// node and a joiner after the expiry on another node do not pair, and the key is gone.
#[tokio::test]
async fn waiting_keys_expire_with_the_session() {
    let cluster = MemoryCluster::new();
    let config = ServerConfig {
        session_expiry: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let (n1, _t1) = node(&cluster, config.clone()).await;
    let (n2, t2) = node(&cluster, config).await;
    let (first, waiting) = join_waiting(n2, "short").await;
    waiting.await.unwrap();
    // The node dies without deleting the key: only its TTL removes it.
    t2.abort();
    let _ = first.await;
    assert_eq!(cluster.session_values().len(), 1);
    tokio::time::sleep(Duration::from_millis(1400)).await;
    assert!(
        cluster.session_values().is_empty(),
        "{:?}",
        cluster.session_values()
    );
    let (late, waiting) = join_waiting(n1, "short").await;
    waiting
        .await
        .expect("a new joiner waits: nobody to pair with");
    late.abort();
}

/// Redis's protected mode (or any refusal Redis sends before closing) reaches the operator in
/// Redis's own words, not as the client library's "broken pipe". The store here does what
/// Redis does to a client it refuses: writes one error line at once and closes.
#[tokio::test]
async fn a_redis_that_refuses_is_quoted() {
    const DENIED: &str = "-DENIED Redis is running in protected mode because protected mode is \
                          enabled and no password is set for the default user.\r\n";
    let refusing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redis_addr = refusing.local_addr().unwrap();
    let refuser = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        loop {
            let (mut s, _) = refusing.accept().await.unwrap();
            let _ = s.write_all(DENIED.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let config = nettool_rendezvous::ClusterConfig {
        redis_url: format!("redis://{redis_addr}"),
        public_addrs: vec!["127.0.0.1:0".parse().unwrap()],
    };
    let err = server.join_cluster(&config).await.unwrap_err().to_string();
    assert!(err.contains("cannot reach Redis"), "{err}");
    assert!(
        err.contains("DENIED Redis is running in protected mode"),
        "Redis's own reason is shown: {err}"
    );
    refuser.abort();
}
