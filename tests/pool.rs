//! Worker pool and queue: results and panics, resize and autoscale,
//! draining, batches, leases and the queue contract. The pipeline's tests
//! are in `tests/pipeline.rs`.

mod common;

use common::{eventually, within};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_lite::StreamExt;
use smolkit::pool::{
    JobError, MemoryQueue, Nack, Queue, QueueError, SubmitError, TrySubmitError, WorkerPool,
};
use smolkit::runtime::Clock;
use smolkit::testing::ManualClock;

// ---------------------------------------------------------------------------
// WorkerPool

#[test]
fn a_panicking_job_is_an_error_result_and_its_worker_lives_on() {
    within(|| {
        smol::block_on(async {
            let pool = WorkerPool::builder(|x: u32| async move {
                if x == 2 {
                    panic!("bad item {x}");
                }
                if x == 4 { Err("four") } else { Ok(x * 10) }
            })
            .with_workers(1)
            .build()
            .unwrap();
            let mut handles = Vec::new();
            for x in 0..6 {
                handles.push(pool.submit(x).await.unwrap());
            }
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await);
            }
            assert_eq!(out[0], Ok(0));
            assert_eq!(out[2], Err(JobError::Panicked("bad item 2".into())));
            assert_eq!(out[4], Err(JobError::Failed("four")));
            assert_eq!(out[5], Ok(50), "the only worker survived the panic");
            let s = pool.stats();
            assert_eq!((s.completed, s.failed, s.panicked, s.workers), (4, 2, 1, 1));
        });
    });
}

