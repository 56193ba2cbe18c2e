//! WebSocket benchmarks over loopback against the ChaosServer's echo
//! endpoint (async-tungstenite on its own one-thread executor), peers in
//! the same run:
//!
//! - `echo_round_trip`: one 32-byte text message sent and its echo
//!   received, one at a time.
//! - `echo_round_trip_on_runtime`: the same, with the caller, the
//!   session's driver and the raw peer all tasks on one 2-thread smolkit
//!   `Runtime`.
//! - `throughput_1kib`: 1000 messages of 1 KiB sent while their echoes are
//!   read (pipelined).
//!
//! Each for `Session` (its driver task on smol's global executor, the
//! caller on the benchmark thread) and raw async-tungstenite on the
//! benchmark thread: `send` (one flush per message, the usual way) and
//! `feed` (flush once at the end, raw's best case).
//!
//! - `reconnect`: the server shuts down (1001 going away) and restarts on
//!   the same port; the time from the restart to the echo of a message
//!   queued while it was down, with the default backoff (1 s doubling, full
//!   jitter). Also printed: the worst case over 20 restarts, the part of it
//!   that is not the backoff delay, and messages lost (queued while down,
//!   echoed after).
//!
//! Run: `cargo bench --features testing --bench ws`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message as WsMessage;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_lite::StreamExt;
use futures_util::SinkExt;
use smolkit::runtime::{Runtime, Spawn};
use smolkit::testing::ChaosServer;
use smolkit::ws::{Message, Session, SessionEventKind};

const BATCH: usize = 1000;

struct Setup {
    _rt: Runtime,
    spawner: Arc<dyn Spawn>,
    server: ChaosServer,
    ex: Arc<smol::Executor<'static>>,
}

fn setup() -> Setup {
    let rt = Runtime::builder().with_threads(1).build().unwrap();
    let spawner: Arc<dyn Spawn> = Arc::new(rt.handle());
    let server = smol::block_on(
        ChaosServer::builder()
            .with_spawner(spawner.clone())
            .with_ws_log_limit(0)
            .start(),
    )
    .unwrap();
    Setup {
        _rt: rt,
        spawner,
        server,
        ex: Arc::new(smol::Executor::new()),
    }
}

type Raw = async_tungstenite::WebSocketStream<async_net::TcpStream>;

async fn raw_connect(addr: SocketAddr) -> Raw {
    let tcp = async_net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (ws, _) = async_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
        .await
        .unwrap();
    ws
}

fn session(s: &Setup) -> Session {
    let ex = s.ex.clone();
    let url = s.server.ws_url("/ws");
    // The driver on smol's global executor (its own thread), as in an
    // application whose background tasks run on executor threads.
    // NOTE: the reconnect bench restarts the server every second or so;
    // with the default stable period (20 s) every restart would look like a
    // flapping server and the delays would grow. A real restart ends a
    // long-lived connection, which this stands in for.
    let builder = Session::builder(&url).with_stable_after(Duration::from_millis(200));
    smol::block_on(ex.run(builder.connect())).unwrap()
}

fn payload(len: usize) -> String {
    "x".repeat(len)
}

fn round_trip(c: &mut Criterion) {
    let s = setup();
    let mut g = c.benchmark_group("ws/echo_round_trip");
    g.throughput(Throughput::Elements(1));
    let msg = payload(32);

    let sess = session(&s);
    g.bench_function("session", |b| {
        b.iter(|| {
            smol::block_on(s.ex.run(async {
                sess.send(msg.as_str()).await.unwrap();
                sess.recv().await.unwrap()
            }))
        })
    });
    smol::block_on(s.ex.run(sess.close()));

    let mut raw = smol::block_on(raw_connect(s.server.addr()));
    g.bench_function("raw_async_tungstenite", |b| {
        b.iter(|| {
            smol::block_on(async {
                raw.send(WsMessage::text(msg.clone())).await.unwrap();
                raw.next().await.unwrap().unwrap()
            })
        })
    });
    g.finish();
}

/// The same round trip with everything on one 2-thread smolkit `Runtime`
/// (the caller a task, the session's driver a task), beside raw
/// async-tungstenite in a task on the same runtime: as an application on
/// the runtime would run either. Timed inside the task (`iter_custom`), so
/// no hop to the benchmark thread per round trip.
fn round_trip_on_runtime(c: &mut Criterion) {
    let s = setup();
    let rt = Runtime::builder().with_threads(2).build().unwrap();
    let mut g = c.benchmark_group("ws/echo_round_trip_on_runtime");
    g.throughput(Throughput::Elements(1));
    let msg: Arc<str> = Arc::from(payload(32));

    let url = s.server.ws_url("/ws");
    let sess = rt
        .block_on(Session::builder(&url).with_spawner(rt.handle()).connect())
        .unwrap();
    g.bench_function("session", |b| {
        b.iter_custom(|iters| {
            let (sess, msg) = (sess.clone(), msg.clone());
            rt.block_on(rt.spawn(async move {
                let start = Instant::now();
                for _ in 0..iters {
                    sess.send(&*msg).await.unwrap();
                    sess.recv().await.unwrap();
                }
                start.elapsed()
            }))
            .unwrap()
        })
    });
    rt.block_on(sess.close());

    let raw = Arc::new(async_lock::Mutex::new(
        rt.block_on(rt.spawn(raw_connect(s.server.addr()))).unwrap(),
    ));
    g.bench_function("raw_async_tungstenite", |b| {
        b.iter_custom(|iters| {
            let (raw, msg) = (raw.clone(), msg.clone());
            rt.block_on(rt.spawn(async move {
                let mut raw = raw.lock().await;
                let start = Instant::now();
                for _ in 0..iters {
                    raw.send(WsMessage::text(&*msg)).await.unwrap();
                    raw.next().await.unwrap().unwrap();
                }
                start.elapsed()
            }))
            .unwrap()
        })
    });
    g.finish();
}

