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
//! - at the end: what the server saw, the client's and the bus's counters,
//!   and a graceful shutdown.
//!
//! Run: `cargo run --release --features testing --example tour`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use smolkit::events::Bus;
use smolkit::http::{ApiClient, HyperClient};
use smolkit::limit::{Quota, RateLimiter};
use smolkit::pool::{Pipeline, Stage};
use smolkit::resilience::{Backoff, CircuitBreaker, Retry};
use smolkit::runtime::{Runtime, Spawn};
use smolkit::testing::ChaosServer;

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
            .with_spawner(spawner.clone())
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
        assert_eq!(accounted, ORDERS, "an order was lost");
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    let tasks = rt.tasks().len();
    let report = rt.shutdown(Duration::from_secs(2));
    println!(
        "runtime: {} tasks alive before shutdown (server and pooled connections), drained: {}; done in {:?}",
        tasks,
        report.drained,
        started.elapsed()
    );
    Ok(())
}
