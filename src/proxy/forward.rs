//! One upstream attempt: build the request for an endpoint, send it under the first-byte timeout,
//! judge what came back before committing to it — a stream's preamble is held until its first
//! content, a non-streaming answer is read whole (up to a cap) — and hand it to
//! [`crate::proxy::relay::RelayBody`].

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use http_body_util::BodyExt;

use crate::config::RelayLimits;
use crate::health::classify::{Outcome, TransportKind, classify_sse_error};
use crate::health::endpoint::Endpoint;
use crate::transport::error_chain;
use crate::transport::headers::{each_line, remove_in_order, replace_in_order};
use crate::transport::replay::{Frames, ReplayBody};
use crate::transport::upstream::{AnswerBody, UpstreamBody, UpstreamError};
use crate::wire::sse::SseScanner;
use crate::wire::usage;

/// A client request, read once and replayed for each attempt.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Method.
    pub method: Method,
    /// The client's path and query, appended to the endpoint's base URL.
    pub path_and_query: PathAndQuery,
    /// Headers to forward: the client's, in the client's order, minus hop-by-hop headers, `expect`
    /// and `content-length` (the body sent may be rewritten by the model map). Its `host` and
    /// credential lines are still there, to be replaced in place (see [`forwarded_headers`]).
    pub headers: HeaderMap,
    /// The body, as the frames it arrived in.
    pub body: Frames,
    /// What a successful answer must look like.
    pub expects: Expects,
    /// The body's top-level `metadata` (where a session id may be), read in the same walk as
    /// `stream`.
    pub metadata: Option<Bytes>,
    /// The raw value of the body's `model`, read from its start (Claude Code writes it first),
    /// else its end; for the request's record and its session's binding key. Set by the caller
    /// that reads it (`None` when nothing keeps it).
    pub model: Option<Bytes>,
    /// The client's own `authorization` / `x-api-key` (marked sensitive), forwarded only to
    /// endpoints with `credential = "client"`; never logged, stored or shown.
    client_credential: ClientCredential,
}

/// The client's own credential headers (marked sensitive): what `credential = "client"`
/// endpoints are sent, and what is scrubbed from anything an upstream says (it may echo the
/// credential it got) before that is logged, shown or stored. Empty for most requests: an
/// endpoint with a key of its own never sees it.
#[derive(Clone, Debug, Default)]
pub struct ClientCredential(Vec<(HeaderName, http::HeaderValue)>);

impl ClientCredential {
    /// Whether the client sent none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `text` with the credential replaced by `***` (a `Bearer` token without its scheme).
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (_, value) in &self.0 {
            let v = value.to_str().unwrap_or("");
            let v = v.split_once(' ').map_or(v, |(_, t)| t.trim());
            out = crate::health::endpoint::scrub_secret(&out, v);
        }
        out
    }
}

/// What a 2xx answer to a request must be. The Messages endpoints answer SSE to `stream: true` and
/// JSON otherwise; anything else (a relay's HTML login page, say) is the endpoint failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expects {
    /// `text/event-stream`.
    EventStream,
    /// `application/json`, read whole and parsed before it is relayed.
    Json,
    /// Any other path: whatever the upstream sends.
    Anything,
}

impl Expects {
    /// Whether `method` on `path` is a Messages call, whose answer is judged by its body's
    /// `stream`.
    fn is_messages(method: &Method, path: &str) -> bool {
        *method == Method::POST && (path == "/v1/messages" || path == "/v1/messages/count_tokens")
    }

    /// What `method` on `path` must be answered with, given the body's raw `stream`.
    fn of(method: &Method, path: &str, stream: Option<&[u8]>) -> Self {
        if !Self::is_messages(method, path) {
            return Self::Anything;
        }
        match stream {
            Some(b"true") if path == "/v1/messages" => Self::EventStream,
            _ => Self::Json,
        }
    }

