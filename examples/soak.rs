//! Soak: big bodies, many small keep-alive requests, WebSocket traffic and
//! forced reconnects, all at once against the embedded ChaosServer, with a
//! watchdog.
//!
//! - the server runs on a one-thread smolkit `Runtime`, the clients on a
//!   two-thread one, both with the task monitor on;
//! - `--big` tasks loop `GET /bytes/{big}` (default 64 MiB) through one
//!   `HyperClient` and count every byte;
//! - `--small` tasks loop small keep-alive requests through another;
//! - one `ws::Session` in at-least-once mode sends numbered envelopes to
//!   the `/ws?ack=1` endpoint while the server drops every WebSocket
//!   connection each `--drop-every` milliseconds;
//! - the watchdog (a plain thread) samples each workload's counter five
//!   times a second; when one has not moved for `--stall` seconds it prints
//!   both runtimes' task lists (name, age, polls, busy time) and exits
//!   with status 2.
//!
//! At the end every request must have had its whole, correct answer, the
//! server must have counted exactly the requests the clients sent, and every
//! envelope must have been acknowledged and seen by the server (duplicates
//! allowed, gaps not). Any miss exits with status 1.
//!
//! Run: `cargo run --release --features testing --example soak -- --seconds 600`

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use smolkit::http::{Body, Client, HyperClient};
use smolkit::resilience::Backoff;
use smolkit::runtime::{Runtime, Spawn, SpawnExt};
use smolkit::testing::ChaosServer;
use smolkit::ws::{Codec, Envelope, Session};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
struct Args {
    seconds: u64,
    big: u64,
    big_tasks: usize,
    small_tasks: usize,
    drop_every: Duration,
    stall: Duration,
    /// `smol`: the benchmark's set-up instead of smolkit's runtimes (server
    /// on smol's global executor, the clients' connections on a two-thread
    /// `smol::Executor`, each big body read by a `smol::block_on` of its own
    /// on a plain thread).
    smol: bool,
    /// Which side runs on smol in `smol` mode (`both`, `server`, `client`;
    /// `thread`: the server on a thread per connection, no executor at
    /// all); the other side stays on smolkit's runtimes.
    smol_side: &'static str,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            seconds: 30,
            big: 64 << 20,
            big_tasks: 2,
            small_tasks: 8,
            drop_every: Duration::from_millis(1500),
            stall: Duration::from_secs(15),
            smol: false,
            smol_side: "both",
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{flag}: `{v}` is not a whole number"))
            };
            match flag.as_str() {
                "--seconds" => args.seconds = num(&value)?,
                "--big" => args.big = num(&value)?,
                "--big-tasks" => args.big_tasks = num(&value)? as usize,
                "--small" => args.small_tasks = num(&value)? as usize,
                "--drop-every" => args.drop_every = Duration::from_millis(num(&value)?.max(1)),
                "--stall" => args.stall = Duration::from_secs(num(&value)?.max(1)),
                "--executor" => match value.as_str() {
                    "smolkit" => args.smol = false,
                    "smol" => args.smol = true,
                    "smol-server" => (args.smol, args.smol_side) = (true, "server"),
                    "smol-client" => (args.smol, args.smol_side) = (true, "client"),
                    "thread-server" => (args.smol, args.smol_side) = (true, "thread"),
                    _ => {
                        return Err(format!(
                            "--executor: `{value}` is not smolkit, smol, smol-server, smol-client or thread-server"
                        ));
                    }
                },
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        Ok(args)
    }
}

const STEPS: [&str; 7] = [
    "running",
    "joining the task loops",
    "joining the WebSocket task",
    "joining the big-body threads",
    "checking the server's count",
    "waiting for the server to close",
    "done",
];

