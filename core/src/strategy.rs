//! The [`Strategy`] trait, the [`Link`] a strategy produces and the [`Attempt`] it runs in.
//!
//! A strategy is one way of getting a raw link between the two peers (TCP simultaneous open,
//! listen/dial, UDP + QUIC, relay). It owns its sockets; the core only sees the finished,
//! authenticated [`Link`]. Strategies are stored as `Arc<dyn Strategy>` and built from config
//! by one function in `nettool-strategies`.

use std::any::Any;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::client::{ClientError, Pairing, RendezvousClient};
use crate::handshake::{self, HandshakeContext, HandshakeError, LinkKey};
use crate::protocol::Role;
use crate::secure::{fingerprint_hex, parse_fingerprint, Identity, LinkTls, PeerPin};

/// A byte stream a link runs over.
pub trait LinkStream: AsyncRead + AsyncWrite + Unpin + Send + Any {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> LinkStream for T {}

/// More byte streams on the same authenticated connection as a link (QUIC's own streams),
/// each with its own flow control. Get it with [`Link::streams`]; a link that has it was
/// built with a [`MultiStream`] as its stream.
pub trait LinkStreams: Send + Sync + 'static {
    /// Opens a new stream to the peer. The peer sees it once something is written on it.
    fn open(&self) -> BoxFuture<'_, std::io::Result<Box<dyn LinkStream>>>;
    /// The next stream the peer opened; `None` when the connection ended normally.
    fn accept(&self) -> BoxFuture<'_, std::io::Result<Option<Box<dyn LinkStream>>>>;
}

/// A link's main stream together with the connection's further streams ([`LinkStreams`]).
/// Reads and writes go to the main stream.
pub struct MultiStream {
    main: Box<dyn LinkStream>,
    streams: Arc<dyn LinkStreams>,
}

impl MultiStream {
    /// `main` is the stream the link handshake ran on; `streams` opens and accepts more.
    pub fn new(main: impl LinkStream, streams: Arc<dyn LinkStreams>) -> Self {
        Self {
            main: Box::new(main),
            streams,
        }
    }
}

impl std::fmt::Debug for MultiStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiStream").finish_non_exhaustive()
    }
}

impl AsyncRead for MultiStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.main).poll_read(cx, buf)
    }
}

impl AsyncWrite for MultiStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.main).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.main).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.main).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.main).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.main.is_write_vectored()
    }
}

/// An authenticated link to the peer.
pub struct Link {
    /// The stream; user data flows here.
    pub stream: Box<dyn LinkStream>,
    /// This end's address of the link.
    pub local: SocketAddr,
    /// The peer's address of the link as seen from here.
    pub remote: SocketAddr,
    /// The strategy that made it.
    pub strategy: &'static str,
}

impl Link {
    /// The link's further streams, when its transport has its own (udp-quic): each carries
    /// its own flow control. `None` for links that are a single byte stream (TCP, relay).
    pub fn streams(&self) -> Option<Arc<dyn LinkStreams>> {
        let any: &dyn Any = &*self.stream;
        any.downcast_ref::<MultiStream>().map(|m| m.streams.clone())
    }

