//! `ccgate status`: the running gateway's endpoints, failure queue and totals, from its JSON views
//! (which never hold secrets).

use std::fmt::Write as _;

use anyhow::{anyhow, bail};
use http::{Method, StatusCode};
use serde_json::Value;

use crate::cli::table::*;
use crate::cli::target::*;

/// Asks the running gateway for its endpoints, failure queue and totals and renders them.
pub fn status(target: Target) -> anyhow::Result<String> {
    let rt = runtime()?;
    rt.block_on(async move {
        let client = AdminClient::new(target)?;
        let (endpoints, queue, stats) = tokio::join!(
            client.call(Method::GET, "endpoints"),
            client.call(Method::GET, "failure-queue"),
            client.call(Method::GET, "stats"),
        );
        let mut answers = Vec::new();
        for a in [endpoints, queue, stats] {
            let a = a.map_err(|e| {
                anyhow!("cannot reach the gateway: {e}\nIs `ccgate serve` running? (pass --url if it listens elsewhere)")
            })?;
            match a.status {
                StatusCode::OK => answers.push(a.json()),
                StatusCode::UNAUTHORIZED => bail!(
                    "the gateway at {} wants its access token: set server.access_token (or access_token_env) in the config this command reads",
                    client.url()
                ),
                _ => bail!(
                    "the gateway at {} answered {}: {}; is it a ccgate?",
                    client.url(),
                    a.status,
                    a.error_message()
                ),
            }
        }
        Ok(render_status(client.url(), &answers[0], &answers[1], &answers[2]))
    })
}

/// Renders the three views as the `status` report.
pub fn render_status(url: &str, endpoints: &Value, queue: &Value, stats: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ccgate at {url}, up {}\n",
        fmt_secs(u(&stats["uptime_seconds"]))
    );
    let rows: Vec<Vec<String>> = endpoints["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            vec![
                s(&e["name"]),
                s(&e["state"]),
                health(e),
                e["latency_first_byte"]["p50_ms"]
                    .as_f64()
                    .map_or("-".into(), fmt_ms),
                cache_hit(e),
                u(&e["in_flight"]).to_string(),
                u(&e["total_requests"]).to_string(),
                u(&e["endpoint_errors"]).to_string(),
                u(&e["caller_errors"]).to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ENDPOINT",
            "STATE",
            "HEALTH",
            "P50 FIRST BYTE",
            "CACHE HIT",
            "IN FLIGHT",
            "REQUESTS",
            "ENDPOINT ERRORS",
            "CALLER ERRORS",
        ],
        &rows,
    ));
    let entries = queue["entries"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if entries.is_empty() {
        out.push_str("\nfailure queue: empty\n");
    } else {
        let _ = writeln!(out, "\nfailure queue: {}", entries.len());
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|q| {
                vec![
                    s(&q["name"]),
                    s(&q["reason"]),
                    q["since"].as_str().map_or("-".into(), relative),
                    u(&q["probe_attempts"]).to_string(),
                    if q["probation"].as_bool() == Some(true) {
                        "on probation".into()
                    } else {
                        q["next_probe_at"].as_str().map_or("-".into(), relative)
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &["ENDPOINT", "REASON", "SINCE", "PROBES", "NEXT PROBE"],
            &rows,
        ));
    }
    let _ = writeln!(
        out,
        "\ntotals: {} requests: {} answered, {} not ({} upstream errors, {} caller errors, {} cancelled), {} in flight; {} retries, {} fallbacks, {} budget refusals",
        u(&stats["total_requests"]),
        u(&stats["successful_requests"]),
        u(&stats["failed_requests"]),
        u(&stats["upstream_errors"]),
        u(&stats["caller_errors"]),
        u(&stats["cancelled"]),
        u(&stats["in_flight"]),
        u(&stats["retries"]),
        u(&stats["fallbacks"]),
        u(&stats["budget_refusals"]),
    );
    out
}

/// An endpoint's health: its success rate over the attempts it is responsible for, with what it
/// is over (`97.5% of 40`), or `-` before any such attempt (no rate from nothing).
/// The prompt-cache hit rate since start and the tokens it is over, `-` before any.
fn cache_hit(e: &Value) -> String {
    let c = &e["cache"];
    match c["hit_rate"].as_f64() {
        Some(r) => format!(
            "{:.1}% of {}",
            r * 100.0,
            u(&c["input_tokens"])
                + u(&c["cache_creation_input_tokens"])
                + u(&c["cache_read_input_tokens"])
        ),
        None => "-".into(),
    }
}

fn health(e: &Value) -> String {
    match (e["success_rate"].as_f64(), e["judged_requests"].as_u64()) {
        (Some(r), Some(n)) if n > 0 => format!("{:.1}% of {n}", r * 100.0),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn status_renders_every_section() {
        let endpoints = serde_json::json!({"endpoints": [
            {"name": "a", "state": "healthy", "success_rate": 1.0, "judged_requests": 3,
             "latency_first_byte": {"p50_ms": 2.0}, "in_flight": 0, "total_requests": 3,
             "endpoint_errors": 0, "caller_errors": 0},
            {"name": "b", "state": "ejected", "success_rate": 0.25, "judged_requests": 4,
             "latency_first_byte": {"p50_ms": null}, "in_flight": 1, "total_requests": 5,
             "endpoint_errors": 3, "caller_errors": 1},
            {"name": "c", "state": "healthy", "success_rate": 1.0, "judged_requests": 0,
             "latency_first_byte": {"p50_ms": null}, "in_flight": 0, "total_requests": 0,
             "endpoint_errors": 0, "caller_errors": 0},
        ]});
        let queue = serde_json::json!({"size": 1, "entries": [
            {"name": "b", "reason": "server_error", "since": "2000-01-01T00:00:00Z",
             "next_probe_at": "2000-01-01T00:00:10Z", "probe_attempts": 2, "probation": false}
        ]});
        let stats = serde_json::json!({"total_requests": 7, "successful_requests": 3, "failed_requests": 3,
            "upstream_errors": 1, "caller_errors": 1, "cancelled": 1, "in_flight": 1, "uptime_seconds": 62});
        let out = render_status("http://x", &endpoints, &queue, &stats);
        assert!(out.contains("ccgate at http://x, up 1m 2s"), "{out}");
        assert!(
            out.contains("a         healthy  100.0% of 3  2.0 ms"),
            "{out}"
        );
        assert!(out.contains("b         ejected  25.0% of 4   -"), "{out}");
        assert!(out.contains("c         healthy  -            -"), "{out}");
        assert!(out.contains("failure queue: 1"), "{out}");
        assert!(out.contains("server_error"), "{out}");
        assert!(
            out.contains("totals: 7 requests: 3 answered, 3 not (1 upstream errors, 1 caller errors, 1 cancelled), 1 in flight"),
            "{out}"
        );
    }
}
