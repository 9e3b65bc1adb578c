//! Decoding CIM-XML object paths: INSTANCENAME, (LOCAL)INSTANCEPATH, (LOCAL)CLASSPATH, CLASSNAME,
//! NAMESPACEPATH and VALUE.REFERENCE.

use super::shape::{
    elements, first_element, require_attr, require_child, text, unexpected, Node2, XmlShapeError,
};
use crate::{CimType, KeyValue, ObjectPath};

/// `LOCALNAMESPACEPATH` → `root/virtualization/v2`.
pub(crate) fn local_namespace(node: Node2<'_, '_>) -> Result<String, XmlShapeError> {
    let parts = elements(node)
        .filter(|n| n.has_tag_name("NAMESPACE"))
        .map(|n| require_attr(n, "NAME").map(|s| s.trim_matches('/')))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(parts.join("/"))
}

/// `NAMESPACEPATH` → (host, namespace).
fn namespace_path(node: Node2<'_, '_>) -> Result<(String, String), XmlShapeError> {
    let host = text(require_child(node, "HOST")?).trim().to_string();
    let ns = local_namespace(require_child(node, "LOCALNAMESPACEPATH")?)?;
    Ok((host, ns))
}

fn key_value(node: Node2<'_, '_>) -> KeyValue {
    let raw = text(node);
    let ty = node.attribute("TYPE").and_then(CimType::parse);
    match (node.attribute("VALUETYPE"), ty) {
        (Some("boolean"), _) | (None, Some(CimType::Boolean)) => {
            KeyValue::Boolean(raw.trim().eq_ignore_ascii_case("true"))
        }
        (Some("numeric"), _) => KeyValue::Number(raw.trim().to_string()),
        (None, Some(t)) if t.is_integer() => KeyValue::Number(raw.trim().to_string()),
        _ => KeyValue::String(raw),
    }
}

/// `INSTANCENAME` → a path without host or namespace.
pub(crate) fn instance_name(node: Node2<'_, '_>) -> Result<ObjectPath, XmlShapeError> {
    let mut path = ObjectPath::new(require_attr(node, "CLASSNAME")?);
    for kb in elements(node) {
        match kb.tag_name().name() {
            "KEYBINDING" => {
                let name = require_attr(kb, "NAME")?;
                let v = first_element(kb).ok_or(XmlShapeError::MissingChild {
                    parent: "KEYBINDING".into(),
                    expected: "KEYVALUE",
                })?;
                let value = match v.tag_name().name() {
                    "KEYVALUE" => key_value(v),
                    "VALUE.REFERENCE" => KeyValue::Reference(Box::new(value_reference(v)?)),
                    _ => return Err(unexpected(kb, v)),
                };
                path.keys.push((name.to_string(), value));
            }
            // A keyless value for a single-key class: its key name is unknown here.
            "KEYVALUE" => path.keys.push((String::new(), key_value(kb))),
            _ => return Err(unexpected(node, kb)),
        }
    }
    Ok(path)
}

fn class_name(node: Node2<'_, '_>) -> Result<ObjectPath, XmlShapeError> {
    Ok(ObjectPath::new(require_attr(node, "NAME")?))
}

/// Any of the six path elements DSP0201 allows in a `VALUE.REFERENCE`.
pub(crate) fn any_path(node: Node2<'_, '_>) -> Result<ObjectPath, XmlShapeError> {
    match node.tag_name().name() {
        "INSTANCENAME" => instance_name(node),
        "CLASSNAME" => class_name(node),
        "LOCALINSTANCEPATH" | "LOCALCLASSPATH" => {
            let ns = local_namespace(require_child(node, "LOCALNAMESPACEPATH")?)?;
            let mut p = named_part(node)?;
            p.namespace = Some(ns);
            Ok(p)
        }
        "INSTANCEPATH" | "CLASSPATH" => {
            let (host, ns) = namespace_path(require_child(node, "NAMESPACEPATH")?)?;
            let mut p = named_part(node)?;
            p.host = (!host.is_empty()).then_some(host);
            p.namespace = Some(ns);
            Ok(p)
        }
        other => Err(XmlShapeError::UnexpectedChild {
            parent: "VALUE.REFERENCE".into(),
            found: other.to_string(),
        }),
    }
}

