//! `Session`: one reconnecting WebSocket connection driven by one task.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::{
    self, Message as WsMessage, Utf8Bytes, client::IntoClientRequest, protocol::CloseFrame,
    protocol::WebSocketConfig, protocol::frame::coding::CloseCode,
};
use atomic_waker::AtomicWaker;
use bytes::Bytes;
use event_listener::Event as Notify;
use futures_lite::FutureExt;
use futures_lite::Stream;
use futures_sink::Sink;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::codec::{Codec, batch_frame};
use super::message::{Envelope, Frame, Message};
use super::outbox::{Entry, Outbox, OutboxOverflow, Refused};
use super::{Error, SendError};
use crate::ConfigError;
use crate::net::{self, ClientIo, DialError};
use crate::resilience::{Backoff, Jitter};
use crate::runtime::{Clock, Sleep, Spawn, SpawnExt, SystemClock, default_spawner};
use crate::sync::lock_std as lock;

type WsStream = WebSocketStream<ClientIo>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Hook = Arc<
    dyn Fn(ConnectInfo) -> Pin<Box<dyn Future<Output = Result<Vec<Message>, BoxError>> + Send>>
        + Send
        + Sync,
>;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionState {
    /// Opening a connection (TCP, TLS, upgrade, the `on_connect` hook).
    Connecting,
    /// Connected; the outbox flows.
    Connected,
    /// Waiting before the next attempt.
    Reconnecting,
    /// Ended: closed by the application or given up.
    Closed,
}

impl SessionState {
    fn from_u8(v: u8) -> SessionState {
        match v {
            0 => SessionState::Connecting,
            1 => SessionState::Connected,
            2 => SessionState::Reconnecting,
            _ => SessionState::Closed,
        }
    }
}

/// A state change or a report from a session, with the session's id (its
/// index in a [`SessionPool`](super::Pool), 0 for a lone session).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionEvent {
    /// Which session.
    pub session: usize,
    /// What happened.
    pub kind: SessionEventKind,
}

/// What an [`SessionEvent`] reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SessionEventKind {
    /// Attempt `attempt` (1 for the first since the last connection).
    Connecting {
        /// The attempt number.
        attempt: u32,
    },
    /// Connected (the hook has run, the outbox is about to flush).
    Connected {
        /// Connections made so far, this one included.
        connection: u64,
    },
    /// An attempt failed.
    ConnectFailed {
        /// The attempt number.
        attempt: u32,
        /// Why.
        error: Error,
    },
    /// A connection ended: the peer went away, the network failed, or no
    /// pong arrived in time.
    Disconnected {
        /// Why.
        error: Error,
    },
    /// The next attempt starts after `delay`.
    Reconnecting {
        /// The attempt it will be.
        attempt: u32,
        /// The wait.
        delay: Duration,
        /// Whether the delay is the server's `Retry-After`.
        retry_after: bool,
    },
    /// Messages written to a socket that then died, with no pong after
    /// them: the peer may or may not have them. Resend them if they must
    /// arrive (or use at-least-once mode, which does).
    Unconfirmed {
        /// The messages, in the order they were sent.
        messages: Vec<Message>,
    },
    /// At-least-once mode: unacknowledged messages queued again to be
    /// resent on the new connection.
    Resending {
        /// How many.
        count: usize,
    },
    /// The outbox was full and its policy dropped the oldest messages.
    Dropped {
        /// How many.
        count: usize,
    },
    /// An incoming frame did not decode (a compression bomb, a bad batch)
    /// and was discarded.
    DecodeFailed {
        /// Why.
        error: Error,
    },
    /// The session ended; `error` is `None` when the application closed
    /// it.
    Closed {
        /// Why, if not by the application.
        error: Option<Error>,
    },
}

/// How a session ended, from [`Session::close`] and [`Session::closed`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CloseReport {
    /// `None` when the application closed it; the give-up error otherwise.
    pub error: Option<Error>,
    /// Messages never written to a socket, in order.
    pub unsent: Vec<Message>,
    /// Messages written but never confirmed (no pong or close reply after
    /// them; in at-least-once mode, not acknowledged).
    pub unconfirmed: Vec<Message>,
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SessionStats {
    /// Messages written to a socket (a batch counts each message; a resend
    /// counts again).
    pub sent: u64,
    /// Frames written (batches count once).
    pub frames_sent: u64,
    /// Messages delivered to the application (after splitting batches).
    pub received: u64,
    /// Connections made.
    pub connections: u64,
    /// Connections made after the first.
    pub reconnects: u64,
    /// Messages dropped by [`OutboxOverflow::DropOldest`].
    pub dropped: u64,
    /// Messages reported in [`SessionEventKind::Unconfirmed`].
    pub unconfirmed: u64,
    /// At-least-once: messages acknowledged by the server.
    pub acked: u64,
    /// At-least-once: messages queued again after a reconnect.
    pub resent: u64,
    /// Incoming frames that did not decode.
    pub decode_errors: u64,
    /// Pings sent (heartbeats and confirmations).
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// Events dropped because nobody read the event stream (the oldest go
    /// first).
    pub events_dropped: u64,
    /// Messages in the outbox now (waiting or in flight).
    pub queued: usize,
    /// Bytes in the outbox now.
    pub queued_bytes: usize,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    frames_sent: AtomicU64,
    received: AtomicU64,
    connections: AtomicU64,
    dropped: AtomicU64,
    unconfirmed: AtomicU64,
    acked: AtomicU64,
    resent: AtomicU64,
    decode_errors: AtomicU64,
    pings: AtomicU64,
    pongs: AtomicU64,
    events_dropped: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Information the `on_connect` hook gets.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectInfo {
    /// The session's id.
    pub session: usize,
    /// Connections made so far, this one included (1 on the first).
    pub connection: u64,
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
struct Batching {
    window: Duration,
    max_messages: usize,
    max_bytes: usize,
}

/// Configures and starts a [`Session`].
#[derive(Clone)]
pub struct SessionBuilder {
    url: String,
    clock: Arc<dyn Clock>,
    spawner: Arc<dyn Spawn>,
    heartbeat: Option<(Duration, Duration)>,
    backoff: Backoff,
    max_attempts: Option<u32>,
    give_up_after: Option<Duration>,
    connect_timeout: Option<Duration>,
    close_timeout: Duration,
    outbox_messages: usize,
    outbox_bytes: usize,
    overflow: OutboxOverflow,
    at_least_once: bool,
    codec: Codec,
    batching: Option<Batching>,
    on_connect: Option<Hook>,
    incoming_capacity: usize,
    events_capacity: usize,
    extra_roots: Vec<CertificateDer<'static>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    headers: Vec<(String, String)>,
    pub(crate) index: usize,
    pub(crate) channels: Option<Channels>,
}

#[derive(Clone)]
pub(crate) struct Channels {
    pub(crate) incoming: (Sender<Message>, Receiver<Message>),
    pub(crate) events: (Sender<SessionEvent>, Receiver<SessionEvent>),
}

impl fmt::Debug for SessionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionBuilder")
            .field("url", &self.url)
            .field("heartbeat", &self.heartbeat)
            .field("backoff", &self.backoff)
            .field("max_attempts", &self.max_attempts)
            .field("give_up_after", &self.give_up_after)
            .field("outbox_messages", &self.outbox_messages)
            .field("outbox_bytes", &self.outbox_bytes)
            .field("overflow", &self.overflow)
            .field("at_least_once", &self.at_least_once)
            .field("codec", &self.codec)
            .field("batching", &self.batching)
            .field("on_connect", &self.on_connect.is_some())
            .finish()
    }
}

