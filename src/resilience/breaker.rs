//! `CircuitBreaker`: closed → open → half-open, on count- or time-based
//! windows, with slow-call detection and bounded half-open probing.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backoff::Backoff;
use super::error::{BreakerError, Rejected};
use super::timeout::SharedClock;
use crate::ConfigError;
use crate::runtime::{Clock, SystemClock};

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Calls flow; outcomes are recorded in the window.
    Closed,
    /// Calls are rejected until the open duration has passed.
    Open,
    /// A bounded number of probe calls test the service.
    HalfOpen,
    /// Opened by hand ([`CircuitBreaker::isolate`]) until
    /// [`reset`](CircuitBreaker::reset).
    Isolated,
}

/// A state transition, as sent to [`subscribe`](CircuitBreaker::subscribe)rs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StateChange {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// When, on the breaker's clock.
    pub at: Instant,
}

/// The most slices a [`Window::Time`] may have (they are allocated up front).
pub const MAX_BUCKETS: u32 = 10_000;

/// The sliding window the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Window {
    /// The last `n` calls.
    Count(usize),
    /// The calls of the last `size`, in `buckets` slices (the oldest slice
    /// drops out whole).
    Time {
        /// How far back the window reaches.
        size: Duration,
        /// Slices per window, 1 to [`MAX_BUCKETS`].
        buckets: u32,
    },
}

/// How a call ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallOutcome {
    /// Success (may still be slow).
    Success,
    /// Failure.
    Failure,
    /// Says nothing about the service's health; not recorded.
    Ignore,
}

/// Configures a [`CircuitBreaker`].
///
/// # Default
///
/// - window: the last 100 calls; at least 20 calls before it judges
/// - failure rate threshold: 50%
/// - slow calls: off; when a duration threshold is set, the slow-call rate
///   threshold is 100% unless changed
/// - half-open: at most 3 concurrent probes, 3 successes to close
/// - open duration: 5 s, doubling on each trip in a row, capped at 2 min
/// - system clock
#[derive(Debug, Clone)]
pub struct BreakerBuilder {
    window: Window,
    min_calls: usize,
    failure_rate: f64,
    slow_call: Option<Duration>,
    slow_rate: f64,
    probes: usize,
    successes: usize,
    open: Option<Backoff>,
    clock: SharedClock,
    name: Option<String>,
}

impl BreakerBuilder {
    /// The window rates are computed over.
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = window;
        self
    }

    /// Calls the window must hold before the breaker can trip.
    pub fn with_min_calls(mut self, n: usize) -> Self {
        self.min_calls = n;
        self
    }

    /// The failure rate (0 to 1) at or above which the breaker trips.
    pub fn with_failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }

    /// A call lasting at least `threshold` is slow; at `rate` (0 to 1) or
    /// more slow calls the breaker trips.
    pub fn with_slow_calls(mut self, threshold: Duration, rate: f64) -> Self {
        self.slow_call = Some(threshold);
        self.slow_rate = rate;
        self
    }

    /// Half-open: at most `probes` calls at once, and `successes` of them
    /// to close (a failure reopens).
    pub fn with_half_open(mut self, probes: usize, successes: usize) -> Self {
        self.probes = probes;
        self.successes = successes;
        self
    }

    /// The open duration of each trip in a row, from `backoff` (it starts
    /// over once the breaker closes).
    pub fn with_open_backoff(mut self, backoff: impl Into<Backoff>) -> Self {
        let backoff = backoff.into();
        self.open = Some(backoff);
        self
    }

    /// The clock for open durations, time windows and call timing.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// A name for `tracing` events.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Checks the configuration and builds the breaker.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the setting: a zero window size, bucket
    /// count, minimum, probe or success count, or a rate outside `(0, 1]`.
    pub fn build(self) -> Result<CircuitBreaker, ConfigError> {
        let rate_ok = |r: f64| r > 0.0 && r <= 1.0;
        if !rate_ok(self.failure_rate) {
            return Err(ConfigError::new(
                "failure_rate",
                self.failure_rate,
                "must be in (0, 1]",
            ));
        }
        if !rate_ok(self.slow_rate) {
            return Err(ConfigError::new(
                "slow_rate",
                self.slow_rate,
                "must be in (0, 1]",
            ));
        }
        match self.window {
            Window::Count(0) => return Err(ConfigError::zero("window count")),
            Window::Time { size, .. } if size.is_zero() => {
                return Err(ConfigError::zero("window size"));
            }
            Window::Time { buckets: 0, .. } => return Err(ConfigError::zero("window buckets")),
            // NOTE: the slices are allocated up front.
            Window::Time { buckets, .. } if buckets > MAX_BUCKETS => {
                return Err(ConfigError::new(
                    "window buckets",
                    buckets,
                    format!("at most {MAX_BUCKETS} slices"),
                ));
            }
            _ => {}
        }
        if self.min_calls == 0 {
            return Err(ConfigError::zero("min_calls"));
        }
        if self.probes == 0 {
            return Err(ConfigError::zero("half-open probes"));
        }
        if self.successes == 0 {
            return Err(ConfigError::zero("half-open successes"));
        }
        let open = match self.open.clone() {
            Some(b) => b,
            None => Backoff::exponential(Duration::from_secs(5))
                .with_max_delay(Duration::from_secs(120))
                .build(),
        };
        let now = self.clock.now();
        let window = WindowState::new(self.window, now);
        Ok(CircuitBreaker {
            inner: Arc::new(Inner {
                core: Mutex::new(Core {
                    state: State::Closed,
                    generation: 0,
                    window,
                    open_until: now,
                    open: open.clone(),
                    probes_in_flight: 0,
                    probe_successes: 0,
                    rejected: 0,
                    subscribers: Vec::new(),
                }),
                config: self,
            }),
        })
    }
}