    /// The peer's key confirmation still to come, for an express relay link (its
    /// confirmation rides with the first data, [`crate::express`]); `None` for links whose
    /// handshake finished before they were handed out.
    pub fn confirmation(&self) -> Option<crate::express::Confirmation> {
        let any: &dyn Any = &*self.stream;
        any.downcast_ref::<crate::express::SealedStream<crate::relay::RelayStream>>()
            .map(|s| s.confirmation())
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

/// Why a strategy produced no link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StrategyError {
    /// Talking to the rendezvous server failed (the peer's offer never came, the server left).
    #[error(transparent)]
    Rendezvous(#[from] ClientError),
    /// A local socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The peer's offer could not be understood.
    #[error("bad offer from the peer: {0}")]
    BadOffer(String),
    /// No authenticated link was made, and nothing more can be tried.
    #[error("{0}")]
    NoLink(String),
    /// The attempt's deadline passed; the text says what was tried and how it failed.
    #[error("{0}")]
    TimedOut(String),
}

impl StrategyError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// A strategy's narrow view of the control connection: it can exchange its own offer with the
/// peer, and nothing else. Results (the lock step) belong to the orchestrator.
///
/// An attempt started at the pairing with both peers' offers from their joins has none
/// ([`Offers::without_channel`]): it needs no exchange, and the control connection is busy
/// with the plan offers meanwhile.
#[derive(Debug)]
pub struct Offers<'a> {
    client: Option<&'a mut RendezvousClient>,
    servers: Vec<SocketAddr>,
    strategy: &'a str,
}

impl<'a> Offers<'a> {
    /// The offer channel of one attempt with `strategy`.
    pub fn new(client: &'a mut RendezvousClient, strategy: &'a str) -> Self {
        let servers = client.servers();
        Self {
            client: Some(client),
            servers,
            strategy,
        }
    }

    /// For an attempt that has the peer's offer already and exchanges none: knows the
    /// server's addresses (`servers`, the control connection's first), and refuses to
    /// exchange offers.
    pub fn without_channel(servers: Vec<SocketAddr>, strategy: &'a str) -> Self {
        Self {
            client: None,
            servers,
            strategy,
        }
    }

    /// The rendezvous server's address (its STUN, observe and relay endpoints are here).
    pub fn server(&self) -> SocketAddr {
        self.servers[0]
    }

    /// The server's addresses this peer reached it on, one per IP family (the control
    /// connection's first): gather candidates of each family by observing (TCP) or asking
    /// STUN (UDP) at the address of that family. Validate the peer's candidates of these
    /// families with [`crate::candidates::peer_candidates_all`].
    pub fn servers(&self) -> Vec<SocketAddr> {
        self.servers.clone()
    }

    /// Sends this peer's offer and waits for the peer's (the server delivers both at the same
    /// moment). The offer is untrusted input: validate what it says (see
    /// [`crate::candidates::peer_candidates`]). `strategy` must be this attempt's strategy.
    pub async fn exchange_offer(
        &mut self,
        strategy: &str,
        payload: serde_json::Value,
        deadline: Instant,
    ) -> Result<serde_json::Value, StrategyError> {
        if strategy != self.strategy {
            return Err(StrategyError::BadOffer(format!(
                "an attempt with {} cannot exchange offers for {strategy}",
                self.strategy
            )));
        }
        let Some(client) = self.client.as_mut() else {
            return Err(StrategyError::NoLink(format!(
                "{strategy} started at the pairing with the offers from the joins and has \
                 no offer channel: it cannot exchange offers"
            )));
        };
        Ok(client.exchange_offer(strategy, payload, deadline).await?)
    }

