//! Cluster mode: several ccgate instances share endpoint health, failure episodes, prober leases,
//! session affinity and totals through one Redis (issue #13).
//!
//! This module is the Redis foundation only. It knows nothing of the rest of ccgate (no registry,
//! health machine, failure queue, affinity map or stats types cross into it): it speaks in endpoint
//! *identities* ([`EndpointId`]: name + base-URL fingerprint), shared phases ([`SharedPhase`]),
//! session keys and named counter deltas. The wiring maps ccgate's own types onto these, and applies
//! what arrives ([`ClusterEvent`]) through the same entry points local outcomes use.
//!
//! **Redis is never on the request path.** Every call here is meant for background tasks: each one
//! either fails at once with [`ClusterError::Unavailable`] while the link is down, or is bounded by
//! [`LinkOptions::command_timeout`]. The [`Supervisor`] owns the connection: it reports the link's
//! state ([`ClusterLink::is_up`]), logs a loss once, reconnects with backoff, and emits
//! [`ClusterEvent::Resync`] whenever the caller must republish its view (connected, reconnected, or
//! the shared data vanished under a live connection).
//!
//! # Why the `redis` crate
//!
//! `redis` (redis-rs) is the maintained, widely used Rust client (the Redis organisation hosts it):
//! async on tokio, `rediss://` through rustls (the ring provider and the system roots ccgate
//! already ships, so no second TLS stack), pub/sub on its own connection, and Lua scripts invoked by
//! hash with an automatic reload after a server restart. `fred` would do too, but brings its own
//! reconnect policy and a larger dependency tree. Its `ConnectionManager` is not used: it reconnects
//! silently inside calls, while cluster mode needs explicit down/up edges, a re-subscription at the
//! same moment, and a republish hook; so one [`Supervisor`] holds a multiplexed connection for
//! commands and a pub/sub connection for news, and replaces both together. Requires Redis ≥ 5
//! (scripts that call `TIME` before writing).
//!
//! # Keys
//!
//! Everything lives under the configured prefix (see [`keys`]), so several gateways — or several
//! test runs — can share one Redis without seeing each other.

pub mod affinity;
pub mod claims;
pub mod config;
pub mod health;
pub mod keys;
pub mod link;
pub mod news;
mod scripts;
pub mod totals;

pub use crate::cluster::claims::Claim;
pub use crate::cluster::config::{ClusterConfig, ClusterConfigError, LinkOptions, RedisUrl};
pub use crate::cluster::keys::{EndpointId, UrlFingerprint};
pub use crate::cluster::link::{ClusterError, ClusterEvent, ClusterLink, ResyncReason, Supervisor};
pub use crate::cluster::news::SessionNews;
pub use crate::cluster::news::{HealthNews, PhaseChange, SharedPhase};
pub use crate::cluster::totals::{ClusterView, InstanceView, TotalsBatch, TotalsFlusher};
