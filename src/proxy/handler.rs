//! The request handler: read the body once (capped), walk the candidates, attempt, fail over while
//! nothing has reached the client, and answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::health::attempt::Attempt;
use crate::health::classify::{self, Outcome, TransportKind, Verdict, classify_status, quota};
use crate::health::endpoint::Endpoint;
use crate::health::registry::{Admission, Registry};
use crate::health::totals::RequestNote;
use crate::health::totals::{RequestEnd, RequestGuard, RequestId};
use crate::proxy::events::{Events, FailedAttempt, Failover};
use crate::proxy::forward::{self, Collected, Expects, Preamble, Prepared};
use crate::proxy::gateway::Gateway;
use crate::proxy::relay::UsageSinks;
use crate::proxy::relay::{BoxError, Judge, RelayBody};
use crate::proxy::response::replace_with_own_error;
use crate::proxy::response::{self, GateBody};
use crate::proxy::scrub::{OneLine, scrub_body, scrub_headers};
use crate::select::affinity::{self, Affinity};
use crate::select::strategy::Tried;
use crate::transport::replay::Frames;
use crate::transport::upstream::{AnswerBody, MAX_REFUSALS};
use crate::wire::json_top;

// Response headers ccgate adds, named once rather than parsed from a string per request.
static REQUEST_ID: HeaderName = HeaderName::from_static("x-ccgate-request-id");
static ENDPOINT: HeaderName = HeaderName::from_static("x-ccgate-endpoint");
static ATTEMPTS: HeaderName = HeaderName::from_static("x-ccgate-attempts");
static FALLBACK: HeaderName = HeaderName::from_static("x-ccgate-fallback");

/// How long a failed attempt's error text is read before the failover goes on without the rest
/// of it.
const ERROR_TEXT_WAIT: Duration = Duration::from_secs(2);

/// Handles one proxied client request. Only admitted API paths reach this (see
/// [`crate::proxy::entry`]): the server answers the rest, and routes the admin prefix to the
/// control plane.
// An async block, not an async fn: an async fn keeps its arguments twice in its future (as
// captured and again as moved to locals), and every request allocates and copies that future.
#[allow(clippy::manual_async_fn)]
pub fn handle<B>(gw: Arc<Gateway>, mut req: Request<B>) -> impl Future<Output = Response<GateBody>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    async move {
        if !gw.take_token(req.headers_mut()) {
            return response::error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "ccgate: missing or wrong access token",
            );
        }
        let mut guard = gw.registry.gateway.begin();
        guard.record_to(
            Arc::clone(&gw.recent) as Arc<dyn crate::health::totals::RequestSink>,
            RequestNote {
                at: Some(SystemTime::now()),
                // The name, copied: `to_string` would go through the formatter.
                method: req.method().as_str().to_owned(),
                path: req.uri().path().to_string(),
                ..RequestNote::default()
            },
        );
        let id = guard.id().header_value();
        // Two awaits one after the other, not one inside the other: the request as read is not
        // kept beside the attempts' state.
        let mut resp = match read_request(&gw, req, &mut guard).await {
            Ok(prepared) => forward_request(&gw, prepared, guard).await,
            Err((end, refused)) => {
                guard.answered_locally(refused.status());
                guard.end(end);
                refused
            }
        };
        resp.headers_mut().insert(REQUEST_ID.clone(), id);
        resp
    }
}

