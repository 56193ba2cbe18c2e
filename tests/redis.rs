//! `smolkit::redis` against a real `redis-server` (one per test, started
//! by `common::redis_server` on a free loopback port; a test skips with a
//! printed reason when `redis-server` is missing, unless
//! `SMOLKIT_REQUIRE_SERVICES` is set).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::{queue_contract, within, within_for};
use smolkit::limit::{Quota, RateLimitError};
use smolkit::pool::{Checkpoint, Nack, Pipeline, Queue, QueueError, Stage};
use smolkit::redis::{
    RedisCheckpoint, RedisLimitError, RedisLink, RedisQueue, RedisRateLimiter, StoreError,
};

fn link(server: &RedisServer) -> RedisLink {
    RedisLink::open(server.url()).unwrap()
}

async fn queue(server: &RedisServer, name: &str) -> RedisQueue<u32> {
    RedisQueue::builder(link(server), name)
        .with_block(Duration::from_millis(50))
        .connect()
        .await
        .unwrap()
}

#[test]
fn redis_queue_keeps_the_queue_contract() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let q = queue(&server, "contract").await;
            queue_contract::settles_each_delivery_once(&q).await;
            let dead = q.dead_letters(10).await.unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!((dead[0].item, dead[0].deliveries), (Some(1), 1));
            assert_eq!(dead[0].reason, "malformed");
            let s = q.stats().await.unwrap();
            assert_eq!((s.length, s.leased, s.dead), (0, 0, 1));

            let q = RedisQueue::<u32>::builder(link(&server), "limit")
                .with_max_deliveries(3)
                .with_block(Duration::from_millis(50))
                .connect()
                .await
                .unwrap();
            queue_contract::retries_stop_at_the_delivery_limit(&q, 3).await;
            let dead = q.dead_letters(10).await.unwrap();
            assert_eq!(dead[0].deliveries, 3);
            assert_eq!(dead[0].reason, "nacked; delivered 3 times");
            assert_eq!(
                q.remove_dead_letters(&[dead[0].id.clone()]).await.unwrap(),
                1
            );
            assert!(q.dead_letters(10).await.unwrap().is_empty());

            let q = RedisQueue::<u32>::builder(link(&server), "room")
                .with_capacity(4)
                .with_block(Duration::from_millis(50))
                .connect()
                .await
                .unwrap();
            queue_contract::push_waits_for_room(&q, 4).await;
            queue_contract::feeds_a_pipeline(Arc::new(queue(&server, "pipeline").await)).await;
        })
    });
}

#[test]
fn bad_settings_are_refused_naming_the_value() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let err = |b: smolkit::redis::RedisQueueBuilder<u32>| async move {
                match b.connect().await {
                    Err(StoreError::Config(e)) => e.to_string(),
                    other => panic!("{other:?}"),
                }
            };
            let b = || RedisQueue::<u32>::builder(link(&server), "q");
            assert_eq!(
                err(b().with_capacity(0)).await,
                "invalid capacity = 0: must be greater than zero"
            );
            assert_eq!(
                err(b().with_lease(Duration::from_millis(5))).await,
                "invalid lease = 5ms: must be at least 100 ms"
            );
            assert_eq!(
                err(b().with_max_deliveries(0)).await,
                "invalid max_deliveries = 0: must be greater than zero"
            );
            assert!(
                err(RedisQueue::<u32>::builder(link(&server), ""))
                    .await
                    .contains("name")
            );
            // A server that is not there: a typed error after the retries.
            let nowhere = RedisLink::builder("redis://127.0.0.1:1/")
                .with_backoff(
                    smolkit::resilience::Backoff::constant(Duration::from_millis(1))
                        .with_max_times(2),
                )
                .build()
                .unwrap();
            match RedisQueue::<u32>::builder(nowhere, "q").connect().await {
                Err(StoreError::Redis { op, .. }) => assert_eq!(op, "XGROUP CREATE"),
                other => panic!("{other:?}"),
            }
        })
    });
}

