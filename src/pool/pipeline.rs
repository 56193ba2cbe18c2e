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

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_channel::{Receiver, Sender, TryRecvError};
use event_listener::Event;
use futures_lite::{FutureExt, Stream, StreamExt, future};
use serde::Serialize;

use super::BoxFut;
use super::checkpoint::{Checkpoint, CheckpointError};
use super::dead_letter::{Collect, DeadLetter, DeadLetterError, DeadLetterSink};
use super::queue::{Nack, Queue, QueueError};
use crate::limit::Semaphore;
use crate::resilience::Policy;
use crate::runtime::{
    Clock, JoinHandle, Spawn, SpawnExt, SystemClock, default_spawner, offload, panic_message,
};
use crate::stream::StreamKit;
use crate::sync::lock_std as lock;

type StageFn<A, B> = Arc<dyn Fn(A) -> BoxFut<'static, Result<B, String>> + Send + Sync>;
type Wire<In, T> = Box<dyn FnOnce(&Arc<Ctx>, Receiver<Elem<In>>) -> Receiver<Elem<T>> + Send>;
type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = T> + Send>>;

/// The positions an element came from.
#[derive(Debug, Clone)]
enum Origin {
    One(u64),
    Many(Vec<u64>),
}

impl Origin {
    fn positions(&self) -> &[u64] {
        match self {
            Origin::One(p) => std::slice::from_ref(p),
            Origin::Many(v) => v,
        }
    }

    fn merge(origins: impl Iterator<Item = Origin>) -> Origin {
        let mut all = Vec::new();
        for o in origins {
            all.extend_from_slice(o.positions());
        }
        Origin::Many(all)
    }
}

struct Elem<T> {
    value: T,
    origin: Origin,
}

/// Options of one stage: its name, concurrency, order, retry policy and
/// output channel capacity. `&str` and `String` convert into a `Stage`
/// with the defaults.
///
/// # Default
///
/// Concurrency 1, unordered, no retry policy, the pipeline's channel
/// capacity.
///
/// # Examples
///
/// ```
/// use smolkit::pool::Stage;
///
/// let stage = Stage::new("fetch").with_concurrency(8).with_ordered(true);
/// assert_eq!(stage.name(), "fetch");
/// ```
#[derive(Debug, Clone)]
pub struct Stage {
    name: String,
    concurrency: usize,
    ordered: bool,
    policy: Option<Arc<Policy>>,
    capacity: Option<usize>,
}

impl Stage {
    /// A stage called `name` with the defaults.
    pub fn new(name: impl Into<String>) -> Self {
        Stage {
            name: name.into(),
            concurrency: 1,
            ordered: false,
            policy: None,
            capacity: None,
        }
    }

    /// Items processed at once (at least 1).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Keeps the input order at the output (`map` and `cpu_map` only; the
    /// other stages keep order at concurrency 1).
    pub fn with_ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Runs each item through `policy` (retries, timeouts, breaker, rate
    /// limit); an item that still fails becomes a dead letter.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// The capacity of this stage's output channel.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity.max(1));
        self
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl From<&str> for Stage {
    fn from(name: &str) -> Self {
        Stage::new(name)
    }
}

impl From<String> for Stage {
    fn from(name: String) -> Self {
        Stage::new(name)
    }
}

/// What a stage does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StageKind {
    /// An async function.
    Map,
    /// A CPU-heavy function on the offload pool.
    CpuMap,
    /// A predicate.
    Filter,
    /// One item to many.
    FlatMap,
    /// Many items to one `Vec`.
    Batch,
    /// The sink.
    Sink,
}

/// A snapshot of one stage's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StageStats {
    /// The stage's name.
    pub name: String,
    /// What it does.
    pub kind: StageKind,
    /// Elements taken from its input.
    pub received: u64,
    /// Elements sent on (for the sink: delivered).
    pub emitted: u64,
    /// Elements that became dead letters here.
    pub dead_letters: u64,
    /// Elements a filter rejected.
    pub filtered: u64,
    /// Elements being processed now.
    pub in_flight: u64,
    /// Elements waiting in its input channel.
    pub queued: usize,
}

