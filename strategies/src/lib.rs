//! Connection strategies for nettool, one module each, and the one function that builds them
//! from configuration.
//!
//! - [`tcp_punch`]: TCP simultaneous open through NATs.
//! - [`udp_quic`]: UDP hole punching with QUIC on top.
//! - [`tcp_direct`]: one side listens, the other dials; then the roles swap.
//! - [`relay`]: through the rendezvous server, the last resort.

#![warn(missing_docs)]

use std::sync::Arc;

use nettool_config::StrategyConfig;
use nettool_core::Strategy;

mod net;
pub mod relay;
pub mod tcp_direct;
pub mod tcp_punch;
mod tls;
pub mod udp_quic;

/// Builds the strategy a config entry describes.
pub fn build(config: &StrategyConfig) -> Arc<dyn Strategy> {
    match config {
        StrategyConfig::TcpPunch(c) => Arc::new(tcp_punch::TcpPunch::new(c.clone())),
        StrategyConfig::UdpQuic(c) => Arc::new(udp_quic::UdpQuic::new(c.clone())),
        StrategyConfig::TcpDirect(c) => Arc::new(tcp_direct::TcpDirect::new(c.clone())),
        StrategyConfig::Relay(c) => Arc::new(relay::Relay::new(c.clone())),
    }
}
