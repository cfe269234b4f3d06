//! `nettool`: connect two peers behind NATs.
//!
//! Commands: `rendezvous` (the meeting point), `connect` (one peer; netcat-like once linked),
//! `demo` (a rendezvous and two peers on loopback, in one process), and more (`--help`).
//!
//! The binary is [`run_with`] over the built-in strategies. A custom binary registers its own
//! strategies too and runs the same CLI, where `--strategy NAME`, `strategies = [...]` and
//! `[strategy.NAME]` tables then accept them:
//!
//! ```no_run
//! let mut registry = nettool_strategies::registry();
//! // registry.register(my_plugin::factory()).unwrap();
//! std::process::exit(nettool::run_with(registry));
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use nettool_config::{Loaded, Overrides, Settings};
use nettool_core::orchestrator::Event;
use nettool_core::registry::{RegistryError, StrategyRegistry};
use nettool_core::Strategy;
use nettool_core::{Link, Orchestrator, Outcome, Report};
use std::sync::Arc;

pub mod bench_support;
mod cmd;
mod codes;
mod compare;
mod forwarding;
mod legacy;
mod pump;
mod servers;
mod session;
mod stdio;
mod tunables;

use cmd::compare::{compare_cmd, CompareArgs};
use cmd::config::{config_show, ConfigCommand};
use cmd::connect::{connect, ConnectArgs};
use cmd::demo::demo;
use cmd::expose::{expose, ExposeArgs};
use cmd::forward::{forward, ForwardArgs};
use cmd::netcheck;
use cmd::plain_tcp::{plain_tcp, PlainTcpArgs};
use cmd::rendezvous::{rendezvous, RendezvousArgs};
use cmd::strategies::strategies_list;
use codes::no_code;
pub(crate) use codes::{use_code, wrong_code_message, CodeSide};
pub(crate) use servers::{choose_server, resolve_all};

/// Connect two peers that sit behind NATs and firewalls.
///
/// A rendezvous server introduces the peers; they then try connection strategies in order
/// (TCP hole punching first) and report which one produced the link.
#[derive(Debug, Parser)]
#[command(name = "nettool", version, propagate_version = true)]
struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a rendezvous server that pairs peers by session name.
    ///
    /// Run it on a host both peers can reach. It serves TCP (and STUN on UDP) on the given
    /// address; peers that give the same --session are paired, at most two per session.
    Rendezvous(RendezvousArgs),
    /// Connect to the peer that uses the same session, then act like netcat.
    ///
    /// stdin goes to the peer until EOF (then the sending side is closed); the peer's bytes
    /// go to stdout until the peer closes. Progress (on a terminal) and a summary go to stderr.
    ///
    /// Example, on two machines:
    ///   nettool connect --server rv.example.net:8877 --session demo --strategy tcp-punch
    Connect(ConnectArgs),
    /// Run a rendezvous server and two peers on loopback and link them with every strategy.
    ///
    /// Needs no setup: shows what nettool does and that this machine's TCP stack supports it.
    Demo,
    /// Try every strategy on its own with the peer and compare them side by side.
    ///
    /// Both peers run it with the same --session. For each strategy: outcome, time to link,
    /// round trip over the link and throughput each way. A table on stdout (or --json); each
    /// run is appended to a history file with --label, and --summary compares labels.
    ///
    /// Example, on two machines:
    ///   nettool compare --server rv.example.net:8877 --session cmp --label office
    Compare(CompareArgs),
    /// Find out what kind of network this host is on (NAT mapping and filtering, per family).
    ///
    /// Against a rendezvous server started with --other-address (all tests), or any RFC 5780
    /// STUN server (the UDP tests). Prints a table, or with --json the report the README
    /// documents. Example:
    ///   nettool netcheck --server rv.example.net:8877 --json
    Netcheck(netcheck::NetcheckArgs),
    /// Make one local service (TARGET, HOST:PORT) reachable by `nettool forward` peers.
    ///
    /// Needs --secret. Serves several forwarders at once, each in a session of its own
    /// (relay-first: streams flow over the relay at once and move to a direct path; the session
    /// survives address changes, NAT flushes and a server restart under the relay); every
    /// stream a forwarder opens is connected to TARGET and nowhere else. Keeps a join waiting
    /// for the next forwarder at all times.
    ///
    /// Example: nettool expose --server rv.example.net --session ssh --secret K 127.0.0.1:22
    Expose(ExposeArgs),
    /// Accept local TCP connections and carry each one over one session to `nettool expose`.
    ///
    /// Each connection becomes its own stream (yamux over the session, per-stream flow
    /// control). The session resumes under its streams when the path fails (an ssh session
    /// through it survives an address change); one that cannot come back within its resume
    /// timeout ends, and the forwarder links again.
    ///
    /// Example: nettool forward --server rv.example.net --session ssh --secret K
    ///   --listen 127.0.0.1:2222   (then: ssh -p 2222 user@127.0.0.1)
    Forward(ForwardArgs),
    /// Inspect the configuration.
    ///
    /// Settings come from, lowest first: built-in defaults, the config file's [default]
    /// table (and top-level [strategy.NAME] tables), its [profile.NAME] table (and
    /// [profile.NAME.strategy.NAME]), NETTOOL_* environment variables (NETTOOL_TIMEOUT=30s,
    /// NETTOOL_STRATEGY__TCP_PUNCH__TIMEOUT=5s: `_` for `-`, `__` between sections),
    /// command-line flags.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Plain TCP with connect's stdin/stdout pump: the baseline of `nettool-bench --section cli-path`.
    #[command(hide = true)]
    PlainTcp(PlainTcpArgs),
    /// List the strategies this binary knows, in the default order, with their settings.
    ///
    /// Each strategy reads its own [strategy.NAME] table; every one takes `timeout` (one
    /// attempt's ceiling). A custom binary built with `nettool::run_with` lists its own too.
    Strategies,
}

