//! The live dashboard at `GET /_ccgate/`: served with the right headers and token rules, and
//! driven in a real headless Chromium over the Chrome DevTools Protocol — the page shows endpoint
//! states as they change after a fault, a real mouse click on **Disable** switches an endpoint
//! off, and a screenshot of the result is written to `target/dashboard.png`.
//!
//! Needs `/usr/bin/chromium` (`scripts/test.sh` installs it); without it the browser test fails,
//! unless `CCGATE_SKIP_BROWSER_TESTS=1` is set.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
// `SinkExt` needs futures-util's `sink` feature, which tokio-tungstenite always turns on.
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::gateway::{GatewayBuilder, TestGateway};
use support::mock::{MockUpstream, Script};
use support::wait::{DEADLINE, eventually_ok};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The gateway's access token; its `/` and `=` must survive percent-decoding of `?token=`.
const TOKEN: &str = "dash/secret=1";
const TOKEN_IN_URL: &str = "dash%2Fsecret%3D1";

async fn get(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> support::gateway::Answer {
    gw.request(Method::GET, path, headers, Bytes::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_is_served_with_token_rules() {
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .server(&format!("access_token = \"{TOKEN}\""))
        .endpoint("a", &up.url(), "")
        .start()
        .await;

    for path in ["/_ccgate/", "/_ccgate"] {
        let page = get(&gw, &format!("{path}?token={TOKEN_IN_URL}"), &[]).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.text());
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(page.header("cache-control"), Some("no-store"));
        assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
        let html = page.text();
        assert!(html.starts_with("<!doctype html>"), "{path}: not the page");
        assert!(!html.contains(TOKEN) && !html.contains(TOKEN_IN_URL));
        // Self-contained: nothing loaded from elsewhere.
        for external in ["<link", " src=", "@import", "url("] {
            assert!(!html.contains(external), "page references `{external}`");
        }
    }
    // The token also works the usual ways, and the page route is GET only.
    let by_header = get(&gw, "/_ccgate/", &[("x-api-key", TOKEN)]).await;
    assert_eq!(by_header.status, StatusCode::OK);
    let bearer = format!("Bearer {TOKEN}");
    let by_bearer = get(&gw, "/_ccgate/", &[("authorization", &bearer)]).await;
    assert_eq!(by_bearer.status, StatusCode::OK);
    let post = gw
        .request(
            Method::POST,
            &format!("/_ccgate/?token={TOKEN_IN_URL}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);

    // Without it, or with a wrong one, no page.
    for query in [
        "",
        "?token=",
        "?token=dash%2Fsecret%3D2",
        "?token=dash/secret=1x",
        "?tok=1",
    ] {
        let denied = get(&gw, &format!("/_ccgate/{query}"), &[]).await;
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "query `{query}`");
        assert!(!denied.text().contains(TOKEN));
    }
    // The query token opens the page only, never the JSON views or the switches.
    let view = get(
        &gw,
        &format!("/_ccgate/endpoints?token={TOKEN_IN_URL}"),
        &[],
    )
    .await;
    assert_eq!(view.status, StatusCode::UNAUTHORIZED);
    let switch = gw
        .request(
            Method::POST,
            &format!("/_ccgate/endpoints/a/disable?token={TOKEN_IN_URL}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(switch.status, StatusCode::UNAUTHORIZED);
    // Health stays open.
    assert_eq!(
        get(&gw, "/_ccgate/health", &[]).await.status,
        StatusCode::OK
    );

    // No token configured: no token needed.
    let open = GatewayBuilder::new()
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    assert_eq!(get(&open, "/_ccgate/", &[]).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    if !browser_available() {
        return;
    }
    let a = MockUpstream::start().await;
    let b = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .server(&format!("access_token = \"{TOKEN}\""))
        .health("failure_threshold = 1")
        // Keep the prober out of the way: `a` must stay ejected until the click.
        .health("probe_interval = \"5m\"")
        .endpoint("a", &a.url(), "priority = 1")
        .endpoint("b", &b.url(), "priority = 2")
        .start()
        .await;
    let auth = [("x-api-key", TOKEN)];

    let browser = Browser::launch();
    let mut page = browser.connect().await;
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    page.call(
        "Page.navigate",
        json!({"url": gw.url(&format!("/_ccgate/?token={TOKEN_IN_URL}"))}),
    )
    .await;

    // 1. Both endpoints show up healthy (the page's fetches carry the token).
    page.wait_for("both endpoints healthy", &states_js(), |v| {
        v == &json!({"a": "healthy", "b": "healthy"})
    })
    .await;

    // Some traffic for the charts, then `a` breaks: one request fails over to `b`.
    for _ in 0..3 {
        let r = gw
            .post("/v1/messages", &auth, &TestGateway::message_body(false))
            .await;
        assert_eq!(r.header("x-ccgate-endpoint"), Some("a"));
    }
    a.set_default(Script::error(500, "api_error", "upstream exploded"));
    let r = gw
        .post("/v1/messages", &auth, &TestGateway::message_body(false))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"));
    gw.settle().await;

    // 2. The page sees `a` ejected, in the failure queue, and the failover.
    page.wait_for("`a` ejected", &states_js(), |v| {
        v == &json!({"a": "ejected", "b": "healthy"})
    })
    .await;
    page.wait_for(
        "`a` in the failure queue and one failover listed",
        r#"[!!document.querySelector('[data-queued="a"]'),
            document.querySelectorAll('#ev-list li').length]"#,
        |v| v == &json!([true, 1]),
    )
    .await;
    // The recent requests (four, the last one served by `b` after a failover) and the prompt
    // cache per endpoint and model (the mock's answers carry usage without cache tokens).
    page.wait_for(
        "four recent requests and the cache table",
        r#"[document.querySelectorAll('#req-body tr').length,
            document.querySelector('#req-body tr td:nth-child(4)').textContent,
            document.querySelector('#req-body tr td:nth-child(5)').textContent,
            document.querySelectorAll('#cache-body tr').length,
            document.querySelector('#cache-body tr td:nth-child(3)').textContent]"#,
        |v| v == &json!([4, "b", "2", 2, "0%"]),
    )
    .await;

    // `b` says its subscription window is 97% used: the page shows its quota (issue 16 #3).
    b.push(
        Script::json_ok()
            .header("anthropic-ratelimit-unified-status", "allowed_warning")
            .header("anthropic-ratelimit-unified-5h-utilization", "0.97"),
    );
    let r = gw
        .post("/v1/messages", &auth, &TestGateway::message_body(false))
        .await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("b"));
    page.wait_for(
        "`b` shows its quota near the limit",
        r#"document.querySelector('tr[data-endpoint="b"] .meta').textContent"#,
        |v| {
            v.as_str()
                .is_some_and(|t| t.contains("quota 3.0% left") && t.contains("near limit"))
        },
    )
    .await;

    // A caller's bad request answered by `b`: shown as a caller error beside `b`'s endpoint
    // errors, not against its health, and in the clients' split (issue 21 #3).
    b.push(Script::error(400, "invalid_request_error", "bad request"));
    let r = gw
        .post("/v1/messages", &auth, &TestGateway::message_body(false))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    gw.settle().await;
    page.wait_for(
        "`b` shows its caller error apart, health untouched",
        r#"[document.querySelector('tr[data-endpoint="b"] td[data-label^="Endpoint errors"]').textContent,
            document.querySelector('tr[data-endpoint="b"] td.rate').textContent,
            document.getElementById('c-rate-sub').textContent]"#,
        |v| {
            v[0] == "0 · 1 caller"
                && v[1] == "100%"
                && v[2]
                    .as_str()
                    .is_some_and(|t| t.contains("0 upstream errors") && t.contains("1 caller errors"))
        },
    )
    .await;

    // 3. A real mouse click on `a`'s Disable button.
    let at = page
        .eval(
            r#"(() => {
                const b = document.querySelector('tr[data-endpoint="a"] button[data-action="disable"]');
                b.scrollIntoView({block: "center"});
                const r = b.getBoundingClientRect();
                const x = r.left + r.width / 2, y = r.top + r.height / 2;
                return {x, y, enabled: !b.disabled, hit: document.elementFromPoint(x, y) === b};
            })()"#,
        )
        .await;
    assert_eq!(at["enabled"], true, "Disable must be clickable: {at}");
    assert_eq!(
        at["hit"], true,
        "the button is not on top at its centre: {at}"
    );
    page.click(at["x"].as_f64().expect("x"), at["y"].as_f64().expect("y"))
        .await;

    // The gateway switched it off...
    eventually_ok("the click to disable `a`", || async {
        let view = get(&gw, "/_ccgate/endpoints/a", &auth).await.json();
        if view["state"] == "disabled" && view["enabled"] == false {
            Ok(())
        } else {
            Err(view)
        }
    })
    .await;
    // ...and the page says so.
    page.wait_for("`a` disabled", &states_js(), |v| {
        v == &json!({"a": "disabled", "b": "healthy"})
    })
    .await;

    // Never a secret in the page.
    let html = page.eval("document.documentElement.outerHTML").await;
    let html = html.as_str().expect("html");
    assert!(!html.contains(TOKEN) && !html.contains(TOKEN_IN_URL));
    assert!(!html.contains("key-a") && !html.contains("key-b"));

    // 4. A screenshot of the whole page.
    let height = page
        .eval("Math.ceil(document.documentElement.scrollHeight)")
        .await
        .as_f64()
        .expect("height");
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": height.max(600.0), "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().expect("ihdr"));
    let tall = u32::from_be_bytes(png[20..24].try_into().expect("ihdr"));
    assert_eq!(width, 1280);
    assert!(tall >= 600, "screenshot only {tall} px tall");
    assert!(png.len() > 20_000, "screenshot suspiciously small");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    std::fs::create_dir_all(out.parent().expect("target dir")).expect("mkdir target");
    std::fs::write(&out, &png).expect("write screenshot");
    eprintln!("dashboard screenshot: {}", out.display());

    // Switching `a` off from the page sent it nothing: it saw the three good requests and the
    // failed one only.
    assert_eq!(a.count(), 4);
}

