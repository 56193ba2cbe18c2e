//! Runtime benchmarks: spawn + join of 100k tiny tasks and a ping-pong
//! between two tasks, on smolkit's `Runtime` (monitor on and off, native
//! spawn and through `dyn Spawn`), `smol::Executor` and tokio's
//! multi-thread runtime, all with 2 worker threads; and CPU offload: 8
//! jobs of ~6 ms of CPU on smolkit's `CpuPool`, the `blocking` pool, tokio's
//! `spawn_blocking` and rayon, beside the same 8 run one after another.
//!
//! Run: `cargo bench --bench runtime`

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

mod common;
use common::{calibrate, spin};
use smolkit::runtime::{Runtime, Spawn, SpawnExt};

const TASKS: u64 = 100_000;
const ROUND_TRIPS: u64 = 10_000;
const THREADS: usize = 2;

/// A `smol::Executor` run by `THREADS` threads until dropped.
struct SmolPool {
    ex: Arc<smol::Executor<'static>>,
    stop: Option<async_channel::Sender<()>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl SmolPool {
    fn new() -> Self {
        let ex = Arc::new(smol::Executor::new());
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let threads = (0..THREADS)
            .map(|_| {
                let (ex, stopped) = (ex.clone(), stopped.clone());
                thread::spawn(move || {
                    let _ = async_io::block_on(ex.run(stopped.recv()));
                })
            })
            .collect();
        SmolPool {
            ex,
            stop: Some(stop),
            threads,
        }
    }
}

impl Drop for SmolPool {
    fn drop(&mut self) {
        drop(self.stop.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

async fn ping_pong_body(spawn: impl Fn(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>)) {
    let (ping_tx, ping_rx) = async_channel::bounded::<u64>(1);
    let (pong_tx, pong_rx) = async_channel::bounded::<u64>(1);
    let (done_tx, done_rx) = async_channel::bounded::<()>(1);
    spawn(Box::pin(async move {
        while let Ok(v) = ping_rx.recv().await {
            if pong_tx.send(v).await.is_err() {
                break;
            }
        }
    }));
    spawn(Box::pin(async move {
        for i in 0..ROUND_TRIPS {
            ping_tx.send(i).await.unwrap();
            pong_rx.recv().await.unwrap();
        }
        done_tx.send(()).await.unwrap();
    }));
    done_rx.recv().await.unwrap();
}

fn spawn_join(c: &mut Criterion) {
    let mut group = c.benchmark_group("spawn_join_100k");
    group.throughput(Throughput::Elements(TASKS));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));

    for monitor in [true, false] {
        let rt = Runtime::builder()
            .with_threads(THREADS)
            .with_monitor(monitor)
            .build()
            .unwrap();
        let id = if monitor {
            "smolkit_runtime_monitor_on"
        } else {
            "smolkit_runtime_monitor_off"
        };
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let handles: Vec<_> = (0..TASKS).map(|i| rt.spawn(async move { i })).collect();
                    let mut sum = 0;
                    for h in handles {
                        sum += h.await.unwrap();
                    }
                    sum
                })
            })
        });
    }

    {
        let rt = Runtime::builder().with_threads(THREADS).build().unwrap();
        let spawner: Arc<dyn Spawn> = Arc::new(rt.handle());
        group.bench_function(
            BenchmarkId::from_parameter("smolkit_runtime_dyn_spawn"),
            |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let handles: Vec<_> = (0..TASKS)
                            .map(|i| spawner.spawn(async move { i }))
                            .collect();
                        let mut sum = 0;
                        for h in handles {
                            sum += h.await.unwrap();
                        }
                        sum
                    })
                })
            },
        );
    }

    {
        let pool = SmolPool::new();
        group.bench_function(BenchmarkId::from_parameter("smol_executor"), |b| {
            b.iter(|| {
                async_io::block_on(async {
                    let handles: Vec<_> = (0..TASKS)
                        .map(|i| smol::Executor::spawn(&pool.ex, async move { i }))
                        .collect();
                    let mut sum = 0;
                    for h in handles {
                        sum += h.await;
                    }
                    sum
                })
            })
        });
    }

    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .build()
            .unwrap();
        group.bench_function(BenchmarkId::from_parameter("tokio_multi_thread"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let handles: Vec<_> =
                        (0..TASKS).map(|i| tokio::spawn(async move { i })).collect();
                    let mut sum = 0;
                    for h in handles {
                        sum += h.await.unwrap();
                    }
                    sum
                })
            })
        });
    }
    group.finish();
}