/// Reads the body (capped) and prepares the request for forwarding, or answers a request that
/// cannot be forwarded, with how its request ended.
async fn read_request<B>(
    gw: &Gateway,
    req: Request<B>,
    guard: &mut RequestGuard,
) -> Result<Prepared, (RequestEnd, Response<GateBody>)>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let cap = gw.config.server.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        return Err((RequestEnd::Caller, too_large(cap)));
    }
    let body = match read_frames(Limited::new(body, cap)).await {
        Ok(frames) => Frames::from(frames),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err((RequestEnd::Caller, too_large(cap)));
            }
            // A client that leaves during its upload cancelled its request; a body that breaks
            // the framing (bad chunk sizes) is the caller's error.
            let end = if client_left(&*e) {
                RequestEnd::Cancelled
            } else {
                RequestEnd::Caller
            };
            return Err((
                end,
                response::error_for(
                    StatusCode::BAD_REQUEST,
                    "ccgate: could not read the request body",
                ),
            ));
        }
    };
    let headers = parts.headers;
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    // Read once, for the request's log line and record, its session's binding key and routing by
    // model (read only when one of them needs it). Where an endpoint routes or maps by model, the
    // read is the exact one (see `request_model`), so that all of them name the same model.
    let exact = gw.registry.reads_model;
    let model = (exact || guard.note_mut().is_some() || gw.affinity.is_some())
        .then(|| request_model(&body, exact))
        .flatten();
    if let Some(note) = guard.note_mut() {
        note.model =
            model
                .as_deref()
                .and_then(json_top::as_str)
                .map(|m| match m.char_indices().nth(200) {
                    // At most 200 characters are kept; a name that short is taken whole.
                    Some((cut, _)) => m[..cut].to_owned(),
                    None => m.into_owned(),
                });
    }
    let mut prepared = Prepared::new(parts.method, path_and_query, headers, body);
    prepared.model = model;
    Ok(prepared)
}

/// The body's data frames as they arrive, each kept as hyper handed it over (no copy).
async fn read_frames<B>(body: B) -> Result<Vec<Bytes>, B::Error>
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            frames.push(data);
        }
    }
    Ok(frames)
}

/// The raw `model` of a request body. `exact`: the last `model` member, the one a full parse
/// keeps when a body repeats the name, found by the walk from the end; routing by model and
/// `model_map` need that one. Otherwise, for the log line and the session's binding key alone,
/// the first member when it opens the body (Claude Code writes it first), read without a walk;
/// other clients (the SDKs write it late) get the walk. Ruling out a repeat without the walk would
/// take a search of the whole body (~1 instruction per byte, 100,000 per Claude Code request).
fn request_model(body: &Frames, exact: bool) -> Option<Bytes> {
    if exact {
        return body.last_member(b"model");
    }
    body.first_string_member(b"model")
        .or_else(|| body.last_member(b"model"))
}

/// Whether reading the request body failed because the client went away (the connection closed
/// or broke before the body's end), rather than because the body was malformed.
fn client_left(e: &(dyn std::error::Error + 'static)) -> bool {
    let Some(h) = e.downcast_ref::<hyper::Error>() else {
        return false;
    };
    if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
        return true;
    }
    let source = std::error::Error::source(h);
    // HTTP/2: the client reset its stream or sent a GOAWAY, or its connection broke. A reset
    // ccgate's own side sent (the client broke the protocol) is the client's error.
    if let Some(h2) = source.and_then(|s| s.downcast_ref::<h2::Error>()) {
        return h2.is_io() || h2.is_go_away() || (h2.is_reset() && h2.is_remote());
    }
    // A broken connection surfaces as an I/O error (`UnexpectedEof`, a reset); a framing error
    // as `InvalidInput` or `InvalidData`.
    source
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            )
        })
}

fn too_large(cap: usize) -> Response<GateBody> {
    response::error_for(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("ccgate: request body exceeds {cap} bytes"),
    )
}

/// One failed attempt, kept for the final answer.
struct Failure {
    endpoint: Arc<Endpoint>,
    outcome: Outcome,
    message: String,
}

/// The status a request's failover record shows when its client left before any answer
/// (nginx's convention: "client closed request").
const CLIENT_CLOSED: u16 = 499;

/// A request's failed attempts, kept for the final answer and reported once to the ring of recent
/// failovers: by the answer (`report`), or, when the client leaves before there is one (the
/// request's future is dropped mid-failover), by `Drop`, as cancelled and served by none. Counters
/// are not touched here: each attempt recorded itself when it ended.
struct Failures<'a> {
    events: &'a Events,
    id: RequestId,
    list: Vec<Failure>,
    // An atomic, not a `Cell`: the answer's `Commit` holds `&Failures` across awaits, and the
    // request's future must stay `Send`.
    reported: AtomicBool,
}

