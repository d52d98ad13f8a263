//! The request path, tested through the real server over HTTP (issue #2's required list).
//!
//! * one test per row of SPEC §4's classification table (`row_*`): what the client gets, the
//!   endpoint's counters and outcome in `/_ccgate/endpoints`, and what each mock counted;
//! * failover order, never the same endpoint twice, `max_attempts`;
//! * header, query and body fidelity, `base_url` path prefixes, steering response headers;
//! * credential swap (`api_key`, `auth_token` and their `*_env` variants);
//! * the body cap, `HEAD /`, the access token;
//! * streaming: event by event (held by a [`Gate`]), early-stream failover, late-stream failure,
//!   client disconnects;
//! * all-down answers and a TLS upstream with its own CA.
//!
//! Nothing here sleeps to synchronise: tests wait on the mock (`wait_*`, [`Gate`]) or on
//! `TestGateway::settle`, each wait bounded by [`within`].

mod support;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::gateway::{Answer, GatewayBuilder, KINDS, TestGateway, failure_kinds};
use support::mock::{
    Gate, MOCK_MODEL, MockUpstream, Script, SseEvent, anthropic_message, sse_delta_text,
};
use support::port::ClosedPort;
use support::wait::within;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A builder whose background prober stays quiet for the length of a test, so the mocks see only
/// the requests the test sends.
fn builder() -> GatewayBuilder {
    GatewayBuilder::new()
        .health("probe_interval = \"1h\"")
        .health("probe_max_interval = \"1h\"")
}

/// The exact body of [`Script::json_ok`].
fn json_ok_bytes() -> Bytes {
    Bytes::from(anthropic_message(MOCK_MODEL, "Hello from the mock", 10, 5).to_string())
}

/// The exact bytes of a list of events.
fn event_bytes(events: &[SseEvent]) -> Vec<u8> {
    events.iter().flat_map(|e| e.as_bytes().to_vec()).collect()
}

/// The exact bytes of [`Script::sse_ok`]`(n)`.
fn sse_ok_bytes(n: usize) -> Vec<u8> {
    event_bytes(&SseEvent::message_stream(n))
}

/// Splits an SSE text into `(event name, data JSON)` pairs.
fn parse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|c| !c.trim().is_empty())
        .map(|chunk| {
            let mut name = String::new();
            let mut data = String::new();
            for line in chunk.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            let data = serde_json::from_str(&data).unwrap_or(Value::Null);
            (name, data)
        })
        .collect()
}

/// Asserts the endpoint view's outcome counters are exactly `want` (every other kind zero) and
/// that its totals agree with them, with nothing in flight.
fn assert_outcomes(v: &Value, want: &[(&str, u64)]) {
    let name = &v["name"];
    let get = |k: &str| want.iter().find(|(n, _)| *n == k).map_or(0, |(_, c)| *c);
    for (k, _) in want {
        assert!(KINDS.contains(k), "unknown outcome kind {k}");
    }
    let outcomes = v["outcomes"].as_object().expect("outcomes is a map");
    for k in KINDS {
        assert_eq!(
            outcomes.get(k).and_then(Value::as_u64),
            Some(get(k)),
            "endpoint {name}: outcomes.{k}\n{v:#}"
        );
    }
    let success = get("success");
    let caller = get("caller_error");
    let cancelled = get("cancelled");
    let failed: u64 = failure_kinds().map(get).sum();
    let total = success + caller + cancelled + failed;
    let field = |f: &str| {
        v[f].as_u64()
            .unwrap_or_else(|| panic!("{f} missing: {v:#}"))
    };
    assert_eq!(
        field("total_requests"),
        total,
        "endpoint {name}: total\n{v:#}"
    );
    assert_eq!(
        field("successful_requests"),
        success,
        "endpoint {name}\n{v:#}"
    );
    assert_eq!(
        field("failed_requests"),
        failed + caller,
        "endpoint {name}\n{v:#}"
    );
    assert_eq!(field("endpoint_errors"), failed, "endpoint {name}\n{v:#}");
    assert_eq!(field("caller_errors"), caller, "endpoint {name}\n{v:#}");
    assert_eq!(field("cancelled"), cancelled, "endpoint {name}\n{v:#}");
    assert_eq!(field("in_flight"), 0, "endpoint {name}\n{v:#}");
}

/// Asserts an endpoint saw no fault at all.
fn assert_clean(v: &Value) {
    assert_eq!(v["consecutive_failures"], 0, "{v:#}");
    assert_eq!(v["last_error"], Value::Null, "{v:#}");
    assert_eq!(v["state"], "healthy", "{v:#}");
}

/// Asserts an answer is an Anthropic-shaped error of type `ty`.
fn assert_anthropic_error(a: &Answer, ty: &str) {
    assert_eq!(a.header("content-type"), Some("application/json"), "{a:?}");
    let v = a.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], ty, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// Asserts a success served by `endpoint` after `attempts` attempts (the gateway's headers).
#[track_caller]
fn assert_served_by(ans: &Answer, endpoint: &str, attempts: &str) {
    assert_eq!(ans.status, 200, "{}", ans.text());
    assert_eq!(ans.header("x-ccgate-endpoint"), Some(endpoint), "{ans:?}");
    assert_eq!(ans.header("x-ccgate-attempts"), Some(attempts), "{ans:?}");
}

/// A streamed response read frame by frame.
struct Streamed {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Incoming,
    buf: Vec<u8>,
}

impl Streamed {
    async fn post(gw: &TestGateway, body: &Value) -> Self {
        let resp = within(
            "response headers",
            gw.send(
                Method::POST,
                "/v1/messages",
                &[
                    ("content-type", "application/json"),
                    ("anthropic-version", "2023-06-01"),
                ],
                Bytes::from(body.to_string()),
            ),
        )
        .await;
        let (parts, body) = resp.into_parts();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
            buf: Vec::new(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Reads until the received text contains `needle`.
    async fn read_until(&mut self, needle: &str) {
        let what = format!("{needle:?}");
        let fut = async {
            while !self.text().contains(needle) {
                self.data_frame(&what).await;
            }
        };
        within(&format!("{what} on the client stream"), fut).await;
    }

    /// The next data frame the client receives (kept in the text too).
    async fn next_data(&mut self) -> Bytes {
        within(
            "a data frame on the client stream",
            self.data_frame("a data frame"),
        )
        .await
    }

    /// The next data frame, added to the text; panics, naming `what` it waited for, when the
    /// stream breaks or ends first.
    async fn data_frame(&mut self, what: &str) -> Bytes {
        loop {
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        return data;
                    }
                }
                Some(Err(e)) => panic!("stream broke before {what}: {e}\n{}", self.text()),
                None => panic!("stream ended before {what}:\n{}", self.text()),
            }
        }
    }

    /// Reads to the end of the body.
    async fn read_to_end(&mut self) -> String {
        let fut = async {
            while let Some(frame) = self.body.frame().await {
                let frame = frame.unwrap_or_else(|e| panic!("stream broke: {e}\n{}", self.text()));
                if let Ok(data) = frame.into_data() {
                    self.buf.extend_from_slice(&data);
                }
            }
        };
        within("the end of the client stream", fut).await;
        self.text()
    }
}

/// `a` at priority 1 and `b` at priority 2, both plain-HTTP mocks answering JSON by default.
struct Duo {
    a: MockUpstream,
    b: MockUpstream,
    gw: TestGateway,
}

impl Duo {
    async fn start(gb: GatewayBuilder) -> Self {
        let a = MockUpstream::start().await;
        let b = MockUpstream::start().await;
        let gw = gb
            .endpoint("a", &a.url(), "priority = 1")
            .endpoint("b", &b.url(), "priority = 2")
            .start()
            .await;
        Self { a, b, gw }
    }

    async fn post(&self, body: &Value) -> Answer {
        within("an answer", self.gw.post("/v1/messages", &[], body)).await
    }

