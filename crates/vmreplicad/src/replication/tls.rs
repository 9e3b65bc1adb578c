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

/// The recovery server's check of client certificates: chained to a CA of `certs/trusted/`. Kept
/// apart from the configuration too, so that connections already open check their peer's chain
/// again when the trusted CAs change.
pub fn client_verifier(cert_dir: &Path) -> Result<Arc<dyn ClientCertVerifier>, PeerTlsError> {
    let roots = trusted_roots(cert_dir)?;
    Ok(WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?)
}

/// The recovery server's listener: its certificate by `thumbprint`; a client certificate that
/// `verifier` accepts is required (no certificate: alert `certificate_required`).
pub fn server_config(
    cert_dir: &Path,
    thumbprint: &str,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<Arc<ServerConfig>, PeerTlsError> {
    let identity = find_identity(cert_dir, thumbprint)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
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