    /// Sends this peer's offer for this attempt's strategy without waiting for the peer's
    /// (a copy for a peer that fetches it; see [`Attempt::prepared_offers`]). A failure to
    /// queue it is logged: the connection is gone, which the attempt finds out by itself.
    /// Without a channel the peer has this side's offer from its join: nothing is sent.
    fn send_offer(&self, strategy: &str, payload: serde_json::Value) {
        let Some(client) = &self.client else {
            return;
        };
        if let Err(e) = client.send_offer(strategy, payload) {
            debug!("could not send the offer's copy: {e}");
        }
    }
}

/// Everything a strategy needs for one attempt.
#[derive(Debug)]
pub struct Attempt<'a> {
    /// The session name.
    pub session: &'a str,
    /// What the server said when pairing.
    pub pairing: &'a Pairing,
    /// Key derived from the session secret.
    pub key: &'a LinkKey,
    /// The control connection, narrowed to this attempt's offers.
    pub rendezvous: Offers<'a>,
    /// Round-trip time to the rendezvous server, measured after pairing.
    pub server_rtt: Duration,
    /// When this attempt must be over.
    pub deadline: Instant,
    /// Both peers' NAT behaviour (this side's, the peer's) when the plan knows them.
    pub nat: Option<(crate::plan::NatSummary, crate::plan::NatSummary)>,
    /// What the strategy reports about how it ran (its mode), for the attempt's report entry.
    pub notes: &'a mut AttemptNotes,
    /// The gateway's port mapper, when port mapping is on and a gateway answered; see
    /// [`Attempt::map_port`].
    pub portmap: Option<&'a dyn crate::port_mapping::PortMapping>,
    /// Set in a code session (see [`HandshakeContext::one_guess`]).
    pub one_guess: Option<Arc<handshake::OneGuess>>,
    /// A key both peers hold and said so in their plan offers (see
    /// [`HandshakeContext::agreed`] and [`Attempt::tls_role`]).
    pub agreed: Option<handshake::AgreedKey>,
    /// What this strategy prepared before pairing, and the peer's prepared offer when it came
    /// with the peer's plan offer: see [`Attempt::prepared_offers`].
    pub early: Option<Early>,
}

/// What a strategy made ready before the peers were paired ([`Strategy::prepare`]): its offer
/// and what stands behind it (ports bound, observed and held), so the offer travels with the
/// plan offer and the attempt needs no offer round trip and no observation of its own.
pub struct Prepared {
    /// The server addresses it was made against (one per family, as [`Offers::servers`]);
    /// it is used only for an attempt on exactly these.
    pub servers: Vec<SocketAddr>,
    /// The offer, a JSON object (the certificate fingerprint is added to it).
    pub offer: serde_json::Value,
    /// What the attempt needs of it, taken back with [`Attempt::prepared_offers`].
    pub state: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("servers", &self.servers)
            .field("offer", &self.offer)
            .finish_non_exhaustive()
    }
}

/// A [`Prepared`] with the certificate its offer names: ready to be sent.
#[derive(Debug)]
pub struct Ready {
    prepared: Prepared,
    identity: Identity,
    made: Instant,
}

impl Ready {
    /// Adds a fresh certificate's fingerprint to the prepared offer.
    pub fn new(mut prepared: Prepared) -> Result<Self, StrategyError> {
        let identity = Identity::generate()?;
        let serde_json::Value::Object(map) = &mut prepared.offer else {
            return Err(StrategyError::BadOffer(
                "an offer must be a JSON object".into(),
            ));
        };
        map.insert(
            "fingerprint".into(),
            serde_json::Value::String(fingerprint_hex(&identity.fingerprint)),
        );
        Ok(Self {
            prepared,
            identity,
            made: Instant::now(),
        })
    }

    /// The offer as sent (certificate fingerprint included).
    pub fn offer(&self) -> &serde_json::Value {
        &self.prepared.offer
    }

    /// The server addresses it was made against.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.prepared.servers
    }

    /// When it was made.
    pub fn made(&self) -> Instant {
        self.made
    }
}

/// An attempt's prepared state ([`Ready`]) and the peer's prepared offer, when that came with
/// the peer's plan offer.
#[derive(Debug)]
pub struct Early {
    /// This side's.
    pub ready: Ready,
    /// The peer's prepared offer for this strategy (untrusted, checked like any offer).
    pub theirs: Option<serde_json::Value>,
}

/// What a strategy says about how an attempt ran; copied into its report entry.
#[derive(Debug, Default, Clone)]
pub struct AttemptNotes {
    /// The mode it ran in, when it has several (`birthday`).
    pub mode: Option<String>,
    /// Probes sent or received in that mode.
    pub probes: Option<u64>,
}

