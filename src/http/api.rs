//! `ApiClient`: a JSON API client with retries, Retry-After, a breaker per
//! host, limits and a tracing span per call (the seeds' "API client with
//! retries", SCENARIOS.md §2).

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

use super::body::Body;
use super::client::Client;
use super::error::Error;
use super::hyper::{DEFAULT_PER_HOST, HyperClient};
use crate::ConfigError;
use crate::limit::{RateLimiter, Semaphore};
use crate::net::{excerpt, retry_after};
use crate::resilience::{
    AttemptErrorRef, Backoff, BreakerBuilder, CallOutcome, CircuitBreaker, Decision, Retry,
    RetryError, timeout_on,
};
use crate::runtime::{Clock, SystemClock};
use crate::sync::lock_std as lock;

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
    rate: Option<Arc<RateLimiter>>,
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
        let method = request.method;
        let retry_allowed = request.retry_any || is_idempotent(&method);
        let mut headers = inner.headers.clone();
        for (name, value) in &request.headers {
            headers.insert(name.clone(), value.clone());
        }
        let body = request.body.unwrap_or_default();

        let _slot = match &inner.concurrency {
            Some(sem) => Some(sem.acquire().await.map_err(|_| Error::Closed)?),
            None => None,
        };
        let permit = match self.breaker_for(&host) {
            Some(b) => match b.try_acquire() {
                Ok(p) => Some(p),
                Err(rejected) => {
                    inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::CircuitOpen {
                        host,
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
            let mut req = Request::new(Body::from_bytes(body.clone()));
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers.clone();
            let url = url.as_str();
            async move {
                if let Some(rate) = &inner.rate {
                    rate.until_ready(1).await.map_err(|_| Error::Closed)?;
                }
                let exchange = async {
                    let response = inner.client.send(req).await?;
                    let (parts, body) = response.into_parts();
                    let bytes = body.bytes_limited(inner.body_limit).await?;
                    Ok::<_, Error>((parts, bytes))
                };
                let (parts, bytes) = match inner.timeout {
                    Some(after) => {
                        timeout_on(&*inner.clock, after, exchange)
                            .await
                            .map_err(|_| Error::Timeout {
                                url: url.to_owned(),
                                after,
                            })??
                    }
                    None => exchange.await?,
                };
                tracing::debug!(attempt = n, status = parts.status.as_u16(), "http attempt");
                Ok::<_, Error>(ApiResponse {
                    status: parts.status,
                    headers: parts.headers,
                    body: bytes,
                    url: url.to_owned(),
                    attempts: n,
                })
            }
        };
        let classifier = inner.classifier.clone();
        let retry =
            inner
                .retry
                .clone()
                .with_classifier(move |outcome: Result<&ApiResponse, &Error>| {
                    if !retry_allowed {
                        return Decision::Done;
                    }
                    classifier(outcome)
                });
        let outcome = retry.run(attempt).await;
        let made = attempts.load(Ordering::Relaxed);
        span.record("attempts", made);
        let outcome = match outcome {
            Ok(mut r) => {
                r.attempts = made;
                span.record("status", r.status.as_u16());
                Ok(r)
            }
            Err(e) => Err(retry_error(e, url.as_str(), inner.timeout)),
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
                method,
                url: response.url,
                status: response.status,
                excerpt: excerpt(&response.body),
            });
        }
        Ok(response)
    }
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

