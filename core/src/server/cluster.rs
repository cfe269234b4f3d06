//! Sessions shared between rendezvous nodes through Redis (`nettool rendezvous --cluster`).
//!
//! Each node keeps its own connections, and with them its own session map (the in-process
//! registry of `server.rs`, which stays the whole story without `--cluster`). Redis only holds
//! what nodes must agree on, always under a TTL, so a node that dies leaves nothing behind for
//! longer than that TTL:
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

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;

use crate::protocol::ServerToClient;

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

/// A node's handle on the cluster store.
pub(super) struct Cluster {
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

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("public_addrs", &self.public_addrs)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A node's subscription to its channel.
pub(super) struct Inbox(redis::aio::PubSubStream);

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inbox")
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

/// How long a Redis request may take before the node gives up on it.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

impl Cluster {
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
        let mut probe =
            tokio::time::timeout(REDIS_TIMEOUT, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| unreachable("no answer within 5s".into()))?
                .map_err(|e| unreachable(e.to_string()))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut probe)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        drop(probe);
        let manager = tokio::time::timeout(REDIS_TIMEOUT, client.get_connection_manager())
            .await
            .map_err(|_| unreachable("no answer within 5s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        let node = hex::encode(id);
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

    /// This node's value for a waiting connection.
    pub(super) fn waiting_value(&self, conn: u64) -> String {
        format!("W{}:{conn}", self.node)
    }

    /// This node's value for a paired connection.
    pub(super) fn paired_value(&self, conn: u64) -> String {
        format!("P{}:{conn}", self.node)
    }

    /// Claims `session` for connection `conn` (see [`Claim`]).
    pub(super) async fn claim(&self, session: &str, conn: u64) -> Result<Claim, String> {
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
        Ok(match answer.as_str() {
            "wait" => Claim::Wait,
            "paired" => Claim::Paired,
            value => {
                let parsed = value
                    .strip_prefix('W')
                    .and_then(|v| v.rsplit_once(':'))
                    .and_then(|(node, conn)| Some((node.to_owned(), conn.parse().ok()?)));
                let Some((node, conn)) = parsed else {
                    return Err(format!("unexpected value in the cluster store: {value:?}"));
                };
                Claim::Waiter {
                    node,
                    conn,
                    value: value.to_owned(),
                }
            }
        })
    }

    /// Sends `msg` to `node` now; `Ok(false)` when no node listens there (it is gone).
    pub(super) async fn send_now(&self, node: &str, msg: &NodeMsg) -> Result<bool, String> {
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

    /// Queues `msg` for `node` (written in order with every other queued operation).
    pub(super) fn send(&self, node: &str, msg: &NodeMsg) {
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

    /// Queues: when `session`'s key holds `from`, set it to `to` (delete it when `None`).
    pub(super) fn swap(&self, session: &str, from: String, to: Option<String>) {
        let _ = self.queue.send(Op::Swap {
            key: session_key(session),
            from,
            to: to.unwrap_or_default(),
        });
    }

    /// As [`swap`](Self::swap), now; whether the key held `from`.
    pub(super) async fn swap_now(
        &self,
        session: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, String> {
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

    /// Subscribes again after the subscription was lost (Redis restarted, connection cut).
    pub(super) async fn resubscribe(&self) -> Result<Inbox, String> {
        subscribe(&self.client, &self.node)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Decodes a message from another node.
pub(super) fn decode(msg: &redis::Msg) -> Option<NodeMsg> {
    match serde_json::from_slice(msg.get_payload_bytes()) {
        Ok(m) => Some(m),
        Err(e) => {
            warn!("ignoring a malformed message from another node: {e}");
            None
        }
    }
}

/// The next message of the inbox (`None`: the subscription ended).
pub(super) async fn next(inbox: &mut Inbox) -> Option<redis::Msg> {
    inbox.0.next().await
}

async fn subscribe(client: &redis::Client, node: &str) -> redis::RedisResult<Inbox> {
    let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "timed out")))??;
    pubsub.subscribe(node_channel(node)).await?;
    Ok(Inbox(pubsub.into_on_message()))
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
