//! `ChaosServer`: a real HTTP and WebSocket server on `127.0.0.1:0` with
//! routes that misbehave on purpose, for testing clients (smolkit's and
//! yours).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ::http::header::{
    CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE, LAST_MODIFIED, LOCATION, RANGE,
    RETRY_AFTER,
};
use ::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use async_net::{TcpListener, TcpStream};
use bytes::Bytes;
use event_listener::Event;
use futures_lite::FutureExt;
use smol_hyper::rt::{FuturesIo, SmolTimer};

use super::chaos_ws::{WsRecord, WsState, upgrade};
use crate::http::{Body, Error as HttpError};
use crate::net::MaybeTls;
use crate::runtime::{Spawn, SpawnExt, default_spawner};
use crate::sync::lock_std as lock;
use crate::ws::Message;

/// One request the server received, for tests to assert on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RequestRecord {
    /// The method.
    pub method: Method,
    /// The path and query.
    pub path: String,
    /// The headers as received.
    pub headers: HeaderMap,
    /// Which accepted connection carried it (1 for the first).
    pub connection: u64,
}

/// A real HTTP/1.1 server on a loopback port with fault-injecting routes.
///
/// Runs hyper on smol (any [`Spawn`]), with hyper's header-read timer on
/// [`SmolTimer`]. Optional TLS with a certificate generated at start
/// ([`certificate_pem`](ChaosServer::certificate_pem) gives it to a client
/// as a root). Every request is logged ([`requests`](ChaosServer::requests)),
/// and connections are counted as the server sees them
/// ([`connections`](ChaosServer::connections),
/// [`max_open_connections`](ChaosServer::max_open_connections)).
///
/// # Routes
///
/// | route | what it does |
/// | --- | --- |
/// | `GET/HEAD /files/{name}` | a file added with [`ChaosBuilder::file`] or found in [`ChaosBuilder::dir`], with `ETag`, `Last-Modified`, `Accept-Ranges`; `Range: bytes=a-b`, `a-` or `-n` gives 206 with `Content-Range`, an unsatisfiable range 416; `If-Range` with a stale ETag or date gives the whole file (200) |
/// | `ANY /echo` | JSON: `method`, `path`, `headers` (lower-case names), `body` (parsed JSON, else text) |
/// | `ANY /status/{code}` | that status, body `status {code}`; `?retry_after=N` adds the header |
/// | `ANY /delay/{ms}` | answers 200 `delayed` after `ms` milliseconds (real time) |
/// | `ANY /flaky/{key}?fail=N&status=S&retry_after=R` | the first `N` calls per key answer `S` (default 503) with `Retry-After: R` (seconds, or `date:R` for an HTTP date R seconds ahead); later calls answer 200 with JSON `{"key":..,"calls":..}` |
/// | `GET /bytes/{n}` | `n` bytes (a repeating pattern, Content-Length set), streamed in 64 KiB chunks |
/// | `GET /truncate/{n}?send=m` | promises `Content-Length: n`, sends `m` bytes (default n/2), closes |
/// | `GET /reset/{n}?after=m` | a chunked body cut off after `m` bytes (default n/2) by a connection reset (TCP RST: SO_LINGER 0, then close) |
/// | `GET /slow/{n}?bps=B` | `n` bytes at `B` bytes per second (default 1024), in tenth-of-a-second chunks |
/// | `GET /redirect/{n}` | 302 to `/redirect/{n-1}`; `/redirect/0` answers 200 `done` |
/// | `ANY /redirect-to?url=U&status=S` | `S` (default 302) with `Location: U` |
/// | `GET /ws` (WebSocket) | echoes each text or binary message; the options below combine |
/// | `/ws?mode=broadcast` | each message goes to every connection in broadcast mode (the sender too) instead of an echo |
/// | `/ws?ack=1` | answers `{"type":"ack","id":..}` for every envelope with an `id` (batch and compressed frames decoded); `echo=0` turns the echo off |
/// | `/ws?drop_after=N&drops=D&key=K` | drops the connection (no close frame) on receiving its `N`th message, before answering it; with `drops`, only the first `D` connections using key `K` |
/// | `/ws?mute_after=N` (or `mute=1`) | stops reading after `N` messages (0 at once): pings go unanswered |
/// | `/ws?refuse=N&key=K&status=S&retry_after=R` | the first `N` handshakes with key `K` answer `S` (default 503) with `Retry-After: R` |
///
/// The WebSocket side logs what it receives
/// ([`ws_messages`](ChaosServer::ws_messages)), can drop every connection
/// ([`drop_ws_connections`](ChaosServer::drop_ws_connections)) or push to
/// all of them ([`ws_send_all`](ChaosServer::ws_send_all)); on
/// [`shutdown`](ChaosServer::shutdown) it closes them with 1001 (going
/// away).
///
/// Unknown routes answer 404.
///
/// # Examples
///
/// ```
/// use smolkit::http::{ApiClient, Error};
/// use smolkit::testing::ChaosServer;
///
/// # smol::block_on(async {
/// let server = ChaosServer::start().await.unwrap();
/// let api = ApiClient::builder(&server.url("/")).build().unwrap();
/// let err = api.get("status/404").send().await.unwrap_err();
/// assert_eq!(err.status().map(|s| s.as_u16()), Some(404));
/// assert_eq!(server.requests().len(), 1);
/// # });
/// ```
pub struct ChaosServer {
    addr: SocketAddr,
    tls: bool,
    cert_pem: Option<String>,
    state: Arc<State>,
}

