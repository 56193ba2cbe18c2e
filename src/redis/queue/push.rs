//! Pushing: one item, or a batch in chunks, waiting for room.

use super::*;

impl<T> RedisQueue<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
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

    pub(super) async fn push_inner(&self, item: T) -> Result<(), PushError<T>> {
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
}
