//! [`Pipeline`]: source → stages → sink, with dead letters and checkpoints.
//!
//! # How items are tracked
//!
//! Every input item gets a *position* (0, 1, 2, … from the start of the
//! source). Each element flowing between stages carries the positions it
//! came from: one for a mapped item, several for a batch, and the outputs
//! of a `flat_map` share their input's. A position is *done* once every
//! element derived from it has reached the sink, a dead-letter sink, or a
//! filter's rejection. The *watermark* is the count of done positions from
//! the start with no gap; it is what a [`Checkpoint`] stores, and a
//! restarted pipeline skips that many source items. Positions past the
//! watermark may have been partly processed before a crash, so after a
//! restart their items may reach the sink again: delivery is
//! at-least-once, with duplicates only past the saved watermark.
//!
//! The source may run at most `window` positions ahead of the watermark
//! (default 65 536), which bounds the bookkeeping (and how much work a
//! restart repeats) even behind one slow item.

mod control;
mod run;
mod stage;
mod tracker;
mod workers;

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_channel::{Receiver, Sender};
use futures_lite::{FutureExt, Stream, StreamExt};
use serde::Serialize;

use super::BoxFut;
use super::checkpoint::Checkpoint;
use super::dead_letter::DeadLetterSink;
use super::queue::Queue;
use crate::ConfigError;
use crate::resilience::Policy;
use crate::runtime::{Clock, Spawn, SystemClock, default_spawner, offload, panic_message};
use crate::stream::StreamKit;

use control::{Ctx, task_error};
pub use control::{PipelineControl, PipelineError, PipelineReport};
use stage::{Counters, attempt, bump, settle};
pub use stage::{Stage, StageKind, StageStats};
use tracker::{Elem, Origin, Tracker};
use workers::Workers;

type StageFn<A, B> = Arc<dyn Fn(A) -> BoxFut<'static, Result<B, String>> + Send + Sync>;
type Wire<In, T> = Box<dyn FnOnce(&Arc<Ctx>, Receiver<Elem<In>>) -> Receiver<Elem<T>> + Send>;
type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = T> + Send>>;
/// What a stage's step needs: the run's context, the stage's counters and
/// its output.
type Link<B> = (Arc<Ctx>, Arc<Counters>, Sender<Elem<B>>);

enum Source<T> {
    Stream(BoxStream<T>),
    Queue(Arc<dyn Queue<Item = T>>),
}

/// A source of items flowing through stages into a sink.
///
/// Build it from a stream ([`from_stream`](Pipeline::from_stream)) or a
/// [`Queue`] ([`from_queue`](Pipeline::from_queue)), add stages, and
/// [`run`](Pipeline::run) it with a sink. Stages run as tasks on a
/// [`Spawn`] (default: the default spawner (the current `Runtime`, else smol's global executor)), linked by bounded channels
/// so a slow stage or sink slows the source instead of filling memory.
/// A stage function that fails (after its [`Stage::with_policy`] retries)
/// or panics turns the item into a [`DeadLetter`](super::DeadLetter); nothing is dropped.
/// See the module docs above for positions, the watermark and checkpoints.
///
/// Items of stages that can fail must be `Clone` (retries and dead letters
/// need the original) and `Serialize` (dead letters keep them as JSON).
///
/// # Default
///
/// Channel capacity 64, window 65 536 positions, checkpoint saves at most
/// once a second, dead letters kept in the report, the default spawner (the current `Runtime`, else smol's global executor),
/// the system clock.
///
/// # Examples
///
/// ```
/// use smolkit::pool::{Pipeline, Stage};
///
/// smol::block_on(async {
///     let mut out = Vec::new();
///     let report = Pipeline::from_stream(futures_lite::stream::iter(1..=10u32))
///         .map(Stage::new("halve").with_concurrency(4).with_ordered(true), |x| async move {
///             if x % 2 == 0 { Ok(x / 2) } else { Err(format!("{x} is odd")) }
///         })
///         .batch("pairs", 2, std::time::Duration::from_secs(1))
///         .run(|pair| {
///             out.push(pair);
///             async { Ok::<_, String>(()) }
///         })
///         .await
///         .unwrap();
///     assert_eq!(out, vec![vec![1, 2], vec![3, 4], vec![5]]);
///     assert_eq!((report.inputs, report.dead_letters, report.watermark), (10, 5, 10));
///     assert_eq!(report.dead[0].error, "1 is odd");
/// });
/// ```
pub struct Pipeline<In, T> {
    source: Source<In>,
    wire: Wire<In, T>,
    capacity: usize,
    window: usize,
    spawner: Arc<dyn Spawn>,
    clock: Arc<dyn Clock>,
    checkpoint: Option<Arc<dyn Checkpoint>>,
    checkpoint_every: Duration,
    dead: Option<Arc<dyn DeadLetterSink>>,
    sink_policy: Option<Arc<Policy>>,
    control: PipelineControl,
    /// The first refused setting; [`run`](Pipeline::run) returns it before
    /// anything runs.
    invalid: Option<ConfigError>,
}

