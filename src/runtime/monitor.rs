//! The task monitor: counters, a live task registry and slow-poll warnings.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use event_listener::Event;
use pin_project_lite::pin_project;

use super::join::{Outcome, begin_task_poll, end_task_poll, take_outcome};
use super::scheduler::Scheduler;

/// Counters of a [`Runtime`](super::Runtime)'s tasks since it started.
///
/// `live = spawned - completed - cancelled - panicked`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeStats {
    /// Tasks accepted.
    pub spawned: u64,
    /// Tasks that ran to completion.
    pub completed: u64,
    /// Tasks dropped before completion (handle dropped, shutdown).
    pub cancelled: u64,
    /// Tasks that panicked.
    pub panicked: u64,
    /// Tasks accepted and not yet finished.
    pub live: u64,
}

/// A snapshot of one live task, from [`Runtime::tasks`](super::Runtime::tasks).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TaskInfo {
    /// Unique within the runtime, in spawn order.
    pub id: u64,
    /// The name given to `spawn_named`, if any.
    pub name: Option<Arc<str>>,
    /// When the task was spawned: for a task spawned from inside another
    /// task of the runtime, when the spawning poll began; for one spawned
    /// from elsewhere (`block_on`, another thread), when its first poll
    /// began (so its time waiting for that first poll is not in its
    /// [`age`](TaskInfo::age)). Reading the clock at every spawn would cost
    /// more than the rest of the monitor together.
    pub spawned_at: Instant,
    /// How many times it has been polled.
    pub polls: u64,
    /// Total time spent inside its polls.
    pub busy: Duration,
    /// The longest single poll.
    pub longest_poll: Duration,
    /// When its last poll ended (`None` before the first): with
    /// [`age`](TaskInfo::age), what a stalled task was last doing.
    pub last_poll: Option<Instant>,
}

impl TaskInfo {
    /// Time since the task was spawned.
    pub fn age(&self) -> Duration {
        self.spawned_at.elapsed()
    }

    /// Time since its last poll ended (its age when never polled).
    pub fn since_last_poll(&self) -> Duration {
        self.last_poll.unwrap_or(self.spawned_at).elapsed()
    }
}

const SHARDS: usize = 16;
/// Finish counters are kept per thread stripe so workers finishing tasks
/// side by side do not pass one cache line back and forth.
const STRIPES: usize = 8;

thread_local! {
    /// This thread's stripe (`usize::MAX` until first used).
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    /// The worker's last timestamp, while it goes straight from poll to
    /// poll: during a timed poll, when it began (a task spawned from it is
    /// stamped with that); between polls, when the last one ended (the
    /// next one's start, so a timed poll reads the clock once, not twice).
    /// A [`now_ticks`] reading; 0 (none) off the runtime's workers and
    /// after a break.
    static LAST: Cell<u64> = const { Cell::new(0) };
}

/// The monitor's clock: the CPU's counter where it is invariant (quanta's
/// TSC read, calibrated once per process), else the monotonic clock in ns.
/// A timestamp is a raw reading, turned into ns only as a difference.
///
/// NOTE: `Instant::now` plus the subtraction and conversion that make it a
/// number were ~110 instructions per poll (`sub_timespec` alone 37), a
/// fifth of the contended semaphore's instructions on the `Runtime`.
struct Ticks {
    clock: quanta::Clock,
}

static TICKS: OnceLock<Ticks> = OnceLock::new();

/// The clock, calibrated on first use (see [`Monitor::new`]).
#[inline]
fn ticks() -> &'static Ticks {
    TICKS.get_or_init(|| Ticks {
        clock: quanta::Clock::new(),
    })
}

/// Now, as a raw reading, at least 1 (0 is "never").
#[inline]
fn now_ticks() -> u64 {
    ticks().clock.raw().max(1)
}

/// The ns from reading `start` to reading `end` (0 if `end` is not later).
#[inline]
fn ns_between(start: u64, end: u64) -> u64 {
    ticks().clock.delta_as_nanos(start, end)
}

