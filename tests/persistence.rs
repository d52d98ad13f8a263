//! State that lasts (SPEC §9): cumulative counters, failure episodes and the usage ledger survive
//! a graceful restart, a config reload counts nothing twice, `ccgate usage` reads the ledger from
//! the database file, and `kill -9` in the middle of concurrent traffic loses at most the last
//! flush interval and never corrupts the file.
//!
//! In-process gateways use a database in a temporary directory; binary runs use a sandbox with a
//! temporary HOME and XDG dirs (`support/process.rs`). Background flushes are awaited by polling
//! with deadlines, never by sleeping a fixed time.
#![cfg(unix)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use support::gateway::{GatewayBuilder, TestGateway, http_client};
use support::mock::{MOCK_MODEL, MockUpstream, Script};
use support::wait::{self, eventually_some}; // `wait` for `support/process.rs`

fn builder(a: &MockUpstream, b: &MockUpstream, db: &Path) -> GatewayBuilder {
    GatewayBuilder::new()
        .health("failure_threshold = 2")
        .health("probe_interval = \"50ms\"")
        .health("probe_max_interval = \"100ms\"")
        .table("storage", &format!("path = \"{}\"", db.display()))
        .table("storage", "flush_interval = \"100ms\"")
        // `b` is preferred, so it sees every request first.
        .endpoint("a", &a.url(), "priority = 2")
        .endpoint("b", &b.url(), "priority = 1")
}

/// The four counters `lifetime` repeats, from an endpoint view or its `lifetime` object.
fn four(v: &Value) -> [u64; 4] {
    [
        "total_requests",
        "successful_requests",
        "failed_requests",
        "cancelled",
    ]
    .map(|k| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}")))
}

/// Sums of the ledger per endpoint: (requests, input, output, cache write, cache read).
fn ledger_by_endpoint(db: &Path) -> std::collections::BTreeMap<String, [u64; 5]> {
    let rows = ccgate::store::read_ledger(db, "1970-01-01").expect("read the ledger");
    let mut sums = std::collections::BTreeMap::new();
    for r in rows {
        assert_eq!(r.model, MOCK_MODEL, "{r:?}");
        let s: &mut [u64; 5] = sums.entry(r.endpoint.clone()).or_default();
        s[0] += r.requests;
        s[1] += r.input_tokens;
        s[2] += r.output_tokens;
        s[3] += r.cache_creation_input_tokens;
        s[4] += r.cache_read_input_tokens;
    }
    sums
}