/// The config file and profile flags (`--config`, `--profile`), global to every command.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file (TOML with a [default] table and [profile.NAME] tables). Default:
    /// $NETTOOL_CONFIG, else ./nettool.toml, else the user config dir's nettool/config.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Profile of the config file to use on top of [default] (default: $NETTOOL_PROFILE).
    #[arg(long, global = true, value_name = "NAME")]
    profile: Option<String>,
}

/// The flags of a peer: server, session, strategies, timeouts, secret or code.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// Rendezvous server, HOST:PORT (port defaults to 8877). Repeat to give fallbacks: the
    /// servers are tried in order and the first that answers is used (one line per server
    /// tried). Or `server` in the config (a string, or a list). A name's every address is
    /// used (A and AAAA): the control connection races them, IPv6 first, and each family
    /// reached is gathered for candidates; an IP literal is that family only.
    #[arg(long = "server", value_name = "HOST:PORT")]
    server: Vec<String>,
    /// Session name; the peer must use the same one. Or `session` in the config.
    #[arg(long)]
    session: Option<String>,
    /// Strategy to try; repeat to give an order (`nettool strategies` lists the names).
    /// Default: `strategies` from the config, else every registered strategy: tcp-punch,
    /// udp-quic, tcp-direct, relay.
    #[arg(long = "strategy", value_name = "NAME")]
    strategies: Vec<String>,
    /// Overall deadline for pairing and all attempts (e.g. 30s, 1m; default 60s).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Ceiling of each strategy's attempt (default: each strategy's own, 10s). With the plan
    /// on, attempts end earlier: a few round trips to the server, at least 2.5s.
    #[arg(long, value_parser = parse_duration)]
    strategy_timeout: Option<Duration>,
    /// `on` (default): measure this side's NAT while waiting for the peer, exchange it, skip
    /// the strategies that cannot work for this pair (the report says why) and time attempts
    /// from the round trips. `off`: try every strategy blindly, for comparison.
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    plan: Option<String>,
    /// Do not reuse NAT discovery results from earlier runs on this network. They are kept
    /// 10 minutes per default gateway, local and public address, in the user cache dir
    /// (`nettool netcheck` lists them), and each use is first confirmed by a one-round-trip
    /// check of the mapping: a contradicted entry is dropped and the NAT measured afresh.
    #[arg(long)]
    no_nat_cache: bool,
    /// Shared secret both peers must give; without it, anyone who knows the session name
    /// can pass as the peer. Also NETTOOL_SECRET or `secret` in the config.
    #[arg(long)]
    secret: Option<String>,
    /// Short code the other side printed (e.g. 7-guitarist-revenge; case and spaces for
    /// dashes do not matter): names the session and is the secret. Without --code, --session
    /// and --secret, connect and expose ask the server for a code and print it. One guess: a
    /// wrong code burns it, and both sides must start again.
    #[arg(long, value_name = "CODE", conflicts_with_all = ["session", "secret"])]
    code: Option<String>,
    /// Words in a code this side asks the server for (1 to 8): each word adds 8 bits.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        value_parser = clap::value_parser!(u8).range(1..=8)
    )]
    code_words: u8,
    /// Token the rendezvous server requires to join, if it requires one. Also
    /// NETTOOL_SERVER_TOKEN or `server-token` in the config.
    #[arg(long)]
    server_token: Option<String>,
    /// The rendezvous server's key as it prints it at start (sha256:HEX): only that key is
    /// accepted. Without it the key is trusted on first use and remembered in
    /// ~/.config/nettool/known_servers; a changed key is then refused (giving the new one
    /// here accepts it). Also `server-key` in the config.
    #[arg(long, value_name = "sha256:HEX")]
    server_key: Option<String>,
    /// Talk to the rendezvous server in plain JSON, not TLS (for servers older than the TLS
    /// control channel). Anyone on the path then reads the session name, both peers'
    /// addresses and the server token. Also `insecure-control = true` in the config.
    #[arg(long)]
    insecure_control: bool,
    /// tcp-punch: TTL of the priming SYN to each candidate (default 2; 0 turns priming off).
    #[arg(long)]
    punch_ttl: Option<u32>,
    /// Local port for tcp-punch's receive port, udp-quic's socket and tcp-direct's listener
    /// (0 = any free port).
    #[arg(long)]
    local_port: Option<u16>,
}

