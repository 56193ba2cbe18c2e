use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{Future, FutureExt, Stream};
use pin_project_lite::pin_project;

use super::TaskResult;
use crate::runtime::{JoinError, JoinHandle, Spawn, SpawnExt};

pin_project! {
    /// The stream returned by
    /// [`StreamKit::map_concurrent`](super::StreamKit::map_concurrent) and
    /// its ordered variant.
    ///
    /// # Drop behavior
    ///
    /// Dropping the stream cancels every task still in flight.
    #[must_use = "streams do nothing unless polled"]
    pub struct MapConcurrent<S, F, O> {
        #[pin]
        source: S,
        done: bool,
        f: F,
        limit: usize,
        spawner: Arc<dyn Spawn>,
        inner: Inner<O>,
    }
}

/// A result and the id of the task that produced it.
type Tagged<O> = (u64, TaskResult<O>);

enum Inner<O> {
    Ordered(VecDeque<JoinHandle<O>>),
    Unordered {
        tx: async_channel::Sender<(u64, TaskResult<O>)>,
        // NOTE: boxed because the receiver is `!Unpin` (it holds a listener).
        rx: Pin<Box<async_channel::Receiver<Tagged<O>>>>,
        tasks: HashMap<u64, JoinHandle<()>>,
        next_id: u64,
    },
}

impl<S, F, O> MapConcurrent<S, F, O> {
    pub(super) fn new(
        source: S,
        spawner: Arc<dyn Spawn>,
        limit: usize,
        ordered: bool,
        f: F,
    ) -> Self {
        assert!(limit > 0, "map_concurrent: n must be at least 1");
        let inner = if ordered {
            Inner::Ordered(VecDeque::with_capacity(limit))
        } else {
            let (tx, rx) = async_channel::unbounded();
            Inner::Unordered {
                tx,
                rx: Box::pin(rx),
                tasks: HashMap::with_capacity(limit),
                next_id: 0,
            }
        };
        MapConcurrent {
            source,
            done: false,
            f,
            limit,
            spawner,
            inner,
        }
    }

    /// Items in flight or finished and not yet yielded.
    pub fn in_flight(&self) -> usize {
        match &self.inner {
            Inner::Ordered(handles) => handles.len(),
            Inner::Unordered { tasks, .. } => tasks.len(),
        }
    }
}

/// Reports the task's result, or `Cancelled` if the task is dropped before
/// it has one (its executor shut down, or the stream was dropped).
struct Report<O> {
    tx: async_channel::Sender<(u64, TaskResult<O>)>,
    id: u64,
    sent: bool,
}

impl<O> Report<O> {
    fn send(mut self, result: TaskResult<O>) {
        self.sent = true;
        let _ = self.tx.try_send((self.id, result));
    }
}

impl<O> Drop for Report<O> {
    fn drop(&mut self) {
        if !self.sent {
            let _ = self.tx.try_send((self.id, Err(JoinError::Cancelled)));
        }
    }
}

impl<S, F, Fut> Stream for MapConcurrent<S, F, Fut::Output>
where
    S: Stream,
    F: FnMut(S::Item) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    type Item = TaskResult<Fut::Output>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            let outstanding = match &*this.inner {
                Inner::Ordered(h) => h.len(),
                Inner::Unordered { tasks, .. } => tasks.len(),
            };
            if *this.done || outstanding >= *this.limit {
                break;
            }
            match this.source.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    let fut = (this.f)(item);
                    match this.inner {
                        Inner::Ordered(handles) => handles.push_back(this.spawner.spawn(fut)),
                        Inner::Unordered {
                            tx, tasks, next_id, ..
                        } => {
                            let id = *next_id;
                            *next_id += 1;
                            let report = Report {
                                tx: tx.clone(),
                                id,
                                sent: false,
                            };
                            let task = this.spawner.spawn(async move {
                                let result =
                                    AssertUnwindSafe(fut).catch_unwind().await.map_err(|p| {
                                        JoinError::Panicked(crate::runtime::panic_message(p))
                                    });
                                report.send(result);
                            });
                            tasks.insert(id, task);
                        }
                    }
                }
                Poll::Ready(None) => *this.done = true,
                Poll::Pending => break,
            }
        }
        match this.inner {
            Inner::Ordered(handles) => match handles.front_mut() {
                Some(front) => match Pin::new(front).poll(cx) {
                    Poll::Ready(result) => {
                        handles.pop_front();
                        Poll::Ready(Some(result))
                    }
                    Poll::Pending => Poll::Pending,
                },
                None if *this.done => Poll::Ready(None),
                None => Poll::Pending,
            },
            Inner::Unordered { rx, tasks, .. } => {
                if tasks.is_empty() {
                    return if *this.done {
                        Poll::Ready(None)
                    } else {
                        Poll::Pending
                    };
                }
                match rx.as_mut().poll_next(cx) {
                    Poll::Ready(Some((id, result))) => {
                        tasks.remove(&id);
                        Poll::Ready(Some(result))
                    }
                    // NOTE: unreachable while we hold a sender; treated as
                    // the end rather than a panic.
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S, F, O> fmt::Debug for MapConcurrent<S, F, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapConcurrent")
            .field("limit", &self.limit)
            .field("in_flight", &self.in_flight())
            .field("ordered", &matches!(self.inner, Inner::Ordered(_)))
            .field("source_done", &self.done)
            .finish()
    }
}
