//! Unit tests that need the server's insides: an outbox cycle, a panic under the session lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nettool_core::client::RendezvousClient;
use nettool_core::protocol::{Role, ServerToClient};

use crate::outbox::{CloseOnDrop, Outbound, Outbox};
use crate::pairing::{Pair, PeerEnd};
use crate::{lock, RendezvousServer, ServerConfig};

/// Joining this session makes the server panic while it holds the session map (a test
/// hook: compiled into test builds only).
const PANIC_SESSION: &str = "test-hook-panic";

pub(crate) fn panic_hook(session: &str) {
    if session == PANIC_SESSION {
        panic!("injected panic (test hook)");
    }
}

async fn pair(addr: SocketAddr, session: &str) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let names = ["s".to_owned()];
    let (a, b) = tokio::join!(
        RendezvousClient::join(addr, session, &names, deadline, || {}),
        async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            RendezvousClient::join(addr, session, &names, deadline, || {}).await
        }
    );
    let ((mut a, _), (mut b, _)) = (a.map_err(|e| e.to_string())?, b.map_err(|e| e.to_string())?);
    let (oa, ob) = tokio::join!(
        a.exchange_offer("s", serde_json::json!("from a"), deadline),
        b.exchange_offer("s", serde_json::json!("from b"), deadline)
    );
    assert_eq!(oa.map_err(|e| e.to_string())?, serde_json::json!("from b"));
    assert_eq!(ob.map_err(|e| e.to_string())?, serde_json::json!("from a"));
    Ok(())
}

/// A `Paired` message still queued when a connection ends (its client closed at once)
/// does not keep the pair and the outboxes alive: the pair holds the outbox, the outbox
/// the message, the message the pair.
#[test]
fn an_ended_connection_drops_what_its_outbox_held() {
    let outboxes = [Arc::new(Outbox::default()), Arc::new(Outbox::default())];
    let pair = Pair::new(
        "s".into(),
        "p".into(),
        [2, 2],
        None,
        [
            PeerEnd::Local {
                conn: 1,
                outbox: outboxes[0].clone(),
            },
            PeerEnd::Local {
                conn: 2,
                outbox: outboxes[1].clone(),
            },
        ],
        vec!["relay".into()],
        None,
    );
    outboxes[0].push(Outbound::Paired(
        pair.clone(),
        Role::First,
        ServerToClient::PeerLeft,
    ));
    let weak = Arc::downgrade(&pair);
    drop(pair);
    assert!(
        weak.upgrade().is_some(),
        "the queued message holds the pair"
    );
    drop(CloseOnDrop(&outboxes[0]));
    assert!(weak.upgrade().is_none(), "the pair was freed");
    // A closed outbox takes nothing more.
    outboxes[0].push(Outbound::Msg(ServerToClient::PeerLeft));
    assert!(lock(&outboxes[0].queue).messages.is_empty());
}

#[tokio::test]
async fn a_panic_in_one_connection_leaves_the_others_served() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    let running = tokio::spawn(server.run());
    pair(addr, "before").await.unwrap();
    // A waiting peer that must survive the panic of another connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let names = ["s".to_owned()];
    let waiting = tokio::spawn(async move {
        RendezvousClient::join(addr, "survivor", &names, deadline, || {}).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The connection whose handler panics (holding the session map) just closes.
    let names = ["s".to_owned()];
    let err = RendezvousClient::join(addr, PANIC_SESSION, &names, deadline, || {})
        .await
        .unwrap_err();
    assert!(matches!(err, nettool_core::ClientError::Lost(_)), "{err}");
    // Everyone else is still served: new pairs, and the waiting peer gets its partner.
    for i in 0..5 {
        pair(addr, &format!("after-{i}")).await.unwrap();
    }
    let names = ["s".to_owned()];
    let (second, first) = tokio::join!(
        RendezvousClient::join(addr, "survivor", &names, deadline, || {}),
        waiting
    );
    second.unwrap();
    first.unwrap().unwrap();
    assert!(!running.is_finished(), "the server kept running");
    let _ = stats.session_count();
    running.abort();
}
