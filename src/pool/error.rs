use std::error::Error;
use std::fmt;

/// Why a job submitted to a [`WorkerPool`](super::WorkerPool) has no value.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobError<E> {
    /// The job's function returned this error.
    Failed(E),
    /// The job's function panicked; the message is kept.
    Panicked(String),
    /// The job never ran: the pool was closed before it could be queued.
    Closed,
    /// The job was dropped without a result: its worker task was cancelled
    /// (the executor shut down) or the pool was dropped with the job queued
    /// and no worker left.
    Cancelled,
}

impl<E> JobError<E> {
    /// The function's own error, if that is what happened.
    pub fn into_inner(self) -> Option<E> {
        match self {
            JobError::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the function panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, JobError::Panicked(_))
    }
}

impl<E: fmt::Debug> fmt::Debug for JobError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
            JobError::Panicked(m) => f.debug_tuple("Panicked").field(m).finish(),
            JobError::Closed => f.write_str("Closed"),
            JobError::Cancelled => f.write_str("Cancelled"),
        }
    }
}

impl<E: fmt::Display> fmt::Display for JobError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Failed(e) => write!(f, "job failed: {e}"),
            JobError::Panicked(m) => write!(f, "job panicked: {m}"),
            JobError::Closed => f.write_str("worker pool closed before the job was queued"),
            JobError::Cancelled => f.write_str("job dropped without a result"),
        }
    }
}

impl<E: Error + 'static> Error for JobError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            JobError::Failed(e) => Some(e),
            _ => None,
        }
    }
}

/// [`WorkerPool::submit`](super::WorkerPool::submit) failed: the pool is
/// closed. The item is handed back.
#[derive(Clone, PartialEq, Eq)]
pub struct SubmitError<I>(pub I);

impl<I> SubmitError<I> {
    /// The item that was not queued.
    pub fn into_inner(self) -> I {
        self.0
    }
}

impl<I> fmt::Debug for SubmitError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubmitError(..)")
    }
}

impl<I> fmt::Display for SubmitError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("worker pool is closed")
    }
}

impl<I> Error for SubmitError<I> {}

/// [`WorkerPool::try_submit`](super::WorkerPool::try_submit) failed. The
/// item is handed back.
#[derive(Clone, PartialEq, Eq)]
pub enum TrySubmitError<I> {
    /// The queue is at capacity.
    Full(I),
    /// The pool is closed.
    Closed(I),
}

impl<I> TrySubmitError<I> {
    /// The item that was not queued.
    pub fn into_inner(self) -> I {
        match self {
            TrySubmitError::Full(i) | TrySubmitError::Closed(i) => i,
        }
    }

    /// Whether the queue was full (as opposed to closed).
    pub fn is_full(&self) -> bool {
        matches!(self, TrySubmitError::Full(_))
    }
}

impl<I> fmt::Debug for TrySubmitError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySubmitError::Full(_) => f.write_str("Full(..)"),
            TrySubmitError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<I> fmt::Display for TrySubmitError<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySubmitError::Full(_) => f.write_str("worker pool queue is full"),
            TrySubmitError::Closed(_) => f.write_str("worker pool is closed"),
        }
    }
}

impl<I> Error for TrySubmitError<I> {}
