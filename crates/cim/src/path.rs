//! CIM object paths and their WMI text form,
//! `\\HOST\root\virtualization\v2:Msvm_ComputerSystem.CreationClassName="Msvm_ComputerSystem",Name="<GUID>"`.

use std::fmt;

/// The value of one key binding.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyValue {
    String(String),
    /// The literal digits, e.g. `"5"` or `"-3"`.
    Number(String),
    Boolean(bool),
    Reference(Box<ObjectPath>),
}

/// A class or instance path. A class path (or a singleton) has no keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectPath {
    pub host: Option<String>,
    /// `/`-separated, e.g. `root/virtualization/v2`.
    pub namespace: Option<String>,
    pub class_name: String,
    pub keys: Vec<(String, KeyValue)>,
}

/// A WMI object path string that could not be parsed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PathError {
    #[error("the object path is empty")]
    Empty,
    #[error("the object path has no class name")]
    MissingClass,
    #[error("'{0}' is not a valid class name")]
    InvalidClassName(String),
    #[error("key binding '{0}' has no '='")]
    MissingEquals(String),
    #[error("'{0}' is not a valid key name")]
    InvalidKeyName(String),
    #[error("the quoted value of key '{0}' is not terminated")]
    UnterminatedString(String),
    #[error("the value '{value}' of key '{key}' is neither quoted, a number, TRUE nor FALSE")]
    InvalidKeyValue { key: String, value: String },
    #[error("unexpected '{found}' after the value of key '{key}'; expected ','")]
    TrailingText { key: String, found: String },
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

fn is_number_literal(s: &str) -> bool {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    body.starts_with(|c: char| c.is_ascii_digit())
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-'))
}

/// Splits off `\\HOST\ns\ns:` or `ns/ns:` from the front, returning (host, namespace, rest).
fn split_prefix(s: &str) -> (Option<String>, Option<String>, &str) {
    let head_end = s.find('"').unwrap_or(s.len());
    let Some(colon) = s[..head_end].rfind(':') else {
        return (None, None, s);
    };
    let (prefix, rest) = (&s[..colon], &s[colon + 1..]);
    let (host, ns) = match prefix
        .strip_prefix("\\\\")
        .or_else(|| prefix.strip_prefix("//"))
    {
        Some(after) => match after.find(['\\', '/']) {
            Some(i) => (Some(after[..i].to_string()), &after[i + 1..]),
            None => (Some(after.to_string()), ""),
        },
        None => (None, prefix),
    };
    let ns = ns.replace('\\', "/");
    let ns = ns.trim_matches('/');
    let host = host.filter(|h| !h.is_empty());
    (host, (!ns.is_empty()).then(|| ns.to_string()), rest)
}

/// Reads one quoted value starting after the opening quote; returns (value, rest after closing quote).
fn read_quoted<'a>(key: &str, s: &'a str) -> Result<(String, &'a str), PathError> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, e)) => out.push(e),
                None => break,
            },
            _ => out.push(c),
        }
    }
    Err(PathError::UnterminatedString(key.to_string()))
}

fn parse_keys(mut s: &str) -> Result<Vec<(String, KeyValue)>, PathError> {
    let mut keys = Vec::new();
    loop {
        let eq = s
            .find('=')
            .ok_or_else(|| PathError::MissingEquals(s.to_string()))?;
        let name = s[..eq].trim();
        if !is_name(name) {
            return Err(PathError::InvalidKeyName(name.to_string()));
        }
        let after = s[eq + 1..].trim_start();
        let (value, rest) = if let Some(q) = after.strip_prefix('"') {
            let (v, rest) = read_quoted(name, q)?;
            (KeyValue::String(v), rest)
        } else {
            let end = after.find(',').unwrap_or(after.len());
            let lit = after[..end].trim();
            let value = if lit.eq_ignore_ascii_case("true") {
                KeyValue::Boolean(true)
            } else if lit.eq_ignore_ascii_case("false") {
                KeyValue::Boolean(false)
            } else if is_number_literal(lit) {
                KeyValue::Number(lit.to_string())
            } else {
                return Err(PathError::InvalidKeyValue {
                    key: name.to_string(),
                    value: lit.to_string(),
                });
            };
            (value, &after[end..])
        };
        keys.push((name.to_string(), value));
        let rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(keys);
        }
        s = rest
            .strip_prefix(',')
            .ok_or_else(|| PathError::TrailingText {
                key: name.to_string(),
                found: rest.chars().take(20).collect(),
            })?;
    }
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl KeyValue {
    /// The key value as it appears after `=` in a WMI path.
    fn to_wmi(&self) -> String {
        match self {
            KeyValue::String(s) => quote(s),
            KeyValue::Number(n) => n.clone(),
            KeyValue::Boolean(b) => if *b { "TRUE" } else { "FALSE" }.to_string(),
            KeyValue::Reference(p) => quote(&p.to_wmi()),
        }
    }
}