/// What [`Attempt::exchange_secure_offers`] returns: this attempt's certificate, the peer's
/// pinned fingerprint and the rest of the peer's offer.
#[derive(Debug)]
pub struct SecureOffers<T> {
    /// This peer's certificate for the attempt.
    pub identity: Identity,
    /// The certificate the peer will present: pin it ([`LinkTls`], or
    /// [`crate::secure::client_tls`] / [`crate::secure::server_tls`] and, for a derived one,
    /// [`PeerPin::check`] after the handshake).
    pub peer: PeerPin,
    /// The peer's offer (without the fingerprint). Untrusted: validate its addresses with
    /// [`crate::candidates::peer_candidates`].
    pub theirs: T,
}

impl<T> SecureOffers<T> {
    /// TLS for the raw streams of this attempt (the first peer is the TLS client), pinned
    /// both ways.
    pub fn link_tls(&self, role: Role) -> Result<LinkTls, StrategyError> {
        LinkTls::new(role, &self.identity, self.peer)
    }
}

impl Attempt<'_> {
    /// Maps `local_port` on the gateway when port mapping is on and a gateway answered:
    /// the external address to advertise (first) among the candidates. The mapping is renewed
    /// while the link lasts and deleted when the attempt fails or the caller releases it.
    /// `None` (logged) when mapping is off or the gateway refused.
    pub async fn map_port(
        &self,
        transport: crate::port_mapping::Transport,
        local_port: u16,
    ) -> Option<std::net::SocketAddr> {
        let mapper = self.portmap?;
        match mapper.map(transport, local_port).await {
            Ok(m) => Some(m.external),
            Err(e) => {
                tracing::info!("port mapping: {e}");
                None
            }
        }
    }

    /// The role this peer takes in the links' TLS ([`crate::secure::LinkTls`]: the first is
    /// the client): its pairing role, swapped when both peers hold an agreed key. Keyed, the
    /// second peer's proof goes first ([`crate::handshake`]), so it is the TLS client: its
    /// proof then rides with its TLS Finished, and the first peer, which checks it before it
    /// selects the link, has it half a round trip after its own TLS is done instead of one
    /// and a half.
    pub fn tls_role(&self) -> Role {
        match self.agreed {
            Some(_) => self.pairing.role.other(),
            None => self.pairing.role,
        }
    }

    /// This peer's role.
    pub fn role(&self) -> Role {
        self.pairing.role
    }

    /// The common start of every strategy's attempt: a fresh certificate, this peer's offer
    /// (a JSON object, to which its certificate's `fingerprint` is added) exchanged for the
    /// peer's, whose `fingerprint` is taken out and the rest deserialized as `T`.
    pub async fn exchange_secure_offers<T: serde::de::DeserializeOwned>(
        &mut self,
        strategy: &str,
        mut offer: serde_json::Value,
    ) -> Result<SecureOffers<T>, StrategyError> {
        let identity = match self.derived(strategy, self.pairing.role) {
            Some(derived) => derived?,
            None => Identity::generate()?,
        };
        let serde_json::Value::Object(map) = &mut offer else {
            return Err(StrategyError::BadOffer(
                "an offer must be a JSON object".into(),
            ));
        };
        map.insert(
            "fingerprint".into(),
            serde_json::Value::String(fingerprint_hex(&identity.fingerprint)),
        );
        let theirs = self
            .rendezvous
            .exchange_offer(strategy, offer, self.deadline)
            .await?;
        self.secure_offers(strategy, identity, theirs)
    }

    /// The state this attempt's strategy prepared before pairing ([`Strategy::prepare`]) and
    /// the secure offers for it: the peer's offer as it came with the peer's plan offer, or
    /// (when it did not) exchanged now with the prepared offer. `None` when nothing usable
    /// was prepared (none, made against other server addresses, or of another type): the
    /// strategy then opens its ports and calls [`Self::exchange_secure_offers`] as without.
    ///
    /// With the peer's offer at hand this side still sends its own over the control
    /// connection, without waiting: a peer that missed this side's plan offer (its wait ran
    /// out) fetches it there, and a peer that has it ignores the copy.
    pub async fn prepared_offers<S: Any + Send + Sync, T: serde::de::DeserializeOwned>(
        &mut self,
        strategy: &str,
    ) -> Option<Result<(S, SecureOffers<T>), StrategyError>> {
        let early = self.early.take()?;
        if early.ready.prepared.servers != self.rendezvous.servers() {
            debug!("the prepared offer was made for other server addresses: not used");
            return None;
        }
        let Ready {
            prepared, identity, ..
        } = early.ready;
        // Made before the pairing, when no key was agreed yet.
        let identity = match self.derived(strategy, self.pairing.role) {
            Some(Ok(derived)) => derived,
            Some(Err(e)) => return Some(Err(e)),
            None => identity,
        };
        let state = match prepared.state.downcast::<S>() {
            Ok(s) => *s,
            Err(_) => {
                warn!("a prepared state of the wrong type: not used");
                return None;
            }
        };
        let theirs = match early.theirs {
            Some(theirs) => {
                self.rendezvous.send_offer(strategy, prepared.offer);
                Ok(theirs)
            }
            None => {
                self.rendezvous
                    .exchange_offer(strategy, prepared.offer, self.deadline)
                    .await
            }
        };
        Some(theirs.and_then(|t| {
            self.secure_offers(strategy, identity, t)
                .map(|o| (state, o))
        }))
    }

    /// The peer's offer with its certificate fingerprint taken out, and the certificate the
    /// attempt's TLS pins: keyed, the one derived for the peer ([`Self::derived`]), and the
    /// offers' fingerprints (which the server relays, and could swap) are not used: the TLS
    /// handshake itself then proves that the other end holds the key, so the second peer may
    /// send as soon as its TLS is done ([`crate::handshake`]). Otherwise the fingerprint in
    /// the peer's offer, bound to the secret by the link handshake's PAKE.
    fn secure_offers<T: serde::de::DeserializeOwned>(
        &self,
        strategy: &str,
        identity: Identity,
        theirs: serde_json::Value,
    ) -> Result<SecureOffers<T>, StrategyError> {
        let mut offers = secure_offers(identity, theirs)?;
        if let Some(peer) = self.derived(strategy, self.pairing.role.other()) {
            offers.peer = PeerPin::Derived(peer?.fingerprint);
        }
        Ok(offers)
    }

    /// Keyed ([`Self::agreed`]): the certificate `role` presents on this attempt's links,
    /// derived from the agreed key, the pairing, the strategy and the role
    /// ([`Identity::derive`]). `None` without an agreed key.
    fn derived(&self, strategy: &str, role: Role) -> Option<Result<Identity, StrategyError>> {
        let agreed = self.agreed.filter(|_| !CERT_BINDING_OFF)?;
        let seed = agreed.certificate_seed(&self.pairing.pair_id, strategy, role);
        Some(Identity::derive(&seed))
    }

    /// The handshake context for a link made by `strategy`.
    pub fn handshake_context(&self, strategy: &str) -> HandshakeContext {
        HandshakeContext {
            key: self.key.clone(),
            pair_id: self.pairing.pair_id.clone(),
            strategy: strategy.to_owned(),
            role: self.pairing.role,
            binding: Vec::new(),
            one_guess: self.one_guess.clone(),
            agreed: self.agreed,
        }
    }
}

