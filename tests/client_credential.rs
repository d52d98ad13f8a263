//! `credential = "client"`: an endpoint that forwards the client's own `authorization` /
//! `x-api-key` (a Claude Pro/Max OAuth login) with keyed endpoints as its failover; the access
//! token then travels in `x-ccgate-token`. Through the real server.

mod support;

use support::gateway::GatewayBuilder;
use support::mock::{MockUpstream, Script, SseEvent};

const OAUTH: &str = "sk-ant-oat01-client-own-login-0123456789";
const BETA: &str = "oauth-2025-04-20,claude-code-20250219";
const TOKEN: &str = "gateway-access-token-42";

fn client_headers<'a>() -> Vec<(&'a str, &'a str)> {
    vec![
        (
            "authorization",
            "Bearer sk-ant-oat01-client-own-login-0123456789",
        ),
        ("anthropic-beta", BETA),
        ("x-ccgate-token", TOKEN),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_own_login_goes_first_and_keyed_endpoints_are_its_failover() {
    let sub = MockUpstream::start().await;
    let keyed = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .server(&format!("access_token = \"{TOKEN}\""))
        .endpoint("sub", &sub.url(), "credential = \"client\"\npriority = 1")
        .endpoint("keyed", &keyed.url(), "priority = 2")
        .start()
        .await;
    let body = support::gateway::TestGateway::message_body(false);

    // The client's Bearer and beta flags reach the client-credential endpoint unchanged; the
    // access token does not.
    let r = gw.post("/v1/messages", &client_headers(), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ccgate-endpoint"), Some("sub"));
    let got = sub.last_request().expect("sub saw it");
    assert_eq!(
        got.header("authorization"),
        Some(&*format!("Bearer {OAUTH}"))
    );
    assert_eq!(got.header("anthropic-beta"), Some(BETA));
    assert_eq!(got.header("x-ccgate-token"), None);
    assert_eq!(got.header("x-api-key"), None);

    // Rate limited: fails over to the keyed endpoint, which gets its own key, not the client's
    // login nor its OAuth flag.
    sub.push(Script::rate_limited(60));
    let r = gw.post("/v1/messages", &client_headers(), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ccgate-endpoint"), Some("keyed"));
    let got = keyed.last_request().expect("keyed saw it");
    assert_eq!(got.header("x-api-key"), Some("key-keyed"));
    assert_eq!(got.header("authorization"), None);
    assert_eq!(got.header("anthropic-beta"), Some("claude-code-20250219"));
    gw.settle().await;

    // The old ways of presenting the access token still work for keyed endpoints.
    for (name, value) in [
        ("x-api-key", TOKEN.to_string()),
        ("authorization", format!("Bearer {TOKEN}")),
    ] {
        let r = gw.post("/v1/messages", &[(name, &*value)], &body).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(r.header("x-ccgate-endpoint"), Some("keyed"));
        let got = keyed.last_request().expect("keyed");
        assert_eq!(got.header("x-api-key"), Some("key-keyed"));
        assert_eq!(
            got.header("authorization"),
            None,
            "the token is not forwarded"
        );
    }
    // Without the token: refused.
    let r = gw
        .post(
            "/v1/messages",
            &[("authorization", &*format!("Bearer {OAUTH}"))],
            &body,
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text());

    // The client's credential is in no view (the admin views take `x-ccgate-token` too).
    let token = [("x-ccgate-token", TOKEN)];
    let all = gw
        .request(
            http::Method::GET,
            "/_ccgate/endpoints",
            &token,
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(all.status, 200, "{}", all.text());
    assert!(all.text().contains("\"cooling_down\""), "{}", all.text());
    assert!(!all.text().contains("oat01"), "{}", all.text());
    let metrics = gw
        .request(
            http::Method::GET,
            "/_ccgate/metrics",
            &token,
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(metrics.status, 200);
    assert!(!metrics.text().contains("oat01"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_login_is_the_callers_error_and_no_credential_skips_the_endpoint() {
    let sub = MockUpstream::start().await;
    let keyed = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint("sub", &sub.url(), "credential = \"client\"\npriority = 1")
        .endpoint("keyed", &keyed.url(), "priority = 2")
        .start()
        .await;
    let body = support::gateway::TestGateway::message_body(false);
    let login = [(
        "authorization",
        "Bearer sk-ant-oat01-client-own-login-0123456789",
    )];

    // 401 (echoing the refused token): relayed to the client, not failed over, a caller error,
    // the endpoint stays in rotation.
    sub.push(Script::error(
        401,
        "authentication_error",
        &format!("invalid token {OAUTH}"),
    ));
    let r = gw.post("/v1/messages", &login, &body).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("x-ccgate-endpoint"), Some("sub"));
    assert_eq!(keyed.count(), 0, "a refused login is not failed over");
    gw.settle().await;
    let view = gw.endpoint_view("sub").await;
    assert_eq!(view["state"], "healthy", "{view}");
    assert_eq!(view["caller_errors"], 1, "{view}");
    assert_eq!(view["endpoint_errors"], 0, "{view}");
    let r = gw.post("/v1/messages", &login, &body).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("sub"));

    // A 5xx whose message echoes the login: failed over, and the login is not kept.
    sub.push(Script::error(
        500,
        "api_error",
        &format!("broke on {OAUTH}"),
    ));
    let r = gw.post("/v1/messages", &login, &body).await;
    assert_eq!(r.header("x-ccgate-endpoint"), Some("keyed"));
    gw.settle().await;
    let view = gw.endpoint_view("sub").await;
    assert!(
        view["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("***")),
        "{view}"
    );
    assert!(!view.to_string().contains("oat01"), "{view}");

    // No credential of its own: the client-credential endpoint is skipped, not failed.
    let before = sub.count();
    let r = gw.post("/v1/messages", &[], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ccgate-endpoint"), Some("keyed"));
    assert_eq!(r.header("x-ccgate-attempts"), Some("1"));
    assert_eq!(sub.count(), before);
    gw.shutdown().await;
}

/// A stream that fails after its content began, with an `error` event echoing the client's
/// login: the client's stream ends with it (it is the client's own), but the endpoint's views
/// and the failure queue keep the message scrubbed (audit: the login was shown in `last_error`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_error_echoing_the_clients_login_is_kept_scrubbed() {
    let sub = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .health("failure_threshold = 1")
        .endpoint("sub", &sub.url(), "credential = \"client\"")
        .start()
        .await;
    let mut events = SseEvent::message_stream(2);
    events.truncate(4);
    events.push(SseEvent::error("api_error", &format!("boom {OAUTH}")));
    sub.push(Script::sse_events(events));
    let login = [("authorization", &*format!("Bearer {OAUTH}"))];
    let r = gw
        .post(
            "/v1/messages",
            &login,
            &support::gateway::TestGateway::message_body(true),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("event: error"), "{}", r.text());
    gw.settle().await;
    let view = gw.endpoint_view("sub").await;
    assert_eq!(view["state"], "ejected", "{view}");
    let message = view["last_error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("boom ***"), "{view}");
    for path in ["endpoints", "failure-queue", "events", "requests"] {
        let v = gw.admin(path).await;
        assert!(!v.to_string().contains("oat01"), "{path}: {v}");
    }
    gw.shutdown().await;
}

/// The access token never reaches a client-credential endpoint, in whichever and however many
/// headers the client sends it; a credential of the client's own next to it still goes through
/// (audit: a second header carrying the token was forwarded as the client's credential).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_token_in_several_headers_never_reaches_the_upstream() {
    let sub = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .server(&format!("access_token = \"{TOKEN}\""))
        .endpoint("sub", &sub.url(), "credential = \"client\"")
        .start()
        .await;
    let body = support::gateway::TestGateway::message_body(false);
    let bearer = format!("Bearer {TOKEN}");
    let own = format!("Bearer {OAUTH}");
    let cases: [Vec<(&str, &str)>; 5] = [
        vec![("x-ccgate-token", TOKEN), ("authorization", &bearer)],
        vec![("x-ccgate-token", TOKEN), ("x-api-key", TOKEN)],
        vec![("x-api-key", TOKEN), ("authorization", &bearer)],
        vec![("authorization", &bearer), ("x-api-key", TOKEN)],
        vec![("x-api-key", TOKEN), ("authorization", &own)],
    ];
    for (i, headers) in cases.iter().enumerate() {
        let r = gw.post("/v1/messages", headers, &body).await;
        let got = sub.last_request();
        let got = got.as_ref().map(|g| {
            ["authorization", "x-api-key", "x-ccgate-token"].map(|h| g.header(h).map(str::to_owned))
        });
        if i == 4 {
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(
                got,
                Some([Some(own.clone()), None, None]),
                "only the client's own login goes on"
            );
        } else {
            // Nothing of the client's own is left: the endpoint cannot be tried, and the client
            // is told it sent no credential of its own.
            assert_eq!(r.status, 401, "case {i}: {}", r.text());
            assert_eq!(
                sub.count(),
                0,
                "case {i}: the request reached the upstream: {got:?}"
            );
        }
    }
    for r in sub.received() {
        for h in ["authorization", "x-api-key", "x-ccgate-token"] {
            assert!(
                !r.header_all(h).iter().any(|v| v.contains(TOKEN)),
                "the token reached the upstream in {h}"
            );
        }
    }
}
