//! `Policy`: the resilience layers composed in one documented order.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::breaker::{CallOutcome, CircuitBreaker, Permit};
use super::error::{AttemptError, PolicyError};
use super::retry::{Classify, NoHook, OnRetry, Retry, RetryErrors};
use super::timeout::{SharedClock, timeout_on};
use crate::limit::{IntoRateLimit, RateLimit, Semaphore};
use crate::runtime::{Clock, SystemClock};
use crate::sync::lock_std as lock;

/// Rate limit, bulkhead, circuit breaker, retry and timeouts around one
/// async operation, in this order, outer to inner:
///
/// 1. **total timeout**: bounds everything below, waiting included, so the
///    caller knows the worst case;
/// 2. **rate limit**: waits for a cell (FIFO) — before taking a
///    concurrency slot, so a throttled call does not hold one idle;
/// 3. **bulkhead** (a [`Semaphore`]): at most N calls in flight; it is
///    held across the retries, so retries cannot multiply concurrency;
/// 4. **circuit breaker**: rejects at once while the service is known to
///    be down, and records the outcome of the whole retried call — one
///    logical call is one sample, so retries do not inflate the failure
///    rate;
/// 5. **retry**: repeats the attempt with backoff within its limits;
/// 6. **per-attempt timeout**: bounds each attempt (shrunk to the retry's
///    deadline).
///
/// Every layer is optional. [`run_with_fallback`](Policy::run_with_fallback)
/// adds a fallback that sees the [`PolicyError`] and may turn it into a
/// value. Built policies are cheap to clone and share.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use smolkit::resilience::{Backoff, CircuitBreaker, Policy, Retry};
///
/// let policy = Policy::builder()
///     .with_total_timeout(Duration::from_secs(5))
///     .with_concurrency_limit(8)
///     .with_breaker(CircuitBreaker::builder().build().unwrap())
///     .with_retry(Retry::new().with_backoff(Backoff::constant(Duration::from_millis(1))))
///     .with_attempt_timeout(Duration::from_secs(1))
///     .build();
/// let out = smol::block_on(policy.run(|| async { Ok::<_, std::io::Error>(42) }));
/// assert_eq!(out.unwrap(), 42);
/// ```
#[derive(Clone)]
pub struct Policy<C = RetryErrors, H = NoHook> {
    total_timeout: Option<Duration>,
    rate: Option<Arc<dyn RateLimit>>,
    bulkhead: Option<Arc<Semaphore>>,
    breaker: Option<CircuitBreaker>,
    retry: Option<Retry<C, H>>,
    attempt_timeout: Option<Duration>,
    clock: SharedClock,
}

/// Builds a [`Policy`]; every layer is off until set.
///
/// # Default
///
/// Every layer off (no rate limit, bulkhead, breaker, retry or timeouts),
/// the system clock.
#[derive(Debug)]
pub struct PolicyBuilder<C = RetryErrors, H = NoHook> {
    policy: Policy<C, H>,
}

impl Policy {
    /// A builder with every layer off, on the system clock.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder {
            policy: Policy {
                total_timeout: None,
                rate: None,
                bulkhead: None,
                breaker: None,
                retry: None,
                attempt_timeout: None,
                clock: Arc::new(SystemClock),
            },
        }
    }
}

impl<C, H> PolicyBuilder<C, H> {
    /// Layer 1: the whole call, waits and retries included, gets at most
    /// this long.
    pub fn with_total_timeout(mut self, limit: Duration) -> Self {
        self.policy.total_timeout = Some(limit);
        self
    }

    /// Layer 2: waits for one cell of `limiter` per call (a
    /// [`RateLimiter`](crate::limit::RateLimiter), or one shared by many
    /// processes; `None` for none).
    pub fn with_rate_limit(mut self, limiter: impl IntoRateLimit) -> Self {
        self.policy.rate = limiter.into_rate_limit();
        self
    }

    /// Layer 3: holds one permit of `bulkhead` per call (shared with
    /// whoever else holds the semaphore).
    pub fn with_bulkhead(mut self, bulkhead: Arc<Semaphore>) -> Self {
        self.policy.bulkhead = Some(bulkhead);
        self
    }

    /// Layer 3, own semaphore: at most `n` calls in flight.
    pub fn with_concurrency_limit(self, n: usize) -> Self {
        self.with_bulkhead(Arc::new(Semaphore::new(n)))
    }

