//! Finding one top-level member of a JSON object without parsing the rest of it.
//!
//! Request bodies are large (Claude Code sends 70–120 KB and more) and ccgate needs one small member
//! of them (`metadata`, for the session key), which Claude Code writes near the end. Parsing the
//! whole body to reach it would cost a full pass over every message on every request; this module
//! walks the object's structure from its closing brace backwards instead, jumping over each string
//! with `memrchr`, and stops at the member it looks for.
//!
//! It only finds members; it does not validate. On malformed input it returns `None` or a slice
//! that the caller's parser then rejects, never panics, and never reads outside the input.

/// The raw bytes of the last top-level member `key` of the JSON object `json`, trimmed of
/// surrounding whitespace, or `None` when `json` is not an object or has no such member.
///
/// `key` is compared with the member's name as a parser reads it: a name spelled with escapes
/// (`"meta\u0064ata"`) matches too, as it does for the upstream.
pub fn member<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    members(json)
        .find(|&(k, _)| name_is(k, key))
        .map(|(_, v)| v)
}

/// Whether a member's name as written (`name`, between its quotes) reads as `key`: byte for byte
/// when it has no escapes (the common case, with no decoding), else once decoded. A name spelled
/// with escapes (`"str\u0065am"`) is the same member to every parser, and so to ccgate: read as
/// written, it would hide `stream` from the judge and `model` from routing.
pub fn name_is(name: &[u8], key: &[u8]) -> bool {
    // Escapes only lengthen a name: one no longer than the key reads as the key only as it is.
    // (Names are short: a plain loop, where a `memchr` call per name costs more than it saves.)
    if name.len() <= key.len() || !name.contains(&b'\\') {
        return name == key;
    }
    let mut quoted = Vec::with_capacity(name.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(name);
    quoted.push(b'"');
    as_str(&quoted).is_some_and(|decoded| decoded.as_bytes() == key)
}

/// The raw string value of `key` when it is the first member of the JSON object `json` (quotes
/// included, for [`as_str`]), found without walking the rest: Claude Code writes `model` first,
/// where [`member`]'s walk from the end would cross the whole body. `None` when the first member
/// is another one or its value is not a string.
pub fn first_string_member<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let skip_ws = |i: usize| {
        json[i.min(json.len())..]
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .map(|n| i + n)
    };
    let open = skip_ws(0)?;
    let name = skip_ws(open + 1)?;
    if json[open] != b'{' || json.get(name) != Some(&b'"') {
        return None;
    }
    let after_name = name + 1 + key.len();
    if json.get(name + 1..after_name)? != key || json.get(after_name) != Some(&b'"') {
        return None;
    }
    let colon = skip_ws(after_name + 1)?;
    let start = skip_ws(colon + 1)?;
    if json[colon] != b':' || json[start] != b'"' {
        return None;
    }
    let mut i = start + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
        if json[i] == b'"' {
            return Some(&json[start..=i]);
        }
        i += 2;
    }
}

/// The top-level members of the JSON object `json`, last first, as (name as written, raw value
/// trimmed of whitespace). Empty when `json` is not an object; stops early where it is malformed.
pub fn members(json: &[u8]) -> Members<'_> {
    let close = json.iter().rposition(|b| !b.is_ascii_whitespace());
    match close {
        Some(close) if json[close] == b'}' => Members {
            json,
            pos: close,
            value_end: close,
        },
        _ => Members {
            json,
            pos: 0,
            value_end: 0,
        },
    }
}

/// The bytes the walk acts on; every other byte (digits, letters, whitespace, `:`) is passed over.
static STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    let bytes = *b"\"{}[],";
    while i < bytes.len() {
        t[bytes[i] as usize] = true;
        i += 1;
    }
    t
};

