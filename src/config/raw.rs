//! Stage one: a serde mirror of the file as written, every value [`Spanned`] so a problem can name
//! its line.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::config::lenient::{lenient, lenient_table};
use crate::config::prices::RawPrice;

#[derive(Deserialize, Default)]
pub(super) struct RawConfig {
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) server: RawServer,
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) timeouts: RawTimeouts,
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) relay: RawRelay,
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) health: RawHealth,
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) affinity: RawAffinity,
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) retry_budget: RawRetryBudget,
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) storage: RawStorage,
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) requests: RawRequests,
    #[serde(default, deserialize_with = "lenient_table")]
    pub(super) prices: BTreeMap<String, Spanned<RawPrice>>,
    #[serde(default, deserialize_with = "lenient_table")]
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
pub(super) struct RawRequests {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) ring_size: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_rows: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) retention: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawServer {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) listen: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) access_token: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) access_token_env: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) strategy: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_body_bytes: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) shutdown_timeout: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_attempts: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) workers: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_connections: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_idle_upstream: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) header_read_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawTimeouts {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) connect: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) first_byte: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) idle: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawRelay {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_json_bytes: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_preamble_bytes: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_preamble_events: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_response_header_bytes: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawAffinity {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) enabled: Option<Spanned<bool>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) ttl: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) max_sessions: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawRetryBudget {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) ratio: Option<Spanned<f64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) min_per_second: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) window: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawStorage {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) enabled: Option<Spanned<bool>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) path: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) flush_interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawHealth {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) failure_threshold: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) probe_interval: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) probe_max_interval: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) probe_timeout: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) probe_mode: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) probe_model: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) rate_limit_cooldown: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) quota_threshold: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
pub(super) struct RawEndpoint {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) name: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) base_url: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) api_key: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) auth_token: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) api_key_env: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) auth_token_env: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) credential: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) priority: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) weight: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) enabled: Option<Spanned<bool>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) model_map: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) models: Option<Spanned<Vec<String>>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) ca_file: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) http2: Option<Spanned<bool>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) probe: Option<Spanned<String>>,
}