    /// Why a 2xx answer with `headers` is not what was asked for, if it is not.
    pub fn mismatch(self, headers: &HeaderMap) -> Option<String> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let want = match self {
            Self::Anything => return None,
            Self::EventStream => "text/event-stream",
            Self::Json => "application/json",
        };
        let got = content_type.as_deref().unwrap_or("");
        let essence = got.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case(want) {
            return Some(format!(
                "answered content-type `{}` where {want} was asked for",
                got.chars().take(100).collect::<String>()
            ));
        }
        // Identity was asked for (see [`Prepared::new`]): an encoded answer could not be judged.
        if let Some(enc) = headers.get(header::CONTENT_ENCODING)
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return Some(format!(
                "answered content-encoding `{}` although identity was asked for",
                String::from_utf8_lossy(&enc.as_bytes()[..enc.len().min(100)])
            ));
        }
        None
    }
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Whether `name` is a header that describes one connection, not the message, and never crosses
/// a proxy: one match on its text (a switch on the length, then one comparison) rather than a
/// comparison with each name.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

/// The headers a request forwards, in the order the client sent them (relays may read the order
/// as part of a client's fingerprint), and the client's own credential read from them. One pass
/// that keeps every header but: hop-by-hop ones (and those `Connection` names), `content-length`
/// (set for the upstream), a second `host` (the first stays where it is, for its value to be
/// replaced by the upstream's), and `expect` (the client's `100-continue` was answered when its
/// body was read, and the upstream gets the whole body at once). `authorization` and `x-api-key`
/// stay where they are, marked sensitive, for [`Prepared::for_endpoint`] to keep or replace in
/// place. `accept-encoding` becomes `identity` where it was, or is added: answers are judged by
/// what they say (a stream by its events, a JSON answer by parsing it) and error answers are
/// scrubbed of secrets, so ccgate must be able to read them.
fn forwarded_headers(headers: HeaderMap) -> (HeaderMap, ClientCredential) {
    let named_by_connection: Vec<HeaderName> = named_by_connection(&headers).collect();
    let mut out = HeaderMap::with_capacity(headers.len() + 1);
    let mut credential = ClientCredential::default();
    let mut identity_asked = false;
    let mut host_kept = false;
    each_line(headers, |name, mut value| {
        if *name == header::AUTHORIZATION || *name == X_API_KEY {
            value.set_sensitive(true);
            credential.0.push((name.clone(), value.clone()));
            out.append(name.clone(), value);
        } else if *name == header::ACCEPT_ENCODING {
            if !std::mem::replace(&mut identity_asked, true) {
                out.append(name.clone(), http::HeaderValue::from_static("identity"));
            }
        } else if *name == header::HOST {
            if !std::mem::replace(&mut host_kept, true) {
                out.append(name.clone(), value);
            }
        } else if !(*name == header::CONTENT_LENGTH
            || *name == header::EXPECT
            || is_hop_by_hop(name)
            || named_by_connection.contains(name))
        {
            out.append(name.clone(), value);
        }
    });
    if !identity_asked {
        out.append(
            header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
    }
    (out, credential)
}

/// The header names the `Connection` header lists (hop-by-hop for this connection only).
fn named_by_connection(headers: &HeaderMap) -> impl Iterator<Item = HeaderName> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers present instead of a lookup per hop-by-hop name: most
    // messages carry none of them.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = named_by_connection(headers)
        .chain(headers.keys().filter(|k| is_hop_by_hop(k)).cloned())
        .collect();
    for n in named {
        headers.remove(n);
    }
}

impl Prepared {
    /// Prepares a client request for forwarding.
    pub fn new(
        method: Method,
        path_and_query: PathAndQuery,
        headers: HeaderMap,
        body: Frames,
    ) -> Self {
        let (headers, client_credential) = forwarded_headers(headers);
        // One walk from the body's end reads `stream` (a Messages call's) and `metadata` (where a
        // session id may be). A body the client compressed cannot be read: what it asked for is
        // unknown, and whatever the upstream answers is relayed as it comes.
        let path = path_and_query.path();
        let encoded = headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let (expects, metadata) = if encoded {
            (Expects::Anything, None)
        } else if Expects::is_messages(&method, path) {
            let [stream, metadata] = body.last_members([b"stream", b"metadata"]);
            (Expects::of(&method, path, stream.as_deref()), metadata)
        } else {
            (Expects::Anything, body.last_member(b"metadata"))
        };
        Self {
            method,
            path_and_query,
            headers,
            body,
            expects,
            metadata,
            model: None,
            client_credential,
        }
    }

