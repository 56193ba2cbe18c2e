//! The hyper client's pools are per origin: scheme, host and port, with
//! scheme and host compared without regard to case.

mod common;

use common::{eventually, within};
use smolkit::http::{Body, Client, HyperClient, Request, Response, StatusCode};
use smolkit::testing::ChaosServer;

async fn send(client: &HyperClient, url: &str) -> Response<Body> {
    client
        .send(Request::get(url).body(Body::empty()).unwrap())
        .await
        .unwrap()
}

#[test]
fn a_held_origin_does_not_hold_back_another_port_and_case_does_not_split_a_pool() {
    within(|| {
        smol::block_on(async {
            let (a, b) = (
                ChaosServer::start().await.unwrap(),
                ChaosServer::start().await.unwrap(),
            );
            let client = HyperClient::builder()
                .with_max_connections_per_host(1)
                .build()
                .unwrap();
            // A's one connection, held by a body not read yet.
            let held = send(&client, &a.url("/bytes/10000000")).await;
            // B: the same host on another port, a pool of its own, asked
            // for right after A (the pool asked for last is remembered).
            let other = send(&client, &b.url("/bytes/10")).await;
            assert_eq!(other.status(), StatusCode::OK);
            assert_eq!(other.into_body().bytes().await.unwrap().len(), 10);
            // A again, its scheme and host in upper case: A's pool, so it
            // waits for the held connection.
            let upper = a.url("/bytes/10").replace("http://", "HTTP://");
            let waiter = {
                let client = client.clone();
                smol::spawn(async move { send(&client, &upper).await })
            };
            eventually("the upper-case request to wait for A's connection", || {
                client.stats().waiting == 1
            });
            drop(held);
            let served = waiter.await;
            assert_eq!(served.into_body().bytes().await.unwrap().len(), 10);
            // (A's held connection closed unread: the waiter got a new one.)
            assert_eq!(b.connections(), 1);
        })
    });
}