fn named_part(node: Node2<'_, '_>) -> Result<ObjectPath, XmlShapeError> {
    let inner = elements(node)
        .find(|n| n.has_tag_name("INSTANCENAME") || n.has_tag_name("CLASSNAME"))
        .ok_or(XmlShapeError::MissingChild {
            parent: node.tag_name().name().to_string(),
            expected: "INSTANCENAME",
        })?;
    any_path(inner)
}

/// `VALUE.REFERENCE` → its path.
pub(crate) fn value_reference(node: Node2<'_, '_>) -> Result<ObjectPath, XmlShapeError> {
    let inner = first_element(node).ok_or(XmlShapeError::MissingChild {
        parent: "VALUE.REFERENCE".into(),
        expected: "INSTANCEPATH",
    })?;
    any_path(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Result<ObjectPath, XmlShapeError> {
        let doc = roxmltree::Document::parse(xml).expect("test XML is well-formed");
        any_path(doc.root_element())
    }

    #[test]
    fn instance_path_with_host_and_typed_keys() {
        let p = parse(concat!(
            r#"<INSTANCEPATH><NAMESPACEPATH><HOST>h1</HOST><LOCALNAMESPACEPATH>"#,
            r#"<NAMESPACE NAME="root"/><NAMESPACE NAME="virtualization"/><NAMESPACE NAME="v2"/>"#,
            r#"</LOCALNAMESPACEPATH></NAMESPACEPATH><INSTANCENAME CLASSNAME="C">"#,
            r#"<KEYBINDING NAME="S"><KEYVALUE VALUETYPE="string">a b</KEYVALUE></KEYBINDING>"#,
            r#"<KEYBINDING NAME="N"><KEYVALUE VALUETYPE="numeric" TYPE="uint16"> 7 </KEYVALUE></KEYBINDING>"#,
            r#"<KEYBINDING NAME="B"><KEYVALUE VALUETYPE="boolean">TRUE</KEYVALUE></KEYBINDING>"#,
            r#"<KEYBINDING NAME="T"><KEYVALUE TYPE="uint32">9</KEYVALUE></KEYBINDING>"#,
            r#"</INSTANCENAME></INSTANCEPATH>"#
        ))
        .expect("valid path");
        assert_eq!(p.host.as_deref(), Some("h1"));
        assert_eq!(p.namespace.as_deref(), Some("root/virtualization/v2"));
        assert_eq!(p.key_str("S"), Some("a b"));
        assert_eq!(p.key("N"), Some(&KeyValue::Number("7".into())));
        assert_eq!(p.key("B"), Some(&KeyValue::Boolean(true)));
        assert_eq!(p.key("T"), Some(&KeyValue::Number("9".into())));
    }

    #[test]
    fn reference_keys_and_class_paths() {
        let p = parse(concat!(
            r#"<INSTANCENAME CLASSNAME="A"><KEYBINDING NAME="R"><VALUE.REFERENCE>"#,
            r#"<INSTANCENAME CLASSNAME="B"><KEYBINDING NAME="K"><KEYVALUE>x</KEYVALUE></KEYBINDING></INSTANCENAME>"#,
            r#"</VALUE.REFERENCE></KEYBINDING></INSTANCENAME>"#
        ))
        .expect("valid path");
        let Some(KeyValue::Reference(inner)) = p.key("R") else {
            panic!("expected a reference key, got {p:?}");
        };
        assert_eq!(inner.key_str("K"), Some("x"));
        let c = parse(r#"<LOCALCLASSPATH><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/></LOCALNAMESPACEPATH><CLASSNAME NAME="C"/></LOCALCLASSPATH>"#)
            .expect("valid class path");
        assert_eq!((c.class_name.as_str(), c.keys.len()), ("C", 0));
    }

    #[test]
    fn missing_classname_is_reported() {
        let e = parse("<INSTANCENAME/>").expect_err("no CLASSNAME");
        assert_eq!(e.to_string(), "INSTANCENAME has no CLASSNAME attribute");
    }
}
