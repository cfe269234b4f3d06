//! What `nettool-bench` (the benchmarks, `bench/` in the workspace) uses of this crate: the
//! peer and config flags, loading settings and building strategies as `nettool` does, the
//! measurement `compare` makes over a link, and the data path's descriptions. Not meant for
//! other uses; it changes with the benchmarks.

use std::net::SocketAddr;

use anyhow::Result;
use nettool_config::{LoadOptions, Loaded, Overrides, Settings};
use nettool_core::registry::StrategyRegistry;

use crate::BadSettings;

pub use crate::compare::{measure, CompareOptions, Measured};
pub use crate::pump::ktls_status;
pub use crate::tunables::{reexec_with_tuned_memcpy, status as memcpy_status};
pub use crate::{init_logging, orchestrator, parse_size, ConfigArgs, ConfiguredStrategy, PeerArgs};

impl PeerArgs {
    /// The `--server`s given (empty: none, whatever the config says).
    pub fn servers(&self) -> &[String] {
        &self.server
    }

    /// The `--strategy`s given, in order (empty: none, whatever the config says).
    pub fn strategies(&self) -> &[String] {
        &self.strategies
    }
}

/// The rendezvous server to use of `servers` (the `--server`s or the config's), and all its
/// addresses, chosen as `nettool connect` chooses (the first of several that answers).
pub async fn choose_server(servers: &[String]) -> Result<(SocketAddr, Vec<SocketAddr>)> {
    crate::choose_server(servers).await
}

/// Loads the settings as `nettool` does for a command: defaults, the config file and profile
/// of `config`, the environment, then `overrides` (the command's flags).
pub(crate) fn load_settings(
    config: &ConfigArgs,
    registry: &StrategyRegistry,
    overrides: Overrides,
) -> Result<Loaded> {
    Settings::load(LoadOptions {
        config: config.config.clone(),
        profile: config.profile.clone(),
        overrides,
        strategy_defaults: registry.default_tables(),
        default_strategies: registry.names().into_iter().map(str::to_owned).collect(),
    })
    .map_err(|e| anyhow::Error::new(BadSettings(e.to_string())))
}

/// The settings and configured strategies of a command that runs many pairings of one
/// session (`command` names it in errors; such a command takes no `--code`), as `nettool`
/// builds them for its own commands.
pub fn peer_settings(
    config: &ConfigArgs,
    peer: &PeerArgs,
    registry: &StrategyRegistry,
    command: &str,
) -> Result<(Settings, Vec<ConfiguredStrategy>)> {
    crate::no_code(peer, command)?;
    let loaded = load_settings(config, registry, peer.overrides(registry))?;
    let strategies = crate::build_strategies(&loaded, registry)?;
    Ok((loaded.settings, strategies))
}

/// The exit status `nettool` gives for `e`: 2 for bad flags or settings, 1 otherwise.
pub fn exit_status(e: &anyhow::Error) -> i32 {
    if e.is::<BadSettings>() {
        2
    } else {
        1
    }
}
