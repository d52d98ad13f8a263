//! ccgate running out of its own file descriptors is not an endpoint failure, through the real
//! binary.
//!
//! The `ccgate serve` child is started under a low open-file limit (`ulimit -n` in `sh`, then
//! `exec`: the crate forbids `unsafe`, so no `pre_exec`/`setrlimit`). Each proxied stream costs it
//! two descriptors (the client connection and the upstream one), and the mock upstreams hold every
//! stream open behind a gate, so a burst of concurrent streaming requests runs it out of
//! descriptors while it connects upstream. The test proves that then:
//!
//! * a request whose upstream socket cannot be created gets `503` with an `overloaded_error` body
//!   saying ccgate is out of local resources (at least one does), and every other client gets a
//!   complete stream or had its connection refused or closed before an answer;
//! * no endpoint is ejected or cooling down, neither one's `endpoint_errors` / `failed_requests` /
//!   `consecutive_failures` rose, the failure queue stays empty, each such attempt counts as
//!   cancelled, and no request failed over (the upstreams saw exactly the streams that succeeded);
//! * once the streams end, ccgate serves a normal request with `200` again.
#![cfg(target_os = "linux")]

#[path = "support/mock.rs"]
mod mock;
#[path = "support/process.rs"]
mod process;
#[path = "support/wait.rs"]
mod wait;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use mock::{Gate, MockUpstream, Script};
use process::{Sandbox, endpoint_entry, get, message_body, post_message, start};
use wait::{eventually_ok, within};

/// The message of ccgate's answer when it cannot open an upstream connection for want of its own
/// descriptors, sockets or ports.
const OUT_OF_RESOURCES: &str =
    "ccgate is out of local resources (file descriptors, sockets or ports); try again";

/// Descriptors ccgate gets above what it holds at idle: room for a few proxied streams.
const HEADROOM: usize = 20;

/// The tests here start ccgate one at a time: the burst test counts descriptors to the unit, and
/// another gateway starting beside it (in this same test process) upset that count.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Concurrent streaming requests in the burst: at two descriptors each they need four times the
/// headroom.
const CLIENTS: usize = 2 * HEADROOM;

/// The events a held stream sends before waiting for the gate (`message_start`,
/// `content_block_start`, `ping`): the client has its `200` head while the stream is held.
const HELD_AFTER: usize = 3;

/// `ccgate ARGS` as `sb.command` runs it (same cleared environment and working directory), but
/// started through `sh`, which writes its process id to `pid_file` (kept by `exec`) and, given
/// `ulimit` (say `-n 41`: soft and hard), runs `ulimit` with it first.
fn command_via_sh(sb: &Sandbox, ulimit: Option<&str>, pid_file: &Path, args: &[&str]) -> Command {
    let template = sb.command(args);
    let limit = ulimit.map_or(String::new(), |u| format!("ulimit {u} && "));
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!(
            "echo $$ > '{}' && {limit}exec \"$0\" \"$@\"",
            pid_file.display()
        ))
        .arg(template.get_program())
        .args(template.get_args())
        .env_clear();
    for (key, value) in template.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    if let Some(dir) = template.get_current_dir() {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The process id `sh` wrote to `pid_file`, checked to be ccgate's now.
fn pid_from(pid_file: &Path) -> u32 {
    let text = std::fs::read_to_string(pid_file).expect("read the pid file");
    let pid: u32 = text.trim().parse().expect("a process id");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("read comm");
    assert_eq!(comm.trim(), "ccgate", "process {pid} is ccgate after exec");
    pid
}

/// How many descriptors process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

/// The soft and hard open-file limits of process `pid`, from `/proc/PID/limits`.
fn nofile_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file limit in\n{limits}"));
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next().expect("soft limit").to_string();
    let hard = fields.next().expect("hard limit").to_string();
    (soft, hard)
}

/// How one client of the burst fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// `200` with an event stream that ended with `message_stop`.
    Stream,
    /// `200` with an event stream that did not end with `message_stop`: the test fails on it.
    PartialStream,
    /// ccgate's `503` for running out of local resources.
    OutOfResources,
    /// The connection was refused, reset or closed before an answer.
    NoAnswer,
    /// Any other answer: the test fails on it.
    Unexpected,
}

