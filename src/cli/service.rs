//! `ccgate service install|uninstall|status`: runs the gateway in the background, as a systemd
//! user unit on Linux (`~/.config/systemd/user/ccgate.service`, logs in the journal) or a launchd
//! agent on macOS (`~/Library/LaunchAgents/dev.ccgate.plist`, logs in `~/Library/Logs/ccgate.log`).
//!
//! The unit runs this binary (its absolute path) as `serve --config <absolute config path>` and
//! restarts it when it fails. The platform is the host's; a hidden `--platform` flag picks the
//! other one, so both writers are tested on one machine. With `CCGATE_SERVICE_DRY_RUN=1`, the
//! `systemctl` / `launchctl` commands are printed instead of run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::cli::target::{AdminClient, Lenient, Target, config_path, url_of_listen};
use crate::config::{Env, ProcessEnv};

/// Set to `1` to print the `systemctl` / `launchctl` commands instead of running them.
pub const DRY_RUN_VAR: &str = "CCGATE_SERVICE_DRY_RUN";

/// The systemd unit's name.
pub const UNIT_NAME: &str = "ccgate.service";
/// The launchd agent's label.
pub const AGENT_LABEL: &str = "dev.ccgate";

/// `ccgate service ...`.
#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Write the unit (or agent), enable it and start it now; again to update it.
    Install(ServiceArgs),
    /// Stop and disable the service and remove its unit (or agent).
    Uninstall(ServiceArgs),
    /// Whether the service is installed and running, its config, and where it listens.
    Status(ServiceArgs),
}

/// Options shared by the `service` subcommands.
#[derive(Args, Debug)]
pub struct ServiceArgs {
    /// Config file the service runs with (default: $CCGATE_CONFIG, then
    /// ~/.config/ccgate/config.toml); stored as an absolute path.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The service manager to write for (default: this machine's).
    #[arg(long, value_enum, hide = true, default_value_t = Platform::host())]
    pub platform: Platform,
}

/// Which service manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Platform {
    /// A systemd user unit.
    Linux,
    /// A launchd agent.
    Macos,
}

impl Platform {
    /// This machine's.
    pub fn host() -> Self {
        if cfg!(target_os = "macos") {
            Self::Macos
        } else {
            Self::Linux
        }
    }
}

/// Runs `ccgate service ...`.
pub fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    let env = ProcessEnv;
    let out = match cmd {
        ServiceCommand::Install(a) => install(a.platform, a.config.as_deref(), &env)?,
        ServiceCommand::Uninstall(a) => uninstall(a.platform, &env)?,
        ServiceCommand::Status(a) => status(a.platform, a.config.as_deref(), &env)?,
    };
    out!("{out}");
    Ok(())
}

/// Where the unit file goes: `$XDG_CONFIG_HOME/systemd/user/ccgate.service` (default
/// `~/.config`), or `~/Library/LaunchAgents/dev.ccgate.plist`.
pub fn unit_path(platform: Platform, env: &dyn Env) -> anyhow::Result<PathBuf> {
    let home = home(env)?;
    Ok(match platform {
        Platform::Linux => env
            .var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| home.join(".config"))
            .join("systemd")
            .join("user")
            .join(UNIT_NAME),
        Platform::Macos => home
            .join("Library")
            .join("LaunchAgents")
            .join(format!("{AGENT_LABEL}.plist")),
    })
}

