//! The NAT lab: a small internet built from Linux network namespaces.
//!
//! Topology of one [`Lab`] (every namespace is named `ntl-<pid>-<n>-<role>`):
//!
//! ```text
//!  srv 203.0.113.10 ──── 203.0.113.1  inet  198.51.100.1 ── wan 198.51.100.2  ra  10.0.1.1 ── a 10.0.1.2
//!                                           198.51.100.5 ── wan 198.51.100.6  rb  10.0.2.1 ── b 10.0.2.2
//! ```
//!
//! The server host also has a second address, 203.0.113.11 ([`Lab::server_other_ip`]), for
//! RFC 5780 NAT behaviour discovery (answers from another IP); nothing uses it unless told to.
//!
//! `inet` is a plain router (one routed hop between the peers' routers). `ra`/`rb` run the
//! nftables ruleset of their [`NatKind`]. `inet` only has routes to a LAN when that side's kind
//! is routed (`none`, `fw`); for the NAT kinds the LAN is private. Nothing is ever attached to
//! the root namespace: veth pairs are created inside the lab's namespaces.
//!
//! IPv6 (design.md §11), an option of [`Lab::builder`]: a side given IPv6 gets a global /64
//! from 2001:db8::/32 on its LAN (`2001:db8:0:1::/64` for A, `2:` for B; the host is `::2`),
//! its router forwards it either open or through a stateful firewall ([`Ipv6Kind`], never
//! NAT66), and its host may be IPv6-only (no IPv4 address). The server then has
//! `2001:db8:0:10::10` and `::11` too, and every host resolves [`Lab::server_name`] to the
//! server's IPv4 and IPv6 addresses (an `/etc/netns/NS/hosts` that `ip netns exec` mounts).
//! Addresses are added with `nodad` (and DAD is off in the lab's namespaces), so they work at
//! once. Without the option the lab is IPv4 only, exactly as before.
//!
//! Link conditions (one-way delay, jitter, random loss), options of [`Lab::builder`] too, are
//! applied at `inet` by a userspace delay line (module `delay`, [`LinkConditions`]): an
//! `iptables -j NFQUEUE` rule in `inet`'s FORWARD chain hands it every forwarded packet. Without
//! them nothing of that exists (and no `iptables` is needed).

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::delay::{DelayLine, LinkConditions};
use crate::{Ipv6Kind, NatKind};

/// A host of the lab that tests run programs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    /// The rendezvous server host, on the public internet.
    Server,
    /// Peer A, behind router `ra`.
    A,
    /// Peer B, behind router `rb`.
    B,
}

/// Why a lab could not be built or used.
#[derive(Debug)]
pub enum LabError {
    /// A command could not be started at all (e.g. `ip` or `nft` missing).
    Spawn {
        /// The command line.
        command: String,
        /// The error from spawning it.
        source: io::Error,
    },
    /// A command ran and failed.
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The delay line of the link conditions could not be set up (e.g. no nfnetlink_queue).
    DelayLine {
        /// What failed.
        what: String,
        /// The error.
        source: io::Error,
    },
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spawn { command, source } => write!(f, "cannot run `{command}`: {source}"),
            Self::Command {
                command,
                status,
                stderr,
            } => write!(f, "`{command}` failed ({status}): {}", stderr.trim()),
            Self::DelayLine { what, source } => write!(f, "delay line: {what}: {source}"),
        }
    }
}

impl std::error::Error for LabError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Spawn { source, .. } | Self::DelayLine { source, .. } => Some(source),
            Self::Command { .. } => None,
        }
    }
}

pub(crate) const NETNS_DIR: &str = "/run/netns";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SERVER_OTHER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const INET_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0x10, 0, 0, 0, 0x10);
const SERVER_OTHER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0x10, 0, 0, 0, 0x11);
const INET_SERVER_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0x10, 0, 0, 0, 1);
/// The name every host of a lab with IPv6 resolves to the server's addresses.
const SERVER_NAME: &str = "rendezvous.lab";
const ETC_NETNS: &str = "/etc/netns";

