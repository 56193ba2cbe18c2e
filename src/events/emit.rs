//! The emitting side: [`Bus::emit`] and [`Publisher`], which offer an
//! event to each matching group while it takes it at once and wait (or
//! wake, or drop) only after.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::bus::{Bus, EmitError, Event, Route};
use super::topic::{TopicError, same_topic};
use crate::sync::lock_std as lock;

/// What is left of an emit after [`offer`]: group `at` of `route` did not
/// take `ev` at once; `rest` is the payload for the groups after it
/// (`None` when it was the last).
struct Rest<E> {
    topic: Arc<str>,
    route: Route<E>,
    at: usize,
    ev: Event<E>,
    rest: Option<E>,
    queued: usize,
}

/// What [`offer`] did. Sixteen bytes, so it comes back in registers: the
/// event a `DropOldest` group overwrote goes to the caller's `old` (to be
/// dropped once no lock is held, before any wait), and the rare paths are
/// boxed.
///
/// NOTE: it carried the overwritten `Option<Event>` and the `Rest` inline,
/// and each move of it (`push_quiet`'s result into it, it into the
/// `Result` of `offer_locked`) copied the event in 16-byte loads of what
/// had just been stored in 8-byte halves: perf put 40% of the
/// one-subscriber `emit`'s samples in its loop on three such
/// store-forwarding stalls.
enum Offered<E> {
    /// Every matching group took the event: the copies queued.
    Done(usize),
    /// A group would have waited, woken a reader or dropped.
    Rest(Box<Rest<E>>),
    /// The topic was refused (`offer_locked` only).
    Refused(Box<EmitError<E>>),
}

/// Offers `payload` on `topic` to the groups of `route` in order while
/// each takes it at once (see `Group::push_quiet`: nothing is woken or
/// dropped inside, so it may run under the bus's lock). An event a
/// `DropOldest` group overwrote is left in `old`.
#[inline]
fn offer<E: Clone>(
    route: &Route<E>,
    topic: &Arc<str>,
    payload: E,
    old: &mut Option<Event<E>>,
) -> Offered<E> {
    // One group, the common case: no payload clones to decide on.
    if let [group] = &**route {
        return match group.push_quiet(topic.clone(), payload, true, old) {
            Ok(queued) => Offered::Done(queued),
            Err(ev) => rest(route, topic, 0, ev, None, 0),
        };
    }
    offer_many(route, topic, payload, old)
}

/// The rest of an emit from group `at` on, boxed (out of line: the
/// common path stays small).
#[cold]
#[inline(never)]
fn rest<E>(
    route: &Route<E>,
    topic: &Arc<str>,
    at: usize,
    ev: Event<E>,
    rest: Option<E>,
    queued: usize,
) -> Offered<E> {
    Offered::Rest(Box::new(Rest {
        topic: topic.clone(),
        route: route.clone(),
        at,
        ev,
        rest,
        queued,
    }))
}

/// [`offer`] to a route of several groups (or none).
fn offer_many<E: Clone>(
    route: &Route<E>,
    topic: &Arc<str>,
    payload: E,
    old: &mut Option<Event<E>>,
) -> Offered<E> {
    let mut queued = 0;
    let mut payload = Some(payload);
    for (at, group) in route.iter().enumerate() {
        // The last match takes the payload itself: one clone fewer.
        let p = if at + 1 == route.len() {
            payload.take()
        } else {
            payload.clone()
        };
        let Some(p) = p else { break };
        // One overwritten event is carried out; a second `DropOldest`
        // group to overwrite goes the slow way.
        let overwrite = old.is_none();
        match group.push_quiet(topic.clone(), p, overwrite, old) {
            Ok(q) => queued += q,
            Err(ev) => return rest(route, topic, at, ev, payload, queued),
        }
    }
    Offered::Done(queued)
}

