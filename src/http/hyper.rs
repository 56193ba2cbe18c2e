//! `HyperClient`: the default backend, a connection pool written on
//! `hyper::client::conn::http1`.
//!
//! Why not hyper-util's legacy client? It compiles tokio's net, rt and time
//! parts and has no cap on connections per host (32 concurrent requests
//! open 32 sockets). This pool is small, runs on any executor (a
//! connection has no task of its own: the request and then the response
//! body using it move its I/O on, as async-h1 does), and caps connections
//! per host.

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::http::header::{HOST, HeaderValue, USER_AGENT};
use ::http::{Request, Response, Uri};
use event_listener::{Event, IntoNotification};
use hyper::client::conn::http1::{Connection, SendRequest};
use rustls::pki_types::CertificateDer;

use super::body::{Body, BodyConn};
use super::client::{self, Client, Redirects, ResponseFuture};
use super::error::Error;
use crate::ConfigError;
use crate::net::{self, DialError, TlsOptions};
use crate::resilience::watchdog_on;
use crate::runtime::{Clock, Spawn, SystemClock};
use crate::sync::lock_std as lock;

/// The per-host connection cap of a default [`HyperClient`].
pub(crate) const DEFAULT_PER_HOST: usize = 16;

/// The default backend: HTTP/1.1 over TCP or rustls (ring), with a
/// connection pool.
///
/// - **Pool**: at most [`max_connections_per_host`] connections to each
///   `(scheme, host, port)` — open ones, busy or idle. A request that finds
///   none idle and the cap reached waits (FIFO) for one to come back or
///   close. Idle connections are reused most recently used first, and
///   dropped after [`idle_timeout`] (checked when the pool is next used for
///   that host) or when the server closes them.
/// - A connection returns to the pool when its response body has been read
///   to the end; a body dropped earlier closes it.
/// - TCP_NODELAY on every socket; a connect timeout covering TCP and TLS;
///   an optional response timeout (until the response head arrives).
/// - TLS: rustls with the ring provider only, webpki's roots plus any
///   extra roots (a private CA, a test server's certificate).
/// - Redirects: up to the limit, only to `http(s)`, and `Authorization`,
///   `Cookie` and `Proxy-Authorization` are dropped when the redirect
///   leaves the origin. 303 (and 301/302 for non-GET) become a GET without
///   body; 307/308 resend the method and body (a streaming body cannot be
///   resent: [`Error::RedirectBody`]).
/// - A request that fails on a reused connection before any of it was
///   written (the server closed the idle connection at that moment) is
///   sent again, once, on another connection.
///
/// A connection has no task of its own: the request using it, and then
/// its response body, move its I/O on as they are polled (so a request
/// and its connection run on the caller's thread, with no wake-up
/// between threads; an idle connection is not polled, and one the server
/// closed meanwhile is found closed when next taken from the pool).
/// Cloning is cheap and shares the pool.
///
/// # Default
///
/// - 16 connections per host, keep-alive on
/// - idle timeout 90 s
/// - connect timeout 10 s, no response timeout
/// - 10 redirects
/// - `User-Agent: smolkit/<version>` unless the request sets one
///
/// [`max_connections_per_host`]: HyperClientBuilder::with_max_connections_per_host
/// [`idle_timeout`]: HyperClientBuilder::with_idle_timeout
///
/// # Drop behavior
///
/// Dropping the last handle (or [`close`](HyperClient::close)) closes the
/// idle connections at once; a response still being read keeps its
/// connection until its body is done or dropped.
///
/// # Examples
///
/// ```no_run
/// use smolkit::http::{Body, Client, HyperClient};
///
/// # smol::block_on(async {
/// let client = HyperClient::new();
/// let request = http::Request::get("https://example.com/").body(Body::empty()).unwrap();
/// let response = client.send(request).await?;
/// let text = response.into_body().bytes_limited(1 << 20).await?;
/// # Ok::<(), smolkit::http::Error>(())
/// # });
/// ```
#[derive(Clone)]
pub struct HyperClient {
    inner: Arc<Inner>,
}

