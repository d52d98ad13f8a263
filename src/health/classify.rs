//! Pure classification of an attempt: (status, headers, SSE error type, transport error) → [`Outcome`].
//!
//! Nothing here does I/O or reads a clock; `now` is passed in where a reset time must be turned
//! into a duration. The table in SPEC §4 is the source of truth, and the tests below mirror it.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

/// How a transport-level attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// Connect refused, reset, TLS failure, or the connection closed before response headers.
    Connect,
    /// No response headers within the first-byte timeout (or the connect timeout).
    Timeout,
    /// The body went silent for longer than the idle timeout.
    Idle,
    /// The body ended early: connection cut, or a stream without `message_stop`.
    Cut,
}

/// The single verdict on one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx, and for a stream a `message_stop`.
    Success,
    /// 503, 529, or an SSE `overloaded_error`.
    Overloaded,
    /// 500, 502, 504 or another 5xx, or an SSE `api_error`.
    ServerError,
    /// The connection or stream broke.
    Transport(TransportKind),
    /// 429: the endpoint asked us to back off for this long (if it said).
    RateLimited(Option<Duration>),
    /// 401, 402, 403: the endpoint's credential or account is not usable.
    Auth,
    /// The caller's own mistake (400, 404, 405, 413, 422, other 4xx): not the endpoint's fault.
    CallerError,
    /// The client went away before the attempt finished.
    Cancelled,
}

/// Outcome categories as counter indexes; [`Outcome::kind`] maps onto them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(usize)]
pub enum Kind {
    /// [`Outcome::Success`].
    Success = 0,
    /// [`Outcome::CallerError`].
    CallerError,
    /// [`Outcome::Cancelled`].
    Cancelled,
    /// [`Outcome::Overloaded`].
    Overloaded,
    /// [`Outcome::ServerError`].
    ServerError,
    /// [`Outcome::Transport`] other than timeouts.
    Transport,
    /// [`Outcome::Transport`] with [`TransportKind::Timeout`] or [`TransportKind::Idle`].
    Timeout,
    /// [`Outcome::RateLimited`].
    RateLimited,
    /// [`Outcome::Auth`].
    Auth,
}

impl Kind {
    /// Number of kinds.
    pub const COUNT: usize = 9;
    /// All kinds, in index order.
    pub const ALL: [Kind; Self::COUNT] = [
        Kind::Success,
        Kind::CallerError,
        Kind::Cancelled,
        Kind::Overloaded,
        Kind::ServerError,
        Kind::Transport,
        Kind::Timeout,
        Kind::RateLimited,
        Kind::Auth,
    ];
    /// Stable lowercase name for views and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Success => "success",
            Kind::CallerError => "caller_error",
            Kind::Cancelled => "cancelled",
            Kind::Overloaded => "overloaded",
            Kind::ServerError => "server_error",
            Kind::Transport => "transport",
            Kind::Timeout => "timeout",
            Kind::RateLimited => "rate_limited",
            Kind::Auth => "auth",
        }
    }

    /// The kind of this [`Kind::name`] (as stored in the database), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
    /// Whether this kind is the endpoint's fault (counts in `failed_requests`).
    pub fn is_failure(self) -> bool {
        !matches!(self, Kind::Success | Kind::CallerError | Kind::Cancelled)
    }
}

impl Outcome {
    /// The counter this outcome moves.
    pub fn kind(self) -> Kind {
        match self {
            Outcome::Success => Kind::Success,
            Outcome::CallerError => Kind::CallerError,
            Outcome::Cancelled => Kind::Cancelled,
            Outcome::Overloaded => Kind::Overloaded,
            Outcome::ServerError => Kind::ServerError,
            Outcome::Transport(TransportKind::Timeout | TransportKind::Idle) => Kind::Timeout,
            Outcome::Transport(_) => Kind::Transport,
            Outcome::RateLimited(_) => Kind::RateLimited,
            Outcome::Auth => Kind::Auth,
        }
    }
    /// Whether the endpoint is to blame.
    pub fn is_endpoint_fault(self) -> bool {
        self.kind().is_failure()
    }
}

/// What to do with a response, judged from its status line and headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: relay it; the final outcome is decided when the body ends.
    Relay,
    /// The caller's error: relay it unchanged, not the endpoint's fault.
    RelayCallerError,
    /// The endpoint failed: do not relay, try the next endpoint.
    FailOver(Outcome),
}

