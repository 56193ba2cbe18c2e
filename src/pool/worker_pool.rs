//! [`WorkerPool`]: N worker tasks pulling jobs from one bounded queue.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_channel::{Receiver, Sender, TrySendError, WeakSender};
use event_listener::Event;
use futures_lite::Stream;

use super::error::{JobError, SubmitError, TrySubmitError};
use super::process::{self, Batch, Process};
use crate::ConfigError;
use crate::runtime::{Clock, Spawn, SpawnExt, SystemClock, default_spawner};
use crate::sync::oneshot;

/// A boxed, sendable future with a lifetime.
pub(crate) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub(super) type Handler<I, O, E> = Arc<dyn Fn(I) -> BoxFut<'static, Result<O, E>> + Send + Sync>;

/// What one finished job of [`WorkerPool::process`] yields: the item and
/// its result.
pub type Processed<I, O, E> = (I, Result<O, JobError<E>>);

/// A pool of worker tasks that run one async function over submitted
/// items.
///
/// Items wait in a bounded queue ([`submit`](WorkerPool::submit) waits
/// when it is full: backpressure); `workers` tasks spawned on a
/// [`Spawn`] take them in order. Each job's result comes back through the
/// [`JobHandle`] that `submit` returns, or through the stream of
/// [`process`](WorkerPool::process). A job that panics yields
/// [`JobError::Panicked`] and its worker carries on. The number of workers
/// can change at run time ([`resize`](WorkerPool::resize)) or follow the
/// queue ([`WorkerPoolBuilder::with_autoscale`]).
///
/// The pool is a cheap handle (`Clone`); the workers stop when it is
/// closed and the queue is empty, or when every handle is dropped and the
/// queue is empty.
///
/// # Examples
///
/// ```
/// use smolkit::pool::WorkerPool;
///
/// smol::block_on(async {
///     let pool = WorkerPool::builder(|x: u64| async move {
///         if x == 3 { Err("three") } else { Ok(x * x) }
///     })
///     .with_workers(4)
///     .build()
///     .unwrap();
///     let handles: Vec<_> = {
///         let mut v = Vec::new();
///         for x in 0..5 { v.push(pool.submit(x).await.unwrap()); }
///         v
///     };
///     let mut out = Vec::new();
///     for h in handles { out.push(h.await.ok()); }
///     assert_eq!(out, vec![Some(0), Some(1), Some(4), None, Some(16)]);
///     pool.join().await;
///     assert_eq!(pool.stats().completed, 4);
///     assert_eq!(pool.stats().failed, 1);
/// });
/// ```
pub struct WorkerPool<I, O, E> {
    shared: Arc<Shared<I, O, E>>,
    tx: Sender<Work<I, O, E>>,
}

impl<I, O, E> Clone for WorkerPool<I, O, E> {
    fn clone(&self) -> Self {
        WorkerPool {
            shared: self.shared.clone(),
            tx: self.tx.clone(),
        }
    }
}

/// A snapshot of a [`WorkerPool`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker tasks alive.
    pub workers: usize,
    /// The number of workers the pool is steering towards.
    pub target_workers: usize,
    /// Queue slots taken: a submitted job each, or a batch of a
    /// [`process`](WorkerPool::process) call's items (up to 128).
    pub queued: usize,
    /// Jobs being run right now.
    pub running: usize,
    /// Jobs that returned `Ok`.
    pub completed: u64,
    /// Jobs that returned `Err` or panicked.
    pub failed: u64,
    /// Of `failed`, the jobs that panicked.
    pub panicked: u64,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Autoscale {
    pub(super) min: usize,
    pub(super) max: usize,
    pub(super) idle: Duration,
    pub(super) scale_up_at: usize,
}

pub(super) struct Shared<I, O, E> {
    pub(super) rx: Receiver<Work<I, O, E>>,
    /// For a worker handing half a batch back. Weak, so that the workers
    /// do not keep the queue open.
    pub(super) requeue: WeakSender<Work<I, O, E>>,
    pub(super) handler: Handler<I, O, E>,
    pub(super) spawner: Arc<dyn Spawn>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) name: String,
    pub(super) autoscale: Option<Autoscale>,
    pub(super) target: AtomicUsize,
    pub(super) live: AtomicUsize,
    pub(super) running: AtomicUsize,
    pub(super) completed: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) panicked: AtomicU64,
    /// Notified when the target shrinks, so idle workers re-check it.
    pub(super) retire: Event,
    /// Notified when a worker exits.
    pub(super) exited: Event,
    /// Workers waiting for work.
    pub(super) idle: AtomicUsize,
    /// See [`Shared::item_nanos`].
    pub(super) item_nanos: AtomicU64,
}

