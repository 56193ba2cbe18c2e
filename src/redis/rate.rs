//! [`RedisRateLimiter`]: one GCRA rate shared by many processes.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::{Script, Value};

use super::{RedisLink, StoreError, value_int};
use crate::limit::{Quota, RateLimit, RateLimitError, RateLimitFuture, Semaphore};

/// GCRA on the server's clock. `KEYS`: the TAT key. `ARGV`: emission
/// interval (µs), burst, cells. `{1, 0}` admitted, `{0, wait µs}` not yet,
/// `{-1, burst}` more cells than the burst. The key expires once the TAT
/// is in the past (an idle limiter leaves nothing behind).
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
if n > burst then return {-1, burst} end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * n
local ahead = new_tat - now
local window = interval * burst
if ahead > window then return {0, ahead - window} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(ahead / 1000) + 1)
return {1, 0}
";

/// A [`RedisRateLimiter`] said no, or could not ask.
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisLimitError {
    /// The limit: the same answers as [`RateLimiter`](crate::limit::RateLimiter).
    Limited(RateLimitError),
    /// Redis could not be reached (after the link's reconnect attempts).
    Store(StoreError),
}

impl RedisLimitError {
    /// How long to wait before trying again, if waiting can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RedisLimitError::Limited(e) => e.retry_after(),
            RedisLimitError::Store(_) => None,
        }
    }
}

impl fmt::Display for RedisLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisLimitError::Limited(e) => e.fmt(f),
            RedisLimitError::Store(e) => write!(f, "shared rate limit: {e}"),
        }
    }
}

impl Error for RedisLimitError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RedisLimitError::Limited(e) => Some(e),
            RedisLimitError::Store(e) => Some(e),
        }
    }
}

/// A GCRA rate limiter whose state lives in Redis, so every process that
/// uses the same key shares one rate: `rate` cells per `period`, `burst`
/// at once, the [`Quota`] of [`RateLimiter`](crate::limit::RateLimiter).
///
/// One Lua script (sent once, then called by its SHA; sent again if the
/// server lost it) reads and advances the theoretical arrival time on the
/// server's clock (`TIME`), so the processes' clocks do not need to agree.
///
/// - [`check(n)`](Self::check) never waits (beyond the round trip).
/// - [`until_ready(n)`](Self::until_ready) waits, FIFO among this
///   process's waiters (one of them asks the server at a time; the others
///   queue behind it on a fair semaphore). Across processes there is no
///   order, only the rate.
/// - [`for_key`](Self::for_key) gives the same quota under another key:
///   one rate per host, per user, …
///
/// Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// use smolkit::limit::Quota;
/// use smolkit::redis::{RedisLink, RedisRateLimiter};
///
/// # smol::block_on(async {
/// let link = RedisLink::open("redis://127.0.0.1:6379/")?;
/// let limiter = RedisRateLimiter::new(link, "api:example.com", Quota::per_second(50)?);
/// limiter.until_ready(1).await?; // at most 50 a second across every process
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # });
/// ```
#[derive(Clone)]
pub struct RedisRateLimiter {
    link: RedisLink,
    key: String,
    quota: Quota,
    script: Arc<Script>,
    turnstile: Arc<Semaphore>,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("key", &self.key)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

impl RedisRateLimiter {
    /// A limiter on `key` (the Redis key of its state).
    pub fn new(link: RedisLink, key: impl Into<String>, quota: Quota) -> Self {
        RedisRateLimiter {
            link,
            key: key.into(),
            quota,
            script: Arc::new(Script::new(GCRA)),
            turnstile: Arc::new(Semaphore::new(1)),
        }
    }

    /// The same quota under `<key>:<sub>`, with a turnstile of its own.
    pub fn for_key(&self, sub: impl fmt::Display) -> Self {
        RedisRateLimiter {
            link: self.link.clone(),
            key: format!("{}:{sub}", self.key),
            quota: self.quota,
            script: self.script.clone(),
            turnstile: Arc::new(Semaphore::new(1)),
        }
    }

    /// The Redis key of its state.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Admits `n` cells now, or says when they would conform.
    ///
    /// # Errors
    ///
    /// [`RedisLimitError::Limited`] with [`RateLimitError::NotYet`] and
    /// the wait, or [`RateLimitError::InsufficientCapacity`] if `n`
    /// exceeds the burst; [`RedisLimitError::Store`] if Redis cannot be
    /// reached.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the cells may or may not have been taken.
    pub async fn check(&self, n: u32) -> Result<(), RedisLimitError> {
        if n > self.quota.burst() {
            return Err(RedisLimitError::Limited(
                RateLimitError::InsufficientCapacity {
                    requested: n,
                    burst: self.quota.burst(),
                },
            ));
        }
        let interval_us = u64::try_from(self.quota.emission_interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let (key, script, burst) = (&self.key, &self.script, self.quota.burst());
        let v: Value = self
            .link
            .run("gcra", |mut c, _| async move {
                script
                    .key(key)
                    .arg(interval_us)
                    .arg(burst)
                    .arg(n)
                    .invoke_async(&mut c)
                    .await
            })
            .await
            .map_err(RedisLimitError::Store)?;
        let pair = match &v {
            Value::Array(p) => (p.first().and_then(value_int), p.get(1).and_then(value_int)),
            _ => (None, None),
        };
        match pair {
            (Some(1), _) => Ok(()),
            (Some(0), Some(wait)) => Err(RedisLimitError::Limited(RateLimitError::NotYet {
                retry_after: Duration::from_micros(u64::try_from(wait).unwrap_or(0).max(1)),
            })),
            (Some(-1), Some(burst)) => Err(RedisLimitError::Limited(
                RateLimitError::InsufficientCapacity {
                    requested: n,
                    burst: u32::try_from(burst).unwrap_or(u32::MAX),
                },
            )),
            _ => Err(RedisLimitError::Store(StoreError::unexpected(
                "a GCRA reply",
                v,
            ))),
        }
    }

    /// Waits until `n` cells conform and takes them.
    ///
    /// # Errors
    ///
    /// [`RateLimitError::InsufficientCapacity`] (in
    /// [`RedisLimitError::Limited`]) at once if `n` exceeds the burst;
    /// [`RedisLimitError::Store`] if Redis cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it sleeps takes no cells and passes the
    /// turn to the next waiter.
    pub async fn until_ready(&self, n: u32) -> Result<(), RedisLimitError> {
        let _turn = self.turnstile.acquire().await;
        loop {
            match self.check(n).await {
                Err(RedisLimitError::Limited(RateLimitError::NotYet { retry_after })) => {
                    self.link.clock().sleep(retry_after).await;
                }
                other => return other,
            }
        }
    }
}

/// `ApiClient::with_rate_limit` and `Policy::with_rate_limit` take it: a
/// store failure is logged at `warn` and reported as
/// [`RateLimitError::Unavailable`] (no call goes through unmetered).
impl RateLimit for RedisRateLimiter {
    fn until_ready(&self, n: u32) -> RateLimitFuture<'_> {
        Box::pin(async move {
            match RedisRateLimiter::until_ready(self, n).await {
                Ok(()) => Ok(()),
                Err(RedisLimitError::Limited(e)) => Err(e),
                Err(RedisLimitError::Store(e)) => {
                    tracing::warn!(key = %self.key, error = %e, "shared rate limit unavailable");
                    Err(RateLimitError::Unavailable)
                }
            }
        })
    }
}