/// A consumer that stops renewing (dropped: as if its process died) loses
/// its delivery after the lease; at the delivery limit the item is
/// dead-lettered instead of delivered again.
#[test]
fn the_work_of_a_dead_consumer_is_reclaimed_until_the_limit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let make = || async {
                RedisQueue::<u32>::builder(link(&server), "reclaim")
                    .with_lease(Duration::from_millis(200))
                    .with_max_deliveries(2)
                    .with_block(Duration::from_millis(20))
                    .connect()
                    .await
                    .unwrap()
            };
            let a = make().await;
            a.push(7).await.unwrap();
            let first = a.pull().await.unwrap().unwrap();
            assert_eq!(first.attempt, 1);
            drop(a); // dies holding it
            let b = make().await;
            let second = b.pull().await.unwrap().unwrap();
            assert_eq!((second.item, second.attempt), (7, 2));
            // The dead consumer's id no longer settles anything.
            let c = make().await;
            assert!(matches!(
                c.ack(&first.id).await,
                Err(QueueError::UnknownDelivery(_))
            ));
            drop(b); // dies too, at the limit
            c.close_everywhere().await.unwrap();
            assert_eq!(c.pull().await.unwrap(), None);
            let dead = c.dead_letters(10).await.unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].reason, "lease expired; delivered 2 times");
            assert_eq!(dead[0].item, Some(7));
        })
    });
}

/// A job three times as long as the lease stays with its live worker: the
/// lease keeper renews it while another consumer keeps trying to reclaim.
#[test]
fn a_long_job_is_not_reclaimed_while_its_worker_lives() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let make = || async {
                RedisQueue::<u32>::builder(link(&server), "long")
                    .with_lease(Duration::from_millis(300))
                    .with_block(Duration::from_millis(20))
                    .connect()
                    .await
                    .unwrap()
            };
            let (worker, other) = (make().await, make().await);
            worker.push(1).await.unwrap();
            let job = worker.pull().await.unwrap().unwrap();
            assert_eq!(worker.held(), 1);
            let thief = async {
                let d = other.pull().await.unwrap();
                panic!("reclaimed from a live worker: {d:?}");
            };
            let work = smol::Timer::after(Duration::from_millis(900));
            futures_lite::future::or(
                async {
                    work.await;
                },
                thief,
            )
            .await;
            worker.ack(&job.id).await.unwrap();
            assert_eq!(worker.held(), 0);
            // Both consumers are listed under their unique names.
            let info = server
                .cli(&["XINFO", "CONSUMERS", "long", "smolkit"])
                .unwrap();
            for name in [worker.consumer(), other.consumer()] {
                assert!(info.contains(name), "{name} not in {info}");
            }
            assert_ne!(worker.consumer(), other.consumer());
        })
    });
}

/// An entry that is not a `T` (written by something else) is
/// dead-lettered with the decoding error; the next one is delivered.
#[test]
fn an_entry_that_does_not_decode_is_dead_lettered() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let q = queue(&server, "bad").await;
            server
                .cli(&["XADD", "bad", "*", "item", "not json"])
                .unwrap();
            q.push(3).await.unwrap();
            let d = q.pull().await.unwrap().unwrap();
            assert_eq!(d.item, 3);
            q.ack(&d.id).await.unwrap();
            let dead = q.dead_letters(10).await.unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!((dead[0].item, dead[0].raw.as_str()), (None, "not json"));
            assert!(
                dead[0].reason.starts_with("item does not decode"),
                "{}",
                dead[0].reason
            );
        })
    });
}

