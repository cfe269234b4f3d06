//! Birthday punching (design.md §9): udp-quic's mode for a pair where exactly one side's NAT
//! maps per destination (the *hard* side: CGNAT, cloud NAT gateways, the lab's `sym`) and the
//! other filters (the *easy* side: `cone`, `cone-rst`, `fw`), which plain punching cannot link.
//!
//! - The hard side opens K sockets and primes each with a low-TTL punch to the easy side's
//!   public mapping: K NAT mappings towards exactly that address exist, the easy router never
//!   sees the datagrams (a reset-answering router would otherwise leave a clashing entry).
//! - The easy side sends N probes (authenticated punches) to random ports of the hard side's
//!   public IP, the one the server observed: never another address. A probe that hits one of
//!   the K mappings is let in (the hard NAT has state for exactly that pair); the hard side
//!   answers from that socket, which the easy NAT lets in (it sent to that port).
//! - Both stop at the first authenticated punch that confirms the other heard them; QUIC then
//!   runs on the winning socket and every other socket closes at once. A hard side that dials
//!   QUIC (the keyed second peer) stops at the first probe instead: its Initial, right behind
//!   its answers, is the confirmation, and the easy side leaves it queued for its endpoint.
//!
//! P(hit) = 1 − (1 − K/R)^N for R ≈ 64,512 random ports: K = 256, N = 2048 gives ≈ 99.97%.
//! Hard caps per attempt: [`MAX_SOCKETS`] sockets, [`MAX_PROBES`] probes, [`MAX_RATE`] probes
//! per second, whatever the config says.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, trace};

use super::bind_udp;
use super::punch::{decode_punch, encode_punch, set_ttl, ttl, Punch, PunchKey, LOW_TTL};
use nettool_core::Role;

/// Most sockets the hard side opens per attempt.
pub(crate) const MAX_SOCKETS: u16 = 1024;
/// Most probes the easy side sends per attempt.
pub(crate) const MAX_PROBES: u32 = 8192;
/// Most probes per second.
pub(crate) const MAX_RATE: u32 = 5000;
/// How often a side repeats its confirmation until the other confirms too.
const CONFIRM_EVERY: Duration = Duration::from_millis(20);

/// Keys and identity of one birthday run.
pub(crate) struct Keys<'a> {
    pub(crate) mine: &'a PunchKey,
    pub(crate) peer: &'a PunchKey,
    pub(crate) pair_id: &'a str,
    pub(crate) role: Role,
}

impl Keys<'_> {
    fn punch(&self, heard: bool) -> Vec<u8> {
        encode_punch(
            self.mine,
            self.pair_id,
            Punch {
                role: self.role,
                heard,
            },
        )
    }

    fn check(&self, packet: &[u8]) -> Option<Punch> {
        decode_punch(self.peer, self.pair_id, self.role.other(), packet).ok()
    }
}

/// What a run produced: where the peer answered from, and the probes sent or received.
pub(crate) struct Outcome<S> {
    pub(crate) peer: SocketAddr,
    pub(crate) socket: S,
    pub(crate) probes: u64,
}

/// Why a run produced nothing.
pub(crate) struct Miss {
    pub(crate) probes: u64,
    pub(crate) detail: String,
}

