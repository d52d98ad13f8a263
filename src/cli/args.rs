//! The command line as clap reads it: every command, its options and their help.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cli::logging::LogFormat;
use crate::config::{DEFAULT_BASE_URL, DEFAULT_PRIORITY, DEFAULT_WEIGHT};

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
        /// Listen on this address instead of `server.listen` (port 0 = any free port).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Log lines as human-readable text or as JSON objects, one per line (on stderr).
        #[arg(
            long,
            value_enum,
            ignore_case = true,
            env = "CCGATE_LOG_FORMAT",
            default_value_t = LogFormat::Text
        )]
        log_format: LogFormat,
    },
    /// Write a starter config file.
    ///
    /// Without --api-key, --auth-token or either variable, the endpoint reads its key from
    /// $ANTHROPIC_API_KEY when the gateway loads the file. The file is owner-only; an existing one
    /// is kept unless --force is given.
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
        /// Endpoint base URL.
        #[arg(
            long,
            help = format!("Endpoint base URL (default: $ANTHROPIC_BASE_URL, then {DEFAULT_BASE_URL})")
        )]
        base_url: Option<String>,
        /// API key, sent as x-api-key.
        #[arg(
            long,
            conflicts_with = "auth_token",
            help = "API key, sent as x-api-key (default: $ANTHROPIC_API_KEY, unless --auth-token is given)"
        )]
        api_key: Option<String>,
        /// Bearer token, sent as Authorization: Bearer.
        #[arg(
            long,
            help = "Bearer token, sent as Authorization: Bearer (default: $ANTHROPIC_AUTH_TOKEN when $ANTHROPIC_API_KEY is not set, unless --api-key is given)"
        )]
        auth_token: Option<String>,
    },
    /// Check a config file and print what it configures (secrets hidden).
    Validate {
        /// Config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List, add, remove, enable or disable endpoints in the config file.
    ///
    /// Edits keep the file's comments and layout, are checked before anything is written (a change
    /// that would make the config invalid is refused and the file stays as it was), and are then
    /// applied to the running gateway (`POST /_ccgate/reload`).
    #[command(subcommand)]
    Endpoints(EndpointsCommand),
    /// Show the running gateway's endpoints, failure queue and totals.
    Status {
        /// Config file, for the gateway's address and access token.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The gateway's URL (default: http://<server.listen> from the config).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Show the cluster instead: live instances, when each was last heard from, and the
        /// cluster-wide totals (`[cluster]` mode).
        #[arg(long)]
        cluster: bool,
    },
    /// Probe every configured endpoint now and show which work.
    ///
    /// Runs from this process (no gateway needed), all endpoints in parallel, each in its probe
    /// mode. Exits 0 when at least one enabled endpoint works, 1 when none does.
    Check {
        /// Config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Point Claude Code at this gateway, or undo that.
    ///
    /// Edits ~/.claude/settings.json ($CLAUDE_CONFIG_DIR/settings.json when that is set).
    #[command(subcommand)]
    Claude(ClaudeCommand),
    /// Run the gateway in the background: a systemd user unit (a launchd agent on macOS).
    ///
    /// The unit runs `ccgate serve --config <absolute path>` and restarts it on failure; its logs
    /// go to the journal (`journalctl --user -u ccgate`; ~/Library/Logs/ccgate.log on macOS).
    /// With CCGATE_SERVICE_DRY_RUN=1 the systemctl/launchctl commands are printed, not run.
    #[command(subcommand)]
    Service(crate::cli::service::ServiceCommand),
    /// Print the usage ledger: requests and tokens per day, endpoint and model.
    ///
    /// Reads the gateway's database file directly (read-only), so no gateway needs to run.
    Usage(crate::cli::usage::UsageArgs),
    /// Show the running gateway's recent requests (`--follow` to keep printing new ones).
    ///
    /// Never shows bodies or credentials: time, request, model, endpoint, attempts, status,
    /// outcome, latencies and tokens.
    Requests(crate::cli::requests::RequestsArgs),
    /// Print a shell completion script.
    ///
    /// For example: `ccgate completions bash > ~/.local/share/bash-completion/completions/ccgate`,
    /// or `ccgate completions zsh > ~/.zfunc/_ccgate`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Where an edit goes, and which running gateway hears of it.
#[derive(Args, Debug)]
pub struct EditTarget {
    /// Config file (default: $CCGATE_CONFIG, then ~/.config/ccgate/config.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The running gateway to apply the change to (default: http://<server.listen>).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// The one credential of a new endpoint. A value of `-` is read from standard input, which keeps
/// it out of the shell history and the process list.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct CredentialArgs {
    /// API key, sent upstream as x-api-key (stored in the file; `-` reads it from stdin).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Bearer token, sent upstream as Authorization: Bearer (stored in the file; `-` reads stdin).
    #[arg(long, value_name = "TOKEN")]
    pub auth_token: Option<String>,
    /// Read the API key from this environment variable when the gateway loads the file.
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Read the bearer token from this environment variable when the gateway loads the file.
    #[arg(long, value_name = "VAR")]
    pub auth_token_env: Option<String>,
}

/// `ccgate endpoints ...`.
#[derive(Subcommand, Debug)]
pub enum EndpointsCommand {
    /// Show the endpoints in the config file (credential kinds, never their values).
    List {
        /// Config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Add an endpoint.
    Add {
        /// Unique name (letters, digits, `-`, `_`, `.`).
        name: String,
        /// Base URL, e.g. https://api.anthropic.com or https://relay.example/api.
        #[arg(long, value_name = "URL")]
        base_url: String,
        /// Its one credential.
        #[command(flatten)]
        credential: CredentialArgs,
        /// Lower is preferred.
        #[arg(
            long,
            value_name = "N",
            help = format!("Lower is preferred (default {DEFAULT_PRIORITY})")
        )]
        priority: Option<u32>,
        /// Share within its priority tier.
        #[arg(
            long,
            value_name = "N",
            help = format!("Share within its priority tier (default {DEFAULT_WEIGHT})")
        )]
        weight: Option<u32>,
        /// The file, and the gateway to tell.
        #[command(flatten)]
        target: EditTarget,
    },
    /// Remove an endpoint.
    Remove {
        /// Its name.
        name: String,
        /// The file, and the gateway to tell.
        #[command(flatten)]
        target: EditTarget,
    },
    /// Put an endpoint back into rotation (`enabled = true`).
    Enable {
        /// Its name.
        name: String,
        /// The file, and the gateway to tell.
        #[command(flatten)]
        target: EditTarget,
    },
    /// Take an endpoint out of rotation (`enabled = false`); it stays in the file.
    Disable {
        /// Its name.
        name: String,
        /// The file, and the gateway to tell.
        #[command(flatten)]
        target: EditTarget,
    },
}

