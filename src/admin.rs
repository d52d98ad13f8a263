//! ccgate's own HTTP surface under `/_ccgate/`: JSON views of the live state, and the admin
//! switches. Views read snapshots; switches send commands to the registry and the failure queue.
//!
//! **Invariant:** only this module knows the JSON shape of the views (SPEC §8 contract names).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use serde::Serialize;

use crate::classify::Kind;
use crate::clock::{ms, rfc3339};
use crate::endpoint::Endpoint;
use crate::health::Phase;
use crate::proxy::Gateway;
use crate::response::{self, GateBody};
use crate::store::StorageStatus;

/// Latency figures in milliseconds.
#[derive(Serialize)]
pub struct LatencyView {
    /// Decaying average.
    pub avg_ms: Option<f64>,
    /// Median (histogram bucket bound).
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
}

/// The last failure of an endpoint.
#[derive(Serialize)]
pub struct LastErrorView {
    /// Outcome kind.
    pub kind: &'static str,
    /// Detail (never a secret).
    pub message: String,
    /// When (RFC 3339).
    pub at: String,
}

/// Cumulative counters across restarts: what the database holds plus what happened since the
/// last flush. The contract fields beside it stay per-process.
#[derive(Serialize)]
pub struct LifetimeView {
    /// Attempts (or client requests) ever sent.
    pub total_requests: u64,
    /// Of those, answered correctly.
    pub successful_requests: u64,
    /// Failed.
    pub failed_requests: u64,
    /// Abandoned because the client left.
    pub cancelled: u64,
}

/// One endpoint, as `GET /_ccgate/endpoints` shows it.
#[derive(Serialize)]
pub struct EndpointView {
    /// Name.
    pub name: String,
    /// Base URL (never a credential).
    pub base_url: String,
    /// Priority.
    pub priority: u32,
    /// Weight.
    pub weight: u32,
    /// `healthy`, `degraded`, `ejected`, `cooling_down` or `disabled`.
    pub state: &'static str,
    /// Whether an operator has it switched on.
    pub enabled: bool,
    /// On probation after a passed probe.
    pub probation: bool,
    /// Attempts in progress.
    pub in_flight: u64,
    /// Attempts sent.
    pub total_requests: u64,
    /// Attempts the endpoint answered correctly (successes and caller errors).
    pub successful_requests: u64,
    /// Attempts that failed through the endpoint's fault.
    pub failed_requests: u64,
    /// Part of `successful_requests`: answered with the caller's own error (not the endpoint's fault).
    pub caller_errors: u64,
    /// Attempts abandoned because the client left.
    pub cancelled: u64,
    /// Ended attempts by outcome kind.
    pub outcomes: serde_json::Map<String, serde_json::Value>,
    /// Consecutive failures since the last success.
    pub consecutive_failures: u32,
    /// `successful / (successful + failed)`, 1.0 before any verdict.
    pub success_rate: f64,
    /// Time to response headers.
    pub latency_first_byte: LatencyView,
    /// Time to the end of the body.
    pub latency_total: LatencyView,
    /// The last failure.
    pub last_error: Option<LastErrorView>,
    /// End of a rate-limit cooldown (RFC 3339), while cooling down.
    pub cooldown_until: Option<String>,
    /// Counters across restarts (state that lasts).
    pub lifetime: LifetimeView,
}

fn latency(l: &crate::endpoint::Latency) -> LatencyView {
    LatencyView {
        avg_ms: l.ewma().map(|d| d.as_secs_f64() * 1000.0),
        p50_ms: l.percentile_ms(0.5),
        p90_ms: l.percentile_ms(0.9),
        p99_ms: l.percentile_ms(0.99),
    }
}

/// Every name [`state_name`] gives (the states `ccgate_endpoint_state` exports).
pub const STATES: [&str; 5] = ["healthy", "degraded", "ejected", "cooling_down", "disabled"];

/// The state name shown for an endpoint: one of [`STATES`].
pub fn state_name(ep: &Endpoint) -> &'static str {
    if ep.live.admin_disabled() {
        return "disabled";
    }
    match ep.live.phase() {
        Phase::Healthy if ep.live.consecutive_failures() > 0 => "degraded",
        Phase::Healthy => "healthy",
        Phase::Probation => "degraded",
        Phase::Ejected => "ejected",
        Phase::CoolingDown => "cooling_down",
        Phase::AuthDisabled => "disabled",
    }
}