impl PeerArgs {
    /// The flags that override config values.
    fn overrides(&self, registry: &StrategyRegistry) -> Overrides {
        let mut o = Overrides::default();
        if !self.server.is_empty() {
            o.set("server", &self.server, "--server");
        }
        o.set_opt("session", self.session.as_ref(), "--session");
        o.set_opt("secret", self.secret.as_ref(), "--secret");
        o.set_opt("server-token", self.server_token.as_ref(), "--server-token");
        o.set_opt("server-key", self.server_key.as_ref(), "--server-key");
        if self.insecure_control {
            o.set("insecure-control", true, "--insecure-control");
        }
        if !self.strategies.is_empty() {
            o.set("strategies", &self.strategies, "--strategy");
        }
        o.set_opt("timeout", self.timeout.map(fmt_duration), "--timeout");
        o.set_opt("plan", self.plan.as_deref().map(|p| p == "on"), "--plan");
        if self.no_nat_cache {
            o.set("nat-cache", false, "--no-nat-cache");
        }
        for s in registry.names() {
            o.set_opt(
                &format!("strategy.{s}.timeout"),
                self.strategy_timeout.map(fmt_duration),
                "--strategy-timeout",
            );
        }
        // Flags of built-in strategies (absent from a registry without them).
        let mut builtin = |name: &str, key: &str, value: Option<u32>, flag: &str| {
            if registry.get(name).is_some() {
                o.set_opt(&format!("strategy.{name}.{key}"), value, flag);
            }
        };
        builtin("tcp-punch", "low-ttl", self.punch_ttl, "--punch-ttl");
        let port = self.local_port.map(u32::from);
        builtin("tcp-punch", "local-port", port, "--local-port");
        builtin("udp-quic", "local-port", port, "--local-port");
        builtin("tcp-direct", "listen-port", port, "--local-port");
        o
    }
}

/// Parses a byte count with an optional unit: 8MiB, 500K, 1G (powers of 1000 or 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size '{s}' (examples: 1000000, 500K, 8MiB, 1G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "bad size unit '{other}' in '{s}' (use K, M, G, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("bad duration '{s}': {e} (examples: 500ms, 10s, 2m)"))
}

