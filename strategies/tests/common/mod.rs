//! Helpers shared by the strategy tests.

use std::time::Duration;

/// Open TCP and UDP sockets of this process (`socket:[inode]` per descriptor). Other
/// descriptors (the runtime's eventfds, epoll instances and unix sockets, created lazily by
/// the runtime and the test harness) are not counted.
pub(crate) fn open_fds() -> Vec<String> {
    let mut inet = String::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        inet.push_str(
            &std::fs::read_to_string(format!("/proc/self/net/{table}")).unwrap_or_default(),
        );
    }
    let inodes: std::collections::HashSet<&str> = inet
        .lines()
        .filter_map(|l| l.split_whitespace().nth(9))
        .collect();
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.display().to_string())
                .filter(|t| {
                    let inode = t.trim_start_matches("socket:[").trim_end_matches(']');
                    t.starts_with("socket:") && inodes.contains(inode)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to 5 s: aborted tasks drop their sockets on a later turn of the runtime) until
/// no more sockets are open than `baseline`; panics listing the extra ones otherwise.
pub(crate) async fn assert_no_descriptor_left(baseline: &[String]) {
    let mut now = open_fds();
    for _ in 0..250 {
        if now.len() <= baseline.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = open_fds();
    }
    let extra: Vec<&String> = now.iter().filter(|f| !baseline.contains(f)).collect();
    panic!(
        "{} sockets left open: {extra:?} (now {now:?}, before {baseline:?}; {})",
        now.len() - baseline.len(),
        describe(&now)
    );
}

/// Which protocol table each socket is in, for the failure message.
fn describe(sockets: &[String]) -> String {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6", "unix", "netlink"] {
        let text = std::fs::read_to_string(format!("/proc/self/net/{table}")).unwrap_or_default();
        for s in sockets {
            let inode = s.trim_start_matches("socket:[").trim_end_matches(']');
            if text
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == inode))
            {
                out.push(format!("{inode}: {table}"));
            }
        }
    }
    out.sort();
    out.dedup();
    out.join(", ")
}