/// `close` in one process is seen by the others: their pushes are refused
/// and their pulls end once the stream is empty; `reopen` undoes it.
#[test]
fn close_is_seen_by_every_consumer() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let (a, b) = (queue(&server, "shut").await, queue(&server, "shut").await);
            b.push(1).await.unwrap();
            a.close();
            common::eventually_async("the close marker", || async {
                b.stats().await.unwrap().closed
            })
            .await;
            assert_eq!(b.push(2).await.unwrap_err().error, QueueError::Closed);
            // Not drained yet: the queued item is still delivered.
            let d = b.pull().await.unwrap().unwrap();
            b.nack(&d.id, Nack::Retry).await.unwrap();
            let d = a.pull().await.unwrap().unwrap();
            a.ack(&d.id).await.unwrap();
            assert_eq!(b.pull().await.unwrap(), None);
            b.reopen().await.unwrap();
            b.push(3).await.unwrap();
        })
    });
}

/// The server is killed and started again mid-run (its append-only file
/// keeps the stream): the consumer reconnects with its backoff, what was
/// in flight is settled or delivered again, and every item is acked.
#[test]
fn a_redis_restart_mid_run_loses_nothing() {
    let Some(mut server) = RedisServer::start_durable() else {
        return;
    };
    let url = server.url();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        smol::block_on(async {
            let link = RedisLink::builder(url)
                .with_backoff(
                    smolkit::resilience::Backoff::exponential(Duration::from_millis(20))
                        .with_max_delay(Duration::from_millis(500))
                        .with_max_times(60),
                )
                .build()
                .unwrap();
            let q = RedisQueue::<u32>::builder(link, "restart")
                .with_lease(Duration::from_millis(500))
                .with_block(Duration::from_millis(50))
                .connect()
                .await
                .unwrap();
            for i in 0..300 {
                q.push(i).await.unwrap();
            }
            q.close_everywhere().await.unwrap();
            let mut acked: HashMap<u32, u32> = HashMap::new();
            while let Some(d) = q.pull().await.unwrap() {
                if acked.values().sum::<u32>() == 100 {
                    let _ = tx.send(());
                }
                smol::Timer::after(Duration::from_millis(2)).await;
                match q.ack(&d.id).await {
                    Ok(()) => *acked.entry(d.item).or_default() += 1,
                    // Lost the lease while the server was down: it comes again.
                    Err(QueueError::UnknownDelivery(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            acked
        })
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("a third acked");
    server.restart(Duration::from_millis(300));
    let acked = within_for(Duration::from_secs(90), move || worker.join().unwrap());
    assert_eq!(acked.len(), 300, "every item acked");
    let twice = acked.values().filter(|&&n| n > 1).count();
    assert_eq!(twice, 0, "an item acked twice");
}

// ---------------------------------------------------------------------------
// Several processes

const ITEMS: u32 = 10_000;

/// A worker process of `three_processes_share_the_queue_and_survive_a_kill`:
/// runs a pipeline from the queue in `SMOLKIT_REDIS_WORKER` (`url|name`)
/// that records each item in the list `<name>:done`, until the queue is
/// closed and drained.
#[test]
fn child_redis_worker() {
    let Ok(spec) = std::env::var("SMOLKIT_REDIS_WORKER") else {
        return;
    };
    let (url, consumer) = spec.split_once('|').unwrap();
    smol::block_on(async {
        let link = RedisLink::open(url).unwrap();
        let q = Arc::new(
            RedisQueue::<u32>::builder(link.clone(), "work")
                .with_consumer(consumer)
                .with_lease(Duration::from_millis(1000))
                .with_block(Duration::from_millis(50))
                .connect()
                .await
                .unwrap(),
        );
        let client = redis::Client::open(url).unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        Pipeline::from_queue(q)
            .map(Stage::new("work").with_concurrency(4), |x| async move {
                smol::Timer::after(Duration::from_micros(200)).await;
                Ok::<_, String>(x)
            })
            .run(move |x| {
                let mut conn = conn.clone();
                async move {
                    redis::cmd("RPUSH")
                        .arg("work:done")
                        .arg(x)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(|e| e.to_string())
                }
            })
            .await
            .unwrap();
    });
}

/// Three worker processes consume 10 000 items; one is SIGKILLed
/// mid-run. Every item is processed; the only duplicates are items the
/// killed worker held at the kill (its pending entries, read right after
/// it).
#[test]
fn three_processes_share_the_queue_and_survive_a_kill() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within_for(Duration::from_secs(180), move || {
        smol::block_on(async {
            let q = queue(&server, "work").await;
            for i in 0..ITEMS {
                q.push(i).await.unwrap();
            }
            q.close_everywhere().await.unwrap();
            let spawn = |k: usize| {
                std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "child_redis_worker", "--nocapture"])
                    .env(
                        "SMOLKIT_REDIS_WORKER",
                        format!("{}|worker-{k}", server.url()),
                    )
                    .spawn()
                    .unwrap()
            };
            let mut workers: Vec<_> = (0..3).map(spawn).collect();
            let done = || {
                server
                    .cli(&["LLEN", "work:done"])
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .unwrap_or(0)
            };
            common::eventually("a third done", || done() >= ITEMS / 3);
            workers[0].kill().unwrap();
            workers[0].wait().unwrap();
            let pending = server
                .cli(&["XPENDING", "work", "smolkit", "-", "+", "10000", "worker-0"])
                .unwrap();
            let is_entry_id = |l: &str| {
                l.trim().split_once('-').is_some_and(|(ms, seq)| {
                    !ms.is_empty()
                        && !seq.is_empty()
                        && ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit())
                })
            };
            let held_at_kill = pending.lines().filter(|l| is_entry_id(l)).count() as u32;
            for w in &mut workers[1..] {
                let status = w.wait().unwrap();
                assert!(status.success(), "a worker failed: {status}");
            }
            let all = server.cli(&["LRANGE", "work:done", "0", "-1"]).unwrap();
            let mut seen: HashMap<u32, u32> = HashMap::new();
            for line in all.lines() {
                *seen.entry(line.trim().parse().unwrap()).or_default() += 1;
            }
            assert_eq!(seen.len() as u32, ITEMS, "every item processed");
            let duplicates: u32 = seen.values().map(|n| n - 1).sum();
            assert!(
                duplicates <= held_at_kill,
                "{duplicates} duplicates, but the killed worker held only {held_at_kill}"
            );
            eprintln!("killed worker held {held_at_kill}; {duplicates} processed twice");
            let s = q.stats().await.unwrap();
            assert_eq!((s.length, s.leased, s.dead), (0, 0, 0));
        })
    });
}

