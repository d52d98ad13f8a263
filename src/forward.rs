//! One upstream attempt: build the request for an endpoint, send it under the first-byte timeout,
//! hold back a stream's preamble until its first content, and relay the body event by event
//! through [`RelayBody`], which decides and records the attempt's outcome when the body ends.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::classify::{Outcome, TransportKind, classify_sse_error};
use crate::endpoint::{Attempt, Endpoint};
use crate::gateway_stats::RequestGuard;
use crate::sse::{SseScanner, error_event};
use crate::usage::{self, UsageTally};

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
        let body = crate::model_map::apply(&ep.model_map, &self.body);
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

/// An error and its sources, joined, for logs and `last_error`. Errors from hyper and rustls name
/// hosts and causes, never headers, so no credential can appear here.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
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

/// The `error.type` and `error.message` of an Anthropic error body, shortened, for `last_error`.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let (ty, message) = crate::response::read_error(v.get("error")?);
    Some(format!("{}: {message}", ty.unwrap_or("error")))
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

/// How a relayed body is judged when it ends.
pub enum Judge {
    /// An SSE stream, read by its scanner (in the state the held preamble left it): success needs
    /// `message_stop`; an `error` event decides otherwise.
    Stream(SseScanner),
    /// Any other 2xx body: success when it ends cleanly.
    Plain,
    /// An answer already judged the caller's error: that verdict, when it ends.
    CallerError,
}

/// The response body relayed to the client. It owns the attempt and the request guards, so the
/// attempt's outcome is recorded when the body ends — or, if the client goes away, when it is
/// dropped. Frames pass through as they arrive, none held back after the preamble; a plain body
/// whose usage is read is also kept (shared `Bytes`, up to [`usage::MAX_JSON_BODY`]) until it
/// ends.
pub struct RelayBody {
    held: VecDeque<Bytes>,
    upstream: Option<Incoming>,
    judge: Judge,
    idle: Duration,
    /// The idle timer, armed only when the upstream first keeps the body waiting: a body that is
    /// ready as soon as it is polled (most plain answers) never reads the clock or touches the
    /// timer wheel.
    sleep: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the idle timer was last armed.
    fresh: bool,
    attempt: Option<Attempt>,
    request: Option<RequestGuard>,
    /// An SSE error event to send after an upstream failure, then end.
    trailer: Option<Bytes>,
    /// Where a successful answer's token usage goes (see [`RelayBody::with_usage`]).
    usage: Option<UsageTap>,
}

/// A relayed answer's way into the usage tally: streams report usage through their scanner; a
/// plain body is kept (as the frames' shared `Bytes`, not copied) up to
/// [`usage::MAX_JSON_BODY`] and read when it ends.
struct UsageTap {
    tally: Arc<UsageTally>,
    frames: Vec<Bytes>,
    len: usize,
    too_large: bool,
}

impl UsageTap {
    fn keep(&mut self, data: &Bytes) {
        if self.too_large {
            return;
        }
        self.len += data.len();
        if self.len > usage::MAX_JSON_BODY {
            self.too_large = true;
            self.frames = Vec::new();
        } else {
            self.frames.push(data.clone());
        }
    }
}

impl RelayBody {
    /// Wraps an upstream body.
    pub fn new(
        upstream: Incoming,
        held: Vec<Bytes>,
        judge: Judge,
        idle: Duration,
        attempt: Attempt,
        request: RequestGuard,
    ) -> Self {
        Self {
            held: held.into(),
            upstream: Some(upstream),
            judge,
            idle,
            sleep: None,
            fresh: false,
            attempt: Some(attempt),
            request: Some(request),
            trailer: None,
            usage: None,
        }
    }

    /// Adds the answer's token usage to `tally` when it ends successfully: for a stream from its
    /// `message_start` / `message_delta` events, for a plain JSON body from its top-level `usage`.
    /// Only a success is counted, so never a caller error. Only in-memory work happens on this
    /// path.
    pub fn with_usage(mut self, tally: Option<Arc<UsageTally>>) -> Self {
        self.usage = tally.map(|tally| UsageTap {
            tally,
            frames: Vec::new(),
            len: 0,
            too_large: false,
        });
        self
    }

    /// Hands a successful answer's usage to the tally.
    fn record_usage(&mut self) {
        let Some(tap) = self.usage.take() else {
            return;
        };
        let Some(ep) = self.attempt.as_ref().map(|a| a.endpoint()) else {
            return;
        };
        let found = match (&self.judge, tap.too_large) {
            (Judge::Stream(sc), _) => sc.usage().cloned(),
            (_, true) => None,
            (_, false) => match tap.frames.as_slice() {
                [] => None,
                [one] => usage::from_json_body(one),
                many => usage::from_json_body(&many.concat()),
            },
        };
        if let Some(u) = found {
            tap.tally.add(&ep.name, u);
        }
    }

