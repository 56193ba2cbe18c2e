//! The runtime layer: `Spawn`/`JoinHandle` semantics on every executor, the
//! own `Runtime` and its monitor, `ManualClock`, `offload`.

use std::future::Future;
use std::num::NonZeroUsize;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use futures_lite::future;
use smolkit::runtime::offload::{self, CpuPool, OffloadError};
use smolkit::runtime::{Clock, JoinError, Runtime, SmolGlobal, Spawn, SpawnExt};
use smolkit::testing::ManualClock;

mod common;
use common::block_within as within;

/// Sends on `tx` when dropped: proves a task's future was dropped. A task
/// cancelled before its first poll drops the sender without sending, which
/// closes the channel: `recv` completing either way is the proof.
struct DropSignal(async_channel::Sender<()>);
impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

fn runtime(threads: usize) -> Runtime {
    Runtime::builder().with_threads(threads).build().unwrap()
}

// ---------------------------------------------------------------------------
// One suite of `Spawn` semantics, run on every executor.

async fn spawn_suite(spawner: Arc<dyn Spawn>) {
    // Outputs come back.
    let handles: Vec<_> = (0..10u64)
        .map(|i| spawner.spawn(async move { i * i }))
        .collect();
    let mut sum = 0;
    for h in handles {
        sum += h.await.unwrap();
    }
    assert_eq!(sum, 285);

    // Dropping the handle cancels the task.
    let (tx, rx) = async_channel::bounded(1);
    let (started_tx, started_rx) = async_channel::bounded(1);
    let handle = spawner.spawn(async move {
        let _signal = DropSignal(tx);
        started_tx.send(()).await.unwrap();
        future::pending::<()>().await;
    });
    started_rx.recv().await.unwrap();
    drop(handle);
    rx.recv().await.expect("task future was dropped");

    // Detach keeps it running.
    let (go_tx, go_rx) = async_channel::bounded::<u32>(1);
    let (out_tx, out_rx) = async_channel::bounded(1);
    spawner
        .spawn(async move {
            let v = go_rx.recv().await.unwrap();
            out_tx.send(v + 1).await.unwrap();
        })
        .detach();
    go_tx.send(41).await.unwrap();
    assert_eq!(out_rx.recv().await.unwrap(), 42);

    // A panic is an error value, and later tasks still run.
    let bad = spawner.spawn(async { panic!("boom in task") });
    assert_eq!(bad.await, Err(JoinError::Panicked("boom in task".into())));
    assert_eq!(spawner.spawn(async { 7 }).await, Ok(7));

    // Named spawning works everywhere, even where names are ignored.
    assert_eq!(spawner.spawn_named("named", async { 8 }).await, Ok(8));
}

#[test]
fn spawn_semantics_hold_on_smol_global_executor() {
    within(spawn_suite(Arc::new(SmolGlobal)));
}

#[test]
fn spawn_semantics_hold_on_a_smol_executor() {
    let ex = Arc::new(smol::Executor::new());
    let spawner: Arc<dyn Spawn> = ex.clone();
    within(ex.run(spawn_suite(spawner)));
}

#[test]
fn spawn_semantics_hold_on_the_own_runtime() {
    let rt = runtime(2);
    within(spawn_suite(Arc::new(rt.handle())));
    // NOTE: a task spawned through `dyn Spawn` wakes its handle from inside
    // its last poll and is counted when that poll returns, so wait for the
    // counters to settle (bounded) before asserting.
    within(async {
        for _ in 0..10_000 {
            if rt.stats().live == 0 {
                return;
            }
            async_io::Timer::after(Duration::from_millis(1)).await;
        }
        panic!("tasks still live: {:?}", rt.stats());
    });
    let stats = rt.stats();
    assert_eq!(stats.panicked, 1, "{stats:?}");
    assert!(stats.cancelled >= 1, "{stats:?}");
}

