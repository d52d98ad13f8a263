//! The configuration file, in two stages.
//!
//! Stage one is a serde mirror of the TOML file as written (`Raw*`, `deny_unknown_fields`, every
//! value wrapped in [`Spanned`] so we know where it came from). Stage two, [`Config::from_toml`],
//! turns that mirror into a validated [`Config`] and reports *every* problem it finds at once, each
//! with its line and dotted key, so a user fixes a file in one pass instead of one error per run.
//!
//! Secrets are read here (including the `*_env` variants, from the environment at load time) and
//! kept in [`Secret`], whose `Debug` never shows the value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default listen address: loopback only. [`default_listen`] is the same address as a `SocketAddr`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7860";
/// Default base URL of an endpoint: the official API.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// Default `priority` of an endpoint (lower is preferred).
pub const DEFAULT_PRIORITY: u32 = 1;
/// Default `weight` of an endpoint (its share within a priority tier).
pub const DEFAULT_WEIGHT: u32 = 100;
/// Default cap on a client request body. Claude Code sends 70–120 KB on a first turn and more as a
/// conversation grows; the API itself accepts 32 MB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// The most endpoints one gateway serves: the set of endpoints a request has tried is a `u64` bitmask.
pub const MAX_ENDPOINTS: usize = 64;

/// A secret string (API key, bearer token, access token). `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is put on the wire or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the gateway picks among healthy endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Lowest priority number first; weighted random within a tier.
    Priority,
    /// Each request starts at the next endpoint in turn.
    RoundRobin,
    /// Weighted random over all endpoints, ignoring priority.
    Weighted,
    /// Power of two choices over a decaying time-to-first-byte estimate that counts failures as
    /// slow, weighted by requests in flight.
    LeastLatency,
}

impl Strategy {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "priority" => Ok(Self::Priority),
            "round_robin" => Ok(Self::RoundRobin),
            "weighted" => Ok(Self::Weighted),
            "least_latency" => Ok(Self::LeastLatency),
            other => Err(format!(
                "unknown strategy `{other}`; expected priority, round_robin, weighted or least_latency"
            )),
        }
    }
}

/// How a recovery probe checks that an endpoint works again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeMode {
    /// A tiny real message whose reply must contain a random code the probe asked for.
    Message,
    /// `POST /v1/messages/count_tokens`: cheap, proves the credential and the route.
    CountTokens,
    /// `GET /v1/models`: cheapest, proves the credential only.
    Models,
}

impl ProbeMode {
    /// The name the config uses for this mode (the inverse of parsing it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::CountTokens => "count_tokens",
            Self::Models => "models",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "message" => Ok(Self::Message),
            "count_tokens" => Ok(Self::CountTokens),
            "models" => Ok(Self::Models),
            other => Err(format!(
                "unknown probe mode `{other}`; expected message, count_tokens or models"
            )),
        }
    }
}

/// `[server]`: the listener and client-facing behaviour.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// If set, clients must present it as `x-api-key` or `Authorization: Bearer`.
    pub access_token: Option<Secret>,
    /// Endpoint selection strategy.
    pub strategy: Strategy,
    /// Largest accepted request body; larger bodies get 413 without touching any endpoint.
    pub max_body_bytes: usize,
    /// How long shutdown waits for in-flight requests before it gives up on them.
    pub shutdown_timeout: Duration,
    /// Most attempts (first try plus failovers) for one client request.
    pub max_attempts: usize,
    /// Serving threads, each with its own event loop and upstream pools.
    pub workers: usize,
}

/// `[timeouts]`: limits on each upstream attempt.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// From sending the request to receiving response headers. Non-streaming requests only get
    /// headers when the whole answer is ready, so this must stay generous.
    pub first_byte: Duration,
    /// Longest silence between two body chunks of a response (SSE events, or JSON bytes).
    pub idle: Duration,
}

/// `[health]`: when endpoints leave and re-enter rotation.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Consecutive endpoint-fault failures that eject an endpoint.
    pub failure_threshold: u32,
    /// Delay before the first recovery probe of an ejected endpoint; it doubles per failed probe.
    pub probe_interval: Duration,
    /// Cap on the probe backoff.
    pub probe_max_interval: Duration,
    /// Time limit of one probe.
    pub probe_timeout: Duration,
    /// Default probe mode.
    pub probe_mode: ProbeMode,
    /// Model named by `message` and `count_tokens` probes.
    pub probe_model: String,
    /// Cooldown after a 429 that carries no `retry-after` or reset header.
    pub rate_limit_cooldown: Duration,
}

/// The credential an endpoint sends upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Sent as `x-api-key`.
    ApiKey(Secret),
    /// Sent as `Authorization: Bearer`.
    AuthToken(Secret),
}

impl Credential {
    /// The secret, for redaction checks.
    pub fn secret(&self) -> &Secret {
        match self {
            Self::ApiKey(s) | Self::AuthToken(s) => s,
        }
    }
}

/// An upstream base URL, split once at load time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash (empty for none), prepended to the client's path.
    pub path_prefix: String,
}

