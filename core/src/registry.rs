//! The strategy registry: strategies by name.
//!
//! A binary builds one [`StrategyRegistry`] at startup: the built-in strategies register
//! themselves (`nettool_strategies::register_builtin`), and a custom binary adds its own the
//! same way before handing the registry to the CLI (`nettool::run_with`). No global state, no
//! dynamic loading: a plugin is a Rust crate that implements [`Strategy`] and registers a
//! [`StrategyFactory`].
//!
//! Each strategy owns its settings: the factory receives the strategy's own table from the
//! config (`[strategy.NAME]`, as JSON) and deserializes it itself. One key is common to all
//! strategies and handled here: `timeout`, the ceiling of one attempt (default 10 s).
//! [`typed`] turns a serde config type and a constructor into a factory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::strategy::Strategy;

/// Attempt timeout of a strategy whose table does not set `timeout`.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds one strategy from its config table. Object safe; stored as `Arc<dyn StrategyFactory>`.
pub trait StrategyFactory: Send + Sync {
    /// The strategy's name, as used with `--strategy`, in `strategies = [...]`, in
    /// `[strategy.NAME]` and in reports (`tcp-punch`).
    fn name(&self) -> &'static str;

    /// One line saying what the strategy does, for `nettool strategies`.
    fn description(&self) -> &'static str;

    /// The strategy's table with every key at its default (without `timeout`).
    fn defaults(&self) -> Value;

    /// Builds the strategy from its table (without `timeout`); the error names the bad key.
    fn build(&self, table: Value) -> Result<Arc<dyn Strategy>, String>;
}

/// A factory for a strategy whose settings are the serde type `C` (missing keys take
/// `C::default()`; give `C` `#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]`
/// so unknown keys are errors naming the valid ones).
pub fn typed<C, S, F>(
    name: &'static str,
    description: &'static str,
    make: F,
) -> Arc<dyn StrategyFactory>
where
    C: Serialize + DeserializeOwned + Default + 'static,
    S: Strategy + 'static,
    F: Fn(C) -> S + Send + Sync + 'static,
{
    struct Typed<C, F> {
        name: &'static str,
        description: &'static str,
        make: F,
        _config: std::marker::PhantomData<fn() -> C>,
    }
    impl<C, S, F> StrategyFactory for Typed<C, F>
    where
        C: Serialize + DeserializeOwned + Default + 'static,
        S: Strategy + 'static,
        F: Fn(C) -> S + Send + Sync + 'static,
    {
        fn name(&self) -> &'static str {
            self.name
        }
        fn description(&self) -> &'static str {
            self.description
        }
        fn defaults(&self) -> Value {
            serde_json::to_value(C::default()).expect("strategy configs serialize")
        }
        fn build(&self, table: Value) -> Result<Arc<dyn Strategy>, String> {
            let config: C = serde_json::from_value(table).map_err(|e| e.to_string())?;
            Ok(Arc::new((self.make)(config)))
        }
    }
    Arc::new(Typed {
        name,
        description,
        make,
        _config: std::marker::PhantomData,
    })
}

/// Why strategies could not be built from the settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A name that no factory registered (`--strategy`, `strategies`, or a `[strategy.NAME]`
    /// table).
    #[error("unknown strategy '{name}' (valid: {valid})")]
    Unknown {
        /// The name given.
        name: String,
        /// The registered names, comma separated.
        valid: String,
    },
    /// A strategy's table has a bad key or value.
    #[error("bad setting `strategy.{name}`: {message}")]
    BadTable {
        /// The strategy.
        name: String,
        /// What is wrong (names the key).
        message: String,
    },
    /// Two factories with one name.
    #[error("strategy '{0}' is registered twice")]
    Duplicate(String),
    /// The strategy list is empty.
    #[error("the strategy list is empty (valid: {0})")]
    Empty(String),
}

/// One strategy ready for the orchestrator, with its attempt timeout.
pub type BuiltStrategy = (Arc<dyn Strategy>, Duration);

/// Strategies by name, in registration order (the default order: first = highest priority).
#[derive(Clone, Default)]
pub struct StrategyRegistry {
    factories: Vec<Arc<dyn StrategyFactory>>,
}

