//! Chaos soak (issue #12 item 3): three in-process mock upstreams whose behaviour a seeded random
//! schedule flips every few tens of milliseconds between success and every fault the gateway knows,
//! thousands of mixed client requests at high concurrency on a multi-threaded runtime, and exact
//! bookkeeping on both sides.
//!
//! What it asserts, exactly:
//! * every client request ended complete (a JSON message that parses, or a stream that ends with
//!   `message_stop`) or with an Anthropic-shaped error (a JSON error body, or an SSE `error` event
//!   on a fresh event boundary for a stream already started): no truncated body, no bare reset.
//!   Clients that hang up on purpose are not judged;
//! * each endpoint's `total / successful / failed / cancelled` and its per-outcome split in
//!   `GET /_ccgate/endpoints` equal what its mock counted on its own side (script label and how the
//!   answer ended, see `support::mock::Ending`);
//! * the gateway totals (`GET /_ccgate/stats`) equal the clients' own counts; `in_flight` returns
//!   to 0;
//! * every snapshot sampled during the run satisfies SPEC §5 (per endpoint
//!   `successful + failed + cancelled + in_flight == total`; gateway
//!   `successful + failed + in_flight == total` and `failed == upstream + caller + cancelled`).
//!
//! Replay: the seed is printed; `CCGATE_CHAOS_SEED=<seed>` replays its schedules and request mix
//! (timing still differs run to run). `CCGATE_CHAOS_JSON_CUT=0` leaves out the two mid-body faults
//! of JSON answers, the cut and the stall (the gateway reads a JSON answer whole before committing
//! to it, so both fail over like a fault before the headers); their slots then answer JSON
//! requests in full.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::sync::Notify;

use support::gateway::{GatewayBuilder, KINDS, TestGateway, failure_kinds, http_client};
use support::mock::{Ending, MOCK_MODEL, MockUpstream, ReceivedRequest, Script};
use support::wait::{eventually_ok, within};

const MESSAGES: &str = "/v1/messages";
/// Request header naming the client's plan: `mid` (hang up after the first content) or `early`
/// (hang up before any answer, once an upstream holds the request).
const PLAN: &str = "x-chaos-plan";
/// Request header carrying the client's request number.
const ID: &str = "x-chaos-id";

/// Client requests in the soak.
const REQUESTS: usize = 5000;
/// Concurrent clients.
const CONCURRENCY: usize = 48;
/// Mock upstreams (endpoints).
const UPSTREAMS: usize = 3;
/// The gateway's `first_byte`, `idle` and `connect` timeouts: short, so that stalls resolve
/// quickly, but far above what a healthy answer takes even on a loaded two-core machine.
const TIMEOUT: &str = "1s";

// ---------------------------------------------------------------------------------------------
// The schedule
// ---------------------------------------------------------------------------------------------

/// What an upstream does during one slot of its schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A complete answer (JSON or SSE, whatever the request asked for).
    Success,
    /// 500 `api_error`.
    E500,
    /// 529 `overloaded_error`.
    E529,
    /// 429 with `retry-after: 1`.
    E429,
    /// TCP reset before any response.
    Reset,
    /// JSON: 200 with `content-length`, half the body, then a close. SSE: a cut mid-stream.
    Cut,
    /// SSE: an `error` event before or after the first content. JSON: 529.
    SseError,
    /// No response headers ever (the gateway's `first_byte` timeout).
    StallHead,
    /// Headers and part of the body, then silence (the gateway's `idle` timeout).
    StallMid,
}

/// Slot modes and their weights.
const MODES: [(Mode, u32); 9] = [
    (Mode::Success, 50),
    (Mode::E500, 8),
    (Mode::E529, 8),
    (Mode::E429, 2),
    (Mode::Reset, 8),
    (Mode::Cut, 10),
    (Mode::SseError, 10),
    (Mode::StallHead, 4),
    (Mode::StallMid, 4),
];

/// A seeded sequence of slots `(length, mode)`, replayed from the soak's start and cycled.
struct Schedule {
    slots: Vec<(Duration, Mode)>,
    period: Duration,
}

