//! Per-client limits: connections and join tokens per source address, the server token, and
//! what a peer may spend on offers and results per strategy.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::metrics::Reason;
use crate::pairing::Pair;
use crate::{lock, ServerConfig, Shared, MAX_FRAMES_PER_STRATEGY};

/// Per-source-address state.
#[derive(Debug, Default)]
pub(crate) struct IpTable {
    pub(crate) by_ip: HashMap<IpAddr, IpState>,
    /// Size at which the table is next swept of entries that hold nothing.
    pub(crate) sweep_at: usize,
}

#[derive(Debug)]
pub(crate) struct IpState {
    pub(crate) conns: usize,
    /// Join tokens left (a token bucket refilled at `join_rate` per second up to `join_burst`).
    pub(crate) tokens: f64,
    pub(crate) refilled: Instant,
}

impl IpState {
    pub(crate) fn new(config: &ServerConfig, now: Instant) -> Self {
        Self {
            conns: 0,
            tokens: f64::from(config.join_burst.max(1)),
            refilled: now,
        }
    }

    pub(crate) fn refill(&mut self, config: &ServerConfig, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(config.join_rate))
            .min(f64::from(config.join_burst.max(1)));
        self.refilled = now;
    }

    /// Whether the entry can go: no connection open and the bucket would be full anyway.
    pub(crate) fn idle(&self, config: &ServerConfig, now: Instant) -> bool {
        if self.conns > 0 {
            return false;
        }
        if config.join_rate == 0 {
            return true;
        }
        let missing = f64::from(config.join_burst.max(1)) - self.tokens;
        now.saturating_duration_since(self.refilled).as_secs_f64() * f64::from(config.join_rate)
            >= missing
    }
}

/// The key a source address is counted under (IPv4-mapped IPv6 addresses count as IPv4).
pub(crate) fn ip_key(addr: SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

/// One open connection counted against its source address; released when dropped. Travels
/// with the socket (a relayed connection is handed to its partner's task).
#[derive(Debug)]
pub(crate) struct ConnSlot {
    pub(crate) shared: Arc<Shared>,
    pub(crate) ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut ips = lock(&self.shared.ips);
        if let Some(state) = ips.by_ip.get_mut(&self.ip) {
            state.conns = state.conns.saturating_sub(1);
            if state.idle(&self.shared.config, Instant::now()) {
                ips.by_ip.remove(&self.ip);
            }
        }
    }
}

impl Shared {
    /// Counts a new connection from `addr`, or says why it is refused.
    pub(crate) fn admit(self: &Arc<Self>, addr: SocketAddr) -> Result<ConnSlot, (String, Reason)> {
        let ip = ip_key(addr);
        let now = Instant::now();
        let mut ips = lock(&self.ips);
        if ips.by_ip.len() >= ips.sweep_at {
            ips.by_ip.retain(|_, s| !s.idle(&self.config, now));
            ips.sweep_at = (ips.by_ip.len() * 2).max(1024);
        }
        let state = ips
            .by_ip
            .entry(ip)
            .or_insert_with(|| IpState::new(&self.config, now));
        let max = self.config.max_conns_per_ip;
        if max > 0 && state.conns >= max {
            return Err((
                format!(
                    "too many connections from {ip}: the server allows {max} at a time per \
                     address"
                ),
                Reason::max_conns_per_ip,
            ));
        }
        state.conns += 1;
        Ok(ConnSlot {
            shared: self.clone(),
            ip,
        })
    }

    /// Takes one join token of `addr`'s bucket, or says why the join is refused.
    pub(crate) fn take_join_token(&self, addr: SocketAddr) -> Result<(), String> {
        let rate = self.config.join_rate;
        if rate == 0 {
            return Ok(());
        }
        let ip = ip_key(addr);
        let now = Instant::now();
        let mut ips = lock(&self.ips);
        let state = ips
            .by_ip
            .entry(ip)
            .or_insert_with(|| IpState::new(&self.config, now));
        state.refill(&self.config, now);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            Ok(())
        } else {
            self.metrics.reject(Reason::join_rate);
            Err(format!(
                "too many joins from {ip}: the server allows {rate} per second (bursts of {}); \
                 try again shortly",
                self.config.join_burst.max(1)
            ))
        }
    }

    /// Checks the join's server token against the configured one.
    pub(crate) fn check_server_token(&self, given: Option<&str>) -> Result<(), String> {
        let Some(expected) = self.config.server_token.as_deref() else {
            return Ok(());
        };
        let Some(given) = given else {
            self.metrics.reject(Reason::server_token);
            return Err(
                "this server requires a server token to join: give --server-token \
                 (or `server-token` in the config)"
                    .into(),
            );
        };
        // Compare digests, in time independent of where the tokens differ.
        use sha2::{Digest, Sha256};
        let (a, b) = (Sha256::digest(expected), Sha256::digest(given));
        if a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
        {
            Ok(())
        } else {
            self.metrics.reject(Reason::server_token);
            Err("wrong server token".into())
        }
    }
}

/// What one peer spent on one strategy of its pairing.
#[derive(Debug, Default)]
pub(crate) struct StrategyBudget {
    pub(crate) frames: u32,
    pub(crate) bytes: usize,
}

/// Counts a frame of `len` bytes for `strategy` against the peer's budget, or says why it is
/// refused: only agreed strategies (and the plan exchange), at most [`MAX_FRAMES_PER_STRATEGY`] frames and the frame
/// size limit plus 4 KiB of bytes per strategy. The budget map holds at most one entry per
/// agreed strategy.
pub(crate) fn spend(
    shared: &Shared,
    pair: &Pair,
    budget: &mut HashMap<String, StrategyBudget>,
    strategy: &str,
    len: usize,
) -> Result<(), String> {
    if strategy != nettool_core::protocol::PLAN_OFFER
        && !pair.strategies.iter().any(|s| s == strategy)
    {
        return Err(format!(
            "offer or result for '{strategy}', which is not an agreed strategy"
        ));
    }
    let max_bytes = shared.config.max_frame_len + 4096;
    let b = budget.entry(strategy.to_owned()).or_default();
    b.frames += 1;
    b.bytes += len;
    if b.frames > MAX_FRAMES_PER_STRATEGY {
        return Err(format!(
            "too many offers and results for '{strategy}' (at most {MAX_FRAMES_PER_STRATEGY} per pairing)"
        ));
    }
    if b.bytes > max_bytes {
        return Err(format!(
            "offers and results for '{strategy}' too large (at most {max_bytes} bytes per pairing)"
        ));
    }
    Ok(())
}
