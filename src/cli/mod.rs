//! Command-line interface: parse, load, run, and map the result to an exit code.

/// `print!` to standard output, ending the command quietly when its reader has gone
/// ([`out::print`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out::print(format_args!($($arg)*))
    };
}

/// `println!` to standard output, ending the command quietly when its reader has gone
/// ([`out::print`]).
macro_rules! outln {
    () => {
        $crate::cli::out::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod args;
pub mod check;
pub mod claude;
pub mod edit;
pub mod endpoints;
pub mod launch;
pub mod logging;
pub mod out;
pub mod requests;
pub mod service;
pub mod status;
pub mod table;
pub mod target;
pub mod usage;

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::CommandFactory;

pub use crate::cli::args::{
    ClaudeCommand, Cli, Command, CredentialArgs, EditTarget, EndpointsCommand,
};
use crate::cli::edit::NewCredential;
use crate::config::{
    Config, ConfigError, DEFAULT_BASE_URL, DEFAULT_LISTEN, DEFAULT_PRIORITY, DEFAULT_WEIGHT, Env,
    ProcessEnv, resolve_config_path, toml_string,
};

/// Runs the CLI. An error that is an [`Exit`] has been described to the user already and only
/// sets the exit code; any other error is for the caller to [`report`] (exit code 2).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, listen, .. } => serve(config, listen),
        Command::Init {
            config,
            force,
            name,
            base_url,
            api_key,
            auth_token,
        } => init(config, force, &name, base_url, api_key, auth_token),
        Command::Validate { config } => {
            let (config, source) = load(config.as_deref(), &ProcessEnv)?;
            outln!("{source}: ok");
            for e in &config.endpoints {
                outln!(
                    "  {} -> {} (priority {}, weight {}{})",
                    e.name,
                    e.base_url,
                    e.priority,
                    e.weight,
                    if e.enabled { "" } else { ", disabled" }
                );
            }
            Ok(())
        }
        Command::Endpoints(cmd) => endpoints(cmd),
        Command::Status {
            config,
            url,
            cluster,
        } => {
            let target = target::find_target(config.as_deref(), url.as_deref(), &ProcessEnv)?;
            if cluster {
                out!("{}", status::cluster_status(target)?);
            } else {
                out!("{}", status::status(target)?);
            }
            Ok(())
        }
        Command::Check { config } => {
            let (config, _) = load(config.as_deref(), &ProcessEnv)?;
            let (report, any_works) = check::check(config)?;
            out!("{report}");
            if any_works {
                Ok(())
            } else {
                Err(Exit(1).into())
            }
        }
        Command::Claude(cmd) => claude(cmd),
        Command::Usage(args) => crate::cli::usage::run(args),
        Command::Requests(args) => crate::cli::requests::run(args),
        Command::Service(cmd) => crate::cli::service::run(cmd),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "ccgate", &mut script);
            out::print_bytes(&script);
            Ok(())
        }
    }
}

/// The exit code for an error: set by [`Exit`] (already reported), else 2.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<Exit>().map_or(2, |x| x.0)
}

fn endpoints(cmd: EndpointsCommand) -> anyhow::Result<()> {
    let env = ProcessEnv;
    let (target, change) = match cmd {
        EndpointsCommand::List { config } => {
            out!("{}", endpoints::list(config.as_deref(), &env)?);
            return Ok(());
        }
        EndpointsCommand::Add {
            name,
            base_url,
            credential,
            priority,
            weight,
            target,
        } => {
            let c = credential;
            let credential = NewCredential::first_of(
                c.api_key.map(|k| secret_arg(k, "--api-key")).transpose()?,
                c.auth_token
                    .map(|t| secret_arg(t, "--auth-token"))
                    .transpose()?,
                c.api_key_env,
                c.auth_token_env,
            )
            .context("give one of --api-key, --auth-token, --api-key-env, --auth-token-env")?;
            let ep = crate::cli::edit::NewEndpoint {
                name,
                base_url,
                credential,
                priority,
                weight,
            };
            (target, endpoints::Edit::Add(ep))
        }
        EndpointsCommand::Remove { name, target } => (target, endpoints::Edit::Remove(name)),
        EndpointsCommand::Enable { name, target } => {
            (target, endpoints::Edit::SetEnabled(name, true))
        }
        EndpointsCommand::Disable { name, target } => {
            (target, endpoints::Edit::SetEnabled(name, false))
        }
    };
    endpoints::run_edit(
        target.config.as_deref(),
        target.url.as_deref(),
        change,
        &env,
    )
}

