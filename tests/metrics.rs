//! `GET /_ccgate/metrics`: the Prometheus exposition agrees with the admin JSON and with what the
//! mock upstreams counted on their side.

mod support;

use std::collections::BTreeMap;

use bytes::Bytes;
use http::Method;
use support::gateway::{GatewayBuilder, TestGateway};
use support::mock::{MockUpstream, Script};

/// `name{k="v",...} value` lines, keyed by the whole series text before the value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in `{line}`")),
        };
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    out
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_matches_admin_views_and_upstream_counts() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    // a: two 500s, one 529, then fine; b: always fine.
    a.push_n(Script::error(500, "api_error", "boom"), 2);
    a.push(Script::overloaded());
    let gw = GatewayBuilder::new()
        .health("failure_threshold = 100")
        .endpoint("a", &a.url(), "")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;
    for _ in 0..6 {
        let r = gw
            .post("/v1/messages", &[], &TestGateway::message_body(false))
            .await;
        assert_eq!(r.status, 200);
    }
    let bad = gw.post("/v1/nope", &[], &serde_json::json!({})).await;
    assert_eq!(bad.status, 200, "the mock answers any path");
    gw.settle().await;

    let resp = gw
        .request(Method::GET, "/_ccgate/metrics", &[], Bytes::new())
        .await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.contains("openmetrics") || c.contains("text/plain"))
    );
    let text = resp.text();
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics terminator");
    let m = parse(&text);

    for (name, up) in [("a", &a), ("b", &b)] {
        let view = gw.endpoint_view(name).await;
        let started = get(
            &m,
            &format!("ccgate_endpoint_attempts_started_total{{endpoint=\"{name}\"}}"),
        );
        assert_eq!(
            started as usize,
            up.count(),
            "{name}: started vs upstream count"
        );
        assert_eq!(started as u64, view["total_requests"].as_u64().unwrap_or(0));
        let mut ended = 0.0;
        for (outcome, n) in view["outcomes"].as_object().expect("outcomes") {
            let series = format!(
                "ccgate_endpoint_attempts_total{{endpoint=\"{name}\",outcome=\"{outcome}\"}}"
            );
            assert_eq!(get(&m, &series) as u64, n.as_u64().unwrap_or(0), "{series}");
            ended += get(&m, &series);
        }
        let in_flight = get(
            &m,
            &format!("ccgate_endpoint_in_flight{{endpoint=\"{name}\"}}"),
        );
        assert_eq!(ended + in_flight, started, "{name}: accounting identity");
        let state = view["state"].as_str().expect("state");
        assert_eq!(
            get(
                &m,
                &format!("ccgate_endpoint_state{{endpoint=\"{name}\",state=\"{state}\"}}")
            ),
            1.0
        );
        let count = get(
            &m,
            &format!("ccgate_endpoint_first_byte_seconds_count{{endpoint=\"{name}\"}}"),
        );
        let inf = get(
            &m,
            &format!(
                "ccgate_endpoint_first_byte_seconds_bucket{{le=\"+Inf\",endpoint=\"{name}\"}}"
            ),
        );
        assert_eq!(count, inf, "histogram count equals the +Inf bucket");
        assert_eq!(
            count as usize,
            up.count(),
            "one first-byte sample per answered attempt"
        );
    }
    assert_eq!(
        get(
            &m,
            "ccgate_endpoint_attempts_total{endpoint=\"a\",outcome=\"server_error\"}"
        ),
        2.0
    );
    assert_eq!(
        get(
            &m,
            "ccgate_endpoint_attempts_total{endpoint=\"a\",outcome=\"overloaded\"}"
        ),
        1.0
    );

    let stats = gw.admin("stats").await;
    assert_eq!(
        get(&m, "ccgate_requests_started_total") as u64,
        stats["total_requests"].as_u64().unwrap_or(0)
    );
    assert_eq!(get(&m, "ccgate_requests_started_total"), 7.0);
    assert_eq!(get(&m, "ccgate_requests_total{result=\"success\"}"), 7.0);
    assert_eq!(
        get(&m, "ccgate_retries_total"),
        3.0,
        "three failovers from a to b"
    );
    assert_eq!(get(&m, "ccgate_requests_in_flight"), 0.0);
    assert_eq!(get(&m, "ccgate_failure_queue_size"), 0.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_access_token_and_show_no_secret() {
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .server("access_token = \"gate-token-123\"")
        .endpoint("a", &up.url(), "api_key = \"sk-very-secret-key\"")
        .start()
        .await;
    let denied = gw
        .request(Method::GET, "/_ccgate/metrics", &[], Bytes::new())
        .await;
    assert_eq!(denied.status, 401);
    let ok = gw
        .request(
            Method::GET,
            "/_ccgate/metrics",
            &[("x-api-key", "gate-token-123")],
            Bytes::new(),
        )
        .await;
    assert_eq!(ok.status, 200);
    let text = ok.text();
    assert!(!text.contains("sk-very-secret-key") && !text.contains("gate-token-123"));
    gw.shutdown().await;
}
