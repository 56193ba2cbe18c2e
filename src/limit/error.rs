//! Errors of the limit module.

use std::fmt;
use std::time::Duration;

/// Why [`Semaphore::acquire`](super::Semaphore::acquire) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcquireError {
    /// The semaphore was closed.
    Closed,
    /// More permits were asked for than the semaphore has in all, so the
    /// request could never be granted (also returned to a waiter when a
    /// resize shrinks the semaphore below its request).
    TooLarge {
        /// Permits asked for.
        requested: usize,
        /// The semaphore's capacity.
        capacity: usize,
    },
}

impl AcquireError {
    /// Whether the semaphore was closed.
    pub fn is_closed(&self) -> bool {
        matches!(self, AcquireError::Closed)
    }
}

impl fmt::Display for AcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcquireError::Closed => f.write_str("semaphore closed"),
            AcquireError::TooLarge {
                requested,
                capacity,
            } => write!(
                f,
                "requested {requested} permits from a semaphore of capacity {capacity}"
            ),
        }
    }
}

impl std::error::Error for AcquireError {}

/// Why [`Semaphore::try_acquire`](super::Semaphore::try_acquire) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TryAcquireError {
    /// Not enough permits are free now, or earlier waiters are queued
    /// (no barging past them).
    NoPermits,
    /// The semaphore was closed.
    Closed,
    /// More permits were asked for than the semaphore has in all.
    TooLarge {
        /// Permits asked for.
        requested: usize,
        /// The semaphore's capacity.
        capacity: usize,
    },
}

impl fmt::Display for TryAcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryAcquireError::NoPermits => f.write_str("no permits available"),
            TryAcquireError::Closed => f.write_str("semaphore closed"),
            TryAcquireError::TooLarge {
                requested,
                capacity,
            } => write!(
                f,
                "requested {requested} permits from a semaphore of capacity {capacity}"
            ),
        }
    }
}

impl std::error::Error for TryAcquireError {}

/// A rate limiter said no to a [`check`](super::RateLimiter::check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateLimitError {
    /// Not now: the cells will be available after `retry_after` (if nobody
    /// else takes them first).
    NotYet {
        /// How long until the request would conform.
        retry_after: Duration,
    },
    /// The request asks for more cells than the burst allows, so it can
    /// never conform.
    InsufficientCapacity {
        /// Cells asked for.
        requested: u32,
        /// The limiter's burst.
        burst: u32,
    },
    /// A shared limiter could not reach the store that holds its state
    /// (its own error says why, logged at `warn`); no cells were taken.
    Unavailable,
}

impl RateLimitError {
    /// How long to wait before trying again, if waiting can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RateLimitError::NotYet { retry_after } => Some(*retry_after),
            RateLimitError::InsufficientCapacity { .. } | RateLimitError::Unavailable => None,
        }
    }
}

impl fmt::Display for RateLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimitError::NotYet { retry_after } => {
                write!(f, "rate limited, retry after {retry_after:?}")
            }
            RateLimitError::InsufficientCapacity { requested, burst } => write!(
                f,
                "requested {requested} cells from a rate limiter whose burst is {burst}"
            ),
            RateLimitError::Unavailable => {
                f.write_str("the shared rate limiter's store cannot be reached")
            }
        }
    }
}

impl std::error::Error for RateLimitError {}
