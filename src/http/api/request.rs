//! `ApiRequest` (one call being built) and `ApiResponse`.

use super::*;

/// One call being built: from [`ApiClient::get`] and friends.
#[must_use = "a request does nothing until sent"]
pub struct ApiRequest {
    pub(super) api: ApiClient,
    pub(super) method: Method,
    pub(super) endpoint: String,
    pub(super) url: Result<url::Url, Error>,
    pub(super) headers: HeaderMap,
    pub(super) body: Option<Bytes>,
    pub(super) retry_any: bool,
    pub(super) error: Option<Error>,
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

    pub(super) fn fail(&mut self, e: Error) {
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