/// Runs the futures at most `n` at a time and returns their outputs in
/// input order, on the caller's task (nothing is spawned).
async fn ordered_concurrent<I, F>(futures: I, n: usize) -> Vec<F::Output>
where
    I: Iterator<Item = F>,
    F: Future,
{
    let mut pending = futures.enumerate();
    let mut running: Vec<(usize, Pin<Box<F>>)> = Vec::new();
    let mut done: Vec<(usize, F::Output)> = Vec::new();
    let mut exhausted = false;
    std::future::poll_fn(|cx| {
        loop {
            while !exhausted && running.len() < n {
                match pending.next() {
                    Some((i, f)) => running.push((i, Box::pin(f))),
                    None => exhausted = true,
                }
            }
            let before = running.len();
            let mut i = 0;
            while i < running.len() {
                if let Poll::Ready(out) = running[i].1.as_mut().poll(cx) {
                    let (index, _) = running.swap_remove(i);
                    done.push((index, out));
                } else {
                    i += 1;
                }
            }
            if running.is_empty() && exhausted {
                return Poll::Ready(());
            }
            // Something finished: refill and poll the new ones.
            if running.len() == before {
                return Poll::Pending;
            }
        }
    })
    .await;
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, out)| out).collect()
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

/// One call being built: from [`ApiClient::get`] and friends.
#[must_use = "a request does nothing until sent"]
pub struct ApiRequest {
    api: ApiClient,
    method: Method,
    endpoint: String,
    url: Result<url::Url, Error>,
    headers: HeaderMap,
    body: Option<Bytes>,
    retry_any: bool,
    error: Option<Error>,
}

impl ApiRequest {
    /// Adds a header (replacing the client's default of that name). An
    /// invalid name or value makes the call fail with
    /// [`Error::InvalidRequest`].
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(n), Ok(v)) => {
                self.headers.insert(n, v);
            }
            _ => self.fail(Error::InvalidRequest {
                reason: format!("invalid header {name:?}: {value:?}"),
            }),
        }
        self
    }

    /// Appends query parameters (URL-encoded).
    pub fn query<K: AsRef<str>, V: AsRef<str>>(mut self, pairs: &[(K, V)]) -> Self {
        if let Ok(url) = &mut self.url {
            let mut q = url.query_pairs_mut();
            for (k, v) in pairs {
                q.append_pair(k.as_ref(), v.as_ref());
            }
        }
        self
    }

    /// `value` as a JSON body, with `Content-Type: application/json`.
    pub fn json_body<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(bytes) => {
                self.body = Some(bytes.into());
                self.headers
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Err(source) => self.fail(Error::Encode { source }),
        }
        self
    }

    /// A body of bytes (kept in memory so retries can resend it).
    pub fn body(mut self, bytes: impl Into<Bytes>) -> Self {
        self.body = Some(bytes.into());
        self
    }

    /// Retries this call on the retryable statuses and transport errors
    /// even though its method is not idempotent (POST, PATCH): only when the
    /// server deduplicates (an idempotency key) or a repeat is harmless.
    pub fn retry_non_idempotent(mut self) -> Self {
        self.retry_any = true;
        self
    }

    /// Sends the call.
    ///
    /// # Errors
    ///
    /// [`Error::Status`] for a final status of 400 or above; the
    /// transport, breaker, timeout and URL errors otherwise.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the call: a request being written or read
    /// is cut (its connection is closed, not reused), a retry delay ends, and
    /// the concurrency slot is given back. The server may still have acted on
    /// the request.
    pub async fn send(self) -> Result<ApiResponse, Error> {
        let span = tracing::info_span!(
            "http.call",
            method = %self.method,
            endpoint = %self.endpoint,
            url = self.url.as_ref().map(|u| u.as_str()).unwrap_or("<invalid>"),
            status = tracing::field::Empty,
            attempts = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let api = self.api.clone();
        api.call(self).instrument(span).await
    }

    /// Sends the call and parses the body as `T`.
    ///
    /// # Errors
    ///
    /// As [`send`](ApiRequest::send); [`Error::Json`] with the status and
    /// an excerpt when the body is not a `T`.
    ///
    /// # Cancel safety
    ///
    /// As [`send`](ApiRequest::send).
    pub async fn json<T: DeserializeOwned>(self) -> Result<T, Error> {
        self.send().await?.json()
    }

    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

impl fmt::Debug for ApiRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiRequest")
            .field("method", &self.method)
            .field("url", &self.url.as_ref().map(|u| u.as_str()))
            .finish_non_exhaustive()
    }
}

