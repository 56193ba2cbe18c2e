//! HTTP: one client suite run against both backends on the ChaosServer,
//! the hyper pool's own behaviour, the ApiClient, and nginx as a real
//! third-party server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{eventually, fast_retry, within};
use futures_lite::{AsyncReadExt, StreamExt};
use smolkit::http::{
    ApiClient, Body, Client, Error, HyperClient, Method, Request, Response, StatusCode, header,
};
use smolkit::resilience::{CircuitBreaker, Window};
use smolkit::runtime::Clock;
use smolkit::testing::{ChaosServer, ManualClock, pattern};

fn req(method: Method, url: &str, body: Body) -> Request<Body> {
    let mut r = Request::new(body);
    *r.method_mut() = method;
    *r.uri_mut() = url.parse().expect("test URL");
    r
}

fn get(url: &str) -> Request<Body> {
    req(Method::GET, url, Body::empty())
}

async fn send(client: &dyn Client, r: Request<Body>) -> Response<Body> {
    client.send(r).await.expect("request failed")
}

async fn text(client: &dyn Client, url: &str) -> (StatusCode, String) {
    let r = send(client, get(url)).await;
    (r.status(), r.into_body().text().await.expect("body"))
}

fn header_of<'a>(r: &'a Response<Body>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------
// The shared suite: every test takes a client and runs against both backends.

async fn suite_echo_json_and_headers(client: &dyn Client) {
    let server = ChaosServer::start().await.unwrap();
    let mut r = req(
        Method::POST,
        &server.url("/echo?x=1"),
        Body::from_json(&serde_json::json!({"hello": "world", "n": 3})).unwrap(),
    );
    r.headers_mut()
        .insert("x-test", header::HeaderValue::from_static("yes"));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let response = send(client, r).await;
    assert_eq!(response.status(), StatusCode::OK);
    let echo: serde_json::Value = response.into_body().json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo?x=1");
    assert_eq!(echo["headers"]["x-test"], "yes");
    assert_eq!(echo["body"], serde_json::json!({"hello": "world", "n": 3}));
    // The server saw it too.
    let log = server.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].method, Method::POST);
    assert!(log[0].headers.contains_key(header::HOST));
}

async fn suite_status_codes(client: &dyn Client) {
    let server = ChaosServer::start().await.unwrap();
    for code in [200u16, 204, 404, 418, 500, 503] {
        let r = send(client, get(&server.url(&format!("/status/{code}")))).await;
        assert_eq!(r.status().as_u16(), code);
        let body = r.into_body().text().await.unwrap();
        if code != 204 {
            assert_eq!(body, format!("status {code}"));
        }
    }
    let (status, _) = text(client, &server.url("/no/such/route")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn suite_files_ranges(client: &dyn Client) {
    let data = pattern(10_000);
    let server = ChaosServer::builder()
        .with_file("data.bin", data.clone())
        .start()
        .await
        .unwrap();
    let url = server.url("/files/data.bin");
    let full = send(client, get(&url)).await;
    assert_eq!(full.status(), StatusCode::OK);
    let etag = header_of(&full, "etag").unwrap().to_owned();
    let modified = header_of(&full, "last-modified").unwrap().to_owned();
    assert_eq!(header_of(&full, "accept-ranges"), Some("bytes"));
    assert_eq!(&full.into_body().bytes().await.unwrap()[..], &data[..]);

    let ranged = |range: &str, if_range: Option<&str>| {
        let mut r = get(&url);
        r.headers_mut()
            .insert(header::RANGE, range.parse().unwrap());
        if let Some(v) = if_range {
            r.headers_mut().insert(header::IF_RANGE, v.parse().unwrap());
        }
        r
    };
    // a-b
    let r = send(client, ranged("bytes=100-199", None)).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header_of(&r, "content-range"), Some("bytes 100-199/10000"));
    assert_eq!(&r.into_body().bytes().await.unwrap()[..], &data[100..200]);
    // a-
    let r = send(client, ranged("bytes=9990-", None)).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.into_body().bytes().await.unwrap()[..], &data[9990..]);
    // -n
    let r = send(client, ranged("bytes=-5", None)).await;
    assert_eq!(
        header_of(&r, "content-range"),
        Some("bytes 9995-9999/10000")
    );
    assert_eq!(&r.into_body().bytes().await.unwrap()[..], &data[9995..]);
    // unsatisfiable
    let r = send(client, ranged("bytes=20000-", None)).await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header_of(&r, "content-range"), Some("bytes */10000"));
    drop(r);
    // If-Range: a matching ETag or date keeps the range, a stale one gets
    // the whole file.
    let r = send(client, ranged("bytes=0-9", Some(&etag))).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    drop(r.into_body().bytes().await.unwrap());
    let r = send(client, ranged("bytes=0-9", Some(&modified))).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    drop(r.into_body().bytes().await.unwrap());
    let r = send(client, ranged("bytes=0-9", Some("\"stale\""))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.into_body().bytes().await.unwrap().len(), 10_000);
    // HEAD: headers, no body.
    let r = send(client, req(Method::HEAD, &url, Body::empty())).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header_of(&r, "content-length"), Some("10000"));
    assert!(r.into_body().bytes().await.unwrap().is_empty());
}