/// What travels through the pool's queue: one submitted job, or a batch
/// of a `process` call's items.
pub(super) enum Work<I, O, E> {
    One(Job<I, O, E>),
    Batch(Batch<I, O, E>),
}

pub(super) struct Job<I, O, E> {
    pub(super) item: I,
    pub(super) reply: Reply<O, E>,
}

/// Where a submitted job's result goes. Dropped without a result (the job
/// was dropped unrun), it reports [`JobError::Cancelled`], so nothing is
/// lost silently.
pub(super) struct Reply<O, E>(Option<oneshot::Sender<Result<O, JobError<E>>>>);

impl<O, E> Reply<O, E> {
    pub(super) fn finish(&mut self, result: Result<O, JobError<E>>) {
        if let Some(tx) = self.0.take() {
            tx.send(result);
        }
    }
}

impl<O, E> Drop for Reply<O, E> {
    fn drop(&mut self) {
        self.finish(Err(JobError::Cancelled));
    }
}

/// Builds a [`WorkerPool`].
///
/// # Default
///
/// 4 workers, a queue of 1024 items, the default spawner (the current `Runtime`, else smol's global executor), the system
/// clock, no autoscaling.
pub struct WorkerPoolBuilder<I, O, E> {
    handler: Handler<I, O, E>,
    workers: usize,
    capacity: usize,
    spawner: Arc<dyn Spawn>,
    clock: Arc<dyn Clock>,
    name: String,
    autoscale: Option<(usize, usize)>,
    idle: Duration,
    scale_up_at: Option<usize>,
}

impl<I, O, E> WorkerPool<I, O, E>
where
    I: Send + 'static,
    O: Send + 'static,
    E: Send + 'static,
{
    /// A builder for a pool that runs `f` on every item.
    pub fn builder<F, Fut>(f: F) -> WorkerPoolBuilder<I, O, E>
    where
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, E>> + Send + 'static,
    {
        WorkerPoolBuilder {
            handler: Arc::new(move |i| Box::pin(f(i))),
            workers: 4,
            capacity: 1024,
            spawner: default_spawner(),
            clock: Arc::new(SystemClock),
            name: "worker-pool".to_owned(),
            autoscale: None,
            idle: Duration::from_secs(30),
            scale_up_at: None,
        }
    }
}

impl<I, O, E> WorkerPoolBuilder<I, O, E>
where
    I: Send + 'static,
    O: Send + 'static,
    E: Send + 'static,
{
    /// Workers to start with (may be zero: nothing runs until
    /// [`WorkerPool::resize`]).
    pub fn with_workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Slots the queue holds before `submit` waits: one per submitted
    /// job; a [`process`](WorkerPool::process) batch of items takes one.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Where the workers run.
    pub fn with_spawner(mut self, spawner: Arc<dyn Spawn>) -> Self {
        self.spawner = spawner;
        self
    }

    /// The clock of the autoscaler's idle timeout.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The name workers are spawned under (shown by the crate's
    /// [`Runtime`](crate::runtime::Runtime) task list) and logged with.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Scales the workers between `min` and `max`: a submit that finds
    /// more than [`with_scale_up_at`](Self::with_scale_up_at) items queued
    /// (default: half the capacity) adds a worker, and a worker idle for
    /// [`with_idle_timeout`](Self::with_idle_timeout) (default 30 s) leaves
    /// while more than `min` remain. The starting count is clamped into
    /// `min..=max`.
    pub fn with_autoscale(mut self, min: usize, max: usize) -> Self {
        self.autoscale = Some((min, max));
        self
    }

    /// Queue depth (in slots, see [`PoolStats::queued`]) above which an
    /// autoscaling pool adds a worker.
    pub fn with_scale_up_at(mut self, depth: usize) -> Self {
        self.scale_up_at = Some(depth);
        self
    }

    /// How long an autoscaled worker idles before leaving.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The pool, with its workers started.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero capacity, an autoscale maximum of zero
    /// or an autoscale minimum above its maximum.
    pub fn build(self) -> Result<WorkerPool<I, O, E>, ConfigError> {
        ConfigError::nonzero("capacity", self.capacity)?;
        let mut workers = self.workers;
        let autoscale = match self.autoscale {
            None => None,
            Some((_, 0)) => return Err(ConfigError::zero("autoscale max")),
            Some((min, max)) if min > max => {
                return Err(ConfigError::min_above_max("autoscale", min, max));
            }
            Some((min, max)) => {
                workers = workers.clamp(min, max);
                Some(Autoscale {
                    min,
                    max,
                    idle: self.idle,
                    scale_up_at: self.scale_up_at.unwrap_or(self.capacity / 2),
                })
            }
        };
        let (tx, rx) = async_channel::bounded(self.capacity);
        let requeue = tx.downgrade();
        let shared = Arc::new(Shared {
            rx,
            requeue,
            handler: self.handler,
            spawner: self.spawner,
            clock: self.clock,
            name: self.name,
            autoscale,
            target: AtomicUsize::new(workers),
            live: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            retire: Event::new(),
            exited: Event::new(),
            idle: AtomicUsize::new(0),
            item_nanos: AtomicU64::new(0),
        });
        for _ in 0..workers {
            Shared::start_worker(&shared);
        }
        Ok(WorkerPool { shared, tx })
    }
}