impl SessionBuilder {
    pub(crate) fn new(url: &str) -> Self {
        SessionBuilder {
            url: url.to_owned(),
            clock: Arc::new(SystemClock),
            spawner: default_spawner(),
            heartbeat: Some((Duration::from_secs(20), Duration::from_secs(10))),
            backoff: Backoff::exponential(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(30))
                .with_jitter(Jitter::Full)
                .build(),
            max_attempts: None,
            give_up_after: None,
            connect_timeout: Some(Duration::from_secs(10)),
            close_timeout: Duration::from_secs(5),
            outbox_messages: 1024,
            outbox_bytes: 8 << 20,
            overflow: OutboxOverflow::Wait,
            at_least_once: false,
            codec: Codec::new(),
            batching: None,
            on_connect: None,
            incoming_capacity: 1024,
            events_capacity: 1024,
            extra_roots: Vec::new(),
            tls: None,
            headers: Vec::new(),
            index: 0,
            channels: None,
        }
    }

    /// The clock for heartbeats, backoff, batching windows and timeouts
    /// (default [`SystemClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Where the driver task runs (default: smol's global executor).
    pub fn with_spawner(mut self, spawner: impl Spawn + 'static) -> Self {
        self.spawner = Arc::new(spawner);
        self
    }

    /// `(interval, timeout)`: ping every `interval`; the peer is dead when
    /// no pong arrives within `timeout` of a ping (default 20 s and 10 s).
    /// `None`: no heartbeat, a silent dead peer is only noticed when a write
    /// fails.
    pub fn with_heartbeat(mut self, heartbeat: impl Into<Option<(Duration, Duration)>>) -> Self {
        self.heartbeat = heartbeat.into();
        self
    }

    /// The delays between connection attempts (default 1 s doubling to
    /// 30 s with full jitter). A schedule that ends
    /// ([`with_max_times`](BackoffBuilder::with_max_times)) gives up when it
    /// does. A 429 or 503 handshake answer with `Retry-After` replaces the
    /// next delay.
    pub fn with_reconnect(mut self, backoff: impl Into<Backoff>) -> Self {
        self.backoff = backoff.into();
        self
    }

    /// Give up after `n` failed attempts in a row (the session closes with
    /// [`Error::GaveUp`]); `None` (the default): never for that reason.
    pub fn with_give_up_after_attempts(mut self, n: impl Into<Option<u32>>) -> Self {
        self.max_attempts = n.into();
        self
    }

    /// Give up when the session has been without a connection for `d`
    /// (a wait that would end past it gives up at once); `None` (the
    /// default): never for that reason.
    pub fn with_give_up_after(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.give_up_after = d.into();
        self
    }

