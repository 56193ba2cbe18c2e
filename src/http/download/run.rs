//! A run: reads the requests in order, names them, skips what is done,
//! and runs each file as a task under the concurrency limit (fixed or
//! adaptive), the per-host cap and interval, and robots.txt.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use futures_lite::{Stream, StreamExt};

use super::manifest::Manifest;
use super::names::{self, Names};
use super::transfer::{self, Complete};
use super::{
    DownloadError, DownloadEvent, DownloadRequest, DownloadResult, DownloadStatus, Downloader,
    Report, Settings, Summary, Totals,
};
use crate::http::{Body, Request, StatusCode, header};
use crate::limit::{Outcome, Sample, Semaphore};
use crate::resilience::{Decision, Policy, PolicyError};
use crate::runtime::{Clock, JoinHandle, SpawnExt};
use crate::sync::lock_std as lock;

/// A run in progress: its events, and its [`Report`] when it ends.
/// Dropping it cancels the run (part files stay, to be resumed).
#[derive(Debug)]
pub struct DownloadRun {
    events: Receiver<DownloadEvent>,
    driver: JoinHandle<Report>,
}

impl DownloadRun {
    /// The run's progress events (every clone shares one queue).
    pub fn events(&self) -> Receiver<DownloadEvent> {
        self.events.clone()
    }

    /// Waits for every file and returns the report.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future cancels the run, as dropping the `DownloadRun`
    /// does.
    pub async fn finish(self) -> Report {
        match self.driver.await {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(error = %e, "the download run's task ended abnormally");
                Report {
                    results: Vec::new(),
                    summary: Summary::default(),
                }
            }
        }
    }
}

impl Downloader {
    /// Starts downloading `requests` (URLs or [`DownloadRequest`]s).
    pub fn start<I>(&self, requests: I) -> DownloadRun
    where
        I: IntoIterator,
        I::Item: Into<DownloadRequest>,
    {
        let list: Vec<DownloadRequest> = requests.into_iter().map(Into::into).collect();
        self.start_stream(futures_lite::stream::iter(list))
    }

    /// Starts downloading a stream of requests; files start as they arrive
    /// (a slow stream is not read ahead beyond the concurrency).
    pub fn start_stream<S>(&self, requests: S) -> DownloadRun
    where
        S: Stream<Item = DownloadRequest> + Send + 'static,
    {
        let (tx, rx) = async_channel::bounded(self.inner.events_capacity);
        let settings = self.inner.clone();
        let driver = self
            .inner
            .spawner
            .spawn_named("smolkit-download", drive(settings, Box::pin(requests), tx));
        DownloadRun { events: rx, driver }
    }

    /// Downloads `requests` and returns the report.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future cancels the run; part files stay, to be resumed.
    pub async fn run<I>(&self, requests: I) -> Report
    where
        I: IntoIterator,
        I::Item: Into<DownloadRequest>,
    {
        self.start(requests).finish().await
    }
}

/// Events out, lossy when the reader is behind.
pub(super) struct Events {
    tx: Sender<DownloadEvent>,
    dropped: AtomicU64,
}