impl Schedule {
    /// The schedule of upstream `index` of a soak seeded `soak_seed`; `seed` draws its slots
    /// after the opening tour.
    fn new(soak_seed: u64, index: usize, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let total: u32 = MODES.iter().map(|(_, w)| w).sum();
        // An opening tour: every fault once, long enough for requests of both kinds to meet
        // it, so that every fault is served in every run (the weights alone leave rare modes out
        // of a short run now and then). The upstreams take the faults in turn, the others
        // answering in the meantime, so each faulty slot of an upstream comes two slots after
        // its last one: time for the gateway to probe and readmit it if that one ejected it (a
        // faulty slot met while ejected would pass unserved). The 429 comes after the others
        // (its endpoint then cools down for a second), and the two stalls last, on two
        // upstreams at once: a stalled request holds its client until the one-second timeout,
        // so within a slot every client is held by the first stall and a later slot would see
        // no request at all.
        let slot = Duration::from_millis(200);
        let mut quick: Vec<Mode> = MODES
            .iter()
            .map(|(m, _)| *m)
            .filter(|m| !matches!(m, Mode::Success | Mode::StallHead | Mode::StallMid))
            .filter(|m| *m != Mode::E429)
            .collect();
        fastrand::Rng::with_seed(soak_seed).shuffle(&mut quick);
        quick.push(Mode::E429);
        let stalls = quick.len();
        let mut opening: Vec<(Duration, Mode)> = quick
            .into_iter()
            .enumerate()
            .map(|(k, m)| {
                (
                    slot,
                    if k % UPSTREAMS == index {
                        m
                    } else {
                        Mode::Success
                    },
                )
            })
            .collect();
        let stall = match (index + UPSTREAMS - stalls % UPSTREAMS) % UPSTREAMS {
            0 => Mode::StallHead,
            1 => Mode::StallMid,
            _ => Mode::Success,
        };
        opening.push((slot, stall));
        let slots: Vec<(Duration, Mode)> = opening
            .into_iter()
            .chain((0..2000).map(|_| {
                let len = Duration::from_millis(rng.u64(20..=80));
                let mut pick = rng.u32(0..total);
                let mode = MODES
                    .iter()
                    .find(|(_, w)| {
                        let hit = pick < *w;
                        pick = pick.saturating_sub(*w);
                        hit
                    })
                    .map(|(m, _)| *m)
                    .expect("weights cover the range");
                (len, mode)
            }))
            .collect();
        let period = slots.iter().map(|(d, _)| *d).sum();
        Self { slots, period }
    }

    fn mode_at(&self, elapsed: Duration) -> Mode {
        let mut t = Duration::from_nanos((elapsed.as_nanos() % self.period.as_nanos()) as u64);
        for (len, mode) in &self.slots {
            if t < *len {
                return *mode;
            }
            t -= *len;
        }
        Mode::Success
    }
}

/// The outcome kind (as `/_ccgate/endpoints` names it in `outcomes`) that the gateway must record
/// for an answer with this mock label that ended so; `None` for an ending the script did not plan.
fn expected_kind(label: &str, ending: Ending) -> Option<&'static str> {
    use Ending::*;
    Some(match (label, ending) {
        ("ok_json" | "ok_sse", Completed) => "success",
        ("e500", Completed) => "server_error",
        ("e529", Completed) => "overloaded",
        ("e429", Completed) => "rate_limited",
        ("reset", Reset) => "transport",
        ("json_cut" | "sse_cut", Cut) => "transport",
        ("sse_err_pre", Completed) => "overloaded",
        ("sse_err_mid", Completed) => "server_error",
        ("stall_head" | "json_stall" | "sse_stall", PeerGone) => "timeout",
        ("gone_mid" | "gone_early", PeerGone) => "cancelled",
        _ => return None,
    })
}

/// Requests the upstreams hold for clients that will hang up before any answer: the client waits
/// for its id here, then leaves.
#[derive(Default)]
struct Arrivals {
    ids: Mutex<HashSet<u64>>,
    notify: Notify,
}

impl Arrivals {
    fn arrive(&self, id: u64) {
        self.ids.lock().expect("arrivals").insert(id);
        self.notify.notify_waiters();
    }

    async fn wait(&self, id: u64) {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.ids.lock().expect("arrivals").contains(&id) {
                return;
            }
            notified.await;
        }
    }
}

/// Options of one soak.
#[derive(Clone, Copy)]
struct Options {
    seed: u64,
    json_cut: bool,
}

