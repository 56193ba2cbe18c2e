//! The one error type of the `http` module.

use std::error::Error as StdError;
use std::fmt;

use crate::ConfigError;
use crate::net::excerpt;
use std::io;
use std::time::Duration;

use ::http::{Method, StatusCode};

/// A boxed error from a lower layer (hyper, surf, IO).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong with an HTTP call. Every variant names the value at
/// fault (the URL, the host, the limit, the status and a body excerpt).
///
/// [`is_transport`](Error::is_transport) tells the failures worth retrying
/// on an idempotent request (the request may not have reached the server,
/// or the answer was cut off) from the ones that would fail again.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The URL could not be parsed, has no host, or could not be joined to
    /// the base URL.
    InvalidUrl {
        /// The URL (or the base and the path, joined by a space).
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The scheme is not `http` or `https`.
    UnsupportedScheme {
        /// The URL.
        url: String,
    },
    /// A request or header could not be built from the given parts.
    InvalidRequest {
        /// Why.
        reason: String,
    },
    /// The TCP connection could not be opened (refused, unreachable, DNS).
    Connect {
        /// `host:port`.
        addr: String,
        /// The IO error.
        source: io::Error,
    },
    /// The TCP connection (and TLS handshake) took longer than the connect
    /// timeout.
    ConnectTimeout {
        /// `host:port`.
        addr: String,
        /// The timeout.
        after: Duration,
    },
    /// The TLS handshake failed (unknown issuer, name mismatch, protocol).
    Tls {
        /// The host the certificate was checked against.
        host: String,
        /// The error from rustls.
        source: io::Error,
    },
    /// No response (headers) within the timeout, or a whole call took
    /// longer than its deadline.
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// The connection failed while the request was sent or before the
    /// response headers arrived (reset, closed early, malformed response).
    Transport {
        /// The URL.
        url: String,
        /// The error from the backend.
        source: BoxError,
    },
    /// Reading the response body failed part way: the connection was reset
    /// or closed before the promised length arrived.
    Body {
        /// The error from the backend.
        source: BoxError,
    },
    /// The body is longer than the limit it was read with.
    BodyTooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// A file for a request body could not be opened or read.
    File {
        /// The path.
        path: std::path::PathBuf,
        /// The IO error.
        source: io::Error,
    },
    /// A value could not be serialised as JSON.
    Encode {
        /// The serde error.
        source: serde_json::Error,
    },
    /// A body is not the JSON that was expected.
    Json {
        /// The response status, when the body came from a response.
        status: Option<StatusCode>,
        /// The first bytes of the body (at most 256, lossy UTF-8).
        excerpt: String,
        /// The serde error (it has the line and column).
        source: serde_json::Error,
    },
    /// The server answered with an error status (4xx or 5xx), after any
    /// retries (from [`ApiClient`](super::ApiClient)).
    Status {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The first bytes of the body (at most 256, lossy UTF-8).
        excerpt: String,
    },
    /// More redirects than the limit.
    TooManyRedirects {
        /// The limit.
        limit: usize,
        /// The URL of the last redirect response.
        url: String,
    },
    /// A redirect to a location that is not an `http(s)` URL.
    RedirectScheme {
        /// The `Location` header, resolved against the request URL.
        location: String,
    },
    /// A 307/308 redirect of a request whose streaming body cannot be sent
    /// twice.
    RedirectBody {
        /// The `Location` header.
        location: String,
    },
    /// The circuit breaker for this host is open: calls are rejected
    /// without being sent.
    CircuitOpen {
        /// `host:port`.
        host: String,
        /// How long until the breaker lets a probe through.
        retry_after: Duration,
    },
    /// The client was shut down, or a limit it depends on was closed.
    Closed,
    /// The rate limit refused the call: more cells than its burst, or a
    /// shared limiter whose store cannot be reached.
    RateLimited(crate::limit::RateLimitError),
    /// A setting was refused when a client was built.
    Config(ConfigError),
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl Error {
    /// `true` for failures of the connection itself (connect, connect
    /// timeout, response timeout, reset, early close, a body cut short):
    /// worth retrying on an idempotent request. TLS and URL errors are not.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::ConnectTimeout { .. }
                | Error::Timeout { .. }
                | Error::Transport { .. }
                | Error::Body { .. }
        )
    }

    /// The status of a [`Status`](Error::Status) or
    /// [`Json`](Error::Json) error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            Error::Json { status, .. } => *status,
            _ => None,
        }
    }

    pub(crate) fn invalid_url(url: impl fmt::Display, reason: impl fmt::Display) -> Self {
        Error::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn json(status: Option<StatusCode>, body: &[u8], source: serde_json::Error) -> Self {
        Error::Json {
            status,
            excerpt: excerpt(body),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl { url, reason } => write!(f, "invalid URL {url:?}: {reason}"),
            Error::UnsupportedScheme { url } => {
                write!(f, "unsupported scheme in {url:?} (only http and https)")
            }
            Error::InvalidRequest { reason } => write!(f, "invalid request: {reason}"),
            Error::Config(e) => e.fmt(f),
            Error::Connect { addr, source } => write!(f, "cannot connect to {addr}: {source}"),
            Error::ConnectTimeout { addr, after } => {
                write!(f, "connecting to {addr} took longer than {after:?}")
            }
            Error::Tls { host, source } => write!(f, "TLS with {host} failed: {source}"),
            Error::Timeout { url, after } => write!(f, "{url} did not answer within {after:?}"),
            Error::Transport { url, source } => write!(f, "request to {url} failed: {source}"),
            Error::Body { source } => write!(f, "reading the response body failed: {source}"),
            Error::BodyTooLarge { limit } => {
                write!(f, "body larger than the limit of {limit} bytes")
            }
            Error::File { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Error::Encode { source } => write!(f, "cannot encode JSON: {source}"),
            Error::Json {
                status: Some(status),
                excerpt,
                source,
            } => write!(
                f,
                "response ({status}) is not the expected JSON ({source}): {excerpt:?}"
            ),
            Error::Json {
                status: None,
                excerpt,
                source,
            } => write!(f, "body is not the expected JSON ({source}): {excerpt:?}"),
            Error::Status {
                method,
                url,
                status,
                excerpt,
            } => write!(f, "{method} {url} answered {status}: {excerpt:?}"),
            Error::TooManyRedirects { limit, url } => {
                write!(f, "more than {limit} redirects (last from {url})")
            }
            Error::RedirectScheme { location } => {
                write!(f, "refusing a redirect to {location:?} (not http or https)")
            }
            Error::RedirectBody { location } => write!(
                f,
                "cannot follow the redirect to {location:?}: the request body is a stream and cannot be sent again"
            ),
            Error::CircuitOpen { host, retry_after } => write!(
                f,
                "circuit breaker for {host} is open (next probe in {retry_after:?})"
            ),
            Error::Closed => f.write_str("the client is closed"),
            Error::RateLimited(e) => write!(f, "rate limit: {e}"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Connect { source, .. }
            | Error::Tls { source, .. }
            | Error::File { source, .. } => Some(source),
            Error::Transport { source, .. } | Error::Body { source } => Some(&**source),
            Error::Encode { source } | Error::Json { source, .. } => Some(source),
            Error::RateLimited(e) => Some(e),
            Error::Config(e) => Some(e),
            _ => None,
        }
    }
}
