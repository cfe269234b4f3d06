//! NAT behaviour discovery against servers on loopback (127.0.0.1 and 127.0.0.2 are both this
//! host, so there is no NAT: what is checked here is the protocol and the honesty of the
//! verdicts; the NAT lab checks the verdicts behind real NAT rules).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nettool_core::discovery::{discover, DiscoverOptions, DiscoveryError, Filtering, Mapping};
use nettool_core::stun;
use nettool_rendezvous::{RendezvousServer, ServerConfig};
use tokio::net::UdpSocket;

fn quick() -> DiscoverOptions {
    DiscoverOptions {
        test_timeout: Duration::from_millis(300),
        tcp: true,
    }
}

async fn server(other: Option<&str>) -> SocketAddr {
    let server = RendezvousServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            other_address: other.map(|o| o.parse().unwrap()),
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

#[tokio::test]
async fn rfc5780_server_on_loopback_is_no_nat_with_open_filtering() {
    let addr = server(Some("127.0.0.2:0")).await;
    let r = discover(addr, &quick()).await.unwrap();
    assert_eq!(r.udp_mapping, Mapping::NoNat);
    assert_eq!(r.udp_filtering, Filtering::EndpointIndependent);
    assert_eq!(r.tcp_mapping, Mapping::NoNat);
    assert_eq!(r.public_addr, Some(addr.ip()));
    assert_eq!(r.port_preservation, Some(true));
    assert_eq!(r.hairpinning, Some(true));
    let other = r.server_other_address.expect("OTHER-ADDRESS");
    assert_eq!(other.ip().to_string(), "127.0.0.2");
    assert!(r.rtt_ms > 0.0 && r.rtt_ms < 1000.0);
}

#[tokio::test]
async fn a_server_without_rfc5780_gives_unknown_filtering_not_a_guess() {
    let addr = server(None).await;
    let r = discover(addr, &quick()).await.unwrap();
    // The mapped address equals the local one: "no NAT" needs no second address.
    assert_eq!(r.udp_mapping, Mapping::NoNat);
    assert_eq!(r.udp_filtering, Filtering::Unknown);
    assert_eq!(r.tcp_mapping, Mapping::NoNat);
    assert_eq!(r.server_other_address, None);
}

/// A STUN server that claims an OTHER-ADDRESS but ignores CHANGE-REQUEST (always answers
/// from its one address): the filtering tests get answers from the wrong place, which says
/// nothing about filtering, so the verdict is unknown, not endpoint-independent.
#[tokio::test]
async fn a_server_ignoring_change_request_gives_unknown_filtering() {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let claimed: SocketAddr = "127.0.0.2:9".parse().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if let Some(req) = stun::parse_request(&buf[..n]) {
                let reply = stun::success_response(&req.id, from, Some(addr), Some(claimed));
                let _ = socket.send_to(&reply, from).await;
            }
        }
    });
    let opts = DiscoverOptions {
        tcp: false,
        ..quick()
    };
    let r = discover(addr, &opts).await.unwrap();
    assert_eq!(r.udp_filtering, Filtering::Unknown);
    assert_eq!(r.tcp_mapping, Mapping::Unknown);
}

#[tokio::test]
async fn a_silent_server_is_an_error_within_the_time_bound() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let opts = quick();
    let start = Instant::now();
    let err = discover(addr, &opts).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::NoAnswer(a) if a == addr),
        "{err}"
    );
    assert!(
        start.elapsed() <= opts.time_bound(),
        "{:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains("no STUN answer"), "{err}");
}

/// Both families side by side: a server on 127.0.0.1 and one on ::1 (when this host has IPv6
/// loopback) give one report each, IPv4 first.
#[tokio::test]
async fn discover_all_reports_each_family() {
    let v4 = server(None).await;
    let v6 = match RendezvousServer::bind("[::1]:0".parse().unwrap(), ServerConfig::default()).await
    {
        Ok(s) => {
            let a = s.local_addr().unwrap();
            tokio::spawn(s.run());
            Some(a)
        }
        Err(e) => {
            eprintln!("no IPv6 loopback here ({e}): checking IPv4 only");
            None
        }
    };
    let addrs: Vec<SocketAddr> = v6.into_iter().chain([v4]).collect();
    let (report, errors) = nettool_core::discovery::discover_all(&addrs, &quick()).await;
    assert!(errors.is_empty(), "{errors:?}");
    let r4 = report.ipv4.expect("ipv4");
    assert_eq!(r4.server, v4);
    assert_eq!(r4.udp_mapping, Mapping::NoNat);
    if let Some(v6) = v6 {
        let r6 = report.ipv6.expect("ipv6");
        assert_eq!(r6.server, v6);
        assert_eq!(r6.udp_mapping, Mapping::NoNat);
        assert_eq!(r6.public_addr, Some(v6.ip()));
    } else {
        assert!(report.ipv6.is_none());
    }
    assert!(report.server_rtt_ms.is_some());
    assert!(report.port_mapping.is_empty());
}

