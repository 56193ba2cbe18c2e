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
use std::sync::{Arc, OnceLock};

use async_lock::Semaphore;

use super::join::panic_message;

/// Why offloaded work did not return a value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OffloadError {
    /// The closure panicked; the string is the panic message.
    Panicked(String),
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffloadError::Panicked(msg) => write!(f, "offloaded work panicked: {msg}"),
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
}

impl CpuPool {
    /// A pool that runs at most `limit` closures at once.
    pub fn new(limit: NonZeroUsize) -> Self {
        CpuPool {
            permits: Arc::new(Semaphore::new(limit.get())),
            limit: limit.get(),
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

    /// Waits for a slot, then runs `f` on the blocking thread pool.
    ///
    /// # Errors
    ///
    /// [`OffloadError::Panicked`] if `f` panics.
    ///
    /// # Cancel safety
    ///
    /// As [`cpu()`].
    pub async fn run<F, T>(&self, f: F) -> Result<T, OffloadError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = self.permits.acquire_arc().await;
        blocking(move || {
            // NOTE: the permit moves into the closure so that the slot is
            // held for as long as the closure runs, even if the caller's
            // future is dropped meanwhile.
            let _permit = permit;
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