impl BaseUrl {
    /// Parses and checks a base URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("`{s}` is not a valid URL ({e})"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("`{s}` must start with http:// or https://"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(format!("`{s}` must start with http:// or https://"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{s}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err("credentials do not belong in the URL; use api_key or auth_token".into());
        }
        if authority.host().is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        if uri.query().is_some() {
            return Err(format!("`{s}` must not carry a query string"));
        }
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Self {
            scheme,
            authority,
            path_prefix,
        })
    }

    /// The URL of `path_and_query` (which starts with `/`) on this base: scheme, authority, path
    /// prefix, then `path_and_query`.
    pub fn join(&self, path_and_query: &str) -> String {
        format!("{self}{path_and_query}")
    }

    /// The URI of `path_and_query` on this base. Without a path prefix it is assembled from the
    /// parsed parts (shared buffers, no formatting or parsing); with one it is joined and parsed.
    pub fn uri(&self, path_and_query: &http::uri::PathAndQuery) -> Result<http::Uri, String> {
        if !self.path_prefix.is_empty() {
            return self
                .join(path_and_query.as_str())
                .parse()
                .map_err(|e| format!("invalid upstream URL: {e}"));
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query.clone());
        http::Uri::from_parts(parts).map_err(|e| format!("invalid upstream URL: {e}"))
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme, self.authority, self.path_prefix
        )
    }
}

/// One validated `[[endpoints]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Unique name.
    pub name: String,
    /// Where requests go.
    pub base_url: BaseUrl,
    /// The one credential sent upstream.
    pub credential: Credential,
    /// Lower is preferred.
    pub priority: u32,
    /// Share within a priority tier.
    pub weight: u32,
    /// `false` keeps the endpoint configured but out of rotation.
    pub enabled: bool,
    /// Rewrite of the request's `model` for this endpoint.
    pub model_map: BTreeMap<String, String>,
    /// Extra PEM CA certificate(s) to trust for this endpoint (self-hosted relays).
    pub ca_file: Option<PathBuf>,
    /// Probe mode for this endpoint.
    pub probe: ProbeMode,
}

/// `[affinity]`: keeping one client session on one endpoint, so its prompt cache keeps hitting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AffinityConfig {
    /// Whether sessions are pinned at all.
    pub enabled: bool,
    /// How long an unused binding lasts.
    pub ttl: Duration,
    /// Most sessions remembered; the least recently used go first.
    pub max_sessions: usize,
}

/// `[retry_budget]`: how many attempts after the first the gateway may send, so an outage across
/// endpoints cannot multiply the load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries may add this share of the requests seen in the window.
    pub ratio: f64,
    /// Plus this many retries per second of the window, so a quiet gateway can still fail over.
    pub min_per_second: u32,
    /// The sliding window the budget is counted over.
    pub window: Duration,
}

/// `[storage]`: the embedded database that keeps counters, failure episodes and the usage ledger
/// across restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageConfig {
    /// Whether anything is stored at all.
    pub enabled: bool,
    /// The database file; `None` means the default, `<data dir>/ccgate/ccgate.db`.
    pub path: Option<PathBuf>,
    /// How often the background writer commits what happened since its last commit.
    pub flush_interval: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            flush_interval: Duration::from_secs(5),
        }
    }
}

impl StorageConfig {
    /// The database file: `path`, else `<platform data dir>/ccgate/ccgate.db` (`$XDG_DATA_HOME`
    /// or `~/.local/share` on Linux). `None` when the platform has no data dir.
    pub fn resolved_path(&self) -> Option<PathBuf> {
        match &self.path {
            Some(p) => Some(p.clone()),
            None => dirs::data_dir().map(|d| d.join("ccgate").join("ccgate.db")),
        }
    }

