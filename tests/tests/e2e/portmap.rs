//! Port mapping against the real daemon: miniupnpd (UPnP-IGD, NAT-PMP, PCP) in the router in
//! front of B, both peers behind symmetric NATs (which otherwise only the relay links).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nettool_tests::{require_lab, Host, Lab, MiniupnpdOptions, NatKind};

use crate::support::TempDir;
use crate::support::{finish_peer, nettool_bin, spawn_peer, wait_until_waiting, PeerRun, Proc};

/// A lab (sym x sym; B's router with a public WAN when `public_b`) with a rendezvous server
/// that has a second address, so both peers know their NATs and plan.
struct PortmapLab {
    lab: Lab,
    _server: Proc,
}

impl PortmapLab {
    fn new(public_b: bool) -> Self {
        let (a, b) = (NatKind::Sym, NatKind::Sym);
        let lab = if public_b {
            Lab::with_public_wan(a, b, Host::B)
        } else {
            Lab::new(a, b)
        }
        .unwrap_or_else(|e| panic!("cannot build the lab: {e}"));
        let mut cmd = lab.command(Host::Server, nettool_bin());
        let listen = format!("{}:8877", lab.server_ip());
        let other = format!("{}:8878", lab.server_other_ip());
        cmd.args(["rendezvous", "--listen", &listen, "--other-address", &other])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut server = Proc::spawn(cmd);
        server.stderr_line_containing("listening on");
        Self {
            lab,
            _server: server,
        }
    }

