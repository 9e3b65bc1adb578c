//! Decoding a CIM-XML `<INSTANCE>` into a [`CimInstance`]. WMI system properties (`__PATH`, …)
//! and qualifiers are dropped.

use super::decode_path::value_reference;
use super::shape::{
    child, elements, require_attr, text, type_attr, unexpected, Node2, XmlShapeError,
};
use crate::{CimInstance, CimProperty, CimType, CimValue};

fn typed(name: &str, ty: CimType, node: Node2<'_, '_>) -> Result<CimValue, XmlShapeError> {
    CimValue::parse_scalar(ty, &text(node)).map_err(|error| XmlShapeError::BadValue {
        property: name.to_string(),
        error,
    })
}

fn array_value(name: &str, ty: CimType, arr: Node2<'_, '_>) -> Result<CimValue, XmlShapeError> {
    let items = elements(arr)
        .filter(|v| v.has_tag_name("VALUE"))
        .map(|v| typed(name, ty, v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CimValue::Array(ty, items))
}

fn property(node: Node2<'_, '_>) -> Result<CimProperty, XmlShapeError> {
    let name = require_attr(node, "NAME")?;
    let tag = node.tag_name().name();
    let is_ref = tag == "PROPERTY.REFERENCE";
    let ty = if is_ref {
        CimType::Reference
    } else {
        type_attr(node, "TYPE")?
    };
    let value = match tag {
        "PROPERTY.ARRAY" => child(node, "VALUE.ARRAY")
            .map(|a| array_value(name, ty, a))
            .transpose()?,
        "PROPERTY.REFERENCE" => child(node, "VALUE.REFERENCE")
            .map(|r| value_reference(r).map(CimValue::Reference))
            .transpose()?,
        _ => child(node, "VALUE")
            .map(|v| typed(name, ty, v))
            .transpose()?,
    };
    let embedded = node
        .attribute("EmbeddedObject")
        .or_else(|| node.attribute("EMBEDDEDOBJECT"));
    Ok(CimProperty {
        name: name.to_string(),
        ty,
        is_array: tag == "PROPERTY.ARRAY",
        value,
        embedded_object: embedded.map(str::to_string),
        reference_class: node.attribute("REFERENCECLASS").map(str::to_string),
    })
}

/// `<INSTANCE CLASSNAME=..>` → instance.
pub(crate) fn instance(node: Node2<'_, '_>) -> Result<CimInstance, XmlShapeError> {
    let mut inst = CimInstance::new(require_attr(node, "CLASSNAME")?);
    for c in elements(node) {
        match c.tag_name().name() {
            "PROPERTY" | "PROPERTY.ARRAY" | "PROPERTY.REFERENCE" => {
                let p = property(c)?;
                if !p.name.starts_with("__") {
                    inst.put(p);
                }
            }
            "QUALIFIER" => {}
            _ => return Err(unexpected(node, c)),
        }
    }
    Ok(inst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Result<CimInstance, XmlShapeError> {
        let doc = roxmltree::Document::parse(xml).expect("test XML is well-formed");
        instance(doc.root_element())
    }

    #[test]
    fn decodes_scalars_nulls_arrays_and_drops_system_properties() {
        let i = parse(concat!(
            r#"<INSTANCE CLASSNAME="Msvm_ReplicationSettingData">"#,
            r#"<QUALIFIER NAME="dynamic" TYPE="boolean"><VALUE>TRUE</VALUE></QUALIFIER>"#,
            r#"<PROPERTY NAME="__PATH" CLASSORIGIN="___SYSTEM" TYPE="string"><VALUE>x</VALUE></PROPERTY>"#,
            r#"<PROPERTY NAME="RecoveryServerPortNumber" TYPE="uint16" PROPAGATED="true"><VALUE>80</VALUE></PROPERTY>"#,
            r#"<PROPERTY NAME="CertificateThumbPrint" TYPE="string"></PROPERTY>"#,
            r#"<PROPERTY.ARRAY NAME="IncludedDisks" TYPE="string"><VALUE.ARRAY><VALUE>a</VALUE><VALUE>b</VALUE></VALUE.ARRAY></PROPERTY.ARRAY>"#,
            r#"</INSTANCE>"#
        ))
        .expect("valid instance");
        assert!(i.property("__PATH").is_none());
        assert_eq!(
            i.value("RecoveryServerPortNumber"),
            Some(&CimValue::Uint16(80))
        );
        assert!(i.property("CertificateThumbPrint").is_some());
        assert_eq!(i.value("CertificateThumbPrint"), None);
        let disks = i.value("IncludedDisks").expect("array present");
        assert_eq!(
            disks,
            &CimValue::Array(
                CimType::String,
                vec![CimValue::String("a".into()), CimValue::String("b".into())]
            )
        );
    }

    #[test]
    fn bad_values_name_the_property() {
        let e = parse(r#"<INSTANCE CLASSNAME="C"><PROPERTY NAME="P" TYPE="uint16"><VALUE>60x</VALUE></PROPERTY></INSTANCE>"#)
            .expect_err("bad number");
        assert_eq!(e.to_string(), "property P: '60x' is not a valid uint16");
    }
}