impl Events {
    pub(super) fn emit(&self, event: DownloadEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One host's share of the run.
pub(super) struct Host {
    permits: Arc<Semaphore>,
    /// When the next request to the host may start.
    next: Mutex<Option<Instant>>,
    interval: Mutex<Duration>,
    robots: async_lock::OnceCell<Option<robotxt::Robots>>,
}

impl Host {
    /// Waits for the host's interval since the previous request's start.
    pub(super) async fn wait_turn(&self, clock: &dyn Clock) {
        let interval = *lock(&self.interval);
        if interval.is_zero() {
            return;
        }
        let start = {
            let mut next = lock(&self.next);
            let now = clock.now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(crate::runtime::saturating_add(start, interval));
            start
        };
        clock.sleep_until(start).await;
    }
}

/// What a file task works with: the run's shared state (through `Deref`)
/// and its host.
pub(super) struct Ctx {
    shared: Arc<Shared>,
    pub host: Arc<Host>,
}

impl std::ops::Deref for Ctx {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// One file to fetch.
pub(super) struct Job {
    pub request: DownloadRequest,
    pub url: url::Url,
    /// The part file's name (and the final name unless the response names
    /// the file and the request did not).
    pub name: String,
    pub named: bool,
}

/// The run's state, shared by its file tasks.
pub(super) struct Shared {
    pub settings: Arc<Settings>,
    pub events: Events,
    pub manifest: Option<Arc<Manifest>>,
    pub names: Mutex<Names>,
    /// Bytes written in this run.
    pub written: AtomicU64,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    active: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
}

async fn drive(
    settings: Arc<Settings>,
    mut requests: Pin<Box<dyn Stream<Item = DownloadRequest> + Send>>,
    tx: Sender<DownloadEvent>,
) -> Report {
    let started = settings.clock.now();
    let events = Events {
        tx,
        dropped: AtomicU64::new(0),
    };
    let manifest = open_manifest(&settings).await;
    let mut names = Names::default();
    if let Ok(Some(m)) = &manifest {
        for n in m.names() {
            names.claim(&n, "");
        }
    }
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        events,
        manifest: manifest.as_ref().ok().cloned().flatten(),
        names: Mutex::new(names),
        written: AtomicU64::new(0),
        hosts: Mutex::new(HashMap::new()),
        active: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let limit = match &settings.adaptive {
        Some(a) => a.semaphore().clone(),
        None => Arc::new(Semaphore::new(settings.concurrency)),
    };
    let mut results: Vec<Option<DownloadResult>> = Vec::new();
    let mut tasks: Vec<(usize, DownloadRequest, JoinHandle<DownloadResult>)> = Vec::new();
    while let Some(request) = requests.next().await {
        let index = results.len();
        results.push(None);
        let prepared = match &manifest {
            Err(e) => Err(DownloadError::Io {
                path: settings.dir.join(super::MANIFEST),
                source: std::io::Error::new(e.kind(), e.to_string()),
            }),
            Ok(_) => prepare(&shared, request.clone()),
        };
        let job = match prepared {
            Ok(Prepared::Job(job)) => job,
            Ok(Prepared::Done(result)) => {
                shared.end(&result);
                results[index] = Some(result);
                continue;
            }
            Err(e) => {
                let result = failed(&request, e, 0, None);
                shared.end(&result);
                results[index] = Some(result);
                continue;
            }
        };
        let Ok(permit) = limit.acquire_arc().await else {
            results[index] = Some(failed(&job.request, DownloadError::Cancelled, 0, None));
            continue;
        };
        let shared2 = shared.clone();
        let task = settings
            .spawner
            .spawn_named("smolkit-download-file", async move {
                let _permit = permit;
                run_file(shared2, job).await
            });
        tasks.push((index, request, task));
    }
    for (index, request, task) in tasks {
        let result = match task.await {
            Ok(r) => r,
            Err(e) => {
                let source = std::io::Error::other(format!("the file's task ended: {e}"));
                let path = settings.dir.clone();
                failed(&request, DownloadError::Io { path, source }, 0, None)
            }
        };
        results[index] = Some(result);
    }
    let results: Vec<DownloadResult> = results.into_iter().flatten().collect();
    let summary = Summary {
        total: results.len(),
        succeeded: results.iter().filter(|r| r.status.is_success()).count(),
        failed: results
            .iter()
            .filter(|r| r.status == DownloadStatus::Failed)
            .count(),
        skipped: results.iter().filter(|r| r.status.is_skipped()).count(),
        bytes: shared.written.load(Ordering::Relaxed),
        duration: settings.clock.now().saturating_duration_since(started),
    };
    Report { results, summary }
}

async fn open_manifest(settings: &Settings) -> std::io::Result<Option<Arc<Manifest>>> {
    if !settings.manifest {
        return Ok(None);
    }
    let dir = settings.dir.clone();
    blocking::unblock(move || Manifest::open(&dir))
        .await
        .map(|m| Some(Arc::new(m)))
}

enum Prepared {
    Job(Job),
    Done(DownloadResult),
}

/// Parses and names a request, or ends it at once (invalid, already done).
fn prepare(shared: &Shared, request: DownloadRequest) -> Result<Prepared, DownloadError> {
    let url = url::Url::parse(&request.url).map_err(|e| DownloadError::InvalidUrl {
        url: request.url.clone(),
        reason: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(DownloadError::InvalidUrl {
            url: request.url.clone(),
            reason: "only http and https URLs with a host".into(),
        });
    }
    let dir = &shared.settings.dir;
    let entry = shared.manifest.as_ref().and_then(|m| m.get(&request.url));
    if let Some(e) = &entry {
        let path = dir.join(&e.path);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == e.bytes) {
            return Ok(Prepared::Done(DownloadResult {
                url: request.url.clone(),
                path: Some(path),
                status: DownloadStatus::AlreadyDone,
                bytes: e.bytes,
                resumed_from: 0,
                attempts: 0,
                sha256: Some(e.sha256.clone()),
                error: None,
            }));
        }
    }
    let named = request.name.is_some();
    let wanted = match &request.name {
        Some(n) => names::sanitize(n).ok_or_else(|| DownloadError::InvalidUrl {
            url: request.url.clone(),
            reason: format!("the name {n:?} has nothing usable once sanitized"),
        })?,
        None => names::from_url(&url),
    };
    let name = match entry {
        // A file done before but gone since: same name again.
        Some(e) if e.path == wanted => wanted,
        _ => lock(&shared.names).claim(&wanted, &request.url),
    };
    if !shared.settings.resume {
        // Parts of earlier runs go; this run's own retries still resume.
        transfer::discard(dir, &name);
    }
    Ok(Prepared::Job(Job {
        request,
        url,
        name,
        named,
    }))
}

impl Shared {
    fn host(&self, url: &url::Url) -> Arc<Host> {
        let key = format!(
            "{}://{}:{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.port_or_known_default().unwrap_or(0)
        );
        lock(&self.hosts)
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Host {
                    permits: Arc::new(Semaphore::new(self.settings.per_host)),
                    next: Mutex::new(None),
                    interval: Mutex::new(self.settings.interval),
                    robots: async_lock::OnceCell::new(),
                })
            })
            .clone()
    }

