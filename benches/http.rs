//! HTTP client benchmarks against a local server (the ChaosServer, hyper
//! on smol), peers in the same run:
//!
//! - `requests/{1,16,64}`: 512 GETs of a 9-byte body with that many
//!   concurrent callers, for `HyperClient` (16 connections per host, and
//!   64 for the 64-caller run), surf 2.3 (`h1-client-rustls`), and
//!   hyper-util's legacy client on a smol connector and executor (no tokio
//!   runtime).
//! - `requests_on_runtime`: each client with its callers and connection
//!   tasks on one 2-thread smolkit `Runtime`, against an nginx the bench
//!   starts (skipped without `nginx` on the PATH) and the ChaosServer, at
//!   1, 16 and 64 callers; and a new connection per request against nginx.
//! - `body_256mib`: one 256 MiB response body read to the end, per client.
//! - `api_batch`: 10 000 GETs through one `ApiClient` (64 connections) at
//!   concurrency 64, by `ApiClient::batch` and by futures-util's
//!   `buffered(64)` (`FuturesOrdered`) over the same client's calls.
//!
//! Run: `cargo bench --features testing,surf --bench http`

use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_lite::StreamExt;
use http_body_util::BodyExt;
use smolkit::http::{Body, Client, HyperClient, Request, SurfClient};
use smolkit::runtime::Runtime;
use smolkit::testing::ChaosServer;

#[path = "http_common.rs"]
mod http_common;
use http_common::{Legacy, OnRuntime, SmolConnector, nginx};

const REQUESTS: usize = 512;
const BIG: u64 = 256 << 20;

/// A smol executor with two threads of its own: each hyper client (ours
/// and hyper-util's) runs its connection tasks on one, so neither shares
/// the server's thread.
fn executor() -> Arc<smol::Executor<'static>> {
    let ex = Arc::new(smol::Executor::new());
    for _ in 0..2 {
        let ex = ex.clone();
        std::thread::spawn(move || smol::block_on(ex.run(futures_lite::future::pending::<()>())));
    }
    ex
}

fn legacy() -> Legacy {
    hyper_util::client::legacy::Client::builder(smol_hyper::rt::SmolExecutor::new(executor()))
        .build(SmolConnector)
}

fn hyper_client(max_per_host: usize) -> HyperClient {
    HyperClient::builder()
        .with_max_connections_per_host(max_per_host)
        .build()
        .unwrap()
}

async fn smolkit_get(client: &dyn Client, url: &str) -> usize {
    let r = client
        .send(Request::get(url).body(Body::empty()).unwrap())
        .await
        .unwrap();
    r.into_body().bytes().await.unwrap().len()
}

async fn legacy_get(client: &Legacy, url: &str) -> usize {
    let r = client.get(url.parse().unwrap()).await.unwrap();
    r.into_body().collect().await.unwrap().to_bytes().len()
}

