//! `AdaptiveLimit`: a concurrency limit that follows the system it
//! protects.
//!
//! Every finished call reports a [`Sample`] (latency, outcome, optionally
//! bytes moved, and how many calls were in flight). An [`Algorithm`] turns
//! samples into a new limit between `min` and `max`, and the limit resizes
//! a [`Semaphore`] in place (exactly, under load: see
//! [`Semaphore::set_permits`]).
//!
//! - [`Aimd`]: additive increase while calls succeed and use the limit;
//!   multiplicative decrease on a dropped call, a latency above a threshold,
//!   or a throughput below a floor (the seeds' "below 100 KB/s, lower the
//!   concurrency").
//! - [`Gradient`]: the idea of Netflix concurrency-limits' gradient
//!   algorithms. It compares a smoothed recent latency with the best
//!   latency seen lately (the no-queue baseline); when latency grows past
//!   the baseline times a tolerance, the limit shrinks in proportion, and
//!   otherwise it grows by a small queue allowance. On a server whose
//!   latency rises past a knee, it settles just above the knee.
//!
//! Decreases observe a cool-down: after one, further decreases wait until
//! the cool-down has passed on the clock, so the calls that were already in
//! flight at the old limit do not drive the limit down a second time.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::AcquireError;
use super::semaphore::{Semaphore, SemaphoreGuardArc};
use crate::ConfigError;
use crate::runtime::{Clock, SystemClock};
// NOTE: loom's mutex under `--cfg smolkit_loom`, so the model checks the
// state lock against the semaphore resize (tests/loom.rs).
use crate::sync::{self, Mutex};

/// How a call ended, for the limit's purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The call succeeded; its latency counts.
    Success,
    /// The call was dropped, rejected or timed out: a sign of overload.
    Dropped,
    /// The call failed for a reason that says nothing about load (a 404, a
    /// validation error); the sample is ignored.
    Ignore,
}

/// One finished call.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Sample {
    /// How long the call took.
    pub latency: Duration,
    /// How it ended.
    pub outcome: Outcome,
    /// Calls in flight when it started (itself included).
    pub in_flight: usize,
    /// Bytes it moved, if throughput matters.
    pub bytes: Option<u64>,
}

impl Sample {
    /// A sample with no byte count.
    pub fn new(latency: Duration, outcome: Outcome, in_flight: usize) -> Self {
        Sample {
            latency,
            outcome,
            in_flight,
            bytes: None,
        }
    }

    /// Adds the bytes moved.
    pub fn with_bytes(mut self, bytes: u64) -> Self {
        self.bytes = Some(bytes);
        self
    }

    fn throughput(&self) -> Option<f64> {
        let secs = self.latency.as_secs_f64();
        self.bytes.filter(|_| secs > 0.0).map(|b| b as f64 / secs)
    }
}

/// Additive increase, multiplicative decrease.
///
/// # Default
///
/// - increase: +1 per successful sample that used at least half the limit
/// - backoff: × 0.9 on a decrease
/// - latency threshold: none (only drops decrease)
/// - throughput floor: none
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    increase: usize,
    backoff: f64,
    latency_threshold: Option<Duration>,
    min_throughput: Option<f64>,
}

impl Aimd {
    /// The defaults listed under [`Aimd`].
    pub const fn new() -> Self {
        Aimd {
            increase: 1,
            backoff: 0.9,
            latency_threshold: None,
            min_throughput: None,
        }
    }

    /// Added to the limit per successful sample.
    pub fn with_increase(mut self, n: usize) -> Self {
        self.increase = n;
        self
    }

    /// The limit is multiplied by `ratio` on a decrease.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] unless `0.0 < ratio < 1.0`.
    pub fn with_backoff(mut self, ratio: f64) -> Result<Self, ConfigError> {
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(ConfigError::new("backoff", ratio, "must be in (0, 1)"));
        }
        self.backoff = ratio;
        Ok(self)
    }

    /// A successful call slower than this counts as a sign of overload.
    pub fn with_latency_threshold(mut self, threshold: Duration) -> Self {
        self.latency_threshold = Some(threshold);
        self
    }

    /// A call moving fewer bytes per second than this counts as a sign of
    /// overload (the seeds' 100 KB/s rule: `with_min_throughput(100_000.0)`).
    pub fn with_min_throughput(mut self, bytes_per_sec: f64) -> Self {
        self.min_throughput = Some(bytes_per_sec);
        self
    }

    fn update(&self, limit: f64, s: &Sample) -> Decision {
        let overloaded = s.outcome == Outcome::Dropped
            || self.latency_threshold.is_some_and(|t| s.latency > t)
            || matches!((self.min_throughput, s.throughput()), (Some(min), Some(tp)) if tp < min);
        if overloaded {
            Decision::Decrease(limit * self.backoff)
        } else if s.in_flight * 2 >= limit as usize {
            Decision::Increase(limit + self.increase as f64)
        } else {
            Decision::Keep
        }
    }
}

