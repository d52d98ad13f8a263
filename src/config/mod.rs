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
use std::path::PathBuf;
use std::time::Duration;

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
/// Default cap on open client connections (`server.max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on idle upstream connections kept per endpoint and serving worker
/// (`server.max_idle_upstream`).
pub const DEFAULT_MAX_IDLE_UPSTREAM: usize = 64;
/// How long a client may take to send a request head when the listener is reachable from other
/// machines and `server.header_read_timeout` is not set.
pub const EXPOSED_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
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
    /// Most client connections open at once; past it new connections are accepted and closed.
    /// Read at start only.
    pub max_connections: usize,
    /// Most idle upstream connections kept per endpoint and serving worker.
    pub max_idle_upstream: usize,
    /// Deadline for reading a request head (also bounds an idle keep-alive connection). `None`:
    /// [`EXPOSED_HEADER_READ_TIMEOUT`] on a listener reachable from other machines, none on
    /// loopback. Read at start only.
    pub header_read_timeout: Option<Duration>,
    /// Whether `listen` was set by the command line (`serve --listen`, a session gateway's free
    /// port) rather than the file: the file's `listen` then never applies, and a reload does not
    /// report it as waiting for a restart.
    pub listen_overridden: bool,
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

/// `[relay]`: how much of an upstream answer ccgate holds to judge it before committing to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// A non-streaming answer up to this size is read whole (and judged) before its status line
    /// goes to the client, so a cut body can still fail over; a larger one is relayed as it comes.
    pub max_json_bytes: usize,
    /// The most bytes of a stream's preamble (everything before its first content) held back;
    /// past it the attempt fails over.
    pub max_preamble_bytes: usize,
    /// The most events of a stream's preamble held back; past it the attempt fails over.
    pub max_preamble_events: u64,
    /// The largest response header block (names and values) accepted from an upstream; a larger
    /// one fails over, as no client would parse it.
    pub max_response_header_bytes: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_json_bytes: 4 * 1024 * 1024,
            max_preamble_bytes: 256 * 1024,
            max_preamble_events: 1000,
            max_response_header_bytes: 64 * 1024,
        }
    }
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
    /// Fraction of a rate-limit window used from which an endpoint is ranked last until the
    /// window resets (`anthropic-ratelimit-*` answer headers).
    pub quota_threshold: f64,
}

/// The credential an endpoint sends upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Sent as `x-api-key`.
    ApiKey(Secret),
    /// Sent as `Authorization: Bearer`.
    AuthToken(Secret),
    /// `credential = "client"`: the client's own `authorization` / `x-api-key` is forwarded
    /// unchanged (a Claude Pro/Max OAuth login, say); ccgate holds no secret for it.
    Client,
}

impl Credential {
    /// The secret, for redaction checks (`None` for the client's own).
    pub fn secret(&self) -> Option<&Secret> {
        match self {
            Self::ApiKey(s) | Self::AuthToken(s) => Some(s),
            Self::Client => None,
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
        // A port the URL names must be one a connection can use: `http::Uri` reads `:99999` as
        // no port at all, which would send the traffic to the scheme's default port.
        if let Some(port) = authority
            .as_str()
            .rsplit_once(':')
            .and_then(|(host, port)| (!host.ends_with('[') && !port.contains(']')).then_some(port))
            && !port.is_empty()
            && authority.port_u16().is_none_or(|p| p == 0)
        {
            return Err(format!("`{s}` names port {port}; a port is 1 to 65535"));
        }
        if s.contains('#') {
            return Err(format!("`{s}` must not carry a fragment (`#…`)"));
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
    /// The models this endpoint serves, as the client names them (before `model_map`);
    /// `None` serves every model.
    pub models: Option<ModelPatterns>,
    /// Extra PEM CA certificate(s) to trust for this endpoint (self-hosted relays).
    pub ca_file: Option<PathBuf>,
    /// Speak HTTP/2 to this endpoint: offered by ALPN over `https` (HTTP/1.1 when the server
    /// declines), with prior knowledge over plain `http` (h2c). Streams share connections.
    pub http2: bool,
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
}

/// `[requests]`: how many recent requests are kept in memory and, with storage on, in the
/// database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestsConfig {
    /// Requests the in-memory ring keeps (`/_ccgate/requests`, the dashboard).
    pub ring_size: usize,
    /// Rows the `requests` table keeps at most (0: no table rows written).
    pub max_rows: u64,
    /// How long a stored row is kept.
    pub retention: Duration,
}

impl Default for RequestsConfig {
    fn default() -> Self {
        Self {
            ring_size: 1000,
            max_rows: 100_000,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[timeouts]`.
    pub timeouts: Timeouts,
    /// `[relay]`.
    pub relay: RelayLimits,
    /// `[health]`.
    pub health: HealthConfig,
    /// `[affinity]`.
    pub affinity: AffinityConfig,
    /// `[retry_budget]`.
    pub retry_budget: RetryBudgetConfig,
    /// `[storage]`.
    pub storage: StorageConfig,
    /// `[requests]`: the recent-requests ring and table.
    pub requests: RequestsConfig,
    /// `[prices]`.
    pub prices: Prices,
    /// `[[endpoints]]`, in file order.
    pub endpoints: Vec<EndpointConfig>,
    /// `[cluster]`, when instances share health through Redis.
    pub cluster: Option<ClusterSettings>,
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

/// Whether `url` points at a gateway listening on `listen`: the same port on `localhost`, the
/// listen address itself, or any address of this host when the gateway listens on all of them.
pub fn is_self(url: &BaseUrl, listen: SocketAddr) -> bool {
    let port = url
        .authority
        .port_u16()
        .unwrap_or(if url.scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        });
    // Host names are case-insensitive, and a trailing dot names the same host.
    let host = url
        .authority
        .host()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let reaches_listener = if host == "localhost" {
        listen.ip().is_loopback() || listen.ip().is_unspecified()
    } else {
        host.trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| {
                // The unspecified address, as a destination, is this host; a listener on it takes
                // every local address.
                ip.is_unspecified()
                    || ip == listen.ip()
                    || (listen.ip().is_unspecified() && ip.is_loopback())
            })
    };
    reaches_listener && port == listen.port() && listen.port() != 0
}

mod cluster;
mod endpoint;
mod env;
mod lenient;
mod load;
mod prices;
mod problems;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use crate::config::cluster::ClusterSettings;
pub use crate::config::env::{
    Env, ProcessEnv, default_config_path, default_listen, resolve_config_path,
};
pub use crate::config::load::{read_capped, toml_string};
pub use crate::config::prices::{DEFAULT_PRICES, Price, Prices};

/// The models an endpoint serves: glob patterns (`*` any run of characters, `?` one character),
/// matched against the request's `model` exactly as the client sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPatterns(Vec<String>);

impl ModelPatterns {
    /// Patterns as written; validation has checked each is non-empty.
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    /// The patterns, as written.
    pub fn patterns(&self) -> &[String] {
        &self.0
    }

    /// Whether `model` matches one of the patterns.
    pub fn serves(&self, model: &str) -> bool {
        self.0
            .iter()
            .any(|p| glob_match(p.as_bytes(), model.as_bytes()))
    }
}

/// Glob matching with `*` and `?`, linear in practice: on a mismatch it backtracks only to the
/// last `*`.
pub(crate) fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}
