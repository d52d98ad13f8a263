//! An incremental scanner for Server-Sent Events, just deep enough to judge an Anthropic stream.
//!
//! It sees the bytes ccgate relays, chunk by chunk as they arrive, and reports event names. It keeps
//! the `data` of an event only when the verdict or the usage ledger needs it (`error`,
//! `message_start` and `message_delta` events, or events without an `event:` line whose type is in
//! the JSON), capped, so a long stream costs no memory.

use crate::wire::usage::{EventData, MessageUsage};

/// The cap on one buffered line or data payload.
const MAX_LINE: usize = 64 * 1024;

/// What the scanner has learned about the stream so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamFacts {
    /// Events seen, of any kind.
    pub events: u64,
    /// Whether content was seen: a `content_block_delta`, or a `content_block_start` whose block
    /// already carries generated content (see [`EventData::block_content`]). Nothing else commits a
    /// stream: `message_start`, `ping`, `content_block_stop` and `message_delta` only frame it.
    pub content: bool,
    /// Whether `message_stop` was seen.
    pub message_stop: bool,
    /// The first `error` event's `error.type` and `error.message`.
    pub error: Option<(String, String)>,
    /// Before any content: the first event (or line) that is not a well-formed Anthropic event —
    /// a field SSE does not define, data that is not a JSON object with a string `type`, a `type`
    /// that differs from the `event:` name, or an event type this scanner does not know. After
    /// content, such events are relayed unjudged (new event types must not break streams).
    pub malformed: Option<String>,
}

/// The event names the scanner tells apart; every other name (or one that is not UTF-8) is
/// [`EventName::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventName {
    MessageStart,
    MessageDelta,
    MessageStop,
    Ping,
    ContentBlockStart,
    ContentBlockDelta,
    ContentBlockStop,
    Error,
    Other,
}

impl EventName {
    fn parse(name: &[u8]) -> Self {
        match name {
            b"message_start" => Self::MessageStart,
            b"message_delta" => Self::MessageDelta,
            b"message_stop" => Self::MessageStop,
            b"ping" => Self::Ping,
            b"content_block_start" => Self::ContentBlockStart,
            b"content_block_delta" => Self::ContentBlockDelta,
            b"content_block_stop" => Self::ContentBlockStop,
            b"error" => Self::Error,
            _ => Self::Other,
        }
    }

    /// Whether the verdict or the usage ledger reads this event's `data`.
    fn keeps_data(self) -> bool {
        matches!(self, Self::Error | Self::MessageStart | Self::MessageDelta)
    }
}

/// Incremental SSE scanner.
#[derive(Default)]
pub struct SseScanner {
    line: Vec<u8>,
    overlong: bool,
    event: Option<EventName>,
    data: Vec<u8>,
    keep_data: bool,
    /// A non-empty line completed since the last blank line: an event is under way.
    pending: bool,
    /// A line of the current event was too long to keep.
    event_overlong: bool,
    facts: StreamFacts,
    /// Boxed: most scanners never see usage, and the scanner travels by value.
    usage: Option<Box<MessageUsage>>,
}

impl SseScanner {
    /// A fresh scanner.
    pub fn new() -> Self {
        Self {
            keep_data: true,
            ..Self::default()
        }
    }

    /// What is known so far.
    pub fn facts(&self) -> &StreamFacts {
        &self.facts
    }

    /// The model and tokens the stream reported: `message_start`'s `message.model` and
    /// `message.usage`, updated by each `message_delta`'s cumulative `usage`.
    pub fn usage(&self) -> Option<&MessageUsage> {
        self.usage.as_deref()
    }

    /// Whether an `error` event is under way: its `event:` line was fed, its blank line not yet.
    pub fn in_error_event(&self) -> bool {
        self.pending && self.event == Some(EventName::Error)
    }

    /// Whether the bytes fed so far end on an event boundary (nothing fed yet, or a blank line just
    /// ended an event): bytes sent after them start a fresh event.
    pub fn at_boundary(&self) -> bool {
        self.line.is_empty() && !self.overlong && !self.pending
    }