struct Counters {
    name: String,
    kind: StageKind,
    received: AtomicU64,
    emitted: AtomicU64,
    dead: AtomicU64,
    filtered: AtomicU64,
    in_flight: AtomicU64,
    queued: Box<dyn Fn() -> usize + Send + Sync>,
}

impl Counters {
    fn snapshot(&self) -> StageStats {
        StageStats {
            name: self.name.clone(),
            kind: self.kind,
            received: self.received.load(Ordering::Relaxed),
            emitted: self.emitted.load(Ordering::Relaxed),
            dead_letters: self.dead.load(Ordering::Relaxed),
            filtered: self.filtered.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: (self.queued)(),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Per-position bookkeeping: how many derived elements are still out.
struct Tracker {
    state: Mutex<TrackerState>,
    watermark: AtomicU64,
    window: Semaphore,
    changed: Event,
    acks: Option<Sender<String>>,
}

struct TrackerState {
    base: u64,
    counts: VecDeque<u32>,
    ids: VecDeque<Option<String>>,
}

impl Tracker {
    fn new(base: u64, window: usize, acks: Option<Sender<String>>) -> Self {
        Tracker {
            state: Mutex::new(TrackerState {
                base,
                counts: VecDeque::new(),
                ids: VecDeque::new(),
            }),
            watermark: AtomicU64::new(base),
            window: Semaphore::new(window),
            changed: Event::new(),
            acks,
        }
    }

    async fn admit(&self) {
        match self.window.try_acquire() {
            Ok(g) => g.forget(),
            // NOTE: the window is never closed, so an error cannot happen.
            Err(_) => {
                if let Ok(g) = self.window.acquire().await {
                    g.forget()
                }
            }
        }
    }

    fn register(&self, id: Option<String>) -> u64 {
        let mut st = lock(&self.state);
        st.counts.push_back(1);
        st.ids.push_back(id);
        st.base + st.counts.len() as u64 - 1
    }

    /// `k` elements now stand for each element of `origin`.
    fn retain(&self, origin: &Origin, k: usize) {
        if k == 0 {
            self.complete(origin);
        } else if k > 1 {
            let mut st = lock(&self.state);
            for &p in origin.positions() {
                let i = (p - st.base) as usize;
                st.counts[i] += (k - 1) as u32;
            }
        }
    }

    fn complete(&self, origin: &Origin) {
        let mut st = lock(&self.state);
        for &p in origin.positions() {
            let i = (p - st.base) as usize;
            st.counts[i] -= 1;
            if st.counts[i] == 0
                && let Some(id) = st.ids[i].take()
                && let Some(acks) = &self.acks
            {
                let _ = acks.try_send(id);
            }
        }
        let mut advanced = 0;
        while st.counts.front() == Some(&0) {
            st.counts.pop_front();
            st.ids.pop_front();
            st.base += 1;
            advanced += 1;
        }
        if advanced > 0 {
            let base = st.base;
            drop(st);
            self.watermark.store(base, Ordering::Release);
            self.window.add_permits(advanced);
            self.changed.notify(usize::MAX);
        }
    }

    /// Delivery ids of positions not done yet.
    fn outstanding_ids(&self) -> Vec<String> {
        lock(&self.state)
            .ids
            .iter_mut()
            .filter_map(Option::take)
            .collect()
    }
}

/// Why a pipeline stopped with an error. Its checkpoint was saved up to
/// the last completed position first, so a restart loses nothing.
#[derive(Debug)]
#[non_exhaustive]
pub enum PipelineError {
    /// Loading the checkpoint failed, so the resume point is unknown.
    Checkpoint(CheckpointError),
    /// A dead letter could not be stored.
    DeadLetters(DeadLetterError),
    /// The source queue failed.
    Queue(QueueError),
    /// A stage task was dropped by its executor with items in it.
    TaskLost(String),
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineError::Checkpoint(e) => write!(f, "pipeline cannot resume: {e}"),
            PipelineError::DeadLetters(e) => write!(f, "pipeline stopped: {e}"),
            PipelineError::Queue(e) => write!(f, "pipeline source failed: {e}"),
            PipelineError::TaskLost(stage) => {
                write!(f, "pipeline stage {stage:?} was dropped by its executor")
            }
        }
    }
}

impl std::error::Error for PipelineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PipelineError::Checkpoint(e) => Some(e),
            PipelineError::DeadLetters(e) => Some(e),
            PipelineError::Queue(e) => Some(e),
            PipelineError::TaskLost(_) => None,
        }
    }
}

