//! A group of subscriptions with the same pattern, capacity and overflow
//! policy, sharing one ring of events with a cursor per member.
//!
//! NOTE: a queue per subscription had the emitter write every event into
//! each matching queue (k slot writes, k counters, k cache lines the
//! readers then pulled to their own core): the 16-subscriber fan-out ran
//! at 0.13× tokio's broadcast. Here an emit writes one slot per group and
//! each member clones it out (the last one to read it moves it out), so an
//! emit costs the same for one subscriber as for sixteen with one pattern;
//! a lagging `DropOldest` member skips what was overwritten in one step
//! instead of the emitter dropping from its queue event by event. The
//! overflow policy applies at the cursor: a `Wait` group's emitter waits
//! while the slot it would write still has a reader to come, a
//! `DropOldest` one overwrites it (the readers behind count what they
//! lost), and `DropNewest` subscriptions each get a group of their own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;

use super::bus::{Event, Overflow};
use super::topic::Pattern;
use crate::sync::lock_std as lock;

/// Events a reader takes out of the ring under one lock.
pub(super) const BATCH: usize = 32;

/// Counts of members that left the bus, kept by the bus.
#[derive(Default)]
pub(super) struct Gone {
    pub(super) delivered: AtomicU64,
    pub(super) dropped: AtomicU64,
}

pub(super) struct Group<E> {
    pub(super) pattern: Pattern,
    pub(super) overflow: Overflow,
    capacity: usize,
    ring: Mutex<Ring<E>>,
    /// `Wait` emitters waiting for a slot.
    space: event_listener::Event,
    gone: Arc<Gone>,
}

struct Ring<E> {
    /// Grown up to `capacity`; position `p` lives in `slots[p % capacity]`.
    slots: Vec<Slot<E>>,
    /// The position the next event is written at.
    tail: u64,
    /// `tail % capacity`, kept as `tail` moves (a division per event was
    /// the emitter's costliest instruction).
    at: usize,
    /// Members taking new events (no `end`).
    live: usize,
    /// Members that are still counted on the bus (not removed).
    listed: usize,
    members: Vec<Option<Member<E>>>,
    free: Vec<usize>,
    /// Members that found nothing to read and parked a waker.
    sleepers: Vec<usize>,
}

struct Slot<E> {
    pos: u64,
    /// Members still to read it; the last one moves the event out.
    rem: usize,
    ev: Option<Event<E>>,
    /// The emitter's topic of an event its last reader moved out with the
    /// reader's own copy of the topic: dropped with the slot when it is
    /// next written, by the emitter (see [`Group::read`]).
    spent: Option<Arc<str>>,
    /// The thread that wrote it ([`this_thread`]).
    by: usize,
}

thread_local! {
    static HERE: u8 = const { 0 };
}

/// This thread as a number no other live thread has (the address of a
/// thread-local), 0 while its thread-locals are torn down.
fn this_thread() -> usize {
    HERE.try_with(|h| std::ptr::from_ref(h).addr()).unwrap_or(0)
}

struct Member<E> {
    id: u64,
    name: String,
    cursor: u64,
    joined: u64,
    /// No events after this position: removed or shut down.
    end: Option<u64>,
    /// Retained values replayed to it, read before the ring.
    replay: VecDeque<Event<E>>,
    replayed: u64,
    /// Drops counted so far (a lag is counted when the reader meets it, or
    /// when it is unlisted).
    dropped: u64,
    /// Removed from the bus: its counts went to [`Gone`], and what it had
    /// not read to its replay.
    removed: bool,
    /// Its reader is gone: no more reads.
    left: bool,
    waker: Option<Waker>,
    sleeping: bool,
}

/// What [`Group::push`] did with an event.
pub(super) enum Push<E> {
    /// Written for this many members.
    Queued(usize),
    /// Dropped by a `DropNewest` policy (counted).
    Dropped,
    /// Not taken: a `Wait` group with no free slot.
    Full(Event<E>),
    /// Not taken: no member takes new events.
    Closed(Event<E>),
}