struct Inner {
    max_per_host: usize,
    keep_alive: bool,
    /// Set by [`HyperClient::close`] and when the last handle is dropped:
    /// no new requests, and connections are closed instead of pooled.
    closed: Arc<AtomicBool>,
    idle_timeout: Duration,
    connect_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    redirects: Redirects,
    tls: Arc<rustls::ClientConfig>,
    clock: Arc<dyn Clock>,
    user_agent: HeaderValue,
    hosts: Mutex<Hosts>,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    opened: AtomicU64,
    reused: AtomicU64,
    retried_stale: AtomicU64,
    waiting: AtomicUsize,
}

/// A snapshot of a [`HyperClient`]'s pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Requests sent (each redirect hop counts).
    pub requests: u64,
    /// Connections opened.
    pub connections_opened: u64,
    /// Requests sent on a reused connection.
    pub connections_reused: u64,
    /// Requests resent once because a reused connection was found closed.
    pub stale_retries: u64,
    /// Connections open now (busy or idle), all hosts.
    pub open: usize,
    /// Idle connections now, all hosts.
    pub idle: usize,
    /// Requests waiting for a connection now (the per-host cap is reached).
    pub waiting: usize,
}

/// The pools by `(scheme, host, port)`, lower case.
#[derive(Default)]
struct Hosts {
    map: HashMap<(String, String, u16), Arc<Host>>,
    /// The one asked for last: a request to it builds no key (two strings)
    /// and hashes nothing.
    last: Option<Arc<Host>>,
}

/// The pool of one `(scheme, host, port)`.
struct Host {
    /// Its `(scheme, host, port)`, lower case.
    key: (String, String, u16),
    /// Open connections (busy + idle), never above the cap.
    open: AtomicUsize,
    idle: Mutex<Vec<Pooled>>,
    /// Notified when a connection goes idle or closes.
    event: Event,
}

/// Holds one of the host's connection slots; gives it back on drop.
struct Slot {
    host: Arc<Host>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.host.open.fetch_sub(1, Ordering::AcqRel);
        // NOTE: additional: each freed slot must wake its own waiter. A
        // plain `notify(1)` is absorbed by a waiter woken but not yet run,
        // and the second of two slots freed back to back woke nobody.
        self.host.event.notify(1.additional());
    }
}

struct Pooled {
    sender: SendRequest<Body>,
    conn: Driver,
    idle_since: Instant,
    slot: Slot,
}

/// A connection's I/O, moved on by whoever holds it (the request, then the
/// response body); dropped once it has ended, which closes the sender too.
struct Driver {
    conn: Option<Pin<Box<Conn>>>,
}

type Conn = Connection<net::HyperIo<net::ClientIo>, Body>;

impl Driver {
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn
            && let Poll::Ready(ended) = conn.as_mut().poll(cx)
        {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
            self.conn = None;
        }
    }

    /// Runs `fut` (a step of a request on this connection) while moving
    /// the connection on.
    async fn run<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            // NOTE: the connection first, so it is registered with this
            // task before `fut` hands it a request to write.
            self.drive(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }
}

/// A pooled connection held by a response body: driven while the body is
/// read, back in the pool at its end.
struct Lent {
    pooled: Pooled,
    keep_alive: bool,
    closed: Arc<AtomicBool>,
    clock: Arc<dyn Clock>,
}

impl Lent {
    fn give_back(mut self) {
        let p = &mut self.pooled;
        if !self.keep_alive || p.sender.is_closed() || self.closed.load(Ordering::Acquire) {
            return;
        }
        p.idle_since = self.clock.now();
        let host = p.slot.host.clone();
        lock(&host.idle).push(self.pooled);
        host.event.notify(1.additional());
    }
}

impl BodyConn for Lent {
    fn drive(&mut self, cx: &mut Context<'_>) {
        self.pooled.conn.drive(cx);
    }

    fn give_back(self: Box<Self>) {
        Lent::give_back(*self);
    }
}