impl Default for Aimd {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency-gradient limit, after Netflix concurrency-limits.
///
/// Keeps `short`, an exponential moving average of recent latencies, and
/// `baseline`, the lowest `short` seen over the last one to two
/// `baseline_window`s of clock time (two buckets). Then
/// `gradient = clamp(tolerance × baseline / short, 0.5, 1.0)`,
/// `target = limit × gradient + queue`, and the limit moves a `smoothing`
/// fraction of the way to `target`. Below the knee `gradient` is 1 and the
/// limit grows by the queue allowance; past it the limit settles where
/// `limit ≈ tolerance × knee + queue`.
///
/// A permanent slowdown of the service is followed within two windows, as
/// the old minimum ages out. The price: under saturation that lasts longer
/// than that, with no call ever seeing the unloaded latency, the baseline
/// rises to the loaded latency and the limit creeps up by the queue
/// allowance per window. (Netflix's Vegas limit probes for this by
/// dropping the limit now and then; that is not done here.)
///
/// # Default
///
/// - tolerance: 1.0 (raise it if latency is noisy)
/// - queue allowance: 4 (Netflix's default)
/// - smoothing: 0.2
/// - short average: over about 5 samples (α = 1/3)
/// - baseline window: 60 s
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gradient {
    tolerance: f64,
    queue: f64,
    smoothing: f64,
    short_alpha: f64,
    baseline_window: Duration,
}

impl Gradient {
    /// The defaults listed under [`Gradient`].
    pub const fn new() -> Self {
        Gradient {
            tolerance: 1.0,
            queue: 4.0,
            smoothing: 0.2,
            short_alpha: 1.0 / 3.0,
            baseline_window: Duration::from_secs(60),
        }
    }

    /// How long a best latency stays the baseline (one to two windows).
    pub fn with_baseline_window(mut self, window: Duration) -> Self {
        self.baseline_window = window;
        self
    }

    /// How much latency above the baseline is tolerated before shrinking.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] unless `1.0 <= tolerance <= 10.0`.
    pub fn with_tolerance(mut self, tolerance: f64) -> Result<Self, ConfigError> {
        if !(1.0..=10.0).contains(&tolerance) {
            return Err(ConfigError::new(
                "tolerance",
                tolerance,
                "must be in [1, 10]",
            ));
        }
        self.tolerance = tolerance;
        Ok(self)
    }

    /// The queue allowance added to the target.
    pub fn with_queue(mut self, queue: usize) -> Self {
        self.queue = queue as f64;
        self
    }

    /// The fraction of the way to the target the limit moves per sample.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] unless `0.0 < smoothing <= 1.0`.
    pub fn with_smoothing(mut self, smoothing: f64) -> Result<Self, ConfigError> {
        if !(smoothing > 0.0 && smoothing <= 1.0) {
            return Err(ConfigError::new(
                "smoothing",
                smoothing,
                "must be in (0, 1]",
            ));
        }
        self.smoothing = smoothing;
        Ok(self)
    }
}

impl Default for Gradient {
    fn default() -> Self {
        Self::new()
    }
}

/// The algorithm an [`AdaptiveLimit`] follows.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Algorithm {
    /// Additive increase, multiplicative decrease.
    Aimd(Aimd),
    /// Latency gradient.
    Gradient(Gradient),
}

impl From<Aimd> for Algorithm {
    fn from(a: Aimd) -> Self {
        Algorithm::Aimd(a)
    }
}

impl From<Gradient> for Algorithm {
    fn from(g: Gradient) -> Self {
        Algorithm::Gradient(g)
    }
}

enum Decision {
    Keep,
    Increase(f64),
    Decrease(f64),
}

