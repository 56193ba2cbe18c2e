//! `ApiClient`: a JSON API client with retries, Retry-After, a breaker per
//! host, limits and a tracing span per call (the seeds' "API client with
//! retries", SCENARIOS.md §2).

mod batch;
mod builder;
mod request;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use ::http::header::{ACCEPT, CONTENT_TYPE};
use ::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::ConfigError;
use crate::http::body::Body;
use crate::http::client::Client;
use crate::http::error::Error;
use crate::http::hyper::{DEFAULT_PER_HOST, HyperClient};
use crate::limit::{IntoRateLimit, RateLimit, Semaphore};
use crate::net::{excerpt, retry_after};
use crate::resilience::{
    AttemptErrorRef, Backoff, BreakerBuilder, CallOutcome, CircuitBreaker, Classify, Decision,
    Retry, RetryError, watchdog_on,
};
use crate::runtime::{Clock, SystemClock};
use crate::sync::lock_std as lock;

use batch::ordered_concurrent;
pub use builder::{ApiClassifier, ApiClientBuilder, default_classifier};
pub use request::{ApiRequest, ApiResponse};

/// A client for one JSON API: a base URL, default headers, and the
/// resilience every call gets.
///
/// Per call, outer to inner:
///
/// 1. **concurrency limit** (optional): at most N calls in flight, held
///    across the call's retries so retries cannot multiply concurrency;
/// 2. **circuit breaker per host** (optional): rejects at once with
///    [`Error::CircuitOpen`] while the host is known to be down; one
///    logical call is one sample (5xx, 429 and transport errors are
///    failures, anything else a success);
/// 3. **retry**: on 429, 500, 502, 503, 504 and transport errors
///    ([`Error::is_transport`]), only for idempotent methods (GET, HEAD,
///    OPTIONS, TRACE, PUT, DELETE) unless the call opts in with
///    [`ApiRequest::retry_non_idempotent`]; a `Retry-After` header
///    (seconds or an HTTP date) replaces the backoff delay (capped by the
///    retry's `max_retry_after`);
/// 4. **rate limit** (optional): each attempt waits for a cell, since each
///    attempt is a request the server counts;
/// 5. **timeout per attempt**: sending, the response head and reading the
///    body (bounded by the body limit).
///
/// A final status of 400 or above is [`Error::Status`] with a body
/// excerpt. Each call runs in a `tracing` span `http.call` with `method`,
/// `endpoint`, `url`, `status`, `attempts` and `duration_ms`, and ends
/// with one `info` event carrying them.
///
/// # Default
///
/// - backend: a [`HyperClient`] with its defaults
/// - retry: 3 attempts, exponential backoff from 200 ms, ×2, capped at
///   10 s, full jitter; Retry-After capped at 60 s
/// - timeout per attempt: 30 s; no total timeout
/// - body limit: 16 MiB
/// - no breaker, no concurrency or rate limit
/// - headers: `Accept: application/json`
///
/// # Examples
///
/// ```no_run
/// use smolkit::http::ApiClient;
///
/// #[derive(serde::Deserialize)]
/// struct User { id: u64, name: String }
///
/// # smol::block_on(async {
/// let api = ApiClient::builder("https://api.example.com/v1/")
///     .with_header("authorization", "Bearer token")
///     .with_concurrency_limit(8)
///     .build()?;
/// let user: User = api.get("users/1").json().await?;
/// # Ok::<(), smolkit::http::Error>(())
/// # });
/// ```
#[derive(Clone)]
pub struct ApiClient {
    inner: Arc<Inner>,
}

struct Inner {
    base: url::Url,
    client: Arc<dyn Client>,
    headers: HeaderMap,
    timeout: Option<Duration>,
    body_limit: u64,
    retry: Retry,
    classifier: ApiClassifier,
    breaker: Option<BreakerBuilder>,
    breakers: Mutex<HashMap<String, CircuitBreaker>>,
    concurrency: Option<Arc<Semaphore>>,
    rate: Option<Arc<dyn RateLimit>>,
    clock: Arc<dyn Clock>,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    rejected: AtomicU64,
    in_flight: AtomicUsize,
}

/// A snapshot of an [`ApiClient`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiStats {
    /// Calls started.
    pub calls: u64,
    /// Calls that ended with a status below 400.
    pub succeeded: u64,
    /// Calls that ended with an error (status, transport, breaker).
    pub failed: u64,
    /// Attempts beyond the first, over all calls.
    pub retries: u64,
    /// Calls rejected by an open breaker (also counted in `failed`).
    pub rejected: u64,
    /// Calls in flight now.
    pub in_flight: usize,
}

