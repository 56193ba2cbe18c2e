//! Event fan-out: 100k events to 1, 4 and 16 subscribers, each consuming
//! on its own task, against async-broadcast and tokio's broadcast.
//!
//! smolkit's bus and async-broadcast run on a 2-thread smol executor with
//! waiting (lossless) senders; tokio's broadcast runs on a 2-thread tokio
//! runtime and cannot wait for slow receivers, so its receivers may lag
//! (it is counted as done when the sender finishes and every receiver has
//! drained what it still holds).
//!
//! `bus_fanout_on_runtime`: single `emit` and async-broadcast again, with
//! the emitter and the subscribers all tasks on one 2-thread smolkit
//! `Runtime`, beside tokio's broadcast on its 2-thread runtime.
//!
//! Run: `cargo bench --bench events`

use std::sync::Arc;
use std::thread;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_lite::StreamExt;
use smolkit::events::{Bus, Overflow, SubscribeOptions};

const EVENTS: u64 = 100_000;
const CAPACITY: usize = 1024;

/// `EVENTS` events to `k` subscribers, each counting on its own task of
/// `ex`: one `emit` per event (`batch` 1) or `emit_many` of `batch`.
fn bus_fan_out(ex: &smol::Executor<'static>, k: usize, batch: u64) {
    let bus = Bus::<u64>::builder()
        .with_capacity(CAPACITY)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..k)
        .map(|_| {
            let sub = bus.subscribe("ticks.#").unwrap();
            ex.spawn(sub.count())
        })
        .collect();
    smol::block_on(ex.run(async {
        for start in (0..EVENTS).step_by(batch as usize) {
            if batch == 1 {
                bus.emit("ticks.eu", start).await.unwrap();
            } else {
                bus.emit_many("ticks.eu", start..(start + batch).min(EVENTS))
                    .await
                    .unwrap();
            }
        }
        bus.shutdown().await;
        drop(bus);
        for t in tasks {
            assert_eq!(t.await as u64, EVENTS);
        }
    }));
}

/// `EVENTS` single `emit`s (or `Publisher::publish`es) to `k`
/// subscriptions with `overflow`, the emitter and each subscriber a task
/// on `rt`; a lossless bus delivers every event.
fn bus_fan_out_on(rt: &smolkit::runtime::Runtime, k: usize, overflow: Overflow, publisher: bool) {
    let bus = Bus::<u64>::builder()
        .with_capacity(CAPACITY)
        .build()
        .unwrap();
    let opts = SubscribeOptions::new().with_overflow(overflow);
    let tasks: Vec<_> = (0..k)
        .map(|_| rt.spawn(bus.subscribe_with("ticks.#", opts.clone()).unwrap().count()))
        .collect();
    let emitter = rt.spawn(async move {
        if publisher {
            let mut p = bus.publisher("ticks.eu").unwrap();
            for i in 0..EVENTS {
                p.publish(i).await.unwrap();
            }
        } else {
            for i in 0..EVENTS {
                bus.emit("ticks.eu", i).await.unwrap();
            }
        }
        bus.shutdown().await;
    });
    rt.block_on(async {
        emitter.await.unwrap();
        for t in tasks {
            let got = t.await.unwrap() as u64;
            if overflow == Overflow::Wait {
                assert_eq!(got, EVENTS);
            } else {
                assert!(got <= EVENTS);
            }
        }
    });
}

