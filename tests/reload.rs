//! Config reload (`POST /_ccgate/reload`, SIGHUP): added endpoints take traffic, kept endpoints
//! keep their counters and health, changed ones start afresh, removed ones stop, and a bad file
//! leaves the running gateway as it was.

#[cfg(unix)]
#[path = "support/process.rs"]
mod process;
mod support;

use bytes::Bytes;
use ccgate::config::Config;
use http::Method;
use support::gateway::{GatewayBuilder, TestGateway};
use support::mock::{MockUpstream, Script};
#[cfg(unix)]
use support::wait; // for `support/process.rs`

fn endpoint(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[endpoints]]\nname = \"{name}\"\nbase_url = \"{url}\"\napi_key = \"key-{name}\"\n{extra}\n"
    )
}

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write config");
}

/// A gateway started from `text`, written to a config file (in the returned directory) that
/// reloads read again.
async fn start_from_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf, TestGateway) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    write(&path, text);
    let config = Config::from_toml(text, "test", &|_: &str| None).expect("config");
    let gw = TestGateway::start_with_source(config, Some(path.clone())).await;
    (dir, path, gw)
}

async fn reload(gw: &TestGateway) -> support::gateway::Answer {
    gw.request(Method::POST, "/_ccgate/reload", &[], Bytes::new())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_keeps_changes_and_removes_endpoints() {
    let (a, b, c) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    a.push(Script::error(500, "api_error", "boom"));
    let head = "[server]\nlisten = \"127.0.0.1:0\"\n[health]\nfailure_threshold = 5\n";
    let first = format!(
        "{head}{}{}",
        endpoint("a", &a.url(), ""),
        endpoint("b", &b.url(), "priority = 2")
    );
    let (_dir, path, gw) = start_from_file(&first).await;
    for _ in 0..3 {
        assert_eq!(
            gw.post("/v1/messages", &[], &TestGateway::message_body(false))
                .await
                .status,
            200
        );
    }
    gw.settle().await;
    let a_before = gw.endpoint_view("a").await;
    assert_eq!(a_before["total_requests"], 3);
    assert_eq!(a_before["failed_requests"], 1);
    assert_eq!(gw.endpoint_view("b").await["total_requests"], 1);

    // `a` unchanged, `b` changed (priority), `c` added in front of both.
    let second = format!(
        "{head}{}{}{}",
        endpoint("c", &c.url(), "priority = 0"),
        endpoint("a", &a.url(), ""),
        endpoint("b", &b.url(), "priority = 3")
    );
    write(&path, &second);
    let r = reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json();
    assert_eq!(report["reloaded"], true);
    assert_eq!(report["added"], serde_json::json!(["c"]));
    assert_eq!(report["kept"], serde_json::json!(["a"]));
    assert_eq!(report["changed"], serde_json::json!(["b"]));
    assert_eq!(report["removed"], serde_json::json!([]));

    let a_after = gw.endpoint_view("a").await;
    for k in [
        "total_requests",
        "successful_requests",
        "failed_requests",
        "outcomes",
    ] {
        assert_eq!(a_after[k], a_before[k], "kept endpoint lost `{k}`");
    }
    assert_eq!(
        gw.endpoint_view("b").await["total_requests"],
        0,
        "a changed endpoint starts afresh"
    );
    let served = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(
        served.header("x-ccgate-endpoint"),
        Some("c"),
        "the added endpoint takes traffic"
    );
    assert_eq!(c.count(), 1);
    let stats = gw.admin("stats").await;
    assert_eq!(stats["total_requests"], 4, "gateway totals carry on");

    // `a` removed: it gets no more traffic even when `c` fails.
    write(&path, &format!("{head}{}", endpoint("c", &c.url(), "")));
    let r = reload(&gw).await;
    assert_eq!(r.json()["removed"], serde_json::json!(["a", "b"]));
    c.push(Script::error(500, "api_error", "boom"));
    let down = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(down.status, 502);
    assert_eq!(a.count(), 3, "a removed endpoint is never tried");
    let names: Vec<String> = gw.admin("endpoints").await["endpoints"]
        .as_array()
        .expect("list")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["c"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_endpoint_stays_in_the_failure_queue_and_a_bad_file_changes_nothing() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    a.set_default(Script::error(500, "api_error", "boom"));
    let head = "[server]\nlisten = \"127.0.0.1:0\"\n[health]\nfailure_threshold = 1\nprobe_interval = \"1h\"\nprobe_max_interval = \"1h\"\n";
    let text = format!(
        "{head}{}{}",
        endpoint("a", &a.url(), ""),
        endpoint("b", &b.url(), "priority = 2")
    );
    let (_dir, path, gw) = start_from_file(&text).await;
    assert_eq!(
        gw.post("/v1/messages", &[], &TestGateway::message_body(false))
            .await
            .status,
        200
    );
    let q = gw.admin("failure-queue").await;
    assert_eq!(q["size"], 1);
    assert_eq!(q["stats"]["total_failed"], 1);

    // A broken file: 400 naming the problem; the gateway keeps serving as before.
    write(
        &path,
        &format!("{head}[[endpoints]]\nname = \"a\"\nbase_url = \"ftp://x\"\napi_key = \"k\"\n"),
    );
    let r = reload(&gw).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("base_url"), "{}", r.text());
    assert_eq!(
        gw.admin("endpoints").await["endpoints"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // A file grown past any config's size is refused unread (review: reloads read it whole).
    write(&path, &format!("{text}#{}\n", "x".repeat(17 * 1024 * 1024)));
    let r = reload(&gw).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("larger than 16 MiB"), "{}", r.text());

    // A valid reload that adds an endpoint: `a` is still ejected, with the same episode.
    let c = MockUpstream::start().await;
    write(
        &path,
        &format!("{text}{}", endpoint("c", &c.url(), "priority = 3")),
    );
    assert_eq!(reload(&gw).await.status, 200);
    let q = gw.admin("failure-queue").await;
    assert_eq!(q["size"], 1);
    assert_eq!(q["entries"][0]["name"], "a");
    assert_eq!(
        q["stats"]["total_failed"], 1,
        "the same episode, not a new one"
    );
    assert_eq!(gw.endpoint_view("a").await["state"], "ejected");
    assert_eq!(
        gw.post("/v1/messages", &[], &TestGateway::message_body(false))
            .await
            .header("x-ccgate-endpoint"),
        Some("b")
    );
    assert_eq!(
        a.count(),
        1,
        "an ejected endpoint stays out after the reload"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_a_config_file_is_refused() {
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let r = reload(&gw).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let get = gw
        .request(Method::GET, "/_ccgate/reload", &[], Bytes::new())
        .await;
    assert_eq!(get.status, 405);
    gw.shutdown().await;
}

/// The real binary, in a sandbox (temporary HOME and XDG dirs, `support/process.rs`): SIGHUP
/// rereads its config file, and the gateway keeps running.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let sb = process::Sandbox::new();
    let head = "[server]\nlisten = \"127.0.0.1:0\"\n";
    // Owner-only, as the gateway wants a file that holds credentials.
    let path = sb.write(
        "config.toml",
        &format!("{head}{}", endpoint("a", &a.url(), "")),
    );
    let mut cmd = sb.command(&["serve", "--config", path.to_str().expect("utf-8 path")]);
    cmd.env("RUST_LOG", "warn");
    let mut serving = process::start(cmd).await;
    let addr = serving.addr;
    let names = || async move {
        let v = process::get(addr, "/_ccgate/endpoints", &[]).await.json();
        v["endpoints"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|e| e["name"].as_str().unwrap_or("?").to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(names().await, ["a"]);
    sb.write(
        "config.toml",
        &format!(
            "{head}{}{}",
            endpoint("a", &a.url(), ""),
            endpoint("b", &b.url(), "")
        ),
    );
    serving.signal("HUP");
    // The reload happens in the background: poll the view, with a deadline.
    support::wait::eventually_ok("SIGHUP to reload the config", || async {
        let now = names().await;
        if now == ["a", "b"] {
            Ok(())
        } else {
            Err(format!("endpoints {now:?}"))
        }
    })
    .await;
    assert!(
        serving.is_running(),
        "SIGHUP must not stop the gateway\nstderr:\n{}",
        serving.stderr_now()
    );
    serving.stop().await;
}

/// A reload that changes one endpoint (its weight) keeps every session where it was, on that
/// endpoint and on the others (audit: any change dropped every binding, and sessions on
/// untouched endpoints lost their prompt cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_one_endpoint_keeps_the_sessions() {
    let ups = [
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    ];
    let text = |weight: u32| {
        let mut t = "[server]\nlisten = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\n".to_owned();
        for (i, up) in ups.iter().enumerate() {
            let extra = if i == 2 {
                format!("weight = {weight}")
            } else {
                String::new()
            };
            t.push_str(&endpoint(&format!("e{i}"), &up.url(), &extra));
        }
        t
    };
    let (_dir, path, gw) = start_from_file(&text(100)).await;
    // e2 has left rotation once before its sessions bind (review: the endpoint the reload
    // rebuilt counted its leaves from 0 again, so its sessions counted as lost and moved).
    for action in ["disable", "enable"] {
        let path = format!("/_ccgate/endpoints/e2/{action}");
        let r = gw.request(Method::POST, &path, &[], Bytes::new()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let body = TestGateway::message_body(false);
    let mut bound = Vec::new();
    for i in 0..12 {
        bound.push(served(&gw, &format!("session-{i}"), &body).await);
    }
    write(&path, &text(300));
    let r = reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("e2"), "e2 changed: {}", r.text());
    // One request without a session first: round robin's turn moves on, so a session that had
    // lost its binding would land elsewhere.
    let a = gw.post("/v1/messages", &[], &body).await;
    assert_eq!(a.status, 200, "{}", a.text());
    for (i, was) in bound.iter().enumerate() {
        assert_eq!(
            &served(&gw, &format!("session-{i}"), &body).await,
            was,
            "session-{i} moved"
        );
    }
}

/// A reload that removes one endpoint (and so renumbers the ones after it) keeps every other
/// session on its endpoint; the removed endpoint's sessions move (audit: removing the first
/// endpoint moved every session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_an_endpoint_keeps_the_other_sessions() {
    let ups = [
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    ];
    let text = |from: usize| {
        let mut t = "[server]\nlisten = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\n".to_owned();
        for (i, up) in ups.iter().enumerate().skip(from) {
            t.push_str(&endpoint(&format!("e{i}"), &up.url(), ""));
        }
        t
    };
    let (_dir, path, gw) = start_from_file(&text(0)).await;
    // e2 has left rotation once before its sessions bind (review: the endpoint the reload
    // rebuilt counted its leaves from 0 again, so its sessions counted as lost and moved).
    for action in ["disable", "enable"] {
        let path = format!("/_ccgate/endpoints/e2/{action}");
        let r = gw.request(Method::POST, &path, &[], Bytes::new()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let body = TestGateway::message_body(false);
    let mut bound = Vec::new();
    for i in 0..12 {
        bound.push(served(&gw, &format!("session-{i}"), &body).await);
    }
    assert!(bound.iter().any(|e| e == "e0"), "{bound:?}");
    write(&path, &text(1));
    let r = reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["removed"],
        serde_json::json!(["e0"]),
        "{}",
        r.text()
    );
    let a = gw.post("/v1/messages", &[], &body).await;
    assert_eq!(a.status, 200, "{}", a.text());
    for (i, was) in bound.iter().enumerate() {
        let now = served(&gw, &format!("session-{i}"), &body).await;
        if was == "e0" {
            assert_ne!(now, "e0");
        } else {
            assert_eq!(&now, was, "session-{i} moved");
        }
    }
}

/// The endpoint that served `session`'s request.
async fn served(gw: &TestGateway, session: &str, body: &serde_json::Value) -> String {
    let a = gw
        .post(
            "/v1/messages",
            &[("x-claude-code-session-id", session)],
            body,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.header("x-ccgate-endpoint").expect("endpoint").to_owned()
}

/// A reload cannot take the access token away from a gateway listening beyond loopback, even
/// when the file's own `listen` (applied only at restart) is loopback (audit: the token was
/// dropped and the gateway served anyone). Settings only a restart applies are named in the
/// reload's answer instead of being dropped silently; new connection settings reach kept
/// endpoints (new pools).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_token_beyond_loopback_and_names_what_needs_a_restart() {
    let a = MockUpstream::start().await;
    let tail = format!(
        "[storage]\nenabled = false\n{}",
        endpoint("a", &a.url(), "")
    );
    // `::ffff:127.0.0.1` is not a loopback address to the check, yet stays on this machine.
    let first =
        format!("[server]\nlisten = \"[::ffff:127.0.0.1]:0\"\naccess_token = \"tok-1234\"\n{tail}");
    let (_dir, path, gw) = start_from_file(&first).await;
    let token = [("x-ccgate-token", "tok-1234")];
    let body = TestGateway::message_body(false);

    // Without the token line, with or without a loopback `listen`: refused, the token stays.
    for listen in ["[::ffff:127.0.0.1]:0", "127.0.0.1:0"] {
        write(&path, &format!("[server]\nlisten = \"{listen}\"\n{tail}"));
        let r = gw
            .request(Method::POST, "/_ccgate/reload", &token, Bytes::new())
            .await;
        assert_eq!(r.status, 400, "{listen}: {}", r.text());
        assert!(r.text().contains("not a loopback address"), "{}", r.text());
        assert_eq!(gw.post("/v1/messages", &[], &body).await.status, 401);
    }

    // With the token, a new `listen` and `workers`: reloaded, and both named as needing a
    // restart; a new connect timeout gives the kept endpoint a new pool.
    assert_eq!(gw.post("/v1/messages", &token, &body).await.status, 200);
    let client = || gw.handle.current().registry.endpoints[0].client.clone();
    let before = client();
    write(
        &path,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 7\naccess_token = \"tok-1234\"\n[timeouts]\nconnect = \"3s\"\n{tail}"
        ),
    );
    let r = gw
        .request(Method::POST, "/_ccgate/reload", &token, Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["kept"], serde_json::json!(["a"]), "{v}");
    let needed = v["restart_needed"].to_string();
    assert!(needed.contains("server.listen"), "{v}");
    assert!(needed.contains("server.workers"), "{v}");
    assert_eq!(gw.post("/v1/messages", &token, &body).await.status, 200);
    let after = client();
    assert!(!after.shares_pools(&before), "a new pool");

    // The same file again: the same two still wait for a restart, and the pool is kept.
    let r = gw
        .request(Method::POST, "/_ccgate/reload", &token, Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["restart_needed"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(gw.post("/v1/messages", &token, &body).await.status, 200);
    assert!(client().shares_pools(&after), "the pool kept");
    gw.shutdown().await;
}

/// Reloads while a recovery probe runs do not start probe after probe: the cut probe's time is
/// kept, and the next one waits for it (audit: five reloads made six probes at once upstream,
/// and a slow endpoint never finished one while reloads came every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_during_a_probe_do_not_start_new_ones() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[health]\nfailure_threshold = 1\nprobe_interval = \"10ms\"\nprobe_timeout = \"30s\"\n{}{}",
        endpoint("a", &a.url(), "priority = 1"),
        endpoint("b", &b.url(), "priority = 2")
    );
    let (_dir, _path, gw) = start_from_file(&text).await;
    a.push(Script::error(500, "api_error", "boom"));
    a.set_default(Script::stall_before_headers());
    let r = gw
        .post("/v1/messages", &[], &TestGateway::message_body(false))
        .await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"));
    // The first probe is under way (and stalls).
    a.wait_requests(2).await;
    for _ in 0..5 {
        let r = reload(&gw).await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The entry's next probe waits for the cut one's time (30 s), so no prober starts one.
        let q = gw.admin("failure-queue").await;
        let next = q["entries"][0]["next_probe_at"]
            .as_str()
            .expect("next_probe_at");
        let next = humantime::parse_rfc3339_weak(next).expect("a time");
        let ahead = next
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        assert!(ahead > std::time::Duration::from_secs(20), "{q}");
    }
    assert_eq!(a.count(), 2, "one request and one probe");
    gw.shutdown().await;
}

/// A gateway whose address came from the command line (`serve --listen`, a session gateway)
/// never applies the file's `listen`: a reload does not report it as waiting for a restart
/// (audit: every reload warned about it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_given_on_the_command_line_is_not_reported_at_reload() {
    let a = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:7999\"\n[storage]\nenabled = false\n{}",
        endpoint("a", &a.url(), "")
    );
    write(&path, &text);
    let mut config = Config::from_toml(&text, "test", &|_: &str| None).expect("config");
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.listen_overridden = true;
    let gw = TestGateway::start_with_source(config, Some(path.clone())).await;
    let r = reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("restart_needed").is_none(), "{}", r.text());
    gw.shutdown().await;
}

/// An attempt begun before a reload that ejects its endpoint after it (through the previous
/// gateway's queue) gets the endpoint its failure-queue entry at once, not at the prober's next
/// planned round (audit: up to a minute later, and in cluster mode never published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_through_the_previous_queue_is_queued_at_once() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[health]\nfailure_threshold = 1\nprobe_interval = \"1h\"\n{}{}",
        endpoint("a", &a.url(), "priority = 1"),
        endpoint("b", &b.url(), "priority = 2")
    );
    let (_dir, _path, gw) = start_from_file(&text).await;
    let gw = std::sync::Arc::new(gw);
    a.push(
        Script::error(500, "api_error", "boom")
            .delay_before_headers(std::time::Duration::from_millis(300)),
    );
    let in_flight = {
        let gw = std::sync::Arc::clone(&gw);
        tokio::spawn(async move {
            gw.post("/v1/messages", &[], &TestGateway::message_body(false))
                .await
        })
    };
    a.wait_requests(1).await;
    let r = reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = in_flight.await.expect("request");
    assert_eq!(answer.header("x-ccgate-endpoint"), Some("b"));
    support::wait::eventually("a in the failure queue", || async {
        let q = gw.admin("failure-queue").await;
        q["size"] == 1 && q["entries"][0]["name"] == "a"
    })
    .await;
}
