//! Cluster mode's views: `/_ccgate/cluster` (live instances, last heard, the cluster-wide sums),
//! the cluster's Prometheus series with an `instance` label, and the link state in
//! `/_ccgate/health`. Reads Redis only for the operator's `/_ccgate/cluster`; metrics use the view
//! the totals task cached.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};

use crate::clock::rfc3339;
use crate::control::cluster::{ClusterNode, DEAD_AFTER};
use crate::proxy::gateway::Gateway;
use crate::proxy::response::{self, GateBody};

impl ClusterNode {
    /// `GET /_ccgate/cluster`: live instances, when each was last heard from, their flushed
    /// counters and the cluster-wide sums. Reads Redis (bounded by the command timeout): a view
    /// for operators, never on a client request's path.
    pub async fn view_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "enabled": true,
            "instance": self.link.instance(),
            "redis": { "url": self.url.to_string(), "up": self.link.is_up() },
        });
        match self.link.cluster_view(DEAD_AFTER).await {
            Ok(view) => {
                let at = |ms: u64| rfc3339(UNIX_EPOCH + Duration::from_millis(ms));
                v["now"] = at(view.now_ms).into();
                v["instances"] = view
                    .instances
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "instance": i.instance,
                            "last_heard": at(i.last_heard_ms),
                            "last_heard_ms_ago": view.now_ms.saturating_sub(i.last_heard_ms),
                            "totals": i.totals,
                        })
                    })
                    .collect::<Vec<_>>()
                    .into();
                v["totals"] = serde_json::to_value(&view.totals).unwrap_or_default();
                *self.last_view.lock() = Some(view);
            }
            Err(e) => v["error"] = e.to_string().into(),
        }
        v
    }

    /// The cluster's Prometheus series (from the view cached by the totals task).
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let me = escape(self.link.instance());
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP ccgate_cluster_redis_up Whether this instance's link to the cluster's Redis is up.\n# TYPE ccgate_cluster_redis_up gauge\nccgate_cluster_redis_up{{instance=\"{me}\"}} {}",
            u8::from(self.link.is_up())
        );
        let view = self.last_view.lock().clone();
        if let Some(view) = view {
            let _ = writeln!(
                s,
                "# HELP ccgate_cluster_instances Live instances in the cluster.\n# TYPE ccgate_cluster_instances gauge\nccgate_cluster_instances {}",
                view.instances.len()
            );
            let _ = writeln!(
                s,
                "# HELP ccgate_cluster_instance_last_heard_seconds Seconds since each live instance was last heard from.\n# TYPE ccgate_cluster_instance_last_heard_seconds gauge"
            );
            for i in &view.instances {
                let _ = writeln!(
                    s,
                    "ccgate_cluster_instance_last_heard_seconds{{instance=\"{}\"}} {}",
                    escape(&i.instance),
                    view.now_ms.saturating_sub(i.last_heard_ms) as f64 / 1000.0
                );
            }
            let _ = writeln!(
                s,
                "# HELP ccgate_cluster_instance_counter Each live instance's flushed counters.\n# TYPE ccgate_cluster_instance_counter gauge"
            );
            for i in &view.instances {
                for (c, n) in &i.totals {
                    let _ = writeln!(
                        s,
                        "ccgate_cluster_instance_counter{{instance=\"{}\",counter=\"{}\"}} {n}",
                        escape(&i.instance),
                        escape(c)
                    );
                }
            }
            let _ = writeln!(
                s,
                "# HELP ccgate_cluster_counter Cluster-wide sums of every instance's counters.\n# TYPE ccgate_cluster_counter gauge"
            );
            for (c, n) in &view.totals {
                let _ = writeln!(s, "ccgate_cluster_counter{{counter=\"{}\"}} {n}", escape(c));
            }
        }
        s
    }

    /// The `cluster` member of `/_ccgate/health`.
    pub fn health_json(&self) -> serde_json::Value {
        serde_json::json!({
            "instance": self.link.instance(),
            "redis_up": self.link.is_up(),
            "name_clash": self.link.name_clash(),
        })
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Routes `/_ccgate/cluster` (with or without cluster mode), and in cluster mode adds the
/// cluster's series to `/_ccgate/metrics` and its link state to `/_ccgate/health`. `None`: not a
/// path this module answers.
pub async fn route<B>(
    node: Option<&Arc<ClusterNode>>,
    gw: &Arc<Gateway>,
    req: &Request<B>,
) -> Option<Response<GateBody>> {
    let path = req.uri().path().trim_end_matches('/');
    let get = req.method() == Method::GET;
    match (path, node) {
        ("/_ccgate/health", Some(node)) if get => Some(crate::control::admin::health_answer(
            &serde_json::json!({"status": "ok", "cluster": node.health_json()}),
        )),
        ("/_ccgate/cluster", _) | ("/_ccgate/metrics", Some(_))
            if !gw.authorized(req.headers()) =>
        {
            Some(response::error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "ccgate: missing or wrong access token",
            ))
        }
        ("/_ccgate/cluster", _) if !get => Some(response::method_not_allowed("GET")),
        ("/_ccgate/cluster", None) => Some(response::json(
            StatusCode::OK,
            &serde_json::json!({ "enabled": false }),
        )),
        ("/_ccgate/cluster", Some(node)) => {
            Some(response::json(StatusCode::OK, &node.view_json().await))
        }
        ("/_ccgate/metrics", Some(node)) if get => {
            use crate::control::metrics::{Format, render};
            let format = Format::negotiate(req.headers().get(http::header::ACCEPT));
            let text = render(gw, &node.metrics(), format);
            Some(response::body(format.content_type(), text))
        }
        _ => None,
    }
}
