//! The operator commands that talk to things: `ccgate endpoints ...` (edit the file, then tell the
//! running gateway), `ccgate status` (ask the running gateway) and `ccgate check` (probe every
//! endpoint from this process); [`find_target`] also tells `ccgate claude enable` (in
//! [`crate::claude`]) where the gateway is.
//!
//! The running gateway is reached over its own `/_ccgate/` HTTP surface, with the config's
//! `access_token` as `x-api-key` when one is set: the CLI never shares memory or files with it
//! beyond the config file itself.
//!
//! **Invariant:** nothing printed here carries a credential. Listings name a credential's kind,
//! views come from the gateway's JSON (which never holds secrets), probe details are scrubbed with
//! [`Endpoint::scrub`], and access tokens only ever go into a request header.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::config::{Config, ConfigError, Env, Secret, resolve_config_path};
use crate::edit::{self, EditError};
use crate::endpoint::Endpoint;

/// Stands in for an environment variable that is not set in the CLI's own environment: the
/// gateway may well have it, so an edit is not refused for it.
const UNSET_PLACEHOLDER: &str = "ccgate-unset-variable";

/// A config loaded for the CLI's own purposes (where the gateway listens, its token): a `*_env`
/// credential whose variable is not set here does not fail it.
pub struct Lenient {
    /// The configuration (credentials from unset variables hold a placeholder).
    pub config: Config,
    /// Variables the file names that are not set in this environment.
    pub unset: Vec<String>,
}

impl Lenient {
    /// Validates `text`, treating unset variables as set.
    pub fn from_toml(text: &str, source_name: &str, env: &dyn Env) -> Result<Self, ConfigError> {
        let unset = RefCell::new(Vec::new());
        let lenient = |name: &str| {
            env.var(name).or_else(|| {
                unset.borrow_mut().push(name.to_string());
                Some(UNSET_PLACEHOLDER.to_string())
            })
        };
        let config = Config::from_toml(text, source_name, &lenient)?;
        Ok(Self {
            config,
            unset: unset.into_inner(),
        })
    }

    /// The access token, unless it comes from a variable that is not set here.
    pub fn access_token(&self) -> Option<Secret> {
        self.config
            .server
            .access_token
            .clone()
            .filter(|t| t.expose() != UNSET_PLACEHOLDER)
    }
}

/// Where the running gateway is and how to authenticate to it.
#[derive(Clone)]
pub struct Target {
    /// `http://host:port` (no trailing slash).
    pub url: String,
    /// The access token, sent as `x-api-key`.
    pub token: Option<Secret>,
}

impl Target {
    /// The gateway a loaded config describes: at `url` (a `--url`, normalised) when given, else at
    /// `http://<server.listen>` (loopback for a wildcard address), with the config's access token.
    /// `None` when there is no `url` and `server.listen` uses port 0, so the address is not known.
    /// When there is a gateway to call but the access token comes from a variable that is not set
    /// here, says so on stderr: the gateway is then called without a token.
    pub fn from_lenient(loaded: &Lenient, url: Option<&str>) -> anyhow::Result<Option<Self>> {
        let url = url.map(normalize_url).transpose()?;
        let Some(url) = url.or_else(|| url_of_listen(loaded.config.server.listen)) else {
            return Ok(None);
        };
        let token = loaded.access_token();
        if token.is_none() && loaded.config.server.access_token.is_some() {
            eprintln!(
                "warning: server.access_token_env names a variable that is not set here; no access token is sent"
            );
        }
        Ok(Some(Self { url, token }))
    }
}

