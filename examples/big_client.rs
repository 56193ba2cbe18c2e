//! With `chaos_serve`, the cross-process reproduction of the big-body
//! stall (BENCHMARKS.md, "The big-body stall", now mended): three tasks on a two-thread
//! smolkit `Runtime` loop `GET` on one URL (a 256 MiB `/bytes` route)
//! through one `HyperClient`, and a watchdog reports (exit 2) when one of
//! them received no byte for 10 s. Watch the sockets with `ss -tn` meanwhile.
//!
//! Run: `cargo run --release --features testing --example chaos_serve`,
//! then `cargo run --release --features testing --example big_client --
//! <url>bytes/268435456 [seconds]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use smolkit::http::{Body, Client, HyperClient};
use smolkit::runtime::Runtime;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: big_client <url> [seconds]")?;
    let seconds: u64 = args.next().map_or(Ok(300), |s| s.parse())?;
    let rt = Runtime::builder().with_threads(2).build()?;
    let client = HyperClient::builder()
        .with_max_connections_per_host(3)
        .build()?;
    let counters: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    for i in 0..3 {
        let (client, url, counters) = (client.clone(), url.clone(), counters.clone());
        rt.spawn_named("big", async move {
            loop {
                let request = http::Request::get(&url).body(Body::empty())?;
                let mut body = client.send(request).await?.into_body();
                while let Some(chunk) = body.next().await {
                    counters[i].fetch_add(chunk?.len() as u64, Ordering::Relaxed);
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
        .detach();
    }
    let start = Instant::now();
    let (mut last, mut since) = ([0u64; 3], [Instant::now(); 3]);
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..3 {
            let now = counters[i].load(Ordering::Relaxed);
            if now != last[i] {
                (last[i], since[i]) = (now, Instant::now());
            }
            if since[i].elapsed() > Duration::from_secs(10) {
                println!(
                    "STALL of task {i} after {:?}: {:?} MiB",
                    start.elapsed(),
                    last.map(|b| b >> 20)
                );
                std::process::exit(2);
            }
        }
    }
    println!(
        "OK: {:?} MiB in {:?}",
        last.map(|b| b >> 20),
        start.elapsed()
    );
    Ok(())
}
