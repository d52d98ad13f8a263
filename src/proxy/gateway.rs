//! [`Gateway`]: everything a request needs, shared by all connections and rebuilt by reloads, and
//! the access-token check.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, header};

use crate::config::Config;
use crate::health::registry::Registry;
use crate::proxy::events::Events;
use crate::proxy::recent::Recent;
use crate::proxy::usage::LiveUsage;
use crate::proxy::usage::UsageTally;
use crate::select::affinity::Affinity;
use crate::select::budget::RetryBudget;
use crate::select::strategy::Selector;
use crate::transport::headers::remove_in_order;

/// The header ccgate's `GET /_ccgate/health` answer carries (its version): how the CLI tells the
/// gateway from another server on the same address.
pub const HEALTH_MARK: &str = "x-ccgate-version";

/// The reserved path prefix of ccgate's own views; never forwarded.
pub const ADMIN_PREFIX: &str = "/_ccgate";

/// Everything the request handler needs, shared by all connections.
pub struct Gateway {
    /// Endpoints and their state.
    pub registry: Arc<Registry>,
    /// Candidate ranking.
    pub selector: Selector,
    /// Session → endpoint bindings (`None` when affinity is off).
    pub affinity: Option<Arc<Affinity>>,
    /// Limits attempts after the first.
    pub budget: Arc<RetryBudget>,
    /// Recent failovers, for the dashboard.
    pub events: Arc<Events>,
    /// The streams being relayed, ended with an `error` event when the shutdown's deadline
    /// comes (shared by every gateway of one server).
    pub streams: Arc<crate::proxy::relay::StreamStop>,
    /// The configuration the gateway runs with.
    pub config: Config,
    /// The usage tally successful answers add to, when storage is on (the store's writer drains
    /// it; carried over by reloads).
    pub usage: Option<Arc<UsageTally>>,
    /// Token usage since start per endpoint and model (the live prompt-cache figures; carried
    /// over by reloads).
    pub live_usage: Arc<LiveUsage>,
    /// The last client requests (carried over by reloads).
    pub recent: Arc<Recent>,
}

impl Gateway {
    /// Builds the gateway state from a validated config.
    pub fn new(config: Config) -> Result<Self, crate::transport::upstream::ClientError> {
        let registry = Arc::new(Registry::new(&config)?);
        let clock = registry.clock;
        let recent = Arc::new(Recent::new(config.requests.ring_size));
        Ok(Self {
            registry,
            selector: Selector::new(config.server.strategy),
            affinity: config
                .affinity
                .enabled
                .then(|| Arc::new(Affinity::new(&config.affinity, clock))),
            budget: Arc::new(RetryBudget::new(&config.retry_budget, clock)),
            events: Arc::default(),
            streams: Arc::default(),
            config,
            usage: None,
            live_usage: Arc::default(),
            recent,
        })
    }

    /// The gateway for a reloaded config, continuing this one (see [`Registry::reloaded`]).
    /// Session bindings carry over while every kept endpoint keeps its position; the retry
    /// budget and the recent failovers carry over; the listen address cannot change without a
    /// restart and stays as it is.
    pub fn reloaded(
        &self,
        mut config: Config,
    ) -> Result<
        (Self, crate::health::registry::ReloadReport),
        crate::transport::upstream::ClientError,
    > {
        // What is read at start stays as it was (the listener, the database opened at start,
        // the serving threads and the connection cap, the ring, cluster mode), and is named.
        let restart_needed = keep_start_settings(&self.config, &mut config);
        // New connections are made with the new settings: kept endpoints get new pools.
        let pools_kept = config.timeouts.connect == self.config.timeouts.connect
            && config.server.max_idle_upstream == self.config.server.max_idle_upstream;
        let (registry, mut report) = Registry::reloaded(&config, &self.registry, pools_kept)?;
        report.restart_needed = restart_needed;
        let clock = registry.clock;
        // A changed endpoint (its weight, say) keeps its name and place: the sessions bound to
        // it stay, and so do all the others, in the same map.
        let positions_kept = report.removed.is_empty()
            && registry.endpoints.iter().all(|e| {
                self.registry
                    .by_name(&e.name)
                    .is_none_or(|o| o.idx == e.idx)
            });
        let affinity = match (&self.affinity, config.affinity.enabled) {
            (Some(a), true) if positions_kept && config.affinity == self.config.affinity => {
                Some(Arc::clone(a))
            }
            // Endpoints renumbered (one removed or inserted), or the map resized: the sessions
            // go on with their endpoints, found by name.
            (Some(a), true) => Some(Arc::new(a.carried(&config.affinity, |old| {
                let name = &self.registry.endpoints.get(old)?.name;
                registry.by_name(name).map(|e| e.idx)
            }))),
            (None, true) => Some(Arc::new(Affinity::new(&config.affinity, clock))),
            (_, false) => None,
        };
        let budget = if config.retry_budget == self.config.retry_budget {
            Arc::clone(&self.budget)
        } else {
            Arc::new(RetryBudget::new(&config.retry_budget, clock))
        };
        let gateway = Self {
            registry: Arc::new(registry),
            selector: Selector::new(config.server.strategy),
            affinity,
            budget,
            events: Arc::clone(&self.events),
            streams: Arc::clone(&self.streams),
            config,
            usage: self.usage.clone(),
            live_usage: Arc::clone(&self.live_usage),
            // The ring's size is read at start; changing it needs a restart.
            recent: Arc::clone(&self.recent),
        };
        Ok((gateway, report))
    }

