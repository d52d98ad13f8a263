//! Pure byte formats read from the network: the JSON top-level reader, the SSE scanner, token usage
//! in answers, Anthropic error bodies and the model rewrite. No I/O, no clock, no ccgate state.

pub mod anthropic;
pub mod json_top;
pub mod model_map;
pub mod sse;
pub mod usage;
