//! The per-endpoint model rewrite (`model_map::apply`) on arbitrary bodies: never panics; the body
//! is either returned unchanged or its last top-level `model` is a string the map names, and then
//! only that value is replaced, every byte before and after it left as it was; for a body that is
//! valid JSON the output is valid JSON equal to the input with `model` replaced.
#![no_main]

use std::collections::BTreeMap;

use bytes::Bytes;
use ccgate::wire::model_map;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let map: BTreeMap<String, String> = [
        ("claude-opus-4", "claude-sonnet-4"),
        ("a", "b\"\\\u{1}é"),
        ("", "empty"),
        ("x\"y", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let body = Bytes::copy_from_slice(data);
    let out = model_map::apply(&map, &body);
    if out == body {
        return;
    }
    let input: Value = match serde_json::from_slice(data) {
        Ok(v) => v,
        // The rewrite finds the model with json_top, which does not validate the rest of the
        // body, so a body a full parse rejects can still be rewritten (the upstream judges it).
        // It is rewritten in place: check the bytes only.
        Err(_) => {
            check_bytes(&map, data, &out);
            return;
        }
    };
    let Value::Object(mut input) = input else {
        panic!("rewrote a body that is not an object: {data:?}");
    };
    let model = input
        .get("model")
        .and_then(Value::as_str)
        .expect("rewrote without a model");
    let model = model.to_string();
    let target = map
        .get(&model)
        .expect("rewrote a model the map does not name")
        .clone();
    let output: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "output is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    input.insert("model".into(), Value::String(target));
    let input = Value::Object(input);
    assert_eq!(output, input);
    check_bytes(&map, data, &out);
});

/// Only the value changed: json_top (an independent reader) locates the model's raw text, and the
/// output is the input with exactly that span replaced by the quoted target.
fn check_bytes(map: &BTreeMap<String, String>, data: &[u8], out: &[u8]) {
    // A name written with escapes (`"m\u006fdel"`) is not one json_top matches.
    let Some(raw) = ccgate::wire::json_top::member(data, b"model") else {
        return;
    };
    let model: String = serde_json::from_slice(raw).expect("model is a string");
    let start = raw.as_ptr() as usize - data.as_ptr() as usize;
    let mut want = data[..start].to_vec();
    want.extend_from_slice(
        serde_json::to_string(&map[&model])
            .expect("target")
            .as_bytes(),
    );
    want.extend_from_slice(&data[start + raw.len()..]);
    assert_eq!(out, &want[..], "more than the model's value changed");
}
