//! The link handshake: proves that both ends of a raw link belong to the same pairing of the
//! same session, before any user data flows.
//!
//! Both ends send a hello (magic, version, role, fresh nonce), then an HMAC-SHA256 over both
//! nonces, the pairing id, the strategy and the sender's role, keyed with the session key. A
//! stranger who reaches a punched port, a connection left over from an earlier pairing, or a
//! peer with another secret fails here and the connection is dropped.
//!
//! When a strategy ends up with several authenticated raw links (it dials many candidates), the
//! first peer picks one and sends [`SELECT`] on it; the second peer uses the link on which it
//! receives that byte. Both ends thus agree on one link.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::Role;

const MAGIC: &[u8; 4] = b"NTLK";
const VERSION: u8 = 1;
const HELLO_LEN: usize = 4 + 1 + 1 + 32;
const MAC_LEN: usize = 32;
/// Byte the first peer sends on the one link it picked.
pub const SELECT: u8 = 0x5e;

/// The key both peers derive from the session secret.
#[derive(Clone)]
pub struct LinkKey([u8; 32]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    /// Derives the key from a shared secret and the session name.
    pub fn derive(session: &str, secret: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"nettool link key v1\0");
        h.update((session.len() as u64).to_be_bytes());
        h.update(session.as_bytes());
        h.update(secret.as_bytes());
        Self(h.finalize().into())
    }

    /// HMAC-SHA256 keyed with this key over `label` and the length-prefixed `parts`: a tag
    /// that authenticates small messages outside the link handshake (e.g. UDP punch
    /// datagrams). Different labels give independent tags.
    pub fn tag(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(&(label.len() as u64).to_be_bytes());
        mac.update(label);
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

/// What both ends must agree on for a handshake to succeed.
#[derive(Debug, Clone)]
pub struct HandshakeContext {
    /// Key derived from the session secret.
    pub key: LinkKey,
    /// The pairing id the server issued.
    pub pair_id: String,
    /// The strategy that made the raw link.
    pub strategy: String,
    /// This end's role.
    pub role: Role,
    /// Channel binding: a value both ends derive from the secure channel the handshake runs
    /// over (a TLS keying-material exporter), so the proof cannot be relayed into another
    /// channel. Empty when the link has no secure channel below it.
    pub binding: Vec<u8>,
}

/// Why a link handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The raw link failed or closed during the handshake.
    #[error("link closed during handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The other end does not speak nettool's link protocol.
    #[error("not a nettool peer (bad hello)")]
    NotAPeer,
    /// The other end claims the same role as this end.
    #[error("the other end claims the same role")]
    SameRole,
    /// The other end's proof does not match: another session, pairing or secret.
    #[error("the other end failed authentication (wrong session, pairing or secret)")]
    BadProof,
    /// The first peer closed the link without selecting it.
    #[error("link not selected by the first peer")]
    NotSelected,
    /// The secure channel (TLS) below the handshake could not be set up: wrong certificate
    /// (not the one pinned in the offer), not TLS, or the connection failed.
    #[error("TLS failed: {0}")]
    Secure(std::io::Error),
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::First => 1,
        Role::Second => 2,
    }
}

fn proof(
    ctx: &HandshakeContext,
    nonce_first: &[u8],
    nonce_second: &[u8],
    sender: Role,
) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&ctx.key.0).expect("any key length");
    mac.update(b"nettool link proof v1\0");
    for part in [
        ctx.pair_id.as_bytes(),
        ctx.strategy.as_bytes(),
        nonce_first,
        nonce_second,
    ] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.update(&[role_byte(sender)]);
    mac
}

/// Runs the mutual proof on a raw link. Does not select: see [`select`] and [`await_select`].
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    ctx: &HandshakeContext,
) -> Result<(), HandshakeError> {
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.push(role_byte(ctx.role));
    hello.extend_from_slice(&nonce);
    stream.write_all(&hello).await?;
    stream.flush().await?;

    let mut theirs = [0u8; HELLO_LEN];
    stream.read_exact(&mut theirs).await?;
    if &theirs[..4] != MAGIC || theirs[4] != VERSION {
        return Err(HandshakeError::NotAPeer);
    }
    if theirs[5] != role_byte(ctx.role.other()) {
        return Err(HandshakeError::SameRole);
    }
    let their_nonce = &theirs[6..];
    let (nf, ns) = match ctx.role {
        Role::First => (&nonce[..], their_nonce),
        Role::Second => (their_nonce, &nonce[..]),
    };
    let mine = proof(ctx, nf, ns, ctx.role).finalize().into_bytes();
    stream.write_all(&mine).await?;
    stream.flush().await?;
    let mut their_mac = [0u8; MAC_LEN];
    stream.read_exact(&mut their_mac).await?;
    proof(ctx, nf, ns, ctx.role.other())
        .verify_slice(&their_mac)
        .map_err(|_| HandshakeError::BadProof)
}

/// The first peer: marks an authenticated link as the one both ends use.
pub async fn select<S: AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<()> {
    stream.write_all(&[SELECT]).await?;
    stream.flush().await
}

/// The second peer: waits until the first peer selects this authenticated link.
pub async fn await_select<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(), HandshakeError> {
    let mut b = [0u8; 1];
    match stream.read_exact(&mut b).await {
        Ok(_) if b[0] == SELECT => Ok(()),
        Ok(_) => Err(HandshakeError::NotAPeer),
        Err(_) => Err(HandshakeError::NotSelected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(role: Role, secret: &str) -> HandshakeContext {
        HandshakeContext {
            key: LinkKey::derive("demo", secret),
            pair_id: "p1".into(),
            strategy: "tcp-punch".into(),
            role,
            binding: Vec::new(),
        }
    }

    #[tokio::test]
    async fn matching_peers_authenticate() {
        let (first, second, _other) = (
            ctx(Role::First, "s"),
            ctx(Role::Second, "s"),
            ctx(Role::Second, "other"),
        );
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (ra, rb) = tokio::join!(authenticate(&mut a, &first), authenticate(&mut b, &second));
        ra.unwrap();
        rb.unwrap();
        let (sa, sb) = tokio::join!(select(&mut a), await_select(&mut b));
        sa.unwrap();
        sb.unwrap();
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_ends() {
        let (first, _second, other) = (
            ctx(Role::First, "s"),
            ctx(Role::Second, "s"),
            ctx(Role::Second, "other"),
        );
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (ra, rb) = tokio::join!(authenticate(&mut a, &first), authenticate(&mut b, &other));
        assert!(matches!(ra, Err(HandshakeError::BadProof)));
        assert!(matches!(rb, Err(HandshakeError::BadProof)));
    }

    #[tokio::test]
    async fn same_role_and_garbage_are_refused() {
        let first = ctx(Role::First, "s");
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (ra, _) = tokio::join!(authenticate(&mut a, &first), authenticate(&mut b, &first));
        assert!(matches!(ra, Err(HandshakeError::SameRole)));

        let (mut a, mut b) = tokio::io::duplex(4096);
        let stranger = async {
            b.write_all(&[b'G'; HELLO_LEN]).await.unwrap();
        };
        let (ra, ()) = tokio::join!(authenticate(&mut a, &first), stranger);
        assert!(matches!(ra, Err(HandshakeError::NotAPeer)));
    }
}
