//! The SQLite database: schema migrations, opening (owner-only file, WAL), reading back on start,
//! and writing one flush in one transaction.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::clock::day_string;
use crate::health::classify::Kind;
use crate::health::endpoint::{Counters, LastError, Live};
use crate::health::queue::EpisodeEvent;
use crate::health::totals::RequestEnd;
use crate::proxy::recent::RecentRequest;
use crate::proxy::usage::UsageRows;
use crate::store::values::*;

/// Schema migrations; `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
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
    // 2: endpoints out of rotation, resumed on the next start.
    "CREATE TABLE endpoint_health (
        endpoint TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        phase TEXT NOT NULL,
        reason TEXT NOT NULL,
        since_ms INTEGER NOT NULL,
        next_probe_at_ms INTEGER NOT NULL,
        cooldown_until_ms INTEGER NOT NULL,
        probes INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;",
    // 3: the recent requests (never a body or a credential), capped in rows and age.
    "CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        model TEXT,
        endpoint TEXT,
        attempts INTEGER NOT NULL,
        status INTEGER,
        outcome TEXT NOT NULL,
        first_byte_ms REAL,
        total_ms REAL NOT NULL,
        input_tokens INTEGER,
        output_tokens INTEGER,
        cache_creation_input_tokens INTEGER,
        cache_read_input_tokens INTEGER
    );
    CREATE INDEX requests_by_time ON requests (at_ms);",
    // 4: the requests table loses its index on arrival time, which cost every stored request as
    // much again as its row; retention finds the expired rows by a scan when any may be there.
    "DROP INDEX IF EXISTS requests_by_time;",
    // 5: the ledger keeps the 1-hour cache's share of the cache writes and the server's web
    // searches, each priced apart.
    "ALTER TABLE usage ADD COLUMN cache_creation_1h_input_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN web_search_requests INTEGER NOT NULL DEFAULT 0;",
    // 6: each endpoint's last failure (`last_error`: kind, scrubbed message, when), written with
    // the counters and shown again after a restart. An older file gets the table empty.
    "CREATE TABLE endpoint_last_error (
        endpoint TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;",
];

/// How many stored requests are kept, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RequestsKeep {
    /// Rows at most.
    pub(crate) max_rows: u64,
    /// Oldest kept.
    pub(crate) retention: Duration,
}

/// What the writer knows of the `requests` table's oldest arrival: a bound that no row is older
/// than (`i64::MAX`: the table is empty), or `None` before it has looked.
pub(crate) type OldestBound = Option<i64>;

