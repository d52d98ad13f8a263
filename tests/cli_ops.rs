//! End-to-end tests of the operator commands through the real binary: `endpoints
//! list|add|remove|enable|disable` (format-preserving edits, refused invalid edits, applying a
//! change to a running gateway), `status`, `check`, `claude enable|disable`, `completions`, and
//! `serve --log-format json`.
//!
//! Every child runs with a cleared environment and a temporary HOME and XDG directories
//! (`support/process.rs`); gateways listen on port 0 and are found through their `listening on`
//! line; upstreams are the in-process mock.
#![cfg(unix)]

#[path = "support/mock.rs"]
mod mock;
#[path = "support/port.rs"]
mod port;
#[path = "support/process.rs"]
mod process;
#[path = "support/wait.rs"]
mod wait;

use std::path::Path;

use serde_json::Value;

use mock::{MockUpstream, Script};
use port::ClosedPort;
use process::{
    Finished, Sandbox, config, endpoint_entry, get, mode_of, post_message, run, run_with_stdin,
    start,
};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn cfg_arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The stdout line of a table that starts with `name` (followed by spaces).
#[track_caller]
fn row<'a>(f: &'a Finished, name: &str) -> &'a str {
    f.stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for `{name}`\n{}", f.output()))
}

/// `ccgate endpoints ARGS --config CONFIG --url URL`, which must succeed and say that the change
/// reached the running gateway.
async fn endpoints_applied(sb: &Sandbox, args: &[&str], config: &str, url: &str) -> Finished {
    let mut full = vec!["endpoints"];
    full.extend(args);
    full.extend(["--config", config, "--url", url]);
    let f = run(sb.command(&full)).await;
    f.assert_success();
    assert!(
        f.stdout.contains("applied to the running gateway"),
        "{args:?}\n{}",
        f.output()
    );
    f
}

/// Whole flow as a new user would run it: init → endpoints add → list → serve → status → check →
/// claude enable → claude disable, with secrets never printed.
#[tokio::test]
async fn operator_flow_from_init_to_claude_disable() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let sb = Sandbox::new();
    let (key_a, token_b) = ("sk-ant-flow-A7q2x", "relay-token-Z9k4w");
    let mut outputs = Vec::new();

    let f = run(sb.command(&[
        "init",
        "--name",
        "a",
        "--base-url",
        &up_a.url(),
        "--api-key",
        key_a,
    ]))
    .await;
    f.assert_success();
    outputs.push(f);
    let cfg = sb.default_config();
    // The user's own touches: any free port (tests never use a fixed one) and notes of their own.
    let edited = read(&cfg).replace(
        "listen = \"127.0.0.1:7860\"",
        "listen = \"127.0.0.1:0\"   # any free port",
    ) + "# my own note at the very end\n";
    sb.write_at(&cfg, &edited);
    let before = read(&cfg);

    let f = run(sb.command(&[
        "endpoints",
        "add",
        "b",
        "--base-url",
        &up_b.url(),
        "--auth-token",
        token_b,
        "--priority",
        "2",
    ]))
    .await;
    f.assert_success();
    assert!(f.stdout.contains("added endpoint `b`"), "{}", f.output());
    assert!(f.stdout.contains("port 0"), "{}", f.output());
    outputs.push(f);
    let after = read(&cfg);
    let block = format!(
        "\n[[endpoints]]\nname = \"b\"\nbase_url = \"{}\"\nauth_token = \"{token_b}\"\npriority = 2\n",
        up_b.url()
    );
    assert!(after.contains(&block), "{after}");
    // Everything outside the new block, comments included, is byte for byte what it was.
    assert_eq!(after.replacen(&block, "", 1), before);
    assert_eq!(mode_of(&cfg), 0o600);

    let f = run(sb.command(&["endpoints", "list"])).await;
    f.assert_success();
    assert!(row(&f, "a").contains("api_key"), "{}", f.output());
    assert!(row(&f, "b").contains("auth_token"), "{}", f.output());
    assert!(row(&f, "b").contains(&up_b.url()), "{}", f.output());
    outputs.push(f);

    let gw = start(sb.command(&["serve"])).await;
    for _ in 0..2 {
        let a = post_message(gw.addr, &[("x-api-key", "client-own")]).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    }

    // The config listens on port 0, so status must be told where the gateway is.
    let f = run(sb.command(&["status"])).await;
    f.assert_failure();
    assert!(f.stderr.contains("--url"), "{}", f.output());
    let f = run(sb.command(&["status", "--url", &gw.url()])).await;
    f.assert_success();
    let a = row(&f, "a");
    assert!(
        a.contains("healthy") && a.contains("100.0%"),
        "{}",
        f.output()
    );
    let cols: Vec<&str> = a.split_whitespace().collect();
    // REQUESTS, ENDPOINT ERRORS, CALLER ERRORS.
    assert_eq!(cols[cols.len() - 3..], ["2", "0", "0"], "{}", f.output());
    assert!(row(&f, "b").contains("healthy"), "{}", f.output());
    assert!(f.stdout.contains("failure queue: empty"), "{}", f.output());
    assert!(f.stdout.contains("totals: 2 requests"), "{}", f.output());
    outputs.push(f);

    let f = run(sb.command(&["check"])).await;
    f.assert_success();
    assert!(row(&f, "a").contains(" ok "), "{}", f.output());
    assert!(row(&f, "b").contains(" ok "), "{}", f.output());
    assert!(
        f.stdout.contains("2 of 2 enabled endpoints work"),
        "{}",
        f.output()
    );
    outputs.push(f);

    // Claude Code's settings, deliberately not in serde_json's formatting, so that only a true
    // byte-for-byte restore passes.
    let settings = sb.claude_settings();
    let original = "{\n    \"model\": \"opus\",\n    \"env\": { \"DISABLE_TELEMETRY\": \"1\" },\n    \"permissions\": {\"allow\": [\"Bash(git diff:*)\"]},\n    \"statusLine\": {\"type\": \"command\", \"command\": \"echo hi\"}\n}\n";
    sb.write_at(&settings, original);
    let f = run(sb.command(&["claude", "enable", "--url", &gw.url()])).await;
    f.assert_success();
    outputs.push(f);
    let v: Value = serde_json::from_str(&read(&settings)).expect("settings are JSON");
    let keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["model", "env", "permissions", "statusLine"]);
    assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], gw.url());
    assert_eq!(v["env"]["DISABLE_TELEMETRY"], "1");
    // No access token on this gateway: Claude Code keeps its own credential.
    assert!(v["env"].get("ANTHROPIC_AUTH_TOKEN").is_none(), "{v}");
    assert_eq!(v["permissions"]["allow"][0], "Bash(git diff:*)");
    assert_eq!(v["statusLine"]["command"], "echo hi");
    // What Claude Code would now talk to answers.
    let base = v["env"]["ANTHROPIC_BASE_URL"].as_str().expect("string");
    let addr = base
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    assert_eq!(get(addr, "/_ccgate/health", &[]).await.status, 200);

    let f = run(sb.command(&["claude", "disable"])).await;
    f.assert_success();
    outputs.push(f);
    assert_eq!(
        read(&settings),
        original,
        "not byte-identical after disable"
    );
    let dir = settings.parent().expect("dir");
    assert!(!dir.join("settings.json.ccgate-backup").exists());
    assert!(!dir.join("settings.json.ccgate-record").exists());

    let f = gw.stop().await;
    outputs.push(f);
    for f in &outputs {
        f.assert_no_secret(&[key_a, token_b]);
    }
}

