//! The link handshake: proves that both ends of a raw link belong to the same pairing of the
//! same session and hold the same secret, inside the secure channel (TLS or QUIC) and bound to
//! it, before any user data flows.
//!
//! The proof is a password-authenticated key exchange (SPAKE2 over Ed25519, RustCrypto
//! `spake2`) on the session secret, followed by key confirmation:
//!
//! 1. Both ends send a hello: magic, version, role, a fresh nonce and their SPAKE2 message.
//!    The SPAKE2 message is blinded by the password: nothing in it lets an observer or the
//!    rendezvous server test guesses of the secret offline.
//! 2. Both derive the SPAKE2 key. The confirmation of each end is an HMAC keyed with that key
//!    over a transcript hash of: the pairing id, the strategy, the **channel binding** (the
//!    secure channel's keying-material exporter) and both hellos.
//! 3. The second peer sends its confirmation first. The first peer checks it **before** it
//!    sends its own (verify before reveal), and the second peer then checks the first's.
//!
//! Two TLS sessions spliced by a man in the middle (for example a rendezvous server that swaps
//! the certificate fingerprints in the offers) have two different exporters, so the
//! confirmations fail even when the attacker forwards every handshake byte. An attacker who
//! does not know the secret and runs the exchange itself gets one guess per attempt, and the
//! victim sees that attempt fail.
//!
//! **With a key already agreed** ([`AgreedKey`]: both joins carried a SPAKE2 message on the
//! same session secret and the server passed each to the other with the pairing), the
//! exchange needs no PAKE of its own and no answer. The links' certificates are then derived
//! from that key ([`crate::secure::Identity::derive`], checked right after the TLS or QUIC
//! handshake), so the second peer, the TLS client on these links, knows when its handshake is
//! done that the other end holds the key. Its hello (saying it holds the key) and its
//! confirmation (keyed with the agreed key, over the pairing, strategy, channel binding and
//! its hello) are its whole exchange, sent with its TLS Finished, and it selects the link and
//! may send data in that same flight. The first peer checks that confirmation and sends
//! nothing of its own. When the second peer holds no key, both run SPAKE2 as above (the first
//! peer, keyed or not, learns it from the second's hello); a keyed second peer meeting a first
//! peer without the key is refused ([`HandshakeError::KeyMismatch`]). The agreed key came from
//! a PAKE on the same password, so an attacker gets no guess here it did not get there.
//!
//! When a strategy ends up with several authenticated raw links (it dials many candidates), one
//! peer picks one and sends [`SELECT`] on it (the first peer after SPAKE2, the second after the
//! keyed exchange: [`authenticate`] says which); the other uses the link on which it receives
//! that byte. Both ends thus agree on one link.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::Role;

const MAGIC: &[u8; 4] = b"NTLK";
/// 5: keyed, the certificates below are derived from the [`AgreedKey`] and the second
/// peer's hello and confirmation are the whole exchange (it selects the link); 4: the hello
/// says whether its sender holds an agreed key (the keyed exchange, both confirming);
/// 3 carried the session layer ([`crate::session`]: acknowledged delivery, resume) with a
/// PAKE on every link; 2 carried bare bytes. The session protocol has its own version in its
/// HELLO.
const VERSION: u8 = 5;
const NONCE_LEN: usize = 32;
/// Length of a SPAKE2 message over Ed25519 (side byte + point).
const PAKE_MSG_LEN: usize = 33;
const HELLO_LEN: usize = 4 + 1 + 1 + 1 + NONCE_LEN + PAKE_MSG_LEN;
/// Offset of the hello's flags byte, and its bit for "holds an agreed key".
const FLAGS_AT: usize = 6;
const FLAG_KEYED: u8 = 1;
const MAC_LEN: usize = 32;
/// Byte the first peer sends on the one link it picked.
pub const SELECT: u8 = 0x5e;
/// SPAKE2 identities of the two roles.
const ID_FIRST: &[u8] = b"nettool link first";
const ID_SECOND: &[u8] = b"nettool link second";

