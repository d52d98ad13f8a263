//! The one-parse reader of non-streaming answers (`usage::read_json_answer`) on arbitrary bytes:
//! never panics, accepts every body `serde_json` parses as a value, and reads the same `model` and
//! `usage` a full parse gives (`TokenUpdate::from_value`, applied field by field as streams are). The SSE event reader
//! (`usage::EventData::read`) is held to the same: wherever a full parse succeeds, it reads the
//! facts `EventData::from_value` reads out of the tree.
#![no_main]

use ccgate::wire::usage::{self, MessageUsage, TokenUpdate, Usage};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let got = usage::read_json_answer(data);
    let full = serde_json::from_slice::<Value>(data);
    // The values it steps over are only validated (a number beyond f64's range is still JSON),
    // so it may accept more than a full parse, never less.
    assert!(full.is_err() || got.is_ok());
    assert_eq!(usage::from_json_body(data), got.as_ref().ok().cloned().flatten());

    // The stream reader's field-by-field update never panics on any JSON either.
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        let mut u = Usage::default();
        u.apply(&TokenUpdate::from_value(&v));
        if let Some(inner) = v.get("usage") {
            u.apply(&TokenUpdate::from_value(inner));
        }
    }

    if let Ok(tree) = &full {
        let event = usage::EventData::read(data).ok();
        assert_eq!(event, Some(usage::EventData::from_value(tree)));
    }

    let Ok(Value::Object(top)) = full else {
        return;
    };
    let want = match top.get("usage") {
        Some(u @ Value::Object(_)) => {
            let mut usage = Usage::default();
            usage.apply(&TokenUpdate::from_value(u));
            Some(MessageUsage {
                model: top.get("model").and_then(Value::as_str).map(String::from),
                usage,
            })
        }
        _ => None,
    };
    assert_eq!(got.ok().flatten(), want);
});