#[test]
fn try_submit_hands_the_item_back_when_full_or_closed() {
    let pool = WorkerPool::builder(|x: u32| async move { Ok::<_, ()>(x) })
        .with_workers(0)
        .with_capacity(2)
        .build()
        .unwrap();
    let _a = pool.try_submit(1).unwrap();
    let _b = pool.try_submit(2).unwrap();
    match pool.try_submit(3) {
        Err(TrySubmitError::Full(3)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(pool.stats().queued, 2);
    pool.close();
    assert_eq!(pool.try_submit(4).unwrap_err().into_inner(), 4);
    assert!(matches!(
        smol::block_on(pool.submit(5)),
        Err(SubmitError(5))
    ));
}

#[test]
fn join_drains_everything_submitted_even_with_no_workers_left() {
    within(|| {
        smol::block_on(async {
            let done = Arc::new(AtomicUsize::new(0));
            let d = done.clone();
            let pool = WorkerPool::builder(move |_x: u32| {
                let d = d.clone();
                async move {
                    futures_lite::future::yield_now().await;
                    d.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>(())
                }
            })
            .with_workers(0)
            .with_capacity(100)
            .build()
            .unwrap();
            let mut handles = Vec::new();
            for x in 0..100 {
                handles.push(pool.submit(x).await.unwrap());
            }
            assert_eq!(done.load(Ordering::SeqCst), 0, "no worker yet");
            pool.join().await;
            assert_eq!(done.load(Ordering::SeqCst), 100);
            for h in handles {
                assert_eq!(h.await, Ok(()));
            }
            assert!(pool.is_closed());
            assert_eq!(pool.stats().workers, 0);
        });
    });
}

#[test]
fn resize_adds_and_retires_workers() {
    within(|| {
        let gate = async_channel::bounded::<()>(1);
        let rx = gate.1.clone();
        let pool = WorkerPool::builder(move |_x: u32| {
            let rx = rx.clone();
            async move {
                let _ = rx.recv().await;
                Ok::<_, ()>(())
            }
        })
        .with_workers(1)
        .build()
        .unwrap();
        eventually("one worker", || pool.stats().workers == 1);
        pool.resize(4);
        eventually("four workers", || pool.stats().workers == 4);
        // Four jobs block four workers.
        let handles: Vec<_> = (0..4).map(|i| pool.try_submit(i).unwrap()).collect();
        eventually("four running", || pool.stats().running == 4);
        // Shrink: busy workers leave after their job.
        pool.resize(1);
        assert_eq!(pool.stats().workers, 4);
        for _ in 0..4 {
            gate.0.send_blocking(()).unwrap();
        }
        for h in handles {
            smol::block_on(h).unwrap();
        }
        eventually("back to one worker", || pool.stats().workers == 1);
        let s = pool.stats();
        assert_eq!((s.target_workers, s.completed), (1, 4));
    });
}

#[test]
fn autoscale_grows_with_the_queue_and_shrinks_when_idle() {
    within(|| {
        let clock = ManualClock::new();
        let gate = async_channel::unbounded::<()>();
        let rx = gate.1.clone();
        let pool = WorkerPool::builder(move |_x: u32| {
            let rx = rx.clone();
            async move {
                let _ = rx.recv().await;
                Ok::<_, ()>(())
            }
        })
        .with_capacity(10)
        .with_workers(1)
        .with_autoscale(1, 4)
        .with_scale_up_at(2)
        .with_idle_timeout(Duration::from_secs(30))
        .with_clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
        eventually("the minimum", || pool.stats().workers == 1);
        let handles: Vec<_> = (0..10).map(|i| pool.try_submit(i).unwrap()).collect();
        eventually("the maximum", || pool.stats().workers == 4);
        for _ in 0..10 {
            gate.0.send_blocking(()).unwrap();
        }
        for h in handles {
            smol::block_on(h).unwrap();
        }
        // Idle: nothing leaves before the timeout.
        eventually("idle workers waiting on the clock", || {
            clock.sleepers() == 4
        });
        clock.advance(Duration::from_secs(29));
        assert_eq!(pool.stats().workers, 4);
        // Past it, every idle timer fires: workers leave down to the
        // minimum, and the one left re-arms its timer.
        clock.advance(Duration::from_secs(31));
        eventually("the minimum, idling again", || {
            pool.stats().workers == 1 && clock.sleepers() == 1
        });
        assert_eq!(pool.stats().target_workers, 1);
        // Another timeout never takes the pool below the minimum: the last
        // worker's timer fires and it re-arms (a later deadline) instead of
        // leaving.
        clock.advance(Duration::from_secs(31));
        eventually("the last worker re-arming", || {
            clock.next_deadline().is_some_and(|d| d > clock.now())
        });
        assert_eq!(pool.stats().workers, 1);
    });
}

#[test]
fn process_ordered_keeps_input_order_and_unordered_loses_nothing() {
    within(|| {
        smol::block_on(async {
            let pool = WorkerPool::builder(|x: u64| async move {
                // Later items tend to finish first.
                for _ in 0..(x % 7) {
                    futures_lite::future::yield_now().await;
                }
                if x % 10 == 3 { Err(x) } else { Ok(x * 2) }
            })
            .with_workers(8)
            .with_capacity(16)
            .build()
            .unwrap();
            let ordered: Vec<_> = pool
                .process(futures_lite::stream::iter(0..500u64), true)
                .collect()
                .await;
            assert_eq!(ordered.len(), 500);
            for (i, (x, r)) in ordered.iter().enumerate() {
                assert_eq!(*x, i as u64);
                if x % 10 == 3 {
                    assert_eq!(r, &Err(JobError::Failed(*x)));
                } else {
                    assert_eq!(r, &Ok(x * 2));
                }
            }
            let mut unordered: Vec<u64> = pool
                .process(futures_lite::stream::iter(0..500u64), false)
                .map(|(x, _)| x)
                .collect()
                .await;
            unordered.sort();
            assert_eq!(unordered, (0..500).collect::<Vec<_>>());
        });
    });
}

/// Issue 18 #2: `process` hands items to the workers in batches sized to
/// the time an item takes; slow items still run side by side: with two
/// workers, two jobs sleep at once.
#[test]
fn slow_process_items_spread_over_the_workers() {
    within(|| {
        smol::block_on(async {
            let clock = Arc::new(ManualClock::new());
            let pool = WorkerPool::builder({
                let clock = clock.clone();
                move |x: u32| {
                    let clock = clock.clone();
                    async move {
                        clock.sleep(Duration::from_millis(10)).await;
                        Ok::<_, ()>(x)
                    }
                }
            })
            .with_workers(2)
            // A window of 3 (the queue plus the workers): batches of one,
            // whatever the measured time per item, so the test does not
            // depend on how fast the machine is.
            .with_capacity(1)
            .build()
            .unwrap();
            let results = pool.process(futures_lite::stream::iter(0..6u32), false);
            let collect = smol::spawn(results.map(|(x, r)| (x, r.unwrap())).collect::<Vec<_>>());
            for _ in 0..3 {
                clock.wait_for_sleepers(2).await;
                clock.advance(Duration::from_millis(10));
            }
            let mut out: Vec<u32> = collect.await.into_iter().map(|(x, _)| x).collect();
            out.sort();
            assert_eq!(out, (0..6).collect::<Vec<_>>());
        });
    });
}

/// A panicking or failing item in a batch is that item's result; the rest
/// of the batch runs, and a pool closed under a running `process` reports
/// every item it did not run as `Closed`.
#[test]
fn process_reports_every_item_of_a_batch_whatever_happens_to_it() {
    within(|| {
        smol::block_on(async {
            let pool = WorkerPool::builder(|x: u32| async move {
                match x % 5 {
                    1 => panic!("item {x}"),
                    2 => Err(x),
                    _ => Ok(x),
                }
            })
            .with_workers(1)
            .build()
            .unwrap();
            let out: Vec<_> = pool
                .process(futures_lite::stream::iter(0..100u32), true)
                .collect()
                .await;
            assert_eq!(out.len(), 100);
            for (i, (x, r)) in out.into_iter().enumerate() {
                assert_eq!(x, i as u32);
                match x % 5 {
                    1 => assert_eq!(r, Err(JobError::Panicked(format!("item {x}")))),
                    2 => assert_eq!(r, Err(JobError::Failed(x))),
                    _ => assert_eq!(r, Ok(x)),
                }
            }
            assert_eq!(pool.stats().panicked, 20);
            // Closed: what is fed afterwards comes back as `Closed`.
            pool.close();
            let out: Vec<_> = pool
                .process(futures_lite::stream::iter(0..10u32), true)
                .collect()
                .await;
            assert_eq!(out.len(), 10);
            assert!(
                out.iter().all(|(_, r)| *r == Err(JobError::Closed)),
                "{out:?}"
            );
        });
    });
}

// ---------------------------------------------------------------------------
// MemoryQueue

#[test]
fn an_expired_lease_is_delivered_again_until_the_delivery_limit() {
    let clock = ManualClock::new();
    let q = MemoryQueue::new()
        .with_lease(Duration::from_secs(10))
        .with_max_deliveries(2)
        .with_clock(Arc::new(clock.clone()));
    smol::block_on(async {
        q.push("a").await.unwrap();
        let first = q.pull().await.unwrap().unwrap();
        assert_eq!((first.item, first.attempt), ("a", 1));
        // Leased: not pullable while the lease runs.
        let mut pull = Box::pin(q.pull());
        assert!(futures_lite::future::poll_once(&mut pull).await.is_none());
        clock.advance(Duration::from_secs(10));
        let second = pull.await.unwrap().unwrap();
        assert_eq!(second.attempt, 2);
        // The stale lease cannot settle the new delivery.
        assert_eq!(
            q.ack(&first.id).await,
            Err(QueueError::UnknownDelivery(first.id.clone()))
        );
        // Extending keeps it leased past the old deadline.
        clock.advance(Duration::from_secs(9));
        q.extend(&second.id).await.unwrap();
        clock.advance(Duration::from_secs(9));
        assert_eq!(q.stats().leased, 1);
        // Expiring at the limit dead-letters instead of delivering again.
        clock.advance(Duration::from_secs(2));
        q.close();
        assert_eq!(q.pull().await.unwrap(), None);
        let dead = q.take_dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].item, dead[0].deliveries), ("a", 2));
        assert!(dead[0].reason.contains("lease expired"));
    });
}

