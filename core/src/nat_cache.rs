//! A small on-disk cache of NAT discovery results, so a host that connects again from the same
//! network skips the filtering tests' waits.
//!
//! The key is the network as it is now, never a path alone: the default gateway, the local
//! address towards the server, the server, and the public address the server observes for a
//! fresh socket at this moment. Another network, another NAT in front, or a changed public
//! address misses. Entries expire after their time to live, and the file holds at most
//! [`MAX_ENTRIES`] (the oldest go first).
//!
//! A cached class is a hint, never the truth. The same network can change behind the same
//! addresses (a router whose NAT mode changed, a CGNAT that falls back to random ports under
//! load), so every use is checked first by [`crate::discovery::quick_check`]: one round trip
//! from one socket to two server addresses, whose mapped ports say whether the mapping is per
//! destination right now. [`Verdict`] compares that evidence with the entry; a contradiction
//! drops the entry and the caller measures afresh. Only complete results are stored (nothing
//! `unknown`), each with the time and the evidence it was made from, and the strategy that last
//! won from that network ([`Winner`]), which orders the next attempts (a hint, not a rule).
//!
//! The file is replaced atomically (a uniquely named temporary file, then `rename`), so
//! concurrent `connect`s never leave a torn file; the worst a race can do is lose one of two
//! simultaneous updates. A file that cannot be parsed is reported with a warning and treated as
//! empty (the next store replaces it). The cache only ever saves time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::discovery::QuickCheck;
use crate::plan::NatSummary;

/// Most entries the file keeps.
pub const MAX_ENTRIES: usize = 64;

/// Where and for how long discovery results are kept.
#[derive(Debug, Clone)]
pub struct NatCache {
    path: PathBuf,
    ttl: Duration,
}

/// The strategy that produced the last link from a network, and how long the connect took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Winner {
    /// The strategy's name.
    pub strategy: String,
    /// Time from start to link, in milliseconds.
    pub elapsed_ms: u64,
    /// When it won (seconds since the Unix epoch).
    pub at_unix: u64,
}

/// One cached network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The network's key ([`NatCache::key`]).
    pub key: String,
    /// The measured behaviour (complete: nothing unknown).
    pub nat: NatSummary,
    /// When it was measured (seconds since the Unix epoch).
    pub stored_unix: u64,
    /// What the class was concluded from: the quick check's mapped addresses at the time.
    #[serde(default)]
    pub evidence: Option<QuickCheck>,
    /// The strategy that last won from this network.
    #[serde(default)]
    pub winner: Option<Winner>,
}

impl Entry {
    /// Seconds since the entry was measured.
    pub fn age_secs(&self) -> u64 {
        now_unix().saturating_sub(self.stored_unix)
    }
}

/// What a fresh quick check says about a cached entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The evidence matches the cached class.
    Confirmed,
    /// The evidence contradicts it (the reason, in words).
    Contradicted(String),
    /// The check could not decide (a server address did not answer): not trusted.
    Unverifiable(String),
}

/// Compares the cached `nat` with a fresh `check` (UDP always; TCP when both have it).
pub fn verify(nat: &NatSummary, check: &QuickCheck) -> Verdict {
    let mut undecided = Vec::new();
    for (proto, cached, evidence) in [
        ("UDP", nat.udp_mapping, Some(&check.udp)),
        ("TCP", nat.tcp_mapping, check.tcp.as_ref()),
    ] {
        let Some(evidence) = evidence else {
            undecided.push(format!("no {proto} evidence"));
            continue;
        };
        match evidence.class() {
            None => undecided.push(format!(
                "no {proto} answer from the server's second address"
            )),
            Some(seen) if !same_class(cached, seen) => {
                return Verdict::Contradicted(format!(
                    "cached {proto} mapping {} but now {}",
                    mapping_name(cached),
                    evidence.describe()
                ));
            }
            Some(_) => {}
        }
    }
    // UDP decides birthday punching and udp-quic; TCP evidence is a bonus (a server without
    // observe has none), so only a missing UDP answer leaves the entry unverified.
    match undecided.iter().find(|u| u.contains("UDP")) {
        Some(why) => Verdict::Unverifiable(why.clone()),
        None => Verdict::Confirmed,
    }
}

/// Whether the cached class and the one just seen agree (address- and address-and-port-
/// dependent are one class here: two destinations cannot tell them apart, and the plan treats
/// both alike).
fn same_class(cached: crate::discovery::Mapping, seen: crate::discovery::Mapping) -> bool {
    use crate::discovery::Mapping as M;
    let coarse = |m: M| match m {
        M::AddressDependent | M::AddressAndPortDependent => M::AddressAndPortDependent,
        other => other,
    };
    coarse(cached) == coarse(seen)
}

fn mapping_name(m: crate::discovery::Mapping) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{m:?}"))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether every part of `nat` was measured (only such results are stored).
pub fn complete(nat: &NatSummary) -> bool {
    use crate::discovery::{Filtering, Mapping};
    nat.udp_mapping != Mapping::Unknown
        && nat.tcp_mapping != Mapping::Unknown
        && nat.udp_filtering != Filtering::Unknown
}