/// Whether keyed links use the offers' certificates instead of the ones derived from the
/// agreed key (a test-only build, to watch the tests that guard the derivation go red):
/// `NETTOOL_TEST_CERT_BINDING_OFF=1` at compile time.
const CERT_BINDING_OFF: bool = option_env!("NETTOOL_TEST_CERT_BINDING_OFF").is_some();

/// The peer's offer with its certificate fingerprint taken out and pinned.
fn secure_offers<T: serde::de::DeserializeOwned>(
    identity: Identity,
    mut theirs: serde_json::Value,
) -> Result<SecureOffers<T>, StrategyError> {
    let fingerprint = theirs
        .as_object_mut()
        .and_then(|m| m.remove("fingerprint"))
        .ok_or_else(|| StrategyError::BadOffer("no certificate fingerprint".into()))?;
    let peer_fingerprint = parse_fingerprint(fingerprint.as_str().unwrap_or_default())?;
    let theirs =
        serde_json::from_value(theirs).map_err(|e| StrategyError::BadOffer(e.to_string()))?;
    Ok(SecureOffers {
        identity,
        peer: PeerPin::Offered(peer_fingerprint),
        theirs,
    })
}

/// One way of making a link. Object safe; stored as `Arc<dyn Strategy>`.
#[async_trait::async_trait]
pub trait Strategy: Send + Sync {
    /// The strategy's name as used on the command line and in reports (`tcp-punch`).
    fn name(&self) -> &'static str;

