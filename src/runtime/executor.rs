//! `Runtime`: the crate's own small, instrumented multi-threaded executor.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use event_listener::Listener;

use super::join::{CatchPanic, JoinHandle};
use super::monitor::{Monitor, RuntimeStats, TaskInfo, instrument};
use super::scheduler::Scheduler;
use super::{BoxFuture, Spawn};
use crate::ConfigError;

/// How long [`Runtime::shutdown`] waits for worker threads to return after
/// the remaining tasks were cancelled; a thread stuck in a blocking poll
/// longer than this is left to finish on its own (and reported).
const JOIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Configures and builds a [`Runtime`].
///
/// # Default
///
/// - threads: `std::thread::available_parallelism()` (1 if unknown)
/// - thread name prefix: `"smolkit-worker"` (threads are `smolkit-worker-0`, ...)
/// - monitor (task registry and per-poll timing): on
/// - slow-poll threshold: 100 ms (asyncio debug mode's figure)
#[derive(Debug, Clone)]
pub struct Builder {
    threads: Option<usize>,
    name: String,
    monitor: bool,
    slow_poll: Duration,
}

/// Why a [`Runtime`] could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting was refused (`with_threads(0)`).
    Config(ConfigError),
    /// The operating system refused to start a worker thread.
    Spawn(io::Error),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Config(e) => e.fmt(f),
            BuildError::Spawn(_) => f.write_str("failed to start a worker thread"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Spawn(e) => Some(e),
            BuildError::Config(e) => Some(e),
        }
    }
}

impl From<ConfigError> for BuildError {
    fn from(e: ConfigError) -> Self {
        BuildError::Config(e)
    }
}

thread_local! {
    /// The runtime whose worker thread this is, or whose `block_on` is
    /// running on it.
    static CURRENT: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// Makes `handle` the current runtime of this thread until dropped.
struct EnterGuard(Option<Handle>);

impl EnterGuard {
    fn enter(handle: Handle) -> Self {
        EnterGuard(CURRENT.with(|c| c.replace(Some(handle))))
    }
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        // NOTE: `try_with`: during thread teardown the slot may be gone.
        let _ = CURRENT.try_with(|c| *c.borrow_mut() = prev);
    }
}

impl Builder {
    /// A builder with the defaults listed under [`Builder`].
    pub fn new() -> Self {
        Builder {
            threads: None,
            name: String::from("smolkit-worker"),
            monitor: true,
            slow_poll: Duration::from_millis(100),
        }
    }

