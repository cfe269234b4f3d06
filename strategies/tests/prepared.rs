//! Offers prepared before pairing (`Strategy::prepare`): tcp-punch and udp-quic each prepare
//! an offer (their ports bound and observed through the server) and link on loopback whether
//! both peers prepared, only one did (the other, like a peer that predates preparing, sends no
//! prepared offer: both then exchange offers in the attempt, the preparing side with the
//! ports it prepared), or neither; and a connect that ends leaves none of the prepared
//! sockets behind. With both prepared, each join carries its offer and both start the attempt
//! at the pairing; when only one starts it (the other has early starts off), it drops it once
//! the plan offers crossed and both link in the attempt's turn.

mod common;

use std::time::Duration;

use nettool_core::{ConnectParams, Orchestrator, Outcome};
use nettool_rendezvous::{RendezvousServer, ServerConfig};

fn orchestrator(order: &[&str], prepare: bool) -> Orchestrator {
    let order: Vec<String> = order.iter().map(|s| (*s).to_owned()).collect();
    let built = nettool_strategies::registry()
        .build(&order, &Default::default())
        .unwrap();
    // The joins wait for their offers (made by then on any machine, however loaded): the
    // early start is then up to the peers, not to the machine's load.
    Orchestrator::new(built, Duration::from_secs(20))
        .with_prepare(prepare)
        .with_join_offers_wait(Some(Duration::from_secs(5)))
}

/// Both peers prepared: (first's early start, second's early start, whether the attempt
/// counted as started at the pairing).
const EARLY: [(bool, bool, bool); 3] = [
    (true, true, true),
    (true, false, false),
    (false, true, false),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_punch_and_udp_quic_link_with_prepared_offers_on_either_side_or_none() {
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    let baseline = common::open_fds();
    let registry = nettool_strategies::registry();
    for name in ["tcp-punch", "udp-quic"] {
        // Each prepares: an offer naming what the server observed.
        let built = registry
            .build(&[name.to_owned()], &Default::default())
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let prepared = built[0].0.prepare(&[addr], deadline).await.unwrap();
        let prepared = prepared.unwrap_or_else(|| panic!("{name} prepares an offer"));
        assert_eq!(prepared.servers, vec![addr]);
        assert!(
            prepared.offer.to_string().contains("127.0.0.1:"),
            "{name}: {}",
            prepared.offer
        );
    }
    let cases = [(true, true), (true, false), (false, true), (false, false)]
        .map(|(f, s)| (f, s, true, true, f && s))
        .into_iter()
        .chain(EARLY.map(|(ea, eb, at)| (true, true, ea, eb, at)));
    for (name, (first, second, early_a, early_b, at_pairing)) in ["tcp-punch", "udp-quic"]
        .into_iter()
        .flat_map(|n| cases.clone().map(move |c| (n, c)))
    {
        let params = ConnectParams {
            server: addr,
            session: format!("prepared-{name}-{first}-{second}-{early_a}-{early_b}"),
            secret: Some("k".into()),
        };
        let (a, b) = (
            orchestrator(&[name], first).with_early_start(early_a),
            orchestrator(&[name], second).with_early_start(early_b),
        );
        let ((la, ra), (lb, rb)) = tokio::join!(a.connect(&params, &|_| {}), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            b.connect(&params, &|_| {}).await
        });
        for (link, report) in [(&la, &ra), (&lb, &rb)] {
            assert!(
                link.is_some(),
                "{name} prepared {first}/{second}: no link: {:?}",
                report.attempts
            );
            assert_eq!(report.attempts[0].outcome, Outcome::Connected);
            assert_eq!(
                report.attempts[0].at_pairing, at_pairing,
                "{name} prepared {first}/{second}, early starts {early_a}/{early_b}"
            );
        }
        // Both ends of the same link.
        let (la, lb) = (la.unwrap(), lb.unwrap());
        assert_eq!((la.local, la.remote), (lb.remote, lb.local));
    }
    // A ladder whose first strategy prepares nothing uses tcp-punch's prepared offer later.
    let params = ConnectParams {
        server: addr,
        session: "prepared-later".into(),
        secret: Some("k".into()),
    };
    let orch = orchestrator(&["tcp-direct", "tcp-punch"], true);
    let ((la, ra), (lb, _)) = tokio::join!(orch.connect(&params, &|_| {}), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        orch.connect(&params, &|_| {}).await
    });
    assert!(la.is_some() && lb.is_some(), "{:?}", ra.attempts);
    drop((la, lb));
    common::assert_no_descriptor_left(&baseline).await;
}
