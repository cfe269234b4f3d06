//! `nettool-bench --section cluster`: pairings per second through two rendezvous nodes that
//! share sessions in Redis, against one node with its in-process registry, and the CPU time
//! per pairing Redis adds.
//!
//! A `redis-server` (from PATH, Debian's `redis-server` package) starts on a free loopback
//! port without persistence; the nodes are `nettool rendezvous` children on loopback with the
//! per-address limits lifted (every client comes from 127.0.0.1). Three setups, each pairing
//! `--pairings` sessions (at most 20,000 here) with `--concurrency` in flight, with the
//! capacity section's cheap clients (a join frame written by hand, reset on close):
//!
//! - one node, in-process registry (no `--cluster`): today's default;
//! - one node with `--cluster`: both peers on the same node, so Redis holds the session key
//!   (claimed, marked paired, deleted) but no message crosses nodes;
//! - two nodes: every session's first peer on node 1 and second on node 2, so every pairing
//!   also crosses nodes over pub/sub (pair request, answer, "peer left").
//!
//! CPU is read from /proc for the nodes and for redis-server. Two cores shared with the
//! clients cannot show scaling, so there is no target: the figure is the cost per pairing.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::capacity::{proc_cpu_seconds, raw_join, run_pairings};
use super::server_proc::ServerProc;

/// Pairings per setup at most (the default `--pairings` is sized for the capacity section).
const MAX_PAIRINGS: u64 = 20_000;

/// The cluster figures.
#[derive(Debug, Serialize)]
pub(crate) struct ClusterBench {
    pub(crate) rows: Vec<ClusterRow>,
    /// CPU time per pairing (nodes and Redis) with two nodes, minus one in-process node's,
    /// microseconds.
    pub(crate) redis_cost_us_per_pairing: Option<f64>,
    pub(crate) error: Option<String>,
}

/// One setup.
#[derive(Debug, Serialize)]
pub(crate) struct ClusterRow {
    pub(crate) setup: &'static str,
    pub(crate) pairings: u64,
    pub(crate) failed: u64,
    pub(crate) concurrency: usize,
    pub(crate) seconds: f64,
    pub(crate) per_second: f64,
    /// CPU time of the rendezvous node(s) per pairing, microseconds.
    pub(crate) node_cpu_us_per_pairing: f64,
    /// CPU time of redis-server per pairing, microseconds.
    pub(crate) redis_cpu_us_per_pairing: f64,
    pub(crate) error: Option<String>,
}

impl ClusterRow {
    fn total_cpu_us(&self) -> f64 {
        self.node_cpu_us_per_pairing + self.redis_cpu_us_per_pairing
    }
}