pub(crate) struct State {
    files: HashMap<String, Bytes>,
    dir: Option<PathBuf>,
    log: Mutex<Vec<RequestRecord>>,
    flaky: Mutex<HashMap<String, u64>>,
    accepted: AtomicU64,
    open: AtomicUsize,
    max_open: AtomicUsize,
    pub(crate) stop: Event,
    pub(crate) stopped: std::sync::atomic::AtomicBool,
    started: SystemTime,
    pub(crate) spawner: Arc<dyn Spawn>,
    pub(crate) ws: WsState,
}

/// Configures a [`ChaosServer`].
pub struct ChaosBuilder {
    files: HashMap<String, Bytes>,
    dir: Option<PathBuf>,
    tls: bool,
    addr: SocketAddr,
    spawner: Arc<dyn Spawn>,
    ws_log_limit: usize,
}

impl fmt::Debug for ChaosBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosBuilder")
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("dir", &self.dir)
            .field("tls", &self.tls)
            .field("addr", &self.addr)
            .finish()
    }
}

impl ChaosBuilder {
    /// Serves `bytes` at `/files/{name}`.
    pub fn with_file(mut self, name: &str, bytes: impl Into<Bytes>) -> Self {
        self.files.insert(name.to_owned(), bytes.into());
        self
    }

    /// Serves the files of `dir` at `/files/{name}` (no subfolders; names
    /// with `/` or `..` are refused).
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Serves HTTPS with a self-signed certificate for `localhost` and
    /// `127.0.0.1`, generated at start.
    pub fn with_tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// Binds this address instead of `127.0.0.1:0` (to restart a server
    /// on the port a client knows).
    pub fn with_addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// How many WebSocket messages [`ChaosServer::ws_messages`] keeps
    /// (default 100 000; later ones are not logged). 0 for load tests.
    pub fn with_ws_log_limit(mut self, n: usize) -> Self {
        self.ws_log_limit = n;
        self
    }

    /// Where the server's tasks run (default: smol's global executor).
    pub fn with_spawner(mut self, spawner: impl Spawn + 'static) -> Self {
        self.spawner = Arc::new(spawner);
        self
    }

