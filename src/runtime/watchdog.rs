//! Deadlines kept by one thread: the sleeps of [`Clock::watchdog`] on
//! [`SystemClock`](super::SystemClock).
//!
//! A timeout around work that almost always ends first (a connect, a
//! response) is armed and dropped once per use. On async-io's reactor that
//! is a timer operation queued, a reactor wake-up (an `eventfd` write), a
//! `BTreeMap` insert and remove, and, while any timer is armed, a split of
//! the timer map on every reactor turn. Here it is an entry pushed on and
//! taken off a deque sorted by deadline, under one lock: deadlines of one
//! length come in order, so both ends are the deque's. The thread is told
//! only when a deadline comes before the one it sleeps until, so
//! back-to-back connects with one timeout wake it once per timeout, not
//! once per connect.
//!
//! [`Clock::watchdog`]: super::Clock::watchdog

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

struct Entry {
    deadline: Instant,
    id: u64,
    waker: Waker,
}

struct State {
    /// Pending deadlines, sorted by `(deadline, id)`.
    queue: VecDeque<Entry>,
    next_id: u64,
    /// When the thread wakes next by itself (`None`: only when told).
    wake_at: Option<Instant>,
    started: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

static SHARED: Shared = Shared {
    state: Mutex::new(State {
        queue: VecDeque::new(),
        next_id: 0,
        wake_at: None,
        started: false,
    }),
    wake: Condvar::new(),
};

fn state() -> MutexGuard<'static, State> {
    // NOTE: nothing run under this lock panics with the state half
    // changed (a waker is woken outside it).
    SHARED.state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// Where `(deadline, id)` is, or would go.
    fn position(&self, deadline: Instant, id: u64) -> usize {
        // NOTE: most deadlines are the latest or the earliest; a look at
        // each end first keeps those O(1).
        match self.queue.back() {
            None => return 0,
            Some(last) if (last.deadline, last.id) < (deadline, id) => return self.queue.len(),
            _ => {}
        }
        if let Some(first) = self.queue.front()
            && (first.deadline, first.id) >= (deadline, id)
        {
            return 0;
        }
        self.queue
            .partition_point(|e| (e.deadline, e.id) < (deadline, id))
    }

    fn find(&self, deadline: Instant, id: u64) -> Option<usize> {
        let at = self.position(deadline, id);
        self.queue.get(at).is_some_and(|e| e.id == id).then_some(at)
    }
}

