//! The JSON views of the live state under `/_ccgate/` (SPEC §8 contract names).
//!
//! **Invariant:** only this module knows the JSON shape of the views; they read snapshots and
//! change nothing.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::clock::{ms, rfc3339};
use crate::health::classify::Kind;
use crate::health::endpoint::Endpoint;
use crate::health::machine::Phase;
use crate::proxy::gateway::Gateway;
use crate::proxy::usage::UsageSums;
use crate::proxy::usage::hit_rate;
use crate::store::{Persist, StorageStatus};

/// Latency figures in milliseconds.
#[derive(Serialize)]
pub struct LatencyView {
    /// Decaying average.
    pub avg_ms: Option<f64>,
    /// Median (histogram bucket bound).
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
}

/// The last failure of an endpoint.
#[derive(Serialize)]
pub struct LastErrorView {
    /// Outcome kind.
    pub kind: &'static str,
    /// Detail (never a secret).
    pub message: String,
    /// When (RFC 3339).
    pub at: String,
}

/// Cumulative counters across restarts: what the database holds plus what happened since the
/// last flush. The contract fields beside it stay per-process.
#[derive(Serialize)]
pub struct LifetimeView {
    /// Attempts (or client requests) ever sent.
    pub total_requests: u64,
    /// Of those, answered correctly.
    pub successful_requests: u64,
    /// Ended without a success: `endpoint_errors + caller_errors` (endpoints), as the live
    /// figure.
    pub failed_requests: u64,
    /// Part of `failed_requests`: the endpoint's fault.
    pub endpoint_errors: u64,
    /// Part of `failed_requests`: the caller's own error.
    pub caller_errors: u64,
    /// Abandoned because the client left.
    pub cancelled: u64,
}

/// What an endpoint's last answer said about its rate limit.
#[derive(Serialize)]
pub struct QuotaView {
    /// Fraction of the tightest window still available (`0.0..=1.0`).
    pub remaining_fraction: f64,
    /// When that window resets (RFC 3339), if the endpoint said.
    pub reset: Option<String>,
    /// Whether it is near its limit now, and so ranked last until `reset`.
    pub near_limit: bool,
}

/// One endpoint, as `GET /_ccgate/endpoints` shows it.
#[derive(Serialize)]
pub struct EndpointView {
    /// Name.
    pub name: String,
    /// Base URL (never a credential).
    pub base_url: String,
    /// Priority.
    pub priority: u32,
    /// Weight.
    pub weight: u32,
    /// `healthy`, `degraded`, `ejected`, `cooling_down` or `disabled`.
    pub state: &'static str,
    /// Whether an operator has it switched on.
    pub enabled: bool,
    /// On probation after a passed probe.
    pub probation: bool,
    /// Attempts in progress.
    pub in_flight: u64,
    /// Attempts sent.
    pub total_requests: u64,
    /// Attempts the endpoint answered completely and correctly.
    pub successful_requests: u64,
    /// Attempts that ended without a success (and were not cancelled):
    /// `endpoint_errors + caller_errors`.
    pub failed_requests: u64,
    /// Part of `failed_requests`: the endpoint's fault (what its health is judged on).
    pub endpoint_errors: u64,
    /// Part of `failed_requests`: the caller's own error, not the endpoint's fault.
    pub caller_errors: u64,
    /// Attempts abandoned because the client left.
    pub cancelled: u64,
    /// Ended attempts by outcome kind.
    pub outcomes: serde_json::Map<String, serde_json::Value>,
    /// Consecutive failures since the last success.
    pub consecutive_failures: u32,
    /// Health: `successful / judged_requests`, 1.0 before any verdict.
    pub success_rate: f64,
    /// What `success_rate` is over: `successful_requests + endpoint_errors` (caller errors and
    /// cancellations say nothing about the endpoint).
    pub judged_requests: u64,
    /// Time to response headers.
    pub latency_first_byte: LatencyView,
    /// Time to the end of the body.
    pub latency_total: LatencyView,
    /// The last failure.
    pub last_error: Option<LastErrorView>,
    /// End of a rate-limit cooldown (RFC 3339), while cooling down.
    pub cooldown_until: Option<String>,
    /// Its rate limit as its last answer's `anthropic-ratelimit-*` headers told (`null`: never
    /// told).
    pub quota: Option<QuotaView>,
    /// The model patterns it serves (`null`: every model).
    pub models: Option<Vec<String>>,
    /// Counters across restarts (state that lasts).
    pub lifetime: LifetimeView,
    /// Token usage and prompt-cache figures since start, in total and per model.
    pub cache: CacheView,
}

/// Tokens of successful answers and the prompt-cache hit rate.
#[derive(Serialize, Default)]
pub struct CacheSums {
    /// Answers whose usage was read.
    pub requests: u64,
    /// Uncached input tokens (`input_tokens`).
    pub input_tokens: u64,
    /// Prompt-cache writes (`cache_creation_input_tokens`).
    pub cache_creation_input_tokens: u64,
    /// Prompt-cache reads (`cache_read_input_tokens`).
    pub cache_read_input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// `cache_read / (cache_read + cache_creation + input)`; `null` before any input.
    pub hit_rate: Option<f64>,
}

