//! Helpers shared by the strategy tests.

use std::time::Duration;

/// Open file descriptors of this process, with what each points to.
pub(crate) fn open_fds() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to 5 s: aborted tasks drop their sockets on a later turn of the runtime) until
/// no more descriptors are open than `baseline`; panics listing the extra ones otherwise.
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
        "{} descriptors left open: {extra:?}",
        now.len() - baseline.len()
    );
}