/// A secret given on the command line, or `-` to read it from standard input.
fn secret_arg(value: String, flag: &str) -> anyhow::Result<String> {
    if value != "-" {
        return Ok(value);
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .with_context(|| format!("{flag} -: cannot read standard input"))?;
    let line = line.trim().to_string();
    if line.is_empty() {
        bail!("{flag} -: standard input was empty");
    }
    Ok(line)
}

fn claude(cmd: ClaudeCommand) -> anyhow::Result<()> {
    use crate::cli::claude::{self, Disabled};
    let env = ProcessEnv;
    let paths = || claude::Paths::locate(&env);
    match cmd {
        ClaudeCommand::Run { config, url, args } => return claude_run(config, url, &args),
        ClaudeCommand::SessionGateway { config } => return session_gateway(config),
        ClaudeCommand::Enable { config, url } => {
            let paths = paths()?;
            let target = target::find_target(config.as_deref(), url.as_deref(), &env)?;
            let token = target.token.as_ref().map(|t| t.expose().to_string());
            let via = claude::TokenVia::for_gateway(target.client_credential);
            let done = claude::enable(&paths, &target.url, token.as_deref(), via)?;
            outln!(
                "Claude Code now uses ccgate at {}: set {} in {}",
                target.url,
                done.keys
                    .iter()
                    .map(|k| format!("env.{k}"))
                    .collect::<Vec<_>>()
                    .join(" and "),
                done.settings.display()
            );
            match &done.backup {
                Some(b) => outln!(
                    "the original is kept in {}; `ccgate claude disable` puts it back",
                    b.display()
                ),
                None => outln!("`ccgate claude disable` removes the file again"),
            }
            if via == claude::TokenVia::Header {
                outln!(
                    "the access token goes in env.ANTHROPIC_CUSTOM_HEADERS (x-ccgate-token): an endpoint uses credential = \"client\", which needs Claude Code's own login (`claude /login`) in its requests"
                );
            }
            if done.api_key_also_set {
                outln!(
                    "note: settings.json also sets env.ANTHROPIC_API_KEY; Claude Code sends it too, and ccgate replaces it with the endpoint's credential"
                );
            }
            outln!("start a new Claude Code session to pick it up");
        }
        ClaudeCommand::Disable => {
            let paths = paths()?;
            let settings = paths.settings.display();
            match claude::disable(&paths)? {
                Disabled::Restored => {
                    outln!("restored {settings} as it was before `ccgate claude enable`")
                }
                Disabled::Removed => outln!("removed {settings} (ccgate had created it)"),
                Disabled::KeysUndone => outln!(
                    "{settings} was changed since `ccgate claude enable`: removed only what ccgate set, kept everything else"
                ),
                Disabled::NothingToDo => {
                    outln!("nothing to undo: ccgate has not changed {settings}")
                }
            }
        }
    }
    Ok(())
}

/// `ccgate claude run`: the running gateway, or one for this session; then Claude Code.
fn claude_run(
    config: Option<PathBuf>,
    url: Option<String>,
    args: &[std::ffi::OsString],
) -> anyhow::Result<()> {
    let env = ProcessEnv;
    let running = launch::find_running(config.as_deref(), url.as_deref(), &env)?;
    // Declared before the run, so it outlives Claude and stops after it.
    let session: launch::Session;
    let (url, token, client_credential) = match running {
        Some(target) => (target.url, target.token, target.client_credential),
        None => {
            // Loaded here too, for the access token and to report a broken config before anything starts.
            let (loaded, _) = load(config.as_deref(), &env)?;
            session = launch::Session::start(config.as_deref())?;
            eprintln!(
                "ccgate: started a gateway for this session at {} (log: {})",
                session.url(),
                session.log().display()
            );
            let client_credential = target::uses_client_credential(&loaded);
            (
                session.url().to_string(),
                loaded.server.access_token,
                client_credential,
            )
        }
    };
    let program = launch::claude_program(&env);
    let via = crate::cli::claude::TokenVia::for_gateway(client_credential);
    match launch::run_claude(&program, &url, token.as_ref(), via, args)? {
        0 => Ok(()),
        code => Err(Exit(code).into()),
    }
}

/// The gateway `claude run` starts: on a free loopback port, until stdin closes or a signal.
fn session_gateway(config: Option<PathBuf>) -> anyhow::Result<()> {
    let (mut config, source) = load(config.as_deref(), &ProcessEnv)?;
    override_listen(&mut config, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let runtime = target::runtime()?;
    runtime.block_on(async move {
        let file = source.file().map(Path::to_path_buf);
        let server = crate::server::Server::bind_with_source(config, file).await?;
        let addr = server.local_addr();
        let (signal, second) = crate::server::shutdown_signals();
        tracing::info!(config = %source, "ccgate {} started for a Claude Code session", env!("CARGO_PKG_VERSION"));
        let mut out = std::io::stdout();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
        let shutdown = async {
            tokio::select! {
                () = signal => {}
                () = launch::stdin_closed() => {}
            }
        };
        // A second signal during the drain ends it at once (streams get their `error` event).
        server
            .run_until(shutdown, move || second)
            .await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

/// Where a loaded configuration came from. `Display` describes it for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A config file; SIGHUP and `POST /_ccgate/reload` re-read it.
    File(PathBuf),
    /// No file: one endpoint from the `ANTHROPIC_*` environment.
    AnthropicEnv,
}

impl Source {
    /// The config file, if the configuration came from one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::File(path) => Some(path),
            Self::AnthropicEnv => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::AnthropicEnv => f.write_str("the ANTHROPIC_* environment (no config file)"),
        }
    }
}

/// Finds and loads the configuration: `--config`, `$CCGATE_CONFIG`, the platform config dir, and
/// finally the `ANTHROPIC_*` environment. Returns the config and where it came from.
pub fn load(explicit: Option<&Path>, env: &dyn Env) -> anyhow::Result<(Config, Source)> {
    let resolved = resolve_config_path(explicit, env);
    if let Some((path, chosen)) = &resolved
        && (path.exists() || *chosen)
    {
        let config = Config::load(path, env)?;
        // After the load: a file that does not load (or a directory) gets its error alone.
        warn_if_readable_by_others(path);
        return Ok((config, Source::File(path.clone())));
    }
    if let Some(result) = Config::from_anthropic_env(env) {
        return Ok((result?, Source::AnthropicEnv));
    }
    let where_ = resolved
        .map(|(p, _)| p.display().to_string())
        .unwrap_or_else(|| "~/.config/ccgate/config.toml".into());
    bail!(
        "no configuration: {where_} does not exist and neither ANTHROPIC_API_KEY nor ANTHROPIC_AUTH_TOKEN is set.\n\
         Create one with:\n    ccgate init --api-key sk-ant-...        (or --auth-token, --base-url)\n\
         or run with ANTHROPIC_API_KEY set to serve a single endpoint."
    )
}

fn warn_if_readable_by_others(path: &Path) {
    if edit::readable_by_others(path) {
        tracing::warn!(
            "{} can be read by other users; it may hold secrets: chmod 600 it",
            path.display()
        );
    }
}

fn serve(config: Option<PathBuf>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let (mut config, source) = load(config.as_deref(), &ProcessEnv)?;
    if let Some(addr) = listen {
        override_listen(&mut config, addr)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // SIGHUP and `POST /_ccgate/reload` re-read the file the config came from, if any.
        let file = source.file().map(Path::to_path_buf);
        let server = crate::server::Server::bind_with_source(config, file).await?;
        let addr = server.local_addr();
        // Handlers first: the line below tells scripts they may signal us.
        let (shutdown, second) = crate::server::shutdown_signals();
        tracing::info!(config = %source, "ccgate {} started", env!("CARGO_PKG_VERSION"));
        let mut out = std::io::stdout();
        // A reader of stdout that went away costs the scripts their line, not the gateway.
        if let Err(e) = writeln!(out, "listening on http://{addr}").and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "cannot write `listening on http://{addr}` to stdout");
        }
        // A second signal during the drain ends it at once (streams get their `error` event).
        server.run_until(shutdown, move || second).await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

/// Applies `serve --listen`, with the checks the config file's `server.listen` gets: beyond
/// loopback only with an access token, and never the address of one of its own endpoints.
fn override_listen(config: &mut Config, addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() && config.server.access_token.is_none() {
        bail!(
            "--listen {addr}: not a loopback address; set server.access_token before listening beyond this machine"
        );
    }
    for e in &config.endpoints {
        if crate::config::is_self(&e.base_url, addr) {
            bail!(
                "--listen {addr}: endpoint `{}` ({}) points at this gateway's own address",
                e.name,
                e.base_url
            );
        }
    }
    config.server.listen = addr;
    config.server.listen_overridden = true;
    Ok(())
}

fn init(
    config: Option<PathBuf>,
    force: bool,
    name: &str,
    base_url: Option<String>,
    api_key: Option<String>,
    auth_token: Option<String>,
) -> anyhow::Result<()> {
    let env = ProcessEnv;
    let (path, _) = resolve_config_path(config.as_deref(), &env)
        .context("no config directory on this platform; pass --config")?;
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    let base_url = base_url
        .or_else(|| env.var("ANTHROPIC_BASE_URL"))
        .unwrap_or_else(|| DEFAULT_BASE_URL.into());
    // A credential given as a flag wins over the environment, whichever kind each one is.
    let credential = NewCredential::first_of(api_key, auth_token, None, None).or_else(|| {
        NewCredential::first_of(
            env.var("ANTHROPIC_API_KEY"),
            env.var("ANTHROPIC_AUTH_TOKEN"),
            None,
            None,
        )
    });
    let credential = match credential {
        Some(c) => c.toml_line(),
        None => format!(
            "{}   # or api_key = \"sk-ant-...\"",
            NewCredential::ApiKeyEnv("ANTHROPIC_API_KEY".into()).toml_line()
        ),
    };
    let text = format!(
        "# ccgate configuration. Durations are strings like \"30s\" or \"5m\".\n\n\
         [server]\nlisten = \"{DEFAULT_LISTEN}\"\nstrategy = \"priority\"     # priority | round_robin | weighted | least_latency\n\
         # access_token = \"...\"       # required from clients when set; needed to listen beyond loopback\n\n\
         [health]\nfailure_threshold = 3\nprobe_interval = \"10s\"\nprobe_max_interval = \"5m\"\nprobe_mode = \"models\"      # message | count_tokens | models\n\n\
         [timeouts]\nconnect = \"10s\"\nfirst_byte = \"5m\"\nidle = \"5m\"\n\n\
         [[endpoints]]\nname = {}\nbase_url = {}\n{credential}\npriority = {DEFAULT_PRIORITY}\nweight = {DEFAULT_WEIGHT}\n\n\
         # [[endpoints]]\n# name = \"backup\"\n# base_url = \"https://relay.example/api\"\n# auth_token = \"...\"\n# priority = 2\n",
        toml_string(name),
        toml_string(&base_url),
    );
    // Check what we are about to write, so `init` never leaves a file `serve` rejects. A variable
    // the file names need not be set here: the gateway reads it where it runs.
    target::Lenient::from_toml(&text, &path.display().to_string(), &env)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Atomically, so a crash during `--force` leaves the old file; owner-only, as it holds secrets.
    crate::cli::edit::write_atomic_private(&path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    outln!("wrote {}", path.display());
    outln!(
        "start the gateway with: ccgate serve --config {}",
        path.display()
    );
    Ok(())
}

/// Prints an error for the user: a config error lists its problems; anything else its chain.
pub fn report(e: &anyhow::Error) {
    if let Some(c) = e.downcast_ref::<ConfigError>() {
        eprint!("error: {c}");
    } else {
        eprintln!("error: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_string())
        }
    }

    #[test]
    fn config_path_resolution() {
        let env = env_with(&[("CCGATE_CONFIG", "/from/env.toml")]);
        let flag = Path::new("/from/flag.toml");
        assert_eq!(
            resolve_config_path(Some(flag), &env),
            Some((flag.to_path_buf(), true))
        );
        assert_eq!(
            resolve_config_path(None, &env),
            Some((PathBuf::from("/from/env.toml"), true))
        );
        // An empty variable counts as unset: the platform default, not chosen by the user.
        for env in [env_with(&[]), env_with(&[("CCGATE_CONFIG", "")])] {
            if let Some((path, chosen)) = resolve_config_path(None, &env) {
                assert!(path.ends_with("ccgate/config.toml"), "{}", path.display());
                assert!(!chosen);
            }
        }
    }

    #[test]
    fn a_chosen_config_that_does_not_exist_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.toml");
        let fallback = |name: &str| (name == "ANTHROPIC_API_KEY").then(|| "sk-x".to_string());
        assert!(load(Some(&missing), &fallback).is_err());
        let missing_s = missing.to_string_lossy().into_owned();
        let via_env = |name: &str| match name {
            "CCGATE_CONFIG" => Some(missing_s.clone()),
            other => fallback(other),
        };
        assert!(load(None, &via_env).is_err());
    }

    #[test]
    fn sources_describe_themselves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[endpoints]]\nname = \"a\"\nbase_url = \"http://a\"\napi_key = \"k\"\n",
        )
        .expect("write");
        let (_, source) = load(Some(&path), &env_with(&[])).expect("loads");
        assert_eq!(source, Source::File(path.clone()));
        assert_eq!(source.file(), Some(path.as_path()));
        assert_eq!(source.to_string(), path.display().to_string());
        assert_eq!(Source::AnthropicEnv.file(), None);
        assert_eq!(
            Source::AnthropicEnv.to_string(),
            "the ANTHROPIC_* environment (no config file)"
        );
    }
}

/// An error that has been reported already and only sets the exit code.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for Exit {}
