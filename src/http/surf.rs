//! `SurfClient`: the [`Client`] trait over a `surf::Client` (feature
//! `surf`), for async-std applications that already hold one.
//!
//! surf 2.3 carries an old TLS stack with RustSec advisories (README,
//! "Features"), which is why it is not the default backend.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Mutex;
use std::task::{Context, Poll};

use ::http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use futures_lite::AsyncRead;

use super::body::Body;
use super::client::{self, Client, Redirects, ResponseFuture};
use super::error::Error;

/// The [`Client`] trait over a `surf::Client`.
///
/// Redirects are followed here, by the same code as [`HyperClient`]
/// (limit, scheme check, credentials dropped across origins), so give it a
/// `surf::Client` without surf's own redirect middleware. Connection
/// pooling and TLS are surf's.
///
/// [`HyperClient`]: super::HyperClient
///
/// # Default
///
/// 10 redirects followed (the surf client's own settings otherwise).
#[derive(Clone)]
pub struct SurfClient {
    client: surf::Client,
    redirects: Redirects,
}

impl SurfClient {
    /// Wraps `client`, following up to 10 redirects.
    pub fn new(client: surf::Client) -> Self {
        SurfClient {
            client,
            redirects: Redirects { limit: 10 },
        }
    }

    /// How many redirects to follow; 0 returns them as they are.
    pub fn with_max_redirects(mut self, n: usize) -> Self {
        self.redirects = Redirects { limit: n };
        self
    }

    async fn send_inner(&self, request: Request<Body>) -> Result<Response<Body>, Error> {
        client::check_uri(request.uri())?;
        let url_text = request.uri().to_string();
        let url = surf::Url::parse(&url_text).map_err(|e| Error::invalid_url(&url_text, e))?;
        let (parts, body) = request.into_parts();
        let method = surf::http::Method::from_str(parts.method.as_str()).map_err(|_| {
            Error::InvalidRequest {
                reason: format!("surf does not support the method {}", parts.method),
            }
        })?;
        let mut req = surf::Request::new(method, url);
        for (name, value) in &parts.headers {
            let value = value.to_str().map_err(|_| Error::InvalidRequest {
                reason: format!("header {name} is not visible ASCII (surf needs text headers)"),
            })?;
            req.append_header(name.as_str(), value);
        }
        let len = body.len();
        let surf_body = match body.as_bytes() {
            Some(bytes) => surf::Body::from_bytes(bytes.to_vec()),
            None => surf::Body::from_reader(
                futures_lite::io::BufReader::new(SyncReader(Mutex::new(body.into_reader()))),
                len.and_then(|n| usize::try_from(n).ok()),
            ),
        };
        if len != Some(0) {
            req.set_body(surf_body);
        }
        let mut res = self.client.send(req).await.map_err(|e| Error::Transport {
            url: url_text.clone(),
            source: e.into_inner().into(),
        })?;
        let status = StatusCode::from_u16(res.status() as u16).map_err(|e| Error::Transport {
            url: url_text.clone(),
            source: e.into(),
        })?;
        let mut response = Response::builder().status(status);
        for (name, values) in res.iter() {
            for value in values.iter() {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_str().as_bytes()),
                    HeaderValue::from_str(value.as_str()),
                ) {
                    response = response.header(n, v);
                }
            }
        }
        // NOTE: async-h1 does not know a HEAD response has no body and
        // would wait for Content-Length bytes.
        let body = if parts.method == ::http::Method::HEAD || matches!(status.as_u16(), 204 | 304) {
            Body::empty()
        } else {
            let len = res.len().map(|n| n as u64);
            Body::from_reader(res.take_body(), len)
        };
        response.body(body).map_err(|e| Error::Transport {
            url: url_text,
            source: e.into(),
        })
    }
}

impl Default for SurfClient {
    fn default() -> Self {
        SurfClient::new(surf::Client::new())
    }
}

impl Client for SurfClient {
    fn send(&self, request: Request<Body>) -> ResponseFuture<'_> {
        Box::pin(client::follow(self.redirects, request, |r| {
            self.send_inner(r)
        }))
    }
}

impl fmt::Debug for SurfClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SurfClient")
            .field("redirects", &self.redirects.limit)
            .finish_non_exhaustive()
    }
}

/// surf wants `Sync` readers; a `Mutex` makes any `Send` reader one,
/// without locking (`get_mut` through the pin).
struct SyncReader<R>(Mutex<R>);

impl<R: AsyncRead + Unpin> AsyncRead for SyncReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let inner = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Pin::new(inner).poll_read(cx, buf)
    }
}
