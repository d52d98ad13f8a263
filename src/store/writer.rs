//! The background writer and the books it keeps: what has been committed, the counter cells it
//! follows, open episodes, and the lifetime and episode views read from them.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::config::StorageConfig;
use crate::health::classify::Kind;
use crate::health::endpoint::{Counters, Endpoint, LastError, Live};
use crate::health::machine::{Phase, Reason};
use crate::health::queue::EpisodeEvent;
use crate::health::totals::GatewayStats;
use crate::proxy::gateway::Gateway;
use crate::proxy::usage::UsageTally;
use crate::store::db::*;
use crate::store::values::*;

/// Episode events kept for a retry while the database refuses writes.
const MAX_PENDING_EVENTS: usize = 10_000;

/// A live counter cell the writer follows, and what it last wrote of it.
pub(crate) struct Tracked {
    pub(crate) name: String,
    pub(crate) live: Arc<Live>,
    pub(crate) written: Counters,
}

/// What the writer knows has been committed, and what it follows.
#[derive(Default)]
pub(crate) struct Books {
    /// Committed cumulative counters per endpoint name (in the database).
    pub(crate) endpoints: HashMap<String, Counters>,
    /// Counter cells followed, by address (the `Arc` held here keeps the address unique).
    pub(crate) tracked: HashMap<usize, Tracked>,
    /// Committed client-request totals.
    pub(crate) gateway: GatewayTotals,
    /// The gateway totals followed and what was last written of them.
    pub(crate) gateway_tracked: Option<(Arc<GatewayStats>, GatewayTotals)>,
    /// Episodes open in the database, by the address of their endpoint's live cell.
    pub(crate) open: HashMap<usize, OpenEpisode>,
    /// Episode events a failed flush could not write, to write first next time.
    pub(crate) pending: Vec<EpisodeEvent>,
    /// Episodes the previous run left open that this one did not take up (row, probes, when that
    /// run last flushed): every flush ends them as `restart` until one commits.
    pub(crate) left_ended: Vec<(i64, u32, SystemTime)>,
    /// The latest episodes, newest first.
    pub(crate) recent: VecDeque<EpisodeRow>,
    pub(crate) last_flush: Option<SystemTime>,
    pub(crate) error: Option<String>,
    /// The last failure committed per endpoint name (the failure itself: a new one is a new
    /// `Arc`, so a flush writes only what changed).
    pub(crate) last_errors: HashMap<String, Arc<LastError>>,
}

impl Books {
    /// Follows `ep`'s counter cell from now on, if it is not yet followed: the whole of what it
    /// counted is still to be written.
    fn follow(&mut self, ep: &Arc<crate::health::endpoint::Endpoint>) {
        let key = Arc::as_ptr(&ep.live) as usize;
        self.tracked.entry(key).or_insert_with(|| Tracked {
            name: ep.name.clone(),
            live: Arc::clone(&ep.live),
            written: Counters::default(),
        });
    }
}

/// The gateway's persistence: the database (until the writer takes it), the usage tally, and the
/// books the views read `lifetime` and episodes from. Shared by every gateway of one process.
pub struct Persist {
    configured: bool,
    path: Option<PathBuf>,
    flush_interval: Duration,
    tally: Option<Arc<UsageTally>>,
    store: Mutex<Option<Store>>,
    books: Mutex<Books>,
    /// Endpoints out of rotation when the previous run stopped, until [`attach`] resumes them.
    saved_health: Mutex<Vec<SavedHealth>>,
    /// Each endpoint's last failure as the previous run saved it, until [`attach`] takes them up.
    saved_last_errors: Mutex<Vec<SavedLastError>>,
    /// Episodes the previous run left open and when it last flushed, until [`attach`] goes on
    /// with those it resumed and ends the others.
    left_open: Mutex<(Vec<LeftOpen>, Option<i64>)>,
    /// Asks the writer for a flush before its next tick (see [`Persist::settle_episodes`]).
    flush_now: tokio::sync::Notify,
    /// Flushes (started, finished), numbered in the writer's order: a reader that needs what
    /// happened before a moment waits for a flush that started after it to finish.
    flushes: watch::Sender<(u64, u64)>,
}

