//! ccgate: a gateway for the Anthropic Messages API that fails over between several upstream
//! endpoints, ejects broken ones, brings them back once a probe proves they work, and keeps exact
//! per-endpoint health statistics. See ARCHITECTURE.md for the map.
//!
//! The modules are layers; each may use only the layers listed below it (checked by
//! `tests/layering.rs`, whose table is the one place the order is written down):
//!
//! | layer | what it holds |
//! |---|---|
//! | [`cli`] | commands, config editing, Claude Code settings, operator tables |
//! | [`server`] | wiring: listener, workers, routing, reloads, background tasks |
//! | [`control`] | admin views and switches, metrics, dashboard, the prober loop |
//! | [`store`] | the embedded database, its writer and the usage ledger |
//! | [`proxy`] | the request handler, one attempt, the relay body, error answers |
//! | [`select`] | strategies, session affinity, retry budget |
//! | [`health`] | endpoints and live counters, the attempt guard, the health machine, the failure queue |
//! | [`cluster`] | the Redis link that instances share health through (opt-in) |
//! | [`transport`] | upstream connection pools and TLS |
//! | [`config`] | the file as written and the validated config |
//! | [`wire`], [`clock`] | pure leaves: byte formats read from the network, time |

pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod health;
pub mod proxy;
pub mod select;
pub mod server;
pub mod store;
mod sync;
pub mod transport;
pub mod wire;
