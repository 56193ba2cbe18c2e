//! Limit benchmarks: smolkit's Semaphore against async-lock's and tokio's
//! (uncontended, and contended by 8/64/512 tasks over 2 and 16 permits on a
//! 2-thread smol executor; and each on its own stack: smolkit's on its
//! `Runtime`, tokio's on tokio's), and RateLimiter::check against governor.
//!
//! Run: `cargo bench --bench limit`

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_lite::future::yield_now;
use smolkit::limit::{Quota, RateLimiter, Semaphore};

/// Total acquisitions per contended iteration, split over the tasks.
const CONTENDED_OPS: usize = 51_200;

/// Polls a future that is expected to be ready at once (uncontended).
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("uncontended acquire was pending"),
    }
}

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("semaphore_uncontended");
    group.throughput(Throughput::Elements(1));

    let ours = Semaphore::new(16);
    group.bench_function("smolkit_acquire", |b| {
        b.iter(|| drop(ready(ours.acquire()).unwrap()))
    });
    group.bench_function("smolkit_try_acquire", |b| {
        b.iter(|| drop(ours.try_acquire().unwrap()))
    });

    let al = async_lock::Semaphore::new(16);
    group.bench_function("async_lock_acquire", |b| {
        b.iter(|| drop(ready(al.acquire())))
    });
    group.bench_function("async_lock_try_acquire", |b| {
        b.iter(|| drop(al.try_acquire().unwrap()))
    });

    let tk = tokio::sync::Semaphore::new(16);
    group.bench_function("tokio_acquire", |b| {
        b.iter(|| drop(ready(tk.acquire()).unwrap()))
    });
    group.bench_function("tokio_try_acquire", |b| {
        b.iter(|| drop(tk.try_acquire().unwrap()))
    });
    group.finish();
}

/// A smol executor on 2 threads.
fn executor() -> (
    Arc<smol::Executor<'static>>,
    async_channel::Sender<()>,
    Vec<thread::JoinHandle<()>>,
) {
    let ex = Arc::new(smol::Executor::new());
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let threads = (0..2)
        .map(|_| {
            let (ex, stopped) = (ex.clone(), stopped.clone());
            thread::spawn(move || {
                let _ = async_io::block_on(ex.run(stopped.recv()));
            })
        })
        .collect();
    (ex, stop, threads)
}

fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("semaphore_contended");
    group.throughput(Throughput::Elements(CONTENDED_OPS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    let (ex, stop, threads) = executor();

    for permits in [2usize, 16] {
        for tasks in [8usize, 64, 512] {
            let per_task = CONTENDED_OPS / tasks;
            let param = format!("{tasks}_tasks_{permits}_permits");

            group.bench_function(BenchmarkId::new("smolkit", &param), |b| {
                b.iter(|| {
                    let sem = Arc::new(Semaphore::new(permits));
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let sem = sem.clone();
                            ex.spawn(async move {
                                for _ in 0..per_task {
                                    let g = sem.acquire().await.unwrap();
                                    yield_now().await;
                                    drop(g);
                                }
                            })
                        })
                        .collect();
                    async_io::block_on(async {
                        for h in handles {
                            h.await;
                        }
                    })
                })
            });

            group.bench_function(BenchmarkId::new("async_lock", &param), |b| {
                b.iter(|| {
                    let sem = Arc::new(async_lock::Semaphore::new(permits));
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let sem = sem.clone();
                            ex.spawn(async move {
                                for _ in 0..per_task {
                                    let g = sem.acquire().await;
                                    yield_now().await;
                                    drop(g);
                                }
                            })
                        })
                        .collect();
                    async_io::block_on(async {
                        for h in handles {
                            h.await;
                        }
                    })
                })
            });

            group.bench_function(BenchmarkId::new("tokio", &param), |b| {
                b.iter(|| {
                    let sem = Arc::new(tokio::sync::Semaphore::new(permits));
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let sem = sem.clone();
                            ex.spawn(async move {
                                for _ in 0..per_task {
                                    let g = sem.acquire().await.unwrap();
                                    yield_now().await;
                                    drop(g);
                                }
                            })
                        })
                        .collect();
                    async_io::block_on(async {
                        for h in handles {
                            h.await;
                        }
                    })
                })
            });
        }
    }
    group.finish();
    drop(stop);
    for t in threads {
        let _ = t.join();
    }
}

/// One row of the stack group: `tasks` tasks spawned by `spawn`, each
/// acquiring `per_task` times and holding its permit across `yield`, all
/// driven by `block_on`.
macro_rules! contended_row {
    ($group:expr, $name:literal, $param:expr, $tasks:expr, $per_task:expr, $sem:expr,
     |$bf:ident| $block_on:expr, |$sf:ident| $spawn:expr, $yield:expr) => {
        $group.bench_function(BenchmarkId::new($name, $param), |b| {
            b.iter(|| {
                let sem = Arc::new($sem);
                let $bf = async {
                    let handles: Vec<_> = (0..$tasks)
                        .map(|_| {
                            let sem = sem.clone();
                            let $sf = async move {
                                for _ in 0..$per_task {
                                    let g = sem.acquire().await.unwrap();
                                    $yield.await;
                                    drop(g);
                                }
                            };
                            $spawn
                        })
                        .collect();
                    for h in handles {
                        h.await.unwrap();
                    }
                };
                $block_on
            })
        });
    };
}