    /// The limit on TCP + TLS + upgrade (default 10 s; `None`: no limit).
    pub fn with_connect_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.connect_timeout = timeout.into();
        self
    }

    /// How long [`Session::close`] waits for the server's close reply
    /// (default 5 s).
    pub fn with_close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The outbox's bounds (default 1024 messages and 8 MiB), counting
    /// messages waiting for a socket and messages in flight.
    pub fn with_outbox(mut self, messages: usize, bytes: usize) -> Self {
        self.outbox_messages = messages;
        self.outbox_bytes = bytes;
        self
    }

    /// What `send` does when the outbox is full (default
    /// [`OutboxOverflow::Wait`]).
    pub fn with_overflow(mut self, policy: OutboxOverflow) -> Self {
        self.overflow = policy;
        self
    }

    /// At-least-once delivery: envelopes get ids and stay in the outbox
    /// until the server answers `{"type":"ack","id":..}`; unacknowledged
    /// ones are resent after a reconnect. Acks are consumed, not delivered.
    pub fn with_at_least_once(mut self, on: bool) -> Self {
        self.at_least_once = on;
        self
    }

    /// The codec (compression and size limits).
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Envelopes sent within `window` of the first waiting one go as one
    /// batch frame, at most `max_messages` (and 1 MiB) per frame; a full
    /// batch goes at once. `(window, max_messages)`; `None` (the default):
    /// every envelope is its own frame.
    pub fn with_batching(mut self, batching: impl Into<Option<(Duration, usize)>>) -> Self {
        self.batching = batching.into().map(|(window, max_messages)| Batching {
            window,
            max_messages,
            max_bytes: 1 << 20,
        });
        self
    }

    /// Runs on every connection before the outbox flushes; the messages it
    /// returns are written first (to subscribe again, say). An error
    /// drops the connection and counts as a failed attempt.
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(ConnectInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Message>, BoxError>> + Send + 'static,
    {
        self.on_connect = Some(Arc::new(move |info| Box::pin(hook(info))));
        self
    }

    /// Incoming messages buffered for the application (default 1024); when
    /// full, the session stops reading (TCP applies backpressure to the
    /// server) and the pong timeout waits.
    pub fn with_incoming_capacity(mut self, n: usize) -> Self {
        self.incoming_capacity = n;
        self
    }

    /// Events buffered (default 1024); when nobody reads them the oldest
    /// are dropped and counted.
    pub fn with_events_capacity(mut self, n: usize) -> Self {
        self.events_capacity = n;
        self
    }

    /// Trusts `cert` (DER) as a root for `wss://`, beside webpki's roots.
    pub fn add_root_certificate(mut self, cert: CertificateDer<'static>) -> Self {
        self.extra_roots.push(cert);
        self
    }

    /// Trusts every certificate in `pem` as a root.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `root certificate` when the PEM does not
    /// parse or holds no certificate.
    pub fn add_root_pem(mut self, pem: impl AsRef<[u8]>) -> Result<Self, ConfigError> {
        self.extra_roots.extend(net::parse_pem(pem.as_ref())?);
        Ok(self)
    }

    /// A whole rustls configuration instead of webpki's roots (+ extra).
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// A header for the upgrade request (an auth token, say).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub(crate) fn incoming_capacity_value(&self) -> usize {
        self.incoming_capacity.max(1)
    }

    pub(crate) fn events_capacity_value(&self) -> usize {
        self.events_capacity.max(1)
    }

    fn validate(&self) -> Result<Target, Error> {
        let target = Target::parse(&self.url)?;
        let bad = |setting: &'static str, value: String, reason: &'static str| {
            Err(Error::Config(ConfigError::new(
                setting,
                format_args!("{value}"),
                reason,
            )))
        };
        if let Some((interval, timeout)) = self.heartbeat
            && (interval.is_zero() || timeout.is_zero())
        {
            return bad(
                "heartbeat",
                format!("({interval:?}, {timeout:?})"),
                "the interval and the timeout must be above zero",
            );
        }
        if self.outbox_messages == 0 || self.outbox_bytes == 0 {
            return bad(
                "outbox",
                format!("({}, {})", self.outbox_messages, self.outbox_bytes),
                "both limits must be above zero",
            );
        }
        if let Some(b) = self.batching
            && (b.window.is_zero() || b.max_messages == 0)
        {
            return bad(
                "batching",
                format!("({:?}, {})", b.window, b.max_messages),
                "the window and the count must be above zero",
            );
        }
        ConfigError::nonzero("incoming_capacity", self.incoming_capacity)?;
        ConfigError::nonzero("events_capacity", self.events_capacity)?;
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                return bad(
                    "header",
                    format!("{name}: {value}"),
                    "not a valid header name and value",
                );
            }
        }
        Ok(target)
    }

    /// Starts the session's driver and returns at once; the first
    /// connection is made in the background (watch [`Session::events`] or
    /// wait with [`Session::wait_connected`]).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the bad setting (`url` for a URL that does
    /// not parse, is not `ws`/`wss` or has no host).
    pub fn start(self) -> Result<Session, Error> {
        let target = self.validate()?;
        let channels = self.channels.clone().unwrap_or_else(|| Channels {
            incoming: async_channel::bounded(self.incoming_capacity),
            events: async_channel::bounded(self.events_capacity),
        });
        let tls = self
            .tls
            .clone()
            .unwrap_or_else(|| Arc::new(net::tls_config(&self.extra_roots, &[b"http/1.1"])));
        let shared = Arc::new(Shared {
            index: self.index,
            outbox: Mutex::new(Outbox::new(self.outbox_messages, self.outbox_bytes)),
            overflow: self.overflow,
            at_least_once: self.at_least_once,
            clock: self.clock.clone(),
            next_id: AtomicU64::new(1),
            driver: AtomicWaker::new(),
            space: Notify::new(),
            close_requested: AtomicBool::new(false),
            close: Notify::new(),
            state: AtomicU8::new(0),
            changed: Notify::new(),
            report: Mutex::new(None),
            handles: AtomicUsize::new(1),
            counters: Counters::default(),
            events: channels.events.0.clone(),
        });
        let config = Config {
            target,
            headers: self.headers,
            tls,
            heartbeat: self.heartbeat,
            backoff: self.backoff,
            max_attempts: self.max_attempts,
            give_up_after: self.give_up_after,
            connect_timeout: self.connect_timeout,
            close_timeout: self.close_timeout,
            codec: self.codec,
            batching: self.batching,
            on_connect: self.on_connect,
        };
        let driver = Driver {
            config,
            shared: shared.clone(),
            incoming: channels.incoming.0.clone(),
        };
        self.spawner
            .spawn_named("smolkit-ws-session", driver.run())
            .detach();
        Ok(Session {
            shared,
            incoming: channels.incoming.1,
            events: channels.events.1,
        })
    }

    /// [`start`](SessionBuilder::start), then waits for the first
    /// connection.
    ///
    /// # Errors
    ///
    /// A configuration error, or the session's error if it ends before
    /// connecting (with a give-up policy; without one it keeps trying).
    pub async fn connect(self) -> Result<Session, Error> {
        let session = self.start()?;
        session.wait_connected().await?;
        Ok(session)
    }
}

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    host: String,
    port: u16,
    tls: bool,
}

impl Target {
    fn parse(raw: &str) -> Result<Target, ConfigError> {
        let bad = |reason: String| ConfigError::new("url", raw, reason);
        let url = url::Url::parse(raw).map_err(|e| bad(e.to_string()))?;
        let tls = match url.scheme() {
            "ws" => false,
            "wss" => true,
            other => return Err(bad(format!("scheme {other:?} is not ws or wss"))),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(bad("has no host".into())),
        };
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        Ok(Target {
            url: url.to_string(),
            host,
            port,
            tls,
        })
    }
}

struct Config {
    target: Target,
    headers: Vec<(String, String)>,
    tls: Arc<rustls::ClientConfig>,
    heartbeat: Option<(Duration, Duration)>,
    backoff: Backoff,
    max_attempts: Option<u32>,
    give_up_after: Option<Duration>,
    connect_timeout: Option<Duration>,
    close_timeout: Duration,
    codec: Codec,
    batching: Option<Batching>,
    on_connect: Option<Hook>,
}

