//! The failure queue: every endpoint out of rotation, exactly once, with why and when it is due for
//! its next probe; and the place where health phase transitions are applied.
//!
//! **Invariant:** an endpoint's phase only changes inside [`FailureQueue::transition`], under the
//! queue's lock, after re-reading the phase. Of any number of attempts racing on the same
//! transition exactly one performs it; the others find the phase already moved and do nothing.
//! Attempts whose event cannot change the phase (the overwhelming majority) never take the lock.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::clock::{Clock, ms};
use crate::health::endpoint::{Endpoint, Live};
use crate::health::machine::{self, Effect, Event, Phase, Reason};
use crate::sync::Mutex;

/// One endpoint out of rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Registry index.
    pub idx: usize,
    /// Endpoint name.
    pub name: String,
    /// Why it left rotation (latest reason).
    pub reason: Reason,
    /// When the episode began (an episode resumed from the previous run keeps its start).
    pub since: SystemTime,
    /// Probes run in this episode.
    pub probe_attempts: u32,
    /// When the next probe (or, cooling down, the automatic return) is due (clock ms). For a
    /// rate-limited entry this is the endpoint's cooldown deadline, read when the entry is copied
    /// out of the queue (the deadline has one home: [`Live::cooldown_until_ms`]).
    pub next_probe_at_ms: u64,
    /// A probe passed; one real request at a time is being admitted.
    pub probation: bool,
    /// What the last probe found.
    pub last_probe: Option<String>,
}

/// Failure-queue statistics (names kept from the tool ccgate replaces).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Failure episodes (entries ever opened).
    pub total_failed: u64,
    /// Probes run.
    pub total_verified: u64,
    /// Probes that found the endpoint working.
    pub total_recovered: u64,
    /// Probes that found it still failing.
    pub total_still_failed: u64,
    /// Episodes that ended with the endpoint back in rotation.
    pub total_closed: u64,
}

/// A failure episode opening or closing, logged for the store (see
/// [`FailureQueue::record_episodes`]); the queue itself never reads it.
#[derive(Clone, Debug)]
pub struct EpisodeEvent {
    /// `Some(reason)` when the episode opened, `None` when it closed.
    pub opened: Option<Reason>,
    /// Endpoint name.
    pub name: String,
    /// The endpoint's live cell: identifies the episode's endpoint across config reloads.
    pub live: Weak<Live>,
    /// When (wall clock).
    pub at: SystemTime,
    /// Probes run in the episode (at its close).
    pub probes: u32,
}

/// A phase change to share with other instances (cluster mode): logged by the transition's winner,
/// or by an admin switch, for the cluster publisher to drain (see
/// [`FailureQueue::record_phase_changes`]). Changes applied from another instance's news are
/// logged too, marked [`PhaseChangeEvent::from_peer`], so that they are never published back.
#[derive(Clone, Debug)]
pub struct PhaseChangeEvent {
    /// Endpoint name.
    pub name: String,
    /// The endpoint's live cell (its phase and cooldown deadline are read from here).
    pub live: Weak<Live>,
    /// What changed.
    pub change: PhaseChange,
    /// Applied from another instance's news.
    pub from_peer: bool,
}

/// What a [`PhaseChangeEvent`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseChange {
    /// Entered this phase; `opened` when the change opened a new failure episode.
    Entered {
        /// The new phase.
        phase: Phase,
        /// A new episode began (the cluster claims it before counting it).
        opened: bool,
    },
    /// Still cooling down, with a later deadline (a 429 while already cooling down).
    CooldownExtended,
    /// An operator switched the endpoint off (`true`) or on (`false`).
    Admin(bool),
}

/// A queue entry and the live cell of its endpoint (where a rate-limited entry's deadline is).
#[derive(Clone)]
struct Slot {
    entry: Entry,
    live: Arc<Live>,
}

impl Slot {
    /// The entry as callers see it: a rate-limited one is due when its cooldown ends.
    fn entry(&self) -> Entry {
        let mut e = self.entry.clone();
        e.next_probe_at_ms = self.next_probe_at();
        e
    }

    fn next_probe_at(&self) -> u64 {
        match self.entry.reason {
            Reason::RateLimited => self.live.cooldown_until_ms().max(1),
            Reason::Failures | Reason::Auth => self.entry.next_probe_at_ms,
        }
    }
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<usize, Slot>,
    stats: QueueStats,
    /// Episode opens and closes not yet taken by the store; `None` while nobody records them.
    episodes: Option<Vec<EpisodeEvent>>,
    /// Phase changes not yet taken by the cluster publisher; `None` outside cluster mode.
    phases: Option<Vec<PhaseChangeEvent>>,
    /// Cluster mode: an episode opened here is counted in `total_failed` only once this instance
    /// wins its cluster-wide claim ([`FailureQueue::count_episode`]).
    count_on_claim: bool,
}

