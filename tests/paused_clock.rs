//! Paused-clock tests of the time-driven parts of health: probe backoff scheduling in the failure
//! queue, cooldown expiry at admission, and probation. Time only moves through
//! `tokio::time::advance`; nothing sleeps.

use std::sync::Arc;
use std::time::Duration;

use ccgate::config::Config;
use ccgate::health::attempt::Attempt;
use ccgate::health::classify::Outcome;
use ccgate::health::endpoint::Endpoint;
use ccgate::health::machine::{Phase, Reason};
use ccgate::health::registry::{Admission, Registry};

/// A registry with endpoints `a` (and `b`), threshold `threshold`, probes every 10 s doubling up to
/// 80 s, and a 30 s default cooldown.
fn registry(threshold: u32) -> Registry {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         [health]\nfailure_threshold = {threshold}\nprobe_interval = \"10s\"\n\
         probe_max_interval = \"80s\"\nrate_limit_cooldown = \"30s\"\n\
         [[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"key-a\"\n\
         [[endpoints]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"key-b\"\n"
    );
    let env = |_: &str| None;
    let config = Config::from_toml(&toml, "paused.toml", &env).unwrap_or_else(|e| panic!("{e}"));
    Registry::new(&config).unwrap_or_else(|e| panic!("{e}"))
}

fn record(reg: &Registry, ep: &Arc<Endpoint>, outcome: Outcome) {
    Attempt::begin(Arc::clone(ep), Arc::clone(&reg.recorder), false).finish(outcome, None);
}

/// Moves the paused clock to registry time `at_ms`.
async fn advance_to(reg: &Registry, at_ms: u64) {
    let now = reg.clock.now_ms();
    assert!(at_ms >= now, "cannot go back from {now} to {at_ms}");
    tokio::time::advance(Duration::from_millis(at_ms - now)).await;
    assert_eq!(reg.clock.now_ms(), at_ms);
}

/// `min(10 s · 2^k, 80 s)` in ms: the un-jittered delay after `k` failed probes.
fn expected_backoff_ms(k: u32) -> u64 {
    (10_000u64 << k.min(10)).min(80_000)
}

