//! Encoding a class declaration as a CIM-XML `<CLASS>` element.

use super::encode_instance::push_value;
use super::escape::push_attr;
use crate::{CimClass, MethodDecl, ParamDecl, PropertyDecl, Qualifier};

fn push_qualifiers(out: &mut String, qualifiers: &[Qualifier], include: bool) {
    if !include {
        return;
    }
    for q in qualifiers {
        out.push_str("<QUALIFIER");
        push_attr(out, "NAME", &q.name);
        push_attr(out, "TYPE", q.ty.as_str());
        out.push('>');
        push_value(out, &q.value);
        out.push_str("</QUALIFIER>");
    }
}

fn push_origin(out: &mut String, origin: Option<&str>, propagated: bool, include: bool) {
    if let (true, Some(o)) = (include, origin) {
        push_attr(out, "CLASSORIGIN", o);
    }
    if propagated {
        push_attr(out, "PROPAGATED", "true");
    }
}

fn push_property(out: &mut String, p: &PropertyDecl, quals: bool, origin: bool) {
    let tag = match (&p.reference_class, p.is_array) {
        (Some(_), false) => "PROPERTY.REFERENCE",
        (_, true) => "PROPERTY.ARRAY",
        (None, false) => "PROPERTY",
    };
    out.push('<');
    out.push_str(tag);
    push_attr(out, "NAME", &p.name);
    match (&p.reference_class, p.is_array) {
        (Some(rc), false) => push_attr(out, "REFERENCECLASS", rc),
        _ => push_attr(out, "TYPE", p.ty.as_str()),
    }
    push_origin(out, p.class_origin.as_deref(), p.propagated, origin);
    out.push('>');
    push_qualifiers(out, &p.qualifiers, quals);
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
}

fn push_param(out: &mut String, p: &ParamDecl, quals: bool) {
    let tag = match (&p.reference_class, p.is_array) {
        (Some(_), false) => "PARAMETER.REFERENCE",
        (Some(_), true) => "PARAMETER.REFARRAY",
        (None, true) => "PARAMETER.ARRAY",
        (None, false) => "PARAMETER",
    };
    out.push('<');
    out.push_str(tag);
    push_attr(out, "NAME", &p.name);
    match &p.reference_class {
        Some(rc) => push_attr(out, "REFERENCECLASS", rc),
        None => push_attr(out, "TYPE", p.ty.as_str()),
    }
    out.push('>');
    push_qualifiers(out, &p.qualifiers, quals);
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
}

fn push_method(out: &mut String, m: &MethodDecl, quals: bool, origin: bool) {
    out.push_str("<METHOD");
    push_attr(out, "NAME", &m.name);
    push_attr(out, "TYPE", m.return_type.as_str());
    push_origin(out, m.class_origin.as_deref(), m.propagated, origin);
    out.push('>');
    push_qualifiers(out, &m.qualifiers, quals);
    for p in &m.params {
        push_param(out, p, quals);
    }
    out.push_str("</METHOD>");
}

