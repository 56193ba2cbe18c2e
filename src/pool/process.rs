//! [`WorkerPool::process`]: items fed to the pool in batches, results
//! streamed back in batches.
//!
//! NOTE: one item per queue slot cost two channel hand-offs, a permit and
//! a reply-sender clone per item (3.6 M no-op items/s against
//! `buffer_unordered`'s 28 M). Here the feeder takes the items the source
//! has ready (up to a batch size that follows the time an item takes)
//! into one queue slot with one permit
//! guard for all, and a worker sends results back as a batch: when its
//! batch ends, when [`RESULTS`] have gathered, or after [`HOLD`]. A worker that sees another idle hands half of its batch back
//! to the queue, so slow jobs still spread over the workers.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender, TrySendError, WeakSender};
use futures_lite::{Stream, StreamExt, future};

use super::error::JobError;
use super::worker_pool::{Processed, Work, WorkerPool};
use crate::limit::{Semaphore, SemaphoreGuardArc};
use crate::runtime::JoinHandle;
use crate::runtime::coop::Budget;

/// The most items one queue slot carries.
const BATCH: usize = 128;

/// About how long a batch should take: the feeder sizes batches to it from
/// the average time of an item (one item per batch until that is known,
/// or when items take longer), so slow jobs are handed out one by one.
const BATCH_TIME_NANOS: u64 = 20_000;

/// A batch still running after this while a worker is idle gives half of
/// what is left to the queue.
pub(super) const SPLIT_AFTER: Duration = Duration::from_micros(50);

/// Results a worker gathers before it sends them.
const RESULTS: usize = 128;

/// The longest a finished result waits for others to be sent with.
const HOLD: Duration = Duration::from_millis(1);

/// A finished item on its way to the consumer.
pub(super) struct Finished<I, O, E> {
    seq: u64,
    item: I,
    result: Result<O, JobError<E>>,
    /// The window permits of the items of its batch, on the batch's last
    /// item: given back once the consumer has read them all (a batch's
    /// results arrive in order).
    _permit: Option<SemaphoreGuardArc>,
}

/// Items of one `process` call travelling together through the queue.
///
/// # Drop behavior
///
/// Whatever it has not reported is reported when it is dropped: finished
/// results as they are, the item being run and those not started as
/// [`JobError::Cancelled`] (or `Closed`, when the pool refused it), so an
/// item is never lost.
pub(super) struct Batch<I, O, E> {
    items: VecDeque<(u64, I)>,
    /// The item being run: its sequence number and a copy of it.
    current: Option<(u64, I)>,
    done: Vec<Finished<I, O, E>>,
    /// When `done` was last sent (or the batch started).
    since: Instant,
    permit: Option<SemaphoreGuardArc>,
    tx: Sender<Vec<Finished<I, O, E>>>,
    clone: fn(&I) -> I,
    /// What the items never run are reported as.
    unrun: fn() -> JobError<E>,
}

impl<I, O, E> Batch<I, O, E> {
    pub(super) fn has_next(&self) -> bool {
        !self.items.is_empty()
    }

    /// Takes the next item to run (a copy stays for its result).
    pub(super) fn start(&mut self) -> I {
        let (seq, item) = self
            .items
            .pop_front()
            .unwrap_or_else(|| unreachable!("start only after has_next"));
        let run = (self.clone)(&item);
        self.current = Some((seq, item));
        run
    }

    /// Records the result of the item started last.
    pub(super) fn finish(&mut self, result: Result<O, JobError<E>>) {
        let Some((seq, item)) = self.current.take() else {
            return;
        };
        let last = self.items.is_empty();
        self.done.push(Finished {
            seq,
            item,
            result,
            _permit: if last { self.permit.take() } else { None },
        });
        // Gathered, and sent when the batch ends, when enough have
        // gathered, or when the oldest has waited long enough.
        // NOTE: the clock is read every 8th result, not per result: a
        // read per item was 9% of the no-op pool's samples (perf), and a
        // batch is sized to about 20 µs of work, so `last` sends most.
        let n = self.done.len();
        if last || n >= RESULTS || (n.is_multiple_of(8) && self.since.elapsed() >= HOLD) {
            self.send_done();
        }
    }

    fn send_done(&mut self) {
        self.since = Instant::now();
        if !self.done.is_empty() {
            // NOTE: unbounded, and bounded in practice by the process
            // window; an error means the consumer is gone.
            // The next results get room for what is left at once (it
            // grew from empty, push by push).
            let next = Vec::with_capacity(self.items.len().min(RESULTS));
            let _ = self.tx.try_send(std::mem::replace(&mut self.done, next));
        }
    }