/// IPv6 addresses of one side: `inet`'s and the router's on their link (`2001:db8:0:N1::/64`)
/// and the LAN (`2001:db8:0:N::/64`; router `::1`, host `::2`).
struct Side6 {
    inet: Ipv6Addr,
    wan: Ipv6Addr,
    lan_router: Ipv6Addr,
    host: Ipv6Addr,
    subnet: &'static str,
}

const SIDE_A6: Side6 = Side6 {
    inet: Ipv6Addr::new(0x2001, 0xdb8, 0, 0xa1, 0, 0, 0, 1),
    wan: Ipv6Addr::new(0x2001, 0xdb8, 0, 0xa1, 0, 0, 0, 2),
    lan_router: Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1),
    host: Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 2),
    subnet: "2001:db8:0:1::/64",
};

const SIDE_B6: Side6 = Side6 {
    inet: Ipv6Addr::new(0x2001, 0xdb8, 0, 0xb1, 0, 0, 0, 1),
    wan: Ipv6Addr::new(0x2001, 0xdb8, 0, 0xb1, 0, 0, 0, 2),
    lan_router: Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1),
    host: Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 2),
    subnet: "2001:db8:0:2::/64",
};

/// Addresses of one side (A or B) of the lab.
#[derive(Clone, Copy)]
struct Side {
    /// `inet`'s address on the link to the router.
    inet: Ipv4Addr,
    /// The router's WAN address (a /30 with `inet`).
    wan: Ipv4Addr,
    /// The router's LAN address (a /24 with the host).
    lan_router: Ipv4Addr,
    /// The host's address.
    host: Ipv4Addr,
    /// The LAN subnet, for `inet`'s route when the side is routed.
    subnet: &'static str,
}

const SIDE_A: Side = Side {
    inet: Ipv4Addr::new(198, 51, 100, 1),
    wan: Ipv4Addr::new(198, 51, 100, 2),
    lan_router: Ipv4Addr::new(10, 0, 1, 1),
    host: Ipv4Addr::new(10, 0, 1, 2),
    subnet: "10.0.1.0/24",
};

const SIDE_B: Side = Side {
    inet: Ipv4Addr::new(198, 51, 100, 5),
    wan: Ipv4Addr::new(198, 51, 100, 6),
    lan_router: Ipv4Addr::new(10, 0, 2, 1),
    host: Ipv4Addr::new(10, 0, 2, 2),
    subnet: "10.0.2.0/24",
};

/// `inet`'s and the router's WAN addresses of side A and B for a router with a public WAN
/// ([`Lab::with_public_wan`]): outside every reserved range (miniupnpd refuses TEST-NET and
/// private external addresses); the lab has no route out, so nothing ever leaves it.
const PUBLIC_WAN: [(Ipv4Addr, Ipv4Addr); 2] = [
    (Ipv4Addr::new(11, 0, 0, 1), Ipv4Addr::new(11, 0, 0, 2)),
    (Ipv4Addr::new(11, 0, 0, 5), Ipv4Addr::new(11, 0, 0, 6)),
];

