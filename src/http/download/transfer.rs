//! One file: an attempt (request, resume decision, streaming to the part
//! file with length and checksum checks) and the finish (manifest line,
//! atomic rename, folder sync).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_lite::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::Entry;
use super::run::{Ctx, Job};
use super::{DownloadError, DownloadEvent};
use crate::http::{Body, HeaderMap, Request, StatusCode, header};
use crate::resilience::watchdog_on;

/// Bytes between two [`DownloadEvent::Bytes`] of one file.
const PROGRESS_EVERY: u64 = 256 * 1024;
/// Bytes handed to the file's blocking thread at once (one thread hop per
/// batch; the next batch is received while this one is written and hashed).
const BATCH: usize = 1024 * 1024;
/// Bodies up to this size restart whole rather than resume: their
/// validators are not saved beside the part (one file less per small file).
const RESUME_MIN: u64 = 256 * 1024;

/// What is saved beside a part file, to resume it safely.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PartMeta {
    pub url: String,
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
    #[serde(default)]
    pub total: Option<u64>,
}

impl PartMeta {
    fn from_headers(url: &str, headers: &HeaderMap, total: Option<u64>) -> PartMeta {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        PartMeta {
            url: url.to_owned(),
            etag: get(header::ETAG),
            last_modified: get(header::LAST_MODIFIED),
            total,
        }
    }

    /// The `If-Range` value: a strong ETag, else the Last-Modified date
    /// (RFC 9110 §13.1.5 forbids weak ETags there).
    fn if_range(&self) -> Option<&str> {
        match &self.etag {
            Some(e) if !e.starts_with("W/") => Some(e),
            _ => self.last_modified.as_deref(),
        }
    }

    fn same_validator(&self, other: &PartMeta) -> bool {
        match (&self.etag, &other.etag) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.last_modified == other.last_modified,
            _ => false,
        }
    }
}

/// A completed attempt: the part file holds the whole, verified body.
#[derive(Debug)]
pub(super) struct Complete {
    pub bytes: u64,
    /// When hashed (an expected digest, or the manifest on).
    pub sha256: Option<[u8; 32]>,
    pub meta: PartMeta,
    pub resumed_from: u64,
    /// The `Content-Disposition` file name, unsanitized.
    pub disposition: Option<String>,
}

pub(super) fn part_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.part"))
}

fn meta_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.part.meta"))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Removes the part file and its meta; a missing file is fine.
pub(super) fn discard(dir: &Path, name: &str) {
    for p in [part_path(dir, name), meta_path(dir, name)] {
        if let Err(e) = fs::remove_file(&p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove a part file");
        }
    }
}

/// What a part file on disk allows: its length and saved validators, when
/// they belong to this URL.
fn on_disk(dir: &Path, name: &str, url: &str) -> (u64, Option<PartMeta>) {
    let len = fs::metadata(part_path(dir, name)).map_or(0, |m| m.len());
    let meta = fs::read(meta_path(dir, name))
        .ok()
        .and_then(|b| serde_json::from_slice::<PartMeta>(&b).ok())
        .filter(|m| m.url == url);
    (len, meta)
}