fn throughput(c: &mut Criterion) {
    let s = setup();
    let mut g = c.benchmark_group("ws/throughput_1kib");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    let msg = payload(1024);

    let sess = session(&s);
    g.bench_function("session", |b| {
        b.iter(|| {
            smol::block_on(s.ex.run(async {
                let send = async {
                    for _ in 0..BATCH {
                        sess.send(msg.as_str()).await.unwrap();
                    }
                };
                let recv = async {
                    for _ in 0..BATCH {
                        sess.recv().await.unwrap();
                    }
                };
                futures_lite::future::zip(send, recv).await
            }))
        })
    });
    smol::block_on(s.ex.run(sess.close()));

    for mode in ["send", "feed"] {
        let raw = smol::block_on(raw_connect(s.server.addr()));
        let (mut tx, mut rx) = raw.split();
        g.bench_function(BenchmarkId::new("raw_async_tungstenite", mode), |b| {
            b.iter(|| {
                smol::block_on(async {
                    let send = async {
                        for _ in 0..BATCH {
                            let m = WsMessage::text(msg.clone());
                            if mode == "send" {
                                tx.send(m).await.unwrap();
                            } else {
                                tx.feed(m).await.unwrap();
                            }
                        }
                        tx.flush().await.unwrap();
                    };
                    let recv = async {
                        for _ in 0..BATCH {
                            rx.next().await.unwrap().unwrap();
                        }
                    };
                    futures_lite::future::zip(send, recv).await
                })
            })
        });
    }
    g.finish();
}

/// One restart: returns (restart → echo, restart → echo minus the backoff
/// delay still to run at the restart, messages lost).
fn restart_once(
    s: &mut Setup,
    sess: &Session,
    events: &async_channel::Receiver<smolkit::ws::SessionEvent>,
) -> (Duration, Duration, usize) {
    let addr = s.server.addr();
    s.server.shutdown();
    // The session sees 1001, then schedules its first attempt.
    let (delay, at) = smol::block_on(s.ex.run(async {
        loop {
            let ev = events.recv().await.unwrap();
            if let SessionEventKind::Reconnecting { delay, .. } = ev.kind {
                return (delay, Instant::now());
            }
        }
    }));
    let queued = 10;
    for i in 0..queued {
        sess.try_send(format!("q{i}")).unwrap();
    }
    let restart = Instant::now();
    // The old listener closes when its accept task sees the shutdown.
    let mut started = None;
    for _ in 0..1000 {
        let builder = ChaosServer::builder()
            .with_addr(addr)
            .with_ws_log_limit(0)
            .with_spawner(s.spawner.clone());
        match smol::block_on(builder.start()) {
            Ok(server) => {
                started = Some(server);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    s.server = started.expect("the port is free again within 1 s");
    let echoed = smol::block_on(s.ex.run(async {
        let mut got = 0;
        while got < queued {
            match sess.recv().await {
                Some(Message::Text(t)) if t.starts_with('q') => got += 1,
                Some(_) => {}
                None => break,
            }
        }
        got
    }));
    let total = restart.elapsed();
    let remaining = (at + delay).saturating_duration_since(restart);
    (total, total.saturating_sub(remaining), queued - echoed)
}

fn reconnect(c: &mut Criterion) {
    let mut s = setup();
    let sess = session(&s);
    let events = sess.events();
    // The numbers the targets need, over 20 restarts.
    let mut worst = Duration::ZERO;
    let mut worst_overhead = Duration::ZERO;
    let mut lost = 0;
    for _ in 0..20 {
        let (total, overhead, l) = restart_once(&mut s, &sess, &events);
        worst = worst.max(total);
        worst_overhead = worst_overhead.max(overhead);
        lost += l;
    }
    eprintln!(
        "ws/reconnect: 20 restarts, worst restart-to-echo {:.1} ms, worst beyond the backoff \
         delay {:.1} ms, messages lost {lost}",
        worst.as_secs_f64() * 1e3,
        worst_overhead.as_secs_f64() * 1e3
    );
    let mut g = c.benchmark_group("ws/reconnect");
    g.sample_size(10);
    g.sampling_mode(criterion::SamplingMode::Flat);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("session_default_backoff", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| restart_once(&mut s, &sess, &events).0)
                .sum()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    round_trip,
    round_trip_on_runtime,
    throughput,
    reconnect
);
criterion_main!(benches);
