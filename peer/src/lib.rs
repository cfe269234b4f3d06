//! A peer's whole connect as a library: the durable, relay-first link that `nettool connect`
//! stands on, for programs of your own.
//!
//! [`Peer::builder`] takes the rendezvous servers (in order, with fallback), the session and
//! its secret (or a short code), and optionally the strategies; [`PeerBuilder::connect`]
//! chooses a server, joins over the TLS control channel (the server's key pinned or
//! remembered), runs the plan and relay-first (data flows over the relay at once while the
//! direct strategies run), and gives a [`Connection`]. Its [`Connection::into_stream`] is a
//! [`PeerStream`] (tokio `AsyncRead + AsyncWrite`) that survives its path: address changes,
//! NAT flushes and a server restart under the relay are resumed under it, and the session
//! moves to a direct path when one links, losing and repeating nothing. [`Completion`] says
//! how it ended, with the report; `succeeded()` only when the peer confirmed every byte.
//!
//! ```no_run
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let connection = nettool_peer::Peer::builder()
//!     .server("rendezvous.example.net:8877")
//!     .session("backup-42")
//!     .secret("correct horse battery staple")
//!     .connect()
//!     .await?;
//! let (mut stream, completion) = connection.into_stream();
//! stream.write_all(b"hello").await?;
//! stream.shutdown().await?; // our direction ends: the peer reads EOF after "hello"
//! let mut reply = Vec::new();
//! stream.read_to_end(&mut reply).await?; // until the peer ends its direction
//! let finished = completion.finished().await;
//! assert!(finished.succeeded(), "{:?}", finished.end.kind);
//! # Ok(()) }
//! ```
//!
//! The page `docs/library.md` of the repository shows the API on one page.

#![warn(missing_docs)]

mod servers;
mod session;
pub mod streams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::control::{ControlSecurity, ServerTrust};
use nettool_core::orchestrator::Event as ConnectEvent;
use nettool_core::port_mapping::PortMapping;
use nettool_core::relay_first;
use nettool_core::{ConnectParams, Link, Orchestrator, Report};
use tokio::sync::watch;

pub use nettool_core::code::Code;
pub use nettool_core::session::{EndKind, SessionConfig, SessionEnd, Sink, Source};
pub use servers::{choose_server, resolve_all, DEFAULT_PORT};
pub use session::{Completion, Finished, PeerStream};
pub use streams::{MuxStream, Streams};

/// The strategy name of [`Connection::into_session_link`]'s link.
pub const SESSION_LINK: &str = "session";

/// What a connect and its session go through, for a program to show or log.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Of several servers, this one answered and is used.
    ServerChosen {
        /// As given.
        server: String,
        /// The address that answered.
        addr: SocketAddr,
    },
    /// Of several servers, this one did not answer.
    ServerFailed {
        /// As given.
        server: String,
        /// Why.
        error: String,
        /// Whether another server is tried next.
        next: bool,
    },
    /// The connect's progress: joined and waiting, paired, each attempt.
    Connect(ConnectEvent),
    /// Relay-first: a direct path linked; the session moves to it.
    DirectReady {
        /// Since the connect began.
        at_ms: u128,
        /// The strategy that made it.
        strategy: &'static str,
        /// This end.
        local: SocketAddr,
        /// The peer's end.
        remote: SocketAddr,
    },
    /// Relay-first: no direct path this time; the session stays on the relay.
    NoDirectPath {
        /// Why.
        reason: String,
    },
    /// The session runs on this link from now on: the first, each move to a direct path,
    /// each resume (as the report's `paths` list them).
    Path {
        /// The link's strategy.
        strategy: String,
        /// Since the connect began.
        at_ms: u64,
    },
    /// The session lost its path and goes on over a new link.
    Resumed {
        /// The new link's strategy.
        strategy: &'static str,
        /// This end.
        local: SocketAddr,
        /// The peer's end.
        remote: SocketAddr,
        /// Connects it took.
        tries: u32,
    },
}

type Events = Arc<dyn Fn(Event) + Send + Sync>;