/// Classifies a response by its status and headers. `now` turns absolute reset times into
/// durations; it is only asked for a 429.
pub fn classify_status(
    status: StatusCode,
    headers: &HeaderMap,
    now: impl FnOnce() -> SystemTime,
) -> Verdict {
    match status.as_u16() {
        200..=299 => Verdict::Relay,
        401..=403 => Verdict::FailOver(Outcome::Auth),
        408 => Verdict::FailOver(Outcome::Transport(TransportKind::Timeout)),
        429 => Verdict::FailOver(Outcome::RateLimited(retry_after(headers, now()))),
        503 | 529 => Verdict::FailOver(Outcome::Overloaded),
        // "Not Implemented" is about the request's method, which every endpoint would refuse.
        501 => Verdict::RelayCallerError,
        500..=599 => Verdict::FailOver(Outcome::ServerError),
        // 3xx and the remaining 4xx are answers about the request itself, which another endpoint
        // would give too.
        300..=499 => Verdict::RelayCallerError,
        // No answer to a request: a 1xx that is not an interim answer (hyper takes those), a
        // `101 Switching Protocols` nobody asked for, a status beyond 599. Relayed, it would
        // break the client's connection or its reading of the answer: the endpoint's fault.
        _ => Verdict::FailOver(Outcome::ServerError),
    }
}

/// The verdict on an answer from an endpoint that forwards the client's own credential
/// (`credential = "client"`): a 401/402/403 there refuses the *client's* login or account, which
/// no other endpoint can fix and the endpoint is not to blame for. It goes back to the client
/// unchanged (Claude Code then asks its user to log in again), counts as the caller's error, and
/// neither fails over (a keyed endpoint would hide an expired login behind someone else's quota)
/// nor disables the endpoint for everyone else.
pub fn with_client_credential(verdict: Verdict) -> Verdict {
    match verdict {
        Verdict::FailOver(Outcome::Auth) => Verdict::RelayCallerError,
        other => other,
    }
}

/// Classifies an SSE `error` event by its `error.type`.
pub fn classify_sse_error(error_type: &str) -> Outcome {
    match error_type {
        "overloaded_error" => Outcome::Overloaded,
        "rate_limit_error" => Outcome::RateLimited(None),
        "authentication_error" | "permission_error" | "billing_error" => Outcome::Auth,
        "invalid_request_error" | "not_found_error" | "request_too_large" => Outcome::CallerError,
        // `api_error`, `timeout_error` and anything unknown: the endpoint broke.
        _ => Outcome::ServerError,
    }
}

/// How long a 429 asks us to wait: `retry-after-ms`, `retry-after` (seconds or HTTP date), or the
/// latest `anthropic-ratelimit-*-reset` (RFC 3339 for API keys; unix seconds for subscriptions'
/// `anthropic-ratelimit-unified-*-reset`, of which the overall `…-unified-reset` counts when
/// present) — whichever is longest, capped at one day.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let mut best: Option<Duration> = None;
    let mut offer = |d: Duration| best = Some(best.map_or(d, |b| b.max(d)));
    if let Some(ms) =
        header_str(headers, "retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        offer(Duration::from_secs_f64((ms / 1000.0).min(86_400.0)));
    }
    if let Some(v) = header_str(headers, "retry-after") {
        if let Ok(secs) = v.trim().parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                offer(Duration::from_secs_f64(secs.min(86_400.0)));
            }
        } else if let Ok(at) = httpdate::parse_http_date(v.trim()) {
            offer(at.duration_since(now).unwrap_or_default());
        }
    }
    // The unified windows' resets: the overall one names the window that limits, and wins over
    // the others; without it, the windows whose status says they refused, else all of them (a
    // week's window resets long after the five hours' that refused).
    let mut unified_overall: Option<Duration> = None;
    let mut unified_windows: Option<Duration> = None;
    let mut unified_refused: Option<Duration> = None;
    for (name, value) in headers {
        let n = name.as_str();
        if !(n.starts_with("anthropic-ratelimit-") && n.ends_with("-reset")) {
            continue;
        }
        let Some(v) = value.to_str().ok().map(str::trim) else {
            continue;
        };
        let at = humantime::parse_rfc3339_weak(v).ok().or_else(|| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e11)
                .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs_f64(s)))
        });
        let Some(wait) = at.map(|at| at.duration_since(now).unwrap_or_default()) else {
            continue;
        };
        if n == "anthropic-ratelimit-unified-reset" {
            unified_overall = Some(wait);
        } else if let Some(window) = n
            .strip_prefix(UNIFIED)
            .and_then(|w| w.strip_suffix("-reset"))
        {
            let longest = |w: Option<Duration>| Some(w.map_or(wait, |w| w.max(wait)));
            unified_windows = longest(unified_windows);
            let status = format!("{UNIFIED}{window}-status");
            if header_str(headers, &status).is_some_and(|s| s.trim() == "rejected") {
                unified_refused = longest(unified_refused);
            }
        } else {
            offer(wait);
        }
    }
    if let Some(wait) = unified_overall.or(unified_refused).or(unified_windows) {
        offer(wait);
    }
    best.map(|d| d.min(Duration::from_secs(86_400)))
}

