//! udp-quic through the NAT lab: every pair of NAT kinds with the expected outcome (the same
//! hole-punching rule as tcp-punch) asserted, data checked each way, and 20 runs through two
//! routers that answer unsolicited datagrams with ICMP port-unreachable.

use nettool_tests::{require_lab, NatKind};

use crate::nat_punch::{punch_expected, repeated, run_matrix};

#[test]
fn udp_quic_links_exactly_the_expected_pairs() {
    if require_lab() {
        run_matrix("udp-quic", punch_expected);
    }
}

#[test]
fn udp_quic_cone_x_cone_20_runs() {
    repeated("udp-quic", NatKind::Cone, NatKind::Cone);
}

#[test]
fn udp_quic_cone_rst_x_cone_rst_20_runs() {
    repeated("udp-quic", NatKind::ConeRst, NatKind::ConeRst);
}
