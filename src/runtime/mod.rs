//! The executor-neutral layer: spawning, time, the crate's own instrumented
//! runtime, and offloading blocking or CPU-heavy work.
//!
//! Everything else in smolkit stands on this module and on nothing
//! executor-specific:
//!
//! - [`Spawn`] is an object-safe trait for "something that runs futures".
//!   Components that run background tasks take an `Arc<dyn Spawn>`; it is
//!   implemented for the crate's [`Runtime`] (and its [`Handle`]),
//!   `smol::Executor` (also behind `Arc`), smol's global executor
//!   ([`SmolGlobal`]) and, with feature `async-std`, async-std's executor
//!   (`AsyncStd`). [`SpawnExt::spawn`] returns a [`JoinHandle`] with the same
//!   semantics on all of them: dropping it cancels the task unless
//!   [`detach`](JoinHandle::detach) was called, and a panic comes back as
//!   [`JoinError::Panicked`].
//! - [`Clock`] gives `now` and `sleep`. [`SystemClock`] sleeps on
//!   `async_io::Timer`, which works under every executor, and keeps the
//!   deadlines of [`Clock::watchdog`] (timeouts that almost never fire) on
//!   one thread of its own. Tests use `testing::ManualClock` (feature
//!   `testing`), which moves only when told.
//! - [`Runtime`] is a small multi-threaded executor (`async-task` tasks,
//!   per-worker queues, work stealing, a LIFO slot), with a live task
//!   registry ([`Runtime::tasks`]),
//!   counters ([`Runtime::stats`]) and a `tracing` warning for polls that
//!   block a thread too long.
//! - [`offload`] runs blocking IO on the `blocking` thread pool and CPU-heavy
//!   work through a limit sized to the cores.
//!
//! # Why not just use `smol::spawn`?
//!
//! Executors disagree on what a task handle means: smol's `Task` cancels on
//! drop, async-std's `JoinHandle` detaches; a panic is re-raised in the
//! awaiting task by one and aborts the thread's work in another. A library
//! that runs background work for its users cannot leak those differences,
//! so every smolkit component spawns through [`Spawn`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

mod clock;
mod compat;
pub(crate) mod coop;
mod executor;
mod join;
mod monitor;
pub mod offload;
mod scheduler;
mod watchdog;

pub(crate) use clock::saturating_add;
pub use clock::{Clock, CoarseClock, Sleep, SystemClock};
#[cfg(feature = "async-std")]
#[cfg_attr(docsrs, doc(cfg(feature = "async-std")))]
pub use compat::AsyncStd;
pub use compat::SmolGlobal;
pub use executor::{BuildError, Builder, Handle, Runtime, ShutdownReport};
pub(crate) use join::panic_message;
pub use join::{JoinError, JoinHandle};
pub use monitor::{RuntimeStats, TaskInfo};

/// A boxed, sendable future with no output: what [`Spawn`] runs.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Something that runs futures in the background: an executor, or a handle
/// to one.
///
/// The trait is object-safe, so components store an `Arc<dyn Spawn>`. Use
/// [`SpawnExt::spawn`] to spawn a future with an output and get a
/// [`JoinHandle`].
///
/// # Implementing
///
/// `spawn_boxed` must run the future to completion or drop it (for example
/// when the executor shuts down); it must not block. Task handles, panics
/// and cancellation are taken care of by the wrapper that
/// [`SpawnExt::spawn`] puts around the future, so an implementation can
/// detach whatever handle its executor returns.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use smolkit::runtime::{Spawn, SpawnExt, SmolGlobal};
///
/// async fn double_in_background(spawner: Arc<dyn Spawn>, x: u32) -> u32 {
///     spawner.spawn(async move { x * 2 }).await.unwrap()
/// }
///
/// let out = smol::block_on(double_in_background(Arc::new(SmolGlobal), 21));
/// assert_eq!(out, 42);
/// ```
pub trait Spawn: Send + Sync {
    /// Runs `fut` in the background.
    fn spawn_boxed(&self, fut: BoxFuture);

    /// Runs `fut` in the background under a name that instrumented
    /// executors (the crate's [`Runtime`]) show in their task list.
    /// Executors without names ignore it.
    fn spawn_named_boxed(&self, name: &str, fut: BoxFuture) {
        let _ = name;
        self.spawn_boxed(fut)
    }
}

/// Spawning with an output, for every [`Spawn`].
pub trait SpawnExt: Spawn {
    /// Spawns `fut` and returns a handle to its output.
    ///
    /// Dropping the handle cancels the task; see [`JoinHandle`].
    fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (guarded, handle) = join::guard(fut);
        self.spawn_boxed(Box::pin(guarded));
        handle
    }

    /// Spawns `fut` under `name` (see [`Spawn::spawn_named_boxed`]).
    fn spawn_named<F>(&self, name: &str, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (guarded, handle) = join::guard(fut);
        self.spawn_named_boxed(name, Box::pin(guarded));
        handle
    }
}

impl<S: Spawn + ?Sized> SpawnExt for S {}

impl<S: Spawn + ?Sized> Spawn for Arc<S> {
    fn spawn_boxed(&self, fut: BoxFuture) {
        (**self).spawn_boxed(fut)
    }
    fn spawn_named_boxed(&self, name: &str, fut: BoxFuture) {
        (**self).spawn_named_boxed(name, fut)
    }
}

impl<S: Spawn + ?Sized> Spawn for &S {
    fn spawn_boxed(&self, fut: BoxFuture) {
        (**self).spawn_boxed(fut)
    }
    fn spawn_named_boxed(&self, name: &str, fut: BoxFuture) {
        (**self).spawn_named_boxed(name, fut)
    }
}

impl fmt::Debug for dyn Spawn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Spawn")
    }
}

/// The spawner components use when none is given: the current [`Runtime`]
/// when called on one of its worker threads or inside its
/// [`block_on`](Runtime::block_on) ([`Handle::try_current`]), smol's global
/// executor elsewhere.
///
/// Components pick it when they are built, so a pool or client built inside
/// a `Runtime` keeps its tasks there without a `with_spawner` call.
pub fn default_spawner() -> Arc<dyn Spawn> {
    match Handle::try_current() {
        Some(handle) => Arc::new(handle),
        None => Arc::new(SmolGlobal),
    }
}
