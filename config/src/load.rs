//! Loading the effective settings with figment, and where each value came from.
//!
//! Precedence, lowest first: built-in defaults < the config file's `[default]` table < its
//! `[profile.NAME]` table < `NETTOOL_*` environment variables < command-line flags.
//!
//! Strategy settings live in `[strategy.NAME]` tables: at the top level of the file (or in
//! `[default.strategy.NAME]`), overridden by `[profile.P.strategy.NAME]`, by
//! `NETTOOL_STRATEGY__TCP_PUNCH__TIMEOUT=5s` and by flags. Their keys are checked by each
//! strategy's factory when the registry builds it, not here.
//!
//! The file is `--config FILE`, else `$NETTOOL_CONFIG`, else `./nettool.toml`, else
//! `<user config dir>/nettool/config.toml`; a file that was named explicitly must exist. The
//! profile is `--profile NAME`, else `$NETTOOL_PROFILE`. Keys are kebab-case; in the
//! environment `_` stands for `-` and `__` separates sections
//! (`NETTOOL_STRATEGY__TCP_PUNCH__TIMEOUT=5s` sets `strategy.tcp-punch.timeout`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use crate::{PortmapConfig, RendezvousConfig};

/// Where the per-strategy tables used to be (before `[strategy.NAME]`); named in the error
/// that says where they moved.
const MOVED_STRATEGY_TABLES: &[&str] = &["tcp-punch", "udp-quic", "tcp-direct", "relay"];

/// Every setting nettool reads from defaults, files, environment and flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Rendezvous servers, `HOST:PORT` each, tried in order (the first that answers is
    /// used). A single string is one server (profiles written before lists), and in the
    /// environment a comma-separated list.
    #[serde(
        deserialize_with = "server_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub server: Vec<String>,
    /// Session name shared with the peer.
    pub session: Option<String>,
    /// Shared secret both peers must give.
    pub secret: Option<String>,
    /// Token the rendezvous server requires to join (its `rendezvous.server-token`).
    pub server_token: Option<String>,
    /// The rendezvous server's key, `sha256:HEX` as the server prints it at start: only that
    /// key is accepted. Unset = trust on first use (remembered in `known_servers` in the
    /// config directory; a changed key is refused).
    pub server_key: Option<String>,
    /// Talk to the rendezvous server in plain JSON instead of TLS (servers older than the
    /// TLS control channel): the session name, addresses and server token are readable on
    /// the path.
    pub insecure_control: bool,
    /// Strategies to try, in order (first = highest priority); empty = every registered
    /// strategy in the registry's order. Names are checked against the registry.
    #[serde(
        deserialize_with = "strategy_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub strategies: Vec<String>,
    /// Overall deadline of one connect, pairing included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Plan the attempts from both peers' NAT behaviour (skip what cannot work, timeouts from
    /// the round trips); `false` tries every strategy blindly (`--plan off`).
    pub plan: bool,
    /// Keep NAT discovery results per network (default gateway, local and public address) for
    /// 10 minutes and reuse them (`--no-nat-cache` turns it off).
    pub nat_cache: bool,
    /// With the default strategy order, carry data over the relay as soon as both peers are
    /// paired and move it (losslessly) to a direct path once one links in the background;
    /// `false` (`--no-relay-first`) waits for the ladder as before. A `--strategy` given on
    /// the command line means exactly those strategies, in that order (no relay-first).
    pub relay_first: bool,
    /// Each strategy's own table (`[strategy.NAME]`), as given; the strategy's factory
    /// deserializes it.
    pub strategy: BTreeMap<String, serde_json::Value>,
    /// Rendezvous server settings.
    pub rendezvous: RendezvousConfig,
    /// Port mapping on the local gateway (off by default).
    pub portmap: PortmapConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: Vec::new(),
            session: None,
            secret: None,
            server_token: None,
            server_key: None,
            insecure_control: false,
            strategies: Vec::new(),
            timeout: Duration::from_secs(60),
            plan: true,
            nat_cache: true,
            relay_first: true,
            strategy: BTreeMap::new(),
            rendezvous: RendezvousConfig::default(),
            portmap: PortmapConfig::default(),
        }
    }
}

/// Accepts a list of names or one comma-separated string (handy in the environment).
fn strategy_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        One(String),
    }
    let names = match Raw::deserialize(d)? {
        Raw::List(v) => v,
        Raw::One(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
    };
    if names.is_empty() || names.iter().any(String::is_empty) {
        return Err(serde::de::Error::custom(
            "the strategy list is empty or has an empty name",
        ));
    }
    Ok(names)
}