/// Mixed traffic (a caller error, failovers, a stream, an ejection and its recovery through a
/// probe) with a config reload in the middle; graceful shutdown; a second gateway on the same
/// database shows the first run's counters as `lifetime`, the episode with its start, end and
/// probes, and the ledger holds exactly the tokens the mocks sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_counters_episodes_and_usage() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("state").join("ccgate.db");
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let config = builder(&a, &b, &db).config();
    let gw = TestGateway::start(config.clone()).await;
    let stats = gw.admin("stats").await;
    assert_eq!(stats["storage"]["enabled"], true, "{stats}");
    assert_eq!(stats["storage"]["path"], db.display().to_string());

    // req0: b answers with the caller's own error (relayed, not b's fault).
    b.push(Script::error(400, "invalid_request_error", "bad request"));
    let r = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // req1: b is overloaded, a answers with JSON (usage 10 in, 5 out).
    b.push(Script::overloaded());
    let r = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ccgate-endpoint"), Some("a"));

    // A flush has happened, then the same config is reloaded: every endpoint is kept, and the
    // writer must not count what it already wrote a second time.
    eventually_some("a first flush", || async {
        let s = gw.admin("stats").await;
        (!s["storage"]["last_flush"].is_null()).then_some(())
    })
    .await;
    let report = gw.handle.reload_with(config.clone()).await.expect("reload");
    assert_eq!(report.kept, ["a", "b"]);

    // req2: b fails again and is ejected (an episode opens); a streams (10 in, 3 out).
    b.push(Script::overloaded());
    a.push(Script::sse_ok(3));
    let r = gw
        .post("/v1/messages", &[], &TestGateway::message_body(true))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains("message_stop"), "{}", r.text());
    // A probe brings b back on probation; req3 is its one real request, which ends the episode.
    eventually_some("b on probation after a passed probe", || async {
        let v = gw.endpoint_view("b").await;
        (v["probation"] == true).then_some(())
    })
    .await;
    let r = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"));
    gw.settle().await;

    let first_a = gw.endpoint_view("a").await;
    let first_b = gw.endpoint_view("b").await;
    assert_eq!(four(&first_a), [2, 2, 0, 0], "{first_a}");
    // b's caller error is one of its `failed_requests`, not a success (issue 21 #3).
    assert_eq!(four(&first_b), [4, 1, 3, 0], "{first_b}");
    // In the first run, lifetime is this run: nothing was counted twice across the reload.
    assert_eq!(four(&first_a["lifetime"]), four(&first_a));
    assert_eq!(four(&first_b["lifetime"]), four(&first_b));
    let first_stats = gw.admin("stats").await;
    assert_eq!(first_stats["total_requests"], 4);
    assert_eq!(four(&first_stats["lifetime"]), four(&first_stats));
    gw.shutdown().await;

    // Second run on the same database, fresh counters.
    let gw = TestGateway::start(builder(&a, &b, &db).config()).await;
    let second_a = gw.endpoint_view("a").await;
    let second_b = gw.endpoint_view("b").await;
    assert_eq!(
        second_a["total_requests"], 0,
        "contract fields stay per-process"
    );
    assert_eq!(four(&second_a["lifetime"]), four(&first_a), "{second_a}");
    assert_eq!(four(&second_b["lifetime"]), four(&first_b), "{second_b}");
    let stats = gw.admin("stats").await;
    assert_eq!(stats["total_requests"], 0);
    assert_eq!(four(&stats["lifetime"]), four(&first_stats), "{stats}");

    let episodes = gw.admin("episodes").await;
    let list = episodes["episodes"].as_array().expect("episodes");
    assert_eq!(list.len(), 1, "{episodes}");
    let e = &list[0];
    assert_eq!(e["endpoint"], "b");
    assert_eq!(e["reason"], "consecutive_failures");
    assert_eq!(e["ended_by"], "recovered");
    assert_eq!(e["open"], false);
    assert!(e["probes"].as_u64().expect("probes") >= 1, "{e}");
    let started =
        humantime::parse_rfc3339(e["started_at"].as_str().expect("start")).expect("RFC 3339 start");
    let ended =
        humantime::parse_rfc3339(e["ended_at"].as_str().expect("end")).expect("RFC 3339 end");
    assert!(started <= ended, "{e}");

    // What the mocks sent: a: JSON (10 in, 5 out) and a stream (10 in, 3 out); b: JSON (10, 5).
    // The caller error and the probes are not usage.
    let ledger = ledger_by_endpoint(&db);
    assert_eq!(ledger.get("a"), Some(&[2, 20, 8, 0, 0]), "{ledger:?}");
    assert_eq!(ledger.get("b"), Some(&[1, 10, 5, 0, 0]), "{ledger:?}");

    // Lifetime is stored plus this run, before any flush.
    let r = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    gw.settle().await;
    let v = gw.endpoint_view("b").await;
    assert_eq!(v["total_requests"], 1);
    assert_eq!(v["lifetime"]["total_requests"], 5, "{v}");
    gw.shutdown().await;
    let ledger = ledger_by_endpoint(&db);
    assert_eq!(ledger.get("b"), Some(&[2, 20, 10, 0, 0]), "{ledger:?}");
}

/// An endpoint changed twice between two flushes: the counts of each cell it had are written,
/// including those of the cells made and replaced before any flush saw them (audit: a cell
/// replaced within one `flush_interval` was never written, and its counts were lost for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_of_an_endpoint_changed_between_two_flushes_are_written() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("ccgate.db");
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let with_priority = |p: u32| {
        GatewayBuilder::new()
            .table("storage", &format!("path = \"{}\"", db.display()))
            .table("storage", "flush_interval = \"1h\"")
            .endpoint("a", &a.url(), &format!("priority = {p}"))
            .endpoint("b", &b.url(), "priority = 9")
            .config()
    };
    let gw = TestGateway::start(with_priority(1)).await;
    let body = TestGateway::message_body(false);
    let mut sent = 0;
    for (round, n) in [(2, 10), (3, 5), (4, 3)] {
        for _ in 0..n {
            let r = gw.post("/v1/messages", &[], &body).await;
            assert_eq!(r.header("x-ccgate-endpoint"), Some("a"));
        }
        sent += n;
        gw.settle().await;
        let report = gw
            .handle
            .reload_with(with_priority(round))
            .await
            .expect("reload");
        assert_eq!(report.changed, ["a"]);
    }
    let view = gw.endpoint_view("a").await;
    assert_eq!(four(&view["lifetime"]), [sent, sent, 0, 0], "{view}");
    gw.shutdown().await;
    assert_eq!(a.count() as u64, sent);

    // The database holds every one of them: a new gateway on it shows them as `lifetime`.
    let gw = TestGateway::start(with_priority(4)).await;
    let view = gw.endpoint_view("a").await;
    assert_eq!(four(&view["lifetime"]), [sent, sent, 0, 0], "{view}");
    gw.shutdown().await;
}

