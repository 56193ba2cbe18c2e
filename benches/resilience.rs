//! Resilience overhead: each layer, and the full policy, around a no-op
//! async call that succeeds at once; the retry layer against backon's.
//!
//! Run: `cargo bench --bench resilience`

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use criterion::{Criterion, criterion_group, criterion_main};
use smolkit::limit::{Quota, RateLimiter, Semaphore};
use smolkit::resilience::{CallOutcome, CircuitBreaker, Policy, Retry, timeout};

/// Polls a future that completes without waiting.
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the benchmarked call waited"),
    }
}

async fn noop() -> Result<u64, std::io::Error> {
    Ok(black_box(1))
}

fn layers(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_overhead");

    group.bench_function("bare_call", |b| b.iter(|| ready(noop()).unwrap()));

    group.bench_function("timeout", |b| {
        b.iter(|| {
            ready(timeout(Duration::from_secs(1), noop()))
                .unwrap()
                .unwrap()
        })
    });

    let limiter = RateLimiter::new(
        Quota::per_second(u32::MAX)
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap(),
    );
    group.bench_function("rate_limit", |b| {
        b.iter(|| {
            ready(limiter.until_ready(1)).unwrap();
            ready(noop()).unwrap()
        })
    });

    let sem = Semaphore::new(64);
    group.bench_function("bulkhead", |b| {
        b.iter(|| ready(sem.run(noop)).unwrap().unwrap())
    });

    let breaker = CircuitBreaker::builder().build().unwrap();
    group.bench_function("breaker", |b| {
        b.iter(|| {
            let permit = breaker.try_acquire().unwrap();
            let out = ready(noop()).unwrap();
            permit.record(CallOutcome::Success);
            out
        })
    });

    let retry = Retry::new();
    group.bench_function("retry_smolkit", |b| {
        b.iter(|| ready(retry.run(noop)).unwrap())
    });

    group.bench_function("retry_backon", |b| {
        b.iter(|| {
            ready(
                noop.retry(ExponentialBuilder::default())
                    .sleep(async_io::Timer::after),
            )
            .unwrap()
        })
    });

    let full = Policy::builder()
        .with_total_timeout(Duration::from_secs(10))
        .with_rate_limit(Arc::new(RateLimiter::new(
            Quota::per_second(u32::MAX)
                .unwrap()
                .with_burst(u32::MAX)
                .unwrap(),
        )))
        .with_concurrency_limit(64)
        .with_breaker(CircuitBreaker::builder().build().unwrap())
        .with_retry(Retry::new())
        .with_attempt_timeout(Duration::from_secs(1))
        .build();
    group.bench_function("full_policy", |b| b.iter(|| ready(full.run(noop)).unwrap()));
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
