//! The own `Runtime`'s scheduler: LIFO slot, its limit, the global queue's
//! turn, work stealing, and no lost wake-ups under load. Orders are checked
//! on a one-worker runtime, where they are deterministic; nothing here
//! measures time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use smolkit::runtime::{JoinHandle, Runtime};

mod common;
use common::block_within as within;

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

/// An echo task and a driver that wake each other up to `limit` round
/// trips; after each, `after_trip(trips done)` says whether to go on. The
/// driver's handle gives the round trips done.
fn ping_pong(
    rt: &Runtime,
    limit: usize,
    mut after_trip: impl FnMut(usize) -> bool + Send + 'static,
) -> JoinHandle<usize> {
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
    rt.spawn(async move {
        let mut trips = 0;
        while trips < limit {
            ping_tx.send(()).await.unwrap();
            pong_rx.recv().await.unwrap();
            trips += 1;
            if !after_trip(trips) {
                break;
            }
        }
        trips
    })
}

#[test]
fn two_tasks_waking_each_other_do_not_starve_a_queued_task() {
    let rt = runtime(1);
    let handle = rt.handle();
    let ran = Arc::new(AtomicBool::new(false));
    let pair = ping_pong(&rt, 10_000, move |trips| {
        if trips == 1 {
            // Queued behind the pair on this worker's queue.
            let ran = ran.clone();
            handle
                .spawn(async move { ran.store(true, Ordering::Release) })
                .detach();
        }
        // Stop at the first round trip after it ran.
        !ran.load(Ordering::Acquire)
    });
    let at = within(pair).unwrap();
    // It ran within a few round trips of being queued, not after all of
    // them (the LIFO slot gives up after 3 runs in a row).
    assert!(
        at <= 10,
        "the queued task ran after round trip {at} of 10000"
    );
}

#[test]
fn a_task_spawned_from_outside_runs_while_a_worker_stays_busy() {
    let rt = runtime(1);
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = async_channel::bounded::<()>(1);
    let pair = ping_pong(&rt, 1_000_000, {
        let stop = stop.clone();
        move |trips| {
            if trips == 10 {
                let _ = started_tx.try_send(());
            }
            !stop.load(Ordering::Acquire)
        }
    });
    // Once the pair is under way, queue a task from outside: it must run
    // (and stop the pair) before the pair has done all its round trips.
    within(started_rx.recv()).unwrap();
    within(rt.spawn(async move { stop.store(true, Ordering::Release) })).unwrap();
    let trips = within(pair).unwrap();
    assert!(
        trips < 1_000_000,
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
