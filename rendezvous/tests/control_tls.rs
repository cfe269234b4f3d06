//! The TLS control channel over loopback: joins over TLS with a pinned key, plain joins
//! refused by a TLS server, trust on first use and a changed key refused before anything is
//! sent, and the metrics and health endpoints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::client::{ClientError, RendezvousClient};
use nettool_core::control::{known_entry, ControlSecurity, KeyFingerprint, ServerTrust};
use nettool_rendezvous::{Reason, RendezvousServer, ServerConfig, ServerIdentity, ServerStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "nettool-control-tls-{name}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// A server with the identity at `key` (created if missing) on `addr`.
async fn start(
    addr: SocketAddr,
    key: &Path,
    plain_control: bool,
    tune: impl FnOnce(&mut ServerConfig),
) -> (SocketAddr, KeyFingerprint, ServerStats, JoinHandle<()>) {
    let identity = ServerIdentity::load_or_create(key).unwrap();
    let mut config = ServerConfig {
        tls: Some(identity.tls_config().unwrap()),
        plain_control,
        ..ServerConfig::default()
    };
    tune(&mut config);
    let server = RendezvousServer::bind(addr, config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    (
        addr,
        identity.fingerprint(),
        stats,
        tokio::spawn(server.run()),
    )
}

fn tls(pin: Option<KeyFingerprint>, known: Option<PathBuf>) -> ControlSecurity {
    ControlSecurity::Tls(Arc::new(ServerTrust::new(pin, known, None)))
}

async fn join(
    addr: SocketAddr,
    security: &ControlSecurity,
    session: &str,
) -> Result<(RendezvousClient, nettool_core::client::Pairing), ClientError> {
    let names = ["s".to_owned()];
    RendezvousClient::join_any(&[addr], security, session, &names, None, soon(), || {}).await
}

/// Both peers join over TLS with the key pinned, are paired and exchange offers.
#[tokio::test]
async fn peers_pair_over_tls_with_a_pinned_key() {
    let dir = tempdir("pinned");
    let (addr, key, stats, server) = start(
        "127.0.0.1:0".parse().unwrap(),
        &dir.join("id.pem"),
        false,
        |_| {},
    )
    .await;
    let security = tls(Some(key), None);
    let (a, b) = tokio::join!(join(addr, &security, "tls-pair"), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        join(addr, &security, "tls-pair").await
    });
    let ((mut a, _), (mut b, _)) = (a.unwrap(), b.unwrap());
    let (oa, ob) = tokio::join!(
        a.exchange_offer("s", serde_json::json!("from a"), soon()),
        b.exchange_offer("s", serde_json::json!("from b"), soon())
    );
    assert_eq!(oa.unwrap(), serde_json::json!("from b"));
    assert_eq!(ob.unwrap(), serde_json::json!("from a"));
    assert_eq!(stats.session_count(), 1);
    server.abort();
    let _ = std::fs::remove_dir_all(dir);
}

/// A plain JSON join to a TLS server is refused with a reason (and counted), unless the
/// server allows plain clients (`--insecure-control`).
#[tokio::test]
async fn a_plain_join_is_refused_unless_the_server_allows_it() {
    let dir = tempdir("plain");
    let (addr, _, stats, server) = start(
        "127.0.0.1:0".parse().unwrap(),
        &dir.join("id.pem"),
        false,
        |_| {},
    )
    .await;
    let err = join(addr, &ControlSecurity::Plain, "plain")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("requires TLS on its control channel"),
        "{text}"
    );
    assert!(text.contains("--insecure-control"), "{text}");
    assert_eq!(
        stats.session_count(),
        0,
        "the plain join created no session"
    );
    assert_eq!(stats.metrics().rejected(Reason::plain_control), 1);
    server.abort();

    let (addr, _, stats, server) = start(
        "127.0.0.1:0".parse().unwrap(),
        &dir.join("id.pem"),
        true,
        |_| {},
    )
    .await;
    let waiting = tokio::spawn(async move { join(addr, &ControlSecurity::Plain, "old").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let joined = join(addr, &ControlSecurity::Plain, "old").await;
    joined.unwrap();
    waiting.await.unwrap().unwrap();
    assert_eq!(stats.metrics().rejected(Reason::plain_control), 0);
    server.abort();
    let _ = std::fs::remove_dir_all(dir);
}

/// Trust on first use: the first key is remembered; a server with another key at the same
/// address is refused before anything is sent (the server sees no join), with an error naming
/// both keys and how to accept the new one; a pin of the new key accepts it and replaces the
/// entry. A pin that does not match is refused the same way.
#[tokio::test]
async fn a_changed_server_key_is_refused_and_names_both_keys() {
    let dir = tempdir("changed");
    let known = dir.join("known_servers");
    let (addr, first_key, _, first) = start(
        "127.0.0.1:0".parse().unwrap(),
        &dir.join("first.pem"),
        false,
        |_| {},
    )
    .await;
    let tofu = tls(None, Some(known.clone()));
    // First use: a waiting join (its key is recorded during the handshake).
    let waiting = tokio::spawn({
        let tofu = tofu.clone();
        async move { join(addr, &tofu, "first").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entry = known_entry(&known, addr)
        .unwrap()
        .expect("the key was remembered");
    assert_eq!(entry.key, first_key);
    waiting.abort();
    first.abort();
    let _ = first.await;

    // Another identity at the same address.
    let (addr2, second_key, stats, second) =
        start(addr, &dir.join("second.pem"), false, |_| {}).await;
    assert_eq!(addr2, addr);
    assert_ne!(first_key, second_key);
    let err = join(addr, &tofu, "second").await.unwrap_err();
    let ClientError::ServerKey(text) = &err else {
        panic!("expected a server key error, got {err:?}")
    };
    assert!(text.contains(&first_key.to_string()), "{text}");
    assert!(text.contains(&second_key.to_string()), "{text}");
    assert!(
        text.contains(&format!("--server-key {second_key}")),
        "{text}"
    );
    assert!(text.contains(&known.display().to_string()), "{text}");
    assert_eq!(stats.session_count(), 0, "nothing reached the server");

    // A pin of the old key is refused too, naming the pin.
    let err = join(addr, &tls(Some(first_key), Some(known.clone())), "second")
        .await
        .unwrap_err();
    let ClientError::ServerKey(text) = &err else {
        panic!("expected a server key error, got {err:?}")
    };
    assert!(text.contains("--server-key"), "{text}");
    assert_eq!(stats.session_count(), 0, "nothing reached the server");

    // Pinning the new key accepts it and replaces the entry.
    let pinned = tls(Some(second_key), Some(known.clone()));
    let waiting = tokio::spawn(async move { join(addr, &pinned, "accepted").await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.session_count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        stats.session_count(),
        1,
        "the pinned join reached the server"
    );
    assert_eq!(known_entry(&known, addr).unwrap().unwrap().key, second_key);
    // And trust on first use now accepts the new key.
    let joined = join(addr, &tofu, "accepted").await;
    joined.unwrap();
    waiting.await.unwrap().unwrap();
    second.abort();
    let _ = std::fs::remove_dir_all(dir);
}

/// `GET path` on `addr`: the status line and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out.lines().next().unwrap_or_default().to_owned();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// The value of the metric line starting with `name` (labels included in `name`).
fn metric(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/metrics` counts a pairing and a refusal by the join rate limit; `/healthz` says 200; an
/// unknown path is 404. The refused client is told why, over TLS.
#[tokio::test]
async fn metrics_count_pairings_and_refusals_and_health_is_ok() {
    let dir = tempdir("metrics");
    let identity = ServerIdentity::load_or_create(&dir.join("id.pem")).unwrap();
    let config = ServerConfig {
        tls: Some(identity.tls_config().unwrap()),
        join_rate: 1,
        join_burst: 2,
        ..ServerConfig::default()
    };
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
        .with_metrics("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (addr, metrics) = (server.local_addr().unwrap(), server.metrics_addr().unwrap());
    let running = tokio::spawn(server.run());
    let security = tls(Some(identity.fingerprint()), None);

    let (_, body) = http_get(metrics, "/metrics").await;
    assert_eq!(metric(&body, "nettool_pairings_total"), Some(0), "{body}");
    assert_eq!(
        metric(&body, "nettool_rejected_total{reason=\"join_rate\"}"),
        Some(0),
        "every limit's series is there from the start: {body}"
    );

    let (a, b) = tokio::join!(join(addr, &security, "m"), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        join(addr, &security, "m").await
    });
    let (_a, _b) = (a.unwrap(), b.unwrap());
    let refused = join(addr, &security, "third")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("too many joins"), "{refused}");

    let (status, body) = http_get(metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(metric(&body, "nettool_pairings_total"), Some(1), "{body}");
    assert_eq!(
        metric(&body, "nettool_rejected_total{reason=\"join_rate\"}"),
        Some(1),
        "{body}"
    );
    assert!(body.contains("nettool_sessions_waiting"), "{body}");
    assert!(body.contains("nettool_relay_links"), "{body}");
    assert!(body.contains("nettool_relay_bytes_total"), "{body}");
    assert!(body.contains("nettool_stun_requests_total"), "{body}");
    let (status, body) = http_get(metrics, "/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.trim(), "ok");
    let (status, _) = http_get(metrics, "/nope").await;
    assert!(status.contains("404"), "{status}");
    running.abort();
    let _ = std::fs::remove_dir_all(dir);
}

/// Servers starting at once with one identity file end up with one key.
#[test]
fn an_identity_created_by_racing_servers_is_one_key() {
    let dir = tempdir("race");
    let path = dir.join("state").join("id.pem");
    let keys: Vec<KeyFingerprint> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| ServerIdentity::load_or_create(&path).unwrap().fingerprint()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.windows(2).all(|w| w[0] == w[1]), "{keys:?}");
    assert_eq!(
        ServerIdentity::load_or_create(&path).unwrap().fingerprint(),
        keys[0],
        "the key persists"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is private to its owner");
    let _ = std::fs::remove_dir_all(dir);
}

/// A TLS client against a server that speaks plain JSON only (an older server) fails with a
/// message that says how to talk to it.
#[tokio::test]
async fn tls_to_a_plain_only_server_says_to_use_insecure_control() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    let running = tokio::spawn(server.run());
    let err = join(addr, &tls(None, None), "old-server")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("TLS with the rendezvous server"), "{text}");
    assert!(text.contains("--insecure-control"), "{text}");
    assert_eq!(stats.session_count(), 0);
    running.abort();
}