const COMMENTED: &str = r#"# My gateway. Keep these notes!

[server]
listen = "127.0.0.1:0"   # any port
strategy = "priority"

# --- the official API ---
[[endpoints]]
name = "official"
base_url = "http://127.0.0.1:9"   # unused here
api_key = "sk-ant-edit-SECRET-1"
weight = 100   # full share

# --- a relay, kept for emergencies ---
[[endpoints]]
name = "relay"
base_url = "https://relay.example/api"
auth_token_env = "RELAY_TOKEN"   # set in the service unit
enabled = true   # flip me

[health]
failure_threshold = 3   # default

# trailing notes
"#;

/// `endpoints disable relay`, then `enable relay`, on `cfg` (whose text is `text`): the first
/// changes only the flipped line, the second gives `text` back byte for byte. Returns the first
/// command's result.
async fn flip_relay_and_back(sb: &Sandbox, cfg: &Path, text: &str) -> Finished {
    let c = cfg_arg(cfg);
    let f = run(sb.command(&["endpoints", "disable", "relay", "--config", c])).await;
    f.assert_success();
    assert_eq!(
        read(cfg),
        text.replace("enabled = true   # flip me", "enabled = false   # flip me")
    );
    run(sb.command(&["endpoints", "enable", "relay", "--config", c]))
        .await
        .assert_success();
    assert_eq!(read(cfg), text);
    f
}

/// Each edit changes exactly its own lines; undoing it gives back the original bytes.
#[tokio::test]
async fn edits_keep_every_comment_byte_for_byte() {
    let sb = Sandbox::new();
    let cfg = sb.write_at(&sb.path("gw.toml"), COMMENTED);
    let c = cfg_arg(&cfg);

    let f = flip_relay_and_back(&sb, &cfg, COMMENTED).await;
    assert!(
        f.stdout.contains("disabled endpoint `relay`"),
        "{}",
        f.output()
    );
    // RELAY_TOKEN is not set here; the gateway may have it, so the edit is allowed, with a note.
    assert!(
        f.stdout.contains("RELAY_TOKEN is not set here"),
        "{}",
        f.output()
    );

    let f = run(sb.command(&[
        "endpoints",
        "add",
        "backup",
        "--config",
        c,
        "--base-url",
        "https://backup.example",
        "--api-key-env",
        "BACKUP_KEY",
        "--weight",
        "50",
    ]))
    .await;
    f.assert_success();
    let block = "\n[[endpoints]]\nname = \"backup\"\nbase_url = \"https://backup.example\"\napi_key_env = \"BACKUP_KEY\"\nweight = 50\n";
    let after = read(&cfg);
    assert_eq!(
        after,
        COMMENTED.replace(
            "enabled = true   # flip me\n",
            &format!("enabled = true   # flip me\n{block}")
        )
    );

    run(sb.command(&["endpoints", "remove", "backup", "--config", c]))
        .await
        .assert_success();
    assert_eq!(read(&cfg), COMMENTED);

    // Removing an endpoint takes its block and the comment heading it, nothing else.
    run(sb.command(&["endpoints", "remove", "official", "--config", c]))
        .await
        .assert_success();
    let official = "\n# --- the official API ---\n[[endpoints]]\nname = \"official\"\nbase_url = \"http://127.0.0.1:9\"   # unused here\napi_key = \"sk-ant-edit-SECRET-1\"\nweight = 100   # full share\n";
    assert_eq!(read(&cfg), COMMENTED.replacen(official, "", 1));
    assert_eq!(mode_of(&cfg), 0o600);

    // A secret can come from standard input, and is never echoed.
    let secret = "sk-ant-from-stdin-Q8r";
    let f = run_with_stdin(
        sb.command(&[
            "endpoints",
            "add",
            "piped",
            "--config",
            c,
            "--base-url",
            "https://piped.example",
            "--api-key",
            "-",
        ]),
        &format!("{secret}\n"),
    )
    .await;
    f.assert_success();
    assert!(
        read(&cfg).contains(&format!("api_key = \"{secret}\"")),
        "{}",
        read(&cfg)
    );
    let l = run(sb.command(&["endpoints", "list", "--config", c])).await;
    l.assert_success();
    assert!(
        row(&l, "relay").contains("auth_token_env (RELAY_TOKEN)"),
        "{}",
        l.output()
    );
    assert!(row(&l, "piped").contains("api_key"), "{}", l.output());
    for f in [&f, &l] {
        f.assert_no_secret(&[secret, "sk-ant-edit-SECRET-1"]);
    }
}

