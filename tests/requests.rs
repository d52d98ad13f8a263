//! Recent requests (#16 item 7) through the real binary: `GET /_ccgate/requests` shows the last
//! requests (bounded by `[requests] ring_size`) with their endpoint, attempts, status, outcome,
//! latencies and tokens, never a body or a credential; `ccgate requests` prints them and
//! `--follow` prints new ones as they come until Ctrl-C; with storage on, the `requests` table
//! holds them after shutdown.
#![cfg(unix)]

#[path = "support/process.rs"]
mod process;
mod support;

use std::process::Command;

use serde_json::{Value, json};

use support::mock::{MockUpstream, Script};
use support::wait; // `wait` for `support/process.rs`

const KEY: &str = "sk-test-requests-secret";

fn answer(input: u64, read: u64) -> Script {
    Script::json(
        200,
        &json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hello"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 7,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": read},
        }),
    )
}

#[tokio::test]
async fn recent_requests_view_cli_follow_and_table() {
    let up = MockUpstream::start().await;
    let bad = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\nflush_interval = \"50ms\"\n\n[requests]\nring_size = 2\n\n\
         [[endpoints]]\nname = \"broken\"\nbase_url = \"{}\"\napi_key = \"{KEY}\"\npriority = 1\n\n\
         [[endpoints]]\nname = \"main\"\nbase_url = \"{}\"\napi_key = \"{KEY}\"\npriority = 2\n",
        bad.url(),
        up.url()
    );
    sb.write_at(&sb.default_config(), &text);
    let serving = process::start(sb.command(&["serve"])).await;

    // The first fails over from `broken` (a 500) to `main`; the next two go to `broken`, which
    // answers them.
    bad.push(Script::error(500, "api_error", "boom"));
    up.push(answer(100, 900));
    bad.push(answer(5, 0));
    bad.push(answer(6, 0));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = process::post_message(serving.addr, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        ids.push(
            r.header("x-ccgate-request-id")
                .expect("request id")
                .to_string(),
        );
    }

    // The ring keeps two: the newest first.
    let v = process::get(serving.addr, "/_ccgate/requests?limit=10", &[])
        .await
        .json();
    let list = v["requests"].as_array().expect("requests");
    assert_eq!(list.len(), 2, "{v}");
    assert_eq!(list[0]["request_id"], ids[2].as_str(), "{v}");
    assert_eq!(list[1]["request_id"], ids[1].as_str(), "{v}");
    let r = &list[0];
    assert_eq!(r["method"], "POST");
    assert_eq!(r["path"], "/v1/messages");
    assert_eq!(r["model"], "claude-sonnet-4-5");
    assert_eq!(r["endpoint"], "broken");
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["status"], 200);
    assert_eq!(r["outcome"], "success");
    assert_eq!(r["input_tokens"], 6);
    assert_eq!(r["output_tokens"], 7);
    assert!(
        r["first_byte_ms"].as_f64().expect("first byte") <= r["total_ms"].as_f64().expect("total"),
        "{r}"
    );
    assert!(
        !v.to_string().contains(KEY) && !v.to_string().contains("hello"),
        "{v}"
    );
    let one = process::get(serving.addr, "/_ccgate/requests?limit=1", &[])
        .await
        .json();
    assert_eq!(one["requests"].as_array().map(Vec::len), Some(1), "{one}");

    // `ccgate requests` prints them.
    let f = process::run(sb.command(&["requests", "--url", &serving.url()])).await;
    f.assert_success();
    assert!(f.stdout.contains("REQUEST ID"), "{}", f.output());
    assert!(
        f.stdout.contains(&ids[2]) && f.stdout.contains(&ids[1]),
        "{}",
        f.output()
    );
    assert!(f.stdout.contains("6/7/0/0"), "{}", f.output());

    // `--follow`: the last one first, then each new request as it comes; Ctrl-C ends it.
    let mut follow = process::Proc::spawn(sb.command(&[
        "requests",
        "--url",
        &serving.url(),
        "--follow",
        "--json",
        "-n",
        "1",
        "--interval",
        "20ms",
    ]));
    let first: Value =
        serde_json::from_str(&follow.next_line().await.expect("a line")).expect("json");
    assert_eq!(first["request_id"], ids[2].as_str());
    up.push(answer(1, 2));
    bad.push(Script::error(500, "api_error", "boom"));
    let r = process::post_message(serving.addr, &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r
        .header("x-ccgate-request-id")
        .expect("request id")
        .to_string();
    let next: Value =
        serde_json::from_str(&follow.next_line().await.expect("a line")).expect("json");
    assert_eq!(next["request_id"], id.as_str(), "{next}");
    assert_eq!(
        (next["endpoint"].as_str(), next["attempts"].as_u64()),
        (Some("main"), Some(2)),
        "{next}"
    );
    assert_eq!(next["cache_read_input_tokens"], 2, "{next}");
    let status = Command::new("kill")
        .arg("-INT")
        .arg(follow.pid().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let f = follow.finish().await;
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    serving.stop().await;

    // With storage on, every request is in the table (the ring's bound does not apply there).
    let db = sb.path("xdg-data").join("ccgate").join("ccgate.db");
    let stored = stored_requests(&db);
    assert_eq!(stored.len(), 4, "{stored:?}");
    let mut all = ids.clone();
    all.push(id);
    assert_eq!(stored.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), all);
    assert_eq!(stored[0].1, "main");
    assert_eq!(stored[0].2, 2);
}

