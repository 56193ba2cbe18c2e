//! The `bus_fanout` rows of `benches/events.rs` (smol's 2-thread executor,
//! a lossless bus or async-broadcast, capacity 1024) as fixed work for
//! callgrind, where the wall-clock rows swing more than the gap between
//! them: 5 × 100k events to K subscribers. With `runtime` last, the
//! `bus_fanout_on_runtime` rows instead: the emitter and the subscribers
//! tasks of one 2-thread smolkit `Runtime`.
//!
//! Run: `cargo build --release --manifest-path benches/Cargo.toml --example bus_count`,
//! then `valgrind --tool=callgrind benches/target/release/examples/bus_count <smolkit|async-broadcast> <K> [runtime]`.

use std::sync::Arc;
use std::thread;

use futures_lite::StreamExt;
use smolkit::events::Bus;

const ROUNDS: usize = 5;
const EVENTS: u64 = 100_000;
const CAPACITY: usize = 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(which), Some(k)) = (args.get(1), args.get(2).and_then(|k| k.parse().ok())) else {
        eprintln!(
            "usage: bus_count <smolkit|async-broadcast> <subscribers> [runtime], or smolkit-publisher <subscribers> runtime"
        );
        std::process::exit(2);
    };
    if args.get(3).map(String::as_str) == Some("runtime") {
        on_runtime(which, k);
        return;
    }
    let ex = Arc::new(smol::Executor::<'static>::new());
    let (stop, shutdown) = async_channel::unbounded::<()>();
    for _ in 0..2 {
        let (ex, shutdown) = (ex.clone(), shutdown.clone());
        thread::spawn(move || smol::block_on(ex.run(shutdown.recv())));
    }
    let started = std::time::Instant::now();
    for _ in 0..ROUNDS {
        match which.as_str() {
            "smolkit" => smolkit(&ex, k),
            "async-broadcast" => broadcast(&ex, k),
            other => {
                eprintln!("unknown {other}: smolkit|async-broadcast");
                std::process::exit(2);
            }
        }
    }
    eprintln!(
        "{which} {k}: {:.1} ms per 100k events",
        started.elapsed().as_secs_f64() * 1e3 / ROUNDS as f64
    );
    drop(stop);
}

fn smolkit(ex: &smol::Executor<'static>, k: usize) {
    let bus = Bus::<u64>::builder()
        .with_capacity(CAPACITY)
        .build()
        .expect("a bus");
    let tasks: Vec<_> = (0..k)
        .map(|_| ex.spawn(bus.subscribe("ticks.#").expect("a pattern").count()))
        .collect();
    smol::block_on(ex.run(async {
        for i in 0..EVENTS {
            bus.emit("ticks.eu", i).await.expect("open");
        }
        bus.shutdown().await;
        drop(bus);
        for t in tasks {
            assert_eq!(t.await as u64, EVENTS);
        }
    }));
}

fn broadcast(ex: &smol::Executor<'static>, k: usize) {
    let (tx, rx) = async_broadcast::broadcast::<u64>(CAPACITY);
    let tasks: Vec<_> = (0..k).map(|_| ex.spawn(rx.clone().count())).collect();
    drop(rx);
    smol::block_on(ex.run(async {
        for i in 0..EVENTS {
            tx.broadcast(i).await.expect("open");
        }
        drop(tx);
        for t in tasks {
            assert_eq!(t.await as u64, EVENTS);
        }
    }));
}

/// The `bus_fanout_on_runtime` rows: every task on one 2-thread `Runtime`.
fn on_runtime(which: &str, k: usize) {
    let rt = smolkit::runtime::Runtime::builder()
        .with_threads(2)
        .build()
        .expect("a runtime");
    let started = std::time::Instant::now();
    for _ in 0..ROUNDS {
        match which {
            "smolkit" | "smolkit-publisher" => {
                let bus = Bus::<u64>::builder()
                    .with_capacity(CAPACITY)
                    .build()
                    .expect("a bus");
                let tasks: Vec<_> = (0..k)
                    .map(|_| rt.spawn(bus.subscribe("ticks.#").expect("a pattern").count()))
                    .collect();
                let publisher = which == "smolkit-publisher";
                let emitter = rt.spawn(async move {
                    if publisher {
                        let mut p = bus.publisher("ticks.eu").expect("a topic");
                        for i in 0..EVENTS {
                            p.publish(i).await.expect("open");
                        }
                    } else {
                        for i in 0..EVENTS {
                            bus.emit("ticks.eu", i).await.expect("open");
                        }
                    }
                    bus.shutdown().await;
                });
                rt.block_on(async {
                    emitter.await.expect("the emitter");
                    for t in tasks {
                        assert_eq!(t.await.expect("a subscriber") as u64, EVENTS);
                    }
                });
            }
            "async-broadcast" => {
                let (tx, rx) = async_broadcast::broadcast::<u64>(CAPACITY);
                let tasks: Vec<_> = (0..k).map(|_| rt.spawn(rx.clone().count())).collect();
                drop(rx);
                let emitter = rt.spawn(async move {
                    for i in 0..EVENTS {
                        tx.broadcast(i).await.expect("open");
                    }
                });
                rt.block_on(async {
                    emitter.await.expect("the emitter");
                    for t in tasks {
                        assert_eq!(t.await.expect("a subscriber") as u64, EVENTS);
                    }
                });
            }
            other => {
                eprintln!("unknown {other}: smolkit|async-broadcast");
                std::process::exit(2);
            }
        }
    }
    eprintln!(
        "{which} {k} on the runtime: {:.1} ms per 100k events",
        started.elapsed().as_secs_f64() * 1e3 / ROUNDS as f64
    );
}