impl<'a> Failures<'a> {
    fn new(events: &'a Events, id: RequestId) -> Self {
        Self {
            events,
            id,
            list: Vec::new(),
            reported: AtomicBool::new(false),
        }
    }

    /// Keeps a request that needed failover (or found nothing) in the recent-failovers ring, once:
    /// a second report, and the report on drop after this one, do nothing.
    fn report(&self, served_by: Option<&Endpoint>, status: u16) {
        if self.reported.swap(true, Ordering::Relaxed) {
            return;
        }
        if self.list.is_empty() && served_by.is_some() {
            return;
        }
        self.events.push(Failover {
            at: crate::clock::rfc3339(SystemTime::now()),
            request_id: self.id.to_string(),
            failed: self
                .list
                .iter()
                .map(|f| FailedAttempt {
                    endpoint: f.endpoint.name.clone(),
                    outcome: f.outcome.kind().name(),
                    message: f.message.clone(),
                })
                .collect(),
            served_by: served_by.map(|e| e.name.clone()),
            status,
        });
    }
}

impl std::ops::Deref for Failures<'_> {
    type Target = [Failure];

    fn deref(&self) -> &[Failure] {
        &self.list
    }
}

impl Drop for Failures<'_> {
    fn drop(&mut self) {
        // Dropped unreported: the client left during failover. A request that left before any
        // attempt failed needed no failover and is not kept.
        if !self.list.is_empty() {
            self.report(None, CLIENT_CLOSED);
        }
    }
}

/// Ends a failed attempt: logs it as `log` (if given; the message is already scrubbed where it
/// needs to be), records it with its message for `last_error`, and keeps it for the final answer.
fn fail_attempt(
    failures: &mut Failures<'_>,
    attempt: Attempt,
    outcome: Outcome,
    message: String,
    log: Option<&'static str>,
) {
    let endpoint = Arc::clone(attempt.endpoint());
    if let Some(log) = log {
        let text = OneLine(&message);
        tracing::warn!(endpoint = %endpoint.name, kind = outcome.kind().name(), error = %text, "{log}");
    }
    attempt.finish(outcome, Some(message.clone()));
    failures.list.push(Failure {
        endpoint,
        outcome,
        message,
    });
}

