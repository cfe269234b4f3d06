//! Planning the attempts from both peers' NAT behaviour (design.md §8).
//!
//! Each peer measures its own NAT with [`crate::discovery`] while it waits for the other, and
//! both exchange a [`NatSummary`] when they pair. [`feasible`] then decides, per strategy, whether
//! it can work for this pair of NATs and how long its attempt may take:
//!
//! - **hole punching** (`tcp-punch` on the TCP mapping, `udp-quic` on the UDP mapping) cannot
//!   work when one side maps per destination and the other filters (or also maps per
//!   destination): the peer's mapping towards us is unknown and our side drops what comes from
//!   anywhere else;
//! - **tcp-direct** needs one side that accepts unsolicited connections (endpoint-independent
//!   filtering: no NAT and no firewall, or a full-cone NAT);
//! - the **relay** always works, and strategies the plan does not know are always tried.
//!
//! What is unknown (a server without RFC 5780, a peer that did not measure) is tried, never
//! skipped. A skip carries its reason in words, for the report.
//!
//! Timeouts come from the measured round trips: an attempt that has not linked after a few
//! round trips rarely will (libp2p's measurements: 97.6% of successful punches succeed on the
//! first try). The configured timeout stays the ceiling, and the overall budget is shared so
//! every remaining attempt keeps a turn.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::discovery::{FamilyReport, Filtering, Mapping};

/// The part of one peer's discovery the other peer needs for planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatSummary {
    /// UDP mapping behaviour.
    pub udp_mapping: Mapping,
    /// UDP filtering behaviour (also taken for TCP: nettool measures no TCP filtering).
    pub udp_filtering: Filtering,
    /// TCP mapping behaviour.
    pub tcp_mapping: Mapping,
    /// Whether this peer's gateway maps ports on request (UPnP-IGD, NAT-PMP or PCP; only
    /// known with port mapping on): its listener and UDP socket are then reachable from
    /// anywhere, whatever the NAT's own mapping and filtering.
    #[serde(default)]
    pub port_mapping: bool,
    /// Whether the server's STUN never answered this peer over UDP (a network that lets only
    /// TCP out): the UDP strategies are skipped. Absent (false) from older peers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub udp_blocked: bool,
}

impl NatSummary {
    /// Nothing known but that no STUN answer came back over UDP.
    pub const UDP_BLOCKED: Self = Self {
        udp_blocked: true,
        ..Self::UNKNOWN
    };

    /// Nothing known.
    pub const UNKNOWN: Self = Self {
        udp_mapping: Mapping::Unknown,
        udp_filtering: Filtering::Unknown,
        tcp_mapping: Mapping::Unknown,
        port_mapping: false,
        udp_blocked: false,
    };
}

impl From<&FamilyReport> for NatSummary {
    fn from(r: &FamilyReport) -> Self {
        Self {
            udp_mapping: r.udp_mapping,
            udp_filtering: r.udp_filtering,
            tcp_mapping: r.tcp_mapping,
            port_mapping: false,
            udp_blocked: false,
        }
    }
}

/// Whether a mapping is per destination (a punch cannot predict it).
fn per_destination(m: Mapping) -> bool {
    matches!(
        m,
        Mapping::AddressDependent | Mapping::AddressAndPortDependent
    )
}

/// Whether a side drops unsolicited packets.
fn filters(f: Filtering) -> bool {
    matches!(
        f,
        Filtering::AddressDependent | Filtering::AddressAndPortDependent
    )
}

/// Why punching on `mapping` (TCP or UDP) cannot work between `me` and `peer`, if it cannot.
fn punch_blocked(
    mapping: fn(&NatSummary) -> Mapping,
    me: &NatSummary,
    peer: &NatSummary,
) -> Option<String> {
    let (mine, theirs) = (mapping(me), mapping(peer));
    if per_destination(mine) && per_destination(theirs) {
        return Some(
            "both NATs map per destination, so neither side can aim at the other's mapping".into(),
        );
    }
    if per_destination(theirs) && filters(me.udp_filtering) {
        return Some(
            "the peer's NAT maps per destination and this side filters unsolicited packets".into(),
        );
    }
    if per_destination(mine) && filters(peer.udp_filtering) {
        return Some(
            "this side's NAT maps per destination and the peer filters unsolicited packets".into(),
        );
    }
    None
}

