//! GCRA rate limiters: one shared limit, and one limit per key.
//!
//! # GCRA in one paragraph
//!
//! The generic cell rate algorithm keeps a single number, the *theoretical
//! arrival time* (TAT): the instant at which the limiter would be fully
//! rested. Admitting `n` cells pushes it `n × T` forward, where the
//! emission interval `T = period / rate`. A request conforms when the
//! pushed TAT is no more than `burst × T` ahead of now. So a rested limiter
//! admits `burst` cells at once, and then one cell every `T`: over any
//! window `W`, at most `burst + W / T` cells are admitted. The state is one
//! `AtomicU64`, updated with compare-and-swap: no lock, no background task.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::RateLimitError;
use super::semaphore::Semaphore;
use crate::ConfigError;
use crate::runtime::{Clock, SystemClock};
use crate::sync::lock_std as lock;

/// How many cells per period, and how many at once.
///
/// # Default
///
/// The burst is the rate (set with [`with_burst`](Quota::with_burst)).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use smolkit::limit::Quota;
///
/// // 100 requests a minute, at most 10 back to back.
/// let quota = Quota::new(100, Duration::from_secs(60)).unwrap().with_burst(10).unwrap();
/// assert_eq!(quota.emission_interval(), Duration::from_millis(600));
/// assert!(Quota::per_second(0).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    rate: u32,
    period: Duration,
    burst: u32,
}

impl Quota {
    /// `rate` cells per `period`; the burst defaults to `rate`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if `rate` or `period` is zero, or if the burst
    /// window (one emission interval × the burst) is longer than
    /// [`Quota::MAX_WINDOW`].
    pub fn new(rate: u32, period: Duration) -> Result<Self, ConfigError> {
        if rate == 0 {
            return Err(ConfigError::zero("rate"));
        }
        if period.is_zero() {
            return Err(ConfigError::zero("period"));
        }
        let quota = Quota {
            rate,
            period,
            burst: rate,
        };
        quota.check_window("period", period)?;
        Ok(quota)
    }

    /// The longest burst window (emission interval × burst) a quota may
    /// have: about 146 years. Past it the limiter's nanosecond arithmetic
    /// could saturate, and a saturated limit would admit everything.
    pub const MAX_WINDOW: Duration = Duration::from_nanos(u64::MAX / 4);

    fn check_window(
        &self,
        setting: &'static str,
        value: impl fmt::Debug,
    ) -> Result<(), ConfigError> {
        let interval = self.period.as_nanos() / u128::from(self.rate);
        let window = interval.max(1) * u128::from(self.burst);
        if window > Quota::MAX_WINDOW.as_nanos() {
            return Err(ConfigError::new(
                setting,
                value,
                "the burst window (interval × burst) must be at most Quota::MAX_WINDOW (~146 years)",
            ));
        }
        Ok(())
    }

    /// `rate` cells per second.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if `rate` is zero.
    pub fn per_second(rate: u32) -> Result<Self, ConfigError> {
        Quota::new(rate, Duration::from_secs(1))
    }

    /// At most `burst` cells at once (after a rest).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if `burst` is zero, or if the burst window
    /// (emission interval × `burst`) is longer than [`Quota::MAX_WINDOW`].
    pub fn with_burst(mut self, burst: u32) -> Result<Self, ConfigError> {
        if burst == 0 {
            return Err(ConfigError::zero("burst"));
        }
        self.burst = burst;
        self.check_window("burst", burst)?;
        Ok(self)
    }

    /// Cells per period.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Cells at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// `period / rate`: the steady spacing between cells (at least 1 ns).
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns())
    }

    fn interval_ns(&self) -> u64 {
        let ns = self.period.as_nanos() / u128::from(self.rate);
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }
}

/// The quota, and the two numbers the hot path reads from it: emission
/// interval (ns) and burst.
struct Params {
    interval_ns: AtomicU64,
    burst: AtomicU64,
    quota: Mutex<Quota>,
    /// Notified when the quota changes, so a sleeping waiter re-evaluates.
    changed: event_listener::Event,
}

impl Params {
    fn new(quota: Quota) -> Self {
        Params {
            interval_ns: AtomicU64::new(quota.interval_ns()),
            burst: AtomicU64::new(u64::from(quota.burst)),
            quota: Mutex::new(quota),
            changed: event_listener::Event::new(),
        }
    }