/// Why a connect produced no [`Connection`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// Something given is missing or wrong (no server, no session).
    #[error("{0}")]
    Settings(String),
    /// No rendezvous server could be resolved or answered.
    #[error("{0}")]
    Unreachable(String),
    /// Every strategy failed (or the peer holds another secret or code: `report.wrong_code`);
    /// the report says how each attempt went.
    #[error("no link: {}", .0.error.as_deref().unwrap_or("no strategy produced a link"))]
    NoLink(Box<Report>),
}

/// The entry point: [`Peer::builder`].
#[derive(Debug)]
pub struct Peer;

impl Peer {
    /// A builder with the defaults: every built-in strategy in the default order (tcp-punch,
    /// udp-quic, tcp-direct, relay), relay-first, 30 s to link, the session's defaults
    /// (60 s to resume, 8 MiB send buffer), TLS to the server with its key remembered on
    /// first use in `<config dir>/nettool/known_servers`.
    pub fn builder() -> PeerBuilder {
        PeerBuilder {
            servers: Vec::new(),
            chosen: None,
            session: None,
            secret: None,
            orchestrator: None,
            timeout: Duration::from_secs(30),
            relay_first: true,
            naming: relay_first::DirectNaming::FromKey,
            config: SessionConfig::default(),
            control: None,
            portmap: None,
            events: Arc::new(|_| {}),
        }
    }
}

/// Everything a connect needs; see [`Peer::builder`].
pub struct PeerBuilder {
    servers: Vec<String>,
    chosen: Option<(SocketAddr, Vec<SocketAddr>)>,
    session: Option<String>,
    secret: Option<String>,
    orchestrator: Option<Orchestrator>,
    timeout: Duration,
    relay_first: bool,
    naming: relay_first::DirectNaming,
    config: SessionConfig,
    control: Option<ControlSecurity>,
    portmap: Option<Arc<dyn PortMapping>>,
    events: Events,
}

impl std::fmt::Debug for PeerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerBuilder")
            .field("servers", &self.servers)
            .field("session", &self.session)
            .field("relay_first", &self.relay_first)
            .finish_non_exhaustive()
    }
}

impl PeerBuilder {
    /// A rendezvous server, `HOST` or `HOST:PORT` (default port 8877). Call again for
    /// fallbacks: the first that answers is used, for the connect and for each resume.
    pub fn server(mut self, server: impl Into<String>) -> Self {
        self.servers.push(server.into());
        self
    }

    /// The server to use and all its addresses, already chosen (by [`choose_server`]) from
    /// the servers given: the connect does not probe them again; resumes still do.
    pub fn chosen_server(mut self, server: SocketAddr, all: Vec<SocketAddr>) -> Self {
        self.chosen = Some((server, all));
        self
    }

    /// The session name both peers give.
    pub fn session(mut self, name: impl Into<String>) -> Self {
        self.session = Some(name.into());
        self
    }

    /// The shared secret the link key is derived from (without one, from the session name
    /// alone: anyone who knows the name can pass as the peer).
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// A short code (see [`Code`]): its session and secret. One guess per code: a wrong one
    /// burns it.
    pub fn code(mut self, code: &Code) -> Self {
        self.session = Some(code.session());
        self.secret = Some(code.secret());
        self
    }

    /// The built-in strategies to try, by name, in order (`tcp-punch`, `udp-quic`,
    /// `tcp-direct`, `relay`), each with its default settings. Relay-first applies when the
    /// relay and another are among them.
    pub fn strategies(mut self, names: &[&str]) -> Result<Self, PeerError> {
        self.orchestrator = Some(Self::built(names)?);
        Ok(self)
    }

    /// The built-in strategies named (all when none), with the default control security.
    fn built(names: &[&str]) -> Result<Orchestrator, PeerError> {
        let order: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let built = nettool_strategies::registry()
            .build(&order, &Default::default())
            .map_err(|e| PeerError::Settings(e.to_string()))?;
        Ok(Orchestrator::new(built, Duration::from_secs(30)).with_control(default_control()))
    }

