//! The server's TLS identity: a persistent key (created on first start), or a certificate
//! from a public CA; and the TLS configuration of the control channel.
//!
//! Peers pin the key's fingerprint ([`KeyFingerprint`]: SHA-256 of the public key), so the
//! self-signed certificate made from the key at each start may differ; the key must not.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nettool_core::control::{KeyFingerprint, CONTROL_ALPN};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why an identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The key file could not be read, created or parsed.
    #[error("server identity {path}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The certificate chain (`--tls-cert`) could not be read or parsed.
    #[error("TLS certificate {path}: {why}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// rustls refused the certificate and key together.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// The server's TLS identity.
#[derive(Debug)]
pub struct ServerIdentity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    fingerprint: KeyFingerprint,
}

impl ServerIdentity {
    /// Loads the identity key at `path`, or creates it there (mode 0600, its directory too) on
    /// first start. Safe when several servers start at once with the same file: the key is
    /// written beside it and linked into place, so a reader sees all of it or none, and the
    /// first writer wins.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let key_err = |why: String| IdentityError::Key {
            path: path.to_owned(),
            why,
        };
        let pem = match std::fs::read_to_string(path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_key(path).map_err(|e| key_err(e.to_string()))?
            }
            Err(e) => return Err(key_err(e.to_string())),
        };
        let key_pair = rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| key_err(format!("not a private key in PEM ({e})")))?;
        Self::from_key_pair(&key_pair).map_err(key_err)
    }

    /// A new key kept in memory only (an embedded server, e.g. `nettool demo`, whose peers are
    /// given its fingerprint directly).
    pub fn ephemeral() -> Result<Self, IdentityError> {
        let key_pair = rcgen::KeyPair::generate().map_err(|e| IdentityError::Tls(e.to_string()))?;
        Self::from_key_pair(&key_pair).map_err(IdentityError::Tls)
    }

    fn from_key_pair(key_pair: &rcgen::KeyPair) -> Result<Self, String> {
        let cert = rcgen::CertificateParams::new(vec!["nettool-rendezvous".to_owned()])
            .and_then(|p| p.self_signed(key_pair))
            .map_err(|e| format!("cannot make its certificate: {e}"))?;
        let key = PrivateKeyDer::try_from(key_pair.serialize_der()).map_err(str::to_owned)?;
        Self::new(vec![cert.der().clone()], key).map_err(|e| e.to_string())
    }

    /// A certificate chain and its key from PEM files (`--tls-cert`, `--tls-key`), e.g. from a
    /// public CA; peers that were given the server's DNS name verify it with their system's
    /// roots, and the key's fingerprint can still be pinned.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| IdentityError::Cert {
                path: cert.to_owned(),
                why: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(IdentityError::Cert {
                path: cert.to_owned(),
                why: "no certificate in the file".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| IdentityError::Key {
            path: key.to_owned(),
            why: e.to_string(),
        })?;
        Self::new(certs, key)
    }

    fn new(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, IdentityError> {
        let fingerprint = KeyFingerprint::of_cert(&certs[0]).map_err(IdentityError::Tls)?;
        Ok(Self {
            certs,
            key,
            fingerprint,
        })
    }

    /// Its certificate (the first of the chain): a test's trust anchor.
    #[cfg(test)]
    pub(crate) fn certificate(&self) -> CertificateDer<'static> {
        self.certs[0].clone()
    }

    /// The fingerprint peers pin (`--server-key`).
    pub fn fingerprint(&self) -> KeyFingerprint {
        self.fingerprint
    }

    /// The control channel's TLS configuration (TLS 1.3, the control ALPN).
    pub fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let provider = nettool_core::secure::provider();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
        // Peers make a new TLS client per connection and never resume: no tickets to issue,
        // no session cache to hold.
        tls.send_tls13_tickets = 0;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        // After the handshake the server protects the records itself ([`crate::sealed`]).
        tls.enable_secret_extraction = true;
        Ok(Arc::new(tls))
    }
}

/// Creates a new key at `path` and returns its PEM (or the PEM another process created there
/// first).
fn create_key(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let key = rcgen::KeyPair::generate().map_err(std::io::Error::other)?;
    let pem = key.serialize_pem();
    let tmp = path.with_extension(format!(
        "new{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
    }
    // A hard link never replaces: when another server got there first, use its key.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(pem),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(path),
        Err(e) => Err(e),
    }
}