/// A response read whole (within the client's body limit).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ApiResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The URL called.
    pub url: String,
    /// Attempts made (1 without retries).
    pub attempts: u32,
}

impl ApiResponse {
    /// The body parsed as `T`.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] with the status and an excerpt of the body.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::json(Some(self.status), &self.body, e))
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Decides, from one attempt's outcome, whether an [`ApiClient`] call is
/// retried (see [`ApiClientBuilder::with_classifier`]).
pub type ApiClassifier = Arc<dyn Fn(Result<&ApiResponse, &Error>) -> Decision + Send + Sync>;

/// The classifier [`ApiClient`] uses unless given another: 429, 500, 502,
/// 503 and 504 are retried (after `Retry-After` when the response has
/// one), and so are transport errors ([`Error::is_transport`]); anything
/// else is final.
pub fn default_classifier(outcome: Result<&ApiResponse, &Error>) -> Decision {
    match outcome {
        Ok(r) if is_retryable_status(r.status) => match retry_after(&r.headers) {
            Some(d) => Decision::RetryAfter(d),
            None => Decision::Retry,
        },
        Ok(_) => Decision::Done,
        Err(e) if e.is_transport() => Decision::Retry,
        Err(_) => Decision::Done,
    }
}

/// Configures an [`ApiClient`]. See its `# Default` section.
pub struct ApiClientBuilder {
    base: String,
    client: Option<Arc<dyn Client>>,
    headers: Vec<(String, String)>,
    timeout: Option<Duration>,
    total_timeout: Option<Duration>,
    body_limit: u64,
    retry: Option<Retry>,
    classifier: ApiClassifier,
    breaker: Option<BreakerBuilder>,
    concurrency: Option<usize>,
    rate: Option<Arc<RateLimiter>>,
    clock: Arc<dyn Clock>,
}

impl ApiClientBuilder {
    /// The backend (default: a new [`HyperClient`] whose per-host
    /// connection cap is the larger of its default, 16, and
    /// [`with_concurrency_limit`](Self::with_concurrency_limit), so a
    /// concurrency limit is never quietly capped by the pool).
    pub fn with_client(mut self, client: Arc<dyn Client>) -> Self {
        self.client = Some(client);
        self
    }

    /// A header sent on every call (checked by [`build`](Self::build)).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The limit on each attempt: sending, the response head and reading
    /// the body. `None` for none.
    pub fn with_timeout(mut self, after: impl Into<Option<Duration>>) -> Self {
        self.timeout = after.into();
        self
    }

    /// The limit on a whole call, retries and their delays included: no
    /// retry starts that would end past it. `None` (the default) for none.
    pub fn with_total_timeout(mut self, after: impl Into<Option<Duration>>) -> Self {
        self.total_timeout = after.into();
        self
    }

    /// The largest response body read, in bytes.
    pub fn with_body_limit(mut self, bytes: u64) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The retry schedule (attempts, backoff, Retry-After cap, budget);
    /// `None`: no retries, one attempt per call. What is retried is the
    /// classifier's choice ([`with_classifier`](Self::with_classifier)),
    /// which replaces the `Retry`'s own.
    pub fn with_retry(mut self, retry: impl Into<Option<Retry>>) -> Self {
        self.retry = Some(
            retry
                .into()
                .unwrap_or_else(|| Retry::new().with_max_attempts(1)),
        );
        self
    }

