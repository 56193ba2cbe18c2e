//! Running a pipeline: the source, the sink loop, acks and checkpoints.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::Sender;
use futures_lite::{FutureExt, StreamExt, future};
use serde::Serialize;

use crate::pool::checkpoint::Checkpoint;
use crate::pool::dead_letter::Collect;
use crate::pool::queue::{Nack, Queue};
use crate::runtime::coop::Budget;
use crate::runtime::{JoinHandle, SpawnExt, panic_message};
use crate::sync::lock_std as lock;

use super::workers::{TAKE_MAX, Take};
use super::*;
use crate::sync::unless;

impl<In: Send + 'static, T: Send + 'static> Pipeline<In, T> {
    /// Runs the pipeline until the source is drained (or
    /// [`PipelineControl::shutdown`]/[`cancel`](PipelineControl::cancel)),
    /// calling `sink` with every output in turn.
    ///
    /// # Errors
    ///
    /// [`PipelineError::Config`] at once, before anything runs, for a
    /// refused setting (a zero concurrency, capacity, window or batch
    /// size); otherwise [`PipelineError`] if the checkpoint cannot be loaded, a dead letter
    /// cannot be stored, the source queue fails, or a stage task is lost.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future cancels every stage task; the checkpoint keeps
    /// its last saved value, so a restart repeats at most the work past it.
    pub async fn run<F, Fut, E>(self, mut sink: F) -> Result<PipelineReport, PipelineError>
    where
        T: Clone + Serialize,
        F: FnMut(T) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: fmt::Display,
    {
        if let Some(e) = self.invalid {
            return Err(PipelineError::Config(e));
        }
        let resumed_from = match (&self.checkpoint, &self.source) {
            (Some(store), Source::Stream(_)) => store
                .load()
                .await
                .map_err(PipelineError::Checkpoint)?
                .unwrap_or(0),
            _ => 0,
        };
        let queue = match &self.source {
            Source::Queue(q) => Some(q.clone()),
            Source::Stream(_) => None,
        };
        let (ack_tx, ack_rx) = async_channel::unbounded();
        let collect = Arc::new(Collect::default());
        let acks = queue.is_some().then(|| ack_tx.clone());
        let ctx = self.context(resumed_from, acks, collect.clone());

        let (src_tx, src_rx) = hop(self.capacity);
        let out = (self.wire)(&ctx, src_rx);
        let sink_counters = ctx.counters("sink", StageKind::Sink, &out);
        sink_counters.workers.store(1, Ordering::Relaxed);
        let c = ctx.clone();
        let source = self.source;
        ctx.spawn("source", async move {
            match source {
                Source::Stream(s) => read_stream(&c, s, resumed_from, src_tx).await,
                Source::Queue(q) => read_queue(&c, &*q, src_tx).await,
            }
        });
        let side = SideTasks::start(
            &ctx,
            queue.clone(),
            ack_rx,
            self.checkpoint.filter(|_| queue.is_none()),
            self.checkpoint_every,
            resumed_from,
        );

        // The sink runs right here, on the task that awaits `run`.
        let policy = self.sink_policy.as_deref();
        let outputs = drive_sink(&ctx, &out, &sink_counters, policy, &mut sink).await;

        let cancelled = ctx.control.cancelled();
        let task_failed = if cancelled {
            // Stop every stage now and wait until each has stopped: what
            // they held is not done, so the watermark stays before it, and
            // a delivery a task pulled at that moment is registered before
            // the nacks below.
            ctx.cancel_tasks().await;
            None
        } else {
            ctx.join_tasks().await
        };
        if let Some(q) = &queue
            && (cancelled || task_failed.is_some())
        {
            nack_outstanding(&ctx, &**q).await;
        }
        ack_tx.close();
        let checkpoint_error = side.finish(&ctx).await;
        if let Some(e) = task_failed {
            return Err(e);
        }
        let report = report(
            &ctx,
            resumed_from,
            outputs,
            cancelled,
            checkpoint_error,
            &collect,
        );
        if let Some(e) = lock(&ctx.fatal).take() {
            return Err(e);
        }
        tracing::info!(
            inputs = report.inputs,
            outputs = report.outputs,
            dead_letters = report.dead_letters,
            filtered = report.filtered,
            watermark = report.watermark,
            cancelled = report.cancelled,
            "pipeline finished"
        );
        Ok(report)
    }
}

