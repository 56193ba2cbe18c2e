//! The event bus: wildcard routing, overflow policies, handler isolation,
//! retained values and draining shutdown.

mod common;

use common::{eventually, within};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use futures_lite::StreamExt;
use smolkit::events::{Bus, EmitError, Overflow, SubscribeOptions, TryEmitError};

fn poll<F: Future>(fut: &mut Pin<Box<F>>) -> Poll<F::Output> {
    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn wildcard_matching_table() {
    let table: &[(&str, &str, bool)] = &[
        ("a.b.c", "a.b.c", true),
        ("a.b.c", "a.b", false),
        ("a.b.c", "a.b.c.d", false),
        ("a.*.c", "a.b.c", true),
        ("a.*.c", "a.c", false),
        ("a.*.c", "a.b.b.c", false),
        ("a.*", "a.b", true),
        ("a.*", "a", false),
        ("*", "a", true),
        ("*", "a.b", false),
        ("#", "a", true),
        ("#", "a.b.c", true),
        ("a.#", "a", true),
        ("a.#", "a.b", true),
        ("a.#", "a.b.c.d", true),
        ("a.#", "b.a", false),
        ("#.c", "c", true),
        ("#.c", "a.b.c", true),
        ("#.c", "a.b.c.d", false),
        ("a.#.c", "a.c", true),
        ("a.#.c", "a.x.y.c", true),
        ("a.#.c", "a.x.y.d", false),
        ("*.#", "a", true),
        ("*.*.#", "a", false),
        ("#.*.#", "a.b", true),
        ("a.#.#.b", "a.b", true),
        ("orders.eu", "orders.eu.created", false),
    ];
    for &(pattern, topic, expected) in table {
        let bus = Bus::<()>::new();
        let mut sub = bus.subscribe(pattern).unwrap();
        let n = bus.try_emit(topic, ()).unwrap();
        assert_eq!(n == 1, expected, "pattern {pattern:?} topic {topic:?}");
        assert_eq!(
            sub.try_next().is_some(),
            expected,
            "pattern {pattern:?} topic {topic:?}"
        );
    }
}

#[test]
fn malformed_topics_and_patterns_are_typed_errors_with_the_value() {
    let bus = Bus::<u8>::new();
    for bad in ["", "a..b", ".a", "a.", "a.*", "a.#", "a*"] {
        match bus.try_emit(bad, 7) {
            Err(TryEmitError::Topic(e, payload)) => {
                assert_eq!(e.value, bad);
                assert_eq!(payload, 7);
            }
            other => panic!("topic {bad:?}: {other:?}"),
        }
    }
    for bad in ["", "a..b", "a.b*", "#x", "a.*b"] {
        let e = bus.subscribe(bad).unwrap_err();
        assert_eq!(e.value, bad);
        assert!(e.to_string().contains(bad));
    }
}

#[test]
fn drop_oldest_keeps_the_newest_and_counts_the_rest() {
    let bus = Bus::<u32>::new();
    let mut sub = bus
        .subscribe_with(
            "t",
            SubscribeOptions::new()
                .with_capacity(3)
                .with_overflow(Overflow::DropOldest),
        )
        .unwrap();
    for i in 0..10 {
        assert_eq!(bus.try_emit("t", i).unwrap(), 1);
    }
    let got: Vec<u32> = std::iter::from_fn(|| sub.try_next().map(|e| e.payload)).collect();
    assert_eq!(got, vec![7, 8, 9]);
    assert_eq!(bus.stats().dropped, 7);
    assert_eq!(bus.subscribers()[0].dropped, 7);
}

#[test]
fn drop_newest_keeps_the_first_and_counts_the_rest() {
    let bus = Bus::<u32>::new();
    let mut sub = bus
        .subscribe_with(
            "t",
            SubscribeOptions::new()
                .with_capacity(3)
                .with_overflow(Overflow::DropNewest),
        )
        .unwrap();
    smol::block_on(async {
        for i in 0..10 {
            bus.emit("t", i).await.unwrap();
        }
    });
    let got: Vec<u32> = std::iter::from_fn(|| sub.try_next().map(|e| e.payload)).collect();
    assert_eq!(got, vec![0, 1, 2]);
    assert_eq!(bus.stats().dropped, 7);
}

#[test]
fn wait_policy_makes_emit_wait_and_try_emit_refuse_without_partial_delivery() {
    let bus = Bus::<u32>::new();
    let mut slow = bus
        .subscribe_with("t", SubscribeOptions::new().with_capacity(1))
        .unwrap();
    let mut other = bus.subscribe("#").unwrap();
    bus.try_emit("t", 1).unwrap();
    // Full: try_emit refuses and the other subscriber gets nothing either.
    match bus.try_emit("t", 2) {
        Err(TryEmitError::Full(2)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(other.len(), 1);
    // emit waits until the slow subscriber reads.
    let mut emit = Box::pin(bus.emit("t", 3));
    assert!(poll(&mut emit).is_pending());
    assert!(poll(&mut emit).is_pending());
    assert_eq!(slow.try_next().unwrap().payload, 1);
    assert_eq!(poll(&mut emit), Poll::Ready(Ok(2)));
    assert_eq!(slow.try_next().unwrap().payload, 3);
    let o: Vec<u32> = std::iter::from_fn(|| other.try_next().map(|e| e.payload)).collect();
    assert_eq!(o, vec![1, 3]);
    assert_eq!(bus.stats().dropped, 0);
}

#[test]
fn a_panicking_or_failing_handler_does_not_affect_the_others() {
    within(|| {
        let bus = Bus::<u32>::new();
        let good = Arc::new(AtomicUsize::new(0));
        let g = good.clone();
        bus.on("jobs.#", move |_ev| {
            let g = g.clone();
            async move {
                g.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(())
            }
        })
        .unwrap();
        bus.on_with(
            "jobs.*",
            SubscribeOptions::new().with_name("bad"),
            |ev| async move {
                if ev.payload % 2 == 0 {
                    panic!("even payload {}", ev.payload);
                }
                Err::<(), _>(format!("odd payload {}", ev.payload))
            },
        )
        .unwrap();
        let errors = bus.errors();
        smol::block_on(async {
            for i in 0..10 {
                assert_eq!(bus.emit("jobs.run", i).await.unwrap(), 2);
            }
            bus.shutdown().await;
        });
        assert_eq!(good.load(Ordering::SeqCst), 10);
        let failures: Vec<_> = std::iter::from_fn(|| errors.try_recv().ok()).collect();
        assert_eq!(failures.len(), 10);
        assert_eq!(failures.iter().filter(|f| f.panicked).count(), 5);
        assert!(
            failures
                .iter()
                .all(|f| f.handler == "bad" && &*f.topic == "jobs.run")
        );
        assert!(failures.iter().any(|f| f.error == "even payload 4"));
        assert!(failures.iter().any(|f| f.error == "odd payload 3"));
        assert_eq!(bus.stats().handler_failures, 10);
    });
}

#[test]
fn handler_concurrency_is_limited() {
    within(|| {
        let bus = Bus::<u32>::new();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let handled = Arc::new(AtomicUsize::new(0));
        let (r, p, h) = (running.clone(), peak.clone(), handled.clone());
        bus.on_with(
            "t",
            SubscribeOptions::new().with_concurrency(3),
            move |_| {
                let (r, p, h) = (r.clone(), p.clone(), h.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(now, Ordering::SeqCst);
                    for _ in 0..5 {
                        futures_lite::future::yield_now().await;
                    }
                    r.fetch_sub(1, Ordering::SeqCst);
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>(())
                }
            },
        )
        .unwrap();
        smol::block_on(async {
            for i in 0..100 {
                bus.emit("t", i).await.unwrap();
            }
            bus.shutdown().await;
        });
        assert_eq!(
            handled.load(Ordering::SeqCst),
            100,
            "shutdown drains every call"
        );
        let p = peak.load(Ordering::SeqCst);
        assert!((1..=3).contains(&p), "peak {p}");
    });
}

#[test]
fn late_subscribers_get_the_retained_value_of_each_matching_topic() {
    let bus = Bus::<&str>::builder().with_retained(true).build().unwrap();
    bus.try_emit("temp.kitchen", "20C").unwrap();
    bus.try_emit("temp.kitchen", "21C").unwrap();
    bus.try_emit("temp.garage", "9C").unwrap();
    bus.try_emit("door.front", "open").unwrap();
    let mut late = bus.subscribe("temp.*").unwrap();
    let mut got: Vec<(String, &str)> =
        std::iter::from_fn(|| late.try_next().map(|e| (e.topic.to_string(), e.payload))).collect();
    got.sort();
    assert_eq!(
        got,
        vec![("temp.garage".into(), "9C"), ("temp.kitchen".into(), "21C")]
    );
    // Without retention, a late subscriber starts empty.
    let plain = Bus::<&str>::new();
    plain.try_emit("temp.kitchen", "20C").unwrap();
    assert!(plain.subscribe("temp.*").unwrap().try_next().is_none());
}

#[test]
fn shutdown_ends_streams_after_their_queued_events_and_refuses_new_ones() {
    within(|| {
        let bus = Bus::<u32>::new();
        let sub = bus.subscribe("t").unwrap();
        smol::block_on(async {
            for i in 0..5 {
                bus.emit("t", i).await.unwrap();
            }
            bus.shutdown().await;
            assert!(matches!(bus.emit("t", 9).await, Err(EmitError::Closed(9))));
            let got: Vec<u32> = sub.map(|e| e.payload).collect().await;
            assert_eq!(got, vec![0, 1, 2, 3, 4]);
        });
    });
}

#[test]
fn dropping_a_subscriber_unsubscribes_it() {
    let bus = Bus::<u32>::new();
    let sub = bus.subscribe("t").unwrap();
    assert_eq!(bus.stats().subscribers, 1);
    assert_eq!(bus.try_emit("t", 1).unwrap(), 1);
    drop(sub);
    assert_eq!(bus.stats().subscribers, 0);
    assert_eq!(bus.try_emit("t", 2).unwrap(), 0);
    assert_eq!(bus.stats().delivered, 1, "counts survive the subscriber");
}

#[test]
fn off_removes_a_handler_after_it_drains() {
    within(|| {
        let bus = Bus::<u32>::new();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let id = bus
            .on("t", move |_| {
                let s = s.clone();
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>(())
                }
            })
            .unwrap();
        smol::block_on(async {
            bus.emit("t", 1).await.unwrap();
            assert!(bus.off(id));
            assert!(!bus.off(id));
            assert_eq!(bus.emit("t", 2).await.unwrap(), 0);
            bus.shutdown().await;
        });
        eventually("the queued event handled", || {
            seen.load(Ordering::SeqCst) >= 1
        });
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn zero_capacities_and_concurrency_are_refused_with_the_setting_named() {
    let err = Bus::<u32>::builder().with_capacity(0).build().unwrap_err();
    assert_eq!((err.setting, err.value.as_str()), ("capacity", "0"));
    let err = Bus::<u32>::builder()
        .with_error_capacity(0)
        .build()
        .unwrap_err();
    assert_eq!(err.setting, "error_capacity");
    let bus = Bus::<u32>::new();
    let err = bus
        .subscribe_with("a.#", SubscribeOptions::new().with_capacity(0))
        .unwrap_err();
    assert_eq!(err.setting, "capacity");
    let err = bus
        .on_with(
            "a.#",
            SubscribeOptions::new().with_concurrency(0),
            |_| async { Ok::<_, String>(()) },
        )
        .unwrap_err();
    assert_eq!(err.setting, "concurrency");
    let err = bus.subscribe("a..b").unwrap_err();
    assert_eq!((err.setting, err.value.as_str()), ("pattern", "a..b"));
    assert_eq!(bus.stats().subscribers, 0, "nothing was subscribed");
}

// ---------------------------------------------------------------------------
// Issue 14 #4: `Ok(n)` means exactly n subscriptions queued the event,
// every drop is counted, and no topic's values arrive out of emit order.

fn payloads(sub: &mut smolkit::events::Subscriber<u32>) -> Vec<u32> {
    std::iter::from_fn(|| sub.try_next().map(|e| e.payload)).collect()
}

#[test]
fn an_emit_waiting_on_one_subscription_delivers_to_those_before_and_after_it() {
    // Three groups on one route, in subscription order; the middle one
    // holds a single event.
    let bus = Bus::<u32>::new();
    let mut first = bus.subscribe("t").unwrap();
    let mut full = bus
        .subscribe_with("t", SubscribeOptions::new().with_capacity(1))
        .unwrap();
    let mut last = bus.subscribe("#").unwrap();
    assert_eq!(poll(&mut Box::pin(bus.emit("t", 1))), Poll::Ready(Ok(3)));
    let mut emit = Box::pin(bus.emit("t", 2));
    assert!(poll(&mut emit).is_pending());
    assert_eq!(payloads(&mut first), [1, 2], "the one before has it");
    assert_eq!(last.len(), 1, "the one after waits with the emit");
    assert_eq!(payloads(&mut full), [1]);
    assert_eq!(poll(&mut emit), Poll::Ready(Ok(3)));
    assert_eq!(payloads(&mut full), [2]);
    assert_eq!(payloads(&mut last), [1, 2]);
    // Dropped while it waits: kept by the subscriptions reached so far.
    assert_eq!(poll(&mut Box::pin(bus.emit("t", 3))), Poll::Ready(Ok(3)));
    let mut emit = Box::pin(bus.emit("t", 4));
    assert!(poll(&mut emit).is_pending());
    drop(emit);
    assert_eq!(payloads(&mut first), [3, 4]);
    assert_eq!(payloads(&mut full), [3]);
    assert_eq!(payloads(&mut last), [3]);
    assert_eq!(bus.stats().emitted, 4);
}

/// A payload whose drop reads the bus's stats (which take the bus's lock).
#[derive(Clone)]
struct Reentrant {
    n: u32,
    bus: Arc<std::sync::OnceLock<Bus<Reentrant>>>,
    dropped: Arc<AtomicUsize>,
}

impl Drop for Reentrant {
    fn drop(&mut self) {
        if let Some(bus) = self.bus.get() {
            let _ = bus.stats();
        }
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn an_overwritten_event_is_dropped_after_the_emit_lets_go_of_the_bus() {
    within(|| {
        let cell = Arc::new(std::sync::OnceLock::new());
        let dropped = Arc::new(AtomicUsize::new(0));
        let bus = cell.get_or_init(Bus::<Reentrant>::new).clone();
        let mut sub = bus
            .subscribe_with(
                "t",
                SubscribeOptions::new()
                    .with_capacity(1)
                    .with_overflow(Overflow::DropOldest),
            )
            .unwrap();
        let event = |n| Reentrant {
            n,
            bus: cell.clone(),
            dropped: dropped.clone(),
        };
        smol::block_on(async {
            bus.emit("t", event(1)).await.unwrap();
            // Overwrites 1, whose drop takes the bus's lock.
            bus.emit("t", event(2)).await.unwrap();
        });
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        assert_eq!(sub.try_next().map(|e| e.payload.n), Some(2));
        assert_eq!(bus.stats().dropped, 1);
    });
}

/// Two `DropOldest` groups on one topic: each emit overwrites in both, and
/// neither overwritten event is dropped while the bus's lock is held (an
/// emit carries one out of the lock; the second group's overwrite goes the
/// slow way), by `emit` and by a `Publisher`.
#[test]
fn overwrites_in_two_groups_are_dropped_after_the_lock_too() {
    within(|| {
        let cell = Arc::new(std::sync::OnceLock::new());
        let dropped = Arc::new(AtomicUsize::new(0));
        let bus = cell.get_or_init(Bus::<Reentrant>::new).clone();
        let opts = || {
            SubscribeOptions::new()
                .with_capacity(1)
                .with_overflow(Overflow::DropOldest)
        };
        let mut exact = bus.subscribe_with("t", opts()).unwrap();
        let mut any = bus.subscribe_with("#", opts()).unwrap();
        let event = |n| Reentrant {
            n,
            bus: cell.clone(),
            dropped: dropped.clone(),
        };
        let mut publisher = bus.publisher("t").unwrap();
        smol::block_on(async {
            assert_eq!(bus.emit("t", event(1)).await.unwrap(), 2);
            // Overwrites 1 in both groups.
            assert_eq!(bus.emit("t", event(2)).await.unwrap(), 2);
            // And 2, by the publisher.
            assert_eq!(publisher.publish(event(3)).await.unwrap(), 2);
        });
        // The two copies each of 1 and 2 (a payload's last copy is the
        // payload itself).
        assert_eq!(dropped.load(Ordering::SeqCst), 4);
        assert_eq!(exact.try_next().map(|e| e.payload.n), Some(3));
        assert_eq!(any.try_next().map(|e| e.payload.n), Some(3));
        assert_eq!(bus.stats().dropped, 4);
    });
}

#[test]
fn an_emit_parked_on_a_full_subscription_gets_its_payload_back_at_shutdown() {
    // The old code returned Ok(0) here and lost the payload.
    within(|| {
        smol::block_on(async {
            let bus = Bus::<u32>::new();
            let mut full = bus
                .subscribe_with("t", SubscribeOptions::new().with_capacity(1))
                .unwrap();
            assert_eq!(bus.emit("t", 1).await.unwrap(), 1);
            let emitting = {
                let bus = bus.clone();
                smol::spawn(async move { bus.emit("t", 2).await })
            };
            eventually("the emit waits", || bus.stats().emitted == 2);
            bus.shutdown().await;
            match emitting.await {
                Err(EmitError::Closed(2)) => {}
                other => panic!("the payload must come back, got {other:?}"),
            }
            assert_eq!(full.try_next().map(|e| e.payload), Some(1));
            assert!(full.try_next().is_none());
        })
    });
}

#[test]
fn an_emit_cut_short_by_shutdown_hands_the_payload_back() {
    within(|| {
        smol::block_on(async {
            let bus = Bus::<u32>::new();
            let mut full = bus
                .subscribe_with("t", SubscribeOptions::new().with_capacity(1))
                .unwrap();
            let mut free = bus.subscribe("t").unwrap();
            assert_eq!(bus.emit("t", 1).await.unwrap(), 2);
            let _ = free.try_next();
            // `full` holds 1: the next emit waits for it.
            let emitting = {
                let bus = bus.clone();
                smol::spawn(async move { bus.emit("t", 2).await })
            };
            eventually("the emit waits", || bus.stats().emitted == 2);
            bus.shutdown().await;
            // Exactly as many subscriptions hold event 2 as the emit says
            // queued it (a shutdown closes them one by one, so the free one
            // may or may not have taken it first); with none, the payload
            // comes back.
            let queued = match emitting.await {
                Ok(n) => n,
                Err(EmitError::Closed(2)) => 0,
                other => panic!("expected Ok(n) or the payload back, got {other:?}"),
            };
            let mut holders = 0;
            for sub in [&mut full, &mut free] {
                while let Some(ev) = sub.try_next() {
                    holders += usize::from(ev.payload == 2);
                }
            }
            assert_eq!(holders, queued, "Ok(n) is exactly the copies queued");
            assert!(queued <= 1, "the full subscription never took it");
        })
    });
}

#[test]
fn a_drop_newest_copy_is_not_counted_as_queued() {
    let bus = Bus::<u32>::new();
    let _sub = bus
        .subscribe_with(
            "t",
            SubscribeOptions::new()
                .with_capacity(1)
                .with_overflow(Overflow::DropNewest),
        )
        .unwrap();
    assert_eq!(bus.try_emit("t", 1).unwrap(), 1);
    assert_eq!(bus.try_emit("t", 2).unwrap(), 0, "dropped, not queued");
    assert_eq!(smol::block_on(bus.emit("t", 3)).unwrap(), 0);
    let s = bus.stats();
    assert_eq!((s.delivered, s.dropped), (1, 2));
}

#[test]
fn concurrent_emits_sum_to_what_was_queued() {
    within(|| {
        let bus = Bus::<u32>::new();
        let subs: Vec<_> = [Overflow::DropNewest, Overflow::DropOldest]
            .into_iter()
            .map(|o| {
                bus.subscribe_with(
                    "t",
                    SubscribeOptions::new().with_capacity(64).with_overflow(o),
                )
                .unwrap()
            })
            .collect();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    (0..3_000)
                        .map(|i| bus.try_emit("t", i).unwrap())
                        .sum::<usize>()
                })
            })
            .collect();
        let returned: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let s = bus.stats();
        assert_eq!(
            returned as u64, s.delivered,
            "Ok(n) counts queued copies only"
        );
        let per = bus.subscribers();
        // DropNewest: each copy queued or dropped.
        assert_eq!(per[0].delivered + per[0].dropped, 12_000);
        // DropOldest: each copy queued, an older one dropped to make room.
        assert_eq!(per[1].delivered, 12_000);
        assert_eq!(per[1].delivered - per[1].dropped, per[1].queued as u64);
        drop(subs);
    });
}

#[test]
fn a_replay_larger_than_the_queue_counts_what_it_drops() {
    let bus = Bus::<u32>::builder().with_retained(true).build().unwrap();
    for i in 0..5 {
        smol::block_on(bus.emit(&format!("t.{i}"), i)).unwrap();
    }
    let mut sub = bus
        .subscribe_with("t.*", SubscribeOptions::new().with_capacity(2))
        .unwrap();
    let got: Vec<u32> = std::iter::from_fn(|| sub.try_next().map(|e| e.payload)).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(
        bus.subscribers()[0].dropped,
        3,
        "the other three are counted"
    );
}

#[test]
fn a_late_subscriber_never_sees_a_topic_go_back_in_time() {
    within(|| {
        for _ in 0..50 {
            let bus = Bus::<u32>::builder().with_retained(true).build().unwrap();
            smol::block_on(bus.emit("t", 0)).unwrap();
            let emitter = {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for i in 1..=2_000 {
                        smol::block_on(bus.emit("t", i)).unwrap();
                    }
                })
            };
            let mut late = Vec::new();
            for _ in 0..20 {
                late.push(
                    bus.subscribe_with("t", SubscribeOptions::new().with_capacity(4_096))
                        .unwrap(),
                );
                std::thread::yield_now();
            }
            emitter.join().unwrap();
            for mut sub in late {
                let seen: Vec<u32> =
                    std::iter::from_fn(|| sub.try_next().map(|e| e.payload)).collect();
                assert!(
                    seen.windows(2).all(|w| w[0] <= w[1]),
                    "out of order: {:?}",
                    seen.windows(2).find(|w| w[0] > w[1])
                );
                assert_eq!(seen.last(), Some(&2_000), "ends at the last value");
            }
        }
    });
}

/// Issue 18 #1: a batch is emitted in order to every matching
/// subscription, counted once per queued copy; a full `Wait` subscription
/// makes the batch wait and loses nothing; a `DropOldest` one keeps the
/// newest of a batch larger than its queue.
#[test]
fn emit_many_keeps_order_waits_for_room_and_applies_each_policy() {
    within(|| {
        smol::block_on(async {
            let bus = Bus::<u32>::new();
            let mut wait = bus
                .subscribe_with("t.*", SubscribeOptions::new().with_capacity(2))
                .unwrap();
            let mut newest = bus
                .subscribe_with(
                    "#",
                    SubscribeOptions::new()
                        .with_capacity(3)
                        .with_overflow(Overflow::DropOldest),
                )
                .unwrap();
            let mut other = bus.subscribe("u").unwrap();
            let mut emit = Box::pin(bus.emit_many("t.a", 0..6));
            assert!(
                poll(&mut emit).is_pending(),
                "waits: the queue holds 2 of 6"
            );
            assert_eq!(wait.len(), 2);
            let (mut got, mut done) = (Vec::new(), None);
            for _ in 0..6 {
                got.push(wait.next().await.unwrap().payload);
                if done.is_none()
                    && let Poll::Ready(r) = poll(&mut emit)
                {
                    done = Some(r);
                }
            }
            assert_eq!(got, [0, 1, 2, 3, 4, 5]);
            let queued = done.expect("done once the last two had room").unwrap();
            assert_eq!(queued, 6 + 6, "six copies each (three dropped later)");
            let kept: Vec<u32> =
                std::iter::from_fn(|| newest.try_next().map(|e| e.payload)).collect();
            assert_eq!(kept, [3, 4, 5], "the newest three of the batch");
            assert!(
                other.try_next().is_none(),
                "not routed to a topic it does not match"
            );
            let stats = bus.stats();
            assert_eq!((stats.emitted, stats.delivered, stats.dropped), (6, 12, 3));
        });
    });
}

#[test]
fn emit_many_hands_the_payloads_back_on_a_bad_topic_or_a_closed_bus() {
    smol::block_on(async {
        let bus = Bus::<u32>::new();
        let _sub = bus.subscribe("#").unwrap();
        match bus.emit_many("a..b", [1, 2]).await {
            Err(EmitError::Topic(_, back)) => assert_eq!(back, [1, 2]),
            other => panic!("{other:?}"),
        }
        bus.shutdown().await;
        match bus.emit_many("a", [3, 4]).await {
            Err(EmitError::Closed(back)) => assert_eq!(back, [3, 4]),
            other => panic!("{other:?}"),
        }
    });
}

/// A subscriber's queue length is exact while it reads: what it has handed
/// out is no longer counted, what it has not is.
#[test]
fn a_subscribers_len_counts_exactly_what_it_has_not_read() {
    smol::block_on(async {
        let bus = Bus::<u32>::new();
        let mut sub = bus.subscribe("t").unwrap();
        bus.emit_many("t", 0..100).await.unwrap();
        for read in 0..100 {
            assert_eq!(sub.len(), 100 - read);
            assert_eq!(sub.next().await.unwrap().payload, read as u32);
        }
        assert!(sub.is_empty());
        assert_eq!(bus.subscribers()[0].queued, 0);
    });
}
