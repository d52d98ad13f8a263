//! `ccgate claude run`: starts Claude Code with `ANTHROPIC_BASE_URL` (and `ANTHROPIC_AUTH_TOKEN`
//! when the gateway has an access token) in its environment, never in `settings.json`.
//!
//! The gateway is the running one (found as `ccgate status` finds it, and answering
//! `GET /_ccgate/health`), or else a *session gateway*: a child `ccgate claude session-gateway`
//! on a free loopback port, started from the user's config for as long as Claude runs. The child
//! is in its own process group, so the Ctrl-C that the terminal sends Claude does not reach it; its
//! log lines go to a file under the state dir ([`session_log_path`]), never over Claude's screen;
//! and it stops when its standard input closes, which happens when this process exits, however it
//! exits.
//!
//! Claude inherits stdin, stdout and stderr. Its exit code is ours; a death by signal `n` becomes
//! `128 + n`, as a shell reports it. While Claude runs, SIGINT and SIGQUIT are left to Claude (the
//! terminal sends them to both of us), and SIGTERM and SIGHUP sent to this process are passed on.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::cli::claude::{BASE_URL_KEY, TokenVia};
use crate::cli::target::{AdminClient, Target, find_target};
use crate::config::{Env, Secret};

/// Overrides the `claude` found on `PATH`.
pub const CLAUDE_BIN_VAR: &str = "CCGATE_CLAUDE_BIN";

/// The readiness line a gateway prints on stdout.
const READY_PREFIX: &str = "listening on ";

/// How long a session gateway may take to start, and to stop once Claude has exited.
const START_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The gateway that answers: `--url` (which must answer), else the one `ccgate status` would
/// call, if it answers `GET /_ccgate/health`. `None`: start a session gateway.
pub fn find_running(
    config: Option<&Path>,
    url: Option<&str>,
    env: &dyn Env,
) -> anyhow::Result<Option<Target>> {
    let target = match find_target(config, url, env) {
        Ok(t) => t,
        // No known address (port 0) or a config that does not load: a session gateway is started
        // from the config, and its strict load says what is wrong.
        Err(_) if url.is_none() => return Ok(None),
        Err(e) => return Err(e),
    };
    let runtime = crate::cli::target::runtime()?;
    let client = AdminClient::new(target.clone())?;
    match runtime.block_on(client.is_ccgate()) {
        Ok(true) => Ok(Some(target)),
        Ok(false) if url.is_some() => bail!(
            "{} is not a ccgate gateway (or not a healthy one): its GET /_ccgate/health answer is not ccgate's",
            target.url
        ),
        // Another server on the gateway's address: it gets neither the token nor Claude Code's
        // traffic; the session gateway started instead says why it cannot listen there.
        Ok(false) => Ok(None),
        Err(e) if url.is_some() => bail!("--url: {e}"),
        Err(_) => Ok(None),
    }
}

/// Where a session gateway's log lines go: `<state dir>/ccgate/claude-run.log` (on Linux
/// `$XDG_STATE_HOME`, else `~/.local/state`), or the local data dir where there is no state dir.
pub fn session_log_path() -> anyhow::Result<PathBuf> {
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .map(|d| d.join("ccgate").join("claude-run.log"))
        .context("no state or data directory on this platform")
}

/// A gateway started for one Claude Code session. Dropping it stops it.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    url: String,
    log: PathBuf,
}

impl Session {
    /// Starts `ccgate claude session-gateway [--config PATH]` and waits for its readiness line.
    pub fn start(config: Option<&Path>) -> anyhow::Result<Self> {
        let log = session_log_path()?;
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let start_offset = file.seek(std::io::SeekFrom::End(0)).unwrap_or(0);
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let mut cmd = Command::new(exe);
        cmd.args(["claude", "session-gateway"]);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file));
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            // Out of the terminal's foreground group: Claude's Ctrl-C is not for the gateway.
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().context("cannot start the session gateway")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout from the gateway")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            // Keep reading, so the gateway never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let mut session = Self {
            child,
            stdin,
            url: String::new(),
            log,
        };
        let line = rx.recv_timeout(START_LIMIT).ok().and_then(Result::ok);
        let url = line
            .as_deref()
            .and_then(|l| l.trim_end().strip_prefix(READY_PREFIX))
            .map(str::to_string);
        match url {
            Some(url) => {
                session.url = url;
                Ok(session)
            }
            None => {
                session.stop();
                let mut text = String::new();
                if let Ok(mut f) = std::fs::File::open(&session.log) {
                    let _ = f.seek(std::io::SeekFrom::Start(start_offset));
                    let _ = f.read_to_string(&mut text);
                }
                Err(anyhow!(
                    "the gateway for this session did not start (its log: {}):\n{}",
                    session.log.display(),
                    text.trim_end()
                ))
            }
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where its log lines go.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Closes its stdin (its signal to stop), waits for it to finish, kills it if it does not.
    fn stop(&mut self) {
        self.stdin.take();
        if wait_with_limit(&mut self.child, STOP_LIMIT).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for `child` to exit for at most `limit`. std has no wait with a timeout, so this polls.
fn wait_with_limit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let until = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return None,
        }
    }
}