/// What a finished (or stopped) pipeline did.
#[derive(Debug)]
#[non_exhaustive]
pub struct PipelineReport {
    /// The watermark the run started from (items of the source skipped).
    pub resumed_from: u64,
    /// Input items read in this run.
    pub inputs: u64,
    /// Elements the sink accepted.
    pub outputs: u64,
    /// Elements that became dead letters (all stages and the sink).
    pub dead_letters: u64,
    /// Elements filters rejected.
    pub filtered: u64,
    /// The final watermark (`resumed_from + inputs` after a full run).
    pub watermark: u64,
    /// The run was cancelled ([`PipelineControl::cancel`]) before it
    /// drained.
    pub cancelled: bool,
    /// The last checkpoint save error, if any (saves are retried at the
    /// next change; a failed save only means more repeated work after a
    /// restart).
    pub checkpoint_error: Option<String>,
    /// Per-stage counters, the sink last.
    pub stages: Vec<StageStats>,
    /// The dead letters, when no dead-letter sink was set (they are kept
    /// here rather than dropped).
    pub dead: Vec<DeadLetter>,
}

struct ControlState {
    shutdown: AtomicBool,
    cancel: AtomicBool,
    event: Event,
    ctx: Mutex<Weak<Ctx>>,
}

/// Stops a running [`Pipeline`] and reads its counters. Cheap to clone.
#[derive(Clone)]
pub struct PipelineControl {
    state: Arc<ControlState>,
}

impl PipelineControl {
    fn new() -> Self {
        PipelineControl {
            state: Arc::new(ControlState {
                shutdown: AtomicBool::new(false),
                cancel: AtomicBool::new(false),
                event: Event::new(),
                ctx: Mutex::new(Weak::new()),
            }),
        }
    }

    /// Stops reading the source; everything read so far drains through
    /// and `run` returns its report.
    pub fn shutdown(&self) {
        self.state.shutdown.store(true, Ordering::Release);
        self.state.event.notify(usize::MAX);
    }

    /// Stops promptly: in-flight elements are dropped (their positions are
    /// not done, so the checkpoint stays before them and a queue source
    /// gets them nacked for redelivery).
    pub fn cancel(&self) {
        self.state.cancel.store(true, Ordering::Release);
        self.shutdown();
    }

    /// Per-stage counters of the running pipeline (empty when it is not
    /// running).
    pub fn stats(&self) -> Vec<StageStats> {
        match lock(&self.state.ctx).upgrade() {
            Some(ctx) => ctx.stage_stats(),
            None => Vec::new(),
        }
    }

    /// The running pipeline's watermark.
    pub fn watermark(&self) -> Option<u64> {
        lock(&self.state.ctx)
            .upgrade()
            .map(|ctx| ctx.tracker.watermark.load(Ordering::Acquire))
    }

    fn stopping(&self) -> bool {
        self.state.shutdown.load(Ordering::Acquire)
    }

    fn cancelled(&self) -> bool {
        self.state.cancel.load(Ordering::Acquire)
    }
}

impl fmt::Debug for PipelineControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineControl")
            .field("shutdown", &self.stopping())
            .field("cancelled", &self.cancelled())
            .finish()
    }
}

/// State shared by a running pipeline's tasks.
struct Ctx {
    tracker: Tracker,
    dead: Arc<dyn DeadLetterSink>,
    clock: Arc<dyn Clock>,
    spawner: Arc<dyn Spawn>,
    capacity: usize,
    control: PipelineControl,
    stages: Mutex<Vec<Arc<Counters>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    fatal: Mutex<Option<PipelineError>>,
    inputs: AtomicU64,
}

impl Ctx {
    fn spawn(&self, name: &str, fut: impl Future<Output = ()> + Send + 'static) {
        let handle = self.spawner.spawn_named(name, fut);
        lock(&self.tasks).push(handle);
    }

