//! A malicious rendezvous server (mitm). The double speaks the real protocol by standing in
//! front of a real `RendezvousServer`: it forwards every frame, but rewrites the offers it hands
//! to each peer, putting its own certificate fingerprint and its own addresses in place of the
//! other peer's, and it keeps relay connections for itself. It then terminates TLS with each
//! peer using its own certificate and forwards everything between the two TLS sessions.
//!
//! - With binding on (the product), every TCP strategy refuses: the link handshake's key
//!   confirmation covers each TLS session's exporter, and the double's two sessions differ.
//! - With binding off (the dev-only `insecure-test-switches` feature), the same attack links
//!   and the double reads the user's data: the test can fail.
//! - A flood of candidates in an offer makes a peer contact at most the cap of addresses and
//!   never an address that is not the peer's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nettool_core::{ConnectParams, Link, Orchestrator, Report, Role};
use nettool_rendezvous::{RelayLimits, RendezvousServer, ServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Serialises the tests of this file: the binding switch is process-wide.
static SWITCH: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// -------------------------------------------------------------------------------------------
// TLS of the double: its own certificate, and it accepts any certificate of the peers.

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl AcceptAny {
    fn new() -> Arc<Self> {
        Arc::new(Self(Arc::new(rustls::crypto::ring::default_provider())))
    }
    fn v13(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn v12(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.v12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.v13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for AcceptAny {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.v12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.v13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

struct DoubleTls {
    fingerprint: String,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl DoubleTls {
    fn new() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["double".to_owned()]).unwrap();
        let cert = certified.cert.der().clone();
        let key =
            || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(AcceptAny::new())
            .with_single_cert(vec![cert.clone()], key())
            .unwrap();
        server.alpn_protocols = vec![b"nettool/1".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(AcceptAny::new())
            .with_client_auth_cert(vec![cert.clone()], key())
            .unwrap();
        client.alpn_protocols = vec![b"nettool/1".to_vec()];
        let (server, client) = (Arc::new(server), Arc::new(client));
        Self {
            fingerprint: hex::encode(Sha256::digest(&cert)),
            acceptor: tokio_rustls::TlsAcceptor::from(server.clone()),
            connector: tokio_rustls::TlsConnector::from(client.clone()),
            server,
            client,
        }
    }
}

// -------------------------------------------------------------------------------------------
// The double

/// What the double does to the offers it hands out.
#[derive(Clone)]
enum Mode {
    /// Man in the middle: its own fingerprint and addresses instead of the other peer's.
    Swap,
    /// Every address list replaced by this flood; fingerprints untouched.
    Flood(Arc<Vec<SocketAddr>>),
}

type Plain = Box<dyn PlainStream>;
trait PlainStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PlainStream for T {}

struct Double {
    addr: SocketAddr,
    /// Every byte the double decrypted from either peer.
    seen: Arc<Mutex<Vec<u8>>>,
    /// TLS sessions the double completed with a peer.
    terminated: Arc<AtomicUsize>,
}

struct DoubleState {
    upstream: SocketAddr,
    mode: Mode,
    tls: DoubleTls,
    seen: Arc<Mutex<Vec<u8>>>,
    terminated: Arc<AtomicUsize>,
    /// Per strategy: the listener posing as each role, and the queue of decrypted streams
    /// from the peer talking to that pose.
    poses: Mutex<HashMap<(String, Role), SocketAddr>>,
    parked: Mutex<HashMap<(String, Role), Vec<Plain>>>,
    /// The pairing id (from the paired message) and each role's udp-quic punch key (from its
    /// original offer).
    pair_id: Mutex<String>,
    punch_keys: Mutex<HashMap<Role, [u8; 32]>>,
    /// The double's own punch key.
    punch_key: [u8; 32],
    /// Whether it passes the joins' PAKE messages on (as the real server does): the peers
    /// then hold an agreed key, swap their TLS roles (the second peer is the client) and
    /// derive their certificates from the key.
    keyed: bool,
}

impl Double {
    async fn start(upstream: SocketAddr, mode: Mode) -> Self {
        Self::start_keyed(upstream, mode, false).await
    }

    async fn start_keyed(upstream: SocketAddr, mode: Mode, keyed: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // STUN on the same port, answered by the double itself.
        let udp = UdpSocket::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                if let Some(answer) = nettool_core::stun::answer(&buf[..n], from) {
                    let _ = udp.send_to(&answer, from).await;
                }
            }
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let terminated = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(DoubleState {
            upstream,
            mode,
            tls: DoubleTls::new(),
            seen: seen.clone(),
            terminated: terminated.clone(),
            poses: Mutex::default(),
            parked: Mutex::default(),
            pair_id: Mutex::default(),
            punch_keys: Mutex::default(),
            punch_key: [0x42; 32],
            keyed,
        });
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(state.clone().control(conn));
            }
        });
        Self {
            addr,
            seen,
            terminated,
        }
    }
}

impl DoubleState {
    /// One connection from a peer: relay connections are kept, everything else is forwarded
    /// line by line to the real server, with the offers rewritten.
    async fn control(self: Arc<Self>, conn: TcpStream) {
        let (r, mut peer_w) = conn.into_split();
        let mut peer_r = BufReader::new(r);
        let mut first = String::new();
        if peer_r.read_line(&mut first).await.unwrap_or(0) == 0 {
            return;
        }
        let hello: Value = serde_json::from_str(&first).unwrap_or(Value::Null);
        if hello["type"] == "relay" && matches!(self.mode, Mode::Swap) {
            let role = if hello["role"] == "first" {
                Role::First
            } else {
                Role::Second
            };
            let _ = peer_w.write_all(b"{\"type\":\"relaying\"}\n").await;
            // The relay's wire format: raw from the peer, framed to the peer. Run TLS over one
            // end of a pipe and translate on the other; pose as "the other role".
            let (ours, pipe) = tokio::io::duplex(256 * 1024);
            let (mut pipe_r, mut pipe_w) = tokio::io::split(pipe);
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut peer_r, &mut pipe_w).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = pipe_r.read(&mut buf).await {
                    let head = nettool_core::relay::header(nettool_core::relay::FRAME_DATA, n);
                    if peer_w.write_all(&head).await.is_err()
                        || peer_w.write_all(&buf[..n]).await.is_err()
                    {
                        break;
                    }
                }
            });
            self.terminate("relay".into(), role.other(), ours).await;
            return;
        }
        let up = TcpStream::connect(self.upstream).await.unwrap();
        let (up_r, mut up_w) = up.into_split();
        let mut up_r = BufReader::new(up_r);
        let _ = up_w.write_all(first.as_bytes()).await;
        let to_server = async {
            let _ = tokio::io::copy(&mut peer_r, &mut up_w).await;
            let _ = up_w.shutdown().await;
        };
        let me = self.clone();
        let to_peer = async move {
            let mut role = None;
            loop {
                let mut line = String::new();
                if up_r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                let mut msg: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if msg["type"] == "paired" {
                    *me.pair_id.lock().unwrap() =
                        msg["pair_id"].as_str().unwrap_or_default().into();
                    // The joins' PAKE messages are not passed on: the peers then run SPAKE2
                    // on each link, with the first peer as the TLS client, as this double
                    // poses (with the messages, their links' TLS roles swap; the keyed
                    // exchange's channel binding is checked by the handshake's unit tests).
                    if let Some(m) = msg.as_object_mut().filter(|_| !me.keyed) {
                        m.remove("peer_pake");
                    }
                    let mine = if msg["role"] == "first" {
                        Role::First
                    } else {
                        Role::Second
                    };
                    role = Some(mine);
                    // The offers the peer's join carried, posing as it, as in its plan offer
                    // (a flood of at most 1,000 candidates per list: the pairing is one frame
                    // of at most 64 KiB, and a larger one would only end the pairing).
                    let joined = msg.get_mut("peer_offers").and_then(Value::as_object_mut);
                    for (name, payload) in joined.into_iter().flat_map(|o| o.iter_mut()) {
                        me.rewrite_capped(name, mine.other(), payload, 1000);
                    }
                    line = format!("{msg}\n");
                }
                if msg["type"] == "offer" {
                    let strategy = msg["strategy"].as_str().unwrap_or_default().to_owned();
                    // This offer came from the other peer: pose as it.
                    let posed = role.expect("paired before offers").other();
                    if strategy == nettool_core::protocol::PLAN_OFFER {
                        // The plan offer carries the offers the peer prepared before pairing.
                        // (`get_mut`: indexing would add `"offers": null` to a plan offer
                        // without any, which the peer cannot read.)
                        let offers = msg["payload"].get_mut("offers");
                        if let Some(offers) = offers.and_then(Value::as_object_mut) {
                            for (name, payload) in offers.iter_mut() {
                                me.rewrite(name, posed, payload);
                            }
                        }
                    } else {
                        me.rewrite(&strategy, posed, &mut msg["payload"]);
                    }
                    line = serde_json::to_string(&msg).unwrap() + "\n";
                }
                if peer_w.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        };
        tokio::join!(to_server, to_peer);
    }

    fn rewrite(self: &Arc<Self>, strategy: &str, posed: Role, payload: &mut Value) {
        self.rewrite_capped(strategy, posed, payload, usize::MAX);
    }

    /// As [`Self::rewrite`], a flood at most `cap` candidates long.
    fn rewrite_capped(
        self: &Arc<Self>,
        strategy: &str,
        posed: Role,
        payload: &mut Value,
        cap: usize,
    ) {
        let replacement: Vec<SocketAddr> = match &self.mode {
            Mode::Flood(list) => list.iter().take(cap).copied().collect(),
            Mode::Swap => vec![self.pose(strategy, posed)],
        };
        let Some(obj) = payload.as_object_mut() else {
            return;
        };
        for (key, value) in obj.iter_mut() {
            if key == "fingerprint" && matches!(self.mode, Mode::Swap) {
                *value = Value::String(self.tls.fingerprint.clone());
            }
            if key == "punch_key" && matches!(self.mode, Mode::Swap) {
                let theirs: [u8; 32] = hex::decode(value.as_str().unwrap())
                    .unwrap()
                    .try_into()
                    .unwrap();
                self.punch_keys.lock().unwrap().insert(posed, theirs);
                *value = Value::String(hex::encode(self.punch_key));
            }
            let is_addr_list = value.as_array().is_some_and(|a| {
                a.iter()
                    .all(|v| v.as_str().is_some_and(|s| s.parse::<SocketAddr>().is_ok()))
            });
            if is_addr_list {
                *value = serde_json::to_value(&replacement).unwrap();
            }
        }
    }

    /// The listener posing as `posed` for `strategy`, created on first use.
    fn pose(self: &Arc<Self>, strategy: &str, posed: Role) -> SocketAddr {
        let mut poses = self.poses.lock().unwrap();
        if let Some(addr) = poses.get(&(strategy.to_owned(), posed)) {
            return *addr;
        }
        if strategy == "udp-quic" {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = socket.local_addr().unwrap();
            tokio::spawn(self.clone().quic_pose(posed, socket));
            poses.insert((strategy.to_owned(), posed), addr);
            return addr;
        }
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let (me, strategy_name) = (self.clone(), strategy.to_owned());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(me.clone().terminate(strategy_name.clone(), posed, conn));
            }
        });
        poses.insert((strategy.to_owned(), posed), addr);
        addr
    }

    /// udp-quic: answers the peer's punches as `posed` (with the double's own punch key), then
    /// terminates QUIC with it (first = QUIC client) and bridges the stream.
    async fn quic_pose(self: Arc<Self>, posed: Role, socket: std::net::UdpSocket) {
        socket.set_nonblocking(true).unwrap();
        let udp = UdpSocket::from_std(socket).unwrap();
        let mut buf = vec![0u8; 2048];
        let peer = loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                return;
            };
            let key = self.punch_keys.lock().unwrap().get(&posed.other()).copied();
            let pair_id = self.pair_id.lock().unwrap().clone();
            if key.is_some_and(|k| punch_is_valid(&k, &pair_id, posed.other(), &buf[..n])) {
                for _ in 0..3 {
                    let p = punch(&self.punch_key, &pair_id, posed);
                    let _ = udp.send_to(&p, from).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                break from;
            }
        };
        let socket = udp.into_std().unwrap();
        let plain: Plain = match self.client(posed) {
            false => {
                let server = quinn::ServerConfig::with_crypto(Arc::new(
                    quinn::crypto::rustls::QuicServerConfig::try_from(self.tls.server.clone())
                        .unwrap(),
                ));
                let endpoint = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .unwrap();
                let Some(incoming) = endpoint.accept().await else {
                    return;
                };
                let Ok(conn) = incoming.await else { return };
                let Ok((send, recv)) = conn.accept_bi().await else {
                    return;
                };
                Box::new(QuicPlain {
                    stream: tokio::io::join(recv, send),
                    _conn: conn,
                    _endpoint: endpoint,
                })
            }
            true => {
                let mut endpoint = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .unwrap();
                endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
                    quinn::crypto::rustls::QuicClientConfig::try_from(self.tls.client.clone())
                        .unwrap(),
                )));
                let Ok(connecting) = endpoint.connect(peer, "nettool") else {
                    return;
                };
                let Ok(conn) = connecting.await else { return };
                let Ok((send, recv)) = conn.open_bi().await else {
                    return;
                };
                Box::new(QuicPlain {
                    stream: tokio::io::join(recv, send),
                    _conn: conn,
                    _endpoint: endpoint,
                })
            }
        };
        self.terminated.fetch_add(1, Ordering::SeqCst);
        self.pair_up("udp-quic".into(), posed, plain).await;
    }

    /// Terminates TLS with a peer as the role `posed` (first = TLS client) and bridges the
    /// decrypted stream with one from the other peer.
    async fn terminate<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: Arc<Self>,
        strategy: String,
        posed: Role,
        conn: S,
    ) {
        let plain: Plain = match self.client(posed) {
            true => {
                let name = ServerName::try_from("nettool.peer").unwrap();
                match self.tls.connector.connect(name, conn).await {
                    Ok(s) => Box::new(s),
                    Err(_) => return,
                }
            }
            false => match self.tls.acceptor.accept(conn).await {
                Ok(s) => Box::new(s),
                Err(_) => return,
            },
        };
        self.terminated.fetch_add(1, Ordering::SeqCst);
        self.pair_up(strategy, posed, plain).await;
    }

    /// Whether posing as `posed` the double is the TLS (and QUIC) client: the first peer's
    /// part, the second's when the peers hold an agreed key.
    fn client(&self, posed: Role) -> bool {
        (posed == Role::First) != self.keyed
    }

    async fn pair_up(&self, strategy: String, posed: Role, plain: Plain) {
        // Pair with a stream from the peer talking to the other pose of the same strategy.
        let partner = {
            let mut parked = self.parked.lock().unwrap();
            match parked
                .get_mut(&(strategy.clone(), posed.other()))
                .and_then(Vec::pop)
            {
                Some(other) => Some(other),
                None => {
                    parked.entry((strategy, posed)).or_default().push(plain);
                    return;
                }
            }
        };
        if let Some(other) = partner {
            bridge(plain, other, self.seen.clone()).await;
        }
    }
}