    /// Only the `[storage]` table of a config file, validated; the rest of the file is not
    /// checked (`ccgate usage` needs no endpoint credentials from the environment).
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct OnlyStorage {
            #[serde(default)]
            storage: RawStorage,
        }
        let mut p = Problems::new(text);
        let storage = match toml::from_str::<OnlyStorage>(text) {
            Ok(raw) => validate_storage(&raw.storage, &mut p),
            Err(e) => {
                let line = e.span().map(|s| p.line_of(s.start));
                p.at_line(line, "storage", e.message().trim().to_string());
                StorageConfig::default()
            }
        };
        p.finish(source_name, storage)
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[timeouts]`.
    pub timeouts: Timeouts,
    /// `[health]`.
    pub health: HealthConfig,
    /// `[affinity]`.
    pub affinity: AffinityConfig,
    /// `[retry_budget]`.
    pub retry_budget: RetryBudgetConfig,
    /// `[storage]`.
    pub storage: StorageConfig,
    /// `[[endpoints]]`, in file order.
    pub endpoints: Vec<EndpointConfig>,
}

/// One thing wrong with a configuration, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key, e.g. `endpoints[1].base_url`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in one configuration.
#[derive(Debug)]
pub struct ConfigError {
    /// Where the configuration came from (a path, or a description).
    pub source_name: String,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{} has {n} problem{}:",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            match p.line {
                Some(line) => {
                    writeln!(f, "  {}:{line}: {}: {}", self.source_name, p.key, p.message)?
                }
                None => writeln!(f, "  {}: {}: {}", self.source_name, p.key, p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Stage one: the file as written.

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    affinity: RawAffinity,
    #[serde(default)]
    retry_budget: RawRetryBudget,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
}

#[derive(Deserialize, Default)]
struct RawServer {
    listen: Option<Spanned<String>>,
    access_token: Option<Spanned<String>>,
    access_token_env: Option<Spanned<String>>,
    strategy: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<i64>>,
    shutdown_timeout: Option<Spanned<String>>,
    max_attempts: Option<Spanned<i64>>,
    workers: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
struct RawTimeouts {
    connect: Option<Spanned<String>>,
    first_byte: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
struct RawAffinity {
    enabled: Option<Spanned<bool>>,
    ttl: Option<Spanned<String>>,
    max_sessions: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
struct RawRetryBudget {
    ratio: Option<Spanned<f64>>,
    min_per_second: Option<Spanned<i64>>,
    window: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
struct RawStorage {
    enabled: Option<Spanned<bool>>,
    path: Option<Spanned<String>>,
    flush_interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
struct RawHealth {
    failure_threshold: Option<Spanned<i64>>,
    probe_interval: Option<Spanned<String>>,
    probe_max_interval: Option<Spanned<String>>,
    probe_timeout: Option<Spanned<String>>,
    probe_mode: Option<Spanned<String>>,
    probe_model: Option<Spanned<String>>,
    rate_limit_cooldown: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawEndpoint {
    name: Option<Spanned<String>>,
    base_url: Option<Spanned<String>>,
    api_key: Option<Spanned<String>>,
    auth_token: Option<Spanned<String>>,
    api_key_env: Option<Spanned<String>>,
    auth_token_env: Option<Spanned<String>>,
    priority: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
    enabled: Option<Spanned<bool>>,
    model_map: Option<Spanned<BTreeMap<String, String>>>,
    ca_file: Option<Spanned<String>>,
    probe: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// Stage two: validation.

/// Collects problems with line numbers resolved against the source text.
struct Problems<'a> {
    text: &'a str,
    list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            list: Vec::new(),
        }
    }

    /// `value` when nothing was wrong, else every problem found, reported against `source_name`
    /// in the order they were found.
    fn finish<T>(self, source_name: &str, value: T) -> Result<T, ConfigError> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(self.into_error(source_name))
        }
    }

    /// The problems found, reported against `source_name`.
    fn into_error(self, source_name: &str) -> ConfigError {
        ConfigError {
            source_name: source_name.into(),
            problems: self.list,
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn at<T>(&mut self, spanned: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) {
        let line = Some(self.line_of(spanned.span().start));
        self.list.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    fn at_line(&mut self, line: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.at(v, key, "must be longer than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.at(
                    v,
                    key,
                    format!(
                        "`{}` is not a duration like \"30s\" or \"5m\" ({e})",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn int_in(
        &mut self,
        v: &Option<Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: i64,
    ) -> i64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < min || n > max {
            self.at(v, key, format!("{n} is out of range ({min}..={max})"));
            return default;
        }
        n
    }
}

/// Reads environment variables; a seam so tests need not touch the process environment.
pub trait Env {
    /// The variable's value, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            problems: vec![Problem {
                line: None,
                key: "(file)".into(),
                message: format!("cannot read it: {e}"),
            }],
        })?;
        Self::from_toml(&text, &source_name, env)
    }

    /// Parses and validates configuration text; `source_name` names it in messages.
    pub fn from_toml(text: &str, source_name: &str, env: &dyn Env) -> Result<Self, ConfigError> {
        let mut p = Problems::new(text);
        // Unknown keys are collected rather than fatal, so that they are reported together with
        // every other problem.
        let mut unknown: Vec<Vec<String>> = Vec::new();
        let parsed = toml::Deserializer::parse(text).and_then(|de| {
            serde_ignored::deserialize(de, |path| unknown.push(path_segments(&path)))
        });
        let raw: RawConfig = match parsed {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map(|s| p.line_of(s.start));
                // Name the key from the line, never from the offending text itself: that text may
                // be an unquoted secret.
                let key = line
                    .and_then(|l| text.lines().nth(l - 1))
                    .and_then(key_of_line)
                    .unwrap_or_else(|| "(syntax)".into());
                p.at_line(line, key, e.message().trim().to_string());
                return Err(p.into_error(source_name));
            }
        };
        if !unknown.is_empty() {
            let spans = toml::de::DeTable::parse(text).ok();
            for path in &unknown {
                let offset = spans.as_ref().and_then(|t| key_offset(t.get_ref(), path));
                p.at_line(offset.map(|o| p.line_of(o)), dotted(path), "unknown key");
            }
        }
        let config = validate(raw, &mut p, env);
        p.list.sort_by_key(|pr| pr.line.unwrap_or(usize::MAX));
        p.finish(source_name, config)
    }

    /// The configuration used when there is no file: one endpoint from `ANTHROPIC_BASE_URL` and
    /// `ANTHROPIC_API_KEY` or `ANTHROPIC_AUTH_TOKEN`. `None` when neither credential is set.
    pub fn from_anthropic_env(env: &dyn Env) -> Option<Result<Self, ConfigError>> {
        let key = env.var("ANTHROPIC_API_KEY");
        let token = env.var("ANTHROPIC_AUTH_TOKEN");
        if key.is_none() && token.is_none() {
            return None;
        }
        let base = env
            .var("ANTHROPIC_BASE_URL")
            .unwrap_or_else(|| DEFAULT_BASE_URL.into());
        let cred = if key.is_some() {
            "api_key_env = \"ANTHROPIC_API_KEY\""
        } else {
            "auth_token_env = \"ANTHROPIC_AUTH_TOKEN\""
        };
        let text = format!(
            "[[endpoints]]\nname = \"default\"\nbase_url = {}\n{cred}\n",
            toml_string(&base)
        );
        Some(Self::from_toml(&text, "the ANTHROPIC_* environment", env))
    }
}

/// Quotes a string as a TOML basic string.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The key named on a line of TOML (`key = value` or `[table]`), if it looks like one.
fn key_of_line(line: &str) -> Option<String> {
    let line = line.trim();
    let key = if let Some(rest) = line.strip_prefix('[') {
        rest.trim_start_matches('[').split(']').next()?
    } else {
        line.split_once('=')?.0
    };
    let key = key.trim();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c);
    (!key.is_empty() && key.len() <= 64 && key.chars().all(plain)).then(|| key.to_string())
}

/// An ignored-key path from `serde_ignored` as segments: map keys, and `[i]` for array items.
/// Segments that only exist because of `Spanned` wrappers are dropped.
fn path_segments(path: &serde_ignored::Path<'_>) -> Vec<String> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_segments(parent),
    };
    match path {
        Path::Seq { index, .. } => out.push(format!("[{index}]")),
        Path::Map { key, .. } if !key.starts_with("$__") => out.push(key.clone()),
        _ => {}
    }
    out
}

/// `server.lisen`, `endpoints[1].nmae`.
fn dotted(path: &[String]) -> String {
    let mut s = String::new();
    for seg in path {
        if !s.is_empty() && !seg.starts_with('[') {
            s.push('.');
        }
        s.push_str(seg);
    }
    s
}

/// Where the last key of `path` is written in the document.
fn key_offset(table: &toml::de::DeTable<'_>, path: &[String]) -> Option<usize> {
    let (first, rest) = path.split_first()?;
    let (key, value) = table.iter().find(|(k, _)| k.get_ref() == first)?;
    let Some(next) = rest.first() else {
        return Some(key.span().start);
    };
    let mut value = value.get_ref();
    let mut rest = rest;
    if let Some(index) = next
        .strip_prefix('[')
        .and_then(|i| i.trim_end_matches(']').parse::<usize>().ok())
    {
        let toml::de::DeValue::Array(items) = value else {
            return None;
        };
        value = items.get(index)?.get_ref();
        rest = &rest[1..];
        if rest.is_empty() {
            return Some(key.span().start);
        }
    }
    match value {
        toml::de::DeValue::Table(t) => key_offset(t, rest),
        _ => None,
    }
}

fn validate(raw: RawConfig, p: &mut Problems<'_>, env: &dyn Env) -> Config {
    let server = validate_server(&raw.server, p, env);
    let t = &raw.timeouts;
    let timeouts = Timeouts {
        connect: p.duration(&t.connect, "timeouts.connect", Duration::from_secs(10)),
        first_byte: p.duration(
            &t.first_byte,
            "timeouts.first_byte",
            Duration::from_secs(300),
        ),
        idle: p.duration(&t.idle, "timeouts.idle", Duration::from_secs(300)),
    };
    let health = validate_health(&raw.health, p);
    let a = &raw.affinity;
    let affinity = AffinityConfig {
        enabled: a.enabled.as_ref().is_none_or(|v| *v.get_ref()),
        ttl: p.duration(&a.ttl, "affinity.ttl", Duration::from_secs(3600)),
        max_sessions: p.int_in(
            &a.max_sessions,
            "affinity.max_sessions",
            1,
            10_000_000,
            10_000,
        ) as usize,
    };
    let b = &raw.retry_budget;
    let ratio = match &b.ratio {
        None => 0.2,
        Some(v) if (0.0..=10.0).contains(v.get_ref()) => *v.get_ref(),
        Some(v) => {
            p.at(
                v,
                "retry_budget.ratio",
                format!("{} is out of range (0.0..=10.0)", v.get_ref()),
            );
            0.2
        }
    };
    let retry_budget = RetryBudgetConfig {
        ratio,
        min_per_second: p.int_in(
            &b.min_per_second,
            "retry_budget.min_per_second",
            0,
            100_000,
            10,
        ) as u32,
        window: p.duration(&b.window, "retry_budget.window", Duration::from_secs(10)),
    };
    let storage = validate_storage(&raw.storage, p);

    let mut endpoints = Vec::with_capacity(raw.endpoints.len());
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, ep) in raw.endpoints.iter().enumerate() {
        if let Some(e) = validate_endpoint(i, ep, p, env, health.probe_mode) {
            if let Some(first) = names.insert(e.name.clone(), i) {
                let name = ep
                    .get_ref()
                    .name
                    .as_ref()
                    .expect("validated endpoints have names");
                p.at(
                    name,
                    format!("endpoints[{i}].name"),
                    format!("`{}` is already the name of endpoints[{first}]", e.name),
                );
            }
            if is_self(&e.base_url, server.listen) {
                let url = ep
                    .get_ref()
                    .base_url
                    .as_ref()
                    .expect("validated endpoints have URLs");
                p.at(
                    url,
                    format!("endpoints[{i}].base_url"),
                    "points at this gateway's own listen address",
                );
            }
            endpoints.push(e);
        }
    }
    if raw.endpoints.len() > MAX_ENDPOINTS {
        p.at_line(
            None,
            "endpoints",
            format!(
                "{} endpoints configured; at most {MAX_ENDPOINTS} are supported",
                raw.endpoints.len()
            ),
        );
    }
    if raw.endpoints.is_empty() {
        p.at_line(
            None,
            "endpoints",
            "no [[endpoints]] configured; add at least one (see `ccgate init`)",
        );
    }
    Config {
        server,
        timeouts,
        health,
        affinity,
        retry_budget,
        storage,
        endpoints,
    }
}

fn validate_storage(s: &RawStorage, p: &mut Problems<'_>) -> StorageConfig {
    let default = StorageConfig::default();
    let flush_interval = p.duration(
        &s.flush_interval,
        "storage.flush_interval",
        default.flush_interval,
    );
    if let Some(v) = &s.flush_interval {
        if flush_interval < Duration::from_millis(10) || flush_interval > Duration::from_secs(3600)
        {
            p.at(
                v,
                "storage.flush_interval",
                format!("`{}` is out of range (10ms..=1h)", v.get_ref()),
            );
        }
    }
    let path = match &s.path {
        None => None,
        Some(v) if v.get_ref().trim().is_empty() => {
            p.at(v, "storage.path", "must not be empty");
            None
        }
        Some(v) => {
            let raw = v.get_ref();
            // `~/...` is what people write; expand it rather than create a directory named `~`.
            match raw.strip_prefix("~/") {
                Some(rest) => match dirs::home_dir() {
                    Some(home) => Some(home.join(rest)),
                    None => {
                        p.at(
                            v,
                            "storage.path",
                            "`~` cannot be expanded: no home directory",
                        );
                        None
                    }
                },
                None => Some(PathBuf::from(raw)),
            }
        }
    };
    StorageConfig {
        enabled: s.enabled.as_ref().is_none_or(|v| *v.get_ref()),
        path,
        flush_interval,
    }
}

/// Whether `url` points at a gateway listening on `listen` (a loopback host on the same port).
pub fn is_self(url: &BaseUrl, listen: SocketAddr) -> bool {
    let port = url
        .authority
        .port_u16()
        .unwrap_or(if url.scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        });
    let host = url.authority.host();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback && port == listen.port() && listen.port() != 0
}

fn validate_server(s: &RawServer, p: &mut Problems<'_>, env: &dyn Env) -> ServerConfig {
    let default_listen = default_listen();
    let listen = match &s.listen {
        None => default_listen,
        Some(v) => match parse_listen(v.get_ref()) {
            Ok(a) => a,
            Err(m) => {
                p.at(v, "server.listen", m);
                default_listen
            }
        },
    };
    let access_token = match (&s.access_token, &s.access_token_env) {
        (Some(a), Some(_)) => {
            p.at(
                a,
                "server.access_token",
                "set either access_token or access_token_env, not both",
            );
            None
        }
        (Some(a), None) if a.get_ref().is_empty() => {
            p.at(a, "server.access_token", "must not be empty");
            None
        }
        (Some(a), None) => Some(Secret::new(a.get_ref().clone())),
        (None, Some(var)) => match env.var(var.get_ref()) {
            Some(v) => Some(Secret::new(v)),
            None => {
                p.at(
                    var,
                    "server.access_token_env",
                    format!("environment variable `{}` is not set", var.get_ref()),
                );
                None
            }
        },
        (None, None) => None,
    };
    if !listen.ip().is_loopback() && access_token.is_none() && s.access_token_env.is_none() {
        let line = s.listen.as_ref().map(|v| p.line_of(v.span().start));
        p.at_line(line, "server.listen", format!("{listen} is not a loopback address; set server.access_token before listening beyond this machine"));
    }
    let strategy = match &s.strategy {
        None => Strategy::Priority,
        Some(v) => Strategy::parse(v.get_ref()).unwrap_or_else(|m| {
            p.at(v, "server.strategy", m);
            Strategy::Priority
        }),
    };
    let max_body = p.int_in(
        &s.max_body_bytes,
        "server.max_body_bytes",
        1024,
        1 << 32,
        DEFAULT_MAX_BODY_BYTES as i64,
    );
    ServerConfig {
        listen,
        access_token,
        strategy,
        max_body_bytes: usize::try_from(max_body).unwrap_or(DEFAULT_MAX_BODY_BYTES),
        shutdown_timeout: p.duration(
            &s.shutdown_timeout,
            "server.shutdown_timeout",
            Duration::from_secs(30),
        ),
        max_attempts: p.int_in(
            &s.max_attempts,
            "server.max_attempts",
            1,
            MAX_ENDPOINTS as i64,
            3,
        ) as usize,
        workers: match p.int_in(&s.workers, "server.workers", 0, 1024, 0) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        },
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        }
    }
    Err(format!("`{s}` is not an address like \"127.0.0.1:7860\""))
}

fn validate_health(h: &RawHealth, p: &mut Problems<'_>) -> HealthConfig {
    let probe_interval = p.duration(
        &h.probe_interval,
        "health.probe_interval",
        Duration::from_secs(10),
    );
    let probe_max_interval = p.duration(
        &h.probe_max_interval,
        "health.probe_max_interval",
        Duration::from_secs(300),
    );
    if probe_max_interval < probe_interval {
        if let Some(v) = &h.probe_max_interval {
            p.at(
                v,
                "health.probe_max_interval",
                "must not be shorter than health.probe_interval",
            );
        }
    }
    let probe_mode = match &h.probe_mode {
        None => ProbeMode::Models,
        Some(v) => ProbeMode::parse(v.get_ref()).unwrap_or_else(|m| {
            p.at(v, "health.probe_mode", m);
            ProbeMode::Models
        }),
    };
    HealthConfig {
        failure_threshold: p.int_in(&h.failure_threshold, "health.failure_threshold", 1, 1000, 3)
            as u32,
        probe_interval,
        probe_max_interval,
        probe_timeout: p.duration(
            &h.probe_timeout,
            "health.probe_timeout",
            Duration::from_secs(30),
        ),
        probe_mode,
        probe_model: h
            .probe_model
            .as_ref()
            .map_or_else(|| "claude-haiku-4-5".to_string(), |m| m.get_ref().clone()),
        rate_limit_cooldown: p.duration(
            &h.rate_limit_cooldown,
            "health.rate_limit_cooldown",
            Duration::from_secs(30),
        ),
    }
}

fn validate_endpoint(
    i: usize,
    spanned: &Spanned<RawEndpoint>,
    p: &mut Problems<'_>,
    env: &dyn Env,
    default_probe: ProbeMode,
) -> Option<EndpointConfig> {
    let ep = spanned.get_ref();
    let key = |k: &str| format!("endpoints[{i}].{k}");
    let before = p.list.len();

    let name = match &ep.name {
        None => {
            p.at(spanned, key("name"), "is required");
            String::new()
        }
        Some(n) => {
            let v = n.get_ref();
            if v.is_empty()
                || v.len() > 64
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                p.at(
                    n,
                    key("name"),
                    format!("`{v}` must be 1-64 characters of letters, digits, `-`, `_` or `.`"),
                );
            }
            v.clone()
        }
    };
    let base_url = match &ep.base_url {
        None => {
            p.at(spanned, key("base_url"), "is required");
            None
        }
        Some(u) => match BaseUrl::parse(u.get_ref()) {
            Ok(b) => Some(b),
            Err(m) => {
                p.at(u, key("base_url"), m);
                None
            }
        },
    };

    let given: Vec<(&str, &Spanned<String>)> = [
        ("api_key", &ep.api_key),
        ("auth_token", &ep.auth_token),
        ("api_key_env", &ep.api_key_env),
        ("auth_token_env", &ep.auth_token_env),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let credential = match given.as_slice() {
        [] => {
            p.at(
                spanned,
                key("api_key"),
                "no credential: set one of api_key, auth_token, api_key_env or auth_token_env",
            );
            None
        }
        [(k, v)] => {
            let value = if k.ends_with("_env") {
                let var = v.get_ref();
                let value = env.var(var);
                if value.is_none() {
                    p.at(
                        *v,
                        key(k),
                        format!("environment variable `{var}` is not set"),
                    );
                }
                value
            } else if v.get_ref().is_empty() {
                p.at(*v, key(k), "must not be empty");
                None
            } else {
                Some(v.get_ref().clone())
            };
            value.and_then(|s| {
                if s.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    p.at(
                        *v,
                        key(k),
                        "the credential contains spaces or control characters",
                    );
                    return None;
                }
                Some(if k.starts_with("api_key") {
                    Credential::ApiKey(Secret::new(s))
                } else {
                    Credential::AuthToken(Secret::new(s))
                })
            })
        }
        [_, (k, v), ..] => {
            let names: Vec<&str> = given.iter().map(|(k, _)| *k).collect();
            p.at(
                *v,
                key(k),
                format!(
                    "an endpoint has exactly one credential, but {} are set",
                    names.join(", ")
                ),
            );
            None
        }
    };
    let priority = p.int_in(
        &ep.priority,
        &key("priority"),
        0,
        1_000_000,
        i64::from(DEFAULT_PRIORITY),
    ) as u32;
    let weight = p.int_in(
        &ep.weight,
        &key("weight"),
        1,
        1_000_000,
        i64::from(DEFAULT_WEIGHT),
    ) as u32;
    let model_map = ep
        .model_map
        .as_ref()
        .map(|m| m.get_ref().clone())
        .unwrap_or_default();
    if let Some(m) = &ep.model_map {
        if m.get_ref()
            .iter()
            .any(|(k, v)| k.is_empty() || v.is_empty())
        {
            p.at(m, key("model_map"), "model names must not be empty");
        }
    }
    let ca_file = ep.ca_file.as_ref().map(|f| PathBuf::from(f.get_ref()));
    if let (Some(f), Some(path)) = (&ep.ca_file, &ca_file) {
        if !path.is_file() {
            p.at(
                f,
                key("ca_file"),
                format!("`{}` is not a readable file", path.display()),
            );
        }
    }
    let probe = match &ep.probe {
        None => default_probe,
        Some(v) => ProbeMode::parse(v.get_ref()).unwrap_or_else(|m| {
            p.at(v, key("probe"), m);
            default_probe
        }),
    };
    if p.list.len() != before {
        return None;
    }
    Some(EndpointConfig {
        name,
        base_url: base_url?,
        credential: credential?,
        priority,
        weight,
        enabled: ep.enabled.as_ref().is_none_or(|e| *e.get_ref()),
        model_map,
        ca_file,
        probe,
    })
}

/// The config file a command uses: `explicit` (`--config`), else `$CCGATE_CONFIG` (an empty value
/// counts as unset), else `<config dir>/ccgate/config.toml` (`$XDG_CONFIG_HOME` on Linux). The flag
/// says whether the user chose the file (by the option or the variable): a chosen file that does
/// not exist is an error, while the platform default may be missing. `None` when nothing names a
/// file and the platform has no config directory.
pub fn resolve_config_path(explicit: Option<&Path>, env: &dyn Env) -> Option<(PathBuf, bool)> {
    if let Some(p) = explicit {
        return Some((p.to_path_buf(), true));
    }
    if let Some(p) = env.var("CCGATE_CONFIG").filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(p), true));
    }
    dirs::config_dir().map(|d| (d.join("ccgate").join("config.toml"), false))
}

/// Where `ccgate` looks for its configuration when `--config` is not given (see
/// [`resolve_config_path`]).
pub fn default_config_path(env: &dyn Env) -> Option<PathBuf> {
    resolve_config_path(None, env).map(|(path, _)| path)
}

/// The default listen address: [`DEFAULT_LISTEN`] as a `SocketAddr`, built without parsing
/// (`minimal_config_gets_defaults` checks that the two agree).
pub fn default_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7860)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn problems(text: &str) -> Vec<Problem> {
        Config::from_toml(text, "t.toml", &no_env)
            .expect_err("config should be rejected")
            .problems
    }

    const ONE: &str =
        "[[endpoints]]\nname = \"a\"\nbase_url = \"https://api.example.com\"\napi_key = \"k\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(ONE, "t.toml", &no_env).expect("valid");
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.server.strategy, Strategy::Priority);
        assert_eq!(c.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.health.failure_threshold, 3);
        let e = &c.endpoints[0];
        assert_eq!((e.priority, e.weight, e.enabled), (1, 100, true));
        assert_eq!(e.credential, Credential::ApiKey(Secret::new("k")));
        assert_eq!(e.base_url.to_string(), "https://api.example.com");
    }

    #[test]
    fn every_problem_is_reported_with_line_and_key() {
        let text = r#"[server]
listen = "0.0.0.0:80"
strategy = "fastest"

[timeouts]
idle = "soon"

[[endpoints]]
name = "a"
base_url = "ftp://x"
api_key = "k"

[[endpoints]]
name = "a"
base_url = "https://b.example"
api_key = "k"
auth_token = "t"
weight = 0
"#;
        let got: Vec<(Option<usize>, String)> = problems(text)
            .into_iter()
            .map(|p| (p.line, p.key))
            .collect();
        let want: Vec<(Option<usize>, String)> = vec![
            (Some(2), "server.listen".into()),
            (Some(3), "server.strategy".into()),
            (Some(6), "timeouts.idle".into()),
            (Some(10), "endpoints[0].base_url".into()),
            (Some(17), "endpoints[1].auth_token".into()),
            (Some(18), "endpoints[1].weight".into()),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let text = format!("{ONE}\n{ONE}");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "endpoints[1].name");
        assert_eq!(p[0].line, Some(7));
    }

    #[test]
    fn unknown_key_names_its_line() {
        let p = problems("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
        assert_eq!(p.len(), 2, "{p:?}"); // and: no endpoints
        assert_eq!(p[0].line, Some(3));
        assert_eq!(p[0].key, "server.lisen");
        assert!(p[0].message.contains("unknown key"), "{}", p[0].message);
    }

    #[test]
    fn unknown_keys_are_reported_with_every_other_problem() {
        let p = problems(
            "[server]\nlisen = 1\n[timeouts]\nidle = \"soon\"\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://x\"\napi_key = \"k\"\ncolour = 1\n[[endpoints]]\nname = \"b\"\nbase_url = \"ftp://x\"\napi_key = \"k\"\n[nope]\nx = 1\n",
        );
        let keys: Vec<(Option<usize>, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (Some(2), "server.lisen"),
                (Some(4), "timeouts.idle"),
                (Some(9), "endpoints[0].colour"),
                (Some(12), "endpoints[1].base_url"),
                (Some(14), "nope"),
            ]
        );
    }

    #[test]
    fn a_syntax_error_never_echoes_the_value() {
        let p = problems(
            "[[endpoints]]\nname = \"a\"\nbase_url = \"http://x\"\napi_key = sk-ant-SECRET\n",
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, Some(4));
        assert_eq!(p[0].key, "api_key");
        assert!(!format!("{p:?}").contains("SECRET"), "{p:?}");
    }

    #[test]
    fn syntax_error_names_its_line() {
        let p = problems("[server\nlisten = 1\n");
        assert_eq!(p[0].line, Some(1));
    }

    #[test]
    fn credentials_from_env() {
        let env = |k: &str| (k == "MY_TOKEN").then(|| "tok".to_string());
        let text = "[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\nauth_token_env = \"MY_TOKEN\"\n";
        let c = Config::from_toml(text, "t", &env).expect("valid");
        assert_eq!(
            c.endpoints[0].credential,
            Credential::AuthToken(Secret::new("tok"))
        );
        let missing = text.replace("MY_TOKEN", "OTHER");
        let p = Config::from_toml(&missing, "t", &env)
            .expect_err("missing var")
            .problems;
        assert_eq!(p[0].key, "endpoints[0].auth_token_env");
        assert_eq!(p[0].line, Some(4));
    }

    #[test]
    fn missing_credential_and_name() {
        let p = problems("[[endpoints]]\nbase_url = \"http://h\"\n");
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["endpoints[0].name", "endpoints[0].api_key"]);
    }

    #[test]
    fn no_endpoints_is_a_problem() {
        let p = problems("[server]\n");
        assert_eq!(p[0].key, "endpoints");
    }

    #[test]
    fn non_loopback_needs_access_token() {
        let text = format!("[server]\nlisten = \"0.0.0.0:7860\"\naccess_token = \"s\"\n{ONE}");
        assert!(Config::from_toml(&text, "t", &no_env).is_ok());
    }

    #[test]
    fn base_url_prefix_is_kept_without_trailing_slash() {
        let b = BaseUrl::parse("https://relay.example/api/").expect("valid");
        assert_eq!(b.path_prefix, "/api");
        assert_eq!(
            BaseUrl::parse("https://relay.example")
                .expect("valid")
                .path_prefix,
            ""
        );
        assert!(BaseUrl::parse("https://user:pw@relay.example").is_err());
        assert!(BaseUrl::parse("relay.example").is_err());
    }

    #[test]
    fn base_url_uri_keeps_prefix_path_and_query() {
        let pq = |s: &str| http::uri::PathAndQuery::try_from(s).expect("valid");
        let cases = [
            (
                "https://relay.example/api/",
                "/v1/messages?beta=true",
                "https://relay.example/api/v1/messages?beta=true",
            ),
            (
                "http://127.0.0.1:8080",
                "/v1/messages?beta=true",
                "http://127.0.0.1:8080/v1/messages?beta=true",
            ),
            ("http://127.0.0.1:8080/", "/", "http://127.0.0.1:8080/"),
            (
                "https://relay.example",
                "/v1/models",
                "https://relay.example/v1/models",
            ),
        ];
        for (base, path, want) in cases {
            let uri = BaseUrl::parse(base)
                .expect("valid")
                .uri(&pq(path))
                .expect("uri");
            assert_eq!(uri.to_string(), want, "{base} + {path}");
            assert_eq!(
                uri.to_string(),
                BaseUrl::parse(base).expect("valid").join(path)
            );
        }
    }

    #[test]
    fn pointing_at_itself_is_rejected() {
        let text = "[server]\nlisten = \"127.0.0.1:7860\"\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://localhost:7860\"\napi_key = \"k\"\n";
        assert_eq!(problems(text)[0].key, "endpoints[0].base_url");
    }

    #[test]
    fn env_fallback_config() {
        let env = |k: &str| match k {
            "ANTHROPIC_AUTH_TOKEN" => Some("t".to_string()),
            "ANTHROPIC_BASE_URL" => Some("https://relay.example/api".to_string()),
            _ => None,
        };
        let c = Config::from_anthropic_env(&env)
            .expect("some")
            .expect("valid");
        assert_eq!(
            c.endpoints[0].credential,
            Credential::AuthToken(Secret::new("t"))
        );
        assert_eq!(c.endpoints[0].base_url.path_prefix, "/api");
        assert!(Config::from_anthropic_env(&no_env).is_none());
    }

    #[test]
    fn storage_defaults_and_problems() {
        let c = Config::from_toml(ONE, "t.toml", &no_env).expect("valid");
        assert_eq!(c.storage, StorageConfig::default());
        assert!(c.storage.enabled);
        assert_eq!(c.storage.flush_interval, Duration::from_secs(5));
        let text = format!(
            "[storage]\nenabled = false\npath = \"/tmp/x.db\"\nflush_interval = \"200ms\"\n{ONE}"
        );
        let c = Config::from_toml(&text, "t.toml", &no_env).expect("valid");
        assert!(!c.storage.enabled);
        assert_eq!(c.storage.path, Some(PathBuf::from("/tmp/x.db")));
        assert_eq!(c.storage.flush_interval, Duration::from_millis(200));
        let text = format!("[storage]\npath = \"\"\nflush_interval = \"1ms\"\nflsh = 1\n{ONE}");
        let got: Vec<(Option<usize>, String)> = problems(&text)
            .into_iter()
            .map(|p| (p.line, p.key))
            .collect();
        assert_eq!(
            got,
            [
                (Some(2), "storage.path".to_string()),
                (Some(3), "storage.flush_interval".to_string()),
                (Some(4), "storage.flsh".to_string()),
            ]
        );
        let only = StorageConfig::from_toml(
            "[server]\nwhatever = 1\n[storage]\nflush_interval = \"2s\"\n",
            "t.toml",
        )
        .expect("only [storage] is checked");
        assert_eq!(only.flush_interval, Duration::from_secs(2));
        let e = StorageConfig::from_toml("[storage]\nflush_interval = \"soon\"\n", "t.toml")
            .expect_err("bad duration");
        assert_eq!(e.problems[0].line, Some(2));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Config::from_toml(ONE, "t", &no_env).expect("valid");
        assert!(!format!("{c:?}").contains("\"k\""));
    }
}
