//! The request handler: read the body once (capped), walk the candidates, attempt, fail over while
//! nothing has reached the client, and answer.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::affinity::{self, Affinity};
use crate::budget::RetryBudget;
use crate::classify::{Outcome, TransportKind, Verdict, classify_status};
use crate::config::Config;
use crate::endpoint::{Attempt, Endpoint};
use crate::forward::{self, BoxError, Judge, Preamble, Prepared, RelayBody};
use crate::gateway_stats::{RequestEnd, RequestGuard};
use crate::registry::{Admission, Registry};
use crate::response::{self, GateBody};
use crate::select::{Selector, Tried};

/// The reserved path prefix of ccgate's own views; never forwarded.
pub const ADMIN_PREFIX: &str = "/_ccgate";

/// Everything the request handler needs, shared by all connections.
pub struct Gateway {
    /// Endpoints and their state.
    pub registry: Arc<Registry>,
    /// Candidate ranking.
    pub selector: Selector,
    /// Session → endpoint bindings (`None` when affinity is off).
    pub affinity: Option<Affinity>,
    /// Limits attempts after the first.
    pub budget: RetryBudget,
    /// The configuration the gateway runs with.
    pub config: Config,
}

impl Gateway {
    /// Builds the gateway state from a validated config.
    pub fn new(config: Config) -> Result<Self, crate::upstream::ClientError> {
        let registry = Arc::new(Registry::new(&config)?);
        let clock = registry.clock;
        Ok(Self {
            registry,
            selector: Selector::new(config.server.strategy),
            affinity: config
                .affinity
                .enabled
                .then(|| Affinity::new(&config.affinity, clock)),
            budget: RetryBudget::new(&config.retry_budget, clock),
            config,
        })
    }

    /// Whether the request carries the access token (always true when none is configured).
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.config.server.access_token else {
            return true;
        };
        let presented = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            });
        presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.expose().as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Handles one client request (proxied paths and the admin prefix).
pub async fn handle<B>(gw: Arc<Gateway>, req: Request<B>) -> Response<GateBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let path = req.uri().path();
    if path == ADMIN_PREFIX || path.starts_with("/_ccgate/") {
        return crate::admin::handle(gw, req).await;
    }
    // Claude Code pre-connects with a credential-less `HEAD /`; answer it here, uncounted.
    if req.method() == Method::HEAD && path == "/" {
        return Response::new(GateBody::empty());
    }
    if !gw.authorized(req.headers()) {
        return response::error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "ccgate: missing or wrong access token",
        );
    }
    let guard = gw.registry.gateway.begin();
    let (parts, body) = req.into_parts();
    let cap = gw.config.server.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        guard.end(RequestEnd::Caller);
        return too_large(cap);
    }
    let body = match Limited::new(body, cap).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            guard.end(RequestEnd::Caller);
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return too_large(cap);
            }
            return response::error_for(
                StatusCode::BAD_REQUEST,
                "ccgate: could not read the request body",
            );
        }
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let prepared = Prepared::new(parts.method, path_and_query, parts.headers, body);
    forward_request(&gw, prepared, guard).await
}

fn too_large(cap: usize) -> Response<GateBody> {
    response::error_for(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("ccgate: request body exceeds {cap} bytes"),
    )
}

/// One failed attempt, kept for the final answer.
struct Failure {
    endpoint: String,
    outcome: Outcome,
    message: String,
}

