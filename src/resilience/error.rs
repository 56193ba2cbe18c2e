//! Errors of the resilience module.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use crate::limit::{AcquireError, RateLimitError};

/// A timeout or deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed {
    pub(crate) after: Duration,
}

impl Elapsed {
    /// The time that was allowed.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out after {:?}", self.after)
    }
}

impl Error for Elapsed {}

/// How one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptError<E> {
    /// The operation returned an error.
    Inner(E),
    /// The attempt ran out of time.
    TimedOut(Elapsed),
}

impl<E> AttemptError<E> {
    /// The operation's error, if it returned one.
    pub fn into_inner(self) -> Option<E> {
        match self {
            AttemptError::Inner(e) => Some(e),
            AttemptError::TimedOut(_) => None,
        }
    }

    /// The operation's error, if it returned one.
    pub fn inner(&self) -> Option<&E> {
        match self {
            AttemptError::Inner(e) => Some(e),
            AttemptError::TimedOut(_) => None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for AttemptError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Inner(e) => e.fmt(f),
            AttemptError::TimedOut(e) => write!(f, "attempt {e}"),
        }
    }
}

impl<E: Error + 'static> Error for AttemptError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            AttemptError::Inner(e) => Some(e),
            AttemptError::TimedOut(e) => Some(e),
        }
    }
}

/// Why [`Retry::run`](super::Retry::run) gave up. Every variant keeps the
/// last error (where there is one) and the number of attempts made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryError<E> {
    /// The classifier said the error is not worth retrying.
    Permanent {
        /// The error.
        error: E,
        /// Attempts made.
        attempts: u32,
    },
    /// The maximum number of attempts was reached (or the backoff schedule
    /// ended).
    Exhausted {
        /// The last attempt's error.
        error: AttemptError<E>,
        /// Attempts made.
        attempts: u32,
    },
    /// The elapsed-time limit would be passed by waiting for another
    /// attempt, or was reached during one.
    Deadline {
        /// The last attempt's error.
        error: AttemptError<E>,
        /// Attempts made.
        attempts: u32,
        /// Time since the first attempt started.
        elapsed: Duration,
    },
    /// The retry budget is spent: too many retries lately.
    Budget {
        /// The last attempt's error.
        error: AttemptError<E>,
        /// Attempts made.
        attempts: u32,
    },
}

impl<E> RetryError<E> {
    /// Attempts made.
    pub fn attempts(&self) -> u32 {
        match self {
            RetryError::Permanent { attempts, .. }
            | RetryError::Exhausted { attempts, .. }
            | RetryError::Deadline { attempts, .. }
            | RetryError::Budget { attempts, .. } => *attempts,
        }
    }

    /// The last attempt's error.
    pub fn last_error(&self) -> AttemptErrorRef<'_, E> {
        match self {
            RetryError::Permanent { error, .. } => AttemptErrorRef::Inner(error),
            RetryError::Exhausted { error, .. }
            | RetryError::Deadline { error, .. }
            | RetryError::Budget { error, .. } => match error {
                AttemptError::Inner(e) => AttemptErrorRef::Inner(e),
                AttemptError::TimedOut(e) => AttemptErrorRef::TimedOut(*e),
            },
        }
    }

    /// The operation's last error, if the last attempt returned one (not a
    /// timeout).
    pub fn into_inner(self) -> Option<E> {
        match self {
            RetryError::Permanent { error, .. } => Some(error),
            RetryError::Exhausted { error, .. }
            | RetryError::Deadline { error, .. }
            | RetryError::Budget { error, .. } => error.into_inner(),
        }
    }
}

/// A borrowed view of the last attempt's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptErrorRef<'a, E> {
    /// The operation returned this error.
    Inner(&'a E),
    /// The attempt ran out of time.
    TimedOut(Elapsed),
}

impl<E: fmt::Display> fmt::Display for RetryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryError::Permanent { error, attempts } => {
                write!(f, "permanent error after {attempts} attempt(s): {error}")
            }
            RetryError::Exhausted { error, attempts } => {
                write!(f, "gave up after {attempts} attempt(s): {error}")
            }
            RetryError::Deadline {
                error,
                attempts,
                elapsed,
            } => write!(
                f,
                "retry deadline reached after {attempts} attempt(s) in {elapsed:?}: {error}"
            ),
            RetryError::Budget { error, attempts } => {
                write!(f, "retry budget spent after {attempts} attempt(s): {error}")
            }
        }
    }
}

impl<E: Error + 'static> Error for RetryError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RetryError::Permanent { error, .. } => Some(error),
            RetryError::Exhausted { error, .. }
            | RetryError::Deadline { error, .. }
            | RetryError::Budget { error, .. } => Some(error),
        }
    }
}

/// A circuit breaker refused the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub(crate) retry_after: Duration,
    pub(crate) isolated: bool,
}

impl Rejected {
    /// How long until the breaker lets a probe through (zero while the
    /// half-open probes are all taken, or while isolated).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// Whether the breaker was isolated by hand.
    pub fn is_isolated(&self) -> bool {
        self.isolated
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.isolated {
            f.write_str("circuit breaker isolated")
        } else {
            write!(
                f,
                "circuit breaker open, retry after {:?}",
                self.retry_after
            )
        }
    }
}

impl Error for Rejected {}

/// Why [`CircuitBreaker::call`](super::CircuitBreaker::call) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerError<E> {
    /// The breaker refused the call; the operation did not run.
    Rejected(Rejected),
    /// The operation ran and failed.
    Inner(E),
}

impl<E: fmt::Display> fmt::Display for BreakerError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreakerError::Rejected(r) => r.fmt(f),
            BreakerError::Inner(e) => e.fmt(f),
        }
    }
}

impl<E: Error + 'static> Error for BreakerError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            BreakerError::Rejected(r) => Some(r),
            BreakerError::Inner(e) => Some(e),
        }
    }
}

/// Which layer of a [`Policy`](super::Policy) failed the call. The
/// operation's own error is kept where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyError<E> {
    /// The total timeout passed.
    Timeout(Elapsed),
    /// The rate limiter refused (the request can never conform).
    RateLimited(RateLimitError),
    /// The bulkhead (concurrency limit) was closed or the request too large.
    Bulkhead(AcquireError),
    /// The circuit breaker refused the call.
    CircuitOpen(Rejected),
    /// The retry layer gave up; it holds the last attempt's error.
    Retry(RetryError<E>),
    /// The operation failed (no retry layer configured).
    Inner(AttemptError<E>),
}

impl<E> PolicyError<E> {
    /// The operation's own error, if the call got that far.
    pub fn into_inner(self) -> Option<E> {
        match self {
            PolicyError::Retry(e) => e.into_inner(),
            PolicyError::Inner(e) => e.into_inner(),
            _ => None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for PolicyError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::Timeout(e) => write!(f, "policy total timeout: {e}"),
            PolicyError::RateLimited(e) => write!(f, "policy rate limit: {e}"),
            PolicyError::Bulkhead(e) => write!(f, "policy bulkhead: {e}"),
            PolicyError::CircuitOpen(e) => write!(f, "policy breaker: {e}"),
            PolicyError::Retry(e) => e.fmt(f),
            PolicyError::Inner(e) => e.fmt(f),
        }
    }
}

impl<E: Error + 'static> Error for PolicyError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            PolicyError::Timeout(e) => Some(e),
            PolicyError::RateLimited(e) => Some(e),
            PolicyError::Bulkhead(e) => Some(e),
            PolicyError::CircuitOpen(e) => Some(e),
            PolicyError::Retry(e) => Some(e),
            PolicyError::Inner(e) => Some(e),
        }
    }
}
