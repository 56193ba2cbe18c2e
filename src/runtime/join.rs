//! `JoinHandle`, `JoinError` and the wrappers that give every executor the
//! same task semantics.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use pin_project_lite::pin_project;

/// Why awaiting a [`JoinHandle`] did not give the task's output.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JoinError {
    /// The task was cancelled before it finished: its `JoinHandle` was
    /// dropped (from a clone's point of view), its executor shut down, or it
    /// was spawned on an executor that no longer accepts work.
    Cancelled,
    /// The task panicked; the string is the panic message.
    Panicked(String),
}

impl JoinError {
    /// Whether the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, JoinError::Cancelled)
    }

    /// Whether the task panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, JoinError::Panicked(_))
    }

    /// The panic message, if the task panicked.
    pub fn panic_message(&self) -> Option<&str> {
        match self {
            JoinError::Panicked(msg) => Some(msg),
            JoinError::Cancelled => None,
        }
    }
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Cancelled => f.write_str("task was cancelled"),
            JoinError::Panicked(msg) => write!(f, "task panicked: {msg}"),
        }
    }
}

impl std::error::Error for JoinError {}

/// Turns a panic payload into its message.
pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic payload is not a string".to_owned()
    }
}

/// How a task's last poll ended, as far as the runtime's counters care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Completed,
    Panicked,
    Aborted,
}

thread_local! {
    // NOTE: set by `CatchPanic` (a panic turned into a value) and by
    // `Guarded` (stopped by its handle) during a poll, and read by the
    // runtime's instrumentation right after that poll, so the runtime can
    // count panics and cancellations of tasks spawned through `dyn Spawn`,
    // whose output type it cannot see.
    static OUTCOME: Cell<Outcome> = const { Cell::new(Outcome::Completed) };
    // NOTE: how many `CatchPanic` polls are running on this thread, and how
    // many were running when the runtime's instrumentation started the
    // current task's poll. Only the wrapper at that depth is the task's
    // own; a deeper one belongs to a task of a nested executor ticked
    // inside this poll, whose outcome is not this task's.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static BASE: Cell<u32> = const { Cell::new(0) };
}

/// Records `outcome` when the wrapper recording it is the polled task's own.
fn set_outcome(depth: u32, outcome: Outcome) {
    if depth == BASE.with(Cell::get) {
        OUTCOME.with(|c| c.set(outcome));
    }
}

/// Marks the start of an instrumented task's poll; returns the enclosing
/// mark, to restore with [`end_task_poll`].
#[inline]
pub(crate) fn begin_task_poll() -> u32 {
    let depth = DEPTH.with(Cell::get);
    OUTCOME.with(|c| c.set(Outcome::Completed));
    BASE.with(|b| b.replace(depth))
}

#[inline]
pub(crate) fn end_task_poll(enclosing: u32) {
    BASE.with(|b| b.set(enclosing));
}

/// Returns how the poll that just ran on this thread ended, and resets it.
#[inline]
pub(crate) fn take_outcome() -> Outcome {
    OUTCOME.with(|c| c.replace(Outcome::Completed))
}

pin_project! {
    /// Polls `F`, turning a panic into `Err(JoinError::Panicked)`.
    #[derive(Debug)]
    pub(crate) struct CatchPanic<F> {
        #[pin]
        fut: F,
    }
}

impl<F> CatchPanic<F> {
    pub(crate) fn new(fut: F) -> Self {
        CatchPanic { fut }
    }
}

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.project().fut;
        let depth = DEPTH.with(|d| d.replace(d.get() + 1));
        let polled = catch_unwind(AssertUnwindSafe(|| fut.poll(cx)));
        DEPTH.with(|d| d.set(depth));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => {
                set_outcome(depth, Outcome::Panicked);
                Poll::Ready(Err(JoinError::Panicked(panic_message(payload))))
            }
        }
    }
}

/// State shared by a task spawned through [`Spawn`](super::Spawn) and its
/// [`JoinHandle`].
struct Shared<T> {
    result: Mutex<Option<Result<T, JoinError>>>,
    done: AtomicBool,
    aborted: AtomicBool,
    joiner: AtomicWaker,
    task: AtomicWaker,
}

impl<T> Shared<T> {
    fn finish(&self, result: Result<T, JoinError>) {
        {
            let mut slot = self.result.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() && !self.done.load(Ordering::Acquire) {
                *slot = Some(result);
            }
        }
        self.done.store(true, Ordering::Release);
        self.joiner.wake();
    }
}

pin_project! {
    /// The future actually handed to an executor by
    /// [`SpawnExt::spawn`](super::SpawnExt::spawn): it stops when the handle
    /// aborts it, stores the output (or panic) for the handle, and reports
    /// `Cancelled` if the executor drops it unfinished.
    pub(crate) struct Guarded<F: Future> {
        #[pin]
        fut: CatchPanic<F>,
        shared: Arc<Shared<F::Output>>,
        finished: bool,
    }

    impl<F: Future> PinnedDrop for Guarded<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.finished {
                this.shared.finish(Err(JoinError::Cancelled));
            }
        }
    }
}

impl<F: Future> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if *this.finished {
            return Poll::Ready(());
        }
        this.shared.task.register(cx.waker());
        if this.shared.aborted.load(Ordering::Acquire) {
            *this.finished = true;
            this.shared.finish(Err(JoinError::Cancelled));
            set_outcome(DEPTH.with(Cell::get), Outcome::Aborted);
            return Poll::Ready(());
        }
        match this.fut.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                *this.finished = true;
                this.shared.finish(result);
                Poll::Ready(())
            }
        }
    }
}

