//! [`RedisQueue`]: the [`Queue`] trait on a Redis Stream.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::aio::MultiplexedConnection;
use ::redis::{Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{RedisLink, StoreError, value_int, value_text};
use crate::ConfigError;
use crate::pool::{BoxFut, Delivery, Nack, PushError, Queue, QueueError};
use crate::runtime::{Spawn, SpawnExt, default_spawner};
use crate::sync::lock_std as lock;

/// `KEYS`: stream, closed marker. `ARGV`: capacity, payloads. All are
/// queued (1) or none: 0 no room for them all, -1 closed.
const PUSH: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('XLEN', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then return 0 end
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'item', ARGV[i])
end
return 1
";

/// Reads an entry's `item` and `prior` (deliveries before it was queued
/// again) fields; shared by the scripts below.
const FIELDS: &str = r"
local function fields(f)
  local item, prior = '', 0
  if type(f) ~= 'table' then return item, prior end
  for i = 1, #f, 2 do
    if f[i] == 'item' then item = f[i + 1]
    elseif f[i] == 'prior' then prior = tonumber(f[i + 1]) end
  end
  return item, prior
end
";

/// Settles deliveries, each atomically. `KEYS`: stream, dead-letter
/// stream. `ARGV`: group, consumer, mode (`ack`, `retry`, `dead`), max
/// deliveries, reason, the smallest and the largest entry id, then (entry
/// id, delivery count) pairs. Per pair: 1
/// settled, 0 the lease is no longer this delivery's (expired and claimed
/// again), -1 not pending.
const SETTLE: &str = r"
local out = {}
local done = {}
local mode = ARGV[3]
-- This consumer's leases in the range of the ids, in one call.
local mine = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[6], ARGV[7], #ARGV, ARGV[2])) do
  mine[p[1]] = p[4]
end
for i = 8, #ARGV, 2 do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  local count = mine[id]
  if count == nil then
    -- Not in the (possibly cut short) range answer: ask for it alone.
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    if #p == 0 then count = -1
    elseif p[1][2] ~= ARGV[2] then count = 0
    else count = p[1][4] end
  end
  if count == -1 then
    table.insert(out, -1)
  elseif count ~= n then
    table.insert(out, 0)
  else
    if mode ~= 'ack' then
      local e = redis.call('XRANGE', KEYS[1], id, id)
      local item, prior = '', 0
      if #e > 0 then item, prior = fields(e[1][2]) end
      local delivered = prior + n
      if mode == 'retry' and delivered < tonumber(ARGV[4]) then
        redis.call('XADD', KEYS[1], '*', 'item', item, 'prior', delivered)
      else
        local reason = ARGV[5]
        if mode == 'retry' then reason = 'nacked; delivered ' .. delivered .. ' times' end
        redis.call('XADD', KEYS[2], '*', 'item', item, 'reason', reason,
          'deliveries', delivered, 'source', id)
      end
    end
    table.insert(done, id)
    table.insert(out, 1)
  end
end
if #done > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(done))
  redis.call('XDEL', KEYS[1], unpack(done))
end
return out
";

/// Claims entries idle for longer than the lease (their consumer died or
/// hung), up to a count, or dead-letters them at the delivery limit.
/// `KEYS`: stream, dead-letter stream. `ARGV`: group, consumer, min idle
/// (ms), cursor, max deliveries, count. `{cursor, entry…}`, each entry
/// `{id, 'dead', deliveries}` or `{id, 'item', item, count, prior}`.
const RECLAIM: &str = r"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[6])
local out = {r[1]}
for _, e in ipairs(r[2]) do
  local id = e[1]
  if type(e[2]) ~= 'table' then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    local item, prior = fields(e[2])
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local count = p[1][4]
    local delivered = prior + count - 1
    if delivered >= tonumber(ARGV[5]) then
      redis.call('XADD', KEYS[2], '*', 'item', item,
        'reason', 'lease expired; delivered ' .. delivered .. ' times',
        'deliveries', delivered, 'source', id)
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      table.insert(out, {id, 'dead', delivered})
    else
      table.insert(out, {id, 'item', item, count, prior})
    end
  end
end
return out
";

/// Renews the leases of deliveries this consumer still holds (XCLAIM
/// JUSTID resets the idle time without counting a delivery). `KEYS`:
/// stream. `ARGV`: group, consumer, then (entry id, delivery count)
/// pairs. Returns the ids whose lease is no longer theirs.
const EXTEND: &str = r"
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p == 0 or p[1][2] ~= ARGV[2] or p[1][4] ~= tonumber(ARGV[i + 1]) then
    table.insert(lost, id)
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  end
end
return lost
";

/// Deletes the group's consumers that hold nothing and have been idle
/// longer than a limit (each process run adds a consumer; without this
/// they pile up in `XINFO CONSUMERS`). In one script, so a consumer that
/// is given an entry meanwhile is never deleted with it. `KEYS`: stream.
/// `ARGV`: group, this consumer, idle limit (ms). Returns how many went.
const FORGET: &str = r"
local gone = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle = nil, nil, nil
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name ~= ARGV[2] and pending == 0 and idle ~= nil and idle > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    gone = gone + 1
  end
end
return gone
";

struct Scripts {
    forget: Script,
    push: Script,
    settle: Script,
    reclaim: Script,
    extend: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            forget: Script::new(FORGET),
            push: Script::new(PUSH),
            settle: Script::new(&format!("{FIELDS}{SETTLE}")),
            reclaim: Script::new(&format!("{FIELDS}{RECLAIM}")),
            extend: Script::new(EXTEND),
        }
    }
}