/// Runs the `nettool` command line with the strategies of `registry`; returns the process's
/// exit status (0 linked and done, 1 failed, 2 bad flags or settings).
pub fn run_with(registry: StrategyRegistry) -> i32 {
    // Before anything else (threads, files): may start this process again, see `tunables`.
    tunables::reexec_with_tuned_memcpy();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // `connect` moves bytes between stdio and one link: one thread does that with less CPU per
    // byte than a worker pool, whose cross-thread wake-ups cost more than they win here
    // (measured in `nettool-bench --section cli-path`, CPU column; README "Data path").
    // `expose` and `forward` carry hundreds of connections at once and keep the pool, as do
    // the server and the in-process commands.
    let one_thread = matches!(cli.command, Command::Connect(_) | Command::Netcheck(_));
    let runtime = if one_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nettool: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = runtime.block_on(async {
        match run(cli.command, cli.config, &registry).await {
            Ok(code) => code,
            Err(e) if e.is::<BadSettings>() => {
                eprintln!("nettool: {e:#}");
                2
            }
            Err(e) => {
                eprintln!("nettool: {e:#}");
                1
            }
        }
    });
    // Put stdio's flags back (a non-blocking stdin left behind breaks the user's shell).
    stdio::restore();
    code
}

/// Settings that name an unknown strategy or carry a bad strategy table: exit status 2.
#[derive(Debug)]
struct BadSettings(String);

impl std::fmt::Display for BadSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadSettings {}

/// A strategy built from its settings, with its attempt timeout.
#[derive(Clone)]
pub struct ConfiguredStrategy {
    strategy: Arc<dyn Strategy>,
    timeout: Duration,
}

impl ConfiguredStrategy {
    /// The strategy's name.
    pub fn name(&self) -> &'static str {
        self.strategy.name()
    }
}

/// The configured strategies in order, built by the registry from their tables. Errors name
/// the strategy, the key and where the value came from.
fn build_strategies(
    loaded: &Loaded,
    registry: &StrategyRegistry,
) -> Result<Vec<ConfiguredStrategy>> {
    let settings = &loaded.settings;
    registry
        .build(&settings.strategies, &settings.strategy)
        .map(|built| {
            built
                .into_iter()
                .map(|(strategy, timeout)| ConfiguredStrategy { strategy, timeout })
                .collect()
        })
        .map_err(|e| {
            let key = match &e {
                RegistryError::BadTable { name, .. } => format!("strategy.{name}"),
                RegistryError::Unknown { name, .. } if settings.strategy.contains_key(name) => {
                    format!("strategy.{name}")
                }
                _ => "strategies".to_owned(),
            };
            let origin = loaded
                .origin(&key)
                .map(|s| format!(" (from {s})"))
                .unwrap_or_default();
            anyhow::Error::new(BadSettings(format!("{e}{origin}")))
        })
}

