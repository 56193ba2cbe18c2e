use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{Future, Stream};
use pin_project_lite::pin_project;

use crate::runtime::{Clock, Sleep};

pin_project! {
    /// The stream returned by
    /// [`StreamKit::chunks_timeout`](super::StreamKit::chunks_timeout).
    #[must_use = "streams do nothing unless polled"]
    pub struct ChunksTimeout<S: Stream> {
        #[pin]
        source: S,
        done: bool,
        buf: Vec<S::Item>,
        size: usize,
        max_wait: Duration,
        clock: Arc<dyn Clock>,
        timer: Option<Sleep>,
    }
}

impl<S: Stream> ChunksTimeout<S> {
    pub(super) fn new(source: S, clock: Arc<dyn Clock>, size: usize, max_wait: Duration) -> Self {
        assert!(size > 0, "chunks_timeout: size must be at least 1");
        ChunksTimeout {
            source,
            done: false,
            buf: Vec::new(),
            size,
            max_wait,
            clock,
            timer: None,
        }
    }

    /// Items gathered for the next chunk.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

impl<S: Stream> Stream for ChunksTimeout<S> {
    type Item = Vec<S::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        while !*this.done {
            match this.source.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    if this.buf.is_empty() {
                        this.buf.reserve(*this.size);
                        *this.timer = Some(this.clock.sleep(*this.max_wait));
                    }
                    this.buf.push(item);
                    if this.buf.len() >= *this.size {
                        *this.timer = None;
                        return Poll::Ready(Some(std::mem::take(this.buf)));
                    }
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    *this.timer = None;
                }
                Poll::Pending => break,
            }
        }
        if *this.done {
            return Poll::Ready(if this.buf.is_empty() {
                None
            } else {
                Some(std::mem::take(this.buf))
            });
        }
        if let Some(timer) = this.timer.as_mut()
            && Pin::new(timer).poll(cx).is_ready()
        {
            *this.timer = None;
            return Poll::Ready(Some(std::mem::take(this.buf)));
        }
        Poll::Pending
    }
}

impl<S: Stream> fmt::Debug for ChunksTimeout<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunksTimeout")
            .field("size", &self.size)
            .field("max_wait", &self.max_wait)
            .field("pending", &self.buf.len())
            .field("done", &self.done)
            .finish()
    }
}
