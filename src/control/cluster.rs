//! Cluster mode's wiring (issue #13): maps ccgate's endpoints, phases, sessions and counters onto
//! the Redis link of [`crate::cluster`], and applies what other instances publish through the same
//! entry points local outcomes use.
//!
//! Four background tasks, spawned by `server` (the only module that spawns long-lived tasks):
//!
//! * the link's [`Supervisor`] (connection, reconnects, down/up events);
//! * [`run_events`]: applies other instances' health news through
//!   [`FailureQueue::transition_from_peer`] (the one transition entry point, so the one-winner
//!   rule holds for remote news too), adopts their session bindings, and on every `Resync` seeds
//!   this instance's phases into an empty shared view and re-reads it;
//! * [`run_publisher`]: drains the queue's phase-change log (filled by transition winners) and the
//!   affinity map's change log: an opened episode is first claimed cluster-wide (`Won`: counted
//!   here and published; `Held`: joined without a count), every other change is published;
//!   bindings are written through (first binder wins, moves are compare-and-set);
//! * [`run_totals`]: every `cluster.flush_interval`, adds this instance's counter deltas to the
//!   cluster totals (exactly once, see [`TotalsFlusher`]) and caches the cluster view for metrics.
//!
//! **Redis is never on the request path**: requests read only local state; everything here runs
//! in those tasks, and while Redis is down they fail fast and the gateway serves alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};

use crate::cluster::{
    Claim, ClusterConfig, ClusterEvent, ClusterLink, ClusterView, EndpointId, HealthNews,
    LinkOptions, PhaseChange, RedisUrl, SessionNews, SharedPhase, Supervisor, TotalsFlusher,
};
use crate::config::ClusterSettings;
use crate::health::endpoint::Endpoint;
use crate::health::machine::{Event, Phase};
use crate::health::queue::PhaseChange as LocalChange;
use crate::health::queue::PhaseChangeEvent;
use crate::proxy::gateway::Gateway;

/// The gateway in service now (it changes on a config reload).
pub type Current = Arc<dyn Fn() -> Arc<Gateway> + Send + Sync>;

/// An instance is shown as live while heard from within this long.
pub(in crate::control) const DEAD_AFTER: Duration = Duration::from_secs(5);

/// How often bindings used since the last pass have their shared TTL slid.
const SESSION_REFRESH: Duration = Duration::from_secs(5);

/// This instance's membership of a cluster: the link and what the tasks share.
pub struct ClusterNode {
    pub(in crate::control) link: ClusterLink,
    pub(in crate::control) url: RedisUrl,
    flush_interval: Duration,
    /// Subscribed before the supervisor runs, taken by [`run_events`].
    events: Mutex<Option<broadcast::Receiver<ClusterEvent>>>,
    supervisor: Mutex<Option<Supervisor>>,
    /// Open episode tokens known here, by endpoint (wire form).
    episodes: Mutex<HashMap<String, String>>,
    /// Last news applied, by (origin, endpoint, the endpoint's counter cell): `(seq, at_ms)`. Per
    /// cell: an endpoint a reload rebuilt starts afresh and has applied nothing yet, so the
    /// resync that follows the reload gives it the cluster's phase again.
    last_seen: Mutex<HashMap<SeenKey, (u64, u64)>>,
    /// Endpoints whose config differs from another instance's (warned once each).
    mismatched: Mutex<HashSet<String>>,
    /// The latest cluster view read by the totals task (for metrics; no Redis on that path).
    pub(in crate::control) last_view: Mutex<Option<ClusterView>>,
    /// When this process started (unix ms): own news older than this is from an earlier life.
    started_ms: u64,
    /// Endpoint counter cells a reload replaced, for the totals task to count to their end.
    replaced: Mutex<Vec<(String, Arc<crate::health::endpoint::Live>)>>,
}

/// Whose news about which endpoint, applied to which counter cell (its address).
type SeenKey = (String, String, usize);

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The cluster identity of an endpoint: its name and base URL.
pub fn endpoint_id(ep: &Endpoint) -> EndpointId {
    EndpointId::new(&ep.name, &ep.base_url.to_string())
}

