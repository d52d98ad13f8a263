//! `GET /_ccgate/metrics`: the live state in Prometheus text format (0.0.4), or in OpenMetrics
//! 1.0 for a scraper that asks for it in `Accept` (Prometheus itself does), as Prometheus' own
//! client libraries negotiate.
//!
//! Nothing is counted twice: a `prometheus-client` [`Collector`] reads the same atomics the admin
//! views read, at scrape time. Each endpoint's counters come from one [`Live::snapshot`], so the
//! exposition satisfies the accounting identity just as the JSON does:
//! `Σ ccgate_endpoint_attempts_total{endpoint=e} + ccgate_endpoint_in_flight{endpoint=e} ==
//! ccgate_endpoint_attempts_started_total{endpoint=e}`.
//!
//! [`Live::snapshot`]: crate::health::endpoint::Live::snapshot

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::health::classify::Kind;
use crate::health::endpoint::{Endpoint, LATENCY_BUCKETS, Latency, Live, STATES};
use crate::health::totals::RequestEnd;
use crate::proxy::gateway::Gateway;
use crate::store::saturating_i64;

/// The two text formats of the exposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text format 0.0.4: what `curl` and a scraper without a preference get.
    Prometheus,
    /// OpenMetrics 1.0, for a scraper whose `Accept` prefers it.
    OpenMetrics,
}

impl Format {
    /// The format `accept` asks for: OpenMetrics when it names `application/openmetrics-text`
    /// with a weight at least that of `text/plain`, else Prometheus text.
    pub fn negotiate(accept: Option<&http::HeaderValue>) -> Self {
        let (mut open_metrics, mut plain) = (0.0f32, 0.0f32);
        for range in accept
            .and_then(|a| a.to_str().ok())
            .unwrap_or("")
            .split(',')
        {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => open_metrics = open_metrics.max(q),
                "text/plain" => plain = plain.max(q),
                _ => {}
            }
        }
        if open_metrics > 0.0 && open_metrics >= plain {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    /// The `content-type` of an exposition in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Renders the exposition in `format`, with `extra` (more families, written as gauges, which
/// read the same in both formats) after ccgate's own and before OpenMetrics' closing `# EOF`.
pub fn render(gw: &Arc<Gateway>, extra: &str, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(GatewayCollector(Arc::clone(gw))));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    let body = out.strip_suffix("# EOF\n").unwrap_or(&out);
    match format {
        Format::OpenMetrics => format!("{body}{extra}# EOF\n"),
        Format::Prometheus => to_prometheus_text(body) + extra,
    }
}

/// OpenMetrics text (without its `# EOF`), as `prometheus-client` writes it, in Prometheus' text
/// format 0.0.4. The samples read the same; the metadata differs for counters, whose family is
/// named without the `_total` its samples carry in OpenMetrics and with it in 0.0.4. `# UNIT`
/// lines have no 0.0.4 form and are dropped, and a HELP text's `\"` (an escape only OpenMetrics
/// has) becomes `"`.
fn to_prometheus_text(open_metrics: &str) -> String {
    use std::fmt::Write;
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        let (prefix, rest) = match (line.strip_prefix("# HELP "), line.strip_prefix("# TYPE ")) {
            (Some(rest), _) => ("# HELP", rest),
            (_, Some(rest)) => ("# TYPE", rest),
            _ if line.starts_with("# UNIT ") => continue,
            _ => {
                out.push_str(line);
                out.push('\n');
                continue;
            }
        };
        let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        let total = if counters.contains(name) {
            "_total"
        } else {
            ""
        };
        let tail = if prefix == "# HELP" {
            tail.replace("\\\"", "\"")
        } else {
            tail.to_owned()
        };
        // Writing into a String cannot fail.
        let _ = writeln!(out, "{prefix} {name}{total} {tail}");
    }
    out
}

struct GatewayCollector(Arc<Gateway>);

impl fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayCollector")
    }
}

/// A sample's labels.
type Labels<'a> = Vec<(&'static str, &'a str)>;

/// A counter sample.
fn counter(v: u64) -> ConstCounter {
    ConstCounter::new(v)
}

/// A gauge sample.
fn gauge(v: u64) -> ConstGauge {
    ConstGauge::new(saturating_i64(v))
}

/// The `endpoint` label of `e`'s samples.
fn endpoint_label(e: &Endpoint) -> Labels<'_> {
    vec![("endpoint", e.name.as_str())]
}

