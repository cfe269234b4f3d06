//! Short codes on the command line: `--code`, asking the server for one, what a wrong one
//! means, and the commands that take none.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use nettool_config::Settings;

use crate::{BadSettings, PeerArgs};

/// Commands that run many pairings of one session take no short code (a code links once).
pub(crate) fn no_code(peer: &PeerArgs, command: &str) -> Result<()> {
    if peer.code.is_some() {
        return Err(anyhow::Error::new(BadSettings(format!(
            "--code is for connect, expose and forward; {command} needs --session and --secret"
        ))));
    }
    Ok(())
}

/// Which side of a short code this peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CodeSide {
    /// It asked the server for the code and printed it.
    Owner,
    /// It was given the code (`--code`).
    Joiner,
}

/// Short codes: with `--code`, takes the session and secret from it; with no session, no
/// secret and no code, asks the server at `servers` for a nameplate, makes a code of it and
/// prints it with the command for the other side (`other_side`, e.g. `nettool connect`,
/// followed by the `--server`s and `--code`). `None`: a session and secret as before.
pub(crate) async fn use_code(
    peer: &PeerArgs,
    settings: &mut Settings,
    servers: &[SocketAddr],
    other_side: &str,
    suffix: &str,
) -> Result<Option<CodeSide>> {
    use nettool_core::code::Code;
    if let Some(text) = &peer.code {
        let code = Code::parse(text).map_err(|e| anyhow::Error::new(BadSettings(e.to_string())))?;
        settings.session = Some(code.session());
        settings.secret = Some(code.secret());
        return Ok(Some(CodeSide::Joiner));
    }
    if settings.session.is_some() || settings.secret.is_some() {
        return Ok(None);
    }
    let deadline = std::time::Instant::now() + settings.timeout.min(Duration::from_secs(15));
    let control = crate::servers::control(settings)?;
    let token = settings.server_token.as_deref();
    let code = nettool_peer::allocate_code(
        servers,
        &control,
        token,
        usize::from(peer.code_words),
        deadline,
    )
    .await
    .map_err(|e| match e {
        nettool_peer::PeerError::Settings(m) => anyhow::Error::new(BadSettings(m)),
        e => anyhow::Error::new(e),
    })?;
    let server_flags: Vec<String> = settings
        .server
        .iter()
        .map(|s| format!("--server {s}"))
        .collect();
    eprintln!("nettool: code: {code}");
    let suffix = if suffix.is_empty() {
        String::new()
    } else {
        format!(" {suffix}")
    };
    eprintln!(
        "nettool: on the other side run: {other_side} {} --code {code}{suffix}",
        server_flags.join(" ")
    );
    settings.session = Some(code.session());
    settings.secret = Some(code.secret());
    Ok(Some(CodeSide::Owner))
}

/// What a peer says when its connect ended on a wrong code (see [`CodeSide`]).
pub(crate) fn wrong_code_message(side: Option<CodeSide>) -> &'static str {
    match side {
        Some(CodeSide::Owner) => "someone tried a wrong code: start again",
        Some(CodeSide::Joiner) => {
            "wrong code: the other side refused it, and the code is burned now; ask for a new code"
        }
        None => "a key confirmation failed in a code session: the code is burned",
    }
}