/// One request for the file, continuing the part file when it can.
pub(super) async fn attempt(ctx: &Ctx, job: &Job) -> Result<Complete, DownloadError> {
    let s = &*ctx.settings;
    let dir = s.dir.as_path();
    let name = job.name.as_str();
    let (have, saved) = blocking_io(dir.to_owned(), name.to_owned(), job.url.to_string()).await;
    let validator = saved
        .as_ref()
        .and_then(PartMeta::if_range)
        .map(str::to_owned);
    let offset = if validator.is_some() { have } else { 0 };

    ctx.host.wait_turn(&*s.clock).await;
    let mut request = Request::get(job.url.as_str()).header(header::USER_AGENT, &s.user_agent);
    if let (true, Some(v)) = (offset > 0, &validator) {
        request = request
            .header(header::RANGE, format!("bytes={offset}-"))
            .header(header::IF_RANGE, v);
    }
    let request = request
        .body(Body::empty())
        .map_err(|e| DownloadError::InvalidUrl {
            url: job.url.to_string(),
            reason: e.to_string(),
        })?;
    let response = idle(s, s.client.send(request))
        .await?
        .map_err(DownloadError::Http)?;
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let disposition = parts
        .headers
        .get(header::CONTENT_DISPOSITION)
        .and_then(|v| v.to_str().ok())
        .and_then(super::names::content_disposition);

    let (start, total) = match status {
        StatusCode::PARTIAL_CONTENT => {
            let value = header_str(&parts.headers, header::CONTENT_RANGE);
            match parse_content_range(value) {
                Some((first, _last, total)) if offset > 0 && first == offset => (offset, total),
                _ => {
                    discard(dir, name);
                    return Err(DownloadError::ContentRange {
                        value: value.to_owned(),
                        expected_start: offset,
                    });
                }
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
            let value = header_str(&parts.headers, header::CONTENT_RANGE);
            let size = value
                .strip_prefix("bytes */")
                .and_then(|n| n.trim().parse::<u64>().ok());
            if size == Some(have) {
                // The part already holds the whole file.
                return complete_from_disk(ctx, job, have, saved.unwrap_or_default(), disposition)
                    .await;
            }
            discard(dir, name);
            return Err(DownloadError::ContentRange {
                value: value.to_owned(),
                expected_start: offset,
            });
        }
        s if s.is_success() => (0, content_length(&parts.headers)),
        status => {
            return Err(DownloadError::Status {
                url: job.url.to_string(),
                status,
                retry_after: crate::net::retry_after(&parts.headers),
            });
        }
    };
    let meta = PartMeta::from_headers(job.url.as_str(), &parts.headers, total);
    if start > 0 && !saved.as_ref().is_some_and(|m| m.same_validator(&meta)) {
        // A 206 for another version of the resource: never append to it.
        discard(dir, name);
        return Err(DownloadError::ContentRange {
            value: header_str(&parts.headers, header::ETAG).to_owned(),
            expected_start: offset,
        });
    }
    stream_body(ctx, job, body, start, meta, disposition).await
}

async fn blocking_io(dir: PathBuf, name: String, url: String) -> (u64, Option<PartMeta>) {
    blocking::unblock(move || on_disk(&dir, &name, &url)).await
}

/// Streams `body` into the part file from byte `start`.
async fn stream_body(
    ctx: &Ctx,
    job: &Job,
    mut body: Body,
    start: u64,
    meta: PartMeta,
    disposition: Option<String>,
) -> Result<Complete, DownloadError> {
    let s = &*ctx.settings;
    let (dir, name) = (s.dir.clone(), job.name.clone());
    let part = part_path(&dir, &name);
    let total = meta.total;
    let hash = hashing(ctx, job);
    let (file, hasher) = {
        let (dir, name, meta) = (dir.clone(), name.clone(), meta.clone());
        blocking::unblock(move || open_part(&dir, &name, start, &meta, hash)).await?
    };
    let mut writer = Writer::new(file, hasher);
    ctx.events.emit(DownloadEvent::Started {
        url: job.request.url.clone(),
        part: part.clone(),
        offset: start,
        total,
    });
    let mut received = start;
    let mut reported = start;
    let streamed: Result<(), DownloadError> = async {
        while let Some(chunk) = idle(s, body.next()).await? {
            let chunk = chunk.map_err(DownloadError::Http)?;
            let n = chunk.len() as u64;
            writer.push(chunk).await.map_err(io_err(&part))?;
            received += n;
            ctx.written
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            if total.is_some_and(|t| received > t) {
                break;
            }
            if received - reported >= PROGRESS_EVERY {
                reported = received;
                ctx.events.emit(DownloadEvent::Bytes {
                    url: job.request.url.clone(),
                    received,
                    total,
                });
            }
        }
        Ok(())
    }
    .await;
    // Whatever happened, what was received is kept on disk for a resume.
    let finished = writer.finish(s.sync).await.map_err(io_err(&part));
    streamed?;
    let hasher = finished?;
    if reported != received {
        ctx.events.emit(DownloadEvent::Bytes {
            url: job.request.url.clone(),
            received,
            total,
        });
    }
    if let Some(expected) = total
        && received != expected
    {
        if received > expected {
            discard(&dir, &name);
        }
        return Err(DownloadError::Length {
            expected,
            actual: received,
        });
    }
    let sha256 = verify(job, hasher, &dir)?;
    Ok(Complete {
        bytes: received,
        sha256,
        meta,
        resumed_from: start,
        disposition,
    })
}

/// Whether the file is hashed: an expected digest, or the manifest (which
/// records it).
fn hashing(ctx: &Ctx, job: &Job) -> bool {
    job.request.sha256.is_some() || ctx.manifest.is_some()
}

/// The part file's writer: chunks are batched (no copy) and each batch is
/// written, and hashed, on a blocking thread while the next one arrives.
/// At most two batches are held: the one filling and the one writing.
struct Writer {
    /// The file and hasher, back from the last batch (`None` while one is
    /// being written).
    idle: Option<FileState>,
    writing: Option<blocking::Task<io::Result<FileState>>>,
    batch: Vec<bytes::Bytes>,
    batch_len: usize,
}

/// The part file and its running digest (when hashing).
type FileState = (File, Option<Sha256>);

impl Writer {
    fn new(file: File, hasher: Option<Sha256>) -> Writer {
        Writer {
            idle: Some((file, hasher)),
            writing: None,
            batch: Vec::new(),
            batch_len: 0,
        }
    }

    async fn push(&mut self, chunk: bytes::Bytes) -> io::Result<()> {
        self.batch_len += chunk.len();
        self.batch.push(chunk);
        if self.batch_len >= BATCH {
            self.submit().await?;
        }
        Ok(())
    }

    /// Waits for the batch being written, then hands over the next one.
    async fn submit(&mut self) -> io::Result<()> {
        if let Some(task) = self.writing.take() {
            self.idle = Some(task.await?);
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_len = 0;
        let Some((mut file, mut hasher)) = self.idle.take() else {
            return Err(io::Error::other("the part file's writer lost its file"));
        };
        self.writing = Some(blocking::unblock(move || {
            for chunk in &batch {
                io::Write::write_all(&mut file, chunk)?;
                if let Some(h) = &mut hasher {
                    h.update(chunk);
                }
            }
            Ok((file, hasher))
        }));
        Ok(())
    }

    /// Writes what is left, syncs the file when asked, and returns the
    /// hasher.
    async fn finish(mut self, sync: bool) -> io::Result<Option<Sha256>> {
        if !self.batch.is_empty() {
            self.submit().await?;
        }
        if let Some(task) = self.writing.take() {
            self.idle = Some(task.await?);
        }
        let Some((file, hasher)) = self.idle.take() else {
            return Err(io::Error::other("the part file's writer lost its file"));
        };
        if sync {
            blocking::unblock(move || file.sync_all()).await?;
        }
        Ok(hasher)
    }
}

/// Opens the part file for writing from `start` (truncating at 0), saves
/// the validators beside it, and hashes the bytes already there.
fn open_part(
    dir: &Path,
    name: &str,
    start: u64,
    meta: &PartMeta,
    hash: bool,
) -> Result<(File, Option<Sha256>), DownloadError> {
    let part = part_path(dir, name);
    let meta_file = meta_path(dir, name);
    let mut hasher = hash.then(Sha256::new);
    if start == 0 {
        if meta.total.is_none_or(|t| t > RESUME_MIN) {
            let json =
                serde_json::to_vec(meta).map_err(|e| io_err(&meta_file)(io::Error::other(e)))?;
            fs::write(&meta_file, json).map_err(io_err(&meta_file))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&part)
            .map_err(io_err(&part))?;
        return Ok((f, hasher));
    }
    if let Some(hasher) = &mut hasher {
        let mut existing = File::open(&part).map_err(io_err(&part))?.take(start);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = existing.read(&mut buf).map_err(io_err(&part))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .open(&part)
        .map_err(io_err(&part))?;
    f.set_len(start).map_err(io_err(&part))?;
    let mut f = f;
    std::io::Seek::seek(&mut f, io::SeekFrom::Start(start)).map_err(io_err(&part))?;
    Ok((f, hasher))
}

/// The digest of the whole file, checked against the expected one (a
/// mismatch discards the part: its bytes are wrong, not short).
fn verify(
    job: &Job,
    hasher: Option<Sha256>,
    dir: &Path,
) -> Result<Option<[u8; 32]>, DownloadError> {
    let Some(hasher) = hasher else {
        return Ok(None);
    };
    let sha256: [u8; 32] = hasher.finalize().into();
    if let Some(want) = job.request.sha256
        && want != sha256
    {
        discard(dir, &job.name);
        return Err(DownloadError::Checksum {
            expected: super::hex(&want),
            actual: super::hex(&sha256),
        });
    }
    Ok(Some(sha256))
}

/// A `416` said the part is already whole: hash and check it.
async fn complete_from_disk(
    ctx: &Ctx,
    job: &Job,
    have: u64,
    meta: PartMeta,
    disposition: Option<String>,
) -> Result<Complete, DownloadError> {
    let (dir, name) = (ctx.settings.dir.clone(), job.name.clone());
    let hash = hashing(ctx, job);
    let (_, hasher) = {
        let (dir, name, meta) = (dir.clone(), name.clone(), meta.clone());
        blocking::unblock(move || open_part(&dir, &name, have, &meta, hash)).await?
    };
    let sha256 = verify(job, hasher, &dir)?;
    Ok(Complete {
        bytes: have,
        sha256,
        meta,
        resumed_from: have,
        disposition,
    })
}

/// The final step: the manifest line (synced) first, then the atomic
/// rename and the folder sync, then the meta file goes. A kill between the
/// line and the rename leaves a complete part file that the next run
/// resumes with a 416 (or a fresh request).
pub(super) async fn finish(
    ctx: &Ctx,
    job: &Job,
    done: &Complete,
    final_name: &str,
) -> Result<PathBuf, DownloadError> {
    let dir = ctx.settings.dir.clone();
    let target = dir.join(final_name);
    if let Some(manifest) = &ctx.manifest {
        manifest
            .append(Entry {
                url: job.request.url.clone(),
                path: final_name.to_owned(),
                bytes: done.bytes,
                sha256: done.sha256.map(|d| super::hex(&d)).unwrap_or_default(),
                etag: done.meta.etag.clone(),
                last_modified: done.meta.last_modified.clone(),
            })
            .await
            .map_err(io_err(manifest.path()))?;
    }
    let (name, target2) = (job.name.clone(), target.clone());
    blocking::unblock(move || {
        let part = part_path(&dir, &name);
        fs::rename(&part, &target2).map_err(io_err(&part))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        let meta = meta_path(&dir, &name);
        if let Err(e) = fs::remove_file(&meta)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %meta.display(), error = %e, "cannot remove a part's meta file");
        }
        Ok::<_, DownloadError>(())
    })
    .await?;
    Ok(target)
}

/// `fut` bounded by the idle timeout.
async fn idle<F: std::future::Future>(
    s: &super::Settings,
    fut: F,
) -> Result<F::Output, DownloadError> {
    match s.idle_timeout {
        Some(after) => watchdog_on(&*s.clock, after, fut)
            .await
            .map_err(|_| DownloadError::IdleTimeout { after }),
        None => Ok(fut.await),
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, header::CONTENT_LENGTH)
        .trim()
        .parse()
        .ok()
}

/// `bytes first-last/total` (total may be `*`).
pub(super) fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    if last < first {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t: u64 = t.parse().ok()?;
            if last >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((first, last, total))
}

/// The delay the classifier should wait for a failed attempt.
pub(super) fn retry_after(e: &DownloadError) -> Option<Duration> {
    match e {
        DownloadError::Status { retry_after, .. } => *retry_after,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses_and_refuses_nonsense() {
        assert_eq!(
            parse_content_range("bytes 10-19/20"),
            Some((10, 19, Some(20)))
        );
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19, None)));
        assert_eq!(parse_content_range("bytes 10-19/15"), None);
        assert_eq!(parse_content_range("bytes 19-10/30"), None);
        assert_eq!(parse_content_range("bytes */30"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn if_range_uses_a_strong_etag_else_the_date() {
        let mut m = PartMeta {
            etag: Some("\"abc\"".into()),
            last_modified: Some("Tue, 01 Dec 2026 00:00:00 GMT".into()),
            ..PartMeta::default()
        };
        assert_eq!(m.if_range(), Some("\"abc\""));
        m.etag = Some("W/\"abc\"".into());
        assert_eq!(m.if_range(), Some("Tue, 01 Dec 2026 00:00:00 GMT"));
        m.last_modified = None;
        assert_eq!(m.if_range(), None);
    }
}
