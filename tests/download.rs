//! `http::download::Downloader` against the ChaosServer's faults, nginx
//! (from `.ci/run`), a killed child process, and hostile names.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, fast_retry, within};
use proptest::prelude::*;
use smolkit::http::download::{
    DownloadError, DownloadEvent, DownloadRequest, DownloadStatus, Downloader, MANIFEST,
};
use smolkit::runtime::Clock;
use smolkit::testing::{ChaosServer, ManualClock};

/// 300 KiB of a pattern that differs from its reverse.
fn data() -> Vec<u8> {
    (0..300 * 1024u32).map(|i| (i * 7 % 253) as u8).collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// No `.part` or `.part.meta` left in `dir`.
fn no_parts(dir: &Path) {
    let parts: Vec<String> = files_in(dir)
        .into_iter()
        .filter(|n| n.contains(".part"))
        .collect();
    assert!(parts.is_empty(), "stray part files: {parts:?}");
}

fn downloader(dir: &Path) -> Downloader {
    Downloader::builder(dir)
        .with_retry(fast_retry(4))
        .with_idle_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A downloader on `clock`, with no idle timeout (nothing else waits on
/// the clock but what the test watches).
fn on_clock(dir: &Path, clock: &Arc<ManualClock>) -> smolkit::http::download::DownloaderBuilder {
    Downloader::builder(dir)
        .with_clock(clock.clone())
        .with_idle_timeout(None)
}

async fn server() -> ChaosServer {
    ChaosServer::builder()
        .with_file("a.bin", data())
        .with_file("b.txt", "bee")
        .with_file("c.txt", "sea")
        .start()
        .await
        .unwrap()
}

/// The requests the server saw for `path_prefix`, with their Range headers.
fn ranges(server: &ChaosServer, path_prefix: &str) -> Vec<Option<String>> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with(path_prefix))
        .map(|r| {
            r.headers
                .get("range")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn a_batch_downloads_whole_files_atomically_with_a_manifest() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let dl = downloader(dir.path());
            let run = dl.start([
                server.url("/files/a.bin"),
                server.url("/files/b.txt"),
                server.url("/files/c.txt"),
            ]);
            let events = run.events();
            let report = run.finish().await;
            assert_eq!(report.summary.total, 3);
            assert_eq!(report.summary.succeeded, 3, "{report:?}");
            assert_eq!(report.summary.bytes, data().len() as u64 + 6);
            for r in &report.results {
                assert_eq!(r.status, DownloadStatus::Downloaded);
                assert_eq!(r.attempts, 1);
            }
            assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), data());
            assert_eq!(std::fs::read(dir.path().join("b.txt")).unwrap(), b"bee");
            assert_eq!(
                report.results[1].path.as_deref(),
                Some(&*dir.path().join("b.txt"))
            );
            let sha = report.results[1].sha256.clone().unwrap();
            assert_eq!(sha, sha256_hex(b"bee"));
            no_parts(dir.path());
            let manifest = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
            assert_eq!(manifest.lines().count(), 3);
            assert!(manifest.contains(&sha));
            // Events: a start and an end per file, totals at the end.
            let mut started = 0;
            let mut finished = 0;
            let mut last_totals = None;
            while let Ok(e) = events.try_recv() {
                match e {
                    DownloadEvent::Started { .. } => started += 1,
                    DownloadEvent::Finished(_) => finished += 1,
                    DownloadEvent::Totals(t) => last_totals = Some(t),
                    _ => {}
                }
            }
            assert_eq!((started, finished), (3, 3));
            assert_eq!(last_totals.map(|t| (t.done, t.failed)), Some((3, 0)));
        })
    });
}