fn home(env: &dyn Env) -> anyhow::Result<PathBuf> {
    env.var("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(dirs::home_dir)
        .context("cannot find the home directory: set HOME")
}

/// Where the service's log lines go, as told to the user.
fn log_location(platform: Platform, env: &dyn Env) -> anyhow::Result<String> {
    Ok(match platform {
        Platform::Linux => "the journal (journalctl --user -u ccgate -f)".to_string(),
        Platform::Macos => launchd_log(env)?.display().to_string(),
    })
}

fn launchd_log(env: &dyn Env) -> anyhow::Result<PathBuf> {
    Ok(home(env)?.join("Library").join("Logs").join("ccgate.log"))
}

/// The systemd user unit that runs `exe serve --config config`; an error when systemd cannot
/// run a program at `exe` (see [`systemd_program`]).
pub fn systemd_unit(exe: &Path, config: &Path) -> anyhow::Result<String> {
    Ok(format!(
        "# Written by `ccgate service install`; `ccgate service uninstall` removes it.\n\
         [Unit]\n\
         Description=ccgate: failover gateway for the Anthropic Messages API\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={} serve --config {}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         # Logs go to the journal: journalctl --user -u ccgate\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        systemd_program(exe)?,
        systemd_quote(config),
    ))
}

/// The program's path as the first word of `ExecStart`: systemd expands no variables there (so
/// `$` stays as it is) but does expand `%` specifiers, and refuses a program name with quotes or
/// backslashes in it whatever the quoting.
fn systemd_program(exe: &Path) -> anyhow::Result<String> {
    let path = exe.to_string_lossy();
    if let Some(c) = path
        .chars()
        .find(|c| matches!(c, '"' | '\'' | '\\') || c.is_control())
    {
        bail!(
            "systemd cannot run a program whose path holds {c:?} ({}): move ccgate to another directory and install again",
            crate::cli::table::plain(&path)
        );
    }
    Ok(format!("\"{}\"", path.replace('%', "%%")))
}

/// A path as one systemd command-line word: double-quoted, with `\`, `"`, `%` and `$` escaped.
fn systemd_quote(path: &Path) -> String {
    let mut s = String::from("\"");
    for c in path.to_string_lossy().chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '%' => s.push_str("%%"),
            '$' => s.push_str("$$"),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// The launchd agent that runs `exe serve --config config`, logging to `log`.
pub fn launchd_plist(exe: &Path, config: &Path, log: &Path) -> String {
    let args = [
        exe.to_string_lossy(),
        "serve".into(),
        "--config".into(),
        config.to_string_lossy(),
    ];
    let mut program = String::new();
    for a in args {
        let _ = writeln!(program, "        <string>{}</string>", xml_escape(&a));
    }
    let log = xml_escape(&log.to_string_lossy());
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <!-- Written by `ccgate service install`; `ccgate service uninstall` removes it. -->\n\
         <plist version=\"1.0\">\n\
         <dict>\n\
         \x20   <key>Label</key>\n\
         \x20   <string>{AGENT_LABEL}</string>\n\
         \x20   <key>ProgramArguments</key>\n\
         \x20   <array>\n\
         {program}\
         \x20   </array>\n\
         \x20   <key>RunAtLoad</key>\n\
         \x20   <true/>\n\
         \x20   <key>KeepAlive</key>\n\
         \x20   <dict>\n\
         \x20       <key>SuccessfulExit</key>\n\
         \x20       <false/>\n\
         \x20   </dict>\n\
         \x20   <key>StandardOutPath</key>\n\
         \x20   <string>{log}</string>\n\
         \x20   <key>StandardErrorPath</key>\n\
         \x20   <string>{log}</string>\n\
         </dict>\n\
         </plist>\n"
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The config path an installed unit runs with, read back from its text.
fn config_of_unit(text: &str) -> Option<String> {
    if let Some(rest) = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .and_then(|l| l.split_once(" --config ").map(|(_, r)| r))
    {
        let inner = rest.trim().strip_prefix('"')?.strip_suffix('"')?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                '%' | '$' => {
                    chars.next();
                    out.push(c);
                }
                c => out.push(c),
            }
        }
        return Some(out);
    }
    // The plist: the <string> after `--config`.
    let mut strings = text.lines().filter_map(|l| {
        l.trim()
            .strip_prefix("<string>")
            .and_then(|l| l.strip_suffix("</string>"))
    });
    strings.find(|s| *s == "--config")?;
    strings.next().map(|s| {
        s.replace("&quot;", "\"")
            .replace("&gt;", ">")
            .replace("&lt;", "<")
            .replace("&amp;", "&")
    })
}

/// Runs the service manager's commands, or only says what it would run.
struct Manager {
    dry_run: bool,
}

impl Manager {
    fn from_env(env: &dyn Env) -> Self {
        let dry_run = env
            .var(DRY_RUN_VAR)
            .is_some_and(|v| !v.is_empty() && v != "0");
        Self { dry_run }
    }

    /// Runs `program args`, noting it in `out`; fails with its stderr when it fails.
    fn run(&self, out: &mut String, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let line = format!("{program} {}", args.join(" "));
        if self.dry_run {
            let _ = writeln!(out, "would run: {line}");
            return Ok(());
        }
        let done = std::process::Command::new(program)
            .args(args)
            .output()
            .with_context(|| format!("cannot run `{line}`"))?;
        if !done.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                done.status,
                String::from_utf8_lossy(&done.stderr).trim()
            );
        }
        let _ = writeln!(out, "ran: {line}");
        Ok(())
    }

    /// Runs a query and returns its trimmed stdout and whether it succeeded; `None` in a dry run.
    fn query(&self, program: &str, args: &[&str]) -> Option<(bool, String)> {
        if self.dry_run {
            return None;
        }
        let done = std::process::Command::new(program)
            .args(args)
            .output()
            .ok()?;
        Some((
            done.status.success(),
            String::from_utf8_lossy(&done.stdout).trim().to_string(),
        ))
    }
}