/// Appends `rows` to the `requests` table, then prunes it: rows older than the retention period
/// and all but the newest `keep.max_rows`. Rows are only ever appended (`id` grows) and pruned
/// from the oldest, so ids stay contiguous and one range delete keeps the cap exact.
///
/// Pruning costs little when nothing expires: `oldest` (kept by the caller across flushes, and
/// lowered by every row written) says whether any row can be past the retention period, and
/// only then is the table scanned for them. A batch that alone fills the table replaces it:
/// one delete of everything instead of a delete per row.
pub(crate) fn write_requests(
    conn: &Connection,
    rows: &[std::sync::Arc<RecentRequest>],
    keep: RequestsKeep,
    now: SystemTime,
    oldest: &mut OldestBound,
) -> rusqlite::Result<()> {
    let empty = Some(i64::MAX);
    if keep.max_rows == 0 {
        conn.execute("DELETE FROM requests", [])?;
        *oldest = empty;
        return Ok(());
    }
    // Only the newest `max_rows` of a big batch could survive the prune anyway.
    let skip = rows.len().saturating_sub(keep.max_rows as usize);
    let rows = &rows[skip..];
    if rows.len() as u64 >= keep.max_rows {
        conn.execute("DELETE FROM requests", [])?;
        *oldest = empty;
    }
    if !rows.is_empty() {
        let mut st = conn.prepare_cached(
            "INSERT INTO requests (at_ms, request_id, method, path, model, endpoint, attempts,
                status, outcome, first_byte_ms, total_ms, input_tokens, output_tokens,
                cache_creation_input_tokens, cache_read_input_tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        for r in rows {
            let u = r.usage.as_ref();
            st.execute(params![
                r.at_ms,
                r.request_id,
                r.method,
                r.path,
                r.model,
                r.endpoint,
                i64::from(r.attempts),
                r.status.map(i64::from),
                r.outcome,
                r.first_byte_ms,
                r.total_ms,
                u.map(|u| saturating_i64(u.input)),
                u.map(|u| saturating_i64(u.output)),
                u.map(|u| saturating_i64(u.cache_creation)),
                u.map(|u| saturating_i64(u.cache_read)),
            ])?;
            *oldest = oldest.map(|o| o.min(r.at_ms));
        }
    }
    let cutoff = unix_ms(
        now.checked_sub(keep.retention)
            .unwrap_or(std::time::UNIX_EPOCH),
    );
    let oldest_row = |conn: &Connection| -> rusqlite::Result<i64> {
        conn.query_row("SELECT MIN(at_ms) FROM requests", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .map(|m| m.unwrap_or(i64::MAX))
    };
    let mut bound = match *oldest {
        Some(b) => b,
        None => oldest_row(conn)?,
    };
    if bound < cutoff {
        conn.execute("DELETE FROM requests WHERE at_ms < ?1", [cutoff])?;
        bound = oldest_row(conn)?;
    }
    // Deleting the oldest ids below keeps `bound` a bound: what is left is no older.
    *oldest = Some(bound);
    conn.execute(
        "DELETE FROM requests WHERE id <= (SELECT MAX(id) FROM requests) - ?1",
        [saturating_i64(keep.max_rows)],
    )?;
    Ok(())
}

/// Everything read back on start.
#[derive(Default)]
pub(crate) struct Loaded {
    pub(crate) endpoints: HashMap<String, Counters>,
    pub(crate) gateway: GatewayTotals,
    pub(crate) episodes: Vec<EpisodeRow>,
    pub(crate) health: Vec<SavedHealth>,
    /// Each endpoint's last failure as the previous run last wrote it.
    pub(crate) last_errors: Vec<SavedLastError>,
    /// Episodes the previous run left open, newest first: its endpoint was still out of rotation
    /// when it stopped (or it was killed). One resumed on start goes on; the others end there.
    pub(crate) left_open: Vec<LeftOpen>,
    /// The previous run's last flush (Unix ms), where an episode it left open ends.
    pub(crate) last_flush_ms: Option<i64>,
}

/// An episode a previous run left open.
pub(crate) struct LeftOpen {
    pub(crate) id: i64,
    pub(crate) endpoint: String,
    pub(crate) probes: u32,
}

/// An open database connection (owned by the writer while it runs).
pub struct Store {
    pub(crate) conn: Connection,
    /// The `requests` table's oldest arrival, as far as the writer knows (see [`write_requests`]).
    requests_oldest: OldestBound,
    /// The exclusive lock on `<database>.lock`, held while the store is open: one gateway per
    /// database file (a second one would close the first one's attempts in flight as lost).
    _lock: std::fs::File,
}

/// `n` as the `i64` that SQLite (and a Prometheus gauge) holds, saturating.
pub fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds to one endpoint counter (`?1` endpoint, `?2` kind, `?3` amount), saturating.
const ADD_ENDPOINT_COUNT: &str = "INSERT INTO endpoint_counters (endpoint, kind, count) VALUES (?1, ?2, ?3)
     ON CONFLICT (endpoint, kind) DO UPDATE SET count = MIN(count + excluded.count, 9223372036854775807)";

/// Adds to one gateway counter (`?1` kind, `?2` amount), saturating.
const ADD_GATEWAY_COUNT: &str = "INSERT INTO gateway_counters (kind, count) VALUES (?1, ?2)
     ON CONFLICT (kind) DO UPDATE SET count = MIN(count + excluded.count, 9223372036854775807)";

/// A stored count, read as `u64`. Sums saturate at `i64::MAX` in SQL (`MIN(a + b, i64::MAX)`:
/// past it SQLite would make the sum a REAL); a REAL that a file written before that holds is
/// read saturating, a negative count as 0.
pub(crate) struct Count(pub(crate) u64);

impl rusqlite::types::FromSql for Count {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        match v {
            rusqlite::types::ValueRef::Integer(n) => Ok(Count(u64::try_from(n).unwrap_or(0))),
            // `as` saturates, and takes NaN and negatives to 0.
            rusqlite::types::ValueRef::Real(f) => Ok(Count(f as u64)),
            _ => Err(rusqlite::types::FromSqlError::InvalidType),
        }
    }
}

/// Creates the database's directory (owner-only when ccgate creates it) and the file itself
/// owner-only; an existing file that others can read is made owner-only.
/// Takes the exclusive lock on `<path>.lock` (made owner-only if new), or says which file is in
/// use. The operating system lets go of it when the process ends, however it ends.
fn lock_file(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = std::path::PathBuf::from(name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{} is in use by another running ccgate gateway (run one gateway per database file, or give this one its own [storage] path)",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
        }
    }
}