/// Wraps `fut` for spawning through an object-safe [`Spawn`](super::Spawn),
/// returning the future to spawn and the handle to it.
pub(crate) fn guard<F>(fut: F) -> (Guarded<F>, JoinHandle<F::Output>)
where
    F: Future,
{
    let shared = Arc::new(Shared {
        result: Mutex::new(None),
        done: AtomicBool::new(false),
        aborted: AtomicBool::new(false),
        joiner: AtomicWaker::new(),
        task: AtomicWaker::new(),
    });
    let guarded = Guarded {
        fut: CatchPanic::new(fut),
        shared: shared.clone(),
        finished: false,
    };
    (
        guarded,
        JoinHandle {
            inner: Inner::Shared(shared),
            detached: false,
        },
    )
}

enum Inner<T> {
    /// A task of the crate's own runtime (an `async-task` task).
    Native(async_task::FallibleTask<Result<T, JoinError>>),
    /// A task spawned through `dyn Spawn` on any executor.
    Shared(Arc<Shared<T>>),
    /// Refused at spawn time (executor shut down) or already joined.
    Cancelled,
}

/// A handle to a spawned task.
///
/// One rule on every executor:
/// - **dropping** the handle cancels the task (at its next `.await` point),
///   unless [`detach`](JoinHandle::detach) was called;
/// - **awaiting** it gives `Ok(output)`, `Err(JoinError::Panicked(msg))` if
///   the task panicked (the executor's thread survives), or
///   `Err(JoinError::Cancelled)` if the task was cancelled, for example by
///   an executor shutdown.
///
/// # Examples
///
/// ```
/// use smolkit::runtime::{Runtime, JoinError};
///
/// let rt = Runtime::builder().with_threads(1).build().unwrap();
/// let ok = rt.spawn(async { 1 + 1 });
/// let bad = rt.spawn(async { panic!("boom") });
/// rt.block_on(async {
///     assert_eq!(ok.await, Ok(2));
///     assert_eq!(bad.await, Err(JoinError::Panicked("boom".into())));
/// });
/// ```
#[must_use = "dropping a JoinHandle cancels the task; call .detach() to let it run"]
pub struct JoinHandle<T> {
    inner: Inner<T>,
    detached: bool,
}

impl<T> JoinHandle<T> {
    pub(crate) fn native(task: async_task::Task<Result<T, JoinError>>) -> Self {
        JoinHandle {
            inner: Inner::Native(task.fallible()),
            detached: false,
        }
    }

    pub(crate) fn cancelled() -> Self {
        JoinHandle {
            inner: Inner::Cancelled,
            detached: false,
        }
    }

    /// Lets the task run to completion without a handle; its output is
    /// dropped.
    pub fn detach(mut self) {
        self.detached = true;
        if let Inner::Native(task) = std::mem::replace(&mut self.inner, Inner::Cancelled) {
            task.detach();
        }
    }

    /// Cancels the task now (same as dropping the handle), without waiting.
    pub fn abort(self) {
        drop(self)
    }

    /// Cancels the task and waits until it has stopped: a poll running on
    /// another thread at that moment finishes first, then the future is
    /// dropped. Returns the task's result if it finished before the cancel
    /// took effect, [`JoinError::Cancelled`] otherwise.
    ///
    /// Unlike [`abort`](Self::abort), nothing the task does can happen
    /// after this returns.
    ///
    /// # Errors
    ///
    /// [`JoinError::Cancelled`] when the cancel stopped it,
    /// [`JoinError::Panicked`] when it had panicked.
    ///
    /// # Cancel safety
    ///
    /// Dropping this future still cancels the task, without waiting.
    pub async fn cancel(mut self) -> Result<T, JoinError> {
        match std::mem::replace(&mut self.inner, Inner::Cancelled) {
            Inner::Native(task) => task.cancel().await.unwrap_or(Err(JoinError::Cancelled)),
            Inner::Shared(shared) => {
                if !shared.done.load(Ordering::Acquire) {
                    shared.aborted.store(true, Ordering::Release);
                    shared.task.wake();
                }
                self.inner = Inner::Shared(shared);
                (&mut self).await
            }
            Inner::Cancelled => Err(JoinError::Cancelled),
        }
    }

    /// Whether the task has finished (completed, panicked or been cancelled).
    pub fn is_finished(&self) -> bool {
        match &self.inner {
            Inner::Native(task) => task.is_finished(),
            Inner::Shared(shared) => shared.done.load(Ordering::Acquire),
            Inner::Cancelled => true,
        }
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match &mut this.inner {
            Inner::Native(task) => match Pin::new(task).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(out) => {
                    this.inner = Inner::Cancelled;
                    Poll::Ready(out.unwrap_or(Err(JoinError::Cancelled)))
                }
            },
            Inner::Shared(shared) => {
                if !shared.done.load(Ordering::Acquire) {
                    shared.joiner.register(cx.waker());
                    if !shared.done.load(Ordering::Acquire) {
                        return Poll::Pending;
                    }
                }
                let out = shared
                    .result
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or(Err(JoinError::Cancelled));
                this.inner = Inner::Cancelled;
                Poll::Ready(out)
            }
            Inner::Cancelled => Poll::Ready(Err(JoinError::Cancelled)),
        }
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        // A native task is cancelled by dropping its `FallibleTask`.
        if let Inner::Shared(shared) = &self.inner
            && !shared.done.load(Ordering::Acquire)
        {
            shared.aborted.store(true, Ordering::Release);
            shared.task.wake();
        }
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .field("detached", &self.detached)
            .finish()
    }
}