/// Namespace roles, in creation order; index into [`Lab::names`].
const ROLES: [&str; 6] = ["srv", "inet", "ra", "rb", "a", "b"];
const SRV: usize = 0;
const INET: usize = 1;
const RA: usize = 2;
const RB: usize = 3;
const A: usize = 4;
const B: usize = 5;

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Serializes `ip netns add` within this process (the first one sets up the `/run/netns`
/// mount, which races badly when done concurrently).
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// A running NAT lab. Dropping it deletes its namespaces (and kills what still runs in them).
#[derive(Debug)]
pub struct Lab {
    kinds: [NatKind; 2],
    /// Each side's IPv6 (`None`: IPv4 only).
    v6: [Option<Ipv6Kind>; 2],
    /// Whether each side's host has IPv4.
    v4: [bool; 2],
    names: [String; 6],
    /// How many of `names` exist (they are created in order).
    created: usize,
    /// Per side: the router's WAN is in [`PUBLIC_WAN`] instead of TEST-NET-2.
    public_wan: [bool; 2],
    /// The link conditions at `inet`, when any were asked for.
    conditions: Option<LinkConditions>,
    /// The delay line applying `conditions`; stopped before the namespaces are deleted.
    line: Option<DelayLine>,
}

/// Options of a [`Lab`] beyond its two NAT kinds: IPv6 per side, IPv6-only hosts, a public
/// WAN, link conditions.
#[derive(Debug, Clone)]
pub struct LabBuilder {
    kinds: [NatKind; 2],
    v6: [Option<Ipv6Kind>; 2],
    v4: [bool; 2],
    public_wan: [bool; 2],
    conditions: Option<LinkConditions>,
}

impl LabBuilder {
    fn index(h: Host) -> usize {
        match h {
            Host::A => 0,
            Host::B => 1,
            Host::Server => {
                panic!("the lab's server always has both families when any side has IPv6")
            }
        }
    }

    /// Gives peer `h` (A or B) IPv6 next to its IPv4 (dual stack), forwarded by its router as
    /// `kind` says.
    pub fn ipv6(mut self, h: Host, kind: Ipv6Kind) -> Self {
        self.v6[Self::index(h)] = Some(kind);
        self
    }

    /// Gives peer `h` IPv6 only: no IPv4 address on the host (its router keeps IPv4).
    pub fn ipv6_only(mut self, h: Host, kind: Ipv6Kind) -> Self {
        let i = Self::index(h);
        self.v6[i] = Some(kind);
        self.v4[i] = false;
        self
    }

    /// Gives the router in front of `h` a WAN address outside the reserved ranges (see
    /// [`Lab::with_public_wan`]).
    pub fn public_wan(mut self, h: Host) -> Self {
        self.public_wan[Self::index(h)] = true;
        self
    }

    fn conditions(&mut self) -> &mut LinkConditions {
        self.conditions.get_or_insert_with(LinkConditions::default)
    }

    /// Delays every packet by `delay` where it crosses the internet router `inet` (a one-way
    /// delay). Every path between a peer and the server or between the peers crosses `inet`
    /// once per direction, so host↔server and host↔host round trips take 2 × `delay` more, and
    /// so does a relayed A→B packet one way (A→server, then server→B).
    ///
    /// Any of [`Self::delay`], [`Self::jitter`] and [`Self::loss`] makes the lab run a
    /// userspace delay line on `inet` (needs `iptables` and the kernel's nfnetlink_queue; the
    /// build fails naming what is missing). [`Lab::conditions`] then tells the conditions.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.conditions().delay = delay;
        self
    }

    /// Varies each packet's delay at `inet` uniformly in `delay ± jitter` (never below zero),
    /// order kept: a packet never overtakes the one ahead of it going the same way through
    /// `inet` (from the same link to the same link; see [`Self::delay`]).
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.conditions().jitter = jitter;
        self
    }

    /// Drops each packet crossing `inet` with probability `loss` (a fraction, 0 to 1), once
    /// per crossing: a round trip crosses twice, so it is lost with probability
    /// 1 - (1 - `loss`)² (see [`Self::delay`]).
    ///
    /// # Panics
    ///
    /// If `loss` is not within 0 and 1.
    pub fn loss(mut self, loss: f64) -> Self {
        assert!((0.0..=1.0).contains(&loss), "loss {loss} is not a fraction");
        self.conditions().loss = loss;
        self
    }

    /// Builds the lab; fails as [`Lab::new`] does.
    pub fn build(self) -> Result<Lab, LabError> {
        delete_stale_namespaces();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("ntl-{}-{n}", std::process::id());
        let mut lab = Lab {
            kinds: self.kinds,
            v6: self.v6,
            v4: self.v4,
            names: ROLES.map(|r| format!("{prefix}-{r}")),
            created: 0,
            public_wan: self.public_wan,
            conditions: None,
            line: None,
        };
        lab.build()?;
        if let Some(conditions) = self.conditions {
            lab.start_conditions(conditions)?;
        }
        Ok(lab)
    }
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` (feeding `stdin` if given) and fails with its stderr unless it succeeds.
pub(crate) fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String, LabError> {
    let line = command_line(cmd);
    let line = match stdin {
        Some(s) => format!("{line} <<< {s:?}"),
        None => line,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let spawn_err = |source| LabError::Spawn {
        command: line.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn ip(args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

fn netns_add(name: &str) -> Result<(), LabError> {
    let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
    run(&mut ip(&["netns", "add", name]), None).map(drop)
}

/// Kills every process left in namespace `ns`, then deletes it.
fn netns_delete(ns: &str) -> Result<(), LabError> {
    if let Ok(pids) = run(&mut ip(&["netns", "pids", ns]), None) {
        for pid in pids.split_whitespace() {
            // These processes live in a namespace this harness created: they are the lab's.
            let _ = run(Command::new("kill").args(["-KILL", pid]), None);
        }
    }
    run(&mut ip(&["netns", "del", ns]), None).map(drop)
}

/// The pid embedded in a lab namespace name `ntl-<pid>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("ntl-")?.split('-').next()?.parse().ok()
}