impl<In: Send + 'static> Pipeline<In, In> {
    /// A pipeline reading `source`. With a checkpoint, the source must
    /// yield the same items in the same order on every run (a file, a
    /// table scan in key order, …): a restart skips the first `watermark`
    /// of them.
    pub fn from_stream<S>(source: S) -> Self
    where
        S: Stream<Item = In> + Send + 'static,
    {
        Self::with_source(Source::Stream(Box::pin(source)))
    }

    /// A pipeline pulling from `queue`: each delivery is acked once every
    /// element derived from it is done (delivered, filtered or
    /// dead-lettered), and nacked for redelivery if the pipeline is
    /// cancelled before that. A checkpoint store is not used with a queue:
    /// the acks are the progress record.
    pub fn from_queue<Q>(queue: Arc<Q>) -> Self
    where
        Q: Queue<Item = In> + 'static,
    {
        Self::with_source(Source::Queue(queue))
    }

    fn with_source(source: Source<In>) -> Self {
        Pipeline {
            source,
            wire: Box::new(|_, rx| rx),
            capacity: 64,
            window: 65_536,
            spawner: default_spawner(),
            clock: Arc::new(SystemClock),
            checkpoint: None,
            checkpoint_every: Duration::from_secs(1),
            dead: None,
            sink_policy: None,
            control: PipelineControl::new(),
            invalid: None,
        }
    }
}