/// Most phase changes kept for a publisher that is not draining them (Redis down for long): the
/// oldest go first; a reconnect republishes every endpoint's current phase anyway.
const MAX_PHASE_LOG: usize = 4096;

impl Inner {
    fn log_phase(&mut self, ep: &Endpoint, change: PhaseChange, from_peer: bool) -> bool {
        let Some(log) = &mut self.phases else {
            return false;
        };
        if log.len() >= MAX_PHASE_LOG {
            log.remove(0);
        }
        log.push(PhaseChangeEvent {
            name: ep.name.clone(),
            live: Arc::downgrade(&ep.live),
            change,
            from_peer,
        });
        true
    }

    fn log_episode(&mut self, opened: Option<Reason>, ep: &Endpoint, at: SystemTime, probes: u32) {
        if let Some(log) = &mut self.episodes {
            log.push(EpisodeEvent {
                opened,
                name: ep.name.clone(),
                live: Arc::downgrade(&ep.live),
                at,
                probes,
            });
        }
    }
}

/// The failure queue.
pub struct FailureQueue {
    inner: Mutex<Inner>,
    clock: Clock,
    threshold: u32,
    probe_base: Duration,
    probe_cap: Duration,
    /// Woken whenever entries change, so the prober re-plans.
    pub changed: Notify,
    /// Woken when a phase change is logged for the cluster publisher.
    pub phase_logged: Notify,
    /// The queue a reload put in this one's place: a phase change an attempt begun before the
    /// reload makes through this queue wakes that one's prober, which reconciles at once.
    successor: Mutex<Option<std::sync::Weak<FailureQueue>>>,
}

