//! Health accounting through the real server (issue #3, SPEC §5 and §6).
//!
//! Every test runs the real gateway in-process on a multi-threaded runtime against scriptable mock
//! upstreams, and compares the gateway's counters, exactly, with what the mocks counted on their
//! side: per endpoint and per outcome, under thousands of concurrent attempts failing in every way
//! the classifier knows, while readers hammer the views. Synchronisation is by gates, the mocks'
//! notifications and `settle`; the only polling (with a deadline) waits for the background prober.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use ccgate::health::attempt::Attempt;
use ccgate::health::classify::{Kind, Outcome};
use ccgate::health::endpoint::Counters;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use support::gateway::{Answer, GatewayBuilder, TestGateway};
use support::mock::{Gate, MockUpstream, Script, SseEvent, anthropic_error};
use support::wait::{eventually, within};

const MESSAGES: &str = "/v1/messages";
/// Header a load client sets when it will walk away in the middle of the stream.
const PLAN_HEADER: &str = "x-accounting-plan";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The extra endpoint line that sets its priority.
fn prio(p: u32) -> String {
    format!("priority = {p}")
}

/// A gateway that never probes on its own (probes only when a test asks) and whose retry budget
/// never gets in the way.
fn builder() -> GatewayBuilder {
    GatewayBuilder::new()
        .health("probe_interval = \"1h\"")
        .health("probe_max_interval = \"2h\"")
        .table("retry_budget", "ratio = 10.0")
        .table("retry_budget", "min_per_second = 100000")
}

/// Starts `gb` with endpoint `a` at `up_a` (priority 1: tried first) and `b` at `up_b`
/// (priority 2).
async fn start_a_b(gb: GatewayBuilder, up_a: &MockUpstream, up_b: &MockUpstream) -> TestGateway {
    gb.endpoint("a", &up_a.url(), &prio(1))
        .endpoint("b", &up_b.url(), &prio(2))
        .start()
        .await
}

/// Asserts a client got a success, and from `b`.
#[track_caller]
fn assert_served_by_b(a: &Answer) {
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.header("x-ccgate-endpoint"), Some("b"), "{}", a.text());
}

async fn post(gw: &TestGateway, stream: bool) -> Answer {
    gw.post(MESSAGES, &[], &TestGateway::message_body(stream))
        .await
}

/// An error answer whose status line and headers go out at once but whose body waits for `gate`:
/// the gateway classifies the status at once, and records the attempt when the body has ended,
/// i.e. when the test opens the gate. Many attempts held this way all end at the same moment.
fn held_error(status: u16, gate: &Gate) -> Script {
    let body = anthropic_error("api_error", "held by the test").to_string();
    Script::sse_events(vec![SseEvent::raw(body)])
        .status(status)
        .header("content-type", "application/json")
        .gate_after(0, gate.clone())
}

/// The answer a recovery probe (`GET /v1/models`) gets from a fixed mock.
fn models_ok() -> Script {
    Script::json(200, &serde_json::json!({"data": [], "has_more": false})).label("probe")
}

/// Number of `POST /v1/messages` the mock received (probes excluded).
fn message_requests(up: &MockUpstream) -> u64 {
    up.received()
        .iter()
        .filter(|r| r.method == "POST" && r.path() == MESSAGES)
        .count() as u64
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a count in {v}"))
}

/// SPEC §5.2 on one endpoint view: the identity, and the outcome split adding up.
fn assert_view_identity(v: &Value) {
    let total = n(v, "total_requests");
    assert_eq!(
        n(v, "successful_requests")
            + n(v, "failed_requests")
            + n(v, "cancelled")
            + n(v, "in_flight"),
        total,
        "successful + failed + cancelled + in_flight != total: {v}"
    );
    let outcomes: u64 = v["outcomes"]
        .as_object()
        .expect("outcomes")
        .values()
        .map(|x| x.as_u64().expect("outcome count"))
        .sum();
    assert_eq!(
        outcomes + n(v, "in_flight"),
        total,
        "outcomes do not add up: {v}"
    );
    // `failed_requests` splits into the endpoint's faults and the caller's own errors.
    assert_eq!(
        n(v, "endpoint_errors") + n(v, "caller_errors"),
        n(v, "failed_requests"),
        "{v}"
    );
}

/// SPEC §5.6 on a `/_ccgate/stats` view.
fn assert_stats_identity(s: &Value) {
    assert_eq!(
        n(s, "successful_requests") + n(s, "failed_requests") + n(s, "in_flight"),
        n(s, "total_requests"),
        "gateway totals broken: {s}"
    );
    assert_eq!(
        n(s, "upstream_errors") + n(s, "caller_errors") + n(s, "cancelled"),
        n(s, "failed_requests"),
        "gateway failure split broken: {s}"
    );
}

/// SPEC §5.2 on a raw snapshot.
fn assert_counters_identity(c: &Counters) {
    assert_eq!(
        c.successful() + c.failed() + c.cancelled() + c.in_flight,
        c.total,
        "torn snapshot: {c:?}"
    );
    assert_eq!(
        c.by_kind.iter().sum::<u64>() + c.in_flight,
        c.total,
        "{c:?}"
    );
}

async fn queue(gw: &TestGateway) -> Value {
    gw.admin("failure-queue").await
}

async fn admin_post(gw: &TestGateway, name: &str, action: &str) -> Value {
    let a = gw
        .request(
            Method::POST,
            &format!("/_ccgate/endpoints/{name}/{action}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{action} {name}: {}", a.text());
    a.json()
}

fn parse_time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339_weak(v.as_str().expect("an RFC 3339 time")).expect("RFC 3339")
}

// ---------------------------------------------------------------------------------------------
// 1. The seed's own test
// ---------------------------------------------------------------------------------------------

/// Ten concurrent requests fail on A at the same moment: A is ejected once (one queue entry,
/// `total_failed == 1`), every failure is counted, and all ten clients are answered by B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_failures_make_one_episode() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let gate = Gate::new();
    up_a.set_default(held_error(500, &gate).label("a_500"));
    // B answers each request in kind: a stream to a stream, JSON to the rest.
    up_b.set_default_fn(|req| {
        if req.json().and_then(|v| v["stream"].as_bool()) == Some(true) {
            Script::sse_ok(2)
        } else {
            Script::json_ok()
        }
    });
    let gw = Arc::new(start_a_b(builder().health("failure_threshold = 3"), &up_a, &up_b).await);
    let clients: Vec<_> = (0..10)
        .map(|i| {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move { post(&gw, i % 2 == 0).await })
        })
        .collect();
    // All ten attempts are on A, with their status read, before any of them ends.
    gate.wait_arrived(10).await;
    assert_eq!(up_a.count(), 10);
    assert_eq!(up_b.count(), 0);
    let before = gw.endpoint_view("a").await;
    assert_eq!(n(&before, "in_flight"), 10);
    assert_eq!(before["state"], "healthy");
    gate.open();
    for c in clients {
        let a = c.await.expect("client task");
        assert_served_by_b(&a);
        assert_eq!(a.header("x-ccgate-attempts"), Some("2"));
    }
    gw.settle().await;

    let q = queue(&gw).await;
    assert_eq!(q["size"], 1, "{q}");
    assert_eq!(q["entries"][0]["name"], "a");
    assert_eq!(q["entries"][0]["reason"], "consecutive_failures");
    assert_eq!(q["stats"]["total_failed"], 1, "{q}");

    let a = gw.endpoint_view("a").await;
    assert_view_identity(&a);
    assert_eq!(a["state"], "ejected");
    assert_eq!(n(&a, "total_requests"), 10);
    assert_eq!(n(&a, "failed_requests"), 10);
    assert_eq!(a["outcomes"]["server_error"], 10);
    assert_eq!(n(&a, "consecutive_failures"), 10);
    assert_eq!(up_a.served("a_500"), 10);

    let b = gw.endpoint_view("b").await;
    assert_view_identity(&b);
    assert_eq!(n(&b, "total_requests"), 10);
    assert_eq!(n(&b, "successful_requests"), 10);
    assert_eq!(up_b.count(), 10);

    let s = gw.admin("stats").await;
    assert_stats_identity(&s);
    assert_eq!(n(&s, "total_requests"), 10);
    assert_eq!(n(&s, "successful_requests"), 10);
    assert_eq!(n(&s, "retries"), 10);

    // A is out of rotation now: the next request goes straight to B.
    let a2 = post(&gw, false).await;
    assert_eq!(a2.header("x-ccgate-endpoint"), Some("b"));
    assert_eq!(a2.header("x-ccgate-attempts"), Some("1"));
    assert_eq!(up_a.count(), 10);
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. At scale, and snapshot consistency under load
// ---------------------------------------------------------------------------------------------