/// The easy side: probes random ports of `peer_ip` from `socket` at `rate` per second, at
/// most `n` of them, until an authenticated punch confirms (or, when the hard side dials
/// QUIC, its Initial follows an answer: left queued on the socket).
pub(crate) async fn easy(
    socket: &UdpSocket,
    keys: &Keys<'_>,
    peer_ip: IpAddr,
    n: u32,
    rate: u32,
    stop: Instant,
) -> Result<Outcome<()>, Miss> {
    let n = n.min(MAX_PROBES);
    let rate = rate.clamp(1, MAX_RATE);
    // Send in batches every 10 ms.
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut sent: u64 = 0;
    let mut heard: HashSet<SocketAddr> = HashSet::new();
    let mut next = tokio::time::Instant::now();
    let mut confirm_next = tokio::time::Instant::now() + CONFIRM_EVERY;
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(stop.into()) => {
                return Err(Miss {
                    probes: sent,
                    detail: format!(
                        "birthday: {sent} probes to random ports of {peer_ip}, no authenticated answer{}",
                        if heard.is_empty() { String::new() } else { format!(" confirmed (heard {heard:?})") }
                    ),
                });
            }
            () = tokio::time::sleep_until(next), if sent < u64::from(n) => {
                let punch = keys.punch(!heard.is_empty());
                let batch = u64::from(per_tick).min(u64::from(n) - sent);
                let ports: Vec<u16> = {
                    let mut rng = rand::thread_rng();
                    (0..batch).map(|_| rng.gen_range(1024..=65535)).collect()
                };
                for port in ports {
                    // Not `try_send_to`: a socket tokio has not yet seen writable refuses it.
                    // ICMP errors of earlier probes surface here: not this one's fault.
                    let _ = socket.send_to(&punch, SocketAddr::new(peer_ip, port)).await;
                    sent += 1;
                }
                next += tick;
            }
            () = tokio::time::sleep_until(confirm_next), if !heard.is_empty() => {
                let punch = keys.punch(true);
                for to in &heard {
                    let _ = socket.send_to(&punch, *to).await;
                }
                confirm_next += CONFIRM_EVERY;
            }
            got = socket.peek_from(&mut buf) => {
                // An error is an ICMP error of an earlier probe (reading it cleared it).
                let Ok((len, from)) = got else { continue };
                let from = nettool_core::candidates::canonical(from);
                // The hard side dials QUIC as soon as a probe reached it: its Initial, from an
                // address that answered, stays queued for this side's QUIC endpoint.
                if heard.contains(&from) && is_quic_initial(&buf[..len]) {
                    return Ok(Outcome { peer: from, socket: (), probes: sent });
                }
                let _ = socket.recv_from(&mut buf).await;
                // Only the peer's public IP; the punch proves the rest.
                let Some(p) = keys.check(&buf[..len]).filter(|_| from.ip() == peer_ip) else {
                    continue;
                };
                trace!(%from, heard = p.heard, "birthday: valid punch");
                if heard.insert(from) {
                    debug!(%from, probes = sent, "birthday: a probe hit");
                }
                let _ = socket.send_to(&keys.punch(true), from).await;
                if p.heard {
                    for _ in 0..3 {
                        let _ = socket.send_to(&keys.punch(true), from).await;
                    }
                    return Ok(Outcome { peer: from, socket: (), probes: sent });
                }
            }
        }
    }
}

