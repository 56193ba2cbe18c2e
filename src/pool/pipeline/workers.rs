//! The workers of a stage: a fixed number, or autoscaled between a minimum
//! and a maximum from the input queue (like `WorkerPool`).
//!
//! A worker takes several elements at once when they are fast (sized to
//! about [`TAKE_NANOS`] of work from the time its last take took), runs
//! its step on each, and sends what they made on in one go; slow elements
//! go one at a time, so they spread over the stage's workers.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::hop::{HopRx, HopTx};
use super::stage::{Counters, StageScale, bump};
use super::{Ctx, Elem, Origin};
use crate::runtime::coop::Budget;
use crate::sync::unless;

/// About how long the elements of one take should keep a worker busy.
const TAKE_NANOS: u64 = 20_000;

/// The most elements a worker takes at once.
pub(super) const TAKE_MAX: usize = 32;

/// What a stage's step made of one element.
pub(super) enum Out<T, B> {
    /// One element to send on.
    One(Elem<B>),
    /// Any number to send on (a `flat_map`), all from the same input.
    Many(Vec<Elem<B>>),
    /// Rejected by a filter: its position is done.
    Filtered(Origin),
    /// A dead letter: the input, the error, and the attempts made.
    Dead(Elem<T>, String, u32),
}

/// How many elements a worker takes next: one until it knows how long one
/// takes, then as many as fit in [`TAKE_NANOS`] (1 to [`TAKE_MAX`]).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Take {
    /// Average nanoseconds per element; 0 while unknown.
    nanos: u64,
}

impl Take {
    pub(super) fn size(&self) -> usize {
        TAKE_NANOS.checked_div(self.nanos).map_or(1, |n| {
            usize::try_from(n).unwrap_or(TAKE_MAX).clamp(1, TAKE_MAX)
        })
    }

    /// `n` elements took `spent`.
    pub(super) fn record(&mut self, n: usize, spent: Duration) {
        let each = u64::try_from(spent.as_nanos() / n.max(1) as u128)
            .unwrap_or(u64::MAX)
            .max(1);
        // The last take counts for a quarter: one odd element does not
        // swing the size.
        self.nanos = match self.nanos {
            0 => each,
            avg => avg.saturating_mul(3).saturating_add(each) / 4,
        };
    }
}

/// Spawns a stage's workers: each takes elements from `rx`, runs `step` on
/// them and sends what they make to `tx`, until the input ends or a send
/// or a dead letter fails.
pub(super) struct Workers<T, B, F> {
    pub(super) ctx: Arc<Ctx>,
    pub(super) counters: Arc<Counters>,
    pub(super) rx: HopRx<Elem<T>>,
    pub(super) tx: HopTx<Elem<B>>,
    pub(super) step: F,
    /// With autoscaling: its settings and the resolved scale-up depth.
    pub(super) scale: Option<(StageScale, usize)>,
}

impl<T, B, F: Clone> Clone for Workers<T, B, F> {
    fn clone(&self) -> Self {
        Workers {
            ctx: self.ctx.clone(),
            counters: self.counters.clone(),
            rx: self.rx.clone(),
            tx: self.tx.clone(),
            step: self.step.clone(),
            scale: self.scale,
        }
    }
}

