//! What every `pool::Queue` does, whatever holds it: run against
//! `MemoryQueue` (tests/pool.rs) and `RedisQueue` (tests/redis.rs).

use std::sync::Arc;

use smolkit::pool::{Nack, Pipeline, Queue, QueueError, Stage};

/// FIFO, ack, nack (retry to the tail with the attempt counted, dead
/// letter), settling twice or with a made-up id, close.
pub async fn settles_each_delivery_once<Q: Queue<Item = u32>>(q: &Q) {
    for x in [1, 2, 3] {
        q.push(x).await.unwrap();
    }
    let d1 = q.pull().await.unwrap().unwrap();
    assert_eq!((d1.item, d1.attempt), (1, 1));
    q.nack(&d1.id, Nack::DeadLetter("malformed".into()))
        .await
        .unwrap();
    let d2 = q.pull().await.unwrap().unwrap();
    assert_eq!((d2.item, d2.attempt), (2, 1));
    q.nack(&d2.id, Nack::Retry).await.unwrap();
    // A retried item goes to the tail: 3 comes first.
    let d3 = q.pull().await.unwrap().unwrap();
    assert_eq!((d3.item, d3.attempt), (3, 1));
    q.extend(&d3.id).await.unwrap();
    q.ack(&d3.id).await.unwrap();
    let d2b = q.pull().await.unwrap().unwrap();
    assert_eq!((d2b.item, d2b.attempt), (2, 2));
    q.ack(&d2b.id).await.unwrap();
    for stale in [&d2b.id, &d2.id, &d1.id] {
        assert!(
            matches!(q.ack(stale).await, Err(QueueError::UnknownDelivery(_))),
            "settled twice: {stale}"
        );
    }
    assert!(matches!(
        q.extend(&d3.id).await,
        Err(QueueError::UnknownDelivery(_))
    ));
    assert!(matches!(
        q.ack("made-up").await,
        Err(QueueError::UnknownDelivery(_))
    ));
    for made_up in ["7/x", "abc/1", "1-x/1", "/1", "1-1/"] {
        assert!(
            matches!(
                q.nack(made_up, Nack::Retry).await,
                Err(QueueError::UnknownDelivery(_))
            ),
            "{made_up}"
        );
    }
    q.close();
    let e = q.push(9).await.unwrap_err();
    assert_eq!((e.error, e.item), (QueueError::Closed, 9));
    assert_eq!(q.pull().await.unwrap(), None);
}

/// Retrying past the delivery limit (`max` deliveries) dead-letters
/// instead of delivering again.
pub async fn retries_stop_at_the_delivery_limit<Q: Queue<Item = u32>>(q: &Q, max: u32) {
    q.push(5).await.unwrap();
    for attempt in 1..=max {
        let d = q.pull().await.unwrap().unwrap();
        assert_eq!((d.item, d.attempt), (5, attempt));
        q.nack(&d.id, Nack::Retry).await.unwrap();
    }
    q.close();
    assert_eq!(
        q.pull().await.unwrap(),
        None,
        "dead-lettered, not delivered again"
    );
}

/// `push` waits while the queue holds `capacity` items, and goes on once
/// one is pulled and settled (`MemoryQueue` counts queued items only,
/// `RedisQueue` queued and leased ones: both free a place by then).
pub async fn push_waits_for_room<Q: Queue<Item = u32>>(q: &Q, capacity: u32) {
    for x in 0..capacity {
        q.push(x).await.unwrap();
    }
    // NOTE: decisive for an in-process queue; a queue behind I/O proves
    // the wait with a test of its own (tests/redis.rs watches the push
    // wait on a manual clock).
    let mut blocked = Box::pin(q.push(capacity));
    for _ in 0..3 {
        assert!(
            futures_lite::future::poll_once(&mut blocked)
                .await
                .is_none(),
            "a push past the capacity went through"
        );
        futures_lite::future::yield_now().await;
    }
    let d = q.pull().await.unwrap().unwrap();
    q.ack(&d.id).await.unwrap();
    blocked.await.unwrap();
}

/// `Pipeline::from_queue`: what the stage passes is acked, what it fails
/// is dead-lettered, nothing stays leased.
pub async fn feeds_a_pipeline<Q: Queue<Item = u32> + 'static>(q: Arc<Q>) {
    for i in 0..40u32 {
        q.push(i).await.unwrap();
    }
    q.close();
    let report = Pipeline::from_queue(q.clone())
        .map(Stage::new("m").with_concurrency(4), |x| async move {
            if x % 10 == 0 { Err("tens") } else { Ok(x) }
        })
        .run(|_| async { Ok::<_, String>(()) })
        .await
        .unwrap();
    assert_eq!(
        (report.inputs, report.outputs, report.dead_letters),
        (40, 36, 4)
    );
    assert_eq!(q.pull().await.unwrap(), None);
}
