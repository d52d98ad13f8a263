//! `ccgate status`: the running gateway's endpoints, failure queue and totals, from its JSON views
//! (which never hold secrets).

use std::fmt::Write as _;

use serde_json::Value;

use crate::cli::table::*;
use crate::cli::target::*;

/// Asks the running gateway for its endpoints, failure queue and totals and renders them.
pub fn status(target: Target) -> anyhow::Result<String> {
    let rt = runtime()?;
    rt.block_on(async move {
        let client = AdminClient::new(target)?;
        let (endpoints, queue, stats) = tokio::join!(
            client.get_json("endpoints", "a ccgate"),
            client.get_json("failure-queue", "a ccgate"),
            client.get_json("stats", "a ccgate"),
        );
        Ok(render_status(client.url(), &endpoints?, &queue?, &stats?))
    })
}

/// `ccgate status --cluster`: the running gateway's `/_ccgate/cluster` view.
pub fn cluster_status(target: Target) -> anyhow::Result<String> {
    let rt = runtime()?;
    rt.block_on(async move {
        let client = AdminClient::new(target)?;
        let view = client
            .get_json("cluster", "a ccgate with cluster mode")
            .await?;
        Ok(render_cluster(client.url(), &view))
    })
}

/// Renders `/_ccgate/cluster` as the `status --cluster` report.
pub fn render_cluster(url: &str, view: &Value) -> String {
    let mut out = String::new();
    if view["enabled"] != true {
        let _ = writeln!(
            out,
            "ccgate at {url}: cluster mode is off (no [cluster] table in its config)"
        );
        return out;
    }
    let up = if view["redis"]["up"] == true {
        "up"
    } else {
        "DOWN (serving on local state)"
    };
    let _ = writeln!(
        out,
        "ccgate at {url}: instance {}, Redis {} is {up}",
        view["instance"].as_str().unwrap_or("?"),
        view["redis"]["url"].as_str().unwrap_or("?"),
    );
    if let Some(e) = view["error"].as_str() {
        let _ = writeln!(out, "cluster view unavailable: {e}");
        return out;
    }
    let n = |v: &Value, k: &str| v[k].as_i64().unwrap_or(0);
    let _ = writeln!(
        out,
        "\n{:<24} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "INSTANCE", "HEARD", "REQUESTS", "OK", "FAILED", "EPISODES"
    );
    for i in view["instances"].as_array().into_iter().flatten() {
        let t = &i["totals"];
        let _ = writeln!(
            out,
            "{:<24} {:>9}s {:>10} {:>10} {:>10} {:>8}",
            i["instance"].as_str().unwrap_or("?"),
            format!("{:.1}", n(i, "last_heard_ms_ago") as f64 / 1000.0),
            n(t, "total_requests"),
            n(t, "successful_requests"),
            n(t, "failed_requests"),
            n(t, "total_failed"),
        );
    }
    let t = &view["totals"];
    let _ = writeln!(
        out,
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "cluster (all flushes)",
        "",
        n(t, "total_requests"),
        n(t, "successful_requests"),
        n(t, "failed_requests"),
        n(t, "total_failed"),
    );
    out
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
                quota(e),
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
            "QUOTA LEFT",
            "IN FLIGHT",
            "REQUESTS",
            "ENDPOINT ERRORS",
            "CALLER ERRORS",
        ],
        &rows,
    ));
    // Which models each endpoint serves, when any endpoint is restricted (model-aware routing).
    let restricted: Vec<String> = endpoints["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let models: Vec<&str> = e["models"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            Some(format!("{}: {}", s(&e["name"]), models.join(", ")))
        })
        .collect();
    if !restricted.is_empty() {
        let _ = writeln!(
            out,
            "
models: {} (others: every model)",
            restricted.join("; ")
        );
    }
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

/// What is left of an endpoint's rate limit and when it resets (`3% left, resets in 4m`), marked
/// when it is near the limit and ranked last; `-` if it never said.
fn quota(e: &Value) -> String {
    let q = &e["quota"];
    let Some(left) = q["remaining_fraction"].as_f64() else {
        return "-".into();
    };
    let mut out = format!("{:.0}% left", left * 100.0);
    if let Some(reset) = q["reset"].as_str() {
        let _ = write!(out, ", resets {}", relative(reset));
    }
    if q["near_limit"].as_bool() == Some(true) {
        out.push_str(" (near limit: ranked last)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn status_renders_every_section() {
        let endpoints = serde_json::json!({"endpoints": [
            {"name": "a", "state": "healthy", "success_rate": 1.0, "judged_requests": 3,
             "latency_first_byte": {"p50_ms": 2.0}, "in_flight": 0, "total_requests": 3,
             "endpoint_errors": 0, "caller_errors": 0,
             "quota": {"remaining_fraction": 0.03, "reset": null, "near_limit": true}},
            {"name": "b", "state": "ejected", "success_rate": 0.25, "judged_requests": 4,
             "latency_first_byte": {"p50_ms": null}, "in_flight": 1, "total_requests": 5,
             "endpoint_errors": 3, "caller_errors": 1},
            {"name": "c", "state": "healthy", "success_rate": 1.0, "judged_requests": 0,
             "latency_first_byte": {"p50_ms": null}, "in_flight": 0, "total_requests": 0,
             "endpoint_errors": 0, "caller_errors": 0, "models": ["claude-haiku-*", "claude-sonnet-*"]},
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
        assert!(out.contains("3% left (near limit: ranked last)"), "{out}");
        assert!(out.contains("failure queue: 1"), "{out}");
        assert!(
            out.contains("models: c: claude-haiku-*, claude-sonnet-* (others: every model)"),
            "{out}"
        );
        assert!(out.contains("server_error"), "{out}");
        assert!(
            out.contains("totals: 7 requests: 3 answered, 3 not (1 upstream errors, 1 caller errors, 1 cancelled), 1 in flight"),
            "{out}"
        );
    }
}