/// One way an attempt can go: the mock label, the outcome bucket the gateway must count it in,
/// its weight in the random mix, and the script.
struct Fault {
    label: &'static str,
    outcome: Kind,
    weight: u32,
    script: Script,
}

fn fault(label: &'static str, outcome: Kind, weight: u32, script: Script) -> Fault {
    Fault {
        label,
        outcome,
        weight,
        script: script.label(label),
    }
}

/// The random mix every load mock draws from.
fn mix() -> Vec<Fault> {
    vec![
        fault("ok_json", Kind::Success, 22, Script::json_ok()),
        fault("ok_sse", Kind::Success, 22, Script::sse_ok(3)),
        fault(
            "e500",
            Kind::ServerError,
            8,
            Script::error(500, "api_error", "boom"),
        ),
        fault("e529", Kind::Overloaded, 8, Script::overloaded()),
        // retry-after 0: the endpoint cools down for a moment and is back.
        fault("e429", Kind::RateLimited, 5, Script::rate_limited(0)),
        fault(
            "e400",
            Kind::CallerError,
            6,
            Script::error(400, "invalid_request_error", "bad request"),
        ),
        fault("reset", Kind::Transport, 7, Script::reset_before_headers()),
        // Cut before the first content (fails over) and after it (the client sees an error event).
        fault(
            "cut_pre",
            Kind::Transport,
            5,
            Script::sse_ok(3).cut_after(3),
        ),
        fault(
            "cut_mid",
            Kind::Transport,
            5,
            Script::sse_ok(3).cut_after(5),
        ),
        fault(
            "json_cut",
            Kind::Transport,
            4,
            Script::json_ok().cut_body_after(20),
        ),
        fault(
            "sse_err_pre",
            Kind::Overloaded,
            4,
            Script::sse_ok(3).error_event_after(3, "overloaded_error"),
        ),
        fault(
            "sse_err_mid",
            Kind::ServerError,
            4,
            Script::sse_ok(3).error_event_after(5, "api_error"),
        ),
        // A stream that ends cleanly at the HTTP level but without `message_stop`.
        fault("sse_no_stop", Kind::Transport, 3, {
            let mut events = SseEvent::message_stream(3);
            events.pop();
            Script::sse_events(events)
        }),
        // No response headers within `first_byte`.
        fault("stall", Kind::Timeout, 1, Script::stall_before_headers()),
    ]
}

/// The script for a client that will walk away mid-stream: content, then silence until the
/// gateway hangs up, which the mock notices (`peer_disconnects`).
fn client_gone_script() -> Script {
    Script::sse_ok(3).stall_after(5).label("client_gone")
}

/// Points `up` at a seeded random draw from [`mix`] (clients that will leave get a stall, probes
/// get a models list).
/// Each draw is of the request's kind: SSE scripts answer streams, JSON ones the rest (the gateway
/// fails over a 2xx of the wrong kind, issue #17 item 4).
fn randomize(up: &MockUpstream, seed: u64) {
    let faults = mix();
    let rng = Mutex::new(fastrand::Rng::with_seed(seed));
    up.set_default_fn(move |req| {
        if req.path() != MESSAGES {
            return models_ok();
        }
        if req.header(PLAN_HEADER) == Some("gone") {
            return client_gone_script();
        }
        let stream = req
            .json()
            .and_then(|v| v["stream"].as_bool())
            .unwrap_or(false);
        let fitting: Vec<&Fault> = faults.iter().filter(|f| fits(f.label, stream)).collect();
        let total: u32 = fitting.iter().map(|f| f.weight).sum();
        let mut pick = rng.lock().expect("rng").u32(0..total);
        for f in fitting {
            if pick < f.weight {
                return f.script.clone();
            }
            pick -= f.weight;
        }
        unreachable!("weights cover the range")
    });
}

/// Whether the fault labelled `label` answers a request of this kind.
fn fits(label: &str, stream: bool) -> bool {
    match label {
        "ok_json" | "json_cut" => !stream,
        "ok_sse" | "cut_pre" | "cut_mid" | "sse_err_pre" | "sse_err_mid" | "sse_no_stop" => stream,
        _ => true,
    }
}

/// The outcome bucket of a mock label.
fn bucket_of(label: &str) -> Option<Kind> {
    if label == "client_gone" {
        return Some(Kind::Cancelled);
    }
    if label == "probe" {
        return None;
    }
    Some(
        mix()
            .into_iter()
            .find(|f| f.label == label)
            .unwrap_or_else(|| panic!("unexpected mock label {label}"))
            .outcome,
    )
}

/// How client requests ended, as the clients saw it.
#[derive(Default, Debug)]
struct Tally {
    requests: AtomicU64,
    success: AtomicU64,
    caller: AtomicU64,
    upstream: AtomicU64,
    gone: AtomicU64,
}