/// A second gateway on a database in use serves without it and says why; the first one's
/// attempt in flight is not closed as lost behind its back (audit: a second start, even one
/// that then failed to bind, counted the first one's open streams as cancelled for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_a_database_in_use_leaves_it_alone() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("ccgate.db");
    let a = MockUpstream::start().await;
    let gate = support::mock::Gate::new();
    a.push(Script::sse_ok(3).gate_after(4, gate.clone()));
    let config = GatewayBuilder::new()
        .table("storage", &format!("path = \"{}\"", db.display()))
        .table("storage", "flush_interval = \"20ms\"")
        .endpoint("a", &a.url(), "")
        .config();
    let first = TestGateway::start(config.clone()).await;
    let stream = first
        .send(
            Method::POST,
            "/v1/messages",
            &[("content-type", "application/json")],
            Bytes::from(TestGateway::message_body(true).to_string()),
        )
        .await;
    assert_eq!(stream.status(), StatusCode::OK);
    gate.wait_arrived(1).await;
    // A flush has written the attempt in flight.
    let flushed = first.admin("stats").await["storage"]["last_flush"].clone();
    eventually_some("a flush with the stream open", || async {
        let s = first.admin("stats").await;
        (s["storage"]["last_flush"] != flushed).then_some(())
    })
    .await;

    let second = TestGateway::start(config.clone()).await;
    let stats = second.admin("stats").await;
    assert_eq!(stats["storage"]["enabled"], false, "{stats}");
    let error = stats["storage"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("in use by another running ccgate"),
        "{stats}"
    );
    second.shutdown().await;

    gate.open();
    let body = stream.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("message_stop"));
    first.settle().await;
    first.shutdown().await;

    let third = TestGateway::start(config).await;
    let view = third.endpoint_view("a").await;
    assert_eq!(four(&view["lifetime"]), [1, 1, 0, 0], "{view}");
    third.shutdown().await;
}

/// A database that cannot be opened does not stop the gateway: it serves, and says why.
#[tokio::test]
async fn unusable_database_serves_without_persistence() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "a file where a directory should be").expect("write");
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .table(
            "storage",
            &format!("path = \"{}\"", blocker.join("ccgate.db").display()),
        )
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let r = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let stats = gw.admin("stats").await;
    assert_eq!(stats["storage"]["enabled"], false, "{stats}");
    assert!(
        stats["storage"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not-a-dir")),
        "{stats}"
    );
    gw.settle().await;
    assert_eq!(gw.endpoint_view("a").await["lifetime"]["total_requests"], 1);
    assert_eq!(
        gw.admin("episodes").await["episodes"],
        serde_json::json!([])
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The binary

/// The database in a sandbox: `$XDG_DATA_HOME/ccgate/ccgate.db`.
fn sandbox_db(sb: &process::Sandbox) -> PathBuf {
    sb.path("xdg-data").join("ccgate").join("ccgate.db")
}

fn write_config(sb: &process::Sandbox, upstream: &str, storage: &str) {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\n{storage}\n\n[[endpoints]]\nname = \"main\"\nbase_url = \"{upstream}\"\napi_key = \"sk-test-persist\"\n"
    );
    sb.write_at(&sb.default_config(), &text);
}

/// The last write before stopping is tried again while another process holds the database's
/// write lock (audit: it failed once, the gateway exited 0, and the counts since the last flush
/// were lost without a word).
#[tokio::test]
async fn the_last_flush_waits_out_a_busy_database() {
    let up = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    write_config(&sb, &up.url(), "flush_interval = \"1h\"");
    let serving = process::start(sb.command(&["serve"])).await;
    for _ in 0..3 {
        let r = process::post_message(serving.addr, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // Another process's write transaction holds the database while the gateway stops.
    let holder = rusqlite::Connection::open(sandbox_db(&sb)).expect("open the database");
    holder
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    serving.signal("TERM");
    serving.stderr_until("storage: flush failed").await;
    holder.execute_batch("ROLLBACK").expect("let go");
    drop(holder);
    let f = serving.finish().await;
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    let s = stored(&sandbox_db(&sb)).expect("stored");
    assert_eq!(s.started, 3, "{}", f.output());
    assert_eq!(s.success, 3, "{}", f.output());
}

/// `ccgate serve` with a temporary HOME: traffic, SIGTERM, restart with the counters kept, and
/// `ccgate usage` (JSON and table) reading the ledger from the file.
#[tokio::test]
async fn binary_restart_and_usage_command() {
    let up = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    write_config(&sb, &up.url(), "flush_interval = \"100ms\"");
    let serving = process::start(sb.command(&["serve"])).await;
    for _ in 0..2 {
        let r = process::post_message(serving.addr, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    up.push(Script::sse_ok(4));
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5", "max_tokens": 16, "stream": true,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let r = process::call(
        serving.addr,
        Method::POST,
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
        body.to_string(),
    )
    .await;
    assert!(r.body.contains("message_stop"), "{}", r.body);
    serving.stop().await;

    // The file and its directory are owner-only.
    let db = sandbox_db(&sb);
    assert_eq!(process::mode_of(&db), 0o600);
    assert_eq!(
        process::mode_of(db.parent().expect("dir")),
        0o700,
        "database directory"
    );

    let f = process::run(sb.command(&["usage", "--json"])).await;
    f.assert_success();
    let ledger: Value = serde_json::from_str(&f.stdout).expect("usage --json prints JSON");
    let v = &ledger;
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{v}");
    let row = &rows[0];
    assert_eq!(row["endpoint"], "main");
    assert_eq!(row["model"], MOCK_MODEL);
    assert_eq!(row["requests"], 3);
    assert_eq!(row["input_tokens"], 30);
    assert_eq!(row["output_tokens"], 5 + 5 + 4);
    assert_eq!(v["total"]["requests"], 3);
    assert_eq!(v["database"], db.display().to_string());

    let f = process::run(sb.command(&["usage", "--days", "1"])).await;
    f.assert_success();
    assert!(f.stdout.contains("CACHE WRITE"), "{}", f.output());
    let line = f
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("main"))
        .unwrap_or_else(|| panic!("no ledger row\n{}", f.output()));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cells[1..],
        ["main", MOCK_MODEL, "3", "30", "14", "0", "0", "0.0%", "-"]
    );

    // Restart: lifetime picks up where the first run left off.
    let serving = process::start(sb.command(&["serve"])).await;
    let v = process::endpoint_view(serving.addr, "main").await;
    assert_eq!(v["total_requests"], 0);
    assert_eq!(four(&v["lifetime"]), [3, 3, 0, 0], "{v}");
    let stats = process::get(serving.addr, "/_ccgate/stats", &[])
        .await
        .json();
    assert_eq!(stats["lifetime"]["total_requests"], 3, "{stats}");
    // While it runs, `usage` still reads the file (read-only, beside the writer): the same ledger.
    let f = process::run(sb.command(&["usage", "--json"])).await;
    f.assert_success();
    let running: Value = serde_json::from_str(&f.stdout).expect("usage --json prints JSON");
    assert_eq!(running["rows"], ledger["rows"], "{running}");
    assert_eq!(running["total"], ledger["total"], "{running}");
    assert_eq!(running["total"]["requests"], 3, "{running}");
    serving.stop().await;
}

/// What the database holds, read through a fresh connection.
struct Stored {
    /// Attempts started.
    started: u64,
    /// Attempts that succeeded.
    success: u64,
    /// Usage rows: (requests, input, output).
    usage: Vec<(u64, u64, u64)>,
}

fn stored(db: &Path) -> Option<Stored> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    let count = |kind: &str| -> Option<u64> {
        conn.query_row(
            "SELECT COALESCE(SUM(count), 0) FROM endpoint_counters WHERE kind = ?1",
            [kind],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .map(|n| n as u64)
    };
    let started = count("started")?;
    let success = count("success")?;
    let mut st = conn
        .prepare("SELECT requests, input_tokens, output_tokens FROM usage")
        .ok()?;
    let usage = st
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        })
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(Stored {
        started,
        success,
        usage,
    })
}

