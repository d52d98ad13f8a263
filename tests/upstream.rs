//! The upstream client's connection pool, against the mock upstream: connections are reused once
//! their answer was read, never while a stream still runs on them, not after the upstream closed
//! them, and not after idling [`IDLE_TIMEOUT`]; requests go out in origin form with `Host`.

mod support;

use std::time::Duration;

use bytes::Bytes;
use ccgate::config::Timeouts;
use ccgate::transport::replay::ReplayBody;
use ccgate::transport::upstream::{
    AnswerBody, IDLE_TIMEOUT, UpstreamClient, UpstreamError, build_client,
};
use http::{Request, Response};
use http_body_util::BodyExt;
use support::mock::{Gate, MockUpstream, Script, SseEvent};
use support::wait::{eventually, within};

fn client() -> UpstreamClient {
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        first_byte: Duration::from_secs(10),
        idle: Duration::from_secs(10),
    };
    build_client(None, &timeouts).unwrap_or_else(|e| panic!("{e}"))
}

fn post(url: &str) -> Request<ReplayBody> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(ReplayBody::from(Bytes::from_static(b"{\"model\":\"m\"}")))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A mock upstream, a client for it, and its Messages URL.
async fn messages_upstream() -> (MockUpstream, UpstreamClient, String) {
    let up = MockUpstream::start().await;
    let url = format!("{}/v1/messages", up.url());
    (up, client(), url)
}

/// A stream whose head has arrived and whose body is held at the returned gate after its first
/// event.
async fn held_stream(
    up: &MockUpstream,
    client: &UpstreamClient,
    url: &str,
) -> (Response<AnswerBody>, Gate) {
    let gate = Gate::new();
    up.push(Script::sse_events(SseEvent::message_stream(2)).gate_after(1, gate.clone()));
    let stream = within("the stream's headers", client.request(post(url)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    gate.wait_arrived(1).await;
    (stream, gate)
}

/// `n` exchanges at once, each on a task of its own; their statuses and bodies.
async fn concurrent_exchanges(client: &UpstreamClient, url: &str, n: usize) -> Vec<(u16, Bytes)> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.spawn(async move { exchange(&client, &url).await });
    }
    let mut done = Vec::with_capacity(n);
    while let Some(exchanged) = tasks.join_next().await {
        done.push(exchanged.unwrap_or_else(|e| panic!("{e}")));
    }
    done
}

/// Sends one request and reads its whole body; the status and the body.
async fn exchange(client: &UpstreamClient, url: &str) -> (u16, Bytes) {
    within("an upstream exchange", async {
        let resp = client
            .request(post(url))
            .await
            .unwrap_or_else(|e| panic!("request to {url}: {e}"));
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("body from {url}: {e}"))
            .to_bytes();
        (status, body)
    })
    .await
}

#[tokio::test]
async fn sequential_requests_share_one_connection_in_origin_form() {
    let up = MockUpstream::start().await;
    let client = client();
    let url = format!("{}/v1/messages?beta=true", up.url());
    for _ in 0..5 {
        let (status, body) = exchange(&client, &url).await;
        assert_eq!(status, 200);
        assert!(!body.is_empty());
    }
    assert_eq!(up.count(), 5);
    assert_eq!(up.connections_accepted(), 1, "the connection was reused");
    let last = up
        .last_request()
        .unwrap_or_else(|| panic!("no request recorded"));
    assert_eq!(last.path_and_query, "/v1/messages?beta=true");
    assert!(up.received().iter().all(|r| r.connection_id == 1));
    assert_eq!(last.header("host"), Some(up.addr().to_string().as_str()));
}

