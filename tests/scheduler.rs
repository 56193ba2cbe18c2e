//! The own `Runtime`'s scheduler: LIFO slot, its limit, the global queue's
//! turn, work stealing, and no lost wake-ups under load. Orders are checked
//! on a one-worker runtime, where they are deterministic; nothing here
//! measures time.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use futures_lite::future;
use smolkit::runtime::Runtime;

/// Fails the test instead of hanging when `fut` never completes (not a
/// speed assertion: far above what the code needs).
fn within<F: Future>(fut: F) -> F::Output {
    let limit = async {
        async_io::Timer::after(Duration::from_secs(20)).await;
        panic!("test future did not complete within 20 s");
    };
    async_io::block_on(future::or(fut, limit))
}

fn runtime(threads: usize) -> Runtime {
    Runtime::builder().with_threads(threads).build().unwrap()
}

#[test]
#[expect(
    clippy::async_yields_async,
    reason = "the queued task's handle is handed out, to be awaited after"
)]
fn a_task_woken_by_the_running_task_runs_next_on_its_worker() {
    let rt = runtime(1);
    let order = Arc::new(Mutex::new(Vec::new()));
    let (wake_tx, wake_rx) = async_channel::bounded::<()>(1);
    let (waiting_tx, waiting_rx) = async_channel::bounded::<()>(1);
    let woken = rt.spawn({
        let order = order.clone();
        async move {
            waiting_tx.send(()).await.unwrap();
            wake_rx.recv().await.unwrap();
            order.lock().unwrap().push("woken");
        }
    });
    // One worker: the waiter's poll ends (waiting) before the next task runs.
    within(waiting_rx.recv()).unwrap();
    let handle = rt.handle();
    let waker = rt.spawn({
        let order = order.clone();
        async move {
            // Queued first...
            let queued = handle.spawn({
                let order = order.clone();
                async move { order.lock().unwrap().push("queued") }
            });
            // ...but the task woken now runs first, right after this one.
            wake_tx.send(()).await.unwrap();
            order.lock().unwrap().push("waker");
            queued
        }
    });
    let queued = within(waker).unwrap();
    within(queued).unwrap();
    within(woken).unwrap();
    assert_eq!(*order.lock().unwrap(), ["waker", "woken", "queued"]);
}

/// Two tasks that wake each other `limit` times (or until `stop` is set);
/// returns how many round trips were done, live.
fn ping_pong(rt: &Runtime, limit: usize, stop: Arc<AtomicUsize>) -> Arc<AtomicUsize> {
    let trips = Arc::new(AtomicUsize::new(0));
    let (ping_tx, ping_rx) = async_channel::bounded::<()>(1);
    let (pong_tx, pong_rx) = async_channel::bounded::<()>(1);
    rt.spawn(async move {
        while ping_rx.recv().await.is_ok() {
            if pong_tx.send(()).await.is_err() {
                break;
            }
        }
    })
    .detach();
    rt.spawn({
        let trips = trips.clone();
        async move {
            for _ in 0..limit {
                if stop.load(Ordering::Acquire) != 0 {
                    break;
                }
                ping_tx.send(()).await.unwrap();
                pong_rx.recv().await.unwrap();
                trips.fetch_add(1, Ordering::AcqRel);
            }
        }
    })
    .detach();
    trips
}