/// Encodes `<CLASS NAME SUPERCLASS>`; qualifiers and CLASSORIGIN only when the GetClass flags ask.
pub fn encode_class(
    class: &CimClass,
    include_qualifiers: bool,
    include_class_origin: bool,
) -> String {
    let mut out = String::new();
    out.push_str("<CLASS");
    push_attr(&mut out, "NAME", &class.name);
    if let Some(s) = &class.superclass {
        push_attr(&mut out, "SUPERCLASS", s);
    }
    out.push('>');
    push_qualifiers(&mut out, &class.qualifiers, include_qualifiers);
    for p in &class.properties {
        push_property(&mut out, p, include_qualifiers, include_class_origin);
    }
    for m in &class.methods {
        push_method(&mut out, m, include_qualifiers, include_class_origin);
    }
    out.push_str("</CLASS>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CimType;

    fn sample_class() -> CimClass {
        CimClass {
            name: "Msvm_ReplicationService".into(),
            superclass: Some("CIM_Service".into()),
            qualifiers: vec![Qualifier::boolean("dynamic")],
            properties: vec![
                PropertyDecl {
                    name: "Name".into(),
                    ty: CimType::String,
                    is_array: false,
                    reference_class: None,
                    qualifiers: vec![Qualifier::boolean("Key")],
                    class_origin: Some("CIM_ManagedSystemElement".into()),
                    propagated: true,
                },
                PropertyDecl {
                    name: "Tags".into(),
                    ty: CimType::String,
                    is_array: true,
                    reference_class: None,
                    qualifiers: vec![],
                    class_origin: None,
                    propagated: false,
                },
            ],
            methods: vec![MethodDecl {
                name: "StartReplication".into(),
                return_type: CimType::Uint32,
                params: vec![
                    ParamDecl {
                        name: "ComputerSystem".into(),
                        ty: CimType::Reference,
                        is_array: false,
                        reference_class: Some("CIM_ComputerSystem".into()),
                        qualifiers: vec![Qualifier::boolean("In")],
                    },
                    ParamDecl {
                        name: "Settings".into(),
                        ty: CimType::String,
                        is_array: true,
                        reference_class: None,
                        qualifiers: vec![
                            Qualifier::boolean("In"),
                            Qualifier::string("EmbeddedInstance", "Msvm_X"),
                        ],
                    },
                    ParamDecl {
                        name: "Job".into(),
                        ty: CimType::Reference,
                        is_array: false,
                        reference_class: Some("CIM_ConcreteJob".into()),
                        qualifiers: vec![Qualifier::boolean("Out")],
                    },
                ],
                qualifiers: vec![],
                class_origin: None,
                propagated: false,
            }],
        }
    }

    #[test]
    fn full_class_with_qualifiers_and_origin() {
        let xml = encode_class(&sample_class(), true, true);
        assert_eq!(
            xml,
            concat!(
                r#"<CLASS NAME="Msvm_ReplicationService" SUPERCLASS="CIM_Service">"#,
                r#"<QUALIFIER NAME="dynamic" TYPE="boolean"><VALUE>TRUE</VALUE></QUALIFIER>"#,
                r#"<PROPERTY NAME="Name" TYPE="string" CLASSORIGIN="CIM_ManagedSystemElement" PROPAGATED="true">"#,
                r#"<QUALIFIER NAME="Key" TYPE="boolean"><VALUE>TRUE</VALUE></QUALIFIER></PROPERTY>"#,
                r#"<PROPERTY.ARRAY NAME="Tags" TYPE="string"></PROPERTY.ARRAY>"#,
                r#"<METHOD NAME="StartReplication" TYPE="uint32">"#,
                r#"<PARAMETER.REFERENCE NAME="ComputerSystem" REFERENCECLASS="CIM_ComputerSystem">"#,
                r#"<QUALIFIER NAME="In" TYPE="boolean"><VALUE>TRUE</VALUE></QUALIFIER></PARAMETER.REFERENCE>"#,
                r#"<PARAMETER.ARRAY NAME="Settings" TYPE="string">"#,
                r#"<QUALIFIER NAME="In" TYPE="boolean"><VALUE>TRUE</VALUE></QUALIFIER>"#,
                r#"<QUALIFIER NAME="EmbeddedInstance" TYPE="string"><VALUE>Msvm_X</VALUE></QUALIFIER></PARAMETER.ARRAY>"#,
                r#"<PARAMETER.REFERENCE NAME="Job" REFERENCECLASS="CIM_ConcreteJob">"#,
                r#"<QUALIFIER NAME="Out" TYPE="boolean"><VALUE>TRUE</VALUE></QUALIFIER></PARAMETER.REFERENCE>"#,
                r#"</METHOD></CLASS>"#
            )
        );
    }

    #[test]
    fn flags_drop_qualifiers_and_origin() {
        let xml = encode_class(&sample_class(), false, false);
        assert!(!xml.contains("QUALIFIER"));
        assert!(!xml.contains("CLASSORIGIN"));
        assert!(xml.contains(r#"<PARAMETER.REFERENCE NAME="Job" REFERENCECLASS="CIM_ConcreteJob"></PARAMETER.REFERENCE>"#));
    }
}
