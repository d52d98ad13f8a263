//! `json_top` on arbitrary bytes: never panics, and whenever `serde_json` accepts the input as an
//! object, the members it finds (names decoded, values parsed) make up exactly that object, each
//! found value is the text of a JSON value, and `member`/`as_u64`/`as_str` agree with serde_json.
#![no_main]

use ccgate::wire::json_top;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    // Never panics, on anything.
    let found: Vec<(&[u8], &[u8])> = json_top::members(data).collect();
    for (_, v) in &found {
        let _ = json_top::as_u64(v);
        let _ = json_top::as_str(v);
    }
    for key in [&b"metadata"[..], b"model", b"usage", b"a", b""] {
        let _ = json_top::member(data, key);
    }

    let Ok(Value::Object(want)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // Rebuild the object from what json_top found, in document order (it lists last first).
    let mut got = Map::new();
    for (name, raw) in found.iter().rev() {
        let mut quoted = Vec::with_capacity(name.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(name);
        quoted.push(b'"');
        let name: String = serde_json::from_slice(&quoted)
            .unwrap_or_else(|e| panic!("member name {quoted:?} is not a JSON string: {e}"));
        let value: Value = serde_json::from_slice(raw)
            .unwrap_or_else(|e| panic!("member {name:?}: {raw:?} is not a JSON value: {e}"));

        // The scalar readers agree with serde_json.
        match (&value, json_top::as_u64(raw)) {
            (v, Some(n)) => assert_eq!(v.as_u64(), Some(n), "as_u64 {raw:?}"),
            (Value::Number(num), None) => assert!(
                num.as_u64().is_none() || raw.iter().any(|b| !b.is_ascii_digit()),
                "as_u64 missed {raw:?}"
            ),
            _ => {}
        }
        match (&value, json_top::as_str(raw)) {
            (Value::String(s), Some(t)) => assert_eq!(s.as_str(), &*t, "as_str {raw:?}"),
            (Value::String(s), None) => panic!("as_str missed {s:?} in {raw:?}"),
            (_, Some(t)) => panic!("as_str read {t:?} from a non-string {raw:?}"),
            (_, None) => {}
        }
        got.insert(name, value);
    }
    assert_eq!(
        got, want,
        "json_top's members differ from serde_json's object"
    );

    // `member` returns the last member whose name reads as the key (escapes decoded).
    for key in [&b"metadata"[..], b"model", b"stream", b"a"] {
        let last = found
            .iter()
            .find(|(n, _)| json_top::name_is(n, key))
            .map(|(_, v)| *v);
        assert_eq!(json_top::member(data, key), last);
        let decoded = last.map(|raw| serde_json::from_slice::<Value>(raw).expect("a value"));
        let key = std::str::from_utf8(key).expect("ASCII");
        assert_eq!(decoded.as_ref(), want.get(key), "member {key:?}");
    }
});