// ---------------------------------------------------------------------------
// Rate limiter

#[test]
fn the_shared_limiter_answers_like_the_local_one() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let quota = Quota::new(10, Duration::from_secs(1))
                .unwrap()
                .with_burst(2)
                .unwrap();
            let limiter = RedisRateLimiter::new(link(&server), "api", quota);
            limiter.check(1).await.unwrap();
            limiter.check(1).await.unwrap();
            let wait = limiter.check(1).await.unwrap_err().retry_after().unwrap();
            assert!(
                wait > Duration::ZERO && wait <= Duration::from_millis(100),
                "{wait:?}"
            );
            assert!(matches!(
                limiter.check(3).await,
                Err(RedisLimitError::Limited(
                    RateLimitError::InsufficientCapacity {
                        requested: 3,
                        burst: 2
                    }
                ))
            ));
            // Another key has a rate of its own.
            let host = limiter.for_key("example.com");
            assert_eq!(host.key(), "api:example.com");
            host.check(2).await.unwrap();
            // The script is sent again when the server forgot it.
            server.cli(&["SCRIPT", "FLUSH"]).unwrap();
            limiter.until_ready(1).await.unwrap();
        })
    });
}

/// A child of `two_processes_share_one_rate`: takes cells from the limiter
/// in `SMOLKIT_REDIS_RATE` (`url`) for 1.5 s, recording each admission
/// with the server's time.
#[test]
fn child_redis_rate() {
    let Ok(url) = std::env::var("SMOLKIT_REDIS_RATE") else {
        return;
    };
    smol::block_on(async {
        let link = RedisLink::open(url.as_str()).unwrap();
        let limiter = RedisRateLimiter::new(link, "shared", rate_quota());
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let record = redis::Script::new(
            "local t = redis.call('TIME') \
             return redis.call('RPUSH', KEYS[1], t[1] * 1000000 + t[2])",
        );
        let end = std::time::Instant::now() + Duration::from_millis(1500);
        while std::time::Instant::now() < end {
            limiter.until_ready(1).await.unwrap();
            record
                .key("admitted")
                .invoke_async::<i64>(&mut conn)
                .await
                .unwrap();
        }
    });
}

