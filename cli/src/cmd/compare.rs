//! `nettool compare`: its flags and the command; the comparison itself is `crate::compare`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use nettool_config::Settings;
use nettool_core::orchestrator::Event;
use nettool_core::ConnectParams;

use crate::{choose_server, compare, parse_size, progress, ConfiguredStrategy, PeerArgs};

/// Flags of `nettool compare`.
#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    #[command(flatten)]
    pub(crate) peer: PeerArgs,
    /// Name of the network you are on, stored with the results (e.g. home, office, lte).
    #[arg(long, default_value = "unlabelled")]
    label: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Rounds over all strategies.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Bytes sent each way for the throughput figure (suffixes K, M, G, KiB, MiB, GiB).
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    size: u64,
    /// Pings each way for the round-trip figure (the median is reported).
    #[arg(long, default_value_t = 10)]
    pings: u32,
    /// History file the run is appended to as one JSON line (default: the user data dir's
    /// nettool/history.jsonl).
    #[arg(long, value_name = "FILE")]
    pub(crate) history: Option<PathBuf>,
    /// Do not append to the history.
    #[arg(long, conflicts_with = "history")]
    no_history: bool,
    /// Print success rate and median time to link per label and strategy from the history,
    /// instead of running a comparison.
    #[arg(long)]
    pub(crate) summary: bool,
}

/// `nettool compare` (a comparison; `--summary` is answered before settings are loaded).
pub(crate) async fn compare_cmd(
    args: CompareArgs,
    settings: Settings,
    strategies: &[ConfiguredStrategy],
) -> Result<i32> {
    let control = crate::servers::control(&settings)?;
    let (server, _) = choose_server(&settings.server).await?;
    let session = settings.session.clone().unwrap_or_default();
    if session.is_empty() {
        bail!("no session: give --session NAME (not empty) or set `session` in the config");
    }
    let history = if args.no_history {
        None
    } else {
        Some(
            args.history
                .clone()
                .or_else(compare::default_history)
                .context(
                    "no user data directory for the history: give --history FILE or --no-history",
                )?,
        )
    };
    let params = ConnectParams {
        server,
        session: session.clone(),
        secret: settings.secret.clone(),
    };
    let options = compare::CompareOptions {
        rounds: args.rounds,
        size: args.size,
        pings: args.pings.max(1),
    };
    let quiet = !std::io::stderr().is_terminal();
    let show = |line: &str| {
        if !quiet {
            eprintln!("nettool compare: {line}");
        }
    };
    // Like connect's, always: scripts (and tests) start the second peer when they see it.
    let waiting = || progress(Event::Waiting);
    let (role, rows) = compare::run(
        &settings, &control, strategies, &params, &options, &show, &waiting,
    )
    .await;
    let run = compare::CompareRun {
        time_unix: compare::now_unix(),
        label: args.label.clone(),
        session,
        role,
        size: args.size,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run)?);
    } else {
        println!("{}", compare::table(&run.rows));
    }
    if let Some(path) = history {
        compare::append_history(&path, &run).await?;
        if !quiet {
            eprintln!("nettool compare: appended to {}", path.display());
        }
    }
    Ok(0)
}