impl ObjectPath {
    pub fn new(class_name: &str) -> Self {
        ObjectPath {
            host: None,
            namespace: None,
            class_name: class_name.to_string(),
            keys: Vec::new(),
        }
    }

    pub fn with_key(mut self, name: &str, value: KeyValue) -> Self {
        self.keys.push((name.to_string(), value));
        self
    }

    /// The key named `name`, ignoring case.
    pub fn key(&self, name: &str) -> Option<&KeyValue> {
        self.keys
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The text of a string or number key.
    pub fn key_str(&self, name: &str) -> Option<&str> {
        match self.key(name)? {
            KeyValue::String(s) | KeyValue::Number(s) => Some(s),
            _ => None,
        }
    }

    /// Parses the WMI text form (see the module docs and the crate API notes).
    pub fn parse_wmi(s: &str) -> Result<ObjectPath, PathError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        let (host, namespace, rest) = split_prefix(s);
        let class_end = rest.find(['.', '=']).unwrap_or(rest.len());
        let class_name = rest[..class_end].trim();
        if class_name.is_empty() {
            return Err(PathError::MissingClass);
        }
        if !is_name(class_name) {
            return Err(PathError::InvalidClassName(class_name.to_string()));
        }
        let tail = &rest[class_end..];
        let keys = match tail.strip_prefix('.') {
            Some(k) => parse_keys(k)?,
            None if tail.is_empty() || tail.trim() == "=@" => Vec::new(),
            None => {
                return Err(PathError::TrailingText {
                    key: class_name.to_string(),
                    found: tail.chars().take(20).collect(),
                })
            }
        };
        Ok(ObjectPath {
            host,
            namespace,
            class_name: class_name.to_string(),
            keys,
        })
    }

    /// The WMI text form; `parse_wmi` reads it back.
    pub fn to_wmi(&self) -> String {
        let mut out = String::new();
        if let Some(host) = &self.host {
            out.push_str("\\\\");
            out.push_str(host);
            if self.namespace.is_some() {
                out.push('\\');
            }
        }
        if let Some(ns) = &self.namespace {
            out.push_str(&ns.replace('/', "\\"));
        }
        if self.host.is_some() || self.namespace.is_some() {
            out.push(':');
        }
        out.push_str(&self.class_name);
        for (i, (k, v)) in self.keys.iter().enumerate() {
            out.push(if i == 0 { '.' } else { ',' });
            out.push_str(k);
            out.push('=');
            out.push_str(&v.to_wmi());
        }
        out
    }

    /// Same class and keys (names ignoring case, any order); host and namespace are ignored.
    /// String key values compare exactly; a reference also matches its WMI string form.
    pub fn same_instance(&self, other: &ObjectPath) -> bool {
        self.class_name.eq_ignore_ascii_case(&other.class_name)
            && self.keys.len() == other.keys.len()
            && self
                .keys
                .iter()
                .all(|(name, v)| other.key(name).is_some_and(|ov| key_values_match(v, ov)))
    }
}

fn key_values_match(a: &KeyValue, b: &KeyValue) -> bool {
    match (a, b) {
        (KeyValue::Reference(x), KeyValue::Reference(y)) => x.same_instance(y),
        (KeyValue::Reference(p), KeyValue::String(s))
        | (KeyValue::String(s), KeyValue::Reference(p)) => {
            ObjectPath::parse_wmi(s).is_ok_and(|q| q.same_instance(p))
        }
        (KeyValue::Number(x), KeyValue::Number(y)) => {
            x == y || matches!((x.parse::<i128>(), y.parse::<i128>()), (Ok(a), Ok(b)) if a == b)
        }
        // As WMI compares string keys: a GUID in lower case names the same VM.
        (KeyValue::String(x), KeyValue::String(y)) => x.eq_ignore_ascii_case(y),
        _ => a == b,
    }
}