    /// Whether the client sent a credential of its own.
    pub fn has_client_credential(&self) -> bool {
        !self.client_credential.is_empty()
    }

    /// `text` with the client's own credential replaced by `***` (an upstream may echo the
    /// credential it refused).
    pub fn scrub(&self, text: &str) -> String {
        self.client_credential.scrub(text)
    }

    /// The client's own credential.
    pub fn client_credential(&self) -> &ClientCredential {
        &self.client_credential
    }

    /// The request for one endpoint, with its credential set and its model mapping applied.
    pub fn for_endpoint(&self, ep: &Endpoint) -> Result<Request<UpstreamBody>, String> {
        // The frames go out as they came, unless this endpoint maps the model: then the joined
        // body with `model` spliced.
        let body = if ep.model_map.is_empty() {
            self.body.body()
        } else {
            ReplayBody::from(crate::wire::model_map::apply(
                &ep.model_map,
                &self.body.joined(),
            ))
        };
        let uri = ep
            .base_url
            .uri(&self.path_and_query)
            .map_err(|e| format!("cannot build the upstream request: {e}"))?;
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = self.headers.clone();
        // The client's credential lines are in place: an endpoint with a key of its own has them
        // replaced by its own, where the first of them was; a `credential = "client"` endpoint
        // gets them as they are.
        if let Some((name, value)) = &ep.auth_header {
            let headers = req.headers_mut();
            if self.client_credential.0.iter().all(|(n, _)| n == name) {
                // `insert` keeps the position of a header already there, or appends.
                headers.insert(name.clone(), value.clone());
            } else {
                replace_in_order(
                    headers,
                    |n| *n == header::AUTHORIZATION || *n == X_API_KEY,
                    Some((name.clone(), value.clone())),
                );
            }
            strip_oauth_beta(headers);
        }
        Ok(req)
    }
}

/// Removes the `oauth-*` flags from `anthropic-beta` for an endpoint with its own key: they belong
/// to the client's OAuth login (see `credential = "client"`), not to that key. The header may come
/// as several lines; when a flag goes, the rest are sent as one comma-separated line (the same
/// list), and when none is an `oauth-*` flag the lines go untouched.
fn strip_oauth_beta(headers: &mut HeaderMap) {
    let lines = headers.get_all(&ANTHROPIC_BETA);
    if !lines
        .iter()
        .any(|v| memchr::memmem::find(v.as_bytes(), b"oauth-").is_some())
    {
        return;
    }
    let mut kept: Vec<&str> = Vec::new();
    for line in lines {
        // A line that is not text cannot be filtered: leave the header as the client sent it.
        let Ok(line) = line.to_str() else { return };
        kept.extend(
            line.split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty() && !f.starts_with("oauth-")),
        );
    }
    match http::HeaderValue::from_str(&kept.join(",")) {
        Ok(v) if !kept.is_empty() => {
            headers.insert(ANTHROPIC_BETA.clone(), v);
        }
        _ => remove_in_order(headers, |n| *n == ANTHROPIC_BETA),
    }
}

static ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

/// Why an attempt got no response head.
pub enum SendError {
    /// The endpoint failed: the attempt's outcome and what happened.
    Endpoint(Outcome, String),
    /// ccgate itself ran out of descriptors, socket memory or ports (see [`local_exhaustion`]):
    /// no endpoint is to blame, and none would fare better.
    Local(String),
    /// The endpoint refused the request unprocessed (an HTTP/2 stream past a graceful GOAWAY):
    /// send it again, in the same attempt.
    Refused(String),
}