/// What a reader got from [`Group::read`].
pub(super) enum Read {
    /// Events were put in the batch.
    Some,
    /// None now; the waker (if any) is parked.
    Empty,
    /// None, and none will come.
    End,
}

/// Counters of one member, for the bus's stats.
pub(super) struct MemberStats {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) queued: usize,
    pub(super) delivered: u64,
    pub(super) dropped: u64,
}

/// A reader's own copy of the topic it reads most.
///
/// NOTE: every member cloning the emitter's `Arc<str>` and the consumer
/// dropping it put two atomic operations per event per member on one
/// cache line shared by every core: perf of the 16-subscriber fan-out
/// showed the consumer's `lock decq` on it as a quarter of all samples,
/// and the row ran 1.4× faster with a copy per reader (three A/B runs of
/// 112–120 ms against 81–87; a copy per thread measured the same). The
/// copy is made when a topic keeps coming and kept while it does.
#[derive(Default)]
pub(super) struct TopicCache {
    /// The emitter's topic that `own` copies (held, so its address is not
    /// reused while it is compared).
    shared: Option<Arc<str>>,
    own: Option<Arc<str>>,
    /// Hits minus misses, capped: at zero the next miss becomes the topic
    /// copied.
    score: i32,
}

impl TopicCache {
    /// `topic`, or the reader's own copy of it.
    #[inline]
    fn get(&mut self, topic: &Arc<str>) -> Arc<str> {
        if let (Some(shared), Some(own)) = (&self.shared, &self.own)
            && Arc::ptr_eq(shared, topic)
        {
            self.score = (self.score + 1).min(16);
            return own.clone();
        }
        self.score -= 1;
        if self.score > 0 {
            return topic.clone();
        }
        self.score = 8;
        let own: Arc<str> = Arc::from(&**topic);
        self.shared = Some(topic.clone());
        self.own = Some(own.clone());
        own
    }
}

/// Wakers taken under the lock and woken after it.
type WakeList = [Option<Waker>; 16];

impl<E: Clone> Group<E> {
    pub(super) fn new(
        pattern: Pattern,
        overflow: Overflow,
        capacity: usize,
        gone: Arc<Gone>,
    ) -> Self {
        Group {
            pattern,
            overflow,
            capacity,
            ring: Mutex::new(Ring {
                slots: Vec::new(),
                tail: 0,
                at: 0,
                live: 0,
                listed: 0,
                members: Vec::new(),
                free: Vec::new(),
                sleepers: Vec::new(),
            }),
            space: event_listener::Event::new(),
            gone,
        }
    }

    /// Whether a new subscription with these settings may join: `DropNewest`
    /// drops per subscription, so those never share.
    pub(super) fn shares(&self, pattern: &str, overflow: Overflow, capacity: usize) -> bool {
        overflow != Overflow::DropNewest
            && self.overflow == overflow
            && self.capacity == capacity
            && self.pattern.as_str() == pattern
    }

    /// Adds a member that reads from the next event on, with `replay`
    /// read first (beyond the capacity, dropped and counted). Returns its
    /// slot.
    pub(super) fn join(&self, id: u64, name: String, replay: Vec<Event<E>>) -> usize {
        let mut r = lock(&self.ring);
        let keep = replay.len().min(self.capacity);
        let extra = (replay.len() - keep) as u64;
        let member = Member {
            id,
            name,
            cursor: r.tail,
            joined: r.tail,
            end: None,
            replayed: keep as u64,
            replay: replay.into_iter().take(keep).collect(),
            dropped: extra,
            removed: false,
            left: false,
            waker: None,
            sleeping: false,
        };
        r.live += 1;
        r.listed += 1;
        match r.free.pop() {
            Some(i) => {
                r.members[i] = Some(member);
                i
            }
            None => {
                r.members.push(Some(member));
                r.members.len() - 1
            }
        }
    }