/// The password both peers feed into the PAKE, derived from the session secret and the
/// session name. It never leaves the process in any form an observer could test guesses
/// against.
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
        h.update(b"nettool link key v2\0");
        h.update((session.len() as u64).to_be_bytes());
        h.update(session.as_bytes());
        h.update(secret.as_bytes());
        Self(h.finalize().into())
    }

    /// The key's bytes: the password of the express relay's PAKE ([`crate::express`]).
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A value only holders of this key can compute: HMAC-SHA256 keyed by it over `label`
    /// and `context` (the session layer's resume name and secret, [`crate::session`]).
    pub fn derive_labeled(&self, label: &str, context: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context);
        mac.finalize().into_bytes().into()
    }
}

/// Test-only switch that leaves the channel binding out of the confirmation, so the
/// man-in-the-middle tests can show that their attack succeeds without it. Compiled only with
/// the dev-only `insecure-test-switches` feature, which no released binary enables.
#[cfg(feature = "insecure-test-switches")]
pub mod insecure {
    use std::sync::atomic::{AtomicBool, Ordering};

    static BINDING_OFF: AtomicBool = AtomicBool::new(false);

    /// Turns channel binding off (`true`) or back on for every handshake in this process.
    pub fn set_binding_off(off: bool) {
        BINDING_OFF.store(off, Ordering::SeqCst);
    }

    pub(crate) fn binding_off() -> bool {
        BINDING_OFF.load(Ordering::SeqCst)
    }

    pub(crate) fn keyed_off() -> bool {
        super::KEYED_OFF
    }

    static KEYED_DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// How many link handshakes in this process finished with the agreed key (the keyed
    /// exchange), for the tests that show relay-first's direct links use it.
    pub fn keyed_handshakes() -> u64 {
        KEYED_DONE.load(Ordering::SeqCst)
    }

    pub(crate) fn note_keyed() {
        KEYED_DONE.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(not(feature = "insecure-test-switches"))]
mod insecure {
    pub(crate) fn binding_off() -> bool {
        false
    }

    pub(crate) fn keyed_off() -> bool {
        super::KEYED_OFF
    }

    pub(crate) fn note_keyed() {}
}

/// Whether the link handshake ignores an agreed key and always runs SPAKE2 (a test-only build,
/// to watch the tests that guard the shorter exchange go red): `NETTOOL_TEST_KEYED_OFF=1` at
/// compile time.
const KEYED_OFF: bool = option_env!("NETTOOL_TEST_KEYED_OFF").is_some();

/// One guess per code: shared by the handshakes of a code session's attempts (see
/// [`crate::code`]), it records that the peer's key confirmation failed. With a short code
/// that means a wrong code, so [`crate::strategy::agree_on_link`] stops at once and the
/// orchestrator tries no other strategy.
#[derive(Debug, Default)]
pub struct OneGuess {
    failed: std::sync::atomic::AtomicBool,
}

impl OneGuess {
    /// Records a failed key confirmation.
    pub fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a key confirmation failed.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
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
    /// channel. Must not be empty: a handshake without a secure channel below it is refused.
    pub binding: Vec<u8>,
    /// Set in a code session: a failed key confirmation ends the attempt at once and is
    /// recorded here (one guess per code). `None`: failures are logged and skipped.
    pub one_guess: Option<std::sync::Arc<OneGuess>>,
    /// A key both peers already agreed on for this connect (see the module docs), when both
    /// said they hold it: an exchange one flight shorter.
    pub agreed: Option<AgreedKey>,
}

/// A key the two peers of one connect already agreed on through a PAKE on the session secret
/// (the joins' PAKE messages, [`crate::express::ExpressStart::agreed_only`]): the link handshake's confirmations can
/// be keyed with it instead of running SPAKE2 again (and they fail when the two keys differ:
/// another secret, or someone else's PAKE message).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AgreedKey(pub(crate) [u8; 32]);

impl AgreedKey {
    /// The seed of the certificate `role` presents on a keyed link of `strategy` in the
    /// pairing `pair_id` ([`crate::secure::Identity::derive`]).
    pub(crate) fn certificate_seed(&self, pair_id: &str, strategy: &str, role: Role) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"nettool link certificate v1\0");
        for part in [pair_id.as_bytes(), strategy.as_bytes(), &[role_byte(role)]] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for AgreedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgreedKey(..)")
    }
}