/// Logs to stderr at the level `-v` asked for (`verbose` times given); RUST_LOG overrides.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(command: Command, config: ConfigArgs, registry: &StrategyRegistry) -> Result<i32> {
    let load = |overrides: Overrides| bench_support::load_settings(&config, registry, overrides);
    match command {
        Command::Rendezvous(args) => {
            let mut o = Overrides::default();
            o.set_opt("rendezvous.listen", args.listen, "--listen");
            o.set_opt("rendezvous.listen-v6", args.listen_v6, "--listen-v6");
            o.set_opt(
                "rendezvous.session-expiry",
                args.session_expiry.map(fmt_duration),
                "--session-expiry",
            );
            if args.no_relay {
                o.set("rendezvous.relay", false, "--no-relay");
            }
            o.set_opt("rendezvous.relay-rate", args.relay_rate, "--relay-rate");
            o.set_opt(
                "rendezvous.relay-max-bytes",
                args.relay_max_bytes,
                "--relay-max-bytes",
            );
            o.set_opt(
                "rendezvous.relay-max-duration",
                args.relay_max_duration.map(fmt_duration),
                "--relay-max-duration",
            );
            o.set_opt(
                "rendezvous.relay-max-sessions",
                args.relay_max_sessions,
                "--relay-max-sessions",
            );
            let r = &args;
            let per_ip = r.max_conns_per_ip;
            o.set_opt("rendezvous.max-conns-per-ip", per_ip, "--max-conns-per-ip");
            o.set_opt("rendezvous.max-sessions", r.max_sessions, "--max-sessions");
            let idle = r.idle_timeout.map(fmt_duration);
            o.set_opt("rendezvous.idle-timeout", idle, "--idle-timeout");
            o.set_opt("rendezvous.join-rate", r.join_rate, "--join-rate");
            o.set_opt("rendezvous.join-burst", r.join_burst, "--join-burst");
            let token = r.server_token.as_ref();
            o.set_opt("rendezvous.server-token", token, "--server-token");
            let other = r.other_address;
            o.set_opt("rendezvous.other-address", other, "--other-address");
            let other6 = r.other_address_v6;
            o.set_opt("rendezvous.other-address-v6", other6, "--other-address-v6");
            o.set_opt("rendezvous.stun-rate", r.stun_rate, "--stun-rate");
            o.set_opt("rendezvous.stun-burst", r.stun_burst, "--stun-burst");
            o.set_opt("rendezvous.cluster", r.cluster.as_ref(), "--cluster");
            o.set_opt("rendezvous.identity", r.identity.as_ref(), "--identity");
            o.set_opt("rendezvous.tls-cert", r.tls_cert.as_ref(), "--tls-cert");
            o.set_opt("rendezvous.tls-key", r.tls_key.as_ref(), "--tls-key");
            if r.insecure_control {
                o.set("rendezvous.insecure-control", true, "--insecure-control");
            }
            o.set_opt("rendezvous.metrics", r.metrics, "--metrics");
            if !r.public_addrs.is_empty() {
                o.set("rendezvous.public-addr", &r.public_addrs, "--public-addr");
            }
            rendezvous(args.legacy, load(o)?.settings).await
        }
        Command::Connect(args) => {
            let mut o = args.peer.overrides(registry);
            if args.portmap {
                o.set("portmap.enabled", true, "--portmap");
            }
            if args.no_relay_first {
                o.set("relay-first", false, "--no-relay-first");
            }
            if !args.portmap_protocols.is_empty() {
                o.set(
                    "portmap.protocols",
                    &args.portmap_protocols,
                    "--portmap-protocol",
                );
            }
            let loaded = load(o)?;
            let strategies = build_strategies(&loaded, registry)?;
            connect(args, loaded.settings, &strategies).await
        }
        Command::Compare(args) => {
            if args.summary {
                let path = args
                    .history
                    .clone()
                    .or_else(compare::default_history)
                    .context("no history file: give --history FILE")?;
                println!("{}", compare::summary(&path).await?);
                return Ok(0);
            }
            no_code(&args.peer, "compare")?;
            let loaded = load(args.peer.overrides(registry))?;
            let strategies = build_strategies(&loaded, registry)?;
            compare_cmd(args, loaded.settings, &strategies).await
        }
        Command::Demo => demo(registry).await,
        Command::Netcheck(args) => netcheck::run(args).await,
        Command::Expose(args) => {
            let loaded = load(args.peer.overrides(registry))?;
            let strategies = build_strategies(&loaded, registry)?;
            expose(args, loaded.settings, &strategies).await
        }
        Command::Forward(args) => {
            let loaded = load(args.peer.overrides(registry))?;
            let strategies = build_strategies(&loaded, registry)?;
            forward(args, loaded.settings, &strategies).await
        }
        Command::Config(ConfigCommand::Show) => {
            let loaded = load(Overrides::default())?;
            build_strategies(&loaded, registry)?;
            config_show(&loaded)
        }
        Command::Strategies => {
            strategies_list(registry);
            Ok(0)
        }
        Command::PlainTcp(args) => plain_tcp(args).await,
    }
}

/// An orchestrator over `configs` in order, each with its attempt timeout, `overall` for all.
pub fn orchestrator(configs: &[ConfiguredStrategy], overall: Duration) -> Orchestrator {
    Orchestrator::new(
        configs
            .iter()
            .map(|c| (c.strategy.clone(), c.timeout))
            .collect(),
        overall,
    )
}

/// The orchestrator of a peer command: `configs` within `overall`, with the settings' server
/// token, plan and NAT cache, and the control channel secured by `control`.
pub(crate) fn peer_orchestrator(
    configs: &[ConfiguredStrategy],
    overall: Duration,
    settings: &Settings,
    control: nettool_core::control::ControlSecurity,
) -> Orchestrator {
    orchestrator(configs, overall)
        .with_server_token(settings.server_token.clone())
        .with_control(control)
        .with_plan(settings.plan)
        .with_nat_cache(nat_cache(settings))
}

