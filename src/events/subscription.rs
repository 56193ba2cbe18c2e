//! A subscription: its options and the stream a subscriber reads.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::Stream;

use super::bus::{Bus, Event, Overflow};
use super::ring::{Group, Read, TopicCache};
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

/// The reading end of a subscription: its member slot in its group, its
/// batch and its budget.
pub(super) struct Reader<E: Clone> {
    group: Arc<Group<E>>,
    me: usize,
    batch: VecDeque<Event<E>>,
    topics: TopicCache,
    budget: Budget,
    left: bool,
}

impl<E: Clone> Reader<E> {
    pub(super) fn new(group: Arc<Group<E>>, me: usize) -> Self {
        Reader {
            group,
            me,
            batch: VecDeque::new(),
            topics: Default::default(),
            budget: Budget::new(),
            left: false,
        }
    }

    pub(super) fn group(&self) -> (&Arc<Group<E>>, usize) {
        (&self.group, self.me)
    }

    /// The next event: taken from the batch, else a new batch read from
    /// the ring.
    ///
    /// NOTE: returns the event or why there is none as two values, not a
    /// `Result<Event<E>, bool>`: that layout moved each event through the
    /// stack in two overlapping 8-byte halves, a store-forwarding stall on
    /// every event (84% of `poll_next`'s samples).
    #[inline]
    fn take(&mut self, cx: Option<&mut Context<'_>>) -> (Option<Event<E>>, bool) {
        if let Some(ev) = self.batch.pop_front() {
            return (Some(ev), false);
        }
        match self.group.read(
            self.me,
            &mut self.batch,
            &mut self.topics,
            cx.map(|cx| cx.waker()),
        ) {
            Read::Some => (self.batch.pop_front(), false),
            Read::Empty => (None, false),
            Read::End => (None, true),
        }
    }

    /// Events queued and not yet read.
    pub(super) fn len(&self) -> usize {
        self.batch.len() + self.group.len(self.me)
    }

    /// The next event if one is queued.
    pub(super) fn try_next(&mut self) -> Option<Event<E>> {
        self.take(None).0
    }

    #[inline]
    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event<E>>> {
        // A reader that always finds an event queued yields now and then.
        if self.budget.poll_proceed(cx).is_pending() {
            return Poll::Pending;
        }
        match self.take(Some(cx)) {
            (Some(ev), _) => Poll::Ready(Some(ev)),
            (None, true) => Poll::Ready(None),
            (None, false) => {
                self.budget.reset();
                Poll::Pending
            }
        }
    }
}

impl<E: Clone> Reader<E> {
    /// Reads no more: releases what it has not read (once).
    pub(super) fn leave(&mut self) {
        if !std::mem::replace(&mut self.left, true) {
            self.group.leave(self.me);
        }
    }
}

impl<E: Clone> Drop for Reader<E> {
    fn drop(&mut self) {
        self.leave();
    }
}

impl<E: Clone> Stream for Reader<E> {
    type Item = Event<E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event<E>>> {
        self.get_mut().poll_read(cx)
    }
}

// Nothing in a reader is pinned: its events are only moved in and out.
impl<E: Clone> Unpin for Reader<E> {}

/// A stream of events from [`Bus::subscribe`].
///
/// # Drop behavior
///
/// Dropping it unsubscribes.
#[must_use = "streams do nothing unless polled"]
pub struct Subscriber<E: Clone + Send + 'static> {
    pub(super) bus: Bus<E>,
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

    #[inline]
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event<E>>> {
        self.get_mut().reader.poll_read(cx)
    }
}

impl<E: Clone + Send + 'static> Drop for Subscriber<E> {
    fn drop(&mut self) {
        // Left first, so unlisting does not copy out what it never reads.
        self.reader.leave();
        let (group, me) = self.reader.group();
        self.bus.remove_member(group, me);
    }
}

impl<E: Clone + Send + 'static> fmt::Debug for Subscriber<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("queued", &self.len())
            .finish()
    }
}
