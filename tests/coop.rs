//! Cooperative yielding: a task that keeps finding work ready (a `process`
//! consumer, a pool worker, a bus subscriber or handler, a pipeline) gives
//! its thread back after a budget of ready items, so timers and other
//! tasks on the same thread are not starved.
//!
//! Everything runs on one `smol::Executor` driven by one thread, and the
//! tests count items, not time: how many were taken before a timeout on a
//! `ManualClock` fired, or how many were handled between two turns of a
//! task that only yields.

mod common;

use common::within;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_lite::{Stream, StreamExt, future};
use smolkit::events::{Bus, SubscribeOptions};
use smolkit::pool::{Pipeline, Stage, WorkerPool};
use smolkit::resilience::timeout_on;
use smolkit::testing::ManualClock;

/// Items made ready before the busy loop starts: far more than any budget.
const N: usize = 10_000;

/// The most items a busy loop may take before a timeout around it fires:
/// one budget before the timer is seen as due, one more before the timer
/// is polled again (the crate's budget is 256 items).
const TIMEOUT_BOUND: usize = 2 * 256 + 2;

/// The most items the busy tasks together may handle between two turns of
/// a task that only yields: a budget for each of up to four busy tasks.
const GAP_BOUND: usize = 4 * 256 + 4;

type Ex = Arc<smol::Executor<'static>>;

/// Runs `f` on a one-thread executor.
fn one_thread<T, Fut>(f: impl FnOnce(Ex) -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T>,
{
    within(move || {
        let ex: Ex = Arc::new(smol::Executor::new());
        smol::block_on(ex.run(f(ex.clone())))
    })
}

/// Yields until `cond` holds (bounded).
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1_000_000 {
        if cond() {
            return;
        }
        future::yield_now().await;
    }
    panic!("never saw {what}");
}

/// Reads `items` in a loop that a 10 ms timeout on a manual clock cuts
/// short (a task beside it moves the clock as soon as the timeout waits);
/// returns whether the timeout fired and how many items the loop took.
async fn timed_out<S: Stream + Unpin>(ex: &Ex, mut items: S) -> (bool, usize) {
    let clock = Arc::new(ManualClock::new());
    let mover = ex.spawn({
        let clock = clock.clone();
        async move {
            clock.wait_for_sleepers(1).await;
            clock.advance(Duration::from_millis(10));
        }
    });
    let mut taken = 0;
    let busy = async {
        while items.next().await.is_some() {
            taken += 1;
        }
    };
    let fired = timeout_on(&*clock, Duration::from_millis(10), busy)
        .await
        .is_err();
    drop(mover);
    (fired, taken)
}

/// The timeout fired, within [`TIMEOUT_BOUND`] items.
fn assert_fired((fired, taken): (bool, usize), what: &str) {
    assert!(
        fired,
        "the timeout never fired: the loop took all {taken} {what}"
    );
    assert!(
        taken <= TIMEOUT_BOUND,
        "{taken} {what} taken before the timeout fired"
    );
}

/// Runs `busy` beside a task that only yields (started first), and returns
/// the most `progress` made between two of that task's turns.
async fn largest_gap(ex: &Ex, progress: Arc<AtomicUsize>, busy: impl Future<Output = ()>) -> usize {
    let done = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let watcher = ex.spawn({
        let (done, started) = (done.clone(), started.clone());
        async move {
            let (mut last, mut gap) = (progress.load(Ordering::Relaxed), 0);
            started.store(true, Ordering::Release);
            for _ in 0..10_000_000 {
                if done.load(Ordering::Acquire) {
                    break;
                }
                let now = progress.load(Ordering::Relaxed);
                gap = gap.max(now - last);
                last = now;
                future::yield_now().await;
            }
            gap
        }
    });
    until("the watcher's first turn", || {
        started.load(Ordering::Acquire)
    })
    .await;
    busy.await;
    done.store(true, Ordering::Release);
    watcher.await
}

