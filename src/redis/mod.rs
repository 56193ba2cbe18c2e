//! The pipeline, workers, rate limits and checkpoints across processes
//! and machines, on Redis (feature `redis`).
//!
//! - [`RedisQueue`]: a [`Queue`](crate::pool::Queue) on a Redis Stream and
//!   its consumer group, so the same [`Pipeline::from_queue`] and the same
//!   workers run in many processes: leases kept alive while a delivery is
//!   held, the work of dead consumers reclaimed, a dead-letter stream.
//! - [`RedisRateLimiter`]: GCRA in a Lua script on the server's clock, so
//!   many processes share one rate ([`for_key`](RedisRateLimiter::for_key)
//!   for one rate per host).
//! - [`RedisCheckpoint`]: a pipeline watermark that only moves forward.
//!
//! Every type here holds a [`RedisLink`]: connections made lazily, and
//! remade with the crate's [`Backoff`] when the server goes away (a
//! restart mid-run costs failed attempts that are logged, not errors, as
//! long as the server is back within the backoff's attempts).
//!
//! redis-rs drives its connections with its smol support (their tasks run
//! on smol's global executor); no tokio runtime is involved.
//!
//! [`Pipeline::from_queue`]: crate::pool::Pipeline::from_queue

mod checkpoint;
mod queue;
mod rate;

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, RedisResult, RetryMethod};

use crate::ConfigError;
use crate::resilience::Backoff;
use crate::runtime::{Clock, SystemClock};
use crate::sync::lock_std as lock;

pub use checkpoint::RedisCheckpoint;
pub use queue::{RedisDeadLetter, RedisQueue, RedisQueueBuilder, RedisQueueStats};
pub use rate::{RedisLimitError, RedisRateLimiter};

/// A Redis operation failed for good (after the reconnect attempts), or a
/// setting was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// A setting that cannot work.
    Config(ConfigError),
    /// The server or the connection failed; `op` names the operation.
    Redis {
        /// What was being done (`"XADD"`, `"connect"`, `"gcra"`).
        op: &'static str,
        /// redis-rs's error.
        source: ::redis::RedisError,
    },
    /// The server answered something this crate cannot read (a key of the
    /// wrong type, a value that is not ours).
    Unexpected {
        /// What was being read.
        what: &'static str,
        /// What came instead.
        detail: String,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Config(e) => e.fmt(f),
            StoreError::Redis { op, source } => write!(f, "redis {op}: {source}"),
            StoreError::Unexpected { what, detail } => {
                write!(f, "redis answered {detail} where {what} was expected")
            }
        }
    }
}

impl Error for StoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            StoreError::Config(e) => Some(e),
            StoreError::Redis { source, .. } => Some(source),
            StoreError::Unexpected { .. } => None,
        }
    }
}

impl From<ConfigError> for StoreError {
    fn from(e: ConfigError) -> Self {
        StoreError::Config(e)
    }
}

impl StoreError {
    pub(crate) fn unexpected(what: &'static str, detail: impl fmt::Debug) -> Self {
        let mut detail = format!("{detail:?}");
        if detail.len() > 200 {
            let mut end = 200;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
            detail.push('…');
        }
        StoreError::Unexpected { what, detail }
    }
}

/// How a [`RedisLink`] connects and reconnects.
///
/// # Default
///
/// Connect timeout 2 s, response timeout 5 s, reconnect backoff
/// exponential from 50 ms, capped at 2 s, 12 attempts (about 15 s in all:
/// enough for a restart of the server), the system clock.
#[derive(Clone)]
pub struct RedisLinkBuilder {
    url: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    backoff: Backoff,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for RedisLinkBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLinkBuilder")
            .field("url", &redact(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisLinkBuilder {
    /// How long a connection attempt may take.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a command may wait for its answer (blocking reads get
    /// their own connections with a longer one).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The delays between reconnect attempts; when it runs out, the
    /// operation fails with [`StoreError::Redis`].
    pub fn with_backoff(mut self, backoff: impl Into<Backoff>) -> Self {
        self.backoff = backoff.into();
        self
    }

    /// The clock the reconnect delays sleep on.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Checks the settings and the URL; connects on first use.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] naming a zero timeout or a URL redis-rs does
    /// not accept.
    pub fn build(self) -> Result<RedisLink, StoreError> {
        for (setting, d) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::zero(setting).into());
            }
        }
        let client = Client::open(self.url.as_str())
            .map_err(|e| ConfigError::new("url", redact(&self.url), e.to_string()))?;
        Ok(RedisLink {
            inner: Arc::new(LinkInner {
                client,
                settings: self,
                shared: Mutex::new(None),
            }),
        })
    }
}

/// Hides a password in a Redis URL (`redis://:secret@host` →
/// `redis://:***@host`).
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Connections to one Redis server, shared by the queue, limiter and
/// checkpoint built on it; cheap to clone.
///
/// Commands share one multiplexed connection (made on first use); a
/// command that fails because the connection broke, the server restarted
/// or is still loading drops the connection and is tried again on a new
/// one after the next delay of the backoff. Each failure is logged at
/// `warn`.
#[derive(Clone)]
pub struct RedisLink {
    inner: Arc<LinkInner>,
}