#[test]
fn the_manifest_records_the_real_digest() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let report = downloader(dir.path())
                .run([server.url("/files/b.txt")])
                .await;
            let expected = sha256_hex(b"bee");
            assert_eq!(report.results[0].sha256.as_deref(), Some(expected.as_str()));
            let manifest = std::fs::read_to_string(dir.path().join(MANIFEST)).unwrap();
            let line: serde_json::Value = serde_json::from_str(manifest.trim()).unwrap();
            assert_eq!(line["sha256"], expected.as_str());
            assert_eq!(line["bytes"], 3);
            assert_eq!(line["path"], "b.txt");
            assert!(line["etag"].as_str().is_some_and(|e| e.starts_with('"')));
        })
    });
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_reset_mid_body_is_retried_and_resumed_with_if_range() {
    for fault in ["cut=100000&reset=1", "cut=100000"] {
        within(move || {
            smol::block_on(async move {
                let server = server().await;
                let dir = tempfile::tempdir().unwrap();
                let url = server.url(&format!("/files/a.bin?{fault}"));
                let report = downloader(dir.path()).run([url]).await;
                let r = &report.results[0];
                assert_eq!(r.status, DownloadStatus::Resumed, "{fault}: {r:?}");
                assert_eq!(r.resumed_from, 100_000, "{fault}");
                assert_eq!(r.attempts, 2);
                assert_eq!(
                    std::fs::read(dir.path().join("a.bin")).unwrap(),
                    data(),
                    "{fault}"
                );
                assert_eq!(
                    ranges(&server, "/files/a.bin"),
                    [None, Some("bytes=100000-".into())]
                );
                let second = &server.requests()[1];
                let if_range = second.headers.get("if-range").expect("If-Range sent");
                assert!(if_range.to_str().unwrap().starts_with('"'), "a strong ETag");
                no_parts(dir.path());
            })
        });
    }
}

#[test]
fn a_range_ignored_with_200_restarts_from_zero() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let url = server.url("/files/a.bin?cut=50000&ignore_range=1");
            let report = downloader(dir.path()).run([url]).await;
            let r = &report.results[0];
            assert_eq!(r.status, DownloadStatus::Downloaded, "{r:?}");
            assert_eq!(r.resumed_from, 0);
            assert_eq!(r.attempts, 2);
            assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), data());
        })
    });
}

#[test]
fn a_changed_resource_restarts_instead_of_appending() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            // The first answer is cut; then the file changes.
            let url = server.url("/files/a.bin?cut=50000&version_after=1");
            let report = downloader(dir.path()).run([url]).await;
            let r = &report.results[0];
            assert_eq!(r.status, DownloadStatus::Downloaded, "{r:?}");
            let mut v2 = data();
            v2.reverse();
            assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), v2);
            // The second request asked for the rest under the old ETag and
            // got the new version whole.
            assert_eq!(
                ranges(&server, "/files/a.bin"),
                [None, Some("bytes=50000-".into())]
            );
        })
    });
}

#[test]
fn a_503_with_retry_after_waits_on_the_clock_then_succeeds() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let clock = Arc::new(ManualClock::new());
            let dl = on_clock(dir.path(), &clock).build().unwrap();
            let run = dl.start([server.url("/files/b.txt?fail=1&retry_after=7")]);
            // The retry waits for exactly the server's 7 s.
            clock.wait_for_sleepers(1).await;
            let wait = clock.next_deadline().unwrap() - clock.now();
            assert_eq!(wait, Duration::from_secs(7));
            assert_eq!(server.requests().len(), 1);
            clock.advance(Duration::from_secs(7));
            let report = run.finish().await;
            assert_eq!(report.results[0].status, DownloadStatus::Downloaded);
            assert_eq!(report.results[0].attempts, 2);
        })
    });
}

#[test]
fn client_errors_are_not_retried_and_leave_nothing() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let report = downloader(dir.path())
                .run([
                    server.url("/files/missing.bin"),
                    server.url("/files/b.txt?fail=1&status=403"),
                ])
                .await;
            for r in &report.results {
                assert_eq!(r.status, DownloadStatus::Failed);
                assert_eq!(r.attempts, 1);
                assert!(matches!(
                    r.error.as_deref(),
                    Some(DownloadError::Status { status, .. }) if status.is_client_error()
                ));
            }
            assert_eq!(report.summary.failed, 2);
            assert_eq!(files_in(dir.path()), [MANIFEST]);
        })
    });
}

