//! `RedisQueue` → `Pipeline` against the physical limit measured in the
//! same run: a raw redis-rs loop doing the same XREADGROUP / XACK / XDEL
//! with pipelining, on one local `redis-server` (started here on a free
//! loopback port, no persistence).
//!
//! Consume rows: `ITEMS` entries are queued first (not timed), then the
//! clock runs until every one is consumed and acked (the queue is closed
//! beforehand, so the consumers end when it is drained):
//! - raw: `XREADGROUP COUNT 256`, then one pipelined `XACK` + `XDEL` of
//!   the batch, per consumer task;
//! - smolkit: `Pipeline::from_queue(RedisQueue)` with a no-op stage and
//!   sink, per consumer task (each its own `RedisQueue`, that is its own
//!   consumer in the group); "2 processes" re-executes this binary twice
//!   (`--role consume`), one pipeline each, timed from spawn to exit.
//!
//! Push rows: `ITEMS` pushes of one item each, one at a time and from 16
//! tasks at once, and `push_batch` of them all, beside raw `XADD`s
//! pipelined 256 at a time.
//!
//! Each row is the median of `RUNS` runs.
//!
//! Run: `cargo bench --manifest-path benches/Cargo.toml --bench redis`

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smolkit::pool::{Pipeline, Queue, Stage};
use smolkit::redis::{RedisLink, RedisQueue};

const ITEMS: u64 = 100_000;
const RUNS: usize = 3;
const STREAM: &str = "bench";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--role") {
        // --role consume <url> <prefetch>
        smol::block_on(smolkit_consumer(&args[3], args[4].parse().unwrap()));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let Some(server) = Server::start() else {
        println!(
            "redis-server is not installed: nothing to measure (apt-get install redis-server)"
        );
        return;
    };
    let url = server.url();
    println!(
        "redis-server {} on {url}; {ITEMS} items per run, median of {RUNS}",
        version()
    );
    println!("\n| consume | items/s |\n| --- | --- |");
    for (name, f) in [
        ("raw redis-rs, 1 task (pipelined)", Consume::Raw(1)),
        ("raw redis-rs, 4 tasks (pipelined)", Consume::Raw(4)),
        (
            "smolkit RedisQueue → Pipeline, 1 task",
            Consume::Smolkit(1, 256),
        ),
        (
            "smolkit RedisQueue → Pipeline, 4 tasks",
            Consume::Smolkit(4, 256),
        ),
        (
            "smolkit RedisQueue → Pipeline, 2 processes",
            Consume::Processes(2, 256),
        ),
        (
            "smolkit, prefetch 16 (fixed reads of 16), 1 task",
            Consume::Smolkit(1, 16),
        ),
        ("smolkit, prefetch 16, 4 tasks", Consume::Smolkit(4, 16)),
        (
            "smolkit, prefetch 16, 2 processes",
            Consume::Processes(2, 16),
        ),
    ] {
        let rate = median((0..RUNS).map(|_| consume_run(&url, f)).collect());
        println!("| {name} | {:.0} |", rate);
    }
    println!("\n| push | items/s |\n| --- | --- |");
    for (name, f) in [
        ("raw redis-rs XADD, pipelined 256 at a time", Push::Raw),
        ("smolkit RedisQueue::push, one at a time", Push::Smolkit(1)),
        ("smolkit RedisQueue::push, 16 tasks", Push::Smolkit(16)),
        (
            "smolkit RedisQueue::push_batch (chunks of 256)",
            Push::Batch,
        ),
    ] {
        let rate = median((0..RUNS).map(|_| push_run(&url, f)).collect());
        println!("| {name} | {:.0} |", rate);
    }
}

#[derive(Clone, Copy)]
enum Consume {
    Raw(usize),
    /// Tasks, prefetch (the default is 256: reads of 16 adapting up to it).
    Smolkit(usize, usize),
    /// Processes, prefetch.
    Processes(usize, usize),
}

#[derive(Clone, Copy)]
enum Push {
    Raw,
    Smolkit(usize),
    Batch,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn version() -> String {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find(|w| w.starts_with("v="))
                .unwrap_or("?")
                .trim_start_matches("v=")
                .to_owned()
        })
        .unwrap_or_default()
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// The stream's length.
fn xlen(url: &str) -> u64 {
    smol::block_on(async {
        let mut c = conn(url).await;
        redis::cmd("XLEN")
            .arg(STREAM)
            .query_async(&mut c)
            .await
            .unwrap()
    })
}

