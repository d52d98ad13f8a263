//! The usage ledger read back for `ccgate usage`, from the database file opened read-only.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::store::db::*;

/// One row of the stored ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LedgerRow {
    /// UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Endpoint name.
    pub endpoint: String,
    /// Model.
    pub model: String,
    /// Answers counted.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Prompt-cache writes.
    pub cache_creation_input_tokens: u64,
    /// Prompt-cache reads.
    pub cache_read_input_tokens: u64,
    /// Of the prompt-cache writes, those to the 1-hour cache.
    pub cache_creation_1h_input_tokens: u64,
    /// Web searches the server ran.
    pub web_search_requests: u64,
}

/// Whether `sql` (a query without parameters) returns a row.
fn has_row(conn: &Connection, sql: &str) -> rusqlite::Result<bool> {
    Ok(conn.query_row(sql, [], |_| Ok(())).optional()?.is_some())
}

/// The usage ledger from `since` (`YYYY-MM-DD`, UTC) on, read from the database file at `path`
/// opened read-only (a running gateway keeps writing undisturbed).
pub fn read_ledger(path: &Path, since: &str) -> anyhow::Result<Vec<LedgerRow>> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let has_usage = has_row(
        &conn,
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'",
    )?;
    if !has_usage {
        return Ok(Vec::new());
    }
    // A file no gateway has migrated yet (read-only here) has no columns for the 1-hour cache
    // and web searches: they read as 0.
    let has_extras = has_row(
        &conn,
        "SELECT 1 FROM pragma_table_info('usage') WHERE name = 'web_search_requests'",
    )?;
    let extras = if has_extras {
        "cache_creation_1h_input_tokens, web_search_requests"
    } else {
        "0, 0"
    };
    let mut st = conn.prepare(&format!(
        "SELECT day, endpoint, model, requests, input_tokens, output_tokens,
                cache_creation_input_tokens, cache_read_input_tokens, {extras}
         FROM usage WHERE day >= ?1 ORDER BY day, endpoint, model"
    ))?;
    let rows = st.query_map([since], |r| {
        Ok(LedgerRow {
            day: r.get(0)?,
            endpoint: r.get(1)?,
            model: r.get(2)?,
            requests: r.get::<_, Count>(3)?.0,
            input_tokens: r.get::<_, Count>(4)?.0,
            output_tokens: r.get::<_, Count>(5)?.0,
            cache_creation_input_tokens: r.get::<_, Count>(6)?.0,
            cache_read_input_tokens: r.get::<_, Count>(7)?.0,
            cache_creation_1h_input_tokens: r.get::<_, Count>(8)?.0,
            web_search_requests: r.get::<_, Count>(9)?.0,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One row of the stored `requests` table.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRequest {
    /// Arrival, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// `x-ccgate-request-id`.
    pub request_id: String,
    /// Endpoint whose answer was relayed (or the last tried).
    pub endpoint: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Status the client got.
    pub status: Option<u16>,
    /// How it ended.
    pub outcome: String,
}

/// The newest `limit` stored requests, oldest first, from the database file at `path` opened
/// read-only.
pub fn read_requests(path: &Path, limit: u32) -> anyhow::Result<Vec<StoredRequest>> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut st = conn.prepare(
        "SELECT at_ms, request_id, endpoint, attempts, status, outcome FROM
            (SELECT * FROM requests ORDER BY id DESC LIMIT ?1) ORDER BY id",
    )?;
    let rows = st.query_map([limit], |r| {
        Ok(StoredRequest {
            at_ms: r.get(0)?,
            request_id: r.get(1)?,
            endpoint: r.get(2)?,
            attempts: r.get::<_, i64>(3)?.clamp(0, i64::from(u32::MAX)) as u32,
            status: r.get::<_, Option<i64>>(4)?.map(|s| s.clamp(0, 999) as u16),
            outcome: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ledger keeps the 1-hour cache's writes and the web searches, and reads a file no
    /// gateway has migrated to them yet (`ccgate usage` opens it read-only) as 0 of each.
    #[test]
    fn the_ledger_reads_files_from_before_and_after_migration_5() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, migrations, insert, want) in [
            (
                "new.db",
                MIGRATIONS.len(),
                "INSERT INTO usage (day, endpoint, model, requests, input_tokens, output_tokens,
                    cache_creation_input_tokens, cache_read_input_tokens,
                    cache_creation_1h_input_tokens, web_search_requests)
                 VALUES ('2026-12-07', 'a', 'm', 1, 2, 3, 4, 5, 6, 7);",
                (5, 6, 7),
            ),
            (
                // Migration 5 is `MIGRATIONS[4]`: a file from before it.
                "older.db",
                4,
                "INSERT INTO usage (day, endpoint, model, requests, input_tokens, output_tokens,
                    cache_creation_input_tokens, cache_read_input_tokens)
                 VALUES ('2026-12-07', 'a', 'm', 1, 2, 3, 4, 5);",
                (5, 0, 0),
            ),
        ] {
            let path = dir.path().join(name);
            {
                let conn = Connection::open(&path).expect("open");
                for m in &MIGRATIONS[..migrations] {
                    conn.execute_batch(m).expect("a schema");
                }
                conn.execute_batch(insert).expect("a ledger row");
            }
            let rows = read_ledger(&path, "2026-01-01").expect("read");
            let r = &rows[0];
            assert_eq!(
                (
                    r.cache_read_input_tokens,
                    r.cache_creation_1h_input_tokens,
                    r.web_search_requests
                ),
                want,
                "{name}"
            );
        }
    }
}