#[test]
fn a_checksum_mismatch_fails_and_keeps_no_file() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let good = DownloadRequest::new(server.url("/files/b.txt"))
                .with_sha256_hex(&sha256_hex(b"bee"))
                .unwrap();
            let bad = DownloadRequest::new(server.url("/files/c.txt")).with_sha256([0; 32]);
            let report = downloader(dir.path()).run([good, bad]).await;
            assert_eq!(report.results[0].status, DownloadStatus::Downloaded);
            let r = &report.results[1];
            assert_eq!(r.status, DownloadStatus::Failed);
            assert!(
                matches!(r.error.as_deref(), Some(DownloadError::Checksum { .. })),
                "{r:?}"
            );
            assert!(!dir.path().join("c.txt").exists());
            no_parts(dir.path());
            let err = DownloadRequest::new("http://x/")
                .with_sha256_hex("abc")
                .unwrap_err();
            assert_eq!(err.setting, "sha256");
        })
    });
}

#[test]
fn a_rerun_skips_what_the_manifest_lists() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let urls = [server.url("/files/b.txt"), server.url("/files/c.txt")];
            downloader(dir.path()).run(urls.clone()).await;
            let before = server.requests().len();
            // c.txt disappeared: it alone is fetched again.
            std::fs::remove_file(dir.path().join("c.txt")).unwrap();
            let report = downloader(dir.path()).run(urls).await;
            assert_eq!(report.results[0].status, DownloadStatus::AlreadyDone);
            assert_eq!(report.results[0].attempts, 0);
            assert_eq!(report.results[1].status, DownloadStatus::Downloaded);
            assert_eq!(report.summary.skipped, 1);
            assert_eq!(server.requests().len(), before + 1);
            assert_eq!(files_in(dir.path()), [MANIFEST, "b.txt", "c.txt"]);
        })
    });
}

#[test]
fn hostile_server_names_stay_inside_the_folder() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let outer = tempfile::tempdir().unwrap();
            let dir = outer.path().join("out");
            let hostile = [
                r#"attachment; filename="../../escape.txt""#,
                r#"attachment; filename="/etc/passwd""#,
                r#"attachment; filename*=UTF-8''..%2F..%2Fescape2.txt"#,
                r#"attachment; filename="C:\\Windows\\win.ini""#,
                r#"attachment; filename="..""#,
                r#"attachment; filename="CON""#,
            ];
            let urls: Vec<String> = hostile
                .iter()
                .enumerate()
                .map(|(i, cd)| {
                    let q: String = url::form_urlencoded::byte_serialize(cd.as_bytes()).collect();
                    server.url(&format!("/files/b.txt?key=k{i}&disposition={q}"))
                })
                .collect();
            let report = downloader(&dir).run(urls).await;
            assert_eq!(report.summary.succeeded, hostile.len(), "{report:?}");
            assert_eq!(
                files_in(outer.path()),
                ["out"],
                "nothing outside the folder"
            );
            let names = files_in(&dir);
            for r in &report.results {
                let p = r.path.as_ref().unwrap();
                assert_eq!(p.parent(), Some(dir.as_path()), "{p:?}");
            }
            assert!(names.contains(&"escape.txt".to_owned()), "{names:?}");
            assert!(names.contains(&"_CON".to_owned()), "{names:?}");
            assert_eq!(names.len(), hostile.len() + 1, "{names:?}");
        })
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any string sanitizes to nothing or to one plain component that,
    /// joined to a folder, stays in it.
    #[test]
    fn sanitized_names_are_one_component_inside_the_folder(raw in "\\PC{0,300}|[./\\\\:a-zA-Z\\x00-\\x1f]{0,40}") {
        if let Some(name) = smolkit::http::download::sanitize(&raw) {
            let dir = PathBuf::from("/srv/out");
            let joined = dir.join(&name);
            prop_assert_eq!(joined.parent(), Some(dir.as_path()));
            prop_assert_eq!(joined.components().count(), dir.components().count() + 1);
            prop_assert!(name.len() <= smolkit::http::download::MAX_NAME_BYTES);
            prop_assert!(!name.starts_with('.'));
            prop_assert!(!name.chars().any(|c| c.is_control() || "/\\\\:<>\"|?*".contains(c)));
        }
    }
}

