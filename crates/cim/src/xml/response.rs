//! Encoding CIM-XML responses: `IMETHODRESPONSE` for intrinsic operations and `METHODRESPONSE`
//! for extrinsic method calls (DSP0200/DSP0201 2.x).

use super::encode_class::encode_class;
use super::encode_instance::{push_instance, push_value};
use super::encode_path::{
    push_instance_name, push_instance_path, push_value_reference, PathDefaults,
};
use super::escape::{push_attr, push_text_element};
use crate::{CimClass, CimInstance, CimType, CimValue, ObjectPath};

/// DSP0200 CIM status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CimStatusCode {
    Failed = 1,
    AccessDenied = 2,
    InvalidNamespace = 3,
    InvalidParameter = 4,
    InvalidClass = 5,
    NotFound = 6,
    NotSupported = 7,
    ClassHasChildren = 8,
    ClassHasInstances = 9,
    InvalidSuperclass = 10,
    AlreadyExists = 11,
    NoSuchProperty = 12,
    TypeMismatch = 13,
    QueryLanguageNotSupported = 14,
    InvalidQuery = 15,
    MethodNotAvailable = 16,
    MethodNotFound = 17,
}

/// A CIM error returned in an `<ERROR>` element.
#[derive(Debug, Clone, PartialEq)]
pub struct CimError {
    pub code: CimStatusCode,
    pub description: String,
}

impl CimError {
    pub fn new(code: CimStatusCode, description: impl Into<String>) -> Self {
        CimError {
            code,
            description: description.into(),
        }
    }
}

/// The successful result of an intrinsic operation.
#[derive(Debug, Clone, PartialEq)]
pub enum IReturn {
    Nothing,
    ClassNames(Vec<String>),
    Class(CimClass),
    Classes(Vec<CimClass>),
    InstanceNames(Vec<ObjectPath>),
    Instance(CimInstance),
    NamedInstances(Vec<(ObjectPath, CimInstance)>),
    ObjectsWithPath(Vec<(ObjectPath, CimInstance)>),
    ObjectPaths(Vec<ObjectPath>),
}

/// An output parameter of an extrinsic method.
#[derive(Debug, Clone, PartialEq)]
pub struct OutParam {
    pub name: String,
    pub ty: CimType,
    pub is_array: bool,
    pub value: Option<CimValue>,
    /// Adds `EmbeddedObject="instance"` (the value is the instance's CIM-XML string).
    pub embedded_object: bool,
}