/// Why a link handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The raw link failed or closed during the handshake.
    #[error("link closed during handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The other end does not speak nettool's link protocol (or another version of it).
    #[error("not a nettool peer (bad hello)")]
    NotAPeer,
    /// The other end is a nettool speaking another version of the link protocol.
    #[error(
        "the peer speaks nettool link protocol {theirs}, this nettool speaks {ours} \
         (3 and later carry the session layer: acknowledged delivery and resume; 4 keys the \
         handshake with relay-first's agreed key; 5 derives the links' certificates from it): update both sides to the same nettool"
    )]
    Version {
        /// The peer's version.
        theirs: u8,
        /// Ours.
        ours: u8,
    },
    /// The other end claims the same role as this end.
    #[error("the other end claims the same role")]
    SameRole,
    /// The other end's key confirmation does not match: another secret, session or pairing,
    /// or a man in the middle (the secure channels of the two ends differ).
    #[error(
        "the other end failed authentication (wrong secret, session or pairing, \
         or a man in the middle: the secure channel is not the peer's)"
    )]
    BadProof,
    /// The other end closed the link instead of confirming after it got our confirmation: it
    /// refused it (the first peer checks before it confirms).
    #[error(
        "the other end closed without confirming: our proof failed authentication on its side \
         (wrong secret, session or pairing, or a man in the middle) ({0})"
    )]
    PeerRefused(std::io::Error),
    /// The link has no secure channel to bind the proof to; nettool never accepts such a link.
    #[error("no secure channel below the link handshake (channel binding is empty)")]
    Unbound,
    /// The selecting peer closed the link without selecting it.
    #[error("link not selected by the peer")]
    NotSelected,
    /// The first peer holds no agreed key and the second does (the second's plan offer
    /// reached the first too late): no link between them, whatever the strategy.
    #[error(
        "the peer holds this connect's agreed key and this side does not (the plan offers \
         crossed a timeout): no link"
    )]
    KeyMismatch,
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

/// Hash over everything the two ends must agree on.
fn transcript(ctx: &HandshakeContext, hello_first: &[u8], hello_second: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"nettool link transcript v2\0");
    let binding: &[u8] = if insecure::binding_off() {
        b""
    } else {
        &ctx.binding
    };
    for part in [
        ctx.pair_id.as_bytes(),
        ctx.strategy.as_bytes(),
        binding,
        hello_first,
        hello_second,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The keyed exchange's transcript of the second peer's confirmation: everything both ends
/// agree on before the second peer has seen the first peer's hello (the channel binding makes
/// it unique to this secure channel).
fn keyed_transcript(ctx: &HandshakeContext, hello_second: &[u8]) -> [u8; 32] {
    transcript(ctx, b"keyed: the first hello follows", hello_second)
}

/// A keyed confirmation: HMAC under the agreed key, labelled apart from SPAKE2's.
fn keyed_mac(agreed: &AgreedKey, transcript: &[u8; 32], sender: Role) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&agreed.0).expect("any key length");
    mac.update(b"nettool link keyed confirm v1\0");
    mac.update(transcript);
    mac.update(&[role_byte(sender)]);
    mac
}

fn keyed_confirmation(agreed: &AgreedKey, transcript: &[u8; 32], sender: Role) -> [u8; MAC_LEN] {
    keyed_mac(agreed, transcript, sender)
        .finalize()
        .into_bytes()
        .into()
}

fn keyed_check(
    agreed: &AgreedKey,
    transcript: &[u8; 32],
    sender: Role,
    their_mac: &[u8],
) -> Result<(), HandshakeError> {
    keyed_mac(agreed, transcript, sender)
        .verify_slice(their_mac)
        .map_err(|_| HandshakeError::BadProof)
}

