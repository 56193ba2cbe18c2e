//! Offloading work that must not run on an async task: blocking IO and
//! CPU-heavy computation.
//!
//! - [`blocking()`] runs a closure on the `blocking` crate's thread pool (the
//!   one smol and async-fs use; up to 500 threads, grown on demand). Use it
//!   for blocking IO: file systems, DNS, a synchronous client.
//! - [`cpu`] runs a closure on a [`CpuPool`]: a fixed set of threads, one
//!   per core, started once and kept, so CPU-heavy work never
//!   oversubscribes the machine, async tasks keep their threads, and a
//!   short job does not pay for a thread start-up. Build your own
//!   [`CpuPool`] for a different size.
//!
//! A panic inside the closure comes back as [`OffloadError::Panicked`]
//! instead of tearing down anything.
//!
//! # Cancel safety
//!
//! A closure cannot be interrupted once started. Dropping the future
//! returned by [`blocking()`], [`cpu`] or [`CpuPool::run`] discards the
//! result; the closure still runs to its end, and for [`cpu`] it keeps its
//! pool thread until then, so the limit holds even under cancellation. A
//! closure still queued for a pool thread when its future is dropped never
//! runs.

use std::collections::VecDeque;
use std::fmt;
use std::num::NonZeroUsize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use super::join::panic_message;
use super::{Clock, SystemClock};
use crate::sync::lock_std as lock;
use crate::sync::oneshot;

/// Why offloaded work did not return a value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OffloadError {
    /// The closure panicked; the string is the panic message.
    Panicked(String),
    /// The [`CpuPool`] was closed before the closure started; it never ran.
    Closed,
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffloadError::Panicked(msg) => write!(f, "offloaded work panicked: {msg}"),
            OffloadError::Closed => f.write_str("the CPU pool is closed"),
        }
    }
}

impl std::error::Error for OffloadError {}

/// Runs blocking `f` on the `blocking` thread pool.
///
/// # Errors
///
/// [`OffloadError::Panicked`] if `f` panics.
///
/// # Examples
///
/// ```
/// use smolkit::runtime::offload;
///
/// let len = smol::block_on(offload::blocking(|| std::fs::read_dir(".").map(|d| d.count())));
/// assert!(len.unwrap().unwrap() > 0);
/// ```
///
/// # Cancel safety
///
/// Dropping the future does not stop `f` once it runs on its thread; its
/// result is discarded.
pub async fn blocking<F, T>(f: F) -> Result<T, OffloadError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    blocking::unblock(move || catch_unwind(AssertUnwindSafe(f)))
        .await
        .map_err(|p| OffloadError::Panicked(panic_message(p)))
}

/// Runs CPU-heavy `f` through the default [`CpuPool`], whose limit is the
/// number of cores (`available_parallelism`).
///
/// # Errors
///
/// [`OffloadError::Panicked`] if `f` panics.
///
/// # Examples
///
/// ```
/// use smolkit::runtime::offload;
///
/// let sum = smol::block_on(offload::cpu(|| (0..1_000u64).map(|i| i * i).sum::<u64>()));
/// assert_eq!(sum, Ok(332_833_500));
/// ```
///
/// # Cancel safety
///
/// Dropping the future before `f` starts takes it out of the queue (`f`
/// never runs); once started, `f` runs to the end and its result is discarded.
pub async fn cpu<F, T>(f: F) -> Result<T, OffloadError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    CpuPool::global().run(f).await
}

/// A fixed set of threads for CPU-heavy closures, one per core by
/// default (rayon's model): started on first use and kept, so a short job
/// never pays for a thread start-up, and never more closures at once than
/// threads, so CPU work does not oversubscribe the machine and async
/// tasks keep their threads. Closures run in the order they were
/// submitted.
///
/// Cheap to clone; clones share the threads. The threads end when the
/// last clone is dropped and the queue is empty.
///
/// # Examples
///
/// ```
/// use std::num::NonZeroUsize;
/// use smolkit::runtime::offload::CpuPool;
///
/// let pool = CpuPool::new(NonZeroUsize::new(2).unwrap());
/// let out = smol::block_on(pool.run(|| 6 * 7));
/// assert_eq!(out, Ok(42));
/// assert_eq!(pool.limit(), 2);
/// ```
#[derive(Clone)]
pub struct CpuPool {
    owner: Arc<Owner>,
    clock: Arc<dyn Clock>,
}

/// Held by the pool's handles only: its drop lets the threads end.
struct Owner {
    shared: Arc<Shared>,
    limit: usize,
    started: OnceLock<usize>,
}

type Job = Box<dyn FnOnce() + Send>;

struct Shared {
    state: PoolState,
    queue: Mutex<Queue>,
    /// Signalled when a job is queued or the handles are gone.
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Every handle is dropped: threads leave once the queue is empty.
    gone: bool,
}

#[derive(Default)]
struct PoolState {
    closed: AtomicBool,
    running: AtomicUsize,
    refused: AtomicU64,
    /// Notified when a closure finishes.
    finished: event_listener::Event,
}

/// What [`CpuPool::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuShutdown {
    /// Every closure that had started finished within the grace period.
    pub drained: bool,
    /// Closures still running when it returned (they finish on their own;
    /// a closure cannot be interrupted).
    pub running: usize,
    /// Closures refused since the pool was closed (they never ran).
    pub refused: u64,
}

/// Counts a running closure; wakes `shutdown` when it ends, even by a panic.
struct Running<'a>(&'a PoolState);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.finished.notify(usize::MAX);
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        lock(&self.shared.queue).gone = true;
        self.shared.ready.notify_all();
    }
}