/// The mutable part of an adaptive limit.
struct State {
    limit: f64,
    last_decrease: Option<Instant>,
    // Gradient state.
    short: Option<f64>,
    /// Minimum of `short` in the current and the previous bucket.
    cur_min: f64,
    prev_min: f64,
    bucket_start: Option<Instant>,
    samples: u64,
}

/// A snapshot of an [`AdaptiveLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdaptiveStats {
    /// The current limit (the semaphore's capacity).
    pub limit: usize,
    /// Calls holding a permit now.
    pub in_flight: usize,
    /// Samples taken into account so far.
    pub samples: u64,
}

/// A concurrency limit resized from observed latency, drops and throughput.
///
/// Acquire a [`Token`] per call; finish it with
/// [`success`](Token::success), [`dropped`](Token::dropped) or
/// [`ignore`](Token::ignore) (dropping it is `ignore`). The token times the
/// call on the limit's clock. Or feed samples yourself with
/// [`record`](AdaptiveLimit::record).
///
/// # Default
///
/// The system clock; a 1 s cool-down between decreases (set with
/// [`with_cooldown`](AdaptiveLimit::with_cooldown)); the algorithm's own
/// defaults ([`Aimd`], [`Gradient`]).
///
/// # Examples
///
/// ```
/// use smolkit::limit::{AdaptiveLimit, Aimd};
///
/// let limit = AdaptiveLimit::new(4, 1, 64, Aimd::new()).unwrap();
/// smol::block_on(async {
///     let token = limit.acquire().await.unwrap();
///     // ... make the call ...
///     token.dropped(); // overloaded: the limit backs off
/// });
/// assert_eq!(limit.limit(), 3); // floor(4 × 0.9)
/// ```
pub struct AdaptiveLimit {
    sem: Arc<Semaphore>,
    state: Mutex<State>,
    algorithm: Algorithm,
    min: usize,
    max: usize,
    cooldown: Duration,
    clock: Arc<dyn Clock>,
}

impl AdaptiveLimit {
    /// A limit starting at `initial`, kept within `[min, max]`, on the
    /// system clock, with a 1 s decrease cool-down.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if `min` is zero; [`ConfigError`]
    /// if `min > max`. `initial` is clamped into `[min, max]`.
    pub fn new(
        initial: usize,
        min: usize,
        max: usize,
        algorithm: impl Into<Algorithm>,
    ) -> Result<Self, ConfigError> {
        if min == 0 {
            return Err(ConfigError::zero("min"));
        }
        if min > max {
            return Err(ConfigError::min_above_max("min/max", min, max));
        }
        let initial = initial.clamp(min, max);
        Ok(AdaptiveLimit {
            sem: Arc::new(Semaphore::new(initial)),
            state: Mutex::new(State {
                limit: initial as f64,
                last_decrease: None,
                short: None,
                cur_min: f64::INFINITY,
                prev_min: f64::INFINITY,
                bucket_start: None,
                samples: 0,
            }),
            algorithm: algorithm.into(),
            min,
            max,
            cooldown: Duration::from_secs(1),
            clock: Arc::new(SystemClock),
        })
    }

    /// Uses `clock` for timing tokens and the cool-down.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// After a decrease, further decreases wait this long.
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// The semaphore this limit resizes.
    pub fn semaphore(&self) -> &Arc<Semaphore> {
        &self.sem
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.sem.capacity()
    }

    /// A snapshot.
    pub fn stats(&self) -> AdaptiveStats {
        let samples = self.state.try_lock().map(|s| s.samples).unwrap_or_default();
        AdaptiveStats {
            limit: self.limit(),
            in_flight: self.sem.in_use(),
            samples,
        }
    }

