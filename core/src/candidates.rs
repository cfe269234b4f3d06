//! Candidate addresses: gathering this peer's, and validating the peer's.
//!
//! An offer is relayed by the rendezvous server before anyone is authenticated, so the
//! addresses in it are untrusted input: [`peer_candidates`] keeps only addresses this peer may
//! send to, so a forged offer can neither make it send to a third party nor open unbounded
//! sockets. Every strategy, built-in or plugin, filters the peer's candidates through it.
//!
//! A port mapped on the peer's gateway (UPnP-IGD, NAT-PMP, PCP) needs no exception: the
//! gateway's external address is the address the server observed for the peer whenever the
//! mapping is any use (a gateway behind another NAT maps an address nobody outside reaches),
//! and any port of the observed address is accepted. A "mapped" address elsewhere is dropped
//! like any third party, so advertising mappings opens no way to aim us at other hosts.

use std::net::{IpAddr, SocketAddr};

/// Our candidates: the observed public endpoint, the local address that reaches the server,
/// then this host's other addresses with the same port (loopback only when the server is on
/// loopback, and then only loopback).
pub fn candidates(public: SocketAddr, via: SocketAddr, loopback: bool) -> Vec<SocketAddr> {
    let mut out = vec![public];
    let mut push = |a: SocketAddr| {
        if !out.contains(&a) && !a.ip().is_unspecified() {
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

/// Most candidates of one address family taken from a peer's offer; the rest are ignored.
pub const MAX_CANDIDATES_PER_FAMILY: usize = 8;

/// Whether `ip` is in a private range a peer on the same LAN may legitimately offer: RFC 1918,
/// the shared CGNAT range (RFC 6598) and IPv6 unique-local addresses.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || (v4.octets()[0] == 100 && v4.octets()[1] & 0xc0 == 64),
        IpAddr::V6(v6) => v6.segments()[0] & 0xfe00 == 0xfc00,
    }
}

/// Addresses no peer may make us send to: unspecified, multicast, broadcast, link-local
/// (it needs a scope id) and the IPv4 "this network" / reserved ranges.
fn is_never_a_peer(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
                || v4.octets()[0] == 0
                || v4.octets()[0] >= 240
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_multicast()
                || v6.segments()[0] & 0xffc0 == 0xfe80
                || v6.to_ipv4_mapped().is_some()
        }
    }
}

/// The peer's candidates that this peer may send to, from an offer that is untrusted input
/// (relayed by the server before anyone is authenticated).
///
/// Keeps, in the offer's order, only addresses of `family_of`'s family with a port, and drops
/// duplicates and addresses that are never a peer (unspecified, multicast, broadcast,
/// link-local). A public address must be the one the rendezvous server observed for the peer
/// (`observed`); private ranges stay allowed for peers on the same LAN; loopback only when the
/// peer itself was observed on loopback. At most [`MAX_CANDIDATES_PER_FAMILY`] survive. So a
/// forged offer can neither make us send to a third party nor open unbounded sockets.
pub fn peer_candidates(
    offered: &[SocketAddr],
    observed: IpAddr,
    family_of: SocketAddr,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for c in offered {
        if out.len() >= MAX_CANDIDATES_PER_FAMILY {
            break;
        }
        let ip = c.ip();
        let allowed = c.is_ipv4() == family_of.is_ipv4()
            && c.port() != 0
            && !is_never_a_peer(ip)
            && if ip.is_loopback() {
                ip == observed
            } else {
                is_private(ip) || ip == observed
            };
        if allowed && !out.contains(c) {
            out.push(*c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn peer_candidates_keep_the_observed_public_address_and_private_ranges() {
        let observed: IpAddr = "198.51.100.2".parse().unwrap();
        let offered = [
            sa("198.51.100.2:4000"),
            sa("10.0.1.2:4000"),
            sa("192.168.1.9:4000"),
            sa("172.20.0.1:4000"),
            sa("100.64.3.4:4000"),
        ];
        assert_eq!(
            peer_candidates(&offered, observed, sa("203.0.113.10:8877")),
            offered
        );
    }

    #[test]
    fn peer_candidates_drop_third_parties_and_junk() {
        let observed: IpAddr = "198.51.100.2".parse().unwrap();
        let server = sa("203.0.113.10:8877");
        let offered = [
            sa("203.0.113.10:8877"),  // the server: a third party
            sa("198.51.100.99:4000"), // another public host
            sa("8.8.8.8:53"),
            sa("0.0.0.0:4000"),
            sa("127.0.0.1:4000"),
            sa("224.0.0.1:4000"),
            sa("255.255.255.255:4000"),
            sa("169.254.1.1:4000"),
            sa("198.51.100.2:0"),
            sa("[2001:db8::1]:4000"), // other family
            sa("198.51.100.2:4000"),
            sa("198.51.100.2:4000"), // duplicate
        ];
        assert_eq!(
            peer_candidates(&offered, observed, server),
            vec![sa("198.51.100.2:4000")]
        );
    }

    #[test]
    fn a_mapped_port_counts_only_at_the_observed_address() {
        let observed: IpAddr = "11.0.0.6".parse().unwrap();
        let server = sa("203.0.113.10:8877");
        // The gateway's mapping (any port of the observed address) comes first and stays.
        let offered = [
            sa("11.0.0.6:35190"),
            sa("11.0.0.6:41000"),
            sa("10.0.2.2:41000"),
        ];
        assert_eq!(peer_candidates(&offered, observed, server), offered);
        // A "mapping" on another public address is a third party.
        let forged = [sa("11.0.0.7:35190"), sa("203.0.113.10:8877")];
        assert!(peer_candidates(&forged, observed, server).is_empty());
    }

    #[test]
    fn peer_candidates_are_capped() {
        let observed: IpAddr = "127.0.0.1".parse().unwrap();
        let offered: Vec<SocketAddr> = (1..5000u16)
            .map(|p| SocketAddr::new(observed, p))
            .chain((1..255u8).map(|i| SocketAddr::new(Ipv4Addr::new(127, 0, 0, i).into(), 9)))
            .collect();
        let kept = peer_candidates(&offered, observed, sa("127.0.0.1:8877"));
        assert_eq!(kept.len(), MAX_CANDIDATES_PER_FAMILY);
        assert!(kept.iter().all(|c| c.ip() == observed));
        // Loopback is only the peer's own when the peer was seen on loopback.
        let on_lan: IpAddr = "198.51.100.2".parse().unwrap();
        assert!(peer_candidates(&offered, on_lan, sa("203.0.113.10:1")).is_empty());
    }

    #[test]
    fn candidates_start_with_the_public_endpoint_and_stay_on_loopback() {
        let public: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let c = candidates(public, public, true);
        assert_eq!(c[0], public);
        assert!(c.iter().all(|a| a.ip().is_loopback()));
    }
}
