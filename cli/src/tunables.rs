//! glibc's `memcpy` without `rep movsb`: `nettool` re-executes itself once at start with
//! `GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=…` added to the environment.
//!
//! Why: rustls copies every 16 KiB TLS record twice in user space (plaintext into the record
//! on the sending side, out of the receive buffer on the receiving side). glibc copies blocks
//! of that size with `rep movsb`, and `rep movsb` runs at a fraction of its speed when the
//! destination lies a few bytes past the source modulo 4096 (4K aliasing). Where the two
//! buffers land is up to malloc: on relay links it happened every time, on some tcp-direct
//! links too, and the receiving `connect` then spent twice the CPU (perf: a third of it in
//! that one copy; a uprobe on `memmove` showed destination = source + 11 modulo 4096).
//! glibc's vector loop has no such case: with it the receiver's CPU per GiB is the same
//! whatever the layout (README, "The data path", has the figures).
//!
//! glibc reads tunables only when a process starts, so the only way to set one for ourselves
//! is to start again. It happens before anything else (no threads, no open files of ours);
//! the process keeps its PID, arguments and descriptors. `NETTOOL_NO_REEXEC=1` skips it (for
//! measuring the lever); a failed `exec` is reported by [`status`], not fatal.

use std::sync::OnceLock;

/// The glibc tunable.
pub(crate) const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";
/// Its value: larger than any copy that could prefer `rep movsb` (glibc uses non-temporal
/// stores above its own, much lower, threshold anyway).
const VALUE: &str = "2147483647";

static FAILED: OnceLock<String> = OnceLock::new();

/// Re-executes this process with the tunable set, unless it is set already, the user opted
/// out, or this is not an x86-64 glibc build. Returns only when it does not re-execute.
pub fn reexec_with_tuned_memcpy() {
    if !cfg!(all(
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    )) {
        return;
    }
    // NETTOOL_REEXECED: this process is the second start; never a third, whatever glibc made
    // of the variable.
    if std::env::var_os("NETTOOL_NO_REEXEC").is_some()
        || std::env::var_os("NETTOOL_REEXECED").is_some()
    {
        return;
    }
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains("x86_rep_movsb_threshold") {
        return;
    }
    let value = if current.is_empty() {
        format!("{TUNABLE}={VALUE}")
    } else {
        format!("{current}:{TUNABLE}={VALUE}")
    };
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "nettool".into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", value)
        .env("NETTOOL_REEXECED", "1")
        .exec();
    let _ = FAILED.set(err.to_string());
}

/// What the report and the bench say about the copy routine.
pub fn status() -> String {
    if !cfg!(all(
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    )) {
        return "memcpy: the C library's own".into();
    }
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let ours = format!("{TUNABLE}={VALUE}");
    let set = tunables.contains("x86_rep_movsb_threshold");
    match (set, FAILED.get()) {
        (true, _) if tunables.contains(&ours) => "memcpy: glibc without rep movsb".into(),
        (true, _) => format!("memcpy: glibc with the caller's GLIBC_TUNABLES={tunables}"),
        (false, Some(e)) => {
            format!("memcpy: glibc's default (re-executing with {TUNABLE} failed: {e})")
        }
        (false, None) => "memcpy: glibc's default (NETTOOL_NO_REEXEC)".into(),
    }
}