impl fmt::Display for ObjectPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_wmi())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VM: &str = r#"\\HOST\root\virtualization\v2:Msvm_ComputerSystem.CreationClassName="Msvm_ComputerSystem",Name="5B8E-GUID""#;

    #[test]
    fn parses_a_full_wmi_path() {
        let p = ObjectPath::parse_wmi(VM).expect("valid path");
        assert_eq!(p.host.as_deref(), Some("HOST"));
        assert_eq!(p.namespace.as_deref(), Some("root/virtualization/v2"));
        assert_eq!(p.class_name, "Msvm_ComputerSystem");
        assert_eq!(p.key_str("name"), Some("5B8E-GUID"));
        assert_eq!(p.to_wmi(), VM);
    }

    #[test]
    fn parses_other_prefixes() {
        for s in [
            r#"//HOST/root/virtualization/v2:C.K="v""#,
            r#"root\virtualization\v2:C.K="v""#,
            r#"root/virtualization/v2:C.K="v""#,
        ] {
            let p = ObjectPath::parse_wmi(s).expect("valid path");
            assert_eq!(
                p.namespace.as_deref(),
                Some("root/virtualization/v2"),
                "{s}"
            );
            assert_eq!(p.key_str("K"), Some("v"));
        }
        let bare = ObjectPath::parse_wmi(r#"C.K="a:b""#).expect("colon inside a value");
        assert_eq!(bare.namespace, None);
        assert_eq!(bare.key_str("K"), Some("a:b"));
    }

    #[test]
    fn parses_escapes_numbers_booleans_and_singletons() {
        let p = ObjectPath::parse_wmi(r#"C.S="a\"b\\c",N=-3,B=TRUE"#).expect("valid path");
        assert_eq!(p.key_str("S"), Some("a\"b\\c"));
        assert_eq!(p.key("n"), Some(&KeyValue::Number("-3".into())));
        assert_eq!(p.key("B"), Some(&KeyValue::Boolean(true)));
        let s = ObjectPath::parse_wmi("Msvm_Singleton=@").expect("singleton");
        assert!(s.keys.is_empty());
    }

    #[test]
    fn reports_errors() {
        assert_eq!(ObjectPath::parse_wmi(""), Err(PathError::Empty));
        assert!(matches!(
            ObjectPath::parse_wmi(r#"C.K="open"#),
            Err(PathError::UnterminatedString(_))
        ));
        assert!(matches!(
            ObjectPath::parse_wmi("C.K=abc"),
            Err(PathError::InvalidKeyValue { .. })
        ));
        assert!(matches!(
            ObjectPath::parse_wmi(r#"C.K="a"x"#),
            Err(PathError::TrailingText { .. })
        ));
    }

    #[test]
    fn same_instance_ignores_order_case_and_host() {
        let a = ObjectPath::parse_wmi(VM).expect("valid");
        let b = ObjectPath::new("msvm_computersystem")
            .with_key("name", KeyValue::String("5B8E-GUID".into()))
            .with_key(
                "CREATIONCLASSNAME",
                KeyValue::String("Msvm_ComputerSystem".into()),
            );
        assert!(a.same_instance(&b));
        let lower = ObjectPath::new("Msvm_ComputerSystem")
            .with_key("Name", KeyValue::String("5b8e-guid".into()))
            .with_key(
                "CreationClassName",
                KeyValue::String("msvm_computersystem".into()),
            );
        assert!(a.same_instance(&lower));
        let other = ObjectPath::new("Msvm_ComputerSystem")
            .with_key("Name", KeyValue::String("5b8e-guie".into()))
            .with_key(
                "CreationClassName",
                KeyValue::String("msvm_computersystem".into()),
            );
        assert!(!a.same_instance(&other));
        let c = b.clone().with_key("X", KeyValue::Number("1".into()));
        assert!(!a.same_instance(&c));
    }

    fn key_value() -> impl Strategy<Value = KeyValue> {
        prop_oneof![
            any::<String>().prop_map(KeyValue::String),
            any::<i64>().prop_map(|n| KeyValue::Number(n.to_string())),
            any::<bool>().prop_map(KeyValue::Boolean),
        ]
    }

    proptest! {
        #[test]
        fn wmi_round_trip(
            host in proptest::option::of("[A-Za-z0-9][A-Za-z0-9.-]{0,15}"),
            ns in proptest::option::of("[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}"),
            class in "[A-Za-z_][A-Za-z0-9_]{0,20}",
            keys in proptest::collection::vec(("[A-Za-z_][A-Za-z0-9_]{0,10}", key_value()), 0..4),
        ) {
            let p = ObjectPath { host, namespace: ns, class_name: class, keys };
            prop_assert_eq!(ObjectPath::parse_wmi(&p.to_wmi()), Ok(p));
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = ObjectPath::parse_wmi(&s);
        }
    }
}
