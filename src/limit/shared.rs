//! [`RateLimit`]: what `ApiClient` and `Policy` wait on, local or shared.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::error::RateLimitError;
use super::rate::RateLimiter;

/// The future [`RateLimit::until_ready`] returns.
pub type RateLimitFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(), RateLimitError>> + Send + 'a>>;

/// A rate limit to wait on: the in-process [`RateLimiter`], or one that
/// many processes share (`redis::RedisRateLimiter`, feature `redis`).
/// [`ApiClient`](crate::http::ApiClient) and
/// [`Policy`](crate::resilience::Policy) take either through
/// [`IntoRateLimit`].
pub trait RateLimit: Send + Sync + fmt::Debug {
    /// Waits until `n` cells conform and takes them.
    ///
    /// # Errors
    ///
    /// [`RateLimitError::InsufficientCapacity`] if `n` exceeds the burst;
    /// [`RateLimitError::Unavailable`] if a shared limiter's store cannot
    /// be reached (no cells are given out then: it fails closed).
    fn until_ready(&self, n: u32) -> RateLimitFuture<'_>;
}

impl RateLimit for RateLimiter {
    fn until_ready(&self, n: u32) -> RateLimitFuture<'_> {
        Box::pin(RateLimiter::until_ready(self, n))
    }
}

/// What a `with_rate_limit` setter accepts: an `Arc` of any
/// [`RateLimit`], an `Arc<dyn RateLimit>`, or `None` for no limit.
pub trait IntoRateLimit {
    /// The limit, type-erased.
    fn into_rate_limit(self) -> Option<Arc<dyn RateLimit>>;
}

impl<L: RateLimit + 'static> IntoRateLimit for Arc<L> {
    fn into_rate_limit(self) -> Option<Arc<dyn RateLimit>> {
        Some(self)
    }
}

impl IntoRateLimit for Arc<dyn RateLimit> {
    fn into_rate_limit(self) -> Option<Arc<dyn RateLimit>> {
        Some(self)
    }
}

impl IntoRateLimit for Option<Arc<dyn RateLimit>> {
    fn into_rate_limit(self) -> Option<Arc<dyn RateLimit>> {
        self
    }
}
