//! The channel between two stages: a bounded queue that senders fill and
//! receivers drain several elements at a time.
//!
//! `async_channel` moves one element per operation, and in a pipeline of
//! fast stages that was most of the work (callgrind, the 3-stage bench:
//! 42% of all instructions in four hops per item). Here a sender moves
//! every element it has gathered under one lock, and a receiver takes as
//! many as it asks for (its stage sizes that to the time an element
//! takes, so slow elements still go one at a time and spread over the
//! stage's workers). The capacity is counted in elements, as before.
//!
//! The channel closes for receivers once every sender is gone and the
//! queue is empty, and for senders once every receiver is gone.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use event_listener::{Event, IntoNotification};

use super::workers::TAKE_MAX;
use crate::sync::lock_std as lock;

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Elements queued, readable without the lock (stats, autoscaling).
    len: AtomicUsize,
    capacity: usize,
    /// Receivers wait here for elements or the end.
    filled: Event,
    /// Senders wait here for room or the end.
    freed: Event,
}

struct State<T> {
    queue: VecDeque<T>,
    senders: usize,
    receivers: usize,
}

/// The other end is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Closed;

/// The sending end; cloned by each worker of the stage before it.
pub(super) struct HopTx<T>(Arc<Shared<T>>);

/// The receiving end; cloned by each worker of the stage after it.
pub(super) struct HopRx<T>(Arc<Shared<T>>);

/// A channel holding up to `capacity` elements (at least 1).
pub(super) fn hop<T>(capacity: usize) -> (HopTx<T>, HopRx<T>) {
    let capacity = capacity.max(1);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::with_capacity(capacity.min(1024)),
            senders: 1,
            receivers: 1,
        }),
        len: AtomicUsize::new(0),
        capacity,
        filled: Event::new(),
        freed: Event::new(),
    });
    (HopTx(shared.clone()), HopRx(shared))
}

impl<T> HopTx<T> {
    /// Moves every element of `items` into the queue, in order, waiting
    /// for room as needed. `Err` once no receiver is left; what was not
    /// moved is still in `items`.
    pub(super) async fn send_all(&self, items: &mut Vec<T>) -> Result<(), Closed> {
        self.put(|queue, room| {
            let n = room.min(items.len());
            queue.extend(items.drain(..n));
            items.is_empty()
        })
        .await
    }

    /// Sends one element (see [`send_all`](Self::send_all)).
    pub(super) async fn send(&self, item: T) -> Result<(), Closed> {
        let mut item = Some(item);
        self.put(|queue, room| {
            if room > 0
                && let Some(item) = item.take()
            {
                queue.push_back(item);
            }
            item.is_none()
        })
        .await
    }

    /// Calls `fill` under the lock with the room left until it says it is
    /// done, waiting for room between calls; wakes a receiver per element
    /// it queued.
    async fn put(
        &self,
        mut fill: impl FnMut(&mut VecDeque<T>, usize) -> bool,
    ) -> Result<(), Closed> {
        let s = &*self.0;
        loop {
            let listener = {
                let mut st = lock(&s.state);
                if st.receivers == 0 {
                    return Err(Closed);
                }
                let before = st.queue.len();
                let done = fill(&mut st.queue, s.capacity.saturating_sub(before));
                let queued = st.queue.len() - before;
                if queued > 0 || done {
                    s.len.store(st.queue.len(), Ordering::Relaxed);
                    drop(st);
                    // NOTE: additional: a receiver woken earlier may not
                    // have run yet, and each wants its own share.
                    s.filled.notify(queued.additional());
                    if done {
                        return Ok(());
                    }
                    continue;
                }
                // Full: listen before the lock is let go, so the room a
                // receiver makes next is not missed.
                s.freed.listen()
            };
            listener.await;
        }
    }

    /// The capacity, in elements.
    pub(super) fn capacity(&self) -> usize {
        self.0.capacity
    }
}

