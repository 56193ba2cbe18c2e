//! A subscription: its options, its queue with the overflow policy, and
//! the stream a subscriber reads.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures_lite::Stream;

use super::bus::{Bus, Event, Overflow};
use super::topic::Pattern;
use crate::runtime::coop::Budget;
use crate::sync::lock_std as lock;

/// Options of one subscription.
///
/// # Default
///
/// The bus's capacity, [`Overflow::Wait`], concurrency 1, name
/// `"subscriber"`.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub(super) name: String,
    pub(super) capacity: Option<usize>,
    pub(super) overflow: Overflow,
    pub(super) concurrency: usize,
}

impl SubscribeOptions {
    /// The defaults.
    pub fn new() -> Self {
        SubscribeOptions {
            name: "subscriber".to_owned(),
            capacity: None,
            overflow: Overflow::Wait,
            concurrency: 1,
        }
    }

    /// A name for stats, logs and [`HandlerFailure`](super::HandlerFailure)s.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Events queued for this subscription (default: the bus's). Zero is
    /// refused when subscribing.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// What to do when the queue is full.
    pub fn with_overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// For handlers: calls running at once (default 1, which keeps order).
    /// Zero is refused when subscribing.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self::new()
    }
}

pub(super) struct Sub<E> {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) pattern: Pattern,
    pub(super) overflow: Overflow,
    capacity: usize,
    queue: Mutex<Queue<E>>,
    /// Events queued and not yet handed out: those in `queue` plus the
    /// reader's batch. Raised under the queue's lock, so emitters never
    /// pass the capacity.
    len: AtomicUsize,
    closed: AtomicBool,
    /// Emitters waiting for room ([`Overflow::Wait`]).
    space: event_listener::Event,
    pub(super) delivered: AtomicU64,
    pub(super) dropped: AtomicU64,
}

/// A subscription's queue: a deque under a lock and the reader's waker.
///
/// NOTE: an `async_channel` per subscription cost a listener registration
/// and a notification per event on each side (the profile of the fan-out
/// bench: `event_listener` 20%, `concurrent_queue` 13%). Here the reader
/// parks its waker under the lock only when it found the queue empty, an
/// emitter wakes it only then, and a `Wait` reader takes everything queued
/// in one lock (its batch still counts against the capacity).
struct Queue<E> {
    items: VecDeque<Event<E>>,
    /// The reader found the queue empty and waits for `waker`.
    sleeping: bool,
    waker: Option<Waker>,
}

/// What [`Sub::offer`] did with an event.
pub(super) enum Offer<E> {
    /// In the subscription's queue.
    Queued,
    /// Dropped by its `DropNewest` policy (counted).
    Dropped,
    /// Not taken: a full `Wait` subscription.
    Full(Event<E>),
    /// Not taken: the subscription is closed.
    Closed(Event<E>),
}

impl<E> Sub<E> {
    pub(super) fn new(
        id: u64,
        name: String,
        pattern: Pattern,
        overflow: Overflow,
        capacity: usize,
    ) -> Self {
        Sub {
            id,
            name,
            pattern,
            overflow,
            capacity,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                sleeping: false,
                waker: None,
            }),
            len: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            space: event_listener::Event::new(),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Events queued and not yet read.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether a `Wait` emitter would have to wait.
    pub(super) fn is_full(&self) -> bool {
        self.len() >= self.capacity
    }

