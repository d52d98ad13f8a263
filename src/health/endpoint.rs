//! Endpoints: immutable facts plus live, lock-free counters (moved only by
//! [`crate::health::attempt::Attempt`]).
//!
//! **Invariant:** `in_flight` is not a counter of its own. It is `started − Σ ended`, read ended-first,
//! so a snapshot always satisfies `successful + failed + cancelled + in_flight == total` (with
//! `failed == endpoint_errors + caller_errors`) and `in_flight` is never negative (see [`Live::snapshot`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};

use crate::config::{BaseUrl, Credential, EndpointConfig, ModelPatterns, ProbeMode};
use crate::health::classify::{Kind, Quota};
use crate::health::estimate::PeakEwma;
use crate::health::machine::Phase;
use crate::sync;
use crate::transport::upstream::UpstreamClient;

/// One configured upstream endpoint.
pub struct Endpoint {
    /// Position in the registry (bit index in a request's tried-set).
    pub idx: usize,
    /// Unique name.
    pub name: String,
    /// Where requests go.
    pub base_url: BaseUrl,
    /// Prebuilt credential header, marked sensitive; `None` for `credential = "client"`, which
    /// forwards the client's own.
    pub auth_header: Option<(HeaderName, HeaderValue)>,
    /// The name as the `x-ccgate-endpoint` response header (`None` if not a valid header value).
    pub name_header: Option<HeaderValue>,
    /// Lower is preferred.
    pub priority: u32,
    /// Share within a priority tier.
    pub weight: u32,
    /// Model rewrites for this endpoint.
    pub model_map: BTreeMap<String, String>,
    /// The models it serves (`None`: all).
    pub models: Option<ModelPatterns>,
    /// How recovery probes check this endpoint.
    pub probe: ProbeMode,
    /// Pooled HTTP(S) client for this endpoint.
    pub client: UpstreamClient,
    /// Live counters and health; shared with the endpoint's successor when a config reload
    /// keeps it unchanged.
    pub live: Arc<Live>,
    /// The config it was built from.
    pub config: EndpointConfig,
}

impl Endpoint {
    /// Builds an endpoint from its validated config.
    pub fn new(idx: usize, cfg: &EndpointConfig, client: UpstreamClient) -> Self {
        let live = Live::default();
        live.admin_disabled.store(!cfg.enabled, Ordering::Relaxed);
        Self::with_live(idx, cfg, client, Arc::new(live))
    }

    /// Builds an endpoint that continues `live` (its counters and health) at a new position.
    pub fn with_live(
        idx: usize,
        cfg: &EndpointConfig,
        client: UpstreamClient,
        live: Arc<Live>,
    ) -> Self {
        let auth_header = match &cfg.credential {
            Credential::ApiKey(k) => Some((
                HeaderName::from_static("x-api-key"),
                HeaderValue::from_str(k.expose()),
            )),
            Credential::AuthToken(t) => Some((
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {}", t.expose())),
            )),
            Credential::Client => None,
        };
        // Config validation rejected control characters, so this cannot fail; fall back to an empty
        // value rather than panicking if it ever did.
        let auth_header = auth_header.map(|(name, value)| {
            let mut value = value.unwrap_or_else(|_| HeaderValue::from_static(""));
            value.set_sensitive(true);
            (name, value)
        });
        Self {
            idx,
            name: cfg.name.clone(),
            base_url: cfg.base_url.clone(),
            auth_header,
            name_header: HeaderValue::from_str(&cfg.name).ok(),
            priority: cfg.priority,
            weight: cfg.weight,
            model_map: cfg.model_map.clone(),
            models: cfg.models.clone(),
            probe: cfg.probe,
            client,
            live,
            config: cfg.clone(),
        }
    }
}

impl Endpoint {
    /// Whether the endpoint forwards the client's own credential (`credential = "client"`).
    pub fn uses_client_credential(&self) -> bool {
        self.auth_header.is_none()
    }

