//! The control channel's security: TLS to the rendezvous server, whose key the peer pins.
//!
//! The control connection carries the session name, both peers' candidate addresses and the
//! server token, so it runs over TLS. The server has a persistent identity key; a peer checks
//! the key's fingerprint ([`KeyFingerprint`], SHA-256 of the certificate's public key) against,
//! in this order:
//!
//! 1. a pin given by the user (`--server-key sha256:…`): only that key is accepted (a match
//!    also replaces the server's entry in the known-servers file, which is how a changed key
//!    is accepted);
//! 2. the server's entry in the known-servers file (trust on first use, like ssh's
//!    `known_hosts`): a different key is refused with an error that names both fingerprints;
//! 3. with neither: a certificate for the server's DNS name that the system's roots verify is
//!    accepted (a server with a certificate from a public CA); otherwise the key is trusted on
//!    first use and written to the file.
//!
//! [`ControlSecurity::Plain`] (`--insecure-control`) is the old plain JSON, readable by anyone
//! on the path. Relay connections stay plain: after the attach frame (which carries only the
//! random per-pairing relay token, no session name) their bytes are the link's own end-to-end
//! encryption.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::client::ClientError;

/// ALPN protocol name of the TLS control channel.
pub const CONTROL_ALPN: &[u8] = b"nettool-control/1";

/// The first byte of a TLS connection (a handshake record): how a server tells TLS from
/// plain JSON (which starts with `{`) on one port.
pub const TLS_FIRST_BYTE: u8 = 0x16;

/// SHA-256 of a server's public key (the certificate's SubjectPublicKeyInfo), written
/// `sha256:` and 64 hex digits. It stays the same when the certificate is renewed for the
/// same key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub [u8; 32]);

impl KeyFingerprint {
    /// The fingerprint of a certificate's public key.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Result<Self, String> {
        let parsed = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| format!("cannot parse the server's certificate: {e:?}"))?;
        let spki = parsed.subject_public_key_info();
        Ok(Self(Sha256::digest(spki.as_ref()).into()))
    }
}

impl std::fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for KeyFingerprint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let hex_text = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .ok_or_else(|| {
                format!(
                    "server key '{s}' must be written sha256:<64 hex digits> (as the server \
                     prints it at start)"
                )
            })?;
        let bytes = hex::decode(hex_text)
            .map_err(|e| format!("server key '{s}': not hex after 'sha256:' ({e})"))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            format!("server key '{s}': expected 64 hex digits after 'sha256:' (32 bytes)")
        })?;
        Ok(Self(bytes))
    }
}

/// How a peer secures its control connections to the rendezvous server.
#[derive(Debug, Clone, Default)]
pub enum ControlSecurity {
    /// Plain JSON (`--insecure-control`): the session name, addresses and server token are
    /// readable and forgeable on the path. The library's default, for in-process tests; the
    /// `nettool` CLI uses TLS unless told otherwise.
    #[default]
    Plain,
    /// TLS, the server's key checked by this trust.
    Tls(Arc<ServerTrust>),
}

/// Which rendezvous server keys a peer accepts (see the module documentation).
#[derive(Debug, Default)]
pub struct ServerTrust {
    /// The key the user pinned (`--server-key`).
    pub pin: Option<KeyFingerprint>,
    /// The known-servers file (trust on first use); `None`: no file, so without a pin any
    /// key is accepted for this run only.
    pub known: Option<PathBuf>,
    /// The server's DNS name, when it was given as one: sent as SNI, and checked against a
    /// certificate from a public CA.
    pub name: Option<String>,
    /// The system's root certificates, loaded on first need.
    roots: OnceLock<Option<Arc<rustls::RootCertStore>>>,
}

impl ServerTrust {
    /// A trust with this pin, known-servers file and server name.
    pub fn new(pin: Option<KeyFingerprint>, known: Option<PathBuf>, name: Option<String>) -> Self {
        Self {
            pin,
            known,
            name,
            roots: OnceLock::new(),
        }
    }

    /// The system's root certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured); `None`
    /// when there are none.
    fn roots(&self) -> Option<Arc<rustls::RootCertStore>> {
        self.roots
            .get_or_init(|| {
                let loaded = rustls_native_certs::load_native_certs();
                let mut store = rustls::RootCertStore::empty();
                let (added, _) = store.add_parsable_certificates(loaded.certs);
                (added > 0).then(|| Arc::new(store))
            })
            .clone()
    }
}

/// One entry of a known-servers file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownEntry {
    /// The server's address as connected to (`IP:PORT`).
    pub server: String,
    /// Its key.
    pub key: KeyFingerprint,
    /// The entry's line number (from 1).
    pub line: usize,
}