    /// Replaces the quota. A check racing this may see the old interval
    /// with the new burst (or the reverse) once; both are valid limits.
    fn set(&self, quota: Quota) {
        let mut q = self.quota.lock().unwrap_or_else(|e| e.into_inner());
        *q = quota;
        self.interval_ns
            .store(quota.interval_ns(), Ordering::Relaxed);
        self.burst.store(u64::from(quota.burst), Ordering::Relaxed);
        drop(q);
        self.changed.notify(usize::MAX);
    }

    /// Sleeps `delay` on `clock`, or less if the quota changes meanwhile
    /// (`changed` was listened to before the check that chose `delay`).
    async fn wait(
        &self,
        clock: &dyn Clock,
        delay: Duration,
        changed: event_listener::EventListener,
    ) {
        use futures_lite::FutureExt;
        clock.sleep(delay).or(changed).await
    }

    fn quota(&self) -> Quota {
        *self.quota.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One GCRA step on `tat` at `now`: the new TAT, or how long to wait.
    #[inline]
    fn step(&self, tat: u64, now: u64, n: u32) -> Result<u64, RateLimitError> {
        let interval = self.interval_ns.load(Ordering::Relaxed);
        let burst = self.burst.load(Ordering::Relaxed);
        if u64::from(n) > burst {
            return Err(RateLimitError::InsufficientCapacity {
                requested: n,
                burst: u32::try_from(burst).unwrap_or(u32::MAX),
            });
        }
        let new_tat = tat
            .max(now)
            .saturating_add(interval.saturating_mul(u64::from(n)));
        let window = interval.saturating_mul(burst);
        let ahead = new_tat - now;
        if ahead > window {
            Err(RateLimitError::NotYet {
                retry_after: Duration::from_nanos(ahead - window),
            })
        } else {
            Ok(new_tat)
        }
    }
}

/// A time origin: instants become nanoseconds since it.
struct Origin {
    clock: Arc<dyn Clock>,
    origin: Instant,
}

impl Origin {
    fn new(clock: Arc<dyn Clock>) -> Self {
        let origin = clock.now();
        Origin { clock, origin }
    }

    #[inline]
    fn now_ns(&self) -> u64 {
        // NOTE: +1 so that a fresh TAT of 0 is always in the past.
        let since = self.clock.now().saturating_duration_since(self.origin);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }
}

/// A GCRA rate limiter: `rate` cells per `period`, `burst` at once.
///
/// - [`check(n)`](RateLimiter::check) never waits: it admits `n` cells or
///   says how long until they would conform.
/// - [`until_ready(n)`](RateLimiter::until_ready) waits, FIFO among waiters:
///   only the first waiter sleeps on the clock; the rest queue behind it on
///   a fair semaphore, so a release never wakes a herd. While anyone waits,
///   `check` does not overtake them.
/// - [`set_quota`](RateLimiter::set_quota) changes the rate in place; cells
///   already admitted stay counted.
/// - Time comes from the injected [`Clock`], so tests run on a manual
///   clock.
///
/// Cheap to share behind an `Arc`.
///
/// # Examples
///
/// ```
/// use smolkit::limit::{Quota, RateLimiter};
///
/// let limiter = RateLimiter::new(Quota::per_second(10).unwrap().with_burst(2).unwrap());
/// assert!(limiter.check(1).is_ok());
/// assert!(limiter.check(1).is_ok());
/// let err = limiter.check(1).unwrap_err();
/// assert!(err.retry_after().unwrap() <= std::time::Duration::from_millis(100));
/// ```
pub struct RateLimiter {
    tat: AtomicU64,
    params: Params,
    time: Origin,
    /// FIFO turnstile for `until_ready`: one waiter sleeps at a time.
    turnstile: Semaphore,
}

impl RateLimiter {
    /// A limiter on the system clock.
    pub fn new(quota: Quota) -> Self {
        Self::with_clock(quota, Arc::new(SystemClock))
    }

    /// A limiter on `clock`.
    pub fn with_clock(quota: Quota, clock: Arc<dyn Clock>) -> Self {
        RateLimiter {
            tat: AtomicU64::new(0),
            params: Params::new(quota),
            time: Origin::new(clock),
            turnstile: Semaphore::new(1),
        }
    }

