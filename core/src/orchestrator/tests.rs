use super::*;
use crate::discovery::{Filtering, Mapping};

fn nat(mapping: Mapping, filtering: Filtering) -> Option<NatSummary> {
    Some(NatSummary {
        udp_mapping: mapping,
        udp_filtering: filtering,
        tcp_mapping: mapping,
        port_mapping: false,
        udp_blocked: false,
    })
}

#[test]
fn a_strategy_is_kept_when_any_family_both_peers_measured_can_carry_it() {
    let sym = nat(
        Mapping::AddressAndPortDependent,
        Filtering::AddressAndPortDependent,
    );
    let fw = nat(Mapping::NoNat, Filtering::AddressAndPortDependent);
    // IPv4 sym x sym alone: hopeless, with the reason as it always read.
    let v4_only = [(sym, sym), (None, None)];
    let why = feasible_on_any("tcp-punch", &v4_only, false).unwrap_err();
    assert!(!why.starts_with("IPv4"), "{why}");
    // Firewalled IPv6 on both sides: IPv6 can punch, so the strategy is tried.
    assert!(feasible_on_any("tcp-punch", &[(sym, sym), (fw, fw)], false).is_ok());
    // IPv6 on one side only does not count.
    let one_sided = [(sym, sym), (fw, None)];
    assert!(feasible_on_any("tcp-punch", &one_sided, false).is_err());
    // Both families hopeless for tcp-direct (everyone filters): both reasons, by family.
    let why = feasible_on_any("tcp-direct", &[(sym, sym), (fw, fw)], false).unwrap_err();
    assert!(why.contains("IPv4: ") && why.contains("IPv6: "), "{why}");
    // Nothing measured: tried.
    assert!(feasible_on_any("tcp-punch", &[(None, sym), (None, None)], false).is_ok());
}

#[test]
fn hinted_strategies_go_first_in_the_same_order_on_both_peers_and_the_relay_stays() {
    let agreed: Vec<String> = ["tcp-punch", "tcp-direct", "udp-quic", "relay"]
        .map(String::from)
        .to_vec();
    let order = |h: [Option<&str>; 2]| hinted_order(&agreed, h);
    assert_eq!(order([None, None]), agreed);
    assert_eq!(
        order([Some("udp-quic"), None]),
        ["udp-quic", "tcp-punch", "tcp-direct", "relay"]
    );
    assert_eq!(
        order([Some("udp-quic"), Some("tcp-direct")]),
        ["udp-quic", "tcp-direct", "tcp-punch", "relay"]
    );
    assert_eq!(order([Some("relay"), Some("nope")]), agreed);
    assert_eq!(
        order([None, Some("udp-quic")]),
        order([Some("udp-quic"), Some("udp-quic")])
    );
}