/// Decrements a gauge when dropped (a cancelled wait included).
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for HyperClient {
    fn default() -> Self {
        HyperClient::new()
    }
}

impl Inner {
    /// Closes every idle connection and wakes every waiter.
    fn close_idle(&self) {
        let hosts: Vec<Arc<Host>> = lock(&self.hosts).map.values().cloned().collect();
        for host in hosts {
            let idle = std::mem::take(&mut *lock(&host.idle));
            // NOTE: dropped outside the lock: a slot's drop notifies.
            drop(idle);
            host.event.notify(usize::MAX);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // NOTE: an idle connection holds its host (`Pooled` → `Slot` →
        // `Arc<Host>`) and the host holds the idle list, a cycle that
        // would keep every idle socket and its task alive forever.
        self.closed.store(true, Ordering::Release);
        self.close_idle();
    }
}

impl HyperClient {
    /// A client with the defaults.
    pub fn new() -> Self {
        HyperClient::builder()
            .build()
            .unwrap_or_else(|e| unreachable!("the defaults are valid: {e}"))
    }

    /// A builder.
    pub fn builder() -> HyperClientBuilder {
        HyperClientBuilder::default()
    }

    /// Stops the client: requests sent from now on fail with
    /// [`Error::Closed`], requests waiting for a connection fail too, idle
    /// connections are closed at once, and a connection whose response is
    /// still being read closes when its body is done instead of going back
    /// to the pool. Dropping the last handle does the same.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.close_idle();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// A snapshot of the pool.
    pub fn stats(&self) -> ClientStats {
        let s = &self.inner.stats;
        let hosts = lock(&self.inner.hosts);
        let (open, idle) = hosts.map.values().fold((0, 0), |(o, i), h| {
            (o + h.open.load(Ordering::Acquire), i + lock(&h.idle).len())
        });
        ClientStats {
            requests: s.requests.load(Ordering::Relaxed),
            connections_opened: s.opened.load(Ordering::Relaxed),
            connections_reused: s.reused.load(Ordering::Relaxed),
            stale_retries: s.retried_stale.load(Ordering::Relaxed),
            open,
            idle,
            waiting: s.waiting.load(Ordering::Acquire),
        }
    }

    /// The pool for `uri`'s origin (`None` without a scheme or host).
    fn host(&self, uri: &Uri) -> Option<Arc<Host>> {
        let (scheme, name, port) = (uri.scheme_str()?, uri.host()?, client::port(uri)?);
        let mut hosts = lock(&self.inner.hosts);
        if let Some(h) = hosts.last.as_ref().filter(|h| {
            h.key.2 == port
                && h.key.0.eq_ignore_ascii_case(scheme)
                && h.key.1.eq_ignore_ascii_case(name)
        }) {
            return Some(h.clone());
        }
        let key = client::origin(uri)?;
        let h = match hosts.map.get(&key) {
            Some(h) => h.clone(),
            None => {
                let h = Arc::new(Host {
                    key: key.clone(),
                    open: AtomicUsize::new(0),
                    idle: Mutex::new(Vec::new()),
                    event: Event::new(),
                });
                hosts.map.insert(key, h.clone());
                h
            }
        };
        hosts.last = Some(h.clone());
        Some(h)
    }

    /// An idle connection that is still usable, newest first; the expired
    /// and closed ones are dropped on the way.
    fn take_idle(&self, host: &Host) -> Option<Pooled> {
        let now = self.inner.clock.now();
        let mut stale = Vec::new();
        let found = {
            let mut idle = lock(&host.idle);
            let mut found = None;
            while let Some(p) = idle.pop() {
                let expired =
                    now.saturating_duration_since(p.idle_since) >= self.inner.idle_timeout;
                if expired || p.sender.is_closed() {
                    stale.push(p);
                } else {
                    found = Some(p);
                    break;
                }
            }
            // The oldest idle ones sit at the front: expire them too.
            while idle.first().is_some_and(|p| {
                now.saturating_duration_since(p.idle_since) >= self.inner.idle_timeout
            }) {
                stale.push(idle.remove(0));
            }
            found
        };
        // NOTE: dropped outside the lock: a slot's drop notifies waiters.
        drop(stale);
        found
    }