/// The single-`emit` row and async-broadcast with every task (emitter and
/// subscribers) on one 2-thread smolkit `Runtime`: a wake-up from the
/// emitter's poll goes to the emitter's worker (LIFO slot, local queue).
fn fanout_on_runtime(c: &mut Criterion) {
    let mut group = c.benchmark_group("bus_fanout_on_runtime");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10);
    let rt = smolkit::runtime::Runtime::builder()
        .with_threads(2)
        .build()
        .unwrap();
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();

    for subs in [1usize, 4, 16] {
        group.bench_with_input(BenchmarkId::new("smolkit_bus", subs), &subs, |b, &k| {
            b.iter(|| bus_fan_out_on(&rt, k, Overflow::Wait, false))
        });
        // The same through a `Publisher` (the topic looked up once).
        group.bench_with_input(
            BenchmarkId::new("smolkit_publisher", subs),
            &subs,
            |b, &k| b.iter(|| bus_fan_out_on(&rt, k, Overflow::Wait, true)),
        );
        group.bench_with_input(BenchmarkId::new("async_broadcast", subs), &subs, |b, &k| {
            b.iter(|| {
                let (tx, rx) = async_broadcast::broadcast::<u64>(CAPACITY);
                let tasks: Vec<_> = (0..k).map(|_| rt.spawn(rx.clone().count())).collect();
                drop(rx);
                let emitter = rt.spawn(async move {
                    for i in 0..EVENTS {
                        tx.broadcast(i).await.unwrap();
                    }
                });
                rt.block_on(async {
                    emitter.await.unwrap();
                    for t in tasks {
                        assert_eq!(t.await.unwrap() as u64, EVENTS);
                    }
                });
            })
        });
        // The bus lossy too (each subscription drops its oldest event
        // when full, as tokio's receivers lag), beside tokio's broadcast.
        group.bench_with_input(
            BenchmarkId::new("smolkit_bus_drop_oldest", subs),
            &subs,
            |b, &k| b.iter(|| bus_fan_out_on(&rt, k, Overflow::DropOldest, false)),
        );
        // The lossy peer on its own stack (a 2-thread tokio runtime), as
        // the bus runs on its own.
        group.bench_with_input(
            BenchmarkId::new("tokio_broadcast_on_tokio", subs),
            &subs,
            |b, &k| b.iter(|| tokio_broadcast_fan_out(&tokio_rt, k)),
        );
    }
    group.finish();
}

/// `EVENTS` events to `k` subscribers of tokio's (lossy) broadcast, each
/// counting on its own task of `rt`; the sender yields every 256 sends.
fn tokio_broadcast_fan_out(rt: &tokio::runtime::Runtime, k: usize) {
    rt.block_on(async {
        let (tx, _) = tokio::sync::broadcast::channel::<u64>(CAPACITY);
        let tasks: Vec<_> = (0..k)
            .map(|_| {
                let mut rx = tx.subscribe();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    loop {
                        match rx.recv().await {
                            Ok(_) => n += 1,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return n,
                        }
                    }
                })
            })
            .collect();
        for i in 0..EVENTS {
            tx.send(i).unwrap();
            if i % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        for t in tasks {
            t.await.unwrap();
        }
    })
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("bus_fanout");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10);

    let ex = Arc::new(smol::Executor::<'static>::new());
    let (stop, shutdown) = async_channel::unbounded::<()>();
    for _ in 0..2 {
        let (ex, shutdown) = (ex.clone(), shutdown.clone());
        thread::spawn(move || smol::block_on(ex.run(shutdown.recv())));
    }
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();

    for subs in [1usize, 4, 16] {
        group.bench_with_input(BenchmarkId::new("smolkit_bus", subs), &subs, |b, &k| {
            b.iter(|| bus_fan_out(&ex, k, 1))
        });
        group.bench_with_input(
            BenchmarkId::new("smolkit_bus_emit_many_64", subs),
            &subs,
            |b, &k| b.iter(|| bus_fan_out(&ex, k, 64)),
        );

        group.bench_with_input(BenchmarkId::new("async_broadcast", subs), &subs, |b, &k| {
            b.iter(|| {
                let (tx, rx) = async_broadcast::broadcast::<u64>(CAPACITY);
                let tasks: Vec<_> = (0..k).map(|_| ex.spawn(rx.clone().count())).collect();
                drop(rx);
                smol::block_on(ex.run(async {
                    for i in 0..EVENTS {
                        tx.broadcast(i).await.unwrap();
                    }
                    drop(tx);
                    for t in tasks {
                        assert_eq!(t.await as u64, EVENTS);
                    }
                }));
            })
        });

        group.bench_with_input(BenchmarkId::new("tokio_broadcast", subs), &subs, |b, &k| {
            b.iter(|| tokio_broadcast_fan_out(&tokio_rt, k))
        });
    }
    group.finish();
    drop(stop);
}

criterion_group!(benches, fanout, fanout_on_runtime);
criterion_main!(benches);