impl Persist {
    /// No persistence (a gateway built without a server, or `[storage] enabled = false`).
    pub fn off() -> Self {
        Self {
            configured: false,
            path: None,
            flush_interval: StorageConfig::default().flush_interval,
            tally: None,
            store: Mutex::new(None),
            books: Mutex::new(Books::default()),
            saved_health: Mutex::new(Vec::new()),
            saved_last_errors: Mutex::new(Vec::new()),
            left_open: Mutex::new((Vec::new(), None)),
            flush_now: tokio::sync::Notify::new(),
            flushes: watch::Sender::new((0, 0)),
        }
    }

    /// Opens the database `config` names (which [`attach`] has checked is enabled) and reads
    /// back what it holds. Never fails: a database that cannot be opened is logged and reported
    /// in the views, and the gateway serves without persistence. Blocking (file I/O); call it
    /// off the async workers.
    fn open(config: &StorageConfig) -> Self {
        let mut p = Self::off();
        p.configured = true;
        p.flush_interval = config.flush_interval;
        p.path = config.resolved_path();
        let Some(path) = p.path.clone() else {
            let msg = "this platform has no data directory; set [storage] path".to_string();
            tracing::warn!("storage: {msg}; serving without persistence");
            p.books.lock().error = Some(msg);
            return p;
        };
        let opened = Store::open(&path).and_then(|mut s| {
            let loaded = s.load()?;
            Ok((s, loaded))
        });
        match opened {
            Ok((store, loaded)) => {
                tracing::info!(path = %path.display(), "storage: database open");
                let mut books = p.books.lock();
                books.endpoints = loaded.endpoints;
                books.gateway = loaded.gateway;
                books.recent = loaded.episodes.into();
                drop(books);
                *p.saved_health.lock() = loaded.health;
                *p.saved_last_errors.lock() = loaded.last_errors;
                *p.left_open.lock() = (loaded.left_open, loaded.last_flush_ms);
                *p.store.lock() = Some(store);
                p.tally = Some(Arc::default());
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(path = %path.display(), error = %msg, "storage: cannot open the database; serving without persistence");
                p.books.lock().error = Some(msg);
            }
        }
        p
    }

    /// Whether a database is open and written.
    pub fn is_active(&self) -> bool {
        self.tally.is_some()
    }

    /// Where requests add their token usage (`None` without persistence).
    pub fn tally(&self) -> Option<Arc<UsageTally>> {
        self.tally.clone()
    }

    /// Starts following the counter cells of `gw`, which a reload is about to replace: what
    /// they counted since the last flush is written by the next one, even when they were made
    /// and replaced between two flushes (the flush itself finds only the cells in service).
    pub fn follow(&self, gw: &Gateway) {
        if !self.is_active() {
            return;
        }
        let mut books = self.books.lock();
        for ep in &gw.registry.endpoints {
            books.follow(ep);
        }
    }

    /// Cumulative counters of the endpoint named `name` whose live cell is `live`: what the
    /// database holds plus what happened since the last flush, for every cell of that name.
    pub fn lifetime(&self, name: &str, live: &Arc<Live>) -> Counters {
        let books = self.books.lock();
        let mut c = books.endpoints.get(name).copied().unwrap_or_default();
        let mut followed = false;
        for t in books.tracked.values().filter(|t| t.name == name) {
            followed |= Arc::ptr_eq(&t.live, live);
            c = plus(&c, &minus(&t.live.snapshot(), &t.written));
        }
        if !followed {
            c = plus(&c, &live.snapshot());
        }
        c
    }

    /// Cumulative client-request totals: stored plus not yet flushed.
    pub fn gateway_lifetime(&self, stats: &Arc<GatewayStats>) -> GatewayTotals {
        let books = self.books.lock();
        let now = GatewayTotals::from(stats.snapshot());
        let unflushed = match &books.gateway_tracked {
            Some((s, written)) if Arc::ptr_eq(s, stats) => now.zip(written, u64::saturating_sub),
            _ => now,
        };
        books.gateway.zip(&unflushed, u64::saturating_add)
    }

