//! A subscription: its options, its queue with the overflow policy, and
//! the stream a subscriber reads.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use async_channel::{Receiver, Sender, TrySendError};
use futures_lite::Stream;

use super::bus::{Bus, Event, Overflow};
use super::topic::Pattern;
use crate::runtime::coop::Budget;

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
    pub(super) tx: Sender<Event<E>>,
    /// Kept to drop the oldest event.
    pub(super) rx: Receiver<Event<E>>,
    pub(super) delivered: AtomicU64,
    pub(super) dropped: AtomicU64,
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
    /// Queues without waiting.
    pub(super) fn offer(&self, ev: Event<E>) -> Offer<E> {
        let mut ev = ev;
        loop {
            match self.tx.try_send(ev) {
                Ok(()) => {
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                    return Offer::Queued;
                }
                Err(TrySendError::Closed(back)) => return Offer::Closed(back),
                Err(TrySendError::Full(back)) => match self.overflow {
                    Overflow::Wait => return Offer::Full(back),
                    Overflow::DropNewest => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        return Offer::Dropped;
                    }
                    Overflow::DropOldest => {
                        if self.rx.try_recv().is_ok() {
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        ev = back;
                    }
                },
            }
        }
    }
}

/// A stream of events from [`Bus::subscribe`].
///
/// # Drop behavior
///
/// Dropping it unsubscribes.
#[must_use = "streams do nothing unless polled"]
pub struct Subscriber<E: Clone + Send + 'static> {
    pub(super) bus: Bus<E>,
    pub(super) id: u64,
    pub(super) rx: Pin<Box<Receiver<Event<E>>>>,
    pub(super) budget: Budget,
}

impl<E: Clone + Send + 'static> Subscriber<E> {
    /// Events queued for this subscriber.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no event is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The next event if one is queued.
    pub fn try_next(&mut self) -> Option<Event<E>> {
        self.rx.try_recv().ok()
    }
}

impl<E: Clone + Send + 'static> Stream for Subscriber<E> {
    type Item = Event<E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event<E>>> {
        // A reader that always finds an event queued yields now and then.
        if self.budget.poll_proceed(cx).is_pending() {
            return Poll::Pending;
        }
        let next = self.rx.as_mut().poll_next(cx);
        if next.is_pending() {
            self.budget.reset();
        }
        next
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
            .field("queued", &self.rx.len())
            .finish()
    }
}