    /// Makes an authenticated link, or says why not. The orchestrator enforces the deadline by
    /// dropping the future, so everything the strategy opened must close on drop.
    async fn connect(&self, attempt: &mut Attempt<'_>) -> Result<Link, StrategyError>;

    /// What can be made ready before the peers are paired, against the server addresses
    /// `servers` (one per family, the control connection's first): ports bound and observed,
    /// and the offer naming them. The orchestrator runs it while joining, sends the offer with
    /// its plan offer and hands the state to the attempt ([`Attempt::prepared_offers`]), so
    /// the attempt costs no observation and no offer round trip after pairing. `Ok(None)`
    /// (the default): nothing to prepare.
    async fn prepare(
        &self,
        servers: &[SocketAddr],
        deadline: Instant,
    ) -> Result<Option<Prepared>, StrategyError> {
        let _ = (servers, deadline);
        Ok(None)
    }

    /// Whether [`Self::prepare`] runs when port mapping is on. `false` for a strategy whose
    /// offer leads with the gateway's mapping of its port, made by its attempt
    /// ([`Attempt::map_port`]): a prepared offer would lack it.
    fn prepares_with_port_mapping(&self) -> bool {
        true
    }

    /// Whether this strategy (as configured) can link a pair where exactly one side's NAT maps
    /// per destination and the other filters (udp-quic's birthday mode); the plan then tries
    /// it instead of skipping it.
    fn punches_hard_nats(&self) -> bool {
        false
    }
}

/// A raw connection a strategy found, with its addresses.
#[derive(Debug)]
pub struct RawLink<S> {
    /// The stream.
    pub stream: S,
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
}

/// Why [`agree_on_link`] produced no link.
#[derive(Debug, Clone, Default)]
pub struct NoAgreement {
    /// The deadline passed (rather than every source of links closing).
    pub timed_out: bool,
    /// Each refused connection with the reason.
    pub rejected: Vec<String>,
}

impl NoAgreement {
    /// The strategy error for this outcome with the strategy's own description: timed out
    /// when the deadline passed, no link otherwise.
    pub fn into_error(self, message: String) -> StrategyError {
        if self.timed_out {
            StrategyError::TimedOut(message)
        } else {
            StrategyError::NoLink(message)
        }
    }
}

impl std::fmt::Display for NoAgreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rejected.is_empty() {
            f.write_str("no connection was established")
        } else {
            write!(f, "connections refused: {}", self.rejected.join("; "))
        }
    }
}