    /// Whether the request carries the access token (always true when none is configured).
    /// `x-ccgate-token` is looked at too: it leaves `authorization` and `x-api-key` to the
    /// client's own credential (for endpoints with `credential = "client"`).
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.config.server.access_token else {
            return true;
        };
        // Either header may carry it: Claude Code sends its own key as `x-api-key` next to
        // `ANTHROPIC_AUTH_TOKEN` as a Bearer token when both are set.
        TOKEN_HEADERS
            .iter()
            .any(|name| carries(headers, name, token.expose().as_bytes()))
    }

    /// For a proxied request: whether it carries the access token (as [`Gateway::authorized`]),
    /// and every header that does is removed, in the same pass. The token is no credential for
    /// any upstream, in whichever and however many headers the client sent it; what is left of
    /// `authorization` / `x-api-key` is the client's own.
    pub(crate) fn take_token(&self, headers: &mut HeaderMap) -> bool {
        let Some(token) = &self.config.server.access_token else {
            if headers.contains_key(&CCGATE_TOKEN) {
                remove_in_order(headers, |n| *n == CCGATE_TOKEN);
            }
            return true;
        };
        let carrying = TOKEN_HEADERS.map(|name| carries(headers, name, token.expose().as_bytes()));
        remove_in_order(headers, |n| {
            *n == CCGATE_TOKEN
                || TOKEN_HEADERS
                    .iter()
                    .zip(carrying)
                    .any(|(t, c)| c && *t == n)
        });
        carrying.contains(&true)
    }
}

/// Whether a `name` line of `headers` carries `token`: as the whole value, or for
/// `authorization` as a Bearer token (the scheme is case-insensitive, RFC 9110 §11.1).
fn carries(headers: &HeaderMap, name: &HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|v| {
        let given = if name == header::AUTHORIZATION {
            let Some((scheme, rest)) = v.to_str().ok().and_then(|v| v.split_once(' ')) else {
                return false;
            };
            if !scheme.eq_ignore_ascii_case("bearer") {
                return false;
            }
            rest.trim_start_matches(' ').as_bytes()
        } else {
            v.as_bytes()
        };
        constant_time_eq(given, token)
    })
}

/// The header that carries the access token when `authorization` and `x-api-key` are the
/// client's own credential.
static CCGATE_TOKEN: HeaderName = HeaderName::from_static("x-ccgate-token");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The headers the access token may come in.
static TOKEN_HEADERS: [&HeaderName; 3] = [&CCGATE_TOKEN, &X_API_KEY, &header::AUTHORIZATION];

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Puts back in `new` what only a start applies, from the running `old`; returns the settings
/// `new` changed among them, each said with what stays in force.
fn keep_start_settings(old: &Config, new: &mut Config) -> Vec<String> {
    fn keep<T: PartialEq + Clone>(
        new: &mut T,
        running: &T,
        out: &mut Vec<String>,
        note: impl FnOnce() -> String,
    ) {
        if new != running {
            out.push(note());
            new.clone_from(running);
        }
    }
    let mut out = Vec::new();
    let (o, n) = (&old.server, &mut new.server);
    // A listen given on the command line never applies the file's: nothing to report.
    if o.listen_overridden {
        n.listen = o.listen;
    }
    let file_listen = n.listen;
    keep(&mut n.listen, &o.listen, &mut out, || {
        format!(
            "server.listen: still {} until restarted (the file says {file_listen})",
            o.listen
        )
    });
    n.listen_overridden = o.listen_overridden;
    keep(&mut n.workers, &o.workers, &mut out, || {
        format!("server.workers: still {} until restarted", o.workers)
    });
    keep(&mut n.max_connections, &o.max_connections, &mut out, || {
        format!(
            "server.max_connections: still {} until restarted",
            o.max_connections
        )
    });
    keep(
        &mut new.requests.ring_size,
        &old.requests.ring_size,
        &mut out,
        || {
            format!(
                "requests.ring_size: still {} until restarted",
                old.requests.ring_size
            )
        },
    );
    keep(&mut new.storage, &old.storage, &mut out, || {
        "[storage]: the database opened at start stays in use until restarted".into()
    });
    keep(&mut new.cluster, &old.cluster, &mut out, || {
        "[cluster]: cluster mode stays as it started until restarted".into()
    });
    out
}