#[cfg(feature = "async-std")]
#[test]
fn spawn_semantics_hold_on_async_std() {
    within(spawn_suite(Arc::new(smolkit::runtime::AsyncStd)));
}

// ---------------------------------------------------------------------------
// The own Runtime.

#[test]
fn dropping_a_runtime_join_handle_cancels_the_task() {
    let rt = runtime(2);
    let (tx, rx) = async_channel::bounded(1);
    let handle = rt.spawn(async move {
        let _signal = DropSignal(tx);
        future::pending::<()>().await;
    });
    drop(handle);
    let _ = within(rx.recv());
    // The monitor counts the cancellation before the task's future is
    // dropped, so it is visible as soon as the drop is.
    assert_eq!(rt.stats().cancelled, 1, "{:?}", rt.stats());
    assert_eq!(rt.stats().live, 0);
}

#[test]
fn detached_task_keeps_running_on_the_runtime() {
    let rt = runtime(1);
    let (go_tx, go_rx) = async_channel::bounded::<u32>(1);
    let (out_tx, out_rx) = async_channel::bounded(1);
    rt.spawn(async move {
        let v = go_rx.recv().await.unwrap();
        out_tx.send(v * 2).await.unwrap();
    })
    .detach();
    within(go_tx.send(21)).unwrap();
    assert_eq!(within(out_rx.recv()), Ok(42));
}

#[test]
fn panic_becomes_join_error_and_the_single_worker_survives() {
    let rt = runtime(1);
    let bad = rt.spawn(async { panic!("worker panic {}", 42) });
    assert_eq!(
        within(bad),
        Err(JoinError::Panicked("worker panic 42".into()))
    );
    let good = rt.spawn(async { "still alive" });
    assert_eq!(within(good), Ok("still alive"));
    let stats = rt.stats();
    assert_eq!(
        (stats.panicked, stats.completed, stats.live),
        (1, 1, 0),
        "{stats:?}"
    );
}

#[test]
fn shutdown_cancels_stragglers_and_returns() {
    let rt = runtime(2);
    let (tx, rx) = async_channel::bounded(1);
    let straggler = rt.spawn(async move {
        let _signal = DropSignal(tx);
        future::pending::<()>().await;
    });
    let done = rt.spawn(async { 5 });
    assert_eq!(within(done), Ok(5));

    let report = rt.shutdown(Duration::from_millis(20));
    assert!(!report.drained);
    assert_eq!(report.cancelled, 1);
    assert_eq!(report.unjoined_threads, 0);
    let _ = within(rx.recv());
    assert_eq!(within(straggler), Err(JoinError::Cancelled));
}

#[test]
fn shutdown_waits_for_tasks_that_finish_within_grace() {
    let rt = runtime(2);
    let (tx, rx) = async_channel::bounded::<u32>(1);
    let task = rt.spawn(async move { rx.recv().await.unwrap() + 1 });
    // The message arrives while shutdown waits (or before): either way the
    // task finishes within the grace period and is not cancelled.
    let sender = std::thread::spawn(move || tx.send_blocking(1).unwrap());
    let report = rt.shutdown(Duration::from_secs(20));
    sender.join().unwrap();
    assert!(report.drained, "{report:?}");
    assert_eq!(report.cancelled, 0);
    assert_eq!(within(task), Ok(2));
}

#[test]
fn spawning_after_shutdown_reports_cancelled() {
    let rt = runtime(1);
    let handle = rt.handle();
    let report = rt.shutdown(Duration::ZERO);
    assert!(report.drained);
    assert_eq!(within(handle.spawn(async { 1 })), Err(JoinError::Cancelled));
    assert_eq!(
        within(handle.spawn_named("late", async { 1 })),
        Err(JoinError::Cancelled)
    );
    // Through `dyn Spawn` too.
    let spawner: Arc<dyn Spawn> = Arc::new(handle.clone());
    assert_eq!(
        within(spawner.spawn(async { 1 })),
        Err(JoinError::Cancelled)
    );
    assert!(handle.stats().is_none());
}