/// Sends one attempt and waits for the response headers.
///
/// A combinator, not an async fn: an async fn would keep the request a second time beside the
/// future it is moved into, and every request's future carries this one.
pub fn send(
    ep: &Endpoint,
    req: Request<UpstreamBody>,
    first_byte: Duration,
) -> impl Future<Output = Result<Response<AnswerBody>, SendError>> + Send + '_ {
    tokio::time::timeout(first_byte, ep.client.request(req)).map(move |sent| match sent {
        Err(_) => Err(SendError::Endpoint(
            Outcome::Transport(TransportKind::Timeout),
            format!(
                "no response headers within {}",
                humantime::format_duration(first_byte)
            ),
        )),
        Ok(Err(e)) if local_exhaustion(&e) => Err(SendError::Local(format!(
            "ccgate itself is out of resources: {}",
            error_chain(&e)
        ))),
        Ok(Err(e @ UpstreamError::Refused(_))) => Err(SendError::Refused(error_chain(&e))),
        Ok(Err(e)) => {
            let text = error_chain(&e);
            let kind = if text.contains("timed out") || text.contains("timeout") {
                TransportKind::Timeout
            } else {
                TransportKind::Connect
            };
            Err(SendError::Endpoint(Outcome::Transport(kind), text))
        }
        Ok(Ok(resp)) => Ok(resp),
    })
}

/// Whether an upstream request failed for want of a local resource — ccgate's own file
/// descriptors (`EMFILE`, `ENFILE`), memory for sockets (`ENOBUFS`, `ENOMEM`) or ephemeral ports
/// (`EADDRNOTAVAIL`) — rather than anything the endpoint did. Every other endpoint would fail the
/// same way, and none of them is to blame.
fn local_exhaustion(e: &(dyn std::error::Error + 'static)) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    const EADDRNOTAVAIL: i32 = 99;
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(code) = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return cfg!(target_os = "linux")
                && matches!(code, EMFILE | ENFILE | ENOBUFS | ENOMEM | EADDRNOTAVAIL);
        }
        cur = c.source();
    }
    false
}