pub(crate) struct Shared {
    index: usize,
    outbox: Mutex<Outbox>,
    overflow: OutboxOverflow,
    at_least_once: bool,
    clock: Arc<dyn Clock>,
    next_id: AtomicU64,
    /// The driver task, woken when the outbox gets work or a close is
    /// requested.
    driver: AtomicWaker,
    /// Senders waiting for room.
    space: Notify,
    close_requested: AtomicBool,
    close: Notify,
    state: AtomicU8,
    changed: Notify,
    report: Mutex<Option<CloseReport>>,
    handles: AtomicUsize,
    counters: Counters,
    events: Sender<SessionEvent>,
}

impl Shared {
    fn emit(&self, kind: SessionEventKind) {
        let event = SessionEvent {
            session: self.index,
            kind,
        };
        if let Ok(Some(_)) = self.events.force_send(event) {
            bump(&self.counters.events_dropped, 1);
        }
    }

    fn set_state(&self, s: SessionState) {
        self.state.store(s as u8, Ordering::Release);
        self.changed.notify(usize::MAX);
    }

    fn request_close(&self) {
        self.close_requested.store(true, Ordering::Release);
        self.close.notify(usize::MAX);
        self.driver.wake();
    }

    fn closing(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    /// Resolves when a close is requested.
    async fn close_requested(&self) {
        loop {
            let l = self.close.listen();
            if self.closing() {
                return;
            }
            l.await;
        }
    }
}

/// A reconnecting WebSocket client session.
///
/// One driver task per session owns the socket: it connects (with backoff
/// and jitter, honouring `Retry-After`), runs the `on_connect` hook,
/// flushes the outbox in order, pings on the heartbeat and declares the
/// peer dead when no pong comes, and reconnects. Messages sent while
/// disconnected wait in the bounded outbox; messages written to a socket
/// that then died are reported ([`SessionEventKind::Unconfirmed`]) or, in
/// at-least-once mode, resent. Handles are cheap to clone; the session
/// closes when [`close`](Session::close) is called or the last handle is
/// dropped.
///
/// # Examples
///
/// ```
/// use smolkit::testing::ChaosServer;
/// use smolkit::ws::{Message, Session};
///
/// # smol::block_on(async {
/// let server = ChaosServer::start().await.unwrap();
/// let session = Session::builder(&server.ws_url("/ws")).connect().await.unwrap();
/// session.send("hello").await.unwrap();
/// assert_eq!(session.recv().await, Some(Message::Text("hello".into())));
/// let report = session.close().await;
/// assert!(report.error.is_none() && report.unsent.is_empty());
/// # });
/// ```
pub struct Session {
    shared: Arc<Shared>,
    incoming: Receiver<Message>,
    events: Receiver<SessionEvent>,
}

impl Clone for Session {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::AcqRel);
        Session {
            shared: self.shared.clone(),
            incoming: self.incoming.clone(),
            events: self.events.clone(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.request_close();
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.shared.index)
            .field("state", &self.state())
            .field("queued", &self.queued())
            .finish()
    }
}

impl Session {
    /// A builder for a session to `url` (`ws://` or `wss://`).
    pub fn builder(url: &str) -> SessionBuilder {
        SessionBuilder::new(url)
    }

