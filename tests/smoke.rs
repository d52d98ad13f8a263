//! Smoke test: one JSON and one streamed request through the real server.

mod support;

use support::gateway::{GatewayBuilder, TestGateway};
use support::mock::{MockUpstream, Script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_json_and_stream() {
    let up = MockUpstream::start().await;
    let gw = GatewayBuilder::new()
        .endpoint("a", &up.url(), "")
        .start()
        .await;
    let a = gw
        .post(
            "/v1/messages?beta=true",
            &[("x-api-key", "client-key")],
            &TestGateway::message_body(false),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("x-ccgate-endpoint"), Some("a"));
    up.set_default(Script::sse_ok(3));
    let a = gw
        .post("/v1/messages", &[], &TestGateway::message_body(true))
        .await;
    assert_eq!(a.status, 200);
    assert!(a.text().contains("message_stop"), "{}", a.text());
    gw.settle().await;
    let v = gw.endpoint_view("a").await;
    assert_eq!(v["total_requests"], 2);
    assert_eq!(v["successful_requests"], 2);
    let r = up.received();
    assert_eq!(r[0].header("x-api-key"), Some("key-a"));
    assert_eq!(r[0].path_and_query, "/v1/messages?beta=true");
    gw.shutdown().await;
}
