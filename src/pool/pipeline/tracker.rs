//! Position bookkeeping: which inputs are done, and the watermark.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_channel::Sender;
use event_listener::Event;

use crate::limit::Semaphore;
use crate::sync::lock_std as lock;

/// The positions an element came from.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    One(u64),
    Many(Vec<u64>),
}

impl Origin {
    pub(super) fn positions(&self) -> &[u64] {
        match self {
            Origin::One(p) => std::slice::from_ref(p),
            Origin::Many(v) => v,
        }
    }

    pub(super) fn merge(origins: impl Iterator<Item = Origin>) -> Origin {
        let mut all = Vec::new();
        for o in origins {
            all.extend_from_slice(o.positions());
        }
        Origin::Many(all)
    }
}

pub(super) struct Elem<T> {
    pub(super) value: T,
    pub(super) origin: Origin,
}

/// Per-position bookkeeping: how many derived elements are still out.
pub(super) struct Tracker {
    pub(super) state: Mutex<TrackerState>,
    pub(super) watermark: AtomicU64,
    pub(super) window: Semaphore,
    pub(super) changed: Event,
    pub(super) acks: Option<Sender<String>>,
}

pub(super) struct TrackerState {
    pub(super) base: u64,
    pub(super) counts: VecDeque<u32>,
    pub(super) ids: VecDeque<Option<String>>,
}

impl Tracker {
    pub(super) fn new(base: u64, window: usize, acks: Option<Sender<String>>) -> Self {
        Tracker {
            state: Mutex::new(TrackerState {
                base,
                counts: VecDeque::new(),
                ids: VecDeque::new(),
            }),
            watermark: AtomicU64::new(base),
            window: Semaphore::new(window),
            changed: Event::new(),
            acks,
        }
    }

    /// Lets one position into the window if there is room now.
    pub(super) fn try_admit(&self) -> bool {
        self.window.try_acquire().map(|g| g.forget()).is_ok()
    }

    pub(super) async fn admit(&self) {
        match self.window.try_acquire() {
            Ok(g) => g.forget(),
            // NOTE: the window is never closed, so an error cannot happen.
            Err(_) => {
                if let Ok(g) = self.window.acquire().await {
                    g.forget()
                }
            }
        }
    }

    pub(super) fn register(&self, id: Option<String>) -> u64 {
        let mut st = lock(&self.state);
        st.counts.push_back(1);
        st.ids.push_back(id);
        st.base + st.counts.len() as u64 - 1
    }

    /// `n` positions in a row with no delivery ids; returns the first.
    pub(super) fn register_many(&self, n: usize) -> u64 {
        let mut st = lock(&self.state);
        let first = st.base + st.counts.len() as u64;
        st.counts.extend(std::iter::repeat_n(1, n));
        st.ids.extend(std::iter::repeat_n(None, n));
        first
    }

    /// `k` elements now stand for each element of `origin`.
    pub(super) fn retain(&self, origin: &Origin, k: usize) {
        if k == 0 {
            self.complete(origin);
        } else if k > 1 {
            let mut st = lock(&self.state);
            for &p in origin.positions() {
                let i = (p - st.base) as usize;
                st.counts[i] += (k - 1) as u32;
            }
        }
    }

    pub(super) fn complete(&self, origin: &Origin) {
        let mut st = lock(&self.state);
        for &p in origin.positions() {
            let i = (p - st.base) as usize;
            st.counts[i] -= 1;
            if st.counts[i] == 0
                && let Some(id) = st.ids[i].take()
                && let Some(acks) = &self.acks
            {
                let _ = acks.try_send(id);
            }
        }
        let mut advanced = 0;
        while st.counts.front() == Some(&0) {
            st.counts.pop_front();
            st.ids.pop_front();
            st.base += 1;
            advanced += 1;
        }
        if advanced > 0 {
            let base = st.base;
            drop(st);
            self.watermark.store(base, Ordering::Release);
            self.window.add_permits(advanced);
            self.changed.notify(usize::MAX);
        }
    }

    /// Delivery ids of positions not done yet.
    pub(super) fn outstanding_ids(&self) -> Vec<String> {
        lock(&self.state)
            .ids
            .iter_mut()
            .filter_map(Option::take)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wm(t: &Tracker) -> u64 {
        t.watermark.load(Ordering::Acquire)
    }

    #[test]
    fn the_watermark_moves_only_over_a_gapless_prefix() {
        let t = Tracker::new(10, 64, None);
        let p: Vec<u64> = (0..4).map(|_| t.register(None)).collect();
        assert_eq!(p, [10, 11, 12, 13]);
        t.complete(&Origin::One(12));
        t.complete(&Origin::One(13));
        assert_eq!(wm(&t), 10, "a gap at 10 holds the watermark");
        t.complete(&Origin::One(10));
        assert_eq!(wm(&t), 11);
        t.complete(&Origin::One(11));
        assert_eq!(wm(&t), 14);
    }

    #[test]
    fn a_fanned_out_position_is_done_when_every_part_is() {
        let t = Tracker::new(0, 64, None);
        let p = t.register(None);
        t.retain(&Origin::One(p), 3);
        t.complete(&Origin::One(p));
        t.complete(&Origin::One(p));
        assert_eq!(wm(&t), 0);
        t.complete(&Origin::One(p));
        assert_eq!(wm(&t), 1);
        // Zero parts (a flat_map yielding nothing) completes at once.
        let q = t.register(None);
        t.retain(&Origin::One(q), 0);
        assert_eq!(wm(&t), 2);
    }

    #[test]
    fn a_batch_completes_all_its_positions_and_acks_their_ids() {
        let (tx, rx) = async_channel::unbounded();
        let t = Tracker::new(0, 64, Some(tx));
        let a = t.register(Some("a".into()));
        let b = t.register(Some("b".into()));
        let c = t.register(Some("c".into()));
        t.complete(&Origin::merge([Origin::One(a), Origin::One(c)].into_iter()));
        assert_eq!(rx.try_recv().ok().as_deref(), Some("a"));
        assert_eq!(rx.try_recv().ok().as_deref(), Some("c"));
        assert_eq!(wm(&t), 1);
        assert_eq!(t.outstanding_ids(), ["b"]);
        t.complete(&Origin::One(b));
        assert_eq!(wm(&t), 3);
        assert!(
            rx.try_recv().is_err(),
            "b's id was taken by outstanding_ids"
        );
    }
}
