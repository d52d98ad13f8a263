//! ccgate's own HTTP surface under `/_ccgate/`: routing, the access token and same-site rules,
//! and the admin switches, which send commands to the registry and the failure queue. The JSON
//! views are in [`crate::control::views`], the page in [`crate::control::dashboard`].

use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response, StatusCode};

use crate::control::views::{
    endpoint_view, endpoints_json, episodes_json, failure_queue_json, requests_json, stats_json,
};
use crate::health::queue::PhaseChange;
use crate::proxy::gateway::Gateway;
use crate::proxy::response::{self, GateBody};
use crate::store::Persist;

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
        Some(response::method_not_allowed("POST"))
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

fn cross_site_refused() -> Response<GateBody> {
    response::error(
        StatusCode::FORBIDDEN,
        "permission_error",
        "ccgate: admin changes are not accepted from another site",
    )
}

/// The answer to `GET /_ccgate/health`, with the mark that tells ccgate's answer from another
/// server's that answers 200 to anything (the CLI asks before it sends a token or points Claude
/// Code here), in and out of cluster mode.
pub(crate) fn health_answer(body: &serde_json::Value) -> Response<GateBody> {
    let mut resp = response::json(StatusCode::OK, body);
    resp.headers_mut().insert(
        crate::proxy::gateway::HEALTH_MARK,
        http::HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    resp
}

/// Handles a request under `/_ccgate/`.
pub async fn handle<B>(gw: Arc<Gateway>, persist: &Persist, req: Request<B>) -> Response<GateBody> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    if path == "/_ccgate/health" {
        return health_answer(&serde_json::json!({"status": "ok"}));
    }
    if path == crate::proxy::gateway::ADMIN_PREFIX {
        return crate::control::dashboard::page(&gw, &method, req.uri(), req.headers());
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
        (&Method::GET, ["endpoints"]) => {
            response::json(StatusCode::OK, &endpoints_json(&gw, persist))
        }
        (&Method::GET, ["failure-queue"]) => {
            response::json(StatusCode::OK, &failure_queue_json(&gw))
        }
        (&Method::GET, ["stats"]) => response::json(StatusCode::OK, &stats_json(&gw, persist)),
        (&Method::GET, ["episodes"]) => {
            persist.settle_episodes(&gw).await;
            response::json(StatusCode::OK, &episodes_json(&gw, persist))
        }
        (&Method::GET, ["events"]) => response::json(
            StatusCode::OK,
            &serde_json::json!({ "failovers": gw.events.recent() }),
        ),
        (&Method::GET, ["requests"]) => {
            response::json(StatusCode::OK, &requests_json(&gw, req.uri().query()))
        }
        (&Method::GET, ["metrics"]) => {
            use crate::control::metrics::{Format, render};
            let format = Format::negotiate(req.headers().get(http::header::ACCEPT));
            response::body(format.content_type(), render(&gw, "", format))
        }
        (&Method::GET, ["endpoints", name]) => match gw.registry.by_name(name) {
            Some(ep) => response::json(
                StatusCode::OK,
                &serde_json::to_value(endpoint_view(&gw, persist, ep)).unwrap_or_default(),
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
                    ep.live.set_admin_disabled(false);
                    gw.registry.queue.probe_now(ep.idx);
                    gw.registry
                        .queue
                        .note_change(&ep, PhaseChange::Admin(false));
                    response::json(
                        StatusCode::OK,
                        &serde_json::to_value(endpoint_view(&gw, persist, &ep)).unwrap_or_default(),
                    )
                }
                "disable" => {
                    ep.live.set_admin_disabled(true);
                    gw.registry.queue.note_change(&ep, PhaseChange::Admin(true));
                    response::json(
                        StatusCode::OK,
                        &serde_json::to_value(endpoint_view(&gw, persist, &ep)).unwrap_or_default(),
                    )
                }
                "probe" => {
                    let result = crate::proxy::probe::probe_and_record(&gw, &ep).await;
                    response::json(
                        StatusCode::OK,
                        &serde_json::json!({
                            "name": ep.name,
                            "passed": result.passed,
                            "detail": result.detail,
                            "latency_ms": result.latency.as_secs_f64() * 1000.0,
                            "state": ep.state_name(),
                        }),
                    )
                }
                _ => not_found(),
            }
        }
        (
            _,
            [
                "endpoints" | "failure-queue" | "stats" | "metrics" | "episodes" | "events"
                | "requests",
            ],
        )
        | (_, ["endpoints", _]) => response::method_not_allowed("GET"),
        (_, ["endpoints", _, "enable" | "disable" | "probe"]) => {
            response::method_not_allowed("POST")
        }
        _ => not_found(),
    }
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
