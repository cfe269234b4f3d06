//! `nettool connect`: one peer. Links (relay-first or the strategy ladder), then runs the
//! session over stdin and stdout (`crate::session`), or the original demo's hello-world.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use nettool_config::Settings;
use nettool_core::port_mapping::PortMapping;
use nettool_core::session::SessionConfig;
use nettool_peer::{Peer, PeerBuilder, PeerError};
use nettool_portmap::PortMapper;

use crate::{
    choose_server, legacy, parse_duration, parse_size, pump, session, tunables, use_code,
    write_report, wrong_code_message, BadSettings, CodeSide, ConfiguredStrategy, PeerArgs,
};

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    #[command(flatten)]
    pub(crate) peer: PeerArgs,
    /// Speak the original demo's 8877 text protocol with the server (no sessions: the server
    /// pairs clients in arrival order), then punch a plain TCP link as that demo meant to.
    #[arg(long, conflicts_with_all = ["strategies", "secret", "session", "code"])]
    pub(crate) legacy: bool,
    /// Instead of stdin/stdout: the first peer sends "Hello, world" once a second and prints
    /// "send message: Hello, world"; the second prints "recv message: Hello, world" for each.
    #[arg(long)]
    pub(crate) hello: bool,
    /// With --hello: stop after N messages (the first peer then closes its sending side).
    #[arg(
        long,
        value_name = "N",
        requires = "hello",
        env = "NETTOOL_HELLO_COUNT"
    )]
    pub(crate) hello_count: Option<u64>,
    /// Write the JSON report of the connect to this file (also when no link was made).
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Ask this network's gateway to map the ports of udp-quic and tcp-direct (UPnP-IGD,
    /// NAT-PMP, PCP), so a peer behind any NAT reaches them; the mappings are renewed while
    /// the link lasts and deleted when it ends (also on SIGINT, SIGTERM, SIGHUP). Use it
    /// behind a home router with UPnP or NAT-PMP on, when both sides are behind NATs that
    /// map per destination (otherwise only the relay links). Off by default: nothing is
    /// sent to the gateway. Also `[default.portmap] enabled = true` or a profile.
    #[arg(long)]
    pub(crate) portmap: bool,
    /// With port mapping on: a protocol to use (repeat for an order of preference; default
    /// upnp, nat-pmp, pcp). Also `portmap.protocols` in the config.
    #[arg(long = "portmap-protocol", value_name = "upnp|nat-pmp|pcp")]
    pub(crate) portmap_protocols: Vec<String>,
    /// When the path fails (an error, or nothing heard for 3-10 s), keep the session and try
    /// for this long to link again through the rendezvous server (same strategies, from the
    /// current addresses) and continue at the last confirmed byte; after it, exit 1 saying
    /// how many bytes the peer confirmed (e.g. 60s, 5m).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub(crate) resume_timeout: Duration,
    /// Most bytes read from stdin and not yet confirmed written by the peer (kept for a
    /// resume; stdin is not read beyond it), e.g. 8MiB.
    #[arg(long, value_parser = parse_size, default_value = "8MiB")]
    pub(crate) send_buffer: u64,
    /// Wait for the strategy ladder before any data flows, as before relay-first. By default
    /// (no --strategy given, relay among the strategies) data flows over the relay as soon as
    /// both peers are paired, while the direct strategies run in the background; the session
    /// moves to the first direct path that links, losing nothing. Also `relay-first = false`
    /// in the config or a profile.
    #[arg(long)]
    pub(crate) no_relay_first: bool,
}

