//! The `ChaosServer`'s HTTP routes: files with Range and ETag, echo,
//! statuses, delays, flaky endpoints, cut and reset bodies, redirects.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
        ("files", Some(name)) => file(&req, name, &q, state, raw).await,
        ("robots.txt", None) => file(&req, "robots.txt", &q, state, raw).await,
        _ => text(404, "no such route"),
    }
}

/// Logs the request for [`ChaosServer::requests`](super::ChaosServer::requests).
fn record(req: &Request<hyper::body::Incoming>, state: &State, connection: u64) {
    state.requests.fetch_add(1, Ordering::AcqRel);
    let mut log = lock(&state.log);
    if log.len() >= state.log_limit {
        return;
    }
    log.push(RequestRecord {
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
    let calls = count_call(state, key.to_owned());
    let fail = q
        .get("fail")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(2);
    if calls <= fail {
        return flaky_answer(key, calls, fail, q);
    }
    let mut r = text(
        200,
        serde_json::json!({ "key": key, "calls": calls }).to_string(),
    );
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A failing answer of `/flaky` (and `/files?fail=`): `status` (default
/// 503) with the `retry_after` asked for.
fn flaky_answer(key: &str, calls: u64, fail: u64, q: &HashMap<String, String>) -> Response<Body> {
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

/// The file's bytes and modification time, from the files added or the
/// folder served.
async fn file_bytes(name: &str, state: &State) -> Option<(Bytes, SystemTime)> {
    if let Some(b) = state.files.get(name) {
        return Some((b.clone(), state.started));
    }
    let dir = state.dir.as_ref()?;
    if name.contains('/') || name.contains('\\') || name == ".." || name.is_empty() {
        return None;
    }
    let path = dir.join(name);
    let b = smol::fs::read(&path).await.ok()?;
    let modified = smol::fs::metadata(&path)
        .await
        .and_then(|m| m.modified())
        .unwrap_or(state.started);
    Some((Bytes::from(b), modified))
}

/// Counts a call of the fault key `key` (per route family) and returns
/// its number, 1 for the first.
fn count_call(state: &State, key: String) -> u64 {
    let mut calls = lock(&state.flaky);
    let n = calls.entry(key).or_insert(0);
    *n += 1;
    *n
}

/// `/files/{name}` with its fault options (see the route table).
pub(super) async fn file(
    req: &Request<hyper::body::Incoming>,
    name: &str,
    q: &HashMap<String, String>,
    state: &State,
    raw: &TcpStream,
) -> Response<Body> {
    let Some((mut bytes, modified)) = file_bytes(name, state).await else {
        return text(404, "no such file");
    };
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
    let key = q.get("key").cloned().unwrap_or_else(|| name.to_owned());
    let call = count_call(state, format!("files:{key}"));
    if let Some(fail) = num("fail")
        && call <= fail
    {
        return flaky_answer(&key, call, fail, q);
    }
    let mut version = 1;
    if num("version_after").is_some_and(|n| call > n) {
        // The resource changed: other bytes, another validator.
        let mut v: Vec<u8> = bytes.to_vec();
        v.reverse();
        bytes = Bytes::from(v);
        version = 2;
    }
    let len = bytes.len() as u64;
    let secs = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let etag = format!("\"{len:x}-{secs:x}-v{version}\"");
    let last_modified = httpdate::fmt_http_date(modified + Duration::from_secs(version - 1));
    let mut range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|_| q.get("ignore_range").is_none_or(|v| v == "0"));
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
    let (status, body) = match range.map(|r| parse_range(&r, len)) {
        None => (200, bytes),
        Some(Some((start, end))) => (206, bytes.slice(start as usize..=end as usize)),
        Some(None) => {
            let mut r = text(416, "");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let body_len = body.len() as u64;
    let cut = num("cut").filter(|_| call <= num("cuts").unwrap_or(1));
    let mut r = if head {
        text(status, Bytes::new())
    } else if let Some(cut) = cut {
        if q.get("reset").is_some_and(|v| v != "0")
            && let Err(e) = socket2::SockRef::from(raw).set_linger(Some(Duration::ZERO))
        {
            tracing::warn!(error = %e, "chaos server cannot set SO_LINGER");
        }
        cut_body(body, cut)
    } else if let Some(bps) = num("bps") {
        paced_body(body, bps.max(10))
    } else {
        text(status, body)
    };
    *r.status_mut() = ::http::StatusCode::from_u16(status).unwrap_or(::http::StatusCode::OK);
    let h = r.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
    if status == 206
        && let Some((start, end)) = req
            .headers()
            .get(RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|r| parse_range(r, len))
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
    {
        h.insert(CONTENT_RANGE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&last_modified) {
        h.insert(LAST_MODIFIED, v);
    }
    if let Some(cd) = q.get("disposition")
        && let Ok(v) = HeaderValue::from_str(cd)
    {
        h.insert(::http::header::CONTENT_DISPOSITION, v);
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

/// `body` with its full length promised, cut off after `cut` bytes.
fn cut_body(body: Bytes, cut: u64) -> Response<Body> {
    let total = body.len() as u64;
    let sent = body.slice(..cut.min(total) as usize);
    let stream = futures_lite::StreamExt::chain(
        futures_lite::stream::iter([Ok::<_, HttpError>(sent)]),
        futures_lite::stream::once_future(async {
            // A `Pending` first so hyper flushes the sent bytes (see
            // `pattern_body`).
            futures_lite::future::yield_now().await;
            let e = io::Error::new(io::ErrorKind::ConnectionAborted, "chaos: cut off");
            Err(HttpError::Body { source: e.into() })
        }),
    );
    Response::new(Body::from_stream(stream, Some(total)))
}

/// `body` at `bps` bytes per second, in tenth-of-a-second chunks.
fn paced_body(body: Bytes, bps: u64) -> Response<Body> {
    let total = body.len() as u64;
    let chunk = (bps / 10).max(1) as usize;
    let stream = futures_lite::stream::unfold(0usize, move |at| {
        let body = body.clone();
        async move {
            if at >= body.len() {
                return None;
            }
            async_io::Timer::after(Duration::from_millis(100)).await;
            let end = (at + chunk).min(body.len());
            Some((Ok(body.slice(at..end)), end))
        }
    });
    Response::new(Body::from_stream(stream, Some(total)))
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
