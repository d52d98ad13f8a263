//! Command-line interface: parse, load, run, and map the result to an exit code.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, Env, ProcessEnv, default_config_path, toml_string};

/// ccgate: a failover gateway for the Anthropic Messages API.
#[derive(Parser, Debug)]
#[command(name = "ccgate", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway in the foreground until SIGINT/SIGTERM.
    Serve {
        /// Config file (default: $CCGATE_CONFIG, then ~/.config/ccgate/config.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write a starter config file.
    Init {
        /// Where to write it (default: $CCGATE_CONFIG, then ~/.config/ccgate/config.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
        /// Endpoint name.
        #[arg(long, default_value = "official")]
        name: String,
        /// Endpoint base URL (default: $ANTHROPIC_BASE_URL, then https://api.anthropic.com).
        #[arg(long)]
        base_url: Option<String>,
        /// API key, sent as x-api-key (default: $ANTHROPIC_API_KEY).
        #[arg(long, conflicts_with = "auth_token")]
        api_key: Option<String>,
        /// Bearer token (default: $ANTHROPIC_AUTH_TOKEN).
        #[arg(long)]
        auth_token: Option<String>,
    },
    /// Check a config file and print what it configures (secrets hidden).
    Validate {
        /// Config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Runs the CLI; the error, if any, has already been described to the user when it is a
/// [`ConfigError`].
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(config),
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
            println!("{source}: ok");
            for e in &config.endpoints {
                println!(
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
    }
}

/// Finds and loads the configuration: `--config`, `$CCGATE_CONFIG`, the platform config dir, and
/// finally the `ANTHROPIC_*` environment. Returns the config and a description of its source.
pub fn load(explicit: Option<&Path>, env: &dyn Env) -> anyhow::Result<(Config, String)> {
    let (path, chosen) = match explicit {
        Some(p) => (Some(p.to_path_buf()), true),
        None => (default_config_path(env), env.var("CCGATE_CONFIG").is_some()),
    };
    if let Some(path) = &path {
        if path.exists() || chosen {
            warn_if_readable_by_others(path);
            let config = Config::load(path, env)?;
            return Ok((config, path.display().to_string()));
        }
    }
    if let Some(result) = Config::from_anthropic_env(env) {
        let config = result?;
        return Ok((
            config,
            "the ANTHROPIC_* environment (no config file)".into(),
        ));
    }
    let where_ = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "~/.config/ccgate/config.toml".into());
    bail!(
        "no configuration: {where_} does not exist and neither ANTHROPIC_API_KEY nor ANTHROPIC_AUTH_TOKEN is set.\n\
         Create one with:\n    ccgate init --api-key sk-ant-...        (or --auth-token, --base-url)\n\
         or run with ANTHROPIC_API_KEY set to serve a single endpoint."
    )
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "{} can be read by other users; it may hold secrets: chmod 600 it",
                    path.display()
                );
            }
        }
    }
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, source) = load(config.as_deref(), &ProcessEnv)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = crate::server::Server::bind(config).await?;
        let addr = server.local_addr();
        tracing::info!(config = %source, "ccgate {} started", env!("CARGO_PKG_VERSION"));
        let mut out = std::io::stdout();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
        server.run(crate::server::shutdown_signal()).await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
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
    let path = config
        .or_else(|| default_config_path(&env))
        .context("no config directory on this platform; pass --config")?;
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    let base_url = base_url
        .or_else(|| env.var("ANTHROPIC_BASE_URL"))
        .unwrap_or_else(|| "https://api.anthropic.com".into());
    let credential = match (
        api_key.or_else(|| env.var("ANTHROPIC_API_KEY")),
        auth_token.or_else(|| env.var("ANTHROPIC_AUTH_TOKEN")),
    ) {
        (Some(k), _) => format!("api_key = {}", toml_string(&k)),
        (None, Some(t)) => format!("auth_token = {}", toml_string(&t)),
        (None, None) => {
            "api_key_env = \"ANTHROPIC_API_KEY\"   # or api_key = \"sk-ant-...\"".to_string()
        }
    };
    let text = format!(
        "# ccgate configuration. Durations are strings like \"30s\" or \"5m\".\n\n\
         [server]\nlisten = \"127.0.0.1:7860\"\nstrategy = \"priority\"     # priority | round_robin | weighted\n\
         # access_token = \"...\"       # required from clients when set; needed to listen beyond loopback\n\n\
         [health]\nfailure_threshold = 3\nprobe_interval = \"10s\"\nprobe_max_interval = \"5m\"\nprobe_mode = \"models\"      # message | count_tokens | models\n\n\
         [timeouts]\nconnect = \"10s\"\nfirst_byte = \"5m\"\nidle = \"5m\"\n\n\
         [[endpoints]]\nname = {}\nbase_url = {}\n{credential}\npriority = 1\nweight = 100\n\n\
         # [[endpoints]]\n# name = \"backup\"\n# base_url = \"https://relay.example/api\"\n# auth_token = \"...\"\n# priority = 2\n",
        toml_string(name),
        toml_string(&base_url),
    );
    // Check what we are about to write, so `init` never leaves a file `serve` rejects.
    if let Err(e) = Config::from_toml(&text, &path.display().to_string(), &env) {
        let only_env_missing = e.problems.iter().all(|p| p.message.contains("is not set"));
        if !only_env_missing {
            return Err(e.into());
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_private(&path, text.as_bytes())?;
    println!("wrote {}", path.display());
    println!(
        "start the gateway with: ccgate serve --config {}",
        path.display()
    );
    Ok(())
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
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
