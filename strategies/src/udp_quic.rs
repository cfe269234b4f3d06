//! udp-quic: UDP hole punching with QUIC on top. (Being written.)

use nettool_config::UdpQuicConfig;
use nettool_core::{Attempt, Link, Strategy, StrategyError};

/// The strategy's name.
pub const NAME: &str = "udp-quic";

/// UDP hole punching + QUIC.
#[derive(Debug, Clone)]
pub struct UdpQuic {
    #[allow(dead_code)]
    config: UdpQuicConfig,
}

impl UdpQuic {
    /// A udp-quic strategy with these settings.
    pub fn new(config: UdpQuicConfig) -> Self {
        Self { config }
    }
}

#[async_trait::async_trait]
impl Strategy for UdpQuic {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn connect(&self, _attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        Err(StrategyError::NoLink(
            "udp-quic is not implemented yet".into(),
        ))
    }
}