    /// Connects with the defaults and waits for the first connection.
    ///
    /// # Errors
    ///
    /// See [`SessionBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Session, Error> {
        SessionBuilder::new(url).connect().await
    }

    /// The session's id (its index in a pool).
    pub fn id(&self) -> usize {
        self.shared.index
    }

    /// Queues `message` (a raw frame: never batched); waits for room with
    /// [`OutboxOverflow::Wait`].
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] (policy `Error`), [`SendError::TooLarge`],
    /// [`SendError::Closed`].
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        let frame = message.into().into_frame();
        self.push(frame, None, false, true).await
    }

    /// Like [`send`](Session::send) but never waits: a full outbox under
    /// [`OutboxOverflow::Wait`] is [`SendError::Full`].
    ///
    /// # Errors
    ///
    /// As for `send`.
    pub fn try_send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        let frame = message.into().into_frame();
        let entry = self.entry(frame, None, false);
        self.push_now(entry).map_err(refusal)
    }

    /// Queues an envelope as JSON text; it may share a batch frame. In
    /// at-least-once mode an envelope without an id gets one, and the id is
    /// returned.
    ///
    /// # Errors
    ///
    /// [`SendError::Encode`] when `T` does not serialise, else as for
    /// [`send`](Session::send).
    pub async fn send_envelope<T: Serialize>(
        &self,
        mut envelope: Envelope<T>,
    ) -> Result<Option<String>, SendError> {
        if self.shared.at_least_once && envelope.id.is_none() {
            let n = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            envelope.id = Some(n.to_string());
        }
        let json = serde_json::to_string(&envelope).map_err(|e| SendError::Encode {
            reason: e.to_string(),
        })?;
        let frame = Frame {
            text: true,
            data: Bytes::from(json),
        };
        let id = envelope.id.clone();
        self.push(frame, envelope.id, true, true).await?;
        Ok(id)
    }

    fn entry(&self, frame: Frame, id: Option<String>, batchable: bool) -> Entry {
        Entry {
            frame,
            id,
            batchable,
            at: self.shared.clock.now(),
        }
    }

    async fn push(
        &self,
        frame: Frame,
        id: Option<String>,
        batchable: bool,
        wait: bool,
    ) -> Result<(), SendError> {
        let mut entry = self.entry(frame, id, batchable);
        loop {
            let listener = self.shared.space.listen();
            match self.push_now(entry) {
                Ok(()) => return Ok(()),
                Err(Refused::Full(back))
                    if wait && self.shared.overflow == OutboxOverflow::Wait =>
                {
                    entry = back;
                    listener.await;
                }
                Err(r) => return Err(refusal(r)),
            }
        }
    }

    fn push_now(&self, entry: Entry) -> Result<(), Refused> {
        let shared = &self.shared;
        let drop_oldest = shared.overflow == OutboxOverflow::DropOldest;
        let result = lock(&shared.outbox).push(entry, drop_oldest);
        match result {
            Ok(dropped) => {
                shared.driver.wake();
                if !dropped.is_empty() {
                    let n = dropped.len();
                    bump(&shared.counters.dropped, n as u64);
                    tracing::debug!(
                        session = shared.index,
                        dropped = n,
                        "ws outbox full: dropped the oldest"
                    );
                    shared.emit(SessionEventKind::Dropped { count: n });
                }
                Ok(())
            }
            Err(r) => Err(r),
        }
    }

    /// Asks the driver to close without waiting (see
    /// [`close`](Session::close)).
    pub fn shutdown(&self) {
        self.shared.request_close();
    }

    /// The next incoming message; `None` once the session has ended and
    /// every message has been read.
    pub async fn recv(&self) -> Option<Message> {
        self.incoming.recv().await.ok()
    }

    /// The incoming messages as a stream (clones share one queue).
    pub fn incoming(&self) -> Receiver<Message> {
        self.incoming.clone()
    }

    /// The session's events (clones share one queue; see
    /// [`SessionBuilder::events_capacity`]).
    pub fn events(&self) -> Receiver<SessionEvent> {
        self.events.clone()
    }

    /// Where the session is.
    pub fn state(&self) -> SessionState {
        SessionState::from_u8(self.shared.state.load(Ordering::Acquire))
    }

    /// Messages in the outbox (waiting or in flight).
    pub fn queued(&self) -> usize {
        lock(&self.shared.outbox).len()
    }

    /// The counters.
    pub fn stats(&self) -> SessionStats {
        let c = &self.shared.counters;
        let (queued, queued_bytes) = {
            let o = lock(&self.shared.outbox);
            (o.len(), o.bytes())
        };
        let connections = c.connections.load(Ordering::Relaxed);
        SessionStats {
            sent: c.sent.load(Ordering::Relaxed),
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            connections,
            reconnects: connections.saturating_sub(1),
            dropped: c.dropped.load(Ordering::Relaxed),
            unconfirmed: c.unconfirmed.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            resent: c.resent.load(Ordering::Relaxed),
            decode_errors: c.decode_errors.load(Ordering::Relaxed),
            pings: c.pings.load(Ordering::Relaxed),
            pongs: c.pongs.load(Ordering::Relaxed),
            events_dropped: c.events_dropped.load(Ordering::Relaxed),
            queued,
            queued_bytes,
        }
    }

    /// Waits until the session is connected.
    ///
    /// # Errors
    ///
    /// The session's error if it ends first ([`Error::Closed`] when it was
    /// closed by the application).
    pub async fn wait_connected(&self) -> Result<(), Error> {
        loop {
            let l = self.shared.changed.listen();
            match self.state() {
                SessionState::Connected => return Ok(()),
                SessionState::Closed => {
                    let report = lock(&self.shared.report).clone();
                    return Err(report.and_then(|r| r.error).unwrap_or(Error::Closed));
                }
                _ => l.await,
            }
        }
    }

    /// Closes the session: writes what is waiting in the outbox if
    /// connected, sends a close frame (1000), waits for the server's reply
    /// (at most the close timeout) and ends the driver. Returns what was
    /// left.
    pub async fn close(&self) -> CloseReport {
        self.shared.request_close();
        self.closed().await
    }

    /// Waits for the session to end (closed or given up).
    pub async fn closed(&self) -> CloseReport {
        loop {
            let l = self.shared.changed.listen();
            if let Some(r) = lock(&self.shared.report).clone() {
                return r;
            }
            l.await;
        }
    }
}

fn refusal(r: Refused) -> SendError {
    match r {
        Refused::Full(e) => SendError::Full(e.frame.into_message()),
        Refused::Closed(e) => SendError::Closed(e.frame.into_message()),
        Refused::TooLarge(size, limit) => SendError::TooLarge { size, limit },
    }
}

/// What ended a connection.
enum End {
    /// The application's close finished (or timed out).
    Closed,
    /// The connection died; reconnect.
    Dead(Error),
}

struct Driver {
    config: Config,
    shared: Arc<Shared>,
    incoming: Sender<Message>,
}

impl Driver {
    async fn run(self) {
        let shared = self.shared.clone();
        let error = self.connect_loop().await;
        let (pending, inflight) = lock(&shared.outbox).close();
        shared.space.notify(usize::MAX);
        let report = CloseReport {
            error: error.clone(),
            unsent: pending
                .into_iter()
                .map(|e| e.frame.into_message())
                .collect(),
            unconfirmed: inflight
                .into_iter()
                .map(|e| e.frame.into_message())
                .collect(),
        };
        match &error {
            Some(e) => tracing::warn!(session = shared.index, error = %e, "ws session ended"),
            None => tracing::debug!(session = shared.index, "ws session closed"),
        }
        shared.emit(SessionEventKind::Closed { error });
        *lock(&shared.report) = Some(report);
        shared.set_state(SessionState::Closed);
        // NOTE: no `close()` on the incoming channel: a pool's sessions
        // share it. It ends when the last driver drops its sender.
    }

