//! Recovery probes: one probe request in the endpoint's mode, and its result recorded in the
//! failure queue. The background loop that runs them is [`crate::control::prober`].
//!
//! A probe is not a client attempt: it never touches the endpoint's attempt counters. Its result
//! goes to the failure queue, which moves a verified endpoint onto probation (one real request at
//! a time until one succeeds) or schedules the next probe with growing backoff.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt;

use crate::config::ProbeMode;
use crate::health::endpoint::Endpoint;
use crate::proxy::gateway::Gateway;
use crate::proxy::scrub::OneLine;
use crate::transport::replay::ReplayBody;
use crate::transport::upstream::{MAX_REFUSALS, UpstreamError};

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
    let detail = OneLine(&result.detail);
    tracing::info!(endpoint = %ep.name, passed = result.passed, detail = %detail, "probe");
    result
}

/// What the message probe asks: the code's two halves, joined, and nothing else.
fn probe_prompt(head: &str, tail: &str) -> String {
    format!(
        "Reply with one word and nothing else: the text {head} immediately followed by the text {tail}, with no space between them."
    )
}

async fn probe_inner(gw: &Gateway, ep: &Endpoint) -> Result<String, String> {
    let model = ep
        .model_map
        .get(&gw.config.health.probe_model)
        .cloned()
        .unwrap_or_else(|| gw.config.health.probe_model.clone());
    // The code is asked for in two halves to be joined: the prompt never holds it whole, so an
    // upstream that echoes the request back does not pass for a model that read it.
    let (head, tail) = (
        format!("ccg{:03}", fastrand::u32(0..1_000)),
        format!("{:03}", fastrand::u32(0..1_000)),
    );
    let code = format!("{head}{tail}");
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
                "messages": [{"role": "user", "content": probe_prompt(&head, &tail)}],
            })),
        ),
    };
    let uri = ep.base_url.join(path);
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let build = || {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri.clone())
            .header("anthropic-version", "2023-06-01")
            .header(
                header::USER_AGENT,
                concat!("ccgate-probe/", env!("CARGO_PKG_VERSION")),
            )
            .body(ReplayBody::from(body.clone()))
            .map_err(|e| format!("cannot build probe: {e}"))?;
        if req.method() == Method::POST {
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        if let Some((name, value)) = &ep.auth_header {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        Ok::<_, String>(req)
    };
    // A probe the endpoint refused unprocessed (an HTTP/2 stream past a graceful GOAWAY) goes
    // out again, on another connection, as a client attempt's request does: the refusal says
    // nothing about the endpoint.
    let mut sent = ep.client.request(build()?).await;
    for _ in 0..MAX_REFUSALS {
        if !matches!(sent, Err(UpstreamError::Refused(_))) {
            break;
        }
        sent = ep.client.request(build()?).await;
    }
    let resp = sent.map_err(|e| crate::transport::error_chain(&e))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {}", crate::transport::error_chain(&e)))?
        .to_bytes();
    // An endpoint that forwards its clients' credentials has none of its own to probe with: that
    // it answers as an API does (it refuses the missing credential) is all a probe can learn.
    if ep.uses_client_credential()
        && matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
    {
        return Ok(format!(
            "reachable (HTTP {} without a client credential)",
            status.as_u16()
        ));
    }
    if !status.is_success() {
        let msg = crate::wire::anthropic::error_message(&body).unwrap_or_default();
        return Err(format!("HTTP {} {msg}", status.as_u16()).trim().to_string());
    }
    match ep.probe {
        // The list itself is not checked (relays list different models, or page them), but an
        // answer that is not a JSON object is not the API's.
        ProbeMode::Models => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(list)) => Ok(match list.get("data") {
                Some(serde_json::Value::Array(models)) => format!("{} models listed", models.len()),
                _ => "models answered".into(),
            }),
            _ => Err("models answered with something that is not a JSON object".into()),
        },
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
