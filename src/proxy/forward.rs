//! One upstream attempt: build the request for an endpoint, send it under the first-byte timeout,
//! and hold back a stream's preamble until its first content. The body is then relayed by
//! [`crate::proxy::relay::RelayBody`].

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::health::classify::{Outcome, TransportKind, classify_sse_error};
use crate::health::endpoint::Endpoint;
use crate::transport::error_chain;
use crate::wire::sse::SseScanner;

/// A client request, read once and replayed for each attempt.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Method.
    pub method: Method,
    /// The client's path and query, appended to the endpoint's base URL.
    pub path_and_query: PathAndQuery,
    /// Headers to forward: the client's, minus credentials, hop-by-hop headers, `host` and
    /// `content-length` (the body sent may be rewritten by the model map).
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Headers that describe one connection, not the message, and never cross a proxy.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers present instead of a lookup per hop-by-hop name: most
    // messages carry none of them.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

impl Prepared {
    /// Prepares a client request for forwarding.
    pub fn new(
        method: Method,
        path_and_query: PathAndQuery,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Self {
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(&X_API_KEY);
        headers.remove(header::AUTHORIZATION);
        Self {
            method,
            path_and_query,
            headers,
            body,
        }
    }

    /// The request for one endpoint, with its credential set and its model mapping applied.
    pub fn for_endpoint(&self, ep: &Endpoint) -> Result<Request<Full<Bytes>>, String> {
        let body = crate::wire::model_map::apply(&ep.model_map, &self.body);
        let uri = ep
            .base_url
            .uri(&self.path_and_query)
            .map_err(|e| format!("cannot build the upstream request: {e}"))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = self.headers.clone();
        req.headers_mut()
            .insert(ep.auth_header.0.clone(), ep.auth_header.1.clone());
        Ok(req)
    }
}

/// Sends one attempt and waits for the response headers.
pub async fn send(
    ep: &Endpoint,
    req: Request<Full<Bytes>>,
    first_byte: Duration,
) -> Result<Response<Incoming>, (Outcome, String)> {
    match tokio::time::timeout(first_byte, ep.client.request(req)).await {
        Err(_) => Err((
            Outcome::Transport(TransportKind::Timeout),
            format!(
                "no response headers within {}",
                humantime::format_duration(first_byte)
            ),
        )),
        Ok(Err(e)) => {
            let text = error_chain(&e);
            let kind = if text.contains("timed out") || text.contains("timeout") {
                TransportKind::Timeout
            } else {
                TransportKind::Connect
            };
            Err((Outcome::Transport(kind), text))
        }
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// Reads a small (error) body with a size cap and the idle timeout; what does not arrive is left.
pub async fn read_small(mut body: Incoming, cap: usize, idle: Duration) -> Bytes {
    let mut buf = BytesMut::new();
    while buf.len() < cap {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data[..data.len().min(cap - buf.len())]);
                }
            }
            _ => break,
        }
    }
    buf.freeze()
}

/// A stream held back until its first content event.
pub enum Preamble {
    /// Content arrived (or the stream completed): commit to this endpoint.
    Commit {
        /// Frames read so far, to send first.
        held: Vec<Bytes>,
        /// Scanner state after them.
        scanner: SseScanner,
        /// The rest of the stream.
        body: Incoming,
    },
    /// The stream failed before any content: fail over.
    Failed(Outcome, String),
}

/// Reads an SSE stream's preamble (`message_start`, `ping`, `content_block_start`) until the first
/// content event, so that an `error` event or a cut before any content can still fail over
/// transparently.
pub async fn await_content(mut body: Incoming, idle: Duration) -> Preamble {
    let mut scanner = SseScanner::new();
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Preamble::Failed(
                    Outcome::Transport(TransportKind::Idle),
                    "stream idle before its first content".into(),
                );
            }
            Ok(None) => {
                return if scanner.facts().message_stop
                    || scanner
                        .facts()
                        .error
                        .as_ref()
                        .is_some_and(|e| !is_failover_error(&e.0))
                {
                    Preamble::Commit {
                        held,
                        scanner,
                        body,
                    }
                } else if let Some((ty, msg)) = scanner.facts().error.clone() {
                    Preamble::Failed(classify_sse_error(&ty), format!("{ty}: {msg}"))
                } else {
                    Preamble::Failed(
                        Outcome::Transport(TransportKind::Cut),
                        "stream ended before its first content".into(),
                    )
                };
            }
            Ok(Some(Err(e))) => {
                return Preamble::Failed(
                    Outcome::Transport(TransportKind::Cut),
                    format!("stream broke before its first content: {}", error_chain(&e)),
                );
            }
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                scanner.feed(&data);
                held.push(data);
                let facts = scanner.facts();
                if let Some((ty, msg)) = &facts.error {
                    if is_failover_error(ty) {
                        return Preamble::Failed(classify_sse_error(ty), format!("{ty}: {msg}"));
                    }
                }
                if facts.content || facts.message_stop || facts.error.is_some() {
                    return Preamble::Commit {
                        held,
                        scanner,
                        body,
                    };
                }
            }
        }
    }
}

fn is_failover_error(error_type: &str) -> bool {
    classify_sse_error(error_type).is_endpoint_fault()
}