    /// Identifies the endpoint's configuration across restarts without holding its secret: a
    /// 64-bit FNV-1a hash of its name, base URL, credential kind and credential, in hex. Health
    /// saved under another fingerprint (the URL or the key changed) is not resumed.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let (kind, secret) = match &self.config.credential {
            Credential::ApiKey(k) => ("api_key", k.expose()),
            Credential::AuthToken(t) => ("auth_token", t.expose()),
            Credential::Client => ("client", ""),
        };
        let base = self.base_url.to_string();
        for part in [self.name.as_str(), base.as_str(), kind, secret] {
            for b in part.bytes().chain(std::iter::once(0)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }

    /// Removes this endpoint's credential from text an upstream sent back (some relays echo the
    /// key they refused), so that it never reaches a view, a log line or an error message.
    pub fn scrub(&self, text: &str) -> String {
        let secret = self
            .auth_header
            .as_ref()
            .and_then(|h| h.1.to_str().ok())
            .unwrap_or("");
        let secret = secret.strip_prefix("Bearer ").unwrap_or(secret);
        scrub_secret(text, secret)
    }
}

/// `text` with `secret` replaced by `***`, as written or percent-encoded (an upstream may echo a
/// credential from a URL or a form); secrets shorter than 4 bytes are left alone.
pub fn scrub_secret(text: &str, secret: &str) -> String {
    if secret.len() < 4 {
        return text.to_string();
    }
    let mut out = text.replace(secret, "***");
    if out.contains('%') {
        for form in encoded_forms(secret.as_bytes()) {
            // Percent-encoding is ASCII.
            if let Ok(form) = std::str::from_utf8(&form) {
                out = out.replace(form, "***");
            }
        }
    }
    out
}

/// The percent-encoded forms of a secret an upstream may echo, each with upper- and lower-case
/// hex digits: every byte but the unreserved ones (letters, digits, `-._~`) encoded, as URL
/// encoders write it; every byte but letters and digits; every byte. (Matching every mix of
/// encoded and plain bytes would need a decoder; these are the forms encoders write.)
pub fn encoded_forms(secret: &[u8]) -> [Vec<u8>; 6] {
    let encode = |keep: fn(u8) -> bool, hex: &[u8; 16]| {
        let mut out = Vec::with_capacity(secret.len() * 3);
        for &b in secret {
            if keep(b) {
                out.push(b);
            } else {
                out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
            }
        }
        out
    };
    const UPPER: &[u8; 16] = b"0123456789ABCDEF";
    const LOWER: &[u8; 16] = b"0123456789abcdef";
    let unreserved: fn(u8) -> bool = |b| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    let alphanumeric: fn(u8) -> bool = |b| b.is_ascii_alphanumeric();
    let nothing: fn(u8) -> bool = |_| false;
    [
        encode(unreserved, UPPER),
        encode(unreserved, LOWER),
        encode(alphanumeric, UPPER),
        encode(alphanumeric, LOWER),
        encode(nothing, UPPER),
        encode(nothing, LOWER),
    ]
}

/// What the last failure was, for views. Never holds a secret: messages are built by ccgate or
/// taken from an upstream's error JSON `message`, which is scrubbed of the endpoint's credential.
#[derive(Clone, Debug)]
pub struct LastError {
    /// Outcome kind.
    pub kind: Kind,
    /// Human-readable detail.
    pub message: String,
    /// When (wall time: a failure reloaded from the database may predate this run's clock).
    pub at: SystemTime,
}

/// A decaying latency estimate plus a log-bucketed histogram, all atomics.
pub struct Latency {
    ewma_us: AtomicU64,
    sum_us: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS],
}

/// Buckets of the latency histogram: bucket `i` holds samples below `2^((i+1)/2)` ms.
pub const LATENCY_BUCKETS: usize = 40;

impl Default for Latency {
    fn default() -> Self {
        Self {
            ewma_us: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Latency {
    /// Adds a sample.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        // EWMA with alpha = 1/8, in integer microseconds; a CAS loop so concurrent samples are
        // not lost.
        let _ = self
            .ewma_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(
                    if old == 0 {
                        us.max(1)
                    } else {
                        (old * 7 + us) / 8
                    }
                    .max(1),
                )
            });
        self.buckets[Self::bucket(d)].fetch_add(1, Ordering::Relaxed);
    }