/// `kill -9` in the middle of concurrent traffic with a 200 ms flush interval: the file passes
/// `PRAGMA integrity_check`, holds at least what had been committed before the kill and no more
/// than the upstream saw, its usage rows are whole, and the gateway starts again on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_traffic_leaves_an_intact_database() {
    const CLIENTS: usize = 8;
    let up = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    write_config(&sb, &up.url(), "flush_interval = \"200ms\"");
    let db = sandbox_db(&sb);
    let serving = process::start(sb.command(&["serve"])).await;
    let addr = serving.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
        clients.push(tokio::spawn(async move {
            let client = http_client();
            let body = TestGateway::message_body(false).to_string();
            // Bounded: stops when told, after the gateway dies, or after 20 000 requests.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(format!("http://{addr}/v1/messages"))
                    .header("content-type", "application/json")
                    .header("anthropic-version", "2023-06-01")
                    .body(Full::new(Bytes::from(body.clone())))
                    .expect("request");
                let sent = tokio::time::timeout(Duration::from_secs(5), async {
                    let resp = client.request(req).await.ok()?;
                    resp.into_body().collect().await.ok()
                })
                .await;
                match sent {
                    Ok(Some(_)) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
        }));
    }

    // Kill only once the writer has committed at least two flushes while traffic keeps going.
    let first = eventually_some("a first flush during traffic", || async {
        stored(&db).map(|s| s.started).filter(|&n| n >= 50)
    })
    .await;
    let (flushed_started, flushed_success) = eventually_some("a second flush", || async {
        let s = stored(&db)?;
        (s.started > first && answered.load(Ordering::Relaxed) > s.started)
            .then_some((s.started, s.success))
    })
    .await;
    serving.signal("KILL");
    drop(serving);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }

    let conn = rusqlite::Connection::open(&db).expect("open after kill -9");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    drop(conn);
    let Stored {
        started,
        success,
        usage,
    } = stored(&db).expect("read after kill -9");
    let received = up.count() as u64;
    assert!(
        started >= flushed_started && success >= flushed_success,
        "lost committed counts: {started}/{success} < {flushed_started}/{flushed_success}"
    );
    assert!(
        success <= received,
        "stored successes {success} > requests the upstream received {received}"
    );
    assert!(
        started <= received + CLIENTS as u64,
        "stored attempts {started} > received {received} + {CLIENTS} in flight"
    );
    // Each usage row was written whole with its flush: json_ok is 10 in, 5 out per request.
    let usage_requests: u64 = usage.iter().map(|u| u.0).sum();
    for (requests, input, output) in &usage {
        assert_eq!(
            (*input, *output),
            (10 * requests, 5 * requests),
            "{usage:?}"
        );
    }
    assert!(
        usage_requests >= success && usage_requests <= received,
        "{usage:?}"
    );

    // The gateway starts again on the same file and shows what it holds.
    let serving = process::start(sb.command(&["serve"])).await;
    let v = process::endpoint_view(serving.addr, "main").await;
    assert_eq!(v["lifetime"]["total_requests"], started, "{v}");
    let episodes = process::get(serving.addr, "/_ccgate/episodes", &[]).await;
    assert_eq!(episodes.status, StatusCode::OK);
    serving.stop().await;
}

