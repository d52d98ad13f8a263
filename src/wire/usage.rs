//! Token usage: what one answer cost, read from a JSON answer's top-level `usage` (SSE streams
//! report theirs through [`crate::wire::sse::SseScanner`]).

use serde::Serialize;

use crate::wire::json_top;

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
    // Only these members are read; the content between them is stepped over, not parsed.
    // `usage` comes last in a Messages response, `model` near the front.
    let (mut usage, mut model) = (None, None);
    for (key, value) in json_top::members(body) {
        match key {
            b"usage" if usage.is_none() => usage = Some(value),
            b"model" if model.is_none() => model = Some(value),
            _ => {}
        }
        if usage.is_some() && model.is_some() {
            break;
        }
    }
    let usage = usage?;
    if usage.first() != Some(&b'{') {
        return None;
    }
    let mut tokens = Usage::default();
    // Members come last-first: the first one seen of a repeated count is the document's last,
    // which is the one a full parse (and the stream path) keeps.
    let mut seen = [false; 4];
    for (key, value) in json_top::members(usage) {
        let (i, field) = match key {
            b"input_tokens" => (0, &mut tokens.input),
            b"output_tokens" => (1, &mut tokens.output),
            b"cache_creation_input_tokens" => (2, &mut tokens.cache_creation),
            b"cache_read_input_tokens" => (3, &mut tokens.cache_read),
            _ => continue,
        };
        if !std::mem::replace(&mut seen[i], true) {
            *field = json_top::as_u64(value).unwrap_or(0);
        }
    }
    Some(MessageUsage {
        model: model.and_then(json_top::as_str).map(String::from),
        usage: tokens,
    })
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
}