/// The rest of an emit after [`offer`]: group `at` waits for room (or is
/// closed), then the groups after it in turn.
async fn finish<E: Clone + Send + 'static>(rest: Box<Rest<E>>) -> Result<usize, EmitError<E>> {
    let Rest {
        topic,
        route,
        at,
        ev,
        rest,
        queued: mut n,
    } = *rest;
    match route[at].send(ev).await {
        Ok(queued) => n += queued,
        // Closed (a shutdown) with nothing queued: hand it back.
        Err(ev) if rest.is_none() && n == 0 => return Err(EmitError::Closed(ev.payload)),
        Err(_) => {}
    }
    let Some(payload) = rest else {
        return Ok(n);
    };
    let mut matched = route[at + 1..].iter().peekable();
    while let Some(group) = matched.next() {
        // The last match takes the payload itself: one clone fewer.
        if matched.peek().is_some() {
            let ev = Event {
                topic: topic.clone(),
                payload: payload.clone(),
            };
            n += group.send(ev).await.unwrap_or(0);
            continue;
        }
        return match group.send(Event { topic, payload }).await {
            Ok(queued) => Ok(n + queued),
            // Closed (a shutdown) with nothing queued: hand it back.
            Err(ev) if n == 0 => Err(EmitError::Closed(ev.payload)),
            Err(_) => Ok(n),
        };
    }
    Ok(n)
}

impl<E: Clone + Send + 'static> Bus<E> {
    /// Emits `payload` on `topic`, waiting while a matching
    /// [`Overflow::Wait`](super::Overflow::Wait) subscription is full.
    /// Returns exactly the number of subscriptions that queued it: a copy
    /// a `DropNewest` subscription drops is counted in its `dropped`, not
    /// here. For many events on one topic, a [`Publisher`] skips the
    /// look-up.
    ///
    /// # Errors
    ///
    /// [`EmitError::Topic`] for a malformed topic (empty, an empty
    /// segment, or a wildcard), [`EmitError::Closed`] after
    /// [`shutdown`](Bus::shutdown), or when a shutdown during the wait
    /// left no subscription that queued it. The payload is handed back.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it waits leaves the event queued for the
    /// subscriptions reached so far and not for the rest.
    pub async fn emit(&self, topic: &str, payload: E) -> Result<usize, EmitError<E>> {
        if self.is_closed() {
            return Err(EmitError::Closed(payload));
        }
        // NOTE: retained before the route is looked up, so a subscription
        // added in between replays this value (or an older one first) and
        // never gets an older value after a newer one.
        if let Err(e) = self.retain(topic, &payload) {
            return Err(EmitError::Topic(e, payload));
        }
        // NOTE: matched here, not in a shared `async fn`: a future made of
        // the whole `Offered` per event was a 1 KiB `memcpy` (14% of the
        // one-subscriber instructions).
        let mut old = None;
        let offered = self.offer_locked(topic, payload, &mut old);
        drop(old);
        match offered {
            Offered::Done(queued) => Ok(queued),
            Offered::Rest(rest) => finish(rest).await,
            Offered::Refused(e) => Err(*e),
        }
    }

    /// [`offer`] under the bus's lock, the route read where it is kept.
    ///
    /// NOTE: cloning the route for each emit and counting it in an atomic
    /// were three atomic operations per event, and the `send` future one
    /// more state machine: without them the one-subscriber fan-out
    /// (`benches/bus_count.rs`, 5 x 100k events) went from 63-72 to 50-60 ms
    /// on one `Runtime` worker and from 98-104 to 74-75 ms on smol's
    /// executor.
    #[inline]
    fn offer_locked(&self, topic: &str, payload: E, old: &mut Option<Event<E>>) -> Offered<E> {
        let mut subs = lock(&self.inner.subs);
        let subs = &mut *subs;
        let hit = matches!(&subs.last, Some((name, _)) if same_topic(name, topic));
        if !hit && let Err(e) = subs.lookup(topic) {
            return Offered::Refused(Box::new(EmitError::Topic(e, payload)));
        }
        subs.emitted += 1;
        match &subs.last {
            Some((name, route)) => offer(route, name, payload, old),
            // NOTE: `lookup` has just put the route here.
            None => Offered::Done(0),
        }
    }

    /// A [`Publisher`] for `topic`: [`emit`](Bus::emit) on one topic, the
    /// topic checked and its subscriptions looked up here, not per event.
    ///
    /// ```
    /// use futures_lite::StreamExt;
    /// use smolkit::events::Bus;
    ///
    /// smol::block_on(async {
    ///     let bus = Bus::<u32>::new();
    ///     let mut eu = bus.subscribe("orders.eu.*").unwrap();
    ///     let mut created = bus.publisher("orders.eu.created").unwrap();
    ///     assert_eq!(created.publish(7).await.unwrap(), 1);
    ///     let ev = eu.next().await.unwrap();
    ///     assert_eq!((&*ev.topic, ev.payload), ("orders.eu.created", 7));
    /// });
    /// ```
    ///
    /// # Errors
    ///
    /// [`TopicError`] for a malformed topic (empty, an empty segment, or a
    /// wildcard), naming it.
    pub fn publisher(&self, topic: &str) -> Result<Publisher<E>, TopicError> {
        let mut subs = lock(&self.inner.subs);
        // Read under the lock that changes it: the route below is current
        // for this generation.
        let generation = self.inner.generation.load(Ordering::Acquire);
        let (name, route) = subs.lookup(topic)?;
        let (topic, route) = (name.clone(), route.clone());
        drop(subs);
        let emitted = Arc::new(AtomicU64::new(0));
        lock(&self.inner.publishers).push(emitted.clone());
        Ok(Publisher {
            bus: self.clone(),
            topic,
            route,
            generation,
            emitted,
        })
    }
}

