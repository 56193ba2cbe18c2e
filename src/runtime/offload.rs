//! Offloading work that must not run on an async task: blocking IO and
//! CPU-heavy computation.
//!
//! - [`blocking()`] runs a closure on the `blocking` crate's thread pool (the
//!   one smol and async-fs use; up to 500 threads, grown on demand). Use it
//!   for blocking IO: file systems, DNS, a synchronous client.
//! - [`cpu`] runs a closure on the same pool, but admitted through a
//!   [`CpuPool`] limit sized to the cores, so CPU-heavy work never
//!   oversubscribes the machine and async tasks keep their threads. Build
//!   your own [`CpuPool`] for a different limit.
//!
//! A panic inside the closure comes back as [`OffloadError::Panicked`]
//! instead of tearing down anything.
//!
//! # Cancel safety
//!
//! A closure cannot be interrupted once started. Dropping the future
//! returned by [`blocking()`], [`cpu`] or [`CpuPool::run`] discards the
//! result; the closure still runs to its end, and for [`cpu`] it keeps its
//! slot of the limit until then, so the limit holds even under
//! cancellation. A closure still waiting for a slot when its future is
//! dropped never runs.

use std::fmt;
use std::num::NonZeroUsize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_lock::Semaphore;

use super::join::panic_message;
use super::{Clock, SystemClock};

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
/// Dropping the future before `f` starts gives its slot back and `f` never
/// runs; once started, `f` runs to the end and its result is discarded.
pub async fn cpu<F, T>(f: F) -> Result<T, OffloadError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    CpuPool::global().run(f).await
}

/// A limit on how many CPU-heavy closures run at once.
///
/// Cheap to clone; clones share the limit.
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
    permits: Arc<Semaphore>,
    limit: usize,
    state: Arc<PoolState>,
    clock: Arc<dyn Clock>,
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
struct Running(Arc<PoolState>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.finished.notify(usize::MAX);
    }
}

impl CpuPool {
    /// A pool that runs at most `limit` closures at once.
    pub fn new(limit: NonZeroUsize) -> Self {
        CpuPool {
            permits: Arc::new(Semaphore::new(limit.get())),
            limit: limit.get(),
            state: Arc::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// The pool [`cpu`] uses: its limit is `available_parallelism` (1 if
    /// unknown).
    pub fn global() -> &'static CpuPool {
        static GLOBAL: OnceLock<CpuPool> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            CpuPool::new(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
        })
    }

    /// The most closures that run at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The clock of [`shutdown`](Self::shutdown)'s grace period (default
    /// [`SystemClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Closures running now.
    pub fn running(&self) -> usize {
        self.state.running.load(Ordering::Acquire)
    }

    /// Refuses new work: every later [`run`](Self::run), and every one
    /// still waiting for a slot, fails with [`OffloadError::Closed`]
    /// (counted). Closures already running finish. Returns whether this
    /// call closed it.
    pub fn close(&self) -> bool {
        !self.state.closed.swap(true, Ordering::AcqRel)
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Acquire)
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
        let state = &*self.state;
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

    /// Waits for a slot, then runs `f` on the blocking thread pool.
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
        let state = &self.state;
        let refuse = || {
            state.refused.fetch_add(1, Ordering::AcqRel);
            Err(OffloadError::Closed)
        };
        if self.is_closed() {
            return refuse();
        }
        let permit = self.permits.acquire_arc().await;
        if self.is_closed() {
            return refuse();
        }
        state.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(state.clone());
        blocking(move || {
            // NOTE: the permit moves into the closure so that the slot is
            // held for as long as the closure runs, even if the caller's
            // future is dropped meanwhile; so does the running count.
            let _permit = permit;
            let _running = running;
            f()
        })
        .await
    }
}

impl fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuPool")
            .field("limit", &self.limit)
            .finish()
    }
}
