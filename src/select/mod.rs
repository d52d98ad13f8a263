//! Choosing candidates for one request: strategies, the session → endpoint map, the retry budget.
//! Reads published health state; never changes it.

pub mod affinity;
pub mod budget;
pub mod strategy;