/// Reads the entry for `server` from a known-servers file (`None`: no file, or no entry).
/// Lines are `IP:PORT sha256:HEX`; `#` starts a comment; a malformed line is an error naming
/// it.
pub fn known_entry(path: &Path, server: SocketAddr) -> Result<Option<KnownEntry>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let want = server.to_string();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "{} line {}: expected 'IP:PORT sha256:HEX'",
                path.display(),
                i + 1
            ));
        };
        if addr == want {
            let key = key
                .parse()
                .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
            return Ok(Some(KnownEntry {
                server: want,
                key,
                line: i + 1,
            }));
        }
    }
    Ok(None)
}

/// Records `key` for `server` in a known-servers file, replacing its entry if any. The file
/// is replaced atomically (written beside it, then renamed).
pub fn remember(path: &Path, server: SocketAddr, key: KeyFingerprint) -> std::io::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let want = server.to_string();
    let mut out = String::new();
    if old.is_empty() {
        out.push_str(
            "# nettool: rendezvous servers' keys, trusted on first use (IP:PORT sha256:HEX)\n",
        );
    }
    for line in old.lines() {
        if line.split_whitespace().next() != Some(want.as_str()) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!("{want} {key}\n"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!(
        "tmp{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, path)
}

/// A control connection: plain TCP or TLS over it.
pub trait ControlIo: AsyncRead + AsyncWrite + Send + Sync + Unpin + std::fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + std::fmt::Debug> ControlIo for T {}

/// What the server's key was expected to be, and who said so.
#[derive(Debug, Clone)]
enum Expected {
    Pinned(KeyFingerprint),
    Known(KnownEntry, PathBuf),
}

impl Expected {
    fn key(&self) -> KeyFingerprint {
        match self {
            Self::Pinned(k) => *k,
            Self::Known(e, _) => e.key,
        }
    }
}

/// What the verifier saw of the server's certificate.
#[derive(Debug, Default)]
struct Seen {
    key: Option<KeyFingerprint>,
    /// A public CA's certificate for the server's name, verified with the system's roots.
    ca_verified: bool,
}

/// The control channel's certificate verifier: see the module documentation.
#[derive(Debug)]
struct Verifier {
    expected: Option<Expected>,
    /// Verifies public CA certificates (only when nothing is expected and a name was given).
    webpki: Option<Arc<dyn ServerCertVerifier>>,
    seen: Mutex<Seen>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = KeyFingerprint::of_cert(end_entity).map_err(rustls::Error::General)?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.key = Some(key);
        if let Some(expected) = &self.expected {
            return if expected.key() == key {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(rustls::Error::General("the server's key changed".into()))
            };
        }
        if let Some(webpki) = &self.webpki {
            if webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .is_ok()
            {
                seen.ca_verified = true;
            }
        }
        // Nothing expected: trusted on first use (the caller records it).
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crate::secure::verify_signature(&self.provider, false, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crate::secure::verify_signature(&self.provider, true, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The error for a server whose key is not the expected one: names both keys and how to
/// accept the new one.
fn changed_key(server: SocketAddr, expected: &Expected, got: KeyFingerprint) -> ClientError {
    let (said, accept) = match expected {
        Expected::Pinned(k) => (
            format!("--server-key (or `server-key` in the config) pins {k}"),
            format!("If the server's key changed on purpose, pin the new one: --server-key {got}"),
        ),
        Expected::Known(entry, path) => (
            format!(
                "{} line {} says {} (trusted on first use)",
                path.display(),
                entry.line,
                entry.key
            ),
            format!(
                "If the server's key changed on purpose, accept the new one with --server-key \
                 {got} (this replaces the entry), or delete line {} of {}",
                entry.line,
                path.display()
            ),
        ),
    };
    ClientError::ServerKey(format!(
        "the rendezvous server at {server} presented key {got}, but {said}. Someone may be \
         intercepting the connection, or the server got a new identity; nothing was sent. \
         {accept}."
    ))
}

/// Secures a new control connection to `server` as `security` says: plain, or TLS with the
/// server's key checked (and, on first use, recorded). Fails before sending anything when the
/// key is not the expected one ([`ClientError::ServerKey`]).
pub async fn secure(
    stream: TcpStream,
    server: SocketAddr,
    security: &ControlSecurity,
    deadline: Instant,
) -> Result<Box<dyn ControlIo>, ClientError> {
    let trust = match security {
        ControlSecurity::Plain => return Ok(Box::new(stream)),
        ControlSecurity::Tls(trust) => trust.clone(),
    };
    // The server's entry, read once: what to expect without a pin, and what a pin replaces.
    let known = match &trust.known {
        Some(path) => match known_entry(path, server) {
            Ok(entry) => entry.map(|e| (e, path.clone())),
            // With a pin the file is not needed: a malformed one only matters without.
            Err(_) if trust.pin.is_some() => None,
            Err(e) => return Err(ClientError::Refused(e)),
        },
        None => None,
    };
    let expected = match (trust.pin, &known) {
        (Some(pin), _) => Some(Expected::Pinned(pin)),
        (None, Some((entry, path))) => Some(Expected::Known(entry.clone(), path.clone())),
        (None, None) => None,
    };
    let provider = crate::secure::provider();
    let name = trust
        .name
        .as_deref()
        .and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .filter(|n| matches!(n, ServerName::DnsName(_)));
    let webpki = match (&expected, &name) {
        (None, Some(_)) => trust.roots().and_then(|roots| {
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .ok()
                .map(|v| v as Arc<dyn ServerCertVerifier>)
        }),
        _ => None,
    };
    let verifier = Arc::new(Verifier {
        expected: expected.clone(),
        webpki,
        seen: Mutex::new(Seen::default()),
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Lost(format!("TLS client config: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    let sni = name.unwrap_or_else(|| ServerName::IpAddress(server.ip().into()));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let handshake = crate::client::within(
        deadline,
        "the rendezvous server's TLS handshake",
        connector.connect(sni, stream),
    )
    .await?;
    let seen = std::mem::take(&mut *verifier.seen.lock().unwrap_or_else(|p| p.into_inner()));
    let tls_stream = match handshake {
        Ok(s) => s,
        Err(e) => {
            if let (Some(expected), Some(got)) = (&expected, seen.key) {
                if expected.key() != got {
                    return Err(changed_key(server, expected, got));
                }
            }
            return Err(ClientError::Lost(format!(
                "TLS with the rendezvous server at {server} failed: {e}. A server that predates \
                 the TLS control channel (or runs with --insecure-control only) needs \
                 --insecure-control on this side too"
            )));
        }
    };
    let Some(key) = seen.key else {
        return Err(ClientError::Lost(
            "TLS with the rendezvous server: no certificate was checked".into(),
        ));
    };
    if let Some(path) = &trust.known {
        let record = match &expected {
            // A pin that matched replaces a different entry (how a new key is accepted); it
            // adds none (the pin is the user's to keep).
            Some(Expected::Pinned(_)) => known.as_ref().is_some_and(|(e, _)| e.key != key),
            Some(Expected::Known(..)) => false,
            None => !seen.ca_verified,
        };
        if record {
            match remember(path, server, key) {
                Ok(()) if expected.is_none() => tracing::warn!(
                    "first connection to the rendezvous server at {server}: trusting its key \
                     {key} from now on (stored in {}); pin it with --server-key to check it \
                     the first time too",
                    path.display()
                ),
                Ok(()) => {}
                Err(e) => tracing::warn!(
                    "could not store the server key {key} in {}: {e}",
                    path.display()
                ),
            }
        }
    }
    Ok(Box::new(tls_stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_and_print_as_sha256_hex() {
        let hex64 = "ab".repeat(32);
        let fp: KeyFingerprint = format!("sha256:{hex64}").parse().unwrap();
        assert_eq!(fp.to_string(), format!("sha256:{hex64}"));
        assert_eq!(format!("SHA256:{hex64}").parse::<KeyFingerprint>(), Ok(fp));
        for (bad, says) in [
            (hex64.clone(), "must be written sha256:"),
            ("sha256:zz".to_owned(), "not hex"),
            ("sha256:abcd".to_owned(), "64 hex digits"),
        ] {
            let err = bad.parse::<KeyFingerprint>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn known_servers_are_read_written_and_replaced() {
        let dir = std::env::temp_dir().join(format!(
            "nettool-known-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let path = dir.join("nettool").join("known_servers");
        let a: SocketAddr = "192.0.2.1:8877".parse().unwrap();
        let b: SocketAddr = "[2001:db8::1]:8877".parse().unwrap();
        let (k1, k2) = (KeyFingerprint([1; 32]), KeyFingerprint([2; 32]));
        assert_eq!(known_entry(&path, a).unwrap(), None, "no file yet");
        remember(&path, a, k1).unwrap();
        remember(&path, b, k1).unwrap();
        remember(&path, a, k2).unwrap();
        let entry = known_entry(&path, a).unwrap().unwrap();
        assert_eq!(
            (entry.key, entry.line),
            (k2, 3),
            "replaced, moved to the end"
        );
        assert_eq!(known_entry(&path, b).unwrap().unwrap().key, k1);
        std::fs::write(&path, "192.0.2.1:8877\n").unwrap();
        let err = known_entry(&path, a).unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("IP:PORT sha256:HEX"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
