//! State that lasts (SPEC §9): cumulative counters, failure episodes and the usage ledger in an
//! embedded SQLite database, written by one background task and read back on start.
//!
//! **Invariant: never on the request path.** Requests only do in-memory work that was there
//! anyway (the atomics of [`Live`] and [`GatewayStats`], the failure queue's episode log) plus one
//! short lock on the usage tally ([`UsageTally::add`]). The writer ([`run_writer`]) wakes every
//! `flush_interval`, gathers what changed, and writes it in one transaction on the blocking pool.
//!
//! **Invariant: nothing is counted twice, nothing needs a hook.** The writer follows each live
//! counter cell (`Arc<Live>`, shared by an endpoint and its successors across config reloads)
//! and remembers the snapshot it last wrote; a flush writes `snapshot − last written` and, only
//! once the transaction has committed, moves `last written` on. A failed flush leaves it where it
//! was, so the next one writes the whole difference. Cells an endpoint no longer uses are followed
//! until nothing else holds them (their last attempts recorded), then written a last time.
//!
//! **Crash safety.** WAL journal, `synchronous = NORMAL`, one transaction per flush: `kill -9`
//! loses at most what happened since the last commit and never leaves a half-written flush.
//!
//! A database that cannot be opened never stops the gateway: it logs a warning and serves without
//! persistence, and `/_ccgate/stats` says why under `storage`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::watch;

use crate::classify::Kind;
use crate::config::StorageConfig;
use crate::endpoint::{Counters, Live};
use crate::gateway_stats::{GatewaySnapshot, GatewayStats, RequestEnd};
use crate::proxy::Gateway;
use crate::queue::EpisodeEvent;
use crate::usage::{LedgerRow, UsageKey, UsageSums, UsageTally, day_string};

/// Most recent episodes kept in memory for `GET /_ccgate/episodes`.
pub const RECENT_EPISODES: usize = 100;
/// Episode events kept for a retry while the database refuses writes.
const MAX_PENDING_EVENTS: usize = 10_000;

/// Schema migrations; `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE endpoint_counters (
        endpoint TEXT NOT NULL,
        kind TEXT NOT NULL,
        count INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (endpoint, kind)
    ) WITHOUT ROWID;
    CREATE TABLE gateway_counters (
        kind TEXT PRIMARY KEY,
        count INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE episodes (
        id INTEGER PRIMARY KEY,
        endpoint TEXT NOT NULL,
        reason TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        ended_at_ms INTEGER,
        probes INTEGER NOT NULL DEFAULT 0,
        ended_by TEXT
    );
    CREATE INDEX episodes_by_start ON episodes (started_at_ms);
    CREATE TABLE usage (
        day TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (day, endpoint, model)
    ) WITHOUT ROWID;
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value INTEGER
    ) WITHOUT ROWID;",
];

/// The counter name under which attempts started (`total_requests`) are stored.
const STARTED: &str = "started";

// ---------------------------------------------------------------------------------------------
// Counters arithmetic

/// Combines two counter sets field by field with `op` (saturating add or subtract).
fn combine(a: &Counters, b: &Counters, op: fn(u64, u64) -> u64) -> Counters {
    Counters::from_parts(
        op(a.total, b.total),
        std::array::from_fn(|i| op(a.by_kind[i], b.by_kind[i])),
    )
}

fn plus(a: &Counters, b: &Counters) -> Counters {
    combine(a, b, u64::saturating_add)
}

fn minus(a: &Counters, b: &Counters) -> Counters {
    combine(a, b, u64::saturating_sub)
}

/// Client-request totals as stored (the gateway's [`GatewaySnapshot`] without `in_flight`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayTotals {
    /// Client requests received.
    pub started: u64,
    /// Complete 2xx answers.
    pub success: u64,
    /// Every candidate failed, or none was available.
    pub upstream_errors: u64,
    /// The caller's own error.
    pub caller_errors: u64,
    /// The client went away.
    pub cancelled: u64,
}

impl GatewayTotals {
    /// The stored counter names, in the order of [`GatewayTotals::values`]: requests started,
    /// then each way a request ends.
    fn names() -> [&'static str; 5] {
        let [a, b, c, d] = RequestEnd::ALL.map(RequestEnd::name);
        [STARTED, a, b, c, d]
    }

