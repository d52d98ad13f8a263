//! The synchronisation primitives behind health transitions, swappable for loom's.
//!
//! Normal builds get `std`'s atomics and `parking_lot`'s mutex, exactly as if they were named
//! directly. Under `--cfg ccgate_loom` the same names are loom's model-checked versions, so the
//! one-winner transition ([`crate::health::queue::FailureQueue::transition`]) and the counter snapshot
//! ([`crate::health::endpoint::Live::snapshot`]) run unchanged inside `loom::model` and every interleaving
//! of them is explored (see `tests/one_winner.rs`).

#[cfg(not(ccgate_loom))]
pub(crate) use parking_lot::Mutex;
#[cfg(not(ccgate_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64};

#[cfg(ccgate_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64};

/// loom's mutex with `parking_lot`'s infallible `lock`.
#[cfg(ccgate_loom)]
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(ccgate_loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
