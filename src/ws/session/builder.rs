//! `SessionBuilder`: the settings, their checks, and starting a session.

use super::*;

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batching {
    pub(super) window: Duration,
    pub(super) max_messages: usize,
    pub(super) max_bytes: usize,
}

/// Configures and starts a [`Session`].
///
/// # Default
///
/// - heartbeat: a ping every 20 s, dead after 10 s without its pong
/// - reconnect: 1 s doubling to 30 s, full jitter, a handshake's
///   `Retry-After` honoured up to 60 s; the schedule starts over after a
///   connection stable for 20 s; never gives up
/// - connect timeout 10 s (TCP + TLS + upgrade), and the same for the
///   `on_connect` hook; close timeout 5 s
/// - outbox: 1024 messages and 8 MiB, [`OutboxOverflow::Wait`]
/// - delivery confirmed by pong (at-least-once off); no batching
/// - codec: [`Codec::new`]; incoming and event queues of 1024
/// - webpki's roots; the system clock; the default spawner
#[derive(Clone)]
pub struct SessionBuilder {
    pub(super) url: String,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) spawner: Arc<dyn Spawn>,
    pub(super) timing: Timing,
    pub(super) outbox_messages: usize,
    pub(super) outbox_bytes: usize,
    pub(super) overflow: OutboxOverflow,
    pub(super) at_least_once: bool,
    pub(super) codec: Codec,
    pub(super) batching: Option<Batching>,
    pub(super) on_connect: Option<Hook>,
    pub(super) incoming_capacity: usize,
    pub(super) events_capacity: usize,
    pub(super) tls: TlsOptions,
    pub(super) headers: Vec<(String, String)>,
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
            .field("heartbeat", &self.timing.heartbeat)
            .field("backoff", &self.timing.backoff)
            .field("max_attempts", &self.timing.max_attempts)
            .field("give_up_after", &self.timing.give_up_after)
            .field("outbox_messages", &self.outbox_messages)
            .field("outbox_bytes", &self.outbox_bytes)
            .field("overflow", &self.overflow)
            .field("at_least_once", &self.at_least_once)
            .field("codec", &self.codec)
            .field("batching", &self.batching)
            .field("on_connect", &self.on_connect.is_some())
            .field("extra_roots", &self.tls.extra_roots())
            .finish()
    }
}