    /// The number of worker threads. `0` makes [`build`](Builder::build)
    /// fail with a [`ConfigError`] naming `threads`.
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }

    /// The worker thread name prefix.
    pub fn with_thread_name(mut self, prefix: impl Into<String>) -> Self {
        self.name = prefix.into();
        self
    }

    /// Turns the task registry and per-poll timing on or off. The counters
    /// of [`Runtime::stats`] are always kept.
    pub fn with_monitor(mut self, on: bool) -> Self {
        self.monitor = on;
        self
    }

    /// A poll that blocks its thread longer than this logs a `tracing`
    /// warning naming the task (needs the monitor).
    pub fn with_slow_poll_threshold(mut self, threshold: Duration) -> Self {
        self.slow_poll = threshold;
        self
    }

    /// Starts the worker threads.
    ///
    /// Worker threads inherit the `tracing` dispatcher that is current on
    /// the thread calling `build`, so a subscriber set with
    /// `tracing::subscriber::set_default` sees the runtime's events.
    ///
    /// # Errors
    ///
    /// [`BuildError::Config`] for `with_threads(0)`, [`BuildError::Spawn`]
    /// if a thread cannot be started (the threads already started are shut
    /// down).
    pub fn build(self) -> Result<Runtime, BuildError> {
        let threads = match self.threads {
            Some(0) => return Err(ConfigError::zero("threads").into()),
            Some(n) => n,
            None => thread::available_parallelism().map_or(1, NonZeroUsize::get),
        };
        let inner = Arc::new(Inner {
            sched: Scheduler::new(threads, Monitor::new(self.monitor, self.slow_poll)),
            closed: AtomicBool::new(false),
        });
        let exited: Exits = Arc::new((Mutex::new(vec![false; threads]), Condvar::new()));
        // NOTE: only a real subscriber is propagated; pinning the no-op one
        // would hide a global subscriber installed after `build`.
        let dispatch = tracing::dispatcher::get_default(|d| {
            (!d.is::<tracing::subscriber::NoSubscriber>()).then(|| d.clone())
        });
        let mut rt = Runtime {
            inner: Some(inner),
            threads: Vec::with_capacity(threads),
            exited,
        };
        for i in 0..threads {
            let inner = rt.inner.clone().expect("set above");
            let handle = rt.handle();
            let exited = rt.exited.clone();
            let dispatch = dispatch.clone();
            let spawned = thread::Builder::new()
                .name(format!("{}-{i}", self.name))
                .spawn(move || {
                    let _exit = ExitSignal(exited, i);
                    let _trace = dispatch.as_ref().map(tracing::dispatcher::set_default);
                    let _current = EnterGuard::enter(handle);
                    inner.sched.run(i);
                    // A worker that returns late (it was stuck in a poll)
                    // cancels what was queued or woken meanwhile.
                    if inner.sched.is_drained() {
                        inner.cancel_all();
                    }
                });
            match spawned {
                Ok(t) => rt.threads.push(t),
                // NOTE: dropping `rt` stops and joins the threads started.
                Err(e) => return Err(BuildError::Spawn(e)),
            }
        }
        Ok(rt)
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

/// Which worker threads have left their run loop.
type Exits = Arc<(Mutex<Vec<bool>>, Condvar)>;

/// Marks worker thread `.1` as exited, even if it unwinds.
struct ExitSignal(Exits, usize);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        let (exited, cv) = &*self.0;
        exited.lock().unwrap_or_else(|e| e.into_inner())[self.1] = true;
        cv.notify_all();
    }
}

struct Inner {
    sched: Arc<Scheduler>,
    /// No new tasks are accepted.
    closed: AtomicBool,
}

impl Inner {
    /// Cancels every task left: drops the queued ones and wakes the waiting
    /// ones, whose wake-up the drained scheduler turns into a drop.
    fn cancel_all(&self) {
        self.sched.drain();
        self.sched.monitor.wake_all_waiting();
    }

    fn spawn<F>(&self, name: Option<&str>, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return JoinHandle::cancelled();
        }
        let fut = instrument(&self.sched, name, CatchPanic::new(fut));
        JoinHandle::native(self.sched.spawn(fut))
    }

    fn spawn_boxed(&self, name: Option<&str>, fut: BoxFuture) {
        if self.closed.load(Ordering::Acquire) {
            return; // `fut` is dropped: its handle reports `Cancelled`.
        }
        self.sched
            .spawn(instrument(&self.sched, name, fut))
            .detach();
    }
}

/// What [`Runtime::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Every task finished within the grace period.
    pub drained: bool,
    /// Tasks still live when the grace period ended (they are cancelled).
    pub cancelled: u64,
    /// Worker threads that did not return within a second of being told to
    /// (stuck in a blocking poll); they finish on their own.
    pub unjoined_threads: usize,
}

/// The crate's own small multi-threaded executor, with a task monitor.
///
/// N named worker threads run `async-task` tasks with a scheduler of the
/// crate's own: a local queue per worker, work stealing between them, and a
/// LIFO slot, so a task woken by the task running on a worker runs next on
/// that worker (a request and its reply stay on one core). Idle workers
/// drive the IO reactor and timers (`async-io`). What it adds to an executor
/// is what the seeds' "count and monitor running tasks" asks for, done
/// properly:
///
/// - [`tasks`](Runtime::tasks): a snapshot of every live task that has
///   waited at least once, with its name, age, poll count, busy time and
///   longest poll;
/// - [`stats`](Runtime::stats): spawned / completed / cancelled / panicked /
///   live counters;
/// - a `tracing` warning naming any task whose single poll blocked its
///   thread longer than a threshold (default 100 ms);
/// - [`shutdown`](Runtime::shutdown) with a grace period.
///
/// # Drop behavior
///
/// Dropping a `Runtime` is `shutdown(Duration::ZERO)`: live tasks are
/// cancelled and the threads joined. It never hangs: a thread stuck in a
/// blocking poll is left behind after a second (see [`ShutdownReport`]).
///
/// # Examples
///
/// ```
/// use smolkit::runtime::Runtime;
///
/// let rt = Runtime::builder().with_threads(2).build().unwrap();
/// let task = rt.spawn_named("adder", async { 40 + 2 });
/// assert_eq!(rt.block_on(task), Ok(42));
/// assert_eq!(rt.stats().completed, 1);
/// ```
pub struct Runtime {
    inner: Option<Arc<Inner>>,
    threads: Vec<thread::JoinHandle<()>>,
    exited: Exits,
}