impl<In: Send + 'static, T: Send + 'static> Pipeline<In, T> {
    fn then<B: Send + 'static>(
        self,
        stage: impl FnOnce(&Arc<Ctx>, Receiver<Elem<T>>) -> Receiver<Elem<B>> + Send + 'static,
    ) -> Pipeline<In, B> {
        let prev = self.wire;
        Pipeline {
            source: self.source,
            wire: Box::new(move |ctx, rx| stage(ctx, prev(ctx, rx))),
            capacity: self.capacity,
            window: self.window,
            spawner: self.spawner,
            clock: self.clock,
            checkpoint: self.checkpoint,
            checkpoint_every: self.checkpoint_every,
            dead: self.dead,
            sink_policy: self.sink_policy,
            control: self.control,
            invalid: self.invalid,
        }
    }

    /// Records the first refused setting.
    fn check(mut self, checked: Result<(), ConfigError>) -> Self {
        if let Err(e) = checked {
            self.invalid.get_or_insert(e);
        }
        self
    }

    /// An async stage: `f` maps each item, `Err` (or a panic) makes it a
    /// dead letter once the stage's policy gives up.
    pub fn map<B, E, F, Fut>(self, stage: impl Into<Stage>, f: F) -> Pipeline<In, B>
    where
        T: Clone + Serialize,
        B: Send + 'static,
        E: fmt::Display,
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<B, E>> + Send + 'static,
    {
        let sf: StageFn<T, B> = Arc::new(move |v| {
            // Called here (not cloned into the future): a panic in the call
            // or in the future is caught alike.
            let started = catch_unwind(AssertUnwindSafe(|| f(v)));
            Box::pin(async move {
                let outcome = match started {
                    Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                    Err(p) => Err(p),
                };
                match outcome {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(p) => Err(format!("panicked: {}", panic_message(p))),
                }
            })
        });
        self.map_stage(stage.into(), StageKind::Map, sf)
    }

    /// A CPU-heavy stage: `f` runs through
    /// [`offload::cpu`](crate::runtime::offload::cpu), so it never blocks
    /// an executor thread and never oversubscribes the cores.
    pub fn cpu_map<B, E, F>(self, stage: impl Into<Stage>, f: F) -> Pipeline<In, B>
    where
        T: Clone + Serialize,
        B: Send + 'static,
        E: fmt::Display + Send + 'static,
        F: Fn(T) -> Result<B, E> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let sf: StageFn<T, B> = Arc::new(move |v| {
            let f = f.clone();
            Box::pin(async move {
                match offload::cpu(move || f(v)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            })
        });
        self.map_stage(stage.into(), StageKind::CpuMap, sf)
    }

    fn map_stage<B: Send + 'static>(
        self,
        stage: Stage,
        kind: StageKind,
        f: StageFn<T, B>,
    ) -> Pipeline<In, B>
    where
        T: Clone + Serialize,
    {
        let checked = stage.validate();
        self.check(checked).then(move |ctx, rx| {
            let (tx, out) = async_channel::bounded(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, kind, &rx);
            let stage_counters = counters.clone();
            let policy = stage.policy.clone();
            if stage.ordered && stage.concurrency > 1 {
                counters.workers.store(stage.concurrency, Ordering::Relaxed);
                let c = ctx.clone();
                let spawner = ctx.spawner.clone();
                ctx.spawn(&stage.name, async move {
                    let state = Arc::new((f, policy, counters.clone()));
                    let results = rx.map_concurrent_on(
                        spawner,
                        stage.concurrency,
                        true,
                        move |elem: Elem<T>| {
                            let state = state.clone();
                            bump(&state.2.received, 1);
                            bump(&state.2.in_flight, 1);
                            async move {
                                let (f, policy, counters) = &*state;
                                let (r, attempts, value) =
                                    attempt(f, policy.as_deref(), elem.value).await;
                                counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                                (
                                    Elem {
                                        value,
                                        origin: elem.origin,
                                    },
                                    r,
                                    attempts,
                                )
                            }
                        },
                    );
                    let mut results = pin!(results);
                    while let Some(joined) = results.next().await {
                        let Ok((elem, r, attempts)) = joined else {
                            c.fail(PipelineError::TaskLost(counters.name.clone()));
                            return;
                        };
                        if !settle(&c, &counters, &tx, elem, r, attempts).await {
                            return;
                        }
                    }
                });
            } else {
                // NOTE: one shared state cloned per item, not its five
                // parts: each clone is an atomic on a line the stage's
                // workers share.
                let state = Arc::new((ctx.clone(), counters, f, policy, tx));
                let step = move |elem: Elem<T>| {
                    let state = state.clone();
                    async move {
                        let (c, counters, f, policy, tx) = &*state;
                        bump(&counters.received, 1);
                        bump(&counters.in_flight, 1);
                        let (r, attempts, value) = attempt(f, policy.as_deref(), elem.value).await;
                        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                        let elem = Elem {
                            value,
                            origin: elem.origin,
                        };
                        settle(c, counters, tx, elem, r, attempts).await
                    }
                };
                workers(ctx, &stage, &rx, stage_counters, step);
            }
            out
        })
    }

    /// Keeps the items `keep` accepts; the others count as filtered (and
    /// their positions as done). A panicking predicate makes the item a
    /// dead letter.
    pub fn filter<F>(self, stage: impl Into<Stage>, keep: F) -> Pipeline<In, T>
    where
        T: Serialize,
        F: Fn(&T) -> bool + Send + Sync + 'static,
    {
        self.sync_stage(stage.into(), StageKind::Filter, move |link, elem| {
            // The predicate runs here, so the future holds its verdict, not
            // the predicate.
            let verdict = catch_unwind(AssertUnwindSafe(|| keep(&elem.value)));
            async move {
                let (c, counters, tx) = &*link;
                match verdict {
                    Ok(true) => {
                        bump(&counters.emitted, 1);
                        tx.send(elem).await.is_ok()
                    }
                    Ok(false) => {
                        bump(&counters.filtered, 1);
                        c.tracker.complete(&elem.origin);
                        true
                    }
                    Err(p) => {
                        let msg = format!("panicked: {}", panic_message(p));
                        c.dead_letter(counters, elem.value, msg, 1, &elem.origin)
                            .await
                    }
                }
            }
        })
    }

    /// Maps each item to any number of items (zero included: its position
    /// is then done). A panic makes the item a dead letter.
    pub fn flat_map<B, I, F>(self, stage: impl Into<Stage>, f: F) -> Pipeline<In, B>
    where
        T: Clone + Serialize,
        B: Send + 'static,
        I: IntoIterator<Item = B>,
        F: Fn(T) -> I + Send + Sync + 'static,
    {
        self.sync_stage(
            stage.into(),
            StageKind::FlatMap,
            move |link, elem: Elem<T>| {
                let input = elem.value.clone();
                let outs = catch_unwind(AssertUnwindSafe(|| {
                    f(elem.value).into_iter().collect::<Vec<B>>()
                }));
                let origin = elem.origin;
                async move {
                    let (c, counters, tx) = &*link;
                    match outs {
                        Ok(outs) => {
                            c.tracker.retain(&origin, outs.len());
                            bump(&counters.emitted, outs.len() as u64);
                            for value in outs {
                                let e = Elem {
                                    value,
                                    origin: origin.clone(),
                                };
                                if tx.send(e).await.is_err() {
                                    return false;
                                }
                            }
                            true
                        }
                        Err(p) => {
                            let msg = format!("panicked: {}", panic_message(p));
                            c.dead_letter(counters, input, msg, 1, &origin).await
                        }
                    }
                }
            },
        )
    }

    /// A stage of `step` calls: each gets the stage's link (the run's
    /// context, the stage's counters, its output) and one element.
    fn sync_stage<B, F, Fut>(self, stage: Stage, kind: StageKind, step: F) -> Pipeline<In, B>
    where
        B: Send + 'static,
        F: Fn(Arc<Link<B>>, Elem<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let checked = stage.validate();
        self.check(checked).then(move |ctx, rx| {
            let (tx, out) = async_channel::bounded(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, kind, &rx);
            // NOTE: one shared link cloned per element, not its parts:
            // each clone is an atomic on a line the stage's workers share.
            let link = Arc::new((ctx.clone(), counters.clone(), tx));
            let step = Arc::new(step);
            let one = move |elem: Elem<T>| {
                bump(&link.1.received, 1);
                step(link.clone(), elem)
            };
            workers(ctx, &stage, &rx, counters, one);
            out
        })
    }

    /// Groups items into `Vec`s of up to `size`, sending a partial batch
    /// once its first item has waited `max_wait` (on the pipeline's clock)
    /// and the remainder at the end.
    ///
    /// # Panics
    ///
    /// At [`run`](Pipeline::run), if `size` is zero.
    pub fn batch(
        self,
        stage: impl Into<Stage>,
        size: usize,
        max_wait: Duration,
    ) -> Pipeline<In, Vec<T>> {
        let stage = stage.into();
        let checked = stage
            .validate()
            .and_then(|()| ConfigError::nonzero("batch size", size).map(drop))
            .and_then(|()| match stage.autoscale {
                Some(s) => Err(ConfigError::new(
                    "stage autoscale",
                    format_args!("{}..={}", s.min, s.max),
                    "a batch stage has one task",
                )),
                None => Ok(()),
            });
        self.check(checked).then(move |ctx, rx| {
            let (tx, out) = async_channel::bounded(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, StageKind::Batch, &rx);
            counters.workers.store(1, Ordering::Relaxed);
            let clock = ctx.clock.clone();
            ctx.spawn(&stage.name, async move {
                let mut chunks = pin!(rx.chunks_timeout_on(clock, size, max_wait));
                while let Some(chunk) = chunks.next().await {
                    bump(&counters.received, chunk.len() as u64);
                    bump(&counters.emitted, 1);
                    let (values, origins): (Vec<T>, Vec<Origin>) =
                        chunk.into_iter().map(|e| (e.value, e.origin)).unzip();
                    let elem = Elem {
                        value: values,
                        origin: Origin::merge(origins.into_iter()),
                    };
                    if tx.send(elem).await.is_err() {
                        return;
                    }
                }
            });
            out
        })
    }

    /// Items waiting in each channel between stages (default 64). Zero
    /// makes [`run`](Pipeline::run) fail with [`PipelineError::Config`].
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        let checked = ConfigError::nonzero("capacity", capacity).map(drop);
        self.check(checked)
    }

    /// How far (in positions) the source may run ahead of the watermark
    /// (default 65 536). Zero is refused like a zero capacity.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        let checked = ConfigError::nonzero("window", window).map(drop);
        self.check(checked)
    }

    /// Where the stage tasks run.
    pub fn with_spawner(mut self, spawner: impl Spawn + 'static) -> Self {
        self.spawner = Arc::new(spawner);
        self
    }

    /// The clock of batch timeouts and checkpoint intervals.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Records the watermark in `store` and resumes from it.
    pub fn with_checkpoint(mut self, store: Arc<dyn Checkpoint>) -> Self {
        self.checkpoint = Some(store);
        self
    }

    /// The least time between two checkpoint saves (default 1 s). The
    /// final watermark is always saved when the run ends.
    pub fn with_checkpoint_interval(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// Where dead letters go (default: kept in the report).
    pub fn with_dead_letters(mut self, sink: Arc<dyn DeadLetterSink>) -> Self {
        self.dead = Some(sink);
        self
    }

    /// Retries (and other layers) around each sink call; a sink call that
    /// still fails makes the item a dead letter of stage `"sink"`.
    pub fn with_sink_policy(mut self, policy: Policy) -> Self {
        self.sink_policy = Some(Arc::new(policy));
        self
    }

    /// A handle to stop the pipeline and read its counters while it runs.
    pub fn control(&self) -> PipelineControl {
        self.control.clone()
    }
}

/// Starts a stage's workers on `rx` (fixed, or autoscaled when the stage
/// says so; the scale-up depth defaults to half the input channel).
fn workers<T, F, Fut>(
    ctx: &Arc<Ctx>,
    stage: &Stage,
    rx: &Receiver<Elem<T>>,
    counters: Arc<Counters>,
    step: F,
) where
    T: Send + 'static,
    F: Fn(Elem<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let scale = stage.autoscale.map(|s| {
        let half = rx.capacity().unwrap_or(ctx.capacity) / 2;
        (s, s.up_at.unwrap_or(half))
    });
    Workers {
        ctx: ctx.clone(),
        counters,
        rx: rx.clone(),
        step,
        scale,
    }
    .start(stage.concurrency);
}

impl<In, T> fmt::Debug for Pipeline<In, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("capacity", &self.capacity)
            .field("window", &self.window)
            .field("checkpoint", &self.checkpoint.is_some())
            .field("checkpoint_every", &self.checkpoint_every)
            .finish_non_exhaustive()
    }
}