/// The script an upstream serves for `req` at time `elapsed` of its schedule.
fn script_for(
    req: &ReceivedRequest,
    mode: Mode,
    rng: &mut fastrand::Rng,
    opts: Options,
    arrivals: &Arrivals,
) -> Script {
    if req.path() != MESSAGES {
        // Recovery probes (`probe_mode = "models"`): always answered, never counted.
        return Script::json(
            200,
            &json!({"data": [{"type": "model", "id": MOCK_MODEL}], "has_more": false}),
        )
        .label("probe");
    }
    let stream = req
        .json()
        .and_then(|v| v["stream"].as_bool())
        .unwrap_or(false);
    let plan = req.header(PLAN);
    if plan == Some("early") {
        let id = req
            .header(ID)
            .and_then(|v| v.parse().ok())
            .expect("request id");
        arrivals.arrive(id);
        return Script::stall_before_headers().label("gone_early");
    }
    // A client that hangs up after the first content gets content, then silence: whether it left
    // or the stream failed is then never a race.
    let gone_mid = || Script::sse_ok(3).stall_after(5).label("gone_mid");
    match mode {
        Mode::Success if plan == Some("mid") => gone_mid(),
        Mode::Success if stream => Script::sse_ok(3).label("ok_sse"),
        Mode::Success => Script::json_ok().label("ok_json"),
        Mode::E500 => Script::error(500, "api_error", "chaos 500").label("e500"),
        Mode::E529 => Script::overloaded().label("e529"),
        Mode::E429 => Script::rate_limited(1).label("e429"),
        Mode::Reset => Script::reset_before_headers().label("reset"),
        Mode::StallHead => Script::stall_before_headers().label("stall_head"),
        Mode::Cut | Mode::SseError | Mode::StallMid if plan == Some("mid") => gone_mid(),
        // Events: 0 message_start, 1 content_block_start, 2 ping, 3.. deltas; position 3 is
        // before any content, 4 and 5 after it.
        Mode::Cut if stream => Script::sse_ok(3)
            .cut_after(*[3, 4, 5].get(rng.usize(0..3)).unwrap_or(&4))
            .label("sse_cut"),
        Mode::Cut if opts.json_cut => Script::json_ok().cut_body_after(40).label("json_cut"),
        Mode::Cut => Script::json_ok().label("ok_json"),
        Mode::SseError if stream && rng.bool() => Script::sse_ok(3)
            .error_event_after(3, "overloaded_error")
            .label("sse_err_pre"),
        Mode::SseError if stream => Script::sse_ok(3)
            .error_event_after(5, "api_error")
            .label("sse_err_mid"),
        Mode::SseError => Script::overloaded().label("e529"),
        Mode::StallMid if stream => Script::sse_ok(3)
            .stall_after(*[2, 4, 5].get(rng.usize(0..3)).unwrap_or(&4))
            .label("sse_stall"),
        Mode::StallMid if opts.json_cut => {
            Script::json_ok().stall_body_after(40).label("json_stall")
        }
        Mode::StallMid => Script::json_ok().label("ok_json"),
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// How client requests ended, as the clients saw them.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    streams: AtomicU64,
    success: AtomicU64,
    /// Anthropic-shaped errors: an error status with a JSON error body, or an SSE `error` event.
    upstream: AtomicU64,
    caller: AtomicU64,
    /// Clients that hung up on purpose (mid stream, or before any answer).
    gone_mid: AtomicU64,
    gone_early: AtomicU64,
    /// Requests that ended neither complete nor with an Anthropic error, by kind, with examples.
    violations: Mutex<BTreeMap<&'static str, (u64, Vec<String>)>>,
}

impl Tally {
    fn violation(&self, kind: &'static str, detail: String) {
        let mut v = self.violations.lock().expect("violations");
        let entry = v.entry(kind).or_default();
        entry.0 += 1;
        if entry.1.len() < 3 {
            entry.1.push(detail);
        }
    }

    fn violation_count(&self) -> u64 {
        self.violations
            .lock()
            .expect("violations")
            .values()
            .map(|(n, _)| n)
            .sum()
    }
}

/// Whether `body` is an Anthropic error object.
fn is_anthropic_error(v: &Value) -> bool {
    v["type"] == "error" && v["error"]["type"].is_string() && v["error"]["message"].is_string()
}

/// Judges a complete SSE body: `Ok(true)` for a stream that ended with `message_stop`, `Ok(false)`
/// for one that ended with an Anthropic `error` event on a fresh event boundary, `Err` otherwise.
fn judge_stream(body: &[u8]) -> Result<bool, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("stream is not UTF-8: {e}"))?;
    if !text.ends_with("\n\n") {
        return Err(format!(
            "stream does not end on an event boundary: {text:?}"
        ));
    }
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let last = events.last().ok_or("empty stream")?;
    let (mut name, mut data) = (None, None);
    for line in last.lines() {
        if let Some(n) = line.strip_prefix("event:") {
            name = Some(n.trim());
        } else if let Some(d) = line.strip_prefix("data:") {
            data = Some(d.trim());
        } else if !line.starts_with(':') {
            return Err(format!("half an event before the last one ends: {last:?}"));
        }
    }
    let data: Value = serde_json::from_str(data.ok_or("last event has no data")?)
        .map_err(|e| format!("last event's data is not JSON ({e}): {last:?}"))?;
    match name {
        Some("message_stop") if data["type"] == "message_stop" => Ok(true),
        Some("error") if is_anthropic_error(&data) => Ok(false),
        _ => Err(format!(
            "stream ends neither with message_stop nor an error event: {last:?}"
        )),
    }
}