// An async block, not an async fn: see `handle`.
#[allow(clippy::manual_async_fn)]
fn forward_request(
    gw: &Gateway,
    req: Prepared,
    mut guard: RequestGuard,
) -> impl Future<Output = Response<GateBody>> + '_ {
    async move {
        let reg = &gw.registry;
        let timeouts = gw.config.timeouts;
        let max_attempts = gw.config.server.max_attempts;
        // Endpoints that do not serve the request's model are not candidates at all.
        let skip = match not_serving(reg, &req) {
            Ok(skip) => skip,
            Err(model) => {
                guard.answered_locally(StatusCode::NOT_FOUND);
                guard.end(RequestEnd::Caller);
                return response::error(
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    &format!("ccgate: no endpoint serves the model `{model}`"),
                );
            }
        };
        // Endpoints that forward the client's own credential cannot serve a request that carries
        // none: they are not candidates for it (not a failure of theirs).
        let mut skip = skip;
        let mut needs_client_credential = false;
        if !req.has_client_credential() {
            for ep in reg.endpoints.iter().filter(|e| e.uses_client_credential()) {
                needs_client_credential |= !skip.contains(ep.idx) && !ep.live.admin_disabled();
                skip.insert(ep.idx);
            }
            if needs_client_credential
                && reg
                    .endpoints
                    .iter()
                    .all(|e| skip.contains(e.idx) || e.live.admin_disabled())
            {
                guard.answered_locally(StatusCode::UNAUTHORIZED);
                guard.end(RequestEnd::Caller);
                return response::error(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "ccgate: the endpoints for this request forward the client's own credential, and it sent none",
                );
            }
        }
        let mut rng = fastrand::Rng::new();
        let now_ms = reg.clock.now_ms();
        let mut ranking = gw
            .selector
            .rank_except(&reg.endpoints, skip, now_ms, &mut rng);
        gw.budget.deposit(now_ms);
        // A session goes first to the endpoint that served it last; if that endpoint is not
        // admitted now, admission skips it and whoever serves the session becomes its binding.
        let session = gw.affinity.as_ref().and_then(|a| {
            let session = affinity::session_key(&req.headers, req.metadata.as_deref())?;
            let model = req.model.as_deref().and_then(json_top::as_str);
            Some((a, affinity::binding_key(session, model.as_deref())))
        });
        // A session's endpoint near its rate limit stays ranked last: moving the session costs its
        // prompt cache once, a 429 later costs a failed attempt and a cooldown.
        // A binding made before its endpoint last left rotation (ejected, cooling down, switched
        // off) is lost, even if the session sent nothing meanwhile: the request is ranked as
        // unbound, and whoever serves it takes the session over from that endpoint.
        let (bound, lost_by) = match session.as_ref().and_then(|(a, key)| a.lookup(key)) {
            Some((b, leaves))
                if reg
                    .endpoints
                    .get(b)
                    .is_some_and(|e| e.live.leaves() == leaves) =>
            {
                (Some(b), None)
            }
            Some((b, _)) => (None, Some(b)),
            None => (None, None),
        };
        if let Some(bound) = bound.filter(|&b| {
            reg.endpoints
                .get(b)
                .is_none_or(|e| !e.live.near_quota_limit(now_ms))
        }) && let Some(pos) = ranking.iter().position(|&i| i == bound)
        {
            ranking[..=pos].rotate_right(1);
        }
        let mut candidates = ranking.into_iter();
        let mut tried = Tried::default();
        let mut failures = Failures::new(&gw.events, guard.id());
        let mut fallback = false;

        while (tried.len() as usize) < max_attempts {
            let Some((ep, holds_probation)) = next_candidate(reg, &mut candidates, tried, skip)
                .or_else(|| {
                    // Nothing admitted and nothing tried yet: rather than fail blind, try the endpoint
                    // expected back soonest.
                    if tried.is_empty() && !fallback {
                        fallback = true;
                        reg.least_bad(|e| !skip.contains(e.idx)).map(|e| (e, false))
                    } else {
                        None
                    }
                })
            else {
                break;
            };
            if !tried.is_empty() {
                if !gw.budget.try_withdraw() {
                    if holds_probation {
                        ep.live.release_probation();
                    }
                    reg.gateway
                        .budget_refusals
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(endpoint = %ep.name, "retry budget spent; not failing over");
                    break;
                }
                reg.gateway
                    .retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tried.insert(ep.idx);
            if fallback {
                reg.gateway
                    .fallbacks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(endpoint = %ep.name, "no endpoint admitted; trying the least-bad one");
            }
            // A session bound by this attempt's answer is bound as of now: if the endpoint leaves
            // rotation while the attempt runs, the binding is already lost. (Read only when
            // there is a session to bind.)
            let leaves = if session.is_some() {
                ep.live.leaves()
            } else {
                0
            };
            let attempt =
                Attempt::begin(Arc::clone(&ep), Arc::clone(&reg.recorder), holds_probation);
            guard.trying(&ep, tried.len());
            let upstream_req = match req.for_endpoint(&ep) {
                Ok(r) => r,
                Err(m) => {
                    let connect = Outcome::Transport(TransportKind::Connect);
                    fail_attempt(&mut failures, attempt, connect, m, None);
                    continue;
                }
            };
            let mut sent = forward::send(&ep, upstream_req, timeouts.first_byte).await;
            // A request the endpoint refused unprocessed (an HTTP/2 stream past a graceful
            // GOAWAY) goes out again, on another connection, in the same attempt.
            for _ in 0..MAX_REFUSALS {
                let Err(forward::SendError::Refused(_)) = &sent else {
                    break;
                };
                let Ok(again) = req.for_endpoint(&ep) else {
                    break;
                };
                sent = forward::send(&ep, again, timeouts.first_byte).await;
            }
            let resp = match sent {
                Ok(r) => r,
                Err(forward::SendError::Local(message)) => {
                    // No endpoint is to blame and none would fare better: the attempt counts as not
                    // the endpoint's (cancelled) and the client is told to come back.
                    tracing::error!(endpoint = %ep.name, error = %OneLine(&message), "attempt not sent");
                    attempt.finish(Outcome::Cancelled, None);
                    // Kept in the ring only when attempts before it failed over: a request that
                    // found no resources found no failover either.
                    if !failures.is_empty() {
                        failures.report(None, StatusCode::SERVICE_UNAVAILABLE.as_u16());
                    }
                    guard.answered_locally(StatusCode::SERVICE_UNAVAILABLE);
                    guard.end(RequestEnd::Upstream);
                    return response::error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded_error",
                        "ccgate is out of local resources (file descriptors, sockets or ports); try again",
                    );
                }
                Err(forward::SendError::Endpoint(outcome, message)) => {
                    let log = Some("attempt failed");
                    fail_attempt(&mut failures, attempt, outcome, message, log);
                    continue;
                }
                Err(forward::SendError::Refused(message)) => {
                    let outcome = Outcome::Transport(TransportKind::Connect);
                    let log = Some("attempt failed");
                    fail_attempt(&mut failures, attempt, outcome, message, log);
                    continue;
                }
            };
            attempt.first_byte();
            // Every answer, whatever its status, may say how close the endpoint is to its limit.
            let health = &gw.config.health;
            if let Some(q) = quota(resp.headers(), SystemTime::now(), health.quota_threshold) {
                let fallback = health.rate_limit_cooldown;
                ep.live.observe_quota(&q, reg.clock.now_ms(), fallback);
            }
            let limits = gw.config.relay;
            let header_len = forward::header_block_len(resp.headers());
            if header_len > limits.max_response_header_bytes {
                let message = format!(
                    "response headers of {header_len} bytes exceed {}",
                    limits.max_response_header_bytes
                );
                let log = Some("attempt failed");
                fail_attempt(&mut failures, attempt, Outcome::ServerError, message, log);
                continue;
            }
            let mut verdict = classify_status(resp.status(), resp.headers(), SystemTime::now);
            if ep.uses_client_credential() {
                verdict = classify::with_client_credential(verdict);
            }
            let (mut parts, body) = resp.into_parts();
            let commit = Commit {
                gw,
                failures: &failures,
                session: session.as_ref(),
                bound: bound.or(lost_by),
                ep: &ep,
                leaves,
                attempts: tried.len(),
                fallback,
                req: &req,
            };
            // Bodiless answers are complete with their headers.
            let bodiless = req.method == Method::HEAD
                || parts.status == StatusCode::NO_CONTENT
                || parts.status == StatusCode::NOT_MODIFIED;
            match verdict {
                Verdict::Relay => {
                    if let Some(problem) = req.expects.mismatch(&parts.headers) {
                        let log = Some("answer is not what was asked for");
                        fail_attempt(&mut failures, attempt, Outcome::ServerError, problem, log);
                        continue;
                    }
                    let stream = is_event_stream(&parts.headers);
                    // A bodiless answer, and a stream that is not a Messages stream (another
                    // path's events, which need not follow the Messages grammar, or an encoded
                    // one: Messages streams were asked for identity and checked above), are
                    // relayed byte for byte and judged like a plain body.
                    if bodiless
                        || (stream
                            && (req.expects != Expects::EventStream || is_encoded(&parts.headers)))
                    {
                        return commit.relay(
                            guard,
                            attempt,
                            parts,
                            Some(body),
                            Vec::new(),
                            Judge::Plain,
                        );
                    }
                    if stream {
                        match forward::await_content(body, timeouts.idle, &limits).await {
                            Preamble::Commit {
                                held,
                                scanner,
                                body,
                            } => {
                                let judge = Judge::Stream(scanner);
                                return commit.relay(
                                    guard,
                                    attempt,
                                    parts,
                                    Some(body),
                                    held,
                                    judge,
                                );
                            }
                            Preamble::Failed(outcome, message) => {
                                let message = req.scrub(&ep.scrub(&message));
                                let log = Some("stream failed before content");
                                fail_attempt(&mut failures, attempt, outcome, message, log);
                                continue;
                            }
                        }
                    }
                    // A non-streaming answer is read whole before anything goes to the client, so a
                    // body that breaks off, stalls or is not JSON can still fail over.
                    match forward::read_to_end(body, limits.max_json_bytes, timeouts.idle).await {
                        Collected::Complete(frames) => {
                            let judge = if req.expects == Expects::Json {
                                // One parse judges the answer and reads what it cost.
                                let Ok(found) = forward::read_json_answer(&frames) else {
                                    let message =
                                        "answered 2xx with a body that is not valid JSON".into();
                                    let log = Some("attempt failed");
                                    let outcome = Outcome::ServerError;
                                    fail_attempt(&mut failures, attempt, outcome, message, log);
                                    continue;
                                };
                                Judge::Answer(found)
                            } else {
                                Judge::Plain
                            };
                            return commit.relay(guard, attempt, parts, None, frames, judge);
                        }
                        Collected::OverCap { held, body } => {
                            let judge = Judge::Plain;
                            return commit.relay(guard, attempt, parts, Some(body), held, judge);
                        }
                        Collected::Failed(outcome, message) => {
                            let log = Some("attempt failed");
                            fail_attempt(&mut failures, attempt, outcome, message, log);
                        }
                    }
                }
                Verdict::RelayCallerError => {
                    // The caller's error goes back as the upstream said it, less any secret it echoes.
                    scrub_headers(reg, &mut parts.headers);
                    if bodiless {
                        let judge = Judge::CallerError;
                        return commit.relay(guard, attempt, parts, Some(body), Vec::new(), judge);
                    }
                    match forward::read_to_end(body, limits.max_json_bytes, timeouts.idle).await {
                        Collected::Complete(frames) => {
                            let frames = if is_encoded(&parts.headers) {
                                // Cannot be read (identity was asked for, the upstream did not care).
                                frames
                            } else {
                                scrub_body(reg, frames, &mut parts.headers)
                            };
                            let judge = Judge::CallerError;
                            return commit.relay(guard, attempt, parts, None, frames, judge);
                        }
                        Collected::OverCap { .. } => {
                            // Too large to scrub: the client gets the status and a short error instead.
                            let message = format!(
                                "ccgate: the upstream's error answer exceeds {} bytes",
                                limits.max_json_bytes
                            );
                            let own_body = vec![replace_with_own_error(&mut parts, &message)];
                            let judge = Judge::CallerError;
                            return commit.relay(guard, attempt, parts, None, own_body, judge);
                        }
                        Collected::Failed(outcome, message) => {
                            let log = Some("attempt failed");
                            fail_attempt(&mut failures, attempt, outcome, message, log);
                        }
                    }
                }
                Verdict::FailOver(outcome) => {
                    // The status has decided: the body only feeds the message, and a body that
                    // stalls or trickles must not hold the failover.
                    let wait = timeouts.idle.min(ERROR_TEXT_WAIT);
                    let text = forward::read_small(body, 16 * 1024, wait).await;
                    let message = crate::wire::anthropic::error_message(&text)
                        .unwrap_or_else(|| format!("HTTP {}", parts.status.as_u16()));
                    let message = req.scrub(&ep.scrub(&message));
                    let message = format!("HTTP {}: {message}", parts.status.as_u16());
                    let log = Some("attempt failed");
                    fail_attempt(&mut failures, attempt, outcome, message, log);
                }
            }
        }
        let mut resp = all_down(reg, &failures, skip);
        resp.headers_mut()
            .insert(ATTEMPTS.clone(), attempts_value(tried.len()));
        if fallback {
            resp.headers_mut()
                .insert(FALLBACK.clone(), HeaderValue::from_static("least-bad"));
        }
        // The log line names the last endpoint tried with the status the client got (none when
        // nothing could be tried).
        match failures.last() {
            Some(last) => guard.served_by(&last.endpoint, tried.len(), resp.status().as_u16()),
            None => guard.answered_locally(resp.status()),
        }
        failures.report(None, resp.status().as_u16());
        guard.end(RequestEnd::Upstream);
        resp
    }
}

