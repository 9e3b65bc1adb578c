//! `Msvm_ReplicationAuthorizationSettingData`: one row of the recovery server's authorization table
//! (spec §8, DESIGN §5).

use serde::{Deserialize, Serialize};

use super::names::is_dns_host_name;
use super::SettingsError;

/// Longest trust group name accepted.
pub const MAX_TRUST_GROUP_LEN: usize = 256;

/// Which primary may replicate here, where its replicas go, and its trust group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationEntry {
    /// An FQDN, `*.domain` or `*`.
    pub allowed_primary_host_system: String,
    pub trust_group: String,
    /// An absolute path on this host.
    pub replica_storage_location: String,
}

impl AuthorizationEntry {
    /// Checks the three properties; the first problem is returned.
    pub fn validate(&self) -> Result<(), SettingsError> {
        check_host_pattern(&self.allowed_primary_host_system)?;
        check_trust_group(&self.trust_group)?;
        check_storage_location(&self.replica_storage_location)
    }

    /// Whether a primary whose certificate names `fqdn` is covered by this entry. Case-insensitive; a
    /// trailing dot on `fqdn` is ignored. `*` matches every host. `*.contoso.com` matches a host with
    /// exactly one more label (`a.contoso.com`), not `contoso.com` itself nor `a.b.contoso.com`: the
    /// certificate-wildcard rule (RFC 6125), the narrower reading of Hyper-V's "wildcard in the first
    /// label".
    pub fn matches_host(&self, fqdn: &str) -> bool {
        let host = fqdn.strip_suffix('.').unwrap_or(fqdn);
        if !is_dns_host_name(host) {
            return false;
        }
        let pattern = self.allowed_primary_host_system.as_str();
        if pattern == "*" {
            return true;
        }
        match pattern.strip_prefix("*.") {
            Some(domain) => host
                .split_once('.')
                .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(domain)),
            None => host.eq_ignore_ascii_case(pattern),
        }
    }
}

/// `*`, `*.domain` (the wildcard only as the whole first label) or an FQDN (at least two labels).
fn check_host_pattern(pattern: &str) -> Result<(), SettingsError> {
    let valid = match pattern.strip_prefix("*.") {
        _ if pattern == "*" => true,
        Some(domain) => is_dns_host_name(domain),
        None => is_dns_host_name(pattern) && pattern.contains('.'),
    };
    if !valid {
        return Err(SettingsError::invalid(
            "AllowedPrimaryHostSystem",
            format!(
                "must be a fully qualified domain name, \"*.\" followed by a domain name, or \"*\"; \
                 got \"{pattern}\"."
            ),
        ));
    }
    Ok(())
}

fn check_trust_group(group: &str) -> Result<(), SettingsError> {
    let length = group.chars().count();
    if group.trim().is_empty() || length > MAX_TRUST_GROUP_LEN {
        return Err(SettingsError::invalid(
            "TrustGroup",
            format!("must be 1 to 256 characters and not blank; got {length} characters."),
        ));
    }
    Ok(())
}

fn check_storage_location(path: &str) -> Result<(), SettingsError> {
    const PROPERTY: &str = "ReplicaStorageLocation";
    if !path.starts_with('/') || path.contains('\0') {
        return Err(SettingsError::invalid(
            PROPERTY,
            format!("must be an absolute path on this host, starting with '/'; got \"{path}\"."),
        ));
    }
    if path.split('/').any(|component| component == "..") {
        return Err(SettingsError::invalid(
            PROPERTY,
            format!("must not contain a \"..\" component; got \"{path}\"."),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: &str) -> AuthorizationEntry {
        AuthorizationEntry {
            allowed_primary_host_system: host.into(),
            trust_group: "DEFAULT".into(),
            replica_storage_location: "/var/lib/vmreplica/replicas".into(),
        }
    }

    fn property_of(entry: AuthorizationEntry) -> Option<&'static str> {
        entry.validate().err().map(|e| e.property())
    }

    // Spec §8: FQDN, wildcard in the first label, or "*".
    #[test]
    fn host_patterns() {
        for ok in ["primary.contoso.com", "*.contoso.com", "*", "*.local"] {
            assert_eq!(entry(ok).validate(), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "primary",
            "a*.contoso.com",
            "*.*.contoso.com",
            "contoso.*",
            "*contoso.com",
            "a..b",
            "**",
        ] {
            assert_eq!(
                property_of(entry(bad)),
                Some("AllowedPrimaryHostSystem"),
                "{bad}"
            );
        }
    }

    #[test]
    fn trust_group_and_storage() {
        let blank = AuthorizationEntry {
            trust_group: " ".into(),
            ..entry("*")
        };
        assert_eq!(property_of(blank), Some("TrustGroup"));
        let long = AuthorizationEntry {
            trust_group: "g".repeat(257),
            ..entry("*")
        };
        assert_eq!(property_of(long), Some("TrustGroup"));
        let max = AuthorizationEntry {
            trust_group: "g".repeat(256),
            ..entry("*")
        };
        assert_eq!(max.validate(), Ok(()));
        for bad in [
            "",
            "relative/dir",
            "D:\\ReplicaStorage",
            "/srv/../etc",
            "/srv/..",
        ] {
            let e = AuthorizationEntry {
                replica_storage_location: bad.into(),
                ..entry("*")
            };
            assert_eq!(property_of(e), Some("ReplicaStorageLocation"), "{bad}");
        }
        let dots = AuthorizationEntry {
            replica_storage_location: "/srv/..data/./x".into(),
            ..entry("*")
        };
        assert_eq!(dots.validate(), Ok(()));
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let wildcard = entry("*.contoso.com");
        assert!(wildcard.matches_host("a.contoso.com"));
        assert!(wildcard.matches_host("A.CONTOSO.com."));
        assert!(!wildcard.matches_host("contoso.com"));
        assert!(!wildcard.matches_host("a.b.contoso.com"));
        assert!(!wildcard.matches_host("a.fabrikam.com"));
        assert!(!wildcard.matches_host("acontoso.com"));
    }

    #[test]
    fn exact_and_any() {
        assert!(entry("Primary.Contoso.com").matches_host("primary.contoso.COM"));
        assert!(!entry("primary.contoso.com").matches_host("other.contoso.com"));
        assert!(entry("*").matches_host("anything.example"));
        assert!(!entry("*").matches_host(""));
        assert!(!entry("*").matches_host("bad name"));
    }
}
