//! The acquire futures and the permit guards.

use super::*;

/// The future of [`Semaphore::acquire`].
#[must_use = "futures do nothing unless you .await or poll them"]
pub struct Acquire<'a> {
    pub(super) sem: &'a Semaphore,
    pub(super) inner: AcquireState,
}

impl<'a> Future for Acquire<'a> {
    type Output = Result<SemaphoreGuard<'a>, AcquireError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let sem = this.sem;
        this.inner
            .poll(sem, cx)
            .map(|r| r.map(|permits| SemaphoreGuard { sem, permits }))
    }
}

impl Drop for Acquire<'_> {
    #[inline]
    fn drop(&mut self) {
        self.inner.cancel(self.sem);
    }
}

impl fmt::Debug for Acquire<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("semaphore", self.sem)
            .finish()
    }
}

/// The future of [`Semaphore::acquire_arc`].
#[must_use = "futures do nothing unless you .await or poll them"]
pub struct AcquireArc {
    pub(super) sem: std::sync::Arc<Semaphore>,
    pub(super) inner: AcquireState,
}

impl Future for AcquireArc {
    type Output = Result<SemaphoreGuardArc, AcquireError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.inner.poll(&this.sem, cx).map(|r| {
            r.map(|permits| SemaphoreGuardArc {
                sem: this.sem.clone(),
                permits,
            })
        })
    }
}

impl Drop for AcquireArc {
    #[inline]
    fn drop(&mut self) {
        self.inner.cancel(&self.sem);
    }
}

impl fmt::Debug for AcquireArc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcquireArc")
            .field("semaphore", &self.sem)
            .finish()
    }
}

/// Permits borrowed from a [`Semaphore`]; returned on drop.
#[must_use = "the permits are returned as soon as the guard is dropped"]
pub struct SemaphoreGuard<'a> {
    pub(super) sem: &'a Semaphore,
    pub(super) permits: usize,
}

impl SemaphoreGuard<'_> {
    /// How many permits this guard holds.
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// Keeps the permits out of the semaphore for good: its capacity
    /// shrinks by this guard's permits.
    pub fn forget(mut self) {
        forget_permits(self.sem, std::mem::take(&mut self.permits));
    }
}

impl Drop for SemaphoreGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.sem.release(self.permits);
    }
}

impl fmt::Debug for SemaphoreGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphoreGuard")
            .field("permits", &self.permits)
            .finish()
    }
}

/// Permits of an `Arc<Semaphore>`, owned: can move into a spawned task.
#[must_use = "the permits are returned as soon as the guard is dropped"]
pub struct SemaphoreGuardArc {
    pub(super) sem: std::sync::Arc<Semaphore>,
    pub(super) permits: usize,
}

impl SemaphoreGuardArc {
    /// How many permits this guard holds.
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// The semaphore the permits belong to.
    pub fn semaphore(&self) -> &std::sync::Arc<Semaphore> {
        &self.sem
    }

    /// Keeps the permits out of the semaphore for good: its capacity
    /// shrinks by this guard's permits.
    pub fn forget(mut self) {
        forget_permits(&self.sem, std::mem::take(&mut self.permits));
    }

    /// Takes `other`'s permits into this guard, if both are of the same
    /// semaphore; else hands `other` back.
    pub(crate) fn merge(&mut self, mut other: SemaphoreGuardArc) -> Result<(), SemaphoreGuardArc> {
        if !std::sync::Arc::ptr_eq(&self.sem, &other.sem) {
            return Err(other);
        }
        self.permits += std::mem::take(&mut other.permits);
        Ok(())
    }

    /// Moves `n` of this guard's permits (all of them if it holds fewer)
    /// into a new guard; each returns its own on drop.
    pub fn split(&mut self, n: usize) -> SemaphoreGuardArc {
        let n = n.min(self.permits);
        self.permits -= n;
        SemaphoreGuardArc {
            sem: self.sem.clone(),
            permits: n,
        }
    }
}

impl Drop for SemaphoreGuardArc {
    #[inline]
    fn drop(&mut self) {
        self.sem.release(self.permits);
    }
}

impl fmt::Debug for SemaphoreGuardArc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphoreGuardArc")
            .field("permits", &self.permits)
            .finish()
    }
}

pub(super) fn forget_permits(sem: &Semaphore, n: usize) {
    let mut wakers = Wakers::new();
    {
        let mut q = sync::lock(&sem.queue);
        let cap = sem.capacity.load(Ordering::Acquire).saturating_sub(n);
        sem.capacity.store(cap, Ordering::Release);
        sem.fail_too_large_locked(&mut q, cap, &mut wakers);
    }
    wakers.wake();
}
