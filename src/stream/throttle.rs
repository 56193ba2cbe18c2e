use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{Future, Stream};
use pin_project_lite::pin_project;

use crate::limit::RateLimiter;

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project! {
    /// The stream returned by
    /// [`StreamKit::throttle`](super::StreamKit::throttle).
    #[must_use = "streams do nothing unless polled"]
    pub struct Throttle<S: Stream> {
        #[pin]
        source: S,
        limiter: Arc<RateLimiter>,
        held: Option<S::Item>,
        wait: Option<Wait>,
    }
}

impl<S: Stream> Throttle<S> {
    pub(super) fn new(source: S, limiter: Arc<RateLimiter>) -> Self {
        Throttle {
            source,
            limiter,
            held: None,
            wait: None,
        }
    }
}

impl<S: Stream> Stream for Throttle<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        if this.held.is_none() {
            match this.source.poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    // Fast path: a free cell and nobody queued.
                    if this.limiter.check(1).is_ok() {
                        return Poll::Ready(Some(item));
                    }
                    *this.held = Some(item);
                    let limiter = this.limiter.clone();
                    *this.wait = Some(Box::pin(async move {
                        // NOTE: one cell never exceeds the burst (at least
                        // 1), so this cannot fail.
                        let _ = limiter.until_ready(1).await;
                    }));
                }
                other => return other,
            }
        }
        if let Some(wait) = this.wait.as_mut() {
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *this.wait = None;
        }
        Poll::Ready(this.held.take())
    }
}

impl<S: Stream> fmt::Debug for Throttle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("limiter", &self.limiter)
            .field("waiting", &self.held.is_some())
            .finish()
    }
}