/// How much of its rate limit an endpoint has used, as the rate-limit headers of one answer say.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quota {
    /// Fraction used of the tightest window, `0.0..=1.0`.
    pub used: f64,
    /// Time until that window resets (for a near-limit answer: until the windows that are near
    /// their limit reset), if the headers said.
    pub reset_after: Option<Duration>,
    /// Whether the endpoint is close to its limit: `used >= threshold`, or a unified status other
    /// than `allowed`.
    pub near_limit: bool,
}

/// The API-key limits Anthropic reports, as `anthropic-ratelimit-{kind}-{limit,remaining,reset}`.
const KEY_LIMITS: [&str; 4] = ["requests", "tokens", "input-tokens", "output-tokens"];
const UNIFIED: &str = "anthropic-ratelimit-unified-";

/// Reads the rate-limit headers of an answer (any status): for subscriptions
/// `anthropic-ratelimit-unified-status` and each window's `-{w}-utilization` (0..1) and
/// `-{w}-reset` (unix seconds); for API keys `anthropic-ratelimit-{kind}-{limit,remaining,reset}`
/// (reset in RFC 3339). The tightest window counts. `None` when the answer carries none of them
/// (a relay that does not pass them on says nothing, rather than "all is well").
pub fn quota(headers: &HeaderMap, now: SystemTime, threshold: f64) -> Option<Quota> {
    // Most answers (relays, errors, mocks) carry none of these: say so after one pass over the
    // names, before any lookup or allocation.
    if !headers
        .keys()
        .any(|k| k.as_str().starts_with("anthropic-ratelimit-"))
    {
        return None;
    }
    // (used, reset) per window.
    let mut windows: Vec<(f64, Option<Duration>)> = Vec::new();
    let until_unix = |v: &str| -> Option<Duration> {
        let secs = v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)?;
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs.min(1e11));
        Some(at.duration_since(now).unwrap_or_default())
    };
    for (name, value) in headers {
        let Some(window) = name
            .as_str()
            .strip_prefix(UNIFIED)
            .and_then(|n| n.strip_suffix("-utilization"))
        else {
            continue;
        };
        let Some(used) = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|u| u.is_finite())
        else {
            continue;
        };
        let reset = header_str(headers, &format!("{UNIFIED}{window}-reset")).and_then(until_unix);
        windows.push((used.clamp(0.0, 1.0), reset));
    }
    for kind in KEY_LIMITS {
        let num = |part: &str| {
            header_str(headers, &format!("anthropic-ratelimit-{kind}-{part}"))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|n| n.is_finite() && *n >= 0.0)
        };
        let (Some(limit), Some(remaining)) = (num("limit"), num("remaining")) else {
            continue;
        };
        if limit <= 0.0 {
            continue;
        }
        let reset = header_str(headers, &format!("anthropic-ratelimit-{kind}-reset"))
            .and_then(|v| humantime::parse_rfc3339_weak(v.trim()).ok())
            .map(|at| at.duration_since(now).unwrap_or_default());
        windows.push(((1.0 - remaining / limit).clamp(0.0, 1.0), reset));
    }
    let status = header_str(headers, &format!("{UNIFIED}status")).map(str::trim);
    if windows.is_empty() && status.is_none() {
        return None;
    }
    let tightest = windows
        .iter()
        .copied()
        .max_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let used = tightest.map_or(0.0, |t| t.0);
    let status_near = status.is_some_and(|s| !s.eq_ignore_ascii_case("allowed"));
    let over = windows
        .iter()
        .filter(|w| w.0 >= threshold)
        .filter_map(|w| w.1)
        .max();
    let overall = header_str(headers, &format!("{UNIFIED}reset")).and_then(until_unix);
    let latest = windows.iter().filter_map(|w| w.1).max();
    let reset_after = if used >= threshold {
        over.or(overall)
    } else if status_near {
        overall.or(latest)
    } else {
        tightest.and_then(|t| t.1).or(overall)
    };
    Some(Quota {
        used,
        reset_after: reset_after.map(|d| d.min(Duration::from_secs(8 * 86_400))),
        near_limit: status_near || used >= threshold,
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn check(status: u16, headers: &[(&str, &str)], want: Verdict) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let got = classify_status(StatusCode::from_u16(status).expect("status"), &map, || now);
        assert_eq!(got, want, "status {status} {headers:?}");
    }

    #[test]
    fn spec_table() {
        use Outcome::*;
        use Verdict::*;
        check(200, &[], Relay);
        check(201, &[], Relay);
        for s in [500, 502, 504, 599] {
            check(s, &[], FailOver(ServerError));
        }
        check(503, &[], FailOver(Overloaded));
        check(501, &[], RelayCallerError);
        check(529, &[], FailOver(Overloaded));
        check(429, &[], FailOver(RateLimited(None)));
        check(
            429,
            &[("retry-after", "7")],
            FailOver(RateLimited(Some(Duration::from_secs(7)))),
        );
        check(
            429,
            &[("retry-after-ms", "1500")],
            FailOver(RateLimited(Some(Duration::from_millis(1500)))),
        );
        check(
            429,
            &[
                ("retry-after", "2"),
                ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:14:00Z"),
            ],
            FailOver(RateLimited(Some(Duration::from_secs(40)))),
        );
        check(
            429,
            &[("retry-after", "Tue, 14 Nov 2023 22:13:40 GMT")],
            FailOver(RateLimited(Some(Duration::from_secs(20)))),
        );
        check(
            429,
            &[("retry-after", "garbage")],
            FailOver(RateLimited(None)),
        );
        // Subscriptions' unified resets are unix seconds (now is 1_700_000_000); the overall
        // reset names the window that refused and wins over the others (audit: ignored, so the
        // endpoint came back after the fallback cooldown, an hour early).
        check(
            429,
            &[
                ("anthropic-ratelimit-unified-status", "rejected"),
                ("anthropic-ratelimit-unified-reset", "1700003600"),
            ],
            FailOver(RateLimited(Some(Duration::from_secs(3600)))),
        );
        check(
            429,
            &[
                ("anthropic-ratelimit-unified-reset", "1700000006"),
                ("anthropic-ratelimit-unified-5h-reset", "1700000011"),
                ("anthropic-ratelimit-unified-7d-reset", "1700500000"),
            ],
            FailOver(RateLimited(Some(Duration::from_secs(6)))),
        );
        check(
            429,
            &[
                ("anthropic-ratelimit-unified-5h-reset", "1700000011"),
                ("anthropic-ratelimit-unified-7d-reset", "1700000500"),
                ("retry-after", "3"),
            ],
            FailOver(RateLimited(Some(Duration::from_secs(500)))),
        );
        // Without the overall reset, the window that refused decides (review: the week's reset
        // won over the five hours' that refused).
        check(
            429,
            &[
                ("anthropic-ratelimit-unified-5h-status", "rejected"),
                ("anthropic-ratelimit-unified-5h-reset", "1700000011.5"),
                ("anthropic-ratelimit-unified-7d-status", "allowed"),
                ("anthropic-ratelimit-unified-7d-reset", "1700000500"),
                ("retry-after", "3"),
            ],
            FailOver(RateLimited(Some(Duration::from_millis(11_500)))),
        );
        check(401, &[], FailOver(Auth));
        check(403, &[], FailOver(Auth));
        check(402, &[], FailOver(Auth));
        check(408, &[], FailOver(Transport(TransportKind::Timeout)));
        for s in [400, 404, 405, 409, 413, 422, 301] {
            check(s, &[], RelayCallerError);
        }
        // No answer to a request at all: the endpoint's fault.
        for s in [101, 199, 600, 999] {
            check(s, &[], FailOver(ServerError));
        }
    }

    #[test]
    fn a_refused_client_credential_is_the_callers() {
        use Outcome::*;
        use Verdict::*;
        assert_eq!(with_client_credential(FailOver(Auth)), RelayCallerError);
        for keep in [
            Relay,
            RelayCallerError,
            FailOver(RateLimited(None)),
            FailOver(Overloaded),
            FailOver(ServerError),
        ] {
            assert_eq!(with_client_credential(keep), keep);
        }
    }

    #[test]
    fn sse_errors() {
        assert_eq!(classify_sse_error("overloaded_error"), Outcome::Overloaded);
        assert_eq!(classify_sse_error("api_error"), Outcome::ServerError);
        assert_eq!(classify_sse_error("something_new"), Outcome::ServerError);
        assert_eq!(
            classify_sse_error("invalid_request_error"),
            Outcome::CallerError
        );
        assert_eq!(
            classify_sse_error("rate_limit_error"),
            Outcome::RateLimited(None)
        );
    }

    #[test]
    fn kinds_split_faults_from_non_faults() {
        let faults: Vec<&str> = Kind::ALL
            .iter()
            .filter(|k| k.is_failure())
            .map(|k| k.name())
            .collect();
        assert_eq!(
            faults,
            [
                "overloaded",
                "server_error",
                "transport",
                "timeout",
                "rate_limited",
                "auth"
            ]
        );
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
            assert_eq!(Kind::from_name(k.name()), Some(*k));
        }
        assert_eq!(Kind::from_name("started"), None);
        assert!(!Outcome::CallerError.is_endpoint_fault());
        assert!(!Outcome::Cancelled.is_endpoint_fault());
        assert!(Outcome::Transport(TransportKind::Cut).is_endpoint_fault());
    }

    #[test]
    fn quota_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let read = |headers: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            quota(&map, now, 0.95)
        };
        let secs = Duration::from_secs;
        assert_eq!(read(&[]), None);
        assert_eq!(read(&[("retry-after", "3")]), None);
        // A subscription: the tightest window counts, with its own reset.
        assert_eq!(
            read(&[
                ("anthropic-ratelimit-unified-status", "allowed"),
                ("anthropic-ratelimit-unified-5h-utilization", "0.5"),
                ("anthropic-ratelimit-unified-5h-reset", "1700000600"),
                ("anthropic-ratelimit-unified-7d-utilization", "0.25"),
                ("anthropic-ratelimit-unified-7d-reset", "1700090000"),
            ]),
            Some(Quota {
                used: 0.5,
                reset_after: Some(secs(600)),
                near_limit: false
            })
        );
        assert_eq!(
            read(&[
                ("anthropic-ratelimit-unified-status", "allowed"),
                ("anthropic-ratelimit-unified-5h-utilization", "0.97"),
                ("anthropic-ratelimit-unified-5h-reset", "1700000060"),
            ]),
            Some(Quota {
                used: 0.97,
                reset_after: Some(secs(60)),
                near_limit: true
            })
        );
        // A status other than `allowed` is near the limit whatever the utilisation.
        for status in ["allowed_warning", "rejected"] {
            assert_eq!(
                read(&[
                    ("anthropic-ratelimit-unified-status", status),
                    ("anthropic-ratelimit-unified-5h-utilization", "0.4"),
                    ("anthropic-ratelimit-unified-5h-reset", "1700000100"),
                    ("anthropic-ratelimit-unified-reset", "1700000200"),
                ]),
                Some(Quota {
                    used: 0.4,
                    reset_after: Some(secs(200)),
                    near_limit: true
                }),
                "{status}"
            );
        }
        // A reset in the past is due now; nonsense values are ignored.
        assert_eq!(
            read(&[
                ("anthropic-ratelimit-unified-5h-utilization", "1.5"),
                ("anthropic-ratelimit-unified-5h-reset", "1600000000"),
                ("anthropic-ratelimit-unified-7d-utilization", "abc"),
            ]),
            Some(Quota {
                used: 1.0,
                reset_after: Some(secs(0)),
                near_limit: true
            })
        );
        // An API key: remaining over limit, per kind; the tightest kind counts.
        assert_eq!(
            read(&[
                ("anthropic-ratelimit-requests-limit", "100"),
                ("anthropic-ratelimit-requests-remaining", "3"),
                ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:40Z"),
                ("anthropic-ratelimit-tokens-limit", "1000"),
                ("anthropic-ratelimit-tokens-remaining", "900"),
                ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:14:20Z"),
            ]),
            Some(Quota {
                used: 0.97,
                reset_after: Some(secs(20)),
                near_limit: true
            })
        );
        assert_eq!(
            read(&[
                ("anthropic-ratelimit-input-tokens-limit", "1000"),
                ("anthropic-ratelimit-input-tokens-remaining", "500"),
                ("anthropic-ratelimit-output-tokens-limit", "0"),
                ("anthropic-ratelimit-output-tokens-remaining", "0"),
            ]),
            Some(Quota {
                used: 0.5,
                reset_after: None,
                near_limit: false
            })
        );
    }
}