    /// Counts a file that ended and emits its event and the totals.
    fn end(&self, result: &DownloadResult) {
        let done = self.done.fetch_add(1, Ordering::AcqRel) + 1;
        let event = match result.status {
            s if s.is_success() => DownloadEvent::Finished(result.clone()),
            s if s.is_skipped() => DownloadEvent::Skipped(result.clone()),
            _ => {
                self.failed.fetch_add(1, Ordering::AcqRel);
                DownloadEvent::Failed(result.clone())
            }
        };
        self.events.emit(event);
        self.events.emit(DownloadEvent::Totals(Totals {
            done,
            failed: self.failed.load(Ordering::Acquire),
            active: self.active.load(Ordering::Acquire),
            bytes: self.written.load(Ordering::Relaxed),
            events_dropped: self.events.dropped.load(Ordering::Relaxed),
        }));
    }
}

/// One file from start to end, as a result.
async fn run_file(shared: Arc<Shared>, job: Job) -> DownloadResult {
    let host = shared.host(&job.url);
    let ctx = Ctx {
        shared: shared.clone(),
        host: host.clone(),
    };
    let result = if !allowed(&ctx, &job).await {
        DownloadResult {
            url: job.request.url.clone(),
            path: None,
            status: DownloadStatus::Disallowed,
            bytes: 0,
            resumed_from: 0,
            attempts: 0,
            sha256: None,
            error: None,
        }
    } else {
        let Ok(_host_permit) = host.permits.acquire_arc().await else {
            return failed(&job.request, DownloadError::Cancelled, 0, None);
        };
        shared.active.fetch_add(1, Ordering::AcqRel);
        let result = fetch(&ctx, &job).await;
        shared.active.fetch_sub(1, Ordering::AcqRel);
        result
    };
    shared.end(&result);
    result
}

/// Attempts under the policy, then the finish; feeds the adaptive limit.
async fn fetch(ctx: &Ctx, job: &Job) -> DownloadResult {
    let s = &*ctx.settings;
    let started = s.clock.now();
    let attempts = AtomicU64::new(0);
    let cap = s.max_retry_after;
    let retry = s.retry.clone().with_max_retry_after(cap).with_classifier(
        |outcome: Result<&Complete, &DownloadError>| match outcome {
            Ok(_) => Decision::Done,
            Err(e) if e.is_retryable() => match transfer::retry_after(e) {
                Some(d) => Decision::RetryAfter(d),
                None => Decision::Retry,
            },
            Err(_) => Decision::Done,
        },
    );
    let mut policy = Policy::builder()
        .with_clock(s.clock.clone())
        .with_retry(retry);
    if let Some(t) = s.file_timeout {
        policy = policy.with_total_timeout(t);
    }
    let policy = policy.build();
    let outcome = policy
        .run(|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            transfer::attempt(ctx, job)
        })
        .await;
    let attempts = attempts.load(Ordering::Relaxed) as u32;
    let done = match outcome {
        Ok(done) => done,
        Err(e) => {
            let error = policy_error(e, s.file_timeout);
            feed_adaptive(s, started, load_outcome(&error), 0);
            let kept =
                std::fs::metadata(transfer::part_path(&s.dir, &job.name)).map_or(0, |m| m.len());
            let part = (kept > 0).then(|| transfer::part_path(&s.dir, &job.name));
            return failed_with(&job.request, error, attempts, part, kept);
        }
    };
    feed_adaptive(s, started, Outcome::Success, done.bytes - done.resumed_from);
    let final_name = final_name(ctx, job, &done);
    match transfer::finish(ctx, job, &done, &final_name).await {
        Ok(path) => DownloadResult {
            url: job.request.url.clone(),
            path: Some(path),
            status: if done.resumed_from > 0 {
                DownloadStatus::Resumed
            } else {
                DownloadStatus::Downloaded
            },
            bytes: done.bytes,
            resumed_from: done.resumed_from,
            attempts,
            sha256: done.sha256.map(|d| super::hex(&d)),
            error: None,
        },
        Err(e) => failed(&job.request, e, attempts, None),
    }
}

