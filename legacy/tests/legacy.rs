//! The legacy (original demo) server against clients written here that speak the original
//! protocol byte for byte: exact bytes, several pairs in a row, a first client that vanishes,
//! and garbage that must not break the next pair.
#![cfg(feature = "server")]

use std::net::SocketAddr;
use std::time::Duration;

use nettool_legacy::LegacyServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(5);

async fn start() -> SocketAddr {
    let server = LegacyServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

/// Reads exactly `n` bytes.
async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut buf))
        .await
        .expect("server answers in time")
        .expect("read");
    buf
}

/// Reads until the server closes; everything it sent.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut buf))
        .await
        .expect("server closes in time")
        .expect("read");
    buf
}

/// An original first client: connects, expects exactly `first\n\0` and nothing more yet.
async fn first(server: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(server).await.unwrap();
    assert_eq!(read_exact(&mut s, 7).await, b"first\n\0");
    s
}

/// One whole pair, checking every byte both clients receive and that both are closed.
async fn pair(server: SocketAddr) {
    let mut a = first(server).await;
    let a_addr = a.local_addr().unwrap();
    let mut b = TcpStream::connect(server).await.unwrap();
    let b_addr = b.local_addr().unwrap();
    let to_b = read_to_close(&mut b).await;
    assert_eq!(
        String::from_utf8_lossy(&to_b),
        format!("127.0.0.1 {} {}\n\0", a_addr.port(), b_addr.port())
    );
    let to_a = read_to_close(&mut a).await;
    assert_eq!(
        String::from_utf8_lossy(&to_a),
        format!("127.0.0.1 {}\n\0", b_addr.port())
    );
}

#[tokio::test]
async fn a_pair_gets_exactly_the_original_bytes() {
    let server = start().await;
    pair(server).await;
}

#[tokio::test]
async fn several_pairs_in_a_row() {
    let server = start().await;
    for _ in 0..5 {
        pair(server).await;
    }
}

#[tokio::test]
async fn a_first_client_that_vanishes_is_replaced_by_the_next() {
    let server = start().await;
    let gone = first(server).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The next client is told "first", and pairs with the one after it.
    pair(server).await;

    // Vanishing right before the second connects (no pause): the new client is either told
    // "first" (the server noticed) or paired with a dead peer; either way the server goes on.
    let gone = first(server).await;
    drop(gone);
    let mut c = TcpStream::connect(server).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(300), c.read_buf(&mut got)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    pair(server).await;
}

#[tokio::test]
async fn garbage_from_clients_does_not_break_the_next_pair() {
    let server = start().await;

    // A first client that sends a lot of garbage, then leaves.
    let mut junk = first(server).await;
    let garbage: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + 3) as u8).collect();
    junk.write_all(&garbage).await.unwrap();
    junk.write_all(b"\nfirst\n\0\xff\xfe 1.2.3.4 5 6\n")
        .await
        .unwrap();
    drop(junk);
    tokio::time::sleep(Duration::from_millis(200)).await;
    pair(server).await;

    // A first client that sends garbage but stays: it is still first and gets its peer.
    let mut a = first(server).await;
    a.write_all(b"GET / HTTP/1.1\r\n\r\n\0\0\0").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut b = TcpStream::connect(server).await.unwrap();
    // ... and a second that sends garbage right away.
    b.write_all(b"\x00\x01garbage\n").await.unwrap();
    let b_port = b.local_addr().unwrap().port();
    let to_b = read_to_close(&mut b).await;
    assert_eq!(
        String::from_utf8_lossy(&to_b),
        format!("127.0.0.1 {} {b_port}\n\0", a.local_addr().unwrap().port())
    );
    assert_eq!(
        String::from_utf8_lossy(&read_to_close(&mut a).await),
        format!("127.0.0.1 {b_port}\n\0")
    );

    // A client that connects and leaves at once, without reading anything.
    drop(TcpStream::connect(server).await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    pair(server).await;
}

#[tokio::test]
async fn concurrent_arrivals_are_paired_two_by_two() {
    let server = start().await;
    // Eight clients at once: every client gets exactly one valid line and then EOF, four are
    // "first" and the addresses cross-reference.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(server).await.unwrap();
            let local = s.local_addr().unwrap();
            let got = read_to_close(&mut s).await;
            (local, String::from_utf8(got).unwrap())
        }));
    }
    let mut firsts = 0;
    let mut links = Vec::new();
    for t in tasks {
        let (local, got) = t.await.unwrap();
        if let Some(rest) = got.strip_prefix("first\n\0") {
            firsts += 1;
            let words: Vec<&str> = rest.trim_end_matches(['\n', '\0']).split(' ').collect();
            assert_eq!(words.len(), 2, "{got:?}");
            links.push((local.port(), words[1].parse::<u16>().unwrap()));
        } else {
            let words: Vec<&str> = got.trim_end_matches(['\n', '\0']).split(' ').collect();
            assert_eq!(words.len(), 3, "{got:?}");
            assert!(got.ends_with("\n\0"));
            assert_eq!(words[2].parse::<u16>().unwrap(), local.port());
            links.push((words[1].parse::<u16>().unwrap(), local.port()));
        }
    }
    assert_eq!(firsts, 4);
    // Each (first, second) pair is reported by both of its members.
    links.sort_unstable();
    for chunk in links.chunks(2) {
        assert_eq!(chunk[0], chunk[1]);
    }
}