    /// Admits `n` cells now, or says when they would conform.
    ///
    /// # Errors
    ///
    /// [`RateLimitError::NotYet`] with the wait;
    /// [`RateLimitError::InsufficientCapacity`] if `n` exceeds the burst.
    #[inline]
    pub fn check(&self, n: u32) -> Result<(), RateLimitError> {
        let now = self.time.now_ns();
        if self.turnstile.available() <= 0 {
            // Someone waits in `until_ready`: no barging. Report the wait
            // the cells would have without them (at least one interval).
            let tat = self.tat.load(Ordering::Acquire);
            let wait = match self.params.step(tat, now, n) {
                Ok(_) => Duration::from_nanos(self.params.interval_ns.load(Ordering::Relaxed)),
                Err(RateLimitError::NotYet { retry_after }) => retry_after,
                Err(e) => return Err(e),
            };
            return Err(RateLimitError::NotYet { retry_after: wait });
        }
        self.take(n, now)
    }

    #[inline]
    fn take(&self, n: u32, now: u64) -> Result<(), RateLimitError> {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new_tat = self.params.step(tat, now, n)?;
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Waits until `n` cells conform and takes them, FIFO among waiters.
    ///
    /// # Errors
    ///
    /// [`RateLimitError::InsufficientCapacity`] at once if `n` exceeds the
    /// burst (waiting could never help).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future takes no cells and passes the turn to the next
    /// waiter.
    pub async fn until_ready(&self, n: u32) -> Result<(), RateLimitError> {
        let burst = self.params.burst.load(Ordering::Relaxed);
        if u64::from(n) > burst {
            return Err(RateLimitError::InsufficientCapacity {
                requested: n,
                burst: u32::try_from(burst).unwrap_or(u32::MAX),
            });
        }
        let _turn = self
            .turnstile
            .acquire()
            .await
            .expect("the turnstile is never closed and has capacity 1");
        loop {
            let changed = self.params.changed.listen();
            match self.take(n, self.time.now_ns()) {
                Ok(()) => return Ok(()),
                Err(RateLimitError::NotYet { retry_after }) => {
                    let clock = &*self.time.clock;
                    self.params.wait(clock, retry_after, changed).await;
                }
                // The quota shrank below `n` while we waited.
                Err(e) => return Err(e),
            }
        }
    }

    /// Replaces the quota, at once: the head waiter of
    /// [`until_ready`](RateLimiter::until_ready) re-evaluates now under the
    /// new quota. Cells already admitted stay counted against it.
    pub fn set_quota(&self, quota: Quota) {
        self.params.set(quota);
    }

    /// The current quota.
    pub fn quota(&self) -> Quota {
        self.params.quota()
    }

    /// Tasks waiting in [`until_ready`](RateLimiter::until_ready) (the one
    /// sleeping included).
    pub fn waiting(&self) -> usize {
        self.turnstile.waiting() + usize::from(self.turnstile.available() <= 0)
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field(
                "interval_ns",
                &self.params.interval_ns.load(Ordering::Relaxed),
            )
            .field("burst", &self.params.burst.load(Ordering::Relaxed))
            .field("waiting", &self.waiting())
            .finish()
    }
}

const KEY_SHARDS: usize = 16;

/// One shard of a [`KeyedRateLimiter`]: TATs by key, and the size at which
/// the next sweep of rested keys runs.
struct Shard<K> {
    keys: HashMap<K, u64>,
    sweep_at: usize,
}

/// One GCRA limit per key (per host, per user, ...), all with the same
/// quota.
///
/// Keys are kept in 16 mutex-guarded shards. A key whose TAT is in the past
/// is fully rested, which is the same as never having been seen, so it can
/// be dropped without changing any decision: [`retain_recent`] does that,
/// and it also runs by itself on a shard that grows past
/// `max_keys / 16` entries (default `max_keys`: 65,536).
///
/// Keys still within their period are never dropped (that would hand them
/// a fresh burst), so many distinct live keys use memory in proportion.
/// What they do not do is slow every check down: after a sweep, the next
/// one waits until the shard has doubled from what the sweep left, so a
/// sweep's cost is spread over at least as many new keys and a check costs
/// O(1) amortised however many keys are live.
///
/// [`until_ready`](KeyedRateLimiter::until_ready) sleeps until its key
/// conforms; waiters on the same key are not ordered among themselves.
///
/// [`retain_recent`]: KeyedRateLimiter::retain_recent
///
/// # Default
///
/// At most 65,536 keys (16 shards of 4,096), the system clock.
///
/// # Examples
///
/// ```
/// use smolkit::limit::{KeyedRateLimiter, Quota};
///
/// let per_host = KeyedRateLimiter::new(Quota::per_second(1).unwrap());
/// assert!(per_host.check(&"a.example", 1).is_ok());
/// assert!(per_host.check(&"a.example", 1).is_err());
/// assert!(per_host.check(&"b.example", 1).is_ok());
/// assert_eq!(per_host.len(), 2);
/// ```
pub struct KeyedRateLimiter<K> {
    shards: [Mutex<Shard<K>>; KEY_SHARDS],
    hasher: RandomState,
    params: Params,
    time: Origin,
    max_per_shard: usize,
    sweeps: AtomicU64,
}

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K> {
    /// A keyed limiter on the system clock.
    pub fn new(quota: Quota) -> Self {
        Self::with_clock(quota, Arc::new(SystemClock))
    }

    /// A keyed limiter on `clock`.
    pub fn with_clock(quota: Quota, clock: Arc<dyn Clock>) -> Self {
        KeyedRateLimiter {
            shards: std::array::from_fn(|_| {
                Mutex::new(Shard {
                    keys: HashMap::new(),
                    sweep_at: 65_536 / KEY_SHARDS,
                })
            }),
            hasher: RandomState::new(),
            params: Params::new(quota),
            time: Origin::new(clock),
            max_per_shard: 65_536 / KEY_SHARDS,
            sweeps: AtomicU64::new(0),
        }
    }

    /// Sets the number of keys above which rested keys are dropped
    /// automatically (spread over the shards; at least 16).
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_per_shard = (max_keys / KEY_SHARDS).max(1);
        for shard in &self.shards {
            lock(shard).sweep_at = self.max_per_shard;
        }
        self
    }

