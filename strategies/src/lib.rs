//! Connection strategies for nettool, one module each, and the one function that builds them
//! from configuration.
//!
//! - [`tcp_punch`]: TCP simultaneous open from one shared local port.

#![warn(missing_docs)]

use std::sync::Arc;

use nettool_config::StrategyConfig;
use nettool_core::Strategy;

pub mod tcp_punch;

/// Builds the strategy a config entry describes.
pub fn build(config: &StrategyConfig) -> Arc<dyn Strategy> {
    match config {
        StrategyConfig::TcpPunch(c) => Arc::new(tcp_punch::TcpPunch::new(c.clone())),
    }
}