    /// Binds and starts serving.
    ///
    /// # Errors
    ///
    /// The bind error, or an `InvalidData` error if the TLS certificate
    /// cannot be generated.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes drops the listener; no server
    /// runs.
    pub async fn start(self) -> io::Result<ChaosServer> {
        let listener = TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let (acceptor, cert_pem) = if self.tls {
            let (config, pem) = tls_server_config()?;
            (
                Some(futures_rustls::TlsAcceptor::from(Arc::new(config))),
                Some(pem),
            )
        } else {
            (None, None)
        };
        let state = Arc::new(State {
            files: self.files,
            dir: self.dir,
            log: Mutex::new(Vec::new()),
            flaky: Mutex::new(HashMap::new()),
            accepted: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            stop: Event::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            started: SystemTime::now(),
            spawner: self.spawner.clone(),
            ws: WsState::new(self.ws_log_limit),
        });
        let spawner = self.spawner.clone();
        let accept_state = state.clone();
        self.spawner
            .spawn_named(
                "chaos-accept",
                accept_loop(listener, acceptor, accept_state, spawner),
            )
            .detach();
        tracing::debug!(%addr, tls = self.tls, "chaos server started");
        Ok(ChaosServer {
            addr,
            tls: self.tls,
            cert_pem,
            state,
        })
    }
}

impl ChaosServer {
    /// A builder: no files, plain HTTP, `127.0.0.1:0`.
    pub fn builder() -> ChaosBuilder {
        ChaosBuilder {
            files: HashMap::new(),
            dir: None,
            tls: false,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            spawner: default_spawner(),
            ws_log_limit: 100_000,
        }
    }

    /// A plain HTTP server with no files.
    ///
    /// # Errors
    ///
    /// The bind error.
    ///
    /// # Cancel safety
    ///
    /// As [`ChaosBuilder::start`].
    pub async fn start() -> io::Result<ChaosServer> {
        ChaosServer::builder().start().await
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:{port}{path}` (`https` in TLS mode; the
    /// certificate also names `localhost`).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// The generated certificate in PEM, in TLS mode.
    pub fn certificate_pem(&self) -> Option<&str> {
        self.cert_pem.as_deref()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.log).clone()
    }

    /// Forgets the request log, the flaky routes' counts, the WebSocket
    /// message log and its refusal and drop counts.
    pub fn reset(&self) {
        lock(&self.state.log).clear();
        lock(&self.state.flaky).clear();
        self.state.ws.clear();
    }

    /// `ws://127.0.0.1:{port}{path}` (`wss` in TLS mode).
    pub fn ws_url(&self, path: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Every data message the WebSocket endpoint received, in order.
    pub fn ws_messages(&self) -> Vec<WsRecord> {
        self.state.ws.messages()
    }

    /// WebSocket connections accepted so far.
    pub fn ws_connections(&self) -> u64 {
        self.state.ws.accepted()
    }

    /// WebSocket connections open now.
    pub fn ws_open_connections(&self) -> usize {
        self.state.ws.open()
    }

    /// Drops every open WebSocket connection at once, without a close
    /// frame (as a crashed proxy would).
    pub fn drop_ws_connections(&self) {
        self.state.ws.drop_all();
    }

    /// Sends `message` to every open WebSocket connection; returns how
    /// many took it.
    pub fn ws_send_all(&self, message: impl Into<Message>) -> usize {
        self.state.ws.send_all(message.into())
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::Acquire)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::Acquire)
    }

    /// The most connections that were open at once.
    pub fn max_open_connections(&self) -> usize {
        self.state.max_open.load(Ordering::Acquire)
    }

    /// Stops accepting and closes every connection (also on drop).
    pub fn shutdown(&self) {
        self.state.stopped.store(true, Ordering::Release);
        self.state.stop.notify(usize::MAX);
    }
}

impl Drop for ChaosServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for ChaosServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosServer")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .field("connections", &self.connections())
            .finish()
    }
}

