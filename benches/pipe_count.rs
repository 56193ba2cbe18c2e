//! The 3-stage pipeline of `benches/pool.rs` (map ×2 → filter → map) as
//! fixed work, for callgrind and for comparing where it runs:
//! `runtime` (stages on a 2-thread `Runtime`, source and sink on the
//! calling thread, as the bench), `inside` (the whole run a task of that
//! `Runtime`), `smol` (stages on a 2-thread `smol::Executor`).
//!
//! Run: `cargo build --release --manifest-path benches/Cargo.toml --example pipe_count`,
//! then `benches/target/release/examples/pipe_count <runtime|inside|smol> [items]`.

use std::sync::Arc;
use std::time::Instant;

use smolkit::pool::{Pipeline, Stage};
use smolkit::runtime::{Runtime, Spawn};

fn three_stages(spawner: Arc<dyn Spawn>, items: u64) -> impl Future<Output = u64> + Send {
    let out = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let o = out.clone();
    async move {
        Pipeline::from_stream(futures_lite::stream::iter(0..items))
            .with_spawner(spawner)
            .with_capacity(256)
            .map(
                Stage::new("double").with_concurrency(2),
                |x: u64| async move { Ok::<_, String>(x * 2) },
            )
            .filter("even", |x: &u64| x.is_multiple_of(4))
            .map("inc", |x: u64| async move { Ok::<_, String>(x + 1) })
            .run(move |_| {
                o.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async { Ok::<_, String>(()) }
            })
            .await
            .unwrap();
        out.load(std::sync::atomic::Ordering::Relaxed)
    }
}

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
        other => {
            eprintln!("unknown mode {other}: runtime|inside|smol");
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