/// Normalises a `--url`: `http://` is assumed when no scheme is given; the trailing slash goes.
pub fn normalize_url(url: &str) -> anyhow::Result<String> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e| anyhow!("--url {url}: not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => bail!("--url {url}: must start with http:// or https://"),
    }
    if uri.authority().is_none() {
        bail!("--url {url}: has no host");
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

/// The URL a client on this machine uses for a listen address; `None` for port 0.
pub fn url_of_listen(addr: SocketAddr) -> Option<String> {
    if addr.port() == 0 {
        return None;
    }
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(format!("http://{}", SocketAddr::new(ip, addr.port())))
}

/// The config file named by `--config`, `$CCGATE_CONFIG` or the platform default.
pub fn config_path(explicit: Option<&Path>, env: &dyn Env) -> anyhow::Result<PathBuf> {
    resolve_config_path(explicit, env)
        .map(|(path, _)| path)
        .context("no config directory on this platform; pass --config")
}

/// Finds the running gateway: `--url`, else `server.listen` of the config (loopback for a
/// wildcard address), with the config's access token. Without a config file, the default address;
/// a file named by `--config` or `$CCGATE_CONFIG` must exist.
pub fn find_target(
    explicit_config: Option<&Path>,
    url: Option<&str>,
    env: &dyn Env,
) -> anyhow::Result<Target> {
    // A bad --url is reported before anything is read.
    let url = url.map(normalize_url).transpose()?;
    let (path, chosen) = resolve_config_path(explicit_config, env)
        .context("no config directory on this platform; pass --config")?;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !chosen => None,
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
    };
    let Some(text) = text else {
        let default = url_of_listen(crate::config::default_listen()).unwrap_or_default();
        return Ok(Target {
            url: url.unwrap_or(default),
            token: None,
        });
    };
    let loaded = match Lenient::from_toml(&text, &path.display().to_string(), env) {
        Ok(l) => l,
        // With --url, a broken config only costs us the token.
        Err(e) if url.is_some() => {
            eprintln!(
                "warning: {} does not load, so no access token is sent:\n{e}",
                path.display()
            );
            return Ok(Target {
                url: url.unwrap_or_default(),
                token: None,
            });
        }
        Err(e) => return Err(e.into()),
    };
    Target::from_lenient(&loaded, url.as_deref())?.ok_or_else(|| {
        anyhow!(
            "server.listen in {} uses port 0, so the gateway's address is not known: pass --url http://ADDR (the address `ccgate serve` printed)",
            path.display()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Talking to the running gateway.

/// Why a call to the gateway got no answer: nothing answered (connection refused, timeout, no
/// such host); the message says which.
#[derive(Debug)]
pub struct CallError(pub String);

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A small client for the gateway's `/_ccgate/` surface.
pub struct AdminClient {
    target: Target,
    client: crate::upstream::UpstreamClient,
}

/// An answer from the gateway.
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The message of an Anthropic-shaped error body, or the status.
    pub fn error_message(&self) -> String {
        crate::forward::error_message(&self.body).unwrap_or_else(|| format!("HTTP {}", self.status))
    }
}

impl AdminClient {
    /// A client for `target`.
    pub fn new(target: Target) -> anyhow::Result<Self> {
        let timeouts = crate::config::Timeouts {
            connect: Duration::from_secs(3),
            first_byte: Duration::from_secs(30),
            idle: Duration::from_secs(30),
        };
        let client = crate::upstream::build_client(None, &timeouts)?;
        Ok(Self { target, client })
    }

    /// The gateway's URL.
    pub fn url(&self) -> &str {
        &self.target.url
    }

    /// `METHOD /_ccgate/{path}`, whole answer.
    pub async fn call(&self, method: Method, path: &str) -> Result<Answer, CallError> {
        let uri = format!("{}/_ccgate/{path}", self.target.url);
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header(
                http::header::USER_AGENT,
                concat!("ccgate-cli/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| CallError(format!("{uri}: {e}")))?;
        if let Some(t) = &self.target.token {
            if let Ok(mut v) = http::HeaderValue::from_str(t.expose()) {
                v.set_sensitive(true);
                req.headers_mut().insert("x-api-key", v);
            }
        }
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let detail = crate::forward::error_chain(&e);
                let detail = match &self.target.token {
                    Some(t) => detail.replace(t.expose(), "***"),
                    None => detail,
                };
                CallError(format!("nothing answered at {}: {detail}", self.target.url))
            })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError(format!("{uri}: {e}")))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .unwrap_or_else(|_| {
                Err(CallError(format!(
                    "{} did not answer within 60s",
                    self.target.url
                )))
            })
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

// ---------------------------------------------------------------------------------------------
// Tables.

/// Renders rows under a header as aligned columns (two spaces apart; the last column unpadded).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let width = widths.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(cell.chars().count());
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `12 ms`, `1.4 ms`, `2.3 s`.
fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn fmt_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// An RFC 3339 time relative to now: `2m 3s ago`, `in 8s`, `now`.
fn relative(rfc3339: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(rfc3339) else {
        return rfc3339.to_string();
    };
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(ahead) if ahead.as_secs() > 0 => format!("in {}", fmt_secs(ahead.as_secs())),
        Ok(_) => "now".into(),
        Err(e) if e.duration().as_secs() == 0 => "now".into(),
        Err(e) => format!("{} ago", fmt_secs(e.duration().as_secs())),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// `ccgate status`.

/// Asks the running gateway for its endpoints, failure queue and totals and renders them.
pub fn status(target: Target) -> anyhow::Result<String> {
    let rt = runtime()?;
    rt.block_on(async move {
        let client = AdminClient::new(target)?;
        let (endpoints, queue, stats) = tokio::join!(
            client.call(Method::GET, "endpoints"),
            client.call(Method::GET, "failure-queue"),
            client.call(Method::GET, "stats"),
        );
        let mut answers = Vec::new();
        for a in [endpoints, queue, stats] {
            let a = a.map_err(|e| {
                anyhow!("cannot reach the gateway: {e}\nIs `ccgate serve` running? (pass --url if it listens elsewhere)")
            })?;
            match a.status {
                StatusCode::OK => answers.push(a.json()),
                StatusCode::UNAUTHORIZED => bail!(
                    "the gateway at {} wants its access token: set server.access_token (or access_token_env) in the config this command reads",
                    client.url()
                ),
                _ => bail!(
                    "the gateway at {} answered {}: {}; is it a ccgate?",
                    client.url(),
                    a.status,
                    a.error_message()
                ),
            }
        }
        Ok(render_status(client.url(), &answers[0], &answers[1], &answers[2]))
    })
}

/// Renders the three views as the `status` report.
pub fn render_status(url: &str, endpoints: &Value, queue: &Value, stats: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ccgate at {url}, up {}\n",
        fmt_secs(u(&stats["uptime_seconds"]))
    );
    let rows: Vec<Vec<String>> = endpoints["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            vec![
                s(&e["name"]),
                s(&e["state"]),
                e["success_rate"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
                e["latency_first_byte"]["p50_ms"]
                    .as_f64()
                    .map_or("-".into(), fmt_ms),
                u(&e["in_flight"]).to_string(),
                u(&e["total_requests"]).to_string(),
                u(&e["failed_requests"]).to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ENDPOINT",
            "STATE",
            "SUCCESS",
            "P50 FIRST BYTE",
            "IN FLIGHT",
            "REQUESTS",
            "FAILURES",
        ],
        &rows,
    ));
    let entries = queue["entries"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if entries.is_empty() {
        out.push_str("\nfailure queue: empty\n");
    } else {
        let _ = writeln!(out, "\nfailure queue: {}", entries.len());
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|q| {
                vec![
                    s(&q["name"]),
                    s(&q["reason"]),
                    q["since"].as_str().map_or("-".into(), relative),
                    u(&q["probe_attempts"]).to_string(),
                    if q["probation"].as_bool() == Some(true) {
                        "on probation".into()
                    } else {
                        q["next_probe_at"].as_str().map_or("-".into(), relative)
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &["ENDPOINT", "REASON", "SINCE", "PROBES", "NEXT PROBE"],
            &rows,
        ));
    }
    let _ = writeln!(
        out,
        "\ntotals: {} requests: {} successful, {} failed, {} in flight; {} retries, {} fallbacks, {} budget refusals",
        u(&stats["total_requests"]),
        u(&stats["successful_requests"]),
        u(&stats["failed_requests"]),
        u(&stats["in_flight"]),
        u(&stats["retries"]),
        u(&stats["fallbacks"]),
        u(&stats["budget_refusals"]),
    );
    out
}

// ---------------------------------------------------------------------------------------------
// `ccgate check`.

/// Probes every configured endpoint now, in parallel, from this process. Returns the report and
/// whether at least one enabled endpoint works.
pub fn check(config: Config) -> anyhow::Result<(String, bool)> {
    let rt = runtime()?;
    rt.block_on(async move {
        let gw = crate::proxy::Gateway::new(config)?;
        let endpoints: Vec<std::sync::Arc<Endpoint>> = gw.registry.endpoints.to_vec();
        let results =
            futures_util::future::join_all(endpoints.iter().map(|ep| crate::probe::probe(&gw, ep)))
                .await;
        let mut rows = Vec::new();
        let mut working = 0;
        let mut total = 0;
        for (ep, r) in endpoints.iter().zip(&results) {
            let enabled = ep.config.enabled;
            let result = match (r.passed, enabled) {
                (true, true) => "ok",
                (true, false) => "ok (disabled)",
                (false, true) => "FAILED",
                (false, false) => "FAILED (disabled)",
            };
            total += usize::from(enabled);
            working += usize::from(r.passed && enabled);
            rows.push(vec![
                ep.name.clone(),
                ep.probe.as_str().to_string(),
                result.to_string(),
                fmt_ms(r.latency.as_secs_f64() * 1000.0),
                // `probe` has scrubbed it already.
                r.detail.clone(),
            ]);
        }
        let mut out = table(&["ENDPOINT", "MODE", "RESULT", "LATENCY", "DETAIL"], &rows);
        let _ = writeln!(
            out,
            "\n{working} of {total} enabled endpoint{} work{}",
            if total == 1 { "" } else { "s" },
            if working == 1 && total != 1 { "s" } else { "" },
        );
        Ok((out, working > 0))
    })
}

// ---------------------------------------------------------------------------------------------
// `ccgate endpoints ...`.

/// One edit of the config file.
pub enum Edit {
    /// `add`.
    Add(edit::NewEndpoint),
    /// `remove NAME`.
    Remove(String),
    /// `enable NAME` / `disable NAME`.
    SetEnabled(String, bool),
}

impl Edit {
    fn apply(&self, text: &str) -> Result<String, EditError> {
        match self {
            Self::Add(ep) => edit::add(text, ep),
            Self::Remove(name) => edit::remove(text, name),
            Self::SetEnabled(name, on) => edit::set_enabled(text, name, *on),
        }
    }

    fn done(&self) -> String {
        match self {
            Self::Add(ep) => format!("added endpoint `{}`", ep.name),
            Self::Remove(name) => format!("removed endpoint `{name}`"),
            Self::SetEnabled(name, true) => format!("enabled endpoint `{name}`"),
            Self::SetEnabled(name, false) => format!("disabled endpoint `{name}`"),
        }
    }
}

/// What the running gateway made of an edit.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// `POST /_ccgate/reload` answered 200; a summary of what changed.
    Reloaded(String),
    /// The gateway has no reload, but its enable/disable switch took the change.
    Switched,
    /// The gateway refused the new config (its message).
    Refused(String),
    /// No gateway was reached (why).
    NotReached(String),
}

fn names_of(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Tells the gateway at `target` to reload its config; for `enable`/`disable`, also flips its
/// switch, so the change takes effect on a gateway without reload too.
pub async fn apply_to_running(target: Target, switch: Option<(&str, bool)>) -> Applied {
    let client = match AdminClient::new(target) {
        Ok(c) => c,
        Err(e) => return Applied::NotReached(format!("{e:#}")),
    };
    let reload = match client.call(Method::POST, "reload").await {
        Ok(a) => a,
        Err(e) => return Applied::NotReached(e.to_string()),
    };
    let flip = || async {
        let (name, on) = switch?;
        let action = if on { "enable" } else { "disable" };
        let a = client
            .call(Method::POST, &format!("endpoints/{name}/{action}"))
            .await
            .ok()?;
        (a.status == StatusCode::OK).then_some(())
    };
    match reload.status {
        StatusCode::OK => {
            // Idempotent, and makes sure the switch matches the file whatever reload did with
            // `enabled`.
            let _ = flip().await;
            let v = reload.json();
            let mut parts = Vec::new();
            for key in ["added", "removed", "changed"] {
                let names = names_of(&v[key]);
                if !names.is_empty() {
                    parts.push(format!("{key}: {}", names.join(", ")));
                }
            }
            if parts.is_empty() {
                parts.push("no endpoint changed".into());
            }
            Applied::Reloaded(parts.join("; "))
        }
        StatusCode::UNAUTHORIZED => {
            Applied::NotReached(format!("{} refused the access token", client.url()))
        }
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
            // The endpoint switch is runtime state, not config: still honour it.
            let _ = flip().await;
            Applied::Refused(reload.error_message())
        }
        status => match flip().await {
            Some(()) => Applied::Switched,
            None if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED => {
                Applied::NotReached(format!(
                    "the gateway at {} cannot reload its config (an older ccgate?)",
                    client.url()
                ))
            }
            None => Applied::NotReached(format!(
                "{} answered the reload with {}",
                client.url(),
                reload.error_message()
            )),
        },
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

/// `ccgate endpoints add|remove|enable|disable`: edits the file (refusing an edit whose result
/// would not load, leaving the file as it was), writes it atomically, and applies it to the
/// running gateway.
pub fn run_edit(
    explicit_config: Option<&Path>,
    url: Option<&str>,
    change: Edit,
    env: &dyn Env,
) -> anyhow::Result<()> {
    let path = config_path(explicit_config, env)?;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist; create it with `ccgate init` (or pass --config)",
            path.display()
        ),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let edited = change
        .apply(&text)
        .map_err(|e| anyhow!("{}: {e}; the file is unchanged", path.display()))?;
    let loaded = Lenient::from_toml(&edited, "the edited config", env).map_err(|e| {
        // Line numbers would point into text that was never written: name the keys only.
        let mut msg = String::from("refusing the change: the config would not load afterwards:\n");
        for p in &e.problems {
            let _ = writeln!(msg, "  {}: {}", p.key, p.message);
        }
        let _ = write!(msg, "{} is unchanged", path.display());
        anyhow!(msg)
    })?;
    let mut out = std::io::stdout();
    if edited == text {
        writeln!(out, "{}: no change needed", path.display())?;
    } else {
        edit::write_atomic(&path, edited.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(out, "{} in {}", change.done(), path.display())?;
    }
    for var in &loaded.unset {
        writeln!(
            out,
            "note: the environment variable {var} is not set here; the gateway needs it when it loads the file"
        )?;
    }
    let Some(target) = Target::from_lenient(&loaded, url)? else {
        writeln!(
            out,
            "saved; server.listen uses port 0, so the running gateway cannot be found: pass --url, restart it or send it SIGHUP"
        )?;
        return Ok(());
    };
    let url = target.url.clone();
    let switch = match &change {
        Edit::SetEnabled(name, on) => Some((name.as_str(), *on)),
        _ => None,
    };
    let applied = runtime()?.block_on(apply_to_running(target, switch));
    match applied {
        Applied::Reloaded(summary) if switch.is_none() => {
            writeln!(out, "applied to the running gateway at {url} ({summary})")?
        }
        Applied::Reloaded(_) | Applied::Switched => match switch {
            Some((name, on)) => writeln!(
                out,
                "applied to the running gateway at {url}: `{name}` is {} there",
                if on { "enabled" } else { "disabled" }
            )?,
            None => writeln!(out, "applied to the running gateway at {url}")?,
        },
        Applied::NotReached(why) => writeln!(
            out,
            "saved; the running gateway was not reached ({why}): restart it or send it SIGHUP"
        )?,
        Applied::Refused(why) => {
            writeln!(
                out,
                "saved, but the running gateway at {url} refused to reload it: {why}"
            )?;
            out.flush()?;
            return Err(Exit(1).into());
        }
    }
    Ok(())
}

/// `ccgate endpoints list`: the endpoints as the file declares them, secrets never shown.
pub fn list(explicit_config: Option<&Path>, env: &dyn Env) -> anyhow::Result<String> {
    let path = config_path(explicit_config, env)?;
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "{} does not exist; create it with `ccgate init` (or pass --config)",
                path.display()
            )
        } else {
            anyhow!("cannot read {}: {e}", path.display())
        }
    })?;
    let listed = edit::list(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let rows: Vec<Vec<String>> = listed
        .into_iter()
        .map(|l| {
            vec![
                l.name,
                l.base_url,
                l.priority.to_string(),
                l.weight.to_string(),
                if l.enabled { "yes" } else { "no" }.to_string(),
                l.credential,
            ]
        })
        .collect();
    let mut out = format!("{}\n\n", path.display());
    if rows.is_empty() {
        out.push_str("no endpoints; add one with `ccgate endpoints add`\n");
    } else {
        out.push_str(&table(
            &[
                "NAME",
                "BASE URL",
                "PRIORITY",
                "WEIGHT",
                "ENABLED",
                "CREDENTIAL",
            ],
            &rows,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let t = table(
            &["A", "BB", "C"],
            &[
                vec!["xxx".into(), "y".into(), "z".into()],
                vec!["1".into(), "".into(), "".into()],
            ],
        );
        assert_eq!(t, "A    BB  C\nxxx  y   z\n1\n");
    }

    #[test]
    fn urls() {
        assert_eq!(
            normalize_url("127.0.0.1:7860/").expect("ok"),
            "http://127.0.0.1:7860"
        );
        assert!(normalize_url("ftp://x").is_err());
        let any: SocketAddr = "0.0.0.0:7860".parse().expect("addr");
        assert_eq!(url_of_listen(any).as_deref(), Some("http://127.0.0.1:7860"));
        let v6: SocketAddr = "[::]:80".parse().expect("addr");
        assert_eq!(url_of_listen(v6).as_deref(), Some("http://[::1]:80"));
        let zero: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert_eq!(url_of_listen(zero), None);
    }

    #[test]
    fn lenient_loading_tolerates_unset_variables_only() {
        let env = |_: &str| None;
        let text = "[server]\naccess_token_env = \"TOK\"\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://h\"\napi_key_env = \"KEY\"\n";
        let l = Lenient::from_toml(text, "t", &env).expect("lenient");
        assert_eq!(l.unset, ["TOK", "KEY"]);
        assert!(l.access_token().is_none());
        let bad = text.replace("http://h", "ftp://h");
        assert!(Lenient::from_toml(&bad, "t", &env).is_err());
    }

    #[test]
    fn targets_come_from_the_url_or_the_listen_address() {
        let env = |_: &str| None;
        let ep = "[[endpoints]]\nname = \"a\"\nbase_url = \"http://a\"\napi_key = \"k\"\n";
        let text = "[server]\nlisten = \"0.0.0.0:7861\"\naccess_token = \"tok\"\n";
        let l = Lenient::from_toml(&format!("{text}{ep}"), "t", &env).expect("lenient");
        let t = Target::from_lenient(&l, None).expect("ok").expect("known");
        assert_eq!(t.url, "http://127.0.0.1:7861");
        assert_eq!(t.token.as_ref().map(Secret::expose), Some("tok"));
        let t = Target::from_lenient(&l, Some("h:1/"))
            .expect("ok")
            .expect("known");
        assert_eq!(t.url, "http://h:1");
        assert!(Target::from_lenient(&l, Some("ftp://h")).is_err());
        let zero = Lenient::from_toml(
            &format!("[server]\nlisten = \"127.0.0.1:0\"\n{ep}"),
            "t",
            &env,
        )
        .expect("lenient");
        assert!(Target::from_lenient(&zero, None).expect("ok").is_none());
        let unset = Lenient::from_toml(
            &format!("[server]\naccess_token_env = \"TOK\"\n{ep}"),
            "t",
            &env,
        )
        .expect("lenient");
        let t = Target::from_lenient(&unset, None)
            .expect("ok")
            .expect("known");
        assert_eq!(t.url, "http://127.0.0.1:7860");
        assert!(t.token.is_none());
    }

    #[test]
    fn a_config_named_by_the_variable_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir
            .path()
            .join("missing.toml")
            .to_string_lossy()
            .into_owned();
        let env = |name: &str| (name == "CCGATE_CONFIG").then(|| missing.clone());
        let err = find_target(None, None, &env).err().expect("refused");
        assert!(err.to_string().contains("missing.toml"), "{err}");
        assert!(find_target(Some(Path::new(&missing)), None, &|_: &str| None).is_err());
    }

    #[test]
    fn status_renders_every_section() {
        let endpoints = serde_json::json!({"endpoints": [
            {"name": "a", "state": "healthy", "success_rate": 1.0, "latency_first_byte": {"p50_ms": 2.0},
             "in_flight": 0, "total_requests": 3, "failed_requests": 0},
            {"name": "b", "state": "ejected", "success_rate": 0.25, "latency_first_byte": {"p50_ms": null},
             "in_flight": 1, "total_requests": 4, "failed_requests": 3},
        ]});
        let queue = serde_json::json!({"size": 1, "entries": [
            {"name": "b", "reason": "server_error", "since": "2000-01-01T00:00:00Z",
             "next_probe_at": "2000-01-01T00:00:10Z", "probe_attempts": 2, "probation": false}
        ]});
        let stats = serde_json::json!({"total_requests": 7, "successful_requests": 4, "failed_requests": 3,
            "in_flight": 1, "uptime_seconds": 62});
        let out = render_status("http://x", &endpoints, &queue, &stats);
        assert!(out.contains("ccgate at http://x, up 1m 2s"), "{out}");
        assert!(out.contains("a         healthy  100.0%   2.0 ms"), "{out}");
        assert!(out.contains("b         ejected  25.0%    -"), "{out}");
        assert!(out.contains("failure queue: 1"), "{out}");
        assert!(out.contains("server_error"), "{out}");
        assert!(
            out.contains("totals: 7 requests: 4 successful, 3 failed, 1 in flight"),
            "{out}"
        );
    }
}
