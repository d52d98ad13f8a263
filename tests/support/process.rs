#![allow(dead_code)]
//! Runs the real `ccgate` binary in a sandbox: a temporary HOME and XDG directories and a cleared
//! environment, so the developer's own configuration and credentials never leak in. Children are
//! killed when dropped (a failing test leaves nothing behind); readiness of `serve` is its
//! `listening on http://ADDR` line. Shared by the suites that run the binary (`tests/cli.rs`,
//! `tests/cli_ops.rs`, `tests/persistence.rs`, `tests/reload.rs`), which include this file by
//! path. It needs `crate::wait` (`support/wait.rs`): a suite without `mod support` includes that
//! by path too, one with `mod support` brings it in with `use support::wait;` (loading the same
//! file twice in one crate is what clippy's `duplicate_mod` forbids).

use std::io::{BufRead, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Upper bound for anything that should happen promptly (start, a request, an exit).
pub use crate::wait::DEADLINE;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ccgate");

/// Temporary HOME / XDG dirs and a cleared environment.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    /// A fresh sandbox.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        for d in ["home", "xdg-config", "xdg-data", "xdg-cache", "xdg-state"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("create sandbox dir");
        }
        Self { dir }
    }

    /// A path inside the sandbox.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `$HOME`.
    pub fn home(&self) -> PathBuf {
        self.path("home")
    }

    /// Where `ccgate` finds its config without `--config` / `$CCGATE_CONFIG`.
    pub fn default_config(&self) -> PathBuf {
        self.path("xdg-config").join("ccgate").join("config.toml")
    }

    /// Claude Code's settings under the sandbox HOME.
    pub fn claude_settings(&self) -> PathBuf {
        self.home().join(".claude").join("settings.json")
    }

    /// Writes `text` to `path` (owner-only), creating its directory.
    pub fn write_at(&self, path: &Path, text: &str) -> PathBuf {
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create dir");
        std::fs::write(path, text).expect("write file");
        set_mode(path, 0o600);
        path.to_path_buf()
    }

    /// Writes `text` to the sandbox path `rel` (owner-only), creating its directory.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        self.write_at(&self.path(rel), text)
    }

    /// `ccgate ARGS` with only HOME, the XDG dirs and NO_COLOR set, all inside the sandbox.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_clear()
            .env("HOME", self.home())
            .env("XDG_CONFIG_HOME", self.path("xdg-config"))
            .env("XDG_DATA_HOME", self.path("xdg-data"))
            .env("XDG_CACHE_HOME", self.path("xdg-cache"))
            .env("XDG_STATE_HOME", self.path("xdg-state"))
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

/// A config with one endpoint per `(name, url, key)` and `server_extra` in its `[server]` table,
/// listening on a free loopback port.
pub fn config(endpoints: &[(&str, &str, &str)], server_extra: &str) -> String {
    let mut s = format!("[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n");
    for (name, url, key) in endpoints {
        s.push_str(&format!(
            "\n[[endpoints]]\nname = \"{name}\"\nbase_url = \"{url}\"\napi_key = \"{key}\"\n"
        ));
    }
    s
}

/// chmod.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The permission bits of a file.
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// A finished run.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Finished {
    /// Status and both streams, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Exited 0.
    #[track_caller]
    pub fn assert_success(&self) {
        assert!(self.status.success(), "expected success\n{}", self.output());
    }

    /// Exited with exactly `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) {
        assert_eq!(
            self.status.code(),
            Some(code),
            "expected exit code {code}\n{}",
            self.output()
        );
    }

    /// Failed with a real, non-zero exit code.
    #[track_caller]
    pub fn assert_failure(&self) {
        assert!(
            matches!(self.status.code(), Some(c) if c != 0),
            "expected a non-zero exit code\n{}",
            self.output()
        );
    }

    /// Failed with a real exit code (not killed by a signal) and printed no readiness line.
    #[track_caller]
    pub fn assert_refused(&self) {
        self.assert_failure();
        assert!(
            !self.stdout.contains("listening on"),
            "refused, but announced a listener\n{}",
            self.output()
        );
    }

    /// None of `secrets` appears in either stream.
    #[track_caller]
    pub fn assert_no_secret(&self, secrets: &[&str]) {
        for s in secrets {
            assert!(
                !self.stdout.contains(s) && !self.stderr.contains(s),
                "secret `{s}` appears in the output\n{}",
                self.output()
            );
        }
    }
}

