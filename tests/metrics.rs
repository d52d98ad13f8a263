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

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Prometheus,
    OpenMetrics,
}

/// Every sample line belongs to the family the last `# TYPE` line declared, named as `format`
/// names it: a counter's family is `x_total` in Prometheus text and `x` in OpenMetrics (whose
/// samples are `x_total`); a histogram's samples are its family's `_bucket`, `_sum` and `_count`.
fn every_sample_has_its_family_declared(text: &str, format: Format) {
    let mut family: Option<(&str, &str)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("name and type");
            family = Some((name, kind));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = line.split(['{', ' ']).next().expect("a sample name");
        let (name, kind) = family.unwrap_or_else(|| panic!("`{line}` before any # TYPE"));
        let names: Vec<String> = match (kind, format) {
            ("counter", Format::Prometheus) => {
                assert!(name.ends_with("_total"), "counter family `{name}`");
                vec![name.to_string()]
            }
            ("counter", Format::OpenMetrics) => vec![format!("{name}_total")],
            ("histogram", _) => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{name}{s}"))
                .collect(),
            _ => vec![name.to_string()],
        };
        assert!(
            names.iter().any(|n| n == sample),
            "`{line}` under # TYPE {name} {kind}"
        );
    }
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

    // Without a preference (curl, a test): Prometheus' text format 0.0.4.
    let resp = gw
        .request(Method::GET, "/_ccgate/metrics", &[], Bytes::new())
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = resp.text();
    assert!(
        !text.contains("# EOF"),
        "no OpenMetrics terminator in 0.0.4"
    );
    every_sample_has_its_family_declared(&text, Format::Prometheus);
    let m = parse(&text);

    // A scraper that asks for OpenMetrics (as Prometheus does) gets it, with the same samples.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let resp = gw
        .request(
            Method::GET,
            "/_ccgate/metrics",
            &[("accept", accept)],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        resp.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let open_metrics = resp.text();
    assert!(
        open_metrics.ends_with("\n# EOF\n"),
        "OpenMetrics terminator"
    );
    assert_eq!(open_metrics.matches("# EOF").count(), 1);
    every_sample_has_its_family_declared(&open_metrics, Format::OpenMetrics);
    let same = parse(&open_metrics);
    let moving = |k: &String| k.contains("uptime") || k.contains("_seconds");
    assert_eq!(
        m.iter().filter(|(k, _)| !moving(k)).collect::<Vec<_>>(),
        same.iter().filter(|(k, _)| !moving(k)).collect::<Vec<_>>(),
    );

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