/// What the load tasks did (the watchdog samples them).
#[derive(Default)]
struct Counters {
    big_bodies: AtomicU64,
    big_bytes: AtomicU64,
    /// Per big-body loop: its phase (0 idle, 1 sending, 2 reading the body)
    /// and the bytes of the current body, for the stall report.
    big_state: [(AtomicU64, AtomicU64); 16],
    /// Where the wind-down is (an index into `STEPS`).
    step: AtomicU64,
    small: AtomicU64,
    ws_sent: AtomicU64,
    ws_echoes: AtomicU64,
    drops: AtomicU64,
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            eprintln!(
                "usage: soak [--seconds N] [--big BYTES] [--big-tasks N] [--small N] \
                 [--drop-every MS] [--stall SECONDS] [--executor smolkit|smol|smol-server|smol-client|thread-server]"
            );
            return ExitCode::from(64);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<(), BoxError> {
    let server_rt = Arc::new(
        Runtime::builder()
            .with_threads(1)
            .with_thread_name("soak-server")
            .with_monitor(true)
            .build()?,
    );
    let client_rt = Arc::new(
        Runtime::builder()
            .with_threads(2)
            .with_thread_name("soak-client")
            .with_monitor(true)
            .build()?,
    );
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (server_rt, client_rt) = (server_rt.clone(), client_rt.clone());
        let (counters, stop, done, stall) =
            (counters.clone(), stop.clone(), done.clone(), args.stall);
        let running = [args.big_tasks > 0, args.small_tasks > 0, true];
        std::thread::Builder::new()
            .name("soak-watchdog".into())
            .spawn(move || {
                watch(
                    (&server_rt, &client_rt),
                    &counters,
                    (&stop, &done),
                    stall,
                    running,
                )
            })?
    };
    let started = Instant::now();
    let result = if args.smol {
        let ex = Arc::new(smol::Executor::new());
        for _ in 0..2 {
            let ex = ex.clone();
            std::thread::spawn(move || {
                smol::block_on(ex.run(futures_lite::future::pending::<()>()))
            });
        }
        let server: Arc<dyn Spawn> = match args.smol_side {
            "client" => server_rt.spawner(),
            "thread" => Arc::new(ThreadPerTask),
            _ => Arc::new(smolkit::runtime::SmolGlobal),
        };
        let client: Arc<dyn Spawn> = match args.smol_side {
            "server" | "thread" => client_rt.spawner(),
            _ => ex,
        };
        smol::block_on(load(&args, server, client, &counters, &stop))
    } else {
        client_rt.block_on(load(
            &args,
            server_rt.spawner(),
            client_rt.spawner(),
            &counters,
            &stop,
        ))
    };
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    let elapsed = started.elapsed();
    report(&counters, elapsed);
    let leftover = (client_rt.stats().live, server_rt.stats().live);
    drop_runtime(client_rt, "client");
    drop_runtime(server_rt, "server");
    result?;
    println!(
        "soak OK in {:.1} s (live tasks at the end: client {}, server {})",
        elapsed.as_secs_f64(),
        leftover.0,
        leftover.1
    );
    Ok(())
}

fn drop_runtime(rt: Arc<Runtime>, name: &str) {
    match Arc::try_unwrap(rt) {
        Ok(rt) => {
            let report = rt.shutdown(Duration::from_secs(5));
            println!("{name} runtime shut down: {report:?}");
        }
        Err(_) => eprintln!("{name} runtime still shared at exit"),
    }
}

fn report(c: &Counters, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let big = c.big_bytes.load(Ordering::Relaxed);
    println!(
        "big bodies: {} ({:.0} MiB, {:.0} MiB/s) | small requests: {} ({:.0}/s) | ws: {} sent, {} echoes, {} forced drops",
        c.big_bodies.load(Ordering::Relaxed),
        big as f64 / 1048576.0,
        big as f64 / 1048576.0 / secs,
        c.small.load(Ordering::Relaxed),
        c.small.load(Ordering::Relaxed) as f64 / secs,
        c.ws_sent.load(Ordering::Relaxed),
        c.ws_echoes.load(Ordering::Relaxed),
        c.drops.load(Ordering::Relaxed),
    );
}