    fn bucket(d: Duration) -> usize {
        let ms = d.as_secs_f64() * 1000.0;
        if ms < 1.0 {
            return 0;
        }
        ((ms.log2() * 2.0).floor() as usize).min(LATENCY_BUCKETS - 1)
    }

    /// Upper bound of bucket `i`, in ms.
    pub fn bucket_upper_ms(i: usize) -> f64 {
        2f64.powf((i as f64 + 1.0) / 2.0)
    }

    /// The decaying average, if any sample was taken.
    pub fn ewma(&self) -> Option<Duration> {
        match self.ewma_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Approximate percentile (upper bucket bound, ms), `q` in `[0, 1]`.
    pub fn percentile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::bucket_upper_ms(i));
            }
        }
        Some(Self::bucket_upper_ms(LATENCY_BUCKETS - 1))
    }

    /// Sum of all samples.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us.load(Ordering::Relaxed))
    }

    /// Bucket counts, for metrics.
    pub fn bucket_counts(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }
}

/// Live per-endpoint state. Written by attempts (atomics, no locks on the hot path); phase
/// transitions go through [`crate::health::queue::FailureQueue::transition`].
#[derive(Default)]
pub struct Live {
    // The fields that attempts race on are `crate::sync` types: std atomics, or loom's under
    // `--cfg loom` so the model checker sees every interleaving of them.
    pub(in crate::health) started: sync::AtomicU64,
    pub(in crate::health) ended: [sync::AtomicU64; Kind::COUNT],
    pub(crate) consecutive: sync::AtomicU32,
    pub(crate) phase: sync::AtomicU8,
    /// How many times the endpoint has left rotation (a move from `Healthy` or `Probation` to a
    /// phase that admits nothing); written only under the failure queue's lock. An attempt that
    /// began before the latest departure proves nothing about the endpoint since: its success
    /// does not bring it back (see [`crate::health::attempt::Attempt`]).
    pub(crate) departures: sync::AtomicU64,
    pub(crate) admin_disabled: AtomicBool,
    /// How many times an operator switched the endpoint off (enabled → disabled).
    disables: AtomicU64,
    pub(crate) probation_busy: sync::AtomicBool,
    /// Cooldown deadline (registry-clock ms); only ever raised, with `fetch_max`.
    pub(crate) cooldown_until_ms: sync::AtomicU64,
    /// Time to response headers.
    pub ttfb: Latency,
    /// Time to the end of the response body.
    pub total: Latency,
    /// Decaying time-to-first-byte estimate, failures counted as slow (for `least_latency`).
    pub estimate: PeakEwma,
    /// The last failure. A plain short lock: an `ArcSwap` store costs more as more threads have
    /// used it, and failures come in bursts from many threads at once.
    pub(crate) last_error: parking_lot::Mutex<Option<Arc<LastError>>>,
    /// Until when (registry-clock ms) the endpoint is near its rate limit and ranked last; read
    /// lock-free at ranking time.
    pub(crate) quota_avoid_until_ms: AtomicU64,
    /// What the last answer's rate-limit headers said, for views (a short lock, as `last_error`).
    pub(crate) quota: parking_lot::Mutex<Option<QuotaSeen>>,
}

/// The rate-limit state an endpoint last reported (see [`crate::health::classify::quota`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuotaSeen {
    /// Fraction of the tightest window still available, `0.0..=1.0`.
    pub remaining_fraction: f64,
    /// When that window resets (registry-clock ms), if the endpoint said.
    pub reset_ms: Option<u64>,
    /// Whether it was near its limit when it said so.
    pub near_limit: bool,
}

/// A consistent view of one endpoint's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Attempts sent.
    pub total: u64,
    /// Attempts in progress.
    pub in_flight: u64,
    /// Ended attempts by outcome kind, indexed by `Kind as usize`.
    pub by_kind: [u64; Kind::COUNT],
}