pub(crate) async fn connect(
    args: ConnectArgs,
    mut settings: Settings,
    configs: &[ConfiguredStrategy],
) -> Result<i32> {
    if args.legacy && settings.server.len() > 1 {
        // The original protocol has no request a server could answer without pairing.
        return Err(anyhow::Error::new(BadSettings(
            "--legacy takes one --server (the original protocol cannot probe a list)".into(),
        )));
    }
    let (server, all) = choose_server(&settings.server).await?;
    if args.legacy {
        return legacy::connect(server, args.hello, args.hello_count, settings.timeout).await;
    }
    let code_side = use_code(&args.peer, &mut settings, &all, "nettool connect", "").await?;
    let session = settings.session.clone().unwrap_or_default();
    if session.is_empty() {
        bail!("no session: give --session NAME (not empty) or set `session` in the config");
    }
    if settings.secret.is_none() {
        eprintln!(
            "nettool: warning: no --secret given; the link key is derived from the session name, \
             so anyone who knows the name can pass as the peer"
        );
    }
    // Port mapping only when asked for: otherwise no mapper exists and nothing is sent.
    let mapper = settings
        .portmap
        .enabled
        .then(|| PortMapper::new(settings.portmap.settings()));
    let control = crate::servers::control(&settings)?;
    let orch = crate::peer_orchestrator(configs, settings.timeout, &settings, control);
    // Relay-first with the configured order only: `--strategy X` means X alone, in order.
    let relay_first = settings.relay_first && args.peer.strategies.is_empty() && !args.hello;
    let mut peer = Peer::builder()
        .chosen_server(server, all)
        .session(session)
        .orchestrator(orch)
        .timeout(settings.timeout)
        .relay_first(relay_first)
        .session_config(SessionConfig {
            send_buffer: usize::try_from(args.send_buffer.max(1 << 16)).unwrap_or(usize::MAX),
            resume_timeout: args.resume_timeout,
            ..Default::default()
        });
    for s in &settings.server {
        peer = peer.server(s.clone());
    }
    if let Some(secret) = settings.secret.clone() {
        peer = peer.secret(secret);
    }
    if let Some(m) = &mapper {
        peer = peer.portmap(Arc::new(m.clone()) as Arc<dyn PortMapping>);
    }
    let code = connect_linked(peer, args, code_side).await;
    // However the link ended (done, signal, no link, error): delete the gateway's mappings.
    if let Some(m) = mapper {
        let live = m.mapped().len();
        if live > 0 {
            let deleted = m.release_all().await;
            eprintln!("nettool: port mappings deleted: {deleted} of {live}");
        }
    }
    code
}

/// `connect` once the orchestrator is built: link (the `nettool_peer` library), then run the
/// session over stdin and stdout or say hello; the exit code.
async fn connect_linked(
    peer: PeerBuilder,
    args: ConnectArgs,
    code_side: Option<CodeSide>,
) -> Result<i32> {
    let mut stop = pump::signals().context("installing signal handlers")?;
    let quiet = !std::io::stderr().is_terminal();
    let peer = peer.on_event(move |e| crate::say(e, quiet));
    let mut connection = match pump::or_signal(peer.connect(), &mut stop).await {
        Ok(Ok(c)) => c,
        Ok(Err(PeerError::NoLink(report))) => {
            port_mapping_lines(&report);
            if let Some(path) = &args.report {
                write_report(path, &report)?;
            }
            if report.wrong_code {
                eprintln!("nettool: {}", wrong_code_message(code_side));
            } else {
                eprintln!(
                    "nettool: no link: {}",
                    report.error.as_deref().unwrap_or("unknown reason")
                );
            }
            return Ok(1);
        }
        Ok(Err(e)) => return Err(e.into()),
        Err(sig) => {
            eprintln!("nettool: {} before a link was made", pump::signal_name(sig));
            return Ok(128 + sig);
        }
    };
    port_mapping_lines(connection.report());
    let crypto = if connection.link().strategy == "udp-quic" {
        "QUIC (quinn, userspace crypto)".to_owned()
    } else {
        pump::ktls_status().replace(" was used", " is used")
    };
    connection.report_mut().data_path = Some(format!("{crypto}; {}", tunables::status()));
    if let Some(path) = &args.report {
        write_report(path, connection.report())?;
    }
    let link = connection.link();
    eprintln!(
        "nettool: linked with {} via {}: {} -> {}",
        connection.report().role.map(|r| r.as_str()).unwrap_or("?"),
        link.strategy,
        link.local,
        link.remote
    );
    if args.hello {
        let role = connection
            .report()
            .role
            .expect("a linked report has a role");
        // The signal handlers replaced the default action: end on a signal here too.
        let hello = legacy::hello(connection.into_link(), role, args.hello_count);
        return match pump::or_signal(hello, &mut stop).await {
            Ok(r) => r,
            Err(sig) => {
                eprintln!("nettool: {}: stopped", pump::signal_name(sig));
                Ok(128 + sig)
            }
        };
    }
    session::run(connection, args.report.as_deref(), code_side, stop).await
}

/// What the gateway said and mapped (with port mapping on).
fn port_mapping_lines(report: &nettool_core::Report) {
    if let Some(pm) = &report.port_mapping {
        eprintln!("nettool: port mapping: {}", pm.discovery.summary());
        for m in &pm.mapped {
            eprintln!("nettool: port mapped: {m}");
        }
    }
}
