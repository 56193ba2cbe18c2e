//! Worker pools, pipelines and work queues.
//!
//! - [`WorkerPool`]: N worker tasks over one bounded queue; `submit` gives
//!   a handle to the result, `process` maps a whole stream; resize at run
//!   time or autoscale from the queue depth; a panicking job is an error
//!   result and its worker carries on.
//! - [`Pipeline`]: source → stages (`map`, `cpu_map`, `filter`,
//!   `flat_map`, `batch`) → sink, with bounded channels between stages
//!   (backpressure), a retry [`Policy`](crate::resilience::Policy) per
//!   stage, a dead-letter sink for items that still fail, and checkpoints
//!   of the completed input so a restarted pipeline resumes.
//! - [`Queue`]: the source of work with leases and ack/nack for
//!   at-least-once delivery; [`MemoryQueue`] in process (a Redis one can
//!   implement the same trait).
//!
//! # Losing nothing
//!
//! Every item that enters ends in exactly one of: a result (pool), the
//! sink, the dead-letter sink, or a filter's rejection — and the pipeline's
//! report counts each. An item is never dropped silently: a job dropped
//! unrun reports [`JobError::Cancelled`], a stage error or panic becomes a
//! [`DeadLetter`].

mod checkpoint;
mod dead_letter;
mod error;
mod pipeline;
mod process;
mod queue;
mod worker;
mod worker_pool;

pub use checkpoint::{Checkpoint, CheckpointError, FileCheckpoint, MemoryCheckpoint};
pub use dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink, JsonLinesFile};
pub use error::{JobError, SubmitError, TrySubmitError};
pub use pipeline::{
    Pipeline, PipelineControl, PipelineError, PipelineReport, Stage, StageKind, StageStats,
};
pub use process::Process;
pub use queue::{
    Delivery, MemoryQueue, Nack, PushError, Queue, QueueDeadLetter, QueueError, QueueStats,
};
pub use worker_pool::{JobHandle, PoolStats, Processed, WorkerPool, WorkerPoolBuilder};

pub(crate) use worker_pool::BoxFut;