    /// Waits for a permit and starts timing a call.
    ///
    /// # Errors
    ///
    /// [`AcquireError::Closed`] if the semaphore was closed.
    ///
    /// # Cancel safety
    ///
    /// As [`Semaphore::acquire`].
    pub async fn acquire(&self) -> Result<Token<'_>, AcquireError> {
        let guard = self.sem.acquire_arc().await?;
        Ok(Token {
            limit: self,
            started: self.clock.now(),
            in_flight: self.sem.in_use(),
            guard: Some(guard),
        })
    }

    /// Takes a sample into account and resizes the semaphore if the limit
    /// changed. Returns the new limit.
    pub fn record(&self, sample: Sample) -> usize {
        if sample.outcome == Outcome::Ignore {
            return self.limit();
        }
        let now = self.clock.now();
        let mut st = sync::lock(&self.state);
        st.samples += 1;
        let decision = match &self.algorithm {
            Algorithm::Aimd(a) => a.update(st.limit, &sample),
            Algorithm::Gradient(g) => gradient_update(g, &mut st, &sample, now),
        };
        let next = match decision {
            Decision::Keep => st.limit,
            Decision::Increase(to) => to,
            Decision::Decrease(to) => {
                let cooling = st
                    .last_decrease
                    .is_some_and(|t| now.saturating_duration_since(t) < self.cooldown);
                if cooling {
                    st.limit
                } else {
                    st.last_decrease = Some(now);
                    to
                }
            }
        };
        st.limit = next.clamp(self.min as f64, self.max as f64);
        let new = st.limit as usize;
        // NOTE: resized before the state lock is released, so racing
        // records resize in the order they decided (the semaphore ends at
        // the algorithm's limit). Nothing locks the state from inside the
        // semaphore, so the lock order cannot invert.
        if new != self.sem.capacity() {
            tracing::debug!(
                limit = new,
                latency_ms = sample.latency.as_secs_f64() * 1e3,
                "adaptive limit changed"
            );
            self.sem.set_permits(new);
        }
        drop(st);
        new
    }
}

fn gradient_update(g: &Gradient, st: &mut State, s: &Sample, now: Instant) -> Decision {
    if s.outcome == Outcome::Dropped {
        return Decision::Decrease(st.limit * 0.9);
    }
    let latency = s.latency.as_secs_f64().max(1e-9);
    let short = match st.short {
        None => latency,
        Some(prev) => prev + g.short_alpha * (latency - prev),
    };
    st.short = Some(short);
    let start = *st.bucket_start.get_or_insert(now);
    if now.saturating_duration_since(start) >= g.baseline_window {
        // Age out the older bucket, so a permanent change in the service
        // is followed.
        st.prev_min = st.cur_min;
        st.cur_min = f64::INFINITY;
        st.bucket_start = Some(now);
    }
    st.cur_min = st.cur_min.min(short);
    let baseline = st.cur_min.min(st.prev_min);
    // An application that does not use its limit says nothing about it.
    if (s.in_flight as f64) < st.limit / 2.0 {
        return Decision::Keep;
    }
    let gradient = (g.tolerance * baseline / short).clamp(0.5, 1.0);
    let target = st.limit * gradient + g.queue;
    let next = st.limit + g.smoothing * (target - st.limit);
    if next < st.limit {
        Decision::Decrease(next)
    } else {
        Decision::Increase(next)
    }
}

impl fmt::Debug for AdaptiveLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLimit")
            .field("limit", &self.limit())
            .field("min", &self.min)
            .field("max", &self.max)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

/// One call under an [`AdaptiveLimit`]: holds a permit and times the call.
#[must_use = "a token measures a call; finish it with success() or dropped()"]
pub struct Token<'a> {
    limit: &'a AdaptiveLimit,
    started: Instant,
    in_flight: usize,
    guard: Option<SemaphoreGuardArc>,
}

impl Token<'_> {
    fn finish(mut self, outcome: Outcome, bytes: Option<u64>) -> usize {
        let latency = self
            .limit
            .clock
            .now()
            .saturating_duration_since(self.started);
        // Return the permit before resizing, so a shrink is paid at once.
        drop(self.guard.take());
        let mut sample = Sample::new(latency, outcome, self.in_flight);
        sample.bytes = bytes;
        self.limit.record(sample)
    }

    /// The call succeeded. Returns the new limit.
    pub fn success(self) -> usize {
        self.finish(Outcome::Success, None)
    }

    /// The call succeeded after moving `bytes` (throughput counts).
    pub fn success_with_bytes(self, bytes: u64) -> usize {
        self.finish(Outcome::Success, Some(bytes))
    }

    /// The call was dropped or timed out. Returns the new limit.
    pub fn dropped(self) -> usize {
        self.finish(Outcome::Dropped, None)
    }

    /// The call says nothing about load; no sample is taken.
    pub fn ignore(self) {}
}

impl fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}
