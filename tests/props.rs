//! Property tests of every parser that reads bytes from the network or from files (issue #12):
//! the SSE scanner, `json_top`, the usage reader, `retry-after` parsing, the config loader, the
//! Claude `settings.json` editor and the model rewrite. Each must never panic on arbitrary input;
//! where a second, full parser exists, they must agree. The `fuzz/` crate runs the same checks
//! under libFuzzer for longer (see fuzz/README.md); inputs it found are pinned at the end.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

use ccgate::config::{Config, StorageConfig};
use ccgate::health::classify::retry_after;
use ccgate::wire::json_top;
use ccgate::wire::sse::{SseScanner, error_event};
use ccgate::wire::usage::{self, TokenUpdate, Usage};

// ---------------------------------------------------------------------------------------------
// Generators

/// Strings that exercise escapes: quotes, backslashes, control characters, multi-byte UTF-8, and
/// the bytes `json_top` treats as structure.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        3 => proptest::collection::vec(
            prop_oneof![
                Just("\"".to_string()),
                Just("\\".to_string()),
                Just("\\\"".to_string()),
                Just("{".to_string()),
                Just("}".to_string()),
                Just("[".to_string()),
                Just("]".to_string()),
                Just(",".to_string()),
                Just(":".to_string()),
                Just("\n".to_string()),
                Just("\u{0}".to_string()),
                Just("\u{1f}".to_string()),
                Just("é✓😀".to_string()),
                Just("\u{2028}".to_string()),
                Just("metadata".to_string()),
                Just(" ".to_string()),
            ],
            0..8,
        )
        .prop_map(|parts| parts.concat()),
        1 => Just(String::new()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(vec!["metadata", "model", "usage", "a", "b", "x y", "q\"", "z\\"])
            .prop_map(String::from),
        1 => tricky_string(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Only floats that survive serde_json's own round trip (it parses floats to within an ulp
        // unless its `float_roundtrip` feature is on): what is tested here is not serde_json.
        any::<f64>().prop_filter_map("finite and round-tripping", |f| {
            let v = Value::Number(Number::from_f64(f)?);
            (serde_json::from_str::<Value>(&v.to_string()).ok()? == v).then_some(v)
        }),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        tricky_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::vec((key(), json_value()), 0..8).prop_map(|kv| kv.into_iter().collect())
}

/// The text of `obj` in one of three layouts: compact, pretty, or with extra whitespace around
/// every top-level token.
fn render(obj: &Map<String, Value>, layout: u8) -> String {
    match layout % 3 {
        0 => serde_json::to_string(obj).expect("render"),
        1 => serde_json::to_string_pretty(obj).expect("render"),
        _ => {
            let members: Vec<String> = obj
                .iter()
                .map(|(k, v)| {
                    format!(
                        " \t{} \r\n: {} ",
                        serde_json::to_string(k).expect("key"),
                        serde_json::to_string(v).expect("value")
                    )
                })
                .collect();
            format!("\n {{ {} }} \n", members.join(" ,\n"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SSE scanner

fn scan<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> SseScanner {
    let mut sc = SseScanner::new();
    for c in chunks {
        sc.feed(c);
    }
    sc
}

/// Cuts `bytes` at the given sizes (cycled; each at least 1).
fn cut<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < bytes.len() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .copied()
            .unwrap_or(1)
            .max(1);
        let end = (at + size).min(bytes.len());
        out.push(&bytes[at..end]);
        at = end;
        i += 1;
    }
    out
}

fn assert_split_invariant(stream: &[u8], sizes: &[usize]) -> Result<(), TestCaseError> {
    let whole = scan([stream]);
    let split = scan(cut(stream, sizes));
    prop_assert_eq!(split.facts(), whole.facts());
    prop_assert_eq!(split.usage(), whole.usage());
    let bytewise = scan(stream.chunks(1));
    prop_assert_eq!(bytewise.facts(), whole.facts());
    prop_assert_eq!(bytewise.usage(), whole.usage());
    Ok(())
}

/// One SSE line (without its terminator), shaped like an Anthropic stream or not at all.
fn sse_line() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "ping",
        "error",
        "",
    ]);
    let data = prop_oneof![
        Just(r#"{"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":5,"output_tokens":1}}}"#.to_string()),
        Just(r#"{"type":"message_delta","usage":{"output_tokens":9}}"#.to_string()),
        Just(r#"{"type":"message_stop"}"#.to_string()),
        Just(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#.to_string()),
        Just(r#"{"type":"content_block_delta","delta":{"text":"hé"}}"#.to_string()),
        json_value().prop_map(|v| v.to_string()),
        "[^\r\n]{0,20}",
    ];
    prop_oneof![
        3 => name.prop_map(|n| format!("event: {n}")),
        4 => data.prop_map(|d| format!("data: {d}")),
        1 => "[^\r\n]{0,12}".prop_map(|c| format!(":{c}")),
        3 => Just(String::new()),
        1 => "[^\r\n]{0,12}",
    ]
}

fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        (sse_line(), prop::sample::select(vec!["\n", "\r\n"])),
        0..24,
    )
    .prop_map(|lines| {
        lines
            .into_iter()
            .flat_map(|(l, end)| format!("{l}{end}").into_bytes())
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sse_arbitrary_bytes_any_chunking(
        stream in proptest::collection::vec(any::<u8>(), 0..512),
        sizes in proptest::collection::vec(1usize..64, 1..6),
    ) {
        assert_split_invariant(&stream, &sizes)?;
    }

    #[test]
    fn sse_shaped_streams_any_chunking(
        stream in sse_stream(),
        sizes in proptest::collection::vec(1usize..64, 1..6),
    ) {
        assert_split_invariant(&stream, &sizes)?;
        let facts = scan([&stream[..]]).facts().clone();
        let newlines = stream.iter().filter(|&&b| b == b'\n').count() as u64;
        prop_assert!(facts.events <= newlines);
    }

    #[test]
    fn sse_error_event_reads_back(ty in "[a-z_]{1,24}", message in tricky_string()) {
        let bytes = error_event(&ty, &message);
        let sc = scan(cut(&bytes, &[3, 1, 7]));
        prop_assert_eq!(sc.facts().error.clone(), Some((ty, message)));
        prop_assert_eq!(sc.facts().events, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// json_top

/// The object rebuilt from what `json_top` found (names decoded, values parsed), in document order.
fn rebuild(text: &[u8]) -> Result<Map<String, Value>, String> {
    let found: Vec<(&[u8], &[u8])> = json_top::members(text).collect();
    let mut map = Map::new();
    for (name, raw) in found.into_iter().rev() {
        let quoted = [&b"\""[..], name, b"\""].concat();
        let name: String = serde_json::from_slice(&quoted)
            .map_err(|e| format!("name {:?}: {e}", String::from_utf8_lossy(&quoted)))?;
        let value: Value = serde_json::from_slice(raw)
            .map_err(|e| format!("value of {name:?} {:?}: {e}", String::from_utf8_lossy(raw)))?;
        map.insert(name, value);
    }
    Ok(map)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn json_top_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        for (_, v) in json_top::members(&bytes) {
            let _ = json_top::as_u64(v);
            let _ = json_top::as_str(v);
        }
        let _ = json_top::member(&bytes, b"metadata");
    }

    #[test]
    fn json_top_never_panics_on_json_like_text(
        parts in proptest::collection::vec(
            prop_oneof![Just("{"), Just("}"), Just("["), Just("]"), Just("\""), Just("\\"),
                        Just(","), Just(":"), Just(" "), Just("a"), Just("1")],
            0..64,
        ),
    ) {
        let text = parts.concat();
        let _ = json_top::members(text.as_bytes()).count();
        let _ = json_top::member(text.as_bytes(), b"a");
        // Whatever serde_json accepts as an object, json_top reads the same.
        if let Ok(Value::Object(want)) = serde_json::from_str::<Value>(&text) {
            prop_assert_eq!(rebuild(text.as_bytes()), Ok(want));
        }
    }

    #[test]
    fn json_top_agrees_with_serde_json(obj in json_object(), layout in any::<u8>()) {
        let text = render(&obj, layout);
        // The generated text is what serde_json reads back.
        let full: Value = serde_json::from_str(&text).expect("valid JSON");
        prop_assert_eq!(&full, &Value::Object(obj.clone()));
        prop_assert_eq!(rebuild(text.as_bytes()), Ok(obj.clone()));
        for (k, v) in &obj {
            // `member` matches names as a parser reads them, whatever escapes spell them.
            let raw = json_top::member(text.as_bytes(), k.as_bytes());
            let raw = raw.map(|r| serde_json::from_slice::<Value>(r).expect("raw value"));
            prop_assert_eq!(raw.as_ref(), Some(v), "member {}", k);
            let raw = json_top::member(text.as_bytes(), k.as_bytes()).expect("found");
            match v {
                Value::String(s) => {
                    let got = json_top::as_str(raw);
                    prop_assert_eq!(got.as_deref(), Some(s.as_str()))
                }
                _ => prop_assert_eq!(json_top::as_str(raw), None),
            }
            if let Some(n) = v.as_u64() {
                prop_assert_eq!(json_top::as_u64(raw), Some(n));
            }
        }
        prop_assert_eq!(json_top::member(text.as_bytes(), b"no such key"), None);
    }

    #[test]
    fn json_top_finds_nothing_in_non_objects(v in json_value()) {
        prop_assume!(!v.is_object());
        prop_assert_eq!(json_top::members(v.to_string().as_bytes()).count(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Usage reader

fn messages_body() -> impl Strategy<Value = (Map<String, Value>, Option<String>, Usage)> {
    (
        json_object(),
        proptest::option::of(tricky_string()),
        any::<(u32, u32, u32, u32)>(),
        any::<u8>(),
    )
        .prop_map(|(mut top, model, (i, o, cw, cr), order)| {
            top.shift_remove("usage");
            top.shift_remove("model");
            let usage = serde_json::json!({
                "input_tokens": i,
                "cache_creation_input_tokens": cw,
                "cache_read_input_tokens": cr,
                "output_tokens": o,
                "server_tool_use": {"input_tokens": 999},
            });
            if let Some(m) = &model {
                top.insert("model".into(), Value::String(m.clone()));
            }
            top.insert("usage".into(), usage);
            // Move `usage` around so it is not always last.
            let mut members: Vec<(String, Value)> = top.into_iter().collect();
            let last = members.pop().expect("usage");
            let at = usize::from(order) % (members.len() + 1);
            members.insert(at, last);
            let top: Map<String, Value> = members.into_iter().collect();
            let want = Usage {
                input: u64::from(i),
                output: u64::from(o),
                cache_creation: u64::from(cw),
                cache_read: u64::from(cr),
                ..Default::default()
            };
            (top, model, want)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn usage_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = usage::from_json_body(&bytes);
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            Usage::default().apply(&TokenUpdate::from_value(&v));
        }
    }

    #[test]
    fn usage_reader_reads_generated_answers((top, model, want) in messages_body(), layout in any::<u8>()) {
        let text = render(&top, layout);
        let got = usage::from_json_body(text.as_bytes()).expect("usage");
        prop_assert_eq!(got.usage, want);
        prop_assert_eq!(got.model, model);
    }
}

// ---------------------------------------------------------------------------------------------
// retry-after / anthropic-ratelimit-*-reset

fn header_value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        "-?[0-9]{0,25}(\\.[0-9]{0,10})?([eE][-+]?[0-9]{1,4})?",
        Just("inf".to_string()),
        Just("NaN".to_string()),
        Just("-0".to_string()),
        "(Mon|Tue|Sun), [0-9]{1,2} (Jan|Feb|Nov) [0-9]{1,5} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
        "[0-9]{1,5}-[0-9]{1,2}-[0-9]{1,2}[T ][0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\\.[0-9]{0,12})?(Z|[+-][0-9]{2}:[0-9]{2})?",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn retry_after_is_bounded_and_never_panics(
        values in proptest::collection::vec(
            (prop::sample::select(vec![
                "retry-after",
                "retry-after-ms",
                "anthropic-ratelimit-requests-reset",
                "anthropic-ratelimit-tokens-reset",
                "anthropic-ratelimit-input-tokens-reset",
            ]), header_value_text()),
            0..5,
        ),
        raw in proptest::collection::vec(any::<u8>(), 0..40),
        now_secs in 0u64..8_000_000_000,
    ) {
        let mut headers = HeaderMap::new();
        for (name, value) in &values {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.append(*name, v);
            }
        }
        if let Ok(v) = HeaderValue::from_bytes(&raw) {
            headers.append("retry-after", v);
        }
        let now = UNIX_EPOCH + Duration::from_secs(now_secs);
        if let Some(d) = retry_after(&headers, now) {
            prop_assert!(d <= Duration::from_secs(86_400), "{:?}", d);
        }
    }

    #[test]
    fn retry_after_reads_whole_seconds_and_millis(secs in 0u64..200_000, ms in 0u64..200_000_000) {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from(secs));
        let day = Duration::from_secs(86_400);
        prop_assert_eq!(
            retry_after(&headers, SystemTime::UNIX_EPOCH),
            Some(Duration::from_secs(secs).min(day))
        );
        headers.insert("retry-after-ms", HeaderValue::from(ms));
        let want = Duration::from_secs(secs).max(Duration::from_millis(ms)).min(day);
        let got = retry_after(&headers, SystemTime::UNIX_EPOCH).expect("a wait");
        // `retry-after-ms` goes through f64 seconds: allow a nanosecond of rounding.
        prop_assert!(got.abs_diff(want) <= Duration::from_nanos(1), "{:?} vs {:?}", got, want);
    }
}

// ---------------------------------------------------------------------------------------------
// Config loader

fn no_env(_: &str) -> Option<String> {
    None
}

fn every_env(name: &str) -> Option<String> {
    Some(format!("value-of-{name}"))
}

/// Lines that look like a ccgate config: real table headers and keys with values of every TOML
/// type, plus lines that are not TOML at all.
fn toml_ish() -> impl Strategy<Value = String> {
    let header = prop::sample::select(vec![
        "[server]",
        "[timeouts]",
        "[health]",
        "[affinity]",
        "[retry_budget]",
        "[storage]",
        "[[endpoints]]",
        "[endpoints.model_map]",
        "[[endpoints]",
        "[bogus]",
    ])
    .prop_map(String::from);
    let key = prop::sample::select(vec![
        "listen",
        "access_token",
        "access_token_env",
        "strategy",
        "max_body_bytes",
        "shutdown_timeout",
        "max_attempts",
        "workers",
        "connect",
        "first_byte",
        "idle",
        "enabled",
        "ttl",
        "max_sessions",
        "ratio",
        "min_per_second",
        "window",
        "path",
        "flush_interval",
        "failure_threshold",
        "probe_interval",
        "probe_max_interval",
        "probe_timeout",
        "probe_mode",
        "probe_model",
        "rate_limit_cooldown",
        "name",
        "base_url",
        "api_key",
        "auth_token",
        "api_key_env",
        "auth_token_env",
        "priority",
        "weight",
        "model_map",
        "probe",
        "\"claude-opus-4\"",
        "unknown",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        prop::sample::select(vec![
            "\"https://api.example.com\"",
            "\"http://127.0.0.1:7860/v1/\"",
            "\"http://user@host\"",
            "\"https://x?q=1\"",
            "\"0.0.0.0:7860\"",
            "\"[::1]:0\"",
            "\"30s\"",
            "\"0s\"",
            "\"99999999999999999999h\"",
            "\"priority\"",
            "\"weighted\"",
            "\"/nonexistent/ca.pem\"",
            "{ \"claude-opus-4\" = \"claude-sonnet-4\" }",
            "[1, 2]",
            "\"\"",
        ])
        .prop_map(String::from),
        "\"[ -!#-\\[\\]-~é]{0,16}\"",
    ];
    let line = prop_oneof![
        2 => header,
        6 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "[ -~\t]{0,30}",
        1 => Just(String::new()),
    ];
    proptest::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
}

fn check_config(text: &str) -> Result<(), TestCaseError> {
    for env in [&no_env as &dyn Fn(&str) -> Option<String>, &every_env] {
        match Config::from_toml(text, "props.toml", &env) {
            Ok(c) => prop_assert!(!c.endpoints.is_empty()),
            Err(e) => {
                prop_assert!(!e.problems.is_empty());
                let _ = e.to_string();
            }
        }
    }
    if let Err(e) = StorageConfig::from_toml(text, "props.toml") {
        prop_assert!(!e.problems.is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn config_loader_never_panics_on_toml_ish_text(text in toml_ish()) {
        check_config(&text)?;
    }

    #[test]
    fn config_loader_never_panics_on_any_text(text in any::<String>()) {
        check_config(&text)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Claude settings.json editor

proptest! {
    // Each case writes and renames a few files.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn settings_editor_never_panics_and_restores_bytes(
        contents in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (json_object(), any::<u8>()).prop_map(|(o, l)| render(&o, l).into_bytes()),
            json_value().prop_map(|v| v.to_string().into_bytes()),
        ],
        token in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = ccgate::cli::claude::Paths::in_dir(dir.path());
        std::fs::write(&paths.settings, &contents).expect("write");
        let token = token.then_some("tok");
        match ccgate::cli::claude::enable(
            &paths,
            "http://127.0.0.1:7860",
            token,
            ccgate::cli::claude::TokenVia::AuthToken,
        ) {
            Err(_) => {
                prop_assert_eq!(std::fs::read(&paths.settings).expect("read"), contents);
                prop_assert!(!paths.backup.exists() && !paths.record.exists());
            }
            Ok(_) => {
                let restored = ccgate::cli::claude::disable(&paths).expect("disable");
                prop_assert_eq!(restored, ccgate::cli::claude::Disabled::Restored);
                prop_assert_eq!(std::fs::read(&paths.settings).expect("read"), contents);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model rewrite

fn model_map() -> BTreeMap<String, String> {
    [("claude-opus-4", "claude-sonnet-4"), ("é\"\\", "x\u{1}y")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn model_rewrite_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let body = Bytes::from(bytes);
        let out = ccgate::wire::model_map::apply(&model_map(), &body);
        if out != body {
            let v: Value = serde_json::from_slice(&out).expect("a rewrite is JSON");
            prop_assert!(v.is_object());
        }
    }

    #[test]
    fn model_rewrite_changes_only_the_model(
        mut top in json_object(),
        model in prop::sample::select(vec!["claude-opus-4", "é\"\\", "other"]),
        layout in any::<u8>(),
    ) {
        top.insert("model".into(), Value::String(model.into()));
        let text = render(&top, layout);
        let body = Bytes::from(text.clone());
        let out = ccgate::wire::model_map::apply(&model_map(), &body);
        match model_map().get(model) {
            None => prop_assert_eq!(out, body),
            Some(target) => {
                let got: Value = serde_json::from_slice(&out).expect("valid JSON");
                let mut want = top.clone();
                want.insert("model".into(), Value::String(target.clone()));
                prop_assert_eq!(got, Value::Object(want));
                // Every byte outside the model's value is as it was.
                let raw = json_top::member(text.as_bytes(), b"model").expect("model");
                let start = raw.as_ptr() as usize - text.as_ptr() as usize;
                let quoted = serde_json::to_string(target).expect("target");
                let want_bytes = [&text.as_bytes()[..start], quoted.as_bytes(), &text.as_bytes()[start + raw.len()..]].concat();
                prop_assert_eq!(&out[..], &want_bytes[..]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs the fuzz targets found (fuzz/README.md), pinned.

/// fuzz `model_map`: a top-level JSON *array* after leading whitespace was read as the request
/// object (serde's derived `Deserialize` accepts a struct as a sequence), and its first element
/// rewritten as if it were `model`.
#[test]
fn model_rewrite_leaves_a_top_level_array_alone() {
    let map = [(String::new(), "empty".to_string())].into();
    for body in [&b"\r\r\t\t[\r\t\"\"]"[..], b" [\"\"]", b"\n[\"\", 1]"] {
        let body = Bytes::copy_from_slice(body);
        assert_eq!(ccgate::wire::model_map::apply(&map, &body), body);
    }
    let map = [("claude-opus-4".to_string(), "claude-sonnet-4".to_string())].into();
    let body = Bytes::from_static(b" [\"claude-opus-4\"]");
    assert_eq!(ccgate::wire::model_map::apply(&map, &body), body);
    // An object after whitespace is still rewritten.
    let body = Bytes::from_static(b" \n{\"model\":\"claude-opus-4\"}");
    assert_eq!(
        &ccgate::wire::model_map::apply(&map, &body)[..],
        b" \n{\"model\":\"claude-sonnet-4\"}"
    );
}

/// fuzz `usage_json`: a name repeated inside a JSON answer's `usage` object. A full parse (and the
/// stream path, `TokenUpdate`) keeps the last; `from_json_body` walks the members last
/// first, so it must take the first it sees of each (it used to keep the document's first).
#[test]
fn usage_reader_keeps_the_last_of_a_repeated_token_count() {
    let body = br#"{"usage":{"output_tokens":1,"output_tokens":2}}"#;
    let mut streamed = Usage::default();
    streamed.apply(&TokenUpdate::from_value(
        &serde_json::from_slice::<Value>(body).expect("json")["usage"],
    ));
    assert_eq!(streamed.output, 2);
    let read = usage::from_json_body(body).expect("usage");
    assert_eq!(read.usage.output, streamed.output);
}