pub(crate) fn prepare_file(path: &Path) -> anyhow::Result<()> {
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

/// Closes what a previous run left in flight (it stopped without its last flush, as after `kill
/// -9`): attempts and client requests stored as started but never as ended are counted as
/// `cancelled` — they ended with the process, nobody got their answer, and they say nothing about
/// an endpoint — so that `successful + failed + cancelled == total` holds for lifetime totals too.
fn close_lost_in_flight(
    tx: &rusqlite::Transaction<'_>,
    loaded: &mut Loaded,
) -> rusqlite::Result<()> {
    let cancelled = Kind::Cancelled.name();
    for (name, c) in loaded.endpoints.iter_mut() {
        if c.in_flight == 0 {
            continue;
        }
        tx.execute(
            ADD_ENDPOINT_COUNT,
            params![name, cancelled, saturating_i64(c.in_flight)],
        )?;
        c.by_kind[Kind::Cancelled as usize] += c.in_flight;
        *c = Counters::from_parts(c.total, c.by_kind);
    }
    let g = &mut loaded.gateway;
    let ended = g.success + g.failed();
    if g.started > ended {
        let lost = g.started - ended;
        tx.execute(
            ADD_GATEWAY_COUNT,
            params![RequestEnd::Cancelled.name(), saturating_i64(lost)],
        )?;
        g.cancelled += lost;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database at `path`: WAL journal, `synchronous = NORMAL`,
    /// schema migrated to the current version in one transaction.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        prepare_file(path)?;
        let lock = lock_file(path)?;
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
        let mut store = Self {
            conn,
            _lock: lock,
            requests_oldest: None,
        };
        store
            .migrate()
            .with_context(|| format!("cannot bring the database {} up to date", path.display()))?;
        Ok(store)
    }

    /// Applies the migrations the file has not seen, all in one transaction.
    pub(crate) fn migrate(&mut self) -> anyhow::Result<()> {
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

    /// Reads everything the gateway shows, and the episodes the previous run left open (the
    /// writer goes on with them or ends them: `store::writer::attach`).
    pub(crate) fn load(&mut self) -> anyhow::Result<Loaded> {
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
        let mut loaded = Loaded {
            last_flush_ms: last_flush,
            ..Loaded::default()
        };
        {
            let mut st = tx.prepare("SELECT endpoint, kind, count FROM endpoint_counters")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Count>(2)?.0,
                ))
            })?;
            for row in rows {
                let (endpoint, kind, n) = row?;
                let c = loaded.endpoints.entry(endpoint).or_default();
                if kind == STARTED {
                    c.total = n;
                } else if let Some(k) = Kind::from_name(&kind) {
                    c.by_kind[k as usize] = n;
                }
            }
            for c in loaded.endpoints.values_mut() {
                *c = Counters::from_parts(c.total, c.by_kind);
            }
            let mut st = tx.prepare("SELECT kind, count FROM gateway_counters")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Count>(1)?.0))
            })?;
            let mut values = [0u64; 5];
            for row in rows {
                let (kind, count) = row?;
                if let Some(i) = GatewayTotals::names().iter().position(|n| *n == kind) {
                    values[i] = count;
                }
            }
            loaded.gateway = GatewayTotals::from_values(values);
            close_lost_in_flight(&tx, &mut loaded)?;
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
            let mut st = tx.prepare(
                "SELECT id, endpoint, probes FROM episodes WHERE ended_at_ms IS NULL ORDER BY id DESC",
            )?;
            let rows = st.query_map([], |r| {
                Ok(LeftOpen {
                    id: r.get(0)?,
                    endpoint: r.get(1)?,
                    probes: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                })
            })?;
            for row in rows {
                loaded.left_open.push(row?);
            }
            let mut st = tx.prepare(
                "SELECT endpoint, fingerprint, phase, reason, since_ms, next_probe_at_ms,
                        cooldown_until_ms, probes FROM endpoint_health",
            )?;
            let rows = st.query_map([], |r| {
                Ok(SavedHealth {
                    endpoint: r.get(0)?,
                    fingerprint: r.get(1)?,
                    phase: r.get(2)?,
                    reason: r.get(3)?,
                    since_ms: r.get(4)?,
                    next_probe_at_ms: r.get(5)?,
                    cooldown_until_ms: r.get(6)?,
                    probes: u32::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                })
            })?;
            for row in rows {
                loaded.health.push(row?);
            }
            let mut st = tx.prepare(
                "SELECT endpoint, fingerprint, kind, message, at_ms FROM endpoint_last_error",
            )?;
            let rows = st.query_map([], |r| {
                Ok(SavedLastError {
                    endpoint: r.get(0)?,
                    fingerprint: r.get(1)?,
                    kind: r.get(2)?,
                    message: r.get(3)?,
                    at_ms: r.get(4)?,
                })
            })?;
            for row in rows {
                loaded.last_errors.push(row?);
            }
        }
        tx.commit()?;
        Ok(loaded)
    }

    /// Writes one flush in one transaction. Returns the row ids of the episodes it opened, in
    /// the order of their `Open` operations.
    pub(crate) fn write(&mut self, b: &Batch) -> rusqlite::Result<Vec<i64>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut opened = Vec::new();
        if let Some(health) = &b.health {
            tx.execute("DELETE FROM endpoint_health", [])?;
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO endpoint_health (endpoint, fingerprint, phase, reason,
                    since_ms, next_probe_at_ms, cooldown_until_ms, probes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for h in health {
                st.execute(params![
                    h.endpoint,
                    h.fingerprint,
                    h.phase,
                    h.reason,
                    h.since_ms,
                    h.next_probe_at_ms,
                    h.cooldown_until_ms,
                    i64::from(h.probes)
                ])?;
            }
        }
        {
            let mut counter = tx.prepare_cached(ADD_ENDPOINT_COUNT)?;
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
            let mut last_error = tx.prepare_cached(
                "INSERT INTO endpoint_last_error (endpoint, fingerprint, kind, message, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (endpoint) DO UPDATE SET fingerprint = excluded.fingerprint,
                    kind = excluded.kind, message = excluded.message, at_ms = excluded.at_ms",
            )?;
            for (e, _) in &b.last_errors {
                last_error.execute(params![
                    e.endpoint,
                    e.fingerprint,
                    e.kind,
                    e.message,
                    e.at_ms
                ])?;
            }
            if let Some((delta, _)) = &b.gateway {
                let mut st = tx.prepare_cached(ADD_GATEWAY_COUNT)?;
                for (name, n) in GatewayTotals::names().into_iter().zip(delta.values()) {
                    if n > 0 {
                        st.execute(params![name, saturating_i64(n)])?;
                    }
                }
            }
            let mut usage = tx.prepare_cached(
                "INSERT INTO usage (day, endpoint, model, requests, input_tokens, output_tokens,
                                    cache_creation_input_tokens, cache_read_input_tokens,
                                    cache_creation_1h_input_tokens, web_search_requests)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (day, endpoint, model) DO UPDATE SET
                    requests = MIN(requests + excluded.requests, 9223372036854775807),
                    input_tokens = MIN(input_tokens + excluded.input_tokens, 9223372036854775807),
                    output_tokens = MIN(output_tokens + excluded.output_tokens, 9223372036854775807),
                    cache_creation_input_tokens = MIN(
                        cache_creation_input_tokens + excluded.cache_creation_input_tokens,
                        9223372036854775807),
                    cache_read_input_tokens = MIN(
                        cache_read_input_tokens + excluded.cache_read_input_tokens,
                        9223372036854775807),
                    cache_creation_1h_input_tokens = MIN(
                        cache_creation_1h_input_tokens + excluded.cache_creation_1h_input_tokens,
                        9223372036854775807),
                    web_search_requests = MIN(
                        web_search_requests + excluded.web_search_requests,
                        9223372036854775807)",
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
                    saturating_i64(v.usage.cache_creation_1h),
                    saturating_i64(v.usage.web_searches),
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
        let mut oldest = self.requests_oldest;
        if let Some(keep) = b.requests_keep {
            write_requests(&tx, &b.requests, keep, b.at, &mut oldest)?;
        }
        tx.commit()?;
        self.requests_oldest = oldest;
        Ok(opened)
    }
}

