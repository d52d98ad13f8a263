//! The control plane on the listener's `/_ccgate/` prefix and in the background: admin views and
//! switches, Prometheus metrics, the dashboard, the recovery prober loop, and cluster mode's
//! wiring onto the Redis link.

pub mod admin;
pub mod cluster;
pub mod cluster_view;
pub mod dashboard;
pub mod metrics;
pub mod prober;
pub mod views;
