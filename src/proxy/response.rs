//! Client-facing response bodies, and ccgate's own errors as Anthropic's error JSON
//! (`{"type":"error","error":{"type":...,"message":...}}`), in one place.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use crate::proxy::relay::{BoxError, RelayBody};

/// Every response body ccgate sends: a buffered one of its own, or a relayed upstream body.
pub enum GateBody {
    /// A complete body.
    Full(Full<Bytes>),
    /// A relayed upstream body.
    Relay(Box<RelayBody>),
}

impl GateBody {
    /// An empty body.
    pub fn empty() -> Self {
        Self::Full(Full::new(Bytes::new()))
    }
}

impl From<Bytes> for GateBody {
    fn from(b: Bytes) -> Self {
        Self::Full(Full::new(b))
    }
}

impl Body for GateBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            GateBody::Full(f) => Pin::new(f).poll_frame(cx).map_err(|never| match never {}),
            GateBody::Relay(r) => Pin::new(r.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GateBody::Full(f) => f.is_end_stream(),
            GateBody::Relay(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GateBody::Full(f) => f.size_hint(),
            GateBody::Relay(r) => r.size_hint(),
        }
    }
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<GateBody> {
    let mut resp = Response::new(GateBody::from(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A 200 response with `body` of the given content type.
pub fn body(content_type: &'static str, body: impl Into<Bytes>) -> Response<GateBody> {
    let mut resp = Response::new(GateBody::from(body.into()));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// An Anthropic-shaped error answered by ccgate itself.
pub fn error(status: StatusCode, error_type: &str, message: &str) -> Response<GateBody> {
    json(
        status,
        &serde_json::json!({"type": "error", "error": {"type": error_type, "message": message}}),
    )
}

/// The Anthropic `error.type` for a status ccgate answers with.
pub fn error_type_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error for a status, with its standard type.
pub fn error_for(status: StatusCode, message: &str) -> Response<GateBody> {
    error(status, error_type_for(status), message)
}

/// `405 Method Not Allowed`, with `Allow` naming the methods the path takes.
pub fn method_not_allowed(allow: &'static str) -> Response<GateBody> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "ccgate: method not allowed",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Turns a relayed error answer into ccgate's own Anthropic error with the same status; returns
/// the body.
pub(crate) fn replace_with_own_error(parts: &mut http::response::Parts, message: &str) -> Bytes {
    let error = serde_json::json!({"type": "error", "error": {
        "type": error_type_for(parts.status), "message": message}});
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Bytes::from(error.to_string())
}