/// Resolves when standard input reaches its end (or fails): the session gateway's parent is
/// gone.
pub async fn stdin_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.await;
}

/// The Claude Code program: `$CCGATE_CLAUDE_BIN`, else `claude` on `PATH`.
pub fn claude_program(env: &dyn Env) -> OsString {
    env.var(CLAUDE_BIN_VAR)
        .filter(|v| !v.is_empty())
        .map_or_else(|| OsString::from("claude"), OsString::from)
}

/// Runs Claude Code against the gateway at `url` and returns its exit code (`128 + n` for a death
/// by signal `n`).
pub fn run_claude(
    program: &OsString,
    url: &str,
    token: Option<&Secret>,
    via: TokenVia,
    args: &[OsString],
) -> anyhow::Result<u8> {
    let mut cmd = Command::new(program);
    cmd.args(args).env(BASE_URL_KEY, url);
    if let Some(t) = token {
        let current = std::env::var(via.key()).ok();
        let (key, value) = via.variable(t.expose(), current.as_deref());
        cmd.env(key, value);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let status = runtime.block_on(async {
        // Handlers before the spawn, so no signal finds this process without one.
        let signals = Signals::install()?;
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!(
                "cannot start `{}`: not found; install Claude Code, or set {CLAUDE_BIN_VAR} to its path",
                program.to_string_lossy()
            ),
            _ => anyhow!("cannot start `{}`: {e}", program.to_string_lossy()),
        })?;
        signals.wait(child).await
    })?;
    Ok(exit_code(status))
}

/// The exit code a shell would report for `status`.
fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return u8::try_from(128 + sig).unwrap_or(255);
        }
    }
    1
}

/// This process's signal handlers while Claude runs.
#[cfg(unix)]
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let on = |kind| signal(kind).context("cannot install a signal handler");
        Ok(Self {
            interrupt: on(SignalKind::interrupt())?,
            quit: on(SignalKind::quit())?,
            terminate: on(SignalKind::terminate())?,
            hangup: on(SignalKind::hangup())?,
        })
    }

    /// Waits for `child`: SIGINT and SIGQUIT are Claude's own business; SIGTERM and SIGHUP are
    /// passed on to it.
    async fn wait(mut self, mut child: Child) -> anyhow::Result<ExitStatus> {
        use rustix::process::{Pid, Signal, kill_process};
        let pid = Pid::from_child(&child);
        let (tx, mut exited) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        loop {
            tokio::select! {
                status = &mut exited => {
                    return status
                        .context("lost track of Claude Code")?
                        .context("cannot wait for Claude Code");
                }
                _ = self.interrupt.recv() => {}
                _ = self.quit.recv() => {}
                _ = self.terminate.recv() => { let _ = kill_process(pid, Signal::TERM); }
                _ = self.hangup.recv() => { let _ = kill_process(pid, Signal::HUP); }
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self)
    }

    async fn wait(self, mut child: Child) -> anyhow::Result<ExitStatus> {
        let (tx, exited) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        exited
            .await
            .context("lost track of Claude Code")?
            .context("cannot wait for Claude Code")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn exit_codes_are_what_a_shell_reports() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(255 << 8)), 255);
        // Killed by SIGTERM (15) and SIGKILL (9).
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn the_program_comes_from_the_variable_unless_empty() {
        let set = |n: &str| (n == CLAUDE_BIN_VAR).then(|| "/opt/claude".to_string());
        assert_eq!(claude_program(&set), OsString::from("/opt/claude"));
        let empty = |n: &str| (n == CLAUDE_BIN_VAR).then(String::new);
        assert_eq!(claude_program(&empty), OsString::from("claude"));
        assert_eq!(claude_program(&|_: &str| None), OsString::from("claude"));
    }
}