/// One load client request. `gone`: read until the first content, then hang up.
async fn load_request(gw: &TestGateway, stream: bool, gone: bool, tally: &Tally) {
    let body = Bytes::from(TestGateway::message_body(stream || gone).to_string());
    let mut headers = vec![
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
    ];
    if gone {
        headers.push((PLAN_HEADER, "gone"));
    }
    tally.requests.fetch_add(1, Ordering::Relaxed);
    let resp = gw.send(Method::POST, MESSAGES, &headers, body).await;
    let status = resp.status();
    let mut body = resp.into_body();
    if gone {
        assert_eq!(status, StatusCode::OK, "a stalling stream commits at once");
        let mut seen = Vec::new();
        loop {
            let frame = body
                .frame()
                .await
                .expect("the stream stalls, it does not end")
                .expect("the stream stalls, it does not break");
            if let Ok(d) = frame.into_data() {
                seen.extend_from_slice(&d);
            }
            if seen.windows(4).any(|w| w == b"tok0") {
                break;
            }
        }
        drop(body);
        tally.gone.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let read = body.collect().await.map(|b| b.to_bytes());
    match status.as_u16() {
        200 => match read {
            Ok(b) if !b.windows(12).any(|w| w == b"event: error") => {
                if b.starts_with(b"event:") {
                    assert!(
                        b.windows(12).any(|w| w == b"message_stop"),
                        "a clean stream ends with message_stop"
                    );
                } else {
                    let v: Value = serde_json::from_slice(&b).expect("a complete JSON answer");
                    assert_eq!(v["type"], "message");
                }
                tally.success.fetch_add(1, Ordering::Relaxed);
            }
            // A stream that failed after its first content ends with an SSE error event; a plain
            // body that was cut ends in a broken body.
            _ => {
                tally.upstream.fetch_add(1, Ordering::Relaxed);
            }
        },
        400 => {
            tally.caller.fetch_add(1, Ordering::Relaxed);
        }
        502..=504 => {
            tally.upstream.fetch_add(1, Ordering::Relaxed);
        }
        other => panic!("unexpected status {other} for a client"),
    }
}

/// Runs `total` requests with `concurrency` clients; about 4% of them leave mid-stream.
async fn run_load(gw: Arc<TestGateway>, total: usize, concurrency: usize, seed: u64) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let gw = Arc::clone(&gw);
            let tally = Arc::clone(&tally);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let mut rng =
                        fastrand::Rng::with_seed(seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
                    let gone = rng.u32(0..100) < 4;
                    let stream = rng.bool();
                    load_request(&gw, stream, gone, &tally).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("load client");
    }
    tally
}

/// Three endpoints in one priority tier, each behind a randomly failing mock.
/// With `direct`, a fourth endpoint `direct`, switched off (it never gets traffic), that tests
/// drive with [`Attempt`]s of their own.
async fn load_gateway(seed: u64, direct: bool) -> (Arc<TestGateway>, Vec<MockUpstream>) {
    let mut ups = Vec::new();
    for i in 0..3u64 {
        let up = MockUpstream::start().await;
        randomize(&up, seed.wrapping_add(i));
        ups.push(up);
    }
    let mut b = builder()
        // High enough that no run of failures ejects; 429s still cool endpoints down briefly.
        .health("failure_threshold = 1000")
        .server("max_attempts = 3")
        .timeouts("idle = \"60s\"")
        // Long enough that nothing but a stall script ever runs into it, even on a loaded machine.
        .timeouts("first_byte = \"5s\"");
    for (i, up) in ups.iter().enumerate() {
        b = b.endpoint(&format!("ep{i}"), &up.url(), &prio(1));
    }
    if direct {
        b = b.endpoint(
            "direct",
            "http://127.0.0.1:9",
            "priority = 1\nenabled = false",
        );
    }
    (Arc::new(b.start().await), ups)
}

/// After a load: every endpoint's counters equal what its mock counted, outcome by outcome; the
/// sums over endpoints and the gateway totals agree with the clients.
async fn assert_load_accounting(gw: &TestGateway, ups: &[MockUpstream], tally: &Tally) {
    gw.settle().await;
    let mut attempts = 0u64;
    let mut received = 0u64;
    let mut rate_limited = 0u64;
    let mut gone_served = 0u64;
    for (i, up) in ups.iter().enumerate() {
        let name = format!("ep{i}");
        let v = gw.endpoint_view(&name).await;
        assert_view_identity(&v);
        assert_eq!(n(&v, "in_flight"), 0, "{v}");
        let labels = up.served_by_label();
        let mut want = [0u64; Kind::COUNT];
        for (label, count) in &labels {
            if let Some(kind) = bucket_of(label) {
                want[kind as usize] += count;
            }
        }
        let mock_messages = message_requests(up);
        assert_eq!(
            n(&v, "total_requests"),
            mock_messages,
            "{name}: attempts counted vs requests the mock received ({labels:?})"
        );
        assert_eq!(want.iter().sum::<u64>(), mock_messages);
        for k in Kind::ALL {
            assert_eq!(
                v["outcomes"][k.name()].as_u64(),
                Some(want[k as usize]),
                "{name}: outcome {} (mock labels {labels:?}, view {v})",
                k.name()
            );
        }
        let ok = want[Kind::Success as usize];
        let endpoint_errors: u64 = Kind::ALL
            .iter()
            .filter(|k| k.is_failure())
            .map(|k| want[*k as usize])
            .sum();
        let failed = endpoint_errors + want[Kind::CallerError as usize];
        assert_eq!(n(&v, "successful_requests"), ok, "{name}");
        assert_eq!(n(&v, "failed_requests"), failed, "{name}");
        assert_eq!(n(&v, "endpoint_errors"), endpoint_errors, "{name}");
        assert_eq!(n(&v, "caller_errors"), want[Kind::CallerError as usize]);
        assert_eq!(n(&v, "cancelled"), want[Kind::Cancelled as usize]);
        // The raw snapshot says the same.
        let c = gw.gateway.registry.endpoints[i].live.snapshot();
        assert_counters_identity(&c);
        assert_eq!(c.by_kind, want, "{name}: raw counters");
        attempts += c.total;
        received += mock_messages;
        rate_limited += up.served("e429");
        gone_served += up.served("client_gone");
    }
    assert_eq!(
        attempts, received,
        "Σ attempts == Σ requests the upstreams received"
    );

    let clients = tally.requests.load(Ordering::Relaxed);
    let gone = tally.gone.load(Ordering::Relaxed);
    assert_eq!(
        gone_served, gone,
        "each leaving client reached exactly one upstream"
    );
    let s = gw.admin("stats").await;
    assert_stats_identity(&s);
    assert_eq!(n(&s, "in_flight"), 0);
    assert_eq!(n(&s, "total_requests"), clients);
    assert_eq!(
        n(&s, "successful_requests"),
        tally.success.load(Ordering::Relaxed),
        "{s}"
    );
    assert_eq!(
        n(&s, "caller_errors"),
        tally.caller.load(Ordering::Relaxed),
        "{s}"
    );
    assert_eq!(
        n(&s, "upstream_errors"),
        tally.upstream.load(Ordering::Relaxed),
        "{s}"
    );
    assert_eq!(n(&s, "cancelled"), gone, "{s}");
    assert_eq!(n(&s, "budget_refusals"), 0);
    assert_eq!(
        attempts,
        clients + n(&s, "retries"),
        "every attempt is a client request's first or one of its retries: {s}"
    );

    // Every stalled stream was hung up on upstream too.
    let mut disconnects = 0;
    for up in ups {
        within(
            "the gateway to hang up on the upstream of a client that left",
            up.wait_peer_disconnects(up.served("client_gone")),
        )
        .await;
        disconnects += up.peer_disconnects();
    }
    assert!(disconnects >= gone);

    // Episodes: only 429s can open one here (the threshold is out of reach), each at most one;
    // once the brief cooldowns have passed the prober has closed them all.
    eventually("the cooldown episodes to close", || async move {
        queue(gw).await["size"] == 0
    })
    .await;
    let q = queue(gw).await;
    let episodes = q["stats"]["total_failed"].as_u64().expect("total_failed");
    assert!(
        episodes <= rate_limited,
        "{episodes} episodes from {rate_limited} 429s: {q}"
    );
    assert!(rate_limited == 0 || episodes >= 1, "{q}");
    assert_eq!(q["stats"]["total_closed"], episodes, "{q}");
    assert_eq!(q["stats"]["total_verified"], 0, "no probe ran: {q}");
}