impl ClusterNode {
    /// The node for `settings`; nothing is contacted until the supervisor runs.
    pub fn new(settings: &ClusterSettings) -> Result<Arc<Self>, String> {
        let url = RedisUrl::new(settings.redis_url.expose()).map_err(|e| e.to_string())?;
        let instance = settings
            .instance
            .clone()
            .unwrap_or_else(ClusterConfig::default_instance);
        let config = ClusterConfig::new(url.clone(), settings.key_prefix.clone(), instance)
            .map_err(|e| e.to_string())?;
        let (link, supervisor) =
            ClusterLink::new(config, LinkOptions::default()).map_err(|e| e.to_string())?;
        let events = link.subscribe();
        Ok(Arc::new(Self {
            link,
            url,
            flush_interval: settings.flush_interval,
            events: Mutex::new(Some(events)),
            supervisor: Mutex::new(Some(supervisor)),
            episodes: Mutex::default(),
            last_seen: Mutex::default(),
            mismatched: Mutex::default(),
            last_view: Mutex::default(),
            started_ms: unix_ms_now(),
            replaced: Mutex::default(),
        }))
    }

    /// Hands the totals task the endpoint counter cells of `gw`, which a reload is about to
    /// replace: what they counted since its last flush is added too, and what they count until
    /// their last attempt ends.
    pub fn follow_replaced(&self, gw: &Gateway) {
        self.replaced.lock().extend(
            gw.registry
                .endpoints
                .iter()
                .map(|e| (e.name.clone(), Arc::clone(&e.live))),
        );
    }

    /// The link (for views and tests).
    pub fn link(&self) -> &ClusterLink {
        &self.link
    }

    /// The supervisor, once (the wiring spawns it).
    pub fn take_supervisor(&self) -> Option<Supervisor> {
        self.supervisor.lock().take()
    }

    /// Stops the link (the supervisor returns).
    pub fn shutdown(&self) {
        self.link.shutdown();
    }

    /// Prepares `gw` for cluster mode: its queue logs phase changes and counts episodes on their
    /// claim, its affinity map logs binding changes. Idempotent (called again after reloads).
    pub fn attach(&self, gw: &Gateway) {
        gw.registry.queue.record_phase_changes();
        if let Some(a) = &gw.affinity {
            a.record_changes();
        }
    }

    /// Takes up a gateway a reload swapped in: prepares it like [`ClusterNode::attach`] and
    /// resyncs it with the shared view, so an endpoint the reload added is out of rotation at
    /// once when the cluster has it out (and seeds the view with one the cluster lacks).
    pub async fn adopt_reloaded(&self, gw: &Gateway) {
        // What was applied to cells this gateway no longer has is forgotten.
        let cells: HashSet<usize> = gw
            .registry
            .endpoints
            .iter()
            .map(|e| Arc::as_ptr(&e.live) as usize)
            .collect();
        self.last_seen
            .lock()
            .retain(|(_, _, cell), _| cells.contains(cell));
        self.attach(gw);
        self.resync(gw).await;
    }

    fn episode_ttl(gw: &Gateway) -> Duration {
        let h = &gw.config.health;
        (h.probe_max_interval * 2 + h.probe_timeout).max(Duration::from_secs(60))
    }

    fn lease_ttl(gw: &Gateway) -> Duration {
        let h = &gw.config.health;
        h.probe_max_interval + h.probe_timeout + Duration::from_secs(1)
    }

    /// Converts a registry-clock deadline to unix ms, and back.
    fn deadline_to_unix(gw: &Gateway, clock_ms: u64) -> u64 {
        let now = gw.registry.clock.now_ms();
        unix_ms_now().saturating_add(clock_ms.saturating_sub(now))
    }

    fn deadline_from_unix(gw: &Gateway, unix: u64) -> u64 {
        let now = gw.registry.clock.now_ms();
        now.saturating_add(unix.saturating_sub(unix_ms_now()))
    }

