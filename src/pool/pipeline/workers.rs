//! The workers of a stage: a fixed number, or autoscaled between a minimum
//! and a maximum from the input queue (like `WorkerPool`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_channel::Receiver;

use super::stage::{Counters, StageScale};
use super::{Ctx, Elem};
use crate::runtime::coop::Budget;
use crate::sync::unless;

/// Spawns a stage's workers: each takes elements from `rx` and runs `step`
/// on them until it returns `false` or the input ends.
pub(super) struct Workers<T, F> {
    pub(super) ctx: Arc<Ctx>,
    pub(super) counters: Arc<Counters>,
    pub(super) rx: Receiver<Elem<T>>,
    pub(super) step: F,
    /// With autoscaling: its settings and the resolved scale-up depth.
    pub(super) scale: Option<(StageScale, usize)>,
}

impl<T, F: Clone> Clone for Workers<T, F> {
    fn clone(&self) -> Self {
        Workers {
            ctx: self.ctx.clone(),
            counters: self.counters.clone(),
            rx: self.rx.clone(),
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

impl<T, F, Fut> Workers<T, F>
where
    T: Send + 'static,
    F: Fn(Elem<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
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
        loop {
            budget.tick().await;
            let elem = match self.scale {
                None => match self.rx.recv().await {
                    Ok(e) => e,
                    Err(_) => return,
                },
                Some((scale, _)) => {
                    match unless(self.rx.recv(), self.ctx.clock.sleep(scale.idle)).await {
                        Some(Ok(e)) => e,
                        Some(Err(_)) => return,
                        None if self.try_leave(scale.min) => {
                            leave.0 = None;
                            return;
                        }
                        None => continue,
                    }
                }
            };
            self.maybe_grow();
            if !(self.step)(elem).await {
                return;
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
