//! One module per subcommand (more to move here from `lib.rs`).

pub(crate) mod connect;
pub(crate) mod rendezvous;
