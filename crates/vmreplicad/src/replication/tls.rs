//! TLS for host-to-host replication (docs/protocol.md §2.1): TLS 1.3 only, ALPN `h2` only, and a
//! certificate on both sides, each chained to a CA in `<data-dir>/certs/trusted/`.

use std::path::Path;
use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

use super::peer_certs::{find_identity, trusted_roots, PeerCertError};

#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    #[error(transparent)]
    Certificate(#[from] PeerCertError),
    #[error("the TLS configuration is not usable: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the trusted CAs are not usable: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The recovery server's TLS: its configuration, and the verifier of client certificates in it
/// (kept apart too, to check again the chains of connections already open when the trusted CAs
/// change).
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub verifier: Arc<dyn ClientCertVerifier>,
}

/// The recovery server's listener: its certificate by `thumbprint`; a client certificate from a
/// trusted CA is required (no certificate: alert `certificate_required`).
pub fn server_config(cert_dir: &Path, thumbprint: &str) -> Result<ServerTls, PeerTlsError> {
    let identity = find_identity(cert_dir, thumbprint)?;
    let roots = trusted_roots(cert_dir)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        verifier,
    })
}

/// The primary's side: presents the certificate `thumbprint`, checks the server's chain and name.
pub fn client_config(cert_dir: &Path, thumbprint: &str) -> Result<Arc<ClientConfig>, PeerTlsError> {
    let identity = find_identity(cert_dir, thumbprint)?;
    let roots = trusted_roots(cert_dir)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