/// Edits whose result would not load, or that make no sense, are refused with a reason, and the
/// file stays exactly as it was.
#[tokio::test]
async fn invalid_edits_are_refused_and_leave_the_file_unchanged() {
    let sb = Sandbox::new();
    let one = config(&[("only", "http://127.0.0.1:9", "sk-ant-refused-K1")], "");
    let cfg = sb.write_at(&sb.path("gw.toml"), &one);
    let c = cfg_arg(&cfg);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["add", "x", "--base-url", "ftp://relay", "--api-key", "k"],
            "endpoints[1].base_url",
        ),
        (
            vec![
                "add",
                "bad name",
                "--base-url",
                "http://h",
                "--api-key",
                "k",
            ],
            "endpoints[1].name",
        ),
        (
            vec!["add", "only", "--base-url", "http://h", "--api-key", "k"],
            "already exists",
        ),
        (
            vec![
                "add",
                "x",
                "--base-url",
                "http://h",
                "--api-key",
                "with space",
            ],
            "endpoints[1].api_key",
        ),
        (vec!["remove", "nope"], "no endpoint named `nope`"),
        (vec!["remove", "only"], "no [[endpoints]]"),
        (vec!["enable", "nope"], "configured: only"),
    ];
    for (args, expect) in cases {
        let mut full = vec!["endpoints"];
        full.extend(&args);
        full.extend(["--config", c]);
        let f = run(sb.command(&full)).await;
        f.assert_failure();
        assert!(
            f.stderr.contains(expect),
            "{args:?}: wanted `{expect}`\n{}",
            f.output()
        );
        assert!(f.stderr.contains("unchanged"), "{args:?}\n{}", f.output());
        f.assert_no_secret(&["sk-ant-refused-K1"]);
        assert_eq!(read(&cfg), one, "{args:?} changed the file");
    }

    // Not even TOML: the line is named, the secret on it is not echoed.
    let broken =
        "[[endpoints]]\nname = \"a\"\nbase_url = \"http://h\"\napi_key = sk-ant-broken-SECRET\n";
    let bad = sb.write_at(&sb.path("broken.toml"), broken);
    let f = run(sb.command(&["endpoints", "disable", "a", "--config", cfg_arg(&bad)])).await;
    f.assert_failure();
    assert!(f.stderr.contains("line 4"), "{}", f.output());
    f.assert_no_secret(&["sk-ant-broken-SECRET"]);
    assert_eq!(read(&bad), broken);

    // Usage errors: a credential is required, and only one.
    for args in [
        vec!["endpoints", "add", "x", "--base-url", "http://h"],
        vec![
            "endpoints",
            "add",
            "x",
            "--base-url",
            "http://h",
            "--api-key",
            "k",
            "--auth-token",
            "t",
        ],
    ] {
        let f = run(sb.command(&args)).await;
        f.assert_failure();
        assert!(f.stderr.contains("Usage"), "{}", f.output());
    }

    // No config file at all points to `init`.
    let f = run(sb.command(&["endpoints", "list"])).await;
    f.assert_failure();
    assert!(f.stderr.contains("ccgate init"), "{}", f.output());
}

/// `check` probes every endpoint from the CLI process: one working endpoint is enough for exit 0;
/// none working is exit 1. Details are scrubbed of the credential even when an upstream echoes it.
#[tokio::test]
async fn check_exit_codes_and_scrubbed_details() {
    let good = MockUpstream::start().await;
    let dead = MockUpstream::start().await;
    let dead_key = "sk-ant-dead-key-W3e";
    dead.set_default(Script::error(
        401,
        "authentication_error",
        &format!("invalid x-api-key {dead_key}"),
    ));
    let sb = Sandbox::new();
    let cfg = sb.write_at(
        &sb.path("gw.toml"),
        &config(
            &[
                ("good", &good.url(), "sk-ant-good-key-P0o"),
                ("dead", &dead.url(), dead_key),
            ],
            "",
        ),
    );
    let f = run(sb.command(&["check", "--config", cfg_arg(&cfg)])).await;
    f.assert_code(0);
    assert!(row(&f, "good").contains(" ok "), "{}", f.output());
    let d = row(&f, "dead");
    assert!(d.contains("FAILED") && d.contains("401"), "{}", f.output());
    assert!(d.contains("models"), "{}", f.output());
    assert!(
        f.stdout.contains("1 of 2 enabled endpoints work"),
        "{}",
        f.output()
    );
    f.assert_no_secret(&[dead_key, "sk-ant-good-key-P0o"]);
    // The probe really went to the upstream, with the endpoint's own key.
    let r = good.received();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].path(), "/v1/models");
    assert_eq!(r[0].header("x-api-key"), Some("sk-ant-good-key-P0o"));

    good.set_default(Script::error(500, "api_error", "boom"));
    let f = run(sb.command(&["check", "--config", cfg_arg(&cfg)])).await;
    f.assert_code(1);
    assert!(row(&f, "good").contains("FAILED"), "{}", f.output());
    assert!(
        f.stdout.contains("0 of 2 enabled endpoints work"),
        "{}",
        f.output()
    );
    f.assert_no_secret(&[dead_key]);
}