    fn try_reserve(&self, host: &Arc<Host>) -> Option<Slot> {
        host.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.inner.max_per_host).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot { host: host.clone() })
    }

    /// A connection to `host`: an idle one, a new one within the cap, or
    /// the next one to come back.
    async fn checkout(&self, host: &Arc<Host>) -> Result<(Pooled, bool), Error> {
        loop {
            if self.is_closed() {
                return Err(Error::Closed);
            }
            if let Some(p) = self.take_idle(host) {
                return Ok((p, true));
            }
            if let Some(slot) = self.try_reserve(host) {
                let (sender, conn) = self.connect(&host.key).await?;
                self.inner.stats.opened.fetch_add(1, Ordering::Relaxed);
                return Ok((
                    Pooled {
                        sender,
                        conn,
                        idle_since: self.inner.clock.now(),
                        slot,
                    },
                    false,
                ));
            }
            let listener = host.event.listen();
            if let Some(p) = self.take_idle(host) {
                return Ok((p, true));
            }
            if host.open.load(Ordering::Acquire) < self.inner.max_per_host {
                continue;
            }
            self.inner.stats.waiting.fetch_add(1, Ordering::AcqRel);
            let _waiting = Decrement(&self.inner.stats.waiting);
            listener.await;
        }
    }

    async fn connect(
        &self,
        (scheme, host, port): &(String, String, u16),
    ) -> Result<(SendRequest<Body>, Driver), Error> {
        let https = scheme == "https";
        // NOTE: the future is made where it is awaited (see `send_inner`).
        match self.inner.connect_timeout {
            Some(after) => {
                match watchdog_on(&*self.inner.clock, after, self.open(host, *port, https)).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::ConnectTimeout {
                        addr: format!("{host}:{port}"),
                        after,
                    }),
                }
            }
            None => self.open(host, *port, https).await,
        }
    }

    /// TCP (and TLS) to `host:port`, then the HTTP/1 handshake. The
    /// address is written out only for an error.
    async fn open(
        &self,
        host: &str,
        port: u16,
        https: bool,
    ) -> Result<(SendRequest<Body>, Driver), Error> {
        let addr = || format!("{host}:{port}");
        // `Uri::host` keeps an IPv6 literal's brackets.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let io = net::dial(bare, port, https.then_some(&self.inner.tls))
            .await
            .map_err(|e| match e {
                DialError::Connect(source) => Error::Connect {
                    addr: addr(),
                    source,
                },
                DialError::Tls(source) => Error::Tls {
                    host: bare.to_owned(),
                    source,
                },
            })?;
        let plain = io.is_plain();
        let (sender, conn) = hyper::client::conn::http1::handshake(net::HyperIo::new(io, plain))
            .await
            .map_err(|e| Error::Transport {
                url: addr(),
                source: e.into(),
            })?;
        tracing::debug!(host = %host, port, tls = https, "http connection opened");
        let conn = Driver {
            conn: Some(Box::pin(conn)),
        };
        Ok((sender, conn))
    }

    async fn send_inner(&self, mut request: Request<Body>) -> Result<Response<Body>, Error> {
        client::check_uri(request.uri())?;
        let uri = request.uri().clone();
        let pool = self
            .host(&uri)
            .ok_or_else(|| Error::invalid_url(&uri, "no host"))?;
        if !request.headers().contains_key(HOST) {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            // The authority without user info.
            let host = authority.rsplit('@').next().unwrap_or(authority);
            let value =
                HeaderValue::from_str(host).map_err(|_| Error::invalid_url(&uri, "bad host"))?;
            request.headers_mut().insert(HOST, value);
        }
        if !request.headers().contains_key(USER_AGENT) {
            request
                .headers_mut()
                .insert(USER_AGENT, self.inner.user_agent.clone());
        }
        // http/1.1 to an origin server: the request line has the path only.
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = Uri::try_from(path).map_err(|e| Error::invalid_url(&uri, e))?;
        self.inner.stats.requests.fetch_add(1, Ordering::Relaxed);

        // NOTE: the exchange's future is made where it is awaited, not
        // kept in a local first: that moved it whole once more.
        match self.inner.response_timeout {
            Some(after) => {
                match watchdog_on(
                    &*self.inner.clock,
                    after,
                    self.exchange(&pool, &uri, request),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout {
                        url: uri.to_string(),
                        after,
                    }),
                }
            }
            None => self.exchange(&pool, &uri, request).await,
        }
    }

    /// One request on a connection of `pool`: checkout, send, the head
    /// back; a request a reused connection never wrote is sent once more
    /// on another.
    async fn exchange(
        &self,
        pool: &Arc<Host>,
        uri: &Uri,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, Error> {
        let mut fresh_retry = false;
        loop {
            let (mut pooled, reused) = self.checkout(pool).await?;
            if reused {
                self.inner.stats.reused.fetch_add(1, Ordering::Relaxed);
            }
            let Pooled { sender, conn, .. } = &mut pooled;
            if let Err(e) = conn.run(sender.ready()).await {
                if reused {
                    // Closed while idle: try the next one.
                    continue;
                }
                // NOTE: a new connection that is not ready was closed
                // by the server at once; do not loop on it.
                return Err(Error::Transport {
                    url: uri.to_string(),
                    source: e.into(),
                });
            }
            let sent = pooled.sender.try_send_request(request);
            match pooled.conn.run(sent).await {
                Ok(response) => return Ok(self.wrap(response, pooled)),
                Err(mut e) => match e.take_message() {
                    Some(back) if reused && !fresh_retry => {
                        // Never written: safe to send on another
                        // connection, whatever the method.
                        self.inner
                            .stats
                            .retried_stale
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(url = %uri, "reused connection was closed; resending");
                        fresh_retry = true;
                        request = back;
                    }
                    _ => {
                        return Err(Error::Transport {
                            url: uri.to_string(),
                            source: e.into_error().into(),
                        });
                    }
                },
            }
        }
    }

    /// Gives the response a body that puts the connection back in the
    /// pool once read to the end.
    fn wrap(&self, response: Response<hyper::body::Incoming>, pooled: Pooled) -> Response<Body> {
        let (parts, incoming) = response.into_parts();
        let lent = Lent {
            pooled,
            keep_alive: self.inner.keep_alive,
            closed: self.inner.closed.clone(),
            clock: self.inner.clock.clone(),
        };
        let body = if hyper::body::Body::is_end_stream(&incoming) {
            lent.give_back();
            drop(incoming);
            Body::empty()
        } else {
            Body::from_incoming(incoming, Some(Box::new(lent)))
        };
        Response::from_parts(parts, body)
    }
}