async fn suite_faulty_bodies(client: &dyn Client) {
    let server = ChaosServer::start().await.unwrap();
    // Content-Length promises more than is sent.
    let r = send(client, get(&server.url("/truncate/100000?send=1000"))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.into_body();
    let mut got = 0usize;
    let mut failed = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => got += c.len(),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let failed = failed.expect("a truncated body must fail, not end quietly");
    assert!(failed.is_transport(), "{failed:?}");
    assert!(got <= 1000, "got {got} bytes");
    // A chunked body cut off mid-stream.
    let r = send(client, get(&server.url("/reset/100000?after=5000"))).await;
    let err = r.into_body().bytes().await.unwrap_err();
    assert!(err.is_transport(), "{err:?}");
    assert!(format!("{err:?}").contains("ConnectionReset"), "{err:?}");
    // The client is still usable afterwards.
    let (status, body) = text(client, &server.url("/status/200")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "status 200"));
    // A slow body arrives whole.
    let r = send(client, get(&server.url("/slow/600?bps=2000"))).await;
    assert_eq!(&r.into_body().bytes().await.unwrap()[..], &pattern(600)[..]);
    // A large body through the AsyncRead view.
    let r = send(client, get(&server.url("/bytes/3000000"))).await;
    let mut all = Vec::new();
    r.into_body()
        .into_reader()
        .read_to_end(&mut all)
        .await
        .unwrap();
    assert_eq!(all, pattern(3_000_000));
    // Read with a limit.
    let r = send(client, get(&server.url("/bytes/5000"))).await;
    match r.into_body().bytes_limited(4096).await {
        Err(Error::BodyTooLarge { limit: 4096 }) => {}
        other => panic!("expected BodyTooLarge, got {other:?}"),
    }
}

async fn suite_redirects(client: &dyn Client) {
    let a = ChaosServer::start().await.unwrap();
    let b = ChaosServer::start().await.unwrap();
    // A chain within the limit.
    let (status, body) = text(client, &a.url("/redirect/3")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "done"));
    // Beyond the limit (10).
    match client.send(get(&a.url("/redirect/11"))).await {
        Err(Error::TooManyRedirects { limit: 10, .. }) => {}
        other => panic!("expected TooManyRedirects, got {other:?}"),
    }
    // Never to another scheme.
    let evil = a.url("/redirect-to?url=file%3A%2F%2F%2Fetc%2Fpasswd");
    match client.send(get(&evil)).await {
        Err(Error::RedirectScheme { location }) => assert!(location.starts_with("file:")),
        other => panic!("expected RedirectScheme, got {other:?}"),
    }
    // Credentials stay on the origin.
    let with_credentials = |url: &str| {
        let mut r = get(url);
        let h = r.headers_mut();
        h.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
        h.insert(header::COOKIE, "session=1".parse().unwrap());
        h.insert("x-keep", "kept".parse().unwrap());
        r
    };
    let target = urlencode(&b.url("/echo"));
    let r = send(
        client,
        with_credentials(&a.url(&format!("/redirect-to?url={target}"))),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    drop(r.into_body().bytes().await.unwrap());
    let seen = &b.requests()[0];
    assert!(!seen.headers.contains_key(header::AUTHORIZATION));
    assert!(!seen.headers.contains_key(header::COOKIE));
    assert_eq!(seen.headers.get("x-keep").unwrap(), "kept");
    assert_eq!(
        seen.headers.get(header::HOST).unwrap().to_str().unwrap(),
        b.addr().to_string()
    );
    // Same origin: kept.
    a.reset();
    let r = send(client, with_credentials(&a.url("/redirect-to?url=%2Fecho"))).await;
    drop(r.into_body().bytes().await.unwrap());
    let log = a.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(
        log[1].headers.get(header::AUTHORIZATION).unwrap(),
        "Bearer secret"
    );
    // 307 resends the method and body; 303 turns into a GET without body.
    let r = send(
        client,
        req(
            Method::POST,
            &a.url("/redirect-to?url=%2Fecho&status=307"),
            Body::from("payload"),
        ),
    )
    .await;
    let echo: serde_json::Value = r.into_body().json().await.unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["body"].as_str()),
        (Some("POST"), Some("payload"))
    );
    let r = send(
        client,
        req(
            Method::POST,
            &a.url("/redirect-to?url=%2Fecho&status=303"),
            Body::from("payload"),
        ),
    )
    .await;
    let echo: serde_json::Value = r.into_body().json().await.unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["body"].as_str()),
        (Some("GET"), Some(""))
    );
}