impl FailureQueue {
    /// An empty queue.
    pub fn new(clock: Clock, threshold: u32, probe_base: Duration, probe_cap: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            clock,
            threshold,
            probe_base,
            probe_cap,
            changed: Notify::new(),
            phase_logged: Notify::new(),
            successor: Mutex::new(None),
        }
    }

    /// Notes that `next` took this queue's place (a reload).
    pub fn superseded_by(&self, next: &Arc<FailureQueue>) {
        *self.successor.lock() = Some(Arc::downgrade(next));
    }

    /// Wakes the prober of the queue in service, when this one was superseded.
    fn wake_successor(&self) {
        let mut next = self
            .successor
            .lock()
            .as_ref()
            .and_then(std::sync::Weak::upgrade);
        while let Some(q) = next {
            next = q
                .successor
                .lock()
                .as_ref()
                .and_then(std::sync::Weak::upgrade);
            if next.is_none() {
                q.changed.notify_one();
            }
        }
    }

    /// Applies `event` to `ep`'s phase, performing the transition's effect if this caller wins it.
    /// Returns whether this call changed the phase.
    pub fn transition(&self, ep: &Endpoint, event: Event, now_ms: u64) -> bool {
        self.transition_from(ep, event, now_ms, false, None)
    }

    /// [`Event::Success`] of a real attempt that began when `ep` had left rotation `departures`
    /// times: it brings the endpoint back only if it has not left again since (checked under the
    /// lock that counts departures). Returns whether the phase changed.
    pub fn succeeded(&self, ep: &Endpoint, departures: u64, now_ms: u64) -> bool {
        self.transition_from(ep, Event::Success, now_ms, false, Some(departures))
    }

    /// [`FailureQueue::transition`] for a change another instance published (cluster mode): the
    /// same path and the same one-winner rule; the change is logged as the peer's, so it is not
    /// published back, and an episode it opens is that instance's to count.
    pub fn transition_from_peer(&self, ep: &Endpoint, event: Event, now_ms: u64) -> bool {
        self.transition_from(ep, event, now_ms, true, None)
    }

    fn transition_from(
        &self,
        ep: &Endpoint,
        event: Event,
        now_ms: u64,
        from_peer: bool,
        departures: Option<u64>,
    ) -> bool {
        // Lock-free fast path: if the event cannot change the current phase, it linearizes here.
        if machine::next(ep.live.phase(), event, self.threshold).is_none() {
            return false;
        }
        let mut inner = self.inner.lock();
        if departures.is_some_and(|d| d != ep.live.departures.load(Ordering::Acquire)) {
            return false;
        }
        let Some((to, effect)) = machine::next(ep.live.phase(), event, self.threshold) else {
            return false;
        };
        let from = ep.live.phase();
        if !from.is_excluded() && to.is_excluded() {
            ep.live.departures.fetch_add(1, Ordering::AcqRel);
        }
        ep.live.phase.store(to as u8, Ordering::Release);
        if event == Event::CooldownExpired || (from_peer && event == Event::Success) {
            // The 429 that started the cooldown has been paid for by it: the endpoint comes back
            // as healthy, not as `degraded` by a failure it already sat out. Likewise when
            // another instance saw it recover (cluster mode): the run of failures this instance
            // counted belongs to the outage that ended, and the next failure starts a new run
            // (the local success that ends an outage resets the count in `Attempt::end`).
            ep.live.consecutive.store(0, Ordering::Release);
        }
        match effect {
            Effect::None => {}
            Effect::Open(reason) => self.open(&mut inner, ep, reason, now_ms, true),
            Effect::Reason(reason) => {
                if let Some(Slot { entry: e, .. }) = inner.entries.get_mut(&ep.idx) {
                    e.reason = reason;
                    e.probation = false;
                    e.next_probe_at_ms = now_ms + ms(self.backoff(e.probe_attempts));
                }
            }
            Effect::Probation => {
                if let Some(Slot { entry: e, .. }) = inner.entries.get_mut(&ep.idx) {
                    e.probation = true;
                }
            }
            Effect::Close => self.close(&mut inner, ep, now_ms),
        }
        let opened = matches!(effect, Effect::Open(_));
        let logged = inner.log_phase(ep, PhaseChange::Entered { phase: to, opened }, from_peer);
        drop(inner);
        self.changed.notify_one();
        self.wake_successor();
        if logged {
            self.phase_logged.notify_one();
        }
        true
    }

    /// Logs a change that is not a transition (a longer cooldown deadline, an admin switch) for
    /// the cluster publisher; nothing happens outside cluster mode.
    pub fn note_change(&self, ep: &Endpoint, change: PhaseChange) {
        if self.inner.lock().log_phase(ep, change, false) {
            self.phase_logged.notify_one();
        }
    }

    /// Starts keeping the phase-change log (cluster mode) and counting episodes on their claim.
    pub fn record_phase_changes(&self) {
        let mut inner = self.inner.lock();
        inner.phases.get_or_insert_with(Vec::new);
        inner.count_on_claim = true;
    }

    /// Takes the phase changes logged since the last call, oldest first.
    pub fn take_phase_changes(&self) -> Vec<PhaseChangeEvent> {
        self.inner
            .lock()
            .phases
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Counts one failure episode: this instance won the cluster-wide claim for an episode it
    /// opened (or could not reach the cluster and acts alone).
    pub fn count_episode(&self) {
        self.inner.lock().stats.total_failed += 1;
    }

    /// Notes that a probe of `idx` has begun and may run until `until_ms`: the next one is not
    /// due before then, even if this one is cut short (a reload stops the prober that ran it), so
    /// reloads do not start probe after probe. The probe's result sets the real next time.
    pub fn probing(&self, idx: usize, until_ms: u64) {
        if let Some(s) = self.inner.lock().entries.get_mut(&idx) {
            s.entry.next_probe_at_ms = s.entry.next_probe_at_ms.max(until_ms);
        }
    }

    /// Moves an entry's next probe a backoff later without probing (another instance holds the
    /// endpoint's prober lease).
    pub fn postpone_probe(&self, idx: usize) {
        let now = self.clock.now_ms();
        if let Some(s) = self.inner.lock().entries.get_mut(&idx) {
            s.entry.next_probe_at_ms = now + ms(self.backoff(s.entry.probe_attempts));
        }
        self.changed.notify_one();
    }

    /// Opens a failure episode for `ep` (the caller holds the lock and has checked the phase);
    /// `new`: it begins now, and counts in `total_failed` (a resumed one began in an earlier run).
    fn open(&self, inner: &mut Inner, ep: &Endpoint, reason: Reason, now_ms: u64, new: bool) {
        if new && !inner.count_on_claim {
            inner.stats.total_failed += 1;
        }
        inner.log_episode(Some(reason), ep, self.clock.wall(now_ms), 0);
        let entry = Entry {
            idx: ep.idx,
            name: ep.name.clone(),
            reason,
            since: self.clock.wall(now_ms),
            probe_attempts: 0,
            next_probe_at_ms: now_ms + ms(self.backoff(0)),
            probation: false,
            last_probe: None,
        };
        let live = Arc::clone(&ep.live);
        inner.entries.insert(ep.idx, Slot { entry, live });
    }

    /// Closes `ep`'s failure episode (the caller holds the lock and has checked the phase).
    fn close(&self, inner: &mut Inner, ep: &Endpoint, now_ms: u64) {
        let probes = inner
            .entries
            .remove(&ep.idx)
            .map_or(0, |s| s.entry.probe_attempts);
        inner.stats.total_closed += 1;
        inner.log_episode(None, ep, self.clock.wall(now_ms), probes);
    }

    /// Resumes, on start, an endpoint that was out of rotation when the previous run stopped:
    /// `phase` is `Ejected`, `AuthDisabled` or `CoolingDown` (until `cooldown_until_ms`), the
    /// episode began at `since` with `probe_attempts` probes run, and its next probe is due at
    /// `next_probe_at_ms` (registry-clock ms). Opens a queue entry as any ejection does, for the
    /// same episode: it keeps its start and does not count in `total_failed` again. Does nothing
    /// unless the endpoint is in rotation and not queued.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        &self,
        ep: &Endpoint,
        phase: Phase,
        reason: Reason,
        since: SystemTime,
        next_probe_at_ms: u64,
        cooldown_until_ms: u64,
        probe_attempts: u32,
    ) -> bool {
        if !matches!(
            phase,
            Phase::Ejected | Phase::AuthDisabled | Phase::CoolingDown
        ) {
            return false;
        }
        let mut inner = self.inner.lock();
        if ep.live.phase() != Phase::Healthy || inner.entries.contains_key(&ep.idx) {
            return false;
        }
        if phase == Phase::CoolingDown {
            ep.live
                .cooldown_until_ms
                .fetch_max(cooldown_until_ms.max(1), Ordering::AcqRel);
        }
        ep.live.departures.fetch_add(1, Ordering::AcqRel);
        ep.live.phase.store(phase as u8, Ordering::Release);
        let now = self.clock.now_ms();
        self.open(&mut inner, ep, reason, now, false);
        if let Some(Slot { entry: e, .. }) = inner.entries.get_mut(&ep.idx) {
            e.since = since.min(self.clock.wall(now));
            e.probe_attempts = probe_attempts;
            e.next_probe_at_ms = next_probe_at_ms.max(now);
        }
        drop(inner);
        self.changed.notify_waiters();
        true
    }

    /// Probe backoff after `attempts` failed probes (with jitter).
    pub fn backoff(&self, attempts: u32) -> Duration {
        machine::probe_backoff(self.probe_base, self.probe_cap, attempts, fastrand::f64())
    }

    /// Records a probe's result for `ep`: on success the endpoint moves to probation.
    pub fn probe_result(&self, ep: &Endpoint, passed: bool, detail: String) {
        let now = self.clock.now_ms();
        {
            let mut inner = self.inner.lock();
            inner.stats.total_verified += 1;
            if passed {
                inner.stats.total_recovered += 1;
            } else {
                inner.stats.total_still_failed += 1;
            }
            if let Some(Slot { entry: e, .. }) = inner.entries.get_mut(&ep.idx) {
                e.probe_attempts += 1;
                e.last_probe = Some(detail);
                if !passed {
                    e.next_probe_at_ms = now + ms(self.backoff(e.probe_attempts));
                }
            }
        }
        if passed {
            self.transition(ep, Event::ProbePassed, now);
        }
        self.changed.notify_one();
    }

    /// Pulls an entry's next probe forward to now (admin "probe" and "enable").
    pub fn probe_now(&self, idx: usize) {
        let now = self.clock.now_ms();
        if let Some(s) = self.inner.lock().entries.get_mut(&idx) {
            s.entry.next_probe_at_ms = now;
        }
        self.changed.notify_one();
    }

    /// The entries, in registry order.
    pub fn entries(&self) -> Vec<Entry> {
        self.inner
            .lock()
            .entries
            .values()
            .map(Slot::entry)
            .collect()
    }

    /// One endpoint's entry.
    pub fn entry(&self, idx: usize) -> Option<Entry> {
        self.inner.lock().entries.get(&idx).map(Slot::entry)
    }

    /// Whether the endpoint at `idx` has an entry.
    pub fn contains(&self, idx: usize) -> bool {
        self.inner.lock().entries.contains_key(&idx)
    }

    /// When the endpoint at `idx` is due for its next probe (or, cooling down, back), if it has
    /// an entry.
    pub fn next_probe_at(&self, idx: usize) -> Option<u64> {
        self.inner.lock().entries.get(&idx).map(Slot::next_probe_at)
    }

    /// Probes run so far in the episode of the endpoint at `idx`, if it has an entry.
    pub fn probe_attempts(&self, idx: usize) -> Option<u32> {
        self.inner
            .lock()
            .entries
            .get(&idx)
            .map(|s| s.entry.probe_attempts)
    }

    /// How many endpoints are out of rotation.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether every endpoint is in rotation.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().entries.is_empty()
    }

    /// The statistics.
    pub fn stats(&self) -> QueueStats {
        self.inner.lock().stats
    }

    /// Takes over `old`'s statistics and the entries of the endpoints a config reload kept:
    /// `moved(old_idx)` gives an endpoint's new index, or `None` if it was removed or changed
    /// (its episode ends with it). Called once, before the new registry serves requests.
    pub fn adopt(&self, old: &FailureQueue, moved: impl Fn(usize) -> Option<usize>) {
        let mut from = old.inner.lock();
        let mut inner = self.inner.lock();
        inner.stats = from.stats;
        // The episode log (and whether one is kept) moves on with the statistics.
        inner.episodes = from.episodes.as_mut().map(std::mem::take);
        inner.phases = from.phases.as_mut().map(std::mem::take);
        inner.count_on_claim = from.count_on_claim;
        for (old_idx, slot) in &from.entries {
            if let Some(idx) = moved(*old_idx) {
                let mut slot = slot.clone();
                slot.entry.idx = idx;
                inner.entries.insert(idx, slot);
            }
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Makes the queue agree with `ep`'s phase after a config reload: an attempt begun before the
    /// reload records through the previous gateway's queue, so it may eject a kept endpoint (which
    /// then needs an entry here, and the probes that come with it) or end its probation (whose
    /// entry here must then close). Counted as the episode events they are. The prober calls this
    /// on every round; outside reloads it finds nothing to do. Returns whether it changed anything.
    pub fn reconcile(&self, ep: &Endpoint, now_ms: u64) -> bool {
        let changed = self.reconcile_locked(&mut self.inner.lock(), ep, now_ms);
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }

    /// [`FailureQueue::reconcile`] for every endpoint, under one lock. Returns whether it changed
    /// anything.
    pub fn reconcile_all(&self, endpoints: &[Arc<Endpoint>], now_ms: u64) -> bool {
        let mut inner = self.inner.lock();
        let mut changed = false;
        for ep in endpoints {
            changed |= self.reconcile_locked(&mut inner, ep, now_ms);
        }
        drop(inner);
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }

    fn reconcile_locked(&self, inner: &mut Inner, ep: &Endpoint, now_ms: u64) -> bool {
        // Phases change only under a queue lock: read it under this one.
        let queued = inner.entries.contains_key(&ep.idx);
        let reason = match ep.live.phase() {
            Phase::Ejected => Reason::Failures,
            Phase::CoolingDown => Reason::RateLimited,
            Phase::AuthDisabled => Reason::Auth,
            Phase::Probation => return false,
            Phase::Healthy => {
                if queued {
                    self.close(inner, ep, now_ms);
                }
                return queued;
            }
        };
        if !queued {
            self.open(inner, ep, reason, now_ms, true);
            // For the cluster publisher too: the change was made through a superseded queue,
            // whose log nobody reads any more, so this is where it is claimed and published.
            let phase = ep.live.phase();
            if inner.log_phase(
                ep,
                PhaseChange::Entered {
                    phase,
                    opened: true,
                },
                false,
            ) {
                self.phase_logged.notify_one();
            }
        }
        !queued
    }

    /// Starts keeping a log of episode opens and closes for [`FailureQueue::take_episode_events`]
    /// (the store's writer drains it; without one nothing is kept).
    pub fn record_episodes(&self) {
        self.inner.lock().episodes.get_or_insert_with(Vec::new);
    }

    /// Whether episode events are logged and not yet taken (the store's view of episodes is
    /// behind the queue until they are).
    pub fn episodes_pending(&self) -> bool {
        self.inner
            .lock()
            .episodes
            .as_ref()
            .is_some_and(|log| !log.is_empty())
    }

    /// Takes the episode events logged since the last call, oldest first.
    pub fn take_episode_events(&self) -> Vec<EpisodeEvent> {
        self.inner
            .lock()
            .episodes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Entries and stats read together under one lock.
    pub fn view(&self) -> (Vec<Entry>, QueueStats) {
        let inner = self.inner.lock();
        (
            inner.entries.values().map(Slot::entry).collect(),
            inner.stats,
        )
    }
}