#[test]
fn dropping_the_runtime_cancels_live_tasks() {
    let rt = runtime(2);
    let (tx, rx) = async_channel::bounded(2);
    let a = rt.spawn({
        let tx = tx.clone();
        async move {
            let _signal = DropSignal(tx);
            future::pending::<()>().await;
        }
    });
    a.detach();
    let b = rt.spawn(async move {
        let _signal = DropSignal(tx);
        future::pending::<()>().await;
    });
    drop(rt);
    within(async {
        // Both signals, or the channel closed: both futures were dropped.
        while rx.recv().await.is_ok() {}
    });
    assert_eq!(within(b), Err(JoinError::Cancelled));
}

#[test]
fn shutdown_does_not_hang_on_a_thread_blocked_in_a_poll() {
    let rt = runtime(1);
    let (block_tx, block_rx) = mpsc::channel::<()>();
    let (in_tx, in_rx) = mpsc::channel::<()>();
    rt.spawn(async move {
        in_tx.send(()).unwrap();
        // Blocks the only worker thread inside a poll.
        let _ = block_rx.recv();
    })
    .detach();
    in_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let report = rt.shutdown(Duration::ZERO);
    assert_eq!(report.unjoined_threads, 1, "{report:?}");
    block_tx.send(()).unwrap();
}

#[test]
fn tasks_lists_live_tasks_by_name_and_empties_after_completion() {
    let rt = runtime(2);
    let (go_tx, go_rx) = async_channel::unbounded::<()>();
    let (ready_tx, ready_rx) = async_channel::unbounded::<()>();
    let mut handles = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let go_rx = go_rx.clone();
        let ready_tx = ready_tx.clone();
        handles.push(rt.spawn_named(name, async move {
            ready_tx.send(()).await.unwrap();
            go_rx.recv().await.unwrap();
        }));
    }
    within(async {
        for _ in 0..3 {
            ready_rx.recv().await.unwrap();
        }
    });
    // Each task signalled from inside its first poll; the monitor lists it
    // (with that poll counted) once that poll returns `Pending`.
    within(async {
        for _ in 0..10_000 {
            let tasks = rt.tasks();
            if tasks.len() == 3 && tasks.iter().all(|t| t.polls >= 1) {
                return;
            }
            async_io::Timer::after(Duration::from_millis(1)).await;
        }
        panic!("first polls never counted: {:?}", rt.tasks());
    });
    let tasks = rt.tasks();
    let names: Vec<_> = tasks.iter().map(|t| t.name.as_deref().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    assert!(tasks.windows(2).all(|w| w[0].id < w[1].id));
    // Each was polled: its last poll ended after its spawn, not after now.
    for t in &tasks {
        let last = t.last_poll.expect("polled");
        assert!(
            last >= t.spawned_at && last <= std::time::Instant::now(),
            "{t:?}"
        );
        assert!(t.since_last_poll() <= t.age());
    }
    assert_eq!(rt.stats().live, 3);

    for _ in 0..3 {
        go_tx.send_blocking(()).unwrap();
    }
    for h in handles {
        within(h).unwrap();
    }
    let stats = rt.stats();
    assert_eq!(
        (stats.spawned, stats.completed, stats.live),
        (3, 3, 0),
        "{stats:?}"
    );
    assert!(rt.tasks().is_empty());
}

