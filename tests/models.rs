//! Model-aware routing through the real server: an endpoint's `models` globs decide whether it is
//! a candidate at all, so a request never reaches (or fails over to) an endpoint that does not
//! serve its model, and a model nobody serves is answered locally, touching no endpoint.

mod support;

use serde_json::json;
use support::gateway::GatewayBuilder;
use support::mock::{MockUpstream, Script};

fn body(model: &str, stream: bool) -> serde_json::Value {
    json!({
        "model": model,
        "max_tokens": 16,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_only_to_endpoints_that_serve_their_model() {
    let official = MockUpstream::start().await;
    let relay = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint(
            "official",
            &official.url(),
            "priority = 2\nmodels = [\"claude-opus-*\"]",
        )
        .endpoint(
            "relay",
            &relay.url(),
            "priority = 1\nmodels = [\"claude-sonnet-*\", \"claude-haiku-*\"]",
        )
        .start()
        .await;

    // Each model reaches only its endpoint, whatever the priorities say.
    for _ in 0..3 {
        let a = gw
            .post("/v1/messages", &[], &body("claude-opus-4-1", false))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.header("x-ccgate-endpoint"), Some("official"));
        let a = gw
            .post("/v1/messages", &[], &body("claude-haiku-4-5", false))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.header("x-ccgate-endpoint"), Some("relay"));
    }
    assert_eq!(official.received().len(), 3);
    assert_eq!(relay.received().len(), 3);

    // The relay fails: a sonnet request must not fail over to the endpoint that does not serve
    // sonnet; the client gets the relay's failure, the official endpoint sees nothing.
    relay.push(Script::overloaded());
    let a = gw
        .post("/v1/messages", &[], &body("claude-sonnet-4-5", false))
        .await;
    assert_ne!(a.status, 200, "{}", a.text());
    assert_eq!(official.received().len(), 3, "official must not see sonnet");
    assert_eq!(relay.received().len(), 4);

    // A model no endpoint serves: a local 404 naming it, no endpoint touched, a caller error.
    let a = gw.post("/v1/messages", &[], &body("gpt-4o", true)).await;
    assert_eq!(a.status, 404, "{}", a.text());
    let v = a.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("`gpt-4o`"),
        "{v}"
    );
    assert_eq!(official.received().len(), 3);
    assert_eq!(relay.received().len(), 4);

    // A request without a model (say `GET /v1/models`) is not restricted.
    let a = gw
        .request(http::Method::GET, "/v1/models", &[], bytes::Bytes::new())
        .await;
    assert_eq!(a.status, 200, "{}", a.text());

    gw.settle().await;
    let official_view = gw.endpoint_view("official").await;
    let relay_view = gw.endpoint_view("relay").await;
    assert_eq!(official_view["models"], json!(["claude-opus-*"]));
    assert_eq!(
        relay_view["models"],
        json!(["claude-sonnet-*", "claude-haiku-*"])
    );
    let total = official_view["total_requests"].as_u64().unwrap_or(0)
        + relay_view["total_requests"].as_u64().unwrap_or(0);
    assert_eq!(
        total,
        (official.received().len() + relay.received().len()) as u64
    );
    let stats = gw.admin("stats").await;
    assert_eq!(stats["caller_errors"], 1, "{stats}");
    gw.shutdown().await;
}

/// A model whose only endpoint is switched off is not a wrong request (a 404, which Claude Code
/// gives up on at once): nothing is available for it now, and the client is told to come back
/// (audit: it got a fatal 404, counted as its own error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_endpoints_are_switched_off_is_unavailable_not_unknown() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint(
            "a",
            &a.url(),
            "models = [\"claude-opus-*\"]\nenabled = false",
        )
        .endpoint("b", &b.url(), "models = [\"claude-haiku-*\"]")
        .start()
        .await;
    let r = gw
        .post("/v1/messages", &[], &body("claude-opus-4-1", false))
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.header("retry-after"),
        Some(
            ccgate::health::registry::RETRY_WHEN_ALL_OFF_SECS
                .to_string()
                .as_str()
        ),
        "nothing switched on comes back by itself"
    );
    assert!(a.received().is_empty() && b.received().is_empty());
    // A model no endpoint serves at all is still the request's own error.
    let r = gw.post("/v1/messages", &[], &body("gpt-4o", false)).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let stats = gw.admin("stats").await;
    assert_eq!(stats["caller_errors"], 1, "{stats}");
    assert_eq!(stats["upstream_errors"], 1, "{stats}");
    gw.shutdown().await;
}