/// The emitting end of one topic, from [`Bus::publisher`].
///
/// [`publish`](Publisher::publish) is [`Bus::emit`] without the per-event
/// look-up: the topic was checked once, and the subscriptions it reaches
/// are looked up again only when subscriptions have come or gone since.
/// It counts in [`BusStats::emitted`](super::BusStats::emitted) as `emit`
/// does.
pub struct Publisher<E: Clone + Send + 'static> {
    bus: Bus<E>,
    topic: Arc<str>,
    route: Route<E>,
    /// The bus's generation `route` was looked up at.
    generation: u64,
    /// Events published: written by this publisher alone (a load and a
    /// store, no atomic read-modify-write), read by the bus's stats.
    emitted: Arc<AtomicU64>,
}

impl<E: Clone + Send + 'static> Publisher<E> {
    /// The topic it publishes on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Emits `payload` on the publisher's topic: what
    /// [`Bus::emit`] does, with the same result.
    ///
    /// # Errors
    ///
    /// [`EmitError::Closed`] after [`shutdown`](Bus::shutdown), or when a
    /// shutdown during the wait left no subscription that queued it. The
    /// payload is handed back.
    ///
    /// # Cancel safety
    ///
    /// As [`Bus::emit`]'s.
    pub async fn publish(&mut self, payload: E) -> Result<usize, EmitError<E>> {
        let bus = &self.bus;
        if bus.is_closed() {
            return Err(EmitError::Closed(payload));
        }
        // NOTE: retained before the generation is read, as `emit` retains
        // before it looks the route up (a subscription made in between
        // bumps the generation while the retained map is locked).
        if let Err(e) = bus.retain(&self.topic, &payload) {
            return Err(EmitError::Topic(e, payload));
        }
        if bus.inner.generation.load(Ordering::Acquire) != self.generation {
            let mut subs = lock(&bus.inner.subs);
            self.generation = bus.inner.generation.load(Ordering::Acquire);
            if let Ok((_, route)) = subs.lookup(&self.topic) {
                self.route = route.clone();
            }
        }
        let n = self.emitted.load(Ordering::Relaxed);
        self.emitted.store(n + 1, Ordering::Relaxed);
        let mut old = None;
        let offered = offer(&self.route, &self.topic, payload, &mut old);
        drop(old);
        match offered {
            Offered::Done(queued) => Ok(queued),
            Offered::Rest(rest) => finish(rest).await,
            Offered::Refused(e) => Err(*e),
        }
    }
}

impl<E: Clone + Send + 'static> Drop for Publisher<E> {
    fn drop(&mut self) {
        // Its count moves to the bus's under the lock the stats read it
        // under, so it is counted once, never twice or not at all.
        let mut publishers = lock(&self.bus.inner.publishers);
        publishers.retain(|c| !Arc::ptr_eq(c, &self.emitted));
        self.bus
            .inner
            .emitted
            .fetch_add(self.emitted.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl<E: Clone + Send + 'static> fmt::Debug for Publisher<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("subscriptions", &self.route.len())
            .finish()
    }
}
