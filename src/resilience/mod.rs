//! Resilience: backoff, retry, timeouts, circuit breaking, and a policy that
//! composes them.
//!
//! - [`Backoff`]: constant, linear or exponential delays as an
//!   `Iterator<Item = Duration>`, capped, with every common [`Jitter`]
//!   kind, seedable.
//! - [`Retry`]: attempts, an elapsed-time limit measured on the clock, a
//!   classifier that can honour a server's Retry-After, a shared
//!   [`RetryBudget`], an `on_retry` hook, and per-attempt timeouts that
//!   shrink to the deadline.
//! - [`timeout`] / [`deadline`] (and `_on` variants for any
//!   [`Clock`](crate::runtime::Clock)) with an [`Elapsed`] error.
//! - [`CircuitBreaker`]: count- or time-window failure and slow-call rates,
//!   bounded half-open probing, open durations from a backoff, manual
//!   isolation, state-change events.
//! - [`Policy`]: all of the above plus the limits of [`crate::limit`], in
//!   one documented order.
//!
//! Every timer goes through an injected clock, so the seeds' 1, 2, 4, 8,
//! 10 s schedule is tested in microseconds with `testing::ManualClock`.

mod backoff;
mod breaker;
mod error;
mod policy;
mod retry;
mod timeout;

pub use backoff::{Backoff, BackoffBuilder, Jitter};
pub use breaker::{
    BreakerBuilder, BreakerMetrics, CallOutcome, CircuitBreaker, MAX_BUCKETS, Permit, State,
    StateChange, Window,
};
pub use error::{
    AttemptError, AttemptErrorRef, BreakerError, Elapsed, PolicyError, Rejected, RetryError,
};
pub use policy::{Policy, PolicyBuilder};
pub use retry::{Classify, Decision, NoHook, OnRetry, Retry, RetryBudget, RetryErrors, RetryEvent};
#[cfg(feature = "http")]
pub(crate) use timeout::watchdog_on;
pub use timeout::{Timeout, deadline, deadline_on, timeout, timeout_on};