/// `status` against nothing fails with a message that says what to do.
#[tokio::test]
async fn status_without_a_gateway_fails_clearly() {
    let sb = Sandbox::new();
    let closed = ClosedPort::new();
    let f = run(sb.command(&["status", "--url", &closed.addr()])).await;
    f.assert_failure();
    assert!(
        f.stderr.contains("cannot reach the gateway") && f.stderr.contains("ccgate serve"),
        "{}",
        f.output()
    );
}

/// `status` and `requests` against a server that answers 200 with JSON but is not ccgate (here an
/// upstream, a common slip of `--url`) say so instead of printing an empty report.
#[tokio::test]
async fn status_against_another_server_says_it_is_not_ccgate() {
    let up = MockUpstream::start().await;
    up.set_default(Script::json_ok());
    let sb = Sandbox::new();
    for cmd in ["status", "requests"] {
        let f = run(sb.command(&[cmd, "--url", &up.url()])).await;
        f.assert_code(2);
        assert!(
            f.stderr.contains("is it a ccgate?"),
            "{cmd}: {}",
            f.output()
        );
    }
}

/// With an access token, `status` sends it from the config; `claude enable` hands it to Claude
/// Code; a file that did not exist is removed again by `disable`; `CLAUDE_CONFIG_DIR` is honoured.
#[tokio::test]
async fn claude_settings_with_token_without_a_file_and_claude_config_dir() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let token = "gw-access-token-T5y";
    let cfg = sb.write_at(
        &sb.path("gw.toml"),
        &config(
            &[("a", &up.url(), "sk-ant-k-1")],
            &format!("access_token = \"{token}\""),
        ),
    );
    let c = cfg_arg(&cfg);
    let gw = start(sb.command(&["serve", "--config", c])).await;

    let f = run(sb.command(&["status", "--config", c, "--url", &gw.url()])).await;
    f.assert_success();
    assert!(row(&f, "a").contains("healthy"), "{}", f.output());
    f.assert_no_secret(&[token]);

    // Without the token, the gateway refuses, and status says why.
    let open = sb.write_at(
        &sb.path("open.toml"),
        &config(&[("a", &up.url(), "sk-ant-k-1")], ""),
    );
    let f = run(sb.command(&["status", "--config", cfg_arg(&open), "--url", &gw.url()])).await;
    f.assert_failure();
    assert!(f.stderr.contains("access token"), "{}", f.output());

    let claude_dir = sb.path("claude-cfg");
    let settings = claude_dir.join("settings.json");
    let mut enable = sb.command(&["claude", "enable", "--config", c, "--url", &gw.url()]);
    enable.env("CLAUDE_CONFIG_DIR", &claude_dir);
    let f = run(enable).await;
    f.assert_success();
    f.assert_no_secret(&[token]);
    let v: Value = serde_json::from_str(&read(&settings)).expect("JSON");
    assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], gw.url());
    assert_eq!(v["env"]["ANTHROPIC_AUTH_TOKEN"], token);
    assert_eq!(mode_of(&settings), 0o600);
    assert!(
        !sb.claude_settings().exists(),
        "HOME's settings were touched"
    );
    // Claude Code, configured this way, gets through.
    let a = post_message(gw.addr, &[("authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(a.status, 200, "{a:?}");

    let mut disable = sb.command(&["claude", "disable"]);
    disable.env("CLAUDE_CONFIG_DIR", &claude_dir);
    let f = run(disable).await;
    f.assert_success();
    assert!(!settings.exists(), "the file ccgate created is still there");
    assert!(
        !claude_dir.exists(),
        "the directory ccgate created is still there"
    );
    gw.stop().await;

    // Disable with nothing to undo is fine and says so.
    let f = run(sb.command(&["claude", "disable"])).await;
    f.assert_success();
    assert!(f.stdout.contains("nothing to undo"), "{}", f.output());
}

/// Invalid JSON is never overwritten; a file the user changed after `enable` keeps their changes
/// on `disable`, losing only what ccgate set.
#[tokio::test]
async fn claude_refuses_invalid_json_and_keeps_later_user_changes() {
    let sb = Sandbox::new();
    let settings = sb.claude_settings();
    let broken = "{ \"model\": \"opus\", ";
    sb.write_at(&settings, broken);
    let f = run(sb.command(&["claude", "enable", "--url", "http://127.0.0.1:7860"])).await;
    f.assert_failure();
    assert!(
        f.stderr.contains("not a valid settings file"),
        "{}",
        f.output()
    );
    assert_eq!(read(&settings), broken);
    assert!(
        !settings
            .with_file_name("settings.json.ccgate-backup")
            .exists()
    );

    let original =
        "{\"env\": {\"ANTHROPIC_BASE_URL\": \"https://mine.example\"}, \"model\": \"opus\"}";
    sb.write_at(&settings, original);
    run(sb.command(&["claude", "enable", "--url", "http://127.0.0.1:7860"]))
        .await
        .assert_success();
    let mut v: Value = serde_json::from_str(&read(&settings)).expect("JSON");
    assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], "http://127.0.0.1:7860");
    v["theme"] = "dark".into();
    sb.write_at(&settings, &serde_json::to_string_pretty(&v).expect("JSON"));
    let f = run(sb.command(&["claude", "disable"])).await;
    f.assert_success();
    assert!(f.stdout.contains("changed since"), "{}", f.output());
    let v: Value = serde_json::from_str(&read(&settings)).expect("JSON");
    assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], "https://mine.example");
    assert_eq!(v["theme"], "dark");
    assert_eq!(v["model"], "opus");
}