    fn counters<T: Send + 'static>(
        &self,
        name: &str,
        kind: StageKind,
        input: &Receiver<T>,
    ) -> Arc<Counters> {
        let weak = input.downgrade();
        let c = Arc::new(Counters {
            name: name.to_owned(),
            kind,
            received: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            queued: Box::new(move || weak.upgrade().map_or(0, |r| r.len())),
        });
        lock(&self.stages).push(c.clone());
        c
    }

    fn stage_stats(&self) -> Vec<StageStats> {
        lock(&self.stages).iter().map(|c| c.snapshot()).collect()
    }

    fn fail(&self, error: PipelineError) {
        tracing::error!(error = %error, "pipeline stopping");
        lock(&self.fatal).get_or_insert(error);
        self.control.cancel();
    }

    /// Sends `value` to the dead letters; false if that failed (the
    /// pipeline is then stopping).
    async fn dead_letter<T: Serialize + Send + 'static>(
        &self,
        counters: &Counters,
        value: T,
        error: String,
        attempts: u32,
        origin: &Origin,
    ) -> bool {
        tracing::warn!(stage = %counters.name, error = %error, attempts, "dead letter");
        let letter = DeadLetter::new(
            &counters.name,
            value,
            error,
            attempts,
            origin.positions().to_vec(),
        );
        match self.dead.send(letter).await {
            Ok(()) => {
                bump(&counters.dead, 1);
                self.tracker.complete(origin);
                true
            }
            Err(e) => {
                self.fail(PipelineError::DeadLetters(e));
                false
            }
        }
    }

    /// Waits until the pipeline is cancelled.
    async fn cancelled(&self) {
        loop {
            let l = self.control.state.event.listen();
            if self.control.cancelled() {
                return;
            }
            l.await;
        }
    }

    /// Waits until the pipeline is shutting down.
    async fn stopped(&self) {
        loop {
            let l = self.control.state.event.listen();
            if self.control.stopping() {
                return;
            }
            l.await;
        }
    }
}

/// Runs one element through `f`, under `policy` if there is one, and
/// hands the element back (for a dead letter).
// NOTE: the value is owned, never borrowed across an await, so the
// future is `Send` without asking items to be `Sync`.
async fn attempt<A: Clone, B>(
    f: &StageFn<A, B>,
    policy: Option<&Policy>,
    value: A,
) -> (Result<B, String>, u32, A) {
    match policy {
        None => {
            let r = f(value.clone()).await;
            (r, 1, value)
        }
        Some(p) => {
            let attempts = AtomicU32::new(0);
            let cell = Mutex::new(value);
            let r = p
                .run(|| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    f(lock(&cell).clone())
                })
                .await;
            let value = cell.into_inner().unwrap_or_else(|e| e.into_inner());
            (
                r.map_err(|e| e.to_string()),
                attempts.load(Ordering::Relaxed).max(1),
                value,
            )
        }
    }
}

enum Source<T> {
    Stream(BoxStream<T>),
    Queue(Arc<dyn Queue<Item = T>>),
}

