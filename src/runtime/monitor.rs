//! The task monitor: counters, a live task registry and slow-poll warnings.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use event_listener::Event;
use pin_project_lite::pin_project;

use super::join::{Outcome, begin_task_poll, end_task_poll, take_outcome};

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
    /// When the task was spawned.
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

struct TaskMeta {
    id: u64,
    name: Option<Arc<str>>,
    spawned_at: Instant,
    polls: AtomicU64,
    busy_ns: AtomicU64,
    longest_ns: AtomicU64,
    /// When the last poll ended, in ns after `spawned_at` (0: never).
    last_poll_ns: AtomicU64,
}

pub(crate) struct Monitor {
    spawned: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    panicked: AtomicU64,
    /// Notified whenever the live count may have reached zero.
    idle: Event,
    /// `None` when the registry and per-poll timing are off.
    registry: Option<Registry>,
}

struct Registry {
    next_id: AtomicU64,
    slow_poll: Duration,
    shards: [Mutex<HashMap<u64, Arc<TaskMeta>>>; SHARDS],
}

impl Monitor {
    pub(crate) fn new(registry: bool, slow_poll: Duration) -> Self {
        Monitor {
            spawned: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            idle: Event::new(),
            registry: registry.then(|| Registry {
                next_id: AtomicU64::new(1),
                slow_poll,
                shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            }),
        }
    }

    pub(crate) fn stats(&self) -> RuntimeStats {
        // Read the finishing counters before `spawned` so `live` never
        // underflows.
        let completed = self.completed.load(Ordering::Acquire);
        let cancelled = self.cancelled.load(Ordering::Acquire);
        let panicked = self.panicked.load(Ordering::Acquire);
        let spawned = self.spawned.load(Ordering::Acquire);
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

    pub(crate) fn idle_listener(&self) -> event_listener::EventListener {
        self.idle.listen()
    }

    pub(crate) fn tasks(&self) -> Vec<TaskInfo> {
        let Some(registry) = &self.registry else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for shard in &registry.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(shard.values().map(|m| TaskInfo {
                id: m.id,
                name: m.name.clone(),
                spawned_at: m.spawned_at,
                polls: m.polls.load(Ordering::Relaxed),
                busy: Duration::from_nanos(m.busy_ns.load(Ordering::Relaxed)),
                longest_poll: Duration::from_nanos(m.longest_ns.load(Ordering::Relaxed)),
                last_poll: match m.last_poll_ns.load(Ordering::Relaxed) {
                    0 => None,
                    ns => m.spawned_at.checked_add(Duration::from_nanos(ns)),
                },
            }));
        }
        out.sort_by_key(|t| t.id);
        out
    }

    /// Wraps a future so that it is counted (and, with the registry on,
    /// listed and timed).
    pub(crate) fn instrument<F>(self: &Arc<Self>, name: Option<&str>, fut: F) -> Instrumented<F> {
        self.spawned.fetch_add(1, Ordering::AcqRel);
        let meta = self.registry.as_ref().map(|registry| {
            let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
            let meta = Arc::new(TaskMeta {
                id,
                name: name.map(Arc::from),
                spawned_at: Instant::now(),
                polls: AtomicU64::new(0),
                busy_ns: AtomicU64::new(0),
                longest_ns: AtomicU64::new(0),
                last_poll_ns: AtomicU64::new(0),
            });
            registry.shards[id as usize % SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, meta.clone());
            meta
        });
        Instrumented {
            fut,
            monitor: self.clone(),
            meta,
            finished: false,
        }
    }

    fn finish(&self, meta: Option<&Arc<TaskMeta>>, counter: &AtomicU64) {
        if let (Some(registry), Some(meta)) = (&self.registry, meta) {
            registry.shards[meta.id as usize % SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&meta.id);
        }
        counter.fetch_add(1, Ordering::AcqRel);
        if self.live() == 0 {
            self.idle.notify(usize::MAX);
        }
    }
}

pin_project! {
    /// A task future under the monitor.
    pub(crate) struct Instrumented<F> {
        #[pin]
        fut: F,
        monitor: Arc<Monitor>,
        meta: Option<Arc<TaskMeta>>,
        finished: bool,
    }

    impl<F> PinnedDrop for Instrumented<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.finished {
                this.monitor.finish(this.meta.as_ref(), &this.monitor.cancelled);
            }
        }
    }
}

impl<F: Future> Future for Instrumented<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let enclosing = begin_task_poll();
        let result = match this.meta {
            None => this.fut.poll(cx),
            Some(meta) => {
                let start = Instant::now();
                let result = this.fut.poll(cx);
                let took = start.elapsed();
                let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
                meta.polls.fetch_add(1, Ordering::Relaxed);
                meta.busy_ns.fetch_add(ns, Ordering::Relaxed);
                meta.longest_ns.fetch_max(ns, Ordering::Relaxed);
                let end = (start + took).saturating_duration_since(meta.spawned_at);
                let end_ns = u64::try_from(end.as_nanos()).unwrap_or(u64::MAX).max(1);
                meta.last_poll_ns.store(end_ns, Ordering::Relaxed);
                if let Some(registry) = &this.monitor.registry
                    && took > registry.slow_poll
                {
                    tracing::warn!(
                        task.id = meta.id,
                        task.name = meta.name.as_deref().unwrap_or("<unnamed>"),
                        poll_ms = took.as_secs_f64() * 1e3,
                        threshold_ms = registry.slow_poll.as_secs_f64() * 1e3,
                        "slow poll: a task blocked its worker thread"
                    );
                }
                result
            }
        };
        end_task_poll(enclosing);
        if result.is_ready() {
            *this.finished = true;
            let counter = match take_outcome() {
                Outcome::Completed => &this.monitor.completed,
                Outcome::Panicked => &this.monitor.panicked,
                Outcome::Aborted => &this.monitor.cancelled,
            };
            this.monitor.finish(this.meta.as_ref(), counter);
        }
        result
    }
}
