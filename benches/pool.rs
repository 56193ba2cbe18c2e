//! Pool and pipeline benchmarks.
//!
//! - `worker_pool/{2,8}`: 1M no-op items through `WorkerPool::process` on
//!   the crate's Runtime (2 threads), against futures' `buffer_unordered`
//!   with the same concurrency and a tokio mpsc worker pool (2-thread tokio
//!   runtime, workers sharing the receiver behind a mutex, results on a
//!   second mpsc).
//! - `worker_pool_1us/2`: 100k items of ~1 µs of CPU each, 2 workers,
//!   against `buffer_unordered(2)` (one thread) and the tokio mpsc pool.
//! - `pipeline/3_stages`: 100k items through map → filter → map.
//! - Before criterion starts: 10M items through a 3-stage pipeline, with
//!   the process's peak RSS (VmHWM) printed, for the memory target.
//!
//! Run: `cargo bench --bench pool`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use futures_lite::StreamExt;
use smolkit::pool::WorkerPool;
use smolkit::runtime::{Runtime, Spawn};

mod common;
use common::{calibrate, spin};
#[path = "pipeline_common.rs"]
mod pipeline_common;
use pipeline_common::three_stages;

const ITEMS: u64 = 1_000_000;
const PIPELINE_ITEMS: u64 = 100_000;

fn runtime() -> Runtime {
    Runtime::builder()
        .with_threads(2)
        .with_monitor(false)
        .build()
        .unwrap()
}

/// Two rows of `group`: `items` items through `WorkerPool::process` with
/// `workers` workers on `rt`, and through futures' `buffer_unordered` with
/// as many in flight on the calling thread; each item is `work(x)`.
fn pool_and_buffer_unordered<W>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    spawner: &Arc<dyn Spawn>,
    workers: usize,
    items: u64,
    work: W,
) where
    W: Fn(u64) -> u64 + Copy + Send + Sync + 'static,
{
    let pool = WorkerPool::builder(move |x: u64| async move { Ok::<_, ()>(work(x)) })
        .with_workers(workers)
        .with_capacity(1024)
        .with_spawner(spawner.clone())
        .build()
        .unwrap();
    group.bench_with_input(
        BenchmarkId::new("smolkit_process", workers),
        &workers,
        |b, _| {
            b.iter(|| {
                let n = rt.block_on(
                    pool.process(futures_lite::stream::iter(0..items), false)
                        .count(),
                );
                assert_eq!(n as u64, items);
            })
        },
    );
    group.bench_with_input(
        BenchmarkId::new("buffer_unordered", workers),
        &workers,
        |b, &w| {
            use futures_util::StreamExt as Fu;
            b.iter(|| {
                let stream = Fu::map(futures_util::stream::iter(0..items), move |x| async move {
                    Ok::<_, ()>(work(x))
                });
                let n = smol::block_on(Fu::count(Fu::buffer_unordered(stream, w)));
                assert_eq!(n as u64, items);
            })
        },
    );
}

fn worker_pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("worker_pool");
    group.throughput(Throughput::Elements(ITEMS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    let rt = runtime();
    let spawner: Arc<dyn Spawn> = Arc::new(rt.handle());
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();

    for workers in [2usize, 8] {
        pool_and_buffer_unordered(&mut group, &rt, &spawner, workers, ITEMS, |x| x);

        group.bench_with_input(
            BenchmarkId::new("tokio_mpsc_pool", workers),
            &workers,
            |b, &w| {
                b.iter(|| {
                    let n = tokio_rt.block_on(async move {
                        let (job_tx, job_rx) = tokio::sync::mpsc::channel::<u64>(1024);
                        let (res_tx, mut res_rx) =
                            tokio::sync::mpsc::channel::<Result<u64, ()>>(1024);
                        let job_rx = Arc::new(tokio::sync::Mutex::new(job_rx));
                        for _ in 0..w {
                            let (job_rx, res_tx) = (job_rx.clone(), res_tx.clone());
                            tokio::spawn(async move {
                                loop {
                                    let job = job_rx.lock().await.recv().await;
                                    match job {
                                        Some(x) => {
                                            if res_tx.send(Ok(x)).await.is_err() {
                                                return;
                                            }
                                        }
                                        None => return,
                                    }
                                }
                            });
                        }
                        drop(res_tx);
                        tokio::spawn(async move {
                            for x in 0..ITEMS {
                                job_tx.send(x).await.unwrap();
                            }
                        });
                        let mut n = 0u64;
                        while res_rx.recv().await.is_some() {
                            n += 1;
                        }
                        n
                    });
                    assert_eq!(n, ITEMS);
                })
            },
        );
    }
    group.finish();
}

fn pipeline(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(PIPELINE_ITEMS));
    group.sample_size(10);
    let rt = runtime();
    let spawner: Arc<dyn Spawn> = Arc::new(rt.handle());
    group.bench_function("3_stages", |b| {
        b.iter(|| {
            assert_eq!(
                smol::block_on(three_stages(spawner.clone(), PIPELINE_ITEMS)),
                PIPELINE_ITEMS / 2
            )
        })
    });
    group.finish();
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn memory_run() {
    let rt = runtime();
    let items = 10_000_000u64;
    let start = Instant::now();
    let out = smol::block_on(three_stages(Arc::new(rt.handle()), items));
    let elapsed = start.elapsed();
    println!(
        "pipeline_memory: {items} items ({out} out) in {elapsed:.2?} = {:.2} M items/s, peak RSS {:.1} MiB",
        items as f64 / elapsed.as_secs_f64() / 1e6,
        peak_rss_mib().unwrap_or(f64::NAN)
    );
}

fn benches(c: &mut Criterion) {
    memory_run();
    worker_pool(c);
    worker_pool_cpu(c);
    pipeline(c);
}

/// 100k items of ~1 µs of CPU each: where a pool's parallelism shows.
fn worker_pool_cpu(c: &mut Criterion) {
    const CPU_ITEMS: u64 = 100_000;
    let rounds = calibrate(Duration::from_micros(1));
    let mut group = c.benchmark_group("worker_pool_1us");
    group.throughput(Throughput::Elements(CPU_ITEMS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    let rt = runtime();
    let spawner: Arc<dyn Spawn> = Arc::new(rt.handle());
    pool_and_buffer_unordered(&mut group, &rt, &spawner, 2, CPU_ITEMS, move |x| {
        spin(rounds) ^ x
    });
    group.finish();
}

criterion_group!(group, benches);
criterion_main!(group);
