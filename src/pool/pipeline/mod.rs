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
mod hop;
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
use hop::{HopRx, HopTx, hop};
use stage::{Counters, attempt, bump, settle};
pub use stage::{Stage, StageKind, StageStats};
use tracker::{Elem, Origin, Tracker};
use workers::{Out, Workers};

type StageFn<A, B> = Arc<dyn Fn(A) -> BoxFut<'static, Result<B, String>> + Send + Sync>;
type Wire<In, T> = Box<dyn FnOnce(&Arc<Ctx>, HopRx<Elem<In>>) -> HopRx<Elem<T>> + Send>;
type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = T> + Send>>;

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
        stage: impl FnOnce(&Arc<Ctx>, HopRx<Elem<T>>) -> HopRx<Elem<B>> + Send + 'static,
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
            let (tx, out) = hop(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, kind, &rx);
            let stage_counters = counters.clone();
            let policy = stage.policy.clone();
            if stage.ordered && stage.concurrency > 1 {
                counters.workers.store(stage.concurrency, Ordering::Relaxed);
                let c = ctx.clone();
                let spawner = ctx.spawner.clone();
                ctx.spawn(&stage.name, async move {
                    let state = Arc::new((f, policy, counters.clone()));
                    let results = rx.into_stream().map_concurrent_on(
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
            } else if let Some(policy) = policy {
                let state = Arc::new((f, policy));
                let step = move |elem: Elem<T>| {
                    let state = state.clone();
                    async move {
                        let (f, policy) = &*state;
                        let (r, attempts, value) = attempt(f, Some(&**policy), elem.value).await;
                        mapped(r, value, elem.origin, attempts)
                    }
                };
                workers(ctx, &stage, &rx, tx, stage_counters, step);
            } else {
                // NOTE: no policy, so no retry: the future is started here
                // and the step clones nothing shared (each clone would be
                // an atomic on a line the stage's workers share).
                let step = move |elem: Elem<T>| {
                    let Elem { value, origin } = elem;
                    let started = f(value.clone());
                    async move { mapped(started.await, value, origin, 1) }
                };
                workers(ctx, &stage, &rx, tx, stage_counters, step);
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
        self.sync_stage(
            stage.into(),
            StageKind::Filter,
            move |_, elem| match catch_unwind(AssertUnwindSafe(|| keep(&elem.value))) {
                Ok(true) => Out::One(elem),
                Ok(false) => Out::Filtered(elem.origin),
                Err(p) => Out::Dead(elem, format!("panicked: {}", panic_message(p)), 1),
            },
        )
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
            move |ctx, elem: Elem<T>| {
                let input = elem.value.clone();
                let origin = elem.origin;
                match catch_unwind(AssertUnwindSafe(|| {
                    f(elem.value).into_iter().collect::<Vec<B>>()
                })) {
                    Ok(outs) => {
                        ctx.tracker.retain(&origin, outs.len());
                        let elems = outs.into_iter().map(|value| Elem {
                            value,
                            origin: origin.clone(),
                        });
                        Out::Many(elems.collect())
                    }
                    Err(p) => {
                        let msg = format!("panicked: {}", panic_message(p));
                        Out::Dead(
                            Elem {
                                value: input,
                                origin,
                            },
                            msg,
                            1,
                        )
                    }
                }
            },
        )
    }

    /// A stage of `step` calls, each given the run's context and one
    /// element; the step runs to its end without waiting.
    fn sync_stage<B, F>(self, stage: Stage, kind: StageKind, step: F) -> Pipeline<In, B>
    where
        T: Serialize,
        B: Send + 'static,
        F: Fn(&Ctx, Elem<T>) -> Out<T, B> + Send + Sync + 'static,
    {
        let checked = stage.validate();
        self.check(checked).then(move |ctx, rx| {
            let (tx, out) = hop(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, kind, &rx);
            let c = ctx.clone();
            let step = Arc::new(step);
            let one = move |elem: Elem<T>| std::future::ready(step(&c, elem));
            workers(ctx, &stage, &rx, tx, counters, one);
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
            let (tx, out) = hop(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, StageKind::Batch, &rx);
            counters.workers.store(1, Ordering::Relaxed);
            let clock = ctx.clock.clone();
            ctx.spawn(&stage.name, async move {
                let mut chunks = pin!(rx.into_stream().chunks_timeout_on(clock, size, max_wait));
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

/// What a map step made of its element: the output, or a dead letter of
/// the input.
fn mapped<T, B>(r: Result<B, String>, input: T, origin: Origin, attempts: u32) -> Out<T, B> {
    match r {
        Ok(value) => Out::One(Elem { value, origin }),
        Err(error) => Out::Dead(
            Elem {
                value: input,
                origin,
            },
            error,
            attempts,
        ),
    }
}

/// Starts a stage's workers on `rx`, sending to `tx` (fixed, or
/// autoscaled when the stage says so; the scale-up depth defaults to half
/// the input channel).
fn workers<T, B, F, Fut>(
    ctx: &Arc<Ctx>,
    stage: &Stage,
    rx: &HopRx<Elem<T>>,
    tx: HopTx<Elem<B>>,
    counters: Arc<Counters>,
    step: F,
) where
    T: Serialize + Send + 'static,
    B: Send + 'static,
    F: Fn(Elem<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Out<T, B>> + Send + 'static,
{
    let scale = stage.autoscale.map(|s| {
        let half = rx.capacity() / 2;
        (s, s.up_at.unwrap_or(half))
    });
    Workers {
        ctx: ctx.clone(),
        counters,
        rx: rx.clone(),
        tx,
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