/// Where a not-yet-closed episode is: a stored row, or the `i`-th open of the flush in progress.
#[derive(Clone, Copy, Debug)]
pub(crate) enum OpenRef {
    Row(i64),
    Local(usize),
}

impl OpenRef {
    /// The row id, given the ids of the rows the flush opened (`-1` for an open it lacks).
    pub(crate) fn resolve(self, opened: &[i64]) -> i64 {
        match self {
            OpenRef::Row(id) => id,
            OpenRef::Local(i) => opened.get(i).copied().unwrap_or(-1),
        }
    }
}

#[derive(Clone)]
pub(crate) struct OpenEpisode {
    pub(crate) target: OpenRef,
    /// Held so that the cell's address, the key, cannot be reused while the episode is open.
    pub(crate) _cell: Weak<Live>,
    pub(crate) probes: u32,
}

pub(crate) enum EpisodeOp {
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

/// One flush, gathered under the books' lock and written on the blocking pool.
pub(crate) struct Batch {
    pub(crate) at: SystemTime,
    pub(crate) endpoint_deltas: HashMap<String, Counters>,
    /// Every endpoint out of rotation now (replaces what is saved); `None` leaves it.
    pub(crate) health: Option<Vec<SavedHealth>>,
    /// Per followed cell: the snapshot written, and whether it is the cell's last.
    pub(crate) cells: Vec<(usize, Counters, bool)>,
    pub(crate) gateway: Option<(GatewayTotals, GatewayTotals)>,
    pub(crate) usage: UsageRows,
    pub(crate) events: Vec<EpisodeEvent>,
    pub(crate) ops: Vec<EpisodeOp>,
    pub(crate) open_after: HashMap<usize, OpenEpisode>,
    /// Recent requests to append, oldest first.
    pub(crate) requests: Vec<std::sync::Arc<RecentRequest>>,
    /// The `requests` table's bounds (`None`: leave the table alone).
    pub(crate) requests_keep: Option<RequestsKeep>,
    /// Last failures that changed since they were last written, each with the failure it is
    /// (the writer's books note it as written after the commit).
    pub(crate) last_errors: Vec<(SavedLastError, Arc<LastError>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts read as `u64` whatever a file holds: a REAL from a sum past `i64::MAX` (files
    /// written before sums saturated) saturates, a negative count is 0.
    #[test]
    fn stored_counts_read_saturating() {
        let conn = Connection::open_in_memory().expect("open");
        let got: [u64; 5] = conn
            .query_row(
                "SELECT 12, -5, 1.0e19, 1.0e30, 9223372036854775807 + 1",
                [],
                |r| Ok([0, 1, 2, 3, 4].map(|i| r.get::<_, Count>(i).map_or(7, |c| c.0))),
            )
            .expect("query");
        assert_eq!(
            got,
            [
                12,
                0,
                10_000_000_000_000_000_000,
                u64::MAX,
                9_223_372_036_854_775_808
            ]
        );
        let capped: i64 = conn
            .query_row(
                "SELECT MIN(9223372036854775807 + 5, 9223372036854775807)",
                [],
                |r| r.get(0),
            )
            .expect("query");
        assert_eq!(capped, i64::MAX, "the saturating sum the upserts use");
    }

    /// Indexes on the `requests` table (its row id aside).
    fn requests_indexes(store: &Store) -> i64 {
        store
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests'",
                [],
                |r| r.get(0),
            )
            .expect("count")
    }

    /// A million requests through the writer's append-and-prune: the table never holds more than
    /// its cap, keeps the newest, and drops what is older than the retention period.
    #[test]
    fn a_million_stored_requests_stay_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("t.db")).expect("open");
        let keep = RequestsKeep {
            max_rows: 10_000,
            retention: Duration::from_secs(3600),
        };
        let now = SystemTime::now();
        let now_ms = unix_ms(now);
        let rec = |i: u64, at_ms: i64| {
            std::sync::Arc::new(RecentRequest {
                seq: i,
                at_ms,
                ..crate::proxy::recent::sample(i)
            })
        };
        let count = |s: &Store| -> i64 {
            s.conn
                .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
                .expect("count")
        };
        // A million requests in flushes of 7,000, 10,000 (a batch that alone fills the table
        // replaces it) and 25,000 (only its newest 10,000 are written): the cap holds after
        // every one.
        let mut i = 0u64;
        let mut oldest = None;
        for size in [7_000, 10_000, 25_000].into_iter().cycle() {
            let size = size.min(1_000_000 - i);
            if size == 0 {
                break;
            }
            let batch: Vec<_> = (0..size)
                .map(|_| {
                    i += 1;
                    rec(i, now_ms)
                })
                .collect();
            let tx = store.conn.transaction().expect("tx");
            write_requests(&tx, &batch, keep, now, &mut oldest).expect("write");
            tx.commit().expect("commit");
            assert_eq!(count(&store), i.min(10_000) as i64);
        }
        assert_eq!(i, 1_000_000);
        assert_eq!(count(&store), 10_000);
        let newest: String = store
            .conn
            .query_row(
                "SELECT request_id FROM requests ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .expect("newest");
        assert_eq!(newest, format!("req_{:016x}", 1_000_000u64));
        // One flush whose records are two hours old: the retention period prunes all of them
        // (and everything stored at `now` stays).
        let old: Vec<_> = (0..5).map(|k| rec(k, now_ms - 7_200_000)).collect();
        let tx = store.conn.transaction().expect("tx");
        write_requests(&tx, &old, keep, now, &mut oldest).expect("write");
        tx.commit().expect("commit");
        let old_left: i64 = store
            .conn
            .query_row(
                "SELECT COUNT(*) FROM requests WHERE at_ms < ?1",
                [now_ms],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(old_left, 0);
        assert!(count(&store) <= 10_000);
        // Later, all of it is past the retention period.
        let tx = store.conn.transaction().expect("tx");
        write_requests(&tx, &[], keep, now + Duration::from_secs(7200), &mut oldest)
            .expect("write");
        tx.commit().expect("commit");
        assert_eq!(count(&store), 0);
    }

    /// Writes at `path` the database an older ccgate left: the first `version` migrations, its
    /// version, and `rows` (SQL run after them).
    fn database_at_version(path: &Path, version: usize, rows: &str) {
        let conn = Connection::open(path).expect("open");
        for m in &MIGRATIONS[..version] {
            conn.execute_batch(m).expect("an older schema");
        }
        conn.execute_batch(&format!(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version (version) VALUES ({version});
             {rows}"
        ))
        .expect("an older database with its rows");
    }

    /// A database written by an older ccgate is brought up to date in place, its rows kept; one
    /// written by a newer ccgate is refused, untouched.
    #[test]
    fn an_older_database_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        database_at_version(
            &path,
            3,
            "INSERT INTO requests (at_ms, request_id, method, path, attempts, outcome, total_ms)
             VALUES (1, 'req_0000000000000001', 'POST', '/v1/messages', 1, 'success', 2.0);",
        );
        let store = Store::open(&path).expect("migrated");
        let version: i64 = store
            .conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        let kept: String = store
            .conn
            .query_row("SELECT request_id FROM requests", [], |r| r.get(0))
            .expect("the row survives");
        assert_eq!(kept, "req_0000000000000001");
        assert_eq!(requests_indexes(&store), 0);
        store
            .conn
            .execute("UPDATE schema_version SET version = version + 1", [])
            .expect("a newer version");
        drop(store);
        let err = Store::open(&path).err().expect("refused");
        assert!(format!("{err:#}").contains("newer ccgate"), "{err:#}");
    }