/// Counts for one bucket (or the whole count window).
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    calls: u64,
    failures: u64,
    slow: u64,
}

impl Counts {
    fn add(&mut self, failure: bool, slow: bool) {
        self.calls += 1;
        self.failures += u64::from(failure);
        self.slow += u64::from(slow);
    }
}

enum WindowState {
    Count {
        size: usize,
        /// (failure, slow) of the last `size` calls.
        ring: VecDeque<(bool, bool)>,
        totals: Counts,
    },
    Time {
        bucket_len: Duration,
        buckets: Vec<Counts>,
        current: usize,
        bucket_start: Instant,
    },
}

impl WindowState {
    fn new(window: Window, now: Instant) -> Self {
        match window {
            Window::Count(size) => WindowState::Count {
                size,
                ring: VecDeque::with_capacity(size.min(4096)),
                totals: Counts::default(),
            },
            Window::Time { size, buckets } => WindowState::Time {
                bucket_len: (size / buckets).max(Duration::from_nanos(1)),
                buckets: vec![Counts::default(); buckets as usize],
                current: 0,
                bucket_start: now,
            },
        }
    }

    fn rotate(&mut self, now: Instant) {
        if let WindowState::Time {
            bucket_len,
            buckets,
            current,
            bucket_start,
        } = self
        {
            let passed = now.saturating_duration_since(*bucket_start);
            let steps = passed.as_nanos() / bucket_len.as_nanos();
            if steps > 0 {
                let n = buckets.len();
                for _ in 0..steps.min(n as u128) {
                    *current = (*current + 1) % n;
                    buckets[*current] = Counts::default();
                }
                // Keep bucket edges on the grid.
                let advance = bucket_len.saturating_mul(u32::try_from(steps).unwrap_or(u32::MAX));
                *bucket_start = bucket_start.checked_add(advance).unwrap_or(now).min(now);
            }
        }
    }

    fn record(&mut self, now: Instant, failure: bool, slow: bool) {
        self.rotate(now);
        match self {
            WindowState::Count { size, ring, totals } => {
                if ring.len() == *size
                    && let Some((f, s)) = ring.pop_front()
                {
                    totals.calls -= 1;
                    totals.failures -= u64::from(f);
                    totals.slow -= u64::from(s);
                }
                ring.push_back((failure, slow));
                totals.add(failure, slow);
            }
            WindowState::Time {
                buckets, current, ..
            } => buckets[*current].add(failure, slow),
        }
    }

    fn totals(&mut self, now: Instant) -> Counts {
        self.rotate(now);
        match self {
            WindowState::Count { totals, .. } => *totals,
            WindowState::Time { buckets, .. } => {
                buckets.iter().fold(Counts::default(), |mut a, b| {
                    a.calls += b.calls;
                    a.failures += b.failures;
                    a.slow += b.slow;
                    a
                })
            }
        }
    }

    fn clear(&mut self, now: Instant) {
        match self {
            WindowState::Count { ring, totals, .. } => {
                ring.clear();
                *totals = Counts::default();
            }
            WindowState::Time {
                buckets,
                current,
                bucket_start,
                ..
            } => {
                buckets.iter_mut().for_each(|b| *b = Counts::default());
                *current = 0;
                *bucket_start = now;
            }
        }
    }
}

struct Core {
    state: State,
    /// Bumped on every transition: a permit from another generation does
    /// not count.
    generation: u64,
    window: WindowState,
    open_until: Instant,
    open: Backoff,
    probes_in_flight: usize,
    probe_successes: usize,
    rejected: u64,
    subscribers: Vec<async_channel::Sender<StateChange>>,
}

