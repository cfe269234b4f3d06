//! The core of nettool: everything two peers need to meet and agree, independent of how a
//! particular strategy opens its sockets.
//!
//! - [`protocol`]: the versioned rendezvous messages and their line codec.
//! - [`client`]: the peer's side of the rendezvous conversation; [`control`]: its TLS and the
//!   server key it pins (or trusts on first use).
//!   (The rendezvous server itself is the `nettool-rendezvous` crate.)
//! - [`registry`]: strategies by name, each built from its own `[strategy.NAME]` table.
//! - [`strategy`]: the object-safe [`Strategy`] trait, the [`Link`] it produces and the
//!   [`Attempt`] context it runs in.
//! - [`secure`]: link security for every strategy: pinned per-attempt TLS certificates and the
//!   channel's exporter for binding; [`candidates`]: gathering this peer's addresses and
//!   validating the peer's (offers are untrusted).
//! - [`handshake`]: the link handshake that proves both ends of a raw link belong to the same
//!   session before any user data flows.
//! - [`orchestrator`]: runs strategies in order with timeouts and always produces a [`Report`].
//! - [`report`]: the JSON report of one connect.
//! - [`stun`]: a small STUN Binding codec with RFC 5780 attributes (UDP strategies learn their
//!   public mapping; the server answers).
//! - [`discovery`]: NAT behaviour discovery (RFC 5780 mapping/filtering, TCP mapping, hairpin)
//!   per address family, in bounded time: what `nettool netcheck` reports and the plan uses.
//! - [`plan`]: which strategies can work for two peers' NATs, and each attempt's timeout;
//!   [`nat_cache`]: discovery results cached per network.
//! - [`port_mapping`]: the [`PortMapping`](port_mapping::PortMapping) trait through which the
//!   orchestrator and the strategies map ports on the gateway (implemented by `nettool-portmap`),
//!   and the data of its reports.
//! - [`express`]: relay-first's express relay: the PAKE with the join, relay connections
//!   spliced at pairing, the link's record layer keyed from the PAKE.
//! - [`relay`]: the relay's wire format and the client's end of it (the server splices; the
//!   relay strategy lives with the others).

#![warn(missing_docs)]

pub mod candidates;
pub mod client;
pub mod code;
pub mod control;
pub mod discovery;
pub mod express;
pub mod handshake;
pub mod nat_cache;
pub mod orchestrator;
pub mod plan;
pub mod port_mapping;
pub mod protocol;
pub mod registry;
pub mod relay;
pub mod relay_first;
pub mod report;
pub mod secure;
pub mod session;
pub mod strategy;
pub mod stun;

pub use client::{ClientError, Pairing, RendezvousClient};
pub use handshake::{HandshakeError, LinkKey};
pub use orchestrator::{ConnectParams, Orchestrator};
pub use protocol::Role;
pub use registry::{StrategyFactory, StrategyRegistry};
pub use report::{AttemptReport, Outcome, PortMapReport, Report};
pub use strategy::{
    Attempt, Link, LinkStream, LinkStreams, MultiStream, Prepared, Strategy, StrategyError,
};
