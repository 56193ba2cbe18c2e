//! [`RedisQueue`]: the [`Queue`] trait on a Redis Stream.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ::redis::Value;
use ::redis::aio::MultiplexedConnection;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{RedisLink, StoreError, value_int, value_text};
use crate::ConfigError;
use crate::pool::{BoxFut, Delivery, Nack, PushError, Queue, QueueError};
use crate::runtime::{Spawn, SpawnExt, default_spawner};
use crate::sync::lock_std as lock;

mod builder;
mod lease;
mod pull;
mod push;
mod scripts;

pub use builder::RedisQueueBuilder;
use lease::{Mode, extend, keep_leases};
use pull::START_READ;
use scripts::Scripts;

struct Reclaim {
    cursor: String,
    next: Instant,
}

/// An entry read or claimed for this consumer.
struct Read {
    /// When it was read (to see entries wait in the read-ahead buffer).
    at: Instant,
    id: String,
    /// The item as stored (JSON).
    raw: String,
    /// The group's delivery count for it.
    count: i64,
    /// Deliveries before it was queued again by a retry.
    prior: i64,
}

struct Inner<T> {
    link: RedisLink,
    stream: String,
    dead: String,
    closed_key: String,
    group: String,
    consumer: String,
    capacity: u64,
    lease: Duration,
    max_deliveries: u32,
    block: Duration,
    prefetch: usize,
    /// The current read size (adapts between 1 and `prefetch`).
    read_size: AtomicUsize,
    /// Entries read or claimed ahead (already leased to this consumer).
    prefetched: Mutex<VecDeque<Read>>,
    /// The last read filled its count: the stream likely holds more, so a
    /// closed queue need not check for its end before the next read.
    last_read_full: AtomicBool,
    /// A read-ahead is in flight.
    reading_ahead: AtomicBool,
    scripts: Scripts,
    /// Deliveries this consumer holds: entry id → delivery count.
    held: Mutex<HashMap<String, u32>>,
    /// `close` was called here (the marker may still be on its way).
    closed: AtomicBool,
    /// The close marker was seen (a hint for `pull`: check for the end
    /// before blocking on a read). Pushes still ask the server.
    marker_seen: AtomicBool,
    reclaim: Mutex<Reclaim>,
    /// Idle connections for blocking reads, one per concurrent `pull`.
    readers: Mutex<Vec<MultiplexedConnection>>,
    spawner: Arc<dyn Spawn>,
    /// Notified when the last handle goes: the lease keeper ends at once.
    dropped: Arc<event_listener::Event>,
    _item: PhantomData<fn() -> T>,
}

impl<T> Drop for Inner<T> {
    fn drop(&mut self) {
        self.dropped.notify(usize::MAX);
    }
}

/// A [`Queue`] on a Redis Stream and its consumer group: processes on
/// many machines push to and pull from one queue, with the guarantees of
/// [`MemoryQueue`](crate::pool::MemoryQueue).
///
/// - `push` = `XADD` of the item as JSON, waiting (polling from 5 ms up
///   to 100 ms) while the stream holds `capacity` entries (queued plus
///   leased), refused once the queue is closed.
/// - `pull` = `XREADGROUP … BLOCK` on a connection of its own whose
///   response timeout exceeds the block time (a shared connection's
///   timeout would abandon the read while the server still delivers to
///   it). Before reading new entries it claims, with `XAUTOCLAIM` at
///   min-idle = lease, entries whose consumer stopped renewing them.
/// - Leases: while this process holds a delivery, a keeper task renews it
///   every third of the lease (`XCLAIM … JUSTID`, which resets the idle
///   time without counting a delivery), so a long job is never taken
///   from a live worker; [`extend`](Queue::extend) renews at once.
/// - `ack` = `XACK` + `XDEL` in one script: a settled entry leaves the
///   stream, so it does not grow forever and its length is the queued
///   plus leased count. `nack(Retry)` queues the item again at the tail
///   (FIFO like `MemoryQueue`), counting its deliveries; at the limit, or
///   on `Nack::DeadLetter`, the entry moves to the stream `<name>:dead`
///   with its reason and deliveries, atomically with its ack.
/// - An entry whose item does not decode as `T` is dead-lettered with the
///   decoding error, not handed out and not lost.
/// - `attempt` = deliveries so far, from the group's delivery counter
///   plus the deliveries before a retry.
/// - `close` sets the marker key `<name>:closed` that every process sees:
///   pushes are refused and pulls end once the stream is empty.
///   [`reopen`](Self::reopen) removes it.
///
/// Delivery ids are `<entry id>/<delivery count>`; only the consumer that
/// holds the delivery can settle it (another gets
/// [`QueueError::UnknownDelivery`]).
///
/// # Cancel safety
///
/// Nothing is lost when a future is dropped, but work may come again:
/// a `pull` dropped during its read may leave entries leased to this
/// consumer that nobody holds (not renewed, they are delivered again
/// after the lease); a dropped (or failed) `ack` or `nack` may or may not
/// have settled its delivery (if not, it is no longer renewed and comes
/// again after the lease); a dropped `push` may or may not have queued
/// its item.
///
/// # Default
///
/// Group `smolkit`, capacity 10 000, lease 30 s, 5 deliveries, 1 s block,
/// reads of 16 entries adapting up to 256, consumers idle for a day with
/// nothing held forgotten at connect.
///
/// # Examples
///
/// ```no_run
/// use smolkit::pool::Queue;
/// use smolkit::redis::{RedisLink, RedisQueue};
///
/// # smol::block_on(async {
/// let link = RedisLink::open("redis://127.0.0.1:6379/")?;
/// let q = RedisQueue::<String>::builder(link, "jobs").connect().await?;
/// q.push("resize image 7".to_owned()).await?;
/// let d = q.pull().await?.expect("not closed");
/// q.ack(&d.id).await?;
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # });
/// ```
pub struct RedisQueue<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for RedisQueue<T> {
    fn clone(&self) -> Self {
        RedisQueue {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for RedisQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueue")
            .field("stream", &self.inner.stream)
            .field("group", &self.inner.group)
            .field("consumer", &self.inner.consumer)
            .field("held", &lock(&self.inner.held).len())
            .finish_non_exhaustive()
    }
}

/// Counts of a [`RedisQueue`], read from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedisQueueStats {
    /// Entries in the stream: queued plus leased.
    pub length: u64,
    /// Entries leased to some consumer (the group's pending entries).
    pub leased: u64,
    /// Entries in the dead-letter stream.
    pub dead: u64,
    /// The close marker is set.
    pub closed: bool,
}

