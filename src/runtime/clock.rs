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
            SleepInner::Boxed(fut) => fut.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for Sleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            SleepInner::Timer(_) => "timer",
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