#[test]
fn a_tasks_poll_time_is_measured_in_real_time_and_fits_in_its_age() {
    const SPIN: Duration = Duration::from_millis(2);
    let rt = runtime(1);
    let (ready_tx, ready_rx) = async_channel::unbounded::<()>();
    let (go_tx, go_rx) = async_channel::bounded::<()>(1);
    let h = rt.spawn_named("spinner", async move {
        // A first poll that holds its thread for at least SPIN (a spin,
        // not a sleep: the poll's length is what is measured).
        let start = std::time::Instant::now();
        while start.elapsed() < SPIN {
            std::hint::spin_loop();
        }
        ready_tx.send(()).await.unwrap();
        go_rx.recv().await.unwrap();
    });
    within(ready_rx.recv()).unwrap();
    // One worker: a task spawned now runs only after the spinner's first
    // poll has returned, and with it the spinner is listed.
    within(rt.spawn(async {})).unwrap();
    let listed = match &rt.tasks()[..] {
        [t] => t.clone(),
        other => panic!("not listed after its first poll: {other:?}"),
    };
    let age = listed.age();
    assert_eq!(listed.polls, 1, "{listed:?}");
    // Every figure covers the spin and fits in the time since the spawn
    // (a tick count read as ns, or ns read as ticks, would not).
    assert!(listed.longest_poll >= SPIN, "{listed:?}");
    assert!(listed.busy >= listed.longest_poll, "{listed:?}");
    assert!(listed.busy <= age, "{listed:?} in {age:?}");
    let last = listed.last_poll.expect("polled");
    let first_poll = last.duration_since(listed.spawned_at);
    assert!(first_poll >= SPIN && first_poll <= age, "{listed:?}");
    go_tx.send_blocking(()).unwrap();
    within(h).unwrap();
}

#[test]
fn monitor_off_keeps_counters_but_lists_nothing() {
    let rt = Runtime::builder()
        .with_threads(1)
        .with_monitor(false)
        .build()
        .unwrap();
    let (go_tx, go_rx) = async_channel::bounded::<()>(1);
    let h = rt.spawn_named("hidden", async move { go_rx.recv().await.unwrap() });
    assert!(rt.tasks().is_empty());
    within(go_tx.send(())).unwrap();
    within(h).unwrap();
    assert_eq!(rt.stats().completed, 1);
}

#[test]
fn zero_threads_is_a_typed_error() {
    let err = Runtime::builder().with_threads(0).build().unwrap_err();
    let smolkit::runtime::BuildError::Config(config) = &err else {
        panic!("expected a config error, got {err:?}");
    };
    assert_eq!((config.setting, config.value.as_str()), ("threads", "0"));
    assert_eq!(
        err.to_string(),
        "invalid threads = 0: must be greater than zero"
    );
}

// --- slow-poll warning, captured with a test subscriber --------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", field.name(), value));
            }
        }
        let mut fields = Fields(format!("{} ", event.metadata().level()));
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
}

fn slow_poll_warnings(threshold: Duration) -> Vec<String> {
    slow_poll_warnings_spinning(threshold, Duration::ZERO)
}

/// The slow-poll warnings of a runtime whose one task spins for `spin` in
/// its one poll.
fn slow_poll_warnings_spinning(threshold: Duration, spin: Duration) -> Vec<String> {
    use tracing_subscriber::layer::SubscriberExt;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    // Built under the subscriber: the workers inherit it.
    let rt = Runtime::builder()
        .with_threads(1)
        .with_slow_poll_threshold(threshold)
        .build()
        .unwrap();
    within(rt.spawn_named("slowpoke", async move {
        let start = std::time::Instant::now();
        while start.elapsed() < spin {
            std::hint::spin_loop();
        }
        (0..1000u64).sum::<u64>()
    }))
    .unwrap();
    drop(rt);
    let events = captured.0.lock().unwrap().clone();
    events
        .into_iter()
        .filter(|e| e.contains("slow poll"))
        .collect()
}

#[test]
fn a_poll_over_the_threshold_logs_a_warning_naming_the_task() {
    // Any poll takes longer than zero.
    let warnings = slow_poll_warnings(Duration::ZERO);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("WARN"), "{warnings:?}");
    assert!(
        warnings[0].contains("task.name=\"slowpoke\""),
        "{warnings:?}"
    );
}

#[test]
fn a_slow_polls_warning_gives_its_length_in_ms() {
    let warnings = slow_poll_warnings_spinning(Duration::from_millis(1), Duration::from_millis(3));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let ms: f64 = warnings[0]
        .split("poll_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no poll_ms in {warnings:?}"));
    assert!(ms >= 3.0, "{warnings:?}");
    assert!(warnings[0].contains("threshold_ms=1.0"), "{warnings:?}");
}