/// One sample per endpoint, labelled with its name; `value` gets the endpoint's position.
fn per_endpoint<M>(
    eps: &[Arc<Endpoint>],
    value: impl Fn(usize, &Endpoint) -> M,
) -> Vec<(Labels<'_>, M)> {
    eps.iter()
        .enumerate()
        .map(|(i, e)| (endpoint_label(e), value(i, e)))
        .collect()
}

/// One metric family (a counter or a gauge, by the samples' type).
fn family<M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels<'_>, M)],
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, v) in rows {
        v.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A latency histogram per endpoint, `latency` choosing which of its live histograms.
fn histogram(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    eps: &[Arc<Endpoint>],
    latency: fn(&Live) -> &Latency,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for e in eps {
        let latency = latency(&e.live);
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
        m.encode_family(&endpoint_label(e))?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                latency.sum().as_secs_f64(),
                count,
                &buckets,
                None,
            )?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let gw = &self.0;
        let reg = &gw.registry;
        let eps = &reg.endpoints;
        let snaps: Vec<_> = eps.iter().map(|e| e.live.snapshot()).collect();

        family(
            &mut enc,
            "ccgate_endpoint_attempts_started",
            "Attempts sent to the endpoint (total_requests).",
            &per_endpoint(eps, |i, _| counter(snaps[i].total)),
        )?;
        let mut ended = Vec::new();
        for (e, s) in eps.iter().zip(&snaps) {
            for k in Kind::ALL {
                let mut labels = endpoint_label(e);
                labels.push(("outcome", k.name()));
                ended.push((labels, counter(s.by_kind[k as usize])));
            }
        }
        family(
            &mut enc,
            "ccgate_endpoint_attempts",
            "Ended attempts by outcome.",
            &ended,
        )?;
        family(
            &mut enc,
            "ccgate_endpoint_in_flight",
            "Attempts in progress.",
            &per_endpoint(eps, |i, _| gauge(snaps[i].in_flight)),
        )?;
        family(
            &mut enc,
            "ccgate_endpoint_consecutive_failures",
            "Endpoint-fault failures since the last success.",
            &per_endpoint(eps, |_, e| gauge(u64::from(e.live.consecutive_failures()))),
        )?;
        let quotas: Vec<(Labels<'_>, ConstGauge<f64>)> = eps
            .iter()
            .filter_map(|e| {
                Some((
                    endpoint_label(e),
                    ConstGauge::new(e.live.quota()?.remaining_fraction),
                ))
            })
            .collect();
        family(
            &mut enc,
            "ccgate_endpoint_quota_remaining_ratio",
            "Fraction of the tightest rate-limit window left, as the endpoint's last answer said.",
            &quotas,
        )?;
        let now_ms = reg.clock.now_ms();
        family(
            &mut enc,
            "ccgate_endpoint_quota_near_limit",
            "1 while the endpoint is near its rate limit and ranked last.",
            &per_endpoint(eps, |_, e| {
                gauge(u64::from(e.live.near_quota_limit(now_ms)))
            }),
        )?;
        let mut states = Vec::new();
        for e in eps {
            let current = e.state_name();
            for st in STATES {
                let mut labels = endpoint_label(e);
                labels.push(("state", st));
                states.push((labels, gauge(u64::from(current == st))));
            }
        }
        family(
            &mut enc,
            "ccgate_endpoint_state",
            "1 for the endpoint's current state.",
            &states,
        )?;
        histogram(
            &mut enc,
            "ccgate_endpoint_first_byte_seconds",
            "Time from sending an attempt to its response headers.",
            eps,
            |l| &l.ttfb,
        )?;
        histogram(
            &mut enc,
            "ccgate_endpoint_duration_seconds",
            "Time from sending an attempt to the end of its response body.",
            eps,
            |l| &l.total,
        )?;

        let size = reg.queue.len();
        let q = reg.queue.stats();
        family(
            &mut enc,
            "ccgate_failure_queue_size",
            "Endpoints out of rotation.",
            &[(vec![], gauge(size as u64))],
        )?;
        family(
            &mut enc,
            "ccgate_failure_episodes",
            "Failure episodes opened (total_failed).",
            &[(vec![], counter(q.total_failed))],
        )?;
        family(
            &mut enc,
            "ccgate_probes",
            "Recovery probes by result.",
            &[
                (vec![("result", "passed")], counter(q.total_recovered)),
                (vec![("result", "failed")], counter(q.total_still_failed)),
            ],
        )?;

        let g = reg.gateway.snapshot();
        family(
            &mut enc,
            "ccgate_requests_started",
            "Client requests received (total_requests).",
            &[(vec![], counter(g.total))],
        )?;
        family(
            &mut enc,
            "ccgate_requests",
            "Ended client requests by result.",
            &RequestEnd::ALL.map(|how| (vec![("result", how.name())], counter(g.ended(how)))),
        )?;
        family(
            &mut enc,
            "ccgate_requests_in_flight",
            "Client requests in progress.",
            &[(vec![], gauge(g.in_flight))],
        )?;
        family(
            &mut enc,
            "ccgate_retries",
            "Attempts after a request's first.",
            &[(vec![], counter(g.retries))],
        )?;
        family(
            &mut enc,
            "ccgate_retry_budget_refusals",
            "Failovers not made because the retry budget was spent.",
            &[(vec![], counter(g.budget_refusals))],
        )?;
        family(
            &mut enc,
            "ccgate_fallbacks",
            "Requests sent to the least-bad endpoint because none was admitted.",
            &[(vec![], counter(g.fallbacks))],
        )?;
        let sessions = gw.affinity.as_ref().map_or(0, |a| a.len());
        family(
            &mut enc,
            "ccgate_sessions",
            "Client sessions bound to an endpoint.",
            &[(vec![], gauge(sessions as u64))],
        )?;
        family(
            &mut enc,
            "ccgate_uptime_seconds",
            "Seconds since the gateway started.",
            &[(vec![], gauge(reg.clock.uptime().as_secs()))],
        )?;
        // Tokens of successful answers since start, per endpoint, model and kind: the prompt-cache
        // hit rate is `cache_read / (cache_read + cache_creation + input)` over these.
        let usage = gw.live_usage.all();
        let mut tokens = Vec::with_capacity(usage.len() * 4);
        let mut answers = Vec::with_capacity(usage.len());
        for (endpoint, model, sums) in &usage {
            let labels = |kind| {
                vec![
                    ("endpoint", endpoint.as_str()),
                    ("model", model.as_str()),
                    ("kind", kind),
                ]
            };
            tokens.push((labels("input"), counter(sums.usage.input)));
            tokens.push((labels("output"), counter(sums.usage.output)));
            tokens.push((labels("cache_creation"), counter(sums.usage.cache_creation)));
            tokens.push((labels("cache_read"), counter(sums.usage.cache_read)));
            answers.push((
                vec![("endpoint", endpoint.as_str()), ("model", model.as_str())],
                counter(sums.requests),
            ));
        }
        family(
            &mut enc,
            "ccgate_tokens",
            "Tokens of successful answers by endpoint, model and kind (input = uncached input; cache_creation = prompt-cache writes; cache_read = prompt-cache reads).",
            &tokens,
        )?;
        family(
            &mut enc,
            "ccgate_usage_answers",
            "Successful answers whose token usage was read, by endpoint and model.",
            &answers,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_follows_accept() {
        let prometheus_server = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let cases = [
            (None, Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain"), Format::Prometheus),
            (Some(prometheus_server), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                Format::OpenMetrics,
            ),
            (
                Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"),
                Format::Prometheus,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Prometheus),
            (
                Some("text/plain;version=0.0.4;q=0.5,application/openmetrics-text"),
                Format::OpenMetrics,
            ),
            (Some("garbage;;q=x,,"), Format::Prometheus),
        ];
        for (accept, want) in cases {
            let value = accept.map(|a| http::HeaderValue::from_str(a).expect("header"));
            assert_eq!(Format::negotiate(value.as_ref()), want, "{accept:?}");
        }
    }

    #[test]
    fn prometheus_text_names_counter_families_with_their_total() {
        let open_metrics = "# HELP requests Requests served.\n# TYPE requests counter\n\
            requests_total{path=\"/v1\"} 3\n# HELP queue Entries (\\\"out\\\").\n# TYPE queue gauge\n\
            # UNIT queue entries\nqueue 1\n# HELP latency_seconds Latency.\n\
            # TYPE latency_seconds histogram\nlatency_seconds_bucket{le=\"+Inf\"} 2\n\
            latency_seconds_sum 0.5\nlatency_seconds_count 2\n";
        let text = to_prometheus_text(open_metrics);
        assert_eq!(
            text,
            "# HELP requests_total Requests served.\n# TYPE requests_total counter\n\
            requests_total{path=\"/v1\"} 3\n# HELP queue Entries (\"out\").\n# TYPE queue gauge\n\
            queue 1\n# HELP latency_seconds Latency.\n# TYPE latency_seconds histogram\n\
            latency_seconds_bucket{le=\"+Inf\"} 2\nlatency_seconds_sum 0.5\nlatency_seconds_count 2\n"
        );
    }
}
