//! End-to-end tests: the real `nettool` binary over loopback and through the NAT lab.

mod bench;
mod birthday;
mod cluster;
mod codes;
mod control;
mod distance;
mod fallback;
mod forward;
mod ipv6;
mod lab;
mod legacy;
mod loopback;
mod nat_cache;
mod nat_punch;
mod nat_quic;
mod netcheck;
mod plugin;
mod portmap;
mod relay_first;
mod security;
mod session;
mod signals;
mod support;