impl SessionBuilder {
    pub(crate) fn new(url: &str) -> Self {
        SessionBuilder {
            url: url.to_owned(),
            clock: Arc::new(SystemClock),
            spawner: default_spawner(),
            timing: Timing {
                heartbeat: Some((Duration::from_secs(20), Duration::from_secs(10))),
                backoff: Backoff::exponential(Duration::from_secs(1))
                    .with_max_delay(Duration::from_secs(30))
                    .with_jitter(Jitter::Full)
                    .build(),
                max_attempts: None,
                give_up_after: None,
                connect_timeout: Some(Duration::from_secs(10)),
                close_timeout: Duration::from_secs(5),
                max_retry_after: Duration::from_secs(60),
                stable_after: Duration::from_secs(20),
                hook_timeout: None,
            },
            outbox_messages: 1024,
            outbox_bytes: 8 << 20,
            overflow: OutboxOverflow::Wait,
            at_least_once: false,
            codec: Codec::new(),
            batching: None,
            on_connect: None,
            incoming_capacity: 1024,
            events_capacity: 1024,
            tls: TlsOptions::default(),
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

    /// Where the driver task runs (default: the default spawner (the current `Runtime`, else smol's global executor)).
    pub fn with_spawner(mut self, spawner: impl Spawn + 'static) -> Self {
        self.spawner = Arc::new(spawner);
        self
    }

    /// `(interval, timeout)`: ping every `interval`; the peer is dead when
    /// no pong arrives within `timeout` of a ping (default 20 s and 10 s).
    /// `None`: no heartbeat, a silent dead peer is only noticed when a write
    /// fails.
    pub fn with_heartbeat(mut self, heartbeat: impl Into<Option<(Duration, Duration)>>) -> Self {
        self.timing.heartbeat = heartbeat.into();
        self
    }

    /// The delays between connection attempts (default 1 s doubling to
    /// 30 s with full jitter). A schedule that ends
    /// ([`with_max_times`](crate::resilience::BackoffBuilder::with_max_times)) gives up when it
    /// does. A 429 or 503 handshake answer with `Retry-After` replaces the
    /// next delay.
    pub fn with_reconnect(mut self, backoff: impl Into<Backoff>) -> Self {
        self.timing.backoff = backoff.into();
        self
    }

    /// Give up after `n` failed attempts in a row (the session closes with
    /// [`Error::GaveUp`]); `None` (the default): never for that reason.
    pub fn with_give_up_after_attempts(mut self, n: impl Into<Option<u32>>) -> Self {
        self.timing.max_attempts = n.into();
        self
    }

    /// Give up when the session has been without a connection for `d`
    /// (a wait that would end past it gives up at once); `None` (the
    /// default): never for that reason.
    pub fn with_give_up_after(mut self, d: impl Into<Option<Duration>>) -> Self {
        self.timing.give_up_after = d.into();
        self
    }

    /// The limit on TCP + TLS + upgrade (default 10 s; `None`: no limit).
    pub fn with_connect_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timing.connect_timeout = timeout.into();
        self
    }

    /// The limit on the [`on_connect`](Self::on_connect) hook (default: the
    /// connect timeout); `None` for none. A hook that takes longer fails
    /// the attempt like a hook error ([`Error::Hook`]): the connection is
    /// dropped and the session reconnects.
    pub fn with_on_connect_timeout(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.timing.hook_timeout = Some(limit.into());
        self
    }

    /// How long a connection must stay up before the reconnect schedule
    /// starts over (default 20 s: one heartbeat interval, long enough for
    /// a server to have accepted the session for real, past
    /// authentication and `on_connect`). A connection that ends sooner
    /// counts as a failed attempt: the delays keep growing, and
    /// [`with_give_up_after_attempts`](Self::with_give_up_after_attempts)
    /// applies.
    pub fn with_stable_after(mut self, period: Duration) -> Self {
        self.timing.stable_after = period;
        self
    }

    /// The longest a handshake's `Retry-After` may delay the next attempt
    /// (default 60 s, as the `ApiClient`'s retry); a longer one
    /// is cut to it.
    pub fn with_max_retry_after(mut self, cap: Duration) -> Self {
        self.timing.max_retry_after = cap;
        self
    }

    /// How long [`Session::close`] waits for the server's close reply
    /// (default 5 s).
    pub fn with_close_timeout(mut self, timeout: Duration) -> Self {
        self.timing.close_timeout = timeout;
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
    /// A raw message ([`Session::send`], no id) cannot be acked: it is
    /// confirmed by a pong as in the default mode, and reported
    /// unconfirmed (not resent) if its connection dies first.
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

    /// Trusts `cert` (DER) as a root for `wss://`, beside webpki's roots
    /// (each call adds one).
    pub fn with_root_certificate(mut self, cert: CertificateDer<'static>) -> Self {
        self.tls.add_root(cert);
        self
    }

    /// Trusts every certificate in `pem` as a root.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `root certificate` when the PEM does not
    /// parse or holds no certificate.
    pub fn with_root_pem(mut self, pem: impl AsRef<[u8]>) -> Result<Self, ConfigError> {
        self.tls.add_pem(pem.as_ref())?;
        Ok(self)
    }

    /// A whole rustls configuration instead of webpki's roots (+ extra).
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls.set_config(config);
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

    pub(super) fn validate(&self) -> Result<Target, Error> {
        let target = Target::parse(&self.url)?;
        let bad = |setting: &'static str, value: String, reason: &'static str| {
            Err(Error::Config(ConfigError::new(
                setting,
                format_args!("{value}"),
                reason,
            )))
        };
        if let Some((interval, timeout)) = self.timing.heartbeat
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
        let tls = self.tls.client_config(&[b"http/1.1"]);
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
            timing: self.timing,
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
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the session handle; the driver then closes
    /// the session (nothing was sent yet).
    pub async fn connect(self) -> Result<Session, Error> {
        let session = self.start()?;
        session.wait_connected().await?;
        Ok(session)
    }
}

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) url: String,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: bool,
}

impl Target {
    pub(super) fn parse(raw: &str) -> Result<Target, ConfigError> {
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

pub(super) struct Config {
    pub(super) target: Target,
    pub(super) headers: Vec<(String, String)>,
    pub(super) tls: Arc<rustls::ClientConfig>,
    pub(super) timing: Timing,
    pub(super) codec: Codec,
    pub(super) batching: Option<Batching>,
    pub(super) on_connect: Option<Hook>,
}

/// The connection's timing: heartbeat, reconnect schedule, give-up rules
/// and timeouts (shared by the builder and the running driver).
#[derive(Clone)]
pub(super) struct Timing {
    pub(super) heartbeat: Option<(Duration, Duration)>,
    pub(super) backoff: Backoff,
    pub(super) max_attempts: Option<u32>,
    pub(super) give_up_after: Option<Duration>,
    pub(super) connect_timeout: Option<Duration>,
    pub(super) close_timeout: Duration,
    pub(super) max_retry_after: Duration,
    pub(super) stable_after: Duration,
    /// `None`: as the connect timeout.
    pub(super) hook_timeout: Option<Option<Duration>>,
}
