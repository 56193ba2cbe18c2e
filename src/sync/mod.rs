//! The synchronisation primitives used by the lock-free parts of the crate:
//! std's normally, loom's under `--cfg smolkit_loom` so the model checker
//! can explore every interleaving (see `tests/loom.rs`).

pub(crate) mod oneshot;

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

/// Waits on `event` until `ready` gives a value: listen, check, then
/// await, so a notification between the check and the wait is never lost.
pub(crate) async fn wait_until<T>(
    event: &event_listener::Event,
    mut ready: impl FnMut() -> Option<T>,
) -> T {
    loop {
        let listener = event.listen();
        if let Some(v) = ready() {
            return v;
        }
        listener.await;
    }
}

/// [`wait_until`] for a condition.
pub(crate) async fn wait_for(event: &event_listener::Event, mut ready: impl FnMut() -> bool) {
    wait_until(event, || ready().then_some(())).await
}

/// Runs `fut` unless `signal` completes first (then `None`). `fut` is
/// polled first, so an outcome ready at the same time as the signal wins.
pub(crate) async fn unless<F: std::future::Future>(
    fut: F,
    signal: impl std::future::Future<Output = ()>,
) -> Option<F::Output> {
    use futures_lite::FutureExt;
    async { Some(fut.await) }
        .or(async {
            signal.await;
            None
        })
        .await
}