    /// The shared form of `ep`'s current phase (for seeding the view).
    fn current_change(gw: &Gateway, ep: &Endpoint) -> PhaseChange {
        if ep.live.admin_disabled() {
            return PhaseChange::new(SharedPhase::AdminDisabled);
        }
        Self::change_for(gw, ep, ep.live.phase())
    }

    fn change_for(gw: &Gateway, ep: &Endpoint, phase: Phase) -> PhaseChange {
        match phase {
            Phase::Healthy => PhaseChange::new(SharedPhase::Healthy),
            Phase::Ejected => PhaseChange::new(SharedPhase::Ejected),
            Phase::AuthDisabled => PhaseChange::new(SharedPhase::AuthDisabled),
            Phase::Probation => PhaseChange::new(SharedPhase::Probation),
            Phase::CoolingDown => {
                PhaseChange::cooling_down(Self::deadline_to_unix(gw, ep.live.cooldown_until_ms()))
            }
        }
    }

    // ---- outgoing -------------------------------------------------------------------------

    /// Publishes one local phase change (claiming the episode first when it opened one).
    async fn publish_change(&self, gw: &Gateway, ev: PhaseChangeEvent) {
        let Some(live) = ev.live.upgrade() else {
            return;
        };
        let Some(ep) = gw
            .registry
            .by_name(&ev.name)
            .filter(|e| Arc::ptr_eq(&e.live, &live))
        else {
            return;
        };
        let id = endpoint_id(ep);
        let wire = id.wire();
        let queue = &gw.registry.queue;
        let mut change = match ev.change {
            LocalChange::Entered {
                phase: Phase::Healthy,
                ..
            } => PhaseChange::new(SharedPhase::Recovered),
            LocalChange::Entered { phase, .. } => Self::change_for(gw, ep, phase),
            LocalChange::CooldownExtended => Self::change_for(gw, ep, Phase::CoolingDown),
            LocalChange::Admin(true) => PhaseChange::new(SharedPhase::AdminDisabled),
            LocalChange::Admin(false) => PhaseChange::new(SharedPhase::AdminEnabled),
        };
        if let LocalChange::Entered { phase, opened } = ev.change {
            if opened {
                match self.link.claim_episode(&id, Self::episode_ttl(gw)).await {
                    Ok(Claim::Won { token }) => {
                        queue.count_episode();
                        self.episodes.lock().insert(wire.clone(), token.clone());
                        change = change.in_episode(token);
                    }
                    Ok(Claim::Held { by, .. }) => {
                        // Another instance opened this outage's episode: join it, uncounted. A
                        // cooldown deadline is still shared (the longer one wins everywhere).
                        self.episodes.lock().insert(wire.clone(), by.clone());
                        if phase != Phase::CoolingDown {
                            return;
                        }
                        change = change.in_episode(by);
                    }
                    Err(e) => {
                        // Acting alone: the episode is this instance's to count.
                        queue.count_episode();
                        tracing::debug!(endpoint = %ep.name, error = %e, "cluster: episode not claimed");
                        return;
                    }
                }
            } else if phase == Phase::Healthy {
                let token = self.episodes.lock().remove(&wire);
                let token = match token {
                    Some(t) => Some(t),
                    None => self.link.open_episode(&id).await.ok().flatten(),
                };
                if let Some(t) = token {
                    let _ = self.link.close_episode(&id, &t).await;
                }
                let _ = self.link.release_prober_lease(&id).await;
            }
        }
        match self.link.publish_health(&id, change).await {
            Ok(news) => {
                tracing::debug!(endpoint = %ep.name, phase = ?news.phase, seq = news.seq, "cluster: phase change published")
            }
            Err(e) => {
                tracing::debug!(endpoint = %ep.name, error = %e, "cluster: phase change not published")
            }
        }
    }

