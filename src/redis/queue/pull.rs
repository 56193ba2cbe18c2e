//! Pulling: the read-ahead buffer, new entries, and the work of dead
//! consumers taken back.

use super::*;

/// The read size a queue starts with.
pub(super) const START_READ: usize = 16;

/// An entry read ahead that waited this long to be pulled halves the
/// read size.
const SLOW_PULLS: Duration = Duration::from_secs(1);

/// How often `pull` on a closed queue looks for the end while entries
/// are still leased.
const CLOSED_POLL: Duration = Duration::from_millis(20);

fn reclaim_every(lease: Duration) -> Duration {
    (lease / 2).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

impl<T> RedisQueue<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    pub(super) async fn pull_inner(&self) -> Result<Option<Delivery<T>>, QueueError> {
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
        let now = i.link.clock().now();
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
                        at: now,
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
        for r in rest {
            held.insert(r.id.clone(), u32::try_from(r.count).unwrap_or(u32::MAX));
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
        let at = i.link.clock().now();
        Ok(entries
            .iter()
            .filter_map(entry)
            .map(|(id, mut f)| Read {
                raw: f.remove("item").unwrap_or_default(),
                prior: f.get("prior").and_then(|p| p.parse().ok()).unwrap_or(0),
                count: 1,
                at,
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
}
