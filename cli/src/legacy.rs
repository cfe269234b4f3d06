//! The original demo's 8877 text protocol (`rendezvous --legacy`, `connect --legacy`) and its
//! hello-world exchange (`--hello`, on both protocols).
//!
//! The protocol, the server and the punching client live in `nettool_core::legacy`; this
//! module wires them to the command line and prints what the original programs printed.
//!
//! `--hello-count N` (or `NETTOOL_HELLO_COUNT`) bounds the hello exchange for scripts and
//! tests: the first peer sends N messages and then closes its sending side; the second stops
//! after N messages.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nettool_core::{Link, Role};
use nettool_legacy::{
    LegacyEvent, LegacyLink, LegacyServer, LineSplitter, HELLO_MESSAGE, HELLO_TEXT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `nettool rendezvous --legacy`: serves the original protocol on `listen`.
pub(crate) async fn serve(listen: SocketAddr) -> Result<i32> {
    let server = LegacyServer::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!(
        "nettool rendezvous: listening on {} (tcp, the original demo's protocol: clients are \
         paired in arrival order)",
        server.local_addr()?
    );
    tokio::select! {
        () = server.run() => {}
        _ = tokio::signal::ctrl_c() => eprintln!("nettool rendezvous: interrupted, stopping"),
    }
    Ok(0)
}

fn progress(event: LegacyEvent) {
    match event {
        LegacyEvent::Connected { local } => {
            eprintln!("nettool: connected to the legacy rendezvous server from {local}")
        }
        LegacyEvent::ToldFirst => {
            eprintln!("nettool: told \"first\"; waiting for the second client")
        }
        LegacyEvent::Introduced { role, peer } => {
            eprintln!("nettool: paired as {role}; peer at {peer}; punching")
        }
        _ => {}
    }
}

/// `nettool connect --legacy`: one original-protocol client that punches properly.
pub(crate) async fn connect(
    server: SocketAddr,
    hello: bool,
    hello_count: Option<u64>,
    timeout: Duration,
) -> Result<i32> {
    let deadline = Instant::now() + timeout;
    let LegacyLink { link, role } = nettool_legacy::connect(server, deadline, &progress)
        .await
        .context("no link")?;
    eprintln!(
        "nettool: linked with {} via {} (plain TCP, not authenticated): {} -> {}",
        role.other(),
        link.strategy,
        link.local,
        link.remote
    );
    if hello {
        return self::hello(link, role, hello_count).await;
    }
    let stop = crate::pump::signals().context("installing signal handlers")?;
    crate::pump_and_report(link, stop).await
}

/// `--hello`: the first peer sends "Hello, world\n\0" once a second and prints
/// "send message: Hello, world"; the second prints "recv message: <text>" for each message it
/// receives. Ends when the peer closes the link (exit 0) or after `count` messages.
pub(crate) async fn hello(link: Link, role: Role, count: Option<u64>) -> Result<i32> {
    match role {
        Role::First => send_hellos(link, count).await,
        Role::Second => recv_hellos(link, count).await,
    }
}

fn is_peer_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
    )
}

async fn send_hellos(link: Link, count: Option<u64>) -> Result<i32> {
    let (mut rd, mut wr) = tokio::io::split(link.stream);
    // The peer sends nothing in the demo; reading notices when it closes the link.
    let peer_closed = async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if is_peer_gone(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    let sending = async {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        let mut sent = 0u64;
        while count.is_none_or(|n| sent < n) {
            ticks.tick().await;
            match wr.write_all(HELLO_MESSAGE).await {
                Ok(()) => {}
                Err(e) if is_peer_gone(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
            println!("send message: {HELLO_TEXT}");
            sent += 1;
        }
        wr.shutdown().await?;
        Ok(true)
    };
    tokio::select! {
        r = peer_closed => {
            r.context("reading from the peer")?;
            eprintln!("nettool: the peer closed the link");
        }
        r = sending => {
            if r.context("sending to the peer")? {
                eprintln!("nettool: sent {} messages; done", count.unwrap_or(0));
            } else {
                eprintln!("nettool: the peer closed the link");
            }
        }
    }
    Ok(0)
}

async fn recv_hellos(link: Link, count: Option<u64>) -> Result<i32> {
    let mut stream = link.stream;
    let mut splitter = LineSplitter::new();
    let mut received = 0u64;
    let mut buf = [0u8; 4096];
    let done = |received: u64| count.is_some_and(|n| received >= n);
    while !done(received) {
        let n = match stream.read(&mut buf).await {
            Ok(n) => n,
            Err(e) if is_peer_gone(&e) => 0,
            Err(e) => return Err(e).context("receiving from the peer"),
        };
        let messages = if n == 0 {
            splitter.finish().into_iter().collect()
        } else {
            splitter.push(&buf[..n])
        };
        for message in messages {
            if done(received) {
                break;
            }
            println!("recv message: {message}");
            received += 1;
        }
        if n == 0 {
            eprintln!("nettool: the peer closed the link after {received} messages");
            return Ok(0);
        }
    }
    eprintln!("nettool: received {received} messages; done");
    Ok(0)
}