/// The watchdog: exits the process with status 2 when one workload (big
/// bodies, small requests, WebSocket messages) made no progress for
/// `stall`, after printing what every task was doing.
fn watch(
    (server, client): (&Runtime, &Runtime),
    c: &Counters,
    (stop, done): (&AtomicBool, &AtomicBool),
    stall: Duration,
    running: [bool; 3],
) {
    let sample = |c: &Counters| {
        [
            c.big_bytes.load(Ordering::Relaxed),
            c.small.load(Ordering::Relaxed),
            c.ws_sent.load(Ordering::Relaxed) + c.ws_echoes.load(Ordering::Relaxed),
        ]
    };
    let mut last = sample(c);
    let mut since = [Instant::now(); 3];
    let mut stopping: Option<Instant> = None;
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(200));
        let now = sample(c);
        for i in 0..3 {
            if now[i] != last[i] {
                (last[i], since[i]) = (now[i], Instant::now());
            }
        }
        // Once told to stop, the workloads wind down: what must not stall
        // then is the winding down itself.
        if stop.load(Ordering::Acquire) {
            let at = *stopping.get_or_insert_with(Instant::now);
            if at.elapsed() < stall {
                continue;
            }
            eprintln!(
                "soak STALLED: still winding down {:.1} s after the stop ({})",
                at.elapsed().as_secs_f64(),
                STEPS[c.step.load(Ordering::Relaxed) as usize % STEPS.len()],
            );
        } else {
            let Some(i) = (0..3).find(|&i| running[i] && since[i].elapsed() >= stall) else {
                continue;
            };
            let name = ["big bodies", "small requests", "WebSocket messages"][i];
            eprintln!(
                "soak STALLED: no progress in {name} for {:.1} s",
                since[i].elapsed().as_secs_f64()
            );
        }
        report(c, Duration::from_secs(1));
        for (i, (phase, bytes)) in c.big_state.iter().enumerate() {
            let phase = phase.load(Ordering::Relaxed);
            if phase != 0 {
                let what = if phase == 1 {
                    "waiting for the response"
                } else {
                    "reading the body"
                };
                eprintln!(
                    "  big #{i}: {what}, {} bytes of this body so far",
                    bytes.load(Ordering::Relaxed)
                );
            }
        }
        for (name, rt) in [("server", server), ("client", client)] {
            eprintln!("{name} runtime: {:?}", rt.stats());
            for t in rt.tasks() {
                eprintln!(
                    "  #{:<6} {:<24} age {:>8.1} s  last poll {:>7.2} s ago  polls {:>9}  busy {:>8.3} s  longest poll {:?}",
                    t.id,
                    t.name.as_deref().unwrap_or("-"),
                    t.age().as_secs_f64(),
                    t.since_last_poll().as_secs_f64(),
                    t.polls,
                    t.busy.as_secs_f64(),
                    t.longest_poll,
                );
            }
        }
        // For a debugger: SOAK_HOLD_ON_STALL=<seconds> keeps the stalled
        // process alive that long before exiting.
        if let Some(hold) = std::env::var("SOAK_HOLD_ON_STALL")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            eprintln!("holding for {hold} s (pid {})", std::process::id());
            std::thread::sleep(Duration::from_secs(hold));
        }
        std::process::exit(2);
    }
}