    /// Where persistence stands (the `storage` object of `/_ccgate/stats`).
    pub fn status(&self) -> StorageStatus {
        let books = self.books.lock();
        StorageStatus {
            enabled: self.is_active(),
            configured: self.configured,
            path: self.path.clone(),
            flush_interval: self.flush_interval,
            last_flush: books.last_flush,
            error: books.error.clone(),
        }
    }

    /// The latest episodes, newest first, as last committed (an open one's `probes` is what was
    /// written; the failure queue knows the probes run since).
    pub fn recent_episodes(&self) -> Vec<EpisodeRow> {
        self.books.lock().recent.iter().cloned().collect()
    }

    /// Brings the stored episodes up to the failure queue: when episodes opened or closed since
    /// the last flush, asks the writer for a flush now and waits (at most `EPISODES_WAIT`) for one
    /// that started after this call to finish, so that a view read next shows them (without it,
    /// an outage showed up to one `flush_interval` late).
    pub async fn settle_episodes(&self, gw: &Gateway) {
        if !self.is_active() || !gw.registry.queue.episodes_pending() {
            return;
        }
        let mut flushes = self.flushes.subscribe();
        let after = flushes.borrow().0;
        self.flush_now.notify_one();
        let done = flushes.wait_for(|&(_, finished)| finished > after);
        if tokio::time::timeout(EPISODES_WAIT, done).await.is_err() {
            tracing::debug!(
                "storage: no flush within {EPISODES_WAIT:?}; episodes shown as last written"
            );
        }
    }

    /// Gathers one flush: counter deltas of every followed cell, the gateway totals, the usage
    /// tally and the episode events, turned into row operations. Moves nothing on in the books
    /// (that waits for the commit) except to start following new cells.
    fn collect(&self, gw: &Gateway) -> Batch {
        let at = SystemTime::now();
        let mut books = self.books.lock();
        let books = &mut *books;
        let current: HashMap<usize, &Arc<crate::health::endpoint::Endpoint>> = gw
            .registry
            .endpoints
            .iter()
            .map(|e| (Arc::as_ptr(&e.live) as usize, e))
            .collect();
        for ep in current.values() {
            books.follow(ep);
        }
        let mut endpoint_deltas: HashMap<String, Counters> = HashMap::new();
        let mut cells = Vec::with_capacity(books.tracked.len());
        for (key, t) in &books.tracked {
            // Nothing else holds a cell no endpoint uses: its snapshot now is final.
            let retired = !current.contains_key(key) && Arc::strong_count(&t.live) == 1;
            let snap = t.live.snapshot();
            let delta = minus(&snap, &t.written);
            if delta != Counters::default() {
                let d = endpoint_deltas.entry(t.name.clone()).or_default();
                *d = plus(d, &delta);
            }
            cells.push((*key, snap, retired));
        }
        let stats = &gw.registry.gateway;
        let snap = GatewayTotals::from(stats.snapshot());
        let written = match &books.gateway_tracked {
            Some((s, w)) if Arc::ptr_eq(s, stats) => *w,
            _ => {
                books.gateway_tracked = Some((Arc::clone(stats), GatewayTotals::default()));
                GatewayTotals::default()
            }
        };
        let delta = snap.zip(&written, u64::saturating_sub);
        let gateway = (delta != GatewayTotals::default()).then_some((delta, snap));

        let usage = self.tally.as_ref().map(|t| t.take()).unwrap_or_default();

        // Episodes: replay the events on a copy of the open set, skipping what is already so
        // (a reload may report one outage through two queues).
        let mut events = std::mem::take(&mut books.pending);
        events.extend(gw.registry.queue.take_episode_events());
        let mut open = books.open.clone();
        let mut ops: Vec<EpisodeOp> = books
            .left_ended
            .iter()
            .map(|&(id, probes, at)| EpisodeOp::Close {
                target: OpenRef::Row(id),
                at,
                probes,
                by: "restart",
            })
            .collect();
        let mut opened = 0usize;
        for ev in &events {
            let key = ev.live.as_ptr() as usize;
            match ev.opened {
                Some(reason) => {
                    if open.contains_key(&key) || !current.contains_key(&key) {
                        continue;
                    }
                    ops.push(EpisodeOp::Open {
                        endpoint: ev.name.clone(),
                        reason: reason.name(),
                        at: ev.at,
                    });
                    open.insert(
                        key,
                        OpenEpisode {
                            target: OpenRef::Local(opened),
                            _cell: ev.live.clone(),
                            probes: 0,
                        },
                    );
                    opened += 1;
                }
                None => {
                    if let Some(o) = open.remove(&key) {
                        ops.push(EpisodeOp::Close {
                            target: o.target,
                            at: ev.at,
                            probes: ev.probes.max(o.probes),
                            by: "recovered",
                        });
                    }
                }
            }
        }
        // Probes run so far, and episodes whose endpoint a reload changed or removed (they end
        // with it). When the gateway stops, the others stay open: their endpoints are saved out
        // of rotation, and the next run goes on with them (or ends them, see `attach`).
        let mut ended = Vec::new();
        for (key, o) in &mut open {
            let Some(ep) = current.get(key) else {
                ended.push((*key, "reload"));
                continue;
            };
            if let Some(probes) = gw.registry.queue.probe_attempts(ep.idx) {
                o.probes = o.probes.max(probes);
            }
        }
        for (key, by) in ended {
            if let Some(o) = open.remove(&key) {
                ops.push(EpisodeOp::Close {
                    target: o.target,
                    at,
                    probes: o.probes,
                    by,
                });
            }
        }
        let health = Some(saved_health(gw));
        let last_errors = changed_last_errors(gw, &books.last_errors);
        let keep = &gw.config.requests;
        Batch {
            requests: gw.recent.take_pending(),
            requests_keep: Some(RequestsKeep {
                max_rows: keep.max_rows,
                retention: keep.retention,
            }),
            at,
            health,
            endpoint_deltas,
            cells,
            gateway,
            usage,
            events,
            ops,
            open_after: open,
            last_errors,
        }
    }

