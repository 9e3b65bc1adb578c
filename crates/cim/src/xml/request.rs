//! Decoding CIM-XML requests (DSP0200 `SIMPLEREQ` with `IMETHODCALL` or `METHODCALL`).
//!
//! Both pywbem's and sblim-wbemcli's forms are accepted: `PARAMVALUE` with or without `PARAMTYPE`,
//! references as `LOCALINSTANCEPATH` or full `INSTANCEPATH`, `KEYVALUE` with or without `TYPE`.
//! Parameter values stay untyped text here; the daemon types them with the method declaration.

use super::decode_instance::instance;
use super::decode_path::{any_path, instance_name, local_namespace, value_reference};
use super::limits::{parse_limited, XmlLimitError};
use super::shape::{
    child, elements, first_element, require_attr, require_child, text, unexpected, Node2,
    XmlShapeError,
};
use crate::{CimInstance, ObjectPath};

/// The untyped content of an `IPARAMVALUE` or `PARAMVALUE`.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamData {
    /// No child element.
    Null,
    /// `<VALUE>text</VALUE>`.
    Value(String),
    /// `<VALUE.ARRAY>`; `VALUE.NULL` becomes `None`.
    ValueArray(Vec<Option<String>>),
    /// `<VALUE.REFERENCE>`.
    Reference(ObjectPath),
    /// `<VALUE.REFARRAY>`.
    ReferenceArray(Vec<ObjectPath>),
    /// `<INSTANCENAME>` directly.
    InstanceName(ObjectPath),
    /// `<CLASSNAME NAME=..>` directly.
    ClassName(String),
    /// `<INSTANCE>` or `<VALUE.NAMEDINSTANCE>`.
    Instance(CimInstance),
}

/// One named parameter of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamValue {
    pub name: String,
    /// The `PARAMTYPE` attribute (pywbem sends it, wbemcli does not).
    pub param_type: Option<String>,
    pub embedded_object: Option<String>,
    pub data: ParamData,
}

impl ParamValue {
    /// The text of a `<VALUE>`.
    pub fn as_str(&self) -> Option<&str> {
        match &self.data {
            ParamData::Value(s) => Some(s),
            _ => None,
        }
    }