impl ApiClient {
    /// A builder for the API at `base_url`.
    pub fn builder(base_url: &str) -> ApiClientBuilder {
        ApiClientBuilder {
            base: base_url.to_owned(),
            client: None,
            headers: Vec::new(),
            timeout: Some(Duration::from_secs(30)),
            total_timeout: None,
            body_limit: 16 << 20,
            retry: None,
            classifier: Arc::new(default_classifier),
            breaker: None,
            concurrency: None,
            rate: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// A GET of `path` (joined to the base URL).
    pub fn get(&self, path: &str) -> ApiRequest {
        self.request(Method::GET, path)
    }

    /// A POST of `path`.
    pub fn post(&self, path: &str) -> ApiRequest {
        self.request(Method::POST, path)
    }

    /// A PUT of `path`.
    pub fn put(&self, path: &str) -> ApiRequest {
        self.request(Method::PUT, path)
    }

    /// A PATCH of `path`.
    pub fn patch(&self, path: &str) -> ApiRequest {
        self.request(Method::PATCH, path)
    }

    /// A DELETE of `path`.
    pub fn delete(&self, path: &str) -> ApiRequest {
        self.request(Method::DELETE, path)
    }

    /// A request with any method. `path` is appended to the base URL's path
    /// (a leading `/` does not drop the base path); an absolute URL is
    /// refused.
    pub fn request(&self, method: Method, path: &str) -> ApiRequest {
        let url = self.join(path);
        ApiRequest {
            api: self.clone(),
            method,
            endpoint: path.to_owned(),
            url,
            headers: HeaderMap::new(),
            body: None,
            retry_any: false,
            error: None,
        }
    }

    /// Sends every request, at most `concurrency` at a time (0 is taken as
    /// 1), and returns their results in input order.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the calls in flight (their connections
    /// close) and the ones not started; no result is returned for any of
    /// them.
    pub async fn batch(
        &self,
        requests: impl IntoIterator<Item = ApiRequest>,
        concurrency: usize,
    ) -> Vec<Result<ApiResponse, Error>> {
        ordered_concurrent(
            requests.into_iter().map(ApiRequest::send),
            concurrency.max(1),
        )
        .await
    }

    /// The per-host breaker for `host` (`host:port`), if breakers are on
    /// and the host has been called.
    pub fn breaker(&self, host: &str) -> Option<CircuitBreaker> {
        lock(&self.inner.breakers).get(host).cloned()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ApiStats {
        let s = &self.inner.stats;
        ApiStats {
            calls: s.calls.load(Ordering::Relaxed),
            succeeded: s.succeeded.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
        }
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        self.inner.base.as_str()
    }

    fn join(&self, path: &str) -> Result<url::Url, Error> {
        let bad = |reason: &dyn fmt::Display| {
            Error::invalid_url(format!("{} + {path}", self.inner.base), reason)
        };
        if url::Url::parse(path).is_ok() {
            return Err(bad(
                &"an absolute URL where a path relative to the base was expected",
            ));
        }
        if path.starts_with("//") {
            return Err(bad(&"a scheme-relative URL where a path was expected"));
        }
        self.inner
            .base
            .join(path.trim_start_matches('/'))
            .map_err(|e| bad(&e))
    }

    fn breaker_for(&self, host: &str) -> Option<CircuitBreaker> {
        let template = self.inner.breaker.as_ref()?;
        let mut breakers = lock(&self.inner.breakers);
        if let Some(b) = breakers.get(host) {
            return Some(b.clone());
        }
        // NOTE: the template was built once in `ApiClientBuilder::build`,
        // so this cannot fail.
        let b = template.clone().with_name(host).build().ok()?;
        breakers.insert(host.to_owned(), b.clone());
        Some(b)
    }

    async fn call(&self, request: ApiRequest) -> Result<ApiResponse, Error> {
        let inner = &self.inner;
        let stats = &inner.stats;
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = Decrement(&stats.in_flight);
        let start = inner.clock.now();
        let span = tracing::Span::current();
        let result = self.call_inner(request, &span).await;
        let duration = inner.clock.now().saturating_duration_since(start);
        span.record("duration_ms", duration.as_secs_f64() * 1e3);
        match &result {
            Ok(r) => {
                stats.succeeded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    status = r.status.as_u16(),
                    attempts = r.attempts,
                    duration_ms = duration.as_secs_f64() * 1e3,
                    "http call done"
                );
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, status = e.status().map(|s| s.as_u16()), duration_ms = duration.as_secs_f64() * 1e3, "http call failed");
            }
        }
        result
    }

    async fn call_inner(
        &self,
        request: ApiRequest,
        span: &tracing::Span,
    ) -> Result<ApiResponse, Error> {
        let inner = &self.inner;
        let call = self.prepare(request)?;
        let _slot = match &inner.concurrency {
            Some(sem) => Some(sem.acquire().await.map_err(|_| Error::Closed)?),
            None => None,
        };
        let permit = match self.breaker_for(&call.host) {
            Some(b) => match b.try_acquire() {
                Ok(p) => Some(p),
                Err(rejected) => {
                    inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::CircuitOpen {
                        host: call.host,
                        retry_after: rejected.retry_after(),
                    });
                }
            },
            None => None,
        };

        let attempts = AtomicU32::new(0);
        let attempt = || {
            let n = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            if n > 1 {
                inner.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            self.attempt(&call, n)
        };
        let outcome = self.retry_for(call.retry_allowed).run(attempt).await;
        let made = attempts.load(Ordering::Relaxed);
        span.record("attempts", made);
        let outcome = match outcome {
            Ok(mut r) => {
                r.attempts = made;
                span.record("status", r.status.as_u16());
                Ok(r)
            }
            Err(e) => Err(retry_error(e, call.url.as_str(), inner.timeout)),
        };
        if let Some(permit) = permit {
            permit.record(match &outcome {
                Ok(r) if is_retryable_status(r.status) => CallOutcome::Failure,
                Ok(_) => CallOutcome::Success,
                Err(e) if e.is_transport() => CallOutcome::Failure,
                Err(_) => CallOutcome::Ignore,
            });
        }
        let response = outcome?;
        if response.status.as_u16() >= 400 {
            return Err(Error::Status {
                method: call.method,
                url: response.url,
                status: response.status,
                excerpt: excerpt(&response.body),
            });
        }
        Ok(response)
    }

    /// Checks the request and merges the default headers into it.
    fn prepare(&self, request: ApiRequest) -> Result<Prepared, Error> {
        if let Some(e) = request.error {
            return Err(e);
        }
        let url = request.url?;
        let host = match (url.host_str(), url.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => return Err(Error::invalid_url(&url, "no host")),
        };
        let uri: ::http::Uri = url
            .as_str()
            .parse()
            .map_err(|e| Error::invalid_url(&url, e))?;
        let mut headers = self.inner.headers.clone();
        for (name, value) in &request.headers {
            headers.insert(name.clone(), value.clone());
        }
        Ok(Prepared {
            retry_allowed: request.retry_any || is_idempotent(&request.method),
            method: request.method,
            body: request.body.unwrap_or_default(),
            url,
            host,
            uri,
            headers,
        })
    }

    /// Attempt `n` of `call`: a rate-limit cell, then the exchange (the
    /// response read whole) within the per-attempt timeout.
    fn attempt(
        &self,
        call: &Prepared,
        n: u32,
    ) -> impl Future<Output = Result<ApiResponse, Error>> + use<'_> {
        let inner = &*self.inner;
        let mut req = Request::new(Body::from_bytes(call.body.clone()));
        *req.method_mut() = call.method.clone();
        *req.uri_mut() = call.uri.clone();
        *req.headers_mut() = call.headers.clone();
        let url = call.url.to_string();
        async move {
            if let Some(rate) = &inner.rate {
                rate.until_ready(1).await.map_err(Error::RateLimited)?;
            }
            let exchange = async {
                let response = inner.client.send(req).await?;
                let (parts, body) = response.into_parts();
                let bytes = body.bytes_limited(inner.body_limit).await?;
                Ok::<_, Error>((parts, bytes))
            };
            let (parts, bytes) = match inner.timeout {
                Some(after) => {
                    watchdog_on(&*inner.clock, after, exchange)
                        .await
                        .map_err(|_| Error::Timeout {
                            url: url.clone(),
                            after,
                        })??
                }
                None => exchange.await?,
            };
            tracing::debug!(attempt = n, status = parts.status.as_u16(), "http attempt");
            Ok(ApiResponse {
                status: parts.status,
                headers: parts.headers,
                body: bytes,
                url,
                attempts: n,
            })
        }
    }

