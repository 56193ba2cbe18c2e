//! The outbox: messages waiting for a socket, and messages written but not
//! yet confirmed (by a pong, or by the server's ack in at-least-once mode).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::message::Frame;

/// What to do when a message does not fit in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OutboxOverflow {
    /// `send` waits for room (`try_send` returns [`SendError::Full`](super::SendError::Full)).
    #[default]
    Wait,
    /// The oldest message not yet written is dropped (counted in
    /// [`SessionStats::dropped`](super::SessionStats::dropped) and reported
    /// in a [`SessionEventKind::Dropped`](super::SessionEventKind::Dropped)
    /// event). A message already written is never dropped: when every
    /// message in the outbox is in flight, `send` waits for room and
    /// `try_send` returns [`SendError::Full`](super::SendError::Full).
    DropOldest,
    /// `send` returns [`SendError::Full`](super::SendError::Full) with the
    /// message.
    Error,
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) frame: Frame,
    pub(crate) id: Option<String>,
    /// An envelope (JSON), so it may share a batch frame.
    pub(crate) batchable: bool,
    pub(crate) at: Instant,
    /// Its place in send order, given when the outbox takes it.
    pub(crate) number: u64,
}

impl Entry {
    fn size(&self) -> usize {
        self.frame.data.len()
    }
}

#[derive(Debug)]
pub(crate) struct Outbox {
    pub(crate) pending: VecDeque<Entry>,
    /// Written, waiting for confirmation: (write sequence number, entry).
    pub(crate) inflight: VecDeque<(u64, Entry)>,
    /// Taken by the driver to be written, not yet marked in flight: still
    /// counted, so a sender never sees room that is not there.
    writing: usize,
    bytes: usize,
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
    pub(crate) closed: bool,
    /// The number the next entry gets.
    pub(crate) next_number: u64,
    /// `Session::flushed` calls waiting, each counting its lost entries.
    flush_waiters: Vec<Arc<FlushWaiter>>,
}

/// One `Session::flushed` call: every entry numbered below `target` must
/// leave the outbox; `lost` counts those that left unconfirmed.
#[derive(Debug)]
pub(crate) struct FlushWaiter {
    pub(crate) target: u64,
    pub(crate) lost: AtomicUsize,
}

/// Why a push did not take the entry.
pub(crate) enum Refused {
    Full(Entry),
    Closed(Entry),
    TooLarge(usize, usize),
}

impl Outbox {
    pub(crate) fn new(max_messages: usize, max_bytes: usize) -> Self {
        Outbox {
            pending: VecDeque::new(),
            inflight: VecDeque::new(),
            writing: 0,
            bytes: 0,
            max_messages,
            max_bytes,
            closed: false,
            next_number: 0,
            flush_waiters: Vec::new(),
        }
    }

    /// Puts entries taken by a push that then failed back in front.
    fn restore(&mut self, dropped: Vec<Entry>) {
        for e in dropped.into_iter().rev() {
            self.bytes += e.size();
            self.pending.push_front(e);
        }
    }

    /// Registers a flush of everything taken so far.
    pub(crate) fn watch_flush(&mut self) -> Arc<FlushWaiter> {
        let w = Arc::new(FlushWaiter {
            target: self.next_number,
            lost: AtomicUsize::new(0),
        });
        self.flush_waiters.push(w.clone());
        w
    }

    pub(crate) fn unwatch_flush(&mut self, w: &Arc<FlushWaiter>) {
        self.flush_waiters.retain(|x| !Arc::ptr_eq(x, w));
    }

    /// Whether a `Session::flushed` call is waiting.
    pub(crate) fn wants_flush(&self) -> bool {
        !self.flush_waiters.is_empty()
    }

    /// Whether no entry numbered below `target` is left.
    pub(crate) fn flushed_through(&self, target: u64) -> bool {
        // NOTE: both queues are in send order (a resend puts in-flight
        // entries back in front, in order), so their fronts are the oldest.
        let oldest = |e: Option<&Entry>| e.is_none_or(|e| e.number >= target);
        oldest(self.pending.front()) && oldest(self.inflight.front().map(|(_, e)| e))
    }

