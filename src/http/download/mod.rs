//! `Downloader`: the seeds' batch downloader — resumable, atomic, safe,
//! polite, with progress events and a typed result per URL.
//!
//! What it guarantees, per file:
//!
//! - **atomic**: the body streams to `<name>.part` with bounded memory (at
//!   most two 1 MiB batches per file: one arriving, one being written and
//!   hashed on a blocking thread); on success the part file is synced, the
//!   manifest line written and synced, the part renamed to `<name>` and
//!   the folder synced. A failed file leaves no final file (its part
//!   stays, to be resumed).
//! - **verified**: the length against `Content-Length` / `Content-Range`,
//!   and the SHA-256 when one was given, while streaming.
//! - **resumable** (bodies over 256 KiB): an existing part file is continued with
//!   `Range: bytes=N-` and `If-Range` (the strong ETag saved beside the
//!   part, else its Last-Modified). A `206` whose `Content-Range` starts at
//!   N appends; a `200` (the server ignored the range, or the resource
//!   changed) restarts from zero; a `416` whose size equals the part means
//!   the part is complete. A part with no saved validator is never
//!   appended to. Retries keep the partial data and resume.
//! - **safe names**: from the request, else `Content-Disposition`
//!   (`filename*` then `filename`), else the URL path, sanitized
//!   ([`sanitize`]) to one component in the folder; collisions get a
//!   suffix derived from the URL (deterministic).
//! - **polite**: a concurrency limit, a cap per host, an interval between
//!   requests to one host, optional robots.txt (fetched once per host;
//!   `Crawl-delay` widens the interval).
//! - **skips done work**: a manifest (`.smolkit-downloads.jsonl`, one JSON
//!   line per finished URL: file, size, SHA-256, validator) makes a rerun
//!   skip finished files that are still there.
//!
//! Retries go through a [`Policy`](crate::resilience::Policy): transport
//! errors, timeouts, truncated bodies, `429` and `5xx` are retried (with
//! `Retry-After` honoured, capped), other `4xx` are not.
//!
//! Robots.txt is parsed with the `robotxt` crate (RFC 9309 groups,
//! longest match, `Crawl-delay`); `Content-Disposition` with a small
//! parser of our own (see the `names` module's notes).

mod manifest;
mod names;
mod run;
mod transfer;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;

pub use self::manifest::MANIFEST;
pub use self::names::{MAX_NAME_BYTES, sanitize};
pub use self::run::DownloadRun;
use crate::ConfigError;
use crate::http::{Client, HyperClient, StatusCode};
use crate::limit::AdaptiveLimit;
use crate::resilience::{Backoff, Retry};
use crate::runtime::{Clock, Spawn, SystemClock, default_spawner};

/// One URL to download, with an optional file name and expected SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRequest {
    url: String,
    name: Option<String>,
    sha256: Option<[u8; 32]>,
}

impl DownloadRequest {
    /// A request for `url`; the name comes from the response or the URL.
    pub fn new(url: impl Into<String>) -> Self {
        DownloadRequest {
            url: url.into(),
            name: None,
            sha256: None,
        }
    }

    /// Saves under this name (sanitized like any other).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The file must have this SHA-256, else it fails with
    /// [`DownloadError::Checksum`] and no file is kept.
    pub fn with_sha256(mut self, digest: [u8; 32]) -> Self {
        self.sha256 = Some(digest);
        self
    }

    /// [`with_sha256`](Self::with_sha256) from 64 hex digits.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the value when it is not 64 hex digits.
    pub fn with_sha256_hex(self, hex: &str) -> Result<Self, ConfigError> {
        let digest = parse_hex32(hex.trim())
            .ok_or_else(|| ConfigError::new("sha256", hex, "must be 64 hex digits"))?;
        Ok(self.with_sha256(digest))
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl From<&str> for DownloadRequest {
    fn from(url: &str) -> Self {
        DownloadRequest::new(url)
    }
}

impl From<String> for DownloadRequest {
    fn from(url: String) -> Self {
        DownloadRequest::new(url)
    }
}

impl From<&String> for DownloadRequest {
    fn from(url: &String) -> Self {
        DownloadRequest::new(url.as_str())
    }
}

/// How one URL ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DownloadStatus {
    /// Downloaded from the start.
    Downloaded,
    /// Completed from a part file left by an earlier attempt or run.
    Resumed,
    /// Already in the manifest with its file present: nothing sent.
    AlreadyDone,
    /// robots.txt disallows it: nothing sent.
    Disallowed,
    /// Failed; see [`DownloadResult::error`].
    Failed,
}

impl DownloadStatus {
    /// Downloaded or resumed.
    pub fn is_success(self) -> bool {
        matches!(self, DownloadStatus::Downloaded | DownloadStatus::Resumed)
    }