fn confirmation(pake_key: &[u8], transcript: &[u8; 32], sender: Role) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(pake_key).expect("any key length");
    mac.update(b"nettool link confirm v2\0");
    mac.update(transcript);
    mac.update(&[role_byte(sender)]);
    mac
}

/// Runs the mutual proof on a raw link (inside its secure channel). Does not select: see
/// [`select`] and [`await_select`]; returns the role that selects (the second peer after the
/// keyed exchange, the first after SPAKE2).
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    ctx: &HandshakeContext,
) -> Result<Role, HandshakeError> {
    if ctx.binding.is_empty() {
        return Err(HandshakeError::Unbound);
    }
    let password = Password::new(ctx.key.0);
    let (id_first, id_second) = (Identity::new(ID_FIRST), Identity::new(ID_SECOND));
    let (pake, pake_msg) = match ctx.role {
        Role::First => Spake2::<Ed25519Group>::start_a(&password, &id_first, &id_second),
        Role::Second => Spake2::<Ed25519Group>::start_b(&password, &id_first, &id_second),
    };
    debug_assert_eq!(pake_msg.len(), PAKE_MSG_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let agreed = ctx.agreed.filter(|_| !insecure::keyed_off());
    let mut hello = Vec::with_capacity(HELLO_LEN + MAC_LEN);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.push(role_byte(ctx.role));
    hello.push(if agreed.is_some() { FLAG_KEYED } else { 0 });
    hello.extend_from_slice(&nonce);
    hello.extend_from_slice(&pake_msg);

    let theirs = match (agreed, ctx.role) {
        // Keyed, the second peer's hello and confirmation are the whole exchange: its TLS
        // already proved that the first peer holds the key (the certificates are derived
        // from it), so it expects no answer and selects the link right behind them.
        (Some(k), Role::Second) => {
            let t = keyed_transcript(ctx, &hello);
            hello.extend_from_slice(&keyed_confirmation(&k, &t, Role::Second));
            stream.write_all(&hello).await?;
            stream.flush().await?;
            insecure::note_keyed();
            return Ok(Role::Second);
        }
        // The keyed first peer speaks only when the second turns out to hold no key.
        (Some(k), Role::First) => {
            let theirs = read_hello(stream, ctx).await?;
            if theirs[FLAGS_AT] & FLAG_KEYED != 0 {
                let mut their_mac = [0u8; MAC_LEN];
                stream.read_exact(&mut their_mac).await?;
                keyed_check(
                    &k,
                    &keyed_transcript(ctx, &theirs),
                    Role::Second,
                    &their_mac,
                )?;
                insecure::note_keyed();
                return Ok(Role::Second);
            }
            stream.write_all(&hello).await?;
            stream.flush().await?;
            theirs
        }
        (None, _) => {
            stream.write_all(&hello).await?;
            stream.flush().await?;
            let theirs = read_hello(stream, ctx).await?;
            if theirs[FLAGS_AT] & FLAG_KEYED != 0 && ctx.role == Role::First {
                // A keyed second peer sent its confirmation and waits for nothing.
                return Err(HandshakeError::KeyMismatch);
            }
            theirs
        }
    };

    // SPAKE2 on the link.
    let pake_key = pake
        .finish(&theirs[FLAGS_AT + 1 + NONCE_LEN..])
        .map_err(|_| HandshakeError::NotAPeer)?;
    let (hello_first, hello_second) = match ctx.role {
        Role::First => (&hello[..], &theirs[..]),
        Role::Second => (&theirs[..], &hello[..]),
    };
    let transcript = transcript(ctx, hello_first, hello_second);
    let mine = confirmation(&pake_key, &transcript, ctx.role)
        .finalize()
        .into_bytes();
    let check = |their_mac: &[u8]| {
        confirmation(&pake_key, &transcript, ctx.role.other())
            .verify_slice(their_mac)
            .map_err(|_| HandshakeError::BadProof)
    };
    let mut their_mac = [0u8; MAC_LEN];
    match ctx.role {
        // Verify before reveal: the first peer only confirms to a peer that has proved itself.
        Role::First => {
            stream.read_exact(&mut their_mac).await?;
            check(&their_mac)?;
            stream.write_all(&mine).await?;
            stream.flush().await?;
        }
        Role::Second => {
            stream.write_all(&mine).await?;
            stream.flush().await?;
            stream
                .read_exact(&mut their_mac)
                .await
                .map_err(HandshakeError::PeerRefused)?;
            check(&their_mac)?;
        }
    }
    Ok(Role::First)
}

/// The peer's hello, checked for magic, version and role.
async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    ctx: &HandshakeContext,
) -> Result<[u8; HELLO_LEN], HandshakeError> {
    let mut theirs = [0u8; HELLO_LEN];
    stream.read_exact(&mut theirs[..6]).await?;
    if &theirs[..4] != MAGIC {
        return Err(HandshakeError::NotAPeer);
    }
    if theirs[4] != VERSION {
        return Err(HandshakeError::Version {
            theirs: theirs[4],
            ours: VERSION,
        });
    }
    if theirs[5] != role_byte(ctx.role.other()) {
        return Err(HandshakeError::SameRole);
    }
    stream.read_exact(&mut theirs[6..]).await?;
    Ok(theirs)
}