    /// Feeds the next chunk of the stream.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                // A whole line inside the chunk (the usual case) is judged where it lies; a
                // longer one takes the path below, which drops it at the cap.
                Some(i) if self.line.is_empty() && !self.overlong && i <= MAX_LINE => {
                    let line = &chunk[..i];
                    chunk = &chunk[i + 1..];
                    self.line_done(line.strip_suffix(b"\r").unwrap_or(line));
                }
                Some(i) => {
                    self.push_partial(&chunk[..i]);
                    chunk = &chunk[i + 1..];
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if self.overlong {
                        // Too long to judge; the event it belongs to is judged by its name.
                        self.pending = true;
                        self.event_overlong = true;
                    } else {
                        self.line_done(&line);
                    }
                    self.overlong = false;
                    line.clear();
                    self.line = line;
                }
                None => {
                    self.push_partial(chunk);
                    chunk = &[];
                }
            }
        }
    }

    fn push_partial(&mut self, part: &[u8]) {
        if self.overlong {
            return;
        }
        if self.line.len() + part.len() > MAX_LINE {
            // A long data line of an uninteresting event: we only need to know where it ends.
            self.overlong = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(part);
    }

    fn line_done(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.pending = false;
            self.dispatch();
            return;
        }
        self.pending = true;
        // The two fields every event has are told by their prefix, without a search for the
        // colon (a `data:` line is the field `data` whatever follows its colon).
        let (field, after_colon): (&[u8], &[u8]) = if let Some(v) = line.strip_prefix(b"data:") {
            (b"data", v)
        } else if let Some(v) = line.strip_prefix(b"event:") {
            (b"event", v)
        } else {
            match memchr::memchr(b':', line) {
                Some(0) => return, // comment
                Some(i) => (&line[..i], &line[i + 1..]),
                None => (line, &b""[..]),
            }
        };
        let value = after_colon.strip_prefix(b" ").unwrap_or(after_colon);
        match field {
            b"event" => {
                let name = EventName::parse(value);
                // Before content every event is read whole, to be judged.
                self.keep_data = name.keeps_data() || !self.facts.content;
                self.event = Some(name);
                if name == EventName::Other {
                    self.malformed_before_content(|| {
                        format!("unknown event `{}`", String::from_utf8_lossy(value))
                    });
                }
            }
            b"data" if self.keep_data && self.data.len() + value.len() < MAX_LINE => {
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
            }
            b"data" | b"id" | b"retry" => {}
            other => self.malformed_before_content(|| {
                format!("not an SSE field: `{}`", String::from_utf8_lossy(other))
            }),
        }
    }

    /// Notes a malformed event or line, if no content came before it (and nothing else was
    /// noted). The overlong-line path needs no note: a long line is a long `data` of an event.
    fn malformed_before_content(&mut self, what: impl FnOnce() -> String) {
        if !self.facts.content && self.facts.malformed.is_none() {
            self.facts.malformed = Some(what().chars().take(200).collect());
        }
    }

    fn dispatch(&mut self) {
        let event = self.event.take();
        let data = std::mem::take(&mut self.data);
        let overlong = std::mem::take(&mut self.event_overlong);
        self.keep_data = true;
        if event.is_some() || !data.is_empty() {
            self.judge(event, &data, overlong);
        }
        // The buffer is kept for the next event.
        let mut data = data;
        data.clear();
        self.data = data;
    }

    fn judge(&mut self, event: Option<EventName>, data: &[u8], overlong: bool) {
        // An event named by its `event:` line is read without building a JSON tree; an `error`
        // event (whose message is read) or one named only by its JSON is parsed whole.
        let (read, tree) = if data.is_empty() {
            (None, None)
        } else if event.is_some_and(|e| e != EventName::Error) {
            (EventData::read(data).ok(), None)
        } else {
            let tree: Option<serde_json::Value> = serde_json::from_slice(data).ok();
            (tree.as_ref().map(EventData::from_value), tree)
        };
        let ty = read.as_ref().and_then(|r| r.ty.as_deref());
        let judged = !self.facts.content && !overlong;
        // Without an `event:` line the name is the JSON's `type` (the SSE default, `message`, is
        // none the scanner tells apart).
        let name = event
            .unwrap_or_else(|| ty.map_or(EventName::Other, |t| EventName::parse(t.as_bytes())));
        self.facts.events += 1;
        if judged && name != EventName::Error {
            match (ty, event) {
                (None, _) => {
                    self.malformed_before_content(|| {
                        format!(
                            "event data is not a JSON object with a type: {}",
                            String::from_utf8_lossy(&data[..data.len().min(100)])
                        )
                    });
                    return;
                }
                (Some(t), Some(e))
                    if EventName::parse(t.as_bytes()) != e || e == EventName::Other =>
                {
                    self.malformed_before_content(|| {
                        format!("event type `{t}` does not match its name")
                    });
                    return;
                }
                (Some(t), None) if name == EventName::Other => {
                    self.malformed_before_content(|| format!("unknown event `{t}`"));
                    return;
                }
                _ => {}
            }
        }
        if let Some(r) = &read {
            self.note_usage(name, r);
        }
        match name {
            // A block opening usually carries no generated content yet: holding it keeps a failure
            // before the first delta transparent to fail over.
            EventName::ContentBlockStart => {
                // A block too large to read whole is not an empty opening.
                if read
                    .as_ref()
                    .map_or(!judged, |r| r.block_content.unwrap_or(false))
                {
                    self.facts.content = true;
                }
            }
            EventName::ContentBlockDelta => self.facts.content = true,
            EventName::MessageStart
            | EventName::Ping
            | EventName::ContentBlockStop
            | EventName::MessageDelta
            | EventName::Other => {}
            EventName::MessageStop => self.facts.message_stop = true,
            EventName::Error => {
                if self.facts.error.is_none() {
                    let (ty, message) = tree
                        .as_ref()
                        .and_then(|j| j.get("error"))
                        .map_or((None, String::new()), crate::wire::anthropic::read_error);
                    self.facts.error = Some((ty.unwrap_or("api_error").to_string(), message));
                }
            }
        }
    }
}

