//! The main job: a small order-sync service built from smolkit's parts,
//! against the embedded ChaosServer (no internet needed).
//!
//! - smolkit's own `Runtime` (2 threads, a live task list) runs everything;
//! - an `ApiClient` over the pooled `HyperClient` fetches 40 orders from a
//!   flaky API: retries with backoff, Retry-After, a rate limit, a
//!   concurrency limit, a breaker per host;
//! - a `Pipeline` parses the orders, checksums them on the CPU pool
//!   (`cpu_map`), batches them, and delivers the batches; the orders the
//!   API does not have become dead letters, nothing is lost;
//! - each delivered batch is an event on a `Bus`, which a handler and a
//!   subscriber consume;
//! - a `ws::Session` in at-least-once mode keeps sending through a server
//!   restart: messages sent while the server is down wait in the outbox,
//!   and `flushed()` confirms every one was acknowledged;
//! - a `WorkerPool` hashes a stream of blocks, resized while it runs;
//! - a producer on another task feeds a batching consumer through a
//!   bounded channel and `chunks_timeout`: backpressure keeps the channel
//!   within its bound, batches come by size or by time, nothing is lost;
//! - a `Downloader` fetches a batch of files into a temporary folder: one
//!   is cut off mid-body and resumed with `Range` + `If-Range`, one answers
//!   503 with Retry-After first; every file is checked byte for byte, and
//!   a second run skips them all through the manifest;
//! - with `REDIS_URL` set and the `redis` feature on, two workers share
//!   one `RedisQueue` (each its own consumer in the group) under one
//!   `RedisRateLimiter`, and a `RedisCheckpoint` records how far the
//!   producer got (otherwise the scenario prints that it is skipped);
//! - at the end: what the server saw, the client's and the bus's counters,
//!   and a graceful shutdown.
//!
//! Every scenario checks its own outcome: the tour exits non-zero when one
//! misbehaves (and `tests/tour.rs` runs it in CI).
//!
//! Run: `cargo run --release --features testing --example tour`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use smolkit::events::Bus;
use smolkit::http::download::{DownloadStatus, Downloader};
use smolkit::http::{ApiClient, HyperClient};
use smolkit::limit::{Quota, RateLimiter};
use smolkit::pool::WorkerPool;
use smolkit::pool::{Pipeline, Stage};
use smolkit::resilience::{Backoff, CircuitBreaker, Retry};
use smolkit::runtime::{Runtime, Spawn};
use smolkit::stream::StreamKit;
use smolkit::testing::ChaosServer;
use smolkit::ws::{Envelope, Session};

type BoxError = Box<dyn std::error::Error>;