/// The endpoints that do not serve the request's model (as a set to skip), or the model when no
/// endpoint serves it (the request is wrong: 404). Endpoints that serve it but are switched off
/// are not the request's fault: it goes on, and finds nothing available (503). Only endpoints
/// with a `models` list restrict anything, and the body is only read for its model when one has.
fn not_serving(reg: &Registry, req: &Prepared) -> Result<Tried, String> {
    let mut skip = Tried::default();
    if reg.endpoints.iter().all(|e| e.models.is_none()) {
        return Ok(skip);
    }
    // The exact read (the last `model` member, as a full parse keeps it): see `request_model`.
    let Some(model) = req.model.as_deref().and_then(json_top::as_str) else {
        return Ok(skip);
    };
    for ep in &reg.endpoints {
        if ep.models.as_ref().is_some_and(|m| !m.serves(&model)) {
            skip.insert(ep.idx);
        }
    }
    if reg.endpoints.iter().all(|e| skip.contains(e.idx)) {
        return Err(model.into_owned());
    }
    Ok(skip)
}

/// What committing to an endpoint's answer needs besides the answer itself.
struct Commit<'a> {
    gw: &'a Gateway,
    failures: &'a Failures<'a>,
    session: Option<&'a (&'a Arc<Affinity>, String)>,
    /// The endpoint the session was bound to when the request was ranked, or that lost it by
    /// leaving rotation.
    bound: Option<usize>,
    ep: &'a Arc<Endpoint>,
    /// `ep`'s leave count when the attempt began.
    leaves: u64,
    attempts: u32,
    fallback: bool,
    req: &'a Prepared,
}