/// Iterator of [`members`].
pub struct Members<'a> {
    json: &'a [u8],
    /// The walk has read everything from here on.
    pos: usize,
    /// The `,` or `}` that ends the top-level value the walk is inside of (or just passed).
    value_end: usize,
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let json = self.json;
        // Depth 1 is directly inside the top-level object; each call starts and ends there.
        let mut depth = 1usize;
        while self.pos > 0 {
            self.pos -= 1;
            let i = self.pos;
            let b = json[i];
            if !STRUCTURAL[usize::from(b)] {
                continue;
            }
            match b {
                b'"' => {
                    let Some(open) = string_start(json, i) else {
                        self.pos = 0;
                        return None;
                    };
                    self.pos = open;
                    if depth == 1 {
                        let after = i + 1 + skip_whitespace(&json[i + 1..]);
                        if json.get(after) == Some(&b':') {
                            let value = trim(&json[after + 1..self.value_end]);
                            return Some((&json[open + 1..i], value));
                        }
                    }
                }
                b'}' | b']' => depth += 1,
                b'{' | b'[' => {
                    depth -= 1;
                    if depth == 0 {
                        self.pos = 0;
                        return None;
                    }
                }
                b',' if depth == 1 => self.value_end = i,
                _ => {}
            }
        }
        None
    }
}

/// The number a raw JSON value holds, if it is a non-negative integer that fits.
pub fn as_u64(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() {
        return None;
    }
    raw.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))?
    })
}

/// The text of a raw JSON string value; `None` when it is not a string.
pub fn as_str(raw: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if memchr::memchr(b'\\', inner).is_none() {
        return std::str::from_utf8(inner)
            .ok()
            .map(std::borrow::Cow::Borrowed);
    }
    unescape_simple(inner)
        .or_else(|| serde_json::from_slice::<String>(raw).ok())
        .map(std::borrow::Cow::Owned)
}

/// The text of a string's inner bytes when it holds only the two-character escapes (`\"`, `\\`,
/// `\n`, ...), as Claude Code's JSON-encoded `metadata.user_id` does; `None` for anything a full
/// parse must judge (`\u` escapes, unknown escapes, control characters, invalid UTF-8), which then
/// goes to serde_json.
fn unescape_simple(inner: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(inner.len());
    let mut rest = inner;
    loop {
        // The run up to the next escape is copied whole.
        let at = memchr::memchr(b'\\', rest).unwrap_or(rest.len());
        let (run, tail) = rest.split_at(at);
        // An unescaped quote or a raw control character cannot be inside a JSON string. (A fold
        // without an early exit, so that the compiler checks many bytes at once.)
        if run
            .iter()
            .fold(false, |bad, &b| bad | (b == b'"') | (b < 0x20))
        {
            return None;
        }
        out.extend_from_slice(run);
        let [_, escape, tail @ ..] = tail else {
            // The end, or a lone backslash at the end.
            if tail.is_empty() {
                break;
            }
            return None;
        };
        out.push(match escape {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'n' => b'\n',
            b't' => b'\t',
            b'r' => b'\r',
            b'b' => 0x08,
            b'f' => 0x0c,
            _ => return None,
        });
        rest = tail;
    }
    String::from_utf8(out).ok()
}

/// The index of the quote opening the string whose closing quote is at `close`.
fn string_start(json: &[u8], close: usize) -> Option<usize> {
    let mut end = close;
    loop {
        let quote = memchr::memrchr(b'"', &json[..end])?;
        let backslashes = json[..quote]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if backslashes % 2 == 0 {
            return Some(quote);
        }
        end = quote;
    }
}

fn skip_whitespace(s: &[u8]) -> usize {
    s.iter().take_while(|b| b.is_ascii_whitespace()).count()
}