impl<T> HopRx<T> {
    /// Waits for at least one element and moves up to `max` (at least 1)
    /// into `out`. `Err` once every sender is gone and nothing is queued.
    pub(super) async fn recv_into(
        &self,
        max: usize,
        out: &mut VecDeque<T>,
    ) -> Result<usize, Closed> {
        let s = &*self.0;
        loop {
            let listener = {
                let mut st = lock(&s.state);
                let n = max.max(1).min(st.queue.len());
                if n > 0 {
                    out.extend(st.queue.drain(..n));
                    s.len.store(st.queue.len(), Ordering::Relaxed);
                    drop(st);
                    s.freed.notify(n.additional());
                    return Ok(n);
                }
                if st.senders == 0 {
                    return Err(Closed);
                }
                s.filled.listen()
            };
            listener.await;
        }
    }

    /// Elements queued now.
    pub(super) fn len(&self) -> usize {
        self.0.len.load(Ordering::Relaxed)
    }

    /// The capacity, in elements.
    pub(super) fn capacity(&self) -> usize {
        self.0.capacity
    }

    /// A handle that reads the queue length without keeping the channel
    /// open.
    pub(super) fn watch(&self) -> HopLen<T> {
        HopLen(Arc::downgrade(&self.0))
    }

    /// The elements one at a time, as a stream (for the stages built on
    /// stream adapters: ordered `map`, `batch`).
    pub(super) fn into_stream(self) -> impl futures_lite::Stream<Item = T> + Send
    where
        T: Send,
    {
        let buf = VecDeque::new();
        futures_lite::stream::unfold((self, buf), |(rx, mut buf)| async move {
            if buf.is_empty() {
                rx.recv_into(TAKE_MAX, &mut buf).await.ok()?;
            }
            let item = buf.pop_front()?;
            Some((item, (rx, buf)))
        })
    }
}

/// Reads a channel's length without keeping it open.
pub(super) struct HopLen<T>(Weak<Shared<T>>);

impl<T> HopLen<T> {
    pub(super) fn get(&self) -> usize {
        self.0
            .upgrade()
            .map_or(0, |s| s.len.load(Ordering::Relaxed))
    }
}

impl<T> Clone for HopTx<T> {
    fn clone(&self) -> Self {
        lock(&self.0.state).senders += 1;
        HopTx(self.0.clone())
    }
}

impl<T> Clone for HopRx<T> {
    fn clone(&self) -> Self {
        lock(&self.0.state).receivers += 1;
        HopRx(self.0.clone())
    }
}

impl<T> Drop for HopTx<T> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.senders -= 1;
        if st.senders == 0 {
            drop(st);
            self.0.filled.notify(usize::MAX);
        }
    }
}