/// `endpoints disable|enable` reach a running gateway (through its switch, whether or not it can
/// reload) and the file records the change.
#[tokio::test]
async fn enable_and_disable_apply_to_the_running_gateway() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write_at(
        &sb.path("gw.toml"),
        &config(
            &[("a", &up.url(), "sk-ant-a"), ("b", &up.url(), "sk-ant-b")],
            "",
        ),
    );
    let c = cfg_arg(&cfg);
    let gw = start(sb.command(&["serve", "--config", c])).await;
    let enabled = |v: &Value, name: &str| -> bool {
        endpoint_entry(v, name)["enabled"].as_bool().expect("bool")
    };

    endpoints_applied(&sb, &["disable", "b"], c, &gw.url()).await;
    assert!(read(&cfg).contains("enabled = false"));
    let v = get(gw.addr, "/_ccgate/endpoints", &[]).await.json();
    assert!(!enabled(&v, "b") && enabled(&v, "a"), "{v}");

    endpoints_applied(&sb, &["enable", "b"], c, &gw.url()).await;
    let v = get(gw.addr, "/_ccgate/endpoints", &[]).await.json();
    assert!(enabled(&v, "b"), "{v}");
    gw.stop().await;

    // Nothing running at the address: the edit is saved, and the message says what to do.
    let closed = ClosedPort::new();
    let url = closed.url();
    let f = run(sb.command(&["endpoints", "disable", "a", "--config", c, "--url", &url])).await;
    f.assert_success();
    assert!(
        f.stdout.contains("the running gateway was not reached") && f.stdout.contains("SIGHUP"),
        "{}",
        f.output()
    );

    // Another server at the address, answering 200 to anything, is not reported as the gateway
    // that applied the edit (audit: "applied to the running gateway … (no endpoint changed)").
    let foreign = MockUpstream::start().await;
    let url = foreign.url();
    let f = run(sb.command(&["endpoints", "enable", "a", "--config", c, "--url", &url])).await;
    f.assert_success();
    assert!(
        f.stdout.contains("the running gateway was not reached")
            && f.stdout.contains("is not a ccgate gateway"),
        "{}",
        f.output()
    );
    assert!(
        foreign
            .received()
            .iter()
            .all(|r| r.path_and_query == "/_ccgate/health"),
        "only asked what it is"
    );
}

/// An endpoint added while the gateway runs receives traffic after `endpoints add`; the endpoints
/// that did not change keep their counters.
#[tokio::test]
async fn endpoint_added_while_running_receives_traffic_and_others_keep_counters() {
    let up_a = MockUpstream::start().await;
    let up_c = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write_at(
        &sb.path("gw.toml"),
        &config(&[("a", &up_a.url(), "sk-ant-a")], ""),
    );
    let c = cfg_arg(&cfg);
    let gw = start(sb.command(&["serve", "--config", c])).await;
    for _ in 0..3 {
        let r = post_message(gw.addr, &[]).await;
        assert_eq!(r.header("x-ccgate-endpoint"), Some("a"), "{r:?}");
    }

    let f = endpoints_applied(
        &sb,
        &[
            "add",
            "c",
            "--base-url",
            &up_c.url(),
            "--api-key",
            "sk-ant-c",
            "--priority",
            "0",
        ],
        c,
        &gw.url(),
    )
    .await;
    assert!(f.stdout.contains("added: c"), "{}", f.output());
    for _ in 0..2 {
        let r = post_message(gw.addr, &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-ccgate-endpoint"), Some("c"), "{r:?}");
    }
    assert_eq!(up_c.received().len(), 2);
    let v = get(gw.addr, "/_ccgate/endpoints", &[]).await.json();
    let total = |name: &str| endpoint_entry(&v, name)["total_requests"].as_u64();
    assert_eq!(total("a"), Some(3), "{v}");
    assert_eq!(total("c"), Some(2), "{v}");

    // A change the CLI accepts but the gateway cannot load (a variable only the CLI's
    // environment could lack): refused by the gateway, the file restored, exit 1, and the gateway
    // keeps going.
    let mut add = sb.command(&[
        "endpoints",
        "add",
        "d",
        "--config",
        c,
        "--url",
        &gw.url(),
        "--base-url",
        &up_c.url(),
        "--api-key-env",
        "CCGATE_TEST_UNSET_KEY",
    ]);
    add.env("CCGATE_TEST_UNSET_KEY", "sk-ant-only-in-the-cli");
    let f = run(add).await;
    f.assert_code(1);
    assert!(
        f.stdout.contains("refused the edited config")
            && f.stdout.contains("CCGATE_TEST_UNSET_KEY"),
        "{}",
        f.output()
    );
    f.assert_no_secret(&["sk-ant-only-in-the-cli"]);
    assert!(!read(&cfg).contains("name = \"d\""), "restored as it was");
    let r = post_message(gw.addr, &[]).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("c"), "{r:?}");
    gw.stop().await;
}

