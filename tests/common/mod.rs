//! Helpers shared by the integration tests of the stream, pool, event and
//! HTTP modules.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Runs `f` on a thread and fails the test if it takes over 30 s (a hang
/// must fail, not stall CI).
pub fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("test body hung for 30 s")
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

/// A retry of `n` attempts, 1 ms apart (HTTP tests on real servers).
#[cfg(feature = "http")]
pub fn fast_retry(n: u32) -> smolkit::resilience::Retry {
    smolkit::resilience::Retry::new()
        .with_max_attempts(n)
        .with_backoff(smolkit::resilience::Backoff::constant(
            Duration::from_millis(1),
        ))
}

/// A `ChaosServer` on `addr` again after the previous one shut down: its
/// accept task lets go of the port on its own time, so the bind is retried
/// (up to 2 s).
pub async fn restart_on(addr: std::net::SocketAddr) -> smolkit::testing::ChaosServer {
    for _ in 0..400 {
        match smolkit::testing::ChaosServer::builder()
            .with_addr(addr)
            .start()
            .await
        {
            Ok(server) => return server,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                async_io::Timer::after(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("restart on {addr}: {e}"),
        }
    }
    panic!("{addr} was not free again within 2 s");
}
