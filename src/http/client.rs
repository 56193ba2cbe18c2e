//! The `Client` trait and the redirect logic both backends share.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, LOCATION};
use ::http::{HeaderName, Method, Request, Response, StatusCode, Uri};

use super::body::Body;
use super::error::Error;

/// The future a [`Client`] returns.
pub type ResponseFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send + 'a>>;

/// An HTTP client: one request in, one response out, on any executor.
///
/// Object-safe, so components hold an `Arc<dyn Client>` and tests or
/// applications can swap the backend: [`HyperClient`](super::HyperClient)
/// (the default), [`SurfClient`](super::SurfClient) (feature `surf`), or
/// their own.
///
/// The request URI must be absolute (`http://host:port/path`). A response
/// with any status is `Ok`; `Err` means no response was received (or a
/// redirect could not be followed). Backends follow redirects within
/// their limit and report the final response.
pub trait Client: Send + Sync + 'static {
    /// Sends `request` and waits for the response head; the body streams.
    fn send(&self, request: Request<Body>) -> ResponseFuture<'_>;
}

impl<C: Client + ?Sized> Client for Arc<C> {
    fn send(&self, request: Request<Body>) -> ResponseFuture<'_> {
        (**self).send(request)
    }
}

/// Redirect handling shared by the backends.
///
/// # Default
///
/// Follows up to 10 redirects (301, 302, 303, 307, 308).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Redirects {
    pub(crate) limit: usize,
}

/// The headers never sent to another origin after a redirect.
const CREDENTIALS: [HeaderName; 3] = [AUTHORIZATION, COOKIE, ::http::header::PROXY_AUTHORIZATION];

/// `(scheme, host, port)` of an absolute URI.
pub(crate) fn origin(uri: &Uri) -> Option<(String, String, u16)> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    Some((scheme, host, port(uri)?))
}

/// `uri`'s port, or its scheme's default (443 for https, any case; else
/// 80); `None` without a scheme.
pub(crate) fn port(uri: &Uri) -> Option<u16> {
    let scheme = uri.scheme_str()?;
    Some(
        uri.port_u16()
            .unwrap_or(if scheme.eq_ignore_ascii_case("https") {
                443
            } else {
                80
            }),
    )
}

/// Checks the request URI is absolute `http(s)` with a host.
pub(crate) fn check_uri(uri: &Uri) -> Result<(), Error> {
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {}
        Some(_) => {
            return Err(Error::UnsupportedScheme {
                url: uri.to_string(),
            });
        }
        None => return Err(Error::invalid_url(uri, "not an absolute URL")),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(()),
        _ => Err(Error::invalid_url(uri, "no host")),
    }
}

/// Sends `request` through `send` (one request, one response), following
/// redirects.
///
/// NOTE: `send` is the backend's own future, not a boxed one: it sits
/// inside this one, so a request allocates one box, not two (and its
/// state is copied once).
pub(crate) async fn follow<F, Fut>(
    redirects: Redirects,
    mut request: Request<Body>,
    send: F,
) -> Result<Response<Body>, Error>
where
    F: Fn(Request<Body>) -> Fut,
    Fut: Future<Output = Result<Response<Body>, Error>>,
{
    check_uri(request.uri())?;
    let mut hops = 0usize;
    loop {
        // Keep what a 307/308 needs to resend, when the body allows it.
        let replay = request.body().try_clone();
        let method = request.method().clone();
        let uri = request.uri().clone();
        let headers = request.headers().clone();
        let response = send(request).await?;
        let status = response.status();
        if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
            return Ok(response);
        }
        let Some(location) = response.headers().get(LOCATION) else {
            return Ok(response);
        };
        if hops >= redirects.limit {
            return Err(Error::TooManyRedirects {
                limit: redirects.limit,
                url: uri.to_string(),
            });
        }
        hops += 1;
        let location = location
            .to_str()
            .map_err(|_| Error::RedirectScheme {
                location: String::from_utf8_lossy(location.as_bytes()).into_owned(),
            })?
            .to_owned();
        let next = resolve(&uri, &location)?;
        // NOTE: the redirect response's body is dropped unread; for a
        // pooled connection that closes it, which is cheaper than draining
        // an unknown amount.
        drop(response);
        let keep_method = matches!(
            status,
            StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT
        ) || (method == Method::HEAD);
        let (method, body) = if keep_method {
            match replay {
                Some(body) => (method, body),
                None => {
                    return Err(Error::RedirectBody {
                        location: next.to_string(),
                    });
                }
            }
        } else {
            (Method::GET, Body::empty())
        };
        let mut headers = headers;
        headers.remove(HOST);
        if method == Method::GET && !keep_method {
            headers.remove(CONTENT_LENGTH);
            headers.remove(CONTENT_TYPE);
            headers.remove(::http::header::TRANSFER_ENCODING);
        }
        if origin(&uri) != origin(&next) {
            for name in &CREDENTIALS {
                headers.remove(name);
            }
        }
        tracing::debug!(from = %uri, to = %next, status = status.as_u16(), "following redirect");
        let mut next_request = Request::new(body);
        *next_request.method_mut() = method;
        *next_request.uri_mut() = next;
        *next_request.headers_mut() = headers;
        request = next_request;
    }
}

/// Resolves a `Location` against the URL it came from; only `http(s)`
/// results are accepted.
fn resolve(base: &Uri, location: &str) -> Result<Uri, Error> {
    let refuse = || Error::RedirectScheme {
        location: location.to_owned(),
    };
    let base = url::Url::parse(&base.to_string()).map_err(|_| refuse())?;
    let next = base.join(location).map_err(|_| refuse())?;
    if !matches!(next.scheme(), "http" | "https") || next.host_str().is_none() {
        return Err(Error::RedirectScheme {
            location: next.to_string(),
        });
    }
    next.as_str().parse::<Uri>().map_err(|_| refuse())
}