fn assert_within_jitter(delay_ms: u64, k: u32) {
    let exp = expected_backoff_ms(k);
    let low = exp * 8 / 10;
    let high = (exp * 12 / 10).min(80_000);
    assert!(
        (low..=high).contains(&delay_ms),
        "after {k} failed probes the next one is due in {delay_ms} ms, not in [{low}, {high}]"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_probes_push_the_next_probe_out_with_capped_backoff() {
    let reg = registry(2);
    let ep = Arc::clone(&reg.endpoints[0]);
    advance_to(&reg, 5_000).await;
    record(&reg, &ep, Outcome::ServerError);
    assert_eq!(
        ep.live.phase(),
        Phase::Healthy,
        "one failure is below the threshold"
    );
    assert!(reg.queue.entry(0).is_none());
    record(&reg, &ep, Outcome::Overloaded);
    assert_eq!(ep.live.phase(), Phase::Ejected);

    let entry = reg.queue.entry(0).expect("ejected endpoint is queued");
    assert_eq!(entry.since, reg.clock.wall(5_000));
    assert_eq!(entry.reason, Reason::Failures);
    assert_eq!(entry.probe_attempts, 0);
    assert_within_jitter(entry.next_probe_at_ms - 5_000, 0);
    // Admission and the least-bad choice both know when it is due.
    assert_eq!(reg.admit(&ep), Admission::No);
    assert_eq!(reg.expected_back_ms(&ep), Some(entry.next_probe_at_ms));

    let mut due = entry.next_probe_at_ms;
    let mut delays = Vec::new();
    for k in 1..=8u32 {
        advance_to(&reg, due).await;
        reg.queue
            .probe_result(&ep, false, "still failing".to_string());
        let e = reg.queue.entry(0).expect("still queued");
        assert_eq!(e.probe_attempts, k);
        assert_eq!(
            e.since,
            reg.clock.wall(5_000),
            "the episode keeps its start"
        );
        assert_eq!(e.last_probe.as_deref(), Some("still failing"));
        assert!(!e.probation);
        let delay = e.next_probe_at_ms - due;
        assert_within_jitter(delay, k);
        delays.push(delay);
        due = e.next_probe_at_ms;
        assert_eq!(ep.live.phase(), Phase::Ejected);
        assert_eq!(reg.admit(&ep), Admission::No);
    }
    // Below the cap each delay outgrows the previous one whatever the jitter; at the cap it stays
    // there (jitter only shortens it).
    assert!(
        delays[0] < delays[1] && delays[1] < delays[2],
        "backoff must grow: {delays:?}"
    );
    assert!(
        delays[3..].iter().all(|d| (64_000..=80_000).contains(d)),
        "capped at 80 s: {delays:?}"
    );

    let (entries, stats) = reg.queue.view();
    assert_eq!(entries.len(), 1);
    assert_eq!(stats.total_failed, 1, "one outage, one episode");
    assert_eq!(stats.total_verified, 8);
    assert_eq!(stats.total_still_failed, 8);
    assert_eq!(stats.total_recovered, 0);

    // The ninth probe passes: probation, same episode, and the prober stops scheduling it.
    advance_to(&reg, due).await;
    reg.queue.probe_result(&ep, true, "ok".to_string());
    assert_eq!(ep.live.phase(), Phase::Probation);
    let e = reg.queue.entry(0).expect("probation keeps the entry");
    assert!(e.probation);
    assert_eq!(e.probe_attempts, 9);
    let (_, stats) = reg.queue.view();
    assert_eq!((stats.total_verified, stats.total_recovered), (9, 1));
    assert_eq!(stats.total_failed, 1);
}

#[tokio::test(start_paused = true)]
async fn cooldown_admits_again_exactly_at_its_deadline() {
    let reg = registry(3);
    let (a, b) = (Arc::clone(&reg.endpoints[0]), Arc::clone(&reg.endpoints[1]));
    advance_to(&reg, 1_000).await;
    record(
        &reg,
        &a,
        Outcome::RateLimited(Some(Duration::from_secs(20))),
    );
    assert_eq!(a.live.phase(), Phase::CoolingDown);
    assert_eq!(a.live.cooldown_until_ms(), 21_000);
    let e = reg.queue.entry(0).expect("cooling down is queued");
    assert_eq!(
        (e.reason, e.next_probe_at_ms),
        (Reason::RateLimited, 21_000)
    );

    // A later, longer hint extends the deadline; a shorter one does not shorten it.
    advance_to(&reg, 2_000).await;
    record(
        &reg,
        &a,
        Outcome::RateLimited(Some(Duration::from_secs(40))),
    );
    record(&reg, &a, Outcome::RateLimited(Some(Duration::from_secs(1))));
    assert_eq!(a.live.cooldown_until_ms(), 42_000);
    // A 429 without a hint uses the default 30 s: 32 s, which does not shorten 42 s either.
    record(&reg, &a, Outcome::RateLimited(None));
    assert_eq!(a.live.cooldown_until_ms(), 42_000);
    assert_eq!(reg.queue.view().1.total_failed, 1, "still one episode");

    // Nothing but time brings it back, and not a millisecond early.
    advance_to(&reg, 41_999).await;
    assert_eq!(reg.admit(&a), Admission::No);
    assert_eq!(a.live.phase(), Phase::CoolingDown);
    assert_eq!(reg.expected_back_ms(&a), Some(42_000));
    assert_eq!(
        reg.retry_after_secs(|_| true),
        1,
        "b is healthy, so nothing to wait for"
    );
    assert_eq!(reg.admit(&b), Admission::Yes);

    advance_to(&reg, 42_000).await;
    assert_eq!(reg.admit(&a), Admission::Yes);
    assert_eq!(a.live.phase(), Phase::Healthy);
    assert!(reg.queue.entry(0).is_none(), "the episode is over");
    let stats = reg.queue.view().1;
    assert_eq!((stats.total_failed, stats.total_closed), (1, 1));
    // Expiry at admission is not a probe.
    assert_eq!(stats.total_verified, 0);

    // A second 429 later is a second episode.
    advance_to(&reg, 50_000).await;
    record(
        &reg,
        &a,
        Outcome::RateLimited(Some(Duration::from_millis(500))),
    );
    assert_eq!(a.live.cooldown_until_ms(), 50_500);
    assert_eq!(reg.admit(&a), Admission::No);
    advance_to(&reg, 50_500).await;
    assert_eq!(reg.admit(&a), Admission::Yes);
    let stats = reg.queue.view().1;
    assert_eq!((stats.total_failed, stats.total_closed), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn least_bad_is_the_endpoint_back_soonest() {
    let reg = registry(1);
    let (a, b) = (Arc::clone(&reg.endpoints[0]), Arc::clone(&reg.endpoints[1]));
    record(
        &reg,
        &a,
        Outcome::RateLimited(Some(Duration::from_secs(50))),
    );
    record(
        &reg,
        &b,
        Outcome::RateLimited(Some(Duration::from_secs(20))),
    );
    assert_eq!(reg.admit(&a), Admission::No);
    assert_eq!(reg.admit(&b), Admission::No);
    let least = reg.least_bad(|_| true).expect("something to try");
    assert_eq!(least.name, "b", "b is back in 20 s, a in 50 s");
    assert_eq!(reg.retry_after_secs(|_| true), 20);
    // Only the endpoints that could serve the request count (audit: a request for a model only
    // `a` serves was told to come back when `b` would).
    assert_eq!(reg.retry_after_secs(|e| e.name == "a"), 50);
    // Nothing switched on comes back by itself: not a retry every second.
    b.live.set_admin_disabled(true);
    assert_eq!(
        reg.retry_after_secs(|e| e.name == "b"),
        ccgate::health::registry::RETRY_WHEN_ALL_OFF_SECS
    );
    b.live.set_admin_disabled(false);
    tokio::time::advance(Duration::from_secs(19)).await;
    assert_eq!(reg.retry_after_secs(|_| true), 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(reg.admit(&b), Admission::Yes);
    assert_eq!(reg.admit(&a), Admission::No);
}

/// Ejects `ep` (threshold 1) and lets a probe pass, so it is on probation.
fn put_on_probation(reg: &Registry, ep: &Arc<Endpoint>) {
    record(
        reg,
        ep,
        Outcome::Transport(ccgate::health::classify::TransportKind::Cut),
    );
    assert!(ep.live.phase() == Phase::Ejected || ep.live.phase() == Phase::Probation);
    reg.queue.probe_result(ep, true, "ok".to_string());
    assert_eq!(ep.live.phase(), Phase::Probation);
}

#[tokio::test(start_paused = true)]
async fn probation_admits_one_request_at_a_time_and_one_success_heals() {
    let reg = registry(1);
    let ep = Arc::clone(&reg.endpoints[0]);
    put_on_probation(&reg, &ep);
    assert!(reg.queue.entry(0).expect("queued").probation);

    // One slot: the first admission takes it, every other is refused until it is given back.
    assert_eq!(reg.admit(&ep), Admission::Probation);
    for _ in 0..3 {
        assert_eq!(reg.admit(&ep), Admission::No);
    }
    assert_eq!(reg.expected_back_ms(&ep), Some(reg.clock.now_ms()));

    // An attempt that ends without a verdict (client gone) frees the slot and proves nothing.
    drop(Attempt::begin(
        Arc::clone(&ep),
        Arc::clone(&reg.recorder),
        true,
    ));
    assert_eq!(ep.live.phase(), Phase::Probation);
    assert_eq!(reg.admit(&ep), Admission::Probation);

    // A slot claimed at admission but never used is given back explicitly.
    ep.live.release_probation();
    assert_eq!(reg.admit(&ep), Admission::Probation);

    // The held slot's attempt succeeds: healthy, the entry closes, the episode ends.
    tokio::time::advance(Duration::from_millis(250)).await;
    let attempt = Attempt::begin(Arc::clone(&ep), Arc::clone(&reg.recorder), true);
    assert_eq!(
        reg.admit(&ep),
        Admission::No,
        "still one at a time while it runs"
    );
    attempt.finish(Outcome::Success, None);
    assert_eq!(ep.live.phase(), Phase::Healthy);
    assert_eq!(ep.live.consecutive_failures(), 0);
    assert!(reg.queue.entry(0).is_none());
    for _ in 0..3 {
        assert_eq!(
            reg.admit(&ep),
            Admission::Yes,
            "in rotation: no slot to take"
        );
    }
    let stats = reg.queue.view().1;
    assert_eq!((stats.total_failed, stats.total_closed), (1, 1));
    let c = ep.live.snapshot();
    assert_eq!(
        (
            c.total,
            c.successful(),
            c.failed(),
            c.cancelled(),
            c.in_flight
        ),
        (3, 1, 1, 1, 0)
    );

    // The next outage is a new episode.
    put_on_probation(&reg, &ep);
    assert_eq!(reg.queue.view().1.total_failed, 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probation_request_goes_back_out_in_the_same_episode() {
    let reg = registry(1);
    let ep = Arc::clone(&reg.endpoints[0]);
    put_on_probation(&reg, &ep);
    let probes_before = reg.queue.entry(0).expect("queued").probe_attempts;

    assert_eq!(reg.admit(&ep), Admission::Probation);
    tokio::time::advance(Duration::from_secs(3)).await;
    let now = reg.clock.now_ms();
    Attempt::begin(Arc::clone(&ep), Arc::clone(&reg.recorder), true)
        .finish(Outcome::ServerError, None);
    assert_eq!(ep.live.phase(), Phase::Ejected);
    assert_eq!(reg.admit(&ep), Admission::No);

    let e = reg.queue.entry(0).expect("still queued");
    assert!(!e.probation);
    assert_eq!(e.reason, Reason::Failures);
    assert_eq!(e.probe_attempts, probes_before);
    assert_within_jitter(e.next_probe_at_ms - now, probes_before);
    let stats = reg.queue.view().1;
    assert_eq!(
        stats.total_failed, 1,
        "probation failure continues the episode"
    );
    assert_eq!(stats.total_closed, 0);

    // The slot was released with the attempt: the next passed probe admits at once.
    reg.queue.probe_result(&ep, true, "ok".to_string());
    assert_eq!(reg.admit(&ep), Admission::Probation);
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_probation_request_cools_down_until_its_deadline() {
    let reg = registry(1);
    let ep = Arc::clone(&reg.endpoints[0]);
    put_on_probation(&reg, &ep);
    assert_eq!(reg.admit(&ep), Admission::Probation);
    let now = reg.clock.now_ms();
    Attempt::begin(Arc::clone(&ep), Arc::clone(&reg.recorder), true)
        .finish(Outcome::RateLimited(Some(Duration::from_secs(7))), None);
    assert_eq!(ep.live.phase(), Phase::CoolingDown);
    let e = reg.queue.entry(0).expect("queued");
    assert_eq!(
        (e.reason, e.next_probe_at_ms),
        (Reason::RateLimited, now + 7_000)
    );
    tokio::time::advance(Duration::from_millis(6_999)).await;
    assert_eq!(reg.admit(&ep), Admission::No);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(reg.admit(&ep), Admission::Yes);
    assert_eq!(reg.queue.view().1.total_failed, 1);
}

/// A later, longer 429 extends the cooldown deadline, and the failure-queue entry shows it as
/// `next_probe_at` (a shorter one changes neither).
#[tokio::test(start_paused = true)]
async fn extended_cooldown_shows_in_the_queue_entry() {
    let reg = registry(3);
    let ep = Arc::clone(&reg.endpoints[0]);
    // The clock stands still: every record below reads this same `now`.
    let now = reg.clock.now_ms();
    record(
        &reg,
        &ep,
        Outcome::RateLimited(Some(Duration::from_secs(5))),
    );
    assert_eq!(ep.live.cooldown_until_ms(), now + 5_000);
    record(
        &reg,
        &ep,
        Outcome::RateLimited(Some(Duration::from_secs(60))),
    );
    let until = ep.live.cooldown_until_ms();
    assert_eq!(until, now + 60_000, "the longer 429 extends the cooldown");
    assert_eq!(reg.queue.entry(0).expect("queued").next_probe_at_ms, until);
    record(
        &reg,
        &ep,
        Outcome::RateLimited(Some(Duration::from_secs(10))),
    );
    assert_eq!(ep.live.cooldown_until_ms(), until);
    assert_eq!(reg.queue.entry(0).expect("queued").next_probe_at_ms, until);
}