/// Counts a worker out when it ends, however it ends (`None`: already
/// counted out by an idle leave).
struct Leave(Option<Arc<Counters>>);

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.workers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<T, B, F, Fut> Workers<T, B, F>
where
    T: Serialize + Send + 'static,
    B: Send + 'static,
    F: Fn(Elem<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Out<T, B>> + Send + 'static,
{
    /// Starts `concurrency` workers, or the autoscale minimum.
    pub(super) fn start(self, concurrency: usize) {
        let n = self.scale.map_or(concurrency, |(s, _)| s.min);
        for _ in 0..n {
            self.counters.workers.fetch_add(1, Ordering::AcqRel);
            self.clone().spawn();
        }
    }

    /// Spawns one worker already counted in `counters.workers`.
    fn spawn(self) {
        let ctx = self.ctx.clone();
        let name = self.counters.name.clone();
        ctx.spawn(&name, self.run());
    }

    async fn run(self) {
        let mut leave = Leave(Some(self.counters.clone()));
        let mut budget = Budget::new();
        let mut take = Take::default();
        let mut input = VecDeque::new();
        let mut output = Vec::new();
        loop {
            let got = match self.scale {
                None => self.rx.recv_into(take.size(), &mut input).await,
                Some((scale, _)) => {
                    // NOTE: `recv_into` moves elements only as it returns,
                    // so losing the race to the sleep loses none.
                    let recv = self.rx.recv_into(take.size(), &mut input);
                    match unless(recv, self.ctx.clock.sleep(scale.idle)).await {
                        Some(got) => got,
                        None if self.try_leave(scale.min) => {
                            leave.0 = None;
                            return;
                        }
                        None => continue,
                    }
                }
            };
            let Ok(n) = got else { return };
            self.maybe_grow();
            let (received, filtered) = (&self.counters.received, &self.counters.filtered);
            bump(received, n as u64);
            bump(&self.counters.in_flight, n as u64);
            let started = Instant::now();
            let mut rejected = 0;
            while let Some(elem) = input.pop_front() {
                budget.tick().await;
                match (self.step)(elem).await {
                    Out::One(e) => output.push(e),
                    Out::Many(v) => output.extend(v),
                    Out::Filtered(origin) => {
                        rejected += 1;
                        self.ctx.tracker.complete(&origin);
                    }
                    Out::Dead(elem, error, attempts) => {
                        let c = &self.counters;
                        if !self
                            .ctx
                            .dead_letter(c, elem.value, error, attempts, &elem.origin)
                            .await
                        {
                            return;
                        }
                    }
                }
            }
            take.record(n, started.elapsed());
            self.counters
                .in_flight
                .fetch_sub(n as u64, Ordering::Relaxed);
            if rejected > 0 {
                bump(filtered, rejected);
            }
            if !output.is_empty() {
                bump(&self.counters.emitted, output.len() as u64);
                if self.tx.send_all(&mut output).await.is_err() {
                    return;
                }
            }
        }
    }

    /// An idle worker leaves unless the stage is at its minimum; the
    /// count drops here, atomically with the check.
    fn try_leave(&self, min: usize) -> bool {
        let left = self
            .counters
            .workers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > min).then(|| n - 1)
            })
            .is_ok();
        if left {
            tracing::debug!(stage = %self.counters.name, "stage worker idle: leaving");
        }
        left
    }

    /// Starts another worker when more than the scale-up depth wait.
    fn maybe_grow(&self) {
        let Some((scale, up_at)) = self.scale else {
            return;
        };
        if self.rx.len() <= up_at {
            return;
        }
        let grown = self
            .counters
            .workers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < scale.max).then_some(n + 1)
            })
            .is_ok();
        if grown {
            tracing::debug!(stage = %self.counters.name, queued = self.rx.len(), "stage scaling up");
            self.clone().spawn();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_is_one_until_timed_then_follows_the_time_per_element() {
        let mut t = Take::default();
        assert_eq!(t.size(), 1);
        t.record(1, Duration::from_nanos(100));
        assert_eq!(t.size(), TAKE_MAX, "fast elements: a full take");
        let mut slow = Take::default();
        slow.record(2, Duration::from_millis(2));
        assert_eq!(slow.size(), 1, "1 ms each: one at a time");
        let mut mid = Take::default();
        mid.record(4, Duration::from_micros(20));
        assert_eq!(mid.size(), 4, "5 µs each: four to 20 µs");
        mid.record(1, Duration::from_millis(1));
        assert_eq!(mid.size(), 1, "one slow element weighs a quarter");
    }
}