#[test]
fn two_tasks_waking_each_other_do_not_starve_a_queued_task() {
    let rt = runtime(1);
    let stop = Arc::new(AtomicUsize::new(0));
    let handle = rt.handle();
    let seen = Arc::new(AtomicUsize::new(usize::MAX));
    let (ping_tx, ping_rx) = async_channel::bounded::<()>(1);
    let (pong_tx, pong_rx) = async_channel::bounded::<()>(1);
    rt.spawn(async move {
        while ping_rx.recv().await.is_ok() {
            if pong_tx.send(()).await.is_err() {
                break;
            }
        }
    })
    .detach();
    let pair = rt.spawn({
        let (seen, stop) = (seen.clone(), stop.clone());
        async move {
            let mut trips = 0;
            while trips < 10_000 && stop.load(Ordering::Acquire) == 0 {
                if trips == 1 {
                    // Queued behind the pair on this worker's queue.
                    let (seen, stop) = (seen.clone(), stop.clone());
                    handle
                        .spawn(async move {
                            seen.store(0, Ordering::Release);
                            stop.store(1, Ordering::Release);
                        })
                        .detach();
                }
                ping_tx.send(()).await.unwrap();
                pong_rx.recv().await.unwrap();
                trips += 1;
                if seen.load(Ordering::Acquire) == 0 {
                    seen.store(trips, Ordering::Release);
                }
            }
            trips
        }
    });
    let trips = within(pair).unwrap();
    let at = seen.load(Ordering::Acquire);
    // It ran within a few round trips of being queued, not after all of
    // them (the LIFO slot gives up after 3 runs in a row).
    assert!(
        at <= 10,
        "the queued task ran after round trip {at} of {trips}"
    );
}

#[test]
fn a_task_spawned_from_outside_runs_while_a_worker_stays_busy() {
    let rt = runtime(1);
    let stop = Arc::new(AtomicUsize::new(0));
    let trips = ping_pong(&rt, 1_000_000, stop.clone());
    // Wait (bounded) until the pair is under way, then queue from outside.
    within(async {
        while trips.load(Ordering::Acquire) < 10 {
            async_io::Timer::after(Duration::from_millis(1)).await;
        }
    });
    let outside = rt.spawn({
        let (trips, stop) = (trips.clone(), stop.clone());
        async move {
            stop.store(1, Ordering::Release);
            trips.load(Ordering::Acquire)
        }
    });
    let at = within(outside).unwrap();
    assert!(
        at < 1_000_000,
        "the task from outside ran only after the pair had finished"
    );
}

#[test]
fn a_second_worker_steals_from_a_busy_ones_queue() {
    let rt = runtime(2);
    let handle = rt.handle();
    let parent = rt.spawn(async move {
        // Both go to this worker's own queue. Each blocks its thread until
        // the other has started: they finish only if they run side by side,
        // that is, if the other worker steals one.
        let (a_tx, a_rx) = mpsc::channel::<()>();
        let (b_tx, b_rx) = mpsc::channel::<()>();
        let a = handle.spawn(async move {
            a_tx.send(()).unwrap();
            b_rx.recv_timeout(Duration::from_secs(10)).is_ok()
        });
        let b = handle.spawn(async move {
            b_tx.send(()).unwrap();
            a_rx.recv_timeout(Duration::from_secs(10)).is_ok()
        });
        (a, b)
    });
    let (a, b) = within(parent).unwrap();
    assert_eq!((within(a), within(b)), (Ok(true), Ok(true)));
}

#[test]
fn no_wake_up_is_lost_under_load_from_many_threads() {
    let rt = runtime(2);
    let handle = rt.handle();
    let spawners: Vec<_> = (0..4)
        .map(|_| {
            let handle = handle.clone();
            std::thread::spawn(move || {
                (0..250)
                    .map(|i| {
                        let (tx, rx) = async_channel::bounded::<usize>(1);
                        let echo = handle.spawn(async move {
                            let mut sum = 0;
                            while let Ok(v) = rx.recv().await {
                                sum += v;
                            }
                            sum
                        });
                        let feed = handle.spawn(async move {
                            for v in 0..20 {
                                tx.send(v + i).await.unwrap();
                            }
                        });
                        (i, echo, feed)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut pairs = 0;
    for s in spawners {
        for (i, echo, feed) in s.join().unwrap() {
            within(feed).unwrap();
            assert_eq!(within(echo), Ok((0..20).map(|v| v + i).sum::<usize>()));
            pairs += 1;
        }
    }
    assert_eq!(pairs, 1000);
    let stats = rt.stats();
    assert_eq!((stats.completed, stats.live), (2000, 0), "{stats:?}");
}
