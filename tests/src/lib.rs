//! NAT lab harness and end-to-end test support for nettool.
//!
//! [`Lab`] builds a small internet from Linux network namespaces with one NAT router per peer
//! (design.md §6); [`NatKind`] names the router behaviours. Tests call [`require_lab`] first so
//! they skip (or fail loudly in CI) where namespaces are unavailable. The `labprobe` binary of
//! this crate is a small socket probe that the lab's own tests run inside the namespaces.
//! [`LinkConditions`] (delay, jitter, loss at the lab's internet router) are set with
//! [`LabBuilder::delay`] and its siblings.
#![warn(missing_docs)]

mod delay;
mod lab;
mod miniupnpd;
mod nat;

pub use delay::LinkConditions;
pub use lab::{lab_unavailable_reason, require_lab, Host, Lab, LabBuilder, LabError};
pub use miniupnpd::{Miniupnpd, MiniupnpdOptions};
pub use nat::{Ipv6Kind, NatKind, UnknownNatKind};

/// Deterministic pseudo-random bytes (xorshift64, a different stream per seed), so a failed
/// transfer can be reproduced: the end-to-end tests' and the benchmarks' payloads.
pub fn test_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