impl<I, O, E> WorkerPool<I, O, E>
where
    I: Send + 'static,
    O: Send + 'static,
    E: Send + 'static,
{
    /// Queues `item`, waiting while the queue is full, and returns a handle
    /// to its result.
    ///
    /// # Errors
    ///
    /// [`SubmitError`] with the item if the pool is closed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes leaves the item unqueued.
    pub async fn submit(&self, item: I) -> Result<JobHandle<O, E>, SubmitError<I>> {
        let (reply, handle) = oneshot::channel();
        let job = Job {
            item,
            reply: Reply(Some(reply)),
        };
        match self.tx.send(Work::One(job)).await {
            Ok(()) => {
                self.after_submit();
                Ok(JobHandle { rx: handle })
            }
            Err(e) => Err(SubmitError(e.into_inner().into_item())),
        }
    }

    /// Queues `item` if there is room now.
    ///
    /// # Errors
    ///
    /// [`TrySubmitError::Full`] or [`TrySubmitError::Closed`], with the item.
    pub fn try_submit(&self, item: I) -> Result<JobHandle<O, E>, TrySubmitError<I>> {
        let (reply, handle) = oneshot::channel();
        let job = Job {
            item,
            reply: Reply(Some(reply)),
        };
        match self.tx.try_send(Work::One(job)) {
            Ok(()) => {
                self.after_submit();
                Ok(JobHandle { rx: handle })
            }
            Err(TrySendError::Full(job)) => Err(TrySubmitError::Full(job.into_item())),
            Err(TrySendError::Closed(job)) => Err(TrySubmitError::Closed(job.into_item())),
        }
    }

    /// Runs every item of `items` through the pool and yields each item
    /// with its result, in input order when `ordered`, else as they finish.
    ///
    /// At most the queue capacity plus the worker count (at the time of the
    /// call) items are in flight or finished-but-unread for this call, so a
    /// slow consumer slows the feeding, not the memory. Jobs keep running
    /// while the consumer is slow. The items are read by a task on the
    /// pool's spawner.
    ///
    /// # Drop behavior
    ///
    /// Dropping the stream stops feeding; jobs already queued still run and
    /// their results are discarded.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures_lite::StreamExt;
    /// use smolkit::pool::WorkerPool;
    ///
    /// smol::block_on(async {
    ///     let pool = WorkerPool::builder(|x: u32| async move { Ok::<_, ()>(x + 1) })
    ///         .build()
    ///         .unwrap();
    ///     let out: Vec<(u32, u32)> = pool
    ///         .process(futures_lite::stream::iter(0..100u32), true)
    ///         .map(|(x, r)| (x, r.unwrap()))
    ///         .collect()
    ///         .await;
    ///     assert_eq!(out, (0..100).map(|x| (x, x + 1)).collect::<Vec<_>>());
    /// });
    /// ```
    pub fn process<S>(&self, items: S, ordered: bool) -> Process<I, O, E>
    where
        S: Stream<Item = I> + Send + 'static,
        I: Clone,
    {
        let window =
            self.tx.capacity().unwrap_or(1024) + self.shared.target.load(Ordering::Relaxed).max(1);
        let workers = self.shared.target.load(Ordering::Relaxed).max(1);
        let (res_tx, res_rx) = async_channel::unbounded();
        let feeder = process::feed(self.clone(), items, window, workers, res_tx);
        Process::new(res_rx, ordered, self.shared.spawner.spawn(feeder))
    }

    /// The average time of a `process` item so far, in nanoseconds.
    pub(super) fn item_nanos(&self) -> u64 {
        self.shared.item_nanos()
    }

    /// Queues a batch of a `process` call; hands it back if the pool is
    /// closed.
    pub(super) async fn submit_batch(&self, batch: Batch<I, O, E>) -> Result<(), Batch<I, O, E>> {
        match self.tx.send(Work::Batch(batch)).await {
            Ok(()) => {
                self.after_submit();
                Ok(())
            }
            Err(e) => match e.into_inner() {
                Work::Batch(b) => Err(b),
                Work::One(_) => unreachable!("sent a batch"),
            },
        }
    }

    fn after_submit(&self) {
        // NOTE: with no worker at all (an autoscale minimum of 0), any queued
        // job starts one; otherwise it would wait for the queue to pass the
        // scale-up depth, possibly forever.
        if let Some(scale) = self.shared.autoscale
            && (self.tx.len() > scale.scale_up_at
                || self.shared.target.load(Ordering::Acquire) == 0)
        {
            let target = &self.shared.target;
            let mut cur = target.load(Ordering::Relaxed);
            while cur < scale.max {
                match target.compare_exchange_weak(
                    cur,
                    cur + 1,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        tracing::debug!(pool = %self.shared.name, workers = cur + 1, "scaling up");
                        Shared::start_worker(&self.shared);
                        break;
                    }
                    Err(now) => cur = now,
                }
            }
        }
    }

    /// Sets the number of workers. Extra workers leave after their current
    /// job (idle ones at once); new ones start immediately. An autoscaling
    /// pool stays within its minimum and maximum: `workers` is clamped to
    /// them (the autoscaler moves on from there).
    pub fn resize(&self, workers: usize) {
        let workers = match self.shared.autoscale {
            Some(scale) => workers.clamp(scale.min, scale.max),
            None => workers,
        };
        let old = self.shared.target.swap(workers, Ordering::AcqRel);
        tracing::debug!(pool = %self.shared.name, from = old, to = workers, "resizing");
        let live = self.shared.live.load(Ordering::Acquire);
        for _ in live..workers {
            Shared::start_worker(&self.shared);
        }
        if workers < old {
            self.shared.retire.notify(usize::MAX);
        }
    }

    /// Stops accepting items; queued items still run.
    pub fn close(&self) -> bool {
        self.tx.close()
    }

    /// Whether the pool is closed.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Closes the pool and waits until every queued job has run and every
    /// worker has stopped. With no worker left (resized to zero), one is
    /// started so the queue drains.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops waiting; the pool stays closed and drains
    /// on its own.
    pub async fn join(&self) {
        self.close();
        if !self.shared.rx.is_empty() && self.shared.target.load(Ordering::Acquire) == 0 {
            self.resize(1);
        }
        crate::sync::wait_for(&self.shared.exited, || {
            self.shared.live.load(Ordering::Acquire) == 0
        })
        .await
    }

    /// A snapshot of the counters. Never blocks.
    pub fn stats(&self) -> PoolStats {
        let s = &self.shared;
        PoolStats {
            workers: s.live.load(Ordering::Relaxed),
            target_workers: s.target.load(Ordering::Relaxed),
            queued: s.rx.len(),
            running: s.running.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            panicked: s.panicked.load(Ordering::Relaxed),
        }
    }

    /// The queue's capacity.
    pub fn capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(usize::MAX)
    }
}