impl CacheSums {
    fn of(s: &UsageSums) -> Self {
        Self {
            requests: s.requests,
            input_tokens: s.usage.input,
            cache_creation_input_tokens: s.usage.cache_creation,
            cache_read_input_tokens: s.usage.cache_read,
            output_tokens: s.usage.output,
            hit_rate: hit_rate(&s.usage),
        }
    }
}

/// An endpoint's usage since start: the sum and each model's.
#[derive(Serialize)]
pub struct CacheView {
    /// All models.
    #[serde(flatten)]
    pub total: CacheSums,
    /// Per model, as the answers named it.
    pub models: BTreeMap<String, CacheSums>,
}

fn cache_view(gw: &Gateway, endpoint: &str) -> CacheView {
    let mut total = UsageSums::default();
    let mut models = BTreeMap::new();
    for (model, sums) in gw.live_usage.of_endpoint(endpoint) {
        total.add(&sums);
        models.insert(model, CacheSums::of(&sums));
    }
    CacheView {
        total: CacheSums::of(&total),
        models,
    }
}

fn latency(l: &crate::health::endpoint::Latency) -> LatencyView {
    LatencyView {
        avg_ms: l.ewma().map(|d| d.as_secs_f64() * 1000.0),
        p50_ms: l.percentile_ms(0.5),
        p90_ms: l.percentile_ms(0.9),
        p99_ms: l.percentile_ms(0.99),
    }
}

/// Builds the view of one endpoint.
pub fn endpoint_view(gw: &Gateway, persist: &Persist, ep: &Endpoint) -> EndpointView {
    let c = ep.live.snapshot();
    let clock = gw.registry.clock;
    let mut outcomes = serde_json::Map::new();
    for k in Kind::ALL {
        outcomes.insert(k.name().into(), c.by_kind[k as usize].into());
    }
    let phase = ep.live.phase();
    EndpointView {
        name: ep.name.clone(),
        base_url: ep.base_url.to_string(),
        priority: ep.priority,
        weight: ep.weight,
        state: ep.state_name(),
        enabled: !ep.live.admin_disabled(),
        probation: phase == Phase::Probation,
        in_flight: c.in_flight,
        total_requests: c.total,
        successful_requests: c.successful(),
        failed_requests: c.failed(),
        endpoint_errors: c.endpoint_errors(),
        caller_errors: c.caller_errors(),
        cancelled: c.cancelled(),
        outcomes,
        consecutive_failures: ep.live.consecutive_failures(),
        success_rate: c.success_rate(),
        judged_requests: c.judged(),
        latency_first_byte: latency(&ep.live.ttfb),
        latency_total: latency(&ep.live.total),
        last_error: ep.live.last_error().map(|e| LastErrorView {
            kind: e.kind.name(),
            message: e.message.clone(),
            at: rfc3339(e.at),
        }),
        models: ep.models.as_ref().map(|m| m.patterns().to_vec()),
        quota: ep.live.quota().map(|q| QuotaView {
            remaining_fraction: q.remaining_fraction,
            reset: q.reset_ms.map(|at| rfc3339(clock.wall(at))),
            near_limit: ep.live.near_quota_limit(clock.now_ms()),
        }),
        cooldown_until: (phase == Phase::CoolingDown)
            .then(|| rfc3339(clock.wall(ep.live.cooldown_until_ms()))),
        cache: cache_view(gw, &ep.name),
        lifetime: {
            let l = persist.lifetime(&ep.name, &ep.live);
            LifetimeView {
                total_requests: l.total,
                successful_requests: l.successful(),
                failed_requests: l.failed(),
                endpoint_errors: l.endpoint_errors(),
                caller_errors: l.caller_errors(),
                cancelled: l.cancelled(),
            }
        },
    }
}

/// `GET /_ccgate/requests?limit=N&after=SEQ`: the last `limit` requests (default 100, at most
/// the ring's size) with a `seq` above `after` (default 0), newest first.
pub fn requests_json(gw: &Gateway, query: Option<&str>) -> serde_json::Value {
    let param = |name: &str| {
        query?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    let limit = param("limit").unwrap_or(100).min(1_000_000) as usize;
    let after = param("after").unwrap_or(0);
    let list: Vec<serde_json::Value> = gw
        .recent
        .recent(limit, after)
        .iter()
        .map(|r| {
            let u = r.usage.as_ref();
            serde_json::json!({
                "seq": r.seq,
                "at": rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.at_ms.max(0) as u64)),
                "request_id": r.request_id,
                "method": r.method,
                "path": r.path,
                "model": r.model,
                "endpoint": r.endpoint,
                "attempts": r.attempts,
                "status": r.status,
                "outcome": r.outcome,
                "first_byte_ms": r.first_byte_ms,
                "total_ms": r.total_ms,
                "input_tokens": u.map(|u| u.input),
                "output_tokens": u.map(|u| u.output),
                "cache_creation_input_tokens": u.map(|u| u.cache_creation),
                "cache_read_input_tokens": u.map(|u| u.cache_read),
            })
        })
        .collect();
    serde_json::json!({
        "capacity": gw.config.requests.ring_size,
        "started_at": humantime::format_rfc3339_micros(gw.recent.started_at()).to_string(),
        "requests": list,
    })
}