impl ClusterBench {
    pub(crate) fn render(&self) -> String {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        t.set_header([
            "setup",
            "pairings/s",
            "node CPU / pairing",
            "redis CPU / pairing",
            "detail",
        ]);
        for r in &self.rows {
            t.add_row([
                r.setup.to_owned(),
                format!("{:.0}/s", r.per_second),
                format!("{:.1} µs", r.node_cpu_us_per_pairing),
                format!("{:.1} µs", r.redis_cpu_us_per_pairing),
                format!(
                    "{} paired ({} failed) in {:.2} s, {} in flight{}",
                    r.pairings,
                    r.failed,
                    r.seconds,
                    r.concurrency,
                    r.error
                        .as_deref()
                        .map(|e| format!("; {e}"))
                        .unwrap_or_default()
                ),
            ]);
        }
        let cost = self.redis_cost_us_per_pairing.map_or_else(
            || "-".to_owned(),
            |c| format!("{c:.1} µs of CPU per pairing (nodes and redis-server together)"),
        );
        format!(
            "Rendezvous cluster (no target: two shared cores cannot show scaling){}\n{t}\nWhat \
             Redis adds, two nodes against one in-process node: {cost}\n",
            self.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    }
}

/// A `redis-server` child; killed when dropped.
struct RedisProc {
    child: Child,
    url: String,
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisProc {
    async fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running redis-server (Debian: apt-get install redis-server)")?;
        let redis = Self {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if start.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("redis-server did not listen on port {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(redis)
    }
}

/// Runs the three setups.
pub(crate) async fn measure(
    pairings: u64,
    concurrency: usize,
    progress: &dyn Fn(&str),
) -> ClusterBench {
    let mut bench = ClusterBench {
        rows: Vec::new(),
        redis_cost_us_per_pairing: None,
        error: None,
    };
    if let Err(e) = run(
        &mut bench,
        pairings.min(MAX_PAIRINGS),
        concurrency,
        progress,
    )
    .await
    {
        bench.error = Some(format!("{e:#}"));
    }
    if let (Some(single), Some(two)) = (bench.rows.first(), bench.rows.get(2)) {
        bench.redis_cost_us_per_pairing = Some(two.total_cpu_us() - single.total_cpu_us());
    }
    bench
}

async fn run(
    bench: &mut ClusterBench,
    pairings: u64,
    concurrency: usize,
    progress: &dyn Fn(&str),
) -> Result<()> {
    progress(&format!(
        "cluster: one in-process node, {pairings} pairings ..."
    ));
    let single = ServerProc::spawn(&[]).await.context("starting a node")?;
    bench.rows.push(
        pairing_rate(
            "one node, in-process registry",
            (single.addr, single.addr),
            &[single.pid()],
            None,
            pairings,
            concurrency,
        )
        .await,
    );
    drop(single);
    let redis = RedisProc::start().await?;
    let flags = [
        "--cluster",
        redis.url.as_str(),
        "--public-addr",
        "127.0.0.1",
    ];
    let n1 = ServerProc::spawn(&flags).await.context("starting node 1")?;
    progress(&format!(
        "cluster: one node with --cluster, {pairings} pairings ..."
    ));
    bench.rows.push(
        pairing_rate(
            "one node with --cluster (same-node pairs)",
            (n1.addr, n1.addr),
            &[n1.pid()],
            Some(redis.child.id()),
            pairings,
            concurrency,
        )
        .await,
    );
    let n2 = ServerProc::spawn(&flags).await.context("starting node 2")?;
    progress(&format!(
        "cluster: two nodes, {pairings} cross-node pairings ..."
    ));
    bench.rows.push(
        pairing_rate(
            "two nodes (every pair across them)",
            (n1.addr, n2.addr),
            &[n1.pid(), n2.pid()],
            Some(redis.child.id()),
            pairings,
            concurrency,
        )
        .await,
    );
    Ok(())
}

/// Pairs `total` sessions, first peers through `nodes.0` and second peers through `nodes.1`
/// (the first peer joins first, so roles are fixed).
async fn pairing_rate(
    setup: &'static str,
    nodes: (SocketAddr, SocketAddr),
    node_pids: &[u32],
    redis_pid: Option<u32>,
    total: u64,
    concurrency: usize,
) -> ClusterRow {
    let cpu = |pids: &[u32]| -> f64 {
        pids.iter()
            .map(|p| proc_cpu_seconds(*p).unwrap_or(0.0))
            .sum()
    };
    let redis_pids: Vec<u32> = redis_pid.into_iter().collect();
    let (node0, redis0) = (cpu(node_pids), cpu(&redis_pids));
    let tag = format!("{}-{}", std::process::id(), setup.len());
    let start = Instant::now();
    let run = run_pairings(total, concurrency, move |i| {
        let session = format!("cluster-{tag}-{i}");
        async move {
            let first = raw_join(nodes.0, None, session.clone(), "waiting").await?;
            let second = raw_join(nodes.1, None, session.clone(), "paired").await?;
            drop((first, second));
            anyhow::Ok(())
        }
    })
    .await;
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    let pairings = run.done;
    let per = |cpu: f64| cpu * 1e6 / pairings.max(1) as f64;
    ClusterRow {
        setup,
        pairings,
        failed: run.failed,
        concurrency,
        seconds,
        per_second: pairings as f64 / seconds,
        node_cpu_us_per_pairing: per(cpu(node_pids) - node0),
        redis_cpu_us_per_pairing: per(cpu(&redis_pids) - redis0),
        error: run.first_error,
    }
}