/// A QUIC stream, keeping its connection and endpoint alive.
struct QuicPlain {
    stream: tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
    _conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Drop for QuicPlain {
    /// Dropping the last handle of a quinn connection closes it at once and discards stream
    /// data the peer has not acknowledged yet, so the bridged bytes could be lost after the
    /// pumps finished. Keep the connection until the peer closes it (bounded).
    fn drop(&mut self) {
        let (conn, endpoint) = (self._conn.clone(), self._endpoint.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
                drop(endpoint);
            });
        }
    }
}

impl AsyncRead for QuicPlain {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicPlain {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

// udp-quic's punch datagram, as the peers speak it (strategies/src/udp_quic.rs): magic,
// version, role, flags, nonce, HMAC-SHA256 under the sender's punch key.
const PUNCH_HEAD: [u8; 5] = [0x00, b'N', b'T', b'P', 2];

fn punch_mac(key: &[u8; 32], pair_id: &str, head: &[u8], nonce: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    for part in [
        b"nettool udp punch v2".as_slice(),
        pair_id.as_bytes(),
        b"udp-quic",
        head,
        nonce,
    ] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn role_byte(role: Role) -> u8 {
    if role == Role::First {
        1
    } else {
        2
    }
}

/// A punch from `role` that says it heard the receiver.
fn punch(key: &[u8; 32], pair_id: &str, role: Role) -> Vec<u8> {
    let mut out = PUNCH_HEAD.to_vec();
    out.extend_from_slice(&[role_byte(role), 1]);
    let nonce = [7u8; 16];
    out.extend_from_slice(&nonce);
    let tag = punch_mac(key, pair_id, &out[4..7], &nonce);
    out.extend_from_slice(&tag);
    out
}

fn punch_is_valid(key: &[u8; 32], pair_id: &str, from: Role, p: &[u8]) -> bool {
    p.len() == 55
        && p[..5] == PUNCH_HEAD
        && p[5] == role_byte(from)
        && punch_mac(key, pair_id, &p[4..7], &p[7..23]) == p[23..]
}

/// Forwards both ways, keeping a copy of every byte.
async fn bridge(a: Plain, b: Plain, seen: Arc<Mutex<Vec<u8>>>) {
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    tokio::join!(pump(ar, bw, seen.clone()), pump(br, aw, seen));
}

async fn pump(
    mut r: tokio::io::ReadHalf<Plain>,
    mut w: tokio::io::WriteHalf<Plain>,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        seen.lock().unwrap().extend_from_slice(&buf[..n]);
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

// -------------------------------------------------------------------------------------------
// Peers

async fn real_server() -> SocketAddr {
    let server = RendezvousServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            relay: Some(RelayLimits::default()),
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

async fn pair(
    server: SocketAddr,
    session: &str,
    name: &str,
    attempt: Duration,
) -> ((Option<Link>, Report), (Option<Link>, Report)) {
    let orch = Arc::new(Orchestrator::new(
        nettool_strategies::registry()
            .build(
                &[name.to_owned()],
                &std::collections::BTreeMap::from([(
                    name.to_owned(),
                    serde_json::json!({ "timeout": humantime_ms(attempt) }),
                )]),
            )
            .map_err(|e| e.to_string())
            .unwrap(),
        attempt + Duration::from_secs(5),
    ));
    let params = ConnectParams {
        server,
        session: session.into(),
        secret: Some("correct horse".into()),
    };
    tokio::join!(
        orch.connect(&params, &|_| {}),
        orch.connect(&params, &|_| {})
    )
}

fn humantime_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

const MARKER: &[u8] = b"USER-DATA-THE-DOUBLE-MUST-NEVER-READ";

/// Sends the marker from one linked peer to the other.
async fn send_marker(a: Link, b: Link) -> Vec<u8> {
    let (mut ar, mut aw) = tokio::io::split(a.stream);
    let (_br, mut bw) = tokio::io::split(b.stream);
    aw.write_all(MARKER).await.unwrap();
    aw.shutdown().await.unwrap();
    drop(bw.shutdown().await);
    let mut got = vec![0u8; MARKER.len()];
    let mut _br = _br;
    tokio::time::timeout(Duration::from_secs(10), _br.read_exact(&mut got))
        .await
        .expect("the marker crossed in time")
        .expect("the marker crossed");
    let _ = ar.read(&mut [0u8; 1]).await;
    got
}

/// Both peers of `session` connect with `name` through the double: neither links and both
/// reports say the authentication failed.
async fn refused_through(double: &Double, session: &str, name: &str) {
    let ((a, ra), (b, rb)) = pair(double.addr, session, name, Duration::from_secs(4)).await;
    assert!(
        a.is_none() && b.is_none(),
        "{name}: a link through the double: {ra:?} {rb:?}"
    );
    let errors = format!("{:?} {:?}", ra.attempts, rb.attempts);
    assert!(
        errors.contains("failed authentication"),
        "{name}: the reports must show the authentication failing: {errors}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mitm_double_is_refused_by_every_strategy_and_wins_without_binding() {
    let _switch = SWITCH.lock().await;
    let upstream = real_server().await;
    for (i, name) in ["tcp-direct", "tcp-punch", "relay", "udp-quic"]
        .into_iter()
        .enumerate()
    {
        // With binding (the product): refused, and nothing of the peers' data reaches the double.
        let double = Double::start(upstream, Mode::Swap).await;
        refused_through(&double, &format!("mitm-on-{i}"), name).await;
        assert!(
            double.terminated.load(Ordering::SeqCst) >= 2,
            "{name}: the double must have terminated TLS with both peers for the test to mean \
             anything"
        );
        assert!(!contains(&double.seen.lock().unwrap(), MARKER));

        // Without binding (dev-only switch): the same attack links and reads the data.
        nettool_core::handshake::insecure::set_binding_off(true);
        let double = Double::start(upstream, Mode::Swap).await;
        let ((a, ra), (b, rb)) = pair(
            double.addr,
            &format!("mitm-off-{i}"),
            name,
            Duration::from_secs(4),
        )
        .await;
        nettool_core::handshake::insecure::set_binding_off(false);
        let (Some(a), Some(b)) = (a, b) else {
            panic!("{name}: without binding the attack should link: {ra:?} {rb:?}");
        };
        let (a, b) = if ra.role == Some(Role::First) {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(send_marker(a, b).await, MARKER);
        assert!(
            contains(&double.seen.lock().unwrap(), MARKER),
            "{name}: without binding the double reads the data"
        );
    }
}

/// Sockets on loopback that count who contacted them.
struct Sinks {
    addrs: Vec<SocketAddr>,
    hits: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

impl Sinks {
    async fn bind(ips: impl Iterator<Item = Ipv4Addr>) -> Self {
        let hits: Arc<Mutex<HashMap<SocketAddr, usize>>> = Arc::default();
        let mut addrs = Vec::new();
        for ip in ips {
            let tcp = TcpListener::bind((IpAddr::V4(ip), 0)).await.unwrap();
            let addr = tcp.local_addr().unwrap();
            // The same port on UDP (free on loopback almost always; skip when not).
            let Ok(udp) = UdpSocket::bind(addr).await else {
                continue;
            };
            addrs.push(addr);
            let h = hits.clone();
            tokio::spawn(async move {
                while let Ok((_c, _)) = tcp.accept().await {
                    *h.lock().unwrap().entry(addr).or_default() += 1;
                }
            });
            let h = hits.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                while udp.recv_from(&mut buf).await.is_ok() {
                    *h.lock().unwrap().entry(addr).or_default() += 1;
                }
            });
        }
        Self { addrs, hits }
    }

    fn contacted(&self) -> Vec<SocketAddr> {
        self.hits.lock().unwrap().keys().copied().collect()
    }
}

/// The double passes the joins' PAKE messages on, as the real server does: the peers hold an
/// agreed key and their links' certificates are derived from it, so each peer refuses the
/// double's own certificate as soon as its TLS handshake is done, before it writes anything:
/// the double decrypts nothing, and the keyed second peer (which sends as soon as its TLS is
/// done) never talks to it. Watched red with `NETTOOL_TEST_CERT_BINDING_OFF=1` (the offers'
/// certificates instead): the double terminates TLS with both, and the second peer, whose TLS
/// then "authenticated" the double, takes the link and sends it its hello and confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mitm_double_passing_the_pake_is_refused_by_keyed_peers_and_reads_nothing() {
    let _switch = SWITCH.lock().await;
    let upstream = real_server().await;
    for (i, name) in ["tcp-direct", "tcp-punch", "relay", "udp-quic"]
        .into_iter()
        .enumerate()
    {
        let double = Double::start_keyed(upstream, Mode::Swap, true).await;
        refused_through(&double, &format!("mitm-keyed-{i}"), name).await;
        assert!(
            double.seen.lock().unwrap().is_empty(),
            "{name}: the double decrypted something"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mitm_offer_with_thousands_of_candidates_reaches_only_the_cap_and_no_third_party() {
    let _switch = SWITCH.lock().await;
    let upstream = real_server().await;
    // The peers are observed on 127.0.0.1: other loopback addresses are third parties.
    let third = Sinks::bind((2..42u8).map(|i| Ipv4Addr::new(127, 0, 0, i))).await;
    let own = Sinks::bind(std::iter::repeat_n(Ipv4Addr::LOCALHOST, 40)).await;
    let mut flood: Vec<SocketAddr> = third.addrs.clone();
    flood.extend(&own.addrs);
    // Thousands more: duplicates and unbound third-party ports.
    for i in 0..1200u32 {
        flood.push(SocketAddr::new(
            Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1).into(),
            9,
        ));
        flood.push(own.addrs[(i as usize) % own.addrs.len()]);
    }
    let flood = Arc::new(flood);
    for (i, name) in ["tcp-direct", "tcp-punch", "udp-quic"]
        .into_iter()
        .enumerate()
    {
        let double = Double::start(upstream, Mode::Flood(flood.clone())).await;
        let ((_a, ra), (_b, rb)) = pair(
            double.addr,
            &format!("flood-{i}"),
            name,
            Duration::from_secs(2),
        )
        .await;
        assert!(ra.role.is_some() && rb.role.is_some(), "{name}: paired");
    }
    // Let the last datagrams and SYNs land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        third.contacted().is_empty(),
        "a third party was contacted: {:?}",
        third.contacted()
    );
    let contacted = own.contacted();
    assert!(
        !contacted.is_empty(),
        "the peers must have contacted the capped candidates"
    );
    assert!(
        contacted.len() <= 8,
        "more distinct candidates contacted than the cap: {}",
        contacted.len()
    );
}
