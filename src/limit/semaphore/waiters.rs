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
    /// lock. It stays with the slot when the slot is freed, and the slot's
    /// next waiter reuses it once the last future has let go of it: no
    /// list of spare cells to search (each look at a cell another thread
    /// let go of is a cache miss).
    fate: Option<sync::Arc<AtomicUsize>>,
    prev: u32,
    /// The next waiter in the FIFO, or, on a free slot, the next free slot.
    pub(super) next: u32,
    /// Bumped when the slot is freed, so a stale key is never mistaken
    /// for the slot's next waiter.
    generation: u32,
}

/// A queued waiter's key: its slot and that slot's generation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Key {
    pub(super) slot: u32,
    generation: u32,
}

pub(super) struct Queue {
    slab: Vec<Waiter>,
    /// The free slots, oldest first, linked through their `next` (no
    /// second buffer for both threads to write). Oldest first: the slot
    /// freed last usually belongs to a future woken but not yet run, which
    /// still holds the slot's fate cell (reusing that slot would allocate
    /// a new cell).
    free: u32,
    free_tail: u32,
    pub(super) head: u32,
    tail: u32,
    /// Linked (pending) waiters.
    pub(super) len: usize,
}

impl Queue {
    pub(super) const fn new() -> Self {
        Queue {
            slab: Vec::new(),
            free: NIL,
            free_tail: NIL,
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

    /// Queues a waiter at the back; returns its key and fate cell.
    pub(super) fn push_back(
        &mut self,
        needed: usize,
        assigned: usize,
        waker: Waker,
    ) -> (Key, sync::Arc<AtomicUsize>) {
        let tail = self.tail;
        // The oldest free slot, unless its last waiter's future still
        // holds the fate cell (woken, not yet run) and the slab has room
        // to grow: then a new slot, so that there is slack for cells to be
        // reused instead of allocated. The slab stays within twice the
        // waiters queued plus 16.
        let held = self.free != NIL
            && self.slab[self.free as usize]
                .fate
                .as_ref()
                .is_some_and(|cell| sync::Arc::strong_count(cell) > 1);
        let reusable = self.free != NIL && (!held || self.slab.len() >= 2 * self.len + 16);
        let slot = if reusable {
            let slot = self.free;
            self.free = self.slab[slot as usize].next;
            if self.free == NIL {
                self.free_tail = NIL;
            }
            slot
        } else {
            // NOTE: more than u32::MAX - 1 waiters at once cannot be
            // reached (each is a live future holding a slot).
            let slot = u32::try_from(self.slab.len()).unwrap_or(NIL - 1);
            self.slab.push(Waiter {
                needed: 0,
                assigned: 0,
                waker: None,
                fate: None,
                prev: NIL,
                next: NIL,
                generation: 0,
            });
            slot
        };
        let w = self.at(slot);
        w.needed = needed;
        w.assigned = assigned;
        w.waker = Some(waker);
        w.prev = tail;
        w.next = NIL;
        let cell = match &w.fate {
            // The slot's last future has let go of its cell: reuse it.
            Some(cell) if sync::Arc::strong_count(cell) == 1 => {
                cell.store(PENDING, Ordering::Relaxed);
                cell.clone()
            }
            _ => {
                let cell = sync::Arc::new(AtomicUsize::new(PENDING));
                w.fate = Some(cell.clone());
                cell
            }
        };
        let key = Key {
            slot,
            generation: w.generation,
        };
        if tail == NIL {
            self.head = slot;
        } else {
            self.at(tail).next = slot;
        }
        self.tail = slot;
        self.len += 1;
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
        if let Some(cell) = &w.fate {
            cell.store(fate, Ordering::Release);
        }
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
        if self.free_tail == NIL {
            self.free = slot;
        } else {
            self.at(self.free_tail).next = slot;
        }
        self.free_tail = slot;
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
