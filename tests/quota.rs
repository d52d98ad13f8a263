//! Quota-aware steering: an endpoint whose answers say it is close to its rate limit
//! (`anthropic-ratelimit-*` headers) is ranked last until its window resets — before it ever
//! answers 429 — and a 429 still cools it down as before. Through the real server, and through
//! the real selector on tokio's paused clock for the exact reset time.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ccgate::config::Config;
use ccgate::health::classify::Quota;
use ccgate::health::registry::Registry;
use ccgate::select::strategy::Selector;
use http::Method;
use support::gateway::GatewayBuilder;
use support::mock::{MockUpstream, Script};
use support::wait::eventually;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_near_its_limit_is_ranked_last_until_its_reset() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint("a", &a.url(), "priority = 1")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;

    // `a` answers well, but says 97 % of its five-hour window is used, resetting in about 2 s.
    let reset = unix_now() + 2;
    a.push(
        Script::json_ok()
            .header("anthropic-ratelimit-unified-status", "allowed")
            .header("anthropic-ratelimit-unified-5h-utilization", "0.97")
            .header("anthropic-ratelimit-unified-5h-reset", &reset.to_string())
            .header("anthropic-ratelimit-unified-7d-utilization", "0.2"),
    );
    let r = gw.post_message(false).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ccgate-endpoint"), Some("a"));

    let view = gw.endpoint_view("a").await;
    let q = &view["quota"];
    assert_eq!(q["near_limit"], true, "{view}");
    let left = q["remaining_fraction"].as_f64().expect("fraction");
    assert!((left - 0.03).abs() < 1e-9, "{view}");
    // The reset as the headers gave it, to the second (audit: shown a second early).
    let want = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(reset),
    )
    .to_string();
    assert_eq!(q["reset"], want.as_str(), "{view}");
    assert_eq!(
        view["state"], "healthy",
        "near the limit is not a failure: {view}"
    );
    assert_eq!(
        gw.endpoint_view("b").await["quota"],
        serde_json::Value::Null
    );

    let metrics = gw
        .request(Method::GET, "/_ccgate/metrics", &[], Bytes::new())
        .await
        .text();
    assert!(
        metrics.contains("ccgate_endpoint_quota_near_limit{endpoint=\"a\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ccgate_endpoint_quota_remaining_ratio{endpoint=\"a\"} 0.03"),
        "{metrics}"
    );

    // Before its reset the preferred endpoint is ranked last: `b` serves, `a` sees nothing.
    for _ in 0..3 {
        let r = gw.post_message(false).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ccgate-endpoint"), Some("b"));
    }
    assert_eq!(a.count(), 1);

    // Once the window has reset, `a` is preferred again.
    eventually("a's quota window to reset", || async {
        gw.endpoint_view("a").await["quota"]["near_limit"] == false
    })
    .await;
    let r = gw.post_message(false).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("a"), "{}", r.text());
    assert_eq!(a.count(), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_near_its_limit_still_serves_as_failover_and_a_429_still_cools_down() {
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint("a", &a.url(), "priority = 1")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;

    // 97 of 100 requests used, resetting in an hour: ranked last.
    let reset = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    a.push(
        Script::json_ok()
            .header("anthropic-ratelimit-requests-limit", "100")
            .header("anthropic-ratelimit-requests-remaining", "3")
            .header("anthropic-ratelimit-requests-reset", &reset.to_string())
            .header("anthropic-ratelimit-tokens-limit", "100000")
            .header("anthropic-ratelimit-tokens-remaining", "90000"),
    );
    let r = gw.post_message(false).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("a"));
    let r = gw.post_message(false).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"));

    // Ranked last is not excluded: when `b` is rate limited, `a` serves the request.
    b.push(Script::rate_limited(60));
    let r = gw.post_message(false).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ccgate-endpoint"), Some("a"));
    assert_eq!(r.header("x-ccgate-attempts"), Some("2"));
    gw.settle().await;
    assert_eq!(gw.endpoint_view("b").await["state"], "cooling_down");

    // A 429 from the near-limit endpoint cools it down as before.
    a.push(Script::rate_limited(60));
    let r = gw.post_message(false).await;
    assert_ne!(r.status, 200, "{}", r.text());
    gw.settle().await;
    let view = gw.endpoint_view("a").await;
    assert_eq!(view["state"], "cooling_down", "{view}");
    assert_eq!(view["outcomes"]["rate_limited"], 1, "{view}");
    gw.shutdown().await;
}

fn registry(threshold: &str) -> (Registry, Selector) {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nstrategy = \"priority\"\n\
         [health]\nrate_limit_cooldown = \"30s\"\n{threshold}\n\
         [[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\npriority = 1\n\
         [[endpoints]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\npriority = 2\n"
    );
    let config = Config::from_toml(&toml, "quota.toml", &|_: &str| None).expect("config");
    assert!(config.health.quota_threshold > 0.0);
    let reg = Registry::new(&config).expect("registry");
    (reg, Selector::new(config.server.strategy))
}

#[tokio::test(start_paused = true)]
async fn steering_ends_exactly_at_the_reset_on_the_registry_clock() {
    let (reg, sel) = registry("quota_threshold = 0.9");
    let mut rng = fastrand::Rng::with_seed(1);
    let rank = |rng: &mut fastrand::Rng| sel.rank(&reg.endpoints, reg.clock.now_ms(), rng);
    assert_eq!(rank(&mut rng), [0, 1]);

    let a = &reg.endpoints[0].live;
    let near = Quota {
        used: 0.92,
        reset_after: Some(Duration::from_secs(60)),
        near_limit: true,
    };
    a.observe_quota(&near, reg.clock.now_ms(), Duration::from_secs(30));
    assert_eq!(rank(&mut rng), [1, 0]);
    tokio::time::advance(Duration::from_millis(59_999)).await;
    assert_eq!(rank(&mut rng), [1, 0]);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(rank(&mut rng), [0, 1], "preferred again at its reset");

    // Near the limit without a reset time: ranked last for `rate_limit_cooldown`, then tried
    // again (and it says again how it stands).
    let unknown = Quota {
        reset_after: None,
        ..near
    };
    a.observe_quota(&unknown, reg.clock.now_ms(), Duration::from_secs(30));
    assert_eq!(rank(&mut rng), [1, 0]);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(rank(&mut rng), [0, 1]);

    // An answer under the threshold ends the steering at once.
    a.observe_quota(&near, reg.clock.now_ms(), Duration::from_secs(30));
    assert_eq!(rank(&mut rng), [1, 0]);
    let fine = Quota {
        used: 0.5,
        near_limit: false,
        ..near
    };
    a.observe_quota(&fine, reg.clock.now_ms(), Duration::from_secs(30));
    assert_eq!(rank(&mut rng), [0, 1]);
    assert_eq!(a.quota().map(|q| q.remaining_fraction), Some(0.5));
}

#[test]
fn the_threshold_is_checked() {
    for bad in ["0.0", "1.5", "-1.0"] {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[health]\nquota_threshold = {bad}\n\
             [[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\n"
        );
        let err = Config::from_toml(&toml, "q.toml", &|_: &str| None)
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(err.to_string().contains("health.quota_threshold"), "{err}");
    }
    let (reg, _) = registry("");
    drop(reg);
}