const ORDERS: u64 = 40;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Order {
    id: u64,
    body: String,
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let rt = Runtime::builder().with_threads(2).build()?;
    let spawner: Arc<dyn Spawn> = Arc::new(rt.handle());
    rt.block_on(async {
        // The API: a flaky endpoint per order; every 10th order is missing.
        let server = ChaosServer::builder().with_spawner(spawner.clone()).start().await?;
        println!("ChaosServer (the API) on {}", server.url("/"));

        let http = HyperClient::builder()
            .with_max_connections_per_host(8)
            .build()?;
        let api = ApiClient::builder(&server.url("/"))
            .with_client(Arc::new(http.clone()))
            .with_header("x-api-key", "tour")
            .with_retry(
                Retry::new().with_max_attempts(4).with_backoff(
                    Backoff::exponential(Duration::from_millis(20))
                        .with_max_delay(Duration::from_millis(500)),
                ),
            )
            .with_rate_limit(Arc::new(RateLimiter::new(
                Quota::per_second(400)?.with_burst(20)?,
            )))
            .with_concurrency_limit(8)
            .with_breaker(CircuitBreaker::builder().with_min_calls(20).with_failure_rate(0.8))
            .build()?;

        // Events: a handler adds up what was delivered, a subscriber logs.
        let bus = Bus::<Vec<Order>>::builder()
            .with_spawner(spawner.clone())
            .build()?;
        let delivered = Arc::new(AtomicU64::new(0));
        let counter = delivered.clone();
        bus.on("orders.batch.#", move |event| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(event.payload.len() as u64, Ordering::Relaxed);
                Ok::<_, String>(())
            }
        })?;
        let mut log = bus.subscribe("orders.#")?;
        let logger = rt.spawn_named("batch-log", async move {
            let mut lines = Vec::new();
            while let Some(event) = log.next().await {
                let ids: Vec<u64> = event.payload.iter().map(|o| o.id).collect();
                lines.push(format!("{} {:?}", event.topic, ids));
            }
            lines
        });

        // The pipeline: fetch → checksum on the CPU pool → batches of 8.
        let fetch_api = api.clone();
        let emit_bus = bus.clone();
        let report = Pipeline::from_stream(futures_lite::stream::iter(1..=ORDERS))
            .with_spawner(spawner.clone())
            .map(Stage::new("fetch").with_concurrency(8).with_ordered(true), move |id: u64| {
                let api = fetch_api.clone();
                async move {
                    // Orders 1, 4, 7, ... fail once with 503 (and some ask
                    // for a Retry-After); every 10th does not exist.
                    let path = if id.is_multiple_of(10) {
                        format!("status/404?order={id}")
                    } else if id % 3 == 1 {
                        format!("flaky/order-{id}?fail=1&retry_after={}", u64::from(id.is_multiple_of(2)))
                    } else {
                        format!("echo?order={id}")
                    };
                    let r = api.get(&path).send().await.map_err(|e| e.to_string())?;
                    Ok::<_, String>(Order { id, body: r.text() })
                }
            })
            .cpu_map("checksum", |order: Order| {
                // A stand-in for real CPU work: FNV-1a over the body, 2,000 times.
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for _ in 0..2_000 {
                    for b in order.body.bytes() {
                        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                    }
                }
                Ok::<_, String>(Order {
                    id: order.id,
                    body: format!("{h:016x}"),
                })
            })
            .batch("batch", 8, Duration::from_millis(50))
            .run(move |batch: Vec<Order>| {
                let bus = emit_bus.clone();
                async move {
                    let topic = format!("orders.batch.{}", batch.len());
                    bus.emit(&topic, batch).await.map(drop).map_err(|e| e.to_string())
                }
            })
            .await?;
        bus.shutdown().await;
        let lines = logger.await?;

        println!("\npipeline: {} orders in, {} batches out, {} dead letters", report.inputs, report.outputs, report.dead_letters);
        for line in &lines {
            println!("  event {line}");
        }
        for dead in &report.dead {
            println!("  dead letter from {:?}: order {} ({})", dead.stage, dead.item, dead.error);
        }
        let accounted = delivered.load(Ordering::Relaxed) + report.dead_letters;
        println!("  every order accounted for: {accounted} of {ORDERS}");

        let requests = server.requests();
        let api_stats = api.stats();
        let pool = http.stats();
        println!(
            "\nHTTP: {} calls, {} retries, {} failed; the server saw {} requests on {} connections (at most {} open at once, cap 8)",
            api_stats.calls,
            api_stats.retries,
            api_stats.failed,
            requests.len(),
            server.connections(),
            server.max_open_connections(),
        );
        println!(
            "  pool: {} connections opened, {} requests on reused ones",
            pool.connections_opened, pool.connections_reused
        );
        let stats = bus.stats();
        println!("bus: {} events emitted, {} deliveries", stats.emitted, stats.delivered);
        check(accounted == ORDERS, "an order was lost")?;

        websocket_through_a_restart(spawner.clone()).await?;
        worker_pool(spawner.clone()).await?;
        batching_with_backpressure(spawner.clone()).await?;
        batch_download(spawner.clone()).await?;
        distributed(spawner.clone()).await?;
        Ok::<_, BoxError>(())
    })?;
    let tasks = rt.tasks().len();
    let report = rt.shutdown(Duration::from_secs(2));
    println!(
        "runtime: {} tasks alive before shutdown (the ChaosServer's: its listener and the connections it serves), drained: {}; done in {:?}",
        tasks,
        report.drained,
        started.elapsed()
    );
    Ok(())
}