/// The thread: wakes the wakers of deadlines reached, sleeps until the
/// next one.
fn run() {
    let mut woken = Vec::new();
    let mut st = state();
    loop {
        let now = Instant::now();
        while st.queue.front().is_some_and(|e| e.deadline <= now) {
            if let Some(e) = st.queue.pop_front() {
                woken.push(e.waker);
            }
        }
        st.wake_at = st.queue.front().map(|e| e.deadline);
        if !woken.is_empty() {
            drop(st);
            woken.drain(..).for_each(Waker::wake);
            st = state();
            continue;
        }
        st = match st.wake_at {
            None => SHARED.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
            Some(at) => {
                SHARED
                    .wake
                    .wait_timeout(st, at.saturating_duration_since(now))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
    }
}

/// A deadline on the watchdog's thread: registered when first polled,
/// taken off when dropped.
pub(crate) struct Watch {
    deadline: Instant,
    /// Its id once registered.
    id: Option<u64>,
    /// The reactor's timer instead, when the thread could not start.
    fallback: Option<async_io::Timer>,
}

impl Watch {
    pub(crate) fn new(deadline: Instant) -> Self {
        Watch {
            deadline,
            id: None,
            fallback: None,
        }
    }

    /// On the queue; `false` when the thread could not start.
    fn register(&mut self, waker: &Waker) -> bool {
        let mut st = state();
        if !st.started {
            let spawned = std::thread::Builder::new()
                .name("smolkit-watchdog".into())
                .spawn(run);
            if let Err(e) = spawned {
                // The next registration tries again.
                tracing::error!(error = %e, "the watchdog thread did not start");
                return false;
            }
            st.started = true;
        }
        let id = st.next_id;
        st.next_id += 1;
        self.id = Some(id);
        let at = st.position(self.deadline, id);
        st.queue.insert(
            at,
            Entry {
                deadline: self.deadline,
                id,
                waker: waker.clone(),
            },
        );
        if st.wake_at.is_none_or(|w| self.deadline < w) {
            st.wake_at = Some(self.deadline);
            SHARED.wake.notify_one();
        }
        true
    }
}

impl Future for Watch {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(timer) = &mut self.fallback {
            return Pin::new(timer).poll(cx).map(|_| ());
        }
        let Some(id) = self.id else {
            if !self.register(cx.waker()) {
                let mut timer = async_io::Timer::at(self.deadline);
                let polled = Pin::new(&mut timer).poll(cx).map(|_| ());
                self.fallback = Some(timer);
                return polled;
            }
            return Poll::Pending;
        };
        let mut st = state();
        match st.find(self.deadline, id) {
            Some(at) => {
                let e = &mut st.queue[at];
                if !e.waker.will_wake(cx.waker()) {
                    e.waker.clone_from(cx.waker());
                }
                Poll::Pending
            }
            // NOTE: only the thread takes a registered deadline off, once
            // its clock has reached it (no clock is read here).
            None => {
                self.id = None;
                Poll::Ready(())
            }
        }
    }
}

impl Watch {
    fn cancel(&mut self) {
        if let Some(id) = self.id.take() {
            let mut st = state();
            if let Some(at) = st.find(self.deadline, id) {
                let e = st.queue.remove(at);
                drop(st);
                drop(e);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("deadline", &self.deadline)
            .field("registered", &self.id.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::time::Duration;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker that says when it is woken, for a bounded wait on it.
    struct Signal(std::sync::mpsc::SyncSender<()>);

    impl Wake for Signal {
        fn wake(self: Arc<Self>) {
            let _ = self.0.try_send(());
        }
    }

    fn registered(w: &Watch) -> bool {
        w.id.is_some_and(|id| state().find(w.deadline, id).is_some())
    }

    /// Bounded: a sleep the thread never ends fails here, not by hanging.
    fn within<T>(fut: impl Future<Output = T>) -> T {
        smol::block_on(futures_lite::future::or(fut, async {
            async_io::Timer::after(Duration::from_secs(10)).await;
            panic!("the watchdog did not end its sleeps within 10 s");
        }))
    }

    #[test]
    fn sleeps_end_at_their_deadlines_in_any_order_and_leave_the_queue() {
        let start = Instant::now();
        let lengths = [40u64, 5, 20, 5, 0, 30, 1];
        let ended = within(async {
            let sleeps: Vec<_> = lengths
                .iter()
                .map(|&ms| {
                    let deadline = start + Duration::from_millis(ms);
                    smol::spawn(async move {
                        let mut w = Watch::new(deadline);
                        (&mut w).await;
                        (deadline, Instant::now(), registered(&w))
                    })
                })
                .collect();
            let mut ended = Vec::new();
            for s in sleeps {
                ended.push(s.await);
            }
            ended
        });
        for (deadline, at, still) in ended {
            assert!(at >= deadline, "a sleep ended {:?} early", deadline - at);
            assert!(!still, "a sleep that ended is still on the queue");
        }
    }

    #[test]
    fn a_dropped_sleep_leaves_the_queue_and_a_new_waker_is_the_one_woken() {
        let first = Arc::new(Count(AtomicUsize::new(0)));
        let (woke, second) = std::sync::mpsc::sync_channel(1);
        let second_waker = Waker::from(Arc::new(Signal(woke)));
        let mut dropped = Box::pin(Watch::new(Instant::now() + Duration::from_secs(3600)));
        let waker = Waker::from(first.clone());
        assert!(
            dropped
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert!(registered(&dropped));
        let (deadline, id) = (dropped.deadline, dropped.id);
        drop(dropped);
        assert!(id.is_some_and(|id| state().find(deadline, id).is_none()));

        let mut w = Box::pin(Watch::new(Instant::now() + Duration::from_millis(20)));
        let waker = Waker::from(first.clone());
        assert!(
            w.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert!(
            w.as_mut()
                .poll(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        second
            .recv_timeout(Duration::from_secs(10))
            .expect("the watchdog woke the newest waker within 10 s");
        assert_eq!(first.0.load(Ordering::SeqCst), 0, "the old waker was woken");
        assert!(
            w.as_mut()
                .poll(&mut Context::from_waker(&second_waker))
                .is_ready()
        );
        assert!(Instant::now() >= w.deadline);
    }

    #[test]
    fn the_queue_stays_sorted_whatever_the_order_of_arrival() {
        let mut st = State {
            queue: VecDeque::new(),
            next_id: 0,
            wake_at: None,
            started: false,
        };
        let base = Instant::now();
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let ms = [5u64, 1, 9, 5, 0, 7, 7, 3, 9, 2];
        for (id, &m) in ms.iter().enumerate() {
            let deadline = base + Duration::from_millis(m);
            let at = st.position(deadline, id as u64);
            st.queue.insert(
                at,
                Entry {
                    deadline,
                    id: id as u64,
                    waker: waker.clone(),
                },
            );
        }
        let order: Vec<_> = st.queue.iter().map(|e| (e.deadline, e.id)).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        for (id, &m) in ms.iter().enumerate() {
            let deadline = base + Duration::from_millis(m);
            let at = st.find(deadline, id as u64).expect("found");
            assert_eq!(st.queue[at].id, id as u64);
            assert!(st.find(deadline, 99).is_none());
        }
    }
}