/// Reads a small (error) body with a size cap, for at most `wait` in all; what has not arrived by
/// then is left.
pub async fn read_small(mut body: AnswerBody, cap: usize, wait: Duration) -> Bytes {
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + wait;
    while buf.len() < cap {
        match tokio::time::timeout_at(deadline, body.frame()).await {
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

/// A non-streaming answer read before it is committed to.
pub enum Collected {
    /// The whole body, as the frames it arrived in (shared, not copied).
    Complete(Vec<Bytes>),
    /// The body is larger than the cap: the frames read so far and the rest, to relay as it comes.
    OverCap {
        /// Frames read so far.
        held: Vec<Bytes>,
        /// The rest of the body.
        body: AnswerBody,
    },
    /// The body broke off, or went silent: a transport failure of the attempt.
    Failed(Outcome, String),
}

/// Reads a body to its end, up to `cap` bytes, with `idle` as the longest silence between frames.
pub async fn read_to_end(mut body: AnswerBody, cap: usize, idle: Duration) -> Collected {
    let mut held = Vec::new();
    let mut len = 0usize;
    loop {
        if http_body::Body::is_end_stream(&body) {
            return Collected::Complete(held);
        }
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Collected::Failed(
                    Outcome::Transport(TransportKind::Idle),
                    format!(
                        "body silent for {} after {len} bytes",
                        humantime::format_duration(idle)
                    ),
                );
            }
            Ok(None) => return Collected::Complete(held),
            Ok(Some(Err(e))) => {
                return Collected::Failed(
                    Outcome::Transport(TransportKind::Cut),
                    format!("body broke after {len} bytes: {}", error_chain(&e)),
                );
            }
            Ok(Some(Ok(frame))) => {
                // Trailers are not part of the Anthropic API; they are dropped.
                if let Ok(data) = frame.into_data() {
                    len += data.len();
                    held.push(data);
                    if len > cap && !http_body::Body::is_end_stream(&body) {
                        return Collected::OverCap { held, body };
                    }
                }
            }
        }
    }
}

/// A whole JSON answer judged and read in one parse ([`usage::read_json_answer`]): an error when
/// `frames` do not hold one JSON value (and nothing else), else its `model` and `usage`. An
/// answer in several frames is joined into a scratch buffer for the parse only (the frames
/// relayed stay shared): measured, that costs less than parsing through a reader over the
/// frames, which reads byte by byte and is 25–100 times slower.
pub fn read_json_answer(
    frames: &[Bytes],
) -> Result<Option<usage::MessageUsage>, serde_json::Error> {
    match frames {
        [one] => usage::read_json_answer(one),
        many => usage::read_json_answer(&many.concat()),
    }
}

/// The size of a response header block as it came on the wire (about: names, values and the
/// `": "` and CRLF around each).
pub fn header_block_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

/// A stream held back until its first content event.
// Returned once per stream and taken apart at once, so the variants' sizes do not matter; boxing
// the large one would cost an allocation per stream.
#[allow(clippy::large_enum_variant)]
pub enum Preamble {
    /// Content arrived (or the stream completed): commit to this endpoint.
    Commit {
        /// Frames read so far, to send first.
        held: Vec<Bytes>,
        /// Scanner state after them.
        scanner: SseScanner,
        /// The rest of the stream.
        body: AnswerBody,
    },
    /// The stream failed before any content: fail over.
    Failed(Outcome, String),
}

/// Reads an SSE stream's preamble (`message_start`, `ping`, `content_block_start`) until the first
/// content event, so that an `error` event, a malformed event or a cut before any content can
/// still fail over transparently. The preamble held is capped in bytes and events: an upstream
/// that sends only pings (or anything else that is not content) fails over once past the cap,
/// and what was held is freed with it.
pub async fn await_content(mut body: AnswerBody, idle: Duration, limits: &RelayLimits) -> Preamble {
    let mut scanner = SseScanner::new();
    let mut held = Vec::new();
    let mut len = 0usize;
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
                len += data.len();
                held.push(data);
                let facts = scanner.facts();
                if let Some((ty, msg)) = &facts.error
                    && is_failover_error(ty)
                {
                    return Preamble::Failed(classify_sse_error(ty), format!("{ty}: {msg}"));
                }
                if let Some(what) = &facts.malformed {
                    return Preamble::Failed(
                        Outcome::ServerError,
                        format!("malformed stream before its first content: {what}"),
                    );
                }
                let over =
                    len > limits.max_preamble_bytes || facts.events > limits.max_preamble_events;
                if over && !(facts.content || facts.message_stop || facts.error.is_some()) {
                    return Preamble::Failed(
                        Outcome::ServerError,
                        format!(
                            "no content within {len} bytes and {} events of the stream",
                            facts.events
                        ),
                    );
                }
                if facts.content || facts.message_stop || facts.error.is_some() {
                    return Preamble::Commit {
                        held: one_chunk(held),
                        scanner,
                        body,
                    };
                }
            }
        }
    }
}

/// The held preamble and the frame that ended the hold, joined into one frame: they go to the
/// client as one chunk of one write, so it reads its first content with its first byte instead
/// of a frame later (bounded: the preamble is capped).
fn one_chunk(held: Vec<Bytes>) -> Vec<Bytes> {
    if held.len() < 2 {
        return held;
    }
    let mut one = bytes::BytesMut::with_capacity(held.iter().map(Bytes::len).sum());
    for frame in &held {
        one.extend_from_slice(frame);
    }
    vec![one.freeze()]
}

