//! The semaphore's waiters: a slab of slots under the queue's lock, linked
//! in arrival order, and the wakers collected to wake after the lock.

use std::task::Waker;

use super::super::error::AcquireError;
use crate::sync::{self, AtomicUsize, Ordering};

// A waiter's fate, stored in its slot (for FAILED_TOO_LARGE, the capacity
// that failed it is stored above the two low bits).
pub(super) const PENDING: usize = 0;
pub(super) const GRANTED: usize = 1;
pub(super) const FAILED_CLOSED: usize = 2;
pub(super) const FAILED_TOO_LARGE: usize = 3;

/// No slot: the end of the waiter list.
pub(super) const NIL: u32 = u32::MAX;

/// One waiter, in a slab under the queue's lock: no allocation per
/// waiter (the slab's slots and the fate cells are reused), one waker,
/// and a doubly linked FIFO through the slots so a cancelled waiter
/// leaves in O(1).
pub(super) struct Waiter {
    pub(super) needed: usize,
    pub(super) assigned: usize,
    pub(super) waker: Option<Waker>,
    /// Shared with the waiter's future, which reads its fate without the
    /// lock.
    fate: Option<sync::Arc<AtomicUsize>>,
    prev: u32,
    pub(super) next: u32,
    /// Bumped when the slot is freed, so a stale key is never mistaken
    /// for the slot's next waiter.
    generation: u32,
}

/// Fate cells kept for reuse.
const SPARE_CELLS: usize = 256;

/// A queued waiter's key: its slot and that slot's generation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Key {
    pub(super) slot: u32,
    generation: u32,
}

pub(super) struct Queue {
    slab: Vec<Waiter>,
    free: Vec<u32>,
    /// Fate cells of settled waiters; one is reused once its future has
    /// let go of it (only this list holds it).
    spare: Vec<sync::Arc<AtomicUsize>>,
    pub(super) head: u32,
    tail: u32,
    /// Linked (pending) waiters.
    pub(super) len: usize,
}

impl Queue {
    pub(super) const fn new() -> Self {
        Queue {
            slab: Vec::new(),
            free: Vec::new(),
            spare: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.head == NIL
    }

    pub(super) fn at(&mut self, slot: u32) -> &mut Waiter {
        &mut self.slab[slot as usize]
    }

    pub(super) fn front_mut(&mut self) -> Option<&mut Waiter> {
        let head = self.head;
        (head != NIL).then(|| self.at(head))
    }

    /// A fate cell set to PENDING: a spare one nobody else holds, or a new
    /// one.
    fn cell(&mut self) -> sync::Arc<AtomicUsize> {
        // NOTE: the last few settled are the likeliest to be let go of.
        let n = self.spare.len();
        for i in (n.saturating_sub(4)..n).rev() {
            if sync::Arc::strong_count(&self.spare[i]) == 1 {
                let cell = self.spare.swap_remove(i);
                cell.store(PENDING, Ordering::Relaxed);
                return cell;
            }
        }
        sync::Arc::new(AtomicUsize::new(PENDING))
    }

    /// Queues a waiter at the back; returns its key and fate cell.
    pub(super) fn push_back(
        &mut self,
        needed: usize,
        assigned: usize,
        waker: Waker,
    ) -> (Key, sync::Arc<AtomicUsize>) {
        let tail = self.tail;
        let cell = self.cell();
        let fresh = |generation| Waiter {
            needed,
            assigned,
            waker: Some(waker),
            fate: Some(cell.clone()),
            prev: tail,
            next: NIL,
            generation,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                let generation = self.slab[slot as usize].generation;
                self.slab[slot as usize] = fresh(generation);
                slot
            }
            None => {
                // NOTE: more than u32::MAX - 1 waiters at once cannot be
                // reached (each is a live future holding a slot).
                let slot = u32::try_from(self.slab.len()).unwrap_or(NIL - 1);
                self.slab.push(fresh(0));
                slot
            }
        };
        if tail == NIL {
            self.head = slot;
        } else {
            self.at(tail).next = slot;
        }
        self.tail = slot;
        self.len += 1;
        let key = Key {
            slot,
            generation: self.slab[slot as usize].generation,
        };
        (key, cell)
    }

    /// Takes a linked waiter out of the list and frees its slot, settling
    /// its fate; returns its collected permits and its waker.
    pub(super) fn unlink(&mut self, slot: u32, fate: usize) -> (usize, Option<Waker>) {
        let w = self.at(slot);
        let (prev, next) = (w.prev, w.next);
        w.prev = NIL;
        w.next = NIL;
        w.generation = w.generation.wrapping_add(1);
        let assigned = std::mem::take(&mut w.assigned);
        let waker = w.waker.take();
        let cell = w.fate.take();
        if let Some(cell) = cell {
            cell.store(fate, Ordering::Release);
            if self.spare.len() < SPARE_CELLS {
                self.spare.push(cell);
            }
        }
        self.free.push(slot);
        if prev == NIL {
            self.head = next;
        } else {
            self.at(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.at(next).prev = prev;
        }
        self.len -= 1;
        (assigned, waker)
    }

    /// The waiter of `key`, if it is still queued.
    pub(super) fn get(&mut self, key: Key) -> Option<&mut Waiter> {
        self.slab
            .get_mut(key.slot as usize)
            .filter(|w| w.generation == key.generation)
    }
}

/// Wakers collected under the lock, woken after it is released; one
/// without an allocation.
#[derive(Default)]
pub(super) struct Wakers {
    one: Option<Waker>,
    more: Vec<Waker>,
}

impl Wakers {
    pub(super) fn new() -> Self {
        Self::default()
    }

    pub(super) fn extend(&mut self, waker: Option<Waker>) {
        if let Some(w) = waker {
            match self.one {
                None => self.one = Some(w),
                Some(_) => self.more.push(w),
            }
        }
    }

    pub(super) fn wake(self) {
        if let Some(w) = self.one {
            w.wake();
        }
        self.more.into_iter().for_each(Waker::wake);
    }
}

/// A settled waiter's result.
pub(super) fn fate(state: usize, n: usize) -> Result<usize, AcquireError> {
    match state & 0b11 {
        GRANTED => Ok(n),
        FAILED_CLOSED => Err(AcquireError::Closed),
        _ => Err(AcquireError::TooLarge {
            requested: n,
            capacity: state >> 2,
        }),
    }
}
