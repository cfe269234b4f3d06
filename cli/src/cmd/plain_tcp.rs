//! `nettool plain-tcp` (hidden): one plain TCP connection pumped like `connect`'s link, the
//! baseline of `nettool-bench --section cli-path`.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use clap::Args;
use nettool_core::Link;

use crate::{pump, pump_and_report};

/// Flags of `nettool plain-tcp`.
#[derive(Debug, Args)]
pub(crate) struct PlainTcpArgs {
    /// Accept one connection on this address (prints `listening on ADDR`).
    #[arg(long, conflicts_with = "connect")]
    listen: Option<SocketAddr>,
    /// Connect to this address.
    #[arg(long)]
    connect: Option<SocketAddr>,
}

/// `plain-tcp`: one plain TCP connection pumped like `connect`'s link.
pub(crate) async fn plain_tcp(args: PlainTcpArgs) -> Result<i32> {
    let (stream, local, remote) = match (args.listen, args.connect) {
        (Some(addr), None) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            eprintln!("nettool: listening on {}", l.local_addr()?);
            let (s, remote) = l.accept().await.context("accepting")?;
            (s, l.local_addr()?, remote)
        }
        (None, Some(addr)) => {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            let local = s.local_addr()?;
            (s, local, addr)
        }
        _ => bail!("give --listen ADDR or --connect ADDR"),
    };
    let stop = pump::signals().context("installing signal handlers")?;
    let link = Link {
        stream: Box::new(stream),
        local,
        remote,
        strategy: "plain-tcp",
    };
    eprintln!("nettool: linked with ? via plain-tcp: {local} -> {remote}");
    pump_and_report(link, stop).await
}