/// The absolute config path the service will use; it must exist and load.
fn service_config(explicit: Option<&Path>, env: &dyn Env) -> anyhow::Result<(PathBuf, Lenient)> {
    let path = config_path(explicit, env)?;
    let path = if path.is_absolute() {
        path
    } else {
        std::env::current_dir()
            .context("cannot find the current directory")?
            .join(path)
    };
    let text = crate::config::read_capped(&path).with_context(|| {
        format!(
            "cannot read {} (the service needs a config file: `ccgate init` writes one)",
            path.display()
        )
    })?;
    let path = path.canonicalize().unwrap_or(path);
    let loaded = Lenient::from_toml(&text, &path.display().to_string(), env)?;
    Ok((path, loaded))
}

/// `ccgate service install`.
pub fn install(
    platform: Platform,
    explicit_config: Option<&Path>,
    env: &dyn Env,
) -> anyhow::Result<String> {
    let (config, loaded) = service_config(explicit_config, env)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let unit = unit_path(platform, env)?;
    let text = match platform {
        Platform::Linux => systemd_unit(&exe, &config)?,
        Platform::Macos => launchd_plist(&exe, &config, &launchd_log(env)?),
    };
    let before = std::fs::read_to_string(&unit).ok();
    let mut out = String::new();
    if before.as_deref() == Some(text.as_str()) {
        let _ = writeln!(out, "unchanged: {} (already installed)", unit.display());
    } else {
        if let Some(dir) = unit.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        crate::cli::edit::write_atomic(&unit, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", unit.display()))?;
        let verb = if before.is_some() { "updated" } else { "wrote" };
        let _ = writeln!(out, "{verb} {}", unit.display());
    }
    let _ = writeln!(
        out,
        "  runs:   {} serve --config {}",
        exe.display(),
        config.display()
    );
    let _ = writeln!(out, "  config: {}", config.display());
    let _ = writeln!(out, "  logs:   {}", log_location(platform, env)?);
    let manager = Manager::from_env(env);
    let changed = before.is_some() && before.as_deref() != Some(text.as_str());
    let unit_s = unit.to_string_lossy();
    match platform {
        Platform::Linux => {
            manager.run(&mut out, "systemctl", &["--user", "daemon-reload"])?;
            manager.run(
                &mut out,
                "systemctl",
                &["--user", "enable", "--now", UNIT_NAME],
            )?;
            if changed {
                manager.run(&mut out, "systemctl", &["--user", "restart", UNIT_NAME])?;
            }
        }
        Platform::Macos => {
            if changed {
                // Reloads the agent with its new arguments; it may not have been loaded.
                let _ = manager.run(&mut out, "launchctl", &["unload", &unit_s]);
            }
            if before.is_none() || changed {
                manager.run(&mut out, "launchctl", &["load", "-w", &unit_s])?;
            }
        }
    }
    match url_of_listen(loaded.config.server.listen) {
        Some(url) => {
            let _ = writeln!(out, "the gateway listens on {url}");
        }
        None => {
            let _ = writeln!(
                out,
                "server.listen uses port 0: the port is chosen at each start (see the log)"
            );
        }
    }
    // Every variable, set in this shell or not: the service never sees this shell's.
    if !loaded.read.is_empty() {
        let _ = writeln!(
            out,
            "note: the config reads {} from the environment, which the service does not inherit from your shell; {}",
            loaded.read.join(", "),
            match platform {
                Platform::Linux =>
                    "add `Environment=NAME=value` lines with `systemctl --user edit ccgate`",
                Platform::Macos => "add an EnvironmentVariables dict to the plist",
            }
        );
    }
    if platform == Platform::Linux {
        let _ = writeln!(
            out,
            "to keep it running while you are logged out: loginctl enable-linger"
        );
    }
    Ok(out)
}

/// `ccgate service uninstall`.
pub fn uninstall(platform: Platform, env: &dyn Env) -> anyhow::Result<String> {
    let unit = unit_path(platform, env)?;
    let mut out = String::new();
    if !unit.exists() {
        let _ = writeln!(out, "not installed: {} does not exist", unit.display());
        return Ok(out);
    }
    let manager = Manager::from_env(env);
    let unit_s = unit.to_string_lossy();
    // Stopping may fail when the manager never loaded it; the file goes regardless.
    let stopped = match platform {
        Platform::Linux => manager.run(
            &mut out,
            "systemctl",
            &["--user", "disable", "--now", UNIT_NAME],
        ),
        Platform::Macos => manager.run(&mut out, "launchctl", &["unload", "-w", &unit_s]),
    };
    if let Err(e) = stopped {
        let _ = writeln!(out, "warning: {e:#}");
    }
    std::fs::remove_file(&unit).with_context(|| format!("cannot remove {}", unit.display()))?;
    let _ = writeln!(out, "removed {}", unit.display());
    if platform == Platform::Linux {
        manager.run(&mut out, "systemctl", &["--user", "daemon-reload"])?;
    }
    Ok(out)
}

/// `ccgate service status`.
pub fn status(
    platform: Platform,
    explicit_config: Option<&Path>,
    env: &dyn Env,
) -> anyhow::Result<String> {
    let unit = unit_path(platform, env)?;
    let installed = std::fs::read_to_string(&unit).ok();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "unit:    {} ({})",
        unit.display(),
        if installed.is_some() {
            "installed"
        } else {
            "not installed"
        }
    );
    let manager = Manager::from_env(env);
    let running = match platform {
        Platform::Linux => match manager.query("systemctl", &["--user", "is-active", UNIT_NAME]) {
            Some((_, state)) if !state.is_empty() => state,
            Some(_) => "unknown (systemctl said nothing)".to_string(),
            None => {
                format!("unknown (dry run: would run `systemctl --user is-active {UNIT_NAME}`)")
            }
        },
        Platform::Macos => match manager.query("launchctl", &["list", AGENT_LABEL]) {
            Some((true, _)) => "loaded".to_string(),
            Some((false, _)) => "not loaded".to_string(),
            None => format!("unknown (dry run: would run `launchctl list {AGENT_LABEL}`)"),
        },
    };
    let _ = writeln!(out, "running: {running}");
    // The config the unit runs with; without a unit, the one `install` would use.
    let config = match installed.as_deref().and_then(config_of_unit) {
        Some(c) => PathBuf::from(c),
        None => config_path(explicit_config, env)?,
    };
    let _ = writeln!(out, "config:  {}", config.display());
    let _ = writeln!(out, "logs:    {}", log_location(platform, env)?);
    let listens = match std::fs::read_to_string(&config) {
        Err(e) => format!("unknown: cannot read {}: {e}", config.display()),
        Ok(text) => match Lenient::from_toml(&text, &config.display().to_string(), env) {
            Err(e) => format!("unknown: the config does not load:\n{e}"),
            Ok(loaded) => match url_of_listen(loaded.config.server.listen) {
                None => "a port chosen at start (server.listen uses port 0)".to_string(),
                Some(url) => {
                    let target = Target {
                        url: url.clone(),
                        token: loaded.access_token(),
                        client_credential: false,
                    };
                    let answers = health_answers(target)?;
                    format!(
                        "{url} ({})",
                        if answers {
                            "answers /_ccgate/health"
                        } else {
                            "nothing answers there"
                        }
                    )
                }
            },
        },
    };
    let _ = writeln!(out, "listens: {listens}");
    Ok(out)
}

