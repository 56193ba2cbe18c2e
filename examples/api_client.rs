//! The seeds' "API client with retries" scenario (SCENARIOS.md §2), against
//! the embedded ChaosServer (no internet needed):
//!
//! 1. a flaky endpoint fails twice with 503 and succeeds on the third
//!    attempt, the retries spaced by exponential backoff;
//! 2. a rate-limited endpoint answers 429 with `Retry-After: 1`, and the
//!    client waits that second instead of its own backoff;
//! 3. a POST is not retried (not idempotent) unless the call opts in;
//! 4. a host that keeps failing trips the circuit breaker: calls are then
//!    rejected at once without reaching the server, until the breaker
//!    half-opens, a probe succeeds, and it closes;
//! 5. `batch` sends many GETs under a concurrency limit and returns the
//!    results in input order (the seed's `batch_get`).
//!
//! Run: `cargo run --release --features testing --example api_client`

use std::time::{Duration, Instant};

use smolkit::http::{ApiClient, Error};
use smolkit::resilience::{Backoff, CircuitBreaker, Retry, Window};
use smolkit::testing::ChaosServer;

#[derive(Debug, serde::Deserialize)]
struct Flaky {
    key: String,
    calls: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    smol::block_on(async {
        let server = ChaosServer::start().await?;
        println!("ChaosServer on {}", server.url("/"));

        let api = ApiClient::builder(&server.url("/"))
            .with_header("x-api-key", "demo")
            .with_retry(
                Retry::new().with_max_attempts(4).with_backoff(
                    Backoff::exponential(Duration::from_millis(100))
                        .with_max_delay(Duration::from_secs(2)),
                ),
            )
            .with_timeout(Some(Duration::from_secs(5)))
            .with_concurrency_limit(8)
            .build()?;

        // 1. Retries with backoff.
        let start = Instant::now();
        let r = api
            .get("flaky/orders")
            .query(&[("fail", "2")])
            .send()
            .await?;
        let body: Flaky = r.json()?;
        println!(
            "1. flaky/{}: {} after {} attempts ({} calls seen by the server) in {:?}",
            body.key,
            r.status,
            r.attempts,
            body.calls,
            start.elapsed()
        );

        // 2. Retry-After wins over the backoff.
        let start = Instant::now();
        let r = api
            .get("flaky/limited?fail=1&status=429&retry_after=1")
            .send()
            .await?;
        println!(
            "2. 429 with Retry-After: 1 -> {} after {} attempts in {:?} (waited the server's second)",
            r.status,
            r.attempts,
            start.elapsed()
        );

        // 3. POST is not retried unless the call says so.
        match api
            .post("flaky/payment?fail=1")
            .json_body(&serde_json::json!({"amount": 42}))
            .send()
            .await
        {
            Err(e) => println!("3. POST without opting in: {e}"),
            Ok(r) => println!("3. unexpected success: {}", r.status),
        }
        let r = api
            .post("flaky/payment2?fail=1")
            .json_body(&serde_json::json!({"amount": 42}))
            .header("idempotency-key", "order-7")
            .retry_non_idempotent()
            .send()
            .await?;
        println!(
            "   POST with an idempotency key, opted in: {} after {} attempts",
            r.status, r.attempts
        );

        // 4. The breaker.
        let guarded = ApiClient::builder(&server.url("/"))
            .with_retry(None)
            .with_breaker(
                CircuitBreaker::builder()
                    .with_window(Window::Count(4))
                    .with_min_calls(4)
                    .with_failure_rate(0.5)
                    .with_half_open(1, 2)
                    .with_open_backoff(Backoff::constant(Duration::from_millis(500))),
            )
            .build()?;
        let host = server.addr().to_string();
        let _ = guarded.get("status/200").send().await;
        let changes = guarded
            .breaker(&host)
            .expect("breaker exists after a call")
            .subscribe();
        let seen_before = server.requests().len();
        for i in 1..=8 {
            match guarded.get("status/503").send().await {
                Err(Error::CircuitOpen { retry_after, .. }) => {
                    println!("4. call {i}: rejected at once, next probe in {retry_after:?}")
                }
                Err(e) => println!("4. call {i}: {e}"),
                Ok(r) => println!("4. call {i}: {}", r.status),
            }
        }
        println!(
            "   8 calls, {} reached the server",
            server.requests().len() - seen_before
        );
        smol::Timer::after(Duration::from_millis(550)).await;
        for i in 1..=3 {
            let r = guarded.get("status/200").send().await?;
            println!("   after the open time, call {i}: {}", r.status);
        }
        while let Ok(change) = changes.try_recv() {
            println!("   breaker: {:?} -> {:?}", change.from, change.to);
        }

        // 5. batch_get.
        let paths: Vec<String> = (0..12)
            .map(|i| match i % 4 {
                0 => format!("delay/{}", 40 - i * 3),
                1 => format!("flaky/batch-{i}?fail=1"),
                2 => "status/404".to_owned(),
                _ => "echo".to_owned(),
            })
            .collect();
        let start = Instant::now();
        let results = api.batch(paths.iter().map(|p| api.get(p)), 4).await;
        for (path, result) in paths.iter().zip(&results) {
            match result {
                Ok(r) => println!("5. {path:<16} {} ({} attempts)", r.status, r.attempts),
                Err(e) => println!("5. {path:<16} error: {e}"),
            }
        }
        println!(
            "   12 requests, 4 at a time, in {:?}, results in input order",
            start.elapsed()
        );
        println!("stats: {:?}", api.stats());
        Ok(())
    })
}
