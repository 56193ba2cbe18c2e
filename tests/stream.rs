//! Stream combinators: batching on the manual clock, throttling, and
//! concurrent maps that keep running while their consumer is slow.

mod common;

use common::{eventually, within};

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::{Stream, StreamExt};
use smolkit::limit::{Quota, RateLimiter};
use smolkit::runtime::JoinError;
use smolkit::stream::StreamKit;
use smolkit::testing::ManualClock;

fn poll_next<S: Stream + Unpin>(s: &mut S) -> Poll<Option<S::Item>> {
    Pin::new(s).poll_next(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn chunks_flush_when_full_after_max_wait_and_at_the_end() {
    let clock = ManualClock::new();
    let (tx, rx) = async_channel::unbounded::<u32>();
    let mut chunks =
        Box::pin(rx.chunks_timeout_on(Arc::new(clock.clone()), 3, Duration::from_secs(5)));

    // Full chunk: out at once.
    for i in 0..3 {
        tx.try_send(i).unwrap();
    }
    assert_eq!(poll_next(&mut chunks), Poll::Ready(Some(vec![0, 1, 2])));

    // Two items, then silence: nothing until 5 s after the first one.
    tx.try_send(3).unwrap();
    assert!(poll_next(&mut chunks).is_pending());
    clock.advance(Duration::from_secs(2));
    tx.try_send(4).unwrap();
    assert!(poll_next(&mut chunks).is_pending());
    clock.advance(Duration::from_millis(2_999));
    assert!(poll_next(&mut chunks).is_pending());
    clock.advance(Duration::from_millis(1));
    assert_eq!(poll_next(&mut chunks), Poll::Ready(Some(vec![3, 4])));

    // No timer runs while the buffer is empty.
    assert!(poll_next(&mut chunks).is_pending());
    assert_eq!(clock.sleepers(), 0);

    // The remainder is flushed at the end of the stream.
    tx.try_send(5).unwrap();
    drop(tx);
    assert_eq!(poll_next(&mut chunks), Poll::Ready(Some(vec![5])));
    assert_eq!(poll_next(&mut chunks), Poll::Ready(None));
}

#[test]
fn throttle_passes_the_burst_then_one_item_per_interval() {
    let clock = ManualClock::new();
    let quota = Quota::per_second(1).unwrap().with_burst(2).unwrap();
    let limiter = Arc::new(RateLimiter::with_clock(quota, Arc::new(clock.clone())));
    let mut s = Box::pin(futures_lite::stream::iter(0..4).throttle(limiter));
    assert_eq!(poll_next(&mut s), Poll::Ready(Some(0)));
    assert_eq!(poll_next(&mut s), Poll::Ready(Some(1)));
    assert!(poll_next(&mut s).is_pending());
    clock.advance(Duration::from_millis(999));
    assert!(poll_next(&mut s).is_pending());
    clock.advance(Duration::from_millis(1));
    assert_eq!(poll_next(&mut s), Poll::Ready(Some(2)));
    assert!(poll_next(&mut s).is_pending());
    clock.advance(Duration::from_secs(1));
    assert_eq!(poll_next(&mut s), Poll::Ready(Some(3)));
    assert_eq!(poll_next(&mut s), Poll::Ready(None));
}

#[test]
fn map_concurrent_keeps_running_in_flight_work_while_the_consumer_waits() {
    within(|| {
        let finished = Arc::new(AtomicUsize::new(0));
        let f2 = finished.clone();
        let mut s = Box::pin(
            futures_lite::stream::iter(0..4).map_concurrent(4, move |i| {
                let finished = f2.clone();
                async move {
                    // Item 0 is quick; the rest need a few turns of the executor.
                    for _ in 0..(i * 10) {
                        futures_lite::future::yield_now().await;
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                    i
                }
            }),
        );
        let first = smol::block_on(s.next()).unwrap().unwrap();
        assert_eq!(first, 0);
        // The consumer now does not poll at all; the other three still
        // finish (buffer_unordered would leave them unpolled).
        eventually("in-flight work to finish", || {
            finished.load(Ordering::SeqCst) == 4
        });
        assert_eq!(s.in_flight(), 3);
        let mut rest: Vec<u32> = smol::block_on(s.map(Result::unwrap).collect());
        rest.sort();
        assert_eq!(rest, vec![1, 2, 3]);
    });
}

#[test]
fn map_concurrent_never_exceeds_its_limit() {
    within(|| {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        let out: Vec<_> = smol::block_on(
            futures_lite::stream::iter(0..200)
                .map_concurrent(3, move |i| {
                    let (running, peak) = (r.clone(), p.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        futures_lite::future::yield_now().await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        i
                    }
                })
                .collect(),
        );
        assert_eq!(out.len(), 200);
        let p = peak.load(Ordering::SeqCst);
        assert!((1..=3).contains(&p), "peak concurrency {p}");
    });
}

#[test]
fn ordered_map_yields_in_input_order_even_when_later_items_finish_first() {
    within(|| {
        // Item i is released only after item i + 1 finished: completion
        // order is the reverse of input order.
        let gates: Vec<_> = (0..6).map(|_| async_channel::bounded::<()>(1)).collect();
        let senders: Vec<_> = gates.iter().map(|(tx, _)| tx.clone()).collect();
        let receivers: Vec<_> = gates.iter().map(|(_, rx)| rx.clone()).collect();
        let out: Vec<usize> = smol::block_on(
            futures_lite::stream::iter(0..6usize)
                .map_concurrent_ordered(6, move |i| {
                    let gate = receivers[i].clone();
                    let next = senders.get(i.wrapping_sub(1)).cloned();
                    async move {
                        if i != 5 {
                            gate.recv().await.unwrap();
                        }
                        if let Some(next) = next {
                            next.send(()).await.unwrap();
                        }
                        i
                    }
                })
                .map(Result::unwrap)
                .collect(),
        );
        assert_eq!(out, vec![0, 1, 2, 3, 4, 5]);
    });
}

#[test]
fn a_panicking_future_is_an_error_item_and_the_rest_still_come() {
    within(|| {
        let mut out: Vec<Result<u32, JoinError>> = smol::block_on(
            futures_lite::stream::iter(0..5u32)
                .map_concurrent(2, |i| async move {
                    if i == 2 {
                        panic!("item two");
                    }
                    i
                })
                .collect(),
        );
        let panics: Vec<_> = out.iter().filter(|r| r.is_err()).collect();
        assert_eq!(panics.len(), 1);
        assert_eq!(
            panics[0].as_ref().unwrap_err().panic_message(),
            Some("item two")
        );
        out.retain(Result::is_ok);
        let mut ok: Vec<u32> = out.into_iter().map(Result::unwrap).collect();
        ok.sort();
        assert_eq!(ok, vec![0, 1, 3, 4]);
    });
}
