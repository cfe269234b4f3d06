//! `nettool netcheck`: what kind of network this host is on, per address family.
//!
//! Runs [`nettool_core::discovery::discover_all`] against a nettool rendezvous server (all
//! parts) or any RFC 5780 STUN server (the UDP parts; TCP mapping is then `unknown`) and prints
//! a table, or with `--json` the stable [`NetReport`] object documented in the README.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use nettool_core::discovery::{
    discover_all, DiscoverOptions, FamilyReport, Filtering, Mapping, NetReport,
};
use nettool_core::nat_cache::Entry;

/// Arguments of `nettool netcheck`.
#[derive(Debug, Args)]
pub(crate) struct NetcheckArgs {
    /// Server to test against, HOST:PORT (port defaults to 8877): a nettool rendezvous server
    /// started with --other-address, or any RFC 5780 STUN server (e.g. coturn, port 3478).
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// Print the JSON report on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// How long one test waits for its answer; a filtering test without an answer in this
    /// time counts as filtered.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    timeout: Duration,
    /// Skip the TCP mapping test (observe connections).
    #[arg(long)]
    no_tcp: bool,
    /// Also ask the gateway which port mapping protocols it answers (UPnP-IGD by SSDP,
    /// NAT-PMP and PCP on UDP 5351 of the default gateway; within --timeout, nothing is
    /// mapped). Without it nothing is sent to the gateway.
    #[arg(long)]
    portmap: bool,
    /// With --portmap: a protocol to ask (repeatable; default all three).
    #[arg(
        long = "portmap-protocol",
        value_name = "upnp|nat-pmp|pcp",
        requires = "portmap"
    )]
    portmap_protocols: Vec<nettool_portmap::Protocol>,
}

/// Runs netcheck; exit status 0 when at least one family was measured.
pub(crate) async fn run(args: NetcheckArgs) -> Result<i32> {
    let addrs = crate::resolve_all(&args.server).await?;
    let opts = DiscoverOptions {
        test_timeout: args.timeout,
        tcp: !args.no_tcp,
    };
    let gateway = async {
        if !args.portmap {
            return None;
        }
        let mut settings = nettool_portmap::Settings {
            timeout: args.timeout,
            ..Default::default()
        };
        if !args.portmap_protocols.is_empty() {
            settings.protocols = args.portmap_protocols.clone();
        }
        Some(nettool_portmap::PortMapper::new(settings).discover().await)
    };
    let ((mut report, errors), gateway) = tokio::join!(discover_all(&addrs, &opts), gateway);
    if let Some(g) = gateway {
        report.port_mapping = g.answered.iter().map(|p| p.name().to_owned()).collect();
        report.port_mapping_probe = Some(g);
    }
    for e in &errors {
        eprintln!("nettool netcheck: {e}");
    }
    if report.ipv4.is_none() && report.ipv6.is_none() {
        bail!(
            "no address family could be measured against '{}'",
            args.server
        );
    }
    let cache = crate::nat_cache_file();
    let entries = match &cache {
        Some(c) => c.entries().await,
        None => Vec::new(),
    };
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["nat_cache"] = serde_json::json!({
            "path": cache.as_ref().map(|c| c.path().display().to_string()),
            "ttl_s": cache.as_ref().map(|c| c.ttl().as_secs()),
            "entries": entries
                .iter()
                .map(|e| {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    v["age_s"] = e.age_secs().into();
                    v
                })
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", table(&report));
        if let Some(c) = &cache {
            print!("{}", cache_table(c, &entries));
        }
    }
    Ok(0)
}

/// What the NAT cache holds (`connect` confirms an entry's mapping before it uses it).
fn cache_table(cache: &nettool_core::nat_cache::NatCache, entries: &[Entry]) -> String {
    let ttl = cache.ttl().as_secs();
    let mut out = format!(
        "NAT cache {} ({} entries; kept {} s, each use confirmed first):\n",
        cache.path().display(),
        entries.len(),
        ttl
    );
    if entries.is_empty() {
        return out;
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "network",
        "udp mapping",
        "filtering",
        "tcp mapping",
        "age",
        "last winner",
    ]);
    for e in entries {
        let age = e.age_secs();
        let winner = e.winner.as_ref().map_or("-".to_owned(), |w| {
            format!("{} in {} ms", w.strategy, w.elapsed_ms)
        });
        t.add_row([
            e.key.clone(),
            mapping(e.nat.udp_mapping).into(),
            filtering(e.nat.udp_filtering).into(),
            mapping(e.nat.tcp_mapping).into(),
            if age < ttl {
                format!("{age} s")
            } else {
                format!("{age} s (expired)")
            },
            winner,
        ]);
    }
    out.push_str(&format!("{t}\n"));
    out
}

fn mapping(m: Mapping) -> &'static str {
    match m {
        Mapping::NoNat => "no NAT",
        Mapping::EndpointIndependent => "endpoint-independent",
        Mapping::AddressDependent => "address-dependent",
        Mapping::AddressAndPortDependent => "address-and-port-dependent",
        Mapping::Unknown => "unknown",
    }
}

fn filtering(f: Filtering) -> &'static str {
    match f {
        Filtering::EndpointIndependent => "endpoint-independent",
        Filtering::AddressDependent => "address-dependent",
        Filtering::AddressAndPortDependent => "address-and-port-dependent",
        Filtering::Unknown => "unknown",
    }
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
}

/// The human-readable report.
fn table(report: &NetReport) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(["", "IPv4", "IPv6"]);
    let col = |f: &dyn Fn(&FamilyReport) -> String| {
        [&report.ipv4, &report.ipv6].map(|r| r.as_ref().map_or_else(|| "-".to_owned(), f))
    };
    let rows: [(&str, [String; 2]); 8] = [
        ("server", col(&|r| r.server.to_string())),
        ("udp mapping", col(&|r| mapping(r.udp_mapping).into())),
        ("udp filtering", col(&|r| filtering(r.udp_filtering).into())),
        ("tcp mapping", col(&|r| mapping(r.tcp_mapping).into())),
        (
            "public address",
            col(&|r| r.public_addr.map_or("unknown".into(), |a| a.to_string())),
        ),
        (
            "port preservation",
            col(&|r| yes_no(r.port_preservation).into()),
        ),
        ("hairpinning", col(&|r| yes_no(r.hairpinning).into())),
        ("rtt", col(&|r| format!("{:.1} ms", r.rtt_ms))),
    ];
    for (name, [v4, v6]) in rows {
        t.add_row([name.to_owned(), v4, v6]);
    }
    let mapping_protocols = match &report.port_mapping_probe {
        None => "not probed (--portmap asks the gateway)".to_owned(),
        Some(probe) => probe.summary(),
    };
    format!("{t}\nport mapping: {mapping_protocols}\n")
}
