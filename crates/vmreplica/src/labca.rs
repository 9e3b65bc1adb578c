//! `vmreplica cert new`: a lab certificate authority and host certificates for replication between
//! hosts without a PKI (docs/protocol.md §2.2).
//!
//! Layout below `--out DIR`:
//! - `ca/ca.pem`, `ca/ca.key` (0600), `ca/ca.json` (the domains the CA is constrained to): created
//!   on first use, reused afterwards;
//! - per host `<host>/certs/<sha1>.pem` (leaf + CA), `<host>/certs/<sha1>.key` (0600) and
//!   `<host>/certs/trusted/vmreplica-lab-ca-<id>.pem`: copy `<host>/certs/` to that host's
//!   `<data-dir>/certs/`.
//!
//! Leaves carry the FQDN as DNS SAN and CN, EKU serverAuth + clientAuth (one certificate serves a
//! host in both roles), ECDSA P-256, valid 825 days. The CA is ECDSA P-256, `CA:TRUE, pathlen 0`,
//! name-constrained to the parent domains of the hosts it was created for.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

const CA_NAME: &str = "vmreplica lab CA";
const LEAF_DAYS: i64 = 825;
const CA_DAYS: i64 = 3650;

#[derive(Serialize, Deserialize)]
struct CaInfo {
    domains: Vec<String>,
}

/// The parent domain of an FQDN (`p1.lab.example` → `lab.example`).
fn parent_domain(host: &str) -> anyhow::Result<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let valid = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    match host.split_once('.') {
        Some((_, parent)) if valid && !parent.is_empty() => Ok(parent.to_string()),
        _ => bail!("{host:?} is not a fully qualified host name (like r1.lab.example)"),
    }
}

fn within(host: &str, domain: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host.ends_with(&format!(".{domain}"))
}

fn ca_params(domains: &[String]) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: domains
            .iter()
            .map(|d| GeneralSubtree::DnsName(d.clone()))
            .collect(),
        excluded_subtrees: Vec::new(),
    });
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(CA_DAYS);
    Ok(p)
}

/// Writes `bytes` to `path` with mode 0600 (keys) or 0644, replacing it atomically.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
    domains: Vec<String>,
}

/// Loads the CA of `dir`, or creates one constrained to the parent domains of `hosts`.
fn load_or_create_ca(dir: &Path, hosts: &[String]) -> anyhow::Result<(Ca, bool)> {
    let ca_dir = dir.join("ca");
    let (pem_path, key_path, info_path) = (
        ca_dir.join("ca.pem"),
        ca_dir.join("ca.key"),
        ca_dir.join("ca.json"),
    );
    if key_path.exists() {
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a usable key", key_path.display()))?;
        let info: CaInfo = serde_json::from_slice(
            &std::fs::read(&info_path)
                .with_context(|| format!("cannot read {}", info_path.display()))?,
        )
        .with_context(|| format!("{} is not valid", info_path.display()))?;
        let pem = std::fs::read_to_string(&pem_path)
            .with_context(|| format!("cannot read {}", pem_path.display()))?;
        // The issuer object only signs: its name and key are those of the stored CA certificate.
        let cert = ca_params(&info.domains)?.self_signed(&key)?;
        return Ok((
            Ca {
                cert,
                key,
                pem,
                domains: info.domains,
            },
            false,
        ));
    }
    let mut domains: Vec<String> = hosts
        .iter()
        .map(|h| parent_domain(h))
        .collect::<Result<_, _>>()?;
    domains.sort();
    domains.dedup();
    std::fs::create_dir_all(&ca_dir)
        .with_context(|| format!("cannot create {}", ca_dir.display()))?;
    let key = KeyPair::generate()?;
    let cert = ca_params(&domains)?.self_signed(&key)?;
    let pem = cert.pem();
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(&pem_path, pem.as_bytes(), false)?;
    write_file(
        &info_path,
        &serde_json::to_vec_pretty(&CaInfo {
            domains: domains.clone(),
        })?,
        false,
    )?;
    Ok((
        Ca {
            cert,
            key,
            pem,
            domains,
        },
        true,
    ))
}

/// What `cert new` made for one host.
pub struct Issued {
    pub host: String,
    pub thumbprint: String,
    pub certs_dir: PathBuf,
}

/// Creates (or reuses) the lab CA in `dir` and a certificate for each host.
pub fn new_certificates(
    dir: &Path,
    hosts: &[String],
) -> anyhow::Result<(PathBuf, bool, Vec<Issued>)> {
    if hosts.is_empty() {
        bail!("give at least one --host");
    }
    for h in hosts {
        parent_domain(h)?;
    }
    let (ca, created) = load_or_create_ca(dir, hosts)?;
    let mut issued = Vec::new();
    for host in hosts {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !ca.domains.iter().any(|d| within(&host, d)) {
            bail!(
                "the lab CA in {} only issues certificates below {}; {host} is not: use another --out directory",
                dir.display(),
                ca.domains.join(", ")
            );
        }
        let mut p = CertificateParams::new(vec![host.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(LEAF_DAYS);
        let key = KeyPair::generate()?;
        let leaf = p.signed_by(&key, &ca.cert, &ca.key)?;
        let thumbprint = hex::encode_upper(Sha1::digest(leaf.der()));
        let certs_dir = dir.join(&host).join("certs");
        let trusted = certs_dir.join("trusted");
        std::fs::create_dir_all(&trusted)
            .with_context(|| format!("cannot create {}", trusted.display()))?;
        let stem = thumbprint.to_ascii_lowercase();
        write_file(
            &certs_dir.join(format!("{stem}.key")),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        let chain = format!("{}{}", leaf.pem(), ca.pem);
        write_file(
            &certs_dir.join(format!("{stem}.pem")),
            chain.as_bytes(),
            false,
        )?;
        // Named after the CA, so certificates of several lab CAs can share one trusted/ folder.
        let ca_id = hex::encode(Sha1::digest(ca.pem.as_bytes()));
        write_file(
            &trusted.join(format!("vmreplica-lab-ca-{}.pem", &ca_id[..12])),
            ca.pem.as_bytes(),
            false,
        )?;
        issued.push(Issued {
            host,
            thumbprint,
            certs_dir,
        });
    }
    Ok((dir.join("ca").join("ca.pem"), created, issued))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_domains() {
        assert_eq!(parent_domain("p1.lab.example").unwrap(), "lab.example");
        assert_eq!(parent_domain("host.example.").unwrap(), "example");
        assert!(parent_domain("localhost").is_err());
        assert!(parent_domain("bad_name.example").is_err());
        assert!(parent_domain(".example").is_err());
        assert!(within("p1.lab.example", "lab.example"));
        assert!(!within("p1.evillab.example", "lab.example"));
    }
}
