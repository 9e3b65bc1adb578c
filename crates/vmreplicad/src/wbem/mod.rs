//! The WBEM server: CIM-XML over HTTP (DSP0200) for namespace `root/virtualization/v2`.
//!
//! A request's flow: `http` hands the body here → [`cim::parse_request`] decodes it (the target is
//! taken from the body, never from the CIMObject header, because wbemcli percent-encodes that) →
//! intrinsic operations read a [`objects::Snapshot`] of the store; extrinsic methods are typed from
//! the class declaration in [`schema`] and turned into a core `Command` by [`methods`] → the response
//! is encoded with the request's MESSAGE ID echoed.

pub mod intrinsic;
pub mod methods;
pub mod objects;
pub mod schema;
pub mod stats;

use cim::{CimError, CimRequest, CimStatusCode};

use crate::service::Service;

/// What the HTTP layer sends back.
pub struct WbemReply {
    pub status: u16,
    /// Value of the `CIMError` header for protocol errors (DSP0200 §7.3).
    pub cim_error: Option<&'static str>,
    pub body: String,
}

impl WbemReply {
    fn protocol_error(status: u16, cim_error: &'static str, message: String) -> WbemReply {
        WbemReply {
            status,
            cim_error: Some(cim_error),
            body: message,
        }
    }
}

/// The DSP0200 §7.3 HTTP status and `CIMError` header for a request that could not be decoded.
fn protocol_error(e: &cim::RequestError) -> (u16, &'static str) {
    match e {
        cim::RequestError::Limit(cim::XmlLimitError::Malformed(_)) => {
            (400, "request-not-well-formed")
        }
        cim::RequestError::MultiRequest => (501, "multiple-requests-unsupported"),
        cim::RequestError::UnsupportedCimVersion(_) => (501, "unsupported-cim-version"),
        cim::RequestError::UnsupportedDtdVersion(_) => (501, "unsupported-dtd-version"),
        cim::RequestError::UnsupportedProtocolVersion(_) => (501, "unsupported-protocol-version"),
        _ => (400, "request-not-valid"),
    }
}

fn same_namespace(ns: &str) -> bool {
    ns.replace('\\', "/")
        .trim_matches('/')
        .eq_ignore_ascii_case(schema::NAMESPACE)
}

/// Handles one CIM-XML request (`CIMOperation: MethodCall` already checked by the caller).
pub async fn handle(svc: &Service, body: &[u8]) -> WbemReply {
    let Ok(text) = std::str::from_utf8(body) else {
        return WbemReply::protocol_error(
            400,
            "request-not-well-formed",
            "the request body is not UTF-8".into(),
        );
    };
    let request = match cim::parse_request(text) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("rejected CIM-XML request: {e}");
            let (status, header) = protocol_error(&e);
            return WbemReply::protocol_error(status, header, format!("{e}\n"));
        }
    };
    let host = svc.host.as_str();
    let ns = schema::NAMESPACE;
    let body = match &request {
        CimRequest::Intrinsic {
            message_id,
            namespace,
            method,
            params,
            ..
        } => {
            let result = if same_namespace(namespace) {
                intrinsic_call(svc, method, params)
            } else {
                Err(CimError::new(
                    CimStatusCode::InvalidNamespace,
                    format!("namespace '{namespace}' is not served here; use {ns}"),
                ))
            };
            if let Err(e) = &result {
                tracing::debug!(method, "intrinsic operation failed: {}", e.description);
            }
            cim::encode_imethod_response(message_id, method, host, ns, &result)
        }
        CimRequest::Extrinsic {
            message_id,
            target,
            method,
            params,
            ..
        } => {
            let target_ns = target.namespace.as_deref().unwrap_or(ns);
            let result = if !same_namespace(target_ns) {
                Err(CimError::new(
                    CimStatusCode::InvalidNamespace,
                    format!("namespace '{target_ns}' is not served here; use {ns}"),
                ))
            } else if let Some(r) = methods::job_errors(svc, target, method) {
                r
            } else {
                methods::call(svc, target, method, params).await
            };
            if let Err(e) = &result {
                tracing::info!(method, "method call failed: {}", e.description);
            }
            cim::encode_method_response(message_id, method, host, ns, &result)
        }
    };
    WbemReply {
        status: 200,
        cim_error: None,
        body,
    }
}

fn intrinsic_call(
    svc: &Service,
    method: &str,
    params: &[cim::ParamValue],
) -> Result<cim::IReturn, CimError> {
    let snap = objects::Snapshot::read(svc).map_err(|e| {
        CimError::new(
            CimStatusCode::Failed,
            format!("metadata store: {}", crate::error_chain(&e)),
        )
    })?;
    let health = |vm: &crate::store::VmRow, rel: Option<&crate::store::RelationshipRow>| {
        svc.health(vm, rel).0.as_u16()
    };
    intrinsic::View {
        snap: &snap,
        health: &health,
    }
    .run(method, params)
}