/// `serve --log-format json` (and `CCGATE_LOG_FORMAT=json`) writes one JSON object per line, and
/// the per-request line carries the id the client got back.
#[tokio::test]
async fn json_logs_carry_the_request_id() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let key = "sk-ant-log-secret-V2n";
    let cfg = sb.write_at(&sb.path("gw.toml"), &config(&[("a", &up.url(), key)], ""));
    for use_env in [false, true] {
        let mut cmd = if use_env {
            let mut c = sb.command(&["serve", "--config", cfg_arg(&cfg)]);
            c.env("CCGATE_LOG_FORMAT", "json");
            c
        } else {
            sb.command(&["serve", "--config", cfg_arg(&cfg), "--log-format", "json"])
        };
        cmd.env("RUST_LOG", "info");
        let gw = start(cmd).await;
        // A failed attempt first: its line names the event once (audit: its `message` field
        // made two `message` keys, and JSON readers kept the error text instead of the event).
        up.push(Script::error(500, "api_error", "broken"));
        assert_eq!(post_message(gw.addr, &[]).await.status, 502);
        let a = post_message(gw.addr, &[]).await;
        assert_eq!(a.status, 200, "{a:?}");
        let id = a
            .header("x-ccgate-request-id")
            .expect("a request id header")
            .to_string();
        let f = gw.stop().await;
        f.assert_no_secret(&[key]);
        let lines: Vec<Value> = f
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{}", f.output()))
            })
            .collect();
        let request = lines
            .iter()
            .find(|l| l["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no log line with request_id {id}\n{}", f.output()));
        assert_eq!(request["message"], "request", "{request}");
        assert_eq!(request["endpoint"], "a", "{request}");
        let failed = f
            .stderr
            .lines()
            .find(|l| l.contains("attempt failed"))
            .unwrap_or_else(|| panic!("no `attempt failed` line\n{}", f.output()));
        assert_eq!(failed.matches("\"message\":").count(), 1, "{failed}");
        let failed: Value = serde_json::from_str(failed).expect("JSON");
        assert_eq!(failed["message"], "attempt failed", "{failed}");
        assert!(
            failed["error"]
                .as_str()
                .is_some_and(|e| e.contains("HTTP 500")),
            "{failed}"
        );
        assert_eq!(request["level"], "INFO", "{request}");
        assert!(request["timestamp"].is_string(), "{request}");
    }
    // The flag is checked.
    let f = run(sb.command(&["serve", "--config", cfg_arg(&cfg), "--log-format", "xml"])).await;
    f.assert_failure();
    assert!(f.stderr.contains("possible values"), "{}", f.output());
}

#[tokio::test]
async fn help_and_completions() {
    let sb = Sandbox::new();
    let f = run(sb.command(&["--help"])).await;
    f.assert_success();
    for cmd in ["endpoints", "status", "check", "claude", "completions"] {
        assert!(
            f.stdout.contains(cmd),
            "--help lacks `{cmd}`\n{}",
            f.output()
        );
    }
    let f = run(sb.command(&["serve", "--help"])).await;
    assert!(f.stdout.contains("--log-format"), "{}", f.output());
    assert!(f.stdout.contains("CCGATE_LOG_FORMAT"), "{}", f.output());
    let f = run(sb.command(&["endpoints", "add", "--help"])).await;
    for flag in [
        "--base-url",
        "--api-key",
        "--auth-token",
        "--api-key-env",
        "--auth-token-env",
        "--priority",
        "--weight",
        "--url",
    ] {
        assert!(f.stdout.contains(flag), "lacks {flag}\n{}", f.output());
    }
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let f = run(sb.command(&["completions", shell])).await;
        f.assert_success();
        assert!(
            f.stdout.contains("ccgate") && f.stdout.contains("endpoints"),
            "{shell}\n{}",
            f.output()
        );
    }
    run(sb.command(&["completions", "tcsh"]))
        .await
        .assert_failure();
}

