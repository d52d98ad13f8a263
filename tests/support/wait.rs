#![allow(dead_code)]
//! Bounded waits shared by every suite: one [`DEADLINE`] for anything that should happen
//! promptly, [`within`] for a future, and the `eventually*` polls for what a background task (the
//! prober, the storage writer, a reload) must do on its own. A hang becomes a clear failure
//! instead of a stuck test run; the deadline is only ever reached when a test fails.
//!
//! `mod support` suites reach it as `support::wait`; suites without it include it by path
//! (`#[path = "support/wait.rs"] mod wait;`). `support/process.rs` uses it as `crate::wait`.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Upper bound for anything that should happen promptly (a start, a request, an exit, a flush).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How often the `eventually*` helpers look again.
const POLL: Duration = Duration::from_millis(10);

/// `fut`, or a panic naming `what` after [`DEADLINE`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for {what}"))
}

/// Polls `check` until it returns `Ok`, and returns that value; after [`DEADLINE`] panics with
/// `what` and the last `Err` (the state that was seen instead).
pub async fn eventually_ok<T, E, F, Fut>(what: &str, mut check: F) -> T
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let until = Instant::now() + DEADLINE;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < until,
            "timed out after {DEADLINE:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it returns `Some`, and returns that value; panics after [`DEADLINE`].
pub async fn eventually_some<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_ok(what, || {
        let fut = check();
        async move { fut.await.ok_or("nothing yet") }
    })
    .await
}

/// Polls `check` until it holds; panics after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_ok(what, || {
        let fut = check();
        async move { if fut.await { Ok(()) } else { Err("not yet") } }
    })
    .await
}