/// How many ticks `d` is (rounded down; `u64::MAX` when it does not fit).
fn ticks_in(d: Duration) -> u64 {
    // NOTE: the clock converts ticks to ns only; 2^40 ticks (minutes at
    // GHz rates) give its ratio to ~12 digits.
    const SPAN: u64 = 1 << 40;
    let span_ns = u128::from(ns_between(0, SPAN).max(1));
    u64::try_from(d.as_nanos().saturating_mul(u128::from(SPAN)) / span_ns).unwrap_or(u64::MAX)
}

/// The instant of reading `raw`, counted back from `now` (read with
/// `now_raw`): never after `now`, and off by the calibration's error
/// times the reading's age, not times the process's.
///
/// NOTE: counted forward from an origin taken at calibration, a
/// calibration a little fast put a task's last poll after `now` once the
/// process had run a second or two (`tests/runtime.rs`, two runs in three
/// with 15 test binaries at once).
fn instant_at(now: Instant, now_raw: u64, raw: u64) -> Instant {
    let ago = Duration::from_nanos(ns_between(raw, now_raw));
    now.checked_sub(ago).unwrap_or(now)
}

/// The worker is about to wait or hand its thread to the reactor: the next
/// poll's start is not the last one's end.
pub(crate) fn break_poll_chain() {
    LAST.with(|c| c.set(0));
}

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

fn stripe() -> usize {
    STRIPE
        .try_with(|s| {
            let mut i = s.get();
            if i == usize::MAX {
                i = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
                s.set(i);
            }
            i
        })
        .unwrap_or(0)
}

/// One stripe of the finish counters, on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Finished {
    completed: AtomicU64,
    cancelled: AtomicU64,
    panicked: AtomicU64,
}

struct TaskMeta {
    id: u64,
    name: Option<Arc<str>>,
    /// A [`now_ticks`] reading.
    spawned: u64,
    polls: AtomicU64,
    /// In ticks (see [`Ticks`]).
    busy: AtomicU64,
    longest: AtomicU64,
    /// When the last poll ended, a [`now_ticks`] reading (0: never).
    last_poll: AtomicU64,
}

/// A task that has waited at least once: its waker (to cancel it at
/// shutdown) and, with the monitor on, its figures.
struct Entry {
    waker: Waker,
    meta: Option<Arc<TaskMeta>>,
}

/// A value on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

pub(crate) struct Monitor {
    /// Also the source of task ids. Written by spawners: kept off the line
    /// of `closing`, which every finishing task reads.
    spawned: Padded<AtomicU64>,
    finished: [Finished; STRIPES],
    /// Shutdown is waiting for the live count to reach zero.
    closing: AtomicBool,
    /// Notified whenever the live count may have reached zero while closing.
    idle: Event,
    /// Per-poll timing, `tasks()` and slow-poll warnings are on.
    timing: bool,
    slow_poll: Duration,
    /// `slow_poll` in ticks (see [`Ticks`]).
    slow_poll_ticks: u64,
    /// Tasks that have returned `Pending` at least once and not finished.
    waiting: [Mutex<HashMap<u64, Entry>>; SHARDS],
}