/// Issue 21 #3 and #8: an endpoint's caller error is not its success, every total shows its
/// split, and after a 429 cooldown ends `status` shows the endpoint back in rotation with a health
/// rate that says what it is over.
#[tokio::test]
async fn status_splits_totals_and_shows_the_state_after_a_cooldown() {
    let up_a = MockUpstream::start().await;
    let up_b = MockUpstream::start().await;
    let sb = Sandbox::new();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[endpoints]]\nname = \"a\"\nbase_url = \"{}\"\napi_key = \"sk-ant-a\"\npriority = 1\n\n[[endpoints]]\nname = \"b\"\nbase_url = \"{}\"\napi_key = \"sk-ant-b\"\npriority = 2\n\n[[endpoints]]\nname = \"idle\"\nbase_url = \"{}\"\napi_key = \"sk-ant-c\"\npriority = 3\n",
        up_a.url(),
        up_b.url(),
        up_b.url()
    );
    let cfg = sb.write_at(&sb.path("gw.toml"), &text);
    let gw = start(sb.command(&["serve", "--config", cfg_arg(&cfg)])).await;

    // `a` rate-limits for one second: the request fails over to `b`.
    up_a.push(Script::error(429, "rate_limit_error", "slow down").header("retry-after", "1"));
    let r = post_message(gw.addr, &[]).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"), "{r:?}");
    wait::eventually("`a` back from its cooldown", || async {
        endpoint_entry(&get(gw.addr, "/_ccgate/endpoints", &[]).await.json(), "a")["state"]
            != "cooling_down"
    })
    .await;
    // Then the caller sends a bad request: `a` answers 400, the caller's own error.
    up_a.push(Script::error(400, "invalid_request_error", "bad request"));
    let r = post_message(gw.addr, &[]).await;
    assert_eq!(r.status, 400, "{r:?}");

    let v = get(gw.addr, "/_ccgate/endpoints", &[]).await.json();
    let a = endpoint_entry(&v, "a");
    assert_eq!(a["state"], "healthy", "the cooldown is over: {a}");
    assert_eq!(a["successful_requests"], 0, "a 400 is no success: {a}");
    assert_eq!(a["failed_requests"], 2, "{a}");
    assert_eq!(a["endpoint_errors"], 1, "{a}");
    assert_eq!(a["caller_errors"], 1, "{a}");
    assert_eq!(a["judged_requests"], 1, "{a}");
    let s = get(gw.addr, "/_ccgate/stats", &[]).await.json();
    assert_eq!(
        (
            &s["successful_requests"],
            &s["caller_errors"],
            &s["upstream_errors"]
        ),
        (&Value::from(1), &Value::from(1), &Value::from(0)),
        "{s}"
    );

    let f = run(sb.command(&["status", "--url", &gw.url()])).await;
    f.assert_success();
    let a = row(&f, "a");
    assert!(
        a.contains("healthy") && !a.contains("degraded"),
        "{}",
        f.output()
    );
    assert!(a.contains("0.0% of 1"), "{}", f.output());
    let cols: Vec<&str> = a.split_whitespace().collect();
    assert_eq!(cols[cols.len() - 3..], ["2", "1", "1"], "{}", f.output());
    assert!(row(&f, "b").contains("100.0% of 1"), "{}", f.output());
    let idle: Vec<&str> = row(&f, "idle").split_whitespace().collect();
    assert_eq!(
        idle[1..3],
        ["healthy", "-"],
        "no rate from nothing\n{}",
        f.output()
    );
    assert!(
        f.stdout.contains(
            "totals: 2 requests: 1 answered, 1 not (0 upstream errors, 1 caller errors, 0 cancelled), 0 in flight"
        ),
        "{}",
        f.output()
    );
    gw.stop().await;
}

/// Issue 21 #10: `endpoints add --auth-token-env VAR` with VAR set only in the CLI's shell. The
/// running gateway refuses the edited file; the command says why (the gateway's own reason, naming
/// VAR), restores the file byte for byte, and exits non-zero, so later reloads still work.
#[tokio::test]
async fn an_edit_the_running_gateway_refuses_is_restored_and_explained() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write_at(
        &sb.path("gw.toml"),
        &config(&[("a", &up.url(), "sk-ant-a")], ""),
    );
    let before = read(&cfg);
    let c = cfg_arg(&cfg);
    let gw = start(sb.command(&["serve", "--config", c])).await;

    let mut cmd = sb.command(&[
        "endpoints",
        "add",
        "relay",
        "--base-url",
        &up.url(),
        "--auth-token-env",
        "RELAY_TOKEN_ONLY_HERE",
        "--config",
        c,
        "--url",
        &gw.url(),
    ]);
    cmd.env("RELAY_TOKEN_ONLY_HERE", "relay-secret-Q7w");
    let f = run(cmd).await;
    f.assert_failure();
    assert!(
        f.stdout.contains("refused the edited config")
            && f.stdout.contains("RELAY_TOKEN_ONLY_HERE"),
        "{}",
        f.output()
    );
    assert!(f.stdout.contains("restored as it was"), "{}", f.output());
    f.assert_no_secret(&["relay-secret-Q7w"]);
    assert_eq!(read(&cfg), before, "the file is as it was");

    // The gateway still serves its old config, and a reload of the file now succeeds.
    let r = post_message(gw.addr, &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    endpoints_applied(&sb, &["disable", "a"], c, &gw.url()).await;
    gw.stop().await;
}

