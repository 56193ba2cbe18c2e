//! The WebSocket round-trip row on the crate's `Runtime`
//! (`ws/echo_round_trip_on_runtime` in `ws.rs`) as fixed work for
//! callgrind, its steady figure when the wall rows swing: N one-at-a-time
//! echoes of a 32-byte text message against the ChaosServer (on a 1-thread
//! `Runtime`), by a `Session` whose driver and caller are tasks on a
//! 2-thread `Runtime`, or by raw async-tungstenite in a task there.
//!
//! Run: `cargo build --release --manifest-path benches/Cargo.toml --example ws_count`,
//! then `valgrind --tool=callgrind benches/target/release/examples/ws_count <session|raw> [round trips]`.
//! Each count includes the runtime monitor's one-time clock calibration:
//! subtract `quanta::Clock::new`'s inclusive cost.

use std::sync::Arc;
use std::time::Instant;

use async_tungstenite::tungstenite::Message as WsMessage;
use futures_lite::StreamExt;
use smolkit::runtime::{Runtime, Spawn};
use smolkit::testing::ChaosServer;
use smolkit::ws::Session;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(who) = args.get(1).cloned() else {
        eprintln!("usage: ws_count <session|raw> [round trips]");
        std::process::exit(2);
    };
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5_000);
    let server_rt = Runtime::builder()
        .with_threads(1)
        .build()
        .expect("a runtime");
    let spawner: Arc<dyn Spawn> = Arc::new(server_rt.handle());
    let server = smol::block_on(
        ChaosServer::builder()
            .with_spawner(spawner)
            .with_ws_log_limit(0)
            .start(),
    )
    .expect("a server");
    let rt = Runtime::builder()
        .with_threads(2)
        .build()
        .expect("a runtime");
    let msg: Arc<str> = Arc::from("x".repeat(32));
    let url = server.ws_url("/ws");
    let addr = server.addr();
    let took = if who == "session" {
        let sess = rt
            .block_on(Session::builder(&url).with_spawner(rt.handle()).connect())
            .expect("a session");
        let took = rt
            .block_on(rt.spawn({
                let sess = sess.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..n {
                        sess.send(&*msg).await.expect("sent");
                        sess.recv().await.expect("an echo");
                    }
                    start.elapsed()
                }
            }))
            .expect("no panic");
        rt.block_on(sess.close());
        took
    } else {
        rt.block_on(rt.spawn(async move {
            let tcp = async_net::TcpStream::connect(addr)
                .await
                .expect("a connection");
            tcp.set_nodelay(true).expect("nodelay");
            let (mut ws, _) = async_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
                .await
                .expect("a handshake");
            let start = Instant::now();
            for _ in 0..n {
                ws.send(WsMessage::text(&*msg)).await.expect("sent");
                ws.next().await.expect("an echo").expect("a message");
            }
            start.elapsed()
        }))
        .expect("no panic")
    };
    // On stderr: the instruction counts are what this is for.
    eprintln!(
        "{who}: {:.1} µs per round trip",
        took.as_secs_f64() * 1e6 / n as f64
    );
}
