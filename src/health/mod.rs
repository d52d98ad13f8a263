//! Endpoint facts and live counters, the attempt guard, the pure health machine, the failure queue,
//! the registry of endpoints and the outcome classifier. Knows nothing of selection strategies, the
//! request handler or storage: transitions publish episode events that the store drains.

pub mod attempt;
pub mod classify;
pub mod endpoint;
pub mod estimate;
pub mod machine;
pub mod queue;
pub mod registry;
pub mod totals;
