//! Link security as a service for every strategy, built-in or plugin: per-attempt self-signed
//! certificates, pinned by the SHA-256 fingerprints the peers exchange in their offers, and
//! TLS 1.3 over any stream ([`LinkTls`] for TCP-like streams; [`client_tls`] and [`server_tls`]
//! for QUIC). [`LinkTls::upgrade`] returns the channel's exporter, which
//! [`crate::strategy::agree_on_link`] binds into the link handshake (SPAKE2 + confirmation):
//! a strategy gets an authenticated, bound link by upgrading its raw streams with [`LinkTls`]
//! and handing them to `agree_on_link`. A handshake without an exporter is refused.
//!
//! Both ends authenticate: the client checks the server's certificate against the fingerprint
//! from the peer's offer, the server requires a client certificate and checks it the same way.
//! There is no certificate authority and no name check: the fingerprint is the identity. The
//! link handshake that follows inside TLS binds the session secret to this very TLS session
//! (via a keying-material exporter), so even the rendezvous server, which relays the
//! fingerprints, cannot sit in the middle without the secret.
//!
//! On a keyed link (the peers hold an agreed key, [`crate::handshake::AgreedKey`]) both
//! certificates are derived from that key instead ([`Identity::derive`], [`PeerPin::Derived`])
//! and checked right after the handshake, before anything is written: the handshake itself
//! then authenticates the other end, and the offers' fingerprints are not used.

use std::io;
use std::sync::Arc;

use crate::protocol::Role;
use crate::strategy::StrategyError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};

/// Default size of the buffer links read the socket through (see [`LinkTls::upgrade`]).
pub const READ_BUF: usize = 256 << 10;
/// rustls' limit of encrypted bytes queued for the socket.
const SEND_BUF: usize = 256 << 10;

/// The read buffer size: [`READ_BUF`], or `NETTOOL_TLS_READ_BUF` bytes (for measuring the
/// lever; 0 reads the socket as rustls asks, 4 KiB at a time).
fn read_buf() -> usize {
    std::env::var("NETTOOL_TLS_READ_BUF")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(READ_BUF)
        .max(1)
}

/// ALPN protocol id of nettool links.
pub const ALPN: &[u8] = b"nettool/1";
/// Label of the keying-material exporter bound into the link handshake.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-nettool-link-v1";
/// This attempt's self-signed certificate, its key and fingerprint.
pub struct Identity {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    /// SHA-256 of `cert`: what the offer carries and the peer pins.
    pub fingerprint: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &fingerprint_hex(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh self-signed certificate (ECDSA P-256) for one attempt.
    pub fn generate() -> Result<Self, StrategyError> {
        let certified = rcgen::generate_simple_self_signed(vec!["nettool".to_owned()])
            .map_err(|e| StrategyError::NoLink(format!("generating the certificate: {e}")))?;
        let cert = certified.cert.der().clone();
        let fingerprint = Sha256::digest(&cert).into();
        Ok(Self {
            cert,
            key: PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()),
            fingerprint,
        })
    }

    /// The certificate derived from `seed` (a value only the holders of an agreed key can
    /// compute, [`crate::strategy::Attempt::exchange_secure_offers`]): an Ed25519 key whose
    /// PKCS#8 holds the seed, in a self-signed certificate whose every field is fixed (rcgen's
    /// default validity and name, the serial from the public key; Ed25519 signs
    /// deterministically), so both peers compute the same bytes and each pins the other's
    /// without an offer carrying it. A TLS peer presenting it proves it holds the seed.
    pub fn derive(seed: &[u8; 32]) -> Result<Self, StrategyError> {
        // PKCS#8 v1 of an Ed25519 private key (RFC 8410): a fixed prefix, then the seed.
        const PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let failed = |e: rcgen::Error| {
            StrategyError::NoLink(format!("deriving the certificate from the agreed key: {e}"))
        };
        let mut der = PREFIX.to_vec();
        der.extend_from_slice(seed);
        let key = PrivatePkcs8KeyDer::from(der);
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)
            .map_err(failed)?;
        let cert = rcgen::CertificateParams::new(vec!["nettool".to_owned()])
            .and_then(|p| p.self_signed(&pair))
            .map_err(failed)?;
        let cert = cert.der().clone();
        let fingerprint = Sha256::digest(&cert).into();
        Ok(Self {
            cert,
            key,
            fingerprint,
        })
    }

    /// The certificate's private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// The one crypto provider of the tree: ring, with AES-128-GCM preferred.
///
/// rustls' default order puts AES-256-GCM first; AES-128-GCM (TLS 1.3's and QUIC's
/// mandatory suite) takes 10 AES rounds instead of 14, which is a fifth less CPU per byte on
/// the links (the cipher was a fifth of a `connect` process's time). `NETTOOL_TLS_SUITES=default`
/// keeps rustls' order, for measuring.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    if std::env::var("NETTOOL_TLS_SUITES").as_deref() != Ok("default") {
        use rustls::crypto::ring::cipher_suite as cs;
        p.cipher_suites = vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ];
    }
    Arc::new(p)
}

