//! End-to-end tests of `ccgate claude run` and `ccgate service`, through the real binary.
//!
//! `claude run` starts a stand-in `claude` (a shell script, `$CCGATE_CLAUDE_BIN`) that prints its
//! environment and arguments, says `ready`, and then waits on its standard input (inherited
//! through ccgate) for the test to tell it how to end: an exit code, or `kill` to die of SIGTERM.
//! Meanwhile the test talks to the gateway the script was pointed at. `service` runs with
//! `CCGATE_SERVICE_DRY_RUN=1`, so no `systemctl` or `launchctl` ever runs; the unit files land in
//! the sandbox's HOME / XDG_CONFIG_HOME.
#![cfg(unix)]

#[path = "support/mock.rs"]
mod mock;
#[path = "support/port.rs"]
mod port;
#[path = "support/process.rs"]
mod process;
#[path = "support/wait.rs"]
mod wait;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::mpsc;

use mock::MockUpstream;
use port::ClosedPort;
use process::{BIN, DEADLINE, Sandbox, config, post_message, run, set_mode, start};

/// The stand-in for Claude Code.
const STAND_IN: &str = r#"#!/bin/sh
echo "ANTHROPIC_BASE_URL=${ANTHROPIC_BASE_URL-unset}"
echo "ANTHROPIC_AUTH_TOKEN=${ANTHROPIC_AUTH_TOKEN-unset}"
echo "ANTHROPIC_CUSTOM_HEADERS=${ANTHROPIC_CUSTOM_HEADERS-unset}"
for a in "$@"; do echo "arg=$a"; done
echo ready
read how
case "$how" in
  kill) kill -TERM $$ ;;
  *) exit "$how" ;;
esac
"#;

/// Writes the stand-in into the sandbox and returns its path.
fn stand_in(sb: &Sandbox) -> PathBuf {
    let path = sb.write("bin/claude", STAND_IN);
    set_mode(&path, 0o755);
    path
}

/// A running `ccgate claude run`, with the stand-in's stdin in the test's hands.
struct Launched {
    /// `None` once [`Launched::end`] has taken it to wait for.
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stdout: String,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Launched {
    fn spawn(sb: &Sandbox, args: &[&str]) -> Self {
        let mut cmd = sb.command(args);
        cmd.env("CCGATE_CLAUDE_BIN", stand_in(sb))
            .stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ccgate");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        Self {
            child: Some(child),
            stdin,
            lines,
            stdout: String::new(),
            stderr,
        }
    }

    /// Reads the stand-in's output up to its `ready` line; returns `NAME=value` and `arg=` lines.
    fn until_ready(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self.lines.recv_timeout(DEADLINE).unwrap_or_else(|_| {
                drop(self.child.take().map(|mut c| c.kill()));
                panic!(
                    "the stand-in never said ready; stdout so far:\n{}\nstderr:\n{}",
                    self.stdout,
                    self.stderr.recv_timeout(DEADLINE).unwrap_or_default()
                )
            });
            self.stdout.push_str(&line);
            self.stdout.push('\n');
            if line == "ready" {
                return seen;
            }
            seen.push(line);
        }
    }

    /// Sends `sig` to ccgate itself (not to the stand-in) with kill(1).
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = std::process::Command::new("kill")
            .args([format!("-{sig}"), pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Tells the stand-in how to end (a line on its stdin; `None`: nothing, it ends otherwise)
    /// and waits for ccgate to exit.
    fn end(mut self, how: Option<&str>) -> (ExitStatus, String, String) {
        let mut stdin = self.stdin.take().expect("stdin");
        if let Some(how) = how {
            writeln!(stdin, "{how}").expect("write to the stand-in");
            drop(stdin);
        }
        let (tx, rx) = mpsc::channel();
        let mut child = self.child.take().expect("not ended yet");
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = rx
            .recv_timeout(DEADLINE)
            .expect("ccgate did not exit in time")
            .expect("wait");
        while let Ok(line) = self.lines.recv_timeout(DEADLINE) {
            self.stdout.push_str(&line);
            self.stdout.push('\n');
        }
        let stderr = self.stderr.recv_timeout(DEADLINE).unwrap_or_default();
        (status, std::mem::take(&mut self.stdout), stderr)
    }
}

/// The value of `NAME=` among the stand-in's lines.
fn var<'a>(lines: &'a [String], name: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
}