#[tokio::test]
async fn a_running_stream_keeps_its_connection_until_its_body_ends() {
    let (up, client, url) = messages_upstream().await;
    // The stream's headers arrive; its body is held at the gate.
    let (stream, gate) = held_stream(&up, &client, &url).await;
    // A request meanwhile needs a second connection: the first is busy.
    let (status, _) = exchange(&client, &url).await;
    assert_eq!(status, 200);
    assert_eq!(up.connections_accepted(), 2);

    gate.open();
    let body = within("the stream's body", stream.into_body().collect())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .to_bytes();
    assert!(body.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    // Both connections are back in the pool, and two requests at once use them both.
    eventually("both connections idle", || async {
        client.idle_connections() == 2
    })
    .await;
    let (a, b) = tokio::join!(exchange(&client, &url), exchange(&client, &url));
    assert_eq!((a.0, b.0), (200, 200));
    assert_eq!(up.connections_accepted(), 2);
}

#[tokio::test]
async fn a_stream_dropped_before_its_end_gives_back_no_connection() {
    let (up, client, url) = messages_upstream().await;
    let (stream, gate) = held_stream(&up, &client, &url).await;
    // The client goes away mid-stream: hyper closes that connection, so it must not be pooled.
    drop(stream);
    gate.open();
    eventually("the dropped stream's connection closed", || async {
        up.connections_ended() == 1
    })
    .await;
    assert_eq!(client.idle_connections(), 0);
    let (status, _) = exchange(&client, &url).await;
    assert_eq!(status, 200);
    assert_eq!(
        up.connections_accepted(),
        2,
        "a new connection, not the dropped one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_read_to_their_end_reuse_their_connections() {
    let (up, client, url) = messages_upstream().await;
    const C: usize = 8;
    for _ in 0..4 {
        for _ in 0..C {
            up.push(Script::sse_events(SseEvent::message_stream(3)));
        }
        for (status, body) in concurrent_exchanges(&client, &url, C).await {
            assert_eq!(status, 200);
            assert!(body.ends_with(b"data: {\"type\":\"message_stop\"}\n\n"));
        }
    }
    assert_eq!(up.count(), 4 * C);
    // Each stream handed its connection back at its end: the later rounds opened none.
    assert!(
        up.connections_accepted() <= C as u64,
        "{} connections for {C} concurrent streams",
        up.connections_accepted()
    );
}

#[tokio::test]
async fn connections_the_upstream_closes_are_never_a_failed_request() {
    // Every answer closes its connection without saying so: the next request either finds the
    // pooled connection closed or loses the race to the close; both must end in a new
    // connection, never in an error.
    let up = MockUpstream::start().await;
    up.set_default(Script::json_ok().close_silently());
    let client = client();
    let url = format!("{}/v1/messages", up.url());
    const N: usize = 200;
    for _ in 0..N {
        let (status, _) = exchange(&client, &url).await;
        assert_eq!(status, 200);
    }
    assert_eq!(up.count(), N, "every request reached the upstream once");
    assert_eq!(up.connections_accepted(), N as u64);
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_dropped_not_used() {
    let (up, client, url) = messages_upstream().await;
    let gate = Gate::new();
    up.push(Script::json_ok().close_at(gate.clone()));
    exchange(&client, &url).await;
    eventually("the connection back in the pool", || async {
        client.idle_connections() == 1
    })
    .await;
    gate.open();
    eventually("the close noticed", || async {
        client.idle_connections() == 0
    })
    .await;
    let (status, _) = exchange(&client, &url).await;
    assert_eq!(status, 200);
    assert_eq!(up.count(), 2);
    assert_eq!(up.connections_accepted(), 2);
}

#[tokio::test]
async fn concurrent_requests_return_every_connection_to_the_pool() {
    let (up, client, url) = messages_upstream().await;
    const C: usize = 16;
    for round in 0..3 {
        for (status, _) in concurrent_exchanges(&client, &url, C).await {
            assert_eq!(status, 200);
        }
        assert!(
            up.connections_accepted() <= C as u64,
            "round {round}: {} connections for {C} concurrent requests",
            up.connections_accepted()
        );
    }
    assert_eq!(up.count(), 3 * C);
}

#[tokio::test]
async fn a_client_refuses_an_origin_other_than_its_first() {
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);
    let client = client();
    exchange(&client, &format!("{}/v1/messages", a.url())).await;
    let other = within(
        "a request to another origin",
        client.request(post(&b.url())),
    )
    .await
    .map(|r| r.status());
    assert!(
        matches!(other, Err(UpstreamError::OtherOrigin { .. })),
        "{other:?}"
    );
    assert_eq!(b.count(), 0);
    assert_eq!(b.connections_accepted(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_connection_idle_past_the_timeout_is_not_reused() {
    let (up, client, url) = messages_upstream().await;
    exchange(&client, &url).await;
    tokio::time::advance(IDLE_TIMEOUT - Duration::from_secs(1)).await;
    exchange(&client, &url).await;
    assert_eq!(
        up.connections_accepted(),
        1,
        "reused within the idle timeout"
    );
    tokio::time::advance(IDLE_TIMEOUT).await;
    exchange(&client, &url).await;
    assert_eq!(up.connections_accepted(), 2, "a fresh connection after it");
}