#[test]
fn a_poll_under_the_threshold_logs_nothing() {
    assert!(slow_poll_warnings(Duration::from_secs(3600)).is_empty());
}

// ---------------------------------------------------------------------------
// ManualClock.

struct Recorder {
    label: &'static str,
    log: Arc<Mutex<Vec<&'static str>>>,
}
impl Wake for Recorder {
    fn wake(self: Arc<Self>) {
        self.log.lock().unwrap().push(self.label);
    }
}

#[test]
fn manual_clock_wakes_sleepers_in_deadline_order_only_when_advanced() {
    let clock = ManualClock::new();
    let start = clock.now();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut sleeps: Vec<_> = [("3s", 3), ("1s", 1), ("2s", 2), ("1s-later", 1)]
        .into_iter()
        .map(|(label, secs)| {
            let waker = Waker::from(Arc::new(Recorder {
                label,
                log: log.clone(),
            }));
            let mut sleep = Box::pin(clock.sleep(Duration::from_secs(secs)));
            assert!(
                sleep
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
            (label, sleep, waker)
        })
        .collect();
    assert_eq!(clock.sleepers(), 4);
    assert_eq!(clock.now(), start, "time does not move by itself");
    assert!(log.lock().unwrap().is_empty());

    clock.advance(Duration::from_millis(999));
    assert!(log.lock().unwrap().is_empty());

    clock.advance(Duration::from_millis(1));
    assert_eq!(*log.lock().unwrap(), ["1s", "1s-later"]);

    clock.advance(Duration::from_secs(10));
    assert_eq!(*log.lock().unwrap(), ["1s", "1s-later", "2s", "3s"]);
    assert_eq!(clock.sleepers(), 0);
    assert_eq!(clock.now(), start + Duration::from_secs(11));

    for (label, sleep, waker) in &mut sleeps {
        let ready = sleep
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_ready();
        assert!(ready, "{label} should be ready");
    }
}

#[test]
fn manual_clock_forgets_dropped_sleepers_and_jumps_to_the_next_deadline() {
    let clock = ManualClock::new();
    let start = clock.now();
    let waker = Waker::noop();
    let mut a = Box::pin(clock.sleep(Duration::from_secs(5)));
    let mut b = Box::pin(clock.sleep(Duration::from_secs(2)));
    assert!(
        a.as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending()
    );
    assert!(
        b.as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending()
    );
    drop(b);
    assert_eq!(clock.sleepers(), 1);
    assert_eq!(
        clock.advance_to_next(),
        Some(start + Duration::from_secs(5))
    );
    assert!(a.as_mut().poll(&mut Context::from_waker(waker)).is_ready());
    assert_eq!(clock.advance_to_next(), None);
}

#[test]
fn manual_clock_drives_a_task_on_a_real_executor() {
    let clock = ManualClock::new();
    let rt = runtime(1);
    let ticks = Arc::new(AtomicUsize::new(0));
    let task = rt.spawn({
        let clock = clock.clone();
        let ticks = ticks.clone();
        async move {
            for _ in 0..3 {
                clock.sleep(Duration::from_secs(60)).await;
                ticks.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    within(async {
        for expected in 1..=3 {
            // Wait until the task sleeps, then move time past its deadline.
            clock.wait_for_sleepers(1).await;
            assert_eq!(ticks.load(Ordering::SeqCst), expected - 1);
            clock.advance(Duration::from_secs(60));
            while ticks.load(Ordering::SeqCst) < expected {
                future::yield_now().await;
            }
        }
    });
    within(task).unwrap();
}

// ---------------------------------------------------------------------------
// offload.

#[test]
fn cpu_pool_never_runs_more_closures_than_its_limit() {
    let pool = CpuPool::new(NonZeroUsize::new(2).unwrap());
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));

    let jobs: Vec<_> = (0..6)
        .map(|i| {
            let (pool, running, peak, release_rx) = (
                pool.clone(),
                running.clone(),
                peak.clone(),
                release_rx.clone(),
            );
            smol::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    release_rx.lock().unwrap().recv().unwrap();
                    running.fetch_sub(1, Ordering::SeqCst);
                    i
                })
                .await
            })
        })
        .collect();

    // Without the limit all six would be inside the closure before any is
    // released; wait until the limit is reached, then release one by one.
    within(async {
        while running.load(Ordering::SeqCst) < 2 {
            async_io::Timer::after(Duration::from_millis(1)).await;
        }
    });
    for _ in 0..6 {
        release_tx.send(()).unwrap();
    }
    let mut results: Vec<_> = jobs.into_iter().map(|j| within(j).unwrap()).collect();
    results.sort();
    assert_eq!(results, [0, 1, 2, 3, 4, 5]);
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