/// `GET /_ccgate/endpoints`.
pub fn endpoints_json(gw: &Gateway, persist: &Persist) -> serde_json::Value {
    let list: Vec<EndpointView> = gw
        .registry
        .endpoints
        .iter()
        .map(|e| endpoint_view(gw, persist, e))
        .collect();
    serde_json::json!({ "endpoints": list })
}

/// `GET /_ccgate/failure-queue`.
pub fn failure_queue_json(gw: &Gateway) -> serde_json::Value {
    let clock = gw.registry.clock;
    let (entries, stats) = gw.registry.queue.view();
    let entries: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let ep = &gw.registry.endpoints[e.idx];
            serde_json::json!({
                "name": e.name,
                "reason": e.reason.name(),
                "state": ep.state_name(),
                "since": rfc3339(e.since),
                "next_probe_at": rfc3339(clock.wall(e.next_probe_at_ms)),
                "probe_attempts": e.probe_attempts,
                "probation": e.probation,
                "last_probe": e.last_probe,
                "last_error": ep.live.last_error().map(|l| l.message.clone()),
            })
        })
        .collect();
    serde_json::json!({
        "size": entries.len(),
        "entries": entries,
        "stats": {
            "total_failed": stats.total_failed,
            "total_verified": stats.total_verified,
            "total_recovered": stats.total_recovered,
            "total_still_failed": stats.total_still_failed,
            "total_closed": stats.total_closed,
        }
    })
}

/// `GET /_ccgate/stats`.
pub fn stats_json(gw: &Gateway, persist: &Persist) -> serde_json::Value {
    let s = gw.registry.gateway.snapshot();
    let lifetime = persist.gateway_lifetime(&gw.registry.gateway);
    serde_json::json!({
        "total_requests": s.total,
        "successful_requests": s.successful,
        "failed_requests": s.failed,
        "in_flight": s.in_flight,
        "upstream_errors": s.upstream_errors,
        "caller_errors": s.caller_errors,
        "cancelled": s.cancelled,
        "retries": s.retries,
        "fallbacks": s.fallbacks,
        "budget_refusals": s.budget_refusals,
        "sessions": gw.affinity.as_ref().map_or(0, |a| a.len()),
        "uptime_seconds": gw.registry.clock.uptime().as_secs(),
        "endpoints": gw.registry.endpoints.len(),
        "failure_queue_size": gw.registry.queue.len(),
        "lifetime": {
            "total_requests": lifetime.started,
            "successful_requests": lifetime.success,
            "failed_requests": lifetime.failed(),
            "upstream_errors": lifetime.upstream_errors,
            "caller_errors": lifetime.caller_errors,
            "cancelled": lifetime.cancelled,
        },
        "storage": storage_json(&persist.status()),
    })
}

/// The `storage` object of `/_ccgate/stats`.
fn storage_json(s: &StorageStatus) -> serde_json::Value {
    serde_json::json!({
        "enabled": s.enabled,
        "configured": s.configured,
        "path": s.path.as_ref().map(|p| p.display().to_string()),
        "flush_interval_ms": ms(s.flush_interval),
        "last_flush": s.last_flush.map(rfc3339),
        "error": s.error,
    })
}

/// `GET /_ccgate/episodes`: the latest episodes, newest first; an open episode shows the probes
/// run so far.
pub fn episodes_json(gw: &Gateway, persist: &Persist) -> serde_json::Value {
    let list: Vec<serde_json::Value> = persist
        .recent_episodes()
        .iter()
        .map(|r| {
            let probes = match r.ended_at_ms {
                Some(_) => r.probes,
                None => gw
                    .registry
                    .by_name(&r.endpoint)
                    .and_then(|ep| gw.registry.queue.probe_attempts(ep.idx))
                    .map_or(r.probes, |p| p.max(r.probes)),
            };
            serde_json::json!({
                "id": r.id,
                "endpoint": r.endpoint,
                "reason": r.reason,
                "started_at": rfc3339(r.started_at()),
                "ended_at": r.ended_at().map(rfc3339),
                "duration_seconds": r.ended_at_ms
                    .map(|e| (e - r.started_at_ms).max(0) as f64 / 1000.0),
                "probes": probes,
                "open": r.ended_at_ms.is_none(),
                "ended_by": r.ended_by,
            })
        })
        .collect();
    serde_json::json!({ "storage": persist.is_active(), "episodes": list })
}