struct LinkInner {
    client: Client,
    settings: RedisLinkBuilder,
    /// The shared connection and its generation (so a failure on an old
    /// one does not drop a newer one).
    shared: Mutex<Option<(u64, MultiplexedConnection)>>,
}

impl fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLink")
            .field("url", &redact(&self.inner.settings.url))
            .finish_non_exhaustive()
    }
}

/// Whether a failed command may work on a new connection.
fn retryable(e: &::redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.retry_method(),
            RetryMethod::Reconnect | RetryMethod::RetryImmediately | RetryMethod::WaitAndRetry
        )
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl RedisLink {
    /// Settings for the server at `url` (`redis://host:port/db`).
    pub fn builder(url: impl Into<String>) -> RedisLinkBuilder {
        RedisLinkBuilder {
            url: url.into(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            backoff: Backoff::exponential(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(12)
                .build(),
            clock: Arc::new(SystemClock),
        }
    }

    /// A link with the default settings.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] if the URL does not parse.
    pub fn open(url: impl Into<String>) -> Result<Self, StoreError> {
        Self::builder(url).build()
    }

    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.settings.clock
    }

    /// A new connection of its own whose answers may take `response`
    /// (for blocking reads).
    pub(crate) async fn dedicated(&self, response: Duration) -> RedisResult<MultiplexedConnection> {
        let s = &self.inner.settings;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(s.connect_timeout))
            .set_response_timeout(Some(response));
        self.inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    async fn shared(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = lock(&self.inner.shared).clone() {
            return Ok(c);
        }
        let conn = self.dedicated(self.inner.settings.response_timeout).await?;
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut slot = lock(&self.inner.shared);
        // Another caller may have connected meanwhile: keep one.
        Ok(slot.get_or_insert((generation, conn)).clone())
    }

    fn forget(&self, generation: u64) {
        let mut slot = lock(&self.inner.shared);
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    /// Runs `f` on the shared connection, reconnecting and running it
    /// again (with the backoff's delays) while it fails in a way a new
    /// connection can mend. `f` gets the number of earlier failed tries.
    pub(crate) async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnMut(MultiplexedConnection, u32) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run_on(op, Source::Shared, f).await
    }

    /// Like [`run`](Self::run) on a connection of its own (kept in `conn`
    /// between calls, made again after a failure) whose answers may take
    /// `response`, for blocking commands.
    pub(crate) async fn run_blocking<T, F, Fut>(
        &self,
        op: &'static str,
        conn: &mut Option<MultiplexedConnection>,
        response: Duration,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run_on(op, Source::Own(conn, response), |c, _| f(c))
            .await
    }

    async fn run_on<T, F, Fut>(
        &self,
        op: &'static str,
        mut source: Source<'_>,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(MultiplexedConnection, u32) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut backoff = self.inner.settings.backoff.clone();
        let mut tries = 0u32;
        loop {
            let conn = match &mut source {
                Source::Shared => self.shared().await.map(|(g, c)| (Some(g), c)),
                Source::Own(slot, response) => match slot.clone() {
                    Some(c) => Ok((None, c)),
                    None => self.dedicated(*response).await.map(|c| {
                        **slot = Some(c.clone());
                        (None, c)
                    }),
                },
            };
            let (generation, e) = match conn {
                Ok((generation, c)) => match f(c, tries).await {
                    Ok(v) => return Ok(v),
                    Err(e) => (generation, e),
                },
                Err(e) => (None, e),
            };
            if !retryable(&e) {
                return Err(StoreError::Redis { op, source: e });
            }
            // Drop the broken connection: the next try makes a new one.
            match &mut source {
                Source::Shared => {
                    if let Some(g) = generation {
                        self.forget(g);
                    }
                }
                Source::Own(slot, _) => **slot = None,
            }
            match backoff.next() {
                Some(delay) => {
                    tracing::warn!(op, error = %e, tries, ?delay, "redis command failed; reconnecting");
                    self.clock().sleep(delay).await;
                    tries += 1;
                }
                None => return Err(StoreError::Redis { op, source: e }),
            }
        }
    }
}

/// Where [`RedisLink::run_on`] takes its connection from.
enum Source<'a> {
    /// The link's shared connection.
    Shared,
    /// A connection of the caller's, with its response timeout.
    Own(&'a mut Option<MultiplexedConnection>, Duration),
}

/// A reply as text (bulk or simple strings, numbers).
pub(crate) fn value_text(v: &::redis::Value) -> Option<String> {
    use ::redis::Value;
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".to_owned()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A reply as a number (integers, or text holding one).
pub(crate) fn value_int(v: &::redis::Value) -> Option<i64> {
    match v {
        ::redis::Value::Int(i) => Some(*i),
        other => value_text(other)?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_urls() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h:1"), "redis://u:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        let e = RedisLink::builder("redis://:pw@h:1")
            .with_response_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid response_timeout = 0: must be greater than zero"
        );
        let e = RedisLink::open("http://:pw@h:1").unwrap_err();
        assert!(e.to_string().contains("url = http://:***@h:1"), "{e}");
    }
}