fn args_of(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("arg="))
        .collect()
}

fn addr_of(url: &str) -> SocketAddr {
    url.strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not http://ADDR: {url}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// claude run
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn claude_run_points_claude_at_the_running_gateway() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write(
        "ccgate.toml",
        &config(
            &[("a", &up.url(), "sk-up-1")],
            "access_token = \"tok-run-1\"",
        ),
    );
    let settings = sb.write_at(&sb.claude_settings(), "{\"model\": \"opus\"}\n");
    let gw = start(sb.command(&["serve", "--config", s(&cfg)])).await;

    let mut l = Launched::spawn(
        &sb,
        &[
            "claude",
            "run",
            "--config",
            s(&cfg),
            "--url",
            &gw.url(),
            "--",
            "--model",
            "two words",
            "-p",
        ],
    );
    let lines = l.until_ready();
    assert_eq!(var(&lines, "ANTHROPIC_BASE_URL"), gw.url());
    assert_eq!(var(&lines, "ANTHROPIC_AUTH_TOKEN"), "tok-run-1");
    assert_eq!(args_of(&lines), ["--model", "two words", "-p"]);
    // What Claude Code would send, with what it was given.
    let a = post_message(gw.addr, &[("authorization", "Bearer tok-run-1")]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(up.received()[0].header("x-api-key"), Some("sk-up-1"));
    let (status, stdout, stderr) = l.end(Some("0"));
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    // Claude's output is ccgate's (inherited), and ccgate adds nothing to it.
    assert_eq!(stdout.lines().last(), Some("ready"), "{stdout}");
    assert!(!stderr.contains("started a gateway"), "{stderr}");

    // settings.json untouched, and nothing beside it.
    assert_eq!(
        std::fs::read_to_string(&settings).expect("settings"),
        "{\"model\": \"opus\"}\n"
    );
    let beside: Vec<_> = std::fs::read_dir(settings.parent().expect("dir"))
        .expect("list")
        .collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
    drop(gw);
}

#[tokio::test]
async fn claude_run_exits_with_claudes_exit_code() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    let cfg = sb.write("ccgate.toml", &config(&[("a", &up.url(), "k")], ""));
    let gw = start(sb.command(&["serve", "--config", s(&cfg)])).await;
    let url = gw.url();
    let args = ["claude", "run", "--config", s(&cfg), "--url", &url];
    for (how, code) in [("0", 0), ("3", 3), ("255", 255), ("kill", 128 + 15)] {
        let mut l = Launched::spawn(&sb, &args);
        let lines = l.until_ready();
        // No access token: nothing set.
        assert_eq!(var(&lines, "ANTHROPIC_AUTH_TOKEN"), "unset");
        let (status, stdout, stderr) = l.end(Some(how));
        assert_eq!(status.code(), Some(code), "{how}\n{stdout}\n{stderr}");
        assert!(!stderr.contains("error"), "{how}: {stderr}");
    }
    // SIGINT is Claude's business (the terminal sends it to both); SIGTERM to ccgate is passed on.
    let mut l = Launched::spawn(&sb, &args);
    l.until_ready();
    l.signal("INT");
    l.signal("TERM");
    let (status, stdout, stderr) = l.end(None);
    assert_eq!(status.code(), Some(128 + 15), "{stdout}\n{stderr}");
    drop(gw);
}