    /// The slot of member `id`, if it is listed here.
    pub(super) fn find(&self, id: u64) -> Option<usize> {
        let r = lock(&self.ring);
        r.members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.id == id && !m.removed))
    }

    /// Whether a `Wait` emit would have to wait.
    pub(super) fn is_full(&self) -> bool {
        let r = lock(&self.ring);
        self.slot_busy(&r)
    }

    fn slot_busy(&self, r: &Ring<E>) -> bool {
        Self::busy_at(r, r.at)
    }

    /// Whether slot `i` still has a reader to come.
    fn busy_at(r: &Ring<E>, i: usize) -> bool {
        r.slots.get(i).is_some_and(|s| s.rem > 0)
    }

    /// Writes one event under the lock, the policy applied: `Ok` with the
    /// copies queued (0: dropped by `DropNewest`), the event it overwrote
    /// put in `old` to be dropped after the lock; `Err` when a `Wait`
    /// group has no free slot.
    fn write(
        &self,
        r: &mut Ring<E>,
        ev: Event<E>,
        old: &mut Option<Event<E>>,
    ) -> Result<usize, Event<E>> {
        let i = r.at;
        let busy = Self::busy_at(r, i);
        let Event { topic, payload } = ev;
        self.write_at(r, i, busy, topic, payload, old)
    }

    /// [`write`](Self::write) at slot `i`, the tail's, which `busy` says
    /// still has a reader to come.
    ///
    /// NOTE: takes the event's parts, not an `Event`: one built by the
    /// caller was written to the stack in 8-byte halves and read back here
    /// in one 16-byte load, a store-forwarding stall per event.
    fn write_at(
        &self,
        r: &mut Ring<E>,
        i: usize,
        busy: bool,
        topic: Arc<str>,
        payload: E,
        old: &mut Option<Event<E>>,
    ) -> Result<usize, Event<E>> {
        if busy {
            match self.overflow {
                Overflow::Wait => return Err(Event { topic, payload }),
                Overflow::DropNewest => {
                    r.each_live(|m| m.dropped += 1);
                    return Ok(0);
                }
                // The readers behind count the lag when they meet it.
                Overflow::DropOldest => {}
            }
        }
        let (pos, rem, by) = (r.tail, r.live, this_thread());
        // NOTE: written field by field, not as a new `Slot` swapped in
        // (56 bytes through the stack and back, per event). The spent
        // topic is dropped here, by the emitter (see `read`).
        match r.slots.get_mut(i) {
            Some(slot) => {
                slot.pos = pos;
                slot.rem = rem;
                slot.spent = None;
                slot.by = by;
                if let Some(overwritten) = slot.ev.replace(Event { topic, payload }) {
                    *old = Some(overwritten);
                }
            }
            None => r.slots.push(Slot {
                pos,
                rem,
                ev: Some(Event { topic, payload }),
                spent: None,
                by,
            }),
        }
        r.tail += 1;
        r.at = if i + 1 == self.capacity { 0 } else { i + 1 };
        Ok(rem)
    }

    /// Wakes the members parked on an empty ring, after `r` is unlocked.
    fn wake_readers(&self, mut r: MutexGuard<'_, Ring<E>>) {
        if r.sleepers.is_empty() {
            return;
        }
        let mut wake: WakeList = Default::default();
        let more = r.take_wakers(&mut wake);
        drop(r);
        wake_all(&mut wake);
        if more {
            self.wake_sleepers();
        }
    }

    /// Writes `ev` without waiting, the policy applied.
    pub(super) fn push(&self, ev: Event<E>) -> Push<E> {
        let mut r = lock(&self.ring);
        if r.live == 0 {
            return Push::Closed(ev);
        }
        let mut old = None;
        match self.write(&mut r, ev, &mut old) {
            Ok(0) => Push::Dropped,
            Ok(n) => {
                self.wake_readers(r);
                drop(old);
                Push::Queued(n)
            }
            Err(ev) => Push::Full(ev),
        }
    }

    /// Writes the event when that takes no wait and wakes nobody (no
    /// parked reader; a free slot, or with `overwrite` a `DropOldest` slot
    /// to overwrite): what an emitter may do while it holds the bus's lock.
    /// `Ok` with the copies queued, the event overwritten (if any) put in
    /// `old` (empty when `overwrite`) for the caller to drop after its
    /// lock; `Err` hands the event back for [`send`](Self::send), which
    /// does the rest.
    pub(super) fn push_quiet(
        &self,
        topic: Arc<str>,
        payload: E,
        overwrite: bool,
        old: &mut Option<Event<E>>,
    ) -> Result<usize, Event<E>> {
        let mut r = lock(&self.ring);
        let i = r.at;
        let busy = Self::busy_at(&r, i);
        if r.live == 0
            || !r.sleepers.is_empty()
            || (busy && !(overwrite && self.overflow == Overflow::DropOldest))
        {
            return Err(Event { topic, payload });
        }
        self.write_at(&mut r, i, busy, topic, payload, old)
    }

    /// Writes what it can of `evs` (front first) under one lock, without
    /// waiting: a full `Wait` group leaves the rest in `evs`. Returns the
    /// copies queued (events × members), or `Err` when no member takes new
    /// events (`evs` untouched).
    pub(super) fn push_many(&self, evs: &mut VecDeque<Event<E>>) -> Result<usize, ()> {
        let mut overwritten = Vec::new();
        let mut r = lock(&self.ring);
        if r.live == 0 {
            return Err(());
        }
        let mut queued = 0;
        while let Some(ev) = evs.pop_front() {
            let mut old = None;
            match self.write(&mut r, ev, &mut old) {
                Ok(n) => {
                    queued += n;
                    overwritten.extend(old);
                }
                Err(ev) => {
                    evs.push_front(ev);
                    break;
                }
            }
        }
        self.wake_readers(r);
        drop(overwritten);
        Ok(queued)
    }

    /// Queues `ev`, waiting while a `Wait` group is full: `Ok` with the
    /// copies queued (0: dropped by its policy), `Err` with the event when
    /// no member takes it (or none is left while it waited).
    pub(super) async fn send(&self, ev: Event<E>) -> Result<usize, Event<E>> {
        let mut ev = ev;
        loop {
            match self.push(ev) {
                Push::Queued(n) => return Ok(n),
                Push::Dropped => return Ok(0),
                Push::Closed(back) => return Err(back),
                Push::Full(back) => {
                    ev = back;
                    self.room().await;
                }
            }
        }
    }

    /// [`push_many`](Self::push_many), waiting for room until all of `evs`
    /// is queued (or dropped by the policy). Returns the copies queued;
    /// `Err` with that count when no member is left to take the rest
    /// (left in `evs`).
    pub(super) async fn send_many(&self, evs: &mut VecDeque<Event<E>>) -> Result<usize, usize> {
        let mut queued = 0;
        loop {
            match self.push_many(evs) {
                Ok(n) => queued += n,
                Err(()) => return Err(queued),
            }
            if evs.is_empty() {
                return Ok(queued);
            }
            self.room().await;
        }
    }

    fn wake_sleepers(&self) {
        loop {
            let mut wake: WakeList = Default::default();
            let more = lock(&self.ring).take_wakers(&mut wake);
            wake_all(&mut wake);
            if !more {
                return;
            }
        }
    }

    /// Waits until a `Wait` emitter may try again: a free slot, or no
    /// member left to take it.
    pub(super) async fn room(&self) {
        let room = self.space.listen();
        let full = {
            let r = lock(&self.ring);
            r.live > 0 && self.slot_busy(&r)
        };
        if full {
            room.await;
        }
    }

    /// Copies of `ev` a `Wait` group could not take (a `try_emit` that lost
    /// the race for the last slot): counted as dropped for each member.
    pub(super) fn count_lost(&self) {
        lock(&self.ring).each_live(|m| m.dropped += 1);
    }

    /// Moves up to [`BATCH`] events for member `me` into `batch`; parks
    /// `waker` when there is none.
    pub(super) fn read(
        &self,
        me: usize,
        batch: &mut VecDeque<Event<E>>,
        topics: &mut TopicCache,
        waker: Option<&Waker>,
    ) -> Read {
        let cap = self.capacity as u64;
        let mut freed = 0;
        let mut r = lock(&self.ring);
        let Ring {
            slots,
            tail,
            members,
            sleepers,
            ..
        } = &mut *r;
        let Some(m) = members.get_mut(me).and_then(Option::as_mut) else {
            return Read::End;
        };
        if !m.replay.is_empty() {
            std::mem::swap(&mut m.replay, batch);
            return Read::Some;
        }
        // NOTE: only a listed member can lag: unlisting moves what it has
        // not read into its replay (see `close_member`).
        m.catch_up(*tail, cap);
        let stop = m.end.unwrap_or(*tail).min(*tail);
        // One division per read, not one per event.
        let mut i = (m.cursor % cap) as usize;
        let here = this_thread();
        while m.cursor < stop && batch.len() < BATCH {
            let slot = &mut slots[i];
            slot.rem -= 1;
            let ev = if slot.rem == 0 {
                freed += 1;
                // NOTE: the emitter cloned this topic out of its route (an
                // increment on the topic's count); the consumer dropping it
                // on this core would decrement the same line, every event,
                // from the other core (the one-subscriber fan-out on smol's
                // executor, `perf stat` of `benches/bus_count.rs`: 205 ->
                // 167 ms of CPU for the same work). Written on another
                // thread, the event leaves with the reader's own copy and
                // the emitter's stays in the slot for the emitter to drop
                // when it next writes there; written on this one (a worker
                // running both), it leaves as it is (two atomic operations
                // fewer).
                match slot.ev.take() {
                    Some(ev) if slot.by == here => Some(ev),
                    ev => ev.map(|Event { topic, payload }| {
                        let own = topics.get(&topic);
                        slot.spent = Some(topic);
                        Event {
                            topic: own,
                            payload,
                        }
                    }),
                }
            } else {
                slot.ev.as_ref().map(|ev| Event {
                    topic: topics.get(&ev.topic),
                    payload: ev.payload.clone(),
                })
            };
            if let Some(ev) = ev {
                batch.push_back(ev);
            }
            m.cursor += 1;
            i += 1;
            if i == self.capacity {
                i = 0;
            }
        }
        let read = if !batch.is_empty() {
            Read::Some
        } else if m.end.is_some_and(|end| m.cursor >= end) {
            Read::End
        } else {
            if let Some(w) = waker {
                match &mut m.waker {
                    Some(old) => old.clone_from(w),
                    slot @ None => *slot = Some(w.clone()),
                }
                if !m.sleeping {
                    m.sleeping = true;
                    sleepers.push(me);
                }
            }
            Read::Empty
        };
        drop(r);
        if freed > 0 && self.overflow == Overflow::Wait {
            self.space.notify_additional(freed);
        }
        read
    }

    /// Events member `me` has not taken out of the ring.
    pub(super) fn len(&self, me: usize) -> usize {
        let r = lock(&self.ring);
        r.members
            .get(me)
            .and_then(Option::as_ref)
            .map_or(0, |m| m.unread(r.tail, self.capacity as u64))
    }

    /// Counters of the members still listed.
    pub(super) fn stats(&self, out: &mut Vec<MemberStats>) {
        let cap = self.capacity as u64;
        let r = lock(&self.ring);
        for m in r.members.iter().flatten().filter(|m| !m.removed) {
            out.push(MemberStats {
                id: m.id,
                name: m.name.clone(),
                queued: m.unread(r.tail, cap),
                delivered: m.delivered(r.tail),
                dropped: m.dropped + m.lag(r.tail, cap),
            });
        }
    }

    /// Member `me` takes no new events; its reader gets what it has not
    /// read, then the end. With `remove`, it is no longer listed either
    /// (its counts go to the bus's). Returns how many members are still
    /// listed.
    pub(super) fn close_member(&self, me: usize, remove: bool) -> usize {
        let mut wake = None;
        let mut freed = 0;
        let mut r = lock(&self.ring);
        let tail = r.tail;
        let mut unlisted = false;
        let mut free = false;
        let mut live_lost = false;
        let cap = self.capacity as u64;
        let Ring { slots, members, .. } = &mut *r;
        if let Some(m) = members.get_mut(me).and_then(Option::as_mut) {
            if remove && !m.removed {
                m.catch_up(tail, cap);
                // NOTE: what it has not read becomes its own, so a reader
                // still draining (a handler after `off`) holds no slot the
                // emitters of the group wait for.
                if !m.left {
                    let mut copies = std::mem::take(&mut m.replay);
                    freed = m.release(slots, (tail, cap), true, &mut copies);
                    m.replay = copies;
                }
                m.removed = true;
                unlisted = true;
                free = m.left;
                // Its counts are final: it holds copies of what it has
                // not read, so it loses nothing from here on.
                let delivered = m.delivered(tail);
                self.gone.delivered.fetch_add(delivered, Ordering::Relaxed);
                self.gone.dropped.fetch_add(m.dropped, Ordering::Relaxed);
            }
            if m.end.is_none() {
                m.end = Some(tail);
                live_lost = true;
            }
            m.sleeping = false;
            wake = m.waker.take();
        }
        if live_lost {
            r.live -= 1;
        }
        if unlisted {
            r.listed -= 1;
        }
        if free {
            r.vacate(me);
        }
        let listed = r.listed;
        let no_taker = r.live == 0;
        drop(r);
        if no_taker || freed > 0 {
            self.space.notify(usize::MAX);
        }
        if let Some(w) = wake {
            w.wake();
        }
        listed
    }

    /// Closes every member (a shutdown).
    pub(super) fn close_all(&self) {
        let n = lock(&self.ring).members.len();
        for me in 0..n {
            self.close_member(me, false);
        }
    }

    /// Member `me`'s reader is gone: what it had not read is released.
    pub(super) fn leave(&self, me: usize) {
        let cap = self.capacity as u64;
        let mut drop_later = Vec::new();
        let mut r = lock(&self.ring);
        let Ring {
            slots,
            tail,
            members,
            live,
            ..
        } = &mut *r;
        let Some(m) = members.get_mut(me).and_then(Option::as_mut) else {
            return;
        };
        m.catch_up(*tail, cap);
        let freed = m.release(slots, (*tail, cap), false, &mut drop_later);
        m.left = true;
        let removed = m.removed;
        if m.end.is_none() {
            m.end = Some(*tail);
            *live -= 1;
        }
        if removed {
            r.vacate(me);
        }
        drop(r);
        if freed > 0 {
            self.space.notify(usize::MAX);
        }
        drop(drop_later);
    }
}