    /// After a commit: moves the books on to what is now in the database.
    fn committed(&self, b: Batch, ids: &[i64]) {
        let mut books = self.books.lock();
        books.left_ended.clear();
        for (name, d) in &b.endpoint_deltas {
            let c = books.endpoints.entry(name.clone()).or_default();
            *c = plus(c, d);
        }
        for (key, snap, retired) in &b.cells {
            if *retired {
                books.tracked.remove(key);
            } else if let Some(t) = books.tracked.get_mut(key) {
                t.written = *snap;
            }
        }
        if let Some((delta, snap)) = &b.gateway {
            books.gateway = books.gateway.zip(delta, u64::saturating_add);
            if let Some((_, written)) = &mut books.gateway_tracked {
                *written = *snap;
            }
        }
        books.open = b
            .open_after
            .into_iter()
            .map(|(k, mut o)| {
                o.target = OpenRef::Row(o.target.resolve(ids));
                (k, o)
            })
            .collect();
        let mut next_local = 0usize;
        for op in b.ops {
            match op {
                EpisodeOp::Open {
                    endpoint,
                    reason,
                    at,
                } => {
                    let id = OpenRef::Local(next_local).resolve(ids);
                    next_local += 1;
                    books.recent.push_front(EpisodeRow {
                        id,
                        endpoint,
                        reason: reason.to_string(),
                        started_at_ms: unix_ms(at),
                        ended_at_ms: None,
                        probes: 0,
                        ended_by: None,
                    });
                }
                EpisodeOp::Close {
                    target,
                    at,
                    probes,
                    by,
                } => {
                    let id = target.resolve(ids);
                    if let Some(r) = books.recent.iter_mut().find(|r| r.id == id) {
                        r.ended_at_ms = Some(unix_ms(at));
                        r.probes = probes;
                        r.ended_by = Some(by.to_string());
                    }
                }
            }
        }
        books.recent.truncate(RECENT_EPISODES);
        for (saved, error) in b.last_errors {
            books.last_errors.insert(saved.endpoint, error);
        }
        books.last_flush = Some(b.at);
        books.error = None;
    }

