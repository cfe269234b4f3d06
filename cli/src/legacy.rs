//! The original demo's 8877 text protocol and its hello-world exchange. (Being written.)

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use nettool_core::{Link, Role};

/// `nettool rendezvous --legacy`: serves the original protocol on `listen`.
pub(crate) async fn serve(listen: SocketAddr) -> Result<i32> {
    bail!("--legacy is not implemented yet (would listen on {listen})")
}

/// `nettool connect --legacy`: one original-protocol client that punches properly.
pub(crate) async fn connect(server: SocketAddr, hello: bool, timeout: Duration) -> Result<i32> {
    bail!("--legacy is not implemented yet ({server}, hello {hello}, {timeout:?})")
}

/// `--hello`: the first peer sends "Hello, world\n\0" once a second, the second prints each.
pub(crate) async fn hello(link: Link, role: Role) -> Result<i32> {
    bail!("--hello is not implemented yet ({link:?}, {role})")
}