/// Authenticates raw links as they arrive on `incoming` and returns the one both peers agree
/// on: one peer picks the first that authenticates and selects it, the other takes the one
/// selected (the second peer picks when keyed, its TLS having authenticated the first; the
/// first after SPAKE2, see [`handshake::authenticate`]). Links that fail authentication (strangers, stale
/// connections, another secret) are logged and dropped. Gives up at `deadline`.
///
/// `upgrade` runs first on every raw link (e.g. TLS, concurrently for all links) and returns
/// the stream the handshake runs over with its channel-binding value.
pub async fn agree_on_link<S, T, F, Fut>(
    ctx: &HandshakeContext,
    mut incoming: mpsc::Receiver<RawLink<S>>,
    upgrade: F,
    per_link_timeout: Duration,
    deadline: Instant,
) -> Result<RawLink<T>, NoAgreement>
where
    S: Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(S) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(T, Vec<u8>)>> + Send,
{
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    let mut rejected: Vec<String> = Vec::new();
    let stop = tokio::time::sleep_until(deadline.into());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Err(NoAgreement { timed_out: true, rejected }),
            raw = incoming.recv(), if open => match raw {
                Some(raw) => {
                    let mut ctx = ctx.clone();
                    let (local, remote) = (raw.local, raw.remote);
                    let upgrading = upgrade(raw.stream);
                    pending.push(async move {
                        let res = tokio::time::timeout(per_link_timeout, async {
                            let (mut stream, binding) = upgrading.await.map_err(|e| {
                                // A keyed link's certificate not derived from the agreed key:
                                // a failed authentication.
                                if crate::secure::not_derived(&e) {
                                    HandshakeError::BadProof
                                } else {
                                    HandshakeError::Secure(e)
                                }
                            })?;
                            ctx.binding = binding;
                            let selects = handshake::authenticate(&mut stream, &ctx).await?;
                            if selects != ctx.role {
                                handshake::await_select(&mut stream).await?;
                            }
                            Ok::<_, HandshakeError>((stream, selects))
                        })
                        .await;
                        (local, remote, res)
                    });
                }
                None => open = false,
            },
            Some((local, remote, res)) = pending.next(), if !pending.is_empty() => match res {
                Ok(Ok((mut stream, selects))) => {
                    if selects == ctx.role {
                        if let Err(e) = handshake::select(&mut stream).await {
                            rejected.push(format!("{remote}: {e}"));
                            continue;
                        }
                    }
                    debug!(%remote, "link authenticated");
                    return Ok(RawLink { stream, local, remote });
                }
                Ok(Err(e @ HandshakeError::BadProof)) if ctx.one_guess.is_some() => {
                    // A code session: the peer does not hold the code. One guess per code.
                    warn!(%remote, "refused connection: {e}; with a short code: a wrong code");
                    if let Some(g) = &ctx.one_guess {
                        g.fail();
                    }
                    rejected.push(format!("{remote}: {e}"));
                    return Err(NoAgreement { timed_out: false, rejected });
                }
                Ok(Err(e @ HandshakeError::PeerRefused(_))) => {
                    // Also how a duplicate link the first peer dropped mid-handshake ends.
                    debug!(%remote, "{e}");
                    rejected.push(format!("{remote}: {e}"));
                }
                Ok(Err(e @ (HandshakeError::Io(_) | HandshakeError::NotSelected))) => {
                    // The other end dropped it: usually a duplicate link the first peer did
                    // not pick.
                    debug!(%remote, "link dropped during handshake: {e}");
                    rejected.push(format!("{remote}: {e}"));
                }
                Ok(Err(HandshakeError::Secure(e)))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::BrokenPipe
                            | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    // The other end closed it during TLS: a candidate connection that lost
                    // the race (expected, not a problem).
                    debug!(%remote, "link closed during TLS: {e}");
                    rejected.push(format!("{remote}: TLS failed: {e}"));
                }
                Ok(Err(e)) => {
                    warn!(%remote, "refused connection: {e}");
                    rejected.push(format!("{remote}: {e}"));
                }
                Err(_) => {
                    warn!(%remote, "refused connection: handshake timed out");
                    rejected.push(format!("{remote}: handshake timed out"));
                }
            },
            else => return Err(NoAgreement { timed_out: false, rejected }),
        }
    }
}
