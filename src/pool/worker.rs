//! A worker of a [`WorkerPool`](super::WorkerPool): the task that takes
//! jobs and `process` batches from the queue and runs them, leaves when the
//! pool shrinks or idles, and keeps the pool's counters.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_channel::TryRecvError;
use futures_lite::FutureExt;

use super::error::JobError;
use super::process::{self, Batch};
use super::worker_pool::{Shared, Work};
use crate::runtime::coop::Budget;
use crate::runtime::{SpawnExt, panic_message};

enum Wake<J> {
    Job(J),
    Closed,
    Recheck,
    Idle,
}

impl<I, O, E> Shared<I, O, E>
where
    I: Send + 'static,
    O: Send + 'static,
    E: Send + 'static,
{
    pub(super) fn start_worker(this: &Arc<Self>) {
        this.live.fetch_add(1, Ordering::AcqRel);
        let shared = this.clone();
        this.spawner
            .spawn_named(&this.name, async move {
                let mut exit = Exit {
                    shared: &shared,
                    counted: false,
                };
                shared.work(&mut exit).await;
            })
            .detach();
    }

    /// Takes one worker off `live` if there are more than the target.
    fn try_retire(&self, exit: &mut Exit<'_, I, O, E>) -> bool {
        let mut live = self.live.load(Ordering::Acquire);
        loop {
            if live <= self.target.load(Ordering::Acquire) {
                return false;
            }
            match self.live.compare_exchange_weak(
                live,
                live - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    exit.counted = true;
                    self.exited.notify(usize::MAX);
                    return true;
                }
                Err(now) => live = now,
            }
        }
    }

    async fn work(&self, exit: &mut Exit<'_, I, O, E>) {
        // Jobs that are all ready and finish at once would keep this task
        // on its thread for as long as the queue has jobs.
        let mut budget = Budget::new();
        loop {
            budget.tick().await;
            if self.try_retire(exit) {
                return;
            }
            let job = match self.rx.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Closed) => return,
                Err(TryRecvError::Empty) => match self.wait().await {
                    Wake::Job(job) => job,
                    Wake::Closed => return,
                    Wake::Recheck => continue,
                    Wake::Idle => {
                        let Some(scale) = self.autoscale else {
                            continue;
                        };
                        let mut cur = self.target.load(Ordering::Acquire);
                        while cur > scale.min {
                            match self.target.compare_exchange_weak(
                                cur,
                                cur - 1,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            ) {
                                Ok(_) => {
                                    tracing::debug!(pool = %self.name, workers = cur - 1, "idle worker leaving");
                                    break;
                                }
                                Err(now) => cur = now,
                            }
                        }
                        continue;
                    }
                },
            };
            self.run(job).await;
        }
    }

    async fn wait(&self) -> Wake<Work<I, O, E>> {
        let retire = self.retire.listen();
        if self.live.load(Ordering::Acquire) > self.target.load(Ordering::Acquire) {
            return Wake::Recheck;
        }
        let _idle = Idle::enter(&self.idle);
        let recv = async {
            match self.rx.recv().await {
                Ok(job) => Wake::Job(job),
                Err(_) => Wake::Closed,
            }
        };
        let retire = async {
            retire.await;
            Wake::Recheck
        };
        match self.autoscale {
            Some(scale) => {
                let idle = async {
                    self.clock.sleep(scale.idle).await;
                    Wake::Idle
                };
                recv.or(retire).or(idle).await
            }
            None => recv.or(retire).await,
        }
    }

    async fn run(&self, work: Work<I, O, E>) {
        match work {
            Work::One(mut job) => {
                let result = self.call(job.item).await;
                job.reply.finish(result);
            }
            Work::Batch(batch) => self.run_batch(batch).await,
        }
    }

    /// Runs the handler on one item, counted.
    pub(super) async fn call(&self, item: I) -> Result<O, JobError<E>> {
        self.running.fetch_add(1, Ordering::Relaxed);
        let mut tally = Tally::new(self);
        let result = self.handle(item, &mut tally).await;
        drop(tally);
        self.running.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// Runs the handler on one item, catching a panic; counts the outcome
    /// in `tally`.
    async fn handle(&self, item: I, tally: &mut Tally<'_, I, O, E>) -> Result<O, JobError<E>> {
        let handler = &self.handler;
        match AssertUnwindSafe(async move { handler(item).await })
            .catch_unwind()
            .await
        {
            Ok(Ok(v)) => {
                tally.completed += 1;
                Ok(v)
            }
            Ok(Err(e)) => {
                tally.failed += 1;
                Err(JobError::Failed(e))
            }
            Err(payload) => {
                let msg = panic_message(payload);
                tracing::warn!(pool = %self.name, panic = %msg, "job panicked; worker carries on");
                tally.failed += 1;
                tally.panicked += 1;
                Err(JobError::Panicked(msg))
            }
        }
    }

    /// Runs a batch's items in order. A batch taking longer than expected
    /// while another worker is idle hands half of what is left back to
    /// the queue for it, so slow jobs still spread over the workers. The
    /// time per item feeds the next batches' size.
    async fn run_batch(&self, mut batch: Batch<I, O, E>) {
        let start = Instant::now();
        let mut ran = 0u64;
        // NOTE: counted once per batch, not per item: the counters are
        // shared by every worker.
        self.running.fetch_add(1, Ordering::Relaxed);
        let mut tally = Tally::new(self);
        while batch.has_next() {
            if ran % 4 == 3
                && self.idle.load(Ordering::Acquire) > 0
                && start.elapsed() >= process::SPLIT_AFTER
            {
                batch.hand_half_back(&self.requeue);
            }
            let item = batch.start();
            let result = self.handle(item, &mut tally).await;
            batch.finish(result);
            ran += 1;
        }
        drop(tally);
        self.running.fetch_sub(1, Ordering::Relaxed);
        let per_item = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX) / ran.max(1);
        // A moving average: a quarter of the new sample.
        let _ = self
            .item_nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(if avg == 0 {
                    per_item.max(1)
                } else {
                    (avg - avg / 4 + per_item / 4).max(1)
                })
            });
    }

    /// The average time of a `process` item, in nanoseconds (0 before the
    /// first batch).
    pub(super) fn item_nanos(&self) -> u64 {
        self.item_nanos.load(Ordering::Relaxed)
    }
}

