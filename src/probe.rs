//! Recovery probes and the background prober.
//!
//! A probe is not a client attempt: it never touches the endpoint's attempt counters. Its result
//! goes to the failure queue, which moves a verified endpoint onto probation (one real request at
//! a time until one succeeds) or schedules the next probe with growing backoff.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};
use tokio::task::JoinSet;

use crate::config::ProbeMode;
use crate::endpoint::Endpoint;
use crate::health::{Event, Phase};
use crate::proxy::Gateway;

/// What one probe found.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    /// Whether the endpoint works.
    pub passed: bool,
    /// What was checked, or what went wrong.
    pub detail: String,
    /// How long it took.
    pub latency: Duration,
}

/// Runs one probe against `ep` in its configured mode.
pub async fn probe(gw: &Gateway, ep: &Endpoint) -> ProbeResult {
    let started = tokio::time::Instant::now();
    let limit = gw.config.health.probe_timeout;
    let (passed, detail) = match tokio::time::timeout(limit, probe_inner(gw, ep)).await {
        Ok(Ok(detail)) => (true, ep.scrub(&detail)),
        Ok(Err(detail)) => (false, ep.scrub(&detail)),
        Err(_) => (
            false,
            format!(
                "probe timed out after {}",
                humantime::format_duration(limit)
            ),
        ),
    };
    ProbeResult {
        passed,
        detail,
        latency: started.elapsed(),
    }
}

/// Runs one probe now and records its result if the endpoint is in the failure queue.
pub async fn probe_and_record(gw: &Gateway, ep: &Endpoint) -> ProbeResult {
    let result = probe(gw, ep).await;
    if gw.registry.queue.contains(ep.idx) {
        gw.registry
            .queue
            .probe_result(ep, result.passed, result.detail.clone());
    }
    tracing::info!(endpoint = %ep.name, passed = result.passed, detail = %result.detail, "probe");
    result
}

async fn probe_inner(gw: &Gateway, ep: &Endpoint) -> Result<String, String> {
    let model = ep
        .model_map
        .get(&gw.config.health.probe_model)
        .cloned()
        .unwrap_or_else(|| gw.config.health.probe_model.clone());
    let code = format!("ccg{:06}", fastrand::u32(0..1_000_000));
    let (method, path, body) = match ep.probe {
        ProbeMode::Models => (Method::GET, "/v1/models", None),
        ProbeMode::CountTokens => (
            Method::POST,
            "/v1/messages/count_tokens",
            Some(
                serde_json::json!({"model": model, "messages": [{"role": "user", "content": "ping"}]}),
            ),
        ),
        ProbeMode::Message => (
            Method::POST,
            "/v1/messages",
            Some(serde_json::json!({
                "model": model,
                "max_tokens": 20,
                "messages": [{"role": "user", "content": format!("Reply with exactly this code and nothing else: {code}")}],
            })),
        ),
    };
    let uri = ep.base_url.join(path);
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("anthropic-version", "2023-06-01")
        .header(
            header::USER_AGENT,
            concat!("ccgate-probe/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body))
        .map_err(|e| format!("cannot build probe: {e}"))?;
    if req.method() == Method::POST {
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    req.headers_mut()
        .insert(ep.auth_header.0.clone(), ep.auth_header.1.clone());
    let resp = ep
        .client
        .request(req)
        .await
        .map_err(|e| crate::forward::error_chain(&e))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {}", crate::forward::error_chain(&e)))?
        .to_bytes();
    if !status.is_success() {
        let msg = crate::forward::error_message(&body).unwrap_or_default();
        return Err(format!("HTTP {} {msg}", status.as_u16()).trim().to_string());
    }
    match ep.probe {
        ProbeMode::Models => Ok("models listed".into()),
        ProbeMode::CountTokens => {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|_| "count_tokens answered with something that is not JSON".to_string())?;
            v.get("input_tokens")
                .and_then(|t| t.as_u64())
                .map(|n| format!("count_tokens = {n}"))
                .ok_or_else(|| "count_tokens answer has no input_tokens".into())
        }
        ProbeMode::Message => {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|_| "message answered with something that is not JSON".to_string())?;
            let text: String = v
                .get("content")
                .and_then(|c| c.as_array())
                .map(|blocks| {
                    blocks
                        .iter()
                        .filter_map(|b| b.get("text").and_then(|t| t.as_str()))
                        .collect()
                })
                .unwrap_or_default();
            if text.contains(&code) {
                Ok(format!("reply carried the code {code}"))
            } else {
                Err(format!(
                    "reply did not carry the code {code}: the endpoint answers, but not with the model's words"
                ))
            }
        }
    }
}

/// The background prober: probes each queued endpoint when it is due (one probe per endpoint at a
/// time), returns cooled-down endpoints to rotation, and sleeps until the next due time or a
/// change in the queue. Ends when `shutdown` resolves.
pub async fn run_prober(gw: Arc<Gateway>, shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut shutdown = shutdown;
    let mut running: JoinSet<usize> = JoinSet::new();
    let mut busy: HashSet<usize> = HashSet::new();
    let reg = Arc::clone(&gw.registry);
    loop {
        let now = reg.clock.now_ms();
        // An attempt begun before a config reload may have ejected a kept endpoint through the
        // previous gateway's queue: give it the entry (and the probes) it is owed here.
        reg.queue.reconcile_all(&reg.endpoints, now);
        let mut next_due: Option<u64> = None;
        for entry in reg.queue.entries() {
            let ep = &reg.endpoints[entry.idx];
            if entry.probation || busy.contains(&entry.idx) || ep.live.admin_disabled() {
                continue;
            }
            if entry.next_probe_at_ms > now {
                next_due = Some(next_due.map_or(entry.next_probe_at_ms, |d: u64| {
                    d.min(entry.next_probe_at_ms)
                }));
                continue;
            }
            if ep.live.phase() == Phase::CoolingDown {
                let until = ep.live.cooldown_until_ms();
                if now >= until {
                    reg.queue.transition(ep, Event::CooldownExpired, now);
                } else {
                    next_due = Some(next_due.map_or(until, |d: u64| d.min(until)));
                }
                continue;
            }
            busy.insert(entry.idx);
            let gw = Arc::clone(&gw);
            let ep = Arc::clone(ep);
            running.spawn(async move {
                probe_and_record(&gw, &ep).await;
                ep.idx
            });
        }
        let sleep_until = reg.clock.instant(next_due.unwrap_or(now + 60_000));
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_until) => {}
            _ = reg.queue.changed.notified() => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok(idx) = done {
                    busy.remove(&idx);
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    running.abort_all();
}