impl NatCache {
    /// A cache in the JSON file `path`, entries kept for `ttl`.
    pub fn new(path: PathBuf, ttl: Duration) -> Self {
        Self { path, ttl }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key of the network as it is now (see the module docs).
    pub fn key(
        gateway: Option<IpAddr>,
        local: IpAddr,
        server: SocketAddr,
        public: IpAddr,
    ) -> String {
        let gateway = gateway.map_or("-".to_owned(), |g| g.to_string());
        format!("gw={gateway} local={local} server={server} public={public}")
    }

    /// Every entry in the file, fresh or not (a broken file: a warning and none).
    pub async fn entries(&self) -> Vec<Entry> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(entries) => entries,
                Err(e) => {
                    warn!(
                        "NAT cache {} is not readable ({e}); ignoring it, it is replaced on the next store",
                        self.path.display()
                    );
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        }
    }

    /// The time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The cached entry for `key`, if fresh.
    pub async fn get(&self, key: &str) -> Option<Entry> {
        self.entries()
            .await
            .into_iter()
            .find(|e| e.key == key && e.age_secs() < self.ttl.as_secs())
    }

    /// Stores `nat` for `key` with its `evidence` (replacing an older entry, keeping its
    /// winner; dropping the oldest past the cap). Incomplete results are not stored: returns
    /// whether it was.
    pub async fn put(&self, key: &str, nat: NatSummary, evidence: Option<QuickCheck>) -> bool {
        if !complete(&nat) {
            return false;
        }
        self.update(|entries| {
            let winner = entries
                .iter()
                .find(|e| e.key == key && e.nat == nat)
                .and_then(|e| e.winner.clone());
            entries.retain(|e| e.key != key);
            entries.push(Entry {
                key: key.to_owned(),
                nat,
                stored_unix: now_unix(),
                evidence,
                winner,
            });
        })
        .await;
        true
    }

    /// Drops the entry for `key` (its class proved wrong).
    pub async fn remove(&self, key: &str) {
        self.update(|entries| entries.retain(|e| e.key != key))
            .await;
    }

    /// Remembers that `strategy` produced the link from the network `key` in `elapsed_ms`.
    pub async fn record_winner(&self, key: &str, strategy: &str, elapsed_ms: u64) {
        self.update(|entries| {
            if let Some(e) = entries.iter_mut().find(|e| e.key == key) {
                e.winner = Some(Winner {
                    strategy: strategy.to_owned(),
                    elapsed_ms,
                    at_unix: now_unix(),
                });
            }
        })
        .await;
    }

