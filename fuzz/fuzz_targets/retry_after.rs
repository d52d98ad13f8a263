//! `retry-after`, `retry-after-ms` and `anthropic-ratelimit-*-reset` parsing on arbitrary header
//! values (and arbitrary statuses and SSE error types): never panics, a wait is never longer than a
//! day, and a 429's verdict carries exactly what `retry_after` reads.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ccgate::health::classify::{Outcome, Verdict, classify_sse_error, classify_status, retry_after};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 7] = [
    "retry-after",
    "retry-after-ms",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-reset",
    "anthropic-ratelimit--reset",
];

fuzz_target!(|data: &[u8]| {
    // Bytes 0..4: `now` in seconds after the epoch; bytes 4..6: a status; then header lines, each
    // `<name selector byte><value bytes>\n`.
    if data.len() < 6 {
        return;
    }
    let secs = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(secs) * 2);
    let status = u16::from_le_bytes([data[4], data[5]]);
    let mut headers = HeaderMap::new();
    for line in data[6..].split(|&b| b == b'\n') {
        let Some((&sel, value)) = line.split_first() else {
            continue;
        };
        let name = match NAMES.get(usize::from(sel) % (NAMES.len() + 1)) {
            Some(n) => HeaderName::from_static(n),
            // The last selector: the value names an arbitrary header `anthropic-ratelimit-<x>-reset`.
            None => match HeaderName::from_bytes(
                format!(
                    "anthropic-ratelimit-{}-reset",
                    String::from_utf8_lossy(value)
                )
                .as_bytes(),
            ) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }

    let wait = retry_after(&headers, now);
    if let Some(d) = wait {
        assert!(d <= Duration::from_secs(86_400), "{d:?} from {headers:?}");
    }
    if let Ok(status) = StatusCode::from_u16(status) {
        let verdict = classify_status(status, &headers, || now);
        if status.as_u16() == 429 {
            assert_eq!(verdict, Verdict::FailOver(Outcome::RateLimited(wait)));
        }
    }
    let _ = classify_status(StatusCode::TOO_MANY_REQUESTS, &headers, SystemTime::now);
    if let Ok(s) = std::str::from_utf8(&data[6..]) {
        let _ = classify_sse_error(s);
    }
});
