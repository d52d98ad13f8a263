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
    /// Of `cache_creation`, the tokens written to the 1-hour cache
    /// (`cache_creation.ephemeral_1h_input_tokens`), priced above the 5-minute cache's.
    pub cache_creation_1h: u64,
    /// Web searches the server ran (`server_tool_use.web_search_requests`), priced per search.
    pub web_searches: u64,
}

impl Usage {
    /// Adds `other` to these counts (saturating).
    pub fn add(&mut self, other: &Usage) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cache_creation = self.cache_creation.saturating_add(other.cache_creation);
        self.cache_read = self.cache_read.saturating_add(other.cache_read);
        self.cache_creation_1h = self
            .cache_creation_1h
            .saturating_add(other.cache_creation_1h);
        self.web_searches = self.web_searches.saturating_add(other.web_searches);
    }
}

/// Whether a `content_block_start` event's `content_block` already carries generated content: a
/// `tool_use` (or any block type other than `text` and `thinking`: server tool uses and their
/// results, redacted thinking), or a `text` / `thinking` block whose text is not empty. An empty
/// `text` or `thinking` block only opens the block.
fn block_has_content(block: &serde_json::Value) -> bool {
    let non_empty = |k: &str| {
        block
            .get(k)
            .and_then(|t| t.as_str())
            .is_some_and(|t| !t.is_empty())
    };
    block_carries_content(
        block.get("type").and_then(|t| t.as_str()),
        non_empty("text"),
        non_empty("thinking"),
    )
}

/// The rule of [`block_has_content`], given a block's `type` and whether its `text` and its
/// `thinking` are non-empty strings.
fn block_carries_content(ty: Option<&str>, text: bool, thinking: bool) -> bool {
    match ty {
        Some("text") => text,
        Some("thinking") => thinking,
        Some(_) => true,
        None => false,
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
/// full parse does (and the stream path, [`EventData`]).
pub fn read_json_answer(body: &[u8]) -> Result<Option<MessageUsage>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = answer::read::<answer::Answer, _>(&mut de)?;
    de.end()?;
    Ok(found.flatten())
}

/// What an SSE event's `data` says that a stream's judge and its usage need: read in one pass,
/// like [`read_json_answer`], without building a JSON tree. A repeated name keeps its last value,
/// as a full parse does; [`EventData::from_value`] reads the same out of a parsed tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventData {
    /// The top-level `type`, when the data is an object and it is a string.
    pub ty: Option<String>,
    /// `message`, when present: its `model` (when a string) and the counts its `usage` sets.
    pub message: Option<(Option<String>, TokenUpdate)>,
    /// `usage`, when present: the counts it sets.
    pub usage: Option<TokenUpdate>,
    /// `content_block`, when present: whether it already carries generated content: a
    /// `tool_use` (or any block type other than `text` and `thinking`: server tool uses and their
    /// results, redacted thinking), or a `text` / `thinking` block whose text is not empty. An
    /// empty `text` or `thinking` block only opens the block.
    pub block_content: Option<bool>,
}

/// The token counts a `usage` value sets: each one that is a non-negative integer (as
/// [`serde_json::Value::as_u64`] reads it); none when `usage` is not an object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUpdate {
    /// `input_tokens`.
    pub input: Option<u64>,
    /// `output_tokens`.
    pub output: Option<u64>,
    /// `cache_creation_input_tokens`.
    pub cache_creation: Option<u64>,
    /// `cache_read_input_tokens`.
    pub cache_read: Option<u64>,
    /// `cache_creation.ephemeral_1h_input_tokens`.
    pub cache_creation_1h: Option<u64>,
    /// `server_tool_use.web_search_requests`.
    pub web_searches: Option<u64>,
}

impl Usage {
    /// Sets the counts `update` carries, keeping the others. Streams report cumulative values,
    /// so a later report replaces an earlier one field by field.
    pub fn apply(&mut self, update: &TokenUpdate) {
        for (field, n) in [
            (&mut self.input, update.input),
            (&mut self.output, update.output),
            (&mut self.cache_creation, update.cache_creation),
            (&mut self.cache_read, update.cache_read),
            (&mut self.cache_creation_1h, update.cache_creation_1h),
            (&mut self.web_searches, update.web_searches),
        ] {
            if let Some(n) = n {
                *field = n;
            }
        }
    }
}

impl TokenUpdate {
    /// The counts a parsed `usage` value sets (the tree-reading twin of the one-pass readers).
    pub fn from_value(usage: &serde_json::Value) -> Self {
        let field = |k: &str| usage.get(k).and_then(serde_json::Value::as_u64);
        let nested = |k: &str, count: &str| {
            usage
                .get(k)
                .and_then(|v| v.get(count))
                .and_then(serde_json::Value::as_u64)
        };
        Self {
            input: field("input_tokens"),
            output: field("output_tokens"),
            cache_creation: field("cache_creation_input_tokens"),
            cache_read: field("cache_read_input_tokens"),
            cache_creation_1h: nested("cache_creation", "ephemeral_1h_input_tokens"),
            web_searches: nested("server_tool_use", "web_search_requests"),
        }
    }
}