    /// Hands the back half of the items not started, with their permits,
    /// to the queue as a batch of its own (for an idle worker); keeps them
    /// if fewer than two are left or the queue has no room.
    pub(super) fn hand_half_back(&mut self, queue: &WeakSender<Work<I, O, E>>) {
        let n = self.items.len() / 2;
        let Some(queue) = queue.upgrade().filter(|_| n > 0) else {
            return;
        };
        let half = Batch {
            items: self.items.split_off(self.items.len() - n),
            current: None,
            done: Vec::new(),
            since: Instant::now(),
            permit: self.permit.as_mut().map(|p| p.split(n)),
            tx: self.tx.clone(),
            clone: self.clone,
            unrun: self.unrun,
        };
        let mut half = match queue.try_send(Work::Batch(half)) {
            Ok(()) => return,
            Err(TrySendError::Full(Work::Batch(h)) | TrySendError::Closed(Work::Batch(h))) => h,
            Err(_) => unreachable!("sent a batch"),
        };
        // Taken back: the items, and the permits into this batch's guard.
        self.items.append(&mut half.items);
        if let Some(theirs) = half.permit.take() {
            match &mut self.permit {
                // NOTE: both are guards of the call's one semaphore.
                Some(mine) => drop(mine.merge(theirs)),
                None => self.permit = Some(theirs),
            }
        }
    }
}

impl<I, O, E> Drop for Batch<I, O, E> {
    fn drop(&mut self) {
        if let Some((seq, item)) = self.current.take() {
            self.done.push(Finished {
                seq,
                item,
                result: Err(JobError::Cancelled),
                _permit: None,
            });
        }
        while let Some((seq, item)) = self.items.pop_front() {
            self.done.push(Finished {
                seq,
                item,
                result: Err((self.unrun)()),
                _permit: None,
            });
        }
        if let Some(last) = self.done.last_mut() {
            last._permit = self.permit.take();
        }
        self.send_done();
    }
}

