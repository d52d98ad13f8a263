//! End-to-end tests of the real `ccgate` binary: `serve` (its readiness line, forwarding, graceful
//! shutdown on SIGTERM and SIGINT), config errors, config path resolution, the `ANTHROPIC_*`
//! fallback without a config file, the non-loopback guard, `init`, `validate`, and that secrets
//! never reach the process's output.
//!
//! Every child runs with a cleared environment and a temporary HOME and XDG directories, so the
//! developer's own configuration and credentials can never leak in. Readiness is the child's
//! `listening on http://ADDR` line; children are killed when a test fails (`support/process.rs`).
#![cfg(unix)]

#[path = "support/mock.rs"]
mod mock;
#[path = "support/process.rs"]
mod process;
#[path = "support/wait.rs"]
mod wait;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use mock::{Gate, MockUpstream, Script, sse_delta_text};
use process::{
    Answer, DEADLINE, Finished, Sandbox, call, config, get, message_body, mode_of, open,
    post_message_to, run, set_mode, start, try_start,
};

/// `POST /v1/messages?beta=true` (the path Claude Code uses), streaming or not.
async fn post_message(addr: SocketAddr, headers: &[(&str, &str)], stream: bool) -> Answer {
    post_message_to(addr, "/v1/messages?beta=true", headers, Some(stream)).await
}

