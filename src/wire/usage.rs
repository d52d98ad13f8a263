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
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = answer::ObjectOnly::<answer::Answer>::default().deserialize(&mut de)?;
    de.end()?;
    Ok(found.flatten())
}

mod answer {
    //! The serde visitors behind [`crate::wire::usage::read_json_answer`]: only objects are read, every other
    //! value is validated and dropped.
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use crate::wire::usage::{MessageUsage, Usage};

    /// What is read from an object's members.
    pub trait Object {
        type Out;
        fn read<'de, A: MapAccess<'de>>(map: A) -> Result<Self::Out, A::Error>;
    }

    /// Any JSON value, read as `T` when it is an object (`None` otherwise).
    pub struct ObjectOnly<T>(PhantomData<T>);

    impl<T> Default for ObjectOnly<T> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<'de, T: Object> DeserializeSeed<'de> for ObjectOnly<T> {
        type Value = Option<T::Out>;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de, T: Object> Visitor<'de> for ObjectOnly<T> {
        type Value = Option<T::Out>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::read(map).map(Some)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_seq(seq).map(|_| None)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    /// A Messages answer's top level: its `model` and `usage` (`None` without a `usage` object).
    pub struct Answer;

    impl Object for Answer {
        type Out = Option<MessageUsage>;

        fn read<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
            let (mut model, mut usage) = (None, None);
            while let Some(key) = map.next_key::<Key>()? {
                match key {
                    Key::Model => model = map.next_value_seed(Text)?,
                    Key::Usage => usage = map.next_value_seed(ObjectOnly::<Tokens>::default())?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(usage.map(|usage| MessageUsage { model, usage }))
        }
    }

    /// A `usage` object's token counts; a count that is not a non-negative integer that fits
    /// (null, a float, a string) is 0.
    struct Tokens;

    impl Object for Tokens {
        type Out = Usage;

        fn read<'de, A: MapAccess<'de>>(mut map: A) -> Result<Usage, A::Error> {
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
                *field = map.next_value_seed(Count)?;
            }
            Ok(tokens)
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

    /// `model`: its text when it is a string, `None` otherwise.
    struct Text;

    impl<'de> DeserializeSeed<'de> for Text {
        type Value = Option<String>;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
            de.deserialize_any(Scalar(|v: Seen<'_>| match v {
                Seen::Str(s) => Some(s.to_owned()),
                Seen::U64(_) | Seen::Other => None,
            }))
        }
    }

    /// A token count: the value when it is a non-negative integer that fits, 0 otherwise.
    struct Count;

    impl<'de> DeserializeSeed<'de> for Count {
        type Value = u64;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<u64, D::Error> {
            de.deserialize_any(Scalar(|v: Seen<'_>| match v {
                Seen::U64(n) => n,
                Seen::Str(_) | Seen::Other => 0,
            }))
        }
    }

    /// What a value turned out to be, for [`Scalar`]'s judgement.
    enum Seen<'a> {
        Str(&'a str),
        U64(u64),
        Other,
    }

    /// Visits any value, validating (and dropping) arrays and objects, and hands what it saw to
    /// its judgement.
    struct Scalar<F>(F);

    impl<'de, T, F: FnOnce(Seen<'_>) -> T> Visitor<'de> for Scalar<F> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_str<E>(self, s: &str) -> Result<T, E> {
            Ok((self.0)(Seen::Str(s)))
        }

        fn visit_u64<E>(self, n: u64) -> Result<T, E> {
            Ok((self.0)(Seen::U64(n)))
        }

        fn visit_i64<E>(self, _: i64) -> Result<T, E> {
            Ok((self.0)(Seen::Other))
        }

        fn visit_f64<E>(self, _: f64) -> Result<T, E> {
            Ok((self.0)(Seen::Other))
        }

        fn visit_bool<E>(self, _: bool) -> Result<T, E> {
            Ok((self.0)(Seen::Other))
        }

        fn visit_unit<E>(self) -> Result<T, E> {
            Ok((self.0)(Seen::Other))
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            IgnoredAny.visit_map(map)?;
            Ok((self.0)(Seen::Other))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
            IgnoredAny.visit_seq(seq)?;
            Ok((self.0)(Seen::Other))
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