fn is_failover_error(error_type: &str) -> bool {
    classify_sse_error(error_type).is_endpoint_fault()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header map of these lines, in order.
    fn lines(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for &(n, v) in lines {
            h.append(
                HeaderName::from_static(n),
                http::HeaderValue::from_static(v),
            );
        }
        h
    }

    /// The headers left keep their order and repeated values; nothing else moves.
    #[test]
    fn removing_headers_keeps_the_order_of_the_rest() {
        let token = HeaderName::from_static("x-ccgate-token");
        let mut h = lines(&[
            ("accept", "*/*"),
            ("x-api-key", "tok"),
            ("anthropic-version", "2023-06-01"),
            ("x-ccgate-token", "tok"),
            ("anthropic-beta", "a"),
            ("anthropic-beta", "b"),
            ("user-agent", "cli"),
        ]);
        remove_in_order(&mut h, |n| *n == X_API_KEY || *n == token);
        let left: Vec<(&str, &str)> = h
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().expect("text")))
            .collect();
        assert_eq!(
            left,
            [
                ("accept", "*/*"),
                ("anthropic-version", "2023-06-01"),
                ("anthropic-beta", "a"),
                ("anthropic-beta", "b"),
                ("user-agent", "cli"),
            ]
        );
        let before = h.clone();
        remove_in_order(&mut h, |n| *n == X_API_KEY);
        assert_eq!(h, before);
    }

    /// An `anthropic-beta` of nothing but `oauth-*` flags goes, and the headers after it keep
    /// their order (review: its removal moved the last header into its place).
    #[test]
    fn oauth_only_beta_goes_without_reordering() {
        let mut h = lines(&[
            ("accept", "*/*"),
            ("anthropic-beta", "oauth-2025-04-20"),
            ("anthropic-version", "2023-06-01"),
            ("user-agent", "cli"),
        ]);
        strip_oauth_beta(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["accept", "anthropic-version", "user-agent"]);
    }

    #[test]
    fn hop_by_hop_names_are_told_by_their_text() {
        let hop_by_hop = [
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
        for name in &hop_by_hop {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for other in [
            "content-type",
            "x-api-key",
            "authorization",
            "connections",
            "t",
            "tes",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(other)), "{other}");
        }
    }

    #[test]
    fn json_is_judged_across_frames() {
        let body = br#"{"type":"message","content":[{"type":"text","text":"caf\u00e9 \"x\""}]}"#;
        for cut in 1..body.len() {
            let frames = [
                Bytes::copy_from_slice(&body[..cut]),
                Bytes::copy_from_slice(&body[cut..]),
            ];
            assert!(read_json_answer(&frames).is_ok(), "split at {cut}");
            assert!(read_json_answer(&frames[..1]).is_err(), "cut at {cut}");
        }
        assert!(read_json_answer(&[Bytes::from_static(body)]).is_ok());
        assert!(read_json_answer(&[]).is_err());
        assert!(read_json_answer(&[Bytes::from_static(b"{} {}")]).is_err());
    }

    #[test]
    fn messages_answers_must_match_the_request() {
        let json = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().expect("value"));
            h
        };
        let post = |path: &str, body: &[u8]| {
            Expects::of(
                &Method::POST,
                path,
                crate::wire::json_top::member(body, b"stream"),
            )
        };
        assert_eq!(
            post("/v1/messages", br#"{"stream":true}"#),
            Expects::EventStream
        );
        assert_eq!(post("/v1/messages", br#"{"stream":false}"#), Expects::Json);
        assert_eq!(
            post("/v1/messages/count_tokens", br#"{"stream":true}"#),
            Expects::Json
        );
        assert_eq!(post("/v1/models", b"{}"), Expects::Anything);
        assert_eq!(
            Expects::of(&Method::GET, "/v1/messages", None),
            Expects::Anything
        );
        assert!(
            Expects::Json
                .mismatch(&json("application/json; charset=utf-8"))
                .is_none()
        );
        assert!(Expects::Json.mismatch(&json("text/html")).is_some());
        assert!(
            Expects::EventStream
                .mismatch(&json("text/event-stream"))
                .is_none()
        );
        assert!(
            Expects::EventStream
                .mismatch(&json("application/json"))
                .is_some()
        );
        assert!(Expects::EventStream.mismatch(&HeaderMap::new()).is_some());
        let mut gz = json("text/event-stream");
        gz.insert(header::CONTENT_ENCODING, "gzip".parse().expect("value"));
        assert!(Expects::EventStream.mismatch(&gz).is_some());
        assert!(Expects::Anything.mismatch(&gz).is_none());
    }
}