impl EventData {
    /// Reads an event's `data`; an error when it is not exactly one JSON value.
    pub fn read(data: &[u8]) -> Result<Self, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(data);
        let found = answer::read::<answer::Event, _>(&mut de)?;
        de.end()?;
        Ok(found)
    }

    /// The same facts, out of a parsed tree.
    pub fn from_value(json: &serde_json::Value) -> Self {
        Self {
            ty: json.get("type").and_then(|t| t.as_str()).map(str::to_owned),
            message: json.get("message").map(|m| {
                (
                    m.get("model").and_then(|m| m.as_str()).map(str::to_owned),
                    m.get("usage")
                        .map(TokenUpdate::from_value)
                        .unwrap_or_default(),
                )
            }),
            usage: json.get("usage").map(TokenUpdate::from_value),
            block_content: json.get("content_block").map(block_has_content),
        }
    }
}

mod answer {
    //! The serde visitor behind [`crate::wire::usage::read_json_answer`]: one visitor for any
    //! JSON value, which validates (and drops) what its [`Kind`] does not read.
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use crate::wire::usage::{EventData, MessageUsage, TokenUpdate, Usage, block_carries_content};

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
                    Key::Usage => usage = map.next_value_seed(Value::<Update>(PhantomData))?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Some(usage.map(|update| {
                let mut usage = Usage::default();
                usage.apply(&update);
                MessageUsage { model, usage }
            })))
        }

        fn scalar(_: Seen<'_>) -> Self::Out {
            None
        }
    }

    /// An SSE event's `data` (see [`crate::wire::usage::EventData`]).
    pub struct Event;

    impl Kind for Event {
        type Out = EventData;

        fn object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
            let mut event = EventData::default();
            while let Some(key) = map.next_key::<Key>()? {
                match key {
                    Key::Type => event.ty = map.next_value_seed(Value::<Text>(PhantomData))?,
                    Key::Message => {
                        event.message = Some(map.next_value_seed(Value::<Message>(PhantomData))?);
                    }
                    Key::Usage => {
                        let update = map.next_value_seed(Value::<Update>(PhantomData))?;
                        event.usage = Some(update.unwrap_or_default());
                    }
                    Key::ContentBlock => {
                        event.block_content =
                            Some(map.next_value_seed(Value::<Block>(PhantomData))?);
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(event)
        }

        fn scalar(_: Seen<'_>) -> Self::Out {
            EventData::default()
        }
    }

    /// `message_start`'s `message`: its `model` and what its `usage` sets.
    struct Message;

    impl Kind for Message {
        type Out = (Option<String>, TokenUpdate);

        fn object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
            let (mut model, mut usage) = (None, TokenUpdate::default());
            while let Some(key) = map.next_key::<Key>()? {
                match key {
                    Key::Model => model = map.next_value_seed(Value::<Text>(PhantomData))?,
                    Key::Usage => {
                        usage = map
                            .next_value_seed(Value::<Update>(PhantomData))?
                            .unwrap_or_default();
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok((model, usage))
        }

        fn scalar(_: Seen<'_>) -> Self::Out {
            (None, TokenUpdate::default())
        }
    }

    /// A `usage` value: the counts it sets; `None` when it is not an object (an answer without
    /// a `usage` object has no usage; an event's sets nothing).
    struct Update;

    impl Kind for Update {
        type Out = Option<TokenUpdate>;

        fn object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
            let mut update = TokenUpdate::default();
            while let Some(key) = map.next_key::<Key>()? {
                let field = match key {
                    Key::InputTokens => &mut update.input,
                    Key::OutputTokens => &mut update.output,
                    Key::CacheCreation => &mut update.cache_creation,
                    Key::CacheRead => &mut update.cache_read,
                    Key::CacheCreationDetail => {
                        update.cache_creation_1h =
                            map.next_value_seed(Value::<Nested<Ephemeral1h>>(PhantomData))?;
                        continue;
                    }
                    Key::ServerToolUse => {
                        update.web_searches =
                            map.next_value_seed(Value::<Nested<WebSearches>>(PhantomData))?;
                        continue;
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                };
                *field = map.next_value_seed(Value::<SetCount>(PhantomData))?;
            }
            Ok(Some(update))
        }

        fn scalar(_: Seen<'_>) -> Self::Out {
            None
        }
    }

    /// One count inside an object of `usage` (`cache_creation`, `server_tool_use`): the count
    /// `W` names, set only by a non-negative integer; `None` when the value is not an object.
    struct Nested<W>(PhantomData<W>);

    /// Which member of a nested object [`Nested`] reads.
    trait Which {
        const KEY: fn(&Key) -> bool;
    }

    /// `cache_creation.ephemeral_1h_input_tokens`.
    struct Ephemeral1h;

    impl Which for Ephemeral1h {
        const KEY: fn(&Key) -> bool = |k| matches!(k, Key::Ephemeral1h);
    }

    /// `server_tool_use.web_search_requests`.
    struct WebSearches;

    impl Which for WebSearches {
        const KEY: fn(&Key) -> bool = |k| matches!(k, Key::WebSearchRequests);
    }

    impl<W: Which> Kind for Nested<W> {
        type Out = Option<u64>;

        fn object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
            let mut count = None;
            while let Some(key) = map.next_key::<Key>()? {
                if (W::KEY)(&key) {
                    count = map.next_value_seed(Value::<SetCount>(PhantomData))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(count)
        }

        fn scalar(_: Seen<'_>) -> Self::Out {
            None
        }
    }

    /// A count in a `usage` update: set only by a non-negative integer.
    struct SetCount;

    impl Kind for SetCount {
        type Out = Option<u64>;

        fn scalar(seen: Seen<'_>) -> Self::Out {
            match seen {
                Seen::U64(n) => Some(n),
                Seen::Str(_) | Seen::Other => None,
            }
        }
    }

    /// A `content_block`: whether it already carries generated content (the rule of
    /// [`EventData::block_content`]).
    struct Block;

    impl Kind for Block {
        type Out = bool;

        fn object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self::Out, A::Error> {
            let (mut ty, mut text, mut thinking) = (None, false, false);
            while let Some(key) = map.next_key::<Key>()? {
                match key {
                    Key::Type => ty = map.next_value_seed(Value::<Text>(PhantomData))?,
                    Key::Text => text = map.next_value_seed(Value::<NonEmpty>(PhantomData))?,
                    Key::Thinking => {
                        thinking = map.next_value_seed(Value::<NonEmpty>(PhantomData))?;
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(block_carries_content(ty.as_deref(), text, thinking))
        }

        fn scalar(_: Seen<'_>) -> Self::Out {
            false
        }
    }

    /// A block's `text` or `thinking`: whether it is a non-empty string.
    struct NonEmpty;

    impl Kind for NonEmpty {
        type Out = bool;

        fn scalar(seen: Seen<'_>) -> Self::Out {
            matches!(seen, Seen::Str(s) if !s.is_empty())
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

    /// The member names that matter, matched after unescaping (as a full parse matches them).
    enum Key {
        Type,
        Message,
        ContentBlock,
        Text,
        Thinking,
        Model,
        Usage,
        InputTokens,
        OutputTokens,
        CacheCreation,
        CacheRead,
        CacheCreationDetail,
        Ephemeral1h,
        ServerToolUse,
        WebSearchRequests,
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
                b"type" => Key::Type,
                b"message" => Key::Message,
                b"content_block" => Key::ContentBlock,
                b"text" => Key::Text,
                b"thinking" => Key::Thinking,
                b"model" => Key::Model,
                b"usage" => Key::Usage,
                b"input_tokens" => Key::InputTokens,
                b"output_tokens" => Key::OutputTokens,
                b"cache_creation_input_tokens" => Key::CacheCreation,
                b"cache_read_input_tokens" => Key::CacheRead,
                b"cache_creation" => Key::CacheCreationDetail,
                b"ephemeral_1h_input_tokens" => Key::Ephemeral1h,
                b"server_tool_use" => Key::ServerToolUse,
                b"web_search_requests" => Key::WebSearchRequests,
                _ => Key::Other,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a full parse makes of `data`, for comparison with the one-pass reader.
    fn by_tree(data: &str) -> Option<EventData> {
        serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .map(|v| EventData::from_value(&v))
    }

    #[test]
    fn event_data_is_read_as_a_full_parse_reads_it() {
        let cases = [
            r#"{"type":"message_start","message":{"id":"m","model":"claude-x","content":[],"usage":{"input_tokens":25,"cache_creation_input_tokens":3,"cache_read_input_tokens":40,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":"hi"}}"#,
            r#"{"type":"content_block_start","content_block":{"type":"thinking","thinking":""}}"#,
            r#"{"type":"content_block_start","content_block":{"type":"thinking","thinking":"x"}}"#,
            r#"{"type":"content_block_start","content_block":{"type":"tool_use","id":"t","input":{}}}"#,
            r#"{"type":"content_block_start","content_block":{"text":"x"}}"#,
            r#"{"type":"content_block_start","content_block":[1]}"#,
            r#"{"type":"content_block_start","content_block":{"type":"text","text":5}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":9}}"#,
            r#"{"type": "ping"}"#,
            // Repeated names keep their last value, at every level.
            r#"{"type":"a","type":"ping"}"#,
            r#"{"type":"ping","type":5}"#,
            r#"{"usage":{"output_tokens":9,"output_tokens":"x"},"usage":{"input_tokens":1}}"#,
            r#"{"usage":{"output_tokens":9,"output_tokens":"x","input_tokens":1}}"#,
            r#"{"message":{"model":"a","model":1,"usage":{"input_tokens":2}},"message":{"model":"b"}}"#,
            r#"{"content_block":{"type":"text","text":"x","text":""}}"#,
            // Escaped names are matched after unescaping, as a full parse matches them.
            r#"{"type":"ping","usage":{"input_tokens":3}}"#,
            // Counts that are not non-negative integers set nothing.
            r#"{"usage":{"input_tokens":-1,"output_tokens":1.5,"cache_read_input_tokens":18446744073709551616,"cache_creation_input_tokens":null}}"#,
            r#"{"usage":{"input_tokens":18446744073709551615}}"#,
            // The 1-hour cache's share of the writes, and the server's web searches; repeated
            // and mistyped ones as a full parse reads them.
            r#"{"usage":{"cache_creation_input_tokens":30,"cache_creation":{"ephemeral_5m_input_tokens":10,"ephemeral_1h_input_tokens":20},"server_tool_use":{"web_search_requests":3}}}"#,
            r#"{"usage":{"cache_creation":{"ephemeral_1h_input_tokens":20},"cache_creation":{"ephemeral_5m_input_tokens":1}}}"#,
            r#"{"usage":{"cache_creation":{"ephemeral_1h_input_tokens":2,"ephemeral_1h_input_tokens":"x"},"server_tool_use":[1]}}"#,
            r#"{"usage":{"cache_creation":5,"server_tool_use":{"web_search_requests":1,"web_search_requests":4}}}"#,
            r#"{"message":5,"usage":"x","content_block":null}"#,
            r#"{"a":[[[{"type":1}]]],"type":"x"}"#,
            // Not objects, and not JSON.
            "[1]",
            r#""ping""#,
            "5",
            "null",
            "{",
            r#"{"type":"ping"}x"#,
            r#"{"type":"ping",}"#,
            "",
        ];
        for data in cases {
            assert_eq!(
                EventData::read(data.as_bytes()).ok(),
                by_tree(data),
                "{data}"
            );
        }
        let start = EventData::read(cases[0].as_bytes()).expect("valid");
        assert_eq!(start.ty.as_deref(), Some("message_start"));
        let (model, usage) = start.message.expect("message");
        assert_eq!(model.as_deref(), Some("claude-x"));
        assert_eq!(usage.cache_read, Some(40));
    }

    /// Random documents built from the names and values that matter, repeated names included:
    /// the one-pass reader and a full parse agree on every one.
    #[test]
    fn event_data_agrees_with_a_full_parse_on_random_documents() {
        fn value(rng: &mut fastrand::Rng, depth: u32, out: &mut String) {
            const NAMES: [&str; 13] = [
                "type",
                "message",
                "usage",
                "content_block",
                "text",
                "thinking",
                "model",
                "input_tokens",
                "output_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
                "other",
                "t\\u0079pe",
            ];
            const SCALARS: [&str; 14] = [
                "0",
                "7",
                "-3",
                "1.5",
                "18446744073709551616",
                "null",
                "true",
                "\"\"",
                "\"text\"",
                "\"thinking\"",
                "\"tool_use\"",
                "\"ping\"",
                "\"a\\\"b\"",
                "[1,{\"type\":\"text\"}]",
            ];
            if depth == 0 || (depth < 4 && rng.u8(..3) == 0) {
                out.push('{');
                for i in 0..rng.usize(..6) {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('"');
                    out.push_str(NAMES[rng.usize(..NAMES.len())]);
                    out.push_str("\":");
                    value(rng, depth + 1, out);
                }
                out.push('}');
            } else {
                out.push_str(SCALARS[rng.usize(..SCALARS.len())]);
            }
        }
        let mut rng = fastrand::Rng::with_seed(11);
        let mut agreed_on_objects = 0;
        for _ in 0..20_000 {
            let mut data = String::new();
            // Mostly objects at the top, as events are.
            let depth = if rng.u8(..8) == 0 { 4 } else { 0 };
            value(&mut rng, depth, &mut data);
            let one_pass = EventData::read(data.as_bytes()).ok();
            assert_eq!(one_pass, by_tree(&data), "{data}");
            agreed_on_objects += usize::from(data.starts_with('{'));
        }
        assert!(agreed_on_objects > 15_000, "{agreed_on_objects}");
    }

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
                cache_read: 0,
                ..Default::default()
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
