//! Punch datagrams: their authenticated wire format and the punching run over the attempt's
//! socket (priming with a low TTL, rounds, confirmation).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nettool_core::candidates::{canonical, start_delay, MAX_CANDIDATES_PER_FAMILY};
use nettool_core::{Role, StrategyError};
use rand::RngCore;
use tokio::net::UdpSocket;
use tracing::{debug, trace, warn};

use super::NAME;

/// TTL of the first punch datagram to each candidate: passes the own NAT, not the peer's.
pub(super) const LOW_TTL: u32 = 2;
/// First bytes of a punch datagram. The first byte has QUIC's fixed bit (0x40) clear, so a late
/// punch is never taken for a QUIC packet.
const PUNCH_MAGIC: [u8; 4] = [0x00, b'N', b'T', b'P'];
const PUNCH_VERSION: u8 = 2;
const PUNCH_LABEL: &[u8] = b"nettool udp punch v2";
const NONCE_LEN: usize = 16;
const PUNCH_LEN: usize = 4 + 1 + 1 + 1 + NONCE_LEN + 32;
/// Most addresses punched per attempt: the validated candidates plus addresses valid punches
/// came from.
const MAX_TARGETS: usize = 2 * MAX_CANDIDATES_PER_FAMILY;
/// Most punch datagrams sent to one address per attempt (at the default 50 ms interval, more
/// than a 10 s attempt needs).
const MAX_PUNCHES_PER_TARGET: u64 = 256;
/// Flag: the sender has heard a valid punch from the receiver.
const FLAG_HEARD: u8 = 0x01;

/// What a punch datagram says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Punch {
    pub(super) role: Role,
    pub(super) heard: bool,
}

/// Why a datagram is not a valid punch from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PunchError {
    /// Not a punch datagram at all (QUIC, STUN, noise).
    NotAPunch,
    /// A punch, but the tag does not match: another session, pairing or secret.
    BadTag,
    /// A valid punch claiming our own role (our own datagram reflected, or a confused peer).
    SameRole,
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::First => 1,
        Role::Second => 2,
    }
}

/// A punch key from a peer's offer.
pub(super) fn parse_punch_key(hex_text: &str) -> Result<PunchKey, StrategyError> {
    hex::decode(hex_text)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| StrategyError::BadOffer("punch key is not 32 bytes of hex".into()))
}

/// Key of one peer's punch datagrams in one attempt.
pub(super) type PunchKey = [u8; 32];

fn punch_tag(key: &PunchKey, pair_id: &str, head: &[u8], nonce: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key length");
    for part in [
        PUNCH_LABEL,
        pair_id.as_bytes(),
        NAME.as_bytes(),
        head,
        nonce,
    ] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub(super) fn encode_punch(key: &PunchKey, pair_id: &str, punch: Punch) -> Vec<u8> {
    let mut out = Vec::with_capacity(PUNCH_LEN);
    out.extend_from_slice(&PUNCH_MAGIC);
    out.push(PUNCH_VERSION);
    out.push(role_byte(punch.role));
    out.push(if punch.heard { FLAG_HEARD } else { 0 });
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    let tag = punch_tag(key, pair_id, &out[4..7], &nonce);
    out.extend_from_slice(&tag);
    out
}

/// Checks a datagram claimed to come from the peer (whose role is `from_role`).
pub(super) fn decode_punch(
    key: &PunchKey,
    pair_id: &str,
    from_role: Role,
    packet: &[u8],
) -> Result<Punch, PunchError> {
    if packet.len() != PUNCH_LEN || packet[..4] != PUNCH_MAGIC || packet[4] != PUNCH_VERSION {
        return Err(PunchError::NotAPunch);
    }
    let role = match packet[5] {
        1 => Role::First,
        2 => Role::Second,
        _ => return Err(PunchError::NotAPunch),
    };
    let nonce = &packet[7..7 + NONCE_LEN];
    let expected = punch_tag(key, pair_id, &packet[4..7], nonce);
    let got = &packet[7 + NONCE_LEN..];
    // Constant-time comparison.
    if expected
        .iter()
        .zip(got)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        != 0
    {
        return Err(PunchError::BadTag);
    }
    if role != from_role {
        return Err(PunchError::SameRole);
    }
    Ok(Punch {
        role,
        heard: packet[6] & FLAG_HEARD != 0,
    })
}

/// One punching run over the attempt's socket.
pub(super) struct Puncher<'a> {
    pub(super) socket: &'a UdpSocket,
    /// Our punch key (in our offer).
    pub(super) my_key: &'a PunchKey,
    /// The peer's punch key (from its offer).
    pub(super) peer_key: &'a PunchKey,
    pub(super) pair_id: &'a str,
    pub(super) role: Role,
    /// This side accepts the QUIC connection (the other dials once it is done punching): a
    /// QUIC long-header packet from an address that punched through ends the punching.
    pub(super) accepts_quic: bool,
    pub(super) interval: Duration,
    pub(super) full_ttl_delay: Duration,
}

/// Why punching produced no path.
pub(super) struct PunchFailure {
    pub(super) timed_out: bool,
    pub(super) detail: String,
}