async fn suite_bodies_from_files_and_streams(client: &dyn Client) {
    let server = ChaosServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload.txt");
    std::fs::write(&path, "from a file").unwrap();
    let body = Body::from_file(&path).await.unwrap();
    assert_eq!(body.len(), Some(11));
    let r = send(client, req(Method::PUT, &server.url("/echo"), body)).await;
    let echo: serde_json::Value = r.into_body().json().await.unwrap();
    assert_eq!(echo["body"], "from a file");
    assert_eq!(echo["headers"]["content-length"], "11");
    // A stream of unknown length goes chunked.
    let chunks = futures_lite::stream::iter(["a", "b", "c"].map(|s| Ok(bytes::Bytes::from(s))));
    let r = send(
        client,
        req(
            Method::POST,
            &server.url("/echo"),
            Body::from_stream(chunks, None),
        ),
    )
    .await;
    let echo: serde_json::Value = r.into_body().json().await.unwrap();
    assert_eq!(echo["body"], "abc");
    // A missing file is a typed error naming it.
    match Body::from_file(dir.path().join("missing")).await {
        Err(Error::File { path, .. }) => assert!(path.ends_with("missing")),
        other => panic!("expected Error::File, got {other:?}"),
    }
}

async fn suite_bad_targets(client: &dyn Client) {
    // A port nothing listens on: bind one, note it, close it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = client
        .send(get(&format!("http://127.0.0.1:{port}/")))
        .await
        .unwrap_err();
    assert!(err.is_transport(), "{err:?}");
    match client.send(get("ftp://127.0.0.1/")).await {
        Err(Error::UnsupportedScheme { url }) => assert!(url.starts_with("ftp://")),
        other => panic!("expected UnsupportedScheme, got {other:?}"),
    }
    match client.send(get("/relative/only")).await {
        Err(Error::InvalidUrl { .. }) => {}
        other => panic!("expected InvalidUrl, got {other:?}"),
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod hyper_backend {
            use super::*;
            $(#[test]
            fn $name() {
                within(|| smol::block_on(super::$name(&HyperClient::new())));
            })*
        }
        #[cfg(feature = "surf")]
        mod surf_backend {
            use super::*;
            $(#[test]
            fn $name() {
                within(|| smol::block_on(super::$name(&smolkit::http::SurfClient::default())));
            })*
        }
    };
}

suite!(
    suite_echo_json_and_headers,
    suite_status_codes,
    suite_files_ranges,
    suite_faulty_bodies,
    suite_redirects,
    suite_bodies_from_files_and_streams,
    suite_bad_targets,
);

// ---------------------------------------------------------------------------
// HyperClient's pool.

#[test]
fn keep_alive_reuses_one_connection() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let client = HyperClient::new();
            for _ in 0..10 {
                let (status, _) = text(&client, &server.url("/status/200")).await;
                assert_eq!(status, StatusCode::OK);
            }
            assert_eq!(server.connections(), 1);
            let stats = client.stats();
            assert_eq!(stats.connections_opened, 1);
            assert_eq!(stats.connections_reused, 9);
            assert_eq!((stats.open, stats.idle), (1, 1));
            // Every request carried the same connection.
            assert!(server.requests().iter().all(|r| r.connection == 1));
        })
    });
}