    /// Already done or disallowed.
    pub fn is_skipped(self) -> bool {
        matches!(
            self,
            DownloadStatus::AlreadyDone | DownloadStatus::Disallowed
        )
    }
}

/// The outcome of one URL: the seeds' result dict, typed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DownloadResult {
    /// The URL as requested.
    pub url: String,
    /// The final file (for a success or an already-done file), else the
    /// part file when partial data was kept, else `None`.
    pub path: Option<PathBuf>,
    /// How it ended.
    pub status: DownloadStatus,
    /// The file's size (successes and skips), or the bytes kept in the part
    /// file (failures).
    pub bytes: u64,
    /// Bytes that were already on disk when the transfer began (resumed).
    pub resumed_from: u64,
    /// Requests sent for the file (0 for skips).
    pub attempts: u32,
    /// Lower-case hex SHA-256 of the file (successes and skips), computed
    /// when an expected digest was given or the manifest is on.
    pub sha256: Option<String>,
    /// Why it failed.
    pub error: Option<Arc<DownloadError>>,
}

/// The run as a whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// URLs given.
    pub total: usize,
    /// Downloaded or resumed.
    pub succeeded: usize,
    /// Failed.
    pub failed: usize,
    /// Already done or disallowed.
    pub skipped: usize,
    /// Bytes written in this run.
    pub bytes: u64,
    /// From the start of the run to its end.
    pub duration: Duration,
}

/// Every result, in input order, and the summary.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// One per URL, in the order given.
    pub results: Vec<DownloadResult>,
    /// The totals.
    pub summary: Summary,
}

/// Progress of a run, from [`DownloadRun::events`]. Events are dropped
/// (and counted in [`Totals::events_dropped`]) rather than slowing the
/// downloads when nobody reads them; the [`Report`] is the lossless record.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DownloadEvent {
    /// A transfer began (once per attempt).
    Started {
        /// The URL.
        url: String,
        /// The part file being written.
        part: PathBuf,
        /// Bytes already in the part file (a resume).
        offset: u64,
        /// The file's full size, when the server said.
        total: Option<u64>,
    },
    /// Bytes arrived (coalesced: about every 256 KiB, and at the end).
    Bytes {
        /// The URL.
        url: String,
        /// Bytes in the part file now.
        received: u64,
        /// The file's full size, when known.
        total: Option<u64>,
    },
    /// A file is complete.
    Finished(DownloadResult),
    /// A file failed for good.
    Failed(DownloadResult),
    /// A file was skipped (already done or disallowed).
    Skipped(DownloadResult),
    /// The run's totals after a file ended.
    Totals(Totals),
}

/// Running totals, in [`DownloadEvent::Totals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Totals {
    /// Files ended (any status).
    pub done: usize,
    /// Of which failed.
    pub failed: usize,
    /// Transfers running now.
    pub active: usize,
    /// Bytes written in this run.
    pub bytes: u64,
    /// Events dropped because the reader was behind.
    pub events_dropped: u64,
}

/// Why a file failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum DownloadError {
    /// The URL does not parse or is not http(s).
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The request failed (connect, TLS, transport, body).
    Http(crate::http::Error),
    /// The server answered with a status that is not a success.
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The server's Retry-After, if any.
        retry_after: Option<Duration>,
    },
    /// The body was shorter or longer than announced.
    Length {
        /// Bytes announced.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// The SHA-256 did not match; the data was discarded.
    Checksum {
        /// Expected, lower-case hex.
        expected: String,
        /// Received, lower-case hex.
        actual: String,
    },
    /// A `206` whose `Content-Range` does not continue the part file.
    ContentRange {
        /// The header as received (or empty when missing).
        value: String,
        /// The offset asked for.
        expected_start: u64,
    },
    /// No bytes for longer than the idle timeout.
    IdleTimeout {
        /// The idle timeout.
        after: Duration,
    },
    /// The file took longer than the per-file total timeout.
    TotalTimeout {
        /// The per-file timeout.
        after: Duration,
    },
    /// A file system operation failed.
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The run was cancelled before the file ended.
    Cancelled,
}