    /// Writes local binding changes through to the shared map; adopts the binding in force when
    /// another instance bound or moved the session first.
    async fn write_sessions(&self, gw: &Gateway) {
        let Some(affinity) = &gw.affinity else {
            return;
        };
        let ttl = affinity.ttl();
        for ch in affinity.take_changes() {
            let Some(ep) = gw.registry.endpoints.get(ch.endpoint) else {
                continue;
            };
            let id = endpoint_id(ep);
            // A move is a compare-and-set from the endpoint the session left: the one its
            // request was ranked with and that did not serve it (it failed, was out, or is near
            // its quota), or one that left rotation. A request that was ranked before another
            // instance's binding arrived, and served where it was bound then, is only a (late)
            // first bind.
            let moved_from = ch
                .moved_from
                .and_then(|m| gw.registry.endpoints.get(m))
                .or_else(|| {
                    ch.previous
                        .and_then(|p| gw.registry.endpoints.get(p))
                        .filter(|p| !p.live.in_rotation())
                });
            let in_force = match moved_from {
                None => self.link.bind_session(&ch.session, &id, ttl).await,
                Some(prev) => {
                    let from = endpoint_id(prev);
                    self.link
                        .move_session(&ch.session, Some(&from), &id, ttl)
                        .await
                }
            };
            tracing::debug!(session = %ch.session, endpoint = %ep.name, result = ?in_force, "cluster: binding written through");
            if let Ok(bound) = in_force
                && bound != id
                && let Some(idx) = self.local_index(gw, &bound)
            {
                affinity.adopt(&ch.session, Some((idx, leaves_of(gw, idx))));
            }
        }
    }

    async fn refresh_sessions(&self, gw: &Gateway, since_ms: u64) {
        let Some(affinity) = &gw.affinity else {
            return;
        };
        let used = affinity.used_since(since_ms);
        let ids: Vec<(String, EndpointId)> = used
            .into_iter()
            .filter_map(|(k, idx)| Some((k, endpoint_id(gw.registry.endpoints.get(idx)?))))
            .collect();
        let refs: Vec<(&str, &EndpointId)> = ids.iter().map(|(k, id)| (k.as_str(), id)).collect();
        let _ = self.link.refresh_sessions(&refs, affinity.ttl()).await;
    }

    // ---- incoming -------------------------------------------------------------------------

    /// The local index of the endpoint `id` names, when this instance's config agrees on its URL.
    fn local_index(&self, gw: &Gateway, id: &EndpointId) -> Option<usize> {
        let ep = gw.registry.by_name(id.name())?;
        if endpoint_id(ep) == *id {
            Some(ep.idx)
        } else {
            self.warn_mismatch(id.name());
            None
        }
    }

    fn warn_mismatch(&self, name: &str) {
        if self.mismatched.lock().insert(name.to_owned()) {
            tracing::warn!(endpoint = %name, "cluster: another instance configures this endpoint with a different base URL; ignoring its news about it");
        }
    }

    /// Applies another instance's health news through the transition entry point.
    fn apply_health(&self, gw: &Gateway, news: &HealthNews) {
        tracing::debug!(endpoint = %news.endpoint, phase = ?news.phase, origin = %news.origin, seq = news.seq, "cluster: health news");
        let Some(ep) = gw.registry.by_name(&news.endpoint) else {
            return;
        };
        if endpoint_id(ep).fingerprint() != news.url_fingerprint {
            self.warn_mismatch(&news.endpoint);
            return;
        }
        {
            let mut seen = self.last_seen.lock();
            let key = (
                news.origin.clone(),
                news.endpoint.clone(),
                Arc::as_ptr(&ep.live) as usize,
            );
            if let Some(&(seq, at)) = seen.get(&key) {
                // Older news from the same origin (a later life of an instance with the same name
                // restarts its numbering, but publishes at a later time).
                if news.seq <= seq && news.at_ms <= at {
                    return;
                }
            }
            seen.insert(key, (news.seq, news.at_ms));
        }
        if let Some(token) = &news.episode {
            self.episodes
                .lock()
                .insert(endpoint_id(ep).wire(), token.clone());
        }
        let queue = &gw.registry.queue;
        let live = &ep.live;
        let now = gw.registry.clock.now_ms();
        match news.phase {
            SharedPhase::Healthy | SharedPhase::Recovered => {
                // A cooldown this instance knows to run longer is not cut short.
                if live.phase() == Phase::CoolingDown && now < live.cooldown_until_ms() {
                    return;
                }
                queue.transition_from_peer(ep, Event::Success, now);
            }
            SharedPhase::Ejected => {
                queue.transition_from_peer(
                    ep,
                    Event::Failure {
                        consecutive: u32::MAX,
                    },
                    now,
                );
            }
            SharedPhase::CoolingDown => {
                let Some(until) = news.cooldown_until_ms else {
                    return;
                };
                let until = Self::deadline_from_unix(gw, until);
                if until <= now {
                    return;
                }
                live.cooldown_until_ms.fetch_max(until, Ordering::AcqRel);
                queue.transition_from_peer(ep, Event::RateLimited, now);
            }
            SharedPhase::AuthDisabled => {
                queue.transition_from_peer(ep, Event::AuthFailed, now);
            }
            SharedPhase::Verified | SharedPhase::Probation => {
                queue.transition_from_peer(ep, Event::ProbePassed, now);
            }
            SharedPhase::AdminDisabled => live.set_admin_disabled(true),
            SharedPhase::AdminEnabled => {
                live.set_admin_disabled(false);
                queue.probe_now(ep.idx);
            }
        }
    }

