//! The batch downloader against wget2, curl and aria2c, from one local
//! nginx, in the same run.
//!
//! - 2000 × 64 KiB files at concurrency 16 and 64: files/s and MB/s;
//! - 2 × 256 MiB files at concurrency 64: MB/s and peak RSS;
//! - one 256 MiB file, one stream: MB/s beside a single `curl -o`.
//!
//! Every tool runs as a child process under `/usr/bin/time -f %M` (peak
//! RSS in KiB); smolkit runs as this binary re-executed with `--role
//! smolkit`. A missing tool is skipped with a printed reason. Each row is
//! the median of `RUNS` runs.
//!
//! Run: `cargo bench --manifest-path benches/Cargo.toml --bench download`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smolkit::http::download::Downloader;
use smolkit::runtime::Runtime;

const SMALL: usize = 2000;
const SMALL_LEN: usize = 64 * 1024;
const LARGE: usize = 2;
const LARGE_LEN: usize = 256 << 20;
const RUNS: usize = 3;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--role") {
        // --role smolkit <concurrency> <out> <urls-file> <durable|plain>
        smolkit_child(
            args[3].parse().unwrap(),
            Path::new(&args[4]),
            Path::new(&args[5]),
            args[6] == "durable",
        );
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let work = tempfile::tempdir().unwrap();
    let www = work.path().join("www");
    std::fs::create_dir_all(www.join("small")).unwrap();
    std::fs::create_dir_all(www.join("large")).unwrap();
    generate(&www);
    let Some(nginx) = Nginx::start(work.path(), &www) else {
        println!("nginx is not installed: nothing to measure (apt-get install nginx)");
        return;
    };
    let small: Vec<String> = (0..SMALL)
        .map(|i| format!("{}/small/f{i:04}.bin", nginx.url))
        .collect();
    let large: Vec<String> = (0..LARGE)
        .map(|i| format!("{}/large/big{i}.bin", nginx.url))
        .collect();
    println!("| workload | tool | files/s | MB/s | peak RSS (MiB) |");
    println!("|---|---|---:|---:|---:|");
    for concurrency in [16, 64] {
        for tool in Tool::ALL {
            row(
                &format!("{SMALL} × 64 KiB, c={concurrency}"),
                tool,
                concurrency,
                &small,
                work.path(),
            );
        }
    }
    for tool in Tool::ALL {
        row(
            &format!("{LARGE} × 256 MiB, c=64"),
            tool,
            64,
            &large,
            work.path(),
        );
    }
    for tool in [Tool::Smolkit, Tool::SmolkitPlain, Tool::CurlSingle] {
        row("1 × 256 MiB, one stream", tool, 1, &large[..1], work.path());
    }
    drop(nginx);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tool {
    /// Defaults: every file fsynced, a manifest line with its SHA-256.
    Smolkit,
    /// No fsync, no manifest, no hashing: what curl and wget2 promise.
    SmolkitPlain,
    Wget2,
    Curl,
    Aria2c,
    CurlSingle,
}

impl Tool {
    const ALL: [Tool; 5] = [
        Tool::Smolkit,
        Tool::SmolkitPlain,
        Tool::Wget2,
        Tool::Curl,
        Tool::Aria2c,
    ];

    fn name(self) -> &'static str {
        match self {
            Tool::Smolkit => "smolkit (fsync + manifest + SHA-256)",
            Tool::SmolkitPlain => "smolkit (no fsync, no manifest)",
            Tool::Wget2 => "wget2",
            Tool::Curl => "curl --parallel",
            Tool::Aria2c => "aria2c",
            Tool::CurlSingle => "curl -o",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Tool::Smolkit | Tool::SmolkitPlain => "smolkit",
            Tool::Wget2 => "wget2",
            Tool::Curl | Tool::CurlSingle => "curl",
            Tool::Aria2c => "aria2c",
        }
    }

    /// The command downloading the URLs in `list` into `out`.
    fn command(self, concurrency: usize, out: &Path, list: &Path, urls: &[String]) -> Command {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%M"]);
        match self {
            Tool::Smolkit | Tool::SmolkitPlain => {
                let mode = if self == Tool::Smolkit {
                    "durable"
                } else {
                    "plain"
                };
                c.arg(std::env::current_exe().unwrap())
                    .args(["--role", "smolkit", &concurrency.to_string()])
                    .arg(out)
                    .arg(list)
                    .arg(mode);
            }
            Tool::Wget2 => {
                c.args([
                    "wget2",
                    "-q",
                    "--no-config",
                    "--max-threads",
                    &concurrency.to_string(),
                    "-P",
                ])
                .arg(out)
                .arg("-i")
                .arg(list);
            }
            Tool::Curl => {
                c.args([
                    "curl",
                    "-s",
                    "--fail",
                    "--parallel",
                    "--parallel-max",
                    &concurrency.to_string(),
                ])
                .arg("--output-dir")
                .arg(out)
                .arg("--remote-name-all")
                .args(urls);
            }
            Tool::CurlSingle => {
                c.args(["curl", "-s", "--fail", "-o"])
                    .arg(out.join("single.bin"))
                    .arg(&urls[0]);
            }
            Tool::Aria2c => {
                c.args([
                    "aria2c",
                    "-q",
                    "--file-allocation=none",
                    "--allow-overwrite=true",
                    "--auto-file-renaming=false",
                    "-x",
                    "1",
                    "-j",
                    &concurrency.to_string(),
                    "-d",
                ])
                .arg(out)
                .arg("-i")
                .arg(list);
            }
        }
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        c
    }
}