/// `{name: shown state}` for every endpoint row, as the user sees it.
fn states_js() -> String {
    r#"Object.fromEntries([...document.querySelectorAll('tr[data-endpoint]')].map(
        r => [r.dataset.endpoint, r.querySelector('.state').textContent.trim()]))"#
        .to_string()
}

/// Whether the browser test can run: fails loudly when Chromium is missing, unless told to skip.
fn browser_available() -> bool {
    if std::env::var("CCGATE_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: CCGATE_SKIP_BROWSER_TESTS=1 (headless Chromium dashboard test)");
        return false;
    }
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install it with `apt-get install -y chromium` \
         (or set CCGATE_SKIP_BROWSER_TESTS=1 to skip the browser test)"
    );
    true
}

/// A headless Chromium with its own profile directory; killed on drop.
struct Browser {
    child: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("log file");
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--no-proxy-server",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
        Self { child, profile }
    }

    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits for `DevToolsActivePort`, connects to the browser and attaches to a new page.
    async fn connect(&self) -> Cdp {
        let file: PathBuf = self.profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + DEADLINE;
        let (port, path) = loop {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                break (port.trim().to_string(), path.trim().to_string());
            }
            assert!(
                Instant::now() < deadline,
                "Chromium wrote no DevToolsActivePort within {DEADLINE:?}; its log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("DevTools websocket {url}: {e}"));
        let mut cdp = Cdp {
            ws,
            next_id: 0,
            session: None,
        };
        let target = cdp
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = cdp
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        cdp.session = Some(
            attached["sessionId"]
                .as_str()
                .expect("sessionId")
                .to_string(),
        );
        cdp
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal Chrome DevTools Protocol client: one command at a time, events ignored.
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// The page session (flat mode) that commands go to, once attached.
    session: Option<String>,
}

impl Cdp {
    /// Sends a command and returns its `result`; panics on a protocol error or after [`DEADLINE`].
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap_or_else(|e| panic!("{method}: send: {e}"));
        let deadline = Instant::now() + DEADLINE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer within {DEADLINE:?}"));
            let frame = next
                .unwrap_or_else(|| panic!("{method}: DevTools connection closed"))
                .unwrap_or_else(|e| panic!("{method}: {e}"));
            let Message::Text(text) = frame else {
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools sent JSON");
            if v["id"] != id {
                continue; // an event, or an answer to nobody
            }
            if let Some(err) = v.get("error") {
                panic!("{method}: {err}");
            }
            return v["result"].clone();
        }
    }

    /// Evaluates `expr` in the page; `Err` carries the page's exception.
    async fn try_eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.to_string()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    async fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("evaluating `{expr}`: {e}"))
    }

    /// Polls `expr` until `done` accepts its value; fails after [`DEADLINE`] showing the last
    /// value. (A method on `&mut self`, so it polls by itself rather than through
    /// `support::wait`.)
    async fn wait_for(&mut self, what: &str, expr: &str, done: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let last = self.try_eval(expr).await;
            if last.as_ref().is_ok_and(&done) {
                return;
            }
            if Instant::now() >= deadline {
                let banner = self
                    .try_eval("document.body && document.body.innerText.slice(0, 600)")
                    .await;
                panic!("page never showed {what}: last {last:?}; page text: {banner:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A left click at `(x, y)` in CSS pixels, as a mouse would do it.
    async fn click(&mut self, x: f64, y: f64) {
        self.call(
            "Input.dispatchMouseEvent",
            json!({"type": "mouseMoved", "x": x, "y": y}),
        )
        .await;
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "buttons": 1, "clickCount": 1}),
            )
            .await;
        }
    }
}

/// Standard base64 (the screenshot's encoding), padding optional.
fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:#x}"),
        }
    }
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | val(c) << (18 - 6 * i));
        let take = chunk.len() - 1; // 2 chars → 1 byte, 3 → 2, 4 → 3
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    out
}