impl SseScanner {
    /// Notes `message_start`'s model and usage and `message_delta`'s usage. The model is kept as
    /// sent (the line cap bounds it); the tally shortens it.
    fn note_usage(&mut self, name: EventName, read: &EventData) {
        match name {
            EventName::MessageStart => {
                let Some((model, usage)) = &read.message else {
                    return;
                };
                let u = self.usage.get_or_insert_with(Box::default);
                if let Some(m) = model {
                    u.model = Some(m.clone());
                }
                u.usage.apply(usage);
            }
            EventName::MessageDelta => {
                if let Some(usage) = &read.usage {
                    self.usage
                        .get_or_insert_with(Box::default)
                        .usage
                        .apply(usage);
                }
            }
            _ => {}
        }
    }
}

/// An Anthropic SSE `error` event, as ccgate sends it when a stream breaks after bytes went out.
pub fn error_event(error_type: &str, message: &str) -> bytes::Bytes {
    let body =
        serde_json::json!({"type": "error", "error": {"type": error_type, "message": message}});
    bytes::Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\"}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn scan_in_pieces(s: &str, piece: usize) -> StreamFacts {
        let mut sc = SseScanner::new();
        for c in s.as_bytes().chunks(piece) {
            sc.feed(c);
        }
        sc.facts().clone()
    }

    #[test]
    fn any_chunking_gives_the_same_facts() {
        let whole = scan_in_pieces(STREAM, STREAM.len());
        assert_eq!(
            whole,
            StreamFacts {
                events: 5,
                content: true,
                message_stop: true,
                error: None,
                malformed: None,
            }
        );
        for piece in 1..40 {
            assert_eq!(scan_in_pieces(STREAM, piece), whole, "piece size {piece}");
        }
        let crlf = STREAM.replace('\n', "\r\n");
        assert_eq!(scan_in_pieces(&crlf, 7), whole);
    }

    #[test]
    fn fields_are_read_with_or_without_the_space_and_only_by_their_whole_name() {
        let whole = scan_in_pieces(STREAM, STREAM.len());
        // The space after the colon is optional (and only one is dropped).
        let tight = STREAM
            .replace("event: ", "event:")
            .replace("data: ", "data:");
        assert_eq!(scan_in_pieces(&tight, tight.len()), whole);
        assert_eq!(scan_in_pieces(&tight, 3), whole);
        // A name that only begins like a field is another field.
        for line in ["datas: {}", "data-x: {}", "events: ping", "eventx:ping"] {
            let f = scan_in_pieces(&format!("{line}\n\n{STREAM}"), 5);
            assert!(
                f.malformed
                    .as_deref()
                    .is_some_and(|m| m.contains("not an SSE field")),
                "{line}: {f:?}"
            );
        }
        // Two spaces: the value keeps the second, so the name is not known.
        let f = scan_in_pieces(
            "event:  message_start\ndata: {\"type\":\"message_start\"}\n\n",
            4,
        );
        assert!(
            f.malformed
                .as_deref()
                .is_some_and(|m| m.contains("unknown event")),
            "{f:?}"
        );
    }

    #[test]
    fn preamble_is_not_content() {
        let f = scan_in_pieces(
            "event: message_start\ndata: {}\n\nevent: content_block_start\ndata: {}\n\nevent: ping\ndata: {}\n\n",
            5,
        );
        assert!(!f.content && !f.message_stop);
        assert_eq!(f.events, 3);
    }

    #[test]
    fn an_error_event_is_under_way_from_its_name_to_its_blank_line() {
        let mut sc = SseScanner::new();
        let steps: [(&str, bool); 6] = [
            ("event: ping\ndata: {\"type\":\"ping\"}\n\n", false),
            ("event: err", false),
            ("or\n", true),
            ("data: {\"type\":\"error\",\"error\":{\"message\":\"a", true),
            ("b\"}}\n", true),
            ("\n", false),
        ];
        for (chunk, under_way) in steps {
            sc.feed(chunk.as_bytes());
            assert_eq!(sc.in_error_event(), under_way, "after {chunk:?}");
        }
        assert_eq!(sc.facts().error.as_ref().map(|e| e.1.as_str()), Some("ab"));
    }

    #[test]
    fn error_event_is_read() {
        let s = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let f = scan_in_pieces(s, 3);
        assert_eq!(
            f.error,
            Some(("overloaded_error".into(), "Overloaded".into()))
        );
        assert!(!f.content);
    }

    #[test]
    fn events_without_name_use_json_type() {
        let f = scan_in_pieces("data: {\"type\":\"message_stop\"}\n\n", 4);
        assert!(f.message_stop);
        let f = scan_in_pieces(
            "data: {\"type\":\"error\",\"error\":{\"type\":\"api_error\"}}\n\n",
            4,
        );
        assert_eq!(f.error.map(|e| e.0), Some("api_error".into()));
    }

    #[test]
    fn usage_comes_from_message_start_and_message_delta() {
        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"content\":[],\
\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":3,\"cache_read_input_tokens\":40,\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for piece in [1, 7, s.len()] {
            let mut sc = SseScanner::new();
            for c in s.as_bytes().chunks(piece) {
                sc.feed(c);
            }
            let u = sc.usage().expect("usage");
            assert_eq!(u.model.as_deref(), Some("claude-x"));
            assert_eq!(
                u.usage,
                crate::wire::usage::Usage {
                    input: 25,
                    output: 15,
                    cache_creation: 3,
                    cache_read: 40,
                    ..Default::default()
                }
            );
            assert!(sc.facts().message_stop && sc.facts().content);
        }
        assert!(scan_usage(STREAM).is_none());
    }

    fn scan_usage(s: &str) -> Option<MessageUsage> {
        let mut sc = SseScanner::new();
        sc.feed(s.as_bytes());
        sc.usage().cloned()
    }

    #[test]
    fn garbage_never_panics() {
        let mut sc = SseScanner::new();
        sc.feed(&[0xff, b'\n', b':', b'\n', b'\n', 0, 1, 2]);
        sc.feed(&vec![b'x'; 200_000]);
        sc.feed(b"\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        assert!(sc.facts().message_stop);
        assert!(sc.facts().malformed.is_some());
    }

    #[test]
    fn garbage_before_content_is_malformed() {
        for bad in [
            "\x00\u{ff}binary garbage\n\n",
            "event: nonsense\ndata: {\"type\":\"nonsense\"}\n\n",
            "event: ping\ndata: {not json\n\n",
            "event: ping\ndata: {\"type\":\"message_stop\"}\n\n",
            "data: {\"type\":\"nonsense\"}\n\n",
            "data: \x7f\x7f\n\n",
        ] {
            let s = format!("event: message_start\ndata: {{\"type\":\"message_start\"}}\n\n{bad}");
            let f = scan_in_pieces(&s, 3);
            assert!(f.malformed.is_some() && !f.content, "{bad:?}: {f:?}");
        }
        assert_eq!(scan_in_pieces(STREAM, 5).malformed, None);
    }

    #[test]
    fn unknown_events_after_content_are_relayed_unjudged() {
        let s = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\n\
event: brand_new\ndata: {\"type\":\"brand_new\"}\n\ndata: not json\n\n";
        let f = scan_in_pieces(s, 4);
        assert!(f.content && f.malformed.is_none(), "{f:?}");
    }

    #[test]
    fn a_block_start_commits_only_with_content() {
        let start = |block: &str| {
            format!(
                "event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{block}}}\n\n"
            )
        };
        for (block, content) in [
            (r#"{"type":"text","text":""}"#, false),
            (r#"{"type":"thinking","thinking":""}"#, false),
            (r#"{"type":"text","text":"Hi"}"#, true),
            (
                r#"{"type":"tool_use","id":"t","name":"f","input":{}}"#,
                true,
            ),
            (r#"{"type":"redacted_thinking","data":"x"}"#, true),
        ] {
            let f = scan_in_pieces(&start(block), 7);
            assert_eq!(f.content, content, "{block}");
            assert!(f.malformed.is_none(), "{block}");
        }
        // message_delta and content_block_stop only frame the answer.
        let f = scan_in_pieces(
            "event: message_delta\ndata: {\"type\":\"message_delta\"}\n\n",
            3,
        );
        assert!(!f.content && f.malformed.is_none());
    }

    #[test]
    fn boundary_is_tracked() {
        let mut sc = SseScanner::new();
        assert!(sc.at_boundary());
        sc.feed(b"event: ping\n");
        assert!(!sc.at_boundary());
        sc.feed(b"data: {\"type\":\"ping\"}\n\n");
        assert!(sc.at_boundary());
        sc.feed("data: caf\u{e9}".as_bytes().split_last().expect("bytes").1);
        assert!(!sc.at_boundary());
        sc.feed(b"\n");
        assert!(!sc.at_boundary());
        sc.feed(b"\r\n");
        assert!(sc.at_boundary());
        sc.feed(&vec![b'x'; 100_000]);
        assert!(!sc.at_boundary());
        sc.feed(b"\n");
        assert!(!sc.at_boundary());
        sc.feed(b"\n");
        assert!(sc.at_boundary());
    }

    /// A line too long to keep is judged the same whether it arrives whole in one chunk (read
    /// where it lies) or in pieces (gathered, then dropped at the cap).
    #[test]
    fn an_overlong_line_is_judged_alike_whole_or_in_pieces() {
        let big = format!(
            "event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"content_block\":{{\"type\":\"text\",\"text\":\"{}\"}}}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n",
            "x".repeat(MAX_LINE)
        );
        let whole = scan_in_pieces(&big, big.len());
        assert!(whole.content && whole.message_stop, "{whole:?}");
        assert_eq!(whole.malformed, None);
        for piece in [1000, 4096, MAX_LINE, MAX_LINE + 100] {
            assert_eq!(scan_in_pieces(&big, piece), whole, "piece size {piece}");
        }
    }

    #[test]
    fn error_event_bytes_parse_back() {
        let mut sc = SseScanner::new();
        sc.feed(&error_event("api_error", "upstream \"cut\""));
        assert_eq!(
            sc.facts().error,
            Some(("api_error".into(), "upstream \"cut\"".into()))
        );
    }
}
