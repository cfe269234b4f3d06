//! tcp-punch: TCP simultaneous open from one shared local port.
//!
//! 1. Bind a listener on one local port with SO_REUSEADDR + SO_REUSEPORT.
//! 2. From that same port, connect to the rendezvous server and ask what address it sees: the
//!    NAT's mapping of the port. The connection stays open (and the mapping with it) for the
//!    whole attempt.
//! 3. Offer the candidates (the observed public endpoint first, then this host's own addresses
//!    with the port) and the round trip to the server; the server hands both offers out at the
//!    same moment, so both peers start together.
//! 4. To every peer candidate, from the same port: first a SYN with a small TTL, enough to pass
//!    our own NAT but not to reach the peer's, so our mapping exists before the peer's SYN
//!    arrives (a reset-answering router on our side would otherwise refuse it, and a
//!    dropping one would cost a SYN retransmission); then after the start skew bound
//!    (half the larger server round trip) real SYNs, again and again until one connects.
//!    The listener accepts too: the first connection established in either direction whose
//!    link handshake passes wins.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nettool_config::TcpPunchConfig;
use nettool_core::client::observe;
use nettool_core::strategy::{agree_on_link, RawLink};
use nettool_core::{Attempt, Link, Strategy, StrategyError};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, trace};

/// The strategy's name.
pub const NAME: &str = "tcp-punch";

/// TCP simultaneous open.
#[derive(Debug, Clone)]
pub struct TcpPunch {
    config: TcpPunchConfig,
}

impl TcpPunch {
    /// A tcp-punch strategy with these settings.
    pub fn new(config: TcpPunchConfig) -> Self {
        Self { config }
    }
}

/// What each peer tells the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PunchOffer {
    /// Where this peer can be reached, best first (observed public endpoint, then own addresses).
    candidates: Vec<SocketAddr>,
    /// This peer's round trip to the server, in microseconds.
    server_rtt_us: u64,
}

/// Last error seen per candidate, for the report.
type DialErrors = Arc<Mutex<BTreeMap<SocketAddr, String>>>;

#[async_trait::async_trait]
impl Strategy for TcpPunch {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        let server = attempt.rendezvous.server();
        let unspecified: IpAddr = match server {
            SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let listener = listen(SocketAddr::new(unspecified, self.config.local_port))
            .map_err(|e| StrategyError::io("binding the punch port", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| StrategyError::io("reading the punch port", e))?
            .port();
        let local = SocketAddr::new(unspecified, port);

        // Let the server observe the NAT's mapping of the punch port.
        let obs_stream = connect_from(local, server, None)
            .await
            .map_err(|e| StrategyError::io(format!("observe connection to {server}"), e))?;
        let via = obs_stream
            .local_addr()
            .map_err(|e| StrategyError::io("reading the observe address", e))?;
        let (public, _observe_conn) = observe(obs_stream, attempt.deadline).await?;
        debug!(%public, "observed");

        let offer = PunchOffer {
            candidates: candidates(public, via, server.ip().is_loopback()),
            server_rtt_us: attempt
                .server_rtt
                .as_micros()
                .try_into()
                .unwrap_or(u64::MAX),
        };
        let payload = serde_json::to_value(&offer).expect("offer serializes");
        let theirs = attempt
            .rendezvous
            .exchange_offer(NAME, payload, attempt.deadline)
            .await?;
        let theirs: PunchOffer =
            serde_json::from_value(theirs).map_err(|e| StrategyError::BadOffer(e.to_string()))?;
        let peer_candidates: Vec<SocketAddr> = theirs
            .candidates
            .iter()
            .copied()
            .filter(|c| c.is_ipv4() == server.is_ipv4() && c.port() != 0)
            .collect();
        if peer_candidates.is_empty() {
            return Err(StrategyError::BadOffer(
                "no candidate address of this address family".into(),
            ));
        }
        debug!(candidates = ?peer_candidates, "peer offer");

        let peer_rtt = Duration::from_micros(theirs.server_rtt_us.min(60_000_000));
        let max_rtt = attempt.server_rtt.max(peer_rtt);
        // The server hands out both offers at once: the start skew is at most half the larger
        // round trip. Our primed mapping must exist before the peer's real SYN arrives.
        let prime = self
            .config
            .low_ttl
            .map(|ttl| (ttl, max_rtt / 2 + Duration::from_millis(2)));
        let syn_timeout = self
            .config
            .min_syn_timeout
            .max(2 * (attempt.server_rtt + peer_rtt));

        let (tx, rx) = mpsc::channel(16);
        let errors: DialErrors = Arc::default();
        // Dropping the JoinSet (on success, error or cancellation) aborts every dialer and the
        // acceptor, which closes their sockets.
        let mut tasks = JoinSet::new();
        for cand in peer_candidates.iter().copied() {
            tasks.spawn(dial_loop(
                local,
                cand,
                prime,
                syn_timeout,
                self.config.retry_interval,
                tx.clone(),
                errors.clone(),
            ));
        }
        tasks.spawn(accept_loop(listener, tx));

        let ctx = attempt.handshake_context(NAME);
        let stop = attempt
            .deadline
            .checked_sub(Duration::from_millis(50))
            .unwrap_or(attempt.deadline);
        let started = Instant::now();
        let agreed =
            tokio::time::timeout_at(stop.into(), agree_on_link(&ctx, rx, Duration::from_secs(5)))
                .await;
        tasks.abort_all();
        let raw = match agreed {
            Ok(res) => res?,
            Err(_) => {
                let errs = errors.lock().expect("errors poisoned");
                let detail = if errs.is_empty() {
                    "no answer from any candidate".to_owned()
                } else {
                    errs.iter()
                        .map(|(c, e)| format!("{c}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                return Err(StrategyError::TimedOut(format!(
                    "no authenticated connection within {:.1}s of punching ({detail})",
                    started.elapsed().as_secs_f64()
                )));
            }
        };
        let _ = raw.stream.set_nodelay(true);
        Ok(Link {
            stream: Box::new(raw.stream),
            local: raw.local,
            remote: raw.remote,
            strategy: NAME,
        })
    }
}

/// Our candidates: the observed public endpoint, the local address the server connection
/// used, then this host's other addresses (loopback only when the server is on loopback).
fn candidates(public: SocketAddr, via: SocketAddr, loopback: bool) -> Vec<SocketAddr> {
    let mut out = vec![public];
    let mut push = |a: SocketAddr| {
        if !out.contains(&a) {
            out.push(a);
        }
    };
    push(via);
    if let Ok(ifaces) = if_addrs::get_if_addrs() {
        for iface in ifaces {
            let ip = iface.ip();
            if ip.is_loopback() == loopback && ip.is_ipv4() == via.is_ipv4() {
                if let IpAddr::V6(v6) = ip {
                    if v6.segments()[0] & 0xffc0 == 0xfe80 {
                        continue; // link-local needs a scope id
                    }
                }
                push(SocketAddr::new(ip, via.port()));
            }
        }
    }
    out.retain(|a| a.ip().is_loopback() == loopback || *a == public);
    out
}

fn reuse_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = reuse_socket(addr)?;
    socket.listen(64)?;
    TcpListener::from_std(socket.into())
}