/// Fails the tour (a non-zero exit) with `what` unless `ok`.
fn check(ok: bool, what: &str) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(format!("tour check failed: {what}").into())
    }
}

/// A session that survives a server restart, losing nothing.
async fn websocket_through_a_restart(spawner: Arc<dyn Spawn>) -> Result<(), BoxError> {
    const N: u64 = 60;
    let server = ChaosServer::builder()
        .with_spawner(spawner.clone())
        .start()
        .await?;
    let addr = server.addr();
    let session = Session::builder(&server.ws_url("/ws?ack=1&echo=0"))
        .with_spawner(spawner.clone())
        .with_at_least_once(true)
        .with_reconnect(Backoff::constant(Duration::from_millis(50)))
        .connect()
        .await?;
    for i in 0..N / 2 {
        session.send_envelope(Envelope::new("tick", i)).await?;
    }
    session.flushed().await?;
    server.shutdown();
    // The server is down: these wait in the outbox.
    for i in N / 2..N {
        session.send_envelope(Envelope::new("tick", i)).await?;
    }
    let queued = session.queued();
    // Restart on the same port once the old server has let go of it.
    server.closed().await;
    let old = server;
    let server = ChaosServer::builder()
        .with_addr(addr)
        .with_spawner(spawner)
        .start()
        .await?;
    session.flushed().await?;
    // Read the old server's log only now: until the session left it, it
    // could still take (and acknowledge) a message sent after the shutdown.
    let mut seen = ids(&old)?;
    seen.extend(ids(&server)?);
    let stats = session.stats();
    println!(
        "\nws: {N} messages, {queued} sent while the server was down; {} acked over {} connections, {} distinct at the servers",
        stats.acked,
        stats.connections,
        seen.len()
    );
    session.close().await;
    check(
        seen.len() as u64 == N,
        "a WebSocket message was lost in the restart",
    )?;
    check(stats.acked == N, "a WebSocket message was not acknowledged")
}

/// The envelope ids a server received.
fn ids(server: &ChaosServer) -> Result<std::collections::BTreeSet<String>, BoxError> {
    let codec = smolkit::ws::Codec::new();
    let mut out = std::collections::BTreeSet::new();
    for record in server.ws_messages() {
        for m in codec.decode(record.message)? {
            let env: Envelope<u64> = m.envelope()?;
            out.extend(env.id);
        }
    }
    Ok(out)
}

/// A worker pool hashing blocks, resized while it works.
async fn worker_pool(spawner: Arc<dyn Spawn>) -> Result<(), BoxError> {
    const BLOCKS: u64 = 400;
    let pool = WorkerPool::builder(|block: u64| async move {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ block;
        for i in 0..5_000u64 {
            h = (h ^ i).wrapping_mul(0x0100_0000_01b3);
        }
        Ok::<_, String>(h)
    })
    .with_workers(2)
    .with_capacity(16)
    .with_spawner(spawner)
    .build()?;
    let mut results = pool.process(futures_lite::stream::iter(0..BLOCKS), true);
    let mut done = 0u64;
    let mut in_order = true;
    while let Some((block, hash)) = results.next().await {
        in_order &= block == done;
        hash.map_err(|e| format!("block {block}: {e}"))?;
        done += 1;
        if done == BLOCKS / 2 {
            pool.resize(4);
        }
    }
    let stats = pool.stats();
    println!(
        "pool: {done} blocks hashed in order by {} workers (resized from 2)",
        stats.workers
    );
    pool.close();
    pool.join().await;
    check(
        done == BLOCKS && in_order,
        "the worker pool lost or reordered a block",
    )
}