impl<In, T> Pipeline<In, T> {
    /// The state the run's tasks share.
    fn context(
        &self,
        resumed_from: u64,
        acks: Option<Sender<String>>,
        collect: Arc<Collect>,
    ) -> Arc<Ctx> {
        let ctx = Arc::new(Ctx {
            tracker: Tracker::new(resumed_from, self.window, acks),
            dead: self.dead.clone().unwrap_or(collect),
            clock: self.clock.clone(),
            spawner: self.spawner.clone(),
            capacity: self.capacity,
            control: self.control.clone(),
            stages: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            inputs: AtomicU64::new(0),
        });
        *lock(&self.control.state.ctx) = Arc::downgrade(&ctx);
        ctx
    }
}

/// The tasks beside the stages: the acker of a queue source and the
/// checkpoint saver of a stream source.
struct SideTasks {
    acker: Option<JoinHandle<()>>,
    saver: Option<JoinHandle<()>>,
    saver_done: Arc<AtomicBool>,
    checkpoint_error: Arc<Mutex<Option<String>>>,
}

impl SideTasks {
    fn start(
        ctx: &Arc<Ctx>,
        queue: Option<Arc<dyn Queue<Item = impl Send + 'static>>>,
        acks: async_channel::Receiver<String>,
        checkpoint: Option<Arc<dyn Checkpoint>>,
        every: Duration,
        resumed_from: u64,
    ) -> Self {
        let acker = queue.map(|q| {
            ctx.spawner.spawn(async move {
                // Whatever is ready is acked in one call (one round trip
                // for a Redis queue), up to 256 at a time.
                while let Ok(first) = acks.recv().await {
                    let mut ids = vec![first];
                    while ids.len() < 256 {
                        match acks.try_recv() {
                            Ok(id) => ids.push(id),
                            Err(_) => break,
                        }
                    }
                    for (id, r) in ids.iter().zip(q.ack_many(&ids).await) {
                        if let Err(e) = r {
                            tracing::warn!(id = %id, error = %e, "ack failed; the item will be delivered again");
                        }
                    }
                }
            })
        });
        let saver_done = Arc::new(AtomicBool::new(false));
        let checkpoint_error = Arc::new(Mutex::new(None));
        let saver = checkpoint.map(|store| {
            ctx.spawner.spawn(save_checkpoints(
                ctx.clone(),
                store,
                every,
                resumed_from,
                saver_done.clone(),
                checkpoint_error.clone(),
            ))
        });
        SideTasks {
            acker,
            saver,
            saver_done,
            checkpoint_error,
        }
    }

    /// Lets the acker drain (the ack channel is closed by then) and the
    /// saver write the final watermark; a panic in either fails the run.
    /// Returns the checkpoint error to report, if saving failed.
    async fn finish(self, ctx: &Ctx) -> Option<String> {
        if let Some(acker) = self.acker
            && let Err(e) = acker.await
        {
            ctx.fail(task_error("acker", e));
        }
        if let Some(saver) = self.saver {
            self.saver_done.store(true, Ordering::Release);
            ctx.tracker.changed.notify(usize::MAX);
            if let Err(e) = saver.await {
                ctx.fail(task_error("checkpoint", e));
            }
        }
        lock(&self.checkpoint_error).take()
    }
}

/// Puts back every delivery not done: a cancelled or failed run leaves
/// nothing leased.
async fn nack_outstanding<T: Send + 'static>(ctx: &Ctx, queue: &dyn Queue<Item = T>) {
    for id in ctx.tracker.outstanding_ids() {
        if let Err(e) = queue.nack(&id, Nack::Retry).await {
            tracing::warn!(id = %id, error = %e, "nack failed; the lease will expire");
        }
    }
}