/// Accepts a list of servers or one string: one server, or a comma-separated list.
fn server_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        One(String),
    }
    let servers: Vec<String> = match Raw::deserialize(d)? {
        Raw::List(v) => v.into_iter().map(|s| s.trim().to_owned()).collect(),
        Raw::One(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
    };
    if servers.iter().any(String::is_empty) {
        return Err(serde::de::Error::custom(
            "the server list has an empty entry (give HOST:PORT for each server)",
        ));
    }
    Ok(servers)
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Built into nettool.
    Default,
    /// A table of a config file.
    File {
        /// The file.
        path: PathBuf,
        /// `[default]` or `[profile.NAME]`.
        table: String,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("built-in default"),
            Self::File { path, table } => write!(f, "{} [{table}]", path.display()),
            Self::Env(var) => write!(f, "environment {var}"),
            Self::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A config file named explicitly does not exist or cannot be read.
    #[error("cannot read config file {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has tables other than `[default]`, `[strategy.*]` and
    /// `[profile.*]`.
    #[error("config file {}: {message}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The requested profile is not in the file.
    #[error("profile '{profile}' not found{}; available: {available}", .path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    NoProfile {
        /// The profile asked for.
        profile: String,
        /// The file searched, if any.
        path: Option<PathBuf>,
        /// The profiles the file has.
        available: String,
    },
    /// A value is invalid: unknown key, bad duration, unknown strategy, wrong type.
    #[error("{message}{}", .origin.as_ref().map(|s| format!(" (from {s})")).unwrap_or_default())]
    Invalid {
        /// What is wrong, naming the key.
        message: String,
        /// Where the bad value came from, when known.
        origin: Option<Source>,
    },
}

/// Settings set by command-line flags: the top layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    values: Vec<(String, Value, String)>,
}

impl Overrides {
    /// Sets `key` (a dotted kebab-case path such as `tcp-punch.timeout`) from `flag`.
    pub fn set(&mut self, key: &str, value: impl Serialize, flag: &str) {
        let value = Value::serialize(value).expect("flag values serialize");
        self.values.push((key.to_owned(), value, flag.to_owned()));
    }

    /// Sets `key` when `value` is `Some`.
    pub fn set_opt<T: Serialize>(&mut self, key: &str, value: Option<T>, flag: &str) {
        if let Some(v) = value {
            self.set(key, v, flag);
        }
    }
}

/// One layer of values with a name for `config show`.
struct Layer {
    source: Source,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source.to_string())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// The loaded settings and the layers they came from.
pub struct Loaded {
    /// The effective settings.
    pub settings: Settings,
    /// The config file used, if any.
    pub file: Option<PathBuf>,
    /// The profile used, if any.
    pub profile: Option<String>,
    figment: Figment,
    sources: Vec<Source>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("settings", &self.settings)
            .field("file", &self.file)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    /// Every effective leaf value as `(key, value, source)`, sorted by key.
    pub fn explain(&self) -> Vec<(String, String, Source)> {
        let mut out = Vec::new();
        let effective = Value::serialize(&self.settings).expect("settings serialize");
        flatten("", &effective, &mut out);
        out.into_iter()
            .map(|(key, value)| {
                let source = self.source_of(&key).unwrap_or(Source::Default);
                (key, value, source)
            })
            .collect()
    }

    /// Where the value at `key` (dotted, e.g. `strategy.tcp-punch`) came from.
    pub fn origin(&self, key: &str) -> Option<Source> {
        self.source_of(key)
    }

    fn source_of(&self, key: &str) -> Option<Source> {
        let name = self.figment.find_metadata(key)?.name.to_string();
        self.sources.iter().find(|s| s.to_string() == name).cloned()
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Dict(_, dict) => {
            for (k, v) in dict {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            let text = serde_json::to_string(&other).unwrap_or_else(|_| format!("{other:?}"));
            out.push((prefix.to_owned(), text));
        }
    }
}

/// Where to look for the file and which profile to use, before the environment is consulted.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--profile NAME`.
    pub profile: Option<String>,
    /// Command-line flags.
    pub overrides: Overrides,
    /// Every registered strategy's table at its defaults (from the registry): the lowest
    /// layer of `strategy.*`, so `config show` lists every key with its source.
    pub strategy_defaults: BTreeMap<String, serde_json::Value>,
    /// The registry's order of strategies: the default of `strategies`.
    pub default_strategies: Vec<String>,
}

