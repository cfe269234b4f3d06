//! Connection strategies for nettool, one module each. Each owns its config type (read from
//! its `[strategy.NAME]` table) and registers itself with [`register_builtin`].
//!
//! - [`tcp_punch`]: TCP simultaneous open through NATs.
//! - [`udp_quic`]: UDP hole punching with QUIC on top.
//! - [`tcp_direct`]: both sides listen and dial each other at once.
//! - [`relay`]: through the rendezvous server, the last resort.

#![warn(missing_docs)]

use nettool_core::registry::{typed, StrategyRegistry};

mod net;
pub mod relay;
pub mod tcp_direct;
pub mod tcp_punch;
pub mod udp_quic;

/// Registers the built-in strategies in the default order: tcp-punch, udp-quic, tcp-direct,
/// relay.
pub fn register_builtin(registry: &mut StrategyRegistry) {
    let factories = [
        typed(
            tcp_punch::NAME,
            "TCP simultaneous open with a low-TTL priming SYN",
            tcp_punch::TcpPunch::new,
        ),
        typed(
            udp_quic::NAME,
            "UDP hole punching (STUN, authenticated punches), then QUIC on the same socket",
            udp_quic::UdpQuic::new,
        ),
        typed(
            tcp_direct::NAME,
            "both sides listen and dial each other's candidates at once",
            tcp_direct::TcpDirect::new,
        ),
        typed(
            relay::NAME,
            "through the rendezvous server's relay (always works when both reach it)",
            relay::Relay::new,
        ),
    ];
    for factory in factories {
        registry
            .register(factory)
            .expect("built-in strategy names are unique and registered first");
    }
}

/// A registry holding the built-in strategies.
pub fn registry() -> StrategyRegistry {
    let mut registry = StrategyRegistry::new();
    register_builtin(&mut registry);
    registry
}
