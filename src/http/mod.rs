//! HTTP: an executor-neutral client trait with a streaming [`Body`], the
//! default backend [`HyperClient`] (hyper 1 + rustls on any executor, with
//! a per-host connection cap), [`SurfClient`] for apps that already hold a
//! `surf::Client` (feature `surf`), and [`ApiClient`] for JSON APIs with
//! retries, Retry-After, a breaker per host, limits and per-call tracing.
//!
//! The types are the `http` crate's (`http::Request<Body>`,
//! `http::Response<Body>`), re-exported here as [`Request`], [`Response`],
//! [`Method`], [`StatusCode`], [`HeaderMap`] and [`HeaderValue`] so callers
//! need not depend on `http` themselves.
//!
//! Why a trait and not a concrete client? The downloader, the API client
//! and an application's own code should not care which backend moves the
//! bytes; tests can put a recording or failing client in its place.

pub(crate) mod api;
mod body;
mod client;
#[cfg(feature = "download")]
#[cfg_attr(docsrs, doc(cfg(feature = "download")))]
pub mod download;
pub(crate) mod error;
pub(crate) mod hyper;
#[cfg(feature = "surf")]
mod surf;

pub use self::api::{
    ApiClassifier, ApiClient, ApiClientBuilder, ApiRequest, ApiResponse, ApiStats,
    default_classifier,
};
pub use self::body::{Body, BodyReader};
pub use self::client::{Client, ResponseFuture};
pub use self::error::{BoxError, Error};
pub use self::hyper::{ClientStats, HyperClient, HyperClientBuilder};
#[cfg(feature = "surf")]
#[cfg_attr(docsrs, doc(cfg(feature = "surf")))]
pub use self::surf::SurfClient;
pub use ::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
