//! `GET /_ccgate/metrics`: the live state in Prometheus text format.
//!
//! Nothing is counted twice: a `prometheus-client` [`Collector`] reads the same atomics the admin
//! views read, at scrape time. Each endpoint's counters come from one [`Live::snapshot`], so the
//! exposition satisfies the accounting identity just as the JSON does:
//! `Σ ccgate_endpoint_attempts_total{endpoint=e} + ccgate_endpoint_in_flight{endpoint=e} ==
//! ccgate_endpoint_attempts_started_total{endpoint=e}`.
//!
//! [`Live::snapshot`]: crate::endpoint::Live::snapshot

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::classify::Kind;
use crate::endpoint::{LATENCY_BUCKETS, Latency};
use crate::proxy::Gateway;

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// States an endpoint can be in, as exported by `ccgate_endpoint_state`.
const STATES: [&str; 5] = ["healthy", "degraded", "ejected", "cooling_down", "disabled"];

/// Renders the exposition.
pub fn render(gw: &Arc<Gateway>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(GatewayCollector(Arc::clone(gw))));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

struct GatewayCollector(Arc<Gateway>);

impl fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayCollector")
    }
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, &str)>, u64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, &str)>, i64)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(&str, &Latency)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (endpoint, latency) in rows {
        // Per-bucket counts: the encoder accumulates them into `le` buckets itself.
        let counts = latency.bucket_counts();
        let count = counts.iter().sum();
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let le = if i == LATENCY_BUCKETS - 1 {
                    f64::INFINITY
                } else {
                    Latency::bucket_upper_ms(i) / 1000.0
                };
                (le, c)
            })
            .collect();
        let labels = vec![("endpoint", *endpoint)];
        m.encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                latency.sum().as_secs_f64(),
                count,
                &buckets,
                None,
            )?;
    }
    Ok(())
}

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let gw = &self.0;
        let reg = &gw.registry;
        let eps = &reg.endpoints;
        let snaps: Vec<_> = eps.iter().map(|e| e.live.snapshot()).collect();

        let started: Vec<_> = eps
            .iter()
            .zip(&snaps)
            .map(|(e, s)| (vec![("endpoint", e.name.as_str())], s.total))
            .collect();
        counter(
            &mut enc,
            "ccgate_endpoint_attempts_started",
            "Attempts sent to the endpoint (total_requests).",
            &started,
        )?;
        let mut ended = Vec::new();
        for (e, s) in eps.iter().zip(&snaps) {
            for k in Kind::ALL {
                ended.push((
                    vec![("endpoint", e.name.as_str()), ("outcome", k.name())],
                    s.by_kind[k as usize],
                ));
            }
        }
        counter(
            &mut enc,
            "ccgate_endpoint_attempts",
            "Ended attempts by outcome.",
            &ended,
        )?;
        let in_flight: Vec<_> = eps
            .iter()
            .zip(&snaps)
            .map(|(e, s)| (vec![("endpoint", e.name.as_str())], n(s.in_flight)))
            .collect();
        gauge(
            &mut enc,
            "ccgate_endpoint_in_flight",
            "Attempts in progress.",
            &in_flight,
        )?;
        let consecutive: Vec<_> = eps
            .iter()
            .map(|e| {
                (
                    vec![("endpoint", e.name.as_str())],
                    i64::from(e.live.consecutive_failures()),
                )
            })
            .collect();
        gauge(
            &mut enc,
            "ccgate_endpoint_consecutive_failures",
            "Endpoint-fault failures since the last success.",
            &consecutive,
        )?;
        let mut states = Vec::new();
        for e in eps {
            let current = crate::admin::state_name(e);
            for st in STATES {
                states.push((
                    vec![("endpoint", e.name.as_str()), ("state", st)],
                    i64::from(current == st),
                ));
            }
        }
        gauge(
            &mut enc,
            "ccgate_endpoint_state",
            "1 for the endpoint's current state.",
            &states,
        )?;
        let ttfb: Vec<_> = eps
            .iter()
            .map(|e| (e.name.as_str(), &e.live.ttfb))
            .collect();
        histogram(
            &mut enc,
            "ccgate_endpoint_first_byte_seconds",
            "Time from sending an attempt to its response headers.",
            &ttfb,
        )?;
        let total: Vec<_> = eps
            .iter()
            .map(|e| (e.name.as_str(), &e.live.total))
            .collect();
        histogram(
            &mut enc,
            "ccgate_endpoint_duration_seconds",
            "Time from sending an attempt to the end of its response body.",
            &total,
        )?;

        let (entries, q) = reg.queue.view();
        gauge(
            &mut enc,
            "ccgate_failure_queue_size",
            "Endpoints out of rotation.",
            &[(vec![], n(entries.len() as u64))],
        )?;
        counter(
            &mut enc,
            "ccgate_failure_episodes",
            "Failure episodes opened (total_failed).",
            &[(vec![], q.total_failed)],
        )?;
        counter(
            &mut enc,
            "ccgate_probes",
            "Recovery probes by result.",
            &[
                (vec![("result", "passed")], q.total_recovered),
                (vec![("result", "failed")], q.total_still_failed),
            ],
        )?;

        let g = reg.gateway.snapshot();
        counter(
            &mut enc,
            "ccgate_requests_started",
            "Client requests received (total_requests).",
            &[(vec![], g.total)],
        )?;
        counter(
            &mut enc,
            "ccgate_requests",
            "Ended client requests by result.",
            &[
                (vec![("result", "success")], g.successful),
                (vec![("result", "upstream_error")], g.upstream_errors),
                (vec![("result", "caller_error")], g.caller_errors),
                (vec![("result", "cancelled")], g.cancelled),
            ],
        )?;
        gauge(
            &mut enc,
            "ccgate_requests_in_flight",
            "Client requests in progress.",
            &[(vec![], n(g.in_flight))],
        )?;
        counter(
            &mut enc,
            "ccgate_retries",
            "Attempts after a request's first.",
            &[(vec![], g.retries)],
        )?;
        counter(
            &mut enc,
            "ccgate_retry_budget_refusals",
            "Failovers not made because the retry budget was spent.",
            &[(vec![], g.budget_refusals)],
        )?;
        counter(
            &mut enc,
            "ccgate_fallbacks",
            "Requests sent to the least-bad endpoint because none was admitted.",
            &[(vec![], g.fallbacks)],
        )?;
        gauge(
            &mut enc,
            "ccgate_sessions",
            "Client sessions bound to an endpoint.",
            &[(
                vec![],
                n(gw.affinity.as_ref().map_or(0, |a| a.len()) as u64),
            )],
        )?;
        gauge(
            &mut enc,
            "ccgate_uptime_seconds",
            "Seconds since the gateway started.",
            &[(vec![], n(reg.clock.uptime().as_secs()))],
        )?;
        Ok(())
    }
}
