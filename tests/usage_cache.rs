//! Prompt-cache visibility (#16 item 4) through the real binary: answers carrying `usage` with
//! cache reads and writes show up exactly, per endpoint and model, in `/_ccgate/endpoints`,
//! `/metrics` and `ccgate status`; after the run `ccgate usage` shows the hit rate and the cost
//! from the built-in prices, then from a `[prices]` table that overrides them.
#![cfg(unix)]

#[path = "support/process.rs"]
mod process;
mod support;

use serde_json::{Value, json};

use support::mock::{MockUpstream, Script, SseEvent};
use support::wait; // `wait` for `support/process.rs`

const SONNET: &str = "claude-sonnet-4-5";
const HAIKU: &str = "claude-haiku-4-5";

/// A JSON Messages answer from `model` with these token counts.
fn json_answer(model: &str, input: u64, output: u64, write: u64, read: u64) -> Script {
    Script::json(
        200,
        &json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output,
                      "cache_creation_input_tokens": write, "cache_read_input_tokens": read},
        }),
    )
}

/// A streamed answer from `model`: the cache figures in `message_start`, the output at the end.
fn sse_answer(model: &str, input: u64, output: u64, write: u64, read: u64) -> Script {
    let mut events = SseEvent::message_stream(1);
    events[0] = SseEvent::new(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": "msg_2", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1,
                      "cache_creation_input_tokens": write, "cache_read_input_tokens": read}}}),
    );
    let n = events.len();
    events[n - 2] = SseEvent::new(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": output}}),
    );
    Script::sse_events(events)
}

fn write_config(sb: &process::Sandbox, upstream: &str, extra: &str) {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\nflush_interval = \"100ms\"\n\n{extra}\n\n[[endpoints]]\nname = \"main\"\nbase_url = \"{upstream}\"\napi_key = \"sk-test-cache\"\n"
    );
    sb.write_at(&sb.default_config(), &text);
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[tokio::test]
async fn cache_figures_live_and_per_day_with_costs() {
    let up = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    write_config(&sb, &up.url(), "");
    let serving = process::start(sb.command(&["serve"])).await;
    up.push(json_answer(SONNET, 100, 50, 1000, 3000));
    up.push(json_answer(HAIKU, 1000, 100, 0, 0));
    up.push(sse_answer(SONNET, 10, 20, 0, 4000));
    for stream in [None, None, Some(true)] {
        let r = process::post_message_to(serving.addr, "/v1/messages", &[], stream).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    // Live: the endpoint view has the exact sums, in total and per model.
    let v = process::endpoint_view(serving.addr, "main").await;
    let c = &v["cache"];
    assert_eq!(c["requests"], 3, "{c}");
    assert_eq!(c["input_tokens"], 1110, "{c}");
    assert_eq!(c["output_tokens"], 170, "{c}");
    assert_eq!(c["cache_creation_input_tokens"], 1000, "{c}");
    assert_eq!(c["cache_read_input_tokens"], 7000, "{c}");
    assert!(
        close(c["hit_rate"].as_f64().expect("rate"), 7000.0 / 9110.0),
        "{c}"
    );
    let s = &c["models"][SONNET];
    assert_eq!(
        [
            &s["requests"],
            &s["input_tokens"],
            &s["output_tokens"],
            &s["cache_creation_input_tokens"],
            &s["cache_read_input_tokens"]
        ],
        [2, 110, 70, 1000, 7000].map(Value::from).each_ref(),
        "{c}"
    );
    assert!(
        close(s["hit_rate"].as_f64().expect("rate"), 7000.0 / 8110.0),
        "{c}"
    );
    assert_eq!(c["models"][HAIKU]["hit_rate"], 0.0, "{c}");

    let m = process::get(serving.addr, "/_ccgate/metrics", &[])
        .await
        .body;
    for line in [
        format!(
            "ccgate_tokens_total{{endpoint=\"main\",model=\"{SONNET}\",kind=\"cache_read\"}} 7000"
        ),
        format!(
            "ccgate_tokens_total{{endpoint=\"main\",model=\"{SONNET}\",kind=\"cache_creation\"}} 1000"
        ),
        format!("ccgate_tokens_total{{endpoint=\"main\",model=\"{SONNET}\",kind=\"input\"}} 110"),
        format!("ccgate_tokens_total{{endpoint=\"main\",model=\"{HAIKU}\",kind=\"output\"}} 100"),
        format!("ccgate_usage_answers_total{{endpoint=\"main\",model=\"{SONNET}\"}} 2"),
    ] {
        assert!(m.lines().any(|l| l == line), "no `{line}` in\n{m}");
    }

    let f = process::run(sb.command(&["status", "--url", &serving.url()])).await;
    f.assert_success();
    assert!(f.stdout.contains("CACHE HIT"), "{}", f.output());
    assert!(f.stdout.contains("76.8% of 9110"), "{}", f.output());
    serving.stop().await;

    // Per day, with costs from the built-in list prices.
    let f = process::run(sb.command(&["usage", "--json"])).await;
    f.assert_success();
    let u: Value = serde_json::from_str(&f.stdout).expect("usage --json prints JSON");
    let rows = u["rows"].as_array().expect("rows");
    let row = |model: &str| {
        rows.iter()
            .find(|r| r["model"] == model)
            .unwrap_or_else(|| panic!("no {model} row in {u}"))
    };
    let sonnet_cost = (110.0 * 3.0 + 70.0 * 15.0 + 1000.0 * 3.75 + 7000.0 * 0.3) / 1e6;
    let haiku_cost = (1000.0 * 1.0 + 100.0 * 5.0) / 1e6;
    assert!(
        close(row(SONNET)["cost_usd"].as_f64().expect("cost"), sonnet_cost),
        "{u}"
    );
    assert!(
        close(row(HAIKU)["cost_usd"].as_f64().expect("cost"), haiku_cost),
        "{u}"
    );
    assert!(
        close(
            row(SONNET)["cache_hit_rate"].as_f64().expect("rate"),
            7000.0 / 8110.0
        ),
        "{u}"
    );
    assert!(
        close(
            u["total"]["cost_usd"].as_f64().expect("cost"),
            sonnet_cost + haiku_cost
        ),
        "{u}"
    );
    assert_eq!(u["total"]["cost_complete"], true, "{u}");
    let f = process::run(sb.command(&["usage"])).await;
    f.assert_success();
    let line = f
        .stdout
        .lines()
        .find(|l| l.contains(SONNET))
        .unwrap_or_else(|| panic!("no sonnet row\n{}", f.output()));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cells[1..],
        [
            "main", SONNET, "2", "110", "70", "1000", "7000", "86.3%", "$0.0072"
        ],
        "{}",
        f.output()
    );
    let total = f
        .stdout
        .lines()
        .find(|l| l.starts_with("total"))
        .expect("total row");
    assert!(total.ends_with("$0.0087"), "{}", f.output());

    // A `[prices]` table overrides the defaults: a glob for sonnet, an exact name for haiku
    // (its cache prices derived from its input price).
    write_config(
        &sb,
        &up.url(),
        "[prices.\"claude-sonnet-*\"]\ninput = 10\noutput = 20\ncache_write = 1\ncache_read = 2\n\n[prices.\"claude-haiku-4-5\"]\ninput = 2.0\noutput = 4.0\n",
    );
    let f = process::run(sb.command(&["usage", "--json"])).await;
    f.assert_success();
    let u: Value = serde_json::from_str(&f.stdout).expect("usage --json prints JSON");
    let rows = u["rows"].as_array().expect("rows");
    let cost = |model: &str| {
        rows.iter()
            .find(|r| r["model"] == model)
            .and_then(|r| r["cost_usd"].as_f64())
            .unwrap_or_else(|| panic!("no {model} cost in {u}"))
    };
    let sonnet_cost = (110.0 * 10.0 + 70.0 * 20.0 + 1000.0 * 1.0 + 7000.0 * 2.0) / 1e6;
    let haiku_cost = (1000.0 * 2.0 + 100.0 * 4.0) / 1e6;
    assert!(close(cost(SONNET), sonnet_cost), "{u}");
    assert!(close(cost(HAIKU), haiku_cost), "{u}");
    assert!(
        close(
            u["total"]["cost_usd"].as_f64().expect("cost"),
            sonnet_cost + haiku_cost
        ),
        "{u}"
    );
}