struct Inner {
    core: Mutex<Core>,
    config: BreakerBuilder,
}

/// A snapshot of a breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BreakerMetrics {
    /// The state now.
    pub state: State,
    /// Calls in the window.
    pub calls: u64,
    /// Failures in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// Calls rejected since the breaker was built.
    pub rejected: u64,
}

/// Events a subscriber can fall behind by before further ones are dropped
/// for it (with a `tracing` warning).
const SUBSCRIBER_BUFFER: usize = 64;

/// A circuit breaker: stops calling a failing service, then probes it.
///
/// - **Closed**: calls flow and their outcomes go into a sliding window
///   ([`Window::Count`] or [`Window::Time`]). Once the window holds at least
///   `min_calls`, a failure rate or slow-call rate at or above its
///   threshold trips the breaker.
/// - **Open**: calls are rejected at once with [`Rejected::retry_after`].
///   The open duration comes from a [`Backoff`], so repeated trips wait
///   longer; it starts over once the breaker closes.
/// - **Half-open**: at most N probe calls at once are let through; M
///   successes close the breaker, a failure reopens it. Others are
///   rejected meanwhile.
/// - [`isolate`](CircuitBreaker::isolate) holds it open by hand,
///   [`reset`](CircuitBreaker::reset) closes it.
///
/// Every transition is logged through `tracing` and sent to
/// [`subscribe`](CircuitBreaker::subscribe)rs. A breaker is an `Arc`
/// inside: clones share one state.
///
/// # Examples
///
/// ```
/// use smolkit::resilience::{CircuitBreaker, State, Window};
///
/// let breaker = CircuitBreaker::builder()
///     .with_window(Window::Count(4))
///     .with_min_calls(4)
///     .build()
///     .unwrap();
/// smol::block_on(async {
///     for _ in 0..4 {
///         let _ = breaker.call(|| async { Err::<(), _>("down") }).await;
///     }
///     assert_eq!(breaker.state(), State::Open);
///     let rejected = breaker.call(|| async { Ok::<_, &str>(()) }).await;
///     assert!(rejected.is_err());
/// });
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

impl CircuitBreaker {
    /// A builder with the defaults listed under [`BreakerBuilder`].
    pub fn builder() -> BreakerBuilder {
        BreakerBuilder {
            window: Window::Count(100),
            min_calls: 20,
            failure_rate: 0.5,
            slow_call: None,
            slow_rate: 1.0,
            probes: 3,
            successes: 3,
            open: None,
            clock: Arc::new(SystemClock),
            name: None,
        }
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.inner.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Instant {
        self.inner.config.clock.now()
    }

    /// The state now (an open breaker whose time is up reports `HalfOpen`).
    pub fn state(&self) -> State {
        let now = self.now();
        let mut core = self.core();
        self.refresh(&mut core, now);
        core.state
    }

    /// A snapshot of the state and the window.
    pub fn metrics(&self) -> BreakerMetrics {
        let now = self.now();
        let mut core = self.core();
        self.refresh(&mut core, now);
        let totals = core.window.totals(now);
        BreakerMetrics {
            state: core.state,
            calls: totals.calls,
            failures: totals.failures,
            slow_calls: totals.slow,
            rejected: core.rejected,
        }
    }

    /// Asks to make a call. The [`Permit`] times it; report how it went with
    /// [`Permit::record`] (dropping the permit ignores the call).
    ///
    /// # Errors
    ///
    /// [`Rejected`] while open, isolated, or half-open with every probe
    /// slot taken.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let now = self.now();
        let mut core = self.core();
        self.refresh(&mut core, now);
        let probe = match core.state {
            State::Closed => false,
            State::HalfOpen if core.probes_in_flight < self.inner.config.probes => {
                core.probes_in_flight += 1;
                true
            }
            State::HalfOpen => {
                core.rejected += 1;
                return Err(Rejected {
                    retry_after: Duration::ZERO,
                    isolated: false,
                });
            }
            State::Open => {
                core.rejected += 1;
                return Err(Rejected {
                    retry_after: core.open_until.saturating_duration_since(now),
                    isolated: false,
                });
            }
            State::Isolated => {
                core.rejected += 1;
                return Err(Rejected {
                    retry_after: Duration::ZERO,
                    isolated: true,
                });
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            started: now,
            generation: core.generation,
            probe,
            done: false,
        })
    }