    /// Read, change, write back atomically.
    async fn update(&self, change: impl FnOnce(&mut Vec<Entry>)) {
        let mut entries = self.entries().await;
        change(&mut entries);
        entries.sort_by_key(|e| std::cmp::Reverse(e.stored_unix));
        entries.truncate(MAX_ENTRIES);
        if let Some(dir) = self.path.parent() {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        let Ok(text) = serde_json::to_vec_pretty(&entries) else {
            return;
        };
        // A temporary file of this process and call alone, then rename: a reader never sees
        // half a file, and two writers never write into the same temporary file.
        static N: AtomicU64 = AtomicU64::new(0);
        let tmp = self.path.with_extension(format!(
            "json.{}.{}.tmp",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        match tokio::fs::write(&tmp, text).await {
            Ok(()) => {
                if let Err(e) = tokio::fs::rename(&tmp, &self.path).await {
                    warn!("cannot replace the NAT cache {}: {e}", self.path.display());
                    let _ = tokio::fs::remove_file(&tmp).await;
                }
            }
            Err(e) => warn!("cannot write the NAT cache {}: {e}", tmp.display()),
        }
    }
}

/// The IPv4 default gateway from `/proc/net/route` (Linux), if any.
pub fn default_gateway() -> Option<IpAddr> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_route_table(&text)
}

fn parse_route_table(text: &str) -> Option<IpAddr> {
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags ...: destination 0 = default route.
        if fields.len() > 2 && fields[1] == "00000000" {
            let raw = u32::from_str_radix(fields[2], 16).ok()?;
            return Some(IpAddr::V4(Ipv4Addr::from(raw.swap_bytes())));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Filtering, Mapping, MappingEvidence};

    fn cone() -> NatSummary {
        NatSummary {
            udp_mapping: Mapping::EndpointIndependent,
            udp_filtering: Filtering::AddressAndPortDependent,
            tcp_mapping: Mapping::EndpointIndependent,
            port_mapping: false,
            udp_blocked: false,
        }
    }

    fn check(local: &str, a: &str, b: Option<&str>) -> QuickCheck {
        QuickCheck {
            udp: MappingEvidence {
                local: local.parse().unwrap(),
                towards_server: a.parse().unwrap(),
                towards_other_ip: b.map(|b| b.parse().unwrap()),
            },
            tcp: None,
            server_other: Some("203.0.113.11:8878".parse().unwrap()),
        }
    }

    fn temp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("nettool-natcache-{tag}-{}", std::process::id()))
    }

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\n\
                     eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(parse_route_table(table), Some("10.0.1.1".parse().unwrap()));
        assert_eq!(parse_route_table("Iface\n"), None);
    }

    #[tokio::test]
    async fn entries_are_keyed_by_the_network_and_expire() {
        let dir = temp("keys");
        let cache = NatCache::new(dir.join("nat.json"), Duration::from_secs(600));
        let nat = cone();
        let server: SocketAddr = "203.0.113.10:8877".parse().unwrap();
        let here = NatCache::key(
            Some("10.0.1.1".parse().unwrap()),
            "10.0.1.2".parse().unwrap(),
            server,
            "198.51.100.2".parse().unwrap(),
        );
        let other_public = NatCache::key(
            Some("10.0.1.1".parse().unwrap()),
            "10.0.1.2".parse().unwrap(),
            server,
            "198.51.100.9".parse().unwrap(),
        );
        assert_eq!(cache.get(&here).await, None);
        assert!(cache.put(&here, nat, None).await);
        assert_eq!(cache.get(&here).await.map(|e| e.nat), Some(nat));
        assert_eq!(
            cache.get(&other_public).await,
            None,
            "another mapping misses"
        );
        let expired = NatCache::new(dir.join("nat.json"), Duration::ZERO);
        assert_eq!(expired.get(&here).await, None, "expired entries miss");
        for i in 0..(MAX_ENTRIES + 10) {
            cache.put(&format!("k{i}"), nat, None).await;
        }
        let text = std::fs::read_to_string(dir.join("nat.json")).unwrap();
        let kept: Vec<Entry> = serde_json::from_str(&text).unwrap();
        assert_eq!(kept.len(), MAX_ENTRIES);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn unknown_results_are_never_stored_and_winners_are_remembered() {
        let dir = temp("unknown");
        let cache = NatCache::new(dir.join("nat.json"), Duration::from_secs(600));
        for broken in [
            NatSummary {
                udp_filtering: Filtering::Unknown,
                ..cone()
            },
            NatSummary {
                tcp_mapping: Mapping::Unknown,
                ..cone()
            },
            NatSummary::UNKNOWN,
        ] {
            assert!(!cache.put("k", broken, None).await, "{broken:?} was stored");
            assert_eq!(cache.get("k").await, None);
        }
        assert!(cache.put("k", cone(), None).await);
        cache.record_winner("k", "tcp-punch", 41).await;
        let e = cache.get("k").await.unwrap();
        assert_eq!(
            e.winner.as_ref().map(|w| w.strategy.as_str()),
            Some("tcp-punch")
        );
        // Re-measuring the same class keeps the winner; removing forgets all.
        assert!(cache.put("k", cone(), None).await);
        assert!(cache.get("k").await.unwrap().winner.is_some());
        cache.remove("k").await;
        assert_eq!(cache.get("k").await, None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_broken_file_is_ignored_and_replaced() {
        let dir = temp("broken");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nat.json");
        std::fs::write(&path, b"[{\"key\": \"k\", \"nat\": tru").unwrap();
        let cache = NatCache::new(path.clone(), Duration::from_secs(600));
        assert_eq!(cache.get("k").await, None);
        assert!(cache.put("k", cone(), None).await);
        assert!(
            cache.get("k").await.is_some(),
            "the broken file was replaced"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn concurrent_writers_never_tear_the_file() {
        let dir = temp("concurrent");
        let cache = NatCache::new(dir.join("nat.json"), Duration::from_secs(600));
        let mut tasks = Vec::new();
        for i in 0..32 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                for j in 0..8 {
                    cache.put(&format!("k{i}-{j}"), cone(), None).await;
                    let text = tokio::fs::read(cache.path()).await.unwrap_or_default();
                    if !text.is_empty() {
                        serde_json::from_slice::<Vec<Entry>>(&text).expect("a whole file");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_quick_check_confirms_or_contradicts_the_cached_class() {
        let local = "10.0.1.2:40000";
        // Same mapped port towards both server addresses: endpoint-independent.
        let same = check(local, "198.51.100.2:40000", Some("198.51.100.2:40000"));
        // Different ports: the mapping is per destination now.
        let differ = check(local, "198.51.100.2:51234", Some("198.51.100.2:61012"));
        assert_eq!(verify(&cone(), &same), Verdict::Confirmed);
        assert!(matches!(verify(&cone(), &differ), Verdict::Contradicted(_)));
        let sym = NatSummary {
            udp_mapping: Mapping::AddressAndPortDependent,
            tcp_mapping: Mapping::AddressAndPortDependent,
            ..cone()
        };
        assert_eq!(verify(&sym, &differ), Verdict::Confirmed);
        assert!(matches!(verify(&sym, &same), Verdict::Contradicted(_)));
        // No NAT seen while a NAT is cached (and the reverse).
        let none = check(local, local, Some(local));
        assert!(matches!(verify(&cone(), &none), Verdict::Contradicted(_)));
        // No answer from the second address: not trusted.
        let half = check(local, "198.51.100.2:40000", None);
        assert!(matches!(verify(&cone(), &half), Verdict::Unverifiable(_)));
    }
}
