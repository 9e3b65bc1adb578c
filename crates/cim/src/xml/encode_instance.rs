//! Encoding a [`CimInstance`] as a CIM-XML `<INSTANCE>` element.

use super::encode_path::{push_value_reference, PathDefaults};
use super::escape::{push_attr, push_text_element};
use crate::{CimInstance, CimProperty, CimType, CimValue};

/// Appends `<VALUE>` for a scalar, or `<VALUE.ARRAY>` of `<VALUE>`s for an array.
pub(crate) fn push_value(out: &mut String, value: &CimValue) {
    match value {
        CimValue::Array(_, items) => {
            out.push_str("<VALUE.ARRAY>");
            for v in items {
                push_text_element(out, "VALUE", &v.to_xml_text());
            }
            out.push_str("</VALUE.ARRAY>");
        }
        v => push_text_element(out, "VALUE", &v.to_xml_text()),
    }
}

fn push_property(out: &mut String, p: &CimProperty, defaults: PathDefaults<'_>) {
    let is_array = p.is_array || p.value.as_ref().is_some_and(CimValue::is_array);
    let is_ref = p.ty == CimType::Reference && !is_array;
    let tag = match (is_ref, is_array) {
        (true, _) => "PROPERTY.REFERENCE",
        (false, true) => "PROPERTY.ARRAY",
        (false, false) => "PROPERTY",
    };
    out.push('<');
    out.push_str(tag);
    push_attr(out, "NAME", &p.name);
    if is_ref {
        if let Some(rc) = &p.reference_class {
            push_attr(out, "REFERENCECLASS", rc);
        }
    } else {
        // Reference arrays have no DSP0201 2.x property form; they travel as path strings.
        let ty = if p.ty == CimType::Reference {
            CimType::String
        } else {
            p.ty
        };
        push_attr(out, "TYPE", ty.as_str());
    }
    if let Some(e) = &p.embedded_object {
        push_attr(out, "EmbeddedObject", e);
    }
    out.push('>');
    match &p.value {
        Some(CimValue::Reference(path)) if is_ref => push_value_reference(out, path, defaults),
        Some(v @ CimValue::Array(..)) => push_value(out, v),
        Some(v) if is_array => push_value(out, &CimValue::Array(v.cim_type(), vec![v.clone()])),
        Some(v) if !is_ref => push_value(out, v),
        _ => {}
    }
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
}

pub(crate) fn push_instance(out: &mut String, inst: &CimInstance, defaults: PathDefaults<'_>) {
    out.push_str("<INSTANCE");
    push_attr(out, "CLASSNAME", &inst.class_name);
    out.push('>');
    for p in &inst.properties {
        push_property(out, p, defaults);
    }
    out.push_str("</INSTANCE>");
}

/// Encodes one instance as a standalone `<INSTANCE CLASSNAME=..>` element, e.g. for an
/// embedded `Msvm_Error` string.
pub fn encode_instance(inst: &CimInstance) -> String {
    let mut out = String::new();
    push_instance(&mut out, inst, PathDefaults::default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_embedded_instance, CimDateTime, KeyValue, ObjectPath};
    use proptest::prelude::*;

    #[test]
    fn encodes_each_property_form() {
        let mut i = CimInstance::new("Msvm_Error")
            .with("Message", CimValue::String("a<b".into()))
            .with("Flag", CimValue::Boolean(true))
            .with(
                "Disks",
                CimValue::Array(
                    CimType::Uint16,
                    vec![CimValue::Uint16(1), CimValue::Uint16(2)],
                ),
            )
            .with(
                "Vm",
                CimValue::Reference(
                    ObjectPath::new("Msvm_ComputerSystem")
                        .with_key("Name", KeyValue::String("g".into())),
                ),
            );
        i.set_null("Thumb", CimType::String, false);
        i.properties[0].embedded_object = Some("instance".into());
        assert_eq!(
            encode_instance(&i),
            concat!(
                r#"<INSTANCE CLASSNAME="Msvm_Error">"#,
                r#"<PROPERTY NAME="Message" TYPE="string" EmbeddedObject="instance"><VALUE>a&lt;b</VALUE></PROPERTY>"#,
                r#"<PROPERTY NAME="Flag" TYPE="boolean"><VALUE>TRUE</VALUE></PROPERTY>"#,
                r#"<PROPERTY.ARRAY NAME="Disks" TYPE="uint16"><VALUE.ARRAY><VALUE>1</VALUE><VALUE>2</VALUE></VALUE.ARRAY></PROPERTY.ARRAY>"#,
                r#"<PROPERTY.REFERENCE NAME="Vm"><VALUE.REFERENCE><INSTANCENAME CLASSNAME="Msvm_ComputerSystem">"#,
                r#"<KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string" TYPE="string">g</KEYVALUE></KEYBINDING>"#,
                r#"</INSTANCENAME></VALUE.REFERENCE></PROPERTY.REFERENCE>"#,
                r#"<PROPERTY NAME="Thumb" TYPE="string"></PROPERTY>"#,
                r#"</INSTANCE>"#
            )
        );
    }

    fn xml_string() -> impl Strategy<Value = String> {
        // XML 1.0 cannot carry most control characters; everything else must survive.
        "[^\u{0}-\u{8}\u{B}\u{C}\u{E}-\u{1F}\u{FFFE}\u{FFFF}]{0,20}"
    }

    fn scalar() -> impl Strategy<Value = CimValue> {
        prop_oneof![
            any::<bool>().prop_map(CimValue::Boolean),
            xml_string().prop_map(CimValue::String),
            any::<u8>().prop_map(CimValue::Uint8),
            any::<i16>().prop_map(CimValue::Sint16),
            any::<u32>().prop_map(CimValue::Uint32),
            any::<i64>().prop_map(CimValue::Sint64),
            any::<u64>().prop_map(CimValue::Uint64),
            (-1.0e300f64..1.0e300).prop_map(CimValue::Real64),
            (0i64..253_402_300_799, 0u32..1_000_000)
                .prop_map(|(s, us)| CimValue::Datetime(CimDateTime::from_unix(s, us))),
            (xml_string(), xml_string()).prop_map(|(k, v)| CimValue::Reference(
                ObjectPath::new("Ref")
                    .with_key("K", KeyValue::String(k))
                    .with_key("V", KeyValue::String(v))
            )),
        ]
    }

    fn value() -> impl Strategy<Value = CimValue> {
        prop_oneof![
            3 => scalar(),
            1 => proptest::collection::vec(xml_string().prop_map(CimValue::String), 0..4)
                .prop_map(|v| CimValue::Array(CimType::String, v)),
            1 => proptest::collection::vec(any::<u16>().prop_map(CimValue::Uint16), 0..4)
                .prop_map(|v| CimValue::Array(CimType::Uint16, v)),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(
            class in "[A-Za-z_][A-Za-z0-9_]{0,20}",
            props in proptest::collection::vec(("[A-Za-z][A-Za-z0-9_]{0,12}", proptest::option::of(value())), 0..6),
        ) {
            let mut inst = CimInstance::new(&class);
            for (name, v) in props {
                match v {
                    Some(v) => inst.set(&name, v),
                    None => inst.set_null(&name, CimType::Uint32, false),
                }
            }
            let text = encode_instance(&inst);
            prop_assert_eq!(parse_embedded_instance(&text), Ok(inst));
        }
    }
}