    /// Counts `entries` (dropped, or left unconfirmed) against the flushes
    /// they were part of.
    pub(crate) fn note_lost(&self, entries: &[Entry]) {
        for w in &self.flush_waiters {
            let n = entries.iter().filter(|e| e.number < w.target).count();
            w.lost.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.len() + self.inflight.len() + self.writing
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn fits(&self, size: usize) -> bool {
        self.len() < self.max_messages && self.bytes + size <= self.max_bytes
    }

    /// Adds `entry` if it fits; with `drop_oldest`, makes room first and
    /// returns how many entries were dropped.
    pub(crate) fn push(
        &mut self,
        mut entry: Entry,
        drop_oldest: bool,
    ) -> Result<Vec<Entry>, Refused> {
        if self.closed {
            return Err(Refused::Closed(entry));
        }
        let size = entry.size();
        if size > self.max_bytes {
            return Err(Refused::TooLarge(size, self.max_bytes));
        }
        let mut dropped = Vec::new();
        while !self.fits(size) {
            if !drop_oldest {
                return Err(Refused::Full(entry));
            }
            // NOTE: only unsent messages are dropped; one in flight was
            // written and may have been read (it would be counted twice).
            let Some(oldest) = self.pending.pop_front() else {
                // Not enough unsent ones to drop: nothing is dropped.
                self.restore(dropped);
                return Err(Refused::Full(entry));
            };
            self.bytes -= oldest.size();
            dropped.push(oldest);
        }
        self.note_lost(&dropped);
        self.bytes += size;
        entry.number = self.next_number;
        self.next_number += 1;
        self.pending.push_back(entry);
        Ok(dropped)
    }

    /// Moves taken entries to in-flight under `seq`; returns whether the
    /// outbox is now at least half full (time to ask for a confirmation).
    pub(crate) fn mark_written(&mut self, taken: Vec<Entry>, seq: u64) -> bool {
        self.writing -= taken.len();
        for e in taken {
            self.inflight.push_back((seq, e));
        }
        self.inflight.len() * 2 >= self.max_messages || self.bytes * 2 >= self.max_bytes
    }

    /// Takes up to `max` pending entries (and `max_bytes`) from the front:
    /// consecutive batchable ones, or a single other one.
    pub(crate) fn take(&mut self, max: usize, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(front) = self.pending.front() {
            if !out.is_empty()
                && (!front.batchable || out.len() >= max || bytes + front.size() > max_bytes)
            {
                break;
            }
            let batchable = front.batchable;
            bytes += front.size();
            out.extend(self.pending.pop_front());
            if !batchable {
                break;
            }
        }
        self.writing += out.len();
        out
    }

    /// Releases in-flight entries written at or before `seq` (a pong
    /// confirmed them); with `raw_only` (at-least-once mode) only those
    /// without an id, which no ack will ever name. Returns how many.
    pub(crate) fn confirm_through(&mut self, seq: u64, raw_only: bool) -> usize {
        let before = self.inflight.len();
        let mut freed = 0;
        self.inflight.retain(|(s, e)| {
            let confirmed = *s <= seq && (!raw_only || e.id.is_none());
            if confirmed {
                freed += e.size();
            }
            !confirmed
        });
        self.bytes -= freed;
        before - self.inflight.len()
    }

    /// Whether a message without an id is in flight.
    pub(crate) fn raw_in_flight(&self) -> bool {
        self.inflight.iter().any(|(_, e)| e.id.is_none())
    }

    /// Releases the in-flight entry with this id (an ack). Acks usually
    /// come in order, so the front is checked first.
    pub(crate) fn ack(&mut self, id: &str) -> bool {
        let pos = self
            .inflight
            .iter()
            .position(|(_, e)| e.id.as_deref() == Some(id));
        match pos.and_then(|i| self.inflight.remove(i)) {
            Some((_, e)) => {
                self.bytes -= e.size();
                true
            }
            None => false,
        }
    }

    /// Every in-flight entry, released (reported as unconfirmed).
    pub(crate) fn drain_inflight(&mut self) -> Vec<Entry> {
        let out: Vec<Entry> = self.inflight.drain(..).map(|(_, e)| e).collect();
        self.bytes -= out.iter().map(Entry::size).sum::<usize>();
        out
    }

    /// Puts every in-flight entry with an id back in front of the pending
    /// ones, in order (at-least-once resend). Returns how many, and the
    /// in-flight messages without an id, released: they are confirmed by
    /// pong only, so a dead connection leaves them unconfirmed.
    pub(crate) fn requeue_inflight(&mut self) -> (usize, Vec<Entry>) {
        let mut n = 0;
        let mut raw = Vec::new();
        while let Some((_, e)) = self.inflight.pop_back() {
            if e.id.is_some() {
                self.pending.push_front(e);
                n += 1;
            } else {
                self.bytes -= e.size();
                raw.push(e);
            }
        }
        raw.reverse();
        (n, raw)
    }

    /// Everything left, pending first... in order; the outbox is closed.
    pub(crate) fn close(&mut self) -> (Vec<Entry>, Vec<Entry>) {
        self.closed = true;
        let inflight = self.drain_inflight();
        let pending: Vec<Entry> = self.pending.drain(..).collect();
        self.bytes = 0;
        self.note_lost(&pending);
        self.note_lost(&inflight);
        (pending, inflight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(s: &str) -> Entry {
        Entry {
            frame: Frame {
                text: true,
                data: Bytes::copy_from_slice(s.as_bytes()),
            },
            id: Some(s.to_owned()),
            batchable: true,
            at: Instant::now(),
            number: 0,
        }
    }

    #[test]
    fn counts_pending_and_inflight_against_both_limits() {
        let mut o = Outbox::new(3, 10);
        assert!(o.push(entry("aaaa"), false).is_ok());
        assert!(o.push(entry("bbbb"), false).is_ok());
        assert!(matches!(o.push(entry("ccc"), false), Err(Refused::Full(_))));
        let taken = o.take(10, 100);
        assert_eq!(taken.len(), 2);
        assert!(o.mark_written(taken, 1), "2 of 3 in flight: ask for a pong");
        assert!(matches!(o.push(entry("ccc"), false), Err(Refused::Full(_))));
        assert_eq!(o.confirm_through(1, false), 2);
        assert!(o.push(entry("ccc"), false).is_ok());
        assert!(matches!(
            o.push(entry(&"x".repeat(11)), false),
            Err(Refused::TooLarge(11, 10))
        ));
    }

    #[test]
    fn drop_oldest_makes_room_and_requeue_keeps_order() {
        let mut o = Outbox::new(2, 100);
        o.push(entry("1"), false).ok();
        o.push(entry("2"), false).ok();
        let dropped = o.push(entry("3"), true).ok().unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].id.as_deref(), Some("1"));
        let t = o.take(1, 100);
        o.mark_written(t, 1);
        assert!(o.ack("2"));
        assert!(!o.ack("2"));
        let t = o.take(1, 100);
        o.mark_written(t, 2);
        o.push(entry("4"), false).ok();
        assert_eq!(o.requeue_inflight().0, 1);
        let ids: Vec<_> = o.pending.iter().map(|e| e.id.clone().unwrap()).collect();
        assert_eq!(ids, ["3", "4"]);
    }

    /// Issue 15 #4: `DropOldest` took the "oldest" from the in-flight part
    /// when nothing waited, dropping messages already written (counted as
    /// both received and dropped).
    #[test]
    fn drop_oldest_never_drops_a_written_message() {
        let mut o = Outbox::new(2, 100);
        o.push(entry("1"), true).ok();
        o.push(entry("2"), true).ok();
        let t = o.take(2, 100);
        o.mark_written(t, 1);
        // Both in flight: nothing may be dropped, the new one is refused.
        assert!(matches!(o.push(entry("3"), true), Err(Refused::Full(_))));
        assert_eq!(o.inflight.len(), 2);
        // One confirmed: room again.
        assert_eq!(o.confirm_through(1, false), 2);
        o.push(entry("3"), true).ok().unwrap();
        o.push(entry("4"), true).ok().unwrap();
        let t = o.take(1, 100);
        o.mark_written(t, 2);
        // One in flight, one unsent: the unsent one goes.
        let dropped = o.push(entry("5"), true).ok().unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].id.as_deref(), Some("4"));
        assert_eq!(o.inflight.len(), 1);
        assert_eq!(o.len(), 2);
    }

    /// Issue 15 #4: the driver took messages out under one lock and marked
    /// them in flight under another; a sender saw room in between and the
    /// outbox went past its bound (33 of 32).
    #[test]
    fn taken_messages_still_count_until_marked_in_flight() {
        let mut o = Outbox::new(2, 100);
        o.push(entry("1"), false).ok().unwrap();
        o.push(entry("2"), false).ok().unwrap();
        let taken = o.take(2, 100);
        assert_eq!(o.len(), 2, "taken, not yet in flight: still counted");
        assert!(matches!(o.push(entry("3"), false), Err(Refused::Full(_))));
        o.mark_written(taken, 1);
        assert_eq!(o.len(), 2);
        assert_eq!(o.confirm_through(1, false), 2);
        assert_eq!(o.len(), 0);
    }
}