    /// Returns the give-up error, or `None` when closed by the application.
    async fn connect_loop(&self) -> Option<Error> {
        let shared = &*self.shared;
        let clock = &shared.clock;
        let mut backoff = self.config.backoff.clone();
        backoff.reset();
        let mut attempt: u32 = 0;
        let mut down_since = clock.now();
        loop {
            if shared.closing() {
                return None;
            }
            attempt += 1;
            shared.set_state(SessionState::Connecting);
            shared.emit(SessionEventKind::Connecting { attempt });
            let opened = async { Some(self.open().await) }
                .or(async {
                    shared.close_requested().await;
                    None
                })
                .await;
            let failure = match opened {
                None => return None,
                Some(Ok(ws)) => {
                    let connection =
                        shared.counters.connections.fetch_add(1, Ordering::Relaxed) + 1;
                    attempt = 0;
                    backoff.reset();
                    match self.serve(ws, connection).await {
                        End::Closed => return None,
                        End::Dead(error) => {
                            tracing::info!(session = shared.index, error = %error, "ws disconnected");
                            shared.emit(SessionEventKind::Disconnected {
                                error: error.clone(),
                            });
                            self.after_disconnect();
                            down_since = clock.now();
                            error
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(session = shared.index, attempt, error = %error, "ws connect failed");
                    shared.emit(SessionEventKind::ConnectFailed {
                        attempt,
                        error: error.clone(),
                    });
                    error
                }
            };
            if self.config.max_attempts.is_some_and(|max| attempt >= max) {
                return Some(Error::GaveUp {
                    attempts: attempt,
                    last: Box::new(failure),
                });
            }
            let server_delay = failure.retry_after();
            let delay = match (server_delay, backoff.next()) {
                (Some(d), _) => d,
                (None, Some(d)) => d,
                (None, None) => {
                    return Some(Error::GaveUp {
                        attempts: attempt,
                        last: Box::new(failure),
                    });
                }
            };
            if let Some(limit) = self.config.give_up_after
                && clock.now() + delay > down_since + limit
            {
                return Some(Error::GaveUp {
                    attempts: attempt,
                    last: Box::new(failure),
                });
            }
            shared.set_state(SessionState::Reconnecting);
            shared.emit(SessionEventKind::Reconnecting {
                attempt: attempt + 1,
                delay,
                retry_after: server_delay.is_some(),
            });
            let slept = async {
                clock.sleep(delay).await;
                true
            }
            .or(async {
                shared.close_requested().await;
                false
            })
            .await;
            if !slept {
                return None;
            }
        }
    }

    /// Unconfirmed messages of a dead connection: reported, or queued
    /// again in at-least-once mode.
    fn after_disconnect(&self) {
        let shared = &*self.shared;
        if shared.at_least_once {
            let n = lock(&shared.outbox).requeue_inflight();
            if n > 0 {
                bump(&shared.counters.resent, n as u64);
                shared.emit(SessionEventKind::Resending { count: n });
            }
        } else {
            let lost = lock(&shared.outbox).drain_inflight();
            shared.space.notify(usize::MAX);
            if !lost.is_empty() {
                bump(&shared.counters.unconfirmed, lost.len() as u64);
                tracing::warn!(
                    session = shared.index,
                    messages = lost.len(),
                    "ws messages written to a socket that died, unconfirmed"
                );
                shared.emit(SessionEventKind::Unconfirmed {
                    messages: lost.into_iter().map(|e| e.frame.into_message()).collect(),
                });
            }
        }
    }

    async fn open(&self) -> Result<WsStream, Error> {
        let t = &self.config.target;
        let addr = format!("{}:{}", t.host, t.port);
        let connect = async {
            let io = net::dial(&t.host, t.port, t.tls.then_some(&self.config.tls))
                .await
                .map_err(|e| match e {
                    DialError::Connect(source) => Error::Connect {
                        addr: addr.clone(),
                        source: Arc::new(source),
                    },
                    DialError::Tls(source) => Error::Tls {
                        host: t.host.clone(),
                        source: Arc::new(source),
                    },
                })?;
            let mut request =
                t.url
                    .as_str()
                    .into_client_request()
                    .map_err(|e| Error::InvalidUrl {
                        url: t.url.clone(),
                        reason: e.to_string(),
                    })?;
            for (name, value) in &self.config.headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    http::HeaderValue::from_str(value),
                ) {
                    request.headers_mut().append(n, v);
                }
            }
            let max = self.config.codec.max_message_size();
            let ws_config = WebSocketConfig::default()
                .max_message_size(Some(max))
                .max_frame_size(Some(max));
            let (ws, _) = async_tungstenite::client_async_with_config(request, io, Some(ws_config))
                .await
                .map_err(|e| handshake_error(&t.url, e))?;
            Ok(ws)
        };
        match self.config.connect_timeout {
            Some(after) => {
                let clock = &self.shared.clock;
                connect
                    .or(async {
                        clock.sleep(after).await;
                        Err(Error::ConnectTimeout {
                            addr: addr.clone(),
                            after,
                        })
                    })
                    .await
            }
            None => connect.await,
        }
    }

    /// Runs one connection: hook, then the poll loop.
    async fn serve(&self, mut ws: WsStream, connection: u64) -> End {
        let shared = &*self.shared;
        if let Some(hook) = &self.config.on_connect {
            let info = ConnectInfo {
                session: shared.index,
                connection,
            };
            let hooked = async { Some(hook(info).await) }
                .or(async {
                    shared.close_requested().await;
                    None
                })
                .await;
            let messages = match hooked {
                None => return End::Closed,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    return End::Dead(Error::Hook {
                        reason: e.to_string(),
                    });
                }
            };
            for m in messages {
                let frame = self.config.codec.encode_frame(m.into_frame());
                if let Err(e) = send_now(&mut ws, to_ws(frame)).await {
                    return End::Dead(Error::connection(e));
                }
            }
        }
        shared.set_state(SessionState::Connected);
        shared.emit(SessionEventKind::Connected { connection });
        tracing::debug!(session = shared.index, connection, url = %self.config.target.url, "ws connected");
        let clock = &shared.clock;
        let mut conn = Conn {
            ws,
            driver: self,
            ping_timer: self.config.heartbeat.map(|(i, _)| clock.sleep(i)),
            pong_deadline: None,
            ping_seq: 0,
            write_seq: 0,
            marks: VecDeque::new(),
            ping_queue: VecDeque::new(),
            confirm_ping: None,
            stalled: None,
            batch_timer: None,
            needs_flush: false,
            close_deadline: None,
            close_sent: false,
            server_close: None,
            decoded: Vec::new(),
        };
        std::future::poll_fn(|cx| conn.poll(cx)).await
    }
}

fn handshake_error(url: &str, e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let retry_after = if status == 429 || status == 503 {
                net::retry_after(resp.headers())
            } else {
                None
            };
            let body = resp.body().as_deref().map(net::excerpt).unwrap_or_default();
            Error::Handshake {
                url: url.to_owned(),
                status: Some(status),
                retry_after,
                reason: format!("the server answered {status} {body}")
                    .trim_end()
                    .to_owned(),
            }
        }
        tungstenite::Error::Io(io) => Error::Connection {
            reason: format!("during the handshake: {io}"),
        },
        other => Error::Handshake {
            url: url.to_owned(),
            status: None,
            retry_after: None,
            reason: other.to_string(),
        },
    }
}

