//! The `ChaosServer`'s HTTP routes: files with Range and ETag, echo,
//! statuses, delays, flaky endpoints, cut and reset bodies, redirects.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::http::header::{
    CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE, LAST_MODIFIED, LOCATION, RANGE,
    RETRY_AFTER,
};
use ::http::{HeaderValue, Method, Request, Response};
use async_net::TcpStream;
use bytes::Bytes;

use super::ws::upgrade;
use super::{RequestRecord, State, query, text};
use crate::http::{Body, Error as HttpError};
use crate::sync::lock_std as lock;

pub(super) async fn route(
    req: Request<hyper::body::Incoming>,
    state: &Arc<State>,
    connection: u64,
    raw: &TcpStream,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    record(&req, state, connection);
    let q = query(&req);
    let num = |s: &str| s.parse::<u64>().ok();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    match (segments[0], segments.get(1).copied()) {
        ("echo", _) => echo(req).await,
        ("ws", None) => upgrade(req, state, &q),
        ("status", Some(code)) => status(code, &q),
        ("delay", Some(ms)) => match num(ms) {
            Some(ms) => {
                async_io::Timer::after(Duration::from_millis(ms)).await;
                text(200, "delayed")
            }
            None => text(400, "bad delay"),
        },
        ("flaky", Some(key)) => flaky(key, &q, state),
        ("bytes", Some(n)) => match num(n) {
            Some(n) => pattern_body(n, n, false, None),
            None => text(400, "bad length"),
        },
        ("truncate", Some(n)) => match num(n) {
            Some(n) => {
                let send = q.get("send").and_then(|v| num(v)).unwrap_or(n / 2).min(n);
                pattern_body(n, send, false, None)
            }
            None => text(400, "bad length"),
        },
        ("reset", Some(n)) => match num(n) {
            Some(n) => {
                let after = q.get("after").and_then(|v| num(v)).unwrap_or(n / 2).min(n);
                // Closing with SO_LINGER 0 sends a TCP RST, not a FIN.
                if let Err(e) = socket2::SockRef::from(raw).set_linger(Some(Duration::ZERO)) {
                    tracing::warn!(error = %e, "chaos server cannot set SO_LINGER for /reset");
                }
                pattern_body(n, after, true, None)
            }
            None => text(400, "bad length"),
        },
        ("slow", Some(n)) => match num(n) {
            Some(n) => {
                let bps = q.get("bps").and_then(|v| num(v)).unwrap_or(1024).max(10);
                pattern_body(n, n, false, Some(bps))
            }
            None => text(400, "bad length"),
        },
        ("redirect", Some(n)) => match num(n) {
            Some(n) => redirect(n),
            None => text(400, "bad count"),
        },
        ("redirect-to", _) => redirect_to(&q),
        ("files", Some(name)) => file(&req, name, state).await,
        _ => text(404, "no such route"),
    }
}

/// Logs the request for [`ChaosServer::requests`](super::ChaosServer::requests).
fn record(req: &Request<hyper::body::Incoming>, state: &State, connection: u64) {
    lock(&state.log).push(RequestRecord {
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
        headers: req.headers().clone(),
        connection,
    });
}

/// `/status/{code}?retry_after=R`.
fn status(code: &str, q: &HashMap<String, String>) -> Response<Body> {
    match code.parse::<u16>() {
        Ok(c) if (200..600).contains(&c) => {
            let mut r = text(c, format!("status {c}"));
            if let Some(ra) = q
                .get("retry_after")
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                r.headers_mut().insert(RETRY_AFTER, ra);
            }
            r
        }
        _ => text(400, format!("bad status {code:?}")),
    }
}

/// `/redirect/{n}`: `n` hops to `/redirect/0`.
fn redirect(n: u64) -> Response<Body> {
    if n == 0 {
        return text(200, "done");
    }
    let mut r = text(302, "");
    r.headers_mut().insert(
        LOCATION,
        HeaderValue::from_str(&format!("/redirect/{}", n - 1))
            .unwrap_or(HeaderValue::from_static("/")),
    );
    r
}

/// `/redirect-to?url=U&status=S`.
fn redirect_to(q: &HashMap<String, String>) -> Response<Body> {
    let status = q
        .get("status")
        .and_then(|v| v.parse::<u16>().ok())
        .unwrap_or(302);
    let mut r = text(status, "");
    match q.get("url").and_then(|u| HeaderValue::from_str(u).ok()) {
        Some(u) => {
            r.headers_mut().insert(LOCATION, u);
            r
        }
        None => text(400, "missing url"),
    }
}