/// The hard side: opens `k` sockets, primes each towards `easy` (the easy side's public
/// mappings, low TTL), and waits for a probe; answers from the socket it hit until the easy
/// side confirms. Returns that socket; the others are closed.
///
/// With `dials` (this side dials QUIC next), the first authenticated probe is enough: the
/// path works both ways once a probe came in (the easy side's probe opened its filter for
/// the very mapping it hit), so this side answers a few times and returns at once; its QUIC
/// Initial, right behind the answers, is what the easy side's endpoint then takes. A round
/// trip less than waiting for the easy side's confirmation.
pub(crate) async fn hard(
    local_ip: IpAddr,
    keys: &Keys<'_>,
    easy: &[SocketAddr],
    k: u16,
    (ipv4, dials): (bool, bool),
    stop: Instant,
) -> Result<Outcome<UdpSocket>, Miss> {
    let k = k.clamp(1, MAX_SOCKETS);
    let mut sockets: Vec<Arc<UdpSocket>> = Vec::with_capacity(usize::from(k));
    let prime = keys.punch(false);
    let mut normal_ttl = 64;
    for _ in 0..k {
        let Ok(socket) = bind_udp(SocketAddr::new(local_ip, 0)) else {
            break; // out of descriptors or ports: use what we have
        };
        normal_ttl = ttl(&socket, ipv4).unwrap_or(normal_ttl);
        let _ = set_ttl(&socket, ipv4, LOW_TTL);
        // Not `try_send_to`: a fresh socket is not writable for tokio until its reactor says
        // so, and a prime that is not sent makes no mapping.
        for to in easy {
            let _ = socket.send_to(&prime, *to).await;
        }
        sockets.push(Arc::new(socket));
    }
    // Back to a normal TTL for the answers.
    for socket in &sockets {
        let _ = set_ttl(socket, ipv4, normal_ttl);
    }
    let opened = sockets.len();
    debug!(sockets = opened, "birthday: hard side primed");
    let (tx, mut rx) = mpsc::channel::<(usize, SocketAddr, bool)>(64);
    let mut readers = JoinSet::new();
    for (i, socket) in sockets.iter().enumerate() {
        let (socket, tx) = (socket.clone(), tx.clone());
        let peer_key = *keys.peer;
        let (pair_id, from_role) = (keys.pair_id.to_owned(), keys.role.other());
        let easy: Vec<IpAddr> = easy.iter().map(SocketAddr::ip).collect();
        readers.spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                // Peeked first: the easy side starts its QUIC handshake on this socket as soon
                // as it heard from it, and that handshake's first datagram may come before the
                // easy side's confirmation does. Read and dropped here, it would be retried
                // only after QUIC's loss timer (the better part of a second at a distance).
                let Ok((len, from)) = socket.peek_from(&mut buf).await else {
                    // An ICMP error of an earlier prime, reported once.
                    continue;
                };
                let from = nettool_core::candidates::canonical(from);
                let packet = &buf[..len];
                let punch = easy
                    .contains(&from.ip())
                    .then(|| decode_punch(&peer_key, &pair_id, from_role, packet).ok())
                    .flatten();
                if punch.is_none() && easy.contains(&from.ip()) && is_quic_initial(packet) {
                    // The easy side is on QUIC through this socket: it won. The datagram
                    // stays queued for the QUIC endpoint that takes the socket over.
                    let _ = tx.send((i, from, true)).await;
                    return;
                }
                // Taken off the socket: a punch, or a stranger's datagram (dropped).
                let _ = socket.recv_from(&mut buf).await;
                if let Some(p) = punch {
                    if tx.send((i, from, p.heard)).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let mut received: u64 = 0;
    let mut hits: Vec<(usize, SocketAddr)> = Vec::new();
    let mut confirm_next = tokio::time::Instant::now() + CONFIRM_EVERY;
    let winner = loop {
        tokio::select! {
            () = tokio::time::sleep_until(stop.into()) => {
                return Err(Miss {
                    probes: received,
                    detail: format!(
                        "birthday: {opened} sockets primed towards {easy:?}, {received} probes arrived, no confirmation"
                    ),
                });
            }
            () = tokio::time::sleep_until(confirm_next), if !hits.is_empty() => {
                let punch = keys.punch(true);
                for (i, to) in &hits {
                    let _ = sockets[*i].send_to(&punch, *to).await;
                }
                confirm_next += CONFIRM_EVERY;
            }
            got = rx.recv() => {
                let Some((i, from, heard)) = got else { continue };
                received += 1;
                if !hits.contains(&(i, from)) {
                    debug!(socket = i, %from, "birthday: a probe arrived");
                    hits.push((i, from));
                }
                let _ = sockets[i].send_to(&keys.punch(true), from).await;
                if heard || dials {
                    for _ in 0..3 {
                        let _ = sockets[i].send_to(&keys.punch(true), from).await;
                    }
                    break (i, from);
                }
            }
        }
    };
    readers.shutdown().await;
    let (i, peer) = winner;
    let socket = sockets.swap_remove(i);
    drop(sockets); // every other socket closes here
    let socket = Arc::try_unwrap(socket).map_err(|_| Miss {
        probes: received,
        detail: "birthday: the winning socket is still shared".into(),
    })?;
    Ok(Outcome {
        peer,
        socket,
        probes: received,
    })
}

/// Whether `packet` is a QUIC version 1 long-header Initial (RFC 9000 §17.2: header form and
/// fixed bits set, packet type 0, version 1).
fn is_quic_initial(packet: &[u8]) -> bool {
    packet.len() >= 5 && packet[0] & 0xf0 == 0xc0 && packet[1..5] == [0, 0, 0, 1]
}

#[cfg(test)]
mod quic_initial_tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn a_quic_initial_is_told_from_other_datagrams() {
        assert!(is_quic_initial(&[0xc3, 0, 0, 0, 1, 8]));
        // A Handshake packet (type 2), another version, a short header, too short.
        assert!(!is_quic_initial(&[0xe3, 0, 0, 0, 1, 8]));
        assert!(!is_quic_initial(&[0xc3, 0x6b, 0x33, 0x43, 0xcf]));
        assert!(!is_quic_initial(&[0x43, 0, 0, 0, 1]));
        assert!(!is_quic_initial(&[0xc3, 0, 0]));
    }

    fn test_key(s: &str) -> PunchKey {
        sha2::Sha256::digest(s.as_bytes()).into()
    }

    /// The hard side's keys in the tests (the second peer, pairing "p").
    fn hard_side_keys<'a>(hard_key: &'a PunchKey, easy_key: &'a PunchKey) -> Keys<'a> {
        Keys {
            mine: hard_key,
            peer: easy_key,
            pair_id: "p",
            role: Role::Second,
        }
    }

    /// The easy side of a test: waits for the hard side's first prime and answers the socket
    /// it came from with one probe; returns that socket's address.
    async fn probe_the_first_prime(easy_socket: &UdpSocket, easy_key: &PunchKey) -> SocketAddr {
        let mut buf = [0u8; 2048];
        let (_, to) = easy_socket.recv_from(&mut buf).await.unwrap();
        let probe = encode_punch(
            easy_key,
            "p",
            Punch {
                role: Role::First,
                heard: false,
            },
        );
        easy_socket.send_to(&probe, to).await.unwrap();
        to
    }

    /// The easy side's QUIC Initial right behind its answer (before its confirmation) stays
    /// queued on the winning socket for the QUIC endpoint: read and dropped by the hard side's
    /// probe readers, QUIC would resend it only after its loss timer.
    #[tokio::test]
    async fn the_easy_sides_quic_initial_waits_on_the_winning_socket() {
        let (hard_key, easy_key) = (test_key("hard"), test_key("easy"));
        let easy_socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let easy_addr = easy_socket.local_addr().unwrap();
        let hard_keys = hard_side_keys(&hard_key, &easy_key);
        let stop = Instant::now() + Duration::from_secs(5);
        let easy_addrs = [easy_addr];
        let hard_side = hard(
            "127.0.0.1".parse().unwrap(),
            &hard_keys,
            &easy_addrs,
            4,
            (true, false),
            stop,
        );
        let easy_side = async {
            // The primes tell where the hard side's sockets are; answer the first with a
            // probe, then at once (as the real easy side dials when it hears back) the Initial.
            let to = probe_the_first_prime(&easy_socket, &easy_key).await;
            let mut buf = [0u8; 2048];
            loop {
                let (n, from) = easy_socket.recv_from(&mut buf).await.unwrap();
                let answer = decode_punch(&hard_key, "p", Role::Second, &buf[..n]);
                if from == to && answer.is_ok_and(|p| p.heard) {
                    break;
                }
            }
            let initial = [0xc3, 0, 0, 0, 1, 0x55, 0x55];
            easy_socket.send_to(&initial, to).await.unwrap();
            to
        };
        let (won, to) = tokio::join!(hard_side, easy_side);
        let won = won.unwrap_or_else(|m| panic!("{}", m.detail));
        assert_eq!(won.peer, easy_addr);
        assert_eq!(won.socket.local_addr().unwrap(), to);
        let mut buf = [0u8; 64];
        let (n, from) =
            tokio::time::timeout(Duration::from_secs(1), won.socket.recv_from(&mut buf))
                .await
                .expect("the Initial is still queued on the winning socket")
                .unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&[0xc3, 0, 0, 0, 1, 0x55, 0x55][..], easy_addr)
        );
    }

    /// A hard side that dials QUIC next returns at the first authenticated probe, without the
    /// easy side's confirmation (which this easy side never sends), from the socket it hit;
    /// one that accepts QUIC waits for the confirmation (here: until its stop).
    #[tokio::test]
    async fn a_hard_side_that_dials_needs_no_confirmation() {
        let (hard_key, easy_key) = (test_key("hard"), test_key("easy"));
        for dials in [true, false] {
            let easy_socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let easy_addr = easy_socket.local_addr().unwrap();
            let hard_keys = hard_side_keys(&hard_key, &easy_key);
            let stop = Instant::now() + Duration::from_millis(1500);
            let easy_addrs = [easy_addr];
            let hard_side = hard(
                "127.0.0.1".parse().unwrap(),
                &hard_keys,
                &easy_addrs,
                4,
                (true, dials),
                stop,
            );
            // One probe to the first primed socket; answers are never confirmed.
            let easy_side = probe_the_first_prime(&easy_socket, &easy_key);
            let (won, to) = tokio::join!(hard_side, easy_side);
            match (dials, won) {
                (true, Ok(won)) => {
                    assert_eq!(won.peer, easy_addr);
                    assert_eq!(won.socket.local_addr().unwrap(), to);
                }
                (true, Err(m)) => panic!("the dialing hard side waited: {}", m.detail),
                (false, Ok(_)) => panic!("the accepting hard side took an unconfirmed path"),
                (false, Err(m)) => assert!(m.detail.contains("no confirmation"), "{}", m.detail),
            }
        }
    }
}