impl Client for HyperClient {
    fn send(&self, request: Request<Body>) -> ResponseFuture<'_> {
        Box::pin(client::follow(self.inner.redirects, request, |r| {
            self.send_inner(r)
        }))
    }
}

impl fmt::Debug for HyperClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperClient")
            .field("max_per_host", &self.inner.max_per_host)
            .field("idle_timeout", &self.inner.idle_timeout)
            .field("connect_timeout", &self.inner.connect_timeout)
            .field("response_timeout", &self.inner.response_timeout)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Configures a [`HyperClient`]. See its `# Default` section.
pub struct HyperClientBuilder {
    max_per_host: usize,
    keep_alive: bool,
    idle_timeout: Duration,
    connect_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    redirects: usize,
    tls: TlsOptions,
    clock: Arc<dyn Clock>,
    user_agent: HeaderValue,
}

impl Default for HyperClientBuilder {
    fn default() -> Self {
        HyperClientBuilder {
            max_per_host: DEFAULT_PER_HOST,
            keep_alive: true,
            idle_timeout: Duration::from_secs(90),
            connect_timeout: Some(Duration::from_secs(10)),
            response_timeout: None,
            redirects: 10,
            tls: TlsOptions::default(),
            clock: Arc::new(SystemClock),
            user_agent: HeaderValue::from_static(concat!("smolkit/", env!("CARGO_PKG_VERSION"))),
        }
    }
}