/// A command whose reader has gone (`ccgate ... | head`, the pipe closed before it writes) ends
/// quietly with exit code 0: no panic, no backtrace (audit: every printing command panicked on
/// the broken pipe with exit code 101).
#[tokio::test]
async fn a_reader_that_went_away_ends_a_command_quietly() {
    let sb = Sandbox::new();
    let up = MockUpstream::start().await;
    let cfg = sb.write(
        "ccgate.toml",
        &config(&[("a", &up.url(), "sk-up-pipe")], ""),
    );
    let cfg = cfg_arg(&cfg).to_owned();
    let commands: [&[&str]; 4] = [
        &["completions", "bash"],
        &["validate", "--config", &cfg],
        &["endpoints", "list", "--config", &cfg],
        &["usage", "--json"],
    ];
    for args in commands {
        // A pipe with no reader left: the first write fails with EPIPE.
        let (tx, rx) = tokio::net::unix::pipe::pipe().expect("pipe");
        drop(rx);
        let fd = tx.into_blocking_fd().expect("fd");
        let mut cmd = sb.command(args);
        cmd.stdout(std::process::Stdio::from(fd))
            .env("RUST_BACKTRACE", "1");
        let out = cmd.output().expect("run ccgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `serve` whose stdout reader went away keeps serving: the lost `listening on` line is a warning
/// on stderr, with the address (audit: it exited 2 with a bare "Broken pipe").
#[tokio::test]
async fn serve_without_a_stdout_reader_keeps_serving() {
    use std::io::BufRead;
    let sb = Sandbox::new();
    let up = MockUpstream::start().await;
    let cfg = sb.write(
        "ccgate.toml",
        &config(&[("a", &up.url(), "sk-up-pipe")], ""),
    );
    let (tx, rx) = tokio::net::unix::pipe::pipe().expect("pipe");
    drop(rx);
    let fd = tx.into_blocking_fd().expect("fd");
    let mut cmd = sb.command(&["serve", "--config", cfg_arg(&cfg)]);
    cmd.stdout(std::process::Stdio::from(fd))
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ccgate");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = String::new();
    let addr = loop {
        let line = lines_rx
            .recv_timeout(process::DEADLINE)
            .unwrap_or_else(|_| panic!("no warning with the address:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.split("listening on http://").nth(1) {
            let addr = rest.split('`').next().expect("address");
            break addr.parse::<std::net::SocketAddr>().expect("an address");
        }
    };
    let answer = process::get(addr, "/_ccgate/health", &[]).await;
    assert_eq!(answer.status, 200, "{seen}");
    assert!(child.try_wait().expect("status").is_none(), "{seen}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A file with CRLF line endings keeps them through an edit, every line but the one changed
/// byte for byte; an edited file others can read gets a warning (audit: the edit turned every
/// CRLF into LF, and writing a key into a 0644 file said nothing).
#[tokio::test]
async fn edits_keep_crlf_line_endings_and_warn_about_a_readable_file() {
    let sb = Sandbox::new();
    let crlf = COMMENTED.replace('\n', "\r\n");
    let cfg = sb.write_at(&sb.path("crlf.toml"), &crlf);
    process::set_mode(&cfg, 0o600);
    let c = cfg_arg(&cfg);
    let f = flip_relay_and_back(&sb, &cfg, &crlf).await;
    assert!(
        !f.stderr.contains("can be read by other users"),
        "{}",
        f.output()
    );

    process::set_mode(&cfg, 0o644);
    let f = run(sb.command(&[
        "endpoints",
        "add",
        "backup",
        "--config",
        c,
        "--base-url",
        "https://backup.example",
        "--api-key",
        "sk-ant-backup-key",
    ]))
    .await;
    f.assert_success();
    assert!(
        f.stderr.contains("can be read by other users") && f.stderr.contains("chmod 600"),
        "{}",
        f.output()
    );
    let after = read(&cfg);
    assert!(
        after.contains("[[endpoints]]\r\nname = \"backup\"\r\n"),
        "{after:?}"
    );
    assert_eq!(
        after.matches('\n').count(),
        after.matches("\r\n").count(),
        "{after:?}"
    );
}

/// Edits made at the same moment take turns: each is in the file afterwards (audit: ten
/// concurrent `add`s left one endpoint in the file, and every command reported success).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_all_land() {
    let sb = Sandbox::new();
    let cfg = sb.write(
        "ccgate.toml",
        &config(&[("a", "http://127.0.0.1:9", "k")], ""),
    );
    let c = cfg_arg(&cfg);
    let names: Vec<String> = (0..8).map(|i| format!("x{i}")).collect();
    let edits = names.iter().map(|name| {
        run(sb.command(&[
            "endpoints",
            "add",
            name,
            "--config",
            c,
            "--base-url",
            "http://127.0.0.1:9",
            "--api-key",
            "k",
        ]))
    });
    let disable = run(sb.command(&["endpoints", "disable", "a", "--config", c]));
    let (added, disabled) = tokio::join!(futures_util::future::join_all(edits), disable);
    for f in &added {
        f.assert_success();
    }
    disabled.assert_success();
    let text = read(&cfg);
    let loaded =
        ccgate::config::Config::from_toml(&text, "edited", &|_: &str| None).expect("loads");
    let mut have: Vec<&str> = loaded.endpoints.iter().map(|e| e.name.as_str()).collect();
    have.sort_unstable();
    let mut want = vec!["a"];
    want.extend(names.iter().map(String::as_str));
    assert_eq!(have, want, "{text}");
    assert!(
        !loaded.endpoints[0].enabled,
        "the disable was lost:\n{text}"
    );
}

/// An edit waits for another only while that one reads and writes the file, not while it asks a
/// slow gateway to reload (audit: a second edit waited out the first one's whole reload call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_does_not_wait_for_another_ones_reload() {
    // A "gateway" that takes connections and never answers.
    let wedged = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = wedged.local_addr().expect("addr");
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = wedged.accept().await {
            held.push(s);
        }
    });
    let sb = Sandbox::new();
    let text =
        config(&[("a", "http://127.0.0.1:9", "k")], "").replace("127.0.0.1:0", &addr.to_string());
    let cfg = sb.write("ccgate.toml", &text);
    let mut children = Vec::new();
    for name in ["x1", "x2"] {
        let mut cmd = sb.command(&[
            "endpoints",
            "add",
            name,
            "--config",
            cfg_arg(&cfg),
            "--base-url",
            "http://127.0.0.1:9",
            "--api-key",
            "k",
        ]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        children.push(cmd.spawn().expect("spawn"));
    }
    // Both edits land while both commands still wait on the wedged gateway.
    wait::eventually("both edits in the file", || {
        let text = read(&cfg);
        async move { text.contains("name = \"x1\"") && text.contains("name = \"x2\"") }
    })
    .await;
    for c in &mut children {
        assert!(
            c.try_wait().expect("status").is_none(),
            "still waiting on the gateway"
        );
        let _ = c.kill();
        let _ = c.wait();
    }
    keep.abort();
}
