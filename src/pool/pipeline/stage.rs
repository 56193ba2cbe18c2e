//! Stage options, stage counters, and one attempt of a stage function.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::resilience::Policy;
use crate::sync::lock_std as lock;

use super::hop::HopTx;
use super::*;

/// Options of one stage: its name, concurrency, order, retry policy and
/// output channel capacity. `&str` and `String` convert into a `Stage`
/// with the defaults.
///
/// # Default
///
/// Concurrency 1, unordered, no retry policy, the pipeline's channel
/// capacity, no autoscaling (10 s idle timeout and a scale-up depth of
/// half the input channel once it is on).
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
    pub(super) name: String,
    pub(super) concurrency: usize,
    pub(super) ordered: bool,
    pub(super) policy: Option<Arc<Policy>>,
    pub(super) capacity: Option<usize>,
    pub(super) autoscale: Option<StageScale>,
    /// Kept apart so the order of the setters does not matter.
    scale_idle: Duration,
    scale_up_at: Option<usize>,
}

/// How an autoscaled stage's workers move (see [`Stage::with_autoscale`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct StageScale {
    pub(super) min: usize,
    pub(super) max: usize,
    pub(super) idle: Duration,
    pub(super) up_at: Option<usize>,
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
            autoscale: None,
            scale_idle: Duration::from_secs(10),
            scale_up_at: None,
        }
    }

    /// Items processed at once (default 1). Zero makes
    /// [`Pipeline::run`] fail with [`PipelineError::Config`] before
    /// anything runs.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
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

    /// The capacity of this stage's output channel (default: the
    /// pipeline's). Zero is refused like a zero concurrency.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Scales the stage's workers between `min` and `max` from its input
    /// queue, like [`WorkerPool`](crate::pool::WorkerPool): a worker that
    /// takes an item while more than the scale-up depth wait behind it
    /// starts another (up to `max`); a worker idle for the idle timeout (on
    /// the pipeline's clock) leaves (down to `min`). It starts with `min`
    /// workers; the concurrency setting is not used then. `map` and
    /// `cpu_map` (unordered), `filter` and `flat_map` scale; `min` of 0, `min`
    /// above `max`, an ordered stage or a batch stage make
    /// [`Pipeline::run`] fail with [`PipelineError::Config`].
    pub fn with_autoscale(mut self, min: usize, max: usize) -> Self {
        self.autoscale = Some(StageScale {
            min,
            max,
            idle: self.scale_idle,
            up_at: self.scale_up_at,
        });
        self
    }

    /// How long an autoscaled worker waits for an item before it leaves
    /// (default 10 s; used with [`with_autoscale`](Self::with_autoscale),
    /// in either order).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.scale_idle = idle;
        if let Some(s) = &mut self.autoscale {
            s.idle = idle;
        }
        self
    }

    /// The input queue depth above which an autoscaled stage adds a worker
    /// (default: half its input channel; used with
    /// [`with_autoscale`](Self::with_autoscale), in either order).
    pub fn with_scale_up_at(mut self, depth: usize) -> Self {
        self.scale_up_at = Some(depth);
        if let Some(s) = &mut self.autoscale {
            s.up_at = Some(depth);
        }
        self
    }

    /// Its settings, checked before a pipeline runs.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::nonzero("stage concurrency", self.concurrency)?;
        if let Some(c) = self.capacity {
            ConfigError::nonzero("stage capacity", c)?;
        }
        if let Some(s) = self.autoscale {
            ConfigError::nonzero("stage autoscale min", s.min)?;
            if s.min > s.max {
                return Err(ConfigError::min_above_max("stage autoscale", s.min, s.max));
            }
            if self.ordered {
                return Err(ConfigError::new(
                    "stage autoscale",
                    format_args!("{}..={}", s.min, s.max),
                    "an ordered stage keeps a fixed concurrency",
                ));
            }
        }
        Ok(())
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
    /// Elements taken from its input and not finished yet (a worker takes
    /// several at once when they are fast).
    pub in_flight: u64,
    /// Elements waiting in its input channel.
    pub queued: usize,
    /// Workers running now (the sink and a batch stage: 1).
    pub workers: usize,
}

pub(super) struct Counters {
    pub(super) name: String,
    pub(super) kind: StageKind,
    pub(super) received: AtomicU64,
    pub(super) emitted: AtomicU64,
    pub(super) dead: AtomicU64,
    pub(super) filtered: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) workers: AtomicUsize,
    pub(super) queued: Box<dyn Fn() -> usize + Send + Sync>,
}

impl Counters {
    pub(super) fn snapshot(&self) -> StageStats {
        StageStats {
            name: self.name.clone(),
            kind: self.kind,
            received: self.received.load(Ordering::Relaxed),
            emitted: self.emitted.load(Ordering::Relaxed),
            dead_letters: self.dead.load(Ordering::Relaxed),
            filtered: self.filtered.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: (self.queued)(),
            workers: self.workers.load(Ordering::Relaxed),
        }
    }
}

pub(super) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Runs one element through `f`, under `policy` if there is one, and
/// hands the element back (for a dead letter).
// NOTE: the value is owned, never borrowed across an await, so the
// future is `Send` without asking items to be `Sync`.
pub(super) async fn attempt<A: Clone, B>(
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

/// Sends a stage's result on, or dead-letters the item; false when the
/// stage should stop.
pub(super) async fn settle<A: Serialize + Send + 'static, B>(
    ctx: &Ctx,
    counters: &Counters,
    tx: &HopTx<Elem<B>>,
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