/// The all-down answer's `retry-after` counts only the endpoints that serve the request's model
/// (audit: a healthy endpoint for another model made it 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_counts_only_the_endpoints_that_serve_the_model() {
    let opus = MockUpstream::start().await;
    let x = MockUpstream::start().await;
    x.set_default(Script::error(500, "api_error", "down"));
    let gw = GatewayBuilder::new()
        .health("failure_threshold = 1")
        .health("probe_interval = \"60s\"")
        .endpoint("opus", &opus.url(), "models = [\"claude-opus-*\"]")
        .endpoint("xonly", &x.url(), "models = [\"claude-x*\"]")
        .start()
        .await;
    let first = gw.post("/v1/messages", &[], &body("claude-x", false)).await;
    assert_eq!(first.status, 502, "{}", first.text());
    gw.settle().await;
    let r = gw.post("/v1/messages", &[], &body("claude-x", false)).await;
    assert!(r.status == 502 || r.status == 503, "{}", r.text());
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a retry-after");
    assert!(
        (45..=75).contains(&wait),
        "xonly's next probe is a minute (jittered by a fifth) away: {wait}"
    );
    assert!(opus.received().is_empty());
    gw.shutdown().await;
}

/// A session's binding is per model, as the prompt cache is: a Haiku request served by another
/// endpoint (the preferred one leaves Haiku out) does not move the session's Sonnet traffic off
/// the preferred endpoint, whichever model came first (audit: one Haiku request moved the whole
/// session to the second-priority endpoint for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_model_does_not_move_the_session() {
    let official = MockUpstream::start().await;
    let relay = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint(
            "official",
            &official.url(),
            "priority = 1\nmodels = [\"claude-sonnet-*\", \"claude-opus-*\"]",
        )
        .endpoint("relay", &relay.url(), "priority = 2")
        .start()
        .await;
    for (session, models) in [
        (
            "s1",
            ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-sonnet-4-5"],
        ),
        (
            "s2",
            ["claude-haiku-4-5", "claude-sonnet-4-5", "claude-sonnet-4-5"],
        ),
    ] {
        for model in models {
            let r = gw
                .post(
                    "/v1/messages",
                    &[("x-claude-code-session-id", session)],
                    &body(model, false),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let want = if model.contains("haiku") {
                "relay"
            } else {
                "official"
            };
            assert_eq!(
                r.header("x-ccgate-endpoint"),
                Some(want),
                "{session} {model}"
            );
        }
    }
}
/// Where endpoints route by model, a body that names `model` twice is one request for the last of
/// them, as a JSON parser upstream reads it: routed by it, and recorded with it in the request log
/// (audit: the log read the first, while routing read the last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_model_is_routed_and_recorded_as_the_last_one() {
    let opus = MockUpstream::start().await;
    let haiku = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint(
            "opus",
            &opus.url(),
            "priority = 1\nmodels = [\"claude-opus-*\"]",
        )
        .endpoint(
            "haiku",
            &haiku.url(),
            "priority = 2\nmodels = [\"claude-haiku-*\"]",
        )
        .start()
        .await;
    for (body, last, want) in [
        (
            r#"{"model":"claude-opus-4-1","max_tokens":16,"messages":[{"role":"user","content":"hi"}],"model":"claude-haiku-4-5"}"#,
            "claude-haiku-4-5",
            "haiku",
        ),
        (
            r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}],"mod\u0065l":"claude-opus-4-1"}"#,
            "claude-opus-4-1",
            "opus",
        ),
    ] {
        let r = gw
            .request(
                http::Method::POST,
                "/v1/messages",
                &[
                    ("content-type", "application/json"),
                    ("anthropic-version", "2023-06-01"),
                ],
                bytes::Bytes::from_static(body.as_bytes()),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ccgate-endpoint"), Some(want), "{body}");
        let id = r
            .header("x-ccgate-request-id")
            .expect("request id")
            .to_string();
        let record = support::wait::eventually_some("the request's record", || async {
            let v = gw.admin("requests?limit=1").await;
            let record = v["requests"][0].clone();
            (record["request_id"] == id.as_str()).then_some(record)
        })
        .await;
        assert_eq!(record["model"], last, "{record}");
        assert_eq!(record["endpoint"], want, "{record}");
    }
    let upstream = haiku
        .last_request()
        .and_then(|r| r.json())
        .expect("a JSON body");
    assert_eq!(
        upstream["model"], "claude-haiku-4-5",
        "a parser reads the last one"
    );
    assert_eq!(opus.count(), 1);
    assert_eq!(haiku.count(), 1);
    gw.shutdown().await;
}
