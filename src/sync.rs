//! The synchronisation primitives used by the lock-free parts of the crate:
//! std's normally, loom's under `--cfg smolkit_loom` so the model checker
//! can explore every interleaving (see `tests/loom.rs`).

#[cfg(not(smolkit_loom))]
pub(crate) use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
#[cfg(not(smolkit_loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(smolkit_loom)]
pub(crate) use loom::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
#[cfg(smolkit_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: every critical section in the crate
/// leaves its data consistent before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for a std mutex whatever the cfg: for the modules that no loom
/// model covers (pools, pipelines, the event bus).
pub(crate) fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