    /// Sends one request that `a` fails with `script` and `b` serves; checks the client got b's
    /// answer, b recorded one success and `a` exactly one `kind`; returns a's view.
    async fn fails_over(&self, script: Script, kind: &str) -> Value {
        self.a.push(script);
        let ans = self.post(&TestGateway::message_body(false)).await;
        assert_served_by(&ans, "b", "2");
        assert_eq!(
            ans.body,
            json_ok_bytes(),
            "the client gets b's answer unchanged"
        );
        self.gw.settle().await;
        assert_eq!(self.a.count(), 1, "a is tried once");
        assert_eq!(self.b.count(), 1, "b serves the failover");
        let b = self.gw.endpoint_view("b").await;
        assert_outcomes(&b, &[("success", 1)]);
        assert_clean(&b);
        let a = self.gw.endpoint_view("a").await;
        assert_outcomes(&a, &[(kind, 1)]);
        assert_eq!(a["consecutive_failures"], 1, "{a:#}");
        assert_eq!(a["last_error"]["kind"], kind, "{a:#}");
        a
    }
}

/// A fresh [`Duo`] whose `a` fails one request with an HTTP `status` error (`ty`, `message`) that
/// must count as `kind` ([`Duo::fails_over`]) and leave `a` degraded, one failure being below the
/// threshold; returns the duo and a's view.
async fn status_fails_over(status: u16, ty: &str, message: &str, kind: &str) -> (Duo, Value) {
    let d = Duo::start(builder()).await;
    let a = d.fails_over(Script::error(status, ty, message), kind).await;
    assert_eq!(
        a["state"], "degraded",
        "{status}: one failure is below the threshold\n{a:#}"
    );
    (d, a)
}

