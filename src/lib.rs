//! ccgate: a gateway for the Anthropic Messages API that fails over between several upstream
//! endpoints, ejects broken ones, brings them back once a probe proves they work, and keeps exact
//! per-endpoint health statistics. See ARCHITECTURE.md for the map.

pub mod admin;
pub mod affinity;
pub mod budget;
pub mod classify;
pub mod claude;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod edit;
pub mod endpoint;
pub mod estimate;
pub mod events;
pub mod forward;
pub mod gateway_stats;
pub mod health;
pub mod json_top;
pub mod logging;
pub mod metrics;
pub mod model_map;
pub mod ops;
pub mod probe;
pub mod proxy;
pub mod queue;
pub mod registry;
pub mod response;
pub mod select;
pub mod server;
pub mod sse;
pub mod store;
mod sync;
pub mod upstream;
pub mod usage;