impl HyperClientBuilder {
    /// The cap on open connections per `(scheme, host, port)`. Zero is
    /// refused by [`build`](Self::build).
    pub fn with_max_connections_per_host(mut self, n: usize) -> Self {
        self.max_per_host = n;
        self
    }

    /// Whether a connection is reused after its response (default `true`).
    /// Off: every request opens a connection and closes it once its body
    /// is read.
    pub fn with_keep_alive(mut self, on: bool) -> Self {
        self.keep_alive = on;
        self
    }

    /// How long a connection may sit idle before it is closed instead of
    /// reused.
    pub fn with_idle_timeout(mut self, after: Duration) -> Self {
        self.idle_timeout = after;
        self
    }

    /// The limit on opening a connection (TCP and TLS); `None` for none.
    pub fn with_connect_timeout(mut self, after: impl Into<Option<Duration>>) -> Self {
        let after = after.into();
        self.connect_timeout = after;
        self
    }

    /// The limit from sending a request to its response head (including
    /// the wait for a pooled connection); `None` for none.
    pub fn with_response_timeout(mut self, after: impl Into<Option<Duration>>) -> Self {
        let after = after.into();
        self.response_timeout = after;
        self
    }

    /// How many redirects to follow; 0 returns redirect responses as they
    /// are.
    pub fn with_max_redirects(mut self, n: usize) -> Self {
        self.redirects = n;
        self
    }

    /// Trusts this certificate (DER) as a root, beside webpki's roots (each
    /// call adds one).
    pub fn with_root_certificate(mut self, der: CertificateDer<'static>) -> Self {
        self.tls.add_root(der);
        self
    }

    /// Trusts every certificate in this PEM text as a root.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `root certificate` when the PEM does not
    /// parse or holds no certificate.
    pub fn with_root_pem(mut self, pem: impl AsRef<[u8]>) -> Result<Self, ConfigError> {
        self.tls.add_pem(pem.as_ref())?;
        Ok(self)
    }

    /// Uses this rustls configuration as it is (roots, client
    /// certificates, ALPN); extra roots given to the builder are ignored.
    /// Build it with the ring provider only.
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls.set_config(config);
        self
    }

    /// Did set where connection tasks ran; a connection has no task now
    /// (the request and body using it drive it), so this does nothing.
    #[deprecated(
        since = "0.1.0",
        note = "connections have no task of their own: the request and its body drive them"
    )]
    pub fn with_spawner(self, spawner: impl Spawn + 'static) -> Self {
        drop(spawner);
        self
    }

    /// The clock for timeouts and idle expiry.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The `User-Agent` sent when a request has none.
    pub fn with_user_agent(mut self, value: HeaderValue) -> Self {
        self.user_agent = value;
        self
    }

    /// The client.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `max_connections_per_host` when it is zero.
    pub fn build(self) -> Result<HyperClient, ConfigError> {
        let max_per_host = ConfigError::nonzero("max_connections_per_host", self.max_per_host)?;
        let tls = self.tls.client_config(&[b"http/1.1"]);
        Ok(HyperClient {
            inner: Arc::new(Inner {
                max_per_host,
                keep_alive: self.keep_alive,
                closed: Arc::new(AtomicBool::new(false)),
                idle_timeout: self.idle_timeout,
                connect_timeout: self.connect_timeout,
                response_timeout: self.response_timeout,
                redirects: Redirects {
                    limit: self.redirects,
                },
                tls,
                clock: self.clock,
                user_agent: self.user_agent,
                hosts: Mutex::new(Hosts::default()),
                stats: Counters::default(),
            }),
        })
    }
}

impl fmt::Debug for HyperClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HyperClientBuilder")
            .field("max_per_host", &self.max_per_host)
            .field("idle_timeout", &self.idle_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("redirects", &self.redirects)
            .field("extra_roots", &self.tls.extra_roots())
            .finish()
    }
}
