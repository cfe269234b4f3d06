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

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::NatKind;

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
        }
    }
}

impl std::error::Error for LabError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Spawn { source, .. } => Some(source),
            Self::Command { .. } => None,
        }
    }
}

const NETNS_DIR: &str = "/run/netns";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SERVER_OTHER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const INET_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

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
    names: [String; 6],
    /// How many of `names` exist (they are created in order).
    created: usize,
    /// Per side: the router's WAN is in [`PUBLIC_WAN`] instead of TEST-NET-2.
    public_wan: [bool; 2],
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

/// Deletes `ntl-<pid>-*` namespaces whose process is gone (left over by a killed test run).
fn delete_stale_namespaces() {
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
        Self::build_with(a, b, [false; 2])
    }

    /// As [`Lab::new`], but the router in front of `public` gets a WAN address outside the
    /// reserved ranges (11.0.0.2 for A, 11.0.0.6 for B), as miniupnpd requires
    /// ([`Lab::start_miniupnpd`]).
    pub fn with_public_wan(a: NatKind, b: NatKind, public: Host) -> Result<Self, LabError> {
        Self::build_with(a, b, [public == Host::A, public == Host::B])
    }

    fn build_with(a: NatKind, b: NatKind, public_wan: [bool; 2]) -> Result<Self, LabError> {
        delete_stale_namespaces();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("ntl-{}-{n}", std::process::id());
        let mut lab = Self {
            kinds: [a, b],
            names: ROLES.map(|r| format!("{prefix}-{r}")),
            created: 0,
            public_wan,
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<(), LabError> {
        for i in 0..ROLES.len() {
            netns_add(&self.names[i])?;
            self.created = i + 1;
        }
        let n = self.names.clone();
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
        let batches = [
            (
                SRV,
                host(SERVER_IP, 24, INET_SERVER_SIDE)
                    + &format!("addr add {SERVER_OTHER_IP}/24 dev eth0\n"),
            ),
            (INET, inet),
            (RA, router(s)),
            (RB, router(t)),
            (A, host(s.host, 24, s.lan_router)),
            (B, host(t.host, 24, t.lan_router)),
        ];
        for (ns, batch) in batches {
            let batch = format!("link set lo up\n{batch}");
            run(&mut ip(&["-n", &n[ns], "-batch", "-"]), Some(&batch))?;
        }
        for ns in [INET, RA, RB] {
            run(
                &mut ip(&[
                    "netns",
                    "exec",
                    &n[ns],
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ]),
                None,
            )?;
        }
        for (ns, side, kind) in [(RA, s, self.kinds[0]), (RB, t, self.kinds[1])] {
            if let Some(rules) = kind.ruleset(side.host, side.wan) {
                run(
                    &mut ip(&["netns", "exec", &n[ns], "nft", "-f", "-"]),
                    Some(&rules),
                )?;
            }
        }
        Ok(())
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
    pub fn command(&self, h: Host, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.netns(h)]).arg(program);
        c.env("NETTOOL_NAT_CACHE", "false");
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
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
