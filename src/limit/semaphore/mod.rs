//! The fair, weighted, resizable semaphore.
//!
//! # How it works
//!
//! One `AtomicI64` holds the free permits (shifted left by two; negative
//! while the semaphore is in debt after a shrink) and two flags: `WAITERS`
//! (the queue is not empty) and `CLOSED`. While `WAITERS` is clear,
//! acquiring and releasing are a single compare-and-swap each. While it is
//! set, `try_acquire` fails at once (nobody overtakes a queued waiter) and
//! releases go through the queue's mutex, which hands the permits directly
//! to the waiters at the front, in order: the head may collect permits a
//! few at a time until it has all it asked for. A waiter is woken only once
//! its permits are already its own, so a wake-up can never be stolen, and a
//! cancelled waiter gives back exactly what it had collected.
//!
//! Why not event-listener alone? A notification cannot carry permits to a
//! chosen waiter, so a woken waiter would race newcomers for them (the
//! barging that async-lock allows) and a weighted request could starve.

mod guard;
mod waiters;

pub use guard::{Acquire, AcquireArc, SemaphoreGuard, SemaphoreGuardArc};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use super::error::{AcquireError, TryAcquireError};
use crate::sync::{self, AtomicI64, AtomicUsize, Mutex, Ordering};
use waiters::{FAILED_CLOSED, FAILED_TOO_LARGE, GRANTED, Key, NIL, PENDING, Queue, Wakers, fate};

const WAITERS: i64 = 0b01;
const CLOSED: i64 = 0b10;
const SHIFT: u32 = 2;
/// The largest number of permits the state word can hold.
const MAX_PERMITS: usize = (i64::MAX >> (SHIFT + 1)) as usize;

fn permits_of(state: i64) -> i64 {
    state >> SHIFT
}

fn units(n: usize) -> i64 {
    // NOTE: every count is clamped to MAX_PERMITS on the way in, so this
    // cannot overflow.
    (n as i64) << SHIFT
}

/// The fields of a new semaphore with `permits` free (already clamped):
/// one body for the `const` constructor and the loom one.
macro_rules! semaphore_with {
    ($permits:expr) => {
        Semaphore {
            state: AtomicI64::new(($permits as i64) << SHIFT),
            capacity: AtomicUsize::new($permits),
            waiting: AtomicUsize::new(0),
            queue: Mutex::new(Queue::new()),
        }
    };
}

/// A fair, weighted async semaphore with exact resize and close.
///
/// - **Weighted**: [`acquire(n)`](Semaphore::acquire) takes `n` permits at
///   once. Asking for more than the capacity fails at once with
///   [`AcquireError::TooLarge`] instead of waiting forever.
/// - **Strict FIFO**: permits go to waiters in arrival order, and no later
///   arrival, including a [`try_acquire`](Semaphore::try_acquire) while
///   waiters exist, overtakes a queued waiter.
/// - **Cancel-safe**: dropping an acquire future gives back any permits it
///   had collected, to the next waiters.
/// - **Exact resize**: [`set_permits`](Semaphore::set_permits) takes effect
///   at once, under load. Shrinking below the permits in use leaves the
///   semaphore in debt ([`available`](Semaphore::available) is negative);
///   permits coming back pay the debt before anyone is admitted, so no more
///   than the new capacity is ever in use once the debt is paid.
/// - [`close`](Semaphore::close) fails every waiter and later acquire with
///   [`AcquireError::Closed`]; permits held stay valid.
///
/// # Head-of-line blocking
///
/// Strict FIFO has a price: a large weighted request at the head of the
/// queue holds back smaller requests behind it, even when enough permits
/// for them are free, until it has collected all it asked for. That is what
/// makes large requests starvation-free. If small requests must not wait
/// for large ones, give them separate semaphores.
///
/// # Examples
///
/// ```
/// use smolkit::limit::Semaphore;
///
/// let sem = Semaphore::new(3);
/// smol::block_on(async {
///     let a = sem.acquire_many(2).await.unwrap();
///     assert_eq!(sem.available(), 1);
///     assert!(sem.try_acquire_many(2).is_err());
///     drop(a);
///     let _b = sem.try_acquire_many(3).unwrap();
///     assert_eq!(sem.in_use(), 3);
/// });
/// ```
pub struct Semaphore {
    state: AtomicI64,
    capacity: AtomicUsize,
    /// Waiters in the queue (mirrors `queue.len`, for stats).
    waiting: AtomicUsize,
    queue: Mutex<Queue>,
}