/// An entry of a [`RedisQueue`]'s dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisDeadLetter<T> {
    /// Its id in the dead-letter stream (for
    /// [`remove_dead_letters`](RedisQueue::remove_dead_letters)).
    pub id: String,
    /// The item, if it decodes as `T`.
    pub item: Option<T>,
    /// The item as stored (JSON).
    pub raw: String,
    /// Why: the nack's reason, the delivery limit, or the decoding error.
    pub reason: String,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// Its entry id in the queue's stream.
    pub source: String,
}

/// What a `pull` found.
enum Found<T> {
    Delivery(Delivery<T>),
    /// An entry that was dead-lettered instead (limit or undecodable).
    Skipped,
    Nothing,
}

impl<T> RedisQueue<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    /// This consumer's name in the group (as `XINFO CONSUMERS` shows it).
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// The stream's key.
    pub fn name(&self) -> &str {
        &self.inner.stream
    }

    /// How many entries the next read takes (it adapts; see
    /// [`with_prefetch`](RedisQueueBuilder::with_prefetch)).
    pub fn read_size(&self) -> usize {
        self.inner.read_size.load(Ordering::Acquire)
    }

    /// Deliveries this process holds (pulled, not yet settled).
    pub fn held(&self) -> usize {
        lock(&self.inner.held).len()
    }

    /// Counts read from the server.
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Read-only.
    pub async fn stats(&self) -> Result<RedisQueueStats, QueueError> {
        let i = &self.inner;
        let (length, summary, dead, closed): (u64, Value, u64, bool) = i
            .link
            .run("stats", |mut c, _| async move {
                ::redis::pipe()
                    .cmd("XLEN")
                    .arg(&i.stream)
                    .cmd("XPENDING")
                    .arg(&i.stream)
                    .arg(&i.group)
                    .cmd("XLEN")
                    .arg(&i.dead)
                    .cmd("EXISTS")
                    .arg(&i.closed_key)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(backend)?;
        let leased = match &summary {
            Value::Array(v) => v.first().and_then(value_int).unwrap_or(0),
            _ => 0,
        };
        Ok(RedisQueueStats {
            length,
            leased: u64::try_from(leased).unwrap_or(0),
            dead,
            closed,
        })
    }

    /// Sets the close marker now, for every process, and waits until it
    /// is stored ([`Queue::close`] does the same in the background).
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// The local side is closed at once; the marker may or may not be set.
    pub async fn close_everywhere(&self) -> Result<(), QueueError> {
        self.inner.closed.store(true, Ordering::Release);
        set_closed(&self.inner.link, &self.inner.closed_key).await
    }

    /// Removes the close marker, so the queue takes pushes again (in this
    /// process and every other).
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the marker may still be set.
    pub async fn reopen(&self) -> Result<(), QueueError> {
        let key = &self.inner.closed_key;
        self.inner
            .link
            .run("DEL", |mut c, _| async move {
                ::redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
            })
            .await
            .map_err(backend)?;
        self.inner.closed.store(false, Ordering::Release);
        self.inner.marker_seen.store(false, Ordering::Release);
        Ok(())
    }

    /// Up to `max` dead letters, oldest first (they stay in the stream).
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Read-only.
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<RedisDeadLetter<T>>, QueueError> {
        let key = &self.inner.dead;
        let v: Value = self
            .inner
            .link
            .run("XRANGE", |mut c, _| async move {
                ::redis::cmd("XRANGE")
                    .arg(key)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(max)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(backend)?;
        let Value::Array(entries) = v else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .filter_map(|e| {
                let (id, mut f) = entry(e)?;
                let raw = f.remove("item").unwrap_or_default();
                Some(RedisDeadLetter {
                    item: serde_json::from_str(&raw).ok(),
                    raw,
                    reason: f.remove("reason").unwrap_or_default(),
                    deliveries: f
                        .get("deliveries")
                        .and_then(|d| d.parse().ok())
                        .unwrap_or(0),
                    source: f.remove("source").unwrap_or_default(),
                    id,
                })
            })
            .collect())
    }

    /// Deletes dead letters by their ids; returns how many were there.
    ///
    /// # Errors
    ///
    /// [`QueueError::Backend`] if Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// If dropped, they may or may not be deleted.
    pub async fn remove_dead_letters(&self, ids: &[String]) -> Result<u64, QueueError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let key = &self.inner.dead;
        self.inner
            .link
            .run("XDEL", |mut c, _| async move {
                ::redis::cmd("XDEL")
                    .arg(key)
                    .arg(ids)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(backend)
    }
}

fn backend(e: StoreError) -> QueueError {
    QueueError::Backend(e.to_string())
}

/// A delivery id `<ms>-<seq>/<count>` as its entry id and count.
fn parse_id(id: &str) -> Option<(&str, u32)> {
    let (entry, count) = id.rsplit_once('/')?;
    let (ms, seq) = entry.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(ms) && digits(seq)).then_some(())?;
    Some((entry, count.parse().ok()?))
}

/// An entry `[id, [field, value, …]]` as its id and text fields.
fn entry(v: &Value) -> Option<(String, HashMap<String, String>)> {
    let Value::Array(parts) = v else { return None };
    let id = value_text(parts.first()?)?;
    let mut fields = HashMap::new();
    match parts.get(1)? {
        Value::Array(f) => {
            for pair in f.chunks(2) {
                if let [k, v] = pair
                    && let (Some(k), Some(v)) = (value_text(k), value_text(v))
                {
                    fields.insert(k, v);
                }
            }
        }
        Value::Map(m) => {
            for (k, v) in m {
                if let (Some(k), Some(v)) = (value_text(k), value_text(v)) {
                    fields.insert(k, v);
                }
            }
        }
        _ => {}
    }
    Some((id, fields))
}

async fn set_closed(link: &RedisLink, key: &str) -> Result<(), QueueError> {
    link.run("SET", |mut c, _| async move {
        ::redis::cmd("SET")
            .arg(key)
            .arg(1)
            .query_async::<()>(&mut c)
            .await
    })
    .await
    .map_err(backend)
}

impl<T> Queue for RedisQueue<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Item = T;

    fn push(&self, item: T) -> BoxFut<'_, Result<(), PushError<T>>> {
        Box::pin(self.push_inner(item))
    }

    fn pull(&self) -> BoxFut<'_, Result<Option<Delivery<T>>, QueueError>> {
        Box::pin(self.pull_inner())
    }

    fn ack<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let (entry, count) =
                parse_id(id).ok_or_else(|| QueueError::UnknownDelivery(id.to_owned()))?;
            self.settle(entry, count, Mode::Ack).await
        })
    }

    fn ack_many<'a>(&'a self, ids: &'a [String]) -> BoxFut<'a, Vec<Result<(), QueueError>>> {
        Box::pin(async move {
            let parsed: Vec<Option<(&str, u32)>> = ids.iter().map(|id| parse_id(id)).collect();
            let valid: Vec<(&str, u32)> = parsed.iter().flatten().copied().collect();
            let mut settled = match self.settle_many(&valid, &Mode::Ack).await {
                Ok(r) => r.into_iter(),
                Err(e) => return ids.iter().map(|_| Err(e.clone())).collect(),
            };
            ids.iter()
                .zip(parsed)
                .map(|(id, p)| match p {
                    Some(_) => settled
                        .next()
                        .unwrap_or_else(|| Err(QueueError::UnknownDelivery(id.clone()))),
                    None => Err(QueueError::UnknownDelivery(id.clone())),
                })
                .collect()
        })
    }

    fn nack<'a>(&'a self, id: &'a str, nack: Nack) -> BoxFut<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let (entry, count) =
                parse_id(id).ok_or_else(|| QueueError::UnknownDelivery(id.to_owned()))?;
            let mode = match nack {
                Nack::Retry => Mode::Retry,
                Nack::DeadLetter(reason) => Mode::Dead(reason),
            };
            self.settle(entry, count, mode).await
        })
    }

    fn extend<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let unknown = || QueueError::UnknownDelivery(id.to_owned());
            let (entry, count) = parse_id(id).ok_or_else(unknown)?;
            let lost = extend(&self.inner, &[(entry.to_owned(), count)])
                .await
                .map_err(backend)?;
            if lost.is_empty() {
                Ok(())
            } else {
                lock(&self.inner.held).remove(entry);
                Err(unknown())
            }
        })
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let (link, key) = (self.inner.link.clone(), self.inner.closed_key.clone());
        self.inner
            .spawner
            .spawn_named("smolkit-redis-close", async move {
                if let Err(e) = set_closed(&link, &key).await {
                    tracing::warn!(%key, error = %e, "queue close marker not set");
                }
            })
            .detach();
    }
}
