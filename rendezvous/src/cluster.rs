//! Sessions shared between rendezvous nodes through Redis (`nettool rendezvous --cluster`).
//!
//! Each node keeps its own connections, and with them its own session map (the in-process
//! registry of `server.rs`, which stays the whole story without `--cluster`). What nodes must
//! agree on goes through a [`SessionStore`]: [`RedisStore`] for deployments, or
//! [`MemoryCluster`], which shares sessions between servers of one process (tests of the node
//! logic without Redis). Both keep the same keys with the same semantics. What the store
//! holds always has a TTL, so a node that dies leaves nothing behind for longer than that:
//!
//! - `nettool:session:<hash of the name>` = `W<node>:<conn>` while a first peer waits (TTL: the
//!   session expiry plus a second), then `P<node>:<conn>` once paired (same TTL), so a third
//!   joiner on any node is refused. A Lua script claims it atomically: the second joiner
//!   either finds nothing (and waits) or a waiter (and claims it).
//! - one pub/sub channel per node, `nettool:node:<node id>`: pair requests and answers, offers
//!   and results, "peer left". Pub/sub delivers in order and at most once; a message to a dead
//!   node has no receiver, which `PUBLISH` reports (0 receivers), so a joiner that claimed a
//!   dead node's waiter waits in its place instead.
//!
//! The pairing of a cross-node session: the joiner's node claims the key and sends
//! [`NodeMsg::Pair`] to the waiter's node, which pairs its waiter (role first), holds the
//! offers (both nodes forward the second peer's offers there, so both peers still get them
//! at the same instant) and answers [`NodeMsg::Paired`] with its advertised addresses: the
//! relay for the session runs on the first peer's node, and the second peer is told where.
//! STUN and observe never leave a node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;

use nettool_core::protocol::ServerToClient;

/// Prefix of every key and channel nettool uses in Redis.
pub const KEY_PREFIX: &str = "nettool:";

/// How a rendezvous node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The Redis server, `redis://HOST:PORT[/DB]`.
    pub redis_url: String,
    /// Addresses peers reach this node at (one per address family), told to the second peer
    /// of a session whose relay runs here. At least one; port 0 = the listening port.
    pub public_addrs: Vec<SocketAddr>,
}

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The Redis URL is not valid.
    #[error("bad --cluster URL '{url}': {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// No public address was given: the other nodes could not send relayed peers here.
    #[error("a cluster node needs at least one --public-addr (the address peers reach it at)")]
    NoPublicAddr,
    /// Redis did not answer.
    #[error("cannot reach Redis at {url}: {why}")]
    Unreachable {
        /// The URL given.
        url: String,
        /// The error.
        why: String,
    },
}

/// Messages between nodes, on the receiving node's channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(super) enum NodeMsg {
    /// A joiner on node `from` (its connection `from_conn`) claimed the receiver's waiter
    /// `conn` of `session`.
    Pair {
        session: String,
        conn: u64,
        from: String,
        from_conn: u64,
        strategies: Vec<String>,
        addr: SocketAddr,
    },
    /// The waiter's node paired its waiter (connection `from_conn` on node `from`) with the
    /// receiver's joiner `conn`, which is the second peer.
    Paired {
        session: String,
        conn: u64,
        from: String,
        from_conn: u64,
        strategies: Vec<String>,
        pair_id: String,
        peer: SocketAddr,
        relay_token: Option<String>,
        relay_addrs: Vec<SocketAddr>,
    },
    /// The waiter's node could not pair: the joiner `conn` gets this error.
    Refused {
        session: String,
        conn: u64,
        message: String,
    },
    /// A message for the receiver's peer `conn` of the paired `session`.
    Deliver {
        session: String,
        conn: u64,
        msg: ServerToClient,
    },
    /// The second peer's offer, for the first peer's node (`conn` is the first peer), which
    /// holds offers until both peers have offered.
    Offer {
        session: String,
        conn: u64,
        strategy: String,
        payload: serde_json::Value,
    },
}

