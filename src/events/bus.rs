use std::collections::{HashMap, VecDeque};
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_channel::{Receiver, Sender, TrySendError};
use futures_lite::{FutureExt, StreamExt};

use super::ring::{Gone, Group, MemberStats, Push};
use super::subscription::{Reader, SubscribeOptions, Subscriber};
use super::topic::{Pattern, TopicError, same_topic, validate_topic};
use crate::ConfigError;
use crate::limit::Semaphore;
use crate::runtime::{JoinHandle, Spawn, SpawnExt, default_spawner, panic_message};
use crate::sync::lock_std as lock;

/// One event: its topic and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<E> {
    /// The topic it was emitted on.
    pub topic: Arc<str>,
    /// The payload.
    pub payload: E,
}

/// What a subscription does when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// The emitter waits ([`Bus::emit`]) for room: backpressure, nothing
    /// lost.
    #[default]
    Wait,
    /// The oldest queued event is dropped (counted) to make room.
    DropOldest,
    /// The new event is dropped (counted).
    DropNewest,
}

/// A handler call that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerFailure {
    /// The handler's name.
    pub handler: String,
    /// The event's topic.
    pub topic: Arc<str>,
    /// The error or panic message.
    pub error: String,
    /// Whether it panicked.
    pub panicked: bool,
}

/// Names a handler for [`Bus::off`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId(u64);

/// [`Bus::emit`] failed; the payload is handed back.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmitError<E> {
    /// The topic is not well formed.
    Topic(TopicError, E),
    /// The bus was shut down.
    Closed(E),
}

/// [`Bus::try_emit`] failed; the payload is handed back.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TryEmitError<E> {
    /// The topic is not well formed.
    Topic(TopicError, E),
    /// The bus was shut down.
    Closed(E),
    /// A subscription with [`Overflow::Wait`] is full; nothing was
    /// delivered.
    Full(E),
}

macro_rules! emit_error_impls {
    ($ty:ident { $($var:ident),* }) => {
        impl<E> $ty<E> {
            /// The payload that was not emitted.
            pub fn into_inner(self) -> E {
                match self {
                    $ty::Topic(_, e) $(| $ty::$var(e))* => e}
            }
        }

        impl<E> fmt::Debug for $ty<E> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $ty::Topic(t, _) => f.debug_tuple("Topic").field(t).finish_non_exhaustive(),
                    $($ty::$var(_) => f.write_str(concat!(stringify!($var), "(..)")),)*
                }
            }
        }

        impl<E> fmt::Display for $ty<E> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $ty::Topic(t, _) => t.fmt(f),
                    $($ty::$var(_) => f.write_str(emit_error_impls!(@msg $var)),)*
                }
            }
        }

        impl<E> Error for $ty<E> {}
    };
    (@msg Closed) => { "event bus is shut down" };
    (@msg Full) => { "a subscriber's queue is full" };
}

emit_error_impls!(EmitError { Closed });
emit_error_impls!(TryEmitError { Closed, Full });

/// Counters of the whole bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BusStats {
    /// Events emitted.
    pub emitted: u64,
    /// Copies queued for subscriptions.
    pub delivered: u64,
    /// Copies dropped by overflow policies.
    pub dropped: u64,
    /// Handler calls that failed or panicked.
    pub handler_failures: u64,
    /// Subscriptions (streams and handlers).
    pub subscribers: usize,
}

/// Counters of one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriberStats {
    /// Its name.
    pub name: String,
    /// Its pattern.
    pub pattern: String,
    /// Events waiting in its queue. A reader takes up to 32 events at a
    /// time out of the queue into its own batch, which this count leaves
    /// out: while it reads it may show up to 32 fewer than
    /// [`Subscriber::len`](super::Subscriber::len).
    pub queued: usize,
    /// Events queued for it in total.
    pub delivered: u64,
    /// Events its overflow policy dropped.
    pub dropped: u64,
}

/// The subscription groups matching one topic.
pub(super) type Route<E> = Arc<[Arc<Group<E>>]>;

