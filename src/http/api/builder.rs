//! `ApiClientBuilder`, the default classifier, and base-URL checks.

use super::*;

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
    pub(super) base: String,
    pub(super) client: Option<Arc<dyn Client>>,
    pub(super) headers: Vec<(String, String)>,
    pub(super) timeout: Option<Duration>,
    pub(super) total_timeout: Option<Duration>,
    pub(super) body_limit: u64,
    pub(super) retry: Option<Retry>,
    pub(super) classifier: ApiClassifier,
    pub(super) breaker: Option<BreakerBuilder>,
    pub(super) concurrency: Option<usize>,
    pub(super) rate: Option<Arc<dyn RateLimit>>,
    pub(super) clock: Arc<dyn Clock>,
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

    /// Each attempt takes a cell from this limiter first: a
    /// [`RateLimiter`](crate::limit::RateLimiter), or one shared by many
    /// processes (`redis::RedisRateLimiter`); `None` (the default) for
    /// none.
    pub fn with_rate_limit(mut self, limiter: impl IntoRateLimit) -> Self {
        self.rate = limiter.into_rate_limit();
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
pub(super) fn parse_base(raw: &str) -> Result<url::Url, ConfigError> {
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
