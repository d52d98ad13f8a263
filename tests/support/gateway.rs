#![allow(dead_code)]
//! Runs a real ccgate server in-process on `127.0.0.1:0`, plus a small HTTP client to talk to it.
//!
//! ```ignore
//! let gw = GatewayBuilder::new().endpoint("a", &up.url(), "").start().await;
//! let r = gw.post("/v1/messages?beta=true", &[("x-api-key", "client")], body).await;
//! ```

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use ccgate::config::Config;
use ccgate::proxy::gateway::Gateway;
use ccgate::server::Server;

use super::wait::DEADLINE;

/// Every outcome kind the endpoint view reports.
pub const KINDS: [&str; 9] = [
    "success",
    "caller_error",
    "cancelled",
    "overloaded",
    "server_error",
    "transport",
    "timeout",
    "rate_limited",
    "auth",
];

/// The outcome kinds that are the endpoint's failure, counted in `endpoint_errors` (with
/// `caller_error`, in `failed_requests`): every kind but success, the caller's error and
/// cancelled.
pub fn failure_kinds() -> impl Iterator<Item = &'static str> {
    KINDS
        .into_iter()
        .filter(|k| !["success", "caller_error", "cancelled"].contains(k))
}

/// Builds a config in TOML, section by section.
#[derive(Default, Clone)]
pub struct GatewayBuilder {
    server: Vec<String>,
    health: Vec<String>,
    timeouts: Vec<String>,
    tables: Vec<(String, String)>,
    endpoints: Vec<String>,
}