impl<E> Member<E> {
    /// Where its cursor must be: past what was overwritten before it read
    /// it (only a `DropOldest` member falls behind the ring).
    fn caught_up(&self, tail: u64, cap: u64) -> u64 {
        let oldest = tail.saturating_sub(cap);
        self.cursor.max(self.end.unwrap_or(tail).min(oldest))
    }

    /// Events it lost and has not counted yet.
    fn lag(&self, tail: u64, cap: u64) -> u64 {
        self.caught_up(tail, cap) - self.cursor
    }

    /// Events it has not taken out of the ring (its replay included).
    fn unread(&self, tail: u64, cap: u64) -> usize {
        let stop = self.end.unwrap_or(tail).min(tail);
        self.replay.len() + stop.saturating_sub(self.caught_up(tail, cap)) as usize
    }

    /// Events queued for it: written while it took new events, and its
    /// replay.
    fn delivered(&self, tail: u64) -> u64 {
        self.end.unwrap_or(tail).min(tail) - self.joined + self.replayed
    }

    /// Takes itself off the slots from its cursor to its end (a slot's
    /// last reader frees it): the events freed go to `out`, and with
    /// `keep` its copies of the others too. Returns the slots freed.
    fn release(
        &mut self,
        slots: &mut [Slot<E>],
        (tail, cap): (u64, u64),
        keep: bool,
        out: &mut impl Extend<Event<E>>,
    ) -> usize
    where
        E: Clone,
    {
        let stop = self.end.unwrap_or(tail).min(tail);
        let mut freed = 0;
        for p in self.cursor..stop {
            let slot = &mut slots[(p % cap) as usize];
            if slot.pos == p && slot.rem > 0 {
                slot.rem -= 1;
                if slot.rem == 0 {
                    freed += 1;
                    out.extend(slot.ev.take());
                } else if keep {
                    out.extend(slot.ev.clone());
                }
            }
        }
        self.cursor = stop;
        freed
    }

