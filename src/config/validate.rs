//! Stage two: the raw mirror turned into a validated [`Config`], collecting every problem with its
//! line and key instead of stopping at the first.

use std::collections::BTreeMap;

use crate::config::endpoint::validate_endpoint;
use crate::config::env::Env;
use crate::config::prices::RawPrice;
use crate::config::problems::Problems;
use crate::config::raw::*;
use crate::config::*;

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
        window: {
            let window = p.duration(&b.window, "retry_budget.window", Duration::from_secs(10));
            // The budget keeps one slot per second of its window.
            if window > Duration::from_secs(3600) {
                if let Some(v) = &b.window {
                    p.at(v, "retry_budget.window", "must be at most 1h");
                }
                Duration::from_secs(10)
            } else {
                window
            }
        },
    };
    let storage = validate_storage(&raw.storage, p);
    let requests = validate_requests(&raw.requests, p);
    let prices = validate_prices(&raw.prices, p);

    // Duplicate names are checked on the names as written, whatever else is wrong with either
    // endpoint.
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, ep) in raw.endpoints.iter().enumerate() {
        if let Some(name) = &ep.get_ref().name
            && let Some(first) = names.insert(name.get_ref(), i)
        {
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
                    format!(
                        "{n} must be a price of zero or more ({})",
                        if name == "web_search" {
                            "USD per 1,000 searches"
                        } else {
                            "USD per million tokens"
                        }
                    ),
                );
                return None;
            }
            Some(n)
        };
        let input = field(&e.input, "input");
        let output = field(&e.output, "output");
        let cache_write = field(&e.cache_write, "cache_write");
        let cache_read = field(&e.cache_read, "cache_read");
        let cache_write_1h = field(&e.cache_write_1h, "cache_write_1h");
        let web_search = field(&e.web_search, "web_search");
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
                cache_write_1h: cache_write_1h.unwrap_or(input * 2.0),
                cache_read: cache_read.unwrap_or(input * 0.1),
                // Written per 1,000 searches, as Anthropic's price list says it.
                web_search: web_search
                    .map_or(crate::config::prices::WEB_SEARCH_USD, |n| n / 1000.0),
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
    if let Some(v) = &s.flush_interval
        && (flush_interval < Duration::from_millis(10)
            || flush_interval > Duration::from_secs(3600))
    {
        p.at(
            v,
            "storage.flush_interval",
            format!("`{}` is out of range (10ms..=1h)", v.get_ref()),
        );
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
        (Some(a), None)
            if a.get_ref()
                .bytes()
                .any(|b| b.is_ascii_control() || b == b' ') =>
        {
            // No client could send it: a header value holds no control character, and a Bearer
            // token no space.
            p.at(
                a,
                "server.access_token",
                "the token contains spaces or control characters",
            );
            None
        }
        (Some(a), None) => Some(Secret::new(a.get_ref().clone())),
        (None, Some(var)) => p
            .env_var(var, "server.access_token_env", env)
            .map(Secret::new),
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
        listen_overridden: false,
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
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
    if probe_max_interval < probe_interval
        && let Some(v) = &h.probe_max_interval
    {
        p.at(
            v,
            "health.probe_max_interval",
            "must not be shorter than health.probe_interval",
        );
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