    /// Chooses which outcomes are retried (default:
    /// [`default_classifier`]). Non-idempotent methods are still never
    /// retried unless the call opts in with
    /// [`ApiRequest::retry_non_idempotent`].
    ///
    /// ```
    /// use smolkit::http::{ApiClient, default_classifier};
    /// use smolkit::resilience::Decision;
    ///
    /// // Retry transport errors and 503 only, never a 500.
    /// let api = ApiClient::builder("http://127.0.0.1:1/")
    ///     .with_classifier(|outcome| match outcome {
    ///         Ok(r) if r.status.as_u16() == 500 => Decision::Done,
    ///         other => default_classifier(other),
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # drop(api);
    /// ```
    pub fn with_classifier<F>(mut self, classifier: F) -> Self
    where
        F: Fn(Result<&ApiResponse, &Error>) -> Decision + Send + Sync + 'static,
    {
        self.classifier = Arc::new(classifier);
        self
    }

    /// A circuit breaker per host, each built from this builder; `None`
    /// (the default) for none.
    pub fn with_breaker(mut self, breaker: impl Into<Option<BreakerBuilder>>) -> Self {
        self.breaker = breaker.into();
        self
    }

    /// At most `n` calls in flight; `None` (the default) for no limit.
    /// Zero is refused by [`build`](Self::build).
    pub fn with_concurrency_limit(mut self, n: impl Into<Option<usize>>) -> Self {
        self.concurrency = n.into();
        self
    }

    /// Each attempt takes a cell from this limiter first; `None` (the
    /// default) for none.
    pub fn with_rate_limit(mut self, limiter: impl Into<Option<Arc<RateLimiter>>>) -> Self {
        self.rate = limiter.into();
        self
    }

    /// The clock for timeouts, retry delays and durations (breakers and
    /// rate limiters carry their own).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The client.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the setting: `base_url` when it does not
    /// parse, is not `http(s)` or has no host; `header` for an invalid
    /// name or value; `concurrency_limit` for zero; the breaker's own
    /// setting when its template does not build.
    pub fn build(self) -> Result<ApiClient, ConfigError> {
        let base = parse_base(&self.base)?;
        if let Some(b) = &self.breaker {
            b.clone().build()?;
        }
        if let Some(n) = self.concurrency {
            ConfigError::nonzero("concurrency_limit", n)?;
        }
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        for (n, v) in &self.headers {
            let bad =
                |reason: &'static str| ConfigError::new("header", format_args!("{n}: {v}"), reason);
            let name =
                HeaderName::try_from(n.as_str()).map_err(|_| bad("not a valid header name"))?;
            let value =
                HeaderValue::try_from(v.as_str()).map_err(|_| bad("not a valid header value"))?;
            headers.insert(name, value);
        }
        let mut retry = self.retry.unwrap_or_else(|| {
            Retry::new().with_backoff(
                Backoff::exponential(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10)),
            )
        });
        retry = retry.with_clock(self.clock.clone());
        if let Some(total) = self.total_timeout {
            retry = retry.with_max_elapsed(total);
        }
        let client = match self.client {
            Some(c) => c,
            None => {
                let cap = self.concurrency.unwrap_or(0).max(DEFAULT_PER_HOST);
                Arc::new(
                    HyperClient::builder()
                        .with_max_connections_per_host(cap)
                        .build()?,
                )
            }
        };
        Ok(ApiClient {
            inner: Arc::new(Inner {
                base,
                client,
                headers,
                timeout: self.timeout,
                body_limit: self.body_limit,
                retry,
                classifier: self.classifier,
                breaker: self.breaker,
                breakers: Mutex::new(HashMap::new()),
                concurrency: self.concurrency.map(|n| Arc::new(Semaphore::new(n))),
                rate: self.rate,
                clock: self.clock,
                stats: Counters::default(),
            }),
        })
    }
}

/// The base URL, with a trailing `/` so paths append to it.
fn parse_base(raw: &str) -> Result<url::Url, ConfigError> {
    let bad = |reason: String| ConfigError::new("base_url", raw, reason);
    let mut base = url::Url::parse(raw).map_err(|e| bad(e.to_string()))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?} is not http or https",
            base.scheme()
        )));
    }
    if base.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host".into()));
    }
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    Ok(base)
}

impl fmt::Debug for ApiClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClientBuilder")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}