/// A source of items flowing through stages into a sink.
///
/// Build it from a stream ([`from_stream`](Pipeline::from_stream)) or a
/// [`Queue`] ([`from_queue`](Pipeline::from_queue)), add stages, and
/// [`run`](Pipeline::run) it with a sink. Stages run as tasks on a
/// [`Spawn`] (default: smol's global executor), linked by bounded channels
/// so a slow stage or sink slows the source instead of filling memory.
/// A stage function that fails (after its [`Stage::with_policy`] retries)
/// or panics turns the item into a [`DeadLetter`]; nothing is dropped.
/// See the module docs above for positions, the watermark and checkpoints.
///
/// Items of stages that can fail must be `Clone` (retries and dead letters
/// need the original) and `Serialize` (dead letters keep them as JSON).
///
/// # Default
///
/// Channel capacity 64, window 65 536 positions, checkpoint saves at most
/// once a second, dead letters kept in the report, smol's global executor,
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
        }
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
        let f = Arc::new(f);
        let sf: StageFn<T, B> = Arc::new(move |v| {
            let f = f.clone();
            Box::pin(async move {
                match AssertUnwindSafe(async { f(v).await }).catch_unwind().await {
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
        self.then(move |ctx, rx| {
            let (tx, out) = async_channel::bounded(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, kind, &rx);
            let policy = stage.policy.clone();
            if stage.ordered && stage.concurrency > 1 {
                let c = ctx.clone();
                let spawner = ctx.spawner.clone();
                ctx.spawn(&stage.name, async move {
                    let f2 = f.clone();
                    let counters2 = counters.clone();
                    let results = rx.map_concurrent_on(
                        spawner,
                        stage.concurrency,
                        true,
                        move |elem: Elem<T>| {
                            let f = f2.clone();
                            let policy = policy.clone();
                            let counters = counters2.clone();
                            bump(&counters.received, 1);
                            bump(&counters.in_flight, 1);
                            async move {
                                let (r, attempts, value) =
                                    attempt(&f, policy.as_deref(), elem.value).await;
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
                for _ in 0..stage.concurrency {
                    let (c, counters, f, policy, rx, tx) = (
                        ctx.clone(),
                        counters.clone(),
                        f.clone(),
                        policy.clone(),
                        rx.clone(),
                        tx.clone(),
                    );
                    ctx.spawn(&stage.name, async move {
                        while let Ok(elem) = rx.recv().await {
                            bump(&counters.received, 1);
                            bump(&counters.in_flight, 1);
                            let (r, attempts, value) =
                                attempt(&f, policy.as_deref(), elem.value).await;
                            counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                            let elem = Elem {
                                value,
                                origin: elem.origin,
                            };
                            if !settle(&c, &counters, &tx, elem, r, attempts).await {
                                return;
                            }
                        }
                    });
                }
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
        let keep = Arc::new(keep);
        self.sync_stage(
            stage.into(),
            StageKind::Filter,
            move |c, counters, elem, tx| {
                let keep = keep.clone();
                async move {
                    match catch_unwind(AssertUnwindSafe(|| keep(&elem.value))) {
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
                            c.dead_letter(&counters, elem.value, msg, 1, &elem.origin)
                                .await
                        }
                    }
                }
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
        let f = Arc::new(f);
        self.sync_stage(
            stage.into(),
            StageKind::FlatMap,
            move |c, counters, elem: Elem<T>, tx| {
                let f = f.clone();
                async move {
                    let input = elem.value.clone();
                    match catch_unwind(AssertUnwindSafe(|| {
                        f(elem.value).into_iter().collect::<Vec<B>>()
                    })) {
                        Ok(outs) => {
                            c.tracker.retain(&elem.origin, outs.len());
                            bump(&counters.emitted, outs.len() as u64);
                            for value in outs {
                                let e = Elem {
                                    value,
                                    origin: elem.origin.clone(),
                                };
                                if tx.send(e).await.is_err() {
                                    return false;
                                }
                            }
                            true
                        }
                        Err(p) => {
                            let msg = format!("panicked: {}", panic_message(p));
                            c.dead_letter(&counters, input, msg, 1, &elem.origin).await
                        }
                    }
                }
            },
        )
    }

    fn sync_stage<B, F, Fut>(self, stage: Stage, kind: StageKind, step: F) -> Pipeline<In, B>
    where
        B: Send + 'static,
        F: Fn(Arc<Ctx>, Arc<Counters>, Elem<T>, Sender<Elem<B>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        self.then(move |ctx, rx| {
            let (tx, out) = async_channel::bounded(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, kind, &rx);
            let step = Arc::new(step);
            for _ in 0..stage.concurrency {
                let (c, counters, step, rx, tx) = (
                    ctx.clone(),
                    counters.clone(),
                    step.clone(),
                    rx.clone(),
                    tx.clone(),
                );
                ctx.spawn(&stage.name, async move {
                    while let Ok(elem) = rx.recv().await {
                        bump(&counters.received, 1);
                        if !step(c.clone(), counters.clone(), elem, tx.clone()).await {
                            return;
                        }
                    }
                });
            }
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
        self.then(move |ctx, rx| {
            let (tx, out) = async_channel::bounded(stage.capacity.unwrap_or(ctx.capacity));
            let counters = ctx.counters(&stage.name, StageKind::Batch, &rx);
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

    /// Items waiting in each channel between stages (default 64).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// How far (in positions) the source may run ahead of the watermark
    /// (default 65 536).
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// Where the stage tasks run.
    pub fn with_spawner(mut self, spawner: Arc<dyn Spawn>) -> Self {
        self.spawner = spawner;
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

    /// Runs the pipeline until the source is drained (or
    /// [`PipelineControl::shutdown`]/[`cancel`](PipelineControl::cancel)),
    /// calling `sink` with every output in turn.
    ///
    /// # Errors
    ///
    /// [`PipelineError`] if the checkpoint cannot be loaded, a dead letter
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
        let resumed_from = match (&self.checkpoint, &self.source) {
            (Some(store), Source::Stream(_)) => store
                .load()
                .await
                .map_err(PipelineError::Checkpoint)?
                .unwrap_or(0),
            _ => 0,
        };
        let (ack_tx, ack_rx) = match self.source {
            Source::Queue(_) => {
                let (tx, rx) = async_channel::unbounded();
                (Some(tx), Some(rx))
            }
            Source::Stream(_) => (None, None),
        };
        let collect = Arc::new(Collect::default());
        let dead: Arc<dyn DeadLetterSink> = match self.dead {
            Some(d) => d,
            None => collect.clone(),
        };
        let ctx = Arc::new(Ctx {
            tracker: Tracker::new(resumed_from, self.window, ack_tx.clone()),
            dead,
            clock: self.clock,
            spawner: self.spawner,
            capacity: self.capacity,
            control: self.control.clone(),
            stages: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            inputs: AtomicU64::new(0),
        });
        *lock(&self.control.state.ctx) = Arc::downgrade(&ctx);

        let (src_tx, src_rx) = async_channel::bounded(self.capacity);
        let out = (self.wire)(&ctx, src_rx);
        let sink_counters = ctx.counters("sink", StageKind::Sink, &out);

        let queue = match &self.source {
            Source::Queue(q) => Some(q.clone()),
            Source::Stream(_) => None,
        };
        let c = ctx.clone();
        ctx.spawn("source", async move {
            match self.source {
                Source::Stream(s) => read_stream(&c, s, resumed_from, src_tx).await,
                Source::Queue(q) => read_queue(&c, &*q, src_tx).await,
            }
        });
        let acker = match (&queue, ack_rx) {
            (Some(q), Some(rx)) => {
                let q = q.clone();
                Some(ctx.spawner.spawn(async move {
                    while let Ok(id) = rx.recv().await {
                        if let Err(e) = q.ack(&id).await {
                            tracing::warn!(id = %id, error = %e, "ack failed; the item will be delivered again");
                        }
                    }
                }))
            }
            _ => None,
        };
        let saver_done = Arc::new(AtomicBool::new(false));
        let checkpoint_error = Arc::new(Mutex::new(None));
        let saver = match &self.checkpoint {
            Some(store) if queue.is_none() => Some(ctx.spawner.spawn(save_checkpoints(
                ctx.clone(),
                store.clone(),
                self.checkpoint_every,
                resumed_from,
                saver_done.clone(),
                checkpoint_error.clone(),
            ))),
            _ => None,
        };

        // The sink runs right here, on the task that awaits `run`.
        let sink_policy = self.sink_policy.clone();
        let mut outputs = 0u64;
        loop {
            if ctx.control.cancelled() {
                break;
            }
            let elem = match out.try_recv() {
                Ok(e) => e,
                Err(TryRecvError::Closed) => break,
                Err(TryRecvError::Empty) => {
                    let l = ctx.control.state.event.listen();
                    if ctx.control.cancelled() {
                        break;
                    }
                    match out
                        .recv()
                        .or(async {
                            l.await;
                            Err(async_channel::RecvError)
                        })
                        .await
                    {
                        Ok(e) => e,
                        Err(_) => continue,
                    }
                }
            };
            bump(&sink_counters.received, 1);
            bump(&sink_counters.in_flight, 1);
            let Elem { value, origin } = elem;
            // NOTE: a cancel interrupts a sink call in progress; the item
            // is then not done, so the watermark stays before it.
            let call = async {
                match &sink_policy {
                    None => (start_sink(&mut sink, value.clone()).await, 1, value),
                    Some(p) => {
                        let mut attempts = 0u32;
                        let cell = Mutex::new(value);
                        let r = p
                            .run(|| {
                                attempts += 1;
                                start_sink(&mut sink, lock(&cell).clone())
                            })
                            .await
                            .map_err(|e| e.to_string());
                        let value = cell.into_inner().unwrap_or_else(|e| e.into_inner());
                        (r, attempts.max(1), value)
                    }
                }
            };
            let Some((r, attempts, value)) = async { Some(call.await) }
                .or(async {
                    ctx.cancelled().await;
                    None
                })
                .await
            else {
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
                        .dead_letter(&sink_counters, elem.value, error, attempts, &elem.origin)
                        .await
                    {
                        break;
                    }
                }
            }
        }

        let cancelled = ctx.control.cancelled();
        if cancelled {
            // Stop every stage now; what they held is not done, so the
            // watermark stays before it.
            lock(&ctx.tasks).clear();
        }
        if let Some(q) = &queue {
            if cancelled {
                for id in ctx.tracker.outstanding_ids() {
                    if let Err(e) = q.nack(&id, Nack::Retry).await {
                        tracing::warn!(id = %id, error = %e, "nack on cancel failed; the lease will expire");
                    }
                }
            }
            if let Some(tx) = &ack_tx {
                tx.close();
            }
            if let Some(acker) = acker {
                let _ = acker.await;
            }
        }
        if let Some(saver) = saver {
            saver_done.store(true, Ordering::Release);
            ctx.tracker.changed.notify(usize::MAX);
            let _ = saver.await;
        }
        lock(&ctx.tasks).clear();

        let stages = ctx.stage_stats();
        let sum = |f: fn(&StageStats) -> u64| stages.iter().map(f).sum::<u64>();
        let report = PipelineReport {
            resumed_from,
            inputs: ctx.inputs.load(Ordering::Relaxed),
            outputs,
            dead_letters: sum(|s| s.dead_letters),
            filtered: sum(|s| s.filtered),
            watermark: ctx.tracker.watermark.load(Ordering::Acquire),
            cancelled,
            checkpoint_error: lock(&checkpoint_error).take(),
            dead: std::mem::take(&mut *lock(&collect.letters)),
            stages,
        };
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

/// Calls the sink, turning a panic (in the call or the future) into an
/// error. The returned future does not borrow the sink.
fn start_sink<T, F, Fut, E>(
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

/// Sends a stage's result on, or dead-letters the item; false when the
/// stage should stop.
async fn settle<A: Serialize + Send + 'static, B>(
    ctx: &Ctx,
    counters: &Counters,
    tx: &Sender<Elem<B>>,
    elem: Elem<A>,
    result: Result<B, String>,
    attempts: u32,
) -> bool {
    match result {
        Ok(value) => {
            bump(&counters.emitted, 1);
            tx.send(Elem {
                value,
                origin: elem.origin,
            })
            .await
            .is_ok()
        }
        Err(error) => {
            ctx.dead_letter(counters, elem.value, error, attempts, &elem.origin)
                .await
        }
    }
}

async fn read_stream<T: Send + 'static>(
    ctx: &Ctx,
    mut source: BoxStream<T>,
    skip: u64,
    tx: Sender<Elem<T>>,
) {
    for _ in 0..skip {
        if source.next().await.is_none() {
            tracing::warn!(skip, "source ended before the checkpoint's watermark");
            return;
        }
    }
    loop {
        if ctx.control.stopping() {
            return;
        }
        let item = match future::poll_once(source.next()).await {
            Some(Some(item)) => item,
            Some(None) => return,
            None => match source
                .next()
                .or(async {
                    ctx.stopped().await;
                    None
                })
                .await
            {
                Some(item) => item,
                None => return,
            },
        };
        ctx.tracker.admit().await;
        let pos = ctx.tracker.register(None);
        ctx.inputs.fetch_add(1, Ordering::Relaxed);
        if tx
            .send(Elem {
                value: item,
                origin: Origin::One(pos),
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn read_queue<T: Send + 'static>(
    ctx: &Ctx,
    queue: &dyn Queue<Item = T>,
    tx: Sender<Elem<T>>,
) {
    loop {
        if ctx.control.stopping() {
            return;
        }
        let pulled = queue
            .pull()
            .or(async {
                ctx.stopped().await;
                Ok(None)
            })
            .await;
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

async fn save_checkpoints(
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