/// Builds the view of one endpoint.
pub fn endpoint_view(gw: &Gateway, ep: &Endpoint) -> EndpointView {
    let c = ep.live.snapshot();
    let clock = gw.registry.clock;
    let mut outcomes = serde_json::Map::new();
    for k in Kind::ALL {
        outcomes.insert(k.name().into(), c.by_kind[k as usize].into());
    }
    let phase = ep.live.phase();
    EndpointView {
        name: ep.name.clone(),
        base_url: ep.base_url.to_string(),
        priority: ep.priority,
        weight: ep.weight,
        state: state_name(ep),
        enabled: !ep.live.admin_disabled(),
        probation: phase == Phase::Probation,
        in_flight: c.in_flight,
        total_requests: c.total,
        successful_requests: c.successful(),
        failed_requests: c.failed(),
        caller_errors: c.caller_errors(),
        cancelled: c.cancelled(),
        outcomes,
        consecutive_failures: ep.live.consecutive_failures(),
        success_rate: c.success_rate(),
        latency_first_byte: latency(&ep.live.ttfb),
        latency_total: latency(&ep.live.total),
        last_error: ep.live.last_error().map(|e| LastErrorView {
            kind: e.kind.name(),
            message: e.message.clone(),
            at: rfc3339(clock.wall(e.at_ms)),
        }),
        cooldown_until: (phase == Phase::CoolingDown)
            .then(|| rfc3339(clock.wall(ep.live.cooldown_until_ms()))),
        lifetime: {
            let l = gw.persist.lifetime(&ep.name, &ep.live);
            LifetimeView {
                total_requests: l.total,
                successful_requests: l.successful(),
                failed_requests: l.failed(),
                cancelled: l.cancelled(),
            }
        },
    }
}

/// `GET /_ccgate/endpoints`.
pub fn endpoints_json(gw: &Gateway) -> serde_json::Value {
    let list: Vec<EndpointView> = gw
        .registry
        .endpoints
        .iter()
        .map(|e| endpoint_view(gw, e))
        .collect();
    serde_json::json!({ "endpoints": list })
}

/// `GET /_ccgate/failure-queue`.
pub fn failure_queue_json(gw: &Gateway) -> serde_json::Value {
    let clock = gw.registry.clock;
    let (entries, stats) = gw.registry.queue.view();
    let entries: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let ep = &gw.registry.endpoints[e.idx];
            serde_json::json!({
                "name": e.name,
                "reason": e.reason.name(),
                "state": state_name(ep),
                "since": rfc3339(clock.wall(e.since_ms)),
                "next_probe_at": rfc3339(clock.wall(e.next_probe_at_ms)),
                "probe_attempts": e.probe_attempts,
                "probation": e.probation,
                "last_probe": e.last_probe,
                "last_error": ep.live.last_error().map(|l| l.message.clone()),
            })
        })
        .collect();
    serde_json::json!({
        "size": entries.len(),
        "entries": entries,
        "stats": {
            "total_failed": stats.total_failed,
            "total_verified": stats.total_verified,
            "total_recovered": stats.total_recovered,
            "total_still_failed": stats.total_still_failed,
            "total_closed": stats.total_closed,
        }
    })
}

/// `GET /_ccgate/stats`.
pub fn stats_json(gw: &Gateway) -> serde_json::Value {
    let s = gw.registry.gateway.snapshot();
    let lifetime = gw.persist.gateway_lifetime(&gw.registry.gateway);
    serde_json::json!({
        "total_requests": s.total,
        "successful_requests": s.successful,
        "failed_requests": s.failed,
        "in_flight": s.in_flight,
        "upstream_errors": s.upstream_errors,
        "caller_errors": s.caller_errors,
        "cancelled": s.cancelled,
        "retries": s.retries,
        "fallbacks": s.fallbacks,
        "budget_refusals": s.budget_refusals,
        "sessions": gw.affinity.as_ref().map_or(0, |a| a.len()),
        "uptime_seconds": gw.registry.clock.uptime().as_secs(),
        "endpoints": gw.registry.endpoints.len(),
        "failure_queue_size": gw.registry.queue.len(),
        "lifetime": {
            "total_requests": lifetime.started,
            "successful_requests": lifetime.success,
            "failed_requests": lifetime.failed(),
            "upstream_errors": lifetime.upstream_errors,
            "caller_errors": lifetime.caller_errors,
            "cancelled": lifetime.cancelled,
        },
        "storage": storage_json(&gw.persist.status()),
    })
}