/// Thousands of concurrent attempts failing in every way: each endpoint's counters equal its
/// mock's counts, split by outcome; Σ over endpoints equals what the upstreams received; the
/// gateway totals equal what the clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_equal_upstream_counts_at_scale() {
    let seed = 0x5eed_0003;
    let (gw, ups) = load_gateway(seed, false).await;
    let tally = run_load(Arc::clone(&gw), 3000, 64, seed).await;
    assert_load_accounting(&gw, &ups, &tally).await;
    let total_attempts: u64 = ups.iter().map(message_requests).sum();
    eprintln!(
        "at scale: {total_attempts} attempts for {} client requests; stats {}; queue {}",
        tally.requests.load(Ordering::Relaxed),
        gw.admin("stats").await,
        queue(&gw).await["stats"]
    );
    assert!(
        total_attempts >= 4000,
        "thousands of attempts: {total_attempts}"
    );
    for up in &ups {
        for label in [
            "ok_sse",
            "e500",
            "e429",
            "reset",
            "cut_mid",
            "sse_err_pre",
            "sse_no_stop",
            "stall",
            "client_gone",
        ] {
            assert!(up.served(label) > 0, "the mix exercised {label}");
        }
    }
}

/// While a load runs, readers on other threads read every endpoint's raw snapshot in a tight loop
/// and the admin views over HTTP: every single read satisfies the identity, and no counter ever
/// goes backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_are_consistent_under_load() {
    let seed = 0x5eed_0033;
    let (gw, ups) = load_gateway(seed, true).await;
    let stop = Arc::new(AtomicBool::new(false));

    // Writers on plain OS threads drive the switched-off `direct` endpoint with attempts that
    // last a few hundred nanoseconds, so that readers race with starts and ends far more tightly
    // than HTTP round trips allow. Each counts what it recorded.
    let direct = Arc::clone(&gw.gateway.registry.endpoints[3]);
    assert_eq!(direct.name, "direct");
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let ep = Arc::clone(&direct);
        let recorder = Arc::clone(&gw.gateway.registry.recorder);
        let stop = Arc::clone(&stop);
        writers.push(std::thread::spawn(move || {
            let mut counts = [0u64; Kind::COUNT];
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let attempt = Attempt::begin(Arc::clone(&ep), Arc::clone(&recorder), false);
                match i % 3 {
                    0 => {
                        attempt.finish(Outcome::Success, None);
                        counts[Kind::Success as usize] += 1;
                    }
                    1 => {
                        attempt.finish(Outcome::CallerError, None);
                        counts[Kind::CallerError as usize] += 1;
                    }
                    _ => {
                        drop(attempt);
                        counts[Kind::Cancelled as usize] += 1;
                    }
                }
                i += 1;
            }
            counts
        }));
    }

    // Raw readers on plain OS threads, as fast as they can.
    let raw_reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..2 {
        let endpoints = gw.gateway.registry.endpoints.clone();
        let totals = Arc::clone(&gw.gateway.registry.gateway);
        let stop = Arc::clone(&stop);
        let raw_reads = Arc::clone(&raw_reads);
        threads.push(std::thread::spawn(move || {
            let mut last = vec![Counters::default(); endpoints.len()];
            let mut last_total = 0;
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (ep, last) in endpoints.iter().zip(last.iter_mut()) {
                    let c = ep.live.snapshot();
                    assert_counters_identity(&c);
                    assert!(c.total >= last.total, "total went backwards");
                    assert!(
                        c.by_kind
                            .iter()
                            .zip(last.by_kind)
                            .all(|(now, before)| *now >= before),
                        "an outcome went backwards: {c:?} after {last:?}"
                    );
                    *last = c;
                }
                let g = totals.snapshot();
                assert_eq!(g.successful + g.failed + g.in_flight, g.total, "{g:?}");
                assert_eq!(g.upstream_errors + g.caller_errors + g.cancelled, g.failed);
                assert!(g.total >= last_total);
                last_total = g.total;
                // No `yield_now` here or in the writers: the readers must be preempted at any
                // instruction, including between a snapshot's loads, for the race to be real.
                reads += 1;
            }
            raw_reads.fetch_add(reads, Ordering::Relaxed);
        }));
    }

    // View readers over HTTP.
    let view_reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let gw = Arc::clone(&gw);
        let stop = Arc::clone(&stop);
        let view_reads = Arc::clone(&view_reads);
        readers.push(tokio::spawn(async move {
            let mut last: HashMap<String, Value> = HashMap::new();
            let mut last_total = 0;
            while !stop.load(Ordering::Relaxed) {
                let all = gw.admin("endpoints").await;
                for v in all["endpoints"].as_array().expect("list") {
                    assert_view_identity(v);
                    let name = v["name"].as_str().expect("name").to_string();
                    if let Some(prev) = last.get(&name) {
                        assert!(n(v, "total_requests") >= n(prev, "total_requests"));
                        for (k, x) in v["outcomes"].as_object().expect("outcomes") {
                            assert!(x.as_u64() >= prev["outcomes"][k].as_u64(), "{k} went back");
                        }
                    }
                    last.insert(name, v.clone());
                }
                let s = gw.admin("stats").await;
                assert_stats_identity(&s);
                assert!(n(&s, "total_requests") >= last_total);
                last_total = n(&s, "total_requests");
                view_reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let tally = run_load(Arc::clone(&gw), 1500, 48, seed).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("view reader saw a broken invariant");
    }
    for t in threads {
        t.join().expect("raw reader saw a broken invariant");
    }
    let mut direct_counts = [0u64; Kind::COUNT];
    for w in writers {
        let counts = w.join().expect("writer");
        for (sum, x) in direct_counts.iter_mut().zip(counts) {
            *sum += x;
        }
    }
    let c = direct.live.snapshot();
    assert_eq!(
        c.by_kind, direct_counts,
        "the direct endpoint counted every attempt once"
    );
    assert_eq!(c.in_flight, 0);
    assert!(c.total >= 10_000, "the writers ran: {c:?}");
    let raw = raw_reads.load(Ordering::Relaxed);
    let views = view_reads.load(Ordering::Relaxed);
    eprintln!(
        "snapshot readers: {raw} raw reads, {views} view reads; direct writers: {} attempts",
        direct.live.snapshot().total
    );
    assert!(raw >= 1000, "raw readers ran: {raw}");
    assert!(views >= 20, "view readers ran: {views}");
    assert_load_accounting(&gw, &ups, &tally).await;
}

// ---------------------------------------------------------------------------------------------
// 4. One record per attempt
// ---------------------------------------------------------------------------------------------

/// One request whose three attempts fail in three different ways (500, reset, no headers in
/// time) makes exactly three failure records, one per endpoint, and one failed client request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_ways_to_fail_make_three_records() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let up_c = MockUpstream::start().await;
    up_a.set_default(Script::error(500, "api_error", "boom"));
    up_b.set_default(Script::reset_before_headers());
    up_c.set_default(Script::stall_before_headers());
    let gw = builder()
        .health("failure_threshold = 3")
        .server("max_attempts = 3")
        .timeouts("first_byte = \"1s\"")
        .endpoint("a", &up_a.url(), &prio(1))
        .endpoint("b", &up_b.url(), &prio(2))
        .endpoint("c", &up_c.url(), &prio(3))
        .start()
        .await;
    let a = post(&gw, true).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", a.text());
    assert!(a.header("retry-after").is_some());
    gw.settle().await;
    // The stalled upstream was hung up on when its attempt timed out.
    within(
        "the timed-out attempt's connection to close",
        up_c.wait_peer_disconnects(1),
    )
    .await;

    for (name, kind, up) in [
        ("a", "server_error", &up_a),
        ("b", "transport", &up_b),
        ("c", "timeout", &up_c),
    ] {
        let v = gw.endpoint_view(name).await;
        assert_view_identity(&v);
        assert_eq!(up.count(), 1, "{name}");
        assert_eq!(n(&v, "total_requests"), 1, "{name}: {v}");
        assert_eq!(n(&v, "failed_requests"), 1, "{name}: {v}");
        assert_eq!(v["outcomes"][kind], 1, "{name}: {v}");
        assert_eq!(
            n(&v, "cancelled"),
            0,
            "{name}: recorded once, not also cancelled"
        );
        assert_eq!(n(&v, "consecutive_failures"), 1, "{name}");
        assert_eq!(v["last_error"]["kind"], kind, "{name}: {v}");
    }
    let s = gw.admin("stats").await;
    assert_stats_identity(&s);
    assert_eq!(n(&s, "total_requests"), 1);
    assert_eq!(n(&s, "failed_requests"), 1);
    assert_eq!(n(&s, "upstream_errors"), 1);
    assert_eq!(n(&s, "retries"), 2);
    assert_eq!(
        queue(&gw).await["size"],
        0,
        "three single failures eject nobody"
    );

    // A stream that fails three ways before its first content: one record each again.
    up_a.set_default(Script::sse_ok(3).error_event_after(3, "overloaded_error"));
    up_b.set_default(Script::sse_ok(3).cut_after(3));
    up_c.set_default(Script::overloaded());
    let a = post(&gw, true).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    gw.settle().await;
    for (name, kind) in [("a", "overloaded"), ("b", "transport"), ("c", "overloaded")] {
        let v = gw.endpoint_view(name).await;
        assert_view_identity(&v);
        assert_eq!(n(&v, "total_requests"), 2, "{name}: {v}");
        assert_eq!(n(&v, "failed_requests"), 2, "{name}: {v}");
        assert_eq!(
            v["outcomes"][kind],
            1 + u64::from(name == "b"),
            "{name}: {v}"
        );
        assert_eq!(n(&v, "consecutive_failures"), 2, "{name}");
    }
    let s = gw.admin("stats").await;
    assert_eq!(n(&s, "total_requests"), 2);
    assert_eq!(n(&s, "upstream_errors"), 2);
    assert_eq!(n(&s, "retries"), 4);
}

/// A client that leaves in the middle of a stream makes exactly one `cancelled` record, not a
/// failure, and the upstream is hung up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_leaving_mid_stream_is_one_cancelled_record() {
    let up = MockUpstream::start().await;
    up.set_default(client_gone_script());
    let gw = builder().endpoint("a", &up.url(), "").start().await;
    let tally = Tally::default();
    load_request(&gw, true, true, &tally).await;
    within(
        "the gateway to hang up on the upstream",
        up.wait_peer_disconnects(1),
    )
    .await;
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_view_identity(&v);
    assert_eq!(n(&v, "total_requests"), 1);
    assert_eq!(n(&v, "cancelled"), 1, "{v}");
    assert_eq!(n(&v, "failed_requests"), 0, "{v}");
    assert_eq!(n(&v, "successful_requests"), 0, "{v}");
    assert_eq!(n(&v, "consecutive_failures"), 0);
    let s = gw.admin("stats").await;
    assert_stats_identity(&s);
    assert_eq!(n(&s, "cancelled"), 1, "{s}");
}