/// What was seen per address, for the report.
#[derive(Default)]
struct Seen {
    sent: u64,
    send_error: Option<String>,
    valid: u64,
    bad_tag: u64,
    other: u64,
}

impl Puncher<'_> {
    fn punch(&self, heard: bool) -> Vec<u8> {
        encode_punch(
            self.my_key,
            self.pair_id,
            Punch {
                role: self.role,
                heard,
            },
        )
    }

    async fn send(&self, to: SocketAddr, heard: bool, seen: &mut BTreeMap<SocketAddr, Seen>) {
        let entry = seen.entry(to).or_default();
        if entry.sent >= MAX_PUNCHES_PER_TARGET {
            return;
        }
        entry.sent += 1;
        match self.socket.send_to(&self.punch(heard), to).await {
            Ok(_) => {}
            // ICMP errors of earlier datagrams surface on later sends: not this one's fault.
            Err(e) => {
                trace!(%to, "punch send: {e}");
                entry.send_error = Some(e.to_string());
            }
        }
    }

    /// Punches until a valid punch from the peer was heard and the peer confirmed hearing
    /// ours; returns the peer's addresses that punched through: first the one the confirming
    /// punch came from (or, on the side that accepts QUIC, the one the peer's QUIC packets
    /// come from), then every other address a valid punch came from, so QUIC can try them all.
    pub(super) async fn run(
        &self,
        peer_candidates: &[SocketAddr],
        stop: Instant,
    ) -> Result<Vec<SocketAddr>, PunchFailure> {
        let paths = |best: SocketAddr, heard: &HashSet<SocketAddr>| {
            let mut out = vec![best];
            out.extend(heard.iter().copied().filter(|a| *a != best));
            // IPv6 paths first (ICE-style): every one of them punched through.
            out.sort_by_key(SocketAddr::is_ipv4);
            out
        };
        let mut targets: Vec<SocketAddr> = peer_candidates.to_vec();
        let mut seen: BTreeMap<SocketAddr, Seen> = BTreeMap::new();
        let mut heard_from: HashSet<SocketAddr> = HashSet::new();
        let mut confirmed: Option<SocketAddr> = None;

        // Prime: the first datagram to each candidate with a low TTL (IPv4) or hop limit
        // (IPv6); a dual-stack socket has both.
        let ipv4 = self.socket.local_addr().is_ok_and(|a| a.is_ipv4());
        let families: &[bool] = if ipv4 { &[true] } else { &[false, true] };
        let normal: Vec<(bool, u32)> = families
            .iter()
            .filter_map(|&v4| ttl(self.socket, v4).ok().map(|t| (v4, t)))
            .collect();
        let primed = !normal.is_empty();
        if primed {
            for &(v4, _) in &normal {
                if let Err(e) = set_ttl(self.socket, v4, LOW_TTL) {
                    debug!("cannot lower the TTL: {e}");
                }
            }
            for to in &targets {
                self.send(*to, false, &mut seen).await;
            }
            for &(v4, value) in &normal {
                if let Err(e) = set_ttl(self.socket, v4, value) {
                    warn!("cannot restore the TTL: {e}");
                }
            }
        }
        let begun = tokio::time::Instant::now();
        let mut next_round = begun
            + if primed {
                self.full_ttl_delay
            } else {
                Duration::ZERO
            };
        let mut buf = vec![0u8; 2048];
        loop {
            if let Some(from) = confirmed.filter(|_| !heard_from.is_empty()) {
                // Done. A few more confirmations in case the last ones got lost; the peer may
                // still be waiting for one (its QUIC endpoint drops any extra).
                for _ in 0..3 {
                    self.send(from, true, &mut seen).await;
                }
                return Ok(paths(from, &heard_from));
            }
            tokio::select! {
                () = tokio::time::sleep_until(stop.into()) => {
                    return Err(PunchFailure {
                        timed_out: true,
                        detail: describe(&targets, &seen, &heard_from),
                    });
                }
                () = tokio::time::sleep_until(next_round) => {
                    let heard = !heard_from.is_empty();
                    let now = tokio::time::Instant::now();
                    for to in targets.clone() {
                        // IPv4 pairs start a little after IPv6 ones (ICE-style order).
                        if now < begun + self.full_ttl_delay + start_delay(to, peer_candidates) {
                            continue;
                        }
                        self.send(to, heard, &mut seen).await;
                    }
                    next_round = tokio::time::Instant::now() + self.interval;
                }
                got = self.socket.peek_from(&mut buf) => {
                    let (n, from) = match got {
                        Ok((n, from)) => (n, canonical(from)),
                        Err(e) => {
                            // ICMP errors (port unreachable, host unreachable) of earlier sends.
                            trace!("punch receive: {e}");
                            continue;
                        }
                    };
                    let packet = &buf[..n];
                    let punch = decode_punch(self.peer_key, self.pair_id, self.role.other(), packet);
                    if punch.is_err()
                        && self.accepts_quic
                        && heard_from.contains(&from)
                        && packet.first().is_some_and(|b| b & 0xc0 == 0xc0)
                    {
                        // A QUIC long-header packet from the peer: it is done punching, so it
                        // heard ours. Leave the packet for the QUIC endpoint.
                        debug!(%from, "the peer started QUIC");
                        return Ok(paths(from, &heard_from));
                    }
                    let _ = self.socket.recv_from(&mut buf).await;
                    let entry = seen.entry(from).or_default();
                    match punch {
                        Ok(p) => {
                            entry.valid += 1;
                            trace!(%from, heard = p.heard, "valid punch");
                            if !targets.contains(&from) && targets.len() < MAX_TARGETS {
                                debug!(%from, "peer reachable at an address it did not offer");
                                targets.push(from);
                            }
                            let first_time = heard_from.insert(from);
                            if p.heard {
                                confirmed.get_or_insert(from);
                            }
                            if first_time || !p.heard {
                                self.send(from, true, &mut seen).await;
                            }
                        }
                        Err(PunchError::BadTag) => {
                            entry.bad_tag += 1;
                            debug!(%from, "punch failed authentication");
                        }
                        Err(e) => {
                            entry.other += 1;
                            debug!(%from, len = n, "ignored datagram: {e:?}");
                        }
                    }
                }
            }
        }
    }
}

