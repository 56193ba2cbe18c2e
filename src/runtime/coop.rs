//! Cooperative yielding: a source that keeps finding work ready gives the
//! thread back after a budget of ready items.
//!
//! A loop over a channel that always has an item ready never returns
//! `Pending`, so the task it runs in never lets the executor run anything
//! else on that thread, and a `timeout` or `select` wrapped around it is
//! never polled again until the loop ends. tokio answers this with a
//! per-task budget reset by its scheduler; smolkit runs on executors it
//! does not own, so each consuming end (a `process` stream, a worker, a
//! subscriber, a pipeline stage) carries its own [`Budget`]: after
//! [`BUDGET`] ready items in a row it returns `Pending` once, having woken
//! itself, and the executor puts the task at the back of its queue.
//!
//! The cost is one extra poll per [`BUDGET`] items.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Ready items a source hands out in a row before it yields once.
///
/// NOTE: 256, not tokio's 128: a yield costs a trip through the executor,
/// and on a consumer that drains ready events doing nothing else
/// (callgrind, 200k events through a `Subscriber` on `smol::block_on`)
/// the budget cost 3.7% of the instructions at 128 and 1.9% at 256.
pub(crate) const BUDGET: u32 = 256;

/// Counts ready items in a row; see the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    left: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

impl Budget {
    /// A full budget.
    pub(crate) const fn new() -> Self {
        Budget { left: BUDGET }
    }

    /// Call before handing out a ready item: `Ready` while the budget
    /// lasts; once it is spent, wakes the task and returns `Pending` (and
    /// starts a new budget), so the caller returns `Pending` too.
    #[inline]
    pub(crate) fn poll_proceed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.spend() {
            Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Spends one item; `false` when the budget is spent (it starts over),
    /// and the caller should yield.
    #[inline]
    pub(crate) fn spend(&mut self) -> bool {
        if self.left == 0 {
            self.left = BUDGET;
            false
        } else {
            self.left -= 1;
            true
        }
    }

    /// The source had nothing ready (it returned `Pending` on its own): the
    /// streak is over.
    #[inline]
    pub(crate) fn reset(&mut self) {
        self.left = BUDGET;
    }

    /// For async loops: spends one item and, when the budget is spent,
    /// yields to the executor once.
    #[inline]
    pub(crate) fn tick(&mut self) -> Tick {
        Tick {
            yield_now: !self.spend(),
        }
    }
}

/// The future of [`Budget::tick`].
#[derive(Debug)]
#[must_use = "futures do nothing unless you .await or poll them"]
pub(crate) struct Tick {
    yield_now: bool,
}

impl Future for Tick {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yield_now {
            self.yield_now = false;
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn a_budget_yields_once_every_budget_items_and_starts_over() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut b = Budget::new();
        let mut pending = Vec::new();
        for i in 0..(3 * (BUDGET + 1)) {
            if b.poll_proceed(&mut cx).is_pending() {
                pending.push(i);
            }
        }
        assert_eq!(pending, vec![BUDGET, 2 * BUDGET + 1, 3 * BUDGET + 2]);
        let mut b = Budget::new();
        for _ in 0..BUDGET {
            assert!(b.spend());
        }
        b.reset();
        assert!(b.spend(), "a reset starts a new streak");
    }

    #[test]
    fn a_tick_is_ready_until_the_budget_is_spent() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut b = Budget::new();
        for _ in 0..BUDGET {
            assert!(Pin::new(&mut b.tick()).poll(&mut cx).is_ready());
        }
        let mut t = b.tick();
        assert!(Pin::new(&mut t).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut t).poll(&mut cx).is_ready());
    }
}
