//! Network plumbing shared by `http`, `ws` and `testing`: dialing TCP,
//! rustls client configurations, the plain-or-TLS socket, and header
//! helpers (Retry-After, body excerpts). Private: neither `http` nor `ws`
//! imports the other, and a `ws`-only build does not compile hyper.

mod dial;
mod headers;
#[cfg(feature = "http")]
mod hyper_io;
mod io;
mod tls;

#[cfg(any(feature = "ws", feature = "http"))]
pub(crate) use dial::ClientIo;
pub(crate) use dial::{DialError, dial};
pub(crate) use headers::{excerpt, retry_after};
#[cfg(feature = "testing")]
pub(crate) use hyper_io::AsyncIoTimer;
#[cfg(feature = "http")]
pub(crate) use hyper_io::HyperIo;
pub(crate) use io::MaybeTls;
pub(crate) use tls::TlsOptions;