#[tokio::test]
async fn claude_run_starts_a_gateway_for_the_session_when_none_answers() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    // The default config file, listening on port 0: no running gateway can be found.
    sb.write_at(
        &sb.default_config(),
        &config(&[("a", &up.url(), "sk-up-2")], "access_token = \"tok-2\""),
    );
    let mut l = Launched::spawn(&sb, &["claude", "run", "--", "hello"]);
    let lines = l.until_ready();
    assert_eq!(args_of(&lines), ["hello"]);
    assert_eq!(var(&lines, "ANTHROPIC_AUTH_TOKEN"), "tok-2");
    let url = var(&lines, "ANTHROPIC_BASE_URL").to_string();
    let addr = addr_of(&url);
    assert!(addr.ip().is_loopback(), "{url}");

    // The session's gateway works: the request reaches the upstream with the endpoint's key.
    let a = post_message(addr, &[("x-api-key", "tok-2")]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    let r = up.received();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].header_all("x-api-key"), ["sk-up-2"]);

    let (status, stdout, stderr) = l.end(Some("5"));
    assert_eq!(status.code(), Some(5), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("started a gateway for this session at {url}")),
        "{stderr}"
    );
    // It stopped with Claude: nothing listens there any more.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "the session gateway still listens at {url}"
    );
    // Its log went to the state dir, not over Claude's screen.
    let log = sb.path("xdg-state").join("ccgate").join("claude-run.log");
    let text = std::fs::read_to_string(&log).expect("the session log");
    assert!(text.contains("started for a Claude Code session"), "{text}");
    assert!(!stdout.contains("started"), "{stdout}");
    assert!(!stderr.contains("INFO"), "{stderr}");
    // settings.json never written.
    assert!(!sb.claude_settings().exists());
    assert!(!sb.home().join(".claude").exists());
}