/// The queue contract every `Queue` keeps (tests/redis.rs runs it on
/// `RedisQueue`).
#[test]
fn memory_queue_keeps_the_queue_contract() {
    within(|| {
        smol::block_on(async {
            common::queue_contract::settles_each_delivery_once(&MemoryQueue::new()).await;
            let q = MemoryQueue::new().with_max_deliveries(3);
            common::queue_contract::retries_stop_at_the_delivery_limit(&q, 3).await;
            assert_eq!(q.take_dead_letters()[0].deliveries, 3);
            let q = MemoryQueue::new().with_capacity(4);
            common::queue_contract::push_waits_for_room(&q, 4).await;
        })
    });
}

#[test]
fn nack_retries_or_dead_letters_and_ack_settles() {
    smol::block_on(async {
        let q = MemoryQueue::new().with_max_deliveries(3);
        for x in [1, 2] {
            q.push(x).await.unwrap();
        }
        let d1 = q.pull().await.unwrap().unwrap();
        q.nack(&d1.id, Nack::DeadLetter("malformed".into()))
            .await
            .unwrap();
        let d2 = q.pull().await.unwrap().unwrap();
        q.nack(&d2.id, Nack::Retry).await.unwrap();
        let d2b = q.pull().await.unwrap().unwrap();
        assert_eq!((d2b.item, d2b.attempt), (2, 2));
        q.ack(&d2b.id).await.unwrap();
        assert!(q.ack(&d2b.id).await.is_err(), "double ack");
        let s = q.stats();
        assert_eq!(
            (s.pushed, s.acked, s.redelivered, s.dead, s.ready, s.leased),
            (2, 1, 1, 1, 0, 0)
        );
        assert_eq!(q.take_dead_letters()[0].reason, "malformed");
        q.close();
        let e = q.push(3).await.unwrap_err();
        assert_eq!((e.error, e.item), (QueueError::Closed, 3));
    });
}

#[test]
fn an_autoscaled_pool_at_zero_workers_starts_one_for_a_job() {
    within(|| {
        let clock = ManualClock::new();
        let pool = WorkerPool::builder(|x: u32| async move { Ok::<_, ()>(x + 1) })
            .with_capacity(10)
            .with_workers(1)
            .with_autoscale(0, 3)
            .with_scale_up_at(5)
            .with_idle_timeout(Duration::from_secs(30))
            .with_clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        smol::block_on(clock.wait_for_sleepers(1));
        clock.advance(Duration::from_secs(31));
        eventually("idle down to zero", || pool.stats().workers == 0);
        let handle = pool.try_submit(41).unwrap();
        assert_eq!(smol::block_on(handle), Ok(42));

        pool.resize(10);
        assert_eq!(pool.stats().target_workers, 3, "clamped to the maximum");
        pool.resize(0);
        assert_eq!(pool.stats().target_workers, 0);
    });
}