#[test]
fn a_timeout_around_a_busy_process_loop_fires() {
    let out = one_thread(|ex| async move {
        let pool = WorkerPool::builder(|x: usize| async move { Ok::<_, ()>(x) })
            .with_workers(1)
            .with_capacity(2 * N)
            .with_spawner(ex.clone())
            .build()
            .unwrap();
        let results = pool.process(futures_lite::stream::iter(0..N), false);
        until("every job done", || pool.stats().completed == N as u64).await;
        timed_out(&ex, results).await
    });
    assert_fired(out, "results");
}

#[test]
fn a_timeout_around_a_busy_subscriber_fires() {
    let out = one_thread(|ex| async move {
        let bus = Bus::<usize>::builder()
            .with_spawner(ex.clone())
            .build()
            .unwrap();
        let sub = bus
            .subscribe_with("t", SubscribeOptions::new().with_capacity(2 * N))
            .unwrap();
        for i in 0..N {
            bus.try_emit("t", i).unwrap();
        }
        timed_out(&ex, sub).await
    });
    assert_fired(out, "events");
}

#[test]
fn busy_pool_workers_let_a_task_beside_them_run() {
    let gap = one_thread(|ex| async move {
        let progress = Arc::new(AtomicUsize::new(0));
        let ran = progress.clone();
        let pool = WorkerPool::builder(move |x: usize| {
            ran.fetch_add(1, Ordering::Relaxed);
            async move { Ok::<_, ()>(x) }
        })
        .with_workers(2)
        .with_capacity(2 * N)
        .with_spawner(ex.clone())
        .build()
        .unwrap();
        largest_gap(&ex, progress, async move {
            let handles: Vec<_> = (0..N).map(|i| pool.try_submit(i).unwrap()).collect();
            for h in handles {
                h.await.unwrap();
            }
        })
        .await
    });
    assert!(
        gap <= GAP_BOUND,
        "{gap} jobs ran between two turns of a task beside them"
    );
}

#[test]
fn a_busy_handler_lets_a_task_beside_it_run() {
    let gap = one_thread(|ex| async move {
        let bus = Bus::<usize>::builder()
            .with_spawner(ex.clone())
            .with_capacity(2 * N)
            .build()
            .unwrap();
        let handled = Arc::new(AtomicUsize::new(0));
        bus.on("t", {
            let handled = handled.clone();
            move |_| {
                handled.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, String>(()) }
            }
        })
        .unwrap();
        let gap = largest_gap(&ex, handled.clone(), async {
            for i in 0..N {
                bus.try_emit("t", i).unwrap();
            }
            until("every event handled", || {
                handled.load(Ordering::Relaxed) == N
            })
            .await;
        })
        .await;
        bus.shutdown().await;
        gap
    });
    assert!(
        gap <= GAP_BOUND,
        "{gap} events handled between two turns of a task beside them"
    );
}

#[test]
fn a_busy_pipeline_lets_a_task_beside_it_run() {
    let gap = one_thread(|ex| async move {
        let progress = Arc::new(AtomicUsize::new(0));
        let source = {
            let progress = progress.clone();
            futures_lite::stream::iter(0..N).inspect(move |_| {
                progress.fetch_add(1, Ordering::Relaxed);
            })
        };
        let staged = progress.clone();
        let sunk = progress.clone();
        let run = Pipeline::from_stream(source)
            .with_capacity(2 * N)
            .with_spawner(ex.clone())
            .map(Stage::new("inc"), move |x| {
                staged.fetch_add(1, Ordering::Relaxed);
                async move { Ok::<_, String>(x + 1) }
            })
            .run(move |_| {
                sunk.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, String>(()) }
            });
        let gap = largest_gap(&ex, progress.clone(), async {
            let report = run.await.unwrap();
            assert_eq!(report.inputs, N as u64);
        })
        .await;
        assert_eq!(progress.load(Ordering::Relaxed), 3 * N);
        gap
    });
    assert!(
        gap <= GAP_BOUND,
        "{gap} steps between two turns of a task beside the pipeline"
    );
}