    /// Runs `f` through the breaker; an `Err` counts as a failure.
    ///
    /// # Errors
    ///
    /// [`BreakerError::Rejected`] without running `f`, or
    /// [`BreakerError::Inner`] with `f`'s error.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while `f` runs ignores the call (a probe slot is
    /// given back).
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire().map_err(BreakerError::Rejected)?;
        let result = f().await;
        permit.record(if result.is_ok() {
            CallOutcome::Success
        } else {
            CallOutcome::Failure
        });
        result.map_err(BreakerError::Inner)
    }

    /// Holds the breaker open until [`reset`](CircuitBreaker::reset).
    pub fn isolate(&self) {
        let now = self.now();
        let mut core = self.core();
        self.transition(&mut core, State::Isolated, now);
    }

    /// Closes the breaker and clears its window and open backoff.
    pub fn reset(&self) {
        let now = self.now();
        let mut core = self.core();
        core.window.clear(now);
        core.open.reset();
        self.transition(&mut core, State::Closed, now);
    }

    /// A stream of state changes from now on. A subscriber that falls
    /// more than 64 events behind misses the later ones (logged).
    pub fn subscribe(&self) -> async_channel::Receiver<StateChange> {
        let (tx, rx) = async_channel::bounded(SUBSCRIBER_BUFFER);
        self.core().subscribers.push(tx);
        rx
    }

    /// Open → half-open once the open time is up.
    fn refresh(&self, core: &mut Core, now: Instant) {
        if core.state == State::Open && now >= core.open_until {
            self.transition(core, State::HalfOpen, now);
        }
    }

    fn transition(&self, core: &mut Core, to: State, now: Instant) {
        let from = core.state;
        core.state = to;
        core.generation += 1;
        core.probes_in_flight = 0;
        core.probe_successes = 0;
        if to == State::Open {
            let wait = core.open.next().unwrap_or(Duration::from_secs(60));
            // NOTE: a wait too long to represent is "forever", not zero.
            core.open_until = crate::runtime::saturating_add(now, wait);
        }
        if to == State::Closed {
            core.window.clear(now);
            core.open.reset();
        }
        let name = self.inner.config.name.as_deref().unwrap_or("");
        tracing::info!(breaker = name, from = ?from, to = ?to, "circuit breaker state change");
        let change = StateChange { from, to, at: now };
        core.subscribers.retain(|tx| match tx.try_send(change) {
            Ok(()) => true,
            Err(async_channel::TrySendError::Full(_)) => {
                tracing::warn!(
                    breaker = name,
                    "a breaker subscriber fell behind; event dropped"
                );
                true
            }
            Err(async_channel::TrySendError::Closed(_)) => false,
        });
    }

    fn record(&self, permit: &Permit, outcome: CallOutcome) {
        let now = self.now();
        let cfg = &self.inner.config;
        let mut core = self.core();
        if permit.generation != core.generation {
            return; // issued before a transition: says nothing about now
        }
        if permit.probe {
            core.probes_in_flight = core.probes_in_flight.saturating_sub(1);
        }
        let failure = match outcome {
            CallOutcome::Ignore => return,
            CallOutcome::Failure => true,
            CallOutcome::Success => false,
        };
        let slow = cfg
            .slow_call
            .is_some_and(|t| now.saturating_duration_since(permit.started) >= t);
        match core.state {
            State::Closed => {
                core.window.record(now, failure, slow);
                let t = core.window.totals(now);
                if t.calls >= cfg.min_calls as u64 {
                    let calls = t.calls as f64;
                    let failing = t.failures as f64 / calls >= cfg.failure_rate;
                    let slowing = cfg.slow_call.is_some() && t.slow as f64 / calls >= cfg.slow_rate;
                    if failing || slowing {
                        self.transition(&mut core, State::Open, now);
                    }
                }
            }
            State::HalfOpen => {
                if failure || slow {
                    self.transition(&mut core, State::Open, now);
                } else {
                    core.probe_successes += 1;
                    if core.probe_successes >= cfg.successes {
                        self.transition(&mut core, State::Closed, now);
                    }
                }
            }
            State::Open | State::Isolated => {}
        }
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CircuitBreaker");
        d.field("name", &self.inner.config.name);
        if let Ok(core) = self.inner.core.try_lock() {
            d.field("state", &core.state);
        }
        d.finish_non_exhaustive()
    }
}

/// Leave to make one call through a [`CircuitBreaker`]; report its outcome
/// with [`record`](Permit::record). Dropped unrecorded, the call is ignored.
#[must_use = "record the call's outcome, or it is ignored"]
pub struct Permit {
    breaker: CircuitBreaker,
    started: Instant,
    generation: u64,
    probe: bool,
    done: bool,
}

impl Permit {
    /// Records how the call ended (its duration is measured from the
    /// permit's issue, for slow-call detection).
    pub fn record(mut self, outcome: CallOutcome) {
        self.done = true;
        self.breaker.record(&self, outcome);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self, CallOutcome::Ignore);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("probe", &self.probe)
            .field("generation", &self.generation)
            .finish()
    }
}
