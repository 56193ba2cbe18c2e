//! A command-line batch downloader on `http::download::Downloader`: the
//! seeds' first scenario.
//!
//! ```text
//! batch_download [URL...] [--urls FILE] [--out DIR] [--concurrency N]
//!                [--per-host N] [--resume] [--sha256-file FILE] [--robots]
//!                [--adaptive]
//! ```
//!
//! With no URLs it starts an embedded ChaosServer serving a generated file
//! set, some behind faults (a reset mid-body, a 503 with Retry-After, a
//! redirect), and downloads that: no internet needed. Progress bars (a
//! total and one per active file) show on a terminal only. Exits 1 when any
//! file failed.
//!
//! Run: `cargo run --release --features testing --example batch_download`

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use smolkit::http::download::{DownloadEvent, DownloadRequest, DownloadStatus, Downloader};
use smolkit::resilience::{Backoff, Retry};
use smolkit::testing::ChaosServer;

#[derive(Parser, Debug)]
#[command(about = "Downloads URLs into a folder: resumable, atomic, polite.")]
struct Args {
    /// URLs to download (none: a demo against an embedded server).
    urls: Vec<String>,
    /// A file with one URL per line (blank lines and `#` comments skipped).
    #[arg(long)]
    urls_file: Option<PathBuf>,
    /// The target folder (default: a new temporary folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Files at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Files at once per host.
    #[arg(long, default_value_t = 4)]
    per_host: usize,
    /// Continue part files and skip what the folder's manifest lists.
    #[arg(long)]
    resume: bool,
    /// `sha256sum` output: `<hex>  <name or URL>` per line.
    #[arg(long)]
    sha256_file: Option<PathBuf>,
    /// Obey robots.txt.
    #[arg(long)]
    robots: bool,
    /// Lower the concurrency when transfers fall below 100 KB/s.
    #[arg(long)]
    adaptive: bool,
}

type BoxError = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let args = Args::parse();
    match smol::block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("batch_download: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let mut urls = args.urls.clone();
    if let Some(file) = &args.urls_file {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        urls.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    // No URLs: the demo server, kept alive for the run.
    let demo = if urls.is_empty() {
        let (server, demo_urls) = demo_server().await?;
        println!(
            "no URLs given: downloading {} files from an embedded server at {}",
            demo_urls.len(),
            server.url("/")
        );
        urls = demo_urls;
        Some(server)
    } else {
        None
    };
    let _tmp;
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_owned();
            _tmp = t;
            p
        }
    };
    let sums = match &args.sha256_file {
        Some(f) => read_sums(f)?,
        None => HashMap::new(),
    };
    let requests: Vec<DownloadRequest> = urls
        .iter()
        .map(|u| {
            let name = u
                .rsplit('/')
                .next()
                .unwrap_or("")
                .split('?')
                .next()
                .unwrap_or("");
            match sums.get(u.as_str()).or_else(|| sums.get(name)) {
                Some(hex) => DownloadRequest::new(u.as_str()).with_sha256_hex(hex),
                None => Ok(DownloadRequest::new(u.as_str())),
            }
        })
        .collect::<Result<_, _>>()?;
    let mut builder = Downloader::builder(&out)
        .with_concurrency(args.concurrency)
        .with_per_host(args.per_host)
        .with_robots(args.robots)
        .with_adaptive(args.adaptive)
        .with_resume(args.resume)
        .with_manifest(args.resume);
    if demo.is_some() {
        // The demo's faults heal within a second; retry quickly.
        builder = builder.with_retry(
            Retry::new()
                .with_max_attempts(5)
                .with_backoff(Backoff::exponential(Duration::from_millis(50))),
        );
    }
    let downloader = builder.build()?;
    let run = downloader.start(requests);
    let bars = Bars::new(urls.len() as u64);
    let events = run.events();
    let drawer = smol::spawn(async move {
        while let Ok(e) = events.recv().await {
            bars.on(e);
        }
        bars.total.finish_and_clear();
    });
    let report = run.finish().await;
    drawer.await;
    for r in &report.results {
        let what = match (&r.status, &r.error) {
            (_, Some(e)) => format!("FAILED after {} attempts: {e}", r.attempts),
            (DownloadStatus::Resumed, _) => format!("resumed from byte {}", r.resumed_from),
            (s, _) => format!("{s:?}"),
        };
        println!("{:>10} B  {}  {}", r.bytes, r.url, what);
    }
    let s = report.summary;
    println!(
        "{} files: {} succeeded, {} failed, {} skipped; {:.1} MB in {:.2} s into {}",
        s.total,
        s.succeeded,
        s.failed,
        s.skipped,
        s.bytes as f64 / 1e6,
        s.duration.as_secs_f64(),
        out.display()
    );
    Ok(s.failed == 0)
}

