//! Token usage: what one answer cost, read from a JSON answer's top-level `usage` (SSE streams
//! report theirs through [`crate::wire::sse::SseScanner`]).

use serde::Serialize;

/// Tokens of one answer (or a sum of answers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// `input_tokens`.
    pub input: u64,
    /// `output_tokens`.
    pub output: u64,
    /// `cache_creation_input_tokens` (prompt-cache writes).
    pub cache_creation: u64,
    /// `cache_read_input_tokens` (prompt-cache hits).
    pub cache_read: u64,
}

impl Usage {
    /// Adds `other` to these counts (saturating).
    pub fn add(&mut self, other: &Usage) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cache_creation = self.cache_creation.saturating_add(other.cache_creation);
        self.cache_read = self.cache_read.saturating_add(other.cache_read);
    }

    /// Sets every field that `usage` (an Anthropic `usage` object) carries. Streams report
    /// cumulative values, so a later report replaces an earlier one field by field.
    pub fn update_from(&mut self, usage: &serde_json::Value) {
        let field = |k: &str| usage.get(k).and_then(serde_json::Value::as_u64);
        if let Some(n) = field("input_tokens") {
            self.input = n;
        }
        if let Some(n) = field("output_tokens") {
            self.output = n;
        }
        if let Some(n) = field("cache_creation_input_tokens") {
            self.cache_creation = n;
        }
        if let Some(n) = field("cache_read_input_tokens") {
            self.cache_read = n;
        }
    }
}

/// What a response said about its cost: the model that answered and the tokens it counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageUsage {
    /// `model` of the message (`None` if the response did not say).
    pub model: Option<String>,
    /// Its tokens.
    pub usage: Usage,
}

/// The largest JSON body whose `usage` is read; larger bodies are relayed without a copy.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// The top-level `model` and `usage` of a non-streaming Messages response; `None` when the body
/// is not JSON or carries no `usage` object (a `count_tokens` or `models` answer, say).
pub fn from_json_body(body: &[u8]) -> Option<MessageUsage> {
    read_json_answer(body).ok().flatten()
}

/// One pass over a whole JSON answer that both judges it and reads what it cost: an error when
/// `body` is not exactly one JSON value; otherwise the top-level `model` and `usage` (`None`
/// without a `usage` object). Nothing but those two members is built: the rest is stepped over
/// by serde_json's validating parser, so an answer is parsed once where a validity check and a
/// separate read of its usage would walk it twice. A repeated name keeps its last value, as a
/// full parse does (and the stream path, [`Usage::update_from`]).
pub fn read_json_answer(body: &[u8]) -> Result<Option<MessageUsage>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = answer::read::<answer::Answer, _>(&mut de)?;
    de.end()?;
    Ok(found.flatten())
}

mod answer {
    //! The serde visitor behind [`crate::wire::usage::read_json_answer`]: one visitor for any
    //! JSON value, which validates (and drops) what its [`Kind`] does not read.
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use crate::wire::usage::{MessageUsage, Usage};

    /// What a value is read as: an object's members, or the scalar it holds.
    pub trait Kind {
        type Out;
        /// An object: read its members (by default, only validate them).
        fn object<'de, A: MapAccess<'de>>(map: A) -> Result<Self::Out, A::Error> {
            IgnoredAny.visit_map(map)?;
            Ok(Self::scalar(Seen::Other))
        }
        /// Any other value, arrays included (validated and dropped).
        fn scalar(seen: Seen<'_>) -> Self::Out;
    }

    /// What a value turned out to be, for [`Kind::scalar`].
    pub enum Seen<'a> {
        Str(&'a str),
        U64(u64),
        Other,
    }

    /// Reads the next value of `de` as `K`.
    pub fn read<'de, K: Kind, D: Deserializer<'de>>(de: D) -> Result<K::Out, D::Error> {
        de.deserialize_any(Value::<K>(PhantomData))
    }

