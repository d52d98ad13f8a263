//! Anthropic error objects read back from upstream answers
//! (`{"type":"error","error":{"type":...,"message":...}}`).

/// The longest `error.message` kept from an upstream error (in characters).
pub const MAX_ERROR_MESSAGE: usize = 300;

/// An upstream Anthropic error object (the `error` of an error body or SSE `error` event): its
/// `type`, if it names one, and its `message` (empty if none), shortened to
/// [`MAX_ERROR_MESSAGE`] characters.
pub fn read_error(error: &serde_json::Value) -> (Option<&str>, String) {
    let ty = error.get("type").and_then(|t| t.as_str());
    let message = error.get("message").and_then(|t| t.as_str()).unwrap_or("");
    (ty, message.chars().take(MAX_ERROR_MESSAGE).collect())
}

/// The `error.type` and `error.message` of an Anthropic error body, shortened, for `last_error`.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let (ty, message) = read_error(v.get("error")?);
    Some(format!("{}: {message}", ty.unwrap_or("error")))
}
