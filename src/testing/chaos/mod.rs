//! `ChaosServer`: a real HTTP and WebSocket server on `127.0.0.1:0` with
//! routes that misbehave on purpose, for testing clients (smolkit's and
//! yours).

mod http;
mod ws;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ::http::{HeaderMap, Method, Request, Response, StatusCode};
use async_net::{TcpListener, TcpStream};
use bytes::Bytes;
use event_listener::Event;
use futures_lite::FutureExt;

use crate::http::Body;
use crate::net::MaybeTls;
use crate::runtime::{Spawn, SpawnExt, default_spawner};
use crate::sync::lock_std as lock;
use crate::ws::Message;

pub use http::pattern;
use http::route;
pub use ws::WsRecord;
use ws::WsState;

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
/// `async-io`. Optional TLS with a certificate generated at start
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
/// | `GET/HEAD /files/{name}` | a file added with [`ChaosBuilder::with_file`] or found in [`ChaosBuilder::with_dir`], with `ETag`, `Last-Modified`, `Accept-Ranges`; `Range: bytes=a-b`, `a-` or `-n` gives 206 with `Content-Range`, an unsatisfiable range 416; `If-Range` with a stale ETag or date gives the whole file (200) |
/// | `/files/{name}?fail=N&status=S&retry_after=R&key=K` | the first `N` requests per key (default: the name) answer `S` (default 503) with `Retry-After: R` |
/// | `/files/{name}?cut=M&cuts=C&reset=1` | the first `C` requests per key (default 1) promise the whole (range's) length and send only `M` bytes, then close (with `reset=1`, by a TCP RST) |
/// | `/files/{name}?ignore_range=1` | `Range` is ignored: always 200 with the whole file |
/// | `/files/{name}?version_after=N` | after `N` requests per key the file changes: its bytes reversed, a new `ETag` and `Last-Modified` |
/// | `/files/{name}?bps=B` | the body at `B` bytes per second |
/// | `/files/{name}?disposition=V` | adds `Content-Disposition: V` |
/// | `GET /robots.txt` | the file named `robots.txt`, if one was added (404 otherwise) |
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
    log_limit: usize,
    requests: AtomicU64,
    flaky: Mutex<HashMap<String, u64>>,
    accepted: AtomicU64,
    open: AtomicUsize,
    max_open: AtomicUsize,
    pub(crate) stop: Event,
    pub(crate) stopped: std::sync::atomic::AtomicBool,
    /// The listening socket is closed (after a shutdown): the port is free.
    port_released: std::sync::atomic::AtomicBool,
    port_event: Event,
    started: SystemTime,
    pub(crate) spawner: Arc<dyn Spawn>,
    pub(crate) ws: WsState,
}

/// Configures a [`ChaosServer`].
///
/// # Default
///
/// `127.0.0.1:0`, plain HTTP (no TLS), no files, a WebSocket message log
/// of 100,000, the default spawner ([`default_spawner`](crate::runtime::default_spawner)).
pub struct ChaosBuilder {
    files: HashMap<String, Bytes>,
    dir: Option<PathBuf>,
    tls: bool,
    addr: SocketAddr,
    spawner: Arc<dyn Spawn>,
    log_limit: usize,
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

    /// How many requests [`ChaosServer::requests`] keeps (default: all;
    /// later ones are not logged, [`ChaosServer::request_count`] still
    /// counts them). Long runs set a bound.
    pub fn with_request_log_limit(mut self, n: usize) -> Self {
        self.log_limit = n;
        self
    }

    /// How many WebSocket messages [`ChaosServer::ws_messages`] keeps
    /// (default 100 000; later ones are not logged). 0 for load tests.
    pub fn with_ws_log_limit(mut self, n: usize) -> Self {
        self.ws_log_limit = n;
        self
    }

    /// Where the server's tasks run (default: the default spawner (the current `Runtime`, else smol's global executor)).
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
            log_limit: self.log_limit,
            requests: AtomicU64::new(0),
            flaky: Mutex::new(HashMap::new()),
            accepted: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            stop: Event::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            port_released: std::sync::atomic::AtomicBool::new(false),
            port_event: Event::new(),
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
            log_limit: usize::MAX,
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

    /// Requests received since the start (or the last
    /// [`reset`](ChaosServer::reset)), logged or not.
    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::Acquire)
    }

    /// Forgets the request log, the flaky routes' counts, the WebSocket
    /// message log and its refusal and drop counts.
    pub fn reset(&self) {
        lock(&self.state.log).clear();
        self.state.requests.store(0, Ordering::Release);
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

    /// Stops accepting and closes every connection (also on drop). The
    /// port is free once [`closed`](Self::closed) returns.
    pub fn shutdown(&self) {
        self.state.stopped.store(true, Ordering::Release);
        self.state.stop.notify(usize::MAX);
    }

    /// Waits until the server has stopped listening after
    /// [`shutdown`](Self::shutdown): a new server can then bind the same
    /// address (to restart on the same port).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches.
    pub async fn closed(&self) {
        let state = &*self.state;
        crate::sync::wait_for(&state.port_event, || {
            state.port_released.load(Ordering::Acquire)
        })
        .await
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
    accept_until_stopped(&listener, acceptor, &state, spawner).await;
    drop(listener);
    state.port_released.store(true, Ordering::Release);
    state.port_event.notify(usize::MAX);
}

async fn accept_until_stopped(
    listener: &TcpListener,
    acceptor: Option<futures_rustls::TlsAcceptor>,
    state: &Arc<State>,
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
    let vectored = io.is_plain();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (state, raw) = (state.clone(), raw.clone());
        async move { Ok::<_, std::convert::Infallible>(route(req, &state, id, &raw).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(crate::net::AsyncIoTimer)
        .keep_alive(true)
        .serve_connection(crate::net::HyperIo::new(io, vectored), service)
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

pub(crate) type ServerIo = MaybeTls<futures_rustls::server::TlsStream<TcpStream>>;