    /// The orchestrator to connect with (strategies built from their settings, the plan, the
    /// NAT cache, the server token, the control channel's security): for programs that
    /// configure strategies themselves, as the `nettool` command line does from its config.
    pub fn orchestrator(mut self, orchestrator: Orchestrator) -> Self {
        self.orchestrator = Some(orchestrator);
        self
    }

    /// How long the connect may take to link (default 30 s); also each resume's connect.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Relay-first (the default): data flows over the relay at once, the session moves to a
    /// direct path when one links. Off: the strategies run in order before data flows.
    pub fn relay_first(mut self, on: bool) -> Self {
        self.relay_first = on;
        self
    }

    /// For a side that pairs with several peers under one session name at once (a service
    /// many clients connect to, as `nettool expose`): relay-first's direct pairing is named
    /// per pairing, so each peer's direct connect meets its own partner (it joins once the
    /// relay linked: a little later than the default). Off by default.
    pub fn many_peers(mut self, on: bool) -> Self {
        self.naming = if on {
            relay_first::DirectNaming::PerPairing
        } else {
            relay_first::DirectNaming::FromKey
        };
        self
    }

    /// The session's settings (resume timeout, send buffer, liveness).
    pub fn session_config(mut self, config: SessionConfig) -> Self {
        self.config = config;
        self
    }

    /// How the control connection is secured (default: TLS, the server's key remembered on
    /// first use; an orchestrator given to [`Self::orchestrator`] keeps its own unless this
    /// is set).
    pub fn control(mut self, control: ControlSecurity) -> Self {
        self.control = Some(control);
        self
    }

    /// The gateway's port mapper (UPnP-IGD, NAT-PMP, PCP): its mappings are deleted when the
    /// connect fails and when the session ends.
    pub fn portmap(mut self, mapper: Arc<dyn PortMapping>) -> Self {
        self.portmap = Some(mapper);
        self
    }

    /// Called with each [`Event`] (from the connect's task and the session's).
    pub fn on_event(mut self, f: impl Fn(Event) + Send + Sync + 'static) -> Self {
        self.events = Arc::new(f);
        self
    }

    /// Asks the first of the servers given that answers for a short code of `words` words
    /// (see [`allocate_code`]); connect with it through [`Self::code`].
    pub async fn ask_code(&self, words: usize) -> Result<Code, PeerError> {
        let (_, all) = match self.chosen.clone() {
            Some(c) => c,
            None => choose_server(&self.servers, self.events.as_ref()).await?,
        };
        let control = self.control.clone().unwrap_or_else(default_control);
        let deadline = Instant::now() + self.timeout.min(Duration::from_secs(15));
        allocate_code(&all, &control, None, words, deadline).await
    }

    /// Chooses a server, joins, links (relay-first unless turned off): a [`Connection`] whose
    /// session has not started yet.
    pub async fn connect(self) -> Result<Connection, PeerError> {
        let started = Instant::now();
        let session = self.session.clone().unwrap_or_default();
        if session.is_empty() {
            return Err(PeerError::Settings(
                "no session: give a session name (not empty) or a code".into(),
            ));
        }
        let (server, all) = match self.chosen.clone() {
            Some(c) => c,
            None => choose_server(&self.servers, self.events.as_ref()).await?,
        };
        let orch = match self.orchestrator {
            Some(o) => o,
            None => Self::built(&[])?,
        };
        let mut orch = orch.with_server_addresses(all).with_overall(self.timeout);
        if let Some(control) = self.control {
            orch = orch.with_control(control);
        }
        if let Some(m) = &self.portmap {
            orch = orch.with_portmap(Some(m.clone()));
        }
        let params = ConnectParams {
            server,
            session,
            secret: self.secret,
        };
        let relay_first = self.relay_first && relay_first::applies(&orch);
        let events = self.events.clone();
        let show = move |e| events(Event::Connect(e));
        let (link, report, direct) = if relay_first {
            let r = relay_first::connect_named(&orch, &params, &show, self.naming).await;
            (r.link, r.report, r.direct)
        } else {
            let (link, report) = orch.connect(&params, &show).await;
            (link, report, None)
        };
        let Some(link) = link else {
            session::release(self.portmap.as_deref()).await;
            return Err(PeerError::NoLink(Box::new(report)));
        };
        let lifecycle = session::Lifecycle {
            orch,
            params,
            servers: self.servers,
            attempt_timeout: self.timeout,
            config: self.config,
            relay_first,
            direct,
            started,
            confirmation: link.confirmation(),
            portmap: self.portmap,
            events: self.events,
        };
        Ok(Connection {
            link,
            report,
            lifecycle,
        })
    }
}