fn tls_server_config() -> io::Result<(rustls::ServerConfig, String)> {
    let bad = |e: &dyn fmt::Display| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let key =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(|e| bad(&e))?;
    let pem = key.cert.pem();
    let cert = key.cert.der().clone();
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(&e))?
    .with_no_client_auth()
    .with_single_cert(vec![cert], private)
    .map_err(|e| bad(&e))?;
    Ok((config, pem))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<futures_rustls::TlsAcceptor>,
    state: Arc<State>,
    spawner: Arc<dyn Spawn>,
) {
    loop {
        let stop = state.stop.listen();
        if state.stopped.load(Ordering::Acquire) {
            return;
        }
        let accepted = async { Some(listener.accept().await) }
            .or(async {
                stop.await;
                None
            })
            .await;
        let Some(accepted) = accepted else { return };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "chaos server accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = state.accepted.fetch_add(1, Ordering::AcqRel) + 1;
        let now = state.open.fetch_add(1, Ordering::AcqRel) + 1;
        state.max_open.fetch_max(now, Ordering::AcqRel);
        let state = state.clone();
        let acceptor = acceptor.clone();
        // NOTE: a second handle on the socket, for `/reset` to set
        // SO_LINGER 0; it is dropped with the service when the connection
        // ends, so the socket still closes then.
        let raw = stream.clone();
        spawner
            .spawn_named("chaos-conn", async move {
                let stop = state.stop.listen();
                let serve = async {
                    let io = match acceptor {
                        Some(a) => match a.accept(stream).await {
                            Ok(tls) => MaybeTls::Tls(Box::new(tls)),
                            Err(e) => {
                                tracing::debug!(error = %e, "chaos server TLS handshake failed");
                                return;
                            }
                        },
                        None => MaybeTls::Plain(stream),
                    };
                    serve_connection(io, state.clone(), id, raw).await;
                };
                if !state.stopped.load(Ordering::Acquire) {
                    serve.or(stop).await;
                }
                state.open.fetch_sub(1, Ordering::AcqRel);
            })
            .detach();
    }
}