/// The `storage` object of `/_ccgate/stats`.
fn storage_json(s: &StorageStatus) -> serde_json::Value {
    serde_json::json!({
        "enabled": s.enabled,
        "configured": s.configured,
        "path": s.path.as_ref().map(|p| p.display().to_string()),
        "flush_interval_ms": ms(s.flush_interval),
        "last_flush": s.last_flush.map(rfc3339),
        "error": s.error,
    })
}

/// `GET /_ccgate/episodes`: the latest episodes, newest first; an open episode shows the probes
/// run so far.
pub fn episodes_json(gw: &Gateway) -> serde_json::Value {
    let list: Vec<serde_json::Value> = gw
        .persist
        .recent_episodes()
        .iter()
        .map(|r| {
            let probes = match r.ended_at_ms {
                Some(_) => r.probes,
                None => gw
                    .registry
                    .by_name(&r.endpoint)
                    .and_then(|ep| gw.registry.queue.probe_attempts(ep.idx))
                    .map_or(r.probes, |p| p.max(r.probes)),
            };
            serde_json::json!({
                "id": r.id,
                "endpoint": r.endpoint,
                "reason": r.reason,
                "started_at": rfc3339(r.started_at()),
                "ended_at": r.ended_at().map(rfc3339),
                "duration_seconds": r.ended_at_ms
                    .map(|e| (e - r.started_at_ms).max(0) as f64 / 1000.0),
                "probes": probes,
                "open": r.ended_at_ms.is_none(),
                "ended_by": r.ended_by,
            })
        })
        .collect();
    serde_json::json!({ "storage": gw.persist.is_active(), "episodes": list })
}

/// The answer refusing an admin change (a `POST`), if it must be refused: the access token, the
/// method and the same-site rule are checked in that order.
pub(crate) fn refuse_write(
    gw: &Gateway,
    method: &Method,
    headers: &HeaderMap,
) -> Option<Response<GateBody>> {
    if !gw.authorized(headers) {
        Some(unauthorized())
    } else if method != Method::POST {
        Some(method_not_allowed())
    } else if cross_site(headers) {
        Some(cross_site_refused())
    } else {
        None
    }
}

fn unauthorized() -> Response<GateBody> {
    response::error(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "ccgate: missing or wrong access token",
    )
}

fn method_not_allowed() -> Response<GateBody> {
    response::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "ccgate: method not allowed",
    )
}

fn cross_site_refused() -> Response<GateBody> {
    response::error(
        StatusCode::FORBIDDEN,
        "permission_error",
        "ccgate: admin changes are not accepted from another site",
    )
}