    fn apply_session(&self, gw: &Gateway, news: &SessionNews) {
        tracing::debug!(session = %news.session, endpoint = ?news.endpoint, origin = %news.origin, "cluster: session news");
        let Some(affinity) = &gw.affinity else {
            return;
        };
        match news.endpoint_id() {
            Some(id) => {
                if let Some(idx) = self.local_index(gw, &id) {
                    affinity.adopt(&news.session, Some((idx, leaves_of(gw, idx))));
                }
            }
            None if news.endpoint.is_none() => affinity.adopt(&news.session, None),
            None => {}
        }
    }

    /// Republishes this instance's view and re-reads the shared one: an endpoint the shared view
    /// lacks is seeded (an empty Redis is repopulated); one this instance took out of rotation
    /// while the link was down, but the view still shows in rotation, is published (what was
    /// learnt alone is not lost); then every entry of the view is applied.
    async fn resync(&self, gw: &Gateway) {
        let view = match self.link.health_view().await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "cluster: reading the shared view failed");
                return;
            }
        };
        let known: HashMap<String, SharedPhase> = view
            .iter()
            .map(|n| (n.endpoint_id().wire(), n.phase))
            .collect();
        for ep in &gw.registry.endpoints {
            let id = endpoint_id(ep);
            let change = Self::current_change(gw, ep);
            let out = change.phase.out_of_rotation();
            let result = match known.get(&id.wire()) {
                None => self.link.seed_health(&id, change).await.map(|_| ()),
                Some(shared) if out && !shared.out_of_rotation() => {
                    self.link.publish_health(&id, change).await.map(|_| ())
                }
                Some(_) => Ok(()),
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "cluster: republishing this instance's view failed");
                return;
            }
        }
        self.reread(gw).await;
    }

    async fn reread(&self, gw: &Gateway) {
        match self.link.health_view().await {
            Ok(view) => {
                let own = self.link.instance();
                for news in view {
                    if news.origin == own && news.at_ms >= self.started_ms {
                        continue;
                    }
                    self.apply_health(gw, &news);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cluster: reading the shared view failed"),
        }
    }

    // ---- the prober lease -----------------------------------------------------------------

    /// Whether this instance may probe `ep` now: it holds (or just took) the endpoint's prober
    /// lease, or Redis is unreachable and it acts alone. Called from the prober's probe task.
    pub async fn may_probe(&self, gw: &Gateway, ep: &Endpoint) -> bool {
        let id = endpoint_id(ep);
        match self
            .link
            .acquire_prober_lease(&id, Self::lease_ttl(gw))
            .await
        {
            Ok(Claim::Won { .. }) => {
                let _ = self.link.renew_prober_lease(&id, Self::lease_ttl(gw)).await;
                let token = self.episodes.lock().get(&id.wire()).cloned();
                if let Some(t) = token {
                    let _ = self
                        .link
                        .extend_episode(&id, &t, Self::episode_ttl(gw))
                        .await;
                }
                true
            }
            Ok(Claim::Held { .. }) => false,
            Err(_) => true,
        }
    }

    // ---- views ----------------------------------------------------------------------------

    /// Sends the flusher's batch, then reads the cluster view (cached for metrics). A Redis that
    /// lost this instance's row (restarted empty, flushed) is given back what it lost: the row
    /// must equal everything acknowledged, so the difference is added again, once.
    async fn flush_once(&self, flusher: &mut TotalsFlusher, acked: &mut BTreeMap<String, i64>) {
        if let Some(batch) = flusher.next_batch().cloned() {
            match self.link.send_totals(&batch).await {
                Ok(_) => {
                    for (k, d) in batch.deltas {
                        *acked.entry(k).or_insert(0) += d;
                    }
                    flusher.acknowledge();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cluster: totals not flushed");
                    return;
                }
            }
        }
        let Ok(view) = self.link.cluster_view(DEAD_AFTER).await else {
            return;
        };
        // Only while this instance is listed (a missing heartbeat is not a lost row).
        let row = view
            .instances
            .iter()
            .find(|i| i.instance == self.link.instance())
            .map(|i| &i.totals);
        if let (true, Some(row)) = (flusher.is_idle(), row) {
            let mut lost = false;
            for (k, want) in acked.iter_mut() {
                let have = row.get(k).copied().unwrap_or(0);
                if have < *want {
                    flusher.add(k, *want - have);
                    *want = have;
                    lost = true;
                }
            }
            if lost {
                tracing::info!("cluster: Redis lost this instance's totals; adding them again");
            }
        }
        *self.last_view.lock() = Some(view);
    }
}

/// This instance's counters by name: the gateway totals, the failure-queue statistics and each
/// endpoint's attempts.
fn counters(gw: &Gateway) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    let mut put = |k: String, v: u64| {
        m.insert(k, i64::try_from(v).unwrap_or(i64::MAX));
    };
    let s = gw.registry.gateway.snapshot();
    put("total_requests".into(), s.total);
    put("successful_requests".into(), s.successful);
    put("failed_requests".into(), s.failed);
    put("upstream_errors".into(), s.upstream_errors);
    put("caller_errors".into(), s.caller_errors);
    put("cancelled".into(), s.cancelled);
    put("retries".into(), s.retries);
    put("fallbacks".into(), s.fallbacks);
    let q = gw.registry.queue.stats();
    put("total_failed".into(), q.total_failed);
    put("total_verified".into(), q.total_verified);
    put("total_recovered".into(), q.total_recovered);
    put("total_still_failed".into(), q.total_still_failed);
    m
}