/// Connects from `local` to `remote`. With `ttl`, the SYN is sent with that TTL and the
/// socket's normal TTL is restored right after, so retransmissions and a simultaneous-open
/// SYN-ACK travel normally.
async fn connect_from(
    local: SocketAddr,
    remote: SocketAddr,
    ttl: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = reuse_socket(local)?;
    let normal_ttl = match ttl {
        Some(low) => {
            let normal = socket.ttl_v4()?;
            socket.set_ttl_v4(low)?;
            Some(normal)
        }
        None => None,
    };
    match socket.connect(&remote.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    if let Some(normal) = normal_ttl {
        socket.set_ttl_v4(normal)?;
    }
    let stream = TcpStream::from_std(socket.into())?;
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    // Writable without error means connected; peer_addr confirms it.
    stream.peer_addr()?;
    Ok(stream)
}

async fn dial_loop(
    local: SocketAddr,
    remote: SocketAddr,
    prime: Option<(u32, Duration)>,
    syn_timeout: Duration,
    retry_interval: Duration,
    tx: mpsc::Sender<RawLink<TcpStream>>,
    errors: DialErrors,
) {
    let record = |e: String| {
        errors.lock().expect("errors poisoned").insert(remote, e);
    };
    if let Some((ttl, delay)) = prime {
        let until = tokio::time::Instant::now() + delay;
        if remote.is_ipv4() {
            match tokio::time::timeout_at(until, connect_from(local, remote, Some(ttl))).await {
                Ok(Ok(stream)) => {
                    trace!(%remote, "connected during priming");
                    let _ = send(&tx, stream).await;
                    return;
                }
                Ok(Err(e)) => trace!(%remote, "primed SYN: {e}"),
                Err(_) => {}
            }
        }
        tokio::time::sleep_until(until).await;
    }
    loop {
        match tokio::time::timeout(syn_timeout, connect_from(local, remote, None)).await {
            Ok(Ok(stream)) => {
                trace!(%remote, "connected");
                let _ = send(&tx, stream).await;
                return;
            }
            Ok(Err(e)) => {
                trace!(%remote, "connect: {e}");
                record(e.to_string());
            }
            Err(_) => record(format!("no answer within {}ms", syn_timeout.as_millis())),
        }
        tokio::time::sleep(retry_interval).await;
    }
}

async fn accept_loop(listener: TcpListener, tx: mpsc::Sender<RawLink<TcpStream>>) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                trace!(%remote, "accepted");
                if send(&tx, stream).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn send(
    tx: &mpsc::Sender<RawLink<TcpStream>>,
    stream: TcpStream,
) -> Result<(), mpsc::error::SendError<RawLink<TcpStream>>> {
    let (Ok(local), Ok(remote)) = (stream.local_addr(), stream.peer_addr()) else {
        return Ok(());
    };
    tx.send(RawLink {
        stream,
        local,
        remote,
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_start_with_the_public_endpoint_and_stay_on_loopback() {
        let public: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let c = candidates(public, public, true);
        assert_eq!(c[0], public);
        assert!(c.iter().all(|a| a.ip().is_loopback()));
    }
}