/// Occupies a one-thread pool with a closure that runs until the returned
/// sender is used; returns once it has started (told by the closure).
fn occupy(pool: &CpuPool) -> (mpsc::Sender<()>, smol::Task<Result<(), OffloadError>>) {
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let pool = pool.clone();
    let task = smol::spawn(async move {
        pool.run(move || {
            started_tx.send(()).unwrap();
            gate_rx.recv().unwrap()
        })
        .await
    });
    started_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the occupying closure started");
    (gate_tx, task)
}

/// Issue 18 #7: CPU work runs on the pool's own threads, started once and
/// kept (not on the elastic blocking pool), never more of them than the
/// limit, in the order it was submitted.
#[test]
fn cpu_work_runs_in_order_on_the_pools_own_kept_threads() {
    let pool = CpuPool::new(NonZeroUsize::new(2).unwrap());
    let names: Vec<String> = within(async {
        let mut names = Vec::new();
        for _ in 0..50 {
            let name = pool
                .run(|| std::thread::current().name().unwrap_or("").to_owned())
                .await
                .unwrap();
            names.push(name);
        }
        names
    });
    let distinct: std::collections::BTreeSet<_> = names.iter().collect();
    assert!(
        distinct.iter().all(|n| n.starts_with("smolkit-cpu-")),
        "ran on {distinct:?}"
    );
    assert!(distinct.len() <= 2, "ran on {distinct:?}");
    // One thread: closures queued together run in submission order.
    let one = CpuPool::new(NonZeroUsize::MIN);
    let order = Arc::new(Mutex::new(Vec::new()));
    let (gate_tx, blocker) = occupy(&one);
    let queued: Vec<_> = (0..10)
        .map(|i| {
            let (one, order) = (one.clone(), order.clone());
            let run = async move { one.run(move || order.lock().unwrap().push(i)).await };
            // Each queued before the next: polled once here.
            let mut run = Box::pin(run);
            assert!(
                futures_lite::future::block_on(futures_lite::future::poll_once(&mut run)).is_none()
            );
            run
        })
        .collect();
    gate_tx.send(()).unwrap();
    within(blocker).unwrap();
    for run in queued {
        within(run).unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..10).collect::<Vec<_>>());
}

/// A closure whose future is dropped while it waits for a pool thread
/// never runs; one already running finishes and keeps its thread.
#[test]
fn a_cpu_closure_dropped_while_queued_never_runs() {
    let pool = CpuPool::new(NonZeroUsize::MIN);
    let ran = Arc::new(AtomicUsize::new(0));
    let (gate_tx, blocker) = occupy(&pool);
    {
        let ran = ran.clone();
        let mut queued = Box::pin(pool.run(move || ran.fetch_add(1, Ordering::SeqCst)));
        assert!(
            futures_lite::future::block_on(futures_lite::future::poll_once(&mut queued)).is_none()
        );
    }
    gate_tx.send(()).unwrap();
    within(blocker).unwrap();
    assert_eq!(within(pool.run(|| 5)), Ok(5), "the next closure runs");
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the dropped one never ran");
}