/// A producer and a batching consumer on different tasks: the bounded
/// channel holds the producer back whenever the consumer is behind;
/// batches come by size or by time.
async fn batching_with_backpressure(spawner: Arc<dyn Spawn>) -> Result<(), BoxError> {
    use smolkit::runtime::SpawnExt;
    const ITEMS: u32 = 500;
    const BOUND: usize = 16;
    let (tx, rx) = async_channel::bounded::<u32>(BOUND);
    let peak = Arc::new(AtomicU64::new(0));
    let producer = {
        let peak = peak.clone();
        spawner.spawn(async move {
            for i in 0..ITEMS {
                tx.send(i).await.ok();
                peak.fetch_max(tx.len() as u64, Ordering::Relaxed);
            }
        })
    };
    let mut batches = std::pin::pin!(rx.chunks_timeout(50, Duration::from_millis(20)));
    let (mut got, mut count, mut full) = (Vec::new(), 0, 0);
    while let Some(batch) = batches.next().await {
        count += 1;
        full += usize::from(batch.len() == 50);
        got.extend(batch);
    }
    producer.await?;
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "stream: {} items in {count} batches ({full} full), the channel never held more than {peak} of {BOUND}",
        got.len()
    );
    check(
        got == (0..ITEMS).collect::<Vec<_>>(),
        "a batched item was lost or reordered",
    )?;
    check(peak <= BOUND as u64, "the bounded channel overflowed")
}

/// The seeds' batch downloader: a resumed file, a Retry-After, atomic
/// files, and a rerun that skips everything.
async fn batch_download(spawner: Arc<dyn Spawn>) -> Result<(), BoxError> {
    let files: Vec<(String, Vec<u8>)> = (0..8u32)
        .map(|i| {
            let len = 100_000 + 37_000 * i as usize;
            (
                format!("report-{i}.bin"),
                (0..len).map(|j| (j as u32 * 31 + i) as u8).collect(),
            )
        })
        .collect();
    let mut builder = ChaosServer::builder().with_spawner(spawner.clone());
    for (name, bytes) in &files {
        builder = builder.with_file(name, bytes.clone());
    }
    let server = builder.start().await?;
    let dir = tempfile::tempdir()?;
    let downloader = Downloader::builder(dir.path())
        .with_concurrency(4)
        .with_retry(
            Retry::new()
                .with_max_attempts(4)
                .with_backoff(Backoff::constant(Duration::from_millis(20))),
        )
        .with_spawner(spawner)
        .build()?;
    let urls: Vec<String> = files
        .iter()
        .enumerate()
        .map(|(i, (name, _))| match i {
            // Over 256 KiB, so resumable (smaller parts restart whole).
            7 => server.url(&format!("/files/{name}?cut=60000&reset=1")),
            5 => server.url(&format!("/files/{name}?fail=1&retry_after=0")),
            _ => server.url(&format!("/files/{name}")),
        })
        .collect();
    let report = downloader.run(urls.clone()).await;
    let s = report.summary;
    println!(
        "\ndownloader: {} files, {} succeeded, {} failed, {:.1} MB in {:?}",
        s.total,
        s.succeeded,
        s.failed,
        s.bytes as f64 / 1e6,
        s.duration
    );
    let resumed = &report.results[7];
    println!(
        "  {} was cut off and resumed from byte {} ({} attempts); {} took {} attempts (503, Retry-After)",
        files[7].0, resumed.resumed_from, resumed.attempts, files[5].0, report.results[5].attempts
    );
    check(s.succeeded == files.len(), "a download failed")?;
    check(
        resumed.status == DownloadStatus::Resumed && resumed.resumed_from == 60_000,
        "the cut file was not resumed",
    )?;
    for (name, bytes) in &files {
        check(
            std::fs::read(dir.path().join(name))? == *bytes,
            "a downloaded file differs",
        )?;
    }
    let again = downloader.run(urls).await;
    println!(
        "  a second run skipped {} of {} (the manifest)",
        again.summary.skipped, again.summary.total
    );
    check(
        again.summary.skipped == files.len(),
        "the rerun fetched again",
    )?;
    Ok(())
}

