//! The [`Runtime`](super::Runtime)'s scheduler: `async-task` tasks on
//! per-worker local queues with work stealing and a LIFO slot.
//!
//! The shape is tokio's multi-thread scheduler, cut down:
//!
//! - every worker thread owns a bounded local queue (others steal half of it
//!   when they run dry) and a **LIFO slot**: a task woken by the task that
//!   is running on this worker runs next, on this worker, while its data is
//!   still in cache (a request/response pair of tasks ping-pongs on one core
//!   instead of crossing to another each time). At most [`LIFO_LIMIT`] LIFO
//!   runs in a row, then the woken task goes to the back of the local queue
//!   so two tasks waking each other cannot starve the rest; a task that
//!   wakes itself (a yield) always goes to the back;
//! - tasks spawned or woken from outside a worker go to one global queue,
//!   which every worker checks first once every [`GLOBAL_EVERY`] runs so it
//!   cannot be starved by busy local queues;
//! - idle workers sleep in `async_io::block_on` (so an idle worker drives the
//!   IO reactor and timers); a push wakes at most one sleeper, and only when
//!   no sleeper has been woken already (async-executor's `Sleepers` scheme);
//!   one poll wakes at most one other worker however many tasks it wakes or
//!   spawns (a worker woken that finds work wakes the next while work is
//!   left queued), and a task that yields, or passes the LIFO limit, wakes
//!   nobody: it runs here next;
//! - a task woken by the reactor that a sleeping worker drives runs on that
//!   worker, which is awake anyway (its own thread wakes it: no system
//!   call); another is woken only for a second such task. Waking another
//!   for each (as any other wake from outside a poll does) moved every
//!   IO-driven task to another core and back: callgrind of 2 000 HTTP
//!   requests over fresh connections, 105 -> 95 M instructions, 340 -> 240
//!   us per request in wall time.
//!
//! async-executor, which the runtime used before, pushes every wake to its
//! global queue and has no LIFO slot: each wake of a ping-pong crosses cores.

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use async_task::{Runnable, ScheduleInfo, Task, WithInfo};
use concurrent_queue::{ConcurrentQueue, PushError};

use super::monitor::Monitor;

/// Capacity of a worker's local queue; past it, tasks go to the global one.
const LOCAL_CAPACITY: usize = 256;
/// A worker takes from the global queue first once every this many runs.
const GLOBAL_EVERY: u32 = 61;
/// LIFO-slot runs in a row before woken tasks go to the back of the queue.
const LIFO_LIMIT: u32 = 3;
/// Runs per turn before a worker lets `block_on` look at the reactor.
const TURN: u32 = 128;

/// Tells schedulers apart in the thread-local worker slot.
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The worker this thread is running, if any.
    static WORKER: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// Why a task is being scheduled.
#[derive(Clone, Copy)]
enum Kind {
    /// Just spawned: to the back of the queue (the spawner still runs).
    New,
    /// Woken by someone else: the LIFO slot, if woken from a poll here.
    Woken,
    /// Woken while it was running (it yielded): to the back of the queue.
    Yielded,
}

/// A worker's thread-local state.
struct Local {
    /// The scheduler's id.
    id: usize,
    index: usize,
    /// A task is being polled by this worker right now.
    polling: bool,
    /// Another worker was woken during the current poll: a burst of
    /// wake-ups from one poll (an emit to k subscribers) wakes one other
    /// worker, not k times one; the one woken wakes the next if it finds
    /// work.
    woke_another: bool,
    lifo: Option<Runnable>,
    /// LIFO-slot runs in a row.
    lifo_run: u32,
    /// The worker's sleeper id while it is asleep (0 while awake): a copy
    /// of `Worker::sleeping` for `schedule`.
    sleeper: usize,
}

/// The scheduler's shared state.
pub(crate) struct Scheduler {
    id: usize,
    global: ConcurrentQueue<Runnable>,
    locals: Box<[ConcurrentQueue<Runnable>]>,
    sleepers: Mutex<Sleepers>,
    /// No sleeper needs a wake-up: none is asleep, or one was woken and has
    /// not yet taken work.
    notified: AtomicBool,
    /// Workers should return.
    stop: AtomicBool,
    /// Queued tasks have been dropped; tasks woken from now on are dropped
    /// (cancelled) on the `blocking` pool instead of queued.
    drained: AtomicBool,
    /// Counts and lists the tasks (here, not beside: a task holds one
    /// `Arc`, the scheduler's, whose count the spawner and the workers
    /// share).
    pub(crate) monitor: Monitor,
}

