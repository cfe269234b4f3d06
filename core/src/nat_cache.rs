//! A small on-disk cache of NAT discovery results, so a host that connects again from the same
//! network skips the filtering tests' waits.
//!
//! The key is the network as it is now, never a path alone: the default gateway, the local
//! address towards the server, the server, and the public address the server observes for a
//! fresh socket at this moment (one STUN round trip). Another network, another NAT in front, or
//! a changed public address misses. Entries expire after their time to live, and the file holds
//! at most [`MAX_ENTRIES`] (the oldest go first). A cache that cannot be read or written is
//! treated as empty: it only ever saves time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::plan::NatSummary;

/// Most entries the file keeps.
pub const MAX_ENTRIES: usize = 64;

/// Where and for how long discovery results are kept.
#[derive(Debug, Clone)]
pub struct NatCache {
    path: PathBuf,
    ttl: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    key: String,
    nat: NatSummary,
    stored_unix: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl NatCache {
    /// A cache in the JSON file `path`, entries kept for `ttl`.
    pub fn new(path: PathBuf, ttl: Duration) -> Self {
        Self { path, ttl }
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

    async fn load(&self) -> Vec<Entry> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// The cached behaviour for `key`, if fresh.
    pub async fn get(&self, key: &str) -> Option<NatSummary> {
        let now = now_unix();
        self.load()
            .await
            .into_iter()
            .find(|e| e.key == key && now.saturating_sub(e.stored_unix) < self.ttl.as_secs())
            .map(|e| e.nat)
    }

    /// Stores `nat` for `key` (replacing an older entry; dropping the oldest past the cap).
    pub async fn put(&self, key: &str, nat: NatSummary) {
        let mut entries = self.load().await;
        entries.retain(|e| e.key != key);
        entries.push(Entry {
            key: key.to_owned(),
            nat,
            stored_unix: now_unix(),
        });
        entries.sort_by_key(|e| std::cmp::Reverse(e.stored_unix));
        entries.truncate(MAX_ENTRIES);
        if let Some(dir) = self.path.parent() {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        let Ok(text) = serde_json::to_vec_pretty(&entries) else {
            return;
        };
        // Write a temporary file and rename it, so a reader never sees half a file.
        let tmp = self.path.with_extension("json.tmp");
        if tokio::fs::write(&tmp, text).await.is_ok() {
            let _ = tokio::fs::rename(&tmp, &self.path).await;
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
    use crate::discovery::{Filtering, Mapping};

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
        let dir = std::env::temp_dir().join(format!("nettool-natcache-{}", std::process::id()));
        let cache = NatCache::new(dir.join("nat.json"), Duration::from_secs(600));
        let nat = NatSummary {
            udp_mapping: Mapping::EndpointIndependent,
            udp_filtering: Filtering::AddressAndPortDependent,
            tcp_mapping: Mapping::EndpointIndependent,
            port_mapping: false,
        };
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
        cache.put(&here, nat).await;
        assert_eq!(cache.get(&here).await, Some(nat));
        assert_eq!(
            cache.get(&other_public).await,
            None,
            "another mapping misses"
        );
        let expired = NatCache::new(dir.join("nat.json"), Duration::ZERO);
        assert_eq!(expired.get(&here).await, None, "expired entries miss");
        for i in 0..(MAX_ENTRIES + 10) {
            cache.put(&format!("k{i}"), nat).await;
        }
        let text = std::fs::read_to_string(dir.join("nat.json")).unwrap();
        let kept: Vec<Entry> = serde_json::from_str(&text).unwrap();
        assert_eq!(kept.len(), MAX_ENTRIES);
        let _ = std::fs::remove_dir_all(dir);
    }
}