impl std::fmt::Debug for StrategyRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl StrategyRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a strategy after those already registered.
    pub fn register(&mut self, factory: Arc<dyn StrategyFactory>) -> Result<(), RegistryError> {
        if self.get(factory.name()).is_some() {
            return Err(RegistryError::Duplicate(factory.name().to_owned()));
        }
        self.factories.push(factory);
        Ok(())
    }

    /// The registered names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.factories.iter().map(|f| f.name()).collect()
    }

    /// The registered names, comma separated (for errors and help).
    pub fn valid_names(&self) -> String {
        self.names().join(", ")
    }

    /// The factory registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn StrategyFactory>> {
        self.factories.iter().find(|f| f.name() == name)
    }

    /// Every factory, in order.
    pub fn factories(&self) -> impl Iterator<Item = &Arc<dyn StrategyFactory>> {
        self.factories.iter()
    }

    /// Every strategy's table with every key at its default, `timeout` included: the
    /// defaults layer of the config.
    pub fn default_tables(&self) -> BTreeMap<String, Value> {
        self.factories
            .iter()
            .map(|f| {
                let mut table = f.defaults();
                if let Value::Object(map) = &mut table {
                    map.insert(
                        "timeout".into(),
                        Value::String(
                            humantime::format_duration(DEFAULT_ATTEMPT_TIMEOUT).to_string(),
                        ),
                    );
                }
                (f.name().to_owned(), table)
            })
            .collect()
    }

    /// Checks that a name is registered.
    pub fn check(&self, name: &str) -> Result<(), RegistryError> {
        match self.get(name) {
            Some(_) => Ok(()),
            None => Err(RegistryError::Unknown {
                name: name.to_owned(),
                valid: self.valid_names(),
            }),
        }
    }

    /// Builds the strategies named in `order` (empty: every registered one, in registration
    /// order; repeats dropped), each from its table in `tables`. Every table in `tables` must
    /// name a registered strategy and be valid, also the ones not in `order`, so a typo in a
    /// profile is an error rather than silently ignored.
    pub fn build(
        &self,
        order: &[String],
        tables: &BTreeMap<String, Value>,
    ) -> Result<Vec<BuiltStrategy>, RegistryError> {
        for name in tables.keys() {
            self.check(name)?;
        }
        let names: Vec<String> = if order.is_empty() {
            self.names().into_iter().map(str::to_owned).collect()
        } else {
            order.to_vec()
        };
        if names.is_empty() {
            return Err(RegistryError::Empty(self.valid_names()));
        }
        let mut built_tables = BTreeMap::new();
        for factory in &self.factories {
            let name = factory.name();
            let table = tables
                .get(name)
                .cloned()
                .unwrap_or_else(|| Value::Object(Default::default()));
            built_tables.insert(name, split_timeout(name, table)?);
        }
        let mut out: Vec<BuiltStrategy> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for name in &names {
            self.check(name)?;
            if seen.contains(&name.as_str()) {
                continue;
            }
            seen.push(name);
            let factory = self.get(name).expect("checked above");
            let (timeout, table) = built_tables
                .remove(factory.name())
                .expect("one per factory");
            let strategy = factory
                .build(table)
                .map_err(|message| RegistryError::BadTable {
                    name: name.clone(),
                    message,
                })?;
            out.push((strategy, timeout));
        }
        // Validate the tables of strategies that are not in the order too.
        for (name, (_, table)) in built_tables {
            let factory = self.get(name).expect("registered");
            factory
                .build(table)
                .map_err(|message| RegistryError::BadTable {
                    name: name.to_owned(),
                    message,
                })?;
        }
        Ok(out)
    }
}

/// Takes the common `timeout` key out of a strategy's table.
fn split_timeout(name: &str, mut table: Value) -> Result<(Duration, Value), RegistryError> {
    let bad = |message: String| RegistryError::BadTable {
        name: name.to_owned(),
        message,
    };
    let Value::Object(map) = &mut table else {
        return Err(bad("must be a table".into()));
    };
    let timeout = match map.remove("timeout") {
        None => DEFAULT_ATTEMPT_TIMEOUT,
        Some(Value::String(s)) => humantime::parse_duration(&s)
            .map_err(|e| bad(format!("bad `timeout` '{s}': {e} (e.g. 10s, 1500ms)")))?,
        Some(other) => {
            return Err(bad(format!(
                "bad `timeout` {other}: expected a duration such as \"10s\""
            )))
        }
    };
    if timeout.is_zero() {
        return Err(bad("`timeout` must be more than 0s".into()));
    }
    Ok((timeout, table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{Attempt, Link, StrategyError};
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
    struct DummyConfig {
        port: u16,
    }

    struct Dummy(#[allow(dead_code)] DummyConfig);

    #[async_trait::async_trait]
    impl Strategy for Dummy {
        fn name(&self) -> &'static str {
            "dummy"
        }
        async fn connect(&self, _: &mut Attempt<'_>) -> Result<Link, StrategyError> {
            Err(StrategyError::NoLink("dummy".into()))
        }
    }

    fn registry() -> StrategyRegistry {
        let mut r = StrategyRegistry::new();
        r.register(typed("dummy", "a test strategy", Dummy))
            .unwrap();
        r
    }

    #[test]
    fn names_build_with_their_tables_and_timeouts() {
        let r = registry();
        let tables = BTreeMap::from([(
            "dummy".to_owned(),
            serde_json::json!({"port": 7, "timeout": "3s"}),
        )]);
        let built = r.build(&[], &tables).unwrap();
        assert_eq!(built.len(), 1);
        assert_eq!(built[0].0.name(), "dummy");
        assert_eq!(built[0].1, Duration::from_secs(3));
        assert_eq!(
            r.default_tables()["dummy"],
            serde_json::json!({"port": 0, "timeout": "10s"})
        );
    }

    #[test]
    fn unknown_names_and_keys_are_errors_naming_the_choices() {
        let r = registry();
        let err = r.build(&["dumy".into()], &BTreeMap::new()).err().unwrap();
        assert_eq!(err.to_string(), "unknown strategy 'dumy' (valid: dummy)");
        let tables = BTreeMap::from([("dummy".to_owned(), serde_json::json!({"prot": 7}))]);
        let err = r.build(&[], &tables).err().unwrap().to_string();
        assert!(
            err.contains("strategy.dummy") && err.contains("prot") && err.contains("port"),
            "{err}"
        );
        let tables = BTreeMap::from([("other".to_owned(), serde_json::json!({}))]);
        assert!(matches!(
            r.build(&[], &tables),
            Err(RegistryError::Unknown { .. })
        ));
        let tables = BTreeMap::from([("dummy".to_owned(), serde_json::json!({"timeout": "soon"}))]);
        assert!(r
            .build(&[], &tables)
            .err()
            .unwrap()
            .to_string()
            .contains("timeout"));
        let mut twice = registry();
        assert!(twice.register(typed("dummy", "again", Dummy)).is_err());
    }
}