impl DownloadError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            DownloadError::Http(e) => e.is_transport(),
            DownloadError::Status { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || status.is_server_error()
            }
            DownloadError::Length { .. }
            | DownloadError::ContentRange { .. }
            | DownloadError::IdleTimeout { .. } => true,
            _ => false,
        }
    }
}

impl fmt::Display for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownloadError::InvalidUrl { url, reason } => write!(f, "invalid URL {url:?}: {reason}"),
            DownloadError::Http(e) => e.fmt(f),
            DownloadError::Status { url, status, .. } => write!(f, "{url} answered {status}"),
            DownloadError::Length { expected, actual } => {
                write!(f, "body of {actual} bytes where {expected} were announced")
            }
            DownloadError::Checksum { expected, actual } => {
                write!(f, "SHA-256 mismatch: expected {expected}, got {actual}")
            }
            DownloadError::ContentRange {
                value,
                expected_start,
            } => write!(
                f,
                "206 with Content-Range {value:?} does not continue at byte {expected_start}"
            ),
            DownloadError::IdleTimeout { after } => write!(f, "no data for {after:?}"),
            DownloadError::TotalTimeout { after } => {
                write!(f, "the file took longer than {after:?}")
            }
            DownloadError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            DownloadError::Cancelled => f.write_str("the run was cancelled"),
        }
    }
}

impl std::error::Error for DownloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DownloadError::Http(e) => Some(e),
            DownloadError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Downloads batches of URLs into one folder. Cheap to clone; each
/// [`start`](Downloader::start) is one run.
///
/// # Examples
///
/// ```
/// # #[cfg(feature = "testing")] {
/// use smolkit::http::download::{DownloadStatus, Downloader};
/// use smolkit::testing::ChaosServer;
///
/// # smol::block_on(async {
/// let server = ChaosServer::builder().with_file("a.txt", "hello").start().await.unwrap();
/// let dir = tempfile::tempdir().unwrap();
/// let downloader = Downloader::builder(dir.path()).with_concurrency(4).build().unwrap();
/// let report = downloader.run([server.url("/files/a.txt")]).await;
/// assert_eq!(report.results[0].status, DownloadStatus::Downloaded);
/// assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"hello");
/// # });
/// # }
/// ```
#[derive(Clone)]
pub struct Downloader {
    inner: Arc<Settings>,
}

pub(crate) struct Settings {
    dir: PathBuf,
    client: Arc<dyn Client>,
    concurrency: usize,
    per_host: usize,
    interval: Duration,
    robots: Option<String>,
    user_agent: String,
    retry: Retry,
    max_retry_after: Duration,
    idle_timeout: Option<Duration>,
    file_timeout: Option<Duration>,
    adaptive: Option<Arc<AdaptiveLimit>>,
    manifest: bool,
    resume: bool,
    sync: bool,
    events_capacity: usize,
    clock: Arc<dyn Clock>,
    spawner: Arc<dyn Spawn>,
}

impl fmt::Debug for Downloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner;
        f.debug_struct("Downloader")
            .field("dir", &s.dir)
            .field("concurrency", &s.concurrency)
            .field("per_host", &s.per_host)
            .field("interval", &s.interval)
            .field("robots", &s.robots)
            .field("adaptive", &s.adaptive.is_some())
            .finish()
    }
}

