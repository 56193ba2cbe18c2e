//! Stream combinators for batching, pacing and bounded concurrency.
//!
//! - [`StreamKit::chunks_timeout`]: batches of up to `size` items, a batch
//!   going out early once its first item has waited `max_wait`; the
//!   remainder is flushed at the end of the stream. Timers go through a
//!   [`Clock`], so tests drive them with
//!   `testing::ManualClock`.
//! - [`StreamKit::throttle`]: items no faster than a
//!   [`RateLimiter`] allows.
//! - [`StreamKit::map_concurrent`] and
//!   [`StreamKit::map_concurrent_ordered`]: up to `n` futures in flight,
//!   each spawned as its own task.
//!
//! # Why spawn in `map_concurrent`?
//!
//! futures' `buffer_unordered` polls its in-flight futures only while its
//! consumer polls it: when the consumer is slow (it awaits a database write
//! between items), every in-flight request stalls with it, and timeouts fire
//! on work that was never driven. `map_concurrent` runs each future as a
//! task on a [`Spawn`], so in-flight work keeps
//! going whatever the consumer does; at most `n` items are in flight or
//! finished-but-unread at any time, so memory stays bounded. A panic in a
//! future becomes `Err(JoinError::Panicked)` for that item.

mod batching;
mod concurrent;
mod throttle;

use std::sync::Arc;
use std::time::Duration;

use futures_lite::Stream;

use crate::limit::RateLimiter;
use crate::runtime::{Clock, JoinError, Spawn, SystemClock, default_spawner};

pub use batching::ChunksTimeout;
pub use concurrent::MapConcurrent;
pub use throttle::Throttle;

/// The combinators of this module, for every [`Stream`].
pub trait StreamKit: Stream + Sized {
    /// Batches of up to `size` items; a batch is emitted early when
    /// `max_wait` has passed since its first item arrived, and the
    /// remainder is emitted when the stream ends. Uses the system clock.
    ///
    /// # Panics
    ///
    /// If `size` is zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures_lite::StreamExt;
    /// use smolkit::stream::StreamKit;
    ///
    /// let chunks: Vec<Vec<u32>> = smol::block_on(
    ///     futures_lite::stream::iter(1..=7)
    ///         .chunks_timeout(3, Duration::from_secs(1))
    ///         .collect(),
    /// );
    /// assert_eq!(chunks, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
    /// ```
    fn chunks_timeout(self, size: usize, max_wait: Duration) -> ChunksTimeout<Self> {
        self.chunks_timeout_on(Arc::new(SystemClock), size, max_wait)
    }

    /// [`chunks_timeout`](StreamKit::chunks_timeout) on `clock`.
    ///
    /// # Panics
    ///
    /// If `size` is zero.
    fn chunks_timeout_on(
        self,
        clock: Arc<dyn Clock>,
        size: usize,
        max_wait: Duration,
    ) -> ChunksTimeout<Self> {
        ChunksTimeout::new(self, clock, size, max_wait)
    }

    /// Passes each item on only once `limiter` grants it one cell (FIFO
    /// with the limiter's other users).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use futures_lite::StreamExt;
    /// use smolkit::limit::{Quota, RateLimiter};
    /// use smolkit::stream::StreamKit;
    ///
    /// let limiter = Arc::new(RateLimiter::new(Quota::per_second(1000).unwrap().with_burst(10).unwrap()));
    /// let n = smol::block_on(futures_lite::stream::iter(0..20).throttle(limiter).count());
    /// assert_eq!(n, 20);
    /// ```
    fn throttle(self, limiter: Arc<RateLimiter>) -> Throttle<Self> {
        Throttle::new(self, limiter)
    }

    /// Runs `f` on each item with up to `n` futures in flight at once, each
    /// spawned on smol's global executor; yields results as they finish.
    ///
    /// # Panics
    ///
    /// If `n` is zero.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures_lite::StreamExt;
    /// use smolkit::stream::StreamKit;
    ///
    /// let mut out: Vec<u32> = smol::block_on(
    ///     futures_lite::stream::iter(1..=5)
    ///         .map_concurrent(2, |x| async move { x * 10 })
    ///         .map(Result::unwrap)
    ///         .collect(),
    /// );
    /// out.sort();
    /// assert_eq!(out, vec![10, 20, 30, 40, 50]);
    /// ```
    fn map_concurrent<F, Fut>(self, n: usize, f: F) -> MapConcurrent<Self, F, Fut::Output>
    where
        F: FnMut(Self::Item) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        MapConcurrent::new(self, default_spawner(), n, false, f)
    }

    /// [`map_concurrent`](StreamKit::map_concurrent), yielding results in
    /// input order (a finished result waits for the ones before it; still
    /// at most `n` in flight or waiting).
    ///
    /// # Panics
    ///
    /// If `n` is zero.
    fn map_concurrent_ordered<F, Fut>(self, n: usize, f: F) -> MapConcurrent<Self, F, Fut::Output>
    where
        F: FnMut(Self::Item) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        MapConcurrent::new(self, default_spawner(), n, true, f)
    }

    /// [`map_concurrent`](StreamKit::map_concurrent) (or the ordered
    /// variant) on `spawner`.
    ///
    /// # Panics
    ///
    /// If `n` is zero.
    fn map_concurrent_on<F, Fut>(
        self,
        spawner: Arc<dyn Spawn>,
        n: usize,
        ordered: bool,
        f: F,
    ) -> MapConcurrent<Self, F, Fut::Output>
    where
        F: FnMut(Self::Item) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        MapConcurrent::new(self, spawner, n, ordered, f)
    }
}

impl<S: Stream> StreamKit for S {}

/// The item of [`MapConcurrent`]: the future's output, or how its task
/// ended without one.
pub type TaskResult<T> = Result<T, JoinError>;