async fn load(
    args: &Args,
    server_spawner: Arc<dyn Spawn>,
    spawner: Arc<dyn Spawn>,
    c: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
) -> Result<(), BoxError> {
    let server = Arc::new(
        ChaosServer::builder()
            .with_spawner(server_spawner)
            .with_request_log_limit(0)
            .with_ws_log_limit(usize::MAX)
            .start()
            .await?,
    );
    println!("ChaosServer on {} for {} s", server.url("/"), args.seconds);
    let big_client = HyperClient::builder()
        .with_max_connections_per_host(args.big_tasks.max(1))
        .build()?;
    let small_client = HyperClient::builder()
        .with_max_connections_per_host(args.small_tasks.max(1))
        .build()?;
    let mut tasks = Vec::new();
    let mut threads = Vec::new();
    for i in 0..args.big_tasks {
        let url = server.url(&format!("/bytes/{}", args.big));
        let (client, c, stop, want) = (big_client.clone(), c.clone(), stop.clone(), args.big);
        if args.smol {
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    smol::block_on(big_body(i, &client, &url, want, &c))?;
                }
                Ok::<(), String>(())
            }));
            continue;
        }
        tasks.push(spawner.spawn_named("soak-big", async move {
            while !stop.load(Ordering::Acquire) {
                big_body(i, &client, &url, want, &c).await?;
            }
            Ok(())
        }));
    }
    for i in 0..args.small_tasks {
        let url = server.url(&format!("/bytes/{}", 100 + i));
        let (client, c, stop) = (small_client.clone(), c.clone(), stop.clone());
        tasks.push(spawner.spawn_named("soak-small", async move {
            small_loop(&client, &url, 100 + i as u64, &c, &stop).await
        }));
    }
    let ws = spawner.spawn_named(
        "soak-ws",
        ws_load(
            server.clone(),
            spawner.clone(),
            args.clone(),
            c.clone(),
            stop.clone(),
        ),
    );

    async_io::Timer::after(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Release);
    let step = |n: u64| c.step.store(n, Ordering::Relaxed);
    step(1);
    let mut first_error = None;
    for t in tasks {
        if let Err(e) = t.await.map_err(|e| format!("task: {e}")).and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
    step(2);
    if let Err(e) = ws
        .await
        .map_err(|e| format!("ws task: {e}"))
        .and_then(|r| r)
    {
        first_error.get_or_insert(e);
    }
    step(3);
    for t in threads {
        let joined = blocking::unblock(move || t.join()).await;
        if let Err(e) = joined
            .map_err(|_| "a big-body thread panicked".to_owned())
            .and_then(|r| r)
        {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e.into());
    }
    step(4);
    let sent = c.big_bodies.load(Ordering::Relaxed) + c.small.load(Ordering::Relaxed);
    let counted = server.request_count();
    // The WebSocket upgrades are HTTP requests too.
    let upgrades = server.ws_connections();
    if counted != sent + upgrades {
        return Err(format!(
            "the server counted {counted} requests, the clients completed {sent} (+ {upgrades} upgrades)"
        )
        .into());
    }
    big_client.close();
    small_client.close();
    server.shutdown();
    step(5);
    server.closed().await;
    step(6);
    Ok(())
}

/// `GET url`.
async fn get(client: &HyperClient, url: &str) -> Result<http::Response<Body>, String> {
    let request = http::Request::get(url)
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    client.send(request).await.map_err(|e| e.to_string())
}

/// One big body, every byte counted.
async fn big_body(
    i: usize,
    client: &HyperClient,
    url: &str,
    want: u64,
    c: &Counters,
) -> Result<(), String> {
    let state = &c.big_state[i % 16];
    state.0.store(1, Ordering::Relaxed);
    state.1.store(0, Ordering::Relaxed);
    {
        let response = get(client, url)
            .await
            .map_err(|e| format!("big #{i}: {e}"))?;
        let mut body = response.into_body();
        state.0.store(2, Ordering::Relaxed);
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("big #{i} body after {n} bytes: {e}"))?;
            n += chunk.len() as u64;
            state.1.store(n, Ordering::Relaxed);
            c.big_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        if n != want {
            return Err(format!("big #{i}: {n} bytes, want {want}"));
        }
        c.big_bodies.fetch_add(1, Ordering::Relaxed);
    }
    state.0.store(0, Ordering::Relaxed);
    Ok(())
}