    /// Layer 4.
    pub fn with_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.policy.breaker = Some(breaker);
        self
    }

    /// Layer 5. Its clock is its own (set it with [`Retry::with_clock`]).
    pub fn with_retry<C2, H2>(self, retry: Retry<C2, H2>) -> PolicyBuilder<C2, H2> {
        let p = self.policy;
        PolicyBuilder {
            policy: Policy {
                total_timeout: p.total_timeout,
                rate: p.rate,
                bulkhead: p.bulkhead,
                breaker: p.breaker,
                retry: Some(retry),
                attempt_timeout: p.attempt_timeout,
                clock: p.clock,
            },
        }
    }

    /// Layer 6: each attempt gets at most this long.
    pub fn with_attempt_timeout(mut self, limit: Duration) -> Self {
        self.policy.attempt_timeout = Some(limit);
        self
    }

    /// The clock of the two timeout layers.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.policy.clock = clock;
        self
    }

    /// The policy.
    pub fn build(mut self) -> Policy<C, H> {
        if let Some(limit) = self.policy.attempt_timeout {
            // With a retry layer, the attempt timeout is the retry's, so it
            // can shrink to the retry deadline.
            self.policy.retry = self
                .policy
                .retry
                .take()
                .map(|r| r.with_attempt_timeout(limit));
        }
        self.policy
    }
}

impl<C, H> Policy<C, H> {
    /// Runs `op` through every configured layer.
    ///
    /// # Errors
    ///
    /// [`PolicyError`] naming the layer that failed the call, with the
    /// operation's last error where there is one.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the attempt in flight (its cleanup runs),
    /// stops retrying, gives back the bulkhead permit and ignores the call
    /// in the breaker.
    pub async fn run<T, E, F, Fut>(&self, op: F) -> Result<T, PolicyError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
        H: OnRetry<T, E>,
        E: fmt::Debug,
    {
        // NOTE: the breaker's permit sits here, outside the total timeout,
        // so a call the timeout cuts short is recorded as a failure (a
        // service that hangs trips the breaker); dropping this future
        // (the caller's cancel) still records nothing.
        let permit = Mutex::new(None);
        match self.total_timeout {
            Some(limit) => match timeout_on(&*self.clock, limit, self.layers(op, &permit)).await {
                Ok(result) => result,
                Err(elapsed) => {
                    if let Some(p) = lock(&permit).take() {
                        p.record(CallOutcome::Failure);
                    }
                    Err(PolicyError::Timeout(elapsed))
                }
            },
            None => self.layers(op, &permit).await,
        }
    }

    /// [`run`](Policy::run), then `fallback` on any error: it may return a
    /// value in place of the error, or an error of its own.
    ///
    /// # Errors
    ///
    /// Whatever `fallback` returns.
    ///
    /// # Cancel safety
    ///
    /// As [`run`](Policy::run): dropping the future drops the attempt or
    /// fallback in progress.
    pub async fn run_with_fallback<T, E, F, Fut, G, GFut>(
        &self,
        op: F,
        fallback: G,
    ) -> Result<T, PolicyError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        G: FnOnce(PolicyError<E>) -> GFut,
        GFut: Future<Output = Result<T, PolicyError<E>>>,
        C: Classify<T, E>,
        H: OnRetry<T, E>,
        E: fmt::Debug,
    {
        match self.run(op).await {
            Ok(v) => Ok(v),
            Err(e) => {
                tracing::debug!(error = ?e, "policy falling back");
                fallback(e).await
            }
        }
    }

    async fn layers<T, E, F, Fut>(
        &self,
        mut op: F,
        permit_slot: &Mutex<Option<Permit>>,
    ) -> Result<T, PolicyError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
        H: OnRetry<T, E>,
        E: fmt::Debug,
    {
        if let Some(rate) = &self.rate {
            rate.until_ready(1)
                .await
                .map_err(PolicyError::RateLimited)?;
        }
        let _slot = match &self.bulkhead {
            Some(sem) => Some(sem.acquire().await.map_err(PolicyError::Bulkhead)?),
            None => None,
        };
        if let Some(breaker) = &self.breaker {
            let permit = breaker.try_acquire().map_err(PolicyError::CircuitOpen)?;
            *lock(permit_slot) = Some(permit);
        }
        let result = match &self.retry {
            Some(retry) => retry.run(op).await.map_err(PolicyError::Retry),
            None => match self.attempt_timeout {
                Some(limit) => match timeout_on(&*self.clock, limit, op()).await {
                    Ok(r) => r.map_err(|e| PolicyError::Inner(AttemptError::Inner(e))),
                    Err(elapsed) => Err(PolicyError::Inner(AttemptError::TimedOut(elapsed))),
                },
                None => op()
                    .await
                    .map_err(|e| PolicyError::Inner(AttemptError::Inner(e))),
            },
        };
        if let Some(permit) = lock(permit_slot).take() {
            permit.record(if result.is_ok() {
                CallOutcome::Success
            } else {
                CallOutcome::Failure
            });
        }
        result
    }
}

impl<C, H> fmt::Debug for Policy<C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("total_timeout", &self.total_timeout)
            .field("rate", &self.rate)
            .field("bulkhead", &self.bulkhead)
            .field("breaker", &self.breaker)
            .field("retry", &self.retry)
            .field("attempt_timeout", &self.attempt_timeout)
            .finish()
    }
}