#[test]
fn robots_txt_is_fetched_once_and_disallowed_urls_are_skipped() {
    within(|| {
        smol::block_on(async {
            let server = ChaosServer::builder()
                .with_file("robots.txt", "User-agent: *\nDisallow: /files/secret\n")
                .with_file("open.txt", "open")
                .with_file("secret.txt", "secret")
                .with_file("open2.txt", "open2")
                .start()
                .await
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let dl = Downloader::builder(dir.path())
                .with_robots(true)
                .build()
                .unwrap();
            let report = dl
                .run([
                    server.url("/files/open.txt"),
                    server.url("/files/secret.txt"),
                    server.url("/files/open2.txt"),
                ])
                .await;
            let statuses: Vec<_> = report.results.iter().map(|r| r.status).collect();
            assert_eq!(
                statuses,
                [
                    DownloadStatus::Downloaded,
                    DownloadStatus::Disallowed,
                    DownloadStatus::Downloaded
                ]
            );
            let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
            assert_eq!(
                paths.iter().filter(|p| *p == "/robots.txt").count(),
                1,
                "{paths:?}"
            );
            assert!(!paths.iter().any(|p| p.contains("secret")), "{paths:?}");
            assert_eq!(report.summary.skipped, 1);
        })
    });
}

#[test]
fn the_interval_spaces_requests_to_one_host_on_the_clock() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let clock = Arc::new(ManualClock::new());
            let dl = on_clock(dir.path(), &clock)
                .with_interval(Duration::from_secs(5))
                .build()
                .unwrap();
            let run = dl.start([server.url("/files/b.txt"), server.url("/files/c.txt")]);
            // The first goes at once, the second waits its turn.
            clock.wait_for_sleepers(1).await;
            eventually("the first request", || server.requests().len() == 1);
            assert_eq!(
                clock.next_deadline().unwrap() - clock.now(),
                Duration::from_secs(5)
            );
            assert_eq!(server.requests().len(), 1);
            clock.advance(Duration::from_secs(5));
            let report = run.finish().await;
            assert_eq!(report.summary.succeeded, 2);
        })
    });
}

#[test]
fn adaptive_concurrency_backs_off_on_slow_transfers() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let dl = Downloader::builder(dir.path())
                .with_concurrency(4)
                .with_adaptive(true)
                .build()
                .unwrap();
            assert_eq!(dl.adaptive_limit().unwrap().limit(), 4);
            // 2 KB at 20 KB/s: every transfer is far below 100 KB/s.
            let urls: Vec<String> = (0..4)
                .map(|i| server.url(&format!("/files/b.txt?key=s{i}&bps=20")))
                .collect();
            let report = dl.run(urls).await;
            assert_eq!(report.summary.succeeded, 4);
            assert!(dl.adaptive_limit().unwrap().limit() < 4);
            let fixed = downloader(dir.path());
            assert!(fixed.adaptive_limit().is_none());
        })
    });
}

#[test]
fn bad_settings_are_refused_naming_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let e = Downloader::builder(dir.path())
        .with_concurrency(0)
        .build()
        .unwrap_err();
    assert_eq!(e.setting, "concurrency");
    let e = Downloader::builder(dir.path())
        .with_per_host(0)
        .build()
        .unwrap_err();
    assert_eq!(e.setting, "per_host");
    let e = Downloader::builder(dir.path())
        .with_user_agent(" ")
        .build()
        .unwrap_err();
    assert_eq!(e.setting, "user_agent");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = Downloader::builder(file.join("sub")).build().unwrap_err();
    assert_eq!(e.setting, "dir");
    // Bad URLs fail their own file only.
    let report = smol::block_on(downloader(dir.path()).run(["not a url", "ftp://h/x"]));
    for r in &report.results {
        assert!(
            matches!(r.error.as_deref(), Some(DownloadError::InvalidUrl { .. })),
            "{r:?}"
        );
    }
}

/// The child of `a_killed_run_resumes_to_identical_files`: downloads the
/// URLs in `SMOLKIT_DL_CHILD` (dir, then URLs, `|`-separated) and exits.
#[test]
fn child_download() {
    let Ok(spec) = std::env::var("SMOLKIT_DL_CHILD") else {
        return;
    };
    let mut parts = spec.split('|');
    let dir = PathBuf::from(parts.next().unwrap());
    let urls: Vec<String> = parts.map(str::to_owned).collect();
    let report = smol::block_on(downloader(&dir).run(urls));
    assert_eq!(report.summary.failed, 0);
}