/// The feeder of a `process` call: reads `items`, queues them in batches
/// of what the source has ready, within a window of `window` items in
/// flight or finished-but-unread.
pub(super) async fn feed<I, O, E, S>(
    pool: WorkerPool<I, O, E>,
    items: S,
    window: usize,
    workers: usize,
    res_tx: Sender<Vec<Finished<I, O, E>>>,
) where
    S: Stream<Item = I> + Send + 'static,
    I: Clone + Send + 'static,
    O: Send + 'static,
    E: Send + 'static,
{
    let permits = std::sync::Arc::new(Semaphore::new(window));
    // Small enough that every worker gets a share of one window.
    let batch_max = (window / (workers + 1)).clamp(1, BATCH);
    let mut items = std::pin::pin!(items);
    let mut seq = 0u64;
    let mut budget = Budget::new();
    let mut ended = false;
    while !ended {
        let Some(first) = items.next().await else {
            break;
        };
        budget.tick().await;
        // Unknown (0) until the first batch is done: one item.
        let size = BATCH_TIME_NANOS
            .checked_div(pool.item_nanos())
            .map_or(1, |n| {
                usize::try_from(n).unwrap_or(usize::MAX).clamp(1, batch_max)
            });
        let mut batch = VecDeque::with_capacity(size);
        batch.push_back((seq, first));
        seq += 1;
        while batch.len() < size {
            match future::poll_once(items.next()).await {
                Some(Some(item)) => {
                    batch.push_back((seq, item));
                    seq += 1;
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        // NOTE: the semaphore is never closed and a batch is never larger
        // than the window, so this cannot fail.
        let permit = permits.acquire_many_arc(batch.len()).await.ok();
        let batch = Batch {
            done: Vec::with_capacity(batch.len().min(RESULTS)),
            items: batch,
            current: None,
            since: Instant::now(),
            permit,
            tx: res_tx.clone(),
            clone: I::clone,
            unrun: || JobError::Cancelled,
        };
        if let Err(mut refused) = pool.submit_batch(batch).await {
            refused.unrun = || JobError::Closed;
        }
    }
}

/// The stream returned by [`WorkerPool::process`].
#[must_use = "streams do nothing unless polled"]
pub struct Process<I, O, E> {
    rx: Pin<Box<Results<I, O, E>>>,
    /// Results received and not yet yielded.
    ready: VecDeque<Finished<I, O, E>>,
    /// Finished results waiting for their turn, and the next turn.
    reorder: Option<Reorder<I, O, E>>,
    budget: Budget,
    _feeder: JoinHandle<()>,
}

type Reorder<I, O, E> = (BTreeMap<u64, Finished<I, O, E>>, u64);

/// Where workers send finished results, a batch at a time.
type Results<I, O, E> = Receiver<Vec<Finished<I, O, E>>>;

// Nothing in it is pinned: the receiver is boxed, results only move.
impl<I, O, E> Unpin for Process<I, O, E> {}

impl<I, O, E> Process<I, O, E> {
    pub(super) fn new(rx: Results<I, O, E>, ordered: bool, feeder: JoinHandle<()>) -> Self {
        Process {
            rx: Box::pin(rx),
            ready: VecDeque::new(),
            reorder: ordered.then(|| (BTreeMap::new(), 0)),
            budget: Budget::new(),
            _feeder: feeder,
        }
    }
}

impl<I, O, E> Stream for Process<I, O, E> {
    type Item = Processed<I, O, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // A consumer that always finds a result ready yields now and then.
        if this.budget.poll_proceed(cx).is_pending() {
            return Poll::Pending;
        }
        loop {
            if let Some((buf, next)) = &mut this.reorder
                && let Some(done) = buf.remove(next)
            {
                *next += 1;
                return Poll::Ready(Some((done.item, done.result)));
            }
            if let Some(done) = this.ready.pop_front() {
                match &mut this.reorder {
                    None => return Poll::Ready(Some((done.item, done.result))),
                    Some((buf, _)) => {
                        buf.insert(done.seq, done);
                        continue;
                    }
                }
            }
            match this.rx.as_mut().poll_next(cx) {
                Poll::Ready(Some(batch)) => this.ready.extend(batch),
                // Every sender is gone: the feeder finished and every item
                // reported. Anything still buffered is out of order only if
                // a sequence number was never reported, which `Batch`'s
                // drop rules out; flush it in order anyway.
                Poll::Ready(None) => {
                    return Poll::Ready(this.reorder.as_mut().and_then(|(buf, next)| {
                        let (seq, done) = buf.pop_first()?;
                        *next = seq + 1;
                        Some((done.item, done.result))
                    }));
                }
                Poll::Pending => {
                    this.budget.reset();
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<I, O, E> fmt::Debug for Process<I, O, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("ordered", &self.reorder.is_some())
            .field("ready", &self.ready.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    type W = Work<u32, u32, ()>;

    fn batch(n: u32, sem: &Arc<Semaphore>) -> Batch<u32, u32, ()> {
        Batch {
            items: (0..n).map(|i| (u64::from(i), i)).collect(),
            current: None,
            done: Vec::new(),
            since: Instant::now(),
            permit: sem.try_acquire_many_arc(n as usize).ok(),
            tx: async_channel::unbounded().0,
            clone: u32::clone,
            unrun: || JobError::Cancelled,
        }
    }

    #[test]
    fn half_a_batch_goes_back_to_the_queue_with_its_permits_or_stays_whole() {
        let sem = Arc::new(Semaphore::new(16));
        let (tx, rx) = async_channel::bounded::<W>(1);
        let queue = tx.downgrade();
        let mut b = batch(5, &sem);
        b.hand_half_back(&queue);
        let Ok(Work::Batch(mut half)) = rx.try_recv() else {
            panic!("no half in the queue")
        };
        let seqs = |b: &Batch<u32, u32, ()>| b.items.iter().map(|(s, _)| *s).collect::<Vec<_>>();
        assert_eq!((seqs(&b), seqs(&half)), (vec![0, 1, 2], vec![3, 4]));
        let permits = |b: &Batch<u32, u32, ()>| b.permit.as_ref().map_or(0, |p| p.permits());
        assert_eq!((permits(&b), permits(&half)), (3, 2));
        // A full queue: the half comes back, permits and all.
        tx.try_send(Work::Batch(batch(1, &sem))).unwrap();
        b.hand_half_back(&queue);
        assert_eq!((seqs(&b), permits(&b)), (vec![0, 1, 2], 3));
        assert_eq!(sem.available(), 16 - 5 - 1);
        half.items.clear();
        drop((b, half, rx, tx, queue));
        assert_eq!(sem.available(), 16, "every permit given back");
    }
}
