//! `nettool demo`: a rendezvous server and two peers on loopback, every strategy compared.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use nettool_config::Settings;
use nettool_core::registry::StrategyRegistry;
use nettool_core::{ConnectParams, Outcome};
use nettool_rendezvous::{RendezvousServer, ServerConfig};

use crate::{compare, ConfiguredStrategy};

/// `nettool demo`.
pub(crate) async fn demo(registry: &StrategyRegistry) -> Result<i32> {
    // The embedded server speaks TLS like any other, with a key made for this run; the peers
    // pin it (nothing is written to the known-servers file).
    let identity = nettool_rendezvous::ServerIdentity::ephemeral()
        .context("making the embedded server's TLS identity")?;
    let config = ServerConfig {
        tls: Some(identity.tls_config()?),
        ..ServerConfig::default()
    };
    let server = RendezvousServer::bind("127.0.0.1:0".parse()?, config)
        .await
        .context("cannot start the embedded rendezvous server on loopback")?;
    let addr = server.local_addr()?;
    let server_task = tokio::spawn(server.run());
    println!("nettool demo: rendezvous on {addr}; two peers on loopback compare every strategy");
    let settings = Settings {
        server_key: Some(identity.fingerprint().to_string()),
        ..Settings::default()
    };
    let strategies: Vec<ConfiguredStrategy> = registry
        .build(&[], &Default::default())
        .context("building the default strategies")?
        .into_iter()
        .map(|(strategy, timeout)| ConfiguredStrategy { strategy, timeout })
        .collect();
    let params = ConnectParams {
        server: addr,
        session: "demo".into(),
        secret: Some("demo".into()),
    };
    let options = compare::CompareOptions {
        rounds: 1,
        size: 8 << 20,
        pings: 10,
    };
    let quiet = !std::io::stderr().is_terminal();
    let show = |line: &str| {
        if !quiet {
            eprintln!("nettool demo: {line}");
        }
    };
    let control = crate::servers::control(&settings)?;
    let ((_, rows), _) = tokio::join!(
        compare::run(
            &settings,
            &control,
            &strategies,
            &params,
            &options,
            &show,
            &|| {}
        ),
        compare::run(
            &settings,
            &control,
            &strategies,
            &params,
            &options,
            &|_| {},
            &|| {}
        ),
    );
    server_task.abort();
    println!("{}", compare::table(&rows));
    let linked: Vec<&str> = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Connected && r.error.is_none())
        .map(|r| r.strategy.as_str())
        .collect();
    println!(
        "linked with: {}",
        if linked.is_empty() {
            "nothing".to_owned()
        } else {
            linked.join(", ")
        }
    );
    Ok(if linked.len() == rows.len() { 0 } else { 1 })
}