impl<I, O, E> Work<I, O, E> {
    /// The item of a submitted job refused by the queue.
    fn into_item(self) -> I {
        match self {
            Work::One(mut job) => {
                // The reply is dropped unsent, but the item is going back
                // to the caller, so nothing is reported: disarm it first (a
                // dropped oneshot sender tells a receiver nobody holds).
                drop(job.reply.0.take());
                job.item
            }
            Work::Batch(_) => unreachable!("only `submit` hands items back"),
        }
    }
}

/// The result of one submitted job.
///
/// # Drop behavior
///
/// Dropping the handle does not cancel the job; its result is discarded.
#[must_use = "futures do nothing unless you .await or poll them"]
pub struct JobHandle<O, E> {
    rx: oneshot::Receiver<Result<O, JobError<E>>>,
}

impl<O, E> JobHandle<O, E> {
    /// Whether the result is ready.
    pub fn is_finished(&self) -> bool {
        self.rx.is_ready()
    }
}

impl<O, E> Future for JobHandle<O, E> {
    type Output = Result<O, JobError<E>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(JobError::Cancelled)))
    }
}

impl<O, E> fmt::Debug for JobHandle<O, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl<I, O, E> fmt::Debug for WorkerPool<I, O, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerPool")
            .field("name", &self.shared.name)
            .field("capacity", &self.tx.capacity())
            .field("closed", &self.tx.is_closed())
            .field("workers", &self.shared.live.load(Ordering::Relaxed))
            .field("queued", &self.shared.rx.len())
            .finish()
    }
}

impl<I, O, E> fmt::Debug for WorkerPoolBuilder<I, O, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerPoolBuilder")
            .field("workers", &self.workers)
            .field("capacity", &self.capacity)
            .field("name", &self.name)
            .field("autoscale", &self.autoscale)
            .finish()
    }
}
