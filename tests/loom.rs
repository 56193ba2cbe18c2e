//! loom model checks of the Semaphore: every interleaving of a few threads
//! (bounded by `LOOM_MAX_PREEMPTIONS`, set in `.ci/run`).
//!
//! Run: `RUSTFLAGS="--cfg smolkit_loom" CARGO_TARGET_DIR=target/loom \
//!       cargo test --release --test loom`
#![cfg(smolkit_loom)]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

use loom::future::block_on;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use smolkit::limit::{AcquireError, Semaphore};

#[test]
fn never_admits_more_than_the_capacity() {
    loom::model(|| {
        let sem = Arc::new(Semaphore::new(1));
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (sem, inside) = (sem.clone(), inside.clone());
                thread::spawn(move || {
                    block_on(async {
                        let _g = sem.acquire().await.unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(sem.available(), 1);
    });
}

#[test]
fn a_release_always_wakes_the_waiter() {
    // A lost wake-up leaves the waiting thread blocked forever, which loom
    // reports as a deadlock.
    loom::model(|| {
        let sem = Arc::new(Semaphore::new(1));
        let held = sem.try_acquire().unwrap();
        let t = {
            let sem = sem.clone();
            thread::spawn(move || {
                block_on(async {
                    let g = sem.acquire().await.unwrap();
                    assert_eq!(g.permits(), 1);
                })
            })
        };
        drop(held);
        t.join().unwrap();
        assert_eq!(sem.available(), 1);
    });
}

#[test]
fn a_cancelled_acquire_leaks_no_permit() {
    loom::model(|| {
        let sem = Arc::new(Semaphore::new(2));
        let held = sem.try_acquire().unwrap();
        let t = {
            let sem = sem.clone();
            thread::spawn(move || {
                let mut fut = pin!(sem.acquire_many(2));
                // Polled once (maybe queued with a partial permit), then
                // dropped, racing the release below.
                let _ = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            })
        };
        drop(held);
        t.join().unwrap();
        assert_eq!(sem.available(), 2);
        assert_eq!(sem.waiting(), 0);
        assert!(sem.try_acquire_many(2).is_ok());
    });
}

#[test]
fn resizing_during_contention_keeps_the_books() {
    loom::model(|| {
        let sem = Arc::new(Semaphore::new(2));
        let t = {
            let sem = sem.clone();
            thread::spawn(move || {
                block_on(async {
                    let g = sem.acquire().await.unwrap();
                    drop(g);
                })
            })
        };
        let g = sem.try_acquire();
        sem.set_permits(1);
        drop(g);
        t.join().unwrap();
        assert_eq!(sem.capacity(), 1);
        assert_eq!(sem.available(), 1);
        assert_eq!(sem.waiting(), 0);
    });
}

#[test]
fn close_races_a_waiter_without_losing_it() {
    loom::model(|| {
        let sem = Arc::new(Semaphore::new(1));
        let held = sem.try_acquire().unwrap();
        let t = {
            let sem = sem.clone();
            thread::spawn(move || block_on(sem.acquire()).map(|g| g.permits()))
        };
        sem.close();
        let result = t.join().unwrap();
        assert_eq!(result, Err(AcquireError::Closed));
        drop(held);
        assert_eq!(sem.available(), 1);
    });
}

/// Issue 14 #10: two records racing must leave the semaphore at the
/// algorithm's limit. With the resize after the state lock was released,
/// one interleaving applied the older decision last (11 instead of 12).
#[test]
fn racing_adaptive_records_resize_in_decision_order() {
    use smolkit::limit::{AdaptiveLimit, Aimd, Outcome, Sample};
    use std::time::Duration;
    loom::model(|| {
        let limit = Arc::new(AdaptiveLimit::new(10, 1, 100, Aimd::new()).unwrap());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let limit = limit.clone();
                thread::spawn(move || {
                    limit.record(Sample::new(Duration::ZERO, Outcome::Success, 1 << 20));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(limit.limit(), 12);
    });
}
