//! Admin surface details: cross-site browser requests cannot switch endpoints, and the recent
//! failovers view records what happened.

mod support;

use bytes::Bytes;
use http::Method;
use support::gateway::{GatewayBuilder, TestGateway};
use support::mock::{MockUpstream, Script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_form_cannot_disable_an_endpoint() {
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let host = gw.addr.to_string();
    let evil = gw
        .request(
            Method::POST,
            "/_ccgate/endpoints/a/disable",
            &[("origin", "https://evil.example"), ("host", &host)],
            Bytes::new(),
        )
        .await;
    assert_eq!(evil.status, 403, "{}", evil.text());
    let fetch_meta = gw
        .request(
            Method::POST,
            "/_ccgate/endpoints/a/disable",
            &[("sec-fetch-site", "cross-site")],
            Bytes::new(),
        )
        .await;
    assert_eq!(fetch_meta.status, 403);
    assert_eq!(gw.endpoint_view("a").await["state"], "healthy");
    // The dashboard's own requests (same origin) and plain clients (no origin) work.
    let same = gw
        .request(
            Method::POST,
            "/_ccgate/endpoints/a/disable",
            &[("origin", &format!("http://{host}")), ("host", &host)],
            Bytes::new(),
        )
        .await;
    assert_eq!(same.status, 200, "{}", same.text());
    assert_eq!(gw.endpoint_view("a").await["state"], "disabled");
    let plain = gw
        .request(
            Method::POST,
            "/_ccgate/endpoints/a/enable",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(plain.status, 200);
    assert_eq!(gw.endpoint_view("a").await["state"], "healthy");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_are_listed_newest_first_with_request_ids() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    a.push(Script::error(500, "api_error", "boom"));
    let gw = GatewayBuilder::new()
        .endpoint("a", &a.url(), "")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;
    let first = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(first.status, 200);
    let id = first
        .header("x-ccgate-request-id")
        .expect("request id")
        .to_string();
    assert!(id.starts_with("req_"), "{id}");
    let quiet = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_ne!(
        quiet.header("x-ccgate-request-id"),
        Some(id.as_str()),
        "ids are per request"
    );
    let events = gw.admin("events").await;
    let list = events["failovers"].as_array().expect("list");
    assert_eq!(list.len(), 1, "only the request that failed over: {events}");
    assert_eq!(list[0]["request_id"], id.as_str());
    assert_eq!(list[0]["served_by"], "b");
    assert_eq!(list[0]["status"], 200);
    assert_eq!(list[0]["failed"][0]["endpoint"], "a");
    assert_eq!(list[0]["failed"][0]["outcome"], "server_error");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_token_is_accepted_in_either_header_next_to_another_key() {
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .server("access_token = \"gate-token\"")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    // Claude Code with both ANTHROPIC_API_KEY and ANTHROPIC_AUTH_TOKEN set sends both headers.
    let both = gw
        .post(
            "/v1/messages",
            &[
                ("x-api-key", "sk-users-own-key"),
                ("authorization", "Bearer gate-token"),
            ],
            &TestGateway::message_body(false),
        )
        .await;
    assert_eq!(both.status, 200, "{}", both.text());
    let received = up.received();
    assert_eq!(
        received[0].header("x-api-key"),
        Some("key-a"),
        "neither client credential is forwarded"
    );
    assert_eq!(received[0].header("authorization"), None);
    let wrong = gw
        .post(
            "/v1/messages",
            &[
                ("x-api-key", "sk-users-own-key"),
                ("authorization", "Bearer nope"),
            ],
            &TestGateway::message_body(false),
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(up.count(), 1);
    gw.shutdown().await;
}

/// Two mocks behind a gateway that tries `a` first, then `b`, and ejects neither.
async fn a_then_b() -> (MockUpstream, MockUpstream, TestGateway) {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .health("failure_threshold = 100")
        .endpoint("a", &a.url(), "priority = 1")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;
    (a, b, gw)
}

/// Sends `body` as a client that leaves once `b` has its request (one more than it had).
async fn leave_once_b_has_it(gw: &TestGateway, b: &MockUpstream, body: &serde_json::Value) {
    let before = b.count();
    let client = support::gateway::http_client();
    let req = http::Request::post(gw.url("/v1/messages"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let leaving = tokio::spawn(async move { client.request(req).await.map(|_| ()) });
    b.wait_requests(before + 1).await;
    leaving.abort();
}

/// What the operator is shown of requests that did not end in a relayed success: a request the
/// client left mid-attempt names the endpoint it was on and its attempts; a failover that ends
/// in the caller's own error is in the failover ring; ccgate's own all-down answer says how many
/// attempts it made (audit: `endpoint: null, attempts: 0`, no ring entry, no header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_did_not_succeed_are_shown_as_they_went() {
    let (a, b, gw) = a_then_b().await;
    let body = TestGateway::message_body(false);

    // a fails, b answers the caller's error: relayed, and in the ring.
    a.push(Script::error(500, "api_error", "boom"));
    b.push(Script::error(400, "invalid_request_error", "bad"));
    let r = gw.post("/v1/messages", &[], &body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let id = r.header("x-ccgate-request-id").expect("id").to_string();
    let events = gw.admin("events").await;
    let list = events["failovers"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{events}");
    assert_eq!(list[0]["request_id"], id.as_str());
    assert_eq!(list[0]["served_by"], "b");
    assert_eq!(list[0]["status"], 400);

    // Both fail: ccgate's own answer says two attempts.
    a.push(Script::error(500, "api_error", "boom"));
    b.push(Script::error(500, "api_error", "boom"));
    let r = gw.post("/v1/messages", &[], &body).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-ccgate-attempts"), Some("2"));

    // a fails, the client leaves while b is on it.
    a.push(Script::error(500, "api_error", "boom"));
    b.push(Script::stall_before_headers());
    leave_once_b_has_it(&gw, &b, &body).await;
    gw.settle().await;
    let v = gw.admin("requests?limit=1").await;
    let last = &v["requests"][0];
    assert_eq!(last["outcome"], "cancelled", "{v}");
    assert_eq!(last["endpoint"], "b", "{v}");
    assert_eq!(last["attempts"], 2, "{v}");
    gw.shutdown().await;
}

/// A client that leaves after its request failed over, while the next endpoint is still on it,
/// is in the failover ring: the failed attempt, served by none, with the "client closed request"
/// status (499). Recording it moves no counter: the failed attempt and the cancelled one are
/// each counted once, and the request once, as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_left_after_a_failover_is_in_the_failover_ring() {
    let (a, b, gw) = a_then_b().await;
    a.push(Script::error(500, "api_error", "boom"));
    b.push(Script::stall_before_headers());
    leave_once_b_has_it(&gw, &b, &TestGateway::message_body(false)).await;

    let list = support::wait::eventually_some("the left request in the failover ring", || async {
        let events = gw.admin("events").await;
        let list = events["failovers"].as_array().cloned().unwrap_or_default();
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(list.len(), 1, "{list:?}");
    let entry = &list[0];
    assert!(
        entry["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("req_")),
        "{entry}"
    );
    assert_eq!(entry["served_by"], serde_json::Value::Null, "{entry}");
    assert_eq!(entry["status"], 499, "{entry}");
    let failed = entry["failed"].as_array().expect("failed attempts");
    assert_eq!(failed.len(), 1, "{entry}");
    assert_eq!(failed[0]["endpoint"], "a");
    assert_eq!(failed[0]["outcome"], "server_error");

    gw.settle().await;
    let ea = gw.endpoint_view("a").await;
    assert_eq!(ea["total_requests"], 1, "{ea}");
    assert_eq!(ea["failed_requests"], 1, "{ea}");
    let eb = gw.endpoint_view("b").await;
    assert_eq!(eb["total_requests"], 1, "{eb}");
    assert_eq!(eb["cancelled"], 1, "{eb}");
    assert_eq!(eb["failed_requests"], 0, "{eb}");
    let stats = gw.admin("stats").await;
    assert_eq!(stats["total_requests"], 1, "{stats}");
    assert_eq!(stats["cancelled"], 1, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(a.count(), 1);
    assert_eq!(b.count(), 1);
    gw.shutdown().await;
}