/// Deletes `ntl-<pid>-*` namespaces whose process is gone (left over by a killed test run),
/// and their `/etc/netns` directories.
fn delete_stale_namespaces() {
    if let Ok(entries) = std::fs::read_dir(ETC_NETNS) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            if let Err(e) = netns_delete(&name) {
                eprintln!("nat lab: cannot delete stale namespace {name}: {e}");
            }
        }
    }
}

impl Lab {
    /// Builds a lab with peer A behind a router of kind `a` and peer B behind one of kind `b`.
    ///
    /// Fails with the failing command and its stderr; whatever was built is removed again.
    pub fn new(a: NatKind, b: NatKind) -> Result<Self, LabError> {
        Self::builder(a, b).build()
    }

    /// As [`Lab::new`], but the router in front of `public` gets a WAN address outside the
    /// reserved ranges (11.0.0.2 for A, 11.0.0.6 for B), as miniupnpd requires
    /// ([`Lab::start_miniupnpd`]).
    pub fn with_public_wan(a: NatKind, b: NatKind, public: Host) -> Result<Self, LabError> {
        Self::builder(a, b).public_wan(public).build()
    }

    /// A lab with more options (IPv6 per side, IPv6-only hosts, a public WAN); IPv4 only and
    /// TEST-NET WANs unless told.
    pub fn builder(a: NatKind, b: NatKind) -> LabBuilder {
        LabBuilder {
            kinds: [a, b],
            v6: [None, None],
            v4: [true, true],
            public_wan: [false; 2],
            conditions: None,
        }
    }

    /// The link conditions at the internet router (`None` unless the builder set any): one
    /// way per crossing of `inet`, so a host↔server or host↔host round trip takes
    /// 2 × `delay` more (see [`LabBuilder::delay`]).
    pub fn conditions(&self) -> Option<LinkConditions> {
        self.conditions
    }

    /// Starts the delay line on `inet`, then sends every packet `inet` forwards to it.
    fn start_conditions(&mut self, conditions: LinkConditions) -> Result<(), LabError> {
        // The queue is bound before the rules exist: an NFQUEUE without a listener drops all.
        self.line = Some(DelayLine::start(&self.names[INET], conditions)?);
        self.conditions = Some(conditions);
        let queue = crate::delay::QUEUE_NUM.to_string();
        let mut tools = vec!["iptables"];
        if self.has_ipv6() {
            tools.push("ip6tables");
        }
        for tool in tools {
            run(
                &mut ip(&[
                    "netns",
                    "exec",
                    &self.names[INET],
                    tool,
                    "-A",
                    "FORWARD",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &queue,
                ]),
                None,
            )?;
        }
        Ok(())
    }

    /// Whether any side has IPv6 (the server then has it too).
    pub fn has_ipv6(&self) -> bool {
        self.v6.iter().any(Option::is_some)
    }