    /// After a failed write: keeps what must be written next time (counter deltas need nothing:
    /// what was last written has not moved).
    fn failed(&self, b: Batch, error: String) {
        if let Some(t) = &self.tally {
            t.restore(b.usage);
        }
        let mut books = self.books.lock();
        let mut events = b.events;
        let excess = events.len().saturating_sub(MAX_PENDING_EVENTS);
        events.drain(..excess);
        books.pending = events;
        if books.error.as_deref() != Some(error.as_str()) {
            tracing::warn!(error = %error, "storage: flush failed; will retry");
        }
        books.error = Some(error);
    }

    /// Writes one flush: gather, write on the blocking pool, then book the result.
    async fn flush(&self, gw: &Gateway) -> Flushed {
        let Some(store) = self.store.lock().take() else {
            return Flushed::Gone;
        };
        let mut number = 0;
        self.flushes.send_modify(|(started, _)| {
            *started += 1;
            number = *started;
        });
        let flushed = self.write_flush(gw, store).await;
        self.flushes.send_modify(|(_, finished)| *finished = number);
        flushed
    }

    /// One flush's write, with the database taken out for it (put back unless it is gone).
    async fn write_flush(&self, gw: &Gateway, mut store: Store) -> Flushed {
        let batch = self.collect(gw);
        let joined = tokio::task::spawn_blocking(move || {
            let result = store.write(&batch);
            (store, batch, result)
        })
        .await;
        match joined {
            Ok((store, mut batch, result)) => {
                *self.store.lock() = Some(store);
                match result {
                    Ok(ids) => {
                        self.committed(batch, &ids);
                        Flushed::Written
                    }
                    Err(e) => {
                        gw.recent.restore(std::mem::take(&mut batch.requests));
                        let error = format!("cannot write the database: {e}");
                        self.failed(batch, error.clone());
                        Flushed::Failed(error)
                    }
                }
            }
            Err(e) => {
                let msg = format!("the database writer stopped: {e}");
                tracing::error!("storage: {msg}");
                self.books.lock().error = Some(msg);
                Flushed::Gone
            }
        }
    }
}

/// What one flush did.
enum Flushed {
    /// Committed.
    Written,
    /// Not written (kept for the next flush): why.
    Failed(String),
    /// The database is gone: no flush will work again.
    Gone,
}

/// How many times the last flush before stopping is tried, whatever the failure: each waits
/// out the database's busy timeout (5 s) when another process holds its write lock.
const LAST_FLUSH_TRIES: usize = 3;

/// How long a view of the episodes waits for the flush it asked for (see
/// [`Persist::settle_episodes`]); past it, the view shows what was last written.
const EPISODES_WAIT: Duration = Duration::from_secs(2);

/// The background writer: flushes every `flush_interval` until `stop` turns true (or its sender
/// goes away), then flushes one last time (episodes still open stay open: see `attach`) and
/// closes the database. `current` gives the gateway in service (it changes on reloads). Without a
/// database open it returns at once.
pub async fn run_writer<F>(persist: Arc<Persist>, current: F, mut stop: watch::Receiver<bool>)
where
    F: Fn() -> Arc<Gateway> + Send + 'static,
{
    if !persist.is_active() {
        return;
    }
    let mut tick = tokio::time::interval(persist.flush_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            () = persist.flush_now.notified() => false,
            changed = stop.changed() => changed.is_err() || *stop.borrow(),
        };
        let gw = current();
        if !last {
            if let Flushed::Gone = persist.flush(&gw).await {
                return;
            }
            continue;
        }
        // The last one is all there is: tried again when it fails (another process holding the
        // write lock is the case it is for; each try waits out the busy timeout), and said
        // plainly when it cannot be written.
        let mut outcome = persist.flush(&gw).await;
        for _ in 1..LAST_FLUSH_TRIES {
            if !matches!(outcome, Flushed::Failed(_)) {
                break;
            }
            outcome = persist.flush(&gw).await;
        }
        match outcome {
            Flushed::Written => {}
            Flushed::Failed(error) => tracing::error!(
                error = %error,
                "storage: the last write before stopping failed {LAST_FLUSH_TRIES} times; what happened since the last flush is not saved"
            ),
            Flushed::Gone => return,
        }
        break;
    }
    // Close the connection on the blocking pool: closing checkpoints the write-ahead log.
    let store = persist.store.lock().take();
    if let Some(store) = store {
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    }
}

