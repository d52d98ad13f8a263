//! The request path: the handler and its attempt loop, one attempt, the relay body, error answers,
//! recent failovers and the probe requests. Does not know about admin views or the database.

pub mod entry;
pub mod events;
pub mod forward;
pub mod gateway;
pub mod handler;
pub mod probe;
pub mod recent;
pub mod relay;
pub mod response;
pub mod scrub;
pub mod usage;