/// A fresh stream with its group and `ITEMS` entries, closed.
async fn prepare(url: &str, fill: bool) {
    let mut c = conn(url).await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg("smolkit")
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    if fill {
        raw_push(&mut c).await;
        redis::cmd("SET")
            .arg(format!("{STREAM}:closed"))
            .arg(1)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
}

async fn raw_push(c: &mut redis::aio::MultiplexedConnection) {
    let mut next = 0;
    while next < ITEMS {
        let mut pipe = redis::pipe();
        for i in next..(next + 256).min(ITEMS) {
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("*")
                .arg("item")
                .arg(i)
                .ignore();
        }
        pipe.query_async::<()>(c).await.unwrap();
        next += 256;
    }
}

fn consume_run(url: &str, how: Consume) -> f64 {
    smol::block_on(prepare(url, true));
    let start = Instant::now();
    let consumed: u64 = match how {
        Consume::Raw(tasks) => smol::block_on(async {
            let runs: Vec<_> = (0..tasks)
                .map(|k| smol::spawn(raw_consumer(url.to_owned(), k)))
                .collect();
            let mut n = 0;
            for r in runs {
                n += r.await;
            }
            n
        }),
        Consume::Smolkit(tasks, prefetch) => smol::block_on(async {
            let mut queues = Vec::new();
            for _ in 0..tasks {
                queues.push(Arc::new(
                    RedisQueue::<u64>::builder(RedisLink::open(url).unwrap(), STREAM)
                        .with_prefetch(prefetch)
                        .connect()
                        .await
                        .unwrap(),
                ));
            }
            let runs: Vec<_> = queues
                .into_iter()
                .map(|q| smol::spawn(async move { pipeline(q).await }))
                .collect();
            let mut n = 0;
            for r in runs {
                n += r.await;
            }
            n
        }),
        Consume::Processes(n, prefetch) => {
            let children: Vec<Child> = (0..n)
                .map(|_| {
                    Command::new(std::env::current_exe().unwrap())
                        .args(["--role", "consume", url, &prefetch.to_string()])
                        .stdout(Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .collect();
            for mut c in children {
                assert!(c.wait().unwrap().success());
            }
            ITEMS
        }
    };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(xlen(url), 0, "entries left in the stream");
    assert_eq!(consumed, ITEMS, "consumed");
    ITEMS as f64 / secs
}

async fn pipeline(q: Arc<RedisQueue<u64>>) -> u64 {
    let report = Pipeline::from_queue(q)
        .map(
            Stage::new("noop"),
            |x: u64| async move { Ok::<_, String>(x) },
        )
        .run(|_| async { Ok::<_, String>(()) })
        .await
        .unwrap();
    report.outputs
}

async fn smolkit_consumer(url: &str, prefetch: usize) {
    let q = Arc::new(
        RedisQueue::<u64>::builder(RedisLink::open(url).unwrap(), STREAM)
            .with_prefetch(prefetch)
            .connect()
            .await
            .unwrap(),
    );
    pipeline(q).await;
}

/// Reads and acks until the stream is empty.
async fn raw_consumer(url: String, k: usize) -> u64 {
    let mut c = conn(&url).await;
    let consumer = format!("raw-{k}");
    let mut n = 0;
    loop {
        let reply: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("smolkit")
            .arg(&consumer)
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(10)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query_async(&mut c)
            .await
            .unwrap();
        let ids = entry_ids(&reply);
        if ids.is_empty() {
            return n;
        }
        n += ids.len() as u64;
        let mut pipe = redis::pipe();
        pipe.cmd("XACK")
            .arg(STREAM)
            .arg("smolkit")
            .arg(&ids)
            .ignore();
        pipe.cmd("XDEL").arg(STREAM).arg(&ids).ignore();
        pipe.query_async::<()>(&mut c).await.unwrap();
    }
}

fn entry_ids(v: &redis::Value) -> Vec<String> {
    let redis::Value::Array(streams) = v else {
        return Vec::new();
    };
    let Some(redis::Value::Array(kv)) = streams.first() else {
        return Vec::new();
    };
    let Some(redis::Value::Array(entries)) = kv.get(1) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| match e {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn push_run(url: &str, how: Push) -> f64 {
    smol::block_on(prepare(url, false));
    let start = Instant::now();
    smol::block_on(async {
        match how {
            Push::Raw => raw_push(&mut conn(url).await).await,
            Push::Batch => {
                let q = RedisQueue::<u64>::builder(RedisLink::open(url).unwrap(), STREAM)
                    .with_capacity(ITEMS)
                    .connect()
                    .await
                    .unwrap();
                q.push_batch((0..ITEMS).collect()).await.unwrap();
            }
            Push::Smolkit(tasks) => {
                let q = Arc::new(
                    RedisQueue::<u64>::builder(RedisLink::open(url).unwrap(), STREAM)
                        .with_capacity(ITEMS)
                        .connect()
                        .await
                        .unwrap(),
                );
                let per = ITEMS / tasks as u64;
                let runs: Vec<_> = (0..tasks as u64)
                    .map(|t| {
                        let q = q.clone();
                        smol::spawn(async move {
                            for i in t * per..(t + 1) * per {
                                q.push(i).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for r in runs {
                    r.await;
                }
            }
        }
    });
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(xlen(url), ITEMS);
    ITEMS as f64 / secs
}

/// A `redis-server` child on a free loopback port, killed on drop.
struct Server {
    port: u16,
    child: Child,
}

impl Server {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let s = Server { port, child };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