/// `REQUESTS` requests by `callers` concurrent loops.
async fn run<F, Fut>(callers: usize, f: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = usize> + Send,
{
    let per = REQUESTS / callers;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let f = f.clone();
            smol::spawn(async move {
                for _ in 0..per {
                    assert_eq!(f().await, 10);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
}

fn requests(c: &mut Criterion) {
    let server = smol::block_on(ChaosServer::start()).unwrap();
    let url = server.url("/status/200");
    let mut group = c.benchmark_group("requests");
    group.throughput(Throughput::Elements(REQUESTS as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));
    let surf = Arc::new(SurfClient::default());
    let legacy = Arc::new(legacy());
    for callers in [1usize, 16, 64] {
        let hyper = Arc::new(hyper_client(callers.max(16)));
        group.bench_with_input(
            BenchmarkId::new("smolkit_hyper", callers),
            &callers,
            |b, &n| {
                b.iter(|| {
                    let (client, url) = (hyper.clone(), url.clone());
                    smol::block_on(run(n, move || {
                        let (client, url) = (client.clone(), url.clone());
                        async move { smolkit_get(&*client, &url).await }
                    }))
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("surf", callers), &callers, |b, &n| {
            b.iter(|| {
                let (client, url) = (surf.clone(), url.clone());
                smol::block_on(run(n, move || {
                    let (client, url) = (client.clone(), url.clone());
                    async move { smolkit_get(&*client, &url).await }
                }))
            })
        });
        group.bench_with_input(
            BenchmarkId::new("hyper_util_legacy", callers),
            &callers,
            |b, &n| {
                b.iter(|| {
                    let (client, url) = (legacy.clone(), url.clone());
                    smol::block_on(run(n, move || {
                        let (client, url) = (client.clone(), url.clone());
                        async move { legacy_get(&client, &url).await }
                    }))
                })
            },
        );
        let stats = hyper.stats();
        assert!(stats.open <= callers.max(16), "cap broken: {stats:?}");
    }
    group.finish();
}

fn body_256mib(c: &mut Criterion) {
    let server = smol::block_on(ChaosServer::start()).unwrap();
    let url = server.url(&format!("/bytes/{BIG}"));
    let mut group = c.benchmark_group("body_256mib");
    group.throughput(Throughput::Bytes(BIG));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let hyper = hyper_client(16);
    let surf = SurfClient::default();
    let legacy = legacy();
    let drain = |body: Body| async move {
        let mut body = body;
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            n += chunk.unwrap().len() as u64;
        }
        assert_eq!(n, BIG);
    };
    group.bench_function("smolkit_hyper", |b| {
        b.iter(|| {
            smol::block_on(async {
                let r = hyper
                    .send(Request::get(&url).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                drain(r.into_body()).await
            })
        })
    });
    group.bench_function("surf", |b| {
        b.iter(|| {
            smol::block_on(async {
                let r = surf
                    .send(Request::get(&url).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                drain(r.into_body()).await
            })
        })
    });
    group.bench_function("hyper_util_legacy", |b| {
        b.iter(|| {
            smol::block_on(async {
                let r = legacy.get(url.parse().unwrap()).await.unwrap();
                let mut body = r.into_body();
                let mut n = 0u64;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        n += data.len() as u64;
                    }
                }
                assert_eq!(n, BIG);
            })
        })
    });
    group.finish();
}

fn api_batch(c: &mut Criterion) {
    const CALLS: usize = 10_000;
    let server = smol::block_on(ChaosServer::start()).unwrap();
    let api = smolkit::http::ApiClient::builder(&server.url("/"))
        .with_client(Arc::new(hyper_client(64)))
        .build()
        .unwrap();
    let mut group = c.benchmark_group("api_batch");
    group.throughput(Throughput::Elements(CALLS as u64));
    group.sample_size(10);
    group.bench_function("smolkit_batch", |b| {
        b.iter(|| {
            let results = smol::block_on(api.batch((0..CALLS).map(|_| api.get("status/200")), 64));
            assert!(results.iter().all(Result::is_ok));
        })
    });
    group.bench_function("futures_buffered", |b| {
        b.iter(|| {
            let results: Vec<_> = smol::block_on(
                futures_util::StreamExt::buffered(
                    futures_util::stream::iter((0..CALLS).map(|_| api.get("status/200").send())),
                    64,
                )
                .collect(),
            );
            assert!(results.iter().all(Result::is_ok));
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    requests,
    requests_on_runtime,
    body_256mib,
    api_batch
);
criterion_main!(benches);

/// `n` requests by `callers` concurrent tasks on `rt`, timed inside the
/// runtime (no hop to the bench thread per request).
fn timed_on<F, Fut>(rt: &Runtime, callers: usize, n: u64, f: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = usize> + Send + 'static,
{
    let per = n.div_ceil(callers as u64);
    let handle = rt.handle();
    rt.block_on(rt.spawn(async move {
        let start = std::time::Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let f = f.clone();
                handle.spawn(async move {
                    for _ in 0..per {
                        assert_eq!(f().await, 10);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    }))
    .unwrap()
}

/// Each stack on the crate's 2-thread `Runtime` (callers and connection
/// tasks), against nginx (so the server is not the limit) and the
/// ChaosServer: keep-alive at 1, 16 and 64 callers, and a new connection
/// per request (item 8's row; hyper-util legacy with no idle pool is
/// reqwest's core).
fn requests_on_runtime(c: &mut Criterion) {
    let Some(nginx) = nginx() else {
        eprintln!("no nginx on the PATH: requests_on_runtime skipped");
        return;
    };
    let chaos = smol::block_on(ChaosServer::start()).unwrap();
    let rt = Runtime::builder().with_threads(2).build().unwrap();
    let mut group = c.benchmark_group("requests_on_runtime");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    let surf = Arc::new(SurfClient::default());
    for (server, url) in [
        ("nginx", nginx.url.clone()),
        ("chaos", chaos.url("/status/200")),
    ] {
        for callers in [1usize, 16, 64] {
            let hyper = Arc::new(
                HyperClient::builder()
                    .with_max_connections_per_host(callers.max(16))
                    .build()
                    .unwrap(),
            );
            let legacy = Arc::new(
                hyper_util::client::legacy::Client::builder(OnRuntime(rt.handle()))
                    .build(SmolConnector),
            );
            let id = |name: &str| BenchmarkId::new(format!("{server}/{name}"), callers);
            group.bench_function(id("smolkit_hyper"), |b| {
                b.iter_custom(|n| {
                    let (client, url) = (hyper.clone(), url.clone());
                    timed_on(&rt, callers, n, move || {
                        let (client, url) = (client.clone(), url.clone());
                        async move { smolkit_get(&*client, &url).await }
                    })
                })
            });
            group.bench_function(id("surf"), |b| {
                b.iter_custom(|n| {
                    let (client, url) = (surf.clone(), url.clone());
                    timed_on(&rt, callers, n, move || {
                        let (client, url) = (client.clone(), url.clone());
                        async move { smolkit_get(&*client, &url).await }
                    })
                })
            });
            group.bench_function(id("hyper_util_legacy"), |b| {
                b.iter_custom(|n| {
                    let (client, url) = (legacy.clone(), url.clone());
                    timed_on(&rt, callers, n, move || {
                        let (client, url) = (client.clone(), url.clone());
                        async move { legacy_get(&client, &url).await }
                    })
                })
            });
        }
    }
    // A new connection per request, one caller (nginx).
    let fresh = Arc::new(
        HyperClient::builder()
            .with_keep_alive(false)
            .build()
            .unwrap(),
    );
    let legacy_fresh = Arc::new(
        hyper_util::client::legacy::Client::builder(OnRuntime(rt.handle()))
            .pool_max_idle_per_host(0)
            .build(SmolConnector),
    );
    let url = nginx.url.clone();
    group.bench_function("nginx_new_connection/smolkit_hyper", |b| {
        b.iter_custom(|n| {
            let (client, url) = (fresh.clone(), url.clone());
            timed_on(&rt, 1, n, move || {
                let (client, url) = (client.clone(), url.clone());
                async move { smolkit_get(&*client, &url).await }
            })
        })
    });
    group.bench_function("nginx_new_connection/hyper_util_legacy", |b| {
        b.iter_custom(|n| {
            let (client, url) = (legacy_fresh.clone(), url.clone());
            timed_on(&rt, 1, n, move || {
                let (client, url) = (client.clone(), url.clone());
                async move { legacy_get(&client, &url).await }
            })
        })
    });
    group.finish();
}
