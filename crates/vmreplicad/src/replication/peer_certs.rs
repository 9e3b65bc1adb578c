//! Certificates for host-to-host replication (docs/protocol.md §2.2): this host's identity chosen
//! by thumbprint from `<data-dir>/certs/` (LocalMachine\My), the CAs trusted for peers from
//! `<data-dir>/certs/trusted/`, and the DNS names a peer's certificate carries.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha1::{Digest, Sha1};
use sha2::Sha256;

#[derive(Debug, thiserror::Error)]
pub enum PeerCertError {
    #[error("the certificate thumbprint {0:?} is not 40 (SHA-1) or 64 (SHA-256) hex digits")]
    BadThumbprint(String),
    #[error("no certificate with thumbprint {thumbprint} in {dir}")]
    NotFound { thumbprint: String, dir: String },
    #[error("the certificate {thumbprint} has no usable private key: {why}")]
    NoKey { thumbprint: String, why: String },
    #[error("the certificate {thumbprint} is not valid now (valid {not_before} to {not_after})")]
    Expired {
        thumbprint: String,
        not_before: String,
        not_after: String,
    },
    #[error(
        "no trusted CA certificate in {0} (put the CA that signed your hosts' certificates there)"
    )]
    NoTrustedCa(String),
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
}

/// A thumbprint without case, spaces or colons, checked to be SHA-1 or SHA-256 sized hex.
pub fn normalize_thumbprint(t: &str) -> Result<String, PeerCertError> {
    let clean: String = t
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let ok = matches!(clean.len(), 40 | 64) && clean.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(PeerCertError::BadThumbprint(t.to_string()));
    }
    Ok(clean)
}

/// SHA-1 of a certificate's DER, as Windows shows thumbprints (upper-case hex).
pub fn sha1_thumbprint(der: &[u8]) -> String {
    hex::encode_upper(Sha1::digest(der))
}

fn matches_thumbprint(der: &[u8], wanted: &str) -> bool {
    match wanted.len() {
        40 => hex::encode(Sha1::digest(der)) == wanted,
        _ => hex::encode(Sha256::digest(der)) == wanted,
    }
}

/// This host's certificate chain and key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub thumbprint: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

fn store_files(dir: &Path) -> Result<Vec<PathBuf>, PeerCertError> {
    let read_err = |e: std::io::Error| PeerCertError::Read {
        path: dir.display().to_string(),
        why: e.to_string(),
    };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("pem" | "crt"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(read_err(e)),
    };
    files.sort();
    Ok(files)
}

/// The certificate with `thumbprint` in the store `dir`, its chain (the further certificates of its
/// PEM file) and its key (a PRIVATE KEY block in the same file, else `<stem>.key` beside it, which
/// group and others must not be able to read).
pub fn find_identity(dir: &Path, thumbprint: &str) -> Result<Identity, PeerCertError> {
    let wanted = normalize_thumbprint(thumbprint)?;
    for file in store_files(dir)? {
        let Ok(chain) =
            CertificateDer::pem_file_iter(&file).and_then(|it| it.collect::<Result<Vec<_>, _>>())
        else {
            continue;
        };
        let Some(leaf) = chain.first() else { continue };
        if !matches_thumbprint(leaf, &wanted) {
            continue;
        }
        let shown = sha1_thumbprint(leaf);
        check_validity(leaf, &shown)?;
        let key = match PrivateKeyDer::from_pem_file(&file) {
            Ok(k) => k,
            Err(_) => {
                let key_file = file.with_extension("key");
                let meta = std::fs::metadata(&key_file).map_err(|e| PeerCertError::NoKey {
                    thumbprint: shown.clone(),
                    why: format!("{}: {e}", key_file.display()),
                })?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(PeerCertError::NoKey {
                        thumbprint: shown,
                        why: format!(
                            "{} is readable by group or others (chmod 600 it)",
                            key_file.display()
                        ),
                    });
                }
                PrivateKeyDer::from_pem_file(&key_file).map_err(|e| PeerCertError::NoKey {
                    thumbprint: shown.clone(),
                    why: format!("{}: {e}", key_file.display()),
                })?
            }
        };
        return Ok(Identity {
            chain,
            key,
            thumbprint: shown,
        });
    }
    Err(PeerCertError::NotFound {
        thumbprint: thumbprint.to_string(),
        dir: dir.display().to_string(),
    })
}

fn check_validity(der: &[u8], thumbprint: &str) -> Result<(), PeerCertError> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Ok(()); // rustls rejects what cannot be parsed, with its own message.
    };
    let v = cert.validity();
    if !v.is_valid() {
        return Err(PeerCertError::Expired {
            thumbprint: thumbprint.to_string(),
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
        });
    }
    Ok(())
}

/// The CAs trusted for peers: every certificate in `<cert_dir>/trusted/`.
pub fn trusted_roots(cert_dir: &Path) -> Result<Arc<RootCertStore>, PeerCertError> {
    let dir = cert_dir.join("trusted");
    let mut roots = RootCertStore::empty();
    for file in store_files(&dir)? {
        let certs = CertificateDer::pem_file_iter(&file)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| PeerCertError::Read {
                path: file.display().to_string(),
                why: e.to_string(),
            })?;
        for c in certs {
            let _ = roots.add(c);
        }
    }
    if roots.is_empty() {
        return Err(PeerCertError::NoTrustedCa(dir.display().to_string()));
    }
    Ok(Arc::new(roots))
}

/// What the trusted CAs of the store `cert_dir` are read from, to notice a change: each file's
/// path, length and modification time.
pub fn trusted_files(cert_dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    store_files(&cert_dir.join("trusted"))
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            (f, len, meta.and_then(|m| m.modified().ok()))
        })
        .collect()
}

/// The DNS names of a peer's certificate that may identify it: its DNS SANs in certificate order,
/// without wildcard names (§2.3: IP SANs and the CN never count).
pub fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) if !d.contains('*') => {
                Some(d.to_string())
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_are_normalized() {
        let t = "19:D7:D7:C0:BF:7D:EE:A5:82:71:D9:1C:50:F0:33:86:BC:43:18:AE";
        assert_eq!(
            normalize_thumbprint(t).unwrap(),
            "19d7d7c0bf7deea58271d91c50f03386bc4318ae"
        );
        assert!(normalize_thumbprint("abc").is_err());
        assert!(normalize_thumbprint(&"g".repeat(40)).is_err());
    }

    #[test]
    fn identity_by_thumbprint_and_names() {
        let dir = std::env::temp_dir().join(format!("vmr-peer-certs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![
            "r1.lab.example".to_string(),
            "*.lab.example".to_string(),
        ])
        .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let thumb = sha1_thumbprint(cert.der());
        let stem = thumb.to_ascii_lowercase();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        let key_file = dir.join(format!("{stem}.key"));
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            find_identity(&dir, &thumb),
            Err(PeerCertError::NoKey { .. })
        ));
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let id = find_identity(&dir, &thumb.to_ascii_lowercase()).unwrap();
        assert_eq!(id.thumbprint, thumb);
        assert_eq!(dns_names(cert.der()), vec!["r1.lab.example".to_string()]);
        assert!(matches!(
            find_identity(&dir, &"0".repeat(40)),
            Err(PeerCertError::NotFound { .. })
        ));
        assert!(matches!(
            trusted_roots(&dir),
            Err(PeerCertError::NoTrustedCa(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