#[test]
fn a_killed_run_resumes_to_identical_files() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            // a.bin at 200 KB/s (1.5 s), the small ones at once.
            let urls = [
                server.url("/files/b.txt"),
                server.url("/files/a.bin?bps=200000"),
                server.url("/files/c.txt"),
            ];
            let spec = std::iter::once(dir.path().display().to_string())
                .chain(urls.iter().cloned())
                .collect::<Vec<_>>()
                .join("|");
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_download", "--nocapture"])
                .env("SMOLKIT_DL_CHILD", spec)
                .spawn()
                .unwrap();
            let part = dir.path().join("a.bin.part");
            eventually("a partial a.bin", || {
                std::fs::metadata(&part).is_ok_and(|m| m.len() >= 40_000)
            });
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let report = downloader(dir.path()).run(urls.clone()).await;
            assert_eq!(report.summary.failed, 0, "{report:?}");
            let a = &report.results[1];
            assert_eq!(a.status, DownloadStatus::Resumed, "{a:?}");
            assert!(a.resumed_from >= 40_000);
            assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), data());
            assert_eq!(std::fs::read(dir.path().join("b.txt")).unwrap(), b"bee");
            assert_eq!(std::fs::read(dir.path().join("c.txt")).unwrap(), b"sea");
            no_parts(dir.path());
            assert_eq!(files_in(dir.path()), [MANIFEST, "a.bin", "b.txt", "c.txt"]);
        })
    });
}

/// nginx's own Range, ETag and If-Range handling: a part file with the
/// current ETag is continued (206), one with a stale ETag restarts (200).
#[test]
fn against_nginx_resume_and_restart_follow_its_validators() {
    let (url, root) = match (
        std::env::var("SMOLKIT_NGINX_URL"),
        std::env::var("SMOLKIT_NGINX_ROOT"),
    ) {
        (Ok(u), Ok(r)) => (u, PathBuf::from(r)),
        _ => {
            assert!(
                std::env::var("SMOLKIT_REQUIRE_SERVICES").is_err(),
                "SMOLKIT_NGINX_URL / SMOLKIT_NGINX_ROOT are not set but services are required"
            );
            eprintln!("nginx not configured (SMOLKIT_NGINX_URL); skipping");
            return;
        }
    };
    within(move || {
        smol::block_on(async move {
            let name = format!("dl-{}.bin", std::process::id());
            std::fs::write(root.join(&name), data()).unwrap();
            let file_url = format!("{url}/{name}");
            // A full download first, to learn nginx's ETag.
            let first = tempfile::tempdir().unwrap();
            downloader(first.path()).run([file_url.clone()]).await;
            assert_eq!(std::fs::read(first.path().join(&name)).unwrap(), data());
            let head = smolkit::http::HyperClient::builder().build().unwrap();
            let response = smolkit::http::Client::send(
                &head,
                http::Request::head(&file_url)
                    .body(smolkit::http::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
            let etag = response.headers()["etag"].to_str().unwrap().to_owned();
            for (validator, want, from) in [
                (etag.clone(), DownloadStatus::Resumed, 123_456),
                ("\"stale-etag\"".to_owned(), DownloadStatus::Downloaded, 0),
            ] {
                let dir = tempfile::tempdir().unwrap();
                let part = dir.path().join(format!("{name}.part"));
                std::fs::write(&part, &data()[..123_456]).unwrap();
                let meta = serde_json::json!({ "url": file_url, "etag": validator });
                std::fs::write(
                    dir.path().join(format!("{name}.part.meta")),
                    meta.to_string(),
                )
                .unwrap();
                let report = downloader(dir.path()).run([file_url.clone()]).await;
                let r = &report.results[0];
                assert_eq!((r.status, r.resumed_from), (want, from), "{r:?}");
                assert_eq!(std::fs::read(dir.path().join(&name)).unwrap(), data());
                no_parts(dir.path());
            }
            let _ = std::fs::remove_file(root.join(&name));
        })
    });
}

/// The child of `memory_stays_bounded_on_a_big_body`: downloads
/// `SMOLKIT_DL_BIG` (url|dir) and prints its peak RSS in KiB.
#[test]
fn child_big_download() {
    let Ok(spec) = std::env::var("SMOLKIT_DL_BIG") else {
        return;
    };
    let (url, dir) = spec.split_once('|').unwrap();
    let report = smol::block_on(downloader(Path::new(dir)).run([url]));
    assert_eq!(report.summary.succeeded, 1, "{report:?}");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    println!("PEAK {}", hwm.split_whitespace().nth(1).unwrap());
}

#[test]
fn memory_stays_bounded_on_a_big_body() {
    common::within_for(Duration::from_secs(180), || {
        smol::block_on(async {
            const BIG: u64 = 1 << 30;
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let url = server.url(&format!("/bytes/{BIG}"));
            let out = blocking::unblock({
                let spec = format!("{url}|{}", dir.path().display());
                move || {
                    std::process::Command::new(std::env::current_exe().unwrap())
                        .args(["--exact", "child_big_download", "--nocapture"])
                        .env("SMOLKIT_DL_BIG", spec)
                        .output()
                        .unwrap()
                }
            })
            .await;
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let peak_kib: u64 = stdout
                .lines()
                .find_map(|l| l.strip_prefix("PEAK "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no PEAK line in {stdout}"));
            assert_eq!(
                std::fs::metadata(dir.path().join(BIG.to_string()))
                    .unwrap()
                    .len(),
                BIG
            );
            eprintln!("peak RSS of the child: {peak_kib} KiB");
            assert!(
                peak_kib < 64 * 1024,
                "peak RSS {peak_kib} KiB for a 1 GiB body"
            );
        })
    });
}

#[test]
fn without_resume_old_parts_go_but_retries_still_resume() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let url = server.url("/files/a.bin?cut=70000&cuts=2");
            // An earlier run that gave up, leaving a resumable part.
            let once = Downloader::builder(dir.path())
                .with_retry(fast_retry(1))
                .build()
                .unwrap();
            let first = once.run([url.clone()]).await;
            assert_eq!(first.results[0].status, DownloadStatus::Failed);
            assert_eq!(first.results[0].bytes, 70_000, "the part is kept");
            let dl = Downloader::builder(dir.path())
                .with_retry(fast_retry(3))
                .with_resume(false)
                .build()
                .unwrap();
            let report = dl.run([url]).await;
            let r = &report.results[0];
            // The old part was dropped (no range asked), and the second cut
            // was resumed from this run's own bytes.
            assert_eq!(
                ranges(&server, "/files/a.bin"),
                [None, None, Some("bytes=70000-".into())]
            );
            assert_eq!(
                (r.status, r.resumed_from),
                (DownloadStatus::Resumed, 70_000)
            );
            assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), data());
        })
    });
}

