//! Helpers shared by the integration tests of the stream, pool, event and
//! HTTP modules.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Runs `f` on a thread and fails the test if it takes over 30 s (a hang
/// must fail, not stall CI).
pub fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    within_for(Duration::from_secs(30), f)
}

/// [`within`] with another bound, for tests that move a lot of data.
pub fn within_for<T: Send + 'static>(bound: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(bound)
        .unwrap_or_else(|_| panic!("test body hung for {bound:?}"))
}

/// Runs `fut` on this thread and fails the test instead of hanging when it
/// has not completed in 20 s (a bound, not a speed assertion: far above
/// anything the code under test needs).
pub fn block_within<F: std::future::Future>(fut: F) -> F::Output {
    let limit = async {
        async_io::Timer::after(Duration::from_secs(20)).await;
        panic!("test future did not complete within 20 s");
    };
    async_io::block_on(futures_lite::future::or(fut, limit))
}

/// Waits (bounded: 20 s of 1 ms naps) until `cond` holds, for state that
/// real threads reach on their own time.
pub fn eventually(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// [`eventually`] for state read by an async call (20 s of 5 ms naps).
pub async fn eventually_async<F, Fut>(what: &str, cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        async_io::Timer::after(Duration::from_millis(5)).await;
    }
}

/// A retry of `n` attempts, 1 ms apart (HTTP tests on real servers).
#[cfg(feature = "http")]
pub fn fast_retry(n: u32) -> smolkit::resilience::Retry {
    smolkit::resilience::Retry::new()
        .with_max_attempts(n)
        .with_backoff(smolkit::resilience::Backoff::constant(
            Duration::from_millis(1),
        ))
}

/// Shuts `old` down and starts a `ChaosServer` on its address again, once
/// the old one has let go of the port.
pub async fn restart(old: smolkit::testing::ChaosServer) -> smolkit::testing::ChaosServer {
    let addr = old.addr();
    old.shutdown();
    old.closed().await;
    drop(old);
    smolkit::testing::ChaosServer::builder()
        .with_addr(addr)
        .start()
        .await
        .unwrap_or_else(|e| panic!("restart on {addr}: {e}"))
}

#[cfg(feature = "redis")]
pub mod redis_server;

pub mod queue_contract;
