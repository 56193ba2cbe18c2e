//! `ManualClock`: time that moves only when the test says so.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::runtime::{Clock, Sleep};

/// A [`Clock`] that stands still until [`advance`](ManualClock::advance)d.
///
/// `advance(d)` moves `now()` forward by `d` and wakes exactly the sleepers
/// whose deadline is now reached, in deadline order (ties in the order they
/// started sleeping). Time jumps: a sleeper woken by an advance sees the
/// clock at its new value, not at its own deadline. Clones share one time.
///
/// A retry schedule of 1 s, 2 s, 4 s, 8 s therefore runs in microseconds,
/// and a test can check what happens at each step.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use futures_lite::future;
/// use smolkit::runtime::Clock;
/// use smolkit::testing::ManualClock;
///
/// let clock = ManualClock::new();
/// let mut sleep = Box::pin(clock.sleep(Duration::from_secs(5)));
/// assert!(future::block_on(future::poll_once(&mut sleep)).is_none());
///
/// clock.advance(Duration::from_secs(4));
/// assert!(future::block_on(future::poll_once(&mut sleep)).is_none());
///
/// clock.advance(Duration::from_secs(1));
/// assert!(future::block_on(future::poll_once(&mut sleep)).is_some());
/// ```
#[derive(Clone)]
pub struct ManualClock {
    state: Arc<Mutex<State>>,
    /// Notified whenever a sleeper registers.
    registered: Arc<Event>,
}

struct State {
    base: Instant,
    /// The largest `elapsed` that `base + elapsed` can represent.
    max_elapsed: Duration,
    elapsed: Duration,
    next_seq: u64,
    /// Sleepers not yet woken, keyed by (deadline, arrival).
    sleepers: BTreeMap<(Instant, u64), Waker>,
}

impl State {
    fn now(&self) -> Instant {
        self.base + self.elapsed
    }
}

impl ManualClock {
    /// A clock standing at the current real instant.
    pub fn new() -> Self {
        let base = Instant::now();
        ManualClock {
            registered: Arc::new(Event::new()),
            state: Arc::new(Mutex::new(State {
                base,
                max_elapsed: crate::runtime::saturating_add(base, Duration::MAX) - base,
                elapsed: Duration::ZERO,
                next_seq: 0,
                sleepers: BTreeMap::new(),
            })),
        }
    }

    /// Waits until at least `n` sleeps are registered on this clock: the
    /// way for a test to know that the code under test has reached its
    /// timer before it calls [`advance`](Self::advance) (instead of polling
    /// [`sleepers`](Self::sleepers)).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches.
    pub async fn wait_for_sleepers(&self, n: usize) {
        crate::sync::wait_for(&self.registered, || self.sleepers() >= n).await
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves time forward by `by` and wakes, in deadline order, every
    /// sleeper whose deadline has been reached.
    pub fn advance(&self, by: Duration) {
        let woken = {
            let mut state = self.lock();
            // NOTE: saturates at the last representable instant, so
            // `advance(Duration::MAX)` means "forever" and `now()` keeps
            // working afterwards.
            state.elapsed = state.elapsed.saturating_add(by).min(state.max_elapsed);
            let now = state.now();
            let later = state.sleepers.split_off(&(now, u64::MAX));
            std::mem::replace(&mut state.sleepers, later)
        };
        for (_, waker) in woken {
            waker.wake();
        }
    }

    /// Moves time to the earliest pending deadline (if it is in the future)
    /// and wakes the sleepers due then. Returns that deadline, or `None`
    /// when nobody sleeps.
    pub fn advance_to_next(&self) -> Option<Instant> {
        let (now, next) = {
            let state = self.lock();
            (state.now(), state.sleepers.keys().next().map(|k| k.0)?)
        };
        self.advance(next.saturating_duration_since(now));
        Some(next)
    }

    /// How much time has been advanced since the clock was made.
    pub fn elapsed(&self) -> Duration {
        self.lock().elapsed
    }

    /// How many sleepers are waiting for a deadline not yet reached.
    pub fn sleepers(&self) -> usize {
        self.lock().sleepers.len()
    }

    /// The earliest deadline a sleeper waits for, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().sleepers.keys().next().map(|k| k.0)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state.try_lock() {
            Ok(state) => f
                .debug_struct("ManualClock")
                .field("elapsed", &state.elapsed)
                .field("sleepers", &state.sleepers.len())
                .finish(),
            Err(_) => f.debug_struct("ManualClock").finish_non_exhaustive(),
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.lock().now()
    }

    fn sleep_until(&self, deadline: Instant) -> Sleep {
        Sleep::from_future(ManualSleep {
            clock: self.clone(),
            deadline,
            key: None,
        })
    }
}

struct ManualSleep {
    clock: ManualClock,
    deadline: Instant,
    key: Option<(Instant, u64)>,
}

impl Future for ManualSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut state = this.clock.lock();
        if state.now() >= this.deadline {
            if let Some(key) = this.key.take() {
                state.sleepers.remove(&key);
            }
            return Poll::Ready(());
        }
        let key = match this.key {
            Some(key) => key,
            None => {
                let key = (this.deadline, state.next_seq);
                state.next_seq += 1;
                this.key = Some(key);
                key
            }
        };
        let new = state.sleepers.insert(key, cx.waker().clone()).is_none();
        drop(state);
        if new {
            this.clock.registered.notify(usize::MAX);
        }
        Poll::Pending
    }
}

impl Drop for ManualSleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.clock.lock().sleepers.remove(&key);
        }
    }
}
