//! `Spawn` for other executors.

use super::{BoxFuture, Spawn};

/// smol's global executor (`smol::spawn`): the default spawner outside a
/// [`Runtime`](super::Runtime).
///
/// Its threads start on first use; `SMOL_THREADS` sets how many.
#[derive(Debug, Clone, Copy, Default)]
pub struct SmolGlobal;

impl Spawn for SmolGlobal {
    fn spawn_boxed(&self, fut: BoxFuture) {
        smol::spawn(fut).detach();
    }
}

/// A `smol::Executor` (the same type as `async_executor::Executor`); wrap it
/// in an `Arc` to share it, which is covered by the blanket impl.
impl Spawn for async_executor::Executor<'static> {
    fn spawn_boxed(&self, fut: BoxFuture) {
        self.spawn(fut).detach();
    }
}

/// async-std's global executor (`async_std::task::spawn`).
#[cfg(feature = "async-std")]
#[derive(Debug, Clone, Copy, Default)]
pub struct AsyncStd;

#[cfg(feature = "async-std")]
impl Spawn for AsyncStd {
    fn spawn_boxed(&self, fut: BoxFuture) {
        // async-std's handle detaches on drop; cancellation goes through
        // the `JoinHandle` wrapper instead.
        drop(async_std::task::spawn(fut));
    }

    fn spawn_named_boxed(&self, name: &str, fut: BoxFuture) {
        let spawned = async_std::task::Builder::new()
            .name(name.to_owned())
            .spawn(fut);
        if let Err(e) = spawned {
            // NOTE: `Builder::spawn` fails only if the name is rejected;
            // the future was dropped, so its handle reports `Cancelled`.
            tracing::warn!(task.name = name, error = %e, "async-std refused to spawn a task");
        }
    }
}
