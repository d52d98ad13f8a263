//! Selection: strategy distributions, `least_latency`, session affinity, the retry budget and
//! per-endpoint model mapping — through the real server where the behaviour is visible from
//! outside, and through the real selector and counters (with tokio's paused clock) where the
//! behaviour takes minutes of wall time.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ccgate::config::{Config, Strategy};
use ccgate::health::attempt::Attempt;
use ccgate::health::classify::Outcome;
use ccgate::health::registry::Registry;
use ccgate::select::strategy::{Selector, Tried};
use http::Method;
use serde_json::json;
use support::gateway::{GatewayBuilder, TestGateway};
use support::mock::{MockUpstream, Script};

fn config(strategy: &str, endpoints: &[(&str, u32, u32)]) -> Config {
    let mut text = format!("[server]\nlisten = \"127.0.0.1:0\"\nstrategy = \"{strategy}\"\n");
    for (name, priority, weight) in endpoints {
        text.push_str(&format!(
            "[[endpoints]]\nname = \"{name}\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\npriority = {priority}\nweight = {weight}\n"
        ));
    }
    Config::from_toml(&text, "test", &|_: &str| None).expect("config")
}

/// How often each endpoint comes first over `n` rankings with a seeded random source.
fn first_place_shares(strategy: &str, endpoints: &[(&str, u32, u32)], n: u32) -> Vec<f64> {
    let cfg = config(strategy, endpoints);
    let reg = Registry::new(&cfg).expect("registry");
    let sel = Selector::new(cfg.server.strategy);
    let mut rng = fastrand::Rng::with_seed(20261124);
    let mut first = vec![0u32; endpoints.len()];
    for _ in 0..n {
        let r = sel.rank(&reg.endpoints, reg.clock.now_ms(), &mut rng);
        assert_eq!(r.len(), endpoints.len(), "every endpoint ranked once");
        let mut seen = r.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), endpoints.len(), "no endpoint twice: {r:?}");
        first[r[0]] += 1;
    }
    first.iter().map(|&c| f64::from(c) / f64::from(n)).collect()
}

fn assert_shares(got: &[f64], want: &[f64], tolerance: f64) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance,
            "endpoint {i}: share {g:.4}, expected {w:.4} ± {tolerance} (all: {got:?})"
        );
    }
}

#[tokio::test]
async fn strategies_distribute_as_defined() {
    let n = 20_000;
    // Priority: tier 1 always first, split 1:3 inside the tier; tier 2 never first.
    let eps = [("a", 1, 100), ("b", 1, 300), ("c", 2, 1000)];
    assert_shares(
        &first_place_shares("priority", &eps, n),
        &[0.25, 0.75, 0.0],
        0.015,
    );
    // Weighted ignores priority: 100:300:1000.
    assert_shares(
        &first_place_shares("weighted", &eps, n),
        &[100.0 / 1400.0, 300.0 / 1400.0, 1000.0 / 1400.0],
        0.015,
    );
    // Round robin: exactly equal turns.
    assert_shares(
        &first_place_shares("round_robin", &eps, 3000),
        &[1.0 / 3.0; 3],
        0.0,
    );
    // Least latency with no evidence: every endpoint equally likely.
    assert_shares(
        &first_place_shares("least_latency", &eps, n),
        &[1.0 / 3.0; 3],
        0.015,
    );
}