/// `ccgate claude ...`.
#[derive(Subcommand, Debug)]
pub enum ClaudeCommand {
    /// Point Claude Code at the gateway.
    ///
    /// Sets env.ANTHROPIC_BASE_URL (and env.ANTHROPIC_AUTH_TOKEN when the gateway has an access
    /// token) in Claude Code's settings.json, keeping a backup and every other setting.
    Enable {
        /// Config file, for the gateway's address and access token.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The gateway's URL (default: http://<server.listen> from the config).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Undo `claude enable`.
    ///
    /// Restores settings.json exactly as it was; if it was changed since, removes only what
    /// ccgate set and keeps everything else.
    Disable,
    /// Start Claude Code pointed at the gateway, without touching settings.json.
    ///
    /// Sets ANTHROPIC_BASE_URL (and ANTHROPIC_AUTH_TOKEN when the gateway has an access token) in
    /// Claude Code's environment only. Uses the running gateway when it answers; otherwise starts
    /// one from the config on a free loopback port for as long as Claude runs (its log goes to
    /// <state dir>/ccgate/claude-run.log). Runs `claude` from PATH, or $CCGATE_CLAUDE_BIN. Exits
    /// with Claude Code's exit code.
    Run {
        /// Config file (default: $CCGATE_CONFIG, then ~/.config/ccgate/config.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The running gateway's URL; it must answer (default: http://<server.listen>, else a
        /// gateway started for the session).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Arguments for Claude Code, after `--`.
        #[arg(last = true, value_name = "CLAUDE_ARGS")]
        args: Vec<std::ffi::OsString>,
    },
    /// The gateway `claude run` starts for a session: on a free loopback port, stopping when its
    /// standard input closes.
    #[command(hide = true)]
    SessionGateway {
        /// Config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

impl Cli {
    /// How to log: `serve --log-format` (which also reads `CCGATE_LOG_FORMAT`), else
    /// `CCGATE_LOG_FORMAT`.
    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            Command::Serve { log_format, .. } => *log_format,
            _ => LogFormat::from_env(),
        }
    }
}