// ---------------------------------------------------------------------------------------------
// SPEC §4, one test per row
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_success_json_and_stream_are_relayed_byte_for_byte() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;

    let ans = gw.post_message(false).await;
    assert_eq!(ans.status, 200, "{}", ans.text());
    assert_eq!(ans.body, json_ok_bytes());
    assert_eq!(ans.header("x-ccgate-endpoint"), Some("a"));
    assert_eq!(ans.header("x-ccgate-attempts"), Some("1"));

    up.push(Script::sse_ok(3));
    let ans = gw.post_message(true).await;
    assert_eq!(ans.status, 200, "{}", ans.text());
    assert_eq!(ans.header("content-type"), Some("text/event-stream"));
    assert_eq!(
        ans.body,
        sse_ok_bytes(3),
        "the stream arrives byte for byte"
    );

    up.push(Script::json(201, &json!({"id": "batch_1"})));
    let ans = gw.post("/v1/messages/batches", &[], &json!({})).await;
    assert_eq!(ans.status, 201);
    assert_eq!(ans.body, json!({"id": "batch_1"}).to_string());

    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_outcomes(&v, &[("success", 3)]);
    assert_clean(&v);
    assert_eq!(v["success_rate"], 1.0);
    assert_eq!(up.count(), 3);
    assert_eq!(up.served("ok_json"), 1);
    assert_eq!(up.served("ok_sse"), 1);
    assert_eq!(up.peer_disconnects(), 0);
    let stats = gw.admin("stats").await;
    assert_eq!(stats["total_requests"], 3);
    assert_eq!(stats["successful_requests"], 3);
    assert_eq!(stats["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_auth_401_402_403_fail_over_and_disable_the_endpoint() {
    for (status, ty) in [
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
    ] {
        let a = MockUpstream::start().await;
        let b = MockUpstream::start().await;
        let gw = builder()
            .endpoint(
                "a",
                &a.url(),
                "api_key = \"sk-ant-secret-a1\"\npriority = 1",
            )
            .endpoint("b", &b.url(), "priority = 2")
            .start()
            .await;
        // Some relays echo the credential they refused.
        a.push(Script::error(
            status,
            ty,
            "invalid x-api-key sk-ant-secret-a1",
        ));
        let ans = gw.post_message(false).await;
        assert_eq!(ans.status, 200, "{status}: {}", ans.text());
        assert_eq!(ans.header("x-ccgate-endpoint"), Some("b"));
        assert_eq!(ans.body, json_ok_bytes());
        gw.settle().await;
        let v = gw.endpoint_view("a").await;
        assert_outcomes(&v, &[("auth", 1)]);
        assert_eq!(v["state"], "disabled", "{status}: {v:#}");
        assert_eq!(v["last_error"]["kind"], "auth");
        let msg = v["last_error"]["message"].as_str().expect("message");
        assert!(msg.contains(&status.to_string()), "{msg}");
        let all = gw
            .request(Method::GET, "/_ccgate/endpoints", &[], Bytes::new())
            .await;
        assert!(
            !all.text().contains("sk-ant-secret-a1"),
            "the secret leaked into the view: {}",
            all.text()
        );

        // Disabled: the next request does not touch it.
        let ans = gw.post_message(false).await;
        assert_served_by(&ans, "b", "1");
        gw.settle().await;
        assert_eq!(
            a.count(),
            1,
            "{status}: a disabled endpoint gets no traffic"
        );
        assert_eq!(b.count(), 2);
        assert_outcomes(&gw.endpoint_view("a").await, &[("auth", 1)]);
        assert_outcomes(&gw.endpoint_view("b").await, &[("success", 2)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_408_is_a_timeout_and_fails_over() {
    let (d, _) = status_fails_over(408, "timeout_error", "Request timed out", "timeout").await;
    assert_eq!(d.a.served("status_408"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_429_rate_limited_cools_down_for_retry_after() {
    let d = Duo::start(builder().health("rate_limit_cooldown = \"45s\"")).await;
    let a = d
        .fails_over(Script::rate_limited(120), "rate_limited")
        .await;
    assert_eq!(a["state"], "cooling_down", "{a:#}");
    let until = a["cooldown_until"].as_str().expect("cooldown_until");
    let until = humantime::parse_rfc3339_weak(until).expect("RFC 3339");
    let left = until
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(
        left > Duration::from_secs(100) && left <= Duration::from_secs(121),
        "cooldown follows retry-after: 120 s, got {left:?}"
    );
    // Cooling down: no traffic until the cooldown ends.
    let ans = d.post(&TestGateway::message_body(false)).await;
    assert_eq!(ans.header("x-ccgate-endpoint"), Some("b"));
    assert_eq!(d.a.count(), 1);

    // Without retry-after, the configured default cooldown applies.
    let d = Duo::start(builder().health("rate_limit_cooldown = \"45s\"")).await;
    let a = d
        .fails_over(
            Script::error(429, "rate_limit_error", "slow down"),
            "rate_limited",
        )
        .await;
    assert_eq!(a["state"], "cooling_down");
    let until = humantime::parse_rfc3339_weak(a["cooldown_until"].as_str().expect("until"))
        .expect("RFC 3339");
    let left = until
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(
        left > Duration::from_secs(30) && left <= Duration::from_secs(46),
        "default cooldown 45 s, got {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_server_errors_fail_over() {
    for status in [500, 502, 504] {
        let (_d, a) = status_fails_over(status, "api_error", "Internal", "server_error").await;
        let msg = a["last_error"]["message"].as_str().expect("message");
        assert!(msg.contains(&format!("HTTP {status}")), "{msg}");
    }

    // failure_threshold consecutive failures eject the endpoint; then it gets no traffic.
    let d = Duo::start(builder().health("failure_threshold = 2")).await;
    d.a.set_default(Script::error(500, "api_error", "Internal"));
    for _ in 0..2 {
        let ans = d.post(&TestGateway::message_body(false)).await;
        assert_eq!(ans.header("x-ccgate-endpoint"), Some("b"));
    }
    let ans = d.post(&TestGateway::message_body(false)).await;
    assert_eq!(ans.header("x-ccgate-attempts"), Some("1"));
    d.gw.settle().await;
    assert_eq!(d.a.count(), 2, "an ejected endpoint gets no traffic");
    let a = d.gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("server_error", 2)]);
    assert_eq!(a["state"], "ejected");
    assert_eq!(a["consecutive_failures"], 2);
    assert_outcomes(&d.gw.endpoint_view("b").await, &[("success", 3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_overloaded_503_529_fail_over() {
    for status in [503, 529] {
        let (d, _) =
            status_fails_over(status, "overloaded_error", "Overloaded", "overloaded").await;
        assert_eq!(d.a.served(&format!("status_{status}")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_caller_errors_pass_through_untouched_and_do_not_fail_over() {
    let d = Duo::start(builder()).await;
    let cases = [
        (400, "invalid_request_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
    ];
    for (i, (status, ty)) in cases.iter().enumerate() {
        // Odd spacing and key order: the bytes must come back exactly.
        let body = format!(
            "{{ \"type\":\"error\",  \"error\": {{\"message\": \"prompt is too long: {i}\", \"type\": \"{ty}\"}} }}"
        );
        let request_id = format!("req_011CQ{i}x");
        d.a.push(
            Script::response(*status, "application/json", body.clone())
                .header("request-id", &request_id)
                .header("x-should-retry", "false")
                .header("x-custom-upstream", "kept"),
        );
        let ans = d.post(&TestGateway::message_body(i % 2 == 0)).await;
        assert_eq!(ans.status.as_u16(), *status, "{}", ans.text());
        assert_eq!(ans.body, body.as_bytes(), "{status}: body byte for byte");
        assert_eq!(ans.header("request-id"), Some(request_id.as_str()));
        assert_eq!(ans.header("x-should-retry"), Some("false"));
        assert_eq!(ans.header("x-custom-upstream"), Some("kept"));
        assert_eq!(ans.header("content-type"), Some("application/json"));
        assert_eq!(ans.header("x-ccgate-endpoint"), Some("a"));
    }
    d.gw.settle().await;
    assert_eq!(d.a.count(), 5);
    assert_eq!(d.b.count(), 0, "caller errors are never failed over");
    let a = d.gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("caller_error", 5)]);
    assert_clean(&a);
    assert_eq!(
        a["success_rate"], 1.0,
        "caller errors are not the endpoint's fault"
    );
    assert_outcomes(&d.gw.endpoint_view("b").await, &[]);
    let stats = d.gw.admin("stats").await;
    assert_eq!(stats["caller_errors"], 5, "{stats:#}");
    assert_eq!(stats["upstream_errors"], 0, "{stats:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_connect_refused_fails_over() {
    let b = MockUpstream::start().await;
    // Held for the whole test, so nothing else can start listening there meanwhile.
    let closed = ClosedPort::new();
    let gw = builder()
        .endpoint("a", &closed.url(), "priority = 1")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;
    let ans = gw.post_message(false).await;
    assert_served_by(&ans, "b", "2");
    gw.settle().await;
    let a = gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("transport", 1)]);
    assert_eq!(a["last_error"]["kind"], "transport");
    assert_eq!(a["consecutive_failures"], 1);
    assert_eq!(b.count(), 1);
    assert_outcomes(&gw.endpoint_view("b").await, &[("success", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_stall_before_headers_is_a_first_byte_timeout() {
    let d = Duo::start(builder().timeouts("first_byte = \"500ms\"")).await;
    let a = d
        .fails_over(Script::stall_before_headers(), "timeout")
        .await;
    let msg = a["last_error"]["message"].as_str().expect("message");
    assert!(msg.contains("500ms"), "{msg}");
    assert_eq!(d.a.served("stall"), 1);
    // ccgate abandoned the stalled attempt: the upstream saw the connection go away.
    within("a's peer disconnect", d.a.wait_peer_disconnects(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_reset_or_close_before_headers_fails_over() {
    let d = Duo::start(builder()).await;
    d.fails_over(Script::reset_before_headers(), "transport")
        .await;
    assert_eq!(d.a.served("reset"), 1);

    d.a.push(Script::close_before_headers());
    let ans = d.post(&TestGateway::message_body(false)).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.header("x-ccgate-endpoint"), Some("b"));
    d.gw.settle().await;
    assert_eq!(d.a.served("close"), 1);
    let a = d.gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("transport", 2)]);
    assert_eq!(a["consecutive_failures"], 2);
    assert_outcomes(&d.gw.endpoint_view("b").await, &[("success", 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_cut_mid_stream_ends_the_client_stream_with_an_error_event() {
    let d = Duo::start(builder()).await;
    // Cut after two text deltas: bytes already reached the client, so no failover.
    d.a.push(Script::sse_ok(4).cut_after(5));
    let ans = d.post(&TestGateway::message_body(true)).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.header("x-ccgate-endpoint"), Some("a"));
    let relayed = event_bytes(&SseEvent::message_stream(4)[..5]);
    assert!(
        ans.body.starts_with(&relayed),
        "the first five events are relayed unchanged:\n{}",
        ans.text()
    );
    let tail = String::from_utf8_lossy(&ans.body[relayed.len()..]).into_owned();
    let tail = parse_events(&tail);
    assert_eq!(tail.len(), 1, "exactly one event after the cut: {tail:?}");
    assert_eq!(tail[0].0, "error");
    assert_eq!(tail[0].1["type"], "error");
    assert_eq!(tail[0].1["error"]["type"], "api_error");
    assert!(!ans.text().contains("message_stop"));

    d.gw.settle().await;
    assert_eq!(d.b.count(), 0, "no failover after bytes reached the client");
    let a = d.gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("transport", 1)]);
    assert_eq!(a["last_error"]["kind"], "transport");
    assert_eq!(d.a.served("sse_cut"), 1);

    // A JSON body cut short is read whole before anything is relayed (issue #12 item 1): a
    // transport fault of A, and B answers in full.
    d.a.push(Script::json_ok().cut_body_after(20));
    let ans = d.post(&TestGateway::message_body(false)).await;
    assert_eq!(ans.status, 200, "{}", ans.text());
    assert_eq!(ans.header("x-ccgate-endpoint"), Some("b"));
    assert_eq!(ans.json()["type"], "message");
    d.gw.settle().await;
    assert_outcomes(&d.gw.endpoint_view("a").await, &[("transport", 2)]);
    assert_eq!(d.b.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_stream_idle_too_long_is_a_timeout() {
    let d = Duo::start(builder().timeouts("idle = \"500ms\"")).await;
    d.a.push(Script::sse_ok(4).stall_after(4));
    let ans = d.post(&TestGateway::message_body(true)).await;
    assert_eq!(ans.status, 200);
    let events = parse_events(&ans.text());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(events[4].1["error"]["type"], "api_error");
    within("a's peer disconnect", d.a.wait_peer_disconnects(1)).await;
    d.gw.settle().await;
    let a = d.gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("timeout", 1)]);
    assert_eq!(a["last_error"]["kind"], "timeout");
    assert_eq!(d.b.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_gaps_stay_under_the_idle_timeout_is_never_cut() {
    // Each gap (150 ms) is well under the idle timeout (600 ms) while the whole stream (~1.6 s)
    // is well over it: the timeout runs from the last event, not from the first wait.
    let d = Duo::start(builder().timeouts("idle = \"600ms\"")).await;
    d.a.push(Script::sse_ok(6).pacing(Duration::from_millis(150)));
    let ans = d.post(&TestGateway::message_body(true)).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, sse_ok_bytes(6), "{}", ans.text());
    d.gw.settle().await;
    assert_outcomes(&d.gw.endpoint_view("a").await, &[("success", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_sse_error_event_before_content_fails_over() {
    // (error position, error type, outcome): right after message_start, and after the preamble
    // (message_start, content_block_start, ping) but before any text.
    for (k, ty, kind) in [
        (1, "overloaded_error", "overloaded"),
        (1, "api_error", "server_error"),
        (3, "overloaded_error", "overloaded"),
    ] {
        let d = Duo::start(builder()).await;
        d.a.push(Script::sse_ok(3).error_event_after(k, ty));
        d.b.push(Script::sse_ok(3));
        let ans = d.post(&TestGateway::message_body(true)).await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.header("x-ccgate-endpoint"), Some("b"), "{k} {ty}");
        assert_eq!(
            ans.body,
            sse_ok_bytes(3),
            "after {k} events + {ty}: the client sees b's stream alone, byte for byte:\n{}",
            ans.text()
        );
        d.gw.settle().await;
        let a = d.gw.endpoint_view("a").await;
        assert_outcomes(&a, &[(kind, 1)]);
        assert_eq!(a["last_error"]["kind"], kind);
        assert_outcomes(&d.gw.endpoint_view("b").await, &[("success", 1)]);
        assert_eq!((d.a.served("sse_error"), d.b.served("ok_sse")), (1, 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_sse_error_event_after_content_is_relayed_and_counted() {
    let d = Duo::start(builder()).await;
    d.a.push(Script::sse_ok(4).error_event_after(5, "overloaded_error"));
    let ans = d.post(&TestGateway::message_body(true)).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.header("x-ccgate-endpoint"), Some("a"));
    let mut want = SseEvent::message_stream(4)[..5].to_vec();
    want.push(SseEvent::error("overloaded_error", "Overloaded"));
    assert_eq!(
        ans.body,
        event_bytes(&want),
        "the upstream's own error event ends the client stream:\n{}",
        ans.text()
    );
    d.gw.settle().await;
    assert_eq!(d.b.count(), 0);
    let a = d.gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("overloaded", 1)]);
    assert_eq!(a["last_error"]["kind"], "overloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_client_disconnect_cancels_the_upstream_attempt() {
    let d = Duo::start(builder()).await;
    let gate = Gate::new();
    d.a.push(Script::sse_ok(3).gate_after(4, gate.clone()));
    let mut s = Streamed::post(&d.gw, &TestGateway::message_body(true)).await;
    assert_eq!(s.status, 200);
    s.read_until(&sse_delta_text(0)).await;
    within("the stream to reach the gate", gate.wait_arrived(1)).await;
    drop(s);
    within("a's peer disconnect", d.a.wait_peer_disconnects(1)).await;
    d.gw.settle().await;
    let a = d.gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("cancelled", 1)]);
    assert_clean(&a);
    assert_eq!(d.b.count(), 0, "a client that left is not failed over");
    let stats = d.gw.admin("stats").await;
    assert_eq!(stats["cancelled"], 1, "{stats:#}");
    assert_eq!(stats["in_flight"], 0, "{stats:#}");
    // The stream reached the gate once and was held there (never opened) when the client left.
    assert_eq!(gate.arrived(), 1);
}

// ---------------------------------------------------------------------------------------------
// Failover order
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_follows_priority_tiers() {
    let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let names = ["low", "mid1", "top", "mid2"];
    let priorities = [3, 2, 1, 2];
    let mut mocks = Vec::new();
    let mut gb = builder()
        .server("max_attempts = 4")
        .health("failure_threshold = 100");
    for (name, prio) in names.iter().zip(priorities) {
        let up = MockUpstream::start().await;
        let log = Arc::clone(&log);
        let name: &'static str = name;
        up.set_default_fn(move |_| {
            log.lock().expect("log").push(name);
            Script::overloaded()
        });
        gb = gb.endpoint(name, &up.url(), &format!("priority = {prio}"));
        mocks.push(up);
    }
    let gw = gb.start().await;
    for round in 0..2 {
        let ans = gw.post_message(false).await;
        assert_eq!(ans.status, 503, "{}", ans.text());
        let order: Vec<&str> = std::mem::take(&mut *log.lock().expect("log"));
        assert_eq!(order.len(), 4, "round {round}: {order:?}");
        assert_eq!(order[0], "top", "round {round}: {order:?}");
        let mut middle = order[1..3].to_vec();
        middle.sort_unstable();
        assert_eq!(middle, ["mid1", "mid2"], "round {round}: {order:?}");
        assert_eq!(order[3], "low", "round {round}: {order:?}");
    }
    for up in &mocks {
        assert_eq!(up.count(), 2, "one attempt per round");
    }

    // The first success ends the walk: lower tiers are never touched.
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let c = MockUpstream::start().await;
    a.set_default(Script::error(500, "api_error", "Internal"));
    let gw = builder()
        .endpoint("c", &c.url(), "priority = 3")
        .endpoint("b", &b.url(), "priority = 2")
        .endpoint("a", &a.url(), "priority = 1")
        .start()
        .await;
    let ans = gw.post_message(false).await;
    assert_served_by(&ans, "b", "2");
    gw.settle().await;
    assert_eq!((a.count(), b.count(), c.count()), (1, 1, 0));
    assert_outcomes(&gw.endpoint_view("c").await, &[]);
}

/// Three endpoints `e0`, `e1`, `e2` that all answer 500, behind a gateway with `max_attempts`;
/// returns them, the gateway and its answer to one request.
async fn three_failing(max_attempts: u32) -> ([MockUpstream; 3], TestGateway, Answer) {
    let mocks = [
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    ];
    let mut gb = builder().server(&format!("max_attempts = {max_attempts}"));
    for (i, up) in mocks.iter().enumerate() {
        up.set_default(Script::error(500, "api_error", "Internal"));
        gb = gb.endpoint(&format!("e{i}"), &up.url(), "");
    }
    let gw = gb.start().await;
    let ans = gw.post_message(false).await;
    (mocks, gw, ans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_the_same_endpoint_twice_and_max_attempts_bounds_the_walk() {
    let (mocks, gw, ans) = three_failing(10).await;
    assert_eq!(ans.status, 502, "{}", ans.text());
    assert_anthropic_error(&ans, "api_error");
    gw.settle().await;
    for (i, up) in mocks.iter().enumerate() {
        assert_eq!(up.count(), 1, "e{i} is tried exactly once");
        assert_outcomes(
            &gw.endpoint_view(&format!("e{i}")).await,
            &[("server_error", 1)],
        );
    }
    let msg = ans.json()["error"]["message"]
        .as_str()
        .expect("message")
        .to_string();
    for i in 0..3 {
        assert_eq!(msg.matches(&format!("e{i}:")).count(), 1, "{msg}");
    }

    // max_attempts = 2 of three failing endpoints: two attempts in all.
    let (mocks, _gw, ans) = three_failing(2).await;
    assert_eq!(ans.status, 502, "{}", ans.text());
    let counts: Vec<usize> = mocks.iter().map(MockUpstream::count).collect();
    assert_eq!(counts.iter().sum::<usize>(), 2, "{counts:?}");
    assert!(counts.iter().all(|c| *c <= 1), "{counts:?}");
}

// ---------------------------------------------------------------------------------------------
// Fidelity
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_query_and_body_arrive_byte_for_byte() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let kept: [(&str, &str); 16] = [
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
        (
            "anthropic-beta",
            "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
        ),
        ("user-agent", "claude-cli/1.0.83 (external, cli)"),
        ("x-app", "cli"),
        ("x-stainless-lang", "js"),
        ("x-stainless-package-version", "0.55.1"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-runtime", "node"),
        ("x-stainless-runtime-version", "v22.3.0"),
        ("x-stainless-retry-count", "0"),
        ("x-stainless-timeout", "600"),
        ("x-stainless-helper-method", "stream"),
        (
            "x-claude-code-session-id",
            "3f2a9c1e-6b1d-4a57-9a0e-1c2d3e4f5a6b",
        ),
        ("anthropic-dangerous-direct-browser-access", "true"),
    ];
    let dropped: [(&str, &str); 7] = [
        ("x-api-key", "sk-ant-client-key"),
        ("authorization", "Bearer client-token"),
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "named-by-connection"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
    ];
    // Dropped headers among the kept ones, as clients send them (Claude Code's `x-api-key`
    // comes before `content-type`).
    let mut headers: Vec<(&str, &str)> = Vec::new();
    for (i, h) in kept.iter().enumerate() {
        if let Some(d) = dropped.get(i / 2).filter(|_| i % 2 == 1) {
            headers.push(*d);
        }
        headers.push(*h);
    }
    headers.extend(dropped.iter().skip(kept.len() / 2));
    // A repeated header keeps both values, in order.
    headers.push(("x-repeated", "one"));
    headers.push(("x-repeated", "two"));
    // ~100 KB, odd spacing, non-ASCII: the body must arrive unchanged, byte for byte.
    let body = format!(
        "{{\"model\":\"claude-sonnet-4\",  \"max_tokens\":64,\"stream\":false,\n\"messages\":[{{\"role\":\"user\",\"content\":\"h\u{e9}llo \u{2713} {}\"}}],\"metadata\":{{\"user_id\":\"user_abc_account__session_1234\"}}}}",
        "x".repeat(100_000)
    );
    let ans = gw
        .request(
            Method::POST,
            "/v1/messages?beta=true",
            &headers,
            Bytes::from(body.clone()),
        )
        .await;
    assert_eq!(ans.status, 200, "{}", ans.text());

    let r = up.last_request().expect("a request");
    assert_eq!(r.method, "POST");
    assert_eq!(r.path_and_query, "/v1/messages?beta=true");
    assert_eq!(r.body, body.as_bytes(), "body byte for byte");
    assert_eq!(
        r.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    for (name, value) in kept {
        assert_eq!(r.header_all(name), [value], "header {name}");
    }
    assert_eq!(r.header_all("x-repeated"), ["one", "two"]);
    // In the client's order, too: relays may read the order as part of a client's fingerprint
    // (audit: each header removed had the last one moved into its place).
    let arrived: Vec<&str> = r
        .headers
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| kept.iter().any(|(k, _)| k.eq_ignore_ascii_case(n)))
        .collect();
    let sent: Vec<&str> = kept.iter().map(|(k, _)| *k).collect();
    assert_eq!(arrived, sent, "{:?}", r.headers);
    assert_eq!(
        r.header_all("x-api-key"),
        ["key-a"],
        "the endpoint's credential only"
    );
    for name in [
        "authorization",
        "x-hop-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
    ] {
        assert_eq!(r.header(name), None, "{name} must not be forwarded");
    }
    assert!(
        r.header_all("connection")
            .iter()
            .all(|v| !v.contains("x-hop-secret")),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("host"), Some(up.addr().to_string().as_str()));
    for (_, v) in &r.headers {
        assert!(
            !v.contains("client-key") && !v.contains("client-token"),
            "{v}"
        );
    }

    // Any path and query is forwarded as is, with any method.
    let paths = [
        (Method::GET, "/v1/models?limit=5&after_id=abc%20def"),
        (Method::POST, "/v1/messages/count_tokens?beta=true"),
        (Method::DELETE, "/v1/files/file_011?x=1&x=2"),
    ];
    for (method, path) in paths {
        let ans = gw
            .request(method.clone(), path, &[("x-api-key", "c")], Bytes::new())
            .await;
        assert_eq!(ans.status, 200, "{path}");
        let r = up.last_request().expect("a request");
        assert_eq!(r.method, method.as_str());
        assert_eq!(r.path_and_query, path);
        assert_eq!(r.header_all("x-api-key"), ["key-a"]);
    }
    assert_eq!(up.count(), 4);
}

/// `host` and the credential reach the upstream where the client put them, with the upstream's
/// values: only the client's credential lines are replaced, in place, by the endpoint's own
/// (audit: both went to the end of the headers, which a relay reading the order as part of a
/// client's fingerprint sees).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_credential_keep_the_clients_positions() {
    // Claude Code's order, as its HTTP stack writes it.
    let client = [
        ("Host", "localhost"),
        ("Connection", "keep-alive"),
        ("Accept", "application/json"),
        ("X-Stainless-Retry-Count", "0"),
        ("X-Stainless-Lang", "js"),
        ("anthropic-version", "2023-06-01"),
        ("x-api-key", "sk-ant-client"),
        ("x-app", "cli"),
        ("User-Agent", "claude-cli/1.0.83 (external, cli)"),
        ("content-type", "application/json"),
        ("anthropic-beta", "claude-code-20250219"),
        ("accept-encoding", "gzip, deflate"),
    ];
    let body =
        r#"{"model":"claude-sonnet-4","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    for (extra, credential) in [
        ("", ("x-api-key", "key-a")),
        ("auth_token = \"tok-a\"", ("authorization", "Bearer tok-a")),
        ("credential = \"client\"", ("x-api-key", "sk-ant-client")),
    ] {
        let up = MockUpstream::start().await;
        let gw = builder().endpoint("a", &up.url(), extra).start().await;
        let mut head = String::from("POST /v1/messages HTTP/1.1\r\n");
        for (n, v) in client {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        let mut tcp = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        tcp.write_all(head.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        within("the answer", tcp.read_to_end(&mut raw))
            .await
            .expect("read");
        let raw = String::from_utf8_lossy(&raw);
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");

        let r = up.last_request().expect("a request");
        let host = up.addr().to_string();
        let arrived: Vec<(String, &str)> = r
            .headers
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case("content-length"))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.as_str()))
            .collect();
        let expected: Vec<(String, &str)> = client
            .iter()
            .filter(|(n, _)| *n != "Connection")
            .map(|&(n, v)| match n {
                "Host" => ("host".to_owned(), host.as_str()),
                "x-api-key" => (credential.0.to_owned(), credential.1),
                "accept-encoding" => (n.to_owned(), "identity"),
                _ => (n.to_ascii_lowercase(), v),
            })
            .collect();
        assert_eq!(arrived, expected, "{extra}");
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_url_path_prefix_is_honoured() {
    let up = MockUpstream::start().await;
    let gw = builder()
        .endpoint("relay", &format!("{}/api/anthropic/", up.url()), "")
        .start()
        .await;
    let ans = gw
        .post(
            "/v1/messages?beta=true",
            &[],
            &TestGateway::message_body(false),
        )
        .await;
    assert_eq!(ans.status, 200, "{}", ans.text());
    let r = up.last_request().expect("a request");
    assert_eq!(r.path_and_query, "/api/anthropic/v1/messages?beta=true");
    let ans = gw
        .request(Method::GET, "/v1/models", &[], Bytes::new())
        .await;
    assert_eq!(ans.status, 200);
    assert_eq!(
        up.last_request().expect("a request").path_and_query,
        "/api/anthropic/v1/models"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_steering_headers_are_returned_unchanged() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let steering = [
        ("request-id", "req_011CPXyz"),
        ("retry-after", "17"),
        ("retry-after-ms", "17000"),
        ("x-should-retry", "false"),
        ("anthropic-ratelimit-requests-remaining", "99"),
        ("anthropic-ratelimit-tokens-reset", "2030-01-01T00:00:00Z"),
    ];
    let mut json_script = Script::json_ok();
    let mut sse_script = Script::sse_ok(2);
    for (k, v) in steering {
        json_script = json_script.header(k, v);
        sse_script = sse_script.header(k, v);
    }
    up.push(json_script);
    up.push(sse_script);
    let ans = gw.post_message(false).await;
    assert_eq!(ans.status, 200);
    for (k, v) in steering {
        assert_eq!(ans.header(k), Some(v), "json: {k}");
    }
    let ans = gw.post_message(true).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, sse_ok_bytes(2));
    for (k, v) in steering {
        assert_eq!(ans.header(k), Some(v), "stream: {k}");
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------------------------

/// Both client credential headers, which must never reach an upstream.
const CLIENT_CREDS: [(&str, &str); 2] = [
    ("x-api-key", "sk-ant-client"),
    ("authorization", "Bearer client-token"),
];

/// Sends a request carrying [`CLIENT_CREDS`] through `gw`; `up` must receive `want` as its only
/// `header` and nothing in the other credential header. `what` names the case in messages.
async fn assert_credential_swapped(
    gw: &TestGateway,
    up: &MockUpstream,
    header: &str,
    want: &str,
    what: &str,
) {
    let ans = gw
        .post(
            "/v1/messages",
            &CLIENT_CREDS,
            &TestGateway::message_body(false),
        )
        .await;
    assert_eq!(ans.status, 200, "{what}: {}", ans.text());
    let r = up.last_request().expect("request");
    assert_eq!(r.header_all(header), [want], "{what}");
    let other = if header == "x-api-key" {
        "authorization"
    } else {
        "x-api-key"
    };
    assert_eq!(r.header(other), None, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_swap_api_key_and_auth_token() {
    for (name, extra, header, want) in [
        (
            "k",
            "api_key = \"sk-ant-endpoint-k\"",
            "x-api-key",
            "sk-ant-endpoint-k",
        ),
        (
            "t",
            "auth_token = \"tok-endpoint-t\"",
            "authorization",
            "Bearer tok-endpoint-t",
        ),
    ] {
        let up = MockUpstream::start().await;
        let gw = builder().endpoint(name, &up.url(), extra).start().await;
        assert_credential_swapped(&gw, &up, header, want, extra).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_swap_from_environment_variables() {
    // The config's environment seam (`config::Env`) stands in for the process environment.
    let env = |name: &str| match name {
        "CCGATE_TEST_KEY" => Some("sk-ant-from-env".to_string()),
        "CCGATE_TEST_TOKEN" => Some("tok-from-env".to_string()),
        _ => None,
    };
    for (extra, header, want) in [
        (
            "api_key_env = \"CCGATE_TEST_KEY\"",
            "x-api-key",
            "sk-ant-from-env",
        ),
        (
            "auth_token_env = \"CCGATE_TEST_TOKEN\"",
            "authorization",
            "Bearer tok-from-env",
        ),
    ] {
        let up = MockUpstream::start().await;
        let toml = builder().endpoint("e", &up.url(), extra).toml();
        let config = ccgate::config::Config::from_toml(&toml, "test.toml", &env)
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let gw = TestGateway::start(config).await;
        assert_credential_swapped(&gw, &up, header, want, extra).await;
    }
}

/// A Claude-Code-sized body of several megabytes reaches the gateway in many frames (hyper reads
/// at most a few hundred KB at a time). The frames are forwarded as they came and sent again on
/// failover: both endpoints receive the client's exact bytes, and the model (read from the
/// front) and the session (read from the end) are found without joining the frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_many_frames_is_forwarded_and_replayed_byte_for_byte() {
    let d = Duo::start(builder().table("affinity", "enabled = true")).await;
    let turns: Vec<Value> = (0..3000)
        .map(|i| json!({"role": "user", "content": format!("turn {i}: \"quoted\" \\ {}", "x".repeat(1000))}))
        .collect();
    let body = format!(
        r#"{{"model":"claude-frames-1","messages":{},"stream":false,"metadata":{{"user_id":"{{\"session_id\":\"frames-1\"}}"}}}}"#,
        Value::from(turns)
    );
    assert!(body.len() > 3_000_000);
    d.a.push(Script::overloaded());
    let resp =
        d.gw.send(
            Method::POST,
            "/v1/messages",
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-ccgate-attempts"], "2");
    let answer = resp.into_body().collect().await.expect("answer").to_bytes();
    assert_eq!(answer, json_ok_bytes());
    for up in [&d.a, &d.b] {
        let got = up.last_request().expect("a request");
        assert!(got.body == body.as_bytes(), "the body arrived changed");
    }
    let recent = d.gw.admin("requests?limit=1").await;
    assert_eq!(
        recent["requests"][0]["model"], "claude-frames-1",
        "{recent}"
    );
    // The session was read from the body's end: it now stays on `b`, which served it (for its
    // model), although `a` ranks first again for everyone else.
    d.a.set_default(Script::json_ok());
    for (session, endpoint) in [("frames-1", "b"), ("other", "a")] {
        let user_id = json!({ "session_id": session }).to_string();
        let small =
            json!({"model": "claude-frames-1", "messages": [], "metadata": {"user_id": user_id}});
        let ans = d.post(&small).await;
        assert_eq!(
            ans.header("x-ccgate-endpoint"),
            Some(endpoint),
            "{}",
            ans.text()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Answered locally
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_cap_gets_413_without_touching_an_endpoint() {
    let up = MockUpstream::start().await;
    let gw = builder()
        .server("max_body_bytes = 1024")
        .endpoint("a", &up.url(), "")
        .start()
        .await;

    let ans = gw
        .request(
            Method::POST,
            "/v1/messages",
            &[("content-type", "application/json")],
            Bytes::from(vec![b'x'; 1025]),
        )
        .await;
    assert_eq!(ans.status, 413);
    assert_anthropic_error(&ans, "request_too_large");

    // Chunked, with no content-length to judge by: the cap still holds.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let mut req = b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    tcp.write_all(&req).await.expect("write");
    let mut raw = Vec::new();
    within("the 413 answer", tcp.read_to_end(&mut raw))
        .await
        .expect("read");
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(raw.contains("request_too_large"), "{raw}");

    assert_eq!(up.count(), 0, "no endpoint touched");
    assert_outcomes(&gw.endpoint_view("a").await, &[]);

    // Exactly at the cap it goes through, unchanged.
    let body = Bytes::from(vec![b'z'; 1024]);
    let ans = gw
        .request(Method::POST, "/v1/messages", &[], body.clone())
        .await;
    assert_eq!(ans.status, 200);
    assert_eq!(up.last_request().expect("request").body, body);
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_root_is_answered_locally() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    for _ in 0..3 {
        let ans = gw.request(Method::HEAD, "/", &[], Bytes::new()).await;
        assert_eq!(ans.status, 200);
        assert!(ans.body.is_empty());
        assert_eq!(ans.header("x-ccgate-endpoint"), None);
    }
    assert_eq!(up.count(), 0);
    assert_eq!(up.connections_accepted(), 0);
    assert_outcomes(&gw.endpoint_view("a").await, &[]);
    let stats = gw.admin("stats").await;
    assert_eq!(stats["total_requests"], 0, "{stats:#}");
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_relayed_event_by_event() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let first = Gate::new();
    let second = Gate::new();
    // Held after the first text delta, and again after the third.
    up.push(
        Script::sse_ok(4)
            .gate_after(4, first.clone())
            .gate_after(6, second.clone()),
    );
    let mut s = Streamed::post(&gw, &TestGateway::message_body(true)).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("x-ccgate-endpoint"), Some("a"));

    s.read_until(&sse_delta_text(0)).await;
    within("the first gate", first.wait_arrived(1)).await;
    assert!(!s.text().contains(&sse_delta_text(1)));
    first.open();

    s.read_until(&sse_delta_text(2)).await;
    within("the second gate", second.wait_arrived(1)).await;
    assert!(!s.text().contains(&sse_delta_text(3)));
    second.open();

    let text = s.read_to_end().await;
    assert_eq!(
        text.as_bytes(),
        sse_ok_bytes(4),
        "the whole stream, unchanged"
    );
    gw.settle().await;
    assert_outcomes(&gw.endpoint_view("a").await, &[("success", 1)]);
}

/// The held preamble and the first content go to the client as one chunk, so it reads its first
/// content with its first byte: the mock sends each event as a chunk of its own, which reaches
/// ccgate as a frame of its own, and still the client's first frame runs from `message_start`
/// through the first delta (and no further).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_preamble_and_first_content_reach_the_client_as_one_chunk() {
    let up = MockUpstream::start().await;
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let gate = Gate::new();
    // Held after the first delta, so that nothing after it can join the first chunk.
    up.push(Script::sse_ok(2).gate_after(4, gate.clone()));
    let mut s = Streamed::post(&gw, &TestGateway::message_body(true)).await;
    assert_eq!(s.status, 200);
    let first = String::from_utf8_lossy(&s.next_data().await).into_owned();
    let preamble_and_first_delta = &sse_ok_bytes(2)[..first.len()];
    assert_eq!(first.as_bytes(), preamble_and_first_delta);
    assert!(
        first.starts_with("event: message_start")
            && first.contains(&sse_delta_text(0))
            && !first.contains(&sse_delta_text(1)),
        "{first}"
    );
    gate.open();
    let text = s.read_to_end().await;
    assert_eq!(
        text.as_bytes(),
        sse_ok_bytes(2),
        "the whole stream, unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_stream_cut_fails_over_to_one_clean_stream() {
    // Cut after message_start, and after the whole preamble before any text.
    for k in [1, 3] {
        let d = Duo::start(builder()).await;
        d.a.push(Script::sse_ok(3).cut_after(k));
        d.b.push(Script::sse_ok(3));
        let ans = d.post(&TestGateway::message_body(true)).await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.header("x-ccgate-endpoint"), Some("b"), "cut after {k}");
        assert_eq!(ans.header("x-ccgate-attempts"), Some("2"), "cut after {k}");
        assert_eq!(
            ans.body,
            sse_ok_bytes(3),
            "cut after {k}: one clean stream:\n{}",
            ans.text()
        );
        d.gw.settle().await;
        assert_outcomes(&d.gw.endpoint_view("a").await, &[("transport", 1)]);
        assert_outcomes(&d.gw.endpoint_view("b").await, &[("success", 1)]);
    }
}

// ---------------------------------------------------------------------------------------------
// All down
// ---------------------------------------------------------------------------------------------

/// Asserts an answer when nothing could serve: `status`, an Anthropic error of type `ty`, and a
/// `retry-after` header, whose value it returns.
#[track_caller]
fn assert_all_down<'a>(ans: &'a Answer, status: u16, ty: &str) -> &'a str {
    assert_eq!(ans.status, status, "{}", ans.text());
    assert_anthropic_error(ans, ty);
    ans.header("retry-after")
        .unwrap_or_else(|| panic!("no retry-after on the {status} answer: {ans:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_down_answers_say_what_happened() {
    // All overloaded: 503 with retry-after, never a bare 529.
    let d = Duo::start(builder()).await;
    d.a.set_default(Script::overloaded());
    d.b.set_default(Script::overloaded());
    let ans = d.post(&TestGateway::message_body(false)).await;
    let retry: u64 = assert_all_down(&ans, 503, "overloaded_error")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    assert_eq!((d.a.count(), d.b.count()), (1, 1));

    // Rate limited everywhere: 503, and retry-after says when the endpoint is back.
    let up = MockUpstream::start().await;
    up.push(Script::rate_limited(7));
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let ans = gw.post_message(false).await;
    let retry: u64 = assert_all_down(&ans, 503, "overloaded_error")
        .parse()
        .expect("seconds");
    assert!((6..=7).contains(&retry), "retry-after {retry}");

    // Nothing available at all: 503, no upstream traffic.
    let up = MockUpstream::start().await;
    let gw = builder()
        .endpoint("off", &up.url(), "enabled = false")
        .start()
        .await;
    let ans = gw.post_message(false).await;
    assert_all_down(&ans, 503, "overloaded_error");
    assert_eq!(up.count(), 0);

    // Upstream breakage: 502.
    let d = Duo::start(builder()).await;
    d.a.push(Script::error(500, "api_error", "Internal"));
    d.b.push(Script::reset_before_headers());
    let ans = d.post(&TestGateway::message_body(false)).await;
    assert_all_down(&ans, 502, "api_error");

    // Timeouts: 504.
    let up = MockUpstream::start().await;
    up.push(Script::stall_before_headers());
    let gw = builder()
        .timeouts("first_byte = \"300ms\"")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let ans = gw.post_message(true).await;
    assert_all_down(&ans, 504, "api_error");
    let stats = gw.admin("stats").await;
    assert_eq!(stats["upstream_errors"], 1, "{stats:#}");
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_with_its_own_ca_file() {
    let up = MockUpstream::start_tls().await;
    let mut ca = tempfile::NamedTempFile::new().expect("tempfile");
    ca.write_all(up.ca_pem.as_bytes()).expect("write CA");
    ca.flush().expect("flush");
    let path = ca.path().to_str().expect("utf-8 path");
    let gw = builder()
        .endpoint(
            "tls",
            &up.url(),
            &format!("ca_file = {}", ccgate::config::toml_string(path)),
        )
        .start()
        .await;
    let ans = gw.post_message(false).await;
    assert_eq!(ans.status, 200, "{}", ans.text());
    assert_eq!(ans.body, json_ok_bytes());
    up.push(Script::sse_ok(2));
    let ans = gw.post_message(true).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.body, sse_ok_bytes(2));
    assert_eq!(up.count(), 2);
    assert_eq!(
        up.last_request().expect("request").header("x-api-key"),
        Some("key-tls")
    );
    gw.settle().await;
    assert_outcomes(&gw.endpoint_view("tls").await, &[("success", 2)]);

    // Without the CA the self-signed certificate is refused: nothing reaches the upstream.
    let gw = builder().endpoint("tls", &up.url(), "").start().await;
    let ans = gw.post_message(false).await;
    assert_eq!(ans.status, 502, "{}", ans.text());
    assert_eq!(up.count(), 2, "no request crossed an untrusted TLS session");
    let v = gw.endpoint_view("tls").await;
    assert_outcomes(&v, &[("transport", 1)]);
}

/// `http2 = true` to a TLS server that declines HTTP/2 by ALPN behaves as `http2 = false`: new
/// HTTP/1.1 connections open side by side, not one after another (audit: each waited for the
/// one before to finish its handshake). A relay in front of the server holds every connection
/// 300 ms before passing it on, and counts how many it holds at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_declined_by_alpn_connects_side_by_side() {
    let up = MockUpstream::start_tls().await;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let relay_addr = relay.local_addr().expect("addr");
    let target = up.addr();
    let holding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (h, m) = (Arc::clone(&holding), Arc::clone(&most));
    let relay_task = tokio::spawn(async move {
        while let Ok((mut client, _)) = relay.accept().await {
            let (h, m) = (Arc::clone(&h), Arc::clone(&m));
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::SeqCst;
                m.fetch_max(h.fetch_add(1, SeqCst) + 1, SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                h.fetch_sub(1, SeqCst);
                let mut server = tokio::net::TcpStream::connect(target)
                    .await
                    .expect("connect");
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    let mut ca = tempfile::NamedTempFile::new().expect("tempfile");
    ca.write_all(up.ca_pem.as_bytes()).expect("write CA");
    ca.flush().expect("flush");
    let path = ca.path().to_str().expect("utf-8 path");
    // One worker: one pool, whose turn to connect every request shares.
    let gw = Arc::new(
        builder()
            .server("workers = 1")
            .endpoint(
                "tls",
                &format!("https://{relay_addr}"),
                &format!(
                    "http2 = true\nca_file = {}",
                    ccgate::config::toml_string(path)
                ),
            )
            .start()
            .await,
    );
    // Four at once, each held by the server until all have arrived: four connections.
    let gate = Gate::new();
    for _ in 0..4 {
        up.push(Script::sse_ok(1).gate_after(0, gate.clone()));
    }
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move { gw.post_message(true).await })
        })
        .collect();
    gate.wait_arrived(4).await;
    gate.open();
    for c in clients {
        let ans = c.await.expect("client");
        assert_eq!(ans.status, 200, "{}", ans.text());
    }
    assert!(
        most.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the connections opened one after another"
    );
    relay_task.abort();
}

// ---------------------------------------------------------------------------------------------
// Access token
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_is_enforced_and_never_forwarded() {
    const TOKEN: &str = "gate-secret-123";
    let up = MockUpstream::start().await;
    let gw = builder()
        .server(&format!("access_token = \"{TOKEN}\""))
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let body = TestGateway::message_body(false);

    for headers in [
        vec![],
        vec![("x-api-key", "wrong")],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", TOKEN)],
        vec![("x-api-key", "gate-secret-12")],
    ] {
        let ans = gw.post("/v1/messages", &headers, &body).await;
        assert_eq!(ans.status, 401, "{headers:?}: {}", ans.text());
        assert_anthropic_error(&ans, "authentication_error");
    }
    assert_eq!(
        up.count(),
        0,
        "unauthorised requests never reach an upstream"
    );

    let bearer = format!("Bearer {TOKEN}");
    for headers in [
        vec![("x-api-key", TOKEN)],
        vec![("authorization", bearer.as_str())],
    ] {
        let ans = gw.post("/v1/messages", &headers, &body).await;
        assert_eq!(ans.status, 200, "{headers:?}: {}", ans.text());
        let r = up.last_request().expect("request");
        assert_eq!(r.header_all("x-api-key"), ["key-a"]);
        assert_eq!(r.header("authorization"), None);
        for (name, value) in &r.headers {
            assert!(!value.contains(TOKEN), "token forwarded in {name}");
        }
    }
    assert_eq!(up.count(), 2);

    let health = gw
        .request(Method::GET, "/_ccgate/health", &[], Bytes::new())
        .await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
    let denied = gw
        .request(Method::GET, "/_ccgate/endpoints", &[], Bytes::new())
        .await;
    assert_eq!(denied.status, 401);
    assert!(!denied.text().contains("key-a"));
    gw.settle().await;
    let view = gw
        .request(
            Method::GET,
            "/_ccgate/endpoints",
            &[("x-api-key", TOKEN)],
            Bytes::new(),
        )
        .await;
    assert_eq!(view.status, 200);
    let v = &view.json()["endpoints"][0];
    assert_eq!(v["name"], "a");
    assert_eq!(v["total_requests"], 2, "the refused requests never counted");
}

/// A stream the upstream frames with `content-length` and ends without `message_stop` still gets
/// its closing `error` event: the relay drops the upstream's length, which would cut the event
/// off (audit, SPEC §3: "rather than a silent cut").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_a_content_length_that_ends_early_gets_its_error_event() {
    let d = Duo::start(builder()).await;
    let sent = event_bytes(&SseEvent::message_stream(2)[..4]);
    d.a.push(Script::response(200, "text/event-stream", sent.clone()));
    let ans = d.post(&TestGateway::message_body(true)).await;
    assert_eq!(ans.status, 200);
    assert_eq!(ans.header("x-ccgate-endpoint"), Some("a"));
    assert_eq!(
        ans.header("content-length"),
        None,
        "the upstream's length is dropped"
    );
    assert!(ans.body.starts_with(&sent), "{}", ans.text());
    let tail = parse_events(&String::from_utf8_lossy(&ans.body[sent.len()..]));
    assert_eq!(tail.len(), 1, "one event after the upstream's: {tail:?}");
    assert_eq!(tail[0].0, "error");
    assert_eq!(tail[0].1["error"]["type"], "api_error");
    d.gw.settle().await;
    assert_outcomes(&d.gw.endpoint_view("a").await, &[("transport", 1)]);

    // A whole stream with a length is relayed as it came.
    let whole = sse_ok_bytes(2);
    d.a.push(Script::response(200, "text/event-stream", whole.clone()));
    let ans = d.post(&TestGateway::message_body(true)).await;
    assert_eq!(ans.body, whole, "{}", ans.text());
    d.gw.settle().await;
    assert_outcomes(
        &d.gw.endpoint_view("a").await,
        &[("transport", 1), ("success", 1)],
    );
    assert_eq!(d.b.count(), 0);
}

/// A stream on another path than `/v1/messages` (the legacy `/v1/complete`, say) is relayed as
/// the upstream sent it, not judged by the Messages grammar: its own event names are no fault of
/// the endpoint (audit, SPEC §3: unknown paths are forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_another_path_is_relayed_without_the_messages_grammar() {
    let d = Duo::start(builder().health("failure_threshold = 1")).await;
    let events = vec![
        SseEvent::new(
            "completion",
            &json!({"type": "completion", "completion": " Hello"}),
        ),
        SseEvent::ping(),
        SseEvent::new(
            "completion",
            &json!({"type": "completion", "stop_reason": "stop"}),
        ),
    ];
    let sent = event_bytes(&events);
    d.a.set_default(Script::sse_events(events));
    let body =
        json!({"model": MOCK_MODEL, "prompt": "\n\nHuman: hi\n\nAssistant:", "stream": true});
    for _ in 0..3 {
        let ans = within("an answer", d.gw.post("/v1/complete", &[], &body)).await;
        assert_eq!(ans.status, 200, "{}", ans.text());
        assert_eq!(ans.header("x-ccgate-endpoint"), Some("a"));
        assert_eq!(ans.body, sent, "relayed byte for byte");
    }
    d.gw.settle().await;
    let a = d.gw.endpoint_view("a").await;
    assert_outcomes(&a, &[("success", 3)]);
    assert_eq!(a["state"], "healthy");
    assert_eq!(d.b.count(), 0);
}

/// An error answer whose body goes silent does not hold the failover for the idle timeout: its
/// status has decided, and the next endpoint is tried at once (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_whose_error_body_stalls_fails_over_at_once() {
    // Ten minutes of idle timeout: without a bound of its own, the request would outlast the
    // answer deadline below.
    let d = Duo::start(builder().timeouts("idle = \"600s\"")).await;
    let a = d
        .fails_over(Script::overloaded().stall_body_after(10), "overloaded")
        .await;
    assert!(
        a["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("529")),
        "{a:#}"
    );

    // Nor does one that trickles, a byte every half second for half a minute: the answer
    // deadline is 20 s.
    let d = Duo::start(builder().timeouts("idle = \"600s\"")).await;
    let trickle = (0..60).map(|_| SseEvent::raw(&b" "[..])).collect();
    let script = Script::sse_events(trickle)
        .status(529)
        .header("content-type", "application/json")
        .pacing(std::time::Duration::from_millis(500));
    d.fails_over(script, "overloaded").await;
}

/// `anthropic-beta` in several lines: an endpoint with its own key drops the `oauth-*` flags of
/// every line and keeps every other flag; lines without one go through as they came (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_beta_in_several_lines_loses_only_its_oauth_flags() {
    let up = MockUpstream::start().await;
    let gw = builder()
        .endpoint("a", &up.url(), "api_key = \"sk-endpoint\"")
        .start()
        .await;
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &[
                "oauth-2025-04-20,claude-code-20250219",
                "interleaved-thinking-2025-05-14",
            ],
            &["claude-code-20250219,interleaved-thinking-2025-05-14"],
        ),
        (
            &[
                "claude-code-20250219",
                "oauth-2025-04-20, fine-grained-tool-streaming-2025-05-14",
            ],
            &["claude-code-20250219,fine-grained-tool-streaming-2025-05-14"],
        ),
        (
            &["claude-code-20250219", "interleaved-thinking-2025-05-14"],
            &["claude-code-20250219", "interleaved-thinking-2025-05-14"],
        ),
    ];
    for (i, (sent, want)) in cases.iter().enumerate() {
        let headers: Vec<(&str, &str)> = sent.iter().map(|v| ("anthropic-beta", *v)).collect();
        let ans = gw
            .post("/v1/messages", &headers, &TestGateway::message_body(false))
            .await;
        assert_eq!(ans.status, 200, "{}", ans.text());
        let got = up.received();
        assert_eq!(got[i].header_all("anthropic-beta"), *want, "lines {sent:?}");
    }
}
