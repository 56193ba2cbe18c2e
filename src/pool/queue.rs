//! The [`Queue`] trait (leases, ack, nack) and [`MemoryQueue`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::error::Error;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::FutureExt;

use super::BoxFut;
use crate::runtime::{Clock, SystemClock};
use crate::sync::lock_std as lock;

/// A queue of work with at-least-once delivery.
///
/// [`pull`](Queue::pull) hands out an item under a *lease*: until the
/// consumer [`ack`](Queue::ack)s it (done) or [`nack`](Queue::nack)s it
/// (retry, or dead-letter), nobody else gets it; if the lease runs out
/// first (the consumer died or hung), the item is delivered again. After a
/// maximum number of deliveries an item goes to the queue's dead letters
/// instead of round again. This is what a queue shared by processes needs
/// (Redis Streams' consumer groups work the same way), so an in-process
/// and a distributed queue fit one trait. Methods return boxed futures so
/// the trait is object-safe (`Arc<dyn Queue<Item = T>>`).
///
/// A consumer must be idempotent per item: at-least-once means an item
/// whose ack was lost (a crash between the work and the ack) comes again.
pub trait Queue: Send + Sync {
    /// What the queue carries.
    type Item: Send + 'static;

    /// Adds `item`, waiting while the queue is full.
    fn push(&self, item: Self::Item) -> BoxFut<'_, Result<(), PushError<Self::Item>>>;

    /// Waits for an item and leases it. `Ok(None)` once the queue is
    /// closed and nothing is queued or leased.
    fn pull(&self) -> BoxFut<'_, Result<Option<Delivery<Self::Item>>, QueueError>>;

    /// The delivery is done; the item leaves the queue.
    fn ack<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), QueueError>>;

    /// Settles several deliveries as done; a result per id, in order. The
    /// default acks them one by one; a queue with a round trip per call
    /// (Redis) settles them in one.
    fn ack_many<'a>(&'a self, ids: &'a [String]) -> BoxFut<'a, Vec<Result<(), QueueError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(self.ack(id).await);
            }
            out
        })
    }

    /// The delivery failed: retry it or dead-letter it.
    fn nack<'a>(&'a self, id: &'a str, nack: Nack) -> BoxFut<'a, Result<(), QueueError>>;

    /// Renews the lease of a delivery that is still being worked on.
    fn extend<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), QueueError>>;

    /// No more pushes; pulls drain what is left.
    fn close(&self);
}

/// One leased item.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery<T> {
    /// Names this delivery for ack, nack and extend.
    pub id: String,
    /// The item.
    pub item: T,
    /// 1 for the first delivery, 2 for the first redelivery, …
    pub attempt: u32,
}

/// What to do with a delivery that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Nack {
    /// Queue it again (it goes to the dead letters instead once it has
    /// been delivered the maximum number of times).
    Retry,
    /// Give up on it: it goes to the dead letters with this reason.
    DeadLetter(String),
}

/// A queue operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue is closed.
    Closed,
    /// No lease with this id: it was acked, nacked, or it expired and the
    /// item was delivered again.
    UnknownDelivery(String),
    /// The backend (for example a Redis server) failed.
    Backend(String),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Closed => f.write_str("queue is closed"),
            QueueError::UnknownDelivery(id) => {
                write!(f, "no lease with id {id:?} (expired or already settled)")
            }
            QueueError::Backend(e) => write!(f, "queue backend: {e}"),
        }
    }
}

impl Error for QueueError {}

/// [`Queue::push`] failed; the item is handed back.
pub struct PushError<T> {
    /// Why.
    pub error: QueueError,
    /// The item that was not queued.
    pub item: T,
}

impl<T> fmt::Debug for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "push failed: {}", self.error)
    }
}

impl<T> Error for PushError<T> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.error)
    }
}

/// An item a [`MemoryQueue`] gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDeadLetter<T> {
    /// The item.
    pub item: T,
    /// Why: the nack's reason, or the delivery limit.
    pub reason: String,
    /// How many times it was delivered.
    pub deliveries: u32,
}

/// A snapshot of a [`MemoryQueue`]'s state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct QueueStats {
    /// Items waiting to be pulled.
    pub ready: usize,
    /// Items leased and not yet settled.
    pub leased: usize,
    /// Items given up on, not yet taken with `take_dead_letters`.
    pub dead: usize,
    /// Items pushed in total.
    pub pushed: u64,
    /// Deliveries acked in total.
    pub acked: u64,
    /// Deliveries that came again after a nack or an expired lease.
    pub redelivered: u64,
}