fn to_ws(frame: Frame) -> WsMessage {
    if frame.text {
        // NOTE: text frames come from `String`s, so this always succeeds.
        match Utf8Bytes::try_from(frame.data.clone()) {
            Ok(s) => WsMessage::Text(s),
            Err(_) => WsMessage::Binary(frame.data),
        }
    } else {
        WsMessage::Binary(frame.data)
    }
}

async fn send_now(ws: &mut WsStream, msg: WsMessage) -> Result<(), tungstenite::Error> {
    std::future::poll_fn(|cx| Pin::new(&mut *ws).poll_ready(cx)).await?;
    Pin::new(&mut *ws).start_send(msg)?;
    std::future::poll_fn(|cx| Pin::new(&mut *ws).poll_flush(cx)).await
}

#[derive(Deserialize)]
struct AckIn {
    #[serde(rename = "type")]
    kind: String,
    id: serde_json::Value,
}

/// A frame that may be an ack: short, with `"ack"` in it (then parsed).
fn maybe_ack(data: &[u8]) -> bool {
    data.len() <= 512 && data.windows(5).any(|w| w == b"\"ack\"")
}

type Stall = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One live connection's state, polled by the driver.
struct Conn<'a> {
    ws: WsStream,
    driver: &'a Driver,
    ping_timer: Option<Sleep>,
    /// (ping sequence awaited, deadline).
    pong_deadline: Option<(u64, Sleep)>,
    ping_seq: u64,
    write_seq: u64,
    /// (ping sequence, last write sequence before it).
    marks: VecDeque<(u64, u64)>,
    ping_queue: VecDeque<u64>,
    /// A confirmation ping in flight.
    confirm_ping: Option<u64>,
    /// Incoming messages waiting for room in the incoming queue.
    stalled: Option<Stall>,
    batch_timer: Option<(Instant, Sleep)>,
    needs_flush: bool,
    close_deadline: Option<Sleep>,
    close_sent: bool,
    server_close: Option<(u16, String)>,
    decoded: Vec<Frame>,
}

/// Frames read or written per poll before yielding to other tasks.
const BUDGET: usize = 128;