#[test]
fn connections_per_host_never_exceed_the_cap() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let client = HyperClient::builder()
                .with_max_connections_per_host(4)
                .build()
                .unwrap();
            let calls = (0..32).map(|_| {
                let client = client.clone();
                let url = server.url("/delay/20");
                smol::spawn(async move { text(&client, &url).await })
            });
            let calls: Vec<_> = calls.collect();
            for c in calls {
                assert_eq!(c.await.0, StatusCode::OK);
            }
            assert_eq!(server.requests().len(), 32);
            assert!(
                server.max_open_connections() <= 4,
                "server saw {} connections open at once",
                server.max_open_connections()
            );
            assert!(server.connections() <= 4);
            assert!(client.stats().connections_reused >= 28);
        })
    });
}

/// Two connections freed back to back must wake two waiters: a
/// notification that a woken-but-not-yet-run waiter absorbs (`notify(1)`
/// is not additive) left the second waiter asleep with a free slot (the
/// soak's stalled big-body loop).
#[test]
fn two_slots_freed_at_once_wake_two_waiters() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let client = HyperClient::builder()
                .with_max_connections_per_host(2)
                .with_keep_alive(false)
                .build()
                .unwrap();
            let get = |path: &str| {
                let (client, url) = (client.clone(), server.url(path));
                async move {
                    client
                        .send(Request::get(&url).body(Body::empty()).unwrap())
                        .await
                        .unwrap()
                }
            };
            // Two responses whose bodies are not read hold both slots.
            let held = [get("/bytes/10000000").await, get("/bytes/10000000").await];
            // Each waiter, once served, holds its slot too (body unread),
            // so a lost wake-up is not hidden by the other's release.
            let waiters: Vec<_> = (0..2)
                .map(|_| smol::spawn(get("/bytes/10000000")))
                .collect();
            eventually("two waiters", || client.stats().waiting == 2);
            // Both slots come back with no await in between.
            drop(held);
            let mut served = Vec::new();
            for w in waiters {
                let response = smolkit::resilience::timeout(Duration::from_secs(10), w)
                    .await
                    .expect("a waiter was never woken although a slot was free");
                assert_eq!(response.status(), StatusCode::OK);
                served.push(response);
            }
            assert_eq!(client.stats().waiting, 0);
            assert_eq!(client.stats().open, 2);
        })
    });
}

#[test]
fn idle_connections_expire_on_the_clock() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let clock = Arc::new(ManualClock::new());
            let client = HyperClient::builder()
                .with_idle_timeout(Duration::from_secs(10))
                .with_clock(clock.clone())
                .build()
                .unwrap();
            text(&client, &server.url("/status/200")).await;
            clock.advance(Duration::from_secs(9));
            text(&client, &server.url("/status/200")).await;
            assert_eq!(server.connections(), 1, "reused within the idle timeout");
            clock.advance(Duration::from_secs(10));
            text(&client, &server.url("/status/200")).await;
            assert_eq!(server.connections(), 2, "expired after the idle timeout");
            assert_eq!(client.stats().open, 1, "the expired connection was closed");
        })
    });
}

#[test]
fn a_body_dropped_unread_closes_its_connection() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let client = HyperClient::new();
            let r = send(&client, get(&server.url("/bytes/1000000"))).await;
            drop(r);
            eventually("the connection is given up", || client.stats().open == 0);
            text(&client, &server.url("/status/200")).await;
            assert_eq!(server.connections(), 2);
        })
    });
}

#[test]
fn a_body_read_elsewhere_drives_its_connection_and_gives_it_back() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let client = HyperClient::new();
            // The request on one task, its 4 MiB body read on another
            // thread once that task has ended: a connection has no task of
            // its own, so the body alone moves it on.
            let url = server.url("/bytes/4194304");
            let c = client.clone();
            let r = smol::spawn(async move { send(&c, get(&url)).await }).await;
            let read = std::thread::spawn(move || smol::block_on(r.into_body().bytes()));
            let n = read.join().unwrap().unwrap().len();
            assert_eq!(n, 4 << 20);
            assert_eq!(client.stats().idle, 1, "back in the pool at the end");
            text(&client, &server.url("/status/200")).await;
            assert_eq!(server.connections(), 1, "and reused");
        })
    });
}