/// Topics remembered in the route cache before it starts over.
const ROUTES: usize = 4096;

pub(super) struct Subs<E> {
    /// The groups with a listed member (see `ring`: subscriptions with
    /// the same pattern, capacity and policy share one).
    list: Arc<Vec<Arc<Group<E>>>>,
    /// NOTE: matching every pattern on every emit costs more than the
    /// delivery itself; the matches of each topic seen are cached here
    /// and the cache is cleared whenever a subscription comes or goes
    /// (under this same lock, so no emit can store a stale route).
    routes: HashMap<Arc<str>, Route<E>>,
    /// The topic emitted last and its route, looked at before `routes`.
    ///
    /// NOTE: hashing the topic (SipHash) was 13% of the one-subscriber
    /// fan-out's samples (perf); an emitter repeating a topic now pays a
    /// string compare.
    pub(super) last: Option<(Arc<str>, Route<E>)>,
    /// Events [`Bus::emit`] took (the other emits count in
    /// `Inner::emitted`): counted under this lock, which it holds anyway.
    pub(super) emitted: u64,
}

impl<E> Subs<E> {
    /// Forgets every route: a subscription came or went.
    fn clear_routes(&mut self) {
        self.routes.clear();
        self.last = None;
    }

    /// `topic`'s shared name and route (the topic validated on first
    /// sight), kept as the last one looked up.
    pub(super) fn lookup(&mut self, topic: &str) -> Result<&(Arc<str>, Route<E>), TopicError> {
        let entry = match self.last.take() {
            Some(last) if same_topic(&last.0, topic) => last,
            _ => match self.routes.get_key_value(topic) {
                Some((name, route)) => (name.clone(), route.clone()),
                None => {
                    validate_topic(topic)?;
                    let name: Arc<str> = topic.into();
                    let route: Route<E> = self
                        .list
                        .iter()
                        .filter(|sub| sub.pattern.matches(topic))
                        .cloned()
                        .collect();
                    if self.routes.len() >= ROUTES {
                        self.routes.clear();
                    }
                    self.routes.insert(name.clone(), route.clone());
                    (name, route)
                }
            },
        };
        Ok(self.last.insert(entry))
    }
}

pub(super) struct Inner<E> {
    pub(super) subs: Mutex<Subs<E>>,
    retained: Option<Mutex<HashMap<Arc<str>, E>>>,
    capacity: usize,
    closed: AtomicBool,
    spawner: Arc<dyn Spawn>,
    errors_tx: Sender<HandlerFailure>,
    errors_rx: Receiver<HandlerFailure>,
    dispatchers: Mutex<Vec<(u64, JoinHandle<()>)>>,
    next_id: AtomicU64,
    pub(super) emitted: AtomicU64,
    /// Bumped (under `subs`) whenever the list of groups changes: a
    /// [`Publisher`]'s route is current while this has not moved.
    pub(super) generation: AtomicU64,
    /// The emit counts of live publishers (each written by its publisher
    /// alone); a dropped one adds its count to `emitted`.
    pub(super) publishers: Mutex<Vec<Arc<AtomicU64>>>,
    gone: Arc<Gone>,
    failures: AtomicU64,
}

/// An event bus; see the [module docs](super). Cheap to clone (clones
/// share the bus).
///
/// # Examples
///
/// ```
/// use futures_lite::StreamExt;
/// use smolkit::events::Bus;
///
/// smol::block_on(async {
///     let bus = Bus::<u32>::new();
///     let mut eu = bus.subscribe("orders.eu.*").unwrap();
///     let mut all = bus.subscribe("orders.#").unwrap();
///     bus.emit("orders.eu.created", 1).await.unwrap();
///     bus.emit("orders.us.created", 2).await.unwrap();
///     assert_eq!(eu.next().await.unwrap().payload, 1);
///     assert_eq!(all.next().await.unwrap().payload, 1);
///     assert_eq!(all.next().await.unwrap().payload, 2);
///     assert_eq!(bus.stats().delivered, 3);
/// });
/// ```
pub struct Bus<E> {
    pub(super) inner: Arc<Inner<E>>,
}

