//! The server's STUN responder: RFC 5389 Binding on the main UDP port and, with a second
//! address, RFC 5780 behaviour discovery (RESPONSE-ORIGIN, OTHER-ADDRESS, CHANGE-REQUEST).
//!
//! With `other_address = IP2:P2` next to the main address `IP1:P1`, the server binds UDP on
//! all four combinations IP1:P1, IP1:P2, IP2:P1, IP2:P2 (and TCP on the three new ones, so
//! observe connections learn TCP mappings the same way). A request received on one socket is
//! answered from the socket its CHANGE-REQUEST points at (change IP flips the address, change
//! port flips the port); RESPONSE-ORIGIN names that socket and OTHER-ADDRESS the socket that
//! differs from the receiving one in both. Without a second address there is one socket,
//! no RFC 5780 attribute, and a CHANGE-REQUEST is answered with 420 (RFC 5780 §6.1).
//!
//! Answers are rate limited per source IP address (a token bucket of `stun_rate` per second
//! up to `stun_burst`): a STUN answer is larger than its request, so without a limit the
//! server amplifies a flood whose source address is spoofed to be a victim's. Requests over
//! the limit are dropped silently. The table of sources is bounded ([`MAX_TRACKED`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UdpSocket};
use tracing::{debug, warn};

use nettool_core::stun;

use crate::metrics::{Metrics, Reason};
use crate::Shared;

/// Most source addresses the rate limiter keeps a bucket for. When full, buckets that are
/// full again are swept; if none is, requests from new sources are dropped until one is.
pub(super) const MAX_TRACKED: usize = 65_536;

/// The STUN sockets of a server: one, or four with a second address (index = 2 × ip + port,
/// ip and port 0 = main, 1 = other).
#[derive(Debug)]
pub(super) struct StunSockets {
    sockets: Vec<Arc<UdpSocket>>,
}

impl StunSockets {
    /// The main socket's address.
    pub(super) fn main_addr(&self) -> io::Result<SocketAddr> {
        self.sockets[0].local_addr()
    }

    /// IP2:P2 with a second address.
    pub(super) fn other_addr(&self) -> Option<SocketAddr> {
        self.sockets.get(3)?.local_addr().ok()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Binds the STUN sockets for a server whose TCP listener is on `main` (its port is the real
/// one), and with `other` the extra TCP listeners (IP1:P2, IP2:P1, IP2:P2).
pub(super) async fn bind(
    main: SocketAddr,
    other: Option<SocketAddr>,
) -> io::Result<(StunSockets, Vec<TcpListener>)> {
    let udp = UdpSocket::bind(main).await?;
    let Some(other) = other else {
        return Ok((
            StunSockets {
                sockets: vec![Arc::new(udp)],
            },
            Vec::new(),
        ));
    };
    if main.ip().is_unspecified() {
        return Err(invalid(format!(
            "--other-address {other} needs a listen address with a specific IP, not {main} \
             (RFC 5780 answers must come from known addresses)"
        )));
    }
    if other.is_ipv4() != main.is_ipv4() {
        return Err(invalid(format!(
            "--other-address {other} and the listen address {main} are of different IP families"
        )));
    }
    if other.ip() == main.ip() {
        return Err(invalid(format!(
            "--other-address {other} must be a second IP address of this host, not the listen \
             address {} again (RFC 5780 change-IP needs two addresses)",
            main.ip()
        )));
    }
    if other.port() != 0 && other.port() == main.port() {
        return Err(invalid(format!(
            "--other-address {other} must use another port than the listen port {} \
             (RFC 5780 change-port needs two ports)",
            main.port()
        )));
    }
    let context = |what: SocketAddr| {
        move |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot bind {what} for RFC 5780 (is the other address on this host?): {e}"
                ),
            )
        }
    };
    // IP2:P2 first, so port 0 picks P2 for everything else.
    let tcp22 = TcpListener::bind(other).await.map_err(context(other))?;
    let p2 = tcp22.local_addr()?.port();
    let (ip1, p1, ip2) = (main.ip(), main.port(), other.ip());
    let a12 = SocketAddr::new(ip1, p2);
    let a21 = SocketAddr::new(ip2, p1);
    let a22 = SocketAddr::new(ip2, p2);
    let tcp12 = TcpListener::bind(a12).await.map_err(context(a12))?;
    let tcp21 = TcpListener::bind(a21).await.map_err(context(a21))?;
    let u12 = UdpSocket::bind(a12).await.map_err(context(a12))?;
    let u21 = UdpSocket::bind(a21).await.map_err(context(a21))?;
    let u22 = UdpSocket::bind(a22).await.map_err(context(a22))?;
    Ok((
        StunSockets {
            sockets: [udp, u12, u21, u22].into_iter().map(Arc::new).collect(),
        },
        vec![tcp12, tcp21, tcp22],
    ))
}