impl Scheduler {
    pub(crate) fn new(workers: usize, monitor: Monitor) -> Arc<Self> {
        Arc::new(Scheduler {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            global: ConcurrentQueue::unbounded(),
            locals: (0..workers)
                .map(|_| ConcurrentQueue::bounded(LOCAL_CAPACITY))
                .collect(),
            sleepers: Mutex::new(Sleepers::default()),
            notified: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            monitor,
        })
    }

    /// Spawns `fut` as a task; it is queued at once.
    pub(crate) fn spawn<F>(self: &Arc<Self>, fut: F) -> Task<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let shared = self.clone();
        let schedule = move |r: Runnable, info: ScheduleInfo| {
            let kind = if info.woken_while_running {
                Kind::Yielded
            } else {
                Kind::Woken
            };
            shared.schedule(r, kind)
        };
        let (runnable, task) = async_task::spawn(fut, WithInfo(schedule));
        self.schedule(runnable, Kind::New);
        task
    }

    /// Where a task goes.
    fn schedule(&self, runnable: Runnable, kind: Kind) {
        if self.drained.load(Ordering::Acquire) {
            // The runtime is gone: dropping the runnable cancels the task.
            // Not here: the waker's caller may hold a lock that the task's
            // future takes as it drops (a channel closing wakes its
            // receiver under the channel's lock).
            blocking::unblock(move || drop(runnable)).detach();
            return;
        }
        let mut runnable = Some(runnable);
        let _ = WORKER.try_with(|w| {
            let Ok(mut w) = w.try_borrow_mut() else {
                return;
            };
            let Some(local) = w.as_mut().filter(|l| l.id == self.id) else {
                return;
            };
            let index = local.index;
            if matches!(kind, Kind::Woken) && !local.polling {
                let me = local.sleeper;
                drop(w);
                self.woken_by_reactor(index, me, runnable.take().expect("taken once"));
                return;
            }
            let (to_queue, wake_another) = match kind {
                Kind::Woken if local.polling && local.lifo_run < LIFO_LIMIT => {
                    // Runs next on this worker; whatever it displaces goes
                    // to the queue, where others may steal it.
                    (
                        local.lifo.replace(runnable.take().expect("taken once")),
                        true,
                    )
                }
                // The LIFO limit only keeps this worker fair to its own
                // queue, and a task that was woken while it ran (a yield)
                // was running here: either is as good as next on this
                // worker, so waking another to steal it would only move it
                // (and cost a futex wake per yield).
                Kind::Woken if local.polling => (runnable.take(), false),
                Kind::Yielded => (runnable.take(), false),
                // New work: others may help.
                Kind::New | Kind::Woken => (runnable.take(), true),
            };
            // At most one other worker per poll, and only for a task that
            // went to the queue (one in the LIFO slot is this worker's).
            let wake_another =
                to_queue.is_some() && wake_another && !(local.polling && local.woke_another);
            if wake_another && local.polling {
                local.woke_another = true;
            }
            drop(w);
            if let Some(r) = to_queue {
                self.push_local(index, r);
                if wake_another {
                    self.notify();
                }
            }
        });
        if let Some(r) = runnable {
            self.push_global(r);
            self.notify();
        }
    }

    /// A task woken on worker `index`'s thread outside a poll: by the
    /// reactor that worker drives while it sleeps in `block_on` (sleeper
    /// `me`, 0 if awake), which goes back to `turn` next. That worker runs
    /// it (it wakes itself: no system call); another is woken only for a
    /// second task queued there.
    #[cold]
    #[inline(never)]
    fn woken_by_reactor(&self, index: usize, me: usize, runnable: Runnable) {
        self.push_local(index, runnable);
        if me != 0 {
            self.wake_sleeper(me);
        }
        if self.locals[index].len() > 1 {
            self.notify();
        }
    }

    #[inline(always)]
    fn push_local(&self, index: usize, runnable: Runnable) {
        match self.locals[index].push(runnable) {
            Err(PushError::Full(r) | PushError::Closed(r)) => self.push_global(r),
            Ok(()) => self.recheck_drained(),
        }
    }

    fn push_global(&self, runnable: Runnable) {
        // NOTE: the global queue is unbounded and never closed.
        let _ = self.global.push(runnable);
        self.recheck_drained();
    }

    /// A push that raced with [`drain`](Scheduler::drain): nothing runs a
    /// drained scheduler's queues, so what is queued is dropped, on the
    /// `blocking` pool (see `schedule`).
    fn recheck_drained(&self) {
        if self.drained.load(Ordering::SeqCst) {
            let left = self.take_queued();
            if !left.is_empty() {
                blocking::unblock(move || drop(left)).detach();
            }
        }
    }

    /// Everything in the queues.
    fn take_queued(&self) -> Vec<Runnable> {
        let mut left = Vec::new();
        while let Ok(r) = self.global.pop() {
            left.push(r);
        }
        for local in &self.locals {
            while let Ok(r) = local.pop() {
                left.push(r);
            }
        }
        left
    }

    /// Tasks wait in a queue (LIFO slots aside).
    fn has_queued(&self) -> bool {
        !self.global.is_empty() || self.locals.iter().any(|l| !l.is_empty())
    }

    /// Wakes one sleeping worker unless one was woken already.
    fn notify(&self) {
        // Pairs with the fence in `Worker::sleep`: either this load sees the
        // sleeper's `false`, or the sleeper's second search sees the push.
        fence(Ordering::SeqCst);
        if self.notified.load(Ordering::Acquire) {
            return;
        }
        if self
            .notified
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let waker = self.lock_sleepers().notify();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// Wakes sleeper `id` (the calling worker itself) unless it was woken
    /// already.
    fn wake_sleeper(&self, id: usize) {
        let mut sleepers = self.lock_sleepers();
        let waker = sleepers.take(id);
        self.notified
            .store(sleepers.is_notified(), Ordering::Release);
        drop(sleepers);
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn lock_sleepers(&self) -> std::sync::MutexGuard<'_, Sleepers> {
        self.sleepers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells every worker to return from [`run`](Scheduler::run).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let wakers: Vec<Waker> = self
            .lock_sleepers()
            .wakers
            .drain(..)
            .map(|(_, w)| w)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Drops every queued task (cancelling it) and makes later wake-ups drop
    /// theirs. Tasks waiting elsewhere are cancelled by waking them.
    /// Call it holding no lock: the tasks' futures are dropped here.
    pub(crate) fn drain(&self) {
        self.drained.store(true, Ordering::SeqCst);
        drop(self.take_queued());
    }

    pub(crate) fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// Runs worker `index` on this thread until [`stop`](Scheduler::stop).
    pub(crate) fn run(self: &Arc<Self>, index: usize) {
        let _local = LocalGuard::enter(self.id, index);
        let mut worker = Worker {
            sched: self,
            index,
            ticks: 0,
            sleeping: 0,
            rng: (index as u32).wrapping_mul(0x9E37_79B9) | 1,
        };
        async_io::block_on(std::future::poll_fn(|cx| worker.turn(cx)));
    }
}

/// Installs (and on drop removes) a worker's thread-local state; dropping
/// it drops the task left in the LIFO slot.
struct LocalGuard;

impl LocalGuard {
    fn enter(id: usize, index: usize) -> Self {
        WORKER.with(|w| {
            *w.borrow_mut() = Some(Local {
                id,
                index,
                polling: false,
                woke_another: false,
                lifo: None,
                lifo_run: 0,
                sleeper: 0,
            })
        });
        LocalGuard
    }
}

impl Drop for LocalGuard {
    fn drop(&mut self) {
        let local = WORKER.try_with(|w| w.borrow_mut().take()).ok().flatten();
        // Dropped outside the borrow: dropping a task may wake others.
        drop(local);
    }
}

struct Worker<'a> {
    sched: &'a Arc<Scheduler>,
    index: usize,
    ticks: u32,
    /// Sleeper id while asleep, 0 while awake.
    sleeping: usize,
    rng: u32,
}