impl<T> Drop for HopRx<T> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.receivers -= 1;
        if st.receivers == 0 {
            // Nobody will read these: drop them now, not with the last
            // sender.
            let gone = std::mem::take(&mut st.queue);
            self.0.len.store(0, Ordering::Relaxed);
            drop(st);
            drop(gone);
            self.0.freed.notify(usize::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_arrive_in_order_and_a_receiver_takes_at_most_what_it_asks() {
        futures_lite::future::block_on(async {
            let (tx, rx) = hop(8);
            tx.send_all(&mut (0..4).collect()).await.unwrap();
            tx.send(4).await.unwrap();
            assert_eq!(rx.len(), 5);
            let mut out = VecDeque::new();
            assert_eq!(rx.recv_into(3, &mut out).await, Ok(3));
            assert_eq!(rx.recv_into(0, &mut out).await, Ok(1), "0 asks for 1");
            assert_eq!(out, [0, 1, 2, 3]);
            drop(tx);
            assert_eq!(rx.recv_into(8, &mut out).await, Ok(1), "drained first");
            let end = futures_lite::future::poll_once(rx.recv_into(8, &mut out)).await;
            assert_eq!(end, Some(Err(Closed)));
        });
    }

    #[test]
    fn a_full_channel_holds_the_sender_until_room_is_made() {
        futures_lite::future::block_on(async {
            let (tx, rx) = hop(2);
            let mut items: Vec<u32> = (0..5).collect();
            let mut send = std::pin::pin!(tx.send_all(&mut items));
            assert!(futures_lite::future::poll_once(&mut send).await.is_none());
            assert_eq!(rx.len(), 2);
            let mut out = VecDeque::new();
            rx.recv_into(1, &mut out).await.unwrap();
            assert!(futures_lite::future::poll_once(&mut send).await.is_none());
            assert_eq!(rx.len(), 2, "the room taken at once");
            rx.recv_into(2, &mut out).await.unwrap();
            assert_eq!(send.await, Ok(()), "the last two fit");
            rx.recv_into(2, &mut out).await.unwrap();
            assert_eq!(out, [0, 1, 2, 3, 4]);
        });
    }

    #[test]
    fn one_element_waits_for_room_too() {
        futures_lite::future::block_on(async {
            let (tx, rx) = hop(1);
            tx.send(1).await.unwrap();
            let mut send = std::pin::pin!(tx.send(2));
            assert!(futures_lite::future::poll_once(&mut send).await.is_none());
            let mut out = VecDeque::new();
            rx.recv_into(4, &mut out).await.unwrap();
            assert_eq!(send.await, Ok(()));
            rx.recv_into(4, &mut out).await.unwrap();
            assert_eq!(out, [1, 2]);
        });
    }

    #[test]
    fn a_sender_fails_once_every_receiver_is_gone_keeping_what_it_had() {
        futures_lite::future::block_on(async {
            let (tx, rx) = hop(1);
            let rx2 = rx.clone();
            drop(rx);
            let mut items = vec![1, 2, 3];
            let sent = {
                let mut send = std::pin::pin!(tx.send_all(&mut items));
                assert!(futures_lite::future::poll_once(&mut send).await.is_none());
                drop(rx2);
                futures_lite::future::poll_once(send).await
            };
            assert_eq!(sent, Some(Err(Closed)));
            assert_eq!(items, [2, 3], "the one queued went with the receivers");
            let refused = futures_lite::future::poll_once(tx.send(4)).await;
            assert_eq!(refused, Some(Err(Closed)));
        });
    }

    #[test]
    fn a_waiting_receiver_wakes_on_the_last_sender_leaving() {
        futures_lite::future::block_on(async {
            let (tx, rx) = hop::<u8>(4);
            let tx2 = tx.clone();
            let mut out = VecDeque::new();
            let mut recv = std::pin::pin!(rx.recv_into(4, &mut out));
            assert!(futures_lite::future::poll_once(&mut recv).await.is_none());
            drop(tx);
            assert!(futures_lite::future::poll_once(&mut recv).await.is_none());
            drop(tx2);
            let end = futures_lite::future::poll_once(recv).await;
            assert_eq!(end, Some(Err(Closed)));
        });
    }

    #[test]
    fn under_threads_every_element_arrives_once_in_each_senders_order() {
        const SENDERS: u64 = 3;
        const EACH: u64 = 20_000;
        let (tx, rx) = hop::<(u64, u64)>(7);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for s in 0..SENDERS {
            let tx = tx.clone();
            std::thread::spawn(move || {
                futures_lite::future::block_on(async {
                    let mut i = 0;
                    let mut batch = Vec::new();
                    while i < EACH {
                        // Batches of 1 to 11: some larger than the room.
                        let n = (i % 11 + 1).min(EACH - i);
                        batch.extend((i..i + n).map(|k| (s, k)));
                        tx.send_all(&mut batch).await.unwrap();
                        i += n;
                    }
                })
            });
        }
        drop(tx);
        for r in 0..3 {
            let (rx, done) = (rx.clone(), done_tx.clone());
            std::thread::spawn(move || {
                let got = futures_lite::future::block_on(async {
                    let mut got = Vec::new();
                    let mut buf = VecDeque::new();
                    while rx.recv_into(r * 4 + 1, &mut buf).await.is_ok() {
                        got.extend(buf.drain(..));
                    }
                    got
                });
                let _ = done.send(got);
            });
        }
        drop(rx);
        let mut all = Vec::new();
        for _ in 0..3 {
            let got = done_rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("a receiver finished");
            for s in 0..SENDERS {
                let mine: Vec<u64> = got.iter().filter(|e| e.0 == s).map(|e| e.1).collect();
                assert!(mine.is_sorted(), "sender {s}'s order kept");
            }
            all.extend(got);
        }
        all.sort_unstable();
        let want: Vec<(u64, u64)> = (0..SENDERS)
            .flat_map(|s| (0..EACH).map(move |k| (s, k)))
            .collect();
        assert_eq!(all.len(), want.len());
        assert!(all == want, "each element once");
    }
}