/// What a join found in the cluster store.
#[derive(Debug)]
pub(super) enum Claim {
    /// Nobody waits: this connection is now the session's waiter.
    Wait,
    /// The session already has two peers.
    Paired,
    /// This connection claimed the waiter `conn` on node `node`; `value` is what the key held
    /// (to give it back).
    Waiter {
        node: String,
        conn: u64,
        value: String,
    },
}

/// Claims a session key: sets our waiting value when absent, replaces a waiter by our paired
/// value (returning the waiter), or says the session is paired.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 'wait'
end
if string.sub(v, 1, 1) == 'W' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return v
end
return 'paired'
";

/// Compare and swap: when the key holds ARGV[1], set it to ARGV[2] (delete it when empty).
const SWAP: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
  return 1
end
return 0
";

/// Operations written to Redis in order by the node's writer task.
#[derive(Debug)]
enum Op {
    Publish {
        channel: String,
        payload: String,
    },
    Swap {
        key: String,
        from: String,
        to: String,
    },
}

/// Ops written in one pipeline at most.
const BATCH: usize = 256;

/// What a node needs from the engine that shares sessions between nodes: session keys (an
/// atomic claim, compare and swap, a TTL on every write) and one ordered message channel per
/// node.
#[async_trait::async_trait]
pub(super) trait SessionStore: Send + Sync + std::fmt::Debug {
    /// This node's id (its channel).
    fn node(&self) -> &str;

    /// Where peers reach this node.
    fn public_addrs(&self) -> &[SocketAddr];

    /// Claims `session` for connection `conn` (see [`Claim`]).
    async fn claim(&self, session: &str, conn: u64) -> Result<Claim, String>;

    /// Sends `msg` to `node` now; `Ok(false)` when no node listens there (it is gone).
    async fn send_now(&self, node: &str, msg: &NodeMsg) -> Result<bool, String>;

    /// Queues `msg` for `node` (delivered in order with every other queued operation).
    fn send(&self, node: &str, msg: &NodeMsg);

    /// Queues: when `session`'s key holds `from`, set it to `to` (delete it when `None`).
    fn swap(&self, session: &str, from: String, to: Option<String>);

    /// As [`swap`](Self::swap), now; whether the key held `from`.
    async fn swap_now(&self, session: &str, from: &str, to: &str) -> Result<bool, String>;

    /// This node's channel again, after it ended (the connection to the store was lost).
    async fn resubscribe(&self) -> Result<Inbox, String>;

    /// Whether the store answers now (`/healthz`); the error says why not.
    async fn healthy(&self) -> Result<(), String>;

    /// This node's value for a waiting connection.
    fn waiting_value(&self, conn: u64) -> String {
        format!("W{}:{conn}", self.node())
    }

    /// This node's value for a paired connection.
    fn paired_value(&self, conn: u64) -> String {
        format!("P{}:{conn}", self.node())
    }
}