fn trim(s: &[u8]) -> &[u8] {
    let start = skip_whitespace(s);
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;

    #[test]
    fn the_first_string_member_is_found_only_when_it_is_first() {
        for (json, want) in [
            (
                &br#"{"model":"claude-x","messages":[]}"#[..],
                Some(&br#""claude-x""#[..]),
            ),
            (br#" { "model" : "a\"b" , "x": 1}"#, Some(br#""a\"b""#)),
            (br#"{"model":"a\\","x":1}"#, Some(br#""a\\""#)),
            (br#"{"max_tokens":1,"model":"claude-x"}"#, None),
            (br#"{"model":5}"#, None),
            (br#"{"modelx":"y"}"#, None),
            (br#"{"model":"unterminated"#, None),
            (br#"["model","x"]"#, None),
            (b"", None),
        ] {
            assert_eq!(
                first_string_member(json, b"model"),
                want,
                "{}",
                String::from_utf8_lossy(json)
            );
        }
        let raw = first_string_member(br#"{"model":"a\"b"}"#, b"model").expect("found");
        assert_eq!(as_str(raw).as_deref(), Some("a\"b"));
    }

    fn m<'a>(json: &'a str, key: &str) -> Option<&'a str> {
        member(json.as_bytes(), key.as_bytes()).map(|v| std::str::from_utf8(v).expect("test data"))
    }

    #[test]
    fn finds_top_level_members_only() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            (r#"{"a":1}"#, "a", Some("1")),
            (
                r#" { "a" : [1, {"b":2}] , "b" : "x,}" } "#,
                "b",
                Some(r#""x,}""#),
            ),
            (r#"{"a":[1,{"b":2}],"c":3}"#, "a", Some(r#"[1,{"b":2}]"#)),
            // A nested member of the same name is not the top-level one.
            (r#"{"x":{"metadata":1},"y":2}"#, "metadata", None),
            (
                r#"{"metadata":{"user_id":"u"},"x":{"metadata":1}}"#,
                "metadata",
                Some(r#"{"user_id":"u"}"#),
            ),
            // The name inside a string value is not a member.
            (r#"{"text":"\"metadata\": 5","n":1}"#, "metadata", None),
            (
                r#"{"text":"\"metadata\": 5"}"#,
                "text",
                Some(r#""\"metadata\": 5""#),
            ),
            // Escaped backslashes before a quote: the quote ends the string.
            (r#"{"a":"x\\","b":"y\\\"z"}"#, "a", Some(r#""x\\""#)),
            (r#"{"a":"x\\","b":"y\\\"z"}"#, "b", Some(r#""y\\\"z""#)),
            // Brackets inside strings do not count.
            (r#"{"a":"}]{[","b":{}}"#, "a", Some(r#""}]{[""#)),
            // The last of duplicate members.
            (r#"{"a":1,"a":2}"#, "a", Some("2")),
            (r#"{"a":1,"b":2}"#, "c", None),
            (r#"{"meta\u0064ata":1}"#, "metadata", Some("1")),
            (
                r#"{"stream":false,"str\u0065am":true}"#,
                "stream",
                Some("true"),
            ),
            (
                r#"{"str\u0065am":true,"stream":false}"#,
                "stream",
                Some("false"),
            ),
            (r#"{}"#, "a", None),
            // Not an object, or malformed: nothing, and no panic.
            (r#"[{"a":1}]"#, "a", None),
            (r#""a""#, "a", None),
            ("", "a", None),
            ("}", "a", None),
            (r#""}"#, "a", None),
            (r#"":1}"#, "", None),
            (r#""":1}"#, "", Some("1")),
            (r#"{"a":}"#, "a", Some("")),
            (r#"{"a"   :   "#, "a", None),
            (r#"x"a":1}"#, "a", Some("1")),
        ];
        for &(json, key, want) in cases {
            assert_eq!(m(json, key), want, "{json} [{key}]");
        }
    }

    #[test]
    fn lists_members_last_first_and_reads_scalars() {
        let json = br#" {"a" : 1, "b":{"c":[2,3]},"s":"x\"y", "n": null} "#;
        let all: Vec<(&[u8], &[u8])> = members(json).collect();
        assert_eq!(
            all,
            [
                (&b"n"[..], &b"null"[..]),
                (b"s", br#""x\"y""#),
                (b"b", br#"{"c":[2,3]}"#),
                (b"a", b"1"),
            ]
        );
        assert_eq!(members(b"[1]").count(), 0);
        assert_eq!(members(br#"{"a":"unterminated}"#).count(), 0);
        assert_eq!(as_u64(b"812"), Some(812));
        assert_eq!(as_u64(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"-1",
            b"1.5",
            b"null",
            b"18446744073709551616",
            b"\"1\"",
        ] {
            assert_eq!(as_u64(bad), None, "{bad:?}");
        }
        assert_eq!(as_str(br#""claude-x""#).as_deref(), Some("claude-x"));
        assert_eq!(as_str(br#""a\"b\u00e9""#).as_deref(), Some("a\"bé"));
        assert_eq!(as_str(br#""""#).as_deref(), Some(""));
        // Two-character escapes are read without serde_json; anything else is judged by it.
        assert_eq!(
            as_str(br#""{\"id\": \"s\\\/\n\t\r\b\f\"}""#).as_deref(),
            Some("{\"id\": \"s\\/\n\t\r\u{8}\u{c}\"}")
        );
        for bad in [
            &br#""a"b\n""#[..],
            b"\"a\x01\\n\"",
            b"\"\\n\\\"",
            b"\"\\n\xff\"",
        ] {
            assert_eq!(as_str(bad), None, "{bad:?}");
        }
        for bad in [&b"5"[..], b"\"", b"null", br#""bad \x""#] {
            assert_eq!(as_str(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn agrees_with_a_full_parse_on_random_documents() {
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..2000 {
            let Value::Object(obj) = random_value(&mut rng, 0, true) else {
                unreachable!()
            };
            let text = if round % 2 == 0 {
                serde_json::to_string(&obj).expect("test data")
            } else {
                serde_json::to_string_pretty(&obj).expect("test data")
            };
            let names: Vec<&[u8]> = members(text.as_bytes()).map(|(k, _)| k).collect();
            let mut want_names: Vec<&[u8]> = obj.keys().map(|k| k.as_bytes()).collect();
            // Keys as written: escapes stay escaped.
            let escaped: Vec<String> = want_names
                .iter()
                .map(|k| {
                    serde_json::to_string(std::str::from_utf8(k).expect("test data"))
                        .expect("test data")
                })
                .collect();
            want_names = escaped
                .iter()
                .map(|k| &k.as_bytes()[1..k.len() - 1])
                .collect();
            let mut sorted = names.clone();
            sorted.sort();
            want_names.sort();
            assert_eq!(sorted, want_names, "{text}");
            for key in ["a", "b", "metadata", "q\"", "z"] {
                let found = member(text.as_bytes(), key.as_bytes())
                    .map(|raw| serde_json::from_slice::<Value>(raw).expect("test data"));
                // Names are matched as a parser reads them: the generator's `q"`, written
                // with an escape, is found too.
                let want = obj.get(key).cloned();
                assert_eq!(found, want, "{text} [{key}]");
            }
        }
    }

    fn random_value(rng: &mut fastrand::Rng, depth: u32, object: bool) -> Value {
        const KEYS: [&str; 6] = ["a", "b", "metadata", "q\"", "z\\", "x y"];
        const STRINGS: [&str; 8] = [
            "",
            "plain",
            "\"metadata\":{",
            "back\\slash\\",
            "\\\"",
            "}],[{",
            "line\nbreak",
            "ü ✓",
        ];
        let kind = if object {
            5
        } else {
            rng.u8(0..if depth > 3 { 4 } else { 6 })
        };
        match kind {
            0 => Value::Null,
            1 => json!(rng.bool()),
            2 => json!(rng.i64(-1000..1000)),
            3 => json!(STRINGS[rng.usize(..STRINGS.len())]),
            4 => Value::Array(
                (0..rng.usize(0..4))
                    .map(|_| random_value(rng, depth + 1, false))
                    .collect(),
            ),
            _ => {
                let mut map = Map::new();
                for _ in 0..rng.usize(0..5) {
                    let key = KEYS[rng.usize(..KEYS.len())];
                    map.insert(key.to_string(), random_value(rng, depth + 1, false));
                }
                Value::Object(map)
            }
        }
    }
}
