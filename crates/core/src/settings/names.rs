//! Host names and certificate thumbprints: the two string forms several settings share.

/// Most octets a DNS name may have.
const MAX_NAME_LEN: usize = 253;
/// Most octets one DNS label may have.
const MAX_LABEL_LEN: usize = 63;

/// A DNS host name: dot-separated labels of `[A-Za-z0-9-]`, 1 to 63 characters each, not starting or
/// ending with `-` (RFC 1123), at most 253 characters in all, no trailing dot. Internationalized
/// names must be given in their ASCII (`xn--`) form.
pub fn is_dns_host_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.split('.').all(is_dns_label)
}

fn is_dns_label(label: &str) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// An IPv4 or IPv6 literal, the latter with or without brackets.
pub(crate) fn is_ip_literal(text: &str) -> bool {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse::<std::net::IpAddr>().is_ok()
}

/// The canonical form of a certificate thumbprint: lowercase hex without spaces, or `None` when the
/// text is not 40 (SHA-1) or 64 (SHA-256) hex digits. Spaces are ignored, and so is the invisible
/// left-to-right mark (U+200E) that the Windows certificate dialog puts in front of copied thumbprints.
pub fn normalize_thumbprint(text: &str) -> Option<String> {
    let digits: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '\u{200e}')
        .collect();
    let well_formed =
        matches!(digits.len(), 40 | 64) && digits.chars().all(|c| c.is_ascii_hexdigit());
    well_formed.then(|| digits.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert!(is_dns_host_name("replica.contoso.com"));
        assert!(is_dns_host_name("replica"));
        assert!(is_dns_host_name("xn--bcher-kva.example"));
        assert!(!is_dns_host_name(""));
        assert!(!is_dns_host_name("replica.contoso.com."));
        assert!(!is_dns_host_name("a..b"));
        assert!(!is_dns_host_name("under_score.example"));
        assert!(!is_dns_host_name("-lead.example"));
        assert!(!is_dns_host_name(&"a".repeat(64)));
        assert!(is_dns_host_name(&"a".repeat(63)));
        let long = vec!["abcdefghi"; 26].join("."); // 26 * 10 - 1 = 259 characters
        assert!(!is_dns_host_name(&long));
    }

    #[test]
    fn ip_literals() {
        assert!(is_ip_literal("192.0.2.7"));
        assert!(is_ip_literal("2001:db8::1"));
        assert!(is_ip_literal("[2001:db8::1]"));
        assert!(!is_ip_literal("192.0.2"));
    }

    #[test]
    fn thumbprints() {
        let sha1 = "0123456789ABCDEF0123456789abcdef01234567";
        assert_eq!(normalize_thumbprint(sha1), Some(sha1.to_ascii_lowercase()));
        assert_eq!(
            normalize_thumbprint("01 23 45 67 89 ab cd ef 01 23 45 67 89 ab cd ef 01 23 45 67")
                .as_deref(),
            Some("0123456789abcdef0123456789abcdef01234567")
        );
        assert_eq!(
            normalize_thumbprint(&format!("\u{200e}{sha1}")).map(|t| t.len()),
            Some(40)
        );
        assert_eq!(normalize_thumbprint(&"F".repeat(64)), Some("f".repeat(64)));
        assert_eq!(normalize_thumbprint(&"a".repeat(39)), None);
        assert_eq!(normalize_thumbprint(&"a".repeat(41)), None);
        assert_eq!(normalize_thumbprint(&"g".repeat(40)), None);
        assert_eq!(normalize_thumbprint(""), None);
    }
}