#[test]
fn a_redirect_is_followed_and_a_slow_body_arrives_whole() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let target = server.url("/files/b.txt");
            let q: String = url::form_urlencoded::byte_serialize(target.as_bytes()).collect();
            let redirected = DownloadRequest::new(server.url(&format!("/redirect-to?url={q}")))
                .with_name("via-redirect.txt");
            let slow = server.url("/files/c.txt?bps=30");
            let report = downloader(dir.path()).run([redirected, slow.into()]).await;
            assert_eq!(report.summary.succeeded, 2, "{report:?}");
            assert_eq!(
                std::fs::read(dir.path().join("via-redirect.txt")).unwrap(),
                b"bee"
            );
            assert_eq!(std::fs::read(dir.path().join("c.txt")).unwrap(), b"sea");
            let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
            assert!(paths.iter().any(|p| p == "/files/b.txt"), "{paths:?}");
        })
    });
}

/// Any `http::Client` works: the same download through surf.
#[cfg(feature = "surf")]
#[test]
fn a_surf_client_downloads_and_resumes_too() {
    within(|| {
        smol::block_on(async {
            let server = server().await;
            let dir = tempfile::tempdir().unwrap();
            let dl = Downloader::builder(dir.path())
                .with_client(Arc::new(smolkit::http::SurfClient::default()))
                .with_retry(fast_retry(3))
                .build()
                .unwrap();
            let report = dl.run([server.url("/files/a.bin?cut=100000")]).await;
            let r = &report.results[0];
            assert_eq!(
                (r.status, r.resumed_from),
                (DownloadStatus::Resumed, 100_000),
                "{r:?}"
            );
            assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), data());
        })
    });
}
