//! One module per subcommand: its flags and its entry point.

pub(crate) mod compare;
pub(crate) mod config;
pub(crate) mod connect;
pub(crate) mod demo;
pub(crate) mod expose;
pub(crate) mod forward;
pub(crate) mod netcheck;
pub(crate) mod plain_tcp;
pub(crate) mod rendezvous;
pub(crate) mod strategies;