/// A generated file set on a ChaosServer, with faults on a few files.
async fn demo_server() -> Result<(ChaosServer, Vec<String>), BoxError> {
    let mut builder = ChaosServer::builder();
    let mut names = Vec::new();
    for i in 0..24u32 {
        let len = 64 * 1024 * (1 + (i as usize * 37) % 48);
        let bytes: Vec<u8> = (0..len)
            .map(|j| (j as u32 ^ i).wrapping_mul(2654435761) as u8)
            .collect();
        let name = format!("file-{i:02}.bin");
        builder = builder.with_file(&name, bytes);
        names.push(name);
    }
    let server = builder.start().await?;
    let mut urls: Vec<String> = names
        .iter()
        .map(|n| server.url(&format!("/files/{n}")))
        .collect();
    urls[3].push_str("?cut=30000&reset=1"); // a reset mid-body: resumed
    urls[7].push_str("?fail=1&retry_after=1"); // a 503 with Retry-After
    let target = urls[11].clone();
    let q: String = url::form_urlencoded::byte_serialize(target.as_bytes()).collect();
    urls[11] = server.url(&format!("/redirect-to?url={q}")); // a redirect
    Ok((server, urls))
}

fn read_sums(path: &PathBuf) -> Result<HashMap<String, String>, BoxError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut sums = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (hex, name) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("{}:{}: expected `<sha256>  <name>`", path.display(), n + 1))?;
        sums.insert(
            name.trim().trim_start_matches('*').to_owned(),
            hex.to_owned(),
        );
    }
    Ok(sums)
}

/// A total bar and one bar per active file; hidden off a terminal.
struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    files: std::cell::RefCell<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn new(files: u64) -> Bars {
        let multi = if std::io::stdout().is_terminal() {
            MultiProgress::new()
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        };
        let total = multi.add(ProgressBar::new(files));
        total.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} files {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        total.set_prefix("total");
        Bars {
            multi,
            total,
            files: std::cell::RefCell::new(HashMap::new()),
        }
    }

    fn on(&self, event: DownloadEvent) {
        let mut files = self.files.borrow_mut();
        match event {
            DownloadEvent::Started {
                url, offset, total, ..
            } => {
                let bar = files.entry(url.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(total.unwrap_or(0)));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_prefix("file");
                    bar.set_message(url.rsplit('/').next().unwrap_or("").to_owned());
                    bar
                });
                bar.set_length(total.unwrap_or(0));
                bar.set_position(offset);
            }
            DownloadEvent::Bytes { url, received, .. } => {
                if let Some(bar) = files.get(&url) {
                    bar.set_position(received);
                }
            }
            DownloadEvent::Finished(r) | DownloadEvent::Failed(r) | DownloadEvent::Skipped(r) => {
                if let Some(bar) = files.remove(&r.url) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                self.total.inc(1);
            }
            DownloadEvent::Totals(t) => {
                self.total.set_message(format!(
                    "{:.1} MB, {} failed",
                    t.bytes as f64 / 1e6,
                    t.failed
                ));
            }
            _ => {}
        }
    }
}