#[test]
fn offloaded_panics_come_back_as_errors() {
    let err = within(offload::cpu(|| -> u32 { panic!("cpu boom") })).unwrap_err();
    assert_eq!(err, OffloadError::Panicked("cpu boom".into()));
    let err = within(offload::blocking(|| -> u32 { panic!("io boom") })).unwrap_err();
    assert!(err.to_string().contains("io boom"));
    assert_eq!(within(offload::blocking(|| 3)), Ok(3));
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Runtime>();
    send_sync::<smolkit::runtime::Handle>();
    send_sync::<CpuPool>();
    send_sync::<ManualClock>();
    send_sync::<smolkit::runtime::SystemClock>();
    send_sync::<JoinError>();
    send::<smolkit::runtime::JoinHandle<u32>>();
    send::<smolkit::runtime::Sleep>();
}

#[test]
fn wait_for_sleepers_returns_once_the_sleeps_are_registered() {
    let clock = ManualClock::new();
    let c = clock.clone();
    let sleepers = std::thread::spawn(move || {
        smol::block_on(async {
            let a = c.sleep(Duration::from_secs(5));
            let b = c.sleep(Duration::from_secs(9));
            futures_lite::future::zip(a, b).await;
        })
    });
    smol::block_on(clock.wait_for_sleepers(2));
    assert_eq!(clock.sleepers(), 2);
    clock.advance(Duration::from_secs(9));
    sleepers.join().unwrap();
    assert_eq!(clock.sleepers(), 0);
}

#[test]
fn advancing_by_duration_max_saturates_and_the_clock_keeps_working() {
    // Issue 14 #11: this panicked on Instant overflow and left every later
    // `now()` panicking too.
    let clock = ManualClock::new();
    let start = clock.now();
    clock.advance(Duration::MAX);
    let far = clock.now();
    assert!(far > start + Duration::from_secs(100 * 365 * 86_400));
    clock.advance(Duration::MAX);
    assert_eq!(
        clock.now(),
        far,
        "saturated: time stays at the last instant"
    );
    // A sleep registered before the advance is woken by it.
    let clock = ManualClock::new();
    let mut long = Box::pin(clock.sleep(Duration::from_secs(1 << 40)));
    assert!(smol::block_on(future::poll_once(&mut long)).is_none());
    clock.advance(Duration::MAX);
    assert!(smol::block_on(future::poll_once(&mut long)).is_some());
}

/// Issue 13 #10: inside a `Runtime` (its `block_on`, or one of its tasks)
/// the default spawner is that runtime, so a component built there without
/// `with_spawner` keeps its tasks on it; outside, smol's global executor.
#[test]
fn the_default_spawner_is_the_current_runtime() {
    use smolkit::pool::WorkerPool;
    use smolkit::runtime::{Handle, default_spawner};

    assert!(
        Handle::try_current().is_none(),
        "no runtime on the test thread"
    );
    let rt = Runtime::builder().with_threads(2).build().unwrap();
    let before = rt.stats().spawned;
    let out = rt.block_on(async {
        assert!(
            Handle::try_current().is_some(),
            "block_on enters the runtime"
        );
        let pool = WorkerPool::builder(|x: u32| async move { Ok::<_, String>(x * 2) })
            .with_workers(2)
            .build()
            .unwrap();
        let r = pool.submit(21).await.unwrap().await;
        pool.close();
        pool.join().await;
        r
    });
    assert_eq!(out.ok(), Some(42));
    assert!(
        rt.stats().spawned >= before + 2,
        "the pool's workers ran on the runtime: {:?}",
        rt.stats()
    );
    assert!(Handle::try_current().is_none(), "left again after block_on");

    // A task of the runtime sees it as current too.
    let seen = rt.block_on(rt.spawn(async { Handle::try_current().is_some() }));
    assert_eq!(seen, Ok(true));
    // Outside, the default is smol's global executor (it still works).
    let v = smol::block_on(default_spawner().spawn(async { 7 }));
    assert_eq!(v, Ok(7));
    // Once the runtime is gone, a stale current handle is not returned.
    drop(rt);
    assert!(Handle::try_current().is_none());
}

