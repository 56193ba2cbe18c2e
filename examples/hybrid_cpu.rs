//! The seeds' "mixed CPU-bound work" scenario (article 002, §4 and §7).
//!
//! Each item is fetched (simulated IO: a timer), crunched by the seed's
//! `cpu_intensive_task`, and saved (simulated IO again). First sequentially,
//! then on smolkit's `Runtime`: the IO steps overlap as async tasks while
//! the CPU steps go through `offload::cpu`, a pool limited to the cores.
//! Prints both times, the speed-up, and what the runtime's task monitor saw.
//!
//! Run: `cargo run --release --example hybrid_cpu [items]`

use std::hint::black_box;
use std::time::{Duration, Instant};

use smolkit::runtime::{Runtime, offload};

const IO_FETCH: Duration = Duration::from_millis(20);
const IO_SAVE: Duration = Duration::from_millis(10);

/// The seed's CPU-bound function: `sum(i * data for i in range(10_000_000))`.
fn cpu_intensive_task(data: u64) -> u64 {
    let mut result = 0u64;
    for i in 0..10_000_000u64 {
        // black_box keeps the compiler from replacing the loop by its
        // closed form, so the work is really done.
        result = result.wrapping_add(black_box(i).wrapping_mul(data));
    }
    result
}

async fn fetch_data(item: u64) -> u64 {
    async_io::Timer::after(IO_FETCH).await;
    item
}

async fn save_result(result: u64) -> u64 {
    async_io::Timer::after(IO_SAVE).await;
    result
}

fn sequential(items: &[u64]) -> Vec<u64> {
    items
        .iter()
        .map(|&item| {
            let data = async_io::block_on(fetch_data(item));
            let result = cpu_intensive_task(data);
            async_io::block_on(save_result(result))
        })
        .collect()
}

fn hybrid(rt: &Runtime, items: &[u64]) -> Vec<u64> {
    let tasks: Vec<_> = items
        .iter()
        .map(|&item| {
            rt.spawn_named(&format!("item-{item}"), async move {
                let data = fetch_data(item).await;
                let result = offload::cpu(move || cpu_intensive_task(data))
                    .await
                    .expect("cpu_intensive_task does not panic");
                save_result(result).await
            })
        })
        .collect();

    // The seeds' "monitor running tasks", from the runtime's registry.
    let live = rt.tasks();
    println!(
        "  monitor: {} live tasks right after spawning (first: {:?})",
        live.len(),
        live.first().and_then(|t| t.name.as_deref())
    );

    rt.block_on(async {
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            out.push(task.await.expect("task neither panics nor is cancelled"));
        }
        out
    })
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("the argument is the number of items"))
        .unwrap_or(16);
    let items: Vec<u64> = (0..n).collect();
    let rt = Runtime::new().expect("start the runtime");
    println!(
        "{n} items: fetch {IO_FETCH:?} + cpu_intensive_task (10M multiply-adds) + save {IO_SAVE:?}"
    );
    println!(
        "runtime: {} worker threads, cpu limit {}",
        rt.threads(),
        offload::CpuPool::global().limit()
    );

    let start = Instant::now();
    let seq = sequential(&items);
    let sequential_time = start.elapsed();

    let start = Instant::now();
    let hyb = hybrid(&rt, &items);
    let hybrid_time = start.elapsed();

    assert_eq!(seq, hyb, "both ways compute the same results");
    let stats = rt.stats();
    println!("sequential: {:.3} s", sequential_time.as_secs_f64());
    println!("hybrid:     {:.3} s", hybrid_time.as_secs_f64());
    println!(
        "speed-up:   {:.1}x",
        sequential_time.as_secs_f64() / hybrid_time.as_secs_f64()
    );
    println!(
        "tasks: spawned {}, completed {}, panicked {}, cancelled {}, live {}",
        stats.spawned, stats.completed, stats.panicked, stats.cancelled, stats.live
    );
    let report = rt.shutdown(Duration::from_secs(1));
    println!("shutdown: drained = {}", report.drained);
}
