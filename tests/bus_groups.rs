//! Subscriptions with the same pattern, capacity and policy share one ring
//! with a cursor each (issue 18 #1): each still gets every event, its own
//! overflow accounting and its own backpressure, and an event is released
//! once every member has read it.

mod common;

use common::within;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_lite::StreamExt;
use smolkit::events::{Bus, Overflow, SubscribeOptions, Subscriber};

fn poll<F: Future>(fut: &mut Pin<Box<F>>) -> Poll<F::Output> {
    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

fn drain<E: Clone + Send + 'static>(sub: &mut Subscriber<E>) -> Vec<E> {
    std::iter::from_fn(|| sub.try_next().map(|e| e.payload)).collect()
}

fn subs(bus: &Bus<u32>, n: usize, opts: &SubscribeOptions) -> Vec<Subscriber<u32>> {
    (0..n)
        .map(|_| bus.subscribe_with("t", opts.clone()).unwrap())
        .collect()
}

#[test]
fn members_of_one_pattern_each_get_every_event_and_the_slowest_holds_the_emitter() {
    let bus = Bus::<u32>::new();
    let mut s = subs(&bus, 2, &SubscribeOptions::new().with_capacity(2));
    assert_eq!(bus.try_emit("t", 0).unwrap(), 2);
    assert_eq!(bus.try_emit("t", 1).unwrap(), 2);
    let mut emit = Box::pin(bus.emit("t", 2));
    assert!(poll(&mut emit).is_pending(), "both are full");
    assert_eq!(drain(&mut s[0]), [0, 1]);
    assert!(
        poll(&mut emit).is_pending(),
        "the other member has not read event 0 yet"
    );
    assert_eq!(s[1].try_next().unwrap().payload, 0);
    assert_eq!(poll(&mut emit), Poll::Ready(Ok(2)));
    assert_eq!(drain(&mut s[0]), [2]);
    assert_eq!(drain(&mut s[1]), [1, 2]);
    let per = bus.subscribers();
    assert_eq!(
        per.iter()
            .map(|m| (m.delivered, m.dropped, m.queued))
            .collect::<Vec<_>>(),
        [(3, 0, 0), (3, 0, 0)]
    );
    assert_eq!(bus.stats().delivered, 6);
}

#[test]
fn a_lagging_drop_oldest_member_counts_only_its_own_loss() {
    let bus = Bus::<u32>::new();
    let opts = SubscribeOptions::new()
        .with_capacity(3)
        .with_overflow(Overflow::DropOldest);
    let mut s = subs(&bus, 2, &opts);
    let mut fast = Vec::new();
    for i in 0..10 {
        assert_eq!(bus.try_emit("t", i).unwrap(), 2);
        fast.extend(drain(&mut s[0]));
    }
    assert_eq!(fast, (0..10).collect::<Vec<_>>());
    let per = bus.subscribers();
    assert_eq!((per[0].dropped, per[0].queued), (0, 0));
    assert_eq!(
        (per[1].delivered, per[1].dropped, per[1].queued),
        (10, 7, 3)
    );
    assert_eq!(drain(&mut s[1]), [7, 8, 9]);
    let stats = bus.stats();
    assert_eq!((stats.delivered, stats.dropped), (20, 7));
}

#[test]
fn drop_newest_subscriptions_keep_queues_of_their_own() {
    let bus = Bus::<u32>::new();
    let opts = SubscribeOptions::new()
        .with_capacity(2)
        .with_overflow(Overflow::DropNewest);
    let mut s = subs(&bus, 2, &opts);
    let mut fast = Vec::new();
    for i in 0..5 {
        bus.try_emit("t", i).unwrap();
        fast.extend(drain(&mut s[0]));
    }
    assert_eq!(fast, [0, 1, 2, 3, 4], "the reader keeping up loses nothing");
    assert_eq!(drain(&mut s[1]), [0, 1]);
    let per = bus.subscribers();
    assert_eq!((per[0].delivered, per[0].dropped), (5, 0));
    assert_eq!((per[1].delivered, per[1].dropped), (2, 3));
}

#[test]
fn a_dropped_member_releases_what_it_had_not_read() {
    let bus = Bus::<u32>::new();
    let mut s = subs(&bus, 2, &SubscribeOptions::new().with_capacity(1));
    bus.try_emit("t", 1).unwrap();
    assert_eq!(drain(&mut s[0]), [1]);
    let mut emit = Box::pin(bus.emit("t", 2));
    assert!(poll(&mut emit).is_pending(), "held by the member behind");
    drop(s.pop());
    assert_eq!(
        poll(&mut emit),
        Poll::Ready(Ok(1)),
        "its slot is free once it is gone"
    );
    assert_eq!(drain(&mut s[0]), [2]);
    let stats = bus.stats();
    assert_eq!((stats.subscribers, stats.delivered), (1, 3));
}