/// A child process whose output is collected by two reader threads. Dropping it kills and reaps
/// the process.
pub struct Proc {
    child: Child,
    stdout_lines: mpsc::UnboundedReceiver<String>,
    stdout_seen: String,
    stderr: Arc<Stderr>,
    stderr_done: Option<oneshot::Receiver<()>>,
}

/// The child's stderr as read so far, and a wake-up for each read.
#[derive(Default)]
struct Stderr {
    text: Mutex<String>,
    grew: tokio::sync::Notify,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Spawns `cmd` (stdout and stderr piped).
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("spawn ccgate");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, stdout_lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Stderr::default());
        let sink = Arc::clone(&stderr);
        let (done_tx, stderr_done) = oneshot::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stderr_pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        sink.text
                            .lock()
                            .expect("stderr buffer")
                            .push_str(&String::from_utf8_lossy(&buf[..n]));
                        sink.grew.notify_waiters();
                    }
                }
            }
            let _ = done_tx.send(());
        });
        Self {
            child,
            stdout_lines,
            stdout_seen: String::new(),
            stderr,
            stderr_done: Some(stderr_done),
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line (with its newline), `None` at EOF; panics after [`DEADLINE`].
    pub async fn next_line(&mut self) -> Option<String> {
        let line = match tokio::time::timeout(DEADLINE, self.stdout_lines.recv()).await {
            Ok(line) => line,
            Err(_) => panic!(
                "no stdout line from ccgate in time\nstderr:\n{}",
                self.stderr_now()
            ),
        };
        if let Some(l) = &line {
            self.stdout_seen.push_str(l);
        }
        line
    }

    /// Stderr so far.
    pub fn stderr_now(&self) -> String {
        self.stderr.text.lock().expect("stderr buffer").clone()
    }

    /// Stderr once it contains `needle`: a line the child has written may still be on its way
    /// through the pipe to the reading thread. Panics after [`DEADLINE`].
    pub async fn stderr_until(&self, needle: &str) -> String {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let grew = self.stderr.grew.notified();
            tokio::pin!(grew);
            // Registered before the check, so growth between the check and the wait wakes it.
            grew.as_mut().enable();
            let now = self.stderr_now();
            if now.contains(needle) {
                return now;
            }
            if tokio::time::timeout_at(until, grew).await.is_err() {
                panic!("stderr never showed {needle:?}\nstderr:\n{now}");
            }
        }
    }

    /// Not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the exit. std has no wait with a timeout and there is no exit event to await
    /// here, so this polls `try_wait` against a deadline.
    async fn wait_exit(&mut self) -> ExitStatus {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < until,
                "ccgate did not exit in time\nstdout:\n{}\nstderr:\n{}",
                self.stdout_seen,
                self.stderr_now()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the exit, then returns everything the process printed.
    pub async fn finish(&mut self) -> Finished {
        let status = self.wait_exit().await;
        while self.next_line().await.is_some() {}
        if let Some(done) = self.stderr_done.take() {
            let _ = tokio::time::timeout(DEADLINE, done).await;
        }
        Finished {
            status,
            stdout: self.stdout_seen.clone(),
            stderr: self.stderr_now(),
        }
    }
}

/// Runs a command to completion.
pub async fn run(cmd: Command) -> Finished {
    Proc::spawn(cmd).finish().await
}

/// Runs a command with `input` on its standard input.
pub async fn run_with_stdin(mut cmd: Command, input: &str) -> Finished {
    cmd.stdin(Stdio::piped());
    let mut proc = Proc::spawn(cmd);
    {
        use std::io::Write;
        let mut stdin = proc.child.stdin.take().expect("piped stdin");
        stdin.write_all(input.as_bytes()).expect("write stdin");
    }
    proc.finish().await
}

/// A running `ccgate serve` (killed when dropped).
pub struct Serving {
    proc: Proc,
    /// The address from the `listening on` line.
    pub addr: SocketAddr,
    /// That line, with its newline.
    pub line: String,
}

/// Starts `ccgate serve` and waits for its readiness line; panics with its output if it exits
/// instead.
pub async fn start(cmd: Command) -> Serving {
    match try_start(cmd).await {
        Ok(s) => s,
        Err(f) => panic!("ccgate serve did not start\n{}", f.output()),
    }
}