/// Names of the top-level settings, which `NETTOOL_*` variables may set.
const TOP_LEVEL: &[&str] = &[
    "server",
    "session",
    "secret",
    "server-token",
    "strategies",
    "timeout",
    "plan",
    "nat-cache",
    "relay-first",
    "strategy",
    "rendezvous",
    "portmap",
    // Moved to `strategy.*`: still read, to say where they went.
    "tcp-punch",
    "udp-quic",
    "tcp-direct",
    "relay",
];

impl Settings {
    /// Loads the effective settings (see the module docs for the order).
    pub fn load(options: LoadOptions) -> Result<Loaded, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let (path, explicit) = match (&options.config, var("NETTOOL_CONFIG")) {
            (Some(p), _) => (Some(p.clone()), true),
            (None, Some(p)) => (Some(PathBuf::from(p)), true),
            (None, None) => {
                let local = PathBuf::from("nettool.toml");
                let user = dirs::config_dir().map(|d| d.join("nettool").join("config.toml"));
                let found = std::iter::once(local).chain(user).find(|p| p.is_file());
                (found, false)
            }
        };
        let profile = options.profile.clone().or_else(|| var("NETTOOL_PROFILE"));

        let mut defaults = Self {
            strategy: options.strategy_defaults.clone(),
            ..Self::default()
        };
        defaults.strategies = options.default_strategies.clone();
        let mut layers = vec![Layer {
            source: Source::Default,
            dict: dict_of(&defaults),
        }];
        match &path {
            Some(p) => layers.extend(file_layers(p, profile.as_deref())?),
            None if explicit => unreachable!("explicit paths are always Some"),
            None => {
                if let Some(name) = &profile {
                    return Err(ConfigError::NoProfile {
                        profile: name.clone(),
                        path: None,
                        available: "none (no config file found)".into(),
                    });
                }
            }
        }
        for (name, value) in &env {
            let Some(rest) = name.strip_prefix("NETTOOL_") else {
                continue;
            };
            if matches!(rest, "CONFIG" | "PROFILE") {
                continue;
            }
            let key = rest
                .to_ascii_lowercase()
                .split("__")
                .map(|seg| seg.replace('_', "-"))
                .collect::<Vec<_>>()
                .join(".");
            let top = key.split('.').next().unwrap_or_default();
            if !TOP_LEVEL.contains(&top) {
                continue; // another program's variable (or a test harness's)
            }
            let parsed: Value = value.parse().expect("infallible");
            layers.push(Layer {
                source: Source::Env(name.clone()),
                dict: nest(&key, parsed),
            });
        }
        for (key, value, flag) in &options.overrides.values {
            layers.push(Layer {
                source: Source::Flag(flag.clone()),
                dict: nest(key, value.clone()),
            });
        }

        for layer in &layers {
            if let Some(old) = MOVED_STRATEGY_TABLES
                .iter()
                .find(|k| layer.dict.contains_key(**k))
            {
                let key = layer.dict[*old]
                    .as_dict()
                    .and_then(|d| d.keys().next().cloned())
                    .map(|k| format!(".{k}"))
                    .unwrap_or_default();
                return Err(ConfigError::Invalid {
                    message: format!(
                        "`{old}{key}` has moved: strategy settings now live in [strategy.{old}] \
                         (`strategy.{old}{key}`; environment NETTOOL_STRATEGY__{}__...)",
                        old.to_ascii_uppercase().replace('-', "_")
                    ),
                    origin: Some(layer.source.clone()),
                });
            }
        }
        let sources: Vec<Source> = layers.iter().map(|l| l.source.clone()).collect();
        let mut figment = Figment::new();
        for layer in layers {
            figment = figment.merge(layer);
        }
        let settings: Self = figment
            .extract()
            .map_err(|e| invalid(&figment, &sources, e))?;
        Ok(Loaded {
            settings,
            file: path,
            profile,
            figment,
            sources,
        })
    }
}

fn dict_of<T: Serialize>(value: &T) -> Dict {
    Value::serialize(value)
        .expect("settings serialize")
        .into_dict()
        .expect("settings are a table")
}

fn nest(key: &str, value: Value) -> Dict {
    let mut value = value;
    for part in key.rsplit('.') {
        let mut d = Dict::new();
        d.insert(part.to_owned(), value);
        value = Value::from(d);
    }
    value.into_dict().expect("nested value is a table")
}