    /// A database from before migration 6 (counters, no saved failures) is migrated in place and
    /// loads with no last failure; a flush's last failures are read back on the next load, a
    /// later one replacing the earlier one of its endpoint.
    #[test]
    fn last_errors_are_kept_and_a_file_from_before_them_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        database_at_version(
            &path,
            5,
            "INSERT INTO endpoint_counters (endpoint, kind, count) VALUES ('a', 'started', 3);
             INSERT INTO endpoint_counters (endpoint, kind, count) VALUES ('a', 'server_error', 3);",
        );
        let mut store = Store::open(&path).expect("migrated");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.endpoints["a"].total, 3);
        assert!(loaded.last_errors.is_empty());

        let failure = |message: &str, at_ms: i64| {
            let saved = SavedLastError {
                endpoint: "a".into(),
                fingerprint: "f".into(),
                kind: Kind::ServerError.name().into(),
                message: message.into(),
                at_ms,
            };
            let error = Arc::new(LastError {
                kind: Kind::ServerError,
                message: message.into(),
                at: wall(at_ms),
            });
            (saved, error)
        };
        let batch = |last_errors| Batch {
            at: SystemTime::now(),
            endpoint_deltas: HashMap::new(),
            health: None,
            cells: Vec::new(),
            gateway: None,
            usage: UsageRows::default(),
            events: Vec::new(),
            ops: Vec::new(),
            open_after: HashMap::new(),
            requests: Vec::new(),
            requests_keep: None,
            last_errors,
        };
        store
            .write(&batch(vec![failure("HTTP 500: first", 1_000)]))
            .expect("write");
        store
            .write(&batch(vec![failure("HTTP 500: second", 2_000)]))
            .expect("write");
        drop(store);
        let mut store = Store::open(&path).expect("open again");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.last_errors, [failure("HTTP 500: second", 2_000).0]);
    }

    /// A writer that starts on a table it has not looked at yet (a restart) still prunes the
    /// rows that expired while it was down, and only those; the table has no index left to
    /// maintain.
    #[test]
    fn a_restarted_writer_prunes_what_expired_while_it_was_down() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let now = SystemTime::now();
        let now_ms = unix_ms(now);
        let rows: Vec<_> = [now_ms - 7_200_000, now_ms - 60_000, now_ms - 10_800_000]
            .into_iter()
            .enumerate()
            .map(|(k, at_ms)| {
                std::sync::Arc::new(RecentRequest {
                    at_ms,
                    ..crate::proxy::recent::sample(k as u64)
                })
            })
            .collect();
        {
            let mut store = Store::open(&path).expect("open");
            let keep = RequestsKeep {
                max_rows: 100,
                retention: Duration::from_secs(24 * 3600),
            };
            let tx = store.conn.transaction().expect("tx");
            write_requests(&tx, &rows, keep, now, &mut None).expect("write");
            tx.commit().expect("commit");
        }
        let mut store = Store::open(&path).expect("reopen");
        let keep = RequestsKeep {
            max_rows: 100,
            retention: Duration::from_secs(3600),
        };
        let mut oldest = None;
        let tx = store.conn.transaction().expect("tx");
        write_requests(&tx, &[], keep, now, &mut oldest).expect("write");
        tx.commit().expect("commit");
        let left: Vec<i64> = store
            .conn
            .prepare("SELECT at_ms FROM requests ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(left, [now_ms - 60_000]);
        assert_eq!(oldest, Some(now_ms - 60_000));
        assert_eq!(requests_indexes(&store), 0);
    }
}
