//! The control plane on the listener's `/_ccgate/` prefix and in the background: admin views and
//! switches, Prometheus metrics, the dashboard and the recovery prober loop.

pub mod admin;
pub mod dashboard;
pub mod metrics;
pub mod prober;
pub mod views;