// ---------------------------------------------------------------------------------------------
// 5. consecutive_failures
// ---------------------------------------------------------------------------------------------

/// Fails `count` attempts on A at the same instant (held on one gate), all answered by B.
async fn concurrent_failures(gw: &Arc<TestGateway>, up_a: &MockUpstream, count: u64) {
    let gate = Gate::new();
    up_a.push_n(held_error(500, &gate), count as usize);
    let clients: Vec<_> = (0..count)
        .map(|_| {
            let gw = Arc::clone(gw);
            tokio::spawn(async move { post(&gw, false).await })
        })
        .collect();
    gate.wait_arrived(count).await;
    gate.open();
    for c in clients {
        assert_served_by_b(&c.await.expect("client"));
    }
    gw.settle().await;
}

/// Outage after outage, each one forty failures racing with `failure_threshold = 1` (so every one
/// of them tries to eject): each outage is exactly one episode and one queue entry; between
/// outages a probe and one real success bring the endpoint back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_outage_is_one_episode_however_many_race() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let gw = Arc::new(start_a_b(builder().health("failure_threshold = 1"), &up_a, &up_b).await);
    for round in 1..=6u64 {
        concurrent_failures(&gw, &up_a, 40).await;
        let q = queue(&gw).await;
        assert_eq!(q["size"], 1, "round {round}: {q}");
        assert_eq!(q["stats"]["total_failed"], round, "round {round}: {q}");
        assert_eq!(gw.endpoint_view("a").await["state"], "ejected");
        up_a.push(models_ok());
        assert_eq!(admin_post(&gw, "a", "probe").await["passed"], true);
        let a = post(&gw, false).await;
        assert_eq!(a.header("x-ccgate-endpoint"), Some("a"), "round {round}");
        gw.settle().await;
        let q = queue(&gw).await;
        assert_eq!(q["size"], 0, "round {round}: {q}");
        assert_eq!(q["stats"]["total_closed"], round);
    }
    let v = gw.endpoint_view("a").await;
    assert_view_identity(&v);
    assert_eq!(n(&v, "failed_requests"), 240);
    assert_eq!(n(&v, "successful_requests"), 6);
    assert_eq!(n(&v, "total_requests"), message_requests(&up_a));
}

/// `consecutive_failures` rises by exactly one per failed attempt, also when they race, and
/// returns to 0 on a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consecutive_failures_count_every_failure_and_reset_on_success() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let gw = Arc::new(start_a_b(builder().health("failure_threshold = 60"), &up_a, &up_b).await);
    // One at a time: 1, 2, 3.
    for k in 1..=3u64 {
        up_a.push(Script::error(502, "api_error", "bad gateway"));
        let a = post(&gw, false).await;
        assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
        gw.settle().await;
        let v = gw.endpoint_view("a").await;
        assert_eq!(n(&v, "consecutive_failures"), k, "{v}");
        assert_eq!(v["state"], "degraded");
    }
    // Twenty at the same instant: +20, none lost.
    concurrent_failures(&gw, &up_a, 20).await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(n(&v, "consecutive_failures"), 23, "{v}");
    assert_eq!(n(&v, "failed_requests"), 23);
    assert_eq!(
        v["state"], "degraded",
        "23 < threshold 60: still in rotation"
    );
    // One success: back to 0.
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(n(&v, "consecutive_failures"), 0, "{v}");
    assert_eq!(v["state"], "healthy");
    // And again from 0: forty racing failures count forty.
    concurrent_failures(&gw, &up_a, 40).await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(n(&v, "consecutive_failures"), 40, "{v}");
    assert_eq!(n(&v, "failed_requests"), 63);
    assert_eq!(n(&v, "successful_requests"), 1);
    assert_view_identity(&v);
    assert_eq!(up_a.count(), 64);
    assert_eq!(queue(&gw).await["size"], 0);
}