#[test]
fn a_restarted_server_is_reached_on_a_new_connection() {
    within(|| {
        smol::block_on(async {
            let first = ChaosServer::start().await.unwrap();
            let client = HyperClient::new();
            text(&client, &first.url("/status/200")).await;
            first.shutdown();
            eventually("the old server closed", || first.open_connections() == 0);
            let second = common::restart(first).await;
            let (status, _) = text(&client, &second.url("/status/200")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(second.connections(), 1);
        })
    });
}

#[test]
fn response_timeout_on_the_manual_clock() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let clock = Arc::new(ManualClock::new());
            let client = HyperClient::builder()
                .with_clock(clock.clone())
                .with_response_timeout(Some(Duration::from_secs(2)))
                .build()
                .unwrap();
            let url = server.url("/delay/600000");
            let call = smol::spawn({
                let client = client.clone();
                async move { client.send(get(&url)).await }
            });
            eventually("the request reached the server", || {
                server.requests().len() == 1
            });
            clock.advance(Duration::from_secs(2));
            match call.await {
                Err(Error::Timeout { after, .. }) => assert_eq!(after, Duration::from_secs(2)),
                other => panic!("expected Timeout, got {other:?}"),
            }
        })
    });
}

#[test]
fn tls_with_the_servers_certificate_and_without() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::builder().with_tls(true).start().await.unwrap();
            assert!(server.url("/").starts_with("https://"));
            let pem = server.certificate_pem().unwrap().as_bytes().to_vec();
            let trusted = HyperClient::builder()
                .with_root_pem(&pem)
                .unwrap()
                .build()
                .unwrap();
            let (status, body) = text(&trusted, &server.url("/status/200")).await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "status 200"));
            let localhost = server.url("/status/200").replace("127.0.0.1", "localhost");
            let (status, _) = text(&trusted, &localhost).await;
            assert_eq!(status, StatusCode::OK);
            // webpki's roots alone do not trust a self-signed certificate.
            match HyperClient::new()
                .send(get(&server.url("/status/200")))
                .await
            {
                Err(e @ Error::Tls { .. }) => {
                    assert!(!e.is_transport());
                    assert!(e.to_string().contains("127.0.0.1"), "{e}");
                }
                other => panic!("expected a TLS error, got {other:?}"),
            }
            // A PEM without a certificate is refused up front.
            let err = HyperClient::builder()
                .with_root_pem(b"not pem")
                .unwrap_err();
            assert_eq!(
                (err.setting, err.value.as_str()),
                ("root certificate", "not pem")
            );
        })
    });
}

// ---------------------------------------------------------------------------
// ApiClient.

#[derive(Debug, serde::Deserialize, PartialEq)]
struct Flaky {
    key: String,
    calls: u64,
}

#[test]
fn api_retries_flaky_gets_and_parses_json() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let api = ApiClient::builder(&server.url("/"))
                .with_header("x-api-key", "k")
                .with_retry(fast_retry(4))
                .build()
                .unwrap();
            let out: Flaky = api
                .get("/flaky/a")
                .query(&[("fail", "2")])
                .json()
                .await
                .unwrap();
            assert_eq!(
                out,
                Flaky {
                    key: "a".into(),
                    calls: 3
                }
            );
            let log = server.requests();
            assert_eq!(log.len(), 3);
            assert!(
                log.iter()
                    .all(|r| r.headers.get("x-api-key").unwrap() == "k")
            );
            assert!(
                log.iter()
                    .all(|r| r.headers.get("accept").unwrap() == "application/json")
            );
            let stats = api.stats();
            assert_eq!(
                (stats.calls, stats.succeeded, stats.retries, stats.in_flight),
                (1, 1, 2, 0)
            );
            // Exhausted: the last status is the error, with an excerpt.
            match api.get("flaky/b?fail=9&status=502").send().await {
                Err(Error::Status {
                    status, excerpt, ..
                }) => {
                    assert_eq!(status, StatusCode::BAD_GATEWAY);
                    assert!(excerpt.contains("flaky b"), "{excerpt}");
                }
                other => panic!("expected a 502, got {other:?}"),
            }
            assert_eq!(server.requests().len(), 3 + 4);
        })
    });
}

#[test]
fn api_honours_retry_after_seconds_and_dates() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let clock = Arc::new(ManualClock::new());
            // No per-attempt timeout: the retry's sleep is then the only
            // sleeper on the clock.
            let api = ApiClient::builder(&server.url("/"))
                .with_clock(clock.clone())
                .with_timeout(None)
                .with_retry(fast_retry(3))
                .build()
                .unwrap();
            for (path, low, high) in [
                ("flaky/s?fail=1&status=429&retry_after=7", 7, 7),
                ("flaky/d?fail=1&status=503&retry_after=date:30", 28, 30),
            ] {
                let start = clock.now();
                let call = smol::spawn({
                    let api = api.clone();
                    async move { api.get(path).send().await }
                });
                clock.wait_for_sleepers(1).await;
                let wait = clock.next_deadline().unwrap() - start;
                assert!(
                    wait >= Duration::from_secs(low) && wait <= Duration::from_secs(high),
                    "{path}: waiting {wait:?}"
                );
                clock.advance_to_next();
                let r = call.await.unwrap();
                assert_eq!((r.status, r.attempts), (StatusCode::OK, 2));
            }
        })
    });
}