/// Issue 14 #15: a task that ticks a nested executor whose own task
/// panics returned normally, but was counted as panicked (the outcome
/// thread-local was shared).
#[test]
fn a_nested_executors_panic_is_not_the_outer_tasks() {
    let rt = Runtime::builder().with_threads(1).build().unwrap();
    // Everything within one poll of the outer task: its inner task panics
    // (caught, as its handle reports) and the outer one returns normally.
    let task = rt.spawn(async {
        let inner = smol::Executor::new();
        let handle = SpawnExt::spawn(&inner, async { panic!("inner task fails") });
        while inner.try_tick() {}
        handle.is_finished()
    });
    assert_eq!(rt.block_on(task), Ok(true));
    let stats = rt.stats();
    assert_eq!((stats.completed, stats.panicked), (1, 0), "{stats:?}");
    // And a task that does panic still counts as panicked.
    let failing = rt.spawn(async { panic!("outer fails") });
    assert!(rt.block_on(failing).is_err());
    assert_eq!(rt.stats().panicked, 1);
}

/// Issue 14 #13 (article 002 §4): the CPU pool can be shut down: new work
/// is refused with a typed error and counted, running work finishes.
#[test]
fn a_cpu_pool_shuts_down_gracefully() {
    let clock = ManualClock::new();
    let pool = CpuPool::new(NonZeroUsize::new(1).unwrap()).with_clock(Arc::new(clock.clone()));
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let busy = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            smol::block_on(pool.run(move || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                7
            }))
        })
    };
    started_rx.recv().unwrap();
    assert_eq!(pool.running(), 1);
    // A caller waiting for the only slot when the pool closes is refused.
    let waiting = {
        let pool = pool.clone();
        std::thread::spawn(move || smol::block_on(pool.run(|| 8)))
    };
    // The grace period runs out on the clock with the closure still
    // running: reported, not waited for.
    let shutdown = {
        let pool = pool.clone();
        std::thread::spawn(move || smol::block_on(pool.shutdown(Duration::from_secs(5))))
    };
    smol::block_on(clock.wait_for_sleepers(1));
    clock.advance(Duration::from_secs(5));
    let report = shutdown.join().unwrap();
    assert_eq!((report.drained, report.running), (false, 1));
    assert!(pool.is_closed());
    assert_eq!(smol::block_on(pool.run(|| 9)), Err(OffloadError::Closed));
    release_tx.send(()).unwrap();
    assert_eq!(busy.join().unwrap(), Ok(7), "running work finishes");
    assert_eq!(waiting.join().unwrap(), Err(OffloadError::Closed));
    // Drained: returns before any time passes.
    let report = smol::block_on(pool.shutdown(Duration::from_secs(30)));
    assert!(report.drained);
    assert_eq!(clock.elapsed(), Duration::from_secs(5));
    assert_eq!((report.running, report.refused), (0, 2));
}

/// The coarse clock never goes back, never runs ahead of the system
/// clock, keeps moving, and its timers are the system clock's.
#[test]
fn the_coarse_clock_is_monotonic_behind_the_system_clock_and_moves() {
    use smolkit::runtime::{Clock, CoarseClock};
    let clock = CoarseClock::global();
    let first = clock.now();
    let mut last = first;
    for _ in 0..100_000 {
        let now = clock.now();
        assert!(now >= last, "went back");
        assert!(
            now <= std::time::Instant::now(),
            "ahead of the system clock"
        );
        last = now;
    }
    // Moves (bounded: 20 s of 1 ms naps).
    let start = std::time::Instant::now();
    while clock.now() <= first {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the coarse clock stands still"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(5);
    within(clock.sleep_until(deadline));
    assert!(std::time::Instant::now() >= deadline);
}