// ---------------------------------------------------------------------------------------------
// 6. Recovery end to end
// ---------------------------------------------------------------------------------------------

/// Sends requests until A has failed `threshold` times (each answered by B).
async fn fail_a(gw: &TestGateway, up_a: &MockUpstream, times: usize) {
    for _ in 0..times {
        up_a.push(Script::error(500, "api_error", "outage").label("outage"));
        assert_served_by_b(&post(gw, false).await);
    }
    gw.settle().await;
}

/// Outage → ejected once → fixed → probe (admin) → probation → one success → healthy; a second
/// outage is a second episode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_by_admin_probe_and_second_episode() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.set_default(Script::error(500, "api_error", "still down").label("down"));
    let gw = start_a_b(builder().health("failure_threshold = 3"), &up_a, &up_b).await;
    fail_a(&gw, &up_a, 3).await;
    let q = queue(&gw).await;
    assert_eq!(q["size"], 1, "{q}");
    assert_eq!(q["entries"][0]["name"], "a");
    assert_eq!(q["entries"][0]["reason"], "consecutive_failures");
    assert_eq!(q["entries"][0]["probation"], false);
    assert_eq!(q["stats"]["total_failed"], 1);
    assert_eq!(gw.endpoint_view("a").await["state"], "ejected");

    // Out of rotation: traffic goes to B only.
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
    assert_eq!(message_requests(&up_a), 3);

    // A probe while it is still down keeps it out.
    let p = admin_post(&gw, "a", "probe").await;
    assert_eq!(p["passed"], false, "{p}");
    assert_eq!(p["state"], "ejected");

    // A relay that answers the models probe with a page, not the API's JSON, stays out.
    up_a.push(Script::response(200, "text/html", "<html>Service ready</html>").label("probe"));
    let p = admin_post(&gw, "a", "probe").await;
    assert_eq!(p["passed"], false, "{p}");
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not a JSON object")),
        "{p}"
    );
    assert_eq!(p["state"], "ejected");

    // Fixed: the probe verifies it, and it comes back on probation.
    up_a.set_default(Script::json_ok());
    up_a.push(models_ok());
    let p = admin_post(&gw, "a", "probe").await;
    assert_eq!(p["passed"], true, "{p}");
    assert_eq!(p["detail"], "0 models listed", "{p}");
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["probation"], true, "{v}");
    assert_eq!(v["state"], "degraded", "{v}");
    let q = queue(&gw).await;
    assert_eq!(
        q["size"], 1,
        "still queued until a real request succeeds: {q}"
    );
    assert_eq!(q["entries"][0]["probation"], true);
    assert_eq!(q["entries"][0]["probe_attempts"], 3);
    assert_eq!(q["stats"]["total_verified"], 3);
    assert_eq!(q["stats"]["total_recovered"], 1);
    assert_eq!(q["stats"]["total_still_failed"], 2);
    // Probes are not attempts.
    assert_eq!(n(&v, "total_requests"), 3);
    assert_eq!(up_a.served("probe"), 2);

    // One real request on probation succeeds: healthy, queue empty.
    let a = post(&gw, false).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["state"], "healthy", "{v}");
    assert_eq!(v["probation"], false);
    assert_eq!(n(&v, "consecutive_failures"), 0);
    let q = queue(&gw).await;
    assert_eq!(q["size"], 0, "{q}");
    assert_eq!(q["stats"]["total_recovered"], 1);
    assert_eq!(q["stats"]["total_failed"], 1);

    // Second outage: a second episode.
    fail_a(&gw, &up_a, 3).await;
    let q = queue(&gw).await;
    assert_eq!(q["size"], 1, "{q}");
    assert_eq!(q["stats"]["total_failed"], 2, "{q}");
    assert_eq!(q["entries"][0]["probe_attempts"], 0, "a fresh episode");
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["state"], "ejected");
    assert_view_identity(&v);
    assert_eq!(n(&v, "total_requests"), message_requests(&up_a));
    assert_eq!(n(&v, "failed_requests"), 6);
    assert_eq!(n(&v, "successful_requests"), 1);
}

/// The message probe passes a model that read its prompt, not an upstream that echoes the request
/// back (audit: the code was in the prompt whole, so any echo carried it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_probe_is_not_passed_by_an_echo() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.set_default(Script::error(500, "api_error", "still down").label("down"));
    let gw = builder()
        .health("failure_threshold = 1")
        .endpoint(
            "a",
            &up_a.url(),
            &format!("{}\nprobe = \"message\"", prio(1)),
        )
        .endpoint("b", &up_b.url(), &prio(2))
        .start()
        .await;
    fail_a(&gw, &up_a, 1).await;
    assert_eq!(gw.endpoint_view("a").await["state"], "ejected");

    // An upstream that answers 200 with the request it got, as a message's text.
    up_a.set_default_fn(|r| {
        let echo = String::from_utf8_lossy(&r.body).into_owned();
        Script::json(200, &support::mock::anthropic_message("m", &echo, 1, 1)).label("echo")
    });
    let p = admin_post(&gw, "a", "probe").await;
    assert_eq!(up_a.served("echo"), 1, "the probe reached the echo");
    assert_eq!(p["passed"], false, "{p}");
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("did not carry the code")),
        "{p}"
    );
    assert_eq!(p["state"], "ejected");

    // A model does what the prompt asks: the two texts it names, joined.
    up_a.set_default_fn(|r| {
        let body: Value = serde_json::from_slice(&r.body).expect("a JSON probe");
        let prompt = body["messages"][0]["content"]
            .as_str()
            .expect("a text prompt");
        let texts: Vec<&str> = prompt
            .split("the text ")
            .skip(1)
            .map(|s| {
                s.split_whitespace()
                    .next()
                    .expect("a word")
                    .trim_end_matches(',')
            })
            .collect();
        assert_eq!(texts.len(), 2, "{prompt}");
        let reply = format!("{}{}", texts[0], texts[1]);
        Script::json(200, &support::mock::anthropic_message("m", &reply, 1, 1)).label("model")
    });
    let p = admin_post(&gw, "a", "probe").await;
    assert_eq!(up_a.served("model"), 1);
    assert_eq!(p["passed"], true, "{p}");
    assert_eq!(gw.endpoint_view("a").await["probation"], true);
    gw.shutdown().await;
}

/// The same recovery driven by the background prober alone (tiny probe interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_by_background_prober() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.set_default(Script::error(500, "api_error", "still down").label("down"));
    let gw = start_a_b(
        GatewayBuilder::new()
            .health("failure_threshold = 2")
            .health("probe_interval = \"20ms\"")
            .health("probe_max_interval = \"100ms\""),
        &up_a,
        &up_b,
    )
    .await;
    fail_a(&gw, &up_a, 2).await;
    assert_eq!(queue(&gw).await["stats"]["total_failed"], 1);
    let g = &gw;
    // The prober finds it still down, at least twice (growing backoff, same episode).
    eventually("two failed background probes", || async move {
        queue(g).await["stats"]["total_still_failed"]
            .as_u64()
            .is_some_and(|x| x >= 2)
    })
    .await;
    assert_eq!(gw.endpoint_view("a").await["state"], "ejected");

    up_a.set_default(Script::json_ok());
    eventually("the prober to verify A", || async move {
        g.endpoint_view("a").await["probation"] == true
    })
    .await;
    let q = queue(&gw).await;
    assert_eq!(q["size"], 1);
    assert_eq!(q["entries"][0]["probation"], true);
    assert_eq!(q["stats"]["total_recovered"], 1, "{q}");
    assert_eq!(q["stats"]["total_failed"], 1, "still one episode: {q}");
    let probes = up_a
        .received()
        .iter()
        .filter(|r| r.path() == "/v1/models")
        .count() as u64;
    assert_eq!(q["stats"]["total_verified"], probes, "{q}");

    let a = post(&gw, false).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["state"], "healthy", "{v}");
    assert_eq!(n(&v, "total_requests"), 3, "probes are not attempts: {v}");
    assert_eq!(n(&v, "total_requests"), message_requests(&up_a));
    let q = queue(&gw).await;
    assert_eq!(q["size"], 0);
    assert_eq!(q["stats"]["total_recovered"], 1);
    // Recovered endpoints are not probed any more.
    let verified = q["stats"]["total_verified"].clone();
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    assert_eq!(queue(&gw).await["stats"]["total_verified"], verified);
}