/// Settings for a [`RedisQueue`]; [`connect`](Self::connect) makes it.
pub struct RedisQueueBuilder<T> {
    link: RedisLink,
    name: String,
    group: String,
    consumer: Option<String>,
    capacity: u64,
    lease: Duration,
    max_deliveries: u32,
    block: Duration,
    prefetch: usize,
    forget_after: Option<Duration>,
    spawner: Option<Arc<dyn Spawn>>,
    _item: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for RedisQueueBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueueBuilder")
            .field("name", &self.name)
            .field("group", &self.group)
            .field("capacity", &self.capacity)
            .field("lease", &self.lease)
            .field("max_deliveries", &self.max_deliveries)
            .finish_non_exhaustive()
    }
}

impl<T> RedisQueueBuilder<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    /// Entries in the stream (queued plus leased) before `push` waits.
    pub fn with_capacity(mut self, capacity: u64) -> Self {
        self.capacity = capacity;
        self
    }

    /// How long a delivery may go without its lease being renewed before
    /// another consumer may take it. Renewed automatically (every third
    /// of it) while this process holds the delivery, so only the work of
    /// a consumer that died or hung is delivered again.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Deliveries before an item goes to the dead-letter stream.
    pub fn with_max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }

    /// The consumer group (one per kind of worker sharing the stream).
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// This consumer's name in the group. The default is unique per
    /// process and per queue: `<host>-<pid>-<start time>-<n>`. Two
    /// consumers alive at once must not share a name.
    pub fn with_consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// At connect, consumers of the group that hold no entry and have
    /// not touched the server for longer than this are deleted (every
    /// process run adds a consumer of its own); `None` keeps them all.
    /// A consumer that still lives is created again by its next read.
    pub fn with_forget_idle_consumers(mut self, after: impl Into<Option<Duration>>) -> Self {
        self.forget_after = after.into();
        self
    }

    /// How long one blocking read waits on the server before `pull`
    /// checks for reclaimable work and for the close marker again.
    pub fn with_block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// The most entries one read takes from the stream (they are leased
    /// to this consumer from then on, renewed by the keeper, and handed
    /// out by the next `pull`s). The read size adapts below it: it starts
    /// at 16 (or `n` if smaller), doubles while `pull` finds nothing read
    /// ahead, and halves while read entries wait over a second to be
    /// pulled, so a fast consumer reads big batches (few round trips) and
    /// a slow one does not hoard entries other consumers could take. 1
    /// reads one entry per `pull`.
    pub fn with_prefetch(mut self, n: usize) -> Self {
        self.prefetch = n;
        self
    }

    /// Where the lease keeper and [`Queue::close`]'s marker write run.
    pub fn with_spawner(mut self, spawner: impl Spawn + 'static) -> Self {
        self.spawner = Some(Arc::new(spawner));
        self
    }

    /// Checks the settings, creates the consumer group (and the stream)
    /// if missing, and starts the lease keeper.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] naming an empty name or group, a zero
    /// capacity, max deliveries or block time, or a lease under 100 ms;
    /// [`StoreError::Redis`] if the server cannot be reached (after the
    /// link's reconnect attempts) or refuses the group.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves at most the group created.
    pub async fn connect(self) -> Result<RedisQueue<T>, StoreError> {
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "", "must not be empty").into());
        }
        if self.group.is_empty() {
            return Err(ConfigError::new("group", "", "must not be empty").into());
        }
        if self.capacity == 0 {
            return Err(ConfigError::zero("capacity").into());
        }
        if self.max_deliveries == 0 {
            return Err(ConfigError::zero("max_deliveries").into());
        }
        if self.prefetch == 0 {
            return Err(ConfigError::zero("prefetch").into());
        }
        if self.block < Duration::from_millis(1) {
            return Err(ConfigError::new("block", self.block, "must be at least 1 ms").into());
        }
        if self.lease < Duration::from_millis(100) {
            return Err(ConfigError::new("lease", self.lease, "must be at least 100 ms").into());
        }
        let consumer = self.consumer.unwrap_or_else(unique_consumer);
        let (name, group) = (self.name.clone(), self.group.clone());
        self.link
            .run("XGROUP CREATE", |mut c, _| {
                let (name, group, consumer) = (name.clone(), group.clone(), consumer.clone());
                async move {
                    let created: ::redis::RedisResult<Value> = ::redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(&name)
                        .arg(&group)
                        .arg("0")
                        .arg("MKSTREAM")
                        .query_async(&mut c)
                        .await;
                    match created {
                        Err(e) if e.code() != Some("BUSYGROUP") => return Err(e),
                        _ => {}
                    }
                    // Listed in `XINFO CONSUMERS` from the start (a read
                    // that finds nothing does not create it).
                    ::redis::cmd("XGROUP")
                        .arg("CREATECONSUMER")
                        .arg(&name)
                        .arg(&group)
                        .arg(&consumer)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await?;
        let spawner = self.spawner.unwrap_or_else(default_spawner);
        let inner = Arc::new(Inner {
            dead: format!("{}:dead", self.name),
            closed_key: format!("{}:closed", self.name),
            stream: self.name,
            group: self.group,
            consumer,
            capacity: self.capacity,
            lease: self.lease,
            max_deliveries: self.max_deliveries,
            block: self.block,
            prefetch: self.prefetch,
            read_size: AtomicUsize::new(self.prefetch.min(START_READ)),
            prefetched: Mutex::new(VecDeque::new()),
            last_read_full: AtomicBool::new(false),
            reading_ahead: AtomicBool::new(false),
            scripts: Scripts::new(),
            held: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            marker_seen: AtomicBool::new(false),
            reclaim: Mutex::new(Reclaim {
                cursor: "0-0".to_owned(),
                next: self.link.clock().now(),
            }),
            readers: Mutex::new(Vec::new()),
            spawner: spawner.clone(),
            dropped: Arc::new(event_listener::Event::new()),
            link: self.link,
            _item: PhantomData,
        });
        let closed_key = &inner.closed_key;
        let marker: bool = inner
            .link
            .run("EXISTS", |mut c, _| async move {
                ::redis::cmd("EXISTS")
                    .arg(closed_key)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        inner.marker_seen.store(marker, Ordering::Release);
        if let Some(after) = self.forget_after {
            let idle_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
            let i = &*inner;
            let gone: i64 = i
                .link
                .run("XGROUP DELCONSUMER", |mut c, _| async move {
                    i.scripts
                        .forget
                        .key(&i.stream)
                        .arg(&i.group)
                        .arg(&i.consumer)
                        .arg(idle_ms)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            if gone > 0 {
                tracing::debug!(stream = %i.stream, gone, "idle consumers forgotten");
            }
        }
        let keeper = keep_leases(Arc::downgrade(&inner), inner.dropped.clone());
        spawner
            .spawn_named("smolkit-redis-lease-keeper", keeper)
            .detach();
        tracing::debug!(
            stream = %inner.stream,
            group = %inner.group,
            consumer = %inner.consumer,
            "redis queue connected"
        );
        Ok(RedisQueue { inner })
    }
}

fn unique_consumer() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!(
        "{host}-{}-{started}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

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
    /// Settings for the queue on the stream `name`.
    pub fn builder(link: RedisLink, name: impl Into<String>) -> RedisQueueBuilder<T> {
        RedisQueueBuilder {
            link,
            name: name.into(),
            group: "smolkit".to_owned(),
            consumer: None,
            capacity: 10_000,
            lease: Duration::from_secs(30),
            max_deliveries: 5,
            block: Duration::from_secs(1),
            prefetch: 256,
            forget_after: Some(Duration::from_secs(24 * 3600)),
            spawner: None,
            _item: PhantomData,
        }
    }

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
                let (id, f) = entry(e)?;
                let raw = f.get("item").cloned().unwrap_or_default();
                Some(RedisDeadLetter {
                    item: serde_json::from_str(&raw).ok(),
                    raw,
                    reason: f.get("reason").cloned().unwrap_or_default(),
                    deliveries: f
                        .get("deliveries")
                        .and_then(|d| d.parse().ok())
                        .unwrap_or(0),
                    source: f.get("source").cloned().unwrap_or_default(),
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

    /// Pushes `items` with one round trip per chunk of up to 256 (or the
    /// capacity, if smaller), in order; each chunk waits until there is
    /// room for all of it.
    ///
    /// # Errors
    ///
    /// [`QueueError::Closed`] once the queue is closed (here or in any
    /// process); [`QueueError::Backend`] if an item does not encode as
    /// JSON or Redis cannot be reached. The error hands back the items not
    /// queued: the failed chunk and those after it.
    ///
    /// # Cancel safety
    ///
    /// If dropped, a prefix of the chunks is queued.
    pub async fn push_batch(&self, items: Vec<T>) -> Result<(), PushError<Vec<T>>> {
        let mut payloads = Vec::with_capacity(items.len());
        for item in &items {
            match serde_json::to_string(item) {
                Ok(p) => payloads.push(p),
                Err(e) => {
                    return Err(PushError {
                        error: QueueError::Backend(format!("item does not encode as JSON: {e}")),
                        item: items,
                    });
                }
            }
        }
        let chunk = usize::try_from(self.inner.capacity)
            .unwrap_or(usize::MAX)
            .clamp(1, 256);
        let mut done = 0;
        for part in payloads.chunks(chunk) {
            if let Err(error) = self.push_payloads(part).await {
                return Err(PushError {
                    error,
                    item: items.into_iter().skip(done).collect(),
                });
            }
            done += part.len();
        }
        Ok(())
    }

    async fn push_inner(&self, item: T) -> Result<(), PushError<T>> {
        let payload = match serde_json::to_string(&item) {
            Ok(p) => p,
            Err(e) => {
                return Err(PushError {
                    error: QueueError::Backend(format!("item does not encode as JSON: {e}")),
                    item,
                });
            }
        };
        self.push_payloads(std::slice::from_ref(&payload))
            .await
            .map_err(|error| PushError { error, item })
    }

    /// Queues `payloads` together once there is room for all of them.
    async fn push_payloads(&self, payloads: &[String]) -> Result<(), QueueError> {
        let i = &self.inner;
        let mut wait = Duration::from_millis(5);
        loop {
            if i.closed.load(Ordering::Acquire) {
                return Err(QueueError::Closed);
            }
            let pushed: i64 = i
                .link
                .run("XADD", |mut c, _| async move {
                    let mut call = i.scripts.push.key(&i.stream);
                    call.key(&i.closed_key).arg(i.capacity);
                    for p in payloads {
                        call.arg(p);
                    }
                    call.invoke_async(&mut c).await
                })
                .await
                .map_err(backend)?;
            match pushed {
                1 => return Ok(()),
                -1 => {
                    i.marker_seen.store(true, Ordering::Release);
                    return Err(QueueError::Closed);
                }
                _ => {
                    // Full: wait for room.
                    i.link.clock().sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    async fn pull_inner(&self) -> Result<Option<Delivery<T>>, QueueError> {
        let mut conn = lock(&self.inner.readers).pop();
        let pulled = self.pull_on(&mut conn).await;
        if let Some(c) = conn {
            lock(&self.inner.readers).push(c);
        }
        pulled
    }

    async fn pull_on(
        &self,
        conn: &mut Option<MultiplexedConnection>,
    ) -> Result<Option<Delivery<T>>, QueueError> {
        let i = &self.inner;
        loop {
            let next = lock(&i.prefetched).pop_front();
            if let Some(read) = next {
                if i.link.clock().now().saturating_duration_since(read.at) > SLOW_PULLS {
                    // Entries wait here: read fewer at a time.
                    let _ = i
                        .read_size
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (n > 1).then_some(n / 2)
                        });
                }
                self.read_ahead();
                match self.deliver(read).await? {
                    Found::Delivery(d) => return Ok(Some(d)),
                    _ => continue,
                }
            }
            let due = {
                let r = lock(&i.reclaim);
                (r.next <= i.link.clock().now()).then(|| r.cursor.clone())
            };
            if let Some(cursor) = due {
                match self.reclaim(cursor).await? {
                    Found::Delivery(d) => return Ok(Some(d)),
                    Found::Skipped => continue,
                    Found::Nothing => {}
                }
            }
            // Closed: the stream may already be empty; no need to block
            // a whole read to find out.
            if (i.closed.load(Ordering::Acquire) || i.marker_seen.load(Ordering::Acquire))
                && !i.last_read_full.load(Ordering::Acquire)
                && lock(&i.prefetched).is_empty()
                && self.drained().await?
            {
                return Ok(None);
            }
            if i.last_read_full.load(Ordering::Acquire) {
                // This pull found nothing read ahead although the stream
                // has more: read more at a time.
                let max = i.prefetch;
                let _ = i
                    .read_size
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some((n * 2).min(max))
                    });
            }
            let until_reclaim = lock(&i.reclaim)
                .next
                .saturating_duration_since(i.link.clock().now());
            let mut block = i.block.min(until_reclaim).max(Duration::from_millis(1));
            if i.closed.load(Ordering::Acquire) || i.marker_seen.load(Ordering::Acquire) {
                // Closed, with leased entries left: no new ones will come,
                // only their acks (the end) or their redelivery, so look
                // again soon rather than block a whole read.
                block = block.min(CLOSED_POLL);
            }
            match self.read_new(conn, block).await? {
                Found::Delivery(d) => {
                    self.read_ahead();
                    return Ok(Some(d));
                }
                Found::Skipped => continue,
                Found::Nothing => {}
            }
            if self.drained().await? {
                return Ok(None);
            }
        }
    }

    /// Claims one entry whose lease ran out, if any.
    async fn reclaim(&self, cursor: String) -> Result<Found<T>, QueueError> {
        let i = &self.inner;
        let lease_ms = u64::try_from(i.lease.as_millis()).unwrap_or(u64::MAX);
        let cursor = &cursor;
        let v: Value = i
            .link
            .run("XAUTOCLAIM", |mut c, _| async move {
                i.scripts
                    .reclaim
                    .key(&i.stream)
                    .key(&i.dead)
                    .arg(&i.group)
                    .arg(&i.consumer)
                    .arg(lease_ms)
                    .arg(cursor)
                    .arg(i.max_deliveries)
                    .arg(i.read_size.load(Ordering::Acquire))
                    .invoke_async(&mut c)
                    .await
            })
            .await
            .map_err(backend)?;
        let Value::Array(parts) = v else {
            return Err(backend(StoreError::unexpected("a reclaim reply", v)));
        };
        let next_cursor = parts
            .first()
            .and_then(value_text)
            .unwrap_or_else(|| "0-0".into());
        let mut claimed = VecDeque::new();
        let mut skipped = false;
        for e in parts.iter().skip(1) {
            let Value::Array(e) = e else { continue };
            let text = |k: usize| e.get(k).and_then(value_text).unwrap_or_default();
            let int = |k: usize| e.get(k).and_then(value_int).unwrap_or(0);
            match text(1).as_str() {
                "dead" => {
                    tracing::warn!(
                        stream = %i.stream,
                        id = %text(0),
                        deliveries = int(2),
                        "queue item dead-lettered at the delivery limit (lease expired)"
                    );
                    skipped = true;
                }
                "item" => {
                    tracing::debug!(stream = %i.stream, id = %text(0), "queue lease expired; delivering again");
                    claimed.push_back(Read {
                        at: i.link.clock().now(),
                        id: text(0),
                        raw: text(2),
                        count: int(3).max(1),
                        prior: int(4),
                    });
                }
                _ => {}
            }
        }
        {
            let mut r = lock(&i.reclaim);
            let now = i.link.clock().now();
            // Found some: there may be more, look again at once. Nothing in
            // this step: the scan goes on from the cursor soon (a step
            // covers at most ten pending entries per claim), or, once it
            // has wrapped, after the interval.
            r.next = if !claimed.is_empty() || skipped {
                now
            } else if next_cursor != "0-0" {
                now + Duration::from_millis(50)
            } else {
                now + reclaim_every(i.lease)
            };
            r.cursor = next_cursor;
        }
        let Some(first) = claimed.pop_front() else {
            return Ok(if skipped {
                Found::Skipped
            } else {
                Found::Nothing
            });
        };
        self.prefetch_more(claimed);
        self.deliver(first).await
    }

    /// Keeps `rest` (leased to this consumer already) for the next pulls.
    fn prefetch_more(&self, rest: impl IntoIterator<Item = Read>) {
        let i = &self.inner;
        let mut held = lock(&i.held);
        let mut buffer = lock(&i.prefetched);
        let now = i.link.clock().now();
        for mut r in rest {
            held.insert(r.id.clone(), u32::try_from(r.count).unwrap_or(u32::MAX));
            r.at = now;
            buffer.push_back(r);
        }
    }

    /// Reads one new entry, waiting up to `block` for it.
    async fn read_new(
        &self,
        conn: &mut Option<MultiplexedConnection>,
        block: Duration,
    ) -> Result<Found<T>, QueueError> {
        let i = &self.inner;
        let block_ms = u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1);
        // The read's own connection waits for the answer well past the
        // block time, so it never abandons a read the server still serves.
        let response = block + Duration::from_secs(5);
        let size = i.read_size.load(Ordering::Acquire);
        let v: Value = i
            .link
            .run_blocking("XREADGROUP", conn, response, |mut c| async move {
                self.read_command(size, Some(block_ms))
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(backend)?;
        let mut read = self.take_read(v, size)?.into_iter();
        let Some(first) = read.next() else {
            return Ok(Found::Nothing);
        };
        self.prefetch_more(read);
        self.deliver(first).await
    }

    /// `XREADGROUP` of up to `size` new entries, blocking `block_ms` or
    /// not at all.
    fn read_command(&self, size: usize, block_ms: Option<u64>) -> ::redis::Cmd {
        let i = &self.inner;
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&i.group)
            .arg(&i.consumer)
            .arg("COUNT")
            .arg(size);
        if let Some(ms) = block_ms {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(&i.stream).arg(">");
        cmd
    }

    /// The entries of an `XREADGROUP` reply (and whether it filled its
    /// count).
    fn take_read(&self, v: Value, size: usize) -> Result<Vec<Read>, QueueError> {
        let i = &self.inner;
        let entries = match &v {
            Value::Nil => None,
            Value::Array(streams) => streams.first().and_then(|s| match s {
                Value::Array(kv) => kv.get(1),
                _ => None,
            }),
            Value::Map(m) => m.first().map(|(_, entries)| entries),
            _ => return Err(backend(StoreError::unexpected("an XREADGROUP reply", v))),
        };
        let Some(Value::Array(entries)) = entries else {
            i.last_read_full.store(false, Ordering::Release);
            return Ok(Vec::new());
        };
        i.last_read_full
            .store(entries.len() >= size, Ordering::Release);
        Ok(entries
            .iter()
            .filter_map(entry)
            .map(|(id, f)| Read {
                raw: f.get("item").cloned().unwrap_or_default(),
                prior: f.get("prior").and_then(|p| p.parse().ok()).unwrap_or(0),
                count: 1,
                at: i.link.clock().now(),
                id,
            })
            .collect())
    }

    /// Reads the next entries in the background (a read that does not
    /// block, on the shared connection) once the read-ahead buffer is down
    /// to half, so a `pull` seldom waits for a round trip. Not when the
    /// last read found the stream short of entries.
    fn read_ahead(&self) {
        let i = &self.inner;
        let size = i.read_size.load(Ordering::Acquire);
        if size < 2
            || !i.last_read_full.load(Ordering::Acquire)
            || lock(&i.prefetched).len() > size / 2
            || i.reading_ahead.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let q = self.clone();
        i.spawner
            .spawn_named("smolkit-redis-read-ahead", async move {
                let i = &q.inner;
                let read = i
                    .link
                    .run("XREADGROUP", |mut c, _| {
                        let cmd = q.read_command(size, None);
                        async move { cmd.query_async(&mut c).await }
                    })
                    .await
                    .map_err(backend)
                    .and_then(|v| q.take_read(v, size));
                match read {
                    Ok(entries) => q.prefetch_more(entries),
                    Err(e) => {
                        tracing::debug!(stream = %i.stream, error = %e, "queue read-ahead failed")
                    }
                }
                i.reading_ahead.store(false, Ordering::Release);
            })
            .detach();
    }

    /// Hands out `read`, or dead-letters it if its item does not decode.
    async fn deliver(&self, read: Read) -> Result<Found<T>, QueueError> {
        let Read {
            id,
            raw,
            count,
            prior,
            ..
        } = read;
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        match serde_json::from_str::<T>(&raw) {
            Ok(item) => {
                lock(&self.inner.held).insert(id.clone(), count);
                let attempt = u32::try_from(prior).unwrap_or(0).saturating_add(count);
                Ok(Found::Delivery(Delivery {
                    id: format!("{id}/{count}"),
                    item,
                    attempt,
                }))
            }
            Err(e) => {
                tracing::warn!(stream = %self.inner.stream, %id, error = %e, "queue item does not decode; dead-lettered");
                self.settle(&id, count, Mode::Dead(format!("item does not decode: {e}")))
                    .await?;
                Ok(Found::Skipped)
            }
        }
    }

    /// The queue is closed (here or by the marker) and the stream empty.
    async fn drained(&self) -> Result<bool, QueueError> {
        let i = &self.inner;
        let (marker, length): (bool, u64) = i
            .link
            .run("drained", |mut c, _| async move {
                ::redis::pipe()
                    .cmd("EXISTS")
                    .arg(&i.closed_key)
                    .cmd("XLEN")
                    .arg(&i.stream)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(backend)?;
        i.marker_seen.store(marker, Ordering::Release);
        Ok((marker || i.closed.load(Ordering::Acquire)) && length == 0)
    }

    async fn settle(&self, entry_id: &str, count: u32, mode: Mode) -> Result<(), QueueError> {
        let mut out = self.settle_many(&[(entry_id, count)], &mode).await?;
        out.pop().unwrap_or(Err(QueueError::UnknownDelivery(format!(
            "{entry_id}/{count}"
        ))))
    }

    /// Settles `deliveries` (entry id, delivery count) the same way, in
    /// one script call; a result per delivery.
    async fn settle_many(
        &self,
        deliveries: &[(&str, u32)],
        mode: &Mode,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let i = &self.inner;
        let (name, reason) = match mode {
            Mode::Ack => ("ack", ""),
            Mode::Retry => ("retry", ""),
            Mode::Dead(r) => ("dead", r.as_str()),
        };
        // No longer renewed from here: if this call fails or is dropped,
        // the lease runs out and the entry is delivered again (renewing it
        // would keep it from everyone while this queue lives).
        {
            let mut held = lock(&i.held);
            for (id, _) in deliveries {
                held.remove(*id);
            }
        }
        // The range of the ids, for one XPENDING of this consumer's leases.
        let key = |id: &str| -> (u64, u64) {
            let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
            (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
        };
        let lowest = deliveries
            .iter()
            .map(|d| d.0)
            .min_by_key(|id| key(id))
            .unwrap_or("0-0");
        let highest = deliveries
            .iter()
            .map(|d| d.0)
            .max_by_key(|id| key(id))
            .unwrap_or("0-0");
        let codes: Vec<i64> = i
            .link
            .run("settle", |mut c, tries| async move {
                let mut call = i.scripts.settle.key(&i.stream);
                call.key(&i.dead)
                    .arg(&i.group)
                    .arg(&i.consumer)
                    .arg(name)
                    .arg(i.max_deliveries)
                    .arg(reason)
                    .arg(lowest)
                    .arg(highest);
                for (id, n) in deliveries {
                    call.arg(*id).arg(*n);
                }
                let codes: Vec<i64> = call.invoke_async(&mut c).await?;
                // NOTE: not pending on a try after a broken connection:
                // the earlier try most likely settled it.
                Ok(codes
                    .into_iter()
                    .map(|r| if r == -1 && tries > 0 { 1 } else { r })
                    .collect())
            })
            .await
            .map_err(backend)?;
        Ok(deliveries
            .iter()
            .enumerate()
            .map(|(k, (id, n))| {
                if codes.get(k) == Some(&1) {
                    Ok(())
                } else {
                    Err(QueueError::UnknownDelivery(format!("{id}/{n}")))
                }
            })
            .collect())
    }
}

enum Mode {
    Ack,
    Retry,
    Dead(String),
}

/// The read size a queue starts with.
const START_READ: usize = 16;

/// An entry read ahead that waited this long to be pulled halves the
/// read size.
const SLOW_PULLS: Duration = Duration::from_secs(1);

/// How often `pull` on a closed queue looks for the end while entries
/// are still leased.
const CLOSED_POLL: Duration = Duration::from_millis(20);

fn reclaim_every(lease: Duration) -> Duration {
    (lease / 2).clamp(Duration::from_millis(50), Duration::from_secs(5))
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

/// Renews the leases this process holds, every third of the lease, until
/// the queue is dropped.
async fn keep_leases<T>(queue: Weak<Inner<T>>, dropped: Arc<event_listener::Event>) {
    use futures_lite::FutureExt;
    let Some((clock, every)) = queue
        .upgrade()
        .map(|i| (i.link.clock().clone(), i.lease / 3))
    else {
        return;
    };
    loop {
        let gone = dropped.listen();
        if queue.strong_count() == 0 {
            return;
        }
        let woke_for_drop = async {
            gone.await;
            true
        }
        .or(async {
            clock.sleep(every).await;
            false
        })
        .await;
        if woke_for_drop {
            return;
        }
        let Some(i) = queue.upgrade() else { return };
        let held: Vec<(String, u32)> = lock(&i.held)
            .iter()
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        if held.is_empty() {
            continue;
        }
        match extend(&i, &held).await {
            Ok(lost) => {
                let mut h = lock(&i.held);
                for id in lost {
                    tracing::warn!(stream = %i.stream, %id, "queue lease lost before it was renewed");
                    h.remove(&id);
                }
            }
            Err(e) => tracing::warn!(stream = %i.stream, error = %e, "queue lease renewal failed"),
        }
    }
}

/// Renews `held`'s leases; returns the entry ids that are no longer ours.
async fn extend<T>(i: &Inner<T>, held: &[(String, u32)]) -> Result<Vec<String>, StoreError> {
    i.link
        .run("XCLAIM", |mut c, _| async move {
            let mut call = i.scripts.extend.key(&i.stream);
            call.arg(&i.group).arg(&i.consumer);
            for (id, n) in held {
                call.arg(id).arg(*n);
            }
            call.invoke_async(&mut c).await
        })
        .await
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
