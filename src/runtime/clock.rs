//! Time as a dependency: `Clock`, `SystemClock` and the `Sleep` future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A source of time: `now` and `sleep`.
///
/// Every timer-driven component of smolkit (backoff, breaker windows, rate
/// limiters, heartbeats, batching timeouts) takes a clock, so tests can run
/// a schedule of seconds in microseconds with `testing::ManualClock`
/// (feature `testing`) and production code uses [`SystemClock`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use smolkit::runtime::{Clock, SystemClock};
///
/// let clock = SystemClock;
/// let start = clock.now();
/// smol::block_on(clock.sleep(Duration::from_millis(1)));
/// assert!(clock.now() >= start + Duration::from_millis(1));
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> Instant;

    /// A future that completes once [`now`](Clock::now) has reached
    /// `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Sleep;

    /// A future that completes after `duration`. A duration too large to
    /// represent as an `Instant` never completes.
    fn sleep(&self, duration: Duration) -> Sleep {
        match self.now().checked_add(duration) {
            Some(deadline) => self.sleep_until(deadline),
            None => Sleep::never(),
        }
    }

    /// A sleep of `duration` for a timeout that the work it guards almost
    /// always beats (a connect, a response): the same as
    /// [`sleep`](Clock::sleep) unless the clock keeps such deadlines more
    /// cheaply. [`SystemClock`] does: they are kept by one thread of its
    /// own, so arming and dropping one costs a lock each, not a reactor
    /// wake-up and a timer map's insert and remove. It ends up to a
    /// thread wake-up later than an exact [`sleep`](Clock::sleep).
    fn watchdog(&self, duration: Duration) -> Sleep {
        self.sleep(duration)
    }
}

/// The real clock: `Instant::now()` and `async_io::Timer`.
///
/// `async_io::Timer` works under any executor (async-io drives its own
/// reactor thread when no executor does).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, deadline: Instant) -> Sleep {
        Sleep {
            inner: SleepInner::Timer(async_io::Timer::at(deadline)),
        }
    }

    fn watchdog(&self, duration: Duration) -> Sleep {
        match Instant::now().checked_add(duration) {
            Some(deadline) => Sleep {
                inner: SleepInner::Watch(super::watchdog::Watch::new(deadline)),
            },
            None => Sleep::never(),
        }
    }
}

/// A clock whose [`now`](Clock::now) is one atomic load: a thread started
/// on first use refreshes the time every millisecond, so reading it costs
/// no system call (std's `Instant::now` is a `clock_gettime`, which is
/// most of what a rate limiter's `check` costs; governor reads the TSC
/// for the same reason). Timers ([`sleep_until`](Clock::sleep_until))
/// stay exact: they are the system clock's.
///
/// The time it reads lags the system clock by up to the resolution (more
/// if the thread is not scheduled), and never goes back. Use it where
/// that is well below the intervals that matter: a rate of 1 000 a
/// second (1 ms apart) is about the finest it meters evenly.
///
/// One thread per process, for the process's lifetime (like async-io's
/// reactor thread).
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use smolkit::limit::{Quota, RateLimiter};
/// use smolkit::runtime::{Clock, CoarseClock};
///
/// let clock = CoarseClock::global();
/// let limiter = RateLimiter::with_clock(Quota::per_second(100).unwrap(), Arc::new(clock.clone()));
/// assert!(limiter.check(1).is_ok());
/// assert!(clock.now() <= std::time::Instant::now());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct CoarseClock {
    inner: &'static CoarseInner,
}

#[derive(Debug)]
struct CoarseInner {
    origin: Instant,
    /// Nanoseconds since `origin`, as of the last tick.
    nanos: std::sync::atomic::AtomicU64,
    /// The thread runs (if it could not start, `now` reads the system
    /// clock instead of a time that stands still).
    ticking: std::sync::atomic::AtomicBool,
}

impl CoarseClock {
    /// How often the time is refreshed.
    pub const RESOLUTION: Duration = Duration::from_millis(1);

    /// The process's coarse clock (its thread starts on the first call).
    pub fn global() -> Self {
        static INNER: std::sync::OnceLock<&'static CoarseInner> = std::sync::OnceLock::new();
        let inner = *INNER.get_or_init(|| {
            let inner: &'static CoarseInner = Box::leak(Box::new(CoarseInner {
                origin: Instant::now(),
                nanos: std::sync::atomic::AtomicU64::new(0),
                ticking: std::sync::atomic::AtomicBool::new(false),
            }));
            let started = std::thread::Builder::new()
                .name("smolkit-coarse-clock".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Self::RESOLUTION);
                        let since =
                            u64::try_from(inner.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        inner
                            .nanos
                            .fetch_max(since, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            match started {
                Ok(_) => inner
                    .ticking
                    .store(true, std::sync::atomic::Ordering::Release),
                Err(e) => tracing::error!(
                    error = %e,
                    "the coarse clock's thread did not start; it reads the system clock"
                ),
            }
            inner
        });
        CoarseClock { inner }
    }
}

impl Clock for CoarseClock {
    #[inline]
    fn now(&self) -> Instant {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        if !self.inner.ticking.load(Acquire) {
            return Instant::now();
        }
        self.inner.origin + Duration::from_nanos(self.inner.nanos.load(Relaxed))
    }

    fn sleep_until(&self, deadline: Instant) -> Sleep {
        SystemClock.sleep_until(deadline)
    }

    fn watchdog(&self, duration: Duration) -> Sleep {
        SystemClock.watchdog(duration)
    }
}

/// The future returned by [`Clock::sleep`] and [`Clock::sleep_until`].
///
/// # Cancel safety
///
/// Dropping it cancels the sleep; nothing else is affected.
#[must_use = "futures do nothing unless you .await or poll them"]
pub struct Sleep {
    inner: SleepInner,
}

enum SleepInner {
    Timer(async_io::Timer),
    Watch(super::watchdog::Watch),
    Boxed(Pin<Box<dyn Future<Output = ()> + Send + 'static>>),
}

impl Sleep {
    /// A sleep driven by any future: how a custom [`Clock`] builds its
    /// sleeps.
    pub fn from_future<F>(fut: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Sleep {
            inner: SleepInner::Boxed(Box::pin(fut)),
        }
    }

    /// A sleep that never completes.
    pub fn never() -> Self {
        Sleep {
            inner: SleepInner::Timer(async_io::Timer::never()),
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.inner {
            SleepInner::Timer(timer) => Pin::new(timer).poll(cx).map(|_| ()),
            SleepInner::Watch(watch) => Pin::new(watch).poll(cx),
            SleepInner::Boxed(fut) => fut.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for Sleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            SleepInner::Timer(_) => "timer",
            SleepInner::Watch(_) => "watchdog",
            SleepInner::Boxed(_) => "custom",
        };
        f.debug_struct("Sleep").field("kind", &kind).finish()
    }
}

/// `t + d`, or the last instant this platform can represent past `t` when
/// that overflows: "as late as possible" (a wait of `Duration::MAX` means
/// forever, never "now").
pub(crate) fn saturating_add(t: Instant, d: Duration) -> Instant {
    if let Some(later) = t.checked_add(d) {
        return later;
    }
    // NOTE: bisection on whole seconds; how far an `Instant` reaches
    // differs between platforms.
    let (mut lo, mut hi) = (0u64, d.as_secs());
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if t.checked_add(Duration::from_secs(mid)).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    t + Duration::from_secs(lo)
}