    fn shard(&self, key: &K) -> &Mutex<Shard<K>> {
        let h = self.hasher.hash_one(key);
        &self.shards[(h as usize) % KEY_SHARDS]
    }

    /// Admits `n` cells for `key` now, or says when they would conform.
    ///
    /// # Errors
    ///
    /// As [`RateLimiter::check`].
    pub fn check(&self, key: &K, n: u32) -> Result<(), RateLimitError> {
        let now = self.time.now_ns();
        let mut shard = lock(self.shard(key));
        let tat = shard.keys.get(key).copied().unwrap_or(0);
        let new_tat = self.params.step(tat, now, n)?;
        if shard.keys.len() >= shard.sweep_at && !shard.keys.contains_key(key) {
            shard.keys.retain(|_, tat| *tat > now);
            self.sweeps.fetch_add(1, Ordering::Relaxed);
            // NOTE: the next sweep waits for the shard to double from here,
            // so sweeping live keys over and over cannot go quadratic.
            shard.sweep_at = self.max_per_shard.max(shard.keys.len().saturating_mul(2));
        }
        shard.keys.insert(key.clone(), new_tat);
        Ok(())
    }

    /// Waits until `n` cells for `key` conform and takes them.
    ///
    /// # Errors
    ///
    /// [`RateLimitError::InsufficientCapacity`] if `n` exceeds the burst.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future takes no cells.
    pub async fn until_ready(&self, key: &K, n: u32) -> Result<(), RateLimitError> {
        loop {
            let changed = self.params.changed.listen();
            match self.check(key, n) {
                Ok(()) => return Ok(()),
                Err(RateLimitError::NotYet { retry_after }) => {
                    let clock = &*self.time.clock;
                    self.params.wait(clock, retry_after, changed).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops every key that is fully rested (its limit is as if new).
    /// Returns how many were dropped.
    pub fn retain_recent(&self) -> usize {
        let now = self.time.now_ns();
        let mut dropped = 0;
        for shard in &self.shards {
            let mut shard = lock(shard);
            let before = shard.keys.len();
            shard.keys.retain(|_, tat| *tat > now);
            dropped += before - shard.keys.len();
            shard.sweep_at = self.max_per_shard.max(shard.keys.len().saturating_mul(2));
        }
        dropped
    }

    /// Automatic sweeps for rested keys run so far (each costs a pass over
    /// one shard).
    pub fn sweeps(&self) -> u64 {
        self.sweeps.load(Ordering::Relaxed)
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).keys.len()).sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the quota for every key, at once.
    pub fn set_quota(&self, quota: Quota) {
        self.params.set(quota);
    }

    /// The current quota.
    pub fn quota(&self) -> Quota {
        self.params.quota()
    }
}

impl<K> fmt::Debug for KeyedRateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field(
                "interval_ns",
                &self.params.interval_ns.load(Ordering::Relaxed),
            )
            .field("burst", &self.params.burst.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}