fn open_message(out: &mut String, message_id: &str) {
    out.push_str(r#"<?xml version="1.0" encoding="utf-8" ?>"#);
    out.push_str(r#"<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE"#);
    push_attr(out, "ID", message_id);
    out.push_str(r#" PROTOCOLVERSION="1.0"><SIMPLERSP>"#);
}

const CLOSE_MESSAGE: &str = "</SIMPLERSP></MESSAGE></CIM>";

fn push_error(out: &mut String, e: &CimError) {
    out.push_str("<ERROR");
    push_attr(out, "CODE", &(e.code as u16).to_string());
    push_attr(out, "DESCRIPTION", &e.description);
    out.push_str("/>");
}

fn push_ireturn(out: &mut String, r: &IReturn, host: &str, ns: &str) {
    let d = PathDefaults {
        host: Some(host),
        namespace: Some(ns),
    };
    match r {
        IReturn::Nothing => {}
        IReturn::ClassNames(names) => names.iter().for_each(|n| {
            out.push_str("<CLASSNAME");
            push_attr(out, "NAME", n);
            out.push_str("/>");
        }),
        IReturn::Class(c) => out.push_str(&encode_class(c, true, true)),
        IReturn::Classes(cs) => cs
            .iter()
            .for_each(|c| out.push_str(&encode_class(c, true, true))),
        IReturn::InstanceNames(paths) => paths.iter().for_each(|p| push_instance_name(out, p, d)),
        IReturn::Instance(i) => push_instance(out, i, d),
        IReturn::NamedInstances(items) => items.iter().for_each(|(p, i)| {
            out.push_str("<VALUE.NAMEDINSTANCE>");
            push_instance_name(out, p, d);
            push_instance(out, i, d);
            out.push_str("</VALUE.NAMEDINSTANCE>");
        }),
        IReturn::ObjectsWithPath(items) => items.iter().for_each(|(p, i)| {
            out.push_str("<VALUE.OBJECTWITHPATH>");
            push_instance_path(out, p, host, ns, d);
            push_instance(out, i, d);
            out.push_str("</VALUE.OBJECTWITHPATH>");
        }),
        IReturn::ObjectPaths(paths) => paths.iter().for_each(|p| {
            out.push_str("<OBJECTPATH>");
            push_instance_path(out, p, host, ns, d);
            out.push_str("</OBJECTPATH>");
        }),
    }
}

/// A complete `IMETHODRESPONSE` document. `host`/`namespace` fill in paths that carry none.
pub fn encode_imethod_response(
    message_id: &str,
    method: &str,
    host: &str,
    namespace: &str,
    result: &Result<IReturn, CimError>,
) -> String {
    let mut out = String::new();
    open_message(&mut out, message_id);
    out.push_str("<IMETHODRESPONSE");
    push_attr(&mut out, "NAME", method);
    out.push('>');
    match result {
        Err(e) => push_error(&mut out, e),
        Ok(IReturn::Nothing) => {}
        Ok(r) => {
            out.push_str("<IRETURNVALUE>");
            push_ireturn(&mut out, r, host, namespace);
            out.push_str("</IRETURNVALUE>");
        }
    }
    out.push_str("</IMETHODRESPONSE>");
    out.push_str(CLOSE_MESSAGE);
    out
}

fn push_param_value(out: &mut String, p: &OutParam, d: PathDefaults<'_>) {
    out.push_str("<PARAMVALUE");
    push_attr(out, "NAME", &p.name);
    push_attr(out, "PARAMTYPE", p.ty.as_str());
    if p.embedded_object {
        push_attr(out, "EmbeddedObject", "instance");
    }
    out.push('>');
    match &p.value {
        None => {}
        Some(CimValue::Reference(path)) => push_value_reference(out, path, d),
        Some(CimValue::Array(CimType::Reference, items)) => {
            out.push_str("<VALUE.REFARRAY>");
            for item in items {
                if let CimValue::Reference(path) = item {
                    push_value_reference(out, path, d);
                }
            }
            out.push_str("</VALUE.REFARRAY>");
        }
        Some(v) if p.is_array && !v.is_array() => {
            push_value(out, &CimValue::Array(v.cim_type(), vec![v.clone()]))
        }
        Some(v) => push_value(out, v),
    }
    out.push_str("</PARAMVALUE>");
}

/// A complete `METHODRESPONSE` document with the return value and output parameters.
pub fn encode_method_response(
    message_id: &str,
    method: &str,
    host: &str,
    namespace: &str,
    result: &Result<(CimValue, Vec<OutParam>), CimError>,
) -> String {
    let d = PathDefaults {
        host: Some(host),
        namespace: Some(namespace),
    };
    let mut out = String::new();
    open_message(&mut out, message_id);
    out.push_str("<METHODRESPONSE");
    push_attr(&mut out, "NAME", method);
    out.push('>');
    match result {
        Err(e) => push_error(&mut out, e),
        Ok((ret, params)) => {
            out.push_str("<RETURNVALUE");
            push_attr(&mut out, "PARAMTYPE", ret.cim_type().as_str());
            out.push('>');
            match ret {
                CimValue::Reference(p) => push_value_reference(&mut out, p, d),
                v => push_text_element(&mut out, "VALUE", &v.to_xml_text()),
            }
            out.push_str("</RETURNVALUE>");
            params.iter().for_each(|p| push_param_value(&mut out, p, d));
        }
    }
    out.push_str("</METHODRESPONSE>");
    out.push_str(CLOSE_MESSAGE);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyValue;

    const HEAD: &str = r#"<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="9" PROTOCOLVERSION="1.0"><SIMPLERSP>"#;

    fn job() -> ObjectPath {
        ObjectPath::new("Msvm_ConcreteJob").with_key("InstanceID", KeyValue::String("j1".into()))
    }

    #[test]
    fn error_response() {
        let r = encode_imethod_response(
            "9",
            "GetInstance",
            "h",
            "root/v2",
            &Err(CimError::new(CimStatusCode::NotFound, "no VM \"x\"")),
        );
        assert_eq!(
            r,
            format!(
                r#"{HEAD}<IMETHODRESPONSE NAME="GetInstance"><ERROR CODE="6" DESCRIPTION="no VM &quot;x&quot;"/></IMETHODRESPONSE></SIMPLERSP></MESSAGE></CIM>"#
            )
        );
    }

    #[test]
    fn nothing_omits_ireturnvalue_and_paths_are_completed() {
        let r = encode_imethod_response("9", "DeleteInstance", "h", "root", &Ok(IReturn::Nothing));
        assert!(r.contains(r#"<IMETHODRESPONSE NAME="DeleteInstance"></IMETHODRESPONSE>"#));
        let r = encode_imethod_response(
            "9",
            "ReferenceNames",
            "h",
            "root",
            &Ok(IReturn::ObjectPaths(vec![job()])),
        );
        assert!(r.contains(concat!(
            "<IRETURNVALUE><OBJECTPATH><INSTANCEPATH><NAMESPACEPATH><HOST>h</HOST>",
            r#"<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/></LOCALNAMESPACEPATH></NAMESPACEPATH>"#,
            r#"<INSTANCENAME CLASSNAME="Msvm_ConcreteJob">"#
        )));
    }

    #[test]
    fn method_response_with_job_and_outputs() {
        let params = vec![
            OutParam {
                name: "Job".into(),
                ty: CimType::Reference,
                is_array: false,
                value: Some(CimValue::Reference(job())),
                embedded_object: false,
            },
            OutParam {
                name: "Errors".into(),
                ty: CimType::String,
                is_array: true,
                value: Some(CimValue::Array(
                    CimType::String,
                    vec![CimValue::String("<INSTANCE/>".into())],
                )),
                embedded_object: true,
            },
            OutParam {
                name: "Nothing".into(),
                ty: CimType::String,
                is_array: false,
                value: None,
                embedded_object: false,
            },
        ];
        let r = encode_method_response(
            "9",
            "StartReplication",
            "h",
            "root",
            &Ok((CimValue::Uint32(4096), params)),
        );
        assert!(r.contains(r#"<METHODRESPONSE NAME="StartReplication"><RETURNVALUE PARAMTYPE="uint32"><VALUE>4096</VALUE></RETURNVALUE><PARAMVALUE NAME="Job" PARAMTYPE="reference"><VALUE.REFERENCE><INSTANCEPATH>"#));
        assert!(r.contains(r#"<PARAMVALUE NAME="Errors" PARAMTYPE="string" EmbeddedObject="instance"><VALUE.ARRAY><VALUE>&lt;INSTANCE/&gt;</VALUE></VALUE.ARRAY></PARAMVALUE>"#));
        assert!(r.contains(
            r#"<PARAMVALUE NAME="Nothing" PARAMTYPE="string"></PARAMVALUE></METHODRESPONSE>"#
        ));
    }
}