/// The endpoint counter cells the totals task follows, by address: each counts from zero when
/// it is made, and only grows, so what it adds is its growth since the last look, under its
/// endpoint's name. A cell a reload replaced is followed until nothing else holds it (its last
/// attempt has ended), so no attempt is lost between two flushes, and none is counted twice.
#[derive(Default)]
struct EndpointCells {
    cells: HashMap<usize, FollowedCell>,
}

struct FollowedCell {
    name: String,
    live: Arc<crate::health::endpoint::Live>,
    /// total, successful, failed, as last added.
    seen: [u64; 3],
}

impl EndpointCells {
    /// Adds every followed cell's growth to `flusher`, starting to follow `gw`'s and the
    /// replaced ones, and stops following cells no longer in use.
    fn add_growth(&mut self, gw: &Gateway, node: &ClusterNode, flusher: &mut TotalsFlusher) {
        let mut follow = |name: &str, live: &Arc<crate::health::endpoint::Live>| {
            self.cells
                .entry(Arc::as_ptr(live) as usize)
                .or_insert_with(|| FollowedCell {
                    name: name.to_string(),
                    live: Arc::clone(live),
                    seen: [0; 3],
                });
        };
        for (name, live) in std::mem::take(&mut *node.replaced.lock()) {
            follow(&name, &live);
        }
        for ep in &gw.registry.endpoints {
            follow(&ep.name, &ep.live);
        }
        let current: HashSet<usize> = gw
            .registry
            .endpoints
            .iter()
            .map(|e| Arc::as_ptr(&e.live) as usize)
            .collect();
        self.cells.retain(|key, cell| {
            // Read before the check: a cell nothing else holds is final.
            let retired = !current.contains(key) && Arc::strong_count(&cell.live) == 1;
            let c = cell.live.snapshot();
            let now = [c.total, c.successful(), c.failed()];
            for (field, (n, s)) in ["total_requests", "successful_requests", "failed_requests"]
                .iter()
                .zip(now.iter().zip(cell.seen))
            {
                let delta = i64::try_from(n.saturating_sub(s)).unwrap_or(i64::MAX);
                if delta > 0 {
                    flusher.add(&format!("endpoint:{}:{field}", cell.name), delta);
                }
            }
            cell.seen = now;
            !retired
        });
    }
}