impl Worker<'_> {
    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        super::monitor::break_poll_chain();
        let mut ran = 0;
        while ran < TURN {
            if self.sched.stop.load(Ordering::Acquire) {
                self.wake_up();
                return Poll::Ready(());
            }
            match self.find() {
                Some(runnable) => {
                    if self.sleeping != 0 {
                        self.wake_up();
                        // Someone else picks up whatever is left. Pairs
                        // with the fence in `notify`: a push this check
                        // misses saw `notified` false and woke someone.
                        fence(Ordering::SeqCst);
                        if self.sched.has_queued() {
                            self.sched.notify();
                        }
                    }
                    self.run(runnable);
                    ran += 1;
                }
                None => {
                    super::monitor::break_poll_chain();
                    if !self.sleep(cx.waker()) {
                        return Poll::Pending;
                    }
                    // Newly asleep (or woken with nothing found): search
                    // once more before parking.
                }
            }
        }
        // Let `block_on` poll the reactor, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn run(&mut self, runnable: Runnable) {
        set_polling(true);
        runnable.run();
        set_polling(false);
    }

    fn find(&mut self) -> Option<Runnable> {
        let sched = self.sched;
        self.ticks = self.ticks.wrapping_add(1);
        if let Some(r) = take_lifo() {
            return Some(r);
        }
        let local = &sched.locals[self.index];
        if self.ticks.is_multiple_of(GLOBAL_EVERY)
            && let Ok(r) = sched.global.pop()
        {
            return Some(r);
        }
        if let Ok(r) = local.pop() {
            return Some(r);
        }
        if let Ok(r) = sched.global.pop() {
            steal(sched, &sched.global, local);
            return Some(r);
        }
        let n = sched.locals.len();
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        let start = self.rng as usize % n;
        for i in (0..n).map(|i| (start + i) % n).filter(|&i| i != self.index) {
            steal(sched, &sched.locals[i], local);
            if let Ok(r) = local.pop() {
                return Some(r);
            }
        }
        None
    }

    /// Moves this worker to the sleeping, un-notified state. `false` if it
    /// was asleep and nobody woke it (so it may park).
    fn sleep(&mut self, waker: &Waker) -> bool {
        {
            let mut sleepers = self.sched.lock_sleepers();
            if self.sleeping == 0 {
                self.sleeping = sleepers.insert(waker);
                set_sleeper(self.sleeping);
            } else if !sleepers.update(self.sleeping, waker) {
                return false;
            }
            self.sched
                .notified
                .store(sleepers.is_notified(), Ordering::Release);
        }
        fence(Ordering::SeqCst);
        true
    }

    fn wake_up(&mut self) {
        if self.sleeping != 0 {
            let mut sleepers = self.sched.lock_sleepers();
            sleepers.remove(self.sleeping);
            self.sched
                .notified
                .store(sleepers.is_notified(), Ordering::Release);
        }
        if self.sleeping != 0 {
            set_sleeper(0);
        }
        self.sleeping = 0;
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        self.wake_up();
    }
}