/// One streaming request on `stream`: its fate and what was seen (for failure messages).
/// `heads` hears the status as soon as the response head arrives.
async fn one_stream(
    stream: std::io::Result<TcpStream>,
    addr: SocketAddr,
    heads: mpsc::UnboundedSender<StatusCode>,
) -> (Fate, String) {
    let stream = match stream {
        Ok(s) => s,
        Err(e) => return (Fate::NoAnswer, format!("connect: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => return (Fate::NoAnswer, format!("handshake: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/messages")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(message_body(Some(true)))))
        .expect("valid request");
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return (Fate::NoAnswer, format!("request: {e}")),
    };
    let status = resp.status();
    let _ = heads.send(status);
    let is_stream = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let body = match resp.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(e) => format!("<body broke: {e}>"),
    };
    let seen = format!("{status}: {body}");
    if status == StatusCode::OK && is_stream {
        return if body.contains("event: message_stop") {
            (Fate::Stream, seen)
        } else {
            (Fate::PartialStream, seen)
        };
    }
    let json: Option<Value> = serde_json::from_str(&body).ok();
    let ours = json.as_ref().is_some_and(|j| {
        j["type"] == "error"
            && j["error"]["type"] == "overloaded_error"
            && j["error"]["message"] == OUT_OF_RESOURCES
    });
    if status == StatusCode::SERVICE_UNAVAILABLE && ours {
        (Fate::OutOfResources, seen)
    } else {
        (Fate::Unexpected, seen)
    }
}

#[tokio::test]
async fn running_out_of_descriptors_answers_503_and_ejects_no_endpoint() {
    let _one_at_a_time = SERIAL.lock().await;
    let gate = Gate::new();
    let (up_a, up_b) = (MockUpstream::start().await, MockUpstream::start().await);
    for up in [&up_a, &up_b] {
        let gate = gate.clone();
        up.set_default_fn(move |req| {
            let stream = req
                .json()
                .and_then(|v| v["stream"].as_bool())
                .unwrap_or(false);
            if stream {
                Script::sse_ok(2).gate_after(HELD_AFTER, gate.clone())
            } else {
                Script::json_ok()
            }
        });
    }
    let sb = Sandbox::new();
    // Two workers whatever the machine, so the idle descriptor count (each worker has its own
    // event loop) is the same in the measuring run and the limited one; a quiet prober.
    let cfg = sb.write(
        "ccgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\
             [health]\nprobe_interval = \"1h\"\nprobe_max_interval = \"1h\"\n\
             [storage]\nenabled = false\n\
             [[endpoints]]\nname = \"a\"\nbase_url = \"{}\"\napi_key = \"key-a\"\n\
             [[endpoints]]\nname = \"b\"\nbase_url = \"{}\"\napi_key = \"key-b\"\n",
            up_a.url(),
            up_b.url()
        ),
    );
    let args = ["serve", "--config", cfg.to_str().expect("utf-8 path")];

    // What ccgate holds at idle (event loops, the listener, signal pipes, stdio), measured once
    // its serving loop answered a request.
    let idle = {
        let pid_file = sb.path("probe.pid");
        let probe = start(command_via_sh(&sb, None, &pid_file, &args)).await;
        assert_eq!(get(probe.addr, "/_ccgate/health", &[]).await.status, 200);
        let idle = open_fds(pid_from(&pid_file));
        let _ = probe.stop().await;
        idle
    };
    let nofile = idle + HEADROOM;

    let pid_file = sb.path("ccgate.pid");
    let gw = start(command_via_sh(
        &sb,
        Some(&format!("-n {nofile}")),
        &pid_file,
        &args,
    ))
    .await;
    let pid = pid_from(&pid_file);
    assert_eq!(
        nofile_limits(pid),
        (nofile.to_string(), nofile.to_string()),
        "ccgate runs under the open-file limit the test set"
    );
    let health = get(gw.addr, "/_ccgate/health", &[]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let at_start = open_fds(pid);
    assert!(
        at_start + HEADROOM / 2 <= nofile,
        "ccgate holds {at_start} descriptors at idle under a limit of {nofile}: no room for streams"
    );

    // The burst: every client connection is made first (the kernel completes them in the
    // listener's backlog whether or not ccgate can accept), then all requests go at once.
    let mut conns = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        conns.push(TcpStream::connect(gw.addr).await);
    }
    let (heads_tx, mut heads) = mpsc::unbounded_channel();
    let clients: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(one_stream(c, gw.addr, heads_tx.clone())))
        .collect();
    drop(heads_tx);

    // While the streams are held, ccgate runs out of descriptors: wait for the first answer that
    // is not a stream, then let the streams finish.
    let mut streams_open = 0;
    let first_other = tokio::time::timeout(wait::DEADLINE, async {
        loop {
            match heads.recv().await {
                Some(StatusCode::OK) => streams_open += 1,
                other => return other,
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no answer other than a stream within {:?}: {streams_open} streams open, ccgate \
             holds {} of {nofile} descriptors\nstderr:\n{}",
            wait::DEADLINE,
            open_fds(pid),
            gw.stderr_now()
        )
    });
    assert!(
        first_other.is_some(),
        "every client ended without a non-stream answer"
    );
    gate.open();

    let mut fates = Vec::with_capacity(CLIENTS);
    for c in clients {
        fates.push(
            within("a client of the burst", c)
                .await
                .expect("client task"),
        );
    }
    let count = |fate: Fate| fates.iter().filter(|(f, _)| *f == fate).count();
    let (streams, refused, no_answer) = (
        count(Fate::Stream),
        count(Fate::OutOfResources),
        count(Fate::NoAnswer),
    );
    let tally = format!(
        "{streams} streams, {refused} out-of-resources 503s, {no_answer} without an answer \
         (of {CLIENTS}; limit {nofile}, {at_start} open at idle)"
    );
    eprintln!("burst: {tally}");
    let unexpected: Vec<String> = fates
        .iter()
        .filter(|(f, _)| matches!(f, Fate::Unexpected | Fate::PartialStream))
        .map(|(f, seen)| format!("{f:?} {seen}"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "answers that are neither a whole stream nor the out-of-resources 503 ({tally}):\n\
         {}\nstderr:\n{}",
        unexpected.join("\n"),
        gw.stderr_now()
    );
    assert!(
        refused >= 1,
        "no request got the out-of-resources 503 ({tally})\nstderr:\n{}",
        gw.stderr_now()
    );
    // The out-of-resources attempts are logged.
    gw.stderr_until("attempt not sent").await;

    // The relay records an attempt a moment after its client read the end: wait for nothing in
    // flight, then read both endpoints from the same view.
    let view = eventually_ok("both endpoints idle", || async {
        let view = get(gw.addr, "/_ccgate/endpoints", &[]).await.json();
        let busy: Vec<String> = ["a", "b"]
            .iter()
            .filter(|n| endpoint_entry(&view, n)["in_flight"] != 0)
            .map(|n| endpoint_entry(&view, n).to_string())
            .collect();
        if busy.is_empty() {
            Ok(view)
        } else {
            Err(busy.join("\n"))
        }
    })
    .await;
    let mut cancelled = 0;
    for name in ["a", "b"] {
        let e = endpoint_entry(&view, name);
        assert_eq!(e["state"], "healthy", "{name} ({tally}): {e}");
        assert_eq!(e["cooldown_until"], Value::Null, "{name}: {e}");
        assert_eq!(e["endpoint_errors"], 0, "{name} ({tally}): {e}");
        assert_eq!(e["failed_requests"], 0, "{name} ({tally}): {e}");
        assert_eq!(e["consecutive_failures"], 0, "{name} ({tally}): {e}");
        cancelled += e["cancelled"].as_u64().expect("cancelled count");
    }
    assert_eq!(
        cancelled, refused as u64,
        "each out-of-resources attempt counts as cancelled, not the endpoint's fault ({tally})\n\
         {view}"
    );
    let queue = get(gw.addr, "/_ccgate/failure-queue", &[]).await.json();
    assert_eq!(queue["size"], 0, "{queue}");
    assert_eq!(queue["stats"]["total_failed"], 0, "{queue}");
    let stats = get(gw.addr, "/_ccgate/stats", &[]).await.json();
    assert_eq!(
        stats["upstream_errors"], refused as u64,
        "the 503s end their requests as upstream errors ({tally}): {stats}"
    );
    // No failover: the upstreams saw exactly the requests that became streams.
    assert_eq!(
        up_a.count() + up_b.count(),
        streams,
        "upstream requests vs streams ({tally})"
    );

    let after = post_message(gw.addr, &[]).await;
    assert_eq!(
        after.status, 200,
        "a normal request after the streams ended ({tally}): {}",
        after.body
    );
    assert_eq!(after.json()["type"], "message", "{}", after.body);
    let _ = gw.stop().await;
}

/// A soft open-file limit below the hard one (the usual 1,024 under a larger hard limit) is
/// raised to the hard limit when ccgate starts: each proxied stream holds two descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let _one_at_a_time = SERIAL.lock().await;
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write(
        "ccgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nenabled = false\n\
             [[endpoints]]\nname = \"a\"\nbase_url = \"{}\"\napi_key = \"key-a\"\n",
            up.url()
        ),
    );
    let args = ["serve", "--config", cfg.to_str().expect("utf-8 path")];
    let pid_file = sb.path("ccgate.pid");
    let gw = start(command_via_sh(&sb, Some("-Sn 64"), &pid_file, &args)).await;
    let pid = pid_from(&pid_file);
    // Answered once the serving loop runs, which raises the limit before it serves.
    assert_eq!(get(gw.addr, "/_ccgate/health", &[]).await.status, 200);
    let (soft, hard) = nofile_limits(pid);
    assert_ne!(hard, "64", "the test needs a hard limit above 64");
    assert_eq!(soft, hard, "the soft limit was raised to the hard one");
    // The raise is logged.
    gw.stderr_until("raised the open-file limit").await;
    let _ = gw.stop().await;
}