impl Counters {
    /// The counters for `total` attempts started of which `by_kind` ended; `in_flight` is the
    /// difference (never negative).
    pub fn from_parts(total: u64, by_kind: [u64; Kind::COUNT]) -> Self {
        let ended: u64 = by_kind.iter().sum();
        Self {
            total,
            in_flight: total.saturating_sub(ended),
            by_kind,
        }
    }

    // The words, defined once (SPEC §5; README "Totals"):
    // - successful: the endpoint gave a complete, correct answer;
    // - endpoint_errors: the attempt failed through the endpoint's fault (5xx, 529, 429, 401/403,
    //   transport, timeout, an SSE error event);
    // - caller_errors: the caller's own request was wrong (400, 404, 413, 422): not the
    //   endpoint's fault, and not a success either;
    // - failed: every ended attempt that was not a success and not cancelled, that is
    //   `endpoint_errors + caller_errors`, so `successful + failed + cancelled + in_flight ==
    //   total` keeps the contract's field names;
    // - cancelled: the client went away.

    /// Attempts the endpoint answered with a complete, correct answer.
    pub fn successful(&self) -> u64 {
        self.by_kind[Kind::Success as usize]
    }
    /// Attempts that failed through the endpoint's fault.
    pub fn endpoint_errors(&self) -> u64 {
        Kind::ALL
            .iter()
            .filter(|k| k.is_failure())
            .map(|k| self.by_kind[*k as usize])
            .sum()
    }
    /// Attempts answered with the caller's own error.
    pub fn caller_errors(&self) -> u64 {
        self.by_kind[Kind::CallerError as usize]
    }
    /// Attempts that ended without a success and were not cancelled:
    /// `endpoint_errors + caller_errors`.
    pub fn failed(&self) -> u64 {
        self.endpoint_errors() + self.caller_errors()
    }
    /// Attempts abandoned because the client left.
    pub fn cancelled(&self) -> u64 {
        self.by_kind[Kind::Cancelled as usize]
    }
    /// Attempts that say something about the endpoint's health: `successful + endpoint_errors`
    /// (caller errors and cancellations say nothing about it).
    pub fn judged(&self) -> u64 {
        self.successful() + self.endpoint_errors()
    }
    /// The endpoint's health: `successful / judged`, 1.0 before any verdict (views that a person
    /// reads show `-` then, from [`Counters::judged`]).
    pub fn success_rate(&self) -> f64 {
        match self.judged() {
            0 => 1.0,
            judged => self.successful() as f64 / judged as f64,
        }
    }
}

impl Live {
    /// Gives back a probation slot that admission claimed but no attempt used.
    pub fn release_probation(&self) {
        self.probation_busy.store(false, Ordering::Release);
    }

    /// Whether the endpoint looks admissible (healthy or on probation, not switched off) without
    /// claiming anything; the attempt loop's admission check has the last word.
    pub fn in_rotation(&self) -> bool {
        !self.admin_disabled() && matches!(self.phase(), Phase::Healthy | Phase::Probation)
    }