struct Entry<T> {
    key: u64,
    item: T,
    deliveries: u32,
}

struct Leased<T> {
    entry: Entry<T>,
    deadline: Instant,
}

struct State<T> {
    ready: VecDeque<Entry<T>>,
    leased: HashMap<u64, Leased<T>>,
    expiries: BTreeSet<(Instant, u64)>,
    dead: Vec<QueueDeadLetter<T>>,
    closed: bool,
    next_key: u64,
    stats: QueueStats,
}

/// An in-process [`Queue`]: bounded, FIFO, with leases that expire on a
/// [`Clock`].
///
/// # Default
///
/// Capacity 1024 queued items, 30 s leases, 5 deliveries before an item is
/// dead-lettered, the system clock.
///
/// # Examples
///
/// ```
/// use smolkit::pool::{MemoryQueue, Nack, Queue};
///
/// smol::block_on(async {
///     let q = MemoryQueue::new();
///     q.push("job").await.unwrap();
///     let d = q.pull().await.unwrap().unwrap();
///     q.nack(&d.id, Nack::Retry).await.unwrap();
///     let again = q.pull().await.unwrap().unwrap();
///     assert_eq!((again.item, again.attempt), ("job", 2));
///     q.ack(&again.id).await.unwrap();
///     q.close();
///     assert!(q.pull().await.unwrap().is_none());
/// });
/// ```
pub struct MemoryQueue<T> {
    state: Mutex<State<T>>,
    changed: Event,
    capacity: usize,
    lease: Duration,
    max_deliveries: u32,
    clock: Arc<dyn Clock>,
}

impl<T: Clone + Send + 'static> Default for MemoryQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone + Send + 'static> MemoryQueue<T> {
    /// A queue with the defaults.
    pub fn new() -> Self {
        MemoryQueue {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                leased: HashMap::new(),
                expiries: BTreeSet::new(),
                dead: Vec::new(),
                closed: false,
                next_key: 0,
                stats: QueueStats::default(),
            }),
            changed: Event::new(),
            capacity: 1024,
            lease: Duration::from_secs(30),
            max_deliveries: 5,
            clock: Arc::new(SystemClock),
        }
    }

    /// Items queued before `push` waits (at least 1).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// How long a delivery stays leased without an ack, nack or extend.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Deliveries before an item is dead-lettered (at least 1).
    pub fn with_max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// The clock leases expire on.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Takes the items given up on so far.
    pub fn take_dead_letters(&self) -> Vec<QueueDeadLetter<T>> {
        std::mem::take(&mut lock(&self.state).dead)
    }

    /// A snapshot of the counts.
    pub fn stats(&self) -> QueueStats {
        let st = lock(&self.state);
        QueueStats {
            ready: st.ready.len(),
            leased: st.leased.len(),
            dead: st.dead.len(),
            ..st.stats
        }
    }

    fn parse(id: &str) -> Option<(u64, u32)> {
        let (k, d) = id.split_once('.')?;
        Some((k.parse().ok()?, d.parse().ok()?))
    }

    /// Removes the lease `id` names, if it is the current one.
    fn settle(st: &mut State<T>, id: &str) -> Result<Entry<T>, QueueError> {
        let unknown = || QueueError::UnknownDelivery(id.to_owned());
        let (key, delivery) = Self::parse(id).ok_or_else(unknown)?;
        match st.leased.get(&key) {
            Some(l) if l.entry.deliveries == delivery => {}
            _ => return Err(unknown()),
        }
        let leased = st.leased.remove(&key).ok_or_else(unknown)?;
        st.expiries.remove(&(leased.deadline, key));
        Ok(leased.entry)
    }

    /// Requeues `entry`, or dead-letters it at the delivery limit.
    fn again(&self, st: &mut State<T>, entry: Entry<T>, why: &str) {
        if entry.deliveries >= self.max_deliveries {
            tracing::warn!(
                deliveries = entry.deliveries,
                reason = why,
                "queue item dead-lettered at the delivery limit"
            );
            st.dead.push(QueueDeadLetter {
                item: entry.item,
                reason: format!("{why}; delivered {} times", entry.deliveries),
                deliveries: entry.deliveries,
            });
        } else {
            st.stats.redelivered += 1;
            st.ready.push_back(entry);
        }
    }

    fn reclaim_expired(&self, st: &mut State<T>, now: Instant) {
        while let Some(&(deadline, key)) = st.expiries.first() {
            if deadline > now {
                break;
            }
            st.expiries.pop_first();
            if let Some(leased) = st.leased.remove(&key) {
                tracing::debug!(key, "queue lease expired; delivering again");
                self.again(st, leased.entry, "lease expired");
            }
        }
    }

    async fn pull_inner(&self) -> Result<Option<Delivery<T>>, QueueError> {
        loop {
            let listener = self.changed.listen();
            let next_expiry = {
                let mut st = lock(&self.state);
                let now = self.clock.now();
                self.reclaim_expired(&mut st, now);
                if let Some(mut entry) = st.ready.pop_front() {
                    entry.deliveries += 1;
                    let key = entry.key;
                    let deadline = now + self.lease;
                    let delivery = Delivery {
                        id: format!("{key}.{}", entry.deliveries),
                        item: entry.item.clone(),
                        attempt: entry.deliveries,
                    };
                    st.expiries.insert((deadline, key));
                    st.leased.insert(key, Leased { entry, deadline });
                    drop(st);
                    // Room for a waiting push.
                    self.changed.notify(usize::MAX);
                    return Ok(Some(delivery));
                }
                if st.closed && st.leased.is_empty() {
                    return Ok(None);
                }
                st.expiries.first().map(|&(d, _)| d)
            };
            match next_expiry {
                Some(deadline) => {
                    listener.or(self.clock.sleep_until(deadline)).await;
                }
                None => listener.await,
            }
        }
    }

    async fn push_inner(&self, item: T) -> Result<(), PushError<T>> {
        loop {
            let listener = self.changed.listen();
            {
                let mut st = lock(&self.state);
                if st.closed {
                    return Err(PushError {
                        error: QueueError::Closed,
                        item,
                    });
                }
                if st.ready.len() < self.capacity {
                    let key = st.next_key;
                    st.next_key += 1;
                    st.stats.pushed += 1;
                    st.ready.push_back(Entry {
                        key,
                        item,
                        deliveries: 0,
                    });
                    drop(st);
                    self.changed.notify(usize::MAX);
                    return Ok(());
                }
            }
            listener.await;
        }
    }
}