fn rate_quota() -> Quota {
    Quota::new(50, Duration::from_secs(1))
        .unwrap()
        .with_burst(5)
        .unwrap()
}

/// Two processes on one key stay within one rate together: counted on
/// the server's clock, admissions ≤ burst + rate × (span + 100 ms): the
/// 100 ms allow for the time between an admission and its record under
/// load. One rate per process would admit about twice that.
#[test]
fn two_processes_share_one_rate() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        let children: Vec<_> = (0..2)
            .map(|_| {
                std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "child_redis_rate", "--nocapture"])
                    .env("SMOLKIT_REDIS_RATE", server.url())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        let times: Vec<f64> = server
            .cli(&["LRANGE", "admitted", "0", "-1"])
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        let span_s = (times.iter().cloned().fold(f64::MIN, f64::max)
            - times.iter().cloned().fold(f64::MAX, f64::min))
            / 1e6;
        let q = rate_quota();
        let bound = f64::from(q.burst()) + f64::from(q.rate()) * (span_s + 0.1);
        let n = times.len() as f64;
        eprintln!("{n} admissions over {span_s:.3} s (bound {bound:.1})");
        assert!(
            n <= bound,
            "{n} admissions over {span_s:.3} s exceed {bound:.1}"
        );
        // Both took part (one alone would not prove the rate is shared).
        assert!(n > f64::from(q.rate()) * span_s * 0.5);
    });
}

// ---------------------------------------------------------------------------
// Checkpoint

#[test]
fn the_checkpoint_only_moves_forward_even_when_writers_race() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let cp = RedisCheckpoint::new(link(&server), "wm");
            assert_eq!(cp.load().await.unwrap(), None);
            cp.save(10).await.unwrap();
            cp.save(5).await.unwrap();
            assert_eq!(cp.load().await.unwrap(), Some(10));
            // Two writers, each saving its own rising sequence, interleaved.
            let other = RedisCheckpoint::new(link(&server), "wm");
            let a = async {
                for w in (0..500).map(|i| i * 2) {
                    cp.save(w).await.unwrap();
                }
            };
            let b = async {
                for w in (0..500).map(|i| i * 2 + 1) {
                    other.save(w).await.unwrap();
                }
            };
            futures_lite::future::zip(a, b).await;
            assert_eq!(cp.load().await.unwrap(), Some(999));
            server.cli(&["SET", "wm", "garbage"]).unwrap();
            assert!(
                cp.load()
                    .await
                    .unwrap_err()
                    .to_string()
                    .contains("no watermark")
            );
            cp.reset().await.unwrap();
            assert_eq!(other.load().await.unwrap(), None);
        })
    });
}

/// Dropping the last handle ends the queue's lease keeper at once (it
/// does not sleep out its interval on the runtime).
#[test]
fn a_dropped_queue_leaves_no_task_behind() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        let rt = smolkit::runtime::Runtime::builder()
            .with_threads(1)
            .build()
            .unwrap();
        let q = rt
            .block_on(
                RedisQueue::<u32>::builder(link(&server), "drop")
                    .with_lease(Duration::from_secs(120))
                    .with_spawner(rt.spawner())
                    .connect(),
            )
            .unwrap();
        // A task is listed from its first wait on.
        common::eventually("the lease keeper to be listed", || rt.tasks().len() == 1);
        drop(q);
        common::eventually("the keeper to end", || rt.tasks().is_empty());
        assert!(rt.shutdown(Duration::from_secs(1)).drained);
    });
}

