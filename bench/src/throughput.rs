//! Throughput: plain TCP on loopback against every strategy, interleaved.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use nettool_core::{ConnectParams, Link, Role};
use tokio::net::{TcpListener, TcpStream};

use super::time_to_link::{link_pair, percentile};
use super::{Throughput, ThroughputRow, Verdict};
use nettool::bench_support::{measure, CompareOptions, ConfiguredStrategy};

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

/// Two ends of a plain TCP connection on loopback, as links (first = the dialer).
async fn plain_tcp_pair() -> Result<((Link, Role), (Link, Role))> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (dialed, (accepted, _)) = (dialed?, accepted?);
    let as_link = |s: TcpStream| -> Result<Link> {
        let _ = s.set_nodelay(true);
        Ok(Link {
            local: s.local_addr()?,
            remote: s.peer_addr()?,
            stream: Box::new(s),
            strategy: "plain-tcp",
        })
    };
    Ok((
        (as_link(dialed)?, Role::First),
        (as_link(accepted)?, Role::Second),
    ))
}

async fn measure_pair(
    a: (Link, Role),
    b: (Link, Role),
    size: u64,
    limit: Duration,
) -> Result<(f64, f64)> {
    let options = CompareOptions {
        rounds: 1,
        size,
        pings: 1,
    };
    let both = async { tokio::join!(measure(a.0, a.1, &options), measure(b.0, b.1, &options)) };
    let (ma, mb) = tokio::time::timeout(limit, both)
        .await
        .context("the transfer timed out")?;
    let (ma, _) = (ma?, mb?);
    Ok((ma.first_to_second, ma.second_to_first))
}

pub(super) async fn throughput(
    configs: &[ConfiguredStrategy],
    overall: Duration,
    base: &ConnectParams,
    size: u64,
    rounds: u32,
    progress: &dyn Fn(&str),
) -> Throughput {
    // Index 0: plain TCP; then the strategies in order.
    let n = configs.len() + 1;
    let mut f2s: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut s2f: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut errors: Vec<Option<String>> = vec![None; n];
    let limit = overall.max(Duration::from_secs(60));
    for round in 1..=rounds.max(1) {
        progress(&format!("throughput: round {round}, plain TCP ..."));
        let plain = async {
            let (a, b) = plain_tcp_pair().await?;
            measure_pair(a, b, size, limit).await
        };
        match plain.await {
            Ok((x, y)) => {
                f2s[0].push(x);
                s2f[0].push(y);
            }
            Err(e) => {
                errors[0].get_or_insert_with(|| format!("round {round}: {e:#}"));
            }
        }
        for (i, config) in configs.iter().enumerate() {
            let name = config.name();
            progress(&format!("throughput: round {round}, {name} ..."));
            let params = ConnectParams {
                session: format!("{}/tput/{name}/{round}", base.session),
                ..base.clone()
            };
            let one = async {
                let (_, a, b) = link_pair(config, overall, &params).await?;
                measure_pair(a, b, size, limit).await
            };
            match one.await {
                Ok((x, y)) => {
                    f2s[i + 1].push(x);
                    s2f[i + 1].push(y);
                }
                Err(e) => {
                    errors[i + 1].get_or_insert_with(|| format!("round {round}: {e:#}"));
                }
            }
        }
    }
    let medians: Vec<(Option<f64>, Option<f64>)> = (0..n)
        .map(|i| (median(f2s[i].clone()), median(s2f[i].clone())))
        .collect();
    let mean = |m: (Option<f64>, Option<f64>)| match m {
        (Some(x), Some(y)) => Some((x + y) / 2.0),
        _ => None,
    };
    let plain = mean(medians[0]);
    let mut rows = vec![ThroughputRow {
        link: "plain TCP".into(),
        first_to_second_mbps: medians[0].0,
        second_to_first_mbps: medians[0].1,
        ratio: plain.map(|_| 1.0),
        target_ratio: None,
        verdict: Verdict::NotApplicable,
        error: errors[0].take(),
    }];
    for (i, config) in configs.iter().enumerate() {
        let name = config.name();
        let ratio = match (mean(medians[i + 1]), plain) {
            (Some(x), Some(p)) if p > 0.0 => Some(x / p),
            _ => None,
        };
        let target = target_ratio(name);
        rows.push(ThroughputRow {
            link: name.into(),
            first_to_second_mbps: medians[i + 1].0,
            second_to_first_mbps: medians[i + 1].1,
            ratio,
            target_ratio: Some(target),
            verdict: match ratio {
                Some(r) if errors[i + 1].is_none() => Verdict::of(r >= target),
                _ => Verdict::Miss,
            },
            error: errors[i + 1].take(),
        });
    }
    Throughput { size, rounds, rows }
}

fn target_ratio(s: &str) -> f64 {
    match s {
        "udp-quic" => 0.3,
        "relay" => 0.5,
        _ => 0.6,
    }
}