fn ping_pong(c: &mut Criterion) {
    let mut group = c.benchmark_group("ping_pong_10k");
    group.throughput(Throughput::Elements(ROUND_TRIPS));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));

    for monitor in [true, false] {
        let rt = Runtime::builder()
            .with_threads(THREADS)
            .with_monitor(monitor)
            .build()
            .unwrap();
        let id = if monitor {
            "smolkit_runtime_monitor_on"
        } else {
            "smolkit_runtime_monitor_off"
        };
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| rt.block_on(ping_pong_body(|f| rt.spawn(f).detach())))
        });
    }
    {
        let pool = SmolPool::new();
        group.bench_function(BenchmarkId::from_parameter("smol_executor"), |b| {
            b.iter(|| {
                async_io::block_on(ping_pong_body(|f| {
                    smol::Executor::spawn(&pool.ex, f).detach()
                }))
            })
        });
    }
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .build()
            .unwrap();
        group.bench_function(BenchmarkId::from_parameter("tokio_multi_thread"), |b| {
            b.iter(|| {
                rt.block_on(ping_pong_body(|f| {
                    tokio::spawn(f);
                }))
            })
        });
    }
    group.finish();
}

const CPU_JOBS: usize = 8;

fn cpu_offload(c: &mut Criterion) {
    let rounds = calibrate(Duration::from_millis(6));
    let mut group = c.benchmark_group("cpu_offload_8x6ms");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function(BenchmarkId::from_parameter("serial"), |b| {
        b.iter(|| {
            (0..CPU_JOBS)
                .map(|_| spin(rounds))
                .fold(0, u64::wrapping_add)
        })
    });
    {
        let pool = smolkit::runtime::offload::CpuPool::new(THREADS.try_into().unwrap());
        group.bench_function(BenchmarkId::from_parameter("smolkit_cpu_pool"), |b| {
            b.iter(|| {
                async_io::block_on(async {
                    // `run` queues when first polled: join them all.
                    let jobs = (0..CPU_JOBS).map(|_| pool.run(move || spin(rounds)));
                    futures_util::future::join_all(jobs)
                        .await
                        .into_iter()
                        .fold(0u64, |sum, r| sum.wrapping_add(r.unwrap()))
                })
            })
        });
    }
    group.bench_function(BenchmarkId::from_parameter("blocking_unblock"), |b| {
        b.iter(|| {
            async_io::block_on(async {
                let jobs: Vec<_> = (0..CPU_JOBS)
                    .map(|_| blocking::unblock(move || spin(rounds)))
                    .collect();
                let mut sum = 0u64;
                for j in jobs {
                    sum = sum.wrapping_add(j.await);
                }
                sum
            })
        })
    });
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .build()
            .unwrap();
        group.bench_function(BenchmarkId::from_parameter("tokio_spawn_blocking"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let jobs: Vec<_> = (0..CPU_JOBS)
                        .map(|_| tokio::task::spawn_blocking(move || spin(rounds)))
                        .collect();
                    let mut sum = 0u64;
                    for j in jobs {
                        sum = sum.wrapping_add(j.await.unwrap());
                    }
                    sum
                })
            })
        });
    }
    {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(THREADS)
            .build()
            .unwrap();
        group.bench_function(BenchmarkId::from_parameter("rayon"), |b| {
            b.iter(|| {
                let (tx, rx) = std::sync::mpsc::channel();
                for _ in 0..CPU_JOBS {
                    let tx = tx.clone();
                    pool.spawn(move || {
                        let _ = tx.send(spin(rounds));
                    });
                }
                drop(tx);
                rx.iter().fold(0, u64::wrapping_add)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, spawn_join, ping_pong, cpu_offload);
criterion_main!(benches);