    /// A `<VALUE>` of `TRUE`/`FALSE` (any case).
    pub fn as_bool(&self) -> Option<bool> {
        match self.as_str()?.trim() {
            s if s.eq_ignore_ascii_case("true") => Some(true),
            s if s.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
    }
}

/// One decoded operation request.
#[derive(Debug, Clone, PartialEq)]
pub enum CimRequest {
    Intrinsic {
        message_id: String,
        protocol_version: String,
        /// `root/virtualization/v2`.
        namespace: String,
        method: String,
        params: Vec<ParamValue>,
    },
    Extrinsic {
        message_id: String,
        protocol_version: String,
        /// Namespace filled in; a class path has no keys.
        target: ObjectPath,
        method: String,
        params: Vec<ParamValue>,
    },
}

impl CimRequest {
    pub fn message_id(&self) -> &str {
        match self {
            CimRequest::Intrinsic { message_id, .. } | CimRequest::Extrinsic { message_id, .. } => {
                message_id
            }
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        match self {
            CimRequest::Intrinsic { namespace, .. } => Some(namespace),
            CimRequest::Extrinsic { target, .. } => target.namespace.as_deref(),
        }
    }

    pub fn method(&self) -> &str {
        match self {
            CimRequest::Intrinsic { method, .. } | CimRequest::Extrinsic { method, .. } => method,
        }
    }
}

/// A request body that could not be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RequestError {
    #[error(transparent)]
    Limit(#[from] XmlLimitError),
    #[error(transparent)]
    Shape(#[from] XmlShapeError),
    #[error("the root element is {0}, not CIM")]
    NotCim(String),
    #[error("MULTIREQ (batched operations) is not supported; send one SIMPLEREQ per request")]
    MultiRequest,
    #[error("the request is a {0}, not a SIMPLEREQ")]
    NotARequest(String),
    #[error("SIMPLEREQ has no IMETHODCALL or METHODCALL element")]
    NoCall,
    #[error("METHODCALL has no LOCALINSTANCEPATH or LOCALCLASSPATH element")]
    NoTarget,
    #[error("CIMVERSION \"{0}\" is not supported; send 2.x")]
    UnsupportedCimVersion(String),
    #[error("DTDVERSION \"{0}\" is not supported; send 2.x")]
    UnsupportedDtdVersion(String),
    #[error("PROTOCOLVERSION \"{0}\" is not supported; send 1.x")]
    UnsupportedProtocolVersion(String),
}

/// `major.` prefix check of a version attribute; an absent attribute is accepted.
fn version_ok(value: Option<&str>, major: &str) -> bool {
    value.is_none_or(|v| v.trim() == major || v.trim().starts_with(&format!("{major}.")))
}

/// Decodes a CIM-XML request body.
pub fn parse_request(body: &str) -> Result<CimRequest, RequestError> {
    let doc = parse_limited(body)?;
    let cim = doc.root_element();
    if !cim.has_tag_name("CIM") {
        return Err(RequestError::NotCim(cim.tag_name().name().to_string()));
    }
    if !version_ok(cim.attribute("CIMVERSION"), "2") {
        let v = cim.attribute("CIMVERSION").unwrap_or_default().to_string();
        return Err(RequestError::UnsupportedCimVersion(v));
    }
    if !version_ok(cim.attribute("DTDVERSION"), "2") {
        let v = cim.attribute("DTDVERSION").unwrap_or_default().to_string();
        return Err(RequestError::UnsupportedDtdVersion(v));
    }
    let message = require_child(cim, "MESSAGE")?;
    let message_id = require_attr(message, "ID")?.to_string();
    let protocol_version = message
        .attribute("PROTOCOLVERSION")
        .unwrap_or("1.0")
        .to_string();
    if !version_ok(Some(&protocol_version), "1") {
        return Err(RequestError::UnsupportedProtocolVersion(protocol_version));
    }
    let req = match first_element(message) {
        Some(r) if r.has_tag_name("SIMPLEREQ") => r,
        Some(r) if r.has_tag_name("MULTIREQ") => return Err(RequestError::MultiRequest),
        Some(r) => return Err(RequestError::NotARequest(r.tag_name().name().to_string())),
        None => Err(XmlShapeError::MissingChild {
            parent: "MESSAGE".into(),
            expected: "SIMPLEREQ",
        })?,
    };
    if let Some(call) = child(req, "IMETHODCALL") {
        let namespace = local_namespace(require_child(call, "LOCALNAMESPACEPATH")?)?;
        return Ok(CimRequest::Intrinsic {
            message_id,
            protocol_version,
            namespace,
            method: require_attr(call, "NAME")?.to_string(),
            params: params(call, "IPARAMVALUE")?,
        });
    }
    let call = child(req, "METHODCALL").ok_or(RequestError::NoCall)?;
    let method = require_attr(call, "NAME")?.to_string();
    let target = elements(call)
        .find(|n| n.has_tag_name("LOCALINSTANCEPATH") || n.has_tag_name("LOCALCLASSPATH"))
        .ok_or(RequestError::NoTarget)?;
    Ok(CimRequest::Extrinsic {
        message_id,
        protocol_version,
        target: any_path(target)?,
        method,
        params: params(call, "PARAMVALUE")?,
    })
}

fn params(call: Node2<'_, '_>, tag: &str) -> Result<Vec<ParamValue>, XmlShapeError> {
    elements(call)
        .filter(|n| n.has_tag_name(tag))
        .map(param)
        .collect()
}

fn param(node: Node2<'_, '_>) -> Result<ParamValue, XmlShapeError> {
    let embedded = node
        .attribute("EmbeddedObject")
        .or_else(|| node.attribute("EMBEDDEDOBJECT"));
    Ok(ParamValue {
        name: require_attr(node, "NAME")?.to_string(),
        param_type: node.attribute("PARAMTYPE").map(str::to_string),
        embedded_object: embedded.map(str::to_string),
        data: match first_element(node) {
            None => ParamData::Null,
            Some(v) => param_data(node, v)?,
        },
    })
}

fn param_data(parent: Node2<'_, '_>, v: Node2<'_, '_>) -> Result<ParamData, XmlShapeError> {
    Ok(match v.tag_name().name() {
        "VALUE" => ParamData::Value(text(v)),
        "VALUE.ARRAY" => ParamData::ValueArray(
            elements(v)
                .map(|e| match e.tag_name().name() {
                    "VALUE" => Ok(Some(text(e))),
                    "VALUE.NULL" => Ok(None),
                    _ => Err(unexpected(v, e)),
                })
                .collect::<Result<_, _>>()?,
        ),
        "VALUE.REFERENCE" => ParamData::Reference(value_reference(v)?),
        "VALUE.REFARRAY" => ParamData::ReferenceArray(
            elements(v)
                .filter(|e| e.has_tag_name("VALUE.REFERENCE"))
                .map(value_reference)
                .collect::<Result<_, _>>()?,
        ),
        "INSTANCENAME" => ParamData::InstanceName(instance_name(v)?),
        "CLASSNAME" => ParamData::ClassName(require_attr(v, "NAME")?.to_string()),
        "INSTANCE" => ParamData::Instance(instance(v)?),
        "VALUE.NAMEDINSTANCE" => ParamData::Instance(instance(require_child(v, "INSTANCE")?)?),
        _ => return Err(unexpected(parent, v)),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_other_than_cim_2_dtd_2_protocol_1_are_refused() {
        let req = |cim: &str, dtd: &str, proto: &str| {
            format!(
                r#"<CIM CIMVERSION="{cim}" DTDVERSION="{dtd}"><MESSAGE ID="1" PROTOCOLVERSION="{proto}"><SIMPLEREQ><IMETHODCALL NAME="EnumerateClassNames"><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/></LOCALNAMESPACEPATH></IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>"#
            )
        };
        assert!(parse_request(&req("2.0", "2.0", "1.0")).is_ok());
        assert!(parse_request(&req("2.6", "2.4", "1.4")).is_ok());
        assert_eq!(
            parse_request(&req("3.0", "2.0", "1.0")),
            Err(RequestError::UnsupportedCimVersion("3.0".into()))
        );
        assert_eq!(
            parse_request(&req("2.0", "1.1", "1.0")),
            Err(RequestError::UnsupportedDtdVersion("1.1".into()))
        );
        assert_eq!(
            parse_request(&req("2.0", "2.0", "2.0")),
            Err(RequestError::UnsupportedProtocolVersion("2.0".into()))
        );
    }

    use super::*;

    const NS: &str = r#"<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virtualization"/><NAMESPACE NAME="v2"/></LOCALNAMESPACEPATH>"#;

    fn wrap(call: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="7" PROTOCOLVERSION="1.0"><SIMPLEREQ>{call}</SIMPLEREQ></MESSAGE></CIM>"#
        )
    }

    #[test]
    fn intrinsic_with_every_param_shape() {
        let body = wrap(&format!(
            concat!(
                r#"<IMETHODCALL NAME="GetInstance">{}"#,
                r#"<IPARAMVALUE NAME="InstanceName"><INSTANCENAME CLASSNAME="C"><KEYBINDING NAME="K"><KEYVALUE>v</KEYVALUE></KEYBINDING></INSTANCENAME></IPARAMVALUE>"#,
                r#"<IPARAMVALUE NAME="LocalOnly"><VALUE>FALSE</VALUE></IPARAMVALUE>"#,
                r#"<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="Msvm_X"/></IPARAMVALUE>"#,
                r#"<IPARAMVALUE NAME="PropertyList"><VALUE.ARRAY><VALUE>A</VALUE><VALUE.NULL/></VALUE.ARRAY></IPARAMVALUE>"#,
                r#"<IPARAMVALUE NAME="Empty"/>"#,
                r#"</IMETHODCALL>"#
            ),
            NS
        ));
        let r = parse_request(&body).expect("valid request");
        assert_eq!(r.message_id(), "7");
        assert_eq!(r.namespace(), Some("root/virtualization/v2"));
        assert_eq!(r.method(), "GetInstance");
        let CimRequest::Intrinsic { params, .. } = r else {
            panic!("expected intrinsic");
        };
        assert!(
            matches!(&params[0].data, ParamData::InstanceName(p) if p.key_str("K") == Some("v"))
        );
        assert_eq!(params[1].as_bool(), Some(false));
        assert_eq!(params[2].data, ParamData::ClassName("Msvm_X".into()));
        assert_eq!(
            params[3].data,
            ParamData::ValueArray(vec![Some("A".into()), None])
        );
        assert_eq!(params[4].data, ParamData::Null);
    }

    #[test]
    fn extrinsic_on_a_class_path() {
        let body = wrap(&format!(
            r#"<METHODCALL NAME="M"><LOCALCLASSPATH>{NS}<CLASSNAME NAME="Msvm_S"/></LOCALCLASSPATH><PARAMVALUE NAME="P" PARAMTYPE="string"><VALUE>x</VALUE></PARAMVALUE></METHODCALL>"#
        ));
        let r = parse_request(&body).expect("valid request");
        let CimRequest::Extrinsic { target, params, .. } = r else {
            panic!("expected extrinsic");
        };
        assert_eq!(target.class_name, "Msvm_S");
        assert!(target.keys.is_empty());
        assert_eq!(params[0].param_type.as_deref(), Some("string"));
        assert_eq!(params[0].as_str(), Some("x"));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = parse_request(&wrap(r#"<METHODCALL><LOCALCLASSPATH/></METHODCALL>"#))
            .expect_err("no NAME");
        assert_eq!(e.to_string(), "METHODCALL has no NAME attribute");
        let multi = r#"<CIM><MESSAGE ID="1"><MULTIREQ/></MESSAGE></CIM>"#;
        assert_eq!(parse_request(multi), Err(RequestError::MultiRequest));
        assert!(matches!(parse_request("<CIM"), Err(RequestError::Limit(_))));
        assert_eq!(parse_request("<X/>"), Err(RequestError::NotCim("X".into())));
        assert_eq!(parse_request(&wrap("")), Err(RequestError::NoCall));
    }
}
