//! The seeds' "queue worker pool" scenario (article 002, §2): N workers
//! pull jobs from one bounded queue; every job ends in a result or an
//! error, the pool stops once the queue is drained.
//!
//! The jobs simulate IO with a timer; every 7th fails and one panics, to
//! show that each failure comes back as that job's error and the workers
//! carry on. Halfway through, the pool grows from 4 to 8 workers.
//!
//! Run: `cargo run --release --example worker_pool [jobs]`

use std::time::{Duration, Instant};

use smolkit::pool::{JobError, WorkerPool};

async fn job(id: u64) -> Result<String, String> {
    // 5–24 ms of "IO".
    smol::Timer::after(Duration::from_millis(5 + id * 7 % 20)).await;
    if id == 13 {
        panic!("job {id} hit a bug");
    }
    if id.is_multiple_of(7) {
        return Err(format!("job {id}: upstream said no"));
    }
    Ok(format!("job {id} done"))
}

fn main() {
    let jobs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    smol::block_on(async {
        let pool = WorkerPool::builder(job)
            .with_workers(4)
            .with_capacity(16)
            .with_name("example-worker")
            .build()
            .expect("valid pool settings");
        let start = Instant::now();
        let mut handles = Vec::new();
        for id in 0..jobs {
            if id == jobs / 2 {
                pool.resize(8);
            }
            // Waits while 16 jobs are queued: the producer is paced by the
            // workers (backpressure).
            handles.push((id, pool.submit(id).await.expect("pool is open")));
        }
        pool.join().await;

        let (mut ok, mut failed, mut panicked) = (0, 0, 0);
        for (id, handle) in handles {
            match handle.await {
                Ok(_) => ok += 1,
                Err(JobError::Panicked(msg)) => {
                    panicked += 1;
                    println!("job {id:>3}: panicked: {msg}");
                }
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        println!("job {id:>3}: {e}");
                    }
                }
            }
        }
        let s = pool.stats();
        println!();
        println!("jobs       {jobs}");
        println!("succeeded  {ok}");
        println!("failed     {failed} (errors returned by the job)");
        println!("panicked   {panicked} (caught; the worker lived on)");
        println!(
            "workers    4 → 8 (resized halfway), {} running now",
            s.workers
        );
        println!("elapsed    {:?}", start.elapsed());
        assert_eq!(ok + failed + panicked, jobs, "every job has a result");
    });
}
