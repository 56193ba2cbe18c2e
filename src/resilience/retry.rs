//! `Retry`: attempts, elapsed-time limit, classifier, retry budget, hooks.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::backoff::{Backoff, Jitter};
use super::error::{AttemptError, RetryError};
use super::timeout::{SharedClock, timeout_on};
use crate::runtime::{Clock, SystemClock};

/// What to do with an attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Accept the outcome as final: an `Ok` is returned, an `Err` is a
    /// [`RetryError::Permanent`].
    Done,
    /// Try again after the next backoff delay.
    Retry,
    /// Try again after this delay (a server hint such as Retry-After),
    /// capped by [`Retry::with_max_retry_after`]. It replaces the backoff
    /// delay.
    RetryAfter(Duration),
}

/// Decides, from an attempt's outcome, whether to retry.
///
/// Implemented for closures `Fn(Result<&T, &E>) -> Decision`. A timed-out
/// attempt is always retryable and never reaches the classifier.
pub trait Classify<T, E>: Send + Sync {
    /// The decision for one outcome.
    fn classify(&self, outcome: Result<&T, &E>) -> Decision;
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(Result<&T, &E>) -> Decision + Send + Sync,
{
    fn classify(&self, outcome: Result<&T, &E>) -> Decision {
        self(outcome)
    }
}

/// The default classifier: every error is retried, every success accepted.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryErrors;

impl<T, E> Classify<T, E> for RetryErrors {
    fn classify(&self, outcome: Result<&T, &E>) -> Decision {
        match outcome {
            Ok(_) => Decision::Done,
            Err(_) => Decision::Retry,
        }
    }
}

/// One retry about to happen, for [`OnRetry`] hooks.
#[derive(Debug)]
#[non_exhaustive]
pub struct RetryEvent<'a, T, E> {
    /// The attempt that just finished (1 for the first).
    pub attempt: u32,
    /// How long until the next attempt.
    pub delay: Duration,
    /// What the attempt gave (an `Ok` the classifier chose to retry, or the
    /// error).
    pub outcome: &'a Result<T, AttemptError<E>>,
}

