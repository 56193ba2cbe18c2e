//! Fixed work on smolkit's `Runtime` (2 threads) for instruction counts:
//! 5 × spawn + join of 100k tiny tasks, or 5 × a 10k ping-pong between two
//! tasks, with the monitor on or off; or (`sem-smolkit` / `sem-tokio`)
//! 51 200 contended acquisitions by 64 tasks over 16 permits (or the
//! permits given third), each holding
//! its permit across a yield, with smolkit's or tokio's semaphore. Criterion's rows of the same
//! workloads swing by ±20% on this machine; callgrind's counts do not.
//!
//! Run: `cargo build --release --manifest-path benches/Cargo.toml --example runtime_count`,
//! then `valgrind --tool=callgrind benches/target/release/examples/runtime_count <on|off> <spawn|ping|sem-smolkit|sem-tokio|sem-tokio-rt|sem-on-tokio-smolkit> [permits] [rounds]`.

use smolkit::runtime::Runtime;

const ROUNDS: usize = 5;
const TASKS: u64 = 100_000;
const ROUND_TRIPS: u64 = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(monitor), Some(work)) = (args.get(1), args.get(2)) else {
        eprintln!(
            "usage: runtime_count <on|off> <spawn|ping|sem-smolkit|sem-tokio|sem-tokio-rt|sem-on-tokio-smolkit>"
        );
        std::process::exit(2);
    };
    let permits: usize = args.get(3).and_then(|p| p.parse().ok()).unwrap_or(16);
    // A fourth argument: rounds instead of 5 (the difference between two
    // counts is a round's cost without the one-time start-up).
    let rounds: usize = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(ROUNDS);
    let rt = Runtime::builder()
        .with_threads(2)
        .with_monitor(monitor == "on")
        .build()
        .expect("a runtime");
    if let Some(which) = work.strip_prefix("sem-on-tokio-") {
        contended_on_tokio(which == "tokio", permits, rounds);
        return;
    }
    if work == "sem-tokio-rt" {
        contended_on_tokio(true, permits, rounds);
        return;
    }
    for _ in 0..rounds {
        if let Some(which) = work.strip_prefix("sem-") {
            contended(&rt, which == "tokio", permits);
        } else if work == "spawn" {
            let sum = rt.block_on(async {
                let handles: Vec<_> = (0..TASKS).map(|i| rt.spawn(async move { i })).collect();
                let mut sum = 0;
                for h in handles {
                    sum += h.await.expect("no panic");
                }
                sum
            });
            assert_eq!(sum, TASKS * (TASKS - 1) / 2);
        } else {
            rt.block_on(async {
                let (ping_tx, ping_rx) = async_channel::bounded::<u64>(1);
                let (pong_tx, pong_rx) = async_channel::bounded::<u64>(1);
                let echo = rt.spawn(async move {
                    while let Ok(v) = ping_rx.recv().await {
                        if pong_tx.send(v).await.is_err() {
                            break;
                        }
                    }
                });
                let driver = rt.spawn(async move {
                    for i in 0..ROUND_TRIPS {
                        ping_tx.send(i).await.expect("echo alive");
                        assert_eq!(pong_rx.recv().await, Ok(i));
                    }
                });
                driver.await.expect("no panic");
                echo.await.expect("no panic");
            });
        }
    }
}

/// 64 tasks, `permits` permits, 800 acquisitions each.
fn contended(rt: &Runtime, tokio_sem: bool, permits: usize) {
    use std::sync::Arc;
    const TASKS: usize = 64;
    const EACH: usize = 800;
    let ours = Arc::new(smolkit::limit::Semaphore::new(permits));
    let theirs = Arc::new(tokio::sync::Semaphore::new(permits));
    rt.block_on(async {
        let handles: Vec<_> = (0..TASKS)
            .map(|_| {
                let (ours, theirs) = (ours.clone(), theirs.clone());
                rt.spawn(async move {
                    for _ in 0..EACH {
                        if tokio_sem {
                            let g = theirs.acquire().await.expect("open");
                            futures_lite::future::yield_now().await;
                            drop(g);
                        } else {
                            let g = ours.acquire().await.expect("open");
                            futures_lite::future::yield_now().await;
                            drop(g);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("no panic");
        }
    });
}

/// The same as [`contended`] on tokio's 2-thread runtime, with tokio's
/// semaphore (the bench's `tokio_on_tokio` row) or smolkit's
/// (`smolkit_on_tokio`), `rounds` times.
fn contended_on_tokio(tokio_sem: bool, permits: usize, rounds: usize) {
    use std::sync::Arc;
    let tk = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("a tokio runtime");
    for _ in 0..rounds {
        let ours = Arc::new(smolkit::limit::Semaphore::new(permits));
        let theirs = Arc::new(tokio::sync::Semaphore::new(permits));
        tk.block_on(async {
            let handles: Vec<_> = (0..64)
                .map(|_| {
                    let (ours, theirs) = (ours.clone(), theirs.clone());
                    tokio::spawn(async move {
                        for _ in 0..800 {
                            if tokio_sem {
                                let g = theirs.acquire().await.expect("open");
                                tokio::task::yield_now().await;
                                drop(g);
                            } else {
                                let g = ours.acquire().await.expect("open");
                                tokio::task::yield_now().await;
                                drop(g);
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.await.expect("no panic");
            }
        });
    }
}
