//! Per-endpoint `model_map`: rewrite the request's top-level `model` for one endpoint, leaving every
//! other byte of the body as it was (prompt caching keys on the exact bytes).

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
}

/// The body to send to an endpoint with this `model_map`.
pub fn apply(map: &BTreeMap<String, String>, body: &Bytes) -> Bytes {
    if map.is_empty() || body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return body.clone();
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return body.clone();
    };
    let Ok(top) = serde_json::from_str::<Top<'_>>(text) else {
        return body.clone();
    };
    let Some(raw) = top.model else {
        return body.clone();
    };
    let Ok(model) = serde_json::from_str::<String>(raw.get()) else {
        return body.clone();
    };
    let Some(target) = map.get(&model) else {
        return body.clone();
    };
    // `raw` borrows from `text`, so its position in the body is the pointer difference.
    let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
    let end = start + raw.get().len();
    let replacement = serde_json::to_string(target).unwrap_or_else(|_| raw.get().to_string());
    let mut out = BytesMut::with_capacity(body.len() + replacement.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(replacement.as_bytes());
    out.extend_from_slice(&body[end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> BTreeMap<String, String> {
        [("claude-opus-4".to_string(), "claude-sonnet-4".to_string())].into()
    }

    #[test]
    fn rewrites_only_the_model() {
        let body = Bytes::from_static(br#"{ "max_tokens":5,"model" :  "claude-opus-4" ,"metadata":{"model":"claude-opus-4"}}"#);
        let out = apply(&map(), &body);
        assert_eq!(&out[..], br#"{ "max_tokens":5,"model" :  "claude-sonnet-4" ,"metadata":{"model":"claude-opus-4"}}"#);
    }

    #[test]
    fn leaves_everything_else_alone() {
        for body in [
            &br#"{"model":"other"}"#[..],
            b"not json",
            b"",
            br#"{"model":5}"#,
            br#"[1]"#,
        ] {
            let b = Bytes::copy_from_slice(body);
            assert_eq!(apply(&map(), &b), b);
        }
        let b = Bytes::from_static(br#"{"model":"claude-opus-4"}"#);
        assert_eq!(apply(&BTreeMap::new(), &b), b);
    }
}