/// Opens the database for a gateway about to be served (off the async workers), and starts its
/// failure queue's episode log and usage tally when it is open. The returned persistence is the
/// process's: every later gateway (reloads) shares it.
pub async fn attach(gateway: &mut Gateway) -> Arc<Persist> {
    let config = gateway.config.storage.clone();
    let persist = if config.enabled {
        tokio::task::spawn_blocking(move || Persist::open(&config))
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "storage: cannot open the database; serving without persistence");
                Persist::off()
            })
    } else {
        Persist::off()
    };
    if persist.is_active() {
        gateway.registry.queue.record_episodes();
        let saved = std::mem::take(&mut *persist.saved_health.lock());
        let resumed = resume_health(gateway, &saved);
        carry_over_episodes(&persist, &resumed);
        let saved = std::mem::take(&mut *persist.saved_last_errors.lock());
        resume_last_errors(gateway, &persist, saved);
    }
    gateway.usage = persist.tally();
    if persist.is_active() {
        // The writer takes the buffer every flush; it holds at most one table's worth.
        let cap = gateway.config.requests.max_rows.min(100_000) as usize;
        gateway.recent.start_storing(cap);
    }
    Arc::new(persist)
}

/// Every endpoint out of rotation now, as saved for the next start.
fn saved_health(gw: &Gateway) -> Vec<SavedHealth> {
    let reg = &gw.registry;
    let clock = reg.clock;
    let mut out = Vec::new();
    for ep in reg.endpoints.iter() {
        let phase = match ep.live.phase() {
            Phase::Healthy => continue,
            // A passed probe is not saved: after a restart the probe must pass again.
            Phase::Ejected | Phase::Probation => "ejected",
            Phase::AuthDisabled => "auth_disabled",
            Phase::CoolingDown => "cooling_down",
        };
        let Some(entry) = reg.queue.entry(ep.idx) else {
            continue;
        };
        let cooldown = ep.live.cooldown_until_ms();
        out.push(SavedHealth {
            endpoint: ep.name.clone(),
            fingerprint: ep.fingerprint(),
            phase: phase.to_string(),
            reason: entry.reason.name().to_string(),
            since_ms: unix_ms(entry.since),
            next_probe_at_ms: unix_ms(clock.wall(entry.next_probe_at_ms)),
            cooldown_until_ms: if cooldown == 0 {
                0
            } else {
                unix_ms(clock.wall(cooldown))
            },
            probes: entry.probe_attempts,
        });
    }
    out
}

/// The endpoints' last failures that differ from what was last committed of them (`written`),
/// as saved for the next start. Texts are stored as the views show them: scrubbed of every
/// credential when the failure was recorded.
fn changed_last_errors(
    gw: &Gateway,
    written: &HashMap<String, Arc<LastError>>,
) -> Vec<(SavedLastError, Arc<LastError>)> {
    let mut out = Vec::new();
    for ep in gw.registry.endpoints.iter() {
        let Some(error) = ep.live.last_error() else {
            continue;
        };
        if written
            .get(&ep.name)
            .is_some_and(|w| Arc::ptr_eq(w, &error))
        {
            continue;
        }
        out.push((
            SavedLastError {
                endpoint: ep.name.clone(),
                fingerprint: ep.fingerprint(),
                kind: error.kind.name().to_string(),
                message: error.message.clone(),
                at_ms: unix_ms(error.at),
            },
            error,
        ));
    }
    out
}

/// Shows again each endpoint's last failure the previous run saved, unless the endpoint is gone
/// or its name, base URL or credential changed since (it starts fresh, as its health does).
fn resume_last_errors(gateway: &Gateway, persist: &Persist, saved: Vec<SavedLastError>) {
    let mut books = persist.books.lock();
    for s in saved {
        let Some(ep) = gateway.registry.by_name(&s.endpoint) else {
            continue;
        };
        let Some(kind) = Kind::from_name(&s.kind) else {
            continue;
        };
        if ep.fingerprint() != s.fingerprint {
            continue;
        }
        let error = LastError {
            kind,
            message: s.message,
            // Clamped: a hand-edited file must not make the view panic.
            at: wall(s.at_ms),
        };
        if let Some(error) = ep.live.resume_last_error(error) {
            books.last_errors.insert(s.endpoint, error);
        }
    }
}