/// A 429 cools the endpoint down until its retry-after; a later, longer one extends the
/// cooldown, a shorter one never shortens it, and while it cools down it takes no traffic (that
/// it comes back by itself is `rate_limit_cooldown_ends_by_itself`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_cooldown_only_grows() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let gates: Vec<Gate> = (0..3).map(|_| Gate::new()).collect();
    for (gate, secs) in gates.iter().zip([30u64, 60, 5]) {
        up_a.push(held_error(429, gate).header("retry-after", &secs.to_string()));
    }
    let gw = Arc::new(start_a_b(builder().health("failure_threshold = 3"), &up_a, &up_b).await);
    // Three requests in flight on A at once, each holding a 429 with its own retry-after.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move { post(&gw, false).await })
        })
        .collect();
    for g in &gates {
        g.wait_arrived(1).await;
    }
    let ep_a = Arc::clone(&gw.gateway.registry.endpoints[0]);
    let clock = gw.gateway.registry.clock;

    // retry-after 30: cooling down until about now + 30 s.
    let t0 = clock.now_ms();
    gates[0].open();
    up_b.wait_requests(1).await;
    let until_30 = ep_a.live.cooldown_until_ms();
    assert!(
        until_30 >= t0 + 30_000 && until_30 <= clock.now_ms() + 30_000,
        "{until_30} vs {t0}"
    );
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["state"], "cooling_down", "{v}");
    let shown = parse_time(&v["cooldown_until"]);
    let in_secs = shown
        .duration_since(SystemTime::now())
        .expect("in the future")
        .as_secs_f64();
    assert!(
        (28.0..=31.0).contains(&in_secs),
        "cooldown_until in {in_secs} s"
    );
    let q = queue(&gw).await;
    assert_eq!(q["size"], 1);
    assert_eq!(q["entries"][0]["reason"], "rate_limited");
    assert_eq!(q["stats"]["total_failed"], 1);

    // retry-after 60: extended.
    let t1 = clock.now_ms();
    gates[1].open();
    up_b.wait_requests(2).await;
    let until_60 = ep_a.live.cooldown_until_ms();
    assert!(until_60 >= t1 + 60_000, "extended: {until_60} vs {t1}");
    let v = gw.endpoint_view("a").await;
    let in_secs = parse_time(&v["cooldown_until"])
        .duration_since(SystemTime::now())
        .expect("future")
        .as_secs_f64();
    assert!(
        (58.0..=61.0).contains(&in_secs),
        "cooldown_until in {in_secs} s"
    );

    // retry-after 5: never shortens.
    gates[2].open();
    up_b.wait_requests(3).await;
    assert_eq!(
        ep_a.live.cooldown_until_ms(),
        until_60,
        "a shorter retry-after never shortens"
    );
    assert_eq!(gw.endpoint_view("a").await["state"], "cooling_down");
    for c in clients {
        assert_served_by_b(&c.await.expect("client"));
    }
    gw.settle().await;
    let q = queue(&gw).await;
    assert_eq!(q["size"], 1);
    assert_eq!(q["stats"]["total_failed"], 1, "one cooldown episode: {q}");
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["outcomes"]["rate_limited"], 3);
    assert_eq!(n(&v, "in_flight"), 0);

    // While cooling down it takes no traffic.
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
    assert_eq!(up_a.count(), 3);
}

/// A short cooldown ends on its own: the prober returns the endpoint to rotation with no request
/// and no probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_cooldown_ends_by_itself() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.push(Script::rate_limited(1));
    let gw = start_a_b(builder(), &up_a, &up_b).await;
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
    assert_eq!(gw.endpoint_view("a").await["state"], "cooling_down");
    let g = &gw;
    eventually("the cooldown to expire", || async move {
        // Back in rotation, and not `degraded` by the 429 it already sat out (issue 21 #8).
        g.endpoint_view("a").await["state"] == "healthy"
    })
    .await;
    let q = queue(&gw).await;
    assert_eq!(q["size"], 0, "{q}");
    assert_eq!(q["stats"]["total_failed"], 1);
    assert_eq!(q["stats"]["total_closed"], 1);
    assert_eq!(q["stats"]["total_verified"], 0, "no probe was needed");
    assert_eq!(up_a.count(), 1);
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    gw.settle().await;
    assert_eq!(gw.endpoint_view("a").await["state"], "healthy");
}

/// A 401 disables the endpoint until a probe verifies its credential; the secret never shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_failure_disables_until_a_probe_passes() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.set_default(Script::error(
        401,
        "authentication_error",
        "invalid x-api-key",
    ));
    let gw = builder()
        .health("failure_threshold = 3")
        .endpoint(
            "a",
            &up_a.url(),
            &format!("{}\napi_key = \"sk-secret-aaaa\"", prio(1)),
        )
        .endpoint("b", &up_b.url(), &prio(2))
        .start()
        .await;
    let a = post(&gw, false).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["state"], "disabled", "{v}");
    assert_eq!(v["enabled"], true, "not switched off by an operator: {v}");
    assert_eq!(v["outcomes"]["auth"], 1);
    let q = queue(&gw).await;
    assert_eq!(q["size"], 1);
    assert_eq!(q["entries"][0]["reason"], "auth");
    assert_eq!(q["stats"]["total_failed"], 1);
    for view in [gw.admin("endpoints").await, q.clone()] {
        assert!(
            !view.to_string().contains("sk-secret-aaaa"),
            "secret leaked: {view}"
        );
    }
    // Out until verified: traffic goes to B.
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
    assert_eq!(up_a.count(), 1);
    let p = admin_post(&gw, "a", "probe").await;
    assert_eq!(p["passed"], false, "{p}");
    assert_eq!(p["state"], "disabled");
    assert_eq!(
        up_a.received()[1].header("x-api-key"),
        Some("sk-secret-aaaa")
    );

    up_a.set_default(Script::json_ok());
    up_a.push(models_ok());
    let p = admin_post(&gw, "a", "probe").await;
    assert_eq!(p["passed"], true, "{p}");
    assert_eq!(gw.endpoint_view("a").await["probation"], true);
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["state"], "healthy", "{v}");
    let q = queue(&gw).await;
    assert_eq!(q["size"], 0);
    assert_eq!(q["stats"]["total_failed"], 1);
    assert_eq!(q["stats"]["total_recovered"], 1);
}