/// Issue 17 #9: an attempt in flight at a `kill -9` was stored as started but never as ended; the
/// next start closes it as `cancelled`, so the lifetime totals add up again (endpoint and gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_flight_is_closed_as_cancelled_on_the_next_start() {
    let up = MockUpstream::start().await;
    up.push(Script::stall_before_headers());
    let sb = process::Sandbox::new();
    write_config(&sb, &up.url(), "flush_interval = \"50ms\"");
    let db = sandbox_db(&sb);
    let serving = process::start(sb.command(&["serve"])).await;
    let addr = serving.addr;
    let held = tokio::spawn(async move { process::post_message(addr, &[]).await });
    // A flush has committed the attempt as started while it is still in flight.
    eventually_some("the stalled attempt committed as started", || async {
        stored(&db).map(|s| s.started).filter(|&n| n == 1)
    })
    .await;
    serving.signal("KILL");
    drop(serving);
    held.abort();

    let serving = process::start(sb.command(&["serve"])).await;
    let v = process::endpoint_view(serving.addr, "main").await;
    let l = &v["lifetime"];
    assert_eq!(four(l), [1, 0, 0, 1], "closed as cancelled: {v}");
    let stats = process::get(serving.addr, "/_ccgate/stats", &[])
        .await
        .json();
    let l = &stats["lifetime"];
    assert_eq!(l["total_requests"], 1, "{stats}");
    assert_eq!(
        (
            &l["successful_requests"],
            &l["failed_requests"],
            &l["cancelled"]
        ),
        (&Value::from(0), &Value::from(1), &Value::from(1)),
        "{stats}"
    );
    serving.stop().await;
}

fn write_two(sb: &process::Sandbox, a: &str, key_a: &str, b: &str) {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[health]\nfailure_threshold = 1\nprobe_interval = \"5m\"\n\n[storage]\nflush_interval = \"50ms\"\n\n[[endpoints]]\nname = \"a\"\nbase_url = \"{a}\"\napi_key = \"{key_a}\"\npriority = 1\n\n[[endpoints]]\nname = \"b\"\nbase_url = \"{b}\"\napi_key = \"sk-test-b\"\npriority = 2\n"
    );
    sb.write_at(&sb.default_config(), &text);
}

/// Issue 21 #9: an endpoint ejected when the gateway stops is still out after a restart (the
/// first request does not go to it, and it waits in the failure queue for its probe); once its
/// credential changes in the config it starts fresh.
#[tokio::test]
async fn ejected_endpoint_stays_out_across_a_restart_until_its_config_changes() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.set_default(Script::error(500, "api_error", "down"));
    let sb = process::Sandbox::new();
    write_two(&sb, &up_a.url(), "sk-test-a", &up_b.url());
    let serving = process::start(sb.command(&["serve"])).await;
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"), "{}", r.body);
    let v = process::endpoint_view(serving.addr, "a").await;
    assert_eq!(v["state"], "ejected", "{v}");
    serving.signal("TERM");
    serving.finish().await.assert_success();
    assert_eq!(up_a.count(), 1);

    let serving = process::start(sb.command(&["serve"])).await;
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.header("x-ccgate-endpoint"),
        Some("b"),
        "the first request after the restart must not go to the ejected endpoint"
    );
    assert_eq!(up_a.count(), 1, "nothing sent to `a`");
    let v = process::endpoint_view(serving.addr, "a").await;
    assert_eq!(v["state"], "ejected", "{v}");
    let q = process::get(serving.addr, "/_ccgate/failure-queue", &[])
        .await
        .json();
    assert_eq!(q["size"], 1, "{q}");
    assert_eq!(q["entries"][0]["name"], "a", "{q}");
    assert_eq!(q["entries"][0]["reason"], "consecutive_failures", "{q}");
    serving.stop().await;

    // A new key for `a`: its saved health no longer applies.
    up_a.set_default(Script::json_ok());
    write_two(&sb, &up_a.url(), "sk-test-a-new", &up_b.url());
    let serving = process::start(sb.command(&["serve"])).await;
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("a"), "{}", r.body);
    serving.stop().await;
}

