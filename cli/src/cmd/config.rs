//! `nettool config show`: the effective settings and where each value came from.

use anyhow::Result;
use clap::Subcommand;
use nettool_config::Loaded;

/// Subcommands of `nettool config`.
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Print the effective settings and where each value came from.
    Show,
}

/// `nettool config show`.
pub(crate) fn config_show(loaded: &Loaded) -> Result<i32> {
    println!(
        "# config file: {}",
        loaded
            .file
            .as_ref()
            .map_or("none".to_owned(), |p| p.display().to_string())
    );
    println!("# profile: {}", loaded.profile.as_deref().unwrap_or("none"));
    let rows = loaded.explain();
    let width = rows
        .iter()
        .map(|(k, v, _)| k.len() + v.len() + 3)
        .max()
        .unwrap_or(0);
    for (key, value, source) in rows {
        let hidden = ["secret", "server-token", "rendezvous.server-token"];
        let value = if hidden.contains(&key.as_str()) && value != "null" {
            "\"(hidden)\"".to_owned()
        } else {
            value
        };
        let kv = format!("{key} = {value}");
        println!("{kv:<width$}  # {source}");
    }
    Ok(0)
}