#[test]
fn api_does_not_retry_post_unless_told() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let api = ApiClient::builder(&server.url("/"))
                .with_retry(fast_retry(3))
                .build()
                .unwrap();
            let err = api
                .post("flaky/p?fail=1")
                .json_body(&[1, 2])
                .send()
                .await
                .unwrap_err();
            assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
            assert_eq!(server.requests().len(), 1);
            let r = api
                .post("flaky/q?fail=1")
                .json_body(&[1, 2])
                .retry_non_idempotent()
                .send()
                .await
                .unwrap();
            assert_eq!(r.attempts, 2);
            // A 404 is final whatever the method.
            let err = api.get("status/404").send().await.unwrap_err();
            assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
            assert_eq!(server.requests().len(), 1 + 2 + 1);
            // PUT and DELETE are idempotent: retried.
            let r = api.put("flaky/u?fail=1").body("x").send().await.unwrap();
            assert_eq!(r.attempts, 2);
            let r = api.delete("flaky/v?fail=1").send().await.unwrap();
            assert_eq!(r.attempts, 2);
            // PATCH is not.
            assert!(api.patch("flaky/w?fail=1").send().await.is_err());
        })
    });
}

#[test]
fn api_bad_input_gives_typed_errors() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let err = ApiClient::builder("not a url").build().unwrap_err();
            assert_eq!((err.setting, err.value.as_str()), ("base_url", "not a url"));
            let err = ApiClient::builder("ftp://example.com/")
                .build()
                .unwrap_err();
            assert_eq!(err.setting, "base_url");
            assert!(err.reason.contains("ftp"), "{err}");
            let err = ApiClient::builder(&server.url("/"))
                .with_header("bad header", "x")
                .build()
                .unwrap_err();
            assert_eq!(
                (err.setting, err.value.as_str()),
                ("header", "bad header: x")
            );
            let err = ApiClient::builder(&server.url("/"))
                .with_concurrency_limit(0)
                .build()
                .unwrap_err();
            assert_eq!(err, smolkit::ConfigError::zero("concurrency_limit"));
            let err = HyperClient::builder()
                .with_max_connections_per_host(0)
                .build()
                .unwrap_err();
            assert_eq!(err.setting, "max_connections_per_host");
            let api = ApiClient::builder(&server.url("/api/"))
                .with_body_limit(1000)
                .build()
                .unwrap();
            match api.get("http://elsewhere.example/").send().await {
                Err(Error::InvalidUrl { url, .. }) => assert!(url.contains("elsewhere")),
                other => panic!("expected InvalidUrl, got {other:?}"),
            }
            #[derive(Debug, serde::Deserialize)]
            #[allow(dead_code)]
            struct Thing {
                id: u64,
            }
            let api = ApiClient::builder(&server.url("/"))
                .with_body_limit(1000)
                .build()
                .unwrap();
            match api.get("status/200").json::<Thing>().await {
                Err(Error::Json {
                    status, excerpt, ..
                }) => {
                    assert_eq!(status, Some(StatusCode::OK));
                    assert_eq!(excerpt, "status 200");
                }
                other => panic!("expected a JSON error, got {other:?}"),
            }
            match api.get("bytes/5000").send().await {
                Err(Error::BodyTooLarge { limit: 1000 }) => {}
                other => panic!("expected BodyTooLarge, got {other:?}"),
            }
            match api.get("x").header("bad\nname", "v").send().await {
                Err(Error::InvalidRequest { .. }) => {}
                other => panic!("expected InvalidRequest, got {other:?}"),
            }
            // The base path is kept whether or not the path has a leading /.
            let api = ApiClient::builder(&server.url("/api")).build().unwrap();
            let _ = api.get("/status/200").send().await;
            let _ = api.get("status/200").send().await;
            let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
            assert_eq!(
                &paths[paths.len() - 2..],
                ["/api/status/200", "/api/status/200"]
            );
        })
    });
}