/// Round robin turns over the endpoints that can take the request: one switched off, or one the
/// request skips (it does not serve the model), hands its turn to no one (audit: the next in the
/// list got a double share), and still comes last in the ranking.
#[tokio::test]
async fn round_robin_turns_only_over_the_endpoints_that_can_take_the_request() {
    let mut text = "[server]\nstrategy = \"round_robin\"\n".to_owned();
    for i in 0..4 {
        let enabled = i != 1;
        text.push_str(&format!(
            "[[endpoints]]\nname = \"e{i}\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\nenabled = {enabled}\n"
        ));
    }
    let cfg = Config::from_toml(&text, "test", &|_: &str| None).expect("config");
    let reg = Registry::new(&cfg).expect("registry");
    let sel = Selector::new(cfg.server.strategy);
    let mut rng = fastrand::Rng::with_seed(7);
    let now = reg.clock.now_ms();
    let firsts = |skip: Tried, rng: &mut fastrand::Rng| {
        let mut first = [0u32; 4];
        for _ in 0..600 {
            let r = sel.rank_except(&reg.endpoints, skip, now, rng);
            assert_eq!(r.len(), 4, "every endpoint ranked: {r:?}");
            // The ones that cannot take it last, in list order.
            let last: &[usize] = if skip.contains(3) { &[1, 3] } else { &[1] };
            assert_eq!(&r[4 - last.len()..], last, "{r:?}");
            first[r[0]] += 1;
        }
        first
    };
    assert_eq!(firsts(Tried::default(), &mut rng), [200, 0, 200, 200]);
    let mut skip = Tried::default();
    skip.insert(3);
    assert_eq!(firsts(skip, &mut rng), [300, 0, 300, 0]);
}

/// Simulates one request of `latency` to first byte on the endpoint ranked first, on the paused
/// clock, through the real `Attempt` recording path.
async fn simulate(
    reg: &Registry,
    sel: &Selector,
    rng: &mut fastrand::Rng,
    latency: impl Fn(usize) -> (Duration, bool),
) -> usize {
    let r = sel.rank(&reg.endpoints, reg.clock.now_ms(), rng);
    let ep = Arc::clone(&reg.endpoints[r[0]]);
    let (d, ok) = latency(ep.idx);
    let attempt = Attempt::begin(Arc::clone(&ep), Arc::clone(&reg.recorder), false);
    tokio::time::advance(d).await;
    attempt.first_byte();
    attempt.finish(
        if ok {
            Outcome::Success
        } else {
            Outcome::ServerError
        },
        None,
    );
    ep.idx
}