    /// Stops taking events; the reader gets what is queued, then the end.
    pub(super) fn close(&self) {
        let waker = {
            let mut q = lock(&self.queue);
            self.closed.store(true, Ordering::Release);
            q.sleeping = false;
            q.waker.take()
        };
        self.space.notify(usize::MAX);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Queues without waiting.
    pub(super) fn offer(&self, ev: Event<E>) -> Offer<E> {
        let mut q = lock(&self.queue);
        let offer = self.push(&mut q, ev);
        self.wake(q);
        offer
    }

    /// Queues what it can of `evs` (front first) under one lock, without
    /// waiting: a full `Wait` subscription leaves the rest in `evs`.
    /// Returns how many were queued, or `Err` when it is closed (`evs`
    /// untouched).
    pub(super) fn offer_many(&self, evs: &mut VecDeque<Event<E>>) -> Result<usize, ()> {
        let mut q = lock(&self.queue);
        let mut queued = 0;
        while let Some(ev) = evs.pop_front() {
            match self.push(&mut q, ev) {
                Offer::Queued => queued += 1,
                Offer::Dropped => {}
                Offer::Full(ev) => {
                    evs.push_front(ev);
                    break;
                }
                Offer::Closed(ev) => {
                    evs.push_front(ev);
                    return Err(());
                }
            }
        }
        self.wake(q);
        Ok(queued)
    }

    /// Queues one event under the lock (the overflow policy applied).
    fn push(&self, q: &mut Queue<E>, ev: Event<E>) -> Offer<E> {
        if self.closed.load(Ordering::Acquire) {
            return Offer::Closed(ev);
        }
        if self.len.load(Ordering::Acquire) >= self.capacity {
            match self.overflow {
                Overflow::Wait => return Offer::Full(ev),
                Overflow::DropNewest => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return Offer::Dropped;
                }
                // NOTE: a dropping reader takes one event at a time, so
                // everything counted is in `items`.
                Overflow::DropOldest => {
                    if q.items.pop_front().is_some() {
                        self.len.fetch_sub(1, Ordering::AcqRel);
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        q.items.push_back(ev);
        self.len.fetch_add(1, Ordering::AcqRel);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        Offer::Queued
    }

    /// Unlocks `q`, then wakes the reader if it sleeps and there is
    /// something to read.
    fn wake(&self, mut q: MutexGuard<'_, Queue<E>>) {
        let waker = if q.sleeping && !q.items.is_empty() {
            q.sleeping = false;
            q.waker.take()
        } else {
            None
        };
        drop(q);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Queues, waiting while a `Wait` subscription is full: `Ok(true)`
    /// queued, `Ok(false)` dropped by its policy, `Err` with the event when
    /// the subscription is (or gets) closed.
    pub(super) async fn send(&self, ev: Event<E>) -> Result<bool, Event<E>> {
        let mut ev = ev;
        loop {
            match self.offer(ev) {
                Offer::Queued => return Ok(true),
                Offer::Dropped => return Ok(false),
                Offer::Closed(back) => return Err(back),
                Offer::Full(back) => {
                    ev = back;
                    self.room().await;
                }
            }
        }
    }

    /// [`offer_many`](Self::offer_many), waiting for room until all of
    /// `evs` is queued (or dropped by the policy). Returns how many were
    /// queued; `Err` with that count when the subscription closes first,
    /// the rest left in `evs`.
    pub(super) async fn send_many(&self, evs: &mut VecDeque<Event<E>>) -> Result<usize, usize> {
        let mut queued = 0;
        loop {
            match self.offer_many(evs) {
                Ok(n) => queued += n,
                Err(()) => return Err(queued),
            }
            if evs.is_empty() {
                return Ok(queued);
            }
            self.room().await;
        }
    }

    /// Waits until a `Wait` emitter may try again: room, or closed.
    async fn room(&self) {
        let room = self.space.listen();
        if self.is_full() && !self.closed.load(Ordering::Acquire) {
            room.await;
        }
    }

    /// `n` events handed out by the reader: room for emitters.
    fn release(&self, n: usize) {
        self.len.fetch_sub(n, Ordering::AcqRel);
        self.space.notify_additional(n);
    }
}

/// The reading end of a subscription: its batch and its budget.
pub(super) struct Reader<E> {
    sub: Arc<Sub<E>>,
    batch: VecDeque<Event<E>>,
    /// Handed out but not yet taken off the subscription's count: the
    /// count is shared with the emitters, so it is lowered every
    /// [`RELEASE`] events (and whenever the batch runs out), not per event.
    unreleased: usize,
    budget: Budget,
}

/// See [`Reader::unreleased`].
const RELEASE: usize = 32;

impl<E> Reader<E> {
    pub(super) fn new(sub: Arc<Sub<E>>) -> Self {
        Reader {
            sub,
            batch: VecDeque::new(),
            unreleased: 0,
            budget: Budget::new(),
        }
    }

    /// The next event, or `Err(closed)` when none is queued.
    fn take(&mut self, cx: Option<&mut Context<'_>>) -> Result<Event<E>, bool> {
        let ev = match self.batch.pop_front() {
            Some(ev) => ev,
            None => {
                let sub = &*self.sub;
                let mut q = lock(&sub.queue);
                if q.items.is_empty() {
                    let closed = sub.closed.load(Ordering::Acquire);
                    if let (Some(cx), false) = (cx, closed) {
                        match &mut q.waker {
                            Some(w) => w.clone_from(cx.waker()),
                            w @ None => *w = Some(cx.waker().clone()),
                        }
                        q.sleeping = true;
                    }
                    return Err(closed);
                }
                if sub.overflow == Overflow::Wait {
                    std::mem::swap(&mut q.items, &mut self.batch);
                    drop(q);
                    self.batch
                        .pop_front()
                        .unwrap_or_else(|| unreachable!("swapped in a non-empty queue"))
                } else {
                    let ev = q.items.pop_front();
                    drop(q);
                    ev.unwrap_or_else(|| unreachable!("checked non-empty"))
                }
            }
        };
        self.unreleased += 1;
        // NOTE: a dropping policy reads the count to decide what to drop,
        // so it must be exact: released at once.
        if self.unreleased >= RELEASE
            || self.batch.is_empty()
            || self.sub.overflow != Overflow::Wait
        {
            self.sub.release(std::mem::take(&mut self.unreleased));
        }
        Ok(ev)
    }

    /// Events queued and not yet read.
    pub(super) fn len(&self) -> usize {
        self.sub.len() - self.unreleased
    }

    /// The next event if one is queued.
    pub(super) fn try_next(&mut self) -> Option<Event<E>> {
        self.take(None).ok()
    }

    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event<E>>> {
        // A reader that always finds an event queued yields now and then.
        if self.budget.poll_proceed(cx).is_pending() {
            return Poll::Pending;
        }
        match self.take(Some(cx)) {
            Ok(ev) => Poll::Ready(Some(ev)),
            Err(true) => Poll::Ready(None),
            Err(false) => {
                self.budget.reset();
                Poll::Pending
            }
        }
    }
}

impl<E> Stream for Reader<E> {
    type Item = Event<E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event<E>>> {
        self.get_mut().poll_read(cx)
    }
}

// Nothing in a reader is pinned: its events are only moved in and out.
impl<E> Unpin for Reader<E> {}

/// A stream of events from [`Bus::subscribe`].
///
/// # Drop behavior
///
/// Dropping it unsubscribes.
#[must_use = "streams do nothing unless polled"]
pub struct Subscriber<E: Clone + Send + 'static> {
    pub(super) bus: Bus<E>,
    pub(super) id: u64,
    pub(super) reader: Reader<E>,
}

impl<E: Clone + Send + 'static> Subscriber<E> {
    /// Events queued for this subscriber.
    pub fn len(&self) -> usize {
        self.reader.len()
    }

    /// Whether no event is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next event if one is queued.
    pub fn try_next(&mut self) -> Option<Event<E>> {
        self.reader.try_next()
    }
}

impl<E: Clone + Send + 'static> Stream for Subscriber<E> {
    type Item = Event<E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event<E>>> {
        self.get_mut().reader.poll_read(cx)
    }
}

impl<E: Clone + Send + 'static> Drop for Subscriber<E> {
    fn drop(&mut self) {
        self.bus.remove(self.id);
    }
}

impl<E: Clone + Send + 'static> fmt::Debug for Subscriber<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("id", &self.id)
            .field("queued", &self.len())
            .finish()
    }
}