/// Puts the endpoints that were out of rotation when the previous run stopped back where they
/// were: an ejected or auth-disabled endpoint stays out (and is probed when its probe is due, at
/// once if that time passed while the gateway was down); a cooldown that is still running goes on
/// until its deadline, one that ended while the gateway was down is over. An endpoint whose name,
/// base URL or credential changed starts fresh.
///
/// Returns the endpoints it resumed.
fn resume_health(gateway: &Gateway, saved: &[SavedHealth]) -> Vec<Arc<Endpoint>> {
    let reg = &gateway.registry;
    let now_ms = reg.clock.now_ms();
    let now_wall = unix_ms(SystemTime::now());
    // Wall time (Unix ms) to registry-clock ms; a deadline in the past is now.
    let deadline = |wall: i64| now_ms.saturating_add(u64::try_from(wall - now_wall).unwrap_or(0));
    let began = |wall: i64| UNIX_EPOCH + Duration::from_millis(u64::try_from(wall).unwrap_or(0));
    let mut resumed = Vec::new();
    for h in saved {
        let Some(ep) = reg.by_name(&h.endpoint) else {
            continue;
        };
        if ep.fingerprint() != h.fingerprint {
            tracing::info!(endpoint = %h.endpoint, "health: its configuration changed since the last run; it starts fresh");
            continue;
        }
        let reason = match h.reason.as_str() {
            "consecutive_failures" => Reason::Failures,
            "rate_limited" => Reason::RateLimited,
            "auth" => Reason::Auth,
            _ => continue,
        };
        let phase = match h.phase.as_str() {
            "ejected" => Phase::Ejected,
            "auth_disabled" => Phase::AuthDisabled,
            "cooling_down" if h.cooldown_until_ms > now_wall => Phase::CoolingDown,
            _ => continue,
        };
        if reg.queue.resume(
            ep,
            phase,
            reason,
            began(h.since_ms),
            deadline(h.next_probe_at_ms),
            deadline(h.cooldown_until_ms),
            h.probes,
        ) {
            tracing::info!(endpoint = %h.endpoint, phase = %h.phase, reason = %h.reason, "health: resumed from the last run");
            resumed.push(Arc::clone(ep));
        }
    }
    resumed
}

/// Goes on with the episodes the previous run left open whose endpoints `resumed` took up again
/// (the newest one of each: one outage, one episode across the restart). The others end at that
/// run's last flush: at once in the view, in the database with the first flush.
fn carry_over_episodes(persist: &Persist, resumed: &[Arc<Endpoint>]) {
    let (left, last_flush) = std::mem::take(&mut *persist.left_open.lock());
    // Every open row was written by a flush, so there is a last flush whenever one is open.
    let at = last_flush.unwrap_or_else(|| unix_ms(SystemTime::now()));
    let mut books = persist.books.lock();
    for row in left {
        let ep = resumed.iter().find(|ep| ep.name == row.endpoint);
        match ep.map(|ep| (Arc::as_ptr(&ep.live) as usize, ep)) {
            Some((key, ep)) if !books.open.contains_key(&key) => {
                books.open.insert(
                    key,
                    OpenEpisode {
                        target: OpenRef::Row(row.id),
                        _cell: Arc::downgrade(&ep.live),
                        probes: row.probes,
                    },
                );
            }
            _ => {
                if let Some(r) = books.recent.iter_mut().find(|r| r.id == row.id) {
                    r.ended_at_ms = Some(at);
                    r.ended_by = Some("restart".into());
                }
                let when = UNIX_EPOCH + Duration::from_millis(u64::try_from(at).unwrap_or(0));
                books.left_ended.push((row.id, row.probes, when));
            }
        }
    }
}