/// An attempt that began before its endpoint left rotation does not bring it back when it
/// succeeds: a stream opened before a 429, a 401 or an ejection proves nothing about the endpoint
/// since. The endpoint stays out until its cooldown ends or a probe verifies it, takes no traffic
/// meanwhile, and the outage stays one episode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_success_that_began_before_the_outage_does_not_end_it() {
    let faults: [(&str, Script, &str); 3] = [
        ("429", Script::rate_limited(60), "cooling_down"),
        (
            "401",
            Script::error(401, "authentication_error", "invalid x-api-key"),
            "disabled",
        ),
        (
            "500",
            Script::error(500, "api_error", "mock failure"),
            "ejected",
        ),
    ];
    for (label, fault, out) in faults {
        let up_a = MockUpstream::start().await;
        let up_b = MockUpstream::start().await;
        let gate = Gate::new();
        // The first request on A: a stream that sends its first content, then waits for the gate.
        up_a.push(Script::sse_ok(3).gate_after(3, gate.clone()));
        up_a.set_default(fault);
        let gw = Arc::new(start_a_b(builder().health("failure_threshold = 1"), &up_a, &up_b).await);
        let early = {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move { post(&gw, true).await })
        };
        gate.wait_arrived(1).await;
        // The next request takes A out and is served by B.
        assert_served_by_b(&post(&gw, false).await);
        assert_eq!(gw.endpoint_view("a").await["state"], out, "{label}");
        // The stream that began before ends well.
        gate.open();
        let a = early.await.expect("client");
        assert_eq!(a.status, StatusCode::OK, "{label}: {}", a.text());
        assert_eq!(a.header("x-ccgate-endpoint"), Some("a"), "{label}");
        assert!(a.text().contains("message_stop"), "{label}: {}", a.text());
        gw.settle().await;

        let v = gw.endpoint_view("a").await;
        assert_eq!(v["state"], out, "{label}: still out: {v}");
        assert_eq!(v["successful_requests"], 1, "{label}: {v}");
        assert_eq!(n(&v, "in_flight"), 0, "{label}");
        let q = queue(&gw).await;
        assert_eq!(q["size"], 1, "{label}: {q}");
        assert_eq!(q["stats"]["total_failed"], 1, "{label}: {q}");
        assert_eq!(q["stats"]["total_closed"], 0, "{label}: {q}");
        // Still out: the next request goes to B without touching A.
        assert_served_by_b(&post(&gw, false).await);
        assert_eq!(message_requests(&up_a), 2, "{label}");
        assert_eq!(queue(&gw).await["stats"]["total_failed"], 1, "{label}");
    }
}

/// The admin switch is separate from health: a disabled endpoint gets no traffic and no queue
/// entry, enabling restores it, and switching an ejected endpoint off and on leaves it ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_disable_is_separate_from_health() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let gw = start_a_b(builder().health("failure_threshold = 2"), &up_a, &up_b).await;
    let v = admin_post(&gw, "a", "disable").await;
    assert_eq!(v["state"], "disabled");
    assert_eq!(v["enabled"], false);
    for _ in 0..5 {
        let a = post(&gw, false).await;
        assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
    }
    assert_eq!(up_a.count(), 0);
    let q = queue(&gw).await;
    assert_eq!(q["size"], 0, "switching off is not a failure: {q}");
    assert_eq!(q["stats"]["total_failed"], 0);
    let v = admin_post(&gw, "a", "enable").await;
    assert_eq!(v["state"], "healthy");
    assert_eq!(v["enabled"], true);
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));

    // Ejected (and still down), then switched off and on: still ejected, still one episode.
    // Enabling asks for a probe at once; it finds the endpoint down.
    up_a.set_default(Script::error(500, "api_error", "down"));
    fail_a(&gw, &up_a, 2).await;
    assert_eq!(gw.endpoint_view("a").await["state"], "ejected");
    assert_eq!(admin_post(&gw, "a", "disable").await["state"], "disabled");
    let v = admin_post(&gw, "a", "enable").await;
    assert_eq!(v["state"], "ejected", "{v}");
    let g = &gw;
    eventually("the probe that enabling asks for", || async move {
        queue(g).await["stats"]["total_verified"] == 1
    })
    .await;
    let q = queue(&gw).await;
    assert_eq!(q["size"], 1, "{q}");
    assert_eq!(q["stats"]["total_failed"], 1);
    assert_eq!(q["stats"]["total_still_failed"], 1);
    assert_eq!(gw.endpoint_view("a").await["state"], "ejected");
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some("b"));
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_view_identity(&v);
    assert_eq!(n(&v, "total_requests"), 3);
    assert_eq!(n(&v, "total_requests"), message_requests(&up_a));
}

// ---------------------------------------------------------------------------------------------
// 7. Never strand
// ---------------------------------------------------------------------------------------------

/// With every endpoint ejected, a request is still tried on the endpoint expected back soonest,
/// and the answer says so in `x-ccgate-fallback`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_ejected_still_tries_the_least_bad() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.set_default(Script::error(500, "api_error", "down"));
    up_b.set_default(Script::error(500, "api_error", "down"));
    let gw = start_a_b(builder().health("failure_threshold = 1"), &up_a, &up_b).await;
    let a = post(&gw, false).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    gw.settle().await;
    let q = queue(&gw).await;
    assert_eq!(q["size"], 2, "{q}");
    assert_eq!(q["stats"]["total_failed"], 2);

    // The least-bad endpoint: soonest next probe (ties to the preferred one).
    let least_bad = || {
        let entries = gw.gateway.registry.queue.entries();
        let best = entries
            .iter()
            .min_by_key(|e| (e.next_probe_at_ms, e.idx))
            .expect("entries");
        best.name.clone()
    };

    // Still down: exactly one attempt, on the least-bad one, then an honest 5xx.
    let expected = least_bad();
    let before = [message_requests(&up_a), message_requests(&up_b)];
    let a = post(&gw, false).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert!(a.header("retry-after").is_some());
    assert!(
        a.text().contains(&format!("({expected}: HTTP 500")),
        "{}",
        a.text()
    );
    let after = [message_requests(&up_a), message_requests(&up_b)];
    let tried = usize::from(expected == "b");
    assert_eq!(
        after[tried],
        before[tried] + 1,
        "one attempt, on {expected}"
    );
    assert_eq!(after[1 - tried], before[1 - tried], "none on the other");
    assert_eq!(n(&gw.admin("stats").await, "fallbacks"), 1);

    // Both fixed, both still ejected: the least-bad one serves, and says so.
    up_a.set_default(Script::json_ok());
    up_b.set_default(Script::json_ok());
    let expected = least_bad();
    let a = post(&gw, false).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.header("x-ccgate-fallback"), Some("least-bad"));
    assert_eq!(a.header("x-ccgate-endpoint"), Some(expected.as_str()));
    gw.settle().await;
    let s = gw.admin("stats").await;
    assert_stats_identity(&s);
    assert_eq!(n(&s, "fallbacks"), 2);
    // A real success brought it back; the next request needs no fallback.
    assert_eq!(gw.endpoint_view(&expected).await["state"], "healthy");
    assert_eq!(queue(&gw).await["size"], 1);
    let a = post(&gw, false).await;
    assert_eq!(a.header("x-ccgate-endpoint"), Some(expected.as_str()));
    assert_eq!(a.header("x-ccgate-fallback"), None);
}