/// Handles a request under `/_ccgate/`.
pub async fn handle<B>(gw: Arc<Gateway>, req: Request<B>) -> Response<GateBody> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    if path == "/_ccgate/health" {
        return response::json(StatusCode::OK, &serde_json::json!({"status": "ok"}));
    }
    if path == crate::proxy::ADMIN_PREFIX {
        return dashboard(&gw, &method, req.uri(), req.headers());
    }
    if !gw.authorized(req.headers()) {
        return unauthorized();
    }
    let segments: Vec<&str> = path
        .trim_start_matches("/_ccgate")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["endpoints"]) => response::json(StatusCode::OK, &endpoints_json(&gw)),
        (&Method::GET, ["failure-queue"]) => {
            response::json(StatusCode::OK, &failure_queue_json(&gw))
        }
        (&Method::GET, ["stats"]) => response::json(StatusCode::OK, &stats_json(&gw)),
        (&Method::GET, ["episodes"]) => response::json(StatusCode::OK, &episodes_json(&gw)),
        (&Method::GET, ["events"]) => response::json(
            StatusCode::OK,
            &serde_json::json!({ "failovers": gw.events.recent() }),
        ),
        (&Method::GET, ["metrics"]) => {
            response::body(crate::metrics::CONTENT_TYPE, crate::metrics::render(&gw))
        }
        (&Method::GET, ["endpoints", name]) => match gw.registry.by_name(name) {
            Some(ep) => response::json(
                StatusCode::OK,
                &serde_json::to_value(endpoint_view(&gw, ep)).unwrap_or_default(),
            ),
            None => unknown_endpoint(name),
        },
        (&Method::POST, _) if cross_site(req.headers()) => cross_site_refused(),
        (&Method::POST, ["endpoints", name, action]) => {
            let Some(ep) = gw.registry.by_name(name).cloned() else {
                return unknown_endpoint(name);
            };
            match *action {
                "enable" => {
                    ep.live.admin_disabled.store(false, Ordering::Release);
                    gw.registry.queue.probe_now(ep.idx);
                    response::json(
                        StatusCode::OK,
                        &serde_json::to_value(endpoint_view(&gw, &ep)).unwrap_or_default(),
                    )
                }
                "disable" => {
                    ep.live.admin_disabled.store(true, Ordering::Release);
                    response::json(
                        StatusCode::OK,
                        &serde_json::to_value(endpoint_view(&gw, &ep)).unwrap_or_default(),
                    )
                }
                "probe" => {
                    let result = crate::probe::probe_and_record(&gw, &ep).await;
                    response::json(
                        StatusCode::OK,
                        &serde_json::json!({
                            "name": ep.name,
                            "passed": result.passed,
                            "detail": result.detail,
                            "latency_ms": result.latency.as_secs_f64() * 1000.0,
                            "state": state_name(&ep),
                        }),
                    )
                }
                _ => not_found(),
            }
        }
        (_, ["endpoints"] | ["failure-queue"] | ["stats"] | ["metrics"] | ["episodes"]) => {
            method_not_allowed()
        }
        _ => not_found(),
    }
}

/// The live dashboard (`GET /_ccgate/`): one self-contained page that polls the JSON views above.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// `GET /_ccgate/` and `/_ccgate`. A browser cannot set headers on a page load, so besides the
/// usual headers this one route also takes the access token as `?token=`; the page's script then
/// sends it as `x-api-key` on every fetch. The JSON views never accept it from the query.
fn dashboard(
    gw: &Gateway,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Response<GateBody> {
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed();
    }
    let query_ok = || {
        query_param(uri.query().unwrap_or(""), "token")
            .and_then(|t| HeaderValue::from_str(&t).ok())
            .is_some_and(|t| {
                // The same constant-time check as for headers, on the token from the query.
                let mut h = HeaderMap::new();
                h.insert("x-api-key", t);
                gw.authorized(&h)
            })
    };
    if !gw.authorized(headers) && !query_ok() {
        return response::error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "ccgate: missing or wrong access token (open the dashboard as /_ccgate/?token=...)",
        );
    }
    let mut r = response::body("text/html; charset=utf-8", DASHBOARD_HTML);
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page's URL may carry the token: never send it on as a referrer, and only let the page
    // talk to this gateway (no external assets exist; this keeps it that way).
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    r
}

/// The percent-decoded value of `key` in a query string (`+` is a space, as in forms).
fn query_param(query: &str, key: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))?;
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let (hi, lo) = (bytes.next().and_then(hex)?, bytes.next().and_then(hex)?);
                hi << 4 | lo
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// Whether a browser sent this request from another site (a cross-site form POST must not be
/// able to switch endpoints off). Non-browser clients send neither header and pass.
pub(crate) fn cross_site(headers: &http::HeaderMap) -> bool {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site")
    {
        return true;
    }
    let Some(origin) = headers
        .get(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or(origin);
    origin_host != host
}

fn unknown_endpoint(name: &str) -> Response<GateBody> {
    response::error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        &format!("ccgate: no endpoint named `{name}`"),
    )
}

fn not_found() -> Response<GateBody> {
    let mut r = response::error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        "ccgate: unknown admin path",
    );
    r.headers_mut()
        .insert("cache-control", http::HeaderValue::from_static("no-store"));
    r
}