/// Writes to the 1-hour cache and server-side web searches are kept in the ledger, from JSON
/// answers and from streams (whose `message_delta` repeats the cumulative counts), and priced
/// apart: 2× input per 1-hour write, $10 per 1,000 searches (audit: every write was priced as a
/// 5-minute one, and searches not at all).
#[tokio::test]
async fn hour_cache_writes_and_web_searches_are_priced() {
    let up = MockUpstream::start().await;
    let sb = process::Sandbox::new();
    write_config(&sb, &up.url(), "");
    let serving = process::start(sb.command(&["serve"])).await;
    let usage = json!({"input_tokens": 100, "output_tokens": 50,
        "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
        "server_tool_use": {"web_search_requests": 3}});
    up.push(Script::json(
        200,
        &json!({"id": "msg_1", "type": "message", "role": "assistant", "model": SONNET,
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
            "usage": usage}),
    ));
    let mut events = SseEvent::message_stream(1);
    events[0] = SseEvent::new(
        "message_start",
        &json!({"type": "message_start", "message": {"id": "msg_2", "type": "message",
            "role": "assistant", "model": SONNET, "content": [], "usage": usage}}),
    );
    let n = events.len();
    let mut last = usage.clone();
    last["server_tool_use"]["web_search_requests"] = json!(5);
    events[n - 2] = SseEvent::new(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": last}),
    );
    up.push(Script::sse_events(events));
    for stream in [None, Some(true)] {
        let r = process::post_message_to(serving.addr, "/v1/messages", &[], stream).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    serving.stop().await;

    let f = process::run(sb.command(&["usage", "--json"])).await;
    f.assert_success();
    let u: Value = serde_json::from_str(&f.stdout).expect("usage --json prints JSON");
    let t = &u["total"];
    assert_eq!(t["cache_creation_input_tokens"], 2000, "{u}");
    assert_eq!(t["cache_creation_1h_input_tokens"], 1200, "{u}");
    assert_eq!(t["web_search_requests"], 3 + 5, "{u}");
    let want = (200.0 * 3.0 + 100.0 * 15.0 + 800.0 * 3.75 + 1200.0 * 6.0) / 1e6 + 8.0 * 0.01;
    assert!(close(t["cost_usd"].as_f64().expect("cost"), want), "{u}");
}
