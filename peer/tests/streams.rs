//! The library on loopback: two peers link through an in-process rendezvous server
//! (relay-first, default strategies: the session starts on the relay and moves to a direct
//! path), carry streams both ways over one session, and end in order.
//!
//! - Each stream has its own flow control: while B does not read a bulk stream, A's writer of
//!   4 MiB on it is held back by that stream's window (it has not finished), and an echo round
//!   trip on a second stream completes. Without per-stream windows the writer would have pushed
//!   everything into the session and finished; without a multiplexer the echo would wait
//!   behind the bulk bytes.
//! - Both sides' completions succeed: every byte confirmed.

use std::time::Duration;

use nettool_core::control::ControlSecurity;
use nettool_peer::Peer;
use nettool_rendezvous::{RendezvousServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_one_session_have_their_own_flow_control_and_end_in_order() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    // A's path events, to hold against its final report.
    let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = paths.clone();
    let peer = || {
        Peer::builder()
            .server(addr.to_string())
            .session("streams")
            .secret("k")
            .control(ControlSecurity::Plain)
    };
    let a_peer = peer().on_event(move |e| {
        if let nettool_peer::Event::Path { strategy, at_ms } = e {
            seen.lock().unwrap().push((strategy, at_ms));
        }
    });
    let (a, b) = tokio::join!(a_peer.connect(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer().connect().await
    });
    let (mut a, a_done) = a.unwrap().into_streams();
    let (mut b, b_done) = b.unwrap().into_streams();

    // A opens the bulk stream and writes 4 MiB that B does not read yet.
    let mut bulk = a.open().await.unwrap();
    let bulk_data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let writer = {
        let data = bulk_data.clone();
        tokio::spawn(async move {
            bulk.write_all(&data).await.unwrap();
            bulk.shutdown().await.unwrap();
        })
    };
    let mut bulk_in = b.accept().await.expect("B accepts the bulk stream");
    // Meanwhile an echo on a second stream, B opening it.
    let mut echo = b.open().await.unwrap();
    let echoer = tokio::spawn(async move {
        let mut s = a.accept().await.expect("A accepts the echo stream");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        s.shutdown().await.unwrap();
        a
    });
    let round_trip = async {
        echo.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        echo.read_exact(&mut back).await.unwrap();
        back
    };
    let back = tokio::time::timeout(Duration::from_secs(5), round_trip)
        .await
        .expect("the echo waited behind the unread bulk stream");
    assert_eq!(&back, b"hello");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !writer.is_finished(),
        "4 MiB went out on a stream nobody reads: no per-stream flow control"
    );
    echo.shutdown().await.unwrap();
    // Now B reads the bulk stream: all of it, in order.
    let mut got = Vec::new();
    bulk_in.read_to_end(&mut got).await.unwrap();
    assert!(
        got == bulk_data,
        "bulk stream: {} of {} bytes",
        got.len(),
        bulk_data.len()
    );
    writer.await.unwrap();
    let mut a = echoer.await.unwrap();
    // Both close; both sessions end in order with every byte confirmed.
    a.close();
    b.close();
    let (a_end, b_end) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(a_done.finished(), b_done.finished())
    })
    .await
    .expect("the sessions did not end");
    for (side, f) in [("A", &a_end), ("B", &b_end)] {
        assert!(f.succeeded(), "{side}: {:?}", f.end.kind);
        assert_eq!(f.end.sent, f.end.confirmed, "{side}");
    }
    assert!(a_end.end.sent > 4 << 20, "{:?}", a_end.end);
    // Every path the session ran on was told as it began, in order: relay-first starts on the
    // relay.
    let told = paths.lock().unwrap().clone();
    let reported: Vec<(String, u64)> = a_end
        .end
        .paths
        .iter()
        .map(|p| (p.strategy.clone(), p.from_ms))
        .collect();
    assert_eq!(told, reported);
    assert_eq!(
        told.first().map(|p| p.0.as_str()),
        Some("relay"),
        "{told:?}"
    );
}

/// A short code asked through the library links two peers (`ask_code`, then `code`), and the
/// stream carries bytes both ways; the code's session is the server's `code-N`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_asked_through_the_library_links_two_peers() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    let peer = || {
        Peer::builder()
            .server(addr.to_string())
            .control(ControlSecurity::Plain)
    };
    let code = peer().ask_code(2).await.unwrap();
    assert!(code.session().starts_with("code-"), "{}", code.session());
    let (a, b) = tokio::join!(peer().code(&code).connect(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer().code(&code).connect().await
    });
    let (mut a, a_done) = a.unwrap().into_stream();
    let (mut b, b_done) = b.unwrap().into_stream();
    a.write_all(b"from a").await.unwrap();
    a.shutdown().await.unwrap();
    b.write_all(b"from b").await.unwrap();
    b.shutdown().await.unwrap();
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    a.read_to_end(&mut got_a).await.unwrap();
    b.read_to_end(&mut got_b).await.unwrap();
    assert_eq!((&got_a[..], &got_b[..]), (&b"from b"[..], &b"from a"[..]));
    let (fa, fb) = tokio::join!(a_done.finished(), b_done.finished());
    assert!(
        fa.succeeded() && fb.succeeded(),
        "{:?} {:?}",
        fa.end.kind,
        fb.end.kind
    );
}
