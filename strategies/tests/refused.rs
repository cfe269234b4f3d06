//! A relay-first connect whose join the server refuses ends at once with the server's reason.
//!
//! The session already has two peers (its pair is someone else's): the relay half's join is
//! refused. The direct half, under a name derived from the key, would wait out the whole
//! timeout for a peer that is not coming; an exposing side that rejoined a moment too early
//! then stopped serving forwarders for an hour. Both namings (`connect`'s and `expose`'s) must
//! end within a fraction of the timeout with "already has two peers".

use std::time::{Duration, Instant};

use nettool_core::client::RendezvousClient;
use nettool_core::control::ControlSecurity;
use nettool_core::relay_first::{self, DirectNaming};
use nettool_core::{ConnectParams, Orchestrator};
use nettool_rendezvous::{RendezvousServer, ServerConfig};

const TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_join_ends_a_relay_first_connect_at_once() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    // Two peers pair under the session and stay (their control connections open).
    let names = ["relay".to_owned()];
    let join = || async {
        let deadline = Instant::now() + TIMEOUT;
        RendezvousClient::join_any(
            &[addr],
            &ControlSecurity::Plain,
            "taken",
            &names,
            None,
            deadline,
            || {},
        )
        .await
        .expect("pairs")
    };
    let (held_a, held_b) = tokio::join!(join(), join());
    let order: Vec<String> = ["relay", "tcp-punch"].map(String::from).to_vec();
    let built = nettool_strategies::registry()
        .build(&order, &Default::default())
        .unwrap();
    let orch = Orchestrator::new(built, TIMEOUT);
    let params = ConnectParams {
        server: addr,
        session: "taken".into(),
        secret: Some("k".into()),
    };
    for naming in [DirectNaming::FromKey, DirectNaming::PerPairing] {
        let began = Instant::now();
        let r = relay_first::connect_named(&orch, &params, &|_| {}, naming).await;
        let took = began.elapsed();
        assert!(r.link.is_none() && r.direct.is_none(), "{naming:?}");
        let error = r.report.error.clone().unwrap_or_default();
        assert!(
            error.contains("already has two peers"),
            "{naming:?}: the server's reason, not a timeout: {error}"
        );
        assert!(
            took < TIMEOUT / 4,
            "{naming:?}: a refused join must end the connect at once, not after {took:?}"
        );
    }
    drop((held_a, held_b));
}