/// Whether a gateway answers `GET /_ccgate/health` at `target`.
fn health_answers(target: Target) -> anyhow::Result<bool> {
    let client = AdminClient::new(target)?;
    let runtime = crate::cli::target::runtime()?;
    Ok(runtime.block_on(client.is_ccgate()).unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_paths_survive_the_unit_and_the_plist() {
        let exe = Path::new("/opt/cc gate/bin/ccgate");
        let config = Path::new("/home/a \"b\"/50%/$x\\y & <z>.toml");
        let unit = systemd_unit(exe, config).expect("a unit");
        assert!(
            unit.contains(
                "ExecStart=\"/opt/cc gate/bin/ccgate\" serve --config \"/home/a \\\"b\\\"/50%%/$$x\\\\y & <z>.toml\"\n"
            ),
            "{unit}"
        );
        assert_eq!(config_of_unit(&unit).as_deref(), config.to_str());
        let plist = launchd_plist(exe, config, Path::new("/l/ccgate.log"));
        assert!(
            plist.contains("<string>/home/a &quot;b&quot;/50%/$x\\y &amp; &lt;z&gt;.toml</string>"),
            "{plist}"
        );
        assert_eq!(config_of_unit(&plist).as_deref(), config.to_str());
    }

    /// The program's path: `$` kept as it is (systemd expands no variables in it), `%` doubled;
    /// a path systemd cannot run is refused with the reason (audit: `$$` made the path wrong,
    /// and quotes made systemd reject the unit).
    #[test]
    fn the_program_path_is_written_as_systemd_reads_it() {
        let unit =
            systemd_unit(Path::new("/opt/$HOME/50%/ccgate"), Path::new("/c.toml")).expect("unit");
        assert!(
            unit.contains("ExecStart=\"/opt/$HOME/50%%/ccgate\" serve --config \"/c.toml\"\n"),
            "{unit}"
        );
        for bad in ["/opt/it's/ccgate", "/opt/a\"b/ccgate", "/opt/a\\b/ccgate"] {
            let err = systemd_unit(Path::new(bad), Path::new("/c.toml")).expect_err(bad);
            assert!(err.to_string().contains("move ccgate"), "{err}");
        }
    }

    #[test]
    fn units_go_under_the_config_home_or_library() {
        let env = |n: &str| match n {
            "HOME" => Some("/h".to_string()),
            "XDG_CONFIG_HOME" => Some("/x".to_string()),
            _ => None,
        };
        assert_eq!(
            unit_path(Platform::Linux, &env).expect("path"),
            Path::new("/x/systemd/user/ccgate.service")
        );
        assert_eq!(
            unit_path(Platform::Macos, &env).expect("path"),
            Path::new("/h/Library/LaunchAgents/dev.ccgate.plist")
        );
        let home_only = |n: &str| (n == "HOME").then(|| "/h".to_string());
        assert_eq!(
            unit_path(Platform::Linux, &home_only).expect("path"),
            Path::new("/h/.config/systemd/user/ccgate.service")
        );
    }
}