    /// The visitor (and seed) for a value read as `K`.
    struct Value<K>(PhantomData<K>);

    impl<'de, K: Kind> DeserializeSeed<'de> for Value<K> {
        type Value = K::Out;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<K::Out, D::Error> {
            read::<K, D>(de)
        }
    }

    impl<'de, K: Kind> Visitor<'de> for Value<K> {
        type Value = K::Out;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<K::Out, A::Error> {
            K::object(map)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<K::Out, A::Error> {
            IgnoredAny.visit_seq(seq)?;
            Ok(K::scalar(Seen::Other))
        }

        fn visit_str<E>(self, s: &str) -> Result<K::Out, E> {
            Ok(K::scalar(Seen::Str(s)))
        }

        fn visit_u64<E>(self, n: u64) -> Result<K::Out, E> {
            Ok(K::scalar(Seen::U64(n)))
        }

        fn visit_i64<E>(self, _: i64) -> Result<K::Out, E> {
            Ok(K::scalar(Seen::Other))
        }

        fn visit_f64<E>(self, _: f64) -> Result<K::Out, E> {
            Ok(K::scalar(Seen::Other))
        }

        fn visit_bool<E>(self, _: bool) -> Result<K::Out, E> {
            Ok(K::scalar(Seen::Other))
        }

        fn visit_unit<E>(self) -> Result<K::Out, E> {
            Ok(K::scalar(Seen::Other))
        }
    }

    /// A Messages answer: its `model` and `usage` when it is an object with a `usage` object
    /// (the outer `Option`: whether it was an object at all).
    pub struct Answer;

    impl Kind for Answer {
        type Out = Option<Option<MessageUsage>>;

        fn object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
            let (mut model, mut usage) = (None, None);
            while let Some(key) = map.next_key::<Key>()? {
                match key {
                    Key::Model => model = map.next_value_seed(Value::<Text>(PhantomData))?,
                    Key::Usage => usage = map.next_value_seed(Value::<Tokens>(PhantomData))?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Some(usage.map(|usage| MessageUsage { model, usage })))
        }

        fn scalar(_: Seen<'_>) -> Self::Out {
            None
        }
    }

    /// A `usage` object's token counts (`None` when it is not an object).
    struct Tokens;

    impl Kind for Tokens {
        type Out = Option<Usage>;

        fn object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
            let mut tokens = Usage::default();
            while let Some(key) = map.next_key::<Key>()? {
                let field = match key {
                    Key::InputTokens => &mut tokens.input,
                    Key::OutputTokens => &mut tokens.output,
                    Key::CacheCreation => &mut tokens.cache_creation,
                    Key::CacheRead => &mut tokens.cache_read,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                };
                *field = map.next_value_seed(Value::<Count>(PhantomData))?;
            }
            Ok(Some(tokens))
        }

        fn scalar(_: Seen<'_>) -> Self::Out {
            None
        }
    }

    /// `model`: its text when it is a string, `None` otherwise.
    struct Text;

    impl Kind for Text {
        type Out = Option<String>;

        fn scalar(seen: Seen<'_>) -> Self::Out {
            match seen {
                Seen::Str(s) => Some(s.to_owned()),
                Seen::U64(_) | Seen::Other => None,
            }
        }
    }

    /// A token count: the value when it is a non-negative integer that fits, 0 otherwise (null,
    /// a float, a string, an object).
    struct Count;

    impl Kind for Count {
        type Out = u64;

        fn scalar(seen: Seen<'_>) -> u64 {
            match seen {
                Seen::U64(n) => n,
                Seen::Str(_) | Seen::Other => 0,
            }
        }
    }

    /// The member names that matter, matched after unescaping (as a full parse matches them).
    enum Key {
        Model,
        Usage,
        InputTokens,
        OutputTokens,
        CacheCreation,
        CacheRead,
        Other,
    }