/// Per-source token buckets for STUN answers.
#[derive(Debug)]
pub(super) struct StunLimiter {
    rate: f64,
    burst: f64,
    by_ip: HashMap<IpAddr, Bucket>,
    /// Most entries kept.
    cap: usize,
    /// When the table was last swept because it was full.
    swept: Option<Instant>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl StunLimiter {
    /// A limiter of `rate` answers per second up to `burst` (at least 1) per source IP
    /// address; rate 0 = unlimited.
    pub(super) fn new(rate: u32, burst: u32, cap: usize) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            by_ip: HashMap::new(),
            cap: cap.max(1),
            swept: None,
        }
    }

    /// Whether a request from `ip` at `now` may be answered (and takes its token).
    pub(super) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        let full_again = |b: &Bucket| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate >= burst
        };
        if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= self.cap {
            // Sweep at most every 100 ms: a flood of new sources must not make every
            // request walk the whole table.
            if self
                .swept
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_millis(100))
            {
                self.swept = Some(now);
                self.by_ip.retain(|_, b| !full_again(b));
            }
            if self.by_ip.len() >= self.cap {
                return false;
            }
        }
        let bucket = self.by_ip.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Number of source addresses with a bucket.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.by_ip.len()
    }
}

/// Serves STUN on every socket until the task is dropped.
pub(super) async fn serve(sockets: StunSockets, shared: &Shared) {
    let config = &shared.config;
    let limiter = Arc::new(Mutex::new(StunLimiter::new(
        config.stun_rate,
        config.stun_burst,
        MAX_TRACKED,
    )));
    let sockets = Arc::new(sockets.sockets);
    let loops =
        (0..sockets.len()).map(|i| serve_one(sockets.clone(), i, limiter.clone(), &shared.metrics));
    futures::future::join_all(loops).await;
}

/// The answer to a datagram received on socket `index` from `from`, and the index of the
/// socket to send it from; `None` for a datagram that gets no answer.
fn answer(
    sockets: &[Arc<UdpSocket>],
    index: usize,
    packet: &[u8],
    from: SocketAddr,
) -> Option<(Vec<u8>, usize)> {
    if sockets.len() < 4 {
        // One address: plain RFC 5389, CHANGE-REQUEST refused with 420.
        return stun::answer(packet, from).map(|a| (a, index));
    }
    let req = stun::parse_request(packet)?;
    if !req.unknown.is_empty() {
        return Some((stun::unknown_attributes(&req), index));
    }
    let send_from = index ^ if req.change_ip { 2 } else { 0 } ^ if req.change_port { 1 } else { 0 };
    let origin = sockets[send_from].local_addr().ok();
    let other = sockets[index ^ 3].local_addr().ok();
    Some((
        stun::success_response(&req.id, from, origin, other),
        send_from,
    ))
}

async fn serve_one(
    sockets: Arc<Vec<Arc<UdpSocket>>>,
    index: usize,
    limiter: Arc<Mutex<StunLimiter>>,
    metrics: &Metrics,
) {
    let udp = &sockets[index];
    let mut buf = vec![0u8; 2048];
    let mut dropped: u64 = 0;
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors of earlier answers surface here (ECONNREFUSED and friends).
            Err(e) => {
                debug!("stun: receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let Some((reply, send_from)) = answer(&sockets, index, &buf[..n], from) else {
            debug!(%from, len = n, "stun: ignored a datagram that is not a binding request");
            continue;
        };
        metrics.stun_requests.inc();
        let allowed = limiter
            .lock()
            .expect("stun limiter poisoned")
            .allow(from.ip().to_canonical(), Instant::now());
        if !allowed {
            dropped += 1;
            metrics.reject(Reason::stun_rate);
            // One line per 1000 dropped requests per socket, not one per request.
            if dropped % 1000 == 1 {
                warn!(%from, dropped, "stun: answers to this source are rate limited (stun-rate)");
            }
            continue;
        }
        if let Err(e) = sockets[send_from].send_to(&reply, from).await {
            debug!(%from, "stun: sending the answer failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_the_burst_then_the_rate_per_source() {
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut l = StunLimiter::new(10, 5, 100);
        let allowed = (0..20).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, 5, "the burst, then nothing");
        // Another source has its own bucket.
        assert!(l.allow(b, t0));
        // 10 per second: after 300 ms, 3 more.
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!((0..20).filter(|_| l.allow(a, t1)).count(), 3);
        // Rate 0 = unlimited.
        let mut off = StunLimiter::new(0, 1, 1);
        assert!((0..1000).all(|_| off.allow(a, t0)));
    }

    #[test]
    fn limiter_table_is_bounded() {
        let t0 = Instant::now();
        let mut l = StunLimiter::new(1, 2, 50);
        for i in 0..200u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = l.allow(ip, t0);
        }
        assert_eq!(l.tracked(), 50);
        // Once the buckets are full again they are swept and new sources get theirs.
        let later = t0 + Duration::from_secs(10);
        assert!(l.allow("192.0.2.9".parse().unwrap(), later));
        assert_eq!(l.tracked(), 1);
    }
}
