//! [`RedisQueueBuilder`]: the settings, and `connect` (the group, the
//! consumer, the lease keeper).

use std::time::{SystemTime, UNIX_EPOCH};

use super::*;

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
}