#[test]
fn api_breaker_per_host_opens_and_rejects_without_sending() {
    within(|| {
        smol::block_on(async {
            let sick = ChaosServer::start().await.unwrap();
            let clock = Arc::new(ManualClock::new());
            let breaker = CircuitBreaker::builder()
                .with_window(Window::Count(2))
                .with_min_calls(2)
                .with_failure_rate(0.5)
                .with_clock(clock.clone());
            let api = ApiClient::builder(&sick.url("/"))
                .with_retry(None)
                .with_breaker(breaker)
                .build()
                .unwrap();
            for _ in 0..2 {
                let e = api.get("status/503").send().await.unwrap_err();
                assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
            }
            let host = sick.addr().to_string();
            match api.get("status/200").send().await {
                Err(Error::CircuitOpen {
                    host: h,
                    retry_after,
                }) => {
                    assert_eq!(h, host);
                    assert!(retry_after > Duration::ZERO);
                }
                other => panic!("expected CircuitOpen, got {other:?}"),
            }
            assert_eq!(sick.requests().len(), 2, "the rejected call was not sent");
            assert_eq!(api.stats().rejected, 1);
            // Another host has its own breaker.
            let healthy = ChaosServer::start().await.unwrap();
            let other = ApiClient::builder(&healthy.url("/")).build().unwrap();
            assert!(other.get("status/200").send().await.is_ok());
            // After the open time, a probe goes through and closes it.
            clock.advance(Duration::from_secs(60));
            for _ in 0..3 {
                api.get("status/200").send().await.unwrap();
            }
            assert_eq!(
                api.breaker(&host).unwrap().state(),
                smolkit::resilience::State::Closed
            );
        })
    });
}

#[test]
fn api_batch_keeps_input_order_under_a_concurrency_limit() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let api = ApiClient::builder(&server.url("/"))
                .with_retry(None)
                .with_concurrency_limit(2)
                .build()
                .unwrap();
            let paths = [
                "delay/40",
                "status/404",
                "delay/5",
                "flaky/z?fail=0",
                "delay/20",
                "status/201",
            ];
            let results = api.batch(paths.iter().map(|p| api.get(p)), 4).await;
            let statuses: Vec<Option<u16>> = results
                .iter()
                .map(|r| match r {
                    Ok(r) => Some(r.status.as_u16()),
                    Err(e) => e.status().map(|s| s.as_u16()),
                })
                .collect();
            assert_eq!(
                statuses,
                [
                    Some(200),
                    Some(404),
                    Some(200),
                    Some(200),
                    Some(200),
                    Some(201)
                ]
            );
            assert_eq!(results[0].as_ref().unwrap().text(), "delayed");
            assert!(
                server.max_open_connections() <= 2,
                "{}",
                server.max_open_connections()
            );
            let stats = api.stats();
            assert_eq!((stats.calls, stats.succeeded, stats.failed), (6, 5, 1));
        })
    });
}

#[test]
fn api_timeout_per_attempt_on_the_manual_clock() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let clock = Arc::new(ManualClock::new());
            let api = ApiClient::builder(&server.url("/"))
                .with_clock(clock.clone())
                .with_timeout(Some(Duration::from_secs(5)))
                .with_retry(None)
                .build()
                .unwrap();
            let call = smol::spawn({
                let api = api.clone();
                async move { api.get("delay/600000").send().await }
            });
            eventually("the request reached the server", || {
                server.requests().len() == 1
            });
            clock.advance(Duration::from_secs(5));
            match call.await {
                Err(Error::Timeout { after, url }) => {
                    assert_eq!(after, Duration::from_secs(5));
                    assert!(url.ends_with("/delay/600000"));
                }
                other => panic!("expected Timeout, got {other:?}"),
            }
        })
    });
}

// ---------------------------------------------------------------------------
// nginx, a real third-party server (started by .ci/run).

/// `(base URL, root folder)` of the nginx that `.ci/run` started, or `None`
/// outside CI. In CI (`SMOLKIT_REQUIRE_SERVICES=1`) a missing nginx fails.
fn nginx() -> Option<(String, std::path::PathBuf)> {
    match (
        std::env::var("SMOLKIT_NGINX_URL"),
        std::env::var("SMOLKIT_NGINX_ROOT"),
    ) {
        (Ok(url), Ok(root)) => Some((url, root.into())),
        _ => {
            assert!(
                std::env::var_os("SMOLKIT_REQUIRE_SERVICES").is_none(),
                "SMOLKIT_NGINX_URL / SMOLKIT_NGINX_ROOT are not set but services are required"
            );
            eprintln!("nginx not configured (SMOLKIT_NGINX_URL); skipping");
            None
        }
    }
}