    fn finish(&mut self, outcome: Outcome, detail: Option<String>) {
        self.upstream = None;
        if outcome == Outcome::Success {
            self.record_usage();
        }
        self.usage = None;
        if let Some(a) = self.attempt.take() {
            a.finish(outcome, detail);
        }
        if let Some(r) = self.request.take() {
            r.finish(outcome);
        }
    }

    /// Ends the relay after an upstream failure: the outcome is recorded and, for a stream, an SSE
    /// `error` event tells the client what happened instead of a silent cut.
    fn fail(
        &mut self,
        outcome: Outcome,
        detail: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let stream = matches!(self.judge, Judge::Stream(_));
        self.finish(outcome, Some(detail.clone()));
        if stream {
            let ty = if outcome == Outcome::Overloaded {
                "overloaded_error"
            } else {
                "api_error"
            };
            return Poll::Ready(Some(Ok(Frame::data(error_event(
                ty,
                &format!("upstream stream failed: {detail}"),
            )))));
        }
        Poll::Ready(Some(Err(detail.into())))
    }

    /// Records the outcome of an answer that has no body (HEAD, 204, 304).
    pub fn complete_without_body(mut self) {
        let outcome = if matches!(self.judge, Judge::CallerError) {
            Outcome::CallerError
        } else {
            Outcome::Success
        };
        self.finish(outcome, None);
    }

    /// Records the outcome of an upstream body that has ended. A stream that ended without
    /// `message_stop` (and without an `error` event of its own) is a failure after the first byte:
    /// like every other, it ends the client's stream with an SSE `error` event (queued as the
    /// trailer), so the client cannot take a truncated answer for a complete one.
    fn end(&mut self) {
        let (outcome, detail) = self.end_outcome();
        if matches!(self.judge, Judge::Stream(_))
            && outcome == Outcome::Transport(TransportKind::Cut)
        {
            let message = detail
                .as_deref()
                .unwrap_or("stream ended before message_stop");
            self.trailer = Some(error_event(
                "api_error",
                &format!("upstream stream failed: {message}"),
            ));
        }
        self.finish(outcome, detail);
    }

    fn end_outcome(&self) -> (Outcome, Option<String>) {
        match &self.judge {
            Judge::CallerError => (Outcome::CallerError, None),
            Judge::Stream(sc) => {
                let f = sc.facts();
                match &f.error {
                    Some((ty, msg)) => (classify_sse_error(ty), Some(format!("{ty}: {msg}"))),
                    None if f.message_stop => (Outcome::Success, None),
                    None => (
                        Outcome::Transport(TransportKind::Cut),
                        Some("stream ended before message_stop".into()),
                    ),
                }
            }
            Judge::Plain => (Outcome::Success, None),
        }
    }
}

/// Error type of client-facing bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(b) = this.held.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(upstream) = this.upstream.as_mut() else {
            return Poll::Ready(this.trailer.take().map(|b| Ok(Frame::data(b))));
        };
        match Pin::new(upstream).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.fresh = true;
                match frame.into_data() {
                    Ok(data) => {
                        if let Judge::Stream(sc) = &mut this.judge {
                            sc.feed(&data);
                        } else if let Some(tap) = this.usage.as_mut() {
                            tap.keep(&data);
                        }
                        // hyper drops a body once its declared length is written, without polling
                        // for the end: record the attempt as soon as the upstream body is complete.
                        if this.upstream.as_ref().is_some_and(Body::is_end_stream) {
                            this.end();
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    // Trailers are not part of the Anthropic API; drop them and keep reading.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => this.fail(
                Outcome::Transport(TransportKind::Cut),
                format!("upstream body broke: {}", error_chain(&e)),
            ),
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(this.trailer.take().map(|b| Ok(Frame::data(b))))
            }
            Poll::Pending => {
                // The upstream went quiet: from the first wait after its last frame, it has
                // `idle` to send the next.
                let sleep = match &mut this.sleep {
                    Some(sleep) if !this.fresh => sleep,
                    Some(sleep) => {
                        sleep.as_mut().reset(Instant::now() + this.idle);
                        sleep
                    }
                    None => this.sleep.insert(Box::pin(tokio::time::sleep(this.idle))),
                };
                this.fresh = false;
                ready!(sleep.as_mut().poll(cx));
                let idle = humantime::format_duration(this.idle).to_string();
                this.fail(
                    Outcome::Transport(TransportKind::Idle),
                    format!("upstream silent for {idle}"),
                )
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.upstream.is_none() && self.held.is_empty() && self.trailer.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.upstream, self.held.is_empty()) {
            (Some(u), true) => u.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        // The client went away before the body ended. A stream that already carried its
        // `message_stop` was delivered in full; anything else was cancelled.
        if self.attempt.is_some() {
            let delivered = matches!(&self.judge,
                Judge::Stream(s) if s.facts().message_stop && s.facts().error.is_none());
            if delivered {
                self.finish(Outcome::Success, None);
            } else {
                self.upstream = None;
                self.attempt.take();
                if let Some(r) = self.request.take() {
                    r.finish(Outcome::Cancelled);
                }
            }
        }
    }
}