async fn small_loop(
    client: &HyperClient,
    url: &str,
    want: u64,
    c: &Counters,
    stop: &AtomicBool,
) -> Result<(), String> {
    while !stop.load(Ordering::Acquire) {
        let response = get(client, url)
            .await
            .map_err(|e| format!("small {url}: {e}"))?;
        if response.status() != 200 {
            return Err(format!("small {url}: status {}", response.status()));
        }
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| format!("small {url} body: {e}"))?;
        if body.len() as u64 != want || body[..] != smolkit::testing::pattern(want as usize)[..] {
            return Err(format!("small {url}: wrong body of {} bytes", body.len()));
        }
        c.small.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Numbered envelopes through reconnects; at the end every one must be
/// acknowledged and in the server's log.
async fn ws_load(
    server: Arc<ChaosServer>,
    spawner: Arc<dyn Spawn>,
    args: Args,
    c: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let session = Session::builder(&server.ws_url("/ws?ack=1"))
        .with_spawner(spawner.clone())
        .with_at_least_once(true)
        .with_reconnect(Backoff::constant(Duration::from_millis(20)))
        .with_stable_after(Duration::from_millis(100))
        .connect()
        .await
        .map_err(|e| format!("ws connect: {e}"))?;
    let echoes = {
        let (incoming, c) = (session.incoming(), c.clone());
        spawner.spawn_named("soak-ws-echoes", async move {
            while incoming.recv().await.is_ok() {
                c.ws_echoes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let dropper = {
        let (server, c, stop, every) = (server.clone(), c.clone(), stop.clone(), args.drop_every);
        spawner.spawn_named("soak-ws-dropper", async move {
            while !stop.load(Ordering::Acquire) {
                async_io::Timer::after(every).await;
                server.drop_ws_connections();
                c.drops.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut sent = 0u64;
    while !stop.load(Ordering::Acquire) {
        // Bursts of 100 every 50 ms: about 2 000 a second, so the server's
        // message log stays small enough to check every id against.
        for _ in 0..100 {
            session
                .send_envelope(Envelope::new("soak", sent))
                .await
                .map_err(|e| format!("ws send {sent}: {e}"))?;
            sent += 1;
            c.ws_sent.fetch_add(1, Ordering::Relaxed);
        }
        async_io::Timer::after(Duration::from_millis(50)).await;
    }
    // The dropper may be asleep for a whole interval: stop it now.
    let _ = dropper.cancel().await;
    session
        .flushed()
        .await
        .map_err(|e| format!("ws flushed: {e}"))?;
    let stats = session.stats();
    let report = session.close().await;
    drop(echoes);
    if stats.acked != sent
        || stats.dropped != 0
        || !report.unsent.is_empty()
        || !report.unconfirmed.is_empty()
    {
        return Err(format!(
            "ws: {sent} sent, {} acked, {} dropped, {} unsent, {} unconfirmed",
            stats.acked,
            stats.dropped,
            report.unsent.len(),
            report.unconfirmed.len()
        ));
    }
    let codec = Codec::new();
    let mut seen = HashSet::new();
    for record in server.ws_messages() {
        for item in codec.decode(record.message).unwrap_or_default() {
            if let Some(Ok(e)) = item.as_text().map(serde_json::from_str::<Envelope<u64>>) {
                seen.insert(e.payload);
            }
        }
    }
    let missing = (0..sent).filter(|i| !seen.contains(i)).count();
    if missing != 0 {
        return Err(format!(
            "ws: {missing} of {sent} envelopes never reached the server"
        ));
    }
    println!(
        "ws: {sent} envelopes, all acknowledged and seen; {} reconnects, {} resent",
        stats.reconnects, stats.resent
    );
    Ok(())
}

/// A thread per task, each `async_io::block_on` of its future: no
/// executor, no async-task (the experiment that ruled the executor out of the big-body stall).
struct ThreadPerTask;

impl Spawn for ThreadPerTask {
    fn spawn_boxed(&self, fut: smolkit::runtime::BoxFuture) {
        std::thread::spawn(move || async_io::block_on(fut));
    }
}