/// The next data frame of a body, or `None` at its end; panics on an error or a stall.
async fn next_data(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("the body stalled")?;
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Opens a streaming `POST path` and reads it until its first text delta has arrived; returns
/// the rest of the body and the text read so far.
async fn stream_until_first_delta(addr: SocketAddr, path: &str) -> (Incoming, String) {
    let resp = open(addr, Method::POST, path, &[], message_body(Some(true))).await;
    assert_eq!(resp.status(), 200, "streaming POST {path}");
    let mut body = resp.into_body();
    let mut seen = String::new();
    while !seen.contains(&sse_delta_text(0)) {
        match next_data(&mut body).await {
            Some(Ok(d)) => seen.push_str(&String::from_utf8_lossy(&d)),
            other => panic!("stream ended before its first delta: {other:?}\n{seen}"),
        }
    }
    (body, seen)
}

/// `ccgate serve` (with `shutdown_timeout`) in front of `up`, and a stream through it read to
/// its first delta; `up` sends the answer's first `stall_after` events and then holds the body
/// open. The sandbox and config path are for a restart.
async fn serving_a_stalled_stream(
    up: &MockUpstream,
    stall_after: usize,
    shutdown_timeout: &str,
) -> (
    Sandbox,
    std::path::PathBuf,
    process::Serving,
    Incoming,
    String,
) {
    up.set_default(Script::sse_ok(3).stall_after(stall_after));
    let sb = Sandbox::new();
    let cfg = sb.write(
        "ccgate.toml",
        &one_endpoint(
            &up.url(),
            "k",
            &format!("shutdown_timeout = \"{shutdown_timeout}\""),
        ),
    );
    let gw = start(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    let (body, seen) = stream_until_first_delta(gw.addr, "/v1/messages").await;
    (sb, cfg, gw, body, seen)
}

/// Reads `body` to its end into `seen`; panics when it breaks instead of ending cleanly.
async fn read_to_clean_end(body: &mut Incoming, seen: &mut String) {
    loop {
        match next_data(body).await {
            Some(Ok(d)) => seen.push_str(&String::from_utf8_lossy(&d)),
            Some(Err(e)) => panic!("the stream was cut without its end: {e}\n{seen}"),
            None => return,
        }
    }
}

/// After a shutdown signal the listener must close. There is no event to wait for, so poll
/// `connect` (each successful probe connection is closed at once) until it is refused.
async fn wait_until_refused(addr: SocketAddr) {
    let until = Instant::now() + DEADLINE;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            // The listener closed while this handshake was queued: closing, not yet refusing.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(s) => drop(s),
        }
        assert!(
            Instant::now() < until,
            "{addr} still accepts connections after the shutdown signal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A config with one endpoint `a` at `url`, listening on a free loopback port.
fn one_endpoint(url: &str, api_key: &str, server_extra: &str) -> String {
    config(&[("a", url, api_key)], server_extra)
}

// ---------------------------------------------------------------------------------------------
// serve: readiness line, forwarding, shutdown.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn help_describes_the_commands() {
    let sb = Sandbox::new();
    let f = run(sb.command(&["--help"])).await;
    f.assert_success();
    for cmd in ["serve", "init", "validate"] {
        assert!(
            f.stdout.contains(cmd),
            "--help lacks `{cmd}`\n{}",
            f.output()
        );
    }
    let f = run(sb.command(&["serve", "--help"])).await;
    f.assert_success();
    assert!(f.stdout.contains("--config"), "{}", f.output());
    let f = run(sb.command(&["init", "--help"])).await;
    f.assert_success();
    for flag in ["--force", "--api-key", "--auth-token", "--base-url"] {
        assert!(
            f.stdout.contains(flag),
            "init --help lacks {flag}\n{}",
            f.output()
        );
    }
}

#[tokio::test]
async fn serve_prints_one_listening_line_and_forwards() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let key = "sk-ant-upstream-Q4vX9";
    let cfg = sb.write("ccgate.toml", &one_endpoint(&up.url(), key, ""));
    let gw = start(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    assert_eq!(gw.addr.ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(gw.line, format!("listening on http://{}\n", gw.addr));

    let h = get(gw.addr, "/_ccgate/health", &[]).await;
    assert_eq!(h.status, 200, "{h:?}");
    assert!(h.body.contains("ok"), "{h:?}");

    let a = post_message(
        gw.addr,
        &[
            ("x-api-key", "client-own-key"),
            ("anthropic-beta", "fine-grained-tool-streaming-2025-05-14"),
        ],
        false,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    assert!(a.body.contains("Hello from the mock"), "{a:?}");

    let r = up.received();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].method, "POST");
    assert_eq!(r[0].path_and_query, "/v1/messages?beta=true");
    assert_eq!(r[0].header_all("x-api-key"), [key]);
    assert_eq!(
        r[0].header("anthropic-beta"),
        Some("fine-grained-tool-streaming-2025-05-14")
    );

    let f = gw.stop().await;
    // Exactly one line on stdout for the whole run: logs go to stderr.
    assert_eq!(f.stdout.lines().count(), 1, "{}", f.output());
    assert!(!f.stderr.contains("panicked"), "{}", f.output());
}

/// An upstream's error text cannot forge a log line: its line breaks are escaped in the text log
/// (audit: a message with a newline and a made-up request line came out as a line of its own).
#[tokio::test]
async fn an_upstream_error_message_cannot_forge_a_log_line() {
    let up = MockUpstream::start().await;
    let forged =
        "2026-12-07T00:00:00.000000Z  INFO request request_id=req_FORGED outcome=\"success\"";
    up.set_default(Script::error(500, "api_error", &format!("boom\n{forged}")));
    let sb = Sandbox::new();
    let cfg = sb.write(
        "ccgate.toml",
        &one_endpoint(&up.url(), "sk-ant-upstream-L0g", ""),
    );
    let gw = start(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    let a = post_message(gw.addr, &[], false).await;
    assert_eq!(a.status, 502, "{a:?}");
    gw.stderr_until("attempt failed").await;
    let f = gw.stop().await;
    assert!(
        f.stderr.contains("boom\\n2026-12-07"),
        "the message is logged, escaped: {}",
        f.output()
    );
    assert!(
        !f.stderr
            .lines()
            .any(|l| l.starts_with("2026-12-07T00:00:00.000000Z")),
        "a forged line: {}",
        f.output()
    );
}

/// An in-flight stream held open by the upstream survives `sig`: the listener closes, the
/// process keeps running until the stream has ended normally, then exits 0.
async fn in_flight_stream_is_drained_on(sig: &str) {
    let up = MockUpstream::start().await;
    let gate = Gate::new();
    // 4 events (message_start, content_block_start, ping, first delta), then wait for the gate,
    // then the rest, slowly.
    up.set_default(
        Script::sse_ok(5)
            .gate_after(4, gate.clone())
            .pacing(Duration::from_millis(30)),
    );
    let sb = Sandbox::new();
    let cfg = sb.write(
        "ccgate.toml",
        &one_endpoint(&up.url(), "k-drain", "shutdown_timeout = \"20s\""),
    );
    let mut gw = start(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;

    let (mut body, mut seen) = stream_until_first_delta(gw.addr, "/v1/messages?beta=true").await;
    gate.wait_arrived(1).await;

    gw.signal(sig);
    wait_until_refused(gw.addr).await;
    assert!(
        gw.is_running(),
        "ccgate exited with a stream still in flight\nstderr:\n{}",
        gw.stderr_now()
    );

    gate.open();
    loop {
        match next_data(&mut body).await {
            Some(Ok(d)) => seen.push_str(&String::from_utf8_lossy(&d)),
            Some(Err(e)) => panic!("the in-flight stream was cut during the drain: {e}\n{seen}"),
            None => break,
        }
    }
    for i in 0..5 {
        assert!(
            seen.contains(&sse_delta_text(i)),
            "delta {i} missing\n{seen}"
        );
    }
    assert!(seen.contains("message_stop"), "{seen}");
    assert!(!seen.contains("event: error"), "{seen}");

    let f = gw.finish().await;
    assert_eq!(
        f.status.code(),
        Some(0),
        "SIG{sig} must exit 0\n{}",
        f.output()
    );
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_stream_then_exits_zero() {
    in_flight_stream_is_drained_on("TERM").await;
}

#[tokio::test]
async fn sigint_drains_an_in_flight_stream_then_exits_zero() {
    in_flight_stream_is_drained_on("INT").await;
}

#[tokio::test]
async fn idle_server_exits_zero_on_sigint() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write("ccgate.toml", &one_endpoint(&up.url(), "k", ""));
    let gw = start(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    let addr = gw.addr;
    gw.signal("INT");
    let f = gw.finish().await;
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

/// A client connection that has sent nothing (a pool's spare connection, opened ahead of need)
/// does not hold the shutdown for its whole limit (audit: SIGTERM took the full 30 s).
#[tokio::test]
async fn a_connection_that_sent_nothing_does_not_hold_the_shutdown() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write(
        "ccgate.toml",
        &one_endpoint(&up.url(), "k", "shutdown_timeout = \"20s\""),
    );
    let gw = start(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    let _silent = TcpStream::connect(gw.addr).await.expect("connect");
    // Accepted in order: once a later connection is answered, the silent one has been taken.
    assert_eq!(get(gw.addr, "/_ccgate/health", &[]).await.status, 200);
    let t0 = Instant::now();
    gw.signal("TERM");
    let f = gw.finish().await;
    let took = t0.elapsed();
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    assert!(
        took < Duration::from_secs(10),
        "the silent connection held the shutdown for {took:?}"
    );
}

/// A second signal during the drain ends it at once, as its deadline would: the open stream gets
/// its `error` event, and the gateway exits 0 long before `shutdown_timeout` (audit: a second
/// Ctrl-C did nothing, and said nothing).
#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let up = MockUpstream::start().await;
    let (_sb, _cfg, mut gw, mut body, mut seen) = serving_a_stalled_stream(&up, 4, "60s").await;
    let t0 = Instant::now();
    gw.signal("TERM");
    wait_until_refused(gw.addr).await;
    assert!(gw.is_running(), "exited without draining at all");
    gw.signal("INT");
    let f = gw.finish().await;
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the second signal did not end the drain: {:?}",
        t0.elapsed()
    );
    assert!(f.stderr.contains("second signal"), "{}", f.output());
    read_to_clean_end(&mut body, &mut seen).await;
    assert!(seen.contains("event: error"), "{seen}");
}

/// A stream whose answer is complete (`message_stop`) but whose body the upstream has not ended
/// when the drain's deadline comes ends as it is: no `error` event after a complete answer (the
/// client would send it, and pay for it, again), and it counts as a success.
#[tokio::test]
async fn a_complete_stream_cut_at_the_deadline_ends_without_an_error() {
    let up = MockUpstream::start().await;
    // All nine events of the answer, then the body is held open.
    let (sb, cfg, gw, mut body, mut seen) = serving_a_stalled_stream(&up, 9, "1s").await;
    while !seen.contains("message_stop") {
        match next_data(&mut body).await {
            Some(Ok(d)) => seen.push_str(&String::from_utf8_lossy(&d)),
            other => panic!("no message_stop: {other:?}\n{seen}"),
        }
    }
    let stats = get(gw.addr, "/_ccgate/stats", &[]).await.json();
    assert_eq!(stats["in_flight"], 1, "{stats}");
    gw.signal("TERM");
    let f = gw.finish().await;
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    read_to_clean_end(&mut body, &mut seen).await;
    assert!(!seen.contains("event: error"), "{seen}");
    // The next start reads what was stored: one success, nothing cancelled.
    let gw = start(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    let stats = get(gw.addr, "/_ccgate/stats", &[]).await.json();
    assert_eq!(stats["lifetime"]["successful_requests"], 1, "{stats}");
    assert_eq!(stats["lifetime"]["cancelled"], 0, "{stats}");
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_timeout_bounds_the_drain() {
    let up = MockUpstream::start().await;
    // A stream that never ends: first delta, then silence.
    let (_sb, _cfg, mut gw, mut body, mut seen) = serving_a_stalled_stream(&up, 4, "1s").await;
    let t0 = Instant::now();
    gw.signal("TERM");
    wait_until_refused(gw.addr).await;
    assert!(gw.is_running(), "exited without draining at all");
    let f = gw.finish().await;
    let took = t0.elapsed();
    assert_eq!(f.status.code(), Some(0), "{}", f.output());
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the 1s shutdown_timeout"
    );
    assert!(
        took < Duration::from_secs(10),
        "shutdown_timeout 1s did not bound the drain: {took:?}"
    );
    // The client's stream ends instead of hanging, with an `error` event that says why (not a
    // silent cut: audit), and the body ends cleanly.
    read_to_clean_end(&mut body, &mut seen).await;
    assert!(!seen.contains("message_stop"), "{seen}");
    assert!(seen.contains("event: error"), "{seen}");
    assert!(seen.contains("api_error"), "{seen}");
    assert!(seen.contains("shutting down"), "{seen}");
}

// ---------------------------------------------------------------------------------------------
// Config errors.
// ---------------------------------------------------------------------------------------------

/// Problems in this file: an unknown key (line 3), a bad duration (6), a duplicate endpoint name
/// (14), a bad URL (20), a missing credential (the endpoint at 23).
const BAD_CONFIG: &str = r#"[server]
listen = "127.0.0.1:0"
lisen = "127.0.0.1:1"

[timeouts]
idle = "soon"

[[endpoints]]
name = "relay"
base_url = "http://127.0.0.1:9"
api_key = "k1"

[[endpoints]]
name = "relay"
base_url = "http://127.0.0.1:9"
api_key = "k2"

[[endpoints]]
name = "broken-url"
base_url = "ftp://relay.example"
api_key = "k3"

[[endpoints]]
name = "no-cred"
base_url = "https://relay.example"
"#;

#[track_caller]
fn assert_names(f: &Finished, path: &Path, line_key: &[(usize, &str)]) {
    let p = path.display();
    for (line, key) in line_key {
        let want = format!("{p}:{line}: {key}:");
        assert!(
            f.stderr.contains(&want),
            "stderr lacks `{want}`\n{}",
            f.output()
        );
    }
}

#[tokio::test]
async fn bad_config_reports_every_problem_at_once() {
    let sb = Sandbox::new();
    let cfg = sb.write("bad.toml", BAD_CONFIG);
    let f = run(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    f.assert_refused();
    assert_names(
        &f,
        &cfg,
        &[
            (3, "server.lisen"),
            (6, "timeouts.idle"),
            (14, "endpoints[1].name"),
            (20, "endpoints[2].base_url"),
            (23, "endpoints[3].api_key"),
        ],
    );
}

#[tokio::test]
async fn bad_config_is_refused_before_binding_with_every_problem() {
    // The same file without the unknown key (the test above shows it reported together with the
    // rest), so the lines after it move up by one. `listen` names a port this test holds: had
    // ccgate tried to bind before validating, it would fail with "cannot listen" instead.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let text = BAD_CONFIG
        .replace("lisen = \"127.0.0.1:1\"\n", "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let sb = Sandbox::new();
    let cfg = sb.write("bad.toml", &text);
    let want = [
        (5, "timeouts.idle"),
        (13, "endpoints[1].name"),
        (19, "endpoints[2].base_url"),
        (22, "endpoints[3].api_key"),
    ];
    let f = run(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    f.assert_refused();
    assert_names(&f, &cfg, &want);
    assert!(f.stderr.contains("4 problems"), "{}", f.output());
    assert!(!f.stderr.contains("cannot listen"), "{}", f.output());
    assert!(
        f.stderr.contains("relay"),
        "the duplicate name is named\n{}",
        f.output()
    );

    let v = run(sb.command(&["validate", "--config", cfg.to_str().expect("utf-8")])).await;
    v.assert_refused();
    assert_names(&v, &cfg, &want);
    drop(held);
}

/// Issue 21 #1 and #2: values of the wrong type are reported beside every other problem, each
/// under its full key, and a duplicate name is found although one of the two endpoints is broken.
const MISTYPED_CONFIG: &str = r#"[server]
listen = "127.0.0.1:0"
strategy = "fastest"
max_attempts = "3"

[[endpoints]]
name = "relay"
base_url = "http://127.0.0.1:9"
api_key = "k1"
priority = "high"

[[endpoints]]
name = "relay"
base_url = "ftp://relay.example"
api_key = "k2"
weight = 1.5
"#;

#[tokio::test]
async fn type_errors_are_reported_with_every_other_problem_under_full_keys() {
    let sb = Sandbox::new();
    let cfg = sb.write("typed.toml", MISTYPED_CONFIG);
    let want = [
        (3, "server.strategy"),
        (4, "server.max_attempts"),
        (10, "endpoints[0].priority"),
        (13, "endpoints[1].name"),
        (14, "endpoints[1].base_url"),
        (16, "endpoints[1].weight"),
    ];
    for cmd in ["validate", "serve"] {
        let f = run(sb.command(&[cmd, "--config", cfg.to_str().expect("utf-8")])).await;
        f.assert_refused();
        assert_names(&f, &cfg, &want);
        assert!(f.stderr.contains("6 problems"), "{cmd}\n{}", f.output());
        assert!(
            f.stderr.contains("expected an integer, found a string"),
            "{cmd}\n{}",
            f.output()
        );
        assert!(!f.stderr.contains("is required"), "{cmd}\n{}", f.output());
    }
}

#[tokio::test]
async fn unknown_key_is_reported_with_its_line() {
    let sb = Sandbox::new();
    let cfg = sb.write(
        "c.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\nlisen = \"127.0.0.1:1\"\n\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\n",
    );
    let f = run(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    f.assert_refused();
    let want = format!("{}:3:", cfg.display());
    assert!(f.stderr.contains(&want), "{}", f.output());
    assert!(f.stderr.contains("lisen"), "{}", f.output());
}

#[tokio::test]
async fn toml_syntax_error_reports_its_line() {
    let sb = Sandbox::new();
    let cfg = sb.write(
        "c.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[endpoints]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\n",
    );
    for cmd in ["serve", "validate"] {
        let f = run(sb.command(&[cmd, "--config", cfg.to_str().expect("utf-8")])).await;
        f.assert_refused();
        let want = format!("{}:4:", cfg.display());
        assert!(
            f.stderr.contains(&want),
            "{cmd}: lacks `{want}`\n{}",
            f.output()
        );
    }
}

#[tokio::test]
async fn syntax_error_on_a_secret_line_does_not_echo_it() {
    let sb = Sandbox::new();
    let secret = "sk-ant-api03-Unquoted7Hq2Lw";
    let cfg = sb.write(
        "c.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = {secret}\n"
        ),
    );
    let f = run(sb.command(&["validate", "--config", cfg.to_str().expect("utf-8")])).await;
    f.assert_refused();
    assert!(f.stderr.contains(":7:"), "{}", f.output());
    f.assert_no_secret(&[secret, "Unquoted7Hq2Lw"]);
}

// ---------------------------------------------------------------------------------------------
// Config path resolution.
// ---------------------------------------------------------------------------------------------

/// A config with one endpoint `name` at `url`, listening on a free loopback port.
fn named_config(name: &str, url: &str, key: &str) -> String {
    config(&[(name, url, key)], "")
}

#[tokio::test]
async fn config_path_resolution_order() {
    let sb = Sandbox::new();
    let url = "http://127.0.0.1:9";
    let flag = sb.write("flag.toml", &named_config("from-flag", url, "k1"));
    let env = sb.write("env.toml", &named_config("from-env", url, "k2"));
    let xdg = sb.write_at(&sb.default_config(), &named_config("from-xdg", url, "k3"));
    let home = sb.write_at(
        &sb.home().join(".config/ccgate/config.toml"),
        &named_config("from-home", url, "k4"),
    );
    let names = ["from-flag", "from-env", "from-xdg", "from-home", "default"];
    let only = |f: &Finished, want: &str, path: &Path| {
        f.assert_success();
        assert!(
            f.stdout.starts_with(&format!("{}: ok", path.display())),
            "expected {}\n{}",
            path.display(),
            f.output()
        );
        for n in names {
            assert_eq!(f.stdout.contains(n), n == want, "{n}\n{}", f.output());
        }
    };
    // The ANTHROPIC_* fallback is set throughout: a config file always wins over it.
    let cmd = |args: &[&str]| {
        let mut c = sb.command(args);
        c.env("ANTHROPIC_API_KEY", "sk-env-fallback");
        c
    };

    // --config beats $CCGATE_CONFIG and the default path.
    let mut c = cmd(&["validate", "--config", flag.to_str().expect("utf-8")]);
    c.env("CCGATE_CONFIG", &env);
    only(&run(c).await, "from-flag", &flag);

    // $CCGATE_CONFIG beats the default path.
    let mut c = cmd(&["validate"]);
    c.env("CCGATE_CONFIG", &env);
    only(&run(c).await, "from-env", &env);

    // The default path: $XDG_CONFIG_HOME/ccgate/config.toml ...
    only(&run(cmd(&["validate"])).await, "from-xdg", &xdg);

    // ... or $HOME/.config/ccgate/config.toml without XDG_CONFIG_HOME.
    let mut c = cmd(&["validate"]);
    c.env_remove("XDG_CONFIG_HOME");
    only(&run(c).await, "from-home", &home);
}

#[tokio::test]
async fn serve_finds_the_default_config() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    sb.write_at(
        &sb.default_config(),
        &named_config("from-xdg", &up.url(), "sk-default-path-key"),
    );
    let gw = start(sb.command(&["serve"])).await;
    let a = post_message(gw.addr, &[], false).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-ccgate-endpoint"), Some("from-xdg"));
    assert_eq!(
        up.received()[0].header("x-api-key"),
        Some("sk-default-path-key")
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_named_config_that_does_not_exist_is_an_error() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    // Both fallbacks exist; naming a missing file must still fail rather than use them.
    sb.write_at(
        &sb.default_config(),
        &named_config("from-xdg", &up.url(), "k"),
    );
    let missing = sb.path("missing.toml");
    let missing_s = missing.to_str().expect("utf-8");
    for via_env in [false, true] {
        let mut c = if via_env {
            let mut c = sb.command(&["serve"]);
            c.env("CCGATE_CONFIG", &missing);
            c
        } else {
            sb.command(&["serve", "--config", missing_s])
        };
        c.env("ANTHROPIC_API_KEY", "k")
            .env("ANTHROPIC_BASE_URL", up.url());
        let f = match try_start(c).await {
            Ok(gw) => panic!("served {} although the named config is missing", gw.addr),
            Err(f) => f,
        };
        f.assert_refused();
        assert!(f.stderr.contains(missing_s), "{}", f.output());
    }
    assert_eq!(up.count(), 0);
}

// ---------------------------------------------------------------------------------------------
// No config file: the ANTHROPIC_* environment.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn without_config_the_api_key_env_serves_one_endpoint() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let key = "sk-ant-from-env-J8cT";
    let mut c = sb.command(&["serve", "--listen", "127.0.0.1:0"]);
    c.env("ANTHROPIC_BASE_URL", up.url())
        .env("ANTHROPIC_API_KEY", key);
    let gw = start(c).await;
    assert_eq!(gw.addr.ip(), Ipv4Addr::LOCALHOST);
    let a = post_message(gw.addr, &[("authorization", "Bearer client-token")], false).await;
    assert_eq!(a.status, 200, "{a:?}");
    let r = up.received();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].header_all("x-api-key"), [key]);
    assert_eq!(r[0].header("authorization"), None);
    assert_eq!(r[0].path_and_query, "/v1/messages?beta=true");
    let f = gw.stop().await;
    f.assert_no_secret(&[key]);
}

#[tokio::test]
async fn without_config_the_auth_token_env_is_sent_as_bearer() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let token = "tok-from-env-Ww3p";
    let mut c = sb.command(&["serve", "--listen", "127.0.0.1:0"]);
    // A path prefix on the base URL is kept.
    c.env("ANTHROPIC_BASE_URL", format!("{}/relay", up.url()))
        .env("ANTHROPIC_AUTH_TOKEN", token);
    let gw = start(c).await;
    let a = post_message(gw.addr, &[("x-api-key", "client-own-key")], false).await;
    assert_eq!(a.status, 200, "{a:?}");
    let r = up.received();
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].header_all("authorization"),
        [format!("Bearer {token}").as_str()]
    );
    assert_eq!(r[0].header("x-api-key"), None);
    assert_eq!(r[0].path_and_query, "/relay/v1/messages?beta=true");
    let f = gw.stop().await;
    f.assert_no_secret(&[token]);
}

#[tokio::test]
async fn without_config_or_env_it_points_to_init() {
    let sb = Sandbox::new();
    // Even with a base URL: without a credential there is nothing to serve.
    let mut c = sb.command(&["serve", "--listen", "127.0.0.1:0"]);
    c.env("ANTHROPIC_BASE_URL", "http://127.0.0.1:9");
    let f = run(c).await;
    f.assert_refused();
    assert!(f.stderr.contains("ccgate init"), "{}", f.output());
    let f = run(sb.command(&["serve"])).await;
    f.assert_refused();
    assert!(f.stderr.contains("ccgate init"), "{}", f.output());
}

// ---------------------------------------------------------------------------------------------
// Non-loopback listen.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn non_loopback_listen_without_access_token_is_refused() {
    let sb = Sandbox::new();
    let cfg = sb.write(
        "c.toml",
        "[server]\nlisten = \"0.0.0.0:0\"\n\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\n",
    );
    let f = run(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    f.assert_refused();
    assert!(
        f.stderr
            .contains(&format!("{}:2: server.listen:", cfg.display())),
        "{}",
        f.output()
    );
    assert!(f.stderr.contains("access_token"), "{}", f.output());
    assert!(f.stderr.contains("loopback"), "{}", f.output());

    // The same through `serve --listen` on a loopback config.
    let cfg = sb.write("d.toml", &one_endpoint("http://127.0.0.1:9", "k", ""));
    let f = run(sb.command(&[
        "serve",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--listen",
        "0.0.0.0:0",
    ]))
    .await;
    f.assert_refused();
    assert!(f.stderr.contains("access_token"), "{}", f.output());
    assert!(f.stderr.contains("loopback"), "{}", f.output());
}

#[tokio::test]
async fn listen_flag_refuses_an_endpoint_at_its_own_address() {
    // A port this test holds, so nothing else can take it meanwhile.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let sb = Sandbox::new();
    let cfg = sb.write(
        "c.toml",
        &one_endpoint(&format!("http://localhost:{port}"), "k", ""),
    );
    let listen = format!("127.0.0.1:{port}");
    let f = run(sb.command(&[
        "serve",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--listen",
        &listen,
    ]))
    .await;
    f.assert_refused();
    assert!(f.stderr.contains("own address"), "{}", f.output());
    assert!(!f.stderr.contains("cannot listen"), "{}", f.output());
    drop(held);
}

#[tokio::test]
async fn non_loopback_listen_with_access_token_serves_and_checks_it() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let token = "gw-access-Hb61z";
    let cfg = sb.write(
        "c.toml",
        &format!(
            "[server]\nlisten = \"0.0.0.0:0\"\naccess_token = \"{token}\"\n\n[[endpoints]]\nname = \"a\"\nbase_url = \"{}\"\napi_key = \"sk-upstream-k\"\n",
            up.url()
        ),
    );
    let gw = start(sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")])).await;
    assert!(gw.addr.ip().is_unspecified(), "{}", gw.line);
    let addr = gw.connect_addr();

    let a = post_message(addr, &[], false).await;
    assert_eq!(a.status, 401, "no token: {a:?}");
    let a = post_message(addr, &[("x-api-key", "wrong")], false).await;
    assert_eq!(a.status, 401, "wrong token: {a:?}");
    assert_eq!(
        up.count(),
        0,
        "unauthenticated requests reached the upstream"
    );

    let a = post_message(addr, &[("x-api-key", token)], false).await;
    assert_eq!(a.status, 200, "{a:?}");
    let bearer = format!("Bearer {token}");
    let a = post_message(addr, &[("authorization", &bearer)], false).await;
    assert_eq!(a.status, 200, "{a:?}");
    for r in up.received() {
        assert_eq!(r.header_all("x-api-key"), ["sk-upstream-k"]);
        assert_eq!(
            r.header("authorization"),
            None,
            "the access token was forwarded"
        );
    }
    assert_eq!(get(addr, "/_ccgate/health", &[]).await.status, 200);
    let f = gw.stop().await;
    f.assert_no_secret(&[token]);
}

// ---------------------------------------------------------------------------------------------
// init.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn init_from_flags_writes_a_private_config_that_validates_and_serves() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let key = "sk-ant-init-flag-Rr5e";
    let path = sb.path("conf/sub/ccgate.toml");
    let path_s = path.to_str().expect("utf-8");
    let f = run(sb.command(&[
        "init",
        "--config",
        path_s,
        "--base-url",
        &up.url(),
        "--api-key",
        key,
    ]))
    .await;
    f.assert_success();
    f.assert_no_secret(&[key]);
    assert_eq!(mode_of(&path), 0o600, "init must write an owner-only file");
    assert!(std::fs::read_to_string(&path).expect("read").contains(key));

    let v = run(sb.command(&["validate", "--config", path_s])).await;
    v.assert_success();
    v.assert_no_secret(&[key]);
    assert!(v.stdout.contains(&up.url()), "{}", v.output());

    // The starter config listens on the default port; --listen keeps this test off it.
    let gw = start(sb.command(&["serve", "--config", path_s, "--listen", "127.0.0.1:0"])).await;
    let a = post_message(gw.addr, &[], false).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(up.received()[0].header("x-api-key"), Some(key));
    let f = gw.stop().await;
    f.assert_no_secret(&[key]);
    assert!(
        !f.stderr.contains("can be read by other users"),
        "{}",
        f.output()
    );
}

#[tokio::test]
async fn init_from_env_writes_the_default_path_and_serve_uses_it() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let token = "tok-init-env-Pz02";
    let mut c = sb.command(&["init"]);
    c.env("ANTHROPIC_BASE_URL", up.url())
        .env("ANTHROPIC_AUTH_TOKEN", token);
    let f = run(c).await;
    f.assert_success();
    f.assert_no_secret(&[token]);
    let path = sb.default_config();
    assert_eq!(mode_of(&path), 0o600);
    let written: toml::Table = std::fs::read_to_string(&path)
        .expect("read")
        .parse()
        .expect("init writes valid TOML");
    let ep = &written["endpoints"][0];
    assert_eq!(ep["auth_token"].as_str(), Some(token));
    assert_eq!(ep["base_url"].as_str(), Some(up.url().as_str()));
    assert!(ep.get("api_key").is_none());

    // Without any ANTHROPIC_* now: the written file alone drives the gateway.
    let v = run(sb.command(&["validate"])).await;
    v.assert_success();
    v.assert_no_secret(&[token]);
    let gw = start(sb.command(&["serve", "--listen", "127.0.0.1:0"])).await;
    let a = post_message(gw.addr, &[], false).await;
    assert_eq!(a.status, 200, "{a:?}");
    let bearer = format!("Bearer {token}");
    assert_eq!(
        up.received()[0].header("authorization"),
        Some(bearer.as_str())
    );
    gw.stop().await;
}