/// Configures a [`Downloader`].
///
/// # Default
///
/// - concurrency 8, at most 4 at once per host (also the per-host
///   connection cap of the `HyperClient` it builds), no interval between
///   requests to a host, robots.txt not consulted;
/// - retries: 5 attempts, exponential backoff from 500 ms to 30 s with
///   full jitter, Retry-After honoured up to 60 s;
/// - timeouts: connect 10 s, 30 s without data, no per-file total;
/// - resume on (bodies over 256 KiB; smaller ones restart whole), manifest
///   on, files synced to disk, fixed concurrency (no adaptation);
/// - a `HyperClient` of its own, user agent `smolkit/<version>`, the
///   system clock, the default spawner, 1024 buffered events.
pub struct DownloaderBuilder {
    dir: PathBuf,
    client: Option<Arc<dyn Client>>,
    concurrency: usize,
    per_host: usize,
    interval: Duration,
    robots: bool,
    user_agent: String,
    retry: Retry,
    max_retry_after: Duration,
    connect_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    file_timeout: Option<Duration>,
    adaptive: Option<Arc<AdaptiveLimit>>,
    adaptive_default: bool,
    manifest: bool,
    resume: bool,
    sync: bool,
    events_capacity: usize,
    clock: Arc<dyn Clock>,
    spawner: Arc<dyn Spawn>,
}

impl fmt::Debug for DownloaderBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DownloaderBuilder")
            .field("dir", &self.dir)
            .field("concurrency", &self.concurrency)
            .field("per_host", &self.per_host)
            .finish_non_exhaustive()
    }
}

impl Downloader {
    /// A builder saving into `dir` (created if missing).
    pub fn builder(dir: impl Into<PathBuf>) -> DownloaderBuilder {
        DownloaderBuilder {
            dir: dir.into(),
            client: None,
            concurrency: 8,
            per_host: 4,
            interval: Duration::ZERO,
            robots: false,
            user_agent: concat!("smolkit/", env!("CARGO_PKG_VERSION")).to_owned(),
            retry: Retry::new().with_max_attempts(5).with_backoff(
                Backoff::exponential(Duration::from_millis(500))
                    .with_max_delay(Duration::from_secs(30))
                    .with_jitter(crate::resilience::Jitter::Full),
            ),
            max_retry_after: Duration::from_secs(60),
            connect_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(30)),
            file_timeout: None,
            adaptive: None,
            adaptive_default: false,
            manifest: true,
            resume: true,
            sync: true,
            events_capacity: 1024,
            clock: Arc::new(SystemClock),
            spawner: default_spawner(),
        }
    }

    /// The target folder.
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.dir
    }

    /// The adaptive limit, when adaptation is on.
    pub fn adaptive_limit(&self) -> Option<&Arc<AdaptiveLimit>> {
        self.inner.adaptive.as_ref()
    }
}

impl DownloaderBuilder {
    /// The HTTP backend (default: a [`HyperClient`] built from this
    /// builder's per-host cap and connect timeout). Any [`Client`] works:
    /// `SurfClient`, or one of your own.
    pub fn with_client(mut self, client: Arc<dyn Client>) -> Self {
        self.client = Some(client);
        self
    }

    /// Files transferred at once (default 8). With adaptation on, the most.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Files transferred at once from one host (default 4); also the
    /// per-host connection cap of the default client.
    pub fn with_per_host(mut self, n: usize) -> Self {
        self.per_host = n;
        self
    }

    /// At least this long between the starts of two requests to one host
    /// (default none).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Consults robots.txt (fetched once per host) as the user agent's
    /// product token; disallowed URLs are skipped, and `Crawl-delay` widens
    /// the host's interval. A robots.txt answering 4xx allows everything,
    /// one that cannot be fetched (5xx, network) disallows everything
    /// (RFC 9309 §2.3.1).
    pub fn with_robots(mut self, on: bool) -> Self {
        self.robots = on;
        self
    }