/// The selecting peer ([`authenticate`] says which): marks an authenticated link as the one
/// both ends use.
pub async fn select<S: AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<()> {
    stream.write_all(&[SELECT]).await?;
    stream.flush().await
}

/// The other peer: waits until the selecting peer selects this authenticated link.
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
    use std::time::Duration;

    fn ctx(role: Role, secret: &str) -> HandshakeContext {
        HandshakeContext {
            key: LinkKey::derive("demo", secret),
            pair_id: "p1".into(),
            strategy: "tcp-punch".into(),
            role,
            binding: vec![7; 32],
            one_guess: None,
            agreed: None,
        }
    }

    fn keyed(role: Role, key: u8) -> HandshakeContext {
        HandshakeContext {
            agreed: Some(AgreedKey([key; 32])),
            ..ctx(role, "s")
        }
    }

    /// Runs both ends; each end drops its stream when its handshake ends, as a strategy does.
    async fn run_pair(
        first: &HandshakeContext,
        second: &HandshakeContext,
    ) -> (Result<Role, HandshakeError>, Result<Role, HandshakeError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        tokio::join!(
            async move {
                let r = authenticate(&mut a, first).await;
                drop(a);
                r
            },
            async move {
                let r = authenticate(&mut b, second).await;
                drop(b);
                r
            }
        )
    }

    /// Both ends authenticate and agree on who selects; it selects the link and the other
    /// sees it. Returns the role that selected.
    async fn authenticate_and_select(first: &HandshakeContext, second: &HandshakeContext) -> Role {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (ra, rb) = tokio::join!(authenticate(&mut a, first), authenticate(&mut b, second));
        let (selects, also) = (ra.unwrap(), rb.unwrap());
        assert_eq!(selects, also, "both ends agree on who selects");
        let (picker, other) = match selects {
            Role::First => (&mut a, &mut b),
            Role::Second => (&mut b, &mut a),
        };
        let (sa, sb) = tokio::join!(select(picker), await_select(other));
        sa.unwrap();
        sb.unwrap();
        selects
    }

    #[tokio::test]
    async fn matching_peers_authenticate() {
        let selects =
            authenticate_and_select(&ctx(Role::First, "s"), &ctx(Role::Second, "s")).await;
        assert_eq!(selects, Role::First, "after SPAKE2 the first peer selects");
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_ends() {
        let (first, other) = (ctx(Role::First, "s"), ctx(Role::Second, "other"));
        let (ra, rb) = run_pair(&first, &other).await;
        assert!(matches!(ra, Err(HandshakeError::BadProof)), "{ra:?}");
        // The first peer never confirmed: the second sees it refuse.
        assert!(matches!(rb, Err(HandshakeError::PeerRefused(_))), "{rb:?}");
    }

    #[tokio::test]
    async fn different_channels_are_refused() {
        // What a man in the middle produces: the same secret on both ends, but two TLS
        // sessions, so two different exporters.
        let first = ctx(Role::First, "s");
        let mut second = ctx(Role::Second, "s");
        second.binding = vec![8; 32];
        let (ra, rb) = run_pair(&first, &second).await;
        assert!(matches!(ra, Err(HandshakeError::BadProof)), "{ra:?}");
        assert!(rb.is_err(), "{rb:?}");
    }

    #[tokio::test]
    async fn a_link_without_a_secure_channel_is_refused() {
        let mut first = ctx(Role::First, "s");
        first.binding.clear();
        let (mut a, _b) = tokio::io::duplex(4096);
        let r = authenticate(&mut a, &first).await;
        assert!(matches!(r, Err(HandshakeError::Unbound)), "{r:?}");
    }

    #[tokio::test]
    async fn the_first_peer_verifies_before_it_reveals() {
        // An impostor in the second role that guessed the secret wrong sends a well-formed
        // hello and a confirmation. The first peer must refuse it without ever sending its
        // own confirmation: all the impostor gets is the first peer's hello.
        let first = ctx(Role::First, "s");
        let impostor = ctx(Role::Second, "guess");
        let (mut a, mut b) = tokio::io::duplex(4096);
        let attacker = async move {
            let password = Password::new(impostor.key.0);
            let (_, msg) = Spake2::<Ed25519Group>::start_b(
                &password,
                &Identity::new(ID_FIRST),
                &Identity::new(ID_SECOND),
            );
            let mut hello = Vec::new();
            hello.extend_from_slice(MAGIC);
            hello.push(VERSION);
            hello.push(2);
            hello.push(0);
            hello.extend_from_slice(&[1; NONCE_LEN]);
            hello.extend_from_slice(&msg);
            b.write_all(&hello).await.unwrap();
            b.write_all(&[0x55; MAC_LEN]).await.unwrap();
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        };
        let (ra, got) = tokio::join!(
            async move {
                let r = authenticate(&mut a, &first).await;
                drop(a);
                r
            },
            attacker
        );
        assert!(matches!(ra, Err(HandshakeError::BadProof)), "{ra:?}");
        assert_eq!(
            got.len(),
            HELLO_LEN,
            "only the hello may reach an unproven peer"
        );
    }

    #[tokio::test]
    async fn peers_holding_the_agreed_key_authenticate_and_select() {
        let selects =
            authenticate_and_select(&keyed(Role::First, 1), &keyed(Role::Second, 1)).await;
        assert_eq!(selects, Role::Second, "keyed, the second peer selects");
    }

    /// The round trip the keyed exchange saves: the second peer's hello and confirmation are
    /// its whole exchange, out before anything came from the first peer, and it is done
    /// without waiting for an answer (its TLS, whose certificates are derived from the key,
    /// already authenticated the first peer). Its link may carry data right behind them.
    #[tokio::test]
    async fn the_keyed_second_peer_is_done_in_one_flight_and_waits_for_nothing() {
        let second = keyed(Role::Second, 1);
        let first = keyed(Role::First, 1);
        let (mut a, mut b) = tokio::io::duplex(4096);
        // The first peer's end stays open and silent until the second is done.
        let selects = tokio::time::timeout(Duration::from_secs(5), authenticate(&mut b, &second))
            .await
            .expect("the keyed second peer waits for nothing")
            .unwrap();
        assert_eq!(selects, Role::Second);
        let mut flight = vec![0u8; HELLO_LEN + MAC_LEN];
        a.read_exact(&mut flight).await.unwrap();
        let (theirs, mac) = flight.split_at(HELLO_LEN);
        keyed_check(
            &first.agreed.unwrap(),
            &keyed_transcript(&first, theirs),
            Role::Second,
            mac,
        )
        .unwrap();
    }

    /// A keyed first peer refuses another key's confirmation having sent nothing at all.
    #[tokio::test]
    async fn another_agreed_key_is_refused_and_the_first_peer_sends_nothing() {
        for second in [keyed(Role::Second, 2), {
            // The right key over another channel (a man in the middle's second TLS).
            let mut other = keyed(Role::Second, 1);
            other.binding = vec![8; 32];
            other
        }] {
            let first = keyed(Role::First, 1);
            let (mut a, mut b) = tokio::io::duplex(4096);
            let (ra, rb) = tokio::join!(
                async move {
                    let r = authenticate(&mut a, &first).await;
                    drop(a);
                    r
                },
                async move {
                    let r = authenticate(&mut b, &second).await;
                    let mut got = Vec::new();
                    b.read_to_end(&mut got).await.unwrap();
                    (r, got)
                }
            );
            assert!(matches!(ra, Err(HandshakeError::BadProof)), "{ra:?}");
            let (rb, got) = rb;
            assert!(rb.is_ok(), "the second peer relies on its TLS: {rb:?}");
            assert!(got.is_empty(), "the first peer sent {} bytes", got.len());
        }
    }

    #[tokio::test]
    async fn a_keyed_first_peer_runs_spake2_with_a_second_peer_without_the_key() {
        let selects =
            authenticate_and_select(&keyed(Role::First, 1), &ctx(Role::Second, "s")).await;
        assert_eq!(selects, Role::First);
        // And then the secret still decides.
        let (ra, _) = run_pair(&keyed(Role::First, 1), &ctx(Role::Second, "other")).await;
        assert!(matches!(ra, Err(HandshakeError::BadProof)), "{ra:?}");
        // A keyed second peer with a first peer without the key: no link, and a clear error
        // (the second peer waited for nothing; its TLS role did not match either).
        let (ra, _) = run_pair(&ctx(Role::First, "s"), &keyed(Role::Second, 1)).await;
        assert!(matches!(ra, Err(HandshakeError::KeyMismatch)), "{ra:?}");
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

    #[tokio::test]
    async fn an_older_peer_gets_a_clear_version_error() {
        // A nettool of link protocol 2 (bare bytes after the handshake, no session layer).
        let first = ctx(Role::First, "s");
        let (mut a, mut b) = tokio::io::duplex(4096);
        let older = async {
            let mut hello = vec![0u8; HELLO_LEN];
            hello[..4].copy_from_slice(MAGIC);
            hello[4] = 2;
            hello[5] = 2;
            b.write_all(&hello).await.unwrap();
        };
        let (ra, ()) = tokio::join!(authenticate(&mut a, &first), older);
        let e = ra.expect_err("another version must be refused");
        assert!(
            matches!(e, HandshakeError::Version { theirs: 2, ours: 5 }),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("link protocol 2") && text.contains("update both sides"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_wire_carries_nothing_to_test_guesses_against() {
        // Two handshakes with the same secret: apart from the fixed header, the hellos share
        // nothing (fresh nonces, fresh SPAKE2 scalars), so an observer has no password-derived
        // value to test guesses against. (The confirmations are keyed with the PAKE key, which
        // an observer cannot compute.)
        let mut hellos = Vec::new();
        for _ in 0..2 {
            let (mut a, mut b) = tokio::io::duplex(4096);
            let first = ctx(Role::First, "s");
            let (_, got) = tokio::join!(
                async move {
                    let _ = authenticate(&mut a, &first).await;
                },
                async move {
                    let mut buf = vec![0u8; HELLO_LEN];
                    b.read_exact(&mut buf).await.unwrap();
                    drop(b);
                    buf
                }
            );
            hellos.push(got);
        }
        assert_eq!(hellos[0][..6], hellos[1][..6]);
        assert_ne!(hellos[0][6 + NONCE_LEN..], hellos[1][6 + NONCE_LEN..]);
    }
}