#[tokio::test(start_paused = true)]
async fn least_latency_leaves_a_slow_endpoint_and_returns_when_it_recovers() {
    let mut cfg = config("least_latency", &[("a", 1, 100), ("b", 1, 100)]);
    cfg.health.failure_threshold = 1000;
    let reg = Registry::new(&cfg).expect("registry");
    let sel = Selector::new(Strategy::LeastLatency);
    let mut rng = fastrand::Rng::with_seed(7);
    let fast = Duration::from_millis(20);
    let slow = Duration::from_millis(800);

    // Phase 1: both fast — traffic is shared.
    let mut counts = [0u32; 2];
    for _ in 0..400 {
        counts[simulate(&reg, &sel, &mut rng, |_| (fast, true)).await] += 1;
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    assert!(
        counts[0] > 120 && counts[1] > 120,
        "shared while equal: {counts:?}"
    );

    // Phase 2: `a` turns slow — it is left almost entirely (only decay-driven re-checks).
    let mut counts = [0u32; 2];
    for _ in 0..400 {
        let i = simulate(&reg, &sel, &mut rng, |i| {
            (if i == 0 { slow } else { fast }, true)
        })
        .await;
        counts[i] += 1;
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    assert!(counts[0] <= 20, "slow endpoint still got {counts:?}");

    // Phase 3: `a` recovers — its stale estimate decays, it is re-checked, found fast, and
    // gets its share back.
    // Within a minute of simulated time (the decay constant is 10 s) it is back in the mix.
    let mut counts = [0u32; 2];
    for i in 0..1600 {
        let served = simulate(&reg, &sel, &mut rng, |_| (fast, true)).await;
        if i >= 1200 {
            counts[served] += 1;
        }
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    assert!(
        counts[0] > 120 && counts[1] > 120,
        "recovered endpoint did not get its share back: {counts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn least_latency_counts_fast_failures_as_slow() {
    let mut cfg = config("least_latency", &[("a", 1, 100), ("b", 1, 100)]);
    cfg.health.failure_threshold = 1000;
    let reg = Registry::new(&cfg).expect("registry");
    let sel = Selector::new(Strategy::LeastLatency);
    let mut rng = fastrand::Rng::with_seed(11);
    let mut counts = [0u32; 2];
    for _ in 0..400 {
        // `a` fails in one millisecond; `b` succeeds in 300.
        let i = simulate(&reg, &sel, &mut rng, |i| {
            if i == 0 {
                (Duration::from_millis(1), false)
            } else {
                (Duration::from_millis(300), true)
            }
        })
        .await;
        counts[i] += 1;
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    assert!(
        counts[0] <= 20,
        "a fast-failing endpoint attracted traffic: {counts:?}"
    );
}

/// Endpoint 0 answers one request in 20 ms (paused clock).
async fn known_answers(reg: &Registry) {
    let a = Attempt::begin(
        Arc::clone(&reg.endpoints[0]),
        Arc::clone(&reg.recorder),
        false,
    );
    tokio::time::advance(Duration::from_millis(20)).await;
    a.first_byte();
    a.finish(Outcome::Success, None);
}

/// The open attempts answer, now.
fn answer_all(open: &mut Vec<Attempt>) {
    for a in open.drain(..) {
        a.first_byte();
        a.finish(Outcome::Success, None);
    }
}

/// Forty requests ranked and begun (left open) at one instant; how many went to endpoint 1.
fn burst(
    reg: &Registry,
    sel: &Selector,
    rng: &mut fastrand::Rng,
    open: &mut Vec<Attempt>,
) -> usize {
    let mut to_new = 0;
    for _ in 0..40 {
        let r = sel.rank(&reg.endpoints, reg.clock.now_ms(), rng);
        to_new += usize::from(r[0] == 1);
        open.push(Attempt::begin(
            Arc::clone(&reg.endpoints[r[0]]),
            Arc::clone(&reg.recorder),
            false,
        ));
    }
    to_new
}

#[tokio::test(start_paused = true)]
async fn least_latency_tries_an_unknown_endpoint_with_one_attempt_not_a_burst() {
    let mut cfg = config("least_latency", &[("known", 1, 100), ("new", 1, 100)]);
    cfg.health.failure_threshold = 1000;
    let reg = Registry::new(&cfg).expect("registry");
    let sel = Selector::new(Strategy::LeastLatency);
    let mut rng = fastrand::Rng::with_seed(5);
    // `known` has answered in 20 ms; `new` has never answered.
    for _ in 0..5 {
        known_answers(&reg).await;
    }
    // A burst of 40 requests arrives before `new` has answered any: it gets one to learn from,
    // not every one that draws it (its unknown estimate costs nothing, however many wait on it).
    let mut open = Vec::new();
    let to_new = burst(&reg, &sel, &mut rng, &mut open);
    assert_eq!(to_new, 1, "the unknown endpoint got {to_new} of the burst");
    // Once it has answered as fast as `known`, it takes its share.
    tokio::time::advance(Duration::from_millis(20)).await;
    answer_all(&mut open);
    let to_new = burst(&reg, &sel, &mut rng, &mut open);
    assert!(
        (10..=30).contains(&to_new),
        "after answering: {to_new} of 40"
    );

    // Idle for four decay constants while `known` keeps answering: `new`'s estimate has decayed
    // to almost nothing without being zero, and says nothing any more. Again one attempt of the
    // burst, not all of it.
    answer_all(&mut open);
    tokio::time::advance(Duration::from_secs(40)).await;
    known_answers(&reg).await;
    let now = reg.clock.now_ms();
    assert!(reg.endpoints[1].live.estimate.get(now) > Duration::ZERO);
    let to_new = burst(&reg, &sel, &mut rng, &mut open);
    assert_eq!(to_new, 1, "the idle endpoint got {to_new} of the burst");
}

/// Two endpoints, `bad` scripted by the caller and `good` answering at once: after `bad` has
/// been tried (it is unknown at first), `least_latency` sends everything to `good`.
async fn least_latency_leaves(bad_script: Script) {
    let bad = MockUpstream::start().await;
    bad.set_default(bad_script);
    let good = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .server("strategy = \"least_latency\"")
        .health("failure_threshold = 1000")
        .endpoint("bad", &bad.url(), "")
        .endpoint("good", &good.url(), "")
        .start()
        .await;
    let n = 50;
    for _ in 0..n {
        let a = gw
            .post("/v1/messages", &[], &TestGateway::message_body(false))
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    gw.settle().await;
    assert!(
        good.count() >= n - 1,
        "the good endpoint served {} of {n} requests",
        good.count()
    );
    assert!(
        bad.count() <= 2,
        "bad endpoint got {} requests",
        bad.count()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_through_the_server_avoids_a_slow_endpoint() {
    least_latency_leaves(Script::json_ok().delay_before_headers(Duration::from_millis(150))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_through_the_server_avoids_a_fast_failing_endpoint() {
    least_latency_leaves(Script::error(500, "api_error", "broken")).await;
}

fn body_with_user_id(user_id: &str) -> serde_json::Value {
    json!({
        "model": "claude-sonnet-4",
        "max_tokens": 16,
        "metadata": {"user_id": user_id},
        "messages": [{"role": "user", "content": "hi"}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_on_one_endpoint_and_moves_on_ejection_for_good() {
    let ups = [
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    ];
    let gw = GatewayBuilder::new()
        .server("strategy = \"weighted\"")
        .health("failure_threshold = 1")
        .health("probe_interval = \"1h\"")
        .endpoint("a", &ups[0].url(), "")
        .endpoint("b", &ups[1].url(), "")
        .endpoint("c", &ups[2].url(), "")
        .start()
        .await;
    let session = [("x-claude-code-session-id", "session-1")];
    let mut first = None;
    for _ in 0..20 {
        let a = gw
            .post("/v1/messages", &session, &TestGateway::message_body(false))
            .await;
        assert_eq!(a.status, 200);
        let ep = a
            .header("x-ccgate-endpoint")
            .expect("endpoint header")
            .to_string();
        assert_eq!(
            *first.get_or_insert_with(|| ep.clone()),
            ep,
            "session moved without cause"
        );
    }
    let bound = first.expect("served");
    let bound_idx = ["a", "b", "c"]
        .iter()
        .position(|n| *n == bound)
        .expect("known");

    // The bound endpoint breaks: the next request fails over, the endpoint is ejected, and the
    // session moves.
    ups[bound_idx].set_default(Script::error(500, "api_error", "down"));
    let a = gw
        .post("/v1/messages", &session, &TestGateway::message_body(false))
        .await;
    assert_eq!(a.status, 200);
    let moved_to = a.header("x-ccgate-endpoint").expect("endpoint").to_string();
    assert_ne!(moved_to, bound);
    assert_eq!(gw.endpoint_view(&bound).await["state"], "ejected");

    // It recovers (a probe verifies it) — the session does not bounce back.
    ups[bound_idx].set_default(Script::json_ok());
    let probe = gw
        .request(
            Method::POST,
            &format!("/_ccgate/endpoints/{bound}/probe"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(probe.json()["passed"], true, "{}", probe.text());
    let before = ups[bound_idx].count();
    for _ in 0..20 {
        let a = gw
            .post("/v1/messages", &session, &TestGateway::message_body(false))
            .await;
        assert_eq!(a.header("x-ccgate-endpoint"), Some(moved_to.as_str()));
    }
    assert_eq!(
        ups[bound_idx].count(),
        before,
        "the recovered endpoint got the session back"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_key_from_metadata_user_id_and_no_key_is_balanced() {
    let ups = [MockUpstream::start().await, MockUpstream::start().await];
    let gw = GatewayBuilder::new()
        .server("strategy = \"round_robin\"")
        .endpoint("a", &ups[0].url(), "")
        .endpoint("b", &ups[1].url(), "")
        .start()
        .await;
    // Claude Code's JSON-encoded user_id: one session → one endpoint, despite round robin.
    let uid = r#"{"device_id":"d1","account_uuid":"acc","session_id":"sess-json"}"#;
    let mut served = HashMap::new();
    for _ in 0..10 {
        let a = gw.post("/v1/messages", &[], &body_with_user_id(uid)).await;
        *served
            .entry(a.header("x-ccgate-endpoint").unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(served.len(), 1, "{served:?}");
    // No key: round robin alternates.
    let mut served = HashMap::new();
    for _ in 0..10 {
        let a = gw
            .post("/v1/messages", &[], &TestGateway::message_body(false))
            .await;
        *served
            .entry(a.header("x-ccgate-endpoint").unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(served.get("a"), Some(&5), "{served:?}");
    assert_eq!(served.get("b"), Some(&5), "{served:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_map_stays_bounded() {
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .table("affinity", "max_sessions = 32")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    for i in 0..300 {
        let id = format!("s-{i}");
        let a = gw
            .post(
                "/v1/messages",
                &[("x-claude-code-session-id", &id)],
                &TestGateway::message_body(false),
            )
            .await;
        assert_eq!(a.status, 200);
    }
    let sessions = gw.admin("stats").await["sessions"]
        .as_u64()
        .expect("sessions");
    assert!(sessions > 0 && sessions <= 32, "{sessions} sessions held");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_against_failing_endpoints_spends_only_the_budget() {
    let ups = [
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    ];
    for up in &ups {
        up.set_default(Script::error(500, "api_error", "down"));
    }
    let gw = Arc::new(
        GatewayBuilder::new()
            .server("max_attempts = 3")
            .server("strategy = \"weighted\"")
            .health("failure_threshold = 1000")
            .table("retry_budget", "ratio = 0.1")
            .table("retry_budget", "min_per_second = 0")
            .table("retry_budget", "window = \"1h\"")
            .endpoint("a", &ups[0].url(), "")
            .endpoint("b", &ups[1].url(), "")
            .endpoint("c", &ups[2].url(), "")
            .start()
            .await,
    );
    let n = 400;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let gw = Arc::clone(&gw);
        tasks.spawn(async move {
            gw.post("/v1/messages", &[], &TestGateway::message_body(false))
                .await
                .status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), 502);
    }
    gw.settle().await;
    let sent: usize = ups.iter().map(|u| u.count()).sum();
    let stats = gw.admin("stats").await;
    // Without a budget this storm would send 3 × 400 = 1200 attempts.
    assert!(sent >= n, "every request was tried once: {sent}");
    assert!(
        sent <= n + n / 10,
        "sent {sent} attempts for {n} requests; budget allows {}",
        n / 10
    );
    assert_eq!(stats["retries"].as_u64(), Some((sent - n) as u64));
    assert!(stats["budget_refusals"].as_u64().unwrap_or(0) > 0);
    assert_eq!(stats["total_requests"], n);
    Arc::try_unwrap(gw)
        .ok()
        .expect("sole owner")
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_map_rewrites_only_the_model_for_that_endpoint() {
    let mapped = MockUpstream::start().await;
    mapped.set_default(Script::error(529, "overloaded_error", "busy"));
    let plain = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint(
            "mapped",
            &mapped.url(),
            "model_map = { \"claude-opus-4\" = \"relay-opus\" }",
        )
        .endpoint("plain", &plain.url(), "priority = 2")
        .start()
        .await;
    // Unusual spacing, key order and a nested "model" that must not change.
    let body = "{ \"messages\":[{\"role\":\"user\",\"content\":\"say \\\"model\\\": claude-opus-4\"}],\n  \"model\" :  \"claude-opus-4\", \"metadata\":{\"model\":\"claude-opus-4\"},\"max_tokens\":8}";
    let a = gw
        .request(
            Method::POST,
            "/v1/messages",
            &[("content-type", "application/json")],
            Bytes::from(body),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("x-ccgate-endpoint"), Some("plain"));
    let to_mapped = mapped
        .received()
        .pop()
        .expect("mapped endpoint tried first");
    let expected = body.replacen(
        "\"model\" :  \"claude-opus-4\"",
        "\"model\" :  \"relay-opus\"",
        1,
    );
    assert_eq!(String::from_utf8_lossy(&to_mapped.body), expected);
    let to_plain = plain.received().pop().expect("plain endpoint served");
    assert_eq!(
        to_plain.body,
        Bytes::from(body),
        "an endpoint without a map gets the original bytes"
    );
    // The response is relayed as the upstream sent it.
    assert_eq!(a.json()["model"], plain_model());
    gw.shutdown().await;
}

fn plain_model() -> &'static str {
    support::mock::MOCK_MODEL
}

/// The endpoint each session's next request is served by, in order.
async fn serve_sessions(gw: &TestGateway, sessions: &[String]) -> Vec<String> {
    let mut served = Vec::new();
    for s in sessions {
        let a = gw
            .post(
                "/v1/messages",
                &[("x-claude-code-session-id", s.as_str())],
                &TestGateway::message_body(false),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        served.push(a.header("x-ccgate-endpoint").expect("endpoint").to_string());
    }
    served
}

/// SPEC §7: an endpoint that leaves rotation loses its sessions, which move and stay moved —
/// also the sessions that sent nothing while it was out (audit: they all went back to it).
/// Round robin makes the unbound choice visible: half of the lost sessions land elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_idle_while_their_endpoint_was_out_lose_it() {
    let ups = [MockUpstream::start().await, MockUpstream::start().await];
    let gw = GatewayBuilder::new()
        .server("strategy = \"round_robin\"")
        .health("failure_threshold = 1")
        .health("probe_interval = \"1h\"")
        .endpoint("a", &ups[0].url(), "")
        .endpoint("b", &ups[1].url(), "")
        .start()
        .await;
    let sessions: Vec<String> = (0..12).map(|i| format!("idle-{i}")).collect();
    let first = serve_sessions(&gw, &sessions).await;
    assert_eq!(serve_sessions(&gw, &sessions).await, first, "bindings hold");
    let on_a = |served: &[String]| -> Vec<String> {
        sessions
            .iter()
            .zip(served)
            .filter(|(_, e)| *e == "a")
            .map(|(s, _)| s.clone())
            .collect()
    };

    // Switched off and on again by an operator, with no session traffic in between.
    let mut bound_to_a = on_a(&first);
    assert!(bound_to_a.len() >= 4, "{first:?}");
    for action in ["disable", "enable"] {
        let path = format!("/_ccgate/endpoints/a/{action}");
        let r = gw.request(Method::POST, &path, &[], Bytes::new()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let after = serve_sessions(&gw, &bound_to_a).await;
    assert!(
        after.iter().any(|e| e == "b"),
        "sessions bound to a switched-off endpoint went back to it: {after:?}"
    );
    assert_eq!(
        serve_sessions(&gw, &bound_to_a).await,
        after,
        "moved for good"
    );

    // Ejected by other traffic's failure, then verified and back in rotation.
    let served = serve_sessions(&gw, &sessions).await;
    bound_to_a = on_a(&served);
    assert!(bound_to_a.len() >= 2, "{served:?}");
    ups[0].set_default(Script::error(500, "api_error", "down"));
    // Round robin sends the next request or the one after to `a`, which fails once: ejected.
    for _ in 0..2 {
        let a = gw.post_message(false).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert_eq!(gw.endpoint_view("a").await["state"], "ejected");
    ups[0].set_default(Script::json_ok());
    let r = gw
        .request(
            Method::POST,
            "/_ccgate/endpoints/a/probe",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.json()["passed"], true, "{}", r.text());
    // On probation, `a` takes the next request or the one after, and its success brings it back.
    for _ in 0..2 {
        assert_eq!(gw.post_message(false).await.status, 200);
    }
    assert_eq!(gw.endpoint_view("a").await["state"], "healthy");
    let after = serve_sessions(&gw, &bound_to_a).await;
    assert!(
        after.iter().any(|e| e == "b"),
        "sessions bound to an ejected endpoint went back to it: {after:?}"
    );
    assert_eq!(
        serve_sessions(&gw, &bound_to_a).await,
        after,
        "moved for good"
    );
    gw.shutdown().await;
}
