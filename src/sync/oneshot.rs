//! A one-value channel: the reply path of a submitted job or an offloaded
//! closure. Cheaper than a
//! bounded async-channel (one allocation, no listener), and a dropped sender
//! is seen as such so a lost reply is never a hang.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

use crate::sync::lock_std as lock;

const EMPTY: u8 = 0;
const SENT: u8 = 1;
const DROPPED: u8 = 2;

struct Inner<T> {
    value: Mutex<Option<T>>,
    state: AtomicU8,
    waker: AtomicWaker,
    /// The receiver was dropped: nobody wants the value.
    abandoned: AtomicBool,
}

pub(crate) struct Sender<T> {
    inner: Option<Arc<Inner<T>>>,
}

pub(crate) struct Receiver<T> {
    inner: Arc<Inner<T>>,
}

pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let inner = Arc::new(Inner {
        value: Mutex::new(None),
        state: AtomicU8::new(EMPTY),
        waker: AtomicWaker::new(),
        abandoned: AtomicBool::new(false),
    });
    (
        Sender {
            inner: Some(inner.clone()),
        },
        Receiver { inner },
    )
}

impl<T> Sender<T> {
    /// Whether the receiver is gone (the value would be discarded).
    pub(crate) fn is_abandoned(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(|i| i.abandoned.load(Ordering::Acquire))
    }

    pub(crate) fn send(mut self, value: T) {
        if let Some(inner) = self.inner.take() {
            *lock(&inner.value) = Some(value);
            inner.state.store(SENT, Ordering::Release);
            inner.waker.wake();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.state.store(DROPPED, Ordering::Release);
            inner.waker.wake();
        }
    }
}

impl<T> Receiver<T> {
    pub(crate) fn is_ready(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) != EMPTY
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.inner.abandoned.store(true, Ordering::Release);
    }
}

impl<T> Future for Receiver<T> {
    /// `None` when the sender was dropped without sending.
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.inner.state.load(Ordering::Acquire);
        if state == EMPTY {
            self.inner.waker.register(cx.waker());
            state = self.inner.state.load(Ordering::Acquire);
        }
        match state {
            EMPTY => Poll::Pending,
            SENT => Poll::Ready(lock(&self.inner.value).take()),
            _ => Poll::Ready(None),
        }
    }
}