impl Semaphore {
    /// The most permits a semaphore holds: 2^60 − 1 (`i64::MAX >> 3`; the
    /// state word keeps two flag bits and a sign). Larger requests and
    /// capacities are clamped to it ("as many as possible").
    pub const MAX_PERMITS: usize = MAX_PERMITS;

    /// A semaphore with `permits` permits, clamped to
    /// [`Semaphore::MAX_PERMITS`] (what its state word holds).
    #[cfg(not(smolkit_loom))]
    pub const fn new(permits: usize) -> Self {
        let permits = if permits > MAX_PERMITS {
            MAX_PERMITS
        } else {
            permits
        };
        semaphore_with!(permits)
    }

    /// A semaphore with `permits` permits (loom build: not `const`).
    #[cfg(smolkit_loom)]
    pub fn new(permits: usize) -> Self {
        let permits = permits.min(MAX_PERMITS);
        semaphore_with!(permits)
    }

    /// Takes `n` permits now, or fails without waiting.
    ///
    /// # Errors
    ///
    /// [`TryAcquireError::NoPermits`] when fewer than `n` are free or
    /// waiters are queued, [`TryAcquireError::Closed`],
    /// [`TryAcquireError::TooLarge`] when `n` exceeds the capacity.
    #[inline]
    pub fn try_acquire_many(&self, n: usize) -> Result<SemaphoreGuard<'_>, TryAcquireError> {
        self.try_take(n)?;
        Ok(SemaphoreGuard {
            sem: self,
            permits: n,
        })
    }

    /// Takes one permit now, or fails without waiting.
    ///
    /// # Errors
    ///
    /// As [`try_acquire_many`](Semaphore::try_acquire_many).
    #[inline]
    pub fn try_acquire(&self) -> Result<SemaphoreGuard<'_>, TryAcquireError> {
        self.try_acquire_many(1)
    }

    /// [`try_acquire`](Semaphore::try_acquire) with an owned guard.
    ///
    /// # Errors
    ///
    /// As [`try_acquire_many`](Semaphore::try_acquire_many).
    pub fn try_acquire_arc(
        self: &std::sync::Arc<Self>,
    ) -> Result<SemaphoreGuardArc, TryAcquireError> {
        self.try_acquire_many_arc(1)
    }

    /// [`try_acquire_many`](Semaphore::try_acquire_many) with an owned guard.
    ///
    /// # Errors
    ///
    /// As [`try_acquire_many`](Semaphore::try_acquire_many).
    pub fn try_acquire_many_arc(
        self: &std::sync::Arc<Self>,
        n: usize,
    ) -> Result<SemaphoreGuardArc, TryAcquireError> {
        self.try_take(n)?;
        Ok(SemaphoreGuardArc {
            sem: self.clone(),
            permits: n,
        })
    }

    #[inline]
    fn try_take(&self, n: usize) -> Result<(), TryAcquireError> {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            if cur & CLOSED != 0 {
                return Err(TryAcquireError::Closed);
            }
            if n > MAX_PERMITS || cur & WAITERS != 0 || permits_of(cur) < n as i64 {
                let capacity = self.capacity();
                if n > capacity {
                    return Err(TryAcquireError::TooLarge {
                        requested: n,
                        capacity,
                    });
                }
                return Err(TryAcquireError::NoPermits);
            }
            match self.state.compare_exchange_weak(
                cur,
                cur - units(n),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Waits for `n` permits, in FIFO order.
    ///
    /// # Errors
    ///
    /// [`AcquireError::Closed`] if the semaphore is or gets closed;
    /// [`AcquireError::TooLarge`] at once if `n` exceeds the capacity, or
    /// later if a resize shrinks the capacity below `n`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes gives back the permits it
    /// had collected and keeps the queue order of everyone else.
    #[inline]
    pub fn acquire_many(&self, n: usize) -> Acquire<'_> {
        Acquire {
            sem: self,
            inner: AcquireState::new(n),
        }
    }

    /// Waits for one permit, in FIFO order.
    ///
    /// # Errors
    ///
    /// As [`acquire_many`](Semaphore::acquire_many).
    ///
    /// # Cancel safety
    ///
    /// As [`acquire_many`](Semaphore::acquire_many).
    #[inline]
    pub fn acquire(&self) -> Acquire<'_> {
        self.acquire_many(1)
    }

    /// [`acquire`](Semaphore::acquire) with an owned guard that can move
    /// into a spawned task.
    ///
    /// # Errors
    ///
    /// As [`acquire_many`](Semaphore::acquire_many).
    ///
    /// # Cancel safety
    ///
    /// As [`acquire_many`](Semaphore::acquire_many).
    pub fn acquire_arc(self: &std::sync::Arc<Self>) -> AcquireArc {
        self.acquire_many_arc(1)
    }

    /// [`acquire_many`](Semaphore::acquire_many) with an owned guard that
    /// can move into a spawned task.
    ///
    /// # Errors
    ///
    /// As [`acquire_many`](Semaphore::acquire_many).
    ///
    /// # Cancel safety
    ///
    /// As [`acquire_many`](Semaphore::acquire_many).
    pub fn acquire_many_arc(self: &std::sync::Arc<Self>, n: usize) -> AcquireArc {
        AcquireArc {
            sem: self.clone(),
            inner: AcquireState::new(n),
        }
    }

    /// Runs `f` while holding one permit: the seeds' `async with limiter`.
    ///
    /// # Errors
    ///
    /// As [`acquire_many`](Semaphore::acquire_many); `f` is not called then.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future gives the permit back (or leaves the queue),
    /// and drops `f`'s future if it had started.
    ///
    /// # Examples
    ///
    /// ```
    /// use smolkit::limit::Semaphore;
    ///
    /// let sem = Semaphore::new(10);
    /// let out = smol::block_on(sem.run(|| async { 6 * 7 }));
    /// assert_eq!(out, Ok(42));
    /// ```
    pub async fn run<F, Fut>(&self, f: F) -> Result<Fut::Output, AcquireError>
    where
        F: FnOnce() -> Fut,
        Fut: Future,
    {
        self.run_many(1, f).await
    }

    /// Runs `f` while holding `n` permits.
    ///
    /// # Errors
    ///
    /// As [`acquire_many`](Semaphore::acquire_many); `f` is not called then.
    ///
    /// # Cancel safety
    ///
    /// As [`run`](Semaphore::run).
    pub async fn run_many<F, Fut>(&self, n: usize, f: F) -> Result<Fut::Output, AcquireError>
    where
        F: FnOnce() -> Fut,
        Fut: Future,
    {
        let _guard = self.acquire_many(n).await?;
        Ok(f().await)
    }

    /// Adds `n` permits to the capacity; they go to waiters first.
    pub fn add_permits(&self, n: usize) {
        let mut wakers = Wakers::new();
        {
            let mut q = sync::lock(&self.queue);
            let cap = self.capacity.load(Ordering::Acquire);
            let new = cap.saturating_add(n).min(MAX_PERMITS);
            self.capacity.store(new, Ordering::Release);
            self.release_locked(&mut q, new - cap, &mut wakers);
        }
        wakers.wake();
    }

    /// Sets the capacity to `n` (clamped to [`Semaphore::MAX_PERMITS`]), at once and
    /// under load.
    ///
    /// Growing hands the new permits to waiters first. Shrinking removes
    /// free permits and, if too few are free, puts the semaphore in debt:
    /// permits released later pay it off before anyone is admitted. Queued
    /// waiters that asked for more than `n` fail with
    /// [`AcquireError::TooLarge`].
    pub fn set_permits(&self, n: usize) {
        let n = n.min(MAX_PERMITS);
        let mut wakers = Wakers::new();
        {
            let mut q = sync::lock(&self.queue);
            let cap = self.capacity.swap(n, Ordering::AcqRel);
            if n > cap {
                self.release_locked(&mut q, n - cap, &mut wakers);
            } else if n < cap {
                self.state.fetch_sub(units(cap - n), Ordering::AcqRel);
                self.fail_too_large_locked(&mut q, n, &mut wakers);
            }
        }
        wakers.wake();
    }

    /// Closes the semaphore: every queued waiter and every later acquire
    /// fails with [`AcquireError::Closed`]. Guards already held stay valid
    /// and still return their permits. Returns `false` if it was already
    /// closed.
    pub fn close(&self) -> bool {
        let prev = self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut wakers = Wakers::new();
        {
            let mut q = sync::lock(&self.queue);
            let mut returned = 0;
            while q.head != NIL {
                let head = q.head;
                let (assigned, waker) = q.unlink(head, FAILED_CLOSED);
                returned += assigned;
                wakers.extend(waker);
            }
            self.waiting.store(0, Ordering::Release);
            self.add_and_clear_waiters(returned);
        }
        wakers.wake();
        prev & CLOSED == 0
    }

    /// Whether [`close`](Semaphore::close) was called.
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Free permits now; negative while the semaphore is in debt after a
    /// shrink.
    pub fn available(&self) -> i64 {
        permits_of(self.state.load(Ordering::Acquire))
    }

    /// Permits held by guards (and by queued waiters that have collected
    /// part of their request).
    pub fn in_use(&self) -> usize {
        let cap = self.capacity() as i64;
        (cap - self.available()).max(0) as usize
    }

    /// Waiters queued now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// The configured number of permits.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Acquire)
    }

    /// Adds `n` permits to the word and clears `WAITERS`: the queue has just
    /// become empty. Called with the queue locked.
    fn add_and_clear_waiters(&self, n: usize) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some((cur + units(n)) & !WAITERS)
            });
    }

    /// Returns `n` permits (a guard's drop).
    #[inline]
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut cur = self.state.load(Ordering::Acquire);
        while cur & WAITERS == 0 {
            match self.state.compare_exchange_weak(
                cur,
                cur + units(n),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
        // Waiters are queued: the permits go to them from hand, without
        // a trip through the word (no fast-path acquire takes permits
        // while WAITERS is set, and only the lock's holder changes the
        // count then).
        let mut wakers = Wakers::new();
        {
            let mut q = sync::lock(&self.queue);
            if q.is_empty() || permits_of(self.state.load(Ordering::Acquire)) != 0 {
                // The queue emptied meanwhile, or a debt to pay first.
                self.release_locked(&mut q, n, &mut wakers);
            } else {
                self.hand_out_locked(&mut q, n, &mut wakers);
            }
        }
        wakers.wake();
    }

    /// Adds `n` permits: they pay any debt, then go to the queue in order,
    /// and what is left stays free. Called with the queue locked.
    fn release_locked(&self, q: &mut Queue, n: usize, wakers: &mut Wakers) {
        if n > 0 {
            self.state.fetch_add(units(n), Ordering::AcqRel);
        }
        self.redistribute_locked(q, wakers);
    }

    /// Hands the free permits in the word to the queue, front first.
    /// Called with the queue locked.
    fn redistribute_locked(&self, q: &mut Queue, wakers: &mut Wakers) {
        // A head that needs nothing more (a zero-weight request) goes at
        // once, even with no permit free.
        self.grant_satisfied_heads(q, wakers);
        if q.is_empty() {
            self.add_and_clear_waiters(0);
            return;
        }
        // Take the free permits out of the word (a debt stays there).
        let mut cur = self.state.load(Ordering::Acquire);
        let free = loop {
            let p = permits_of(cur);
            if p <= 0 {
                return;
            }
            match self.state.compare_exchange_weak(
                cur,
                cur - units(p as usize),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break p as usize,
                Err(actual) => cur = actual,
            }
        };
        self.hand_out_locked(q, free, wakers);
    }

    /// Gives `free` permits (taken out of the word) to the queue, front
    /// first; what is left goes back to the word once the queue is empty.
    /// Called with the queue locked.
    fn hand_out_locked(&self, q: &mut Queue, mut free: usize, wakers: &mut Wakers) {
        while free > 0 {
            let Some(head) = q.front_mut() else {
                break;
            };
            let give = (head.needed - head.assigned).min(free);
            head.assigned += give;
            free -= give;
            if head.assigned == head.needed {
                self.grant(q, wakers);
                // Zero-weight requests right behind it go with it.
                self.grant_satisfied_heads(q, wakers);
            }
        }
        if q.is_empty() {
            // Keep what is left.
            self.add_and_clear_waiters(free);
        }
    }

    /// Grants the heads of the queue that already have all they asked for.
    fn grant_satisfied_heads(&self, q: &mut Queue, wakers: &mut Wakers) {
        while q.front_mut().is_some_and(|h| h.assigned == h.needed) {
            self.grant(q, wakers);
        }
    }

    /// Grants the head of the queue (it has all it asked for).
    fn grant(&self, q: &mut Queue, wakers: &mut Wakers) {
        let head = q.head;
        let (_, waker) = q.unlink(head, GRANTED);
        self.waiting.store(q.len, Ordering::Release);
        wakers.extend(waker);
    }

    /// Fails queued waiters asking for more than `capacity`.
    fn fail_too_large_locked(&self, q: &mut Queue, capacity: usize, wakers: &mut Wakers) {
        let mut returned = 0;
        let mut at = q.head;
        while at != NIL {
            let w = q.at(at);
            let (next, needed) = (w.next, w.needed);
            if needed > capacity {
                let (assigned, waker) = q.unlink(at, FAILED_TOO_LARGE | (capacity << 2));
                returned += assigned;
                self.waiting.store(q.len, Ordering::Release);
                wakers.extend(waker);
            }
            at = next;
        }
        if q.is_empty() {
            self.add_and_clear_waiters(returned);
        } else {
            self.release_locked(q, returned, wakers);
        }
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("capacity", &self.capacity())
            .field("available", &self.available())
            .field("waiting", &self.waiting())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The state machine shared by [`Acquire`] and [`AcquireArc`].
enum AcquireState {
    Start {
        n: usize,
    },
    Queued {
        n: usize,
        key: Key,
        cell: sync::Arc<AtomicUsize>,
    },
    Done,
}

impl AcquireState {
    fn new(n: usize) -> Self {
        AcquireState::Start { n }
    }

    #[inline]
    fn poll(&mut self, sem: &Semaphore, cx: &mut Context<'_>) -> Poll<Result<usize, AcquireError>> {
        loop {
            match self {
                AcquireState::Done => panic!("acquire future polled after completion"),
                AcquireState::Start { n } => {
                    let n = *n;
                    match sem.try_take(n) {
                        Ok(()) => {
                            *self = AcquireState::Done;
                            return Poll::Ready(Ok(n));
                        }
                        Err(TryAcquireError::Closed) => {
                            *self = AcquireState::Done;
                            return Poll::Ready(Err(AcquireError::Closed));
                        }
                        Err(TryAcquireError::TooLarge {
                            requested,
                            capacity,
                        }) => {
                            *self = AcquireState::Done;
                            return Poll::Ready(Err(AcquireError::TooLarge {
                                requested,
                                capacity,
                            }));
                        }
                        Err(TryAcquireError::NoPermits) => {}
                    }
                    match enqueue(sem, n, cx.waker()) {
                        Enqueued::Granted => {
                            *self = AcquireState::Done;
                            return Poll::Ready(Ok(n));
                        }
                        Enqueued::Failed(e) => {
                            *self = AcquireState::Done;
                            return Poll::Ready(Err(e));
                        }
                        Enqueued::Waiting(key, cell) => {
                            *self = AcquireState::Queued { n, key, cell };
                            return Poll::Pending;
                        }
                    }
                }
                AcquireState::Queued { n, key, cell } => {
                    let n = *n;
                    let state = cell.load(Ordering::Acquire);
                    if state != PENDING {
                        *self = AcquireState::Done;
                        return Poll::Ready(fate(state, n));
                    }
                    let mut q = sync::lock(&sem.queue);
                    // Re-checked under the lock: fates are settled under it.
                    match q.get(*key) {
                        Some(w) => match &mut w.waker {
                            Some(waker) if waker.will_wake(cx.waker()) => {}
                            waker => *waker = Some(cx.waker().clone()),
                        },
                        None => continue,
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Gives back what a cancelled acquire had collected.
    #[inline]
    fn cancel(&mut self, sem: &Semaphore) {
        if !matches!(self, AcquireState::Queued { .. }) {
            return;
        }
        self.cancel_queued(sem);
    }

    #[cold]
    fn cancel_queued(&mut self, sem: &Semaphore) {
        let AcquireState::Queued { n, key, cell } = std::mem::replace(self, AcquireState::Done)
        else {
            return;
        };
        let mut wakers = Wakers::new();
        let mut release_all = false;
        {
            let mut q = sync::lock(&sem.queue);
            match cell.load(Ordering::Acquire) & 0b11 {
                GRANTED => release_all = true,
                PENDING => {
                    let (assigned, _) = q.unlink(key.slot, FAILED_CLOSED);
                    sem.waiting.store(q.len, Ordering::Release);
                    if q.is_empty() {
                        sem.add_and_clear_waiters(assigned);
                    } else {
                        // The next waiters may now be served: hand on what
                        // this one had, including the wake-up.
                        sem.release_locked(&mut q, assigned, &mut wakers);
                    }
                }
                _ => {} // failed: it holds nothing.
            }
        }
        if release_all {
            sem.release(n);
        }
        wakers.wake();
    }
}

enum Enqueued {
    Granted,
    Failed(AcquireError),
    Waiting(Key, sync::Arc<AtomicUsize>),
}

/// The slow path: under the lock, take what is free and queue for the rest.
fn enqueue(sem: &Semaphore, n: usize, waker: &Waker) -> Enqueued {
    let mut q = sync::lock(&sem.queue);
    let mut cur = sem.state.load(Ordering::Acquire);
    let taken = loop {
        if cur & CLOSED != 0 {
            return Enqueued::Failed(AcquireError::Closed);
        }
        let capacity = sem.capacity();
        if n > capacity {
            return Enqueued::Failed(AcquireError::TooLarge {
                requested: n,
                capacity,
            });
        }
        // With waiters queued the word holds no free permits.
        let free = permits_of(cur).max(0) as usize;
        if q.is_empty() && free >= n {
            match sem.state.compare_exchange_weak(
                cur,
                cur - units(n),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Enqueued::Granted,
                Err(actual) => {
                    cur = actual;
                    continue;
                }
            }
        }
        let take = if q.is_empty() { free.min(n) } else { 0 };
        match sem.state.compare_exchange_weak(
            cur,
            (cur - units(take)) | WAITERS,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => break take,
            Err(actual) => cur = actual,
        }
    };
    let (key, cell) = q.push_back(n, taken, waker.clone());
    sem.waiting.store(q.len, Ordering::Release);
    Enqueued::Waiting(key, cell)
}