fn file_layers(path: &Path, profile: Option<&str>) -> Result<Vec<Layer>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: String| ConfigError::File {
        path: path.to_owned(),
        message,
    };
    let root = figment::providers::Format::string(&text);
    let root: figment::providers::Data<figment::providers::Toml> = root;
    let mut root = root
        .data()
        .map_err(|e| bad(e.to_string()))?
        .remove(&Profile::Default)
        .unwrap_or_default();
    let default = match root.remove("default") {
        None => Dict::new(),
        Some(Value::Dict(_, d)) => d,
        Some(_) => return Err(bad("`default` must be a table".into())),
    };
    // Top-level [strategy.NAME] tables: a layer of their own (shown as `[strategy]` by
    // `config show`), under the file's [default] table.
    let top_strategies = match root.remove("strategy") {
        None => None,
        Some(Value::Dict(_, d)) => Some(d),
        Some(_) => {
            return Err(bad(
                "`strategy` must be a table of [strategy.NAME] tables".into()
            ))
        }
    };
    let profiles = match root.remove("profile") {
        None => Dict::new(),
        Some(Value::Dict(_, d)) => d,
        Some(_) => {
            return Err(bad(
                "`profile` must be a table of [profile.NAME] tables".into()
            ))
        }
    };
    if let Some(other) = root.keys().next() {
        return Err(bad(format!(
            "unknown top-level key `{other}` (expected [default], [strategy.NAME] and \
             [profile.NAME] tables)"
        )));
    }
    let mut layers = Vec::new();
    if let Some(d) = top_strategies {
        let mut dict = Dict::new();
        dict.insert("strategy".into(), Value::from(d));
        layers.push(Layer {
            source: Source::File {
                path: path.to_owned(),
                table: "strategy".into(),
            },
            dict,
        });
    }
    layers.push(Layer {
        source: Source::File {
            path: path.to_owned(),
            table: "default".into(),
        },
        dict: default,
    });
    if let Some(name) = profile {
        match profiles.get(name) {
            Some(Value::Dict(_, d)) => layers.push(Layer {
                source: Source::File {
                    path: path.to_owned(),
                    table: format!("profile.{name}"),
                },
                dict: d.clone(),
            }),
            Some(_) => return Err(bad(format!("`profile.{name}` must be a table"))),
            None => {
                let available = if profiles.is_empty() {
                    "none".to_owned()
                } else {
                    profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                };
                return Err(ConfigError::NoProfile {
                    profile: name.to_owned(),
                    path: Some(path.to_owned()),
                    available,
                });
            }
        }
    }
    Ok(layers)
}