/// The socket's TTL (IPv4) or unicast hop limit (IPv6).
pub(super) fn ttl(socket: &UdpSocket, ipv4: bool) -> io::Result<u32> {
    let sock = socket2::SockRef::from(socket);
    if ipv4 {
        sock.ttl_v4()
    } else {
        sock.unicast_hops_v6()
    }
}

pub(super) fn set_ttl(socket: &UdpSocket, ipv4: bool, ttl: u32) -> io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    if ipv4 {
        sock.set_ttl_v4(ttl)
    } else {
        sock.set_unicast_hops_v6(ttl)
    }
}

fn describe(
    targets: &[SocketAddr],
    seen: &BTreeMap<SocketAddr, Seen>,
    heard_from: &HashSet<SocketAddr>,
) -> String {
    let mut parts = Vec::new();
    for to in targets {
        let s = seen.get(to);
        let sent = s.map_or(0, |s| s.sent);
        let mut text = format!("{to}: sent {sent} punches");
        if heard_from.contains(to) {
            text.push_str(", heard valid punches but no confirmation");
        } else if s.is_none_or(|s| s.bad_tag == 0 && s.valid == 0) {
            text.push_str(", no answer");
        }
        if let Some(e) = s.and_then(|s| s.send_error.as_ref()) {
            text.push_str(&format!(" (last send error: {e})"));
        }
        parts.push(text);
    }
    for (from, s) in seen {
        if s.bad_tag > 0 {
            parts.push(format!(
                "{from}: {} punches failed authentication (wrong session, pairing or secret)",
                s.bad_tag
            ));
        }
        if s.other > 0 && !targets.contains(from) {
            parts.push(format!("{from}: {} unrelated datagrams ignored", s.other));
        }
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nettool_core::stun;
    use sha2::Digest;

    fn key(seed: &str) -> PunchKey {
        sha2::Sha256::digest(seed.as_bytes()).into()
    }

    #[test]
    fn punches_round_trip() {
        let k = key("s");
        for heard in [false, true] {
            let p = Punch {
                role: Role::First,
                heard,
            };
            let bytes = encode_punch(&k, "pair", p);
            assert_eq!(bytes.len(), PUNCH_LEN);
            assert_eq!(bytes[0] & 0x40, 0, "QUIC's fixed bit must be clear");
            assert_eq!(decode_punch(&k, "pair", Role::First, &bytes), Ok(p));
            assert_eq!(
                decode_punch(&k, "pair", Role::Second, &bytes),
                Err(PunchError::SameRole)
            );
        }
    }

    #[test]
    fn tampered_or_foreign_punches_are_rejected() {
        let k = key("s");
        let bytes = encode_punch(
            &k,
            "pair",
            Punch {
                role: Role::Second,
                heard: false,
            },
        );
        // Any flipped bit after the magic: rejected.
        for i in 4..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                decode_punch(&k, "pair", Role::Second, &t).is_err(),
                "byte {i}"
            );
        }
        // Setting the heard flag without the key: bad tag.
        let mut t = bytes.clone();
        t[6] |= FLAG_HEARD;
        assert_eq!(
            decode_punch(&k, "pair", Role::Second, &t),
            Err(PunchError::BadTag)
        );
        assert_eq!(
            decode_punch(&key("other"), "pair", Role::Second, &bytes),
            Err(PunchError::BadTag)
        );
        assert_eq!(
            decode_punch(&k, "another pair", Role::Second, &bytes),
            Err(PunchError::BadTag)
        );
        for n in 0..bytes.len() {
            assert_eq!(
                decode_punch(&k, "pair", Role::Second, &bytes[..n]),
                Err(PunchError::NotAPunch)
            );
        }
        let (_, stun) = stun::binding_request();
        assert_eq!(
            decode_punch(&k, "pair", Role::Second, &stun),
            Err(PunchError::NotAPunch)
        );
    }
}