/// `a`'s failure-queue entry and its stored episodes, as the views show them.
async fn outage_of_a(addr: std::net::SocketAddr) -> (Value, Vec<Value>) {
    let q = process::get(addr, "/_ccgate/failure-queue", &[])
        .await
        .json();
    let episodes = process::get(addr, "/_ccgate/episodes", &[]).await.json();
    let of_a = episodes["episodes"]
        .as_array()
        .expect("episodes")
        .iter()
        .filter(|e| e["endpoint"] == "a")
        .cloned()
        .collect();
    (q, of_a)
}

/// One outage, one episode (SPEC §5.4), even when the gateway restarts in the middle of it, by
/// SIGTERM or `kill -9`: the resumed entry keeps the time it began, the stored episode stays open
/// and is not counted again, and it ends when the endpoint's saved health stops applying.
#[tokio::test]
async fn an_outage_across_restarts_stays_one_episode_with_its_start() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.set_default(Script::error(500, "api_error", "down"));
    let sb = process::Sandbox::new();
    write_two(&sb, &up_a.url(), "sk-test-a", &up_b.url());
    let db = sandbox_db(&sb);
    let serving = process::start(sb.command(&["serve"])).await;
    process::post_message(serving.addr, &[]).await;
    let (q, episodes) = outage_of_a(serving.addr).await;
    assert_eq!(q["stats"]["total_failed"], 1, "{q}");
    serving.signal("TERM");
    serving.finish().await.assert_success();
    assert!(episodes.len() <= 1, "{episodes:?}");
    // The outage began an hour ago, as far as the stored state says: a restart must not move it.
    let conn = rusqlite::Connection::open(&db).expect("open");
    for sql in [
        "UPDATE endpoint_health SET since_ms = since_ms - 3600000 WHERE endpoint = 'a'",
        "UPDATE episodes SET started_at_ms = started_at_ms - 3600000 WHERE endpoint = 'a'",
    ] {
        assert_eq!(conn.execute(sql, []).expect("update"), 1, "{sql}");
    }
    let since_ms: i64 = conn
        .query_row(
            "SELECT since_ms FROM endpoint_health WHERE endpoint = 'a'",
            [],
            |r| r.get(0),
        )
        .expect("since");
    drop(conn);
    let began = std::time::UNIX_EPOCH + Duration::from_millis(since_ms as u64);
    let since = Value::from(humantime::format_rfc3339_seconds(began).to_string());

    // After SIGTERM, and then after `kill -9` (once the episode is on disk), the same outage.
    let mut after = "TERM";
    for stop_with in ["KILL", "TERM"] {
        let serving = process::start(sb.command(&["serve"])).await;
        let (q, episodes) = outage_of_a(serving.addr).await;
        assert_eq!(q["size"], 1, "after {after}: {q}");
        assert_eq!(
            q["entries"][0]["since"], since,
            "after {after}: the outage keeps its start"
        );
        assert_eq!(
            q["stats"]["total_failed"], 0,
            "after {after}: no new episode: {q}"
        );
        assert_eq!(
            episodes.len(),
            1,
            "after {after}: one episode: {episodes:?}"
        );
        assert_eq!(
            episodes[0]["started_at"], since,
            "after {after}: {episodes:?}"
        );
        assert!(
            episodes[0]["ended_at"].is_null(),
            "after {after}: still open: {episodes:?}"
        );
        let conn = rusqlite::Connection::open(&db).expect("open");
        let open: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM episodes WHERE endpoint = 'a' AND ended_at_ms IS NULL",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(open, 1, "after {after}: the episode is on disk, open");
        drop(conn);
        serving.signal(stop_with);
        let finished = serving.finish().await;
        if stop_with == "TERM" {
            finished.assert_success();
        }
        after = stop_with;
    }

    // A new key: the saved health no longer applies, and the outage ends at the restart.
    up_a.set_default(Script::json_ok());
    write_two(&sb, &up_a.url(), "sk-test-a-new", &up_b.url());
    let serving = process::start(sb.command(&["serve"])).await;
    let (q, episodes) = outage_of_a(serving.addr).await;
    assert_eq!(q["size"], 0, "{q}");
    assert_eq!(episodes.len(), 1, "{episodes:?}");
    assert_eq!(episodes[0]["ended_by"], "restart", "{episodes:?}");
    serving.stop().await;
    // And so it is stored: no episode of `a` is left open.
    let conn = rusqlite::Connection::open(&db).expect("open");
    let stored: Vec<(Option<i64>, Option<String>)> = conn
        .prepare("SELECT ended_at_ms, ended_by FROM episodes WHERE endpoint = 'a'")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].0.is_some(), "{stored:?}");
    assert_eq!(stored[0].1.as_deref(), Some("restart"), "{stored:?}");
}