pub(super) async fn echo(req: Request<hyper::body::Incoming>) -> Response<Body> {
    let (parts, incoming) = req.into_parts();
    let body = match Body::from_incoming(incoming, None).bytes().await {
        Ok(b) => b,
        Err(e) => return text(400, format!("cannot read body: {e}")),
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    let body_json = serde_json::from_slice::<serde_json::Value>(&body)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned().into());
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
        "body": body_json});
    let mut r = text(200, json.to_string());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(super) fn flaky(key: &str, q: &HashMap<String, String>, state: &State) -> Response<Body> {
    let calls = {
        let mut flaky = lock(&state.flaky);
        let n = flaky.entry(key.to_owned()).or_insert(0);
        *n += 1;
        *n
    };
    let fail = q
        .get("fail")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(2);
    if calls <= fail {
        let status = q
            .get("status")
            .and_then(|v| v.parse::<u16>().ok())
            .unwrap_or(503);
        let mut r = text(
            status,
            format!("flaky {key}: call {calls} of {fail} failing"),
        );
        if let Some(ra) = q.get("retry_after") {
            let value = match ra.strip_prefix("date:") {
                Some(secs) => {
                    let secs = secs.parse::<u64>().unwrap_or(0);
                    httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs))
                }
                None => ra.clone(),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                r.headers_mut().insert(RETRY_AFTER, v);
            }
        }
        return r;
    }
    let mut r = text(
        200,
        serde_json::json!({ "key": key, "calls": calls }).to_string(),
    );
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `total` bytes of a pattern, promised by Content-Length (or chunked when
/// `chunked`), of which `send` are sent before the body ends or fails;
/// `bps` paces it.
pub(super) fn pattern_body(
    total: u64,
    send: u64,
    chunked: bool,
    bps: Option<u64>,
) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let chunk_len = match bps {
        Some(bps) => (bps / 10).max(1),
        None => CHUNK,
    };
    let stream = futures_lite::stream::unfold(0u64, move |sent| async move {
        if sent >= send {
            if send < total && sent != u64::MAX {
                // One `Pending` first: hyper's dispatcher flushes what it
                // has written whenever the body is not ready, so the head
                // and the sent bytes are on the wire before the error
                // makes hyper close the connection mid-response.
                futures_lite::future::yield_now().await;
                let e = io::Error::new(io::ErrorKind::ConnectionAborted, "chaos: cut off");
                return (sent != u64::MAX)
                    .then(|| (Err(HttpError::Body { source: e.into() }), u64::MAX));
            }
            return None;
        }
        if bps.is_some() {
            async_io::Timer::after(Duration::from_millis(100)).await;
        }
        let n = chunk_len.min(send - sent).min(CHUNK);
        let start = (sent % 251) as usize;
        let bytes = PATTERN.with(|p| p.slice(start..start + n as usize));
        Some((Ok(bytes), sent + n))
    });
    let mut r = Response::new(Body::from_stream(stream, (!chunked).then_some(total)));
    if !chunked {
        r.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(total));
    }
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

thread_local! {
    /// 64 KiB of the pattern plus one period, so any chunk is a slice.
    static PATTERN: Bytes = Bytes::from(pattern(64 * 1024 + 251));
}

/// The byte pattern of `/bytes`, `/truncate`, `/reset` and `/slow`, for
/// tests to compare against: byte `i` is `i % 251`.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

pub(super) async fn file(
    req: &Request<hyper::body::Incoming>,
    name: &str,
    state: &State,
) -> Response<Body> {
    let (bytes, modified) = match state.files.get(name) {
        Some(b) => (b.clone(), state.started),
        None => {
            let Some(dir) = &state.dir else {
                return text(404, "no such file");
            };
            if name.contains('/') || name.contains('\\') || name == ".." || name.is_empty() {
                return text(404, "no such file");
            }
            let path = dir.join(name);
            match smol::fs::read(&path).await {
                Ok(b) => {
                    let modified = smol::fs::metadata(&path)
                        .await
                        .and_then(|m| m.modified())
                        .unwrap_or(state.started);
                    (Bytes::from(b), modified)
                }
                Err(_) => return text(404, "no such file"),
            }
        }
    };
    let len = bytes.len() as u64;
    let secs = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let etag = format!("\"{len:x}-{secs:x}\"");
    let last_modified = httpdate::fmt_http_date(modified);
    let mut range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(if_range) = req.headers().get(IF_RANGE).and_then(|v| v.to_str().ok()) {
        let fresh = if if_range.starts_with('"') || if_range.starts_with("W/") {
            if_range == etag
        } else {
            if_range == last_modified
        };
        if !fresh {
            range = None;
        }
    }
    let head = req.method() == Method::HEAD;
    let mut r = match range.map(|r| parse_range(&r, len)) {
        None => {
            let mut r = text(200, if head { Bytes::new() } else { bytes });
            r.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(len));
            r
        }
        Some(Some((start, end))) => {
            let part = bytes.slice(start as usize..=end as usize);
            let mut r = text(206, if head { Bytes::new() } else { part });
            let h = r.headers_mut();
            h.insert(CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                h.insert(CONTENT_RANGE, v);
            }
            r
        }
        Some(None) => {
            let mut r = text(416, "");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&last_modified) {
        h.insert(LAST_MODIFIED, v);
    }
    h.insert(
        ::http::header::ACCEPT_RANGES,
        HeaderValue::from_static("bytes"),
    );
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against `len`: the inclusive
/// range, or `None` when unsatisfiable (one range only).
pub(super) fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return None;
            }
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?),
        ),
    };
    (start <= end && start < len).then_some((start, end))
}