/// Two workers on one Redis queue, under one shared rate, with a
/// checkpoint: the distributed scenario (skipped without Redis).
#[cfg(feature = "redis")]
async fn distributed(spawner: Arc<dyn Spawn>) -> Result<(), BoxError> {
    use smolkit::pool::Checkpoint;
    use smolkit::redis::{RedisCheckpoint, RedisLink, RedisQueue, RedisRateLimiter};

    let Ok(url) = std::env::var("REDIS_URL") else {
        println!("\ndistributed (Redis): skipped, REDIS_URL is not set");
        return Ok(());
    };
    const JOBS: u64 = 300;
    let link = RedisLink::open(url.as_str())?;
    let name = format!("smolkit:tour:{}", std::process::id());
    let producer = RedisQueue::<u64>::builder(link.clone(), name.as_str())
        .with_spawner(spawner.clone())
        .connect()
        .await?;
    let checkpoint = RedisCheckpoint::new(link.clone(), format!("{name}:produced"));
    for start in (0..JOBS).step_by(100) {
        producer
            .push_batch((start..start + 100).collect())
            .await
            .map_err(|e| e.to_string())?;
        checkpoint.save(start + 100).await?;
    }
    producer.close_everywhere().await?;
    let limiter = RedisRateLimiter::new(
        link.clone(),
        format!("{name}:rate"),
        Quota::per_second(3_000)?.with_burst(50)?,
    );
    let mut workers = Vec::new();
    for _ in 0..2 {
        let queue = Arc::new(
            RedisQueue::<u64>::builder(link.clone(), name.as_str())
                .with_spawner(spawner.clone())
                .connect()
                .await?,
        );
        let limiter = limiter.clone();
        let spawner = spawner.clone();
        workers.push(async move {
            let report = Pipeline::from_queue(queue.clone())
                .with_spawner(spawner)
                .map(Stage::new("job").with_concurrency(4), move |job: u64| {
                    let limiter = limiter.clone();
                    async move {
                        limiter.until_ready(1).await.map_err(|e| e.to_string())?;
                        Ok::<_, String>(job * 2)
                    }
                })
                .run(|_| async { Ok::<_, String>(()) })
                .await?;
            Ok::<_, BoxError>((queue.consumer().to_owned(), report.outputs))
        });
    }
    let (a, b) = futures_lite::future::zip(workers.remove(0), workers.remove(0)).await;
    let (a, b) = (a?, b?);
    let stats = producer.stats().await?;
    println!(
        "\ndistributed (Redis): {JOBS} jobs through one stream; {} by {}, {} by {}; checkpoint at {:?}; {} left, {} dead letters",
        a.1,
        a.0,
        b.1,
        b.0,
        checkpoint.load().await?,
        stats.length,
        stats.dead
    );
    check(a.1 + b.1 == JOBS, "a Redis job was lost or done twice")?;
    check(
        stats.length == 0 && stats.dead == 0,
        "the Redis queue is not empty",
    )?;
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("DEL")
        .arg(&name)
        .arg(format!("{name}:dead"))
        .arg(format!("{name}:closed"))
        .arg(format!("{name}:produced"))
        .arg(format!("{name}:rate"))
        .query_async::<()>(&mut conn)
        .await?;
    Ok(())
}

#[cfg(not(feature = "redis"))]
async fn distributed(_: Arc<dyn Spawn>) -> Result<(), BoxError> {
    println!(
        "\ndistributed (Redis): skipped, built without the `redis` feature (--features testing,redis and REDIS_URL)"
    );
    Ok(())
}