/// Issue 21 #9: a cooldown still running when the gateway stops goes on after the restart; one
/// that ended while the gateway was down is over.
#[tokio::test]
async fn cooldown_resumes_across_a_restart_and_ends_if_it_expired_meanwhile() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    up_a.push(Script::error(429, "rate_limit_error", "slow down").header("retry-after", "600"));
    let sb = process::Sandbox::new();
    write_two(&sb, &up_a.url(), "sk-test-a", &up_b.url());
    let db = sandbox_db(&sb);
    let serving = process::start(sb.command(&["serve"])).await;
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"), "{}", r.body);
    serving.stop().await;

    let serving = process::start(sb.command(&["serve"])).await;
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"), "{}", r.body);
    let v = process::endpoint_view(serving.addr, "a").await;
    assert_eq!(v["state"], "cooling_down", "{v}");
    assert!(v["cooldown_until"].is_string(), "{v}");
    serving.stop().await;
    assert_eq!(up_a.count(), 1);

    // The deadline passes while the gateway is down.
    let conn = rusqlite::Connection::open(&db).expect("open");
    let n = conn
        .execute(
            "UPDATE endpoint_health SET cooldown_until_ms = 1 WHERE endpoint = 'a'",
            [],
        )
        .expect("update");
    assert_eq!(n, 1, "the cooldown was saved");
    drop(conn);
    let serving = process::start(sb.command(&["serve"])).await;
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("a"), "{}", r.body);
    let v = process::endpoint_view(serving.addr, "a").await;
    assert_eq!(v["state"], "healthy", "{v}");
    serving.stop().await;
}

/// Token counts whose sums pass the largest integer SQLite holds saturate there, flush after
/// flush, and the ledger stays readable, every row of it (audit: the second flush's sum became a
/// REAL and `ccgate usage` failed for the whole range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_sums_past_the_largest_integer_saturate_and_stay_readable() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("ccgate.db");
    let up = MockUpstream::start().await;
    let huge = 5_000_000_000_000_000_000u64;
    let answer = |input: u64| {
        let mut m = support::mock::anthropic_message(MOCK_MODEL, "hi", 0, 3);
        m["usage"]["input_tokens"] = serde_json::json!(input);
        Script::json(200, &m)
    };
    let gw = GatewayBuilder::new()
        .table("storage", &format!("path = \"{}\"", db.display()))
        .table("storage", "flush_interval = \"50ms\"")
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let requests_stored = |n: u64| {
        let db = db.clone();
        move || {
            let db = db.clone();
            async move {
                let rows = ccgate::store::read_ledger(&db, "1970-01-01").ok()?;
                (rows.iter().map(|r| r.requests).sum::<u64>() >= n).then_some(rows)
            }
        }
    };
    // Three answers, each in a flush of its own: 5e18, 5e18 (past i64::MAX), then 7.
    for (i, input) in [huge, huge, 7].into_iter().enumerate() {
        up.push(answer(input));
        let r = gw.post_message(false).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        eventually_some("the flush", requests_stored(i as u64 + 1)).await;
    }
    let rows = ccgate::store::read_ledger(&db, "1970-01-01").expect("the ledger reads");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].requests, 3);
    assert_eq!(rows[0].input_tokens, i64::MAX as u64, "saturated: {rows:?}");
    assert_eq!(rows[0].output_tokens, 9);
}

/// A model name an upstream answered with reaches `ccgate usage`'s table with its control
/// characters escaped: it can neither drive the terminal nor forge a row (audit: escape sequences
/// and a newline came through raw).
#[tokio::test]
async fn usage_table_escapes_what_an_upstream_named_its_model() {
    let up = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    write_config(&sb, &up.url(), "flush_interval = \"100ms\"");
    let evil = "evil\u{1b}]0;PWNED\u{7}\u{1b}[2J\rOVERWRITE\nfake-row";
    up.push(Script::json(
        200,
        &support::mock::anthropic_message(evil, "hi", 1, 1),
    ));
    let serving = process::start(sb.command(&["serve"])).await;
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    serving.stop().await;
    let f = process::run(sb.command(&["usage"])).await;
    f.assert_success();
    assert!(
        !f.stdout.contains(['\u{1b}', '\u{7}', '\r']),
        "control characters reached the terminal: {:?}",
        f.stdout
    );
    assert!(
        !f.stdout.lines().any(|l| l.starts_with("fake-row")),
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains("evil\\u{1b}]0;PWNED"), "{}", f.stdout);
}