impl Commit<'_> {
    /// Relays `ep`'s answer: the request's log line names `ep`; unless the answer is the caller's
    /// error, the failovers that led here go to the ring, the body's usage (a stream's, or a JSON
    /// body's) is counted and the session binds to `ep`.
    fn relay(
        self,
        mut guard: RequestGuard,
        attempt: Attempt,
        mut parts: http::response::Parts,
        body: Option<AnswerBody>,
        held: Vec<Bytes>,
        judge: Judge,
    ) -> Response<GateBody> {
        let Self {
            gw,
            failures,
            session,
            bound,
            ep,
            leaves,
            attempts,
            fallback,
            req,
        } = self;
        guard.served_by(ep, attempts, parts.status.as_u16());
        guard.note_first_byte();
        let stream = matches!(judge, Judge::Stream(_));
        if stream {
            // A stream that ends without `message_stop` gets an `error` event appended: the
            // upstream's length would cut it off (HTTP/1.1) or break the stream (HTTP/2).
            parts.headers.remove(http::header::CONTENT_LENGTH);
        }
        let read_usage = match &judge {
            Judge::Stream(_) => true,
            Judge::Plain | Judge::Answer(_) => {
                is_json(&parts.headers) && !is_encoded(&parts.headers)
            }
            Judge::CallerError => false,
        };
        // A request that needed failover is kept in the ring whatever the answer (a caller's
        // error after an overloaded endpoint, say); only an answer that is not the caller's
        // error binds its session.
        failures.report(Some(ep), parts.status.as_u16());
        if !matches!(judge, Judge::CallerError)
            && let Some((a, key)) = session
        {
            a.bind(key, ep.idx, leaves, bound);
        }
        // Built in its box and set up in place: the relay is large, and each move is a copy.
        let mut relay = Box::new(RelayBody::new(
            body,
            held,
            judge,
            gw.config.timeouts.idle,
            attempt,
            guard,
        ));
        relay
            .with_usage(read_usage.then(|| UsageSinks {
                tally: gw.usage.clone(),
                live: Arc::clone(&gw.live_usage),
            }))
            .scrubbing(stream.then(|| Arc::clone(&gw.registry)))
            .scrubbing_client(req.client_credential())
            .stopped_by(stream.then_some(&gw.streams));
        relay_response(parts, relay, ep, attempts, fallback, &req.method)
    }
}

