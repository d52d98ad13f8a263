//! Stage two: the raw mirror turned into a validated [`Config`], collecting every problem with its
//! line and key instead of stopping at the first.

use std::collections::BTreeMap;

use crate::config::env::Env;
use crate::config::prices::RawPrice;
use crate::config::raw::*;
use crate::config::*;

/// Collects problems with line numbers resolved against the source text.
pub(super) struct Problems<'a> {
    pub(super) text: &'a str,
    pub(super) list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self {
            text,
            list: Vec::new(),
        }
    }

    /// `value` when nothing was wrong, else every problem found, reported against `source_name`
    /// in the order they were found.
    pub(super) fn finish<T>(self, source_name: &str, value: T) -> Result<T, ConfigError> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(self.into_error(source_name))
        }
    }

    /// The problems found, reported against `source_name`.
    pub(super) fn into_error(self, source_name: &str) -> ConfigError {
        ConfigError {
            source_name: source_name.into(),
            problems: self.list,
        }
    }

    /// Whether a problem was already reported under `key` (a value of the wrong type is read as
    /// absent: it must not be reported again as missing).
    pub(super) fn has(&self, key: &str) -> bool {
        self.list.iter().any(|p| p.key == key)
    }

    pub(super) fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(super) fn at<T>(
        &mut self,
        spanned: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = Some(self.line_of(spanned.span().start));
        self.list.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn at_line(
        &mut self,
        line: Option<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.list.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
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

    pub(super) fn int_in(
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

pub(super) fn validate(raw: RawConfig, p: &mut Problems<'_>, env: &dyn Env) -> Config {
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
    let relay = validate_relay(&raw.relay, p);
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
    let requests = validate_requests(&raw.requests, p);
    let prices = validate_prices(&raw.prices, p);

    // Duplicate names are checked on the names as written, whatever else is wrong with either
    // endpoint.
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, ep) in raw.endpoints.iter().enumerate() {
        if let Some(name) = &ep.get_ref().name {
            if let Some(first) = names.insert(name.get_ref(), i) {
                p.at(
                    name,
                    format!("endpoints[{i}].name"),
                    format!(
                        "`{}` is already the name of endpoints[{first}]",
                        name.get_ref()
                    ),
                );
                names.insert(name.get_ref(), first);
            }
        }
    }
    let mut endpoints = Vec::with_capacity(raw.endpoints.len());
    for (i, ep) in raw.endpoints.iter().enumerate() {
        if let Some(e) = validate_endpoint(i, ep, p, env, health.probe_mode) {
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
        relay,
        health,
        affinity,
        retry_budget,
        storage,
        requests,
        prices,
        endpoints,
        // Validated by `load` (`config::cluster`), which uses this module's `Problems`.
        cluster: None,
    }
}

fn validate_requests(r: &RawRequests, p: &mut Problems<'_>) -> RequestsConfig {
    let default = RequestsConfig::default();
    let retention = p.duration(&r.retention, "requests.retention", default.retention);
    RequestsConfig {
        ring_size: p.int_in(&r.ring_size, "requests.ring_size", 0, 1_000_000, 1000) as usize,
        max_rows: p.int_in(&r.max_rows, "requests.max_rows", 0, 100_000_000, 100_000) as u64,
        retention,
    }
}

pub(super) fn validate_prices(
    raw: &BTreeMap<String, Spanned<RawPrice>>,
    p: &mut Problems<'_>,
) -> Prices {
    let mut configured = Vec::new();
    for (model, entry) in raw {
        let key = |field: &str| format!("prices.\"{model}\".{field}");
        if model.is_empty() {
            p.at(entry, "prices", "a model name must not be empty");
            continue;
        }
        let e = entry.get_ref();
        let mut field = |v: &Option<Spanned<f64>>, name: &str| -> Option<f64> {
            let v = v.as_ref()?;
            let n = *v.get_ref();
            if !n.is_finite() || n < 0.0 {
                p.at(
                    v,
                    key(name),
                    format!("{n} must be a price of zero or more (USD per million tokens)"),
                );
                return None;
            }
            Some(n)
        };
        let input = field(&e.input, "input");
        let output = field(&e.output, "output");
        let cache_write = field(&e.cache_write, "cache_write");
        let cache_read = field(&e.cache_read, "cache_read");
        let (Some(input), Some(output)) = (input, output) else {
            if e.input.is_none() || e.output.is_none() {
                p.at(
                    entry,
                    format!("prices.\"{model}\""),
                    "needs `input` and `output` (USD per million tokens)",
                );
            }
            continue;
        };
        configured.push((
            model.clone(),
            Price {
                input,
                output,
                cache_write: cache_write.unwrap_or(input * 1.25),
                cache_read: cache_read.unwrap_or(input * 0.1),
            },
        ));
    }
    Prices::new(configured)
}

pub(super) fn validate_storage(s: &RawStorage, p: &mut Problems<'_>) -> StorageConfig {
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
        max_connections: p.int_in(
            &s.max_connections,
            "server.max_connections",
            1,
            1 << 20,
            DEFAULT_MAX_CONNECTIONS as i64,
        ) as usize,
        max_idle_upstream: p.int_in(
            &s.max_idle_upstream,
            "server.max_idle_upstream",
            0,
            1 << 16,
            DEFAULT_MAX_IDLE_UPSTREAM as i64,
        ) as usize,
        header_read_timeout: s.header_read_timeout.as_ref().map(|_| {
            p.duration(
                &s.header_read_timeout,
                "server.header_read_timeout",
                EXPOSED_HEADER_READ_TIMEOUT,
            )
        }),
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

fn validate_relay(r: &RawRelay, p: &mut Problems<'_>) -> RelayLimits {
    let d = RelayLimits::default();
    RelayLimits {
        max_json_bytes: p.int_in(
            &r.max_json_bytes,
            "relay.max_json_bytes",
            1024,
            1 << 30,
            d.max_json_bytes as i64,
        ) as usize,
        max_preamble_bytes: p.int_in(
            &r.max_preamble_bytes,
            "relay.max_preamble_bytes",
            1024,
            1 << 30,
            d.max_preamble_bytes as i64,
        ) as usize,
        max_preamble_events: p.int_in(
            &r.max_preamble_events,
            "relay.max_preamble_events",
            3,
            1_000_000,
            d.max_preamble_events as i64,
        ) as u64,
        max_response_header_bytes: p.int_in(
            &r.max_response_header_bytes,
            "relay.max_response_header_bytes",
            1024,
            256 * 1024,
            d.max_response_header_bytes as i64,
        ) as usize,
    }
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
    let quota_threshold = match &h.quota_threshold {
        None => 0.95,
        Some(v) if *v.get_ref() > 0.0 && *v.get_ref() <= 1.0 => *v.get_ref(),
        Some(v) => {
            p.at(
                v,
                "health.quota_threshold",
                format!("{} is out of range (0.0 exclusive ..= 1.0)", v.get_ref()),
            );
            0.95
        }
    };
    HealthConfig {
        quota_threshold,
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
            if !p.has(&key("name")) {
                p.at(spanned, key("name"), "is required");
            }
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
            if !p.has(&key("base_url")) {
                p.at(spanned, key("base_url"), "is required");
            }
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
    let mistyped_credential = ["api_key", "auth_token", "api_key_env", "auth_token_env"]
        .iter()
        .any(|k| p.has(&key(k)));
    let client = match &ep.credential {
        None => false,
        Some(c) if c.get_ref() == "client" => {
            if let Some((k, _)) = given.first() {
                p.at(
                    c,
                    key("credential"),
                    format!(
                        "`credential = \"client\"` forwards the client's own credential: remove {k}"
                    ),
                );
            }
            true
        }
        Some(c) => {
            p.at(
                c,
                key("credential"),
                format!(
                    "`{}` is not a credential source; the only one is \"client\"",
                    c.get_ref()
                ),
            );
            false
        }
    };
    let credential = match given.as_slice() {
        _ if client => Some(Credential::Client),
        [] if mistyped_credential || p.has(&key("credential")) => None,
        [] => {
            p.at(
                spanned,
                key("api_key"),
                "no credential: set one of api_key, auth_token, api_key_env, auth_token_env or credential = \"client\"",
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
    let models = ep.models.as_ref().map(|m| {
        let list = m.get_ref();
        if list.is_empty() {
            p.at(
                m,
                key("models"),
                "lists no model: leave it out to serve every model",
            );
        }
        if list.iter().any(|s| s.trim().is_empty()) {
            p.at(m, key("models"), "model patterns must not be empty");
        }
        ModelPatterns::new(list.clone())
    });
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
        models,
        ca_file,
        probe,
    })
}