#[tokio::test]
async fn init_never_overwrites_without_force() {
    let sb = Sandbox::new();
    let path = sb.write("ccgate.toml", "# mine, keep me\n");
    set_mode(&path, 0o644);
    let path_s = path.to_str().expect("utf-8");
    let f = run(sb.command(&["init", "--config", path_s, "--api-key", "k-new"])).await;
    f.assert_refused();
    assert!(f.stderr.contains("--force"), "{}", f.output());
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        "# mine, keep me\n"
    );

    let f = run(sb.command(&["init", "--config", path_s, "--api-key", "k-new", "--force"])).await;
    f.assert_success();
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains("api_key = \"k-new\""), "{text}");
    assert_eq!(
        mode_of(&path),
        0o600,
        "--force must leave an owner-only file"
    );
    run(sb.command(&["validate", "--config", path_s]))
        .await
        .assert_success();
}

#[tokio::test]
async fn init_credential_flag_beats_the_environment() {
    let sb = Sandbox::new();
    let path = sb.path("ccgate.toml");
    let mut c = sb.command(&[
        "init",
        "--config",
        path.to_str().expect("utf-8"),
        "--auth-token",
        "tok-from-flag",
    ]);
    c.env("ANTHROPIC_API_KEY", "sk-from-env");
    run(c).await.assert_success();
    let text = std::fs::read_to_string(&path).expect("read");
    let written: toml::Table = text.parse().expect("valid TOML");
    let ep = &written["endpoints"][0];
    assert_eq!(ep["auth_token"].as_str(), Some("tok-from-flag"), "{text}");
    assert!(ep.get("api_key").is_none(), "{text}");
    assert!(!text.contains("sk-from-env"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// validate and secrets.
// ---------------------------------------------------------------------------------------------

const KEY_A: &str = "sk-ant-api03-SecretA-7f3kQ";
const TOKEN_B: &str = "relay-token-SecretB-m2Zx";
const KEY_C: &str = "sk-ant-api03-SecretC-env-9Lq";
const ACCESS: &str = "gw-access-SecretD-Vn4";

fn secrets() -> [&'static str; 8] {
    [
        KEY_A,
        TOKEN_B,
        KEY_C,
        ACCESS,
        // The distinctive tails too, in case a secret is shown cut or masked at the front.
        "SecretA-7f3kQ",
        "SecretB-m2Zx",
        "SecretC-env-9Lq",
        "SecretD-Vn4",
    ]
}

/// Three endpoints with every kind of credential, and an access token.
fn secret_config(a: &str, b: &str, c: &str, extra_endpoint_line: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
access_token = "{ACCESS}"

[health]
failure_threshold = 2
probe_interval = "10m"
probe_max_interval = "10m"

[[endpoints]]
name = "a"
base_url = "{a}"
api_key = "{KEY_A}"
priority = 1

[[endpoints]]
name = "b"
base_url = "{b}"
auth_token = "{TOKEN_B}"
priority = 2

[[endpoints]]
name = "c"
base_url = "{c}"
api_key_env = "CCGATE_TEST_KEY_C"
priority = 3
{extra_endpoint_line}
"#
    )
}

#[tokio::test]
async fn validate_exit_codes_and_no_secrets() {
    let sb = Sandbox::new();
    // Upstreams that are never contacted: `validate` only reads the file.
    let offline = |extra: &str| {
        secret_config(
            "https://a.example",
            "https://b.example/api",
            "http://127.0.0.1:9",
            extra,
        )
    };
    // `validate` with the variable that endpoint `c` takes its key from.
    let validate_with_key_c = |path: &Path| {
        let mut c = sb.command(&["validate", "--config", path.to_str().expect("utf-8")]);
        c.env("CCGATE_TEST_KEY_C", KEY_C);
        run(c)
    };
    let good = sb.write("good.toml", &offline(""));
    let f = validate_with_key_c(&good).await;
    f.assert_success();
    assert_eq!(f.status.code(), Some(0));
    for name in ["a", "b", "c"] {
        assert!(
            f.stdout.contains(&format!("  {name} -> ")),
            "{name}\n{}",
            f.output()
        );
    }
    f.assert_no_secret(&secrets());

    // One problem, everything else as before: non-zero, the problem named, still no secret.
    let bad = sb.write("bad.toml", &offline("weight = 0"));
    let f = validate_with_key_c(&bad).await;
    f.assert_refused();
    assert!(f.stderr.contains("endpoints[2].weight"), "{}", f.output());
    f.assert_no_secret(&secrets());

    // A missing environment variable is named, and a secret with a bad character is not echoed.
    let text = offline("").replace(KEY_A, &format!("{KEY_A} x"));
    let bad = sb.write("bad2.toml", &text);
    let f = run(sb.command(&["validate", "--config", bad.to_str().expect("utf-8")])).await;
    f.assert_refused();
    assert!(f.stderr.contains("endpoints[0].api_key"), "{}", f.output());
    assert!(f.stderr.contains("CCGATE_TEST_KEY_C"), "{}", f.output());
    f.assert_no_secret(&secrets());
}

/// A full serve run against upstreams that all fail, two of them echoing the credential they
/// were sent; `probe` also runs admin probes (whose failures are logged and shown). Collects every
/// place a secret shows up: the process's stdout/stderr and the gateway's own answers.
async fn failing_serve_run(probe: bool) {
    let up_a = MockUpstream::start().await;
    up_a.set_default(Script::error(
        401,
        "authentication_error",
        &format!("invalid x-api-key: {KEY_A}"),
    ));
    let up_b = MockUpstream::start().await;
    up_b.set_default(Script::error(
        500,
        "api_error",
        &format!("upstream failed for Bearer {TOKEN_B}"),
    ));
    let up_c = MockUpstream::start().await;
    up_c.set_default(Script::reset_before_headers());

    let sb = Sandbox::new();
    let cfg = sb.write(
        "ccgate.toml",
        &secret_config(&up_a.url(), &up_b.url(), &up_c.url(), ""),
    );
    let mut c = sb.command(&["serve", "--config", cfg.to_str().expect("utf-8")]);
    c.env("CCGATE_TEST_KEY_C", KEY_C).env("RUST_LOG", "trace");
    let gw = start(c).await;
    let addr = gw.addr;
    let auth = [("x-api-key", ACCESS)];

    let mut answers = Vec::new();
    for stream in [false, true, false, true] {
        answers.push(post_message(addr, &auth, stream).await);
    }
    // A wrong access token is refused without echoing anything secret.
    answers.push(post_message(addr, &[("x-api-key", "wrong-token")], false).await);
    assert!(
        answers[..4].iter().all(|a| a.status.as_u16() >= 500),
        "{answers:#?}"
    );
    assert_eq!(answers[4].status, 401);
    if probe {
        for name in ["a", "b", "c"] {
            let path = format!("/_ccgate/endpoints/{name}/probe");
            let a = call(addr, Method::POST, &path, &auth, String::new()).await;
            assert_eq!(a.status, 200, "{a:?}");
            answers.push(a);
        }
    }
    for path in [
        "/_ccgate/endpoints",
        "/_ccgate/endpoints/a",
        "/_ccgate/failure-queue",
        "/_ccgate/stats",
    ] {
        answers.push(get(addr, path, &auth).await);
    }
    // The echoed credentials did reach ccgate and went through its error path.
    assert_eq!(up_a.received()[0].header("x-api-key"), Some(KEY_A));
    let view = get(addr, "/_ccgate/endpoints/a", &auth).await;
    assert!(view.body.contains("invalid x-api-key"), "{view:?}");
    assert!(up_b.count() >= 1 && up_c.count() >= 1);

    let f = gw.stop().await;
    assert!(
        f.stderr.lines().count() > 10,
        "expected trace logs of the failures\n{}",
        f.output()
    );
    let mut leaks = Vec::new();
    for s in secrets() {
        for (what, text) in [("stdout", &f.stdout), ("stderr", &f.stderr)] {
            for line in text.lines().filter(|l| l.contains(s)) {
                leaks.push(format!("`{s}` in {what}: {line}"));
            }
        }
        for a in &answers {
            if a.body.contains(s) {
                leaks.push(format!("`{s}` in an answer: {}", a.body));
            }
            for (name, v) in &a.headers {
                if v.to_str().unwrap_or("").contains(s) {
                    leaks.push(format!("`{s}` in header {name}: {v:?}"));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

#[tokio::test]
async fn a_config_readable_by_others_is_warned_about() {
    let sb = Sandbox::new();
    let cfg = sb.write("c.toml", &one_endpoint("http://127.0.0.1:9", "k", ""));
    let cfg_s = cfg.to_str().expect("utf-8");
    let f = run(sb.command(&["validate", "--config", cfg_s])).await;
    f.assert_success();
    assert!(!f.stderr.contains("other users"), "{}", f.output());
    set_mode(&cfg, 0o644);
    let f = run(sb.command(&["validate", "--config", cfg_s])).await;
    f.assert_success();
    assert!(
        f.stderr.contains(cfg_s) && f.stderr.contains("other users"),
        "{}",
        f.output()
    );
}

#[tokio::test]
async fn secrets_never_reach_the_output_of_a_failing_serve_run() {
    failing_serve_run(false).await;
}

#[tokio::test]
async fn secrets_never_leak_through_failed_probes() {
    failing_serve_run(true).await;
}

/// A second gateway on an address in use says so once, clearly, and exits non-zero (audit: the
/// reason was printed twice).
#[tokio::test]
async fn an_address_in_use_is_named_once() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write("ccgate.toml", &one_endpoint(&up.url(), "k", ""));
    let cfg = cfg.to_str().expect("utf-8");
    let first = start(sb.command(&["serve", "--config", cfg])).await;
    let addr = first.addr.to_string();
    let f = run(sb.command(&["serve", "--config", cfg, "--listen", &addr])).await;
    f.assert_failure();
    assert!(
        f.stderr.contains(&format!("cannot listen on {addr}: ")),
        "{}",
        f.output()
    );
    assert_eq!(f.stderr.matches("os error").count(), 1, "{}", f.output());
    first.stop().await;
}