/// A TLS setup error as a strategy error saying what was being set up.
pub fn tls_error(what: &str, e: impl std::fmt::Display) -> StrategyError {
    StrategyError::NoLink(format!("{what}: {e}"))
}

/// The certificate a link's TLS accepts from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPin {
    /// The one with the fingerprint from the peer's offer, checked in the handshake.
    Offered([u8; 32]),
    /// The one derived from the agreed key ([`Identity::derive`]), checked right after the
    /// handshake and before anything is written ([`PeerPin::check`]): both ends complete TLS
    /// (each signature still checked), so each refuses another key's certificate itself and
    /// says so, whatever the path does to a TLS alert.
    Derived([u8; 32]),
}

impl PeerPin {
    /// After the handshake: whether the peer's certificate (`certs`, the peer's chain) is
    /// the derived one ([`NotDerived`] if not).
    pub fn check(&self, certs: Option<&[CertificateDer<'_>]>) -> io::Result<()> {
        let Self::Derived(expected) = self else {
            return Ok(());
        };
        let got: Option<[u8; 32]> = certs
            .and_then(<[_]>::first)
            .map(|c| Sha256::digest(c.as_ref()).into());
        if got == Some(*expected) {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, NotDerived))
        }
    }
}

/// Accepts exactly the certificate with this SHA-256 fingerprint ([`PeerPin::Offered`]), or
/// any whose signature checks ([`PeerPin::Derived`]: checked after the handshake).
#[derive(Debug)]
pub struct Pinned {
    pin: PeerPin,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let PeerPin::Offered(fingerprint) = self.pin else {
            return Ok(());
        };
        let got: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        if got == fingerprint {
            Ok(())
        } else {
            Err(rustls::Error::General(
                "certificate does not match the fingerprint in the offer".into(),
            ))
        }
    }

    fn verify12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, false, message, cert, dss)
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, true, message, cert, dss)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks a TLS handshake signature (`tls13`: TLS 1.3's, else 1.2's) with `provider`'s
/// algorithms: the part of certificate verification that pinning does not replace.
pub(crate) fn verify_signature(
    provider: &CryptoProvider,
    tls13: bool,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let algorithms = &provider.signature_verification_algorithms;
    if tls13 {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    } else {
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// The peer's certificate is not the one derived from the agreed key ([`PeerPin::check`]):
/// on a keyed link that is a failed authentication (another key: a wrong secret or code, or a
/// man in the middle).
#[derive(Debug, thiserror::Error)]
#[error("the peer's certificate is not the one derived from the agreed key")]
pub struct NotDerived;

/// Whether `e` (a TLS or QUIC upgrade's error) is [`NotDerived`].
pub fn not_derived(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NotDerived>())
}

/// The fingerprint as lowercase hex, for offers.
pub fn fingerprint_hex(fp: &[u8; 32]) -> String {
    hex::encode(fp)
}

/// Parses a fingerprint from an offer.
pub fn parse_fingerprint(hex_text: &str) -> Result<[u8; 32], StrategyError> {
    let bytes = hex::decode(hex_text)
        .map_err(|e| StrategyError::BadOffer(format!("certificate fingerprint: {e}")))?;
    bytes
        .try_into()
        .map_err(|_| StrategyError::BadOffer("certificate fingerprint is not 32 bytes".into()))
}

/// TLS client configuration: our certificate for client authentication, the peer's pinned.
pub fn client_tls(
    identity: &Identity,
    pin: PeerPin,
) -> Result<rustls::ClientConfig, StrategyError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS client config", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key())
        .map_err(|e| tls_error("TLS client certificate", e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// TLS server configuration: our certificate, the peer's required and pinned.
pub fn server_tls(
    identity: &Identity,
    pin: PeerPin,
) -> Result<rustls::ServerConfig, StrategyError> {
    let provider = provider();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS server config", e))?
        .with_client_cert_verifier(Arc::new(Pinned { pin, provider }))
        .with_single_cert(vec![identity.cert.clone()], identity.key())
        .map_err(|e| tls_error("TLS server certificate", e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Runs TLS over raw links of one attempt: the first peer is the TLS client, the second the
/// server; both pin the other's certificate.
#[derive(Clone)]
pub struct LinkTls {
    role: Role,
    pin: PeerPin,
    connector: tokio_rustls::TlsConnector,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl LinkTls {
    /// TLS for this attempt: our identity, the peer's certificate pinned.
    pub fn new(role: Role, identity: &Identity, pin: PeerPin) -> Result<Self, StrategyError> {
        Ok(Self {
            role,
            pin,
            connector: tokio_rustls::TlsConnector::from(Arc::new(client_tls(identity, pin)?)),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(identity, pin)?)),
        })
    }

    /// TLS over `stream`; returns the encrypted stream and this TLS session's exporter value
    /// for the link handshake's channel binding.
    ///
    /// The stream is read through a [`READ_BUF`] buffer: rustls reads the socket 4 KiB at a
    /// time, which costs a system call (and a reactor round) per 4 KiB at line rate.
    pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> io::Result<(tokio_rustls::TlsStream<BufReader<S>>, Vec<u8>)> {
        let stream = BufReader::with_capacity(read_buf(), stream);
        let mut binding = vec![0u8; 32];
        let mut tls: tokio_rustls::TlsStream<BufReader<S>> = match self.role {
            Role::First => {
                let name = ServerName::try_from("nettool.peer").expect("static name is valid");
                let s = self.connector.connect(name, stream).await?;
                self.pin.check(s.get_ref().1.peer_certificates())?;
                s.get_ref()
                    .1
                    .export_keying_material(&mut binding, EXPORTER_LABEL, None)
                    .map_err(io::Error::other)?;
                s.into()
            }
            Role::Second => {
                let s = self.acceptor.accept(stream).await?;
                self.pin.check(s.get_ref().1.peer_certificates())?;
                s.get_ref()
                    .1
                    .export_keying_material(&mut binding, EXPORTER_LABEL, None)
                    .map_err(io::Error::other)?;
                s.into()
            }
        };
        // Room for 4 full records of plaintext before a write waits for the socket.
        match &mut tls {
            tokio_rustls::TlsStream::Client(c) => c.get_mut().1.set_buffer_limit(Some(SEND_BUF)),
            tokio_rustls::TlsStream::Server(c) => c.get_mut().1.set_buffer_limit(Some(SEND_BUF)),
        }
        Ok((tls, binding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_pinned_by_fingerprint() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let pinned = Pinned {
            pin: PeerPin::Offered(a.fingerprint),
            provider: provider(),
        };
        assert!(pinned.check(&a.cert).is_ok());
        assert!(pinned.check(&b.cert).is_err());
        assert_eq!(
            parse_fingerprint(&fingerprint_hex(&a.fingerprint)).unwrap(),
            a.fingerprint
        );
        assert!(parse_fingerprint("zz").is_err());
        assert!(parse_fingerprint("abcd").is_err());
    }

    #[tokio::test]
    async fn tls_links_pin_both_ends_and_agree_on_the_exporter() {
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let first = LinkTls::new(Role::First, &a, PeerPin::Offered(b.fingerprint)).unwrap();
        let second = LinkTls::new(Role::Second, &b, PeerPin::Offered(a.fingerprint)).unwrap();
        let (x, y) = tokio::io::duplex(1 << 16);
        let (rx, ry) = tokio::join!(first.upgrade(x), second.upgrade(y));
        let ((tx, bx), (ty, by)) = (rx.unwrap(), ry.unwrap());
        assert_eq!(bx, by);
        assert_eq!(bx.len(), 32);
        // AES-128-GCM is what both ends choose (the CPU per byte; see `provider`).
        for t in [&tx, &ty] {
            let suite = t.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
            assert_eq!(
                suite,
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
                "negotiated suite"
            );
        }

        // A third identity is refused by both sides.
        let c = Identity::generate().unwrap();
        let impostor = LinkTls::new(Role::Second, &c, PeerPin::Offered(a.fingerprint)).unwrap();
        let (x, y) = tokio::io::duplex(1 << 16);
        let (rx, ry) = tokio::join!(first.upgrade(x), impostor.upgrade(y));
        assert!(rx.is_err() && ry.is_err());
    }

    #[tokio::test]
    async fn derived_certificates_are_the_same_on_both_sides_and_only_there() {
        let (seed_a, seed_b) = ([1u8; 32], [2u8; 32]);
        let a = Identity::derive(&seed_a).unwrap();
        // The peer computes the very bytes: that is what it pins.
        assert_eq!(Identity::derive(&seed_a).unwrap().cert, a.cert);
        let b = Identity::derive(&seed_b).unwrap();
        assert_ne!(a.fingerprint, b.fingerprint);
        let first = LinkTls::new(Role::First, &a, PeerPin::Derived(b.fingerprint)).unwrap();
        let second = LinkTls::new(Role::Second, &b, PeerPin::Derived(a.fingerprint)).unwrap();
        let (x, y) = tokio::io::duplex(1 << 16);
        let (rx, ry) = tokio::join!(first.upgrade(x), second.upgrade(y));
        assert_eq!(rx.unwrap().1, ry.unwrap().1);
        // Another seed (another key): the TLS handshake completes and each end refuses the
        // other's certificate itself (no alert needed), before anything is written: the
        // client ...
        let c = Identity::derive(&[3u8; 32]).unwrap();
        let other = LinkTls::new(Role::Second, &c, PeerPin::Derived(a.fingerprint)).unwrap();
        let (x, y) = tokio::io::duplex(1 << 16);
        let (rx, _) = tokio::join!(first.upgrade(x), other.upgrade(y));
        assert!(not_derived(&rx.err().unwrap()));
        // ... and the server (here with a client that took its certificate).
        let lenient = LinkTls::new(Role::First, &a, PeerPin::Derived(c.fingerprint)).unwrap();
        let strict = LinkTls::new(Role::Second, &c, PeerPin::Derived(b.fingerprint)).unwrap();
        let (x, y) = tokio::io::duplex(1 << 16);
        let (rx, ry) = tokio::join!(lenient.upgrade(x), strict.upgrade(y));
        assert!(rx.is_ok());
        assert!(not_derived(&ry.err().unwrap()));
    }
}