impl Conn<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let shared = &*self.driver.shared;
        shared.driver.register(cx.waker());
        if shared.closing() && self.close_deadline.is_none() {
            self.close_deadline = Some(shared.clock.sleep(self.driver.config.close_timeout));
        }
        if let Some(d) = &mut self.close_deadline
            && d.poll(cx).is_ready()
        {
            tracing::debug!(session = shared.index, "ws close reply timed out");
            return Poll::Ready(End::Closed);
        }
        if let Some(end) = self.poll_heartbeat(cx) {
            return Poll::Ready(end);
        }
        if let Some(end) = self.poll_read(cx) {
            return Poll::Ready(end);
        }
        if let Some(end) = self.poll_write(cx) {
            return Poll::Ready(end);
        }
        Poll::Pending
    }

    fn poll_heartbeat(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let shared = &*self.driver.shared;
        let (interval, timeout) = self.driver.config.heartbeat?;
        if let Some(timer) = &mut self.ping_timer
            && timer.poll(cx).is_ready()
        {
            let seq = self.queue_ping();
            if self.pong_deadline.is_none() {
                let mut deadline = shared.clock.sleep(timeout);
                let _ = deadline.poll(cx);
                self.pong_deadline = Some((seq, deadline));
            }
            let mut next = shared.clock.sleep(interval);
            let _ = next.poll(cx);
            self.ping_timer = Some(next);
        }
        if let Some((_, deadline)) = &mut self.pong_deadline
            && deadline.poll(cx).is_ready()
        {
            if self.stalled.is_some() {
                // NOTE: we stopped reading (the application is behind), so
                // a missing pong says nothing about the peer.
                let mut again = shared.clock.sleep(timeout);
                let _ = again.poll(cx);
                if let Some(pd) = &mut self.pong_deadline {
                    pd.1 = again;
                }
            } else {
                return Some(End::Dead(Error::PongTimeout { after: timeout }));
            }
        }
        None
    }

    fn queue_ping(&mut self) -> u64 {
        self.ping_seq += 1;
        self.ping_queue.push_back(self.ping_seq);
        self.marks.push_back((self.ping_seq, self.write_seq));
        self.ping_seq
    }

    fn on_pong(&mut self, payload: &[u8]) {
        let shared = &*self.driver.shared;
        bump(&shared.counters.pongs, 1);
        let Ok(bytes) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let seq = u64::from_be_bytes(bytes);
        if self.pong_deadline.as_ref().is_some_and(|(s, _)| *s <= seq) {
            self.pong_deadline = None;
        }
        if self.confirm_ping.is_some_and(|s| s <= seq) {
            self.confirm_ping = None;
        }
        let mut through = None;
        while self.marks.front().is_some_and(|(p, _)| *p <= seq) {
            through = self.marks.pop_front().map(|(_, w)| w);
        }
        if let Some(w) = through
            && !shared.at_least_once
        {
            let n = lock(&shared.outbox).confirm_through(w);
            if n > 0 {
                shared.space.notify(n);
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Option<End> {
        for _ in 0..BUDGET {
            if let Some(stall) = &mut self.stalled {
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => self.stalled = None,
                    Poll::Pending => return None,
                }
            }
            let msg = match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending => return None,
                Poll::Ready(None) => return Some(self.ended()),
                Poll::Ready(Some(Err(e))) => {
                    if self.close_sent {
                        return Some(End::Closed);
                    }
                    return Some(End::Dead(Error::connection(e)));
                }
                Poll::Ready(Some(Ok(m))) => m,
            };
            let frame = match msg {
                WsMessage::Text(t) => Frame {
                    text: true,
                    data: Bytes::from(t),
                },
                WsMessage::Binary(b) => Frame {
                    text: false,
                    data: b,
                },
                WsMessage::Pong(p) => {
                    self.on_pong(&p);
                    continue;
                }
                WsMessage::Ping(_) => {
                    // tungstenite queued the pong; make sure it is flushed.
                    self.needs_flush = true;
                    continue;
                }
                WsMessage::Close(frame) => {
                    self.server_close = Some(frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.as_str().to_owned())
                    }));
                    self.needs_flush = true;
                    continue;
                }
                WsMessage::Frame(_) => continue,
            };
            // A stall is polled at the top of the loop (registering the
            // waker).
            self.deliver(frame);
        }
        // Budget spent: come back after other tasks had a turn.
        cx.waker().wake_by_ref();
        None
    }

    fn ended(&self) -> End {
        let shared = &*self.driver.shared;
        if self.close_sent {
            if self.server_close.is_some() && !shared.at_least_once {
                // The server answered our close after reading everything
                // before it: all written messages arrived.
                let _ = lock(&shared.outbox).drain_inflight();
            }
            return End::Closed;
        }
        match &self.server_close {
            Some((code, reason)) => End::Dead(Error::Connection {
                reason: format!("closed by the server: {code} {reason}")
                    .trim_end()
                    .to_owned(),
            }),
            None => End::Dead(Error::Connection {
                reason: "the connection closed without a close frame".into(),
            }),
        }
    }

    fn deliver(&mut self, frame: Frame) {
        let shared = &*self.driver.shared;
        if shared.at_least_once
            && frame.text
            && maybe_ack(&frame.data)
            && let Ok(ack) = serde_json::from_slice::<AckIn>(&frame.data)
            && ack.kind == "ack"
        {
            let id = match ack.id {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            if lock(&shared.outbox).ack(&id) {
                bump(&shared.counters.acked, 1);
                shared.space.notify(1);
            }
            return;
        }
        self.decoded.clear();
        if let Err(error) = self
            .driver
            .config
            .codec
            .decode_frame(frame, &mut self.decoded)
        {
            bump(&shared.counters.decode_errors, 1);
            tracing::warn!(session = shared.index, error = %error, "ws frame discarded");
            shared.emit(SessionEventKind::DecodeFailed { error });
            return;
        }
        let mut rest: VecDeque<Message> = VecDeque::new();
        for f in self.decoded.drain(..) {
            let m = f.into_message();
            if !rest.is_empty() {
                rest.push_back(m);
                continue;
            }
            match self.driver.incoming.try_send(m) {
                Ok(()) => bump(&shared.counters.received, 1),
                Err(async_channel::TrySendError::Full(m)) => rest.push_back(m),
                Err(async_channel::TrySendError::Closed(_)) => {}
            }
        }
        if !rest.is_empty() {
            let tx = self.driver.incoming.clone();
            let shared = self.driver.shared.clone();
            self.stalled = Some(Box::pin(async move {
                for m in rest {
                    if tx.send(m).await.is_ok() {
                        bump(&shared.counters.received, 1);
                    }
                }
            }));
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let shared = &*self.driver.shared;
        let config = &self.driver.config;
        let mut budget = BUDGET;
        loop {
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Pending => return None,
                Poll::Ready(Err(e)) => return Some(End::Dead(Error::connection(e))),
                Poll::Ready(Ok(())) => {}
            }
            if let Some(seq) = self.ping_queue.pop_front() {
                bump(&shared.counters.pings, 1);
                let ping = WsMessage::Ping(Bytes::copy_from_slice(&seq.to_be_bytes()));
                if let Err(e) = Pin::new(&mut self.ws).start_send(ping) {
                    return Some(End::Dead(Error::connection(e)));
                }
                self.needs_flush = true;
                continue;
            }
            if self.close_sent {
                break;
            }
            let closing = shared.closing();
            let (max, max_bytes) = match config.batching {
                Some(b) => (b.max_messages, b.max_bytes),
                None => (1, usize::MAX),
            };
            let (taken, due) = {
                let mut outbox = lock(&shared.outbox);
                match (config.batching, outbox.pending.front()) {
                    // Hold a partial batch of envelopes for the window
                    // (not when closing, nor with a raw message behind it).
                    (Some(b), Some(front))
                        if !closing
                            && front.batchable
                            && outbox.pending.len() < b.max_messages
                            && shared.clock.now() < front.at + b.window
                            && outbox.pending.iter().all(|e| e.batchable) =>
                    {
                        (Vec::new(), Some(front.at + b.window))
                    }
                    _ => (outbox.take(max, max_bytes), None),
                }
            };
            if let Some(due) = due {
                if self.batch_timer.as_ref().map(|(at, _)| *at) != Some(due) {
                    self.batch_timer = Some((due, shared.clock.sleep_until(due)));
                }
                let waiting = match &mut self.batch_timer {
                    Some((_, timer)) => timer.poll(cx).is_pending(),
                    None => false,
                };
                if waiting {
                    break;
                }
                self.batch_timer = None;
                continue;
            }
            if taken.is_empty() {
                if closing {
                    let close = WsMessage::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: Utf8Bytes::from_static("closed by the application"),
                    }));
                    if let Err(e) = Pin::new(&mut self.ws).start_send(close) {
                        tracing::debug!(error = %e, "ws close frame not sent");
                        return Some(End::Closed);
                    }
                    self.close_sent = true;
                    self.needs_flush = true;
                    continue;
                }
                break;
            }
            let n = taken.len();
            let frame = if n == 1 {
                taken[0].frame.clone()
            } else {
                batch_frame(taken.iter().map(|e| &e.frame.data))
            };
            let frame = config.codec.encode_frame(frame);
            self.write_seq += 1;
            let half_full = lock(&shared.outbox).mark_written(taken, self.write_seq);
            if let Err(e) = Pin::new(&mut self.ws).start_send(to_ws(frame)) {
                return Some(End::Dead(Error::connection(e)));
            }
            bump(&shared.counters.sent, n as u64);
            bump(&shared.counters.frames_sent, 1);
            self.needs_flush = true;
            if half_full && !shared.at_least_once && self.confirm_ping.is_none() {
                self.confirm_ping = Some(self.queue_ping());
            }
        }
        if self.needs_flush {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => {
                    if self.close_sent {
                        return Some(End::Closed);
                    }
                    return Some(End::Dead(Error::connection(e)));
                }
                Poll::Pending => {}
            }
        }
        None
    }
}