    /// Reads the counters. Ended counters are read before `started` (each with acquire ordering):
    /// every end observed implies its start is observed, so `in_flight = started − ended ≥ 0` and
    /// the sum identity holds in every snapshot, under any concurrency.
    pub fn snapshot(&self) -> Counters {
        let by_kind: [u64; Kind::COUNT] =
            std::array::from_fn(|i| self.ended[i].load(Ordering::Acquire));
        let total = self.started.load(Ordering::Acquire);
        Counters::from_parts(total, by_kind)
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Consecutive endpoint-fault failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Acquire)
    }

    /// Whether an operator switched the endpoint off.
    pub fn admin_disabled(&self) -> bool {
        self.admin_disabled.load(Ordering::Acquire)
    }

    /// Switches the endpoint off (or on again) for an operator, counting each switch off.
    pub fn set_admin_disabled(&self, disabled: bool) {
        if !self.admin_disabled.swap(disabled, Ordering::AcqRel) && disabled {
            self.disables.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Goes on counting leaves from where `old` stood: for an endpoint a reload rebuilt (its
    /// settings changed), so that the bindings made to it before keep their meaning; a rebuild
    /// that switches it off counts as one more.
    pub fn carry_leaves(&self, old: &Live) {
        self.departures
            .store(old.departures.load(Ordering::Acquire), Ordering::Release);
        let switched_off = u64::from(self.admin_disabled() && !old.admin_disabled());
        self.disables.store(
            old.disables.load(Ordering::Acquire) + switched_off,
            Ordering::Release,
        );
    }

    /// How many times the endpoint has left rotation: taken out by its failures or a rate limit
    /// (departures), or switched off by an operator. A session bound to it before its latest
    /// leave has lost the binding (see [`crate::select::affinity`]).
    pub fn leaves(&self) -> u64 {
        self.departures.load(Ordering::Acquire) + self.disables.load(Ordering::Acquire)
    }

    /// Last failure, if any.
    pub fn last_error(&self) -> Option<Arc<LastError>> {
        self.last_error.lock().clone()
    }

    /// Takes up the last failure a previous run saved, unless this run has one of its own
    /// already; returns it when it was taken up.
    pub fn resume_last_error(&self, error: LastError) -> Option<Arc<LastError>> {
        let mut last = self.last_error.lock();
        if last.is_some() {
            return None;
        }
        let error = Arc::new(error);
        *last = Some(Arc::clone(&error));
        Some(error)
    }

    /// Records what an answer's rate-limit headers said at `now_ms`. A near-limit endpoint is
    /// ranked last until its reset, or for `fallback` when it named none (so that it is tried
    /// again, and says again, rather than being avoided for ever).
    pub fn observe_quota(&self, q: &Quota, now_ms: u64, fallback: Duration) {
        let reset_ms = q
            .reset_after
            .map(|d| now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
        let avoid_until = if q.near_limit {
            reset_ms.unwrap_or_else(|| {
                now_ms.saturating_add(u64::try_from(fallback.as_millis()).unwrap_or(u64::MAX))
            })
        } else {
            0
        };
        // Both under the lock so that racing answers leave the two in agreement.
        let mut seen = self.quota.lock();
        *seen = Some(QuotaSeen {
            remaining_fraction: 1.0 - q.used,
            // As shown: rounded up, and a millisecond more for the clock reading's own rounding
            // down, so that the reset (whole seconds, as the headers give it) is never shown a
            // second early. The steering above ends at the reset itself.
            reset_ms: q.reset_after.map(|d| {
                let ceil = d.as_micros().div_ceil(1000) + 1;
                now_ms.saturating_add(u64::try_from(ceil).unwrap_or(u64::MAX))
            }),
            near_limit: q.near_limit,
        });
        self.quota_avoid_until_ms
            .store(avoid_until, Ordering::Release);
    }

    /// Whether the endpoint is near its rate limit at `now_ms` (and so ranked last).
    pub fn near_quota_limit(&self, now_ms: u64) -> bool {
        now_ms < self.quota_avoid_until_ms.load(Ordering::Acquire)
    }

    /// The last rate-limit state reported, if any answer carried one.
    pub fn quota(&self) -> Option<QuotaSeen> {
        *self.quota.lock()
    }

    /// Cooldown deadline in registry-clock ms (0 = none).
    pub fn cooldown_until_ms(&self) -> u64 {
        self.cooldown_until_ms.load(Ordering::Acquire)
    }
}

/// Every name [`Endpoint::state_name`] gives (the states `ccgate_endpoint_state` exports).
pub const STATES: [&str; 5] = ["healthy", "degraded", "ejected", "cooling_down", "disabled"];

impl Endpoint {
    /// The state name shown for this endpoint: one of [`STATES`].
    pub fn state_name(&self) -> &'static str {
        if self.live.admin_disabled() {
            return "disabled";
        }
        match self.live.phase() {
            Phase::Healthy if self.live.consecutive_failures() > 0 => "degraded",
            Phase::Healthy => "healthy",
            Phase::Probation => "degraded",
            Phase::Ejected => "ejected",
            Phase::CoolingDown => "cooling_down",
            Phase::AuthDisabled => "disabled",
        }
    }
}
