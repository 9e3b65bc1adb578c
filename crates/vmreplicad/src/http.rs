//! The HTTP front: `POST /cimom` (CIM-XML, DSP0200) and `POST /api/v1/command` (JSON of the core's
//! `Command`, used by the CLI). Both end in the same [`Service::execute`].
//!
//! Both require credentials as [`crate::auth`] says; /healthz does not.
//! Bodies over [`MAX_BODY`] are refused with 413 before they are read whole.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::{Command, CommandError};

use crate::auth::AuthPolicy;
use crate::service::Service;

/// Largest request body accepted (CIM-XML or JSON).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

pub fn router(service: Arc<Service>, auth: Arc<AuthPolicy>) -> Router {
    Router::new()
        .route("/cimom", post(cimom))
        .route("/", post(cimom))
        .route("/api/v1/command", post(command))
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            crate::auth::require,
        ))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(service)
}

fn header_is(headers: &HeaderMap, name: &str, expected: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

/// The media type of the request, without parameters, lower-case.
fn media_type(headers: &HeaderMap) -> String {
    let value = headers
        .get("Content-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The 415 answer unless the body is declared as one of `allowed`. Browsers cannot send these types
/// cross-origin without a CORS preflight, which this server never grants.
fn wrong_media_type(headers: &HeaderMap, allowed: &[&str]) -> Option<Response> {
    let found = media_type(headers);
    if allowed.contains(&found.as_str()) {
        return None;
    }
    let msg = format!(
        "Content-Type must be {}, not '{found}'\n",
        allowed.join(" or ")
    );
    Some((StatusCode::UNSUPPORTED_MEDIA_TYPE, msg).into_response())
}

async fn cimom(State(svc): State<Arc<Service>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(resp) = wrong_media_type(&headers, &["application/xml", "text/xml"]) {
        return resp;
    }
    if !header_is(&headers, "CIMOperation", "MethodCall") {
        let mut resp = (
            StatusCode::BAD_REQUEST,
            "the CIMOperation header must be MethodCall\n",
        )
            .into_response();
        resp.headers_mut()
            .insert("CIMError", HeaderValue::from_static("header-mismatch"));
        return resp;
    }
    let reply = crate::wbem::handle(&svc, &body).await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, reply.body).into_response();
    let h = resp.headers_mut();
    if let Some(e) = reply.cim_error {
        h.insert("CIMError", HeaderValue::from_static(e));
        h.insert(
            "Content-Type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    } else {
        h.insert(
            "Content-Type",
            HeaderValue::from_static("application/xml; charset=\"utf-8\""),
        );
        h.insert("CIMOperation", HeaderValue::from_static("MethodResponse"));
    }
    resp
}

async fn command(State(svc): State<Arc<Service>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(resp) = wrong_media_type(&headers, &["application/json"]) {
        return resp;
    }
    let cmd: Command = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            let err = CommandError::new(
                ReturnCode::InvalidParameter,
                format!("the command is not valid JSON: {e}"),
            );
            return (StatusCode::BAD_REQUEST, Json(err)).into_response();
        }
    };
    match svc.execute(cmd).await {
        Ok(out) => (StatusCode::OK, Json(out)).into_response(),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(e)).into_response(),
    }
}