    /// The client's retry with its classifier, never retrying what may not
    /// be retried.
    fn retry_for(&self, retry_allowed: bool) -> Retry<impl Classify<ApiResponse, Error>> {
        let classifier = self.inner.classifier.clone();
        self.inner
            .retry
            .clone()
            .with_classifier(move |outcome: Result<&ApiResponse, &Error>| {
                if !retry_allowed {
                    return Decision::Done;
                }
                classifier(outcome)
            })
    }
}

/// A call ready to be attempted.
struct Prepared {
    method: Method,
    url: url::Url,
    host: String,
    uri: ::http::Uri,
    headers: HeaderMap,
    body: Bytes,
    retry_allowed: bool,
}

fn retry_error(e: RetryError<Error>, url: &str, timeout: Option<Duration>) -> Error {
    match e.last_error() {
        AttemptErrorRef::TimedOut(elapsed) => Error::Timeout {
            url: url.to_owned(),
            after: timeout.unwrap_or(elapsed.after()),
        },
        AttemptErrorRef::Inner(_) => e.into_inner().unwrap_or(Error::Closed),
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// GET, HEAD, OPTIONS, TRACE, PUT and DELETE (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// 429, 500, 502, 503, 504.
fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.inner.base.as_str())
            .field("timeout", &self.inner.timeout)
            .field("body_limit", &self.inner.body_limit)
            .field("stats", &self.stats())
            .finish()
    }
}
