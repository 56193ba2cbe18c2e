//! Ordered bounded concurrency on the caller's task, for `batch`.

use std::sync::atomic::AtomicBool;
use std::task::Context;

use super::*;

/// Runs the futures at most `n` at a time and returns their outputs in
/// input order, on the caller's task (nothing is spawned).
///
/// Each running future has a waker of its own that queues its place when
/// it fires, so a wake-up polls the future it woke, not every one in
/// flight (O(1) per wake-up, like `FuturesUnordered`, without `unsafe`).
/// After a budget of polls in one go it yields, so a batch whose futures
/// keep waking never starves the rest of the executor.
pub(super) async fn ordered_concurrent<I, F>(futures: I, n: usize) -> Vec<F::Output>
where
    I: Iterator<Item = F>,
    F: Future,
{
    let ready = Arc::new(Ready::default());
    let mut pending = futures.enumerate();
    let mut exhausted = false;
    // A place per running future: its input index, the future, its waker.
    let mut places: Vec<Option<(usize, Pin<Box<F>>)>> = Vec::new();
    let mut wakers: Vec<(Arc<PlaceWaker>, std::task::Waker)> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut running = 0usize;
    let mut done: Vec<(usize, F::Output)> = Vec::new();
    std::future::poll_fn(|cx| {
        ready.parent.register(cx.waker());
        let mut budget = BUDGET.max(2 * n);
        loop {
            while !exhausted && running < n {
                let Some((index, future)) = pending.next() else {
                    exhausted = true;
                    break;
                };
                let place = free.pop().unwrap_or_else(|| {
                    places.push(None);
                    let waker = Arc::new(PlaceWaker {
                        place: places.len() - 1,
                        queued: AtomicBool::new(false),
                        ready: ready.clone(),
                    });
                    wakers.push((waker.clone(), std::task::Waker::from(waker)));
                    places.len() - 1
                });
                places[place] = Some((index, Box::pin(future)));
                running += 1;
                // Queued for its first poll, without waking this task: the
                // loop below drains the queue now.
                wakers[place].0.queued.store(true, Ordering::Release);
                lock(&ready.queue).push_back(place);
            }
            if running == 0 && exhausted {
                return Poll::Ready(());
            }
            let Some(place) = lock(&ready.queue).pop_front() else {
                return Poll::Pending;
            };
            if budget == 0 {
                // Put it back and let the executor run others first.
                lock(&ready.queue).push_front(place);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            budget -= 1;
            let (waker, task_waker) = &wakers[place];
            waker.queued.store(false, Ordering::Release);
            // A stale wake-up of a place whose future finished (or that
            // holds another future now) polls nothing or polls once more.
            let Some((index, future)) = places[place].as_mut() else {
                continue;
            };
            if let Poll::Ready(out) = future.as_mut().poll(&mut Context::from_waker(task_waker)) {
                done.push((*index, out));
                places[place] = None;
                free.push(place);
                running -= 1;
            }
        }
    })
    .await;
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, out)| out).collect()
}

/// Polls in one go before `ordered_concurrent` yields (at least twice the
/// concurrency).
const BUDGET: usize = 256;

/// The places whose futures were woken, and the task polling them.
#[derive(Default)]
struct Ready {
    queue: Mutex<std::collections::VecDeque<usize>>,
    parent: atomic_waker::AtomicWaker,
}

/// The waker of one place: queues the place (once until it is polled)
/// and wakes the batch's task.
struct PlaceWaker {
    place: usize,
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl PlaceWaker {
    fn wake_queue(&self) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.ready.queue).push_back(self.place);
            self.ready.parent.wake();
        }
    }
}

impl std::task::Wake for PlaceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_queue();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A future that wakes itself `yields` times before it is ready,
    /// counting every poll it gets.
    struct Yielding {
        left: usize,
        polls: Arc<AtomicUsize>,
        out: usize,
    }

    impl Future for Yielding {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.left == 0 {
                return Poll::Ready(self.out);
            }
            self.left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Stays pending (polls counted) until `gate` opens.
    struct Sleeper {
        gate: Arc<Mutex<(bool, Vec<std::task::Waker>)>>,
        polls: Arc<AtomicUsize>,
        out: usize,
    }

    impl Future for Sleeper {
        type Output = usize;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            let mut gate = lock(&self.gate);
            if gate.0 {
                return Poll::Ready(self.out);
            }
            gate.1.push(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Each wake-up polls the future it woke, not every future in flight:
    /// 63 futures wait for the end while 1 000 others pass through the
    /// last place, each woken 10 times. About 11 000 polls (the first
    /// version polled all 64 on every wake-up: about 700 000).
    #[test]
    fn a_wake_up_polls_only_the_future_it_woke() {
        let polls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new((false, Vec::new())));
        let finished = Arc::new(AtomicUsize::new(0));
        let sleepers = (0..63).map(|out| {
            Box::pin(Sleeper {
                gate: gate.clone(),
                polls: polls.clone(),
                out,
            }) as Pin<Box<dyn Future<Output = usize> + Send>>
        });
        let quick = (63..1063).map(|out| {
            let (polls, gate, finished) = (polls.clone(), gate.clone(), finished.clone());
            Box::pin(async move {
                let n = Yielding {
                    left: 10,
                    polls,
                    out,
                }
                .await;
                if finished.fetch_add(1, Ordering::SeqCst) + 1 == 1000 {
                    let mut g = lock(&gate);
                    g.0 = true;
                    g.1.drain(..).for_each(std::task::Waker::wake);
                }
                n
            }) as Pin<Box<dyn Future<Output = usize> + Send>>
        });
        let outs = futures_lite::future::block_on(ordered_concurrent(sleepers.chain(quick), 64));
        assert_eq!(outs, (0..1063).collect::<Vec<_>>());
        let polls = polls.load(Ordering::Relaxed);
        assert!(polls <= 12_000, "{polls} polls for about 11 000 wake-ups");
    }

    /// Futures that wake themselves at once never keep the batch's task
    /// from yielding: a task beside it makes progress meanwhile.
    #[test]
    fn a_busy_batch_yields_to_other_tasks() {
        let polls = Arc::new(AtomicUsize::new(0));
        let futures = (0..64).map(|out| Yielding {
            left: 1000,
            polls: polls.clone(),
            out,
        });
        let ticks = Arc::new(AtomicUsize::new(0));
        let other = {
            let ticks = ticks.clone();
            async move {
                for _ in 0..10 {
                    ticks.fetch_add(1, Ordering::SeqCst);
                    futures_lite::future::yield_now().await;
                }
            }
        };
        let seen = futures_lite::future::block_on(futures_lite::future::zip(
            async {
                ordered_concurrent(futures, 64).await;
                ticks.load(Ordering::SeqCst)
            },
            other,
        ))
        .0;
        assert_eq!(seen, 10, "the other task ran while the batch was busy");
    }

    #[test]
    fn never_more_than_n_at_once_and_outputs_in_input_order() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let futures = (0..200usize).map(|i| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Later inputs finish first.
                for _ in 0..(200 - i) % 7 {
                    futures_lite::future::yield_now().await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
                i
            }
        });
        let outs = futures_lite::future::block_on(ordered_concurrent(futures, 8));
        assert_eq!(outs, (0..200).collect::<Vec<_>>());
        assert!(most.load(Ordering::SeqCst) <= 8);
    }
}
