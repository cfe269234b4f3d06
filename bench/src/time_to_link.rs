//! Time to link: both peers in this process, or one peer against an external server.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nettool_core::orchestrator::Event;
use nettool_core::{ConnectParams, Link, Orchestrator, Role};

use super::{TimeToLinkRow, Verdict};
use nettool::bench_support::{orchestrator, ConfiguredStrategy};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ttl_row(name: &str, runs: u32, mut times: Vec<f64>, error: Option<String>) -> TimeToLinkRow {
    times.sort_by(f64::total_cmp);
    let target = target_time_to_link_ms(name);
    let p50 = percentile(&times, 50.0);
    TimeToLinkRow {
        strategy: name.into(),
        runs,
        linked: times.len() as u32,
        p50_ms: p50,
        p95_ms: percentile(&times, 95.0),
        min_ms: times.first().copied(),
        max_ms: times.last().copied(),
        target_p50_ms: target,
        verdict: match p50 {
            Some(p) if times.len() as u32 == runs => Verdict::of(p <= target),
            _ => Verdict::Miss,
        },
        error,
    }
}

/// One connect as one peer: the link (if any), its role, and when it was paired and done.
async fn connect_timed(
    orch: &Orchestrator,
    params: &ConnectParams,
) -> (Result<(Link, Role)>, Option<Instant>, Instant) {
    let paired = Mutex::new(None);
    let (link, report) = orch
        .connect(params, &|e| {
            if matches!(e, Event::Paired { .. }) {
                *paired.lock().expect("paired lock") = Some(Instant::now());
            }
        })
        .await;
    let end = Instant::now();
    let paired = *paired.lock().expect("paired lock");
    let res = match (link, report.role) {
        (Some(l), Some(r)) => Ok((l, r)),
        _ => Err(anyhow::anyhow!(
            "{}",
            report
                .attempts
                .first()
                .and_then(|a| a.error.clone())
                .or(report.error)
                .unwrap_or_else(|| "no link".into())
        )),
    };
    (res, paired, end)
}

/// Both peers in this process link once with `config`; returns the time from both paired to
/// both linked, and both ends of the link with their roles.
pub(super) async fn link_pair(
    config: &ConfiguredStrategy,
    overall: Duration,
    params: &ConnectParams,
) -> Result<(Duration, (Link, Role), (Link, Role))> {
    let a = orchestrator(std::slice::from_ref(config), overall);
    let b = orchestrator(std::slice::from_ref(config), overall);
    let ((ra, pa, ea), (rb, pb, eb)) =
        tokio::join!(connect_timed(&a, params), connect_timed(&b, params));
    let (la, lb) = (ra?, rb?);
    let paired = pa.max(pb).context("no paired event")?;
    Ok((ea.max(eb).duration_since(paired), la, lb))
}

pub(super) async fn time_to_link_local(
    config: &ConfiguredStrategy,
    overall: Duration,
    base: &ConnectParams,
    runs: u32,
    progress: &dyn Fn(&str),
) -> TimeToLinkRow {
    let name = config.name();
    progress(&format!("time to link: {name} x {runs} ..."));
    let mut times = Vec::new();
    let mut error = None;
    for i in 0..runs {
        let params = ConnectParams {
            session: format!("{}/ttl/{name}/{i}", base.session),
            ..base.clone()
        };
        match link_pair(config, overall, &params).await {
            Ok((t, _, _)) => times.push(ms(t)),
            Err(e) => {
                error.get_or_insert_with(|| format!("run {i}: {e:#}"));
            }
        }
    }
    ttl_row(name, runs, times, error)
}

pub(super) async fn time_to_link_peer(
    orch: &Orchestrator,
    name: &str,
    base: &ConnectParams,
    runs: u32,
    progress: &dyn Fn(&str),
) -> TimeToLinkRow {
    progress(&format!("time to link: {name} x {runs} ..."));
    let mut times = Vec::new();
    let mut error = None;
    for i in 0..runs {
        let params = ConnectParams {
            session: format!("{}/ttl/{name}/{i}", base.session),
            ..base.clone()
        };
        let (res, paired, end) = connect_timed(orch, &params).await;
        match (res, paired) {
            (Ok((link, _)), Some(p)) => {
                times.push(ms(end.duration_since(p)));
                // Let the peer finish too before the next run reuses nothing but the server.
                drop(link);
            }
            (Ok(_), None) => {
                error.get_or_insert_with(|| format!("run {i}: no paired event"));
            }
            (Err(e), _) => {
                error.get_or_insert_with(|| format!("run {i}: {e:#}"));
            }
        }
    }
    ttl_row(name, runs, times, error)
}

fn target_time_to_link_ms(s: &str) -> f64 {
    match s {
        "udp-quic" => 15.0,
        _ => 5.0,
    }
}
