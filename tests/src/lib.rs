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
