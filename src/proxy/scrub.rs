//! Scrubbing relayed error answers of every configured secret, in body and header values; and
//! upstream text made safe for a log line.

use std::fmt::Write as _;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

use crate::health::endpoint::encoded_forms;
use crate::health::registry::Registry;

/// The secrets an upstream could echo: every endpoint's credential (ccgate never sends the
/// client's own).
pub(crate) fn secrets(reg: &Registry) -> impl Iterator<Item = &[u8]> {
    reg.endpoints.iter().filter_map(|e| {
        let v = e.auth_header.as_ref()?.1.as_bytes();
        let v = v.strip_prefix(b"Bearer ").unwrap_or(v);
        (v.len() >= 4).then_some(v)
    })
}

/// `text` with every secret replaced by `***`, as written or percent-encoded (see
/// [`encoded_forms`]), or `None` when it holds none.
pub(crate) fn scrub_bytes(reg: &Registry, text: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let encoded = memchr::memchr(b'%', text).is_some();
    for secret in secrets(reg) {
        replace_all(&mut out, text, secret);
        if encoded {
            for form in encoded_forms(secret) {
                replace_all(&mut out, text, &form);
            }
        }
    }
    out
}

/// Replaces every `needle` in `out` (or in `text`, while `out` holds nothing yet) by `***`.
fn replace_all(out: &mut Option<Vec<u8>>, text: &[u8], needle: &[u8]) {
    let current = out.as_deref().unwrap_or(text);
    if memchr::memmem::find(current, needle).is_none() {
        return;
    }
    let mut next = Vec::with_capacity(current.len());
    let mut rest = current;
    while let Some(i) = memchr::memmem::find(rest, needle) {
        next.extend_from_slice(&rest[..i]);
        next.extend_from_slice(b"***");
        rest = &rest[i + needle.len()..];
    }
    next.extend_from_slice(rest);
    *out = Some(next);
}

/// Replaces every secret in the header values of a relayed error answer.
pub(crate) fn scrub_headers(reg: &Registry, headers: &mut HeaderMap) {
    for value in headers.values_mut() {
        if let Some(clean) = scrub_bytes(reg, value.as_bytes()) {
            *value = HeaderValue::from_bytes(&clean).unwrap_or(HeaderValue::from_static("***"));
        }
    }
}

/// A relayed error answer's body with every secret replaced; the frames as they were (shared, not
/// copied) when it holds none. A changed body loses its `content-length` (the relay sets it).
pub(crate) fn scrub_body(
    reg: &Registry,
    frames: Vec<Bytes>,
    headers: &mut HeaderMap,
) -> Vec<Bytes> {
    let clean = match frames.as_slice() {
        [] => None,
        [one] => scrub_bytes(reg, one),
        many => scrub_bytes(reg, &many.concat()),
    };
    match clean {
        None => frames,
        Some(clean) => {
            headers.remove(header::CONTENT_LENGTH);
            vec![Bytes::from(clean)]
        }
    }
}

/// Text from an upstream (an error message, a probe's finding) as a log field: control characters
/// escaped (`\n` as `\\n`), so the text cannot end the line and forge the next one.
pub(crate) struct OneLine<'a>(pub &'a str);

impl std::fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::OneLine;

    #[test]
    fn one_line_escapes_control_characters_only() {
        let forged =
            "boom\n2026-12-07T00:00:00Z  INFO request outcome=\"success\"\r\x1b[31m\u{85}é";
        assert_eq!(
            OneLine(forged).to_string(),
            "boom\\n2026-12-07T00:00:00Z  INFO request outcome=\"success\"\\r\\u{1b}[31m\\u{85}é"
        );
        assert_eq!(OneLine("plain text").to_string(), "plain text");
    }
}