/// With a `credential = "client"` endpoint, `claude run` hands Claude Code the access token as
/// an `x-ccgate-token` header, not as `ANTHROPIC_AUTH_TOKEN`, which would take the place of its
/// own login (audit: every request then reached the endpoint without a client credential).
#[tokio::test]
async fn claude_run_keeps_claudes_login_for_client_credential_endpoints() {
    let up = MockUpstream::start().await;
    let sb = Sandbox::new();
    sb.write_at(
        &sb.default_config(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\naccess_token = \"tok-3\"\n\n[[endpoints]]\nname = \"sub\"\nbase_url = \"{}\"\ncredential = \"client\"\n",
            up.url()
        ),
    );
    let mut l = Launched::spawn(&sb, &["claude", "run"]);
    let lines = l.until_ready();
    assert_eq!(var(&lines, "ANTHROPIC_AUTH_TOKEN"), "unset");
    let headers = var(&lines, "ANTHROPIC_CUSTOM_HEADERS").to_string();
    assert_eq!(headers, "x-ccgate-token: tok-3");
    let addr = addr_of(var(&lines, "ANTHROPIC_BASE_URL"));

    // What Claude Code sends with it: its own login, and the header.
    let (name, value) = headers.split_once(": ").expect("a header line");
    let login = "Bearer sk-ant-oat01-own-login";
    let a = post_message(addr, &[("authorization", login), (name, value)]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let r = up.received();
    assert_eq!(r[0].header("authorization"), Some(login));
    assert_eq!(r[0].header("x-ccgate-token"), None);
    let (status, stdout, stderr) = l.end(Some("0"));
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
}

#[tokio::test]
async fn claude_run_reports_what_stops_it_before_claude_starts() {
    let sb = Sandbox::new();
    let claude = stand_in(&sb);
    let with_bin = |args: &[&str]| {
        let mut c = sb.command(args);
        c.env("CCGATE_CLAUDE_BIN", &claude);
        c
    };
    // No config and no credentials: nothing to start a gateway from.
    let f = run(with_bin(&["claude", "run"])).await;
    f.assert_code(2);
    assert!(f.stderr.contains("no configuration"), "{}", f.output());
    assert!(!f.stdout.contains("ready"), "{}", f.output());
    // --url where nothing answers: no gateway is started in its place.
    let closed = ClosedPort::new();
    let f = run(with_bin(&["claude", "run", "--url", &closed.url()])).await;
    f.assert_code(2);
    assert!(f.stderr.contains("nothing answered"), "{}", f.output());
    assert!(!f.stdout.contains("ready"), "{}", f.output());
    // No `claude` to run (the sandbox has no PATH): says how to name it.
    let up = MockUpstream::start().await;
    let cfg = sb.write("ccgate.toml", &config(&[("a", &up.url(), "k")], ""));
    let gw = start(sb.command(&["serve", "--config", s(&cfg)])).await;
    let f = run(sb.command(&["claude", "run", "--url", &gw.url()])).await;
    f.assert_code(2);
    assert!(f.stderr.contains("CCGATE_CLAUDE_BIN"), "{}", f.output());
    drop(gw);
}

// ---------------------------------------------------------------------------------------------
// service
// ---------------------------------------------------------------------------------------------

fn service(sb: &Sandbox, args: &[&str]) -> std::process::Command {
    let mut all = vec!["service"];
    all.extend_from_slice(args);
    let mut c = sb.command(&all);
    c.env("CCGATE_SERVICE_DRY_RUN", "1");
    c
}

fn exe() -> String {
    std::fs::canonicalize(BIN)
        .expect("the binary")
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn service_install_writes_the_unit_once_and_uninstall_removes_it() {
    let sb = Sandbox::new();
    let closed = ClosedPort::new();
    let text =
        config(&[("a", "http://127.0.0.1:9", "k")], "").replace("127.0.0.1:0", &closed.addr());
    // A relative --config becomes the absolute path in the unit.
    sb.write("my.toml", &text);
    let cfg = std::fs::canonicalize(sb.path("my.toml")).expect("config path");
    let unit = sb
        .path("xdg-config")
        .join("systemd")
        .join("user")
        .join("ccgate.service");

    let f = run(service(
        &sb,
        &["install", "--config", "my.toml", "--platform", "linux"],
    ))
    .await;
    f.assert_success();
    let written = std::fs::read_to_string(&unit).expect("the unit");
    let exec = format!(
        "ExecStart=\"{}\" serve --config \"{}\"\n",
        exe(),
        cfg.display()
    );
    assert!(written.contains(&exec), "{written}");
    assert!(written.contains("Restart=on-failure\n"), "{written}");
    assert!(written.contains("WantedBy=default.target\n"), "{written}");
    assert!(
        f.stdout.contains(&format!("wrote {}", unit.display())),
        "{}",
        f.output()
    );
    assert!(
        f.stdout.contains(&format!("config: {}", cfg.display())),
        "{}",
        f.output()
    );
    assert!(
        f.stdout.contains("journalctl --user -u ccgate"),
        "{}",
        f.output()
    );
    assert!(
        f.stdout
            .contains("would run: systemctl --user daemon-reload\n"),
        "{}",
        f.output()
    );
    assert!(
        f.stdout
            .contains("would run: systemctl --user enable --now ccgate.service\n"),
        "{}",
        f.output()
    );
    assert!(
        f.stdout.contains(&format!("listens on {}", closed.url())),
        "{}",
        f.output()
    );

    // Again: the same file, left alone, and no restart.
    let f = run(service(&sb, &["install", "--config", "my.toml"])).await;
    f.assert_success();
    assert!(f.stdout.contains("unchanged"), "{}", f.output());
    assert!(!f.stdout.contains("restart"), "{}", f.output());
    assert_eq!(std::fs::read_to_string(&unit).expect("unit"), written);

    // Status: installed, not queried in a dry run, the config, and nothing answering yet.
    let f = run(service(&sb, &["status"])).await;
    f.assert_success();
    assert!(
        f.stdout
            .contains(&format!("unit:    {} (installed)", unit.display())),
        "{}",
        f.output()
    );
    assert!(
        f.stdout.contains("running: unknown (dry run"),
        "{}",
        f.output()
    );
    assert!(
        f.stdout.contains(&format!("config:  {}", cfg.display())),
        "{}",
        f.output()
    );
    assert!(
        f.stdout.contains(&format!(
            "listens: {} (nothing answers there)",
            closed.url()
        )),
        "{}",
        f.output()
    );

    // Another config: the unit is updated and the service restarted.
    let up = MockUpstream::start().await;
    let other = sb.write("other.toml", &config(&[("a", &up.url(), "k")], ""));
    let gw = start(sb.command(&["serve", "--config", s(&other)])).await;
    // Status reads where it listens from the config, so give that file the real address.
    sb.write(
        "other.toml",
        &config(&[("a", &up.url(), "k")], "").replace("127.0.0.1:0", &gw.addr.to_string()),
    );
    let f = run(service(&sb, &["install", "--config", s(&other)])).await;
    f.assert_success();
    assert!(
        f.stdout.contains(&format!("updated {}", unit.display())),
        "{}",
        f.output()
    );
    assert!(
        f.stdout
            .contains("would run: systemctl --user restart ccgate.service\n"),
        "{}",
        f.output()
    );
    let f = run(service(&sb, &["status"])).await;
    f.assert_success();
    assert!(
        f.stdout
            .contains(&format!("listens: {} (answers /_ccgate/health)", gw.url())),
        "{}",
        f.output()
    );
    drop(gw);

    let f = run(service(&sb, &["uninstall"])).await;
    f.assert_success();
    assert!(
        f.stdout
            .contains("would run: systemctl --user disable --now ccgate.service\n"),
        "{}",
        f.output()
    );
    assert!(
        f.stdout.contains(&format!("removed {}", unit.display())),
        "{}",
        f.output()
    );
    assert!(!unit.exists());
    let f = run(service(&sb, &["uninstall"])).await;
    f.assert_success();
    assert!(f.stdout.contains("not installed"), "{}", f.output());
    let f = run(service(&sb, &["status", "--config", "my.toml"])).await;
    f.assert_success();
    assert!(f.stdout.contains("(not installed)"), "{}", f.output());
}

#[tokio::test]
async fn service_writes_a_launchd_agent_on_macos() {
    let sb = Sandbox::new();
    let cfg = sb.write_at(
        &sb.default_config(),
        &config(&[("a", "http://127.0.0.1:9", "k")], ""),
    );
    let cfg = std::fs::canonicalize(cfg).expect("config path");
    let plist = sb.home().join("Library/LaunchAgents/dev.ccgate.plist");
    let log = sb.home().join("Library/Logs/ccgate.log");

    let f = run(service(&sb, &["install", "--platform", "macos"])).await;
    f.assert_success();
    let written = std::fs::read_to_string(&plist).expect("the agent");
    let program = format!(
        "<key>ProgramArguments</key>\n    <array>\n        <string>{}</string>\n        <string>serve</string>\n        <string>--config</string>\n        <string>{}</string>\n    </array>\n",
        exe(),
        cfg.display()
    );
    assert!(written.contains(&program), "{written}");
    assert!(written.contains("<string>dev.ccgate</string>"), "{written}");
    assert!(
        written.contains(&format!("<string>{}</string>", log.display())),
        "{written}"
    );
    assert!(
        f.stdout.contains(&format!(
            "would run: launchctl load -w {}\n",
            plist.display()
        )),
        "{}",
        f.output()
    );
    assert!(
        f.stdout.contains(&format!("logs:   {}", log.display())),
        "{}",
        f.output()
    );
    assert!(!f.stdout.contains("systemctl"), "{}", f.output());

    let f = run(service(&sb, &["install", "--platform", "macos"])).await;
    f.assert_success();
    assert!(f.stdout.contains("unchanged"), "{}", f.output());
    assert!(!f.stdout.contains("launchctl"), "{}", f.output());

    let f = run(service(&sb, &["status", "--platform", "macos"])).await;
    f.assert_success();
    assert!(f.stdout.contains("(installed)"), "{}", f.output());
    assert!(
        f.stdout.contains(&format!("config:  {}", cfg.display())),
        "{}",
        f.output()
    );

    let f = run(service(&sb, &["uninstall", "--platform", "macos"])).await;
    f.assert_success();
    assert!(
        f.stdout.contains(&format!(
            "would run: launchctl unload -w {}\n",
            plist.display()
        )),
        "{}",
        f.output()
    );
    assert!(!plist.exists());
}

#[tokio::test]
async fn service_install_needs_a_config_that_loads() {
    let sb = Sandbox::new();
    let unit = sb.path("xdg-config/systemd/user/ccgate.service");
    let f = run(service(&sb, &["install", "--platform", "linux"])).await;
    f.assert_code(2);
    assert!(f.stderr.contains("ccgate init"), "{}", f.output());
    let bad = sb.write("bad.toml", "[server]\nlisten = \"nope\"\n");
    let f = run(service(
        &sb,
        &["install", "--config", s(&bad), "--platform", "linux"],
    ))
    .await;
    f.assert_code(2);
    assert!(!unit.exists());
    assert!(!f.stdout.contains("would run"), "{}", f.output());
}

/// `service install` names every variable the config reads, set in this shell or not: the
/// service never sees this shell's environment (audit: a set one went unmentioned, and the
/// service then failed at every start).
#[tokio::test]
async fn service_install_names_every_variable_the_config_reads() {
    let sb = Sandbox::new();
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n\n\
        [[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key_env = \"SVC_SET_KEY\"\n\n\
        [[endpoints]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:9\"\nauth_token_env = \"SVC_UNSET_TOKEN\"\n";
    sb.write("svc.toml", text);
    let mut cmd = service(
        &sb,
        &["install", "--config", "svc.toml", "--platform", "linux"],
    );
    cmd.env("SVC_SET_KEY", "sk-set-here")
        .env_remove("SVC_UNSET_TOKEN");
    let f = run(cmd).await;
    f.assert_success();
    assert!(
        f.stdout
            .contains("reads SVC_SET_KEY, SVC_UNSET_TOKEN from the environment"),
        "{}",
        f.output()
    );
    assert!(!f.output().contains("sk-set-here"), "{}", f.output());
}

/// Another server on the gateway's address that answers 200 to anything is not taken for the
/// gateway: it is never sent the access token, Claude Code gets a session gateway instead, and
/// `--url` naming it is refused (audit: the token went to it, and Claude Code would have
/// followed). The mock answers while the test's thread waits on ccgate: a multi-threaded runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_run_does_not_take_another_server_for_the_gateway() {
    let up = MockUpstream::start().await;
    let foreign = MockUpstream::start().await;
    let sb = Sandbox::new();
    sb.write_at(
        &sb.default_config(),
        &format!(
            "[server]\nlisten = \"{}\"\naccess_token = \"tok-foreign\"\n\n[[endpoints]]\nname = \"a\"\nbase_url = \"{}\"\napi_key = \"k\"\n",
            foreign.addr(),
            up.url()
        ),
    );
    let mut l = Launched::spawn(&sb, &["claude", "run"]);
    let lines = l.until_ready();
    let url = var(&lines, "ANTHROPIC_BASE_URL").to_string();
    assert_ne!(
        addr_of(&url),
        foreign.addr(),
        "Claude Code pointed at another server"
    );
    let asked = foreign.received();
    assert_eq!(asked.len(), 1, "asked once whether it is ccgate: {lines:?}");
    assert_eq!(asked[0].path_and_query, "/_ccgate/health");
    assert!(
        asked[0]
            .headers
            .iter()
            .all(|(_, v)| !v.contains("tok-foreign")),
        "the access token went to another server: {:?}",
        asked[0].headers
    );
    let (status, stdout, stderr) = l.end(Some("0"));
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");

    let claude = stand_in(&sb);
    let mut c = sb.command(&["claude", "run", "--url", &foreign.url()]);
    c.env("CCGATE_CLAUDE_BIN", &claude);
    let f = run(c).await;
    f.assert_code(2);
    assert!(
        f.stderr.contains("is not a ccgate gateway"),
        "{}",
        f.output()
    );
    assert!(!f.stdout.contains("ready"), "{}", f.output());
}