impl<T: Clone + Send + 'static> Queue for MemoryQueue<T> {
    type Item = T;

    fn push(&self, item: T) -> BoxFut<'_, Result<(), PushError<T>>> {
        Box::pin(self.push_inner(item))
    }

    fn pull(&self) -> BoxFut<'_, Result<Option<Delivery<T>>, QueueError>> {
        Box::pin(self.pull_inner())
    }

    fn ack<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut st = lock(&self.state);
            Self::settle(&mut st, id)?;
            st.stats.acked += 1;
            drop(st);
            self.changed.notify(usize::MAX);
            Ok(())
        })
    }

    fn nack<'a>(&'a self, id: &'a str, nack: Nack) -> BoxFut<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut st = lock(&self.state);
            let entry = Self::settle(&mut st, id)?;
            match nack {
                Nack::Retry => self.again(&mut st, entry, "nacked"),
                Nack::DeadLetter(reason) => st.dead.push(QueueDeadLetter {
                    item: entry.item,
                    reason,
                    deliveries: entry.deliveries,
                }),
            }
            drop(st);
            self.changed.notify(usize::MAX);
            Ok(())
        })
    }

    fn extend<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut st = lock(&self.state);
            let unknown = || QueueError::UnknownDelivery(id.to_owned());
            let (key, delivery) = Self::parse(id).ok_or_else(unknown)?;
            let deadline = self.clock.now() + self.lease;
            let old = match st.leased.get_mut(&key) {
                Some(l) if l.entry.deliveries == delivery => {
                    std::mem::replace(&mut l.deadline, deadline)
                }
                _ => return Err(unknown()),
            };
            st.expiries.remove(&(old, key));
            st.expiries.insert((deadline, key));
            Ok(())
        })
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify(usize::MAX);
    }
}

impl<T> fmt::Debug for MemoryQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("MemoryQueue");
        d.field("capacity", &self.capacity)
            .field("lease", &self.lease)
            .field("max_deliveries", &self.max_deliveries);
        if let Ok(st) = self.state.try_lock() {
            d.field("ready", &st.ready.len())
                .field("leased", &st.leased.len());
        }
        d.finish()
    }
}
