//! The SSE scanner on arbitrary bytes: never panics, and the facts and usage it reports do not
//! depend on how the stream was cut into chunks (whole, in the sizes the input's first bytes name,
//! and one byte at a time).
#![no_main]

use ccgate::wire::sse::SseScanner;
use libfuzzer_sys::fuzz_target;

fn scan<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> SseScanner {
    let mut sc = SseScanner::new();
    for c in chunks {
        sc.feed(c);
    }
    sc
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: how many of the following bytes give chunk sizes (0..=7); the rest is the stream.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8).min(rest.len());
    let (sizes, stream) = rest.split_at(n);

    let whole = scan(std::iter::once(stream));
    let facts = whole.facts();
    // An event is dispatched by an empty line, so there are never more events than line feeds.
    let newlines = stream.iter().filter(|&&b| b == b'\n').count() as u64;
    assert!(
        facts.events <= newlines,
        "{} events, {newlines} LFs",
        facts.events
    );
    if facts.message_stop || facts.content || facts.error.is_some() {
        assert!(facts.events > 0);
    }

    // The same stream cut where the size bytes say (each size 1..=256, cycled).
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(1, |&s| usize::from(s) + 1);
        let end = (at + size).min(stream.len());
        chunks.push(&stream[at..end]);
        at = end;
        i += 1;
    }
    let split = scan(chunks.into_iter());
    assert_eq!(split.facts(), whole.facts(), "chunk sizes {sizes:?}");
    assert_eq!(split.usage(), whole.usage(), "chunk sizes {sizes:?}");

    let bytewise = scan(stream.chunks(1));
    assert_eq!(bytewise.facts(), whole.facts(), "byte at a time");
    assert_eq!(bytewise.usage(), whole.usage(), "byte at a time");
});