    /// The `User-Agent` header; its first token is the robots.txt name.
    pub fn with_user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }

    /// Attempts and backoff per file (the classifier is the downloader's:
    /// transport errors, timeouts, truncation, 429 and 5xx are retried).
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// The longest Retry-After honoured (default 60 s).
    pub fn with_max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// TCP + TLS set-up bound of the default client (default 10 s).
    pub fn with_connect_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.connect_timeout = t.into();
        self
    }

    /// Fails an attempt when no headers or body bytes arrive for this long
    /// (default 30 s); the attempt is retried and resumes.
    pub fn with_idle_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.idle_timeout = t.into();
        self
    }

    /// Bounds each file, retries included (default none).
    pub fn with_file_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.file_timeout = t.into();
        self
    }

    /// Adapts the concurrency to throughput: starts at the concurrency,
    /// stays between 1 and it, and backs off (AIMD, × 0.9) when a transfer
    /// moves less than 100 KB/s (the seeds' rule) or fails on the network.
    pub fn with_adaptive(mut self, on: bool) -> Self {
        self.adaptive_default = on;
        self
    }

    /// Adapts the concurrency with this limit instead of the default one.
    pub fn with_adaptive_limit(mut self, limit: Arc<AdaptiveLimit>) -> Self {
        self.adaptive = Some(limit);
        self
    }

    /// Skips URLs the manifest lists as done (default on). Off: every URL
    /// is fetched again, and nothing is recorded.
    pub fn with_manifest(mut self, on: bool) -> Self {
        self.manifest = on;
        self
    }

    /// Continues part files left by earlier runs (default on). Off: they
    /// are discarded when their URL comes up; the retries of this run
    /// still resume from what they received.
    pub fn with_resume(mut self, on: bool) -> Self {
        self.resume = on;
        self
    }

    /// Syncs each finished file and the folder to disk before it counts
    /// as done (default on): a crash or power cut right after cannot leave
    /// a final file with missing bytes. Off: the page cache decides when
    /// (as wget2 and curl do); the rename is still atomic for the processes
    /// reading the folder.
    pub fn with_sync(mut self, on: bool) -> Self {
        self.sync = on;
        self
    }

    /// Events buffered for [`DownloadRun::events`] (default 1024).
    pub fn with_events_capacity(mut self, n: usize) -> Self {
        self.events_capacity = n;
        self
    }

    /// The clock for timeouts, intervals and backoff.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Where the run's tasks go (default: the default spawner).
    pub fn with_spawner(mut self, spawner: impl Spawn + 'static) -> Self {
        self.spawner = Arc::new(spawner);
        self
    }

    /// Checks the settings and creates the folder.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a zero concurrency, per-host cap or event
    /// capacity, an empty user agent, or a folder that cannot be created.
    pub fn build(self) -> Result<Downloader, ConfigError> {
        let concurrency = ConfigError::nonzero("concurrency", self.concurrency)?;
        let per_host = ConfigError::nonzero("per_host", self.per_host)?;
        let events_capacity = ConfigError::nonzero("events_capacity", self.events_capacity)?;
        if self.user_agent.trim().is_empty() {
            return Err(ConfigError::new(
                "user_agent",
                &self.user_agent,
                "must not be empty",
            ));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            ConfigError::new(
                "dir",
                self.dir.display().to_string(),
                format!("cannot create: {e}"),
            )
        })?;
        let client = match self.client {
            Some(c) => c,
            None => Arc::new(
                HyperClient::builder()
                    .with_max_connections_per_host(per_host)
                    .with_connect_timeout(self.connect_timeout)
                    .build()
                    .map_err(|e| ConfigError::new("client", "HyperClient", e.to_string()))?,
            ),
        };
        let adaptive = match (self.adaptive, self.adaptive_default) {
            (Some(limit), _) => Some(limit),
            (None, true) => Some(Arc::new(
                AdaptiveLimit::new(
                    concurrency,
                    1,
                    concurrency,
                    crate::limit::Aimd::new().with_min_throughput(100_000.0),
                )?
                .with_clock(self.clock.clone()),
            )),
            (None, false) => None,
        };
        let robots = self.robots.then(|| {
            let token = self.user_agent.split(['/', ' ']).next().unwrap_or("*");
            token.to_owned()
        });
        Ok(Downloader {
            inner: Arc::new(Settings {
                dir: self.dir,
                client,
                concurrency,
                per_host,
                interval: self.interval,
                robots,
                user_agent: self.user_agent,
                retry: self.retry.with_clock(self.clock.clone()),
                max_retry_after: self.max_retry_after,
                idle_timeout: self.idle_timeout,
                file_timeout: self.file_timeout,
                adaptive,
                manifest: self.manifest,
                resume: self.resume,
                sync: self.sync,
                events_capacity,
                clock: self.clock,
                spawner: self.spawner,
            }),
        })
    }
}

impl Default for DownloaderBuilder {
    /// Saves into the current folder.
    fn default() -> Self {
        Downloader::builder(".")
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(bytes).into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}
