//! `nettool strategies`: the strategies this binary knows, in the default order, with their
//! settings.

use nettool_core::registry::StrategyRegistry;

/// `nettool strategies`.
pub(crate) fn strategies_list(registry: &StrategyRegistry) {
    let tables = registry.default_tables();
    for factory in registry.factories() {
        println!("{:<12} {}", factory.name(), factory.description());
        if let Some(serde_json::Value::Object(map)) = tables.get(factory.name()) {
            for (key, value) in map {
                println!("    strategy.{}.{key} = {value}", factory.name());
            }
        }
    }
}