/// The NAT discovery cache the settings ask for: `<user cache dir>/nettool/nat.json`.
fn nat_cache(settings: &Settings) -> Option<nettool_core::nat_cache::NatCache> {
    if !settings.nat_cache || !settings.plan {
        return None;
    }
    nat_cache_file()
}

/// The NAT discovery cache file, `<user cache dir>/nettool/nat.json`, entries kept 10 minutes.
fn nat_cache_file() -> Option<nettool_core::nat_cache::NatCache> {
    let path = dirs::cache_dir()?.join("nettool").join("nat.json");
    Some(nettool_core::nat_cache::NatCache::new(
        path,
        Duration::from_secs(600),
    ))
}

/// Prints a library event as the command line always has: the server chosen of several, the
/// connect's progress (with `quiet`, when stderr is no terminal, only "waiting": scripts and
/// tests start the second peer when they see it), direct paths and resumes.
pub(crate) fn say(e: nettool_peer::Event, quiet: bool) {
    use nettool_peer::Event as E;
    match e {
        E::ServerChosen { server, addr } => {
            eprintln!("nettool: server {server} ({addr}) answers; using it")
        }
        E::ServerFailed {
            server,
            error,
            next,
        } => {
            let next = if next {
                "trying the next"
            } else {
                "no more servers"
            };
            eprintln!("nettool: server {server}: {error}; {next}")
        }
        E::Connect(e) if !quiet || matches!(e, Event::Waiting) => progress(e),
        E::Path { strategy, at_ms } if !quiet => {
            eprintln!("nettool: the session runs on {strategy} from {at_ms} ms")
        }
        E::DirectReady {
            at_ms,
            strategy,
            local,
            remote,
        } => eprintln!(
            "nettool: direct path ready at {at_ms} ms: {strategy} ({local} -> {remote}); moving \
             the session to it"
        ),
        E::NoDirectPath { reason } => {
            eprintln!("nettool: no direct path ({reason}); staying on the relay")
        }
        E::Resumed {
            strategy,
            local,
            remote,
            tries,
        } => eprintln!(
            "nettool: resumed via {strategy} after {tries} attempt(s): {local} -> {remote}"
        ),
        _ => {}
    }
}

fn progress(event: Event) {
    match event {
        Event::Waiting => eprintln!("nettool: joined; waiting for the peer"),
        Event::Paired { role, strategies } => eprintln!(
            "nettool: paired as {role}; strategies: {}",
            strategies.join(", ")
        ),
        Event::AttemptStarted { strategy } => eprintln!("nettool: trying {strategy} ..."),
        Event::AttemptFinished(a) => match a.outcome {
            Outcome::Connected => {
                eprintln!("nettool: {} linked in {} ms", a.strategy, a.elapsed_ms)
            }
            _ => eprintln!(
                "nettool: {} {} after {} ms: {}",
                a.strategy,
                a.outcome.as_str(),
                a.elapsed_ms,
                a.error.as_deref().unwrap_or("")
            ),
        },
        _ => {}
    }
}

pub(crate) fn write_report(path: &PathBuf, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json + "\n")
        .with_context(|| format!("cannot write the report to {}", path.display()))
}

/// Pumps stdin/stdout over the link and says how it ended; the exit code.
async fn pump_and_report(
    link: Link,
    stop: tokio::sync::watch::Receiver<Option<i32>>,
) -> Result<i32> {
    let out = pump::pump_stdio(link, stop).await?;
    let totals = format!("sent {} bytes, received {} bytes", out.sent, out.received);
    if let Some(sig) = out.signal {
        // The link is closed and dropped; give a QUIC endpoint's driver a moment to put the
        // close on the wire (a userspace stack has no kernel to send it after we exit).
        tokio::time::sleep(Duration::from_millis(100)).await;
        eprintln!(
            "nettool: {}: closed the link; {totals}",
            pump::signal_name(sig)
        );
        return Ok(128 + sig);
    }
    if out.send_cut {
        eprintln!("nettool: peer closed (it no longer takes data); {totals}");
    } else {
        eprintln!("nettool: peer closed; done: {totals}");
    }
    Ok(0)
}