    /// `nettool connect` on A (first, `a_flags`) and B (second, `b_flags`); both exit.
    fn connect(&self, session: &str, a_flags: &[&str], b_flags: &[&str]) -> (PeerRun, PeerRun) {
        let dir = TempDir::new(session);
        let server = format!("{}:8877", self.lab.server_ip());
        let args = |extra: &[&str]| -> Vec<String> {
            ["--server", &server, "--session", session, "--secret", "lab"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect()
        };
        let a_cmd = self.lab.command(Host::A, nettool_bin());
        let (a, _) = spawn_peer(a_cmd, &dir, "a", b"from a", &args(a_flags));
        wait_until_waiting(&dir, "a");
        let b_cmd = self.lab.command(Host::B, nettool_bin());
        let (b, _) = spawn_peer(b_cmd, &dir, "b", b"from b", &args(b_flags));
        let limit = Duration::from_secs(60);
        let a = finish_peer(a, &dir, "a", limit);
        let b = finish_peer(b, &dir, "b", limit);
        for (run, name) in [(&a, "a"), (&b, "b")] {
            assert!(
                run.status.is_some_and(|s| s.success()),
                "{name} failed: {}\n{:#?}",
                run.stderr,
                run.report
            );
        }
        assert_eq!(a.stdout, b"from b", "b's bytes reach a: {}", a.stderr);
        assert_eq!(b.stdout, b"from a", "a's bytes reach b: {}", b.stderr);
        (a, b)
    }
}

fn report(run: &PeerRun) -> &serde_json::Value {
    run.report.as_ref().expect("a report")
}

/// `upnpc -l` on B: the UPnP mappings the gateway lists.
fn upnp_list(lab: &Lab) -> Vec<String> {
    let out = lab
        .command(Host::B, "upnpc")
        .arg("-l")
        .output()
        .expect("run upnpc (Debian package miniupnpc)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // Entries look like ` 0 UDP  4000->10.0.2.2:4000  'nettool' '' 57`.
        .filter(|l| {
            let mut w = l.split_whitespace();
            w.next().is_some_and(|i| i.parse::<u32>().is_ok())
                && w.next().is_some_and(|p| p == "TCP" || p == "UDP")
        })
        .map(str::to_owned)
        .collect()
}

/// sym x sym with miniupnpd in front of B, B mapping with `protocol` only: udp-quic (default
/// order) and tcp-direct (asked for alone, relay after it) link directly to B's mapped port,
/// and nothing is left mapped once the peers have exited.
fn links_through_the_gateway(protocol: &str) {
    if !require_lab() {
        return;
    }
    let lab = PortmapLab::new(true);
    let daemon = lab
        .lab
        .start_miniupnpd(
            Host::B,
            MiniupnpdOptions {
                upnp: true,
                natpmp: true,
            },
        )
        .unwrap_or_else(|e| panic!("cannot start miniupnpd: {e}"));
    let b_flags = ["--portmap", "--portmap-protocol", protocol];
    let external_ip = lab.lab.public_ip(Host::B).to_string();
    for (strategies, want, transport) in [
        (&[][..], "udp-quic", "udp"),
        (
            &["--strategy", "tcp-direct", "--strategy", "relay"][..],
            "tcp-direct",
            "tcp",
        ),
    ] {
        let session = format!("pm-{protocol}-{want}");
        let mut b_all: Vec<&str> = b_flags.to_vec();
        b_all.extend(strategies);
        let started = Instant::now();
        let (a, b) = lab.connect(&session, strategies, &b_all);
        let took = started.elapsed();
        let (ra, rb) = (report(&a), report(&b));
        assert_eq!(a.strategy(), Some(want), "a: {ra:#}\n{}", a.stderr);
        assert_eq!(b.strategy(), Some(want), "b: {rb:#}\n{}", b.stderr);
        // The gateway answered and mapped with the protocol asked for.
        let pm = &rb["port_mapping"];
        assert_eq!(pm["tried"], serde_json::json!([protocol]), "{pm:#}");
        assert_eq!(pm["answered"], serde_json::json!([protocol]), "{pm:#}");
        let mapped = pm["mapped"].as_array().expect("mapped list");
        assert_eq!(mapped.len(), 1, "{pm:#}");
        assert_eq!(mapped[0]["protocol"], protocol, "{pm:#}");
        assert_eq!(mapped[0]["transport"], transport, "{pm:#}");
        let external = mapped[0]["external"].as_str().expect("external address");
        assert!(external.starts_with(&format!("{external_ip}:")), "{pm:#}");
        // A reached B at the mapped address: the link went through the mapping.
        assert_eq!(ra["remote"], external, "a's link: {ra:#}");
        // The plan knew: B's summary says its gateway maps.
        assert_eq!(ra["nat"]["peer"]["port_mapping"], true, "{ra:#}");
        assert!(
            ra.get("port_mapping").is_none(),
            "a has mapping off: {ra:#}"
        );
        // After both exited: no mapping left on the gateway.
        let rules = daemon.dnat_rules().expect("list prerouting_miniupnpd");
        assert!(rules.is_empty(), "left behind: {rules:?}\n{}", daemon.log());
        if protocol == "upnp" {
            let listed = upnp_list(&lab.lab);
            assert!(listed.is_empty(), "upnpc -l still lists {listed:?}");
        }
        assert!(
            b.stderr.contains("port mappings deleted: 1 of 1"),
            "{}",
            b.stderr
        );
        let linked = &rb["attempts"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["outcome"] == "connected"))
            .expect("a connected attempt")["elapsed_ms"];
        eprintln!(
            "portmap {protocol}: {want} linked sym x sym: attempt {linked} ms, gateway discovery \
             {} ms, connect {} ms, both processes {took:?}",
            pm["elapsed_ms"], rb["elapsed_ms"]
        );
    }
}

#[test]
fn sym_x_sym_links_directly_through_upnp() {
    links_through_the_gateway("upnp");
}

#[test]
fn sym_x_sym_links_directly_through_nat_pmp() {
    links_through_the_gateway("nat-pmp");
}

#[test]
fn sym_x_sym_links_directly_through_pcp() {
    links_through_the_gateway("pcp");
}

#[test]
fn netcheck_reports_which_protocols_the_gateway_answers() {
    if !require_lab() {
        return;
    }
    let lab = PortmapLab::new(true);
    let netcheck = |portmap: bool| -> serde_json::Value {
        let mut cmd = lab.lab.command(Host::B, nettool_bin());
        cmd.args([
            "netcheck",
            "--server",
            &format!("{}:8877", lab.lab.server_ip()),
        ])
        .args(["--json", "--no-tcp", "--timeout", "1s"]);
        if portmap {
            cmd.arg("--portmap");
        }
        let out = cmd.output().expect("run netcheck");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("netcheck JSON")
    };
    // No daemon yet: asked, nobody answers.
    let none = netcheck(true);
    assert_eq!(none["port_mapping"], serde_json::json!([]), "{none:#}");
    assert_eq!(
        none["port_mapping_probe"]["answered"],
        serde_json::json!([]),
        "{none:#}"
    );
    let _daemon = lab
        .lab
        .start_miniupnpd(
            Host::B,
            MiniupnpdOptions {
                upnp: true,
                natpmp: true,
            },
        )
        .unwrap_or_else(|e| panic!("cannot start miniupnpd: {e}"));
    let all = netcheck(true);
    assert_eq!(
        all["port_mapping"],
        serde_json::json!(["upnp", "nat-pmp", "pcp"]),
        "{all:#}"
    );
    assert_eq!(
        all["port_mapping_probe"]["external_ip"],
        lab.lab.public_ip(Host::B).to_string(),
        "{all:#}"
    );
    // The reference NAT-PMP client (Debian's natpmpc) sees the same external address.
    let gateway = all["port_mapping_probe"]["gateway"]
        .as_str()
        .expect("gateway");
    let out = lab
        .lab
        .command(Host::B, "natpmpc")
        .args(["-g", gateway])
        .output()
        .expect("run natpmpc (Debian package natpmpc)");
    let text = String::from_utf8_lossy(&out.stdout);
    let public = lab.lab.public_ip(Host::B).to_string();
    assert!(
        text.contains(&format!("Public IP address : {public}")),
        "natpmpc: {text}"
    );
    // Without --portmap the gateway is not asked.
    let off = netcheck(false);
    assert!(off.get("port_mapping_probe").is_none(), "{off:#}");
}

/// Counts the port mapping packets (SSDP to UDP 1900, NAT-PMP/PCP to UDP 5351) B sends to its
/// router, with tcpdump on the router's LAN side.
struct GatewayWatch {
    proc: Proc,
    out: std::path::PathBuf,
}

impl GatewayWatch {
    fn start(lab: &Lab, dir: &TempDir) -> Self {
        let router = lab.router_netns(Host::B).expect("router");
        let out = dir.path("tcpdump.txt");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", router, "tcpdump", "-i", "lan", "-n", "-l"])
            .args(["udp and (dst port 1900 or dst port 5351)"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("tcpdump output"))
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(cmd);
        proc.stderr_line_containing("listening on");
        Self { proc, out }
    }

    /// The packets seen so far (tcpdump flushes each line).
    fn packets(&self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = &self.proc;
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// Off by default: nothing reaches the gateway's mapping ports. With --portmap and no daemon:
/// the probe is sent, nobody answers, the report says so, and it costs at most the discovery
/// timeout (1 s) before the attempts go on (to the relay, as without mapping).
#[test]
fn off_sends_nothing_and_an_absent_gateway_costs_one_short_timeout() {
    if !require_lab() {
        return;
    }
    let lab = PortmapLab::new(false);
    let dir = TempDir::new("pm-watch");
    let watch = GatewayWatch::start(&lab.lab, &dir);
    let (_, b) = lab.connect("pm-off", &[], &[]);
    let off_ms = report(&b)["elapsed_ms"].clone();
    let sent = watch.packets();
    assert!(sent.is_empty(), "mapping is off, yet: {sent:?}");
    assert_eq!(b.strategy(), Some("relay"));
    assert!(report(&b).get("port_mapping").is_none(), "{:#}", report(&b));

    let (_, b) = lab.connect("pm-absent", &[], &["--portmap"]);
    let rb = report(&b);
    assert_eq!(b.strategy(), Some("relay"), "{rb:#}");
    let pm = &rb["port_mapping"];
    assert_eq!(pm["answered"], serde_json::json!([]), "{pm:#}");
    let elapsed = pm["elapsed_ms"].as_u64().expect("elapsed_ms");
    assert!(elapsed <= 1300, "discovery took {elapsed} ms: {pm:#}");
    assert!(
        b.stderr
            .contains("port mapping: no gateway answered (upnp, nat-pmp, pcp)"),
        "{}",
        b.stderr
    );
    // The plan is unchanged: the direct strategies are skipped, not tried.
    let attempts = rb["attempts"].as_array().expect("attempts");
    assert!(
        attempts[..3].iter().all(|a| a["outcome"] == "skipped"),
        "{attempts:#?}"
    );
    let sent = watch.packets();
    assert!(
        sent.iter().any(|l| l.contains(".1900:")) && sent.iter().any(|l| l.contains(".5351:")),
        "with --portmap, SSDP and NAT-PMP/PCP go out: {sent:?}"
    );
    eprintln!(
        "portmap absent: discovery {elapsed} ms, connect {} ms (mapping off: {off_ms} ms)",
        rb["elapsed_ms"]
    );
}

/// Polls `ok` every 20 ms for up to `limit`.
fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The mapping lives as long as the link: renewed past its lease (4 s here, so miniupnpd
/// would expire it), and deleted when B is stopped by SIGINT, SIGTERM or SIGHUP.
#[test]
fn mappings_are_renewed_while_linked_and_deleted_on_signals() {
    if !require_lab() {
        return;
    }
    let lab = PortmapLab::new(true);
    let daemon = lab
        .lab
        .start_miniupnpd(
            Host::B,
            MiniupnpdOptions {
                upnp: true,
                natpmp: true,
            },
        )
        .unwrap_or_else(|e| panic!("cannot start miniupnpd: {e}"));
    let server = format!("{}:8877", lab.lab.server_ip());
    for (signal, protocol) in [
        (libc::SIGTERM, "upnp"),
        (libc::SIGINT, "nat-pmp"),
        (libc::SIGHUP, "upnp"),
    ] {
        let dir = TempDir::new("pm-sig");
        let session = format!("pm-sig-{signal}");
        let args: Vec<String> = [
            "--server",
            &server,
            "--session",
            &session,
            "--secret",
            "lab",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (a, _) = spawn_peer(
            lab.lab.command(Host::A, nettool_bin()),
            &dir,
            "a",
            b"from a",
            &args,
        );
        wait_until_waiting(&dir, "a");
        let b_err = dir.path("b.err");
        let mut cmd = lab.lab.command(Host::B, nettool_bin());
        // The ladder, like A's (spawn_peer): the mappings belong to its direct attempts.
        cmd.env("NETTOOL_PORTMAP__LEASE", "4s")
            .env("NETTOOL_RELAY_FIRST", "false")
            .arg("connect")
            .args(&args)
            .args(["--portmap", "--portmap-protocol", protocol])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&b_err).expect("b.err"));
        let mut b = Proc::spawn(cmd);
        let _b_stdin = b.child.stdin.take().expect("piped stdin: held open");
        let b_text = || std::fs::read_to_string(&b_err).unwrap_or_default();
        wait_for("b to link", Duration::from_secs(30), || {
            b_text().contains("nettool: linked with")
        });
        assert!(b_text().contains("via udp-quic"), "{}", b_text());
        let rules = daemon.dnat_rules().expect("rules");
        assert_eq!(rules.len(), 1, "one mapping while linked: {rules:?}");
        if signal == libc::SIGTERM {
            // Past the 4 s lease twice over: still mapped, because it was renewed.
            std::thread::sleep(Duration::from_secs(9));
            let rules = daemon.dnat_rules().expect("rules");
            assert_eq!(rules.len(), 1, "expired, not renewed: {}", daemon.log());
        }
        let pid = i32::try_from(b.child.id()).expect("pid");
        // SAFETY: kill(2) on the child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let status = b.wait_timeout(Duration::from_secs(10)).expect("b exits");
        assert_eq!(status.code(), Some(128 + signal), "{}", b_text());
        let rules = daemon.dnat_rules().expect("rules");
        assert!(
            rules.is_empty(),
            "signal {signal} left {rules:?}\n{}",
            b_text()
        );
        assert!(
            b_text().contains("port mappings deleted: 1 of 1"),
            "{}",
            b_text()
        );
        let a = finish_peer(a, &dir, "a", Duration::from_secs(30));
        assert!(a.status.is_some_and(|s| s.success()), "a: {}", a.stderr);
    }
}