fn have(program: &str) -> bool {
    program == "smolkit"
        || Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Runs `tool` `RUNS` times and prints the median row.
fn row(workload: &str, tool: Tool, concurrency: usize, urls: &[String], work: &Path) {
    if !have(tool.program()) || !Path::new("/usr/bin/time").exists() {
        println!(
            "| {workload} | {} | skipped: `{}` or /usr/bin/time not installed | | |",
            tool.name(),
            tool.program()
        );
        return;
    }
    let list = work.join("urls.txt");
    std::fs::write(&list, urls.join("\n") + "\n").unwrap();
    let bytes: u64 = urls
        .iter()
        .map(|u| if u.contains("/large/") { LARGE_LEN } else { SMALL_LEN } as u64)
        .sum();
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    for _ in 0..RUNS {
        let out = work.join("out");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let started = Instant::now();
        let result = tool
            .command(concurrency, &out, &list, urls)
            .output()
            .unwrap();
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&result.stderr);
        let peak_kib: u64 = stderr
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0);
        assert!(result.status.success(), "{} failed: {stderr}", tool.name());
        check_out(&out, urls.len(), bytes);
        samples.push((elapsed, peak_kib));
    }
    samples.sort();
    let (elapsed, _) = samples[RUNS / 2];
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let secs = elapsed.as_secs_f64();
    println!(
        "| {workload} | {} | {:.0} | {:.0} | {:.1} |",
        tool.name(),
        urls.len() as f64 / secs,
        bytes as f64 / 1e6 / secs,
        peak as f64 / 1024.0
    );
    let _ = std::io::stdout().flush();
}

/// Every file arrived whole (sizes add up; no part files left).
fn check_out(out: &Path, files: usize, bytes: u64) {
    let mut n = 0;
    let mut total = 0;
    for e in std::fs::read_dir(out).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // the manifest
        }
        assert!(!name.ends_with(".part"), "a part file was left: {name}");
        n += 1;
        total += e.metadata().unwrap().len();
    }
    assert_eq!(
        (n, total),
        (files, bytes),
        "files and bytes in {}",
        out.display()
    );
}

/// The bench's own downloader process.
fn smolkit_child(concurrency: usize, out: &Path, list: &Path, durable: bool) {
    let urls: Vec<String> = std::fs::read_to_string(list)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let rt = Runtime::builder().with_threads(2).build().unwrap();
    let downloader = Downloader::builder(out)
        .with_concurrency(concurrency)
        .with_per_host(concurrency)
        .with_manifest(durable)
        .with_sync(durable)
        .with_spawner(rt.spawner())
        .build()
        .unwrap();
    let report = rt.block_on(downloader.run(urls));
    assert_eq!(
        report.summary.failed,
        0,
        "{:?}",
        report.results.iter().find(|r| r.error.is_some())
    );
    drop(rt);
}

/// 2000 small files and 2 large ones, with content that is not all zeros.
fn generate(www: &Path) {
    let small: Vec<u8> = (0..SMALL_LEN).map(|i| (i * 31 % 251) as u8).collect();
    for i in 0..SMALL {
        std::fs::write(www.join(format!("small/f{i:04}.bin")), &small).unwrap();
    }
    let block: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 17 % 253) as u8).collect();
    for i in 0..LARGE {
        let mut f = std::fs::File::create(www.join(format!("large/big{i}.bin"))).unwrap();
        for _ in 0..LARGE_LEN >> 20 {
            f.write_all(&block).unwrap();
        }
    }
}

struct Nginx {
    url: String,
    pid_file: PathBuf,
}

impl Nginx {
    fn start(work: &Path, www: &Path) -> Option<Nginx> {
        if !have("nginx") {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pid_file = work.join("nginx.pid");
        let conf = work.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon on; worker_processes 2; pid {pid}; error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  types {{ }} default_type application/octet-stream;
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp;
  uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  server {{ listen 127.0.0.1:{port}; root {www}; }}
}}
",
                pid = pid_file.display(),
                work = work.display(),
                www = www.display(),
            ),
        )
        .unwrap();
        let ok = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(work)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("nginx did not start");
            return None;
        }
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..200 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Nginx {
            url: format!("http://{addr}"),
            pid_file,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}
