//! The NAT kinds a lab router can play, and the nftables ruleset for each.
//!
//! Rulesets are plain strings (loaded with `nft -f -` inside the router's namespace), so they
//! can be inspected and unit-tested without any namespaces.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// How a peer's router treats traffic between its LAN (`lan`) and the internet (`wan`).
///
/// See design.md §6 for the table these kinds implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatKind {
    /// Routed, no NAT, no filtering: the host has a public address.
    None,
    /// Static 1:1 NAT ("full cone"): the router's WAN address is the host's public address and
    /// all inbound traffic is forwarded to the host.
    Full,
    /// Port-preserving masquerade, new inbound dropped in forward and input (silent router).
    Cone,
    /// As [`NatKind::Cone`], but the router's own kernel answers unsolicited inbound traffic
    /// (TCP reset, ICMP port unreachable).
    ConeRst,
    /// Masquerade with random ports (endpoint-dependent mapping), new inbound dropped.
    Sym,
    /// No NAT, stateful firewall dropping new inbound: public address behind a firewall.
    Fw,
}

impl NatKind {
    /// Every kind, in the order of design.md §6.
    pub const ALL: [Self; 6] = [
        Self::None,
        Self::Full,
        Self::Cone,
        Self::ConeRst,
        Self::Sym,
        Self::Fw,
    ];

    /// The kind's name as used on command lines and in test names (`cone-rst`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Full => "full",
            Self::Cone => "cone",
            Self::ConeRst => "cone-rst",
            Self::Sym => "sym",
            Self::Fw => "fw",
        }
    }

    /// True when the host behind this router keeps its own (routed) address on the internet.
    pub fn is_routed(self) -> bool {
        matches!(self, Self::None | Self::Fw)
    }

    /// True when unsolicited inbound connections reach the host.
    pub fn accepts_unsolicited(self) -> bool {
        matches!(self, Self::None | Self::Full)
    }

    /// The nftables ruleset for a router of this kind, or `None` when no rules are needed.
    ///
    /// `host` is the LAN host's address and `wan` the router's own WAN address. The router's
    /// interfaces are named `wan` and `lan`.
    pub fn ruleset(self, host: Ipv4Addr, wan: Ipv4Addr) -> Option<String> {
        // DNATed connections pass (`ct status dnat`): only a port mapping made on the router
        // (miniupnpd in the lab) creates them on these kinds.
        const ESTABLISHED_ONLY: &str = "\t\tiifname \"wan\" ct state established,related accept\n\
                                        \t\tiifname \"wan\" ct status dnat accept\n\
                                        \t\tiifname \"wan\" drop\n";
        let filter_chain = |hook: &str, drop_new: bool| {
            format!(
                "\tchain {hook} {{\n\t\ttype filter hook {hook} priority filter; policy accept;\n{}\t}}\n",
                if drop_new { ESTABLISHED_ONLY } else { "" }
            )
        };
        let nat_chains = |postrouting: &str, prerouting: &str| {
            format!(
                "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{prerouting}\t}}\n\
                 \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{postrouting}\t}}\n"
            )
        };
        let body = match self {
            Self::None => return None,
            Self::Full => nat_chains(
                &format!("\t\toifname \"wan\" ip saddr {host} snat ip to {wan}\n"),
                &format!("\t\tiifname \"wan\" ip daddr {wan} dnat ip to {host}\n"),
            ),
            Self::Cone => {
                nat_chains("\t\toifname \"wan\" masquerade\n", "")
                    + &filter_chain("forward", true)
                    + &filter_chain("input", true)
            }
            Self::ConeRst => {
                nat_chains("\t\toifname \"wan\" masquerade\n", "")
                    + &filter_chain("forward", true)
                    + &filter_chain("input", false)
            }
            Self::Sym => {
                nat_chains("\t\toifname \"wan\" masquerade random\n", "")
                    + &filter_chain("forward", true)
                    + &filter_chain("input", true)
            }
            Self::Fw => filter_chain("forward", true) + &filter_chain("input", true),
        };
        Some(format!("table inet ntl {{\n{body}}}\n"))
    }
}

impl fmt::Display for NatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The error of parsing an unknown [`NatKind`] name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownNatKind(pub String);

impl fmt::Display for UnknownNatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown NAT kind {:?} (expected one of: none, full, cone, cone-rst, sym, fw)",
            self.0
        )
    }
}

impl std::error::Error for UnknownNatKind {}

impl FromStr for NatKind {
    type Err = UnknownNatKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownNatKind(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in NatKind::ALL {
            assert_eq!(k.to_string().parse::<NatKind>(), Ok(k));
        }
        assert!("cone_rst".parse::<NatKind>().is_err());
    }

    #[test]
    fn rulesets_differ_where_the_spec_says() {
        let (h, w) = (Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(198, 51, 100, 2));
        assert!(NatKind::None.ruleset(h, w).is_none());
        let cone = NatKind::Cone.ruleset(h, w).unwrap();
        let rst = NatKind::ConeRst.ruleset(h, w).unwrap();
        let sym = NatKind::Sym.ruleset(h, w).unwrap();
        assert!(cone.contains("masquerade\n") && !cone.contains("random"));
        assert!(sym.contains("masquerade random"));
        assert_eq!(cone.matches("iifname \"wan\" drop").count(), 2);
        assert_eq!(rst.matches("iifname \"wan\" drop").count(), 1);
        let fw = NatKind::Fw.ruleset(h, w).unwrap();
        assert!(!fw.contains("type nat"));
        // DNATed connections (a port mapping on the router) pass every drop-new-inbound rule.
        for r in [&cone, &rst, &sym, &fw] {
            assert_eq!(
                r.matches("iifname \"wan\" ct status dnat accept").count(),
                r.matches("iifname \"wan\" drop").count()
            );
        }
    }
}