impl Monitor {
    pub(crate) fn new(timing: bool, slow_poll: Duration) -> Self {
        Monitor {
            spawned: Padded(AtomicU64::new(0)),
            finished: std::array::from_fn(|_| Finished::default()),
            closing: AtomicBool::new(false),
            idle: Event::new(),
            timing,
            slow_poll,
            slow_poll_ticks: if timing {
                ticks_in(slow_poll)
            } else {
                u64::MAX
            },
            waiting: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.waiting[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stats(&self) -> RuntimeStats {
        // Read the finishing counters before `spawned` so `live` never
        // underflows.
        let (mut completed, mut cancelled, mut panicked) = (0, 0, 0);
        for f in &self.finished {
            completed += f.completed.load(Ordering::SeqCst);
            cancelled += f.cancelled.load(Ordering::SeqCst);
            panicked += f.panicked.load(Ordering::SeqCst);
        }
        let spawned = self.spawned.0.load(Ordering::SeqCst);
        RuntimeStats {
            spawned,
            completed,
            cancelled,
            panicked,
            live: spawned.saturating_sub(completed + cancelled + panicked),
        }
    }

    pub(crate) fn live(&self) -> u64 {
        self.stats().live
    }

    /// From now on, finishing the last live task notifies
    /// [`idle_listener`](Monitor::idle_listener).
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    pub(crate) fn idle_listener(&self) -> event_listener::EventListener {
        self.idle.listen()
    }

    /// Wakes every task that is waiting, so that a scheduler that drops
    /// what it is given cancels them all.
    pub(crate) fn wake_all_waiting(&self) {
        for shard in &self.waiting {
            let wakers: Vec<Waker> = shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .map(|e| e.waker.clone())
                .collect();
            // Outside the lock: a cancelled task removes its entry.
            for w in wakers {
                w.wake();
            }
        }
    }

    pub(crate) fn tasks(&self) -> Vec<TaskInfo> {
        let mut out = Vec::new();
        let (now, now_raw) = (Instant::now(), now_ticks());
        for shard in &self.waiting {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            out.extend(
                shard
                    .values()
                    .filter_map(|e| e.meta.as_ref())
                    .map(|m| TaskInfo {
                        id: m.id,
                        name: m.name.clone(),
                        spawned_at: instant_at(now, now_raw, m.spawned),
                        polls: m.polls.load(Ordering::Relaxed),
                        busy: Duration::from_nanos(ns_between(0, m.busy.load(Ordering::Relaxed))),
                        longest_poll: Duration::from_nanos(ns_between(
                            0,
                            m.longest.load(Ordering::Relaxed),
                        )),
                        last_poll: match m.last_poll.load(Ordering::Relaxed) {
                            0 => None,
                            raw => Some(instant_at(now, now_raw, raw)),
                        },
                    }),
            );
        }
        out.sort_by_key(|t| t.id);
        out
    }

    fn finish(&self, id: u64, waiting: bool, outcome: Outcome) {
        if waiting {
            self.shard(id).remove(&id);
        }
        let f = &self.finished[stripe()];
        let counter = match outcome {
            Outcome::Completed => &f.completed,
            Outcome::Panicked => &f.panicked,
            Outcome::Aborted => &f.cancelled,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        // Pairs with `close`: either this sees `closing`, or shutdown's
        // count after `close` sees this task finished.
        if self.closing.load(Ordering::SeqCst) && self.live() == 0 {
            self.idle.notify(usize::MAX);
        }
    }
}

/// Wraps a future so that it is counted (and, with timing on, timed and,
/// once it waits, listed) by `owner`'s monitor. The task holds the
/// scheduler, not the monitor: one shared count per task, not two.
pub(crate) fn instrument<F>(owner: &Arc<Scheduler>, name: Option<&str>, fut: F) -> Instrumented<F> {
    let this = &owner.monitor;
    let id = this.spawned.0.fetch_add(1, Ordering::SeqCst) + 1;
    let timing = this.timing.then(|| Timing {
        name: name.map(Arc::from),
        spawned: Some(LAST.with(Cell::get)).filter(|&t| t != 0),
    });
    Instrumented {
        fut,
        owner: owner.clone(),
        id,
        timing,
        meta: None,
        waiting: false,
        finished: false,
    }
}

/// What the monitor keeps of a task before it first waits (inline: a task
/// that finishes in its first poll never touches the registry). A task
/// waits at the end of its first poll or never, so there is at most one
/// poll to count here, and it is counted when the task is listed.
struct Timing {
    name: Option<Arc<str>>,
    /// `None`: spawned outside a poll; the first poll's start is used.
    spawned: Option<u64>,
}

pin_project! {
    /// A task future under the monitor.
    pub(crate) struct Instrumented<F> {
        #[pin]
        fut: F,
        owner: Arc<Scheduler>,
        id: u64,
        // With timing on: figures until the task first waits.
        timing: Option<Timing>,
        // With timing on, once the task has waited: its listed figures.
        meta: Option<Arc<TaskMeta>>,
        // In the registry of waiting tasks.
        waiting: bool,
        finished: bool,
    }

    impl<F> PinnedDrop for Instrumented<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.finished {
                this.owner.monitor.finish(*this.id, *this.waiting, Outcome::Aborted);
            }
        }
    }
}

impl<F: Future> Future for Instrumented<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let enclosing = begin_task_poll();
        let timed = this.timing.is_some() || this.meta.is_some();
        let (result, span) = if timed {
            let start = LAST.with(|c| match c.get() {
                0 => {
                    let t = now_ticks();
                    c.set(t);
                    t
                }
                t => t,
            });
            let result = this.fut.poll(cx);
            let end = now_ticks();
            LAST.with(|c| c.set(end));
            (result, Some((start, end)))
        } else {
            (this.fut.poll(cx), None)
        };
        end_task_poll(enclosing);
        let monitor = &this.owner.monitor;
        if let Some((start, end)) = span {
            // In ticks: turned into ns only for a warning or a listing.
            let took = end.saturating_sub(start);
            if took > monitor.slow_poll_ticks {
                let name = match (&*this.timing, &*this.meta) {
                    (Some(t), _) => t.name.clone(),
                    (None, Some(m)) => m.name.clone(),
                    (None, None) => None,
                };
                warn_slow(monitor, *this.id, name.as_deref(), ns_between(start, end));
            }
            if let Some(m) = this.meta {
                m.record(took, end);
            }
        }
        match &result {
            Poll::Ready(_) => {
                *this.finished = true;
                monitor.finish(*this.id, *this.waiting, take_outcome());
            }
            Poll::Pending if !*this.waiting => {
                *this.waiting = true;
                let meta = this.timing.take().zip(span).map(|(t, (start, end))| {
                    let m = TaskMeta {
                        id: *this.id,
                        name: t.name,
                        spawned: t.spawned.unwrap_or(start),
                        polls: AtomicU64::new(0),
                        busy: AtomicU64::new(0),
                        longest: AtomicU64::new(0),
                        last_poll: AtomicU64::new(0),
                    };
                    m.record(end.saturating_sub(start), end);
                    Arc::new(m)
                });
                *this.meta = meta.clone();
                monitor.shard(*this.id).insert(
                    *this.id,
                    Entry {
                        waker: cx.waker().clone(),
                        meta,
                    },
                );
            }
            Poll::Pending => {}
        }
        result
    }
}

impl TaskMeta {
    /// Adds one poll that took `took` ticks and ended at reading `end`.
    #[inline]
    fn record(&self, took: u64, end: u64) {
        // NOTE: one thread polls a task at a time, and the task's state
        // hand-off orders consecutive polls: plain load + store suffice
        // (readers only ever see a whole value).
        let add = |a: &AtomicU64, n: u64| {
            a.store(
                a.load(Ordering::Relaxed).saturating_add(n),
                Ordering::Relaxed,
            )
        };
        add(&self.polls, 1);
        add(&self.busy, took);
        if took > self.longest.load(Ordering::Relaxed) {
            self.longest.store(took, Ordering::Relaxed);
        }
        self.last_poll.store(end, Ordering::Relaxed);
    }
}

fn warn_slow(monitor: &Monitor, id: u64, name: Option<&str>, took_ns: u64) {
    let took = Duration::from_nanos(took_ns);
    tracing::warn!(
        task.id = id,
        task.name = name.unwrap_or("<unnamed>"),
        poll_ms = took.as_secs_f64() * 1e3,
        threshold_ms = monitor.slow_poll.as_secs_f64() * 1e3,
        "slow poll: a task blocked its worker thread"
    );
}
