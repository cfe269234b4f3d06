//! tcp-direct: listen on one side, dial from the other. (Being written.)

use nettool_config::TcpDirectConfig;
use nettool_core::{Attempt, Link, Strategy, StrategyError};

/// The strategy's name.
pub const NAME: &str = "tcp-direct";

/// Listen/dial.
#[derive(Debug, Clone)]
pub struct TcpDirect {
    #[allow(dead_code)]
    config: TcpDirectConfig,
}

impl TcpDirect {
    /// A tcp-direct strategy with these settings.
    pub fn new(config: TcpDirectConfig) -> Self {
        Self { config }
    }
}

#[async_trait::async_trait]
impl Strategy for TcpDirect {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn connect(&self, _attempt: &mut Attempt<'_>) -> Result<Link, StrategyError> {
        Err(StrategyError::NoLink(
            "tcp-direct is not implemented yet".into(),
        ))
    }
}