#[test]
fn nginx_files_ranges_and_keep_alive() {
    let Some((base, root)) = nginx() else { return };
    within(move || {
        smol::block_on(async move {
            let client = HyperClient::new();
            let small = std::fs::read(root.join("small.txt")).unwrap();
            let big = std::fs::read(root.join("big.bin")).unwrap();
            let r = send(&client, get(&format!("{base}/small.txt"))).await;
            assert_eq!(r.status(), StatusCode::OK);
            assert!(header_of(&r, "server").unwrap().starts_with("nginx"));
            assert_eq!(&r.into_body().bytes().await.unwrap()[..], &small[..]);
            let r = send(&client, get(&format!("{base}/big.bin"))).await;
            let etag = header_of(&r, "etag").unwrap().to_owned();
            assert_eq!(&r.into_body().bytes().await.unwrap()[..], &big[..]);
            let mut ranged = get(&format!("{base}/big.bin"));
            ranged
                .headers_mut()
                .insert(header::RANGE, "bytes=1000-1999".parse().unwrap());
            ranged
                .headers_mut()
                .insert(header::IF_RANGE, etag.parse().unwrap());
            let r = send(&client, ranged).await;
            assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
            assert_eq!(&r.into_body().bytes().await.unwrap()[..], &big[1000..2000]);
            let (status, _) = text(&client, &format!("{base}/missing")).await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            // All of it on one kept-alive connection.
            assert_eq!(client.stats().connections_opened, 1);
            assert_eq!(client.stats().connections_reused, 3);
            #[cfg(feature = "surf")]
            {
                let surf = smolkit::http::SurfClient::default();
                let r = send(&surf, get(&format!("{base}/big.bin"))).await;
                assert_eq!(&r.into_body().bytes().await.unwrap()[..], &big[..]);
            }
        })
    });
}

/// Issue 15 #1: the pool's `Host` → idle connection → slot → `Arc<Host>`
/// cycle kept every idle socket and its task alive after the last handle
/// was dropped. Counted on the server's side.
#[test]
fn dropping_the_last_client_closes_its_idle_connections() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let client = HyperClient::new();
            let url = server.url("/delay/30");
            let calls: Vec<_> = (0..4)
                .map(|_| {
                    let client = client.clone();
                    let url = url.clone();
                    smol::spawn(async move { text(&client, &url).await })
                })
                .collect();
            for call in calls {
                assert_eq!(call.await.0, StatusCode::OK);
            }
            assert_eq!(client.stats().idle, 4);
            assert_eq!(server.open_connections(), 4);
            drop(client);
            eventually("the server sees every connection closed", || {
                server.open_connections() == 0
            });
        })
    });
}

#[test]
fn close_refuses_new_requests_and_keep_alive_off_opens_one_connection_each() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let client = HyperClient::builder()
                .with_keep_alive(false)
                .build()
                .unwrap();
            for _ in 0..3 {
                assert_eq!(
                    text(&client, &server.url("/status/200")).await.0,
                    StatusCode::OK
                );
            }
            assert_eq!(server.connections(), 3);
            assert_eq!(client.stats().idle, 0);
            eventually("each connection closed after its response", || {
                server.open_connections() == 0
            });

            let pooled = HyperClient::new();
            assert_eq!(
                text(&pooled, &server.url("/status/200")).await.0,
                StatusCode::OK
            );
            assert_eq!(pooled.stats().idle, 1);
            pooled.close();
            assert!(pooled.is_closed());
            assert_eq!(pooled.stats().idle, 0);
            match pooled.send(get(&server.url("/status/200"))).await {
                Err(Error::Closed) => {}
                other => panic!("expected Closed, got {:?}", other.map(|r| r.status())),
            }
        })
    });
}

/// Issue 13 #10: the ApiClient's default pool (16 per host) silently capped
/// a larger concurrency limit.
#[test]
fn the_default_pool_follows_the_api_concurrency_limit() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::start().await.unwrap();
            let api = ApiClient::builder(&server.url("/"))
                .with_concurrency_limit(24)
                .build()
                .unwrap();
            let results = api.batch((0..24).map(|_| api.get("delay/200")), 24).await;
            assert!(results.iter().all(|r| r.is_ok()));
            assert!(
                server.max_open_connections() > 16,
                "at most {} connections were open at once",
                server.max_open_connections()
            );
        })
    });
}