/// Turns figment's error into one that names the key and where the value came from.
fn invalid(figment: &Figment, sources: &[Source], e: figment::Error) -> ConfigError {
    let key = e.path.join(".");
    let source = e
        .metadata
        .as_ref()
        .and_then(|m| sources.iter().find(|s| s.to_string() == m.name))
        .cloned()
        .or_else(|| {
            let name = figment.find_metadata(&key)?.name.to_string();
            sources.iter().find(|s| s.to_string() == name).cloned()
        });
    let kind = e.kind.to_string();
    let message = if key.is_empty() {
        kind
    } else {
        format!("bad setting `{key}`: {kind}")
    };
    ConfigError::Invalid {
        message,
        origin: source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nettool-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load(
        path: &Path,
        profile: Option<&str>,
        overrides: Overrides,
    ) -> Result<Loaded, ConfigError> {
        let strategy_defaults = BTreeMap::from([
            (
                "tcp-punch".to_owned(),
                serde_json::json!({"timeout": "10s", "low-ttl": 2}),
            ),
            (
                "tcp-direct".to_owned(),
                serde_json::json!({"timeout": "10s", "listen-port": 0}),
            ),
        ]);
        Settings::load(LoadOptions {
            config: Some(path.to_owned()),
            profile: profile.map(str::to_owned),
            overrides,
            strategy_defaults,
            default_strategies: vec!["tcp-punch".into(), "tcp-direct".into()],
        })
    }

    const FILE: &str = r#"
[default]
server = "a.example:8877"
timeout = "30s"
[strategy.tcp-punch]
timeout = "7s"
[profile.office]
strategies = ["tcp-direct", "tcp-punch"]
[profile.office.strategy.tcp-punch]
timeout = "3s"
"#;

    fn strategy_key(settings: &Settings, name: &str, key: &str) -> serde_json::Value {
        settings.strategy[name][key].clone()
    }

    /// `server` takes a list (tried in order), and still a single string (old profiles).
    #[test]
    fn server_is_a_list_or_one_string() {
        let p = write(
            "servers.toml",
            "[default]\nserver = \"a.example:8877\"\n[profile.two]\n\
             server = [\"b.example:8877\", \"c.example:1\"]\n[profile.empty]\nserver = [\"\"]\n",
        );
        let one = load(&p, None, Overrides::default()).unwrap();
        assert_eq!(one.settings.server, ["a.example:8877"]);
        let two = load(&p, Some("two"), Overrides::default()).unwrap();
        assert_eq!(two.settings.server, ["b.example:8877", "c.example:1"]);
        let mut flags = Overrides::default();
        flags.set("server", ["d:1", "e:2"], "--server");
        let flagged = load(&p, Some("two"), flags).unwrap();
        assert_eq!(flagged.settings.server, ["d:1", "e:2"]);
        let Err(err) = load(&p, Some("empty"), Overrides::default()) else {
            panic!("an empty server entry is refused");
        };
        assert!(err.to_string().contains("empty entry"), "{err}");
    }

    #[test]
    fn file_then_profile_then_flags() {
        let p = write("precedence.toml", FILE);
        let plain = load(&p, None, Overrides::default()).unwrap();
        assert_eq!(plain.settings.server, ["a.example:8877"]);
        assert_eq!(plain.settings.timeout, Duration::from_secs(30));
        assert_eq!(strategy_key(&plain.settings, "tcp-punch", "timeout"), "7s");
        let from = plain.explain();
        let top = from
            .iter()
            .find(|r| r.0 == "strategy.tcp-punch.timeout")
            .unwrap();
        assert_eq!(top.2.to_string(), format!("{} [strategy]", p.display()));
        // Defaults of the same table stay.
        assert_eq!(strategy_key(&plain.settings, "tcp-punch", "low-ttl"), 2);
        assert_eq!(plain.settings.strategies, ["tcp-punch", "tcp-direct"]);

        let office = load(&p, Some("office"), Overrides::default()).unwrap();
        assert_eq!(office.settings.strategies, ["tcp-direct", "tcp-punch"]);
        assert_eq!(strategy_key(&office.settings, "tcp-punch", "timeout"), "3s");
        // Untouched by the profile: still the [default] value.
        assert_eq!(office.settings.timeout, Duration::from_secs(30));

        let mut flags = Overrides::default();
        flags.set("strategy.tcp-punch.timeout", "1s", "--strategy-timeout");
        let flagged = load(&p, Some("office"), flags).unwrap();
        assert_eq!(
            strategy_key(&flagged.settings, "tcp-punch", "timeout"),
            "1s"
        );

        let sources: Vec<_> = flagged.explain();
        let source = |key: &str| sources.iter().find(|r| r.0 == key).unwrap().2.to_string();
        assert_eq!(
            source("strategy.tcp-punch.timeout"),
            "flag --strategy-timeout"
        );
        assert_eq!(
            source("strategies"),
            format!("{} [profile.office]", p.display())
        );
        assert_eq!(source("server"), format!("{} [default]", p.display()));
        assert_eq!(source("strategy.tcp-direct.timeout"), "built-in default");
    }

    #[test]
    fn strategy_tables_of_plugins_and_profiles() {
        // A plugin's table the defaults do not know is kept for its factory to check.
        let p = write(
            "plugin.toml",
            "[strategy.port-forwarded]\nport = 4000\n[profile.home.strategy.port-forwarded]\nport = 5000\n",
        );
        let plain = load(&p, None, Overrides::default()).unwrap();
        assert_eq!(
            strategy_key(&plain.settings, "port-forwarded", "port"),
            4000
        );
        let home = load(&p, Some("home"), Overrides::default()).unwrap();
        assert_eq!(strategy_key(&home.settings, "port-forwarded", "port"), 5000);
    }

    #[test]
    fn bad_values_name_the_key_the_file_and_the_choices() {
        let cases = [
            (
                "[default]\ntimeout = \"soon\"\n",
                "bad setting `timeout`: invalid value string \"soon\", expected a duration",
            ),
            (
                "[default.tcp-punch]\ntimeout = \"5s\"\n",
                "`tcp-punch.timeout` has moved: strategy settings now live in [strategy.tcp-punch]",
            ),
            ("[defualt]\n", "unknown top-level key `defualt`"),
            (
                "[default]\nnonsense = 1\n",
                "bad setting `nonsense`: unknown field",
            ),
            ("[default]\nstrategies = []\n", "the strategy list is empty"),
        ];
        for (i, (text, expected)) in cases.iter().enumerate() {
            let p = write(&format!("bad{i}.toml"), text);
            let err = load(&p, None, Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err}");
            assert!(
                err.contains(&p.display().to_string()),
                "no file named: {err}"
            );
        }
        let p = write("profiles.toml", FILE);
        let err = load(&p, Some("home"), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("profile 'home' not found") && err.contains("available: office"),
            "{err}"
        );
    }

    #[test]
    fn rendezvous_limits_and_server_tokens_load() {
        let p = write(
            "limits.toml",
            "[default]\nserver-token = \"c\"\n[default.rendezvous]\nmax-conns-per-ip = 8\n\
             max-sessions = 1000\nidle-timeout = \"30s\"\njoin-rate = 5\njoin-burst = 10\n\
             server-token = \"s\"\ncluster = \"redis://10.0.0.5:6379\"\n\
             public-addr = [\"203.0.113.7:8877\", \"[2001:db8::7]:0\"]\n",
        );
        let s = load(&p, None, Overrides::default()).unwrap().settings;
        assert_eq!(
            s.rendezvous.cluster.as_deref(),
            Some("redis://10.0.0.5:6379")
        );
        assert_eq!(
            s.rendezvous.public_addr,
            [
                "203.0.113.7:8877".parse::<std::net::SocketAddr>().unwrap(),
                "[2001:db8::7]:0".parse().unwrap()
            ]
        );
        assert_eq!(s.server_token.as_deref(), Some("c"));
        let rv = s.rendezvous;
        assert_eq!(
            (
                rv.max_conns_per_ip,
                rv.max_sessions,
                rv.join_rate,
                rv.join_burst
            ),
            (8, 1000, 5, 10)
        );
        assert_eq!(rv.idle_timeout, Duration::from_secs(30));
        assert_eq!(rv.server_token.as_deref(), Some("s"));
        let defaults = RendezvousConfig::default();
        assert_eq!(defaults.server_token, None);
        assert_eq!(defaults.max_conns_per_ip, 64);
        let p = write(
            "badlimit.toml",
            "[default.rendezvous]\nidle-timeout = \"soon\"\n",
        );
        let err = load(&p, None, Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad setting `rendezvous.idle-timeout`"),
            "{err}"
        );
    }

    fn default_portmap_enabled(p: &Path) -> bool {
        load(p, None, Overrides::default())
            .unwrap()
            .settings
            .portmap
            .enabled
    }

    #[test]
    fn portmap_is_off_by_default_and_profiles_turn_it_on() {
        use nettool_portmap::Protocol;
        let p = write(
            "portmap.toml",
            "[profile.home.portmap]\nenabled = true\nprotocols = [\"pcp\", \"upnp\"]\n",
        );
        let s = load(&p, None, Overrides::default()).unwrap().settings;
        assert!(!s.portmap.enabled);
        assert_eq!(s.portmap.protocols, Protocol::ALL);
        let home = load(&p, Some("home"), Overrides::default())
            .unwrap()
            .settings;
        assert!(home.portmap.enabled);
        assert_eq!(home.portmap.protocols, [Protocol::Pcp, Protocol::Upnp]);
        for (name, body, want) in [
            (
                "pm1.toml",
                "protocols = [\"natpmp\"]",
                "unknown port mapping protocol \"natpmp\"",
            ),
            ("pm2.toml", "protocols = []", "protocol list is empty"),
            ("pm3.toml", "protocols = [\"pcp\", \"pcp\"]", "listed twice"),
            ("pm4.toml", "enable = true", "enable"),
        ] {
            let p = write(name, &format!("[default.portmap]\n{body}\n"));
            let err = load(&p, None, Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want) && err.contains("portmap"), "{err}");
        }
    }

    #[test]
    fn the_example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nettool.example.toml");
        for profile in [None, Some("office"), Some("hotspot"), Some("home")] {
            load(&p, profile, Overrides::default()).unwrap();
        }
        // Port mapping: off unless a profile (here `home`) turns it on.
        let home = load(&p, Some("home"), Overrides::default()).unwrap();
        assert!(home.settings.portmap.enabled);
        assert!(!default_portmap_enabled(&p));
        let office = load(&p, Some("office"), Overrides::default()).unwrap();
        assert_eq!(
            strategy_key(&office.settings, "tcp-direct", "listen-port"),
            40000
        );
    }
}