impl GatewayBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    /// A line for `[server]` (listen is always `127.0.0.1:0` unless given).
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.to_string());
        self
    }
    /// A line for `[health]`.
    pub fn health(mut self, line: &str) -> Self {
        self.health.push(line.to_string());
        self
    }
    /// A line for `[timeouts]`.
    pub fn timeouts(mut self, line: &str) -> Self {
        self.timeouts.push(line.to_string());
        self
    }
    /// A line for any other table, e.g. `.table("affinity", "ttl = \"1m\"")`.
    pub fn table(mut self, table: &str, line: &str) -> Self {
        self.tables.push((table.to_string(), line.to_string()));
        self
    }
    /// An endpoint with `api_key = "key-NAME"` unless `extra` sets a credential; `extra` holds
    /// more `key = value` lines.
    pub fn endpoint(mut self, name: &str, url: &str, extra: &str) -> Self {
        let has_cred = ["api_key", "auth_token", "credential"]
            .iter()
            .any(|k| extra.contains(k));
        let cred = if has_cred {
            String::new()
        } else {
            format!("api_key = \"key-{name}\"\n")
        };
        self.endpoints.push(format!(
            "[[endpoints]]\nname = \"{name}\"\nbase_url = \"{url}\"\n{cred}{extra}\n"
        ));
        self
    }
    /// The TOML text.
    pub fn toml(&self) -> String {
        let mut s = String::from("[server]\n");
        if !self
            .server
            .iter()
            .any(|l| l.trim_start().starts_with("listen"))
        {
            s.push_str("listen = \"127.0.0.1:0\"\n");
        }
        for l in &self.server {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("[health]\n");
        for l in &self.health {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("[timeouts]\n");
        for l in &self.timeouts {
            s.push_str(l);
            s.push('\n');
        }
        let mut seen: Vec<&str> = Vec::new();
        for (table, _) in &self.tables {
            if seen.contains(&table.as_str()) {
                continue;
            }
            seen.push(table);
            s.push_str(&format!("[{table}]\n"));
            for (_, line) in self.tables.iter().filter(|(t, _)| t == table) {
                s.push_str(line);
                s.push('\n');
            }
        }
        // Tests never write into the real home: no database unless the test sets `[storage]`.
        if !seen.contains(&"storage") {
            s.push_str("[storage]\nenabled = false\n");
        }
        for e in &self.endpoints {
            s.push_str(e);
        }
        s
    }
    /// The validated config.
    pub fn config(&self) -> Config {
        let env = |_: &str| None;
        Config::from_toml(&self.toml(), "test.toml", &env)
            .unwrap_or_else(|e| panic!("test config rejected: {e}\n{}", self.toml()))
    }
    /// Starts the gateway.
    pub async fn start(self) -> TestGateway {
        TestGateway::start(self.config()).await
    }
}

/// A running in-process gateway.
pub struct TestGateway {
    pub addr: std::net::SocketAddr,
    /// The gateway the server started with (after a reload, see `handle.current()`).
    pub gateway: Arc<Gateway>,
    /// Reaches the gateway in service and reloads it.
    pub handle: Arc<ccgate::server::Handle>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A response read in full.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A plain HTTP/1.1 client with its own pool.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

impl TestGateway {
    pub async fn start(config: Config) -> Self {
        Self::start_with_source(config, None).await
    }

    /// Starts a gateway that reloads from `source` (SIGHUP is process-wide, so in-process tests
    /// use `POST /_ccgate/reload`).
    pub async fn start_with_source(mut config: Config, source: Option<std::path::PathBuf>) -> Self {
        // A config built without the builder gets storage on by default, in the real data dir:
        // tests only ever use a database at a path they chose.
        if config.storage.path.is_none() {
            config.storage.enabled = false;
        }
        let server = Server::bind_with_source(config, source)
            .await
            .expect("bind");
        let addr = server.local_addr();
        let gateway = server.gateway();
        let handle = server.handle();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            gateway,
            handle,
            stop: Some(tx),
            task: Some(task),
            client: http_client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends a request and returns the response with its body still streaming; panics when no
    /// response head arrives within [`DEADLINE`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Response<Incoming> {
        let what = format!("{method} {path}");
        let mut b = Request::builder().method(method).uri(self.url(path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body.into())).expect("request");
        tokio::time::timeout(DEADLINE, self.client.request(req))
            .await
            .unwrap_or_else(|_| {
                panic!("{what}: no response head from the gateway within {DEADLINE:?}")
            })
            .unwrap_or_else(|e| panic!("{what}: the gateway did not answer: {e}"))
    }

    /// Sends a request and reads the whole answer; panics when the body breaks or does not end
    /// within [`DEADLINE`] (tests that expect a broken body use [`TestGateway::send`]).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let resp = self.send(method, path, headers, body).await;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(DEADLINE, body.collect())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the answer body ({}) did not end within {DEADLINE:?}",
                    parts.status
                )
            })
            .unwrap_or_else(|e| panic!("answer body ({}): {e}", parts.status))
            .to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// `POST` with a JSON body and the usual Anthropic headers plus `headers`.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Answer {
        let mut h: Vec<(&str, &str)> = vec![
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ];
        h.extend_from_slice(headers);
        self.request(Method::POST, path, &h, Bytes::from(body.to_string()))
            .await
    }

    /// `POST /v1/messages` with [`TestGateway::message_body`] and no extra headers.
    pub async fn post_message(&self, stream: bool) -> Answer {
        self.post("/v1/messages", &[], &Self::message_body(stream))
            .await
    }

    /// A minimal Messages request body.
    pub fn message_body(stream: bool) -> Value {
        serde_json::json!({
            "model": "claude-sonnet-4",
            "max_tokens": 64,
            "stream": stream,
            "messages": [{"role": "user", "content": "hello"}],
        })
    }

    /// `GET` an admin view as JSON.
    pub async fn admin(&self, path: &str) -> Value {
        let a = self
            .request(Method::GET, &format!("/_ccgate/{path}"), &[], Bytes::new())
            .await;
        assert_eq!(a.status, StatusCode::OK, "admin {path}: {}", a.text());
        a.json()
    }

    /// One endpoint's view.
    pub async fn endpoint_view(&self, name: &str) -> Value {
        let all = self.admin("endpoints").await;
        all["endpoints"]
            .as_array()
            .expect("list")
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint {name}"))
    }

    /// Waits until every endpoint and the gateway report nothing in flight (the relay records an
    /// attempt when the client has read its body end, which may be a moment after the client
    /// sees it). Panics after [`DEADLINE`].
    pub async fn settle(&self) {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let gw = self.handle.current();
            let busy = gw
                .registry
                .endpoints
                .iter()
                .any(|e| e.live.snapshot().in_flight > 0)
                || gw.registry.gateway.snapshot().in_flight > 0;
            if !busy {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "gateway did not settle within {DEADLINE:?}: requests still in flight"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Stops the gateway and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