    fn build(&mut self) -> Result<(), LabError> {
        for i in 0..ROLES.len() {
            netns_add(&self.names[i])?;
            self.created = i + 1;
        }
        let n = self.names.clone();
        let v6 = self.has_ipv6();
        if v6 {
            // Before any interface exists, so every interface (veth ends moved in included)
            // starts without duplicate-address detection.
            for ns in &n {
                run(
                    &mut ip(&[
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-qw",
                        "net.ipv6.conf.all.accept_dad=0",
                        "net.ipv6.conf.default.accept_dad=0",
                        "net.ipv6.conf.all.disable_ipv6=0",
                        "net.ipv6.conf.default.disable_ipv6=0",
                    ]),
                    None,
                )?;
            }
        }
        // veth pairs, created inside `inet`/routers with the peer moved straight to its netns.
        let links = [
            (INET, "srv", SRV, "eth0"),
            (INET, "ra", RA, "wan"),
            (INET, "rb", RB, "wan"),
            (RA, "lan", A, "eth0"),
            (RB, "lan", B, "eth0"),
        ];
        for (ns, name, peer_ns, peer) in links {
            run(
                &mut ip(&[
                    "-n",
                    &n[ns],
                    "link",
                    "add",
                    name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer,
                    "netns",
                    &n[peer_ns],
                ]),
                None,
            )?;
        }
        let s = &self.side_at(0);
        let t = &self.side_at(1);
        let mut inet = format!(
            "addr add {INET_SERVER_SIDE}/24 dev srv\naddr add {}/30 dev ra\naddr add {}/30 dev rb\n\
             link set srv up\nlink set ra up\nlink set rb up\n",
            s.inet, t.inet
        );
        for (side, kind, via) in [(s, self.kinds[0], s.wan), (t, self.kinds[1], t.wan)] {
            if kind.is_routed() {
                inet += &format!("route add {} via {via}\n", side.subnet);
            }
        }
        let router = |side: &Side| {
            format!(
                "addr add {}/30 dev wan\naddr add {}/24 dev lan\nlink set wan up\nlink set lan up\n\
                 route add default via {}\n",
                side.wan, side.lan_router, side.inet
            )
        };
        let host = |addr: Ipv4Addr, prefix: u8, gw: Ipv4Addr| {
            format!(
                "addr add {addr}/{prefix} dev eth0\nlink set eth0 up\nroute add default via {gw}\n"
            )
        };
        let host_a = if self.v4[0] {
            host(s.host, 24, s.lan_router)
        } else {
            "link set eth0 up\n".to_owned()
        };
        let host_b = if self.v4[1] {
            host(t.host, 24, t.lan_router)
        } else {
            "link set eth0 up\n".to_owned()
        };
        let mut batches = [
            (
                SRV,
                host(SERVER_IP, 24, INET_SERVER_SIDE)
                    + &format!("addr add {SERVER_OTHER_IP}/24 dev eth0\n"),
            ),
            (INET, inet),
            (RA, router(s)),
            (RB, router(t)),
            (A, host_a),
            (B, host_b),
        ];
        if v6 {
            let (s6, t6) = (&SIDE_A6, &SIDE_B6);
            batches[0].1 += &format!(
                "addr add {SERVER_IP6}/64 dev eth0 nodad\naddr add {SERVER_OTHER_IP6}/64 dev eth0 nodad\n\
                 route add ::/0 via {INET_SERVER_SIDE6}\n"
            );
            batches[1].1 += &format!(
                "addr add {INET_SERVER_SIDE6}/64 dev srv nodad\naddr add {}/64 dev ra nodad\n\
                 addr add {}/64 dev rb nodad\n",
                s6.inet, t6.inet
            );
            for (i, (side, ns)) in [(s6, RA), (t6, RB)].into_iter().enumerate() {
                if self.v6[i].is_none() {
                    continue;
                }
                batches[1].1 += &format!("route add {} via {}\n", side.subnet, side.wan);
                let r = batches
                    .iter_mut()
                    .find(|(n, _)| *n == ns)
                    .expect("router batch");
                r.1 += &format!(
                    "addr add {}/64 dev wan nodad\naddr add {}/64 dev lan nodad\n\
                     route add ::/0 via {}\n",
                    side.wan, side.lan_router, side.inet
                );
                let h = batches
                    .iter_mut()
                    .find(|(n, _)| *n == if ns == RA { A } else { B })
                    .expect("host batch");
                h.1 += &format!(
                    "addr add {}/64 dev eth0 nodad\nroute add ::/0 via {}\n",
                    side.host, side.lan_router
                );
            }
        }
        for (ns, batch) in batches {
            let batch = format!("link set lo up\n{batch}");
            run(&mut ip(&["-n", &n[ns], "-batch", "-"]), Some(&batch))?;
        }
        for ns in [INET, RA, RB] {
            let mut args = vec![
                "netns",
                "exec",
                &n[ns],
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ];
            if v6 {
                args.push("net.ipv6.conf.all.forwarding=1");
            }
            run(&mut ip(&args), None)?;
        }
        for (ns, side, kind) in [(RA, s, self.kinds[0]), (RB, t, self.kinds[1])] {
            // With IPv6 in the lab, the NAT kind's rules are IPv4's alone (no NAT66).
            let rules = if v6 {
                kind.ruleset_ipv4(side.host, side.wan)
            } else {
                kind.ruleset(side.host, side.wan)
            };
            if let Some(rules) = rules {
                run(
                    &mut ip(&["netns", "exec", &n[ns], "nft", "-f", "-"]),
                    Some(&rules),
                )?;
            }
        }
        for (ns, kind) in [(RA, self.v6[0]), (RB, self.v6[1])] {
            if let Some(rules) = kind.and_then(Ipv6Kind::ruleset) {
                run(
                    &mut ip(&["netns", "exec", &n[ns], "nft", "-f", "-"]),
                    Some(&rules),
                )?;
            }
        }
        if v6 {
            let hosts = format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost\n{SERVER_IP}\t{SERVER_NAME}\n\
                 {SERVER_IP6}\t{SERVER_NAME}\n"
            );
            for ns in [SRV, A, B] {
                let dir = Path::new(ETC_NETNS).join(&n[ns]);
                let written = std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(dir.join("hosts"), &hosts));
                written.map_err(|source| LabError::Spawn {
                    command: format!("write {}/hosts", dir.display()),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// The server's IPv6 address (`None` in a lab without IPv6).
    pub fn server_ip6(&self) -> Option<Ipv6Addr> {
        self.has_ipv6().then_some(SERVER_IP6)
    }

    /// The server host's second IPv6 address (RFC 5780 `--other-address-v6`).
    pub fn server_other_ip6(&self) -> Option<Ipv6Addr> {
        self.has_ipv6().then_some(SERVER_OTHER_IP6)
    }

    /// The name every host of a lab with IPv6 resolves to the server's IPv4 and IPv6
    /// addresses (as a DNS name with A and AAAA records would).
    pub fn server_name(&self) -> &'static str {
        SERVER_NAME
    }

    /// The peer's global IPv6 address (`None` when its side has no IPv6).
    pub fn host_ip6(&self, h: Host) -> Option<Ipv6Addr> {
        match h {
            Host::Server => self.server_ip6(),
            Host::A => self.v6[0].map(|_| SIDE_A6.host),
            Host::B => self.v6[1].map(|_| SIDE_B6.host),
        }
    }

    /// How the peer's router forwards IPv6 (`None` without IPv6, and for the server).
    pub fn ipv6_kind(&self, h: Host) -> Option<Ipv6Kind> {
        match h {
            Host::Server => None,
            Host::A => self.v6[0],
            Host::B => self.v6[1],
        }
    }

    /// Whether the host has IPv4 (false for IPv6-only peers).
    pub fn has_ipv4(&self, h: Host) -> bool {
        match h {
            Host::Server => true,
            Host::A => self.v4[0],
            Host::B => self.v4[1],
        }
    }

    /// Side `i`'s addresses, with the public WAN when asked for.
    fn side_at(&self, i: usize) -> Side {
        let mut side = if i == 0 { SIDE_A } else { SIDE_B };
        if self.public_wan[i] {
            (side.inet, side.wan) = PUBLIC_WAN[i];
        }
        side
    }

    fn side(h: Host) -> Option<(&'static Side, usize)> {
        match h {
            Host::Server => None,
            Host::A => Some((&SIDE_A, 0)),
            Host::B => Some((&SIDE_B, 1)),
        }
    }

    /// The rendezvous server's address (public).
    pub fn server_ip(&self) -> Ipv4Addr {
        SERVER_IP
    }

    /// The server host's second address (RFC 5780 `--other-address`), on the same link.
    pub fn server_other_ip(&self) -> Ipv4Addr {
        SERVER_OTHER_IP
    }

    /// The host's own address, as configured on its interface (the LAN address for peers).
    pub fn host_ip(&self, h: Host) -> Ipv4Addr {
        match Self::side(h) {
            None => SERVER_IP,
            Some((side, _)) => side.host,
        }
    }

    /// The address the internet sees for the host: the router's WAN address for NAT kinds,
    /// the host's own address for `none` and `fw`.
    pub fn public_ip(&self, h: Host) -> Ipv4Addr {
        match Self::side(h) {
            None => SERVER_IP,
            Some((side, i)) if self.kinds[i].is_routed() => side.host,
            Some((_, i)) => self.side_at(i).wan,
        }
    }

    /// The address of `inet` (the routed hop) on its link to the host's router: the source of
    /// the ICMP time-exceeded a packet sent by a peer with TTL 2 gets back. For the server, the
    /// gateway on the server's own link.
    pub fn inet_ip(&self, h: Host) -> Ipv4Addr {
        match Self::side(h) {
            None => INET_SERVER_SIDE,
            Some((_, i)) => self.side_at(i).inet,
        }
    }

    /// The NAT kind in front of a peer (`None` for the server).
    pub fn kind(&self, h: Host) -> Option<NatKind> {
        Self::side(h).map(|(_, i)| self.kinds[i])
    }

    /// Turns the router in front of peer `h` into one of `kind` in place, addresses kept
    /// (a router whose NAT behaviour changed; both kinds must be NAT kinds or both routed,
    /// since `inet`'s routes stay). Connection tracking is flushed when the `conntrack` tool is
    /// there, so old flows do not keep the old kind's mappings.
    pub fn set_kind(&mut self, h: Host, kind: NatKind) -> Result<(), LabError> {
        let (_, i) = Self::side(h).expect("set_kind is for the peers' routers");
        let side = self.side_at(i);
        assert_eq!(
            self.kinds[i].is_routed(),
            kind.is_routed(),
            "set_kind keeps the addresses: routed and NAT kinds cannot be swapped"
        );
        let ns = self
            .router_netns(h)
            .expect("a peer has a router")
            .to_owned();
        let family = if self.has_ipv6() { "ip" } else { "inet" };
        // The table may not exist (kind none): ignore that error.
        let _ = run(
            &mut ip(&[
                "netns", "exec", &ns, "nft", "delete", "table", family, "ntl",
            ]),
            None,
        );
        let rules = if self.has_ipv6() {
            kind.ruleset_ipv4(side.host, side.wan)
        } else {
            kind.ruleset(side.host, side.wan)
        };
        if let Some(rules) = rules {
            run(
                &mut ip(&["netns", "exec", &ns, "nft", "-f", "-"]),
                Some(&rules),
            )?;
        }
        self.kinds[i] = kind;
        self.flush_conntrack(h)
    }

    /// Drops every UDP packet the router in front of `h` would forward, both ways (a network
    /// that lets only TCP out, as many corporate and guest networks do). Its own table, so
    /// [`Self::set_kind`] leaves it in place.
    pub fn block_udp(&self, h: Host) -> Result<(), LabError> {
        let ns = self.router_netns(h).expect("a peer has a router");
        let rules = "table inet ntl_udp_block {\n\
                     \tchain forward {\n\
                     \t\ttype filter hook forward priority -10; policy accept;\n\
                     \t\tmeta l4proto udp drop\n\
                     \t}\n\
                     }\n";
        run(
            &mut ip(&["netns", "exec", ns, "nft", "-f", "-"]),
            Some(rules),
        )
        .map(drop)
    }

    /// Flushes the connection tracking table of the router in front of `h` (a NAT reboot, a
    /// CGNAT rebinding: every mapping forgotten). Needs the `conntrack` tool; without it this
    /// is an error naming the package.
    pub fn flush_conntrack(&self, h: Host) -> Result<(), LabError> {
        let ns = self.router_netns(h).expect("a peer has a router");
        run(&mut ip(&["netns", "exec", ns, "conntrack", "-F"]), None).map(drop)
    }

    /// The name of the host's network namespace.
    pub fn netns(&self, h: Host) -> &str {
        match h {
            Host::Server => &self.names[SRV],
            Host::A => &self.names[A],
            Host::B => &self.names[B],
        }
    }

    /// The namespace of the router in front of a peer (`None` for the server).
    pub fn router_netns(&self, h: Host) -> Option<&str> {
        match h {
            Host::Server => None,
            Host::A => Some(&self.names[RA]),
            Host::B => Some(&self.names[RB]),
        }
    }

    /// Every namespace of the lab (srv, inet, ra, rb, a, b).
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// A command running `program` inside the host's namespace (`ip netns exec NS program`);
    /// the caller adds arguments.
    ///
    /// nettool's NAT discovery cache is off for these commands: every lab has the same
    /// addresses behind different NAT kinds, which the cache (keyed by the network) would mix up.
    /// The lab's processes share a config and a state directory of their own (the server's
    /// identity key, the peers' known servers), removed with the lab: every lab has the same
    /// server address, and its servers must not meet another lab's keys.
    pub fn command(&self, h: Host, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.netns(h)]).arg(program);
        c.env("NETTOOL_NAT_CACHE", "false");
        let dir = self.dir();
        c.env("XDG_CONFIG_HOME", dir.join("config"));
        c.env("XDG_STATE_HOME", dir.join("state"));
        c
    }