impl<E> Clone for Bus<E> {
    fn clone(&self) -> Self {
        Bus {
            inner: self.inner.clone(),
        }
    }
}

/// Builds a [`Bus`].
///
/// # Default
///
/// 1024 events queued per subscription, no retained values, handlers on
/// the default spawner (the current `Runtime`, else smol's global executor), 1024 handler failures kept for
/// [`Bus::errors`] (the oldest dropped beyond that).
pub struct BusBuilder<E> {
    capacity: usize,
    retain: bool,
    spawner: Arc<dyn Spawn>,
    errors: usize,
    _payload: PhantomData<fn() -> E>,
}

impl<E> fmt::Debug for BusBuilder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusBuilder")
            .field("capacity", &self.capacity)
            .field("retain", &self.retain)
            .field("errors", &self.errors)
            .finish()
    }
}

impl<E: Clone + Send + 'static> BusBuilder<E> {
    /// Default queue size of a subscription. Zero is refused by
    /// [`build`](Self::build).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Keeps the last payload of every topic and replays the matching ones
    /// to each new subscription, before any live event and in no
    /// particular topic order. A replay larger than the subscription's
    /// queue drops the rest (counted in its `dropped`).
    pub fn with_retained(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// Where handlers run.
    pub fn with_spawner(mut self, spawner: impl Spawn + 'static) -> Self {
        self.spawner = Arc::new(spawner);
        self
    }

    /// Handler failures kept for [`Bus::errors`]. Zero is refused by
    /// [`build`](Self::build).
    pub fn with_error_capacity(mut self, n: usize) -> Self {
        self.errors = n;
        self
    }

    /// The bus.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `capacity` or `error_capacity` when zero.
    pub fn build(self) -> Result<Bus<E>, ConfigError> {
        ConfigError::nonzero("capacity", self.capacity)?;
        ConfigError::nonzero("error_capacity", self.errors)?;
        let (errors_tx, errors_rx) = async_channel::bounded(self.errors);
        Ok(Bus {
            inner: Arc::new(Inner {
                subs: Mutex::new(Subs {
                    list: Arc::new(Vec::new()),
                    routes: HashMap::new(),
                    last: None,
                    emitted: 0,
                }),
                retained: self.retain.then(|| Mutex::new(HashMap::new())),
                capacity: self.capacity,
                closed: AtomicBool::new(false),
                spawner: self.spawner,
                errors_tx,
                errors_rx,
                dispatchers: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(0),
                emitted: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                publishers: Mutex::new(Vec::new()),
                gone: Arc::default(),
                failures: AtomicU64::new(0),
            }),
        })
    }
}

impl<E: Clone + Send + 'static> Default for Bus<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: Clone + Send + 'static> Bus<E> {
    /// A bus with the defaults (see [`BusBuilder`]).
    pub fn new() -> Self {
        Self::builder()
            .build()
            .unwrap_or_else(|e| unreachable!("the defaults are valid: {e}"))
    }