/// `push_batch` queues in order, chunk by chunk as room frees up, and
/// hands back what it could not queue.
#[test]
fn push_batch_queues_in_order_and_hands_back_the_rest() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let q = RedisQueue::<u32>::builder(link(&server), "batch")
                .with_capacity(300)
                .with_block(Duration::from_millis(20))
                .connect()
                .await
                .unwrap();
            let producer = async {
                q.push_batch((0..1000).collect()).await.unwrap();
                q.close_everywhere().await.unwrap();
            };
            let consumer = async {
                let mut got = Vec::new();
                while let Some(d) = q.pull().await.unwrap() {
                    got.push(d.item);
                    q.ack(&d.id).await.unwrap();
                }
                got
            };
            let ((), got) = futures_lite::future::zip(producer, consumer).await;
            assert_eq!(got, (0..1000).collect::<Vec<_>>());
            let e = q.push_batch(vec![1, 2, 3]).await.unwrap_err();
            assert_eq!((e.error, e.item), (QueueError::Closed, vec![1, 2, 3]));
        })
    });
}

/// An `ApiClient` metered by a shared limiter: calls past the burst wait
/// for the shared rate; with the store gone, calls fail with a typed
/// error and nothing reaches the server.
#[test]
fn an_api_client_waits_on_the_shared_rate() {
    use smolkit::http::{ApiClient, Error as HttpError};
    use smolkit::testing::ChaosServer;
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let api_server = ChaosServer::start().await.unwrap();
            let quota = Quota::new(3, Duration::from_secs(3600))
                .unwrap()
                .with_burst(3)
                .unwrap();
            // The limiter waits on a manual clock: the fourth call is seen
            // waiting, not timed.
            let clock = smolkit::testing::ManualClock::new();
            let shared = RedisLink::builder(server.url())
                .with_clock(Arc::new(clock.clone()))
                .build()
                .unwrap();
            let limiter = Arc::new(RedisRateLimiter::new(shared, "api", quota));
            let client = |limiter: Arc<RedisRateLimiter>| {
                ApiClient::builder(&api_server.url("/"))
                    .with_rate_limit(limiter)
                    .build()
                    .unwrap()
            };
            // Two clients (two processes' worth) on one key.
            let (a, b) = (client(limiter.clone()), client(limiter.clone()));
            a.get("status/200").send().await.unwrap();
            b.get("status/200").send().await.unwrap();
            a.get("status/200").send().await.unwrap();
            let fourth = b.get("status/200").send();
            let waited = futures_lite::future::or(async { fourth.await.map(|_| false) }, async {
                clock.wait_for_sleepers(1).await;
                Ok(true)
            })
            .await
            .unwrap();
            assert!(waited, "a fourth call went through a burst of 3");
            assert_eq!(api_server.requests().len(), 3);

            let nowhere = RedisLink::builder("redis://127.0.0.1:1/")
                .with_backoff(
                    smolkit::resilience::Backoff::constant(Duration::from_millis(1))
                        .with_max_times(1),
                )
                .build()
                .unwrap();
            let down = client(Arc::new(RedisRateLimiter::new(nowhere, "api", quota)));
            match down.get("status/200").send().await {
                Err(HttpError::RateLimited(RateLimitError::Unavailable)) => {}
                other => panic!("{other:?}"),
            }
            assert_eq!(api_server.requests().len(), 3);
        })
    });
}