    /// This lab's directory for its processes' config and state (see [`Lab::command`]).
    pub fn dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("nettool-{}", self.names[0]))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The line's thread lives in `inet`: stop it (it accepts what it holds) first.
        drop(self.line.take());
        let _ = std::fs::remove_dir_all(self.dir());
        if self.has_ipv6() {
            for name in &self.names {
                let _ = std::fs::remove_dir_all(Path::new(ETC_NETNS).join(name));
            }
        }
        for name in self.names[..self.created].iter().rev() {
            if let Err(e) = netns_delete(name) {
                eprintln!("nat lab: cannot delete namespace {name}: {e}");
            }
        }
    }
}

/// Why the lab cannot run here, or `None` when it can (root, `nft`, and `ip netns` work; checked
/// by creating and deleting a throwaway namespace). The answer is computed once per process.
pub fn lab_unavailable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON.get_or_init(probe_lab).clone()
}

fn probe_lab() -> Option<String> {
    if cfg!(not(target_os = "linux")) {
        return Some("the NAT lab needs Linux network namespaces".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the NAT lab needs root (network namespaces, nftables)".into());
    }
    if let Err(e) = run(Command::new("nft").arg("--version"), None) {
        return Some(format!("nft unusable: {e}"));
    }
    delete_stale_namespaces();
    let name = format!("ntl-{}-probe", std::process::id());
    if let Err(e) = netns_add(&name) {
        return Some(format!("ip netns unusable: {e}"));
    }
    let nft = run(
        &mut ip(&["netns", "exec", &name, "nft", "list", "ruleset"]),
        None,
    );
    let del = netns_delete(&name);
    if let Err(e) = nft {
        return Some(format!("nft unusable in a namespace: {e}"));
    }
    del.err().map(|e| format!("cannot delete a namespace: {e}"))
}

/// For tests: true if the lab can run. Otherwise, when `CI` or `NETTOOL_REQUIRE_LAB` is set,
/// panics with the reason (CI must fail loudly); else prints `skipping: <reason>` to stderr and
/// returns false.
pub fn require_lab() -> bool {
    let Some(reason) = lab_unavailable_reason() else {
        return true;
    };
    if std::env::var_os("CI").is_some() || std::env::var_os("NETTOOL_REQUIRE_LAB").is_some() {
        panic!("NAT lab required (CI or NETTOOL_REQUIRE_LAB set) but unavailable: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_lab_names_only() {
        assert_eq!(owner_pid("ntl-1234-7-srv"), Some(1234));
        assert_eq!(owner_pid("ntl-99-probe"), Some(99));
        assert_eq!(owner_pid("ntl-test-x"), None);
        assert_eq!(owner_pid("other-1234-0-a"), None);
    }
}
