//! Embedded-instance strings (DSP0201 CIM-XML `<INSTANCE>` text, possibly wrapped, or MOF) → instance.

use super::decode_instance::instance;
use super::limits::{parse_limited, XmlLimitError, MAX_INPUT_BYTES};
use super::shape::{child, XmlShapeError};
use crate::mof::{parse_mof_instance, MofError};
use crate::CimInstance;

/// An embedded-instance parameter that could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum EmbeddedInstanceError {
    #[error("the embedded instance is empty")]
    Empty,
    #[error(transparent)]
    Limit(#[from] XmlLimitError),
    #[error(transparent)]
    Shape(#[from] XmlShapeError),
    #[error("the embedded instance is a {0} element, not an INSTANCE")]
    NotAnInstance(String),
    #[error(transparent)]
    Mof(#[from] MofError),
    #[error("the embedded instance is neither CIM-XML nor MOF ('instance of ...')")]
    UnknownFormat,
}

const WRAPPERS: [&str; 6] = [
    "VALUE.NAMEDOBJECT",
    // pywbem's `CIMInstance.tocimxmlstr()` of an instance that carries its path.
    "VALUE.INSTANCEWITHPATH",
    "VALUE.NAMEDINSTANCE",
    "VALUE.OBJECTWITHPATH",
    "VALUE.OBJECTWITHLOCALPATH",
    "VALUE.OBJECT",
];

/// Parses an embedded-instance parameter value.
pub fn parse_embedded_instance(text: &str) -> Result<CimInstance, EmbeddedInstanceError> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(XmlLimitError::TooLarge(text.len()).into());
    }
    let t = text.trim_start_matches('\u{FEFF}').trim();
    if t.is_empty() {
        return Err(EmbeddedInstanceError::Empty);
    }
    if t.starts_with('<') {
        return parse_xml(t);
    }
    let lower = t.get(..16).unwrap_or(t).to_ascii_lowercase();
    if lower.starts_with("instance") || lower.starts_with('[') || lower.starts_with("//") {
        return Ok(parse_mof_instance(t)?);
    }
    Err(EmbeddedInstanceError::UnknownFormat)
}

fn parse_xml(t: &str) -> Result<CimInstance, EmbeddedInstanceError> {
    let doc = parse_limited(t)?;
    let root = doc.root_element();
    let tag = root.tag_name().name();
    let inst = if tag == "INSTANCE" {
        root
    } else if WRAPPERS.contains(&tag) {
        child(root, "INSTANCE").ok_or_else(|| EmbeddedInstanceError::NotAnInstance(tag.into()))?
    } else {
        return Err(EmbeddedInstanceError::NotAnInstance(tag.into()));
    };
    Ok(instance(inst)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CimValue;

    #[test]
    fn accepts_plain_and_wrapped_instances() {
        let plain = r#"<INSTANCE CLASSNAME="C"><PROPERTY NAME="P" TYPE="string"><VALUE>v</VALUE></PROPERTY></INSTANCE>"#;
        let wrapped = format!(
            r#"<?xml version="1.0"?><VALUE.OBJECTWITHLOCALPATH><LOCALINSTANCEPATH/>{plain}</VALUE.OBJECTWITHLOCALPATH>"#
        );
        let with_path = format!(
            r#"<VALUE.INSTANCEWITHPATH><INSTANCEPATH><NAMESPACEPATH><HOST>h</HOST><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/></LOCALNAMESPACEPATH></NAMESPACEPATH><INSTANCENAME CLASSNAME="C"/></INSTANCEPATH>{plain}</VALUE.INSTANCEWITHPATH>"#
        );
        for text in [plain.to_string(), wrapped, with_path] {
            let i = parse_embedded_instance(&text).expect("valid instance");
            assert_eq!(i.value("P"), Some(&CimValue::String("v".into())));
        }
    }

    #[test]
    fn accepts_mof() {
        let i = parse_embedded_instance("instance of Msvm_X { N = 5; };").expect("valid MOF");
        assert_eq!(i.value("N").and_then(CimValue::as_u64), Some(5));
    }

    #[test]
    fn rejects_other_things() {
        assert_eq!(
            parse_embedded_instance("  "),
            Err(EmbeddedInstanceError::Empty)
        );
        assert_eq!(
            parse_embedded_instance("<CLASS NAME=\"C\"/>"),
            Err(EmbeddedInstanceError::NotAnInstance("CLASS".into()))
        );
        assert_eq!(
            parse_embedded_instance("hello"),
            Err(EmbeddedInstanceError::UnknownFormat)
        );
    }
}
