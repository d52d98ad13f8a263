//! The registry: every endpoint, the failure queue, the gateway totals, and the admission rules that
//! say whether an endpoint may take a request right now.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::clock::Clock;
use crate::config::{Config, EndpointConfig};
use crate::health::attempt::Recorder;
use crate::health::endpoint::Endpoint;
use crate::health::machine::{Event, Phase};
use crate::health::queue::FailureQueue;
use crate::health::totals::GatewayStats;
use crate::transport::upstream::{ClientError, build_worker_clients};

/// Whether an endpoint may take a request now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// In rotation.
    Yes,
    /// On probation, and this request holds its one slot.
    Probation,
    /// Not now.
    No,
}

/// A fresh failure queue and the recorder that drives it, as `config.health` sets them up.
fn health_state(config: &Config, clock: Clock) -> (Arc<FailureQueue>, Arc<Recorder>) {
    let h = &config.health;
    let queue = Arc::new(FailureQueue::new(
        clock,
        h.failure_threshold,
        h.probe_interval,
        h.probe_max_interval,
    ));
    let recorder = Arc::new(Recorder {
        clock,
        queue: Arc::clone(&queue),
        default_cooldown: h.rate_limit_cooldown,
    });
    (queue, recorder)
}

/// A new endpoint (fresh counters and health, its own upstream client) at position `idx`.
fn fresh_endpoint(
    config: &Config,
    idx: usize,
    e: &EndpointConfig,
) -> Result<Endpoint, ClientError> {
    let client = build_worker_clients(
        e.ca_file.as_deref(),
        &config.timeouts,
        config.server.workers,
        config.server.max_idle_upstream,
        e.http2,
    )?;
    Ok(Endpoint::new(idx, e, client))
}

/// What a config reload did to the endpoints, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// New endpoints.
    pub added: Vec<String>,
    /// Endpoints no longer configured.
    pub removed: Vec<String>,
    /// Endpoints whose config changed: they start afresh.
    pub changed: Vec<String>,
    /// Endpoints carried over with their counters and health.
    pub kept: Vec<String>,
    /// Settings the file changed that only a restart applies (`server.listen`, `[storage]`, ...),
    /// each with what stays in force until then.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
}

/// `retry-after` (seconds) when every endpoint that could serve a request is switched off.
pub const RETRY_WHEN_ALL_OFF_SECS: u64 = 30;

/// All endpoints and their shared state.
pub struct Registry {
    /// Endpoints in config order; `endpoints[i].idx == i`.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Where attempts record outcomes.
    pub recorder: Arc<Recorder>,
    /// The failure queue.
    pub queue: Arc<FailureQueue>,
    /// Gateway totals.
    pub gateway: Arc<GatewayStats>,
    /// The clock.
    pub clock: Clock,
    /// Whether any endpoint routes by model (`models`) or rewrites it (`model_map`): then every
    /// request's model is read exactly (see `proxy::handler`). Set with `endpoints`.
    pub reads_model: bool,
}

/// Whether any of `endpoints` routes by model or rewrites it.
fn reads_model(endpoints: &[Arc<Endpoint>]) -> bool {
    endpoints
        .iter()
        .any(|e| e.models.is_some() || !e.model_map.is_empty())
}

impl Registry {
    /// Builds the registry (and each endpoint's upstream client) from a validated config.
    pub fn new(config: &Config) -> Result<Self, ClientError> {
        let clock = Clock::new();
        let (queue, recorder) = health_state(config, clock);
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for (idx, e) in config.endpoints.iter().enumerate() {
            endpoints.push(Arc::new(fresh_endpoint(config, idx, e)?));
        }
        Ok(Self {
            reads_model: reads_model(&endpoints),
            endpoints,
            recorder,
            queue,
            gateway: Arc::new(GatewayStats::default()),
            clock,
        })
    }