/// The next admitted candidate not yet tried.
fn next_candidate(
    reg: &Registry,
    candidates: &mut impl Iterator<Item = usize>,
    tried: Tried,
    skip: Tried,
) -> Option<(Arc<Endpoint>, bool)> {
    for idx in candidates.by_ref() {
        if tried.contains(idx) || skip.contains(idx) {
            continue;
        }
        let ep = &reg.endpoints[idx];
        match reg.admit(ep) {
            Admission::Yes => return Some((Arc::clone(ep), false)),
            Admission::Probation => return Some((Arc::clone(ep), true)),
            Admission::No => {}
        }
    }
    None
}

/// A JSON answer, whose `usage` the ledger reads.
fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"))
}

fn is_event_stream(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// A compressed stream is relayed byte for byte; ccgate cannot read its events, so it is judged
/// like a plain body (success when it ends cleanly).
fn is_encoded(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.eq_ignore_ascii_case("identity"))
}

/// `x-ccgate-attempts`: the common small counts without an allocation.
fn attempts_value(attempts: u32) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(attempts as usize) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(attempts),
    }
}

fn relay_response(
    mut parts: http::response::Parts,
    relay: Box<RelayBody>,
    ep: &Endpoint,
    attempts: u32,
    fallback: bool,
    method: &Method,
) -> Response<GateBody> {
    forward::strip_hop_by_hop(&mut parts.headers);
    if let Some(v) = &ep.name_header {
        parts.headers.insert(ENDPOINT.clone(), v.clone());
    }
    parts
        .headers
        .insert(ATTEMPTS.clone(), attempts_value(attempts));
    if fallback {
        parts
            .headers
            .insert(FALLBACK.clone(), HeaderValue::from_static("least-bad"));
    }
    tracing::debug!(endpoint = %ep.name, status = parts.status.as_u16(), attempts, "relaying");
    // Bodiless answers are complete with their headers; hyper will not poll their body.
    if *method == Method::HEAD
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
    {
        relay.complete_without_body();
        return Response::from_parts(parts, GateBody::empty());
    }
    Response::from_parts(parts, GateBody::Relay(relay))
}

