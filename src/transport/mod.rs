//! Upstream connections: per-endpoint, per-worker HTTP/1.1 pools over rustls. Knows nothing of
//! health, selection or the request handler.

pub mod headers;
pub mod replay;
pub mod socket;
pub mod upstream;

/// An error and its sources, joined, for logs and `last_error`. Errors from hyper and rustls name
/// hosts and causes, never headers, so no credential can appear here.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}
