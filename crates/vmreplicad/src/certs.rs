//! The host's certificate store directory (the equivalent of Windows' LocalMachine\My).
//!
//! `GetSystemCertificates` returns each certificate found there as base64 DER, as Hyper-V does.
//! Files ending in `.pem` or `.crt` may hold several PEM certificates; `.der`/`.cer` files hold one
//! DER certificate. Private keys and other files are ignored.

use std::path::Path;

use base64::Engine;

#[derive(Debug, thiserror::Error)]
pub enum CertStoreError {
    #[error("cannot read the certificate store {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

pub fn system_certificates(dir: &Path) -> Result<Vec<String>, CertStoreError> {
    let read_err = |source| CertStoreError::Read {
        path: dir.display().to_string(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(e)),
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "pem" | "crt" => {
                let text = std::fs::read_to_string(&path).map_err(read_err)?;
                out.extend(pem_certificates(&text));
            }
            "der" | "cer" => {
                let bytes = std::fs::read(&path).map_err(read_err)?;
                out.push(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The base64 bodies of the CERTIFICATE blocks of a PEM text, whitespace removed.
fn pem_certificates(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            current = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            out.extend(current.take().filter(|b| !b.is_empty()));
        } else if let Some(body) = current.as_mut() {
            body.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks_are_extracted_and_keys_ignored() {
        let text = "-----BEGIN PRIVATE KEY-----\nSECRET\n-----END PRIVATE KEY-----\n\
                    -----BEGIN CERTIFICATE-----\nQUJD\nREVG\n-----END CERTIFICATE-----\n\
                    -----BEGIN CERTIFICATE-----\nR0hJ\n-----END CERTIFICATE-----\n";
        assert_eq!(
            pem_certificates(text),
            vec!["QUJDREVG".to_string(), "R0hJ".to_string()]
        );
    }

    #[test]
    fn a_missing_store_is_empty() {
        let certs = system_certificates(Path::new("/nonexistent/vmreplica/certs")).expect("empty");
        assert!(certs.is_empty());
    }
}
