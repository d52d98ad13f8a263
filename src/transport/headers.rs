//! Header maps walked and edited line by line, in order: relays may read the order of a client's
//! headers as part of its fingerprint, and `HeaderMap::remove` fills the gap it leaves with the
//! last header.

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Removes every header `gone` picks, keeping the others in their order. Nothing is rebuilt when
/// nothing goes.
pub fn remove_in_order(headers: &mut HeaderMap, gone: impl Fn(&HeaderName) -> bool) {
    replace_in_order(headers, gone, None);
}

/// Removes every header `gone` picks and puts `put` where the first of them was (appended when
/// none was there), keeping the others in their order. Nothing is rebuilt when nothing goes.
pub fn replace_in_order(
    headers: &mut HeaderMap,
    gone: impl Fn(&HeaderName) -> bool,
    mut put: Option<(HeaderName, HeaderValue)>,
) {
    if !headers.keys().any(&gone) {
        if let Some((name, value)) = put {
            headers.append(name, value);
        }
        return;
    }
    let mut kept = HeaderMap::with_capacity(headers.len());
    each_line(std::mem::take(headers), |name, value| {
        if !gone(name) {
            kept.append(name.clone(), value);
        } else if let Some((name, value)) = put.take() {
            kept.append(name, value);
        }
    });
    *headers = kept;
}

/// Every line of `headers` in order, each with its name (a `HeaderMap` names a header once, before
/// its first value).
pub fn each_line(headers: HeaderMap, mut line: impl FnMut(&HeaderName, HeaderValue)) {
    let mut current: Option<HeaderName> = None;
    for (name, value) in headers {
        if let Some(n) = name {
            current = Some(n);
        }
        if let Some(name) = &current {
            line(name, value);
        }
    }
}