/// (request id, endpoint, attempts) of every stored request, oldest first.
fn stored_requests(db: &std::path::Path) -> Vec<(String, String, i64)> {
    ccgate::store::read_requests(db, 1000)
        .expect("read the requests table")
        .into_iter()
        .map(|r| {
            (
                r.request_id,
                r.endpoint.unwrap_or_default(),
                i64::from(r.attempts),
            )
        })
        .collect()
}

/// An answer of ccgate's own given without trying an endpoint is recorded with the status the
/// client got: a model no endpoint serves (404), a body over `max_body_bytes` (413).
#[tokio::test]
async fn local_answers_are_recorded_with_their_status() {
    let up = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 4096\n\n\
         [[endpoints]]\nname = \"opus\"\nbase_url = \"{}\"\napi_key = \"{KEY}\"\nmodels = [\"claude-opus-*\"]\n",
        up.url()
    );
    sb.write_at(&sb.default_config(), &text);
    let serving = process::start(sb.command(&["serve"])).await;
    let unserved = json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []});
    let huge =
        json!({"model": "claude-opus-4", "max_tokens": 5, "messages": [], "pad": "x".repeat(8192)});
    let mut want = Vec::new();
    for (body, status) in [(unserved, 404), (huge, 413)] {
        let r = process::call(
            serving.addr,
            http::Method::POST,
            "/v1/messages",
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await;
        assert_eq!(r.status, status, "{}", r.body);
        want.push(u64::from(status));
    }
    let v = process::get(serving.addr, "/_ccgate/requests?limit=10", &[])
        .await
        .json();
    let list = v["requests"].as_array().expect("requests");
    let got: Vec<u64> = list
        .iter()
        .rev()
        .filter_map(|r| r["status"].as_u64())
        .collect();
    assert_eq!(got, want, "{v}");
    for r in list {
        assert!(r["endpoint"].is_null() && r["attempts"] == 0, "{r}");
        assert_eq!(r["outcome"], "caller_error", "{r}");
    }
    assert_eq!(up.count(), 0, "no endpoint was tried");
    serving.stop().await;
}

/// `--follow` across a restart of the gateway: it waits while the gateway is away, and then prints
/// every request the new process has seen, although the new sequence passed the old one before
/// the next poll (audit: those below the old sequence number were skipped).
#[tokio::test]
async fn follow_prints_every_request_after_a_restart() {
    let up = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    let config = |listen: &str| {
        format!(
            "[server]\nlisten = \"{listen}\"\n\n[[endpoints]]\nname = \"main\"\nbase_url = \"{}\"\napi_key = \"{KEY}\"\n",
            up.url()
        )
    };
    sb.write_at(&sb.default_config(), &config("127.0.0.1:0"));
    let first = process::start(sb.command(&["serve"])).await;
    let addr = first.addr;
    let post = || async move {
        let r = process::post_message(addr, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.header("x-ccgate-request-id")
            .expect("request id")
            .to_string()
    };
    for _ in 0..3 {
        post().await;
    }
    let url = first.url();
    let mut follow = process::Proc::spawn(sb.command(&[
        "requests",
        "--url",
        &url,
        "--follow",
        "--json",
        "-n",
        "1",
        "--interval",
        "50ms",
    ]));
    let line: Value =
        serde_json::from_str(&follow.next_line().await.expect("a line")).expect("json");
    assert_eq!(line["seq"], 3, "{line}");

    // Held still while the gateway restarts on the same address and serves five requests: its
    // next poll finds a sequence already past the one it followed.
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(follow.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig}");
    };
    signal("STOP");
    first.stop().await;
    sb.write_at(&sb.default_config(), &config(&addr.to_string()));
    let second = process::start(sb.command(&["serve"])).await;
    assert_eq!(second.addr, addr);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(post().await);
    }
    signal("CONT");
    for want in &ids {
        let line: Value =
            serde_json::from_str(&follow.next_line().await.expect("a line")).expect("json");
        assert_eq!(line["request_id"], want.as_str(), "{line}");
    }

    // The gateway away: `--follow` says so once and keeps trying; back, it goes on.
    second.stop().await;
    follow.stderr_until("still trying").await;
    let third = process::start(sb.command(&["serve"])).await;
    let id = post().await;
    let line: Value =
        serde_json::from_str(&follow.next_line().await.expect("a line")).expect("json");
    assert_eq!(line["request_id"], id.as_str(), "{line}");

    let ok = Command::new("kill")
        .arg("-INT")
        .arg(follow.pid().to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    let f = follow.finish().await;
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    third.stop().await;
}