    /// Builds the registry for a reloaded config, continuing `old`: endpoints whose config is
    /// unchanged (or changed only in `enabled`) keep their counters, health, failure-queue entry
    /// and — when `pools_kept` (the settings connections are made with are the same) — their
    /// connection pool; the gateway totals, queue statistics and clock carry on.
    pub fn reloaded(
        config: &Config,
        old: &Registry,
        pools_kept: bool,
    ) -> Result<(Self, ReloadReport), ClientError> {
        let clock = old.clock;
        let (queue, recorder) = health_state(config, clock);
        let mut report = ReloadReport::default();
        let mut moved: Vec<(usize, usize)> = Vec::new();
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for (idx, e) in config.endpoints.iter().enumerate() {
            let previous = old.by_name(&e.name);
            let same = previous.filter(|p| {
                let mut was = p.config.clone();
                was.enabled = e.enabled;
                was == *e
            });
            let ep = match same {
                Some(p) => {
                    if p.config.enabled != e.enabled {
                        p.live.set_admin_disabled(!e.enabled);
                    }
                    moved.push((p.idx, idx));
                    report.kept.push(e.name.clone());
                    let client = if pools_kept {
                        p.client.clone()
                    } else {
                        fresh_endpoint(config, idx, e)?.client
                    };
                    Endpoint::with_live(idx, e, client, Arc::clone(&p.live))
                }
                None => {
                    let fresh = fresh_endpoint(config, idx, e)?;
                    match previous {
                        Some(p) => {
                            report.changed.push(e.name.clone());
                            // Its sessions stay bound (by name) unless it leaves rotation.
                            fresh.live.carry_leaves(&p.live);
                        }
                        None => report.added.push(e.name.clone()),
                    }
                    fresh
                }
            };
            endpoints.push(Arc::new(ep));
        }
        report.removed = old
            .endpoints
            .iter()
            .filter(|o| !config.endpoints.iter().any(|e| e.name == o.name))
            .map(|o| o.name.clone())
            .collect();
        queue.adopt(&old.queue, |old_idx| {
            moved.iter().find(|(o, _)| *o == old_idx).map(|(_, n)| *n)
        });
        old.queue.superseded_by(&queue);
        let registry = Self {
            reads_model: reads_model(&endpoints),
            endpoints,
            recorder,
            queue,
            gateway: Arc::clone(&old.gateway),
            clock,
        };
        Ok((registry, report))
    }

    /// Finds an endpoint by name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// Whether `ep` may take a request now; on probation this claims the single slot.
    pub fn admit(&self, ep: &Endpoint) -> Admission {
        let live = &ep.live;
        if live.admin_disabled() {
            return Admission::No;
        }
        match live.phase() {
            Phase::Healthy => Admission::Yes,
            Phase::CoolingDown => {
                let now = self.clock.now_ms();
                if now >= live.cooldown_until_ms() {
                    self.queue.transition(ep, Event::CooldownExpired, now);
                    return self.admit(ep);
                }
                Admission::No
            }
            Phase::Probation => {
                if live
                    .probation_busy
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    Admission::Probation
                } else {
                    Admission::No
                }
            }
            Phase::Ejected | Phase::AuthDisabled => Admission::No,
        }
    }

    /// When `ep` is expected back in rotation (clock ms); `None` if it is in rotation now or
    /// switched off by an operator.
    pub fn expected_back_ms(&self, ep: &Endpoint) -> Option<u64> {
        if ep.live.admin_disabled() {
            return None;
        }
        match ep.live.phase() {
            Phase::Healthy => None,
            Phase::Probation => Some(self.clock.now_ms()),
            Phase::CoolingDown => Some(ep.live.cooldown_until_ms()),
            Phase::Ejected | Phase::AuthDisabled => self.queue.next_probe_at(ep.idx),
        }
    }

    /// The endpoint to try when nothing is admitted: the one expected back soonest (ties go to
    /// the preferred one). Switched-off endpoints are never chosen.
    pub fn least_bad(&self, eligible: impl Fn(&Endpoint) -> bool) -> Option<Arc<Endpoint>> {
        self.endpoints
            .iter()
            .filter(|e| !e.live.admin_disabled() && eligible(e))
            .min_by_key(|e| (self.expected_back_ms(e).unwrap_or(0), e.priority, e.idx))
            .cloned()
    }

    /// Seconds until the earliest of the `eligible` endpoints (those that could serve the
    /// request) is expected back, at least 1. When none is switched on, nothing comes back by
    /// itself: [`RETRY_WHEN_ALL_OFF_SECS`], the time an operator may take to switch one on,
    /// rather than a retry every second.
    pub fn retry_after_secs(&self, eligible: impl Fn(&Endpoint) -> bool) -> u64 {
        let now = self.clock.now_ms();
        self.endpoints
            .iter()
            .filter(|e| !e.live.admin_disabled() && eligible(e))
            .map(|e| self.expected_back_ms(e).unwrap_or(now))
            .min()
            .map_or(RETRY_WHEN_ALL_OFF_SECS, |soonest| {
                soonest.saturating_sub(now).div_ceil(1000).max(1)
            })
    }
}