async fn serve_connection(io: ServerIo, state: Arc<State>, id: u64, raw: TcpStream) {
    let raw = Arc::new(raw);
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (state, raw) = (state.clone(), raw.clone());
        async move { Ok::<_, std::convert::Infallible>(route(req, &state, id, &raw).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(SmolTimer::new())
        .keep_alive(true)
        .serve_connection(FuturesIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(e) = result {
        tracing::trace!(error = %e, "chaos connection ended");
    }
}

pub(crate) fn text(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::from_bytes(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

fn query(req: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

async fn route(
    req: Request<hyper::body::Incoming>,
    state: &Arc<State>,
    connection: u64,
    raw: &TcpStream,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    lock(&state.log).push(RequestRecord {
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_owned()),
        headers: req.headers().clone(),
        connection,
    });
    let q = query(&req);
    let num = |s: &str| s.parse::<u64>().ok();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    match (segments[0], segments.get(1).copied()) {
        ("echo", _) => echo(req).await,
        ("ws", None) => upgrade(req, state, &q),
        ("status", Some(code)) => match code.parse::<u16>() {
            Ok(c) if (200..600).contains(&c) => {
                let mut r = text(c, format!("status {c}"));
                if let Some(ra) = q
                    .get("retry_after")
                    .and_then(|v| HeaderValue::from_str(v).ok())
                {
                    r.headers_mut().insert(RETRY_AFTER, ra);
                }
                r
            }
            _ => text(400, format!("bad status {code:?}")),
        },
        ("delay", Some(ms)) => match num(ms) {
            Some(ms) => {
                async_io::Timer::after(Duration::from_millis(ms)).await;
                text(200, "delayed")
            }
            None => text(400, "bad delay"),
        },
        ("flaky", Some(key)) => flaky(key, &q, state),
        ("bytes", Some(n)) => match num(n) {
            Some(n) => pattern_body(n, n, false, None),
            None => text(400, "bad length"),
        },
        ("truncate", Some(n)) => match num(n) {
            Some(n) => {
                let send = q.get("send").and_then(|v| num(v)).unwrap_or(n / 2).min(n);
                pattern_body(n, send, false, None)
            }
            None => text(400, "bad length"),
        },
        ("reset", Some(n)) => match num(n) {
            Some(n) => {
                let after = q.get("after").and_then(|v| num(v)).unwrap_or(n / 2).min(n);
                // Closing with SO_LINGER 0 sends a TCP RST, not a FIN.
                if let Err(e) = socket2::SockRef::from(raw).set_linger(Some(Duration::ZERO)) {
                    tracing::warn!(error = %e, "chaos server cannot set SO_LINGER for /reset");
                }
                pattern_body(n, after, true, None)
            }
            None => text(400, "bad length"),
        },
        ("slow", Some(n)) => match num(n) {
            Some(n) => {
                let bps = q.get("bps").and_then(|v| num(v)).unwrap_or(1024).max(10);
                pattern_body(n, n, false, Some(bps))
            }
            None => text(400, "bad length"),
        },
        ("redirect", Some(n)) => match num(n) {
            Some(0) => text(200, "done"),
            Some(n) => {
                let mut r = text(302, "");
                r.headers_mut().insert(
                    LOCATION,
                    HeaderValue::from_str(&format!("/redirect/{}", n - 1))
                        .unwrap_or(HeaderValue::from_static("/")),
                );
                r
            }
            None => text(400, "bad count"),
        },
        ("redirect-to", _) => {
            let status = q
                .get("status")
                .and_then(|v| v.parse::<u16>().ok())
                .unwrap_or(302);
            let mut r = text(status, "");
            match q.get("url").and_then(|u| HeaderValue::from_str(u).ok()) {
                Some(u) => {
                    r.headers_mut().insert(LOCATION, u);
                    r
                }
                None => text(400, "missing url"),
            }
        }
        ("files", Some(name)) => file(&req, name, state).await,
        _ => text(404, "no such route"),
    }
}

async fn echo(req: Request<hyper::body::Incoming>) -> Response<Body> {
    let (parts, incoming) = req.into_parts();
    let body = match Body::from_incoming(incoming, None).bytes().await {
        Ok(b) => b,
        Err(e) => return text(400, format!("cannot read body: {e}")),
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    let body_json = serde_json::from_slice::<serde_json::Value>(&body)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned().into());
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
        "body": body_json,
    });
    let mut r = text(200, json.to_string());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn flaky(key: &str, q: &HashMap<String, String>, state: &State) -> Response<Body> {
    let calls = {
        let mut flaky = lock(&state.flaky);
        let n = flaky.entry(key.to_owned()).or_insert(0);
        *n += 1;
        *n
    };
    let fail = q
        .get("fail")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(2);
    if calls <= fail {
        let status = q
            .get("status")
            .and_then(|v| v.parse::<u16>().ok())
            .unwrap_or(503);
        let mut r = text(
            status,
            format!("flaky {key}: call {calls} of {fail} failing"),
        );
        if let Some(ra) = q.get("retry_after") {
            let value = match ra.strip_prefix("date:") {
                Some(secs) => {
                    let secs = secs.parse::<u64>().unwrap_or(0);
                    httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs))
                }
                None => ra.clone(),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                r.headers_mut().insert(RETRY_AFTER, v);
            }
        }
        return r;
    }
    let mut r = text(
        200,
        serde_json::json!({ "key": key, "calls": calls }).to_string(),
    );
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `total` bytes of a pattern, promised by Content-Length (or chunked when
/// `chunked`), of which `send` are sent before the body ends or fails;
/// `bps` paces it.
fn pattern_body(total: u64, send: u64, chunked: bool, bps: Option<u64>) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let chunk_len = match bps {
        Some(bps) => (bps / 10).max(1),
        None => CHUNK,
    };
    let stream = futures_lite::stream::unfold(0u64, move |sent| async move {
        if sent >= send {
            if send < total && sent != u64::MAX {
                // One `Pending` first: hyper's dispatcher flushes what it
                // has written whenever the body is not ready, so the head
                // and the sent bytes are on the wire before the error
                // makes hyper close the connection mid-response.
                futures_lite::future::yield_now().await;
                let e = io::Error::new(io::ErrorKind::ConnectionAborted, "chaos: cut off");
                return (sent != u64::MAX)
                    .then(|| (Err(HttpError::Body { source: e.into() }), u64::MAX));
            }
            return None;
        }
        if bps.is_some() {
            async_io::Timer::after(Duration::from_millis(100)).await;
        }
        let n = chunk_len.min(send - sent).min(CHUNK);
        let start = (sent % 251) as usize;
        let bytes = PATTERN.with(|p| p.slice(start..start + n as usize));
        Some((Ok(bytes), sent + n))
    });
    let mut r = Response::new(Body::from_stream(stream, (!chunked).then_some(total)));
    if !chunked {
        r.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(total));
    }
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

thread_local! {
    /// 64 KiB of the pattern plus one period, so any chunk is a slice.
    static PATTERN: Bytes = Bytes::from(pattern(64 * 1024 + 251));
}

/// The byte pattern of `/bytes`, `/truncate`, `/reset` and `/slow`, for
/// tests to compare against: byte `i` is `i % 251`.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn file(req: &Request<hyper::body::Incoming>, name: &str, state: &State) -> Response<Body> {
    let (bytes, modified) = match state.files.get(name) {
        Some(b) => (b.clone(), state.started),
        None => {
            let Some(dir) = &state.dir else {
                return text(404, "no such file");
            };
            if name.contains('/') || name.contains('\\') || name == ".." || name.is_empty() {
                return text(404, "no such file");
            }
            let path = dir.join(name);
            match smol::fs::read(&path).await {
                Ok(b) => {
                    let modified = smol::fs::metadata(&path)
                        .await
                        .and_then(|m| m.modified())
                        .unwrap_or(state.started);
                    (Bytes::from(b), modified)
                }
                Err(_) => return text(404, "no such file"),
            }
        }
    };
    let len = bytes.len() as u64;
    let secs = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let etag = format!("\"{len:x}-{secs:x}\"");
    let last_modified = httpdate::fmt_http_date(modified);
    let mut range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(if_range) = req.headers().get(IF_RANGE).and_then(|v| v.to_str().ok()) {
        let fresh = if if_range.starts_with('"') || if_range.starts_with("W/") {
            if_range == etag
        } else {
            if_range == last_modified
        };
        if !fresh {
            range = None;
        }
    }
    let head = req.method() == Method::HEAD;
    let mut r = match range.map(|r| parse_range(&r, len)) {
        None => {
            let mut r = text(200, if head { Bytes::new() } else { bytes });
            r.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(len));
            r
        }
        Some(Some((start, end))) => {
            let part = bytes.slice(start as usize..=end as usize);
            let mut r = text(206, if head { Bytes::new() } else { part });
            let h = r.headers_mut();
            h.insert(CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                h.insert(CONTENT_RANGE, v);
            }
            r
        }
        Some(None) => {
            let mut r = text(416, "");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&last_modified) {
        h.insert(LAST_MODIFIED, v);
    }
    h.insert(
        ::http::header::ACCEPT_RANGES,
        HeaderValue::from_static("bytes"),
    );
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against `len`: the inclusive
/// range, or `None` when unsatisfiable (one range only).
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return None;
            }
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?),
        ),
    };
    (start <= end && start < len).then_some((start, end))
}

pub(crate) type ServerIo = MaybeTls<futures_rustls::server::TlsStream<TcpStream>>;