    impl<'de> serde::Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            // As bytes: serde_json then hands over the name (unescaped) without checking it is
            // UTF-8 again, which the parse already did.
            de.deserialize_bytes(KeyVisitor)
        }
    }

    struct KeyVisitor;

    impl Visitor<'_> for KeyVisitor {
        type Value = Key;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a member name")
        }

        fn visit_bytes<E>(self, name: &[u8]) -> Result<Key, E> {
            Ok(match name {
                b"model" => Key::Model,
                b"usage" => Key::Usage,
                b"input_tokens" => Key::InputTokens,
                b"output_tokens" => Key::OutputTokens,
                b"cache_creation_input_tokens" => Key::CacheCreation,
                b"cache_read_input_tokens" => Key::CacheRead,
                _ => Key::Other,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_usage_is_read() {
        let body = br#"{"id":"m","type":"message","model":"claude-x","content":[{"type":"text","text":"hi"}],
            "usage":{"input_tokens":12,"output_tokens":7,"cache_creation_input_tokens":3,"cache_read_input_tokens":null}}"#;
        let u = from_json_body(body).expect("usage");
        assert_eq!(u.model.as_deref(), Some("claude-x"));
        assert_eq!(
            u.usage,
            Usage {
                input: 12,
                output: 7,
                cache_creation: 3,
                cache_read: 0
            }
        );
        assert_eq!(from_json_body(br#"{"input_tokens": 5}"#), None);
        assert_eq!(from_json_body(b"not json"), None);
        assert_eq!(from_json_body(br#"{"usage": "weird"}"#), None);
        assert_eq!(from_json_body(br#"{"usage": null}"#), None);
        // A nested `usage` (a tool's input, say) is not the message's.
        assert_eq!(
            from_json_body(br#"{"content":[{"input":{"usage":{"input_tokens":1}}}]}"#),
            None
        );
        let no_model =
            from_json_body(br#"{"model":5,"usage":{"output_tokens":2}}"#).expect("usage");
        assert_eq!((no_model.model, no_model.usage.output), (None, 2));
    }

    #[test]
    fn one_parse_judges_the_answer_and_reads_its_usage() {
        let read = |b: &[u8]| read_json_answer(b);
        // Not one JSON value: an error, whatever it carries.
        for bad in [
            &b""[..],
            b"{",
            b"{} {}",
            br#"{"usage":{"output_tokens":1}"#,
            br#"{"usage":{"output_tokens":1}} x"#,
            br#"{"model":"m","usage":{"output_tokens":01}}"#,
            b"[1,]",
        ] {
            assert!(read(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // Valid JSON without a `usage` object: valid, nothing read.
        for none in [
            &b"[]"[..],
            b"12",
            b"\"usage\"",
            br#"{"model":"m"}"#,
            br#"{"usage":[{"output_tokens":1}]}"#,
            br#"{"content":[{"input":{"usage":{"input_tokens":1}}}]}"#,
        ] {
            assert_eq!(read(none).expect("valid"), None);
        }
        // Repeated names keep their last value, as a full parse does: a later `usage` that is
        // not an object undoes an earlier one.
        let body = br#"{"model":"a","usage":{"output_tokens":1,"output_tokens":2},"model":"b"}"#;
        let u = read(body).expect("valid").expect("usage");
        assert_eq!((u.model.as_deref(), u.usage.output), (Some("b"), 2));
        let body = br#"{"usage":{"output_tokens":1},"usage":null}"#;
        assert_eq!(read(body).expect("valid"), None);
        // Names are matched after unescaping; counts that are not plain integers are 0.
        let body = br#"{"mod\u0065l":"x","usage":{"input_tokens":-1,"output_tokens":2.0,
            "cache_read_input_tokens":"3","cache_creation_input_tokens":18446744073709551616,
            "out\u0070ut_tokens":{"deep":[1,{"a":null}]}}}"#;
        let u = read(body).expect("valid").expect("usage");
        assert_eq!(u.model.as_deref(), Some("x"));
        assert_eq!(u.usage, Usage::default());
    }
}