impl Shared {
    /// A pool thread: runs queued jobs until the handles are gone and the
    /// queue is empty.
    fn work(&self) {
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    if q.gone {
                        return;
                    }
                    q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            job();
        }
    }

    fn refuse<T>(&self) -> Result<T, OffloadError> {
        self.state.refused.fetch_add(1, Ordering::AcqRel);
        Err(OffloadError::Closed)
    }
}

impl CpuPool {
    /// A pool of `limit` threads (started on first use), so at most
    /// `limit` closures run at once.
    pub fn new(limit: NonZeroUsize) -> Self {
        CpuPool {
            owner: Arc::new(Owner {
                shared: Arc::new(Shared {
                    state: PoolState::default(),
                    queue: Mutex::new(Queue::default()),
                    ready: Condvar::new(),
                }),
                limit: limit.get(),
                started: OnceLock::new(),
            }),
            clock: Arc::new(SystemClock),
        }
    }

    /// The pool [`cpu`] uses: as many threads as `available_parallelism`
    /// (1 if unknown).
    pub fn global() -> &'static CpuPool {
        static GLOBAL: OnceLock<CpuPool> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            CpuPool::new(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
        })
    }

    /// The most closures that run at once (the number of threads).
    pub fn limit(&self) -> usize {
        self.owner.limit
    }

    /// The clock of [`shutdown`](Self::shutdown)'s grace period (default
    /// [`SystemClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn state(&self) -> &PoolState {
        &self.owner.shared.state
    }

    /// Closures running now.
    pub fn running(&self) -> usize {
        self.state().running.load(Ordering::Acquire)
    }

    /// Refuses new work: every later [`run`](Self::run), and every one
    /// still waiting for a thread, fails with [`OffloadError::Closed`]
    /// (counted). Closures already running finish. Returns whether this
    /// call closed it.
    pub fn close(&self) -> bool {
        let first = !self.state().closed.swap(true, Ordering::AcqRel);
        // The queued jobs see the pool closed and refuse themselves: at
        // once, not when a thread gets to them.
        let queued = std::mem::take(&mut lock(&self.owner.shared.queue).jobs);
        for job in queued {
            job();
        }
        first
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.state().closed.load(Ordering::Acquire)
    }

    /// Closes the pool and waits up to `grace` for the running closures to
    /// finish (the seeds' graceful shutdown of the CPU pool).
    ///
    /// ```
    /// use std::num::NonZeroUsize;
    /// use std::time::Duration;
    /// use smolkit::runtime::offload::{CpuPool, OffloadError};
    ///
    /// let pool = CpuPool::new(NonZeroUsize::new(2).unwrap());
    /// smol::block_on(async {
    ///     assert_eq!(pool.run(|| 1).await, Ok(1));
    ///     let report = pool.shutdown(Duration::from_secs(5)).await;
    ///     assert!(report.drained);
    ///     assert_eq!(pool.run(|| 2).await, Err(OffloadError::Closed));
    ///     assert_eq!(pool.shutdown(Duration::ZERO).await.refused, 1);
    /// });
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops waiting; the pool stays closed.
    pub async fn shutdown(&self, grace: Duration) -> CpuShutdown {
        self.close();
        let state = self.state();
        let idle = crate::sync::wait_for(&state.finished, || {
            state.running.load(Ordering::Acquire) == 0
        });
        let drained = crate::sync::unless(idle, self.clock.sleep(grace))
            .await
            .is_some();
        let running = self.running();
        CpuShutdown {
            drained: drained || running == 0,
            running,
            refused: state.refused.load(Ordering::Acquire),
        }
    }

    /// Starts the threads once; how many started.
    fn threads(&self) -> usize {
        *self.owner.started.get_or_init(|| {
            let mut started = 0;
            for i in 0..self.owner.limit {
                let shared = self.owner.shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("smolkit-cpu-{i}"))
                    .spawn(move || shared.work());
                match spawned {
                    Ok(_) => started += 1,
                    Err(e) => {
                        tracing::error!(error = %e, thread = i, "could not start a CPU pool thread");
                    }
                }
            }
            started
        })
    }

    /// Queues `f` for the pool's threads and waits for its result.
    ///
    /// # Errors
    ///
    /// [`OffloadError::Panicked`] if `f` panics; [`OffloadError::Closed`]
    /// if the pool is closed before `f` starts.
    ///
    /// # Cancel safety
    ///
    /// As [`cpu()`].
    pub async fn run<F, T>(&self, f: F) -> Result<T, OffloadError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let shared = &self.owner.shared;
        if self.is_closed() {
            return shared.refuse();
        }
        if self.threads() == 0 {
            // NOTE: not one thread could be started (the process is out of
            // threads): the work still runs, on the blocking pool.
            return blocking(f).await;
        }
        let (tx, rx) = oneshot::channel();
        let job_shared = shared.clone();
        let job: Job = Box::new(move || {
            // Its caller is gone before it started: it never runs.
            if tx.is_abandoned() {
                return;
            }
            let state = &job_shared.state;
            if state.closed.load(Ordering::Acquire) {
                tx.send(job_shared.refuse());
                return;
            }
            state.running.fetch_add(1, Ordering::AcqRel);
            let running = Running(state);
            let out = catch_unwind(AssertUnwindSafe(f));
            drop(running);
            tx.send(out.map_err(|p| OffloadError::Panicked(panic_message(p))));
        });
        lock(&shared.queue).jobs.push_back(job);
        shared.ready.notify_one();
        // NOTE: the sender is dropped unsent only if its job is dropped
        // unrun, which only the queue's end could do; report it as closed.
        rx.await.unwrap_or(Err(OffloadError::Closed))
    }
}

impl fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuPool")
            .field("limit", &self.owner.limit)
            .field("running", &self.running())
            .finish()
    }
}