/// Whether `seen` holds the first content delta.
fn has_content(seen: &[u8]) -> bool {
    seen.windows(4).any(|w| w == b"tok0")
}

/// One client request, judged.
async fn client_request(
    gw: &TestGateway,
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    id: u64,
    stream: bool,
    plan: Option<&'static str>,
    arrivals: &Arrivals,
    tally: &Tally,
) {
    let body = json!({
        "model": "claude-sonnet-4",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": format!("chaos request {id}")}],
    });
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(gw.url(MESSAGES))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header(ID, id.to_string());
    if let Some(plan) = plan {
        b = b.header(PLAN, plan);
    }
    let req = b
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    tally.requests.fetch_add(1, Ordering::Relaxed);
    if stream {
        tally.streams.fetch_add(1, Ordering::Relaxed);
    }
    let sent = client.request(req);
    let resp = if plan == Some("early") {
        tokio::select! {
            r = sent => r,
            () = arrivals.wait(id) => {
                tally.gone_early.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    } else {
        sent.await
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            tally.violation("bare_reset", format!("#{id} stream={stream}: {e:?}"));
            return;
        }
    };
    let status = resp.status();
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    let read_error = loop {
        match body.frame().await {
            None => break None,
            Some(Err(e)) => break Some(e),
            Some(Ok(frame)) => {
                if let Ok(d) = frame.into_data() {
                    seen.extend_from_slice(&d);
                }
                if plan == Some("mid") && status == StatusCode::OK && has_content(&seen) {
                    drop(body);
                    tally.gone_mid.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    };
    let shown = || String::from_utf8_lossy(&seen[..seen.len().min(300)]).into_owned();
    if let Some(e) = read_error {
        let kind = match (status == StatusCode::OK, stream) {
            (true, false) => "truncated_json",
            (true, true) => "truncated_stream",
            (false, _) => "truncated_error",
        };
        tally.violation(
            kind,
            format!(
                "#{id} {status} after {} bytes ({e}): {}",
                seen.len(),
                shown()
            ),
        );
        return;
    }
    if status == StatusCode::OK {
        if stream {
            match judge_stream(&seen) {
                Ok(true) => tally.success.fetch_add(1, Ordering::Relaxed),
                Ok(false) => tally.upstream.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tally.violation("bad_stream", format!("#{id}: {e}"));
                    return;
                }
            };
        } else {
            match serde_json::from_slice::<Value>(&seen) {
                Ok(v) if v["type"] == "message" => {
                    tally.success.fetch_add(1, Ordering::Relaxed);
                }
                _ => tally.violation("bad_json", format!("#{id}: {}", shown())),
            }
        }
        return;
    }
    match serde_json::from_slice::<Value>(&seen) {
        Ok(v) if is_anthropic_error(&v) => {
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                tally.upstream.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.caller.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => tally.violation("bad_error_body", format!("#{id} {status}: {}", shown())),
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a count in {v}"))
}

/// SPEC §5.2 on one endpoint view (and its outcome split).
fn endpoint_identity(v: &Value) -> Result<(), String> {
    let total = n(v, "total_requests");
    let parts = n(v, "successful_requests")
        + n(v, "failed_requests")
        + n(v, "cancelled")
        + n(v, "in_flight");
    if parts != total {
        return Err(format!(
            "successful+failed+cancelled+in_flight != total: {v}"
        ));
    }
    let outcomes: u64 = KINDS.iter().map(|k| n(&v["outcomes"], k)).sum();
    if outcomes + n(v, "in_flight") != total {
        return Err(format!("outcomes + in_flight != total: {v}"));
    }
    Ok(())
}

/// SPEC §5.6 on one `/_ccgate/stats` view.
fn stats_identity(s: &Value) -> Result<(), String> {
    if n(s, "successful_requests") + n(s, "failed_requests") + n(s, "in_flight")
        != n(s, "total_requests")
    {
        return Err(format!("successful+failed+in_flight != total: {s}"));
    }
    if n(s, "upstream_errors") + n(s, "caller_errors") + n(s, "cancelled")
        != n(s, "failed_requests")
    {
        return Err(format!("upstream+caller+cancelled != failed: {s}"));
    }
    Ok(())
}

/// What the snapshot samplers saw.
#[derive(Default)]
struct Samples {
    endpoint_views: AtomicU64,
    stats_views: AtomicU64,
    broken: Mutex<Vec<String>>,
}

/// Polls `path` until `stop`, checking every snapshot (and that no total goes backwards).
async fn sample(gw: Arc<TestGateway>, path: &'static str, stop: Arc<AtomicBool>, s: Arc<Samples>) {
    let client = http_client();
    let mut last_totals: HashMap<String, u64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let req = Request::get(gw.url(path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = within(path, client.request(req)).await.expect(path);
        let body = within(path, resp.into_body().collect())
            .await
            .expect(path)
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).expect("admin JSON");
        let mut check = |name: String, total: u64, r: Result<(), String>| {
            let prev = last_totals.insert(name.clone(), total).unwrap_or(0);
            let r = r.and_then(|()| {
                (total >= prev)
                    .then_some(())
                    .ok_or(format!("{name}: total went back from {prev} to {total}"))
            });
            if let Err(e) = r {
                s.broken.lock().expect("samples").push(e);
            }
        };
        if path.ends_with("stats") {
            s.stats_views.fetch_add(1, Ordering::Relaxed);
            check(
                "gateway".into(),
                n(&v, "total_requests"),
                stats_identity(&v),
            );
        } else {
            s.endpoint_views.fetch_add(1, Ordering::Relaxed);
            for e in v["endpoints"].as_array().expect("endpoints") {
                let name = e["name"].as_str().expect("name").to_owned();
                check(name, n(e, "total_requests"), endpoint_identity(e));
            }
        }
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------------------------

fn options() -> Options {
    let seed = match std::env::var("CCGATE_CHAOS_SEED") {
        Ok(s) => {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse(), |h| u64::from_str_radix(h, 16))
                .unwrap_or_else(|e| panic!("CCGATE_CHAOS_SEED={s}: {e}"))
        }
        Err(_) => fastrand::u64(..),
    };
    let json_cut = std::env::var("CCGATE_CHAOS_JSON_CUT").map_or(true, |v| v.trim() != "0");
    Options { seed, json_cut }
}

/// Points `up` at its schedule.
fn drive(
    up: &MockUpstream,
    schedule: Schedule,
    start: Instant,
    seed: u64,
    opts: Options,
    arrivals: Arc<Arrivals>,
) {
    let rng = Mutex::new(fastrand::Rng::with_seed(seed));
    up.set_default_fn(move |req| {
        let mode = schedule.mode_at(start.elapsed());
        let mut rng = rng.lock().expect("rng");
        script_for(req, mode, &mut rng, opts, &arrivals)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak() {
    let opts = options();
    let seed = opts.seed;
    eprintln!(
        "chaos: seed {seed:#x} (replay with CCGATE_CHAOS_SEED={seed:#x}); mid-body JSON cut {}",
        if opts.json_cut {
            "on"
        } else {
            "off (CCGATE_CHAOS_JSON_CUT=0)"
        }
    );
    let began = Instant::now();
    let arrivals = Arc::new(Arrivals::default());
    let mut ups = Vec::new();
    for _ in 0..UPSTREAMS {
        ups.push(MockUpstream::start().await);
    }
    let mut b = GatewayBuilder::new()
        .server("max_attempts = 3")
        .timeouts(&format!("connect = \"{TIMEOUT}\""))
        .timeouts(&format!("first_byte = \"{TIMEOUT}\""))
        .timeouts(&format!("idle = \"{TIMEOUT}\""))
        .health("failure_threshold = 12")
        .health("probe_mode = \"models\"")
        .health("probe_interval = \"100ms\"")
        .health("probe_max_interval = \"400ms\"")
        .health("probe_timeout = \"1s\"")
        .table("retry_budget", "ratio = 10.0")
        .table("retry_budget", "min_per_second = 100000");
    for (i, up) in ups.iter().enumerate() {
        b = b.endpoint(&format!("ep{i}"), &up.url(), "priority = 1");
    }
    let gw = Arc::new(b.start().await);
    let start = Instant::now();
    for (i, up) in ups.iter().enumerate() {
        let s = seed.wrapping_add(1 + i as u64);
        drive(
            up,
            Schedule::new(seed, i, s),
            start,
            s.rotate_left(17),
            opts,
            Arc::clone(&arrivals),
        );
    }

    // Samplers.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Samples::default());
    let samplers: Vec<_> = ["/_ccgate/endpoints", "/_ccgate/stats"]
        .into_iter()
        .map(|p| {
            tokio::spawn(sample(
                Arc::clone(&gw),
                p,
                Arc::clone(&stop),
                Arc::clone(&samples),
            ))
        })
        .collect();

    // Clients.
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (gw, tally, next, arrivals) = (
                Arc::clone(&gw),
                Arc::clone(&tally),
                Arc::clone(&next),
                Arc::clone(&arrivals),
            );
            tokio::spawn(async move {
                let client = http_client();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS {
                        break;
                    }
                    let mut rng = fastrand::Rng::with_seed(
                        seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    );
                    let roll = rng.u32(0..100);
                    let plan = match roll {
                        0..5 => Some("mid"),
                        5..8 => Some("early"),
                        _ => None,
                    };
                    let stream = plan == Some("mid") || rng.bool();
                    let work =
                        client_request(&gw, &client, i as u64, stream, plan, &arrivals, &tally);
                    tokio::time::timeout(Duration::from_secs(30), work)
                        .await
                        .unwrap_or_else(|_| panic!("client request #{i} did not end within 30 s"));
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("client task");
    }
    let load_time = start.elapsed();

    // Everything settles: nothing in flight anywhere, every upstream answer ended.
    let settled = eventually_ok("in_flight to return to 0", || {
        let gw = Arc::clone(&gw);
        async move {
            let v = gw.admin("endpoints").await;
            let s = gw.admin("stats").await;
            let busy: u64 = v["endpoints"]
                .as_array()
                .expect("endpoints")
                .iter()
                .map(|e| n(e, "in_flight"))
                .sum::<u64>()
                + n(&s, "in_flight");
            if busy == 0 {
                Ok((v, s))
            } else {
                Err(format!("{busy} in flight"))
            }
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for s in samplers {
        s.await.expect("sampler");
    }
    let (views, stats) = settled;
    for up in &ups {
        let read = up.count() as u64;
        within("every upstream answer to end", up.wait_finished(read)).await;
    }

    // ---- Compare ----
    let mut failures: Vec<String> = Vec::new();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut compared = 0u64;
    let mut attempts = 0u64;
    for (i, up) in ups.iter().enumerate() {
        let name = format!("ep{i}");
        let v = views["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["name"] == name.as_str())
            .cloned()
            .expect("endpoint view");
        let mut want: HashMap<&str, u64> = KINDS.iter().map(|k| (*k, 0)).collect();
        let mut messages = 0u64;
        for ((label, ending), count) in up.endings() {
            if label == "probe" {
                continue;
            }
            messages += count;
            *faults.entry(label.clone()).or_default() += count;
            match expected_kind(&label, ending) {
                Some(kind) => *want.get_mut(kind).expect("kind") += count,
                None => failures.push(format!(
                    "{name}: {count} answer(s) `{label}` ended {} (unplanned: the gateway hung up \
                     or the script misbehaved)",
                    ending.name()
                )),
            }
        }
        attempts += messages;
        let mut check = |what: &str, got: u64, want: u64| {
            compared += 1;
            if got != want {
                failures.push(format!(
                    "{name}: {what} = {got} in the view, mock counted {want}"
                ));
            }
        };
        check("total_requests", n(&v, "total_requests"), messages);
        for k in KINDS {
            check(&format!("outcomes.{k}"), n(&v["outcomes"], k), want[k]);
        }
        check(
            "successful_requests",
            n(&v, "successful_requests"),
            want["success"],
        );
        check(
            "failed_requests",
            n(&v, "failed_requests"),
            failure_kinds().map(|k| want[k]).sum::<u64>() + want["caller_error"],
        );
        check(
            "endpoint_errors",
            n(&v, "endpoint_errors"),
            failure_kinds().map(|k| want[k]).sum(),
        );
        check("cancelled", n(&v, "cancelled"), want["cancelled"]);
        check("in_flight", n(&v, "in_flight"), 0);
    }

    let t = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let violations = tally.violation_count();
    let gone = t(&tally.gone_mid) + t(&tally.gone_early);
    let mut check = |what: &str, got: u64, want: u64| {
        compared += 1;
        if got != want {
            failures.push(format!(
                "gateway: {what} = {got} in /_ccgate/stats, clients counted {want}"
            ));
        }
    };
    check(
        "total_requests",
        n(&stats, "total_requests"),
        t(&tally.requests),
    );
    check(
        "successful_requests",
        n(&stats, "successful_requests"),
        t(&tally.success),
    );
    // Requests that broke (violations) ended without an answer: upstream errors for the gateway.
    check(
        "upstream_errors",
        n(&stats, "upstream_errors"),
        t(&tally.upstream) + violations,
    );
    check(
        "caller_errors",
        n(&stats, "caller_errors"),
        t(&tally.caller),
    );
    check("cancelled", n(&stats, "cancelled"), gone);
    check("in_flight", n(&stats, "in_flight"), 0);
    check(
        "attempts (Σ mock) == requests + retries",
        attempts,
        n(&stats, "total_requests") + n(&stats, "retries"),
    );
    if let Err(e) = stats_identity(&stats) {
        failures.push(e);
    }

    let broken = samples.broken.lock().expect("samples").clone();
    let violation_list = tally.violations.lock().expect("violations").clone();
    eprintln!(
        "chaos: seed {seed:#x}: {} requests ({} streaming, {} hung up mid-stream, {} before an answer) \
         in {:.1}s at concurrency {CONCURRENCY} ({:.1}s total); {} attempts on {UPSTREAMS} upstreams; \
         clients saw {} complete, {} Anthropic errors, {} caller errors, {} broken; \
         answers by kind {faults:?}; retries {}, fallbacks {}, budget refusals {}; \
         {compared} counters compared; {} endpoint and {} stats snapshots sampled, {} broken",
        t(&tally.requests),
        t(&tally.streams),
        t(&tally.gone_mid),
        t(&tally.gone_early),
        load_time.as_secs_f64(),
        began.elapsed().as_secs_f64(),
        attempts,
        t(&tally.success),
        t(&tally.upstream),
        t(&tally.caller),
        violations,
        n(&stats, "retries"),
        n(&stats, "fallbacks"),
        n(&stats, "budget_refusals"),
        t(&samples.endpoint_views),
        t(&samples.stats_views),
        broken.len(),
    );
    for (kind, (count, examples)) in &violation_list {
        eprintln!("chaos: {count} client request(s) {kind}, e.g. {examples:#?}");
    }
    for f in &failures {
        eprintln!("chaos: counter mismatch: {f}");
    }
    for b in broken.iter().take(5) {
        eprintln!("chaos: broken snapshot: {b}");
    }

    assert!(
        violation_list.is_empty(),
        "seed {seed:#x}: client requests ended neither complete nor with an Anthropic error: {:?}",
        violation_list
            .iter()
            .map(|(k, (n, _))| format!("{k}: {n}"))
            .collect::<Vec<_>>()
    );
    assert!(
        failures.is_empty(),
        "seed {seed:#x}: counters disagree: {failures:#?}"
    );
    assert!(
        broken.is_empty(),
        "seed {seed:#x}: {} snapshots broke SPEC §5, first: {:?}",
        broken.len(),
        broken.first()
    );
    // The soak exercised what it claims to.
    for label in [
        "ok_json",
        "ok_sse",
        "e500",
        "e529",
        "e429",
        "reset",
        "sse_cut",
        "sse_err_pre",
        "sse_err_mid",
        "stall_head",
        "sse_stall",
        "gone_mid",
        "gone_early",
    ] {
        assert!(
            faults.get(label).copied().unwrap_or(0) > 0,
            "seed {seed:#x}: the soak never served `{label}`: {faults:?}"
        );
    }
    if opts.json_cut {
        assert!(
            faults.get("json_cut").copied().unwrap_or(0) > 0,
            "no json_cut served: {faults:?}"
        );
    }
}
