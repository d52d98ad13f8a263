//! Stage one: a serde mirror of the file as written, every value [`Spanned`] so a problem can name
//! its line.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize, Default)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) affinity: RawAffinity,
    #[serde(default)]
    pub(super) retry_budget: RawRetryBudget,
    #[serde(default)]
    pub(super) storage: RawStorage,
    #[serde(default)]
    pub(super) endpoints: Vec<Spanned<RawEndpoint>>,
    #[serde(default)]
    pub(super) cluster: Option<RawCluster>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawCluster {
    pub(super) redis_url: Option<Spanned<String>>,
    pub(super) redis_url_env: Option<Spanned<String>>,
    pub(super) key_prefix: Option<Spanned<String>>,
    pub(super) instance: Option<Spanned<String>>,
    pub(super) flush_interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawServer {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) access_token: Option<Spanned<String>>,
    pub(super) access_token_env: Option<Spanned<String>>,
    pub(super) strategy: Option<Spanned<String>>,
    pub(super) max_body_bytes: Option<Spanned<i64>>,
    pub(super) shutdown_timeout: Option<Spanned<String>>,
    pub(super) max_attempts: Option<Spanned<i64>>,
    pub(super) workers: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawTimeouts {
    pub(super) connect: Option<Spanned<String>>,
    pub(super) first_byte: Option<Spanned<String>>,
    pub(super) idle: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawAffinity {
    pub(super) enabled: Option<Spanned<bool>>,
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) max_sessions: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawRetryBudget {
    pub(super) ratio: Option<Spanned<f64>>,
    pub(super) min_per_second: Option<Spanned<i64>>,
    pub(super) window: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawStorage {
    pub(super) enabled: Option<Spanned<bool>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) flush_interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawHealth {
    pub(super) failure_threshold: Option<Spanned<i64>>,
    pub(super) probe_interval: Option<Spanned<String>>,
    pub(super) probe_max_interval: Option<Spanned<String>>,
    pub(super) probe_timeout: Option<Spanned<String>>,
    pub(super) probe_mode: Option<Spanned<String>>,
    pub(super) probe_model: Option<Spanned<String>>,
    pub(super) rate_limit_cooldown: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawEndpoint {
    pub(super) name: Option<Spanned<String>>,
    pub(super) base_url: Option<Spanned<String>>,
    pub(super) api_key: Option<Spanned<String>>,
    pub(super) auth_token: Option<Spanned<String>>,
    pub(super) api_key_env: Option<Spanned<String>>,
    pub(super) auth_token_env: Option<Spanned<String>>,
    pub(super) priority: Option<Spanned<i64>>,
    pub(super) weight: Option<Spanned<i64>>,
    pub(super) enabled: Option<Spanned<bool>>,
    pub(super) model_map: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) probe: Option<Spanned<String>>,
}