/// Whether exactly one side maps per destination (on the UDP mapping): the pairs birthday
/// punching takes.
pub fn one_side_hard(me: &NatSummary, peer: &NatSummary) -> bool {
    per_destination(me.udp_mapping) != per_destination(peer.udp_mapping)
}

/// Whether `name` can work between `me` and `peer`: `Err(reason)` when it cannot.
/// `punches_hard_nats`: the strategy handles one side that maps per destination (birthday).
pub fn feasible(
    name: &str,
    me: &NatSummary,
    peer: &NatSummary,
    punches_hard_nats: bool,
) -> Result<(), String> {
    // A port mapped on either side's gateway is reachable from anywhere: the other side
    // reaches it from whatever mapping its own NAT gives, and the answer goes back through
    // that NAT's state. So the strategies that map (udp-quic, tcp-direct) work for any pair.
    let mapped = me.port_mapping || peer.port_mapping;
    let udp = matches!(name, "udp-quic");
    if udp && (me.udp_blocked || peer.udp_blocked) {
        let whose = if me.udp_blocked {
            "this side's"
        } else {
            "the peer's"
        };
        return Err(format!(
            "UDP looks blocked on {whose} network (the server's STUN never answered over UDP)"
        ));
    }
    let blocked = match name {
        "tcp-punch" => punch_blocked(|s| s.tcp_mapping, me, peer),
        "udp-quic" if mapped => None,
        "udp-quic" if punches_hard_nats && one_side_hard(me, peer) => None,
        "udp-quic" => punch_blocked(|s| s.udp_mapping, me, peer),
        "tcp-direct" if mapped => None,
        "tcp-direct" => (filters(me.udp_filtering) && filters(peer.udp_filtering)).then(|| {
            "both sides filter unsolicited connections, so neither listener is reachable".into()
        }),
        _ => None,
    };
    match blocked {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

/// The attempt timeout for a strategy from the round trips: a few round trips plus a floor
/// for the work on both ends (certificates, the handshake), never above `ceiling`.
pub fn attempt_timeout(rtt: Duration, ceiling: Duration) -> Duration {
    const FLOOR: Duration = Duration::from_millis(2500);
    (FLOOR + rtt * 20).min(ceiling)
}

/// How much of the overall budget an attempt may use: what is left, minus a share kept for
/// each strategy after it (at most `reserve` each), so the last ones still get a turn.
pub fn share_budget(left: Duration, after: usize, reserve: Duration) -> Duration {
    let keep = reserve * u32::try_from(after).unwrap_or(u32::MAX);
    if left > keep * 2 {
        left - keep
    } else {
        // Not enough for everyone's reserve: split evenly.
        left / u32::try_from(after + 1).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab kinds as coturn measures them (design.md §8).
    fn kind(name: &str) -> NatSummary {
        use Filtering as F;
        use Mapping as M;
        let (m, f) = match name {
            "none" => (M::NoNat, F::EndpointIndependent),
            "full" => (M::EndpointIndependent, F::EndpointIndependent),
            "cone" | "cone-rst" => (M::EndpointIndependent, F::AddressAndPortDependent),
            "sym" => (M::AddressAndPortDependent, F::AddressAndPortDependent),
            "fw" => (M::NoNat, F::AddressAndPortDependent),
            _ => unreachable!(),
        };
        NatSummary {
            udp_mapping: m,
            udp_filtering: f,
            tcp_mapping: m,
            port_mapping: false,
            udp_blocked: false,
        }
    }

    const KINDS: [&str; 6] = ["none", "full", "cone", "cone-rst", "sym", "fw"];

    #[test]
    fn the_plan_matches_the_lab_table_for_all_36_pairs() {
        for a in KINDS {
            for b in KINDS {
                let (me, peer) = (kind(a), kind(b));
                // design.md §6: punching links unless one side is sym and the other is cone,
                // cone-rst, sym or fw; tcp-direct when one side is none or full.
                let hard =
                    |x: &str, y: &str| x == "sym" && ["cone", "cone-rst", "sym", "fw"].contains(&y);
                let punch = !(hard(a, b) || hard(b, a));
                let direct = ["none", "full"].contains(&a) || ["none", "full"].contains(&b);
                for s in ["tcp-punch", "udp-quic"] {
                    assert_eq!(
                        feasible(s, &me, &peer, false).is_ok(),
                        punch,
                        "{s} {a} x {b}"
                    );
                }
                assert_eq!(
                    feasible("tcp-direct", &me, &peer, false).is_ok(),
                    direct,
                    "{a} x {b}"
                );
                // Birthday punching takes the pairs with exactly one symmetric side.
                let birthday = punch || (a == "sym") != (b == "sym");
                let got = feasible("udp-quic", &me, &peer, true).is_ok();
                assert_eq!(got, birthday, "birthday {a} x {b}");
                assert!(feasible("relay", &me, &peer, false).is_ok());
                assert!(feasible("port-forwarded", &me, &peer, false).is_ok());
            }
        }
    }

    #[test]
    fn a_mapped_port_on_either_side_makes_the_mapping_strategies_feasible() {
        for a in KINDS {
            for b in KINDS {
                let mut me = kind(a);
                me.port_mapping = true;
                let peer = kind(b);
                for (x, y) in [(&me, &peer), (&peer, &me)] {
                    for s in ["udp-quic", "tcp-direct"] {
                        assert!(feasible(s, x, y, false).is_ok(), "{s} {a}(mapped) x {b}");
                    }
                    // tcp-punch maps nothing: unchanged.
                    let plain = feasible("tcp-punch", &kind(a), &peer, false).is_ok();
                    assert_eq!(feasible("tcp-punch", &me, &peer, false).is_ok(), plain);
                }
            }
        }
        // sym x sym without a mapping stays infeasible for both.
        for s in ["udp-quic", "tcp-direct"] {
            assert!(feasible(s, &kind("sym"), &kind("sym"), false).is_err());
        }
    }

    /// No STUN answer on either side skips the UDP strategies, even with a mapped port, and
    /// says whose network; the TCP strategies are planned as for unknown behaviour.
    #[test]
    fn udp_blocked_on_either_side_skips_udp_only() {
        let blocked = NatSummary::UDP_BLOCKED;
        let mut mapped = kind("none");
        mapped.port_mapping = true;
        for peer in [kind("none"), mapped] {
            let mine = feasible("udp-quic", &blocked, &peer, true).unwrap_err();
            assert!(mine.contains("this side's network"), "{mine}");
            let theirs = feasible("udp-quic", &peer, &blocked, true).unwrap_err();
            assert!(theirs.contains("the peer's network"), "{theirs}");
            for s in ["tcp-punch", "tcp-direct", "relay"] {
                assert!(feasible(s, &blocked, &peer, false).is_ok(), "{s}");
            }
        }
        // Old peers' summaries (no field) are not blocked, and a blocked one says so.
        let old: NatSummary = serde_json::from_str(
            r#"{"udp_mapping":"endpoint-independent","udp_filtering":"endpoint-independent","tcp_mapping":"endpoint-independent"}"#,
        )
        .unwrap();
        assert!(!old.udp_blocked);
        assert!(serde_json::to_string(&blocked)
            .unwrap()
            .contains("\"udp_blocked\":true"));
        assert!(!serde_json::to_string(&old).unwrap().contains("udp_blocked"));
    }

    #[test]
    fn unknown_behaviour_is_tried_and_skips_say_why() {
        let u = NatSummary::UNKNOWN;
        for s in ["tcp-punch", "udp-quic", "tcp-direct"] {
            assert!(feasible(s, &u, &kind("sym"), false).is_ok());
            assert!(feasible(s, &kind("sym"), &u, false).is_ok());
        }
        let why = feasible("udp-quic", &kind("cone"), &kind("sym"), false).unwrap_err();
        assert_eq!(
            why,
            "the peer's NAT maps per destination and this side filters unsolicited packets"
        );
    }

    #[test]
    fn timeouts_follow_the_round_trip_and_the_budget_is_shared() {
        let ceiling = Duration::from_secs(10);
        assert_eq!(
            attempt_timeout(Duration::from_micros(100), ceiling),
            Duration::from_millis(2502)
        );
        assert_eq!(attempt_timeout(Duration::from_secs(1), ceiling), ceiling);
        let reserve = Duration::from_secs(3);
        // 10 s left, two after: keep 6 s for them.
        assert_eq!(
            share_budget(Duration::from_secs(20), 2, reserve),
            Duration::from_secs(14)
        );
        // Too little for the reserves: split evenly.
        assert_eq!(
            share_budget(Duration::from_secs(9), 2, reserve),
            Duration::from_secs(3)
        );
        assert_eq!(
            share_budget(Duration::from_secs(9), 0, reserve),
            Duration::from_secs(9)
        );
    }
}