/// What a failure says about load: network trouble says the concurrency
/// may be too high; a 404 says nothing.
fn load_outcome(e: &DownloadError) -> Outcome {
    match e {
        DownloadError::Http(_)
        | DownloadError::IdleTimeout { .. }
        | DownloadError::TotalTimeout { .. }
        | DownloadError::Length { .. } => Outcome::Dropped,
        DownloadError::Status { status, .. }
            if *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() =>
        {
            Outcome::Dropped
        }
        _ => Outcome::Ignore,
    }
}

fn feed_adaptive(s: &Settings, started: Instant, outcome: Outcome, bytes: u64) {
    let Some(limit) = &s.adaptive else { return };
    let latency = s.clock.now().saturating_duration_since(started);
    let in_flight = limit.semaphore().in_use().max(1);
    let mut sample = Sample::new(latency, outcome, in_flight);
    if outcome == Outcome::Success {
        sample = sample.with_bytes(bytes);
    }
    limit.record(sample);
}

fn policy_error(e: PolicyError<DownloadError>, file_timeout: Option<Duration>) -> DownloadError {
    match e {
        PolicyError::Timeout(elapsed) => DownloadError::TotalTimeout {
            after: file_timeout.unwrap_or(elapsed.after()),
        },
        other => other.into_inner().unwrap_or(DownloadError::Cancelled),
    }
}

/// The request's name, else a `Content-Disposition` name (sanitized,
/// claimed), else the part's name.
fn final_name(ctx: &Ctx, job: &Job, done: &Complete) -> String {
    if job.named {
        return job.name.clone();
    }
    match done.disposition.as_deref().and_then(names::sanitize) {
        Some(n) if n != job.name => lock(&ctx.names).claim(&n, &job.request.url),
        _ => job.name.clone(),
    }
}

fn failed(
    request: &DownloadRequest,
    error: DownloadError,
    attempts: u32,
    part: Option<std::path::PathBuf>,
) -> DownloadResult {
    failed_with(request, error, attempts, part, 0)
}

fn failed_with(
    request: &DownloadRequest,
    error: DownloadError,
    attempts: u32,
    part: Option<std::path::PathBuf>,
    kept: u64,
) -> DownloadResult {
    tracing::warn!(url = %request.url, attempts, error = %error, "download failed");
    DownloadResult {
        url: request.url.clone(),
        path: part,
        status: DownloadStatus::Failed,
        bytes: kept,
        resumed_from: 0,
        attempts,
        sha256: None,
        error: Some(Arc::new(error)),
    }
}

/// Whether robots.txt (when consulted) allows the URL; fetched once per
/// host, and its Crawl-delay widens the host's interval.
async fn allowed(ctx: &Ctx, job: &Job) -> bool {
    let Some(agent) = &ctx.settings.robots else {
        return true;
    };
    let robots = ctx
        .host
        .robots
        .get_or_init(|| fetch_robots(ctx, &job.url, agent))
        .await;
    let Some(robots) = robots else { return true };
    let path = match job.url.query() {
        Some(q) => format!("{}?{q}", job.url.path()),
        None => job.url.path().to_owned(),
    };
    robots.is_allowed(&path)
}

async fn fetch_robots(ctx: &Ctx, url: &url::Url, agent: &str) -> Option<robotxt::Robots> {
    let s = &*ctx.settings;
    let mut robots_url = url.clone();
    robots_url.set_path("/robots.txt");
    robots_url.set_query(None);
    robots_url.set_fragment(None);
    let request = Request::get(robots_url.as_str())
        .header(header::USER_AGENT, &s.user_agent)
        .body(Body::empty())
        .ok()?;
    let access = match s.client.send(request).await {
        Ok(r) if r.status().is_success() => {
            // RFC 9309 asks for at least 500 KiB to be parsed.
            match r.into_body().bytes_limited(512 * 1024).await {
                Ok(body) => Some(robotxt::Robots::parse(&body, robotxt::Agent::Prefix(agent))),
                Err(_) => Some(robotxt::Robots::disallow_all()),
            }
        }
        Ok(r) if r.status().is_client_error() => None,
        Ok(_) | Err(_) => Some(robotxt::Robots::disallow_all()),
    };
    if let Some(delay) = access.as_ref().and_then(robotxt::Robots::crawl_delay) {
        let mut interval = lock(&ctx.host.interval);
        *interval = (*interval).max(delay);
    }
    tracing::debug!(host = ?url.host_str(), found = access.is_some(), "robots.txt");
    access
}