/// Asks the rendezvous server at `addrs` (one server's addresses, raced) for a short code of
/// `words` words (a nameplate the server reserves, and words from this machine's random
/// generator): give it to the other side, and connect with [`PeerBuilder::code`].
pub async fn allocate_code(
    addrs: &[SocketAddr],
    control: &ControlSecurity,
    token: Option<&str>,
    words: usize,
    deadline: Instant,
) -> Result<Code, PeerError> {
    let nameplate = nettool_core::client::allocate(addrs, control, token, deadline)
        .await
        .map_err(|e| {
            PeerError::Unreachable(format!(
                "asking the rendezvous server for a short code: {e}"
            ))
        })?;
    Code::generate(nameplate, words, &mut rand::rngs::OsRng)
        .map_err(|e| PeerError::Settings(e.to_string()))
}

/// TLS to the server, its key remembered on first use in `<config dir>/nettool/known_servers`.
fn default_control() -> ControlSecurity {
    ControlSecurity::Tls(Arc::new(ServerTrust::new(
        None,
        dirs::config_dir().map(|d| d.join("nettool").join("known_servers")),
        None,
    )))
}

/// A linked peer: the first link and the connect's report, the session not started yet.
pub struct Connection {
    link: Link,
    report: Report,
    lifecycle: session::Lifecycle,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The connect's report so far (attempts, NAT, timings); the session adds to it.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// The report, to add to it before the session starts.
    pub fn report_mut(&mut self) -> &mut Report {
        &mut self.report
    }

    /// The first link: its strategy and both ends.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// The first link itself, without a session (nothing resumes or moves it). Port
    /// mappings stay until the caller releases them.
    pub fn into_link(self) -> Link {
        self.link
    }

    /// Runs the session over `source` → peer and peer → `sink` until it ends (`stop`
    /// reports a signal number: the session then ends with END to the peer).
    pub async fn run(
        self,
        source: Box<dyn Source>,
        sink: Box<dyn Sink>,
        stop: watch::Receiver<Option<i32>>,
    ) -> Finished {
        session::run(self.link, self.lifecycle, self.report, (source, sink), stop).await
    }

    /// The session in a task of its own, as a stream to hold: see [`PeerStream`].
    pub fn into_stream(self) -> (PeerStream, Completion) {
        session::stream(self.link, self.lifecycle, self.report)
    }

    /// [`Self::into_stream`]'s stream as a [`Link`] (the first link's addresses, strategy
    /// [`SESSION_LINK`]), for code that takes links: whatever runs over it survives what the
    /// session survives.
    pub fn into_session_link(self) -> (Link, Completion) {
        let (local, remote) = (self.link.local, self.link.remote);
        let (stream, completion) = self.into_stream();
        let link = Link {
            stream: Box::new(stream),
            local,
            remote,
            strategy: SESSION_LINK,
        };
        (link, completion)
    }

    /// The session in a task of its own, carrying several streams, each with its own flow
    /// control (yamux over [`Self::into_stream`]'s stream): either side opens streams, the
    /// other accepts them. Every stream survives what the session survives.
    pub fn into_streams(self) -> (Streams, Completion) {
        let client = self.report.role == Some(nettool_core::Role::First);
        let (stream, completion) = self.into_stream();
        (Streams::over(stream, client), completion)
    }
}
