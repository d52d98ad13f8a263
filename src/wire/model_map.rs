//! Per-endpoint `model_map`: rewrite the request's top-level `model` for one endpoint, leaving every
//! other byte of the body as it was (prompt caching keys on the exact bytes).

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use crate::wire::json_top;

/// The body to send to an endpoint with this `model_map`. The `model` rewritten is the one
/// routing read: the body's last top-level `model` member (as a full parse keeps the last of
/// repeated names), found by [`json_top::member`] without parsing the rest of the body.
pub fn apply(map: &BTreeMap<String, String>, body: &Bytes) -> Bytes {
    if map.is_empty() {
        return body.clone();
    }
    let Some(raw) = json_top::member(body, b"model") else {
        return body.clone();
    };
    // Read strictly (a small slice): what is rewritten is a valid JSON string.
    let Some(target) = serde_json::from_slice::<String>(raw)
        .ok()
        .and_then(|model| map.get(&model))
    else {
        return body.clone();
    };
    // `raw` borrows from `body`, so its position in the body is the pointer difference.
    let start = raw.as_ptr() as usize - body.as_ptr() as usize;
    let end = start + raw.len();
    let Ok(replacement) = serde_json::to_string(target) else {
        return body.clone();
    };
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

    #[test]
    fn a_repeated_model_rewrites_the_last_the_one_routing_reads() {
        for (body, want) in [
            (
                &br#"{"model":"claude-opus-4","model":"claude-opus-4"}"#[..],
                &br#"{"model":"claude-opus-4","model":"claude-sonnet-4"}"#[..],
            ),
            (
                br#"{"model":"other","max_tokens":5,"model":"claude-opus-4"}"#,
                br#"{"model":"other","max_tokens":5,"model":"claude-sonnet-4"}"#,
            ),
            (
                br#"{"model":"claude-opus-4","model":"other"}"#,
                br#"{"model":"claude-opus-4","model":"other"}"#,
            ),
        ] {
            let out = apply(&map(), &Bytes::copy_from_slice(body));
            assert_eq!(&out[..], want, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn an_escaped_model_is_read_and_written_as_json() {
        let body = Bytes::from_static(br#"{"model":"claude-opus-4","stream":true}"#);
        let out = apply(&map(), &body);
        assert_eq!(&out[..], br#"{"model":"claude-sonnet-4","stream":true}"#);
    }
}
