//! Stopping a running pipeline, its report and errors, and the state its
//! tasks share.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use event_listener::Event;
use serde::Serialize;

use crate::pool::checkpoint::CheckpointError;
use crate::pool::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
use crate::pool::queue::QueueError;
use crate::runtime::{Clock, JoinError, JoinHandle, Spawn, SpawnExt};
use crate::sync::lock_std as lock;

use super::*;

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
    /// A task of the pipeline (`source`, a stage, the checkpoint saver,
    /// the acker) was dropped by its executor before it finished.
    TaskLost(String),
    /// A task of the pipeline panicked outside the code it guards (the
    /// source stream, a queue's `pull`, a dead-letter sink, a checkpoint
    /// store): the items it held are not accounted for, so the run is an
    /// error.
    TaskPanicked {
        /// The task: `source`, a stage's name, `checkpoint` or `acker`.
        task: String,
        /// The panic message.
        message: String,
    },
    /// A setting was refused (a zero concurrency, capacity, window or
    /// batch size); nothing ran.
    Config(ConfigError),
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
            PipelineError::Config(e) => write!(f, "pipeline not started: {e}"),
            PipelineError::TaskPanicked { task, message } => {
                write!(f, "pipeline task {task:?} panicked: {message}")
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
            PipelineError::TaskLost(_) | PipelineError::TaskPanicked { .. } => None,
            PipelineError::Config(e) => Some(e),
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

pub(super) struct ControlState {
    pub(super) shutdown: AtomicBool,
    pub(super) cancel: AtomicBool,
    pub(super) event: Event,
    pub(super) ctx: Mutex<Weak<Ctx>>,
}

/// Stops a running [`Pipeline`] and reads its counters. Cheap to clone.
#[derive(Clone)]
pub struct PipelineControl {
    pub(super) state: Arc<ControlState>,
}

impl PipelineControl {
    pub(super) fn new() -> Self {
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

    pub(super) fn stopping(&self) -> bool {
        self.state.shutdown.load(Ordering::Acquire)
    }

    pub(super) fn cancelled(&self) -> bool {
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
pub(super) struct Ctx {
    pub(super) tracker: Tracker,
    pub(super) dead: Arc<dyn DeadLetterSink>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) spawner: Arc<dyn Spawn>,
    pub(super) capacity: usize,
    pub(super) control: PipelineControl,
    pub(super) stages: Mutex<Vec<Arc<Counters>>>,
    pub(super) tasks: Mutex<Vec<(String, JoinHandle<()>)>>,
    pub(super) fatal: Mutex<Option<PipelineError>>,
    pub(super) inputs: AtomicU64,
}

impl Ctx {
    pub(super) fn spawn(&self, name: &str, fut: impl Future<Output = ()> + Send + 'static) {
        let handle = self.spawner.spawn_named(name, fut);
        lock(&self.tasks).push((name.to_owned(), handle));
    }

    /// Cancels every task and waits until each has stopped, so nothing a
    /// task does (a delivery it pulls, an item it registers) can happen
    /// after this returns.
    pub(super) async fn cancel_tasks(&self) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for (_, handle) in tasks {
            let _ = handle.cancel().await;
        }
    }

    /// Waits for every task to end. The first one that ends abnormally
    /// (panicked, or dropped by its executor) is the error, and the rest
    /// are cancelled then: with a task gone, the others may wait forever
    /// for items it held.
    pub(super) async fn join_tasks(&self) -> Option<PipelineError> {
        let mut tasks: Vec<(String, Option<JoinHandle<()>>)> =
            std::mem::take(&mut *lock(&self.tasks))
                .into_iter()
                .map(|(name, h)| (name, Some(h)))
                .collect();
        let failed = std::future::poll_fn(|cx| {
            let mut pending = false;
            for (name, slot) in tasks.iter_mut() {
                let Some(handle) = slot else { continue };
                match std::pin::Pin::new(handle).poll(cx) {
                    std::task::Poll::Pending => pending = true,
                    std::task::Poll::Ready(r) => {
                        *slot = None;
                        if let Err(e) = r {
                            return std::task::Poll::Ready(Some(task_error(name, e)));
                        }
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(None)
            }
        })
        .await;
        if failed.is_some() {
            for handle in tasks.into_iter().filter_map(|(_, h)| h) {
                let _ = handle.cancel().await;
            }
        }
        failed
    }

    pub(super) fn counters<T: Send + 'static>(
        &self,
        name: &str,
        kind: StageKind,
        input: &HopRx<T>,
    ) -> Arc<Counters> {
        let queued = input.watch();
        let c = Arc::new(Counters {
            name: name.to_owned(),
            kind,
            received: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            workers: std::sync::atomic::AtomicUsize::new(0),
            queued: Box::new(move || queued.get()),
        });
        lock(&self.stages).push(c.clone());
        c
    }

    pub(super) fn stage_stats(&self) -> Vec<StageStats> {
        lock(&self.stages).iter().map(|c| c.snapshot()).collect()
    }

    pub(super) fn fail(&self, error: PipelineError) {
        tracing::error!(error = %error, "pipeline stopping");
        lock(&self.fatal).get_or_insert(error);
        self.control.cancel();
    }

    /// Sends `value` to the dead letters; false if that failed (the
    /// pipeline is then stopping).
    pub(super) async fn dead_letter<T: Serialize + Send + 'static>(
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
    pub(super) async fn cancelled(&self) {
        crate::sync::wait_for(&self.control.state.event, || self.control.cancelled()).await
    }

    /// Waits until the pipeline is shutting down.
    pub(super) async fn stopped(&self) {
        crate::sync::wait_for(&self.control.state.event, || self.control.stopping()).await
    }
}

/// The error for a pipeline task that ended abnormally.
pub(super) fn task_error(task: &str, e: JoinError) -> PipelineError {
    match e {
        JoinError::Panicked(message) => {
            tracing::error!(task, message = %message, "pipeline task panicked");
            PipelineError::TaskPanicked {
                task: task.to_owned(),
                message,
            }
        }
        _ => PipelineError::TaskLost(task.to_owned()),
    }
}