impl Runtime {
    /// A runtime with the [`Builder`] defaults.
    ///
    /// # Errors
    ///
    /// As [`Builder::build`].
    pub fn new() -> Result<Runtime, BuildError> {
        Builder::new().build()
    }

    /// A builder to configure a runtime.
    pub fn builder() -> Builder {
        Builder::new()
    }

    fn inner(&self) -> &Arc<Inner> {
        // NOTE: `inner` is `None` only inside `shutdown`, which takes `self`.
        self.inner.as_ref().expect("runtime used after shutdown")
    }

    /// Runs `fut` to completion on the calling thread (tasks it spawns run
    /// on the worker threads) and returns its output.
    ///
    /// While it runs, this runtime is the thread's current one
    /// ([`Handle::try_current`]): components built inside `fut` without a
    /// spawner spawn onto it.
    ///
    /// # Panics
    ///
    /// Do not call it from inside an async task: it blocks the thread.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let _current = EnterGuard::enter(self.handle());
        async_io::block_on(fut)
    }

    /// Spawns a task. See [`JoinHandle`] for cancellation and panics.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner().spawn(None, fut)
    }

    /// Spawns a task under a name shown by [`tasks`](Runtime::tasks) and the
    /// slow-poll warning.
    pub fn spawn_named<F>(&self, name: &str, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner().spawn(Some(name), fut)
    }

    /// A cheap, cloneable handle implementing [`Spawn`]. It does not keep
    /// the runtime alive: once the runtime is shut down, spawning through
    /// it gives handles that report [`JoinError::Cancelled`](super::JoinError::Cancelled).
    pub fn handle(&self) -> Handle {
        Handle {
            inner: Arc::downgrade(self.inner()),
        }
    }

    /// The runtime as the `Arc<dyn Spawn>` that components take
    /// (`with_spawner`). Like [`handle`](Runtime::handle), it does not keep
    /// the runtime alive.
    pub fn spawner(&self) -> Arc<dyn Spawn> {
        Arc::new(self.handle())
    }

    /// A snapshot of the live tasks, in spawn order (empty when the monitor
    /// is off).
    ///
    /// A task is listed from the end of its first poll that returns
    /// `Pending`: one that finishes in its first poll never costs a
    /// registry entry (it is still counted by [`stats`](Runtime::stats),
    /// and a first poll that blocks still logs the slow-poll warning).
    pub fn tasks(&self) -> Vec<TaskInfo> {
        self.inner().sched.monitor.tasks()
    }

    /// The task counters.
    pub fn stats(&self) -> RuntimeStats {
        self.inner().sched.monitor.stats()
    }

    /// The number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Stops accepting tasks, waits up to `grace` for the live ones to
    /// finish, cancels the rest and joins the worker threads.
    ///
    /// Blocks the calling thread; call it from outside the runtime.
    pub fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        self.shutdown_inner(grace)
    }

    fn shutdown_inner(&mut self, grace: Duration) -> ShutdownReport {
        let Some(inner) = self.inner.take() else {
            return ShutdownReport {
                drained: true,
                cancelled: 0,
                unjoined_threads: 0,
            };
        };
        inner.closed.store(true, Ordering::Release);
        inner.sched.monitor.close();
        let deadline = Instant::now() + grace;
        loop {
            if inner.sched.monitor.live() == 0 {
                break;
            }
            let listener = inner.sched.monitor.idle_listener();
            if inner.sched.monitor.live() == 0 {
                break;
            }
            if listener.wait_deadline(deadline).is_none() {
                break;
            }
        }
        let left = inner.sched.monitor.live();
        inner.sched.stop();

        let join_deadline = Instant::now() + JOIN_TIMEOUT;
        let exited = {
            let (flags, cv) = &*self.exited;
            let mut exited = flags.lock().unwrap_or_else(|e| e.into_inner());
            while !exited.iter().all(|&e| e) {
                let now = Instant::now();
                if now >= join_deadline {
                    break;
                }
                exited = cv
                    .wait_timeout(exited, join_deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            exited.clone()
        };
        // Every task left is cancelled here; a worker still stuck in a poll
        // cancels what it leaves when it returns.
        inner.cancel_all();
        let stats = inner.sched.monitor.stats();
        drop(inner);
        let mut unjoined = 0;
        for (t, exited) in self.threads.drain(..).zip(exited) {
            if exited {
                // Past its run loop: returns at once.
                let _ = t.join();
            } else {
                unjoined += 1;
            }
        }
        if unjoined > 0 {
            tracing::warn!(
                threads = unjoined,
                "runtime shut down with worker threads still blocked in a poll"
            );
        }
        let report = ShutdownReport {
            drained: left == 0,
            cancelled: left,
            unjoined_threads: unjoined,
        };
        tracing::debug!(
            drained = report.drained,
            cancelled = report.cancelled,
            stats = ?stats,
            "runtime shut down"
        );
        report
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown_inner(Duration::ZERO);
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Runtime");
        d.field("threads", &self.threads.len());
        if let Some(inner) = &self.inner {
            d.field("stats", &inner.sched.monitor.stats());
        }
        d.finish()
    }
}

impl Spawn for Runtime {
    fn spawn_boxed(&self, fut: BoxFuture) {
        self.inner().spawn_boxed(None, fut)
    }
    fn spawn_named_boxed(&self, name: &str, fut: BoxFuture) {
        self.inner().spawn_boxed(Some(name), fut)
    }
}

/// A handle to a [`Runtime`]: spawns onto it without keeping it alive.
#[derive(Clone)]
pub struct Handle {
    inner: Weak<Inner>,
}

impl Handle {
    /// The runtime this thread runs in: the one whose worker thread this
    /// is, or whose [`block_on`](Runtime::block_on) is running here. `None`
    /// elsewhere (tokio's `Handle::try_current`).
    pub fn try_current() -> Option<Handle> {
        CURRENT
            .try_with(|c| c.borrow().clone())
            .ok()
            .flatten()
            .filter(|h| h.inner.strong_count() > 0)
    }

    /// Spawns a task on the runtime; if it has shut down, the handle
    /// reports [`JoinError::Cancelled`](super::JoinError::Cancelled).
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.inner.upgrade() {
            Some(inner) => inner.spawn(None, fut),
            None => JoinHandle::cancelled(),
        }
    }

    /// Spawns a named task (see [`Runtime::spawn_named`]).
    pub fn spawn_named<F>(&self, name: &str, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.inner.upgrade() {
            Some(inner) => inner.spawn(Some(name), fut),
            None => JoinHandle::cancelled(),
        }
    }

    /// The runtime's task counters, or `None` once it has shut down.
    pub fn stats(&self) -> Option<RuntimeStats> {
        self.inner.upgrade().map(|i| i.sched.monitor.stats())
    }
}

impl Spawn for Handle {
    fn spawn_boxed(&self, fut: BoxFuture) {
        if let Some(inner) = self.inner.upgrade() {
            inner.spawn_boxed(None, fut);
        }
    }
    fn spawn_named_boxed(&self, name: &str, fut: BoxFuture) {
        if let Some(inner) = self.inner.upgrade() {
            inner.spawn_boxed(Some(name), fut);
        }
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("alive", &(self.inner.strong_count() > 0))
            .finish()
    }
}
