//! Limits: how much runs at once, and how often.
//!
//! - [`Semaphore`]: a fair (strict FIFO), weighted, cancel-safe semaphore
//!   with exact resize under load and close. The seeds' `async with
//!   limiter` is [`Semaphore::run`].
//! - [`RateLimiter`]: GCRA on one atomic, `rate` per `period` with `burst`,
//!   FIFO waiting, quota changes in place; [`KeyedRateLimiter`] keeps one
//!   limit per key (per host) and drops keys that have rested;
//!   [`RateLimit`] is what clients wait on, this limiter or one shared by
//!   many processes (`redis::RedisRateLimiter`).
//! - [`AdaptiveLimit`]: a semaphore resized from observed latency, drops
//!   and throughput, by [`Aimd`] or [`Gradient`].
//!
//! # Compared with the usual choices
//!
//! async-lock's semaphore lets a newcomer take permits ahead of a woken
//! waiter and has no weighted acquire, close or shrink; tokio's can shrink
//! only by forgetting *free* permits; governor cannot change its quota in
//! place. Here a shrink below the permits in use is exact (the semaphore
//! runs a debt that returning permits pay off), nobody overtakes a waiter,
//! and every timer goes through an injected [`Clock`](crate::runtime::Clock).

mod adaptive;
mod error;
mod rate;
mod semaphore;
mod shared;

pub use adaptive::{
    AdaptiveLimit, AdaptiveStats, Aimd, Algorithm, Gradient, Outcome, Sample, Token,
};
pub use error::{AcquireError, RateLimitError, TryAcquireError};
pub use rate::{KeyedRateLimiter, Quota, RateLimiter};
pub use semaphore::{Acquire, AcquireArc, Semaphore, SemaphoreGuard, SemaphoreGuardArc};
pub use shared::{IntoRateLimit, RateLimit, RateLimitFuture};
