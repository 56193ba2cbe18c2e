//! A producer and N worker processes sharing one queue on Redis.
//!
//! One command: this process connects to the Redis at `--url` (or
//! `REDIS_URL`, default `redis://127.0.0.1:6379/`), queues `--items` jobs
//! on a stream of its own, closes the queue, and starts `--workers`
//! copies of itself with the `worker` role. Each worker runs a
//! `Pipeline::from_queue` over a `RedisQueue` (its own consumer in the
//! group), does a little CPU work per job, and reports its count; the
//! parent prints the count of each worker and the total, checks that every
//! job was done (a duplicate is possible only if a worker dies holding
//! jobs: at-least-once), and removes its keys.
//!
//! With no Redis reachable it says how to start one and exits with 2.
//!
//! Run: `cargo run --release --features redis --example distributed_workers
//! -- [--workers 3] [--items 20000] [--url redis://127.0.0.1:6379/]`

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smolkit::pool::{Pipeline, Stage};
use smolkit::redis::{RedisLink, RedisQueue};
use smolkit::resilience::Backoff;

type BoxError = Box<dyn std::error::Error>;

struct Args {
    workers: usize,
    items: u64,
    url: String,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        workers: 3,
        items: 20_000,
        url: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into()),
    };
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: `{v}` is not a number"))
        };
        match flag.as_str() {
            "--workers" => args.workers = num(&value)? as usize,
            "--items" => args.items = num(&value)?,
            "--url" => args.url = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("worker") {
        let rest: Vec<String> = argv.skip(1).collect();
        return match (rest.first(), rest.get(1), rest.get(2)) {
            (Some(url), Some(queue), Some(k)) => match smol::block_on(worker(url, queue, k)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("worker {k}: {e}");
                    ExitCode::FAILURE
                }
            },
            _ => {
                eprintln!("usage: distributed_workers worker <url> <queue> <index>");
                ExitCode::from(2)
            }
        };
    }
    let args = match parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "{e}\nusage: distributed_workers [--workers N] [--items N] [--url redis://host:port/]"
            );
            return ExitCode::from(2);
        }
    };
    match smol::block_on(produce_and_wait(&args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("distributed_workers: {e}");
            ExitCode::FAILURE
        }
    }
}

fn link(url: &str) -> Result<RedisLink, BoxError> {
    Ok(RedisLink::builder(url)
        .with_backoff(Backoff::exponential(Duration::from_millis(50)).with_max_times(3))
        .build()?)
}

async fn produce_and_wait(args: &Args) -> Result<ExitCode, BoxError> {
    let name = format!("smolkit:demo:{}", std::process::id());
    let link = link(&args.url)?;
    let queue = match RedisQueue::<u64>::builder(link.clone(), name.as_str())
        .with_capacity(args.items.max(1))
        .connect()
        .await
    {
        Ok(q) => q,
        Err(e) => {
            eprintln!(
                "no Redis at {}: {e}\n\
                 start one with `redis-server --port 6379 --save '' --appendonly no` \
                 (Debian: `apt-get install redis-server`) and run again, \
                 or point --url / REDIS_URL at yours",
                args.url
            );
            return Ok(ExitCode::from(2));
        }
    };
    let started = Instant::now();
    queue
        .push_batch((0..args.items).collect())
        .await
        .map_err(|e| e.to_string())?;
    queue.close_everywhere().await?;
    println!(
        "queued {} jobs on {name} in {:?}; starting {} workers",
        args.items,
        started.elapsed(),
        args.workers
    );
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..args.workers)
        .map(|k| {
            Command::new(&exe)
                .args(["worker", &args.url, &name, &k.to_string()])
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut failed = 0;
    for mut child in children {
        if !child.wait()?.success() {
            failed += 1;
        }
    }
    let client = redis::Client::open(args.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let counts: Vec<(String, u64)> = redis::cmd("HGETALL")
        .arg(format!("{name}:counts"))
        .query_async(&mut conn)
        .await?;
    let mut counts = counts;
    counts.sort();
    let mut total = 0;
    for (worker, n) in &counts {
        println!("  worker {worker}: {n} jobs");
        total += n;
    }
    let stats = queue.stats().await?;
    println!(
        "total: {total} of {} jobs in {:?} ({:.0} jobs/s); queue left: {} entries, {} dead letters",
        args.items,
        started.elapsed(),
        total as f64 / started.elapsed().as_secs_f64(),
        stats.length,
        stats.dead
    );
    redis::cmd("DEL")
        .arg(&name)
        .arg(format!("{name}:dead"))
        .arg(format!("{name}:closed"))
        .arg(format!("{name}:counts"))
        .query_async::<()>(&mut conn)
        .await?;
    if failed > 0 || total < args.items || stats.length != 0 {
        eprintln!(
            "{failed} workers failed; {total} of {} jobs done",
            args.items
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn worker(url: &str, queue: &str, k: &str) -> Result<(), BoxError> {
    let queue = Arc::new(
        RedisQueue::<u64>::builder(link(url)?, queue)
            .connect()
            .await?,
    );
    let report = Pipeline::from_queue(queue.clone())
        .map(
            Stage::new("work").with_concurrency(4),
            |job: u64| async move {
                // A stand-in for real work: a little hashing.
                let mut h = job ^ 0xcbf2_9ce4_8422_2325;
                for _ in 0..10_000 {
                    h = (h ^ (h >> 7)).wrapping_mul(0x0100_0000_01b3);
                }
                Ok::<_, String>(h)
            },
        )
        .run(|_| async { Ok::<_, String>(()) })
        .await?;
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("HSET")
        .arg(format!("{}:counts", queue.name()))
        .arg(k)
        .arg(report.outputs)
        .query_async::<()>(&mut conn)
        .await?;
    println!(
        "worker {k} ({}) done: {} jobs",
        queue.consumer(),
        report.outputs
    );
    Ok(())
}