/// Called before each retry sleep. Implemented for closures
/// `Fn(&RetryEvent<'_, T, E>)`.
pub trait OnRetry<T, E>: Send + Sync {
    /// Observes one retry.
    fn on_retry(&self, event: &RetryEvent<'_, T, E>);
}

impl<T, E, F> OnRetry<T, E> for F
where
    F: Fn(&RetryEvent<'_, T, E>) + Send + Sync,
{
    fn on_retry(&self, event: &RetryEvent<'_, T, E>) {
        self(event)
    }
}

/// The default hook: nothing (the `tracing` event is always emitted).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl<T, E> OnRetry<T, E> for NoHook {
    fn on_retry(&self, _: &RetryEvent<'_, T, E>) {}
}

/// A retry policy.
///
/// Every retry loop needs a limiting factor; this one has three, all
/// optional but the first:
///
/// - **attempts**: at most `max_attempts` calls in all (default 3);
/// - **elapsed time**: no attempt starts, and none runs, past
///   `max_elapsed` after the first one started, measured on the clock
///   (wall time, not a sum of sleeps: slow attempts count);
/// - **a budget**: a [`RetryBudget`] shared by many calls caps retries to a
///   fraction of recent calls, so an outage does not multiply the load
///   (tower's idea: "Why budgets and not max retries?" — because max
///   retries multiplies load by that factor exactly when the server is
///   least able to take it).
///
/// The per-attempt timeout shrinks to the time left before the elapsed
/// limit, so the limit holds even while an attempt hangs.
///
/// # Default
///
/// - 3 attempts
/// - backoff: exponential from 100 ms, ×2, capped at 10 s, full jitter
/// - no elapsed-time limit, no per-attempt timeout, no budget
/// - a server hint ([`Decision::RetryAfter`]) is capped at 60 s
/// - classifier: retry every error ([`RetryErrors`])
/// - system clock
///
/// # Cancel safety
///
/// Dropping the future returned by [`run`](Retry::run) drops the attempt
/// in flight (its cleanup runs) or the sleep, and no further attempt
/// starts.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// use smolkit::resilience::{Backoff, Retry};
///
/// let calls = AtomicU32::new(0);
/// let retry = Retry::new()
///     .with_max_attempts(5)
///     .with_backoff(Backoff::constant(Duration::from_millis(1)));
/// let out = smol::block_on(retry.run(|| async {
///     if calls.fetch_add(1, Ordering::SeqCst) < 2 { Err("flaky") } else { Ok("done") }
/// }));
/// assert_eq!(out, Ok("done"));
/// assert_eq!(calls.load(Ordering::SeqCst), 3);
/// ```
#[derive(Clone)]
pub struct Retry<C = RetryErrors, H = NoHook> {
    backoff: Backoff,
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    attempt_timeout: Option<Duration>,
    max_retry_after: Duration,
    budget: Option<Arc<RetryBudget>>,
    clock: SharedClock,
    classifier: C,
    hook: H,
}

impl Retry {
    /// A retry policy with the defaults listed under [`Retry`].
    pub fn new() -> Self {
        Retry {
            backoff: Backoff::exponential(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter(Jitter::Full)
                .build(),
            max_attempts: 3,
            max_elapsed: None,
            attempt_timeout: None,
            max_retry_after: Duration::from_secs(60),
            budget: None,
            clock: Arc::new(SystemClock),
            classifier: RetryErrors,
            hook: NoHook,
        }
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}

impl<C, H> Retry<C, H> {
    /// At most `n` attempts in all (the first included); 0 counts as 1.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The delays between attempts. A schedule that ends stops retrying.
    pub fn with_backoff(mut self, backoff: impl Into<Backoff>) -> Self {
        let backoff = backoff.into();
        self.backoff = backoff;
        self
    }

    /// No attempt starts or runs past this long after the first started.
    pub fn with_max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = Some(limit);
        self
    }

    /// Each attempt gets at most this long (less near the elapsed limit).
    pub fn with_attempt_timeout(mut self, limit: Duration) -> Self {
        self.attempt_timeout = Some(limit);
        self
    }

    /// The largest server-hinted delay honoured; longer hints are cut to it.
    pub fn with_max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// Shares a retry budget with other calls.
    pub fn with_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Times attempts and sleeps on `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Decides which outcomes are retried.
    pub fn with_classifier<C2>(self, classifier: C2) -> Retry<C2, H> {
        self.map_parts(|_, hook| (classifier, hook))
    }

    /// Calls `hook` before every retry sleep.
    pub fn on_retry<H2>(self, hook: H2) -> Retry<C, H2> {
        self.map_parts(|classifier, _| (classifier, hook))
    }

    /// The same policy with its classifier and hook replaced.
    fn map_parts<C2, H2>(self, f: impl FnOnce(C, H) -> (C2, H2)) -> Retry<C2, H2> {
        let (classifier, hook) = f(self.classifier, self.hook);
        Retry {
            backoff: self.backoff,
            max_attempts: self.max_attempts,
            max_elapsed: self.max_elapsed,
            attempt_timeout: self.attempt_timeout,
            max_retry_after: self.max_retry_after,
            budget: self.budget,
            clock: self.clock,
            classifier,
            hook,
        }
    }

    /// The maximum number of attempts.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Runs `op` until its outcome is accepted or a limit is reached.
    ///
    /// # Errors
    ///
    /// A [`RetryError`] saying which limit stopped it, with the last error
    /// and the number of attempts. An `Ok` outcome that the classifier
    /// wanted retried is returned as `Ok` when the limits stop the retries.
    ///
    /// # Cancel safety
    ///
    /// See [`Retry`].
    pub async fn run<T, E, F, Fut>(&self, mut op: F) -> Result<T, RetryError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
        H: OnRetry<T, E>,
        E: fmt::Debug,
    {
        let clock = &*self.clock;
        // NOTE: the clock is read only when an elapsed limit needs it.
        let start = self.max_elapsed.map(|_| clock.now());
        let deadline = start
            .zip(self.max_elapsed)
            .and_then(|(s, d)| s.checked_add(d));
        // NOTE: the schedule is copied only when a retry needs it, and
        // boxed: an attempt that succeeds at once pays no clone, and the
        // future stays small (it is moved into place by every caller).
        let mut backoff: Option<Box<Backoff>> = None;
        if let Some(budget) = &self.budget {
            budget.deposit();
        }
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let outcome = self.attempt(&mut op, deadline).await;
            let decision = match &outcome {
                Ok(v) => self.classifier.classify(Ok(v)),
                Err(AttemptError::Inner(e)) => self.classifier.classify(Err(e)),
                Err(AttemptError::TimedOut(_)) => Decision::Retry,
            };
            let stop = |kind: Stop, outcome: Result<T, AttemptError<E>>| {
                let elapsed =
                    || start.map_or(Duration::ZERO, |s| clock.now().saturating_duration_since(s));
                stop_with(kind, outcome, attempt, elapsed)
            };
            if matches!(decision, Decision::Done) {
                return stop(Stop::Permanent, outcome);
            }
            let backoff = backoff.get_or_insert_with(|| {
                let mut b = Box::new(self.backoff.clone());
                b.reset();
                b
            });
            let delay = match self.next_delay(decision, backoff, attempt, deadline) {
                Ok(delay) => delay,
                Err(kind) => return stop(kind, outcome),
            };
            match &outcome {
                Err(e) => tracing::debug!(
                    attempt,
                    delay_ms = delay.as_secs_f64() * 1e3,
                    error = ?e,
                    "retrying after an error"
                ),
                Ok(_) => tracing::debug!(
                    attempt,
                    delay_ms = delay.as_secs_f64() * 1e3,
                    "retrying an outcome the classifier rejected"
                ),
            }
            self.hook.on_retry(&RetryEvent {
                attempt,
                delay,
                outcome: &outcome,
            });
            drop(outcome);
            clock.sleep(delay).await;
        }
    }

    /// The delay before the next attempt, or the limit that stops here.
    fn next_delay(
        &self,
        decision: Decision,
        backoff: &mut Backoff,
        attempt: u32,
        deadline: Option<Instant>,
    ) -> Result<Duration, Stop> {
        let delay = match decision {
            Decision::Done => return Err(Stop::Permanent),
            Decision::Retry => backoff.next().ok_or(Stop::Exhausted)?,
            Decision::RetryAfter(hint) => {
                // Keep the schedule moving even when a hint wins.
                let _ = backoff.next();
                hint.min(self.max_retry_after)
            }
        };
        if attempt >= self.max_attempts {
            return Err(Stop::Exhausted);
        }
        if let Some(deadline) = deadline
            && self
                .clock
                .now()
                .checked_add(delay)
                .is_none_or(|next| next >= deadline)
        {
            return Err(Stop::Deadline);
        }
        if let Some(budget) = &self.budget
            && !budget.try_withdraw()
        {
            return Err(Stop::Budget);
        }
        Ok(delay)
    }

    /// One attempt, under the per-attempt timeout shrunk to the deadline.
    async fn attempt<T, E, F, Fut>(
        &self,
        op: &mut F,
        deadline: Option<Instant>,
    ) -> Result<T, AttemptError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let clock = &*self.clock;
        let left = deadline.map(|d| d.saturating_duration_since(clock.now()));
        let limit = match (self.attempt_timeout, left) {
            (Some(t), Some(l)) => Some(t.min(l)),
            (t, l) => t.or(l),
        };
        match limit {
            Some(limit) => match timeout_on(clock, limit, op()).await {
                Ok(result) => result.map_err(AttemptError::Inner),
                Err(elapsed) => Err(AttemptError::TimedOut(elapsed)),
            },
            None => op().await.map_err(AttemptError::Inner),
        }
    }
}

enum Stop {
    Permanent,
    Exhausted,
    Deadline,
    Budget,
}

impl<C, H> fmt::Debug for Retry<C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("max_attempts", &self.max_attempts)
            .field("max_elapsed", &self.max_elapsed)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("backoff", &self.backoff)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

const BUDGET_SLOTS: usize = 10;

/// A retry budget shared by many calls: retries may be at most
/// `min_per_sec × ttl + ratio × calls` within the last `ttl`.
///
/// Every call made through a [`Retry`] with this budget deposits one;
/// every retry withdraws one. When the budget is spent, calls fail with
/// [`RetryError::Budget`] instead of retrying, so an outage costs the
/// server at most `1 + ratio` times the normal load, plus the floor.
///
/// # Default
///
/// tower's figures: `ttl` 10 s, floor 10 retries per second, ratio 0.2.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use smolkit::resilience::RetryBudget;
///
/// let budget = Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap());
/// for _ in 0..4 { budget.deposit(); }
/// assert!(budget.try_withdraw());
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw(), "half of 4 calls");
/// ```
pub struct RetryBudget {
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
    clock: SharedClock,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    /// (calls, retries) per slot of `ttl / BUDGET_SLOTS`.
    slots: [(u64, u64); BUDGET_SLOTS],
    /// Index of the slot `slot_start` belongs to.
    current: usize,
    slot_start: Instant,
}

impl RetryBudget {
    /// A budget over a window of `ttl`, with a floor of `min_per_sec`
    /// retries per second and `ratio` retries per call on top.
    ///
    /// # Errors
    ///
    /// [`ConfigError`](crate::ConfigError) if `ttl` is zero or
    /// `ratio` is not in `[0, 1000]`.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f64) -> Result<Self, crate::ConfigError> {
        Self::with_clock(ttl, min_per_sec, ratio, Arc::new(SystemClock))
    }

    /// [`new`](RetryBudget::new) on `clock`.
    ///
    /// # Errors
    ///
    /// As [`new`](RetryBudget::new).
    pub fn with_clock(
        ttl: Duration,
        min_per_sec: u32,
        ratio: f64,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, crate::ConfigError> {
        if ttl.is_zero() {
            return Err(crate::ConfigError::zero("ttl"));
        }
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(crate::ConfigError::new(
                "ratio",
                ratio,
                "must be in [0, 1000]",
            ));
        }
        let now = clock.now();
        Ok(RetryBudget {
            ttl,
            min_per_sec,
            ratio,
            clock,
            state: Mutex::new(BudgetState {
                slots: [(0, 0); BUDGET_SLOTS],
                current: 0,
                slot_start: now,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.ttl / BUDGET_SLOTS as u32;
        let now = self.clock.now();
        let passed = now.saturating_duration_since(st.slot_start);
        if passed >= slot {
            let steps =
                (passed.as_nanos() / slot.as_nanos().max(1)).min(BUDGET_SLOTS as u128) as usize;
            for _ in 0..steps {
                st.current = (st.current + 1) % BUDGET_SLOTS;
                let current = st.current;
                st.slots[current] = (0, 0);
            }
            st.slot_start = now;
        }
        st
    }

    /// Records a call (a first attempt).
    pub fn deposit(&self) {
        let mut st = self.state();
        let current = st.current;
        st.slots[current].0 += 1;
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_withdraw(&self) -> bool {
        let mut st = self.state();
        let (calls, retries) = st
            .slots
            .iter()
            .fold((0u64, 0u64), |(c, r), s| (c + s.0, r + s.1));
        let allowed =
            f64::from(self.min_per_sec) * self.ttl.as_secs_f64() + self.ratio * calls as f64;
        if (retries as f64) < allowed.floor() {
            let current = st.current;
            st.slots[current].1 += 1;
            true
        } else {
            false
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(Duration::from_secs(10), 10, 0.2).expect("the default budget is valid")
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.ttl)
            .field("min_per_sec", &self.min_per_sec)
            .field("ratio", &self.ratio)
            .finish()
    }
}

/// The result of a run stopped by `kind` after `attempts` attempts: the
/// last outcome when it is `Ok`, else the error naming the limit.
fn stop_with<T, E>(
    kind: Stop,
    outcome: Result<T, AttemptError<E>>,
    attempts: u32,
    elapsed: impl FnOnce() -> Duration,
) -> Result<T, RetryError<E>> {
    let error = match outcome {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    Err(match kind {
        Stop::Permanent => match error {
            AttemptError::Inner(error) => RetryError::Permanent { error, attempts },
            timed_out => RetryError::Exhausted {
                error: timed_out,
                attempts,
            },
        },
        Stop::Exhausted => RetryError::Exhausted { error, attempts },
        Stop::Deadline => RetryError::Deadline {
            error,
            attempts,
            elapsed: elapsed(),
        },
        Stop::Budget => RetryError::Budget { error, attempts },
    })
}