    fn values(&self) -> [u64; 5] {
        [
            self.started,
            self.success,
            self.upstream_errors,
            self.caller_errors,
            self.cancelled,
        ]
    }

    fn from_values(v: [u64; 5]) -> Self {
        Self {
            started: v[0],
            success: v[1],
            upstream_errors: v[2],
            caller_errors: v[3],
            cancelled: v[4],
        }
    }

    fn zip(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        let (a, b) = (self.values(), other.values());
        Self::from_values(std::array::from_fn(|i| f(a[i], b[i])))
    }

    /// Client requests that ended other than with a complete answer (as `/_ccgate/stats` counts
    /// `failed_requests`).
    pub fn failed(&self) -> u64 {
        self.upstream_errors
            .saturating_add(self.caller_errors)
            .saturating_add(self.cancelled)
    }
}

impl From<GatewaySnapshot> for GatewayTotals {
    fn from(s: GatewaySnapshot) -> Self {
        Self {
            started: s.total,
            success: s.successful,
            upstream_errors: s.upstream_errors,
            caller_errors: s.caller_errors,
            cancelled: s.cancelled,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The database

/// One stored failure episode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpisodeRow {
    /// Row id.
    pub id: i64,
    /// Endpoint name.
    pub endpoint: String,
    /// Why it left rotation.
    pub reason: String,
    /// When (Unix ms).
    pub started_at_ms: i64,
    /// When it ended (Unix ms); `None` while it lasts.
    pub ended_at_ms: Option<i64>,
    /// Probes run in it.
    pub probes: u32,
    /// How it ended: `recovered`, `reload` (the endpoint was changed or removed), `shutdown`, or
    /// `restart` (the gateway stopped without a last flush).
    pub ended_by: Option<String>,
}

impl EpisodeRow {
    /// When it began.
    pub fn started_at(&self) -> SystemTime {
        wall(self.started_at_ms)
    }

    /// When it ended; `None` while it lasts.
    pub fn ended_at(&self) -> Option<SystemTime> {
        self.ended_at_ms.map(wall)
    }
}

/// Where persistence stands.
#[derive(Clone, Debug)]
pub struct StorageStatus {
    /// A database is open and written.
    pub enabled: bool,
    /// `[storage]` asked for one.
    pub configured: bool,
    /// The database file.
    pub path: Option<PathBuf>,
    /// How often the writer flushes.
    pub flush_interval: Duration,
    /// The last committed flush.
    pub last_flush: Option<SystemTime>,
    /// Why the database is not (or was not last time) written.
    pub error: Option<String>,
}

/// Everything read back on start.
#[derive(Default)]
struct Loaded {
    endpoints: HashMap<String, Counters>,
    gateway: GatewayTotals,
    episodes: Vec<EpisodeRow>,
}

/// An open database connection (owned by the writer while it runs).
pub struct Store {
    conn: Connection,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A stored Unix-ms time as a wall time, clamped to years 1970..=9999 (a hand-edited database
/// must not make a view panic).
fn wall(ms: i64) -> SystemTime {
    const LAST_MS: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = u64::try_from(ms).unwrap_or(0).min(LAST_MS);
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

/// `n` as the `i64` that SQLite (and a Prometheus gauge) holds, saturating.
pub(crate) fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_sql_int(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Creates the database's directory (owner-only when ccgate creates it) and the file itself
/// owner-only; an existing file that others can read is made owner-only.
fn prepare_file(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot make {} owner-only", path.display()))?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database at `path`: WAL journal, `synchronous = NORMAL`,
    /// schema migrated to the current version in one transaction.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        prepare_file(path)?;
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            anyhow::bail!(
                "{} cannot use a write-ahead log (journal mode {mode})",
                path.display()
            );
        }
        conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
        let mut store = Self { conn };
        store
            .migrate()
            .with_context(|| format!("cannot bring the database {} up to date", path.display()))?;
        Ok(store)
    }

    /// Applies the migrations the file has not seen, all in one transaction.
    fn migrate(&mut self) -> anyhow::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")?;
        let version: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )?;
        let latest = MIGRATIONS.len();
        let from = usize::try_from(version).unwrap_or(usize::MAX);
        if from > latest {
            anyhow::bail!(
                "it has schema version {version}, written by a newer ccgate (this one knows {latest})"
            );
        }
        if from == latest {
            return Ok(());
        }
        for m in &MIGRATIONS[from..] {
            tx.execute_batch(m)?;
        }
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [saturating_i64(latest as u64)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ends episodes a previous run left open (it stopped without its last flush) at that run's
    /// last flush, then reads everything the gateway shows.
    fn load(&mut self, now: SystemTime) -> anyhow::Result<Loaded> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last_flush: Option<i64> = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'last_flush_ms'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        tx.execute(
            "UPDATE episodes SET ended_at_ms = MAX(started_at_ms, ?1), ended_by = 'restart'
             WHERE ended_at_ms IS NULL",
            [last_flush.unwrap_or_else(|| unix_ms(now))],
        )?;
        let mut loaded = Loaded::default();
        {
            let mut st = tx.prepare("SELECT endpoint, kind, count FROM endpoint_counters")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            for row in rows {
                let (endpoint, kind, count) = row?;
                let c = loaded.endpoints.entry(endpoint).or_default();
                let n = from_sql_int(count);
                if kind == STARTED {
                    c.total = n;
                } else if let Some(k) = Kind::ALL.iter().find(|k| k.name() == kind) {
                    c.by_kind[*k as usize] = n;
                }
            }
            for c in loaded.endpoints.values_mut() {
                *c = Counters::from_parts(c.total, c.by_kind);
            }
            let mut st = tx.prepare("SELECT kind, count FROM gateway_counters")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut values = [0u64; 5];
            for row in rows {
                let (kind, count) = row?;
                if let Some(i) = GatewayTotals::names().iter().position(|n| *n == kind) {
                    values[i] = from_sql_int(count);
                }
            }
            loaded.gateway = GatewayTotals::from_values(values);
            let mut st = tx.prepare(
                "SELECT id, endpoint, reason, started_at_ms, ended_at_ms, probes, ended_by
                 FROM episodes ORDER BY started_at_ms DESC, id DESC LIMIT ?1",
            )?;
            let rows = st.query_map([RECENT_EPISODES as i64], |r| {
                Ok(EpisodeRow {
                    id: r.get(0)?,
                    endpoint: r.get(1)?,
                    reason: r.get(2)?,
                    started_at_ms: r.get(3)?,
                    ended_at_ms: r.get(4)?,
                    probes: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                    ended_by: r.get(6)?,
                })
            })?;
            for row in rows {
                loaded.episodes.push(row?);
            }
        }
        tx.commit()?;
        Ok(loaded)
    }

    /// Writes one flush in one transaction. Returns the row ids of the episodes it opened, in
    /// the order of their `Open` operations.
    fn write(&mut self, b: &Batch) -> rusqlite::Result<Vec<i64>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut opened = Vec::new();
        {
            let mut counter = tx.prepare_cached(
                "INSERT INTO endpoint_counters (endpoint, kind, count) VALUES (?1, ?2, ?3)
                 ON CONFLICT (endpoint, kind) DO UPDATE SET count = count + excluded.count",
            )?;
            for (name, d) in &b.endpoint_deltas {
                if d.total > 0 {
                    counter.execute(params![name, STARTED, saturating_i64(d.total)])?;
                }
                for k in Kind::ALL {
                    let n = d.by_kind[k as usize];
                    if n > 0 {
                        counter.execute(params![name, k.name(), saturating_i64(n)])?;
                    }
                }
            }
            if let Some((delta, _)) = &b.gateway {
                let mut st = tx.prepare_cached(
                    "INSERT INTO gateway_counters (kind, count) VALUES (?1, ?2)
                     ON CONFLICT (kind) DO UPDATE SET count = count + excluded.count",
                )?;
                for (name, n) in GatewayTotals::names().into_iter().zip(delta.values()) {
                    if n > 0 {
                        st.execute(params![name, saturating_i64(n)])?;
                    }
                }
            }
            let mut usage = tx.prepare_cached(
                "INSERT INTO usage (day, endpoint, model, requests, input_tokens, output_tokens,
                                    cache_creation_input_tokens, cache_read_input_tokens)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (day, endpoint, model) DO UPDATE SET
                    requests = requests + excluded.requests,
                    input_tokens = input_tokens + excluded.input_tokens,
                    output_tokens = output_tokens + excluded.output_tokens,
                    cache_creation_input_tokens =
                        cache_creation_input_tokens + excluded.cache_creation_input_tokens,
                    cache_read_input_tokens =
                        cache_read_input_tokens + excluded.cache_read_input_tokens",
            )?;
            for (k, v) in &b.usage {
                usage.execute(params![
                    day_string(k.day),
                    k.endpoint,
                    k.model,
                    saturating_i64(v.requests),
                    saturating_i64(v.usage.input),
                    saturating_i64(v.usage.output),
                    saturating_i64(v.usage.cache_creation),
                    saturating_i64(v.usage.cache_read),
                ])?;
            }
            let mut open = tx.prepare_cached(
                "INSERT INTO episodes (endpoint, reason, started_at_ms, probes) VALUES (?1, ?2, ?3, 0)",
            )?;
            let mut close = tx.prepare_cached(
                "UPDATE episodes SET ended_at_ms = ?1, probes = ?2, ended_by = ?3 WHERE id = ?4",
            )?;
            for op in &b.ops {
                match op {
                    EpisodeOp::Open {
                        endpoint,
                        reason,
                        at,
                    } => {
                        open.execute(params![endpoint, reason, unix_ms(*at)])?;
                        opened.push(tx.last_insert_rowid());
                    }
                    EpisodeOp::Close {
                        target,
                        at,
                        probes,
                        by,
                    } => {
                        let id = target.resolve(&opened);
                        close.execute(params![unix_ms(*at), i64::from(*probes), by, id])?;
                    }
                }
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('last_flush_ms', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [unix_ms(b.at)],
            )?;
        }
        tx.commit()?;
        Ok(opened)
    }
}

/// The usage ledger from `since` (`YYYY-MM-DD`, UTC) on, read from the database file at `path`
/// opened read-only (a running gateway keeps writing undisturbed).
pub fn read_ledger(path: &Path, since: &str) -> anyhow::Result<Vec<LedgerRow>> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let has_usage: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if !has_usage {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare(
        "SELECT day, endpoint, model, requests, input_tokens, output_tokens,
                cache_creation_input_tokens, cache_read_input_tokens
         FROM usage WHERE day >= ?1 ORDER BY day, endpoint, model",
    )?;
    let rows = st.query_map([since], |r| {
        Ok(LedgerRow {
            day: r.get(0)?,
            endpoint: r.get(1)?,
            model: r.get(2)?,
            requests: from_sql_int(r.get(3)?),
            input_tokens: from_sql_int(r.get(4)?),
            output_tokens: from_sql_int(r.get(5)?),
            cache_creation_input_tokens: from_sql_int(r.get(6)?),
            cache_read_input_tokens: from_sql_int(r.get(7)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---------------------------------------------------------------------------------------------
// What the gateway shares with the writer

/// A live counter cell the writer follows, and what it last wrote of it.
struct Tracked {
    name: String,
    live: Arc<Live>,
    written: Counters,
}

/// Where a not-yet-closed episode is: a stored row, or the `i`-th open of the flush in progress.
#[derive(Clone, Copy, Debug)]
enum OpenRef {
    Row(i64),
    Local(usize),
}

impl OpenRef {
    /// The row id, given the ids of the rows the flush opened (`-1` for an open it lacks).
    fn resolve(self, opened: &[i64]) -> i64 {
        match self {
            OpenRef::Row(id) => id,
            OpenRef::Local(i) => opened.get(i).copied().unwrap_or(-1),
        }
    }
}

#[derive(Clone)]
struct OpenEpisode {
    target: OpenRef,
    /// Held so that the cell's address, the key, cannot be reused while the episode is open.
    _cell: Weak<Live>,
    probes: u32,
}

enum EpisodeOp {
    Open {
        endpoint: String,
        reason: &'static str,
        at: SystemTime,
    },
    Close {
        target: OpenRef,
        at: SystemTime,
        probes: u32,
        by: &'static str,
    },
}

/// What the writer knows has been committed, and what it follows.
#[derive(Default)]
struct Books {
    /// Committed cumulative counters per endpoint name (in the database).
    endpoints: HashMap<String, Counters>,
    /// Counter cells followed, by address (the `Arc` held here keeps the address unique).
    tracked: HashMap<usize, Tracked>,
    /// Committed client-request totals.
    gateway: GatewayTotals,
    /// The gateway totals followed and what was last written of them.
    gateway_tracked: Option<(Arc<GatewayStats>, GatewayTotals)>,
    /// Episodes open in the database, by the address of their endpoint's live cell.
    open: HashMap<usize, OpenEpisode>,
    /// Episode events a failed flush could not write, to write first next time.
    pending: Vec<EpisodeEvent>,
    /// The latest episodes, newest first.
    recent: VecDeque<EpisodeRow>,
    last_flush: Option<SystemTime>,
    error: Option<String>,
}

/// One flush, gathered under the books' lock and written on the blocking pool.
struct Batch {
    at: SystemTime,
    endpoint_deltas: HashMap<String, Counters>,
    /// Per followed cell: the snapshot written, and whether it is the cell's last.
    cells: Vec<(usize, Counters, bool)>,
    gateway: Option<(GatewayTotals, GatewayTotals)>,
    usage: HashMap<UsageKey, UsageSums>,
    events: Vec<EpisodeEvent>,
    ops: Vec<EpisodeOp>,
    open_after: HashMap<usize, OpenEpisode>,
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
            let loaded = s.load(SystemTime::now())?;
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

    /// Gathers one flush: counter deltas of every followed cell, the gateway totals, the usage
    /// tally and the episode events, turned into row operations. Moves nothing on in the books
    /// (that waits for the commit) except to start following new cells.
    fn collect(&self, gw: &Gateway, last: bool) -> Batch {
        let at = SystemTime::now();
        let mut books = self.books.lock();
        let books = &mut *books;
        let current: HashMap<usize, &Arc<crate::endpoint::Endpoint>> = gw
            .registry
            .endpoints
            .iter()
            .map(|e| (Arc::as_ptr(&e.live) as usize, e))
            .collect();
        for (key, ep) in &current {
            books.tracked.entry(*key).or_insert_with(|| Tracked {
                name: ep.name.clone(),
                live: Arc::clone(&ep.live),
                written: Counters::default(),
            });
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
        let mut ops = Vec::new();
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
        // with it), or all of them when the gateway stops.
        let mut ended = Vec::new();
        for (key, o) in &mut open {
            let Some(ep) = current.get(key) else {
                ended.push((*key, "reload"));
                continue;
            };
            if let Some(probes) = gw.registry.queue.probe_attempts(ep.idx) {
                o.probes = o.probes.max(probes);
            }
            if last {
                ended.push((*key, "shutdown"));
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
        Batch {
            at,
            endpoint_deltas,
            cells,
            gateway,
            usage,
            events,
            ops,
            open_after: open,
        }
    }

    /// After a commit: moves the books on to what is now in the database.
    fn committed(&self, b: Batch, ids: &[i64]) {
        let mut books = self.books.lock();
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

    /// Writes one flush: gather, write on the blocking pool, then book the result. Returns
    /// whether the database is still usable.
    async fn flush(&self, gw: &Gateway, last: bool) -> bool {
        let Some(mut store) = self.store.lock().take() else {
            return false;
        };
        let batch = self.collect(gw, last);
        let joined = tokio::task::spawn_blocking(move || {
            let result = store.write(&batch);
            (store, batch, result)
        })
        .await;
        match joined {
            Ok((store, batch, result)) => {
                *self.store.lock() = Some(store);
                match result {
                    Ok(ids) => self.committed(batch, &ids),
                    Err(e) => self.failed(batch, format!("cannot write the database: {e}")),
                }
                true
            }
            Err(e) => {
                let msg = format!("the database writer stopped: {e}");
                tracing::error!("storage: {msg}");
                self.books.lock().error = Some(msg);
                false
            }
        }
    }
}

/// The background writer: flushes every `flush_interval` until `stop` turns true (or its sender
/// goes away), then flushes one last time — closing open episodes as ended by shutdown — and
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
            changed = stop.changed() => changed.is_err() || *stop.borrow(),
        };
        let gw = current();
        if !persist.flush(&gw, last).await {
            return;
        }
        if last {
            break;
        }
    }
    // Close the connection on the blocking pool: closing checkpoints the write-ahead log.
    let store = persist.store.lock().take();
    if let Some(store) = store {
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    }
}

/// Opens the database for a gateway about to be served (off the async workers), and starts its
/// failure queue's episode log when it is open.
pub async fn attach(gateway: &mut Gateway) {
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
    }
    gateway.persist = Arc::new(persist);
}
