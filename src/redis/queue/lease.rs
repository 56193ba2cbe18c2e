//! Leases: settling deliveries (ack, retry, dead letter) and renewing
//! the ones this process holds.

use super::*;

pub(super) enum Mode {
    Ack,
    Retry,
    Dead(String),
}

impl<T> RedisQueue<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    pub(super) async fn settle(
        &self,
        entry_id: &str,
        count: u32,
        mode: Mode,
    ) -> Result<(), QueueError> {
        let mut out = self.settle_many(&[(entry_id, count)], &mode).await?;
        out.pop().unwrap_or(Err(QueueError::UnknownDelivery(format!(
            "{entry_id}/{count}"
        ))))
    }

    /// Settles `deliveries` (entry id, delivery count) the same way, in
    /// one script call; a result per delivery.
    pub(super) async fn settle_many(
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

/// Renews the leases this process holds, every third of the lease, until
/// the queue is dropped.
pub(super) async fn keep_leases<T>(queue: Weak<Inner<T>>, dropped: Arc<event_listener::Event>) {
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
pub(super) async fn extend<T>(
    i: &Inner<T>,
    held: &[(String, u32)],
) -> Result<Vec<String>, StoreError> {
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
