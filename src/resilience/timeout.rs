//! Timeouts and deadlines on a [`Clock`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;

use super::error::Elapsed;
use crate::runtime::{Clock, Sleep, SystemClock};

/// Runs `fut` for at most `duration` on the system clock.
///
/// # Errors
///
/// [`Elapsed`] if `fut` did not finish in time; `fut` is dropped then, so
/// its cleanup (drop guards) runs.
///
/// # Cancel safety
///
/// Dropping the returned future drops `fut`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use smolkit::resilience::timeout;
///
/// let out = smol::block_on(timeout(Duration::from_secs(1), async { 7 }));
/// assert_eq!(out, Ok(7));
/// let slow = smol::block_on(timeout(Duration::from_millis(1), futures_lite::future::pending::<()>()));
/// assert!(slow.is_err());
/// ```
pub fn timeout<F: Future>(duration: Duration, fut: F) -> Timeout<F> {
    timeout_on(&SystemClock, duration, fut)
}

/// Runs `fut` until `deadline` at most, on the system clock.
///
/// # Errors
///
/// [`Elapsed`] if the deadline passed first.
pub fn deadline<F: Future>(deadline: Instant, fut: F) -> Timeout<F> {
    deadline_on(&SystemClock, deadline, fut)
}

/// [`timeout`] on any clock.
pub fn timeout_on<F: Future>(clock: &dyn Clock, duration: Duration, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        sleep: clock.sleep(duration),
        after: duration,
    }
}

/// [`timeout_on`] on the clock's [`watchdog`](Clock::watchdog): for a
/// timeout that almost never fires.
#[cfg(feature = "http")]
pub(crate) fn watchdog_on<F: Future>(clock: &dyn Clock, duration: Duration, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        sleep: clock.watchdog(duration),
        after: duration,
    }
}

/// [`deadline`] on any clock.
pub fn deadline_on<F: Future>(clock: &dyn Clock, deadline: Instant, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        sleep: clock.sleep_until(deadline),
        after: deadline.saturating_duration_since(clock.now()),
    }
}

/// A shared clock for components that keep one.
pub(crate) type SharedClock = Arc<dyn Clock>;

pin_project! {
    /// The future of [`timeout`] and [`deadline`].
    #[must_use = "futures do nothing unless you .await or poll them"]
    #[derive(Debug)]
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        #[pin]
        sleep: Sleep,
        after: Duration,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed { after: *this.after })),
            Poll::Pending => Poll::Pending,
        }
    }
}