/// Like [`start`], but a process that exits without a readiness line is returned as `Err` with
/// everything it printed. A first line that is not a readiness line still panics.
pub async fn try_start(cmd: Command) -> Result<Serving, Finished> {
    let mut proc = Proc::spawn(cmd);
    let Some(line) = proc.next_line().await else {
        // Stdout closed without a listener: it is exiting.
        return Err(proc.finish().await);
    };
    let addr = line
        .strip_prefix("listening on http://")
        .and_then(|l| l.strip_suffix('\n'))
        .and_then(|a| a.parse::<SocketAddr>().ok());
    let Some(addr) = addr else {
        panic!(
            "the first stdout line is not `listening on http://ADDR`: {line:?}\nstderr:\n{}",
            proc.stderr_now()
        );
    };
    assert_ne!(addr.port(), 0, "the readiness line must show the real port");
    Ok(Serving { proc, addr, line })
}

impl Serving {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where to connect: the listening address, or loopback when it listens on every address.
    pub fn connect_addr(&self) -> SocketAddr {
        if self.addr.ip().is_unspecified() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.addr.port()))
        } else {
            self.addr
        }
    }

    /// Stderr so far.
    pub fn stderr_now(&self) -> String {
        self.proc.stderr_now()
    }

    /// Stderr once it contains `needle`; see [`Proc::stderr_until`].
    pub async fn stderr_until(&self, needle: &str) -> String {
        self.proc.stderr_until(needle).await
    }

    /// Not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Sends `sig` (`TERM`, `INT`, `HUP`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let pid = self.proc.child.id().to_string();
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(&pid)
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {pid} failed");
    }

    /// Waits for the process to exit, then returns everything it printed.
    pub async fn finish(mut self) -> Finished {
        self.proc.finish().await
    }

    /// SIGTERM, then [`Serving::finish`]; asserts a clean exit.
    pub async fn stop(self) -> Finished {
        self.signal("TERM");
        let f = self.finish().await;
        assert_eq!(
            f.status.code(),
            Some(0),
            "SIGTERM must exit 0\n{}",
            f.output()
        );
        f
    }
}

/// A complete HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body as text.
    pub body: String,
}

impl Answer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one request on a fresh HTTP/1.1 connection and returns the response head.
pub async fn open(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Response<Incoming> {
    let fut = async {
        let stream = TcpStream::connect(addr).await.expect("connect to ccgate");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .expect("valid request");
        sender.send_request(req).await.expect("response head")
    };
    tokio::time::timeout(DEADLINE, fut)
        .await
        .expect("no response head in time")
}

/// Sends one request on a fresh HTTP/1.1 connection and reads the whole answer.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Answer {
    let fut = async {
        let resp = open(addr, method, path, headers, body).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    };
    tokio::time::timeout(DEADLINE, fut)
        .await
        .expect("no complete answer in time")
}

/// A small Messages API request body; `stream` sets its `stream` field (`None` leaves it out).
pub fn message_body(stream: Option<bool>) -> String {
    let mut body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    });
    if let Some(stream) = stream {
        body["stream"] = stream.into();
    }
    body.to_string()
}

/// `POST path` with a [`message_body`] and `anthropic-version` ahead of `headers`.
pub async fn post_message_to(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    stream: Option<bool>,
) -> Answer {
    let mut h = vec![("anthropic-version", "2023-06-01")];
    h.extend_from_slice(headers);
    call(addr, Method::POST, path, &h, message_body(stream)).await
}

/// `POST /v1/messages` (non-streaming) with a small body.
pub async fn post_message(addr: SocketAddr, headers: &[(&str, &str)]) -> Answer {
    post_message_to(addr, "/v1/messages", headers, None).await
}

/// `GET path`.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    call(addr, Method::GET, path, headers, String::new()).await
}

/// The entry for endpoint `name` in a `GET /_ccgate/endpoints` answer.
#[track_caller]
pub fn endpoint_entry<'a>(view: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    view["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no endpoint {name}: {view}"))
}

/// Endpoint `name` as `GET /_ccgate/endpoints` shows it (without an access token).
pub async fn endpoint_view(addr: SocketAddr, name: &str) -> serde_json::Value {
    let view = get(addr, "/_ccgate/endpoints", &[]).await.json();
    endpoint_entry(&view, name).clone()
}