fn set_sleeper(id: usize) {
    let _ = WORKER.try_with(|w| {
        if let Some(l) = w.borrow_mut().as_mut() {
            l.sleeper = id;
        }
    });
}

fn set_polling(on: bool) {
    let _ = WORKER.try_with(|w| {
        if let Some(l) = w.borrow_mut().as_mut() {
            l.polling = on;
            l.woke_another = false;
        }
    });
}

/// The task in the LIFO slot, unless `LIFO_LIMIT` were run from it in a row.
fn take_lifo() -> Option<Runnable> {
    WORKER
        .try_with(|w| {
            let mut w = w.borrow_mut();
            let l = w.as_mut()?;
            match l.lifo.take() {
                Some(r) => {
                    l.lifo_run += 1;
                    Some(r)
                }
                None => {
                    l.lifo_run = 0;
                    None
                }
            }
        })
        .ok()
        .flatten()
}

/// Moves about half of `src` into `dest` (this worker's own queue, which
/// only this thread pushes to).
fn steal(sched: &Scheduler, src: &ConcurrentQueue<Runnable>, dest: &ConcurrentQueue<Runnable>) {
    let mut count = src.len().div_ceil(2);
    if let Some(cap) = dest.capacity() {
        count = count.min(cap - dest.len());
    }
    for _ in 0..count {
        let Ok(r) = src.pop() else { return };
        if let Err(PushError::Full(r) | PushError::Closed(r)) = dest.push(r) {
            // Cannot happen (the count is bounded by the room left), but a
            // task is never dropped here.
            sched.push_global(r);
            return;
        }
    }
}

/// Sleeping workers (async-executor's scheme): `count` asleep, of which the
/// ones still in `wakers` have not been woken.
#[derive(Default)]
struct Sleepers {
    count: usize,
    wakers: Vec<(usize, Waker)>,
    free_ids: Vec<usize>,
}

impl Sleepers {
    fn insert(&mut self, waker: &Waker) -> usize {
        let id = self.free_ids.pop().unwrap_or(self.count + 1);
        self.count += 1;
        self.wakers.push((id, waker.clone()));
        id
    }

    /// Re-stores the waker of sleeper `id`; `true` if it had been woken.
    fn update(&mut self, id: usize, waker: &Waker) -> bool {
        for item in &mut self.wakers {
            if item.0 == id {
                item.1.clone_from(waker);
                return false;
            }
        }
        self.wakers.push((id, waker.clone()));
        true
    }

    fn remove(&mut self, id: usize) {
        self.count -= 1;
        self.free_ids.push(id);
        self.wakers.retain(|(i, _)| *i != id);
    }

    fn is_notified(&self) -> bool {
        self.count == 0 || self.count > self.wakers.len()
    }

    /// Takes sleeper `id`'s waker (it counts as woken), if not woken yet.
    fn take(&mut self, id: usize) -> Option<Waker> {
        let at = self.wakers.iter().position(|(i, _)| *i == id)?;
        Some(self.wakers.swap_remove(at).1)
    }

    fn notify(&mut self) -> Option<Waker> {
        if self.wakers.len() == self.count {
            self.wakers.pop().map(|(_, w)| w)
        } else {
            None
        }
    }
}