/// Calls the sink, turning a panic (in the call or the future) into an
/// error. The returned future does not borrow the sink.
pub(super) fn start_sink<T, F, Fut, E>(
    sink: &mut F,
    value: T,
) -> impl Future<Output = Result<(), String>> + use<T, F, Fut, E>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    let started = catch_unwind(AssertUnwindSafe(|| sink(value)));
    async move {
        let outcome = match started {
            Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
            Err(p) => Err(p),
        };
        match outcome {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(p) => Err(format!("panicked: {}", panic_message(p))),
        }
    }
}

pub(super) async fn read_stream<T: Send + 'static>(
    ctx: &Ctx,
    mut source: BoxStream<T>,
    skip: u64,
    tx: HopTx<Elem<T>>,
) {
    for _ in 0..skip {
        if source.next().await.is_none() {
            tracing::warn!(skip, "source ended before the checkpoint's watermark");
            return;
        }
    }
    let mut budget = Budget::new();
    // NOTE: no more than the channel holds, so a stalled pipeline keeps at
    // most one channel's worth read ahead here.
    let most = TAKE_MAX.min(tx.capacity());
    let mut batch = Vec::with_capacity(most);
    let mut elems = Vec::with_capacity(most);
    // An item read but not yet let into the window.
    let mut next = None;
    loop {
        budget.tick().await;
        if ctx.control.stopping() {
            return;
        }
        let item = match next.take() {
            Some(item) => item,
            None => match future::poll_once(source.next()).await {
                Some(Some(item)) => item,
                Some(None) => return,
                None => match unless(source.next(), ctx.stopped()).await.flatten() {
                    Some(item) => item,
                    None => return,
                },
            },
        };
        ctx.tracker.admit().await;
        batch.push(item);
        // Whatever else is ready and fits in the window goes with it, in
        // one send.
        let (mut ended, mut spent) = (false, false);
        while batch.len() < most {
            if !budget.spend() {
                spent = true;
                break;
            }
            match future::poll_once(source.next()).await {
                Some(Some(item)) if ctx.tracker.try_admit() => batch.push(item),
                Some(Some(item)) => {
                    next = Some(item);
                    break;
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        let first = ctx.tracker.register_many(batch.len());
        ctx.inputs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        elems.extend(batch.drain(..).zip(first..).map(|(value, pos)| Elem {
            value,
            origin: Origin::One(pos),
        }));
        if tx.send_all(&mut elems).await.is_err() || ended {
            return;
        }
        if spent {
            future::yield_now().await;
        }
    }
}

pub(super) async fn read_queue<T: Send + 'static>(
    ctx: &Ctx,
    queue: &dyn Queue<Item = T>,
    tx: HopTx<Elem<T>>,
) {
    let mut budget = Budget::new();
    loop {
        budget.tick().await;
        if ctx.control.stopping() {
            return;
        }
        let pulled = unless(queue.pull(), ctx.stopped())
            .await
            .unwrap_or(Ok(None));
        let delivery = match pulled {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                ctx.fail(PipelineError::Queue(e));
                return;
            }
        };
        // NOTE: registered before any await, so a cancel at any later point
        // finds the delivery among the outstanding ones and nacks it. The
        // window is then entered one position late, which is harmless.
        let pos = ctx.tracker.register(Some(delivery.id));
        ctx.tracker.admit().await;
        ctx.inputs.fetch_add(1, Ordering::Relaxed);
        if tx
            .send(Elem {
                value: delivery.item,
                origin: Origin::One(pos),
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

pub(super) async fn save_checkpoints(
    ctx: Arc<Ctx>,
    store: Arc<dyn Checkpoint>,
    every: Duration,
    mut saved: u64,
    done: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
) {
    loop {
        let listener = ctx.tracker.changed.listen();
        let finishing = done.load(Ordering::Acquire);
        let wm = ctx.tracker.watermark.load(Ordering::Acquire);
        if wm != saved {
            match store.save(wm).await {
                Ok(()) => {
                    tracing::debug!(watermark = wm, "checkpoint saved");
                    saved = wm;
                }
                Err(e) => {
                    tracing::warn!(watermark = wm, error = %e, "checkpoint save failed");
                    *lock(&error) = Some(e.to_string());
                    if finishing {
                        return;
                    }
                }
            }
            if !finishing {
                let l = ctx.tracker.changed.listen();
                if !done.load(Ordering::Acquire) {
                    ctx.clock
                        .sleep(every)
                        .or(async {
                            // Woken early only to finish.
                            let mut l = l;
                            while !done.load(Ordering::Acquire) {
                                l.await;
                                l = ctx.tracker.changed.listen();
                            }
                        })
                        .await;
                }
            }
            continue;
        }
        if finishing {
            return;
        }
        listener.await;
    }
}

/// Feeds every output to the sink (under its policy, if any) until the
/// stages are drained or the pipeline is cancelled; returns the outputs
/// the sink accepted.
async fn drive_sink<T, F, Fut, E>(
    ctx: &Ctx,
    out: &HopRx<Elem<T>>,
    sink_counters: &Counters,
    sink_policy: Option<&Policy>,
    sink: &mut F,
) -> u64
where
    T: Clone + Serialize + Send + 'static,
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    let mut outputs = 0u64;
    let mut budget = Budget::new();
    let mut take = Take::default();
    let mut pending = VecDeque::new();
    // When the elements in hand were taken, and how many.
    let mut taken = (Instant::now(), 0);
    loop {
        budget.tick().await;
        if ctx.control.cancelled() {
            break;
        }
        if pending.is_empty() {
            if taken.1 > 0 {
                take.record(taken.1, taken.0.elapsed());
            }
            let l = ctx.control.state.event.listen();
            if ctx.control.cancelled() {
                break;
            }
            let got = out
                .recv_into(take.size(), &mut pending)
                .or(async {
                    l.await;
                    Ok(0)
                })
                .await;
            match got {
                Ok(0) => continue,
                Ok(n) => taken = (Instant::now(), n),
                Err(_) => break,
            }
        }
        let Some(elem) = pending.pop_front() else {
            continue;
        };
        bump(&sink_counters.received, 1);
        bump(&sink_counters.in_flight, 1);
        let Elem { value, origin } = elem;
        // NOTE: a cancel interrupts a sink call in progress; the item
        // is then not done, so the watermark stays before it.
        let call = async {
            match sink_policy {
                None => (start_sink(&mut *sink, value.clone()).await, 1, value),
                Some(p) => {
                    let mut attempts = 0u32;
                    let cell = Mutex::new(value);
                    let r = p
                        .run(|| {
                            attempts += 1;
                            start_sink(&mut *sink, lock(&cell).clone())
                        })
                        .await
                        .map_err(|e| e.to_string());
                    let value = cell.into_inner().unwrap_or_else(|e| e.into_inner());
                    (r, attempts.max(1), value)
                }
            }
        };
        let Some((r, attempts, value)) = unless(call, ctx.cancelled()).await else {
            break;
        };
        let elem = Elem { value, origin };
        sink_counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(()) => {
                outputs += 1;
                bump(&sink_counters.emitted, 1);
                ctx.tracker.complete(&elem.origin);
            }
            Err(error) => {
                if !ctx
                    .dead_letter(sink_counters, elem.value, error, attempts, &elem.origin)
                    .await
                {
                    break;
                }
            }
        }
    }

    outputs
}

/// The run's report from the stage counters and the tracker.
fn report(
    ctx: &Ctx,
    resumed_from: u64,
    outputs: u64,
    cancelled: bool,
    checkpoint_error: Option<String>,
    collect: &Collect,
) -> PipelineReport {
    let stages = ctx.stage_stats();
    let sum = |f: fn(&StageStats) -> u64| stages.iter().map(f).sum::<u64>();
    PipelineReport {
        resumed_from,
        inputs: ctx.inputs.load(Ordering::Relaxed),
        outputs,
        dead_letters: sum(|s| s.dead_letters),
        filtered: sum(|s| s.filtered),
        watermark: ctx.tracker.watermark.load(Ordering::Acquire),
        cancelled,
        checkpoint_error,
        dead: std::mem::take(&mut *lock(&collect.letters)),
        stages,
    }
}
