//! Attempts that fail or time out leave no socket behind (counted via /proc/self/fd).

mod common;

use std::sync::Arc;
use std::time::Duration;

use nettool_core::{ConnectParams, Orchestrator, Outcome};
use nettool_rendezvous::{RendezvousServer, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_close_every_socket() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    let baseline = common::open_fds();
    for name in ["tcp-punch", "tcp-direct"] {
        let tables = std::collections::BTreeMap::from([(
            name.to_owned(),
            serde_json::json!({ "timeout": "800ms" }),
        )]);
        let built = nettool_strategies::registry()
            .build(&[name.to_owned()], &tables)
            .map_err(|e| e.to_string())
            .unwrap();
        let orch = Arc::new(Orchestrator::new(built, Duration::from_secs(10)));
        let params = |secret: &str| ConnectParams {
            server: addr,
            session: format!("cancel-{name}"),
            secret: Some(secret.into()),
        };
        // Different secrets: every raw link is refused, so each attempt runs to its timeout.
        let (one, two) = (params("one"), params("two"));
        let (a, b) = tokio::join!(orch.connect(&one, &|_| {}), orch.connect(&two, &|_| {}));
        for (link, report) in [a, b] {
            assert!(link.is_none());
            let attempt = &report.attempts[0];
            assert!(
                matches!(attempt.outcome, Outcome::TimedOut | Outcome::Failed),
                "{attempt:?}"
            );
        }
    }
    common::assert_no_descriptor_left(&baseline).await;
}
