//! The 3-stage pipeline of `benches/pool.rs` (map ×2 → filter → map) as
//! fixed work, for callgrind and for comparing where it runs:
//! `runtime` (stages on a 2-thread `Runtime`, source and sink on the
//! calling thread, as the bench), `inside` (the whole run a task of that
//! `Runtime`), `smol` (stages on a 2-thread `smol::Executor`); or `pool`:
//! the pool bench's no-op row (`WorkerPool::process`, 2 workers).
//!
//! Run: `cargo build --release --manifest-path benches/Cargo.toml --example pipe_count`,
//! then `benches/target/release/examples/pipe_count <runtime|inside|smol|pool> [items]`.

use std::sync::Arc;
use std::time::Instant;

use smolkit::pool::WorkerPool;
use smolkit::runtime::Runtime;

#[path = "pipeline_common.rs"]
mod pipeline_common;
use pipeline_common::three_stages;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("runtime", String::as_str);
    let items: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let rt = Runtime::builder()
        .with_threads(2)
        .with_monitor(false)
        .build()
        .expect("a runtime");
    let start = Instant::now();
    let out = match mode {
        "runtime" => smol::block_on(three_stages(Arc::new(rt.handle()), items)),
        "inside" => {
            let task = rt.spawn(three_stages(Arc::new(rt.handle()), items));
            rt.block_on(task).expect("no panic")
        }
        "smol" => {
            let ex = Arc::new(smol::Executor::<'static>::new());
            let (stop, shutdown) = async_channel::unbounded::<()>();
            for _ in 0..2 {
                let (ex, shutdown) = (ex.clone(), shutdown.clone());
                std::thread::spawn(move || smol::block_on(ex.run(shutdown.recv())));
            }
            let out = smol::block_on(three_stages(ex, items));
            drop(stop);
            out
        }
        // Not the pipeline: the pool bench's no-op row, 2 workers.
        "pool" => {
            let pool = WorkerPool::builder(|x: u64| async move { Ok::<_, ()>(x) })
                .with_workers(2)
                .with_capacity(1024)
                .with_spawner(Arc::new(rt.handle()))
                .build()
                .expect("a pool");
            let n = rt.block_on(futures_lite::StreamExt::count(
                pool.process(futures_lite::stream::iter(0..items), false),
            ));
            n as u64 / 2
        }
        other => {
            eprintln!("unknown mode {other}: runtime|inside|smol|pool");
            std::process::exit(2);
        }
    };
    assert_eq!(out, items / 2);
    let el = start.elapsed();
    println!(
        "{mode}: {items} items in {el:.2?} = {:.2} M items/s",
        items as f64 / el.as_secs_f64() / 1e6
    );
}