// ---- tasks ----------------------------------------------------------------------------------

/// Applies other instances' news and resyncs on (re)connection. Ends when `stop` turns true.
pub async fn run_events(node: Arc<ClusterNode>, current: Current, mut stop: watch::Receiver<bool>) {
    let Some(mut events) = node.events.lock().take() else {
        return;
    };
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = stop.changed() => return,
        };
        let gw = current();
        node.attach(&gw);
        match event {
            Ok(ClusterEvent::Resync(reason)) => {
                tracing::debug!(?reason, "cluster: resync");
                node.resync(&gw).await;
            }
            Ok(ClusterEvent::Down) => {}
            Ok(ClusterEvent::Health(news)) => node.apply_health(&gw, &news),
            Ok(ClusterEvent::Session(news)) => node.apply_session(&gw, &news),
            Err(broadcast::error::RecvError::Lagged(_)) => node.reread(&gw).await,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Publishes local phase changes and writes session bindings through. Ends when `stop` turns
/// true (after one last drain).
pub async fn run_publisher(
    node: Arc<ClusterNode>,
    current: Current,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_refresh = current().registry.clock.now_ms();
    loop {
        let gw = current();
        node.attach(&gw);
        for ev in gw.registry.queue.take_phase_changes() {
            if !ev.from_peer {
                node.publish_change(&gw, ev).await;
            }
        }
        node.write_sessions(&gw).await;
        let now = gw.registry.clock.now_ms();
        if now.saturating_sub(last_refresh) >= SESSION_REFRESH.as_millis() as u64 {
            node.refresh_sessions(&gw, last_refresh).await;
            last_refresh = now;
        }
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            () = gw.registry.queue.phase_logged.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Adds this instance's counter deltas to the cluster totals every flush interval, and caches
/// the cluster view for metrics. Ends when `stop` turns true (after one last flush).
pub async fn run_totals(node: Arc<ClusterNode>, current: Current, mut stop: watch::Receiver<bool>) {
    let mut flusher = TotalsFlusher::new();
    let mut cells = EndpointCells::default();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    // Everything Redis acknowledged from this process: what this instance's row must hold.
    let mut acked: BTreeMap<String, i64> = BTreeMap::new();
    let mut tick = tokio::time::interval(node.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let gw = current();
        cells.add_growth(&gw, &node, &mut flusher);
        let now = counters(&gw);
        for (k, v) in &now {
            let before = last.get(k).copied().unwrap_or(0);
            // A counter that went down was replaced (an endpoint rebuilt by a reload): its whole
            // new value is new.
            let delta = if *v >= before { v - before } else { *v };
            flusher.add(k, delta);
        }
        last = now;
        if node.link.is_up() {
            node.flush_once(&mut flusher, &mut acked).await;
        }
        if stopping {
            return;
        }
    }
}

/// The leave count of the endpoint at `idx` now: a binding another instance made is taken as made
/// now.
fn leaves_of(gw: &Gateway, idx: usize) -> u64 {
    gw.registry
        .endpoints
        .get(idx)
        .map_or(0, |e| e.live.leaves())
}