/// The read size grows while a consumer keeps finding nothing read ahead,
/// and shrinks once read entries wait over a second (on the link's clock)
/// to be pulled.
#[test]
fn the_read_size_follows_the_consumer() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let clock = smolkit::testing::ManualClock::new();
            let link = RedisLink::builder(server.url())
                .with_clock(Arc::new(clock.clone()))
                .build()
                .unwrap();
            let q = RedisQueue::<u32>::builder(link, "adapt")
                .with_block(Duration::from_millis(20))
                .connect()
                .await
                .unwrap();
            q.push_batch((0..3000).collect()).await.unwrap();
            assert_eq!(q.read_size(), 16);
            // A fast consumer: it acks in batches, as the pipeline does.
            for _ in 0..15 {
                let mut ids = Vec::new();
                for _ in 0..100 {
                    ids.push(q.pull().await.unwrap().unwrap().id);
                }
                assert!(q.ack_many(&ids).await.iter().all(Result::is_ok));
            }
            let fast = q.read_size();
            assert!(fast >= 64, "read size {fast} after 1500 quick pulls");
            for _ in 0..6 {
                clock.advance(Duration::from_secs(2));
                let d = q.pull().await.unwrap().unwrap();
                q.ack(&d.id).await.unwrap();
            }
            assert!(
                q.read_size() < fast / 4,
                "read size {} after slow pulls",
                q.read_size()
            );
        })
    });
}

/// Consumers from earlier runs that hold nothing and idle past the limit
/// are forgotten at connect; one that still holds an entry is kept.
#[test]
fn idle_consumers_that_hold_nothing_are_forgotten() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let named = |name: &str| {
                RedisQueue::<u32>::builder(link(&server), "forget")
                    .with_consumer(name)
                    .with_forget_idle_consumers(Duration::from_millis(200))
                    .with_block(Duration::from_millis(20))
                    .connect()
            };
            let idle = named("idle-run").await.unwrap();
            let holder = named("holder-run").await.unwrap();
            holder.push(1).await.unwrap();
            let held = holder.pull().await.unwrap().unwrap();
            drop((idle, holder)); // both runs end; one still holds an entry
            smol::Timer::after(Duration::from_millis(400)).await;
            let _next = named("next-run").await.unwrap();
            let info = server
                .cli(&["XINFO", "CONSUMERS", "forget", "smolkit"])
                .unwrap();
            assert!(!info.contains("idle-run"), "{info}");
            assert!(info.contains("holder-run"), "{info}");
            assert!(info.contains("next-run"), "{info}");
            drop(held);
        })
    });
}

/// A push past the capacity finds the stream full and waits (seen asleep
/// on the link's manual clock, the stream still at the capacity), and
/// goes through once an entry is settled.
#[test]
fn a_full_queue_makes_push_wait() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    within(move || {
        smol::block_on(async {
            let clock = smolkit::testing::ManualClock::new();
            let link = RedisLink::builder(server.url())
                .with_clock(Arc::new(clock.clone()))
                .build()
                .unwrap();
            let q = RedisQueue::<u32>::builder(link, "full")
                .with_capacity(2)
                .with_block(Duration::from_millis(20))
                .connect()
                .await
                .unwrap();
            q.push(1).await.unwrap();
            q.push(2).await.unwrap();
            let mut blocked = Box::pin(q.push(3));
            let parked =
                futures_lite::future::or(async { blocked.as_mut().await.map(|_| false) }, async {
                    // The lease keeper's and the push's.
                    clock.wait_for_sleepers(2).await;
                    Ok(true)
                })
                .await
                .unwrap();
            assert!(parked, "a push past the capacity went through");
            assert_eq!(q.stats().await.unwrap().length, 2);
            let d = q.pull().await.unwrap().unwrap();
            q.ack(&d.id).await.unwrap();
            // Its wait ends; it finds room.
            clock.advance(Duration::from_millis(100));
            blocked.await.unwrap();
            assert_eq!(q.stats().await.unwrap().length, 2);
        })
    });
}