    /// Skips and counts what it lost; returns how many.
    fn catch_up(&mut self, tail: u64, cap: u64) -> u64 {
        let lost = self.lag(tail, cap);
        self.dropped += lost;
        self.cursor += lost;
        lost
    }
}

impl<E> Ring<E> {
    /// Frees member slot `me` for reuse; a parked entry of it goes too, so
    /// the list of sleepers never outgrows the members.
    fn vacate(&mut self, me: usize) {
        self.members[me] = None;
        self.free.push(me);
        self.sleepers.retain(|&i| i != me);
    }

    fn each_live(&mut self, mut f: impl FnMut(&mut Member<E>)) {
        for m in self
            .members
            .iter_mut()
            .flatten()
            .filter(|m| m.end.is_none())
        {
            f(m);
        }
    }

    /// Takes up to 16 parked wakers; `true` if more are left.
    fn take_wakers(&mut self, out: &mut WakeList) -> bool {
        let mut n = 0;
        while n < out.len() {
            let Some(i) = self.sleepers.pop() else {
                return false;
            };
            if let Some(m) = self.members.get_mut(i).and_then(Option::as_mut)
                && m.sleeping
            {
                m.sleeping = false;
                out[n] = m.waker.take();
                n += 1;
            }
        }
        !self.sleepers.is_empty()
    }
}

fn wake_all(wake: &mut WakeList) {
    for w in wake.iter_mut().filter_map(Option::take) {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn group() -> Group<u32> {
        let pattern = Pattern::parse("t").expect("a valid pattern");
        Group::new(pattern, Overflow::Wait, 4, Arc::default())
    }

    /// Subscriptions that park and go while nothing is emitted leave no
    /// entry behind in the list of sleepers.
    #[test]
    fn members_that_park_and_go_leave_no_sleeper_behind() {
        let g = group();
        let keep = g.join(0, "kept".into(), Vec::new());
        let mut batch = VecDeque::new();
        let mut topics = TopicCache::default();
        for id in 1..100 {
            let me = g.join(id, "churn".into(), Vec::new());
            let read = g.read(me, &mut batch, &mut topics, Some(Waker::noop()));
            assert!(matches!(read, Read::Empty));
            g.close_member(me, true);
            g.leave(me);
        }
        let r = lock(&g.ring);
        assert!(r.sleepers.len() <= 1, "{} sleepers", r.sleepers.len());
        assert_eq!(r.members.iter().flatten().count(), 1);
        assert!(r.members[keep].is_some());
    }
}
