//! Encoding object paths as CIM-XML: INSTANCENAME, LOCALNAMESPACEPATH, NAMESPACEPATH,
//! INSTANCEPATH and VALUE.REFERENCE.

use super::escape::{push_attr, push_text, push_text_element};
use crate::{KeyValue, ObjectPath};

/// Host and namespace used for paths that carry none themselves.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PathDefaults<'a> {
    pub host: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

pub(crate) fn push_local_namespace(out: &mut String, ns: &str) {
    out.push_str("<LOCALNAMESPACEPATH>");
    for part in ns.split(['/', '\\']).filter(|p| !p.is_empty()) {
        out.push_str("<NAMESPACE");
        push_attr(out, "NAME", part);
        out.push_str("/>");
    }
    out.push_str("</LOCALNAMESPACEPATH>");
}

pub(crate) fn push_namespace_path(out: &mut String, host: &str, ns: &str) {
    out.push_str("<NAMESPACEPATH>");
    push_text_element(out, "HOST", host);
    push_local_namespace(out, ns);
    out.push_str("</NAMESPACEPATH>");
}

fn push_key_value(out: &mut String, value: &KeyValue, defaults: PathDefaults<'_>) {
    let (valuetype, ty, text) = match value {
        KeyValue::String(s) => ("string", Some("string"), s.as_str()),
        KeyValue::Number(n) => ("numeric", None, n.as_str()),
        KeyValue::Boolean(b) => (
            "boolean",
            Some("boolean"),
            if *b { "TRUE" } else { "FALSE" },
        ),
        KeyValue::Reference(p) => return push_value_reference(out, p, defaults),
    };
    out.push_str("<KEYVALUE");
    push_attr(out, "VALUETYPE", valuetype);
    if let Some(t) = ty {
        push_attr(out, "TYPE", t);
    }
    out.push('>');
    push_text(out, text);
    out.push_str("</KEYVALUE>");
}

/// `<INSTANCENAME CLASSNAME=..><KEYBINDING ..>..</INSTANCENAME>`.
pub(crate) fn push_instance_name(out: &mut String, path: &ObjectPath, defaults: PathDefaults<'_>) {
    out.push_str("<INSTANCENAME");
    push_attr(out, "CLASSNAME", &path.class_name);
    out.push('>');
    match path.keys.as_slice() {
        [(name, value)] if name.is_empty() => push_key_value(out, value, defaults),
        keys => {
            for (name, value) in keys {
                out.push_str("<KEYBINDING");
                push_attr(out, "NAME", name);
                out.push('>');
                push_key_value(out, value, defaults);
                out.push_str("</KEYBINDING>");
            }
        }
    }
    out.push_str("</INSTANCENAME>");
}

/// `<INSTANCEPATH>` with the path's host/namespace, or the defaults.
pub(crate) fn push_instance_path(
    out: &mut String,
    path: &ObjectPath,
    host: &str,
    ns: &str,
    defaults: PathDefaults<'_>,
) {
    out.push_str("<INSTANCEPATH>");
    push_namespace_path(
        out,
        path.host.as_deref().unwrap_or(host),
        path.namespace.as_deref().unwrap_or(ns),
    );
    push_instance_name(out, path, defaults);
    out.push_str("</INSTANCEPATH>");
}

/// `<VALUE.REFERENCE>` holding the most complete path form known.
pub(crate) fn push_value_reference(
    out: &mut String,
    path: &ObjectPath,
    defaults: PathDefaults<'_>,
) {
    out.push_str("<VALUE.REFERENCE>");
    let host = path.host.as_deref().or(defaults.host);
    let ns = path.namespace.as_deref().or(defaults.namespace);
    match (host, ns) {
        (Some(h), Some(n)) => push_instance_path(out, path, h, n, defaults),
        (None, Some(n)) => {
            out.push_str("<LOCALINSTANCEPATH>");
            push_local_namespace(out, n);
            push_instance_name(out, path, defaults);
            out.push_str("</LOCALINSTANCEPATH>");
        }
        _ => push_instance_name(out, path, defaults),
    }
    out.push_str("</VALUE.REFERENCE>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_name_key_kinds() {
        let p = ObjectPath::new("C")
            .with_key("S", KeyValue::String("a&b".into()))
            .with_key("N", KeyValue::Number("5".into()))
            .with_key("B", KeyValue::Boolean(true));
        let mut out = String::new();
        push_instance_name(&mut out, &p, PathDefaults::default());
        assert_eq!(
            out,
            concat!(
                r#"<INSTANCENAME CLASSNAME="C">"#,
                r#"<KEYBINDING NAME="S"><KEYVALUE VALUETYPE="string" TYPE="string">a&amp;b</KEYVALUE></KEYBINDING>"#,
                r#"<KEYBINDING NAME="N"><KEYVALUE VALUETYPE="numeric">5</KEYVALUE></KEYBINDING>"#,
                r#"<KEYBINDING NAME="B"><KEYVALUE VALUETYPE="boolean" TYPE="boolean">TRUE</KEYVALUE></KEYBINDING>"#,
                r#"</INSTANCENAME>"#
            )
        );
    }

    #[test]
    fn reference_uses_defaults_for_a_full_path() {
        let mut out = String::new();
        let defaults = PathDefaults {
            host: Some("h"),
            namespace: Some("root/v2"),
        };
        push_value_reference(&mut out, &ObjectPath::new("C"), defaults);
        assert_eq!(
            out,
            concat!(
                "<VALUE.REFERENCE><INSTANCEPATH><NAMESPACEPATH><HOST>h</HOST><LOCALNAMESPACEPATH>",
                r#"<NAMESPACE NAME="root"/><NAMESPACE NAME="v2"/></LOCALNAMESPACEPATH></NAMESPACEPATH>"#,
                r#"<INSTANCENAME CLASSNAME="C"></INSTANCENAME></INSTANCEPATH></VALUE.REFERENCE>"#
            )
        );
    }
}