    /// A builder.
    pub fn builder() -> BusBuilder<E> {
        BusBuilder {
            capacity: 1024,
            retain: false,
            spawner: default_spawner(),
            errors: 1024,
            _payload: PhantomData,
        }
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Group<E>>>> {
        lock(&self.inner.subs).list.clone()
    }

    /// The subscriptions matching `topic` (validated on first sight),
    /// and the shared topic name.
    fn route(&self, topic: &str) -> Result<(Arc<str>, Route<E>), TopicError> {
        let mut subs = lock(&self.inner.subs);
        let (name, route) = subs.lookup(topic)?;
        Ok((name.clone(), route.clone()))
    }

    /// Records `payload` as `topic`'s last value (a retaining bus only).
    #[inline]
    pub(super) fn retain(&self, topic: &str, payload: &E) -> Result<(), TopicError> {
        match &self.inner.retained {
            Some(map) => Self::keep(map, topic, payload),
            None => Ok(()),
        }
    }

    /// [`retain`](Self::retain) on a retaining bus (out of line, so the
    /// check above is all an emit on any other bus pays).
    fn keep(map: &Mutex<HashMap<Arc<str>, E>>, topic: &str, payload: &E) -> Result<(), TopicError> {
        validate_topic(topic)?;
        lock(map).insert(Arc::from(topic), payload.clone());
        Ok(())
    }

    /// Emits every payload of `payloads` on `topic`, in order: what
    /// [`emit`](Self::emit) does for each, with one lock and at most one
    /// wake-up per subscription for the whole batch (and one route look-up),
    /// waiting while a matching [`Overflow::Wait`] subscription is full.
    /// Returns the number of copies queued over all subscriptions.
    ///
    /// ```
    /// use futures_lite::StreamExt;
    /// use smolkit::events::Bus;
    ///
    /// smol::block_on(async {
    ///     let bus = Bus::<u32>::new();
    ///     let mut a = bus.subscribe("ticks").unwrap();
    ///     let mut b = bus.subscribe("#").unwrap();
    ///     assert_eq!(bus.emit_many("ticks", [1, 2, 3]).await.unwrap(), 6);
    ///     for want in [1, 2, 3] {
    ///         assert_eq!(a.next().await.unwrap().payload, want);
    ///     }
    ///     assert_eq!(b.next().await.unwrap().payload, 1);
    /// });
    /// ```
    ///
    /// # Errors
    ///
    /// [`EmitError::Topic`] for a malformed topic, [`EmitError::Closed`]
    /// after [`shutdown`](Bus::shutdown) or when a shutdown during the wait
    /// left no subscription that queued any of them; both hand the payloads
    /// back.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it waits leaves the batch queued, whole or
    /// in part, for the subscriptions reached so far and not for the rest.
    pub async fn emit_many<I>(&self, topic: &str, payloads: I) -> Result<usize, EmitError<Vec<E>>>
    where
        I: IntoIterator<Item = E>,
    {
        let payloads: Vec<E> = payloads.into_iter().collect();
        if self.is_closed() {
            return Err(EmitError::Closed(payloads));
        }
        if let Some(last) = payloads.last()
            && let Err(e) = self.retain(topic, last)
        {
            return Err(EmitError::Topic(e, payloads));
        }
        let (topic, route) = match self.route(topic) {
            Ok(r) => r,
            Err(e) => return Err(EmitError::Topic(e, payloads)),
        };
        self.inner
            .emitted
            .fetch_add(payloads.len() as u64, Ordering::Relaxed);
        let mut n = 0;
        let mut payloads = Some(payloads);
        let mut matched = route.iter().peekable();
        while let Some(group) = matched.next() {
            // The last match takes the payloads themselves.
            let batch = if matched.peek().is_some() {
                payloads.clone().unwrap_or_default()
            } else {
                payloads.take().unwrap_or_default()
            };
            let mut evs: VecDeque<Event<E>> = batch
                .into_iter()
                .map(|payload| Event {
                    topic: topic.clone(),
                    payload,
                })
                .collect();
            match group.send_many(&mut evs).await {
                Ok(q) => n += q,
                // Closed (a shutdown) with nothing queued: hand back what
                // the last one did not take.
                Err(0) if n == 0 && matched.peek().is_none() => {
                    return Err(EmitError::Closed(
                        evs.into_iter().map(|e| e.payload).collect(),
                    ));
                }
                Err(q) => n += q,
            }
        }
        Ok(n)
    }

    /// Emits without waiting. If a matching [`Overflow::Wait`]
    /// subscription is full, nothing is delivered and the payload comes
    /// back in [`TryEmitError::Full`]. (Two emitters racing for the last
    /// slot: the loser's copy for that subscription is dropped and
    /// counted.)
    ///
    /// # Errors
    ///
    /// [`TryEmitError`], with the payload.
    pub fn try_emit(&self, topic: &str, payload: E) -> Result<usize, TryEmitError<E>> {
        if self.is_closed() {
            return Err(TryEmitError::Closed(payload));
        }
        let (topic, matched) = match self.route(topic) {
            Ok(r) => r,
            Err(e) => return Err(TryEmitError::Topic(e, payload)),
        };
        if matched
            .iter()
            .any(|g| g.overflow == Overflow::Wait && g.is_full())
        {
            return Err(TryEmitError::Full(payload));
        }
        if self.inner.retained.is_some() {
            // As in `emit`: retained before the route that delivers is read.
            if let Err(e) = self.retain(&topic, &payload) {
                return Err(TryEmitError::Topic(e, payload));
            }
        }
        let matched = if self.inner.retained.is_some() {
            match self.route(&topic) {
                Ok((_, m)) => m,
                Err(e) => return Err(TryEmitError::Topic(e, payload)),
            }
        } else {
            matched
        };
        self.inner.emitted.fetch_add(1, Ordering::Relaxed);
        let mut n = 0;
        for group in matched.iter() {
            let ev = Event {
                topic: topic.clone(),
                payload: payload.clone(),
            };
            match group.push(ev) {
                Push::Queued(q) => n += q,
                Push::Dropped | Push::Closed(_) => {}
                Push::Full(_) => group.count_lost(),
            }
        }
        Ok(n)
    }

    /// A new member of the group for `opts` (joined, or made), with the
    /// matching retained values to replay: the group, the member's slot
    /// and its id.
    fn add(
        &self,
        pattern: &str,
        opts: &SubscribeOptions,
    ) -> Result<(Arc<Group<E>>, usize, u64), ConfigError> {
        let parsed = Pattern::parse(pattern)?;
        if let Some(c) = opts.capacity {
            ConfigError::nonzero("capacity", c)?;
        }
        ConfigError::nonzero("concurrency", opts.concurrency)?;
        let capacity = opts.capacity.unwrap_or(self.inner.capacity);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // NOTE: with retained values, the subscription becomes visible to
        // emitters and gets its replay while the retained map is locked. An
        // emitter records its value there before it looks up its route, so
        // the replay holds everything retained before, and anything retained
        // after reaches the subscription live, after the replay: a topic's
        // values are never seen out of emit order.
        let retained = self.inner.retained.as_ref().map(lock);
        let replay: Vec<Event<E>> = retained.as_ref().map_or_else(Vec::new, |r| {
            r.iter()
                .filter(|(t, _)| parsed.matches(t))
                .map(|(t, p)| Event {
                    topic: t.clone(),
                    payload: p.clone(),
                })
                .collect()
        });
        let mut subs = lock(&self.inner.subs);
        let shared = subs
            .list
            .iter()
            .find(|g| g.shares(pattern, opts.overflow, capacity))
            .cloned();
        let group = shared.unwrap_or_else(|| {
            Arc::new(Group::new(
                parsed,
                opts.overflow,
                capacity,
                self.inner.gone.clone(),
            ))
        });
        let me = group.join(id, opts.name.clone(), replay);
        if self.inner.closed.load(Ordering::Acquire) {
            // Shut down: it ends at once and is not listed.
            group.close_member(me, true);
        } else if !subs.list.iter().any(|g| Arc::ptr_eq(g, &group)) {
            let mut next = Vec::with_capacity(subs.list.len() + 1);
            next.extend(subs.list.iter().cloned());
            next.push(group.clone());
            subs.list = Arc::new(next);
            subs.clear_routes();
            self.inner.generation.fetch_add(1, Ordering::Release);
        }
        drop(subs);
        drop(retained);
        Ok((group, me, id))
    }

    /// Unlists member `me` of `group` (its reader still gets what was
    /// queued for it); a group with no member left stops being routed to.
    pub(super) fn remove_member(&self, group: &Arc<Group<E>>, me: usize) {
        let mut subs = lock(&self.inner.subs);
        if group.close_member(me, true) == 0 {
            let next: Vec<_> = subs
                .list
                .iter()
                .filter(|g| !Arc::ptr_eq(g, group))
                .cloned()
                .collect();
            if next.len() != subs.list.len() {
                subs.list = Arc::new(next);
                subs.clear_routes();
                self.inner.generation.fetch_add(1, Ordering::Release);
            }
        }
    }

    /// Unlists the member with `id`; whether it was listed.
    fn remove(&self, id: u64) -> bool {
        let found = self
            .snapshot()
            .iter()
            .find_map(|g| g.find(id).map(|me| (g.clone(), me)));
        match found {
            Some((group, me)) => {
                self.remove_member(&group, me);
                true
            }
            None => false,
        }
    }

    /// A stream of the events matching `pattern`, with the defaults.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `pattern` for a malformed pattern.
    pub fn subscribe(&self, pattern: &str) -> Result<Subscriber<E>, ConfigError> {
        self.subscribe_with(pattern, SubscribeOptions::new())
    }

    /// A stream of the events matching `pattern`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `pattern` for a malformed pattern, or
    /// `capacity`/`concurrency` for a zero in the options.
    pub fn subscribe_with(
        &self,
        pattern: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscriber<E>, ConfigError> {
        let (group, me, _) = self.add(pattern, &opts)?;
        Ok(Subscriber {
            bus: self.clone(),
            reader: Reader::new(group, me),
        })
    }

    /// Runs `handler` for every event matching `pattern`, one call at a
    /// time, with the defaults.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `pattern` for a malformed pattern, or
    /// `capacity`/`concurrency` for a zero in the options.
    pub fn on<F, Fut, HE>(&self, pattern: &str, handler: F) -> Result<HandlerId, ConfigError>
    where
        F: Fn(Event<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HE>> + Send + 'static,
        HE: fmt::Display + 'static,
    {
        self.on_with(pattern, SubscribeOptions::new().with_name(pattern), handler)
    }

    /// Runs `handler` for every event matching `pattern`, up to
    /// `opts`' concurrency at once, on the bus's spawner. A handler that
    /// returns `Err` or panics is reported on [`errors`](Bus::errors) and
    /// in a `tracing` error; the next event is handled as usual.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `pattern` for a malformed pattern, or
    /// `capacity`/`concurrency` for a zero in the options.
    pub fn on_with<F, Fut, HE>(
        &self,
        pattern: &str,
        opts: SubscribeOptions,
        handler: F,
    ) -> Result<HandlerId, ConfigError>
    where
        F: Fn(Event<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HE>> + Send + 'static,
        HE: fmt::Display + 'static,
    {
        let (group, me, id) = self.add(pattern, &opts)?;
        let mut events = Reader::new(group, me);
        let name: Arc<str> = opts.name.into();
        let handler = Arc::new(handler);
        let inner = self.inner.clone();
        let limit = opts.concurrency;
        let spawner = self.inner.spawner.clone();
        let task = self.inner.spawner.spawn(async move {
            let slots = Arc::new(Semaphore::new(limit));
            // NOTE: the reader yields after a budget of ready events.
            while let Some(ev) = events.next().await {
                let call = run_handler(inner.clone(), name.clone(), handler.clone(), ev);
                if limit == 1 {
                    call.await;
                } else if let Ok(slot) = slots.acquire_arc().await {
                    spawner
                        .spawn(async move {
                            call.await;
                            drop(slot);
                        })
                        .detach();
                }
            }
            // Drained: wait for the calls still running.
            let _ = slots.acquire_many(limit).await;
        });
        lock(&self.inner.dispatchers).push((id, task));
        Ok(HandlerId(id))
    }

    /// Removes a handler; events already queued for it are still handled.
    /// Returns whether it was there.
    pub fn off(&self, id: HandlerId) -> bool {
        if !self.remove(id.0) {
            return false;
        }
        // The dispatcher ends once its queue is drained.
        let mut d = lock(&self.inner.dispatchers);
        if let Some(i) = d.iter().position(|(h, _)| *h == id.0) {
            d.swap_remove(i).1.detach();
        }
        true
    }

    /// Handler failures, oldest first, as a stream. Every call returns a
    /// receiver of the same queue: a failure goes to one of them.
    pub fn errors(&self) -> Receiver<HandlerFailure> {
        self.inner.errors_rx.clone()
    }

    /// Stops accepting events and waits until every handler has handled
    /// what was emitted before. Stream subscribers get the events queued
    /// for them and then the end of the stream.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops waiting only: the bus is already closed to
    /// new emits, and what was emitted is still delivered.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        for group in self.snapshot().iter() {
            group.close_all();
        }
        let tasks: Vec<_> = std::mem::take(&mut *lock(&self.inner.dispatchers));
        for (_, task) in tasks {
            let _ = task.await;
        }
    }

    /// Whether [`shutdown`](Bus::shutdown) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Counters of every listed member, oldest subscription first, with
    /// their patterns.
    fn members(&self) -> Vec<(MemberStats, Arc<Group<E>>)> {
        let mut out = Vec::new();
        let mut all = Vec::new();
        for g in self.snapshot().iter() {
            g.stats(&mut out);
            all.extend(out.drain(..).map(|m| (m, g.clone())));
        }
        all.sort_by_key(|(m, _)| m.id);
        all
    }

    /// Events emitted: by `emit` (counted under the bus's lock), by live
    /// publishers, and by the rest and dropped publishers.
    fn emitted(&self) -> u64 {
        let publishers = lock(&self.inner.publishers);
        let live: u64 = publishers.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        // Read under the publishers' lock: a dropped publisher moves its
        // count under it.
        let rest = self.inner.emitted.load(Ordering::Relaxed);
        drop(publishers);
        live + rest + lock(&self.inner.subs).emitted
    }

    /// Counters of the bus. Never waits on a subscriber.
    pub fn stats(&self) -> BusStats {
        let members = self.members();
        let gone = &self.inner.gone;
        BusStats {
            emitted: self.emitted(),
            delivered: gone.delivered.load(Ordering::Relaxed)
                + members.iter().map(|(m, _)| m.delivered).sum::<u64>(),
            dropped: gone.dropped.load(Ordering::Relaxed)
                + members.iter().map(|(m, _)| m.dropped).sum::<u64>(),
            handler_failures: self.inner.failures.load(Ordering::Relaxed),
            subscribers: members.len(),
        }
    }

    /// Counters of every current subscription, oldest first.
    pub fn subscribers(&self) -> Vec<SubscriberStats> {
        self.members()
            .into_iter()
            .map(|(m, g)| SubscriberStats {
                name: m.name,
                pattern: g.pattern.as_str().to_owned(),
                queued: m.queued,
                delivered: m.delivered,
                dropped: m.dropped,
            })
            .collect()
    }
}

async fn run_handler<E, F, Fut, HE>(
    inner: Arc<Inner<E>>,
    name: Arc<str>,
    handler: Arc<F>,
    ev: Event<E>,
) where
    F: Fn(Event<E>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HE>> + Send + 'static,
    HE: fmt::Display + 'static,
{
    let topic = ev.topic.clone();
    let outcome = AssertUnwindSafe(async move { handler(ev).await })
        .catch_unwind()
        .await;
    let (error, panicked) = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(e)) => (e.to_string(), false),
        Err(p) => (panic_message(p), true),
    };
    inner.failures.fetch_add(1, Ordering::Relaxed);
    tracing::error!(handler = %name, topic = %topic, error = %error, panicked, "event handler failed");
    let mut failure = HandlerFailure {
        handler: name.to_string(),
        topic,
        error,
        panicked,
    };
    // Keep the newest failures: drop the oldest when the queue is full.
    loop {
        match inner.errors_tx.try_send(failure) {
            Err(TrySendError::Full(back)) => {
                let _ = inner.errors_rx.try_recv();
                failure = back;
            }
            _ => return,
        }
    }
}

impl<E> fmt::Debug for Bus<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subs = self.inner.subs.try_lock().map(|s| s.list.len()).ok();
        f.debug_struct("Bus")
            .field("subscribers", &subs)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}
