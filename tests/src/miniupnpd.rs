//! miniupnpd (Debian's `miniupnpd-nftables`) inside a lab router: a real UPnP-IGD, NAT-PMP
//! and PCP gateway for the port mapping tests (design.md §10).
//!
//! The router must have a public WAN ([`Lab::with_public_wan`]): miniupnpd refuses reserved
//! external addresses. Before it starts, the chains it fills are created in `table inet
//! filter` (forward → `miniupnpd`, nat prerouting → `prerouting_miniupnpd`, postrouting →
//! `postrouting_miniupnpd`); without them every mapping fails (UPnP error 501). The lab's own
//! "drop new inbound" rules let DNATed connections through (see `NatKind::ruleset`). Each
//! instance has its own config, pid and lease file, so parallel labs do not collide.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::run;
use crate::{Host, Lab, LabError};

/// What the daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MiniupnpdOptions {
    /// UPnP-IGD (SSDP + HTTP/SOAP).
    pub upnp: bool,
    /// NAT-PMP and PCP (UDP 5351; miniupnpd serves both under `enable_natpmp`).
    pub natpmp: bool,
}

/// A running miniupnpd; killed when dropped (its namespace going away kills it too).
#[derive(Debug)]
pub struct Miniupnpd {
    child: Child,
    netns: String,
    dir: PathBuf,
}

/// The chains miniupnpd fills, hooked where it expects them.
const CHAINS: &str = "table inet filter {
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tjump miniupnpd
\t}
\tchain miniupnpd {
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump prerouting_miniupnpd
\t}
\tchain prerouting_miniupnpd {
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tjump postrouting_miniupnpd
\t}
\tchain postrouting_miniupnpd {
\t}
}
";

fn router(lab: &Lab, h: Host) -> String {
    lab.router_netns(h)
        .expect("miniupnpd runs in a peer's router")
        .to_owned()
}

impl Lab {
    /// Starts miniupnpd in the router in front of `h` (which must have a public WAN) and waits
    /// until it listens. Fails with its log when it does not come up within 5 s.
    pub fn start_miniupnpd(&self, h: Host, opts: MiniupnpdOptions) -> Result<Miniupnpd, LabError> {
        let netns = router(self, h);
        run(
            Command::new("ip").args(["netns", "exec", &netns, "nft", "-f", "-"]),
            Some(CHAINS),
        )?;
        let dir = std::env::temp_dir().join(format!("{netns}-miniupnpd"));
        let io = |source| LabError::Spawn {
            command: format!("preparing {}", dir.display()),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let conf = format!(
            "ext_ifname=wan\nlistening_ip=lan\nport=0\nenable_upnp={}\nenable_natpmp={}\n\
             secure_mode=no\nsystem_uptime=yes\nlease_file={}\n\
             allow 1024-65535 0.0.0.0/0 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            yes_no(opts.upnp),
            yes_no(opts.natpmp),
            dir.join("leases").display()
        );
        let conf_path = dir.join("miniupnpd.conf");
        std::fs::write(&conf_path, conf).map_err(io)?;
        let log = dir.join("log");
        let log_file = std::fs::File::create(&log).map_err(io)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns, "miniupnpd", "-d", "-f"])
            .arg(&conf_path)
            .arg("-P")
            .arg(dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(io)?)
            .stderr(log_file);
        let command = format!(
            "ip netns exec {netns} miniupnpd -d -f {}",
            conf_path.display()
        );
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
        let mut daemon = Miniupnpd { child, netns, dir };
        let ready = if opts.natpmp {
            "Listening for NAT-PMP"
        } else {
            "HTTP listening"
        };
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(ready) {
                return Ok(daemon);
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(LabError::Command {
                    command,
                    status,
                    stderr: text,
                });
            }
            if Instant::now() > until {
                let _ = daemon.child.kill();
                let status = daemon.child.wait().expect("reaping miniupnpd");
                return Err(LabError::Command {
                    command,
                    status,
                    stderr: format!("not ready within 5 s: {text}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Miniupnpd {
    /// The live port mappings as nft sees them: the rules of `prerouting_miniupnpd` (one
    /// `dnat` rule per mapping).
    pub fn dnat_rules(&self) -> Result<Vec<String>, LabError> {
        let out = run(
            Command::new("ip").args([
                "netns",
                "exec",
                &self.netns,
                "nft",
                "list",
                "chain",
                "inet",
                "filter",
                "prerouting_miniupnpd",
            ]),
            None,
        )?;
        Ok(out
            .lines()
            .filter(|l| l.contains("dnat"))
            .map(|l| l.trim().to_owned())
            .collect())
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Miniupnpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