/// Outcomes counted locally and added to the pool's counters once, when
/// dropped (also when the worker is dropped mid-batch).
struct Tally<'a, I, O, E> {
    shared: &'a Shared<I, O, E>,
    completed: u64,
    failed: u64,
    panicked: u64,
}

impl<'a, I, O, E> Tally<'a, I, O, E> {
    fn new(shared: &'a Shared<I, O, E>) -> Self {
        Tally {
            shared,
            completed: 0,
            failed: 0,
            panicked: 0,
        }
    }
}

impl<I, O, E> Drop for Tally<'_, I, O, E> {
    fn drop(&mut self) {
        let s = self.shared;
        for (counter, n) in [
            (&s.completed, self.completed),
            (&s.failed, self.failed),
            (&s.panicked, self.panicked),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Counts a worker waiting for work while it waits.
struct Idle<'a>(&'a AtomicUsize);

impl<'a> Idle<'a> {
    fn enter(idle: &'a AtomicUsize) -> Self {
        idle.fetch_add(1, Ordering::AcqRel);
        Idle(idle)
    }
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a worker out however it ends (including being dropped by its
/// executor).
struct Exit<'a, I, O, E> {
    shared: &'a Shared<I, O, E>,
    counted: bool,
}

impl<I, O, E> Drop for Exit<'_, I, O, E> {
    fn drop(&mut self) {
        if !self.counted {
            self.shared.live.fetch_sub(1, Ordering::AcqRel);
            self.shared.exited.notify(usize::MAX);
        }
    }
}