/// The answer when no candidate produced one. The status tells clients how to behave: 503 (they
/// keep retrying, honouring `retry-after`) when nothing was available or everything was
/// overloaded or rate limited; 504 when attempts timed out; 502 for other upstream breakage.
/// Never a bare 529, which Claude Code gives up on after three.
fn all_down(reg: &Registry, failures: &[Failure], skip: Tried) -> Response<GateBody> {
    let busy = |o: Outcome| matches!(o, Outcome::Overloaded | Outcome::RateLimited(_));
    let status = if failures.is_empty() || failures.iter().all(|f| busy(f.outcome)) {
        StatusCode::SERVICE_UNAVAILABLE
    } else if failures
        .iter()
        .any(|f| f.outcome.kind() == crate::health::classify::Kind::Timeout)
    {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let message = if failures.is_empty() {
        "ccgate: no endpoint is available".to_string()
    } else {
        let parts: Vec<String> = failures
            .iter()
            .map(|f| format!("{}: {}", f.endpoint.name, f.message))
            .collect();
        format!("ccgate: every endpoint tried failed ({})", parts.join("; "))
    };
    // Only the endpoints that could serve this request say when to come back.
    let retry_after = reg.retry_after_secs(|e| !skip.contains(e.idx));
    tracing::warn!(
        status = status.as_u16(),
        attempts = failures.len(),
        retry_after,
        "all endpoints failed"
    );
    let mut resp = response::error_for(status, &message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    resp.headers_mut()
        .insert("x-should-retry", HeaderValue::from_static("true"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_header_is_the_count() {
        for n in [0, 1, 2, 9, 10, 11, 123, u32::MAX] {
            assert_eq!(attempts_value(n), n.to_string().as_str(), "{n}");
        }
    }
}