/// Each semaphore on its own stack, as a user would run it: smolkit's on
/// smolkit's `Runtime`, tokio's on tokio's multi-thread runtime (both 2
/// worker threads; the yield is each runtime's own).
fn contended_stack(c: &mut Criterion) {
    let mut group = c.benchmark_group("semaphore_contended_stack");
    group.throughput(Throughput::Elements(CONTENDED_OPS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    let rt = smolkit::runtime::Runtime::builder()
        .with_threads(2)
        .build()
        .unwrap();
    let tk = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();

    for (tasks, permits) in [
        (8usize, 2usize),
        (64, 2),
        (512, 2),
        (64, 4),
        (8, 16),
        (64, 16),
        (512, 16),
    ] {
        let per_task = CONTENDED_OPS / tasks;
        let param = format!("{tasks}_tasks_{permits}_permits");
        // The crossed pairs tell the semaphore's share from the runtime's.
        contended_row!(
            group,
            "smolkit_on_runtime",
            &param,
            tasks,
            per_task,
            Semaphore::new(permits),
            |f| rt.block_on(f),
            |f| rt.spawn(f),
            yield_now()
        );
        contended_row!(
            group,
            "tokio_on_runtime",
            &param,
            tasks,
            per_task,
            tokio::sync::Semaphore::new(permits),
            |f| rt.block_on(f),
            |f| rt.spawn(f),
            yield_now()
        );
        contended_row!(
            group,
            "smolkit_on_tokio",
            &param,
            tasks,
            per_task,
            Semaphore::new(permits),
            |f| tk.block_on(f),
            |f| tokio::spawn(f),
            tokio::task::yield_now()
        );
        contended_row!(
            group,
            "tokio_on_tokio",
            &param,
            tasks,
            per_task,
            tokio::sync::Semaphore::new(permits),
            |f| tk.block_on(f),
            |f| tokio::spawn(f),
            tokio::task::yield_now()
        );
    }
    group.finish();
}

fn rate_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limiter_check");
    group.throughput(Throughput::Elements(1));
    // A quota that never runs dry within a benchmark: every check admits.
    let ours = RateLimiter::new(
        Quota::per_second(u32::MAX)
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap(),
    );
    group.bench_function("smolkit", |b| b.iter(|| ours.check(1).unwrap()));
    // The same on the coarse clock (one atomic load per read).
    let coarse = RateLimiter::with_clock(
        Quota::per_second(u32::MAX)
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap(),
        std::sync::Arc::new(smolkit::runtime::CoarseClock::global()),
    );
    group.bench_function("smolkit_coarse_clock", |b| {
        b.iter(|| coarse.check(1).unwrap())
    });

    let gov = governor::RateLimiter::direct(
        governor::Quota::per_second(NonZeroU32::MAX).allow_burst(NonZeroU32::MAX),
    );
    group.bench_function("governor", |b| b.iter(|| gov.check().unwrap()));
    // governor on std's `Instant`, the clock smolkit's SystemClock reads.
    let gov_std = governor::RateLimiter::direct_with_clock(
        governor::Quota::per_second(NonZeroU32::MAX).allow_burst(NonZeroU32::MAX),
        governor::clock::MonotonicClock,
    );
    group.bench_function("governor_std_clock", |b| {
        b.iter(|| gov_std.check().unwrap())
    });

    // And the rejecting path: an exhausted limiter.
    let ours_dry = RateLimiter::new(Quota::new(1, Duration::from_secs(3600)).unwrap());
    let _ = ours_dry.check(1);
    group.bench_function("smolkit_rejecting", |b| {
        b.iter(|| ours_dry.check(1).unwrap_err())
    });
    let coarse_dry = RateLimiter::with_clock(
        Quota::new(1, Duration::from_secs(3600)).unwrap(),
        std::sync::Arc::new(smolkit::runtime::CoarseClock::global()),
    );
    let _ = coarse_dry.check(1);
    group.bench_function("smolkit_coarse_clock_rejecting", |b| {
        b.iter(|| coarse_dry.check(1).unwrap_err())
    });
    let gov_dry = governor::RateLimiter::direct(governor::Quota::per_hour(NonZeroU32::MIN));
    let _ = gov_dry.check();
    group.bench_function("governor_rejecting", |b| {
        b.iter(|| gov_dry.check().unwrap_err())
    });
    group.finish();
}

criterion_group!(benches, uncontended, contended, contended_stack, rate_check);
criterion_main!(benches);