/// An endpoint's last failure as the database holds it: (kind, message).
fn stored_last_error(db: &Path, endpoint: &str) -> Option<(String, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(
        "SELECT kind, message FROM endpoint_last_error WHERE endpoint = ?1",
        [endpoint],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ok()
}

/// Whether the database's files (the file and its write-ahead log) hold `secret` anywhere.
fn database_holds(db: &Path, secret: &str) -> bool {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [db.to_path_buf(), PathBuf::from(wal)].iter().any(|p| {
        std::fs::read(p)
            .is_ok_and(|bytes| bytes.windows(secret.len()).any(|w| w == secret.as_bytes()))
    })
}

/// Each endpoint's `last_error` is shown again after a restart, graceful or `kill -9` once a
/// flush has written it, with its kind, message and time; the text stored is the scrubbed one,
/// so the database never holds the credential an upstream echoed.
#[tokio::test]
async fn last_error_survives_a_restart_and_never_holds_the_secret() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let secret = "sk-test-a-echoed-back";
    up_a.set_default(Script::error(
        500,
        "api_error",
        &format!("down for maintenance (key {secret})"),
    ));
    let sb = process::Sandbox::new();
    write_two(&sb, &up_a.url(), secret, &up_b.url());
    let db = sandbox_db(&sb);

    // Run 1: `a` fails, `b` answers; stopped gracefully (the last flush writes `a`'s failure).
    let serving = process::start(sb.command(&["serve"])).await;
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"), "{}", r.body);
    let a_error = process::endpoint_view(serving.addr, "a").await["last_error"].clone();
    assert_eq!(a_error["kind"], "server_error", "{a_error}");
    let message = a_error["message"].as_str().expect("message");
    assert!(message.contains("down for maintenance"), "{a_error}");
    assert!(!message.contains(secret), "{a_error}");
    serving.stop().await;

    // Run 2: the same failure is shown. `b` now fails too; once a flush has written that, the
    // gateway is killed.
    let serving = process::start(sb.command(&["serve"])).await;
    let v = process::endpoint_view(serving.addr, "a").await;
    assert_eq!(v["last_error"], a_error, "after a graceful restart: {v}");
    let v = process::endpoint_view(serving.addr, "b").await;
    assert_eq!(v["last_error"], Value::Null, "{v}");
    up_b.set_default(Script::overloaded());
    let r = process::post_message(serving.addr, &[]).await;
    assert_ne!(r.status, StatusCode::OK, "{}", r.body);
    let b_error = process::endpoint_view(serving.addr, "b").await["last_error"].clone();
    assert_eq!(b_error["kind"], "overloaded", "{b_error}");
    let b_message = b_error["message"].as_str().expect("message").to_string();
    eventually_some("b's failure written by a flush", || async {
        stored_last_error(&db, "b").filter(|(_, m)| *m == b_message)
    })
    .await;
    serving.signal("KILL");
    drop(serving);

    // Run 3, after `kill -9`: both failures are shown as they were.
    let serving = process::start(sb.command(&["serve"])).await;
    let v = process::endpoint_view(serving.addr, "a").await;
    assert_eq!(v["last_error"], a_error, "after kill -9: {v}");
    let v = process::endpoint_view(serving.addr, "b").await;
    assert_eq!(v["last_error"], b_error, "after kill -9: {v}");
    serving.stop().await;
    assert_eq!(
        stored_last_error(&db, "a").map(|(kind, _)| kind).as_deref(),
        Some("server_error")
    );
    assert!(
        !database_holds(&db, secret),
        "the database must never hold the credential"
    );
}

/// An outage is in the stored episodes as soon as the failure queue has it, not one flush later:
/// the view asks the writer for a flush and waits for it (audit: with the default 5 s interval,
/// `/_ccgate/episodes` missed an ejection the failure queue already showed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_in_the_episodes_view_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("ccgate.db");
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .health("failure_threshold = 1")
        .health("probe_interval = \"5m\"")
        .table("storage", &format!("path = \"{}\"", db.display()))
        .table("storage", "flush_interval = \"1h\"")
        .endpoint("a", &a.url(), "priority = 1")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;
    a.push(Script::error(500, "api_error", "boom"));
    let r = gw.post_message(false).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"));
    assert_eq!(gw.admin("failure-queue").await["size"], 1);

    let episodes = gw.admin("episodes").await;
    let list = episodes["episodes"].as_array().expect("episodes");
    assert_eq!(list.len(), 1, "{episodes}");
    assert_eq!(list[0]["endpoint"], "a", "{episodes}");
    assert_eq!(list[0]["open"], true, "{episodes}");
    // Nothing new since: the next read asks for no flush and shows the same.
    assert_eq!(gw.admin("episodes").await, episodes);
    gw.shutdown().await;
}
