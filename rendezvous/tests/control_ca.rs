//! A server with a certificate from a CA (`--tls-cert`/`--tls-key`): a peer that names the
//! server by its DNS name accepts it when the system's roots verify it, without recording it;
//! when they do not, it falls back to trust on first use. The "system roots" here are a test
//! CA given through `SSL_CERT_FILE` (honoured by rustls-native-certs), so this file holds one
//! test: the variable is set before anything reads it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nettool_core::client::RendezvousClient;
use nettool_core::control::{known_entry, ControlSecurity, ServerTrust};
use nettool_rendezvous::{RendezvousServer, ServerConfig, ServerIdentity};

/// A CA and a leaf for `localhost` signed by it, as PEM files in `dir`: (ca, leaf, leaf key).
fn ca_and_leaf(
    dir: &Path,
    tag: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("nettool test CA {tag}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let paths = (
        dir.join(format!("{tag}-ca.pem")),
        dir.join(format!("{tag}-leaf.pem")),
        dir.join(format!("{tag}-leaf.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

async fn serve(cert: &Path, key: &Path) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let identity = ServerIdentity::from_pem_files(cert, key).unwrap();
    let config = ServerConfig {
        tls: Some(identity.tls_config().unwrap()),
        ..ServerConfig::default()
    };
    let server = RendezvousServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    (addr, tokio::spawn(server.run()))
}

/// A join through `security` that waits for its peer: Ok once the server has it (the TLS
/// handshake passed), the error otherwise.
async fn reaches(addr: SocketAddr, security: ControlSecurity) -> Result<(), String> {
    let names = ["s".to_owned()];
    let deadline = Instant::now() + Duration::from_secs(5);
    let joining = tokio::spawn(async move {
        RendezvousClient::join_any(&[addr], &security, "ca", &names, None, deadline, || {}).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    if joining.is_finished() {
        return Err(joining.await.unwrap().unwrap_err().to_string());
    }
    joining.abort();
    Ok(())
}

#[tokio::test]
async fn a_ca_certificate_for_the_name_is_accepted_by_the_system_roots() {
    let dir = std::env::temp_dir().join(format!("nettool-control-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, leaf, key) = ca_and_leaf(&dir, "trusted");
    let (_, other_leaf, other_key) = ca_and_leaf(&dir, "unknown");
    // The only test of this binary: nothing has read the variable yet.
    std::env::set_var("SSL_CERT_FILE", &ca);
    std::env::remove_var("SSL_CERT_DIR");
    let known = dir.join("known_servers");
    let trust = |name: &str| {
        ControlSecurity::Tls(Arc::new(ServerTrust::new(
            None,
            Some(known.clone()),
            Some(name.to_owned()),
        )))
    };

    let (addr, server) = serve(&leaf, &key).await;
    reaches(addr, trust("localhost")).await.unwrap();
    assert_eq!(
        known_entry(&known, addr).unwrap(),
        None,
        "a CA-verified server is not pinned on first use"
    );
    server.abort();

    // Signed by a CA the roots do not hold: trusted on first use instead, and remembered.
    let (addr, server) = serve(&other_leaf, &other_key).await;
    reaches(addr, trust("localhost")).await.unwrap();
    assert!(
        known_entry(&known, addr).unwrap().is_some(),
        "an unverified server is remembered on first use"
    );
    server.abort();
    let _ = std::fs::remove_dir_all(dir);
}