/// What the other nodes send this one, in order.
pub(super) struct Inbox(BoxStream<'static, NodeMsg>);

impl Inbox {
    /// The next message (`None`: the channel ended, e.g. the connection to Redis was lost).
    pub(super) async fn next(&mut self) -> Option<NodeMsg> {
        self.0.next().await
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inbox")
    }
}

/// Parses a waiting value (`W<node>:<conn>`) into a [`Claim::Waiter`].
fn waiter_claim(value: &str) -> Result<Claim, String> {
    let parsed = value
        .strip_prefix('W')
        .and_then(|v| v.rsplit_once(':'))
        .and_then(|(node, conn)| Some((node.to_owned(), conn.parse().ok()?)));
    let Some((node, conn)) = parsed else {
        return Err(format!("unexpected value in the cluster store: {value:?}"));
    };
    Ok(Claim::Waiter {
        node,
        conn,
        value: value.to_owned(),
    })
}

/// A new node's random id.
fn new_node_id() -> String {
    let mut id = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
    hex::encode(id)
}

/// A node's handle on Redis.
pub(super) struct RedisStore {
    /// This node's random id (its channel's name).
    pub(super) node: String,
    /// Where peers reach this node.
    pub(super) public_addrs: Vec<SocketAddr>,
    client: redis::Client,
    conn: ConnectionManager,
    queue: mpsc::UnboundedSender<Op>,
    /// TTL of session keys.
    ttl: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("node", &self.node)
            .field("public_addrs", &self.public_addrs)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The key of a session (the name hashed: Redis need not learn session names).
pub(super) fn session_key(session: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(session.as_bytes());
    format!("{KEY_PREFIX}session:{}", hex::encode(&digest[..16]))
}

fn node_channel(node: &str) -> String {
    format!("{KEY_PREFIX}node:{node}")
}

/// What Redis itself answers a PING with when it refuses a client (e.g. its `-DENIED ...
/// protected mode` text, or `-NOAUTH`), read off a fresh connection; `None` when it answers
/// anything else or cannot be reached. The redis crate reports such a refusal as the
/// closed connection that follows it ("broken pipe"), losing Redis's reason.
async fn redis_says(client: &redis::Client) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis::ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr.clone() else {
        return None;
    };
    let talk = async {
        let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .ok()?;
        // An inline command: Redis answers it with one line.
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = vec![0u8; 1024];
        let mut got = 0;
        while got < buf.len() {
            let n = s.read(&mut buf[got..]).await.ok()?;
            if n == 0 || buf[..got + n].contains(&b'\n') {
                got += n;
                break;
            }
            got += n;
        }
        let text = String::from_utf8_lossy(&buf[..got]).trim().to_owned();
        text.strip_prefix('-').map(|t| format!("Redis says: {t}"))
    };
    tokio::time::timeout(Duration::from_secs(2), talk)
        .await
        .ok()?
}

/// How long a Redis request may take before the node gives up on it.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

impl RedisStore {
    /// Connects to Redis, subscribes to this node's channel and starts the writer task.
    /// Session keys live `session_expiry` plus a second.
    pub(super) async fn connect(
        config: &ClusterConfig,
        session_expiry: Duration,
    ) -> Result<(Self, Inbox), ClusterError> {
        if config.public_addrs.is_empty() {
            return Err(ClusterError::NoPublicAddr);
        }
        let url = &config.redis_url;
        let client = redis::Client::open(url.as_str()).map_err(|e| ClusterError::BadUrl {
            url: url.clone(),
            why: e.to_string(),
        })?;
        let unreachable = |why: String| ClusterError::Unreachable {
            url: url.clone(),
            why,
        };
        // One plain connection first: it fails at once with the reason (connection refused),
        // where the connection manager would keep retrying.
        let probed = async {
            let mut probe =
                tokio::time::timeout(REDIS_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| "no answer within 5s".to_owned())?
                    .map_err(|e| e.to_string())?;
            let _: String = redis::cmd("PING")
                .query_async(&mut probe)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        if let Err(why) = probed.await {
            // Redis may have said why before it closed (protected mode, a password needed):
            // its own words beat the client library's "broken pipe".
            return Err(unreachable(redis_says(&client).await.unwrap_or(why)));
        }
        let manager = tokio::time::timeout(REDIS_TIMEOUT, client.get_connection_manager())
            .await
            .map_err(|_| unreachable("no answer within 5s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let node = new_node_id();
        let inbox = subscribe(&client, &node)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (queue, rx) = mpsc::unbounded_channel();
        let ttl = session_expiry + Duration::from_secs(1);
        tokio::spawn(write_ops(manager.clone(), rx, ttl));
        Ok((
            Self {
                node,
                public_addrs: config.public_addrs.clone(),
                client,
                conn: manager,
                queue,
                ttl,
            },
            inbox,
        ))
    }
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    fn node(&self) -> &str {
        &self.node
    }

    fn public_addrs(&self) -> &[SocketAddr] {
        &self.public_addrs
    }

    async fn claim(&self, session: &str, conn: u64) -> Result<Claim, String> {
        let mut c = self.conn.clone();
        let answer: String = within(
            redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(1)
                .arg(session_key(session))
                .arg(self.waiting_value(conn))
                .arg(self.paired_value(conn))
                .arg(ttl_ms(self.ttl))
                .query_async(&mut c),
        )
        .await?;
        match answer.as_str() {
            "wait" => Ok(Claim::Wait),
            "paired" => Ok(Claim::Paired),
            value => waiter_claim(value),
        }
    }

    async fn send_now(&self, node: &str, msg: &NodeMsg) -> Result<bool, String> {
        let mut c = self.conn.clone();
        let payload = serde_json::to_string(msg).map_err(|e| e.to_string())?;
        let receivers: i64 = within(
            redis::cmd("PUBLISH")
                .arg(node_channel(node))
                .arg(payload)
                .query_async(&mut c),
        )
        .await?;
        Ok(receivers > 0)
    }

    fn send(&self, node: &str, msg: &NodeMsg) {
        match serde_json::to_string(msg) {
            Ok(payload) => {
                let _ = self.queue.send(Op::Publish {
                    channel: node_channel(node),
                    payload,
                });
            }
            Err(e) => warn!("cannot encode a message for node {node}: {e}"),
        }
    }

    fn swap(&self, session: &str, from: String, to: Option<String>) {
        let _ = self.queue.send(Op::Swap {
            key: session_key(session),
            from,
            to: to.unwrap_or_default(),
        });
    }

    async fn swap_now(&self, session: &str, from: &str, to: &str) -> Result<bool, String> {
        let mut c = self.conn.clone();
        let done: i64 = within(
            redis::cmd("EVAL")
                .arg(SWAP)
                .arg(1)
                .arg(session_key(session))
                .arg(from)
                .arg(to)
                .arg(ttl_ms(self.ttl))
                .query_async(&mut c),
        )
        .await?;
        Ok(done == 1)
    }

    async fn healthy(&self) -> Result<(), String> {
        let mut c = self.conn.clone();
        let _: String = within(redis::cmd("PING").query_async(&mut c)).await?;
        Ok(())
    }

    async fn resubscribe(&self) -> Result<Inbox, String> {
        subscribe(&self.client, &self.node)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Decodes a message from another node (a malformed one is logged and skipped).
fn decode(msg: &redis::Msg) -> Option<NodeMsg> {
    match serde_json::from_slice(msg.get_payload_bytes()) {
        Ok(m) => Some(m),
        Err(e) => {
            warn!("ignoring a malformed message from another node: {e}");
            None
        }
    }
}

async fn subscribe(client: &redis::Client, node: &str) -> redis::RedisResult<Inbox> {
    let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "timed out")))??;
    pubsub.subscribe(node_channel(node)).await?;
    Ok(Inbox(
        pubsub
            .into_on_message()
            .filter_map(|m| std::future::ready(decode(&m)))
            .boxed(),
    ))
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

async fn within<T>(
    request: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, request).await {
        Ok(r) => r.map_err(|e| format!("the cluster store (Redis) failed: {e}")),
        Err(_) => Err("the cluster store (Redis) did not answer within 5s".into()),
    }
}

/// Writes queued operations in order, as many as are queued in one pipeline (one round trip
/// for a burst). Ends when the node (every sender) is gone.
async fn write_ops(
    mut conn: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Op>,
    ttl: Duration,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut pipe = redis::pipe();
        for op in batch.drain(..) {
            match op {
                Op::Publish { channel, payload } => {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                Op::Swap { key, from, to } => {
                    pipe.cmd("EVAL")
                        .arg(SWAP)
                        .arg(1)
                        .arg(key)
                        .arg(from)
                        .arg(to)
                        .arg(ttl_ms(ttl))
                        .ignore();
                }
            }
        }
        if let Err(e) = within(pipe.query_async::<()>(&mut conn)).await {
            warn!("cluster: writing to Redis failed (messages to other nodes lost): {e}");
        }
    }
}

/// Sessions shared between rendezvous servers of one process, with the semantics of the
/// Redis store (claim, compare and swap, TTL, a channel per node; a message to a server that
/// is gone reaches nobody): the cluster logic without Redis, for tests. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct MemoryCluster(Arc<Mutex<MemoryState>>);

#[derive(Debug, Default)]
struct MemoryState {
    /// Session key: value and when it expires.
    keys: HashMap<String, (String, tokio::time::Instant)>,
    /// Node id: its channel.
    nodes: HashMap<String, mpsc::UnboundedSender<NodeMsg>>,
}

impl MemoryState {
    fn get(&mut self, key: &str) -> Option<&String> {
        let now = tokio::time::Instant::now();
        if self.keys.get(key).is_some_and(|(_, exp)| *exp <= now) {
            self.keys.remove(key);
        }
        self.keys.get(key).map(|(v, _)| v)
    }
}

impl MemoryCluster {
    /// A new, empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    /// The values of the session keys that have not expired (`W<node>:<conn>` waiting,
    /// `P<node>:<conn>` paired).
    pub fn session_values(&self) -> Vec<String> {
        let now = tokio::time::Instant::now();
        let state = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state
            .keys
            .values()
            .filter(|(_, exp)| *exp > now)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// A node's store and its inbox.
    pub(super) fn node(
        &self,
        public_addrs: Vec<SocketAddr>,
        session_expiry: Duration,
    ) -> (MemoryStore, Inbox) {
        let node = new_node_id();
        let inbox = self.subscribe(&node);
        (
            MemoryStore {
                node,
                public_addrs,
                cluster: self.clone(),
                ttl: session_expiry + Duration::from_secs(1),
            },
            inbox,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn subscribe(&self, node: &str) -> Inbox {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().nodes.insert(node.to_owned(), tx);
        Inbox(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
                .boxed(),
        )
    }

    fn deliver(&self, node: &str, msg: &NodeMsg) -> bool {
        let mut state = self.lock();
        match state.nodes.get(node) {
            Some(tx) if tx.send(msg.clone()).is_ok() => true,
            Some(_) => {
                state.nodes.remove(node);
                false
            }
            None => false,
        }
    }

    fn swap(&self, session: &str, from: &str, to: &str, ttl: Duration) -> bool {
        let key = session_key(session);
        let mut state = self.lock();
        if state.get(&key).map(String::as_str) != Some(from) {
            return false;
        }
        if to.is_empty() {
            state.keys.remove(&key);
        } else {
            let expires = tokio::time::Instant::now() + ttl;
            state.keys.insert(key, (to.to_owned(), expires));
        }
        true
    }
}

/// A node's handle on a [`MemoryCluster`]; the node's channel closes when it is dropped (the
/// server stopped), as a dead node's subscription does.
#[derive(Debug)]
pub(super) struct MemoryStore {
    node: String,
    public_addrs: Vec<SocketAddr>,
    cluster: MemoryCluster,
    ttl: Duration,
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        self.cluster.lock().nodes.remove(&self.node);
    }
}

#[async_trait::async_trait]
impl SessionStore for MemoryStore {
    fn node(&self) -> &str {
        &self.node
    }

    fn public_addrs(&self) -> &[SocketAddr] {
        &self.public_addrs
    }

    async fn claim(&self, session: &str, conn: u64) -> Result<Claim, String> {
        let key = session_key(session);
        let expires = tokio::time::Instant::now() + self.ttl;
        let mut state = self.cluster.lock();
        match state.get(&key).cloned() {
            None => {
                state.keys.insert(key, (self.waiting_value(conn), expires));
                Ok(Claim::Wait)
            }
            Some(v) if v.starts_with('W') => {
                state.keys.insert(key, (self.paired_value(conn), expires));
                drop(state);
                waiter_claim(&v)
            }
            Some(_) => Ok(Claim::Paired),
        }
    }

    async fn send_now(&self, node: &str, msg: &NodeMsg) -> Result<bool, String> {
        Ok(self.cluster.deliver(node, msg))
    }

    fn send(&self, node: &str, msg: &NodeMsg) {
        self.cluster.deliver(node, msg);
    }

    fn swap(&self, session: &str, from: String, to: Option<String>) {
        self.cluster
            .swap(session, &from, to.as_deref().unwrap_or(""), self.ttl);
    }

    async fn swap_now(&self, session: &str, from: &str, to: &str) -> Result<bool, String> {
        Ok(self.cluster.swap(session, from, to, self.ttl))
    }

    async fn healthy(&self) -> Result<(), String> {
        Ok(())
    }

    async fn resubscribe(&self) -> Result<Inbox, String> {
        Ok(self.cluster.subscribe(&self.node))
    }
}