#[test]
fn an_event_is_released_once_every_member_has_read_it() {
    let bus = Bus::<Arc<()>>::new();
    let mut s: Vec<_> = (0..3).map(|_| bus.subscribe("t").unwrap()).collect();
    let payload = Arc::new(());
    bus.try_emit("t", payload.clone()).unwrap();
    assert_eq!(Arc::strong_count(&payload), 2, "one copy, in the ring");
    drop(s[0].try_next().unwrap());
    drop(s[1].try_next().unwrap());
    assert_eq!(Arc::strong_count(&payload), 2);
    let last = s[2].try_next().unwrap();
    assert_eq!(
        Arc::strong_count(&payload),
        2,
        "the last reader moved it out"
    );
    drop(last);
    assert_eq!(Arc::strong_count(&payload), 1);
    // One that never reads holds it until it goes.
    bus.try_emit("t", payload.clone()).unwrap();
    drop(s[0].try_next());
    drop(s[1].try_next());
    assert_eq!(Arc::strong_count(&payload), 2);
    drop(s.pop());
    assert_eq!(Arc::strong_count(&payload), 1, "released with its reader");
}

/// Emitters on several threads, a lossless group of readers on others that
/// come and go: each reader sees each emitter's events in order, with no
/// gap from its first to its last, and the counts add up.
#[test]
fn members_joining_and_leaving_under_load_see_ordered_gapless_streams() {
    within(|| {
        const EMITTERS: u32 = 3;
        const EACH: u32 = 3_000;
        let bus = Bus::<(u32, u32)>::builder()
            .with_capacity(8)
            .build()
            .unwrap();
        let steady: Vec<_> = (0..2).map(|_| bus.subscribe("t").unwrap()).collect();
        let emitters: Vec<_> = (0..EMITTERS)
            .map(|e| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        smol::block_on(bus.emit("t", (e, i))).unwrap();
                    }
                })
            })
            .collect();
        let check = |seen: &[(u32, u32)], whole: bool| {
            for e in 0..EMITTERS {
                let mine: Vec<u32> = seen.iter().filter(|p| p.0 == e).map(|p| p.1).collect();
                assert!(
                    mine.windows(2).all(|w| w[1] == w[0] + 1),
                    "emitter {e}: a gap or a repeat"
                );
                if whole {
                    assert_eq!(mine.len() as u32, EACH, "emitter {e}: all of it");
                }
            }
        };
        let readers: Vec<_> = steady
            .into_iter()
            .map(|mut sub| {
                std::thread::spawn(move || {
                    (0..EMITTERS * EACH)
                        .map(|_| smol::block_on(sub.next()).expect("open").payload)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // Members that join, read a little, and leave with events unread.
        for round in 0..200 {
            let mut late = bus.subscribe("t").unwrap();
            let seen: Vec<_> = (0..round % 7)
                .filter_map(|_| late.try_next().map(|e| e.payload))
                .collect();
            check(&seen, false);
        }
        for t in emitters {
            t.join().unwrap();
        }
        for r in readers {
            check(&r.join().unwrap(), true);
        }
        let stats = bus.stats();
        assert_eq!(stats.dropped, 0);
        assert_eq!(stats.subscribers, 0);
        assert!(stats.delivered >= u64::from(2 * EMITTERS * EACH));
    });
}

/// Readers hand out topics from copies of their own when one topic keeps
/// coming: whatever the mix, each event carries the topic it was emitted
/// on.
#[test]
fn each_event_carries_its_own_topic_whatever_the_mix() {
    let bus = Bus::<u32>::builder().with_capacity(4096).build().unwrap();
    let mut s: Vec<_> = (0..2).map(|_| bus.subscribe("t.*").unwrap()).collect();
    let topic = |i: u32| match i {
        0..100 => "t.a".to_owned(),
        100..300 => format!("t.{}", i % 5),
        300..400 => "t.b".to_owned(),
        _ => format!("t.{}", i % 97),
    };
    let mut emitted = Vec::new();
    for i in 0..600 {
        if i == 350 {
            // A new subscription renews the bus's copy of each topic.
            drop(bus.subscribe("u").unwrap());
        }
        bus.try_emit(&topic(i), i).unwrap();
        emitted.push(topic(i));
        if i % 3 == 0 {
            let got = s[0].try_next().unwrap();
            assert_eq!(&*got.topic, emitted[got.payload as usize]);
        }
    }
    for sub in &mut s {
        let mut n = 0;
        while let Some(ev) = sub.try_next() {
            assert_eq!(&*ev.topic, topic(ev.payload), "event {}", ev.payload);
            n += 1;
        }
        assert!(n > 0);
    }
}

/// A handler removed with `off` still handles what was queued for it, but
/// no longer holds back the emitters of the subscriptions it shared a ring
/// with.
#[test]
fn a_removed_handler_drains_without_holding_its_group_back() {
    within(|| {
        let bus = Bus::<u32>::new();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = async_channel::unbounded::<()>();
        let opts = SubscribeOptions::new().with_capacity(2);
        let s = seen.clone();
        let id = bus
            .on_with("t", opts.clone(), move |ev| {
                let (s, gate) = (s.clone(), gate_rx.clone());
                async move {
                    s.lock().unwrap().push(ev.payload);
                    let _ = gate.recv().await;
                    Ok::<_, String>(())
                }
            })
            .unwrap();
        let mut sub = bus.subscribe_with("t", opts).unwrap();
        assert_eq!(bus.try_emit("t", 0).unwrap(), 2, "one ring, two members");
        common::eventually("the handler holds event 0", || *seen.lock().unwrap() == [0]);
        assert_eq!(bus.try_emit("t", 1).unwrap(), 2);
        assert_eq!(drain(&mut sub), [0, 1]);
        assert_eq!(bus.try_emit("t", 2).unwrap(), 2);
        assert_eq!(drain(&mut sub), [2]);
        assert!(
            bus.try_emit("t", 3).is_err(),
            "the busy handler's queue is full"
        );
        assert!(bus.off(id));
        assert_eq!(
            bus.try_emit("t", 3).unwrap(),
            1,
            "the removed handler holds nothing back"
        );
        assert_eq!(drain(&mut sub), [3]);
        drop(gate_tx);
        common::eventually("the handler drained", || seen.lock().unwrap().len() == 3);
        assert_eq!(*seen.lock().unwrap(), [0, 1, 2]);
    });
}

/// Lossy members of one ring read at their own pace while two threads
/// emit: each sees every emitter's events in order (with gaps), and what
/// it read plus what it was told it lost is exactly what was queued for
/// it.
#[test]
fn lossy_members_under_load_account_for_every_event() {
    within(|| {
        const EACH: u32 = 5_000;
        let bus = Bus::<(u32, u32)>::builder()
            .with_capacity(16)
            .build()
            .unwrap();
        let opts = SubscribeOptions::new().with_overflow(Overflow::DropOldest);
        let readers: Vec<_> = (0..3u32)
            .map(|pace| {
                let mut sub = bus.subscribe_with("t", opts.clone()).unwrap();
                std::thread::spawn(move || {
                    let mut last = [None::<u32>; 2];
                    // Bounded: at most every event once, then the end.
                    for read in 0..=u64::from(2 * EACH) {
                        let Some(ev) = smol::block_on(sub.next()) else {
                            return (sub, read);
                        };
                        let (e, i) = ev.payload;
                        let prev = last[e as usize].replace(i);
                        assert!(prev.is_none_or(|p| p < i), "emitter {e}: {prev:?} then {i}");
                        for _ in 0..pace * 50 {
                            std::hint::spin_loop();
                        }
                    }
                    panic!("more events than were emitted");
                })
            })
            .collect();
        let emitters: Vec<_> = (0..2u32)
            .map(|e| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        assert_eq!(bus.try_emit("t", (e, i)).unwrap(), 3);
                    }
                })
            })
            .collect();
        for t in emitters {
            t.join().unwrap();
        }
        smol::block_on(bus.shutdown());
        let subs: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        let per = bus.subscribers();
        assert_eq!(per.len(), 3);
        for ((_, read), stats) in subs.iter().zip(&per) {
            assert_eq!(stats.delivered, u64::from(2 * EACH));
            assert_eq!(stats.queued, 0);
            assert_eq!(read + stats.dropped, stats.delivered, "{stats:?}");
        }
        let total = bus.stats();
        assert_eq!(total.delivered, u64::from(6 * EACH));
        drop(subs);
        assert_eq!(bus.stats().subscribers, 0);
    });
}