/// The orchestrator keeps discovery results per network, but a cached class is a hint: the
/// quick check confirms it before use. A confirmed entry for this very network (made up: no
/// NAT but a filtering firewall on both sides) is what the plan then works from, so tcp-direct
/// is skipped; an entry the network contradicts (made up: both sides "symmetric", while
/// loopback maps nothing) is dropped and the plan uses the fresh measurement.
#[tokio::test]
async fn the_plan_uses_a_cached_class_only_when_the_network_confirms_it() {
    use nettool_core::nat_cache::{default_gateway, NatCache};
    use nettool_core::plan::NatSummary;
    use nettool_core::{ConnectParams, Orchestrator, Outcome};
    use std::sync::Arc;

    let addr = server(Some("127.0.0.2:0")).await;
    let dir = std::env::temp_dir().join(format!("nettool-plan-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Each peer keeps its own cache, as two machines do: one shared file would let the first
    // peer's verdict (a dropped entry) race the second peer's read.
    let caches = [
        NatCache::new(dir.join("a.json"), Duration::from_secs(600)),
        NatCache::new(dir.join("b.json"), Duration::from_secs(600)),
    ];
    let key = NatCache::key(default_gateway(), addr.ip(), addr, addr.ip());
    let fw = NatSummary {
        udp_mapping: Mapping::NoNat,
        udp_filtering: Filtering::AddressAndPortDependent,
        tcp_mapping: Mapping::NoNat,
        port_mapping: false,
        udp_blocked: false,
    };
    let sym = NatSummary {
        udp_mapping: Mapping::AddressAndPortDependent,
        udp_filtering: Filtering::AddressAndPortDependent,
        tcp_mapping: Mapping::AddressAndPortDependent,
        port_mapping: false,
        udp_blocked: false,
    };

    struct Never;
    #[async_trait::async_trait]
    impl nettool_core::Strategy for Never {
        fn name(&self) -> &'static str {
            "tcp-direct"
        }
        async fn connect(
            &self,
            _: &mut nettool_core::Attempt<'_>,
        ) -> Result<nettool_core::Link, nettool_core::StrategyError> {
            Err(nettool_core::StrategyError::NoLink("tried".into()))
        }
    }
    let run = |cached: bool, session: &'static str| {
        let orch = |i: usize| {
            Orchestrator::new(
                vec![(Arc::new(Never), Duration::from_secs(2))],
                Duration::from_secs(10),
            )
            .with_nat_cache(cached.then(|| caches[i].clone()))
        };
        let (oa, ob) = (orch(0), orch(1));
        async move {
            let params = ConnectParams {
                server: addr,
                session: session.into(),
                secret: Some("s".into()),
            };
            let ((_, a), (_, b)) =
                tokio::join!(oa.connect(&params, &|_| {}), ob.connect(&params, &|_| {}));
            (a, b)
        }
    };
    for cache in &caches {
        assert!(cache.put(&key, fw, None).await);
    }
    let (a, b) = run(true, "confirmed").await;
    for r in [&a, &b] {
        assert_eq!(r.nat.as_ref().unwrap().local, Some(fw), "{r:?}");
        assert_eq!(r.nat_cache[0].state, "verified", "{r:?}");
        assert_eq!(r.attempts[0].outcome, Outcome::Skipped, "{r:?}");
    }

    for cache in &caches {
        assert!(cache.put(&key, sym, None).await);
    }
    let (a, b) = run(true, "contradicted").await;
    for r in [&a, &b] {
        let local = r.nat.as_ref().unwrap().local.unwrap();
        assert_eq!(local.udp_mapping, Mapping::NoNat, "{r:?}");
        assert_eq!(r.nat_cache[0].state, "contradicted", "{r:?}");
        assert!(
            r.nat_cache[0]
                .detail
                .as_deref()
                .unwrap()
                .contains("cached UDP mapping"),
            "{r:?}"
        );
        assert_eq!(r.attempts[0].outcome, Outcome::Failed, "{r:?}");
        // The plan's strategy failed: the fresh entry is dropped too, and the report says so.
        assert!(r.nat_cache[0].invalidated.is_some(), "{r:?}");
    }
    for cache in &caches {
        assert_eq!(
            cache.get(&key).await,
            None,
            "no entry survives a failed plan"
        );
    }

    let (a, _) = run(false, "measured").await;
    assert_eq!(a.nat.unwrap().local.unwrap().udp_mapping, Mapping::NoNat);
    assert_eq!(a.attempts[0].outcome, Outcome::Failed);
    let _ = std::fs::remove_dir_all(dir);
}