async fn forward_request(gw: &Gateway, req: Prepared, guard: RequestGuard) -> Response<GateBody> {
    let reg = &gw.registry;
    let timeouts = gw.config.timeouts;
    let max_attempts = gw.config.server.max_attempts;
    let mut rng = fastrand::Rng::new();
    let mut ranking = gw
        .selector
        .rank(&reg.endpoints, reg.clock.now_ms(), &mut rng);
    gw.budget.deposit();
    // A session goes first to the endpoint that served it last; if that endpoint is not
    // admitted now, admission skips it and whoever serves the session becomes its binding.
    let session = gw
        .affinity
        .as_ref()
        .and_then(|a| Some((a, affinity::session_key(&req.headers, &req.body)?)));
    if let Some(bound) = session.as_ref().and_then(|(a, key)| a.lookup(key)) {
        if let Some(pos) = ranking.iter().position(|&i| i == bound) {
            ranking[..=pos].rotate_right(1);
        }
    }
    let mut candidates = ranking.into_iter();
    let mut tried = Tried::default();
    let mut failures: Vec<Failure> = Vec::new();
    let mut fallback = false;

    while (tried.len() as usize) < max_attempts {
        let Some((ep, holds_probation)) =
            next_candidate(reg, &mut candidates, tried).or_else(|| {
                // Nothing admitted and nothing tried yet: rather than fail blind, try the endpoint
                // expected back soonest.
                if tried.is_empty() && !fallback {
                    fallback = true;
                    reg.least_bad().map(|e| (e, false))
                } else {
                    None
                }
            })
        else {
            break;
        };
        if tried.contains(ep.idx) {
            continue;
        }
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
        let attempt = Attempt::begin(Arc::clone(&ep), Arc::clone(&reg.recorder), holds_probation);
        let upstream_req = match req.for_endpoint(&ep) {
            Ok(r) => r,
            Err(m) => {
                attempt.finish(Outcome::Transport(TransportKind::Connect), Some(m.clone()));
                failures.push(Failure {
                    endpoint: ep.name.clone(),
                    outcome: Outcome::Transport(TransportKind::Connect),
                    message: m,
                });
                continue;
            }
        };
        let resp = match forward::send(&ep, upstream_req, timeouts.first_byte).await {
            Ok(r) => r,
            Err((outcome, message)) => {
                tracing::warn!(endpoint = %ep.name, kind = outcome.kind().name(), %message, "attempt failed");
                attempt.finish(outcome, Some(message.clone()));
                failures.push(Failure {
                    endpoint: ep.name.clone(),
                    outcome,
                    message,
                });
                continue;
            }
        };
        attempt.first_byte();
        let verdict = classify_status(resp.status(), resp.headers(), SystemTime::now());
        let (parts, body) = resp.into_parts();
        let attempts = tried.len();
        match verdict {
            Verdict::Relay if is_event_stream(&parts.headers) && !is_encoded(&parts.headers) => {
                match forward::await_content(body, timeouts.idle).await {
                    Preamble::Commit {
                        held,
                        scanner,
                        body,
                    } => {
                        let relay = RelayBody::new(
                            body,
                            held,
                            Some(scanner),
                            Judge::Stream,
                            timeouts.idle,
                            attempt,
                            guard,
                        );
                        if let Some((a, key)) = &session {
                            a.bind(key, ep.idx);
                        }
                        return relay_response(parts, relay, &ep, attempts, fallback, &req.method);
                    }
                    Preamble::Failed(outcome, message) => {
                        tracing::warn!(endpoint = %ep.name, kind = outcome.kind().name(), %message, "stream failed before content");
                        attempt.finish(outcome, Some(message.clone()));
                        failures.push(Failure {
                            endpoint: ep.name.clone(),
                            outcome,
                            message,
                        });
                    }
                }
            }
            Verdict::Relay => {
                let relay = RelayBody::new(
                    body,
                    Vec::new(),
                    None,
                    Judge::Plain,
                    timeouts.idle,
                    attempt,
                    guard,
                );
                if let Some((a, key)) = &session {
                    a.bind(key, ep.idx);
                }
                return relay_response(parts, relay, &ep, attempts, fallback, &req.method);
            }
            Verdict::RelayCallerError => {
                let relay = RelayBody::new(
                    body,
                    Vec::new(),
                    None,
                    Judge::CallerError,
                    timeouts.idle,
                    attempt,
                    guard,
                );
                return relay_response(parts, relay, &ep, attempts, fallback, &req.method);
            }
            Verdict::FailOver(outcome) => {
                let text = forward::read_small(body, 16 * 1024, timeouts.idle).await;
                let message = forward::error_message(&text)
                    .unwrap_or_else(|| format!("HTTP {}", parts.status.as_u16()));
                let message = format!("HTTP {}: {}", parts.status.as_u16(), scrub(&message, &ep));
                tracing::warn!(endpoint = %ep.name, kind = outcome.kind().name(), %message, "attempt failed");
                attempt.finish(outcome, Some(message.clone()));
                failures.push(Failure {
                    endpoint: ep.name.clone(),
                    outcome,
                    message,
                });
            }
        }
    }
    guard.end(RequestEnd::Upstream);
    all_down(reg, &failures)
}

/// The next admitted candidate not yet tried.
fn next_candidate(
    reg: &Registry,
    candidates: &mut impl Iterator<Item = usize>,
    tried: Tried,
) -> Option<(Arc<Endpoint>, bool)> {
    for idx in candidates.by_ref() {
        if tried.contains(idx) {
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

/// Removes the endpoint's own credential from text an upstream sent back (some relays echo it).
fn scrub(text: &str, ep: &Endpoint) -> String {
    let secret = ep.auth_header.1.to_str().unwrap_or("");
    let secret = secret.strip_prefix("Bearer ").unwrap_or(secret);
    if secret.len() >= 4 {
        text.replace(secret, "***")
    } else {
        text.to_string()
    }
}

fn relay_response(
    mut parts: http::response::Parts,
    relay: RelayBody,
    ep: &Endpoint,
    attempts: u32,
    fallback: bool,
    method: &Method,
) -> Response<GateBody> {
    forward::strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(&ep.name) {
        parts.headers.insert("x-ccgate-endpoint", v);
    }
    parts
        .headers
        .insert("x-ccgate-attempts", HeaderValue::from(attempts));
    if fallback {
        parts
            .headers
            .insert("x-ccgate-fallback", HeaderValue::from_static("least-bad"));
    }
    tracing::info!(endpoint = %ep.name, status = parts.status.as_u16(), attempts, "relaying");
    // Bodiless answers are complete with their headers; hyper will not poll their body.
    if *method == Method::HEAD
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
    {
        relay.complete_without_body();
        return Response::from_parts(parts, GateBody::empty());
    }
    Response::from_parts(parts, GateBody::Relay(Box::new(relay)))
}

/// The answer when no candidate produced one. The status tells clients how to behave: 503 (they
/// keep retrying, honouring `retry-after`) when nothing was available or everything was
/// overloaded or rate limited; 504 when attempts timed out; 502 for other upstream breakage.
/// Never a bare 529, which Claude Code gives up on after three.
fn all_down(reg: &Registry, failures: &[Failure]) -> Response<GateBody> {
    let busy = |o: Outcome| matches!(o, Outcome::Overloaded | Outcome::RateLimited(_));
    let status = if failures.is_empty() || failures.iter().all(|f| busy(f.outcome)) {
        StatusCode::SERVICE_UNAVAILABLE
    } else if failures
        .iter()
        .any(|f| f.outcome.kind() == crate::classify::Kind::Timeout)
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
            .map(|f| format!("{}: {}", f.endpoint, f.message))
            .collect();
        format!("ccgate: every endpoint tried failed ({})", parts.join("; "))
    };
    let retry_after = reg.retry_after_secs();
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
