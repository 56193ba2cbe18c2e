//! Fixed work for callgrind (the steady figure when the HTTP rows swing):
//! 2 000 GETs of a 10-byte file from an nginx started for the run, one
//! caller on a 2-thread smolkit `Runtime`, by `HyperClient`, hyper-util's
//! legacy client (reqwest's core) or surf (keep-alive only), over a new
//! connection each (`fresh`: keep-alive off / no idle pool) or one kept
//! alive (`keepalive`).
//!
//! Run: `cargo build --release --manifest-path benches/Cargo.toml --example http_count`,
//! then `valgrind --tool=callgrind benches/target/release/examples/http_count <smolkit|hyper-util|surf> <fresh|keepalive> [no-connect-timeout]`
//! (nginx runs outside valgrind: only the client's instructions count;
//! `no-connect-timeout` turns smolkit's default 10 s connect timeout off,
//! for parity with hyper-util's client, which has none). Each count
//! includes the runtime monitor's one-time clock calibration: subtract
//! `quanta::Clock::new`'s inclusive cost.

#[path = "http_common.rs"]
mod http_common;

use std::time::Duration;

use http_body_util::BodyExt;
use http_common::{Legacy, OnRuntime, SmolConnector, nginx};
use smolkit::http::{Body, Client, HyperClient, Request, SurfClient};
use smolkit::runtime::Runtime;

const REQUESTS: usize = 2_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(client), Some(mode)) = (args.get(1), args.get(2)) else {
        eprintln!(
            "usage: http_count <smolkit|hyper-util|surf> <fresh|keepalive> [no-connect-timeout]"
        );
        std::process::exit(2);
    };
    let fresh = mode == "fresh";
    let connect_timeout = (args.get(3).map(String::as_str) != Some("no-connect-timeout"))
        .then_some(Duration::from_secs(10));
    let Some(nginx) = nginx() else {
        eprintln!("no nginx on the PATH");
        std::process::exit(2);
    };
    let rt = Runtime::builder()
        .with_threads(2)
        .build()
        .expect("a runtime");
    let url = nginx.url.clone();
    let started = std::time::Instant::now();
    let bytes = if client == "smolkit" || client == "surf" {
        let hyper: Box<dyn Client> = if client == "surf" {
            assert!(!fresh, "surf: keep-alive only");
            Box::new(SurfClient::default())
        } else {
            Box::new(
                HyperClient::builder()
                    .with_keep_alive(!fresh)
                    .with_connect_timeout(connect_timeout)
                    .build()
                    .expect("a client"),
            )
        };
        rt.block_on(rt.spawn(async move {
            let mut n = 0;
            for _ in 0..REQUESTS {
                let r = hyper
                    .send(Request::get(&url).body(Body::empty()).expect("a request"))
                    .await
                    .expect("a response");
                n += r.into_body().bytes().await.expect("a body").len();
            }
            n
        }))
        .expect("no panic")
    } else {
        let mut builder = hyper_util::client::legacy::Client::builder(OnRuntime(rt.handle()));
        if fresh {
            builder.pool_max_idle_per_host(0);
        }
        let legacy: Legacy = builder.build(SmolConnector);
        rt.block_on(rt.spawn(async move {
            let mut n = 0;
            for _ in 0..REQUESTS {
                let r = legacy
                    .get(url.parse().expect("a uri"))
                    .await
                    .expect("a response");
                n += r
                    .into_body()
                    .collect()
                    .await
                    .expect("a body")
                    .to_bytes()
                    .len();
            }
            n
        }))
        .expect("no panic")
    };
    assert_eq!(bytes, REQUESTS * 10);
    // On stderr: the instruction counts are what this is for.
    eprintln!(
        "{client} {mode}: {:.1} µs per request",
        started.elapsed().as_secs_f64() * 1e6 / REQUESTS as f64
    );
}
